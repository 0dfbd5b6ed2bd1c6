//! The consume loop: takes deliveries off the bus and hands each to a
//! worker chosen by (account, conversation). One worker handles its events
//! one at a time, so events of a conversation are handled in order while
//! different conversations run concurrently; a settler acks what the
//! workers handled once it is durable, in gathered batches, and tells a
//! worker of each event it sends back to the bus instead, so that the
//! event's conversation waits for it ([`holds`]).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use switchboard_sdk::{AccountKey, ConversationKey, EventId, VumiApiEvent};
use switchboard_store::Holding;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::bus::{Bus, Delivery};
use crate::event_kinds::{EventKinds, Tally};
use crate::event_threads::Spawner;
use crate::executor::{Disposition, Executor};

mod holds;
mod kept;

use holds::{Conversation, Due, Held, Holds};

/// How often the consume loop hands its count of event kinds over to the
/// store, at most.
const TALLY_EVERY: Duration = Duration::from_secs(1);

/// How many accounts' kinds a hand-over writes a second, about: a tally of
/// more accounts is handed over less often (see [`tally_due`]).
const TALLY_ACCOUNTS_PER_SECOND: usize = 1_000;

/// The longest a tally waits to be handed over.
const TALLY_AT_MOST_EVERY: Duration = Duration::from_secs(15);

/// Whether a tally of `accounts` accounts, gathered for `gathered`, is
/// handed over. A hand-over reads and writes one record per account, so a
/// tally over many accounts (each with few events in a second) waits
/// longer: each account's record is then written once for several of its
/// events, not once for each. Up to [`TALLY_ACCOUNTS_PER_SECOND`]
/// accounts, every [`TALLY_EVERY`]; at 10,000, every 10 s; never longer
/// than [`TALLY_AT_MOST_EVERY`].
fn tally_due(accounts: usize, gathered: Duration) -> bool {
    let wait = TALLY_EVERY
        .saturating_mul(
            u32::try_from(accounts.div_ceil(TALLY_ACCOUNTS_PER_SECOND)).unwrap_or(u32::MAX),
        )
        .clamp(TALLY_EVERY, TALLY_AT_MOST_EVERY);
    accounts > 0 && gathered >= wait
}

