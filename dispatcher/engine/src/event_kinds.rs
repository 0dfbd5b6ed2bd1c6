//! The kinds of event each account has had: per (conversation type, event
//! type), how many, when the last came and the latest one's id. The console
//! offers them when an operator picks the source of a new chain, and
//! previews templates against the latest event of the kind picked.
//!
//! Kept off the hot path: the consume loop counts first deliveries in a
//! [`Tally`] of its own (no lock, no store write per event) and hands it
//! over about once a second, when each account that had events costs one
//! store read and one write ([`EventKinds::add`]): an account's kinds are
//! one record, however many of them a second's events touched. The
//! collection is local to each process (`Collection::EventKinds`, not
//! replicated): a replica knows the kinds it consumed, and a crash forgets
//! at most the last second's counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use switchboard_api::events::EventKind;
use switchboard_sdk::{AccountKey, ConversationType, EventId, EventType, VumiApiEvent};
use switchboard_store::{Collection, Entry, Store, StoreError};
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

    /// How many accounts it counted events of.
    pub fn accounts(&self) -> usize {
        self.counts.len()
    }
}

/// The most kinds kept per account: kinds first seen beyond it are not
/// kept (an account's workers could otherwise make any number of them).
pub const MAX_KINDS: usize = 200;

/// The key that marks the kinds as kept one record per account (no
/// account's key starts with a zero byte).
const UPGRADED: &[u8] = b"\0one record per account";

/// The kinds of event of every account, in the store: one record per
/// account (its key the account's), a JSON array of [`EventKind`].
#[derive(Debug, Clone)]
pub struct EventKinds {
    store: Store,
    /// Held while a tally is added: each account's record is read, then
    /// written.
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

    /// Brings kinds stored by an earlier version, one record per kind
    /// (keyed account, conversation type and event type, parted by a zero
    /// byte), into their accounts' records; for the start, before any
    /// [`EventKinds::add`]. Returns how many it moved. Each account's record
    /// is written before its old records are removed, so an account that
    /// has a record already was upgraded by a start that stopped part-way:
    /// its old records are removed without being counted again. Once done
    /// it leaves a mark ([`UPGRADED`]), so that later starts read one key
    /// instead of every account's record.
    pub fn upgrade(&self) -> Result<usize, StoreError> {
        let _adding = self.adding.lock().expect("event kinds lock");
        if self.store.contains(Collection::EventKinds, UPGRADED)? {
            return Ok(0);
        }
        let mut by_account: HashMap<Vec<u8>, Vec<Entry>> = HashMap::new();
        for (k, v) in self.store.scan_prefix(Collection::EventKinds, b"")? {
            if let Some(end) = k.iter().position(|b| *b == 0).filter(|end| *end > 0) {
                by_account
                    .entry(k[..end].to_vec())
                    .or_default()
                    .push((k, v));
            }
        }
        let mut moved = 0;
        for (account, old) in by_account {
            if self.store.get(Collection::EventKinds, &account)?.is_none() {
                let mut kinds = Vec::new();
                for (_, v) in &old {
                    // One that does not decode is dropped: the counts are
                    // for display.
                    if let Ok(kind) = serde_json::from_slice::<EventKind>(v) {
                        merge(&mut kinds, kind);
                    }
                }
                self.write(&account, &kinds)?;
            }
            for (k, _) in old {
                self.store.remove(Collection::EventKinds, &k)?;
                moved += 1;
            }
        }
        self.store.put(Collection::EventKinds, UPGRADED, b"")?;
        Ok(moved)
    }

    /// Adds a tally's counts: one read and one write per account it holds.
    pub fn add(&self, tally: Tally) -> Result<(), StoreError> {
        let _adding = self.adding.lock().expect("event kinds lock");
        for (account, by_type) in tally.counts {
            let k = account.as_str().as_bytes();
            let mut kinds = self.read(k)?;
            for (conversation_type, by_event) in by_type {
                for (event_type, seen) in by_event {
                    merge(
                        &mut kinds,
                        EventKind {
                            conversation_type: conversation_type.clone(),
                            event_type,
                            count: seen.count,
                            last_seen: seen.at,
                            last_event_id: seen.latest,
                        },
                    );
                }
            }
            self.write(k, &kinds)?;
        }
        Ok(())
    }

    /// The kinds of `account`'s events, the most recently seen first.
    pub fn of(&self, account: &AccountKey) -> Result<Vec<EventKind>, StoreError> {
        let mut kinds = self.read(account.as_str().as_bytes())?;
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
        Ok(self
            .read(account.as_str().as_bytes())?
            .into_iter()
            .find(|k| {
                k.conversation_type.as_str() == conversation_type
                    && k.event_type.as_str() == event_type
            }))
    }

    /// An account's kinds as stored (none for a record that does not
    /// decode: the counts are for display, and the next hand-over writes
    /// them afresh).
    fn read(&self, account: &[u8]) -> Result<Vec<EventKind>, StoreError> {
        Ok(self
            .store
            .get(Collection::EventKinds, account)?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default())
    }

