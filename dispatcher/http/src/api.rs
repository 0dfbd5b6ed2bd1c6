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
    CreateInboundRequest, CreatedInbound, InboundList, RevokedInbound, UnmatchedList,
};
use switchboard_api::records::{ContactList, MessageList, SecretList, SecretRemoved, SecretSet};
use switchboard_api::scripts::{
    RemovedScript, Script, ScriptHistory, ScriptList, ScriptSummary, StoredScript, VersionQuery,
};
use switchboard_api::tokens::{CreatedToken, NewTokenRequest, RevokedToken, TokenList};
use switchboard_api::{ErrorBody, ErrorResponse, ListQuery};
use switchboard_handlers::ScriptStore;
use switchboard_handlers::records::secrets::check_secret_name;
use switchboard_handlers::records::{Contacts, Messages, ScriptVersion, Secrets};
use switchboard_handlers::script::ScriptStoreError;
use switchboard_rules::{ChainStoreError, ChainVersion, Format, parse_chain_file, validate};
use switchboard_sdk::{AccountKey, EventId, VumiApiEvent};

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
    /// Counters.
    pub metrics: Arc<Metrics>,
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
    /// Secrets of every account (write-only).
    pub secrets: Arc<dyn Secrets>,
    /// The admin token and the account tokens.
    pub auth: Arc<Auth>,
    /// The per-account limit on `POST /v1/events`.
    pub ingest_limit: Arc<crate::ratelimit::RateLimiter>,
    /// Inbound provider webhooks.
    pub inbound: Arc<Inbound>,
    /// The partitions of the bus this replica consumes, when replicas share it.
    pub partitions: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
    /// The web console's signed-in browsers.
    pub sessions: Arc<crate::console::session::Sessions>,
    /// Held while a chain apply checks what its chains name and stores
    /// them, and while a script or secret is checked for users and
    /// removed: in this process, a chain never ends up naming a secret or
    /// script removed between its check and its store. (Replicas each have
    /// their own; across them the race remains.)
    pub config_writes: Arc<std::sync::Mutex<()>>,
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
    "/v1/accounts/{account}/events/{id}/trace" => { GET: trace }
    "/v1/accounts/{account}/events/{id}/rerun" => { POST: rerun_event }
    "/v1/accounts/{account}/contacts" => { GET: list_contacts }
    "/v1/accounts/{account}/contacts/{key}" => { GET: show_contact }
    "/v1/accounts/{account}/messages" => { GET: list_messages }
    // A static segment wins over `{id}` (message ids are UUIDs).
    "/v1/accounts/{account}/messages/unmatched" => { GET: list_unmatched }
    "/v1/accounts/{account}/messages/{id}" => { GET: show_message }
    "/v1/accounts/{account}/inbound" => { GET: list_inbound }
    "/v1/accounts/{account}/inbound/{provider}" => {
        GET: show_inbound, POST: create_inbound, DELETE: revoke_inbound
    }
    // Authenticated by the secret in the URL and the provider's signature.
    "/v1/inbound/{account}/{provider}/{secret}" => { POST: receive_inbound }
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
    let body_limit = state.max_event_bytes.max(1 << 20);
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
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
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
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "API request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
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
        (self.status, Json(body)).into_response()
    }
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
            ScriptStoreError::NoSuchScript { .. } | ScriptStoreError::NoSuchVersion { .. } => {
                ApiError::not_found(e.to_string())
            }
            ScriptStoreError::InvalidName(_) => {
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

fn body_error(status: StatusCode, text: String) -> ApiError {
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "invalid_body"
    };
    ApiError::new(status, code, text)
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for TextBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        String::from_request(req, state)
            .await
            .map(TextBody)
            .map_err(|r| body_error(r.status(), r.body_text()))
    }
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|r| body_error(r.status(), r.body_text()))
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; the API lives under /v1 (see the README)")
}

async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
    })
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let bus = s.bus.is_ready();
    // The store answers reads (it is open and its files are readable).
    let store = s
        .store
        .get(switchboard_store::Collection::Chains, b"")
        .is_ok();
    let started = s.ready.load(std::sync::atomic::Ordering::SeqCst);
    let caught_up = s.store.is_caught_up();
    let ready = started && bus && store && caught_up;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            bus: s.bus.kind().to_string(),
            bus_connected: bus,
            store_open: store,
            started,
            replicated: s.store.is_replicated(),
            caught_up,
            partitions: s.partitions.as_ref().map(|p| p.borrow().clone()),
        }),
    )
        .into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            switchboard_engine::metrics::CONTENT_TYPE,
        )],
        s.metrics.render(&Gauges {
            bus_lag: s.bus.lag().await,
            rhai_operations: s.registry.runtime().operations_total(),
            store_flushes: s.store.flushes(),
            changelog_undecodable: s.store.undecodable_records(),
        }),
    )
        .into_response()
}

