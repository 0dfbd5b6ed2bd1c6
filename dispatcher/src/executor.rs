//! The chain executor: takes one event from the bus to its end.
//!
//! Decode and validate (poison goes to dead letters); drop it if expired; send
//! it to dead letters if its lineage is too deep; find the chains it runs; run
//! each chain's steps in order, each seeing the earlier steps' outputs; publish
//! the events the steps emitted, with ids derived from (parent, chain, step,
//! index); record the trace. Then the caller acks.
//!
//! Every finished step is recorded in the [journal](crate::journal) before the
//! chain moves on, so a redelivered event resumes where it stopped. A step that
//! fails in a retryable way is not waited for here: its attempt count goes in
//! the journal and the event goes back to the bus with the retry delay
//! ([`Disposition::Retry`]), to resume at that step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use switchboard_handlers::stores::IdempotencyStore;
use switchboard_handlers::{
    Effects, EventValue, LogLine, Registry, StepError, StepInput, StepOutput,
};
use switchboard_rules::{AccountChains, ChainSpec, ChainStore, OnError, StepSpec};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::{Store, StoreError, WriteMark};

use crate::bus::{Bus, BusError};
use crate::config::LimitsConfig;
use crate::journal::{ChainEnd, ChainJournal, EventJournal, Journal, PendingRetry, StepRecord};
use crate::metrics::{Metrics, Outcome, StepResult};
use crate::records::{
    ChainTrace, DeadLetter, DeadLetters, DeadReason, LetterStatus, StepOutcome, StepTrace, Trace,
    TraceStatus, Traces, UNKNOWN_ACCOUNT,
};

/// What the bus should do with a delivery once the executor is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (or filed as dead, expired, unrouted): ack it once the store
    /// is flushed, so that what was written about the event (its trace, a
    /// journal record, a dead letter) survives a crash before the bus
    /// forgets the event.
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

/// Runs chains.
#[derive(Debug)]
pub struct Executor {
    /// Every account's chains.
    pub chains: Arc<ChainStore>,
    /// The handlers.
    pub registry: Arc<Registry>,
    /// Where emitted events go.
    pub bus: Arc<dyn Bus>,
    /// Event traces.
    pub traces: Traces,
    /// Dead letters.
    pub dead_letters: DeadLetters,
    /// The step journal.
    pub journal: Journal,
    /// Step idempotency keys.
    pub idempotency: IdempotencyStore,
    /// The store under the journal, traces and dead letters: flushed before an ack.
    pub store: switchboard_store::Store,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub limits: LimitsConfig,
    /// Subject prefix.
    pub prefix: String,
}

/// Why handling could not finish: the store or the bus failed. The event is
/// handled again later; nothing that finished is lost or repeated.
#[derive(Debug, thiserror::Error)]
enum Interrupted {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One attempt at a step.
enum Attempt {
    /// It finished: succeeded, or skipped by its idempotency key.
    Done {
        record: StepRecord,
        stop: bool,
        /// Its rendered idempotency key, to record.
        idempotency_key: Option<String>,
        /// What it changed besides its output.
        effects: Effects,
    },
    /// It failed and is worth trying again after `delay`.
    Retry {
        delay: Duration,
        pending: PendingRetry,
    },
    /// It failed for good (or ran out of attempts).
    Failed {
        trace: StepTrace,
        message: String,
        effects: Effects,
    },
}

/// Why a dead letter cannot be replayed or discarded.
#[derive(Debug, thiserror::Error)]
pub enum LetterError {
    /// The account has no such dead letter.
    #[error("account {account} has no dead letter {id}")]
    NotFound {
        /// The account.
        account: String,
        /// The letter.
        id: String,
    },
    /// The letter holds no event (poison): there is nothing to replay.
    #[error(
        "dead letter {0} holds no event (the payload was not a valid event), so it cannot be \
         replayed: fix the publisher and publish the event again, then discard the letter"
    )]
    NoEvent(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus would not take the event.
    #[error(
        "putting the event of dead letter {id} back on the bus failed (the letter stays; replay it again): {source}"
    )]
    Bus {
        /// The letter.
        id: String,
        /// What the bus said.
        source: BusError,
    },
}

