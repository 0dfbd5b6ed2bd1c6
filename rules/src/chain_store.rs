//! Stored chains: every change to an account's chains makes a new version; the
//! last [`VERSIONS_KEPT`] are kept, listed and restorable.
//!
//! The current version of every account is held in memory, indexed for
//! matching, so routing an event reads no storage and never looks at another
//! account's chains.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

use crate::matching::AccountChains;
use crate::model::{ChainFile, ChainSpec};
use crate::validate::{StepCatalog, ValidChainFile, ValidationError, validate};

/// How many versions of an account's chains are kept: as a new one is made,
/// those older than the last this many go, but for the last one applied
/// from a chain file (which a start compares its file with).
pub const VERSIONS_KEPT: u64 = 1_000;

/// How many versions past the bound one new version removes at most, the
/// oldest first (a history kept before histories were bounded comes down
/// to it over several), so that no write holds its account's writer for
/// long: on the replicated backend each removal is a write to the bucket.
pub const PRUNED_AT_ONCE: usize = 128;

/// What a version applied from a chain file at start says made it (then
/// the file's name).
pub const FROM_FILE: &str = "apply file";

/// One version of an account's chains, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainVersion {
    /// The account.
    pub account_key: AccountKey,
    /// 1 for the first apply, then +1 for each change.
    pub version: u64,
    /// When the version was made.
    #[serde(with = "time::serde::rfc3339")]
    pub applied_at: OffsetDateTime,
    /// What made it: `apply`, `remove chain NAME`, `remove all`, `restore N`.
    pub change: String,
    /// The chains of this version.
    pub chains: Vec<ChainSpec>,
    /// Event types earlier versions' chains awaited (a `wait_for_event`,
    /// a `cancel_on`) and this one's do not: runs paused under those
    /// versions may still wait for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaited_before: Vec<String>,
    /// The last version applied from a chain file ([`FROM_FILE`]): this
    /// one or an earlier one; 0 if none was. `None` for a version stored
    /// before versions said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<u64>,
}

/// What a new version changed, by chain name, in the new version's order
/// (`removed`: the old version's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainChanges {
    /// Chains the old version did not have.
    pub added: Vec<String>,
    /// Chains both have, different.
    pub changed: Vec<String>,
    /// Chains only the old version had.
    pub removed: Vec<String>,
    /// Chains both have, the same.
    pub unchanged: Vec<String>,
    /// Whether the chains both have are in another order.
    pub reordered: bool,
}

impl ChainChanges {
    /// From the chains `old` to the chains `new`.
    pub fn between(old: &[ChainSpec], new: &[ChainSpec]) -> Self {
        let mut changes = Self::default();
        for chain in new {
            let name = chain.name.clone();
            match old.iter().find(|c| c.name == chain.name) {
                None => changes.added.push(name),
                Some(same) if same == chain => changes.unchanged.push(name),
                Some(_) => changes.changed.push(name),
            }
        }
        changes.removed = old
            .iter()
            .filter(|c| new.iter().all(|n| n.name != c.name))
            .map(|c| c.name.clone())
            .collect();
        let kept = |chains: &[ChainSpec]| -> Vec<String> {
            chains
                .iter()
                .filter(|c| {
                    old.iter().any(|o| o.name == c.name) && new.iter().any(|n| n.name == c.name)
                })
                .map(|c| c.name.clone())
                .collect()
        };
        changes.reordered = kept(old) != kept(new);
        changes
    }
}

impl ChainVersion {
    /// This version's chains, indexed for matching.
    pub fn indexed(&self) -> AccountChains {
        AccountChains::new(self.version, self.to_file()).awaiting_also(&self.awaited_before)
    }

    /// What the version after this one, with `chains`, carries forward of
    /// the event types this one's runs may await.
    fn awaited_after(&self, chains: &[ChainSpec]) -> Vec<String> {
        let now = crate::matching::awaited_types(chains);
        let mut before: Vec<String> = crate::matching::awaited_types(&self.chains)
            .into_iter()
            .chain(self.awaited_before.iter().cloned())
            .filter(|t| !now.contains(t))
            .collect();
        before.sort();
        before.dedup();
        before
    }

    /// The chain file of this version.
    pub fn to_file(&self) -> ChainFile {
        ChainFile {
            account_key: self.account_key.clone(),
            chains: self.chains.clone(),
        }
    }
}

