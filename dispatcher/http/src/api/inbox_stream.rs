//! `GET /v1/inbox/stream`: a receiver's inbox live, over Server-Sent
//! Events.
//!
//! - `notification` (with the notification as data, and its place as the
//!   event's id): a new notification;
//! - `updated`: one was read, unread, archived or unarchived;
//! - `removed` (`{"id": …}`): one was removed by housekeeping;
//! - `count` (`{"unread": …, "total": …}`): the counts, at the start (with
//!   the place a reconnecting client resumes from as its id: past the
//!   newest notification, or the beginning of an empty inbox) and whenever
//!   they change (once after a burst of changes);
//! - `reset`: more was missed than a stream resends: reload the listing.
//!
//! An inbox is ordered by when notifications were left (see
//! `StoredInbox::deliver`), so a client reconnecting with `Last-Event-ID`
//! (browsers' EventSource send it by themselves; the widget too) first gets
//! every notification left after that one: nothing is missed across a
//! reconnection. Changes to read and archived state made meanwhile are
//! not resent: reload the listing after a reconnection (the widget does).
//!
//! The feed is the store's own ([`Store::watch`], handed out by receiver
//! in [`crate::inbox_feed`]), so a notification left by any replica's chain
//! reaches a stream on any replica. A client that falls behind is dropped
//! (it reconnects and resumes); the dispatcher never waits for one. A
//! stream ends when its token expires, and when the account's key is
//! rotated (on any replica: the keys are watched as the inboxes are), or
//! at the latest [`RECHECK`] after.
//!
//! [`Store::watch`]: switchboard_store::Store::watch

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use switchboard_handlers::records::{Cursor, InboxCount, Notification};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::*;
use crate::receiver_tokens::Receiver;

/// Notifications a resuming stream reads from the store at a time.
const RESUME_BATCH: usize = 200;

/// The most a resuming stream resends; past it, `reset`.
const RESUME_MAX: usize = 1_000;

/// How long a stream waits for this replica to read the account's records
/// whole when it kept no copy of them.
const COPY_WAIT: Duration = Duration::from_secs(30);

/// How often an open stream checks that its token is still valid besides
/// when a signing key changes.
pub const RECHECK: Duration = Duration::from_secs(60);