impl Executor {
    /// Makes what was recorded about settled events durable (one flush
    /// covers every caller waiting at the time), before their acks.
    pub async fn make_durable(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    /// Decodes a payload taken from `subject`. Poison — bad JSON, a schema
    /// violation, an oversize payload, an event on the wrong subject — is filed
    /// in dead letters with the reason, and `Err` is returned with the
    /// disposition: ack it once the letter is durable, or try again if it
    /// could not be filed.
    /// `first` says whether this is the message's first delivery: only those
    /// count as received.
    pub async fn decode(
        &self,
        subject: &str,
        payload: &[u8],
        first: bool,
    ) -> Result<VumiApiEvent, Disposition> {
        let result = VumiApiEvent::decode(payload, self.limits.max_event_bytes)
            .map_err(|e| e.to_string())
            .and_then(|event| {
                let expected = event.subject(&self.prefix);
                if expected == subject {
                    Ok(event)
                } else {
                    Err(format!(
                        "event {} was published on {subject}, but its account, conversation_type and \
                         event_type give the subject {expected}",
                        event.id
                    ))
                }
            });
        match result {
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
            Err(error) => {
                let account = self.account_of_subject(subject);
                if first {
                    self.metrics
                        .count(Outcome::Received, &account, UNKNOWN_EVENT_TYPE);
                }
                tracing::warn!(subject, account, %error, "poison message: filed in dead letters");
                let mut letter = DeadLetter::new(&account, DeadReason::Poison, error);
                letter.subject = Some(subject.to_string());
                let limit = 64 * 1024;
                letter.payload = Some(
                    String::from_utf8_lossy(&payload[..payload.len().min(limit)]).into_owned(),
                );
                match self.file_dead_letter(&letter).await {
                    Ok(()) => Err(Disposition::Ack),
                    Err(e) => {
                        tracing::error!(error = %e, subject, "filing a poison message failed; it will be tried again");
                        Err(Disposition::Retry(INFRA_RETRY))
                    }
                }
            }
        }
    }

    /// The account a subject names, if it names a valid one.
    fn account_of_subject(&self, subject: &str) -> String {
        subject
            .strip_prefix(&self.prefix)
            .and_then(|s| s.strip_prefix(".events."))
            .and_then(|s| s.split('.').next())
            .and_then(|a| AccountKey::new(a).ok())
            .map_or_else(|| UNKNOWN_ACCOUNT.to_string(), |a| a.to_string())
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

    /// Handles one decoded event. `earlier` is the worker's last outside
    /// effect whose record may not be durable yet (its event was handed to
    /// be acked after a flush): this event's first outside step waits for it,
    /// so that a crash repeats at most one outside effect per worker. It is
    /// updated for the worker's next event.
    pub async fn handle(
        &self,
        event: &VumiApiEvent,
        earlier: &mut Option<WriteMark>,
    ) -> Disposition {
        match self.try_handle(event, earlier).await {
            Ok(disposition) => disposition,
            Err(e) => {
                // The pass may have left an outside step's record unflushed:
                // the worker's next outside step waits for it.
                *earlier = Some(self.store.mark());
                tracing::warn!(account = %event.account_key, event_id = %event.id, error = %e,
                    "handling interrupted; the event will be handled again, resuming after its last finished step");
                Disposition::Retry(INFRA_RETRY)
            }
        }
    }

    async fn try_handle(
        &self,
        event: &VumiApiEvent,
        earlier: &mut Option<WriteMark>,
    ) -> Result<Disposition, Interrupted> {
        let account = event.account_key.as_str();
        let started_at = switchboard_sdk::now();
        let mut trace = Trace {
            event: event.clone(),
            status: TraceStatus::Done,
            parent_id: event.parent_id,
            children: Vec::new(),
            chains: Vec::new(),
            started_at,
            finished_at: None,
        };

        let journal = self.journal.get(&event.id)?;
        // An event whose chains have started is finished, whatever its expiry.
        if journal.is_none() && event.is_expired_at(started_at) {
            self.metrics
                .count(Outcome::Expired, account, event.event_type.as_str());
            tracing::info!(account, event_id = %event.id, "event expired before it was handled: dropped");
            trace.status = TraceStatus::Expired;
            return self.finish(trace);
        }

        if event.depth > self.limits.max_depth {
            let error = format!(
                "event depth {} is over the limit of {}: a chain probably emits the event that triggers \
                 it (root event {}, event type {})",
                event.depth, self.limits.max_depth, event.root_id, event.event_type
            );
            tracing::warn!(account, event_id = %event.id, %error, "depth limit: filed in dead letters");
            let letter = DeadLetter::for_event(event, DeadReason::DepthLimit, None, None, error);
            self.file_dead_letter(&letter).await?;
            trace.status = TraceStatus::Dead;
            return self.finish(trace);
        }

        let Some(account_chains) = self.chains.lookup(&event.account_key) else {
            return self.unrouted(trace, "the account has no chains");
        };
        let event_value = EventValue::new(event);
        let selected = select_chains(&self.registry, event, &event_value, &account_chains).await;
        if selected.is_empty() {
            return self.unrouted(
                trace,
                "no chain matches (or no chain's `when` holds) and the account has no default chain",
            );
        }

        let existed = journal.is_some();
        let mut journal = match journal {
            Some(journal) => {
                // A later pass: the trace covers every pass, from the first.
                if let Ok(first) = time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(journal.started_ms) * 1_000_000,
                ) {
                    trace.started_at = first;
                }
                journal
            }
            None => EventJournal::new(),
        };
        let mut retry_in: Option<Duration> = None;
        let mut dead = false;
        let mut pass = Pass {
            earlier: earlier.take(),
            ..Pass::default()
        };
        let mut ran = Vec::with_capacity(selected.len());
        for selection in selected {
            match selection {
                Selected::Run(chain) => {
                    let version = account_chains.version();
                    if let Some(delay) = self
                        .run_chain(event, &event_value, chain, version, &mut journal, &mut pass)
                        .await?
                    {
                        retry_in = Some(retry_in.map_or(delay, |d| d.min(delay)));
                    }
                    let record = journal.chain(&chain.name).expect("the chain just ran");
                    dead |= matches!(record.end, Some(ChainEnd::Dead { .. }));
                    trace.chains.push(chain_trace(chain, record));
                    ran.push(chain.name.as_str());
                }
                Selected::ConditionFailed(chain, error) => {
                    // Not journaled: the condition is evaluated again on a
                    // redelivery, and the letter's id is the same each time.
                    let error = format!("the chain's `when` condition failed to evaluate: {error}");
                    tracing::warn!(account, event_id = %event.id, chain = chain.name, %error,
                        "condition failed: filed in dead letters");
                    let step = StepTrace {
                        name: "when".into(),
                        handler: "when".into(),
                        outcome: StepOutcome::Failed,
                        attempts: 1,
                        duration_ms: 0.0,
                        output: None,
                        error: Some(error.clone()),
                        logs: Vec::new(),
                    };
                    let mut letter = DeadLetter::for_event(
                        event,
                        DeadReason::StepFailed,
                        Some(&chain.name),
                        Some("when"),
                        error,
                    );
                    letter.attempts = 1;
                    self.file_dead_letter(&letter).await?;
                    trace.chains.push(ChainTrace {
                        name: chain.name.clone(),
                        version: account_chains.version(),
                        steps: vec![step],
                    });
                    dead = true;
                }
            }
        }

        // What the finished steps emitted goes on the bus: at every pass, so
        // that children do not wait for a sibling chain's retry.
        let published = self.publish_children(event, &mut journal, &ran).await;
        pass.unwritten |= published.as_ref().is_ok_and(|changed| *changed);
        // An event whose steps all lack side effects needs no record once it
        // is done: handling it again repeats nothing that matters.
        let record = pass.unwritten && (existed || pass.keep || retry_in.is_some());
        if record {
            self.journal.put(&event.id, &journal)?;
        }
        *earlier = if pass.unflushed {
            Some(self.store.mark())
        } else {
            pass.earlier
        };
        published?;
        trace.children = journal
            .chains
            .iter()
            .filter(|c| ran.contains(&c.name.as_str()))
            .flat_map(|c| c.steps.iter().flat_map(|s| s.children.iter().map(|e| e.id)))
            .collect();

        if let Some(delay) = retry_in {
            trace.status = TraceStatus::Running;
            self.traces.put(&trace)?;
            return Ok(Disposition::Retry(delay));
        }
        if dead {
            trace.status = TraceStatus::Dead;
        } else {
            self.metrics
                .count(Outcome::Handled, account, event.event_type.as_str());
        }
        self.finish(trace)
    }

    fn unrouted(&self, mut trace: Trace, why: &str) -> Result<Disposition, Interrupted> {
        let account = trace.event.account_key.as_str();
        self.metrics
            .count(Outcome::Unrouted, account, trace.event.event_type.as_str());
        tracing::info!(
            account,
            event_id = %trace.event.id,
            conversation_type = %trace.event.conversation_type,
            event_type = %trace.event.event_type,
            "unrouted event: {why}"
        );
        trace.status = TraceStatus::Unrouted;
        self.finish(trace)
    }

    /// Writes the final trace; the ack waits for it to be flushed.
    fn finish(&self, mut trace: Trace) -> Result<Disposition, Interrupted> {
        trace.finished_at = Some(switchboard_sdk::now());
        self.traces.put(&trace)?;
        Ok(Disposition::Ack)
    }

    /// Publishes the children of finished steps that are not on the bus yet,
    /// and marks them so (in `journal`, which the caller writes); returns
    /// whether it marked any.
    async fn publish_children(
        &self,
        event: &VumiApiEvent,
        journal: &mut EventJournal,
        chains: &[&str],
    ) -> Result<bool, Interrupted> {
        let mut changed = false;
        let mut result = Ok(());
        'chains: for chain in journal
            .chains
            .iter_mut()
            .filter(|c| chains.contains(&c.name.as_str()))
        {
            for step in chain.steps.iter_mut().filter(|s| !s.published) {
                for child in &step.children {
                    if let Err(e) = self.bus.publish(child).await {
                        tracing::warn!(account = %event.account_key, event_id = %event.id, child = %child.id,
                            error = %e, "publishing an emitted event failed");
                        result = Err(e.into());
                        break 'chains;
                    }
                }
                step.published = true;
                changed = true;
            }
        }
        result.map(|()| changed)
    }

    /// Runs chain `chain` from where the journal says it stopped. Returns the
    /// delay after which a failed step is to be tried again, if one is.
    async fn run_chain(
        &self,
        event: &VumiApiEvent,
        event_value: &EventValue,
        chain: &ChainSpec,
        version: u64,
        journal: &mut EventJournal,
        pass: &mut Pass,
    ) -> Result<Option<Duration>, Interrupted> {
        let account = &event.account_key;
        let ci = {
            journal.chain_mut(&chain.name, version);
            journal
                .chains
                .iter()
                .position(|c| c.name == chain.name)
                .expect("just made")
        };
        match &journal.chains[ci].end {
            Some(ChainEnd::Done | ChainEnd::Discarded) => return Ok(None),
            Some(ChainEnd::Dead {
                letter, announced, ..
            }) => {
                // Filed by an earlier pass; make sure it was announced.
                if !announced
                    && let Some(letter) = self.dead_letters.get(account.as_str(), letter)?
                {
                    self.bus.announce_dead_letter(&letter).await?;
                    if let Some(ChainEnd::Dead { announced, .. }) = &mut journal.chains[ci].end {
                        *announced = true;
                    }
                    self.journal.put(&event.id, journal)?;
                }
                return Ok(None);
            }
            None => {}
        }
        let mut outputs: Map<String, Value> = journal.chains[ci]
            .steps
            .iter()
            .filter_map(|r| {
                let output = r.trace.output.clone()?;
                Some((r.trace.name.clone(), Value::Object(output)))
            })
            .collect();
        let start = journal.chains[ci].steps.len();
        for step in chain.steps.iter().skip(start) {
            let name = step.step_name();
            // A step that reached outside is durably journaled before the
            // next one that does starts (and before the ack): a crash repeats
            // at most the one step per worker that is not yet durable.
            if pass.awaits_flush(&self.store)
                && self
                    .registry
                    .get(&step.handler)
                    .is_some_and(|h| h.effects() == Effects::External)
            {
                self.store.flush().await?;
                pass.unflushed = false;
                pass.earlier = None;
            }
            let prior = journal.chains[ci]
                .retry
                .take()
                .filter(|r| r.step == name)
                .map(|r| r.trace);
            match self
                .attempt_step(event, event_value, chain, step, &outputs, prior)
                .await
            {
                Attempt::Done {
                    record,
                    stop,
                    idempotency_key,
                    effects,
                } => {
                    if let Some(output) = &record.trace.output {
                        outputs.insert(name.to_string(), Value::Object(output.clone()));
                    }
                    let record_chain = &mut journal.chains[ci];
                    record_chain.steps.push(record);
                    if stop {
                        self.end_chain(event, journal, ci, ChainEnd::Done, pass)?;
                    }
                    pass.finished(self, event, journal, effects)?;
                    if let Some(key) = idempotency_key {
                        self.idempotency.record(account, &chain.name, name, &key)?;
                        // Keep the record even for a step without effects
                        // (an `emit` with a key): a redelivery then resumes
                        // after the step instead of finding it skipped by
                        // its own key.
                        pass.keep = true;
                        pass.unwritten = true;
                    }
                    if stop {
                        return Ok(None);
                    }
                }
                Attempt::Retry { delay, pending } => {
                    tracing::info!(account = %account, event_id = %event.id, chain = chain.name,
                        step = name, attempt = pending.trace.attempts, delay_ms = delay.as_millis() as u64,
                        error = pending.trace.error.as_deref().unwrap_or(""), "step failed; retrying");
                    self.metrics.count(
                        Outcome::Retried,
                        account.as_str(),
                        event.event_type.as_str(),
                    );
                    journal.chains[ci].retry = Some(pending);
                    self.journal.put(&event.id, journal)?;
                    pass.keep = true;
                    pass.unwritten = false;
                    return Ok(Some(delay));
                }
                Attempt::Failed {
                    trace,
                    message,
                    effects,
                } if step.on_error == OnError::Continue => {
                    tracing::warn!(account = %account, event_id = %event.id, chain = chain.name,
                        step = name, error = %message, "step failed; on_error = \"continue\"");
                    journal.chains[ci].steps.push(StepRecord {
                        trace,
                        children: Vec::new(),
                        published: true,
                    });
                    pass.finished(self, event, journal, effects)?;
                }
                Attempt::Failed { trace, message, .. } => {
                    tracing::warn!(account = %account, event_id = %event.id, chain = chain.name,
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
                        announced: false,
                    };
                    self.file_chain_letter(event, journal, ci, &letter, end)
                        .await?;
                    pass.keep = true;
                    pass.unwritten = false;
                    return Ok(None);
                }
            }
        }
        self.end_chain(event, journal, ci, ChainEnd::Done, pass)?;
        Ok(None)
    }

    /// Records that chain `ci` ended; a dead letter it was replayed from goes,
    /// together with the record. Otherwise the record is written with the
    /// event's end.
    fn end_chain(
        &self,
        event: &VumiApiEvent,
        journal: &mut EventJournal,
        ci: usize,
        end: ChainEnd,
        pass: &mut Pass,
    ) -> Result<(), StoreError> {
        let Some(replayed) = journal.chains[ci].end_with(end) else {
            pass.unwritten = true;
            return Ok(());
        };
        let mut writes = self.journal.writes(&event.id, journal).to_vec();
        writes.push(DeadLetters::removal(event.account_key.as_str(), &replayed));
        pass.keep = true;
        pass.unwritten = false;
        self.store.write_atomically(&writes)
    }

    /// Files the dead letter of a chain's failed step together with the
    /// chain's end, then announces it.
    async fn file_chain_letter(
        &self,
        event: &VumiApiEvent,
        journal: &mut EventJournal,
        ci: usize,
        letter: &DeadLetter,
        end: ChainEnd,
    ) -> Result<(), Interrupted> {
        let replayed = journal.chains[ci].end_with(end);
        let mut writes = self.journal.writes(&event.id, journal).to_vec();
        writes.push(DeadLetters::write(letter));
        if let Some(id) = replayed.filter(|id| *id != letter.id) {
            writes.push(DeadLetters::removal(event.account_key.as_str(), &id));
        }
        self.store.write_atomically(&writes)?;
        self.metrics.count(
            Outcome::DeadLettered,
            event.account_key.as_str(),
            event.event_type.as_str(),
        );
        self.bus.announce_dead_letter(letter).await?;
        if let Some(ChainEnd::Dead { announced, .. }) = &mut journal.chains[ci].end {
            *announced = true;
        }
        self.journal.put(&event.id, journal)?;
        Ok(())
    }

    /// Makes one attempt at a step (`prior` is its trace from earlier
    /// attempts, if any).
    async fn attempt_step(
        &self,
        event: &VumiApiEvent,
        event_value: &EventValue,
        chain: &ChainSpec,
        step: &StepSpec,
        outputs: &Map<String, Value>,
        prior: Option<StepTrace>,
    ) -> Attempt {
        let policy = step.retry.clone().unwrap_or_default();
        let templates = self.registry.templates();
        let scope = templates.scope(event_value, outputs, &event.account_key);
        let mut trace = prior.unwrap_or_else(|| StepTrace {
            name: step.step_name().to_string(),
            handler: step.handler.clone(),
            outcome: StepOutcome::Failed,
            attempts: 0,
            duration_ms: 0.0,
            output: None,
            error: None,
            logs: Vec::new(),
        });
        trace.attempts += 1;
        let failed = |mut trace: StepTrace, message: String, effects: Effects, took: Duration| {
            self.metrics.step(&step.handler, StepResult::Failed, took);
            trace.outcome = StepOutcome::Failed;
            trace.error = Some(message.clone());
            Attempt::Failed {
                trace,
                message,
                effects,
            }
        };
        let Some(handler) = self.registry.get(&step.handler) else {
            // Chains are checked when stored; a handler can only be missing if
            // the deployment lost it since.
            let error = format!(
                "handler {:?} is not available in this dispatcher",
                step.handler
            );
            return failed(trace, error, Effects::None, Duration::ZERO);
        };
        let effects = handler.effects();
        let idempotency_key = match &step.idempotency {
            None => None,
            Some(spec) => {
                let key = match templates.render(
                    &Value::String(spec.key.clone()),
                    "idempotency.key",
                    &scope,
                ) {
                    Ok(Value::String(s)) => s,
                    Ok(other) => other.to_string(),
                    Err(error) => return failed(trace, error, Effects::None, Duration::ZERO),
                };
                match self.idempotency.seen(
                    &event.account_key,
                    &chain.name,
                    step.step_name(),
                    &key,
                    spec.window,
                ) {
                    Ok(true) => {
                        let mut data = Map::new();
                        data.insert("skipped".into(), Value::Bool(true));
                        data.insert(
                            "reason".into(),
                            Value::String(format!(
                                "idempotency key seen within {}",
                                switchboard_rules::duration::format(spec.window)
                            )),
                        );
                        self.metrics
                            .step(&step.handler, StepResult::Ok, Duration::ZERO);
                        trace.outcome = StepOutcome::Skipped;
                        trace.output = Some(data);
                        trace.error = None;
                        return Attempt::Done {
                            record: StepRecord {
                                trace,
                                children: Vec::new(),
                                published: true,
                            },
                            stop: false,
                            idempotency_key: None,
                            effects: Effects::None,
                        };
                    }
                    Ok(false) => Some(key),
                    Err(e) => {
                        return failed(
                            trace,
                            format!("reading idempotency keys: {e}"),
                            Effects::None,
                            Duration::ZERO,
                        );
                    }
                }
            }
        };
        let input = StepInput {
            event,
            event_value,
            chain: &chain.name,
            step,
            steps: outputs,
            attempt: trace.attempts,
            templates,
            scope: &scope,
        };
        let started = Instant::now();
        let result = handler.handle(&input).await;
        let took = started.elapsed();
        trace.duration_ms += took.as_secs_f64() * 1000.0;
        match result.and_then(|output| self.children_of(event, chain, step, output)) {
            Ok(finished) => {
                self.metrics
                    .step(&step.handler, StepResult::Ok, started.elapsed());
                trace.outcome = if finished.stop {
                    StepOutcome::Stopped
                } else {
                    StepOutcome::Ok
                };
                trace.output = Some(finished.data);
                trace.logs = finished.logs;
                trace.error = None;
                let published = finished.children.is_empty();
                Attempt::Done {
                    record: StepRecord {
                        trace,
                        children: finished.children,
                        published,
                    },
                    stop: finished.stop,
                    idempotency_key,
                    effects,
                }
            }
            Err(StepError::Retryable { message, after })
                if trace.attempts < policy.max_attempts =>
            {
                self.metrics
                    .step(&step.handler, StepResult::Retried, started.elapsed());
                let delay = after.unwrap_or_else(|| jitter(policy.delay(trace.attempts)));
                trace.outcome = StepOutcome::Retrying;
                trace.error = Some(message);
                Attempt::Retry {
                    delay,
                    pending: PendingRetry {
                        step: step.step_name().to_string(),
                        trace,
                    },
                }
            }
            Err(StepError::Retryable { message, .. }) => {
                let message = format!("{message} (gave up after {} attempts)", trace.attempts);
                failed(trace, message, effects, took)
            }
            Err(StepError::Permanent { message }) => failed(trace, message, effects, took),
        }
    }

    /// Puts the event of dead letter `id` back on the bus. A step failure
    /// resumes at the failed step (the steps before it are not run again);
    /// the letter is marked `replaying` until the chain ends, and is removed
    /// then, or filed again if the step fails again.
    pub async fn replay(&self, account: &str, id: &str) -> Result<DeadLetter, LetterError> {
        let not_found = || LetterError::NotFound {
            account: account.to_string(),
            id: id.to_string(),
        };
        let mut letter = self.dead_letters.get(account, id)?.ok_or_else(not_found)?;
        let Some(event) = letter.event.clone() else {
            return Err(LetterError::NoEvent(id.to_string()));
        };
        let journaled = self
            .journal
            .get(&event.id)?
            .filter(|j| j.chains.iter().any(|c| c.refers_to(id)));
        match journaled {
            Some(mut journal) => {
                for chain in &mut journal.chains {
                    if chain.refers_to(id) {
                        chain.end = None;
                        chain.retry = None;
                        chain.replaying = Some(id.to_string());
                    }
                }
                letter.status = LetterStatus::Replaying;
                let mut writes = self.journal.writes(&event.id, &journal).to_vec();
                writes.push(DeadLetters::write(&letter));
                self.store.write_atomically(&writes)?;
                self.store.flush().await?;
                self.put_back(&event, id).await?;
            }
            None => {
                // Poison of the depth limit or a failed condition (or a letter
                // whose journal is gone): the event is handled afresh and, if
                // it fails again, filed again under the same id.
                self.put_back(&event, id).await?;
                self.store
                    .write_atomically(&[DeadLetters::removal(account, id)])?;
                letter.status = LetterStatus::Replaying;
            }
        }
        tracing::info!(account, letter = id, event_id = %event.id, "dead letter replayed");
        Ok(letter)
    }

    async fn put_back(&self, event: &VumiApiEvent, id: &str) -> Result<(), LetterError> {
        // A dedup id of its own, so the bus does not drop the event as a
        // duplicate of its first publish, nor of an earlier replay.
        let dedup_id = format!("{}:replay:{}", event.id, uuid::Uuid::now_v7());
        self.bus
            .publish_as(event, &dedup_id)
            .await
            .map(|_| ())
            .map_err(|source| LetterError::Bus {
                id: id.to_string(),
                source,
            })
    }

    /// Removes dead letter `id` for good; the event's journal may then expire.
    pub async fn discard(&self, account: &str, id: &str) -> Result<DeadLetter, LetterError> {
        let letter = self
            .dead_letters
            .get(account, id)?
            .ok_or_else(|| LetterError::NotFound {
                account: account.to_string(),
                id: id.to_string(),
            })?;
        let mut writes = vec![DeadLetters::removal(account, id)];
        if let Some(event) = &letter.event
            && let Some(mut journal) = self.journal.get(&event.id)?
        {
            let mut changed = false;
            for chain in &mut journal.chains {
                if matches!(&chain.end, Some(ChainEnd::Dead { letter, .. }) if letter == id) {
                    chain.end = Some(ChainEnd::Discarded);
                    changed = true;
                }
            }
            if changed {
                writes.extend(self.journal.writes(&event.id, &journal));
            }
        }
        self.store.write_atomically(&writes)?;
        self.store.flush().await?;
        tracing::info!(account, letter = id, "dead letter discarded");
        Ok(letter)
    }

    /// Turns a step's emit requests into child events, checking their size.
    fn children_of(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        step: &StepSpec,
        output: StepOutput,
    ) -> Result<Finished, StepError> {
        let mut children = Vec::with_capacity(output.emit.len());
        for (i, request) in output.emit.into_iter().enumerate() {
            let id = EventId::derived(event.id, &chain.name, step.step_name(), i);
            let child = event.child(
                id,
                request.conversation_key,
                request.conversation_type,
                request.event_type,
                request.event_data,
            );
            child.encode(self.limits.max_event_bytes).map_err(|e| {
                StepError::permanent(format!(
                    "emitted event {} ({}): {e}",
                    i + 1,
                    child.event_type
                ))
            })?;
            children.push(child);
        }
        Ok(Finished {
            data: output.data,
            stop: output.stop,
            children,
            logs: output.logs,
        })
    }
}

/// What one pass over an event has yet to make durable.
#[derive(Debug, Default)]
struct Pass {
    /// A finished step with effects outside the dispatcher awaits a flush.
    unflushed: bool,
    /// The same, left by the worker's earlier event.
    earlier: Option<WriteMark>,
    /// The journal record has changes not yet written.
    unwritten: bool,
    /// The record must be kept: a side effect happened, or a retry or a
    /// dead letter refers to it.
    keep: bool,
}

impl Pass {
    /// Whether an outside effect's record may not be durable yet.
    fn awaits_flush(&self, store: &Store) -> bool {
        self.unflushed || self.earlier.is_some_and(|m| !store.is_durable(m))
    }

