//! The partition changelog: how a partition's owner makes the state it
//! writes durable, and how the other replicas follow it (docs/contract.md,
//! "State"; the fencing argument is in RELIABILITY.md).
//!
//! One JetStream stream, [`STREAM`], holds every partition's changelog:
//!
//! - puts to partition `p` travel in packs: many puts in one message on a
//!   subject of its own, `switchboard.changelog.{p}.b.{writer}x{number}`
//!   (the format, and how a batch is split into packs: `pack`). A pack
//!   stays until the partition's owner purges it: its cleaner
//!   (`partitioned/cleaner.rs`) writes the partition's live records again
//!   and purges the packs from before them, so the changelog holds up to
//!   about two records per live key (or 1,024 beyond them, for a small
//!   partition);
//! - a removal is a message on
//!   `switchboard.changelog.{p}.w.{collection}.{key as unpadded base64url}`
//!   with no payload and a `Switchboard-Op: del` header. The stream keeps
//!   one message per subject, so a key keeps its latest marker, which no
//!   purge of packs reaches. Markers of housekeeping collections expire
//!   after [`crate::MARKER_TTL`]; the others' are purged by the partition's
//!   owner once a round of its cleaner purged the packs below them and
//!   they are [`Changelog::markers_kept`] old (`partitioned/cleaner.rs`),
//!   so that the markers of expired records do not pile up for good. The puts
//!   of housekeeping collections
//!   other than the journal's (idempotency keys, timers, waiters, signals,
//!   digests) go on these subjects too, so that their removal replaces
//!   them (see `pack::packs`), as do the puts of changelogs written before packs;
//! - a term of ownership of `p` begins with a marker on
//!   `switchboard.changelog.{p}.epoch`; the marker's stream sequence is the
//!   term's epoch. The new owner publishes it only if the last marker is the
//!   one it read (`Nats-Expected-Last-Subject-Sequence`), so two replicas
//!   taking a partition at once cannot both begin a term from the same one.
//!
//! Every write is fenced: it carries, or the atomic batch it is part of
//! carries, `Nats-Expected-Last-Subject-Sequence: {epoch}` with
//! `Nats-Expected-Last-Subject-Sequence-Subject` naming the partition's
//! epoch subject (nats-server 2.11 or later; atomic batches 2.12), and the
//! stream stores it only while its term's marker is still the partition's
//! last. Once a new owner has begun
//! its term, every write of the deposed owner is refused ([`ChangelogError::Fenced`]),
//! however long it was paused, so none can land after the new owner's
//! marker and overwrite what the new owner writes. Writes stored before
//! the marker precede it in the stream, and the new owner applies them all
//! before it handles an event of the partition (it waits until it has read
//! up to its own marker).
//!
//! Writes are group-committed: [`Appender::append`] only queues a write; a
//! task publishes what each partition has queued (up to 500 writes at a
//! time, in packs of up to 128 puts; one such batch in flight per
//! partition, every partition's at once) once it is wanted: a commit
//! waits, a pack's worth of the partition's puts waits (seen at once when
//! 128 writes wait in all, else at the task's next turn), or the oldest
//! write has waited 5 ms (so that the puts of many events share a message
//! instead of each event's going alone). A write wakes the task only when
//! none was waiting or a pack's worth is (`Inbox`). [`Appender::commit`] returns
//! once the stream has acknowledged every write appended before it. An
//! event is acked only after such a commit. On a clustered stream a batch's
//! messages are one atomic batch (the leader refuses a conditional publish
//! while another checking the same subject is in flight, and every message
//! of a partition checks its epoch subject); on a stream with one copy they
//! are published one by one, each fenced, all in flight together (an atomic
//! batch costs that server a file store of its own: see `Publishing`).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::Collection;
use crate::replicated::{bucket_key, parse_key};

mod appender;
mod pack;

pub use appender::Appender;
pub(crate) use appender::RETRY_FOR;
use appender::{Publishing, Queued};

pub(crate) use pack::packs;
use pack::{PACK_TOKEN, packs_of, unpack};

/// The stream holding every partition's changelog.
pub const STREAM: &str = "SWITCHBOARD_CHANGELOG";

/// The first tokens of every changelog subject.
const PREFIX: &str = "switchboard.changelog";

