//! The chain executor: takes one event from the bus to its end.
//!
//! Decode and validate (poison goes to dead letters, [`decode`]); admit it
//! or not (expired, too deep: [`policy::admit`]); select the chains it runs
//! (`switchboard_rules::select_chains`, conditions evaluated inline by the
//! Rhai runtime); run each chain's steps in order, each seeing the earlier
//! steps' outputs ([`step`]); publish the events the steps emitted, with ids
//! derived from (parent, chain, step, index). Then the caller acks, once
//! what was written is durable.
//!
//! Everything a pass does goes into the event's [journal](crate::journal)
//! record, from which a redelivered event resumes after its last finished
//! step and from which its trace is derived. How soon each entry is written
//! and made durable is [`policy::recording`]'s call, and [`pass`] keeps
//! count. A step that fails in a way worth trying again is not waited for
//! here: the event goes back to the bus with the delay
//! ([`Disposition::Retry`]) and resumes at that step.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use serde_json::Value;
use switchboard_handlers::records::{IdempotencyKeys, RecordError};
use switchboard_handlers::{EventConditions, EventValue, Registry};
use switchboard_rules::{AccountChains, ChainSpec, ChainStore, Control, Selected, select_chains};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::{Holding, Store, StoreError, WriteMark};

use crate::bus::{Bus, BusError, Delivery};
use crate::dead_letters::{DeadLetter, DeadLetters, DeadReason};
use crate::journal::{ChainEnd, ChainJournal, Entry, Journal, PendingRetry, StepName};
use crate::limits::LimitsConfig;
use crate::metrics::{Metrics, Outcome};
use crate::otel;
use crate::tail::Tail;
use crate::timers::Timers;
use crate::trace::TraceStatus;

mod decode;
mod digest;
mod flow;
mod letters;
mod pass;
mod paused;
mod policy;
mod step;

pub use digest::{open_windows, wake_removed_windows};
pub use flow::{ended_as, expire_under as expire_flow_states};
pub use step::emitted_events;

pub use letters::{LetterError, Letters};

use pass::Pass;
use step::{Attempt, StepContext, Steps};

/// What the bus should do with a delivery once the executor is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (or filed as dead, expired, unrouted): ack it once the store
    /// is flushed, so that what was written about the event (its journal
    /// record, a dead letter) survives a crash before the bus forgets it.
    Ack,
    /// Not finished (a step is to be tried again, or the store or bus
    /// failed): deliver it again after the delay.
    Retry(Duration),
}

/// The event-type label of what could not be decoded.
const UNKNOWN_EVENT_TYPE: &str = "~unknown";

/// How long to wait before handling an event again after the store or the
/// bus failed under it.
const INFRA_RETRY: Duration = Duration::from_secs(1);

/// How long an event whose handling panicked waits before it is handled
/// again: long enough that a panic that repeats does not fill the log.
const PANICKED_RETRY: Duration = Duration::from_secs(10);

/// What an executor is made of.
#[derive(Debug)]
pub struct ExecutorParts {
    /// Every account's chains.
    pub chains: Arc<ChainStore>,
    /// The handlers.
    pub registry: Arc<Registry>,
    /// Where emitted events and dead letters go.
    pub bus: Arc<dyn Bus>,
    /// The store under the journal and dead letters.
    pub store: Store,
    /// Step idempotency keys.
    pub idempotency: Arc<dyn IdempotencyKeys>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub limits: LimitsConfig,
    /// The bus's subject prefix.
    pub prefix: String,
    /// Where each pass over an event is shown as it ends.
    pub tail: Tail,
    /// The timers that bring back paused chains' events.
    pub timers: Timers,
}

/// Runs chains.
#[derive(Debug)]
pub struct Executor {
    chains: Arc<ChainStore>,
    registry: Arc<Registry>,
    bus: Arc<dyn Bus>,
    journal: Journal,
    dead_letters: DeadLetters,
    idempotency: Arc<dyn IdempotencyKeys>,
    store: Store,
    metrics: Arc<Metrics>,
    limits: LimitsConfig,
    prefix: String,
    tail: Tail,
    timers: Timers,
    /// Make reading and writing a digest window's, or a flow control's,
    /// state one step.
    locks: switchboard_store::KeyLocks,
}

