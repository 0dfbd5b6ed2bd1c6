//! Dead letters: what could not be handled, and why, kept per account until
//! an operator replays or discards it.

use serde::{Deserialize, Serialize};
use switchboard_sdk::VumiApiEvent;
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

/// Why an event went to dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// Not an event: bad JSON, a schema violation, too large.
    Poison,
    /// Deeper than the lineage limit (usually a chain that triggers itself).
    DepthLimit,
    /// A step failed permanently, or ran out of retries.
    StepFailed,
}

/// The account poison is filed under when the subject names no valid account.
/// `~` is outside the account-key alphabet, so no real account can be called this.
pub const UNKNOWN_ACCOUNT: &str = "~unknown";

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The dead letter's own id.
    pub id: String,
    /// The account (from the event, or from the subject for poison).
    pub account_key: String,
    /// Why.
    pub reason: DeadReason,
    /// The error, in words.
    pub error: String,
    /// The subject the payload arrived on.
    pub subject: Option<String>,
    /// The event, when it could be decoded.
    pub event: Option<VumiApiEvent>,
    /// The raw payload, when it could not be (lossy UTF-8).
    pub payload: Option<String>,
    /// The chain that failed.
    pub chain: Option<String>,
    /// The step that failed.
    pub step: Option<String>,
    /// Attempts made at the failed step.
    pub attempts: u32,
    /// When it was filed.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `dead`, or `replaying` once a replay has put the event back on the bus.
    #[serde(default)]
    pub status: LetterStatus,
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LetterStatus {
    /// Waiting for an operator.
    #[default]
    Dead,
    /// Replayed: the event is back on the bus. A replay that fails again files
    /// the letter again (same id); one that succeeds removes it.
    Replaying,
}

impl DeadLetter {
    /// A new dead letter of `reason`, filed now.
    pub fn new(account_key: &str, reason: DeadReason, error: impl Into<String>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            account_key: account_key.to_string(),
            reason,
            error: error.into(),
            subject: None,
            event: None,
            payload: None,
            chain: None,
            step: None,
            attempts: 0,
            at: switchboard_sdk::now(),
            status: LetterStatus::Dead,
        }
    }

    /// A dead letter for `event`, failed at `(chain, step)`. Its id derives
    /// from those and sorts by the event's time, so filing the same failure
    /// again (after a crash, or a replay that fails again) replaces the letter
    /// instead of adding one.
    pub fn for_event(
        event: &VumiApiEvent,
        reason: DeadReason,
        chain: Option<&str>,
        step: Option<&str>,
        error: impl Into<String>,
    ) -> Self {
        let name = format!(
            "{}\0{}\0{}",
            event.id,
            chain.unwrap_or(""),
            step.unwrap_or("")
        );
        let millis = (event.occurred_at.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let id = derived_id(millis, &name);
        let mut letter = Self::new(event.account_key.as_str(), reason, error);
        letter.id = id.to_string();
        letter.event = Some(event.clone());
        letter.chain = chain.map(str::to_string);
        letter.step = step.map(str::to_string);
        letter
    }
}

/// A letter's id for what `name` says failed, at `millis` (since the
/// epoch): a UUIDv7 of that time, so that letters sort by it, whose other
/// bits derive from `name`, so that filing the same failure again gives the
/// same id.
pub(crate) fn derived_id(millis: u64, name: &str) -> uuid::Uuid {
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes());
    let mut random = [0u8; 10];
    random.copy_from_slice(&hash.as_bytes()[6..]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// Where dead letter `id` of `account` is kept in [`Collection::DeadLetters`].
pub(crate) fn letter_key(account: &str, id: &str) -> Vec<u8> {
    key(&[account.as_bytes(), id.as_bytes()])
}

/// A page of an account's dead letters ([`DeadLetters::page`]).
#[derive(Debug)]
pub struct LetterPage {
    /// The letters of the page that could be read, oldest first.
    pub letters: Vec<DeadLetter>,
    /// The id of the page's last letter, read or not: the next page
    /// begins after it. `None` once there are no more.
    pub last: Option<String>,
}

/// Dead letters by (account, id), in filing order.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    store: Store,
}

impl DeadLetters {
    /// Dead letters kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Files a dead letter.
    pub fn put(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.store.write_atomically(&[Self::write(letter)])
    }

    /// The write that files `letter`, for a batch.
    pub fn write(letter: &DeadLetter) -> Write {
        Write {
            collection: Collection::DeadLetters,
            key: letter_key(&letter.account_key, &letter.id),
            value: Some(serde_json::to_vec(letter).expect("a dead letter serialises")),
        }
    }

    /// The write that removes dead letter `id` of `account`, for a batch.
    pub fn removal(account: &str, id: &str) -> Write {
        Write {
            collection: Collection::DeadLetters,
            key: letter_key(account, id),
            value: None,
        }
    }

    /// Up to `limit` dead letters of `account` filed after the letter
    /// `after` (from the first, without it), oldest first: a page of them
    /// all, to walk them without holding them all. The page's `last` is
    /// where the next begins (`None`: there are no more), whether or not
    /// the page's last letter could be read.
    pub fn page(
        &self,
        account: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<LetterPage, StoreError> {
        let prefix = key(&[account.as_bytes(), b""]);
        let from = match after {
            Some(id) => {
                let mut k = letter_key(account, id);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let entries =
            self.store
                .scan_prefix_from(Collection::DeadLetters, &prefix, &from, limit)?;
        let last = entries
            .last()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        let letters = entries
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        Ok(LetterPage { letters, last })
    }

    /// The newest `limit` dead letters of `account`, newest first.
    pub fn list(&self, account: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self
            .store
            .scan_prefix_rev(
                Collection::DeadLetters,
                &key(&[account.as_bytes(), b""]),
                limit,
            )?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// One dead letter of `account`.
    pub fn get(&self, account: &str, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        Ok(self
            .store
            .get(Collection::DeadLetters, &letter_key(account, id))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_one_accounts_letters_oldest_first() {
        let letters = DeadLetters::new(Store::temporary().unwrap());
        let mut filed = Vec::new();
        for n in 0..600 {
            // Another account whose key starts with this one's, in between.
            let other = DeadLetter::new("acme2", DeadReason::Poison, "not acme's");
            letters.put(&other).unwrap();
            let letter = DeadLetter::new("acme", DeadReason::Poison, format!("letter {n}"));
            letters.put(&letter).unwrap();
            filed.push(letter.id);
        }
        let mut walked = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = letters.page("acme", after.as_deref(), 256).unwrap();
            let Some(last) = page.last else { break };
            after = Some(last);
            pages += 1;
            walked.extend(page.letters.into_iter().map(|l| l.id));
        }
        assert_eq!(pages, 3);
        // (Ids sort by their time; within a millisecond, as they sort.)
        filed.sort();
        assert_eq!(walked, filed);
        assert!(letters.page("nobody", None, 10).unwrap().last.is_none());
        // A page whose letters do not read still says where the next begins.
        let store = letters.store.clone();
        for id in &filed[..256] {
            store
                .put(
                    Collection::DeadLetters,
                    &letter_key("acme", id),
                    b"not a letter",
                )
                .unwrap();
        }
        let first = letters.page("acme", None, 256).unwrap();
        assert!(first.letters.is_empty());
        assert_eq!(first.last.as_deref(), Some(filed[255].as_str()));
        let next = letters.page("acme", first.last.as_deref(), 256).unwrap();
        assert_eq!(next.letters[0].id, filed[256]);
    }
}
