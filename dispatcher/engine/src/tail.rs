//! The live tail: a row per pass over an event as it ends, for whoever
//! watches (the console's events page, `GET .../events/stream`). Nothing is
//! built or sent while no one watches; a watcher that falls behind loses
//! rows, never holds up the dispatcher.

use std::sync::Arc;

pub use switchboard_api::events::{ChainRow, EventRow};
use switchboard_sdk::VumiApiEvent;
use tokio::sync::{broadcast, watch};

use crate::journal::{ChainEnd, EventJournal};
use crate::trace::TraceStatus;

/// How many rows a watcher may fall behind before it loses some.
const BACKLOG: usize = 1_024;

/// The tail's sending end, shared by the executor and the watchers.
#[derive(Debug, Clone)]
pub struct Tail {
    sender: broadcast::Sender<Arc<EventRow>>,
    stopped: watch::Receiver<bool>,
}

impl Tail {
    /// A tail whose watchers stop watching when `stopped` turns true (so
    /// that open streams do not hold up a graceful stop).
    pub fn new(stopped: watch::Receiver<bool>) -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
            stopped,
        }
    }

    /// A new watcher: the rows of passes that end from now on.
    pub fn watch(&self) -> broadcast::Receiver<Arc<EventRow>> {
        self.sender.subscribe()
    }

    /// Turns true when the dispatcher stops.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.clone()
    }

    /// Sends the row of a pass over `event` that left `journal` with
    /// `status`, if anyone watches.
    pub(crate) fn passed(&self, event: &VumiApiEvent, journal: &EventJournal, status: TraceStatus) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let row = row(event, journal, status, switchboard_sdk::now());
        let _ = self.sender.send(Arc::new(row));
    }
}

/// The row of `event` whose record is `journal`, standing at `status` at
/// `at`: each chain with its outcome.
pub(crate) fn row(
    event: &VumiApiEvent,
    journal: &EventJournal,
    status: TraceStatus,
    at: time::OffsetDateTime,
) -> EventRow {
    let chains = journal
        .chains
        .iter()
        .map(|c| {
            let (outcome, step) = match (&c.end, &c.retry, &c.condition_failed) {
                (Some(ChainEnd::Done), _, _) => ("done", None),
                (Some(ChainEnd::Dead { step, .. }), _, _) => ("dead", Some(step.clone())),
                (Some(ChainEnd::Discarded), _, _) => ("discarded", None),
                (Some(ChainEnd::Expired { step }), _, _) => ("expired", Some(step.clone())),
                (Some(ChainEnd::Cancelled { .. }), _, _) => ("cancelled", None),
                (Some(ChainEnd::Removed), _, _) => ("removed", None),
                (Some(ChainEnd::Limited { control }), _, _) => {
                    (crate::executor::ended_as(*control), None)
                }
                (None, Some(retry), _) => ("retrying", Some(retry.step.clone())),
                (None, None, Some(_)) => ("condition_failed", None),
                (None, None, None) if c.waiting.is_some() => {
                    ("waiting", c.steps.last().map(|s| s.trace.name.clone()))
                }
                (None, None, None) => ("running", None),
            };
            ChainRow {
                name: c.name.clone(),
                outcome: outcome.to_string(),
                step,
            }
        })
        .collect();
    EventRow {
        account_key: event.account_key.clone(),
        id: event.id,
        conversation_type: event.conversation_type.clone(),
        event_type: event.event_type.clone(),
        conversation_key: event.conversation_key.clone(),
        status: status.as_str().to_string(),
        chains,
        at,
    }
}