/// Why handling could not finish: the store or the bus failed. The event is
/// handled again later; nothing that finished is lost or repeated.
#[derive(Debug, thiserror::Error)]
enum Interrupted {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Records(#[from] RecordError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl Executor {
    /// An executor of `parts`.
    pub fn new(parts: ExecutorParts) -> Self {
        Self {
            journal: Journal::new(parts.store.clone()),
            dead_letters: DeadLetters::new(parts.store.clone()),
            idempotency: parts.idempotency,
            chains: parts.chains,
            registry: parts.registry,
            bus: parts.bus,
            store: parts.store,
            metrics: parts.metrics,
            limits: parts.limits,
            prefix: parts.prefix,
            tail: parts.tail,
            timers: parts.timers,
            locks: switchboard_store::KeyLocks::new(),
        }
    }

    /// The store the executor writes.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Makes what was recorded about settled events durable (one flush
    /// covers every caller waiting at the time), before their acks.
    pub async fn make_durable(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    /// What `account`'s events are written under now: taken before one is
    /// handled, checked with [`Executor::still_holds`] before it is acked.
    pub fn holding(&self, account: Option<&str>) -> Holding {
        account.map_or_else(Holding::default, |a| self.store.holding(a.as_bytes()))
    }

    /// Whether what an event wrote under `holding` is durable once
    /// [`Executor::make_durable`] succeeded after it.
    pub fn still_holds(&self, holding: &Holding) -> bool {
        self.store.still_holds(holding)
    }

    /// Whether `account`'s event `id` was handled to the end (done, dead,
    /// expired or unrouted) as far as the local copy of the store knows;
    /// `false` if its record cannot be read.
    pub fn has_finished(&self, account: &AccountKey, id: &EventId) -> bool {
        let at = crate::journal::RecordKey::new(account, id);
        self.journal.load(&at).ok().flatten().is_some_and(|j| {
            j.finish
                .is_some_and(|f| f.status != TraceStatus::Running && f.finished_ms.is_some())
        })
    }

    /// Decodes a delivery. Poison — bad JSON, a schema violation, an
    /// oversize payload, an event on the wrong subject — is filed in dead
    /// letters with the reason, and `Err` is returned with the disposition
    /// (ack it once the letter is durable, or try again if it could not be
    /// filed) and what the letter was written under, taken before it was
    /// (see [`Executor::holding`]). Only first deliveries count as received.
    pub async fn decode(
        &self,
        delivery: &Delivery,
    ) -> Result<VumiApiEvent, (Disposition, Holding)> {
        let (subject, first) = (delivery.subject.as_str(), delivery.attempt == 1);
        match decode::decode(
            (subject, (delivery.seq, delivery.published_ms)),
            delivery.account.as_deref(),
            (&delivery.payload, &delivery.headers),
            &self.prefix,
            self.limits.max_event_bytes,
        ) {
            Ok(event) => {
                if first {
                    self.metrics.count(
                        Outcome::Received,
                        event.account_key.as_str(),
                        event.event_type.as_str(),
                    );
                }
                Ok(event)
            }
            Err(letter) => {
                if first {
                    self.metrics
                        .count(Outcome::Received, &letter.account_key, UNKNOWN_EVENT_TYPE);
                }
                tracing::warn!(subject, account = letter.account_key, error = %letter.error,
                    "poison message: filed in dead letters");
                let holding = self.holding(delivery.account.as_deref());
                match self.file_dead_letter(&letter).await {
                    Ok(()) => Err((Disposition::Ack, holding)),
                    Err(e) => {
                        tracing::error!(error = %e, subject, "filing a poison message failed; it will be tried again");
                        Err((Disposition::Retry(INFRA_RETRY), holding))
                    }
                }
            }
        }
    }

    /// Files a dead letter that no journal refers to, and announces it on the bus.
    async fn file_dead_letter(&self, letter: &DeadLetter) -> Result<(), Interrupted> {
        self.dead_letters.put(letter)?;
        self.metrics.count(
            Outcome::DeadLettered,
            &letter.account_key,
            letter
                .event
                .as_ref()
                .map_or(UNKNOWN_EVENT_TYPE, |e| e.event_type.as_str()),
        );
        self.bus.announce_dead_letter(letter).await?;
        Ok(())
    }

    /// Handles one decoded event, writing under `holding` (taken with
    /// [`Executor::holding`] before the event was handed to its worker: a
    /// write after the partition's term changed fails, and the event is
    /// handled again). `earlier` is the worker's last outside
    /// effect whose record may not be durable yet (its event was handed to
    /// be acked after a flush): this event's first outside step waits for it,
    /// so that a crash repeats at most one outside effect per worker. It is
    /// updated for the worker's next event.
    ///
    /// The pass is the `process` span of `delivery` (see [`crate::otel`]).
    ///
    /// A pass that panics (a defect in the engine: a handler's panic fails
    /// its step instead) is handled again after [`PANICKED_RETRY`], its
    /// conversation's later events held behind it as behind any retry, so
    /// that the worker and every other conversation go on.
    pub async fn handle(
        &self,
        event: &VumiApiEvent,
        delivery: &Delivery,
        holding: &Holding,
        earlier: &mut Option<WriteMark>,
    ) -> Disposition {
        let at = crate::journal::RecordKey::new(&event.account_key, &event.id);
        let handled = crate::panicked::caught(async {
            match self.journal.load(&at) {
                Ok(loaded) => {
                    let span = otel::process(
                        event,
                        (&delivery.subject, delivery.attempt, &delivery.headers),
                        self.bus.kind(),
                        &self.prefix,
                        loaded.as_ref().and_then(|j| j.traceparent.as_deref()),
                    );
                    let handled = self.try_handle(event, loaded, holding, earlier);
                    handled.instrument(span.clone()).await.inspect_err(|e| {
                        otel::outcome(&span, "interrupted", false);
                        otel::failed(&span, e);
                    })
                }
                Err(e) => Err(e.into()),
            }
        })
        .await;
        let retry_in = match handled {
            Ok(Ok(disposition)) => return disposition,
            Ok(Err(e)) => {
                tracing::warn!(account = %event.account_key, event_id = %event.id, error = %e,
                    "handling interrupted; the event will be handled again, resuming after its last finished step");
                INFRA_RETRY
            }
            Err(panic) => {
                tracing::error!(account = %event.account_key, event_id = %event.id, panic = %panic,
                    retry_in = ?PANICKED_RETRY, "handling the event panicked; it will be handled again");
                PANICKED_RETRY
            }
        };
        // The pass may have left an outside step's record unflushed: the
        // worker's next outside step waits for it.
        *earlier = Some(self.store.mark());
        Disposition::Retry(retry_in)
    }

    async fn try_handle(
        &self,
        event: &VumiApiEvent,
        loaded: Option<crate::journal::EventJournal>,
        holding: &Holding,
        earlier: &mut Option<WriteMark>,
    ) -> Result<Disposition, Interrupted> {
        let started = loaded
            .as_ref()
            .is_some_and(|j| j.chains.iter().any(ChainJournal::ran));
        // An earlier pass ended (rather than being cut short): every chain
        // it selected is in the journal.
        let selected_before = loaded.as_ref().is_some_and(|j| j.finish.is_some());
        let mut pass = Pass::new(event, loaded, earlier.take(), self.store.under(holding));
        // Interrupted (or given up at a shutdown), the pass still writes an
        // outside step's entry that waited for its next write: see `Pass`'s
        // `Drop`.
        self.run_pass(event, (started, selected_before), &mut pass, earlier)
            .await
    }

    /// [`Executor::try_handle`]'s pass over `event`, which has run a chain
    /// before if `started`, and whose chains an earlier pass selected if
    /// `selected_before`.
    async fn run_pass(
        &self,
        event: &VumiApiEvent,
        (started, selected_before): (bool, bool),
        pass: &mut Pass,
        earlier: &mut Option<WriteMark>,
    ) -> Result<Disposition, Interrupted> {
        let account = event.account_key.as_str();
        let lineage = policy::Lineage {
            expires_at: event.expires_at,
            depth: event.depth,
            root_id: &event.root_id,
            event_type: event.event_type.as_str(),
        };
        match policy::admit(
            lineage,
            started,
            switchboard_sdk::now(),
            self.limits.max_depth,
        ) {
            policy::Admission::Handle => {}
            policy::Admission::Expired => {
                self.metrics
                    .count(Outcome::Expired, account, event.event_type.as_str());
                tracing::info!(account, event_id = %event.id, "event expired before it was handled: dropped");
                return self.finish(event, pass, TraceStatus::Expired, earlier);
            }
            policy::Admission::TooDeep(error) => {
                tracing::warn!(account, event_id = %event.id, %error, "depth limit: filed in dead letters");
                let letter =
                    DeadLetter::for_event(event, DeadReason::DepthLimit, None, None, error);
                self.file_dead_letter(&letter).await?;
                return self.finish(event, pass, TraceStatus::Dead, earlier);
            }
        }

        let Some(account_chains) = self.chains.lookup(&event.account_key) else {
            return self.unrouted(pass, event, "the account has no chains", earlier);
        };
        // Before its own chains: the event may cancel or resume paused runs
        // whether or not a chain of its own matches it.
        self.reach_paused(event, &account_chains, pass).await?;
        let event_value = EventValue::new(event);
        let runtime = self.registry.runtime();
        let mut selected = runtime.run_sandboxed(|| {
            select_chains(
                &account_chains,
                event,
                &mut EventConditions::new(runtime, event, &event_value),
            )
        });
        let mut slots = Vec::new();
        let stopped = self.runs_under_way(
            event,
            (&account_chains, selected_before),
            &mut selected,
            pass,
            &mut slots,
        )?;
        // Slots are given back under the event's term, like its other
        // writes: a deposed owner's are refused.
        let store = pass.store().clone();
        if selected.is_empty() && stopped {
            let disposition = self.finish(event, pass, TraceStatus::Cancelled, earlier)?;
            self.release_slots(&store, event, slots)?;
            return Ok(disposition);
        }
        if selected.is_empty() {
            return self.unrouted(
                pass,
                event,
                "no chain matches (or no chain's `when` holds) and the account has no default chain",
                earlier,
            );
        }

        let mut retry_in: Option<Duration> = None;
        let mut paused = false;
        let mut dead = false;
        let mut expired = false;
        let mut cancelled = false;
        let mut ran = Vec::with_capacity(selected.len());
        // Concurrency slots of runs that ended are given back once their
        // ends are written.
        for selection in selected {
            match selection {
                Selected::Run(chain) => {
                    let span = otel::chain(&chain.name, account_chains.version());
                    let run = self
                        .run_chain(event, &event_value, chain, &account_chains, pass)
                        .instrument(span.clone())
                        .await?;
                    match run {
                        ChainRun::Over => {}
                        ChainRun::Retry(delay) => {
                            retry_in = Some(retry_in.map_or(delay, |d| d.min(delay)));
                        }
                        ChainRun::Paused => paused = true,
                    }
                    slots.extend(self.slot_to_release(event, chain, pass));
                    let end = pass.journal.chain(&chain.name).and_then(|c| c.end.as_ref());
                    span.record("switchboard.outcome", chain_outcome(&run, end));
                    // (A flow control whose key failed filed a letter too.)
                    dead |= matches!(end, Some(ChainEnd::Dead { .. }))
                        || pass
                            .journal
                            .chain(&chain.name)
                            .is_some_and(|c| c.condition_failed.is_some());
                    expired |= matches!(end, Some(ChainEnd::Expired { .. }));
                    cancelled |= matches!(end, Some(ChainEnd::Cancelled { .. }));
                    ran.push(chain.name.as_str());
                }
                Selected::ConditionFailed(chain, error) => {
                    // The condition is evaluated again on a redelivery, and
                    // the letter's id is the same each time.
                    tracing::warn!(account, event_id = %event.id, chain = chain.name, %error,
                        "condition failed: filed in dead letters");
                    let mut letter = DeadLetter::for_event(
                        event,
                        DeadReason::StepFailed,
                        Some(&chain.name),
                        Some("when"),
                        format!("the chain's `when` condition failed to evaluate: {error}"),
                    );
                    letter.attempts = 1;
                    self.file_dead_letter(&letter).await?;
                    pass.record(Entry::Condition {
                        chain: chain.name.clone(),
                        version: account_chains.version(),
                        error,
                    });
                    dead = true;
                }
            }
        }

        // What the finished steps emitted goes on the bus: at every pass, so
        // that children do not wait for a sibling chain's retry.
        if let Err(e) = self.publish_children(event, pass, &ran).await {
            pass.write(&self.journal)?;
            return Err(e);
        }
        let status = if retry_in.is_some() {
            TraceStatus::Running
        } else if paused {
            TraceStatus::Waiting
        } else if dead {
            TraceStatus::Dead
        } else if expired {
            self.metrics
                .count(Outcome::Expired, account, event.event_type.as_str());
            TraceStatus::Expired
        } else {
            self.metrics
                .count(Outcome::Handled, account, event.event_type.as_str());
            if cancelled {
                TraceStatus::Cancelled
            } else {
                TraceStatus::Done
            }
        };
        if retry_in.is_none() && !paused {
            let disposition = self.finish(event, pass, status, earlier)?;
            self.release_slots(&store, event, slots)?;
            return Ok(disposition);
        }
        // Not over: a step waits to be tried again, or a chain is paused
        // (the event is acked, and its timer brings it back).
        pass.record(Entry::Finish {
            status,
            finished_ms: None,
        });
        pass.write(&self.journal)?;
        *earlier = pass.earlier_for_next();
        for timer in pass.written_timers() {
            self.timers.noted(&timer);
        }
        self.release_slots(&store, event, slots)?;
        passed(status);
        self.tail.passed(event, &pass.journal, status);
        Ok(retry_in.map_or(Disposition::Ack, Disposition::Retry))
    }

    /// Runs of `event` under way (paused, or a step waiting to be tried
    /// again) go on under their chain by name, matched or not: the chain
    /// was selected when they began, and an edit since (a changed match or
    /// condition) must not strand them. When an earlier pass ended
    /// (`selected_before`), they are all that goes on: a chain added since,
    /// or whose condition holds now, does not start for an event it did
    /// not start for then. A run whose chain was removed
    /// stops (`removed`), giving back what a paused step held (a scheduled
    /// send's messages). Returns whether one stopped.
    fn runs_under_way<'a>(
        &self,
        event: &VumiApiEvent,
        (chains, selected_before): (&'a AccountChains, bool),
        selected: &mut Vec<Selected<'a>>,
        pass: &mut Pass,
        slots: &mut Vec<flow::Slot>,
    ) -> Result<bool, Interrupted> {
        let under_way: Vec<String> = pass
            .journal
            .chains
            .iter()
            .filter(|c| c.end.is_none() && c.ran())
            .map(|c| c.name.clone())
            .collect();
        if under_way.is_empty() {
            return Ok(false);
        }
        // A condition is for a run's start: one under way whose `when` now
        // fails goes on. The default chain, picked because the event came
        // back matching nothing else, starts no second run beside them, and
        // no chain starts that the pass which selected them did not start.
        selected.retain(|s| {
            pass.journal.chain(&s.chain().name).is_some()
                || !(selected_before || s.chain().name == switchboard_rules::DEFAULT_CHAIN)
        });
        for s in selected.iter_mut() {
            if let Selected::ConditionFailed(chain, _) = s
                && under_way.contains(&chain.name)
            {
                *s = Selected::Run(chain);
            }
        }
        let under_way: Vec<String> = under_way
            .into_iter()
            .filter(|name| !selected.iter().any(|s| s.chain().name == *name))
            .collect();
        let mut stopped = false;
        for name in under_way {
            if let Some(chain) = chains.chains().iter().find(|c| c.name == name) {
                selected.push(Selected::Run(chain));
                continue;
            }
            let Some(record) = pass.journal.chain(&name) else {
                continue;
            };
            let version = record.version;
            if let Some(retry) = &record.retry {
                self.give_up_retry(
                    event,
                    &name,
                    retry,
                    "its chain was removed before it was tried again",
                );
            }
            if record.waiting_again
                && let Some(last) = record.steps.last()
                && let Some(handler) = self.registry.get(&last.trace.handler)
            {
                let output = last.trace.output.clone().unwrap_or_default();
                handler.cancel_paused(
                    &event.account_key,
                    &output,
                    "its chain was removed from the account",
                )?;
            }
            if let Some(until_ms) = record.waiting {
                let reached_by = record.waiting_reached_by.clone();
                // A digest window it opened: the step that opened it.
                let window = record
                    .waiting_digest
                    .clone()
                    .and_then(|digest| Some((record.steps.last()?.trace.name.clone(), digest)));
                self.forget_pause(event, &name, (until_ms, &reached_by), pass)?;
                if let Some((step, digest)) = window {
                    self.drop_digest(event, (&name, &step, &digest), pass)?;
                }
            }
            tracing::info!(account = %event.account_key, event_id = %event.id, chain = name,
                "the chain of a run under way was removed: the run stops");
            pass.record(Entry::End {
                chain: name.clone(),
                version,
                end: Box::new(ChainEnd::Removed),
                unrun: Vec::new(),
            });
            stopped = true;
            // Its slot goes once its end is written, to every run waiting
            // (the chain is gone: no limit holds them back).
            slots
                .extend(flow::slot_of(event, &name, pass).map(|at| (name.clone(), usize::MAX, at)));
        }
        Ok(stopped)
    }

    /// Lets go of what a step waiting to be tried again holds, as its run
    /// ends before it is (`why`): its handler's records of what was still
    /// to do, and the idempotency key it claimed, so that another event
    /// may run the step with the key.
    fn give_up_retry(&self, event: &VumiApiEvent, chain: &str, retry: &PendingRetry, why: &str) {
        let error = match &retry.trace.error {
            Some(last) => format!("{why} (its last attempt: {last})"),
            None => why.to_string(),
        };
        step::let_go(
            self.idempotency.as_ref(),
            self.registry.get(&retry.trace.handler).map(|h| h.as_ref()),
            &switchboard_handlers::StepRef {
                event,
                chain,
                step: &retry.step,
            },
            (retry.claimed.as_deref(), (&error, false)),
        );
    }

    fn unrouted(
        &self,
        pass: &mut Pass,
        event: &VumiApiEvent,
        why: &str,
        earlier: &mut Option<WriteMark>,
    ) -> Result<Disposition, Interrupted> {
        let account = event.account_key.as_str();
        self.metrics
            .count(Outcome::Unrouted, account, event.event_type.as_str());
        tracing::info!(
            account,
            event_id = %event.id,
            conversation_type = %event.conversation_type,
            event_type = %event.event_type,
            "unrouted event: {why}"
        );
        self.finish(event, pass, TraceStatus::Unrouted, earlier)
    }

    /// Ends the pass: its last write, which the ack waits to be flushed
    /// (and the worker's next outside step, if it holds one's record).
    fn finish(
        &self,
        event: &VumiApiEvent,
        pass: &mut Pass,
        status: TraceStatus,
        earlier: &mut Option<WriteMark>,
    ) -> Result<Disposition, Interrupted> {
        pass.record(Entry::Finish {
            status,
            finished_ms: Some(crate::journal::now_ms()),
        });
        pass.write(&self.journal)?;
        *earlier = pass.earlier_for_next();
        passed(status);
        self.tail.passed(event, &pass.journal, status);
        Ok(Disposition::Ack)
    }

    /// Publishes the children of finished steps of the chains `ran` that
    /// are not on the bus yet, and records that they are.
    async fn publish_children(
        &self,
        event: &VumiApiEvent,
        pass: &mut Pass,
        ran: &[&str],
    ) -> Result<(), Interrupted> {
        let mut published = Vec::new();
        let mut result = Ok(());
        'chains: for chain in pass
            .journal
            .chains
            .iter()
            .filter(|c| ran.contains(&c.name.as_str()))
        {
            for (i, step) in chain.steps.iter().enumerate() {
                if step.published {
                    continue;
                }
                for child in &step.children {
                    let span = otel::publish(child, self.bus.kind(), &self.prefix);
                    if let Err(e) = self.bus.publish(child).instrument(span).await {
                        tracing::warn!(account = %event.account_key, event_id = %event.id, child = %child.id,
                            error = %e, "publishing an emitted event failed");
                        result = Err(e.into());
                        break 'chains;
                    }
                }
                published.push((chain.name.clone(), i));
            }
        }
        for (chain, step) in published {
            pass.record(Entry::Published { chain, step });
        }
        result
    }

    /// Runs `chain` from where the journal says it stopped: on at once, or
    /// after its pause once that has passed.
    async fn run_chain(
        &self,
        event: &VumiApiEvent,
        event_value: &EventValue,
        chain: &ChainSpec,
        chains: &AccountChains,
        pass: &mut Pass,
    ) -> Result<ChainRun, Interrupted> {
        let version = chains.version();
        let record = pass.journal.chain_mut(&chain.name, version);
        match &record.end {
            Some(
                ChainEnd::Done
                | ChainEnd::Discarded
                | ChainEnd::Expired { .. }
                | ChainEnd::Cancelled { .. }
                | ChainEnd::Limited { .. }
                | ChainEnd::Removed,
            ) => {
                return Ok(ChainRun::Over);
            }
            Some(ChainEnd::Dead { letter, .. }) => {
                // Filed by an earlier pass; make sure it was announced.
                if !record.announced
                    && let Some(letter) =
                        self.dead_letters.get(event.account_key.as_str(), letter)?
                {
                    self.bus.announce_dead_letter(&letter).await?;
                    pass.record(Entry::Announced {
                        chain: chain.name.clone(),
                    });
                }
                return Ok(ChainRun::Over);
            }
            None => {}
        }
        if let Some(until_ms) = record.waiting {
            let waiting_for = record.waiting_for.clone();
            let resumed = match (record.waiting_digest.clone(), record.waiting_flow) {
                (Some(digest), _) => {
                    self.close_digest(event, chain, version, pass, (until_ms, &digest))?
                }
                (None, Some(control)) => {
                    self.flow_resume(event, chain, version, pass, (until_ms, control))?
                }
                (None, None) => {
                    self.resume(event, chain, version, pass, (until_ms, waiting_for))?
                }
            };
            match resumed {
                paused::Resumed::Paused => return Ok(ChainRun::Paused),
                paused::Resumed::Cancelled => return Ok(ChainRun::Over),
                paused::Resumed::GoesOn => {}
            }
        }
        let gate = {
            let record = pass.journal.chain_mut(&chain.name, version);
            if record.steps.is_empty() {
                Some(flow::Controls::All)
            } else if record.replaying.is_some()
                && chain.concurrency_rule().is_some()
                && record.flow_of(Control::Concurrency).is_none()
            {
                // A replayed dead letter goes on where its run stopped,
                // once it holds a `concurrency` slot again.
                Some(flow::Controls::Concurrency)
            } else {
                None
            }
        };
        if let Some(controls) = gate {
            match self
                .flow_gate(event, event_value, chain, version, pass, controls)
                .await?
            {
                flow::Gate::Goes => {}
                flow::Gate::Held => return Ok(ChainRun::Paused),
                flow::Gate::Ended => return Ok(ChainRun::Over),
            }
        }
        let record = pass.journal.chain_mut(&chain.name, version);
        let mut outputs = paused::outputs_of(record);
        let start = record.steps.len();
        let steps = Steps {
            registry: &self.registry,
            idempotency: self.idempotency.as_ref(),
            metrics: &self.metrics,
            max_event_bytes: self.limits.max_event_bytes,
        };
        for (i, step) in chain.steps.iter().enumerate().skip(start) {
            let name = step.step_name();
            if policy::expired_before_step(event.expires_at, switchboard_sdk::now()) {
                tracing::info!(account = %event.account_key, event_id = %event.id, chain = chain.name,
                    step = name, "event expired: the chain stops before this step");
                if let Some(retry) = &pass.journal.chain_mut(&chain.name, version).retry {
                    self.give_up_retry(
                        event,
                        &chain.name,
                        retry,
                        "the event expired before it was tried again",
                    );
                }
                let end = ChainEnd::Expired {
                    step: name.to_string(),
                };
                self.end_chain(event, pass, chain, version, end, i)?;
                return Ok(ChainRun::Over);
            }
            let effects = self
                .registry
                .get(&step.handler)
                .map_or(switchboard_handlers::Effects::None, |h| h.effects());
            if policy::flush_before(effects, pass.awaits_flush()) {
                pass.flush(&self.journal).await?;
            }
            let prior = pass
                .journal
                .chain_mut(&chain.name, version)
                .retry
                .take()
                .filter(|r| r.step == name)
                .map(|r| r.trace);
            let cx = StepContext {
                event,
                event_value,
                chain,
                outputs: &outputs,
            };
            let span = otel::step(&chain.name, name, &step.handler);
            let attempt = steps
                .attempt(&cx, step, prior)
                .instrument(span.clone())
                .await;
            step_ended(&span, &attempt);
            match attempt {
                Attempt::Done {
                    record,
                    stop,
                    effects: _,
                    pause: Some(pause),
                } if !stop && pause.window.is_some() => {
                    let window = pause.window.clone().expect("a digest's window");
                    let (run, output) =
                        self.digest(event, chain, version, i + 1, record, pause, &window, pass)?;
                    outputs.insert(name.to_string(), Value::Object(output));
                    if let Some(run) = run {
                        return Ok(run);
                    }
                }
                Attempt::Done {
                    record,
                    stop,
                    effects,
                    pause,
                } => {
                    if let Some(output) = &record.trace.output {
                        outputs.insert(name.to_string(), Value::Object(output.clone()));
                    }
                    pass.record(Entry::Step {
                        chain: chain.name.clone(),
                        version,
                        record: Box::new(record),
                    });
                    // The pause (its journal entry, timer and waiters) goes
                    // in the same write as the step: a step with effects
                    // (a scheduled send) is never found finished without the
                    // pause it asked for.
                    let paused = match pause {
                        Some(pause) if !stop => {
                            self.pause(event, chain, pass, pause);
                            true
                        }
                        _ => false,
                    };
                    let recording = policy::recording(effects);
                    pass.step_recorded(recording, &self.journal)?;
                    if stop {
                        self.end_chain(event, pass, chain, version, ChainEnd::Done, i + 1)?;
                        return Ok(ChainRun::Over);
                    }
                    if paused {
                        return Ok(ChainRun::Paused);
                    }
                }
                Attempt::Retry { delay, pending } => {
                    tracing::info!(account = %event.account_key, event_id = %event.id, chain = chain.name,
                        step = name, attempt = pending.trace.attempts, delay_ms = delay.as_millis() as u64,
                        error = pending.trace.error.as_deref().unwrap_or(""), "step failed; retrying");
                    self.metrics.count(
                        Outcome::Retried,
                        event.account_key.as_str(),
                        event.event_type.as_str(),
                    );
                    pass.record(Entry::Retry {
                        chain: chain.name.clone(),
                        version,
                        pending: Box::new(pending),
                    });
                    return Ok(ChainRun::Retry(delay));
                }
                Attempt::Continue { trace, effects } => {
                    tracing::warn!(account = %event.account_key, event_id = %event.id, chain = chain.name,
                        step = name, error = trace.error.as_deref().unwrap_or(""),
                        "step failed; on_error = \"continue\"");
                    pass.record(Entry::Step {
                        chain: chain.name.clone(),
                        version,
                        record: Box::new(crate::journal::StepRecord {
                            trace,
                            children: Vec::new(),
                            published: true,
                        }),
                    });
                    pass.step_recorded(policy::recording(effects), &self.journal)?;
                }
                Attempt::Failed { trace, message } => {
                    tracing::warn!(account = %event.account_key, event_id = %event.id, chain = chain.name,
                        step = name, error = %message, "step failed: filed in dead letters");
                    let mut letter = DeadLetter::for_event(
                        event,
                        DeadReason::StepFailed,
                        Some(&chain.name),
                        Some(name),
                        message,
                    );
                    letter.attempts = trace.attempts;
                    let end = ChainEnd::Dead {
                        letter: letter.id.clone(),
                        step: name.to_string(),
                        trace,
                    };
                    self.file_chain_letter(event, pass, chain, version, &letter, end, i + 1)
                        .await?;
                    return Ok(ChainRun::Over);
                }
            }
        }
        self.end_chain(
            event,
            pass,
            chain,
            version,
            ChainEnd::Done,
            chain.steps.len(),
        )?;
        Ok(ChainRun::Over)
    }

    /// Records that `chain` ended with its steps from `next` on not run. A
    /// dead letter it was replayed from goes, in one write with the record;
    /// otherwise the entry waits for the pass's last write.
    fn end_chain(
        &self,
        event: &VumiApiEvent,
        pass: &mut Pass,
        chain: &ChainSpec,
        version: u64,
        end: ChainEnd,
        next: usize,
    ) -> Result<(), StoreError> {
        let Some(replayed) = record_end(pass, chain, version, end, next) else {
            return Ok(());
        };
        let mut writes: Vec<_> = pass.take_write(&self.journal)?.into_iter().collect();
        writes.push(DeadLetters::removal(event.account_key.as_str(), &replayed));
        pass.store().write_atomically(&writes)
    }

    /// Files the dead letter of a chain's failed step together with the
    /// chain's end, then announces it.
    #[allow(clippy::too_many_arguments)]
    async fn file_chain_letter(
        &self,
        event: &VumiApiEvent,
        pass: &mut Pass,
        chain: &ChainSpec,
        version: u64,
        letter: &DeadLetter,
        end: ChainEnd,
        next: usize,
    ) -> Result<(), Interrupted> {
        let replayed = record_end(pass, chain, version, end, next);
        let mut writes: Vec<_> = pass.take_write(&self.journal)?.into_iter().collect();
        writes.push(DeadLetters::write(letter));
        if let Some(id) = replayed.filter(|id| *id != letter.id) {
            writes.push(DeadLetters::removal(event.account_key.as_str(), &id));
        }
        pass.store().write_atomically(&writes)?;
        self.metrics.count(
            Outcome::DeadLettered,
            event.account_key.as_str(),
            event.event_type.as_str(),
        );
        self.bus.announce_dead_letter(letter).await?;
        pass.record(Entry::Announced {
            chain: chain.name.clone(),
        });
        Ok(())
    }
}

/// Records how a pass over the event ended on its `process` span.
fn passed(status: TraceStatus) {
    if !otel::on() {
        return;
    }
    otel::outcome(
        &tracing::Span::current(),
        status.as_str(),
        status == TraceStatus::Dead,
    );
}

/// How a chain's run in a pass ended, for its span.
fn chain_outcome(run: &ChainRun, end: Option<&ChainEnd>) -> &'static str {
    match (run, end) {
        (ChainRun::Retry(_), _) => "retry",
        (ChainRun::Paused, _) => "paused",
        (ChainRun::Over, Some(ChainEnd::Dead { .. })) => "dead",
        (ChainRun::Over, Some(ChainEnd::Expired { .. })) => "expired",
        (ChainRun::Over, Some(ChainEnd::Cancelled { .. })) => "cancelled",
        (ChainRun::Over, Some(ChainEnd::Limited { .. })) => "limited",
        (ChainRun::Over, Some(ChainEnd::Removed)) => "removed",
        (ChainRun::Over, _) => "done",
    }
}

/// Records an attempt's end on its step span.
fn step_ended(span: &tracing::Span, attempt: &Attempt) {
    use crate::trace::StepOutcome;
    let (trace, outcome) = match attempt {
        Attempt::Done { record, .. } => {
            let outcome = match record.trace.outcome {
                StepOutcome::Skipped => "skipped",
                StepOutcome::Stopped => "stopped",
                StepOutcome::Waiting => "waiting",
                _ => "ok",
            };
            (&record.trace, outcome)
        }
        Attempt::Retry { pending, .. } => (&pending.trace, "retry"),
        Attempt::Continue { trace, .. } => (trace, "continued"),
        Attempt::Failed { trace, .. } => (trace, "failed"),
    };
    let error = match attempt {
        Attempt::Done { .. } => None,
        _ => trace.error.as_deref(),
    };
    otel::step_ended(span, trace.attempts, outcome, error);
}

/// Where a chain stands after a pass.
enum ChainRun {
    /// It ended (or had ended before).
    Over,
    /// A failed step is to be tried again after the delay.
    Retry(Duration),
    /// It is paused (a `delay` step) until its timer brings it back.
    Paused,
}

/// Records the chain's end in the pass; returns the dead letter the chain
/// was being replayed from, if it was.
fn record_end(
    pass: &mut Pass,
    chain: &ChainSpec,
    version: u64,
    end: ChainEnd,
    next: usize,
) -> Option<String> {
    let replayed = pass
        .journal
        .chain(&chain.name)
        .and_then(|c| c.replaying.clone());
    pass.record(Entry::End {
        chain: chain.name.clone(),
        version,
        end: Box::new(end),
        unrun: unrun(chain, next),
    });
    replayed
}

/// The steps of `chain` from `next` on, which it did not run.
fn unrun(chain: &ChainSpec, next: usize) -> Vec<StepName> {
    chain
        .steps
        .iter()
        .skip(next)
        .map(|s| StepName {
            name: s.step_name().to_string(),
            handler: s.handler.clone(),
        })
        .collect()
}
