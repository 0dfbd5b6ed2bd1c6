//! Who may call the HTTP API, and what each caller may reach.
//!
//! Every `/v1` request carries `Authorization: Bearer <token>`, except provider
//! callbacks under `/v1/inbound/` (they are authenticated by the secret in
//! their path, or Twilio's status callbacks by Twilio's signature) and
//! unsubscribe links under `/v1/unsubscribe/` (signed). `/healthz`,
//! `/readyz` and `/metrics` are open. A token is
//!
//! - the deployment's **admin token** (`http.admin_token` in the config file,
//!   env `SWITCHBOARD_ADMIN_TOKEN`, or else generated at first start into
//!   `{data_dir}/admin-token`, mode 0600): it reaches everything; or
//! - an **account token** (`sbt_…`, made by `switchboard tokens create`,
//!   shown once, stored only as its SHA-256): it reaches its own account and
//!   nothing else. Another account's resources answer 404, exactly as if they
//!   did not exist; managing tokens needs the admin token (403); or
//! - a **receiver token** (`sbr_…`, minted by an account for one person of
//!   its in-app inbox, signed and expiring, see [`crate::receiver_tokens`]):
//!   it reaches `/v1/inbox` and below, where every route is that person's
//!   own, and nothing else (401). The `/v1/inbox` routes need one (403
//!   for other tokens, which reach a receiver's inbox under the account).
//!
//! [`require_token`] is the one place these rules are enforced, for every
//! route at once: it resolves the bearer to a [`Principal`] and checks the
//! path with [`access`] before any handler runs (and before any body is
//! read). Two rules need the request's content and live in their handlers:
//! `POST /v1/events` takes an account token's events only for its account,
//! and `GET /v1/accounts` lists only the caller's account.
//!
//! What an account token may reach is an allow-list — its account's subtree,
//! `/v1/events` and `/v1/accounts` — so a route added later outside
//! `/v1/accounts/{account}/` is admin-only until someone decides otherwise.
//!
//! Tokens are never logged, never part of an error message, and never stored:
//! a request's token is hashed and the hash is looked up as a store key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

use crate::api::ApiError;

/// Paths under this prefix carry their own secret and need no bearer token.
pub const INBOUND_PREFIX: &str = "/v1/inbound/";

/// The name of the generated admin token's file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The start of every account token.
pub const ACCOUNT_TOKEN_PREFIX: &str = "sbt_";

/// The start of a generated admin token.
pub const ADMIN_TOKEN_PREFIX: &str = "sba_";

/// Who is calling: what the bearer token resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The deployment's admin token: every account, every route.
    Admin,
    /// An account token: this account only.
    Account(AccountKey),
    /// A receiver token: this person's inbox only.
    Receiver(crate::receiver_tokens::Receiver),
}

impl Principal {
    /// Whether this caller may see and change `account`'s resources.
    pub fn reaches(&self, account: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Account(own) => own.as_str() == account,
            Principal::Receiver(_) => false,
        }
    }
}

