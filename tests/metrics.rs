//! `/metrics` as Prometheus reads it: parsed by the official client's parser,
//! with counters that match what the test made the dispatcher do.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{Dispatcher, TIMEOUT, event};

/// The samples of `text` in `format` (`openmetrics` or `prometheus`),
/// parsed by `prometheus_client`.
fn parse(text: &str, format: &str) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/parse_metrics.py");
    let mut child = Command::new("python3")
        .args([script, format])
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

const OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5";

/// `GET /metrics`, with `accept` as the Accept header: the content type and
/// the text.
async fn scrape(d: &Dispatcher, accept: Option<&str>) -> (String, String) {
    let mut request = reqwest::Client::new().get(format!("{}/metrics", d.url()));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("a content type")
        .to_string();
    (content_type, response.text().await.expect("the text"))
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
    // OpenMetrics when asked for, as Prometheus asks; the Prometheus text
    // format otherwise; the same samples either way.
    let (content_type, text) = scrape(&d, Some(OPENMETRICS)).await;
    assert!(content_type.starts_with("application/openmetrics-text; version=1.0.0"));
    let samples = parse(&text, "openmetrics");
    let (content_type, plain) = scrape(&d, None).await;
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    let counters = |samples: Vec<Value>| -> Vec<Value> {
        let mut c: Vec<Value> = samples
            .into_iter()
            // Counted between the two scrapes: flushes and Rhai operations.
            .filter(|s| {
                s["type"] == "counter"
                    && s["name"] != "switchboard_rhai_operations_total"
                    && s["name"] != "switchboard_store_flushes_total"
            })
            .map(|mut s| {
                s["type"] = Value::Null;
                s["value"] = json!(s["value"].as_f64().expect("a number"));
                s
            })
            .collect();
        c.sort_by_key(|s| s.to_string());
        c
    };
    assert_eq!(
        counters(parse(&plain, "prometheus")),
        counters(samples.clone()),
        "the two formats' counters"
    );

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

    // The `when` condition ran Rhai operations, and the queue drains: an
    // event's trace is there a flush before its ack, so the last may still
    // be counted at the first scrape.
    assert!(value(&samples, "switchboard_rhai_operations_total", &[]) > 0.0);
    crate::util::wait_until("the bus lag at 0", TIMEOUT, || async {
        let (_, text) = scrape(&d, Some(OPENMETRICS)).await;
        let lag = value(
            &parse(&text, "openmetrics"),
            "switchboard_bus_lag_messages",
            &[],
        );
        (lag == 0.0).then_some(())
    })
    .await;
}

/// With `metrics.accounts` naming some accounts, only those have series of
/// their own; the others are summed into series without the label, and
/// every account's counts are read from `GET /v1/accounts/{a}/counts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_named_accounts_have_series_and_every_account_has_counts() {
    let d = Dispatcher::with_config(None, "[metrics]\naccounts = [\"vip\"]\n");
    for account in ["vip", "small", "tiny"] {
        d.apply_chains(
            &format!("{account}.toml"),
            &format!(
                "account_key = \"{account}\"\n[[chains]]\nname = \"log\"\nevent_type = \"paid\"\nsteps = [{{ handler = \"log\" }}]\n"
            ),
        )
        .await;
        for (event_type, n) in [("paid", 2), ("other", 1)] {
            for i in 0..n {
                let e = event(account, "shop", event_type, &format!("c-{i}"), json!({}));
                let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
                d.wait_for_trace(account, &id, TIMEOUT).await;
            }
        }
    }
    let (_, text) = scrape(&d, Some(OPENMETRICS)).await;
    let samples = parse(&text, "openmetrics");
    let handled = |labels: &[(&str, &str)]| value(&samples, "switchboard_events_total", labels);
    assert_eq!(
        handled(&[
            ("outcome", "handled"),
            ("account", "vip"),
            ("event_type", "paid")
        ]),
        2.0
    );
    let unlabelled: f64 = samples
        .iter()
        .filter(|s| {
            s["name"] == "switchboard_events_total"
                && s["labels"]["outcome"] == "handled"
                && s["labels"]["event_type"] == "paid"
                && s["labels"].get("account").is_none()
        })
        .map(|s| s["value"].as_f64().expect("a number"))
        .sum();
    assert_eq!(unlabelled, 4.0, "small's and tiny's, summed: {text}");
    assert!(!text.contains("small") && !text.contains("tiny"), "{text}");

    let (status, counts) = d.get("/v1/accounts/small/counts").await;
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["account_key"], "small");
    assert!(
        counts["since"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{counts}"
    );
    assert_eq!(
        counts["events"],
        json!([
            {"event_type": "other", "received": 1, "handled": 0, "unrouted": 1, "expired": 0, "dead_lettered": 0, "retried": 0},
            {"event_type": "paid", "received": 2, "handled": 2, "unrouted": 0, "expired": 0, "dead_lettered": 0, "retried": 0},
        ])
    );
    let (status, none) = d.get("/v1/accounts/nobody/counts").await;
    assert_eq!(status, 200, "{none}");
    assert_eq!(none["events"], json!([]));
}

/// The runtime has as many worker threads as `runtime.worker_threads`, or
/// the flag's variable, says (the variable wins over the file), and one per
/// CPU without either; `/metrics` shows how many, and how many event
/// threads (one by default on a machine of up to 2 CPUs, none when set to 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_has_the_worker_threads_configured() {
    let threads = |text: &str| -> f64 {
        value(
            &parse(text, "prometheus"),
            "switchboard_runtime_worker_threads",
            &[],
        )
    };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let default = Dispatcher::embedded();
    let text = scrape(&default, None).await.1;
    assert_eq!(threads(&text), cpus);
    assert_eq!(
        value(
            &parse(&text, "prometheus"),
            "switchboard_runtime_event_threads",
            &[]
        ),
        if cpus <= 2.0 { 1.0 } else { 0.0 },
        "by default the event path has a thread of its own on a machine of up to 2 CPUs"
    );
    let shared = Dispatcher::with_config(None, "[runtime]\nevent_threads = 0\n");
    let text = scrape(&shared, None).await.1;
    assert_eq!(
        value(
            &parse(&text, "prometheus"),
            "switchboard_runtime_event_threads",
            &[]
        ),
        0.0
    );
    let from_file = Dispatcher::with_config(None, "[runtime]\nworker_threads = 3\n");
    assert_eq!(threads(&scrape(&from_file, None).await.1), 3.0);
    let from_env = Dispatcher::with_config_env(
        None,
        "[runtime]\nworker_threads = 3\n",
        &[("SWITCHBOARD_WORKER_THREADS", "1")],
    );
    assert_eq!(threads(&scrape(&from_env, None).await.1), 1.0);
}
