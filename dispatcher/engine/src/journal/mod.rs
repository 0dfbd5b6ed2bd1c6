//! The step journal: what each chain has done with an event, step by step,
//! and the one record an event leaves behind.
//!
//! A record is a run of [`Entry`]s appended under the event's key, never
//! rewritten: taking the event up, a finished step, a step waiting to be
//! tried again, a chain's end, the end of a pass. Folding them gives the
//! [`EventJournal`], from which the executor resumes a redelivered event —
//! after a crash, a nak for a retry or a replay from dead letters, it
//! continues after its last finished step — and from which the event's trace
//! is derived ([`crate::trace`]): nothing is written beside it.
//!
//! The executor appends what a pass did in as few writes as the guarantees
//! allow (see `executor::pass`): an event whose chains have no effects
//! outside the dispatcher costs one write, however many steps they have.
//!
//! A record's first write goes under `{account}\0{event id}`, its head, and
//! later ones under `{account}\0{event id}\0{sequence:BE u64}`: so an
//! account's records lie together, one prefix scan reads a record, and
//! finding that a fresh event has none is one point lookup (a scan of a
//! sled tree copies a node even when it finds nothing). An account's
//! listing (newest first) reads the heads of records whose event ids tell
//! their time — UUIDv7, what the SDK gives every new event, whose text
//! sorts by it — straight from these keys, when the event was taken up
//! within [`LISTED_BY_ID_WITHIN`] of that time; only the other records
//! (derived ids of emitted events, ids a worker chose, events that waited
//! long on the bus) are also entered in [`Collection::EventTimes`] by their
//! start time. Every value starts
//! with the event's start time and a flag byte, so that expiry
//! ([`Journal::expire`]) reads no JSON for the records it keeps: records
//! expire after the retention, except those of events with a chain in dead
//! letters, which stay until the letter is replayed or discarded, and those
//! with a paused chain (a `delay`), which stay until it goes on.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_rules::Control;
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::{Collection, Store, StoreError, Write, key};

use crate::trace::{StepTrace, TraceStatus};

pub mod legacy;

/// One thing that happened to an event, appended to its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Entry {
    /// The event was taken up: the first entry of a record.
    Begin {
        /// The event.
        event: Box<VumiApiEvent>,
        /// The W3C `traceparent` of the first pass's `process` span, when
        /// traces are on: later passes link to it ([`crate::otel`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    /// A step of a chain finished (succeeded, or failed under `on_error =
    /// "continue"`); the chain resumes after it.
    Step {
        /// The chain.
        chain: String,
        /// The version of the account's chains it ran under.
        version: u64,
        /// The step.
        record: Box<StepRecord>,
    },
    /// The events a chain's finished step emitted are on the bus now.
    Published {
        /// The chain.
        chain: String,
        /// The step's position among the chain's finished steps.
        step: usize,
    },
    /// A step failed in a way worth trying again; the chain resumes at it.
    Retry {
        /// The chain.
        chain: String,
        /// The version of the account's chains it ran under.
        version: u64,
        /// The step and its trace so far.
        pending: Box<PendingRetry>,
    },
    /// A chain ended.
    End {
        /// The chain.
        chain: String,
        /// The version of the account's chains it ran under.
        version: u64,
        /// How.
        end: Box<ChainEnd>,
        /// The steps it did not run (it stopped or failed before them).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unrun: Vec<StepName>,
    },
    /// A chain's dead letter is on the bus's dead-letter stream.
    Announced {
        /// The chain.
        chain: String,
    },
    /// A chain's `when` condition failed to evaluate (the chain is in dead
    /// letters; a later pass evaluates the condition again).
    Condition {
        /// The chain.
        chain: String,
        /// The version of the account's chains it was selected under.
        version: u64,
        /// Why.
        error: String,
    },
    /// A chain's dead letter was put back on the bus: the chain runs again
    /// from its failed step, and the letter goes when it ends.
    Replaying {
        /// The chain.
        chain: String,
        /// The dead letter.
        letter: String,
    },
    /// A chain's dead letter was discarded: the chain stays ended.
    Discarded {
        /// The chain.
        chain: String,
        /// The dead letter.
        letter: String,
    },
    /// A chain paused after its last finished step (a `delay`): it goes
    /// on at the next step once `until_ms` has passed; a durable timer
    /// brings the event back then.
    Wait {
        /// The chain.
        chain: String,
        /// When it goes on, in ms since the epoch, if nothing ends the
        /// pause first.
        until_ms: u64,
        /// The type of the event that ends it first (a `wait_for_event`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_event: Option<String>,
        /// The last finished step runs again when the pause ends (a
        /// scheduled send): `Woke` takes it off the finished steps.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        again: bool,
        /// The key of the digest window it opened (a `digest` step's): it
        /// goes on when that closes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
        /// The flow control holding the run back before its first step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flow: Option<Control>,
        /// The waiters the pause wrote beside it (none in entries written
        /// before they were kept here): written again when the event comes
        /// back while the run is paused, since a crash or a hand-over
        /// between the two writes may have lost them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reached_by: Vec<Reachable>,
    },
    /// A paused chain went on, at `at_ms`.
    Woke {
        /// The chain.
        chain: String,
        /// When, in ms since the epoch.
        at_ms: u64,
        /// The pausing step's output, now that it is known (a
        /// `wait_for_event`'s: the event that came, or that none did).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Map<String, Value>>,
    },
    /// A chain's flow control decided about its run (before its first
    /// step): let it go, held it back, or ended it.
    Flow {
        /// The chain.
        chain: String,
        /// The version of the account's chains it ran under.
        version: u64,
        /// What it decided.
        record: FlowRecord,
    },
    /// A pass over the event ended.
    Finish {
        /// Where the event stands.
        status: TraceStatus,
        /// When it ended, in ms since the epoch; `None` while a step waits
        /// to be tried again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finished_ms: Option<u64>,
    },
}

