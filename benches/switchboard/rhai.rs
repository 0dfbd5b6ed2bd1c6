//! Per-call cost of a Rhai `handle` and of a `when` condition, in process.
//!
//! The handle figure includes what the dispatcher pays per script step: the
//! steps and config converted to Rhai values, the call, and the returned map
//! converted back to JSON; the event is converted once per event, measured
//! apart.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_handlers::script::{ScriptLabel, ScriptRuntime};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

use crate::report::Report;

/// A 20-line `handle`: a little of everything a real handler does.
const HANDLE: &str = r#"
fn tier(points) {
    if points >= 100 { "gold" } else if points >= 50 { "silver" } else { "bronze" }
}
fn handle(event, steps, config) {
    let data = event.event_data;
    let answers = data.answers;
    let correct = #{ q1: "b", q2: "a", q3: "d" };
    let score = 0;
    for q in correct.keys() {
        if answers[q] == correct[q] { score += 1; }
    }
    let points = score * config.per_answer;
    if points > 0 {
        emit("airtime_award", #{ msisdn: data.msisdn, points: points });
    }
    log("debug", `scored ${score}`);
    let label = tier(points) + "-" + event.conversation_key;
    #{ score: score, points: points, tier: label }
}
"#;

const WHEN: &str = r#"event.event_data.score >= 3 && event.conversation_type == "survey""#;

fn event() -> VumiApiEvent {
    VumiApiEvent::new(
        AccountKey::new("acme").unwrap(),
        ConversationKey::new("poll-2026").unwrap(),
        ConversationType::new("survey").unwrap(),
        EventType::new("poll_complete").unwrap(),
        json!({"msisdn": "+27820000001", "score": 4, "answers": {"q1": "b", "q2": "c", "q3": "d"}})
            .as_object()
            .unwrap()
            .clone(),
    )
}

/// Runs `f` for about a second after a warm-up; returns µs per call.
fn measure(mut f: impl FnMut()) -> f64 {
    for _ in 0..1_000 {
        f();
    }
    let mut calls = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..100 {
            f();
        }
        calls += 100;
    }
    start.elapsed().as_secs_f64() * 1e6 / calls as f64
}

pub fn run(report: &mut Report) -> anyhow::Result<()> {
    println!("\n## rhai: per call, in process");

    let runtime = ScriptRuntime::default();
    let ast = runtime
        .compile_script(HANDLE)
        .map_err(|e| anyhow::anyhow!("the benchmark script: {e}"))?;
    let event = event();
    let steps = json!({"earlier": {"n": 1}});
    let config = json!({"per_answer": 10});
    let label = ScriptLabel {
        name: "bench",
        version: 1,
    };
    let conversation = (&event.conversation_type, &event.conversation_key);

    // As the dispatcher holds it: converted once per event, shared.
    let event_value = ScriptRuntime::to_dynamic(&event).into_shared();
    let check = runtime.call_handle(
        label,
        &ast,
        &event.account_key,
        conversation,
        event_value.clone(),
        ScriptRuntime::to_dynamic(&steps),
        ScriptRuntime::to_dynamic(&config),
    );
    let output = check
        .result
        .map_err(|e| anyhow::anyhow!("the benchmark script: {e}"))?;
    assert_eq!(output.data["points"], json!(20));
    println!("rhai handle: {} operations per call", check.operations);

    let handle_with_event = measure(|| {
        let run = runtime.call_handle(
            label,
            &ast,
            &event.account_key,
            conversation,
            ScriptRuntime::to_dynamic(&event),
            ScriptRuntime::to_dynamic(&steps),
            ScriptRuntime::to_dynamic(&config),
        );
        black_box(run.result.is_ok());
    });
    let handle = measure(|| {
        let run = runtime.call_handle(
            label,
            &ast,
            &event.account_key,
            conversation,
            event_value.flatten_clone(),
            ScriptRuntime::to_dynamic(&steps),
            ScriptRuntime::to_dynamic(&config),
        );
        black_box(run.result.is_ok());
    });
    let condition = runtime
        .compile_condition(WHEN)
        .map_err(|e| anyhow::anyhow!("the condition: {e}"))?;
    let when = measure(|| {
        black_box(runtime.eval_condition(&condition, &event_value).unwrap());
    });
    let convert = measure(|| {
        let _ = black_box(ScriptRuntime::to_dynamic(&event));
    });
    println!(
        "handle {handle:.2} µs, with the event's conversion {handle_with_event:.2} µs, \
         when {when:.2} µs, event → Rhai value {convert:.2} µs"
    );
    report.check(
        "rhai",
        "20-line `handle`, per call",
        format!("{handle:.1} µs"),
        "< 20 µs",
        handle < 20.0,
    );
    report.figure(
        "rhai",
        "the same, with the event's conversion",
        format!("{handle_with_event:.1} µs"),
    );
    report.check(
        "rhai",
        "`when` condition, per call",
        format!("{when:.2} µs"),
        "< 2 µs",
        when < 2.0,
    );
    report.figure(
        "rhai",
        "event → Rhai value (once per event)",
        format!("{convert:.1} µs"),
    );
    Ok(())
}