/// Why a chain store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainStoreError {
    /// The storage below failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A stored record could not be read back.
    #[error("stored chains of account {account} are unreadable: {message}")]
    Corrupt {
        /// The account.
        account: String,
        /// What went wrong.
        message: String,
    },
    /// The account has never had chains.
    #[error("account {account} has no chains")]
    NoChains {
        /// The account.
        account: String,
    },
    /// The named chain does not exist.
    #[error("account {account} has no chain named {name:?}")]
    NoSuchChain {
        /// The account.
        account: String,
        /// The chain name.
        name: String,
    },
    /// The version does not exist.
    #[error("account {account} has no chain version {version}")]
    NoSuchVersion {
        /// The account.
        account: String,
        /// The version asked for.
        version: u64,
    },
    /// The chains do not pass validation (for a restore: any more).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// The chains of every account.
#[derive(Debug)]
pub struct ChainStore {
    store: Store,
    current: RwLock<HashMap<AccountKey, Arc<AccountChains>>>,
    /// Serialises changes, so version numbers never collide.
    writer: Mutex<()>,
    /// How many versions of an account are kept ([`VERSIONS_KEPT`]).
    versions_kept: u64,
    /// How many a new version removes at most ([`PRUNED_AT_ONCE`]).
    pruned_at_once: usize,
}

impl ChainStore {
    /// Opens the chain store, loading every account's current chains.
    pub fn open(store: Store) -> Result<Self, ChainStoreError> {
        let current = load_all(&store)?;
        Ok(Self {
            store,
            current: RwLock::new(current),
            writer: Mutex::new(()),
            versions_kept: VERSIONS_KEPT,
            pruned_at_once: PRUNED_AT_ONCE,
        })
    }

    /// The same store, keeping `n` versions of an account instead of
    /// [`VERSIONS_KEPT`].
    #[cfg(test)]
    pub(crate) fn keeping(mut self, n: u64) -> Self {
        self.versions_kept = n;
        self
    }

    /// The same store, removing at most `n` versions at once instead of
    /// [`PRUNED_AT_ONCE`].
    #[cfg(test)]
    pub(crate) fn pruning_at_once(mut self, n: usize) -> Self {
        self.pruned_at_once = n;
        self
    }

    /// The current chains of `account`, indexed for matching.
    pub fn lookup(&self, account: &AccountKey) -> Option<Arc<AccountChains>> {
        self.current
            .read()
            .expect("chain cache lock")
            .get(account)
            .cloned()
    }

    /// Reloads `account`'s current chains from the store (another replica
    /// changed them); returns the version now in use, if any.
    pub fn reload(&self, account: &AccountKey) -> Result<Option<u64>, ChainStoreError> {
        let _guard = self.writer.lock().expect("chain writer lock");
        let stored = self.current(account)?;
        let mut current = self.current.write().expect("chain cache lock");
        match stored {
            Some(version) => {
                let number = version.version;
                if current.get(account).map(|c| c.version()) != Some(number) {
                    current.insert(account.clone(), Arc::new(version.indexed()));
                }
                Ok(Some(number))
            }
            None => {
                current.remove(account);
                Ok(None)
            }
        }
    }

    /// Reloads every account's chains from the store (after catching up
    /// with other replicas).
    pub fn reload_all(&self) -> Result<(), ChainStoreError> {
        let _guard = self.writer.lock().expect("chain writer lock");
        let fresh = load_all(&self.store)?;
        *self.current.write().expect("chain cache lock") = fresh;
        Ok(())
    }

    /// Every account that has chains (possibly an empty set after `remove_all`).
    pub fn accounts(&self) -> Vec<AccountKey> {
        let mut accounts: Vec<_> = self
            .current
            .read()
            .expect("chain cache lock")
            .keys()
            .cloned()
            .collect();
        accounts.sort();
        accounts
    }

    /// Stores a checked chain file as the account's new version.
    pub fn apply(&self, chains: ValidChainFile) -> Result<ChainVersion, ChainStoreError> {
        self.commit(chains.into_file(), "apply".into())
    }

    /// Stores a checked chain file as the account's new version, replacing
    /// the account's chains or merging the file's into them (`merge`: a
    /// chain of the file replaces the one of the same name, the others
    /// stay), with `change` as what made it; returns the version and what it
    /// changed. Every apply makes a version, one that changes nothing too
    /// (the history shows each apply). The merge is made against the version
    /// this replica holds, under its writer lock.
    pub fn apply_changes(
        &self,
        chains: ValidChainFile,
        merge: bool,
        change: &str,
        catalog: &dyn crate::StepCatalog,
    ) -> Result<(ChainVersion, ChainChanges), ChainStoreError> {
        let _guard = self.writer.lock().expect("chain writer lock");
        let file = chains.into_file();
        let account = file.account_key.clone();
        self.commit_locked(&account, change, |old| {
            let new = if merge {
                let mut merged = old.to_vec();
                for chain in &file.chains {
                    match merged.iter_mut().find(|c| c.name == chain.name) {
                        Some(same) => *same = chain.clone(),
                        None => merged.push(chain.clone()),
                    }
                }
                let merged = ChainFile {
                    account_key: account.clone(),
                    chains: merged,
                };
                // The merged set is checked as a whole, as an apply would be,
                // but for secrets: the file's were checked by the caller
                // (or deferred, at start), and the account's other chains'
                // are theirs to fix.
                crate::validate_deferring_secrets(merged, &account, catalog)?
                    .0
                    .into_file()
            } else {
                file.clone()
            };
            let changes = ChainChanges::between(old, &new.chains);
            Ok((new.chains, changes))
        })
    }

