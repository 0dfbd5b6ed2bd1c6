//! Between one dispatcher and replicas: where each side's consumers start
//! on a stream the other side consumed, and what they pass over.
//!
//! The stream keeps every event (its limits are the operator's), and
//! neither side has the other's journals: the replicas' partition-owned
//! state is theirs, a single dispatcher's store its own. So neither may
//! handle what the other did.
//!
//! - One dispatcher after replicas ([`single_start`]): each partition
//!   consumer handled its events up to the stream's last sequence when it
//!   has nothing pending or unacked, else up to its ack floor. Consumer
//!   `switchboard` made then starts after the lowest of these, and the pull
//!   acks, without handing it on, every event at or below its own
//!   partition's mark ([`Handled::covers`]); so does a `switchboard` left
//!   from a single dispatcher that ran before the replicas.
//! - Replicas after one dispatcher ([`partitions_start`]): partition
//!   consumers made then start after what `switchboard` acked, and every
//!   partition pull passes over that (partition consumers left from an
//!   earlier time the replicas ran would deliver it again).
//!
//! Both sides at once cannot work: each would handle the events the other
//! does, with a journal of its own. Nor can two single dispatchers, which
//! would share consumer `switchboard` but not their journals, so that an
//! event delivered again to the other one runs again. A dispatcher that
//! finds such consumers pulled by a running process refuses to start
//! ([`refuse_beside`]).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use switchboard_engine::bus::BusError;

use crate::nats::{CONSUMER, partition_consumer};
use crate::partitions::PARTITIONS;
use crate::pull::PULL_EXPIRES;

/// How a dispatcher starting consumes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Consuming {
    /// Alone, through consumer `switchboard`.
    Single,
    /// As one of the replicas, through the partition consumers.
    Replicated,
}

/// How long a consumer is left before it is watched: a stopped (or
/// killed) dispatcher's pull requests expire within [`PULL_EXPIRES`], and
/// until then the server may still deliver to them (a host gone without
/// closing its connection).
const WATCH_AFTER: Duration = PULL_EXPIRES.saturating_add(Duration::from_millis(500));

/// How long a consumer is watched: an idle running dispatcher's pull keeps
/// a request waiting on the server at all times (`puller.rs`), and a busy
/// one takes more deliveries as its events are done.
const WATCH_FOR: Duration = Duration::from_secs(1);

/// Refuses to consume the stream as `consuming` says while running
/// dispatchers consume it in a way this one cannot run beside: replicas
/// (their partition consumers pulled) or a single dispatcher (consumer
/// `switchboard` pulled), for a single dispatcher; a single dispatcher, for
/// a replica (other replicas are its peers). A consumer with pull requests
/// waiting or deliveries unacked is left for [`WATCH_AFTER`], then watched
/// for [`WATCH_FOR`]: with requests waiting still, or delivering
/// meanwhile, it is a running dispatcher's. Started at the same moment,
/// neither may see the other, nor one whose events are all stuck in steps
/// while it is watched: this is a check for an operator's mistake, not a
/// lock.
pub(crate) async fn refuse_beside(
    stream: &jetstream::stream::Stream,
    consuming: Consuming,
) -> Result<(), BusError> {
    let mut names = vec![CONSUMER.to_string()];
    if consuming == Consuming::Single {
        names.extend((0..PARTITIONS).map(partition_consumer));
    }
    let patience = tokio::time::Instant::now() + crate::nats::CREATE_PATIENCE;
    let mut watched = Vec::new();
    for name in names {
        if activity(stream, &name, patience)
            .await?
            .is_some_and(|seen| seen.waiting || seen.unacked)
        {
            watched.push(name);
        }
    }
    if watched.is_empty() {
        return Ok(());
    }
    tracing::info!(consumers = ?watched, "consumers this dispatcher cannot run beside have pull \
        requests waiting or deliveries unacked; telling whether a running dispatcher has them");
    tokio::time::sleep(WATCH_AFTER).await;
    let patience = tokio::time::Instant::now() + crate::nats::CREATE_PATIENCE;
    let mut before = Vec::new();
    for name in watched {
        if let Some(seen) = activity(stream, &name, patience).await? {
            before.push((name, seen));
        }
    }
    tokio::time::sleep(WATCH_FOR).await;
    let mut pulled = Vec::new();
    for (name, before) in before {
        if activity(stream, &name, patience)
            .await?
            .is_some_and(|now| before.waiting || now.waiting || now.delivered != before.delivered)
        {
            pulled.push(name);
        }
    }
    let single = pulled.iter().any(|name| name == CONSUMER);
    let replicas = pulled.iter().any(|name| name != CONSUMER);
    let consuming_it = |who: &str| {
        format!(
            "{who} consuming stream {}: consumer{} {} {} pulled",
            stream.cached_info().config.name,
            if pulled.len() > 1 { "s" } else { "" },
            pulled.join(", "),
            if pulled.len() > 1 { "are" } else { "is" },
        )
    };
    let refusal = match (consuming, single, replicas) {
        (_, false, false) => return Ok(()),
        (Consuming::Single, _, true) => format!(
            "{}; a single dispatcher beside them would handle their events again. \
             Stop the replicas first, or start this one as a replica (bus.replicated = true)",
            consuming_it("replicas (bus.replicated) are")
        ),
        (Consuming::Single, true, false) => format!(
            "{}; a second one would take some of its events and keep their journal \
             apart from its, so an event delivered again to the other runs again. \
             Stop it first, or run replicas (bus.replicated = true) to share the work",
            consuming_it("another single dispatcher is")
        ),
        (Consuming::Replicated, _, _) => format!(
            "{}; replicas beside it would handle its events again. Stop it first",
            consuming_it("a single dispatcher (bus.replicated = false) is")
        ),
    };
    Err(BusError::InUse(refusal))
}