/// What a principal may do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Go on to the handler.
    Allowed,
    /// Answer 404, as for something that does not exist: another account's
    /// resource, or a route account tokens do not reach.
    Hidden,
    /// Answer 403 saying why: the caller's own account, but a route for
    /// the admin only; or a receiver's own route, and not a receiver.
    Forbidden(&'static str),
    /// Answer 401 saying why: a receiver token, on a route that is not its
    /// inbox.
    Unauthorized(&'static str),
}

/// The routes of a receiver's own inbox.
pub const RECEIVER_PREFIX: &str = "/v1/inbox";

/// Whether `path` is one of a receiver's own routes.
pub fn is_receiver_route(path: &str) -> bool {
    path.strip_prefix(RECEIVER_PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Whether `path` needs a bearer token at all.
pub fn needs_token(path: &str) -> bool {
    (path == "/v1" || path.starts_with("/v1/"))
        && !path.starts_with(INBOUND_PREFIX)
        && !path.starts_with(crate::unsubscribe::UNSUBSCRIBE_PREFIX)
}

/// What `principal` may do with `path` (the raw path, as routed). The
/// account segment is compared as sent: an account token's requests must
/// name its account literally (account keys need no escaping), so an escaped
/// form is refused rather than decoded here differently than by the router.
pub fn access(principal: &Principal, path: &str) -> Access {
    let own = match principal {
        Principal::Receiver(_) if is_receiver_route(path) => return Access::Allowed,
        Principal::Receiver(_) => {
            return Access::Unauthorized(
                "a receiver token opens its receiver's inbox (/v1/inbox) and nothing else: this \
                 route needs the admin token or an account token",
            );
        }
        _ if is_receiver_route(path) => {
            return Access::Forbidden(
                "the /v1/inbox routes are a receiver's own: call them with a receiver token \
                 (switchboard inbox token); the account manages a receiver's inbox under \
                 /v1/accounts/{account}/inbox/{receiver}",
            );
        }
        Principal::Admin => return Access::Allowed,
        Principal::Account(own) => own,
    };
    if matches!(path, "/v1/events" | "/v1/accounts" | "/v1/handlers") {
        return Access::Allowed;
    }
    let Some(rest) = path.strip_prefix("/v1/accounts/") else {
        return Access::Hidden;
    };
    let (account, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if account != own.as_str() {
        return Access::Hidden;
    }
    if tail == "tokens" || tail.starts_with("tokens/") {
        return Access::Forbidden(
            "managing tokens needs the admin token; account tokens cannot create, list or \
             revoke tokens",
        );
    }
    if tail.starts_with("numbers/") {
        return Access::Forbidden(
            "adding or removing an account's numbers and addresses needs the admin token: \
             replies to an address go to the account that owns it, so the deployment decides \
             who owns which (an account token can list its own)",
        );
    }
    Access::Allowed
}

/// The middleware in front of every route: resolves the bearer token to a
/// [`Principal`] (put in the request's extensions for the handlers), answers
/// 401 without a valid token, and 404 or 403 for what the principal may not
/// reach (see [`access`]).
pub async fn require_token(
    State(auth): State<Arc<Auth>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if !needs_token(path) {
        return next.run(request).await;
    }
    let principal = match bearer(request.headers()) {
        Bearer::Missing => {
            return unauthorized(
                "this endpoint needs a token: send `Authorization: Bearer <token>` with the admin \
                 token or an account token",
                "Bearer",
            );
        }
        Bearer::OtherScheme => {
            return unauthorized(
                "the Authorization header must be `Bearer <token>`",
                "Bearer error=\"invalid_request\"",
            );
        }
        Bearer::Token(token) => match auth.principal(token) {
            Ok(Some(p)) => p,
            Ok(None) => {
                tracing::info!(method = %request.method(), path, "refused a request with an unknown, expired or revoked token");
                return unauthorized(
                    "the bearer token is not valid: unknown, expired or revoked",
                    "Bearer error=\"invalid_token\"",
                );
            }
            Err(e) => return ApiError::internal(e).into_response(),
        },
    };
    match access(&principal, path) {
        Access::Allowed => {}
        Access::Hidden => {
            let Principal::Account(own) = &principal else {
                unreachable!("the admin reaches everything")
            };
            return ApiError::not_found(format!(
                "not found: an account token reaches only its own account ({own})"
            ))
            .into_response();
        }
        Access::Forbidden(why) => {
            return ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response();
        }
        Access::Unauthorized(why) => {
            return unauthorized(why, "Bearer error=\"invalid_token\"");
        }
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// What the Authorization header holds.
enum Bearer<'a> {
    Missing,
    OtherScheme,
    Token(&'a str),
}

fn bearer(headers: &HeaderMap) -> Bearer<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Bearer::Missing;
    };
    let Ok(value) = value.to_str() else {
        return Bearer::OtherScheme;
    };
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Bearer::Token(token.trim())
        }
        _ => Bearer::OtherScheme,
    }
}

fn unauthorized(message: &str, challenge: &'static str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// The deployment's admin token. Its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AdminToken(String);

impl AdminToken {
    /// A new random admin token (`sba_` and 32 random bytes).
    pub fn generate() -> Result<Self, TokenError> {
        Ok(Self(random_token(ADMIN_TOKEN_PREFIX)?))
    }

    /// The token, to send or to write to its file.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AdminToken {
    type Error = String;

    /// Checks the token's shape; the message never repeats the value.
    fn try_from(value: String) -> Result<Self, String> {
        let len = value.chars().count();
        if !(16..=512).contains(&len) || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the admin token must be 16 to 512 visible ASCII characters without spaces (this \
                 one has {len} characters); e.g. the output of `openssl rand -hex 32`"
            ));
        }
        Ok(Self(value))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Reads the admin token from `{data_dir}/admin-token`, or, when there is no
/// such file, generates one and writes it there readable by the owner only.
/// Returns the token, the file and whether it was just created.
pub fn admin_token_file(data_dir: &Path) -> Result<(AdminToken, PathBuf, bool), String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            warn_if_shared(&path);
            let token = AdminToken::try_from(text.trim().to_string())
                .map_err(|e| format!("admin token file {shown}: {e}"))?;
            Ok((token, path, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = AdminToken::generate().map_err(|e| e.to_string())?;
            match write_private(&path, &format!("{}\n", token.expose())) {
                Ok(()) => Ok((token, path, true)),
                // Another process made it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    admin_token_file(data_dir)
                }
                Err(e) => Err(format!("writing the admin token file {shown}: {e}")),
            }
        }
        Err(e) => Err(format!("reading the admin token file {shown}: {e}")),
    }
}

