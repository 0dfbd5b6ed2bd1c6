//! The chain executor: takes one event from the bus to its end.
//!
//! Decode and validate (poison goes to dead letters); drop it if expired; send
//! it to dead letters if its lineage is too deep; find the chains it runs; run
//! each chain's steps in order, each seeing the earlier steps' outputs; publish
//! the events the steps emitted, with ids derived from (parent, chain, step,
//! index); record the trace. Then the caller acks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use switchboard_handlers::stores::IdempotencyStore;
use switchboard_handlers::{EventValue, LogLine, Registry, StepError, StepInput, StepOutput};
use switchboard_rules::{AccountChains, ChainSpec, ChainStore, OnError, StepSpec};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};

use crate::bus::Bus;
use crate::config::LimitsConfig;
use crate::metrics::{Metrics, Outcome};
use crate::records::{
    ChainTrace, DeadLetter, DeadLetters, DeadReason, StepOutcome, StepTrace, Trace, TraceStatus,
    Traces, UNKNOWN_ACCOUNT,
};

/// What the bus should do with a delivery once the executor is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (or filed as dead, expired, unrouted): ack it.
    Ack,
    /// Not finished (the bus could not take the emitted events): deliver again after the delay.
    Retry(Duration),
}

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
    /// Step idempotency keys.
    pub idempotency: IdempotencyStore,
    /// The store under traces and dead letters: flushed before an ack.
    pub store: switchboard_store::Store,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub limits: LimitsConfig,
    /// Subject prefix.
    pub prefix: String,
}

/// One chain's run, before it is written into the trace.
struct ChainRun {
    trace: ChainTrace,
    children: Vec<VumiApiEvent>,
    failure: Option<DeadLetter>,
    /// (step, rendered key) of the steps with idempotency keys that succeeded.
    idempotency_keys: Vec<(String, String)>,
}

impl Executor {
    /// Makes what was recorded about settled events durable (one flush
    /// covers every caller waiting at the time), before their acks.
    pub async fn make_durable(&self) -> Result<(), switchboard_store::StoreError> {
        self.store.flush().await
    }

