//! The kinds of event each account has had: per (conversation type, event
//! type), how many, when the last came and the latest one's id. The console
//! offers them when an operator picks the source of a new chain, and
//! previews templates against the latest event of the kind picked.
//!
//! Kept off the hot path: the consume loop counts first deliveries in a
//! [`Tally`] of its own (no lock, no store write per event) and hands it
//! over about once a second, when each kind that changed costs one store
//! write ([`EventKinds::add`]). The collection is local to each process
//! (`Collection::EventKinds`, not replicated): a replica knows the kinds it
//! consumed, and a crash forgets at most the last second's counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use switchboard_api::events::EventKind;
use switchboard_sdk::{AccountKey, ConversationType, EventId, EventType, VumiApiEvent};
use switchboard_store::{Collection, Store, StoreError, key};
use time::OffsetDateTime;

/// Counts not yet handed over: account → conversation type → event type.
#[derive(Debug, Default)]
pub struct Tally {
    counts: HashMap<AccountKey, HashMap<ConversationType, HashMap<EventType, Seen>>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    count: u64,
    at: OffsetDateTime,
    latest: EventId,
}

impl Tally {
    /// Counts `event`, consumed now. Allocates only for a kind not yet in
    /// this tally.
    pub fn count(&mut self, event: &VumiApiEvent) {
        let now = switchboard_sdk::now();
        let seen = Seen {
            count: 1,
            at: now,
            latest: event.id,
        };
        let by_type = match self.counts.get_mut(&event.account_key) {
            Some(m) => m,
            None => self.counts.entry(event.account_key.clone()).or_default(),
        };
        let by_event = match by_type.get_mut(&event.conversation_type) {
            Some(m) => m,
            None => by_type.entry(event.conversation_type.clone()).or_default(),
        };
        match by_event.get_mut(&event.event_type) {
            Some(s) => {
                s.count += 1;
                s.at = now;
                s.latest = event.id;
            }
            None => {
                by_event.insert(event.event_type.clone(), seen);
            }
        }
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// The most kinds kept per account: kinds first seen beyond it are not
/// kept (an account's workers could otherwise make any number of them).
pub const MAX_KINDS: usize = 200;

/// The kinds of event of every account, in the store.
#[derive(Debug, Clone)]
pub struct EventKinds {
    store: Store,
    /// Held while a tally is added: each kind is read, then written.
    adding: Arc<Mutex<()>>,
}

impl EventKinds {
    /// The kinds kept in `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            adding: Arc::default(),
        }
    }

    /// Adds a tally's counts: one read and one write per kind it holds
    /// (and, for a kind the account has not had, a count of its kinds).
    pub fn add(&self, tally: Tally) -> Result<(), StoreError> {
        let _adding = self.adding.lock().expect("event kinds lock");
        for (account, by_type) in tally.counts {
            let prefix = key(&[account.as_str().as_bytes(), b""]);
            for (conversation_type, by_event) in by_type {
                for (event_type, seen) in by_event {
                    let k = kind_key(&account, &conversation_type, &event_type);
                    let old = match self.store.get(Collection::EventKinds, &k)? {
                        Some(bytes) => serde_json::from_slice::<EventKind>(&bytes).ok(),
                        None => {
                            let kinds = self.store.scan_prefix(Collection::EventKinds, &prefix)?;
                            if kinds.len() >= MAX_KINDS {
                                continue;
                            }
                            None
                        }
                    };
                    // A later tally may be added first: the latest stays.
                    let (last_seen, last_event_id) = match &old {
                        Some(old) if old.last_seen > seen.at => (old.last_seen, old.last_event_id),
                        _ => (seen.at, seen.latest),
                    };
                    let kind = EventKind {
                        conversation_type: conversation_type.clone(),
                        event_type,
                        count: old.map_or(0, |o| o.count) + seen.count,
                        last_seen,
                        last_event_id,
                    };
                    let value = serde_json::to_vec(&kind).expect("a kind serialises");
                    self.store.put(Collection::EventKinds, &k, &value)?;
                }
            }
        }
        Ok(())
    }

    /// The kinds of `account`'s events, the most recently seen first.
    pub fn of(&self, account: &AccountKey) -> Result<Vec<EventKind>, StoreError> {
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        let mut kinds: Vec<EventKind> = self
            .store
            .scan_prefix(Collection::EventKinds, &prefix)?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        kinds.sort_by_key(|k| std::cmp::Reverse(k.last_seen));
        Ok(kinds)
    }

    /// The kind (`conversation_type`, `event_type`) of `account`'s events,
    /// if it has had one.
    pub fn get(
        &self,
        account: &AccountKey,
        conversation_type: &str,
        event_type: &str,
    ) -> Result<Option<EventKind>, StoreError> {
        let k = key(&[
            account.as_str().as_bytes(),
            conversation_type.as_bytes(),
            event_type.as_bytes(),
        ]);
        Ok(self
            .store
            .get(Collection::EventKinds, &k)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

fn kind_key(account: &AccountKey, ct: &ConversationType, et: &EventType) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        ct.as_str().as_bytes(),
        et.as_str().as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;

    fn event(account: &str, ct: &str, et: &str) -> VumiApiEvent {
        VumiApiEvent::new(
            AccountKey::new(account).unwrap(),
            switchboard_sdk::ConversationKey::new("c").unwrap(),
            ConversationType::new(ct).unwrap(),
            EventType::new(et).unwrap(),
            Map::new(),
        )
    }

    #[test]
    fn tallies_add_up_per_account_and_kind() {
        let kinds = EventKinds::new(Store::temporary().unwrap());
        let mut tally = Tally::default();
        let first = event("acme", "survey", "poll_complete");
        tally.count(&first);
        tally.count(&event("acme", "survey", "poll_started"));
        tally.count(&event("other", "survey", "poll_complete"));
        assert!(!tally.is_empty());
        kinds.add(tally).unwrap();
        let mut tally = Tally::default();
        let latest = event("acme", "survey", "poll_complete");
        tally.count(&latest);
        kinds.add(tally).unwrap();

        let acme = kinds.of(&AccountKey::new("acme").unwrap()).unwrap();
        let summary: Vec<(&str, &str, u64)> = acme
            .iter()
            .map(|k| (k.conversation_type.as_str(), k.event_type.as_str(), k.count))
            .collect();
        assert_eq!(
            summary,
            [
                ("survey", "poll_complete", 2),
                ("survey", "poll_started", 1)
            ]
        );
        assert_eq!(acme[0].last_event_id, latest.id);
        let other = kinds.of(&AccountKey::new("other").unwrap()).unwrap();
        assert_eq!(other.len(), 1);
        let one = kinds
            .get(&AccountKey::new("acme").unwrap(), "survey", "poll_started")
            .unwrap()
            .unwrap();
        assert_eq!(one.count, 1);
        assert!(
            kinds
                .get(&AccountKey::new("acme").unwrap(), "survey", "nope")
                .unwrap()
                .is_none()
        );
    }
}
