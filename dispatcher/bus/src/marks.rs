//! Where the single dispatcher's consumer got to, kept in the dispatcher's
//! own store: so that consumer `switchboard` made anew (deleted by an
//! operator, or lost) starts after what this dispatcher handled instead of
//! at the stream's start, where every event older than the journal's
//! retention would run again.
//!
//! The mark is the consumer's ack floor (the last stream sequence up to
//! which every event was acked), read from the server every
//! [`KEEP_EVERY`] and at a stop, once the last acks are sent, with the
//! stream's creation time and when the message at the floor was stored: a
//! stream made again (its sequences starting over), or restored from a
//! backup and written since (other messages at the same sequences), does
//! not match it, and its consumer starts at its start as before. An event acked after
//! the last mark is delivered again to a consumer made anew, and passed
//! over by its journal record, as any repeat.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use switchboard_engine::bus::BusError;
use switchboard_store::{Collection, Store, StoreError};
use tokio::sync::watch;

use crate::after_replicas::{self, Start};
use crate::nats::CONSUMER;

/// How often the mark is read and kept while the pull runs.
pub(crate) const KEEP_EVERY: Duration = Duration::from_secs(10);

/// How long the mark kept at a stop waits for the last acks to reach the
/// consumer (while its ack floor still moves).
const LAST_ACKS_WITHIN: Duration = Duration::from_millis(500);

/// How long the mark kept at a stop may take in all.
const LAST_MARK_WITHIN: Duration = Duration::from_secs(2);

/// Where consumer `consumer` of a stream got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// The stream's creation time, in ns since the epoch.
    stream_created_ns: i128,
    /// Its ack floor: every event up to this stream sequence was acked.
    through: u64,
    /// When the message at `through` was stored, in ns since the epoch (0:
    /// not known, it was gone): a stream restored from a backup, then
    /// written to, holds other messages at the same sequences.
    through_ns: i128,
}

impl Mark {
    fn encode(self) -> Vec<u8> {
        let mut v = self.stream_created_ns.to_be_bytes().to_vec();
        v.extend_from_slice(&self.through.to_be_bytes());
        v.extend_from_slice(&self.through_ns.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        Some(Self {
            stream_created_ns: i128::from_be_bytes(v.get(..16)?.try_into().ok()?),
            through: u64::from_be_bytes(v.get(16..24)?.try_into().ok()?),
            through_ns: i128::from_be_bytes(v.get(24..40)?.try_into().ok()?),
        })
    }
}

/// When the message at `seq` of `stream` was stored, in ns since the
/// epoch; 0 if it is gone (or `seq` is 0).
async fn stored_ns(stream: &jetstream::stream::Stream, seq: u64) -> Result<i128, String> {
    use jetstream::stream::LastRawMessageErrorKind::NoMessageFound;
    if seq == 0 {
        return Ok(0);
    }
    match stream.get_raw_message(seq).await {
        Ok(m) => Ok(m.time.unix_timestamp_nanos()),
        Err(e) if e.kind() == NoMessageFound => Ok(0),
        Err(e) => Err(format!("reading message {seq} of the events stream: {e}")),
    }
}

/// Where the single dispatcher's consumer starts if it is made now: as
/// [`after_replicas::single_start`] says, or after its mark in `marks`.
pub(crate) async fn single_start(
    stream: &jetstream::stream::Stream,
    marks: Option<&Marks>,
) -> Result<Start, BusError> {
    let start = after_replicas::single_start(stream).await?;
    match marks {
        Some(marks) => marks.starting(stream, CONSUMER, start).await,
        None => Ok(start),
    }
}

/// The marks of the consumers this dispatcher pulls, in its store.
#[derive(Debug, Clone)]
pub(crate) struct Marks {
    store: Store,
    /// Whether the mark was kept at the stop.
    kept_last: Arc<AtomicBool>,
}

impl Marks {
    pub(crate) fn new(store: Store) -> Self {
        Self {
            store,
            kept_last: Arc::default(),
        }
    }

