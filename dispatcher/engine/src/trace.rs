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
use switchboard_api::events::{EventList, EventListQuery};
use switchboard_handlers::LogLine;
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::{Collection, StoreError, key};
use time::OffsetDateTime;

use crate::journal::{
    ChainEnd, ChainJournal, EVENT_ID_LEN, EventJournal, Journal, LISTED_BY_ID_WITHIN, RecordKey,
    id_time_ms, leading_ms, listed_by_id, started_ms,
};

/// Where an event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceStatus {
    /// Every matching chain ran to its end.
    Done,
    /// Being handled (a step is waiting to be retried).
    Running,
    /// A chain is paused (a `delay` step) until a durable timer resumes it.
    Waiting,
    /// A later event cancelled a paused chain (its `cancel_on`).
    Cancelled,
    /// A chain failed and the event went to dead letters.
    Dead,
    /// Dropped because it had expired.
    Expired,
    /// No chain matched.
    Unrouted,
}

impl TraceStatus {
    /// The status as the API spells it (`done`, `running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TraceStatus::Done => "done",
            TraceStatus::Running => "running",
            TraceStatus::Waiting => "waiting",
            TraceStatus::Cancelled => "cancelled",
            TraceStatus::Dead => "dead",
            TraceStatus::Expired => "expired",
            TraceStatus::Unrouted => "unrouted",
        }
    }
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
    /// The step paused the chain (a `delay`), which goes on at the next
    /// step when the chain's `waiting_until` comes.
    Waiting,
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
    /// While the chain is paused: when it goes on.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub waiting_until: Option<OffsetDateTime>,
    /// While the chain is paused in a `wait_for_event`: the type of the
    /// event it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// While the chain waits in a `digest` step for its window to close:
    /// the window's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_digest: Option<String>,
    /// The event that cancelled the chain while it was paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<EventId>,
    /// What the chain's flow controls decided about the run, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flow: Vec<FlowTrace>,
}

/// What one flow control decided about a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowTrace {
    /// `rate_limit`, `debounce`, `throttle` or `concurrency`.
    pub control: switchboard_rules::Control,
    /// `passed`, `held`, `skipped` or `superseded`.
    pub result: crate::journal::FlowResult,
    /// The run's key.
    pub key: String,
    /// When it decided; for a run held back, when its turn comes (none
    /// while it waits for a `concurrency` slot).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub at: Option<OffsetDateTime>,
    /// The later event that superseded it (`debounce`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<EventId>,
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

/// How many keys one page reads from each of the listing's two sources, at
/// most, whatever its filters pass: a page of a rare kind of event ends
/// early, with a `next`.
const LISTING_LOOKS_AT: usize = 2_000;

/// A place in an account's listing, which runs newest first: an event's
/// time in ms (its id's for a UUIDv7 id, else when it was taken up), then
/// its id's text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    ms: u64,
    id: String,
}

impl Place {
    /// The cursor a page ends with.
    fn cursor(&self) -> String {
        format!("{}-{}", self.ms, self.id)
    }
}

/// What one page read from one of the listing's sources: its events
/// (newest first, each with the start time its record must hold, if any),
/// and, unless the source is exhausted, the place everything it did not
/// read sorts below.
struct Read {
    events: Vec<(Place, Option<u64>)>,
    frontier: Option<Place>,
}

impl Traces {
    /// A page of `account`'s events, newest first: those `query`'s filters
    /// pass, below its `before` cursor. Errors: a cursor that is not one.
    ///
    /// Two sources make the listing: the heads of records whose event ids
    /// are UUIDv7 (what the SDK gives every new event), read from the
    /// journal's keys, which sort by the time in the id; and the listing
    /// entries of the other records (emitted events' derived ids, ids a
    /// worker chose), by the time each was taken up. A page merges them.
    pub fn list(
        &self,
        account: &AccountKey,
        query: &EventListQuery,
    ) -> Result<Result<EventList, String>, StoreError> {
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        let before = match query.before.as_deref().filter(|b| !b.is_empty()) {
            None => None,
            Some(cursor) => match parse_cursor(cursor) {
                Some((ms, id)) => Some(Place { ms, id }),
                None => {
                    return Ok(Err(format!(
                        "before: {cursor:?} is not a cursor; pass the `next` of a page"
                    )));
                }
            },
        };
        let filters = &query.filters;
        let limit = query.effective_limit();
        let cutoff = crate::journal::now_ms().saturating_sub(self.retention.as_millis() as u64);
        let (by_id, by_time) = (
            self.read_by_id(&prefix, before.as_ref(), (cutoff, crate::journal::now_ms()))?,
            self.read_by_time(&prefix, before.as_ref(), cutoff)?,
        );
        // What a source did not read sorts below its frontier: the page
        // lists nothing below the higher one, and the next page starts there.
        let frontier = by_id.frontier.max(by_time.frontier);
        let mut candidates: Vec<(Place, Option<u64>)> =
            by_id.events.into_iter().chain(by_time.events).collect();
        candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        let mut events = Vec::new();
        // Where the next page starts: the frontier, unless this one ends
        // first.
        let mut next = frontier.clone();
        let mut last = None;
        for (place, started) in candidates {
            if frontier.as_ref().is_some_and(|f| place < *f) {
                break;
            }
            if place.ms < cutoff {
                // Older than the traces shown: so is everything after it.
                next = None;
                break;
            }
            if events.len() == limit {
                next = last;
                break;
            }
            last = Some(place.clone());
            let Ok(id) = EventId::parse(&place.id) else {
                continue;
            };
            // A listing entry whose record is missing, or started at
            // another time, was left by a crash before the record's head
            // was written: the event is listed at its record's own entry.
            let Some(journal) = self
                .journal
                .load(&RecordKey::new(account, &id))?
                .filter(|j| started.is_none_or(|ms| j.started_ms == ms))
            else {
                continue;
            };
            let Some(event) = &journal.event else {
                continue;
            };
            let status = journal.finish.map_or(TraceStatus::Running, |f| f.status);
            let row = crate::tail::row(event, &journal, status, at(journal.started_ms));
            if filters.admits(&row) {
                events.push(row);
            }
        }
        Ok(Ok(EventList {
            account_key: account.clone(),
            events,
            // (Nothing older than the cutoff is listed.)
            next: next.filter(|p| p.ms >= cutoff).map(|p| p.cursor()),
        }))
    }

