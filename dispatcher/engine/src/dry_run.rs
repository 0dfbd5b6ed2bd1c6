//! Dry runs: what a script, or an account's chains, would do with a sample
//! event — with no side effect. Scripts run (their `emit`s are captured, not
//! published; `contact()` only reads); built-in handlers are simulated
//! ([`switchboard_handlers::Handler::simulate`]): each makes every check it
//! would make before acting and returns the output it would give, so that
//! later steps' templates resolve, and its rendered config is returned as
//! `would_run`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::{Map, Value, json};
use switchboard_handlers::script::ScriptRun;
use switchboard_handlers::{
    EmitRequest, EventConditions, EventValue, Registry, StepError, StepInput, StepOutput,
};
use switchboard_rules::{AccountChains, ChainSpec, OnError, Selected, StepSpec, select_chains};
use switchboard_sdk::{AccountKey, VumiApiEvent};

use crate::executor::emitted_events;

/// A sample event, with the step outputs and config a script test runs against.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The event.
    pub event: VumiApiEvent,
    /// What `steps` holds (script tests only).
    pub steps: Map<String, Value>,
    /// The step's config (script tests only; templates are rendered).
    pub config: Map<String, Value>,
}

/// Reads a sample: an event (fields a producer may omit get defaults, and
/// `account_key` defaults to `account`), or `{"event": {...}, "steps": {...},
/// "config": {...}}`.
pub fn parse_sample(body: &[u8], account: &AccountKey, max_bytes: usize) -> Result<Sample, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the sample is not JSON: {e}"))?;
    let Value::Object(mut map) = value else {
        return Err("the sample must be a JSON object: an event, or {\"event\": ...}".into());
    };
    let wrapped =
        matches!(map.get("event"), Some(Value::Object(_))) && !map.contains_key("event_type");
    let (mut event, steps, config) = if wrapped {
        let event = map.remove("event").unwrap_or_default();
        let steps = map.remove("steps").unwrap_or_else(|| json!({}));
        let config = map.remove("config").unwrap_or_else(|| json!({}));
        if let Some(extra) = map.keys().next() {
            return Err(format!(
                "unknown sample field {extra:?}; a sample holds event, steps and config"
            ));
        }
        (event, steps, config)
    } else {
        (Value::Object(map), json!({}), json!({}))
    };
    let (Value::Object(steps), Value::Object(config)) = (steps, config) else {
        return Err("the sample's steps and config must be JSON objects".into());
    };
    let event_map = event
        .as_object_mut()
        .ok_or("the sample's event must be a JSON object")?;
    match event_map.get("account_key") {
        None => {
            event_map.insert("account_key".into(), Value::String(account.to_string()));
        }
        Some(Value::String(a)) if a == account.as_str() => {}
        Some(other) => {
            return Err(format!(
                "the sample event is for account {other}, but the test runs in account {account}"
            ));
        }
    }
    let bytes = serde_json::to_vec(&event).expect("a JSON value serialises");
    let event = VumiApiEvent::decode_with_defaults(&bytes, max_bytes)
        .map_err(|e| format!("the sample event: {e}"))?;
    Ok(Sample {
        event,
        steps,
        config,
    })
}

fn emits_json(emits: &[EmitRequest]) -> Value {
    Value::Array(
        emits
            .iter()
            .map(|e| {
                json!({
                    "conversation_type": e.conversation_type,
                    "conversation_key": e.conversation_key,
                    "event_type": e.event_type,
                    "event_data": e.event_data,
                })
            })
            .collect(),
    )
}

/// A script run, as dry runs report it.
fn script_run_json(run: &ScriptRun) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("version".into(), json!(run.version));
    describe_result(&run.result, &mut out);
    out.insert("logs".into(), json!(run.logs));
    out.insert("operations".into(), json!(run.operations));
    out.insert(
        "duration_ms".into(),
        json!(run.duration.as_secs_f64() * 1000.0),
    );
    out
}

