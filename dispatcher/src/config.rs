//! The dispatcher's configuration: a TOML file (`--config`), overridden by flags
//! and `SWITCHBOARD_*` environment variables. Unknown keys and bad values stop
//! start-up with a message naming them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use serde::Deserialize;
use switchboard_handlers::sms::SmsProvider;

pub use switchboard_engine::LimitsConfig;
use switchboard_handlers::RhaiLimits;
use switchboard_http::auth::AdminToken;
use switchboard_http::inbound::ProviderKeys;
use switchboard_http::inbound::signed_events::VerificationKey;
use switchboard_outbound::{EmailProvider, OutboundConfig, OutboundPolicy};
use switchboard_sdk::DEFAULT_SUBJECT_PREFIX;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which bus carries events.
    pub bus: BusConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Where state is kept.
    pub store: StoreConfig,
    /// Limits on events and work.
    pub limits: LimitsConfig,
    /// Deployment credentials of SMS and e-mail providers.
    pub providers: ProvidersConfig,
    /// The sandbox of Rhai scripts and `when` conditions.
    pub rhai: RhaiLimits,
    /// The journal and shutdown.
    pub delivery: DeliveryConfig,
    /// What account-configured URLs may reach.
    pub outbound: OutboundConfig,
    /// What `/metrics` shows.
    pub metrics: MetricsConfig,
    /// OpenTelemetry traces.
    pub otel: crate::telemetry::OtelConfig,
    /// Message records.
    pub messages: MessagesConfig,
    /// The files accounts may keep (attachments).
    pub files: switchboard_handlers::records::FilePolicy,
    /// How long in-app inboxes keep notifications.
    pub inbox: switchboard_handlers::records::inbox::InboxPolicy,
    /// The threads that run the dispatcher's work.
    pub runtime: RuntimeConfig,
}

/// `[runtime]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The shared async runtime's worker threads, which run the API, the
    /// bus's connection, the timers and, without event threads (below),
    /// the event path (decoding, every step, the store's reads and
    /// writes); default one per CPU. Fewer threads hand work between
    /// each other less often: on the 2-core machine of BENCHMARKS.md, with
    /// the event path on them, one thread costs about a quarter less CPU
    /// per event than two, while one busy thread delays the events waiting
    /// behind it (see "One runtime thread" there).
    pub worker_threads: Option<usize>,
    /// Threads of the event path's own (the consume loop, the settler and
    /// the conversations' workers), each a single-threaded runtime with a
    /// share of the workers; 0: the event path runs on the shared runtime.
    /// Default ([`RuntimeConfig::event_threads`]): 1 on a machine of up to
    /// [`ONE_EVENT_THREAD_UP_TO_CPUS`] CPUs, else 0. Work the event path's
    /// tasks hand each other then stays on its thread: on the 2-core
    /// machine of BENCHMARKS.md one event thread costs about a fifth less
    /// CPU per event than the shared runtime at the same tail latency, and
    /// two cost more than one (see "Event threads" there); a script step
    /// with a large operation limit holds up its thread's conversations
    /// (`switchboard_engine::event_threads`).
    #[serde(rename = "event_threads")]
    pub event_threads_set: Option<usize>,
}

/// Up to how many CPUs the event path gets a thread of its own by default:
/// measured on 2; with more, the shared runtime's threads can each take a
/// share of the events, which one event thread cannot.
pub const ONE_EVENT_THREAD_UP_TO_CPUS: usize = 2;

/// The most worker threads `runtime.worker_threads` takes.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The most event threads `runtime.event_threads` takes.
pub const MAX_EVENT_THREADS: usize = 256;

impl RuntimeConfig {
    /// The event path's own threads: as set, or the default for this
    /// machine.
    pub fn event_threads(&self) -> usize {
        self.event_threads_set.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            usize::from(cpus <= ONE_EVENT_THREAD_UP_TO_CPUS)
        })
    }

    /// The runtime this configuration describes.
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all();
        if let Some(n) = self.worker_threads {
            builder.worker_threads(n);
        }
        builder.build()
    }
}

