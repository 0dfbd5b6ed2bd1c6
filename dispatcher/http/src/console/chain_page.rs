//! One chain of an account: what it matches, its `when`, its steps; and
//! changing it — its match and condition, a step added, edited (the form of
//! [`super::new_chain`]), moved or removed, or the chain removed. Each
//! change is checked as `chains apply` checks a file and saved as a new
//! chain version, or refused with the problems and nothing saved.

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use minijinja::context;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_rules::{ChainSpec, ChainStoreError, Format, parse_chain_file, validate};
use switchboard_sdk::AccountKey;

use super::new_chain::{self, Fields, Target};
use super::session::Session;
use super::{OnAccount, Page, checked_form, error_page, internal, render, session_view, view};
use crate::api::ApiState;

/// The chain `name` of the account, or the page saying there is none.
fn chain_of(
    s: &ApiState,
    session: &Session,
    key: &AccountKey,
    name: &str,
) -> Result<ChainSpec, super::Instead> {
    let current = s.chains.current(key).map_err(|e| internal(session, &e))?;
    current
        .and_then(|v| v.chains.into_iter().find(|c| c.name == name))
        .ok_or_else(|| {
            error_page(
                StatusCode::NOT_FOUND,
                Some(session),
                &format!("Account {key} has no chain named {name:?}."),
            )
            .into()
        })
}

/// What a page showing `chain` posts back with its changes (`seen`), so
/// that a change is made only to the chain as it was shown: not after
/// another tab changed it, nor twice on a double click. A digest of the
/// chain as stored.
pub(super) fn fingerprint(chain: &ChainSpec) -> String {
    let stored = serde_json::to_vec(chain).expect("a chain serialises");
    switchboard_handlers::records::sha256_hex(&stored)[..16].to_string()
}

/// Why a change posted from a page showing the chain as it no longer is
/// was not made.
pub(super) const CHANGED_SINCE: &str = "The chain changed since this page was shown (in another \
     tab, or by a click sent twice): nothing was saved. This is the chain as it is now.";

/// Why a step's form posted after its chain changed saved nothing.
pub(super) const CHANGED_SINCE_FORM: &str = "The chain changed since this form was shown (in \
     another tab, or by a click sent twice): nothing was saved. Open the step again from the \
     chain's page.";

#[derive(Deserialize)]
pub(super) struct Shown {
    saved: Option<u64>,
}

pub(super) async fn page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name)): Path<(String, String)>,
    Query(shown): Query<Shown>,
) -> Page {
    let chain = chain_of(&s, &session, &key, &name)?;
    Ok(show(
        &key,
        &session,
        &chain,
        shown.saved,
        &[],
        StatusCode::OK,
    ))
}

fn show(
    key: &AccountKey,
    session: &Session,
    chain: &ChainSpec,
    saved: Option<u64>,
    problems: &[String],
    status: StatusCode,
) -> Response {
    let steps: Vec<Value> = chain
        .steps
        .iter()
        .map(|st| {
            json!({
                "name": st.step_name(),
                "handler": st.handler,
                "config": serde_json::to_string_pretty(&st.config.to_map())
                    .expect("JSON serialises"),
                "on_error": serde_json::to_value(st.on_error).ok(),
            })
        })
        .collect();
    let mut response = render(
        "chain.html",
        context! {
            account => key.to_string(),
            session => session_view(session),
            chain => view(json!({
                "name": chain.name,
                "description": chain.description(),
                "conversation_type": chain.conversation_type.to_string(),
                "event_type": chain.event_type.to_string(),
                "conversation_key": chain.conversation_key().map(ToString::to_string),
                "when": chain.when(),
            })),
            steps => view(&steps),
            seen => fingerprint(chain),
            saved,
            problems => view(problems),
        },
    );
    *response.status_mut() = status;
    response
}

#[derive(Deserialize)]
pub(super) struct Change {
    #[serde(default)]
    csrf: String,
    /// The chain as the page showed it ([`fingerprint`]).
    #[serde(default)]
    seen: String,
    /// `settings`, `up:N`, `down:N`, `remove:N` (steps from 0) or `remove_chain`.
    #[serde(default)]
    action: String,
    #[serde(default)]
    conversation_type: String,
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    conversation_key: String,
    #[serde(default)]
    when: String,
}

