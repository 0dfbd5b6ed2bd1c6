//! A running dispatcher: store, chains, bus, the consume loop and the API.
//!
//! The consume loop takes deliveries off the bus and hands each to a worker
//! chosen by (account, conversation): one worker handles its events one at a
//! time, so events of a conversation are handled in order while different
//! conversations run concurrently, up to `limits.concurrency`.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchboard_handlers::ports::CommandPort;
use switchboard_handlers::sms::SmsProvider;
use switchboard_handlers::{Registry, ScriptRuntime, ScriptStore, Services};
use switchboard_rules::{ChainStore, Format, parse_chain_file, validate};
use switchboard_sdk::{AccountKey, ConversationKey, VumiApiEvent};
use switchboard_store::{Change, Collection, Store};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::api::{ApiState, router};
use crate::auth::{Auth, TokenStore};
use crate::bus::partitions::Membership;
use crate::bus::{Bus, BusError, Delivery, EmbeddedBus, NatsBus, Published};
use crate::config::Config;
use crate::executor::{Disposition, Executor, ExecutorParts, Letters};
use crate::inbound::Inbound;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::outbound::{LettreMail, NatsCommands, NoCommands, OutboundPolicy, ReqwestHttp};
use crate::ratelimit::RateLimiter;
use crate::state::RecordPorts;
use crate::trace::Traces;

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be opened.
    #[error(transparent)]
    Store(#[from] switchboard_store::StoreError),
    /// The stored chains could not be loaded.
    #[error(transparent)]
    Chains(#[from] switchboard_rules::ChainStoreError),
    /// A record (the demo's secret) could not be written.
    #[error(transparent)]
    Records(#[from] switchboard_handlers::records::RecordError),
    /// A chain file given at start-up is bad.
    #[error("{0}")]
    ChainFile(String),
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
    /// The bus could not be reached or set up.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The API could not listen.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A chain file applied at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFile {
    /// The file.
    pub path: PathBuf,
    /// The account.
    pub account: String,
    /// The version now current; `None` when the stored chains already equalled the file.
    pub version: Option<u64>,
}

/// A running dispatcher.
#[derive(Debug)]
pub struct Dispatcher {
    bus: Arc<dyn Bus>,
    traces: Traces,
    store: Store,
    local_addr: SocketAddr,
    applied: Vec<AppliedFile>,
    admin_token_file: Option<PathBuf>,
    stop: watch::Sender<bool>,
    consumer: JoinHandle<()>,
    /// This replica among those sharing the bus.
    membership: Option<Membership>,
    server: JoinHandle<()>,
}

impl Dispatcher {
    /// Starts a dispatcher: opens the store, applies the chain files in
    /// `chains_dir` (if given), connects the bus, starts consuming and serving.
    pub async fn start(config: Config, chains_dir: Option<&Path>) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.store.data_dir).map_err(|e| {
            StartError::ChainFile(format!(
                "creating data directory {}: {e}",
                config.store.data_dir.display()
            ))
        })?;
        let (admin_token, admin_token_file) = match &config.http.admin_token {
            Some(token) => (token.clone(), None),
            None if config.bus.replicated => {
                return Err(StartError::Config(
                    "bus.replicated: set http.admin_token (or SWITCHBOARD_ADMIN_TOKEN), the same \
                     for every replica, so that each accepts it"
                        .into(),
                ));
            }
            None => {
                let (token, path, created) = crate::auth::admin_token_file(&config.store.data_dir)
                    .map_err(StartError::Config)?;
                if created {
                    tracing::info!(path = %path.display(), "no admin token configured: generated one into this file (mode 0600)");
                } else {
                    tracing::info!(path = %path.display(), "using the admin token in this file");
                }
                (token, Some(path))
            }
        };
        let prefix = config.bus.subject_prefix.clone();
        // The partitions of the bus this replica owns (replicas only).
        let (owned_tx, owned) = watch::channel(Vec::new());
        let (store, bus, commands): (Store, Arc<dyn Bus>, Arc<dyn CommandPort>) = match &config
            .bus
            .nats_url
        {
            Some(url) => {
                let bus = NatsBus::connect(
                    url,
                    &prefix,
                    config.limits.max_event_bytes,
                    // Unacked messages out at once: those being handled
                    // and those waiting on the server for a retry
                    // (nakked with a delay). Generous, so that one
                    // account's failing receiver cannot hold up the
                    // others; what this process buffers is bounded by
                    // the pull batch instead.
                    (config.limits.concurrency * 4).max(1024),
                    Duration::from_secs(config.bus.ack_wait_secs),
                    config.bus.stream_replicas,
                    config.bus.replicated,
                )
                .await?;
                let commands =
                    NatsCommands::new(bus.client().clone(), &prefix, config.bus.stream_replicas)
                        .await
                        .map_err(|e| StartError::Bus(BusError::Unavailable(e)))?;
                let bus = if config.bus.replicated {
                    bus.with_partitions(owned.clone())
                } else {
                    bus
                };
                let store = if config.bus.replicated {
                    let (options, servers) = switchboard_sdk::nats::connect_options(url);
                    Store::replicated(
                        &config.store.data_dir.join("replica"),
                        options.name("switchboard-dispatcher-state"),
                        servers.urls().to_vec(),
                        config.bus.stream_replicas,
                    )
                    .await?
                } else {
                    Store::open(&config.store.data_dir.join("store"))?
                };
                (store, Arc::new(bus), Arc::new(commands))
            }
            None => {
                let store = Store::open(&config.store.data_dir.join("store"))?;
                let bus = EmbeddedBus::open(store.clone(), &prefix)?;
                (store, Arc::new(bus), Arc::new(NoCommands))
            }
        };
        let auth = Arc::new(Auth::new(&admin_token, TokenStore::new(store.clone())));
        let metrics = Arc::new(Metrics::default());
        let mail = LettreMail::new(&config.providers.email, metrics.clone())
            .map_err(StartError::Config)?;
        let records = RecordPorts::over(&store);
        let scripts = Arc::new(ScriptStore::new(
            records.scripts.clone(),
            Arc::new(ScriptRuntime::new(
                config.rhai.clone(),
                Some(records.contacts.clone()),
            )),
        ));
        let registry = Arc::new(
            Registry::with_services(Services {
                contacts: records.contacts.clone(),
                messages: records.messages.clone(),
                secrets: records.secrets.clone(),
                http: Arc::new(ReqwestHttp::new(
                    OutboundPolicy::new(&config.outbound).map_err(StartError::Config)?,
                    metrics.clone(),
                )),
                email_providers: mail.names(),
                mail: Arc::new(mail),
                commands,
                sms_providers: config.providers.sms.clone(),
            })
            .with_scripts(scripts),
        );
        let chains = Arc::new(ChainStore::open(store.clone())?);
        let journal = Journal::new(store.clone());
        let traces = Traces::new(journal.clone(), config.delivery.trace_retention);
        let executor = Arc::new(Executor::new(ExecutorParts {
            chains: chains.clone(),
            registry: registry.clone(),
            bus: bus.clone(),
            store: store.clone(),
            idempotency: records.idempotency.clone(),
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            prefix: prefix.clone(),
        }));

        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.http.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.http.listen,
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let public_url = config
            .http
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{local_addr}"));
        let twilio = config
            .providers
            .sms
            .values()
            .filter_map(|p| match p {
                SmsProvider::Twilio(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let ready = Arc::new(AtomicBool::new(false));
        let app = router(ApiState {
            partitions: config.bus.replicated.then(|| owned.clone()),
            ready: ready.clone(),
            chains: chains.clone(),
            registry: registry.clone(),
            bus: bus.clone(),
            store: store.clone(),
            traces: traces.clone(),
            letters: Letters::new(store.clone(), bus.clone()),
            metrics: metrics.clone(),
            max_event_bytes: config.limits.max_event_bytes,
            prefix: prefix.clone(),
            contacts: records.contacts.clone(),
            messages: records.messages.clone(),
            secrets: records.secrets.clone(),
            auth,
            ingest_limit: Arc::new(RateLimiter::new(
                config.limits.ingest_rate,
                config
                    .limits
                    .ingest_burst
                    .unwrap_or(config.limits.ingest_rate),
            )),
            inbound: Arc::new(Inbound::new(
                store.clone(),
                &records,
                bus.clone(),
                metrics.clone(),
                &public_url,
                twilio,
                config.limits.max_event_bytes,
            )),
        });
        let mut server_stop = stopped.clone();
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = server_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });

        // The API answers (`/readyz` says not ready) while a replica catches
        // up with the shared state and the chain files are applied.
        let rest = async {
            follow_replicas(&store, &chains, &registry).await?;
            migrate_journal(&store).await?;
            let membership = if config.bus.replicated {
                Some(Membership::join(store.clone(), owned_tx)?)
            } else {
                None
            };
            let applied = match chains_dir {
                Some(dir) => apply_chain_dir(&chains, &registry, dir)?,
                None => Vec::new(),
            };
            let deliveries = bus
                .consume(config.limits.concurrency, stopped.clone())
                .await?;
            Ok::<_, StartError>((applied, deliveries, membership))
        };
        let (applied, deliveries, membership) = match rest.await {
            Ok(started) => started,
            Err(e) => {
                let _ = stop.send(true);
                let _ = server.await;
                return Err(e);
            }
        };
        let consumer = tokio::spawn(consume(
            executor,
            bus.clone(),
            deliveries,
            config.limits.concurrency,
            bus.ack_wait().map(|w| w / 3),
            config.delivery.shutdown_grace,
            stopped,
        ));
        spawn_expiry(
            journal,
            config
                .delivery
                .journal_retention
                .max(config.delivery.trace_retention),
        );
        ready.store(true, Ordering::SeqCst);
        tracing::info!(bus = bus.kind(), api = %local_addr, replicated = store.is_replicated(), "dispatcher started");
        Ok(Self {
            bus,
            traces,
            store,
            local_addr,
            applied,
            admin_token_file,
            stop,
            consumer,
            membership,
            server,
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The chain files applied at start-up.
    pub fn applied(&self) -> &[AppliedFile] {
        &self.applied
    }

    /// The file the admin token was read from or generated into; `None`
    /// when the configuration gave the token.
    pub fn admin_token_file(&self) -> Option<&Path> {
        self.admin_token_file.as_deref()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Event traces.
    pub fn traces(&self) -> &Traces {
        &self.traces
    }

    /// Publishes an event on the dispatcher's bus.
    pub async fn publish(&self, event: &VumiApiEvent) -> Result<Published, BusError> {
        self.bus.publish(event).await
    }

    /// Stops pulling, lets in-flight events finish, flushes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.consumer.await;
        if let Some(membership) = self.membership {
            membership.leave().await;
        }
        // The acks and naks of the last events must leave before we do.
        if let Err(e) = self.bus.flush().await {
            tracing::warn!(error = %e, "the last acks may be lost; those events will be delivered again");
        }
        let _ = self.server.await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "flushing the store at shutdown failed");
        }
        tracing::info!("dispatcher stopped");
    }
}

/// Converts the journal records and traces an earlier release kept into
/// the journal's appended records (once; later starts find nothing to do).
async fn migrate_journal(store: &Store) -> Result<(), StartError> {
    let copy = store.clone();
    let migrated = tokio::task::spawn_blocking(move || crate::journal::legacy::migrate(&copy))
        .await
        .map_err(|e| StartError::Config(format!("converting the journal panicked: {e}")))??;
    if migrated.records > 0 || migrated.orphans > 0 {
        tracing::info!(
            records = migrated.records,
            dropped = migrated.orphans,
            "converted the journal and traces of the earlier release (journal records without a \
             trace, from passes cut short, were dropped)"
        );
    }
    Ok(())
}

/// Expires old journal records (and with them their traces) now and
/// then, for as long as the process runs. A sweep reads the whole journal,
/// so it runs an eighth of the retention apart (at most every six hours):
/// a record goes between one and one and an eighth retentions after its
/// event was taken up.
fn spawn_expiry(journal: Journal, retention: Duration) {
    let every = (retention / 8).clamp(Duration::from_secs(10), Duration::from_secs(6 * 3600));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let journal = journal.clone();
            match tokio::task::spawn_blocking(move || journal.expire(retention)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::debug!(removed = n, "expired journal records"),
                Ok(Err(e)) => tracing::warn!(error = %e, "expiring journal records failed"),
                Err(e) => tracing::warn!(error = %e, "expiring journal records panicked"),
            }
        }
    });
}

