//! Rhai scripts kept by the dispatcher (`handler = "script:NAME"`).
//!
//! `PUT /v1/accounts/{account}/scripts/{name}` takes the script's source as
//! its body (text).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

/// The query of `GET .../scripts/{name}`: `?version=N` for an older version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionQuery {
    /// The version to show; the current one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// A version of a script without its source (lists, history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptSummary {
    /// The script's name.
    pub name: String,
    /// Its version: 1, then +1 for each put.
    pub version: u64,
    /// When this version was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// How many lines its source has.
    pub lines: usize,
}

/// `GET /v1/accounts/{account}/scripts`: the current version of each script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptList {
    /// The account.
    pub account_key: AccountKey,
    /// The scripts, by name.
    pub scripts: Vec<ScriptSummary>,
}

/// `GET /v1/accounts/{account}/scripts/{name}[?version=N]`: a version with
/// its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Script {
    /// The account.
    pub account_key: AccountKey,
    /// The script's name.
    pub name: String,
    /// The version.
    pub version: u64,
    /// When it was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// The Rhai source.
    pub source: String,
}

/// `PUT /v1/accounts/{account}/scripts/{name}`: the version just stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredScript {
    /// The account.
    pub account_key: AccountKey,
    /// The script's name.
    pub name: String,
    /// The new version.
    pub version: u64,
    /// When it was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// How many lines its source has.
    pub lines: usize,
}

/// `DELETE /v1/accounts/{account}/scripts/{name}`: the version that was
/// current (its history is kept; a new put continues the numbering).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedScript {
    /// The account.
    pub account_key: AccountKey,
    /// The script's name.
    pub name: String,
    /// The version that was current.
    pub version: u64,
    /// When that version was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// How many lines its source had.
    pub lines: usize,
    /// Always true.
    pub removed: bool,
}

/// `GET /v1/accounts/{account}/scripts/{name}/versions`: every version kept
/// (the last 1,000), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptHistory {
    /// The account.
    pub account_key: AccountKey,
    /// The script's name.
    pub name: String,
    /// Its versions.
    pub versions: Vec<ScriptSummary>,
}

/// The answer of `POST /v1/accounts/{account}/scripts/{name}/test` (a dry
/// run of the script on a sample event): its outcome, output, emits, logs
/// and cost. Built by `switchboard_engine::dry_run`, kept as JSON here.
pub type ScriptTest = Value;