    /// The current version of `account`.
    pub fn current(&self, account: &AccountKey) -> Result<Option<ChainVersion>, ChainStoreError> {
        self.store
            .get(Collection::Chains, account.as_str().as_bytes())?
            .map(|v| decode(account.as_str(), &v))
            .transpose()
    }

    /// Every version of `account`, oldest first.
    pub fn history(&self, account: &AccountKey) -> Result<Vec<ChainVersion>, ChainStoreError> {
        self.store
            .scan_prefix(
                Collection::ChainVersions,
                &key(&[account.as_str().as_bytes(), b""]),
            )?
            .into_iter()
            .map(|(_, v)| decode(account.as_str(), &v))
            .collect()
    }

    /// Removes `account`'s versions older than the last
    /// [`ChainStore::versions_kept`] up to `newest`, but for the last one
    /// applied from a file: one per version made, once the history is within
    /// its bound; [`PRUNED_AT_ONCE`] at most while a longer one (kept before
    /// histories were bounded) comes down to it, so that no commit holds the
    /// account's writer for long.
    fn prune(&self, account: &AccountKey, newest: &ChainVersion) -> Result<(), ChainStoreError> {
        let Some(cut) = newest.version.checked_sub(self.versions_kept) else {
            return Ok(());
        };
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        let from_file = |k: &[u8]| Some(version_of_key(k)) == newest.from_file;
        self.store.remove_prefix_before(
            Collection::ChainVersions,
            &prefix,
            &version_key(account, cut + 1),
            from_file,
            self.pruned_at_once,
        )?;
        Ok(())
    }

    /// The last version of `account` applied from a chain file
    /// ([`FROM_FILE`]), if it has one still kept.
    pub fn last_from_file(
        &self,
        account: &AccountKey,
    ) -> Result<Option<ChainVersion>, ChainStoreError> {
        let Some(current) = self.current(account)? else {
            return Ok(None);
        };
        match current.from_file {
            Some(0) => Ok(None),
            Some(n) if n == current.version => Ok(Some(current)),
            Some(n) => match self.version(account, n) {
                Ok(v) => Ok(Some(v)),
                Err(ChainStoreError::NoSuchVersion { .. }) => Ok(None),
                Err(e) => Err(e),
            },
            None => self.last_from_file_in_history(account),
        }
    }

    /// The last version of `account` applied from a chain file, looked
    /// for in its history (for versions stored before they said which).
    fn last_from_file_in_history(
        &self,
        account: &AccountKey,
    ) -> Result<Option<ChainVersion>, ChainStoreError> {
        Ok(self
            .history(account)?
            .into_iter()
            .rev()
            .find(|v| v.change.starts_with(FROM_FILE)))
    }

    /// One version of `account`.
    pub fn version(
        &self,
        account: &AccountKey,
        version: u64,
    ) -> Result<ChainVersion, ChainStoreError> {
        match self
            .store
            .get(Collection::ChainVersions, &version_key(account, version))?
        {
            Some(v) => decode(account.as_str(), &v),
            None => Err(ChainStoreError::NoSuchVersion {
                account: account.to_string(),
                version,
            }),
        }
    }

