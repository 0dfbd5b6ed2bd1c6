//! Pulling from NATS consumers into the executor's channel: the single
//! consumer of a dispatcher that does not share the bus, and a partition's
//! pinned consumer, with the fence that keeps its order when it changes
//! hands. The requests themselves are [`crate::puller`]'s.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use switchboard_engine::bus::{BusError, Delivery, Settle};

use crate::after_replicas::{self, Handled};
use crate::marks::{self, Marks};
use crate::partitions::strip_partition;
use crate::puller::{PullError, PullSettings, Puller};

/// How long one pull request lasts. Short, because a stopping dispatcher's
/// last request outlives it on the server: a message given back (nakked)
/// while it lasts is offered to it, found undeliverable and put at the back
/// of the redelivery queue — out of order. So the nakking waits until it has
/// expired ([`Bus::quiesce`](switchboard_engine::bus::Bus::quiesce)).
pub(super) const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// The priority group replicas pull the partition consumers in.
pub const GROUP: &str = "switchboard";

/// How often a fence checks whether it can open.
const FENCE_CHECK: Duration = Duration::from_millis(250);

/// How often a partition pulled here with nothing delivered yet checks
/// whether its state can be taken (nothing unacked anywhere).
const IDLE_TERM_CHECK: Duration = Duration::from_millis(500);

/// How long a pull waits before it takes an idle partition's state: long
/// enough for every replica to learn the membership that gave it the
/// partition (a heartbeat and then some), so that the replica that had it
/// has stopped pulling it and cannot be handling its events unpinned for a
/// moment. Until then the state is taken only with a delivery, which
/// comes with the pin.
const IDLE_TERM_AFTER: Duration = Duration::from_secs(5);

/// Whether no replica holds the partition's pin and nothing of it is
/// unacked anywhere: nobody is at work on it, and its state can be taken
/// (so that writes forwarded to it have an owner) without fencing anyone.
async fn nothing_unacked(partition: &mut Partition) -> bool {
    match partition.consumer.info().await {
        Ok(info) => {
            info.num_ack_pending == 0
                && info
                    .priority_groups
                    .iter()
                    .filter(|g| g.group == GROUP)
                    .all(|g| g.pinned_client_id.is_none())
        }
        Err(e) => {
            tracing::debug!(partition = partition.number, error = %e, "reading the partition's consumer failed");
            false
        }
    }
}

