//! Counters and histograms, exposed at `/metrics` in the OpenMetrics text
//! format (which Prometheus reads).
//!
//! The Prometheus project's `prometheus-client` keeps them: each family is
//! a map of atomic counters behind a read-write lock that is written only
//! when a label set is first seen, so counting on the hot path takes no
//! exclusive lock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
    LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::event_kinds::MAX_KINDS;

/// What happened to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Taken off the bus (first delivery) and decoded.
    Received,
    /// Every matching chain ran.
    Handled,
    /// No chain matched and the account has no default chain.
    Unrouted,
    /// Dropped because `expires_at` had passed.
    Expired,
    /// Sent to dead letters (poison, over-depth, failed step).
    DeadLettered,
    /// A step was tried again.
    Retried,
}

impl Outcome {
    /// Every outcome, in the order [`Metrics::totals`] gives them.
    pub const ALL: [Outcome; 6] = [
        Outcome::Received,
        Outcome::Handled,
        Outcome::Unrouted,
        Outcome::Expired,
        Outcome::DeadLettered,
        Outcome::Retried,
    ];

    /// The outcome's name, as `/metrics` labels it.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Handled => "handled",
            Outcome::Unrouted => "unrouted",
            Outcome::Expired => "expired",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Retried => "retried",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.label())
    }
}

/// What one attempt at a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepResult {
    /// It succeeded (or was skipped by its idempotency key).
    Ok,
    /// It failed and will be tried again.
    Retried,
    /// It failed for good.
    Failed,
}

impl EncodeLabelValue for StepResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            StepResult::Ok => "ok",
            StepResult::Retried => "retried",
            StepResult::Failed => "failed",
        })
    }
}

/// What became of one record a provider posted to an inbound webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InboundResult {
    /// Matched (a message record, or a verified generic webhook) and emitted.
    Matched,
    /// Well-formed, but for a message this account never sent.
    UnknownMessage,
    /// A reply to an address that is not the account's.
    UnknownAddress,
    /// A SendGrid record about a message another account sent (its
    /// `switchboard_account`), posted to this account's URL.
    OtherAccount,
    /// On the deployment's SendGrid events route: a record that names no
    /// account (no `switchboard_account`, or not an account key).
    NoAccount,
    /// An event type or status the provider does not document.
    Undocumented,
    /// Not a record that can be read.
    Malformed,
    /// The whole request was refused (bad signature, stale timestamp).
    Rejected,
}

impl InboundResult {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            InboundResult::Matched => "matched",
            InboundResult::UnknownMessage => "unknown_message",
            InboundResult::UnknownAddress => "unknown_address",
            InboundResult::OtherAccount => "other_account",
            InboundResult::NoAccount => "no_account",
            InboundResult::Undocumented => "undocumented",
            InboundResult::Malformed => "malformed",
            InboundResult::Rejected => "rejected",
        }
    }
}

impl EncodeLabelValue for InboundResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.label())
    }
}

/// The event type an account's events are counted under once it has
/// [`MAX_KINDS`] others.
pub const OTHER_EVENT_TYPE: &str = "~other";

/// An event series' labels; `account` only for the accounts
/// [`AccountLabels`] names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EventLabels<'a> {
    outcome: Outcome,
    account: Option<&'a str>,
    event_type: &'a str,
}

impl EncodeLabelSet for EventLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("outcome", self.outcome).encode(encoder.encode_label())?;
        if let Some(account) = self.account {
            ("account", account).encode(encoder.encode_label())?;
        }
        ("event_type", self.event_type).encode(encoder.encode_label())
    }
}

/// Every account's events by type and outcome: what the API reads of an
/// account ([`Metrics::of_account`]), and what `switchboard_events` is
/// rendered from at each scrape — one set of counters per account and
/// type, not a second family of series kept beside them.
#[derive(Debug)]
struct EventCounts {
    by_account: RwLock<HashMap<String, HashMap<String, Counts>>>,
    /// Which accounts have series of their own.
    accounts: AccountLabels,
}

