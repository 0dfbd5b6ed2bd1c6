//! Flow control of a chain's runs, per key: `rate_limit` skips runs over
//! its limit, `debounce` lets only the last event of a burst run,
//! `throttle` makes runs over its limit wait their turn, `concurrency`
//! keeps at most so many runs going at once.
//!
//! Each control keeps a small state per (chain, control, key) in
//! [`Collection::Flow`], partition-owned like the journal: only the owner
//! of the account's partition decides, and a lock per key makes reading
//! and writing the state one step. A control decides before the chain's
//! first step and records what it decided in the journal (`Entry::Flow`);
//! a run held back is a pause (`Entry::Wait` with the control), brought
//! back by its timer (its turn, the end of the quiet period) or, for
//! `concurrency`, by a timer the run that frees a slot sets for it.
//!
//! Decisions are written before the run's journal, keyed by the event, so
//! a crash and a redelivery find them: a run let go stays let go, a turn
//! given stays its turn. Only a crash between a run's end and its end
//! being durable can let one more run than `concurrency` allows: the slot
//! is given back when the end is recorded, and the run goes on again from
//! its last durable step.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_handlers::{EventValue, NEVER};
use switchboard_rules::{ChainSpec, ChainStore, Control};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::{Collection, Store, Write, key};

use super::pass::Pass;
use super::paused::Resumed;
use super::{Executor, Interrupted};
use crate::dead_letters::{DeadLetter, DeadReason};
use crate::journal::{ChainEnd, Entry, FlowRecord, FlowResult, RecordKey, now_ms};
use crate::timers::PendingTimer;

/// What a chain's flow controls made of a run.
pub(super) enum Gate {
    /// Every control let it go: it runs.
    Goes,
    /// One holds it back: it is paused.
    Held,
    /// One ended it (skipped, superseded, or its key failed to render).
    Ended,
}

/// One control's state for one key.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FlowState {
    /// `rate_limit`: the runs let go within the period; `throttle`: the
    /// last turns given. Each with the event it is for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    turns: Vec<(u64, EventId)>,
    /// `debounce`: the latest event of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latest: Option<EventId>,
    /// `concurrency`: the runs holding a slot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    holders: Vec<EventId>,
    /// `concurrency`: the runs waiting for one, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    queue: Vec<EventId>,
}

impl FlowState {
    fn is_empty(&self) -> bool {
        self.turns.is_empty()
            && self.latest.is_none()
            && self.holders.is_empty()
            && self.queue.is_empty()
    }

    /// Whether the state decides nothing at `now` under a control whose
    /// `period` is this (`None`: the chain or its control is gone): only
    /// turns are kept, and all of them are a period old, so a decision
    /// would drop them (`rate_limit`) or give the next turn at once
    /// (`throttle`), as with no state. With the control gone, turns still
    /// to come (held runs wait for them, and the control may come back
    /// before) keep it.
    fn is_quiet(&self, now: u64, period: Option<u64>) -> bool {
        let period = period.unwrap_or(0);
        self.latest.is_none()
            && self.holders.is_empty()
            && self.queue.is_empty()
            && self
                .turns
                .iter()
                .all(|(t, _)| t.saturating_add(period) <= now)
    }
}

/// The period of a chain's control as the account's chains have it now:
/// `(account, chain, control)`; `None` when the chain or the control is
/// gone.
pub type PeriodOf<'a> = dyn Fn(&AccountKey, &str, Control) -> Option<Duration> + 'a;

/// Removes the `rate_limit` and `throttle` states that decide nothing any
/// more ([`FlowState::is_quiet`] at `now`, under the period `period_of`
/// gives: the chains as they are now, as decisions read them) among those
/// this replica writes, so that keys seen once (a key per recipient, say)
/// and keys of removed chains do not stay for good. A state a decision
/// changed since it was read stays (the removal is a compare-and-swap).
/// Returns how many went.
pub fn expire(
    store: &Store,
    now: u64,
    period_of: &PeriodOf<'_>,
) -> Result<usize, switchboard_store::StoreError> {
    let mut removed = 0;
    store.scan_pages(Collection::Flow, 1024, |batch| {
        for (k, v) in batch {
            if !store.writes_locally(Collection::Flow, &k) {
                continue;
            }
            let Some((account, chain, control)) = parse_state_key(&k) else {
                continue;
            };
            let period = period_of(&account, chain, control).map(|p| p.as_millis() as u64);
            let quiet =
                serde_json::from_slice::<FlowState>(&v).is_ok_and(|s| s.is_quiet(now, period));
            if quiet && store.compare_and_swap(Collection::Flow, &k, Some(&v), None)? {
                removed += 1;
            }
        }
        Ok::<_, switchboard_store::StoreError>(())
    })?;
    Ok(removed)
}