/// What a consumer shows of whoever pulls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Activity {
    /// Pull requests wait on it.
    waiting: bool,
    /// Deliveries are out, not acked yet.
    unacked: bool,
    /// Its deliveries so far (redeliveries counted; a purge or the
    /// stream's limits do not move it).
    delivered: u64,
}

/// Consumer `name`'s [`Activity`]; `None` when it does not exist. Read
/// again on failure until `patience` runs out: a cluster may be electing
/// the consumer's leader.
async fn activity(
    stream: &jetstream::stream::Stream,
    name: &str,
    patience: tokio::time::Instant,
) -> Result<Option<Activity>, BusError> {
    use jetstream::context::ConsumerInfoErrorKind::NotFound;
    loop {
        match stream.consumer_info(name).await {
            Ok(info) => {
                return Ok(Some(Activity {
                    waiting: info.num_waiting > 0,
                    unacked: info.num_ack_pending > 0,
                    delivered: info.delivered.consumer_sequence,
                }));
            }
            Err(e) if e.kind() == NotFound => return Ok(None),
            Err(e) if tokio::time::Instant::now() < patience => {
                tracing::warn!(consumer = name, error = %e, "reading the consumer failed; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(BusError::Unavailable(format!(
                    "reading consumer {name} (to tell whether other dispatchers consume the stream): {e}"
                )));
            }
        }
    }
}

/// Up to where the replicas handled each partition's events (stream
/// sequences).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handled {
    through: Vec<u64>,
}

impl Handled {
    /// Whether the message stored at `seq` under `subject` was handled by
    /// the replicas: its partition's consumer had acked past it.
    pub fn covers(&self, prefix: &str, subject: &str, seq: u64) -> bool {
        partition_taking(prefix, subject)
            .and_then(|p| self.through.get(usize::from(p)))
            .is_some_and(|through| seq <= *through)
    }
}

/// The partition whose consumer takes a message stored under `subject`
/// (as `nats::partition_filters` divides them): the fourth token of a
/// numbered subject, and partition 0 for every other shape; `None` for a
/// four-token subject whose last token is no partition (no consumer took
/// it).
fn partition_taking(prefix: &str, subject: &str) -> Option<u16> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix(".events.")?;
    let tokens: Vec<&str> = rest.split('.').collect();
    match tokens[..] {
        // As the transform writes it (`07` or `+7` is no partition's).
        [_, _, _, token] => token
            .parse::<u16>()
            .ok()
            .filter(|p| *p < PARTITIONS && p.to_string() == token),
        _ => Some(0),
    }
}

/// Where the single dispatcher's consumer starts if it is made now, and
/// what of the stream it passes over.
#[derive(Debug, Clone)]
pub(crate) struct Start {
    /// Where a consumer made now starts (one that exists goes on where it
    /// was).
    pub policy: DeliverPolicy,
    /// What the replicas handled, when they consumed the stream.
    pub handled: Option<Handled>,
}

