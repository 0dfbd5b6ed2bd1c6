//! `switchboard preferences …`: what a contact or an address opted in to
//! and out of.

use switchboard_api::records::PreferencesAnswer;
pub use switchboard_api::records::SetPreference;

use super::*;

/// A channel's preferences as lines: the address, then each topic's
/// choice (or that nothing was said).
fn channel_lines(out: &mut String, channel: &str, preferences: Option<&Value>) {
    let Some(p) = preferences else {
        let _ = writeln!(out, "{channel}: no address");
        return;
    };
    let _ = writeln!(out, "{channel} {}", p["address"].as_str().unwrap_or("?"));
    let topics = p["topics"].as_object().filter(|t| !t.is_empty());
    let Some(topics) = topics else {
        let _ = writeln!(out, "  subscribed to everything (nothing said)");
        return;
    };
    for (topic, choice) in topics {
        let _ = writeln!(
            out,
            "  {:<28} {:<14} {}  {}",
            topic,
            if choice["subscribed"] == true {
                "subscribed"
            } else {
                "opted out"
            },
            choice["at"].as_str().unwrap_or(""),
            choice["cause"].as_str().unwrap_or("")
        );
    }
}

fn shown(answer: &PreferencesAnswer, json_out: bool) -> String {
    if json_out {
        return pretty(answer);
    }
    let mut out = String::new();
    if let Some(contact) = &answer.contact {
        let _ = writeln!(out, "contact {contact} of account {}", answer.account_key);
    }
    channel_lines(&mut out, "email", answer.email.as_ref());
    channel_lines(&mut out, "sms", answer.sms.as_ref());
    out.trim_end().to_string()
}

/// `switchboard preferences show ACCOUNT CONTACT`
pub async fn preferences_show(
    client: &Client,
    account_raw: &str,
    contact: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: PreferencesAnswer = client.get(&paths::preferences(a.as_str(), contact)).await?;
    Ok(shown(&answer, json_out))
}

/// `switchboard preferences set ACCOUNT CONTACT CHANNEL in|out`
pub async fn preferences_set(
    client: &Client,
    account_raw: &str,
    contact: &str,
    set: SetPreference,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: PreferencesAnswer = client
        .put(&paths::preferences(a.as_str(), contact), &set)
        .await?;
    Ok(shown(&answer, json_out))
}
