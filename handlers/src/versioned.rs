//! Named, versioned sources of an account — Rhai scripts, message
//! templates — stored through the [`SourceRecords`] port and kept compiled.
//!
//! A put compiles the source first, so one that does not compile is never
//! stored. The compiled current version of each source is cached; a put
//! replaces it, so the next use runs the new version without a restart and
//! the old one is never used again. What a kind of source is (its noun, the
//! names it takes, how it compiles) is a [`SourceKind`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use switchboard_sdk::AccountKey;

use crate::records::{RecordError, SourceRecords, SourceVersion};

/// A kind of versioned source.
pub trait SourceKind: Send + Sync + fmt::Debug + 'static {
    /// What compiling makes.
    type Compiled: Send + Sync;
    /// Why a source does not compile.
    type Error: std::error::Error + Send + Sync + 'static;
    /// What one is called in messages (`script`, `template`).
    const NOUN: &'static str;
    /// The names one may have, for the error that refuses another.
    const NAME_RULE: &'static str;

    /// Whether `name` can name one.
    fn is_name(name: &str) -> bool;

    /// Compiles `source`, about to be stored as `name`, checking it as
    /// strictly as the kind can.
    fn check(&self, name: &str, source: &str) -> Result<Self::Compiled, Self::Error>;

    /// Compiles a stored `source` for use (by default as
    /// [`SourceKind::check`] does).
    fn compile(&self, name: &str, source: &str) -> Result<Self::Compiled, Self::Error> {
        self.check(name, source)
    }
}

/// A source's current version, compiled.
pub struct Compiled<T> {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// What it compiled to.
    pub compiled: T,
}

impl<T> fmt::Debug for Compiled<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compiled")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Why a source store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceStoreError<E: std::error::Error + 'static> {
    /// The stored versions could not be read or written.
    #[error(transparent)]
    Records(#[from] RecordError),
    /// The name cannot be one of this kind's.
    #[error("{name:?} is not a {noun} name: {rule}")]
    InvalidName {
        /// The kind's noun.
        noun: &'static str,
        /// The name given.
        name: String,
        /// The names one may have.
        rule: &'static str,
    },
    /// The source does not compile; nothing was stored.
    #[error("{noun} {name:?} of account {account} does not compile: {error}")]
    Compile {
        /// The kind's noun.
        noun: &'static str,
        /// The account.
        account: String,
        /// The source's name.
        name: String,
        /// Where and why.
        error: Box<E>,
    },
    /// There is no such source.
    #[error("account {account} has no {noun} named {name:?}")]
    NoSuch {
        /// The kind's noun.
        noun: &'static str,
        /// The account.
        account: String,
        /// The name asked for.
        name: String,
    },
    /// There is no such version.
    #[error("{noun} {name:?} of account {account} has no version {version}")]
    NoSuchVersion {
        /// The kind's noun.
        noun: &'static str,
        /// The account.
        account: String,
        /// The source's name.
        name: String,
        /// The version asked for.
        version: u64,
    },
}

type CacheKey = (AccountKey, String);

/// A kind's compiled current version, shared.
pub type Current<K> = Arc<Compiled<<K as SourceKind>::Compiled>>;

/// Every account's sources of one kind.
pub struct SourceStore<K: SourceKind> {
    kind: K,
    records: Arc<dyn SourceRecords>,
    /// The compiled current version of each source used or put.
    cache: RwLock<HashMap<CacheKey, Current<K>>>,
    /// Serialises puts and removes, so version numbers never collide.
    writer: Mutex<()>,
}

