//! The record ports of `switchboard-handlers` ([`switchboard_handlers::records`])
//! implemented over the store crate's [`Store`]: contacts, message records,
//! secrets, step idempotency keys, script and template versions, each in its own
//! collections, keyed by account first so that one account can never read
//! or overwrite another's. A record that is read and then written is so
//! under its account's lock (a static [`switchboard_store::KeyLocks`] per
//! kind of record, shared by every instance in the process): records of
//! different accounts never share a key, so other accounts do not wait.
//! These are what `switchboard_dispatcher::Dispatcher` hands the
//! handlers, the API and the inbound webhooks.

use std::sync::Arc;

use switchboard_handlers::records::{
    Contacts, IdempotencyKeys, Inbox, Messages, Preferences, RecordError, Records, Secrets,
    SourceRecords,
};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, StoreError, key};

mod contacts;
mod files;
mod idempotency;
pub mod inbox;
mod messages;
mod preferences;
mod secrets;
mod signing_keys;
mod sources;

pub use contacts::StoredContacts;
pub use files::StoredFiles;
pub use idempotency::StoredIdempotencyKeys;
pub use inbox::StoredInbox;
pub use messages::StoredMessages;
pub use preferences::StoredPreferences;
pub use secrets::StoredSecrets;
pub use signing_keys::{Purpose, SigningKeys, account_prefix as signing_keys_prefix};
pub use sources::StoredSources;

/// Every record port over one store, one instance each, shared by all
/// that use it.
#[derive(Debug, Clone)]
pub struct RecordPorts {
    /// Contacts.
    pub contacts: Arc<dyn Contacts>,
    /// Message records.
    pub messages: Arc<dyn Messages>,
    /// Preferences.
    pub preferences: Arc<dyn Preferences>,
    /// In-app notifications.
    pub inbox: Arc<dyn Inbox>,
    /// Account secrets.
    pub secrets: Arc<dyn Secrets>,
    /// Step idempotency keys.
    pub idempotency: Arc<dyn IdempotencyKeys>,
    /// Script versions.
    pub scripts: Arc<dyn SourceRecords>,
    /// Message template versions.
    pub templates: Arc<dyn SourceRecords>,
}

impl RecordPorts {
    /// The ports over `store`.
    pub fn over(store: &Store) -> Self {
        Self {
            contacts: Arc::new(StoredContacts::new(store.clone())),
            messages: Arc::new(StoredMessages::new(store.clone())),
            preferences: Arc::new(StoredPreferences::new(store.clone())),
            inbox: Arc::new(StoredInbox::new(store.clone())),
            secrets: Arc::new(StoredSecrets::new(store.clone())),
            idempotency: Arc::new(StoredIdempotencyKeys::new(store.clone())),
            scripts: Arc::new(StoredSources::scripts(store.clone())),
            templates: Arc::new(StoredSources::templates(store.clone())),
        }
    }

    /// The same, keeping each receiver's inbox in `store` within `cap` as
    /// notifications are placed (see [`StoredInbox::capped`]).
    #[must_use]
    pub fn inbox_capped(mut self, store: &Store, cap: usize) -> Self {
        self.inbox = Arc::new(StoredInbox::capped(store.clone(), cap));
        self
    }
}

/// Names the records and account a store failure was about.
trait About<T> {
    fn about(self, records: Records, account: &AccountKey) -> Result<T, RecordError>;
}

impl<T> About<T> for Result<T, StoreError> {
    fn about(self, records: Records, account: &AccountKey) -> Result<T, RecordError> {
        self.map_err(|e| RecordError::storage(records, account, e))
    }
}

/// A record as stored, or `None` when it does not parse.
fn decode<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

/// The first `limit` of `account`'s records in `collection` (keyed by
/// account first), in key order; those that do not parse are skipped.
fn list<T: for<'de> serde::Deserialize<'de>>(
    store: &Store,
    collection: Collection,
    records: Records,
    account: &AccountKey,
    limit: usize,
) -> Result<Vec<T>, RecordError> {
    let prefix = key(&[account.as_str().as_bytes(), b""]);
    Ok(store
        .scan_prefix_from(collection, &prefix, &prefix, limit)
        .about(records, account)?
        .into_iter()
        .filter_map(|(_, v)| decode(&v))
        .collect())
}
