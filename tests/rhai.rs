//! Rhai scripts and `when` conditions, end to end: the binary on the embedded
//! bus, driven over its HTTP API and CLI.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::util;

/// The dispatcher of `util` (a process on the embedded bus, killed on drop),
/// with the calls these tests make: raw HTTP answers, to check refusals, and
/// the CLI's exit status and output.
struct Dispatcher(util::Dispatcher);

impl Dispatcher {
    fn start() -> Self {
        Self(util::Dispatcher::embedded())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value) {
        self.0
            .request(method, path, Some(self.0.admin_token()), body)
            .await
    }

    async fn put_script(&self, account: &str, name: &str, source: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/accounts/{account}/scripts/{name}"),
            Some(source.to_string()),
        )
        .await
    }

    async fn apply(&self, account: &str, chains: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/accounts/{account}/chains"),
            Some(chains.to_string()),
        )
        .await
    }

    /// Posts an event; returns its id.
    async fn emit(&self, event: Value) -> String {
        self.0.post_event(&event).await
    }

    /// The finished trace of an event.
    async fn trace(&self, account: &str, id: &str) -> Value {
        self.0.wait_for_trace(account, id, util::TIMEOUT).await
    }

    /// Runs the CLI against this dispatcher: success, stdout, stderr.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .env("SWITCHBOARD_TOKEN", self.0.admin_token())
            .args(args)
            .args(["--server", self.0.url()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn event(account: &str, event_type: &str, data: Value) -> Value {
    json!({
        "account_key": account,
        "conversation_key": "poll-2026",
        "conversation_type": "survey",
        "event_type": event_type,
        "event_data": data,
    })
}

fn step<'a>(trace: &'a Value, chain: &str, step: &str) -> &'a Value {
    trace["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == chain)
        .and_then(|c| {
            c["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == step)
        })
        .unwrap_or_else(|| panic!("no step {chain}/{step} in {trace}"))
}

const AWARD: &str = r#"
fn handle(event, steps, config) {
    let points = event.event_data.score * config.per_point;
    log("info", `awarding ${points}`);
    emit("points_awarded", #{ msisdn: event.event_data.msisdn, points: points });
    #{ points: points }
}
"#;

#[tokio::test]
async fn script_output_feeds_a_later_template_and_its_emit_is_a_linked_child() {
    let d = Dispatcher::start();
    assert_eq!(d.put_script("acme", "award", AWARD).await.0, 200);
    let (status, answer) = d
        .apply(
            "acme",
            r#"
account_key = "acme"

[[chains]]
name = "score"
event_type = "poll_complete"
when = 'event.event_data.score >= 3'
steps = [
  { handler = "script:award", config = { per_point = 10 } },
  { handler = "emit", name = "bonus", config = { event_type = "bonus", data = { got = "{{ steps.award.points }}" } } },
]

[[chains]]
name = "strict"
event_type = "strict_check"
when = 'event.event_data.score * 2 > 3'
steps = [{ handler = "log" }]

[[chains]]
name = "default"
steps = [{ handler = "log" }]
"#,
        )
        .await;
    assert_eq!(status, 200, "{answer}");

    let id = d
        .emit(event(
            "acme",
            "poll_complete",
            json!({"msisdn": "+27820000001", "score": 4}),
        ))
        .await;
    let trace = d.trace("acme", &id).await;
    assert_eq!(trace["status"], "done", "{trace}");
    let award = step(&trace, "score", "award");
    assert_eq!(award["output"], json!({"points": 40}));
    assert_eq!(
        award["logs"],
        json!([{"level": "info", "message": "awarding 40"}])
    );
    let children = trace["children"].as_array().unwrap();
    assert_eq!(children.len(), 2, "{trace}");
    for child in children {
        let child = d.trace("acme", child.as_str().unwrap()).await;
        assert_eq!(child["parent_id"], json!(id));
        assert_eq!(child["event"]["depth"], json!(1));
        match child["event"]["event_type"].as_str().unwrap() {
            "points_awarded" => assert_eq!(
                child["event"]["event_data"],
                json!({"msisdn": "+27820000001", "points": 40})
            ),
            "bonus" => assert_eq!(child["event"]["event_data"], json!({"got": 40})),
            other => panic!("unexpected child {other}"),
        }
    }

    // A score under 3: the condition is false, so the default chain runs.
    let id = d
        .emit(event(
            "acme",
            "poll_complete",
            json!({"msisdn": "+1", "score": 1}),
        ))
        .await;
    let trace = d.trace("acme", &id).await;
    let names: Vec<&str> = trace["chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default"], "{trace}");

    // A condition that fails to evaluate fails its chain (no score to double).
    let id = d
        .emit(event("acme", "strict_check", json!({"msisdn": "+1"})))
        .await;
    let trace = d.trace("acme", &id).await;
    assert_eq!(trace["status"], "dead", "{trace}");
    let when = step(&trace, "strict", "when");
    assert_eq!(when["outcome"], "failed");
    assert!(
        when["error"]
            .as_str()
            .unwrap()
            .contains("`when` condition failed to evaluate"),
        "{when}"
    );
}

#[tokio::test]
async fn a_hostile_script_fails_its_step_while_other_events_are_served() {
    let d = Dispatcher::start();
    let hostile = [
        (
            "spin",
            "fn handle(e, s, c) {\n  loop { }\n}",
            "too many operations (limit 100000; raise `[rhai] max_operations`",
        ),
        (
            "recurse",
            "fn f(x) { f(x) }\nfn handle(e, s, c) { f(1) }",
            "function calls nested too deeply (limit 32 levels; `[rhai] max_call_levels`)",
        ),
        (
            "grow",
            "fn handle(e, s, c) {\n  let s = \"ab\";\n  loop { s += s; }\n}",
            "string too large (limit 65536 bytes; `[rhai] max_string_size`)",
        ),
    ];
    // A function nobody defines is refused before it is stored.
    let (status, answer) = d
        .put_script(
            "acme",
            "reader",
            "fn handle(e, s, c) { read_file(\"/etc/passwd\") }",
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("line 1, column 22: no function `read_file` is defined"),
        "{answer}"
    );
    let mut chains = String::from("account_key = \"acme\"\n");
    for (name, source, _) in &hostile {
        let (status, answer) = d.put_script("acme", name, source).await;
        assert_eq!(status, 200, "{answer}");
        chains.push_str(&format!(
            "[[chains]]\nname = \"{name}\"\nevent_type = \"{name}\"\nsteps = [{{ handler = \"script:{name}\" }}]\n"
        ));
    }
    chains.push_str(
        "[[chains]]\nname = \"ping\"\nevent_type = \"ping\"\nsteps = [{ handler = \"log\" }]\n",
    );
    assert_eq!(d.apply("acme", &chains).await.0, 200);

    let mut ids = Vec::new();
    for (name, _, _) in &hostile {
        ids.push(d.emit(event("acme", name, json!({}))).await);
    }
    let ping = d.emit(event("acme", "ping", json!({}))).await;
    assert_eq!(d.trace("acme", &ping).await["status"], "done");
    for ((name, _, expected), id) in hostile.iter().zip(&ids) {
        let trace = d.trace("acme", id).await;
        assert_eq!(trace["status"], "dead", "{trace}");
        let error = step(&trace, name, name)["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            error.starts_with(&format!("script {name} v1")) && error.contains(expected),
            "{name}: {error}"
        );
    }
    let (_, letters) = d
        .call(reqwest::Method::GET, "/v1/accounts/acme/dead-letters", None)
        .await;
    assert_eq!(
        letters["dead_letters"].as_array().unwrap().len(),
        hostile.len()
    );
    // And the dispatcher still serves.
    let again = d.emit(event("acme", "ping", json!({}))).await;
    assert_eq!(d.trace("acme", &again).await["status"], "done");
}

#[tokio::test]
async fn an_updated_script_is_used_for_the_next_event_without_a_restart() {
    let d = Dispatcher::start();
    d.put_script("acme", "ver", "fn handle(e, s, c) { #{ v: 1 } }")
        .await;
    let chains = "account_key = \"acme\"\n[[chains]]\nname = \"c\"\nsteps = [{ handler = \"script:ver\" }]\n";
    assert_eq!(d.apply("acme", chains).await.0, 200);
    let first = d.emit(event("acme", "x", json!({}))).await;
    assert_eq!(
        step(&d.trace("acme", &first).await, "c", "ver")["output"],
        json!({"v": 1})
    );

    let (status, answer) = d
        .put_script("acme", "ver", "fn handle(e, s, c) { #{ v: 2 } }")
        .await;
    assert_eq!((status, answer["version"].clone()), (200, json!(2)));
    for _ in 0..3 {
        let next = d.emit(event("acme", "x", json!({}))).await;
        assert_eq!(
            step(&d.trace("acme", &next).await, "c", "ver")["output"],
            json!({"v": 2})
        );
    }
    let (_, history) = d
        .call(
            reqwest::Method::GET,
            "/v1/accounts/acme/scripts/ver/versions",
            None,
        )
        .await;
    assert_eq!(history["versions"].as_array().unwrap().len(), 2);
    let (_, old) = d
        .call(
            reqwest::Method::GET,
            "/v1/accounts/acme/scripts/ver?version=1",
            None,
        )
        .await;
    assert_eq!(old["source"], "fn handle(e, s, c) { #{ v: 1 } }");
    // A script a chain uses cannot be removed.
    let (status, answer) = d
        .call(
            reqwest::Method::DELETE,
            "/v1/accounts/acme/scripts/ver",
            None,
        )
        .await;
    assert_eq!(status, 409, "{answer}");
}

#[tokio::test]
async fn bad_scripts_and_conditions_are_refused_when_stored() {
    let d = Dispatcher::start();
    let (status, answer) = d
        .put_script("acme", "broken", "fn handle(e, s, c) {\n  let x = ;\n}")
        .await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["code"], "invalid_script");
    assert_eq!(answer["error"]["details"]["line"], json!(2));
    assert!(answer["error"]["details"]["column"].is_number());
    let (status, _) = d
        .call(
            reqwest::Method::GET,
            "/v1/accounts/acme/scripts/broken",
            None,
        )
        .await;
    assert_eq!(status, 404, "nothing was stored");
    for (source, expected) in [
        (
            "fn handle(e, s, c) { eval(\"1\") }",
            "`eval` is not available",
        ),
        (
            "import \"x\" as x;\nfn handle(e, s, c) { }",
            "`import` is not available",
        ),
    ] {
        let (status, answer) = d.put_script("acme", "hostile", source).await;
        assert_eq!(status, 400);
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{answer}"
        );
    }

    let (status, answer) = d
        .apply(
            "acme",
            "account_key = \"acme\"\n[[chains]]\nname = \"c\"\nsteps = [{ handler = \"script:nope\" }]\n",
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no script named \"nope\""),
        "{answer}"
    );
    let (status, answer) = d
        .apply(
            "acme",
            "account_key = \"acme\"\n[[chains]]\nname = \"c\"\nwhen = 'event.event_data.score >'\nsteps = [{ handler = \"log\" }]\n",
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("field when: not a valid Rhai expression: line 1"),
        "{answer}"
    );
}

