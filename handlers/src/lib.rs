//! Handlers: what a chain step runs.
//!
//! A [`Handler`] checks its configuration when a chain is stored and, for each
//! event, turns the step's input into an outcome: continue with an output,
//! stop the chain, or fail (retryable or permanent). Handlers do their side
//! effects through ports the dispatcher provides: [`ports`] for the outside
//! world (HTTP, mail, the bus), [`records`] for the records they keep
//! (contacts, message records, secrets, idempotency keys, scripts).
//! [`builtin::Log`] and [`builtin::Emit`] need none: `emit` returns the
//! events to publish, and the dispatcher publishes them.
//!
//! `script:NAME` steps run the account's Rhai script `NAME` ([`script`]); the
//! registry resolves them when a chain is stored, and compiles `when`
//! conditions with the same sandboxed engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use switchboard_rules::{FieldProblem, StepCatalog, StepSpec};
use switchboard_sdk::{
    AccountKey, ConversationKey, ConversationType, EventId, EventType, VumiApiEvent,
};

pub mod builtin;
pub mod contact;
pub mod delay;
pub mod digest;
pub mod email;
pub mod message_template;
pub mod notify;
pub mod options;
pub mod ports;
pub mod records;
mod scheduled;
pub mod script;
pub mod sms;
pub mod template;
mod templated;
pub mod versioned;
pub mod wait_for_event;
pub mod webhook;

pub use options::{OptionSpec, Options};
pub use script::{
    EventConditions, INLINE_MAX_OPERATIONS, RhaiLimits, ScriptHandler, ScriptRuntime, ScriptStore,
    ScriptStoreError,
};
pub use template::{EventValue, Scope, Templates};
pub use templated::release_recorded;

/// What the side-effecting built-in handlers need from the deployment.
#[derive(Debug, Clone)]
pub struct Services {
    /// Contacts (`create_contact`).
    pub contacts: Arc<dyn records::Contacts>,
    /// Message records (`send_sms`, `send_email`).
    pub messages: Arc<dyn records::Messages>,
    /// Account secrets (`payment_webhook`).
    pub secrets: Arc<dyn records::Secrets>,
    /// Outbound HTTP.
    pub http: Arc<dyn ports::HttpPort>,
    /// Outbound e-mail.
    pub mail: Arc<dyn ports::MailPort>,
    /// The names of the e-mail providers `mail` knows.
    pub email_providers: Vec<String>,
    /// Commands to workers on the bus.
    pub commands: Arc<dyn ports::CommandPort>,
    /// The deployment's SMS providers, by name.
    pub sms_providers: std::collections::BTreeMap<String, sms::SmsProvider>,
    /// The account message templates (`send_email`, `send_sms`).
    pub templates: Option<Arc<message_template::TemplateStore>>,
    /// Where templates' idempotency keys are claimed.
    pub idempotency: Arc<dyn records::IdempotencyKeys>,
    /// Who opted out of what (`send_sms`, `send_email`).
    pub preferences: Arc<dyn records::Preferences>,
    /// The one-click unsubscribe links `send_email` puts on its e-mails
    /// (none: no `List-Unsubscribe` header).
    pub unsubscribe: Option<Arc<dyn ports::UnsubscribeLinks>>,
    /// The most of each body (text, HTML) a message record keeps, in bytes
    /// (the message goes whole).
    pub message_body_cap: usize,
    /// The files `send_email` attaches.
    pub files: Arc<dyn records::Files>,
    /// The in-app inboxes `notify` leaves notifications in.
    pub inbox: Arc<dyn records::Inbox>,
}

/// Everything a handler sees of one step run.
#[derive(Debug)]
pub struct StepInput<'a> {
    /// The event being handled.
    pub event: &'a VumiApiEvent,
    /// The event converted for templates and scripts (once per event).
    pub event_value: &'a EventValue,
    /// The chain.
    pub chain: &'a str,
    /// The step (its name and raw config).
    pub step: &'a StepSpec,
    /// The outputs of the earlier steps of this chain, by step name.
    pub steps: &'a Map<String, Value>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The template engine.
    pub templates: &'a Templates,
    /// The scope templates render against.
    pub scope: &'a Scope,
}