/// Reads where the single dispatcher's consumer starts. When replicas
/// consumed the stream (their partition consumers are there; a missing
/// one counts as having handled none of its partition), after what they
/// handled, and what they handled is passed over, whether the consumer
/// is made now or was left from before they ran. Otherwise at the stream's
/// start, so that what workers published before the first dispatcher ran
/// is handled.
pub(crate) async fn single_start(stream: &jetstream::stream::Stream) -> Result<Start, BusError> {
    use jetstream::context::ConsumerInfoErrorKind::NotFound;
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        BusError::Unavailable(format!(
            "{what} (to place consumer {CONSUMER}'s start): {e}"
        ))
    };
    let last = stream
        .get_info()
        .await
        .map_err(|e| unavailable("reading the events stream", &e))?
        .state
        .last_sequence;
    let mut through = Vec::with_capacity(usize::from(PARTITIONS));
    let mut found = false;
    for p in 0..PARTITIONS {
        let name = partition_consumer(p);
        let info = match stream.consumer_info(&name).await {
            Ok(info) => info,
            Err(e) if e.kind() == NotFound => {
                through.push(0);
                continue;
            }
            Err(e) => return Err(unavailable(&format!("reading consumer {name}"), &e)),
        };
        found = true;
        if info.num_ack_pending > 0 {
            tracing::warn!(
                partition = p,
                unacked = info.num_ack_pending,
                ack_floor = info.ack_floor.stream_sequence,
                "a partition consumer had deliveries unacked when the replicas stopped: \
                 its events after its ack floor are handled again, some of them twice"
            );
        }
        // Its ack floor is the last of its events it handled in order;
        // with nothing pending or unacked, it handled every one so far.
        through.push(if info.num_pending == 0 && info.num_ack_pending == 0 {
            last.max(info.ack_floor.stream_sequence)
        } else {
            info.ack_floor.stream_sequence
        });
    }
    if !found {
        return Ok(Start {
            policy: DeliverPolicy::All,
            handled: None,
        });
    }
    let lowest = through.iter().copied().min().unwrap_or(0);
    tracing::info!(
        start_sequence = lowest + 1,
        "the stream has the replicas' partition consumers: consumer {CONSUMER} passes over what they handled"
    );
    Ok(Start {
        policy: DeliverPolicy::ByStartSequence {
            start_sequence: lowest + 1,
        },
        handled: Some(Handled { through }),
    })
}

/// Where partition consumers made now start, and up to where every
/// partition pull passes over what it is delivered: after what the single
/// dispatcher's consumer acked, when the stream has one (so that turning
/// replicas on does not handle the stream's history again, and so that
/// partition consumers left from an earlier time the replicas ran do not
/// deliver what a single dispatcher handled since, whose journal the
/// replicas lack); otherwise at the stream's start, passing over nothing.
/// Read again whenever a partition consumer is made again (the stream may
/// have been made anew, its sequences starting over).
pub(crate) async fn partitions_start(
    stream: &jetstream::stream::Stream,
) -> Result<(DeliverPolicy, Option<u64>), BusError> {
    use jetstream::context::ConsumerInfoErrorKind::NotFound;
    let info = match stream.consumer_info(CONSUMER).await {
        Ok(info) => info,
        Err(e) if e.kind() == NotFound => return Ok((DeliverPolicy::All, None)),
        Err(e) => {
            return Err(BusError::Unavailable(format!(
                "reading consumer {CONSUMER} (to place the partition consumers' start): {e}"
            )));
        }
    };
    let through = info.ack_floor.stream_sequence;
    if info.num_ack_pending > 0 {
        tracing::warn!(
            unacked = info.num_ack_pending,
            ack_floor = through,
            "the single dispatcher's consumer {CONSUMER} had deliveries unacked when it stopped: \
             its events after its ack floor are handled again, some of them twice"
        );
    }
    tracing::info!(
        start_sequence = through + 1,
        "the stream has the single dispatcher's consumer {CONSUMER}: partition consumers made now start after what it acked, and partition pulls pass over it"
    );
    Ok((
        DeliverPolicy::ByStartSequence {
            start_sequence: through + 1,
        },
        Some(through),
    ))
}

/// `config` starting as `start` says, if it is made now.
pub(crate) fn starting(mut config: pull::Config, start: &Start) -> pull::Config {
    config.deliver_policy = start.policy;
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_belongs_to_the_partition_whose_consumer_takes_it() {
        assert_eq!(
            partition_taking("vumi", "vumi.events.acme.survey.done.7"),
            Some(7)
        );
        // Stored before the stream was partitioned, or of another shape:
        // partition 0's.
        assert_eq!(
            partition_taking("vumi", "vumi.events.acme.survey.done"),
            Some(0)
        );
        assert_eq!(partition_taking("vumi", "vumi.events.acme"), Some(0));
        assert_eq!(partition_taking("vumi", "vumi.events.a.b.c.d.e"), Some(0));
        // A fourth token that is no partition: no consumer took it.
        assert_eq!(
            partition_taking("vumi", "vumi.events.acme.survey.done.x"),
            None
        );
        assert_eq!(
            partition_taking("vumi", "vumi.events.acme.survey.done.16"),
            None
        );
        assert_eq!(
            partition_taking("vumi", "other.events.acme.survey.done.1"),
            None
        );
    }

    #[test]
    fn what_a_partition_handled_is_passed_over() {
        let mut through = vec![0; usize::from(PARTITIONS)];
        through[0] = 10;
        through[3] = 40;
        let handled = Handled { through };
        assert!(handled.covers("vumi", "vumi.events.a.b.c.3", 40));
        assert!(!handled.covers("vumi", "vumi.events.a.b.c.3", 41));
        assert!(!handled.covers("vumi", "vumi.events.a.b.c.4", 20));
        assert!(handled.covers("vumi", "vumi.events.a.b.c", 10));
        assert!(!handled.covers("vumi", "vumi.events.a.b.c.x", 1));
    }
}