/// [`expire`] under the chains `chains` holds now.
pub fn expire_under(
    store: &Store,
    now: u64,
    chains: &ChainStore,
) -> Result<usize, switchboard_store::StoreError> {
    expire(store, now, &|account, chain, control| {
        let held = chains.lookup(account)?;
        let spec = held.chains().iter().find(|c| c.name == chain)?;
        match control {
            Control::RateLimit => spec.rate_limit().map(|l| l.period),
            Control::Throttle => spec.throttle().map(|l| l.period),
            Control::Debounce => spec.debounce().map(|d| d.period),
            // Its state holds runs, never turns alone.
            Control::Concurrency => None,
        }
    })
}

/// The account, chain and control of a state's key ([`state_key`]).
fn parse_state_key(k: &[u8]) -> Option<(AccountKey, &str, Control)> {
    let mut parts = k.splitn(4, |b| *b == 0);
    let account = AccountKey::new(std::str::from_utf8(parts.next()?).ok()?).ok()?;
    let chain = std::str::from_utf8(parts.next()?).ok()?;
    let control = std::str::from_utf8(parts.next()?).ok()?;
    parts.next()?;
    let control = Control::ALL.into_iter().find(|c| c.as_str() == control)?;
    Some((account, chain, control))
}

/// The state's key.
fn state_key(account: &AccountKey, chain: &str, control: Control, k: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        chain.as_bytes(),
        control.as_str().as_bytes(),
        k.as_bytes(),
    ])
}

fn load(store: &Store, at: &[u8]) -> Result<FlowState, Interrupted> {
    Ok(store
        .get(Collection::Flow, at)?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default())
}

fn state_write(at: Vec<u8>, state: &FlowState) -> Write {
    Write {
        collection: Collection::Flow,
        key: at,
        value: (!state.is_empty())
            .then(|| serde_json::to_vec(state).expect("a flow state serialises")),
    }
}

/// How an ended run shows in the events' listing.
pub fn ended_as(control: Control) -> &'static str {
    match control {
        Control::RateLimit => "rate_limited",
        Control::Debounce => "debounced",
        Control::Throttle => "throttled",
        Control::Concurrency => "queued",
    }
}

/// Which of a chain's flow controls decide about a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Controls {
    /// Every one: the run has not started.
    All,
    /// Only `concurrency`: a replayed run, which gave its slot back when it
    /// ended in dead letters (the others let it go once, and still do).
    Concurrency,
}

impl Executor {
    /// Applies `chain`'s flow `controls` to the run of `event` before its
    /// first step (or its replay's), each it has not passed yet, in order.
    pub(super) async fn flow_gate(
        &self,
        event: &VumiApiEvent,
        event_value: &EventValue,
        chain: &ChainSpec,
        version: u64,
        pass: &mut Pass,
        controls: Controls,
    ) -> Result<Gate, Interrupted> {
        for control in chain.controls() {
            if controls == Controls::Concurrency && control != Control::Concurrency {
                continue;
            }
            if pass.journal.chain_mut(&chain.name, version).passed(control) {
                continue;
            }
            let k = match self.flow_key(event, event_value, chain, control) {
                Ok(k) => k,
                // A replay's run took its slot under a key that rendered
                // then: one that fails now (its chain changed) lets the
                // replay go on without a slot rather than strand it.
                Err(error) if controls == Controls::Concurrency => {
                    tracing::warn!(account = %event.account_key, event_id = %event.id,
                        chain = chain.name, %error,
                        "a replayed run's concurrency key failed to render: it goes on without a slot");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(account = %event.account_key, event_id = %event.id,
                        chain = chain.name, %error, "flow control key failed: filed in dead letters");
                    let field = format!("{}.key", control.as_str());
                    let mut letter = DeadLetter::for_event(
                        event,
                        DeadReason::StepFailed,
                        Some(&chain.name),
                        Some(&field),
                        error.clone(),
                    );
                    letter.attempts = 1;
                    self.file_dead_letter(&letter).await?;
                    pass.record(Entry::Condition {
                        chain: chain.name.clone(),
                        version,
                        error,
                    });
                    return Ok(Gate::Ended);
                }
            };
            match self.decide(event, chain, version, control, k, pass)? {
                Gate::Goes => {}
                other => return Ok(other),
            }
        }
        Ok(Gate::Goes)
    }

