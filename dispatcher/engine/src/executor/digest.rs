//! Digest windows: the first event of a key opens one and its run pauses;
//! each later event of the key joins it (its chain stops there); when the
//! window closes, the opening event's run goes on once with every event.
//!
//! A window is partition-owned state of its account: a header
//! `{account}\0{chain}\0{step}\0{key}` in [`Collection::Digests`] (the
//! opening event, when the window closes, how many joined) and each
//! event under the opening event's id in [`Collection::DigestEvents`]. Only
//! the partition's owner handles the account's events, and within it a
//! lock per window makes reading the header and writing the change one
//! step, so two events of a key never both open a window, and none joins
//! a window that is closing.
//!
//! Writes are ordered so a crash at any point loses no event, closes no
//! window twice and gathers no event into two windows: a joining event's
//! window entries go before its journal, the mark that it joined last of
//! them (a crash before the mark repeats the join, and the close keeps
//! each event once; after it, the event handled again finds the mark and
//! stops); a close keeps (or writes) the mark of each member whose journal
//! does not hold its join, which is then still to come back, and that
//! member removes it when it does; the opening event's header goes before
//! its journal (a header whose opener is not paused on it is taken for
//! none); a close writes the journal, with every event in the step's
//! output, before the window is removed.
//!
//! A window whose chain is removed while it is open gathers nothing: its
//! opener, back by its timer or (a window closed only by its count) by
//! the expiry sweep's [`wake_removed_windows`], stops, and the window goes
//! with its events and their marks (`Executor::drop_digest`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_handlers::{DigestWindow, MAX_WINDOW_BYTES, MAX_WINDOW_EVENTS, NEVER, Pause};
use switchboard_rules::{ChainSpec, ChainStore};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::{Collection, Store, StoreError, Write, key};

use super::pass::Pass;
use super::paused::Resumed;
use super::{ChainRun, Executor, Interrupted};
use crate::journal::{ChainEnd, Entry, Journal, RecordKey, StepRecord, now_ms};
use crate::timers::{PendingTimer, Timers};
use crate::trace::StepOutcome;

/// An open window's header.
#[derive(Debug, Serialize, Deserialize)]
struct Window {
    /// The event that opened it, whose run goes on when it closes.
    opener: EventId,
    /// When it closes ([`NEVER`]: only at `max_events`).
    until_ms: u64,
    /// How many events joined it, the opener among them.
    count: u32,
    /// It closes at this many events (none: at [`MAX_WINDOW_EVENTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_events: Option<u32>,
    /// Its events' encoded size, at most [`MAX_WINDOW_BYTES`]. (None in a
    /// header written before it was kept: summed at the next join.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    /// It holds all it may: closed, its opener on the way back.
    #[serde(default)]
    full: bool,
}

impl Window {
    /// It holds all it may: `max_events` (at most [`MAX_WINDOW_EVENTS`],
    /// a header written before that bound included), or events that come
    /// to [`MAX_WINDOW_BYTES`] (an event that would take it past closes it
    /// before joining, in `digest`).
    fn filled(&self) -> bool {
        let most = self
            .max_events
            .map_or(MAX_WINDOW_EVENTS, |m| m.min(MAX_WINDOW_EVENTS));
        self.count >= most || self.bytes.is_some_and(|b| b >= MAX_WINDOW_BYTES)
    }
}

/// A window's header key.
fn window_key(account: &AccountKey, chain: &str, step: &str, digest: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        chain.as_bytes(),
        step.as_bytes(),
        digest.as_bytes(),
    ])
}

/// The prefix of the events of the window `opener` opened for `chain`.
fn events_prefix(account: &AccountKey, opener: EventId, chain: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        opener.to_string().as_bytes(),
        chain.as_bytes(),
        b"",
    ])
}

/// The entries of the window `opener` opened for `chain`, in the order
/// its events joined (not its members' marks, which share the prefix).
fn window_entries(
    store: &Store,
    account: &AccountKey,
    opener: EventId,
    chain: &str,
) -> Result<Vec<switchboard_store::Entry>, StoreError> {
    let prefix = events_prefix(account, opener, chain);
    Ok(store
        .scan_prefix(Collection::DigestEvents, &prefix)?
        .into_iter()
        .filter(|(k, _)| k.len() == prefix.len() + 4)
        .collect())
}

