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
}

impl Pass {
    /// A pass over `event`, whose record so far is `loaded`; `earlier` is
    /// the worker's last outside effect whose record may not be durable.
    pub fn new(
        event: &VumiApiEvent,
        loaded: Option<EventJournal>,
        earlier: Option<WriteMark>,
    ) -> Self {
        let mut pass = Self {
            at: RecordKey::new(&event.account_key, &event.id),
            journal: loaded.unwrap_or_else(EventJournal::starting_now),
            pending: Pending::default(),
            unflushed: false,
            earlier,
        };
        if !pass.journal.has_begun() {
            pass.pending.push_begin(&mut pass.journal, event);
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
    /// account's listing first, then the entry. A crash between leaves a
    /// listing entry whose record is missing, or, once the event is taken
    /// up again, started at another time: the listing takes such an entry
    /// for none, so an event is listed once, at its record's start.
    pub fn take_write(&mut self, journal: &Journal) -> Result<Vec<Write>, StoreError> {
        let fresh = self.journal.is_fresh();
        let Some(write) = journal.append(&self.at, &mut self.journal, &mut self.pending)? else {
            return Ok(Vec::new());
        };
        Ok(if fresh {
            vec![self.at.time_entry(self.journal.started_ms), write]
        } else {
            vec![write]
        })
    }

    /// Writes what was recorded and not written yet (not flushed).
    pub fn write(&mut self, journal: &Journal, store: &Store) -> Result<(), StoreError> {
        let writes = self.take_write(journal)?;
        if writes.is_empty() {
            return Ok(());
        }
        store.write_in_order(&writes)
    }

    /// A step finished and was recorded: writes it now if `recording` says so.
    pub fn step_recorded(
        &mut self,
        recording: Recording,
        journal: &Journal,
        store: &Store,
    ) -> Result<(), StoreError> {
        match recording {
            Recording::WithTheEnd => Ok(()),
            Recording::Now => self.write(journal, store),
            Recording::NowThenDurable => {
                self.write(journal, store)?;
                self.unflushed = true;
                Ok(())
            }
        }
    }

    /// Whether an outside effect's record (this pass's or the worker's
    /// earlier event's) may not be durable yet.
    pub fn awaits_flush(&self, store: &Store) -> bool {
        self.unflushed || self.earlier.is_some_and(|m| !store.is_durable(m))
    }

    /// Everything written so far is durable.
    pub fn flushed(&mut self) {
        self.unflushed = false;
        self.earlier = None;
    }

    /// The mark the worker's next event waits for before its first outside
    /// step: this pass's last outside effect, or the earlier one.
    pub fn earlier_for_next(&self, store: &Store) -> Option<WriteMark> {
        if self.unflushed {
            Some(store.mark())
        } else {
            self.earlier
        }
    }
}
