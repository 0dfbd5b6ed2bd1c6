//! `GET /v1/inbox/stream`: a receiver's inbox live, over Server-Sent
//! Events.
//!
//! - `notification` (with the notification as data, and its place as the
//!   event's id): a new notification;
//! - `updated`: one was read, unread, archived or unarchived;
//! - `removed` (`{"id": …}`): one was removed by housekeeping;
//! - `count` (`{"unread": …, "total": …}`): the counts, once at the start
//!   and after every change to them.
//!
//! A client reconnecting with `Last-Event-ID` (which browsers' EventSource
//! send by themselves) first gets every notification made after that one,
//! so nothing is missed across a reconnection. The feed is the store's own
//! ([`Store::watch`]), so a notification left by any replica's chain
//! reaches a stream on any replica. A client that falls behind is dropped
//! (it reconnects and resumes); the dispatcher never waits for one.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use switchboard_handlers::records::{Cursor, InboxCount, InboxFilter, Notification};
use switchboard_store::Collection;
use tokio::sync::broadcast::error::RecvError;

use super::*;
use crate::receiver_tokens::Receiver;

/// Notifications a resuming stream is sent per read of the store.
const RESUME_BATCH: usize = 500;

pub(super) async fn own_stream(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let who = match principal {
        Principal::Receiver(r) => r,
        _ => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the /v1/inbox routes need a receiver token",
            ));
        }
    };
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|t| t.parse::<Cursor>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_last_event_id",
                        "Last-Event-ID: not an event id of this stream (reconnect without it)",
                    )
                })
        })
        .transpose()?;
    // Watch first, then read: nothing made in between is missed (what
    // both show is sent twice, the second time as `updated`).
    let changes = s.store.watch(Collection::Inbox);
    let mut opening = Vec::new();
    let high_water = match resume {
        Some(from) => {
            let mut last = from;
            loop {
                let missed = s
                    .inbox
                    .after(&who.account, &who.receiver, &last, RESUME_BATCH)
                    .map_err(ApiError::internal)?;
                let done = missed.len() < RESUME_BATCH;
                for n in missed {
                    last = n.cursor();
                    opening.push(new_notification(&n));
                }
                if done {
                    break;
                }
            }
            Some(last)
        }
        None => newest(&s, &who)?,
    };
    let count = s
        .inbox
        .count(&who.account, &who.receiver)
        .map_err(ApiError::internal)?;
    opening.push(count_event(count));
    let prefix = switchboard_store::key(&[
        who.account.as_str().as_bytes(),
        who.receiver.as_bytes(),
        b"",
    ]);
    let live = Live {
        s: s.clone(),
        who,
        prefix,
        changes,
        stopped: s.tail.stopped(),
        high_water,
        count,
        pending: None,
    };
    let opening = futures::stream::iter(opening.into_iter().map(Ok));
    let live = futures::stream::unfold(live, |mut live| async move {
        let event = live.next().await?;
        Some((Ok(event), live))
    });
    Ok(Sse::new(futures::StreamExt::chain(opening, live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The newest notification's place, archived or not.
fn newest(s: &ApiState, who: &Receiver) -> Result<Option<Cursor>, ApiError> {
    let mut newest = None;
    for archived in [false, true] {
        let filter = InboxFilter {
            archived,
            ..InboxFilter::default()
        };
        let page = s
            .inbox
            .page(&who.account, &who.receiver, &filter, None, 1)
            .map_err(ApiError::internal)?;
        newest = newest.max(page.notifications.first().map(Notification::cursor));
    }
    Ok(newest)
}

fn new_notification(n: &Notification) -> Event {
    Event::default()
        .event("notification")
        .id(n.cursor().to_string())
        .json_data(n)
        .expect("a notification serialises")
}

fn count_event(count: InboxCount) -> Event {
    Event::default()
        .event("count")
        .json_data(count)
        .expect("counts serialise")
}

/// A stream past its opening.
struct Live {
    s: ApiState,
    who: Receiver,
    prefix: Vec<u8>,
    changes: tokio::sync::broadcast::Receiver<switchboard_store::Watched>,
    stopped: tokio::sync::watch::Receiver<bool>,
    /// The newest notification sent (or there when the stream began).
    high_water: Option<Cursor>,
    /// The counts last sent.
    count: InboxCount,
    /// The counts after a change, not yet sent.
    pending: Option<Event>,
}

impl Live {
    /// The next event, or `None` when the stream ends (the dispatcher
    /// stops, or the client fell behind and must reconnect).
    async fn next(&mut self) -> Option<Event> {
        if let Some(count) = self.pending.take() {
            return Some(count);
        }
        loop {
            let changed = tokio::select! {
                _ = self.stopped.wait_for(|s| *s) => return None,
                changed = self.changes.recv() => changed,
            };
            let watched = match changed {
                Ok(w) => w,
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(
                        receiver = %self.who.receiver,
                        account = %self.who.account,
                        missed,
                        "dropped an inbox stream that fell behind; it resumes when it reconnects"
                    );
                    return None;
                }
                Err(RecvError::Closed) => return None,
            };
            if !watched.key.starts_with(&self.prefix) {
                continue;
            }
            let event = match watched
                .value
                .as_deref()
                .map(serde_json::from_slice::<Notification>)
            {
                Some(Ok(n)) => {
                    let cursor = n.cursor();
                    if self.high_water.as_ref().is_none_or(|h| cursor > *h) {
                        self.high_water = Some(cursor);
                        new_notification(&n)
                    } else {
                        Event::default()
                            .event("updated")
                            .json_data(&n)
                            .expect("a notification serialises")
                    }
                }
                Some(Err(_)) => continue,
                None => {
                    // `{micros: 8 bytes}\0{id}` after the receiver's prefix.
                    let id = watched.key.get(self.prefix.len() + 9..).unwrap_or_default();
                    Event::default()
                        .event("removed")
                        .json_data(serde_json::json!({"id": String::from_utf8_lossy(id)}))
                        .expect("an id serialises")
                }
            };
            // Every change may move the counts: send them after it when
            // they did.
            match self.s.inbox.count(&self.who.account, &self.who.receiver) {
                Ok(count) if count != self.count => {
                    self.count = count;
                    self.pending = Some(count_event(count));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "counting an inbox for its stream failed");
                }
            }
            return Some(event);
        }
    }
}
