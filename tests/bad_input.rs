//! Bad input, end to end on NATS: poison published straight to the stream,
//! chains the dispatcher must refuse, templates that fail at run time and a
//! chain that triggers itself. Each lands where the contract says — dead
//! letters with the reason, or a refusal naming chain, step and field — and
//! the dispatcher keeps handling good events.

use async_nats::jetstream;
use serde_json::{Value, json};
use switchboard_sdk::EventId;
use switchboard_sdk::nats::NatsEmitter;

use crate::util::{Dispatcher, NatsServer, TIMEOUT, check_poll_lineage, event, poll_chains};

/// The poll chains, plus a chain whose template needs data the event may not
/// carry, and a chain that emits the very event that triggers it.
fn chains() -> String {
    poll_chains("acme")
        + r#"
[[chains]]
name = "needs-data"
conversation_type = "survey"
event_type = "needs_data"

[[chains.steps]]
handler = "log"
name = "first"

[[chains.steps]]
handler = "emit"
config = { event_type = "never", data = { x = "{{ event.event_data.missing }}" } }

[[chains.steps]]
handler = "log"
name = "after"

[[chains]]
name = "echo"
conversation_type = "loop"
event_type = "ping"

[[chains.steps]]
handler = "emit"
config = { event_type = "ping" }
"#
}

