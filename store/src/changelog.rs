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
//!   purge of packs reaches (and which expires after [`crate::MARKER_TTL`]
//!   for housekeeping collections). The puts of housekeeping collections
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use crate::Collection;
use crate::replicated::{bucket_key, parse_key};

mod pack;

use pack::{Outgoing, PACK_RECORDS, PACK_TOKEN, outgoing, packs_of, unpack};

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
        })
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
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    0
                }
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

    /// An appender: publishes writes under their terms, many in flight.
    /// Spawns its task on the current runtime.
    pub fn appender(&self) -> Appender {
        let (commits, rx) = mpsc::unbounded_channel();
        let inbox = Arc::<Inbox>::default();
        let broken = Arc::default();
        let failed = Arc::default();
        tokio::spawn(append_task(
            self.js.clone(),
            self.publishing,
            (Arc::clone(&broken), Arc::clone(&failed)),
            (Arc::clone(&inbox), rx),
        ));
        Appender {
            inbox,
            commits,
            broken,
            numbers: Arc::default(),
            failed,
        }
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

    /// Partition `partition`'s records from stream sequence `from` on.
    pub async fn records_of(
        &self,
        partition: u16,
        from: u64,
    ) -> Result<impl futures::Stream<Item = Result<Record, ChangelogError>> + use<>, ChangelogError>
    {
        self.read(vec![format!("{PREFIX}.{partition}.>")], from)
            .await
    }

    async fn read(
        &self,
        filter_subjects: Vec<String>,
        from: u64,
    ) -> Result<impl futures::Stream<Item = Result<Record, ChangelogError>> + use<>, ChangelogError>
    {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let consumer = self
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
        let messages = consumer
            .messages()
            .await
            .map_err(|e| remote(format!("following the changelog: {e}")))?;
        Ok(messages.map(|m| {
            let m = m.map_err(|e| remote(format!("following the changelog: {e}")))?;
            let seq = m
                .info()
                .map_err(|e| remote(format!("a changelog message without its metadata: {e}")))?
                .stream_sequence;
            let message = m.split().0;
            Ok(decode(
                seq,
                message.subject.as_str(),
                message.headers.as_ref(),
                message.payload,
            ))
        }))
    }
}

/// Queues writes for publishing and waits for their acknowledgements.
/// Cheap to clone; clones share the task and its order.
#[derive(Debug, Clone)]
pub struct Appender {
    /// The writes appended and not yet taken by the task.
    inbox: Arc<Inbox>,
    /// Commits, to the task: each answered once every write appended
    /// before it is acknowledged.
    commits: mpsc::UnboundedSender<Commit>,
    /// The terms whose writes were refused or failed: none of their later
    /// writes is stored.
    broken: Broken,
    /// The number of the last write appended (writes are numbered from 1).
    numbers: Arc<AtomicU64>,
    /// The numbers of the writes that failed.
    failed: Arc<Mutex<Failed>>,
}

/// The terms whose writes were refused or failed, and why.
type Broken = Arc<Mutex<HashMap<Term, ChangelogError>>>;

/// The numbers of the writes that failed, as ranges, the latest
/// [`FAILED_KEPT`]; of older ones, only the highest number is kept.
#[derive(Debug, Default)]
struct Failed {
    ranges: std::collections::VecDeque<(u64, u64)>,
    forgotten_up_to: u64,
}

/// How many ranges of failed writes are kept to answer
/// [`Appender::failed_since`] exactly; a span older than the ones forgotten
/// is answered as failed.
const FAILED_KEPT: usize = 1024;

impl Failed {
    fn add(&mut self, numbers: &[u64]) {
        let (Some(first), Some(last)) = (numbers.iter().min(), numbers.iter().max()) else {
            return;
        };
        if self.ranges.len() == FAILED_KEPT
            && let Some((_, l)) = self.ranges.pop_front()
        {
            self.forgotten_up_to = self.forgotten_up_to.max(l);
        }
        self.ranges.push_back((*first, *last));
    }

    /// Whether a write numbered in `(since, through]` failed (or may have).
    fn any_in(&self, since: u64, through: u64) -> bool {
        self.forgotten_up_to > since
            || self
                .ranges
                .iter()
                .any(|(first, last)| *first <= through && *last > since)
    }
}