/// Consumes `deliveries` with `concurrency` workers until `stopped` turns
/// true, then gives back what was not handled, in bus order. `keepalive`:
/// how often a worker reports a long-running event in progress; `grace`:
/// how long a stop waits for the events being handled. The kinds of event
/// consumed are counted into `kinds`. The settler and the workers run where
/// `spawner` puts them: the settler with the first worker, the workers
/// spread over the event threads.
#[allow(clippy::too_many_arguments)]
pub async fn consume(
    executor: Arc<Executor>,
    bus: Arc<dyn Bus>,
    mut deliveries: mpsc::Receiver<Delivery>,
    concurrency: usize,
    keepalive: Option<Duration>,
    grace: Duration,
    kinds: EventKinds,
    spawner: Spawner,
    mut stopped: watch::Receiver<bool>,
) {
    let (settle, settling) = mpsc::channel(SETTLE_QUEUE);
    // Where the settler tells each worker of a handled event it sent back
    // to the bus (see [`Holds::sent_back`]).
    let (senders, sent_back): (Vec<_>, Vec<_>) = (0..concurrency)
        .map(|_| mpsc::unbounded_channel::<SentBack>())
        .unzip();
    let settler = spawner.spawn(
        0,
        settle_batches(executor.clone(), settling, senders, keepalive),
    );
    // The conversations a graceful stop left held behind a retry, each
    // to the worker its events go to.
    let mut by_worker: Vec<HashMap<_, _>> = (0..concurrency).map(|_| HashMap::new()).collect();
    match kept::take(executor.store()) {
        Ok(held) => {
            if !held.is_empty() {
                tracing::info!(
                    count = held.len(),
                    "conversations held behind a retry at the last stop wait for it again"
                );
            }
            for (conversation, held) in held {
                by_worker[shard_of(&conversation.0, &conversation.1, concurrency)]
                    .insert(conversation, held);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the conversations held at the last stop failed");
        }
    }
    let mut workers = Vec::with_capacity(concurrency);
    let mut queues = Vec::with_capacity(concurrency);
    for (n, (waiting, sent_back)) in by_worker.into_iter().zip(sent_back).enumerate() {
        // Small buffers: a delivery waiting here gets no progress reports, so
        // it must reach its worker well within the bus's ack wait.
        let (tx, rx) = mpsc::channel::<(VumiApiEvent, Delivery)>(2);
        queues.push(tx);
        workers.push(
            spawner.spawn(
                n,
                Worker {
                    executor: executor.clone(),
                    settle: settle.clone(),
                    earlier: None,
                    keepalive,
                    grace,
                    stopped: stopped.clone(),
                    holds: Holds::from_held(waiting),
                    sent_back,
                }
                .run(rx),
            ),
        );
    }
    let mut tally = Tally::default();
    let mut tally_since = tokio::time::Instant::now();
    let mut tally_tick = tokio::time::interval(TALLY_EVERY);
    tally_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let delivery = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => break,
            // Before the deliveries: a backlog must not hold the counts back.
            _ = tally_tick.tick() => {
                if tally_due(tally.accounts(), tally_since.elapsed()) {
                    drop(hand_over(&kinds, std::mem::take(&mut tally)));
                    tally_since = tokio::time::Instant::now();
                }
                continue;
            }
            d = deliveries.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let event = match executor.decode(&delivery).await {
            Ok(event) => event,
            Err((disposition, holding)) => {
                // Poison: acked once its dead letter is durable.
                let handled = Handled {
                    delivery,
                    disposition,
                    holding,
                    event: None,
                };
                if let Err(unsent) = settle.send(handled).await {
                    let _ = unsent.0.delivery.nak(Duration::ZERO).await;
                }
                continue;
            }
        };
        if delivery.attempt == 1 {
            tally.count(&event);
        }
        let shard = shard_of(&event.account_key, &event.conversation_key, concurrency);
        if queues[shard].send((event, delivery)).await.is_err() {
            // A worker's pass cannot take it down (its panic is caught), so
            // only a defect in its own bookkeeping can.
            tracing::error!(
                worker = shard,
                "an event worker is gone (it panicked): this dispatcher stops consuming and \
                 gives back what it holds at its stop; restart it"
            );
            break;
        }
    }
    // The last counts are in the store before the store's last flush.
    let _ = hand_over(&kinds, tally).await;
    // The bus stops pulling and hands over what it already took; workers
    // finish what they are handling, within the grace period, and what they
    // handled is settled. Everything not handled then goes back to the bus in
    // bus order, so that a conversation's events come back in the order they
    // were published.
    let mut released = Vec::new();
    while let Some(delivery) = deliveries.recv().await {
        released.push(delivery);
    }
    drop(queues);
    let mut holds = Vec::with_capacity(concurrency);
    for w in workers {
        if let Ok((unhandled, worker_holds, sent_back)) = w.await {
            released.extend(unhandled);
            holds.push((worker_holds, sent_back));
        }
    }
    drop(settle);
    let _ = settler.await;
    // What the settler sent back after its worker stopped is held too.
    let mut held = HashMap::new();
    for (mut worker_holds, mut sent_back) in holds {
        while let Ok((conversation, seq, id, due)) = sent_back.try_recv() {
            worker_holds.sent_back(conversation, (seq, id), due);
        }
        held.extend(worker_holds.into_held());
    }
    released.sort_by_key(|d| d.seq);
    // The conversations held behind a retry wait for it at the next start
    // too: their later events, given back now or published meanwhile, do
    // not overtake it.
    let kept_holds = kept::keep(executor.store(), held.iter()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "keeping the conversations held behind a retry failed; after the restart their later events may overtake it");
        0
    });
    if !released.is_empty() || kept_holds > 0 {
        // What the passes cut off wrote as they went (an outside step's
        // entry) is durable before their events go to another replica.
        if let Err(e) = executor.make_durable().await {
            tracing::warn!(error = %e, "flushing the store before giving events back failed");
        }
        bus.quiesce().await;
        tracing::info!(
            count = released.len(),
            "giving unhandled events back to the bus"
        );
    }
    for delivery in released {
        if let Err(e) = delivery.nak(Duration::ZERO).await {
            tracing::warn!(error = %e, "giving a delivery back failed; the bus delivers it again after its ack wait");
        }
    }
    // Acks and naks are fire-and-forget: they leave before the hand-over.
    if let Err(e) = bus.flush().await {
        tracing::warn!(error = %e, "the last acks may be lost; those events will be delivered again");
    }
    bus.hand_over().await;
}

