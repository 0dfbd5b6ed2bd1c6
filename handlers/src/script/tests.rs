use std::sync::Arc;
use std::time::Duration;

use rhai::Dynamic;
use serde_json::{Value, json};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

use super::*;
use crate::records::test_util::{MemoryContacts, MemorySources};
use crate::records::{ContactUpsert, Contacts};

fn event(account: &str, data: Value) -> VumiApiEvent {
    VumiApiEvent::new(
        AccountKey::new(account).unwrap(),
        ConversationKey::new("poll-2026").unwrap(),
        ConversationType::new("survey").unwrap(),
        EventType::new("poll_complete").unwrap(),
        data.as_object().unwrap().clone(),
    )
}

/// Thandi, a contact of acme, and Hank, of globex.
fn two_accounts() -> MemoryContacts {
    let contacts = MemoryContacts::default();
    for (account, msisdn, name, language) in [
        ("acme", "+27820000001", "Thandi", "zu"),
        ("globex", "+27820000002", "Hank", "en"),
    ] {
        let upsert = ContactUpsert {
            msisdn: Some(msisdn.into()),
            name: Some(name.into()),
            language: Some(language.into()),
            ..ContactUpsert::default()
        };
        contacts
            .upsert(&AccountKey::new(account).unwrap(), upsert)
            .unwrap();
    }
    contacts
}

fn runtime_with(limits: RhaiLimits) -> ScriptRuntime {
    ScriptRuntime::new(limits, Some(Arc::new(two_accounts())))
}

fn call_in(rt: &ScriptRuntime, account: &str, source: &str, data: Value) -> ScriptRun {
    let ast = rt.compile_script(source).unwrap_or_else(|e| panic!("{e}"));
    let event = event(account, data);
    rt.call_handle(
        ScriptLabel {
            name: "t",
            version: 3,
        },
        &ast,
        &event.account_key,
        (&event.conversation_type, &event.conversation_key),
        ScriptRuntime::to_dynamic(&event),
        ScriptRuntime::to_dynamic(&json!({"earlier": {"n": 2}})),
        ScriptRuntime::to_dynamic(&json!({"bonus": 5})),
    )
}

fn call(source: &str) -> ScriptRun {
    call_in(
        &runtime_with(RhaiLimits::default()),
        "acme",
        source,
        json!({"score": 4, "msisdn": "+27820000001"}),
    )
}

/// Runs `body` as the body of `handle` and compares its output as JSON.
fn check_output(body: &str, expected: Value) {
    let run = call(&format!("fn handle(event, steps, config) {{\n{body}\n}}"));
    let output = run.result.unwrap_or_else(|e| panic!("{body}: {e}"));
    assert_eq!(Value::Object(output.data), expected, "{body}");
}

/// Runs a whole script and checks that its step fails permanently with an
/// error containing `expected`.
fn check_fails(source: &str, expected: &str) {
    check_fails_with(RhaiLimits::default(), source, expected)
}

fn check_fails_with(limits: RhaiLimits, source: &str, expected: &str) {
    let rt = runtime_with(limits);
    let run = call_in(&rt, "acme", source, json!({"score": 4}));
    match run.result {
        Ok(out) => panic!("{source}\n=> succeeded with {out:?}, expected {expected}"),
        Err(e) => {
            assert!(!e.is_retryable(), "{source}: {e}");
            assert!(
                e.to_string().contains(expected),
                "{source}\n=> {e}\nexpected to contain: {expected}"
            );
        }
    }
}

/// Checks that `source` is refused when stored (`scripts put`).
fn check_compile_error(source: &str, expected: &str) {
    let err = ScriptRuntime::default().check_script(source).unwrap_err();
    assert!(
        err.to_string().contains(expected),
        "{source}\n=> {err}\nexpected to contain: {expected}"
    );
}

#[test]
fn handle_sees_event_steps_and_config() {
    check_output(
        "#{ points: event.event_data.score * 10 + config.bonus, earlier: steps.earlier.n, ct: event.conversation_type }",
        json!({"points": 45, "earlier": 2, "ct": "survey"}),
    );
    check_output("()", json!({}));
    check_output(
        "let m = parse_json(`{\"a\": [1, 2]}`); #{ a: m.a.len(), j: to_json(#{ x: 1 }) }",
        json!({"a": 2, "j": "{\"x\":1}"}),
    );
    check_output(
        "#{ now_is_a_time: now().len() > 19 }",
        json!({"now_is_a_time": true}),
    );
}

