//! The dead-letters page: an account's dead letters grouped by chain, step
//! and kind of error, each group replayed or discarded in one action.

use std::collections::BTreeMap;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect};
use minijinja::context;
use serde::{Deserialize, Serialize};
use switchboard_engine::dead_letters::{DeadLetter, LetterStatus};
use switchboard_sdk::format_rfc3339;

use super::{
    Page, checked_form, error_page, internal, reachable, render, session_view, signed_in, view,
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

pub(super) async fn page(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(account): Path<String>,
) -> Page {
    let session = signed_in(&s, &headers)?;
    let key = reachable(&session, &account)?;
    let letters = s
        .letters
        .all(key.as_str())
        .map_err(|e| internal(&session, &e))?;
    let groups = groups(&letters);
    Ok(render(
        "dead_letters.html",
        context! {
            account,
            groups => view(&groups),
            session => session_view(&session),
        },
    ))
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
    headers: HeaderMap,
    Path(account): Path<String>,
    Form(form): Form<GroupAction>,
) -> Page {
    let session = signed_in(&s, &headers)?;
    let key = reachable(&session, &account)?;
    checked_form(&session, &form.csrf)?;
    let letters = s
        .letters
        .all(key.as_str())
        .map_err(|e| internal(&session, &e))?;
    let Ok(last) =
        time::OffsetDateTime::parse(&form.last, &time::format_description::well_known::Rfc3339)
    else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            Some(&session),
            &format!("{:?} is not an RFC 3339 time", form.last),
        )
        .into());
    };
    let wanted = (form.chain, form.step, form.kind);
    let members = letters
        .iter()
        .filter(|l| l.status == LetterStatus::Dead && group_key(l) == wanted && l.at <= last);
    let mut failed = Vec::new();
    for letter in members {
        let done = match form.action.as_str() {
            "replay" => s.letters.replay(key.as_str(), &letter.id).await.map(|_| ()),
            "discard" => s
                .letters
                .discard(key.as_str(), &letter.id)
                .await
                .map(|_| ()),
            other => {
                return Err(error_page(
                    StatusCode::BAD_REQUEST,
                    Some(&session),
                    &format!("{other:?} is not an action: replay or discard"),
                )
                .into());
            }
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
            Some(&session),
            &format!("Some letters could not be handled: {}", failed.join("; ")),
        )
        .into())
    }
}
