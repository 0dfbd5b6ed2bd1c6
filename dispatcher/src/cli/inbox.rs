//! `switchboard inbox …`: the in-app notifications `notify` steps leave.

use switchboard_api::records::InboxList;

use super::*;

/// `switchboard inbox list ACCOUNT RECEIVER`
pub async fn inbox_list(
    client: &Client,
    account_raw: &str,
    receiver: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: InboxList = client
        .get_with(
            &paths::inbox(a.as_str(), receiver),
            &ListQuery::limit(limit),
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!(
        "{receiver} of account {a}: {} unread of {}\n{:<26} {:<12} {:<10} {:<6} content",
        answer.unread, answer.total, "created at", "category", "type", "read"
    );
    let empty = format!("{receiver} of account {a} has no notifications");
    Ok(rows(&answer.notifications, Some(header), empty, |n| {
        let content = &n["content"];
        let shown = content["title"]
            .as_str()
            .or_else(|| content["body"].as_str())
            .unwrap_or("")
            .chars()
            // Event data is shown, not obeyed: no terminal escapes.
            .filter(|c| !c.is_control())
            .take(60)
            .collect::<String>();
        format!(
            "{:<26} {:<12} {:<10} {:<6} {}",
            n["created_at"].as_str().unwrap_or(""),
            n["category"].as_str().unwrap_or(""),
            content["content_type"].as_str().unwrap_or(""),
            if n["read_at"].is_null() { "no" } else { "yes" },
            shown
        )
    }))
}
