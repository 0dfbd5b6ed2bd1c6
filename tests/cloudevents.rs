//! CloudEvents in and out: structured mode (one, and a batch) on `POST
//! /v1/events`, binary and structured mode on NATS, all mapped to the same
//! event that runs the same chain; invalid CloudEvents answered 400 over
//! HTTP and dead-lettered from NATS, with the attribute at fault; and
//! events published as binary-mode CloudEvents when the deployment asks.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::util::{Dispatcher, NatsServer, wait_until};

const TIMEOUT: Duration = Duration::from_secs(60);

const CHAINS: &str = r#"
account_key = "acme"

[[chains]]
name = "welcome"
conversation_type = "survey"
event_type = "signed_up"

[[chains.steps]]
handler = "log"
config = { message = "welcome {{ event.event_data.msisdn }}" }

[[chains.steps]]
name = "thanks"
handler = "emit"
config = { event_type = "thanked", data = { msisdn = "{{ event.event_data.msisdn }}" } }
"#;

/// A structured-mode CloudEvent with the UUID `id`, of account `acme`.
fn cloudevent(id: &str, msisdn: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "/apps/survey",
        "type": "com.example.survey.signed_up",
        "subject": "poll-2026",
        "account": "acme",
        "time": "2026-12-03T10:00:00Z",
        "datacontenttype": "application/json",
        "data": { "msisdn": msisdn }
    })
}

fn uuid() -> String {
    switchboard_sdk::EventId::new_v7().to_string()
}

async fn post(d: &Dispatcher, media: &str, body: &Value) -> (u16, Value) {
    let response = d
        .http()
        .post(format!("{}/v1/events", d.url()))
        .header("content-type", media)
        .body(body.to_string())
        .send()
        .await
        .expect("POST /v1/events");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

/// The event the trace of `id` shows, once its chain is done, without
/// what differs from one CloudEvent to the next (its id, its lineage).
async fn handled(d: &Dispatcher, id: &str) -> Value {
    let trace = wait_until("the chain's end", TIMEOUT, || async {
        d.trace("acme", id).await.filter(|t| t["status"] == "done")
    })
    .await;
    assert_eq!(trace["chains"][0]["name"], "welcome", "{trace:#}");
    let mut event = trace["event"].clone();
    assert_eq!(event["id"], id, "{trace:#}");
    for field in ["id", "root_id"] {
        event.as_object_mut().expect("an event").remove(field);
    }
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_in_every_mode_run_the_same_chain() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", CHAINS).await;

    // Structured mode over HTTP: one, then a batch of two.
    let one = uuid();
    let (status, answer) = post(
        &d,
        "application/cloudevents+json",
        &cloudevent(&one, "+27820000001"),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["id"], one.as_str());
    let reference = handled(&d, &one).await;
    assert_eq!(reference["account_key"], "acme");
    assert_eq!(reference["conversation_type"], "survey");
    assert_eq!(reference["event_type"], "signed_up");
    assert_eq!(reference["conversation_key"], "poll-2026");
    assert_eq!(reference["event_data"], json!({ "msisdn": "+27820000001" }));
    assert_eq!(reference["occurred_at"], "2026-12-03T10:00:00Z");

    let batch = [uuid(), uuid()];
    let (status, answer) = post(
        &d,
        "application/cloudevents-batch+json; charset=utf-8",
        &json!([
            cloudevent(&batch[0], "+27820000001"),
            cloudevent(&batch[1], "+27820000001")
        ]),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"][1]["id"], batch[1].as_str(), "{answer}");
    for id in &batch {
        assert_eq!(handled(&d, id).await, reference);
    }
    // Sent again: the same event, a duplicate on the bus.
    let (_, again) = post(
        &d,
        "application/cloudevents+json",
        &cloudevent(&one, "+27820000001"),
    )
    .await;
    assert_eq!(again["duplicate"], true, "{again}");

    // Binary and structured mode on NATS.
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client.clone());
    let subject = "vumi.events.acme.survey.signed_up";
    let binary = uuid();
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", binary.as_str()),
        ("ce-source", "urn:example:survey"),
        ("ce-type", "com.example.survey.signed_up"),
        ("ce-subject", "poll-2026"),
        ("ce-time", "2026-12-03T10:00:00Z"),
        ("content-type", "application/json"),
    ] {
        headers.insert(name, value);
    }
    js.publish_with_headers(
        subject,
        headers,
        json!({ "msisdn": "+27820000001" }).to_string().into(),
    )
    .await
    .expect("publishing")
    .await
    .expect("stored");
    assert_eq!(handled(&d, &binary).await, reference);

    let structured = uuid();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("content-type", "application/cloudevents+json");
    js.publish_with_headers(
        subject,
        headers,
        cloudevent(&structured, "+27820000001").to_string().into(),
    )
    .await
    .expect("publishing")
    .await
    .expect("stored");
    assert_eq!(handled(&d, &structured).await, reference);

    // Invalid: answered 400 over HTTP, dead-lettered from NATS, naming the
    // attribute.
    let mut typeless = cloudevent(&uuid(), "+27820000001");
    typeless.as_object_mut().expect("an object").remove("type");
    let (status, answer) = post(&d, "application/cloudevents+json", &typeless).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_cloudevent", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("`type`"), "{answer}");
    let (status, answer) = post(
        &d,
        "application/cloudevents-batch+json",
        &json!([cloudevent(&uuid(), "+27820000001"), typeless]),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("[1]") && message.contains("`type`"),
        "{answer}"
    );

    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "no-type-1"),
        ("ce-source", "/apps/survey"),
        ("ce-subject", "poll-2026"),
    ] {
        headers.insert(name, value);
    }
    js.publish_with_headers(subject, headers, "{}".into())
        .await
        .expect("publishing")
        .await
        .expect("stored");
    let letter = d
        .wait_for_dead_letter("acme", "the CloudEvent without a type", |l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("CloudEvent attribute `type`"))
        })
        .await;
    assert_eq!(letter["reason"], "poison", "{letter:#}");
    assert_eq!(letter["subject"], subject, "{letter:#}");

    // A time that is past the year 9999 once in UTC is no time: refused
    // over HTTP, and from NATS filed as poison while the next event is
    // handled (it once stopped the consume loop).
    let mut far = cloudevent(&uuid(), "+27820000001");
    far["time"] = json!("9999-12-31T23:59:59-01:00");
    let (status, answer) = post(&d, "application/cloudevents+json", &far).await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`time`") && message.contains("years 0000 to 9999"),
        "{answer}"
    );
    js.publish(subject, serde_json::to_vec(&far).expect("JSON").into())
        .await
        .expect("publishing")
        .await
        .expect("stored");
    d.wait_for_dead_letter("acme", "the CloudEvent from past the year 9999", |l| {
        l["error"]
            .as_str()
            .is_some_and(|e| e.contains("years 0000 to 9999"))
    })
    .await;
    let after = cloudevent(&uuid(), "+27820000001");
    js.publish(subject, serde_json::to_vec(&after).expect("JSON").into())
        .await
        .expect("publishing")
        .await
        .expect("stored");
    let id = after["id"].as_str().expect("an id").to_string();
    handled(&d, &id).await;
}

