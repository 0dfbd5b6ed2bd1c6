//! `/metrics` as Prometheus reads it: parsed by the official client's parser,
//! with counters that match what the test made the dispatcher do.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{Dispatcher, TIMEOUT, event};

/// The samples of `text`, parsed by `prometheus_client`.
fn parse(text: &str) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/parse_metrics.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writing the metrics");
    let out = child.wait_with_output().expect("the parser finishes");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("JSON samples")
        .as_array()
        .expect("an array")
        .clone()
}

/// The value of the sample `name` whose labels include `labels` (summed when
/// several match, e.g. over event types); 0 when none does.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().expect("a number"))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::embedded();
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    let recv = receiver.url();
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "acme"

[[chains]]
name = "pay"
event_type = "paid"
steps = [
  {{ handler = "log", config = {{ message = "paying" }} }},
  {{ handler = "payment_webhook", config = {{ url = "{recv}/hook/500,200", secret = "gateway" }}, retry = {{ max_attempts = 3, initial = "50ms" }} }},
]

[[chains]]
name = "refused"
event_type = "refused"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/400", secret = "gateway" }} }}]

[[chains]]
name = "when"
event_type = "gated"
when = "event.event_data.n > 1"
steps = [{{ handler = "log", config = {{ message = "gated" }} }}]
"#
        ),
    )
    .await;

    let mut ids = Vec::new();
    for (event_type, n) in [
        ("paid", 1),
        ("paid", 2),
        ("refused", 3),
        ("gated", 5),
        ("nothing", 0),
    ] {
        let e = event(
            "acme",
            "test",
            event_type,
            &format!("c-{n}"),
            json!({"n": n}),
        );
        ids.push(d.post_event(&serde_json::to_value(&e).unwrap()).await);
    }
    for id in &ids {
        d.wait_for_trace("acme", id, TIMEOUT).await;
    }
    let (status, text) = d.get("/metrics").await;
    assert_eq!(status, 200);
    let samples = parse(text.as_str().expect("text"));

    let events = |outcome: &str, event_type: &str| {
        value(
            &samples,
            "switchboard_events_total",
            &[
                ("outcome", outcome),
                ("account", "acme"),
                ("event_type", event_type),
            ],
        )
    };
    assert_eq!(events("received", "paid"), 2.0);
    assert_eq!(events("handled", "paid"), 2.0);
    assert_eq!(
        events("retried", "paid"),
        2.0,
        "each paid event's first webhook got a 500"
    );
    assert_eq!(events("dead_lettered", "refused"), 1.0);
    assert_eq!(events("handled", "gated"), 1.0);
    assert_eq!(events("unrouted", "nothing"), 1.0);

    let attempts = |handler: &str, result: &str| {
        value(
            &samples,
            "switchboard_step_attempts_total",
            &[("handler", handler), ("result", result)],
        )
    };
    assert_eq!(attempts("payment_webhook", "ok"), 2.0);
    assert_eq!(attempts("payment_webhook", "retried"), 2.0);
    assert_eq!(attempts("payment_webhook", "failed"), 1.0);
    assert_eq!(attempts("log", "ok"), 3.0);

    // Step durations: a histogram per handler, whose count is the attempts.
    assert_eq!(
        value(
            &samples,
            "switchboard_step_duration_seconds_count",
            &[("handler", "payment_webhook")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &samples,
            "switchboard_step_duration_seconds_bucket",
            &[("handler", "payment_webhook"), ("le", "+Inf")]
        ),
        5.0
    );

    // Outbound calls by provider and status, as the receiver saw them.
    let outbound = |status: &str| {
        value(
            &samples,
            "switchboard_outbound_calls_total",
            &[
                ("channel", "http"),
                ("provider", "webhook"),
                ("status", status),
            ],
        )
    };
    assert_eq!(outbound("500"), 2.0);
    assert_eq!(outbound("200"), 2.0);
    assert_eq!(outbound("400"), 1.0);
    assert_eq!(receiver.requests_to("/hook").await.len(), 5);

    // The queue is drained, and the `when` condition ran Rhai operations.
    assert_eq!(value(&samples, "switchboard_bus_lag_messages", &[]), 0.0);
    assert!(value(&samples, "switchboard_rhai_operations_total", &[]) > 0.0);
}
