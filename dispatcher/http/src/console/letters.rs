//! The dead-letters page: an account's dead letters grouped by chain, step
//! and kind of error, each group — or every letter filed in a time range,
//! previewed with its count — replayed or discarded in one action.

use std::collections::BTreeMap;

use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use minijinja::context;
use serde::{Deserialize, Serialize};
use switchboard_engine::dead_letters::{DeadLetter, LetterStatus};
use switchboard_sdk::format_rfc3339;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{OnAccount, Page, checked_form, error_page, internal, render, session_view, view};
use crate::api::ApiState;

/// Dead letters that failed the same way: the same chain, step, reason and
/// error once ids, numbers and times are set aside.
#[derive(Debug, Serialize)]
struct Group {
    chain: String,
    step: String,
    kind: String,
    count: usize,
    first: String,
    last: String,
    example: String,
    example_event: Option<String>,
}

/// The kind of an error: its text with every run of digits as `#`, so that
/// "answered HTTP 500 after 3 attempts" and the same with other numbers
/// (ports, ids, counts) are one kind.
fn kind_of(letter: &DeadLetter) -> String {
    let mut kind = format!("{:?}: ", letter.reason);
    let mut in_digits = false;
    for c in letter.error.chars().take(160) {
        if c.is_ascii_digit() {
            if !in_digits {
                kind.push('#');
            }
            in_digits = true;
        } else {
            kind.push(c);
            in_digits = false;
        }
    }
    kind
}

/// The key a letter is grouped by.
fn group_key(letter: &DeadLetter) -> (String, String, String) {
    (
        letter.chain.clone().unwrap_or_default(),
        letter.step.clone().unwrap_or_default(),
        kind_of(letter),
    )
}

/// The account's dead letters (not being replayed), grouped, the largest
/// group first.
fn groups(letters: &[DeadLetter]) -> Vec<Group> {
    let mut by_key: BTreeMap<(String, String, String), Vec<&DeadLetter>> = BTreeMap::new();
    for letter in letters.iter().filter(|l| l.status == LetterStatus::Dead) {
        by_key.entry(group_key(letter)).or_default().push(letter);
    }
    let mut groups: Vec<Group> = by_key
        .into_iter()
        .map(|((chain, step, kind), members)| {
            let first = members
                .iter()
                .map(|l| l.at)
                .min()
                .expect("a group has letters");
            let newest = members
                .iter()
                .max_by_key(|l| l.at)
                .expect("a group has letters");
            Group {
                chain,
                step,
                kind,
                count: members.len(),
                first: format_rfc3339(first),
                last: format_rfc3339(newest.at),
                example: newest.error.clone(),
                example_event: newest.event.as_ref().map(|e| e.id.to_string()),
            }
        })
        .collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(b.last.cmp(&a.last)));
    groups
}

/// A time range asked for on the page: `from` and `to`, RFC 3339 or a
/// browser's `datetime-local` (`2026-12-03T14:30`, taken as UTC).
#[derive(Deserialize, Default)]
pub(super) struct Range {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

/// A time as the range's fields give it.
fn parse_time(raw: &str) -> Option<OffsetDateTime> {
    let raw = raw.trim();
    OffsetDateTime::parse(raw, &Rfc3339)
        .ok()
        .or_else(|| {
            let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
            time::PrimitiveDateTime::parse(raw, &format)
                .ok()
                .map(time::PrimitiveDateTime::assume_utc)
        })
        // Shown back (RFC 3339): a year it cannot write is no time here.
        .and_then(switchboard_sdk::in_rfc3339_range)
}

pub(super) async fn page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Query(range): Query<Range>,
) -> Page {
    let letters = s
        .letters
        .all(key.as_str())
        .map_err(|e| internal(&session, &e))?;
    let groups = groups(&letters);
    // The preview of a range: how many it holds, up to now (letters filed
    // after the preview are left for the next look).
    let (range_view, range_error) = match (parse_time(&range.from), parse_time(&range.to)) {
        _ if range.from.trim().is_empty() && range.to.trim().is_empty() => (None, None),
        (Some(from), Some(to)) if from <= to => {
            let to = to.min(switchboard_sdk::now());
            let count = letters
                .iter()
                .filter(|l| l.status == LetterStatus::Dead && l.at >= from && l.at <= to)
                .count();
            (
                Some(serde_json::json!({
                    "from": format_rfc3339(from),
                    "to": format_rfc3339(to),
                    "count": count,
                })),
                None,
            )
        }
        (Some(_), Some(_)) => (None, Some("The range ends before it starts.".to_string())),
        _ => (
            None,
            Some(format!(
                "{:?} – {:?} is not a range of times: give both, as 2026-12-03T14:30 (UTC) or RFC 3339",
                range.from, range.to
            )),
        ),
    };
    Ok(render(
        "dead_letters.html",
        context! {
            account => key.as_str(),
            groups => view(&groups),
            range => range_view.map(view),
            range_error,
            from => range.from,
            to => range.to,
            session => session_view(&session),
        },
    ))
}