    /// The key of `control` for `event`, rendered.
    fn flow_key(
        &self,
        event: &VumiApiEvent,
        event_value: &EventValue,
        chain: &ChainSpec,
        control: Control,
    ) -> Result<String, String> {
        let field = format!("{}.key", control.as_str());
        let template = chain.flow_key(control).unwrap_or_default();
        let templates = self.registry.templates();
        let scope = templates.scope(event_value, &Map::new(), &event.account_key);
        let k = match templates.render(&Value::String(template.to_string()), &field, &scope)? {
            Value::String(s) => s.trim().to_string(),
            other => other.to_string(),
        };
        if k.is_empty() {
            return Err(format!(
                "{field}: {template:?} rendered empty: every run needs a key (check the \
                 template's fields)"
            ));
        }
        if k.contains('\0') || k.len() > 512 {
            return Err(format!(
                "{field}: a key is at most 512 bytes, without NUL characters"
            ));
        }
        Ok(k)
    }

    /// One control's decision about the run, with the key `k`.
    fn decide(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        version: u64,
        control: Control,
        k: String,
        pass: &mut Pass,
    ) -> Result<Gate, Interrupted> {
        let account = &event.account_key;
        let at = state_key(account, &chain.name, control, &k);
        let _locked = self.locks.lock(&at);
        let store = pass.store().clone();
        let mut state = load(&store, &at)?;
        let now = now_ms();
        let id = event.id;
        let record = |result, at_ms| FlowRecord {
            control,
            result,
            key: k.clone(),
            at_ms,
            by: None,
        };
        // (result, when; for a hold, until when) and whether the state changed.
        let (result, at_ms) = match control {
            Control::RateLimit => {
                let rule = chain.rate_limit().expect("the chain's rate_limit");
                let period = rule.period.as_millis() as u64;
                state.turns.retain(|(t, _)| t.saturating_add(period) > now);
                if state.turns.iter().any(|(_, e)| *e == id) {
                    (FlowResult::Passed, now)
                } else if state.turns.len() < rule.limit as usize {
                    state.turns.push((now, id));
                    (FlowResult::Passed, now)
                } else {
                    (FlowResult::Skipped, now)
                }
            }
            Control::Throttle => {
                let rule = chain.throttle().expect("the chain's throttle");
                let period = rule.period.as_millis() as u64;
                let turn = match state.turns.iter().find(|(_, e)| *e == id) {
                    Some((t, _)) => *t,
                    None => {
                        let limit = rule.limit as usize;
                        let turn = match state.turns.len() {
                            n if n < limit => now,
                            n => now.max(state.turns[n - limit].0.saturating_add(period)),
                        };
                        state.turns.push((turn, id));
                        // The last `limit` turns decide the next.
                        let excess = state.turns.len().saturating_sub(limit);
                        state.turns.drain(..excess);
                        turn
                    }
                };
                if turn <= now {
                    (FlowResult::Passed, turn)
                } else {
                    (FlowResult::Held, turn)
                }
            }
            Control::Debounce => {
                let rule = chain.debounce().expect("the chain's debounce");
                state.latest = Some(id);
                (
                    FlowResult::Held,
                    now.saturating_add(rule.period.as_millis() as u64),
                )
            }
            Control::Concurrency => {
                let rule = chain.concurrency_rule().expect("the chain's concurrency");
                if state.holders.contains(&id) {
                    (FlowResult::Passed, now)
                } else if state.holders.len() < rule.limit as usize {
                    state.queue.retain(|e| *e != id);
                    state.holders.push(id);
                    (FlowResult::Passed, now)
                } else {
                    if !state.queue.contains(&id) {
                        state.queue.push(id);
                    }
                    (FlowResult::Held, NEVER)
                }
            }
        };
        // The decision is the state's before it is the journal's.
        store.write_in_order(&[state_write(at, &state)])?;
        pass.record(Entry::Flow {
            chain: chain.name.clone(),
            version,
            record: record(result, at_ms),
        });
        match result {
            FlowResult::Passed => Ok(Gate::Goes),
            FlowResult::Skipped | FlowResult::Superseded => {
                self.metrics.flow(control, result);
                tracing::info!(account = %account, event_id = %id, chain = chain.name,
                    control = control.as_str(), key = k, "run skipped by its flow control");
                self.end_chain(
                    event,
                    pass,
                    chain,
                    version,
                    ChainEnd::Limited { control },
                    0,
                )?;
                Ok(Gate::Ended)
            }
            FlowResult::Held => {
                self.metrics.flow(control, result);
                pass.record(Entry::Wait {
                    chain: chain.name.clone(),
                    until_ms: at_ms,
                    for_event: None,
                    again: false,
                    digest: None,
                    flow: Some(control),
                    reached_by: Vec::new(),
                });
                if at_ms != NEVER {
                    pass.set_timer(PendingTimer {
                        account: account.clone(),
                        event_id: id,
                        chain: chain.name.clone(),
                        due_ms: at_ms,
                    });
                }
                // Written under the lock: the run that frees a slot finds
                // this one paused, and its timer brings it back.
                pass.write(&self.journal)?;
                Ok(Gate::Held)
            }
        }
    }

