//! `switchboard timers …`: chains paused by a `delay` step.

use switchboard_api::ListQuery;
use switchboard_api::timers::TimerList;

use super::*;

/// `switchboard timers list ACCOUNT`
pub async fn timers_list(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: TimerList = client
        .get_with(&paths::timers(a.as_str()), &ListQuery::limit(limit))
        .await?;
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