impl Entry {
    /// Whether the entry changes whether the record holds a dead letter or
    /// a paused chain (either keeps it from expiring).
    fn touches_dead_letters(&self) -> bool {
        match self {
            Entry::End { end, .. } => matches!(**end, ChainEnd::Dead { .. }),
            Entry::Replaying { .. }
            | Entry::Discarded { .. }
            | Entry::Wait { .. }
            | Entry::Woke { .. } => true,
            _ => false,
        }
    }
}

/// A step by name and handler: one a chain did not run, for its trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepName {
    /// The step's name.
    pub name: String,
    /// Its handler.
    pub handler: String,
}

/// What a later event that reaches a paused run does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// Ends the chain (its `cancel_on`).
    Cancel,
    /// Ends the pause: the chain goes on (a `wait_for_event`).
    Resume,
}

impl Reach {
    /// As in a waiter's key.
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Cancel => "cancel",
            Reach::Resume => "resume",
        }
    }
}

/// A way a later event may reach a paused run: a waiter of the pause, in
/// [`Collection::Waiters`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reachable {
    /// What it does to the run.
    pub kind: Reach,
    /// The type of the event that reaches it.
    pub event_type: String,
    /// The Rhai condition over `event`, `paused` and `steps` that such an
    /// event must meet.
    pub condition: String,
    /// When the pause began (ms since the epoch): an event taken up before
    /// then does not reach it.
    pub since_ms: u64,
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
    /// The idempotency key the step claimed, held while it waits to be
    /// tried again: given back if the run ends before it is (the event
    /// expired, its chain was removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed: Option<String>,
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
    },
    /// The dead letter was discarded: the chain stays ended.
    Discarded,
    /// A later event cancelled the chain while it was paused (its
    /// `cancel_on`).
    Cancelled {
        /// The event that cancelled it.
        by: EventId,
    },
    /// The event's `expires_at` passed while the chain ran (between steps,
    /// during a pause or while a step waited to be tried again): it stopped
    /// before `step`.
    Expired {
        /// The step it did not run.
        step: String,
    },
    /// Its chain was removed from the account while the run was under way
    /// (paused, or a step waiting to be tried again): it stopped there.
    Removed,
    /// Its flow control ended it before its first step: a `rate_limit`
    /// skipped it, or a later event superseded it (`debounce`).
    Limited {
        /// Which.
        control: Control,
    },
}

/// What a chain's flow control decided about a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// The control.
    pub control: Control,
    /// What it decided.
    pub result: FlowResult,
    /// The run's key, rendered.
    pub key: String,
    /// When it decided, or (held) when the run's turn comes, in ms since
    /// the epoch.
    pub at_ms: u64,
    /// The later event that superseded it (`debounce`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<EventId>,
}

