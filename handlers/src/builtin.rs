//! Built-in handlers that need no outside peer: `log` and `emit`.

use serde_json::{Map, Value};
use switchboard_sdk::{ConversationKey, ConversationType, EventType};

use crate::options::{OptionSpec, Options, check_key, rendered_key, rendered_string};
use crate::{EmitRequest, Handler, StepError, StepInput, StepOutput};

/// `log`: writes a structured tracing line, kept in the trace as the step's
/// log line; outputs nothing.
///
/// Options: `message` (template; default names the event), `level` (`trace`,
/// `debug`, `info` (default), `warn`, `error`), `fields` (an object of templates).
#[derive(Debug, Clone, Copy)]
pub struct Log;

const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

#[async_trait::async_trait]
impl Handler for Log {
    fn name(&self) -> &'static str {
        "log"
    }

    /// A log line repeated after a crash harms no one.
    fn effects(&self) -> crate::Effects {
        crate::Effects::None
    }

    fn description(&self) -> &'static str {
        "Writes a log line (kept in the event's trace too)."
    }

    fn output(&self) -> &'static str {
        "nothing; the line is kept in the trace as the step's log"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text(
                "message",
                "The line to write (default: the event's conversation type and event type, \
                 and \"event received\").",
            ),
            OptionSpec::text("level", "How severe the line is.")
                .choices(LEVELS)
                .default("info"),
            OptionSpec::table("fields", "Structured fields written beside the line."),
        ])
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let (config, level, message) = log_line(input)?;
        let event = input.event;
        let fields = config.get("fields").map(tracing::field::display);
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "switchboard::log",
                    account = %event.account_key,
                    event_id = %event.id,
                    chain = input.chain,
                    step = input.step_name(),
                    fields,
                    "{message}"
                )
            };
        }
        match level.as_str() {
            "trace" => line!(trace),
            "debug" => line!(debug),
            "warn" => line!(warn),
            "error" => line!(error),
            _ => line!(info),
        }
        // The line goes into the trace too.
        Ok(StepOutput {
            logs: vec![crate::LogLine { level, message }],
            ..StepOutput::default()
        })
    }

    /// The line it would write, as a log line of the step.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let (_, level, message) = log_line(input)?;
        Ok(StepOutput {
            logs: vec![crate::LogLine { level, message }],
            ..StepOutput::default()
        })
    }
}

/// A `log` step's rendered config, level and message.
fn log_line(input: &StepInput<'_>) -> Result<(Map<String, Value>, String, String), StepError> {
    let config = input.render_config()?;
    let event = input.event;
    let message = match config.get("message") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => format!(
            "{}.{} event received",
            event.conversation_type, event.event_type
        ),
    };
    let level = match config.get("level") {
        None => "info",
        Some(Value::String(l)) if LEVELS.contains(&l.as_str()) => l.as_str(),
        Some(other) => {
            return Err(StepError::permanent(format!(
                "config.level: {other} is not a level; use one of {}",
                LEVELS.join(", ")
            )));
        }
    }
    .to_string();
    Ok((config, level, message))
}

/// `emit`: emits a child event of the event being handled.
///
/// Options: `event_type` (required), `conversation_type` and `conversation_key`
/// (default: the handled event's), `data` (an object of templates, or one
/// template that renders to an object). Output: `event_id`, `event_type`.
#[derive(Debug, Clone, Copy)]
pub struct Emit;

#[async_trait::async_trait]
impl Handler for Emit {
    fn name(&self) -> &'static str {
        "emit"
    }

    fn description(&self) -> &'static str {
        "Emits a child event of the event being handled; the dispatcher publishes it once the step succeeds."
    }

    fn output(&self) -> &'static str {
        "`event_id` and `event_type` of the emitted event"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text("event_type", "The new event's type.")
                .required()
                .literal(check_key::<EventType>),
            OptionSpec::text(
                "conversation_type",
                "The new event's conversation type (default: the handled event's).",
            )
            .literal(check_key::<ConversationType>),
            OptionSpec::text(
                "conversation_key",
                "The new event's conversation (default: the handled event's).",
            )
            .literal(check_key::<ConversationKey>),
            OptionSpec::table(
                "data",
                "The new event's data: a table of templates, or one template that gives a table.",
            ),
            OptionSpec::text(
                "expires_at",
                "When the new event expires: an RFC 3339 time, usually a template (default: \
                 when the handled event does).",
            )
            .literal(|s| crate::delay::parse_until(s).map(|_| ())),
        ])
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let config = input.render_config()?;
        let event = input.event;
        let event_type: EventType = rendered_key(&config, "event_type")?
            .ok_or_else(|| StepError::permanent("config.event_type: required option is missing"))?;
        let conversation_type = rendered_key(&config, "conversation_type")?
            .unwrap_or_else(|| event.conversation_type.clone());
        let conversation_key = rendered_key(&config, "conversation_key")?
            .unwrap_or_else(|| event.conversation_key.clone());
        let event_data = match config.get("data") {
            None => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(other) => {
                return Err(StepError::permanent(format!(
                    "config.data: must give an object, but gave {other}"
                )));
            }
        };
        // One that renders empty is not set: the child inherits.
        let expires_at = rendered_string(&config, "expires_at")?
            .filter(|at| !at.trim().is_empty())
            .map(|at| {
                crate::delay::parse_until(&at)
                    .map_err(|e| StepError::permanent(format!("config.expires_at: {e}")))
            })
            .transpose()?;
        let mut output = Map::new();
        output.insert(
            "event_id".into(),
            Value::String(input.child_id(0).to_string()),
        );
        output.insert("event_type".into(), Value::String(event_type.to_string()));
        Ok(StepOutput {
            data: output,
            stop: false,
            emit: vec![EmitRequest {
                conversation_type,
                conversation_key,
                event_type,
                event_data,
                expires_at,
            }],
            logs: Vec::new(),
            pause: None,
        })
    }

    /// `emit` returns its event and has no effect of its own: the
    /// dispatcher publishes what it returns.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        self.handle(input).await
    }

    fn effects(&self) -> crate::Effects {
        crate::Effects::None
    }
}