    /// The listing's events whose ids tell their time, below `before` and
    /// not older than `cutoff`: the heads of their records, read newest
    /// first from the journal's keys (`{account}\0{event id}`, and
    /// `{account}\0{event id}\0{seq}` for a record's later writes), whose
    /// order is that of the ids' text (lower-case hex: (ms, text) order).
    /// Ids of other versions sort anywhere; only the range UUIDv7 ids of
    /// listed events can take is read.
    fn read_by_id(
        &self,
        prefix: &[u8],
        before: Option<&Place>,
        (cutoff, now): (u64, u64),
    ) -> Result<Read, StoreError> {
        let newest = now + LISTED_BY_ID_WITHIN;
        let mut start = prefix.to_vec();
        start.extend_from_slice(ms_text(cutoff).as_bytes());
        let mut end = prefix.to_vec();
        match before.filter(|b| b.ms <= newest) {
            // Ids below (b.ms, b.id): below the smallest text of that ms if
            // b.id sorts before it, below the next ms's if after.
            Some(b) => {
                let (low, high) = (ms_text(b.ms), ms_text(b.ms + 1));
                end.extend_from_slice(b.id.as_str().clamp(low.as_str(), high.as_str()).as_bytes());
            }
            None => end.extend_from_slice(ms_text(newest + 1).as_bytes()),
        }
        let store = self.journal.store();
        let keys =
            store.scan_prefix_before(Collection::Journal, &start, Some(&end), LISTING_LOOKS_AT)?;
        let exhausted = keys.len() < LISTING_LOOKS_AT;
        let mut events = Vec::new();
        let mut admit = |place: Place, id: &EventId, value: &[u8]| {
            let by_id = id_time_ms(id)
                .zip(started_ms(value))
                .is_some_and(|(id_ms, started)| listed_by_id(id_ms, started));
            if by_id && before.is_none_or(|b| place < *b) {
                events.push((place, None));
            }
        };
        let mut last_head = None;
        for (k, v) in &keys {
            let Some((place, id)) = k.get(prefix.len()..).and_then(head_place) else {
                continue;
            };
            last_head = Some(place.clone());
            admit(place, &id, v);
        }
        let frontier = match keys.last() {
            _ if exhausted => None,
            None => None,
            Some((k, _)) => {
                // The last key read belongs to a record whose head sorts
                // at or below it: read that head too, so that everything
                // not read sorts below it.
                let head = &k[..(prefix.len() + EVENT_ID_LEN).min(k.len())];
                let Some((place, id)) = head.get(prefix.len()..).and_then(head_place) else {
                    return Ok(Read {
                        events,
                        frontier: last_head,
                    });
                };
                if last_head.as_ref() != Some(&place)
                    && let Some(value) = store.get(Collection::Journal, head)?
                {
                    admit(place.clone(), &id, &value);
                }
                Some(place)
            }
        };
        Ok(Read { events, frontier })
    }

