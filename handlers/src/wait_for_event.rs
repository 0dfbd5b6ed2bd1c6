//! `wait_for_event`: pauses the chain until a matching event arrives, or
//! until a timeout.
//!
//! Like `delay`, the step only says how the chain pauses
//! ([`StepOutput::pause`]); the dispatcher keeps the run, lets each arriving
//! event of the awaited type try its condition against it, and gives the
//! step its output when the run goes on: `matched = true` and the `event`
//! that matched, or `timed_out = true`.

use serde_json::{Map, Value};
use switchboard_sdk::EventType;
use time::format_description::well_known::Rfc3339;

use crate::options::{OptionSpec, Options};
use crate::{AwaitedEvent, Handler, Pause, StepError, StepInput, StepOutput};

/// `wait_for_event`: `event_type` (the awaited event's type), `match` (a
/// Rhai condition over `event`, the arriving event, `paused`, this run's
/// event, and `steps`, this run's step outputs; default: the same
/// conversation) and `timeout` (`"10m"`, `"24h"`).
#[derive(Debug, Clone, Copy)]
pub struct WaitForEvent;

fn check_event_type(s: &str) -> Result<(), String> {
    EventType::new(s).map(|_| ()).map_err(|e| e.to_string())
}

fn check_timeout(s: &str) -> Result<(), String> {
    crate::delay::check_positive(s, "a timeout")
}

#[async_trait::async_trait]
impl Handler for WaitForEvent {
    fn name(&self) -> &'static str {
        "wait_for_event"
    }

    fn description(&self) -> &'static str {
        "Pauses the chain until an event of `event_type` arrives for which `match` holds \
         (by default: one of the same conversation), or until `timeout` passes; then goes on \
         with the next step, which sees which happened. The pause is durable, like a delay's."
    }

    fn output(&self) -> &'static str {
        "`matched` and `event` (the event that came, or null), `timed_out` (true when none \
         came in time), `waiting_for` and `until` (when it would time out)"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text("event_type", "The type of the event to wait for.")
                .required()
                .no_template()
                .literal(check_event_type),
            OptionSpec::text(
                "match",
                format!(
                    "A Rhai condition an arriving event must meet, over `event` (the arriving \
                     event), `paused` (this run's event) and `steps` (this run's step outputs). \
                     Default: {}.",
                    switchboard_rules::SAME_CONVERSATION
                ),
            )
            .no_template(),
            OptionSpec::text(
                "timeout",
                "How long to wait at most: a number and a unit, ms, s, m, h or d (\"24h\").",
            )
            .required()
            .no_template()
            .literal(check_timeout),
        ])
    }

    fn match_conditions(&self, config: &Map<String, Value>) -> Vec<(&'static str, String)> {
        config
            .get("match")
            .and_then(Value::as_str)
            .map(|m| vec![("config.match", m.to_string())])
            .unwrap_or_default()
    }

    /// The pause is the dispatcher's to keep: the step changes nothing.
    fn effects(&self) -> crate::Effects {
        crate::Effects::None
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let config = &input.step.config.to_map();
        let text = |name: &str| config.get(name).and_then(Value::as_str);
        let event_type = text("event_type")
            .ok_or_else(|| StepError::permanent("config.event_type: required"))?;
        let timeout = switchboard_rules::duration::parse(text("timeout").unwrap_or_default())
            .map_err(|e| StepError::permanent(format!("config.timeout: {e}")))?;
        let condition = text("match")
            .unwrap_or(switchboard_rules::SAME_CONVERSATION)
            .to_string();
        let until = switchboard_sdk::now() + timeout;
        let until = until
            .replace_nanosecond(until.nanosecond() / 1_000_000 * 1_000_000)
            .unwrap_or(until);
        let mut data = Map::new();
        data.insert("waiting_for".into(), Value::String(event_type.to_string()));
        data.insert(
            "until".into(),
            Value::String(until.format(&Rfc3339).unwrap_or_default()),
        );
        Ok(StepOutput {
            data,
            pause: Some(Pause {
                until_ms: u64::try_from(until.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
                awaits: Some(AwaitedEvent {
                    event_type: event_type.to_string(),
                    condition,
                }),
                again: false,
                window: None,
            }),
            ..StepOutput::default()
        })
    }

    /// A dry run does not wait: it goes on as if the wait timed out.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let mut output = self.handle(input).await?;
        output.pause = None;
        output.data.insert("matched".into(), Value::Bool(false));
        output.data.insert("timed_out".into(), Value::Bool(true));
        output.data.insert("event".into(), Value::Null);
        Ok(output)
    }
}