async fn ingest(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    RawBody(body): RawBody,
) -> ApiResult {
    let event = VumiApiEvent::decode_with_defaults(&body, s.max_event_bytes)
        .map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
    if let Principal::Account(own) = &principal
        && own != &event.account_key
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this token belongs to account {own}; it cannot publish events of account {}",
                event.account_key
            ),
        ));
    }
    if let Err(wait) = s.ingest_limit.take(event.account_key.as_str()) {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "account {} is over its ingest rate (limits.ingest_rate); retry in {secs} s",
                event.account_key
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        return Ok(response);
    }
    let published = s.bus.publish(&event).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            e.to_string(),
        )
    })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            id: event.id,
            subject: event.subject(&s.prefix),
            duplicate: published.duplicate,
        }),
    )
        .into_response())
}

/// Accounts that have chains; for an account token, only its own.
async fn list_accounts(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
) -> Json<AccountList> {
    let mut accounts = s.chains.accounts();
    accounts.retain(|a| principal.reaches(a.as_str()));
    Json(AccountList { accounts })
}

fn version_json(v: &ChainVersion) -> Json<ChainVersionAnswer> {
    Json(ChainVersionAnswer {
        account_key: v.account_key.clone(),
        version: v.version,
        applied_at: v.applied_at,
        change: v.change.clone(),
        chains: v.chains.iter().map(to_json).collect(),
    })
}

async fn show_chains(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    match s.chains.current(&account)? {
        Some(v) => Ok(version_json(&v).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no chains"
        ))),
    }
}

async fn apply_chains(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<switchboard_api::chains::ApplyQuery>,
    headers: HeaderMap,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let format = if content_type.contains("json") {
        Format::Json
    } else if content_type.contains("toml") {
        Format::Toml
    } else {
        Format::sniff(&body)
    };
    let file = parse_chain_file(&body, format, "request body")
        .map_err(|e| ApiError::bad_request("invalid_chain_file", e.to_string()))?;
    let change = if q.merge { "apply (merge)" } else { "apply" };
    let (version, changes) = {
        let _writes = s.config_writes.lock().expect("config write lock");
        let valid = validate(file, &account, s.registry.as_ref()).map_err(ChainStoreError::from)?;
        s.chains
            .apply_changes(valid, q.merge, change, s.registry.as_ref())?
    };
    tracing::info!(%account, version = version.version, added = ?changes.added,
        changed = ?changes.changed, removed = ?changes.removed, "chains applied");
    Ok(Json(switchboard_api::chains::ChainsApplied {
        version: version_json(&version).0,
        added: changes.added,
        changed: changes.changed,
        removed: changes.removed,
        unchanged: changes.unchanged,
        reordered: changes.reordered,
    })
    .into_response())
}

async fn remove_all_chains(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let version = s.chains.remove_all(&account)?;
    Ok(version_json(&version).into_response())
}

async fn show_chain(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let current = s
        .chains
        .current(&account)?
        .ok_or_else(|| ApiError::not_found(format!("account {account} has no chains")))?;
    let chain = current
        .chains
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| {
            ApiError::not_found(format!("account {account} has no chain named {name:?}"))
        })?;
    Ok(Json(ChainAnswer {
        version: current.version,
        chain: to_json(chain),
        account_key: account,
    })
    .into_response())
}

async fn remove_chain(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let version = s.chains.remove_chain(&account, &name)?;
    Ok(version_json(&version).into_response())
}

async fn history(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let versions: Vec<ChainVersionSummary> = s
        .chains
        .history(&account)?
        .iter()
        .map(|v| ChainVersionSummary {
            version: v.version,
            applied_at: v.applied_at,
            change: v.change.clone(),
            chains: v.chains.iter().map(|c| c.name.clone()).collect(),
        })
        .collect();
    if versions.is_empty() {
        return Err(ApiError::not_found(format!(
            "account {account} has no chains"
        )));
    }
    Ok(Json(ChainHistory {
        account_key: account,
        versions,
    })
    .into_response())
}