    /// Looks at `chain` of `event`, held back by `control` until
    /// `until_ms`: lets it go when its turn came (a `throttle`), when its
    /// key was quiet and it is the latest (a `debounce`: a later event
    /// supersedes it) or when it holds a slot (`concurrency`).
    pub(super) fn flow_resume(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        version: u64,
        pass: &mut Pass,
        (until_ms, control): (u64, Control),
    ) -> Result<Resumed, Interrupted> {
        let account = &event.account_key;
        let id = event.id;
        let now = now_ms();
        let timer = PendingTimer {
            account: account.clone(),
            event_id: id,
            chain: chain.name.clone(),
            due_ms: until_ms,
        };
        let k = pass
            .journal
            .chain_mut(&chain.name, version)
            .flow_of(control)
            .map(|f| f.key.clone())
            .unwrap_or_default();
        let at = state_key(account, &chain.name, control, &k);
        let woke = Entry::Woke {
            chain: chain.name.clone(),
            at_ms: now,
            output: None,
        };
        let flow = |result, at_ms, by| Entry::Flow {
            chain: chain.name.clone(),
            version,
            record: FlowRecord {
                control,
                result,
                key: k.clone(),
                at_ms,
                by,
            },
        };
        match control {
            Control::Throttle | Control::Debounce | Control::RateLimit if now < until_ms => {
                // Back early (a duplicate, a clock ahead): still held.
                pass.set_timer(timer);
                Ok(Resumed::Paused)
            }
            Control::Throttle | Control::RateLimit => {
                pass.record(woke);
                // Let go at its turn (however late its timer).
                pass.record(flow(FlowResult::Passed, until_ms, None));
                pass.clear_timer(&timer);
                Ok(Resumed::GoesOn)
            }
            Control::Debounce => {
                let _locked = self.locks.lock(&at);
                let store = pass.store().clone();
                let mut state = load(&store, &at)?;
                pass.record(woke);
                pass.clear_timer(&timer);
                if state.latest == Some(id) {
                    // Cleared now, under the lock: a later event of the key
                    // (another conversation's, on another worker) may be
                    // about to set itself the latest.
                    state.latest = None;
                    store.write_in_order(&[state_write(at, &state)])?;
                    pass.record(flow(FlowResult::Passed, now, None));
                    return Ok(Resumed::GoesOn);
                }
                // A later event of the key came within the period: it runs
                // instead.
                pass.record(flow(FlowResult::Superseded, now, state.latest));
                self.metrics.flow(control, FlowResult::Superseded);
                self.end_chain(
                    event,
                    pass,
                    chain,
                    version,
                    ChainEnd::Limited { control },
                    0,
                )?;
                Ok(Resumed::Cancelled)
            }
            Control::Concurrency => {
                let _locked = self.locks.lock(&at);
                let state = load(pass.store(), &at)?;
                if !state.holders.contains(&id) {
                    // Not its turn yet (back by a duplicate).
                    return Ok(Resumed::Paused);
                }
                pass.record(woke);
                pass.record(flow(FlowResult::Passed, now, None));
                Ok(Resumed::GoesOn)
            }
        }
    }