/// A commit waiting for its answer: the number of the last write
/// appended before it, and where the answer goes.
type Commit = (u64, oneshot::Sender<Result<(), ChangelogError>>);

/// The writes appended and not yet taken by the appender's task. Not every
/// write wakes the task (that costs a wake-up of another thread per
/// write): one appended while none waited does, so that its linger begins,
/// and one that makes [`PACK_RECORDS`] wait (of any partitions); between
/// those the task takes them when it wakes anyway, for a commit, a
/// linger's end or a batch answered. So a partition's pack's worth may
/// wait up to [`LINGER`] for its batch.
#[derive(Default)]
struct Inbox {
    writes: Mutex<Vec<Queued>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    /// Queues a write numbered next by `numbers`; returns its number. The
    /// number is taken under the inbox's lock, so a write whose number a
    /// commit read is in the inbox by the time the task looks.
    fn push(&self, numbers: &AtomicU64, term: Term, change: Change, ttl: Option<Duration>) -> u64 {
        let (number, waiting) = {
            let mut writes = self.writes.lock().expect("inbox lock");
            let number = numbers.fetch_add(1, AtomicOrdering::SeqCst) + 1;
            writes.push((number, term, change, ttl));
            (number, writes.len())
        };
        if waiting == 1 || waiting == PACK_RECORDS {
            self.wake.notify_one();
        }
        number
    }

    /// Moves every write appended so far into `into` (empty).
    fn take(&self, into: &mut Vec<Queued>) {
        std::mem::swap(&mut *self.writes.lock().expect("inbox lock"), into);
    }
}

impl Appender {
    /// Queues `change` to `term`'s partition; returns its number. It is
    /// durable once a later [`Appender::commit`] returned and neither
    /// [`Appender::is_broken`] holds for `term` nor
    /// [`Appender::failed_since`] for a number before it. Calls must be
    /// serialised (the caller holds a lock): numbers follow their order.
    pub fn append(&self, term: Term, change: Change) -> u64 {
        let ttl = (change.value.is_none() && change.collection.is_housekeeping())
            .then_some(crate::MARKER_TTL);
        self.inbox.push(&self.numbers, term, change, ttl)
    }

    /// The number of the last write appended so far.
    pub fn last_number(&self) -> u64 {
        self.numbers.load(AtomicOrdering::SeqCst)
    }

    /// Whether a write numbered after `since` and up to `through` failed:
    /// exact once a commit asked for after the write at `through` returned
    /// (a failure is recorded before any commit is answered).
    pub fn failed_since(&self, since: u64, through: u64) -> bool {
        self.failed
            .lock()
            .expect("failed lock")
            .any_in(since, through)
    }

    /// Waits until the stream has every write appended before this call:
    /// `Err` if any of them was refused or failed (a fenced term, the server
    /// unreachable), naming the first.
    pub async fn commit(&self) -> Result<(), ChangelogError> {
        let (tx, rx) = oneshot::channel();
        let through = self.numbers.load(AtomicOrdering::SeqCst);
        self.commits
            .send((through, tx))
            .map_err(|_| remote("the changelog's appender has stopped"))?;
        rx.await
            .map_err(|_| remote("the changelog's appender has stopped"))?
    }

    /// Whether a write of `term` was refused or failed for good: then the
    /// changelog may lack writes made under it, whatever a later commit
    /// answered. Known before any commit waiting for the write is answered.
    pub fn is_broken(&self, term: Term) -> bool {
        self.broken.lock().expect("broken lock").contains_key(&term)
    }
}

/// One write waiting for its batch: its number, term, change and the time
/// to live of a removal marker.
type Queued = (u64, Term, Change, Option<Duration>);