#[test]
fn emit_log_stop_retry_and_throw() {
    let run = call(
        r#"fn handle(event, steps, config) {
            log("info", "scoring " + event.event_data.msisdn);
            print("printed");
            emit("points_awarded", #{ points: 40 });
            emit("loyalty", "wallet-1", "airtime_due", #{ amount: 5 });
            #{ done: true }
        }"#,
    );
    let out = run.result.unwrap();
    assert_eq!(out.emit.len(), 2);
    assert_eq!(out.emit[0].event_type.as_str(), "points_awarded");
    assert_eq!(out.emit[0].conversation_type.as_str(), "survey");
    assert_eq!(out.emit[1].conversation_key.as_str(), "wallet-1");
    assert_eq!(
        Value::Object(out.emit[1].event_data.clone()),
        json!({"amount": 5})
    );
    let messages: Vec<_> = run
        .logs
        .iter()
        .map(|l| (l.level.as_str(), l.message.as_str()))
        .collect();
    assert_eq!(
        messages,
        [("info", "scoring +27820000001"), ("info", "printed")]
    );
    assert!(run.operations > 0);

    let stopped =
        call("fn handle(e, s, c) { emit(\"x\", #{}); try { stop(); } catch { } #{ never: 1 } }")
            .result
            .unwrap();
    assert!(stopped.stop);
    assert_eq!(stopped.emit.len(), 1, "emits before stop() are kept");

    let retry = call("fn handle(e, s, c) { retry(\"2s\", \"gateway busy\") }")
        .result
        .unwrap_err();
    assert_eq!(
        retry,
        StepError::retryable("script t v3: gateway busy", Some(Duration::from_secs(2)))
    );
    let retry = call("fn handle(e, s, c) { retry(5) }").result.unwrap_err();
    assert!(
        matches!(retry, StepError::Retryable { after: Some(d), .. } if d == Duration::from_secs(5))
    );

    check_fails(
        "fn handle(e, s, c) {\n  throw \"no msisdn\";\n}",
        "script t v3, line 2: no msisdn",
    );
    check_fails(
        "fn handle(e, s, c) { emit(\"bad.type\", #{}) }",
        "emit: invalid event_type \"bad.type\"",
    );
    check_fails(
        "fn handle(e, s, c) { log(\"loud\", \"x\") }",
        "log: \"loud\" is not a level",
    );
    check_fails(
        "fn handle(e, s, c) { 42 }",
        "handle must return an object map",
    );
    // A map nested deeper than an event's data may: its record could not
    // be read back.
    let nesting = |levels: usize| {
        format!(
            "fn handle(e, s, c) {{ let m = #{{}}; for i in 1..{levels} {{ m = #{{a: m}}; }} m }}"
        )
    };
    assert!(call(&nesting(64)).result.is_ok());
    check_fails(
        &nesting(65),
        "nests maps and arrays more than 64 levels deep",
    );
}

/// Limits that let a size bomb reach its size limit first (each push checks
/// the size, so a bomb is slow in a loaded debug build).
fn roomy() -> RhaiLimits {
    RhaiLimits {
        max_operations: 10_000_000,
        timeout: Duration::from_secs(20),
        ..RhaiLimits::default()
    }
}

#[test]
fn hostile_scripts_fail_their_step_with_the_limit_named() {
    let fast = RhaiLimits {
        max_operations: u64::MAX,
        timeout: Duration::from_millis(50),
        ..RhaiLimits::default()
    };
    check_fails_with(
        fast,
        "fn handle(e, s, c) {\n  loop { }\n}",
        "script t v3: ran out of time (limit 50ms; `[rhai] timeout`); its loop is at line 2",
    );
    check_fails(
        "fn handle(e, s, c) {\n  let i = 0;\n  while true { i += 1; }\n}",
        "script t v3: too many operations (limit 100000; raise `[rhai] max_operations` if the script needs more); its loop is at line 3",
    );
    check_fails(
        "fn f(x) { f(x + 1) }\nfn handle(e, s, c) { f(0) }",
        "script t v3: function calls nested too deeply (limit 32 levels; `[rhai] max_call_levels`)",
    );
    check_fails(
        "fn handle(e, s, c) {\n  let s = \"x\";\n  loop { s += s; }\n}",
        "script t v3: string too large (limit 65536 bytes; `[rhai] max_string_size`)",
    );
    check_fails_with(
        roomy(),
        "fn handle(e, s, c) {\n  let a = [];\n  loop { a.push(1); }\n}",
        "script t v3: array too large (limit 10000 items; `[rhai] max_array_size`)",
    );
    // Rhai itself does not check max_map_size when `m[new_key] = v` adds
    // an entry; the runtime measures variables as they are read.
    check_fails_with(
        roomy(),
        "fn handle(e, s, c) {\n  let m = #{};\n  let i = 0;\n  loop { m[`k${i}`] = i; i += 1; }\n}",
        "script t v3: object map too large (limit 10000 entries; `[rhai] max_map_size`)",
    );
    // Also one whose keys come from the map itself, one inside another,
    // and one that only a closure holds.
    check_fails_with(
        roomy(),
        "fn handle(e, s, c) {\n  let m = #{};\n  loop { m[`${m.len()}`] = 1; }\n}",
        "object map too large (limit 10000 entries; `[rhai] max_map_size`)",
    );
    check_fails_with(
        roomy(),
        "fn handle(e, s, c) {\n  let o = #{ m: #{} };\n  let i = 0;\n  loop { o.m[`k${i}`] = i; i += 1; }\n}",
        "object map too large (limit 10000 entries; `[rhai] max_map_size`)",
    );
    check_fails_with(
        roomy(),
        "fn handle(e, s, c) {\n  let m = #{};\n  let add = |k| m[k] = 1;\n  let i = 0;\n  loop { add.call(`k${i}`); i += 1; }\n}",
        "object map too large (limit 10000 entries; `[rhai] max_map_size`)",
    );
    check_fails(
        "fn handle(e, s, c) {\n  open_file(\"/etc/passwd\")\n}",
        "script t v3, line 2: unknown function open_file",
    );
    check_fails(
        "fn handle(e, s, c) { system(\"rm -rf /\") }",
        "unknown function system",
    );
    check_fails(
        "fn handle(e, s, c) { call(Fn(\"eval\"), \"1\") }",
        "script t v3",
    );
    let few_variables = RhaiLimits {
        max_variables: 4,
        ..RhaiLimits::default()
    };
    check_fails_with(
        few_variables,
        "fn handle(e, s, c) { let a = 1; let b = 2; let d = 3; let f = 4; let g = 5; }",
        "too many variables (limit 4; `[rhai] max_variables`)",
    );
}

#[test]
fn forbidden_and_broken_scripts_do_not_compile() {
    check_compile_error(
        "fn handle(e, s, c) { eval(\"40 + 2\") }",
        "line 1, column 22: `eval` is not available to scripts",
    );
    check_compile_error(
        "import \"fs\" as fs;\nfn handle(e, s, c) { }",
        "line 1, column 1: `import` is not available",
    );
    check_compile_error("fn handle(e, s, c) {\n  let x = ;\n}", "line 2, column 11:");
    check_compile_error(
        "fn handler(e) { }",
        "defines no `fn handle(event, steps, config)`",
    );
    let deep = format!(
        "fn handle(e, s, c) {{ {}1{} }}",
        "(".repeat(100),
        ")".repeat(100)
    );
    check_compile_error(&deep, "expressions nested too deeply");
}

#[test]
fn contact_reads_only_the_callers_account() {
    let rt = runtime_with(RhaiLimits::default());
    let source = "fn handle(e, s, c) { #{ mine: contact(\"+27820000001\"), theirs: contact(\"+27820000002\") } }";
    let seen = |account| {
        let out = call_in(&rt, account, source, json!({})).result.unwrap();
        ["mine", "theirs"].map(|who| match &out.data[who] {
            Value::Null => None,
            contact => Some((contact["name"].clone(), contact["language"].clone())),
        })
    };
    assert_eq!(seen("acme"), [Some((json!("Thandi"), json!("zu"))), None]);
    assert_eq!(seen("globex"), [None, Some((json!("Hank"), json!("en")))]);
    // A script sees the contact's fields, not its account.
    let out = call_in(&rt, "acme", source, json!({})).result.unwrap();
    assert_eq!(out.data["mine"]["msisdn"], json!("+27820000001"));
    assert!(out.data["mine"].get("account_key").is_none());
    // Without contacts, nobody is found.
    let bare = ScriptRuntime::default();
    let none = call_in(&bare, "acme", source, json!({})).result.unwrap();
    assert_eq!(
        Value::Object(none.data),
        json!({"mine": null, "theirs": null})
    );
}

fn check_condition(expr: &str, data: Value, expected: Result<bool, &str>) {
    let rt = ScriptRuntime::default();
    let ast = rt
        .compile_condition(expr)
        .unwrap_or_else(|e| panic!("{expr}: {e}"));
    let value = ScriptRuntime::to_dynamic(&event("acme", data));
    let got = rt.eval_condition(&ast, &value);
    match expected {
        Ok(b) => assert_eq!(got, Ok(b), "{expr}"),
        Err(part) => {
            let e = got.expect_err(expr);
            assert!(
                e.contains(part),
                "{expr}\n=> {e}\nexpected to contain: {part}"
            );
        }
    }
}

#[test]
fn when_conditions() {
    check_condition("event.event_data.score >= 3", json!({"score": 4}), Ok(true));
    check_condition(
        "event.event_data.score >= 3",
        json!({"score": 2}),
        Ok(false),
    );
    check_condition(
        "event.conversation_type == \"survey\" && \"msisdn\" in event.event_data",
        json!({"msisdn": "+1"}),
        Ok(true),
    );
    check_condition(
        "event.event_data.score + 1",
        json!({"score": 2}),
        Err("must give true or false"),
    );
    check_condition("event.event_data.score > 3", json!({}), Ok(false));
    check_condition(
        "event.event_data.score * 2 > 3",
        json!({}),
        Err(
            "line 1: `event.event_data.score` is missing or null, and * ((), i64) cannot use the `()` it reads as",
        ),
    );
    check_condition(
        "emit(\"x\", #{}) == ()",
        json!({}),
        Err("only available in fn handle"),
    );
    let rt = ScriptRuntime::default();
    assert!(
        rt.compile_condition("event.x >")
            .unwrap_err()
            .to_string()
            .starts_with("line 1, column")
    );
    assert!(rt.compile_condition("eval(\"true\")").is_err());
}

#[test]
fn store_versions_scripts_and_the_next_call_uses_the_new_ast() {
    let store = ScriptStore::scripts(
        Arc::new(MemorySources::default()),
        Arc::new(ScriptRuntime::default()),
    );
    let acme = AccountKey::new("acme").unwrap();
    let v1 = store
        .put(&acme, "award", "fn handle(e, s, c) { #{ v: 1 } }")
        .unwrap();
    assert_eq!(v1.version, 1);
    let first = store.compiled(&acme, "award").unwrap().unwrap();
    assert_eq!(first.version, 1);

    let err = store
        .put(&acme, "award", "fn handle(e, s, c) {\n  #{ v: 2 \n}")
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("script \"award\" of account acme does not compile: line 3"),
        "{err}"
    );
    assert_eq!(store.current(&acme, "award").unwrap().unwrap().version, 1);

    store
        .put(&acme, "award", "fn handle(e, s, c) { #{ v: 2 } }")
        .unwrap();
    let second = store.compiled(&acme, "award").unwrap().unwrap();
    assert_eq!(second.version, 2);
    let rt = store.runtime();
    let e = event("acme", json!({}));
    let out = rt
        .call_handle(
            ScriptLabel {
                name: "award",
                version: second.version,
            },
            &second.compiled,
            &acme,
            (&e.conversation_type, &e.conversation_key),
            ScriptRuntime::to_dynamic(&e),
            Dynamic::UNIT,
            Dynamic::UNIT,
        )
        .result
        .unwrap();
    assert_eq!(Value::Object(out.data), json!({"v": 2}));

    assert_eq!(
        store
            .history(&acme, "award")
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(store.list(&acme).unwrap().len(), 1);
    assert!(
        store
            .list(&AccountKey::new("globex").unwrap())
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.put(&acme, "bad-name", "fn handle(e, s, c) {}"),
        Err(ScriptStoreError::InvalidName { .. })
    ));

    store.remove(&acme, "award").unwrap();
    assert!(store.compiled(&acme, "award").unwrap().is_none());
    assert_eq!(
        store
            .put(&acme, "award", "fn handle(e, s, c) { }")
            .unwrap()
            .version,
        3,
        "numbering continues after a remove"
    );
}