/// The window header at `header_key`, if `opener` opened it.
fn opened_by(
    store: &Store,
    header_key: &[u8],
    opener: EventId,
) -> Result<Option<Window>, StoreError> {
    Ok(store
        .get(Collection::Digests, header_key)?
        .and_then(|b| serde_json::from_slice::<Window>(&b).ok())
        .filter(|w| w.opener == opener))
}

/// The write of an event (`encoded`) at `position` (from 0) of
/// `opener`'s window.
fn event_write(
    account: &AccountKey,
    opener: EventId,
    chain: &str,
    position: u32,
    encoded: Vec<u8>,
) -> Write {
    let mut k = events_prefix(account, opener, chain);
    k.extend_from_slice(&position.to_be_bytes());
    Write {
        collection: Collection::DigestEvents,
        key: k,
        value: Some(encoded),
    }
}

/// Marks `window` full and gives the timer that brings its opener back
/// now to close it (durable, unlike a publish from here).
fn opener_back(window: &mut Window, account: &AccountKey, chain: &str) -> PendingTimer {
    window.full = true;
    PendingTimer {
        account: account.clone(),
        event_id: window.opener,
        chain: chain.to_string(),
        due_ms: now_ms(),
    }
}

/// Closes `window` as it is (its header at `header_key`): marks it full,
/// so that none joins it, and sets the timer that brings its opener back
/// now to go on with what it holds. Returns the timer, to be noted.
fn fill(
    store: &Store,
    window: &mut Window,
    header_key: Vec<u8>,
    account: &AccountKey,
    chain: &str,
) -> Result<PendingTimer, StoreError> {
    let timer = opener_back(window, account, chain);
    store.write_in_order(&[timer.put(), header_write(header_key, window)])?;
    Ok(timer)
}

/// The mark that `member` joined a window of `chain` (the window's opener
/// its value): written last in a join, so a join repeated after a crash
/// finds it, and the event is not gathered into a second window.
fn member_key(account: &AccountKey, member: EventId, chain: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        member.to_string().as_bytes(),
        chain.as_bytes(),
        b"joined",
    ])
}

fn header_write(k: Vec<u8>, window: &Window) -> Write {
    Write {
        collection: Collection::Digests,
        key: k,
        value: Some(serde_json::to_vec(window).expect("a window serialises")),
    }
}

/// How many digest windows are open in `store` (this replica's copy).
pub fn open_windows(store: &Store) -> u64 {
    store.len(Collection::Digests) as u64
}

/// Brings back, by a timer due `now`, the opener of each open digest
/// window (of those this replica writes) whose chain is no longer among
/// its account's `chains`: its run then stops (`removed`) and the window
/// goes with it (see `Executor::drop_digest`). A window closed only by its
/// count has no timer, and no event of a removed chain joins it: without
/// this, it and its opener's pause would stay for good. Returns how many
/// openers it woke.
pub fn wake_removed_windows(
    store: &Store,
    chains: &ChainStore,
    timers: &Timers,
    now: u64,
) -> Result<usize, StoreError> {
    let journal = Journal::new(store.clone());
    let mut woken = 0;
    for (k, v) in store.scan_prefix(Collection::Digests, &[])? {
        if !store.writes_locally(Collection::Digests, &k) {
            continue;
        }
        let mut parts = k.splitn(3, |b| *b == 0);
        let (Some(account), Some(chain)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(account), Ok(chain)) = (std::str::from_utf8(account), std::str::from_utf8(chain))
        else {
            continue;
        };
        let Ok(account) = AccountKey::new(account) else {
            continue;
        };
        // (An account without chains at all routes nothing: its events,
        // brought back, would not reach their runs.)
        let gone = chains
            .lookup(&account)
            .is_some_and(|held| held.chains().iter().all(|c| c.name != chain));
        if !gone {
            continue;
        }
        let Ok(window) = serde_json::from_slice::<Window>(&v) else {
            continue;
        };
        // Only a window its opener is paused on (as `open_window` tells):
        // one a crash left behind brings nothing back.
        let paused_on_it = journal
            .load(&RecordKey::new(&account, &window.opener))?
            .and_then(|j| {
                j.chain(chain)
                    .map(|c| c.waiting == Some(window.until_ms) && c.waiting_digest.is_some())
            })
            .unwrap_or(false);
        if !paused_on_it {
            continue;
        }
        let timer = PendingTimer {
            account,
            event_id: window.opener,
            chain: chain.to_string(),
            due_ms: now,
        };
        store.write_in_order(&[timer.put()])?;
        timers.noted(&timer);
        woken += 1;
    }
    Ok(woken)
}

