use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};
use switchboard_store::{Collection, Store};

use super::*;

/// Knows `log` (no options) and `emit` (needs `event_type`).
struct TestCatalog;

impl StepCatalog for TestCatalog {
    fn check_step(
        &self,
        _: &AccountKey,
        step: &StepSpec,
        earlier: &[&str],
    ) -> Result<(), Vec<FieldProblem>> {
        match step.handler.as_str() {
            "log" => Ok(()),
            "emit" if step.config.to_map().contains_key("event_type") => Ok(()),
            "emit" => Err(vec![FieldProblem::new("config.event_type", "required")]),
            "needs_earlier" if earlier.contains(&"log") => Ok(()),
            "needs_earlier" => Err(vec![FieldProblem::new(
                "config",
                "needs an earlier log step",
            )]),
            other => Err(vec![FieldProblem::new(
                "handler",
                format!("unknown handler {other:?}"),
            )]),
        }
    }

    /// A `log` step whose `secret` option names anything but `set` names an
    /// unset secret.
    fn check_secrets(&self, _: &AccountKey, step: &StepSpec) -> Vec<FieldProblem> {
        match step.config.to_map().get("secret").and_then(|v| v.as_str()) {
            Some(name) if name != "set" => vec![FieldProblem::new(
                "config.secret",
                format!("no secret named {name:?}"),
            )],
            _ => Vec::new(),
        }
    }

    /// Accepts any condition but one that contains `((`.
    fn check_condition(&self, _: &AccountKey, expr: &str) -> Result<(), String> {
        if expr.contains("((") {
            Err("line 1, column 2: unbalanced".into())
        } else {
            Ok(())
        }
    }

    /// As `check_condition`.
    fn check_match(&self, account: &AccountKey, expr: &str) -> Result<(), String> {
        self.check_condition(account, expr)
    }
}

fn acme() -> AccountKey {
    AccountKey::new("acme").unwrap()
}

fn parse(toml: &str) -> ChainFile {
    parse_chain_file(toml, Format::Toml, "test.toml").unwrap()
}

fn check(toml: &str) -> Result<ValidChainFile, ValidationError> {
    validate(parse(toml), &acme(), &TestCatalog)
}

#[test]
fn unset_secrets_are_refused_or_set_aside_for_a_warning() {
    let toml = r#"
account_key = "acme"
[[chains]]
name = "pay"
event_type = "paid"
steps = [
  { handler = "log", config = { secret = "set" } },
  { handler = "log", name = "second", config = { secret = "gateway" } },
]
"#;
    let err = check(toml).unwrap_err();
    assert_eq!(
        err.to_string(),
        "account acme: chain \"pay\", step 2 (second), field config.secret: no secret named \"gateway\""
    );
    let (valid, unset) = validate_deferring_secrets(parse(toml), &acme(), &TestCatalog).unwrap();
    assert_eq!(valid.file().chains.len(), 1);
    assert_eq!(unset, err.problems);
    // Other problems still refuse the file.
    let broken = toml.replace("\"paid\"", "\"paid\"\nwhen = \"((\"");
    let err = validate_deferring_secrets(parse(&broken), &acme(), &TestCatalog).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].field.as_deref(), Some("when"));
}

fn event(ct: &str, et: &str, ck: &str) -> VumiApiEvent {
    VumiApiEvent::new(
        acme(),
        ConversationKey::new(ck).unwrap(),
        ConversationType::new(ct).unwrap(),
        EventType::new(et).unwrap(),
        Default::default(),
    )
}

const MATCH_FILE: &str = r#"
account_key = "acme"

[[chains]]
name = "exact"
conversation_type = "survey"
event_type = "poll_complete"
steps = [{ handler = "log" }]

[[chains]]
name = "any-event-of-survey"
conversation_type = "survey"
event_type = "*"
steps = [{ handler = "log" }]

[[chains]]
name = "poll-2026-only"
conversation_type = "survey"
event_type = "poll_complete"
conversation_key = "poll-2026"
steps = [{ handler = "log" }]

[[chains]]
name = "any-sms"
conversation_type = "*"
event_type = "sms_sent"
steps = [{ handler = "log" }]

