//! The NATS JetStream bus: stream `VUMI_EVENTS` (subjects `{prefix}.events.>`,
//! a two-minute duplicate window) and the durable pull consumer `switchboard`
//! with explicit acks, shared by every dispatcher replica.

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, RequestErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use switchboard_sdk::VumiApiEvent;
use switchboard_sdk::nats::{NatsEmitter, events_stream_config, stream_name};
use tokio::sync::{mpsc, watch};

use super::{Acker, Bus, BusError, Delivery, Published};
use crate::records::DeadLetter;

/// The durable consumer that dispatcher replicas share.
pub const CONSUMER: &str = "switchboard";
/// How long one pull request of the consumer lasts. Short, because a
/// stopping dispatcher's last request outlives it on the server: a message
/// given back (nakked) while it lasts is offered to it, found undeliverable and
/// put at the back of the redelivery queue — out of order. So the nakking
/// waits until it has expired ([`Bus::quiesce`]).
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// How long a delivered message may stay unacked before JetStream redelivers
/// it, unless the dispatcher says it is still working on it.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Records when the pull ended, when dropped.
struct PullEnded(watch::Sender<Option<tokio::time::Instant>>);

impl Drop for PullEnded {
    fn drop(&mut self) {
        self.0.send_replace(Some(tokio::time::Instant::now()));
    }
}

/// A pulled message as a delivery; `None` for an error of the pull itself.
fn delivery_of(
    next: Result<jetstream::Message, jetstream::consumer::pull::MessagesError>,
) -> Option<Delivery> {
    let message = match next {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "NATS pull consumer");
            return None;
        }
    };
    let (attempt, seq) = message
        .info()
        .map(|i| (i.delivered.max(1) as u32, i.stream_sequence))
        .unwrap_or((1, 0));
    Some(Delivery {
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        attempt,
        seq,
        acker: Acker::Nats(Box::new(message)),
    })
}

/// The dead-letter stream: `VUMI_DEAD_LETTERS`, subjects `{prefix}.dead.{account}`.
/// Every filing is kept there for 30 days, for alerting and audit; listing,
/// replaying and discarding work on the dispatcher's dead-letter index.
pub fn dead_letters_stream_config(prefix: &str) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: stream_name(prefix, "VUMI_DEAD_LETTERS"),
        subjects: vec![format!("{prefix}.dead.>")],
        duplicate_window: switchboard_sdk::nats::DUPLICATE_WINDOW,
        max_age: Duration::from_secs(30 * 24 * 3600),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// How long [`ensure_stream`] keeps asking a server that does not answer.
pub const CREATE_PATIENCE: Duration = Duration::from_secs(30);

/// Creates the stream `config` describes unless it exists. One that exists
/// is used as it is: a replica count other than the configured one is only
/// reported (change it with `nats stream edit NAME --replicas N`).
///
/// A request the server does not answer in time is tried again for up to
/// [`CREATE_PATIENCE`]: a cluster that has just started (or lost a node) may
/// still be electing the leaders that answer it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
) -> Result<(), String> {
    let name = config.name.clone();
    let wanted = config.num_replicas.max(1);
    let deadline = tokio::time::Instant::now() + CREATE_PATIENCE;
    let patient = || tokio::time::Instant::now() < deadline;
    let info = loop {
        let mut stream = match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => stream,
            Err(e) if matches!(e.kind(), CreateStreamErrorKind::TimedOut) && patient() => {
                tracing::warn!(stream = %name, "creating the stream timed out; trying again");
                continue;
            }
            Err(e) => return Err(format!("creating stream {name}: {e}")),
        };
        match stream.info().await {
            Ok(info) => break info.clone(),
            Err(e) if matches!(e.kind(), RequestErrorKind::TimedOut) && patient() => {
                tracing::warn!(stream = %name, "reading the stream timed out; trying again");
            }
            Err(e) => return Err(format!("reading stream {name}: {e}")),
        }
    };
    let kept = info.config.num_replicas.max(1);
    if kept != wanted {
        tracing::warn!(stream = %name, replicas = kept, configured = wanted,
            "the stream exists with another replica count than bus.stream_replicas; it is used as it is");
    }
    Ok(())
}

/// The NATS JetStream bus.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    emitter: NatsEmitter,
    prefix: String,
    max_ack_pending: i64,
    ack_wait: Duration,
    /// When the pull stopped (set once consuming ends).
    pull_stopped: watch::Sender<Option<tokio::time::Instant>>,
}

