//! Where the single dispatcher's consumer got to, kept in the dispatcher's
//! own store: so that consumer `switchboard` made anew (deleted by an
//! operator, or lost) starts after what this dispatcher handled instead of
//! at the stream's start, where every event older than the journal's
//! retention would run again.
//!
//! The mark is the consumer's ack floor (the last stream sequence up to
//! which every event was acked), read from the server every
//! [`KEEP_EVERY`] and at a stop, once the last acks are sent, with the
//! stream's creation time:
//! a stream made again (its sequences starting over) does not match it,
//! and its consumer starts at its start as before. An event acked after
//! the last mark is delivered again to a consumer made anew, and passed
//! over by its journal record, as any repeat.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use switchboard_store::{Collection, Store};
use tokio::sync::watch;

use crate::after_replicas::Start;

/// How often the mark is read and kept while the pull runs.
pub(crate) const KEEP_EVERY: Duration = Duration::from_secs(10);

/// How long the mark kept at a stop waits for the last acks to reach the
/// consumer.
const LAST_ACKS_WITHIN: Duration = Duration::from_millis(500);

/// Where consumer `consumer` of a stream got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// The stream's creation time, in ns since the epoch.
    stream_created_ns: i128,
    /// Its ack floor: every event up to this stream sequence was acked.
    through: u64,
}

impl Mark {
    fn encode(self) -> Vec<u8> {
        let mut v = self.stream_created_ns.to_be_bytes().to_vec();
        v.extend_from_slice(&self.through.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        Some(Self {
            stream_created_ns: i128::from_be_bytes(v.get(..16)?.try_into().ok()?),
            through: u64::from_be_bytes(v.get(16..24)?.try_into().ok()?),
        })
    }
}

/// The marks of the consumers this dispatcher pulls, in its store.
#[derive(Debug, Clone)]
pub(crate) struct Marks {
    store: Store,
}

impl Marks {
    pub(crate) fn new(store: Store) -> Self {
        Self { store }
    }

    fn read(&self, consumer: &str) -> Option<Mark> {
        match self.store.get(Collection::BusMarks, consumer.as_bytes()) {
            Ok(v) => v.as_deref().and_then(Mark::decode),
            Err(e) => {
                tracing::warn!(consumer, error = %e, "reading where the consumer got to failed");
                None
            }
        }
    }

    fn write(&self, consumer: &str, mark: Mark) {
        if let Err(e) = self
            .store
            .put(Collection::BusMarks, consumer.as_bytes(), &mark.encode())
        {
            tracing::warn!(consumer, error = %e, "keeping where the consumer got to failed");
        }
    }

    /// Where `consumer` starts if it is made now: after its mark, when it
    /// does not exist, `start` (of `after_replicas::single_start`) would
    /// start it at the stream's start, and the mark is of this stream.
    pub(crate) async fn starting(
        &self,
        stream: &jetstream::stream::Stream,
        consumer: &str,
        start: Start,
    ) -> Start {
        if start.handled.is_some() || start.policy != DeliverPolicy::All {
            return start;
        }
        let Some(mark) = self.read(consumer) else {
            return start;
        };
        use jetstream::context::ConsumerInfoErrorKind::NotFound;
        match stream.consumer_info(consumer).await {
            Err(e) if e.kind() == NotFound => {}
            // It exists (and goes on where it was), or cannot be read (and
            // its making fails the same way).
            _ => return start,
        }
        let created = match stream.get_info().await {
            Ok(info) => info.created.unix_timestamp_nanos(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the events stream (to place the consumer's start after its mark) failed");
                return start;
            }
        };
        if created != mark.stream_created_ns {
            tracing::info!(
                consumer,
                "the events stream was made again since this dispatcher last consumed it: consumer made anew starts at its start"
            );
            return start;
        }
        tracing::warn!(
            consumer,
            start_sequence = mark.through + 1,
            "consumer made anew (it was deleted or lost): it starts after what this dispatcher \
             handled, not at the stream's start"
        );
        Start {
            policy: DeliverPolicy::ByStartSequence {
                start_sequence: mark.through + 1,
            },
            handled: None,
        }
    }

    /// Reads `consumer`'s ack floor and keeps it, if it moved on; with
    /// `settled_within`, reading it again meanwhile while acks are pending
    /// (the last ones sent may not have reached it yet).
    async fn keep_once(
        &self,
        stream: &jetstream::stream::Stream,
        consumer: &str,
        settled_within: Option<Duration>,
    ) {
        let read = || async {
            tokio::try_join!(
                async { stream.get_info().await.map_err(|e| e.to_string()) },
                async {
                    stream
                        .consumer_info(consumer)
                        .await
                        .map_err(|e| e.to_string())
                },
            )
        };
        let mut infos = read().await;
        if let Some(within) = settled_within {
            let until = tokio::time::Instant::now() + within;
            while infos
                .as_ref()
                .is_ok_and(|(_, c)| c.num_ack_pending > 0 && tokio::time::Instant::now() < until)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                infos = read().await;
            }
        }
        let (stream_info, consumer_info) = match infos {
            Ok(infos) => infos,
            // A consumer or stream gone meanwhile is read at the next
            // turn, made anew.
            Err(e) => {
                tracing::debug!(consumer, error = %e, "reading the consumer's ack floor failed");
                return;
            }
        };
        let mark = Mark {
            stream_created_ns: stream_info.created.unix_timestamp_nanos(),
            through: consumer_info.ack_floor.stream_sequence,
        };
        let kept = self.read(consumer);
        let moved_on = match kept {
            Some(kept) if kept.stream_created_ns == mark.stream_created_ns => {
                mark.through > kept.through
            }
            _ => mark.through > 0,
        };
        if moved_on {
            self.write(consumer, mark);
        }
    }

    /// Keeps `consumer`'s mark every [`KEEP_EVERY`] until `stop`.
    pub(crate) async fn keep(
        self,
        stream: jetstream::stream::Stream,
        consumer: String,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut every = tokio::time::interval(KEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopped = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = stopped => return,
                _ = every.tick() => {}
            }
            self.keep_once(&stream, &consumer, None).await;
        }
    }

    /// Keeps `consumer`'s mark once more and makes it durable (at the stop,
    /// the last acks sent).
    pub(crate) async fn keep_last(&self, stream: &jetstream::stream::Stream, consumer: &str) {
        self.keep_once(stream, consumer, Some(LAST_ACKS_WITHIN))
            .await;
        if let Err(e) = self.store.flush().await {
            tracing::warn!(consumer, error = %e, "making where the consumer got to durable failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Mark;

    #[test]
    fn a_mark_reads_as_written_and_a_short_one_not_at_all() {
        let mark = Mark {
            stream_created_ns: 1_765_000_000_123_456_789,
            through: 42,
        };
        let v = mark.encode();
        assert_eq!(Mark::decode(&v), Some(mark));
        assert_eq!(Mark::decode(&v[..23]), None);
    }
}