impl Collector for EventCounts {
    /// A series for each outcome of each (account, type) counted, with its
    /// `account` label where [`AccountLabels`] names the account; the other
    /// accounts' counts summed by outcome and type into series without it.
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "events",
            "Events by outcome, account and event type",
            None,
            MetricType::Counter,
        )?;
        let by_account = self.by_account.read().expect("account counts");
        let mut summed: HashMap<(&str, Outcome), u64> = HashMap::new();
        for (account, types) in by_account.iter() {
            let labelled = self.accounts.labels(account);
            for (event_type, counts) in types {
                for outcome in Outcome::ALL {
                    let n = counts[outcome as usize].load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    if labelled {
                        let labels = EventLabels {
                            outcome,
                            account: Some(account),
                            event_type,
                        };
                        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                    } else {
                        *summed.entry((event_type, outcome)).or_default() += n;
                    }
                }
            }
        }
        for ((event_type, outcome), n) in summed {
            let labels = EventLabels {
                outcome,
                account: None,
                event_type,
            };
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Which accounts `/metrics` gives series of their own (an `account`
/// label on `switchboard_events_total` and
/// `switchboard_inbound_records_total`). Every account's series is a set
/// of series per outcome and event type: on a platform of 10,000 accounts,
/// some 200,000 series for the scraper to keep. The others are summed into
/// series without the label; every account's counts stay readable through
/// the API ([`Metrics::of_account`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AccountLabels {
    /// Every account (a platform of a few accounts).
    #[default]
    All,
    /// None.
    None,
    /// These accounts only.
    Named(BTreeSet<String>),
}

impl AccountLabels {
    fn label(&self, account: &str) -> Option<String> {
        self.labels(account).then(|| account.to_string())
    }

    /// Whether `account` has series of its own.
    fn labels(&self, account: &str) -> bool {
        match self {
            AccountLabels::All => true,
            AccountLabels::None => false,
            AccountLabels::Named(named) => named.contains(account),
        }
    }
}

/// One account's events of one type by outcome, in the order of
/// [`Outcome::ALL`].
type Counts = [AtomicU64; 6];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StepLabels {
    handler: String,
    result: StepResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandlerLabels {
    handler: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlowLabels {
    control: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutboundLabels {
    channel: String,
    provider: String,
    status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct InboundLabels {
    provider: String,
    account: Option<String>,
    result: InboundResult,
}

impl EncodeLabelSet for InboundLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("provider", self.provider.as_str()).encode(encoder.encode_label())?;
        if let Some(account) = &self.account {
            ("account", account.as_str()).encode(encoder.encode_label())?;
        }
        ("result", self.result).encode(encoder.encode_label())
    }
}

/// Upper bounds of the step-duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn step_histogram() -> StepHistogram {
    HistogramWithExemplars::new(BUCKETS.into_iter())
}

/// The step-duration histogram: each bucket keeps the trace id of its last
/// observation made in a sampled trace as its exemplar (OpenMetrics only).
type StepHistogram = HistogramWithExemplars<TraceExemplar>;

/// An exemplar's labels: the trace the observation was made in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TraceExemplar {
    trace_id: String,
}

impl EncodeLabelSet for TraceExemplar {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("trace_id", self.trace_id.as_str()).encode(encoder.encode_label())
    }
}

/// Values read when `/metrics` is scraped rather than counted as they happen.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Messages on the bus not yet handled (NATS: the consumer's pending and
    /// unacked messages; embedded: the queue's length).
    pub bus_lag: Option<u64>,
    /// Rhai operations run by scripts and conditions since start.
    pub rhai_operations: u64,
    /// Flushes of the store since start (each a group commit: one write
    /// and sync of the store's log for every caller waiting at the time).
    pub store_flushes: u64,
    /// Changelog records this replica could not read and skipped since
    /// start (replicas only; each is logged with its partition and
    /// sequence).
    pub changelog_undecodable: u64,
    /// Timers of paused chains this process knows of.
    pub timers_pending: u64,
    /// Digest windows open (in this process's copy of the store).
    pub digests_open: u64,
    /// The async runtime's worker threads (`runtime.worker_threads`).
    pub runtime_worker_threads: u64,
    /// The event path's own threads (`runtime.event_threads`).
    pub runtime_event_threads: u64,
}