/// Runs an example script against its sample event with `config`.
fn run_example(source: &str, sample: &str, config: Value) -> ScriptRun {
    let rt = runtime_with(RhaiLimits::default());
    let ast = rt.compile_script(source).unwrap_or_else(|e| panic!("{e}"));
    let event = VumiApiEvent::decode_with_defaults(sample.as_bytes(), 1 << 20).unwrap();
    rt.call_handle(
        ScriptLabel {
            name: "example",
            version: 1,
        },
        &ast,
        &event.account_key,
        (&event.conversation_type, &event.conversation_key),
        ScriptRuntime::to_dynamic(&event),
        ScriptRuntime::to_dynamic(&json!({})),
        ScriptRuntime::to_dynamic(&config),
    )
}

#[test]
fn example_award_points_scores_and_emits_airtime() {
    let run = run_example(
        include_str!("../../../examples/scripts/award_points.rhai"),
        include_str!("../../../examples/scripts/award_points.event.json"),
        json!({"points_per_answer": 10}),
    );
    let out = run.result.unwrap();
    assert_eq!(
        Value::Object(out.data),
        json!({"score": 2, "of": 3, "points": 20})
    );
    assert_eq!(out.emit.len(), 1);
    assert_eq!(out.emit[0].event_type.as_str(), "airtime_award");
    assert_eq!(out.emit[0].conversation_type.as_str(), "loyalty");
    assert_eq!(
        Value::Object(out.emit[0].event_data.clone()),
        json!({"msisdn": "+27820000001", "points": 20})
    );
    assert_eq!(run.logs[0].message, "+27820000001 scored 2/3: 20 points");
}

