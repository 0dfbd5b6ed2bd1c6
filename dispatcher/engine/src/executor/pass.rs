//! One pass over an event: its journal record as it grows, what of it is
//! written, and what is durable.
//!
//! Entries are recorded as the chains run and written in as few writes as
//! the guarantees allow: a step without effects, or whose effects a run
//! again repeats harmlessly, waits for the pass's last write; a step with
//! effects in the store that must not be repeated (`notify`) is written at
//! once; a step with effects outside the dispatcher goes with the pass's
//! next write, made durable before the next such step starts. So an event
//! whose one outside step (if any) is its last costs one journal write,
//! unless the worker's earlier outside step is not durable yet; every
//! further write is a small entry, never the whole record again.

use switchboard_sdk::VumiApiEvent;
use switchboard_store::{Store, StoreError, Write, WriteMark};

use super::policy::Recording;
use crate::journal::{Entry, EventJournal, Journal, Pending, RecordKey};
use crate::timers::PendingTimer;

/// A pass over one event.
#[derive(Debug)]
pub(super) struct Pass {
    at: RecordKey,
    /// The record so far, with what this pass recorded.
    pub journal: EventJournal,
    /// Recorded, not written yet.
    pending: Pending,
    /// A step with outside effects was recorded and is not durable yet.
    unflushed: bool,
    /// Such a step's entry waits for the pass's next write.
    effect_unwritten: bool,
    /// The same, left by the worker's earlier event.
    earlier: Option<WriteMark>,
    /// The store as this event writes it: under the term its partition was
    /// held under when it began ([`Store::under`]).
    store: Store,
    /// Writes beside the journal's (timers), with its next write.
    beside: Vec<Write>,
    /// Timers set by this pass, to be noted once written.
    timers: Vec<PendingTimer>,
}

impl Pass {
    /// A pass over `event`, whose record so far is `loaded`, writing to
    /// `store`; `earlier` is the worker's last outside effect whose record
    /// may not be durable.
    pub fn new(
        event: &VumiApiEvent,
        loaded: Option<EventJournal>,
        earlier: Option<WriteMark>,
        store: Store,
    ) -> Self {
        let mut pass = Self {
            at: RecordKey::new(&event.account_key, &event.id),
            journal: loaded.unwrap_or_else(EventJournal::starting_now),
            pending: Pending::default(),
            unflushed: false,
            effect_unwritten: false,
            earlier,
            store,
            beside: Vec::new(),
            timers: Vec::new(),
        };
        if !pass.journal.has_begun() {
            let traceparent = crate::otel::current_traceparent();
            pass.pending
                .push_begin(&mut pass.journal, event, traceparent);
        }
        pass
    }

    /// Records `entry`: the journal has it at once, the store at the next
    /// write.
    pub fn record(&mut self, entry: Entry) {
        self.pending.push(&entry);
        self.journal.apply(entry);
    }

    /// The writes of what was recorded and not written yet, in order, for
    /// a batch the caller applies (none when there is nothing): with a
    /// record's first write (its head), the record's place in the
    /// account's listing first when its id does not give it one
    /// ([`crate::journal::RecordKey::needs_time_entry`]), then the entry.
    /// A crash between leaves a listing entry whose record is missing, or,
    /// once the event is taken up again, started at another time: the
    /// listing takes such an entry for none, so an event is listed once, at
    /// its record's start.
    pub fn take_write(&mut self, journal: &Journal) -> Result<Vec<Write>, StoreError> {
        self.effect_unwritten = false;
        let fresh = self.journal.is_fresh();
        let Some(write) = journal.append(&self.at, &mut self.journal, &mut self.pending)? else {
            return Ok(std::mem::take(&mut self.beside));
        };
        let mut writes = if fresh && self.at.needs_time_entry(self.journal.started_ms) {
            vec![self.at.time_entry(self.journal.started_ms), write]
        } else {
            vec![write]
        };
        writes.append(&mut self.beside);
        Ok(writes)
    }

    /// Writes `write` with the record's next write.
    pub fn write_beside(&mut self, write: Write) {
        self.beside.push(write);
    }

    /// Sets `timer` with the record's next write.
    pub fn set_timer(&mut self, timer: PendingTimer) {
        self.beside.push(timer.put());
        self.timers.push(timer);
    }

    /// Removes `timer` with the record's next write.
    pub fn clear_timer(&mut self, timer: &PendingTimer) {
        self.beside.push(timer.removal());
    }

    /// The timers this pass set, once they are written.
    pub fn written_timers(&mut self) -> Vec<PendingTimer> {
        std::mem::take(&mut self.timers)
    }

    /// The store as this pass writes it.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes what was recorded and not written yet (not flushed).
    pub fn write(&mut self, journal: &Journal) -> Result<(), StoreError> {
        let writes = self.take_write(journal)?;
        if writes.is_empty() {
            return Ok(());
        }
        self.store.write_in_order(&writes)
    }

    /// A step finished and was recorded: writes it now if `recording` says so.
    pub fn step_recorded(
        &mut self,
        recording: Recording,
        journal: &Journal,
    ) -> Result<(), StoreError> {
        match recording {
            Recording::WithTheEnd => Ok(()),
            Recording::Now => self.write(journal),
            Recording::BeforeTheNextEffect => {
                self.unflushed = true;
                self.effect_unwritten = true;
                Ok(())
            }
        }
    }

