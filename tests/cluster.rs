//! The dispatcher on a three-node JetStream cluster: the topology several
//! replicas run on.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use serde_json::json;
use switchboard_sdk::nats::NatsEmitter;

use crate::util::{Dispatcher, NatsCluster, event, wait_until};

const CHAINS: &str = r#"account_key = "acme"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"
config = { message = "{{ event.event_data.n }}" }
"#;

/// With `bus.stream_replicas = 3`, every stream the dispatcher makes is kept
/// on all three servers, so killing the server the dispatcher is connected
/// to (mid-run, SIGKILL) loses no event: it reconnects to another server of
/// the cluster, which it learnt from the first, and goes on.
#[tokio::test]
async fn on_a_three_node_cluster_losing_the_dispatchers_server_loses_no_event() {
    let mut cluster = NatsCluster::start(3).await;
    // A short ack wait: deliveries whose acks died with the server come
    // back after it.
    let d = Dispatcher::nats_url(
        &cluster.url(0),
        "[bus]\nstream_replicas = 3\nack_wait_secs = 3\n",
    );
    d.apply_chains("acme.toml", CHAINS).await;

    let client = async_nats::connect(cluster.url(1))
        .await
        .expect("a connection to node 1");
    let js = jetstream::new(client.clone());
    for name in ["VUMI_EVENTS", "VUMI_DEAD_LETTERS", "VUMI_OUTBOUND"] {
        // A stream just made on a cluster answers once its group has a
        // leader; on a loaded machine that can take a moment.
        let info = wait_until(
            &format!("{name}'s info from the cluster"),
            Duration::from_secs(30),
            || async {
                let mut stream = js.get_stream(name).await.ok()?;
                stream.info().await.ok().cloned()
            },
        )
        .await;
        assert_eq!(info.config.num_replicas, 3, "{name}");
        let peers = info.cluster.as_ref().expect("cluster info").replicas.len();
        assert_eq!(peers, 2, "{name}: a leader and two replicas");
    }

    let emitter = NatsEmitter::new(client).with_attempts(20);
    let events: Vec<_> = (0..400)
        .map(|n| {
            event(
                "acme",
                "survey",
                "poll_complete",
                &format!("poll-{}", n % 20),
                json!({"n": n}),
            )
        })
        .collect();
    for (n, e) in events.iter().enumerate() {
        if n == 150 {
            cluster.kill(0);
        }
        emitter.emit(e).await.expect("stored by the cluster");
    }

    // Every event is handled: its trace says done.
    let d = &d;
    futures::stream::iter(&events)
        .for_each_concurrent(16, |e| async move {
            let trace = d
                .wait_for_trace("acme", &e.id.to_string(), Duration::from_secs(60))
                .await;
            assert_eq!(trace["status"], "done", "{trace}");
        })
        .await;
    // At least once: an ack lost with the server makes a redelivery.
    wait_until(
        "every event counted as handled",
        Duration::from_secs(10),
        || async { (d.metric("handled", "acme").await >= 400).then_some(()) },
    )
    .await;
    assert_eq!(d.metric("dead_lettered", "acme").await, 0);
    assert_eq!(d.metric("unrouted", "acme").await, 0);
}
