//! Stored scripts and templates: each account's, by name, the last
//! [`VERSIONS_KEPT`] versions kept. [`crate::ScriptStore`] compiles,
//! validates and caches them; this port is where it keeps their versions.

use serde::{Deserialize, Serialize};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

use super::RecordError;

/// How many versions of one script (or template) are kept: as a new one is
/// stored, those older than the last this many go.
pub const VERSIONS_KEPT: u64 = 1_000;

pub use switchboard_rules::PRUNED_AT_ONCE;

/// One version of a script, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceVersion {
    /// The account.
    pub account_key: AccountKey,
    /// The script's name (`script:NAME` in chains).
    pub name: String,
    /// 1 for the first put, then +1 for each put.
    pub version: u64,
    /// When it was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// The Rhai source.
    pub source: String,
}

/// The stored versions of every account's scripts.
pub trait SourceRecords: Send + Sync + std::fmt::Debug {
    /// The number of the last version of a script, removed or not.
    fn last_version(&self, account: &AccountKey, name: &str) -> Result<Option<u64>, RecordError>;

    /// Stores `version` as its script's current version and in its history,
    /// durably, if its history has no version of that number yet (which
    /// another replica may have taken meanwhile); returns whether it did.
    /// The script's versions older than the last [`VERSIONS_KEPT`] go.
    fn create(&self, version: &SourceVersion) -> Result<bool, RecordError>;

    /// The current version of a script.
    fn current(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<SourceVersion>, RecordError>;

    /// The current version of every script of `account`, by name.
    fn list(&self, account: &AccountKey) -> Result<Vec<SourceVersion>, RecordError>;

    /// Every version of a script kept, oldest first (kept after a remove).
    fn history(&self, account: &AccountKey, name: &str) -> Result<Vec<SourceVersion>, RecordError>;

    /// One version of a script.
    fn version(
        &self,
        account: &AccountKey,
        name: &str,
        version: u64,
    ) -> Result<Option<SourceVersion>, RecordError>;

    /// Makes a script have no current version, durably, keeping its
    /// history; returns the version that was current.
    fn remove(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<SourceVersion>, RecordError>;
}
