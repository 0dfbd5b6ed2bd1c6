//! Script versions in the store: every version under (account, name,
//! version as 8 big-endian bytes), and the current one under (account,
//! name). Written rarely, so each write is flushed before it returns.

use switchboard_handlers::records::{RecordError, Records, ScriptRecords, ScriptVersion};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, Write, key};

use super::About;

/// Script versions.
#[derive(Debug)]
pub struct StoredScripts {
    store: Store,
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

fn decode(account: &AccountKey, name: &str, bytes: &[u8]) -> Result<ScriptVersion, RecordError> {
    serde_json::from_slice(bytes).map_err(|source| RecordError::Unreadable {
        records: Records::Scripts,
        account: account.clone(),
        id: name.to_string(),
        source,
    })
}

impl StoredScripts {
    /// Script versions kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl ScriptRecords for StoredScripts {
    fn last_version(&self, account: &AccountKey, name: &str) -> Result<Option<u64>, RecordError> {
        let last = self
            .store
            .scan_prefix_rev(Collection::ScriptVersions, &prefix(account, name), 1)
            .about(Records::Scripts, account)?;
        Ok(last.first().map(|(k, _)| version_of_key(k)))
    }

    fn create(&self, version: &ScriptVersion) -> Result<bool, RecordError> {
        let (account, name) = (&version.account_key, version.name.as_str());
        let bytes = serde_json::to_vec(version).expect("a script version serialises");
        // The version's key must be new: the backend checks it at the write,
        // against every other replica's writes.
        let written = self
            .store
            .write_atomically_creating(
                &[
                    Write {
                        collection: Collection::Scripts,
                        key: current_key(account, name),
                        value: Some(bytes.clone()),
                    },
                    Write {
                        collection: Collection::ScriptVersions,
                        key: version_key(account, name, version.version),
                        value: Some(bytes),
                    },
                ],
                1,
            )
            .about(Records::Scripts, account)?;
        if written {
            self.store
                .flush_blocking()
                .about(Records::Scripts, account)?;
        }
        Ok(written)
    }

    fn current(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<ScriptVersion>, RecordError> {
        self.store
            .get(Collection::Scripts, &current_key(account, name))
            .about(Records::Scripts, account)?
            .map(|v| decode(account, name, &v))
            .transpose()
    }

    fn list(&self, account: &AccountKey) -> Result<Vec<ScriptVersion>, RecordError> {
        self.store
            .scan_prefix(
                Collection::Scripts,
                &key(&[account.as_str().as_bytes(), b""]),
            )
            .about(Records::Scripts, account)?
            .into_iter()
            .map(|(_, v)| decode(account, "", &v))
            .collect()
    }

    fn history(&self, account: &AccountKey, name: &str) -> Result<Vec<ScriptVersion>, RecordError> {
        self.store
            .scan_prefix(Collection::ScriptVersions, &prefix(account, name))
            .about(Records::Scripts, account)?
            .into_iter()
            .map(|(_, v)| decode(account, name, &v))
            .collect()
    }

    fn version(
        &self,
        account: &AccountKey,
        name: &str,
        version: u64,
    ) -> Result<Option<ScriptVersion>, RecordError> {
        self.store
            .get(
                Collection::ScriptVersions,
                &version_key(account, name, version),
            )
            .about(Records::Scripts, account)?
            .map(|v| decode(account, name, &v))
            .transpose()
    }

    fn remove(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<ScriptVersion>, RecordError> {
        let Some(removed) = self
            .store
            .remove(Collection::Scripts, &current_key(account, name))
            .about(Records::Scripts, account)?
        else {
            return Ok(None);
        };
        self.store
            .flush_blocking()
            .about(Records::Scripts, account)?;
        decode(account, name, &removed).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use switchboard_handlers::{ScriptRuntime, ScriptStore};

    use super::*;

    #[test]
    fn versions_are_numbered_per_script_and_kept_after_a_remove() {
        let store = ScriptStore::new(
            Arc::new(StoredScripts::new(Store::temporary().unwrap())),
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
}