/// Applies every `*.toml` and `*.json` file in `dir`, in name order. A file
/// whose chains equal the account's current chains makes no new version.
pub fn apply_chain_dir(
    chains: &ChainStore,
    registry: &Registry,
    dir: &Path,
) -> Result<Vec<AppliedFile>, StartError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        StartError::ChainFile(format!("reading chain directory {}: {e}", dir.display()))
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("toml" | "json")
            )
        })
        .collect();
    paths.sort();
    let mut applied = Vec::new();
    for path in paths {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| StartError::ChainFile(format!("reading {shown}: {e}")))?;
        let file = parse_chain_file(&text, Format::from_path(&shown), &shown)
            .map_err(|e| StartError::ChainFile(e.to_string()))?;
        let account = file.account_key.clone();
        let valid = validate(file, &account, registry)
            .map_err(|e| StartError::ChainFile(format!("{shown}: {e}")))?;
        let unchanged = chains
            .current(&account)?
            .is_some_and(|current| current.chains == valid.file().chains);
        let version = if unchanged {
            None
        } else {
            Some(chains.apply(valid)?.version)
        };
        applied.push(AppliedFile {
            path,
            account: account.to_string(),
            version,
        });
    }
    Ok(applied)
}

async fn consume(
    executor: Arc<Executor>,
    bus: Arc<dyn Bus>,
    mut deliveries: mpsc::Receiver<Delivery>,
    concurrency: usize,
    keepalive: Option<Duration>,
    grace: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let (settle, settling) = mpsc::channel(SETTLE_QUEUE);
    let settler = tokio::spawn(settle_batches(executor.clone(), settling));
    let mut workers = Vec::with_capacity(concurrency);
    let mut queues = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        // Small buffers: a delivery waiting here gets no progress reports, so
        // it must reach its worker well within the bus's ack wait.
        let (tx, rx) = mpsc::channel::<(VumiApiEvent, Delivery)>(2);
        queues.push(tx);
        workers.push(tokio::spawn(
            Worker {
                executor: executor.clone(),
                settle: settle.clone(),
                earlier: None,
                keepalive,
                grace,
                stopped: stopped.clone(),
                waiting: HashMap::new(),
            }
            .run(rx),
        ));
    }
    loop {
        let delivery = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => break,
            d = deliveries.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let first = delivery.attempt == 1;
        let event = match executor
            .decode(&delivery.subject, &delivery.payload, first)
            .await
        {
            Ok(event) => event,
            Err(disposition) => {
                // Poison: acked once its dead letter is durable.
                if let Err(unsent) = settle.send((delivery, disposition)).await {
                    let _ = unsent.0.0.nak(Duration::ZERO).await;
                }
                continue;
            }
        };
        let mut h = DefaultHasher::new();
        event.account_key.hash(&mut h);
        event.conversation_key.hash(&mut h);
        let shard = (h.finish() % concurrency as u64) as usize;
        if queues[shard].send((event, delivery)).await.is_err() {
            break;
        }
    }
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
    for w in workers {
        if let Ok(unhandled) = w.await {
            released.extend(unhandled);
        }
    }
    drop(settle);
    let _ = settler.await;
    released.sort_by_key(|d| d.seq);
    if !released.is_empty() {
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
/// disk sees one flush per batch, not per event.
async fn settle_batches(
    executor: Arc<Executor>,
    mut queue: mpsc::Receiver<(Delivery, Disposition)>,
) {
    let mut batch = Vec::with_capacity(SETTLE_QUEUE);
    while queue.recv_many(&mut batch, SETTLE_QUEUE).await > 0 {
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
        let durable = executor.make_durable().await;
        if let Err(e) = &durable {
            tracing::error!(error = %e, count = batch.len(),
                "flushing the store failed; these events will be handled again");
        }
        for (delivery, disposition) in batch.drain(..) {
            let result = match (disposition, &durable) {
                (Disposition::Ack, Ok(())) => delivery.ack().await,
                (Disposition::Ack, Err(_)) => delivery.nak(Duration::from_secs(1)).await,
                // A retry's attempt count is durable only once this flush
                // is: a crash before it (or a failed flush) gives the step
                // one more attempt than it should get.
                (Disposition::Retry(delay), _) => delivery.nak(delay).await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "settling a delivery failed; the bus delivers it again");
            }
        }
    }
}

