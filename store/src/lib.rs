//! The one store module: every piece of Switchboard state lives in a named
//! [`Collection`] of this store, and nothing else in the code base calls sled.
//!
//! The API is deliberately small — get, put, remove, ordered scans, atomic
//! multi-collection writes, compare-and-swap, flush — so that two backends
//! serve the crates above it unchanged:
//!
//! - [`Store::open`]: sled 0.34.7 alone, for one dispatcher. Writes are
//!   buffered; [`Store::flush`] makes everything written so far durable, and
//!   callers group-commit: one flush covers many writes.
//! - [`Store::replicated`]: several dispatcher replicas on one NATS JetStream
//!   cluster. Account configuration lives in a key-value bucket and every
//!   write to it is durable once it returns; reads come from a local sled
//!   copy fed by a watch of the bucket (see `replicated.rs`). The
//!   partitioned collections are written by their partition's owner and
//!   made durable by [`Store::flush`] through the partition changelog (see
//!   `partitioned.rs` and `changelog.rs`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

mod awake;
pub mod changelog;
mod key_locks;
mod partitioned;
mod replicated;

pub use key_locks::KeyLocks;

pub use partitioned::{forward, partition_of_account, partition_of_key};

pub use replicated::{BUCKET, Change, MARKER_TTL};

/// The named collections. Each is a sled tree of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    /// Current chain document of each account: `{account}` → document.
    Chains,
    /// Every version of each account's chains: `{account}\0{version:BE u64}` → document.
    ChainVersions,
    /// The embedded bus: `{sequence:BE u64}` → message.
    BusQueue,
    /// Ids seen by the embedded bus inside its duplicate window: `{id}` → time.
    BusDedup,
    /// Event traces as they were kept before they were derived from the
    /// journal: `{account}\0{event id}` → trace. Read once, by the migration.
    LegacyTraces,
    /// Dead letters: `{account}\0{dead-letter id}` → record.
    DeadLetters,
    /// Contacts: `{account}\0{contact key}` → contact.
    Contacts,
    /// Contact lookup: `{account}\0msisdn:{e164}` or `{account}\0email:{address}` → contact key.
    ContactIndex,
    /// Message records (SMS, e-mail): `{account}\0{message id}` → record.
    Messages,
    /// Account secrets: `{account}\0{name}` → value. Write-only through the API.
    Secrets,
    /// Step idempotency keys: `{account}\0{chain}\0{step}\0{sha-256 of key}` → time.
    Idempotency,
    /// Current version of each account's Rhai scripts: `{account}\0{name}` → record.
    Scripts,
    /// Every version of each script: `{account}\0{name}\0{version:BE u64}` → record.
    ScriptVersions,
    /// The step journal: `{account}\0{event id}\0{sequence:BE u64}` → the
    /// event's start time (BE u64 ms), a flag byte, and entries appended to
    /// its record (JSON). The trace is derived from it.
    Journal,
    /// The journal as it was kept before it was appended to: `{event id}` →
    /// record. Read once, by the migration.
    LegacyJournal,
    /// The legacy journal by age: `{started:BE u64 ms}\0{event id}` → empty.
    LegacyJournalTimes,
    /// API tokens of accounts: `{sha-256 of the token}` → record (account, id,
    /// name, creation time). The token itself is never stored.
    Tokens,
    /// Tokens by account: `{account}\0{token id}` → sha-256 of the token.
    TokenIndex,
    /// Message records by the provider's id: `{account}\0{channel}\0{remote id}` → message id.
    MessageRemoteIds,
    /// Inbound webhook URLs by the SHA-256 of their secret: `{sha-256}` → URL record.
    InboundHooks,
    /// Inbound webhook URLs of an account: `{account}\0{provider}` → SHA-256 of the secret.
    InboundIndex,
    /// Inbound records that matched nothing: `{account}\0{id (UUID v7)}` → record.
    Unmatched,
    /// Legacy traces by age: `{started:BE u64 ms}\0{account}\0{event id}` → empty.
    LegacyTraceTimes,
    /// Dispatcher replicas sharing the bus (replicated backend): `{replica id}`
    /// → its latest heartbeat.
    Replicas,
    /// The kinds of event each account has had, as this process consumed
    /// them: `{account}\0{conversation type}\0{event type}` → count, last
    /// seen, latest event id. Local to each replica (a hint for the console,
    /// not state of record).
    EventKinds,
    /// Events by when they were taken up, for listings:
    /// `{account}\0{started:BE u64 ms}\0{event id}` → empty. Written with a
    /// journal record's first write, expired with it.
    EventTimes,
    /// Web console sessions: `{sha-256 of the session id}` → whom it signed
    /// in, its CSRF token and when it expires. The id itself is never stored.
    ConsoleSessions,
    /// Current message template of each account and slug: `{account}\0{slug}` → version.
    Templates,
    /// Every version of each message template:
    /// `{account}\0{slug}\0{version:BE u64}` → version.
    TemplateVersions,
    /// Durable timers of paused chains (a `delay` step's):
    /// `{account}\0{due:BE u64 ms}\0{event id}\0{chain}` → empty. The
    /// event's journal record holds the rest.
    Timers,
    /// Paused runs that later events may reach (`cancel_on`, a
    /// `wait_for_event`): `{account}\0{event type}\0{paused event id}\0{chain}\0{kind}`
    /// → the match's condition.
    Waiters,
    /// Events that reached a paused run, for its next pass:
    /// `{account}\0{paused event id}\0{chain}\0{arriving event id}` → the kind and the event.
    Signals,
    /// Open digest windows: `{account}\0{chain}\0{step}\0{key}` → the event
    /// that opened it, when it closes, and how many events it holds.
    Digests,
    /// The events of each open digest window:
    /// `{account}\0{opening event id}\0{chain}\0{position:BE u32}` → the event.
    DigestEvents,
    /// Flow control of chains' runs, per key:
    /// `{account}\0{chain}\0{control}\0{key}` → the control's state (the
    /// turns given, the latest event, the runs holding a slot and those
    /// waiting for one).
    Flow,
    /// Preferences per address: `{account}\0{channel}\0{address}` → what
    /// the address opted in to and out of.
    Preferences,
    /// Signing keys of accounts: `{account}\0{purpose}` → the key (32
    /// random bytes), made on first use.
    SigningKeys,
    /// The addresses accounts own, for replies: `{transport}\0{address}` →
    /// the owner and when it was added.
    Numbers,
    /// The addresses of each account: `{account}\0{transport}\0{address}` →
    /// the same.
    NumberIndex,
    /// The latest message sent to each recipient from each sender, for
    /// replies: `{account}\0{channel}\0{recipient}\0{sender}` → message id.
    LatestSent,
    /// The files accounts keep (the embedded bus's; on NATS they live in a
    /// JetStream object store): `{account}\0{name}` → its description.
    Files,
    /// Their bytes: `{account}\0{name}` → the bytes.
    FileData,
    /// In-app notifications:
    /// `{account}\0{receiver}\0{created:BE u64 µs}\0{id}` → the notification.
    Inbox,
    /// Notifications by id: `{account}\0{id}` → its key in `Inbox`.
    InboxIds,
    /// Conversations held back behind an event sent back for a retry, as
    /// a graceful stop left them: `{account}\0{conversation}` → the event
    /// and when it is due. Read (and emptied) at the next start. Local to
    /// each process, like the embedded bus's own collections.
    HeldConversations,
    /// Where the bus consumers this process pulls got to (the single NATS
    /// dispatcher's): `{consumer}` → the events stream's creation time (BE
    /// i128 ns), the consumer's ack floor (BE u64) and when the message at
    /// it was stored (BE i128 ns). Local to each process, so that a
    /// consumer made anew starts after it.
    BusMarks,
}

