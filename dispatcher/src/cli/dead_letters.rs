//! `switchboard dead-letters …`: the events an account's chains could not
//! handle, shown, replayed or discarded.

use switchboard_api::dead_letters::{
    DeadLetterList, DiscardedLetter, ReplayFilter, ReplayedLetter, ReplayedLetters,
};
use switchboard_engine::dead_letters::{DeadLetter, LetterStatus};

use super::*;

/// `switchboard dead-letters list ACCOUNT`
pub async fn dead_letters_list(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let path = paths::dead_letters(account_raw);
    let answer: DeadLetterList = client.get_with(&path, &ListQuery::limit(limit)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let letters: Vec<DeadLetter> = decode_all(answer.dead_letters, &path)?;
    let empty = format!("account {account_raw} has no dead letters");
    Ok(rows(&letters, None, empty, |l| {
        let status = match l.status {
            LetterStatus::Replaying => " (replaying)",
            _ => "",
        };
        format!(
            "{}  {}  {:<11} {}{status}",
            l.id,
            format_rfc3339(l.at),
            wire_name(&l.reason),
            l.error,
        )
    }))
}

/// `switchboard dead-letters show ACCOUNT ID`
pub async fn dead_letters_show(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let path = paths::dead_letter(account_raw, id);
    let answer: Value = client.get(&path).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let letter: DeadLetter = decode(answer, &path)?;
    Ok(render_letter(&letter))
}

/// A dead letter, for people.
fn render_letter(l: &DeadLetter) -> String {
    let mut out = format!(
        "dead letter {} of account {} ({})
filed {} after {} attempt(s)
reason: {}
error: {}
",
        l.id,
        l.account_key,
        wire_name(&l.status),
        format_rfc3339(l.at),
        l.attempts,
        wire_name(&l.reason),
        l.error,
    );
    if let Some(chain) = &l.chain {
        let step = l.step.as_deref().unwrap_or("-");
        let _ = writeln!(out, "chain {chain}, step {step}");
    }
    if let Some(subject) = &l.subject {
        let _ = writeln!(out, "subject: {subject}");
    }
    match (&l.event, &l.payload) {
        (Some(e), _) => {
            let _ = writeln!(
                out,
                "event {} ({}/{}, conversation {}, depth {})
data: {}",
                e.id,
                e.conversation_type,
                e.event_type,
                e.conversation_key,
                e.depth,
                Value::Object(e.event_data.clone())
            );
        }
        (None, Some(payload)) => {
            let _ = writeln!(out, "payload (not an event): {}", shorten(payload, 400));
        }
        (None, None) => {}
    }
    let _ = write!(
        out,
        "replay: switchboard dead-letters replay {} {}",
        l.account_key, l.id
    );
    out
}

/// `switchboard dead-letters replay ACCOUNT ID`
pub async fn dead_letters_replay(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let path = paths::dead_letter_replay(account_raw, id);
    // The replay takes no body; `null` says so.
    let answer: ReplayedLetter = client.post(&path, &Value::Null).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let letter: DeadLetter = decode(answer.replayed, &path)?;
    let at = match (&letter.chain, &letter.step) {
        (Some(chain), Some(step)) if step != "when" => {
            format!("; chain {chain} resumes at step {step}")
        }
        _ => String::new(),
    };
    Ok(format!(
        "replayed dead letter {id}: event {} is back on the bus{at}",
        letter
            .event
            .as_ref()
            .map_or_else(|| "?".to_string(), |e| e.id.to_string())
    ))
}

/// `switchboard dead-letters replay ACCOUNT --all [--chain NAME] [--since T]`.
/// `since` is an RFC 3339 time or a duration back from now (`"2h"`).
pub async fn dead_letters_replay_all(
    client: &Client,
    account_raw: &str,
    chain: Option<&str>,
    since: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let filter = ReplayFilter {
        chain: chain.map(str::to_string),
        since: since.map(since_time).transpose()?,
    };
    let answer: ReplayedLetters = client
        .post(&paths::dead_letters_replay(account_raw), &filter)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let mut out = format!(
        "replayed {} dead letters of account {account_raw}",
        answer.replayed.len()
    );
    for skipped in &answer.skipped {
        let _ = write!(out, "\nskipped {}: {}", skipped.id, skipped.error);
    }
    Ok(out)
}

/// An RFC 3339 time given as one, or as a duration back from now.
fn since_time(raw: &str) -> Result<time::OffsetDateTime, CliError> {
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(raw, rfc3339) {
        return Ok(t);
    }
    let ago = switchboard_rules::duration::parse(raw).map_err(|_| {
        input(format!(
            "--since {raw:?} is neither an RFC 3339 time (2026-11-22T09:00:00Z) nor a duration back \
             from now (30m, 2h, 1d)"
        ))
    })?;
    Ok(switchboard_sdk::now() - ago)
}

/// `switchboard dead-letters discard ACCOUNT ID`
pub async fn dead_letters_discard(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let answer: DiscardedLetter = client.delete(&paths::dead_letter(account_raw, id)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "discarded dead letter {id} of account {account_raw}"
    ))
}
