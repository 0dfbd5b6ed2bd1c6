//! The changelog's cleaner: keeps each held partition's packs of puts about
//! the size of the partition's live state.
//!
//! The owner puts many records in one message (a pack, see
//! [`crate::changelog`]), so the stream's one message per subject no longer
//! drops a key's older values by itself: a pack stays as long as the stream
//! keeps it, whichever of its records are still the latest. The cleaner
//! copies forward. Once a partition's packs hold at least as many records
//! that are no longer the latest of their key as live ones (and at least
//! [`ROUND_MIN`] of them), a round:
//!
//! 1. publishes a sync mark: every pack of the partition stored so far lies
//!    below its sequence `below`;
//! 2. appends every key of the partition held in the local copy again,
//!    with its value, under the term, in chunks taken with the order lock
//!    held (so each rewrite is the key's latest value, in order with the
//!    event path's writes);
//! 3. commits them, and if none was refused and the term still holds,
//! 4. purges the partition's packs below `below`.
//!
//! After step 2 every live key's latest value is in a pack above `below`
//! (a rewrite, or a later write), and removals are never in packs (each is
//! a marker on its key's own subject), so what the purge takes is shadowed.
//! A deposed owner's rewrite is refused, so it never purges; one deposed
//! between its commit and its purge purges only packs below its rewrites,
//! which precede the new owner's marker. A follower behind the purge misses
//! older values of keys whose latest it reads later, and no removal.
//!
//! A removal marker of a housekeeping collection expires after
//! [`crate::MARKER_TTL`], while the put it removed may still be in a pack:
//! a partition that took such removals is compacted at least every half of
//! that, so that no replica reading the changelog afresh finds the put
//! without its marker.
//!
//! Each round writes the live records once and removes at least as many
//! dead ones, so a put costs at most about one more put, and the changelog
//! holds between one and about two records per live key. A partition whose
//! records all stay live (a journal within its retention) is never
//! rewritten. The counts are this replica's: after a take-over they start
//! from the partition's live records, so the changelog may hold what the
//! last owner left on top until the next round.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Partitioned, remote};
use crate::changelog::{Change, Term};
use crate::{Collection, StoreError, io};

/// A partition is compacted no sooner than after this many puts.
const ROUND_MIN: u64 = 1024;

/// How often the held partitions are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How many local records a round reads with the order lock held at once.
const SCAN_CHUNK: usize = 256;

/// What the cleaner counts, per partition.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Puts appended since the partition's last round here.
    puts: Vec<AtomicU64>,
    /// Housekeeping removals appended since then.
    expiring: Vec<AtomicU64>,
    /// The partition's live records: from a term's beginning, the keys its
    /// writes added; from the term's first look, all of them.
    live: Vec<AtomicI64>,
    /// The records in the partition's packs at its last round (or at the
    /// term's first look: its live records), the term, and when.
    base: Mutex<HashMap<u16, (Term, u64, Instant)>>,
}

impl Tally {
    pub(crate) fn new(partitions: u16) -> Self {
        Self {
            puts: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            expiring: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            live: (0..partitions).map(|_| AtomicI64::new(0)).collect(),
            base: Mutex::default(),
        }
    }

    /// Starts the counts of `partition` again: a term of this replica's
    /// begins on it.
    pub(crate) fn begin(&self, partition: u16) {
        let i = usize::from(partition);
        if i < self.puts.len() {
            self.puts[i].store(0, Ordering::Relaxed);
            self.expiring[i].store(0, Ordering::Relaxed);
            self.live[i].store(0, Ordering::Relaxed);
        }
    }