async fn show_version(
    State(s): State<ApiState>,
    Path((account, version)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let version = parse_version(&version)?;
    Ok(version_json(&s.chains.version(&account, version)?).into_response())
}

async fn restore(
    State(s): State<ApiState>,
    Path((account, version)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let version = parse_version(&version)?;
    let restored = {
        let _writes = s.config_writes.lock().expect("config write lock");
        s.chains.restore(&account, version, s.registry.as_ref())?
    };
    Ok(version_json(&restored).into_response())
}

fn parse_version(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_version",
            format!("{raw:?} is not a version number"),
        )
    })
}

async fn trace(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let id = EventId::parse(&id).map_err(|e| ApiError::bad_request("invalid_event_id", e))?;
    match s.traces.get(&account, &id).map_err(ApiError::internal)? {
        Some(trace) => Ok(Json(trace).into_response()),
        None => Err(ApiError::not_found(format!(
            "no trace of event {id} in account {account} (not handled yet, or never received)"
        ))),
    }
}

async fn list_events(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<switchboard_api::events::EventListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let page = s
        .traces
        .list(&account, &q)
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::bad_request("invalid_cursor", e))?;
    Ok(Json(page).into_response())
}

async fn list_event_kinds(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let kinds = s.event_kinds.of(&account).map_err(ApiError::internal)?;
    Ok(Json(switchboard_api::events::EventKindList {
        account_key: account,
        kinds,
    })
    .into_response())
}

async fn list_dead_letters(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    dead_letter_account(&account)?;
    let letters = s
        .letters
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(DeadLetterList {
        account_key: account,
        dead_letters: letters.iter().map(to_json).collect(),
    })
    .into_response())
}

async fn show_dead_letter(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    dead_letter_account(&account)?;
    match s.letters.get(&account, &id).map_err(ApiError::internal)? {
        Some(letter) => Ok(Json(letter).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no dead letter {id}"
        ))),
    }
}

impl From<LetterError> for ApiError {
    fn from(e: LetterError) -> Self {
        match &e {
            LetterError::NotFound { .. } => ApiError::not_found(e.to_string()),
            LetterError::NoEvent(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_replayable", e.to_string())
            }
            LetterError::Store(_) => ApiError::internal(e),
            LetterError::Bus { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                e.to_string(),
            ),
        }
    }
}

async fn replay_dead_letter(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    dead_letter_account(&account)?;
    let letter = s.letters.replay(&account, &id).await?;
    Ok(Json(ReplayedLetter {
        account_key: account,
        replayed: to_json(&letter),
    })
    .into_response())
}

async fn discard_dead_letter(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    dead_letter_account(&account)?;
    let letter = s.letters.discard(&account, &id).await?;
    Ok(Json(DiscardedLetter {
        account_key: account,
        discarded: to_json(&letter),
    })
    .into_response())
}

