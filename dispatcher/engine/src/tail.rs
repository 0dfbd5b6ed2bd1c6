//! The live tail: a row per pass over an event as it ends, for whoever
//! watches (the console's events page, `GET .../events/stream`). Nothing is
//! built or sent while no one watches; a watcher that falls behind loses
//! rows, never holds up the dispatcher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use switchboard_api::events::{ChainRow, EventRow};
use switchboard_sdk::{AccountKey, VumiApiEvent};
use tokio::sync::{broadcast, watch};

use crate::journal::{ChainEnd, EventJournal};
use crate::trace::TraceStatus;

/// How many rows a watcher may fall behind before it loses some.
const BACKLOG: usize = 1_024;

/// How many watchers one account may have at once (each holds a stream
/// open, and each row of the account is handed to each).
pub const MAX_WATCHERS_PER_ACCOUNT: usize = 32;

/// The tail's sending end, shared by the executor and the watchers.
#[derive(Debug, Clone)]
pub struct Tail {
    watched: Arc<Watched>,
    stopped: watch::Receiver<bool>,
}

/// The accounts watched now, each with a channel of its own: a row is
/// built and handed only to its account's watchers.
#[derive(Debug, Default)]
struct Watched {
    /// How many watchers there are in all: while none, a pass ending
    /// looks no further (without taking the lock).
    watchers: AtomicUsize,
    /// Each watched account's channel; its watchers are its receivers.
    channels: Mutex<HashMap<AccountKey, broadcast::Sender<Arc<EventRow>>>>,
}

/// A watcher of an account's rows, counted against the account's
/// [`MAX_WATCHERS_PER_ACCOUNT`] while it lives.
#[derive(Debug)]
pub struct Watcher {
    /// The rows of the account's passes that end from its start on.
    pub rows: broadcast::Receiver<Arc<EventRow>>,
    account: AccountKey,
    watched: Arc<Watched>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut channels = self.watched.channels.lock().expect("watchers lock");
        // Its own receiver is still counted: it goes after this.
        if channels
            .get(&self.account)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            channels.remove(&self.account);
        }
        self.watched.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An account has as many watchers as it may.
#[derive(Debug, thiserror::Error)]
#[error("account {account} has {MAX_WATCHERS_PER_ACCOUNT} live tails open already")]
pub struct TooManyWatchers {
    /// The account.
    pub account: AccountKey,
}

impl Tail {
    /// A tail whose watchers stop watching when `stopped` turns true (so
    /// that open streams do not hold up a graceful stop).
    pub fn new(stopped: watch::Receiver<bool>) -> Self {
        Self {
            watched: Arc::default(),
            stopped,
        }
    }

    /// A new watcher of `account`: the rows of its passes that end from
    /// now on. Refused while the account has [`MAX_WATCHERS_PER_ACCOUNT`].
    pub fn watch(&self, account: &AccountKey) -> Result<Watcher, TooManyWatchers> {
        let mut channels = self.watched.channels.lock().expect("watchers lock");
        let sender = channels
            .entry(account.clone())
            .or_insert_with(|| broadcast::channel(BACKLOG).0);
        if sender.receiver_count() >= MAX_WATCHERS_PER_ACCOUNT {
            return Err(TooManyWatchers {
                account: account.clone(),
            });
        }
        self.watched.watchers.fetch_add(1, Ordering::Relaxed);
        Ok(Watcher {
            rows: sender.subscribe(),
            account: account.clone(),
            watched: Arc::clone(&self.watched),
        })
    }

    /// Turns true when the dispatcher stops.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.clone()
    }

    /// Sends the row of a pass over `event` that left `journal` with
    /// `status` to the event's account's watchers, if it has any.
    pub(crate) fn passed(&self, event: &VumiApiEvent, journal: &EventJournal, status: TraceStatus) {
        if self.watched.watchers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let sender = {
            let channels = self.watched.channels.lock().expect("watchers lock");
            match channels.get(&event.account_key) {
                Some(sender) => sender.clone(),
                None => return,
            }
        };
        let row = row(event, journal, status, switchboard_sdk::now());
        let _ = sender.send(Arc::new(row));
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

#[cfg(test)]
mod watcher_tests {
    use super::*;

    /// An account may have [`MAX_WATCHERS_PER_ACCOUNT`] watchers at once;
    /// one more is refused, naming the account, until one goes. Another
    /// account's are counted apart.
    #[test]
    fn an_account_has_at_most_its_share_of_watchers() {
        let (_stop, stopped) = watch::channel(false);
        let tail = Tail::new(stopped);
        let acme = AccountKey::new("acme").unwrap();
        let zeta = AccountKey::new("zeta").unwrap();
        let mut open: Vec<Watcher> = (0..MAX_WATCHERS_PER_ACCOUNT)
            .map(|_| tail.watch(&acme).expect("within the limit"))
            .collect();
        let refused = tail.watch(&acme).expect_err("one more");
        assert_eq!(refused.account, acme);
        assert!(refused.to_string().contains("acme"), "{refused}");
        assert!(tail.watch(&zeta).is_ok());
        open.pop();
        let again = tail.watch(&acme).expect("room again");
        drop(open);
        drop(again);
        assert!(tail.watched.channels.lock().unwrap().is_empty());
        assert_eq!(tail.watched.watchers.load(Ordering::Relaxed), 0);
    }

    fn event(account: &str) -> VumiApiEvent {
        VumiApiEvent::new(
            AccountKey::new(account).unwrap(),
            switchboard_sdk::ConversationKey::new("c").unwrap(),
            switchboard_sdk::ConversationType::new("survey").unwrap(),
            switchboard_sdk::EventType::new("poll_complete").unwrap(),
            serde_json::Map::new(),
        )
    }

    /// A watcher is handed its own account's rows only, and every one of
    /// them: another account's passes cost it nothing and cannot make it
    /// fall behind.
    #[test]
    fn a_watcher_is_handed_its_accounts_rows_only() {
        let (_stop, stopped) = watch::channel(false);
        let tail = Tail::new(stopped);
        let (acme, zeta) = (event("acme"), event("zeta"));
        let journal = EventJournal::default();
        // Before anyone watches, nothing is kept for later.
        tail.passed(&acme, &journal, TraceStatus::Done);
        let mut watcher = tail.watch(&acme.account_key).expect("a watcher");
        for _ in 0..BACKLOG * 2 {
            tail.passed(&zeta, &journal, TraceStatus::Done);
        }
        for _ in 0..3 {
            tail.passed(&acme, &journal, TraceStatus::Done);
        }
        for _ in 0..3 {
            let row = watcher.rows.try_recv().expect("acme's row, none lost");
            assert_eq!(row.account_key, acme.account_key);
            assert_eq!(row.status, "done");
        }
        assert!(matches!(
            watcher.rows.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }
}