pub(super) async fn own_stream(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Principal::Receiver(who) = principal else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the /v1/inbox routes need a receiver token",
        ));
    };
    // `auth::require_token` resolved this very header to `who`.
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, t)| t.trim().to_string())
        .unwrap_or_default();
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
    // Changes are watched in the local copy: a replica that keeps none of
    // the account's partition (`bus.standbys`) keeps one while the stream
    // lasts.
    let copy = s.store.copy_account(who.account.as_str());
    if !copy.ready(COPY_WAIT).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "catching_up",
            format!(
                "this replica is still reading the account's records from the changelog \
                 after {COPY_WAIT:?}: try again shortly"
            ),
        ));
    }
    // Watch first, then read: nothing left in between is missed (what
    // both show is sent twice, the second time as `updated`).
    let changes = s
        .inbox_feed
        .subscribe(switchboard_state::inbox::receiver_prefix(
            &who.account,
            &who.receiver,
        ))
        .map_err(|e| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!("{e} ([inbox] max_streams_per_receiver): close one first"),
            )
        })?;
    let mut opening = Vec::new();
    let mut high_water = s
        .inbox
        .newest(&who.account, &who.receiver)
        .map_err(ApiError::internal)?;
    if let Some(from) = &resume {
        let mut missed = Vec::new();
        let mut last = from.clone();
        loop {
            let batch = s
                .inbox
                .after(&who.account, &who.receiver, &last, RESUME_BATCH)
                .map_err(ApiError::internal)?;
            let Some(end) = batch.last() else { break };
            last = end.cursor();
            missed.extend(batch);
            if missed.len() > RESUME_MAX {
                break;
            }
        }
        if missed.len() > RESUME_MAX {
            opening.push(Event::default().event("reset").data("{}"));
        } else {
            opening.extend(missed.iter().map(new_notification));
            // One left since the newest was read is sent once.
            high_water = high_water.max(missed.last().map(Notification::cursor));
        }
    }
    let count = s
        .inbox
        .count(&who.account, &who.receiver)
        .map_err(ApiError::internal)?;
    // Where a client that reconnects resumes: past everything sent or
    // there; from the start for an inbox that was empty.
    let resume_point = high_water.clone().max(resume);
    opening.push(count_event(count).id(resume_point.map_or_else(
        || {
            Cursor {
                micros: 0,
                id: "0".into(),
            }
            .to_string()
        },
        |c| c.to_string(),
    )));
    let expires = tokio::time::Instant::now()
        + (who.expires_at - switchboard_sdk::now())
            .try_into()
            .unwrap_or(Duration::ZERO);
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keys = s.store.watch(switchboard_store::Collection::SigningKeys);
    let live = Live {
        _copy: copy,
        keys,
        keys_prefix: switchboard_state::signing_keys_prefix(&who.account),
        s: s.clone(),
        who,
        token,
        changes,
        stopped: s.tail.stopped(),
        expires,
        recheck,
        high_water: high_water.take(),
        count,
        counts_moved: false,
    };
    let opening = futures::stream::iter(opening.into_iter().map(Ok));
    let live = futures::stream::unfold(live, |mut live| async move {
        let event = live.next().await?;
        Some((Ok(event), live))
    });
    Ok(Sse::new(futures::StreamExt::chain(opening, live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
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
    /// The account's partition, copied here while the stream lasts.
    _copy: switchboard_store::AccountCopy,
    s: ApiState,
    who: Receiver,
    /// The stream's token, checked again now and then.
    token: String,
    changes: tokio::sync::broadcast::Receiver<switchboard_store::Watched>,
    stopped: tokio::sync::watch::Receiver<bool>,
    /// When the token expires.
    expires: tokio::time::Instant,
    recheck: tokio::time::Interval,
    /// Changes to signing keys (a rotation ends the stream).
    keys: tokio::sync::broadcast::Receiver<switchboard_store::Watched>,
    /// The start of the keys of the account's signing keys.
    keys_prefix: Vec<u8>,
    /// The newest notification sent (or there when the stream began).
    high_water: Option<Cursor>,
    /// The counts last sent.
    count: InboxCount,
    /// Whether a change since the counts were last sent may have moved them.
    counts_moved: bool,
}

impl Live {
    /// The next event, or `None` when the stream ends (the dispatcher
    /// stops, the token is no longer valid, or the client fell behind and
    /// must reconnect).
    async fn next(&mut self) -> Option<Event> {
        loop {
            let changed = match self.changes.try_recv() {
                Ok(w) => Ok(w),
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
                Err(TryRecvError::Empty) => {
                    // Caught up: the counts once for the changes so far.
                    if self.counts_moved {
                        self.counts_moved = false;
                        if let Some(event) = self.recount() {
                            return Some(event);
                        }
                    }
                    let woke = tokio::select! {
                        _ = self.stopped.wait_for(|s| *s) => return None,
                        _ = tokio::time::sleep_until(self.expires) => return None,
                        _ = self.recheck.tick() => None,
                        key = self.keys.recv() => match key {
                            // Another account's key: nothing to check.
                            Ok(k) if !k.key.starts_with(&self.keys_prefix) => {
                                continue;
                            }
                            Err(RecvError::Closed) => return None,
                            // This account's key changed, or changes were missed.
                            _ => None,
                        },
                        changed = self.changes.recv() => Some(changed),
                    };
                    match woke {
                        Some(changed) => changed,
                        None if self.still_valid() => continue,
                        None => return None,
                    }
                }
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
            self.counts_moved = true;
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
                    let Some(removed) = switchboard_state::inbox::cursor_of_key(&watched.key)
                    else {
                        continue;
                    };
                    Event::default()
                        .event("removed")
                        .json_data(serde_json::json!({ "id": removed.id }))
                        .expect("an id serialises")
                }
            };
            return Some(event);
        }
    }

    /// The counts, when they moved since last sent.
    fn recount(&mut self) -> Option<Event> {
        match self.s.inbox.count(&self.who.account, &self.who.receiver) {
            Ok(count) if count != self.count => {
                self.count = count;
                Some(count_event(count))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "counting an inbox for its stream failed");
                None
            }
        }
    }

    /// Whether the stream's token still opens this inbox (the account's
    /// key may have been rotated).
    fn still_valid(&self) -> bool {
        match self.s.auth.receivers().verify(&self.token) {
            Ok(Some(r)) => r.account == self.who.account && r.receiver == self.who.receiver,
            Ok(None) => false,
            // Checked again at the next tick.
            Err(e) => {
                tracing::warn!(error = %e, "checking an inbox stream's token failed");
                true
            }
        }
    }
}