/// Publishes appended writes, one batch in flight per partition (and the
/// partitions' batches at once), and answers each commit once every write
/// appended before it is stored or has failed.
///
/// A batch that fails because the stream is unavailable is sent again
/// ([`publish_term_batch`]), so a commit waits through a stream electing a
/// new leader instead of failing while the local copy keeps writes the
/// changelog lacks. A term whose batch was fenced, or kept failing, is
/// broken: it is marked so in `broken` before any commit is answered, and
/// its later writes are not sent but fail at once. The failure fails every
/// waiting commit asked for after the failed batch's first write was
/// appended, or, if none is waiting, the next commit. Commits are not told
/// whose writes they cover, so a writer that asks for its commit later
/// checks [`Appender::is_broken`] for the term it wrote under.
async fn append_task(
    js: jetstream::Context,
    publishing: Publishing,
    (broken, failed): (Broken, Arc<Mutex<Failed>>),
    (inbox, mut asked): (Arc<Inbox>, mpsc::UnboundedReceiver<Commit>),
) {
    // What the inbox held, moved out of it under its lock.
    let mut appended = Vec::new();
    let mut queued: BTreeMap<u16, std::collections::VecDeque<Queued>> = BTreeMap::new();
    let mut busy = std::collections::BTreeSet::new();
    let mut flights = FuturesUnordered::new();
    let mut unacked = std::collections::BTreeSet::new();
    let mut commits: BTreeMap<u64, Vec<oneshot::Sender<Result<(), ChangelogError>>>> =
        BTreeMap::new();
    // Waiting commits to be answered with an error, by their key.
    let mut doomed: BTreeMap<u64, ChangelogError> = BTreeMap::new();
    // A failure no waiting commit was told of: the next commit's answer.
    let mut untold: Option<ChangelogError> = None;
    // Names this appender's batches so that one sent again after its
    // answer was lost is known as stored ([`publish_batch`]).
    let writer: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
    let mut open = true;
    // When the oldest write waiting for its batch was taken from the inbox
    // (about when it was appended: a write to an empty inbox wakes the
    // task).
    let mut waiting_since: Option<tokio::time::Instant> = None;
    // A commit received, registered once the writes before it are taken.
    let mut asked_for: Option<Commit> = None;
    loop {
        // The writes appended so far: before the commit just received is
        // registered (they were pushed before it was sent), and before the
        // task ends (no one appends once every appender is gone).
        inbox.take(&mut appended);
        if !appended.is_empty() {
            waiting_since.get_or_insert_with(tokio::time::Instant::now);
        }
        for (number, term, change, ttl) in appended.drain(..) {
            unacked.insert(number);
            queued
                .entry(term.partition)
                .or_default()
                .push_back((number, term, change, ttl));
        }
        if let Some((through, reply)) = asked_for.take() {
            if unacked.first().is_none_or(|oldest| *oldest > through) {
                let _ = reply.send(untold.take().map_or(Ok(()), Err));
            } else {
                if let Some(e) = untold.take() {
                    doomed.insert(through, e);
                }
                commits.entry(through).or_default().push(reply);
            }
        }
        if !(open || !flights.is_empty() || !queued.is_empty()) {
            break;
        }
        // A batch for each partition with writes waiting and none in flight
        // (the writes of one term, in order), once they are wanted: a
        // commit waits, a pack's worth waits, the oldest has waited
        // [`LINGER`], or the appender is closing. Until then writes gather,
        // so that a batch's puts share few messages.
        let lingered = waiting_since.is_some_and(|since| since.elapsed() >= LINGER);
        let wanted = !commits.is_empty() || lingered || !open;
        for (p, waiting) in queued.iter_mut() {
            if busy.contains(p) || waiting.is_empty() || !(wanted || waiting.len() >= PACK_RECORDS)
            {
                continue;
            }
            let term = waiting[0].1;
            let mut batch = Vec::new();
            while batch.len() < BATCH
                && let Some(w) = waiting.front()
                && w.1 == term
            {
                batch.extend(waiting.pop_front());
            }
            busy.insert(*p);
            let js = js.clone();
            let writer = Arc::clone(&writer);
            let refused = broken.lock().expect("broken lock").get(&term).cloned();
            flights.push(async move {
                let numbers: Vec<u64> = batch.iter().map(|w| w.0).collect();
                let published = match refused {
                    Some(e) => Err(e),
                    None => publish_term_batch(&js, publishing, &writer, term, &batch).await,
                };
                (term, numbers, published)
            });
        }
        queued.retain(|_, w| !w.is_empty());
        if queued.is_empty() {
            waiting_since = None;
        } else if wanted {
            // What is left waits for a batch in flight: no sooner than that.
            waiting_since = Some(tokio::time::Instant::now());
        }
        let linger = async {
            match waiting_since {
                Some(since) => tokio::time::sleep_until(since + LINGER).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = linger => {}
            () = inbox.wake.notified(), if open => {}
            commit = asked.recv(), if open => match commit {
                None => open = false,
                Some(reply) => asked_for = Some(reply),
            },
            Some((term, numbers, result)) = flights.next(), if !flights.is_empty() => {
                busy.remove(&term.partition);
                for n in &numbers {
                    unacked.remove(n);
                }
                if let Err(e) = result {
                    broken.lock().expect("broken lock").entry(term).or_insert_with(|| e.clone());
                    failed.lock().expect("failed lock").add(&numbers);
                    let first = numbers.first().copied().unwrap_or(0);
                    let waiting: Vec<u64> = commits.range(first..).map(|(k, _)| *k).collect();
                    if waiting.is_empty() {
                        untold.get_or_insert(e);
                    } else {
                        for k in waiting {
                            doomed.entry(k).or_insert_with(|| e.clone());
                        }
                    }
                }
                // Every commit waiting for nothing older than the oldest
                // unacknowledged write is answered.
                let oldest = unacked.first().copied().unwrap_or(u64::MAX);
                let done: Vec<u64> = commits.range(..oldest).map(|(k, _)| *k).collect();
                for k in done {
                    let answer = doomed.remove(&k).map_or(Ok(()), Err);
                    for reply in commits.remove(&k).unwrap_or_default() {
                        let _ = reply.send(answer.clone());
                    }
                }
            }
        }
    }
}

/// How long an appended write waits for a commit (or a pack's worth of
/// writes of its partition) before it is published anyway: writes that no
/// one commits (yet) reach the other replicas about this soon.
const LINGER: Duration = Duration::from_millis(5);

/// How long a batch is sent again while the stream is unavailable before
/// its term gives up ([`ChangelogError::Gap`]; the last try may add the
/// publish's own timeout). A clustered stream that lost its leader elects
/// another after a random 4–9 s, and a split vote (both nodes left
/// standing at once) starts another round: several rounds fit in a
/// minute, on a machine busy enough to slow the votes too. Giving up
/// sooner would not let the partition be written sooner (that needs a
/// leader either way), only end the term. The events waiting for the
/// commit are reported in progress meanwhile (the dispatcher's settler).
/// What waits as long: a stop (after its grace period), a hand-over, and
/// a forwarded write, whose sender keeps asking the owner for its answer
/// a little longer than this (`FORWARD_DEADLINE` in `partitioned.rs`).
pub(crate) const RETRY_FOR: Duration = Duration::from_secs(60);

/// Publishes `batch` under `term`, sending it again while the stream is
/// unavailable (with a pause growing to a second) until it is stored,
/// fenced, refused, or [`RETRY_FOR`] has passed. Sending a batch again is
/// safe: an atomic batch was stored whole or not at all (and once only,
/// [`publish_batch`]), and writes sent one by one are sent
/// again in their order, so each key ends with the batch's last value for
/// it, and the fence still refuses all of them once another term began.
async fn publish_term_batch(
    js: &jetstream::Context,
    publishing: Publishing,
    writer: &str,
    term: Term,
    batch: &[Queued],
) -> Result<(), ChangelogError> {
    let messages = outgoing(term.partition, writer, batch);
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let result = match publishing {
            Publishing::Atomic => publish_batch(js, writer, term, batch, &messages).await,
            Publishing::EachFenced => publish_each(js, term, batch.len(), &messages).await,
        };
        let e = match result {
            Ok(()) => return Ok(()),
            Err(ChangelogError::Unavailable(e)) => e,
            Err(e @ ChangelogError::Fenced { .. }) => return Err(e),
            // Refused (too large, say): sending it again would not help.
            Err(e) => {
                return Err(ChangelogError::Gap {
                    partition: term.partition,
                    epoch: term.epoch,
                    message: e.to_string(),
                });
            }
        };
        if started.elapsed() >= RETRY_FOR {
            return Err(ChangelogError::Gap {
                partition: term.partition,
                epoch: term.epoch,
                message: format!("{e}, still after {RETRY_FOR:?} of sending it again"),
            });
        }
        tracing::warn!(partition = term.partition, epoch = term.epoch, error = %e,
            "writing to the changelog failed; sending the batch again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// How a partition's queued writes are published.
///
/// Why two ways: an atomic batch is what a clustered stream needs (see
/// [`append_task`]), and on a clustered stream the server stages it in
/// memory. On a stream with one copy the server stages every atomic batch
/// in a file store of its own, made for the batch and deleted after it,
/// while it holds the stream's lock: 100–250 ms a batch on the two-core
/// development machine, whatever its size, with every partition's batch
/// waiting for the others'. A dispatcher started on a backlog acked nothing
/// for a second. With one copy nothing is in flight between the server's
/// check of a header and its store, so every write can carry the epoch
/// check itself: they are published one after another, all in flight at
/// once, in order on the one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publishing {
    /// One atomic batch, the check on its first write (several copies).
    Atomic,
    /// Every write checked on its own, many in flight (one copy).
    EachFenced,
}

impl Publishing {
    fn for_replicas(replicas: usize) -> Self {
        if replicas > 1 {
            Self::Atomic
        } else {
            Self::EachFenced
        }
    }
}

/// The headers of a message: its removal mark and time to live, and with
/// `fence` the check that `term` is still the partition's latest.
fn write_headers(term: Term, message: &Outgoing, fence: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if fence {
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            term.epoch.to_string().as_str(),
        );
        headers.insert(
            EXPECTED_SUBJECT_HEADER,
            epoch_subject(term.partition).as_str(),
        );
    }
    if message.removal {
        headers.insert(OP_HEADER, "del");
    }
    if let Some(ttl) = message.ttl {
        headers.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            ttl.as_secs().to_string().as_str(),
        );
    }
    headers
}

