//! `delay`: pauses the chain's run for a while, or until a time.
//!
//! The step itself only works out when the run goes on: it returns that
//! time as [`StepOutput::pause`], and the dispatcher keeps the run
//! in the event's journal with a durable timer that resumes it at the next
//! step once due (after a restart, or on the replica that took the
//! account's partition over), never before.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::options::{Alternative, OptionSpec, Options};
use crate::{Handler, StepError, StepInput, StepOutput};

/// `delay`: `duration = "24h"` (ms, s, m, h or d) or `until = "{{ ... }}"`
/// (an RFC 3339 time, templated). Output: `until` (RFC 3339), and `past =
/// true` when the time had already passed (the chain went on at once).
#[derive(Debug, Clone, Copy)]
pub struct Delay;

fn check_duration(s: &str) -> Result<(), String> {
    switchboard_rules::duration::parse(s).map(|_| ())
}

fn check_until(s: &str) -> Result<(), String> {
    parse_until(s).map(|_| ())
}

pub(crate) fn parse_until(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|e| {
        format!("{s:?} is not an RFC 3339 time (write e.g. \"2026-12-24T09:00:00Z\"): {e}")
    })
}

/// Checks that `s` is a duration longer than zero; `what` names it in the
/// error ("a timeout").
pub(crate) fn check_positive(s: &str, what: &str) -> Result<(), String> {
    match switchboard_rules::duration::parse(s)? {
        d if d.is_zero() => Err(format!("{s:?}: {what} must be longer than zero")),
        _ => Ok(()),
    }
}

pub(crate) fn ms_of(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The option `name` of a rendered config, as text.
fn text<'a>(config: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    config.get(name).and_then(Value::as_str)
}

#[async_trait::async_trait]
impl Handler for Delay {
    fn name(&self) -> &'static str {
        "delay"
    }

    fn description(&self) -> &'static str {
        "Pauses the chain for a while (`duration`) or until a time (`until`), then goes on \
         with the next step. The pause is durable: it survives restarts and take-overs, and \
         the chain never goes on early. Other events of the conversation are not held \
         behind it unless the chain has `order = \"conversation\"`."
    }

    fn output(&self) -> &'static str {
        "`until`: when the chain went on (RFC 3339); `past`: true when that time had already \
         passed, so the chain went on at once"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text(
                "duration",
                "How long to pause: a number and a unit, ms, s, m, h or d (\"90s\", \"24h\").",
            )
            .literal(check_duration),
            OptionSpec::text(
                "until",
                "When to go on: an RFC 3339 time (\"2026-12-24T09:00:00Z\"), usually a \
                 template over the event or earlier steps. A time already past goes on at once.",
            )
            .literal(check_until),
        ])
        .alternatives(vec![
            Alternative {
                what: "a pause of a given length",
                needs: &["duration"],
                only: &["duration"],
            },
            Alternative {
                what: "a pause until a time",
                needs: &["until"],
                only: &["until"],
            },
        ])
    }

    /// The pause is the dispatcher's to keep: the step changes nothing.
    fn effects(&self) -> crate::Effects {
        crate::Effects::None
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let now = switchboard_sdk::now();
        pause(input, now)
    }

    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let now = switchboard_sdk::now();
        let mut output = pause(input, now)?;
        output.pause = None;
        Ok(output)
    }
}

/// The step's output for a run at `now`.
fn pause(input: &StepInput<'_>, now: OffsetDateTime) -> Result<StepOutput, StepError> {
    let config = input.render_config()?;
    let until = match (text(&config, "duration"), text(&config, "until")) {
        (Some(d), None) => {
            let d = switchboard_rules::duration::parse(d)
                .map_err(|e| StepError::permanent(format!("config.duration: {e}")))?;
            now + d
        }
        (None, Some(u)) => {
            parse_until(u).map_err(|e| StepError::permanent(format!("config.until: {e}")))?
        }
        _ => {
            return Err(StepError::permanent(
                "config: give either `duration` or `until`",
            ));
        }
    };
    // To the millisecond, as the pause is kept.
    let until = until
        .replace_nanosecond(until.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(until);
    let past = until <= now;
    let mut data = Map::new();
    data.insert(
        "until".into(),
        Value::String(until.format(&Rfc3339).unwrap_or_default()),
    );
    if past {
        data.insert("past".into(), Value::Bool(true));
    }
    Ok(StepOutput {
        data,
        pause: (!past).then(|| crate::Pause {
            until_ms: ms_of(until),
            awaits: None,
            again: false,
            window: None,
        }),
        ..StepOutput::default()
    })
}