impl Collection {
    /// Every collection, in a fixed order.
    pub const ALL: [Collection; 46] = [
        Collection::Chains,
        Collection::ChainVersions,
        Collection::BusQueue,
        Collection::BusDedup,
        Collection::LegacyTraces,
        Collection::DeadLetters,
        Collection::Contacts,
        Collection::ContactIndex,
        Collection::Messages,
        Collection::Secrets,
        Collection::Idempotency,
        Collection::Scripts,
        Collection::ScriptVersions,
        Collection::Journal,
        Collection::LegacyJournal,
        Collection::LegacyJournalTimes,
        Collection::Tokens,
        Collection::TokenIndex,
        Collection::MessageRemoteIds,
        Collection::InboundHooks,
        Collection::InboundIndex,
        Collection::Unmatched,
        Collection::LegacyTraceTimes,
        Collection::Replicas,
        Collection::EventKinds,
        Collection::EventTimes,
        Collection::ConsoleSessions,
        Collection::Templates,
        Collection::TemplateVersions,
        Collection::Timers,
        Collection::Waiters,
        Collection::Signals,
        Collection::Digests,
        Collection::DigestEvents,
        Collection::Flow,
        Collection::Preferences,
        Collection::SigningKeys,
        Collection::Numbers,
        Collection::NumberIndex,
        Collection::LatestSent,
        Collection::Files,
        Collection::FileData,
        Collection::Inbox,
        Collection::InboxIds,
        Collection::HeldConversations,
        Collection::BusMarks,
    ];

    /// The collection's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Collection::Chains => "chains",
            Collection::ChainVersions => "chain_versions",
            Collection::BusQueue => "bus_queue",
            Collection::BusDedup => "bus_dedup",
            Collection::LegacyTraces => "traces",
            Collection::DeadLetters => "dead_letters",
            Collection::Contacts => "contacts",
            Collection::ContactIndex => "contact_index",
            Collection::Messages => "messages",
            Collection::Secrets => "secrets",
            Collection::Idempotency => "idempotency",
            Collection::Scripts => "scripts",
            Collection::ScriptVersions => "script_versions",
            Collection::Journal => "event_journal",
            Collection::LegacyJournal => "journal",
            Collection::LegacyJournalTimes => "journal_times",
            Collection::Tokens => "tokens",
            Collection::TokenIndex => "token_index",
            Collection::MessageRemoteIds => "message_remote_ids",
            Collection::InboundHooks => "inbound_hooks",
            Collection::InboundIndex => "inbound_index",
            Collection::Unmatched => "unmatched",
            Collection::LegacyTraceTimes => "trace_times",
            Collection::Replicas => "replicas",
            Collection::EventKinds => "event_kinds",
            Collection::EventTimes => "event_times",
            Collection::ConsoleSessions => "console_sessions",
            Collection::Templates => "templates",
            Collection::TemplateVersions => "template_versions",
            Collection::Timers => "timers",
            Collection::Waiters => "waiters",
            Collection::Signals => "signals",
            Collection::Digests => "digests",
            Collection::DigestEvents => "digest_events",
            Collection::Flow => "flow",
            Collection::Preferences => "preferences",
            Collection::SigningKeys => "signing_keys",
            Collection::Numbers => "numbers",
            Collection::NumberIndex => "number_index",
            Collection::LatestSent => "latest_sent",
            Collection::Files => "files",
            Collection::FileData => "file_data",
            Collection::Inbox => "inbox",
            Collection::InboxIds => "inbox_ids",
            Collection::HeldConversations => "held_conversations",
            Collection::BusMarks => "bus_marks",
        }
    }

    /// Whether replicas share the collection through the key-value bucket
    /// (in the replicated backend): account configuration and the
    /// replicas' heartbeats; not the embedded bus's own collections, nor
    /// each replica's own [`Collection::EventKinds`] and
    /// [`Collection::HeldConversations`], nor the partitioned ones.
    pub fn is_shared(self) -> bool {
        !matches!(
            self,
            Collection::BusQueue
                | Collection::BusDedup
                | Collection::EventKinds
                | Collection::HeldConversations
                | Collection::BusMarks
        ) && !self.is_partitioned()
    }

    /// Whether the collection is written per event and belongs to the
    /// partition of the account its keys begin with (`{account}\0...`): in
    /// the replicated backend only the partition's owner writes it, and the
    /// partition's changelog makes it durable (`partitioned.rs`).
    pub fn is_partitioned(self) -> bool {
        matches!(
            self,
            Collection::Journal
                | Collection::EventTimes
                | Collection::DeadLetters
                | Collection::Contacts
                | Collection::ContactIndex
                | Collection::Messages
                | Collection::MessageRemoteIds
                | Collection::Idempotency
                | Collection::Unmatched
                | Collection::Timers
                | Collection::Waiters
                | Collection::Signals
                | Collection::Digests
                | Collection::DigestEvents
                | Collection::Flow
                | Collection::Preferences
                | Collection::LatestSent
                | Collection::Inbox
                | Collection::InboxIds
        )
    }

    /// Whether removals from the collection are housekeeping: the expiry of
    /// records kept for a while (journal, idempotency keys, replica
    /// heartbeats; the legacy journal and traces, which the migration
    /// empties). In the replicated backend's shared bucket their delete
    /// markers are dropped after [`MARKER_TTL`] instead of kept for ever,
    /// as are the changelog's (a replica whose copy missed one still holds
    /// the removed record until the partition's owner removes it again: the
    /// journal's sweep; the changelog's other markers are purged by their
    /// partition's owner once unneeded, `partitioned/cleaner.rs`). So that
    /// none missed is a record that must stay removed, only the journal's
    /// puts go in the changelog's packs, which may outlive a marker; the
    /// others' go on their key's subject, which the marker replaces.
    pub fn is_housekeeping(self) -> bool {
        matches!(
            self,
            Collection::Journal
                | Collection::EventTimes
                | Collection::LegacyJournal
                | Collection::LegacyJournalTimes
                | Collection::LegacyTraces
                | Collection::LegacyTraceTimes
                | Collection::Idempotency
                | Collection::Replicas
                | Collection::ConsoleSessions
                | Collection::Timers
                | Collection::Waiters
                | Collection::Signals
                | Collection::Digests
                | Collection::DigestEvents
        )
    }

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|c| *c == self)
            .expect("every collection is listed")
    }
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening the data directory failed (missing permissions, another process holds it, ...).
    #[error("opening the store at {path}: {source}")]
    Open {
        /// The data directory.
        path: String,
        /// What sled said.
        source: sled::Error,
    },
    /// Making writes durable failed.
    #[error("flushing the store: {message}")]
    Flush {
        /// What sled said.
        message: String,
    },
    /// The replicated backend's bucket refused or missed a write or read.
    #[error("shared state: {message}")]
    Remote {
        /// What failed, and what the NATS server said.
        message: String,
    },
    /// A write may or may not be stored: it was applied and the
    /// changelog's commit failed (on this replica, or on the partition's
    /// owner it was sent to), no answer came from the owner before the
    /// sender gave up, or the shared-state bucket did not acknowledge it in
    /// time. Reading it back tells; sending it again blindly may apply it
    /// twice, so this is not [`StoreError::is_transient`].
    #[error("shared state: {message}")]
    OutcomeUnknown {
        /// What failed.
        message: String,
    },
    /// An event's handling wrote a partition this replica no longer holds
    /// (another replica took it over meanwhile): the event is left to the
    /// partition's new owner, which redoes what was not made durable.
    #[error(
        "partition {partition} has moved to another replica: its state is no longer written here"
    )]
    PartitionMoved {
        /// The partition.
        partition: u16,
    },
    /// The backend cannot do this.
    #[error("the replicated store does not support {what}")]
    Unsupported {
        /// What was asked.
        what: &'static str,
    },
    /// A read or write failed.
    #[error("store collection {collection}: {source}")]
    Io {
        /// The collection involved.
        collection: &'static str,
        /// What sled said.
        source: sled::Error,
    },
}

