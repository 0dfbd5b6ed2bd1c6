//! The account's events as they are handled: a page whose table fills from
//! a Server-Sent Events stream (the same rows as `GET .../events/stream`),
//! filtered by conversation type, event type, conversation key and status.

use std::convert::Infallible;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use minijinja::context;
use switchboard_api::events::TailQuery;

use super::{Page, reachable, render, session_view, signed_in, view};
use crate::api::ApiState;

pub(super) async fn page(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(account): Path<String>,
    Query(query): Query<TailQuery>,
) -> Page {
    let session = signed_in(&s, &headers)?;
    reachable(&session, &account)?;
    Ok(render(
        "tail.html",
        context! {
            account,
            query => view(&query),
            session => session_view(&session),
        },
    ))
}

pub(super) async fn stream(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(account): Path<String>,
    Query(query): Query<TailQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let session = signed_in(&s, &headers).map_err(IntoResponse::into_response)?;
    let key = reachable(&session, &account).map_err(IntoResponse::into_response)?;
    Ok(crate::api::tail::sse(&s.tail, key, query))
}
