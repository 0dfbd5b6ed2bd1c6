//! The appender: a partition owner's writes queued, published to the
//! changelog group-committed, and their acknowledgements awaited (the
//! parent module's doc says how).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use super::pack::{Outgoing, PACK_RECORDS, outgoing};
use super::{
    Change, ChangelogError, EXPECTED_SUBJECT_HEADER, OP_HEADER, Term, epoch_subject,
    is_wrong_sequence, remote,
};

/// Queues writes for publishing and waits for their acknowledgements.
/// Cheap to clone; clones share the task and its order.
#[derive(Debug, Clone)]
pub struct Appender {
    /// The writes appended and not yet taken by the task.
    inbox: Arc<Inbox>,
    /// Commits, to the task: each answered once every write appended
    /// before it is acknowledged.
    commits: mpsc::UnboundedSender<Commit>,
    /// The terms whose writes were refused or failed: none of their later
    /// writes is stored.
    broken: Broken,
    /// The number of the last write appended (writes are numbered from 1).
    numbers: Arc<AtomicU64>,
    /// The numbers of the writes that failed.
    failed: Arc<Mutex<Failed>>,
}

/// The terms whose writes were refused or failed, and why.
type Broken = Arc<Mutex<HashMap<Term, ChangelogError>>>;

/// The numbers of the writes that failed, as ranges, the latest
/// [`FAILED_KEPT`]; of older ones, only the highest number is kept.
#[derive(Debug, Default)]
struct Failed {
    ranges: std::collections::VecDeque<(u64, u64)>,
    forgotten_up_to: u64,
}

/// How many ranges of failed writes are kept to answer
/// [`Appender::failed_since`] exactly; a span older than the ones forgotten
/// is answered as failed.
const FAILED_KEPT: usize = 1024;

impl Failed {
    fn add(&mut self, numbers: &[u64]) {
        let (Some(first), Some(last)) = (numbers.iter().min(), numbers.iter().max()) else {
            return;
        };
        if self.ranges.len() == FAILED_KEPT
            && let Some((_, l)) = self.ranges.pop_front()
        {
            self.forgotten_up_to = self.forgotten_up_to.max(l);
        }
        self.ranges.push_back((*first, *last));
    }

    /// Whether a write numbered in `(since, through]` failed (or may have).
    fn any_in(&self, since: u64, through: u64) -> bool {
        self.forgotten_up_to > since
            || self
                .ranges
                .iter()
                .any(|(first, last)| *first <= through && *last > since)
    }
}

/// A commit waiting for its answer: the number of the last write
/// appended before it, and where the answer goes.
type Commit = (u64, oneshot::Sender<Result<(), ChangelogError>>);

/// The writes appended and not yet taken by the appender's task. Not every
/// write wakes the task (that costs a wake-up of another thread per
/// write): one appended while none waited does, so that its linger begins,
/// and one that makes [`PACK_RECORDS`] wait (of any partitions); between
/// those the task takes them when it wakes anyway, for a commit, a
/// linger's end or a batch answered. So a partition's pack's worth may
/// wait up to [`LINGER`] for its batch.
#[derive(Default)]
struct Inbox {
    writes: Mutex<Vec<Queued>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    /// Queues a write numbered next by `numbers`; returns its number. The
    /// number is taken under the inbox's lock, so a write whose number a
    /// commit read is in the inbox by the time the task looks.
    fn push(&self, numbers: &AtomicU64, term: Term, change: Change, ttl: Option<Duration>) -> u64 {
        let (number, waiting) = {
            let mut writes = self.writes.lock().expect("inbox lock");
            let number = numbers.fetch_add(1, AtomicOrdering::SeqCst) + 1;
            writes.push((number, term, change, ttl));
            (number, writes.len())
        };
        if waiting == 1 || waiting == PACK_RECORDS {
            self.wake.notify_one();
        }
        number
    }

    /// Moves every write appended so far into `into` (empty).
    fn take(&self, into: &mut Vec<Queued>) {
        std::mem::swap(&mut *self.writes.lock().expect("inbox lock"), into);
    }
}

