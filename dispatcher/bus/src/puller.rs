//! Pulls messages from one JetStream pull consumer for [`crate::pull`]:
//! pull requests kept pipelined, with an exact count of what they may still
//! bring, so that one is always live on the server while messages wait.
//!
//! Why not async-nats's `Consumer::stream().messages()`: that stream
//! (async-nats 0.51, `src/jetstream/consumer/pull.rs`: the request task in
//! `Stream::stream` from line 935, `impl Stream for Stream` from line 1151)
//! asks again when the messages it still expects fall to half a batch, but
//! adds the batch to that count only when its background task reports the
//! request published; messages that arrive meanwhile are taken off a count
//! that stops at zero. When that task is slow to report (5–9 ms were seen
//! on a busy two-core machine), the whole new batch can arrive first, and
//! the count ends a batch too high with no request left on the server. A
//! request the server fills completely sends no status that could correct
//! it, so the stream waits — reporting "missed idle heartbeat" every 2 s,
//! as no live request means no heartbeats, but not acting on it — until the
//! task's fallback asks again `expires` + 5 s later: a 7 s stall with
//! events waiting (`tests/pull_stall.rs`).
//!
//! Here the batch is counted when the request is decided, before it is
//! published, so no message can come before its request is counted (the
//! [`Ledger`]). Request `n` replies on `{inbox}.{n}`: the server sends
//! messages with their stream subject, so they count against the requests
//! together (they arrive in one subscription, in the order sent, which
//! keeps bus order), but its statuses (heartbeats, timeouts with what the
//! request did not deliver, refusals) on the request's own subject. That
//! tells which requests are alive; once none is, nothing is due, whatever
//! was lost without a word (a dropped connection takes the server's
//! requests with it), and the pull asks again.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{StatusCode, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The JetStream API prefix of the bus's context (`jetstream::new`).
const API_PREFIX: &str = "$JS.API";

/// How long the pull waits before asking again after the server turned a
/// request away (no responders while a cluster elects leaders, a leadership
/// change, too many waiting requests), so that it does not ask in a loop.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// The least time between two looks for silent requests. A request is
/// judged over only after two heartbeats of silence, so a look this much
/// late changes nothing; looking each time the next one is due did, at
/// thousands of events a second: a filled request stays in the ledger
/// until its silence ends, so each look went over a few thousand of them,
/// and one came due every few milliseconds.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How a consumer is pulled.
#[derive(Debug, Clone)]
pub(super) struct PullSettings {
    /// Messages per request.
    pub batch: usize,
    /// How long a request lasts on the server.
    pub expires: Duration,
    /// How often the server reports a request alive while it has nothing
    /// to send it (at most half of `expires`, the server requires).
    pub heartbeat: Duration,
    /// The priority group of a pinned-client consumer (the partitions'):
    /// requests name it, and the pin this client holds.
    pub pinned_group: Option<String>,
}

/// Why a pull ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum PullError {
    /// The inbox the replies come to could not be subscribed to.
    #[error("subscribing to the replies of consumer {consumer}: {source}")]
    Subscribe {
        consumer: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    /// The consumer was deleted while it was pulled.
    #[error("consumer {consumer} was deleted")]
    ConsumerDeleted { consumer: String },
    /// The server refuses the requests in a way that asking again cannot
    /// change (a push consumer, limits lower than the requests).
    #[error("consumer {consumer} refuses pull requests: {status} {description}")]
    Refused {
        consumer: String,
        status: u16,
        description: String,
    },
    /// The connection was closed: no more replies come.
    #[error("the pull of consumer {consumer} ended: the NATS connection is closed")]
    Closed { consumer: String },
}

/// A pull request's body (`$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}`),
/// durations in nanoseconds.
#[derive(Debug, Serialize)]
struct NextRequest<'a> {
    batch: usize,
    expires: u128,
    idle_heartbeat: u128,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    /// The pin this client holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

/// The pull of one consumer. Dropping it unsubscribes, so the server drops
/// its requests; messages it delivered and the pull did not hand out come
/// again after the ack wait.
pub(super) struct Puller {
    consumer: String,
    context: jetstream::Context,
    settings: PullSettings,
    inbox: String,
    replies: Subscriber,
    ledger: Ledger,
    /// Requests to publish, in order: publishing awaits the connection, and
    /// [`Puller::next`] must not await anything that a cancel could cut in
    /// half.
    asks: mpsc::UnboundedSender<(String, Bytes)>,
    publisher: JoinHandle<()>,
    ended: bool,
    /// Wakes the pull to judge silent requests. One timer, set again only
    /// when it fires or the ledger's news may bring its time forward: a
    /// timer made for every message cost a tenth of the dispatcher's time.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When the timer is set to fire; `None` when it is to be set again.
    armed: Option<Instant>,
}

