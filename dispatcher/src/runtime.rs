//! A running dispatcher: store, chains, bus, the consume loop and the API.
//!
//! The consume loop takes deliveries off the bus and hands each to a worker
//! chosen by (account, conversation): one worker handles its events one at a
//! time, so events of a conversation are handled in order while different
//! conversations run concurrently, up to `limits.concurrency`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use switchboard_handlers::ports::CommandPort;
use switchboard_handlers::stores::{ContactStore, IdempotencyStore, MessageStore, SecretStore};
use switchboard_handlers::{Registry, ScriptRuntime, ScriptStore, Services};
use switchboard_rules::{ChainStore, Format, parse_chain_file, validate};
use switchboard_sdk::VumiApiEvent;
use switchboard_store::Store;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{ApiState, router};
use crate::bus::{Bus, BusError, Delivery, EmbeddedBus, NatsBus, Published};
use crate::config::Config;
use crate::executor::{Disposition, Executor};
use crate::metrics::Metrics;
use crate::outbound::{LettreMail, NatsCommands, NoCommands, ReqwestHttp};
use crate::records::{DeadLetters, Traces};

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be opened.
    #[error(transparent)]
    Store(#[from] switchboard_store::StoreError),
    /// The stored chains could not be loaded.
    #[error(transparent)]
    Chains(#[from] switchboard_rules::ChainStoreError),
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
    executor: Arc<Executor>,
    store: Store,
    local_addr: SocketAddr,
    applied: Vec<AppliedFile>,
    stop: watch::Sender<bool>,
    consumer: JoinHandle<()>,
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
        let store = Store::open(&config.store.data_dir.join("store"))?;
        let prefix = config.bus.subject_prefix.clone();
        let (bus, commands): (Arc<dyn Bus>, Arc<dyn CommandPort>) = match &config.bus.nats_url {
            Some(url) => {
                let bus = NatsBus::connect(
                    url,
                    &prefix,
                    config.limits.max_event_bytes,
                    // Never more in flight than the workers and their small queues hold.
                    config.limits.concurrency * 4,
                    Duration::from_secs(config.bus.ack_wait_secs),
                )
                .await?;
                let commands = NatsCommands::new(bus.client().clone(), &prefix)
                    .await
                    .map_err(|e| StartError::Bus(BusError::Unavailable(e)))?;
                (Arc::new(bus), Arc::new(commands))
            }
            None => (
                Arc::new(EmbeddedBus::open(store.clone(), &prefix)?),
                Arc::new(NoCommands),
            ),
        };
        let mail = LettreMail::new(&config.providers.email).map_err(StartError::Config)?;
        let scripts = Arc::new(ScriptStore::new(
            store.clone(),
            Arc::new(ScriptRuntime::new(
                config.rhai.clone(),
                Some(Arc::new(ContactStore::new(store.clone()))),
            )),
        ));
        let registry = Arc::new(
            Registry::with_services(Services {
                store: store.clone(),
                http: Arc::new(ReqwestHttp::new()),
                email_providers: mail.names(),
                mail: Arc::new(mail),
                commands,
                sms_providers: config.providers.sms.clone(),
            })
            .with_scripts(scripts),
        );
        let chains = Arc::new(ChainStore::open(store.clone())?);
        let applied = match chains_dir {
            Some(dir) => apply_chain_dir(&chains, &registry, dir)?,
            None => Vec::new(),
        };
        let executor = Arc::new(Executor {
            chains,
            registry,
            bus: bus.clone(),
            traces: Traces::new(store.clone()),
            dead_letters: DeadLetters::new(store.clone()),
            idempotency: IdempotencyStore::new(store.clone()),
            store: store.clone(),
            metrics: Arc::new(Metrics::default()),
            limits: config.limits.clone(),
            prefix,
        });

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
        let app = router(ApiState {
            executor: executor.clone(),
            contacts: ContactStore::new(store.clone()),
            messages: MessageStore::new(store.clone()),
            secrets: SecretStore::new(store.clone()),
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

        let deliveries = bus.consume(config.limits.concurrency).await?;
        let consumer = tokio::spawn(consume(
            executor.clone(),
            deliveries,
            config.limits.concurrency,
            bus.ack_wait().map(|w| w / 3),
            stopped,
        ));
        tracing::info!(bus = bus.kind(), api = %local_addr, "dispatcher started");
        Ok(Self {
            executor,
            store,
            local_addr,
            applied,
            stop,
            consumer,
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

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The executor (chains, traces, dead letters, metrics).
    pub fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// Publishes an event on the dispatcher's bus.
    pub async fn publish(&self, event: &VumiApiEvent) -> Result<Published, BusError> {
        self.executor.bus.publish(event).await
    }

    /// Stops pulling, lets in-flight events finish, flushes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.consumer.await;
        let _ = self.server.await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "flushing the store at shutdown failed");
        }
        tracing::info!("dispatcher stopped");
    }
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
    mut deliveries: mpsc::Receiver<Delivery>,
    concurrency: usize,
    keepalive: Option<Duration>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut workers = Vec::with_capacity(concurrency);
    let mut queues = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        // Small buffers: a delivery waiting here gets no progress reports, so
        // it must reach its worker well within the bus's ack wait.
        let (tx, rx) = mpsc::channel::<(VumiApiEvent, Delivery)>(2);
        queues.push(tx);
        workers.push(tokio::spawn(work(executor.clone(), rx, keepalive)));
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
        let Some(event) = executor.decode(&delivery.subject, &delivery.payload) else {
            // Acked once its dead letter is durable; otherwise delivered again.
            let settled = match executor.make_durable().await {
                Ok(()) => delivery.ack().await,
                Err(e) => {
                    tracing::error!(error = %e, "flushing a dead letter failed");
                    delivery.nak(Duration::from_secs(1)).await
                }
            };
            if let Err(e) = settled {
                tracing::warn!(error = %e, "settling a dead-lettered message failed");
            }
            continue;
        };
        let mut h = DefaultHasher::new();
        event.account_key.hash(&mut h);
        event.conversation_key.hash(&mut h);
        let shard = (h.finish() % concurrency as u64) as usize;
        if queues[shard].send((event, delivery)).await.is_err() {
            break;
        }
    }
    // Workers finish what is queued to them; deliveries not yet taken off the
    // bus are delivered again (after the ack wait on NATS, at restart embedded).
    drop(queues);
    for w in workers {
        let _ = w.await;
    }
}

async fn work(
    executor: Arc<Executor>,
    mut queue: mpsc::Receiver<(VumiApiEvent, Delivery)>,
    keepalive: Option<Duration>,
) {
    while let Some((event, delivery)) = queue.recv().await {
        let handling = executor.handle(&event);
        tokio::pin!(handling);
        // Tell the bus the event is still being worked on (a slow step, a
        // retry's wait), so it is not delivered to someone else meanwhile.
        let every = keepalive.unwrap_or(Duration::from_secs(3600));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let disposition = loop {
            tokio::select! {
                d = &mut handling => break d,
                _ = tick.tick(), if keepalive.is_some() => {
                    if let Err(e) = delivery.in_progress().await {
                        tracing::warn!(event_id = %event.id, error = %e, "reporting progress failed");
                    }
                }
            }
        };
        // The trace and any dead letter are made durable before the ack, so
        // a crash cannot lose what happened to an acked event.
        let result = match disposition {
            Disposition::Ack => match executor.make_durable().await {
                Ok(()) => delivery.ack().await,
                Err(e) => {
                    tracing::error!(event_id = %event.id, error = %e, "flushing the store failed; the event will be handled again");
                    delivery.nak(Duration::from_secs(1)).await
                }
            },
            Disposition::Retry(delay) => delivery.nak(delay).await,
        };
        if let Err(e) = result {
            tracing::warn!(event_id = %event.id, error = %e, "settling a delivery failed; it will be redelivered");
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