    /// The `concurrency` slot `chain` of `event` holds, if its run ended
    /// having taken one: its state's key (from the journal's decision, so
    /// it is found whatever the chain says now).
    pub(super) fn slot_to_release(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        pass: &Pass,
    ) -> Option<Slot> {
        let limit = chain
            .concurrency_rule()
            .map_or(usize::MAX, |r| r.limit as usize);
        slot_of(event, &chain.name, pass).map(|at| (chain.name.clone(), limit, at))
    }
}

/// A `concurrency` slot to give back: the chain, how many runs it lets go
/// at once now, and the state's key.
pub(super) type Slot = (String, usize, Vec<u8>);

/// The key of the `concurrency` slot `event`'s run of `chain` may hold, if
/// it ended under one (from the journal's decision, so it is found whatever
/// the chain says now). A run that waited for the slot may hold it though
/// its record still says `held`: given the slot, it ended (its chain
/// removed) before it went on; [`Executor::release_slot`] gives back only
/// what the run holds.
pub(super) fn slot_of(event: &VumiApiEvent, chain: &str, pass: &Pass) -> Option<Vec<u8>> {
    let record = pass.journal.chain(chain)?;
    let slot = record
        .flow_of(Control::Concurrency)
        .filter(|_| record.end.is_some())?;
    Some(state_key(
        &event.account_key,
        chain,
        Control::Concurrency,
        &slot.key,
    ))
}

impl Executor {
    /// Gives back, writing to `store` (the event's, under its term), the
    /// slot at `at` that `event`'s run of `chain` held, once its end is
    /// written, to the runs waiting longest (whose timers, due
    /// at once, bring them back): as many as the chain's `concurrency`
    /// lets go now (all of them if it has none any more). A waiting run
    /// that no longer waits (it ended meanwhile) is passed over.
    pub(super) fn release_slots(
        &self,
        store: &Store,
        event: &VumiApiEvent,
        slots: Vec<Slot>,
    ) -> Result<(), Interrupted> {
        for slot in slots {
            self.release_slot(store, event, slot)?;
        }
        Ok(())
    }