    /// Counts a write appended to `partition`'s changelog, which changed
    /// its live records by `added`.
    pub(crate) fn count(&self, partition: u16, change: &Change, added: i64) {
        if let Some(live) = self.live.get(usize::from(partition)) {
            live.fetch_add(added, Ordering::Relaxed);
        }
        let counter = match change.value {
            Some(_) => &self.puts,
            None if change.collection.is_housekeeping() => &self.expiring,
            None => return,
        };
        if let Some(n) = counter.get(usize::from(partition)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a round did.
struct Round {
    rewritten: u64,
    purged: u64,
}

impl Partitioned {
    /// Looks at the held partitions every [`CHECK_EVERY`] and compacts
    /// those due, one at a time, until the store is dropped.
    pub(super) async fn clean(this: Weak<Self>) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let Some(me) = this.upgrade() else { return };
            for partition in me.held() {
                let Some(term) = me.term(partition) else {
                    continue;
                };
                if let Err(e) = me.clean_if_due(partition, term).await {
                    tracing::warn!(partition, epoch = term.epoch, error = %e,
                        "compacting the partition's changelog failed; trying again later");
                }
            }
        }
    }

    async fn clean_if_due(&self, partition: u16, term: Term) -> Result<(), StoreError> {
        let i = usize::from(partition);
        let counted = self
            .tally
            .base
            .lock()
            .expect("tally lock")
            .get(&partition)
            .and_then(|(t, base, since)| (*t == term).then_some((*base, *since)));
        let (base, since) = match counted {
            Some(counted) => counted,
            None => {
                // The term's first look. The records live when the term
                // began are taken as the changelog's then (what an earlier
                // owner left dead is not known here); the term's puts come
                // on top.
                let added = self.tally.live[i].load(Ordering::Relaxed);
                let live = self.count_live(partition)? as i64;
                self.tally.live[i].fetch_add(live - added, Ordering::Relaxed);
                let base = (live - added).max(0) as u64;
                let now = Instant::now();
                self.tally
                    .base
                    .lock()
                    .expect("tally lock")
                    .insert(partition, (term, base, now));
                (base, now)
            }
        };
        let puts = self.tally.puts[i].load(Ordering::Relaxed);
        let live = self.tally.live[i].load(Ordering::Relaxed).max(0) as u64;
        let dead = (base + puts).saturating_sub(live);
        let expiring = self.tally.expiring[i].load(Ordering::Relaxed);
        let markers_expire = expiring > 0 && since.elapsed() >= crate::MARKER_TTL / 2;
        if dead < live.max(ROUND_MIN) && !markers_expire {
            return Ok(());
        }
        let started = Instant::now();
        let Some(round) = self.round(partition, term).await? else {
            return Ok(());
        };
        self.tally.puts[i].fetch_sub(puts, Ordering::Relaxed);
        self.tally.expiring[i].fetch_sub(expiring, Ordering::Relaxed);
        self.tally
            .base
            .lock()
            .expect("tally lock")
            .insert(partition, (term, round.rewritten, started));
        tracing::info!(
            partition,
            dead,
            rewritten = round.rewritten,
            purged_messages = round.purged,
            took_ms = started.elapsed().as_millis() as u64,
            "the partition's changelog is compacted"
        );
        Ok(())
    }

    /// How many records of `partition` the local copy holds.
    fn count_live(&self, partition: u16) -> Result<u64, StoreError> {
        let mut live = 0;
        for c in Collection::ALL.into_iter().filter(|c| c.is_partitioned()) {
            for key in self.trees[c.index()].iter().keys() {
                if self.partition_of(&key.map_err(io(c))?) == partition {
                    live += 1;
                }
            }
        }
        Ok(live)
    }

    /// Writes `partition`'s live records again under `term` and purges its
    /// packs from before them; `None` if the term ended meanwhile (nothing
    /// is purged then).
    async fn round(&self, partition: u16, term: Term) -> Result<Option<Round>, StoreError> {
        let below = self.changelog.sync().await.map_err(remote)?;
        let mut rewritten = 0;
        for c in Collection::ALL.into_iter().filter(|c| c.is_partitioned()) {
            let tree = &self.trees[c.index()];
            let mut after: Option<sled::IVec> = None;
            loop {
                let last = {
                    let _order = self.order.lock().expect("order lock");
                    if self.term(partition) != Some(term) {
                        return Ok(None);
                    }
                    let entries = match after.take() {
                        Some(k) => {
                            tree.range::<sled::IVec, _>((Bound::Excluded(k), Bound::Unbounded))
                        }
                        None => tree.iter(),
                    };
                    let mut last = None;
                    for entry in entries.take(SCAN_CHUNK) {
                        let (key, value) = entry.map_err(io(c))?;
                        if self.partition_of(&key) == partition {
                            self.appender.append(
                                term,
                                Change {
                                    collection: c,
                                    key: key.to_vec(),
                                    value: Some(Bytes::copy_from_slice(&value)),
                                },
                            );
                            rewritten += 1;
                        }
                        last = Some(key);
                    }
                    last
                };
                match last {
                    Some(key) => after = Some(key),
                    None => break,
                }
                tokio::task::yield_now().await;
            }
        }
        self.appender.commit().await.map_err(remote)?;
        if self.appender.is_broken(term) || self.term(partition) != Some(term) {
            return Ok(None);
        }
        let purged = self
            .changelog
            .purge_packs(partition, below)
            .await
            .map_err(remote)?;
        Ok(Some(Round { rewritten, purged }))
    }
}