impl Drop for Puller {
    fn drop(&mut self) {
        self.publisher.abort();
    }
}

impl Puller {
    /// Subscribes to a fresh inbox for the replies of `consumer` on
    /// `stream`; the first request goes out at the first [`Puller::next`].
    pub async fn start(
        js: &jetstream::Context,
        stream: &str,
        consumer: &str,
        settings: PullSettings,
    ) -> Result<Self, PullError> {
        let client = js.client();
        let inbox = client.new_inbox();
        let replies = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|source| PullError::Subscribe {
                consumer: consumer.to_string(),
                source,
            })?;
        let subject = format!("{API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{consumer}");
        let (asks, mut to_publish) = mpsc::unbounded_channel::<(String, Bytes)>();
        let name = consumer.to_string();
        let publisher = tokio::spawn(async move {
            while let Some((reply, body)) = to_publish.recv().await {
                if let Err(e) = client
                    .publish_with_reply(subject.clone(), reply, body)
                    .await
                {
                    // The request stays silent and is asked again.
                    tracing::debug!(consumer = %name, error = %e, "sending a pull request failed");
                }
            }
        });
        Ok(Self {
            consumer: consumer.to_string(),
            context: js.clone(),
            ledger: Ledger::new(&settings),
            settings,
            inbox,
            replies,
            asks,
            publisher,
            ended: false,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
        })
    }

    /// Sends no more requests: what the live ones bring still comes.
    pub fn stop_asking(&mut self) {
        self.ledger.asking = false;
    }

    /// The next message; an error once, when the pull ends for good, and
    /// then `None`. Cancel-safe: it changes nothing while it awaits.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, PullError>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(lost) = self.ledger.write_off() {
                tracing::warn!(consumer = %self.consumer, lost,
                    "pull requests went silent (no message, heartbeat or timeout) before delivering what they owed; asking again");
            }
            if let Some((n, pin)) = self.ledger.ask(Instant::now()) {
                // (A new request is judged silent no sooner than those
                // before it: the timer stays as it is.)
                self.send(n, pin);
            }
            // The ledger's next check can only move later as messages come
            // (a request is judged silent a while after the last message),
            // so a timer set earlier fires early at worst, and is set again.
            if self.armed.is_none()
                && let Some(at) = self.ledger.next_check()
            {
                self.timer.as_mut().reset(at);
                self.armed = Some(at);
            }
            // Replies first: a pull not polled for a while (a busy executor)
            // reads what came meanwhile before it judges any request silent.
            let reply = tokio::select! {
                biased;
                reply = self.replies.next() => reply,
                _ = &mut self.timer, if self.armed.is_some() => {
                    self.armed = None;
                    self.ledger.check(Instant::now());
                    continue;
                }
            };
            let Some(reply) = reply else {
                self.ended = true;
                return Some(Err(PullError::Closed {
                    consumer: self.consumer.clone(),
                }));
            };
            if let Some(item) = self.take(reply) {
                return Some(item);
            }
        }
    }

    fn send(&mut self, n: u64, pin: Option<String>) {
        let body = NextRequest {
            batch: self.settings.batch,
            expires: self.settings.expires.as_nanos(),
            idle_heartbeat: self.settings.heartbeat.as_nanos(),
            group: self.settings.pinned_group.as_deref(),
            id: pin.as_deref(),
        };
        let body = serde_json::to_vec(&body).expect("a pull request serialises");
        // The publisher lives as long as the pull.
        let _ = self
            .asks
            .send((format!("{}.{n}", self.inbox), Bytes::from(body)));
    }

    /// What a reply means: a message to hand out, the end of the pull, or
    /// (`None`) only news of a request.
    fn take(
        &mut self,
        reply: async_nats::Message,
    ) -> Option<Result<jetstream::Message, PullError>> {
        let now = Instant::now();
        let status = reply.status.unwrap_or(StatusCode::OK);
        if status == StatusCode::OK {
            let pin = self
                .settings
                .pinned_group
                .as_ref()
                .and(reply.headers.as_ref())
                .and_then(|h| h.get_last(async_nats::header::NATS_PIN_ID))
                .map(|v| v.as_str().to_string());
            self.ledger.message(pin, now);
            return Some(Ok(jetstream::Message {
                message: reply,
                context: self.context.clone(),
            }));
        }
        // Statuses come on the subject of the request they are about.
        let request = reply
            .subject
            .as_str()
            .strip_prefix(self.inbox.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok());
        // What the request will not deliver; a status without the header
        // ends a request the server refused, which delivered nothing.
        let undelivered = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(PENDING_MESSAGES))
            .and_then(|v| v.as_str().parse::<usize>().ok());
        let description = reply.description.unwrap_or_default();
        // News of a request (a pause after a refusal, a request gone) may
        // bring the next check forward: the timer is set again.
        self.armed = None;
        let news = match status {
            StatusCode::IDLE_HEARTBEAT => News::Alive,
            // Expired ("Request Timeout", "Interest Expired"), or nothing
            // to send to a request that would not wait.
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND => News::Ended,
            StatusCode::PIN_ID_MISMATCH => News::WrongPin,
            StatusCode::REQUEST_TERMINATED => match description.as_str() {
                "Consumer Deleted" => {
                    self.ended = true;
                    return Some(Err(PullError::ConsumerDeleted {
                        consumer: self.consumer.clone(),
                    }));
                }
                d if d == "Consumer is push based" || d.starts_with("Exceeded MaxRequest") => {
                    News::Fatal
                }
                // "Leadership Change", "Exceeded MaxWaiting", "Server
                // Shutdown", ...: this request is gone; another may do.
                _ => News::TurnedAway,
            },
            StatusCode::NO_RESPONDERS => News::TurnedAway,
            // A request the server cannot read ("Bad Request ..."), or one
            // it cannot serve at this API level: the next would fare alike.
            s if matches!(s.as_u16(), 400 | 412) => News::Fatal,
            _ => News::TurnedAway,
        };
        match news {
            News::Alive => self.ledger.alive(request, now),
            News::Ended => {
                self.ledger.end(request, undelivered);
            }
            News::WrongPin => {
                tracing::debug!(consumer = %self.consumer, "the consumer is pinned to another pull; asking without the old pin");
                self.ledger.wrong_pin(request, undelivered);
            }
            News::TurnedAway => {
                if self.ledger.turned_away(request, undelivered, now) {
                    tracing::warn!(consumer = %self.consumer, status = %status, description = %description,
                        "a pull request was turned away; asking again shortly");
                } else {
                    tracing::debug!(consumer = %self.consumer, status = %status, description = %description,
                        "a pull request was turned away again");
                }
            }
            News::Fatal => {
                self.ended = true;
                return Some(Err(PullError::Refused {
                    consumer: self.consumer.clone(),
                    status: status.as_u16(),
                    description,
                }));
            }
        }
        None
    }
}

