//! Several dispatcher replicas on one three-node JetStream cluster, sharing
//! state through the `switchboard` key-value bucket (`bus.replicated`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt as _;
use serde_json::{Value, json};
use switchboard_sdk::nats::NatsEmitter;
use switchboard_sdk::{EventId, VumiApiEvent};

use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{Dispatcher, NatsCluster, event, wait_until};

fn config(receiver: &HttpReceiver) -> String {
    format!(
        r#"
[bus]
replicated = true
stream_replicas = 3
# Redeliver what a killed replica held after 3 s instead of 30.
ack_wait_secs = 3

[limits]
concurrency = 8

[providers.sms.gateway]
type = "http"
url = "{}/sms"
from = "Switchboard"
"#,
        receiver.url()
    )
}

/// `create_contact` → `payment_webhook`, and a `log` step whose message
/// names the chain version (`tag`).
fn chains(receiver: &HttpReceiver, tag: &str) -> String {
    let recv = receiver.url();
    format!(
        r#"
account_key = "acme"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }}

[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{recv}/hook/200", secret = "gateway", body = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}" }} }}
retry = {{ max_attempts = 20, initial = "100ms", max = "1s" }}

[[chains.steps]]
handler = "log"
config = {{ message = "{tag}" }}
"#
    )
}

fn events(n: usize, numbers: usize) -> Vec<VumiApiEvent> {
    (0..n)
        .map(|i| {
            event(
                "acme",
                "survey",
                "poll_complete",
                &format!("poll-{}", i % 40),
                json!({"msisdn": format!("+2782{:07}", i % numbers)}),
            )
        })
        .collect()
}

async fn emit_all(url: &str, events: &[VumiApiEvent]) {
    let client = async_nats::connect(url).await.expect("a NATS connection");
    let emitter = NatsEmitter::new(client).with_attempts(30);
    futures::stream::iter(events)
        .for_each_concurrent(32, |e| {
            let emitter = emitter.clone();
            async move {
                emitter.emit(e).await.expect("stored by the cluster");
            }
        })
        .await;
}