/// Makes sure this replica holds a term on the partition's state before it
/// hands a delivery on: one taken earlier may have ended (another replica
/// took the idle partition meanwhile). Tries until it does or `stop`.
///
/// A delivery's account may belong to another partition: events stored
/// before the stream was partitioned all come through partition 0 (and the
/// other partitions wait for them), so the account's partition is taken too.
async fn hold_term(
    state: &switchboard_store::Store,
    own: u16,
    delivery: &Delivery,
    stop: &mut watch::Receiver<bool>,
) {
    let of_account = delivery
        .account
        .as_deref()
        .map(|a| {
            switchboard_store::partition_of_account(a.as_bytes(), crate::partitions::PARTITIONS)
        })
        .filter(|p| *p != own);
    for p in std::iter::once(own).chain(of_account) {
        while !state.holds_partition(p) {
            if take(state, p).await {
                break;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// Begins this replica's term on the partition's state; whether it did.
async fn take_term(partition: &Partition) -> bool {
    take(&partition.state, partition.number).await
}

async fn take(state: &switchboard_store::Store, partition: u16) -> bool {
    match state.take_partition(partition).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(partition, error = %e, "taking the partition's state failed; trying again");
            false
        }
    }
}

/// How long a partition waits for the events stored before the stream was
/// partitioned to be handled.
const UNPARTITIONED_PATIENCE: Duration = Duration::from_secs(600);

type Messages = Puller;

/// How a consumer with `batch` messages per request is pulled: requests
/// that last [`PULL_EXPIRES`], with heartbeats twice as often.
pub(super) fn pull_settings(batch: usize, pinned_group: Option<&str>) -> PullSettings {
    PullSettings {
        batch,
        expires: PULL_EXPIRES,
        heartbeat: PULL_EXPIRES / 2,
        pinned_group: pinned_group.map(str::to_string),
    }
}

/// One delivery of a partition not settled yet: counted while it lives.
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Settles a NATS delivery: acks and naks are publishes to its reply
/// subject.
#[derive(Debug)]
struct NatsSettle {
    message: Box<jetstream::Message>,
    /// Counts the delivery among its partition's until it is settled.
    _in_flight: Option<InFlight>,
}

impl NatsSettle {
    fn failed(&self, what: &str, e: impl std::fmt::Display) -> BusError {
        BusError::Unavailable(format!("{what} {}: {e}", self.message.subject))
    }
}

#[async_trait::async_trait]
impl Settle for NatsSettle {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        self.message
            .ack()
            .await
            .map_err(|e| self.failed("acking", e))
    }

    /// A plain nak puts the message on the consumer's redelivery queue at
    /// once, in nak order; one with a delay is redelivered when a server
    /// timer finds it due, in no particular order among those due together.
    async fn nak(self: Box<Self>, delay: Duration) -> Result<(), BusError> {
        self.message
            .ack_with(jetstream::AckKind::Nak((!delay.is_zero()).then_some(delay)))
            .await
            .map_err(|e| self.failed("nakking", e))
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        self.message
            .ack_with(jetstream::AckKind::Progress)
            .await
            .map_err(|e| self.failed("extending", e))
    }
}

/// A pulled message as a delivery, with the pin it came under and which
/// delivery of its consumer it is (for the fence); `None` for an error of
/// the pull itself.
fn delivery_of(
    next: Result<jetstream::Message, PullError>,
    prefix: &str,
    in_flight: Option<&Arc<AtomicUsize>>,
) -> Option<(Delivery, Option<String>, u64)> {
    let message = match next {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "NATS pull consumer");
            return None;
        }
    };
    let (attempt, seq, delivery_seq, published_ms) = message
        .info()
        .map(|i| {
            (
                i.delivered.max(1) as u32,
                i.stream_sequence,
                i.consumer_sequence,
                Some((i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64),
            )
        })
        .unwrap_or((1, 0, 0, None));
    let pin = message
        .headers
        .as_ref()
        .and_then(|h| h.get_last("Nats-Pin-Id"))
        .map(|v| v.as_str().to_string());
    // A binary-mode CloudEvent's attributes (and its data's type), and the
    // trace context.
    let headers: Vec<(String, String)> = message
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .filter(|(name, _)| {
                    let name: &str = name.as_ref();
                    name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-"))
                        || name.eq_ignore_ascii_case("content-type")
                        || name.eq_ignore_ascii_case(switchboard_sdk::trace_context::TRACEPARENT)
                        || name.eq_ignore_ascii_case(switchboard_sdk::trace_context::TRACESTATE)
                })
                .filter_map(|(name, values)| {
                    Some((name.to_string(), values.first()?.as_str().to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    let subject = strip_partition(prefix, &message.subject).to_string();
    let account = crate::account_of(prefix, &subject);
    let delivery = Delivery::new(
        subject,
        account,
        message.payload.clone(),
        attempt,
        seq,
        Box::new(NatsSettle {
            message: Box::new(message),
            _in_flight: in_flight.map(InFlight::new),
        }),
    )
    .with_headers(headers);
    let delivery = match published_ms {
        Some(ms) => delivery.published_at(ms),
        None => delivery,
    };
    Some((delivery, pin, delivery_seq))
}

/// Where pulled messages go.
#[derive(Clone)]
pub(super) struct Sink {
    pub tx: mpsc::Sender<Delivery>,
    pub prefix: String,
    /// How many messages per pull request.
    pub batch: usize,
}

/// Sends deliveries to the sink in the order given; one the sink no longer
/// takes (the dispatcher is gone) goes straight back to the bus.
pub(super) async fn send_all(sink: &Sink, deliveries: impl IntoIterator<Item = Delivery>) {
    for delivery in deliveries {
        if let Err(unsent) = sink.tx.send(delivery).await {
            let _ = unsent.0.nak(Duration::ZERO).await;
        }
    }
}

/// Pulls the single consumer (`config` on `stream`) into the sink until
/// `stop` turns true, starting the pull again when it ends early (a deleted
/// consumer, a stream made again): a dispatcher that stopped consuming
/// while it went on answering would hold every event back unseen. What
/// `handled` covers (the replicas handled it before) is acked and passed
/// over; a consumer made anew starts where [`marks::single_start`] says at
/// that time.
pub(super) async fn pull_single(
    (js, stream, config, marks): (
        jetstream::Context,
        jetstream::stream::Stream,
        pull::Config,
        Option<Marks>,
    ),
    mut messages: Messages,
    sink: Sink,
    mut stop: watch::Receiver<bool>,
    mut handled: Option<Handled>,
) {
    while pull_single_once(messages, &sink, &mut stop, handled.as_ref()).await {
        tracing::warn!("the pull of the events ended; starting it again");
        messages = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(PULL_EXPIRES + Duration::from_millis(200)) => {}
            }
            if sink.tx.is_closed() {
                return;
            }
            // The pull may have ended because its consumer was deleted, or
            // its stream made again: made anew, it starts as it would now.
            let started = async {
                let start = marks::single_start(&stream, marks.as_ref())
                    .await
                    .map_err(|e| e.to_string())?;
                let config = after_replicas::starting(config.clone(), &start);
                handled = start.handled;
                let consumer = stream
                    .get_or_create_consumer(crate::nats::CONSUMER, config)
                    .await
                    .map_err(|e| format!("creating consumer {}: {e}", crate::nats::CONSUMER))?;
                let info = consumer.cached_info();
                Puller::start(
                    &js,
                    &info.stream_name,
                    &info.name,
                    pull_settings(sink.batch, None),
                )
                .await
                .map_err(|e| e.to_string())
            }
            .await;
            match started {
                Ok(messages) => break messages,
                Err(e) => {
                    tracing::warn!(error = %e, "pulling the events again failed; trying again")
                }
            }
        };
    }
}

/// Acks `next` if `handled` covers it (the replicas handled it: the single
/// pull reads its raw subject, with the partition in it); whether it did.
async fn passed_over(
    handled: Option<&Handled>,
    prefix: &str,
    next: &Result<jetstream::Message, PullError>,
) -> bool {
    let (Some(handled), Ok(message)) = (handled, next) else {
        return false;
    };
    let Ok(info) = message.info() else {
        return false;
    };
    if !handled.covers(prefix, &message.subject, info.stream_sequence) {
        return false;
    }
    if let Err(e) = message.ack().await {
        // Delivered again after the ack wait, and passed over again.
        tracing::warn!(error = %e, "acking an event the replicas handled failed");
    }
    true
}

/// Pulls until `stop` turns true, then hands over what the client already
/// pulled, so that it goes back to the bus now and in order, instead of
/// waiting out the ack wait; whether the pull ended of itself first (and
/// may be started again).
async fn pull_single_once(
    mut messages: Messages,
    sink: &Sink,
    stop: &mut watch::Receiver<bool>,
    handled: Option<&Handled>,
) -> bool {
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = messages.next() => next,
        };
        let Some(next) = next else {
            return !sink.tx.is_closed();
        };
        if passed_over(handled, &sink.prefix, &next).await {
            continue;
        }
        if let Some((delivery, _, _)) = delivery_of(next, &sink.prefix, None)
            && let Err(unsent) = sink.tx.send(delivery).await
        {
            let _ = unsent.0.nak(Duration::ZERO).await;
            return false;
        }
    }
    let drained = drain(&mut messages, sink, None, handled).await;
    send_all(sink, drained.into_iter().map(|(d, _, _)| d)).await;
    false
}

