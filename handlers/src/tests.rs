use serde_json::json;
use switchboard_rules::{StepCatalog, StepSpec};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

use super::*;
use crate::records::Contacts;
use crate::records::test_util::{MemoryContacts, MemorySources};

fn step(handler: &str, config: serde_json::Value) -> StepSpec {
    StepSpec {
        handler: handler.into(),
        name: None,
        config: config.as_object().unwrap().clone().into(),
        on_error: Default::default(),
        retry: None,
        idempotency: None,
    }
}

fn event() -> VumiApiEvent {
    VumiApiEvent::new(
        AccountKey::new("acme").unwrap(),
        ConversationKey::new("poll-2026").unwrap(),
        ConversationType::new("survey").unwrap(),
        EventType::new("poll_complete").unwrap(),
        json!({"score": 4}).as_object().unwrap().clone(),
    )
}

async fn run(step: &StepSpec) -> Result<StepOutput, StepError> {
    run_in(&Registry::with_builtins(), step).await
}

/// Runs `step` for [`event`] with the handlers of `registry`.
async fn run_in(registry: &Registry, step: &StepSpec) -> Result<StepOutput, StepError> {
    let event = event();
    let steps = serde_json::Map::new();
    let scope = registry
        .templates()
        .scope(&EventValue::new(&event), &steps, &event.account_key);
    let event_value = EventValue::new(&event);
    let input = StepInput {
        event: &event,
        event_value: &event_value,
        chain: "c",
        step,
        steps: &steps,
        attempt: 1,
        templates: registry.templates(),
        scope: &scope,
    };
    registry.get(&step.handler).unwrap().handle(&input).await
}

fn check_step(s: &StepSpec) -> Vec<String> {
    match Registry::with_builtins().check_step(&AccountKey::new("acme").unwrap(), s, &[]) {
        Ok(()) => vec![],
        Err(p) => p
            .into_iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect(),
    }
}

#[test]
fn catalog_checks() {
    assert!(check_step(&step("log", json!({}))).is_empty());
    assert!(
        check_step(&step(
            "emit",
            json!({"event_type": "points_awarded", "data": {"n": "{{ event.event_data.score }}"}})
        ))
        .is_empty()
    );
    assert_eq!(
        check_step(&step("emit", json!({}))),
        vec!["config.event_type: required option is missing"]
    );
    assert_eq!(
        check_step(&step("emit", json!({"event_type": "a.b"}))),
        vec![r#"config.event_type: invalid event_type "a.b": must match ^[A-Za-z0-9_-]{1,64}$"#]
    );
    assert_eq!(
        check_step(&step("log", json!({"mesage": "x"}))),
        vec!["config.mesage: unknown option; this handler takes message, level, fields"]
    );
    assert!(
        check_step(&step("log", json!({"level": "loud"})))[0]
            .contains("\"loud\" is not one of trace")
    );
    assert!(check_step(&step("teleport", json!({})))[0].starts_with(
        "handler: unknown handler \"teleport\"; the built-in handlers are delay, digest, emit, log, wait_for_event"
    ));
    assert!(check_step(&step("script:award", json!({})))[0].contains("no script store"));
    assert!(
        check_step(&step("log", json!({"message": "{{ event.nope }}"})))[0]
            .contains("`event.nope`")
    );
}

#[tokio::test]
async fn emit_builds_a_child_request() {
    let out = run(&step(
        "emit",
        json!({"event_type": "points_awarded", "conversation_type": "points", "data": {"points": "{{ event.event_data.score * 10 }}"}}),
    ))
    .await
    .unwrap();
    assert_eq!(out.emit.len(), 1);
    let e = &out.emit[0];
    assert_eq!(e.event_type.as_str(), "points_awarded");
    assert_eq!(e.conversation_type.as_str(), "points");
    assert_eq!(e.conversation_key.as_str(), "poll-2026");
    assert_eq!(
        serde_json::Value::Object(e.event_data.clone()),
        json!({"points": 40})
    );
    assert_eq!(out.data["event_type"], json!("points_awarded"));
}

/// A child inherits its parent's `expires_at` (the executor's part) unless
/// the emit sets one; one that renders to no time fails the step for good.
#[tokio::test]
async fn emit_may_set_the_childs_expiry() {
    let out = run(&step("emit", json!({"event_type": "noted"})))
        .await
        .unwrap();
    assert_eq!(out.emit[0].expires_at, None);
    let out = run(&step(
        "emit",
        json!({"event_type": "noted", "expires_at": "2030-01-0{{ 1 + 1 }}T09:00:00Z"}),
    ))
    .await
    .unwrap();
    assert_eq!(
        out.emit[0].expires_at,
        Some(time::macros::datetime!(2030-01-02 09:00 UTC))
    );
    let err = run(&step(
        "emit",
        json!({"event_type": "noted", "expires_at": "{{ event.event_type }}"}),
    ))
    .await
    .unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("config.expires_at"), "{err}");
}

