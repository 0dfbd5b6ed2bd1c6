//! The live tail over Server-Sent Events: `GET
//! /v1/accounts/{account}/events/stream` (a bearer token) and the console's
//! events page (a session), one `handled` event per pass over an event of
//! the account that passes the filters.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use switchboard_api::events::TailQuery;
use switchboard_engine::tail::Tail;
use switchboard_sdk::AccountKey;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, ApiState, account_key};

pub(super) async fn stream(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(query): Query<TailQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let account = account_key(&account)?;
    Ok(sse(&s.tail, account, query))
}

/// The rows of `account`'s events that pass `query`, from now on. A reader
/// that falls behind loses rows (an `event: dropped` says how many); the
/// dispatcher never waits for it.
pub(crate) fn sse(
    tail: &Tail,
    account: AccountKey,
    query: TailQuery,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let rows = tail.watch();
    let stopped = tail.stopped();
    let stream = futures::stream::unfold(
        (rows, stopped, account, query),
        |(mut rows, mut stopped, account, query)| async move {
            loop {
                let received = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return None,
                    received = rows.recv() => received,
                };
                let event = match received {
                    Ok(row) if row.account_key == account && query.admits(&row) => Event::default()
                        .event("handled")
                        .id(row.id.to_string())
                        .json_data(&*row)
                        .expect("a row serialises"),
                    Ok(_) => continue,
                    // Rows of every account count here, so the number is
                    // an upper bound for this account's.
                    Err(RecvError::Lagged(n)) => Event::default()
                        .event("dropped")
                        .data(format!("{{\"dropped\":{n}}}")),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok(event), (rows, stopped, account, query)));
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
