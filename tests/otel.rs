//! OpenTelemetry traces, end to end: a Python worker publishes an event
//! with a W3C `traceparent`; the dispatcher's spans, exported over OTLP/HTTP
//! to a real receiver (`tests/peers/otlp_receiver.py`, decoding with the
//! OpenTelemetry project's protobuf classes), form one trace with the
//! worker's span as their root's parent: the event's `process` span, its
//! chains, their steps, the client spans of the webhook and the SMS
//! gateway, the producer spans of the NATS command and of the child event,
//! and the child's own `process` span under its publish. The webhook
//! receiver, the gateway and the command's subscriber see the same trace
//! id. A retried step's second pass links to the first. With traces off,
//! nothing is exported.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::peers::{HttpReceiver, OtlpReceiver, WEBHOOK_SECRET};
use crate::util::{Dispatcher, NatsServer, TIMEOUT, wait_until};
use crate::workers::python_worker;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const WORKER_SPAN: &str = "00f067aa0ba902b7";

/// The poll's chain calls a webhook (failing once: the event comes back
/// for a second pass), texts through the HTTP gateway and through a NATS
/// transport, and emits a child, which the second chain logs.
fn chains(receiver: &HttpReceiver) -> String {
    format!(
        r#"
account_key = "traced"

[[chains]]
name = "poll"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "payment_webhook"
retry = {{ max_attempts = 3, initial = "200ms", max = "1s" }}
config = {{ url = "{}/hook/500,200", secret = "gateway", body = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }} }}

[[chains.steps]]
handler = "send_sms"
name = "gateway"
config = {{ provider = "gateway", to = "{{{{ event.event_data.msisdn }}}}", body = "Thanks" }}

[[chains.steps]]
handler = "send_sms"
name = "transport"
config = {{ provider = "smsc", to = "{{{{ event.event_data.msisdn }}}}", body = "Thanks again" }}

[[chains.steps]]
handler = "emit"
config = {{ event_type = "poll_noted", data = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }} }}

[[chains]]
name = "noted"
conversation_type = "survey"
event_type = "poll_noted"

[[chains.steps]]
handler = "log"
config = {{ message = "noted {{{{ event.event_data.msisdn }}}}" }}
"#,
        receiver.url()
    )
}