/// With `bus.publish_cloudevents`, events go on the stream as binary-mode
/// CloudEvents that consumers read (`ce-` headers, the data as the
/// payload), and the dispatcher handles them as before, lineage and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_published_as_cloudevents_when_the_deployment_asks() {
    let nats = NatsServer::start();
    let d = Dispatcher::with_config(Some(&nats), "[bus]\npublish_cloudevents = true\n");
    d.apply_chains("acme.toml", CHAINS).await;
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let mut seen = client
        .subscribe("vumi.events.acme.survey.thanked")
        .await
        .expect("a subscription");
    client.flush().await.expect("subscribed");

    let e = crate::util::event(
        "acme",
        "survey",
        "signed_up",
        "poll-2026",
        json!({ "msisdn": "+27820000002" }),
    );
    let id = d.post_event(&serde_json::to_value(&e).expect("JSON")).await;
    let trace = wait_until("the parent's end", TIMEOUT, || async {
        d.trace("acme", &id).await.filter(|t| t["status"] == "done")
    })
    .await;
    let child = trace["chains"][0]["steps"][1]["output"]["event_id"]
        .as_str()
        .expect("the emitted event's id")
        .to_string();

    let message = tokio::time::timeout(TIMEOUT, seen.next())
        .await
        .expect("the child on the stream in time")
        .expect("a message");
    let headers = message.headers.expect("CloudEvents headers");
    let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(header("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(header("ce-id").as_deref(), Some(child.as_str()));
    assert_eq!(header("ce-type").as_deref(), Some("thanked"));
    assert_eq!(header("ce-subject").as_deref(), Some("poll-2026"));
    assert_eq!(header("ce-parentid").as_deref(), Some(id.as_str()));
    assert_eq!(header("ce-depth").as_deref(), Some("1"));
    let data: Value = serde_json::from_slice(&message.payload).expect("JSON data");
    assert_eq!(data, json!({ "msisdn": "+27820000002" }));

    // The dispatcher read it back: the child's trace, with its lineage.
    let trace = wait_until("the child's trace", TIMEOUT, || async {
        d.trace("acme", &child).await
    })
    .await;
    assert_eq!(trace["event"]["parent_id"], id.as_str(), "{trace:#}");
    assert_eq!(trace["event"]["depth"], 1, "{trace:#}");
    assert_eq!(trace["event"]["event_data"]["msisdn"], "+27820000002");
}
