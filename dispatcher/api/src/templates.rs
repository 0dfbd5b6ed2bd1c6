//! Message templates kept by the dispatcher: each account's e-mail and SMS
//! messages by slug, versioned like scripts.
//!
//! `PUT /v1/accounts/{account}/templates/{slug}` takes the template file
//! (TOML) as its body; `?version=N` on `GET …/templates/{slug}` shows an
//! older version ([`crate::scripts::VersionQuery`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

/// A version of a template without its source (lists, history, puts and
/// removes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSummary {
    /// The template's slug.
    pub slug: String,
    /// Its version: 1, then +1 for each put.
    pub version: u64,
    /// When this version was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// `email` or `sms` (as its file says).
    pub channel: String,
}

/// `GET /v1/accounts/{account}/templates`: the current version of each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateList {
    /// The account.
    pub account_key: AccountKey,
    /// The templates, by slug.
    pub templates: Vec<TemplateSummary>,
}

/// `GET /v1/accounts/{account}/templates/{slug}[?version=N]`, `PUT` and
/// `DELETE` of one: a version, with its file unless it was put or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// The account.
    pub account_key: AccountKey,
    /// The version.
    #[serde(flatten)]
    pub summary: TemplateSummary,
    /// The template file (TOML), when shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// True when it was just removed (its history is kept; a new put
    /// continues the numbering).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// `GET /v1/accounts/{account}/templates/{slug}/versions`: every version kept
/// (the last 1,000), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateHistory {
    /// The account.
    pub account_key: AccountKey,
    /// The template's slug.
    pub slug: String,
    /// Its versions.
    pub versions: Vec<TemplateSummary>,
}

/// The body of `POST /v1/accounts/{account}/templates/{slug}/test`: what to
/// render the current version with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateTest {
    /// The data a step would give (checked against the template's schema).
    #[serde(default)]
    pub context: Value,
    /// The recipient: `name`, `email`, `phone` and any contact fields.
    #[serde(default)]
    pub recipient: Value,
}

/// The answer of a template test: every part as rendered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRendered {
    /// The account.
    pub account_key: AccountKey,
    /// The version rendered.
    #[serde(flatten)]
    pub summary: TemplateSummary,
    /// The e-mail's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The e-mail's HTML body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// The text body (e-mail) or the message (SMS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The idempotency key its `idempotency` part gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<String>,
}

/// The `details` of a 400 for a template that does not compile or render:
/// which part, where in it (from 1), and why; or the field and rule a
/// context breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateProblem {
    /// `subject`, `html`, `text` or `idempotency`, for a part's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// The line in the part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The column in that line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// The context's field (a JSON pointer), for a context that breaks the
    /// schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}