/// In the replicated store: waits until this replica's copy of the shared
/// state is caught up, then keeps its in-memory chains and compiled scripts
/// in step with the changes other replicas make.
async fn follow_replicas(
    store: &Store,
    chains: &Arc<ChainStore>,
    registry: &Arc<Registry>,
) -> Result<(), StartError> {
    let Some(mut changes) = store.changes() else {
        return Ok(());
    };
    let started = Instant::now();
    tracing::info!("catching up with the shared state");
    store.caught_up().await;
    let refresh_all = |chains: &ChainStore,
                       registry: &Registry|
     -> Result<(), switchboard_rules::ChainStoreError> {
        chains.reload_all()?;
        if let Some(scripts) = registry.scripts() {
            scripts.forget_all();
        }
        Ok(())
    };
    refresh_all(chains, registry)?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        accounts = chains.accounts().len(),
        "caught up with the shared state"
    );
    let (chains, registry) = (chains.clone(), registry.clone());
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match changes.recv().await {
                Ok(change) => apply_change(&chains, &registry, &change),
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "too many shared-state changes at once: reloading every account's chains"
                    );
                    if let Err(e) = refresh_all(&chains, &registry) {
                        tracing::error!(error = %e, "reloading the chains failed");
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(())
}

/// Brings this replica's caches in step with one change another replica made.
fn apply_change(chains: &ChainStore, registry: &Registry, change: &Change) {
    let mut parts = change.key.split(|b| *b == 0);
    let account = parts
        .next()
        .and_then(|a| std::str::from_utf8(a).ok())
        .and_then(|a| AccountKey::new(a).ok());
    let Some(account) = account else { return };
    match change.collection {
        Collection::Chains => match chains.reload(&account) {
            Ok(version) => tracing::info!(
                %account, ?version, delay_ms = change.delay.as_millis() as u64,
                "chains changed by another replica: now in use here"
            ),
            Err(e) => {
                tracing::error!(%account, error = %e, "reloading chains changed by another replica failed")
            }
        },
        Collection::Scripts => {
            if let (Some(scripts), Some(name)) = (
                registry.scripts(),
                parts.next().and_then(|n| std::str::from_utf8(n).ok()),
            ) {
                scripts.forget(&account, name);
                tracing::info!(%account, script = name, delay_ms = change.delay.as_millis() as u64,
                    "script changed by another replica: the next use compiles it");
            }
        }
        _ => {}
    }
}

