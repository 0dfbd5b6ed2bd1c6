//! Regression: the NATS pull stalled. In some drains of a backlog the
//! dispatcher stopped taking events for about 7 s while thousands waited
//! (logging "missed idle heartbeat"), then went on: async-nats's pull
//! stream could count a batch it had already received as still due, and
//! waited for it with no request left on the server
//! (`dispatcher/src/bus/puller.rs` says how). The race needs a busy machine,
//! so the tests drain several backlogs, each by a freshly started
//! dispatcher, and fail on any pause in progress longer than a second
//! while events wait: of the single consumer, and of each partition's
//! pinned consumer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use serde_json::json;
use switchboard_bus::nats::{CONSUMER, partition_consumer, partition_transform};
use switchboard_bus::partitions::PARTITIONS;

use crate::util::{Dispatcher, NatsServer, event};

/// Events per backlog.
const EVENTS: usize = 10_000;
/// Conversations they are spread over.
const CONVERSATIONS: usize = 500;
/// Accounts the conversations belong to: enough to give every partition
/// some.
const ACCOUNTS: usize = 64;
/// The longest pause in progress allowed while events wait.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
/// How often the consumers are read.
const SAMPLE: Duration = Duration::from_millis(50);
/// A backlog takes at most this long to drain (a stall took 7 s).
const DRAIN_PATIENCE: Duration = Duration::from_secs(90);

fn account(i: usize) -> String {
    format!("stall-{i:02}")
}

/// One chain, one `log` step: routing only.
fn chains(account: &str) -> String {
    format!(
        r#"account_key = "{account}"

[[chains]]
name = "route"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"
config = {{ level = "debug", message = "{{{{ event.conversation_key }}}}" }}
"#
    )
}

/// A time a consumer's progress paused while events waited.
struct Pause {
    backlog: usize,
    consumer: String,
    /// Since the dispatcher was listening.
    at: Duration,
    length: Duration,
    /// Events not yet handled (pending + unacked) during the pause.
    waiting: u64,
}

impl std::fmt::Debug for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backlog {}, consumer {}: {:.2?} from {:.2?} after the start, {} events waiting",
            self.backlog, self.consumer, self.length, self.at, self.waiting
        )
    }
}

/// Each consumer's count of waiting events, as the test last read it.
#[derive(Default)]
struct Progress(BTreeMap<String, Reading>);

/// A count, when it was first read and when it was last read unchanged.
struct Reading {
    waiting: u64,
    first: Instant,
    last: Instant,
}

impl Progress {
    /// Records that `consumer` had `waiting` events `at`. When that is a
    /// change, returns since when the count had stood, for how long at
    /// least (from its first reading to its last: so a slow reading never
    /// makes a pause look longer than it was), and what it was.
    fn observe(
        &mut self,
        consumer: &str,
        waiting: u64,
        at: Instant,
    ) -> Option<(Instant, Duration, u64)> {
        let fresh = Reading {
            waiting,
            first: at,
            last: at,
        };
        let was = match self.0.get_mut(consumer) {
            Some(reading) if reading.waiting == waiting => {
                reading.last = at;
                return None;
            }
            Some(reading) => std::mem::replace(reading, fresh),
            None => {
                self.0.insert(consumer.to_string(), fresh);
                return None;
            }
        };
        Some((was.first, was.last.duration_since(was.first), was.waiting))
    }
}

/// The consumer of a dispatcher that does not share the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_stall_single_consumer_drains_backlogs_without_a_pause() {
    drain_backlogs(rounds(5), false).await;
}

/// The partitions' pinned consumers, pulled by one replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_stall_partitions_drain_backlogs_without_a_pause() {
    drain_backlogs(rounds(3), true).await;
}

/// Backlogs to drain: `short`, or four times as many with
/// `SWITCHBOARD_LONG_TESTS`. Before the fix the stall came in one drain in
/// ten to twenty on the two-core development machine: the two tests
/// together failed in about one short run in three, and in every long run
/// tried.
fn rounds(short: usize) -> usize {
    if crate::util::long_tests() {
        4 * short
    } else {
        short
    }
}