impl StepInput<'_> {
    /// The step's name.
    pub fn step_name(&self) -> &str {
        self.step.step_name()
    }

    /// The step's whole config, every template rendered.
    pub fn render_config(&self) -> Result<Map<String, Value>, StepError> {
        let mut config = Value::Object(self.step.config.to_map());
        match self
            .templates
            .render_in_place(&mut config, "config", self.scope)
        {
            Ok(()) => match config {
                Value::Object(map) => Ok(map),
                _ => unreachable!("rendering an object in place leaves an object"),
            },
            Err(message) => Err(StepError::permanent(message)),
        }
    }

    /// The id of the `index`th event this step emits: derived from (event,
    /// chain, step, index), so a re-run emits the same ids.
    pub fn child_id(&self, index: usize) -> EventId {
        self.as_ref().child_id(index)
    }

    /// The step, by name.
    pub fn as_ref(&self) -> StepRef<'_> {
        StepRef {
            event: self.event,
            chain: self.chain,
            step: self.step_name(),
        }
    }
}

/// One step of one event's run, by name: what a handler needs to find the
/// records the step made ([`StepInput::child_id`]).
#[derive(Debug, Clone, Copy)]
pub struct StepRef<'a> {
    /// The event.
    pub event: &'a VumiApiEvent,
    /// The chain's name.
    pub chain: &'a str,
    /// The step's name.
    pub step: &'a str,
}

impl StepRef<'_> {
    /// As [`StepInput::child_id`].
    pub fn child_id(&self, index: usize) -> EventId {
        EventId::derived(self.event.id, self.chain, self.step, index)
    }
}

/// An event a step asks the dispatcher to publish once the step has succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct EmitRequest {
    /// The new event's conversation type.
    pub conversation_type: ConversationType,
    /// The new event's conversation.
    pub conversation_key: ConversationKey,
    /// The new event's type.
    pub event_type: EventType,
    /// The new event's data.
    pub event_data: Map<String, Value>,
    /// When the new event expires, if not when the handled event does.
    pub expires_at: Option<time::OffsetDateTime>,
}

/// A line a script wrote with `log(level, message)`; it goes into the trace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The message.
    pub message: String,
}

/// What a successful step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// The output later steps see as `steps.<name>`.
    pub data: Map<String, Value>,
    /// End the chain here (successfully).
    pub stop: bool,
    /// Events to publish, in order.
    pub emit: Vec<EmitRequest>,
    /// Lines the step logged for the trace (a script's, a `log` step's).
    pub logs: Vec<LogLine>,
    /// Pause the chain after this step (a `delay`, a `wait_for_event`): the
    /// run is kept in the journal and goes on at the next step when a
    /// durable timer fires, or when an awaited event arrives.
    pub pause: Option<Pause>,
}

/// How a step pauses its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// When the pause ends (ms since the epoch) if nothing ends it first.
    pub until_ms: u64,
    /// The event that ends it early (a `wait_for_event`'s), if any.
    pub awaits: Option<AwaitedEvent>,
    /// The step runs again when the pause ends, instead of the chain going
    /// on at the next one (a scheduled send, which sends then).
    pub again: bool,
    /// The digest window the event opens or joins (a `digest` step's): the
    /// dispatcher decides which, and pauses only the event that opens it.
    pub window: Option<DigestWindow>,
}

/// A digest's window, as a `digest` step asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestWindow {
    /// The rendered key: events of the same key share a window.
    pub key: String,
    /// The window closes at this many events (before its time,
    /// [`Pause::until_ms`], if it has one): the step's `max_events`, at
    /// most [`MAX_WINDOW_EVENTS`].
    pub max_events: u32,
}

/// The most events a digest window holds: one with only a `window` closes
/// early at this many, and `max_events` is at most this. The close reads
/// them all, and the opener's journal and trace keep them.
pub const MAX_WINDOW_EVENTS: u32 = 1_000;

/// The most a digest window's events come to, encoded: an event that
/// would take a window past it closes the window as it is and opens the
/// next (one that alone comes to it closes as it opens). The close writes
/// them all in one journal record, which the replicated store's changelog
/// sends as one NATS message (at most 1 MiB by default).
pub const MAX_WINDOW_BYTES: u64 = 512 << 10;

/// A pause that ends only when something other than time ends it (a
/// digest window with `max_events` and no `window`).
pub const NEVER: u64 = u64::MAX;

/// An event a paused run waits for: its type, and a Rhai condition over
/// `event`, `paused` and `steps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwaitedEvent {
    /// The event type.
    pub event_type: String,
    /// The condition.
    pub condition: String,
}

impl StepOutput {
    /// Continue with `data` as the output.
    pub fn next(data: Map<String, Value>) -> Self {
        Self {
            data,
            ..Self::default()
        }
    }
}