[[chains]]
name = "default"
steps = [{ handler = "log" }]
"#;

#[test]
fn matching_table() {
    let chains = AccountChains::new(1, check(MATCH_FILE).unwrap().into_file());
    let table: &[(&str, &str, &str, &[&str])] = &[
        (
            "survey",
            "poll_complete",
            "other",
            &["exact", "any-event-of-survey"],
        ),
        (
            "survey",
            "poll_complete",
            "poll-2026",
            &["exact", "any-event-of-survey", "poll-2026-only"],
        ),
        ("survey", "poll_started", "x", &["any-event-of-survey"]),
        ("ussd", "sms_sent", "x", &["any-sms"]),
        (
            "survey",
            "sms_sent",
            "x",
            &["any-event-of-survey", "any-sms"],
        ),
        ("ussd", "menu_shown", "x", &["default"]),
    ];
    for (ct, et, ck, expected) in table {
        let names: Vec<&str> = chains
            .route(&event(ct, et, ck))
            .chains()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(&names, expected, "event {ct}/{et}/{ck}");
    }
    assert!(matches!(
        chains.route(&event("ussd", "menu_shown", "x")),
        Routing::Default(_)
    ));
}

/// Chains of every kind of match, interleaved: each event gets its chains
/// in file order, whichever of the index's four lookups found them.
#[test]
fn matches_come_in_file_order_across_wildcards() {
    let mut file = String::from("account_key = \"acme\"\n");
    for (name, ct, et) in [
        ("all", "*", "*"),
        ("exact", "survey", "poll_complete"),
        ("any-type", "*", "poll_complete"),
        ("any-event", "survey", "*"),
        ("exact-again", "survey", "poll_complete"),
        ("other", "ussd", "menu_shown"),
    ] {
        file.push_str(&format!(
            "[[chains]]\nname = \"{name}\"\nconversation_type = \"{ct}\"\nevent_type = \"{et}\"\nsteps = [{{ handler = \"log\" }}]\n"
        ));
    }
    let chains = AccountChains::new(1, check(&file).unwrap().into_file());
    let table: &[(&str, &str, &[&str])] = &[
        (
            "survey",
            "poll_complete",
            &["all", "exact", "any-type", "any-event", "exact-again"],
        ),
        ("ussd", "poll_complete", &["all", "any-type"]),
        ("survey", "menu_shown", &["all", "any-event"]),
        ("ussd", "menu_shown", &["all", "other"]),
        ("sms", "sent", &["all"]),
    ];
    for (ct, et, expected) in table {
        let names: Vec<&str> = chains
            .route(&event(ct, et, "x"))
            .chains()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(&names, expected, "event {ct}/{et}");
    }
}

#[test]
fn no_match_without_default_is_unrouted() {
    let file = parse(&MATCH_FILE.replace(
        "name = \"default\"",
        "name = \"fallback\"\nconversation_type = \"nothing\"",
    ));
    let chains = AccountChains::new(
        1,
        validate(file, &acme(), &TestCatalog).unwrap().into_file(),
    );
    assert_eq!(
        chains.route(&event("ussd", "menu_shown", "x")),
        Routing::Unrouted
    );
}

#[test]
fn problems_name_chain_step_and_field() {
    let err = check(
        r#"
account_key = "acme"
[[chains]]
name = "c1"
event_type = "poll_complete"
[[chains.steps]]
handler = "log"
[[chains.steps]]
handler = "emit"
[[chains.steps]]
handler = "teleport"
"#,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "account acme: chain \"c1\", step 2 (emit), field config.event_type: required; \
         chain \"c1\", step 3 (teleport), field handler: unknown handler \"teleport\""
    );
}