/// Replays every dead letter of the account that the filter selects and that
/// holds an event, oldest first. Letters already being replayed are left alone.
async fn replay_dead_letters(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    TextBody(body): TextBody,
) -> ApiResult {
    dead_letter_account(&account)?;
    let filter: ReplayFilter = if body.trim().is_empty() {
        ReplayFilter::default()
    } else {
        serde_json::from_str(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_filter",
                format!(
                    "the body must be {{\"chain\": NAME, \"since\": RFC 3339 time}}, both optional: {e}"
                ),
            )
        })?
    };
    let letters = s.letters.all(&account).map_err(ApiError::internal)?;
    let mut replayed = Vec::new();
    let mut skipped = Vec::new();
    for letter in letters {
        let selected = letter.status == LetterStatus::Dead
            && filter
                .chain
                .as_ref()
                .is_none_or(|c| letter.chain.as_ref() == Some(c))
            && filter.since.is_none_or(|t| letter.at >= t);
        if !selected {
            continue;
        }
        match s.letters.replay(&account, &letter.id).await {
            Ok(_) => replayed.push(letter.id),
            Err(e @ LetterError::NoEvent(_)) => {
                skipped.push(SkippedLetter {
                    id: letter.id,
                    error: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(ReplayedLetters {
        account_key: account,
        replayed,
        skipped,
    })
    .into_response())
}

fn scripts(s: &ApiState) -> Result<&ScriptStore, ApiError> {
    s.registry
        .scripts()
        .map(|s| s.as_ref())
        .ok_or_else(|| ApiError::not_found("this dispatcher has no script store"))
}

/// A script without its source (lists, history).
fn script_summary(v: &ScriptVersion) -> ScriptSummary {
    ScriptSummary {
        name: v.name.clone(),
        version: v.version,
        stored_at: v.stored_at,
        lines: v.source.lines().count(),
    }
}

async fn list_scripts(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let list: Vec<ScriptSummary> = scripts(&s)?
        .list(&account)?
        .iter()
        .map(script_summary)
        .collect();
    Ok(Json(ScriptList {
        account_key: account,
        scripts: list,
    })
    .into_response())
}

async fn show_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let store = scripts(&s)?;
    let version = match q.version {
        Some(v) => store.version(&account, &name, v)?,
        None => store
            .current(&account, &name)?
            .ok_or(ScriptStoreError::NoSuchScript {
                account: account.to_string(),
                name: name.clone(),
            })?,
    };
    Ok(Json(Script {
        account_key: version.account_key,
        name: version.name,
        version: version.version,
        stored_at: version.stored_at,
        source: version.source,
    })
    .into_response())
}

async fn put_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let store = s
        .registry
        .scripts()
        .cloned()
        .ok_or_else(|| ApiError::not_found("this dispatcher has no script store"))?;
    // Compiling and the flush block: off the async workers.
    let version = tokio::task::spawn_blocking(move || store.put(&account, &name, &body))
        .await
        .map_err(ApiError::internal)??;
    tracing::info!(account = %version.account_key, script = version.name, version = version.version, "script stored");
    let summary = script_summary(&version);
    Ok(Json(StoredScript {
        account_key: version.account_key,
        name: summary.name,
        version: summary.version,
        stored_at: summary.stored_at,
        lines: summary.lines,
    })
    .into_response())
}

async fn remove_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let handler = format!("script:{name}");
    let _writes = s.config_writes.lock().expect("config write lock");
    if let Some(current) = s.chains.current(&account)? {
        let users: Vec<&str> = current
            .chains
            .iter()
            .filter(|c| c.steps.iter().any(|st| st.handler == handler))
            .map(|c| c.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "script_in_use",
                format!(
                    "script {name:?} of account {account} is used by chain(s) {}; change or \
                     remove them first",
                    users.join(", ")
                ),
            ));
        }
    }
    let removed = scripts(&s)?.remove(&account, &name)?;
    let summary = script_summary(&removed);
    Ok(Json(RemovedScript {
        account_key: account,
        name: summary.name,
        version: summary.version,
        stored_at: summary.stored_at,
        lines: summary.lines,
        removed: true,
    })
    .into_response())
}

async fn script_history(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let versions: Vec<ScriptSummary> = scripts(&s)?
        .history(&account, &name)?
        .iter()
        .map(script_summary)
        .collect();
    if versions.is_empty() {
        return Err(ApiError::not_found(format!(
            "account {account} has no script named {name:?}"
        )));
    }
    Ok(Json(ScriptHistory {
        account_key: account,
        name,
        versions,
    })
    .into_response())
}

async fn test_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> ApiResult {
    let account = account_key(&account)?;
    if scripts(&s)?.current(&account, &name)?.is_none() {
        return Err(ScriptStoreError::NoSuchScript {
            account: account.to_string(),
            name,
        }
        .into());
    }
    let sample = dry_run::parse_sample(&body, &account, s.max_event_bytes)
        .map_err(|e| ApiError::bad_request("invalid_sample", e))?;
    let answer = dry_run::test_script(&s.registry, &account, &name, &sample)
        .await
        .map_err(|e| ApiError::bad_request("script_test_failed", e))?;
    Ok(Json(answer).into_response())
}

async fn test_chains(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let sample = dry_run::parse_sample(&body, &account, s.max_event_bytes)
        .map_err(|e| ApiError::bad_request("invalid_sample", e))?;
    let chains = s
        .chains
        .lookup(&account)
        .ok_or_else(|| ApiError::not_found(format!("account {account} has no chains")))?;
    let limits = dry_run::FollowLimits {
        max_depth: s.max_depth,
        max_event_bytes: s.max_event_bytes,
    };
    let report = dry_run::test_chains(&s.registry, &chains, &sample.event, limits).await;
    Ok(Json(report).into_response())
}

async fn list_contacts(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let contacts = s
        .contacts
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(ContactList {
        account_key: account,
        contacts: contacts.iter().map(to_json).collect(),
    })
    .into_response())
}

async fn show_contact(
    State(s): State<ApiState>,
    Path((account, key)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    // A contact can be asked for by its key, its msisdn or its e-mail.
    let contact = s
        .contacts
        .lookup(&account, &key)
        .map_err(ApiError::internal)?;
    match contact {
        // The record itself: a `Contact` (see `switchboard_api::records`).
        Some(c) => Ok(Json(c).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no contact {key:?}"
        ))),
    }
}