/// `[messages]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagesConfig {
    /// How long a message record is kept after it last changed (`"90d"`);
    /// one still scheduled, pending or sending is kept until it is done.
    /// Unmatched inbound records are kept as long after they came.
    #[serde(with = "switchboard_rules::duration")]
    pub retention: Duration,
    /// The most of each body (text, HTML) a record keeps, in bytes; a body
    /// over it is cut in the record (which says so) and sent whole.
    pub max_body_bytes: usize,
}

impl Default for MessagesConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(90 * 86400),
            max_body_bytes: 64 * 1024,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Which accounts have series of their own on `/metrics` (an `account`
    /// label): `"all"` (the default), `"none"`, or a list of account keys.
    /// Each account adds a series per outcome and event type; a platform
    /// of many accounts names the few it watches, or none, and reads every
    /// account's counts from `GET /v1/accounts/{account}/counts`.
    pub accounts: MetricsAccounts,
}

/// `metrics.accounts`: `"all"`, `"none"`, or the account keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MetricsAccounts {
    /// Every account.
    #[default]
    All,
    /// None.
    None,
    /// These.
    Named(Vec<String>),
}

impl<'de> Deserialize<'de> for MetricsAccounts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Named(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "all" => Ok(MetricsAccounts::All),
            Raw::Word(w) if w == "none" => Ok(MetricsAccounts::None),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "metrics.accounts is \"all\", \"none\" or a list of account keys, not {w:?}"
            ))),
            Raw::Named(named) => Ok(MetricsAccounts::Named(named)),
        }
    }
}

impl MetricsAccounts {
    /// As the metrics take it.
    pub fn labels(&self) -> switchboard_engine::metrics::AccountLabels {
        use switchboard_engine::metrics::AccountLabels;
        match self {
            MetricsAccounts::All => AccountLabels::All,
            MetricsAccounts::None => AccountLabels::None,
            MetricsAccounts::Named(named) => AccountLabels::Named(named.iter().cloned().collect()),
        }
    }
}

/// `[delivery]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// How long the step journal keeps an event's record (`"7d"`). A
    /// redelivery or a replay later than this runs the chain from its start;
    /// records of events in dead letters are kept until the letter is
    /// replayed or discarded.
    #[serde(with = "switchboard_rules::duration")]
    pub journal_retention: Duration,
    /// How long traces are shown (`"7d"`), counted from when an event's
    /// handling started. A trace is derived from the event's journal
    /// record, which is kept for the longer of the two retentions.
    #[serde(with = "switchboard_rules::duration")]
    pub trace_retention: Duration,
    /// How long a shutdown waits for the events being handled (`"30s"`);
    /// those still running then are released to the bus.
    #[serde(with = "switchboard_rules::duration")]
    pub shutdown_grace: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            journal_retention: Duration::from_secs(7 * 86400),
            trace_retention: Duration::from_secs(7 * 86400),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `[providers.sms.NAME]` and `[providers.email.NAME]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// SMS providers by name; `type` is `nats`, `http` or `twilio`.
    pub sms: BTreeMap<String, SmsProvider>,
    /// SMTP providers by name.
    pub email: BTreeMap<String, EmailProvider>,
}

impl ProvidersConfig {
    /// What the providers prove their inbound posts with: the Twilio
    /// providers, and the verification keys of SendGrid's Signed Event
    /// Webhook (`event_webhook_key`); a key that does not read is an error
    /// naming where it is configured.
    pub fn inbound_keys(&self) -> Result<ProviderKeys, String> {
        let twilio = self
            .sms
            .values()
            .filter_map(|p| match p {
                SmsProvider::Twilio(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let sendgrid = self
            .email
            .iter()
            .filter_map(|(name, p)| {
                let key = p.event_webhook_key.as_deref()?;
                Some(VerificationKey::parse(name, key))
            })
            .collect::<Result<_, _>>()?;
        Ok(ProviderKeys { twilio, sendgrid })
    }
}

/// `[bus]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// NATS server URL; the embedded bus when absent.
    pub nats_url: Option<String>,
    /// First segment of every subject.
    pub subject_prefix: String,
    /// Seconds a NATS delivery may go unacked before it is redelivered (the
    /// dispatcher reports progress while a step runs).
    pub ack_wait_secs: u64,
    /// NATS only: how many messages the dispatcher's consumer may have
    /// delivered and not acked, those nakked to wait behind their
    /// conversation's retry among them; past it the server delivers
    /// nothing new until some are acked. At least 1,024, and at least four
    /// for each conversation handled at once (`limits.concurrency`).
    pub max_ack_pending: usize,
    /// NATS only: how many servers of a JetStream cluster keep each stream
    /// the dispatcher creates (events, dead letters, outbound commands) and
    /// its consumer; 3 on a three-node cluster, so that losing a server loses
    /// nothing and stops nothing.
    pub stream_replicas: usize,
    /// NATS only: run as one of several replicas sharing state through the
    /// JetStream key-value bucket `switchboard` (with `stream_replicas`
    /// copies), instead of keeping it in this process's data directory.
    pub replicated: bool,
    /// With `replicated`: how many replicas besides a partition's owner
    /// keep a copy of its state: those that would own it next were the
    /// owner gone (Kafka Streams' standby replicas). `None`: every replica
    /// keeps a copy of every partition. Fewer copies cost less CPU per
    /// event; a replica without a copy sends its reads of the partition to
    /// the owner, and one that takes the partition over reads it whole
    /// from the changelog.
    pub standbys: Option<u16>,
    /// NATS only: publish events (ingested and emitted) as binary-mode
    /// CloudEvents (`ce-` headers, the event's data as the payload) for
    /// consumers of the stream that read CloudEvents; the dispatcher reads
    /// both forms.
    pub publish_cloudevents: bool,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            nats_url: None,
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_string(),
            ack_wait_secs: switchboard_bus::nats::DEFAULT_ACK_WAIT.as_secs(),
            max_ack_pending: switchboard_bus::nats::DEFAULT_MAX_ACK_PENDING,
            stream_replicas: 1,
            replicated: false,
            standbys: None,
            publish_cloudevents: false,
        }
    }
}

