//! Files on NATS: the bytes of each account's files in a JetStream object
//! store (`SWITCHBOARD_FILES`, replicated like the events stream), as
//! objects named `{account}/{name}` whose metadata carries the file's
//! description. Object stores chunk what they keep, so a file's size is
//! bounded by `[files] max_bytes`, not by the server's message size.

use std::collections::HashMap;

use async_nats::jetstream;
use async_nats::jetstream::object_store::{self, ObjectMetadata, ObjectStore};
use futures::StreamExt as _;
use switchboard_handlers::records::{FileInfo, Files, RecordError, Records};
use switchboard_sdk::AccountKey;
use tokio::io::AsyncReadExt as _;

/// The object store's bucket.
pub const BUCKET: &str = "SWITCHBOARD_FILES";

/// The metadata key holding a file's description (JSON).
const INFO: &str = "switchboard-file";

/// Files in a JetStream object store.
#[derive(Clone)]
pub struct NatsFiles {
    store: ObjectStore,
}

impl std::fmt::Debug for NatsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsFiles")
            .field("bucket", &BUCKET)
            .finish()
    }
}

impl NatsFiles {
    /// The files bucket on `client`'s server, made if it is not there, with
    /// `replicas` copies.
    pub async fn open(client: async_nats::Client, replicas: usize) -> Result<Self, String> {
        let js = jetstream::new(client);
        let store = match js.get_object_store(BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: BUCKET.to_string(),
                    description: Some("files accounts attach to their e-mails".into()),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("creating the object store {BUCKET}: {e}"))?,
        };
        Ok(Self { store })
    }
}

fn object_name(account: &AccountKey, name: &str) -> String {
    format!("{account}/{name}")
}

fn failed(account: &AccountKey, e: impl std::fmt::Display) -> RecordError {
    RecordError::storage(
        Records::Files,
        account,
        std::io::Error::other(format!("object store {BUCKET}: {e}")),
    )
}

fn info_of(meta: &HashMap<String, String>) -> Option<FileInfo> {
    serde_json::from_str(meta.get(INFO)?).ok()
}

#[async_trait::async_trait]
impl Files for NatsFiles {
    async fn put(
        &self,
        account: &AccountKey,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<FileInfo, RecordError> {
        let info = FileInfo::of(account, name, content_type, &bytes);
        let meta = ObjectMetadata {
            name: object_name(account, name),
            metadata: HashMap::from([(
                INFO.to_string(),
                serde_json::to_string(&info).expect("a file's info serialises"),
            )]),
            ..Default::default()
        };
        self.store
            .put(meta, &mut bytes.as_slice())
            .await
            .map_err(|e| failed(account, e))?;
        Ok(info)
    }

    async fn get(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<(FileInfo, Vec<u8>)>, RecordError> {
        let mut object = match self.store.get(object_name(account, name)).await {
            Ok(object) => object,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(failed(account, e)),
        };
        let Some(info) = info_of(&object.info().metadata) else {
            return Ok(None);
        };
        let mut bytes = Vec::with_capacity(info.size as usize);
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| failed(account, e))?;
        Ok(Some((info, bytes)))
    }

    async fn list(&self, account: &AccountKey) -> Result<Vec<FileInfo>, RecordError> {
        let prefix = format!("{account}/");
        let mut objects = self.store.list().await.map_err(|e| failed(account, e))?;
        let mut files = Vec::new();
        while let Some(object) = objects.next().await {
            let object = object.map_err(|e| failed(account, e))?;
            if object.name.starts_with(&prefix)
                && !object.deleted
                && let Some(info) = info_of(&object.metadata)
            {
                files.push(info);
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    async fn remove(&self, account: &AccountKey, name: &str) -> Result<bool, RecordError> {
        match self.store.delete(object_name(account, name)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(false),
            Err(e) => Err(failed(account, e)),
        }
    }
}