#[tokio::test]
async fn emit_fails_permanently_on_a_bad_rendered_key() {
    let err = run(&step(
        "emit",
        json!({"event_type": "{{ event.event_type }}.x"}),
    ))
    .await
    .unwrap_err();
    assert!(!err.is_retryable());
    assert!(
        err.to_string()
            .contains("config.event_type: rendered to invalid event_type \"poll_complete.x\""),
        "{err}"
    );
}

#[tokio::test]
async fn log_outputs_nothing_and_fails_on_undefined() {
    // No output; its line, rendered, is kept for the trace.
    assert_eq!(
        run(&step(
            "log",
            json!({"message": "score {{ event.event_data.score }}"})
        ))
        .await
        .unwrap(),
        StepOutput {
            logs: vec![crate::LogLine {
                level: "info".into(),
                message: "score 4".into()
            }],
            ..StepOutput::default()
        }
    );
    let err = run(&step(
        "log",
        json!({"message": "{{ event.event_data.missing }}"}),
    ))
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("`event.event_data.missing` is undefined"),
        "{err}"
    );
}

#[test]
fn webhook_signature_matches_the_specs_test_vector() {
    // From the Standard Webhooks specification's reference libraries.
    let signature = webhook::sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        br#"{"test": 2432232314}"#,
    )
    .unwrap();
    assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    assert!(
        webhook::sign("whsec_not base64!", "id", 1, b"{}")
            .unwrap_err()
            .contains("not a Standard Webhooks secret")
    );
}