/// Every counter and histogram of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Arc<EventCounts>,
    steps: Family<StepLabels, Counter>,
    durations: Family<HandlerLabels, StepHistogram, fn() -> StepHistogram>,
    outbound: Family<OutboundLabels, Counter>,
    inbound: Family<InboundLabels, Counter>,
    timers_fired: Counter,
    digests_joined: Counter,
    flow: Family<FlowLabels, Counter>,
    /// Events by outcome, over every account (the health page's).
    totals: [AtomicU64; 6],
    /// The totals about once a minute, for the last hour's counts.
    samples: Mutex<VecDeque<(Instant, [u64; 6])>>,
    /// Which accounts have series of their own.
    accounts: AccountLabels,
    /// When counting began.
    started: time::OffsetDateTime,
    /// Every account's inbound records by provider and result, for the API.
    inbound_by_account: RwLock<HashMap<(String, String, InboundResult), AtomicU64>>,
    /// How long the last exposition was: the next is written into room
    /// for about as much (at 10,000 accounts it runs to megabytes, and a
    /// string that outgrows its room doubles it).
    last_len: AtomicUsize,
}

/// How long the samples of [`Metrics::sample`] reach back.
const RECENT: Duration = Duration::from_secs(3600);

impl Default for Metrics {
    fn default() -> Self {
        Self::new(AccountLabels::default())
    }
}

impl Metrics {
    /// Counters whose per-account series are those `accounts` names.
    pub fn new(accounts: AccountLabels) -> Self {
        let events = Arc::new(EventCounts {
            by_account: RwLock::default(),
            accounts: accounts.clone(),
        });
        let steps = Family::<StepLabels, Counter>::default();
        let durations =
            Family::<HandlerLabels, StepHistogram, fn() -> StepHistogram>::new_with_constructor(
                step_histogram,
            );
        let outbound = Family::<OutboundLabels, Counter>::default();
        let inbound = Family::<InboundLabels, Counter>::default();
        let timers_fired = Counter::default();
        let digests_joined = Counter::default();
        let flow = Family::<FlowLabels, Counter>::default();
        let mut registry = Registry::with_prefix("switchboard");
        registry.register_collector(Box::new(events.clone()));
        registry.register(
            "step_attempts",
            "Step attempts by handler and result",
            steps.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Time spent in one attempt at a step, by handler",
            durations.clone(),
        );
        registry.register(
            "outbound_calls",
            "Outbound calls by channel, provider and status",
            outbound.clone(),
        );
        registry.register(
            "inbound_records",
            "Records posted to inbound webhooks by provider, account and result",
            inbound.clone(),
        );
        registry.register(
            "timers_fired",
            "Timers of paused chains that fired (their events put back on the bus)",
            timers_fired.clone(),
        );
        registry.register(
            "digest_events_joined",
            "Events that joined another's digest window (their chains stopped there)",
            digests_joined.clone(),
        );
        registry.register(
            "flow_control",
            "Runs a chain's flow control held back (throttle, debounce, concurrency), \
             skipped (rate_limit) or superseded (debounce), by control and result",
            flow.clone(),
        );
        Self {
            flow,
            registry,
            timers_fired,
            digests_joined,
            events,
            steps,
            durations,
            outbound,
            inbound,
            totals: Default::default(),
            samples: Mutex::default(),
            accounts,
            started: switchboard_sdk::now(),
            inbound_by_account: RwLock::default(),
            last_len: AtomicUsize::new(0),
        }
    }

    /// A timer of a paused chain fired.
    pub fn timer_fired(&self) {
        self.timers_fired.inc();
    }

    /// A chain's flow control held a run back, skipped it or superseded it.
    pub fn flow(&self, control: switchboard_rules::Control, result: crate::journal::FlowResult) {
        let result = match result {
            crate::journal::FlowResult::Passed => "passed",
            crate::journal::FlowResult::Held => "held",
            crate::journal::FlowResult::Skipped => "skipped",
            crate::journal::FlowResult::Superseded => "superseded",
        };
        self.flow
            .get_or_create(&FlowLabels {
                control: control.as_str(),
                result,
            })
            .inc();
    }

    /// An event joined another's digest window.
    pub fn digest_joined(&self) {
        self.digests_joined.inc();
    }

