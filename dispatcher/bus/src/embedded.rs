//! The embedded bus: an in-process queue, durable in the store, with the
//! semantics of the NATS bus — at-least-once, ack after handling, duplicate
//! publishes dropped within a window, everything unacked redelivered after a
//! crash.
//!
//! A publish is flushed to disk before it returns (concurrent publishes share
//! one flush). An ack removes the message without a flush: after a crash an
//! acked message may come back, which at-least-once allows and the derived ids
//! of emitted events make harmless.
//!
//! The delivery task reads the queue in order from where it got to, up to the
//! first message still being published (publishes end in any order; those
//! before it have all ended), and keeps the nakked messages in a queue of its
//! own by when each is due: what it holds for the queue's messages is a
//! number per nak, not a task or a notice per message.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use switchboard_sdk::VumiApiEvent;
use switchboard_store::{Collection, Guard, Store, Write};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use switchboard_engine::bus::{Bus, BusError, Delivery, Published, Settle};

use crate::DUPLICATE_WINDOW;

/// The sequence numbers of the publishes under way (each taken and added
/// under the lock, removed once its publish has ended), and the number
/// below which every one was taken. (Sequence numbers only grow, across
/// restarts too.)
#[derive(Debug, Default)]
struct Publishing {
    under_way: BTreeSet<u64>,
    taken_below: u64,
}

/// A nakked message: when it is due again, its sequence number and the
/// attempt it comes back as.
type Again = (Instant, u64, u32);

/// Queued messages read and not yet delivered: each sequence number and
/// record.
type Read = VecDeque<(u64, Vec<u8>)>;

/// How many queued messages the delivery task reads at once.
const READ_BATCH: usize = 256;

/// How long the delivery task waits before it reads the queue again after
/// a read failed.
const READ_RETRY: Duration = Duration::from_secs(1);

/// The embedded bus.
#[derive(Debug, Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    prefix: String,
    /// The publishes under way, and where the next one's number will be
    /// taken: the delivery task reads the queue up to the first under way,
    /// else up to that.
    publishing: Mutex<Publishing>,
    /// Woken when a publish ends.
    published: Notify,
    /// Nakked messages, to the delivery task.
    naks: mpsc::UnboundedSender<Again>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Again>>>,
    /// Messages in the queue: counted once at open, then kept up to date.
    queued: AtomicU64,
}

impl Inner {
    /// Takes a sequence number for a publish, counted as under way until
    /// [`Inner::published`] is called with it.
    fn publishing(&self) -> Result<u64, BusError> {
        let mut publishing = self.publishing.lock().expect("publishing lock");
        // (Taken under the lock, so that no number is taken unseen by
        // `readable_before`. sled makes its id counter durable once per
        // million ids, an fsync that other publishers then wait out.)
        let seq = self.store.next_id()?;
        publishing.under_way.insert(seq);
        publishing.taken_below = publishing.taken_below.max(seq + 1);
        Ok(seq)
    }

    /// The publish of `seq` has ended, its message queued or not.
    fn published(&self, seq: u64) {
        self.publishing
            .lock()
            .expect("publishing lock")
            .under_way
            .remove(&seq);
        self.published.notify_one();
    }

    /// The first sequence number whose publish may not have ended: every
    /// message queued before it can be delivered.
    fn readable_before(&self) -> u64 {
        let publishing = self.publishing.lock().expect("publishing lock");
        match publishing.under_way.first() {
            Some(&first) => first,
            None => publishing.taken_below,
        }
    }
}

/// Acks or naks one embedded delivery.
#[derive(Debug)]
pub struct Acker {
    inner: Arc<Inner>,
    seq: u64,
    attempt: u32,
}

#[async_trait::async_trait]
impl Settle for Acker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        let removed = self
            .inner
            .store
            .remove(Collection::BusQueue, &self.seq.to_be_bytes())?;
        if removed.is_some() {
            self.inner.queued.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn nak(self: Box<Self>, delay: Duration) -> Result<(), BusError> {
        let due = Instant::now() + delay;
        // A delivery task gone has stopped: the message is delivered again
        // at the next start.
        let _ = self.inner.naks.send((due, self.seq, self.attempt + 1));
        Ok(())
    }

    /// Nothing to report: the embedded bus never redelivers while the
    /// process lives.
    async fn in_progress(&self) -> Result<(), BusError> {
        Ok(())
    }
}