    /// The mark kept for `consumer`; one that cannot be read is said and
    /// taken for none.
    fn read(&self, consumer: &str) -> Result<Option<Mark>, StoreError> {
        let Some(v) = self.store.get(Collection::BusMarks, consumer.as_bytes())? else {
            return Ok(None);
        };
        let mark = Mark::decode(&v);
        if mark.is_none() {
            tracing::error!(
                consumer,
                "where the consumer got to is kept unreadably: a consumer made anew starts at \
                 the stream's start"
            );
        }
        Ok(mark)
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
    /// start it at the stream's start, and the stream holds the messages
    /// the mark was taken on (made again, or restored from a backup and
    /// written since, it starts at its start). A read that fails fails the
    /// start (it is tried again), rather than replaying the stream from its
    /// start.
    async fn starting(
        &self,
        stream: &jetstream::stream::Stream,
        consumer: &str,
        start: Start,
    ) -> Result<Start, BusError> {
        if start.handled.is_some() || start.policy != DeliverPolicy::All {
            return Ok(start);
        }
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            BusError::Unavailable(format!(
                "{what} (to place consumer {consumer}'s start after its mark): {e}"
            ))
        };
        let Some(mark) = self
            .read(consumer)
            .map_err(|e| failed("reading its mark", &e))?
        else {
            return Ok(start);
        };
        use jetstream::context::ConsumerInfoErrorKind::NotFound;
        match stream.consumer_info(consumer).await {
            Err(e) if e.kind() == NotFound => {}
            // It exists, and goes on where it was.
            Ok(_) => return Ok(start),
            Err(e) => return Err(failed(&format!("reading consumer {consumer}"), &e)),
        }
        let info = stream
            .get_info()
            .await
            .map_err(|e| failed("reading the events stream", &e))?;
        if info.created.unix_timestamp_nanos() != mark.stream_created_ns {
            tracing::info!(
                consumer,
                "the events stream was made again since this dispatcher last consumed it: \
                 consumer made anew starts at its start"
            );
            return Ok(start);
        }
        // A stream restored from a backup keeps its creation time, and may
        // hold fewer messages, or other ones at the same sequences: then
        // the mark says nothing of them.
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let same_messages = if mark.through > last {
            false
        } else if mark.through < first || mark.through_ns == 0 {
            true
        } else {
            let now = stored_ns(stream, mark.through)
                .await
                .map_err(|e| failed("reading the stream", &e))?;
            now == 0 || now == mark.through_ns
        };
        if !same_messages {
            tracing::warn!(
                consumer,
                through = mark.through,
                last,
                "the events stream does not hold the messages this dispatcher handled (restored \
                 from a backup?): consumer made anew starts at its start"
            );
            return Ok(start);
        }
        tracing::warn!(
            consumer,
            start_sequence = mark.through + 1,
            "consumer made anew (it was deleted or lost): it starts after what this dispatcher \
             handled, not at the stream's start"
        );
        Ok(Start {
            policy: DeliverPolicy::ByStartSequence {
                start_sequence: mark.through + 1,
            },
            handled: None,
        })
    }

    /// Reads `consumer`'s ack floor and the stream's, then the stream
    /// again: the mark, if the stream was not made again between.
    async fn read_floor(
        stream: &jetstream::stream::Stream,
        consumer: &str,
    ) -> Result<(Mark, usize), String> {
        let before = stream.get_info().await.map_err(|e| e.to_string())?;
        let info = stream
            .consumer_info(consumer)
            .await
            .map_err(|e| e.to_string())?;
        let through = info
            .ack_floor
            .stream_sequence
            .min(before.state.last_sequence);
        let through_ns = stored_ns(stream, through).await?;
        let after = stream.get_info().await.map_err(|e| e.to_string())?;
        if before.created != after.created {
            return Err("the events stream was made again meanwhile".into());
        }
        Ok((
            Mark {
                stream_created_ns: after.created.unix_timestamp_nanos(),
                through,
                through_ns,
            },
            info.num_ack_pending,
        ))
    }

    /// Reads `consumer`'s ack floor and keeps it, if it moved on; with
    /// `settled_within`, reading it again meanwhile while acks are pending
    /// and it still moves (the last ones sent may not have reached it yet).
    async fn keep_once(
        &self,
        stream: &jetstream::stream::Stream,
        consumer: &str,
        settled_within: Option<Duration>,
    ) {
        let mut read = Self::read_floor(stream, consumer).await;
        if let Some(within) = settled_within {
            let until = tokio::time::Instant::now() + within;
            while let Ok((mark, pending)) = &read
                && *pending > 0
                && tokio::time::Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let again = Self::read_floor(stream, consumer).await;
                let moved = matches!(&again, Ok((m, _)) if m.through > mark.through);
                read = again;
                if !moved {
                    break;
                }
            }
        }
        let mark = match read {
            Ok((mark, _)) => mark,
            // A consumer or stream gone meanwhile is read at the next
            // turn, made anew.
            Err(e) => {
                tracing::debug!(consumer, error = %e, "reading the consumer's ack floor failed");
                return;
            }
        };
        let kept = match self.read(consumer) {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(consumer, error = %e, "reading where the consumer got to failed");
                return;
            }
        };
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

    /// Keeps `consumer`'s mark once more and makes it durable, once (at
    /// the stop, the last acks sent); within [`LAST_MARK_WITHIN`] at most.
    pub(crate) async fn keep_last(&self, stream: &jetstream::stream::Stream, consumer: &str) {
        if self.kept_last.swap(true, Ordering::SeqCst) {
            return;
        }
        let kept = tokio::time::timeout(
            LAST_MARK_WITHIN,
            self.keep_once(stream, consumer, Some(LAST_ACKS_WITHIN)),
        )
        .await;
        if kept.is_err() {
            tracing::warn!(
                consumer,
                "the events stream did not answer in time: where the consumer got to is kept as last read"
            );
        }
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
            through_ns: 1_765_000_100_000_000_001,
        };
        let v = mark.encode();
        assert_eq!(Mark::decode(&v), Some(mark));
        assert_eq!(Mark::decode(&v[..39]), None);
    }
}
