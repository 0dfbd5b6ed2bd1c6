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
//! 1. commits what was appended so far and publishes a sync mark: every
//!    pack of the partition stored so far lies below its sequence `below`;
//! 2. appends every key of the partition held in the local copy again,
//!    with its value, under the term, in chunks taken with the order lock
//!    held (so each rewrite is the key's latest value, in order with the
//!    event path's writes);
//! 3. commits them, and if none was refused and the term still holds,
//! 4. purges the partition's packs below `below` (a purge that fails is
//!    owed, and tried again at the next look, without a new round).
//!
//! After step 2 every live key's latest value is above `below` (a rewrite,
//! or a later write; in a pack, or on its key's subject for the puts that
//! are not packed), and removals are never in packs (each is
//! a marker on its key's own subject), so what the purge takes is shadowed.
//! A deposed owner's rewrite is refused, so it never purges; one deposed
//! between its commit and its purge purges only packs below its rewrites,
//! which precede the new owner's marker. A follower behind the purge misses
//! older values of keys whose latest it reads later, and no removal. A
//! partition this replica could not read whole (an undecodable record, a
//! write its copy failed to take) is never compacted here: its copy may
//! lack what the changelog holds.
//!
//! A removal marker shadows its key's put in a pack until the pack is
//! purged; after that it shadows nothing, and only a follower that has not
//! read it yet needs it. So the owner purges the markers of the
//! collections whose puts go in packs (those of housekeeping collections
//! expire by themselves: see `pack::packs`) below the mark of its term's
//! last round whose purge of packs is done, but only those stored more
//! than [`crate::changelog::Changelog::markers_kept`] (a day) before the
//! stream's last message ([`crate::changelog::Changelog::stored_within`],
//! the server's clock): a follower that has not read such a marker was out
//! of touch for that long, and reads its copies anew at half of it
//! (`follower.rs`). It looks every quarter of that (six hours). So the
//! markers of expired messages, notifications, contacts removed and the
//! like do not pile up for good. Nobody purges a marker while no owner
//! runs, nor on a partition a replica could not read whole. So that
//! removals are not left waiting for a round by count, a round is also due
//! by age: once the partition's oldest pack is a quarter of that old and a
//! put in packs may have been removed since the last round (a removal of
//! this term counted, or the term's first look, which cannot know what
//! the last owner removed; the oldest pack's time is the stream's, read at
//! the first look, then this replica's clock at the last round's start).
//!
//! Each round writes the live records once and removes at least as many
//! dead ones, so a put costs at most about one more put, and the changelog
//! holds up to the live records and as many again (or [`ROUND_MIN`] more,
//! for a small partition). A removal counts as a put superseded, so a
//! journal is rewritten about once per retention by count. By age, a
//! partition with removals (the journal's expiry makes that every active
//! one) is rewritten whole at least every six hours whatever its write
//! rate, and one taken over whose oldest pack is older than that, at once:
//! a quiet partition with many live records pays more than one more put
//! per put. The counts are this
//! replica's: after a take-over they start from the partition's live
//! records, so the changelog may hold what the last owner left on top
//! until the next round.
//!
//! A round's last rewrites may still be on their way when the partition is
//! handed over: they are refused once the next owner's term begins, and the
//! refusal fails the appender's next commit as a fenced term would (the
//! events it covers are handled again). Rounds are short and hand-overs
//! rare.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Look, PartitionEntries, Partitioned, remote};
use crate::changelog::{Change, Term, packs};
use crate::{Collection, StoreError, io};

/// A partition is compacted no sooner than after this many superseded puts.
const ROUND_MIN: u64 = 1024;

/// How often the held partitions are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How many looks (a record of the partition, or another partition's
/// account passed over) a round makes with the order lock held at once.
pub(super) const SCAN_CHUNK: usize = 256;