impl EmbeddedBus {
    /// Opens the bus over `store`. Messages left unacked by an earlier process
    /// are delivered first, in order.
    pub fn open(store: Store, prefix: &str) -> Result<Self, BusError> {
        let queued = store.len(Collection::BusQueue) as u64;
        // What an earlier process queued is all readable.
        let taken_below = match store.last(Collection::BusQueue)? {
            Some((k, _)) => seq_of(&k) + 1,
            None => 0,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = Self {
            inner: Arc::new(Inner {
                store,
                prefix: prefix.to_string(),
                publishing: Mutex::new(Publishing {
                    under_way: BTreeSet::new(),
                    taken_below,
                }),
                published: Notify::new(),
                naks: tx,
                receiver: Mutex::new(Some(rx)),
                queued: AtomicU64::new(queued),
            }),
        };
        bus.spawn_dedup_pruner();
        Ok(bus)
    }

    /// How many messages wait in the queue (walks it: not for hot paths).
    pub fn backlog(&self) -> usize {
        self.inner.store.len(Collection::BusQueue)
    }

    fn spawn_dedup_pruner(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DUPLICATE_WINDOW / 4);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let cutoff = now_millis().saturating_sub(DUPLICATE_WINDOW.as_millis() as u64);
                let store = inner.store.clone();
                drop(inner);
                // In batches, on the blocking pool: the table holds every id
                // of the last two minutes, which can be many.
                let pruned = tokio::task::spawn_blocking(move || {
                    store.scan_pages(Collection::BusDedup, 1024, |page| {
                        prune_seen(&store, page, cutoff).map(drop)
                    })
                })
                .await;
                if let Ok(Err(e)) = pruned {
                    tracing::warn!(error = %e, "embedded bus: pruning duplicate ids failed");
                }
            }
        });
    }
}

/// Removes the ids of `page` (as read from the table of ids seen) seen
/// before `cutoff`, each only if it is still as read: one published again
/// meanwhile, its time refreshed, stays for its new window. Returns how
/// many it removed.
fn prune_seen(
    store: &Store,
    page: Vec<switchboard_store::Entry>,
    cutoff: u64,
) -> Result<usize, switchboard_store::StoreError> {
    let mut pruned = 0;
    for (k, v) in page {
        if millis_of(&v) < cutoff
            && store.compare_and_swap(Collection::BusDedup, &k, Some(&v), None)?
        {
            pruned += 1;
        }
    }
    Ok(pruned)
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn millis_of(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// The mark that a queued record carries headers: no subject is this long.
const WITH_HEADERS: u16 = u16::MAX;
/// The mark that a queued record carries the time it was queued (records
/// queued before it was kept have none): no subject is this long either.
const WITH_TIME: u16 = u16::MAX - 1;

/// A queued record, read.
#[derive(Debug, Clone, PartialEq)]
struct Queued {
    subject: String,
    headers: Vec<(String, String)>,
    payload: Bytes,
    /// When it was queued, in ms since the epoch.
    queued_ms: Option<u64>,
}

/// A queued record: [`WITH_TIME`] and the time it was queued (a big-endian
/// u64 of ms), then the subject (its length, a big-endian u16, first), then
/// the payload. With headers (the W3C trace context), [`WITH_HEADERS`] and
/// their count, each name and value length-prefixed like the subject, come
/// before the subject.
fn encode(queued_ms: u64, subject: &str, headers: &[(&str, String)], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + subject.len() + payload.len());
    let put = |v: &mut Vec<u8>, s: &[u8]| {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s);
    };
    v.extend_from_slice(&WITH_TIME.to_be_bytes());
    v.extend_from_slice(&queued_ms.to_be_bytes());
    // (Trace context headers are short: `trace_context` caps them.)
    let headers: Vec<_> = headers
        .iter()
        .filter(|(n, v)| n.len() < usize::from(u16::MAX) && v.len() < usize::from(u16::MAX))
        .collect();
    if !headers.is_empty() {
        v.extend_from_slice(&WITH_HEADERS.to_be_bytes());
        v.extend_from_slice(&(headers.len() as u16).to_be_bytes());
        for (name, value) in headers {
            put(&mut v, name.as_bytes());
            put(&mut v, value.as_bytes());
        }
    }
    put(&mut v, subject.as_bytes());
    v.extend_from_slice(payload);
    v
}

