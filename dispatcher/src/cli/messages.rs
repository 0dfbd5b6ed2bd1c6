//! `switchboard messages …` and `switchboard inbound …`: the messages an
//! account's chains sent, the provider reports that matched none, and the
//! inbound URLs providers post them to.

use switchboard_api::inbound::{
    CreateInboundRequest, CreatedInbound, InboundList, RevokedInbound, UnmatchedList,
};
use switchboard_api::records::MessageList;
use switchboard_handlers::records::{MessageRecord, MessageStatus};

use super::*;

/// `switchboard messages list ACCOUNT`
pub async fn messages_list(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = paths::messages(a.as_str());
    let answer: MessageList = client.get_with(&path, &ListQuery::limit(limit)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let messages: Vec<MessageRecord> = decode_all(answer.messages, &path)?;
    let empty = format!("account {a} has no messages");
    Ok(rows(&messages, None, empty, |m| {
        let due = match (m.status, m.scheduled_at) {
            (MessageStatus::Scheduled, Some(at)) => {
                format!("  at {}", switchboard_sdk::format_rfc3339(at))
            }
            _ => String::new(),
        };
        format!(
            "{}  {:<5} {:<9} {:<28} {}{due}",
            m.id,
            m.channel.as_str(),
            m.status.as_str(),
            m.recipient,
            m.provider,
        )
    }))
}

/// `switchboard messages show ACCOUNT ID`
pub async fn messages_show(
    client: &Client,
    account_raw: &str,
    id: &str,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: Value = client.get(&paths::message(a.as_str(), id)).await?;
    Ok(pretty(&answer))
}

/// `switchboard messages cancel ACCOUNT ID`: cancels a scheduled message
/// before it goes.
pub async fn messages_cancel(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = paths::message_cancel(a.as_str(), id);
    // The cancel takes no body; `null` says so.
    let answer: Value = client.post(&path, &Value::Null).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let message: MessageRecord = decode(answer, &path)?;
    Ok(format!(
        "cancelled message {} to {} (it was scheduled for {})",
        message.id,
        message.recipient,
        message
            .scheduled_at
            .map_or_else(|| "-".to_string(), switchboard_sdk::format_rfc3339)
    ))
}

/// `switchboard messages unmatched ACCOUNT`: records providers posted that
/// matched nothing, newest first.
pub async fn messages_unmatched(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: UnmatchedList = client
        .get_with(&paths::unmatched(a.as_str()), &ListQuery::limit(limit))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!(
        "{:<26} {:<9} {:<16} reason",
        "received at", "provider", "result"
    );
    let empty = format!("account {a} has no unmatched inbound records");
    Ok(rows(&answer.unmatched, Some(header), empty, |u| {
        format!(
            "{:<26} {:<9} {:<16} {}",
            format_rfc3339(u.received_at),
            u.provider.name(),
            u.result,
            shorten(&u.reason, 120),
        )
    }))
}

/// What each inbound provider's URL is for, told once it is made.
fn inbound_hint(provider: &str, secret: Option<&str>) -> String {
    match provider {
        "sendgrid" => "Set it as the HTTP Post URL of SendGrid's Event Webhook (Settings → Mail \
                       Settings → Event Webhook), with the events you want."
            .to_string(),
        "twilio" => "Give it to Twilio as the StatusCallback of the messages you send (the \
                     `status_callback` of the Twilio provider in the dispatcher's config). \
                     Callbacks are verified with the provider's auth token over this exact URL."
            .to_string(),
        _ => format!(
            "Give it to the sender. It signs per Standard Webhooks with the account secret {:?} \
             (webhook-id, webhook-timestamp, webhook-signature); messages more than 5 minutes \
             old are refused.",
            secret.unwrap_or_default()
        ),
    }
}

/// `switchboard inbound create ACCOUNT PROVIDER [--secret NAME] [--rotate]`:
/// prints the URL, which is never shown again.
pub async fn inbound_create(
    client: &Client,
    account_raw: &str,
    provider: &str,
    secret: Option<&str>,
    rotate: bool,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let body = CreateInboundRequest {
        secret: secret.map(str::to_string),
        rotate,
    };
    let answer: CreatedInbound = client
        .post(&paths::inbound_hook(a.as_str(), provider), &body)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let verb = if rotate { "rotated" } else { "created" };
    Ok(format!(
        "{verb} the inbound {provider} webhook of account {a}:\n\n  {}\n\n{}\nThe URL is shown \
         this once (only a hash of its secret is kept); `switchboard inbound create {a} {provider} \
         --rotate` makes a new one.",
        answer.url,
        inbound_hint(provider, secret),
    ))
}

/// `switchboard inbound list ACCOUNT`: providers and when their URLs were
/// made (the URLs' secrets are not kept).
pub async fn inbound_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: InboundList = client.get(&paths::inbound_hooks(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!("{:<10} {:<26} secret", "provider", "created at");
    let empty = format!("account {a} has no inbound webhooks");
    Ok(rows(&answer.inbound, Some(header), empty, |h| {
        format!(
            "{:<10} {:<26} {}",
            h.provider.name(),
            format_rfc3339(h.created_at),
            h.secret.as_deref().unwrap_or("-"),
        )
    }))
}

/// `switchboard inbound revoke ACCOUNT PROVIDER`
pub async fn inbound_revoke(
    client: &Client,
    account_raw: &str,
    provider: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: RevokedInbound = client
        .delete(&paths::inbound_hook(a.as_str(), provider))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "revoked the inbound {provider} webhook of account {a}: its URL answers 404 from now on"
    ))
}
