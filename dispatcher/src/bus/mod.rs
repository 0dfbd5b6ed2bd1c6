//! Buses carry events from publishers to the executor, at least once.
//!
//! Two implement [`Bus`]: NATS JetStream (production, many replicas) and the
//! embedded bus (one process, durable in the store). The executor does not know
//! which one it runs on: it takes [`Delivery`]s, handles them and acks.

use std::time::Duration;

use bytes::Bytes;
use switchboard_sdk::VumiApiEvent;

use crate::dead_letters::DeadLetter;
use tokio::sync::{mpsc, watch};

pub mod embedded;
pub mod nats;
pub mod partitions;
mod pull;
mod puller;

pub use embedded::EmbeddedBus;
pub use nats::NatsBus;

/// A bus failure.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus cannot be reached or set up.
    #[error("{0}")]
    Unavailable(String),
    /// The store under the embedded bus failed.
    #[error(transparent)]
    Store(#[from] switchboard_store::StoreError),
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

/// One message handed to the executor. It must be acked once handled, or
/// nakked to be delivered again; one dropped without either is redelivered by
/// the bus after its ack timeout (NATS) or after a restart (embedded).
#[derive(Debug)]
pub struct Delivery {
    /// The subject it was published on.
    pub subject: String,
    /// The raw payload.
    pub payload: Bytes,
    /// 1 for the first delivery.
    pub attempt: u32,
    /// The message's position on the bus: later publishes have larger ones.
    pub seq: u64,
    /// Which delivery of its consumer this is (NATS; 0 on the embedded bus).
    delivery_seq: u64,
    acker: Acker,
    /// Counts the delivery among its partition's until it is settled.
    _in_flight: Option<InFlight>,
}

/// One delivery of a partition not settled yet: counted while it lives.
#[derive(Debug)]
struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn new(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Debug)]
enum Acker {
    Embedded(embedded::Acker),
    Nats(Box<async_nats::jetstream::Message>),
}

impl Delivery {
    /// Done with: never deliver again.
    pub async fn ack(self) -> Result<(), BusError> {
        match self.acker {
            Acker::Embedded(a) => a.ack(),
            Acker::Nats(m) => m
                .ack()
                .await
                .map_err(|e| BusError::Unavailable(format!("acking {}: {e}", self.subject))),
        }
    }

    /// Not done: deliver again, after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        match self.acker {
            Acker::Embedded(a) => {
                a.nak(delay, self.attempt);
                Ok(())
            }
            // A plain nak puts the message on the consumer's redelivery queue
            // at once, in nak order; one with a delay is redelivered when a
            // server timer finds it due, in no particular order among those
            // due together.
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Nak(
                    (!delay.is_zero()).then_some(delay),
                ))
                .await
                .map_err(|e| BusError::Unavailable(format!("nakking {}: {e}", self.subject))),
        }
    }

    /// Still working on it: do not redeliver yet.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Embedded(_) => Ok(()),
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Progress)
                .await
                .map_err(|e| BusError::Unavailable(format!("extending {}: {e}", self.subject))),
        }
    }
}
