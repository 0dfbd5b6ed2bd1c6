//! A running dispatcher: the backend (store and bus), the engine over it,
//! the API, and the consume loop, started in that order and stopped in the
//! reverse.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchboard_api::health::ReplicaView;
use switchboard_bus::partitions::Membership;
use switchboard_engine::bus::{Bus, BusError, Published};
use switchboard_engine::consume::consume;
use switchboard_engine::event_kinds::EventKinds;
use switchboard_engine::event_threads::EventThreads;
use switchboard_engine::executor::{Executor, ExecutorParts, Letters};
use switchboard_engine::journal::Journal;
use switchboard_engine::metrics::Metrics;
use switchboard_engine::tail::Tail;
use switchboard_engine::timers::Timers;
use switchboard_engine::trace::Traces;
use switchboard_handlers::message_template::{MessageTemplates, TemplateStore};
use switchboard_handlers::ports::CommandPort;
use switchboard_handlers::records::{Files, Secrets};
use switchboard_handlers::{Registry, ScriptRuntime, ScriptStore, Services};
use switchboard_http::api::{ApiState, router};
use switchboard_http::auth::{AdminToken, Auth, Principal, TokenStore};
use switchboard_http::console::session::Sessions;
use switchboard_http::inbound::{Inbound, InboundRecords, ProviderKeys};
use switchboard_http::ratelimit::RateLimiter;
use switchboard_http::unsubscribe::OneClick;
use switchboard_outbound::policy::OutboundPolicy;
use switchboard_outbound::{LettreMail, ReqwestHttp};
use switchboard_rules::{
    ChainStore, FROM_FILE, Format, parse_chain_file, validate_deferring_secrets,
};
use switchboard_sdk::{AccountKey, VumiApiEvent};
use switchboard_state::RecordPorts;
use switchboard_store::{Change, Collection, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::{self, Backend};
use crate::config::Config;

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
    /// Steps of its chains naming a secret the account has not set: their
    /// runs fail until it is (logged as warnings at start).
    pub unset_secrets: Vec<String>,
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
    /// The event path's own threads (`runtime.event_threads`; none when
    /// it runs on the shared runtime).
    event_threads: EventThreads,
    /// This replica among those sharing the bus.
    membership: Option<Membership>,
    server: JoinHandle<()>,
    /// The console's sessions (for sign-in links).
    sessions: Arc<Sessions>,
    /// The admin token's hash (sign-in links sign in as the admin).
    admin_credential: switchboard_http::auth::Credential,
}

impl Dispatcher {
    /// Starts a dispatcher: opens the backend (store and bus), builds the
    /// engine, serves the API, catches up with the other replicas (if any),
    /// applies the chain files in `chains_dir` (if given) and starts
    /// consuming.
    pub async fn start(config: Config, chains_dir: Option<&Path>) -> Result<Self, StartError> {
        Self::start_with_secrets(config, chains_dir, &[]).await
    }