    /// When counting began (the process started).
    pub fn started(&self) -> time::OffsetDateTime {
        self.started
    }

    /// Events by outcome since start, in the order of [`Outcome::ALL`].
    pub fn totals(&self) -> [u64; 6] {
        std::array::from_fn(|i| self.totals[i].load(Ordering::Relaxed))
    }

    /// Keeps the totals as they are now (call about once a minute), and
    /// forgets samples older than an hour (but one).
    pub fn sample(&self) {
        let now = Instant::now();
        let mut samples = self.samples.lock().expect("metrics samples");
        samples.push_back((now, self.totals()));
        while samples.len() > 2 && now.duration_since(samples[1].0) >= RECENT {
            samples.pop_front();
        }
    }

    /// Events by outcome over about the last hour (since the oldest sample
    /// within it, or since start), and how long that is.
    pub fn recent(&self) -> (Duration, [u64; 6]) {
        let now = self.totals();
        let samples = self.samples.lock().expect("metrics samples");
        let Some((at, then)) = samples
            .iter()
            .find(|(at, _)| at.elapsed() <= RECENT + Duration::from_secs(60))
        else {
            return (Duration::ZERO, now);
        };
        (at.elapsed(), std::array::from_fn(|i| now[i] - then[i]))
    }

    /// Counts one event of `account` and `event_type` with `outcome`. An
    /// account's event types past its first [`MAX_KINDS`] are counted as
    /// [`OTHER_EVENT_TYPE`], so that an emitter making up types cannot grow
    /// the counters (and `/metrics`) without end.
    pub fn count(&self, outcome: Outcome, account: &str, event_type: &str) {
        self.totals[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let counted = self
            .events
            .by_account
            .read()
            .expect("account counts")
            .get(account)
            .and_then(|types| {
                types.get(event_type).or_else(|| {
                    (types.len() >= MAX_KINDS)
                        .then(|| types.get(OTHER_EVENT_TYPE))
                        .flatten()
                })
            })
            .map(|counts| counts[outcome as usize].fetch_add(1, Ordering::Relaxed))
            .is_some();
        if !counted {
            let mut by_account = self.events.by_account.write().expect("account counts");
            let types = by_account.entry(account.to_string()).or_default();
            let event_type = if types.len() >= MAX_KINDS && !types.contains_key(event_type) {
                OTHER_EVENT_TYPE
            } else {
                event_type
            };
            types.entry(event_type.to_string()).or_default()[outcome as usize]
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `account`'s counts since start: its events by type (sorted) and
    /// outcome, in the order of [`Outcome::ALL`], and its inbound records
    /// by provider and result.
    pub fn of_account(&self, account: &str) -> AccountCounts {
        let mut events: Vec<(String, [u64; 6])> = self
            .events
            .by_account
            .read()
            .expect("account counts")
            .get(account)
            .map(|types| {
                types
                    .iter()
                    .map(|(t, c)| {
                        (
                            t.clone(),
                            std::array::from_fn(|i| c[i].load(Ordering::Relaxed)),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        events.sort();
        let mut inbound: Vec<(String, InboundResult, u64)> = self
            .inbound_by_account
            .read()
            .expect("inbound counts")
            .iter()
            .filter(|((a, ..), _)| a == account)
            .map(|((_, p, r), n)| (p.clone(), *r, n.load(Ordering::Relaxed)))
            .collect();
        inbound.sort();
        AccountCounts { events, inbound }
    }

    /// Counts one attempt at a step of `handler`, and how long it took.
    /// Made in a sampled trace (see [`crate::otel`]), the observation is its
    /// bucket's exemplar, with the trace id.
    pub fn step(&self, handler: &str, result: StepResult, took: Duration) {
        let handler = handler.to_string();
        let exemplar = crate::otel::current_trace_id().map(|trace_id| TraceExemplar { trace_id });
        let at = exemplar.as_ref().map(|_| std::time::SystemTime::now());
        self.durations
            .get_or_create(&HandlerLabels {
                handler: handler.clone(),
            })
            .observe(took.as_secs_f64(), exemplar, at);
        self.steps
            .get_or_create(&StepLabels { handler, result })
            .inc();
    }

    /// Counts one outbound call over `channel` (`http`, `smtp`) to `provider`
    /// that ended with `status` (an HTTP status code, `timeout`, `error`,
    /// `refused`, `accepted`, `rejected`).
    pub fn outbound(&self, channel: &'static str, provider: &str, status: &str) {
        self.outbound
            .get_or_create(&OutboundLabels {
                channel: channel.to_string(),
                provider: provider.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts one record posted to `account`'s `provider` inbound webhook.
    pub fn inbound(&self, provider: &str, account: &str, result: InboundResult) {
        self.inbound_series(provider, self.accounts.label(account), result);
        let key = (account.to_string(), provider.to_string(), result);
        let counted = self
            .inbound_by_account
            .read()
            .expect("inbound counts")
            .get(&key)
            .map(|n| n.fetch_add(1, Ordering::Relaxed))
            .is_some();
        if !counted {
            self.inbound_by_account
                .write()
                .expect("inbound counts")
                .entry(key)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one record posted to a route of the deployment's that names
    /// no account: its series has no `account` label.
    pub fn inbound_unattributed(&self, provider: &str, result: InboundResult) {
        self.inbound_series(provider, None, result);
    }

    fn inbound_series(&self, provider: &str, account: Option<String>, result: InboundResult) {
        self.inbound
            .get_or_create(&InboundLabels {
                provider: provider.to_string(),
                account,
                result,
            })
            .inc();
    }

    /// The count of records posted to `account`'s `provider` webhook with `result`.
    pub fn inbound_count(&self, provider: &str, account: &str, result: InboundResult) -> u64 {
        self.inbound_by_account
            .read()
            .expect("inbound counts")
            .get(&(account.to_string(), provider.to_string(), result))
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// The OpenMetrics text exposition of everything, with `gauges`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(self.room());
        self.render_into(gauges, &mut out);
        self.last_len.store(out.len(), Ordering::Relaxed);
        out
    }

    /// The exposition in the Prometheus text format (see
    /// [`prometheus_text`]), converted as it is written: the OpenMetrics
    /// text is never held whole beside it.
    pub fn render_prometheus(&self, gauges: &Gauges) -> String {
        let mut out = PrometheusWriter::with_capacity(self.room());
        self.render_into(gauges, &mut out);
        let out = out.finish();
        self.last_len.store(out.len(), Ordering::Relaxed);
        out
    }

    /// Room for the next exposition: a little more than the last.
    fn room(&self) -> usize {
        let last = self.last_len.load(Ordering::Relaxed);
        last + last / 16
    }

    fn render_into(&self, gauges: &Gauges, out: &mut impl std::fmt::Write) {
        let mut scraped = Registry::with_prefix("switchboard");
        if let Some(lag) = gauges.bus_lag {
            scraped.register(
                "bus_lag_messages",
                "Messages on the bus not yet handled",
                ConstGauge::new(i64::try_from(lag).unwrap_or(i64::MAX)),
            );
        }
        scraped.register(
            "rhai_operations",
            "Rhai operations run by scripts and conditions",
            ConstCounter::new(gauges.rhai_operations),
        );
        scraped.register(
            "store_flushes",
            "Flushes of the store (group commits)",
            ConstCounter::new(gauges.store_flushes),
        );
        scraped.register(
            "changelog_undecodable_records",
            "Partition changelog records that could not be read and were skipped",
            ConstCounter::new(gauges.changelog_undecodable),
        );
        scraped.register(
            "timers_pending",
            "Timers of paused chains waiting to fire",
            ConstGauge::new(i64::try_from(gauges.timers_pending).unwrap_or(i64::MAX)),
        );
        scraped.register(
            "digests_open",
            "Digest windows open, waiting to close",
            ConstGauge::new(i64::try_from(gauges.digests_open).unwrap_or(i64::MAX)),
        );
        scraped.register(
            "runtime_worker_threads",
            "The async runtime's worker threads",
            ConstGauge::new(i64::try_from(gauges.runtime_worker_threads).unwrap_or(i64::MAX)),
        );
        scraped.register(
            "runtime_event_threads",
            "Threads of the event path's own (0: it shares the runtime's worker threads)",
            ConstGauge::new(i64::try_from(gauges.runtime_event_threads).unwrap_or(i64::MAX)),
        );
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        encode_registry(out, &self.registry)
            .and_then(|()| encode_registry(out, &scraped))
            .and_then(|()| encode_eof(out))
            .expect("writing to a string cannot fail");
    }
}

/// One account's counts since start (see [`Metrics::of_account`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountCounts {
    /// Events by type and outcome, in the order of [`Outcome::ALL`].
    pub events: Vec<(String, [u64; 6])>,
    /// Inbound records by provider and result.
    pub inbound: Vec<(String, InboundResult, u64)>,
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`prometheus_text`]'s.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The OpenMetrics text of [`Metrics::render`] in the Prometheus text
/// format (0.0.4), for a scraper that does not ask for OpenMetrics: a
/// counter's `# TYPE` and `# HELP` name its samples (`…_total`), there
/// is no `# UNIT` or `# EOF` line, and no exemplar.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = PrometheusWriter::with_capacity(openmetrics.len());
    out.write_str(openmetrics)
        .expect("writing to a string cannot fail");
    out.finish()
}

/// Converts OpenMetrics text to the Prometheus text format line by line,
/// as it is written (see [`prometheus_text`]). A family's `# HELP` line
/// comes before its `# TYPE` line, which says whether it is a counter: it
/// waits for it.
struct PrometheusWriter {
    out: String,
    /// The unfinished line written so far.
    line: String,
    /// A `# HELP` line waiting for its family's `# TYPE` line.
    help: Option<String>,
}

impl PrometheusWriter {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            out: String::with_capacity(capacity),
            line: String::new(),
            help: None,
        }
    }

    fn take_line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            self.flush_help(None);
            self.help = Some(rest.to_string());
            return;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let counter = rest
                .strip_suffix(" counter")
                .filter(|name| !name.contains(' '));
            self.flush_help(counter);
            match counter {
                Some(name) => {
                    self.out.push_str("# TYPE ");
                    self.out.push_str(name);
                    self.out.push_str("_total counter\n");
                }
                None => self.push(line),
            }
            return;
        }
        self.flush_help(None);
        if line == "# EOF" || line.starts_with("# UNIT ") {
            return;
        }
        let line = if line.starts_with('#') {
            line
        } else {
            without_exemplar(line)
        };
        self.push(line);
    }

    /// Writes the waiting `# HELP` line, as a counter's if `counter` is its
    /// family's name.
    fn flush_help(&mut self, counter: Option<&str>) {
        let Some(help) = self.help.take() else { return };
        self.out.push_str("# HELP ");
        match (counter, help.split_once(' ')) {
            (Some(name), Some((of, text))) if of == name => {
                self.out.push_str(name);
                self.out.push_str("_total ");
                self.out.push_str(text);
            }
            _ => self.out.push_str(&help),
        }
        self.out.push('\n');
    }

    fn push(&mut self, line: &str) {
        self.out.push_str(line);
        self.out.push('\n');
    }

    fn finish(mut self) -> String {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.take_line(&line);
        }
        self.flush_help(None);
        self.out
    }
}

impl std::fmt::Write for PrometheusWriter {
    fn write_str(&mut self, mut s: &str) -> std::fmt::Result {
        while let Some(at) = s.find('\n') {
            let (head, rest) = s.split_at(at);
            if self.line.is_empty() {
                self.take_line(head);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.push_str(head);
                self.take_line(&line);
                line.clear();
                self.line = line;
            }
            s = &rest[1..];
        }
        self.line.push_str(s);
        Ok(())
    }
}

/// A sample line without the exemplar that may follow it (` # {labels}
/// value [timestamp]`), looked for after the sample's own label set, whose
/// quoted values may hold anything.
fn without_exemplar(line: &str) -> &str {
    let name_end = line.find([' ', '{']).unwrap_or(line.len());
    let mut labels_end = name_end;
    if line[name_end..].starts_with('{') {
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in line[name_end..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    labels_end = name_end + i + 1;
                    break;
                }
                _ => {}
            }
        }
    }
    match line[labels_end..].find(" # ") {
        Some(at) => &line[..labels_end + at],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accounts_event_types_past_the_kinds_cap_are_counted_as_other() {
        let m = Metrics::default();
        for n in 0..MAX_KINDS + 50 {
            m.count(Outcome::Handled, "acme", &format!("made_up_{n}"));
        }
        m.count(Outcome::Handled, "acme", "made_up_0");
        m.count(Outcome::Handled, "acme", "one_more_new");
        m.count(Outcome::Received, "beta", "poll_complete");
        let acme = m.of_account("acme").events;
        assert_eq!(acme.len(), MAX_KINDS + 1);
        let count = |t: &str| {
            acme.iter()
                .find(|(name, _)| name == t)
                .map(|(_, c)| c[Outcome::Handled as usize])
        };
        assert_eq!(count("made_up_0"), Some(2));
        assert_eq!(count(&format!("made_up_{}", MAX_KINDS - 1)), Some(1));
        assert_eq!(count(&format!("made_up_{MAX_KINDS}")), None);
        assert_eq!(count(OTHER_EVENT_TYPE), Some(51));
        // Another account has its own.
        assert_eq!(m.of_account("beta").events.len(), 1);
        let text = m.render(&Gauges::default());
        assert!(
            text.contains(r#"switchboard_events_total{outcome="handled",account="acme",event_type="~other"} 51"#),
            "{text}"
        );
    }

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        m.step("log", StepResult::Ok, Duration::from_millis(3));
        m.step("log", StepResult::Ok, Duration::from_millis(30));
        m.outbound("http", "odd\"name", "200");
        m.count(Outcome::DeadLettered, "acme", "poll_complete");
        m.timer_fired();
        m.digest_joined();
        let text = m.render(&Gauges {
            bus_lag: Some(4),
            rhai_operations: 9,
            store_flushes: 3,
            changelog_undecodable: 2,
            timers_pending: 5,
            digests_open: 2,
            runtime_worker_threads: 2,
            runtime_event_threads: 1,
        });
        for line in [
            "switchboard_step_duration_seconds_bucket{le=\"0.001\",handler=\"log\"} 0",
            "switchboard_step_duration_seconds_bucket{le=\"0.005\",handler=\"log\"} 1",
            "switchboard_step_duration_seconds_bucket{le=\"0.05\",handler=\"log\"} 2",
            "switchboard_step_duration_seconds_count{handler=\"log\"} 2",
            "switchboard_step_attempts_total{handler=\"log\",result=\"ok\"} 2",
            "switchboard_outbound_calls_total{channel=\"http\",provider=\"odd\\\"name\",status=\"200\"} 1",
            "switchboard_events_total{outcome=\"dead_lettered\",account=\"acme\",event_type=\"poll_complete\"} 1",
            "switchboard_bus_lag_messages 4",
            "switchboard_rhai_operations_total 9",
            "switchboard_store_flushes_total 3",
            "switchboard_changelog_undecodable_records_total 2",
            "switchboard_timers_pending 5",
            "switchboard_timers_fired_total 1",
            "switchboard_digests_open 2",
            "switchboard_digest_events_joined_total 1",
            "switchboard_runtime_worker_threads 2",
            "switchboard_runtime_event_threads 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn only_named_accounts_have_series_of_their_own_and_every_account_counts() {
        let m = Metrics::new(AccountLabels::Named(["vip".to_string()].into()));
        m.count(Outcome::Handled, "vip", "order");
        m.count(Outcome::Handled, "small", "order");
        m.count(Outcome::Handled, "other", "order");
        m.count(Outcome::Received, "small", "signup");
        m.inbound("twilio", "small", InboundResult::Matched);
        let text = m.render(&Gauges::default());
        for line in [
            "switchboard_events_total{outcome=\"handled\",account=\"vip\",event_type=\"order\"} 1",
            "switchboard_events_total{outcome=\"handled\",event_type=\"order\"} 2",
            "switchboard_inbound_records_total{provider=\"twilio\",result=\"matched\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        assert!(!text.contains("small"), "{text}");
        let small = m.of_account("small");
        assert_eq!(
            small.events,
            [
                ("order".to_string(), [0, 1, 0, 0, 0, 0]),
                ("signup".to_string(), [1, 0, 0, 0, 0, 0])
            ]
        );
        assert_eq!(
            small.inbound,
            [("twilio".to_string(), InboundResult::Matched, 1)]
        );
        assert_eq!(
            m.inbound_count("twilio", "small", InboundResult::Matched),
            1
        );
        assert_eq!(m.of_account("nobody"), AccountCounts::default());
    }

    #[test]
    fn the_prometheus_text_names_counters_by_their_samples() {
        let m = Metrics::new(AccountLabels::None);
        m.count(Outcome::Handled, "acme", "order");
        m.step("log", StepResult::Ok, Duration::from_millis(3));
        let text = prometheus_text(&m.render(&Gauges::default()));
        for line in [
            "# TYPE switchboard_events_total counter",
            "switchboard_events_total{outcome=\"handled\",event_type=\"order\"} 1",
            "# TYPE switchboard_step_duration_seconds histogram",
            "switchboard_step_duration_seconds_count{handler=\"log\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("# HELP switchboard_events_total "))
        );
    }

    /// `/metrics` without OpenMetrics in `Accept` converts as it writes:
    /// the same text as converting the whole exposition, however the
    /// writes split its lines.
    #[test]
    fn the_prometheus_text_converted_as_written_is_the_same() {
        let m = Metrics::new(AccountLabels::All);
        m.count(Outcome::Handled, "acme", "order");
        m.count(Outcome::DeadLettered, "odd\"account", "poll_complete");
        m.step("log", StepResult::Ok, Duration::from_millis(3));
        m.outbound("http", "gateway", "200");
        let gauges = Gauges {
            bus_lag: Some(4),
            rhai_operations: 9,
            ..Gauges::default()
        };
        let openmetrics = m.render(&gauges);
        let whole = prometheus_text(&openmetrics);
        assert!(
            whole.contains("# HELP switchboard_rhai_operations_total "),
            "{whole}"
        );
        assert_eq!(m.render_prometheus(&gauges), whole);
        for size in [1, 7, 64] {
            let mut out = PrometheusWriter::with_capacity(0);
            for piece in openmetrics.as_bytes().chunks(size) {
                out.write_str(std::str::from_utf8(piece).expect("ASCII"))
                    .expect("a string takes it");
            }
            assert_eq!(out.finish(), whole, "written {size} bytes at a time");
        }
    }

    #[test]
    fn a_step_in_a_sampled_trace_is_its_buckets_exemplar_in_openmetrics_only() {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let m = Metrics::new(AccountLabels::None);
        m.step("log", StepResult::Ok, Duration::from_millis(30));
        let trace = |flags| {
            opentelemetry::Context::current().with_remote_span_context(SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                TraceState::default(),
            ))
        };
        {
            let _in_trace = trace(TraceFlags::SAMPLED).attach();
            m.step("log", StepResult::Ok, Duration::from_millis(3));
        }
        {
            // An unsampled trace leaves no exemplar.
            let _in_trace = trace(TraceFlags::default()).attach();
            m.step("log", StepResult::Ok, Duration::from_millis(300));
        }
        let text = m.render(&Gauges::default());
        let with: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(with.len(), 1, "{text}");
        assert!(
            with[0].starts_with(
                "switchboard_step_duration_seconds_bucket{le=\"0.005\",handler=\"log\"} 1 \
                 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.003 "
            ),
            "{text}"
        );
        let prometheus = prometheus_text(&text);
        assert!(!prometheus.contains("trace_id"), "{prometheus}");
        assert!(
            prometheus
                .lines()
                .any(|l| l
                    == "switchboard_step_duration_seconds_bucket{le=\"0.005\",handler=\"log\"} 1"),
            "{prometheus}"
        );
    }

    #[test]
    fn an_exemplar_is_cut_after_the_samples_labels_whatever_they_hold() {
        assert_eq!(
            without_exemplar(r#"a_bucket{le="1",x="b # {\"}"} 2 # {trace_id="t"} 0.5 12.5"#),
            r#"a_bucket{le="1",x="b # {\"}"} 2"#
        );
        assert_eq!(
            without_exemplar("a_count 2 # {trace_id=\"t\"} 1"),
            "a_count 2"
        );
        assert_eq!(without_exemplar(r#"a{x="y # z"} 2"#), r#"a{x="y # z"} 2"#);
    }
}