    /// Makes a new version without the chain `name`.
    pub fn remove_chain(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<ChainVersion, ChainStoreError> {
        let _guard = self.writer.lock().expect("chain writer lock");
        if self.current(account)?.is_none() {
            return Err(ChainStoreError::NoChains {
                account: account.to_string(),
            });
        }
        let (version, ()) =
            self.commit_locked(account, &format!("remove chain {name}"), |old| {
                if !old.iter().any(|c| c.name == name) {
                    return Err(ChainStoreError::NoSuchChain {
                        account: account.to_string(),
                        name: name.to_string(),
                    });
                }
                // The chains left were valid together, and no chain refers
                // to another.
                let left = old.iter().filter(|c| c.name != name).cloned().collect();
                Ok((left, ()))
            })?;
        Ok(version)
    }

    /// Makes a new, empty version.
    pub fn remove_all(&self, account: &AccountKey) -> Result<ChainVersion, ChainStoreError> {
        let _guard = self.writer.lock().expect("chain writer lock");
        if self.current(account)?.is_none() {
            return Err(ChainStoreError::NoChains {
                account: account.to_string(),
            });
        }
        let (version, ()) = self.commit_locked(account, "remove all", |_| Ok((Vec::new(), ())))?;
        Ok(version)
    }

    /// Makes a new version equal to `version`, checked again against today's
    /// handlers (a handler or script it used may have gone since).
    pub fn restore(
        &self,
        account: &AccountKey,
        version: u64,
        catalog: &dyn StepCatalog,
    ) -> Result<ChainVersion, ChainStoreError> {
        let old = self.version(account, version)?;
        let valid = validate(old.to_file(), account, catalog)?;
        self.commit(valid.into_file(), format!("restore {version}"))
    }

    fn commit(&self, file: ChainFile, change: String) -> Result<ChainVersion, ChainStoreError> {
        let _guard = self.writer.lock().expect("chain writer lock");
        let (version, ()) = self.commit_locked(&file.account_key, &change, |_| {
            Ok((file.chains.clone(), ()))
        })?;
        Ok(version)
    }

    /// Stores the chains `make` derives from the account's current ones as
    /// its next version. Another replica may take the same number at the
    /// same moment: the version's key must be new, or the current version is
    /// read again and `make` called again on it, so that a merge or removal
    /// is never made against a version that is no longer the last.
    fn commit_locked<T>(
        &self,
        account: &AccountKey,
        change: &str,
        mut make: impl FnMut(&[ChainSpec]) -> Result<(Vec<ChainSpec>, T), ChainStoreError>,
    ) -> Result<(ChainVersion, T), ChainStoreError> {
        let account = account.clone();
        let (record, made) = loop {
            // The base and the number come from the same record, the last
            // version: a replica's copy of the current-chains key may lag
            // behind its copy of the versions.
            let last = self.store.scan_prefix_rev(
                Collection::ChainVersions,
                &key(&[account.as_str().as_bytes(), b""]),
                1,
            )?;
            let (next, base) = match last.first() {
                Some((k, v)) => (version_of_key(k) + 1, Some(decode(account.as_str(), v)?)),
                None => (1, None),
            };
            let (chains, made) = make(base.as_ref().map_or(&[], |b| b.chains.as_slice()))?;
            let record = ChainVersion {
                account_key: account.clone(),
                version: next,
                applied_at: switchboard_sdk::now(),
                change: change.to_string(),
                from_file: Some(if change.starts_with(FROM_FILE) {
                    next
                } else {
                    match base.as_ref() {
                        None => 0,
                        Some(b) => match b.from_file {
                            Some(n) => n,
                            // Stored before versions said: looked for
                            // once, before any is pruned.
                            None => self
                                .last_from_file_in_history(&account)?
                                .map_or(0, |v| v.version),
                        },
                    }
                }),
                awaited_before: base.map(|b| b.awaited_after(&chains)).unwrap_or_default(),
                chains,
            };
            let bytes = serde_json::to_vec(&record).expect("a chain version serialises");
            let written = self.store.write_atomically_creating(
                &[
                    Write {
                        collection: Collection::Chains,
                        key: account.as_str().as_bytes().to_vec(),
                        value: Some(bytes.clone()),
                    },
                    Write {
                        collection: Collection::ChainVersions,
                        key: version_key(&account, next),
                        value: Some(bytes),
                    },
                ],
                1,
            )?;
            if written {
                break (record, made);
            }
        };
        self.store.flush_blocking()?;
        let indexed = Arc::new(record.indexed());
        self.current
            .write()
            .expect("chain cache lock")
            .insert(account.clone(), indexed);
        // The version is made: old ones that do not go now go at the
        // next.
        if let Err(e) = self.prune(&account, &record) {
            tracing::warn!(%account, error = %e, "removing old chain versions failed");
        }
        Ok((record, made))
    }
}

/// Every account's current chains, indexed for matching.
fn load_all(store: &Store) -> Result<HashMap<AccountKey, Arc<AccountChains>>, ChainStoreError> {
    let mut current = HashMap::new();
    for (k, v) in store.scan_prefix(Collection::Chains, b"")? {
        let version = decode(&String::from_utf8_lossy(&k), &v)?;
        current.insert(version.account_key.clone(), Arc::new(version.indexed()));
    }
    Ok(current)
}

fn version_key(account: &AccountKey, version: u64) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), &version.to_be_bytes()])
}

fn version_of_key(k: &[u8]) -> u64 {
    let tail: [u8; 8] = k[k.len() - 8..]
        .try_into()
        .expect("version keys end in 8 bytes");
    u64::from_be_bytes(tail)
}

fn decode(account: &str, bytes: &[u8]) -> Result<ChainVersion, ChainStoreError> {
    serde_json::from_slice(bytes).map_err(|e| ChainStoreError::Corrupt {
        account: account.to_string(),
        message: e.to_string(),
    })
}
