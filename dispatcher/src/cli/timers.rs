//! `switchboard timers …`: chains paused by a `delay` step.

use switchboard_api::timers::TimerList;

use super::*;

/// `switchboard timers list ACCOUNT`
pub async fn timers_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: TimerList = client.get(&paths::timers(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!("{:<26} {:<36} chain", "due at", "event");
    Ok(rows(
        &answer.timers,
        Some(header),
        format!("account {a} has no pending timers"),
        |t| {
            format!(
                "{:<26} {:<36} {}",
                format_rfc3339(t.due_at),
                t.event_id,
                t.chain
            )
        },
    ))
}