    /// Decodes a payload taken from `subject`. Poison — bad JSON, a schema
    /// violation, an oversize payload, an event on the wrong subject — is filed
    /// in dead letters with the reason, and `None` is returned: ack it.
    pub fn decode(&self, subject: &str, payload: &[u8]) -> Option<VumiApiEvent> {
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
                self.metrics
                    .count(Outcome::Received, event.account_key.as_str());
                Some(event)
            }
            Err(error) => {
                let account = self.account_of_subject(subject);
                self.metrics.count(Outcome::Received, &account);
                tracing::warn!(subject, account, %error, "poison message: filed in dead letters");
                let mut letter = DeadLetter::new(&account, DeadReason::Poison, error);
                letter.subject = Some(subject.to_string());
                let limit = 64 * 1024;
                letter.payload = Some(
                    String::from_utf8_lossy(&payload[..payload.len().min(limit)]).into_owned(),
                );
                self.file_dead_letter(&letter);
                None
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

    fn file_dead_letter(&self, letter: &DeadLetter) {
        self.metrics
            .count(Outcome::DeadLettered, &letter.account_key);
        if let Err(e) = self.dead_letters.put(letter) {
            tracing::error!(error = %e, account = letter.account_key, "filing a dead letter failed");
        }
    }

    /// Handles one decoded event.
    pub async fn handle(&self, event: &VumiApiEvent) -> Disposition {
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

        if event.is_expired_at(started_at) {
            self.metrics.count(Outcome::Expired, account);
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
            let mut letter = DeadLetter::new(account, DeadReason::DepthLimit, error);
            letter.event = Some(event.clone());
            self.file_dead_letter(&letter);
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

        let mut children = Vec::new();
        let mut idempotency_keys = Vec::new();
        for selection in selected {
            let chain = match selection {
                Selected::Run(chain) => chain,
                Selected::ConditionFailed(chain, error) => {
                    let error = format!("the chain's `when` condition failed to evaluate: {error}");
                    tracing::warn!(account, event_id = %event.id, chain = chain.name, %error,
                        "condition failed: filed in dead letters");
                    trace.chains.push(ChainTrace {
                        name: chain.name.clone(),
                        version: account_chains.version(),
                        steps: vec![StepTrace {
                            name: "when".into(),
                            handler: "when".into(),
                            outcome: StepOutcome::Failed,
                            attempts: 1,
                            duration_ms: 0.0,
                            output: None,
                            error: Some(error.clone()),
                            logs: Vec::new(),
                        }],
                    });
                    let mut letter = DeadLetter::new(account, DeadReason::StepFailed, error);
                    letter.event = Some(event.clone());
                    letter.chain = Some(chain.name.clone());
                    letter.step = Some("when".into());
                    letter.attempts = 1;
                    self.file_dead_letter(&letter);
                    trace.status = TraceStatus::Dead;
                    continue;
                }
            };
            let run = self
                .run_chain(
                    event,
                    &event_value,
                    chain,
                    account_chains.version(),
                    &mut trace,
                )
                .await;
            idempotency_keys.extend(
                run.idempotency_keys
                    .into_iter()
                    .map(|(step, key)| (chain.name.clone(), step, key)),
            );
            trace.chains.push(run.trace);
            children.extend(run.children);
            if let Some(letter) = run.failure {
                self.file_dead_letter(&letter);
                trace.status = TraceStatus::Dead;
            }
        }

        for child in &children {
            if let Err(e) = self.bus.publish(child).await {
                tracing::warn!(account, event_id = %event.id, child = %child.id, error = %e,
                    "publishing an emitted event failed; the event will be handled again");
                trace.status = TraceStatus::Running;
                trace.children = children.iter().map(|c| c.id).collect();
                let _ = self.traces.put(&trace);
                return Disposition::Retry(Duration::from_secs(1));
            }
        }
        for (chain, step, key) in &idempotency_keys {
            if let Err(e) = self
                .idempotency
                .record(&event.account_key, chain, step, key)
            {
                tracing::error!(error = %e, "recording an idempotency key failed");
            }
        }
        trace.children = children.iter().map(|c| c.id).collect();
        if trace.status == TraceStatus::Done {
            self.metrics.count(Outcome::Handled, account);
        }
        self.finish(trace)
    }

    fn unrouted(&self, mut trace: Trace, why: &str) -> Disposition {
        let account = trace.event.account_key.as_str();
        self.metrics.count(Outcome::Unrouted, account);
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

    fn finish(&self, mut trace: Trace) -> Disposition {
        trace.finished_at = Some(switchboard_sdk::now());
        if let Err(e) = self.traces.put(&trace) {
            tracing::error!(error = %e, event_id = %trace.event.id, "recording a trace failed");
        }
        Disposition::Ack
    }

    async fn run_chain(
        &self,
        event: &VumiApiEvent,
        event_value: &EventValue,
        chain: &ChainSpec,
        version: u64,
        trace: &mut Trace,
    ) -> ChainRun {
        let mut run = ChainRun {
            trace: ChainTrace {
                name: chain.name.clone(),
                version,
                steps: Vec::with_capacity(chain.steps.len()),
            },
            children: Vec::new(),
            failure: None,
            idempotency_keys: Vec::new(),
        };
        let mut outputs = Map::new();
        let mut ended = false;
        for step in &chain.steps {
            if ended {
                run.trace.steps.push(StepTrace {
                    name: step.step_name().to_string(),
                    handler: step.handler.clone(),
                    outcome: StepOutcome::Skipped,
                    attempts: 0,
                    duration_ms: 0.0,
                    output: None,
                    error: None,
                    logs: Vec::new(),
                });
                continue;
            }
            let (step_trace, result) = self
                .run_step(event, event_value, chain, step, &outputs, trace, &run.trace)
                .await;
            match result {
                Ok(output) => {
                    run.children.extend(output.children);
                    if let Some(key) = output.idempotency_key {
                        run.idempotency_keys
                            .push((step.step_name().to_string(), key));
                    }
                    outputs.insert(step.step_name().to_string(), Value::Object(output.data));
                    ended = output.stop;
                }
                Err(error) => {
                    if step.on_error == OnError::Stop {
                        ended = true;
                        let mut letter = DeadLetter::new(
                            event.account_key.as_str(),
                            DeadReason::StepFailed,
                            &error,
                        );
                        letter.event = Some(event.clone());
                        letter.chain = Some(chain.name.clone());
                        letter.step = Some(step.step_name().to_string());
                        letter.attempts = step_trace.attempts;
                        tracing::warn!(account = %event.account_key, event_id = %event.id, chain = chain.name,
                            step = step.step_name(), %error, "step failed: filed in dead letters");
                        run.failure = Some(letter);
                    } else {
                        tracing::warn!(account = %event.account_key, event_id = %event.id, chain = chain.name,
                            step = step.step_name(), %error, "step failed; on_error = \"continue\"");
                    }
                }
            }
            run.trace.steps.push(step_trace);
        }
        run
    }

    /// Runs one step with its retry policy. On success returns the output and
    /// the child events it emitted.
    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        event: &VumiApiEvent,
        event_value: &EventValue,
        chain: &ChainSpec,
        step: &StepSpec,
        outputs: &Map<String, Value>,
        trace: &mut Trace,
        chain_so_far: &ChainTrace,
    ) -> (StepTrace, Result<StepSuccess, String>) {
        let policy = step.retry.clone().unwrap_or_default();
        let templates = self.registry.templates();
        let scope = templates.scope(event_value, outputs, &event.account_key);
        let mut step_trace = StepTrace {
            name: step.step_name().to_string(),
            handler: step.handler.clone(),
            outcome: StepOutcome::Failed,
            attempts: 0,
            duration_ms: 0.0,
            output: None,
            error: None,
            logs: Vec::new(),
        };
        let Some(handler) = self.registry.get(&step.handler) else {
            // Chains are checked when stored; a handler can only be missing if
            // the deployment lost it since.
            let error = format!(
                "handler {:?} is not available in this dispatcher",
                step.handler
            );
            step_trace.error = Some(error.clone());
            return (step_trace, Err(error));
        };
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
                    Err(error) => {
                        step_trace.error = Some(error.clone());
                        return (step_trace, Err(error));
                    }
                };
                let account = &event.account_key;
                match self.idempotency.seen(
                    account,
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
                        step_trace.outcome = StepOutcome::Skipped;
                        step_trace.output = Some(data.clone());
                        let success = StepSuccess {
                            data,
                            stop: false,
                            children: Vec::new(),
                            logs: Vec::new(),
                            idempotency_key: None,
                        };
                        return (step_trace, Ok(success));
                    }
                    Ok(false) => Some(key),
                    Err(e) => {
                        let error = format!("reading idempotency keys: {e}");
                        step_trace.error = Some(error.clone());
                        return (step_trace, Err(error));
                    }
                }
            }
        };
        loop {
            step_trace.attempts += 1;
            let input = StepInput {
                event,
                event_value,
                chain: &chain.name,
                step,
                steps: outputs,
                attempt: step_trace.attempts,
                templates,
                scope: &scope,
            };
            let started = Instant::now();
            let result = handler.handle(&input).await;
            step_trace.duration_ms += started.elapsed().as_secs_f64() * 1000.0;
            let result = result.and_then(|output| self.children_of(event, chain, step, output));
            match result {
                Ok(mut success) => {
                    // Recorded once the event's emitted events are on the bus:
                    // a re-run before then must run the step again.
                    success.idempotency_key = idempotency_key.clone();
                    step_trace.outcome = if success.stop {
                        StepOutcome::Stopped
                    } else {
                        StepOutcome::Ok
                    };
                    step_trace.output = Some(success.data.clone());
                    step_trace.logs = success.logs.clone();
                    step_trace.error = None;
                    return (step_trace, Ok(success));
                }
                Err(StepError::Retryable { message, after })
                    if step_trace.attempts < policy.max_attempts =>
                {
                    self.metrics
                        .count(Outcome::Retried, event.account_key.as_str());
                    let delay = after.unwrap_or_else(|| jitter(policy.delay(step_trace.attempts)));
                    tracing::info!(account = %event.account_key, event_id = %event.id, chain = chain.name,
                        step = step.step_name(), attempt = step_trace.attempts, delay_ms = delay.as_millis() as u64,
                        error = %message, "step failed; retrying");
                    step_trace.outcome = StepOutcome::Retrying;
                    step_trace.error = Some(message);
                    // Let a reader of the trace see the wait.
                    let mut running = trace.clone();
                    running.status = TraceStatus::Running;
                    let mut chain_now = chain_so_far.clone();
                    chain_now.steps.push(step_trace.clone());
                    running.chains.push(chain_now);
                    let _ = self.traces.put(&running);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    let message = match &e {
                        StepError::Retryable { message, .. } => {
                            format!("{message} (gave up after {} attempts)", step_trace.attempts)
                        }
                        StepError::Permanent { message } => message.clone(),
                    };
                    step_trace.outcome = StepOutcome::Failed;
                    step_trace.error = Some(message.clone());
                    return (step_trace, Err(message));
                }
            }
        }
    }

    /// Turns a step's emit requests into child events, checking their size.
    fn children_of(
        &self,
        event: &VumiApiEvent,
        chain: &ChainSpec,
        step: &StepSpec,
        output: StepOutput,
    ) -> Result<StepSuccess, StepError> {
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
        Ok(StepSuccess {
            data: output.data,
            stop: output.stop,
            children,
            logs: output.logs,
            idempotency_key: None,
        })
    }
}

struct StepSuccess {
    data: Map<String, Value>,
    stop: bool,
    children: Vec<VumiApiEvent>,
    logs: Vec<LogLine>,
    /// The step's rendered idempotency key, to record once the event is done.
    idempotency_key: Option<String>,
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