/// Every contact of `acme`, as a replica's API lists them.
async fn contacts(d: &Dispatcher) -> Vec<Value> {
    let (status, body) = d.get("/v1/accounts/acme/contacts?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    body["contacts"].as_array().expect("contacts").clone()
}

/// The chain version a replica's API reports as current.
async fn version_at(d: &Dispatcher) -> Option<u64> {
    let (status, body) = d.get("/v1/accounts/acme/chains").await;
    (status == 200).then(|| body["version"].as_u64()).flatten()
}

/// Three replicas, one on each node of a three-node cluster. A chain applied
/// through replica 0 reaches the others within a bounded delay; one replica
/// is killed (SIGKILL) mid-run and one NATS node with it; every chain still
/// completes once, each webhook arrives under its stable id, contacts stay
/// unique per msisdn although several replicas upsert the same numbers at
/// once, and a replica started afterwards catches up before it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_state_and_survive_losing_a_replica_and_a_node() {
    let mut cluster = NatsCluster::start(3).await;
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let config = config(&receiver);
    let mut replicas: Vec<Dispatcher> = (0..3)
        .map(|i| Dispatcher::nats_url(&cluster.url(i), &config))
        .collect();

    // The shared state lives in an R3 bucket.
    let client = async_nats::connect(cluster.url(1))
        .await
        .expect("a connection to node 1");
    let js = jetstream::new(client);
    let mut bucket = js.get_stream("KV_switchboard").await.expect("the bucket");
    let info = bucket.info().await.expect("its info");
    assert_eq!(info.config.num_replicas, 3);
    assert!(info.config.allow_atomic_publish);

    // A secret and a chain set through replica 0 are used by the others.
    let set = replicas[0]
        .cli(&[
            "secrets",
            "set",
            "acme",
            "gateway",
            "--value",
            WEBHOOK_SECRET,
        ])
        .await;
    set.ok();
    let v1 = replicas[0]
        .apply_chains("acme.toml", &chains(&receiver, "first"))
        .await;
    let applied = Instant::now();
    let v2 = replicas[0]
        .apply_chains("acme.toml", &chains(&receiver, "second"))
        .await;
    assert_eq!(v2, v1 + 1, "versions continue across the shared history");
    let mut delays = Vec::new();
    for d in &replicas[1..] {
        wait_until(
            "the chain on every replica",
            Duration::from_secs(10),
            || async { (version_at(d).await == Some(v2)).then_some(()) },
        )
        .await;
        delays.push(applied.elapsed());
    }
    eprintln!("replicas: chain version {v2} seen by replicas 1 and 2 after {delays:?}");

    // 600 events over 40 conversations, 150 numbers: four events per
    // contact, in different conversations, so often handled by different
    // replicas at once.
    let sent = events(600, 150);
    let emitting = {
        let url = cluster.url(1);
        let sent = sent.clone();
        tokio::spawn(async move { emit_all(&url, &sent).await })
    };
    wait_until(
        "a third of the webhooks",
        Duration::from_secs(120),
        || async { (receiver.count().await >= 200).then_some(()) },
    )
    .await;
    replicas[2].kill9();
    cluster.kill(2);
    emitting.await.expect("the publisher");

    // Every chain completes: the trace (shared: any replica answers) says
    // done, with the version applied last.
    let d = &replicas[0];
    futures::stream::iter(&sent)
        .for_each_concurrent(16, |e| async move {
            let trace = d
                .wait_for_trace("acme", &e.id.to_string(), Duration::from_secs(120))
                .await;
            assert_eq!(trace["status"], "done", "{trace:#}");
            assert_eq!(trace["chains"][0]["version"], v2, "{trace:#}");
        })
        .await;

    // Each webhook arrived under its stable id. Raw repeats are bounded by
    // the steps in flight at the kills: the killed replica's, and, while the
    // lost node's streams elect new leaders, those of every replica whose
    // journal write failed meanwhile (3 replicas × 8 workers).
    let expected: HashSet<String> = sent
        .iter()
        .map(|e| {
            let id = EventId::derived(e.id, "poll-complete", "payment_webhook", 0);
            format!("msg_{}", id.as_uuid().simple())
        })
        .collect();
    let requests = receiver.requests().await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in requests.iter().filter(|r| r["path"] == "/hook/200") {
        let id = r["headers"]["webhook-id"].as_str().expect("a webhook-id");
        *seen.entry(id.to_string()).or_default() += 1;
        assert_eq!(r["verified"], true, "signed with the shared secret: {r:#}");
    }
    let ids: HashSet<String> = seen.keys().cloned().collect();
    assert_eq!(ids, expected, "one webhook per event, no other");
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("replicas: 600 events, a replica and a node killed; raw webhook repeats: {repeats}");
    assert!(
        repeats <= 3 * 8,
        "{repeats} repeats: more than the 24 steps in flight at the kills"
    );

    // Contacts are unique per msisdn across replicas.
    let all = contacts(&replicas[1]).await;
    let numbers: HashSet<&str> = all
        .iter()
        .map(|c| c["msisdn"].as_str().expect("an msisdn"))
        .collect();
    assert_eq!(numbers.len(), 150);
    assert_eq!(all.len(), 150, "one contact per msisdn");

    // A replica started now catches up before it serves: it sees the same
    // contacts and traces, and says it is ready.
    let late = Dispatcher::nats_url(&cluster.url(0), &config);
    let (status, ready) = late.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["caught_up"], true, "{ready}");
    assert_eq!(ready["replicated"], true, "{ready}");
    let keys = |list: &[Value]| -> HashSet<String> {
        list.iter()
            .map(|c| c["key"].as_str().expect("a key").to_string())
            .collect()
    };
    assert_eq!(keys(&contacts(&late).await), keys(&all));
    let trace = late.trace("acme", &sent[599].id.to_string()).await;
    assert_eq!(trace.expect("the trace")["status"], "done");
    assert_eq!(version_at(&late).await, Some(v2));
}
