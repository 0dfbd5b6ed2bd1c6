//! The step journal: what each chain has done with an event, step by step.
//!
//! A step's completion (its output, the events it emitted, its idempotency
//! key) is recorded before the chain moves on, and made durable before the
//! next step with a side effect runs and before the event is acked. A
//! redelivered event — after a crash, a nak for a retry, or a replay from dead
//! letters — resumes after its last completed step: completed steps are never
//! run again.
//!
//! One record per event, under its id. Records expire after the configured
//! retention, except those of events with a chain in dead letters, which stay
//! until the dead letter is replayed or discarded.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_sdk::{EventId, VumiApiEvent};
use switchboard_store::{Collection, Store, StoreError, Write, key};

use crate::records::StepTrace;

/// What the chains have done with one event so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventJournal {
    /// When the event was first taken up, in ms since the epoch (for expiry).
    pub started_ms: u64,
    /// The chains that ran, in the order they first ran.
    pub chains: Vec<ChainJournal>,
}

/// What one chain has done with an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainJournal {
    /// The chain's name.
    pub name: String,
    /// The version of the account's chains it first ran under.
    pub version: u64,
    /// The steps that finished (succeeded, or failed under `on_error =
    /// "continue"`), in order. The chain resumes at the next one.
    pub steps: Vec<StepRecord>,
    /// The step waiting to be tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<PendingRetry>,
    /// How the chain ended; `None` while it has steps left to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<ChainEnd>,
    /// The dead letter being replayed: removed when the chain ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaying: Option<String>,
}

/// A finished step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// What the trace shows of it.
    pub trace: StepTrace,
    /// The events it emitted, with their derived ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<VumiApiEvent>,
    /// Whether `children` are on the bus.
    #[serde(default)]
    pub published: bool,
}

/// A step that failed in a way worth trying again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRetry {
    /// The step's name.
    pub step: String,
    /// Its trace so far: attempts, time spent, the last error.
    pub trace: StepTrace,
}

/// How a chain ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ChainEnd {
    /// It ran to its end (or a step stopped it).
    Done,
    /// A step failed for good: the event is in dead letters under `letter`.
    Dead {
        /// The dead letter's id.
        letter: String,
        /// The failed step.
        step: String,
        /// The failed step's trace.
        trace: StepTrace,
        /// Whether the dead letter is on the bus's dead-letter stream.
        #[serde(default)]
        announced: bool,
    },
    /// The dead letter was discarded: the chain stays ended.
    Discarded,
}

impl ChainJournal {
    /// Ends the chain: no retry is pending any more. Returns the dead letter
    /// it was replayed from, if it was, which the caller removes (or files
    /// again) in the same write.
    pub fn end_with(&mut self, end: ChainEnd) -> Option<String> {
        self.end = Some(end);
        self.retry = None;
        self.replaying.take()
    }

    /// Whether dead letter `letter` is this chain's: filed by it, or being
    /// replayed into it.
    pub fn refers_to(&self, letter: &str) -> bool {
        matches!(&self.end, Some(ChainEnd::Dead { letter: filed, .. }) if filed == letter)
            || self.replaying.as_deref() == Some(letter)
    }
}

impl EventJournal {
    /// A journal for an event taken up now.
    pub fn new() -> Self {
        Self {
            started_ms: now_ms(),
            chains: Vec::new(),
        }
    }

    /// The record of chain `name`, created (under `version`) if it has none.
    pub fn chain_mut(&mut self, name: &str, version: u64) -> &mut ChainJournal {
        match self.chains.iter().position(|c| c.name == name) {
            Some(i) => &mut self.chains[i],
            None => {
                self.chains.push(ChainJournal {
                    name: name.to_string(),
                    version,
                    steps: Vec::new(),
                    retry: None,
                    end: None,
                    replaying: None,
                });
                self.chains.last_mut().expect("just pushed")
            }
        }
    }

    /// The record of chain `name`.
    pub fn chain(&self, name: &str) -> Option<&ChainJournal> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Whether a chain is in dead letters (so the record must not expire).
    pub fn holds_dead_letter(&self) -> bool {
        self.chains
            .iter()
            .any(|c| matches!(c.end, Some(ChainEnd::Dead { .. })))
    }
}

/// Journal records in the store.
#[derive(Debug, Clone)]
pub struct Journal {
    store: Store,
}

