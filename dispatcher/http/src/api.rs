//! The HTTP API of a running dispatcher (axum), JSON under `/v1`.
//!
//! Every request and response body is a type of `switchboard_api` (one
//! module per resource there), so the answers built here and what the CLI
//! reads are the same types. Errors are `{"error": {"code": "...",
//! "message": "..."}}` ([`switchboard_api::ErrorResponse`]) with the status
//! that fits. Every route is declared once in [`ROUTES`]; who may call which
//! is decided in one place, [`auth::require_token`], in front of all of them.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde_json::Value;
use switchboard_api::chains::{
    AccountList, ChainAnswer, ChainHistory, ChainVersion as ChainVersionAnswer, ChainVersionSummary,
};
use switchboard_api::dead_letters::{
    DeadLetterList, DiscardedLetter, ReplayFilter, ReplayedLetter, ReplayedLetters, SkippedLetter,
};
use switchboard_api::error::{ChainProblem, ScriptCompileError, StepRef};
use switchboard_api::events::Accepted;
use switchboard_api::health::{Health, Readiness};
use switchboard_api::inbound::{
    CreateInboundRequest, CreatedInbound, InboundList, NumberAnswer, NumberList, RevokedInbound,
    UnmatchedList,
};
use switchboard_api::records::{ContactList, MessageList, SecretList, SecretRemoved, SecretSet};
use switchboard_api::scripts::{
    RemovedScript, Script, ScriptHistory, ScriptList, ScriptSummary, StoredScript, VersionQuery,
};
use switchboard_api::tokens::{CreatedToken, NewTokenRequest, RevokedToken, TokenList};
use switchboard_api::{ErrorBody, ErrorResponse, ListQuery};
use switchboard_engine::bus::BusError;
use switchboard_handlers::ScriptStore;
use switchboard_handlers::records::secrets::check_secret_name;
use switchboard_handlers::records::{Contacts, MessageStatus, Messages, Secrets, SourceVersion};
use switchboard_handlers::script::ScriptStoreError;
use switchboard_rules::{ChainStoreError, ChainVersion, Format, parse_chain_file, validate};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};
use switchboard_store::StoreError;

use switchboard_engine::dry_run;

use crate::auth::{self, Auth, Principal, TokenError};
use crate::inbound::{CreateError, Inbound, InboundError, Provider};
use switchboard_engine::bus::Bus;
use switchboard_engine::dead_letters::LetterStatus;
use switchboard_engine::executor::{LetterError, Letters};
use switchboard_engine::metrics::{Gauges, Metrics};
use switchboard_engine::trace::Traces;
use switchboard_handlers::Registry;
use switchboard_rules::ChainStore;
use switchboard_store::Store;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Set once the dispatcher has started: caught up with the shared state
    /// (replicas), chain files applied, consuming.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Every account's chains.
    pub chains: Arc<ChainStore>,
    /// The handlers, the template engine and the Rhai runtime.
    pub registry: Arc<Registry>,
    /// The bus events are published on.
    pub bus: Arc<dyn Bus>,
    /// The store (readiness and the backend's kind).
    pub store: Store,
    /// Event traces.
    pub traces: Traces,
    /// Each pass over an event as it ends (the live tail).
    pub tail: switchboard_engine::tail::Tail,
    /// The kinds of event each account has had.
    pub event_kinds: switchboard_engine::event_kinds::EventKinds,
    /// Dead letters: list, replay, discard.
    pub letters: Letters,
    /// Timers of paused chains (their count; listings read the store).
    pub timers: switchboard_engine::timers::Timers,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The event path's own threads, as started (`runtime.event_threads`;
    /// 0: it runs on the shared runtime).
    pub event_threads: usize,
    /// Largest accepted event, in bytes.
    pub max_event_bytes: usize,
    /// How deep a lineage of emitted events may go (dry runs follow
    /// emitted events that far).
    pub max_depth: u32,
    /// The bus's subject prefix.
    pub prefix: String,
    /// Contacts of every account.
    pub contacts: Arc<dyn Contacts>,
    /// Message records of every account.
    pub messages: Arc<dyn Messages>,
    /// Where templates' idempotency keys are claimed: a cancelled message
    /// gives its key back.
    pub idempotency: Arc<dyn switchboard_handlers::records::IdempotencyKeys>,
    /// Secrets of every account (write-only).
    pub secrets: Arc<dyn Secrets>,
    /// Preferences of every account.
    pub preferences: Arc<dyn switchboard_handlers::records::Preferences>,
    /// In-app inboxes of every account.
    pub inbox: Arc<dyn switchboard_handlers::records::Inbox>,
    /// Their changes, by receiver, for the live streams.
    pub inbox_feed: Arc<crate::inbox_feed::InboxFeed>,
    /// The one-click unsubscribe links.
    pub unsubscribe: Arc<crate::unsubscribe::OneClick>,
    /// The files accounts keep.
    pub files: Arc<dyn switchboard_handlers::records::Files>,
    /// What they may keep.
    pub file_policy: switchboard_handlers::records::FilePolicy,
    /// The admin token and the account tokens.
    pub auth: Arc<Auth>,
    /// The per-account limit on `POST /v1/events`.
    pub ingest_limit: Arc<crate::ratelimit::RateLimiter>,
    /// Inbound provider webhooks.
    pub inbound: Arc<Inbound>,
    /// The partitions of the bus this replica consumes, when replicas share it.
    pub partitions: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
    /// The replicas sharing the bus and their partitions, as this one sees
    /// them, when replicas share it.
    pub replicas: Option<tokio::sync::watch::Receiver<switchboard_api::health::ReplicaView>>,
    /// The web console's signed-in browsers.
    pub sessions: Arc<crate::console::session::Sessions>,
    /// Held while a chain apply checks what its chains name and stores
    /// them, and while a script or secret is checked for users and
    /// removed: in this process, a chain never ends up naming a secret or
    /// script removed between its check and its store. (Replicas each have
    /// their own; across them the race remains.)
    pub config_writes: Arc<std::sync::Mutex<()>>,
}