/// Drains `rounds` backlogs, each by a dispatcher started on it (one of
/// replicas sharing the bus with `replicated`); fails on any pause in any
/// consumer's progress longer than [`LONGEST_PAUSE`] while it had events
/// waiting.
async fn drain_backlogs(rounds: usize, replicated: bool) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    for i in 0..ACCOUNTS {
        let a = account(i);
        std::fs::write(dir.path().join(format!("{a}.toml")), chains(&a))
            .expect("writing a chain file");
    }
    let client = async_nats::connect(nats.url())
        .await
        .expect("a NATS connection");
    let js = jetstream::new(client);
    // The backlog is published before the first dispatcher makes the
    // stream, as that dispatcher would: partitioned for replicas.
    js.create_stream(jetstream::stream::Config {
        subject_transform: replicated.then(|| partition_transform("vumi")),
        ..switchboard_sdk::nats::events_stream_config("vumi")
    })
    .await
    .expect("the events stream");
    let consumers: Vec<String> = if replicated {
        (0..PARTITIONS).map(partition_consumer).collect()
    } else {
        vec![CONSUMER.to_string()]
    };
    let config = format!("[bus]\nreplicated = {replicated}\n");
    // The first account's events in each backlog: those of the
    // conversations `c` with `c % ACCOUNTS == 0`.
    let of_first_account = (0..EVENTS)
        .filter(|i| (i % CONVERSATIONS).is_multiple_of(ACCOUNTS))
        .count() as u64;

    let mut pauses = Vec::new();
    let mut took = Vec::new();
    for backlog in 0..rounds {
        publish_backlog(&js, backlog).await;
        let mut d = tokio::task::block_in_place(|| {
            Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path())
        });
        let started = Instant::now();
        let mut progress = Progress::default();
        loop {
            let stream = js
                .get_stream("VUMI_EVENTS")
                .await
                .expect("the events stream");
            // Read together, each with the time it was read.
            let readings = futures::future::join_all(consumers.iter().map(|name| {
                let stream = &stream;
                async move { (name, waiting(stream, name).await, Instant::now()) }
            }))
            .await;
            let (mut total, mut known) = (0, 0);
            for (name, waiting, at) in readings {
                let Some(waiting) = waiting else { continue };
                known += 1;
                total += waiting;
                if let Some((since, length, waited)) = progress.observe(name, waiting, at)
                    && length > LONGEST_PAUSE
                    && waited > 0
                {
                    pauses.push(Pause {
                        backlog,
                        consumer: name.clone(),
                        at: since.duration_since(started),
                        length,
                        waiting: waited,
                    });
                }
            }
            if known == consumers.len() && total == 0 {
                break;
            }
            assert!(
                started.elapsed() < DRAIN_PATIENCE,
                "backlog {backlog} not drained in {DRAIN_PATIENCE:?} ({total} waiting); pauses: {pauses:#?}\n{}",
                d.log()
            );
            tokio::time::sleep(SAMPLE).await;
        }
        took.push(started.elapsed());
        // Handled by the chain, not acked for another reason.
        assert_eq!(
            d.metric("handled", &account(0)).await,
            of_first_account,
            "backlog {backlog}\n{}",
            d.log()
        );
        assert_eq!(tokio::task::block_in_place(|| d.stop()), Some(0));
    }
    println!("{rounds} backlogs of {EVENTS} drained in {took:.2?}");
    assert!(
        pauses.is_empty(),
        "progress paused for longer than {LONGEST_PAUSE:?} while events waited: {pauses:#?}"
    );
}

/// Publishes a backlog of [`EVENTS`] over [`CONVERSATIONS`], with many
/// publishes awaiting their acks at once.
async fn publish_backlog(js: &jetstream::Context, backlog: usize) {
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..EVENTS {
        let conversation = i % CONVERSATIONS;
        let e = event(
            &account(conversation % ACCOUNTS),
            "survey",
            "poll_complete",
            &format!("talk-{conversation}"),
            json!({"backlog": backlog, "i": i}),
        );
        let message = PublishMessage::build()
            .payload(e.to_json().into())
            .message_id(e.id.to_string());
        let ack = js
            .send_publish(e.subject("vumi"), message)
            .await
            .expect("publishing an event");
        acks.push(ack.into_future());
        while acks.len() >= 1_024 {
            acks.next().await.expect("an ack").expect("stored");
        }
    }
    while let Some(ack) = acks.next().await {
        ack.expect("stored");
    }
}

/// Events consumer `name` has not had acked: pending plus unacked. `None`
/// before the dispatcher created it.
async fn waiting(stream: &jetstream::stream::Stream, name: &str) -> Option<u64> {
    let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(name).await.ok()?;
    let info = consumer.info().await.ok()?;
    Some(info.num_pending + info.num_ack_pending as u64)
}
