//! The NATS JetStream bus: stream `VUMI_EVENTS` (subjects `{prefix}.events.>`,
//! a two-minute duplicate window) and durable pull consumers with explicit
//! acks: `switchboard` for one dispatcher, or, when replicas share the bus,
//! one per partition (`switchboard-p0` …), each pinned to one replica at a
//! time (see [`super::partitions`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, RequestErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use switchboard_sdk::VumiApiEvent;
use switchboard_sdk::nats::{NatsEmitter, events_stream_config, stream_name};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::partitions::{PARTITIONS, unpartitioned};
use super::{Acker, Bus, BusError, Delivery, InFlight, Published};
use crate::records::DeadLetter;

/// The durable consumer of a dispatcher that does not share the bus.
pub const CONSUMER: &str = "switchboard";

/// The priority group replicas pull the partition consumers in.
pub const GROUP: &str = "switchboard";

/// The durable consumer of partition `p`.
pub fn partition_consumer(p: u16) -> String {
    format!("{CONSUMER}-p{p}")
}

/// The stream's subject transform that adds the partition, from a hash of
/// the account, to each event's subject.
pub fn partition_transform(prefix: &str) -> jetstream::stream::SubjectTransform {
    jetstream::stream::SubjectTransform {
        source: format!("{prefix}.events.*.*.*"),
        destination: format!(
            "{prefix}.events.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{partition({PARTITIONS},1)}}}}"
        ),
    }
}

/// The subjects partition `p`'s consumer takes. Partition 0 also takes
/// whatever the transform did not number: events stored before the stream
/// was partitioned, and subjects of the wrong shape (poison).
fn partition_filters(prefix: &str, p: u16) -> Vec<String> {
    let events = format!("{prefix}.events");
    let mut filters = vec![format!("{events}.*.*.*.{p}")];
    if p == 0 {
        filters.extend([
            format!("{events}.*"),
            format!("{events}.*.*"),
            format!("{events}.*.*.*"),
            format!("{events}.*.*.*.*.>"),
        ]);
    }
    filters
}
/// How long one pull request of the consumer lasts. Short, because a
/// stopping dispatcher's last request outlives it on the server: a message
/// given back (nakked) while it lasts is offered to it, found undeliverable and
/// put at the back of the redelivery queue — out of order. So the nakking
/// waits until it has expired ([`Bus::quiesce`]).
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// How long a delivered message may stay unacked before JetStream redelivers
/// it, unless the dispatcher says it is still working on it.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Records when the pull ended, when dropped.
struct PullEnded(watch::Sender<Option<tokio::time::Instant>>);

impl Drop for PullEnded {
    fn drop(&mut self) {
        self.0.send_replace(Some(tokio::time::Instant::now()));
    }
}

/// A pulled message as a delivery; `None` for an error of the pull itself.
fn delivery_of(
    next: Result<jetstream::Message, jetstream::consumer::pull::MessagesError>,
    prefix: &str,
    in_flight: Option<&Arc<AtomicUsize>>,
) -> Option<Delivery> {
    let message = match next {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "NATS pull consumer");
            return None;
        }
    };
    let (attempt, seq) = message
        .info()
        .map(|i| (i.delivered.max(1) as u32, i.stream_sequence))
        .unwrap_or((1, 0));
    Some(Delivery {
        subject: unpartitioned(prefix, &message.subject).to_string(),
        payload: message.payload.clone(),
        attempt,
        seq,
        acker: Acker::Nats(Box::new(message)),
        _in_flight: in_flight.map(InFlight::new),
    })
}

/// Where pulled messages go, and what the pull reports on the way.
#[derive(Clone)]
struct Sink {
    tx: mpsc::Sender<Delivery>,
    prefix: String,
    /// How many messages per pull request.
    batch: usize,
    /// Counts the deliveries of a partition.
    in_flight: Option<Arc<AtomicUsize>>,
}