/// Publishes raw bytes to the events stream, as a worker with a bug would.
async fn publish_raw(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    js.publish(subject.to_string(), payload.into())
        .await
        .expect("publish")
        .await
        .expect("JetStream stores the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_go_to_dead_letters_and_the_dispatcher_keeps_handling() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &chains()).await;
    let client = async_nats::connect(nats.url())
        .await
        .expect("a NATS connection");
    let js = jetstream::new(client.clone());
    let emitter = NatsEmitter::new(client);
    let subject = "vumi.events.acme.survey.poll_complete";

    // Not JSON at all.
    publish_raw(&js, subject, br#"{"v": 1, "id": "truncated"#.to_vec()).await;
    let letter = d
        .wait_for_dead_letter("acme", "malformed JSON", |l| {
            l["payload"] == r#"{"v": 1, "id": "truncated"#
        })
        .await;
    assert_eq!(letter["reason"], "poison", "{letter:#}");
    assert_eq!(letter["subject"], subject);
    assert_eq!(letter["event"], Value::Null);
    assert!(
        letter["error"].as_str().unwrap().contains("not valid JSON"),
        "{letter:#}"
    );
    // The CLI lists it and shows it in full.
    let listed = d.cli(&["dead-letters", "list", "acme"]).await;
    let id = letter["id"].as_str().expect("a dead letter id");
    assert!(
        listed
            .ok()
            .lines()
            .any(|l| l.starts_with(id) && l.contains("poison")),
        "{}",
        listed.stdout
    );
    let shown = d
        .cli(&["dead-letters", "show", "acme", id, "--json"])
        .await
        .json();
    assert_eq!(shown, letter);
    // For people by default: why, and how to replay it.
    let text = d.cli(&["dead-letters", "show", "acme", id]).await;
    let text = text.ok();
    assert!(
        text.contains(&format!("dead letter {id} of account acme (dead)"))
            && text.contains("reason: poison")
            && text.contains(&format!(
                "replay: switchboard dead-letters replay acme {id}"
            )),
        "{text}"
    );

    // JSON, but not an event: an account key with a dot in it.
    let mut bad_key = serde_json::to_value(event(
        "acme",
        "survey",
        "poll_complete",
        "bad-key",
        json!({}),
    ))
    .unwrap();
    bad_key["account_key"] = json!("ac.me");
    publish_raw(&js, subject, serde_json::to_vec(&bad_key).unwrap()).await;
    let letter = d
        .wait_for_dead_letter("acme", "a bad account_key", |l| {
            l["payload"]
                .as_str()
                .is_some_and(|p| p.contains("\"bad-key\""))
        })
        .await;
    assert_eq!(letter["reason"], "poison", "{letter:#}");
    let error = letter["error"].as_str().unwrap();
    assert!(
        error.contains("account_key") && error.contains("ac.me"),
        "{error}"
    );

    // A required field missing.
    let mut no_root = serde_json::to_value(event(
        "acme",
        "survey",
        "poll_complete",
        "no-root",
        json!({}),
    ))
    .unwrap();
    no_root.as_object_mut().unwrap().remove("root_id");
    publish_raw(&js, subject, serde_json::to_vec(&no_root).unwrap()).await;
    let letter = d
        .wait_for_dead_letter("acme", "a missing root_id", |l| {
            l["payload"]
                .as_str()
                .is_some_and(|p| p.contains("\"no-root\""))
        })
        .await;
    assert_eq!(letter["reason"], "poison", "{letter:#}");
    assert!(
        letter["error"].as_str().unwrap().contains("root_id"),
        "{letter:#}"
    );

    // Over the size limit (256 KiB by default; NATS itself takes up to 1 MiB).
    let big = event(
        "acme",
        "survey",
        "poll_complete",
        "too-big",
        json!({"blob": "x".repeat(300 * 1024)}),
    );
    let size = big.to_json().len();
    publish_raw(&js, subject, big.to_json()).await;
    let letter = d
        .wait_for_dead_letter("acme", "an oversize event", |l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("over the limit"))
        })
        .await;
    assert_eq!(letter["reason"], "poison", "{letter:#}");
    assert_eq!(letter["subject"], subject);
    let error = letter["error"].as_str().unwrap();
    assert!(
        error.contains(&size.to_string()) && error.contains("262144"),
        "{error}"
    );
    // The sdk refuses to send it in the first place.
    assert!(
        emitter.emit(&big).await.is_err(),
        "the emitter should refuse an oversize event"
    );

    // An event published on a subject that its own keys contradict.
    let elsewhere = event("acme", "survey", "poll_started", "wrong-subject", json!({}));
    publish_raw(&js, subject, elsewhere.to_json()).await;
    let letter = d
        .wait_for_dead_letter("acme", "an event on the wrong subject", |l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains(&elsewhere.id.to_string()))
        })
        .await;
    assert_eq!(letter["reason"], "poison", "{letter:#}");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("vumi.events.acme.survey.poll_started"),
        "{letter:#}"
    );
    assert_eq!(
        d.trace("acme", &elsewhere.id.to_string()).await,
        None,
        "poison is never handled"
    );

    // Data a template needs is absent at run time: the step fails, later steps
    // are skipped, the event is dead and filed with the variable named.
    let needs = event(
        "acme",
        "survey",
        "needs_data",
        "needs-1",
        json!({"present": 1}),
    );
    emitter.emit(&needs).await.expect("emit");
    let trace = d
        .wait_for_trace("acme", &needs.id.to_string(), TIMEOUT)
        .await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    assert_eq!(
        trace["children"],
        json!([]),
        "a failed emit step emits nothing"
    );
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[0]["outcome"], "ok");
    assert_eq!(steps[1]["name"], "emit");
    assert_eq!(steps[1]["outcome"], "failed");
    assert_eq!(
        steps[1]["attempts"], 1,
        "an undefined variable is not worth a retry"
    );
    let step_error = steps[1]["error"].as_str().unwrap();
    assert!(
        step_error.contains("event.event_data.missing"),
        "{step_error}"
    );
    assert!(step_error.contains("config.data.x"), "{step_error}");
    assert_eq!(steps[2]["name"], "after");
    assert_eq!(steps[2]["outcome"], "skipped");
    assert_eq!(steps[2]["attempts"], 0);
    let letter = d
        .wait_for_dead_letter("acme", "the failed step", |l| {
            l["event"]["id"] == needs.id.to_string()
        })
        .await;
    assert_eq!(letter["reason"], "step_failed", "{letter:#}");
    assert_eq!(letter["chain"], "needs-data");
    assert_eq!(letter["step"], "emit");
    assert_eq!(letter["attempts"], 1);
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("event.event_data.missing"),
        "{letter:#}"
    );

    // A chain that emits its own trigger: handled down to depth 8, the
    // depth-9 event is filed as depth_limit and never handled.
    let root = event("acme", "loop", "ping", "echo-1", json!({}));
    emitter.emit(&root).await.expect("emit");
    let mut id = root.id;
    for depth in 0..=8 {
        let trace = d.wait_for_trace("acme", &id.to_string(), TIMEOUT).await;
        assert_eq!(trace["status"], "done", "depth {depth}: {trace:#}");
        assert_eq!(trace["event"]["depth"], depth);
        assert_eq!(trace["event"]["root_id"], root.id.to_string());
        let child = EventId::derived(id, "echo", "emit", 0);
        assert_eq!(
            trace["children"],
            json!([child.to_string()]),
            "depth {depth}"
        );
        id = child;
    }
    let trace = d.wait_for_trace("acme", &id.to_string(), TIMEOUT).await;
    assert_eq!(trace["status"], "dead", "depth 9: {trace:#}");
    assert_eq!(trace["event"]["depth"], 9);
    assert_eq!(
        trace["chains"],
        json!([]),
        "an over-depth event runs no chain"
    );
    assert_eq!(trace["children"], json!([]));
    let letter = d
        .wait_for_dead_letter("acme", "the depth-9 event", |l| {
            l["event"]["id"] == id.to_string()
        })
        .await;
    assert_eq!(letter["reason"], "depth_limit", "{letter:#}");
    let error = letter["error"].as_str().unwrap();
    assert!(
        error.contains("depth 9") && error.contains("limit of 8"),
        "{error}"
    );
    assert!(
        error.contains(&root.id.to_string()),
        "the error names the root event: {error}"
    );

    // After all that, a good event is handled as ever.
    let good = event(
        "acme",
        "survey",
        "poll_complete",
        "poll-2026",
        json!({"msisdn": "+27820000009", "score": 4}),
    );
    emitter.emit(&good).await.expect("emit");
    check_poll_lineage(&d, "acme", &good.id.to_string(), "+27820000009").await;
    let (status, _) = d.get("/healthz").await;
    assert_eq!(status, 200);

    // Every dead letter was counted, once.
    let letters = d.dead_letters("acme").await;
    assert_eq!(letters.len(), 7, "{letters:#?}");
    assert_eq!(d.metric("dead_lettered", "acme").await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_on_a_subject_without_a_valid_account_is_filed_under_unknown() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    let js = jetstream::new(
        async_nats::connect(nats.url())
            .await
            .expect("a NATS connection"),
    );
    // `vumi.events.>` takes any subject below it, valid account or not.
    publish_raw(
        &js,
        "vumi.events.ac*me.survey.poll_complete",
        b"not json".to_vec(),
    )
    .await;
    let letter = d
        .wait_for_dead_letter("~unknown", "poison without an account", |l| {
            l["payload"] == "not json"
        })
        .await;
    assert_eq!(letter["reason"], "poison");
    assert_eq!(letter["account_key"], "~unknown");
    assert_eq!(letter["subject"], "vumi.events.ac*me.survey.poll_complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_files_with_mistakes_are_refused_naming_chain_step_and_field() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);

    // Each case: a chain file with one mistake, and what the refusal must name.
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown-handler",
            r#"
[[chains.steps]]
handler = "log"

[[chains.steps]]
handler = "send_smss"
"#,
            &[
                r#"chain "notify""#,
                "step 2 (send_smss)",
                "field handler",
                r#"unknown handler "send_smss""#,
            ],
        ),
        (
            "misspelt-root",
            r#"
[[chains.steps]]
handler = "log"
config = { message = "score {{ evnt.event_data.score }}" }
"#,
            &[
                r#"chain "notify""#,
                "step 1 (log)",
                "field config.message",
                "evnt.event_data.score",
            ],
        ),
        (
            "unknown-step",
            r#"
[[chains.steps]]
handler = "log"
name = "first"

[[chains.steps]]
handler = "emit"
config = { event_type = "x", data = { v = "{{ steps.nope.x }}" } }
"#,
            &[
                r#"chain "notify""#,
                "step 2 (emit)",
                "field config.data.v",
                "steps.nope",
                "earlier steps: first",
            ],
        ),
        (
            "missing-option",
            r#"
[[chains.steps]]
handler = "emit"
config = { data = { a = 1 } }
"#,
            &[
                r#"chain "notify""#,
                "step 1 (emit)",
                "field config.event_type",
                "required option is missing",
            ],
        ),
        (
            "rhai-condition",
            r#"
when = 'event.event_data.score >= '

[[chains.steps]]
handler = "log"
"#,
            &[r#"chain "notify""#, "field when", "line 1"],
        ),
        (
            "patient-webhook",
            r#"
[[chains.steps]]
handler = "payment_webhook"
config = { url = "http://127.0.0.1:9/hook", timeout = "1h" }
"#,
            &[
                r#"chain "notify""#,
                "step 1 (payment_webhook)",
                "field config.timeout",
                "3600s is longer than the 300s a step may wait",
            ],
        ),
        (
            "bottomless-digest",
            r#"
[[chains.steps]]
handler = "digest"
config = { key = "k", max_events = 5000 }
"#,
            &[
                r#"chain "notify""#,
                "step 1 (digest)",
                "field config.max_events",
                "from 1 to 1000, not 5000",
            ],
        ),
    ];
    for (name, steps, expected) in cases {
        let text = format!(
            "account_key = \"acme\"\n\n[[chains]]\nname = \"notify\"\nconversation_type = \"survey\"\nevent_type = \"poll_complete\"\n{steps}"
        );
        let path = d.file(&format!("{name}.toml"), &text);
        let path = path.to_str().expect("a UTF-8 path");
        let out = d.cli(&["chains", "apply", path]).await;
        let line = out.fails();
        assert!(
            line.contains(path),
            "{name}: the refusal names the file: {line}"
        );
        for part in *expected {
            assert!(line.contains(part), "{name}: expected {part:?} in: {line}");
        }
    }
    // Nothing was stored.
    let (status, body) = d.get("/v1/accounts/acme/chains").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 0, "{body}");

    // Over HTTP the refusal is a 400 with each problem spelt out.
    let response = d
        .http()
        .put(format!("{}/v1/accounts/acme/chains", d.url()))
        .header("content-type", "application/toml")
        .body(
            r#"
account_key = "acme"

[[chains]]
name = "notify"

[[chains.steps]]
handler = "nope"

[[chains.steps]]
handler = "log"
config = { message = "{{ evnt.x }}" }
"#,
        )
        .send()
        .await
        .expect("PUT chains");
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "invalid_chains", "{body:#}");
    let details = body["error"]["details"].as_array().expect("details");
    assert_eq!(
        details.len(),
        2,
        "both problems are reported at once: {body:#}"
    );
    assert_eq!(details[0]["chain"], "notify");
    assert_eq!(details[0]["step"], json!({"position": 1, "name": "nope"}));
    assert_eq!(details[0]["field"], "handler");
    assert_eq!(details[1]["step"], json!({"position": 2, "name": "log"}));
    assert_eq!(details[1]["field"], "config.message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_refuses_bad_requests_with_a_coded_error() {
    let d = Dispatcher::embedded();
    let good = json!({
        "account_key": "acme",
        "conversation_key": "poll-2026",
        "conversation_type": "survey",
        "event_type": "poll_complete",
        "event_data": {},
    });
    let with = |field: &str, value: Value| {
        let mut e = good.clone();
        e[field] = value;
        e
    };
    let without = |field: &str| {
        let mut e = good.clone();
        e.as_object_mut().unwrap().remove(field);
        e
    };
    let cases = [
        (
            with("account_key", json!("ac.me")),
            "invalid_event",
            "account_key",
        ),
        (without("event_type"), "invalid_event", "event_type"),
        (
            with("event_data", json!([1, 2])),
            "invalid_event",
            "event_data",
        ),
        (with("v", json!(2)), "unsupported_version", "version 2"),
        (
            with("occurred_at", json!("yesterday")),
            "invalid_event",
            "occurred_at",
        ),
        (with("surprise", json!(1)), "invalid_event", "surprise"),
        (
            with("event_data", json!({"blob": "x".repeat(300 * 1024)})),
            "event_too_large",
            "262144",
        ),
    ];
    for (body, code, mentions) in cases {
        let (status, answer) = d.post_event_raw(&body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        let message = answer["error"]["message"].as_str().expect("a message");
        assert!(
            message.contains(mentions),
            "expected {mentions:?} in {message:?}"
        );
    }
    let response = d
        .http()
        .post(format!("{}/v1/events", d.url()))
        .body("{not json")
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.json().await.expect("a JSON error");
    assert_eq!(answer["error"]["code"], "invalid_json", "{answer}");

    // Other requests with bad parts: the status and code say which part.
    for (path, status, code) in [
        ("/nope", 404, "not_found"),
        ("/v1/accounts/ac.me/chains", 400, "invalid_account"),
        ("/v1/accounts/acme/chains/checkout", 404, "not_found"),
        (
            "/v1/accounts/acme/events/xyz/trace",
            400,
            "invalid_event_id",
        ),
        (
            "/v1/accounts/acme/chain-versions/latest",
            400,
            "invalid_version",
        ),
        ("/v1/accounts/ac.me/dead-letters", 400, "invalid_account"),
    ] {
        let (got, body) = d.get(path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "GET {path}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "GET {path}: {body}");
    }
    // None of it reached the bus.
    assert_eq!(d.metric("received", "acme").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_would_emit_an_oversize_event_fails_and_emits_nothing() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "copy"
conversation_type = "survey"
event_type = "upload"

[[chains.steps]]
handler = "emit"
name = "twice"
config = { event_type = "uploaded", data = { a = "{{ event.event_data.blob }}", b = "{{ event.event_data.blob }}" } }
"#,
    )
    .await;
    // 150 KiB fits; the child carries it twice and does not.
    let e = event(
        "acme",
        "survey",
        "upload",
        "u-1",
        json!({"blob": "y".repeat(150 * 1024)}),
    );
    NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection")
        .emit(&e)
        .await
        .expect("emit");
    let trace = d.wait_for_trace("acme", &e.id.to_string(), TIMEOUT).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    assert_eq!(trace["children"], json!([]));
    let step = &trace["chains"][0]["steps"][0];
    assert_eq!(step["outcome"], "failed");
    let error = step["error"].as_str().expect("an error");
    assert!(
        error.contains("uploaded") && error.contains("over the limit"),
        "{error}"
    );
    let letter = d
        .wait_for_dead_letter("acme", "the failed step", |l| {
            l["event"]["id"] == e.id.to_string()
        })
        .await;
    assert_eq!(letter["reason"], "step_failed");
    assert_eq!(letter["chain"], "copy");
    assert_eq!(letter["step"], "twice");
}

/// Regression: bodies over the API's limit, methods a route does not take and
/// chain files that are not UTF-8 were answered by axum's own rejections,
/// in plain text or with no body at all, not `{"error": {"code", "message"}}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_error_is_a_json_error_with_a_code() {
    let d = Dispatcher::embedded();
    let http = d.http();
    let url = |path: &str| format!("{}{path}", d.url());
    // The API takes bodies up to 1 MiB (or the event limit, if larger). One
    // byte more: the server has read the whole body when it refuses it, so
    // the refusal arrives intact rather than as a reset connection.
    let requests = [
        (
            "a body over the limit",
            http.post(url("/v1/events")).body(vec![b' '; (1 << 20) + 1]),
            [413, 400],
        ),
        (
            "a method the route does not take",
            http.delete(url("/v1/events")),
            [405, 405],
        ),
        (
            "a chain file that is not UTF-8",
            http.put(url("/v1/accounts/acme/chains"))
                .body(vec![0xff, 0xfe]),
            [400, 400],
        ),
    ];
    for (what, request, statuses) in requests {
        let response = request.send().await.expect("a response");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        assert!(statuses.contains(&status), "{what}: HTTP {status}: {text}");
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{what}: the error is not JSON: {text:?}"));
        assert!(body["error"]["code"].is_string(), "{what}: {body}");
        assert!(body["error"]["message"].is_string(), "{what}: {body}");
    }
}

/// Over its ingest rate an account gets 429 with `Retry-After` and a JSON
/// error, other accounts are not held up, and the sdk's HTTP emitter waits as
/// asked and gets the event in.
#[tokio::test]
async fn an_account_over_its_ingest_rate_gets_429_and_the_emitter_waits() {
    let d = Dispatcher::with_config(None, "[limits]\ningest_rate = 1\ningest_burst = 3\n");
    let post = |account: &str, n: u32| {
        let body =
            serde_json::to_value(event(account, "t", "e", "c", json!({"n": n}))).expect("an event");
        let http = reqwest::Client::new();
        let url = format!("{}/v1/events", d.url());
        let token = d.admin_token().to_string();
        async move {
            http.post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("the API answers")
        }
    };
    for n in 0..3 {
        assert_eq!(post("busy", n).await.status(), 202, "within the burst");
    }
    let refused = post("busy", 3).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["retry-after"].to_str().expect("a header"),
        "1"
    );
    let body: serde_json::Value = refused.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("busy") && m.contains("ingest_rate")),
        "{body}"
    );
    assert_eq!(
        post("quiet", 0).await.status(),
        202,
        "another account is not held up"
    );

    let emitter = switchboard_sdk::http::HttpEmitter::new(d.url()).with_token(d.admin_token());
    let late = event("busy", "t", "e", "c", json!({"n": 4}));
    emitter
        .emit(&late)
        .await
        .expect("the emitter waits out the 429");
    let trace = d
        .wait_for_trace("busy", &late.id.to_string(), TIMEOUT)
        .await;
    assert_eq!(trace["event"]["id"], late.id.to_string());
}