/// How long past its due time a conversation waits for the event it is held
/// for before deciding that event went elsewhere (another replica took it).
const HEAD_LOST_AFTER: Duration = Duration::from_secs(30);

/// How much later than the event it waits for a held delivery comes back.
const HELD_MARGIN: Duration = Duration::from_millis(50);

/// A conversation whose event `head` went back to the bus for a retry: its
/// later events are held (nakked) until `head` is done, and then handled in
/// bus order.
#[derive(Debug)]
struct Held {
    /// The bus position of the event the conversation waits for.
    head: u64,
    /// When that event is due back.
    due: tokio::time::Instant,
    /// Later events of the conversation, sent back to wait.
    later: BTreeSet<u64>,
}

/// One worker: handles the events of the conversations hashed to it, one at
/// a time, in bus order, also across retries.
struct Worker {
    executor: Arc<Executor>,
    /// Where handled deliveries go to be acked or nakked.
    settle: mpsc::Sender<(Delivery, Disposition)>,
    /// This worker's last outside effect whose record may not be durable
    /// yet (see [`Executor::handle`]).
    earlier: Option<switchboard_store::WriteMark>,
    keepalive: Option<Duration>,
    grace: Duration,
    stopped: watch::Receiver<bool>,
    waiting: HashMap<(AccountKey, ConversationKey), Held>,
}

