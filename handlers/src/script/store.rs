//! Stored scripts: each account's Rhai handlers, by name, versioned like chains.
//!
//! A put compiles the script first, so a script that does not compile is never
//! stored. The compiled AST of each script's current version is cached; a put
//! replaces it, so the next event runs the new version without a restart and
//! the old AST is never used again.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use rhai::AST;
use serde::{Deserialize, Serialize};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

use super::{CompileError, ScriptRuntime};

/// One version of a script, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptVersion {
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
    /// The storage below failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record could not be read back.
    #[error("stored script {name:?} of account {account} is unreadable: {message}")]
    Corrupt {
        /// The account.
        account: String,
        /// The script.
        name: String,
        /// What went wrong.
        message: String,
    },
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
    store: Store,
    runtime: Arc<ScriptRuntime>,
    /// The compiled current version of each script that has been used or put.
    cache: RwLock<HashMap<CacheKey, Arc<CompiledScript>>>,
    /// Serialises puts and removes, so version numbers never collide.
    writer: Mutex<()>,
}

impl ScriptStore {
    /// Scripts kept in `store`, compiled by `runtime`.
    pub fn new(store: Store, runtime: Arc<ScriptRuntime>) -> Self {
        Self {
            store,
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
        let ast =
            self.runtime
                .compile_script(source)
                .map_err(|error| ScriptStoreError::Compile {
                    account: account.to_string(),
                    name: name.to_string(),
                    error,
                })?;
        let _guard = self.writer.lock().expect("script writer lock");
        // Another replica may take the same number at the same moment: the
        // version's key must be new, or the number is read again.
        let record = loop {
            let last = self.store.scan_prefix_rev(
                Collection::ScriptVersions,
                &key(&[account.as_str().as_bytes(), name.as_bytes(), b""]),
                1,
            )?;
            let next = match last.first() {
                Some((k, _)) => version_of_key(k) + 1,
                None => 1,
            };
            let record = ScriptVersion {
                account_key: account.clone(),
                name: name.to_string(),
                version: next,
                stored_at: switchboard_sdk::now(),
                source: source.to_string(),
            };
            let bytes = serde_json::to_vec(&record).expect("a script version serialises");
            let written = self.store.write_atomically_creating(
                &[
                    Write {
                        collection: Collection::Scripts,
                        key: current_key(account, name),
                        value: Some(bytes.clone()),
                    },
                    Write {
                        collection: Collection::ScriptVersions,
                        key: version_key(account, name, next),
                        value: Some(bytes),
                    },
                ],
                1,
            )?;
            if written {
                break record;
            }
        };
        self.store.flush_blocking()?;
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
        self.store
            .get(Collection::Scripts, &current_key(account, name))?
            .map(|v| decode(account, name, &v))
            .transpose()
    }

    /// The current version of every script of `account`, by name.
    pub fn list(&self, account: &AccountKey) -> Result<Vec<ScriptVersion>, ScriptStoreError> {
        self.store
            .scan_prefix(
                Collection::Scripts,
                &key(&[account.as_str().as_bytes(), b""]),
            )?
            .into_iter()
            .map(|(_, v)| decode(account, "", &v))
            .collect()
    }

    /// Every version of a script, oldest first (kept after a remove).
    pub fn history(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Vec<ScriptVersion>, ScriptStoreError> {
        self.store
            .scan_prefix(
                Collection::ScriptVersions,
                &key(&[account.as_str().as_bytes(), name.as_bytes(), b""]),
            )?
            .into_iter()
            .map(|(_, v)| decode(account, name, &v))
            .collect()
    }

    /// One version of a script.
    pub fn version(
        &self,
        account: &AccountKey,
        name: &str,
        version: u64,
    ) -> Result<ScriptVersion, ScriptStoreError> {
        match self.store.get(
            Collection::ScriptVersions,
            &version_key(account, name, version),
        )? {
            Some(v) => decode(account, name, &v),
            None => Err(ScriptStoreError::NoSuchVersion {
                account: account.to_string(),
                name: name.to_string(),
                version,
            }),
        }
    }

    /// Removes a script (its versions are kept; a later put continues the numbering).
    pub fn remove(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<ScriptVersion, ScriptStoreError> {
        let _guard = self.writer.lock().expect("script writer lock");
        let removed = self
            .store
            .remove(Collection::Scripts, &current_key(account, name))?
            .ok_or_else(|| ScriptStoreError::NoSuchScript {
                account: account.to_string(),
                name: name.to_string(),
            })?;
        self.store.flush_blocking()?;
        self.cache
            .write()
            .expect("script cache lock")
            .remove(&(account.clone(), name.to_string()));
        decode(account, name, &removed)
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

fn current_key(account: &AccountKey, name: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), name.as_bytes()])
}

fn version_key(account: &AccountKey, name: &str, version: u64) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        name.as_bytes(),
        &version.to_be_bytes(),
    ])
}

fn version_of_key(k: &[u8]) -> u64 {
    let tail: [u8; 8] = k[k.len() - 8..]
        .try_into()
        .expect("version keys end in 8 bytes");
    u64::from_be_bytes(tail)
}

fn decode(
    account: &AccountKey,
    name: &str,
    bytes: &[u8],
) -> Result<ScriptVersion, ScriptStoreError> {
    serde_json::from_slice(bytes).map_err(|e| ScriptStoreError::Corrupt {
        account: account.to_string(),
        name: name.to_string(),
        message: e.to_string(),
    })
}