/// How long a publish waits for a stream that does not answer yet (just
/// made on a cluster, or not yet known to the server this replica talks
/// to: "no stream found"); it is there within seconds.
const STREAM_ANSWERS_WITHIN: Duration = Duration::from_secs(5);

/// Whether a publish that failed with `e`, tried first at `since`, is to be
/// sent again: its stream did not answer ("no stream found": nothing was
/// stored) and [`STREAM_ANSWERS_WITHIN`] has not passed. Pauses first if so.
pub(crate) async fn stream_may_answer_soon(
    e: &jetstream::context::PublishError,
    since: tokio::time::Instant,
) -> bool {
    let soon =
        e.kind() == PublishErrorKind::StreamNotFound && since.elapsed() < STREAM_ANSWERS_WITHIN;
    if soon {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    soon
}

/// Stream metadata: how many partitions the changelog was made for.
pub const PARTITIONS_KEY: &str = "switchboard.partitions";

/// Marks a removal.
const OP_HEADER: &str = "Switchboard-Op";

/// Names the subject whose last sequence `Nats-Expected-Last-Subject-Sequence`
/// is checked against (nats-server 2.11).
const EXPECTED_SUBJECT_HEADER: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// Why the changelog refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangelogError {
    /// The NATS server could not be reached, or answered with an error.
    #[error("changelog stream {STREAM}: {0}")]
    Remote(String),
    /// The stream was made for another number of partitions.
    #[error(
        "the changelog stream {STREAM} holds {stream} partitions, but this dispatcher divides \
         accounts into {configured}: every replica must use the stream's partition count"
    )]
    PartitionCount {
        /// The stream's partition count.
        stream: u16,
        /// This replica's.
        configured: u16,
    },
    /// Another replica began a term on the partition after this one's: the
    /// write was refused, and every later one of this term will be.
    #[error(
        "partition {partition}: another replica has taken it over since this replica's term \
         (epoch {epoch}) began; its writes to the partition are refused"
    )]
    Fenced {
        /// The partition.
        partition: u16,
        /// The refused term's epoch.
        epoch: u64,
    },
    /// A batch of the term's writes kept failing for as long as it was
    /// sent again: the changelog may lack writes the local copy has, so
    /// the term ends, and the partition is read again from the changelog
    /// when it is taken again.
    #[error("partition {partition} (term {epoch}): {message}; the term ends")]
    Gap {
        /// The partition.
        partition: u16,
        /// The term's epoch.
        epoch: u64,
        /// What failed.
        message: String,
    },
    /// No term of this replica's covers the partition.
    #[error("partition {0} is not {1}")]
    Partition(u16, &'static str),
    /// The stream could not be reached or did not answer in time (a
    /// connection lost, a leader being elected): worth sending again.
    #[error("changelog stream {STREAM}: {0}")]
    Unavailable(String),
}

fn remote(what: impl std::fmt::Display) -> ChangelogError {
    ChangelogError::Remote(what.to_string())
}

/// A term of ownership of one partition: writes made under it are stored
/// until another replica begins a term on the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Term {
    /// The partition.
    pub partition: u16,
    /// The stream sequence of the term's marker.
    pub epoch: u64,
}

/// One write to a partition's state: `value` `None` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The collection written.
    pub collection: Collection,
    /// The key.
    pub key: Vec<u8>,
    /// The new value, or `None` to remove.
    pub value: Option<Bytes>,
}