impl Worker {
    /// Handles what arrives until the queue closes; returns the deliveries
    /// left unhandled by a shutdown, to be given back to the bus.
    async fn run(mut self, mut queue: mpsc::Receiver<(VumiApiEvent, Delivery)>) -> Vec<Delivery> {
        let mut unhandled = Vec::new();
        while let Some((event, delivery)) = queue.recv().await {
            if *self.stopped.borrow() {
                unhandled.push(delivery);
                continue;
            }
            let conversation = (event.account_key.clone(), event.conversation_key.clone());
            if let Some(wait) = self.hold(&conversation, delivery.seq) {
                if let Err(e) = delivery.nak(wait).await {
                    tracing::warn!(event_id = %event.id, error = %e, "holding back a delivery failed");
                }
                continue;
            }
            let Some(disposition) = self.handle(&event, &delivery).await else {
                // The grace period ran out mid-handling: give it back.
                unhandled.push(delivery);
                continue;
            };
            match disposition {
                Disposition::Retry(delay) => {
                    let held = self.waiting.entry(conversation).or_insert_with(|| Held {
                        head: delivery.seq,
                        due: tokio::time::Instant::now(),
                        later: BTreeSet::new(),
                    });
                    held.head = delivery.seq;
                    held.due = tokio::time::Instant::now() + delay;
                }
                Disposition::Ack => {
                    self.done(&conversation, delivery.seq);
                }
            }
            if let Err(unsent) = self.settle.send((delivery, disposition)).await {
                // The settler is gone (it panicked): give the delivery back.
                unhandled.push(unsent.0.0);
            }
        }
        unhandled
    }