    /// [`Dispatcher::start`], setting `secrets` (name, value) for every
    /// account a file in `chains_dir` is for before its chains are applied
    /// and consuming starts: the demo's peers check signatures with them.
    pub async fn start_with_secrets(
        config: Config,
        chains_dir: Option<&Path>,
        secrets: &[(&str, &str)],
    ) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.store.data_dir).map_err(|e| {
            StartError::ChainFile(format!(
                "creating data directory {}: {e}",
                config.store.data_dir.display()
            ))
        })?;
        let (admin_token, admin_token_file) = admin_token(&config)?;
        let admin_credential = switchboard_http::auth::credential(admin_token.expose());
        let Backend {
            store,
            bus,
            commands,
            files,
            vumi_inbound,
            replicas,
        } = backend::open(&config).await?;
        let (stop, stopped) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(false));
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
        let public_url = config
            .http
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{local_addr}"));
        if !config.providers.email.is_empty() && !public_url.starts_with("https://") {
            tracing::warn!(%public_url, "e-mails' one-click unsubscribe links (List-Unsubscribe) point at this URL, \
                which is not https: mail clients offer one-click unsubscribe only for https links; set \
                http.public_url to the https address they reach this dispatcher at");
        }
        let engine = Engine::build(
            &config,
            (&store, &bus),
            (commands, files),
            &public_url,
            stopped.clone(),
        )?;
        let wanted = config.runtime.event_threads();
        let event_threads = EventThreads::start(wanted).map_err(|e| {
            StartError::Config(format!(
                "starting {wanted} event threads (runtime.event_threads): {e}"
            ))
        })?;
        let spawner = event_threads.spawner();
        let state = engine.api_state(
            &config,
            spawner.threads(),
            (&store, &bus),
            admin_token,
            &public_url,
            replicas.as_ref().map(|r| (r.owned(), r.viewed())),
            ready.clone(),
        );
        if let Some(vumi) = vumi_inbound {
            spawn_vumi_replies(vumi, state.inbound.clone(), stopped.clone());
        }
        let sessions = state.sessions.clone();
        let app = router(state);
        let server = crate::serve::serve(listener, app, (&config.http).into(), stopped.clone());

        // The API answers (`/readyz` says not ready) while a replica catches
        // up with the shared state and the chain files are applied.
        let rest = async {
            follow_replicas(&store, &engine.chains, &engine.registry).await?;
            migrate_journal(&store).await?;
            upgrade_event_kinds(&store).await;
            let membership = match replicas {
                Some(replicas) => Some(replicas.join(store.clone())?),
                None => None,
            };
            let applied = match chains_dir {
                Some(dir) => apply_chain_dir(
                    &engine.chains,
                    &engine.registry,
                    dir,
                    (engine.records.secrets.as_ref(), secrets),
                )?,
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
        let stopped_for_sampling = stopped.clone();
        tokio::spawn(engine.timers.clone().run(stopped.clone()));
        let keepalive = bus.ack_wait().map(|w| w / 3);
        if spawner.threads() > 0
            && let Some(every) = keepalive
            && config.rhai.timeout >= every
        {
            tracing::warn!(
                timeout = ?config.rhai.timeout,
                progress_every = ?every,
                "rhai.timeout lets one script call hold an event thread past the progress \
                 reports of the events waiting there, which the bus may then deliver again; \
                 keep rhai.timeout under a third of bus.ack_wait_secs, or set \
                 runtime.event_threads = 0"
            );
        }
        let consumer = spawner.spawn(
            0,
            consume(
                engine.executor,
                bus.clone(),
                deliveries,
                config.limits.concurrency,
                keepalive,
                config.delivery.shutdown_grace,
                EventKinds::new(store.clone()),
                spawner.clone(),
                stopped,
            ),
        );
        spawn_sampling(engine.metrics.clone(), stopped_for_sampling);
        spawn_message_expiry(engine.records.messages.clone(), config.messages.retention);
        spawn_inbox_expiry(engine.records.inbox.clone(), config.inbox);
        spawn_unmatched_expiry(
            switchboard_http::inbound::UnmatchedStore::new(store.clone()),
            config.messages.retention,
        );
        spawn_expiry(
            Swept {
                journal: engine.journal,
                keys: engine.records.idempotency.clone(),
                store: store.clone(),
                chains: engine.chains.clone(),
                timers: engine.timers.clone(),
            },
            config
                .delivery
                .journal_retention
                .max(config.delivery.trace_retention),
        );
        ready.store(true, Ordering::SeqCst);
        tracing::info!(bus = bus.kind(), api = %local_addr, replicated = store.is_replicated(), "dispatcher started");
        Ok(Self {
            bus,
            traces: engine.traces,
            store,
            local_addr,
            applied,
            admin_token_file,
            stop,
            consumer,
            event_threads,
            membership,
            server,
            sessions,
            admin_credential,
        })
    }

    /// A link that signs a browser into the console as the admin, once,
    /// within ten minutes.
    pub fn console_sign_in_link(&self) -> String {
        format!(
            "http://{}/console/sign-in/{}",
            self.local_addr,
            self.sessions
                .sign_in_link(Principal::Admin, self.admin_credential)
        )
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
        self.event_threads.stop().await;
        // Requests still being answered finish (or are cut short) while
        // this replica still holds its partitions and before the bus's
        // last flush: what they publish leaves with it.
        let _ = self.server.await;
        if let Some(membership) = self.membership {
            membership.leave().await;
        }
        // The acks and naks of the last events must leave before we do.
        if let Err(e) = self.bus.flush().await {
            tracing::warn!(error = %e, "the last acks may be lost; those events will be delivered again");
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "flushing the store at shutdown failed");
        }
        tracing::info!("dispatcher stopped");
    }
}