/// Moves pulled messages into the sink until `stop` turns true; then hands
/// over what the client already pulled, so that it goes back to the bus now
/// and in order, instead of waiting out the ack wait. With a fence, new
/// events wait behind it (see [`Fence`]).
async fn pull_into<S>(
    mut messages: S,
    sink: Sink,
    mut stop: watch::Receiver<bool>,
    mut fence: Option<Fence>,
) where
    S: futures::Stream<Item = Result<jetstream::Message, pull::MessagesError>> + Unpin,
{
    let deliver = |next| delivery_of(next, &sink.prefix, sink.in_flight.as_ref());
    let mut check = tokio::time::interval(FENCE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        enum Step<T> {
            Stop,
            Check,
            Next(Option<T>),
        }
        let step = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Step::Stop,
            _ = check.tick(), if fence.as_ref().is_some_and(Fence::armed) => Step::Check,
            next = messages.next() => Step::Next(next),
        };
        let next = match step {
            Step::Stop => break,
            Step::Next(next) => next,
            Step::Check => {
                let f = fence.as_mut().expect("armed");
                if !f.opens().await {
                    continue;
                }
                let held = std::mem::take(&mut f.held);
                fence = None;
                for delivery in held.into_values() {
                    if let Err(unsent) = sink.tx.send(delivery).await {
                        let _ = unsent.0.nak(Duration::ZERO).await;
                        return;
                    }
                }
                continue;
            }
        };
        let Some(next) = next else { return };
        let Some(delivery) = deliver(next) else {
            continue;
        };
        if let Some(f) = fence.as_mut() {
            if !f.armed() {
                // The first delivery: this replica holds the partition now.
                f.arm();
                check.reset_immediately();
            }
            f.held.insert(delivery.seq, delivery);
            continue;
        }
        if let Err(unsent) = sink.tx.send(delivery).await {
            // The dispatcher is gone: give the message straight back.
            let _ = unsent.0.nak(Duration::ZERO).await;
            return;
        }
    }
    // Bounded: the pull may ask the server for one more batch while this
    // drains.
    let mut handed = Vec::new();
    for _ in 0..2 * sink.batch {
        match tokio::time::timeout(Duration::from_millis(100), messages.next()).await {
            Ok(Some(next)) => handed.extend(deliver(next)),
            Ok(None) | Err(_) => break,
        }
    }
    handed.extend(fence.into_iter().flat_map(|f| f.held.into_values()));
    handed.sort_by_key(|d| d.seq);
    for delivery in handed {
        if let Err(unsent) = sink.tx.send(delivery).await {
            let _ = unsent.0.nak(Duration::ZERO).await;
        }
    }
}

/// How often a fence checks whether it can open.
const FENCE_CHECK: Duration = Duration::from_millis(250);

/// Keeps a partition's order when it changes hands. The replica it came
/// from may have left deliveries unsettled (it was killed, or its NATS
/// server was, which also loses the pin and the redelivery timers): those
/// come back to the new holder as redeliveries, but the server may send
/// newer events first, and sends redeliveries in the order their timers
/// fire. So a replica that takes a partition over holds what it receives
/// until the consumer has nothing unacked but what this replica holds (or
/// the patience runs out), and then hands it on in bus order.
struct Fence {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    partition: u16,
    in_flight: Arc<AtomicUsize>,
    patience: Duration,
    /// How often held deliveries are reported in progress, so that the
    /// server does not deliver them again meanwhile.
    keepalive: Duration,
    /// When it opens at the latest; set at the first delivery, when this
    /// replica holds the pin.
    deadline: Option<tokio::time::Instant>,
    last_keepalive: tokio::time::Instant,
    held: BTreeMap<u64, Delivery>,
    /// Events stored before the stream was partitioned, which partition 0
    /// handles: the other partitions wait for them.
    unpartitioned: Option<Unpartitioned>,
}

/// How long a partition waits for the events stored before the stream was
/// partitioned to be handled.
const UNPARTITIONED_PATIENCE: Duration = Duration::from_secs(600);

/// The events stored before the stream was partitioned: partition 0's
/// consumer has them all, up to sequence `until`.
struct Unpartitioned {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    until: u64,
    deadline: tokio::time::Instant,
}

impl Unpartitioned {
    /// Whether they are all handled.
    async fn handled(&mut self) -> bool {
        match self.consumer.info().await {
            Ok(info) => {
                info.ack_floor.stream_sequence >= self.until
                    || (info.num_pending == 0 && info.num_ack_pending == 0)
            }
            Err(_) => false,
        }
    }
}

impl Fence {
    fn armed(&self) -> bool {
        self.deadline.is_some()
    }