#[test]
fn webhook_verification_checks_signature_and_age() {
    use webhook::{VerifyError, verify};
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    let body = br#"{"test": 2432232314}"#;
    let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    let at = 1614265330;
    let check = |timestamp: &str, signatures: &str, body: &[u8], now: i64| {
        verify(secret, id, timestamp, signatures, body, now)
    };
    assert_eq!(check("1614265330", good, body, at), Ok(()));
    // Several signatures (a key rotation): one matching is enough.
    let rotated = format!("v1,bm9wZQ== {good}");
    assert_eq!(check("1614265330", &rotated, body, at + 300), Ok(()));
    assert_eq!(
        check("1614265330", good, body, at + 301),
        Err(VerifyError::Stale {
            timestamp: at,
            off: 301
        })
    );
    assert!(matches!(
        check("1614265330", good, body, at - 301),
        Err(VerifyError::Stale { .. })
    ));
    // Any timestamp at all is only stale, however far off.
    assert_eq!(
        check(&i64::MIN.to_string(), good, body, at),
        Err(VerifyError::Stale {
            timestamp: i64::MIN,
            off: i64::MAX
        })
    );
    assert_eq!(
        check("1614265330", good, br#"{"test": 1}"#, at),
        Err(VerifyError::Mismatch)
    );
    assert_eq!(
        check("1614265331", good, body, at),
        Err(VerifyError::Mismatch)
    );
    assert_eq!(
        check(
            "1614265330",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            body,
            at
        ),
        Err(VerifyError::Mismatch)
    );
    assert_eq!(
        check("yesterday", good, body, at),
        Err(VerifyError::BadTimestamp("yesterday".into()))
    );
}

#[test]
fn smtp_queue_ids_become_remote_ids() {
    assert_eq!(
        email::queue_id("accepted by sendgrid: 250 Ok: queued as sgm-0001"),
        Some("sgm-0001".to_string())
    );
    assert_eq!(
        email::queue_id("accepted by relay: 250 2.0.0 Ok: queued as <4Bq3Xk1ZQz> (done)"),
        Some("4Bq3Xk1ZQz".to_string())
    );
    assert_eq!(
        email::queue_id("accepted by sink: 250 Message accepted for delivery"),
        None
    );
}

#[tokio::test]
async fn create_contact_upserts_by_msisdn_or_email() {
    let contacts = Arc::new(MemoryContacts::default());
    let mut registry = Registry::with_builtins();
    registry.register(Arc::new(contact::CreateContact::new(contacts.clone())));
    let first = run_in(
        &registry,
        &step(
            "create_contact",
            json!({"msisdn": "+27 82 000 0001", "fields": {"score": "{{ event.event_data.score }}"}}),
        ),
    )
    .await
    .unwrap();
    assert_eq!(first.data["created"], json!(true));
    assert_eq!(first.data["msisdn"], json!("+27820000001"));
    assert_eq!(first.data["fields"], json!({"score": 4}));
    assert!(!first.data.contains_key("account_key"));
    // The same number again, now with an e-mail: the same contact, updated.
    let second = run_in(
        &registry,
        &step(
            "create_contact",
            json!({"msisdn": "0027820000001", "email": "T@Example.org"}),
        ),
    )
    .await
    .unwrap();
    assert_eq!(second.data["created"], json!(false));
    assert_eq!(second.data["key"], first.data["key"]);
    assert_eq!(second.data["email"], json!("t@example.org"));
    let acme = AccountKey::new("acme").unwrap();
    assert_eq!(contacts.list(&acme, 10).unwrap().len(), 1);
    // Nothing to key the contact by, once rendered: a permanent failure.
    let err = run_in(
        &registry,
        &step(
            "create_contact",
            json!({"msisdn": "{{ event.event_data.nope | default('') }}"}),
        ),
    )
    .await
    .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
}

#[test]
fn script_steps_and_conditions_are_resolved_when_a_chain_is_stored() {
    let scripts = Arc::new(ScriptStore::scripts(
        Arc::new(MemorySources::default()),
        Arc::new(ScriptRuntime::default()),
    ));
    let acme = AccountKey::new("acme").unwrap();
    scripts
        .put(
            &acme,
            "award",
            "fn handle(event, steps, config) { #{ points: 1 } }",
        )
        .unwrap();
    let registry = Registry::with_builtins().with_scripts(scripts);
    let check = |s: &StepSpec| registry.check_step(&acme, s, &[]);
    assert!(
        check(&step(
            "script:award",
            json!({"bonus": "{{ event.event_data.score }}"})
        ))
        .is_ok()
    );
    let err = check(&step("script:nope", json!({}))).unwrap_err();
    assert_eq!(err[0].field, "handler");
    assert!(
        err[0]
            .message
            .starts_with("account acme has no script named \"nope\""),
        "{}",
        err[0].message
    );
    assert!(registry.get("script:award").is_some());
    assert!(
        registry
            .check_condition(&acme, "event.event_data.score >= 3")
            .is_ok()
    );
    let err = registry
        .check_condition(&acme, "event.event_data.score >=")
        .unwrap_err();
    assert!(
        err.starts_with("not a valid Rhai expression: line 1, column"),
        "{err}"
    );
}

#[tokio::test]
async fn a_script_step_runs_through_the_registry() {
    let scripts = Arc::new(ScriptStore::scripts(
        Arc::new(MemorySources::default()),
        Arc::new(ScriptRuntime::default()),
    ));
    let acme = AccountKey::new("acme").unwrap();
    scripts
        .put(
            &acme,
            "award",
            "fn handle(event, steps, config) { #{ points: event.event_data.score * config.per } }",
        )
        .unwrap();
    let registry = Registry::with_builtins().with_scripts(scripts);
    let event = event();
    let steps = serde_json::Map::new();
    let event_value = EventValue::new(&event);
    let scope = registry
        .templates()
        .scope(&event_value, &steps, &event.account_key);
    let spec = step(
        "script:award",
        json!({"per": "{{ event.event_data.score }}"}),
    );
    let input = StepInput {
        event: &event,
        event_value: &event_value,
        chain: "c",
        step: &spec,
        steps: &steps,
        attempt: 1,
        templates: registry.templates(),
        scope: &scope,
    };
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        registry.get("script:award").unwrap().handle(&input),
    )
    .await
    .expect("the script step finishes")
    .unwrap();
    assert_eq!(serde_json::Value::Object(out.data), json!({"points": 16}));
}

#[test]
fn urls_in_errors_leave_out_credentials_and_queries() {
    use ports::redact_url;
    let cases = [
        (
            "https://user:pw@gw.example.org/send?api_key=XYZ",
            "https://gw.example.org/send?…",
        ),
        ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/hook"),
        ("https://gw.example.org?key=1", "https://gw.example.org?…"),
        ("https://gw.example.org/a/b?", "https://gw.example.org/a/b"),
    ];
    for (url, shown) in cases {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}