#[test]
fn example_route_by_language_prefers_the_contact() {
    let source = include_str!("../../../examples/scripts/route_by_language.rhai");
    let sample = include_str!("../../../examples/scripts/route_by_language.event.json");
    // The sample's MSISDN is not a contact: the event's language is used.
    let out = run_example(source, sample, json!({})).result.unwrap();
    assert_eq!(
        Value::Object(out.data),
        json!({"language": "zu", "source": "event", "template": "welcome_zu"})
    );
    // A known contact's language wins over the event's.
    let known = sample
        .replace("+27820000003", "+27820000001")
        .replace("\"zu\"", "\"xh\"");
    let out = run_example(source, &known, json!({})).result.unwrap();
    assert_eq!(out.data["source"], json!("contact"));
    assert_eq!(out.data["language"], json!("zu"));
    // An unsupported language falls back to the default.
    let out = run_example(
        source,
        sample,
        json!({"supported": ["en"], "fallback": "en"}),
    );
    assert_eq!(out.result.unwrap().data["template"], json!("welcome_en"));
    assert_eq!(out.logs[0].level, "warn");
}

#[test]
fn example_dedupe_answers_keeps_the_last_answer_per_key() {
    let source = include_str!("../../../examples/scripts/dedupe_answers.rhai");
    let sample = include_str!("../../../examples/scripts/dedupe_answers.event.json");
    let out = run_example(source, sample, json!({})).result.unwrap();
    assert_eq!(
        Value::Object(out.data),
        json!({
            "answers": [
                {"question_id": "q1", "answer": "c"},
                {"question_id": "q2", "answer": "a"}
            ],
            "duplicates": 1
        })
    );
    let empty = run_example(
        source,
        &sample.replace("\"answers\": [", "\"other\": ["),
        json!({}),
    );
    assert!(empty.result.unwrap().stop);
}