/// What a stopped pull has taken but not handed on: what its live requests
/// still bring (it asks for no more). Bounded: at most a batch and a half.
async fn drain(
    messages: &mut Messages,
    sink: &Sink,
    in_flight: Option<&Arc<AtomicUsize>>,
    handled: Option<&Handled>,
) -> Vec<(Delivery, Option<String>, u64)> {
    messages.stop_asking();
    let mut drained = Vec::new();
    for _ in 0..2 * sink.batch {
        match tokio::time::timeout(Duration::from_millis(100), messages.next()).await {
            Ok(Some(next)) if passed_over(handled, &sink.prefix, &next).await => {}
            Ok(Some(next)) => drained.extend(delivery_of(next, &sink.prefix, in_flight)),
            Ok(None) | Err(_) => break,
        }
    }
    drained
}

/// One partition of the events stream, as this replica pulls it.
pub(super) struct Partition {
    pub number: u16,
    /// The bus's context, which pulled messages ack through.
    pub js: jetstream::Context,
    pub stream: jetstream::stream::Stream,
    pub consumer: jetstream::consumer::Consumer<pull::Config>,
    /// The consumer's config, to create it again if it was deleted.
    pub config: pull::Config,
    /// Set before the pull is stopped because another replica takes the
    /// partition over (rather than because this one shuts down).
    pub releasing: Arc<std::sync::atomic::AtomicBool>,
    /// This replica's deliveries of the partition not settled yet.
    pub in_flight: Arc<AtomicUsize>,
    /// How long a fence waits at most: the pin timeout.
    pub patience: Duration,
    /// How often held deliveries are reported in progress.
    pub keepalive: Duration,
    /// The events stored before the stream was partitioned, which partition
    /// 0 has: the other partitions wait for them once.
    pub unpartitioned: Option<Unpartitioned>,
    /// The store whose partition-owned state this replica writes while it
    /// holds the partition.
    pub state: switchboard_store::Store,
    /// The last stream sequence the single dispatcher's consumer acked, if
    /// the stream has one: what is at or below it was handled (by that
    /// dispatcher, or passed over by it as the replicas'), and is acked and
    /// passed over here.
    pub single_acked: Option<u64>,
}

