//! The in-app inbox: a receiver's own routes under `/v1/inbox` (with a
//! receiver token) and the account's routes for one receiver under
//! `/v1/accounts/{account}/inbox/{receiver}` (with an account token).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

/// The query of a listing: `?limit=N&before=CURSOR&unread=true&category=C&archived=true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxQuery {
    /// How many at most (50 when absent, at most 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Go on from a listing's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// Only unread ones (`true`) or only read ones (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread: Option<bool>,
    /// Only those of this category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Only archived ones (`true`); otherwise those not archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived: Option<bool>,
}

impl InboxQuery {
    /// The default page.
    pub const DEFAULT_LIMIT: usize = 50;
    /// The largest page.
    pub const MAX_LIMIT: usize = 500;

    /// The page's size.
    pub fn effective_limit(&self) -> usize {
        self.limit
            .unwrap_or(Self::DEFAULT_LIMIT)
            .clamp(1, Self::MAX_LIMIT)
    }
}

/// `GET /v1/inbox` and `GET /v1/accounts/{account}/inbox/{receiver}`: a
/// page of a receiver's notifications, newest first, with its counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxList {
    /// The account.
    pub account_key: AccountKey,
    /// The receiver.
    pub receiver: String,
    /// Not read and not archived.
    pub unread: u64,
    /// Not archived.
    pub total: u64,
    /// The notifications, each a `Notification` as JSON: `id`, `receiver`,
    /// `category`, `sender`, `content` (`content_type` and its fields),
    /// `event_id`, `created_at`, `read_at`, `archived_at`.
    pub notifications: Vec<Value>,
    /// The `before` of the next page, when there may be more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /v1/inbox/count` (and the account's): a receiver's counts; the
/// stream's `count` events carry the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxCount {
    /// Not read and not archived.
    pub unread: u64,
    /// Not archived.
    pub total: u64,
}

/// The query of `POST …/read_all`: `?category=C` for one category only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadAllQuery {
    /// Only this category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// `POST …/read_all`: how many it marked read, and the counts after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadAll {
    /// Marked read now.
    pub marked: u64,
    /// Not read and not archived.
    pub unread: u64,
    /// Not archived.
    pub total: u64,
}

/// The body of `POST /v1/accounts/{account}/inbox/{receiver}/token`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewReceiverToken {
    /// How long it lasts (`"24h"` when absent, at most `"90d"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// A receiver token just minted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverToken {
    /// The account.
    pub account_key: AccountKey,
    /// The receiver whose inbox it opens.
    pub receiver: String,
    /// The token (`sbr_…`), for `Authorization: Bearer`.
    pub token: String,
    /// When it stops being valid.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// `POST /v1/accounts/{account}/inbox-tokens/rotate`: every receiver token
/// the account minted so far stops being valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotatedReceiverKey {
    /// The account.
    pub account_key: AccountKey,
    /// Always true.
    pub rotated: bool,
}
