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

use super::{
    Instead, OnAccount, Page, checked_form, error_page, internal, render, session_view, view,
};
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

/// Dead letters (not being replayed) gathered into their groups one at a
/// time, so that an account's letters are never all held at once.
#[derive(Default)]
struct Groups {
    by_key: BTreeMap<(String, String, String), Gathered>,
}

/// A group as its letters come: how many, the first one's time and the
/// newest.
struct Gathered {
    count: usize,
    first: OffsetDateTime,
    newest: (OffsetDateTime, String, Option<String>),
}

impl Groups {
    fn add(&mut self, letter: &DeadLetter) {
        if letter.status != LetterStatus::Dead {
            return;
        }
        let newest = || {
            (
                letter.at,
                letter.error.clone(),
                letter.event.as_ref().map(|e| e.id.to_string()),
            )
        };
        self.by_key
            .entry(group_key(letter))
            .and_modify(|g| {
                g.count += 1;
                g.first = g.first.min(letter.at);
                if letter.at > g.newest.0 {
                    g.newest = newest();
                }
            })
            .or_insert_with(|| Gathered {
                count: 1,
                first: letter.at,
                newest: newest(),
            });
    }

    /// The groups, the largest first.
    fn into_groups(self) -> Vec<Group> {
        let mut groups: Vec<Group> = self
            .by_key
            .into_iter()
            .map(|((chain, step, kind), g)| Group {
                chain,
                step,
                kind,
                count: g.count,
                first: format_rfc3339(g.first),
                last: format_rfc3339(g.newest.0),
                example: g.newest.1,
                example_event: g.newest.2,
            })
            .collect();
        groups.sort_by(|a, b| b.count.cmp(&a.count).then(b.last.cmp(&a.last)));
        groups
    }
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
    // The preview of a range: how many it holds, up to now (letters filed
    // after the preview are left for the next look).
    let (range_times, range_error) = match (parse_time(&range.from), parse_time(&range.to)) {
        _ if range.from.trim().is_empty() && range.to.trim().is_empty() => (None, None),
        (Some(from), Some(to)) if from <= to => {
            (Some((from, to.min(switchboard_sdk::now()))), None)
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
    let mut groups = Groups::default();
    let mut in_range = 0;
    s.letters
        .each(key.as_str(), |l| {
            if let Some((from, to)) = range_times
                && l.status == LetterStatus::Dead
                && l.at >= from
                && l.at <= to
            {
                in_range += 1;
            }
            groups.add(&l);
        })
        .map_err(|e| internal(&session, &e))?;
    let groups = groups.into_groups();
    let range_view = range_times.map(|(from, to)| {
        serde_json::json!({
            "from": format_rfc3339(from),
            "to": format_rfc3339(to),
            "count": in_range,
        })
    });
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
    let members = dead_ids(&s, &session, key.as_str(), |l| l.at >= from && l.at <= to)?;
    handle_all(&s, &session, key.as_str(), &members, &form.action).await
}

/// The ids of `account`'s dead letters (not being replayed) that `wanted`
/// selects.
fn dead_ids(
    s: &ApiState,
    session: &super::session::Session,
    account: &str,
    wanted: impl Fn(&DeadLetter) -> bool,
) -> Result<Vec<String>, Instead> {
    let mut ids = Vec::new();
    s.letters
        .each(account, |l| {
            if l.status == LetterStatus::Dead && wanted(&l) {
                ids.push(l.id);
            }
        })
        .map_err(|e| internal(session, &e))?;
    Ok(ids)
}

/// Replays or discards every one of `letters` (their ids); the page
/// again, or what could not be done.
async fn handle_all(
    s: &ApiState,
    session: &super::session::Session,
    account: &str,
    letters: &[String],
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
    for id in letters {
        let done = if action == "replay" {
            s.letters.replay(account, id).await.map(|_| ())
        } else {
            s.letters.discard(account, id).await.map(|_| ())
        };
        if let Err(e) = done {
            failed.push(format!("{id}: {e}"));
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
    let Ok(last) = OffsetDateTime::parse(&form.last, &Rfc3339) else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            Some(&session),
            &format!("{:?} is not an RFC 3339 time", form.last),
        )
        .into());
    };
    let wanted = (form.chain, form.step, form.kind);
    let members = dead_ids(&s, &session, key.as_str(), |l| {
        l.at <= last && group_key(l) == wanted
    })?;
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