impl Partition {
    /// `delivery`, unless the single dispatcher handled it (a consumer
    /// left from before it ran delivers that again): then it is acked, not
    /// handed on.
    async fn unless_handled(&self, delivery: Delivery) -> Option<Delivery> {
        if self
            .single_acked
            .is_none_or(|through| delivery.seq > through)
        {
            return Some(delivery);
        }
        if let Err(e) = delivery.ack().await {
            tracing::warn!(partition = self.number, error = %e,
                "acking an event the single dispatcher handled failed");
        }
        None
    }

    /// The deliveries of `drained` it does not pass over. (Taken after a
    /// drain, whose deliveries' pins the caller reads first.)
    async fn unless_handled_all(
        &self,
        drained: Vec<(Delivery, Option<String>, u64)>,
    ) -> Vec<(Delivery, Option<String>, u64)> {
        let mut kept = Vec::with_capacity(drained.len());
        for (delivery, pin, seq) in drained {
            if let Some(delivery) = self.unless_handled(delivery).await {
                kept.push((delivery, pin, seq));
            }
        }
        kept
    }
}

/// What a partition's pull left when it stopped.
#[derive(Debug, Default)]
pub(super) struct PullEnd {
    /// Deliveries held behind a fence that had not opened: to be given back
    /// to the bus, not handled here.
    pub held: Vec<Delivery>,
    /// The pin the pull last held, if it received anything.
    pub pin: Option<String>,
}

