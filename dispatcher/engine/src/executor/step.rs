//! One attempt at one step: its idempotency key, the handler's call, the
//! events it emits turned into children with derived ids, and what the
//! attempt leads to (by the [policy](super::policy)).

use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use switchboard_handlers::records::IdempotencyKeys;
use switchboard_handlers::{
    Effects, EventValue, Handler, LogLine, Registry, StepError, StepInput, StepOutput, StepRef,
};
use switchboard_rules::{ChainSpec, StepSpec};
use switchboard_sdk::{EventId, VumiApiEvent};

use super::policy::{self, Failure, Verdict};
use crate::journal::{PendingRetry, StepRecord};
use crate::metrics::{Metrics, StepResult};
use crate::trace::{StepOutcome, StepTrace};

/// What an attempt at a step came to.
pub(super) enum Attempt {
    /// It finished: succeeded, or was skipped by its idempotency key.
    Done {
        record: StepRecord,
        stop: bool,
        /// What it changed besides its output.
        effects: Effects,
        /// The chain pauses after it.
        pause: Option<switchboard_handlers::Pause>,
    },
    /// It failed and is worth trying again after `delay`.
    Retry {
        delay: Duration,
        pending: PendingRetry,
    },
    /// It failed for good (or ran out of attempts) under `on_error = "continue"`.
    Continue { trace: StepTrace, effects: Effects },
    /// It failed for good: the chain ends in dead letters.
    Failed { trace: StepTrace, message: String },
}

/// Runs steps: the handlers, their idempotency keys, the step metrics.
#[derive(Debug)]
pub(super) struct Steps<'a> {
    pub registry: &'a Registry,
    pub idempotency: &'a dyn IdempotencyKeys,
    pub metrics: &'a Metrics,
    pub max_event_bytes: usize,
}

/// The event a step runs for and the chain it belongs to.
pub(super) struct StepContext<'a> {
    pub event: &'a VumiApiEvent,
    pub event_value: &'a EventValue,
    pub chain: &'a ChainSpec,
    /// The outputs of the chain's earlier steps, by name.
    pub outputs: &'a Map<String, Value>,
}

