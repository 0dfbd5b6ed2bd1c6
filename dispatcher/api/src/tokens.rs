//! Account tokens (admin only): create, list, revoke. A token itself is
//! answered once, when it is created; the dispatcher keeps only its hash.

use serde::{Deserialize, Serialize};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

/// The body of `POST /v1/accounts/{account}/tokens`; an empty body is the
/// same as `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTokenRequest {
    /// A name for people (1 to 64 characters, no control characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What is known about an account token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The token's id (a UUID v7), to list and revoke it by.
    pub id: String,
    /// The account it reaches.
    pub account_key: AccountKey,
    /// A name for people; absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The answer of `POST /v1/accounts/{account}/tokens` (201, `Cache-Control:
/// no-store`): the token's record and, this once, the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The token's id.
    pub id: String,
    /// The account it reaches.
    pub account_key: AccountKey,
    /// A name for people; absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The bearer token (`sbt_…`), shown only here.
    pub token: String,
}

/// `GET /v1/accounts/{account}/tokens`: the account's tokens, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    /// The account.
    pub account_key: AccountKey,
    /// Its tokens.
    pub tokens: Vec<Token>,
}

/// `DELETE /v1/accounts/{account}/tokens/{id}`: the token revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedToken {
    /// The account.
    pub account_key: AccountKey,
    /// The token that no longer works.
    pub revoked: Token,
}