/// Pulls `partition` into the sink until `stop` turns true, starting the
/// pull again when it ends early (a deleted consumer, a cluster electing
/// leaders). Each pin this replica receives the partition under (the first,
/// and any after the server moved the pin away and back) puts up a fence
/// first (see [`Fence`]).
pub(super) async fn pull_partition(
    mut partition: Partition,
    sink: Sink,
    mut stop: watch::Receiver<bool>,
) -> PullEnd {
    let p = partition.number;
    loop {
        let info = partition.consumer.cached_info();
        let started = Puller::start(
            &partition.js,
            &info.stream_name,
            &info.name,
            pull_settings(sink.batch, Some(GROUP)),
        )
        .await;
        let end = match started {
            Ok(messages) => {
                tracing::debug!(partition = p, "pulling the partition");
                let end = pull_fenced(messages, &mut partition, &sink, &mut stop).await;
                if *stop.borrow() {
                    return end;
                }
                tracing::warn!(
                    partition = p,
                    "the pull of the partition ended; starting it again"
                );
                Some(end)
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "pulling the partition failed; trying again");
                None
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return end.unwrap_or_default(),
            _ = tokio::time::sleep(PULL_EXPIRES + Duration::from_millis(200)) => {}
        }
        if let Some(end) = end {
            give_back(p, end.held).await;
            unpin_if_held(&partition.stream, p, end.pin.as_deref()).await;
        }
        if sink.tx.is_closed() {
            return PullEnd::default();
        }
        // The pull may have ended because its consumer was deleted, or
        // its stream made again: made anew, it starts as it would now.
        match after_replicas::partitions_start(&partition.stream).await {
            Ok((start, single_acked)) => {
                partition.config.deliver_policy = start;
                partition.single_acked = single_acked;
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "placing the partition's start failed; trying again");
                continue;
            }
        }
        let name = crate::nats::partition_consumer(p);
        match partition
            .stream
            .get_or_create_consumer(&name, partition.config.clone())
            .await
        {
            Ok(consumer) => partition.consumer = consumer,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "creating the partition's consumer failed")
            }
        }
    }
}