/// Whether a publish was refused because the partition's epoch moved on.
fn fenced(e: &jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    is_wrong_sequence(e)
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<JsError>())
            .is_some_and(|s| s.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE)
}

/// Writes of one partition in flight at once when each is published on its
/// own: the JetStream context lets 5,000 publishes await their acks in all,
/// and sixteen partitions' full batches (8,000) waiting on it, none reading
/// an ack, would wait forever.
const EACH_IN_FLIGHT: usize = 64;

/// Publishes the `writes` of a batch under `term`, carried by `messages`,
/// one message at a time, each fenced by the term's epoch,
/// [`EACH_IN_FLIGHT`] in flight together; waits for every acknowledgement.
/// The server stores them in the order sent: once one is refused as fenced,
/// every later one is too. Any other failure may leave later messages
/// stored after a lost one: the caller sends the whole batch again
/// ([`publish_term_batch`]).
async fn publish_each(
    js: &jetstream::Context,
    term: Term,
    writes: usize,
    messages: &[Outgoing],
) -> Result<(), ChangelogError> {
    let failed = |e: &jetstream::context::PublishError| send_failed(term, writes, e);
    for chunk in messages.chunks(EACH_IN_FLIGHT) {
        let mut acks = Vec::with_capacity(chunk.len());
        for message in chunk {
            let headers = write_headers(term, message, true);
            let ack = js
                .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
                .await
                .map_err(|e| failed(&e))?;
            acks.push(ack.into_future());
        }
        let mut first_error = None;
        for result in futures::future::join_all(acks).await {
            if let Err(e) = result {
                if fenced(&e) {
                    return Err(ChangelogError::Fenced {
                        partition: term.partition,
                        epoch: term.epoch,
                    });
                }
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(failed(&e));
        }
    }
    Ok(())
}

/// Writing `n` records of `term`'s partition failed with `e`.
fn batch_failed(term: Term, n: usize, e: &dyn std::fmt::Display) -> ChangelogError {
    remote(format!(
        "writing {n} records to partition {}: {e}",
        term.partition
    ))
}

/// Writing `n` records of `term`'s partition failed with `e`: worth
/// sending again ([`ChangelogError::Unavailable`]) when the stream was not
/// reached or did not answer, not when it refused the writes.
fn send_failed(term: Term, n: usize, e: &jetstream::context::PublishError) -> ChangelogError {
    use async_nats::jetstream::context::PublishErrorKind as Kind;
    match e.kind() {
        Kind::StreamNotFound | Kind::TimedOut | Kind::BrokenPipe | Kind::MaxAckPending => {
            ChangelogError::Unavailable(format!(
                "writing {n} records to partition {}: {e}",
                term.partition
            ))
        }
        _ => batch_failed(term, n, e),
    }
}

/// Most writes in one atomic batch (nats-server accepts 1,000).
const BATCH: usize = 500;

/// How many times a batch is sent again while the stream cannot check its
/// epoch yet (another replica's batch on the partition in flight).
const NOT_READY_TRIES: u32 = 50;

/// Publishes `batch` under `term` as one atomic batch, fenced by the term's
/// epoch; the stream stores all of it or none.
///
/// The batch's first write carries a message id made of `writer` and its
/// number: a batch sent again after the stream stored it but its answer was
/// lost (the leader lost between the two) is refused by the stream's
/// duplicate window as containing a stored id, storing nothing, and counts
/// as stored, so no batch is stored twice. A batch the stream dropped part
/// of (its first writes sent to a leader that then went away) is sent again
/// whole under a new batch id.
async fn publish_batch(
    js: &jetstream::Context,
    writer: &str,
    term: Term,
    batch: &[Queued],
    messages: &[Outgoing],
) -> Result<(), ChangelogError> {
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    let unavailable = |e: &dyn std::fmt::Display| {
        ChangelogError::Unavailable(format!(
            "writing {} records to partition {}: {e}",
            batch.len(),
            term.partition
        ))
    };
    let last = messages.len() - 1;
    let message_id = format!("{writer}-{}", batch[0].0);
    for _ in 0..NOT_READY_TRIES {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut result = Ok(());
        for (i, message) in messages.iter().enumerate() {
            let mut headers = write_headers(term, message, i == 0);
            headers.insert(async_nats::header::NATS_BATCH_ID, id.as_str());
            headers.insert(
                async_nats::header::NATS_BATCH_SEQUENCE,
                (i + 1).to_string().as_str(),
            );
            if i == 0 {
                headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
            }
            let subject = message.subject.clone();
            let payload = message.payload.clone();
            if i < last {
                js.client()
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| unavailable(&e))?;
                continue;
            }
            headers.insert(async_nats::header::NATS_BATCH_COMMIT, "1");
            let acked = match js.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            result = acked.map(|_| ());
        }
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if fenced(&e) {
            return Err(ChangelogError::Fenced {
                partition: term.partition,
                epoch: term.epoch,
            });
        }
        let code = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<JsError>())
            .map(|s| s.error_code());
        match code {
            // Stored by an earlier send whose answer was lost.
            Some(ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE) => return Ok(()),
            Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
            | Some(ErrorCode::STREAM_EXPECTED_LAST_SEQ_PER_SUBJECT_NOT_READY) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // The batch as sent can never be stored: sending it again
            // would not help.
            Some(
                ErrorCode::ATOMIC_PUBLISH_DISABLED
                | ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER
                | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_ID
                | ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH
                | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_COMMIT,
            ) => return Err(batch_failed(term, batch.len(), &e)),
            // Any other answer from the stream (a batch missing writes sent
            // to a leader that went away, too many batches in flight, the
            // cluster electing a leader) may pass once sent again.
            Some(_) => return Err(unavailable(&e)),
            None => return Err(send_failed(term, batch.len(), &e)),
        }
    }
    Err(unavailable(
        &"the stream kept answering that it cannot check the partition's epoch yet",
    ))
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

    /// A writer's span fails if a write numbered in it failed, whichever
    /// commit was told; spans before or after the failure do not; a span
    /// older than the failures forgotten is answered as failed.
    #[test]
    fn a_span_fails_exactly_when_a_write_in_it_failed() {
        let mut failed = Failed::default();
        failed.add(&[10, 11, 12]);
        assert!(failed.any_in(9, 10), "the failed batch's first write");
        assert!(failed.any_in(11, 20), "a span over the failed batch's end");
        assert!(!failed.any_in(0, 9), "a span before the failure");
        assert!(!failed.any_in(12, 30), "a span after the failure");
        for n in 0..FAILED_KEPT as u64 {
            failed.add(&[1000 + n]);
        }
        assert!(failed.any_in(5, 6), "forgotten: older spans are failed");
        assert!(!failed.any_in(12, 999), "between failures still kept");
        assert!(failed.any_in(1000 + FAILED_KEPT as u64 - 2, u64::MAX));
    }
}