async fn list_messages(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let messages = s
        .messages
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(MessageList {
        account_key: account,
        messages: messages.iter().map(to_json).collect(),
    })
    .into_response())
}

async fn show_message(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    match s.messages.get(&account, &id).map_err(ApiError::internal)? {
        Some(m) => Ok(Json(m).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no message {id}"
        ))),
    }
}

async fn list_secrets(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let names = s.secrets.names(&account).map_err(ApiError::internal)?;
    Ok(Json(SecretList {
        account_key: account,
        secrets: names,
    })
    .into_response())
}

async fn set_secret(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    check_secret_name(&name).map_err(|e| ApiError::bad_request("invalid_secret_name", e))?;
    // A trailing newline from `echo value | ...` is not part of the secret.
    let value = body.strip_suffix('\n').unwrap_or(&body);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_secret",
            "the secret's value is empty",
        ));
    }
    s.secrets
        .set(&account, &name, value)
        .map_err(ApiError::internal)?;
    // Durable before the answer: a chain applied next may sign with it.
    s.store.flush().await.map_err(ApiError::internal)?;
    tracing::info!(%account, secret = name, "secret set");
    Ok(Json(SecretSet {
        account_key: account,
        secret: name,
        set: true,
    })
    .into_response())
}

async fn remove_secret(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    if s.secrets
        .get(&account, &name)
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "account {account} has no secret {name:?}"
        )));
    }
    let writes = s.config_writes.lock().expect("config write lock");
    let mut users = Vec::new();
    if let Some(current) = s.chains.current(&account)? {
        for chain in &current.chains {
            for step in &chain.steps {
                if s.registry
                    .secrets_named(step)
                    .iter()
                    .any(|(_, named)| *named == name)
                {
                    users.push(format!("chain {} step {}", chain.name, step.step_name()));
                }
            }
        }
    }
    for hook in s.inbound.hooks.list(&account).map_err(ApiError::internal)? {
        if hook.secret.as_deref() == Some(name.as_str()) {
            users.push(format!(
                "the inbound {} URL (`switchboard inbound revoke {account} {}`)",
                hook.provider.name(),
                hook.provider.name()
            ));
        }
    }
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "secret_in_use",
            format!(
                "secret {name:?} of account {account} is used by {}; change or remove them first",
                users.join(", ")
            ),
        ));
    }
    let removed = s
        .secrets
        .remove(&account, &name)
        .map_err(ApiError::internal)?;
    drop(writes);
    if removed {
        s.store.flush().await.map_err(ApiError::internal)?;
        Ok(Json(SecretRemoved {
            account_key: account,
            secret: name,
            removed: true,
        })
        .into_response())
    } else {
        Err(ApiError::not_found(format!(
            "account {account} has no secret {name:?}"
        )))
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match &e {
            TokenError::InvalidName(_) => {
                ApiError::bad_request("invalid_token_name", e.to_string())
            }
            TokenError::Random(_) | TokenError::Corrupt { .. } | TokenError::Store(_) => {
                ApiError::internal(e)
            }
        }
    }
}

/// Creates an account token and answers it, the only time it is shown.
async fn create_token(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let request: NewTokenRequest = if body.trim().is_empty() {
        NewTokenRequest::default()
    } else {
        serde_json::from_str(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("the body must be {{\"name\": NAME}} (optional) or empty: {e}"),
            )
        })?
    };
    let new = s
        .auth
        .tokens()
        .create(&account, request.name.as_deref())
        .await?;
    tracing::info!(%account, token_id = new.record.id, "account token created");
    let answer = CreatedToken {
        id: new.record.id,
        account_key: new.record.account_key,
        name: new.record.name,
        created_at: new.record.created_at,
        token: new.token,
    };
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        Json(answer),
    )
        .into_response())
}

/// The account's tokens: ids, names and creation times, never the tokens.
async fn list_tokens(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let tokens = s.auth.tokens().list(&account)?;
    Ok(Json(TokenList {
        account_key: account,
        tokens: tokens.iter().map(auth::TokenRecord::answer).collect(),
    })
    .into_response())
}

async fn revoke_token(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    match s.auth.tokens().revoke(&account, &id).await? {
        Some(record) => {
            tracing::info!(%account, token_id = record.id, "account token revoked");
            Ok(Json(RevokedToken {
                revoked: record.answer(),
                account_key: account,
            })
            .into_response())
        }
        None => Err(ApiError::not_found(format!(
            "account {account} has no token {id:?}"
        ))),
    }
}

