//! The live tail over Server-Sent Events: `GET
//! /v1/accounts/{account}/events/stream` (a bearer token) and the console's
//! events page (a session), one `handled` event per pass over an event of
//! the account that passes the filters.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use switchboard_api::events::TailQuery;
use switchboard_engine::tail::{Tail, Watcher};
use switchboard_sdk::AccountKey;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, ApiState, account_key};
use crate::auth::{Principal, still_holds};

/// How often an open stream checks that what opened it (a token, a
/// console session) still holds: revoked, expired or signed out, the
/// stream ends within this.
pub const RECHECK: Duration = Duration::from_secs(5);

pub(super) async fn stream(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(account): Path<String>,
    Query(query): Query<TailQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let account = account_key(&account)?;
    let auth = s.auth.clone();
    let holds = move || still_holds(&auth, &headers, &principal);
    sse(&s.tail, account, query, holds)
}

/// The rows of `account`'s events that pass `query`, from now on, while
/// `holds` says the reader may still read them (asked every [`RECHECK`]).
/// A reader that falls behind loses rows (an `event: dropped` says how
/// many); the dispatcher never waits for it. An account with
/// [`switchboard_engine::tail::MAX_WATCHERS_PER_ACCOUNT`] streams open is
/// refused another (429 `too_many_streams`).
pub(crate) fn sse<F>(
    tail: &Tail,
    account: AccountKey,
    query: TailQuery,
    holds: F,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<F>>, ApiError>
where
    F: Fn() -> bool + Send + 'static,
{
    let watcher = tail.watch(&account).map_err(|e| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!("{e}: close one first"),
        )
    })?;
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let open = Open {
        rows: watcher,
        stopped: tail.stopped(),
        recheck,
        holds,
        query,
    };
    let stream = futures::stream::unfold(open, |mut open| async move {
        let event = open.next().await?;
        Some((Ok(event), open))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// An open stream of one account's rows.
struct Open<F> {
    rows: Watcher,
    stopped: tokio::sync::watch::Receiver<bool>,
    recheck: tokio::time::Interval,
    holds: F,
    query: TailQuery,
}

impl<F: Fn() -> bool> Open<F> {
    /// The next event to send; `None` once the stream ends.
    async fn next(&mut self) -> Option<Event> {
        loop {
            let received = tokio::select! {
                _ = self.stopped.wait_for(|s| *s) => return None,
                _ = self.recheck.tick() => None,
                received = self.rows.rows.recv() => Some(received),
            };
            let Some(received) = received else {
                if (self.holds)() {
                    continue;
                }
                return None;
            };
            return match received {
                Ok(row) if self.query.admits(&row) => Some(
                    Event::default()
                        .event("handled")
                        .id(row.id.to_string())
                        .json_data(&*row)
                        .expect("a row serialises"),
                ),
                Ok(_) => continue,
                // The account's rows lost, whether the query admits them
                // or not.
                Err(RecvError::Lagged(n)) => Some(
                    Event::default()
                        .event("dropped")
                        .data(format!("{{\"dropped\":{n}}}")),
                ),
                Err(RecvError::Closed) => None,
            };
        }
    }
}
