//! The chain file: what an account operator writes, in TOML or JSON.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};

/// An account's chains, as written in one chain file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainFile {
    /// The account the chains belong to.
    pub account_key: AccountKey,
    /// The chains, in the order they run when several match.
    #[serde(default)]
    pub chains: Vec<ChainSpec>,
}

/// The name of the chain that runs when no other chain matches.
pub const DEFAULT_CHAIN: &str = "default";

/// One chain: a match and ordered steps.
///
/// Held compactly, since an account's chains stay in memory for as long as
/// they are current (100,000 of them at 10,000 accounts): what every chain
/// has inline, and what few chains set (a description, a conversation, a
/// `when`, `cancel_on`, the flow controls) behind one pointer, read through
/// its accessors. A chain file's shape is [`ChainFields`]'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "ChainFields", into = "ChainFields")]
pub struct ChainSpec {
    /// Unique within the account: `^[A-Za-z0-9_-]{1,64}$`.
    pub name: String,
    /// The conversation type it matches (`*` = any).
    pub conversation_type: Pattern<ConversationType>,
    /// The event type it matches (`*` = any).
    pub event_type: Pattern<EventType>,
    /// The steps, run in order.
    pub steps: Vec<StepSpec>,
    /// Whether a later event of a conversation waits for this chain's run
    /// of an earlier one to end (a paused run included).
    pub order: Order,
    /// The rest, when the chain sets any of it.
    rare: Option<Box<RareParts>>,
}

/// What few chains set.
#[derive(Debug, Clone, PartialEq, Default)]
struct RareParts {
    description: Option<String>,
    conversation_key: Option<ConversationKey>,
    when: Option<String>,
    cancel_on: Option<EventMatch>,
    debounce: Option<Debounce>,
    throttle: Option<Limit>,
    rate_limit: Option<Limit>,
    concurrency: Option<Concurrency>,
}

/// A chain as a chain file writes it: [`ChainSpec`]'s serde shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename = "ChainSpec")]
pub struct ChainFields {
    /// Unique within the account: `^[A-Za-z0-9_-]{1,64}$`.
    pub name: String,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The conversation type it matches (`*` = any).
    #[serde(default)]
    pub conversation_type: Pattern<ConversationType>,
    /// The event type it matches (`*` = any).
    #[serde(default)]
    pub event_type: Pattern<EventType>,
    /// Only events of this conversation, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_key: Option<ConversationKey>,
    /// A Rhai expression over `event` that must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The steps, run in order.
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    /// Events that cancel a run of this chain while it is paused (in a
    /// `delay` or a `wait_for_event` step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_on: Option<EventMatch>,
    /// Only the last event of a burst (per key) runs the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce: Option<Debounce>,
    /// At most `limit` runs start per `period` (per key); the others wait
    /// their turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Limit>,
    /// At most `limit` runs per `period` (per key); the others are skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Limit>,
    /// At most `limit` runs at once (per key); the others wait for one to
    /// end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// Whether a later event of a conversation waits for this chain's run
    /// of an earlier one to end (a paused run included).
    #[serde(default, skip_serializing_if = "Order::is_independent")]
    pub order: Order,
}

impl From<ChainFields> for ChainSpec {
    fn from(f: ChainFields) -> Self {
        let rare = RareParts {
            description: f.description,
            conversation_key: f.conversation_key,
            when: f.when,
            cancel_on: f.cancel_on,
            debounce: f.debounce,
            throttle: f.throttle,
            rate_limit: f.rate_limit,
            concurrency: f.concurrency,
        };
        Self {
            name: f.name,
            conversation_type: f.conversation_type,
            event_type: f.event_type,
            steps: f.steps,
            order: f.order,
            rare: (rare != RareParts::default()).then(|| Box::new(rare)),
        }
    }
}