/// The admin token: the configured one, or (one dispatcher alone) the one
/// generated into the data directory at the first start; and that file.
fn admin_token(config: &Config) -> Result<(AdminToken, Option<PathBuf>), StartError> {
    match &config.http.admin_token {
        Some(token) => Ok((token.clone(), None)),
        None if config.bus.replicated => Err(StartError::Config(
            "bus.replicated: set http.admin_token (or SWITCHBOARD_ADMIN_TOKEN), the same \
             for every replica, so that each accepts it"
                .into(),
        )),
        None => {
            let (token, path, created) =
                switchboard_http::auth::admin_token_file(&config.store.data_dir)
                    .map_err(StartError::Config)?;
            if created {
                tracing::info!(path = %path.display(), "no admin token configured: generated one into this file (mode 0600)");
            } else {
                tracing::info!(path = %path.display(), "using the admin token in this file");
            }
            Ok((token, Some(path)))
        }
    }
}

/// The engine and what it is made of: the records, the handlers, the
/// chains, the journal.
struct Engine {
    metrics: Arc<Metrics>,
    /// The records as the API and inbound webhooks write them (forwarded
    /// to a partition's owner when replicas share the bus); the handlers
    /// have their own, over the store for handling events.
    records: RecordPorts,
    /// The one-click unsubscribe links e-mails carry.
    unsubscribe: Arc<OneClick>,
    /// The files accounts attach to their e-mails.
    files: Arc<dyn Files>,
    registry: Arc<Registry>,
    chains: Arc<ChainStore>,
    journal: Journal,
    traces: Traces,
    executor: Arc<Executor>,
    /// Each pass over an event, for whoever watches.
    tail: Tail,
    /// What brings paused chains' events back.
    timers: Timers,
    /// What the providers prove their inbound posts with.
    inbound_keys: ProviderKeys,
}

