//! Records kept before the journal was appended to — the journal record
//! rewritten whole under the event's id, and the trace written beside it —
//! converted once, at start, into appended records, then removed. An event
//! being retried or in dead letters across the upgrade resumes where it
//! stopped, and every trace stays readable.

use serde::Deserialize;
use switchboard_store::{Collection, Store, StoreError, Write};

use super::{
    ChainEnd, Entry, EventJournal, Journal, Pending, PendingRetry, RecordKey, StepName, StepRecord,
};
use crate::trace::{ChainTrace, StepOutcome, StepTrace, Trace};

#[derive(Debug, Deserialize)]
struct LegacyJournal {
    started_ms: u64,
    #[serde(default)]
    chains: Vec<LegacyChain>,
}

#[derive(Debug, Deserialize)]
struct LegacyChain {
    name: String,
    version: u64,
    #[serde(default)]
    steps: Vec<StepRecord>,
    #[serde(default)]
    retry: Option<PendingRetry>,
    #[serde(default)]
    end: Option<LegacyEnd>,
    #[serde(default)]
    replaying: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum LegacyEnd {
    Done,
    Dead {
        letter: String,
        step: String,
        trace: StepTrace,
        #[serde(default)]
        announced: bool,
    },
    Discarded,
}

/// What the migration did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Events whose trace (and journal record, if any) became a record.
    pub records: usize,
    /// Journal records without a trace (an event cut short by a crash
    /// before its first pass ended): their event is unknown, so they are
    /// dropped, and the event runs from its first step if it comes again.
    pub orphans: usize,
}

