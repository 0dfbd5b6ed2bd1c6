//! The follower: every replica applies the changelog's records of the
//! partitions it copies to its local copy, and copies a partition whole when
//! it starts to keep it (or its copy was left dirty).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use super::{Look, PartitionEntries, Partitioned, cleaner, remote};
use crate::awake::Moment;
use crate::changelog::{Change, Record};
use crate::{Collection, StoreError, io};

/// How often a busy follower publishes a sync mark to learn that it read
/// every record stored up to then.
const PROBE_EVERY: Duration = Duration::from_secs(5);

impl Partitioned {
    /// Applies the changelog to the local copy, from its start; after an
    /// error, from after the last record applied. It does not read the
    /// writes of the partitions held here (their owner wrote them): when
    /// those change, it reads again with the new set, from where a term
    /// that ended here left off if one did.
    ///
    /// A follower out of touch with the changelog for half the time
    /// removal markers are at least kept (its server unreachable, the
    /// process stopped) may have missed removals whose markers the owner
    /// purged meanwhile (`cleaner.rs`): it then reads every partition it
    /// copies anew whole ([`Partitioned::forget_copies`]), which drops what
    /// the changelog no longer holds.
    pub(super) async fn follow(this: std::sync::Weak<Self>, refilter: Arc<Notify>) {
        // When the follower last knew it had read every record stored so
        // far: it found nothing stored past what it applied, or read a
        // sync mark published then. On a clock that counts the time the
        // machine was suspended.
        let mut in_touch = Moment::now();
        // The last sync mark published to tell, and when.
        let mut probe: Option<(u64, Moment)> = None;
        loop {
            let Some(me) = this.upgrade() else { return };
            me.forget_copies_if_out_of_touch(&mut in_touch);
            if !me.copy_kept().await {
                // The others are followed meanwhile; the follower looks
                // again in a while.
                let refilter = refilter.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    refilter.notify_one();
                });
            }
            let (from, followed) = {
                let _order = me.order.lock().expect("order lock");
                let next = *me.applied.borrow() + 1;
                let from = me
                    .reread_from
                    .lock()
                    .expect("reread lock")
                    .take()
                    .map_or(next, |f| f.min(next));
                let followed: Vec<u16> = (0..me.partitions)
                    .filter(|p| me.keeps(*p) && !me.holds(*p))
                    .collect();
                (from, followed)
            };
            let records = me.changelog.records_following(from, &followed).await;
            if records.is_err() {
                // Where to read from again is still owed.
                me.reread_from(from);
            }
            drop(me);
            let mut records = match records {
                Ok(r) => Box::pin(r),
                Err(e) => {
                    tracing::warn!(error = %e, "following the changelog failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut quiet = 0;
            let mut refiltered = false;
            loop {
                let next = tokio::select! {
                    biased;
                    () = refilter.notified() => {
                        refiltered = true;
                        break;
                    }
                    next = tokio::time::timeout(Duration::from_secs(1), records.next()) => next,
                };
                let Some(me) = this.upgrade() else { return };
                match next {
                    Err(_) => {
                        // A consumer can go silent with records waiting
                        // (its server lost, say): read again if so. The
                        // stream's last record may be one of the held
                        // partitions' writes, which this follower does
                        // not read: a sync mark it does read tells.
                        quiet += 1;
                        if quiet % 5 != 0 {
                            continue;
                        }
                        let applied = *me.applied.borrow();
                        if let Some((mark, _)) = probe.take_if(|(mark, _)| *mark > applied) {
                            tracing::warn!(
                                applied,
                                mark,
                                "the changelog's follower went silent with records waiting; reading again"
                            );
                            break;
                        }
                        let asked = Moment::now();
                        match me.changelog.last_seq().await {
                            Ok(last) if last > applied => {
                                probe = me.changelog.sync().await.ok().map(|mark| (mark, asked));
                            }
                            Ok(_) => {
                                in_touch = asked;
                                me.back_in_touch();
                            }
                            Err(_) => {}
                        }
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "the changelog's follower failed; resuming");
                        break;
                    }
                    Ok(Some(Ok(record))) => {
                        if me.forget_copies_if_out_of_touch(&mut in_touch) {
                            // The copies are read anew at the next turn;
                            // the record is applied first (a term marker
                            // saying another replica took a partition held
                            // here is news not to delay).
                            refilter.notify_one();
                        }
                        if let Some((_, asked)) = probe.take_if(|(mark, _)| record.seq() >= *mark) {
                            in_touch = asked;
                            me.back_in_touch();
                        }
                        quiet = 0;
                        me.apply_followed(record);
                        // Busy, the follower is never quiet: it asks to be
                        // told it read up to the stream's end every 5 s.
                        if probe.is_none() && in_touch.elapsed() >= PROBE_EVERY {
                            let asked = Moment::now();
                            probe = me.changelog.sync().await.ok().map(|mark| (mark, asked));
                        }
                    }
                }
            }
            if !refiltered {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// If the follower was last in touch (`in_touch`) half the time
    /// removal markers are kept ago or longer, marks the copies to be read
    /// anew ([`Partitioned::forget_copies`]) and counts from now; returns
    /// whether it did.
    fn forget_copies_if_out_of_touch(&self, in_touch: &mut Moment) -> bool {
        let out_of_touch = in_touch.elapsed();
        if out_of_touch < self.changelog.markers_kept() / 2 {
            return false;
        }
        self.forget_copies(out_of_touch);
        *in_touch = Moment::now();
        true
    }

    /// The follower read every record stored up to a moment after it was
    /// out of touch: a partition held meanwhile that another replica took
    /// has had its term ended by the new owner's marker by now, so those
    /// still held stay held with their copy as it is.
    fn back_in_touch(&self) {
        self.held_out_of_touch
            .lock()
            .expect("out of touch lock")
            .clear();
    }

    /// Marks every partition copied here, but those held, as absent (its
    /// reads go to its owner) and to be read anew whole: the follower was
    /// out of touch with the changelog for `out_of_touch`, long enough for
    /// removal markers it never read to have been purged. A partition held
    /// is read anew likewise if it turns out to have been taken over
    /// meanwhile ([`Partitioned::ended`]).
    fn forget_copies(&self, out_of_touch: Duration) {
        let _order = self.order.lock().expect("order lock");
        self.held_out_of_touch
            .lock()
            .expect("out of touch lock")
            .extend(self.held());
        let copied: Vec<u16> = {
            let absent = self.absent.lock().expect("absent lock");
            (0..self.partitions)
                .filter(|p| self.keeps(*p) && !self.holds(*p) && !absent.contains(p))
                .collect()
        };
        if copied.is_empty() {
            return;
        }
        tracing::warn!(
            out_of_touch_secs = out_of_touch.as_secs(),
            partitions = ?copied,
            "out of touch with the changelog for half the time removal markers are kept: \
             removals may have been missed, so the partitions copied here are read anew whole"
        );
        let mut absent = self.absent.lock().expect("absent lock");
        let mut dirty = self.dirty.lock().expect("dirty lock");
        for p in copied {
            absent.insert(p);
            dirty.insert(p);
        }
    }

    /// Brings the local copy in line with the partitions kept: empties the
    /// copy of each partition no longer kept (so that no scan across
    /// accounts finds its stale records), and reads each partition kept
    /// anew whole from its changelog. The follower does this before it
    /// reads on with the new set, from where it stood: a partition's
    /// records up to there are in what this reads.
    async fn copy_kept(&self) -> bool {
        let (entering, leaving): (Vec<u16>, Vec<u16>) = {
            let _order = self.order.lock().expect("order lock");
            let absent = self.absent.lock().expect("absent lock").clone();
            let emptied = self.emptied.lock().expect("emptied lock").clone();
            absent
                .iter()
                .filter(|p| !self.holds(**p) && (self.keeps(**p) || !emptied.contains(p)))
                .partition(|p| self.keeps(**p))
        };
        let mut done = true;
        for partition in leaving {
            if let Err(e) = self.empty_copy(partition).await {
                tracing::warn!(partition, error = %e, "emptying a partition no longer kept here failed; trying again shortly");
                done = false;
            }
        }
        for partition in entering {
            if let Err(e) = self.copy_whole(partition).await {
                tracing::warn!(partition, error = %e, "reading a partition kept here anew failed; its reads go to its owner meanwhile, and it is read again shortly");
                done = false;
            }
        }
        done
    }

    /// Whether `partition` is absent here and neither held nor being taken:
    /// its copy is the follower's to empty or read whole.
    fn left_to_follower(&self, partition: u16) -> bool {
        self.absent
            .lock()
            .expect("absent lock")
            .contains(&partition)
            && !self.holds(partition)
            && !self
                .rebuilding
                .lock()
                .expect("rebuilding lock")
                .contains(&partition)
    }

    /// Removes `partition`'s records from the local copy: it is no longer
    /// kept here. Nothing else writes them meanwhile (an absent partition's
    /// records are neither applied nor written here, and a take waits for
    /// the copying lock), so the order lock is taken only to see that the
    /// partition is still to be emptied, a chunk of looks at a time.
    async fn empty_copy(&self, partition: u16) -> Result<(), StoreError> {
        let _copying = self.copying.lock().await;
        let still = || {
            let _order = self.order.lock().expect("order lock");
            self.left_to_follower(partition) && !self.keeps(partition)
        };
        let mut removed = 0usize;
        for c in Collection::ALL.into_iter().filter(|c| c.is_partitioned()) {
            let tree = &self.trees[c.index()];
            let mut entries = PartitionEntries::new(tree, self.partitions, partition);
            loop {
                if !still() {
                    return Ok(());
                }
                let mut looked = 0;
                for look in entries.by_ref().take(cleaner::SCAN_CHUNK) {
                    looked += 1;
                    if let Look::Entry(key, _) = look.map_err(io(c))? {
                        tree.remove(&key).map_err(io(c))?;
                        removed += 1;
                    }
                }
                if looked < cleaner::SCAN_CHUNK {
                    break;
                }
            }
        }
        let _order = self.order.lock().expect("order lock");
        if self.left_to_follower(partition) && !self.keeps(partition) {
            self.emptied.lock().expect("emptied lock").insert(partition);
            tracing::info!(
                partition,
                removed,
                "the partition's copy is emptied: it is no longer kept here"
            );
        }
        Ok(())
    }

    /// Reads `partition`, kept here anew, whole from its changelog into the
    /// local copy: its reads are answered here from then on.
    async fn copy_whole(&self, partition: u16) -> Result<(), StoreError> {
        let _copying = self.copying.lock().await;
        if !self.left_to_follower(partition) || !self.keeps(partition) {
            return Ok(());
        }
        let until = self
            .changelog
            .partition_end(partition)
            .await
            .map_err(remote)?;
        self.rebuild(partition, until).await?;
        let _order = self.order.lock().expect("order lock");
        if self.left_to_follower(partition) && self.keeps(partition) {
            self.absent.lock().expect("absent lock").remove(&partition);
            self.emptied
                .lock()
                .expect("emptied lock")
                .remove(&partition);
            self.dirty.lock().expect("dirty lock").remove(&partition);
            // The follower resumes from where it paused, which may be
            // before `until`: what it reads of the partition up to there
            // is in the copy already, and applied again it would show
            // older values for a while.
            self.copied_through
                .lock()
                .expect("copied lock")
                .insert(partition, until);
        }
        Ok(())
    }

    /// Applies a record the follower read, unless it is this replica's own
    /// (of a partition it holds a term on) or of a partition absent here.
    fn apply_followed(&self, record: Record) {
        let seq = record.seq();
        {
            let _order = self.order.lock().expect("order lock");
            match &record {
                Record::Write {
                    partition, changes, ..
                } => {
                    if self.term(*partition).is_none()
                        && !self
                            .rebuilding
                            .lock()
                            .expect("rebuilding lock")
                            .contains(partition)
                        && !self.absent.lock().expect("absent lock").contains(partition)
                        && self
                            .copied_through
                            .lock()
                            .expect("copied lock")
                            .get(partition)
                            .is_none_or(|through| seq > *through)
                    {
                        for change in changes {
                            if let Err(e) = self.apply_local(change) {
                                tracing::error!(error = %e, seq, partition, "applying a changelog record to the local copy failed");
                                // Taken here, the partition is read again
                                // whole first.
                                self.dirty.lock().expect("dirty lock").insert(*partition);
                                self.tally.damaged(*partition);
                            }
                        }
                    }
                }
                Record::Term(t) => {
                    self.markers
                        .lock()
                        .expect("markers lock")
                        .insert(t.partition, t.epoch);
                    if self.end_term_if(t.partition, true, |ours| ours.epoch < t.epoch) {
                        tracing::warn!(
                            partition = t.partition,
                            epoch = t.epoch,
                            "another replica took the partition over"
                        );
                    }
                }
                Record::Undecodable { .. } => self.skip_undecodable(&record),
                Record::Sync { .. } => {}
            }
        }
        self.applied.send_if_modified(|a| {
            let newer = seq > *a;
            *a = (*a).max(seq);
            newer
        });
    }

    /// Logs and counts a record that could not be read; it is passed over.
    pub(super) fn skip_undecodable(&self, record: &Record) {
        if let Record::Undecodable {
            seq,
            partition,
            subject,
            reason,
        } = record
        {
            self.undecodable.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                seq,
                partition,
                subject,
                reason,
                "an undecodable changelog record was skipped"
            );
            if let Some(p) = partition {
                self.tally.damaged(*p);
            }
        }
    }

    /// Writes `change` into the local copy; returns by how much it changed
    /// the number of records there (1 for a new key, -1 for a key removed).
    pub(super) fn apply_local(&self, change: &Change) -> Result<i64, StoreError> {
        let tree = &self.trees[change.collection.index()];
        match &change.value {
            Some(v) => tree
                .insert(change.key.as_slice(), v.as_ref())
                .map(|old| i64::from(old.is_none())),
            None => tree
                .remove(change.key.as_slice())
                .map(|old| -i64::from(old.is_some())),
        }
        .map_err(io(change.collection))
    }

    /// Has the follower read again from `seq` at the latest, when it next
    /// reads the changelog anew.
    pub(super) fn reread_from(&self, seq: u64) {
        let mut reread = self.reread_from.lock().expect("reread lock");
        *reread = Some(reread.map_or(seq, |f| f.min(seq)));
    }
}
