//! The NATS JetStream bus: stream `VUMI_EVENTS` (subjects `{prefix}.events.>`,
//! a two-minute duplicate window) and durable pull consumers with explicit
//! acks: `switchboard` for one dispatcher, or, when replicas share the bus,
//! one per partition (`switchboard-p0` …), each pinned to one replica at a
//! time (see [`crate::partitions`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, RequestErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer::pull};
use switchboard_sdk::VumiApiEvent;
use switchboard_sdk::nats::{NatsEmitter, events_stream_config, stream_name};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::after_replicas;
use crate::marks::{self, Marks};
use crate::partitions::PARTITIONS;
use crate::pull::{
    GROUP, PULL_EXPIRES, Partition, PullEnd, Sink, Unpartitioned, give_back, pull_partition,
    pull_settings, pull_single, send_all, unpin_if_held,
};
use crate::puller::Puller;
use switchboard_engine::bus::{Bus, BusError, Delivery, Published};
use switchboard_engine::dead_letters::DeadLetter;
use switchboard_store::Store;

/// The durable consumer of a dispatcher that does not share the bus.
pub const CONSUMER: &str = "switchboard";

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
/// How long a delivered message may stay unacked before JetStream redelivers
/// it, unless the dispatcher says it is still working on it.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// How many messages a consumer may have delivered and not acked, those
/// nakked to wait (held behind their conversation's retry) among them,
/// unless `bus.max_ack_pending` says otherwise. Past it the server
/// delivers nothing new to the consumer until some are acked, so it is
/// far above what is in flight (a pull batch or two): a conversation
/// holding this many events behind a retry holds up the others.
pub const DEFAULT_MAX_ACK_PENDING: usize = 65_536;

/// Records when the pull ended, when dropped.
struct PullEnded(watch::Sender<Option<tokio::time::Instant>>);

impl Drop for PullEnded {
    fn drop(&mut self) {
        self.0.send_replace(Some(tokio::time::Instant::now()));
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

/// Finishes handing partition `p` over: its pull, stopped, has unpinned it
/// and returns what it had not handled, which goes back to the bus in bus
/// order for the new owner. Then waits (at most the pin timeout) for this
/// replica's deliveries of it to settle, so that the partition is not pulled
/// here again while they are.
async fn release(
    p: u16,
    pull: JoinHandle<PullEnd>,
    in_flight: Arc<AtomicUsize>,
    pin_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    state: Store,
) -> u16 {
    let end = match pull.await {
        Ok(end) => end,
        Err(e) => {
            tracing::error!(partition = p, error = %e, "the partition's pull failed");
            return p;
        }
    };
    give_back(p, end.held).await;
    let settled = async {
        let deadline = tokio::time::Instant::now() + pin_timeout;
        while in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = settled => {}
    }
    state.release_partition(p);
    p
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

/// Consumer `name` of `stream`, made with `config` if it does not exist.
/// One that exists keeps its place and the rest of its configuration, but
/// takes `config`'s limit of unacked messages if it has another (made by
/// an earlier version, or before `bus.max_ack_pending` changed): the
/// messages held behind a retry count against it, and a limit too low
/// stops every conversation while they wait.
async fn consumer_as_configured(
    stream: &jetstream::stream::Stream,
    name: &str,
    config: pull::Config,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    let creating =
        |e: &dyn std::fmt::Display| BusError::Unavailable(format!("creating consumer {name}: {e}"));
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(name, config.clone())
        .await
        .map_err(|e| creating(&e))?;
    let existing = &consumer.cached_info().config;
    if existing.max_ack_pending == config.max_ack_pending {
        return Ok(consumer);
    }
    tracing::info!(
        consumer = name,
        from = existing.max_ack_pending,
        to = config.max_ack_pending,
        "updating the consumer's limit of unacked messages (bus.max_ack_pending)"
    );
    let updated = jetstream::consumer::Config {
        max_ack_pending: config.max_ack_pending,
        ..existing.clone()
    };
    stream
        .update_consumer(updated)
        .await
        .map_err(|e| BusError::Unavailable(format!("updating consumer {name}: {e}")))?;
    stream.get_consumer(name).await.map_err(|e| creating(&e))
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
    /// Where the single consumer got to, kept in the dispatcher's store.
    marks: Option<Marks>,
}

/// A partition and the pin this replica's pull of it last held.
type LastPin = (u16, Option<String>);

/// A partition's running pull: its stop, its hand-over flag, its task.
type Pulling = (
    watch::Sender<bool>,
    Arc<std::sync::atomic::AtomicBool>,
    JoinHandle<PullEnd>,
);

/// What a replica sharing the bus pulls.
#[derive(Debug, Clone)]
struct Partitions {
    /// The partitions this replica owns, as they change.
    owned: watch::Receiver<Vec<u16>>,
    /// Those it was pulling when it stopped, with the pin each last held,
    /// to unpin at hand-over.
    pulled: Arc<Mutex<Vec<LastPin>>>,
    /// The store whose partition-owned state follows the partitions.
    state: Store,
}

impl NatsBus {
    /// Connects to `url` and makes sure the events and dead-letter streams
    /// exist, kept on `replicas` servers of the cluster. With `partitioned`
    /// (replicas share the bus) the events stream numbers each event's
    /// subject with its partition. Refuses (`BusError::InUse`) while
    /// dispatchers that this one would handle events again of consume the
    /// stream: see `after_replicas::refuse_beside`.
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
        // Before the stream is changed for replicas (partitioned), and before
        // anything else of this dispatcher starts (a replica's heartbeat).
        let stream = js
            .get_stream(&events.name)
            .await
            .map_err(|e| BusError::Unavailable(format!("opening stream {}: {e}", events.name)))?;
        after_replicas::refuse_beside(
            &stream,
            if partitioned {
                after_replicas::Consuming::Replicated
            } else {
                after_replicas::Consuming::Single
            },
        )
        .await?;
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
            marks: None,
        })
    }