    fn arm(&mut self) {
        let now = tokio::time::Instant::now();
        self.deadline = Some(now + self.patience);
        self.last_keepalive = now;
        if let Some(u) = &mut self.unpartitioned {
            u.deadline = now + UNPARTITIONED_PATIENCE;
        }
    }

    /// Reports the held deliveries in progress, when it is time to.
    async fn keep_alive(&mut self, now: tokio::time::Instant) {
        if now.duration_since(self.last_keepalive) >= self.keepalive {
            self.last_keepalive = now;
            for delivery in self.held.values() {
                let _ = delivery.in_progress().await;
            }
        }
    }

    /// Whether nothing from before is unsettled any more (or the patience
    /// ran out).
    async fn opens(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if let Some(u) = &mut self.unpartitioned {
            let handled = u.handled().await;
            if !handled && now < u.deadline {
                self.keep_alive(now).await;
                return false;
            }
            if handled {
                tracing::info!(
                    partition = self.partition,
                    until = u.until,
                    "the events stored before the stream was partitioned are handled"
                );
            } else {
                tracing::warn!(
                    partition = self.partition,
                    until = u.until,
                    "the events stored before the stream was partitioned are not all handled yet; going on (events of their conversations may be handled out of order)"
                );
            }
            self.unpartitioned = None;
            self.deadline = Some(now + self.patience);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            tracing::warn!(
                partition = self.partition,
                held = self.held.len(),
                "the partition's earlier deliveries did not all come back in time; going on (events of their conversations may be handled out of order)"
            );
            return true;
        }
        let ours = self.in_flight.load(Ordering::SeqCst);
        if let Ok(info) = self.consumer.info().await {
            let unacked = info.num_ack_pending;
            if unacked <= ours {
                if !self.held.is_empty() || unacked > 0 {
                    tracing::info!(
                        partition = self.partition,
                        held = self.held.len(),
                        "took the partition over: its earlier deliveries are settled"
                    );
                }
                return true;
            }
        }
        self.keep_alive(now).await;
        false
    }
}

/// The dead-letter stream: `VUMI_DEAD_LETTERS`, subjects `{prefix}.dead.{account}`.
/// Every filing is kept there for 30 days, for alerting and audit; listing,
/// replaying and discarding work on the dispatcher's dead-letter index.
pub fn dead_letters_stream_config(prefix: &str) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: stream_name(prefix, "VUMI_DEAD_LETTERS"),
        subjects: vec![format!("{prefix}.dead.>")],
        duplicate_window: switchboard_sdk::nats::DUPLICATE_WINDOW,
        max_age: Duration::from_secs(30 * 24 * 3600),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Pulls partition `p` into the sink until `stop` turns true, retrying a