    /// The listing's other events, below `before` and not older than
    /// `cutoff`: their listing entries, `{account}\0{started:BE
    /// u64}\0{event id}`, newest first.
    fn read_by_time(
        &self,
        prefix: &[u8],
        before: Option<&Place>,
        cutoff: u64,
    ) -> Result<Read, StoreError> {
        let mut start = prefix.to_vec();
        start.extend_from_slice(&cutoff.to_be_bytes());
        let mut end = prefix.to_vec();
        match before {
            Some(b) => {
                end.extend_from_slice(&b.ms.to_be_bytes());
                end.push(0);
                end.extend_from_slice(b.id.as_bytes());
            }
            None => end.extend_from_slice(&u64::MAX.to_be_bytes()),
        }
        let entries = self.journal.store().scan_prefix_before(
            Collection::EventTimes,
            &start,
            Some(&end),
            LISTING_LOOKS_AT,
        )?;
        let exhausted = entries.len() < LISTING_LOOKS_AT;
        let mut events = Vec::new();
        let mut last = None;
        for (k, _) in &entries {
            let Some((ms, id)) = k.get(prefix.len()..).and_then(split_entry) else {
                continue;
            };
            let place = Place {
                ms,
                id: id.to_string(),
            };
            last = Some(place.clone());
            // A record listed by its id is passed over here (an earlier
            // version wrote entries for those too).
            let Ok(id) = EventId::parse(id) else {
                continue;
            };
            if !id_time_ms(&id).is_some_and(|id_ms| listed_by_id(id_ms, ms)) {
                events.push((place, Some(ms)));
            }
        }
        Ok(Read {
            events,
            frontier: last.filter(|_| !exhausted),
        })
    }
}

/// A listing entry's `{started:BE u64}\0{event id}` (after the account).
fn split_entry(rest: &[u8]) -> Option<(u64, &str)> {
    let (ms, id) = rest.split_at_checked(8)?;
    let ms = u64::from_be_bytes(ms.try_into().ok()?);
    Some((ms, std::str::from_utf8(id.strip_prefix(&[0])?).ok()?))
}

/// The place of a journal key's record when the key is a head
/// (`{event id}` after the account): its id's leading 48 bits as the ms.
fn head_place(rest: &[u8]) -> Option<(Place, EventId)> {
    if rest.len() != EVENT_ID_LEN {
        return None;
    }
    let text = std::str::from_utf8(rest).ok()?;
    let id = EventId::parse(text).ok()?;
    let place = Place {
        ms: leading_ms(id.as_uuid().as_bytes()),
        id: text.to_string(),
    };
    Some((place, id))
}

/// The start of the text of every UUIDv7 made in millisecond `ms`
/// (`xxxxxxxx-xxxx`, lower-case, as ids are written in keys).
fn ms_text(ms: u64) -> String {
    format!("{:08x}-{:04x}", (ms >> 16) & 0xffff_ffff, ms & 0xffff)
}

/// A cursor, `{ms}-{event id}`: a time before the 48 bits of a UUIDv7's
/// run out, and an id (in lower case, as keys hold ids).
fn parse_cursor(cursor: &str) -> Option<(u64, String)> {
    let (ms, id) = cursor.split_once('-')?;
    let ms: u64 = ms.parse().ok()?;
    if ms >= (1 << 48) - 1 {
        return None;
    }
    EventId::parse(id).ok()?;
    Some((ms, id.to_ascii_lowercase()))
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
    if record.waiting.is_some()
        && let Some(last) = steps.last_mut()
    {
        last.outcome = StepOutcome::Waiting;
    }
    if let Some(retry) = &record.retry {
        steps.push(retry.trace.clone());
    }
    if let Some(ChainEnd::Dead { trace, .. }) = &record.end {
        steps.push(trace.clone());
    }
    if record.end.is_some() {
        let expired_at = match &record.end {
            Some(ChainEnd::Expired { step }) => Some(step.as_str()),
            _ => None,
        };
        steps.extend(record.unrun.iter().map(|step| StepTrace {
            name: step.name.clone(),
            handler: step.handler.clone(),
            outcome: StepOutcome::Skipped,
            attempts: 0,
            duration_ms: 0.0,
            output: None,
            error:
                (expired_at == Some(step.name.as_str())).then(|| {
                    "the event expired (its expires_at passed) before this step".to_string()
                }),
            logs: Vec::new(),
        }));
    }
    ChainTrace {
        name: record.name.clone(),
        version: record.version,
        steps,
        // A window closed only by its count has no time to show.
        waiting_until: record
            .waiting
            .filter(|u| *u != switchboard_handlers::NEVER)
            .map(at),
        waiting_for: record.waiting_for.clone(),
        waiting_digest: record.waiting_digest.clone(),
        cancelled_by: match &record.end {
            Some(ChainEnd::Cancelled { by }) => Some(*by),
            _ => None,
        },
        flow: record
            .flow
            .iter()
            .map(|f| FlowTrace {
                control: f.control,
                result: f.result,
                key: f.key.clone(),
                at: (f.at_ms != switchboard_handlers::NEVER).then(|| at(f.at_ms)),
                by: f.by,
            })
            .collect(),
    }
}

#[cfg(test)]
mod status_tests {
    use super::TraceStatus;

    #[test]
    fn a_status_is_spelled_as_it_serialises() {
        for status in [
            TraceStatus::Done,
            TraceStatus::Running,
            TraceStatus::Waiting,
            TraceStatus::Cancelled,
            TraceStatus::Dead,
            TraceStatus::Expired,
            TraceStatus::Unrouted,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }
}
