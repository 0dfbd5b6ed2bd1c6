//! Partition-owned state in the replicated backend: the collections written
//! per event ([`Collection::is_partitioned`]) belong to the partition of
//! their account, and only the replica holding a term on the partition
//! writes them.
//!
//! - **The owner** writes into its local sled copy and appends each write to
//!   the partition's changelog ([`crate::changelog`]); [`crate::Store::flush`]
//!   waits for the changelog to acknowledge every write so far (group
//!   commit). No compare-and-set or atomic batch reaches the server: a
//!   compare-and-swap is decided on the local copy, which no one else
//!   writes.
//! - **Every other replica** follows the changelog into its local copy (a
//!   standby), so its reads are at most the follow delay behind, and a
//!   take-over reads only the tail. The follower does not read back the
//!   writes of the partitions this replica holds (its consumer's filter
//!   leaves them out, so they cost neither the server nor this replica):
//!   when the partitions held change it reads again with the new filter,
//!   from where it stood when a term of its ended, if one did. A write it
//!   is asked for (by the API, an inbound webhook, a sweep) is forwarded to
//!   the owner, which makes it, commits it and answers.
//! - **The owner compacts** its partitions' changelogs: puts travel in
//!   packs, which the stream does not compact by itself, so it writes a
//!   partition's live records again now and then and purges the packs
//!   from before them ([`cleaner`]).
//!
//! The follower is `follower.rs`; the owner's serving of forwarded writes
//! and reads, and the sending of a forwarded write, `serve.rs` (the wire
//! formats: [`forward`], [`reads`]).
//! - **A term begins** when the bus hands this replica the partition (its
//!   fence opened: the last holder settled, or its pin timed out). The
//!   marker fences the last holder's writes; the replica then reads the
//!   partition's changelog up to the marker before it handles an event. A
//!   replica whose term ended (handed over, or fenced while paused) rebuilds
//!   the partition from the changelog before it begins another: writes the
//!   changelog refused may still be in its copy.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, oneshot, watch};

use crate::changelog::{Appender, Change, Changelog, Record, Term};
use crate::replicated::block_on;
use crate::{Collection, Route, StoreError, Write, io};

mod cleaner;
mod follower;
pub mod forward;
pub(crate) mod reads;
mod serve;

/// How many times a forwarded write is sent while no owner takes it (a
/// take-over in progress) or an owner refuses it without applying it, half
/// a second apart. The write (the API's, an inbound webhook's, a sweep's)
/// fails after that, saying why.
const FORWARD_TRIES: u32 = 6;

/// Why an owner refuses a forwarded write or read of `partition`: its
/// `term` here has ended.
fn not_held(partition: u16, term: Term) -> String {
    format!(
        "partition {partition} is no longer held here (epoch {})",
        term.epoch
    )
}

/// How many reads of other replicas an owner answers at once (each a page
/// of [`reads::PAGE`] entries scanned on the blocking pool).
const READS_AT_ONCE: usize = 4;

/// How long a forwarded write waits for the owner's answer before it is
/// sent again (with the same id: the owner answers it once,
/// [`forward::Answers`]).
const FORWARD_WAIT: Duration = Duration::from_secs(5);

/// How long a sender keeps sending a write that an owner may have taken
/// and not answered: past the longest the owner's commit usually waits
/// (through a leader election of the changelog's stream, bounded by
/// `RETRY_FOR` and one publish's timeout), so that a write that went in
/// is answered as such.
const FORWARD_DEADLINE: Duration = Duration::from_secs(crate::changelog::RETRY_FOR.as_secs() + 15);

/// How long a reader waits for the follower to reach a point of the
/// changelog before it reports the follower behind.
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

/// A key of collection `c`, in 128 bits (two SipHashes under the random
/// keys of `state`): for telling keys apart in a set without holding them.
fn fingerprint(state: &std::hash::RandomState, c: Collection, key: &[u8]) -> u128 {
    use std::hash::BuildHasher;
    let half = |seed: u8| state.hash_one((seed, c.index(), key));
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

/// The partition of an account: FNV-1a (32 bits) of its key, modulo the
/// partition count, as the events stream's `partition()` subject transform
/// computes it, so that state and events agree on the owner.
pub fn partition_of_account(account: &[u8], partitions: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in account {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(partitions)) as u16
}

/// The partition of a partitioned collection's key: of the account it
/// begins with ([`account_of_key`]).
pub fn partition_of_key(key: &[u8], partitions: u16) -> u16 {
    partition_of_account(account_of_key(key), partitions)
}

/// The account a partitioned collection's key begins with: up to the first
/// NUL. An account's keys are `{account}` and `{account}\0…`, so they lie
/// together, all below `{account}\x01`.
pub(crate) fn account_of_key(key: &[u8]) -> &[u8] {
    key.split(|b| *b == 0).next().unwrap_or_default()
}

/// What [`PartitionEntries`] looked at: an entry of its partition, or the
/// keys of an account of another partition, passed over.
pub(crate) enum Look {
    Entry(sled::IVec, sled::IVec),
    Passed,
}

/// A partition's entries in a tree of a partitioned collection, in key
/// order: the keys of each account of another partition are passed over
/// with one seek (to `{account}\x01`, see [`account_of_key`]), so reading
/// a partition costs its entries and a look per account, not the tree.
pub(crate) struct PartitionEntries<'a> {
    tree: &'a sled::Tree,
    partitions: u16,
    partition: u16,
    entries: sled::Iter,
    /// Where the entries not looked at yet begin.
    next: Vec<u8>,
}