/// The worker the events of `conversation` of `account` go to.
fn shard_of(account: &AccountKey, conversation: &ConversationKey, concurrency: usize) -> usize {
    let mut h = DefaultHasher::new();
    account.hash(&mut h);
    conversation.hash(&mut h);
    (h.finish() % concurrency as u64) as usize
}

/// Adds `tally` to the store's counts off the consume loop (the handle
/// says when it is done).
fn hand_over(kinds: &EventKinds, tally: Tally) -> tokio::task::JoinHandle<()> {
    let kinds = kinds.clone();
    tokio::task::spawn_blocking(move || {
        if tally.is_empty() {
            return;
        }
        if let Err(e) = kinds.add(tally) {
            tracing::warn!(error = %e, "counting the kinds of event consumed failed; the console's list of them lags");
        }
    })
}

/// A handled delivery, what to do with it, the state it was handled on
/// (see [`Executor::holding`]), and its event's conversation and id (none
/// for poison).
struct Handled {
    delivery: Delivery,
    disposition: Disposition,
    holding: Holding,
    event: Option<(Conversation, EventId)>,
}

/// A handled event sent back to the bus (for a retry, or because its
/// settling failed): its conversation, bus position, id, and when it is
/// due back.
type SentBack = (Conversation, u64, EventId, tokio::time::Instant);

/// How long a handled event whose settling failed waits to be handled again.
const SETTLE_FAILED_DELAY: Duration = Duration::from_secs(1);

/// Handled deliveries waiting to be settled. Workers wait only when this
/// many are waiting; the bus's own limit on unacked messages
/// (`max_ack_pending` on NATS) usually bounds them first.
const SETTLE_QUEUE: usize = 4_096;

/// How long the settler gathers handled deliveries before one flush covers
/// them all. Each flush seals a store buffer, writes it and syncs it, and
/// wakes several threads to do so: flushing as soon as anything waited made
/// about one flush per five events on a fast drain, and those flushes cost
/// more CPU than the events. Gathering for 2 ms makes them a few hundred a
/// second whatever the rate; only the acks wait, not the steps.
const SETTLE_GATHER: Duration = Duration::from_millis(2);

