//! Named, versioned sources in the store (Rhai scripts, message
//! templates): each version kept under (account, name, version as 8
//! big-endian bytes) in one collection, and the current one under
//! (account, name) in another. Written rarely, so each write is flushed
//! before it returns.

use switchboard_handlers::records::{
    PRUNED_AT_ONCE, RecordError, Records, SourceRecords, SourceVersion, VERSIONS_KEPT,
};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, Write, key};

use super::About;

/// One kind of source's versions.
#[derive(Debug)]
pub struct StoredSources {
    store: Store,
    /// The current versions.
    current: Collection,
    /// Every version.
    versions: Collection,
    /// What they are, for errors.
    records: Records,
    /// How many versions of one source are kept ([`VERSIONS_KEPT`]).
    versions_kept: u64,
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

/// The prefix of a script's versions.
fn prefix(account: &AccountKey, name: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), name.as_bytes(), b""])
}

fn version_of_key(k: &[u8]) -> u64 {
    let tail: [u8; 8] = k[k.len() - 8..]
        .try_into()
        .expect("version keys end in 8 bytes");
    u64::from_be_bytes(tail)
}

impl StoredSources {
    /// Script versions kept in `store`.
    pub fn scripts(store: Store) -> Self {
        Self {
            store,
            current: Collection::Scripts,
            versions: Collection::ScriptVersions,
            records: Records::Scripts,
            versions_kept: VERSIONS_KEPT,
        }
    }

    /// Message template versions kept in `store`.
    pub fn templates(store: Store) -> Self {
        Self {
            store,
            current: Collection::Templates,
            versions: Collection::TemplateVersions,
            records: Records::Templates,
            versions_kept: VERSIONS_KEPT,
        }
    }

    /// The same, keeping `n` versions of one source.
    #[cfg(test)]
    fn keeping(mut self, n: u64) -> Self {
        self.versions_kept = n;
        self
    }

    /// Removes the versions of `account`'s `name` older than the last
    /// [`StoredSources::versions_kept`] up to `newest`: one per version
    /// stored once the history is within its bound, at most
    /// [`PRUNED_AT_ONCE`] of a longer one at a time.
    fn prune(&self, account: &AccountKey, name: &str, newest: u64) -> Result<(), RecordError> {
        let Some(cut) = newest.checked_sub(self.versions_kept) else {
            return Ok(());
        };
        let before = version_key(account, name, cut + 1);
        self.store
            .remove_prefix_before(
                self.versions,
                &prefix(account, name),
                &before,
                |_| false,
                PRUNED_AT_ONCE,
            )
            .about(self.records, account)?;
        Ok(())
    }

    fn decode(
        &self,
        account: &AccountKey,
        name: &str,
        bytes: &[u8],
    ) -> Result<SourceVersion, RecordError> {
        serde_json::from_slice(bytes).map_err(|source| RecordError::Unreadable {
            records: self.records,
            account: account.clone(),
            id: name.to_string(),
            source,
        })
    }
}

impl SourceRecords for StoredSources {
    fn last_version(&self, account: &AccountKey, name: &str) -> Result<Option<u64>, RecordError> {
        let last = self
            .store
            .scan_prefix_rev(self.versions, &prefix(account, name), 1)
            .about(self.records, account)?;
        Ok(last.first().map(|(k, _)| version_of_key(k)))
    }

    fn create(&self, version: &SourceVersion) -> Result<bool, RecordError> {
        let (account, name) = (&version.account_key, version.name.as_str());
        let bytes = serde_json::to_vec(version).expect("a script version serialises");
        // The version's key must be new: the backend checks it at the write,
        // against every other replica's writes.
        let written = self
            .store
            .write_atomically_creating(
                &[
                    Write {
                        collection: self.current,
                        key: current_key(account, name),
                        value: Some(bytes.clone()),
                    },
                    Write {
                        collection: self.versions,
                        key: version_key(account, name, version.version),
                        value: Some(bytes),
                    },
                ],
                1,
            )
            .about(self.records, account)?;
        if written {
            self.store.flush_blocking().about(self.records, account)?;
            // The version is stored: old ones that do not go now go at the
            // next.
            if let Err(e) = self.prune(account, name, version.version) {
                tracing::warn!(%account, name, error = %e, "removing old versions failed");
            }
        }
        Ok(written)
    }