impl<K: SourceKind> fmt::Debug for SourceStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceStore")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<K: SourceKind> SourceStore<K> {
    /// Sources of `kind` kept in `records`.
    pub fn new(records: Arc<dyn SourceRecords>, kind: K) -> Self {
        Self {
            kind,
            records,
            cache: RwLock::new(HashMap::new()),
            writer: Mutex::new(()),
        }
    }

    /// What kind of source this store keeps.
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// The error for a source that is not there.
    pub fn missing(account: &AccountKey, name: &str) -> SourceStoreError<K::Error> {
        SourceStoreError::NoSuch {
            noun: K::NOUN,
            account: account.to_string(),
            name: name.to_string(),
        }
    }

    /// Compiles `source` and stores it as the next version of `name`.
    pub fn put(
        &self,
        account: &AccountKey,
        name: &str,
        source: &str,
    ) -> Result<SourceVersion, SourceStoreError<K::Error>> {
        if !K::is_name(name) {
            return Err(SourceStoreError::InvalidName {
                noun: K::NOUN,
                name: name.to_string(),
                rule: K::NAME_RULE,
            });
        }
        let compiled =
            self.kind
                .check(name, source)
                .map_err(|error| SourceStoreError::Compile {
                    noun: K::NOUN,
                    account: account.to_string(),
                    name: name.to_string(),
                    error: Box::new(error),
                })?;
        let _guard = self.writer.lock().expect("source writer lock");
        // Another replica may take the same number at the same moment: the
        // version must be new, or the number is read again.
        let record = loop {
            let next = self
                .records
                .last_version(account, name)?
                .map_or(1, |v| v + 1);
            let record = SourceVersion {
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
        self.cache.write().expect("source cache lock").insert(
            (account.clone(), name.to_string()),
            Arc::new(Compiled {
                name: name.to_string(),
                version: record.version,
                compiled,
            }),
        );
        Ok(record)
    }

    /// The current version of a source.
    pub fn current(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<SourceVersion>, SourceStoreError<K::Error>> {
        Ok(self.records.current(account, name)?)
    }

    /// The current version of every source of `account`, by name.
    pub fn list(
        &self,
        account: &AccountKey,
    ) -> Result<Vec<SourceVersion>, SourceStoreError<K::Error>> {
        Ok(self.records.list(account)?)
    }

    /// Every version of a source, oldest first (kept after a remove).
    pub fn history(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Vec<SourceVersion>, SourceStoreError<K::Error>> {
        Ok(self.records.history(account, name)?)
    }

    /// One version of a source.
    pub fn version(
        &self,
        account: &AccountKey,
        name: &str,
        version: u64,
    ) -> Result<SourceVersion, SourceStoreError<K::Error>> {
        self.records
            .version(account, name, version)?
            .ok_or_else(|| SourceStoreError::NoSuchVersion {
                noun: K::NOUN,
                account: account.to_string(),
                name: name.to_string(),
                version,
            })
    }

    /// Removes a source (its versions are kept; a later put continues the
    /// numbering).
    pub fn remove(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<SourceVersion, SourceStoreError<K::Error>> {
        let _guard = self.writer.lock().expect("source writer lock");
        let removed = self.records.remove(account, name);
        self.cache
            .write()
            .expect("source cache lock")
            .remove(&(account.clone(), name.to_string()));
        removed?.ok_or_else(|| Self::missing(account, name))
    }

    /// Drops the compiled copy of a source that another replica changed:
    /// the next use compiles the stored version.
    pub fn forget(&self, account: &AccountKey, name: &str) {
        let _guard = self.writer.lock().expect("source writer lock");
        self.cache
            .write()
            .expect("source cache lock")
            .remove(&(account.clone(), name.to_string()));
    }

    /// Drops every compiled source (after catching up with other replicas).
    pub fn forget_all(&self) {
        let _guard = self.writer.lock().expect("source writer lock");
        self.cache.write().expect("source cache lock").clear();
    }

    /// The compiled current version of a source, compiling it on first use.
    pub fn compiled(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<Current<K>>, SourceStoreError<K::Error>> {
        let cache_key = (account.clone(), name.to_string());
        if let Some(found) = self
            .cache
            .read()
            .expect("source cache lock")
            .get(&cache_key)
        {
            return Ok(Some(found.clone()));
        }
        let Some(record) = self.current(account, name)? else {
            return Ok(None);
        };
        // Stored sources compiled when they were put; only a change of
        // limits since (a lower expression depth) can make one fail now.
        let compiled =
            self.kind
                .compile(name, &record.source)
                .map_err(|error| SourceStoreError::Compile {
                    noun: K::NOUN,
                    account: account.to_string(),
                    name: name.to_string(),
                    error: Box::new(error),
                })?;
        let compiled = Arc::new(Compiled {
            name: name.to_string(),
            version: record.version,
            compiled,
        });
        let _guard = self.writer.lock().expect("source writer lock");
        // A put may have raced us; the cache then already holds a newer
        // version. Another replica may have changed the source meanwhile
        // (its forget came before this insert): cache only what is current.
        if self
            .current(account, name)?
            .is_none_or(|now| now.version != compiled.version)
        {
            return Ok(Some(compiled));
        }
        let mut cache = self.cache.write().expect("source cache lock");
        Ok(Some(cache.entry(cache_key).or_insert(compiled).clone()))
    }
}
