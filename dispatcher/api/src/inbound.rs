//! Inbound provider webhooks: the URLs an account gives its providers
//! (SendGrid, Twilio, any Standard Webhooks sender), the records they post
//! that matched nothing, and what a provider's POST to its URL did.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

/// A provider that can post to an inbound webhook; its name is the
/// `{provider}` segment of the inbound routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// SendGrid's Event Webhook (JSON array of e-mail events).
    Sendgrid,
    /// Twilio's SMS status callbacks (form-encoded, signed).
    Twilio,
    /// Any sender of JSON signed per Standard Webhooks.
    Webhook,
}

impl Provider {
    /// Every provider.
    pub const ALL: [Provider; 3] = [Provider::Sendgrid, Provider::Twilio, Provider::Webhook];

    /// Its name in URLs and commands.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Sendgrid => "sendgrid",
            Provider::Twilio => "twilio",
            Provider::Webhook => "webhook",
        }
    }

    /// The provider called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The names, for messages.
    pub fn names() -> String {
        Self::ALL.map(Provider::name).join(", ")
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The body of `POST /v1/accounts/{account}/inbound/{provider}`; an empty
/// body is the same as `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateInboundRequest {
    /// `webhook` only: the account secret signatures are checked with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Replace an existing URL (the old one stops working at once).
    #[serde(default)]
    pub rotate: bool,
}

/// One inbound webhook of an account, without its URL (only a hash of the
/// URL's secret is kept): `GET .../inbound/{provider}` and the items of
/// [`InboundList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundHook {
    /// The account.
    pub account_key: AccountKey,
    /// The provider that posts to it.
    pub provider: Provider,
    /// When its URL was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `webhook`: the name of the account secret signatures are checked
    /// with; absent for the other providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// The answer of `POST /v1/accounts/{account}/inbound/{provider}` (201):
/// the hook and, this once, its URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedInbound {
    /// The account.
    pub account_key: AccountKey,
    /// The provider.
    pub provider: Provider,
    /// When the URL was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `webhook`: the account secret signatures are checked with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The URL to give the provider, shown only here.
    pub url: String,
    /// An existing URL was replaced (the request asked to rotate).
    pub rotated: bool,
}

/// The answer of `DELETE /v1/accounts/{account}/inbound/{provider}`: the
/// hook whose URL answers 404 from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedInbound {
    /// The account.
    pub account_key: AccountKey,
    /// The provider.
    pub provider: Provider,
    /// When the URL was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `webhook`: the account secret signatures were checked with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Always true.
    pub revoked: bool,
}

/// `GET /v1/accounts/{account}/inbound`: the account's hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundList {
    /// The account.
    pub account_key: AccountKey,
    /// Its hooks, one per provider at most.
    pub inbound: Vec<InboundHook>,
}

/// A record a provider posted that matched nothing, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmatchedRecord {
    /// Its id (a UUID v7: ids sort by arrival).
    pub id: String,
    /// The account whose URL it was posted to.
    pub account_key: AccountKey,
    /// The provider.
    pub provider: Provider,
    /// `unknown_message`, `unknown_address`, `other_account`, `undocumented`
    /// or `malformed`.
    pub result: String,
    /// Why it matched nothing, in words.
    pub reason: String,
    /// The record: JSON as posted, or the text of a body that was not JSON;
    /// of a record larger than 64 KiB, the first 64 KiB of its text.
    pub record: Value,
    /// A record cut to its first 64 KiB: the size of its whole text (the
    /// JSON as re-encoded, compact), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_bytes: Option<u64>,
    /// When it arrived.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

/// `GET /v1/accounts/{account}/messages/unmatched[?limit=N]`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmatchedList {
    /// The account.
    pub account_key: AccountKey,
    /// The records.
    pub unmatched: Vec<UnmatchedRecord>,
}

/// The answer to a provider's `POST /v1/inbound/{account}/{provider}/{secret}`:
/// what became of each record it posted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The provider.
    pub provider: Provider,
    /// How many records the POST held.
    pub records: usize,
    /// How many matched (and became events).
    pub matched: usize,
    /// How many were kept as unmatched.
    pub unmatched: usize,
    /// Per record, in order.
    pub results: Vec<RecordResult>,
}

/// What became of one record of a provider's POST. Fields that do not apply
/// are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordResult {
    /// `matched`, `unknown_message`, `unknown_address`, `other_account`,
    /// `no_account`, `undocumented` or `malformed`.
    pub result: String,
    /// The account it went to: on the deployment's SendGrid events route,
    /// the one its `switchboard_account` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_key: Option<String>,
    /// The message it matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The message's status after it (`delivered`, `bounced`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `applied`, `duplicate` (reported before), `stale` (the message is
    /// further along) or `none` (the record reports no status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transition: Option<String>,
    /// The event it was published as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The id of the unmatched record kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmatched_id: Option<String>,
    /// Why it matched nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An address an account owns on a transport, which replies are sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberAnswer {
    /// The account.
    pub account_key: AccountKey,
    /// The transport or provider (`twilio`, a Vumi transport's name).
    pub transport: String,
    /// The address, normalised (E.164, a short code, an e-mail address).
    pub address: String,
    /// When it was added.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

/// `GET /v1/accounts/{account}/numbers`: the account's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberList {
    /// The account.
    pub account_key: AccountKey,
    /// Its addresses, by transport and address.
    pub numbers: Vec<NumberAnswer>,
}