/// Reads a queued record. One that cannot be read is handed on whole under
/// no subject: the executor files it in dead letters as poison rather than
/// lose it.
fn decode(record: &[u8]) -> Queued {
    fn u16_at(v: &[u8]) -> Option<u16> {
        Some(u16::from_be_bytes([*v.first()?, *v.get(1)?]))
    }
    fn take<'a>(v: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = usize::from(u16_at(v)?);
        let s = v.get(2..2 + n)?;
        *v = &v[2 + n..];
        Some(s)
    }
    let read = || {
        let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
        let mut v = record;
        let mut queued_ms = None;
        if u16_at(v)? == WITH_TIME {
            queued_ms = Some(u64::from_be_bytes(v.get(2..10)?.try_into().ok()?));
            v = &v[10..];
        }
        let mut headers = Vec::new();
        if u16_at(v)? == WITH_HEADERS {
            let count = u16_at(v.get(2..)?)?;
            v = &v[4..];
            for _ in 0..count {
                let name = text(take(&mut v)?);
                headers.push((name, text(take(&mut v)?)));
            }
        }
        let subject = text(take(&mut v)?);
        Some(Queued {
            subject,
            headers,
            payload: Bytes::copy_from_slice(v),
            queued_ms,
        })
    };
    read().unwrap_or_else(|| Queued {
        subject: String::new(),
        headers: Vec::new(),
        payload: Bytes::copy_from_slice(record),
        queued_ms: None,
    })
}

#[async_trait::async_trait]
impl Bus for EmbeddedBus {
    async fn publish_as(
        &self,
        event: &VumiApiEvent,
        dedup_id: &str,
    ) -> Result<Published, BusError> {
        let store = &self.inner.store;
        let id = dedup_id;
        let now = now_millis();
        let window = DUPLICATE_WINDOW.as_millis() as u64;
        let under_way = UnderWay::start(&self.inner)?;
        let seq = under_way.seq;
        // The current span's trace context goes with it, as NATS carries it.
        let trace = switchboard_sdk::trace_context::current_headers();
        let record = encode(
            now,
            &event.subject(&self.inner.prefix),
            &trace,
            &event.to_json(),
        );
        // The id is marked seen and the event queued in one transaction, so a
        // crash can never leave an id seen whose event is not on the queue.
        let fresh =
            |seen: Option<&[u8]>| seen.is_none_or(|v| now.saturating_sub(millis_of(v)) >= window);
        let queued = store.write_atomically_if(
            Some(Guard {
                collection: Collection::BusDedup,
                key: id.as_bytes(),
                test: &fresh,
            }),
            &[
                Write {
                    collection: Collection::BusDedup,
                    key: id.as_bytes().to_vec(),
                    value: Some(now.to_be_bytes().to_vec()),
                },
                Write {
                    collection: Collection::BusQueue,
                    key: seq.to_be_bytes().to_vec(),
                    value: Some(record),
                },
            ],
        )?;
        if queued {
            // Counted before the flush, which may be cut short (the caller
            // gone): the message is delivered in this process either way,
            // whether or not the flush held (the caller, told it failed,
            // publishes again and finds a duplicate).
            self.inner.queued.fetch_add(1, Ordering::Relaxed);
        }
        // A duplicate is acknowledged only once the first publish is durable too.
        let flushed = store.flush().await;
        // The message can be delivered from here (`under_way` dropped).
        flushed?;
        Ok(Published { duplicate: !queued })
    }