/// pull that cannot start (a cluster electing leaders).
async fn pull_partition(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    p: u16,
    sink: Sink,
    mut stop: watch::Receiver<bool>,
    ack_wait: Duration,
    patience: Duration,
    unpartitioned: Option<Unpartitioned>,
) {
    let messages = loop {
        let started = consumer
            .stream()
            .group(GROUP)
            .max_messages_per_batch(sink.batch)
            .heartbeat(PULL_EXPIRES / 2)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        match started {
            Ok(messages) => break messages,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "pulling the partition failed; trying again");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    tracing::debug!(partition = p, "pulling the partition");
    let fence = Fence {
        consumer,
        partition: p,
        in_flight: sink
            .in_flight
            .clone()
            .expect("a partition counts its deliveries"),
        patience,
        keepalive: ack_wait / 3,
        deadline: None,
        last_keepalive: tokio::time::Instant::now(),
        held: BTreeMap::new(),
        unpartitioned,
    };
    pull_into(messages, sink, stop, Some(fence)).await;
}

/// Hands partition `p` over once this replica no longer owns it: waits for
/// its pull to end and its deliveries here to be settled, and for its last
/// pull request to expire on the server, then unpins it, so that its new
/// owner's pull takes over. A partition that comes back meanwhile stays.
async fn release(
    stream: jetstream::stream::Stream,
    p: u16,
    pull: JoinHandle<()>,
    in_flight: Arc<AtomicUsize>,
    owned: watch::Receiver<Vec<u16>>,
    pin_timeout: Duration,
) {
    let _ = pull.await;
    // Past the pin timeout the server has moved the pin anyway.
    let deadline = tokio::time::Instant::now() + pin_timeout;
    while in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(PULL_EXPIRES + Duration::from_millis(200)).await;
    if owned.borrow().contains(&p) {
        return;
    }
    match stream.unpin_consumer(&partition_consumer(p), GROUP).await {
        Ok(()) => tracing::info!(partition = p, "partition handed over to its new owner"),
        Err(e) => tracing::warn!(partition = p, error = %e,
            "unpinning the partition failed; its new owner takes it once the pin times out"),
    }
}

/// How long [`ensure_stream`] keeps asking a server that does not answer.
pub const CREATE_PATIENCE: Duration = Duration::from_secs(30);

/// Creates the stream `config` describes unless it exists. One that exists
/// is used as it is: a replica count other than the configured one is only
/// reported (change it with `nats stream edit NAME --replicas N`).
///
/// A request the server does not answer in time is tried again for up to
/// [`CREATE_PATIENCE`]: a cluster that has just started (or lost a node) may
/// still be electing the leaders that answer it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
) -> Result<(), String> {
    let name = config.name.clone();
    let wanted = config.num_replicas.max(1);
    let deadline = tokio::time::Instant::now() + CREATE_PATIENCE;
    let patient = || tokio::time::Instant::now() < deadline;
    let info = loop {
        let mut stream = match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => stream,
            Err(e) if matches!(e.kind(), CreateStreamErrorKind::TimedOut) && patient() => {
                tracing::warn!(stream = %name, "creating the stream timed out; trying again");
                continue;
            }
            Err(e) => return Err(format!("creating stream {name}: {e}")),
        };
        match stream.info().await {
            Ok(info) => break info.clone(),
            Err(e) if matches!(e.kind(), RequestErrorKind::TimedOut) && patient() => {
                tracing::warn!(stream = %name, "reading the stream timed out; trying again");
            }
            Err(e) => return Err(format!("reading stream {name}: {e}")),
        }
    };
    let kept = info.config.num_replicas.max(1);
    if kept != wanted {
        tracing::warn!(stream = %name, replicas = kept, configured = wanted,
            "the stream exists with another replica count than bus.stream_replicas; it is used as it is");
    }
    Ok(())
}

/// The stream metadata key under which the last sequence stored before the
/// partition transform was added is kept.
const UNPARTITIONED_UNTIL: &str = "switchboard.unpartitioned_until";

/// Makes the existing events stream partition subjects as `config` says:
/// adds the transform to a stream created without it (by a worker, or a
/// dispatcher that did not share the bus), and refuses one that transforms
/// subjects otherwise. Returns the last sequence stored without a partition
/// (0 when the stream was partitioned from its start).
async fn ensure_partitioned(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
) -> Result<u64, String> {
    let name = config.name.clone();
    let wanted = config.subject_transform.clone();
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| format!("opening stream {name}: {e}"))?;
    let info = stream
        .info()
        .await
        .map_err(|e| format!("reading stream {name}: {e}"))?
        .clone();
    let mut current = info.config.clone();
    let recorded = |config: &jetstream::stream::Config| {
        config
            .metadata
            .get(UNPARTITIONED_UNTIL)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    if current.subject_transform == wanted {
        return Ok(recorded(&current));
    }
    match (&current.subject_transform, &wanted) {
        (None, Some(want)) => {
            tracing::info!(stream = %name, source = %want.source, destination = %want.destination,
                "partitioning the events stream for replicas: new events carry their partition");
            let failed = |e: &dyn std::fmt::Display| {
                format!("adding the partition transform to stream {name}: {e}")
            };
            // Recorded before and refined after the change, so that events
            // stored meanwhile count as unpartitioned too.
            current.subject_transform = wanted;
            current.metadata.insert(
                UNPARTITIONED_UNTIL.to_string(),
                info.state.last_sequence.to_string(),
            );
            let changed = js
                .update_stream(current.clone())
                .await
                .map_err(|e| failed(&e))?;
            let until = changed.state.last_sequence;
            current
                .metadata
                .insert(UNPARTITIONED_UNTIL.to_string(), until.to_string());
            js.update_stream(current).await.map_err(|e| failed(&e))?;
            Ok(until)
        }
        (None, None) => Ok(0),
        (Some(have), _) => Err(format!(
            "stream {name} transforms subjects {} → {}, but replicas sharing the bus need {} → {}; \
             remove that transform (nats stream edit) or run one dispatcher without bus.replicated",
            have.source,
            have.destination,
            wanted.as_ref().map_or("", |w| w.source.as_str()),
            wanted.as_ref().map_or("", |w| w.destination.as_str()),
        )),
    }
}