/// What the cleaner counts, per partition.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Puts appended since the partition's last round here.
    puts: Vec<AtomicU64>,
    /// The partition's live records: from a term's beginning, the keys its
    /// writes added; from the term's first look, all of them.
    live: Vec<AtomicI64>,
    /// Removals appended to the partition in this term of keys whose puts
    /// go in packs.
    removals: Vec<AtomicU64>,
    /// Each held partition's state since its last round or first look.
    bases: Mutex<HashMap<u16, Base>>,
    /// Partitions this replica's copy may lack records of: never compacted.
    damaged: Mutex<BTreeSet<u16>>,
}

/// A partition's count at its last round, or at its term's first look.
#[derive(Debug, Clone, Copy)]
struct Base {
    term: Term,
    /// The records in its packs then.
    records: u64,
    /// A purge of its packs below this sequence, owed: the round's rewrite
    /// was committed, the purge failed.
    owed: Option<u64>,
    /// When its oldest pack was stored (or a time before it), in
    /// milliseconds since the Unix epoch.
    oldest_pack_ms: u64,
    /// The term's removals counted then; `None` at the term's first look,
    /// when the last owner's are unknown.
    removals: Option<u64>,
    /// The mark of the term's last round whose purge of packs is done:
    /// the partition's removal markers below it shadow nothing.
    rounded: Option<u64>,
    /// The partition's removal markers below this are purged.
    markers_purged: u64,
    /// When the term last purged markers (or found none to).
    markers_looked: Option<Instant>,
}

impl Tally {
    pub(crate) fn new(partitions: u16) -> Self {
        Self {
            puts: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            live: (0..partitions).map(|_| AtomicI64::new(0)).collect(),
            removals: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            bases: Mutex::default(),
            damaged: Mutex::default(),
        }
    }

    /// Starts the counts of `partition` again: a term of this replica's
    /// begins on it.
    pub(crate) fn begin(&self, partition: u16) {
        let i = usize::from(partition);
        if i < self.puts.len() {
            self.puts[i].store(0, Ordering::Relaxed);
            self.live[i].store(0, Ordering::Relaxed);
            self.removals[i].store(0, Ordering::Relaxed);
        }
    }

    /// Counts a write appended to `partition`'s changelog, which changed
    /// its live records by `added`.
    pub(crate) fn count(&self, partition: u16, change: &Change, added: i64) {
        let i = usize::from(partition);
        if let Some(live) = self.live.get(i) {
            live.fetch_add(added, Ordering::Relaxed);
        }
        let counter = match change.value {
            Some(_) => self.puts.get(i),
            None if packs(change.collection) => self.removals.get(i),
            None => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Marks `partition` as one whose copy here may lack records the
    /// changelog holds: it is not compacted from this copy.
    pub(crate) fn damaged(&self, partition: u16) {
        if self.damaged.lock().expect("tally lock").insert(partition) {
            tracing::warn!(
                partition,
                "this replica's copy of the partition may lack changelog records: it will not \
                 compact the partition's changelog"
            );
        }
    }

    fn base(&self, partition: u16, term: Term) -> Option<Base> {
        let bases = self.bases.lock().expect("tally lock");
        bases.get(&partition).filter(|b| b.term == term).copied()
    }

    fn set_base(&self, partition: u16, base: Base) {
        self.bases
            .lock()
            .expect("tally lock")
            .insert(partition, base);
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Takes `n` from `counter`, not below zero.
fn take(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
        Some(c.saturating_sub(n))
    });
}

impl Partitioned {
    /// Looks at the held partitions every [`CHECK_EVERY`] and compacts
    /// those due, one at a time, until the store is dropped.
    pub(super) async fn clean(this: Weak<Self>) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let Some(me) = this.upgrade() else { return };
            let held: Vec<(u16, Term)> = me
                .held()
                .into_iter()
                .filter_map(|p| me.term(p).map(|t| (p, t)))
                .collect();
            if let Err(e) = me.first_looks(&held).await {
                tracing::warn!(error = %e, "counting the partitions' records failed; trying again later");
                continue;
            }
            for (partition, term) in held {
                if me
                    .tally
                    .damaged
                    .lock()
                    .expect("tally lock")
                    .contains(&partition)
                {
                    continue;
                }
                if let Err(e) = me.clean_if_due(partition, term).await {
                    tracing::warn!(partition, epoch = term.epoch, error = %e,
                        "compacting the partition's changelog failed; trying again later");
                }
            }
        }
    }