impl Engine {
    fn build(
        config: &Config,
        (store, bus): (&Store, &Arc<dyn Bus>),
        (commands, files): (Arc<dyn CommandPort>, Arc<dyn Files>),
        public_url: &str,
        stopped: watch::Receiver<bool>,
    ) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new(config.metrics.accounts.labels()));
        let mail = LettreMail::new(&config.providers.email, metrics.clone())
            .map_err(StartError::Config)?;
        // An event's handling writes only the partitions this replica holds.
        let event_store = store.handling_events();
        let records = RecordPorts::over(&event_store)
            .inbox_capped(&event_store, config.inbox.max_per_receiver);
        // The API's records (see `Engine::records`), which links change.
        let api_records = RecordPorts::over(store);
        let unsubscribe = Arc::new(OneClick::new(
            public_url,
            store.clone(),
            api_records.preferences.clone(),
            api_records.messages.clone(),
        ));
        let scripts = Arc::new(ScriptStore::scripts(
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
                templates: Some(Arc::new(TemplateStore::new(
                    records.templates.clone(),
                    MessageTemplates,
                ))),
                idempotency: records.idempotency.clone(),
                preferences: records.preferences.clone(),
                unsubscribe: Some(unsubscribe.clone()),
                message_body_cap: config.messages.max_body_bytes,
                files: files.clone(),
                inbox: records.inbox.clone(),
            })
            .with_scripts(scripts),
        );
        let chains = Arc::new(ChainStore::open(store.clone())?);
        let journal = Journal::new(store.clone());
        let traces = Traces::new(journal.clone(), config.delivery.trace_retention);
        let tail = Tail::new(stopped);
        let timers = Timers::new(store.clone(), bus.clone(), metrics.clone());
        let executor = Arc::new(Executor::new(ExecutorParts {
            chains: chains.clone(),
            registry: registry.clone(),
            bus: bus.clone(),
            store: event_store,
            idempotency: records.idempotency.clone(),
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            prefix: config.bus.subject_prefix.clone(),
            tail: tail.clone(),
            timers: timers.clone(),
        }));
        let inbound_keys = config
            .providers
            .inbound_keys()
            .map_err(StartError::Config)?;
        Ok(Self {
            tail,
            timers,
            inbound_keys,
            metrics,
            records: api_records,
            unsubscribe,
            files,
            registry,
            chains,
            journal,
            traces,
            executor,
        })
    }

    /// What the API's handlers are handed.
    #[allow(clippy::too_many_arguments)]
    fn api_state(
        &self,
        config: &Config,
        event_threads: usize,
        (store, bus): (&Store, &Arc<dyn Bus>),
        admin_token: AdminToken,
        public_url: &str,
        replicas: Option<(watch::Receiver<Vec<u16>>, watch::Receiver<ReplicaView>)>,
        ready: Arc<AtomicBool>,
    ) -> ApiState {
        let limits = &config.limits;
        let (partitions, replicas) = replicas.unzip();
        ApiState {
            partitions,
            replicas,
            ready,
            chains: self.chains.clone(),
            registry: self.registry.clone(),
            bus: bus.clone(),
            store: store.clone(),
            traces: self.traces.clone(),
            event_kinds: EventKinds::new(store.clone()),
            tail: self.tail.clone(),
            letters: Letters::new(store.clone(), bus.clone()),
            timers: self.timers.clone(),
            metrics: self.metrics.clone(),
            event_threads,
            max_event_bytes: limits.max_event_bytes,
            max_depth: limits.max_depth,
            prefix: config.bus.subject_prefix.clone(),
            contacts: self.records.contacts.clone(),
            messages: self.records.messages.clone(),
            idempotency: self.records.idempotency.clone(),
            secrets: self.records.secrets.clone(),
            preferences: self.records.preferences.clone(),
            inbox: self.records.inbox.clone(),
            inbox_feed: switchboard_http::inbox_feed::InboxFeed::new(
                store.clone(),
                config.inbox.max_streams_per_receiver,
            ),
            unsubscribe: self.unsubscribe.clone(),
            files: self.files.clone(),
            file_policy: config.files.clone(),
            auth: Arc::new(Auth::new(
                &admin_token,
                TokenStore::new(store.clone()),
                switchboard_http::receiver_tokens::ReceiverTokens::new(store.clone()),
            )),
            ingest_limit: Arc::new(RateLimiter::new(
                limits.ingest_rate,
                limits.ingest_burst.unwrap_or(limits.ingest_rate),
            )),
            sessions: Arc::new(
                Sessions::new(store.clone()).secure(public_url.starts_with("https://")),
            ),
            config_writes: Arc::default(),
            inbound: Arc::new(Inbound::new(
                store.clone(),
                InboundRecords {
                    messages: self.records.messages.clone(),
                    secrets: self.records.secrets.clone(),
                    preferences: self.records.preferences.clone(),
                    contacts: self.records.contacts.clone(),
                    files: self.files.clone(),
                    file_policy: config.files.clone(),
                    idempotency: self.records.idempotency.clone(),
                },
                bus.clone(),
                self.metrics.clone(),
                public_url,
                self.inbound_keys.clone(),
                limits.max_event_bytes,
            )),
        }
    }
}

/// Samples the event totals once a minute (the health page's last hour).
fn spawn_sampling(metrics: Arc<Metrics>, mut stopped: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                _ = every.tick() => metrics.sample(),
            }
        }
    });
}