    fn current(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<SourceVersion>, RecordError> {
        self.store
            .get(self.current, &current_key(account, name))
            .about(self.records, account)?
            .map(|v| self.decode(account, name, &v))
            .transpose()
    }

    fn list(&self, account: &AccountKey) -> Result<Vec<SourceVersion>, RecordError> {
        self.store
            .scan_prefix(self.current, &key(&[account.as_str().as_bytes(), b""]))
            .about(self.records, account)?
            .into_iter()
            .map(|(_, v)| self.decode(account, "", &v))
            .collect()
    }

    fn history(&self, account: &AccountKey, name: &str) -> Result<Vec<SourceVersion>, RecordError> {
        self.store
            .scan_prefix(self.versions, &prefix(account, name))
            .about(self.records, account)?
            .into_iter()
            .map(|(_, v)| self.decode(account, name, &v))
            .collect()
    }

    fn version(
        &self,
        account: &AccountKey,
        name: &str,
        version: u64,
    ) -> Result<Option<SourceVersion>, RecordError> {
        self.store
            .get(self.versions, &version_key(account, name, version))
            .about(self.records, account)?
            .map(|v| self.decode(account, name, &v))
            .transpose()
    }

    fn remove(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<SourceVersion>, RecordError> {
        let Some(removed) = self
            .store
            .remove(self.current, &current_key(account, name))
            .about(self.records, account)?
        else {
            return Ok(None);
        };
        self.store.flush_blocking().about(self.records, account)?;
        self.decode(account, name, &removed).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use switchboard_handlers::{ScriptRuntime, ScriptStore};

    use super::*;

    #[test]
    fn versions_are_numbered_per_script_and_kept_after_a_remove() {
        let store = ScriptStore::scripts(
            Arc::new(StoredSources::scripts(Store::temporary().unwrap())),
            Arc::new(ScriptRuntime::default()),
        );
        let acme = AccountKey::new("acme").unwrap();
        let put = |name, v: u64| {
            let source = format!("fn handle(e, s, c) {{ #{{ v: {v} }} }}");
            store.put(&acme, name, &source).unwrap().version
        };
        assert_eq!(
            [put("award", 1), put("award", 2), put("greet", 1)],
            [1, 2, 1]
        );
        assert_eq!(store.current(&acme, "award").unwrap().unwrap().version, 2);
        assert_eq!(store.compiled(&acme, "award").unwrap().unwrap().version, 2);
        let names: Vec<String> = store
            .list(&acme)
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["award", "greet"]);
        assert!(
            store
                .list(&AccountKey::new("globex").unwrap())
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .version(&acme, "award", 1)
                .unwrap()
                .source
                .contains("v: 1")
        );

        assert_eq!(store.remove(&acme, "award").unwrap().version, 2);
        assert!(store.current(&acme, "award").unwrap().is_none());
        assert!(store.compiled(&acme, "award").unwrap().is_none());
        assert_eq!(put("award", 3), 3, "numbering continues after a remove");
        let history: Vec<u64> = store
            .history(&acme, "award")
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(history, [1, 2, 3]);
    }

    /// The last versions of a source are kept; older ones go as new ones
    /// are stored (another source's are its own), and numbering goes on.
    #[test]
    fn only_the_last_versions_of_a_source_are_kept() {
        let store = ScriptStore::scripts(
            Arc::new(StoredSources::scripts(Store::temporary().unwrap()).keeping(3)),
            Arc::new(ScriptRuntime::default()),
        );
        let acme = AccountKey::new("acme").unwrap();
        let put = |name, v: u64| {
            let source = format!("fn handle(e, s, c) {{ #{{ v: {v} }} }}");
            store.put(&acme, name, &source).unwrap().version
        };
        let history = |name| -> Vec<u64> {
            store
                .history(&acme, name)
                .unwrap()
                .iter()
                .map(|v| v.version)
                .collect()
        };
        put("greet", 1);
        for v in 1..=5 {
            assert_eq!(put("award", v), v);
        }
        assert_eq!(history("award"), [3, 4, 5]);
        assert_eq!(history("greet"), [1]);
        assert!(store.version(&acme, "award", 2).is_err());
        store.remove(&acme, "award").unwrap();
        assert_eq!(
            put("award", 6),
            6,
            "numbering goes on past the versions gone"
        );
        assert_eq!(history("award"), [4, 5, 6]);
    }
}