impl Steps<'_> {
    /// Makes one attempt at `step` (`prior` is its trace from earlier
    /// attempts, if any).
    pub async fn attempt(
        &self,
        cx: &StepContext<'_>,
        step: &StepSpec,
        prior: Option<StepTrace>,
    ) -> Attempt {
        let templates = self.registry.templates();
        let scope = templates.scope(cx.event_value, cx.outputs, &cx.event.account_key);
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
        let Some(handler) = self.registry.get(&step.handler) else {
            // Chains are checked when stored; a handler can only be missing if
            // the deployment lost it since.
            let error = format!(
                "handler {:?} is not available in this dispatcher",
                step.handler
            );
            return self.failed(
                step,
                trace,
                Failure::Permanent { message: error },
                Effects::None,
                Duration::ZERO,
            );
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
                    Err(message) => {
                        return self.failed(
                            step,
                            trace,
                            Failure::Permanent { message },
                            Effects::None,
                            Duration::ZERO,
                        );
                    }
                };
                // Claimed before the step runs: of two events running it at
                // once with the same key, one runs it.
                match self.idempotency.claim(
                    &cx.event.account_key,
                    &cx.chain.name,
                    step.step_name(),
                    &key,
                    spec.window,
                    &cx.event.id.to_string(),
                ) {
                    Ok(false) => return self.skipped(step, trace, spec.window),
                    Ok(true) => Some(key),
                    // The store failed or was contended: the step has not
                    // run; try again.
                    Err(e) => {
                        let message = format!("claiming its idempotency key: {e}");
                        return self.failed(
                            step,
                            trace,
                            Failure::Retryable {
                                message,
                                after: None,
                            },
                            Effects::None,
                            Duration::ZERO,
                        );
                    }
                }
            }
        };
        let input = StepInput {
            event: cx.event,
            event_value: cx.event_value,
            chain: &cx.chain.name,
            step,
            steps: cx.outputs,
            attempt: trace.attempts,
            templates,
            scope: &scope,
        };
        let started = Instant::now();
        // A handler that panics fails its step for good, naming the panic,
        // as any other permanent error: the chain ends in dead letters (or
        // goes on, under `on_error = "continue"`), and the worker goes on.
        let mut panicked = false;
        let result = crate::panicked::caught(handler.handle(&input))
            .await
            .unwrap_or_else(|panic| {
                panicked = true;
                tracing::error!(account = %cx.event.account_key, event_id = %cx.event.id,
                    chain = %cx.chain.name, step = step.step_name(), handler = %step.handler,
                    panic = %panic, "a handler panicked; the step fails for good");
                Err(StepError::permanent(format!(
                    "handler {:?} panicked: {panic}",
                    step.handler
                )))
            });
        let took = started.elapsed();
        trace.duration_ms += took.as_secs_f64() * 1000.0;
        // Whether the handler itself failed: only then did the step not
        // happen (an output that cannot become children came from a step
        // whose effect did).
        let happened = result.is_ok();
        match result.and_then(|output| self.children_of(cx, step, output)) {
            Ok(finished) => {
                self.metrics.step(&step.handler, StepResult::Ok, took);
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
                    effects,
                    pause: finished.pause,
                }
            }
            Err(e) => {
                let failure = match e {
                    StepError::Retryable { message, after } => {
                        Failure::Retryable { message, after }
                    }
                    StepError::Permanent { message } => Failure::Permanent { message },
                };
                let mut attempt = self.failed(step, trace, failure, effects, took);
                if let Attempt::Retry { pending, .. } = &mut attempt {
                    pending.claimed = idempotency_key.clone();
                }
                // (And whether a dead letter's replay may run it again.)
                let gave_up = match &attempt {
                    Attempt::Failed { message, .. } => Some((message.as_str(), true)),
                    Attempt::Continue { trace, .. } => {
                        Some((trace.error.as_deref().unwrap_or(""), false))
                    }
                    Attempt::Retry { .. } | Attempt::Done { .. } => None,
                };
                // A step that failed for good did not happen: what it
                // recorded as still to do is let go, and its key goes back
                // (a retry keeps it, as its own) unless part of it happened.
                // A handler that panicked may have acted before it did (an
                // error it returns says it did not): its key holds.
                if let (Some(failure), false) = (gave_up, happened) {
                    let_go(
                        self.idempotency,
                        Some(handler.as_ref()),
                        &input.as_ref(),
                        (idempotency_key.as_deref().filter(|_| !panicked), failure),
                    );
                }
                attempt
            }
        }
    }

    /// A failed attempt, judged by the policy.
    fn failed(
        &self,
        step: &StepSpec,
        mut trace: StepTrace,
        failure: Failure,
        effects: Effects,
        took: Duration,
    ) -> Attempt {
        let retry = step.retry.clone().unwrap_or_default();
        let message = match &failure {
            Failure::Retryable { message, .. } | Failure::Permanent { message } => message.clone(),
        };
        match policy::after_failure(
            failure,
            trace.attempts,
            &retry,
            step.on_error,
            policy::jitter(),
        ) {
            Verdict::Retry(delay) => {
                self.metrics.step(&step.handler, StepResult::Retried, took);
                trace.outcome = StepOutcome::Retrying;
                trace.error = Some(message);
                Attempt::Retry {
                    delay,
                    pending: PendingRetry {
                        step: step.step_name().to_string(),
                        trace,
                        claimed: None,
                    },
                }
            }
            Verdict::Continue(message) => {
                self.metrics.step(&step.handler, StepResult::Failed, took);
                trace.outcome = StepOutcome::Failed;
                trace.error = Some(message);
                Attempt::Continue { trace, effects }
            }
            Verdict::DeadLetter(message) => {
                self.metrics.step(&step.handler, StepResult::Failed, took);
                trace.outcome = StepOutcome::Failed;
                trace.error = Some(message.clone());
                Attempt::Failed { trace, message }
            }
        }
    }

    /// A step skipped because its idempotency key was seen within its window.
    fn skipped(&self, step: &StepSpec, mut trace: StepTrace, window: Duration) -> Attempt {
        let mut data = Map::new();
        data.insert("skipped".into(), Value::Bool(true));
        data.insert(
            "reason".into(),
            Value::String(format!(
                "idempotency key seen within {}",
                switchboard_rules::duration::format(window)
            )),
        );
        self.metrics
            .step(&step.handler, StepResult::Ok, Duration::ZERO);
        trace.outcome = StepOutcome::Skipped;
        trace.output = Some(data);
        trace.error = None;
        Attempt::Done {
            record: StepRecord {
                trace,
                children: Vec::new(),
                published: true,
            },
            stop: false,
            effects: Effects::None,
            pause: None,
        }
    }

    /// Turns a step's emit requests into child events, checking their size.
    fn children_of(
        &self,
        cx: &StepContext<'_>,
        step: &StepSpec,
        output: StepOutput,
    ) -> Result<Finished, StepError> {
        let children = emitted_events(
            cx.event,
            &cx.chain.name,
            step.step_name(),
            output.emit,
            self.max_event_bytes,
        )?;
        Ok(Finished {
            data: output.data,
            stop: output.stop,
            children,
            logs: output.logs,
            pause: output.pause,
        })
    }
}