impl Appender {
    /// An appender publishing on `js` as `publishing` says; spawns its task
    /// on the current runtime.
    pub(super) fn spawn(js: jetstream::Context, publishing: Publishing) -> Self {
        let (commits, rx) = mpsc::unbounded_channel();
        let inbox = Arc::<Inbox>::default();
        let broken = Arc::default();
        let failed = Arc::default();
        tokio::spawn(append_task(
            js,
            publishing,
            (Arc::clone(&broken), Arc::clone(&failed)),
            (Arc::clone(&inbox), rx),
        ));
        Self {
            inbox,
            commits,
            broken,
            numbers: Arc::default(),
            failed,
        }
    }

    /// Queues `change` to `term`'s partition; returns its number. It is
    /// durable once a later [`Appender::commit`] returned and neither
    /// [`Appender::is_broken`] holds for `term` nor
    /// [`Appender::failed_since`] for a number before it. Calls must be
    /// serialised (the caller holds a lock): numbers follow their order.
    pub fn append(&self, term: Term, change: Change) -> u64 {
        let ttl = (change.value.is_none() && change.collection.is_housekeeping())
            .then_some(crate::MARKER_TTL);
        self.inbox.push(&self.numbers, term, change, ttl)
    }

    /// The number of the last write appended so far.
    pub fn last_number(&self) -> u64 {
        self.numbers.load(AtomicOrdering::SeqCst)
    }

    /// Whether a write numbered after `since` and up to `through` failed:
    /// exact once a commit asked for after the write at `through` returned
    /// (a failure is recorded before any commit is answered).
    pub fn failed_since(&self, since: u64, through: u64) -> bool {
        self.failed
            .lock()
            .expect("failed lock")
            .any_in(since, through)
    }

    /// Waits until the stream has every write appended before this call:
    /// `Err` if any of them was refused or failed (a fenced term, the server
    /// unreachable), naming the first.
    pub async fn commit(&self) -> Result<(), ChangelogError> {
        let (tx, rx) = oneshot::channel();
        let through = self.numbers.load(AtomicOrdering::SeqCst);
        self.commits
            .send((through, tx))
            .map_err(|_| remote("the changelog's appender has stopped"))?;
        rx.await
            .map_err(|_| remote("the changelog's appender has stopped"))?
    }

    /// Whether a write of `term` was refused or failed for good: then the
    /// changelog may lack writes made under it, whatever a later commit
    /// answered. Known before any commit waiting for the write is answered.
    pub fn is_broken(&self, term: Term) -> bool {
        self.broken.lock().expect("broken lock").contains_key(&term)
    }
}

/// One write waiting for its batch: its number, term, change and the time
/// to live of a removal marker.
pub(super) type Queued = (u64, Term, Change, Option<Duration>);