/// Creates `path` (which must not exist) with mode 0600 and writes `text`.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Logs a warning when the admin token file can be read by others than its owner.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "the admin token file is readable by others than its owner; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token's name is not acceptable.
    #[error("invalid token name {0:?}: use 1 to 64 characters, without control characters")]
    InvalidName(String),
    /// The operating system's random generator failed.
    #[error("generating a token: the system's random generator failed: {0}")]
    Random(String),
    /// A stored token record does not parse.
    #[error("token record {id}: {message}")]
    Corrupt {
        /// The record's id or key.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The signing keys could not be read.
    #[error(transparent)]
    Records(#[from] switchboard_handlers::records::RecordError),
}

/// What is stored about an account token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's id (a UUID v7), to list and revoke it by.
    pub id: String,
    /// The account it reaches.
    pub account_key: AccountKey,
    /// A name for people ("ci", "survey-worker").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl TokenRecord {
    /// The record as the API answers it.
    pub fn answer(&self) -> switchboard_api::tokens::Token {
        switchboard_api::tokens::Token {
            id: self.id.clone(),
            account_key: self.account_key.clone(),
            name: self.name.clone(),
            created_at: self.created_at,
        }
    }
}

/// A token just created: the only time the token itself is at hand.
pub struct NewToken {
    /// The token, to show once.
    pub token: String,
    /// What is stored about it.
    pub record: TokenRecord,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("token", &"<redacted>")
            .field("record", &self.record)
            .finish()
    }
}

/// Account tokens: created, listed, revoked, and found by their hash.
#[derive(Debug, Clone)]
pub struct TokenStore {
    store: Store,
}

impl TokenStore {
    /// The token store over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Creates a token for `account`; durable when this returns.
    pub async fn create(
        &self,
        account: &AccountKey,
        name: Option<&str>,
    ) -> Result<NewToken, TokenError> {
        let name = match name {
            Some(n) => {
                if n.is_empty() || n.chars().count() > 64 || n.chars().any(char::is_control) {
                    return Err(TokenError::InvalidName(n.chars().take(80).collect()));
                }
                Some(n.to_string())
            }
            None => None,
        };
        let token = random_token(ACCOUNT_TOKEN_PREFIX)?;
        let hash = hash(&token);
        let record = TokenRecord {
            id: uuid::Uuid::now_v7().to_string(),
            account_key: account.clone(),
            name,
            created_at: switchboard_sdk::now(),
        };
        let value = serde_json::to_vec(&record).expect("a token record serialises");
        self.store.write_atomically(&[
            Write {
                collection: Collection::Tokens,
                key: hash.to_vec(),
                value: Some(value),
            },
            Write {
                collection: Collection::TokenIndex,
                key: index_key(account, &record.id),
                value: Some(hash.to_vec()),
            },
        ])?;
        self.store.flush().await?;
        Ok(NewToken { token, record })
    }

    /// The account's tokens, oldest first.
    pub fn list(&self, account: &AccountKey) -> Result<Vec<TokenRecord>, TokenError> {
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        let mut records = Vec::new();
        for (k, hash) in self.store.scan_prefix(Collection::TokenIndex, &prefix)? {
            if let Some(record) = self.record(&hash)? {
                records.push(record);
            } else {
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                return Err(TokenError::Corrupt {
                    id,
                    message: "listed for the account, but its record is missing".into(),
                });
            }
        }
        Ok(records)
    }