/// The header of a status that ends a request: how many messages of its
/// batch it did not deliver.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";

/// What a status says about its request.
enum News {
    /// A heartbeat: it is alive, with nothing to send it.
    Alive,
    /// It is over.
    Ended,
    /// It named a pin the consumer does not hold (any more).
    WrongPin,
    /// It was turned away for now.
    TurnedAway,
    /// Every request would be.
    Fatal,
}

/// The pull's decisions as plain data, without I/O: when to ask, which
/// requests are alive, and how many messages they may still bring.
#[derive(Debug)]
struct Ledger {
    batch: usize,
    /// A request neither heard from nor possibly busy sending for this long
    /// is over: two heartbeats.
    silence: Duration,
    expires: Duration,
    /// Messages the live requests may still bring, in all: the batches
    /// asked for, less the messages received and what the server said it
    /// will not deliver. Counted when a request is decided, before it is
    /// sent, so that its messages can never come first.
    due: usize,
    /// The requests that may still be alive on the server.
    live: BTreeMap<u64, Request>,
    /// The number of the next request.
    next: u64,
    /// The first request counted in `due`: those before were written off
    /// when no request was left alive.
    counted_from: u64,
    /// When the last message came.
    last_message: Option<Instant>,
    /// When [`Ledger::check`] last looked.
    last_check: Option<Instant>,
    /// The pin this client holds (pinned consumers), as its last message
    /// said.
    pin: Option<String>,
    /// No request before this, after one was turned away.
    paused_until: Option<Instant>,
    /// Requests turned away in a row.
    turned_away: u32,
    /// False once the pull is stopping: no more requests.
    asking: bool,
}

#[derive(Debug)]
struct Request {
    /// The pin it was sent with.
    pin: Option<String>,
    /// When it was sent, or last heard from.
    heard: Instant,
    /// When the server lets it expire.
    expires_at: Instant,
}

