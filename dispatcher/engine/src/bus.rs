//! The bus, as the engine sees it: ports that carry events from
//! publishers to the executor, at least once.
//!
//! The buses themselves (NATS JetStream, the embedded bus) live in the
//! `switchboard-bus` crate and implement [`Bus`]; a delivery carries its
//! bus's way of settling it as a [`Settle`]. The engine does not know which
//! bus it runs on: it takes [`Delivery`]s, handles them and acks.

use std::time::Duration;

use bytes::Bytes;
use switchboard_sdk::VumiApiEvent;

use crate::dead_letters::DeadLetter;
use tokio::sync::{mpsc, watch};

/// A bus failure.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus cannot be reached or set up.
    #[error("{0}")]
    Unavailable(String),
    /// The store under the embedded bus failed.
    #[error("{0}")]
    Store(#[from] switchboard_store::StoreError),
    /// Other dispatchers consume the bus in a way this one cannot run
    /// beside (a single dispatcher and replicas, or two single
    /// dispatchers): it would handle their events again.
    #[error("{0}")]
    InUse(String),
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// True when the bus already had an event with this id.
    pub duplicate: bool,
}

/// A bus.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + std::fmt::Debug {
    /// Publishes an event, durably; an id seen within the duplicate window is dropped.
    async fn publish(&self, event: &VumiApiEvent) -> Result<Published, BusError> {
        self.publish_as(event, &event.id.to_string()).await
    }

    /// Publishes an event under the duplicate-detection id `dedup_id` instead
    /// of its own id (a replay puts an event back on the bus this way).
    async fn publish_as(&self, event: &VumiApiEvent, dedup_id: &str)
    -> Result<Published, BusError>;

    /// Puts a dead letter on the bus's dead-letter stream, if it has one (the
    /// embedded bus keeps dead letters in the store only). Publishing the same
    /// letter again within the duplicate window stores it once.
    async fn announce_dead_letter(&self, _letter: &DeadLetter) -> Result<(), BusError> {
        Ok(())
    }

    /// Starts consuming. Deliveries arrive in bus order; the channel holds at
    /// most `capacity` of them, so a busy executor slows the bus down rather
    /// than piling up messages. Call once.
    ///
    /// When `stop` turns true the bus stops taking messages off the bus,
    /// sends what it already took (so that the caller can give it back in
    /// order) and closes the channel.
    async fn consume(
        &self,
        capacity: usize,
        stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<Delivery>, BusError>;

    /// Messages not yet handled: waiting to be delivered, or delivered and
    /// not yet acked. `None` when the bus cannot tell right now.
    async fn lag(&self) -> Option<u64>;

    /// After a stop, waits until the bus will not offer messages to this
    /// process any more, so that messages given back go to the next consumer
    /// in the order they are given back.
    async fn quiesce(&self) {}

    /// After the last deliveries were given back: lets other replicas take
    /// over what this one consumed (NATS with partitions unpins this
    /// replica's partitions), so that they need not wait for it to time out.
    async fn hand_over(&self) {}

    /// Sends whatever acks and naks the client still buffers (NATS acks are
    /// fire-and-forget publishes): called before the process exits.
    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Whether the bus is connected and usable.
    fn is_ready(&self) -> bool;

    /// `nats` or `embedded`.
    fn kind(&self) -> &'static str;

    /// How long a delivery may go unacked before the bus delivers it again,
    /// if the bus does that while the process lives. The executor reports
    /// progress well within it while a step runs.
    fn ack_wait(&self) -> Option<Duration> {
        None
    }
}

/// How a bus settles one of its deliveries.
#[async_trait::async_trait]
pub trait Settle: Send + Sync + std::fmt::Debug {
    /// Done with: never deliver again.
    async fn ack(self: Box<Self>) -> Result<(), BusError>;

    /// Not done: deliver again, after `delay`.
    async fn nak(self: Box<Self>, delay: Duration) -> Result<(), BusError>;

    /// Still working on it: do not redeliver yet.
    async fn in_progress(&self) -> Result<(), BusError>;
}

/// One message handed to the executor. It must be acked once handled, or
/// nakked to be delivered again; one dropped without either is redelivered by
/// the bus after its ack timeout (NATS) or after a restart (embedded).
#[derive(Debug)]
pub struct Delivery {
    /// The subject it was published on.
    pub subject: String,
    /// The account its subject names, if a valid one (poison is filed
    /// under it).
    pub account: Option<String>,
    /// The raw payload.
    pub payload: Bytes,
    /// 1 for the first delivery.
    pub attempt: u32,
    /// The message's position on the bus: later publishes have larger ones.
    pub seq: u64,
    /// When the bus stored the message (ms since the epoch), when it says.
    pub published_ms: Option<u64>,
    /// The headers the engine reads: a binary-mode CloudEvent's (`ce-`
    /// attributes and `content-type`) and the W3C trace context
    /// (`traceparent`, `tracestate`).
    pub headers: Vec<(String, String)>,
    settle: Box<dyn Settle>,
}

impl Delivery {
    /// A delivery its bus settles through `settle`.
    pub fn new(
        subject: String,
        account: Option<String>,
        payload: Bytes,
        attempt: u32,
        seq: u64,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            subject,
            account,
            payload,
            attempt,
            seq,
            published_ms: None,
            headers: Vec::new(),
            settle,
        }
    }

    /// The same delivery, stored by the bus at `ms` (since the epoch).
    pub fn published_at(mut self, ms: u64) -> Self {
        self.published_ms = Some(ms);
        self
    }

    /// The same delivery, with the headers it came with that the engine
    /// reads (see [`Delivery::headers`]).
    pub fn with_headers(mut self, headers: Vec<(String, String)>) -> Self {
        self.headers = headers;
        self
    }

    /// Done with: never deliver again.
    pub async fn ack(self) -> Result<(), BusError> {
        self.settle.ack().await
    }

    /// Not done: deliver again, after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        self.settle.nak(delay).await
    }

    /// Still working on it: do not redeliver yet.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.settle.in_progress().await
    }
}