impl From<ChainSpec> for ChainFields {
    fn from(c: ChainSpec) -> Self {
        let rare = c.rare.map(|r| *r).unwrap_or_default();
        Self {
            name: c.name,
            description: rare.description,
            conversation_type: c.conversation_type,
            event_type: c.event_type,
            conversation_key: rare.conversation_key,
            when: rare.when,
            steps: c.steps,
            cancel_on: rare.cancel_on,
            debounce: rare.debounce,
            throttle: rare.throttle,
            rate_limit: rare.rate_limit,
            concurrency: rare.concurrency,
            order: c.order,
        }
    }
}

impl ChainSpec {
    fn rare(&self) -> Option<&RareParts> {
        self.rare.as_deref()
    }

    /// Free text for people.
    pub fn description(&self) -> Option<&str> {
        self.rare()?.description.as_deref()
    }

    /// Only events of this conversation, when set.
    pub fn conversation_key(&self) -> Option<&ConversationKey> {
        self.rare()?.conversation_key.as_ref()
    }

    /// A Rhai expression over `event` that must hold.
    pub fn when(&self) -> Option<&str> {
        self.rare()?.when.as_deref()
    }

    /// Events that cancel a run of this chain while it is paused (in a
    /// `delay` or a `wait_for_event` step).
    pub fn cancel_on(&self) -> Option<&EventMatch> {
        self.rare()?.cancel_on.as_ref()
    }

    /// Only the last event of a burst (per key) runs the chain.
    pub fn debounce(&self) -> Option<&Debounce> {
        self.rare()?.debounce.as_ref()
    }

    /// At most `limit` runs start per `period` (per key); the others wait
    /// their turn.
    pub fn throttle(&self) -> Option<&Limit> {
        self.rare()?.throttle.as_ref()
    }

    /// At most `limit` runs per `period` (per key); the others are skipped.
    pub fn rate_limit(&self) -> Option<&Limit> {
        self.rare()?.rate_limit.as_ref()
    }

    /// At most `limit` runs at once (per key); the others wait for one to
    /// end.
    pub fn concurrency(&self) -> Option<&Concurrency> {
        self.rare()?.concurrency.as_ref()
    }
}

/// A chain's `order`: whether runs of a conversation's events wait for one
/// another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// A later event's run goes ahead while an earlier one is paused (what
    /// a pause waits for, a reply, usually comes as a later event of the
    /// same conversation).
    #[default]
    Independent,
    /// A later event's run waits for the earlier one's to end: one run per
    /// conversation at once, in the order the events came.
    Conversation,
}

impl Order {
    fn is_independent(&self) -> bool {
        *self == Order::Independent
    }
}

/// The key of `order = "conversation"`.
pub const CONVERSATION_KEY: &str = "{{ event.conversation_key }}";

/// A chain's `debounce`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debounce {
    /// A template over `event` and `account`: the runs it groups.
    pub key: String,
    /// How long a key must be quiet before its last event runs.
    #[serde(with = "duration")]
    pub period: Duration,
}

/// A chain's `throttle` or `rate_limit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// A template over `event` and `account`: the runs it counts together.
    pub key: String,
    /// How many runs per period.
    pub limit: u32,
    /// The period.
    #[serde(with = "duration")]
    pub period: Duration,
}

/// A chain's `concurrency`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// A template over `event` and `account`: the runs it counts together.
    pub key: String,
    /// How many runs at once.
    pub limit: u32,
}

/// Flow control of a chain, in the order it applies to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// `rate_limit`: over the limit, the run is skipped.
    RateLimit,
    /// `debounce`: the run waits; a later event of its key supersedes it.
    Debounce,
    /// `throttle`: over the limit, the run waits its turn.
    Throttle,
    /// `concurrency`: at the limit, the run waits for another to end.
    Concurrency,
}

impl Control {
    /// Every control, in the order they apply.
    pub const ALL: [Control; 4] = [
        Control::RateLimit,
        Control::Debounce,
        Control::Throttle,
        Control::Concurrency,
    ];

    /// Its name in a chain file.
    pub fn as_str(self) -> &'static str {
        match self {
            Control::RateLimit => "rate_limit",
            Control::Debounce => "debounce",
            Control::Throttle => "throttle",
            Control::Concurrency => "concurrency",
        }
    }
}