#[test]
fn structural_rules() {
    let cases: &[(&str, &str)] = &[
        (
            "[[chains]]\nname = \"a b\"\nsteps = [{ handler = \"log\" }]",
            "chain \"a b\", field name: \"a b\" is not a chain name",
        ),
        (
            "[[chains]]\nname = \"a\"\nsteps = [{ handler = \"log\" }]\n[[chains]]\nname = \"a\"\nsteps = [{ handler = \"log\" }]",
            "another chain of this account has the same name",
        ),
        (
            "[[chains]]\nname = \"a\"",
            "a chain needs at least one step",
        ),
        (
            "[[chains]]\nname = \"a\"\nsteps = [{ handler = \"log\" }, { handler = \"log\" }]",
            "step 2 (log), field name: another step of this chain is already called \"log\"",
        ),
        (
            "[[chains]]\nname = \"a\"\nsteps = [{ handler = \"log\", name = \"my-step\" }]",
            "field name: \"my-step\" is not a step name",
        ),
        (
            "[[chains]]\nname = \"a\"\nwhen = 'event.((score'\nsteps = [{ handler = \"log\" }]",
            "chain \"a\", field when: line 1, column 2: unbalanced",
        ),
        (
            "[[chains]]\nname = \"a\"\nwhen = ' '\nsteps = [{ handler = \"log\" }]",
            "chain \"a\", field when: an empty condition",
        ),
        (
            "[[chains]]\nname = \"a\"\nsteps = [{ handler = \"log\", retry = { max_attempts = 0 } }]",
            "field retry.max_attempts: must be at least 1",
        ),
        (
            "[[chains]]\nname = \"a\"\nsteps = [{ handler = \"needs_earlier\" }]",
            "needs an earlier log step",
        ),
    ];
    for (body, expected) in cases {
        let err = check(&format!("account_key = \"acme\"\n{body}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected),
            "{body}\n=> {err}\nexpected to contain: {expected}"
        );
    }
    let ok = check(
        "account_key = \"acme\"\n[[chains]]\nname = \"a\"\nwhen = 'event.event_data.score > 3'\nsteps = [{ handler = \"log\" }, { handler = \"needs_earlier\" }]",
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn file_for_another_account_is_refused() {
    let err = validate(parse("account_key = \"other\""), &acme(), &TestCatalog).unwrap_err();
    assert!(
        err.to_string()
            .contains("the file is for account \"other\" but is being applied to account \"acme\""),
        "{err}"
    );
}

#[test]
fn parse_errors_give_line_and_column() {
    let err = parse_chain_file(
        "account_key = \"acme\"\n[[chains]]\nname = 3\n",
        Format::Toml,
        "acme.toml",
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("acme.toml: line 3, column 8:"),
        "{err}"
    );
    let err = parse_chain_file(
        "account_key = \"acme\"\nchain = []\n",
        Format::Toml,
        "acme.toml",
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `chain`"), "{err}");
    let err = parse_chain_file("account_key = \"a.b\"\n", Format::Toml, "x.toml").unwrap_err();
    assert!(err.to_string().contains("invalid account_key"), "{err}");
    let err = parse_chain_file(
        r#"{"account_key": "acme", "chains": [{"name": 1}]}"#,
        Format::Json,
        "x.json",
    )
    .unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn json_and_toml_read_the_same() {
    let toml = parse(MATCH_FILE);
    let json = serde_json::to_string(&toml).unwrap();
    assert_eq!(
        parse_chain_file(&json, Format::sniff(&json), "x").unwrap(),
        toml
    );
}

#[test]
fn retry_delays_grow_to_the_cap() {
    let r = RetrySpec {
        max_attempts: 5,
        initial: std::time::Duration::from_millis(100),
        max: std::time::Duration::from_millis(350),
        multiplier: 2.0,
    };
    let ms: Vec<u128> = (1..=4).map(|n| r.delay(n).as_millis()).collect();
    assert_eq!(ms, vec![100, 200, 350, 350]);
    assert_eq!(duration::parse("1.5s").unwrap().as_millis(), 1500);
    assert!(duration::parse("3 weeks").is_err());
}

#[test]
fn store_versions_restore_and_remove() {
    let store = ChainStore::open(Store::temporary().unwrap()).unwrap();
    let v1 = store.apply(check(MATCH_FILE).unwrap()).unwrap();
    assert_eq!(v1.version, 1);
    let only_default =
        "account_key = \"acme\"\n[[chains]]\nname = \"default\"\nsteps = [{ handler = \"log\" }]";
    let v2 = store.apply(check(only_default).unwrap()).unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(store.lookup(&acme()).unwrap().chains().len(), 1);

    let v3 = store.restore(&acme(), 1, &TestCatalog).unwrap();
    assert_eq!((v3.version, v3.change.as_str()), (3, "restore 1"));
    assert_eq!(v3.chains, v1.chains);
    assert_eq!(store.lookup(&acme()).unwrap().version(), 3);

    let v4 = store.remove_chain(&acme(), "any-sms").unwrap();
    assert_eq!(v4.chains.len(), 4);
    assert!(matches!(
        store.remove_chain(&acme(), "nope"),
        Err(ChainStoreError::NoSuchChain { .. })
    ));
    let v5 = store.remove_all(&acme()).unwrap();
    assert!(v5.chains.is_empty());

    let history: Vec<(u64, String)> = store
        .history(&acme())
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.change))
        .collect();
    assert_eq!(
        history,
        vec![
            (1, "apply".to_string()),
            (2, "apply".to_string()),
            (3, "restore 1".to_string()),
            (4, "remove chain any-sms".to_string()),
            (5, "remove all".to_string()),
        ]
    );
    assert!(matches!(
        store.version(&acme(), 9),
        Err(ChainStoreError::NoSuchVersion { version: 9, .. })
    ));
}

/// Applies [`MATCH_FILE`] to acme as a start's chain file would.
fn apply_from_file(store: &ChainStore) -> ChainVersion {
    let file = check(MATCH_FILE).unwrap();
    let change = format!("{FROM_FILE} acme.toml");
    store
        .apply_changes(file, false, &change, &TestCatalog)
        .unwrap()
        .0
}

/// The numbers of acme's versions kept.
fn versions_kept(store: &ChainStore) -> Vec<u64> {
    let history = store.history(&acme()).unwrap();
    history.iter().map(|v| v.version).collect()
}

/// The last versions are kept, and the last applied from a file however
/// old (a start compares its file with it); older ones go as new ones are
/// made, and cannot be restored.
#[test]
fn only_the_last_versions_are_kept_and_the_last_from_a_file() {
    let store = ChainStore::open(Store::temporary().unwrap())
        .unwrap()
        .keeping(3);
    let from_file = || apply_from_file(&store);
    let versions = || versions_kept(&store);
    assert_eq!(from_file().from_file, Some(1));
    for _ in 2..=6 {
        let v = store.apply(check(MATCH_FILE).unwrap()).unwrap();
        assert_eq!(v.from_file, Some(1));
    }
    assert_eq!(versions(), [1, 4, 5, 6]);
    assert_eq!(store.last_from_file(&acme()).unwrap().unwrap().version, 1);
    assert!(matches!(
        store.restore(&acme(), 2, &TestCatalog),
        Err(ChainStoreError::NoSuchVersion { version: 2, .. })
    ));
    assert_eq!(from_file().version, 7);
    assert_eq!(versions(), [5, 6, 7]);
    assert_eq!(store.last_from_file(&acme()).unwrap().unwrap().version, 7);
    let other = AccountKey::new("other").unwrap();
    assert!(store.last_from_file(&other).unwrap().is_none());
}

/// A history longer than the bound (kept before histories were bounded)
/// comes down to it over several versions, a few at a time and the oldest
/// first (what is left stays in one piece), so that no write removes all
/// of it at once.
#[test]
fn a_long_history_comes_down_to_its_bound_a_few_versions_at_a_time() {
    let raw = Store::temporary().unwrap();
    let unbounded = ChainStore::open(raw.clone()).unwrap().keeping(u64::MAX);
    for _ in 1..=20 {
        unbounded.apply(check(MATCH_FILE).unwrap()).unwrap();
    }
    assert_eq!(versions_kept(&unbounded).len(), 20);
    let store = ChainStore::open(raw).unwrap().keeping(3).pruning_at_once(5);
    let apply = || store.apply(check(MATCH_FILE).unwrap()).unwrap().version;
    assert_eq!(apply(), 21);
    let expected: Vec<u64> = (6..=21).collect();
    assert_eq!(versions_kept(&store), expected, "1..=5 went first");
    for (version, left) in [(22, 12), (23, 8), (24, 4), (25, 3), (26, 3)] {
        assert_eq!(apply(), version);
        assert_eq!(versions_kept(&store).len(), left, "after version {version}");
    }
    assert_eq!(versions_kept(&store), [24, 25, 26]);
}

/// Versions stored before they said which was last applied from a file:
/// the next version made looks for it in the history once, so pruning
/// keeps it; an account never applied from a file says so (0).
#[test]
fn versions_stored_before_they_named_the_last_from_a_file_keep_it() {
    let raw = Store::temporary().unwrap();
    let store = ChainStore::open(raw.clone()).unwrap().keeping(3);
    let v1 = apply_from_file(&store);
    // As an older build stored it.
    let mut legacy = serde_json::to_value(&v1).unwrap();
    legacy.as_object_mut().unwrap().remove("from_file");
    let legacy = serde_json::to_vec(&legacy).unwrap();
    let version_key = switchboard_store::key(&[b"acme", &1u64.to_be_bytes()]);
    raw.put(Collection::ChainVersions, &version_key, &legacy)
        .unwrap();
    raw.put(Collection::Chains, b"acme", &legacy).unwrap();
    assert_eq!(store.current(&acme()).unwrap().unwrap().from_file, None);
    assert_eq!(store.last_from_file(&acme()).unwrap().unwrap().version, 1);
    for _ in 2..=6 {
        let v = store.apply(check(MATCH_FILE).unwrap()).unwrap();
        assert_eq!(v.from_file, Some(1));
    }
    assert_eq!(versions_kept(&store), [1, 4, 5, 6]);
    assert_eq!(store.last_from_file(&acme()).unwrap().unwrap().version, 1);

    let other = AccountKey::new("other").unwrap();
    let file =
        parse("account_key = \"other\"\n[[chains]]\nname = \"x\"\nsteps = [{ handler = \"log\" }]");
    let v = store
        .apply(validate(file, &other, &TestCatalog).unwrap())
        .unwrap();
    assert_eq!(v.from_file, Some(0));
    assert!(store.last_from_file(&other).unwrap().is_none());
}

#[test]
fn store_reloads_and_keeps_accounts_apart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ChainStore::open(Store::open(dir.path()).unwrap()).unwrap();
        store.apply(check(MATCH_FILE).unwrap()).unwrap();
        let other = AccountKey::new("other").unwrap();
        let file = parse(
            "account_key = \"other\"\n[[chains]]\nname = \"x\"\nsteps = [{ handler = \"log\" }]",
        );
        store
            .apply(validate(file, &other, &TestCatalog).unwrap())
            .unwrap();
    }
    let store = ChainStore::open(Store::open(dir.path()).unwrap()).unwrap();
    assert_eq!(store.accounts().len(), 2);
    assert_eq!(store.lookup(&acme()).unwrap().chains().len(), 5);
    let other = store.lookup(&AccountKey::new("other").unwrap()).unwrap();
    assert_eq!(other.chains()[0].name, "x");
    assert!(store.lookup(&AccountKey::new("nobody").unwrap()).is_none());
}

#[test]
fn candidates_and_default_are_separate_so_conditions_can_filter_between() {
    let file = parse(
        r#"
account_key = "acme"

[[chains]]
name = "high"
event_type = "poll_complete"
when = 'event.event_data.score >= 3'
steps = [{ handler = "log" }]

[[chains]]
name = "default"
steps = [{ handler = "log" }]
"#,
    );
    let chains = AccountChains::new(1, file);
    assert!(chains.has_conditions());
    let e = event("survey", "poll_complete", "p");
    let names: Vec<&str> = chains
        .candidates(&e)
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["high"]);
    assert_eq!(
        chains.default_for(&e).map(|c| c.name.as_str()),
        Some("default")
    );
    let other = event("survey", "started", "p");
    assert!(chains.candidates(&other).is_empty());
    assert_eq!(chains.route(&other), Routing::Default(&chains.chains()[1]));
}