impl StoreError {
    /// Whether trying again later may succeed without anyone acting: the
    /// shared state's server or a partition's owner did not answer or
    /// refused (a take-over, a leader election), or the partition moved.
    /// A local read or write that failed, a backend that cannot do
    /// something, or a write whose outcome is unknown, is not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Remote { .. } | StoreError::PartitionMoved { .. }
        )
    }
}

/// A key and value as stored.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One write of an atomic batch: `Some` puts, `None` removes.
#[derive(Debug, Clone)]
pub struct Write {
    /// The collection written.
    pub collection: Collection,
    /// The key.
    pub key: Vec<u8>,
    /// The new value, or `None` to remove.
    pub value: Option<Vec<u8>>,
}

/// The condition of a guarded batch: the value under `key` in `collection`
/// must pass `test`.
pub struct Guard<'a> {
    /// The collection read.
    pub collection: Collection,
    /// The key read.
    pub key: &'a [u8],
    /// Accepts or refuses what was found.
    pub test: &'a dyn Fn(Option<&[u8]>) -> bool,
}

impl std::fmt::Debug for Guard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("collection", &self.collection)
            .finish_non_exhaustive()
    }
}

/// The store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    trees: Arc<[sled::Tree]>,
    flusher: std::sync::mpsc::Sender<FlushWaiter>,
    flushes: Arc<FlushCounts>,
    /// The bucket, in the replicated backend.
    replica: Option<Arc<replicated::Replica>>,
    /// The partitioned collections' owner and changelog, in the replicated
    /// backend.
    partitioned: Option<Arc<partitioned::Partitioned>>,
    /// Where a write of a partitioned collection goes when this replica
    /// does not hold its partition, or no longer under the term it was
    /// asked for (see [`Store::handling_events`] and [`Store::under`]).
    route: Route,
    /// The change feeds of watched collections ([`Store::watch`]).
    watchers: Arc<std::sync::Mutex<Vec<Option<tokio::sync::broadcast::Sender<Watched>>>>>,
}

/// A change to a watched collection: its key and new value (`None` when
/// removed).
#[derive(Debug, Clone)]
pub struct Watched {
    /// The key.
    pub key: sled::IVec,
    /// The value now, or `None` when it was removed.
    pub value: Option<sled::IVec>,
}

/// How many changes a watcher may fall behind before it is told it lagged.
const WATCH_BUFFER: usize = 4096;

/// What becomes of a write of a partitioned collection that this replica
/// does not write itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Forwarded to the partition's owner (the API, inbound webhooks).
    Forward,
    /// Refused with [`StoreError::PartitionMoved`] (an event's handling).
    Refuse,
    /// Refused, and so is a write of the held partition unless this
    /// replica still holds it under the held term (one event's handling).
    Under(HeldTerm),
}

/// The group-commit thread's flushes: how many it has begun and finished.
#[derive(Debug, Default)]
struct FlushCounts {
    begun: AtomicU64,
    finished: AtomicU64,
}

/// Which partitions' state a replica of the replicated backend keeps a
/// copy of as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copies {
    /// Every partition's: any replica answers reads from its own copy.
    Every,
    /// None but those [`Store::keep_copies`] names later (its standby
    /// partitions), and those it holds.
    Assigned,
}

/// How a replica of the replicated backend shares its state: what
/// [`Store::replicated`] binds to and keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// How many servers of a JetStream cluster keep the bucket and the
    /// changelog.
    pub replicas: usize,
    /// How many partitions own the partitioned collections (as many as the
    /// events stream has).
    pub partitions: u16,
    /// Which partitions' state this replica keeps a copy of.
    pub copies: Copies,
    /// How long the changelog keeps a removal marker of a partition's
    /// record at least (its owner purges it once it is this old and a
    /// round of the cleaner made it unneeded:
    /// [`crate::changelog::Changelog::with_markers_kept`]).
    pub markers_kept: std::time::Duration,
}

impl Replication {
    /// `replicas` copies of the state in `partitions` partitions, of which
    /// this replica keeps `copies`; removal markers kept [`MARKER_TTL`].
    pub fn new(replicas: usize, partitions: u16, copies: Copies) -> Self {
        Self {
            replicas,
            partitions,
            copies,
            markers_kept: MARKER_TTL,
        }
    }
}

/// A partition's copy kept up on this replica while this lives (see
/// [`Store::copy_account`]).
#[derive(Debug)]
pub struct AccountCopy {
    watched: Option<(Arc<partitioned::Partitioned>, u16)>,
}

