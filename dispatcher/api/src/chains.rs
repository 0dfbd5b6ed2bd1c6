//! Chains: the accounts that have them, an account's current chains, their
//! versions, and dry runs.
//!
//! `PUT /v1/accounts/{account}/chains` takes a chain file as its body, TOML
//! or JSON (by the `Content-Type`, else sniffed), not a type of this crate.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

/// `GET /v1/accounts`: accounts that have chains (for an account token, only
/// its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountList {
    /// The accounts.
    pub accounts: Vec<AccountKey>,
}

/// One version of an account's chains: the answer of every call that shows
/// or changes them (`GET`, `PUT` and `DELETE .../chains`, `DELETE
/// .../chains/{name}`, `GET .../chain-versions/{version}`, `POST
/// .../chain-versions/{version}/restore`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainVersion {
    /// The account.
    pub account_key: AccountKey,
    /// 1 for the first apply, then +1 for each change; 0 for an account
    /// that has never had chains (then the other fields are absent or
    /// empty).
    pub version: u64,
    /// When the version was made.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub applied_at: Option<OffsetDateTime>,
    /// What made it: `apply`, `remove chain NAME`, `remove all`, `restore N`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub change: String,
    /// The chains of this version, each a `switchboard_rules::ChainSpec` as
    /// JSON (the chain file's model, which lives with the rules).
    pub chains: Vec<Value>,
}

/// `PUT /v1/accounts/{account}/chains[?merge=true]`: the version now
/// current and what the apply changed, by chain name. Without `merge` the
/// file's chains replace the account's (a chain the file does not name is
/// removed); with it, they replace those of the same name and the others
/// stay. Every apply makes a version, one that changes nothing too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainsApplied {
    /// The version now current.
    #[serde(flatten)]
    pub version: ChainVersion,
    /// Chains the apply added.
    pub added: Vec<String>,
    /// Chains it changed.
    pub changed: Vec<String>,
    /// Chains it removed.
    pub removed: Vec<String>,
    /// Chains it left as they were.
    pub unchanged: Vec<String>,
    /// Whether it changed the order of the chains it kept.
    pub reordered: bool,
}

/// The query of `PUT /v1/accounts/{account}/chains`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyQuery {
    /// Keep the account's chains that the file does not name.
    #[serde(default)]
    pub merge: bool,
}

/// `GET /v1/accounts/{account}/chains/{name}`: one chain of the current
/// version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainAnswer {
    /// The account.
    pub account_key: AccountKey,
    /// The current version of the account's chains.
    pub version: u64,
    /// The chain, a `switchboard_rules::ChainSpec` as JSON.
    pub chain: Value,
}

/// `GET /v1/accounts/{account}/chain-versions`: every version kept (the last
/// 1,000, and the last applied from a chain file), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHistory {
    /// The account.
    pub account_key: AccountKey,
    /// The versions.
    pub versions: Vec<ChainVersionSummary>,
}

/// A version of an account's chains without the chains themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainVersionSummary {
    /// Its number.
    pub version: u64,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub applied_at: OffsetDateTime,
    /// What made it.
    pub change: String,
    /// The names of its chains.
    pub chains: Vec<String>,
}

/// The answer of `POST /v1/accounts/{account}/chain-test` (a dry run of a
/// sample event through the account's chains): which chains would run and
/// what each step would do. Built by `switchboard_engine::dry_run`, kept as
/// JSON here; its body is a sample event (a `VumiApiEvent` or its
/// `event_data` with the step outputs to assume).
pub type ChainTest = Value;