impl Ledger {
    fn new(settings: &PullSettings) -> Self {
        Self {
            batch: settings.batch.max(1),
            silence: 2 * settings.heartbeat,
            expires: settings.expires,
            due: 0,
            live: BTreeMap::new(),
            next: 0,
            counted_from: 0,
            last_message: None,
            last_check: None,
            pin: None,
            paused_until: None,
            turned_away: 0,
            asking: true,
        }
    }

    /// A new request to send (its number and the pin to name), when what
    /// is due has fallen to half a batch: so one is always live while
    /// messages wait, and at most a batch and a half is on its way.
    fn ask(&mut self, now: Instant) -> Option<(u64, Option<String>)> {
        if !self.asking || self.paused_until.is_some_and(|until| now < until) {
            return None;
        }
        self.paused_until = None;
        if self.due > self.batch / 2 {
            return None;
        }
        let n = self.next;
        self.next += 1;
        self.due += self.batch;
        self.live.insert(
            n,
            Request {
                pin: self.pin.clone(),
                heard: now,
                expires_at: now + self.expires,
            },
        );
        Some((n, self.pin.clone()))
    }

    /// A message, under `pin` when the consumer is pinned.
    fn message(&mut self, pin: Option<String>, now: Instant) {
        // A message of a request written off makes this one short: the
        // pull asks again a little early, never late.
        self.due = self.due.saturating_sub(1);
        self.last_message = Some(now);
        self.turned_away = 0;
        if pin.is_some() && pin != self.pin {
            // The server gave this client the pin (it may have had another
            // before): later requests name it.
            self.pin = pin;
        }
    }

    /// A heartbeat of request `n`.
    fn alive(&mut self, n: Option<u64>, now: Instant) {
        self.turned_away = 0;
        if let Some(request) = n.and_then(|n| self.live.get_mut(&n)) {
            request.heard = now;
        }
    }

    /// Request `n` is over, with `undelivered` of its batch not delivered
    /// (all of it when the server does not say).
    fn end(&mut self, n: Option<u64>, undelivered: Option<usize>) -> Option<Request> {
        let n = n?;
        if n >= self.counted_from {
            self.due = self
                .due
                .saturating_sub(undelivered.unwrap_or(self.batch).min(self.batch));
        }
        self.live.remove(&n)
    }

    /// Request `n` named a pin the consumer does not hold: if it is the one
    /// this client thought it held, the pin is gone, and the next request
    /// names none (the server gives the pin to such a request once it is
    /// free).
    fn wrong_pin(&mut self, n: Option<u64>, undelivered: Option<usize>) {
        if let Some(request) = self.end(n, undelivered)
            && request.pin == self.pin
        {
            self.pin = None;
        }
    }

    /// Request `n` was turned away: the next waits a moment. Returns
    /// whether it is the first in a row.
    fn turned_away(&mut self, n: Option<u64>, undelivered: Option<usize>, now: Instant) -> bool {
        self.end(n, undelivered);
        self.paused_until = Some(now + RETRY_AFTER);
        self.turned_away += 1;
        self.turned_away == 1
    }

    /// When request `r` is over at the latest, unless heard from: it sends
    /// a heartbeat whenever it has had nothing to send for a heartbeat, and
    /// ends (408) when it expires. One filled, or lost with the connection,
    /// says nothing more.
    fn over_at(&self, r: &Request) -> Instant {
        let busy = self.last_message.map_or(r.heard, |m| m.max(r.heard));
        (busy + self.silence).min(r.expires_at + self.silence)
    }

    /// When [`Ledger::check`] has something to do next (no sooner than
    /// [`CHECK_EVERY`] after it last looked), or the pause ends.
    fn next_check(&self) -> Option<Instant> {
        let over = self.live.values().map(|r| self.over_at(r)).min();
        let over = match (over, self.last_check) {
            (Some(at), Some(last)) => Some(at.max(last + CHECK_EVERY)),
            (over, _) => over,
        };
        over.into_iter()
            .chain(self.paused_until.filter(|_| self.asking))
            .min()
    }

    /// Drops the requests over by `now`.
    fn check(&mut self, now: Instant) {
        self.last_check = Some(now);
        let over: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, r)| self.over_at(r) <= now)
            .map(|(n, _)| *n)
            .collect();
        for n in over {
            self.live.remove(&n);
        }
    }

    /// When no request is left alive, nothing is due: writes off what was
    /// still counted (requests lost without a word, as with a dropped
    /// connection) and returns it, if anything.
    fn write_off(&mut self) -> Option<usize> {
        if !self.live.is_empty() || self.due == 0 {
            return None;
        }
        self.counted_from = self.next;
        Some(std::mem::take(&mut self.due))
    }
}

#[cfg(test)]
mod tests;
