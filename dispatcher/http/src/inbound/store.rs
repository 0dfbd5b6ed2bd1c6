//! What inbound webhooks keep: the URLs (by the hash of their secret) and
//! the records that matched nothing.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

use super::Provider;

/// One inbound webhook URL of an account. Its secret is not kept: only the
/// SHA-256 of it, as the key it is found by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hook {
    /// The account.
    pub account_key: AccountKey,
    /// The provider that posts to it.
    pub provider: Provider,
    /// When its secret was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `webhook`: the name of the account secret signatures are checked with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl Hook {
    /// The hook as the API answers it.
    pub fn answer(&self) -> switchboard_api::inbound::InboundHook {
        switchboard_api::inbound::InboundHook {
            account_key: self.account_key.clone(),
            provider: self.provider,
            created_at: self.created_at,
            secret: self.secret.clone(),
        }
    }
}

/// Inbound webhook URLs: `InboundHooks` maps the SHA-256 of a URL's secret to
/// its [`Hook`]; `InboundIndex` maps (account, provider) to that hash, for
/// listing, rotation and revocation.
#[derive(Debug, Clone)]
pub struct HookStore {
    store: Store,
}

/// A new URL secret: 32 bytes from the OS's random source, hex.
fn new_secret() -> String {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    // A v4 UUID has 122 random bits: 244 between the two.
    switchboard_handlers::records::hex(&bytes)
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn index_key(account: &AccountKey, provider: Provider) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), provider.name().as_bytes()])
}

impl HookStore {
    /// URLs kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The account's URL for `provider`, if it has one.
    pub fn get(
        &self,
        account: &AccountKey,
        provider: Provider,
    ) -> Result<Option<Hook>, StoreError> {
        let Some(h) = self
            .store
            .get(Collection::InboundIndex, &index_key(account, provider))?
        else {
            return Ok(None);
        };
        Ok(self
            .store
            .get(Collection::InboundHooks, &h)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Makes a new secret for (account, provider), replacing the old one if
    /// there is one (whose URL stops working at once). Returns the secret,
    /// which is not kept, and the hook.
    pub fn create(&self, hook: Hook) -> Result<(String, Hook), StoreError> {
        let secret = new_secret();
        let index = index_key(&hook.account_key, hook.provider);
        let mut writes = Vec::new();
        if let Some(old) = self.store.get(Collection::InboundIndex, &index)? {
            writes.push(Write {
                collection: Collection::InboundHooks,
                key: old,
                value: None,
            });
        }
        let h = hash(&secret);
        writes.push(Write {
            collection: Collection::InboundHooks,
            key: h.clone(),
            value: Some(serde_json::to_vec(&hook).expect("a hook serialises")),
        });
        writes.push(Write {
            collection: Collection::InboundIndex,
            key: index,
            value: Some(h),
        });
        self.store.write_atomically(&writes)?;
        Ok((secret, hook))
    }

    /// The hook whose secret is `secret`.
    pub fn find(&self, secret: &str) -> Result<Option<Hook>, StoreError> {
        Ok(self
            .store
            .get(Collection::InboundHooks, &hash(secret))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The account's hooks, by provider name.
    pub fn list(&self, account: &AccountKey) -> Result<Vec<Hook>, StoreError> {
        let mut hooks = Vec::new();
        for (_, h) in self.store.scan_prefix(
            Collection::InboundIndex,
            &key(&[account.as_str().as_bytes(), b""]),
        )? {
            if let Some(v) = self.store.get(Collection::InboundHooks, &h)?
                && let Ok(hook) = serde_json::from_slice(&v)
            {
                hooks.push(hook);
            }
        }
        Ok(hooks)
    }

    /// Removes the account's URL for `provider`; returns it if there was one.
    pub fn revoke(
        &self,
        account: &AccountKey,
        provider: Provider,
    ) -> Result<Option<Hook>, StoreError> {
        let index = index_key(account, provider);
        let Some(h) = self.store.get(Collection::InboundIndex, &index)? else {
            return Ok(None);
        };
        let hook = self
            .store
            .get(Collection::InboundHooks, &h)?
            .and_then(|v| serde_json::from_slice(&v).ok());
        self.store.write_atomically(&[
            Write {
                collection: Collection::InboundHooks,
                key: h,
                value: None,
            },
            Write {
                collection: Collection::InboundIndex,
                key: index,
                value: None,
            },
        ])?;
        Ok(hook)
    }
}

/// A record a provider posted that matched nothing, kept as it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unmatched {
    /// Its id (a UUID v7: ids sort by arrival).
    pub id: String,
    /// The account whose URL it was posted to.
    pub account_key: AccountKey,
    /// The provider.
    pub provider: Provider,
    /// `unknown_message`, `unknown_address`, `other_account`, `undocumented`
    /// or `malformed`.
    pub result: String,
    /// Why it matched nothing, in words.
    pub reason: String,
    /// The record: JSON as posted, or the text of a body that was not JSON.
    pub record: Value,
    /// When it arrived.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

impl Unmatched {
    /// The record as the API answers it.
    pub fn answer(&self) -> switchboard_api::inbound::UnmatchedRecord {
        switchboard_api::inbound::UnmatchedRecord {
            id: self.id.clone(),
            account_key: self.account_key.clone(),
            provider: self.provider,
            result: self.result.clone(),
            reason: self.reason.clone(),
            record: self.record.clone(),
            received_at: self.received_at,
        }
    }
}

/// Unmatched records, by account, in arrival order.
#[derive(Debug, Clone)]
pub struct UnmatchedStore {
    store: Store,
}

impl UnmatchedStore {
    /// Records kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Keeps one.
    pub fn put(&self, record: &Unmatched) -> Result<(), StoreError> {
        self.store.put(
            Collection::Unmatched,
            &key(&[record.account_key.as_str().as_bytes(), record.id.as_bytes()]),
            &serde_json::to_vec(record).expect("an unmatched record serialises"),
        )
    }

    /// Up to `limit` of the account's, newest first.
    pub fn list(&self, account: &AccountKey, limit: usize) -> Result<Vec<Unmatched>, StoreError> {
        Ok(self
            .store
            .scan_prefix_rev(
                Collection::Unmatched,
                &key(&[account.as_str().as_bytes(), b""]),
                limit,
            )?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }
}