    /// Revokes the account's token `id`; durable when this returns. `None`
    /// when the account has no such token.
    pub async fn revoke(
        &self,
        account: &AccountKey,
        id: &str,
    ) -> Result<Option<TokenRecord>, TokenError> {
        let index = index_key(account, id);
        let Some(hash) = self.store.get(Collection::TokenIndex, &index)? else {
            return Ok(None);
        };
        let record = self.record(&hash)?;
        self.store.write_atomically(&[
            Write {
                collection: Collection::Tokens,
                key: hash,
                value: None,
            },
            Write {
                collection: Collection::TokenIndex,
                key: index,
                value: None,
            },
        ])?;
        self.store.flush().await?;
        Ok(record)
    }

    /// The record of `token`, if it is a live account token.
    pub fn find(&self, token: &str) -> Result<Option<TokenRecord>, TokenError> {
        self.record(&hash(token))
    }

    fn record(&self, hash: &[u8]) -> Result<Option<TokenRecord>, TokenError> {
        let Some(value) = self.store.get(Collection::Tokens, hash)? else {
            return Ok(None);
        };
        serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| TokenError::Corrupt {
                id: switchboard_handlers::records::hex(hash),
                message: e.to_string(),
            })
    }
}

fn index_key(account: &AccountKey, id: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), id.as_bytes()])
}

/// Resolves bearer tokens to principals.
#[derive(Clone)]
pub struct Auth {
    admin: [u8; 32],
    tokens: TokenStore,
    receivers: crate::receiver_tokens::ReceiverTokens,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

impl Auth {
    /// Accepts `admin` as the admin token, the account tokens of `tokens`
    /// and the receiver tokens `receivers` signed.
    pub fn new(
        admin: &AdminToken,
        tokens: TokenStore,
        receivers: crate::receiver_tokens::ReceiverTokens,
    ) -> Self {
        Self {
            admin: hash(admin.expose()),
            tokens,
            receivers,
        }
    }

    /// The receiver tokens.
    pub fn receivers(&self) -> &crate::receiver_tokens::ReceiverTokens {
        &self.receivers
    }

    /// The account tokens.
    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// Whether the token of `credential` is still the admin token or a live
    /// account token: a console session ends when its token is revoked (or
    /// the admin token changed).
    pub fn holds(&self, credential: &Credential) -> Result<bool, TokenError> {
        if constant_time_eq(credential, &self.admin) {
            return Ok(true);
        }
        Ok(self.tokens.record(credential)?.is_some())
    }

    /// Who `token` is, or `None` when it is nobody. The admin token is
    /// compared by hash in constant time; account tokens are looked up by
    /// their hash, so no secret is compared byte by byte.
    pub fn principal(&self, token: &str) -> Result<Option<Principal>, TokenError> {
        let presented = hash(token);
        if constant_time_eq(&presented, &self.admin) {
            return Ok(Some(Principal::Admin));
        }
        if token.starts_with(crate::receiver_tokens::RECEIVER_TOKEN_PREFIX) {
            return self
                .receivers
                .verify(token)
                .map(|r| r.map(Principal::Receiver))
                .map_err(TokenError::Records);
        }
        Ok(self
            .tokens
            .record(&presented)?
            .map(|r| Principal::Account(r.account_key)))
    }
}

/// Whether the bearer token `headers` carry is still `principal`'s (not
/// revoked, not expired): a long request, a stream, checks it again as it
/// goes. A store that fails to answer counts as yes: the next check asks
/// again.
pub fn still_holds(auth: &Auth, headers: &HeaderMap, principal: &Principal) -> bool {
    let Bearer::Token(token) = bearer(headers) else {
        return false;
    };
    match auth.principal(token) {
        Ok(found) => found.as_ref() == Some(principal),
        Err(e) => {
            tracing::warn!(error = %e, "checking an open stream's token failed");
            true
        }
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What a session keeps of the token it was started with: its SHA-256 (the
/// key the token store already keeps it under), never the token.
pub type Credential = [u8; 32];

/// The [`Credential`] of `token`.
pub fn credential(token: &str) -> Credential {
    hash(token)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `prefix` and 32 bytes from the operating system's random generator,
/// URL-safe base64 without padding.
fn random_token(prefix: &str) -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests;