pub(super) async fn act(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name)): Path<(String, String)>,
    Form(change): Form<Change>,
) -> Page {
    checked_form(&session, &change.csrf)?;
    let _writes = s.config_write_lock();
    let chain = chain_of(&s, &session, &key, &name)?;
    if change.seen != fingerprint(&chain) {
        return Ok(show(
            &key,
            &session,
            &chain,
            None,
            &[CHANGED_SINCE.to_string()],
            StatusCode::CONFLICT,
        ));
    }
    if change.action == "remove_chain" {
        return match s.chains.remove_chain(&key, &name) {
            Ok(version) => Ok(Redirect::to(&format!(
                "/console/accounts/{key}?saved={}#chains",
                version.version
            ))
            .into_response()),
            Err(e) => Err(internal(&session, &e).into()),
        };
    }
    let mut edited = serde_json::to_value(&chain).expect("a chain serialises");
    let what = match change.action.split_once(':') {
        None if change.action == "settings" => {
            for (field, value) in [
                ("conversation_type", &change.conversation_type),
                ("event_type", &change.event_type),
                ("conversation_key", &change.conversation_key),
                ("when", &change.when),
            ] {
                let value = value.trim();
                // Empty: no condition, no conversation, any type (`*`).
                if value.is_empty() {
                    edited.as_object_mut().map(|m| m.remove(field));
                } else {
                    edited[field] = json!(value);
                }
            }
            "match and condition changed".to_string()
        }
        Some((verb @ ("up" | "down" | "remove"), at)) => {
            let steps = edited["steps"].as_array_mut();
            let (Some(steps), Ok(i)) = (steps, at.parse::<usize>()) else {
                return Err(bad_action(&session, &change.action));
            };
            match verb {
                "up" if i > 0 && i < steps.len() => steps.swap(i - 1, i),
                "down" if i + 1 < steps.len() => steps.swap(i, i + 1),
                "remove" if i < steps.len() => {
                    steps.remove(i);
                }
                _ => return Err(bad_action(&session, &change.action)),
            }
            format!(
                "step {} {}",
                i + 1,
                match verb {
                    "up" => "moved up",
                    "down" => "moved down",
                    _ => "removed",
                }
            )
        }
        _ => return Err(bad_action(&session, &change.action)),
    };
    let file = json!({ "account_key": key, "chains": [edited] }).to_string();
    let checked = parse_chain_file(&file, Format::Json, "the form")
        .map_err(|e| vec![new_chain::form_error(&e)])
        .and_then(|file| {
            validate(file, &key, s.registry.as_ref())
                .map_err(|e| e.problems.iter().map(ToString::to_string).collect())
        });
    let valid = match checked {
        Ok(valid) => valid,
        Err(problems) => {
            return Ok(show(
                &key,
                &session,
                &chain,
                None,
                &problems,
                StatusCode::UNPROCESSABLE_ENTITY,
            ));
        }
    };
    let change = format!("console: chain {name}: {what}");
    match s
        .chains
        .apply_changes(valid, true, &change, s.registry.as_ref())
    {
        Ok((version, _)) => Ok(Redirect::to(&format!(
            "/console/accounts/{key}/chain/{name}?saved={}",
            version.version
        ))
        .into_response()),
        Err(ChainStoreError::Invalid(e)) => {
            let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
            Ok(show(
                &key,
                &session,
                &chain,
                None,
                &problems,
                StatusCode::UNPROCESSABLE_ENTITY,
            ))
        }
        Err(e) => Err(internal(&session, &e).into()),
    }
}

fn bad_action(session: &Session, action: &str) -> super::Instead {
    error_page(
        StatusCode::BAD_REQUEST,
        Some(session),
        &format!("{action:?} is not something this page can do to the chain."),
    )
    .into()
}

/// What the form edits: the step at `index` (from 0) of chain `name`, or
/// a new one at its end (`None`).
fn step_target(
    s: &ApiState,
    session: &Session,
    key: &AccountKey,
    name: &str,
    index: Option<usize>,
) -> Result<Target, super::Instead> {
    let chain = chain_of(s, session, key, name)?;
    if let Some(i) = index
        && i >= chain.steps.len()
    {
        return Err(no_step(session, name, i));
    }
    Ok(Target::Step {
        chain: Box::new(chain),
        index,
    })
}

pub(super) async fn step_page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name, index)): Path<(String, String, usize)>,
    Query(fields): Query<Fields>,
) -> Page {
    let target = step_target(&s, &session, &key, &name, Some(index))?;
    new_chain::show(&s, &key, &session, target, fields)
}

pub(super) async fn step_act(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name, index)): Path<(String, String, usize)>,
    Form(fields): Form<Fields>,
) -> Page {
    let target = step_target(&s, &session, &key, &name, Some(index))?;
    new_chain::submit(&s, &key, &session, target, fields).await
}

pub(super) async fn add_page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name)): Path<(String, String)>,
    Query(fields): Query<Fields>,
) -> Page {
    let target = step_target(&s, &session, &key, &name, None)?;
    new_chain::show(&s, &key, &session, target, fields)
}

pub(super) async fn add_act(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name)): Path<(String, String)>,
    Form(fields): Form<Fields>,
) -> Page {
    let target = step_target(&s, &session, &key, &name, None)?;
    new_chain::submit(&s, &key, &session, target, fields).await
}

fn no_step(session: &Session, name: &str, index: usize) -> super::Instead {
    error_page(
        StatusCode::NOT_FOUND,
        Some(session),
        &format!("Chain {name:?} has no step {}.", index + 1),
    )
    .into()
}