/// A changelog message, as a follower reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Writes to a partition, in the order they were made: a pack of puts,
    /// or one write on its key's subject (a removal marker).
    Write {
        /// Its stream sequence.
        seq: u64,
        /// The partition.
        partition: u16,
        /// What was written.
        changes: Vec<Change>,
    },
    /// A term began.
    Term(Term),
    /// A point a reader asked to be told it passed ([`Changelog::sync`]).
    Sync {
        /// Its stream sequence.
        seq: u64,
    },
    /// A message that is not a changelog record (written by hand, or by an
    /// incompatible build): to be logged, counted and skipped.
    Undecodable {
        /// Its stream sequence.
        seq: u64,
        /// Its partition, when the subject names one.
        partition: Option<u16>,
        /// Its subject.
        subject: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Record {
    /// The record's stream sequence.
    pub fn seq(&self) -> u64 {
        match self {
            Record::Write { seq, .. } | Record::Undecodable { seq, .. } | Record::Sync { seq } => {
                *seq
            }
            Record::Term(t) => t.epoch,
        }
    }
}

fn epoch_subject(partition: u16) -> String {
    format!("{PREFIX}.{partition}.epoch")
}

fn write_subject(partition: u16, change: &Change) -> String {
    format!(
        "{PREFIX}.{partition}.w.{}",
        bucket_key(change.collection, &change.key)
    )
}

/// The subjects a follower reads when it applies the writes of the
/// partitions in `followed` (all of them: `None`). A consumer's filters may
/// not overlap, so they go by token count: three tokens (the sync mark),
/// four (every partition's term marker), and five or more under each
/// partition followed (its writes).
fn follower_filter(partitions: u16, followed: Option<&[u16]>) -> Vec<String> {
    let Some(followed) = followed.filter(|f| f.len() < usize::from(partitions)) else {
        return vec![format!("{PREFIX}.>")];
    };
    let mut subjects = vec![format!("{PREFIX}.*"), format!("{PREFIX}.*.*")];
    subjects.extend(followed.iter().map(|p| format!("{PREFIX}.{p}.*.>")));
    subjects
}

/// Reads a changelog message.
pub fn decode(seq: u64, subject: &str, headers: Option<&HeaderMap>, payload: Bytes) -> Record {
    let undecodable = |partition, reason: &str| Record::Undecodable {
        seq,
        partition,
        subject: subject.to_string(),
        reason: reason.to_string(),
    };
    let Some(rest) = subject
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return undecodable(None, "not a changelog subject");
    };
    if rest == "sync" {
        return Record::Sync { seq };
    }
    let (partition, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let Ok(partition) = partition.parse::<u16>() else {
        return undecodable(None, "the subject names no partition");
    };
    if rest == "epoch" {
        return Record::Term(Term {
            partition,
            epoch: seq,
        });
    }
    if rest.starts_with(PACK_TOKEN) && rest.as_bytes().get(PACK_TOKEN.len()) == Some(&b'.') {
        return match unpack(&payload) {
            Ok(changes) => Record::Write {
                seq,
                partition,
                changes,
            },
            Err(reason) => undecodable(Some(partition), reason),
        };
    }
    let Some(key) = rest.strip_prefix("w.") else {
        return undecodable(Some(partition), "neither a write nor a term marker");
    };
    let Some((collection, key)) = parse_key(key) else {
        return undecodable(Some(partition), "no collection and key in the subject");
    };
    let removed = headers
        .and_then(|h| h.get(OP_HEADER))
        .is_some_and(|op| op.as_str() == "del");
    Record::Write {
        seq,
        partition,
        changes: vec![Change {
            collection,
            key,
            value: (!removed).then_some(payload),
        }],
    }
}

/// Whether a read of a stream message found none where it looked.
fn is_no_message(e: &stream::RawMessageError) -> bool {
    e.kind() == stream::RawMessageErrorKind::NoMessageFound
}

/// Whether the stream refused a publish for its expected last sequence.
fn is_wrong_sequence(e: &async_nats::jetstream::context::PublishError) -> bool {
    e.kind() == PublishErrorKind::WrongLastSequence
}

/// A replica's handle on the changelog stream.
#[derive(Debug, Clone)]
pub struct Changelog {
    js: jetstream::Context,
    stream: stream::Stream,
    partitions: u16,
    publishing: Publishing,
    /// How long a removal marker stays.
    markers_kept: Duration,
}

impl Changelog {
    /// Binds to the changelog stream, creating it with `replicas` copies if
    /// it does not exist; refuses a stream made for another partition count.
    pub async fn bind(
        js: jetstream::Context,
        partitions: u16,
        replicas: usize,
    ) -> Result<Self, ChangelogError> {
        let config = stream::Config {
            name: STREAM.into(),
            description: Some(
                "Switchboard's partition-owned state by partition: packs of puts, removal markers, terms"
                    .into(),
            ),
            subjects: vec![format!("{PREFIX}.>")],
            max_messages_per_subject: 1,
            allow_message_ttl: true,
            allow_atomic_publish: true,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            metadata: HashMap::from([(PARTITIONS_KEY.to_string(), partitions.to_string())]),
            ..Default::default()
        };
        let mut stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| remote(format!("creating or reading the stream: {e}")))?;
        let info = stream
            .info()
            .await
            .map_err(|e| remote(format!("reading the stream: {e}")))?;
        if !info.config.allow_atomic_publish || !info.config.allow_message_ttl {
            let mut config = info.config.clone();
            config.allow_atomic_publish = true;
            config.allow_message_ttl = true;
            js.update_stream(config).await.map_err(|e| {
                remote(format!(
                    "allowing atomic batches and message TTLs (nats-server 2.12 or later): {e}"
                ))
            })?;
        }
        let held = info.config.metadata.get(PARTITIONS_KEY).cloned();
        match held.as_deref().map(str::parse::<u16>) {
            Some(Ok(n)) if n == partitions => {}
            Some(Ok(n)) => {
                return Err(ChangelogError::PartitionCount {
                    stream: n,
                    configured: partitions,
                });
            }
            _ => {
                return Err(remote(format!(
                    "the stream's metadata has no valid {PARTITIONS_KEY} (found {held:?}): it was \
                     not made by Switchboard"
                )));
            }
        }
        let publishing = Publishing::for_replicas(info.config.num_replicas);
        Ok(Self {
            js,
            stream,
            partitions,
            publishing,
            markers_kept: crate::MARKER_TTL,
        })
    }

    /// The changelog whose owners purge a partition's removal markers,
    /// once a round made them unneeded, when they are `kept` old (at least
    /// a second) instead of a day ([`crate::MARKER_TTL`]): a replica out of
    /// touch with the stream for half of that reads its copies anew.
    pub fn with_markers_kept(mut self, kept: Duration) -> Self {
        self.markers_kept = kept.max(Duration::from_secs(1));
        self
    }

    /// How long a removal marker of a partition's record stays in the
    /// stream at least (its owner purges it once it is this old and a
    /// round of the partition's cleaner has purged the packs before it).
    pub fn markers_kept(&self) -> Duration {
        self.markers_kept
    }

    /// When the oldest pack of `partition`'s puts still in the stream was
    /// stored, in milliseconds since the Unix epoch (`None`: it holds none).
    pub async fn oldest_pack_millis(&self, partition: u16) -> Result<Option<u64>, ChangelogError> {
        let subjects = packs_of(partition);
        match self
            .stream
            .get_first_raw_message_by_subject(&subjects, 0)
            .await
        {
            Ok(m) => Ok(Some(
                u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            )),
            Err(e) if is_no_message(&e) => Ok(None),
            Err(e) => Err(remote(format!("reading the first of {subjects}: {e}"))),
        }
    }

    /// How many partitions the changelog holds.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Marks the changelog's present end: returns a sequence that a reader
    /// following from an earlier point is sure to reach (the mark, or a
    /// later one), whatever expired or was replaced meanwhile.
    pub async fn sync(&self) -> Result<u64, ChangelogError> {
        let subject = format!("{PREFIX}.sync");
        // Replicas starting together on a cluster: the stream another one
        // made a moment ago may not be known yet to the server this one
        // talks to (no stream answers its subject). It is, within seconds.
        let since = tokio::time::Instant::now();
        loop {
            let published =
                async { self.js.publish(subject.clone(), Bytes::new()).await?.await }.await;
            match published {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if stream_may_answer_soon(&e, since).await => {}
                Err(e) => return Err(remote(format!("publishing {subject}: {e}"))),
            }
        }
    }

    /// The stream sequence of the last message in the changelog (0: empty).
    pub async fn last_seq(&self) -> Result<u64, ChangelogError> {
        let mut stream = self.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| remote(format!("reading the stream: {e}")))?;
        Ok(info.state.last_sequence)
    }

    /// Begins a term on `partition`: from its marker on, the writes of every
    /// earlier term are refused. The caller must read the changelog up to
    /// the returned epoch before it handles the partition's events.
    pub async fn begin_term(&self, partition: u16, owner: &str) -> Result<Term, ChangelogError> {
        self.begin_term_after(partition, owner, None).await
    }

    /// [`Changelog::begin_term`], trying first with `known` as the
    /// partition's last marker (0: none), as a follower of the changelog
    /// saw it, instead of asking the stream; if another marker came since,
    /// the stream refuses that try and the last marker is read.
    pub async fn begin_term_after(
        &self,
        partition: u16,
        owner: &str,
        mut known: Option<u64>,
    ) -> Result<Term, ChangelogError> {
        if partition >= self.partitions {
            return Err(ChangelogError::Partition(partition, "in the changelog"));
        }
        let subject = epoch_subject(partition);
        // Another replica may begin a term between the read and the publish:
        // read again. A handful of rounds is plenty, since terms begin only
        // when membership changes. A stream just made on a cluster may not
        // answer publishes for a moment (no responders while its leader is
        // chosen): wait for it, a little.
        let mut lost_races = 0;
        let since = tokio::time::Instant::now();
        while lost_races < 8 {
            let last = match known.take() {
                Some(last) => Ok(last),
                None => self
                    .stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .map(|m| m.sequence),
            };
            let last = match last {
                Ok(last) => last,
                Err(e) if is_no_message(&e) => 0,
                Err(e) => return Err(remote(format!("reading {subject}: {e}"))),
            };
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                last.to_string().as_str(),
            );
            let published = self
                .js
                .publish_with_headers(subject.clone(), headers, Bytes::from(owner.to_string()))
                .await
                .map_err(|e| remote(format!("publishing {subject}: {e}")))?;
            match published.await {
                Ok(ack) => {
                    return Ok(Term {
                        partition,
                        epoch: ack.sequence,
                    });
                }
                Err(e) if is_wrong_sequence(&e) => lost_races += 1,
                Err(e) if stream_may_answer_soon(&e, since).await => {}
                Err(e) => return Err(remote(format!("publishing {subject}: {e}"))),
            }
        }
        Err(remote(format!(
            "{subject}: other replicas kept beginning terms; giving up for now"
        )))
    }

    /// Removes `partition`'s packs stored before stream sequence `below`;
    /// returns how many messages went. Only the partition's owner calls it,
    /// once the live records of those packs are written again under its
    /// term and committed (the cleaner in `partitioned/cleaner.rs`): what
    /// it removes is shadowed by later writes. A removal marker is not in a
    /// pack, so none goes.
    pub async fn purge_packs(&self, partition: u16, below: u64) -> Result<u64, ChangelogError> {
        let subjects = packs_of(partition);
        let purged = self
            .stream
            .purge()
            .filter(subjects.clone())
            .sequence(below)
            .await
            .map_err(|e| remote(format!("purging {subjects} below {below}: {e}")))?;
        Ok(purged.purged)
    }

    /// Removes `partition`'s removal markers stored before stream sequence
    /// `below`, of the collections whose puts go in packs and whose
    /// markers do not expire by themselves; returns how many messages went.
    /// Only the partition's owner calls it, with `below` at most the mark
    /// of a round of its term whose purge of packs is done, and at most
    /// where the last [`Changelog::markers_kept`] of the stream begin
    /// ([`Changelog::stored_within`]; the cleaner in
    /// `partitioned/cleaner.rs`): what the markers removed is gone from the
    /// stream, and a follower has had that long to read them. Their
    /// subjects hold no live put below `below` either (a put of a
    /// changelog written before packs there was written again by the
    /// round).
    pub async fn purge_markers(&self, partition: u16, below: u64) -> Result<u64, ChangelogError> {
        let mut purged = 0;
        for c in Collection::ALL
            .into_iter()
            .filter(|c| c.is_partitioned() && packs(*c) && !c.is_housekeeping())
        {
            let subjects = format!("{PREFIX}.{partition}.w.{}.>", c.name());
            purged += self
                .stream
                .purge()
                .filter(subjects.clone())
                .sequence(below)
                .await
                .map_err(|e| remote(format!("purging {subjects} below {below}: {e}")))?
                .purged;
        }
        Ok(purged)
    }

    /// The first stream sequence of the messages stored within `age` of the
    /// stream's last one (by the server's clock): every message before it
    /// is older. A binary search over the stream, a few dozen reads.
    pub async fn stored_within(&self, age: Duration) -> Result<u64, ChangelogError> {
        let mut stream = self.stream.clone();
        let state = &stream
            .info()
            .await
            .map_err(|e| remote(format!("reading the stream: {e}")))?
            .state;
        let cutoff = state.last_timestamp - age;
        let (mut lo, mut hi) = (state.first_sequence, state.last_sequence + 1);
        let every = format!("{PREFIX}.>");
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self
                .stream
                .get_first_raw_message_by_subject(&every, mid)
                .await
            {
                Ok(m) if m.time < cutoff => lo = m.sequence + 1,
                Ok(_) => hi = mid,
                Err(e) if is_no_message(&e) => hi = mid,
                Err(e) => return Err(remote(format!("reading the stream from {mid}: {e}"))),
            }
        }
        Ok(lo)
    }

    /// An appender: publishes writes under their terms, many in flight.
    /// Spawns its task on the current runtime.
    pub fn appender(&self) -> Appender {
        Appender::spawn(self.js.clone(), self.publishing)
    }

    /// The changelog's records from stream sequence `from` on, in order,
    /// read by an ordered consumer (recreated by the client if it falls
    /// behind or the server restarts).
    pub async fn records(
        &self,
        from: u64,
    ) -> Result<impl futures::Stream<Item = Result<Record, ChangelogError>> + use<>, ChangelogError>
    {
        self.read(follower_filter(self.partitions, None), from)
            .await
    }

    /// The changelog's records from stream sequence `from` on, in order,
    /// but for the writes of partitions not in `followed` (those a reader
    /// writes itself, or keeps no copy of): every term marker and sync
    /// mark, and every record of the partitions followed. A record of
    /// another partition that is not a term marker — a write, or one that
    /// does not decode — is not read.
    pub async fn records_following(
        &self,
        from: u64,
        followed: &[u16],
    ) -> Result<impl futures::Stream<Item = Result<Record, ChangelogError>> + use<>, ChangelogError>
    {
        self.read(follower_filter(self.partitions, Some(followed)), from)
            .await
    }

    /// The stream sequence of partition `partition`'s last record (its
    /// last write or term marker), 0 if it has none.
    pub async fn partition_end(&self, partition: u16) -> Result<u64, ChangelogError> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let mut consumer = self
            .stream
            .create_consumer(OrderedConfig {
                filter_subjects: vec![format!("{PREFIX}.{partition}.>")],
                deliver_policy: DeliverPolicy::Last,
                ..Default::default()
            })
            .await
            .map_err(|e| remote(format!("finding partition {partition}'s last record: {e}")))?;
        let pending = consumer
            .info()
            .await
            .map_err(|e| remote(format!("finding partition {partition}'s last record: {e}")))?
            .num_pending;
        if pending == 0 {
            return Ok(0);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| remote(format!("finding partition {partition}'s last record: {e}")))?;
        let last = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| {
                remote(format!(
                    "finding partition {partition}'s last record: nothing came for 30 s"
                ))
            })?
            .ok_or_else(|| {
                remote(format!(
                    "finding partition {partition}'s last record: the reading ended"
                ))
            })?
            .map_err(|e| remote(format!("finding partition {partition}'s last record: {e}")))?;
        let seq = last
            .info()
            .map_err(|e| remote(format!("a changelog message without its metadata: {e}")))?
            .stream_sequence;
        Ok(seq)
    }

    /// Partition `partition`'s records from stream sequence `from` up to
    /// `until`, in order. The stream ends with the record at `until`, or
    /// before it once the partition held nothing more to read when the
    /// last record came: a record up to `until` may have expired or been
    /// purged since `until` was found, and none can be stored there later.
    /// A record past `until` (stored since) ends it unread. Ended by the
    /// server or the client before that, it ends with an error.
    pub async fn records_of(
        &self,
        partition: u16,
        from: u64,
        until: u64,
    ) -> Result<impl futures::Stream<Item = Result<Record, ChangelogError>> + use<>, ChangelogError>
    {
        let (pending, messages) = self
            .open(vec![format!("{PREFIX}.{partition}.>")], from, true)
            .await?;
        let done = pending == Some(0) || from > until;
        // Unfolded rather than scanned: a scan would wait for the message
        // after the last before ending.
        let messages = Box::pin(messages);
        Ok(futures::stream::unfold(
            (messages, done),
            move |(mut messages, done)| async move {
                if done {
                    return None;
                }
                let Some(read) = messages.next().await else {
                    // The server or the client ended it: not the end of
                    // the partition.
                    let ended = remote(format!(
                        "reading partition {partition}'s changelog up to {until}: it ended"
                    ));
                    return Some((Err(ended), (messages, true)));
                };
                if read.as_ref().is_ok_and(|(record, _)| record.seq() > until) {
                    // Stored after `until` was found, in place of what
                    // went: not the reader's.
                    return None;
                }
                let done = read
                    .as_ref()
                    .is_ok_and(|(record, left)| *left == 0 || record.seq() >= until);
                Some((read.map(|(record, _)| record), (messages, done)))
            },
        ))
    }

    async fn read(
        &self,
        filter_subjects: Vec<String>,
        from: u64,
    ) -> Result<impl futures::Stream<Item = Result<Record, ChangelogError>> + use<>, ChangelogError>
    {
        let (_, messages) = self.open(filter_subjects, from, false).await?;
        Ok(messages.map(|read| read.map(|(record, _)| record)))
    }

    /// Reads the messages on `filter_subjects` from stream sequence `from`
    /// on, each with how many were left to read after it when it was sent;
    /// if `count`, also how many there were to read when the reading began.
    async fn open(
        &self,
        filter_subjects: Vec<String>,
        from: u64,
        count: bool,
    ) -> Result<
        (
            Option<u64>,
            impl futures::Stream<Item = Result<(Record, u64), ChangelogError>> + use<>,
        ),
        ChangelogError,
    > {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let mut consumer = self
            .stream
            .create_consumer(OrderedConfig {
                filter_subjects,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| remote(format!("following the changelog: {e}")))?;
        let pending = if count {
            let info = consumer.info().await;
            Some(
                info.map_err(|e| remote(format!("following the changelog: {e}")))?
                    .num_pending,
            )
        } else {
            None
        };
        let messages = consumer
            .messages()
            .await
            .map_err(|e| remote(format!("following the changelog: {e}")))?;
        Ok((
            pending,
            messages.map(|m| {
                let m = m.map_err(|e| remote(format!("following the changelog: {e}")))?;
                let info = m.info().map_err(|e| {
                    remote(format!("a changelog message without its metadata: {e}"))
                })?;
                let (seq, left) = (info.stream_sequence, info.pending);
                let message = m.split().0;
                let record = decode(
                    seq,
                    message.subject.as_str(),
                    message.headers.as_ref(),
                    message.payload,
                );
                Ok((record, left))
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether NATS subject filter `filter` matches `subject`.
    fn matches(filter: &str, subject: &str) -> bool {
        let (mut f, mut s) = (filter.split('.'), subject.split('.'));
        loop {
            match (f.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// A follower of every partition but 3 and 9 of 16 reads every marker,
    /// the sync mark and the other partitions' records, each through
    /// exactly one filter (the server refuses overlapping ones), and not
    /// the writes of 3 and 9; following all, it reads everything.
    #[test]
    fn a_follower_reads_every_marker_and_the_writes_of_the_partitions_it_follows() {
        let followed: Vec<u16> = (0..16).filter(|p| ![3, 9].contains(p)).collect();
        let filter = follower_filter(16, Some(&followed));
        let through = |subject: &str| filter.iter().filter(|f| matches(f, subject)).count();
        for read in [
            "switchboard.changelog.sync",
            "switchboard.changelog.3.epoch",
            "switchboard.changelog.4.epoch",
            "switchboard.changelog.x.epoch",
            "switchboard.changelog.4.w.contacts.AAAA",
            "switchboard.changelog.15.w.journal.AAAA",
            "switchboard.changelog.0.junk.more",
        ] {
            assert_eq!(through(read), 1, "{read} through {filter:?}");
        }
        for passed in [
            "switchboard.changelog.3.w.contacts.AAAA",
            "switchboard.changelog.9.w.journal.AAAA",
            "switchboard.changelog.9.junk.more",
        ] {
            assert_eq!(through(passed), 0, "{passed} through {filter:?}");
        }
        let all: Vec<u16> = (0..16).collect();
        assert_eq!(follower_filter(16, Some(&all)), ["switchboard.changelog.>"]);
        assert_eq!(follower_filter(16, None), ["switchboard.changelog.>"]);
        let none = follower_filter(16, Some(&[]));
        assert_eq!(
            none,
            ["switchboard.changelog.*", "switchboard.changelog.*.*"]
        );
    }
}