/// Pulls until `stop` turns true or the pull ends.
async fn pull_fenced(
    mut messages: Messages,
    partition: &mut Partition,
    sink: &Sink,
    stop: &mut watch::Receiver<bool>,
) -> PullEnd {
    let mut pin: Option<String> = None;
    let mut fence = Some(Fence::new(partition));
    let mut check = tokio::time::interval(FENCE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether this replica holds a term on the partition's state: taken
    // once the last holder's deliveries are settled (when the fence opens,
    // or, with nothing delivered here yet, once nothing is unacked), so
    // that the term fences only a holder that is gone or paused.
    let mut term = false;
    let mut idle = tokio::time::interval_at(Instant::now() + IDLE_TERM_AFTER, IDLE_TERM_CHECK);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    enum Step<T> {
        Stop,
        Check,
        Idle,
        Next(Option<T>),
    }
    loop {
        let step = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Step::Stop,
            _ = check.tick(), if fence.as_ref().is_some_and(Fence::armed) => Step::Check,
            _ = idle.tick(), if !term && fence.as_ref().is_some_and(|f| !f.armed()) => Step::Idle,
            next = messages.next() => Step::Next(next),
        };
        let next = match step {
            Step::Stop => break,
            Step::Next(next) => next,
            Step::Idle => {
                if nothing_unacked(partition).await {
                    term = take_term(partition).await;
                }
                continue;
            }
            Step::Check => {
                let f = fence.as_mut().expect("armed");
                if f.opens().await {
                    if !term {
                        term = take_term(partition).await;
                        if !term {
                            // Tried again at the next check.
                            continue;
                        }
                    }
                    let held = std::mem::take(&mut f.held);
                    let keepalive = f.keepalive;
                    fence = None;
                    let left = hand_on(sink, held, &mut messages, partition, keepalive, stop).await;
                    if !left.is_empty() {
                        // Stopped while handing on: the rest is this
                        // replica's to finish, like what it drains below.
                        send_all(sink, left).await;
                        break;
                    }
                }
                continue;
            }
        };
        let Some(next) = next else {
            // The pull ended (its consumer was deleted, or the client gave
            // up): what the fence holds goes back.
            let held = fence
                .map(|f| f.held.into_values().collect())
                .unwrap_or_default();
            return PullEnd { held, pin };
        };
        let Some((delivery, delivery_pin, delivery_seq)) =
            delivery_of(next, &sink.prefix, Some(&partition.in_flight))
        else {
            continue;
        };
        if delivery_pin.is_some() && delivery_pin != pin {
            if pin.is_some() && fence.is_none() {
                // The pin moved away and came back (a consumer leader
                // changed, say): someone else may have held the partition.
                tracing::info!(
                    partition = partition.number,
                    "the partition's pin changed: fencing again"
                );
                fence = Some(Fence::new(partition));
                term = false;
            }
            pin = delivery_pin;
        }
        let Some(delivery) = partition.unless_handled(delivery).await else {
            if let Some(f) = fence.as_mut() {
                f.passed(delivery_seq);
            }
            continue;
        };
        match fence.as_mut() {
            Some(f) => {
                if !f.armed() {
                    f.arm();
                    check.reset_immediately();
                }
                let was_read = f.read_all();
                f.hold(delivery, delivery_seq);
                if !was_read && f.read_all() {
                    // What the consumer had delivered when last asked is
                    // read: the fence can open now, not at the next check.
                    // (Once: a take that fails is tried at the checks.)
                    check.reset_immediately();
                }
            }
            None => {
                hold_term(&partition.state, partition.number, &delivery, stop).await;
                if let Err(unsent) = sink.tx.send(delivery).await {
                    let _ = unsent.0.nak(Duration::ZERO).await;
                    return PullEnd {
                        held: Vec::new(),
                        pin,
                    };
                }
            }
        }
    }
    if partition.releasing.load(Ordering::SeqCst) {
        // Handed over to another replica: unpin first, so that the server
        // sends nothing more to this pull's outstanding requests and the new
        // owner's waiting pull takes over at once (its fence waits for what
        // this replica still handles); then everything not handled here goes
        // back, for the new owner to handle in order.
        unpin_if_held(&partition.stream, partition.number, pin.as_deref()).await;
        let drained = drain(&mut messages, sink, Some(&partition.in_flight), None).await;
        // While draining, a request the pull had sent before may have been
        // given the pin again (if the new owner was not pulling yet):
        // release that pin too, once the pull is gone.
        drop(messages);
        let again = drained.iter().rev().find_map(|(_, p, _)| p.clone());
        if again.is_some() && again != pin {
            unpin_if_held(&partition.stream, partition.number, again.as_deref()).await;
        }
        let drained = partition.unless_handled_all(drained).await;
        let mut held: Vec<Delivery> = fence
            .map(|f| f.held.into_values().collect())
            .unwrap_or_default();
        held.extend(drained.into_iter().map(|(d, _, _)| d));
        return PullEnd { held, pin: None };
    }
    let drained = drain(&mut messages, sink, Some(&partition.in_flight), None).await;
    let drained = partition.unless_handled_all(drained).await;
    match fence {
        // Not ours to handle yet: everything goes back.
        Some(mut f) => {
            for (delivery, _, delivery_seq) in drained {
                f.hold(delivery, delivery_seq);
            }
            PullEnd {
                held: f.held.into_values().collect(),
                pin,
            }
        }
        None => {
            send_all(sink, drained.into_iter().map(|(d, _, _)| d)).await;
            PullEnd {
                held: Vec::new(),
                pin,
            }
        }
    }
}

/// Hands held deliveries on in bus order, as fast as the workers take
/// them, with what arrives meanwhile queued behind them; reports those
/// still waiting in progress. Returns what is left when `stop` turns true.
async fn hand_on(
    sink: &Sink,
    held: BTreeMap<u64, Delivery>,
    messages: &mut Messages,
    partition: &Partition,
    keepalive: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Vec<Delivery> {
    let mut waiting: VecDeque<Delivery> = held.into_values().collect();
    let mut tick = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    enum Step<T> {
        Stop,
        Send(T),
        Next(Option<Box<Result<jetstream::Message, PullError>>>),
        Tick,
    }
    while !waiting.is_empty() {
        let step = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Step::Stop,
            permit = sink.tx.reserve() => Step::Send(permit),
            next = messages.next() => Step::Next(next.map(Box::new)),
            _ = tick.tick() => Step::Tick,
        };
        match step {
            Step::Stop => break,
            Step::Send(Ok(permit)) => {
                let delivery = waiting.pop_front().expect("not empty");
                hold_term(&partition.state, partition.number, &delivery, stop).await;
                permit.send(delivery)
            }
            Step::Send(Err(_)) => {
                // The dispatcher is gone: everything goes straight back.
                for delivery in waiting.drain(..) {
                    let _ = delivery.nak(Duration::ZERO).await;
                }
            }
            Step::Next(Some(next)) => {
                if let Some((delivery, _, _)) =
                    delivery_of(*next, &sink.prefix, Some(&partition.in_flight))
                    && let Some(delivery) = partition.unless_handled(delivery).await
                {
                    waiting.push_back(delivery);
                }
            }
            Step::Next(None) => break,
            Step::Tick => {
                for delivery in &waiting {
                    let _ = delivery.in_progress().await;
                }
            }
        }
    }
    waiting.into_iter().collect()
}

