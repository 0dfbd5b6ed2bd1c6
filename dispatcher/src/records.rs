//! What the dispatcher records about events: traces (what each chain did) and
//! dead letters (what could not be handled, and why).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_handlers::LogLine;
use switchboard_sdk::{EventId, VumiApiEvent};
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

/// Where an event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceStatus {
    /// Every matching chain ran to its end.
    Done,
    /// Being handled (a step is waiting to be retried).
    Running,
    /// A chain failed and the event went to dead letters.
    Dead,
    /// Dropped because it had expired.
    Expired,
    /// No chain matched.
    Unrouted,
}

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepOutcome {
    /// The step succeeded and the chain went on.
    Ok,
    /// The step succeeded and ended the chain.
    Stopped,
    /// The step did not run (an earlier step stopped or failed the chain).
    Skipped,
    /// The step failed.
    Failed,
    /// The step failed and will be tried again.
    Retrying,
}

/// One step in a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTrace {
    /// The step's name.
    pub name: String,
    /// Its handler.
    pub handler: String,
    /// What happened.
    pub outcome: StepOutcome,
    /// Attempts made.
    pub attempts: u32,
    /// Time spent in the handler over all attempts, in milliseconds.
    pub duration_ms: f64,
    /// The step's output.
    pub output: Option<Map<String, Value>>,
    /// The last error.
    pub error: Option<String>,
    /// Lines a script step logged (`log(level, message)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
}

/// One chain in a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainTrace {
    /// The chain's name.
    pub name: String,
    /// The version of the account's chains that ran.
    pub version: u64,
    /// Its steps, in order.
    pub steps: Vec<StepTrace>,
}

/// What the dispatcher did with one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The event.
    pub event: VumiApiEvent,
    /// Where it stands.
    pub status: TraceStatus,
    /// The event whose handler emitted it.
    pub parent_id: Option<EventId>,
    /// The events its handlers emitted.
    pub children: Vec<EventId>,
    /// The chains that ran.
    pub chains: Vec<ChainTrace>,
    /// When handling started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// When handling ended.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// Traces by (account, event id).
#[derive(Debug, Clone)]
pub struct Traces {
    store: Store,
}

impl Traces {
    /// Traces kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Records (or replaces) the trace of an event, with its entry in the
    /// expiry index (keyed by when handling started, which later passes keep).
    pub fn put(&self, trace: &Trace) -> Result<(), StoreError> {
        let account = trace.event.account_key.as_str();
        let id = trace.event.id.to_string();
        let started = (trace.started_at.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        // Index first: a crash in between leaves an entry that expiry
        // removes, never a trace that would not expire.
        self.store.write_in_order(&[
            Write {
                collection: Collection::TraceTimes,
                key: key(&[&started.to_be_bytes(), account.as_bytes(), id.as_bytes()]),
                value: Some(Vec::new()),
            },
            Write {
                collection: Collection::Traces,
                key: key(&[account.as_bytes(), id.as_bytes()]),
                value: Some(serde_json::to_vec(trace).expect("a trace serialises")),
            },
        ])
    }

    /// Removes the traces of events whose handling started more than
    /// `retention` ago (for an event handled again after its record was
    /// gone, counted from the first time). Returns how many were removed.
    pub fn expire(&self, retention: std::time::Duration) -> Result<usize, StoreError> {
        let now = (switchboard_sdk::now().unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let cutoff = now.saturating_sub(retention.as_millis() as u64);
        let mut removed = 0;
        loop {
            // Removed entries are gone, so each batch starts at the front.
            let batch = self.store.scan_from(Collection::TraceTimes, &[], 512)?;
            if batch.is_empty() {
                return Ok(removed);
            }
            for (k, _) in batch {
                let millis = k.get(..8).and_then(|b| b.try_into().ok());
                if millis.is_some_and(|m| u64::from_be_bytes(m) >= cutoff) {
                    return Ok(removed);
                }
                // `{started}\0{account}\0{id}`: the trace's key is the rest.
                let trace = k.get(9..).unwrap_or_default().to_vec();
                self.store.write_in_order(&[
                    Write {
                        collection: Collection::Traces,
                        key: trace,
                        value: None,
                    },
                    Write {
                        collection: Collection::TraceTimes,
                        key: k,
                        value: None,
                    },
                ])?;
                removed += 1;
            }
        }
    }

    /// The trace of an event of `account`.
    pub fn get(&self, account: &str, id: &EventId) -> Result<Option<Trace>, StoreError> {
        Ok(self
            .store
            .get(Collection::Traces, &trace_key(account, id))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

fn trace_key(account: &str, id: &EventId) -> Vec<u8> {
    key(&[account.as_bytes(), id.to_string().as_bytes()])
}

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
        let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes());
        let mut random = [0u8; 10];
        random.copy_from_slice(&hash.as_bytes()[6..]);
        let millis = (event.occurred_at.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
        let mut letter = Self::new(event.account_key.as_str(), reason, error);
        letter.id = id.to_string();
        letter.event = Some(event.clone());
        letter.chain = chain.map(str::to_string);
        letter.step = step.map(str::to_string);
        letter
    }
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
            key: key(&[letter.account_key.as_bytes(), letter.id.as_bytes()]),
            value: Some(serde_json::to_vec(letter).expect("a dead letter serialises")),
        }
    }

    /// The write that removes dead letter `id` of `account`, for a batch.
    pub fn removal(account: &str, id: &str) -> Write {
        Write {
            collection: Collection::DeadLetters,
            key: key(&[account.as_bytes(), id.as_bytes()]),
            value: None,
        }
    }

    /// Every dead letter of `account`, oldest first.
    pub fn all(&self, account: &str) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self
            .store
            .scan_prefix(Collection::DeadLetters, &key(&[account.as_bytes(), b""]))?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
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
            .get(
                Collection::DeadLetters,
                &key(&[account.as_bytes(), id.as_bytes()]),
            )?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};

    fn trace(started_at: OffsetDateTime) -> Trace {
        let event = VumiApiEvent::new(
            AccountKey::new("acme").expect("a key"),
            ConversationKey::new("c").expect("a key"),
            ConversationType::new("t").expect("a type"),
            EventType::new("e").expect("a type"),
            json!({}).as_object().expect("an object").clone(),
        );
        Trace {
            parent_id: None,
            status: TraceStatus::Done,
            children: Vec::new(),
            chains: Vec::new(),
            started_at,
            finished_at: None,
            event,
        }
    }

    #[test]
    fn traces_expire_after_the_retention_counted_from_their_start() {
        let traces = Traces::new(Store::temporary().expect("a store"));
        let now = switchboard_sdk::now();
        let old = trace(now - time::Duration::hours(2));
        let fresh = trace(now);
        traces.put(&old).expect("put");
        // A later pass over the same event keeps its start, and its one entry.
        let mut again = old.clone();
        again.status = TraceStatus::Dead;
        traces.put(&again).expect("put");
        traces.put(&fresh).expect("put");

        assert_eq!(
            traces
                .expire(std::time::Duration::from_secs(3 * 3600))
                .expect("expire"),
            0
        );
        assert_eq!(
            traces
                .expire(std::time::Duration::from_secs(3600))
                .expect("expire"),
            1
        );
        assert_eq!(traces.get("acme", &old.event.id).expect("get"), None);
        assert_eq!(
            traces.get("acme", &fresh.event.id).expect("get"),
            Some(fresh)
        );
        assert_eq!(
            traces
                .expire(std::time::Duration::from_secs(3600))
                .expect("expire"),
            0
        );
    }
}