/// What a flow control decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowResult {
    /// The run goes on.
    Passed,
    /// The run waits (its turn, a quiet key, a free slot).
    Held,
    /// Over the limit: the run is skipped (`rate_limit`).
    Skipped,
    /// A later event of the key came first: it runs instead (`debounce`).
    Superseded,
}

/// What one chain has done with an event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChainJournal {
    /// The chain's name.
    pub name: String,
    /// The version of the account's chains it first ran under.
    pub version: u64,
    /// The steps that finished, in order. The chain resumes at the next one.
    pub steps: Vec<StepRecord>,
    /// The step waiting to be tried again.
    pub retry: Option<PendingRetry>,
    /// How the chain ended; `None` while it has steps left to run.
    pub end: Option<ChainEnd>,
    /// Whether the dead letter of a `Dead` end is on the bus's stream.
    pub announced: bool,
    /// The steps it did not run, once ended.
    pub unrun: Vec<StepName>,
    /// The dead letter being replayed: removed when the chain ends.
    pub replaying: Option<String>,
    /// The error of its `when` condition, when that is all the chain did.
    pub condition_failed: Option<String>,
    /// Paused after its last finished step until then (ms since the epoch).
    pub waiting: Option<u64>,
    /// The type of the event the pause waits for, if any.
    pub waiting_for: Option<String>,
    /// Whether the last finished step runs again when the pause ends.
    pub waiting_again: bool,
    /// The key of the digest window the pause waits on to close, if any.
    pub waiting_digest: Option<String>,
    /// The flow control holding the run back, if any.
    pub waiting_flow: Option<Control>,
    /// The ways a later event may reach the pause (its waiters), as
    /// recorded with it.
    pub waiting_reached_by: Vec<Reachable>,
    /// What its flow controls decided, one record per control (the latest).
    pub flow: Vec<FlowRecord>,
}

impl ChainJournal {
    /// What `control` last decided about the run, if it did.
    pub fn flow_of(&self, control: Control) -> Option<&FlowRecord> {
        self.flow.iter().find(|f| f.control == control)
    }

    /// Whether `control` let the run go.
    pub fn passed(&self, control: Control) -> bool {
        self.flow_of(control)
            .is_some_and(|f| f.result == FlowResult::Passed)
    }
}

impl ChainJournal {
    /// Whether dead letter `letter` is this chain's: filed by it, or being
    /// replayed into it.
    pub fn refers_to(&self, letter: &str) -> bool {
        matches!(&self.end, Some(ChainEnd::Dead { letter: filed, .. }) if filed == letter)
            || self.replaying.as_deref() == Some(letter)
    }

    /// Whether the chain has started: a step finished or waits, its flow
    /// control decided about it, or it ended.
    pub fn ran(&self) -> bool {
        !self.steps.is_empty()
            || self.retry.is_some()
            || self.end.is_some()
            || self.waiting.is_some()
            || !self.flow.is_empty()
            || self.replaying.is_some()
    }
}

/// The end of the last pass over an event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    /// Where the event stood.
    pub status: TraceStatus,
    /// When the pass ended, in ms since the epoch.
    pub finished_ms: Option<u64>,
}

/// What the chains have done with one event so far: its record, folded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventJournal {
    /// When the event was first taken up, in ms since the epoch.
    pub started_ms: u64,
    /// The event, as first taken up.
    pub event: Option<VumiApiEvent>,
    /// The chains that ran (or whose condition failed), in the order they
    /// first did.
    pub chains: Vec<ChainJournal>,
    /// How the last pass ended; `None` while a pass is under way (or was
    /// cut short).
    pub finish: Option<Finish>,
    /// The sequence number of the last entry read or written.
    last_seq: Option<u64>,
    /// Whether the record has its `Begin` entry (read, or pending).
    begun: bool,
    /// The first pass's trace context, if traces were on then.
    pub traceparent: Option<String>,
}

impl EventJournal {
    /// Whether nothing of the record was read or written yet (its next
    /// write is its head).
    pub fn is_fresh(&self) -> bool {
        self.last_seq.is_none()
    }

    /// A journal for an event taken up now.
    pub fn starting_now() -> Self {
        Self {
            started_ms: now_ms(),
            ..Self::default()
        }
    }