impl Executor {
    /// A `digest` step of `chain` finished with `record`, asking for
    /// `window`: `event` opens it (its run pauses), or joins the open one
    /// (its chain stops here). `None`: the chain goes on at once (a window
    /// of one event closes as it opens).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn digest(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        version: u64,
        next: usize,
        mut record: StepRecord,
        pause: Pause,
        window: &DigestWindow,
        pass: &mut Pass,
    ) -> Result<(Option<ChainRun>, Map<String, Value>), Interrupted> {
        let account = &event.account_key;
        let step = record.trace.name.clone();
        let header_key = window_key(account, &chain.name, &step, &window.key);
        let _locked = self.locks.lock(&header_key);
        let mut output = record.trace.output.take().unwrap_or_default();
        let member = member_key(account, event.id, &chain.name);
        let joined_before = pass
            .store()
            .get(Collection::DigestEvents, &member)?
            .and_then(|v| String::from_utf8(v).ok());
        if let Some(opener) = joined_before {
            // Handled again after a crash that kept its join: it is in that
            // window (gathered already, if it closed since). Once that one
            // closed, the mark has done its work and goes with this pass's
            // journal; while it is open, its close removes it.
            let still_open = self
                .open_window(pass.store(), &header_key, account, &chain.name)?
                .is_some_and(|w| w.opener.to_string() == opener);
            if !still_open {
                pass.write_beside(Write {
                    collection: Collection::DigestEvents,
                    key: member,
                    value: None,
                });
            }
            output.insert("joined".into(), Value::String(opener));
            record_step(pass, (chain, version), record, &output, true);
            self.end_chain(event, pass, chain, version, ChainEnd::Done, next)?;
            return Ok((Some(ChainRun::Over), output));
        }
        let encoded = serde_json::to_vec(event).expect("an event serialises");
        let size = encoded.len() as u64;
        // A full window is closing (its opener comes back for it): none
        // joins it, the event opens the next.
        let mut open = self
            .open_window(pass.store(), &header_key, account, &chain.name)?
            .filter(|w| !w.full);
        if let Some(current) = &mut open {
            let held = match current.bytes {
                Some(bytes) => bytes,
                None => window_entries(pass.store(), account, current.opener, &chain.name)?
                    .iter()
                    .map(|(_, v)| v.len() as u64)
                    .sum(),
            };
            current.bytes = Some(held);
            if held.saturating_add(size) > MAX_WINDOW_BYTES {
                // The event would take the window past what it may hold:
                // the window closes as it is, and the event opens the next.
                let timer = fill(
                    pass.store(),
                    current,
                    header_key.clone(),
                    account,
                    &chain.name,
                )?;
                self.timers.noted(&timer);
                open = None;
            }
        }
        match open {
            Some(mut open) => {
                let position = open.count;
                let entry = event_write(account, open.opener, &chain.name, position, encoded);
                open.count = open.count.saturating_add(1);
                open.bytes = open.bytes.map(|b| b.saturating_add(size));
                let mut writes = vec![entry];
                let mut opener_timer = None;
                if open.filled() {
                    // Full: its opener comes back now, by a timer of its own
                    // (durable, unlike a publish from here).
                    let timer = opener_back(&mut open, account, &chain.name);
                    writes.push(timer.put());
                    opener_timer = Some(timer);
                }
                writes.push(header_write(header_key, &open));
                writes.push(Write {
                    collection: Collection::DigestEvents,
                    key: member,
                    value: Some(open.opener.to_string().into_bytes()),
                });
                pass.store().write_in_order(&writes)?;
                output.insert("joined".into(), Value::String(open.opener.to_string()));
                output.insert("position".into(), Value::from(position + 1));
                record_step(pass, (chain, version), record, &output, true);
                self.end_chain(event, pass, chain, version, ChainEnd::Done, next)?;
                pass.write(&self.journal)?;
                if let Some(timer) = opener_timer {
                    self.timers.noted(&timer);
                }
                self.metrics.digest_joined();
                tracing::info!(account = %account, event_id = %event.id, chain = chain.name,
                    step, opener = %open.opener, position = position + 1,
                    "event joined a digest window");
                Ok((Some(ChainRun::Over), output))
            }
            None => {
                if window.max_events == 1 || size >= MAX_WINDOW_BYTES {
                    // A window of one closes as it opens (as does one whose
                    // first event alone comes to all a window may hold).
                    output.insert("events".into(), Value::Array(vec![event_value(event)]));
                    output.insert("count".into(), Value::from(1));
                    record_step(pass, (chain, version), record, &output, false);
                    return Ok((None, output));
                }
                let entry = event_write(account, event.id, &chain.name, 0, encoded);
                let open = Window {
                    opener: event.id,
                    until_ms: pause.until_ms,
                    count: 1,
                    max_events: Some(window.max_events),
                    bytes: Some(size),
                    full: false,
                };
                pass.store()
                    .write_in_order(&[entry, header_write(header_key, &open)])?;
                record_step(pass, (chain, version), record, &output, false);
                self.pause(event, chain, pass, pause);
                pass.write(&self.journal)?;
                for timer in pass.written_timers() {
                    self.timers.noted(&timer);
                }
                tracing::info!(account = %account, event_id = %event.id, chain = chain.name,
                    step, key = window.key, "digest window opened");
                Ok((Some(ChainRun::Paused), output))
            }
        }
    }

    /// The window at `header_key` if it is open: its opener is paused on
    /// it. A header left by a crash, or one this replica's copy kept after
    /// its window closed, is taken for none.
    fn open_window(
        &self,
        store: &Store,
        header_key: &[u8],
        account: &AccountKey,
        chain: &str,
    ) -> Result<Option<Window>, Interrupted> {
        let Some(bytes) = store.get(Collection::Digests, header_key)? else {
            return Ok(None);
        };
        let Ok(window) = serde_json::from_slice::<Window>(&bytes) else {
            return Ok(None);
        };
        let record = self
            .journal
            .load(&RecordKey::new(account, &window.opener))?;
        let paused_on_it = record
            .as_ref()
            .and_then(|j| j.chain(chain))
            .is_some_and(|c| c.waiting == Some(window.until_ms) && c.waiting_digest.is_some());
        Ok(paused_on_it.then_some(window))
    }

    /// Looks at `chain` of `event`, paused on the digest window `digest`
    /// it opened (until `until_ms`): if the window closed (its time is up,
    /// or it is full), the run goes on with every event of the window in
    /// the step's output, and the window goes; otherwise it stays paused.
    pub(super) fn close_digest(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        version: u64,
        pass: &mut Pass,
        (until_ms, digest): (u64, &str),
    ) -> Result<Resumed, Interrupted> {
        let account = &event.account_key;
        let record = pass.journal.chain_mut(&chain.name, version);
        let Some(step) = record.steps.last().map(|s| s.trace.name.clone()) else {
            return Ok(Resumed::GoesOn);
        };
        let mut output = record
            .steps
            .last()
            .and_then(|s| s.trace.output.clone())
            .unwrap_or_default();
        let header_key = window_key(account, &chain.name, &step, digest);
        let _locked = self.locks.lock(&header_key);
        let store = pass.store().clone();
        let header = opened_by(&store, &header_key, event.id)?;
        let now = now_ms();
        let timer = PendingTimer {
            account: account.clone(),
            event_id: event.id,
            chain: chain.name.clone(),
            due_ms: until_ms,
        };
        if header.as_ref().is_some_and(|w| !w.full) && now < until_ms {
            // Back early (a duplicate, a clock ahead): still open.
            if until_ms != NEVER {
                pass.set_timer(timer);
            }
            return Ok(Resumed::Paused);
        }
        // Closed: its events in the order they joined, each once (a crash
        // during a join may have written one twice).
        let entries = window_entries(&store, account, event.id, &chain.name)?;
        let mut seen = HashSet::new();
        let members: Vec<VumiApiEvent> = entries
            .iter()
            .filter_map(|(_, v)| serde_json::from_slice::<VumiApiEvent>(v).ok())
            .filter(|e| seen.insert(e.id))
            .collect();
        let events: Vec<Value> = members.iter().map(event_value).collect();
        let count = events.len();
        output.insert("events".into(), Value::Array(events));
        output.insert("count".into(), Value::from(count));
        pass.record(Entry::Woke {
            chain: chain.name.clone(),
            at_ms: now,
            output: Some(output),
        });
        pass.clear_timer(&timer);
        if header.is_some() {
            pass.write_beside(Write {
                collection: Collection::Digests,
                key: header_key,
                value: None,
            });
        }
        for (k, _) in entries {
            pass.write_beside(Write {
                collection: Collection::DigestEvents,
                key: k,
                value: None,
            });
        }
        for member in members.iter().filter(|m| m.id != event.id) {
            // A member whose own journal does not hold its join (a crash
            // kept the window's entry of it but not its mark and journal)
            // comes back: its mark is kept, or written, so that it finds
            // itself gathered here instead of opening another window, and
            // it removes the mark then. The others' marks go.
            let joined = self
                .journal
                .load(&RecordKey::new(account, &member.id))?
                .and_then(|j| j.chain(&chain.name).map(|c| c.end.is_some()))
                .unwrap_or(false);
            pass.write_beside(Write {
                collection: Collection::DigestEvents,
                key: member_key(account, member.id, &chain.name),
                value: (!joined).then(|| event.id.to_string().into_bytes()),
            });
        }
        // The journal (with every event) first, then the window goes.
        pass.write(&self.journal)?;
        tracing::info!(account = %account, event_id = %event.id, chain = chain.name, step,
            key = digest, count, "digest window closed");
        Ok(Resumed::GoesOn)
    }

    /// Removes the digest window `digest` that `event` opened at `step` of
    /// `chain`, as its run stops without the window closing (the chain was
    /// removed): the header, while it is still this opener's, the events
    /// that joined, and their marks. The members' runs ended when they
    /// joined; nothing gathers them now. Written under the window's lock,
    /// so that an event still running the chain as it was (selected before
    /// the removal) either joined before, and goes with the rest, or finds
    /// no window and opens one of its own, which its timer brings back to
    /// the same end. (Written before the run's end: a crash between leaves
    /// the run paused on no window, and the event handled again stops it.)
    pub(super) fn drop_digest(
        &self,
        event: &VumiApiEvent,
        (chain, step, digest): (&str, &str, &str),
        pass: &Pass,
    ) -> Result<(), Interrupted> {
        let account = &event.account_key;
        let header_key = window_key(account, chain, step, digest);
        let _locked = self.locks.lock(&header_key);
        let store = pass.store();
        let removal = |collection, key| Write {
            collection,
            key,
            value: None,
        };
        let mut writes = Vec::new();
        let mut members = 0;
        for (k, v) in window_entries(store, account, event.id, chain)? {
            if let Ok(member) = serde_json::from_slice::<VumiApiEvent>(&v)
                && member.id != event.id
            {
                members += 1;
                let mark = member_key(account, member.id, chain);
                writes.push(removal(Collection::DigestEvents, mark));
            }
            writes.push(removal(Collection::DigestEvents, k));
        }
        if opened_by(store, &header_key, event.id)?.is_some() {
            writes.push(removal(Collection::Digests, header_key));
        }
        store.write_in_order(&writes)?;
        tracing::info!(account = %account, event_id = %event.id, chain, step, key = digest,
            members, "the chain of an open digest window was removed: the window goes, ungathered");
        Ok(())
    }
}

/// Records the digest step of `chain` (under `version`) as finished with
/// `output`; `stops` when the chain ends there (the event joined a window).
fn record_step(
    pass: &mut Pass,
    (chain, version): (&ChainSpec, u64),
    mut record: StepRecord,
    output: &Map<String, Value>,
    stops: bool,
) {
    record.trace.output = Some(output.clone());
    if stops {
        record.trace.outcome = StepOutcome::Stopped;
    }
    pass.record(Entry::Step {
        chain: chain.name.clone(),
        version,
        record: Box::new(record),
    });
}

/// An event as a window's output holds it.
fn event_value(event: &VumiApiEvent) -> Value {
    serde_json::to_value(event).unwrap_or(Value::Null)
}