impl ApiState {
    /// Takes [`ApiState::config_writes`]. A write that panicked while it
    /// held the lock left nothing half done that the next one must not
    /// see (each store write is whole), so the lock is taken all the same
    /// rather than failing every later config write.
    pub fn config_write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.config_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

use handlers::{builtin as handlers_builtin, of_account as handlers_of_account};

/// Declares every route once: it defines [`ROUTES`] and the function that
/// adds those routes to a router, from the same lines, so that no route can
/// exist without being listed (the isolation test in `tests/auth.rs` walks
/// [`ROUTES`] and fails for a route it has no row for).
macro_rules! routes {
    ($($path:literal => { $($method:ident: $handler:ident),+ $(,)? })+) => {
        /// Every route of the API as (method, path), in axum's path syntax and
        /// in declaration order.
        pub const ROUTES: &[(&str, &str)] = &[$($((stringify!($method), $path)),+),+];

        fn add_routes(router: Router<ApiState>) -> Router<ApiState> {
            router$(.route(
                $path,
                MethodRouter::<ApiState>::new()$(.on(MethodFilter::$method, $handler))+,
            ))+
        }
    };
}

routes! {
    "/healthz" => { GET: healthz }
    "/readyz" => { GET: readyz }
    "/metrics" => { GET: metrics }
    "/v1/events" => { POST: ingest }
    "/v1/accounts" => { GET: list_accounts }
    "/v1/handlers" => { GET: handlers_builtin }
    "/v1/accounts/{account}/handlers" => { GET: handlers_of_account }
    "/v1/accounts/{account}/event-kinds" => { GET: list_event_kinds }
    "/v1/accounts/{account}/counts" => { GET: account_counts }
    "/v1/accounts/{account}/timers" => { GET: list_timers }
    "/v1/accounts/{account}/events" => { GET: list_events }
    "/v1/accounts/{account}/events/stream" => { GET: event_stream }
    "/v1/accounts/{account}/chains" => {
        GET: show_chains, PUT: apply_chains, DELETE: remove_all_chains
    }
    "/v1/accounts/{account}/chains/{name}" => { GET: show_chain, DELETE: remove_chain }
    "/v1/accounts/{account}/chain-versions" => { GET: history }
    "/v1/accounts/{account}/chain-versions/{version}" => { GET: show_version }
    "/v1/accounts/{account}/chain-versions/{version}/restore" => { POST: restore }
    "/v1/accounts/{account}/chain-test" => { POST: test_chains }
    "/v1/accounts/{account}/scripts" => { GET: list_scripts }
    "/v1/accounts/{account}/scripts/{name}" => {
        GET: show_script, PUT: put_script, DELETE: remove_script
    }
    "/v1/accounts/{account}/scripts/{name}/versions" => { GET: script_history }
    "/v1/accounts/{account}/scripts/{name}/test" => { POST: test_script }
    "/v1/accounts/{account}/templates" => { GET: list_templates }
    "/v1/accounts/{account}/templates/{slug}" => {
        GET: show_template, PUT: put_template, DELETE: remove_template
    }
    "/v1/accounts/{account}/templates/{slug}/versions" => { GET: template_history }
    "/v1/accounts/{account}/templates/{slug}/test" => { POST: test_template }
    "/v1/accounts/{account}/events/{id}/trace" => { GET: trace }
    "/v1/accounts/{account}/events/{id}/rerun" => { POST: rerun_event }
    "/v1/accounts/{account}/contacts" => { GET: list_contacts }
    "/v1/accounts/{account}/contacts/{key}" => { GET: show_contact }
    "/v1/accounts/{account}/preferences/{contact}" => {
        GET: show_preferences, PUT: set_preferences
    }
    "/v1/accounts/{account}/messages" => { GET: list_messages }
    // A static segment wins over `{id}` (message ids are UUIDs).
    "/v1/accounts/{account}/messages/unmatched" => { GET: list_unmatched }
    "/v1/accounts/{account}/messages/{id}" => { GET: show_message }
    "/v1/accounts/{account}/messages/{id}/cancel" => { POST: cancel_message }
    "/v1/accounts/{account}/inbound" => { GET: list_inbound }
    "/v1/accounts/{account}/inbound/{provider}" => {
        GET: show_inbound, POST: create_inbound, DELETE: revoke_inbound
    }
    "/v1/accounts/{account}/inbox/{receiver}" => { GET: show_inbox }
    "/v1/accounts/{account}/inbox/{receiver}/count" => { GET: inbox_count }
    "/v1/accounts/{account}/inbox/{receiver}/read_all" => { POST: inbox_read_all }
    "/v1/accounts/{account}/inbox/{receiver}/token" => { POST: mint_receiver_token }
    "/v1/accounts/{account}/inbox/{receiver}/{id}/{action}" => { POST: inbox_mark }
    "/v1/accounts/{account}/inbox-tokens/rotate" => { POST: rotate_receiver_tokens }
    // A receiver token's own inbox.
    "/v1/inbox" => { GET: own_inbox }
    "/v1/inbox/count" => { GET: own_count }
    "/v1/inbox/read_all" => { POST: own_read_all }
    "/v1/inbox/stream" => { GET: own_stream }
    "/inbox/widget.js" => { GET: inbox_widget }
    "/v1/inbox/{id}/{action}" => { POST: own_mark }
    "/v1/accounts/{account}/files" => { GET: list_files }
    "/v1/accounts/{account}/files/{name}" => {
        GET: get_file, PUT: put_file, DELETE: remove_file
    }
    "/v1/accounts/{account}/numbers" => { GET: list_numbers }
    "/v1/accounts/{account}/numbers/{transport}/{address}" => {
        PUT: add_number, DELETE: remove_number
    }
    // Authenticated by the secret in the URL and the provider's signature.
    "/v1/inbound/{account}/{provider}/{secret}" => { POST: receive_inbound }
    // Authenticated by Twilio's signature (the deployment's auth token).
    "/v1/inbound/twilio-status/{account}" => { POST: receive_twilio_status }
    // Authenticated by SendGrid's signature (the Signed Event Webhook's key).
    "/v1/inbound/sendgrid-events" => { POST: receive_sendgrid_events }
    // Authenticated by the link's signature.
    "/v1/unsubscribe/{account}/{token}" => {
        GET: unsubscribe_page, POST: unsubscribe_one_click
    }
    "/v1/accounts/{account}/secrets" => { GET: list_secrets }
    "/v1/accounts/{account}/secrets/{name}" => { PUT: set_secret, DELETE: remove_secret }
    "/v1/accounts/{account}/dead-letters" => { GET: list_dead_letters }
    "/v1/accounts/{account}/dead-letters/replay" => { POST: replay_dead_letters }
    "/v1/accounts/{account}/dead-letters/{id}" => {
        GET: show_dead_letter, DELETE: discard_dead_letter
    }
    "/v1/accounts/{account}/dead-letters/{id}/replay" => { POST: replay_dead_letter }
    "/v1/accounts/{account}/tokens" => { GET: list_tokens, POST: create_token }
    "/v1/accounts/{account}/tokens/{id}" => { DELETE: revoke_token }
}

/// The router of the whole API: the [`ROUTES`], each behind
/// [`auth::require_token`].
pub fn router(state: ApiState) -> Router {
    let body_limit = body_limit(state.max_event_bytes);
    add_routes(Router::new())
        .merge(crate::console::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_token,
        ))
        .layer(middleware::from_fn_with_state(
            state.store.clone(),
            require_caught_up,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(inbox_cors))
        .with_state(state)
}

/// While a replica catches up with the shared state, its copy may lack
/// tokens, chains, inbound URLs and records: it answers 503 (which clients
/// and providers retry) rather than from a partial copy. The probes and
/// `/metrics` answer throughout.
async fn require_caught_up(
    State(store): State<switchboard_store::Store>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
    if probe || store.is_caught_up() {
        return next.run(request).await;
    }
    ApiError::unavailable(
        "catching_up",
        "this replica is catching up with the shared state; try again in a moment",
    )
    .into_response()
}

/// An API error: status, code and message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
    /// A passing failure: the answer carries `Retry-After`.
    passing: bool,
}