    fn write(&self, account: &[u8], kinds: &[EventKind]) -> Result<(), StoreError> {
        let value = serde_json::to_vec(kinds).expect("kinds serialise");
        self.store.put(Collection::EventKinds, account, &value)
    }
}

/// Adds `new` (counted since `kinds` were stored) to `kinds`: to its kind's
/// count, or as a new kind while the account has fewer than [`MAX_KINDS`].
/// A later tally may be added first: the latest sighting stays.
fn merge(kinds: &mut Vec<EventKind>, new: EventKind) {
    let same = |k: &EventKind| {
        k.conversation_type == new.conversation_type && k.event_type == new.event_type
    };
    if let Some(old) = kinds.iter_mut().find(|k| same(k)) {
        old.count += new.count;
        if new.last_seen >= old.last_seen {
            old.last_seen = new.last_seen;
            old.last_event_id = new.last_event_id;
        }
    } else if kinds.len() < MAX_KINDS {
        kinds.push(new);
    }
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

    fn summary(kinds: &EventKinds, account: &str) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = kinds
            .of(&AccountKey::new(account).unwrap())
            .unwrap()
            .into_iter()
            .map(|k| (format!("{}/{}", k.conversation_type, k.event_type), k.count))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn an_account_keeps_at_most_max_kinds_and_still_counts_those_it_has() {
        let kinds = EventKinds::new(Store::temporary().unwrap());
        let mut tally = Tally::default();
        for i in 0..MAX_KINDS {
            tally.count(&event("acme", "survey", &format!("type_{i:03}")));
        }
        kinds.add(tally).unwrap();
        let mut tally = Tally::default();
        tally.count(&event("acme", "survey", "type_000"));
        tally.count(&event("acme", "survey", "brand_new"));
        kinds.add(tally).unwrap();

        let all = summary(&kinds, "acme");
        assert_eq!(all.len(), MAX_KINDS);
        assert_eq!(all[0], ("survey/type_000".to_string(), 2));
        assert!(all.iter().all(|(kind, _)| kind != "survey/brand_new"));
        assert_eq!(
            all.iter().map(|(_, n)| n).sum::<u64>(),
            MAX_KINDS as u64 + 1
        );
    }

    #[test]
    fn an_earlier_tally_added_late_keeps_the_latest_sighting() {
        let kinds = EventKinds::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let mut earlier = Tally::default();
        let first = event("acme", "survey", "poll_complete");
        earlier.count(&first);
        let mut later = Tally::default();
        let second = event("acme", "survey", "poll_complete");
        later.count(&second);
        kinds.add(later).unwrap();
        kinds.add(earlier).unwrap();
        let kind = kinds
            .get(&acme, "survey", "poll_complete")
            .unwrap()
            .unwrap();
        assert_eq!(kind.count, 2);
        assert_eq!(kind.last_event_id, second.id);
    }

    /// A kind as an earlier release stored it: its own record.
    fn put_old(store: &Store, account: &str, et: &str, count: u64) {
        let kind = EventKind {
            conversation_type: ConversationType::new("survey").unwrap(),
            event_type: EventType::new(et).unwrap(),
            count,
            last_seen: switchboard_sdk::now(),
            last_event_id: EventId::new_v7(),
        };
        let k = switchboard_store::key(&[account.as_bytes(), b"survey", et.as_bytes()]);
        store
            .put(
                Collection::EventKinds,
                &k,
                &serde_json::to_vec(&kind).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn kinds_of_an_earlier_release_are_brought_into_their_accounts_records() {
        let store = Store::temporary().unwrap();
        put_old(&store, "acme", "poll_complete", 7);
        put_old(&store, "acme", "poll_started", 3);
        put_old(&store, "other", "poll_complete", 1);
        let junk = switchboard_store::key(&[b"other", b"survey", b"junk"]);
        store
            .put(Collection::EventKinds, &junk, b"not json")
            .unwrap();
        let kinds = EventKinds::new(store.clone());

        assert_eq!(kinds.upgrade().unwrap(), 4);
        assert_eq!(
            summary(&kinds, "acme"),
            [
                ("survey/poll_complete".to_string(), 7),
                ("survey/poll_started".to_string(), 3)
            ]
        );
        assert_eq!(
            summary(&kinds, "other"),
            [("survey/poll_complete".to_string(), 1)]
        );
        let keys: Vec<Vec<u8>> = store
            .scan_prefix(Collection::EventKinds, b"")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [UPGRADED.to_vec(), b"acme".to_vec(), b"other".to_vec()]
        );
        assert_eq!(kinds.upgrade().unwrap(), 0, "nothing is left to bring over");
        // Marked as done: a later start reads the mark, not the collection.
        put_old(&store, "acme", "poll_complete", 7);
        assert_eq!(kinds.upgrade().unwrap(), 0);

        // A start that stopped after writing an account's record but before
        // removing its old ones (and so before the mark): they are removed,
        // not counted twice.
        store.remove(Collection::EventKinds, UPGRADED).unwrap();
        put_old(&store, "acme", "poll_complete", 7);
        assert_eq!(kinds.upgrade().unwrap(), 1);
        assert_eq!(
            summary(&kinds, "acme")[0],
            ("survey/poll_complete".to_string(), 7)
        );
    }
}