impl ChainSpec {
    /// The key template of `control`, if the chain has it.
    pub fn flow_key(&self, control: Control) -> Option<&str> {
        match control {
            Control::RateLimit => self.rate_limit().map(|l| l.key.as_str()),
            Control::Debounce => self.debounce().map(|d| d.key.as_str()),
            Control::Throttle => self.throttle().map(|l| l.key.as_str()),
            Control::Concurrency => match (self.concurrency(), self.order) {
                (Some(c), _) => Some(c.key.as_str()),
                (None, Order::Conversation) => Some(CONVERSATION_KEY),
                (None, Order::Independent) => None,
            },
        }
    }

    /// The chain's `concurrency`, or, with `order = "conversation"`, one
    /// run per conversation at once.
    pub fn concurrency_rule(&self) -> Option<Concurrency> {
        match (self.concurrency(), self.order) {
            (Some(c), _) => Some(c.clone()),
            (None, Order::Conversation) => Some(Concurrency {
                key: CONVERSATION_KEY.to_string(),
                limit: 1,
            }),
            (None, Order::Independent) => None,
        }
    }

    /// The flow controls the chain has, in the order they apply.
    pub fn controls(&self) -> impl Iterator<Item = Control> + '_ {
        Control::ALL
            .into_iter()
            .filter(|c| self.flow_key(*c).is_some())
    }
}

/// Which later events reach a paused run: those of a type for which a Rhai
/// condition holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    /// The arriving event's type.
    pub event_type: EventType,
    /// A Rhai expression over `event` (the arriving event), `paused` (the
    /// paused run's event) and `steps` (the paused run's step outputs);
    /// default: [`SAME_CONVERSATION`].
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
}

/// The condition of an [`EventMatch`] that gives none: the arriving event
/// is of the paused run's conversation.
pub const SAME_CONVERSATION: &str = "event.conversation_key == paused.conversation_key";

impl EventMatch {
    /// The condition, or [`SAME_CONVERSATION`].
    pub fn condition(&self) -> &str {
        self.condition.as_deref().unwrap_or(SAME_CONVERSATION)
    }
}

/// One step of a chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// The handler: a built-in name, or `script:NAME`.
    pub handler: String,
    /// The step's name (defaults to the handler's); later steps see its output
    /// as `steps.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Handler options; strings are templates over `event`, `steps`, `account`.
    #[serde(default, skip_serializing_if = "StepConfig::is_empty")]
    pub config: StepConfig,
    /// What a permanent failure (or exhausted retries) does to the chain.
    #[serde(default, skip_serializing_if = "OnError::is_default")]
    pub on_error: OnError,
    /// How a retryable failure is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Box<RetrySpec>>,
    /// Skip the step when the same key was seen within a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Box<IdempotencySpec>>,
}

/// A step's options, held as compact JSON text: an account's chains stay in
/// memory for as long as they are current, and a parsed map costs several
/// times its text (a B-tree node with room for eleven entries, however few
/// it holds). Handlers get the map back with [`StepConfig::to_map`] — once
/// per use, which costs what cloning the map cost before. The text is
/// canonical (keys sorted, no spaces), so equal configs compare equal, and
/// equal texts are held once however many steps have them ([`shared`]):
/// accounts often run chains made from the same files.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct StepConfig(Arc<str>);

/// `text`, held once for every step config that has it. A text no config
/// holds any more is let go when the set next doubles.
fn shared(text: String) -> Arc<str> {
    struct Texts {
        held: HashSet<Arc<str>>,
        /// The size at which texts no config holds are let go.
        sweep_at: usize,
    }
    static TEXTS: LazyLock<Mutex<Texts>> = LazyLock::new(|| {
        Mutex::new(Texts {
            held: HashSet::new(),
            sweep_at: 1024,
        })
    });
    let mut texts = TEXTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(held) = texts.held.get(text.as_str()) {
        return Arc::clone(held);
    }
    if texts.held.len() >= texts.sweep_at {
        texts.held.retain(|t| Arc::strong_count(t) > 1);
        texts.sweep_at = (texts.held.len() * 2).max(1024);
    }
    let held: Arc<str> = text.into();
    texts.held.insert(Arc::clone(&held));
    held
}