    async fn consume(
        &self,
        capacity: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<Delivery>, BusError> {
        let mut naks = self
            .inner
            .receiver
            .lock()
            .expect("receiver lock")
            .take()
            .ok_or_else(|| {
                BusError::Unavailable("the embedded bus is already being consumed".into())
            })?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let inner = self.inner.clone();
        tokio::spawn(async move {
            // Where the reading of the queue got to, what was read from it
            // and not yet delivered, and the nakked messages by when they
            // are due: a retry is not held back for the length of a backlog.
            let mut next = 0u64;
            let mut read = Read::new();
            let mut again: BinaryHeap<Reverse<Again>> = BinaryHeap::new();
            loop {
                // What is still in the queue at a stop is delivered again
                // at the next start.
                if *stop.borrow() {
                    return;
                }
                while let Ok(nak) = naks.try_recv() {
                    again.push(Reverse(nak));
                }
                let (seq, attempt, record) = if let Some(&Reverse((due, seq, attempt))) =
                    again.peek()
                    && due <= Instant::now()
                {
                    again.pop();
                    // A message gone has been acked since (a delivery
                    // settled twice): nothing to deliver.
                    match inner.store.get(Collection::BusQueue, &seq.to_be_bytes()) {
                        Ok(Some(record)) => (seq, attempt, record),
                        Ok(None) => continue,
                        Err(e) => {
                            // Tried again in a second, as a failed read of
                            // the queue is: not left for the next start.
                            tracing::error!(seq, error = %e,
                                "embedded bus: reading a queued event for its retry failed; trying again in a second");
                            again.push(Reverse((Instant::now() + READ_RETRY, seq, attempt)));
                            continue;
                        }
                    }
                } else if let Some((seq, record)) = read.pop_front() {
                    (seq, 1, record)
                } else {
                    match read_queue(&inner, next) {
                        Ok((batch, read_up_to)) => {
                            next = read_up_to;
                            if !batch.is_empty() {
                                read = batch;
                                continue;
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "embedded bus: reading the queue failed");
                            tokio::time::sleep(READ_RETRY).await;
                            continue;
                        }
                    }
                    // Nothing to deliver now: wait for a publish, a nak,
                    // the next retry's time or the stop.
                    let due = again.peek().map(|Reverse((due, ..))| *due);
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => return,
                        nak = naks.recv() => match nak {
                            Some(nak) => again.push(Reverse(nak)),
                            None => return,
                        },
                        _ = inner.published.notified() => {}
                        _ = sleep_until(due) => {}
                    }
                    continue;
                };
                if tx
                    .send(delivery(&inner, seq, attempt, &record))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn lag(&self) -> Option<u64> {
        Some(self.inner.queued.load(Ordering::Relaxed))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

/// Up to [`READ_BATCH`] queued messages from `next` on, those whose
/// publishes have all ended (the first under way, and those after it, are
/// left for later); and where the next reading starts: after the last of
/// them, or at the first publish under way when there is none before it
/// (publishes found duplicates take a number and queue nothing).
fn read_queue(inner: &Inner, next: u64) -> Result<(Read, u64), BusError> {
    let before = inner.readable_before();
    if next >= before {
        return Ok((VecDeque::new(), next));
    }
    let batch: VecDeque<_> = inner
        .store
        .scan_from(Collection::BusQueue, &next.to_be_bytes(), READ_BATCH)?
        .into_iter()
        .map(|(k, record)| (seq_of(&k), record))
        .take_while(|(seq, _)| *seq < before)
        .collect();
    let read_up_to = batch.back().map_or(before, |(seq, _)| seq + 1);
    Ok((batch, read_up_to))
}

/// The sequence number a queue key holds.
fn seq_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().expect("queue keys are 8 bytes"))
}

/// A publish under way: its sequence number, counted as under way until
/// this is dropped.
struct UnderWay<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl<'a> UnderWay<'a> {
    fn start(inner: &'a Inner) -> Result<Self, BusError> {
        Ok(Self {
            inner,
            seq: inner.publishing()?,
        })
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.inner.published(self.seq);
    }
}

/// Sleeps until `due`, or for good without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The delivery of the queued `record` at `seq`.
fn delivery(inner: &Arc<Inner>, seq: u64, attempt: u32, record: &[u8]) -> Delivery {
    let queued = decode(record);
    let account = crate::account_of(&inner.prefix, &queued.subject);
    let delivery = Delivery::new(
        queued.subject,
        account,
        queued.payload,
        attempt,
        seq,
        Box::new(Acker {
            inner: inner.clone(),
            seq,
            attempt,
        }),
    )
    .with_headers(queued.headers);
    // What a poison message's dead letter is named by.
    match queued.queued_ms {
        Some(ms) => delivery.published_at(ms),
        None => delivery,
    }
}

#[cfg(test)]
mod tests {
    use super::{Queued, WITH_HEADERS, decode, encode, prune_seen};
    use switchboard_store::{Collection, Store};

    /// The pruner removes ids seen before the cutoff, but not one
    /// published again between its read and its removal: that one keeps
    /// its new time, so a third publish within the window is still a
    /// duplicate.
    #[test]
    fn an_id_published_again_while_it_is_pruned_stays_seen() {
        let store = Store::temporary().unwrap();
        let (old, fresh, cutoff) = (1_000u64, 9_000u64, 5_000u64);
        for id in [b"a", b"b"] {
            store
                .put(Collection::BusDedup, id, &old.to_be_bytes())
                .unwrap();
        }
        store
            .put(Collection::BusDedup, b"c", &fresh.to_be_bytes())
            .unwrap();
        let page = store.scan_from(Collection::BusDedup, b"", 10).unwrap();
        // `a` is published again after the page was read.
        store
            .put(Collection::BusDedup, b"a", &fresh.to_be_bytes())
            .unwrap();
        assert_eq!(prune_seen(&store, page, cutoff).unwrap(), 1);
        let seen = |id: &[u8]| store.get(Collection::BusDedup, id).unwrap();
        assert_eq!(seen(b"a"), Some(fresh.to_be_bytes().to_vec()));
        assert_eq!(seen(b"b"), None);
        assert_eq!(seen(b"c"), Some(fresh.to_be_bytes().to_vec()));
    }

    #[test]
    fn a_queued_record_keeps_its_time_subject_headers_and_payload() {
        let subject = "vumi.events.acme.survey.poll_complete";
        let plain = encode(1_700_000_000_123, subject, &[], b"{}");
        assert_eq!(
            decode(&plain),
            Queued {
                subject: subject.to_string(),
                headers: Vec::new(),
                payload: b"{}".as_slice().into(),
                queued_ms: Some(1_700_000_000_123),
            }
        );
        let headers = [
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
            ),
            ("tracestate", "vendor=1".to_string()),
        ];
        let traced = encode(7, subject, &headers, br#"{"a":1}"#);
        let read = decode(&traced);
        assert_eq!(read.subject, subject);
        assert_eq!(read.queued_ms, Some(7));
        assert_eq!(
            read.headers,
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect::<Vec<_>>()
        );
        assert_eq!(&read.payload[..], br#"{"a":1}"#);
        // A record cut short is handed on whole, under no subject.
        for cut in [1, 3, 10, 13, traced.len() - 40] {
            let read = decode(&traced[..cut]);
            assert_eq!(
                (read.subject.as_str(), read.headers.len()),
                ("", 0),
                "cut at {cut}"
            );
            assert_eq!(&read.payload[..], &traced[..cut]);
        }
    }

    use switchboard_engine::bus::Bus as _;
    use tokio::sync::watch;

    fn event(conversation: &str) -> switchboard_sdk::VumiApiEvent {
        use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};
        switchboard_sdk::VumiApiEvent::new(
            AccountKey::new("acme").unwrap(),
            ConversationKey::new(conversation).unwrap(),
            ConversationType::new("survey").unwrap(),
            EventType::new("signed_up").unwrap(),
            Default::default(),
        )
    }

    /// A process's bus over the store in `dir`, and what stops its
    /// consumer; once the last process's tasks let go of the store.
    async fn process(
        dir: &std::path::Path,
    ) -> (
        super::EmbeddedBus,
        (watch::Sender<bool>, watch::Receiver<bool>),
    ) {
        let mut tries = 0;
        let store = loop {
            match switchboard_store::Store::open(dir) {
                Ok(store) => break store,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("opening the store again: {e}"),
            }
        };
        let bus = super::EmbeddedBus::open(store, "vumi.events").unwrap();
        (bus, watch::channel(false))
    }

    /// A delivery carries the time its message was queued, the same when
    /// a later process delivers it again: what names a poison message's
    /// dead letter, so that its redelivery replaces the letter.
    #[tokio::test]
    async fn a_message_delivered_again_after_a_restart_keeps_its_queued_time() {
        let dir = tempfile::tempdir().unwrap();
        let event = event("c1");
        let before = super::now_millis();
        let (bus, (stop, stopped)) = process(dir.path()).await;
        bus.publish_as(&event, &event.id.to_string()).await.unwrap();
        let mut deliveries = bus.consume(4, stopped).await.unwrap();
        let first = deliveries.recv().await.expect("a delivery");
        let queued = first.published_ms.expect("the time it was queued");
        assert!((before..=super::now_millis()).contains(&queued), "{queued}");
        // Not acked: the next process delivers it again.
        let seq = first.seq;
        drop((first, deliveries, bus, stop));
        let (bus, (_stop, stopped)) = process(dir.path()).await;
        let mut deliveries = bus.consume(4, stopped).await.unwrap();
        let again = deliveries.recv().await.expect("delivered again");
        assert_eq!((again.seq, again.published_ms), (seq, Some(queued)));
    }

    /// While a process works through what an earlier one left queued, a
    /// delivery it nakked comes back when due, not after the whole backlog.
    #[tokio::test]
    async fn a_retry_comes_back_while_the_backlog_of_an_earlier_process_is_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, (stop, _)) = process(dir.path()).await;
        for n in 0..6 {
            let e = event(&format!("c{n}"));
            bus.publish_as(&e, &e.id.to_string()).await.unwrap();
        }
        drop((bus, stop));
        let (bus, (_stop, stopped)) = process(dir.path()).await;
        let mut deliveries = bus.consume(1, stopped).await.unwrap();
        let first = deliveries.recv().await.expect("the backlog's first");
        let retried = first.seq;
        first.nak(std::time::Duration::ZERO).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut order = Vec::new();
        for _ in 0..6 {
            let d = deliveries.recv().await.expect("a delivery");
            order.push((d.seq, d.attempt));
            d.ack().await.unwrap();
        }
        let at = order
            .iter()
            .position(|&(seq, attempt)| (seq, attempt) == (retried, 2))
            .unwrap_or_else(|| panic!("the retry never came: {order:?}"));
        assert!(at < 5, "the retry came after the whole backlog: {order:?}");
    }

    /// Nakked messages wait in the delivery task's own queue, not a task
    /// each, and come back in the order they are due; what is published
    /// meanwhile is delivered as it comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nakked_messages_wait_without_a_task_each_and_come_back_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, (_stop, stopped)) = process(dir.path()).await;
        let mut deliveries = bus.consume(64, stopped).await.unwrap();
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = tasks();
        const N: usize = 2_000;
        for n in 0..N {
            let e = event(&format!("c{n}"));
            bus.publish_as(&e, &e.id.to_string()).await.unwrap();
        }
        // Nakked in turn: the first half for an hour, the second half due
        // in reverse order of delivery, 1 ms apart from a second on.
        let base = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut seqs = Vec::new();
        for n in 0..N {
            let d = deliveries.recv().await.expect("a delivery");
            assert_eq!(d.attempt, 1);
            seqs.push(d.seq);
            let delay = if n < N / 2 {
                std::time::Duration::from_secs(3_600)
            } else {
                let due = base + std::time::Duration::from_millis((N - n) as u64);
                due.saturating_duration_since(tokio::time::Instant::now())
            };
            d.nak(delay).await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < base,
            "the naks took over a second: the retries' due order is not the test's"
        );
        assert!(
            tasks() < before + 16,
            "{} tasks for {N} nakked messages (before: {before})",
            tasks()
        );
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in queue order");
        // Published after the naks: delivered at once, not behind them.
        let late = event("late");
        bus.publish_as(&late, &late.id.to_string()).await.unwrap();
        let mut back = Vec::new();
        let mut late_seen = 0;
        while back.len() < N / 2 || late_seen == 0 {
            let d = tokio::time::timeout(std::time::Duration::from_secs(10), deliveries.recv())
                .await
                .expect("the retries come back")
                .expect("a delivery");
            match d.attempt {
                1 => late_seen += 1,
                2 => back.push(d.seq),
                n => panic!("attempt {n} of seq {}", d.seq),
            }
            // Before the first retry came due (a second on).
            if late_seen == 0 {
                assert!(back.is_empty(), "the new message waited for the retries");
            }
        }
        assert_eq!(late_seen, 1);
        let mut due_order: Vec<u64> = seqs[N / 2..].to_vec();
        due_order.reverse();
        assert_eq!(
            back, due_order,
            "retries come back in the order they are due"
        );
        // The hour-long naks have not come back.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), deliveries.recv())
                .await
                .is_err()
        );
    }