fn describe_result(result: &Result<StepOutput, StepError>, out: &mut Map<String, Value>) {
    match result {
        Ok(output) => {
            out.insert(
                "outcome".into(),
                json!(if output.stop { "stopped" } else { "ok" }),
            );
            out.insert("output".into(), Value::Object(output.data.clone()));
            out.insert("emits".into(), emits_json(&output.emit));
            out.insert("error".into(), Value::Null);
            if !output.logs.is_empty() {
                out.insert("logs".into(), json!(output.logs));
            }
        }
        Err(StepError::Retryable { message, after }) => {
            out.insert("outcome".into(), json!("retry"));
            out.insert("output".into(), Value::Null);
            out.insert("emits".into(), json!([]));
            out.insert("error".into(), json!(message));
            out.insert(
                "retry_after_ms".into(),
                json!(after.map(|d| d.as_millis() as u64)),
            );
        }
        Err(StepError::Permanent { message }) => {
            out.insert("outcome".into(), json!("failed"));
            out.insert("output".into(), Value::Null);
            out.insert("emits".into(), json!([]));
            out.insert("error".into(), json!(message));
        }
    }
}

/// Runs the stored script `name` against a sample, with no side effect.
pub async fn test_script(
    registry: &Registry,
    account: &AccountKey,
    name: &str,
    sample: &Sample,
) -> Result<Value, String> {
    let handler = registry
        .script_handler()
        .ok_or("this dispatcher has no script store")?;
    let step = StepSpec {
        handler: format!("script:{name}"),
        name: None,
        config: sample.config.clone().into(),
        on_error: OnError::Stop,
        retry: None,
        idempotency: None,
    };
    let event_value = EventValue::new(&sample.event);
    let templates = registry.templates();
    let scope = templates.scope(&event_value, &sample.steps, account);
    let input = StepInput {
        event: &sample.event,
        event_value: &event_value,
        chain: "(test)",
        step: &step,
        steps: &sample.steps,
        attempt: 1,
        templates,
        scope: &scope,
    };
    let run = handler.run(&input).await.map_err(|e| e.to_string())?;
    let mut out = Map::new();
    out.insert("account_key".into(), json!(account));
    out.insert("script".into(), json!(name));
    out.extend(script_run_json(&run));
    Ok(Value::Object(out))
}

/// What an account's chains would do with a sample event, with no side effect.
/// The events its steps would emit are followed into the chains they would
/// run (each step's `children`), down to `max_depth`; one deeper is reported
/// as the dispatcher would file it, in dead letters.
pub async fn test_chains(
    registry: &Registry,
    chains: &AccountChains,
    event: &VumiApiEvent,
    limits: FollowLimits,
) -> Value {
    let followed = AtomicUsize::new(0);
    Box::pin(report(registry, chains, event, limits, &followed)).await
}

/// How far a dry run follows emitted events.
#[derive(Debug, Clone, Copy)]
pub struct FollowLimits {
    /// The dispatcher's `[limits] max_depth`: a deeper event is reported as
    /// filed in dead letters.
    pub max_depth: u32,
    /// The dispatcher's largest event: a step emitting a larger one fails,
    /// as it would.
    pub max_event_bytes: usize,
}

/// Emitted events a dry run follows into their chains, at most; those
/// beyond are listed but not followed, so that a chain fanning out to the
/// depth limit cannot make a dry run unbounded.
pub const MAX_FOLLOWED: usize = 1_000;

async fn report(
    registry: &Registry,
    chains: &AccountChains,
    event: &VumiApiEvent,
    limits: FollowLimits,
    followed: &AtomicUsize,
) -> Value {
    let event_value = EventValue::new(event);
    // The executor's own selection, so that the dry run shows what the
    // dispatcher would do.
    let runtime = registry.runtime();
    let selected = runtime.run_sandboxed(|| {
        select_chains(
            chains,
            event,
            &mut EventConditions::new(runtime, event, &event_value),
        )
    });
    let mut chains_out = Vec::new();
    for candidate in chains.candidates(event) {
        let considered = selected.iter().any(|s| s.chain().name == candidate.name);
        if !considered {
            chains_out.push(json!({
                "name": candidate.name,
                "when": candidate.when(),
                "condition": "false",
                "runs": false,
                "steps": [],
            }));
        }
    }
    for selection in &selected {
        match selection {
            Selected::Run(chain) => {
                let steps = test_chain(
                    registry,
                    chains,
                    (event, &event_value),
                    chain,
                    limits,
                    followed,
                )
                .await;
                chains_out.push(json!({
                    "name": chain.name,
                    "when": chain.when(),
                    "condition": if chain.when().is_some() { "true" } else { "none" },
                    "runs": true,
                    "steps": steps,
                }));
            }
            Selected::ConditionFailed(chain, error) => chains_out.push(json!({
                "name": chain.name,
                "when": chain.when(),
                "condition": "error",
                "error": error,
                "runs": false,
                "steps": [],
            })),
        }
    }
    let default_runs = selected
        .iter()
        .any(|s| matches!(s, Selected::Run(c) if c.name == switchboard_rules::DEFAULT_CHAIN));
    json!({
        "account_key": event.account_key,
        "chain_version": chains.version(),
        "event": event,
        "unrouted": selected.is_empty(),
        "default_chain_runs": default_runs,
        "chains": chains_out,
    })
}

