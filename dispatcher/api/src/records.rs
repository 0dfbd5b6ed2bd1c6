//! The records chains keep for an account: contacts, the messages they
//! sent, and secrets (write-only: only their names are ever answered).
//!
//! A contact is a `switchboard_handlers::records::Contact` and a message a
//! `switchboard_handlers::records::MessageRecord`; both are kept as JSON here
//! because the handlers crate is not light enough for clients. `GET
//! .../contacts/{key}` (by key, msisdn or e-mail) and `GET
//! .../messages/{id}` answer the record itself.
//!
//! `PUT /v1/accounts/{account}/secrets/{name}` takes the secret's value as
//! its body (text; one trailing newline is not part of it).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_sdk::AccountKey;

/// `GET /v1/accounts/{account}/contacts[?limit=N]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactList {
    /// The account.
    pub account_key: AccountKey,
    /// The contacts, each a `Contact` as JSON.
    pub contacts: Vec<Value>,
}

/// `GET /v1/accounts/{account}/messages[?limit=N]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageList {
    /// The account.
    pub account_key: AccountKey,
    /// The messages, each a `MessageRecord` as JSON.
    pub messages: Vec<Value>,
}

/// `GET /v1/accounts/{account}/secrets`: the names of the account's secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretList {
    /// The account.
    pub account_key: AccountKey,
    /// The secrets' names.
    pub secrets: Vec<String>,
}

/// `PUT /v1/accounts/{account}/secrets/{name}`: the secret is set, durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSet {
    /// The account.
    pub account_key: AccountKey,
    /// The secret's name.
    pub secret: String,
    /// Always true.
    pub set: bool,
}

/// `DELETE /v1/accounts/{account}/secrets/{name}`: the secret is gone, durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRemoved {
    /// The account.
    pub account_key: AccountKey,
    /// The secret's name.
    pub secret: String,
    /// Always true.
    pub removed: bool,
}

/// `GET /v1/accounts/{account}/preferences/{contact}`: what a contact (by
/// key) or an address opted in to and out of, per channel. Nothing
/// recorded for a channel means subscribed to everything on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencesAnswer {
    /// The account.
    pub account_key: AccountKey,
    /// The contact's key, when the contact asked for is one.
    pub contact: Option<String>,
    /// The e-mail address's preferences (an `AddressPreferences` as JSON):
    /// `address` and `topics`; null when there is no address.
    pub email: Option<Value>,
    /// The number's preferences, the same way.
    pub sms: Option<Value>,
}

/// `PUT /v1/accounts/{account}/preferences/{contact}`: opts a contact's
/// address (or the address given) in or out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPreference {
    /// `email` or `sms`.
    pub channel: String,
    /// Whether it may be sent.
    pub subscribed: bool,
    /// `all` (the default), `template:SLUG` or `category:NAME`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Why, recorded with the choice (default: set through the API).
    #[serde(default)]
    pub reason: Option<String>,
}

/// `GET /v1/accounts/{account}/files`: the account's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileList {
    /// The account.
    pub account_key: AccountKey,
    /// The files, each a `FileInfo` as JSON: `name`, `content_type`,
    /// `size`, `sha256`, `created_at`.
    pub files: Vec<Value>,
}

/// `DELETE /v1/accounts/{account}/files/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedFile {
    /// The account.
    pub account_key: AccountKey,
    /// The file's name.
    pub name: String,
    /// Always true.
    pub removed: bool,
}