/// What `run` prints when `config` (a TOML file's text) stops it before it
/// starts.
pub(crate) async fn refused_at_start(dir: &std::path::Path, name: &str, config: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("a config file");
    let out = crate::util::switchboard(&[
        "run",
        "--config",
        path.to_str().expect("a UTF-8 path"),
        "--data",
        dir.join("data").to_str().expect("a UTF-8 path"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    out.fails().to_string()
}

/// What `run` printed, refusing to start, for each of `values` of `key`
/// (`section.name`), each set alone in a config file.
async fn refused_values(key: &str, values: &[&'static str]) -> Vec<(&'static str, String)> {
    let (section, name) = key.split_once('.').expect("a section.name key");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut lines = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let config = format!("[{section}]\n{name} = {value}\n");
        let line = refused_at_start(dir.path(), &format!("{name}-{i}"), &config).await;
        lines.push((*value, line));
    }
    lines
}

/// A replica count JetStream cannot keep stops `run` before it starts,
/// naming the key and the range.
#[tokio::test]
async fn a_stream_replica_count_out_of_range_is_refused_at_start() {
    for (replicas, line) in refused_values("bus.stream_replicas", &["0", "6"]).await {
        assert!(
            line.contains(&format!("bus.stream_replicas is {replicas}")) && line.contains("1 to 5"),
            "{line}"
        );
    }
}

/// A limit of unacked messages so low that events held behind a retry
/// would soon stop every conversation stops `run` before it starts,
/// naming the key and the least it takes.
#[tokio::test]
async fn a_limit_of_unacked_messages_too_low_is_refused_at_start() {
    for (n, line) in refused_values("bus.max_ack_pending", &["0", "1023"]).await {
        assert!(
            line.contains(&format!(
                "bus.max_ack_pending is {n}: it must be at least 1024"
            )),
            "{line}"
        );
    }
}

/// HTTP limits that would refuse every connection or request stop `run`
/// before it starts, naming the key.
#[tokio::test]
async fn http_limits_that_cannot_work_are_refused_at_start() {
    for (n, line) in refused_values("http.max_connections", &["0", "1000001"]).await {
        assert!(
            line.contains(&format!(
                "http.max_connections is {n}: it must be 1 to 1000000"
            )),
            "{line}"
        );
    }
    for key in ["http.header_timeout", "http.body_timeout"] {
        for (_, line) in refused_values(key, &["\"0s\"", "\"500ms\""]).await {
            assert!(
                line.contains(&format!("{key} must be at least 1s")),
                "{line}"
            );
        }
    }
}

/// Standby copies without replicas stop `run` before it starts, saying
/// what is missing.
#[tokio::test]
async fn standbys_without_replicas_are_refused_at_start() {
    for (_, line) in refused_values("bus.standbys", &["1"]).await {
        assert!(
            line.contains("bus.standbys") && line.contains("bus.replicated is off"),
            "{line}"
        );
    }
}

/// A runtime without worker threads, or with more than it takes, stops `run`
/// before it starts, naming the key and the range.
#[tokio::test]
async fn a_worker_thread_count_out_of_range_is_refused_at_start() {
    for (threads, line) in refused_values("runtime.worker_threads", &["0", "5000"]).await {
        assert!(
            line.contains(&format!("runtime.worker_threads is {threads}"))
                && line.contains("1 to 1024"),
            "{line}"
        );
    }
}

/// More event threads than the most it takes stops `run` before it
/// starts, naming the key and the range.
#[tokio::test]
async fn an_event_thread_count_out_of_range_is_refused_at_start() {
    for (threads, line) in refused_values("runtime.event_threads", &["300"]).await {
        assert!(
            line.contains(&format!("runtime.event_threads is {threads}"))
                && line.contains("0 (the shared runtime) to 256"),
            "{line}"
        );
    }
}

/// A page cache of no size, or of more than the machine could hold, stops
/// `run` before it starts, naming the key and the range.
#[tokio::test]
async fn a_store_cache_out_of_range_is_refused_at_start() {
    for (mib, line) in refused_values("store.cache_mib", &["0", "70000"]).await {
        assert!(
            line.contains("store.cache_mib must be between 1 and 65536")
                && line.contains(&format!("not {mib}")),
            "{line}"
        );
    }
}

/// A message retention or body cap that cannot work stops `run` before it
/// starts, naming the key and the least it takes; so does a provider's
/// timeout that is not a duration, or a SendGrid verification key that is
/// not one.
#[tokio::test]
async fn message_settings_that_cannot_work_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, config, expected) in [
        (
            "retention",
            "[messages]\nretention = \"0s\"\n",
            "messages.retention must be at least 1s",
        ),
        (
            "cap",
            "[messages]\nmax_body_bytes = 100\n",
            "messages.max_body_bytes must be at least 1024",
        ),
        (
            "timeout",
            "[providers.sms.twilio]\ntype = \"twilio\"\naccount_sid = \"AC1\"\nauth_token = \"t\"\nfrom = \"+15005550006\"\ntimeout = \"soon\"\n",
            "timeout: ",
        ),
        (
            "sendgrid key",
            "[providers.email.sg]\nhost = \"127.0.0.1\"\nevent_webhook_key = \"MFkwEwYH\"\n",
            "providers.email.sg.event_webhook_key: not a P-256 public key",
        ),
    ] {
        let line = refused_at_start(dir.path(), name, config).await;
        assert!(line.contains(expected), "{name}: {line}");
    }
}

/// `event_data` nested `levels` deep (itself the first), as a value.
fn nested_data(levels: usize) -> Value {
    let mut deep = json!("bottom");
    for _ in 1..levels {
        deep = json!({ "a": deep });
    }
    json!({ "msisdn": "+27820000011", "score": 4, "deep": deep })
}

/// An event whose data nests deeper than its records can be read back
/// within JSON's usual limit is refused, not handled in a loop. Before,
/// one nested 124 levels deep was taken: its journal entry, two levels
/// deeper, could not be read, so the event never had a trace and was
/// handled again every few milliseconds. Now data 64 levels deep is
/// handled and traced; 65 is refused by the HTTP API naming the field, and
/// published straight to the stream (124 levels) it goes to dead letters as
/// poison while the dispatcher handles the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_nested_too_deep_is_refused_not_handled_in_a_loop() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let deep = |levels: usize, conversation: &str| {
        event(
            "acme",
            "survey",
            "poll_complete",
            conversation,
            nested_data(levels),
        )
    };

    let e = deep(64, "c-64");
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");

    let (status, body) = d
        .post_event_raw(&serde_json::to_value(deep(65, "c-65")).unwrap())
        .await;
    assert_eq!(status, 400, "{body:#}");
    assert_eq!(body["error"]["code"], "invalid_event", "{body:#}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("event_data") && message.contains("64 levels"),
        "{body:#}"
    );

    let client = async_nats::connect(nats.url())
        .await
        .expect("a NATS connection");
    let js = jetstream::new(client);
    let poison = deep(124, "c-124");
    publish_raw(
        &js,
        "vumi.events.acme.survey.poll_complete",
        serde_json::to_vec(&poison).unwrap(),
    )
    .await;
    let letter = d
        .wait_for_dead_letter("acme", "the deep event", |l| {
            l["payload"]
                .as_str()
                .is_some_and(|p| p.contains("\"c-124\""))
        })
        .await;
    assert_eq!(letter["reason"], "poison", "{letter:#}");
    assert!(
        letter["error"]
            .as_str()
            .is_some_and(|e| e.contains("event_data")),
        "{letter:#}"
    );
    let after = d
        .post_event(&serde_json::to_value(deep(3, "c-after")).unwrap())
        .await;
    assert_eq!(
        d.wait_for_trace("acme", &after, TIMEOUT).await["status"],
        "done"
    );
    assert!(
        !d.log().contains("an unreadable journal entry was skipped"),
        "{}",
        d.log()
    );
}