impl<'a> PartitionEntries<'a> {
    pub(crate) fn new(tree: &'a sled::Tree, partitions: u16, partition: u16) -> Self {
        Self {
            tree,
            partitions,
            partition,
            entries: tree.iter(),
            next: Vec::new(),
        }
    }

    /// Goes on from the tree as it is now. sled's iterator keeps a copy of
    /// the leaf it is in and reads on from that copy: values written since
    /// it began that leaf (a key changed or removed) come only from a fresh
    /// one. A reader that lets writers in between its looks calls this
    /// before it reads on.
    pub(crate) fn reread(&mut self) {
        self.entries = self.tree.range(self.next.as_slice()..);
    }
}

impl Iterator for PartitionEntries<'_> {
    type Item = sled::Result<Look>;

    fn next(&mut self) -> Option<Self::Item> {
        let (key, value) = match self.entries.next()? {
            Ok(entry) => entry,
            Err(e) => return Some(Err(e)),
        };
        let account = account_of_key(&key);
        if partition_of_account(account, self.partitions) == self.partition {
            self.next.clear();
            self.next.extend_from_slice(&key);
            self.next.push(0);
            return Some(Ok(Look::Entry(key, value)));
        }
        let mut past = account.to_vec();
        past.push(1);
        self.entries = self.tree.range(past.as_slice()..);
        self.next = past;
        Some(Ok(Look::Passed))
    }
}

fn remote(message: impl std::fmt::Display) -> StoreError {
    StoreError::Remote {
        message: message.to_string(),
    }
}

/// The partitions whose copy a replica keeps up besides those it holds.
#[derive(Debug, Default)]
struct Kept {
    /// Every partition (`None`), or those it is a standby of.
    assigned: Option<BTreeSet<u16>>,
    /// Partitions whose changes someone here watches (a live inbox stream),
    /// each with how many watch it.
    watched: HashMap<u16, usize>,
}

impl Kept {
    fn keeps(&self, partition: u16) -> bool {
        self.assigned
            .as_ref()
            .is_none_or(|a| a.contains(&partition))
            || self.watched.contains_key(&partition)
    }
}

/// A replica's partition-owned state.
pub(crate) struct Partitioned {
    changelog: Changelog,
    appender: Appender,
    client: async_nats::Client,
    handle: tokio::runtime::Handle,
    trees: Vec<sled::Tree>,
    partitions: u16,
    /// This replica's name in its term markers.
    me: String,
    /// The partitions this replica holds a term on. Taken with `order`
    /// held by whoever also applies or appends, so that a partition's
    /// writes reach the local copy in the changelog's order.
    terms: Mutex<HashMap<u16, Term>>,
    /// Serialises local writes of partitioned collections with their
    /// appends, and the follower's applying with terms beginning.
    order: Mutex<()>,
    /// Each partition's last term marker as the follower read it.
    markers: Mutex<HashMap<u16, u64>>,
    /// Partitions whose term ended: the local copy may hold writes the
    /// changelog refused.
    dirty: Mutex<BTreeSet<u16>>,
    /// Partitions held here while the follower was out of touch with the
    /// changelog (`follower.rs`): read anew whole if the term turns out to
    /// have been taken over.
    held_out_of_touch: Mutex<BTreeSet<u16>>,
    /// Partitions being read again from the changelog for a term that has
    /// not begun here yet: the follower leaves them alone.
    rebuilding: Mutex<BTreeSet<u16>>,
    /// The partitions whose copy this replica keeps up besides those it
    /// holds.
    kept: Mutex<Kept>,
    /// Partitions neither held here nor copied: not kept, or kept and not
    /// read whole yet. Their reads go to their owner. Each is also dirty.
    absent: Mutex<BTreeSet<u16>>,
    /// The absent partitions whose records the local copy no longer holds.
    emptied: Mutex<BTreeSet<u16>>,
    /// Each partition the follower read whole, with how far: its records
    /// up to there that the follower reads again are not applied again.
    copied_through: Mutex<HashMap<u16, u64>>,
    /// Held while a partition's copy is made whole from its changelog, by a
    /// take or by the follower for a partition it begins to keep: one at a
    /// time, so that neither applies an older value over the other's.
    copying: tokio::sync::Mutex<()>,
    /// The last changelog sequence the follower applied or passed.
    applied: watch::Sender<u64>,
    /// Tells the follower that the partitions held changed: it reads the
    /// changelog again without the writes of those held now.
    refilter: Arc<Notify>,
    /// Where the follower reads from again after a term ended here: the
    /// partition's writes from then on are others' and must be applied.
    reread_from: Mutex<Option<u64>>,
    /// Records the follower could not read.
    undecodable: AtomicU64,
    /// Stops the forwarded-write service of each partition held.
    serving: Mutex<HashMap<u16, oneshot::Sender<()>>>,
    /// The forwarded writes in flight here and those answered lately, for
    /// their senders' sending them again.
    answers: Mutex<forward::Answers>,
    /// Reads answered for other replicas: at most [`READS_AT_ONCE`] page
    /// scans at once.
    reading: Arc<tokio::sync::Semaphore>,
    /// What the changelog's cleaner counts ([`cleaner`]).
    tally: cleaner::Tally,
}