/// Publishes appended writes, one batch in flight per partition (and the
/// partitions' batches at once), and answers each commit once every write
/// appended before it is stored or has failed.
///
/// A batch that fails because the stream is unavailable is sent again
/// ([`publish_term_batch`]), so a commit waits through a stream electing a
/// new leader instead of failing while the local copy keeps writes the
/// changelog lacks. A term whose batch was fenced, or kept failing, is
/// broken: it is marked so in `broken` before any commit is answered, and
/// its later writes are not sent but fail at once. The failure fails every
/// waiting commit asked for after the failed batch's first write was
/// appended, or, if none is waiting, the next commit. Commits are not told
/// whose writes they cover, so a writer that asks for its commit later
/// checks [`Appender::is_broken`] for the term it wrote under.
async fn append_task(
    js: jetstream::Context,
    publishing: Publishing,
    (broken, failed): (Broken, Arc<Mutex<Failed>>),
    (inbox, mut asked): (Arc<Inbox>, mpsc::UnboundedReceiver<Commit>),
) {
    // What the inbox held, moved out of it under its lock.
    let mut appended = Vec::new();
    let mut queued: BTreeMap<u16, std::collections::VecDeque<Queued>> = BTreeMap::new();
    let mut busy = std::collections::BTreeSet::new();
    let mut flights = FuturesUnordered::new();
    let mut unacked = std::collections::BTreeSet::new();
    let mut commits: BTreeMap<u64, Vec<oneshot::Sender<Result<(), ChangelogError>>>> =
        BTreeMap::new();
    // Waiting commits to be answered with an error, by their key.
    let mut doomed: BTreeMap<u64, ChangelogError> = BTreeMap::new();
    // A failure no waiting commit was told of: the next commit's answer.
    let mut untold: Option<ChangelogError> = None;
    // Names this appender's batches so that one sent again after its
    // answer was lost is known as stored ([`publish_batch`]).
    let writer: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
    let mut open = true;
    // When the oldest write waiting for its batch was taken from the inbox
    // (about when it was appended: a write to an empty inbox wakes the
    // task).
    let mut waiting_since: Option<tokio::time::Instant> = None;
    // A commit received, registered once the writes before it are taken.
    let mut asked_for: Option<Commit> = None;
    loop {
        // The writes appended so far: before the commit just received is
        // registered (they were pushed before it was sent), and before the
        // task ends (no one appends once every appender is gone).
        inbox.take(&mut appended);
        if !appended.is_empty() {
            waiting_since.get_or_insert_with(tokio::time::Instant::now);
        }
        for (number, term, change, ttl) in appended.drain(..) {
            unacked.insert(number);
            queued
                .entry(term.partition)
                .or_default()
                .push_back((number, term, change, ttl));
        }
        if let Some((through, reply)) = asked_for.take() {
            if unacked.first().is_none_or(|oldest| *oldest > through) {
                let _ = reply.send(untold.take().map_or(Ok(()), Err));
            } else {
                if let Some(e) = untold.take() {
                    doomed.insert(through, e);
                }
                commits.entry(through).or_default().push(reply);
            }
        }
        if !(open || !flights.is_empty() || !queued.is_empty()) {
            break;
        }
        // A batch for each partition with writes waiting and none in flight
        // (the writes of one term, in order), once they are wanted: a
        // commit waits, a pack's worth waits, the oldest has waited
        // [`LINGER`], or the appender is closing. Until then writes gather,
        // so that a batch's puts share few messages.
        let lingered = waiting_since.is_some_and(|since| since.elapsed() >= LINGER);
        let wanted = !commits.is_empty() || lingered || !open;
        for (p, waiting) in queued.iter_mut() {
            if busy.contains(p) || waiting.is_empty() || !(wanted || waiting.len() >= PACK_RECORDS)
            {
                continue;
            }
            let term = waiting[0].1;
            let mut batch = Vec::new();
            while batch.len() < BATCH
                && let Some(w) = waiting.front()
                && w.1 == term
            {
                batch.extend(waiting.pop_front());
            }
            busy.insert(*p);
            let js = js.clone();
            let writer = Arc::clone(&writer);
            let refused = broken.lock().expect("broken lock").get(&term).cloned();
            flights.push(async move {
                let numbers: Vec<u64> = batch.iter().map(|w| w.0).collect();
                let published = match refused {
                    Some(e) => Err(e),
                    None => publish_term_batch(&js, publishing, &writer, term, &batch).await,
                };
                (term, numbers, published)
            });
        }
        queued.retain(|_, w| !w.is_empty());
        if queued.is_empty() {
            waiting_since = None;
        } else if wanted {
            // What is left waits for a batch in flight: no sooner than that.
            waiting_since = Some(tokio::time::Instant::now());
        }
        let linger = async {
            match waiting_since {
                Some(since) => tokio::time::sleep_until(since + LINGER).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = linger => {}
            () = inbox.wake.notified(), if open => {}
            commit = asked.recv(), if open => match commit {
                None => open = false,
                Some(reply) => asked_for = Some(reply),
            },
            Some((term, numbers, result)) = flights.next(), if !flights.is_empty() => {
                busy.remove(&term.partition);
                for n in &numbers {
                    unacked.remove(n);
                }
                if let Err(e) = result {
                    broken.lock().expect("broken lock").entry(term).or_insert_with(|| e.clone());
                    failed.lock().expect("failed lock").add(&numbers);
                    let first = numbers.first().copied().unwrap_or(0);
                    let waiting: Vec<u64> = commits.range(first..).map(|(k, _)| *k).collect();
                    if waiting.is_empty() {
                        untold.get_or_insert(e);
                    } else {
                        for k in waiting {
                            doomed.entry(k).or_insert_with(|| e.clone());
                        }
                    }
                }
                // Every commit waiting for nothing older than the oldest
                // unacknowledged write is answered.
                let oldest = unacked.first().copied().unwrap_or(u64::MAX);
                let done: Vec<u64> = commits.range(..oldest).map(|(k, _)| *k).collect();
                for k in done {
                    let answer = doomed.remove(&k).map_or(Ok(()), Err);
                    for reply in commits.remove(&k).unwrap_or_default() {
                        let _ = reply.send(answer.clone());
                    }
                }
            }
        }
    }
}

/// How long an appended write waits for a commit (or a pack's worth of
/// writes of its partition) before it is published anyway: writes that no
/// one commits (yet) reach the other replicas about this soon.
const LINGER: Duration = Duration::from_millis(5);

/// How long a batch is sent again while the stream is unavailable before
/// its term gives up ([`ChangelogError::Gap`]; the last try may add the
/// publish's own timeout). A clustered stream that lost its leader elects
/// another after a random 4–9 s, and a split vote (both nodes left
/// standing at once) starts another round: several rounds fit in a
/// minute, on a machine busy enough to slow the votes too. Giving up
/// sooner would not let the partition be written sooner (that needs a
/// leader either way), only end the term. The events waiting for the
/// commit are reported in progress meanwhile (the dispatcher's settler).
/// What waits as long: a stop (after its grace period), a hand-over, and
/// a forwarded write, whose sender keeps asking the owner for its answer
/// a little longer than this (`FORWARD_DEADLINE` in `partitioned.rs`).
pub(crate) const RETRY_FOR: Duration = Duration::from_secs(60);

/// Publishes `batch` under `term`, sending it again while the stream is
/// unavailable (with a pause growing to a second) until it is stored,
/// fenced, refused, or [`RETRY_FOR`] has passed. Sending a batch again is
/// safe: an atomic batch was stored whole or not at all (and once only,
/// [`publish_batch`]), and writes sent one by one are sent
/// again in their order, so each key ends with the batch's last value for
/// it, and the fence still refuses all of them once another term began.
async fn publish_term_batch(
    js: &jetstream::Context,
    publishing: Publishing,
    writer: &str,
    term: Term,
    batch: &[Queued],
) -> Result<(), ChangelogError> {
    let messages = outgoing(term.partition, writer, batch);
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let result = match publishing {
            Publishing::Atomic => publish_batch(js, writer, term, batch, &messages).await,
            Publishing::EachFenced => publish_each(js, term, batch.len(), &messages).await,
        };
        let e = match result {
            Ok(()) => return Ok(()),
            Err(ChangelogError::Unavailable(e)) => e,
            Err(e @ ChangelogError::Fenced { .. }) => return Err(e),
            // Refused (too large, say): sending it again would not help.
            Err(e) => {
                return Err(ChangelogError::Gap {
                    partition: term.partition,
                    epoch: term.epoch,
                    message: e.to_string(),
                });
            }
        };
        if started.elapsed() >= RETRY_FOR {
            return Err(ChangelogError::Gap {
                partition: term.partition,
                epoch: term.epoch,
                message: format!("{e}, still after {RETRY_FOR:?} of sending it again"),
            });
        }
        tracing::warn!(partition = term.partition, epoch = term.epoch, error = %e,
            "writing to the changelog failed; sending the batch again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// How a partition's queued writes are published.
///
/// Why two ways: an atomic batch is what a clustered stream needs (see
/// [`append_task`]), and on a clustered stream the server stages it in
/// memory. On a stream with one copy the server stages every atomic batch
/// in a file store of its own, made for the batch and deleted after it,
/// while it holds the stream's lock: 100–250 ms a batch on the two-core
/// development machine, whatever its size, with every partition's batch
/// waiting for the others'. A dispatcher started on a backlog acked nothing
/// for a second. With one copy nothing is in flight between the server's
/// check of a header and its store, so every write can carry the epoch
/// check itself: they are published one after another, all in flight at
/// once, in order on the one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Publishing {
    /// One atomic batch, the check on its first write (several copies).
    Atomic,
    /// Every write checked on its own, many in flight (one copy).
    EachFenced,
}

impl Publishing {
    pub(super) fn for_replicas(replicas: usize) -> Self {
        if replicas > 1 {
            Self::Atomic
        } else {
            Self::EachFenced
        }
    }
}

/// The headers of a message: its removal mark and time to live, and with
/// `fence` the check that `term` is still the partition's latest.
fn write_headers(term: Term, message: &Outgoing, fence: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if fence {
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            term.epoch.to_string().as_str(),
        );
        headers.insert(
            EXPECTED_SUBJECT_HEADER,
            epoch_subject(term.partition).as_str(),
        );
    }
    if message.removal {
        headers.insert(OP_HEADER, "del");
    }
    if let Some(ttl) = message.ttl {
        headers.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            ttl.as_secs().to_string().as_str(),
        );
    }
    headers
}