/// TOML nested absurdly deep, a few kilobytes of it (80 inline tables, each
/// of whose keys is dotted 78 deep: 6,000 levels of tables), as a chain
/// file and as a template put through the API with an account's token, is
/// refused naming what nests too deep, and the dispatcher goes on. Before,
/// reading it overflowed the stack of the worker thread and aborted the
/// process, every account's with it.
#[tokio::test]
async fn toml_nested_absurdly_deep_is_refused_without_taking_the_dispatcher_down() {
    let d = Dispatcher::embedded();
    let created = d.cli(&["tokens", "create", "acme", "--json"]).await.json();
    let token = created["token"].as_str().expect("a token").to_string();
    let key = vec!["a"; 78].join(".");
    let mut deep = String::from("1");
    for _ in 0..79 {
        deep = format!("{{{key} = {deep}}}");
    }
    let chain = format!(
        "account_key = \"acme\"\n[[chains]]\nname = \"deep\"\nconversation_type = \"survey\"\n\
         event_type = \"x\"\n[[chains.steps]]\nhandler = \"log\"\nconfig = {deep}\n"
    );
    assert!(chain.len() < 16_384, "{} bytes", chain.len());
    let template = format!("channel = \"sms\"\ntext = \"hello\"\n[context]\nsample = {deep}\n");
    for (path, text) in [
        ("/v1/accounts/acme/chains", chain),
        ("/v1/accounts/acme/templates/deep", template),
    ] {
        let (status, body) = d
            .request(reqwest::Method::PUT, path, Some(&token), Some(text))
            .await;
        assert_eq!(status, 400, "{path}: {body:#}");
        assert!(body.to_string().contains("levels deep"), "{path}: {body:#}");
    }

    // Still up, and still taking chains.
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let e = event(
        "acme",
        "survey",
        "poll_complete",
        "after-deep",
        json!({"msisdn": "+27820000011", "score": 4}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    assert_eq!(
        d.wait_for_trace("acme", &id, TIMEOUT).await["status"],
        "done"
    );
}