/// The NATS JetStream bus.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    emitter: NatsEmitter,
    prefix: String,
    max_ack_pending: i64,
    ack_wait: Duration,
    /// When the pull stopped (set once consuming ends).
    pull_stopped: watch::Sender<Option<tokio::time::Instant>>,
    /// Set when replicas share the bus.
    partitions: Option<Partitions>,
    /// The last sequence the events stream stored before it was partitioned.
    unpartitioned_until: u64,
}

/// What a replica sharing the bus pulls.
#[derive(Debug, Clone)]
struct Partitions {
    /// The partitions this replica owns, as they change.
    owned: watch::Receiver<Vec<u16>>,
    /// Those it was pulling when it stopped, to unpin at hand-over.
    pulled: Arc<Mutex<Vec<u16>>>,
}

impl NatsBus {
    /// Connects to `url` and makes sure the events and dead-letter streams
    /// exist, kept on `replicas` servers of the cluster. With `partitioned`
    /// (replicas share the bus) the events stream numbers each event's
    /// subject with its partition.
    pub async fn connect(
        url: &str,
        prefix: &str,
        max_bytes: usize,
        max_ack_pending: usize,
        ack_wait: Duration,
        replicas: usize,
        partitioned: bool,
    ) -> Result<Self, BusError> {
        // Credentials in the URL become connect options; messages show the
        // URL without them.
        let (options, servers) = switchboard_sdk::nats::connect_options(url);
        let url = servers.to_string();
        let client = options
            .name("switchboard-dispatcher")
            .connection_timeout(Duration::from_secs(5))
            .connect(&servers)
            .await
            .map_err(|e| BusError::Unavailable(format!("connecting to NATS at {url}: {e}")))?;
        let js = jetstream::new(client.clone());
        let events = jetstream::stream::Config {
            num_replicas: replicas,
            subject_transform: partitioned.then(|| partition_transform(prefix)),
            ..events_stream_config(prefix)
        };
        ensure_stream(&js, events.clone()).await.map_err(|e| {
            BusError::Unavailable(format!(
                "{e} on {url} (is JetStream enabled? start nats-server with -js)"
            ))
        })?;
        let unpartitioned_until = if partitioned {
            ensure_partitioned(&js, events)
                .await
                .map_err(|e| BusError::Unavailable(format!("{e} on {url}")))?
        } else {
            0
        };
        let dead = jetstream::stream::Config {
            num_replicas: replicas,
            ..dead_letters_stream_config(prefix)
        };
        ensure_stream(&js, dead)
            .await
            .map_err(|e| BusError::Unavailable(format!("{e} on {url}")))?;
        let emitter = NatsEmitter::new(client.clone())
            .with_prefix(prefix)
            .with_max_bytes(max_bytes);
        Ok(Self {
            client,
            js,
            emitter,
            prefix: prefix.to_string(),
            max_ack_pending: max_ack_pending as i64,
            ack_wait,
            pull_stopped: watch::Sender::new(None),
            partitions: None,
            unpartitioned_until,
        })
    }

    /// Consumes only the partitions `owned` names, as it changes (see
    /// [`super::partitions::Membership`]). Needs a bus connected with
    /// `partitioned`.
    pub fn with_partitions(mut self, owned: watch::Receiver<Vec<u16>>) -> Self {
        self.partitions = Some(Partitions {
            owned,
            pulled: Arc::default(),
        });
        self
    }

    /// How long a partition stays pinned to a replica that stopped pulling.
    /// Longer than the ack wait (twice, as the server checks for expired
    /// acks once per ack wait), so that a dead replica's unacked deliveries
    /// are due again before the next replica's first pull, and go first.
    pub fn pin_timeout(&self) -> Duration {
        2 * self.ack_wait + Duration::from_secs(5)
    }

    async fn events_stream(&self) -> Result<jetstream::stream::Stream, BusError> {
        let name = events_stream_config(&self.prefix).name;
        self.js
            .get_stream(&name)
            .await
            .map_err(|e| BusError::Unavailable(format!("opening stream {name}: {e}")))
    }