/// Gives deliveries back to the bus in bus order, to be delivered again at
/// once (to whoever holds the partition's pin). Call once this replica's
/// pull requests have expired.
pub(super) async fn give_back(p: u16, held: Vec<Delivery>) {
    if held.is_empty() {
        return;
    }
    tracing::info!(
        partition = p,
        count = held.len(),
        "giving held events back to the bus"
    );
    let mut held = held;
    held.sort_by_key(|d| d.seq);
    for delivery in held {
        if let Err(e) = delivery.nak(Duration::ZERO).await {
            tracing::warn!(partition = p, error = %e, "giving an event back failed; the bus delivers it again after its ack wait");
        }
    }
}

/// Unpins partition `p`'s consumer if its pin is still `held`, the one
/// this replica's pull last held: another replica's pin stays.
pub(super) async fn unpin_if_held(stream: &jetstream::stream::Stream, p: u16, held: Option<&str>) {
    let Some(held) = held else { return };
    let name = crate::nats::partition_consumer(p);
    let pinned = match stream.consumer_info(&name).await {
        Ok(info) => info
            .priority_groups
            .iter()
            .find(|g| g.group == GROUP)
            .and_then(|g| g.pinned_client_id.clone()),
        Err(e) => {
            tracing::warn!(partition = p, error = %e,
                "reading the partition's consumer failed; its pin times out instead of being released");
            return;
        }
    };
    if pinned.as_deref() != Some(held) {
        tracing::debug!(
            partition = p,
            "the partition is pinned to another pull; leaving it"
        );
        return;
    }
    match stream.unpin_consumer(&name, GROUP).await {
        Ok(()) => tracing::info!(partition = p, "partition released to its next holder"),
        Err(e) => tracing::warn!(partition = p, error = %e,
            "unpinning the partition failed; its pin times out instead"),
    }
}

/// Keeps a partition's order when it changes hands. The replica it came
/// from may have left deliveries unsettled (it was killed, or its NATS
/// server was, which also loses the pin and the redelivery timers): those
/// come back to the new holder as redeliveries, but the server may send
/// newer events first, and sends redeliveries in the order their timers
/// fire. So a replica that receives a partition holds what it receives
/// until the consumer has nothing unacked but what was delivered to this
/// replica (or the patience runs out), and then hands it on in bus order.
struct Fence {
    partition: u16,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    in_flight: Arc<AtomicUsize>,
    patience: Duration,
    keepalive: Duration,
    /// When it opens at the latest; set at the first delivery, when this
    /// replica holds the pin.
    deadline: Option<Instant>,
    last_keepalive: Instant,
    held: BTreeMap<u64, Delivery>,
    /// The consumer sequence of the last delivery held.
    last_delivery_seq: u64,
    /// Everything else unacked was delivered here, up to this consumer
    /// sequence, and not all of it read yet: the fence opens once it is.
    read_to: Option<u64>,
    unpartitioned: Option<Unpartitioned>,
}

/// The events stored before the stream was partitioned: partition 0's
/// consumer has them all, up to stream sequence `until`.
pub(super) struct Unpartitioned {
    pub consumer: jetstream::consumer::Consumer<pull::Config>,
    pub until: u64,
}

impl Fence {
    fn new(partition: &mut Partition) -> Self {
        Self {
            partition: partition.number,
            consumer: partition.consumer.clone(),
            in_flight: partition.in_flight.clone(),
            patience: partition.patience,
            keepalive: partition.keepalive,
            deadline: None,
            last_keepalive: Instant::now(),
            held: BTreeMap::new(),
            last_delivery_seq: 0,
            read_to: None,
            // Waited for once per process.
            unpartitioned: partition.unpartitioned.take(),
        }
    }

