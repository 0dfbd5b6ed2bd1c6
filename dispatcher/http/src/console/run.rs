//! An event's run: the event, each chain and step as it went, its lineage,
//! and replay from a failed step.

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use minijinja::context;
use serde::Deserialize;
use serde_json::Value;
use switchboard_engine::dead_letters::{DeadLetter, DeadReason};
use switchboard_engine::trace::{StepOutcome, Trace, TraceStatus};
use switchboard_sdk::{EventId, format_rfc3339};

use super::session::Session;
use super::{
    CsrfForm, OnAccount, Page, checked_form, error_page, internal, render, session_view, view,
};
use crate::api::ApiState;

#[derive(Deserialize)]
pub(super) struct FindEvent {
    #[serde(default)]
    id: String,
}

pub(super) async fn find_event(
    OnAccount { session, key }: OnAccount,
    Query(q): Query<FindEvent>,
) -> Page {
    match EventId::parse(q.id.trim()) {
        Ok(id) => Ok(Redirect::to(&format!("/console/accounts/{key}/events/{id}")).into_response()),
        Err(e) => Err(error_page(
            StatusCode::BAD_REQUEST,
            Some(&session),
            &format!("{:?} is not an event id: {e}", q.id),
        )
        .into()),
    }
}

#[derive(Deserialize)]
pub(super) struct Shown {
    /// The new event this one was just run again as.
    rerun: Option<String>,
}

pub(super) async fn run_page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, id)): Path<(String, String)>,
    Query(shown): Query<Shown>,
) -> Page {
    let not_found = |session: &Session| {
        error_page(
            StatusCode::NOT_FOUND,
            Some(session),
            &format!(
                "No trace of event {id} in account {key}: not handled yet, or never received."
            ),
        )
    };
    let Ok(event_id) = EventId::parse(&id) else {
        return Err(not_found(&session).into());
    };
    let Some(trace) = s
        .traces
        .get(&key, &event_id)
        .map_err(|e| internal(&session, &e))?
    else {
        return Err(not_found(&session).into());
    };
    let letters = replayable_letters(&s, &trace).map_err(|e| internal(&session, &e))?;
    let rerun = shown
        .rerun
        .as_deref()
        .and_then(|r| EventId::parse(r).ok())
        .map(|r| r.to_string());
    Ok(render(
        "run.html",
        run_context(key.as_str(), &trace, letters, rerun, &session),
    ))
}

/// The dead letters a dead event's failed steps filed, still there to replay.
fn replayable_letters(
    s: &ApiState,
    trace: &Trace,
) -> Result<Vec<DeadLetter>, switchboard_store::StoreError> {
    if trace.status != TraceStatus::Dead {
        return Ok(Vec::new());
    }
    let mut letters = Vec::new();
    for chain in &trace.chains {
        for step in chain
            .steps
            .iter()
            .filter(|st| st.outcome == StepOutcome::Failed)
        {
            let id = DeadLetter::for_event(
                &trace.event,
                DeadReason::StepFailed,
                Some(&chain.name),
                Some(&step.name),
                "",
            )
            .id;
            if let Some(letter) = s.letters.get(trace.event.account_key.as_str(), &id)? {
                letters.push(letter);
            }
        }
    }
    Ok(letters)
}

fn run_context(
    account: &str,
    trace: &Trace,
    letters: Vec<DeadLetter>,
    rerun: Option<String>,
    session: &Session,
) -> minijinja::Value {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let status = trace.status.as_str();
    let chains: Vec<Value> = trace
        .chains
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "version": c.version,
                "steps": c.steps.iter().map(|st| serde_json::json!({
                    "name": st.name,
                    "handler": st.handler,
                    "outcome": serde_json::to_value(st.outcome).ok(),
                    "attempts": st.attempts,
                    "duration": format!("{:.1} ms", st.duration_ms),
                    "output": st.output.as_ref().filter(|o| !o.is_empty()).map(|o| pretty(&Value::Object(o.clone()))),
                    "error": st.error,
                    "logs": st.logs,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let letters: Vec<Value> = letters
        .iter()
        .map(|l| serde_json::json!({"id": l.id, "chain": l.chain, "step": l.step}))
        .collect();
    context! {
        account,
        status,
        event => view(serde_json::json!({
            "id": trace.event.id.to_string(),
            "conversation_type": trace.event.conversation_type.to_string(),
            "conversation_key": trace.event.conversation_key.to_string(),
            "event_type": trace.event.event_type.to_string(),
        })),
        event_data => pretty(&Value::Object(trace.event.event_data.clone())),
        started_at => format_rfc3339(trace.started_at),
        finished_at => trace.finished_at.map(format_rfc3339),
        parent_id => trace.parent_id.map(|p| p.to_string()),
        children => trace.children.iter().map(ToString::to_string).collect::<Vec<_>>(),
        chains => view(&chains),
        letters => view(&letters),
        rerun,
        session => session_view(session),
    }
}

pub(super) async fn replay(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Page {
    checked_form(&session, &form.csrf)?;
    match s.letters.replay(key.as_str(), &id).await {
        Ok(letter) => {
            let to = match &letter.event {
                Some(event) => format!("/console/accounts/{key}/events/{}", event.id),
                None => format!("/console/accounts/{key}"),
            };
            Ok(Redirect::to(&to).into_response())
        }
        Err(e) => Err(error_page(
            StatusCode::CONFLICT,
            Some(&session),
            &format!("The dead letter could not be replayed: {e}"),
        )
        .into()),
    }
}

/// Runs the event again, whole, as a new event (see `api::rerun`), and shows
/// the new event's run.
pub(super) async fn rerun(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Page {
    checked_form(&session, &form.csrf)?;
    match crate::api::rerun::rerun_event(&s, &key, &id).await {
        Ok(again) => Ok(Redirect::to(&format!(
            "/console/accounts/{key}/events/{id}?rerun={}",
            again.id
        ))
        .into_response()),
        Err(e) => Err(error_page(
            e.status(),
            Some(&session),
            &format!("The event could not be run again: {}", e.message()),
        )
        .into()),
    }
}