/// Settles handled deliveries: acks each once what was recorded about it is
/// durable (or naks it for a retry once the attempt count is). Everything
/// gathered within [`SETTLE_GATHER`] of the first shares one flush, so a
/// worker goes on to its next event without waiting for the disk, and the
/// disk sees one flush per batch, not per event. A flush that takes longer
/// than `keepalive` (a changelog whose stream is electing a leader) reports
/// the deliveries waiting for it in progress every `keepalive`, and those
/// handled meanwhile (they wait for the next flush), so that the bus does
/// not deliver them again while they wait. A handled event sent back to
/// the bus, for a retry or because its settling failed, is told to its
/// worker (of `workers`, by conversation) first, with when it is due back:
/// the worker holds its conversation's later events behind it.
async fn settle_batches(
    executor: Arc<Executor>,
    mut queue: mpsc::Receiver<Handled>,
    workers: Vec<mpsc::UnboundedSender<SentBack>>,
    keepalive: Option<Duration>,
) {
    let mut batch = Vec::with_capacity(SETTLE_QUEUE);
    // What was handled while a slow flush lasted: the next batch's start.
    let mut later = Vec::new();
    loop {
        if later.is_empty() {
            if queue.recv_many(&mut batch, SETTLE_QUEUE).await == 0 {
                break;
            }
        } else {
            batch.append(&mut later);
        }
        let gathered = tokio::time::sleep(SETTLE_GATHER);
        tokio::pin!(gathered);
        while batch.len() < SETTLE_QUEUE {
            let room = SETTLE_QUEUE - batch.len();
            tokio::select! {
                biased;
                _ = &mut gathered => break,
                n = queue.recv_many(&mut batch, room) => {
                    if n == 0 {
                        break;
                    }
                }
            }
        }
        let durable = in_progress_until(
            executor.make_durable(),
            &batch,
            (&mut queue, &mut later),
            keepalive,
        )
        .await;
        if let Err(e) = &durable {
            tracing::error!(error = %e, count = batch.len(),
                "flushing the store failed; these events will be handled again");
        }
        for handled in batch.drain(..) {
            let Handled {
                delivery,
                disposition,
                holding,
                event,
            } = handled;
            let failed = match (disposition, &durable) {
                (Disposition::Ack, Ok(())) if executor.still_holds(&holding) => false,
                (Disposition::Ack, Ok(())) => {
                    tracing::warn!(subject = %delivery.subject,
                        "the state this event was handled on is gone (its partition's changelog \
                         refused or lost writes); it will be handled again");
                    true
                }
                (Disposition::Ack, Err(_)) => true,
                // A retry's attempt count is durable only once this flush
                // is: a crash before it (or a failed flush) gives the step
                // one more attempt than it should get.
                (Disposition::Retry(_), _) => false,
            };
            // The worker hears of it before the event can come back.
            let delay = match disposition {
                Disposition::Ack if failed => Some(SETTLE_FAILED_DELAY),
                Disposition::Ack => None,
                Disposition::Retry(delay) => Some(delay),
            };
            if let (Some(delay), Some((conversation, id))) = (delay, event) {
                let due = tokio::time::Instant::now() + delay;
                let worker = shard_of(&conversation.0, &conversation.1, workers.len());
                // A worker gone has stopped handling.
                let _ = workers[worker].send((conversation, delivery.seq, id, due));
            }
            let result = match delay {
                None => delivery.ack().await,
                Some(delay) => delivery.nak(delay).await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "settling a delivery failed; the bus delivers it again");
            }
        }
    }
}

/// Awaits `durable` (the flush that makes what `batch` recorded durable).
/// Meanwhile, every `keepalive`, it takes what was handled since off
/// `queue` into `later` (a later flush covers those) and reports each
/// delivery of `batch` and `later` in progress.
async fn in_progress_until<T>(
    durable: impl std::future::Future<Output = T>,
    batch: &[Handled],
    (queue, later): (&mut mpsc::Receiver<Handled>, &mut Vec<Handled>),
    keepalive: Option<Duration>,
) -> T {
    let Some(every) = keepalive else {
        return durable.await;
    };
    tokio::pin!(durable);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = &mut durable => return result,
            _ = tick.tick() => {
                while let Ok(handled) = queue.try_recv() {
                    later.push(handled);
                }
                tracing::info!(waiting = batch.len() + later.len(),
                    "the store's flush is slow; reporting the events waiting for it in progress");
                for Handled { delivery, .. } in batch.iter().chain(later.iter()) {
                    if let Err(e) = delivery.in_progress().await {
                        tracing::warn!(error = %e, "reporting progress failed");
                    }
                }
            }
        }
    }
}

/// One worker: handles the events of the conversations hashed to it, one at
/// a time, in bus order, also across retries.
struct Worker {
    executor: Arc<Executor>,
    /// Where handled deliveries go to be acked or nakked.
    settle: mpsc::Sender<Handled>,
    /// This worker's last outside effect whose record may not be durable
    /// yet (see [`Executor::handle`]).
    earlier: Option<switchboard_store::WriteMark>,
    keepalive: Option<Duration>,
    grace: Duration,
    stopped: watch::Receiver<bool>,
    /// Its conversations held behind one of their events.
    holds: Holds,
    /// Its handled events the settler sent back to the bus.
    sent_back: mpsc::UnboundedReceiver<SentBack>,
}