impl AccountCopy {
    /// Waits until the copy is whole (at once when it was already, or for
    /// the sled backend), for `within` at most; returns whether it is.
    pub async fn ready(&self, within: std::time::Duration) -> bool {
        let Some((p, partition)) = &self.watched else {
            return true;
        };
        let until = tokio::time::Instant::now() + within;
        while !p.reads_here(*partition) {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }
}

/// How long a partition stays copied after the last [`AccountCopy`] of it
/// goes: a client that reconnects (a browser's event stream does) finds the
/// copy there instead of waiting for it to be read whole again.
const COPY_LINGERS: std::time::Duration = std::time::Duration::from_secs(60);

impl Drop for AccountCopy {
    fn drop(&mut self) {
        if let Some((p, partition)) = self.watched.take() {
            p.unwatch_after(partition, COPY_LINGERS);
        }
    }
}

/// The term an event's writes are made under (see [`Store::holding`]);
/// the default holds nothing (writes of no partition).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holding(Option<HeldTerm>);

/// A partition and the term this replica held on it then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldTerm {
    partition: u16,
    term: Option<changelog::Term>,
}

/// Where a writer's writes begin (see [`Store::span`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSpan(u64);

/// A point in the store's writes: every write made before it is durable
/// once [`Store::is_durable`] says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMark(u64);

/// Someone waiting for a flush to cover their writes. The request carries the
/// database, so the flush thread holds it only while it flushes and a dropped
/// store closes (and unlocks) at once.
type FlushWaiter = (sled::Db, tokio::sync::oneshot::Sender<Result<(), String>>);

/// How long a flush asked for soon after the last one waits for more
/// callers to share it (a commit delay). Each flush writes and syncs the
/// store's log through sled's I/O threads, some 0.5 ms of CPU on the
/// development machine: on a busy dispatcher, flushes that each covered one
/// or two waiting steps cost more than the steps (the full chain: 0.84
/// flushes per event without a delay, 0.47 with 0.5 ms, 0.31 with 1.5 ms;
/// 1 ms adds at most that to a step that waits, and nothing to one on an
/// idle dispatcher).
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