/// The events a step of `chain` asks to emit, as the dispatcher makes them
/// (ids derived from the event, chain, step and index, so that a re-run
/// emits the same ids); a permanent error when one is larger than
/// `max_event_bytes`. Dry runs make them the same way.
pub fn emitted_events(
    event: &VumiApiEvent,
    chain: &str,
    step: &str,
    emit: impl IntoIterator<Item = switchboard_handlers::EmitRequest>,
    max_event_bytes: usize,
) -> Result<Vec<VumiApiEvent>, StepError> {
    emit.into_iter()
        .enumerate()
        .map(|(i, request)| {
            let mut child = event.child(
                EventId::derived(event.id, chain, step, i),
                request.conversation_key,
                request.conversation_type,
                request.event_type,
                request.event_data,
            );
            if let Some(at) = request.expires_at {
                child.expires_at = Some(at);
            }
            child.encode(max_event_bytes).map_err(|e| {
                StepError::permanent(format!(
                    "emitted event {} ({}): {e}",
                    i + 1,
                    child.event_type
                ))
            })?;
            Ok(child)
        })
        .collect()
}

/// A step's output, with its emit requests turned into events.
struct Finished {
    data: Map<String, Value>,
    stop: bool,
    children: Vec<VumiApiEvent>,
    logs: Vec<LogLine>,
    pause: Option<switchboard_handlers::Pause>,
}