    /// A step finished (or failed under `on_error = "continue"`). One with
    /// effects is written at once, and one with effects outside the
    /// dispatcher is flushed before the next such step starts; one without
    /// waits for the event's end.
    fn finished(
        &mut self,
        executor: &Executor,
        event: &VumiApiEvent,
        journal: &EventJournal,
        effects: Effects,
    ) -> Result<(), StoreError> {
        if effects == Effects::None {
            self.unwritten = true;
            return Ok(());
        }
        executor.journal.put(&event.id, journal)?;
        self.unflushed |= effects == Effects::External;
        self.keep = true;
        self.unwritten = false;
        Ok(())
    }
}

/// A step's output, with its emit requests turned into events.
struct Finished {
    data: Map<String, Value>,
    stop: bool,
    children: Vec<VumiApiEvent>,
    logs: Vec<LogLine>,
}

/// What the trace shows of a chain, from its journal record: the finished
/// steps, then the one waiting for a retry or the one that failed, then
/// (once the chain has ended) the rest as skipped.
fn chain_trace(chain: &ChainSpec, record: &ChainJournal) -> ChainTrace {
    let mut steps: Vec<StepTrace> = record.steps.iter().map(|s| s.trace.clone()).collect();
    if let Some(retry) = &record.retry {
        steps.push(retry.trace.clone());
    }
    if let Some(ChainEnd::Dead { trace, .. }) = &record.end {
        steps.push(trace.clone());
    }
    if record.end.is_some() {
        for step in chain.steps.iter().skip(steps.len()) {
            steps.push(StepTrace {
                name: step.step_name().to_string(),
                handler: step.handler.clone(),
                outcome: StepOutcome::Skipped,
                attempts: 0,
                duration_ms: 0.0,
                output: None,
                error: None,
                logs: Vec::new(),
            });
        }
    }
    ChainTrace {
        name: chain.name.clone(),
        version: record.version,
        steps,
    }
}

/// A chain an event runs, or whose `when` condition could not be evaluated.
#[derive(Debug)]
pub enum Selected<'a> {
    /// Its match and condition hold: run it.
    Run(&'a ChainSpec),
    /// Its condition failed to evaluate (the error): a failure of that chain.
    ConditionFailed(&'a ChainSpec, String),
}

/// The chains `event` runs, in file order: every candidate whose `when`
/// holds (or that has none); when no candidate runs or fails, the `default`
/// chain if its match and condition hold. Conditions are evaluated together
/// on the blocking pool, against the event converted once.
pub async fn select_chains<'a>(
    registry: &Registry,
    event: &VumiApiEvent,
    event_value: &EventValue,
    chains: &'a AccountChains,
) -> Vec<Selected<'a>> {
    let candidates = chains.candidates(event);
    let default = chains.default_for(event);
    if !chains.has_conditions() {
        return if candidates.is_empty() {
            default.into_iter().map(Selected::Run).collect()
        } else {
            candidates.into_iter().map(Selected::Run).collect()
        };
    }
    let conditions: Vec<Option<String>> = candidates
        .iter()
        .chain(default.iter())
        .map(|c| c.when.clone())
        .collect();
    let runtime = registry.runtime().clone();
    let value = event_value.rhai(event).clone();
    let results = tokio::task::spawn_blocking(move || {
        conditions
            .iter()
            .map(|when| match when {
                None => Ok(true),
                Some(expr) => runtime
                    .compile_condition(expr)
                    .map_err(|e| e.to_string())
                    .and_then(|ast| runtime.eval_condition(&ast, &value)),
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_else(|e| {
        vec![Err(format!("evaluating conditions panicked: {e}")); candidates.len() + 1]
    });
    let mut selected = Vec::new();
    for (chain, result) in candidates.iter().zip(&results) {
        match result {
            Ok(true) => selected.push(Selected::Run(chain)),
            Ok(false) => {}
            Err(e) => selected.push(Selected::ConditionFailed(chain, e.clone())),
        }
    }
    if selected.is_empty()
        && let Some(chain) = default
    {
        match results.get(candidates.len()) {
            Some(Ok(true)) => selected.push(Selected::Run(chain)),
            Some(Err(e)) => selected.push(Selected::ConditionFailed(chain, e.clone())),
            _ => {}
        }
    }
    selected
}

/// Up to ±20% of `d`, so that retries of many events do not move in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.8 + (nanos % 1000) as f64 / 1000.0 * 0.4;
    d.mul_f64(factor)
}