/// Converts the journal records and traces an earlier release kept into
/// the journal's appended records (once; later starts find nothing to do).
async fn migrate_journal(store: &Store) -> Result<(), StartError> {
    let copy = store.clone();
    let migrated =
        tokio::task::spawn_blocking(move || switchboard_engine::journal::legacy::migrate(&copy))
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

/// Brings the event kinds an earlier release kept (one record per kind)
/// into one record per account. They are for display only: a failure is
/// logged, and the console lists kinds again as events come.
async fn upgrade_event_kinds(store: &Store) {
    let kinds = EventKinds::new(store.clone());
    match tokio::task::spawn_blocking(move || kinds.upgrade()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(moved)) => {
            tracing::info!(
                moved,
                "brought the event kinds of the earlier release into one record per account"
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the event kinds of the earlier release could not be brought over");
        }
        Err(e) => tracing::warn!(error = %e, "bringing the event kinds over panicked"),
    }
}

/// What the expiry sweeps go over.
struct Swept {
    journal: Journal,
    keys: Arc<dyn switchboard_handlers::records::IdempotencyKeys>,
    store: Store,
    chains: Arc<ChainStore>,
    timers: Timers,
}

/// Expires old journal records (and with them their traces), step
/// idempotency keys past their window, and `rate_limit` and `throttle`
/// states whose turns are all past their period (as the chains have it
/// now; all of them when the chain or its control is gone), and brings
/// back the openers of digest windows whose chain was removed (so that
/// those windows go), now and then, for as long as the process runs,
/// first as it starts. A sweep reads the whole journal, so it runs an
/// eighth of the retention apart (at most every six hours): a record goes
/// between one and one and an eighth retentions after its event was taken
/// up. (A key past its window no longer holds its step back whether or not
/// it is swept yet: the sweep only frees its space.)
fn spawn_expiry(swept: Swept, retention: Duration) {
    let every = (retention / 8).clamp(Duration::from_secs(10), Duration::from_secs(6 * 3600));
    let swept = Arc::new(swept);
    spawn_every(every, move || {
        let swept = Arc::clone(&swept);
        async move {
            let journal = swept.journal.clone();
            sweep("expiring journal records", move || {
                journal.expire(retention)
            })
            .await;
            let keys = swept.keys.clone();
            let now = switchboard_sdk::now().unix_timestamp();
            sweep("expiring idempotency keys", move || keys.expire(now)).await;
            let (store, chains) = (swept.store.clone(), swept.chains.clone());
            let now = switchboard_engine::journal::now_ms();
            sweep("removing quiet flow control states", move || {
                switchboard_engine::executor::expire_flow_states(&store, now, &chains)
            })
            .await;
            let (store, chains, timers) = (
                swept.store.clone(),
                swept.chains.clone(),
                swept.timers.clone(),
            );
            sweep(
                "waking the openers of removed chains' digest windows",
                move || {
                    switchboard_engine::executor::wake_removed_windows(
                        &store, &chains, &timers, now,
                    )
                },
            )
            .await;
        }
    });
}

/// Runs `turn` every `every`, the first at once, for as long as the
/// process runs; a slow turn is followed by a pause, not at once by the
/// next.
fn spawn_every<F>(every: Duration, mut turn: impl FnMut() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            turn().await;
        }
    });
}

/// Runs the sweep `run` on the blocking pool; says how many it changed
/// (`what`), or how it failed.
async fn sweep<E: std::fmt::Display + Send + 'static>(
    what: &'static str,
    run: impl FnOnce() -> Result<usize, E> + Send + 'static,
) {
    match tokio::task::spawn_blocking(run).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(records = n, "{what}"),
        Ok(Err(e)) => tracing::warn!(error = %e, "{what} failed"),
        Err(e) => tracing::warn!(error = %e, "{what} panicked"),
    }
}

/// Takes the replies transport workers publish, each once, as the
/// number owner's `message_response` events, until the process stops; one
/// that cannot be taken now (the store or the bus failing) comes again.
fn spawn_vumi_replies(
    vumi: switchboard_bus::vumi_inbound::VumiInbound,
    inbound: Arc<Inbound>,
    mut stopped: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        // A read that ends (the connection lost, the consumer gone) starts
        // again, a little later each time it fails at once.
        let mut pause = Duration::from_millis(500);
        loop {
            let run = vumi.run(|message| {
                let inbound = inbound.clone();
                async move {
                    match inbound.vumi(&message.transport, &message.payload).await {
                        Ok(()) => message.done().await,
                        Err(e) => {
                            tracing::warn!(transport = message.transport, error = %e,
                                "taking a Vumi reply failed: it comes again");
                            message.later(Duration::from_secs(5)).await;
                        }
                    }
                }
            });
            let started = Instant::now();
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                ended = run => match ended {
                    Ok(()) => tracing::warn!("reading Vumi replies ended: reading again"),
                    Err(e) => tracing::error!(error = %e, "reading Vumi replies failed: trying again"),
                },
            }
            if started.elapsed() > Duration::from_secs(60) {
                pause = Duration::from_millis(500);
            }
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    });
}

/// Removes message records past their retention (`[messages] retention`)
/// now and then, for as long as the process runs: an eighth of the
/// retention apart (at least a second, at most six hours), so a record goes
/// between one and one and an eighth retentions after it last changed.
fn spawn_message_expiry(
    messages: std::sync::Arc<dyn switchboard_handlers::records::Messages>,
    retention: Duration,
) {
    let every = (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(6 * 3600));
    spawn_every(every, move || {
        let messages = messages.clone();
        let before = switchboard_sdk::now() - retention;
        sweep("expiring message records", move || messages.expire(before))
    });
}