#[tokio::test]
async fn dry_runs_show_what_would_happen_without_doing_it() {
    let d = Dispatcher::start();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scripts");
    for name in ["award_points", "route_by_language", "dedupe_answers"] {
        let file = examples.join(format!("{name}.rhai"));
        let (ok, out, err) = d.cli(&["scripts", "put", "acme", name, file.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(
            out.contains(&format!("as script {name} of account acme, version 1")),
            "{out}"
        );
    }
    let sample = examples.join("award_points.event.json");
    let (ok, out, err) = d.cli(&[
        "scripts",
        "test",
        "acme",
        "award_points",
        "--event",
        sample.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let run: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["outcome"], "ok");
    assert_eq!(run["output"], json!({"score": 2, "of": 3, "points": 20}));
    assert_eq!(run["emits"][0]["event_type"], "airtime_award");
    assert!(run["operations"].as_u64().unwrap() > 0);
    assert!(run["duration_ms"].is_number());
    let (ok, out, _) = d.cli(&[
        "scripts",
        "test",
        "acme",
        "award_points",
        "--event",
        sample.to_str().unwrap(),
    ]);
    assert!(ok);
    assert!(out.contains("would emit loyalty/airtime_award"), "{out}");

    let (ok, _, err) = d.cli(&[
        "chains",
        "apply",
        examples.join("chains.toml").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = d.cli(&[
        "chains",
        "test",
        "acme",
        "--event",
        sample.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let chain = &report["chains"][0];
    assert_eq!(chain["name"], "score-poll");
    assert_eq!(chain["steps"][0]["output"]["points"], json!(20));
    assert_eq!(chain["steps"][1]["action"], "simulated");
    assert_eq!(
        chain["steps"][1]["would_run"]["config"]["message"],
        "+27820000001 earned 20 points"
    );
    // Nothing was published or traced: the account has no dead letters or traces of it.
    let (_, letters) = d
        .call(reqwest::Method::GET, "/v1/accounts/acme/dead-letters", None)
        .await;
    assert!(letters["dead_letters"].as_array().unwrap().is_empty());
    let (ok, out, _) = d.cli(&["scripts", "list", "acme"]);
    assert!(ok && out.contains("route_by_language"), "{out}");
    let (ok, out, _) = d.cli(&["scripts", "show", "acme", "dedupe_answers"]);
    assert!(
        ok && out.contains("fn handle(event, steps, config)"),
        "{out}"
    );
}

/// A step whose handler ran keeps its idempotency key even when what it
/// returned cannot become events (an emitted event over the size limit): it
/// happened, so the next event with the key skips it. A step whose handler
/// itself failed gives the key back, and the next event with it runs.
#[tokio::test]
async fn a_step_that_ran_keeps_its_idempotency_key_when_its_output_cannot_be_emitted() {
    let d = Dispatcher(util::Dispatcher::with_config(
        None,
        "[limits]\nmax_event_bytes = 1024\n",
    ));
    let script = r#"
fn handle(event, steps, config) {
    if event.event_data.fail { throw "refused"; }
    if event.event_data.big {
        let pad = "x";
        pad.pad(2000, "x");
        emit("padded", #{ pad: pad });
    }
    #{ ran: true }
}
"#;
    assert_eq!(d.put_script("acme", "pad", script).await.0, 200);
    let (status, answer) = d
        .apply(
            "acme",
            r#"
account_key = "acme"

[[chains]]
name = "order"
event_type = "order"
steps = [{ handler = "script:pad", idempotency = { key = "{{ event.event_data.order }}", window = "1h" } }]
"#,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let run = |order: &str, big: bool, fail: bool| {
        let e = event(
            "acme",
            "order",
            json!({"order": order, "big": big, "fail": fail}),
        );
        let d = &d;
        async move {
            let id = d.emit(e).await;
            d.trace("acme", &id).await
        }
    };

    let oversized = run("A-1", true, false).await;
    assert_eq!(oversized["status"], "dead", "{oversized:#}");
    let again = run("A-1", false, false).await;
    assert_eq!(
        step(&again, "order", "pad")["outcome"],
        "skipped",
        "{again:#}"
    );

    let refused = run("B-2", false, true).await;
    assert_eq!(refused["status"], "dead", "{refused:#}");
    let after = run("B-2", false, false).await;
    assert_eq!(step(&after, "order", "pad")["outcome"], "ok", "{after:#}");
}