#[test]
fn a_shared_event_serves_conditions_and_scripts_get_a_private_copy() {
    let rt = ScriptRuntime::default();
    let shared = ScriptRuntime::to_dynamic(&event("acme", json!({"score": 4}))).into_shared();
    let ast = rt.compile_condition("event.event_data.score >= 3").unwrap();
    assert_eq!(rt.eval_condition(&ast, &shared), Ok(true));
    let script = rt
        .compile_script("fn handle(event, s, c) { event.event_data.score = 0; #{} }")
        .unwrap();
    let e = event("acme", json!({}));
    rt.call_handle(
        ScriptLabel {
            name: "t",
            version: 1,
        },
        &script,
        &e.account_key,
        (&e.conversation_type, &e.conversation_key),
        shared.flatten_clone(),
        Dynamic::UNIT,
        Dynamic::UNIT,
    )
    .result
    .unwrap();
    assert_eq!(
        rt.eval_condition(&ast, &shared),
        Ok(true),
        "the script changed only its copy"
    );
}

/// The mistakes a new script author makes, each with the message that says
/// where and what to do.
#[test]
fn first_mistakes_are_named_with_the_line_and_the_fix() {
    // A missing field reads as `()`; arithmetic on it says so.
    check_fails(
        "fn handle(event, steps, config) {\n  let p = event.event_data.percent * 100;\n  #{ p: p }\n}",
        "script t v3, line 2: `event.event_data.percent` is missing or null, and * ((), i64) cannot use the `()` it reads as: give a default with `event.event_data.percent ?? value`, test for it with `\"percent\" in event.event_data`",
    );
    // The same as the function's last expression (a statement to Rhai), and
    // read with an index.
    check_fails(
        "fn handle(event, steps, config) {\n  let x = 1;\n  event.event_data.percent * 100\n}",
        "script t v3, line 3: `event.event_data.percent` is missing or null",
    );
    check_fails(
        "fn handle(event, steps, config) {\n  #{ p: event.event_data[\"percent\"] * 100 }\n}",
        "script t v3, line 2: `event.event_data[\"percent\"]` is missing or null, and * ((), i64) cannot use the `()` it reads as: give a default with `event.event_data[\"percent\"] ?? value`, test for it with `\"percent\" in event.event_data`",
    );
    // An operand that is not a field read still says what `()` means.
    check_fails(
        "fn handle(event, steps, config) {\n  let p = event.event_data.percent;\n  #{ p: p * 100 }\n}",
        "script t v3, line 3: * ((), i64): an operand is `()`, which is what reading a field the map does not have gives; test for it first with `\"field\" in map`",
    );
    // The hint's default works.
    check_output(
        "#{ p: (event.event_data.percent ?? 0) * 100, has: \"percent\" in event.event_data }",
        json!({"p": 0, "has": false}),
    );
    // With strict fields, the typo is named where it is read.
    check_fails_with(
        RhaiLimits {
            strict_fields: true,
            ..RhaiLimits::default()
        },
        "fn handle(event, steps, config) {\n  let name = event.event_data.nmae;\n  #{ name: name }\n}",
        "script t v3, line 2: `event.event_data.nmae` is missing (`[rhai] strict_fields` is on): test for it first with `\"nmae\" in event.event_data`",
    );
    // A name that is not defined is refused when the script is stored,
    // with its line and column.
    check_compile_error(
        "fn handle(event, steps, config) {\n  #{ id: evnt.id }\n}",
        "line 2, column 10: `evnt` is not defined here",
    );
    // ...while a version stored before the check still compiles, and runs
    // as it did (the undefined name is never reached here).
    ScriptRuntime::default()
        .compile_script("fn handle(event, steps, config) {\n  if false { evnt.id }\n}")
        .expect("a stored version compiles without the check");
    // A condition may use `event` whole, and only `event`.
    let rt = ScriptRuntime::default();
    rt.check_condition("\"email\" in event.event_data && event != ()")
        .expect("a condition over event");
    let err = rt.check_condition("evnt.event_type == \"x\"").unwrap_err();
    assert!(
        err.to_string().contains("`evnt` is not defined here"),
        "{err}"
    );
    // So is a top-level constant read inside handle.
    check_compile_error(
        "const BONUS = 5;\nfn handle(event, steps, config) {\n  #{ b: BONUS }\n}",
        "line 3, column 9: `BONUS` is not defined here: `fn handle` sees its parameters (event, steps, config) and what it declares itself; a top-level `let` or `const` is not visible inside a function",
    );
    // One of our functions with the wrong number of arguments says how to
    // call it.
    check_fails(
        "fn handle(event, steps, config) {\n  log(\"info\", \"a\", \"b\");\n}",
        "script t v3, line 2: log was given 3 argument(s); call it as log(level, message) or log(message)",
    );
    // A version stored before the call check still names an unknown
    // function when it runs.
    check_fails(
        "fn handle(event, steps, config) {\n  sendd(1)\n}",
        "script t v3, line 2: unknown function sendd (i64): scripts may call emit, log",
    );
    // A call to a function nobody defines is refused when the script is
    // stored, with the nearest name.
    check_compile_error(
        "fn handle(event, steps, config) {\n  let s = to_jsn(event);\n  #{ s: s }\n}",
        "line 2, column 11: no function `to_jsn` is defined (did you mean `to_json`?); scripts may call emit, log",
    );
    check_compile_error(
        "fn handle(event, steps, config) {\n  if false { sendd(1) }\n}",
        "line 2, column 14: no function `sendd` is defined; scripts may call",
    );
    // A variable is not called like a function.
    check_compile_error(
        "fn handle(event, steps, config) {\n  let f = |x| x + 1;\n  #{ n: f(2) }\n}",
        "line 3, column 9: `f` is a variable, not a function: if it holds a function pointer (`Fn(...)`, a closure), call it as `f.call(...)`",
    );
    // A condition's calls are checked too.
    let err = ScriptRuntime::default()
        .check_condition("sizee(event.event_data) > 1")
        .unwrap_err();
    assert!(
        err.to_string().contains("no function `sizee` is defined"),
        "{err}"
    );
    // A missing `;` before a comment is placed before the comment.
    check_compile_error(
        "fn handle(event, steps, config) {\n  let a = 1   // the count\n  // then b\n  let b = 2;\n  #{ a: a, b: b }\n}",
        "line 2, column 12: missing `;` at the end of this line",
    );
    // A missing `;` is reported where it is missing, not at the next line.
    check_compile_error(
        "fn handle(event, steps, config) {\n  let a = 1\n\n  let b = 2;\n  #{ a: a, b: b }\n}",
        "line 2, column 12: missing `;` at the end of this line",
    );
    // (On one line, Rhai's own position is right.)
    check_compile_error(
        "fn handle(event, steps, config) {\n  let a = 1 let b = 2;\n  #{ a: a, b: b }\n}",
        "line 2, column 13: Expecting ';' to terminate this statement",
    );
    // ...and one of the script's own functions with the wrong number of
    // arguments.
    check_compile_error(
        "fn bonus(score, factor) { score * factor }\nfn handle(event, steps, config) {\n  #{ b: bonus(4) }\n}",
        "line 3, column 9: `bonus` is called with 1 argument(s), but the script defines it with 2",
    );
}