    /// The record of chain `name`, created (under `version`) if it has none.
    pub fn chain_mut(&mut self, name: &str, version: u64) -> &mut ChainJournal {
        let i = match self.chains.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.chains.push(ChainJournal {
                    name: name.to_string(),
                    version,
                    ..ChainJournal::default()
                });
                self.chains.len() - 1
            }
        };
        &mut self.chains[i]
    }

    /// The record of chain `name`.
    pub fn chain(&self, name: &str) -> Option<&ChainJournal> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Whether the record has its `Begin` entry.
    pub fn has_begun(&self) -> bool {
        self.begun
    }

    /// Whether a chain is in dead letters or paused (so the record must
    /// not expire).
    pub fn holds_dead_letter(&self) -> bool {
        self.chains
            .iter()
            .any(|c| matches!(c.end, Some(ChainEnd::Dead { .. })) || c.waiting.is_some())
    }

    /// Applies one entry.
    pub fn apply(&mut self, entry: Entry) {
        if !matches!(entry, Entry::Finish { .. } | Entry::Discarded { .. }) {
            // Handling goes on: the last pass's end no longer tells where
            // the event stands.
            self.finish = None;
        }
        match entry {
            Entry::Begin { event, traceparent } => {
                self.event.get_or_insert(*event);
                self.traceparent = self.traceparent.take().or(traceparent);
                self.begun = true;
            }
            Entry::Step {
                chain,
                version,
                record,
            } => {
                let chain = self.chain_mut(&chain, version);
                chain.steps.push(*record);
                chain.retry = None;
                chain.condition_failed = None;
                chain.waiting = None;
            }
            Entry::Published { chain, step } => {
                if let Some(record) = self
                    .chains
                    .iter_mut()
                    .find(|c| c.name == chain)
                    .and_then(|c| c.steps.get_mut(step))
                {
                    record.published = true;
                }
            }
            Entry::Retry {
                chain,
                version,
                pending,
            } => {
                let chain = self.chain_mut(&chain, version);
                chain.retry = Some(*pending);
                chain.condition_failed = None;
            }
            Entry::End {
                chain,
                version,
                end,
                unrun,
            } => {
                let chain = self.chain_mut(&chain, version);
                chain.end = Some(*end);
                chain.unrun = unrun;
                chain.announced = false;
                chain.retry = None;
                chain.replaying = None;
                chain.condition_failed = None;
                chain.waiting = None;
                chain.waiting_for = None;
                chain.waiting_again = false;
                chain.waiting_digest = None;
                chain.waiting_flow = None;
                chain.waiting_reached_by.clear();
            }
            Entry::Announced { chain } => {
                if let Some(c) = self.chains.iter_mut().find(|c| c.name == chain) {
                    c.announced = true;
                }
            }
            Entry::Flow {
                chain,
                version,
                record,
            } => {
                let chain = self.chain_mut(&chain, version);
                chain.flow.retain(|f| f.control != record.control);
                chain.flow.push(record);
            }
            Entry::Condition {
                chain,
                version,
                error,
            } => {
                let chain = self.chain_mut(&chain, version);
                if !chain.ran() {
                    chain.condition_failed = Some(error);
                }
            }
            Entry::Replaying { chain, letter } => {
                if let Some(c) = self.chains.iter_mut().find(|c| c.name == chain) {
                    // Its slot went with its end: the replayed run takes
                    // one again, or waits for it. (Replayed again while it
                    // waits, it keeps its place.)
                    if c.end.is_some() {
                        c.flow.retain(|f| f.control != Control::Concurrency);
                    }
                    c.end = None;
                    c.unrun.clear();
                    c.retry = None;
                    c.replaying = Some(letter);
                }
            }
            Entry::Discarded { chain, letter } => {
                if let Some(c) = self.chains.iter_mut().find(|c| c.name == chain)
                    && matches!(&c.end, Some(ChainEnd::Dead { letter: filed, .. }) if *filed == letter)
                {
                    c.end = Some(ChainEnd::Discarded);
                }
            }
            Entry::Wait {
                chain,
                until_ms,
                for_event,
                again,
                digest,
                flow,
                reached_by,
            } => {
                if let Some(c) = self.chains.iter_mut().find(|c| c.name == chain) {
                    c.waiting = Some(until_ms);
                    c.waiting_for = for_event;
                    c.waiting_again = again;
                    c.waiting_digest = digest;
                    c.waiting_flow = flow;
                    c.waiting_reached_by = reached_by;
                }
            }
            Entry::Woke { chain, output, .. } => {
                if let Some(c) = self.chains.iter_mut().find(|c| c.name == chain) {
                    c.waiting = None;
                    c.waiting_for = None;
                    c.waiting_digest = None;
                    c.waiting_flow = None;
                    c.waiting_reached_by.clear();
                    if std::mem::take(&mut c.waiting_again) {
                        c.steps.pop();
                    } else if let (Some(output), Some(last)) = (output, c.steps.last_mut()) {
                        last.trace.output = Some(output);
                    }
                }
            }
            Entry::Finish {
                status,
                finished_ms,
            } => {
                self.finish = Some(Finish {
                    status,
                    finished_ms,
                });
            }
        }
    }
}

