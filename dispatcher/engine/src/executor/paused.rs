//! Paused runs: how a chain pauses (a `delay`, a `wait_for_event`), how a
//! later event reaches it (the chain's `cancel_on`, the awaited event), and
//! how it goes on.
//!
//! A pause is recorded in the event's journal (`Entry::Wait`) with, in the
//! same write, its timer and a *waiter* per way a later event may reach it
//! (`{account}\0{event type}\0{paused event id}\0{chain}\0{kind}` in
//! [`Collection::Waiters`], holding the match's condition). The entry keeps
//! the waiters too: the journal is written first, so a crash between the
//! writes can lose them, and the event, delivered again and finding its run
//! still paused, writes them again. An arriving
//! event of a type some chain of its account awaits
//! ([`AccountChains::awaits`]) reads the waiters of its type; for each
//! whose condition holds it writes a *signal* (the arriving event, in
//! [`Collection::Signals`]), makes it durable, and puts the paused event
//! back on the bus. Only the paused event's own pass changes its record: it
//! takes the first signal (cancelled, or the awaited event came), or, with
//! none, goes on once its pause has ended, and removes the timer, waiters
//! and signals. So two events reaching the same run at once, or an event
//! and the timer, never write the record together: the run's own worker
//! decides, one pass at a time.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_handlers::{NEVER, Pause};
use switchboard_rules::{AccountChains, ChainSpec};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::{Collection, Write, key};

use super::pass::Pass;
use super::{Executor, Interrupted, policy};
use crate::journal::{ChainEnd, ChainJournal, Entry, Reach, Reachable, RecordKey, now_ms};
use crate::timers::PendingTimer;

/// A waiter's key.
fn waiter_key(
    account: &AccountKey,
    event_type: &str,
    paused: EventId,
    chain: &str,
    kind: Reach,
) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        event_type.as_bytes(),
        paused.to_string().as_bytes(),
        chain.as_bytes(),
        kind.as_str().as_bytes(),
    ])
}

/// A waiter key's paused event id, chain and kind (after the account and
/// event type).
fn parse_waiter(k: &[u8]) -> Option<(EventId, String, Reach)> {
    let text = std::str::from_utf8(k).ok()?;
    let mut parts = text.split('\0').skip(2);
    let id = EventId::parse(parts.next()?).ok()?;
    let chain = parts.next()?.to_string();
    let kind = match parts.next()? {
        "cancel" => Reach::Cancel,
        "resume" => Reach::Resume,
        _ => return None,
    };
    Some((id, chain, kind))
}

/// A waiter's value.
#[derive(Debug, Serialize, Deserialize)]
struct Waiting {
    /// The Rhai condition over `event`, `paused` and `steps`.
    condition: String,
    /// The end of the pause it belongs to: a waiter or signal left from an
    /// earlier pause of the same run reaches nothing.
    #[serde(default)]
    until_ms: u64,
    /// When the pause began (ms since the epoch; 0 in waiters written
    /// before it was kept). An event taken up before then came earlier on
    /// the bus: when it is handled again (its own pause ends, a retry, a
    /// redelivery), it does not reach this pause.
    #[serde(default)]
    since_ms: u64,
}

/// The write of `waiter` of the run of `chain` of event `paused`, paused
/// until `until_ms`.
fn waiter_write(
    account: &AccountKey,
    paused: EventId,
    chain: &str,
    until_ms: u64,
    waiter: &Reachable,
) -> Write {
    let waiting = Waiting {
        condition: waiter.condition.clone(),
        until_ms,
        since_ms: waiter.since_ms,
    };
    Write {
        collection: Collection::Waiters,
        key: waiter_key(account, &waiter.event_type, paused, chain, waiter.kind),
        value: Some(serde_json::to_vec(&waiting).expect("a waiter serialises")),
    }
}

/// Removes, with the pass's next write, what a pause left beside the
/// journal: `timer`, the waiters of the run (by kind and event type) and
/// its signals (by key).
fn clear_pause(
    pass: &mut Pass,
    timer: &PendingTimer,
    waiters: impl IntoIterator<Item = (Reach, String)>,
    signals: impl IntoIterator<Item = Vec<u8>>,
) {
    pass.clear_timer(timer);
    for (kind, event_type) in waiters {
        pass.write_beside(Write {
            collection: Collection::Waiters,
            key: waiter_key(
                &timer.account,
                &event_type,
                timer.event_id,
                &timer.chain,
                kind,
            ),
            value: None,
        });
    }
    for key in signals {
        pass.write_beside(Write {
            collection: Collection::Signals,
            key,
            value: None,
        });
    }
}