impl StepConfig {
    /// The options as a map.
    pub fn to_map(&self) -> Map<String, Value> {
        if self.0.is_empty() {
            return Map::new();
        }
        serde_json::from_str(&self.0).expect("a step config is a JSON object it wrote itself")
    }

    /// Whether there are no options.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The options as JSON text (`""` for none).
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

impl From<Map<String, Value>> for StepConfig {
    fn from(map: Map<String, Value>) -> Self {
        if map.is_empty() {
            return Self::default();
        }
        Self(shared(
            serde_json::to_string(&map).expect("a JSON map serialises"),
        ))
    }
}

impl fmt::Debug for StepConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "{}" } else { &self.0 })
    }
}

impl Serialize for StepConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(s)
    }
}

/// How deep a step's options may nest: their JSON text is read back at
/// each use, by a reader that stops at 128 levels (a TOML file can nest
/// deeper, a dotted key at a time).
pub const MAX_CONFIG_DEPTH: usize = 64;

/// How deep `value` nests: 0 for a scalar, one more for each array or
/// object around it.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

impl<'de> Deserialize<'de> for StepConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        let nested = 1 + map.values().map(depth).max().unwrap_or(0);
        if nested > MAX_CONFIG_DEPTH {
            return Err(serde::de::Error::custom(format!(
                "the options nest {nested} levels deep; at most {MAX_CONFIG_DEPTH} are allowed"
            )));
        }
        Ok(Self::from(map))
    }
}

/// Per-step idempotency: a second run with the same rendered key inside the
/// window is skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySpec {
    /// A template over `event`, `steps`, `account`.
    pub key: String,
    /// How long a key is remembered.
    #[serde(with = "duration")]
    pub window: Duration,
}

impl StepSpec {
    /// The name later steps use: `name`, or the handler's name (the script's
    /// name for `script:NAME`).
    pub fn step_name(&self) -> &str {
        match &self.name {
            Some(name) => name,
            None => self
                .handler
                .strip_prefix("script:")
                .unwrap_or(&self.handler),
        }
    }
}

/// What a failed step does to its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// End the chain; the event goes to dead letters.
    #[default]
    Stop,
    /// Record the failure and go on with the next step.
    Continue,
}

impl OnError {
    fn is_default(&self) -> bool {
        *self == OnError::Stop
    }
}

/// Retry policy of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included (at least 1).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry.
    #[serde(default = "default_initial", with = "duration")]
    pub initial: Duration,
    /// Longest delay between attempts.
    #[serde(default = "default_max", with = "duration")]
    pub max: Duration,
    /// Factor between consecutive delays.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial: default_initial(),
            max: default_max(),
            multiplier: default_multiplier(),
        }
    }
}

impl RetrySpec {
    /// The delay before retry number `retry` (1 = the first retry), without jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = self.multiplier.powi(retry.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }
}

fn default_attempts() -> u32 {
    3
}
fn default_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_max() -> Duration {
    Duration::from_secs(30)
}
fn default_multiplier() -> f64 {
    2.0
}

/// Durations written as `"500ms"`, `"2s"`, `"1m"`, `"1h"` (or a number of seconds).
pub mod duration {
    use super::*;

    /// Parses `"500ms"`, `"2s"`, `"1.5s"`, `"1m"`, `"1h"`, `"1d"`.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let n: f64 = number.parse().map_err(|_| {
            format!("{s:?} is not a duration (write e.g. \"500ms\", \"2s\", \"1m\")")
        })?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" | "" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ));
            }
        };
        let secs = n * scale;
        if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    /// Formats as the shortest exact form `parse` reads back.
    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if !ms.is_multiple_of(1000) || ms == 0 {
            format!("{ms}ms")
        } else {
            format!("{}s", ms / 1000)
        }
    }

    /// Serde: writes a duration as `parse` reads it.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// Serde: reads a duration string (or a number of seconds).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Seconds(f64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) => parse(&s).map_err(serde::de::Error::custom),
            Raw::Seconds(n) => parse(&n.to_string()).map_err(serde::de::Error::custom),
        }
    }
}