    /// A message whose publish ended is not delivered while an earlier
    /// one's is under way (it would be passed over for good when that one
    /// ends), and both are once it has, in queue order.
    #[tokio::test]
    async fn a_message_waits_for_the_publishes_under_way_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, (_stop, stopped)) = process(dir.path()).await;
        let mut deliveries = bus.consume(4, stopped).await.unwrap();
        let e = event("c0");
        bus.publish_as(&e, &e.id.to_string()).await.unwrap();
        let first = deliveries.recv().await.expect("a delivery");
        assert_eq!(bus.inner.readable_before(), first.seq + 1);
        first.ack().await.unwrap();
        let inner = &bus.inner;
        let (a, b) = (inner.publishing().unwrap(), inner.publishing().unwrap());
        let record = |c: &str| {
            let e = event(c);
            super::encode(0, &e.subject("vumi.events"), &[], &e.to_json())
        };
        let queue = |seq: u64, c: &str| {
            inner
                .store
                .put(Collection::BusQueue, &seq.to_be_bytes(), &record(c))
                .unwrap()
        };
        queue(b, "b");
        inner.published(b);
        let wait = std::time::Duration::from_millis(300);
        assert!(
            tokio::time::timeout(wait, deliveries.recv()).await.is_err(),
            "delivered before the publish before it ended"
        );
        queue(a, "a");
        inner.published(a);
        for seq in [a, b] {
            let d = tokio::time::timeout(wait, deliveries.recv())
                .await
                .expect("delivered once the publishes ended")
                .unwrap();
            assert_eq!((d.seq, d.attempt), (seq, 1));
        }
    }

    /// Publishes that end out of order are each delivered once, in queue
    /// order: the delivery task reads only up to the first still under way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishes_are_each_delivered_once_in_queue_order() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, (_stop, stopped)) = process(dir.path()).await;
        let mut deliveries = bus.consume(8, stopped).await.unwrap();
        const TASKS: usize = 32;
        const EACH: usize = 25;
        let publishers: Vec<_> = (0..TASKS)
            .map(|t| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    for n in 0..EACH {
                        let e = event(&format!("c{t}-{n}"));
                        bus.publish_as(&e, &e.id.to_string()).await.unwrap();
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        while seen.len() < TASKS * EACH {
            let d = tokio::time::timeout(std::time::Duration::from_secs(10), deliveries.recv())
                .await
                .unwrap_or_else(|_| panic!("only {} of {} delivered", seen.len(), TASKS * EACH))
                .expect("a delivery");
            seen.push(d.seq);
            d.ack().await.unwrap();
        }
        for p in publishers {
            p.await.unwrap();
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "delivered out of queue order or twice: {seen:?}"
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), deliveries.recv())
                .await
                .is_err(),
            "a message delivered twice"
        );
        assert_eq!(bus.backlog(), 0);
    }

    /// Records queued before their time was kept read as they did.
    #[test]
    fn a_record_queued_without_its_time_reads_as_before() {
        let subject = "vumi.events.acme.survey.poll_complete";
        let mut old = (subject.len() as u16).to_be_bytes().to_vec();
        old.extend_from_slice(subject.as_bytes());
        old.extend_from_slice(b"{}");
        let read = decode(&old);
        assert_eq!(
            (read.subject.as_str(), &read.payload[..], read.queued_ms),
            (subject, &b"{}"[..], None)
        );
        let mut traced = WITH_HEADERS.to_be_bytes().to_vec();
        traced.extend_from_slice(&1u16.to_be_bytes());
        for s in ["traceparent", "00-x-01", subject] {
            traced.extend_from_slice(&(s.len() as u16).to_be_bytes());
            traced.extend_from_slice(s.as_bytes());
        }
        let read = decode(&traced);
        assert_eq!(read.subject, subject);
        assert_eq!(read.headers, [("traceparent".into(), "00-x-01".into())]);
        assert_eq!(read.queued_ms, None);
    }
}