    fn armed(&self) -> bool {
        self.deadline.is_some()
    }

    fn arm(&mut self) {
        let now = Instant::now();
        let patience = if self.unpartitioned.is_some() {
            UNPARTITIONED_PATIENCE
        } else {
            self.patience
        };
        self.deadline = Some(now + patience);
        self.last_keepalive = now;
    }

    /// A delivery passed over (acked, not handed on) was read.
    fn passed(&mut self, delivery_seq: u64) {
        self.last_delivery_seq = self.last_delivery_seq.max(delivery_seq);
    }

    fn hold(&mut self, delivery: Delivery, delivery_seq: u64) {
        self.last_delivery_seq = self.last_delivery_seq.max(delivery_seq);
        self.held.insert(delivery.seq, delivery);
    }

    /// Whether it can open: nothing from before is unsettled any more, or
    /// the patience ran out. Reports the held deliveries in progress when it
    /// is time to.
    async fn opens(&mut self) -> bool {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            tracing::warn!(
                partition = self.partition,
                held = self.held.len(),
                "the partition's earlier deliveries are not all settled in time; going on (events of their conversations may be handled out of order)"
            );
            return true;
        }
        if let Some(u) = &mut self.unpartitioned {
            if !u.handled(self.partition).await {
                self.keep_alive(now).await;
                return false;
            }
            tracing::info!(
                partition = self.partition,
                until = u.until,
                "the events stored before the stream was partitioned are handled"
            );
            self.unpartitioned = None;
            self.deadline = Some(now + self.patience);
        }
        if self.settled().await {
            if !self.held.is_empty() {
                tracing::info!(
                    partition = self.partition,
                    held = self.held.len(),
                    "holding the partition: its earlier deliveries are settled"
                );
            }
            return true;
        }
        self.keep_alive(now).await;
        false
    }

    /// Whether every unacked delivery of the consumer is one this fence
    /// holds. Only when no other delivery of the partition is alive here:
    /// one being settled while the consumer is asked could otherwise hide
    /// another replica's. Deliveries made to this replica and not read yet
    /// count as its own, but the fence stays up until they are read: the
    /// last holder's redeliveries can be among them, earlier in bus order
    /// than what the fence holds.
    async fn settled(&mut self) -> bool {
        if self.read_to.is_some() {
            return self.read_all();
        }
        let held = self.held.len() as u64;
        if self.in_flight.load(Ordering::SeqCst) as u64 != held {
            return false;
        }
        let read = self.last_delivery_seq;
        match self.consumer.info().await {
            Ok(info) => {
                let on_the_way = info.delivered.consumer_sequence.saturating_sub(read);
                if info.num_ack_pending as u64 > held + on_the_way {
                    return false;
                }
                if on_the_way > 0 {
                    self.read_to = Some(info.delivered.consumer_sequence);
                    return false;
                }
                true
            }
            Err(e) => {
                tracing::debug!(partition = self.partition, error = %e, "reading the partition's consumer failed");
                false
            }
        }
    }

    /// Whether everything the consumer had delivered when [`Fence::settled`]
    /// last asked has been read since.
    fn read_all(&self) -> bool {
        self.read_to.is_some_and(|to| self.last_delivery_seq >= to)
    }

    async fn keep_alive(&mut self, now: Instant) {
        if now.duration_since(self.last_keepalive) >= self.keepalive {
            self.last_keepalive = now;
            for delivery in self.held.values() {
                let _ = delivery.in_progress().await;
            }
        }
    }
}

impl Unpartitioned {
    /// Whether partition 0 has handled them all.
    async fn handled(&mut self, p: u16) -> bool {
        match self.consumer.info().await {
            Ok(info) => {
                info.ack_floor.stream_sequence >= self.until
                    || (info.num_pending == 0 && info.num_ack_pending == 0)
            }
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "reading partition 0's consumer failed");
                false
            }
        }
    }
}