/// A failed step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// Worth trying again (a timeout, a 503); `after` is the delay the peer asked for.
    #[error("{message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// How long to wait, when the peer said (e.g. `Retry-After`).
        after: Option<Duration>,
    },
    /// Trying again cannot help (bad input, a 400, an undefined template variable).
    #[error("{message}")]
    Permanent {
        /// What went wrong.
        message: String,
    },
}

impl StepError {
    /// A permanent failure.
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError::Permanent {
            message: message.into(),
        }
    }

    /// A retryable failure.
    pub fn retryable(message: impl Into<String>, after: Option<Duration>) -> Self {
        StepError::Retryable {
            message: message.into(),
            after,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StepError::Retryable { .. })
    }
}

/// Marks what a dry run made up: a status a step would only learn by
/// acting, or the prefix of an id it would generate.
pub const SIMULATED: &str = "simulated";

/// A step handler.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + std::fmt::Debug {
    /// The name chains use in `handler = "..."`.
    fn name(&self) -> &'static str;

    /// What the handler does, in a sentence or two (the catalog's).
    fn description(&self) -> &'static str;

    /// What the step's output holds, as later steps see it in `steps.NAME`.
    fn output(&self) -> &'static str;

    /// The step's options. The registry checks a step's config against them
    /// when a chain is stored, and the catalog publishes them as a JSON
    /// Schema: one description, so the two agree on every option's kind
    /// (a literal's own form, say an E.164 number, is the option's check).
    fn options(&self) -> Options;

    /// Checks of a step's config that its [`Handler::options`] cannot say
    /// (run after them when a chain is stored). Templates are checked by
    /// the registry.
    fn check_config(&self, _config: &Map<String, Value>) -> Vec<FieldProblem> {
        Vec::new()
    }

    /// The account secrets a step's config names, each with the field that
    /// names it: a chain is stored only when they are set, and a secret is
    /// removed only when no chain names it.
    fn secrets_named(&self, _config: &Map<String, Value>) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// The Rhai match conditions (over `event`, `paused` and `steps`) a
    /// step's config holds, each with its field: the registry checks they
    /// compile when a chain is stored.
    fn match_conditions(&self, _config: &Map<String, Value>) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// A run paused by this step to run it again ([`Pause::again`]) was
    /// cancelled (its chain's `cancel_on`) by `cause`: let go of what the
    /// step holds for it, given the `output` it paused with (a scheduled
    /// send cancels its messages).
    fn cancel_paused(
        &self,
        _account: &AccountKey,
        _output: &Map<String, Value>,
        _cause: &str,
    ) -> Result<(), records::RecordError> {
        Ok(())
    }

    /// The `step` failed for good, with `error`: its error was permanent
    /// or its retries ran out (its run goes on under `on_error =
    /// "continue"`, or ends in dead letters), or its run ended while it
    /// waited to be tried again (the event expired, the chain was
    /// removed). Settle what the
    /// step recorded as still to do (a send records its unsent messages
    /// `failed` and gives their template keys back), and say whether part
    /// of its effect happened all the same (a send to several recipients
    /// whose first went): the step's idempotency key then holds, so that a
    /// duplicate event does not do that part again (an error counts as
    /// yes). When `replayable` (the run ended in dead letters), replaying
    /// the letter runs the step again; otherwise nothing will.
    fn failed_for_good(
        &self,
        _step: &StepRef<'_>,
        _error: &str,
        _replayable: bool,
    ) -> Result<bool, records::RecordError> {
        Ok(false)
    }

    /// Runs the step for one event.
    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError>;

    /// What [`Handler::handle`] would return, with no side effect at all:
    /// every check it makes before it acts (its config, recipients, secrets,
    /// provider) and the output it would give, so that later steps' templates
    /// resolve in a dry run. What only acting can tell (a provider's id, a
    /// receiver's answer) is [`SIMULATED`], and ids it would generate are
    /// marked with it.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError>;

    /// What running the step changes besides its output, which tells the
    /// journal how soon its completion must be durable.
    fn effects(&self) -> Effects {
        Effects::External
    }
}