/// A range action: the range as its preview showed it, and what to do.
#[derive(Deserialize)]
pub(super) struct RangeAction {
    #[serde(default)]
    csrf: String,
    from: String,
    to: String,
    action: String,
}

pub(super) async fn act_on_range(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Form(form): Form<RangeAction>,
) -> Page {
    checked_form(&session, &form.csrf)?;
    let (Some(from), Some(to)) = (parse_time(&form.from), parse_time(&form.to)) else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            Some(&session),
            &format!("{:?} – {:?} is not a range of times", form.from, form.to),
        )
        .into());
    };
    let letters = s
        .letters
        .all(key.as_str())
        .map_err(|e| internal(&session, &e))?;
    let members: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| l.status == LetterStatus::Dead && l.at >= from && l.at <= to)
        .collect();
    handle_all(&s, &session, key.as_str(), &members, &form.action).await
}

/// Replays or discards every one of `letters`; the page again, or what
/// could not be done.
async fn handle_all(
    s: &ApiState,
    session: &super::session::Session,
    account: &str,
    letters: &[&DeadLetter],
    action: &str,
) -> Page {
    if !matches!(action, "replay" | "discard") {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            Some(session),
            &format!("{action:?} is not an action: replay or discard"),
        )
        .into());
    }
    let mut failed = Vec::new();
    for letter in letters {
        let done = if action == "replay" {
            s.letters.replay(account, &letter.id).await.map(|_| ())
        } else {
            s.letters.discard(account, &letter.id).await.map(|_| ())
        };
        if let Err(e) = done {
            failed.push(format!("{}: {e}", letter.id));
        }
    }
    if failed.is_empty() {
        Ok(Redirect::to(&format!("/console/accounts/{account}/dead-letters")).into_response())
    } else {
        Err(error_page(
            StatusCode::CONFLICT,
            Some(session),
            &format!("Some letters could not be handled: {}", failed.join("; ")),
        )
        .into())
    }
}

/// A group action: what the form showed (the group and how many it held
/// when shown, up to `last`), and what to do.
#[derive(Deserialize)]
pub(super) struct GroupAction {
    #[serde(default)]
    csrf: String,
    chain: String,
    step: String,
    kind: String,
    /// The newest letter the page showed: letters filed since are left for
    /// the next look.
    last: String,
    action: String,
}

pub(super) async fn act(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Form(form): Form<GroupAction>,
) -> Page {
    checked_form(&session, &form.csrf)?;
    let letters = s
        .letters
        .all(key.as_str())
        .map_err(|e| internal(&session, &e))?;
    let Ok(last) = OffsetDateTime::parse(&form.last, &Rfc3339) else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            Some(&session),
            &format!("{:?} is not an RFC 3339 time", form.last),
        )
        .into());
    };
    let wanted = (form.chain, form.step, form.kind);
    let members: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| l.status == LetterStatus::Dead && group_key(l) == wanted && l.at <= last)
        .collect();
    handle_all(&s, &session, key.as_str(), &members, &form.action).await
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn a_range_time_is_one_rfc_3339_can_write_back() {
        let t = parse_time("2026-12-07T10:30").unwrap();
        assert_eq!(switchboard_sdk::format_rfc3339(t), "2026-12-07T10:30:00Z");
        let t = parse_time(" 2026-12-07T10:30:00+02:00 ").unwrap();
        assert_eq!(switchboard_sdk::format_rfc3339(t), "2026-12-07T08:30:00Z");
        assert_eq!(parse_time("-0001-01-01T00:00"), None);
        assert_eq!(parse_time("9999-12-31T23:59:59-01:00"), None);
        assert_eq!(parse_time("soon"), None);
    }
}