impl Worker {
    /// Handles what arrives until the queue closes; returns the deliveries
    /// left unhandled by a shutdown, to be given back to the bus, the
    /// conversations still held, and where the settler goes on telling of
    /// the events it sends back (to be added to those once it is done).
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<(VumiApiEvent, Delivery)>,
    ) -> (Vec<Delivery>, Holds, mpsc::UnboundedReceiver<SentBack>) {
        let mut unhandled = Vec::new();
        while let Some((event, delivery)) = queue.recv().await {
            // What the settler sent back is held before the next event.
            while let Ok((conversation, seq, id, due)) = self.sent_back.try_recv() {
                self.holds.sent_back(conversation, (seq, id), due);
            }
            if *self.stopped.borrow() {
                unhandled.push(delivery);
                continue;
            }
            let conversation = (event.account_key.clone(), event.conversation_key.clone());
            let now = tokio::time::Instant::now();
            let executor = &self.executor;
            let hold = self
                .holds
                .hold(&conversation, (delivery.seq, event.id), now, |head| {
                    executor.has_finished(&conversation.0, head)
                });
            if let Some(wait) = hold {
                if let Err(e) = delivery.nak(wait).await {
                    tracing::warn!(event_id = %event.id, error = %e, "holding back a delivery failed");
                }
                continue;
            }
            let holding = self.executor.holding(Some(event.account_key.as_str()));
            let Some(disposition) = self.handle(&event, &holding, &delivery).await else {
                // The grace period ran out mid-handling: give it back.
                unhandled.push(delivery);
                continue;
            };
            match disposition {
                // Due back once the settler sends it back.
                Disposition::Retry(_) => {
                    let key = (delivery.seq, event.id);
                    self.holds.retry(conversation.clone(), key);
                }
                Disposition::Ack => {
                    let now = tokio::time::Instant::now();
                    self.holds.done(&conversation, delivery.seq, now);
                }
            }
            let handled = Handled {
                delivery,
                disposition,
                holding,
                event: Some((conversation, event.id)),
            };
            if let Err(unsent) = self.settle.send(handled).await {
                // The settler is gone (it panicked): give the delivery back
                // at the stop. A retry's conversation stays held until then
                // (nothing is acked meanwhile), and is kept due at once.
                unhandled.push(unsent.0.delivery);
            }
        }
        (unhandled, self.holds, self.sent_back)
    }

    /// Handles one event, reporting progress to the bus meanwhile. `None` when
    /// a shutdown's grace period ran out first.
    async fn handle(
        &mut self,
        event: &VumiApiEvent,
        holding: &Holding,
        delivery: &Delivery,
    ) -> Option<Disposition> {
        // Every log line of the event's handling carries its account and id.
        let span = tracing::info_span!("event", account = %event.account_key, event_id = %event.id);
        let handling = self
            .executor
            .handle(event, delivery, holding, &mut self.earlier)
            .instrument(span);
        tokio::pin!(handling);
        // Most events are handled without waiting on anything (an
        // effect-free chain): those need neither timer below, and setting
        // one up and tearing it down is a lock on the timer wheel each way.
        if let Poll::Ready(d) =
            std::future::poll_fn(|cx| Poll::Ready(handling.as_mut().poll(cx))).await
        {
            return Some(d);
        }
        // Tell the bus the event is still being worked on (a slow step), so
        // it is not delivered to someone else meanwhile.
        let every = self.keepalive.unwrap_or(Duration::from_secs(3600));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let grace = self.grace;
        let mut stopped = self.stopped.clone();
        let deadline = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                d = &mut handling => return Some(d),
                _ = tick.tick(), if self.keepalive.is_some() => {
                    if let Err(e) = delivery.in_progress().await {
                        tracing::warn!(event_id = %event.id, error = %e, "reporting progress failed");
                    }
                }
                _ = &mut deadline => {
                    tracing::warn!(event_id = %event.id, "shutdown grace period over: releasing the event being handled");
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts the progress reports of a delivery.
    #[derive(Debug)]
    struct Reports(Arc<AtomicU32>);

    #[async_trait::async_trait]
    impl crate::bus::Settle for Reports {
        async fn ack(self: Box<Self>) -> Result<(), crate::bus::BusError> {
            Ok(())
        }
        async fn nak(self: Box<Self>, _: Duration) -> Result<(), crate::bus::BusError> {
            Ok(())
        }
        async fn in_progress(&self) -> Result<(), crate::bus::BusError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A flush slower than the keepalive (a changelog electing a leader)
    /// has every delivery waiting for it reported in progress once per
    /// keepalive, and those handled while it lasts too, from the first
    /// report after they came (they wait for the next flush, and are
    /// handed back for it); a quick flush, or a bus without an ack wait,
    /// reports none.
    #[tokio::test(start_paused = true)]
    async fn deliveries_waiting_for_a_slow_flush_are_reported_in_progress() {
        let ms = Duration::from_millis;
        let handled = |count: &Arc<AtomicU32>| -> Handled {
            let settle = Box::new(Reports(Arc::clone(count)));
            let delivery = Delivery::new("e".into(), None, Default::default(), 1, 1, settle);
            Handled {
                delivery,
                disposition: Disposition::Ack,
                holding: Holding::default(),
                event: None,
            }
        };
        // (flush, keepalive, reports of the batch's, of those handled after
        // 1.5 s, of those handled after 20 s)
        for (flush, keepalive, reports, reports_later, reports_last) in [
            (ms(2_500), Some(ms(1_000)), 2, 1, 0),
            (ms(10_500), Some(ms(1_000)), 10, 9, 0),
            (ms(500), Some(ms(1_000)), 0, 0, 0),
            (ms(10_500), None, 0, 0, 0),
        ] {
            let counts: Vec<Arc<AtomicU32>> = (0..3).map(|_| Arc::default()).collect();
            let batch: Vec<Handled> = counts.iter().map(handled).collect();
            let (tx, mut queue) = mpsc::channel(8);
            let (soon, last) = (Arc::<AtomicU32>::default(), Arc::<AtomicU32>::default());
            let sent = {
                let (soon, last) = (handled(&soon), handled(&last));
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ms(1_500)).await;
                    let _ = tx.send(soon).await;
                    tokio::time::sleep(ms(18_500)).await;
                    let _ = tx.send(last).await;
                })
            };
            let mut later = Vec::new();
            let answer = in_progress_until(
                async {
                    tokio::time::sleep(flush).await;
                    7
                },
                &batch,
                (&mut queue, &mut later),
                keepalive,
            )
            .await;
            assert_eq!(answer, 7, "the flush's own answer");
            let case = format!("a flush of {flush:?}, keepalive {keepalive:?}");
            for c in &counts {
                assert_eq!(c.load(Ordering::SeqCst), reports, "{case}");
            }
            assert_eq!(
                soon.load(Ordering::SeqCst),
                reports_later,
                "{case}: handled later"
            );
            // Taken off the queue only when a report was due.
            assert_eq!(later.len(), usize::from(reports_later > 0), "{case}");
            sent.await.unwrap();
            assert_eq!(last.load(Ordering::SeqCst), reports_last, "{case}");
        }
    }

    #[test]
    fn a_tally_over_more_accounts_is_handed_over_less_often() {
        let s = Duration::from_secs;
        for (accounts, gathered, due) in [
            (0, s(60), false),
            (1, s(1), true),
            (1_000, s(1), true),
            (1_001, s(1), false),
            (1_001, s(2), true),
            (2_000, s(2), true),
            (2_001, s(2), false),
            (10_000, s(9), false),
            (10_000, s(10), true),
            (1_000_000, s(14), false),
            (1_000_000, s(15), true),
        ] {
            assert_eq!(
                tally_due(accounts, gathered),
                due,
                "{accounts} accounts, gathered for {gathered:?}"
            );
        }
    }
}