/// What a step changes besides its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effects {
    /// Nothing (a log line, an emit, whose events the dispatcher publishes,
    /// a script): the step is journaled with the event's end, and re-run
    /// after a crash in between.
    None,
    /// Records in the dispatcher's own store (a contact): journaled at once
    /// but not flushed, since the store's log keeps the record only if it
    /// keeps the change written before it. After a crash the step has
    /// happened and is journaled, or neither.
    Local,
    /// Records in the dispatcher's own store, kept so that the same step of
    /// the same event running again finds them as it left them and answers
    /// as it did (a contact upsert): journaled with the event's end, as a
    /// step without effects, and run again after a crash in between.
    LocalRepeatable,
    /// Something outside the dispatcher (a message, a request): journaled at
    /// once and made durable before the next such step starts, so that a
    /// crash repeats at most the one step per worker not yet durable.
    External,
}

impl Effects {
    /// `none`, `local` or `external`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effects::None => "none",
            Effects::Local | Effects::LocalRepeatable => "local",
            Effects::External => "external",
        }
    }
}

/// The handlers a dispatcher knows, by name, and the account scripts
/// (`script:NAME`) when a script store is attached.
#[derive(Debug, Clone)]
pub struct Registry {
    handlers: HashMap<&'static str, Arc<dyn Handler>>,
    templates: Arc<Templates>,
    runtime: Arc<ScriptRuntime>,
    scripts: Option<(Arc<ScriptStore>, Arc<dyn Handler>, ScriptHandler)>,
    /// The account message templates, when attached.
    message_templates: Option<Arc<message_template::TemplateStore>>,
    /// The account secrets steps name, checked when a chain is stored.
    secrets: Option<Arc<dyn records::Secrets>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_builtins()
    }
}

impl Registry {
    /// A registry with no handler.
    pub fn empty() -> Self {
        Self {
            handlers: HashMap::new(),
            templates: Arc::new(Templates::new()),
            runtime: Arc::new(ScriptRuntime::default()),
            scripts: None,
            message_templates: None,
            secrets: None,
        }
    }

    /// The account message templates, when attached.
    pub fn message_templates(&self) -> Option<&Arc<message_template::TemplateStore>> {
        self.message_templates.as_ref()
    }

    /// Attaches the account scripts: `script:NAME` steps run them, and `when`
    /// conditions use their runtime (and its limits).
    pub fn with_scripts(mut self, scripts: Arc<ScriptStore>) -> Self {
        self.runtime = scripts.runtime().clone();
        let handler = ScriptHandler::new(scripts.clone());
        self.scripts = Some((scripts, Arc::new(handler.clone()), handler));
        self
    }

    /// The account scripts, when attached.
    pub fn scripts(&self) -> Option<&Arc<ScriptStore>> {
        self.scripts.as_ref().map(|(s, _, _)| s)
    }

    /// The handler of `script:NAME` steps, when scripts are attached.
    pub fn script_handler(&self) -> Option<&ScriptHandler> {
        self.scripts.as_ref().map(|(_, _, h)| h)
    }

    /// The Rhai runtime (`when` conditions, scripts).
    pub fn runtime(&self) -> &Arc<ScriptRuntime> {
        &self.runtime
    }

    /// A registry with the built-in handlers that need no outside peer:
    /// `log` and `emit`.
    pub fn with_builtins() -> Self {
        let mut r = Self::empty();
        r.register(Arc::new(builtin::Log));
        r.register(Arc::new(builtin::Emit));
        r.register(Arc::new(delay::Delay));
        r.register(Arc::new(digest::Digest));
        r.register(Arc::new(wait_for_event::WaitForEvent));
        r
    }

    /// A registry with every built-in handler, side effects going through `services`.
    pub fn with_services(services: Services) -> Self {
        let mut r = Self::with_builtins();
        r.secrets = Some(services.secrets.clone());
        r.message_templates = services.templates.clone();
        let templated = templated::TemplatePorts {
            templates: services.templates.clone(),
            contacts: services.contacts.clone(),
            idempotency: services.idempotency,
            preferences: services.preferences,
            body_cap: services.message_body_cap,
        };
        r.register(Arc::new(contact::CreateContact::new(
            services.contacts.clone(),
        )));
        r.register(Arc::new(notify::Notify::new(
            services.inbox,
            services.contacts.clone(),
            services.templates.clone(),
        )));
        r.register(Arc::new(sms::SendSms::new(
            services.sms_providers,
            services.http.clone(),
            services.commands,
            services.messages.clone(),
            templated.clone(),
        )));
        r.register(Arc::new(email::SendEmail::new(
            services.mail,
            services.email_providers,
            services.messages,
            templated,
            services.unsubscribe,
            services.files,
        )));
        r.register(Arc::new(webhook::PaymentWebhook::new(
            services.http,
            services.secrets,
        )));
        r
    }