/// The most connections `http.max_connections` may let open at once.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of the API.
    pub listen: SocketAddr,
    /// The admin token (env `SWITCHBOARD_ADMIN_TOKEN`). Without one, `run`
    /// generates one into `{data_dir}/admin-token` (mode 0600) at first
    /// start and reads it from there later.
    pub admin_token: Option<AdminToken>,
    /// The base URL at which providers reach this dispatcher (`https://hooks.example.org`,
    /// or with a path prefix a proxy strips). Inbound webhook URLs are printed
    /// with it, and Twilio signatures are checked over it. Default:
    /// `http://` + the listen address.
    pub public_url: Option<String>,
    /// Connections open at once (10,000; the process's open-file limit
    /// must allow as many): past it, new ones wait in the listen backlog
    /// until one closes.
    pub max_connections: usize,
    /// How long a request's whole head may take to arrive, and a
    /// kept-alive connection's next one (`"30s"`): then the connection is
    /// closed.
    #[serde(with = "switchboard_rules::duration")]
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive whole, from when its
    /// head did (`"2m"`): then the request is refused.
    #[serde(with = "switchboard_rules::duration")]
    pub body_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: None,
            public_url: None,
            max_connections: 10_000,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(120),
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// sled's page cache, in MiB: records read or written lately stay in
    /// memory up to about this much. Raise it when contact lookups of a
    /// large contact set miss; the dispatcher's memory grows by about as much.
    pub cache_mib: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("switchboard-data"),
            cache_mib: switchboard_store::DEFAULT_CACHE_BYTES / (1024 * 1024),
        }
    }
}

