//! `switchboard inbox …`: the in-app notifications `notify` steps leave,
//! and the receiver tokens that open them.

pub use switchboard_api::inbox::InboxQuery;
use switchboard_api::inbox::{
    InboxCount, InboxList, NewReceiverToken, ReadAll, ReceiverToken, RotatedReceiverKey,
};

use super::*;

/// `switchboard inbox list ACCOUNT RECEIVER [--unread] [--category C] [--archived] [--before CURSOR]`
pub async fn inbox_list(
    client: &Client,
    account_raw: &str,
    receiver: &str,
    query: &InboxQuery,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: InboxList = client
        .get_with(&paths::inbox(a.as_str(), receiver), query)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!(
        "{receiver} of account {a}: {} unread of {}\n{:<26} {:<12} {:<10} {:<6} content",
        answer.unread, answer.total, "created at", "category", "type", "read"
    );
    let empty = format!("{receiver} of account {a} has no notifications that match");
    let mut shown = rows(&answer.notifications, Some(header), empty, |n| {
        let content = &n["content"];
        format!(
            "{:<26} {:<12} {:<10} {:<6} {}",
            n["created_at"].as_str().unwrap_or(""),
            printable(n["category"].as_str().unwrap_or(""), 12),
            content["content_type"].as_str().unwrap_or(""),
            if n["read_at"].is_null() { "no" } else { "yes" },
            printable(
                content["title"]
                    .as_str()
                    .or_else(|| content["body"].as_str())
                    .unwrap_or(""),
                60
            ),
        )
    });
    if let Some(next) = &answer.next {
        shown.push_str(&format!("\nmore: --before {next}"));
    }
    Ok(shown)
}

/// Event data is shown, not obeyed: no terminal escapes.
fn printable(text: &str, at_most: usize) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(at_most)
        .collect()
}

/// `switchboard inbox mark ACCOUNT RECEIVER ID ACTION`
pub async fn inbox_mark(
    client: &Client,
    account_raw: &str,
    receiver: &str,
    id: &str,
    action: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: Value = client
        .post(
            &paths::inbox_mark(a.as_str(), receiver, id, action),
            &Value::Null,
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let state = |field: &str| {
        answer[field]
            .as_str()
            .map_or("no".to_string(), |at| format!("at {at}"))
    };
    Ok(format!(
        "notification {id} of {receiver}: read {}, archived {}",
        state("read_at"),
        state("archived_at")
    ))
}

/// `switchboard inbox read-all ACCOUNT RECEIVER [--category C]`
pub async fn inbox_read_all(
    client: &Client,
    account_raw: &str,
    receiver: &str,
    category: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let mut path = paths::inbox_read_all(a.as_str(), receiver);
    if let Some(c) = category {
        path.push_str(&format!("?category={}", paths::segment(c)));
    }
    let answer: ReadAll = client.post(&path, &Value::Null).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "marked {} read; {receiver} of account {a}: {} unread of {}",
        answer.marked, answer.unread, answer.total
    ))
}

/// `switchboard inbox count ACCOUNT RECEIVER`
pub async fn inbox_count(
    client: &Client,
    account_raw: &str,
    receiver: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: InboxCount = client
        .get(&paths::inbox_count(a.as_str(), receiver))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "{receiver} of account {a}: {} unread of {}",
        answer.unread, answer.total
    ))
}

/// `switchboard inbox token ACCOUNT RECEIVER [--ttl 24h]`: the token alone
/// on stdout (for a script to hand to the person's browser).
pub async fn inbox_token(
    client: &Client,
    account_raw: &str,
    receiver: &str,
    ttl: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let body = NewReceiverToken {
        ttl: ttl.map(str::to_string),
    };
    let answer: ReceiverToken = client
        .post(&paths::inbox_token(a.as_str(), receiver), &body)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(answer.token)
}

/// `switchboard inbox rotate-tokens ACCOUNT`
pub async fn inbox_rotate_tokens(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: RotatedReceiverKey = client
        .post(&paths::inbox_tokens_rotate(a.as_str()), &Value::Null)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "account {a}'s receiver-token key is new: every receiver token minted before now is no \
         longer valid"
    ))
}