/// Removes unmatched inbound records past `[messages] retention`, and each
/// account's oldest past [`MAX_UNMATCHED_PER_ACCOUNT`], now and then: an
/// eighth of the retention apart, at least a second, at most ten minutes
/// (so that an account flooded with records no message of it matches is
/// back under its cap soon).
///
/// [`MAX_UNMATCHED_PER_ACCOUNT`]: switchboard_http::inbound::MAX_UNMATCHED_PER_ACCOUNT
fn spawn_unmatched_expiry(
    unmatched: switchboard_http::inbound::UnmatchedStore,
    retention: Duration,
) {
    let every = (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(600));
    spawn_every(every, move || {
        let unmatched = unmatched.clone();
        let before = switchboard_sdk::now() - retention;
        sweep("expiring unmatched inbound records", move || {
            unmatched.expire(before, switchboard_http::inbound::MAX_UNMATCHED_PER_ACCOUNT)
        })
    });
}

/// Removes what inboxes no longer keep (`[inbox]`: read notifications past
/// `read_retention`, the oldest past `max_per_receiver`) now and then: an
/// eighth of the retention apart, at least a second, at most ten minutes
/// (so a receiver's inbox is back under its cap soon after it went over).
fn spawn_inbox_expiry(
    inbox: std::sync::Arc<dyn switchboard_handlers::records::Inbox>,
    policy: switchboard_handlers::records::inbox::InboxPolicy,
) {
    let every = (policy.read_retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(600));
    spawn_every(every, move || {
        let inbox = inbox.clone();
        let now = switchboard_sdk::now();
        sweep("inbox housekeeping", move || inbox.expire(&policy, now))
    });
}

/// Applies every `*.toml` and `*.json` file in `dir`, in name order. A file
/// whose chains equal the account's current chains makes no new version, and
/// neither does a file unchanged since it was last applied ([`FROM_FILE`]):
/// the account's chains changed through the API since then are kept.
///
/// The `preset` secrets (name, value) are set in `store` for each file's
/// account first. A step naming a secret that is still not set does not
/// stop the file (the secret may only be set through the API once the
/// dispatcher runs): it is logged as a warning, and its runs fail until then.
pub fn apply_chain_dir(
    chains: &ChainStore,
    registry: &Registry,
    dir: &Path,
    (store, preset): (&dyn Secrets, &[(&str, &str)]),
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
        for (name, value) in preset {
            store.set(&account, name, value)?;
        }
        let (valid, unset) = validate_deferring_secrets(file, &account, registry)
            .map_err(|e| StartError::ChainFile(format!("{shown}: {e}")))?;
        let unset: Vec<String> = unset.iter().map(ToString::to_string).collect();
        for problem in &unset {
            tracing::warn!(%account, file = %shown, "{problem}; until it is set, runs of this step fail");
        }
        let current = chains.current(&account)?;
        let unchanged = current
            .as_ref()
            .is_some_and(|current| current.chains == valid.file().chains);
        // The chains last applied from a file: if the file still says the
        // same, the account's chains were changed since through the API,
        // and those changes stand.
        let last_from_file = chains.last_from_file(&account)?;
        let file_unchanged = last_from_file.is_some_and(|last| last.chains == valid.file().chains);
        let version = if unchanged {
            tracing::info!(%account, file = %shown, "the account's chains equal the file's: nothing to apply");
            None
        } else if file_unchanged {
            tracing::info!(%account, file = %shown, version = current.as_ref().map(|c| c.version),
                "the file is unchanged since it was last applied; the account's chains were changed \
                 since through the API, and those changes are kept");
            None
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let (version, changes) =
                chains.apply_changes(valid, false, &format!("{FROM_FILE} {name}"), registry)?;
            tracing::info!(%account, file = %shown, version = version.version, added = ?changes.added,
                changed = ?changes.changed, removed = ?changes.removed, "chain file applied");
            Some(version.version)
        };
        applied.push(AppliedFile {
            path,
            account: account.to_string(),
            version,
            unset_secrets: unset,
        });
    }
    Ok(applied)
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
        if let Some(templates) = registry.message_templates() {
            templates.forget_all();
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
        Collection::Templates => {
            if let (Some(templates), Some(slug)) = (
                registry.message_templates(),
                parts.next().and_then(|n| std::str::from_utf8(n).ok()),
            ) {
                templates.forget(&account, slug);
                tracing::info!(%account, template = slug, delay_ms = change.delay.as_millis() as u64,
                    "template changed by another replica: the next use compiles it");
            }
        }
        _ => {}
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