/// Converts every legacy trace and journal record in `store`, then empties
/// the legacy collections. Safe to run again: a converted record's entries
/// are written under fixed sequence numbers, and what is converted is
/// removed.
pub fn migrate(store: &Store) -> Result<Migrated, StoreError> {
    let journal = Journal::new(store.clone());
    let mut migrated = Migrated::default();
    loop {
        let batch = store.scan_from(Collection::LegacyTraces, &[], 256)?;
        if batch.is_empty() {
            break;
        }
        for (k, v) in batch {
            let mut removals = vec![removal(Collection::LegacyTraces, k)];
            if let Ok(trace) = serde_json::from_slice::<Trace>(&v) {
                let id = trace.event.id.to_string();
                let legacy = store
                    .get(Collection::LegacyJournal, id.as_bytes())?
                    .and_then(|v| serde_json::from_slice::<LegacyJournal>(&v).ok());
                let at = RecordKey::new(&trace.event.account_key, &trace.event.id);
                let mut folded = EventJournal {
                    started_ms: legacy.as_ref().map_or_else(
                        || (trace.started_at.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
                        |j| j.started_ms,
                    ),
                    ..EventJournal::default()
                };
                let mut pending = Pending::default();
                for entry in entries(&trace, legacy) {
                    pending.push(&entry);
                    folded.apply(entry);
                }
                // The first sequence number: every later append comes after it.
                let mut writes: Vec<Write> = journal
                    .append_at(&at, &mut folded, &mut pending, 0)
                    .into_iter()
                    .collect();
                removals.push(removal(Collection::LegacyJournal, id.into_bytes()));
                writes.append(&mut removals);
                store.write_in_order(&writes)?;
                migrated.records += 1;
            } else {
                store.write_in_order(&removals)?;
            }
        }
    }
    // What is left: journal records without a trace, and the indexes.
    for c in [
        Collection::LegacyJournal,
        Collection::LegacyJournalTimes,
        Collection::LegacyTraceTimes,
    ] {
        loop {
            let batch = store.scan_from(c, &[], 1024)?;
            if batch.is_empty() {
                break;
            }
            if c == Collection::LegacyJournal {
                migrated.orphans += batch.len();
            }
            let removals: Vec<Write> = batch.into_iter().map(|(k, _)| removal(c, k)).collect();
            store.write_in_order(&removals)?;
        }
    }
    Ok(migrated)
}

fn removal(collection: Collection, key: Vec<u8>) -> Write {
    Write {
        collection,
        key,
        value: None,
    }
}

/// The entries of an event that has `trace` and, if any, the legacy
/// journal record `legacy`.
fn entries(trace: &Trace, legacy: Option<LegacyJournal>) -> Vec<Entry> {
    let mut out = vec![Entry::Begin {
        event: Box::new(trace.event.clone()),
        traceparent: None,
    }];
    let journaled: Vec<LegacyChain> = legacy.map(|j| j.chains).unwrap_or_default();
    for chain in &journaled {
        let traced = trace.chains.iter().find(|c| c.name == chain.name);
        for record in &chain.steps {
            out.push(Entry::Step {
                chain: chain.name.clone(),
                version: chain.version,
                record: Box::new(record.clone()),
            });
        }
        if let Some(letter) = &chain.replaying {
            out.push(Entry::Replaying {
                chain: chain.name.clone(),
                letter: letter.clone(),
            });
        }
        if let Some(retry) = &chain.retry {
            out.push(Entry::Retry {
                chain: chain.name.clone(),
                version: chain.version,
                pending: Box::new(retry.clone()),
            });
        }
        if let Some(end) = &chain.end {
            let (end, announced) = match end {
                LegacyEnd::Done => (ChainEnd::Done, false),
                LegacyEnd::Discarded => (ChainEnd::Discarded, false),
                LegacyEnd::Dead {
                    letter,
                    step,
                    trace,
                    announced,
                } => (
                    ChainEnd::Dead {
                        letter: letter.clone(),
                        step: step.clone(),
                        trace: trace.clone(),
                    },
                    *announced,
                ),
            };
            out.push(Entry::End {
                chain: chain.name.clone(),
                version: chain.version,
                end: Box::new(end),
                unrun: traced.map(skipped).unwrap_or_default(),
            });
            if announced {
                out.push(Entry::Announced {
                    chain: chain.name.clone(),
                });
            }
        }
    }
    // Chains the trace shows and the journal did not keep: their steps had
    // no effects (or their `when` failed).
    for chain in trace
        .chains
        .iter()
        .filter(|c| !journaled.iter().any(|j| j.name == c.name))
    {
        if let [only] = chain.steps.as_slice()
            && only.name == "when"
            && only.handler == "when"
        {
            let error = only.error.clone().unwrap_or_default();
            let prefix = "the chain's `when` condition failed to evaluate: ";
            out.push(Entry::Condition {
                chain: chain.name.clone(),
                version: chain.version,
                error: error.strip_prefix(prefix).unwrap_or(&error).to_string(),
            });
            continue;
        }
        for step in chain
            .steps
            .iter()
            .filter(|s| s.outcome != StepOutcome::Skipped)
        {
            out.push(Entry::Step {
                chain: chain.name.clone(),
                version: chain.version,
                record: Box::new(StepRecord {
                    trace: step.clone(),
                    children: Vec::new(),
                    published: true,
                }),
            });
        }
        out.push(Entry::End {
            chain: chain.name.clone(),
            version: chain.version,
            end: Box::new(ChainEnd::Done),
            unrun: skipped(chain),
        });
    }
    out.push(Entry::Finish {
        status: trace.status,
        finished_ms: trace
            .finished_at
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64),
    });
    out
}