/// Lets go of what `step`, failed for good or never to be tried again (its
/// run ended first), with `error`, holds: what its `handler` recorded as
/// still to do (`replayable`: a dead letter's replay may run it again),
/// and its idempotency `key` unless part of the step's effect happened all
/// the same.
pub(super) fn let_go(
    idempotency: &dyn IdempotencyKeys,
    handler: Option<&dyn Handler>,
    step: &StepRef<'_>,
    (key, (error, replayable)): (Option<&str>, (&str, bool)),
) {
    let account = &step.event.account_key;
    // A handler that cannot tell (its records could not be read) may have
    // done part of it: the key holds.
    let happened_in_part = handler.is_some_and(|h| {
        h.failed_for_good(step, error, replayable)
            .unwrap_or_else(|e| {
                tracing::warn!(account = %account, chain = step.chain, step = step.step,
                    error = %e, "settling what a step that failed for good left undone failed; \
                    its records stay as they are and its idempotency key holds");
                true
            })
    });
    if happened_in_part {
        return;
    }
    if let Some(key) = key
        && let Err(e) = idempotency.release(
            account,
            step.chain,
            step.step,
            key,
            &step.event.id.to_string(),
        )
    {
        tracing::warn!(account = %account, chain = step.chain, step = step.step, error = %e,
            "giving back the idempotency key of a step that failed for good failed; \
             the key holds until its window ends");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use switchboard_handlers::EmitRequest;
    use switchboard_sdk::{DEFAULT_MAX_EVENT_BYTES, EventType, MAX_DATA_DEPTH};

    use super::*;

    /// A step (a script, or `emit` with templated data) asking to emit an
    /// event whose data nests deeper than a consumer takes fails for good,
    /// naming the event, instead of putting poison on the bus; one as deep
    /// as allowed is emitted.
    #[test]
    fn an_emitted_event_nested_too_deep_fails_the_step() {
        let event = crate::journal::tests::event(1);
        let request = |levels: usize| {
            // `event_data` is the first of `levels` objects.
            let mut deep = json!(1);
            for _ in 0..levels {
                deep = json!({ "a": deep });
            }
            EmitRequest {
                conversation_type: event.conversation_type.clone(),
                conversation_key: event.conversation_key.clone(),
                event_type: EventType::new("deep").unwrap(),
                event_data: deep.as_object().cloned().unwrap_or_default(),
                expires_at: None,
            }
        };
        let emit = |levels| {
            emitted_events(
                &event,
                "chain",
                "step",
                [request(levels)],
                DEFAULT_MAX_EVENT_BYTES,
            )
        };
        assert_eq!(emit(MAX_DATA_DEPTH).unwrap().len(), 1);
        let error = emit(MAX_DATA_DEPTH + 1).unwrap_err();
        assert!(!error.is_retryable());
        let message = error.to_string();
        assert!(
            message.contains("emitted event 1 (deep)") && message.contains("64 levels"),
            "{message}"
        );
    }

    /// A handler whose call panics, as a library under it may on an input
    /// it does not expect.
    #[derive(Debug)]
    struct Panics;

    #[async_trait::async_trait]
    impl Handler for Panics {
        fn name(&self) -> &'static str {
            "panics"
        }
        fn description(&self) -> &'static str {
            "Panics."
        }
        fn output(&self) -> &'static str {
            "Nothing."
        }
        fn options(&self) -> switchboard_handlers::Options {
            switchboard_handlers::Options::default()
        }
        async fn handle(&self, _: &StepInput<'_>) -> Result<StepOutput, StepError> {
            panic!("the receiver's answer has no status")
        }
        async fn simulate(&self, _: &StepInput<'_>) -> Result<StepOutput, StepError> {
            Ok(StepOutput::default())
        }
    }

    /// A handler that panics fails its step for good, the error naming the
    /// handler and what the panic said; the panic goes no further than the
    /// step, so the worker that ran it goes on with the next event. Under
    /// `on_error = "continue"` the chain goes on past it. Its idempotency
    /// key holds, since it may have acted before it panicked.
    #[tokio::test]
    async fn a_handler_that_panics_fails_its_step_for_good() {
        let mut registry = Registry::empty();
        registry.register(std::sync::Arc::new(Panics));
        let store = switchboard_store::Store::temporary().unwrap();
        let idempotency = switchboard_state::StoredIdempotencyKeys::new(store);
        let metrics = Metrics::new(Default::default());
        let steps = Steps {
            registry: &registry,
            idempotency: &idempotency,
            metrics: &metrics,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        };
        let event = crate::journal::tests::event(1);
        let event_value = EventValue::new(&event);
        for (on_error, continues) in [("stop", false), ("continue", true)] {
            let chain: ChainSpec = serde_json::from_value(json!({
                "name": "chain",
                "steps": [{
                    "handler": "panics",
                    "on_error": on_error,
                    "idempotency": { "key": "order-{{ event.event_type }}", "window": "3600s" },
                }],
            }))
            .unwrap();
            let cx = StepContext {
                event: &event,
                event_value: &event_value,
                chain: &chain,
                outputs: &Map::new(),
            };
            let (trace, message) = match steps.attempt(&cx, &chain.steps[0], None).await {
                Attempt::Failed { trace, message } if !continues => (trace, message),
                Attempt::Continue { trace, .. } if continues => {
                    let message = trace.error.clone().unwrap_or_default();
                    (trace, message)
                }
                Attempt::Failed { .. } | Attempt::Continue { .. } => {
                    panic!("{on_error}: the chain should go on: {continues}")
                }
                Attempt::Retry { .. } => panic!("a panic was retried ({on_error})"),
                Attempt::Done { .. } => panic!("a panic counted as done ({on_error})"),
            };
            assert_eq!(trace.outcome, StepOutcome::Failed, "{on_error}");
            assert_eq!(trace.attempts, 1, "{on_error}");
            assert_eq!(
                message, "handler \"panics\" panicked: the receiver's answer has no status",
                "{on_error}"
            );
            // It may have acted before it panicked: its idempotency key
            // holds against another event.
            let claimed = idempotency
                .claim(
                    &event.account_key,
                    "chain",
                    "panics",
                    "order-poll_complete",
                    Duration::from_secs(3600),
                    &format!("another event ({on_error})"),
                )
                .unwrap();
            assert!(!claimed, "{on_error}: the key was given back");
        }
    }
}