/// Entries recorded and not yet written: serialised as they come, so that
/// they can be applied to the folded journal by value.
#[derive(Debug, Default)]
pub struct Pending {
    /// `[` and the entries so far, comma-separated (the `]` comes at the write).
    json: Vec<u8>,
    count: usize,
    flags: u8,
}

impl Pending {
    /// Adds `entry`.
    pub fn push(&mut self, entry: &Entry) {
        self.json.push(if self.count == 0 { b'[' } else { b',' });
        serde_json::to_writer(&mut self.json, entry).expect("journal entries serialise");
        self.count += 1;
        if entry.touches_dead_letters() {
            self.flags |= FLAG_DEAD_LETTERS;
        }
    }

    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds the `Begin` entry of `event` to what `journal` will write: the
    /// event is serialised from where it is, not copied into an entry.
    /// `traceparent` is the pass's trace context, if traces are on.
    pub fn push_begin(
        &mut self,
        journal: &mut EventJournal,
        event: &VumiApiEvent,
        traceparent: Option<String>,
    ) {
        #[derive(Serialize)]
        #[serde(tag = "entry", rename = "begin")]
        struct Begin<'a> {
            event: &'a VumiApiEvent,
            #[serde(skip_serializing_if = "Option::is_none")]
            traceparent: &'a Option<String>,
        }
        self.json.push(if self.count == 0 { b'[' } else { b',' });
        serde_json::to_writer(
            &mut self.json,
            &Begin {
                event,
                traceparent: &traceparent,
            },
        )
        .expect("an event serialises");
        self.count += 1;
        journal.finish = None;
        journal.begun = true;
        journal.traceparent = traceparent;
    }
}

/// Where an event's record is kept: its account and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordKey {
    /// `{account}\0{event id}`: the head's key, and the prefix of the rest.
    head: Vec<u8>,
    /// When the event's id says it was made (see [`id_time_ms`]).
    id_ms: Option<u64>,
}

impl RecordKey {
    /// The record of event `id` of `account`.
    pub fn new(account: &AccountKey, id: &EventId) -> Self {
        Self {
            head: key(&[account.as_str().as_bytes(), id.to_string().as_bytes()]),
            id_ms: id_time_ms(id),
        }
    }

    /// Whether the record of an event taken up at `started_ms` needs an
    /// entry in [`Collection::EventTimes`] to be listed: unless its id
    /// tells its time and it was taken up within [`LISTED_BY_ID_WITHIN`]
    /// of it ([`listed_by_id`]). (An entry costs a second store write per
    /// event, as much as the record's.)
    pub fn needs_time_entry(&self, started_ms: u64) -> bool {
        !self
            .id_ms
            .is_some_and(|id_ms| listed_by_id(id_ms, started_ms))
    }

    /// The record's entry in [`Collection::EventTimes`], for an event
    /// taken up at `started_ms`: `{account}\0{started_ms:BE}\0{event id}`.
    pub fn time_entry(&self, started_ms: u64) -> Write {
        let split = self
            .head
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.head.len());
        // `id` keeps the separator before it.
        let (account, id) = self.head.split_at(split);
        let mut k = Vec::with_capacity(self.head.len() + 9);
        k.extend_from_slice(account);
        k.push(0);
        k.extend_from_slice(&started_ms.to_be_bytes());
        k.extend_from_slice(id);
        Write {
            collection: Collection::EventTimes,
            key: k,
            value: Some(Vec::new()),
        }
    }

    /// The key of the write numbered `seq`: the head for 0.
    fn entry(&self, seq: u64) -> Vec<u8> {
        let mut k = self.head.clone();
        if seq > 0 {
            k.push(0);
            k.extend_from_slice(&seq.to_be_bytes());
        }
        k
    }

    /// The prefix of the writes after the head.
    fn rest(&self) -> Vec<u8> {
        let mut k = self.head.clone();
        k.push(0);
        k
    }
}