    /// Whether the delivery at `seq` must wait for an earlier event of its
    /// conversation, and for how long.
    fn hold(&mut self, conversation: &(AccountKey, ConversationKey), seq: u64) -> Option<Duration> {
        let held = self.waiting.get_mut(conversation)?;
        if seq <= held.head {
            return None;
        }
        let now = tokio::time::Instant::now();
        if now > held.due + HEAD_LOST_AFTER {
            tracing::warn!(account = %conversation.0, conversation = %conversation.1, seq = held.head,
                "the event this conversation waits for has not come back; going on without it");
            held.later.insert(seq);
            held.head = held.later.pop_first().expect("just inserted");
            held.due = now;
            return (held.head != seq).then_some(HELD_MARGIN);
        }
        held.later.insert(seq);
        Some(held.due.saturating_duration_since(now) + HELD_MARGIN)
    }

    /// The event at `seq` is done: its conversation moves on to the next
    /// held event, if any.
    fn done(&mut self, conversation: &(AccountKey, ConversationKey), seq: u64) {
        let Some(held) = self.waiting.get_mut(conversation) else {
            return;
        };
        held.later.remove(&seq);
        if seq != held.head {
            return;
        }
        match held.later.pop_first() {
            Some(next) => {
                held.head = next;
                held.due = tokio::time::Instant::now();
            }
            None => {
                self.waiting.remove(conversation);
            }
        }
    }

    /// Handles one event, reporting progress to the bus meanwhile. `None` when
    /// a shutdown's grace period ran out first.
    async fn handle(&mut self, event: &VumiApiEvent, delivery: &Delivery) -> Option<Disposition> {
        // Every log line of the event's handling carries its account and id.
        let span = tracing::info_span!("event", account = %event.account_key, event_id = %event.id);
        let handling = self
            .executor
            .handle(event, &mut self.earlier)
            .instrument(span);
        tokio::pin!(handling);
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

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn wait_for_shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