    fn release_slot(
        &self,
        store: &Store,
        event: &VumiApiEvent,
        (chain, limit, at): Slot,
    ) -> Result<(), Interrupted> {
        let chain = chain.as_str();
        let account = &event.account_key;
        let _locked = self.locks.lock(&at);
        let mut state = load(store, &at)?;
        if !state.holders.contains(&event.id) {
            // A run that ended while it waited leaves the queue.
            if state.queue.contains(&event.id) {
                state.queue.retain(|e| *e != event.id);
                store.write_in_order(&[state_write(at, &state)])?;
            }
            return Ok(());
        }
        state.holders.retain(|e| *e != event.id);
        let mut writes = Vec::new();
        let mut timers = Vec::new();
        while state.holders.len() < limit && !state.queue.is_empty() {
            let next = state.queue.remove(0);
            let waits = self
                .journal
                .load(&RecordKey::new(account, &next))?
                .and_then(|j| j.chain(chain).map(|c| c.waiting_flow))
                == Some(Some(Control::Concurrency));
            if !waits {
                continue;
            }
            state.holders.push(next);
            let timer = PendingTimer {
                account: account.clone(),
                event_id: next,
                chain: chain.to_string(),
                due_ms: now_ms(),
            };
            writes.push(timer.put());
            timers.push(timer);
        }
        // The new holders' timers before the slot is given: a crash between
        // leaves this run a holder, and its event, handled again, gives
        // the slot again.
        writes.push(state_write(at, &state));
        store.write_in_order(&writes)?;
        for timer in &timers {
            self.timers.noted(timer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> EventId {
        EventId::from(uuid::Uuid::from_u128(n))
    }

    fn acme() -> AccountKey {
        AccountKey::new("acme").unwrap()
    }

    fn put(store: &Store, (chain, control, k): (&str, Control, &str), state: &FlowState) {
        let at = state_key(&acme(), chain, control, k);
        store.write_in_order(&[state_write(at, state)]).unwrap();
    }

    fn keys_left(store: &Store) -> Vec<String> {
        store
            .scan_prefix(Collection::Flow, b"acme\0")
            .unwrap()
            .into_iter()
            .map(|(k, _)| {
                let (_, chain, control) = parse_state_key(&k).unwrap();
                let key = String::from_utf8_lossy(&k)
                    .rsplit('\0')
                    .next()
                    .unwrap()
                    .to_string();
                format!("{chain}/{}/{key}", control.as_str())
            })
            .collect()
    }

    fn turns(at: &[u64]) -> FlowState {
        FlowState {
            turns: at.iter().map(|t| (*t, id(u128::from(*t)))).collect(),
            ..FlowState::default()
        }
    }

    #[test]
    fn turns_go_quiet_a_period_after_the_last() {
        let state = turns(&[1_000, 5_000, 3_000]);
        assert!(!state.is_quiet(64_999, Some(60_000)));
        assert!(state.is_quiet(65_000, Some(60_000)));
        // The chain or its control gone: nothing reads the turns given,
        // but one still to come holds (its run waits for it).
        assert!(state.is_quiet(5_000, None));
        assert!(!state.is_quiet(4_999, None));
        let held = FlowState {
            latest: Some(id(1)),
            ..turns(&[1])
        };
        assert!(!held.is_quiet(u64::MAX, None));
    }

    #[test]
    fn a_states_key_names_its_chain_and_control() {
        let k = state_key(&acme(), "daily", Control::Throttle, "+27 82\0x");
        let (account, chain, control) = parse_state_key(&k).unwrap();
        assert_eq!(
            (account.as_str(), chain, control),
            ("acme", "daily", Control::Throttle)
        );
        assert!(parse_state_key(b"acme\0daily\0nope\0k").is_none());
        assert!(parse_state_key(b"acme\0daily\0throttle").is_none());
    }

    #[test]
    fn only_states_that_decide_nothing_under_the_chains_as_they_are_now_are_removed() {
        let store = Store::temporary().unwrap();
        let now = 100_000;
        put(
            &store,
            ("c", Control::RateLimit, "quiet"),
            &turns(&[now - 10_000]),
        );
        put(
            &store,
            ("c", Control::RateLimit, "recent"),
            &turns(&[now - 9_999]),
        );
        // Its chain has a longer period now than when the turn was given.
        put(
            &store,
            ("c", Control::Throttle, "longer"),
            &turns(&[now - 20_000]),
        );
        // A removed chain's turns decide nothing, but a turn to come is a
        // held run's.
        put(&store, ("gone", Control::RateLimit, "k"), &turns(&[now]));
        put(
            &store,
            ("gone", Control::Throttle, "later"),
            &turns(&[now + 1]),
        );
        // A debounce's latest and a concurrency's slots are the runs'
        // own: they go when those runs do.
        let latest = FlowState {
            latest: Some(id(5)),
            ..FlowState::default()
        };
        put(&store, ("gone", Control::Debounce, "latest"), &latest);
        let slots = FlowState {
            holders: vec![id(6)],
            queue: vec![id(7)],
            ..FlowState::default()
        };
        put(&store, ("gone", Control::Concurrency, "slots"), &slots);
        let period_of = |account: &AccountKey, chain: &str, control: Control| {
            assert_eq!(account.as_str(), "acme");
            match (chain, control) {
                ("c", Control::RateLimit) => Some(Duration::from_secs(10)),
                ("c", Control::Throttle) => Some(Duration::from_secs(60)),
                _ => None,
            }
        };
        assert_eq!(expire(&store, now, &period_of).unwrap(), 2);
        assert_eq!(
            keys_left(&store),
            [
                "c/rate_limit/recent",
                "c/throttle/longer",
                "gone/concurrency/slots",
                "gone/debounce/latest",
                "gone/throttle/later"
            ]
        );
        assert_eq!(expire(&store, now, &period_of).unwrap(), 0);
        assert_eq!(expire(&store, now + 40_000, &period_of).unwrap(), 3);
        assert_eq!(
            keys_left(&store),
            ["gone/concurrency/slots", "gone/debounce/latest"]
        );
    }
}
