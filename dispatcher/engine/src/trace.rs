//! Traces: what the dispatcher did with an event, as the `trace` command
//! and API show it.
//!
//! A trace is derived from the event's journal record when it is read;
//! nothing is written for it beside the journal. It shows every chain that
//! ran (or whose `when` failed), each step's outcome, attempts, time, output
//! and logs, and the steps a chain did not run once it ended.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_handlers::LogLine;
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::StoreError;
use time::OffsetDateTime;

use crate::journal::{ChainEnd, ChainJournal, EventJournal, Journal, RecordKey};

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

/// Traces, read from the journal.
#[derive(Debug, Clone)]
pub struct Traces {
    journal: Journal,
    retention: Duration,
}

impl Traces {
    /// The traces of the records in `journal`, shown for `retention` after
    /// their event's handling started (records may be kept longer, for the
    /// journal's own retention or a dead letter).
    pub fn new(journal: Journal, retention: Duration) -> Self {
        Self { journal, retention }
    }

    /// The trace of event `id` of `account`.
    pub fn get(&self, account: &AccountKey, id: &EventId) -> Result<Option<Trace>, StoreError> {
        let Some(journal) = self.journal.load(&RecordKey::new(account, id))? else {
            return Ok(None);
        };
        let cutoff = crate::journal::now_ms().saturating_sub(self.retention.as_millis() as u64);
        if journal.started_ms < cutoff {
            return Ok(None);
        }
        Ok(Trace::of(&journal))
    }
}

impl Trace {
    /// The trace of a journal record; `None` if the record lacks its event
    /// (a record cut short before its first entry).
    pub fn of(journal: &EventJournal) -> Option<Trace> {
        let event = journal.event.clone()?;
        let (status, finished_ms) = match journal.finish {
            Some(f) => (f.status, f.finished_ms),
            None => (TraceStatus::Running, None),
        };
        let children = journal
            .chains
            .iter()
            .flat_map(|c| c.steps.iter().flat_map(|s| s.children.iter().map(|e| e.id)))
            .collect();
        Some(Trace {
            parent_id: event.parent_id,
            event,
            status,
            children,
            chains: journal.chains.iter().map(chain_trace).collect(),
            started_at: at(journal.started_ms),
            finished_at: finished_ms.map(at),
        })
    }
}

fn at(ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// What the trace shows of a chain: the finished steps, then the one
/// waiting for a retry or the one that failed, then (once the chain has
/// ended) the steps it did not run, as skipped. A chain whose `when` failed
/// to evaluate shows that as its one step.
fn chain_trace(record: &ChainJournal) -> ChainTrace {
    let mut steps: Vec<StepTrace> = Vec::new();
    if let Some(error) = record.condition_failed.as_ref().filter(|_| !record.ran()) {
        steps.push(StepTrace {
            name: "when".into(),
            handler: "when".into(),
            outcome: StepOutcome::Failed,
            attempts: 1,
            duration_ms: 0.0,
            output: None,
            error: Some(format!(
                "the chain's `when` condition failed to evaluate: {error}"
            )),
            logs: Vec::new(),
        });
    }
    steps.extend(record.steps.iter().map(|s| s.trace.clone()));
    if let Some(retry) = &record.retry {
        steps.push(retry.trace.clone());
    }
    if let Some(ChainEnd::Dead { trace, .. }) = &record.end {
        steps.push(trace.clone());
    }
    if record.end.is_some() {
        steps.extend(record.unrun.iter().map(|step| StepTrace {
            name: step.name.clone(),
            handler: step.handler.clone(),
            outcome: StepOutcome::Skipped,
            attempts: 0,
            duration_ms: 0.0,
            output: None,
            error: None,
            logs: Vec::new(),
        }));
    }
    ChainTrace {
        name: record.name.clone(),
        version: record.version,
        steps,
    }
}