/// Whether a publish was refused because the partition's epoch moved on.
fn fenced(e: &jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    is_wrong_sequence(e)
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<JsError>())
            .is_some_and(|s| s.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE)
}

/// Writes of one partition in flight at once when each is published on its
/// own: the JetStream context lets 5,000 publishes await their acks in all,
/// and sixteen partitions' full batches (8,000) waiting on it, none reading
/// an ack, would wait forever.
const EACH_IN_FLIGHT: usize = 64;

/// Publishes the `writes` of a batch under `term`, carried by `messages`,
/// one message at a time, each fenced by the term's epoch,
/// [`EACH_IN_FLIGHT`] in flight together; waits for every acknowledgement.
/// The server stores them in the order sent: once one is refused as fenced,
/// every later one is too. Any other failure may leave later messages
/// stored after a lost one: the caller sends the whole batch again
/// ([`publish_term_batch`]).
async fn publish_each(
    js: &jetstream::Context,
    term: Term,
    writes: usize,
    messages: &[Outgoing],
) -> Result<(), ChangelogError> {
    let failed = |e: &jetstream::context::PublishError| send_failed(term, writes, e);
    for chunk in messages.chunks(EACH_IN_FLIGHT) {
        let mut acks = Vec::with_capacity(chunk.len());
        for message in chunk {
            let headers = write_headers(term, message, true);
            let ack = js
                .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
                .await
                .map_err(|e| failed(&e))?;
            acks.push(ack.into_future());
        }
        let mut first_error = None;
        for result in futures::future::join_all(acks).await {
            if let Err(e) = result {
                if fenced(&e) {
                    return Err(ChangelogError::Fenced {
                        partition: term.partition,
                        epoch: term.epoch,
                    });
                }
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(failed(&e));
        }
    }
    Ok(())
}

/// Writing `n` records of `term`'s partition failed with `e`.
fn batch_failed(term: Term, n: usize, e: &dyn std::fmt::Display) -> ChangelogError {
    remote(format!(
        "writing {n} records to partition {}: {e}",
        term.partition
    ))
}

/// Writing `n` records of `term`'s partition failed with `e`: worth
/// sending again ([`ChangelogError::Unavailable`]) when the stream was not
/// reached or did not answer, not when it refused the writes.
fn send_failed(term: Term, n: usize, e: &jetstream::context::PublishError) -> ChangelogError {
    use async_nats::jetstream::context::PublishErrorKind as Kind;
    match e.kind() {
        Kind::StreamNotFound | Kind::TimedOut | Kind::BrokenPipe | Kind::MaxAckPending => {
            ChangelogError::Unavailable(format!(
                "writing {n} records to partition {}: {e}",
                term.partition
            ))
        }
        _ => batch_failed(term, n, e),
    }
}

/// Most writes in one atomic batch (nats-server accepts 1,000).
const BATCH: usize = 500;

/// How many times a batch is sent again while the stream cannot check its
/// epoch yet (another replica's batch on the partition in flight).
const NOT_READY_TRIES: u32 = 50;

/// Publishes `batch` under `term` as one atomic batch, fenced by the term's
/// epoch; the stream stores all of it or none.
///
/// The batch's first write carries a message id made of `writer` and its
/// number: a batch sent again after the stream stored it but its answer was
/// lost (the leader lost between the two) is refused by the stream's
/// duplicate window as containing a stored id, storing nothing, and counts
/// as stored, so no batch is stored twice. A batch the stream dropped part
/// of (its first writes sent to a leader that then went away) is sent again
/// whole under a new batch id.
async fn publish_batch(
    js: &jetstream::Context,
    writer: &str,
    term: Term,
    batch: &[Queued],
    messages: &[Outgoing],
) -> Result<(), ChangelogError> {
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    let unavailable = |e: &dyn std::fmt::Display| {
        ChangelogError::Unavailable(format!(
            "writing {} records to partition {}: {e}",
            batch.len(),
            term.partition
        ))
    };
    let last = messages.len() - 1;
    let message_id = format!("{writer}-{}", batch[0].0);
    for _ in 0..NOT_READY_TRIES {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut result = Ok(());
        for (i, message) in messages.iter().enumerate() {
            let mut headers = write_headers(term, message, i == 0);
            headers.insert(async_nats::header::NATS_BATCH_ID, id.as_str());
            headers.insert(
                async_nats::header::NATS_BATCH_SEQUENCE,
                (i + 1).to_string().as_str(),
            );
            if i == 0 {
                headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
            }
            let subject = message.subject.clone();
            let payload = message.payload.clone();
            if i < last {
                js.client()
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| unavailable(&e))?;
                continue;
            }
            headers.insert(async_nats::header::NATS_BATCH_COMMIT, "1");
            let acked = match js.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            result = acked.map(|_| ());
        }
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if fenced(&e) {
            return Err(ChangelogError::Fenced {
                partition: term.partition,
                epoch: term.epoch,
            });
        }
        let code = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<JsError>())
            .map(|s| s.error_code());
        match code {
            // Stored by an earlier send whose answer was lost.
            Some(ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE) => return Ok(()),
            Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
            | Some(ErrorCode::STREAM_EXPECTED_LAST_SEQ_PER_SUBJECT_NOT_READY) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // The batch as sent can never be stored: sending it again
            // would not help.
            Some(
                ErrorCode::ATOMIC_PUBLISH_DISABLED
                | ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER
                | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_ID
                | ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH
                | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_COMMIT,
            ) => return Err(batch_failed(term, batch.len(), &e)),
            // Any other answer from the stream (a batch missing writes sent
            // to a leader that went away, too many batches in flight, the
            // cluster electing a leader) may pass once sent again.
            Some(_) => return Err(unavailable(&e)),
            None => return Err(send_failed(term, batch.len(), &e)),
        }
    }
    Err(unavailable(
        &"the stream kept answering that it cannot check the partition's epoch yet",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer's span fails if a write numbered in it failed, whichever
    /// commit was told; spans before or after the failure do not; a span
    /// older than the failures forgotten is answered as failed.
    #[test]
    fn a_span_fails_exactly_when_a_write_in_it_failed() {
        let mut failed = Failed::default();
        failed.add(&[10, 11, 12]);
        assert!(failed.any_in(9, 10), "the failed batch's first write");
        assert!(failed.any_in(11, 20), "a span over the failed batch's end");
        assert!(!failed.any_in(0, 9), "a span before the failure");
        assert!(!failed.any_in(12, 30), "a span after the failure");
        for n in 0..FAILED_KEPT as u64 {
            failed.add(&[1000 + n]);
        }
        assert!(failed.any_in(5, 6), "forgotten: older spans are failed");
        assert!(!failed.any_in(12, 999), "between failures still kept");
        assert!(failed.any_in(1000 + FAILED_KEPT as u64 - 2, u64::MAX));
    }
}