async fn test_chain(
    registry: &Registry,
    chains: &AccountChains,
    (event, event_value): (&VumiApiEvent, &EventValue),
    chain: &ChainSpec,
    limits: FollowLimits,
    followed: &AtomicUsize,
) -> Vec<Value> {
    let templates = registry.templates();
    let mut outputs = Map::new();
    let mut ended = false;
    let mut steps = Vec::new();
    for step in &chain.steps {
        let mut out = Map::new();
        out.insert("name".into(), json!(step.step_name()));
        out.insert("handler".into(), json!(step.handler));
        if ended {
            out.insert("outcome".into(), json!("skipped"));
            steps.push(Value::Object(out));
            continue;
        }
        let scope = templates.scope(event_value, &outputs, &event.account_key);
        let input = StepInput {
            event,
            event_value,
            chain: &chain.name,
            step,
            steps: &outputs,
            attempt: 1,
            templates,
            scope: &scope,
        };
        let started = Instant::now();
        let result: Result<StepOutput, StepError> = if step.handler.starts_with("script:") {
            match registry.script_handler() {
                Some(handler) => match handler.run(&input).await {
                    Ok(run) => {
                        out.insert("action".into(), json!("ran"));
                        out.extend(script_run_json(&run));
                        run.result
                    }
                    Err(e) => Err(e),
                },
                None => Err(StepError::permanent("this dispatcher has no script store")),
            }
        } else {
            match registry.get(&step.handler) {
                Some(handler) => {
                    out.insert("action".into(), json!("simulated"));
                    let simulated = handler.simulate(&input).await;
                    if simulated.is_ok()
                        && let Ok(config) = input.render_config()
                    {
                        out.insert(
                            "would_run".into(),
                            json!({"handler": step.handler, "config": config}),
                        );
                    }
                    simulated
                }
                None => Err(StepError::permanent(format!(
                    "handler {:?} is not available in this dispatcher",
                    step.handler
                ))),
            }
        };
        // The events it would emit, each checked as the dispatcher checks
        // it before publishing: one too large fails the step.
        let (result, children) = match result {
            Ok(output) => match emitted_events(
                event,
                &chain.name,
                step.step_name(),
                output.emit.iter().cloned(),
                limits.max_event_bytes,
            ) {
                Ok(children) => (Ok(output), children),
                Err(e) => {
                    out.remove("outcome");
                    (Err(e), Vec::new())
                }
            },
            Err(e) => (Err(e), Vec::new()),
        };
        if !out.contains_key("outcome") {
            describe_result(&result, &mut out);
            out.insert(
                "duration_ms".into(),
                json!(started.elapsed().as_secs_f64() * 1000.0),
            );
        }
        match result {
            Ok(output) => {
                ended = output.stop;
                let mut reports = Vec::with_capacity(children.len());
                let mut not_followed = 0;
                for child in children {
                    if child.depth > limits.max_depth {
                        reports.push(json!({
                            "event": child,
                            "error": format!(
                                "event depth {} is over the limit of {}: it would be \
                                 filed in dead letters",
                                child.depth, limits.max_depth
                            ),
                        }));
                    } else if followed.fetch_add(1, Ordering::Relaxed) >= MAX_FOLLOWED {
                        not_followed += 1;
                    } else {
                        reports.push(
                            Box::pin(report(registry, chains, &child, limits, followed)).await,
                        );
                    }
                }
                if not_followed > 0 {
                    reports.push(json!({
                        "not_followed": not_followed,
                        "reason": format!("a dry run follows at most {MAX_FOLLOWED} emitted events"),
                    }));
                }
                let children = reports;
                if !children.is_empty() {
                    out.insert("children".into(), Value::Array(children));
                }
                outputs.insert(step.step_name().to_string(), Value::Object(output.data));
            }
            Err(_) => {
                if step.on_error == OnError::Stop {
                    ended = true;
                }
            }
        }
        steps.push(Value::Object(out));
    }
    steps
}
