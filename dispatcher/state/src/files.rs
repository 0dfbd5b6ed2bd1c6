//! Files in the store (the embedded bus's backend): each file's
//! description under `Files` and its bytes under `FileData`, both keyed
//! `{account}\0{name}` and written together.

use switchboard_handlers::records::{FileInfo, Files, RecordError, Records};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, Write, key};

use super::{About, decode};

fn file_key(account: &AccountKey, name: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), name.as_bytes()])
}

/// Files kept in the store.
#[derive(Debug, Clone)]
pub struct StoredFiles {
    store: Store,
}

impl StoredFiles {
    /// Files kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Files for StoredFiles {
    async fn put(
        &self,
        account: &AccountKey,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<FileInfo, RecordError> {
        let info = FileInfo::of(account, name, content_type, &bytes);
        let k = file_key(account, name);
        self.store
            .write_atomically(&[
                Write {
                    collection: Collection::FileData,
                    key: k.clone(),
                    value: Some(bytes),
                },
                Write {
                    collection: Collection::Files,
                    key: k,
                    value: Some(serde_json::to_vec(&info).expect("a file's info serialises")),
                },
            ])
            .about(Records::Files, account)?;
        self.store.flush().await.about(Records::Files, account)?;
        Ok(info)
    }

    async fn get(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<(FileInfo, Vec<u8>)>, RecordError> {
        let k = file_key(account, name);
        let Some(info) = self
            .store
            .get(Collection::Files, &k)
            .about(Records::Files, account)?
            .and_then(|v| decode::<FileInfo>(&v))
        else {
            return Ok(None);
        };
        Ok(self
            .store
            .get(Collection::FileData, &k)
            .about(Records::Files, account)?
            .map(|bytes| (info, bytes)))
    }

    async fn list(&self, account: &AccountKey) -> Result<Vec<FileInfo>, RecordError> {
        super::list(
            &self.store,
            Collection::Files,
            Records::Files,
            account,
            usize::MAX,
        )
    }

    async fn remove(&self, account: &AccountKey, name: &str) -> Result<bool, RecordError> {
        let k = file_key(account, name);
        let existed = self
            .store
            .get(Collection::Files, &k)
            .about(Records::Files, account)?
            .is_some();
        self.store
            .write_atomically(&[
                Write {
                    collection: Collection::Files,
                    key: k.clone(),
                    value: None,
                },
                Write {
                    collection: Collection::FileData,
                    key: k,
                    value: None,
                },
            ])
            .about(Records::Files, account)?;
        self.store.flush().await.about(Records::Files, account)?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_are_kept_per_account() {
        let files = StoredFiles::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let other = AccountKey::new("other").unwrap();
        let info = files
            .put(&acme, "a.txt", "text/plain", b"hello".to_vec())
            .await
            .unwrap();
        assert_eq!(info.size, 5);
        let (got, bytes) = files.get(&acme, "a.txt").await.unwrap().unwrap();
        assert_eq!((got, bytes), (info.clone(), b"hello".to_vec()));
        assert_eq!(files.get(&other, "a.txt").await.unwrap(), None);
        assert_eq!(files.list(&acme).await.unwrap(), [info]);
        assert!(files.list(&other).await.unwrap().is_empty());
        assert!(files.remove(&acme, "a.txt").await.unwrap());
        assert!(!files.remove(&acme, "a.txt").await.unwrap());
        assert_eq!(files.get(&acme, "a.txt").await.unwrap(), None);
    }
}