/// The prefix of the signals for `chain` of the paused event `paused`.
fn signal_prefix(account: &AccountKey, paused: EventId, chain: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        paused.to_string().as_bytes(),
        chain.as_bytes(),
        b"",
    ])
}

/// A signal's value: what the arriving event does, and the event.
#[derive(Debug, Serialize, Deserialize)]
struct Signal {
    kind: Reach,
    event: VumiApiEvent,
    /// The end of the pause it reached ([`Waiting::until_ms`]).
    #[serde(default)]
    until_ms: u64,
}

/// Where a paused chain stands after a pass looked at it.
pub(super) enum Resumed {
    /// Still paused (its timer set again).
    Paused,
    /// A later event cancelled it: it ended.
    Cancelled,
    /// Its pause ended: it goes on at the next step.
    GoesOn,
}

/// The outputs of a chain's finished steps, by name.
pub(super) fn outputs_of(record: &ChainJournal) -> Map<String, Value> {
    record
        .steps
        .iter()
        .filter_map(|r| {
            let output = r.trace.output.clone()?;
            Some((r.trace.name.clone(), Value::Object(output)))
        })
        .collect()
}

impl Executor {
    /// Pauses `chain` of `event` after its last finished step, as `pause`
    /// says: the journal's `Wait`, the timer, and a waiter per way a later
    /// event may reach the run, all with the pass's next write.
    pub(super) fn pause(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        pass: &mut Pass,
        pause: Pause,
    ) {
        // A digest window is not cancelled: it holds other events' runs.
        let cancel_on = chain.cancel_on().filter(|_| pause.window.is_none());
        let since_ms = now_ms();
        let reached_by: Vec<Reachable> = pause
            .awaits
            .as_ref()
            .map(|a| (Reach::Resume, a.event_type.clone(), a.condition.clone()))
            .into_iter()
            .chain(cancel_on.map(|c| {
                (
                    Reach::Cancel,
                    c.event_type.to_string(),
                    c.condition().to_string(),
                )
            }))
            .map(|(kind, event_type, condition)| Reachable {
                kind,
                event_type,
                condition,
                since_ms,
            })
            .collect();
        for waiter in &reached_by {
            pass.write_beside(waiter_write(
                &event.account_key,
                event.id,
                &chain.name,
                pause.until_ms,
                waiter,
            ));
        }
        pass.record(Entry::Wait {
            chain: chain.name.clone(),
            until_ms: pause.until_ms,
            for_event: pause.awaits.map(|a| a.event_type),
            again: pause.again,
            digest: pause.window.map(|w| w.key),
            flow: None,
            reached_by,
        });
        if pause.until_ms != NEVER {
            pass.set_timer(PendingTimer {
                account: event.account_key.clone(),
                event_id: event.id,
                chain: chain.name.clone(),
                due_ms: pause.until_ms,
            });
        }
    }