impl StoreConfig {
    /// Opens this process's own store (`{data_dir}/store`).
    pub fn open(&self) -> Result<switchboard_store::Store, switchboard_store::StoreError> {
        switchboard_store::Store::open_with_cache(
            &self.data_dir.join("store"),
            self.cache_mib.saturating_mul(1024 * 1024),
        )
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or bad value.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

/// Values given on the command line or in `SWITCHBOARD_*` variables; each one
/// set replaces the config file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `bus.nats_url`
    pub nats_url: Option<String>,
    /// `bus.replicated` (only ever turns it on)
    pub replicated: bool,
    /// `bus.standbys`
    pub standbys: Option<u16>,
    /// `store.data_dir`
    pub data_dir: Option<PathBuf>,
    /// `http.listen`
    pub listen: Option<SocketAddr>,
    /// `bus.subject_prefix`
    pub subject_prefix: Option<String>,
    /// `limits.concurrency`
    pub concurrency: Option<usize>,
    /// Entries added to `outbound.allow`.
    pub outbound_allow: Vec<String>,
    /// `http.admin_token` (from `SWITCHBOARD_ADMIN_TOKEN`; no flag, so that
    /// it never shows in a process list).
    pub admin_token: Option<String>,
    /// `http.public_url`
    pub public_url: Option<String>,
    /// `runtime.worker_threads`
    pub worker_threads: Option<usize>,
    /// `runtime.event_threads`
    pub event_threads: Option<usize>,
}

impl Config {
    /// The configuration from an optional file, with `overrides` applied, checked.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        let Overrides {
            nats_url,
            replicated,
            standbys,
            data_dir,
            listen,
            subject_prefix,
            concurrency,
            outbound_allow,
            admin_token,
            public_url,
            worker_threads,
            event_threads,
        } = overrides;
        config.outbound.allow.extend(outbound_allow);
        if nats_url.is_some() {
            config.bus.nats_url = nats_url;
        }
        config.bus.replicated |= replicated;
        if standbys.is_some() {
            config.bus.standbys = standbys;
        }
        if let Some(v) = data_dir {
            config.store.data_dir = v;
        }
        if let Some(v) = listen {
            config.http.listen = v;
        }
        if let Some(v) = subject_prefix {
            config.bus.subject_prefix = v;
        }
        if let Some(v) = concurrency {
            config.limits.concurrency = v;
        }
        if let Some(v) = admin_token {
            config.http.admin_token = Some(
                AdminToken::try_from(v)
                    .map_err(|e| ConfigError::Invalid(format!("SWITCHBOARD_ADMIN_TOKEN: {e}")))?,
            );
        }
        if public_url.is_some() {
            config.http.public_url = public_url;
        }
        if worker_threads.is_some() {
            config.runtime.worker_threads = worker_threads;
        }
        if event_threads.is_some() {
            config.runtime.event_threads_set = event_threads;
        }
        config.check()?;
        Ok(config)
    }

    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses a config file's text. Values are checked by [`Config::check`]
    /// once overrides are applied ([`Config::load`] does both).
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: switchboard_rules::toml_error_message(text, &e),
        })
    }

    /// Checks values that parse but cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(n) = self.runtime.worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&n)
        {
            return Err(ConfigError::Invalid(format!(
                "runtime.worker_threads is {n}: it must be 1 to {MAX_WORKER_THREADS}"
            )));
        }
        if let Some(n) = self.runtime.event_threads_set
            && n > MAX_EVENT_THREADS
        {
            return Err(ConfigError::Invalid(format!(
                "runtime.event_threads is {n}: it must be 0 (the shared runtime) to \
                 {MAX_EVENT_THREADS}"
            )));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.http.max_connections) {
            return Err(ConfigError::Invalid(format!(
                "http.max_connections is {}: it must be 1 to {MAX_CONNECTIONS}",
                self.http.max_connections
            )));
        }
        for (name, t) in [
            ("http.header_timeout", self.http.header_timeout),
            ("http.body_timeout", self.http.body_timeout),
        ] {
            if t < Duration::from_secs(1) {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1s")));
            }
        }
        if self.limits.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "limits.concurrency must be at least 1".into(),
            ));
        }
        if !(1..=5).contains(&self.bus.stream_replicas) {
            return Err(ConfigError::Invalid(format!(
                "bus.stream_replicas is {}: JetStream keeps a stream on 1 to 5 servers",
                self.bus.stream_replicas
            )));
        }
        if self.bus.ack_wait_secs == 0 {
            return Err(ConfigError::Invalid(
                "bus.ack_wait_secs must be at least 1".into(),
            ));
        }
        if self.bus.max_ack_pending < 1_024 {
            return Err(ConfigError::Invalid(format!(
                "bus.max_ack_pending is {}: it must be at least 1024 (the messages nakked to wait \
                 behind a retry count against it, and past it every conversation waits)",
                self.bus.max_ack_pending
            )));
        }
        if self.delivery.journal_retention < Duration::from_secs(60) {
            return Err(ConfigError::Invalid(
                "delivery.journal_retention must be at least 1m: a redelivered event must find its journal".into(),
            ));
        }
        if self.messages.retention < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "messages.retention must be at least 1s".into(),
            ));
        }
        if self.inbox.read_retention < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "inbox.read_retention must be at least 1s".into(),
            ));
        }
        if self.inbox.max_streams_per_receiver == 0 {
            return Err(ConfigError::Invalid(
                "inbox.max_streams_per_receiver must be at least 1".into(),
            ));
        }
        if self.inbox.max_per_receiver == 0 {
            return Err(ConfigError::Invalid(
                "inbox.max_per_receiver must be at least 1".into(),
            ));
        }
        if self.messages.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "messages.max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.delivery.trace_retention < Duration::from_secs(60) {
            return Err(ConfigError::Invalid(
                "delivery.trace_retention must be at least 1m".into(),
            ));
        }
        if self.limits.max_event_bytes < 512 {
            return Err(ConfigError::Invalid(
                "limits.max_event_bytes must be at least 512".into(),
            ));
        }
        if !(1..=65_536).contains(&self.store.cache_mib) {
            return Err(ConfigError::Invalid(format!(
                "store.cache_mib must be between 1 and 65536 (MiB), not {}",
                self.store.cache_mib
            )));
        }
        if self.bus.replicated && self.bus.nats_url.is_none() {
            return Err(ConfigError::Invalid(
                "bus.replicated: replicas share state through NATS JetStream, but no NATS URL is \
                 configured (set bus.nats_url or --nats)"
                    .into(),
            ));
        }
        if self.bus.standbys.is_some() && !self.bus.replicated {
            return Err(ConfigError::Invalid(
                "bus.standbys: standby copies are kept by replicas, but bus.replicated is off \
                 (set it, or --replicated)"
                    .into(),
            ));
        }
        if self.bus.publish_cloudevents && self.bus.nats_url.is_none() {
            return Err(ConfigError::Invalid(
                "bus.publish_cloudevents: CloudEvents are published for consumers of the NATS \
                 stream, but no NATS URL is configured (set bus.nats_url or --nats)"
                    .into(),
            ));
        }
        if self.bus.nats_url.is_none()
            && let Some((name, _)) = self
                .providers
                .sms
                .iter()
                .find(|(_, p)| matches!(p, SmsProvider::Nats(_)))
        {
            return Err(ConfigError::Invalid(format!(
                "providers.sms.{name}: type \"nats\" publishes to transport workers on NATS, but no NATS \
                 URL is configured (set bus.nats_url or --nats)"
            )));
        }
        self.providers
            .inbound_keys()
            .map_err(ConfigError::Invalid)?;
        self.rhai.check().map_err(ConfigError::Invalid)?;
        self.otel.check().map_err(ConfigError::Invalid)?;
        OutboundPolicy::new(&self.outbound).map_err(ConfigError::Invalid)?;
        if let Some(url) = &self.http.public_url {
            check_public_url(url).map_err(ConfigError::Invalid)?;
        }
        let prefix = &self.bus.subject_prefix;
        if prefix.is_empty()
            || prefix.starts_with('.')
            || prefix.ends_with('.')
            || prefix.contains("..")
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(ConfigError::Invalid(format!(
                "bus.subject_prefix {prefix:?} is not a subject prefix: use letters, digits, _ and -, \
                 with . between tokens"
            )));
        }
        Ok(())
    }
}

/// `http.public_url`: an `http://` or `https://` URL with a host, without a
/// query or fragment.
fn check_public_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') && !url.contains(['?', '#']) => {
            Ok(())
        }
        _ => Err(format!(
            "http.public_url {url:?} is not a base URL: give http(s)://HOST[:PORT][/PATH], the address \
             providers post to, without a query or fragment"
        )),
    }
}