    /// Keeps where the single consumer got to in `store` (the dispatcher's
    /// own), so that the consumer made anew starts after it instead of at
    /// the stream's start (see `marks.rs`).
    pub fn with_marks(mut self, store: Store) -> Self {
        self.marks = Some(Marks::new(store));
        self
    }

    /// Consumes only the partitions `owned` names, as it changes (see
    /// [`crate::partitions::Membership`]), taking each one's state in
    /// `state` while it holds it. Needs a bus connected with `partitioned`.
    pub fn with_partitions(mut self, owned: watch::Receiver<Vec<u16>>, state: Store) -> Self {
        self.partitions = Some(Partitions {
            owned,
            pulled: Arc::default(),
            state,
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
    /// it once the last holder's pin is released or times out); a partition
    /// lost stops being pulled, its deliveries here are finished, what its
    /// fence still held is given back, and it is unpinned for its new owner.
    async fn consume_partitions(
        &self,
        partitions: &Partitions,
        capacity: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<Delivery>, BusError> {
        let stream = self.events_stream().await?;
        let js = self.js.clone();
        let (start, single_acked) = after_replicas::partitions_start(&stream).await?;
        let config = |p: u16| pull::Config {
            durable_name: Some(partition_consumer(p)),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            filter_subjects: partition_filters(&self.prefix, p),
            deliver_policy: start,
            priority_policy: jetstream::consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec![GROUP.to_string()],
            priority_timeout: self.pin_timeout(),
            ..Default::default()
        };
        // Created together: on a cluster each creation waits for its
        // replicas to agree.
        let consumers: Vec<jetstream::consumer::Consumer<pull::Config>> =
            futures::future::try_join_all((0..PARTITIONS).map(|p| {
                let (name, config, stream) = (partition_consumer(p), config(p), &stream);
                async move { consumer_as_configured(stream, &name, config).await }
            }))
            .await?;
        let configs: Vec<pull::Config> = (0..PARTITIONS).map(config).collect();
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sink = Sink {
            tx,
            prefix: self.prefix.clone(),
            // Smaller pulls than one consumer's: each partition's client
            // buffers its own, and what waits there gets no progress
            // reports.
            batch: (capacity / 8).clamp(2, 128),
        };
        let mut owned = partitions.owned.clone();
        let pulled = partitions.pulled.clone();
        let state = partitions.state.clone();
        let ended = PullEnded(self.pull_stopped.clone());
        let (patience, keepalive) = (self.pin_timeout(), self.ack_wait / 3);
        let unpartitioned_until = self.unpartitioned_until;
        // Partition 0 has the events stored before the stream was
        // partitioned; the others wait for them, once.
        let mut waiting_unpartitioned: Vec<bool> = (0..PARTITIONS)
            .map(|p| p != 0 && unpartitioned_until > 0)
            .collect();
        tokio::spawn(async move {
            // Marks the time the pulls end, on every way out.
            let _ended = ended;
            let mut in_flights: BTreeMap<u16, Arc<AtomicUsize>> = BTreeMap::new();
            let mut pulling: BTreeMap<u16, Pulling> = BTreeMap::new();
            // Partitions being handed over; one is pulled again only once
            // its hand-over is done, so that two pulls of it never overlap.
            let mut releasing: tokio::task::JoinSet<u16> = tokio::task::JoinSet::new();
            let mut released: std::collections::BTreeSet<u16> = Default::default();
            loop {
                let wanted = owned.borrow_and_update().clone();
                for &p in &wanted {
                    if released.contains(&p) || pulling.contains_key(&p) {
                        continue;
                    }
                    let (stop_pulling, stopped) = watch::channel(false);
                    let partition = Partition {
                        number: p,
                        js: js.clone(),
                        stream: stream.clone(),
                        consumer: consumers[p as usize].clone(),
                        config: configs[p as usize].clone(),
                        releasing: Arc::default(),
                        // Each pull of a partition counts its own deliveries.
                        in_flight: Arc::default(),
                        patience,
                        keepalive,
                        unpartitioned: std::mem::take(&mut waiting_unpartitioned[p as usize]).then(
                            || Unpartitioned {
                                consumer: consumers[0].clone(),
                                until: unpartitioned_until,
                            },
                        ),
                        state: state.clone(),
                        single_acked,
                    };
                    let in_flight = partition.in_flight.clone();
                    let releasing = partition.releasing.clone();
                    let task = tokio::spawn(pull_partition(partition, sink.clone(), stopped));
                    pulling.insert(p, (stop_pulling, releasing, task));
                    in_flights.insert(p, in_flight);
                }
                let lost: Vec<u16> = pulling
                    .keys()
                    .filter(|p| !wanted.contains(p))
                    .copied()
                    .collect();
                for p in lost {
                    let (stop_pulling, handed_over, task) = pulling.remove(&p).expect("listed");
                    handed_over.store(true, Ordering::SeqCst);
                    let _ = stop_pulling.send(true);
                    released.insert(p);
                    releasing.spawn(release(
                        p,
                        task,
                        in_flights.remove(&p).expect("counted"),
                        patience,
                        stop.clone(),
                        state.clone(),
                    ));
                }
                let step = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    changed = owned.changed() => changed.is_ok(),
                    Some(done) = releasing.join_next() => {
                        if let Ok(p) = done {
                            released.remove(&p);
                        }
                        true
                    }
                };
                if !step {
                    // Membership ended: keep pulling what this replica has
                    // until stopped.
                    let _ = stop.wait_for(|s| *s).await;
                    break;
                }
            }
            for (stop_pulling, ..) in pulling.values() {
                let _ = stop_pulling.send(true);
            }
            let mut last_pins = Vec::new();
            for (p, (.., task)) in pulling {
                match task.await {
                    Ok(end) => {
                        // Given back with everything else unhandled, in bus
                        // order, once the pulls have expired.
                        send_all(&sink, end.held).await;
                        last_pins.push((p, end.pin));
                    }
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "the partition's pull failed")
                    }
                }
            }
            // Hand-overs in progress have unpinned their partition and given
            // back what they held; the stop cuts their wait short.
            while releasing.join_next().await.is_some() {}
            *pulled.lock().expect("not poisoned") = last_pins;
        });
        Ok(rx)
    }

    /// Publishes events as binary-mode CloudEvents when `yes`.
    pub fn publishing_cloudevents(mut self, yes: bool) -> Self {
        self.emitter = self.emitter.with_cloudevents(yes);
        self
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
        let config = pull::Config {
            durable_name: Some(CONSUMER.to_string()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            filter_subject: format!("{}.events.>", self.prefix),
            ..Default::default()
        };
        let start = marks::single_start(&stream, self.marks.as_ref()).await?;
        let config = after_replicas::starting(config, &start);
        let handled = start.handled;
        let consumer = consumer_as_configured(&stream, CONSUMER, config.clone()).await?;
        let batch = capacity.clamp(1, 1024);
        let info = consumer.cached_info();
        let messages = Puller::start(
            &self.js,
            &info.stream_name,
            &info.name,
            pull_settings(batch, None),
        )
        .await
        .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sink = Sink {
            tx,
            prefix: self.prefix.clone(),
            batch,
        };
        let pull_stopped = self.pull_stopped.clone();
        let js = self.js.clone();
        if let Some(marks) = self.marks.clone() {
            tokio::spawn(marks.keep(stream.clone(), CONSUMER.to_string(), stop.clone()));
        }
        let marks = self.marks.clone();
        tokio::spawn(async move {
            // Marks the time the pull ends, on every way out, after the
            // stream (and its subscription) is gone.
            let _ended = PullEnded(pull_stopped);
            pull_single((js, stream, config, marks), messages, sink, stop, handled).await;
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
            .map_err(|e| BusError::Unavailable(format!("flushing the NATS connection: {e}")))?;
        // The last acks are sent: where the single consumer got to.
        if let (Some(marks), None) = (&self.marks, &self.partitions)
            && let Ok(stream) = self.events_stream().await
        {
            marks.keep_last(&stream, CONSUMER).await;
        }
        Ok(())
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
        let stream = match self.events_stream().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "releasing this replica's partitions failed; their pins time out instead");
                return;
            }
        };
        for (p, pin) in pulled {
            unpin_if_held(&stream, p, pin.as_deref()).await;
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