impl std::fmt::Debug for Partitioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitioned")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Partitioned {
    /// Binds to the changelog on `client`'s server, empties the local
    /// copies of the partitioned collections and starts following the
    /// changelog from its start, on `handle`'s runtime: every partition's
    /// records, or none but its term markers until [`Partitioned::keep`]
    /// names some (`replication.copies`).
    pub(crate) async fn start(
        client: async_nats::Client,
        handle: tokio::runtime::Handle,
        trees: Vec<sled::Tree>,
        replication: crate::Replication,
    ) -> Result<Arc<Self>, StoreError> {
        let crate::Replication {
            replicas,
            partitions,
            copies,
            markers_kept,
        } = replication;
        let js = jetstream::new(client.clone());
        let changelog = Changelog::bind(js, partitions, replicas)
            .await
            .map_err(remote)?
            .with_markers_kept(markers_kept);
        for c in Collection::ALL.into_iter().filter(|c| c.is_partitioned()) {
            trees[c.index()].clear().map_err(|source| StoreError::Io {
                collection: c.name(),
                source,
            })?;
        }
        let target = changelog.sync().await.map_err(remote)?;
        let (assigned, absent) = match copies {
            crate::Copies::Every => (None, BTreeSet::new()),
            crate::Copies::Assigned => (Some(BTreeSet::new()), (0..partitions).collect()),
        };
        let this = Arc::new(Self {
            appender: changelog.appender(),
            changelog,
            client,
            handle,
            trees,
            partitions,
            me: uuid::Uuid::now_v7().simple().to_string(),
            terms: Mutex::default(),
            order: Mutex::default(),
            markers: Mutex::default(),
            dirty: Mutex::new(absent.clone()),
            held_out_of_touch: Mutex::default(),
            rebuilding: Mutex::default(),
            kept: Mutex::new(Kept {
                assigned,
                watched: HashMap::new(),
            }),
            emptied: Mutex::new(absent.clone()),
            absent: Mutex::new(absent),
            copied_through: Mutex::default(),
            copying: tokio::sync::Mutex::default(),
            applied: watch::Sender::new(0),
            refilter: Arc::default(),
            reread_from: Mutex::default(),
            undecodable: AtomicU64::new(0),
            serving: Mutex::default(),
            answers: Mutex::default(),
            reading: Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE)),
            tally: cleaner::Tally::new(partitions),
        });
        tokio::spawn(Self::follow(Arc::downgrade(&this), this.refilter.clone()));
        tokio::spawn(Self::clean(Arc::downgrade(&this)));
        this.wait_applied(target).await;
        Ok(this)
    }

    pub(crate) fn partitions(&self) -> u16 {
        self.partitions
    }

    pub(crate) fn partition_of(&self, key: &[u8]) -> u16 {
        partition_of_key(key, self.partitions)
    }

    fn term(&self, partition: u16) -> Option<Term> {
        self.terms
            .lock()
            .expect("terms lock")
            .get(&partition)
            .copied()
    }

    /// Whether this replica holds a term on `partition`.
    pub(crate) fn holds(&self, partition: u16) -> bool {
        self.term(partition).is_some()
    }

    /// Whether this replica keeps its copy of `partition` up when it does
    /// not hold it.
    fn keeps(&self, partition: u16) -> bool {
        self.kept.lock().expect("kept lock").keeps(partition)
    }

    /// Keeps this replica's copy up of the partitions in `assigned` besides
    /// those it holds (those it is a standby of), or of every partition
    /// (`None`, as it starts); and of those watched ([`Partitioned::watch`]).
    pub(crate) fn keep(&self, assigned: Option<BTreeSet<u16>>) {
        self.change_kept(|kept| kept.assigned = assigned);
    }

    /// Keeps this replica's copy of `partition` up until
    /// [`Partitioned::unwatch`] is called as often as this was.
    pub(crate) fn watch(&self, partition: u16) {
        self.change_kept(|kept| *kept.watched.entry(partition).or_default() += 1);
    }

    /// [`Partitioned::unwatch`], `after` from now (on this replica's
    /// runtime: not at all once it has stopped, the store being gone).
    pub(crate) fn unwatch_after(self: Arc<Self>, partition: u16, after: Duration) {
        let this = Arc::downgrade(&self);
        let handle = self.handle.clone();
        drop(self);
        handle.spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(this) = this.upgrade() {
                this.unwatch(partition);
            }
        });
    }

    pub(crate) fn unwatch(&self, partition: u16) {
        self.change_kept(|kept| {
            if let Some(n) = kept.watched.get_mut(&partition) {
                *n -= 1;
                if *n == 0 {
                    kept.watched.remove(&partition);
                }
            }
        });
    }

    /// Changes the partitions kept. One no longer kept is absent from here
    /// on: its reads go to its owner, the follower empties its copy, and a
    /// take reads it whole. One kept anew is read whole by the follower,
    /// and answered here once it is.
    fn change_kept(&self, change: impl FnOnce(&mut Kept)) {
        let _order = self.order.lock().expect("order lock");
        let mut kept = self.kept.lock().expect("kept lock");
        let before: Vec<bool> = (0..self.partitions).map(|p| kept.keeps(p)).collect();
        change(&mut kept);
        let mut changed = false;
        for (p, was) in (0..self.partitions).zip(before) {
            let keeps = kept.keeps(p);
            changed |= keeps != was;
            if was && !keeps && self.term(p).is_none() {
                self.absent.lock().expect("absent lock").insert(p);
                self.dirty.lock().expect("dirty lock").insert(p);
            }
        }
        if changed {
            tracing::info!(assigned = ?kept.assigned, watched = ?kept.watched.keys().collect::<Vec<_>>(),
                "the partitions this replica keeps a copy of changed");
            self.refilter.notify_one();
        }
    }

    /// Whether reads of `partition` are answered here: this replica holds
    /// it, or keeps its copy up and has read it whole.
    pub(crate) fn reads_here(&self, partition: u16) -> bool {
        self.holds(partition)
            || !self
                .absent
                .lock()
                .expect("absent lock")
                .contains(&partition)
    }

    /// The partitions this replica holds a term on, in order.
    pub(crate) fn held(&self) -> Vec<u16> {
        let mut held: Vec<u16> = self
            .terms
            .lock()
            .expect("terms lock")
            .keys()
            .copied()
            .collect();
        held.sort_unstable();
        held
    }

    /// The term this replica writes `account`'s partition under now.
    pub(crate) fn holding(&self, account: &[u8]) -> crate::Holding {
        let partition = partition_of_account(account, self.partitions);
        crate::Holding(Some(crate::HeldTerm {
            partition,
            term: self.term(partition),
        }))
    }

    /// Whether `holding`'s term is still current and none of its writes
    /// failed: every write made under it and covered by a successful
    /// commit is in the changelog. A term found broken ends here.
    pub(crate) fn still_holds(&self, partition: u16, term: Option<Term>) -> bool {
        // Handled while the partition was not held here: whatever it wrote
        // went under a term taken since, which it cannot vouch for.
        let Some(t) = term else { return false };
        if self.term(partition) != Some(t) {
            return false;
        }
        if self.appender.is_broken(t) {
            self.end_term(t);
            return false;
        }
        true
    }

    /// Ends this replica's term on `partition` if `ends` says so of it;
    /// returns whether it did. The caller holds the order lock, so that no
    /// write of the term is applied after it ends. `deposed`: another
    /// replica took the partition (a newer marker, a refused write) while
    /// this one held it.
    fn end_term_if(&self, partition: u16, deposed: bool, ends: impl FnOnce(&Term) -> bool) -> bool {
        let mut terms = self.terms.lock().expect("terms lock");
        let Some(term) = terms.get(&partition).copied().filter(ends) else {
            return false;
        };
        terms.remove(&partition);
        drop(terms);
        self.ended(term, deposed);
        true
    }

    /// Ends `term` if it is still this replica's term on its partition: its
    /// writes failed or were refused.
    fn end_term(&self, term: Term) {
        let _order = self.order.lock().expect("order lock");
        if self.end_term_if(term.partition, true, |ours| *ours == term) {
            tracing::warn!(
                partition = term.partition,
                epoch = term.epoch,
                "the partition's term ended: its writes failed or were refused; the \
                 partition is read again from the changelog when taken again"
            );
        }
    }

    /// Whether this replica writes `key` itself (it holds the partition).
    pub(crate) fn owns(&self, key: &[u8]) -> bool {
        self.term(self.partition_of(key)).is_some()
    }

    /// Records the follower could not read, since start.
    pub(crate) fn undecodable(&self) -> u64 {
        self.undecodable.load(Ordering::Relaxed)
    }

    async fn wait_applied(&self, seq: u64) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|a| *a >= seq).await;
    }

    /// A term of this replica's ended: its copy of the partition may hold
    /// refused writes, and it no longer serves the partition's writes.
    /// Ended after this replica was out of touch with the changelog while
    /// it held the partition (deposed, or released before the follower read
    /// the next owner's marker), the copy is read anew whole (its reads go
    /// to the owner meanwhile): it may lack removals the next owner made,
    /// whose markers may be purged by now.
    fn ended(&self, term: Term, deposed: bool) {
        let partition = term.partition;
        self.dirty.lock().expect("dirty lock").insert(partition);
        let out_of_touch = self
            .held_out_of_touch
            .lock()
            .expect("out of touch lock")
            .remove(&partition);
        if out_of_touch || !self.keeps(partition) {
            self.absent.lock().expect("absent lock").insert(partition);
        }
        // The follower skipped the partition's writes: from here on they are
        // the next owner's, to be applied. Handed over, the next owner's
        // marker comes after what was applied (the order lock is held, so
        // no record past `applied` has been applied). Deposed, other
        // owners may have written the partition since the term began, and
        // their markers may be gone from the stream (it keeps the last of
        // each subject): read again from the term's own marker.
        let next = *self.applied.borrow() + 1;
        self.reread_from(if deposed {
            next.min(term.epoch + 1)
        } else {
            next
        });
        self.refilter.notify_one();
        if let Some(stop) = self
            .serving
            .lock()
            .expect("serving lock")
            .remove(&partition)
        {
            let _ = stop.send(());
        }
    }

    /// Begins a term on `partition` and brings the local copy of it up to
    /// the term's marker: from there on this replica writes it.
    pub(crate) async fn take(self: &Arc<Self>, partition: u16) -> Result<(), StoreError> {
        let this = self.clone();
        self.handle
            .spawn(async move { this.take_here(partition).await })
            .await
            .map_err(|e| remote(format!("taking partition {partition}: {e}")))?
    }

    async fn take_here(self: &Arc<Self>, partition: u16) -> Result<(), StoreError> {
        if self.term(partition).is_some() {
            // Still current as far as the follower knows; if another
            // replica fenced it meanwhile, the next commit ends it.
            return Ok(());
        }
        // The marker the follower saw last saves asking the stream for it.
        let known = self
            .markers
            .lock()
            .expect("markers lock")
            .get(&partition)
            .copied()
            .unwrap_or(0);
        let term = self
            .changelog
            .begin_term_after(partition, &self.me, Some(known))
            .await
            .map_err(remote)?;
        // A copy is made whole by one reader at a time (the follower reads
        // partitions kept anew whole too).
        let mut copying = Some(self.copying.lock().await);
        let rebuild = self.dirty.lock().expect("dirty lock").remove(&partition);
        // What the follower applied before it began leaving the partition
        // to a rebuild.
        let mut skipped_from = None;
        let caught_up = if rebuild {
            // The copy may hold writes the changelog refused: read the
            // partition again from its start. Meanwhile the follower leaves
            // the partition to this reader, and nothing writes it here: the
            // term counts only once the copy is rebuilt.
            {
                let _order = self.order.lock().expect("order lock");
                self.rebuilding
                    .lock()
                    .expect("rebuilding lock")
                    .insert(partition);
                skipped_from = Some(*self.applied.borrow() + 1);
            }
            self.rebuild(partition, term.epoch).await
        } else {
            // The follower may need the lock to reach the marker.
            drop(copying.take());
            // The follower brings the partition up to the marker (nothing
            // of it can be stored after the marker but this term's own
            // writes); the term counts from there.
            tokio::time::timeout(CATCH_UP_WAIT, self.wait_applied(term.epoch))
                .await
                .map_err(|_| {
                    remote(format!(
                        "taking partition {partition}: the changelog's follower has not reached \
                         its marker {} in {CATCH_UP_WAIT:?}",
                        term.epoch
                    ))
                })
        };
        let caught_up = {
            let _order = self.order.lock().expect("order lock");
            self.rebuilding
                .lock()
                .expect("rebuilding lock")
                .remove(&partition);
            let caught_up = caught_up
                .and_then(|()| self.still_copied(partition, rebuild))
                .and_then(|()| self.no_later_term(partition, term));
            match &caught_up {
                Ok(()) => {
                    self.copied_through
                        .lock()
                        .expect("copied lock")
                        .remove(&partition);
                    self.absent.lock().expect("absent lock").remove(&partition);
                    self.emptied
                        .lock()
                        .expect("emptied lock")
                        .remove(&partition);
                    self.tally.begin(partition);
                    self.terms
                        .lock()
                        .expect("terms lock")
                        .insert(partition, term);
                    // The follower stops reading this partition's writes.
                    self.refilter.notify_one();
                }
                Err(_) => {
                    self.dirty.lock().expect("dirty lock").insert(partition);
                    // The follower left the partition's records since then
                    // to the rebuild, which did not make the copy whole:
                    // it reads them again.
                    if let Some(from) = skipped_from {
                        self.reread_from(from);
                        self.refilter.notify_one();
                    }
                }
            }
            caught_up
        };
        drop(copying);
        caught_up?;
        self.serve(partition, term).await;
        tracing::info!(
            partition,
            epoch = term.epoch,
            rebuilt = rebuild,
            "partition taken: its state is written here"
        );
        Ok(())
    }

    /// Whether `term` on `partition` is still the latest the follower knows
    /// of: another replica may have begun a term after it while this one
    /// caught up (two takes at once), which the follower, finding no term
    /// here yet, could not end. Called with the order lock held.
    fn no_later_term(&self, partition: u16, term: Term) -> Result<(), StoreError> {
        match self
            .markers
            .lock()
            .expect("markers lock")
            .get(&partition)
            .copied()
        {
            Some(later) if later > term.epoch => Err(remote(format!(
                "taking partition {partition}: another replica began a later term (epoch \
                 {later}) while this one (epoch {}) caught up",
                term.epoch
            ))),
            _ => Ok(()),
        }
    }

    /// Whether a take's copy of `partition` is still whole: one the
    /// follower brought up (not `rebuilt`) may have stopped being kept
    /// meanwhile, marked absent and maybe emptied since; the next take
    /// reads it whole.
    fn still_copied(&self, partition: u16, rebuilt: bool) -> Result<(), StoreError> {
        if !rebuilt
            && self
                .absent
                .lock()
                .expect("absent lock")
                .contains(&partition)
        {
            return Err(remote(format!(
                "taking partition {partition}: its copy was dropped meanwhile (it is no longer \
                 kept here); the next take reads it whole"
            )));
        }
        Ok(())
    }

    /// Makes the local copy of `partition` what its changelog holds up to
    /// `until`, changing only what differs: a key the changelog has with
    /// another value takes its value, and a key it does not have goes (a
    /// write it refused). What is the same is left alone, so that a
    /// rebuild is not, to those watching the store (the inbox streams),
    /// every record of the partition removed and written again.
    async fn rebuild(&self, partition: u16, until: u64) -> Result<(), StoreError> {
        // The changelog may hold several writes of a key (packs stay until
        // the cleaner's round): a first reading finds where each key's
        // latest is, a second applies only those. Keys go by a 128-bit
        // fingerprint: a large partition's keys are not held in memory
        // whole. (No one else writes the partition meanwhile: this
        // replica's term has begun. A late purge of an earlier owner's only
        // takes writes that are not a key's latest.)
        let mut latest: HashMap<u128, (u64, usize)> = HashMap::new();
        let state = std::hash::RandomState::new();
        self.read_up_to(partition, 1, until, |at, change| {
            latest.insert(fingerprint(&state, change.collection, &change.key), at);
            Ok(())
        })
        .await?;
        // The keys whose latest write the second reading found to be a put:
        // the rest go (a removal's marker may have expired in between).
        let mut kept: HashSet<u128> = HashSet::new();
        let mut changed = 0usize;
        self.read_up_to(partition, 1, until, |at, change| {
            let fingerprint = fingerprint(&state, change.collection, &change.key);
            if latest.get(&fingerprint) != Some(&at) {
                return Ok(());
            }
            if change.value.is_some() {
                kept.insert(fingerprint);
            }
            let tree = &self.trees[change.collection.index()];
            let now = tree.get(&change.key).map_err(io(change.collection))?;
            if now.as_deref() != change.value.as_deref() {
                changed += 1;
                self.apply_local(change)?;
            }
            Ok(())
        })
        .await?;
        let mut removed = 0usize;
        for c in Collection::ALL.into_iter().filter(|c| c.is_partitioned()) {
            let tree = &self.trees[c.index()];
            for look in PartitionEntries::new(tree, self.partitions, partition) {
                let Look::Entry(key, _) = look.map_err(io(c))? else {
                    continue;
                };
                if !kept.contains(&fingerprint(&state, c, &key)) {
                    tree.remove(&key).map_err(io(c))?;
                    removed += 1;
                }
            }
        }
        tracing::info!(
            partition,
            records = kept.len(),
            changed,
            removed,
            "the partition's copy is rebuilt from its changelog"
        );
        Ok(())
    }

    /// Hands partition `partition`'s writes from `from` up to `until` to
    /// `apply`, in order, each with where it is: its message's stream
    /// sequence and its place in the message.
    async fn read_up_to(
        &self,
        partition: u16,
        from: u64,
        until: u64,
        mut apply: impl FnMut((u64, usize), &Change) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if from > until {
            return Ok(());
        }
        let mut records = Box::pin(
            self.changelog
                .records_of(partition, from, until)
                .await
                .map_err(remote)?,
        );
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), records.next())
                .await
                .map_err(|_| {
                    remote(format!(
                        "reading partition {partition}'s changelog up to {until}: nothing came for 30 s"
                    ))
                })?;
            // The reading ends at `until`, or before it where the records
            // up to there have expired.
            let Some(record) = next else {
                return Ok(());
            };
            let record = record.map_err(remote)?;
            let seq = record.seq();
            match &record {
                Record::Write { changes, .. } => {
                    for (i, change) in changes.iter().enumerate() {
                        apply((seq, i), change)?;
                    }
                }
                Record::Undecodable { .. } => self.skip_undecodable(&record),
                Record::Term(_) | Record::Sync { .. } => {}
            }
        }
    }

    /// Ends this replica's term on `partition` (handed over).
    pub(crate) fn release(&self, partition: u16) {
        let _order = self.order.lock().expect("order lock");
        if self.end_term_if(partition, false, |_| true) {
            tracing::info!(partition, "partition released");
        }
    }

    /// Applies `batch` in order if each `(i, old)` of `expect` holds (the
    /// value under `batch[i]`'s key is `old`); returns whether it did. Every
    /// key must belong to a partition this replica holds, and a key of
    /// `under`'s partition must be held under its term (else `None`).
    fn write_owned(
        &self,
        batch: &[Write],
        expect: &[(usize, Option<Vec<u8>>)],
        under: Option<crate::HeldTerm>,
    ) -> Result<Option<bool>, StoreError> {
        let _order = self.order.lock().expect("order lock");
        let mut terms = Vec::with_capacity(batch.len());
        for w in batch {
            let partition = self.partition_of(&w.key);
            let term = self.term(partition);
            if under.is_some_and(|h| h.partition == partition && h.term != term) {
                return Ok(None);
            }
            match term {
                Some(t) => terms.push(t),
                None => return Ok(None),
            }
        }
        for (i, old) in expect {
            let w = &batch[*i];
            let found = self.trees[w.collection.index()]
                .get(&w.key)
                .map_err(|source| StoreError::Io {
                    collection: w.collection.name(),
                    source,
                })?;
            if found.as_deref() != old.as_deref() {
                return Ok(Some(false));
            }
        }
        for (w, term) in batch.iter().zip(terms) {
            let change = Change {
                collection: w.collection,
                key: w.key.clone(),
                value: w.value.clone().map(Bytes::from),
            };
            let added = self.apply_local(&change)?;
            self.tally.count(term.partition, &change, added);
            self.appender.append(term, change);
        }
        Ok(Some(true))
    }

    /// Applies `batch` (all of one partition's keys, or each forwarded to
    /// its owner) in order, if `expect` holds; returns whether it did.
    /// Writes to a partition held elsewhere are forwarded to its owner or
    /// refused with [`StoreError::PartitionMoved`], as `route` says.
    pub(crate) fn write(
        self: &Arc<Self>,
        route: Route,
        batch: &[Write],
        expect: &[(usize, Option<Vec<u8>>)],
    ) -> Result<bool, StoreError> {
        let under = match route {
            Route::Under(h) => Some(h),
            Route::Forward | Route::Refuse => None,
        };
        if let Some(done) = self.write_owned(batch, expect, under)? {
            return Ok(done);
        }
        let partition = self.partition_of(&batch[0].key);
        if route != Route::Forward {
            return Err(StoreError::PartitionMoved { partition });
        }
        if batch.iter().any(|w| self.partition_of(&w.key) != partition) {
            return Err(StoreError::Unsupported {
                what: "one write across partitions this replica does not hold",
            });
        }
        let request = forward::encode(batch, expect);
        let this = self.clone();
        block_on(&self.handle, async move {
            this.forward(partition, request).await
        })?
    }

    /// Waits until the changelog acknowledged every write appended so far.
    /// A term found fenced ends here. A fenced write was refused (its
    /// partition moved: passing); any other failure leaves writes applied
    /// here that the changelog may or may not hold
    /// ([`StoreError::OutcomeUnknown`]).
    pub(crate) async fn commit(&self) -> Result<(), StoreError> {
        use crate::changelog::ChangelogError;

        match self.appender.commit().await {
            Ok(()) => Ok(()),
            Err(e) => {
                if let ChangelogError::Fenced { partition, epoch }
                | ChangelogError::Gap {
                    partition, epoch, ..
                } = &e
                {
                    self.end_term(Term {
                        partition: *partition,
                        epoch: *epoch,
                    });
                }
                if matches!(e, ChangelogError::Fenced { .. }) {
                    Err(remote(e))
                } else {
                    Err(StoreError::OutcomeUnknown {
                        message: format!("{e}; what was written may or may not be stored"),
                    })
                }
            }
        }
    }

    /// The number of the last write appended so far.
    pub(crate) fn last_number(&self) -> u64 {
        self.appender.last_number()
    }

    /// Fails if a write numbered after `since` and up to `through` was
    /// refused or failed (whichever commit its failure was told to): exact
    /// once a commit asked for after write `through` has returned.
    pub(crate) fn check_span(&self, since: u64, through: u64) -> Result<(), StoreError> {
        if self.appender.failed_since(since, through) {
            return Err(remote(format!(
                "a write of the changelog after write {since} was refused or failed; \
                 its partition is read again from the changelog"
            )));
        }
        Ok(())
    }

    /// Waits until the local copy holds every write the changelog held when
    /// called: a fresh read of a partition held elsewhere.
    pub(crate) fn catch_up(self: &Arc<Self>) -> Result<(), StoreError> {
        let this = self.clone();
        block_on(&self.handle, async move {
            let mark = this.changelog.sync().await.map_err(remote)?;
            tokio::time::timeout(CATCH_UP_WAIT, this.wait_applied(mark))
                .await
                .map_err(|_| {
                    remote(format!(
                        "the changelog's follower has not reached {mark} in {CATCH_UP_WAIT:?} \
                         (it is at {})",
                        *this.applied.borrow()
                    ))
                })
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partition function is the events stream's: FNV-1a 32 of the
    /// account, modulo the count. Reference values from the FNV-1a
    /// definition (the empty input hashes to the offset basis).
    #[test]
    fn partitions_follow_fnv1a() {
        let check = |account: &str, partitions: u16, expected: u16| {
            assert_eq!(
                partition_of_account(account.as_bytes(), partitions),
                expected,
                "{account}"
            );
        };
        // fnv1a32("") = 0x811c9dc5, ("a") = 0xe40c292c, ("foobar") = 0xbf9cf968
        check("", 16, (0x811c_9dc5u32 % 16) as u16);
        check("a", 16, (0xe40c_292cu32 % 16) as u16);
        check("foobar", 16, (0xbf9c_f968u32 % 16) as u16);
        check("foobar", 7, (0xbf9c_f968u32 % 7) as u16);
        assert_eq!(
            partition_of_key(b"foobar\0contact", 16),
            partition_of_account(b"foobar", 16)
        );
    }

    /// A partition's entries read in chunks, with writes let in between:
    /// after `reread`, each entry not looked at yet is as the tree holds it
    /// now (sled's iterator alone reads on from its copy of the leaf).
    #[test]
    fn partition_entries_read_on_as_the_tree_is_now() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let ours = "a";
        let other = (0..100)
            .map(|i| format!("b{i}"))
            .find(|a| partition_of_account(a.as_bytes(), 16) != partition_of_account(b"a", 16))
            .unwrap();
        let k = |account: &str, i: u32| format!("{account}\0k{i:02}").into_bytes();
        for i in 0..40 {
            tree.insert(k(ours, i), b"old".to_vec()).unwrap();
            tree.insert(k(&other, i), b"other".to_vec()).unwrap();
        }
        let mut entries = PartitionEntries::new(&tree, 16, partition_of_account(b"a", 16));
        let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut take = |entries: &mut PartitionEntries<'_>, n: usize| {
            for look in entries.by_ref().take(n) {
                if let Look::Entry(key, value) = look.unwrap() {
                    seen.push((key.to_vec(), value.to_vec()));
                }
            }
        };
        take(&mut entries, 5);
        tree.insert(k(ours, 6), b"new".to_vec()).unwrap();
        tree.remove(k(ours, 7)).unwrap();
        tree.insert(k(ours, 2), b"behind".to_vec()).unwrap();
        entries.reread();
        take(&mut entries, 1000);
        let keys: Vec<Vec<u8>> = seen.iter().map(|(key, _)| key.clone()).collect();
        let expected: Vec<Vec<u8>> = (0..40).filter(|i| *i != 7).map(|i| k(ours, i)).collect();
        assert_eq!(
            keys, expected,
            "each of the partition's keys once, in order"
        );
        let value_of = |i: u32| &seen.iter().find(|(key, _)| *key == k(ours, i)).unwrap().1;
        assert_eq!(value_of(6), b"new");
        assert_eq!(value_of(2), b"old", "looked at before the write");
    }
}