fn config(receiver: &HttpReceiver) -> String {
    format!(
        r#"{}
[providers.sms.smsc]
type = "nats"
transport = "smsc"
from = "1234"

[otel]
service_name = "switchboard-under-test"
"#,
        receiver.sms_gateway_config(30)
    )
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The worker's span, as its `traceparent` carries it.
fn worker_traceparent() -> String {
    format!("00-{TRACE_ID}-{WORKER_SPAN}-01")
}

/// Runs the Python worker, publishing one `poll_complete` of account
/// `traced` with the worker's `traceparent`; returns the event's id.
async fn publish_traced(nats: &NatsServer) -> String {
    let run = python_worker(&[
        "--nats",
        nats.url(),
        "--account",
        "traced",
        "--count",
        "1",
        "--traceparent",
        &worker_traceparent(),
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    run.stdout.split_whitespace().next().unwrap().to_string()
}

/// The spans exported once `consumers` events' passes (`process` spans)
/// and, with `served`, the ingest request's span are among them.
async fn exported(otlp: &OtlpReceiver, consumers: usize, served: bool) -> Vec<Value> {
    wait_until("the spans of the events", TIMEOUT, || async {
        let spans = otlp.spans().await;
        let kind = |kind: &str| spans.iter().filter(|s| s["kind"] == kind).count();
        (kind("SPAN_KIND_CONSUMER") >= consumers && (!served || kind("SPAN_KIND_SERVER") > 0))
            .then_some(spans)
    })
    .await
}

/// The span id a W3C `traceparent` names, checked to be of our trace.
fn span_of_traceparent(traceparent: &str) -> String {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], TRACE_ID, "{traceparent} is of the worker's trace");
    parts[2].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_worker_through_steps_calls_commands_and_children() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let otlp = OtlpReceiver::start();
    let d = Dispatcher::with_config_env(
        Some(&nats),
        &config(&receiver),
        &[
            // The standard variables: the endpoint, and a short batch delay.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.url()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    assert!(
        d.log().contains("exporting OpenTelemetry traces"),
        "{}",
        d.log()
    );
    d.set_secret("traced", "gateway", WEBHOOK_SECRET).await;
    d.apply_chains("traced.toml", &chains(&receiver)).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut commands = client.subscribe("vumi.outbound.smsc").await.unwrap();
    client.flush().await.unwrap();

    let event_id = publish_traced(&nats).await;

    // What left the dispatcher carries the trace: the command on NATS...
    let command = tokio::time::timeout(TIMEOUT, commands.next())
        .await
        .expect("a command in time")
        .unwrap();
    let command_parent = span_of_traceparent(
        command
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .expect("the command carries a traceparent")
            .as_str(),
    );
    // ... and the webhook's two attempts and the gateway's request.
    let hooks = wait_until("both webhook attempts", TIMEOUT, || async {
        let hooks = receiver.requests_to("/hook").await;
        (hooks.len() == 2).then_some(hooks)
    })
    .await;
    let gateway = receiver.requests_to("/sms").await;
    assert_eq!(gateway.len(), 1, "{gateway:?}");
    let call_parents: Vec<String> = hooks
        .iter()
        .chain(&gateway)
        .map(|r| {
            span_of_traceparent(
                r["headers"]["traceparent"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a traceparent in {r}")),
            )
        })
        .collect();

    // Both events' passes end with a `process` span each; the spans of the
    // calls come before them.
    let spans = exported(&otlp, 3, false).await;
    let by_id: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), s))
        .collect();
    let parent_of = |s: &Value| -> &Value {
        by_id
            .get(s["parent_span_id"].as_str().unwrap())
            .unwrap_or_else(|| panic!("the parent of {s} was exported"))
    };
    for s in &spans {
        assert_eq!(s["trace_id"], TRACE_ID, "every span is of one trace: {s}");
        assert_eq!(s["service"], "switchboard-under-test", "{s}");
    }
    let named =
        |name: &str| -> Vec<&Value> { spans.iter().filter(|s| s["name"] == name).collect() };

    // The event's two passes: the first, under the worker's span; the second
    // (the webhook's retry) under it too, linked to the first.
    let mut passes: Vec<&Value> =
        named("process vumi.events.{account}.{conversation_type}.{event_type}")
            .into_iter()
            .filter(|s| attr(s, "messaging.message.id") == event_id.as_str())
            .collect();
    assert_eq!(passes.len(), 2, "{spans:#?}");
    passes.sort_by_key(|s| attr(s, "switchboard.attempt").as_i64());
    let (first, second) = (passes[0], passes[1]);
    for pass in [first, second] {
        assert_eq!(pass["parent_span_id"], WORKER_SPAN, "{pass}");
        assert_eq!(attr(pass, "messaging.system"), "nats");
        assert_eq!(
            attr(pass, "messaging.destination.name"),
            "vumi.events.traced.survey.poll_complete"
        );
        assert_eq!(
            attr(pass, "messaging.destination.template"),
            "vumi.events.{account}.{conversation_type}.{event_type}"
        );
        assert_eq!(attr(pass, "messaging.message.conversation_id"), "poll-2026");
        assert_eq!(attr(pass, "messaging.consumer.group.name"), "switchboard");
        assert_eq!(attr(pass, "switchboard.account"), "traced");
    }
    assert_eq!(attr(first, "switchboard.outcome"), "running", "{first}");
    assert_eq!(attr(second, "switchboard.outcome"), "done", "{second}");
    assert_eq!(
        second["links"],
        serde_json::json!([{"trace_id": TRACE_ID, "span_id": first["span_id"]}]),
        "the second pass links to the first: {second}"
    );

    // Chains under their pass, steps under their chain.
    let chain_spans = named("chain poll");
    assert_eq!(chain_spans.len(), 2, "one per pass: {chain_spans:#?}");
    let steps = |name: &str| -> Vec<&Value> {
        let steps = named(&format!("step {name}"));
        for s in &steps {
            assert_eq!(parent_of(s)["name"], "chain poll", "{s}");
            assert_eq!(attr(s, "switchboard.chain"), "poll");
            assert_eq!(attr(s, "switchboard.step"), name);
        }
        steps
    };
    let mut webhook = steps("payment_webhook");
    webhook.sort_by_key(|s| attr(s, "switchboard.attempt").as_i64());
    assert_eq!(webhook.len(), 2, "{webhook:#?}");
    assert_eq!(attr(webhook[0], "switchboard.outcome"), "retry");
    assert_eq!(webhook[0]["status"], "STATUS_CODE_ERROR");
    assert_eq!(parent_of(parent_of(webhook[0])), first);
    assert_eq!(attr(webhook[1], "switchboard.outcome"), "ok");
    assert_eq!(attr(webhook[1], "switchboard.attempt"), 2);
    assert_eq!(parent_of(parent_of(webhook[1])), second);
    for name in ["gateway", "transport", "emit"] {
        let s = steps(name);
        assert_eq!(s.len(), 1, "{name}: {s:#?}");
        assert_eq!(attr(s[0], "switchboard.outcome"), "ok", "{}", s[0]);
        assert_eq!(parent_of(parent_of(s[0])), second);
    }

    // Each outbound call is a client span under its step, and the request
    // carried that span's context.
    assert_eq!(named("POST").len(), 3, "{spans:#?}");
    // In the order the receiver got the requests: the webhook's two, the gateway's.
    let posts: Vec<&Value> = call_parents
        .iter()
        .map(|carried| {
            *by_id
                .get(carried.as_str())
                .unwrap_or_else(|| panic!("the span {carried} a request carried was exported"))
        })
        .collect();
    for post in &posts {
        assert_eq!(post["name"], "POST", "{post}");
        assert_eq!(post["kind"], "SPAN_KIND_CLIENT");
        assert_eq!(attr(post, "http.request.method"), "POST");
    }
    assert_eq!(attr(posts[0], "http.response.status_code"), 500);
    assert_eq!(posts[0]["status"], "STATUS_CODE_ERROR");
    assert_eq!(parent_of(posts[0]), webhook[0]);
    assert_eq!(attr(posts[1], "http.response.status_code"), 200);
    assert_eq!(parent_of(posts[1]), webhook[1]);
    assert_eq!(parent_of(posts[2])["name"], "step gateway");

    // The NATS command: a producer span under its step, its context on the message.
    let command_span = named("publish vumi.outbound.smsc");
    assert_eq!(command_span.len(), 1, "{spans:#?}");
    assert_eq!(command_span[0]["kind"], "SPAN_KIND_PRODUCER");
    assert_eq!(command_span[0]["span_id"], command_parent.as_str());
    assert_eq!(parent_of(command_span[0])["name"], "step transport");

    // The child: published under the second pass, processed under its publish.
    let publishes: Vec<&Value> =
        named("publish vumi.events.{account}.{conversation_type}.{event_type}");
    assert_eq!(publishes.len(), 1, "{publishes:#?}");
    let publish = publishes[0];
    assert_eq!(publish["kind"], "SPAN_KIND_PRODUCER");
    assert_eq!(parent_of(publish), second);
    let child_id = attr(publish, "messaging.message.id").as_str().unwrap();
    let child = spans
        .iter()
        .find(|s| s["kind"] == "SPAN_KIND_CONSUMER" && attr(s, "messaging.message.id") == child_id)
        .expect("the child's process span");
    assert_eq!(parent_of(child), publish);
    assert_eq!(
        attr(child, "messaging.destination.name"),
        "vumi.events.traced.survey.poll_noted"
    );
    assert_eq!(attr(child, "switchboard.outcome"), "done");
    let logged = named("step log");
    assert_eq!(logged.len(), 1);
    assert_eq!(parent_of(parent_of(logged[0])), child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_traces_off_nothing_is_exported() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let otlp = OtlpReceiver::start();
    // The endpoint is named, but the SDK is disabled: no exporter runs.
    let mut d = Dispatcher::with_config_env(
        Some(&nats),
        &format!(
            "{}\n[otel]\nendpoint = \"{}\"\n",
            receiver.sms_gateway_config(30),
            otlp.url()
        ),
        &[
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    d.apply_chains(
        "traced.toml",
        r#"
account_key = "traced"

[[chains]]
name = "poll"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "Thanks" }
"#,
    )
    .await;
    publish_traced(&nats).await;
    let sent = wait_until("the SMS", TIMEOUT, || async {
        let sent = receiver.requests_to("/sms").await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    // Nothing made a span, so nothing carries one on.
    assert!(
        sent[0]["headers"].get("traceparent").is_none(),
        "{}",
        sent[0]
    );
    // A clean stop flushes an exporter, if one ran.
    assert_eq!(d.stop(), Some(0));
    assert!(
        !d.log().contains("exporting OpenTelemetry traces"),
        "{}",
        d.log()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(otlp.spans().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_posted_to_the_api_continues_the_callers_trace_on_the_embedded_bus() {
    let otlp = OtlpReceiver::start();
    let d = Dispatcher::with_config_env(
        None,
        &format!("[otel]\nendpoint = \"{}\"\n", otlp.url()),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    d.apply_chains(
        "traced.toml",
        r#"
account_key = "traced"

[[chains]]
name = "poll"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "emit"
config = { event_type = "poll_noted", data = { n = 1 } }

[[chains]]
name = "noted"
conversation_type = "survey"
event_type = "poll_noted"

[[chains.steps]]
handler = "log"
config = { message = "noted" }
"#,
    )
    .await;
    let event = serde_json::to_value(crate::util::event(
        "traced",
        "survey",
        "poll_complete",
        "poll-2026",
        serde_json::json!({}),
    ))
    .unwrap();
    let answer = d
        .http()
        .post(format!("{}/v1/events", d.url()))
        .header("traceparent", worker_traceparent())
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    // The request's span may end after the events' own.
    let spans = exported(&otlp, 2, true).await;
    for s in &spans {
        assert_eq!(s["trace_id"], TRACE_ID, "{s}");
        assert_eq!(s["service"], "switchboard", "the default service name: {s}");
    }
    let one = |name: &str, kind: &str| -> &Value {
        let found: Vec<&Value> = spans
            .iter()
            .filter(|s| s["name"] == name && s["kind"] == kind)
            .collect();
        assert_eq!(found.len(), 1, "{name}: {spans:#?}");
        found[0]
    };
    let server = one("POST /v1/events", "SPAN_KIND_SERVER");
    assert_eq!(server["parent_span_id"], WORKER_SPAN);
    assert_eq!(attr(server, "http.response.status_code"), 202);
    let process = "process vumi.events.{account}.{conversation_type}.{event_type}";
    let passes: Vec<&Value> = spans.iter().filter(|s| s["name"] == process).collect();
    let parent = passes
        .iter()
        .find(|s| *attr(s, "messaging.message.id") == event["id"])
        .expect("the event's process span");
    assert_eq!(parent["parent_span_id"], server["span_id"]);
    assert_eq!(attr(parent, "messaging.system"), "embedded");
    let publish = one(
        "publish vumi.events.{account}.{conversation_type}.{event_type}",
        "SPAN_KIND_PRODUCER",
    );
    assert_eq!(publish["parent_span_id"], parent["span_id"]);
    let child = passes
        .iter()
        .find(|s| *attr(s, "messaging.message.id") != event["id"])
        .expect("the child's process span");
    assert_eq!(
        child["parent_span_id"], publish["span_id"],
        "the embedded bus carries the context too"
    );
}

/// A sampler the SDK does not know, a ratio sampler without its ratio or
/// with one that is no fraction, and an unknown key stop `run` before it
/// starts, naming what is wrong.
#[tokio::test]
async fn a_bad_otel_section_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, config, says) in [
        (
            "sampler",
            "[otel]\nsampler = \"sometimes\"\n",
            "otel.sampler is one of always_on",
        ),
        (
            "no-ratio",
            "[otel]\nsampler = \"traceidratio\"\n",
            "otel.sampler = \"traceidratio\" needs otel.sampler_ratio",
        ),
        (
            "ratio",
            "[otel]\nsampler = \"parentbased_traceidratio\"\nsampler_ratio = 1.5\n",
            "otel.sampler_ratio is a fraction from 0.0 to 1.0, not 1.5",
        ),
        (
            "key",
            "[otel]\nendpiont = \"http://127.0.0.1:4318\"\n",
            "endpiont",
        ),
    ] {
        let line = crate::bad_input::refused_at_start(dir.path(), name, config).await;
        assert!(line.contains(says), "{name}: {line}");
    }
}