/// Step configs with the same options, in any account's chains, hold one
/// text between them; a config still held keeps its text through the
/// sweeps that let go of the others.
#[test]
fn equal_step_configs_are_held_once() {
    let file = |account: &str, message: &str| {
        parse(&format!(
            r#"
account_key = "{account}"
[[chains]]
name = "poll"
event_type = "poll_complete"
[[chains.steps]]
handler = "log"
config = {{ level = "info", message = "{message}" }}
"#
        ))
    };
    let text = |f: &ChainFile| f.chains[0].steps[0].config.as_json().as_ptr();
    let (a, b) = (file("acme", "done"), file("globex", "done"));
    assert_eq!(a.chains[0].steps[0].config, b.chains[0].steps[0].config);
    assert_eq!(text(&a), text(&b), "one text for both");
    let other = file("acme", "something else");
    assert_ne!(text(&a), text(&other));

    // Enough texts come and go to sweep the set more than once.
    for i in 0..5_000 {
        let map = serde_json::json!({ "n": i });
        let config = StepConfig::from(map.as_object().unwrap().clone());
        drop(config);
    }
    assert_eq!(text(&file("initech", "done")), text(&a), "still held once");
}

/// A version's chains still await the event types an earlier version's
/// did (runs paused under it may wait for them), across a reopen of the
/// store; the types the current chains await are theirs, not carried.
#[test]
fn versions_carry_forward_what_earlier_ones_awaited() {
    let dir = tempfile::tempdir().unwrap();
    let file = |cancel_on: &str| {
        check(&format!(
            "account_key = \"acme\"\n[[chains]]\nname = \"remind\"\nevent_type = \"signed_up\"\n\
             {cancel_on}\nsteps = [{{ handler = \"log\" }}]"
        ))
        .unwrap()
    };
    {
        let store = ChainStore::open(Store::open(dir.path()).unwrap()).unwrap();
        let v1 = store
            .apply(file("cancel_on = { event_type = \"stop\" }"))
            .unwrap();
        assert!(v1.awaited_before.is_empty());
        let v2 = store.apply(file("")).unwrap();
        assert_eq!(v2.awaited_before, ["stop"]);
        let v3 = store
            .apply(file("cancel_on = { event_type = \"halt\" }"))
            .unwrap();
        assert_eq!(v3.awaited_before, ["stop"]);
        let v4 = store
            .apply(file("cancel_on = { event_type = \"stop\" }"))
            .unwrap();
        assert_eq!(v4.awaited_before, ["halt"]);
    }
    let store = ChainStore::open(Store::open(dir.path()).unwrap()).unwrap();
    let chains = store.lookup(&acme()).unwrap();
    assert!(chains.awaits("stop") && chains.awaits("halt"));
    assert!(!chains.awaits("signed_up"));
}

/// A TOML file can nest a step's options deeper (a dotted key at a time)
/// than their JSON text can be read back: such a file is refused when it
/// is read, naming the depth, and one within the limit is taken.
#[test]
fn options_nested_deeper_than_their_text_can_be_read_back_are_refused() {
    let dotted = |prefix: &str, n: usize| {
        (1..=n)
            .map(|i| format!("{prefix}{i}"))
            .collect::<Vec<_>>()
            .join(".")
    };
    let file = |outer: usize, inner: usize| {
        format!(
            "account_key = \"acme\"\n[[chains]]\nname = \"deep\"\nevent_type = \"e\"\n\
             [[chains.steps]]\nhandler = \"log\"\n[chains.steps.config]\n{} = {{ {} = 1 }}\n",
            dotted("a", outer),
            dotted("b", inner)
        )
    };
    let err = parse_chain_file(&file(70, 70), Format::Toml, "deep.toml").unwrap_err();
    assert!(
        err.message
            .contains("the options nest 140 levels deep; at most 64"),
        "{err}"
    );
    let taken = parse(&file(30, 30));
    let config = taken.chains[0].steps[0].config.to_map();
    assert!(config.contains_key("a1"), "{config:?}");
}