    /// Looks at `chain` of `event`, paused until `until_ms` (waiting for an
    /// event of type `waiting_for`, if any): cancels it or ends its pause if
    /// a later event reached it, ends the pause if it is over, or leaves it
    /// paused. Once it no longer is, its timer, waiters and signals go with
    /// the pass's next write.
    pub(super) fn resume(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        version: u64,
        pass: &mut Pass,
        (until_ms, waiting_for): (u64, Option<String>),
    ) -> Result<Resumed, Interrupted> {
        let account = &event.account_key;
        let timer = PendingTimer {
            account: account.clone(),
            event_id: event.id,
            chain: chain.name.clone(),
            due_ms: until_ms,
        };
        let signals = pass.store().scan_prefix(
            Collection::Signals,
            &signal_prefix(account, event.id, &chain.name),
        )?;
        // Only this pause's signals: one left from an earlier pause of the
        // run (written as it went on) reaches nothing.
        let first = signals
            .iter()
            .filter_map(|(_, v)| serde_json::from_slice::<Signal>(v).ok())
            .find(|s| {
                s.until_ms == until_ms
                    && (s.kind == Reach::Cancel
                        || waiting_for.as_deref() == Some(s.event.event_type.as_str()))
            });
        let now = now_ms();
        let reached_by = pass
            .journal
            .chain_mut(&chain.name, version)
            .waiting_reached_by
            .clone();
        if first.is_none() && now < until_ms {
            // Back early (a duplicate, a redelivery after a crash, a timer
            // fired by a replica whose clock is ahead): still paused. Its
            // waiters are written again (as they were) and its timer set
            // again, in case it was the timer that fired or a crash took
            // them between the pause's journal write and theirs.
            for waiter in &reached_by {
                pass.write_beside(waiter_write(
                    account,
                    event.id,
                    &chain.name,
                    until_ms,
                    waiter,
                ));
            }
            if until_ms != NEVER {
                pass.set_timer(timer);
            }
            return Ok(Resumed::Paused);
        }
        let record = pass.journal.chain_mut(&chain.name, version);
        let finished = record.steps.len();
        let mut output = record
            .steps
            .last()
            .and_then(|s| s.trace.output.clone())
            .unwrap_or_default();
        // A step paused to run again (a scheduled send) holds something for
        // that run, by the handler that ran it (the chain may have changed
        // since): given back if the run will not come.
        let held = record
            .waiting_again
            .then(|| record.steps.last())
            .flatten()
            .and_then(|s| self.registry.get(&s.trace.handler));
        let expired = policy::expired_before_step(event.expires_at, switchboard_sdk::now());
        if let Some(handler) = held.as_ref().filter(|_| first.is_none() && expired) {
            handler.cancel_paused(
                account,
                &output,
                "the event expired (its expires_at passed)",
            )?;
        }
        let resumed = match first {
            Some(Signal {
                kind: Reach::Cancel,
                event: by,
                ..
            }) => {
                tracing::info!(account = %account, event_id = %event.id, chain = chain.name,
                    by = %by.id, "paused chain cancelled");
                if let Some(handler) = &held {
                    let cause = format!("cancelled by event {} (cancel_on)", by.id);
                    handler.cancel_paused(account, &output, &cause)?;
                }
                self.end_chain(
                    event,
                    pass,
                    chain,
                    version,
                    ChainEnd::Cancelled { by: by.id },
                    finished,
                )?;
                Resumed::Cancelled
            }
            Some(Signal {
                kind: Reach::Resume,
                event: came,
                ..
            }) => {
                output.insert("matched".into(), Value::Bool(true));
                output.insert("timed_out".into(), Value::Bool(false));
                output.insert(
                    "event".into(),
                    serde_json::to_value(&came).unwrap_or(Value::Null),
                );
                pass.record(Entry::Woke {
                    chain: chain.name.clone(),
                    at_ms: now,
                    output: Some(output),
                });
                Resumed::GoesOn
            }
            None => {
                let output = waiting_for.is_some().then(|| {
                    output.insert("matched".into(), Value::Bool(false));
                    output.insert("timed_out".into(), Value::Bool(true));
                    output.insert("event".into(), Value::Null);
                    output
                });
                pass.record(Entry::Woke {
                    chain: chain.name.clone(),
                    at_ms: now,
                    output,
                });
                Resumed::GoesOn
            }
        };
        // The waiters as the pause wrote them; a pause recorded before they
        // were kept in its entry has them as its chain would now.
        let waiters: Vec<(Reach, String)> = if reached_by.is_empty() {
            let cancel_on = chain
                .cancel_on()
                .map(|c| (Reach::Cancel, c.event_type.to_string()));
            waiting_for
                .map(|t| (Reach::Resume, t))
                .into_iter()
                .chain(cancel_on)
                .collect()
        } else {
            reached_by
                .into_iter()
                .map(|w| (w.kind, w.event_type))
                .collect()
        };
        let signals = signals.into_iter().map(|(k, _)| k);
        clear_pause(pass, &timer, waiters, signals);
        Ok(resumed)
    }