    /// Counts the live records of the partitions in `held` whose term has
    /// not been looked at yet (one reading of the local copy, off the
    /// runtime). The records live when a term began are taken as the
    /// changelog's then; the term's puts come on top.
    async fn first_looks(self: &Arc<Self>, held: &[(u16, Term)]) -> Result<(), StoreError> {
        let fresh: Vec<(u16, Term)> = held
            .iter()
            .copied()
            .filter(|(p, t)| self.tally.base(*p, *t).is_none())
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let added: Vec<i64> = fresh
            .iter()
            .map(|(p, _)| self.tally.live[usize::from(*p)].load(Ordering::Relaxed))
            .collect();
        let mut oldest = Vec::with_capacity(fresh.len());
        for (partition, _) in &fresh {
            let since = now_ms();
            let pack = self
                .changelog
                .oldest_pack_millis(*partition)
                .await
                .map_err(remote)?;
            oldest.push(pack.unwrap_or(since));
        }
        let me = Arc::clone(self);
        let counts = tokio::task::spawn_blocking(move || me.count_live())
            .await
            .map_err(|e| remote(format!("counting the partitions' records: {e}")))??;
        for (((partition, term), added), oldest_pack_ms) in fresh.into_iter().zip(added).zip(oldest)
        {
            let i = usize::from(partition);
            let live = counts[i] as i64;
            self.tally.live[i].fetch_add(live - added, Ordering::Relaxed);
            self.tally.set_base(
                partition,
                Base {
                    term,
                    records: (live - added).max(0) as u64,
                    owed: None,
                    oldest_pack_ms,
                    removals: None,
                    rounded: None,
                    markers_purged: 0,
                    markers_looked: None,
                },
            );
        }
        Ok(())
    }

    async fn clean_if_due(self: &Arc<Self>, partition: u16, term: Term) -> Result<(), StoreError> {
        let i = usize::from(partition);
        let Some(base) = self.tally.base(partition, term) else {
            return Ok(());
        };
        if let Some(below) = base.owed {
            return self.purge(partition, below, base).await;
        }
        if let Some(rounded) = base.rounded
            && rounded > base.markers_purged
            && self.term(partition) == Some(term)
            && base
                .markers_looked
                .is_none_or(|at| at.elapsed() >= self.changelog.markers_kept() / 4)
        {
            return self.purge_markers(partition, rounded, base).await;
        }
        let puts = self.tally.puts[i].load(Ordering::Relaxed);
        let live = self.tally.live[i].load(Ordering::Relaxed).max(0) as u64;
        let dead = base.records.saturating_add(puts).saturating_sub(live);
        let removals = self.tally.removals[i].load(Ordering::Relaxed);
        let aged = base.removals.is_none_or(|r| removals > r)
            && now_ms().saturating_sub(base.oldest_pack_ms) >= self.round_after_ms();
        if dead < live.max(ROUND_MIN) && !aged {
            return Ok(());
        }
        let started = Instant::now();
        // Every pack stored from here on is newer than this.
        let since = now_ms();
        // What was appended before the counts were read is stored below
        // the mark, so the purge takes it: the puts counted are gone with
        // the round.
        self.appender.commit().await.map_err(remote)?;
        let below = self.changelog.sync().await.map_err(remote)?;
        let me = Arc::clone(self);
        let rewritten = tokio::task::spawn_blocking(move || me.rewrite(partition, term))
            .await
            .map_err(|e| remote(format!("rewriting partition {partition}: {e}")))??;
        let Some(rewritten) = rewritten else {
            return Ok(());
        };
        self.appender.commit().await.map_err(remote)?;
        if self.appender.is_broken(term) || self.term(partition) != Some(term) {
            return Ok(());
        }
        take(&self.tally.puts[i], puts);
        let base = Base {
            term,
            records: rewritten,
            owed: Some(below),
            oldest_pack_ms: since,
            removals: Some(removals),
            ..base
        };
        self.tally.set_base(partition, base);
        tracing::info!(
            partition,
            dead,
            by_age = aged,
            rewritten,
            took_ms = started.elapsed().as_millis() as u64,
            "the partition's live records are written again; purging its older packs"
        );
        self.purge(partition, below, base).await
    }