/// Group commit: one thread flushes for every caller that asked while the
/// previous flush ran, or within [`COMMIT_DELAY`] of asking when the last
/// flush was that recent. (sled 0.34's `flush_async` can hang when several
/// callers flush at once, so it is not used.)
fn spawn_flusher(counts: Arc<FlushCounts>) -> std::sync::mpsc::Sender<FlushWaiter> {
    let (tx, rx) = std::sync::mpsc::channel::<FlushWaiter>();
    std::thread::Builder::new()
        .name("switchboard-flush".into())
        .spawn(move || {
            let mut last_flush = std::time::Instant::now() - COMMIT_DELAY;
            while let Ok((db, first)) = rx.recv() {
                let mut waiters = vec![first];
                if last_flush.elapsed() < COMMIT_DELAY {
                    let until = std::time::Instant::now() + COMMIT_DELAY;
                    while let Some(left) = until.checked_duration_since(std::time::Instant::now())
                        && let Ok((_, w)) = rx.recv_timeout(left)
                    {
                        waiters.push(w);
                    }
                }
                waiters.extend(rx.try_iter().map(|(_, w)| w));
                let n = counts.begun.fetch_add(1, Ordering::SeqCst) + 1;
                let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                last_flush = std::time::Instant::now();
                if result.is_ok() {
                    counts.finished.store(n, Ordering::SeqCst);
                }
                drop(db);
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        })
        .expect("starting the flush thread");
    tx
}

/// How long [`Store::open`] waits for sled to release a store's lock file
/// that a handle dropped in this process still holds.
const LOCK_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether sled refused to open a store because its lock file is held (it
/// says so only in its error's text).
fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

/// sled's page cache unless configured otherwise: the hot set is the
/// journal records of events in flight, recent contacts and the chains'
/// sources, and a larger cache mostly keeps records of events long done (a
/// 200,000-event drain peaked at 145 MiB with 64 MiB, 92 MiB with 16 MiB, at
/// the same CPU per event).
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`, with sled's page cache at
    /// [`DEFAULT_CACHE_BYTES`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir`, with sled's page cache at
    /// `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            // Durability comes from explicit group-commit flushes; the timer
            // only bounds what an unflushed crash can lose of the rest.
            .flush_every_ms(Some(1_000))
            .cache_capacity(cache_bytes);
        // sled lets go of its lock file only when its I/O threads are done
        // with the last handle, a moment after a store in this process is
        // dropped: a store reopened at once (a restart in process) waits for
        // that, briefly. Another process holding it still fails, as clearly.
        let waited_since = std::time::Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(source)
                    if is_lock_held(&source) && waited_since.elapsed() < LOCK_RELEASE_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: dir.display().to_string(),
                        source,
                    });
                }
            }
        };
        Self::from_db(db)
    }

    /// A store that lives in memory and a temporary directory, for tests.
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|source| StoreError::Open {
                path: "(temporary)".into(),
                source,
            })?;
        Self::from_db(db)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let trees = Collection::ALL
            .iter()
            .map(|c| {
                db.open_tree(c.name()).map_err(|source| StoreError::Io {
                    collection: c.name(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let flushes = Arc::new(FlushCounts::default());
        let flusher = spawn_flusher(flushes.clone());
        Ok(Self {
            db,
            trees,
            flusher,
            flushes,
            replica: None,
            partitioned: None,
            route: Route::Forward,
            watchers: Arc::default(),
        })
    }

    /// Opens the replicated store, connecting to any of the NATS `servers`:
    /// the shared collections in the JetStream
    /// key-value bucket [`BUCKET`] (created with `replicas` copies if
    /// missing), read through a local copy in `dir`, which is rebuilt from
    /// the bucket. The synchronous methods wait for the NATS server in
    /// place (on a multi-threaded runtime, in `block_in_place`).
    ///
    /// The partitioned collections ([`Collection::is_partitioned`]) are
    /// owned by partitions (`replication.partitions` of them, as the events
    /// stream has): see [`Store::take_partition`]. This replica keeps a
    /// copy of `replication.copies`.
    pub async fn replicated(
        dir: &Path,
        options: async_nats::ConnectOptions,
        servers: Vec<String>,
        replication: Replication,
    ) -> Result<Self, StoreError> {
        let mut store = Self::open(dir)?;
        let revisions =
            store
                .db
                .open_tree("replica_revisions")
                .map_err(|source| StoreError::Io {
                    collection: "replica_revisions",
                    source,
                })?;
        let (replica, partitioned) = replicated::Replica::start(
            options,
            servers,
            replication,
            store.trees.to_vec(),
            revisions,
        )
        .await?;
        store.replica = Some(replica);
        store.partitioned = Some(partitioned);
        Ok(store)
    }

    /// Whether this is the replicated backend.
    pub fn is_replicated(&self) -> bool {
        self.replica.is_some()
    }

    /// Whether the local copy holds everything the shared bucket held when
    /// the store opened (always, for the sled backend).
    pub fn is_caught_up(&self) -> bool {
        self.replica.as_ref().is_none_or(|r| r.is_caught_up())
    }

    /// Waits until [`Store::is_caught_up`].
    pub async fn caught_up(&self) {
        if let Some(r) = &self.replica {
            r.caught_up().await;
        }
    }

    /// The changes other replicas make to chains and scripts (which
    /// replicas also keep in memory), as the local copy applies them
    /// (`None` for the sled backend, where nobody else writes).
    pub fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        self.replica.as_ref().map(|r| r.subscribe())
    }

    /// Every change to `c` from now on, whoever makes it: this process's
    /// writes, and in the replicated backend the writes of other replicas
    /// as the local copy applies them. A watcher that falls more than
    /// 4,096 changes behind is told so ([`RecvError::Lagged`]) and never
    /// slows a writer down: one thread per watched collection moves sled's
    /// own feed into the channel.
    ///
    /// [`RecvError::Lagged`]: tokio::sync::broadcast::error::RecvError::Lagged
    pub fn watch(&self, c: Collection) -> tokio::sync::broadcast::Receiver<Watched> {
        let mut watchers = self.watchers.lock().expect("watchers lock");
        if watchers.is_empty() {
            watchers.resize(Collection::ALL.len(), None);
        }
        if let Some(tx) = &watchers[c.index()] {
            return tx.subscribe();
        }
        let (tx, rx) = tokio::sync::broadcast::channel(WATCH_BUFFER);
        let feed = self.tree(c).watch_prefix(Vec::<u8>::new());
        let sender = tx.clone();
        std::thread::Builder::new()
            .name(format!("switchboard-watch-{}", c.name()))
            .spawn(move || {
                for event in feed {
                    let watched = match event {
                        sled::Event::Insert { key, value } => Watched {
                            key,
                            value: Some(value),
                        },
                        sled::Event::Remove { key } => Watched { key, value: None },
                    };
                    // Nobody watching now is fine: a watcher may come later.
                    let _ = sender.send(watched);
                }
            })
            .expect("starting a watch thread");
        watchers[c.index()] = Some(tx);
        rx
    }

    /// The bucket, when `c` lives there.
    fn shared(&self, c: Collection) -> Option<&Arc<replicated::Replica>> {
        self.replica.as_ref().filter(|_| c.is_shared())
    }

    /// The partitions' owner, when `c` is partitioned in this backend.
    fn owned(&self, c: Collection) -> Option<&Arc<partitioned::Partitioned>> {
        self.partitioned.as_ref().filter(|_| c.is_partitioned())
    }

    /// The partitions' owner, when every write of `batch` is partitioned
    /// in this backend; an error when only some are.
    fn owned_batch(
        &self,
        batch: &[Write],
    ) -> Result<Option<&Arc<partitioned::Partitioned>>, StoreError> {
        let Some(p) = &self.partitioned else {
            return Ok(None);
        };
        match batch
            .iter()
            .filter(|w| w.collection.is_partitioned())
            .count()
        {
            0 => Ok(None),
            n if n == batch.len() => Ok(Some(p)),
            _ => Err(StoreError::Unsupported {
                what: "batches mixing partitioned collections with others",
            }),
        }
    }

    /// Keeps this replica's copy up of the partitions in `kept` besides
    /// those it holds (those it is a standby of), or of every partition
    /// (`None`, as the replicated store starts). Reads of a partition
    /// neither held nor copied here go to its owner; a partition kept anew
    /// is read whole from its changelog first. Nothing to do for the sled
    /// backend.
    pub fn keep_copies(&self, kept: Option<&[u16]>) {
        if let Some(p) = &self.partitioned {
            p.keep(kept.map(|k| k.iter().copied().collect()));
        }
    }

    /// Whether reads of `partition` are answered from this replica's copy
    /// (always, for the sled backend): it holds the partition, or keeps
    /// its copy up and has read it whole.
    pub fn copies_partition(&self, partition: u16) -> bool {
        self.partitioned
            .as_ref()
            .is_none_or(|p| p.reads_here(partition))
    }

    /// Keeps this replica's copy of `account`'s partition up while the
    /// returned guard lives, whatever [`Store::keep_copies`] says: for
    /// watching the account's changes here ([`Store::watch`] sees only what
    /// the local copy applies). [`AccountCopy::ready`] waits until the copy
    /// is whole.
    pub fn copy_account(&self, account: &str) -> AccountCopy {
        AccountCopy {
            watched: self.partitioned.as_ref().map(|p| {
                let partition = partition_of_account(account.as_bytes(), p.partitions());
                p.watch(partition);
                (p.clone(), partition)
            }),
        }
    }

    /// Begins this replica's term on `partition` (the bus hands it the
    /// partition's events): reads the partition's changelog up to the term's
    /// start, after which this replica writes the partition's state and
    /// every earlier owner's writes are refused. Nothing to do for the sled
    /// backend.
    pub async fn take_partition(&self, partition: u16) -> Result<(), StoreError> {
        match &self.partitioned {
            Some(p) => p.take(partition).await,
            None => Ok(()),
        }
    }

    /// The same store for handling events: a write to a partition this
    /// replica does not hold fails with [`StoreError::PartitionMoved`]
    /// instead of being forwarded to its owner. An event whose partition
    /// moved while it was handled must stop there, since what it holds in
    /// memory may include writes the changelog refused; the new owner
    /// handles it again from what is durable.
    pub fn handling_events(&self) -> Store {
        Store {
            route: Route::Refuse,
            ..self.clone()
        }
    }

    /// The same store for handling one event under `holding` (taken with
    /// [`Store::holding`] before the event was): as
    /// [`Store::handling_events`], and besides, a write of the held
    /// partition fails with [`StoreError::PartitionMoved`] unless this
    /// replica still holds it under the same term, and [`Store::flush`]
    /// fails unless the term is still current and none of its writes
    /// failed. An event whose partition was re-taken while it ran (its
    /// term ended, the partition was read again from the changelog, and a
    /// new term began here) must not go on writing under the new term:
    /// what it holds in memory may include writes the changelog refused.
    pub fn under(&self, holding: &Holding) -> Store {
        Store {
            route: holding.0.map_or(Route::Refuse, Route::Under),
            ..self.clone()
        }
    }

    /// Whether this replica holds a term on `partition` (always, for the
    /// sled backend).
    pub fn holds_partition(&self, partition: u16) -> bool {
        self.partitioned.as_ref().is_none_or(|p| p.holds(partition))
    }

    /// The partitions this replica holds a term on, in order; `None` for
    /// the sled backend.
    pub fn held_partitions(&self) -> Option<Vec<u16>> {
        self.partitioned.as_ref().map(|p| p.held())
    }

    /// What a handler of `account`'s events writes under now: the term of
    /// the account's partition (nothing to hold for the sled backend).
    /// Taken before an event is handled and checked with
    /// [`Store::still_holds`] before it is acked.
    pub fn holding(&self, account: &[u8]) -> Holding {
        match &self.partitioned {
            Some(p) => p.holding(account),
            None => Holding(None),
        }
    }

    /// Whether what was written under `holding` is durable once a flush
    /// after it succeeded: the term is still current and none of its
    /// writes was refused or failed. A flush answers for every write before
    /// it, but a write that failed is told to the flushes waiting then,
    /// which need not be the one its writer waits for; an event is acked
    /// only if this holds too.
    pub fn still_holds(&self, holding: &Holding) -> bool {
        match (&self.partitioned, holding.0) {
            (Some(p), Some(h)) => p.still_holds(h.partition, h.term),
            _ => true,
        }
    }

    /// Ends this replica's term on `partition` (handed over to another).
    pub fn release_partition(&self, partition: u16) {
        if let Some(p) = &self.partitioned {
            p.release(partition);
        }
    }

    /// Whether this replica writes `key` of `c` itself: always, except for
    /// a partitioned collection in the replicated backend whose partition
    /// another replica holds (its writes are forwarded there). Sweeps leave
    /// other replicas' keys to them.
    pub fn writes_locally(&self, c: Collection, key: &[u8]) -> bool {
        self.owned(c).is_none_or(|p| p.owns(key))
    }

    /// Changelog records this replica could not read and skipped, since
    /// start (0 for the sled backend).
    pub fn undecodable_records(&self) -> u64 {
        self.partitioned.as_ref().map_or(0, |p| p.undecodable())
    }

    fn tree(&self, c: Collection) -> &sled::Tree {
        &self.trees[c.index()]
    }

    /// Runs `read` of `c` on the local copy or, for a partition this
    /// replica keeps no copy of ([`Store::keep_copies`]), on the
    /// partition's owner. A read that may span accounts (a prefix short of
    /// a whole account) reads the local copy, which holds only the
    /// partitions kept here.
    fn read(
        &self,
        c: Collection,
        read: partitioned::reads::Read,
    ) -> Result<Vec<Entry>, StoreError> {
        if let Some(p) = self.owned(c)
            && let Some(key) = read.key()
        {
            let partition = p.partition_of(key);
            if !p.reads_here(partition) {
                return p.read_at_owner(partition, c, &read);
            }
        }
        read.run(c, self.tree(c))
    }

    /// The partition of `key` of `c` when this replica keeps no copy of it
    /// (its reads go to the owner).
    fn absent_partition(&self, c: Collection, key: &[u8]) -> Option<u16> {
        let p = self.owned(c)?;
        let partition = p.partition_of(key);
        (!p.reads_here(partition)).then_some(partition)
    }

    /// The value under `key`.
    pub fn get(&self, c: Collection, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.absent_partition(c, key).is_some() {
            let found = self.read(c, partitioned::reads::Read::Get(key.to_vec()))?;
            return Ok(found.into_iter().next().map(|(_, v)| v));
        }
        self.tree(c)
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(io(c))
    }

    /// The value under `key` as it stands now for every replica: in the
    /// replicated backend, read from the bucket (the local copy may not
    /// have another replica's latest write yet); otherwise [`Store::get`].
    pub fn get_latest(&self, c: Collection, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(r) = self.shared(c) {
            r.read_through(c, key)?;
        }
        if let Some(p) = self.owned(c)
            && !p.owns(key)
            && self.absent_partition(c, key).is_none()
        {
            p.catch_up()?;
        }
        self.get(c, key)
    }

    /// Puts `value` under `key`.
    pub fn put(&self, c: Collection, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if self.shared(c).is_some() || self.owned(c).is_some() {
            return self.write_one(&Write {
                collection: c,
                key: key.to_vec(),
                value: Some(value.to_vec()),
            });
        }
        self.tree(c).insert(key, value).map(|_| ()).map_err(io(c))
    }

    /// Puts `value` under `key` unless a value is there already. Returns whether it was put.
    pub fn put_if_absent(
        &self,
        c: Collection,
        key: &[u8],
        value: &[u8],
    ) -> Result<bool, StoreError> {
        if let Some(r) = self.shared(c) {
            return r.compare_and_swap(c, key, None, Some(value));
        }
        if self.owned(c).is_some() {
            return self.compare_and_swap(c, key, None, Some(value));
        }
        self.tree(c)
            .compare_and_swap(key, None as Option<&[u8]>, Some(value))
            .map(|r| r.is_ok())
            .map_err(io(c))
    }

    /// Removes `key`; returns the value it had.
    pub fn remove(&self, c: Collection, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.shared(c).is_some() || self.owned(c).is_some() {
            let old = self.get(c, key)?;
            if old.is_some() {
                self.write_one(&Write {
                    collection: c,
                    key: key.to_vec(),
                    value: None,
                })?;
            }
            return Ok(old);
        }
        self.tree(c)
            .remove(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(io(c))
    }

    /// Whether `key` is present.
    pub fn contains(&self, c: Collection, key: &[u8]) -> Result<bool, StoreError> {
        if self.absent_partition(c, key).is_some() {
            return self.get(c, key).map(|v| v.is_some());
        }
        self.tree(c).contains_key(key).map_err(io(c))
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, c: Collection, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.read(
            c,
            partitioned::reads::Read::Prefix {
                prefix: prefix.to_vec(),
                from: None,
                before: None,
                rev: false,
                limit: usize::MAX,
            },
        )
    }

    /// Up to `limit` entries with keys starting with `prefix`, walking backwards from the last.
    pub fn scan_prefix_rev(
        &self,
        c: Collection,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.scan_prefix_before(c, prefix, None, limit)
    }

    /// Up to `limit` entries whose keys start with `prefix` and sort before
    /// `before` (all of them when `None`), the last first.
    pub fn scan_prefix_before(
        &self,
        c: Collection,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.read(
            c,
            partitioned::reads::Read::Prefix {
                prefix: prefix.to_vec(),
                from: None,
                before: before.map(<[u8]>::to_vec),
                rev: true,
                limit,
            },
        )
    }

    /// Up to `limit` entries whose keys start with `prefix` and sort at
    /// or after `from`, in key order: a page of one account's records (of
    /// a partition this replica keeps no copy of, read at its owner).
    pub fn scan_prefix_from(
        &self,
        c: Collection,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.read(
            c,
            partitioned::reads::Read::Prefix {
                prefix: prefix.to_vec(),
                from: Some(from.to_vec()),
                before: None,
                rev: false,
                limit,
            },
        )
    }

    /// Up to `limit` entries with keys at or after `from`, in key order,
    /// from the local copy, whatever their account: for walking a whole
    /// collection (a replicated store's copy holds the partitions it
    /// holds and copies; a page of one account's records is
    /// [`Store::scan_prefix_from`]).
    pub fn scan_from(
        &self,
        c: Collection,
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.tree(c)
            .range(from.to_vec()..)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()
            .map_err(io(c))
    }

    /// Removes the entries of `c` whose keys start with `prefix` and sort
    /// before `before`, but those `keep` keeps, reading them a page at a
    /// time, the first first; at most `at_most` of them, so that a long run
    /// of them goes over several calls, each short, and what is left stays
    /// in one piece. Returns how many went.
    pub fn remove_prefix_before(
        &self,
        c: Collection,
        prefix: &[u8],
        before: &[u8],
        keep: impl Fn(&[u8]) -> bool,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        const PAGE: usize = 64;
        let (mut from, mut removed) = (prefix.to_vec(), 0);
        loop {
            // Keys only: the values (a version of all of an account's
            // chains, say) can be large.
            let page: Vec<Vec<u8>> = self
                .tree(c)
                .range(from.clone()..)
                .keys()
                .take(PAGE)
                .map(|k| k.map(|k| k.to_vec()))
                .collect::<Result<_, _>>()
                .map_err(io(c))?;
            for k in &page {
                if !k.starts_with(prefix) || k.as_slice() >= before || removed == at_most {
                    return Ok(removed);
                }
                if !keep(k) {
                    self.remove(c, k)?;
                    removed += 1;
                }
            }
            match page.last() {
                Some(k) if page.len() == PAGE => {
                    from.clone_from(k);
                    from.push(0);
                }
                _ => return Ok(removed),
            }
        }
    }

    /// Walks the whole of collection `c` (this replica's copy) in key
    /// order, `page` entries at a time, handing each page to `visit` (so
    /// that a long walk, such as an expiry sweep, holds no more than a page
    /// and no iterator over the tree while it writes).
    pub fn scan_pages<E: From<StoreError>>(
        &self,
        c: Collection,
        page: usize,
        mut visit: impl FnMut(Vec<Entry>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut from = Vec::new();
        loop {
            let entries = self.scan_from(c, &from, page.max(1))?;
            let Some((last, _)) = entries.last() else {
                return Ok(());
            };
            from.clone_from(last);
            from.push(0);
            visit(entries)?;
        }
    }

    /// The last entry of a collection.
    pub fn last(&self, c: Collection) -> Result<Option<Entry>, StoreError> {
        self.tree(c)
            .last()
            .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .map_err(io(c))
    }

    /// How many entries a collection holds (walks it: not for hot paths).
    pub fn len(&self, c: Collection) -> usize {
        self.tree(c).len()
    }

    /// Applies every write of `batch` atomically: all of them or none (an
    /// empty batch writes nothing).
    ///
    /// A batch of more than one write is a sled transaction, and every sled
    /// transaction writes the log out to disk at once (a `pwrite` and a
    /// `sync_file_range` per call, serialised with every other writer): keep
    /// them off paths taken per event, and use [`Store::write_in_order`]
    /// where an order makes a crash harmless.
    pub fn write_atomically(&self, batch: &[Write]) -> Result<(), StoreError> {
        match batch {
            [] => return Ok(()),
            // One key is atomic by itself.
            [only] => return self.write_one(only),
            _ => {}
        }
        if let Some(p) = self.owned_batch(batch)? {
            // The changelog stores a prefix of what is appended: written in
            // order, with the journal last, a crash part-way leaves the
            // event's record without the entry that says the rest was done
            // (a dead letter filed, or removed on a replay's success), and
            // its redelivery does it again.
            let mut ordered: Vec<Write> = batch.to_vec();
            ordered.sort_by_key(|w| w.collection == Collection::Journal);
            return p.write(self.route, &ordered, &[]).map(|_| ());
        }
        if let Some(r) = &self.replica {
            if batch.iter().any(|w| !w.collection.is_shared()) {
                return Err(StoreError::Unsupported {
                    what: "batches with the embedded bus's collections",
                });
            }
            return r.write_all(batch);
        }
        self.write_atomically_if(None, batch).map(|_| ())
    }

    /// Applies every write of `batch` atomically if the key written by
    /// `batch[new]` has no value yet (in the replicated backend: as the
    /// bucket says, whatever another replica wrote meanwhile); returns
    /// whether it did. For numbering versions: the caller reads the last
    /// number, writes the next, and on `false` reads again.
    pub fn write_atomically_creating(
        &self,
        batch: &[Write],
        new: usize,
    ) -> Result<bool, StoreError> {
        assert!(new < batch.len(), "the write that creates is in the batch");
        if let Some(p) = self.owned_batch(batch)? {
            return p.write(self.route, batch, &[(new, None)]);
        }
        if let Some(r) = &self.replica {
            if batch.iter().any(|w| !w.collection.is_shared()) {
                return Err(StoreError::Unsupported {
                    what: "batches with the embedded bus's collections",
                });
            }
            return r.write_all_expecting(batch, &[(new, None)]);
        }
        let w = &batch[new];
        self.write_atomically_if(
            Some(Guard {
                collection: w.collection,
                key: &w.key,
                test: &|found| found.is_none(),
            }),
            batch,
        )
    }

    /// Applies `batch` if, for each `(i, old)` of `expect`, the key written
    /// by `batch[i]` still holds `old` (`None`: absent); returns whether it
    /// did.
    ///
    /// In the replicated backend it is one atomic batch, checked by the
    /// stream at the commit against every other replica's writes: all of
    /// it, or nothing. With sled (one process, whose callers serialise
    /// their read-modify-writes) the writes go one after another, each
    /// expected one by compare-and-swap, and a refusal keeps the writes
    /// before it: order them as for [`Store::write_in_order`]. (No sled
    /// transaction: those write to disk at once.)
    pub fn write_expecting(
        &self,
        batch: &[Write],
        expect: &[(usize, Option<&[u8]>)],
    ) -> Result<bool, StoreError> {
        if let Some(p) = self.owned_batch(batch)? {
            let expect: Vec<(usize, Option<Vec<u8>>)> = expect
                .iter()
                .map(|(i, old)| (*i, old.map(<[u8]>::to_vec)))
                .collect();
            return p.write(self.route, batch, &expect);
        }
        if let Some(r) = &self.replica
            && batch.iter().all(|w| w.collection.is_shared())
        {
            return r.write_all_expecting(batch, expect);
        }
        for (i, w) in batch.iter().enumerate() {
            match expect.iter().find(|(at, _)| *at == i) {
                Some((_, old)) => {
                    if !self.compare_and_swap(w.collection, &w.key, *old, w.value.as_deref())? {
                        return Ok(false);
                    }
                }
                None => self.write_one(w)?,
            }
        }
        Ok(true)
    }

    /// Applies the writes of `batch` one after another, without a
    /// transaction. A crash can keep any prefix of them (the log is
    /// recovered up to its last complete write), so order them to make every
    /// prefix harmless: new index entries first, then the record they
    /// point at, then removals of stale index entries; when removing a
    /// record, the record first, then its index entries. Readers must take
    /// an index entry whose record is missing, or no longer matches, for
    /// no entry.
    pub fn write_in_order(&self, batch: &[Write]) -> Result<(), StoreError> {
        // (In the replicated backend, one publish after another: an atomic
        // batch would be one write fewer to wait for, but measured ten times
        // slower, see BENCHMARKS.md.)
        if let Some(p) = self.owned_batch(batch)?
            && !batch.is_empty()
        {
            return p.write(self.route, batch, &[]).map(|_| ());
        }
        batch.iter().try_for_each(|w| self.write_one(w))
    }

    fn write_one(&self, w: &Write) -> Result<(), StoreError> {
        if let Some(r) = self.shared(w.collection) {
            return r.write(w);
        }
        if let Some(p) = self.owned(w.collection) {
            return p
                .write(self.route, std::slice::from_ref(w), &[])
                .map(|_| ());
        }
        let tree = self.tree(w.collection);
        match &w.value {
            Some(v) => tree.insert(w.key.as_slice(), v.as_slice()).map(|_| ()),
            None => tree.remove(w.key.as_slice()).map(|_| ()),
        }
        .map_err(io(w.collection))
    }

    /// Replaces the value under `key` with `new` (`None` removes it) if it
    /// is still `old` (`None`: absent). Returns whether it was replaced.
    /// Atomic for the one key, without a transaction.
    pub fn compare_and_swap(
        &self,
        c: Collection,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        if let Some(r) = self.shared(c) {
            return r.compare_and_swap(c, key, old, new);
        }
        if let Some(p) = self.owned(c) {
            let w = Write {
                collection: c,
                key: key.to_vec(),
                value: new.map(<[u8]>::to_vec),
            };
            return p.write(self.route, &[w], &[(0, old.map(<[u8]>::to_vec))]);
        }
        self.tree(c)
            .compare_and_swap(key, old, new)
            .map(|r| r.is_ok())
            .map_err(io(c))
    }

    /// Reads the guard's key and, in the same transaction, applies `batch` if
    /// the guard's test accepts what it found (`None`: absent). Returns
    /// whether the batch was applied.
    pub fn write_atomically_if(
        &self,
        guard: Option<Guard<'_>>,
        batch: &[Write],
    ) -> Result<bool, StoreError> {
        if self.replica.is_some() {
            return Err(StoreError::Unsupported {
                what: "guarded batches (the embedded bus)",
            });
        }
        let mut involved: Vec<Collection> = batch.iter().map(|w| w.collection).collect();
        involved.extend(guard.as_ref().map(|g| g.collection));
        involved.sort_by_key(|c| c.index());
        involved.dedup();
        let view_of = |c: Collection| involved.iter().position(|x| *x == c).expect("listed above");
        let trees: Vec<sled::Tree> = involved.iter().map(|c| self.tree(*c).clone()).collect();
        use sled::transaction::{ConflictableTransactionError, Transactional};
        let result: Result<bool, sled::transaction::TransactionError<()>> =
            trees.as_slice().transaction(|views| {
                if let Some(g) = &guard {
                    let found = views[view_of(g.collection)].get(g.key)?;
                    if !(g.test)(found.as_deref()) {
                        return Ok(false);
                    }
                }
                for w in batch {
                    let view = &views[view_of(w.collection)];
                    match &w.value {
                        Some(v) => view.insert(w.key.as_slice(), v.as_slice())?,
                        None => view.remove(w.key.as_slice())?,
                    };
                }
                Ok::<bool, ConflictableTransactionError<()>>(true)
            });
        result.map_err(|e| match e {
            sled::transaction::TransactionError::Storage(source) => StoreError::Io {
                collection: "(batch)",
                source,
            },
            sled::transaction::TransactionError::Abort(()) => {
                unreachable!("the batch never aborts")
            }
        })
    }

    /// A number never handed out before by this store, increasing.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        self.db.generate_id().map_err(|source| StoreError::Io {
            collection: "(ids)",
            source,
        })
    }

    /// Makes every write so far durable. Concurrent callers share flushes.
    /// (In the replicated backend a write to the bucket is durable once it
    /// returns; writes of partitioned collections once the changelog has
    /// acknowledged them, which this waits for.)
    pub async fn flush(&self) -> Result<(), StoreError> {
        if let Some(p) = &self.partitioned {
            let n = self.flushes.begun.fetch_add(1, Ordering::SeqCst) + 1;
            p.commit().await?;
            self.flushes.finished.fetch_max(n, Ordering::SeqCst);
            // A commit answers for every write before it, but a failed
            // write's error may have gone to another commit: under a held
            // term, the term itself says whether its writes are stored.
            if let Route::Under(h) = self.route
                && !p.still_holds(h.partition, h.term)
            {
                return Err(StoreError::PartitionMoved {
                    partition: h.partition,
                });
            }
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let failed = |message: String| StoreError::Flush { message };
        self.flusher
            .send((self.db.clone(), tx))
            .map_err(|_| failed("the flush thread has stopped".into()))?;
        rx.await
            .map_err(|_| failed("the flush thread has stopped".into()))?
            .map_err(failed)
    }

    /// Marks where a writer's writes begin, for [`Store::flush_span`].
    pub fn span(&self) -> WriteSpan {
        WriteSpan(self.partitioned.as_ref().map_or(0, |p| p.last_number()))
    }

    /// Makes every write so far durable, as [`Store::flush`], and fails if
    /// any write of partition-owned state made since `span` failed. A
    /// flush answers for every write before it, but in the replicated
    /// backend a write that failed is told to the flushes waiting then,
    /// which need not be its writer's: a writer that must know its writes
    /// are durable (the API's, outside an event's handling) marks a span
    /// before them and flushes it. (A failure of another writer's write in
    /// the span fails it too: never an `Ok` for a write that was lost.)
    pub async fn flush_span(&self, span: WriteSpan) -> Result<(), StoreError> {
        let through = self.span();
        self.flush().await?;
        match &self.partitioned {
            Some(p) => p.check_span(span.0, through.0),
            None => Ok(()),
        }
    }

    /// How many group-commit flushes the store has begun.
    pub fn flushes(&self) -> u64 {
        self.flushes.begun.load(Ordering::Relaxed)
    }

    /// Marks the writes made so far, by any thread: they are durable once a
    /// [`Store::flush`] that began after this call has finished.
    pub fn mark(&self) -> WriteMark {
        WriteMark(self.flushes.begun.load(Ordering::SeqCst) + 1)
    }

    /// Whether the writes made before `mark` are durable (as far as
    /// [`Store::flush`] knows: other flushes are not counted).
    pub fn is_durable(&self, mark: WriteMark) -> bool {
        self.flushes.finished.load(Ordering::SeqCst) >= mark.0
    }

    /// Makes every write so far durable, blocking the thread.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        if self.replica.is_some() {
            return Ok(());
        }
        self.db
            .flush()
            .map(|_| ())
            .map_err(|source| StoreError::Io {
                collection: "(flush)",
                source,
            })
    }
}

fn io(c: Collection) -> impl Fn(sled::Error) -> StoreError {
    move |source| StoreError::Io {
        collection: c.name(),
        source,
    }
}

/// Joins key parts with NUL, which no key part may contain.
pub fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

#[cfg(test)]
mod tests;