/// The steps a traced chain skipped.
fn skipped(chain: &ChainTrace) -> Vec<StepName> {
    chain
        .steps
        .iter()
        .filter(|s| s.outcome == StepOutcome::Skipped)
        .map(|s| StepName {
            name: s.name.clone(),
            handler: s.handler.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceStatus;

    /// A trace and a journal record as the previous release wrote them.
    const TRACE: &str = r#"{"event":{"v":1,"id":"0190b6a8-3b9a-7cc1-8d2e-1f2a3b4c5d6e","account_key":"acme","conversation_key":"c1","conversation_type":"survey","event_type":"poll_complete","event_data":{"msisdn":"+27831234567"},"occurred_at":"2026-11-30T10:00:00Z","expires_at":null,"parent_id":null,"root_id":"0190b6a8-3b9a-7cc1-8d2e-1f2a3b4c5d6e","depth":0},"status":"dead","parent_id":null,"children":[],"chains":[{"name":"pay","version":2,"steps":[{"name":"create_contact","handler":"create_contact","outcome":"ok","attempts":1,"duration_ms":0.3,"output":{"msisdn":"+27831234567"},"error":null},{"name":"payment_webhook","handler":"payment_webhook","outcome":"failed","attempts":3,"duration_ms":12.0,"output":null,"error":"HTTP 503 (gave up after 3 attempts)"},{"name":"log","handler":"log","outcome":"skipped","attempts":0,"duration_ms":0.0,"output":null,"error":null}]},{"name":"note","version":2,"steps":[{"name":"log","handler":"log","outcome":"ok","attempts":1,"duration_ms":0.1,"output":{},"error":null}]},{"name":"guarded","version":2,"steps":[{"name":"when","handler":"when","outcome":"failed","attempts":1,"duration_ms":0.0,"output":null,"error":"the chain's `when` condition failed to evaluate: boom"}]}],"started_at":"2026-11-30T10:00:01Z","finished_at":"2026-11-30T10:00:02Z"}"#;
    const JOURNAL: &str = r#"{"started_ms":1796032801000,"chains":[{"name":"pay","version":2,"steps":[{"trace":{"name":"create_contact","handler":"create_contact","outcome":"ok","attempts":1,"duration_ms":0.3,"output":{"msisdn":"+27831234567"},"error":null},"published":true}],"end":{"status":"dead","letter":"L1","step":"payment_webhook","trace":{"name":"payment_webhook","handler":"payment_webhook","outcome":"failed","attempts":3,"duration_ms":12.0,"output":null,"error":"HTTP 503 (gave up after 3 attempts)"},"announced":true}}]}"#;

    #[test]
    fn legacy_records_become_appended_records_with_the_same_trace() {
        let store = Store::temporary().expect("a store");
        let trace: Trace = serde_json::from_str(TRACE).expect("a legacy trace");
        let id = trace.event.id.to_string();
        let trace_key = switchboard_store::key(&[b"acme", id.as_bytes()]);
        store
            .put(Collection::LegacyTraces, &trace_key, TRACE.as_bytes())
            .expect("put");
        store
            .put(Collection::LegacyJournal, id.as_bytes(), JOURNAL.as_bytes())
            .expect("put");
        store
            .put(Collection::LegacyJournalTimes, b"index", b"")
            .expect("put");
        store
            .put(Collection::LegacyJournal, b"orphan", JOURNAL.as_bytes())
            .expect("put");

        assert_eq!(
            migrate(&store).expect("migrate"),
            Migrated {
                records: 1,
                orphans: 1
            }
        );
        for c in [
            Collection::LegacyTraces,
            Collection::LegacyJournal,
            Collection::LegacyJournalTimes,
        ] {
            assert_eq!(store.len(c), 0, "{c:?} emptied");
        }
        let journal = Journal::new(store.clone());
        let record = journal
            .load(&RecordKey::new(&trace.event.account_key, &trace.event.id))
            .expect("load")
            .expect("a record");
        // Resumable as before: the dead chain holds its letter, announced.
        assert!(record.holds_dead_letter());
        let pay = record.chain("pay").expect("the chain");
        assert!(pay.announced && pay.refers_to("L1"));
        assert_eq!(pay.steps.len(), 1);
        assert_eq!(record.started_ms, 1796032801000);
        // And the trace reads the same.
        let again = Trace::of(&record).expect("a trace");
        assert_eq!(
            serde_json::to_value(&again).expect("json"),
            serde_json::to_value(&trace).expect("json")
        );
        assert_eq!(again.status, TraceStatus::Dead);
        // Running it again finds nothing to do.
        assert_eq!(migrate(&store).expect("migrate"), Migrated::default());
    }
}