    /// Purges `partition`'s packs below `below`, owed since a round.
    async fn purge(&self, partition: u16, below: u64, base: Base) -> Result<(), StoreError> {
        let purged = self
            .changelog
            .purge_packs(partition, below)
            .await
            .map_err(remote)?;
        self.tally.set_base(
            partition,
            Base {
                owed: None,
                rounded: Some(below),
                ..base
            },
        );
        tracing::info!(
            partition,
            below,
            purged_messages = purged,
            "the partition's changelog is compacted"
        );
        Ok(())
    }

    /// Purges `partition`'s removal markers below the mark of the term's
    /// last round (`rounded`: they shadow nothing) that were stored more
    /// than [`crate::changelog::Changelog::markers_kept`] ago (a follower
    /// that has not read one by then was out of touch for that long, and
    /// reads its copies anew: `follower.rs`).
    async fn purge_markers(
        &self,
        partition: u16,
        rounded: u64,
        base: Base,
    ) -> Result<(), StoreError> {
        let kept = self.changelog.markers_kept();
        let young = self.changelog.stored_within(kept).await.map_err(remote)?;
        let below = rounded.min(young);
        let mut purged = 0;
        if below > base.markers_purged {
            purged = self
                .changelog
                .purge_markers(partition, below)
                .await
                .map_err(remote)?;
        }
        self.tally.set_base(
            partition,
            Base {
                markers_purged: base.markers_purged.max(below),
                markers_looked: Some(Instant::now()),
                ..base
            },
        );
        if purged > 0 {
            tracing::info!(
                partition,
                below,
                purged_markers = purged,
                "the partition's removal markers from before a round are purged"
            );
        }
        Ok(())
    }

    /// How old a partition's oldest pack may grow, once a put in it may
    /// have been removed, before a round is due: a quarter of the time
    /// removal markers are kept.
    fn round_after_ms(&self) -> u64 {
        u64::try_from((self.changelog.markers_kept() / 4).as_millis()).unwrap_or(u64::MAX)
    }

    /// How many records of each partition the local copy holds.
    fn count_live(&self) -> Result<Vec<u64>, StoreError> {
        let mut live = vec![0; usize::from(self.partitions)];
        for c in Collection::ALL.into_iter().filter(|c| c.is_partitioned()) {
            for key in self.trees[c.index()].iter().keys() {
                live[usize::from(self.partition_of(&key.map_err(io(c))?))] += 1;
            }
        }
        Ok(live)
    }

    /// Appends every record of `partition` in the local copy again under
    /// `term`; returns how many, or `None` if the term ended meanwhile.
    /// Blocks: it reads the partition's records ([`PartitionEntries`]: a
    /// look per account of other partitions, not the whole copy).
    fn rewrite(&self, partition: u16, term: Term) -> Result<Option<u64>, StoreError> {
        let mut rewritten = 0;
        for c in Collection::ALL.into_iter().filter(|c| c.is_partitioned()) {
            let mut entries =
                PartitionEntries::new(&self.trees[c.index()], self.partitions, partition);
            loop {
                let _order = self.order.lock().expect("order lock");
                if self.term(partition) != Some(term) {
                    return Ok(None);
                }
                // The event path may have written since the last chunk:
                // each rewrite is the key's value as it is now.
                entries.reread();
                let mut looked = 0;
                for look in entries.by_ref().take(SCAN_CHUNK) {
                    looked += 1;
                    let Look::Entry(key, value) = look.map_err(io(c))? else {
                        continue;
                    };
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
                if looked < SCAN_CHUNK {
                    break;
                }
            }
        }
        Ok(Some(rewritten))
    }
}
