//! `digest`: gathers the events of a key into one window, and goes on once
//! for all of them.
//!
//! The step renders its key and says how long the window stays open
//! ([`Pause::window`]); the dispatcher keeps the windows. The first event
//! of a key opens one and its run pauses; each later event of the key
//! joins it and its chain stops at this step. When the window closes (its
//! time is up, or it holds `max_events`, [`MAX_WINDOW_EVENTS`] or
//! [`crate::MAX_WINDOW_BYTES`] of events), the opening event's chain goes on once,
//! with every event of the window in `steps.<name>.events`.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;

use crate::options::{OptionSpec, Options};
use crate::{
    DigestWindow, Handler, MAX_WINDOW_EVENTS, NEVER, Pause, StepError, StepInput, StepOutput,
};

/// The longest key a window may have, in bytes.
const MAX_KEY_BYTES: usize = 512;

/// `digest`: `key` (templated), `window = "1h"` and/or `max_events = 10`.
/// Output once the window closes: `key`, `events` (every event of the
/// window, in the order they joined it), `count`.
#[derive(Debug, Clone, Copy)]
pub struct Digest;

fn check_window(s: &str) -> Result<(), String> {
    crate::delay::check_positive(s, "a window")
}

#[async_trait::async_trait]
impl Handler for Digest {
    fn name(&self) -> &'static str {
        "digest"
    }

    fn description(&self) -> &'static str {
        "Gathers the events of a `key` into one window: the first opens it and waits, the \
         others join it and stop here. When the window closes (after `window`, or at \
         `max_events`; at 1,000 events, or before one that would take it past 512 KiB, in \
         any case), the chain goes on \
         once, for all of them. Durable like a delay: \
         exactly one continuation per window, through restarts and take-overs. `cancel_on` \
         does not cancel a window: it holds the other events too."
    }

    fn output(&self) -> &'static str {
        "once the window closes: `key`, `events` (every event of the window, in the order \
         they joined) and `count`; on an event that joined another's window: `joined` (the \
         id of the event that opened it) and `position` (its place in the window, from 1)"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text(
                "key",
                "What the events are gathered by, usually a template (the recipient: \
                 \"{{ event.event_data.msisdn }}\"). It must not render empty.",
            )
            .required(),
            OptionSpec::text(
                "window",
                "How long a window stays open from its first event: a number and a unit, \
                 ms, s, m, h or d (\"1h\").",
            )
            .no_template()
            .literal(check_window),
            OptionSpec::count(
                "max_events",
                "Close the window as soon as it holds this many events (before its time, \
                 with `window`); at most 1,000. A window closes at 1,000 events, or before \
                 an event that would take it past 512 KiB, whatever it says.",
            )
            .at_most(MAX_WINDOW_EVENTS),
        ])
        .one_of(&["window", "max_events"], "to say when a window closes")
    }

    /// The windows are the dispatcher's to keep: the step changes nothing.
    fn effects(&self) -> crate::Effects {
        crate::Effects::None
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let (key, until_ms, max_events) = window(input)?;
        let mut data = Map::new();
        data.insert("key".into(), Value::String(key.clone()));
        if until_ms != NEVER {
            let until =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(until_ms) * 1_000_000)
                    .map_err(|e| StepError::permanent(format!("config.window: {e}")))?;
            data.insert(
                "until".into(),
                Value::String(until.format(&Rfc3339).unwrap_or_default()),
            );
        }
        Ok(StepOutput {
            data,
            pause: Some(Pause {
                until_ms,
                awaits: None,
                again: false,
                window: Some(DigestWindow { key, max_events }),
            }),
            ..StepOutput::default()
        })
    }

    /// A dry run does not wait: it goes on as if the window closed with
    /// this event alone.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let mut output = self.handle(input).await?;
        output.pause = None;
        output.data.insert(
            "events".into(),
            Value::Array(vec![
                serde_json::to_value(input.event).unwrap_or(Value::Null),
            ]),
        );
        output.data.insert("count".into(), Value::from(1));
        Ok(output)
    }
}

/// The step's window: its rendered key, when it closes (ms since the
/// epoch, or [`NEVER`]) and at how many events.
fn window(input: &StepInput<'_>) -> Result<(String, u64, u32), StepError> {
    let config = input.render_config()?;
    let key = match config.get("key") {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(other) => other.to_string(),
        None => return Err(StepError::permanent("config.key: required")),
    };
    if key.is_empty() {
        return Err(StepError::permanent(
            "config.key rendered empty: every event needs a key to be gathered by (check the \
             template's fields)",
        ));
    }
    if key.len() > MAX_KEY_BYTES || key.contains('\0') {
        return Err(StepError::permanent(format!(
            "config.key: a key is at most {MAX_KEY_BYTES} bytes, without NUL characters"
        )));
    }
    let max_events = match config.get("max_events") {
        None => None,
        Some(v) => Some(crate::options::count(v).ok_or_else(|| {
            StepError::permanent(format!(
                "config.max_events: must be a whole number from 1 up, not {v}"
            ))
        })?),
    };
    let until_ms = match config.get("window").and_then(Value::as_str) {
        None => NEVER,
        Some(w) => {
            let d = switchboard_rules::duration::parse(w)
                .map_err(|e| StepError::permanent(format!("config.window: {e}")))?;
            let now = switchboard_sdk::now() + d;
            crate::delay::ms_of(now)
        }
    };
    if until_ms == NEVER && max_events.is_none() {
        return Err(StepError::permanent(
            "config: give `window`, `max_events`, or both",
        ));
    }
    // (A chain applied before `max_events` had its bound is held to it.)
    let max_events = max_events.map_or(MAX_WINDOW_EVENTS, |m| m.min(MAX_WINDOW_EVENTS));
    Ok((key, until_ms, max_events))
}
