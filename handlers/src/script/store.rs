//! Stored scripts: each account's Rhai handlers, by name, versioned like chains.
//!
//! A put compiles the script first, so a script that does not compile is never
//! stored. The compiled AST of each script's current version is cached; a put
//! replaces it, so the next event runs the new version without a restart and
//! the old AST is never used again. The versions themselves are kept by the
//! [`ScriptRecords`] port the dispatcher provides.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use rhai::AST;
use switchboard_sdk::AccountKey;

use super::{CompileError, ScriptRuntime};
use crate::records::{RecordError, ScriptRecords, ScriptVersion};

/// A script's current version, compiled.
pub struct CompiledScript {
    /// The script's name.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// The compiled script.
    pub ast: AST,
}

impl fmt::Debug for CompiledScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledScript")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Why a script store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ScriptStoreError {
    /// The stored versions could not be read or written.
    #[error(transparent)]
    Records(#[from] RecordError),
    /// The name cannot be a script's.
    #[error(
        "{0:?} is not a script name: use a letter or _ followed by letters, digits or _ (at most 64)"
    )]
    InvalidName(String),
    /// The script does not compile; nothing was stored.
    #[error("script {name:?} of account {account} does not compile: {error}")]
    Compile {
        /// The account.
        account: String,
        /// The script.
        name: String,
        /// Where and why.
        error: CompileError,
    },
    /// There is no such script.
    #[error("account {account} has no script named {name:?}")]
    NoSuchScript {
        /// The account.
        account: String,
        /// The script.
        name: String,
    },
    /// There is no such version.
    #[error("script {name:?} of account {account} has no version {version}")]
    NoSuchVersion {
        /// The account.
        account: String,
        /// The script.
        name: String,
        /// The version asked for.
        version: u64,
    },
}

/// Whether `name` can name a script: step names default to it, and later
/// steps refer to them as `steps.<name>`, so it is an identifier.
pub fn is_script_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

type CacheKey = (AccountKey, String);

/// Every account's scripts.
#[derive(Debug)]
pub struct ScriptStore {
    records: Arc<dyn ScriptRecords>,
    runtime: Arc<ScriptRuntime>,
    /// The compiled current version of each script that has been used or put.
    cache: RwLock<HashMap<CacheKey, Arc<CompiledScript>>>,
    /// Serialises puts and removes, so version numbers never collide.
    writer: Mutex<()>,
}

impl ScriptStore {
    /// Scripts kept in `records`, compiled by `runtime`.
    pub fn new(records: Arc<dyn ScriptRecords>, runtime: Arc<ScriptRuntime>) -> Self {
        Self {
            records,
            runtime,
            cache: RwLock::new(HashMap::new()),
            writer: Mutex::new(()),
        }
    }

    /// The runtime scripts are compiled and run by.
    pub fn runtime(&self) -> &Arc<ScriptRuntime> {
        &self.runtime
    }

    /// Compiles `source` and stores it as the next version of `name`.
    pub fn put(
        &self,
        account: &AccountKey,
        name: &str,
        source: &str,
    ) -> Result<ScriptVersion, ScriptStoreError> {
        if !is_script_name(name) {
            return Err(ScriptStoreError::InvalidName(name.to_string()));
        }
        let ast = self
            .runtime
            .check_script(source)
            .map_err(|error| ScriptStoreError::Compile {
                account: account.to_string(),
                name: name.to_string(),
                error,
            })?;
        let _guard = self.writer.lock().expect("script writer lock");
        // Another replica may take the same number at the same moment: the
        // version must be new, or the number is read again.
        let record = loop {
            let next = self
                .records
                .last_version(account, name)?
                .map_or(1, |v| v + 1);
            let record = ScriptVersion {
                account_key: account.clone(),
                name: name.to_string(),
                version: next,
                stored_at: switchboard_sdk::now(),
                source: source.to_string(),
            };
            if self.records.create(&record)? {
                break record;
            }
        };
        self.cache.write().expect("script cache lock").insert(
            (account.clone(), name.to_string()),
            Arc::new(CompiledScript {
                name: name.to_string(),
                version: record.version,
                ast,
            }),
        );
        Ok(record)
    }

    /// The current version of a script.
    pub fn current(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<ScriptVersion>, ScriptStoreError> {
        Ok(self.records.current(account, name)?)
    }

    /// The current version of every script of `account`, by name.
    pub fn list(&self, account: &AccountKey) -> Result<Vec<ScriptVersion>, ScriptStoreError> {
        Ok(self.records.list(account)?)
    }

    /// Every version of a script, oldest first (kept after a remove).
    pub fn history(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Vec<ScriptVersion>, ScriptStoreError> {
        Ok(self.records.history(account, name)?)
    }

    /// One version of a script.
    pub fn version(
        &self,
        account: &AccountKey,
        name: &str,
        version: u64,
    ) -> Result<ScriptVersion, ScriptStoreError> {
        self.records
            .version(account, name, version)?
            .ok_or_else(|| ScriptStoreError::NoSuchVersion {
                account: account.to_string(),
                name: name.to_string(),
                version,
            })
    }

    /// Removes a script (its versions are kept; a later put continues the numbering).
    pub fn remove(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<ScriptVersion, ScriptStoreError> {
        let _guard = self.writer.lock().expect("script writer lock");
        let removed = self.records.remove(account, name);
        self.cache
            .write()
            .expect("script cache lock")
            .remove(&(account.clone(), name.to_string()));
        removed?.ok_or_else(|| ScriptStoreError::NoSuchScript {
            account: account.to_string(),
            name: name.to_string(),
        })
    }

    /// Drops the compiled copy of a script that another replica changed:
    /// the next use compiles the stored version.
    pub fn forget(&self, account: &AccountKey, name: &str) {
        let _guard = self.writer.lock().expect("script writer lock");
        self.cache
            .write()
            .expect("script cache lock")
            .remove(&(account.clone(), name.to_string()));
    }

    /// Drops every compiled script (after catching up with other replicas).
    pub fn forget_all(&self) {
        let _guard = self.writer.lock().expect("script writer lock");
        self.cache.write().expect("script cache lock").clear();
    }

    /// The compiled current version of a script, compiling it on first use.
    pub fn compiled(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<Arc<CompiledScript>>, ScriptStoreError> {
        let cache_key = (account.clone(), name.to_string());
        if let Some(found) = self
            .cache
            .read()
            .expect("script cache lock")
            .get(&cache_key)
        {
            return Ok(Some(found.clone()));
        }
        let Some(record) = self.current(account, name)? else {
            return Ok(None);
        };
        // Stored scripts compiled when they were put; only a change of limits
        // since (a lower expression depth) can make one fail now.
        let ast = self
            .runtime
            .compile_script(&record.source)
            .map_err(|error| ScriptStoreError::Compile {
                account: account.to_string(),
                name: name.to_string(),
                error,
            })?;
        let compiled = Arc::new(CompiledScript {
            name: name.to_string(),
            version: record.version,
            ast,
        });
        let _guard = self.writer.lock().expect("script writer lock");
        // A put may have raced us; the cache then already holds a newer
        // version. Another replica may have changed the script meanwhile
        // (its forget came before this insert): cache only what is current.
        if self
            .current(account, name)?
            .is_none_or(|now| now.version != compiled.version)
        {
            return Ok(Some(compiled));
        }
        let mut cache = self.cache.write().expect("script cache lock");
        Ok(Some(cache.entry(cache_key).or_insert(compiled).clone()))
    }
}
