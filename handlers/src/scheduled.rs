//! Scheduled sends: `scheduled_at` on `send_sms` and `send_email`.
//!
//! A send step given a time still to come records each message
//! `scheduled` (with its `scheduled_at`) and pauses its chain until then
//! with [`Pause::again`]: when the pause ends the step runs again, finds
//! its records, and sends those still scheduled — unless the account
//! cancelled one meanwhile (`switchboard messages cancel`). Falling due and
//! being cancelled are both a move from `scheduled` made only if the
//! message is still `scheduled` ([`Messages::transition_from`]), so exactly
//! one of them happens. The time is kept in the record: a step run again
//! goes by the time it first recorded, not by its config rendered again.

use serde_json::{Map, Value};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

use crate::options::{OptionSpec, rendered_string};
use crate::records::{IdempotencyKeys, MessageRecord, MessageStatus, Messages, RecordError};
use crate::{Pause, StepError, StepOutput};

/// The option's name.
pub(crate) const OPTION: &str = "scheduled_at";

/// The `scheduled_at` option of a send step.
pub(crate) fn option() -> OptionSpec {
    OptionSpec::text(
        OPTION,
        "When to send: an RFC 3339 time (\"2026-12-24T09:00:00Z\"), usually a template. The \
         messages are recorded `scheduled` and the chain waits until then; a time already \
         past sends at once. `switchboard messages cancel` cancels a message before it goes.",
    )
    .literal(|s| crate::delay::parse_until(s).map(|_| ()))
}

/// When a step's rendered `config` asks its messages to go, if that is
/// still to come at `now` (to the millisecond, as the pause is kept).
pub(crate) fn from_config(
    config: &Map<String, Value>,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, StepError> {
    let Some(text) = rendered_string(config, OPTION)? else {
        return Ok(None);
    };
    let at = crate::delay::parse_until(&text)
        .map_err(|e| StepError::permanent(format!("config.{OPTION}: {e}")))?;
    let at = at
        .replace_nanosecond(at.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(at);
    Ok((at > now).then_some(at))
}

/// A step's message as it stands now: a scheduled one that has fallen due
/// moves to `pending` (to be sent), unless it was cancelled first.
pub(crate) fn fall_due(
    messages: &dyn Messages,
    record: MessageRecord,
    now: OffsetDateTime,
) -> Result<MessageRecord, StepError> {
    let due =
        record.status == MessageStatus::Scheduled && record.scheduled_at.is_none_or(|at| at <= now);
    if !due {
        return Ok(record);
    }
    let moved = messages
        .transition_from(
            &record.account_key,
            &record.id,
            MessageStatus::Scheduled,
            MessageStatus::Pending,
            "its scheduled time came",
        )
        .map_err(|e| StepError::retryable(format!("recording the message: {e}"), None))?;
    Ok(moved.map_or(record, |(m, _)| m))
}

/// What a send step's `output` becomes when some of its `records` are still
/// scheduled: the latest of their times as `scheduled_at`, and a pause until
/// then after which the step runs again.
pub(crate) fn hold(mut output: StepOutput, records: &[MessageRecord]) -> StepOutput {
    let until = records
        .iter()
        .filter(|r| r.status == MessageStatus::Scheduled)
        .filter_map(|r| r.scheduled_at)
        .max();
    if let Some(until) = until {
        output.data.insert(
            OPTION.into(),
            Value::String(switchboard_sdk::format_rfc3339(until)),
        );
        output.pause = Some(Pause {
            until_ms: crate::delay::ms_of(until),
            awaits: None,
            again: true,
            window: None,
        });
    }
    output
}

/// The status a dry run shows for a message it would send (at `at`, if
/// that is to come).
pub(crate) fn simulated_status(at: Option<OffsetDateTime>) -> &'static str {
    match at {
        Some(_) => MessageStatus::Scheduled.as_str(),
        None => crate::SIMULATED,
    }
}

/// A dry run's `output`, with the time its messages would go at, if that
/// is to come.
pub(crate) fn simulated(mut output: StepOutput, at: Option<OffsetDateTime>) -> StepOutput {
    if let Some(at) = at {
        let at = switchboard_sdk::format_rfc3339(at);
        output.data.insert(OPTION.into(), Value::String(at));
    }
    output
}

/// Cancels the still-scheduled messages of a send step whose paused run was
/// cancelled (its chain's `cancel_on`), by the `messages` of the `output`
/// it paused with.
pub(crate) fn cancel_held(
    (messages, idempotency): (&dyn Messages, &dyn IdempotencyKeys),
    account: &AccountKey,
    output: &Map<String, Value>,
    cause: &str,
) -> Result<(), RecordError> {
    let ids = output
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m["status"] == MessageStatus::Scheduled.as_str())
        .filter_map(|m| m["message_id"].as_str());
    for id in ids {
        let cancelled = messages.transition_from(
            account,
            id,
            MessageStatus::Scheduled,
            MessageStatus::Cancelled,
            cause,
        )?;
        if let Some((record, true)) = cancelled {
            crate::templated::release_recorded(idempotency, &record);
        }
    }
    Ok(())
}