    /// Whether an outside effect's record (this pass's or the worker's
    /// earlier event's) may not be durable yet.
    pub fn awaits_flush(&self) -> bool {
        self.unflushed || self.earlier.is_some_and(|m| !self.store.is_durable(m))
    }

    /// Writes what was recorded and makes everything written so far
    /// durable: fails if the store did not, or if this event's term ended
    /// meanwhile (what it wrote may be lost).
    pub async fn flush(&mut self, journal: &Journal) -> Result<(), StoreError> {
        self.write(journal)?;
        self.store.flush().await?;
        self.unflushed = false;
        self.earlier = None;
        Ok(())
    }

    /// The mark the worker's next event waits for before its first outside
    /// step: this pass's last outside effect, or the earlier one. Taken
    /// after the pass's last write, which it must cover.
    pub fn earlier_for_next(&self) -> Option<WriteMark> {
        debug_assert!(self.pending.is_empty(), "a mark taken before a write");
        if self.unflushed {
            Some(self.store.mark())
        } else {
            self.earlier
        }
    }
}

impl Drop for Pass {
    /// A pass given up before its next write (interrupted by a failure, or
    /// cut off by a shutdown's grace period) still writes what it recorded
    /// when that holds an outside step's entry, so that the event, handled
    /// again, resumes after the step instead of repeating it. Unflushed: a
    /// stop flushes the store before it gives cut-off events back. A write
    /// that fails (the store's, or one refused because the partition moved)
    /// keeps nothing, here as anywhere: the step then runs again. Also
    /// while a panic of the pass unwinds: the worker catches it and handles
    /// the event again, which must not repeat the step, each time the panic
    /// comes back. (A panic in this write, during that unwinding, aborts the
    /// process; the event is then delivered again, after its ack wait.)
    fn drop(&mut self) {
        if !self.effect_unwritten {
            return;
        }
        let journal = Journal::new(self.store.clone());
        if let Err(e) = self.write(&journal) {
            tracing::warn!(error = %e, "writing the entry of an outside step, its pass given up, failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::{event, step};

    fn open() -> (tempfile::TempDir, Store, Journal) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let journal = Journal::new(store.clone());
        (dir, store, journal)
    }

    /// Step `name` of chain `c` finished, recorded as `recording` says.
    fn finished(pass: &mut Pass, journal: &Journal, name: &str, recording: Recording) {
        pass.record(step("c", name));
        pass.step_recorded(recording, journal).expect("recorded");
    }

    fn steps_of(journal: &Journal, e: &VumiApiEvent) -> Vec<String> {
        let at = RecordKey::new(&e.account_key, &e.id);
        journal
            .load(&at)
            .expect("a read")
            .map(|j| {
                j.chains
                    .iter()
                    .flat_map(|c| c.steps.iter().map(|s| s.trace.name.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// An outside step's entry waits for the pass's next write, which the
    /// flush before the next outside step makes.
    #[tokio::test]
    async fn an_outside_steps_entry_is_written_by_the_flush_before_the_next() {
        let (_dir, store, journal) = open();
        let e = event(1);
        let mut pass = Pass::new(&e, None, None, store.clone());
        finished(&mut pass, &journal, "pay", Recording::BeforeTheNextEffect);
        assert_eq!(steps_of(&journal, &e), Vec::<String>::new());
        assert!(pass.awaits_flush());
        pass.flush(&journal).await.expect("a flush");
        assert_eq!(steps_of(&journal, &e), ["pay"]);
        assert!(!pass.awaits_flush());
        assert_eq!(pass.earlier_for_next(), None);
    }

    /// A pass given up before its next write (interrupted, or cut off by a
    /// shutdown) writes a finished outside step's entry as it goes; one
    /// whose entries were all written writes nothing more.
    #[test]
    fn a_pass_given_up_writes_its_outside_steps_entry() {
        let (_dir, store, journal) = open();
        let e = event(2);
        let mut pass = Pass::new(&e, None, None, store.clone());
        finished(&mut pass, &journal, "score", Recording::WithTheEnd);
        finished(&mut pass, &journal, "pay", Recording::BeforeTheNextEffect);
        assert_eq!(steps_of(&journal, &e), Vec::<String>::new());
        drop(pass);
        assert_eq!(steps_of(&journal, &e), ["score", "pay"]);

        // Without an outside step, what waits for the end goes with it.
        let e = event(3);
        let mut pass = Pass::new(&e, None, None, store.clone());
        finished(&mut pass, &journal, "score", Recording::WithTheEnd);
        drop(pass);
        assert_eq!(steps_of(&journal, &e), Vec::<String>::new());

        // Written, then given up: the record is as written.
        let e = event(4);
        let mut pass = Pass::new(&e, None, None, store.clone());
        finished(&mut pass, &journal, "pay", Recording::BeforeTheNextEffect);
        pass.write(&journal).expect("a write");
        pass.record(step("c", "after"));
        drop(pass);
        assert_eq!(steps_of(&journal, &e), ["pay"]);
    }

    /// A pass that panics after an outside step (the worker catches it and
    /// handles the event again) writes the step's entry as it unwinds, so
    /// that the event handled again does not repeat the step.
    #[test]
    fn a_pass_that_panics_writes_its_outside_steps_entry() {
        let (_dir, store, journal) = open();
        let e = event(5);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut pass = Pass::new(&e, None, None, store.clone());
            finished(&mut pass, &journal, "pay", Recording::BeforeTheNextEffect);
            panic!("a defect after the step");
        }));
        assert!(unwound.is_err());
        assert_eq!(steps_of(&journal, &e), ["pay"]);
    }
}