impl ApiError {
    /// The answer's status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// What went wrong.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            passing: false,
        }
    }

    /// 503 for a failure that passes on its own (the bus or the shared
    /// state coming back, a replica catching up): the answer carries
    /// `Retry-After`.
    pub(crate) fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            passing: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// A publish the bus refused: 503 `bus_unavailable` with `Retry-After`
    /// when the bus could not be reached (it comes back), or as
    /// [`ApiError::internal`] when the store under the embedded bus failed.
    /// `e` is what the answer says; `bus` the bus's error inside it.
    pub(crate) fn bus(e: &(dyn std::error::Error + 'static), bus: &BusError) -> Self {
        match bus {
            BusError::Unavailable(_) => Self::unavailable("bus_unavailable", e.to_string()),
            BusError::Store(_) | BusError::InUse(_) => Self::below(e),
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A failure below the API: 503 when it is the shared state's and
    /// passing ([`switchboard_store::StoreError::is_transient`]: a replica cannot reach the
    /// partition's owner or the changelog, during a take-over or a leader
    /// election), which clients retry; 500 `outcome_unknown` for a write
    /// that may or may not be stored (sending it again could apply it
    /// twice: a second token, a second message); else 500.
    pub(crate) fn internal(e: impl std::error::Error + 'static) -> Self {
        Self::below(&e)
    }

    /// [`ApiError::internal`] of a borrowed error.
    fn below(e: &(dyn std::error::Error + 'static)) -> Self {
        if is_transient(e) {
            tracing::warn!(error = %e, "API request met a passing failure of the shared state");
            return Self::unavailable("unavailable", format!("{e}; try again in a moment"));
        }
        tracing::error!(error = %e, "API request failed");
        if is_outcome_unknown(e) {
            return Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "outcome_unknown",
                format!("{e}; read it back before sending it again"),
            );
        }
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

/// The store's errors among `e` and the errors it wraps.
fn store_errors<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'e StoreError> {
    std::iter::successors(Some(e), |e| e.source()).filter_map(|e| e.downcast_ref::<StoreError>())
}

/// Whether `e`, or an error it wraps, is a write that may or may not be
/// stored.
pub(crate) fn is_outcome_unknown(e: &(dyn std::error::Error + 'static)) -> bool {
    store_errors(e).any(|e| matches!(e, StoreError::OutcomeUnknown { .. }))
}

/// Whether `e`, or an error it wraps, is a passing failure of the shared
/// state.
pub(crate) fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    store_errors(e).any(StoreError::is_transient)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code.to_string(),
                message: self.message,
                details: self.details,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.passing {
            retry_after(&mut response);
        }
        response
    }
}

/// How many seconds a 503 asks a client to wait before it tries again:
/// a take-over or a leader election passes in a few.
const RETRY_AFTER_SECS: u32 = 1;

/// Marks a 503 with `Retry-After`, so that clients and providers that
/// honour it come back soon rather than on their own longer schedule.
pub(crate) fn retry_after(response: &mut Response) {
    response.headers_mut().insert(
        header::RETRY_AFTER,
        axum::http::HeaderValue::from(RETRY_AFTER_SECS),
    );
}

impl From<ChainStoreError> for ApiError {
    fn from(e: ChainStoreError) -> Self {
        match &e {
            ChainStoreError::NoChains { .. }
            | ChainStoreError::NoSuchChain { .. }
            | ChainStoreError::NoSuchVersion { .. } => ApiError::not_found(e.to_string()),
            ChainStoreError::Invalid(v) => {
                let mut err = ApiError::bad_request("invalid_chains", e.to_string());
                err.details = Some(problems_json(v));
                err
            }
            ChainStoreError::Store(_) | ChainStoreError::Corrupt { .. } => ApiError::internal(e),
        }
    }
}

impl From<ScriptStoreError> for ApiError {
    fn from(e: ScriptStoreError) -> Self {
        match &e {
            ScriptStoreError::NoSuch { .. } | ScriptStoreError::NoSuchVersion { .. } => {
                ApiError::not_found(e.to_string())
            }
            ScriptStoreError::InvalidName { .. } => {
                ApiError::bad_request("invalid_name", e.to_string())
            }
            ScriptStoreError::Compile { error, .. } => {
                let mut err = ApiError::bad_request("invalid_script", e.to_string());
                err.details = Some(to_json(&ScriptCompileError {
                    line: error.line,
                    column: error.column,
                    message: error.message.clone(),
                }));
                err
            }
            ScriptStoreError::Records(_) => ApiError::internal(e),
        }
    }
}

fn problems_json(v: &switchboard_rules::ValidationError) -> Value {
    let problems: Vec<ChainProblem> = v
        .problems
        .iter()
        .map(|p| ChainProblem {
            chain: p.chain.clone(),
            step: p.step.as_ref().map(|(position, name)| StepRef {
                position: *position,
                name: name.clone(),
            }),
            field: p.field.clone(),
            message: p.message.clone(),
        })
        .collect();
    to_json(&problems)
}

/// A record of a lower crate as the JSON an answer embeds (see the
/// `Value` fields of `switchboard_api`).
fn to_json(record: &impl Serialize) -> Value {
    serde_json::to_value(record).expect("an API record serialises")
}

type ApiResult = Result<Response, ApiError>;

/// Checks the account of a dead-letter route: a valid account key, or the
/// name poison is filed under when its subject named no valid account.
fn dead_letter_account(raw: &str) -> Result<(), ApiError> {
    if raw != switchboard_engine::dead_letters::UNKNOWN_ACCOUNT {
        account_key(raw)?;
    }
    Ok(())
}

fn account_key(raw: &str) -> Result<AccountKey, ApiError> {
    AccountKey::new(raw).map_err(|e| ApiError::bad_request("invalid_account", e.to_string()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method (see the README's API table)",
    )
}

/// A request body as text; a body that is too large or not UTF-8 gets a JSON error.
#[derive(Debug)]
pub struct TextBody(pub String);

/// A request body as bytes; a body that is too large gets a JSON error.
#[derive(Debug)]
pub struct RawBody(pub axum::body::Bytes);

/// The largest request body the API reads: an event's limit, but at least
/// 1 MiB (chain files, scripts and providers' batches of records).
fn body_limit(max_event_bytes: usize) -> usize {
    max_event_bytes.max(1 << 20)
}

fn body_error(s: &ApiState, status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        let limit = body_limit(s.max_event_bytes);
        return ApiError::new(
            status,
            "body_too_large",
            format!(
                "the request body is larger than this dispatcher reads: {limit} bytes (the \
                 larger of 1 MiB and `limits.max_event_bytes`); send it in smaller parts (a \
                 provider's batch: fewer records a post), or raise `limits.max_event_bytes` in \
                 the dispatcher's config"
            ),
        );
    }
    ApiError::new(status, "invalid_body", text)
}

impl axum::extract::FromRequest<ApiState> for TextBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, s: &ApiState) -> Result<Self, ApiError> {
        String::from_request(req, s)
            .await
            .map(TextBody)
            .map_err(|r| body_error(s, r.status(), r.body_text()))
    }
}

impl axum::extract::FromRequest<ApiState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, s: &ApiState) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, s)
            .await
            .map(RawBody)
            .map_err(|r| body_error(s, r.status(), r.body_text()))
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; the API lives under /v1 (see the README)")
}

mod chains;
mod events;
mod files;
mod handlers;
mod inbound;
mod inbox;
mod inbox_stream;
mod letters;
mod preferences;
mod probes;
mod records;
pub(crate) mod rerun;
mod scripts;
pub mod tail;
mod templates;
mod tokens;

use self::chains::*;
use self::events::*;
use self::files::*;
use self::inbound::*;
use self::inbox::*;
use self::inbox_stream::own_stream;
use self::letters::*;
use self::preferences::*;
use self::probes::*;
use self::records::*;
use self::scripts::*;
use self::templates::*;
use self::tokens::*;

use rerun::rerun as rerun_event;

use tail::stream as event_stream;

#[cfg(test)]
mod tests;
