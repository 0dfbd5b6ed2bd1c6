//! The account's events as they are handled: a page whose table fills from
//! a Server-Sent Events stream (the same rows as `GET .../events/stream`),
//! filtered by conversation type, event type, conversation key and status.

use std::convert::Infallible;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use futures::Stream;
use minijinja::context;
use serde_json::json;
use switchboard_api::events::{EventListQuery, TailQuery};
use switchboard_sdk::format_rfc3339;

use super::{OnAccount, Page, internal, render, session_view, view};
use crate::api::ApiState;

pub(super) async fn page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Query(query): Query<EventListQuery>,
) -> Page {
    let (events, next, error) = match s.traces.list(&key, &query) {
        Ok(Ok(page)) => (page.events, page.next, None),
        Ok(Err(e)) => (Vec::new(), None, Some(e)),
        Err(e) => return Err(internal(&session, &e).into()),
    };
    // The link to the next page keeps the filters.
    let older = next.map(|next| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("conversation_type", &query.filters.conversation_type),
            ("event_type", &query.filters.event_type),
            ("conversation_key", &query.filters.conversation_key),
            ("status", &query.filters.status),
        ] {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                q.append_pair(name, v);
            }
        }
        q.append_pair("before", &next);
        q.finish()
    });
    let rows: Vec<_> = events
        .iter()
        .map(|e| {
            json!({
                // As the stream's rows show it: to the second.
                "at": e.at.replace_nanosecond(0).map_or_else(|_| format_rfc3339(e.at), format_rfc3339).replace('T', " "),
                "id": e.id.to_string(),
                "types": format!("{} / {}", e.conversation_type, e.event_type),
                "conversation_key": e.conversation_key.to_string(),
                "status": e.status,
                "chains": e.chains.iter().map(|c| match &c.step {
                    Some(step) => format!("{}: {} at {step}", c.name, c.outcome),
                    None => format!("{}: {}", c.name, c.outcome),
                }).collect::<Vec<_>>().join(", "),
            })
        })
        .collect();
    Ok(render(
        "tail.html",
        context! {
            account => key.as_str(),
            query => view(&query.filters),
            live => query.before.as_deref().is_none_or(str::is_empty),
            rows => view(&rows),
            older,
            error,
            session => session_view(&session),
        },
    ))
}

pub(super) async fn stream(
    State(s): State<ApiState>,
    OnAccount { key, .. }: OnAccount,
    headers: HeaderMap,
    Query(query): Query<TailQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, crate::api::ApiError> {
    // Signed out, or its token revoked: the stream ends. A store that
    // fails to answer counts as yes: the next check asks again.
    let state = s.clone();
    let holds = move || match state.sessions.of(&headers) {
        None => false,
        Some(session) => !matches!(state.auth.holds(&session.credential), Ok(false)),
    };
    crate::api::tail::sse(&s.tail, key, query, holds)
}