impl NatsBus {
    /// Connects to `url` and makes sure the events and dead-letter streams
    /// exist, kept on `replicas` servers of the cluster.
    pub async fn connect(
        url: &str,
        prefix: &str,
        max_bytes: usize,
        max_ack_pending: usize,
        ack_wait: Duration,
        replicas: usize,
    ) -> Result<Self, BusError> {
        // Credentials in the URL become connect options; messages show the
        // URL without them.
        let (options, servers) = switchboard_sdk::nats::connect_options(url);
        let url = servers.to_string();
        let client = options
            .name("switchboard-dispatcher")
            .connection_timeout(Duration::from_secs(5))
            .connect(&servers)
            .await
            .map_err(|e| BusError::Unavailable(format!("connecting to NATS at {url}: {e}")))?;
        let js = jetstream::new(client.clone());
        let events = jetstream::stream::Config {
            num_replicas: replicas,
            ..events_stream_config(prefix)
        };
        ensure_stream(&js, events).await.map_err(|e| {
            BusError::Unavailable(format!(
                "{e} on {url} (is JetStream enabled? start nats-server with -js)"
            ))
        })?;
        let dead = jetstream::stream::Config {
            num_replicas: replicas,
            ..dead_letters_stream_config(prefix)
        };
        ensure_stream(&js, dead)
            .await
            .map_err(|e| BusError::Unavailable(format!("{e} on {url}")))?;
        let emitter = NatsEmitter::new(client.clone())
            .with_prefix(prefix)
            .with_max_bytes(max_bytes);
        Ok(Self {
            client,
            js,
            emitter,
            prefix: prefix.to_string(),
            max_ack_pending: max_ack_pending as i64,
            ack_wait,
            pull_stopped: watch::Sender::new(None),
        })
    }

    /// The client, for publishing commands and dead letters.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    async fn publish_as(
        &self,
        event: &VumiApiEvent,
        dedup_id: &str,
    ) -> Result<Published, BusError> {
        self.emitter
            .emit_as(event, dedup_id)
            .await
            .map(|e| Published {
                duplicate: e.duplicate,
            })
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn consume(
        &self,
        capacity: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<Delivery>, BusError> {
        let config = events_stream_config(&self.prefix);
        let stream =
            self.js.get_stream(&config.name).await.map_err(|e| {
                BusError::Unavailable(format!("opening stream {}: {e}", config.name))
            })?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_string()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: self.max_ack_pending,
                    filter_subject: format!("{}.events.>", self.prefix),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| BusError::Unavailable(format!("creating consumer {CONSUMER}: {e}")))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(capacity.clamp(1, 1024))
            .heartbeat(PULL_EXPIRES / 2)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| BusError::Unavailable(format!("pulling from consumer {CONSUMER}: {e}")))?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let batch = capacity.clamp(1, 1024);
        let pull_stopped = self.pull_stopped.clone();
        tokio::spawn(async move {
            // Marks the time the pull ends, on every way out, after the
            // stream (and its subscription) is gone.
            let _ended = PullEnded(pull_stopped);
            let mut messages = messages;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    next = messages.next() => next,
                };
                let Some(next) = next else { return };
                if let Some(delivery) = delivery_of(next)
                    && let Err(unsent) = tx.send(delivery).await
                {
                    // The dispatcher is gone: give the message straight back.
                    let _ = unsent.0.nak(Duration::ZERO).await;
                    return;
                }
            }
            // Stopping: hand over what the client already pulled, so that it
            // goes back to the bus now and in order, instead of waiting out
            // the ack wait. Bounded: the pull may ask the server for one
            // more batch while this drains.
            for _ in 0..2 * batch {
                match tokio::time::timeout(Duration::from_millis(100), messages.next()).await {
                    Ok(Some(next)) => {
                        if let Some(delivery) = delivery_of(next)
                            && let Err(unsent) = tx.send(delivery).await
                        {
                            let _ = unsent.0.nak(Duration::ZERO).await;
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        });
        Ok(rx)
    }

    async fn announce_dead_letter(&self, letter: &DeadLetter) -> Result<(), BusError> {
        let subject = format!("{}.dead.{}", self.prefix, letter.account_key);
        let payload = serde_json::to_vec(letter).expect("a dead letter serialises");
        let publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(letter.id.as_str());
        let failed = |e: &dyn std::fmt::Display| {
            BusError::Unavailable(format!(
                "publishing dead letter {} to {subject}: {e}",
                letter.id
            ))
        };
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| failed(&e))?;
        ack.await.map_err(|e| failed(&e))?;
        Ok(())
    }

    async fn quiesce(&self) {
        let mut stopped = self.pull_stopped.subscribe();
        let at = match stopped.wait_for(Option::is_some).await {
            Ok(at) => at.expect("waited for it"),
            Err(_) => return,
        };
        tokio::time::sleep_until(at + PULL_EXPIRES + Duration::from_millis(200)).await;
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.client
            .flush()
            .await
            .map_err(|e| BusError::Unavailable(format!("flushing the NATS connection: {e}")))
    }

    async fn lag(&self) -> Option<u64> {
        let name = events_stream_config(&self.prefix).name;
        let stream = self.js.get_stream(&name).await.ok()?;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(CONSUMER).await.ok()?;
        let info = consumer.info().await.ok()?;
        Some(info.num_pending + info.num_ack_pending as u64)
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn ack_wait(&self) -> Option<Duration> {
        Some(self.ack_wait)
    }
}