    /// Consumes the partitions this replica owns, following ownership as
    /// it changes: a partition gained is pulled at once (the server delivers
    /// it once the last owner's pin is released); a partition lost stops
    /// being pulled, its deliveries here are finished, and then it is
    /// unpinned for its new owner.
    async fn consume_partitions(
        &self,
        partitions: &Partitions,
        capacity: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<Delivery>, BusError> {
        let stream = self.events_stream().await?;
        let start = self.partitions_start(&stream).await;
        let mut consumers = Vec::with_capacity(PARTITIONS as usize);
        for p in 0..PARTITIONS {
            let name = partition_consumer(p);
            let consumer: jetstream::consumer::Consumer<pull::Config> = stream
                .get_or_create_consumer(
                    &name,
                    pull::Config {
                        durable_name: Some(name.clone()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait: self.ack_wait,
                        max_ack_pending: self.max_ack_pending,
                        filter_subjects: partition_filters(&self.prefix, p),
                        deliver_policy: start,
                        priority_policy: jetstream::consumer::PriorityPolicy::PinnedClient,
                        priority_groups: vec![GROUP.to_string()],
                        priority_timeout: self.pin_timeout(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| BusError::Unavailable(format!("creating consumer {name}: {e}")))?;
            consumers.push(consumer);
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sink = Sink {
            tx,
            prefix: self.prefix.clone(),
            batch: capacity.clamp(1, 1024),
            in_flight: None,
        };
        let in_flight: Vec<Arc<AtomicUsize>> = (0..PARTITIONS).map(|_| Arc::default()).collect();
        let mut owned = partitions.owned.clone();
        let pulled = partitions.pulled.clone();
        let pull_stopped = self.pull_stopped.clone();
        let pin_timeout = self.pin_timeout();
        let ack_wait = self.ack_wait;
        let unpartitioned_until = self.unpartitioned_until;
        tokio::spawn(async move {
            let mut pulling: BTreeMap<u16, (watch::Sender<bool>, JoinHandle<()>)> = BTreeMap::new();
            loop {
                let wanted = owned.borrow_and_update().clone();
                for &p in &wanted {
                    pulling.entry(p).or_insert_with(|| {
                        let (stop_pulling, stopped) = watch::channel(false);
                        let sink = Sink {
                            in_flight: Some(in_flight[p as usize].clone()),
                            ..sink.clone()
                        };
                        let task = tokio::spawn(pull_partition(
                            consumers[p as usize].clone(),
                            p,
                            sink,
                            stopped,
                            ack_wait,
                            pin_timeout,
                            (p != 0 && unpartitioned_until > 0).then(|| Unpartitioned {
                                consumer: consumers[0].clone(),
                                until: unpartitioned_until,
                                deadline: tokio::time::Instant::now(),
                            }),
                        ));
                        (stop_pulling, task)
                    });
                }
                let lost: Vec<u16> = pulling
                    .keys()
                    .filter(|p| !wanted.contains(p))
                    .copied()
                    .collect();
                for p in lost {
                    let (stop_pulling, task) = pulling.remove(&p).expect("listed");
                    let _ = stop_pulling.send(true);
                    tokio::spawn(release(
                        stream.clone(),
                        p,
                        task,
                        in_flight[p as usize].clone(),
                        owned.clone(),
                        pin_timeout,
                    ));
                }
                let membership_ended = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    changed = owned.changed() => changed.is_err(),
                };
                if membership_ended {
                    // Keep pulling what this replica has until stopped.
                    let _ = stop.wait_for(|s| *s).await;
                    break;
                }
            }
            *pulled.lock().expect("not poisoned") = pulling.keys().copied().collect();
            for (stop_pulling, _) in pulling.values() {
                let _ = stop_pulling.send(true);
            }
            for (_, task) in pulling.into_values() {
                let _ = task.await;
            }
            drop(sink);
            pull_stopped.send_replace(Some(tokio::time::Instant::now()));
        });
        Ok(rx)
    }

    /// Where new partition consumers start: after what the single
    /// dispatcher's consumer has acked, when the stream had one (so that
    /// turning replicas on does not handle the stream's history again);
    /// otherwise at the stream's start, like that consumer.
    async fn partitions_start(
        &self,
        stream: &jetstream::stream::Stream,
    ) -> jetstream::consumer::DeliverPolicy {
        let mut single: jetstream::consumer::PullConsumer =
            match stream.get_consumer(CONSUMER).await {
                Ok(consumer) => consumer,
                Err(_) => return jetstream::consumer::DeliverPolicy::All,
            };
        match single.info().await {
            Ok(info) => {
                let start_sequence = info.ack_floor.stream_sequence + 1;
                tracing::info!(
                    start_sequence,
                    "the stream has the single dispatcher's consumer {CONSUMER}: new partition consumers start after what it acked"
                );
                jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            Err(_) => jetstream::consumer::DeliverPolicy::All,
        }
    }

    /// The client, for publishing commands and dead letters.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    async fn publish_as(
        &self,
        event: &VumiApiEvent,
        dedup_id: &str,
    ) -> Result<Published, BusError> {
        self.emitter
            .emit_as(event, dedup_id)
            .await
            .map(|e| Published {
                duplicate: e.duplicate,
            })
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn consume(
        &self,
        capacity: usize,
        stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<Delivery>, BusError> {
        if let Some(partitions) = &self.partitions {
            return self.consume_partitions(partitions, capacity, stop).await;
        }
        let stream = self.events_stream().await?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_string()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: self.max_ack_pending,
                    filter_subject: format!("{}.events.>", self.prefix),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| BusError::Unavailable(format!("creating consumer {CONSUMER}: {e}")))?;
        let batch = capacity.clamp(1, 1024);
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(PULL_EXPIRES / 2)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| BusError::Unavailable(format!("pulling from consumer {CONSUMER}: {e}")))?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sink = Sink {
            tx,
            prefix: self.prefix.clone(),
            batch,
            in_flight: None,
        };
        let pull_stopped = self.pull_stopped.clone();
        tokio::spawn(async move {
            // Marks the time the pull ends, on every way out, after the
            // stream (and its subscription) is gone.
            let _ended = PullEnded(pull_stopped);
            pull_into(messages, sink, stop, None).await;
        });
        Ok(rx)
    }

    async fn announce_dead_letter(&self, letter: &DeadLetter) -> Result<(), BusError> {
        let subject = format!("{}.dead.{}", self.prefix, letter.account_key);
        let payload = serde_json::to_vec(letter).expect("a dead letter serialises");
        let publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(letter.id.as_str());
        let failed = |e: &dyn std::fmt::Display| {
            BusError::Unavailable(format!(
                "publishing dead letter {} to {subject}: {e}",
                letter.id
            ))
        };
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| failed(&e))?;
        ack.await.map_err(|e| failed(&e))?;
        Ok(())
    }

    async fn quiesce(&self) {
        let mut stopped = self.pull_stopped.subscribe();
        let at = match stopped.wait_for(Option::is_some).await {
            Ok(at) => at.expect("waited for it"),
            Err(_) => return,
        };
        tokio::time::sleep_until(at + PULL_EXPIRES + Duration::from_millis(200)).await;
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.client
            .flush()
            .await
            .map_err(|e| BusError::Unavailable(format!("flushing the NATS connection: {e}")))
    }

    async fn lag(&self) -> Option<u64> {
        let name = events_stream_config(&self.prefix).name;
        let stream = self.js.get_stream(&name).await.ok()?;
        let names = match self.partitions {
            Some(_) => (0..PARTITIONS).map(partition_consumer).collect(),
            None => vec![CONSUMER.to_string()],
        };
        let mut lag = 0;
        for name in names {
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer(&name).await.ok()?;
            let info = consumer.info().await.ok()?;
            lag += info.num_pending + info.num_ack_pending as u64;
        }
        Some(lag)
    }

    async fn hand_over(&self) {
        let Some(partitions) = &self.partitions else {
            return;
        };
        let pulled = std::mem::take(&mut *partitions.pulled.lock().expect("not poisoned"));
        let Ok(stream) = self.events_stream().await else {
            return;
        };
        for p in pulled {
            let name = partition_consumer(p);
            match stream.unpin_consumer(&name, GROUP).await {
                Ok(()) => tracing::debug!(partition = p, "partition handed over"),
                Err(e) => tracing::warn!(partition = p, error = %e,
                    "unpinning the partition failed; another replica takes it once the pin times out"),
            }
        }
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn ack_wait(&self) -> Option<Duration> {
        Some(self.ack_wait)
    }
}