/// Value header: the event's start time (8 bytes), then the flags.
const HEADER: usize = 9;
/// Flag: the entries change whether the record holds a dead letter.
const FLAG_DEAD_LETTERS: u8 = 1;

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

    /// The record of the event under `at`, folded; `None` if it has none.
    pub fn load(&self, at: &RecordKey) -> Result<Option<EventJournal>, StoreError> {
        let Some(head) = self.store.get(Collection::Journal, &at.head)? else {
            return Ok(None);
        };
        let mut entries = vec![(at.head.clone(), head)];
        entries.extend(self.store.scan_prefix(Collection::Journal, &at.rest())?);
        Ok(fold(&entries))
    }

    /// The store the records are kept in.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The write that appends the `pending` entries (already applied to
    /// `journal`) to the record under `at`; `None` when there are none.
    /// Entries are written once and never rewritten.
    pub fn append(
        &self,
        at: &RecordKey,
        journal: &mut EventJournal,
        pending: &mut Pending,
    ) -> Result<Option<Write>, StoreError> {
        if pending.count == 0 {
            return Ok(None);
        }
        // After the last entry read or written, and after every number this
        // store handed out before: two writers of one record (a pass and a
        // replay from the API) never take the same key.
        let seq = match journal.last_seq {
            None => 0,
            // From the store's counter (plus one: 0 is the head), which
            // never hands a number out twice; after the last entry, should
            // another writer's counter have been ahead.
            Some(last) => (self.store.next_id()? + 1).max(last + 1),
        };
        Ok(self.append_at(at, journal, pending, seq))
    }

    /// [`Journal::append`] under sequence number `seq`.
    fn append_at(
        &self,
        at: &RecordKey,
        journal: &mut EventJournal,
        pending: &mut Pending,
        seq: u64,
    ) -> Option<Write> {
        if pending.count == 0 {
            return None;
        }
        journal.last_seq = Some(seq);
        let mut value = Vec::with_capacity(HEADER + pending.json.len() + 1);
        value.extend_from_slice(&journal.started_ms.to_be_bytes());
        value.push(pending.flags);
        value.extend_from_slice(&pending.json);
        value.push(b']');
        *pending = Pending::default();
        Some(Write {
            collection: Collection::Journal,
            key: at.entry(seq),
            value: Some(value),
        })
    }

    /// Removes the records of events taken up more than `retention` ago,
    /// except those holding a dead letter. Returns how many were removed.
    /// Reads the whole collection, but no JSON except of records whose
    /// entries touch dead letters.
    pub fn expire(&self, retention: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut removed = 0;
        let mut group: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.store.scan_pages(Collection::Journal, 1024, |batch| {
            for (k, v) in batch {
                if group
                    .first()
                    .is_some_and(|(g, _)| record_of(g) != record_of(&k))
                {
                    removed += self.expire_record(&std::mem::take(&mut group), cutoff)?;
                }
                group.push((k, v));
            }
            Ok::<_, StoreError>(())
        })?;
        removed += self.expire_record(&group, cutoff)?;
        self.expire_times(cutoff)?;
        Ok(removed)
    }

    /// Removes the listing entries of events taken up before `cutoff` (a
    /// record kept longer for its dead letter is still found by its id).
    fn expire_times(&self, cutoff: u64) -> Result<(), StoreError> {
        self.store
            .scan_pages(Collection::EventTimes, 1024, |batch| {
                for (k, _) in batch {
                    let started = k
                        .iter()
                        .position(|b| *b == 0)
                        .and_then(|at| k.get(at + 1..at + 9))
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(u64::from_be_bytes);
                    if started.is_none_or(|ms| ms < cutoff) {
                        self.store.remove(Collection::EventTimes, &k)?;
                    }
                }
                Ok(())
            })
    }

    /// Removes one record's entries if it expired and holds no dead letter.
    fn expire_record(
        &self,
        entries: &[(Vec<u8>, Vec<u8>)],
        cutoff: u64,
    ) -> Result<usize, StoreError> {
        let Some(started) = entries.iter().filter_map(|(_, v)| started_ms(v)).min() else {
            return Ok(0);
        };
        // Another replica's partition: its sweep removes it.
        if entries
            .first()
            .is_some_and(|(k, _)| !self.store.writes_locally(Collection::Journal, k))
        {
            return Ok(0);
        }
        if started >= cutoff {
            return Ok(0);
        }
        let touches = entries
            .iter()
            .any(|(_, v)| v.get(8).is_some_and(|f| f & FLAG_DEAD_LETTERS != 0));
        if touches && fold(entries).is_some_and(|j| j.holds_dead_letter()) {
            return Ok(0);
        }
        // The newest entry first: a crash part-way leaves the record as it
        // stood earlier, which the next sweep removes.
        let removals: Vec<Write> = entries
            .iter()
            .rev()
            .map(|(k, _)| Write {
                collection: Collection::Journal,
                key: k.clone(),
                value: None,
            })
            .collect();
        self.store.write_in_order(&removals)?;
        Ok(1)
    }
}