async fn list_unmatched(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let unmatched = s
        .inbound
        .unmatched
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(UnmatchedList {
        account_key: account,
        unmatched: unmatched
            .iter()
            .map(crate::inbound::Unmatched::answer)
            .collect(),
    })
    .into_response())
}

fn provider(raw: &str) -> Result<Provider, ApiError> {
    Provider::parse(raw).ok_or_else(|| {
        ApiError::bad_request(
            "unknown_provider",
            CreateError::UnknownProvider(raw.to_string()).to_string(),
        )
    })
}

async fn list_inbound(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let hooks = s.inbound.hooks.list(&account).map_err(ApiError::internal)?;
    Ok(Json(InboundList {
        account_key: account,
        inbound: hooks.iter().map(crate::inbound::Hook::answer).collect(),
    })
    .into_response())
}

async fn show_inbound(
    State(s): State<ApiState>,
    Path((account, raw)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let provider = provider(&raw)?;
    match s
        .inbound
        .hooks
        .get(&account, provider)
        .map_err(ApiError::internal)?
    {
        Some(hook) => Ok(Json(hook.answer()).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no inbound {raw} webhook"
        ))),
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        match &e {
            CreateError::UnknownProvider(_) => {
                ApiError::bad_request("unknown_provider", e.to_string())
            }
            CreateError::SecretRequired(_) | CreateError::SecretNotTaken(_) => {
                ApiError::bad_request("invalid_secret", e.to_string())
            }
            CreateError::SecretNotSet { .. } | CreateError::NotConfigured(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_configured", e.to_string())
            }
            CreateError::Exists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "exists", e.to_string())
            }
            CreateError::Store(_) | CreateError::Records(_) => ApiError::internal(e),
        }
    }
}

async fn create_inbound(
    State(s): State<ApiState>,
    Path((account, raw)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let request: CreateInboundRequest = if body.trim().is_empty() {
        CreateInboundRequest::default()
    } else {
        serde_json::from_str(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!(
                    "the body must be {{\"secret\": NAME, \"rotate\": true|false}}, both optional: {e}"
                ),
            )
        })?
    };
    if let Some(name) = &request.secret {
        check_secret_name(name).map_err(|e| ApiError::bad_request("invalid_secret", e))?;
    }
    let (url, hook) = s
        .inbound
        .create(&account, &raw, request.secret, request.rotate)
        .await?;
    let answer = CreatedInbound {
        account_key: hook.account_key,
        provider: hook.provider,
        created_at: hook.created_at,
        secret: hook.secret,
        url,
        rotated: request.rotate,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn revoke_inbound(
    State(s): State<ApiState>,
    Path((account, raw)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let provider = provider(&raw)?;
    match s
        .inbound
        .revoke(&account, provider)
        .await
        .map_err(ApiError::internal)?
    {
        Some(hook) => {
            tracing::info!(%account, provider = raw, "inbound webhook revoked");
            Ok(Json(RevokedInbound {
                account_key: hook.account_key,
                provider: hook.provider,
                created_at: hook.created_at,
                secret: hook.secret,
                revoked: true,
            })
            .into_response())
        }
        None => Err(ApiError::not_found(format!(
            "account {account} has no inbound {raw} webhook"
        ))),
    }
}

impl From<InboundError> for ApiError {
    fn from(e: InboundError) -> Self {
        match &e {
            InboundError::NotFound => ApiError::not_found(e.to_string()),
            InboundError::NotConfigured(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_configured",
                e.to_string(),
            ),
            InboundError::Rejected(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "signature_rejected", e.to_string())
            }
            InboundError::Store(_) | InboundError::Records(_) => ApiError::internal(e),
            InboundError::Bus(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                e.to_string(),
            ),
        }
    }
}

/// `POST /v1/inbound/{account}/{provider}/{secret}`: what a provider posts.
async fn receive_inbound(
    State(s): State<ApiState>,
    Path((account, raw, secret)): Path<(String, String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult {
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string());
    let receipt = s
        .inbound
        .receive(&account, &raw, &secret, &path, &headers, &body)
        .await?;
    Ok(Json(receipt).into_response())
}

mod handlers;
pub(crate) mod rerun;
pub(crate) mod tail;

use rerun::rerun as rerun_event;

use tail::stream as event_stream;

#[cfg(test)]
mod tests;
