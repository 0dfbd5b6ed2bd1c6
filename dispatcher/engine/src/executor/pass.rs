//! One pass over an event: its journal record as it grows, what of it is
//! written, and what is durable.
//!
//! Entries are recorded as the chains run and written in as few writes as
//! the guarantees allow: a step without outside effects waits for the
//! pass's last write; a step with effects is written at once (and, for one
//! outside the dispatcher, made durable before the next such step). So an
//! event whose chains have no effects costs one store write, and a step
//! with effects one small entry, never the whole record again.

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
    /// A step with outside effects was written and is not flushed yet.
    unflushed: bool,
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
            Recording::NowThenDurable => {
                self.write(journal)?;
                self.unflushed = true;
                Ok(())
            }
        }
    }

    /// Whether an outside effect's record (this pass's or the worker's
    /// earlier event's) may not be durable yet.
    pub fn awaits_flush(&self) -> bool {
        self.unflushed || self.earlier.is_some_and(|m| !self.store.is_durable(m))
    }

    /// Makes everything written so far durable: fails if the store did not,
    /// or if this event's term ended meanwhile (what it wrote may be lost).
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        self.store.flush().await?;
        self.unflushed = false;
        self.earlier = None;
        Ok(())
    }

    /// The mark the worker's next event waits for before its first outside
    /// step: this pass's last outside effect, or the earlier one.
    pub fn earlier_for_next(&self) -> Option<WriteMark> {
        if self.unflushed {
            Some(self.store.mark())
        } else {
            self.earlier
        }
    }
}