/// Folds a record's entries (in key order) into its journal.
fn fold(entries: &[(Vec<u8>, Vec<u8>)]) -> Option<EventJournal> {
    let mut journal: Option<EventJournal> = None;
    for (k, v) in entries {
        let (Some(started), Some(json)) = (started_ms(v), v.get(HEADER..)) else {
            continue;
        };
        let Ok(decoded) = serde_json::from_slice::<Vec<Entry>>(json) else {
            tracing::warn!(key = %String::from_utf8_lossy(k), "an unreadable journal entry was skipped");
            continue;
        };
        let j = journal.get_or_insert_with(|| EventJournal {
            started_ms: started,
            ..EventJournal::default()
        });
        j.started_ms = j.started_ms.min(started);
        j.last_seq = Some(entry_seq(k));
        for entry in decoded {
            j.apply(entry);
        }
    }
    journal
}

/// The event's start time a value begins with.
pub(crate) fn started_ms(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// The length of `{account}\0{event id}` in a journal key.
fn head_len(k: &[u8]) -> usize {
    k.iter()
        .position(|b| *b == 0)
        .map_or(k.len(), |account| (account + 1 + EVENT_ID_LEN).min(k.len()))
}

/// `{account}\0{event id}` of a journal key: the record it belongs to.
fn record_of(k: &[u8]) -> &[u8] {
    &k[..head_len(k)]
}

/// The sequence number of a journal key (0 for the head).
fn entry_seq(k: &[u8]) -> u64 {
    k.get(head_len(k) + 1..)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Event ids are UUIDs in their hyphenated form.
pub(crate) const EVENT_ID_LEN: usize = 36;

/// The time a UUIDv7 event id was made at, in ms since the epoch (its
/// first 48 bits, which its hyphenated text sorts by); `None` for ids of
/// other versions (derived ids are v5; a worker may send v4).
pub fn id_time_ms(id: &EventId) -> Option<u64> {
    let uuid = id.as_uuid();
    (uuid.get_version_num() == 7).then(|| leading_ms(uuid.as_bytes()))
}

/// How far apart the time in a UUIDv7 id and the event's take-up may be
/// for the account's listing to place the event by its id (in ms): further
/// apart (the event waited long on the bus, or its maker's clock is off),
/// the record gets a listing entry at its take-up time instead.
pub const LISTED_BY_ID_WITHIN: u64 = 60_000;

/// Whether the record of an event whose id was made at `id_ms` and which
/// was taken up at `started_ms` is listed by its id (else by its entry in
/// [`Collection::EventTimes`]).
pub fn listed_by_id(id_ms: u64, started_ms: u64) -> bool {
    id_ms.abs_diff(started_ms) <= LISTED_BY_ID_WITHIN
}

/// The first 48 bits of a UUID, as a number: a v7 id's time in ms.
pub(crate) fn leading_ms(bytes: &[u8; 16]) -> u64 {
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&bytes[..6]);
    u64::from_be_bytes(ms)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests;