/// What the call check must not refuse: Rhai's built-ins and keyword
/// functions, ours, the script's own (at any of its arities), methods, and
/// calls through a variable holding a function pointer.
#[test]
fn the_call_check_accepts_what_runs() {
    let source = r#"
fn bonus(score) { bonus(score, 2) }
fn bonus(score, factor) { score * factor }
fn handle(event, steps, config) {
    let f = Fn("bonus");
    let doubled = f.call(2);
    let add = |x| x + 1;
    let three = add.call(2);
    let words = "a b c".split(" ");
    let n = parse_int("4") + words.len() + abs(-1) + max(1, 2) + three;
    let kinds = [type_of(n), to_string(n)];
    for (k, i) in kinds { log("debug", `${i}: ${k}`); }
    print("printed");
    debug("debugged");
    if is_def_fn("bonus", 1) && !is_def_var("nothing") {
        log(to_json(#{ n: n, t: timestamp().elapsed >= 0.0, now: now() }));
    }
    let parsed = parse_json(`{"a": 1}`);
    let c = curry(f, 3);
    #{ n: n, b: bonus(n), d: doubled, c: c.call(), a: parsed.a, r: range(0, 3).contains(1) }
}
"#;
    ScriptRuntime::default()
        .check_script(source)
        .unwrap_or_else(|e| panic!("{e}"));
    let run = call(source);
    let output = run.result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(output.data["n"], json!(13));
    assert_eq!(output.data["b"], json!(26));
    assert_eq!(output.data["c"], json!(6));
}