/// A match on one key: a value, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Pattern<K> {
    /// Any value.
    #[default]
    Any,
    /// Exactly this value.
    Exact(K),
}

impl<K: PartialEq> Pattern<K> {
    /// Whether `value` matches.
    pub fn matches(&self, value: &K) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(k) => k == value,
        }
    }
}

impl<K: fmt::Display> fmt::Display for Pattern<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(k) => k.fmt(f),
        }
    }
}

impl<K: fmt::Display> Serialize for Pattern<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, K> Deserialize<'de> for Pattern<K>
where
    K: TryFrom<String>,
    K::Error: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            Ok(Pattern::Any)
        } else {
            K::try_from(s)
                .map(Pattern::Exact)
                .map_err(|e| serde::de::Error::custom(format!("{e} (or \"*\" for any)")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain holds what few chains set behind one pointer, allocated
    /// only when it sets any of it, and reads and writes the chain file's
    /// shape unchanged both ways.
    #[test]
    fn a_chain_keeps_its_file_shape_and_holds_its_rare_parts_apart() {
        let plain = serde_json::json!({
            "name": "welcome",
            "conversation_type": "survey",
            "event_type": "signed_up",
            "steps": [{ "handler": "log", "config": { "message": "hi" } }],
        });
        let chain: ChainSpec = serde_json::from_value(plain.clone()).unwrap();
        assert!(chain.rare.is_none());
        assert_eq!(chain.when(), None);
        assert_eq!(serde_json::to_value(&chain).unwrap(), plain);

        let full = serde_json::json!({
            "name": "reminder",
            "description": "Reminds once.",
            "conversation_type": "survey",
            "event_type": "signed_up",
            "conversation_key": "c-1",
            "when": "event.event_data.score >= 3",
            "steps": [{ "handler": "log", "config": { "message": "hi" } }],
            "cancel_on": { "event_type": "opted_out" },
            "debounce": { "key": "{{ event.conversation_key }}", "period": "5s" },
            "throttle": { "key": "t", "limit": 2, "period": "60s" },
            "rate_limit": { "key": "r", "limit": 3, "period": "3600s" },
            "concurrency": { "key": "k", "limit": 1 },
            "order": "conversation",
        });
        let chain: ChainSpec = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(chain.description(), Some("Reminds once."));
        assert_eq!(chain.conversation_key().map(|k| k.as_str()), Some("c-1"));
        assert_eq!(chain.when(), Some("event.event_data.score >= 3"));
        assert_eq!(
            chain.cancel_on().map(|m| m.event_type.as_str()),
            Some("opted_out")
        );
        assert_eq!(chain.debounce().map(|d| d.period.as_secs()), Some(5));
        assert_eq!(chain.throttle().map(|l| l.limit), Some(2));
        assert_eq!(chain.rate_limit().map(|l| l.limit), Some(3));
        assert_eq!(chain.concurrency().map(|c| c.limit), Some(1));
        assert_eq!(serde_json::to_value(&chain).unwrap(), full);

        // One rare part is enough to hold them.
        let mut one = plain.clone();
        one["when"] = "true".into();
        let chain: ChainSpec = serde_json::from_value(one.clone()).unwrap();
        assert!(chain.rare.is_some());
        assert_eq!(serde_json::to_value(&chain).unwrap(), one);

        // An unknown field is refused, named as before.
        let mut unknown = plain;
        unknown["whne"] = "true".into();
        let error = serde_json::from_value::<ChainSpec>(unknown)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `whne`"), "{error}");
        // Every chain pays for what it has inline: the rare parts are one
        // pointer.
        assert!(std::mem::size_of::<ChainSpec>() <= 112);
    }
}