    /// Adds (or replaces) a handler.
    pub fn register(&mut self, handler: Arc<dyn Handler>) {
        self.handlers.insert(handler.name(), handler);
    }

    /// The handler called `name`; for `script:NAME`, the script handler.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        if name.starts_with("script:") {
            return self.scripts.as_ref().map(|(_, h, _)| h);
        }
        self.handlers.get(name)
    }

    /// The shared template engine.
    pub fn templates(&self) -> &Arc<Templates> {
        &self.templates
    }

    /// The account secrets `step` names, each with the field that names it
    /// (none for an unknown handler).
    pub fn secrets_named(&self, step: &StepSpec) -> Vec<(&'static str, String)> {
        self.get(&step.handler)
            .map(|h| h.secrets_named(&step.config.to_map()))
            .unwrap_or_default()
    }

    /// The registered handlers, by name.
    pub fn handlers(&self) -> Vec<&Arc<dyn Handler>> {
        let mut handlers: Vec<_> = self.handlers.values().collect();
        handlers.sort_unstable_by_key(|h| h.name());
        handlers
    }

    /// The names of the registered handlers, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.handlers.keys().copied().collect();
        names.sort_unstable();
        names
    }
}

impl StepCatalog for Registry {
    fn check_step(
        &self,
        account: &AccountKey,
        step: &StepSpec,
        earlier: &[&str],
    ) -> Result<(), Vec<FieldProblem>> {
        if let Some(name) = step.handler.strip_prefix("script:") {
            let Some(scripts) = self.scripts() else {
                return Err(vec![FieldProblem::new(
                    "handler",
                    format!(
                        "{:?}: this registry has no script store, so script handlers cannot run",
                        step.handler
                    ),
                )]);
            };
            match scripts.current(account, name) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(vec![FieldProblem::new(
                        "handler",
                        format!(
                            "account {account} has no script named {name:?}; store it first with \
                             `switchboard scripts put {account} {name} FILE`"
                        ),
                    )]);
                }
                Err(e) => return Err(vec![FieldProblem::new("handler", e.to_string())]),
            }
        }
        let Some(handler) = self.get(&step.handler) else {
            return Err(vec![FieldProblem::new(
                "handler",
                format!(
                    "unknown handler {:?}; the built-in handlers are {}",
                    step.handler,
                    self.names().join(", ")
                ),
            )]);
        };
        let mut problems = Vec::new();
        let config = step.config.to_map();
        self.templates.check(
            &Value::Object(config.clone()),
            "config",
            earlier,
            &mut problems,
        );
        problems.extend(handler.options().check(&config));
        problems.extend(handler.check_config(&config));
        for (field, expr) in handler.match_conditions(&config) {
            if let Err(e) = self.runtime.check_match(&expr) {
                problems.push(FieldProblem::new(
                    field,
                    format!("not a valid Rhai expression: {e}"),
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn check_secrets(&self, account: &AccountKey, step: &StepSpec) -> Vec<FieldProblem> {
        let Some(secrets) = &self.secrets else {
            return Vec::new();
        };
        self.secrets_named(step)
            .into_iter()
            .filter_map(|(field, name)| match secrets.get(account, &name) {
                Ok(Some(_)) => None,
                Ok(None) => Some(FieldProblem::new(
                    field,
                    format!(
                        "account {account} has no secret named {name:?}; set it first with \
                         `switchboard secrets set {account} {name}` (the value on stdin), then \
                         apply again"
                    ),
                )),
                Err(e) => Some(FieldProblem::new(
                    field,
                    format!("reading secret {name:?} of account {account}: {e}"),
                )),
            })
            .collect()
    }

    fn check_key_template(&self, _account: &AccountKey, template: &str) -> Vec<String> {
        let mut problems = Vec::new();
        self.templates.check(
            &Value::String(template.to_string()),
            "key",
            &[],
            &mut problems,
        );
        problems.into_iter().map(|p| p.message).collect()
    }

    fn check_condition(&self, _account: &AccountKey, expr: &str) -> Result<(), String> {
        self.runtime
            .check_condition(expr)
            .map_err(|e| format!("not a valid Rhai expression: {e}"))
    }

    fn check_match(&self, _account: &AccountKey, expr: &str) -> Result<(), String> {
        self.runtime
            .check_match(expr)
            .map_err(|e| format!("not a valid Rhai expression: {e}"))
    }
}

#[cfg(test)]
mod tests;