impl Journal {
    /// The journal kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The record of event `id`.
    pub fn get(&self, id: &EventId) -> Result<Option<EventJournal>, StoreError> {
        Ok(self
            .store
            .get(Collection::Journal, id.to_string().as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The writes that record `journal` for event `id`: its entry in the
    /// expiry index, then the record.
    pub fn writes(&self, id: &EventId, journal: &EventJournal) -> [Write; 2] {
        let id = id.to_string();
        [
            Write {
                collection: Collection::JournalTimes,
                key: key(&[&journal.started_ms.to_be_bytes(), id.as_bytes()]),
                value: Some(Vec::new()),
            },
            Write {
                collection: Collection::Journal,
                key: id.as_bytes().to_vec(),
                value: Some(serde_json::to_vec(journal).expect("a journal serialises")),
            },
        ]
    }

    /// Records `journal` for event `id` (not yet durable: see [`Store::flush`]).
    /// Not a transaction (those write to disk at once): the index entry
    /// goes first, so a crash in between leaves an entry that expiry
    /// removes, never a record that would not expire.
    pub fn put(&self, id: &EventId, journal: &EventJournal) -> Result<(), StoreError> {
        self.store.write_in_order(&self.writes(id, journal))
    }

    /// Removes the records of events taken up more than `retention` ago,
    /// except those holding a dead letter. Returns how many were removed.
    pub fn expire(&self, retention: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut from = Vec::new();
        let mut removed = 0;
        loop {
            let batch = self.store.scan_from(Collection::JournalTimes, &from, 512)?;
            let Some((last, _)) = batch.last() else {
                return Ok(removed);
            };
            from = last.clone();
            from.push(0);
            for (k, _) in &batch {
                let Some((millis, id)) = split_time_key(k) else {
                    continue;
                };
                if millis >= cutoff {
                    return Ok(removed);
                }
                let held = self
                    .store
                    .get(Collection::Journal, id)?
                    .and_then(|v| serde_json::from_slice::<EventJournal>(&v).ok())
                    .is_some_and(|j| j.holds_dead_letter());
                if held {
                    continue;
                }
                // A record re-written later has a newer index entry of its
                // own only if its start time changed, which it never does;
                // so the record goes with its one entry, the record first.
                self.store.write_in_order(&[
                    Write {
                        collection: Collection::Journal,
                        key: id.to_vec(),
                        value: None,
                    },
                    Write {
                        collection: Collection::JournalTimes,
                        key: k.clone(),
                        value: None,
                    },
                ])?;
                removed += 1;
            }
        }
    }
}

fn split_time_key(k: &[u8]) -> Option<(u64, &[u8])> {
    let millis = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let id = k.get(9..)?;
    Some((millis, id))
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{StepOutcome, StepTrace};

    fn id(n: u8) -> EventId {
        EventId::derived(
            EventId::parse("0190b6a8-3b9a-7cc1-8d2e-1f2a3b4c5d6e").expect("an id"),
            "c",
            "s",
            n as usize,
        )
    }

    fn dead() -> ChainEnd {
        ChainEnd::Dead {
            letter: "l".into(),
            step: "s".into(),
            trace: StepTrace {
                name: "s".into(),
                handler: "log".into(),
                outcome: StepOutcome::Failed,
                attempts: 1,
                duration_ms: 0.0,
                output: None,
                error: Some("e".into()),
                logs: Vec::new(),
            },
            announced: true,
        }
    }

    #[test]
    fn records_expire_after_the_retention_unless_they_hold_a_dead_letter() {
        let journal = Journal::new(Store::temporary().expect("a store"));
        let hour_ago = now_ms() - 3_600_000;
        let mut old = EventJournal {
            started_ms: hour_ago,
            chains: Vec::new(),
        };
        old.chain_mut("c", 1).end = Some(ChainEnd::Done);
        let mut held = old.clone();
        held.chains[0].end = Some(dead());
        let fresh = EventJournal::new();
        journal.put(&id(1), &old).expect("put");
        journal.put(&id(2), &held).expect("put");
        journal.put(&id(3), &fresh).expect("put");

        assert_eq!(
            journal.expire(Duration::from_secs(7200)).expect("expire"),
            0
        );
        assert_eq!(journal.expire(Duration::from_secs(60)).expect("expire"), 1);
        assert_eq!(journal.get(&id(1)).expect("get"), None);
        assert_eq!(journal.get(&id(2)).expect("get"), Some(held.clone()));
        assert_eq!(journal.get(&id(3)).expect("get"), Some(fresh));

        // Discarded: the record may go now.
        held.chains[0].end = Some(ChainEnd::Discarded);
        journal.put(&id(2), &held).expect("put");
        assert_eq!(journal.expire(Duration::from_secs(60)).expect("expire"), 1);
        assert_eq!(journal.get(&id(2)).expect("get"), None);
    }
}