    /// Removes, with the pass's next write, what the pause of `chain` of
    /// `event` (until `until_ms`, reached by `reached_by`) left beside the
    /// journal: its timer, its waiters and any signals, as its run ends
    /// without going on (its chain was removed). (A pause recorded before
    /// its entry kept its waiters leaves them to [`Self::reach_paused`],
    /// which removes a waiter whose run is no longer paused.)
    pub(super) fn forget_pause(
        &self,
        event: &VumiApiEvent,
        chain: &str,
        (until_ms, reached_by): (u64, &[Reachable]),
        pass: &mut Pass,
    ) -> Result<(), Interrupted> {
        let account = &event.account_key;
        let timer = PendingTimer {
            account: account.clone(),
            event_id: event.id,
            chain: chain.to_string(),
            due_ms: until_ms,
        };
        let signals = pass.store().scan_prefix(
            Collection::Signals,
            &signal_prefix(account, event.id, chain),
        )?;
        let waiters = reached_by.iter().map(|w| (w.kind, w.event_type.clone()));
        clear_pause(pass, &timer, waiters, signals.into_iter().map(|(k, _)| k));
        Ok(())
    }

    /// Lets `event` reach the paused runs of its account that wait for its
    /// type and paused before `event` was first taken up: each whose
    /// condition holds gets a signal, made durable, and its event back on
    /// the bus, whose next pass decides.
    pub(super) async fn reach_paused(
        &self,
        event: &VumiApiEvent,
        chains: &AccountChains,
        pass: &Pass,
    ) -> Result<(), Interrupted> {
        if !chains.awaits(event.event_type.as_str()) {
            return Ok(());
        }
        let account = &event.account_key;
        let prefix = key(&[
            account.as_str().as_bytes(),
            event.event_type.as_str().as_bytes(),
            b"",
        ]);
        let store = pass.store();
        let mut reached = Vec::new();
        for (k, v) in store.scan_prefix(Collection::Waiters, &prefix)? {
            let Some((paused, chain, kind)) = parse_waiter(&k) else {
                continue;
            };
            if paused == event.id {
                continue;
            }
            let Ok(waiting) = serde_json::from_slice::<Waiting>(&v) else {
                continue;
            };
            if waiting.since_ms > pass.journal.started_ms {
                continue;
            }
            let record = self.journal.load(&RecordKey::new(account, &paused))?;
            let run = record.as_ref().and_then(|j| {
                let c = j
                    .chain(&chain)
                    .filter(|c| c.waiting == Some(waiting.until_ms))?;
                Some((j.event.as_ref()?, c))
            });
            let Some((paused_event, run)) = run else {
                // The run went on or its record is gone: a waiter left
                // behind (its chains were changed meanwhile, say). Removed
                // only as read: the run may have paused again since the
                // scan, under the same key.
                store.compare_and_swap(Collection::Waiters, &k, Some(&v), None)?;
                continue;
            };
            let runtime = self.registry.runtime();
            match runtime.event_matches(&waiting.condition, event, paused_event, &outputs_of(run)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(account = %account, event_id = %event.id, paused = %paused,
                        chain, error = %e,
                        "a paused run's match failed to evaluate; taken as not matching");
                    continue;
                }
            }
            // One per kind: an event that both cancels the run and is the
            // one it waits for leaves both, and the cancel (first in key
            // order) wins.
            let mut signal_key = signal_prefix(account, paused, &chain);
            signal_key.extend_from_slice(event.id.to_string().as_bytes());
            signal_key.push(0);
            signal_key.extend_from_slice(kind.as_str().as_bytes());
            let signal = Signal {
                kind,
                event: event.clone(),
                until_ms: waiting.until_ms,
            };
            store.write_atomically(&[Write {
                collection: Collection::Signals,
                key: signal_key,
                value: Some(serde_json::to_vec(&signal).expect("a signal serialises")),
            }])?;
            tracing::info!(account = %account, event_id = %event.id, paused = %paused, chain,
                kind = kind.as_str(), "event reached a paused run");
            let dedup_id = format!(
                "{paused}:reached:{chain}:{}:{}",
                event.id,
                uuid::Uuid::now_v7()
            );
            reached.push((paused_event.clone(), dedup_id));
        }
        if reached.is_empty() {
            return Ok(());
        }
        // The signals are durable before the paused events come back to
        // read them.
        store.flush().await?;
        for (paused_event, dedup_id) in reached {
            self.bus.publish_as(&paused_event, &dedup_id).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiters_key_reads_back() {
        let account = AccountKey::new("acme").unwrap();
        let id = EventId::new_v7();
        for kind in [Reach::Cancel, Reach::Resume] {
            let k = waiter_key(&account, "replied", id, "remind me", kind);
            assert_eq!(parse_waiter(&k), Some((id, "remind me".to_string(), kind)));
        }
        assert_eq!(parse_waiter(b"acme\0replied\0not-an-id\0c\0cancel"), None);
    }
}
