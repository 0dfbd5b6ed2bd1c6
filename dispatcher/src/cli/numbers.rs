//! `switchboard numbers …`: the addresses an account owns, which replies
//! are sent to.

use switchboard_api::inbound::{NumberAnswer, NumberList};

use super::*;

/// `switchboard numbers add ACCOUNT TRANSPORT ADDRESS`
pub async fn numbers_add(
    client: &Client,
    account_raw: &str,
    (transport, address): (&str, &str),
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: NumberAnswer = client
        .put(&paths::number(a.as_str(), transport, address), &())
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "{} on {} is account {a}'s: replies to it become its message_response events",
        answer.address, answer.transport
    ))
}

/// `switchboard numbers list ACCOUNT`
pub async fn numbers_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: NumberList = client.get(&paths::numbers(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!("{:<16} {:<32} added at", "transport", "address");
    let empty =
        format!("account {a} has no addresses (`switchboard numbers add {a} TRANSPORT ADDRESS`)");
    Ok(rows(&answer.numbers, Some(header), empty, |n| {
        format!(
            "{:<16} {:<32} {}",
            n.transport,
            n.address,
            format_rfc3339(n.created_at)
        )
    }))
}

/// `switchboard numbers rm ACCOUNT TRANSPORT ADDRESS`
pub async fn numbers_rm(
    client: &Client,
    account_raw: &str,
    (transport, address): (&str, &str),
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: NumberAnswer = client
        .delete(&paths::number(a.as_str(), transport, address))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "{} on {} is no longer account {a}'s: replies to it are kept as unmatched",
        answer.address, answer.transport
    ))
}
