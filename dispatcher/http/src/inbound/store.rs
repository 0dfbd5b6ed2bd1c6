//! What inbound webhooks keep: the URLs (by the hash of their secret) and
//! the records that matched nothing.

use std::collections::HashMap;

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
    /// The record: JSON as posted, or the text of a body that was not JSON;
    /// of a larger one than [`RECORD_KEPT`], the first of its text.
    pub record: Value,
    /// A record cut to its first [`RECORD_KEPT`] bytes: the size of its
    /// whole text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_bytes: Option<u64>,
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
            record_bytes: self.record_bytes,
            received_at: self.received_at,
        }
    }
}

/// How much of a record an unmatched record keeps: of a larger one, the
/// first bytes of its text (a provider's post may be a megabyte or more,
/// and ten thousand of them an account's to keep).
pub const RECORD_KEPT: usize = 64 * 1024;

/// `record` as an unmatched record keeps it, and the size of its text (a
/// string's, or the JSON's, compact) if it was cut ([`RECORD_KEPT`]).
pub fn kept_record(record: Value) -> (Value, Option<u64>) {
    let text: std::borrow::Cow<'_, str> = match &record {
        Value::String(s) => s.into(),
        other => other.to_string().into(),
    };
    if text.len() <= RECORD_KEPT {
        return (record, None);
    }
    let mut end = RECORD_KEPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (
        Value::String(text[..end].to_string()),
        Some(text.len() as u64),
    )
}

/// The most unmatched records an account keeps: past it, its oldest go
/// at the next sweep ([`UnmatchedStore::expire`]).
pub const MAX_UNMATCHED_PER_ACCOUNT: usize = 10_000;

/// How many records a sweep reads at a time.
const SWEEP_PAGE: usize = 1_024;

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

    /// Removes the records that arrived before `before`, and each
    /// account's oldest past `most`, of those this replica writes (its
    /// partitions'): how many went. A record that no longer reads goes too.
    pub fn expire(&self, before: OffsetDateTime, most: usize) -> Result<usize, StoreError> {
        #[derive(Deserialize)]
        struct Arrival {
            #[serde(with = "time::serde::rfc3339")]
            received_at: OffsetDateTime,
        }
        let account_of = |k: &[u8]| k.split(|b| *b == 0).next().unwrap_or_default().to_vec();
        let mut held: HashMap<Vec<u8>, usize> = HashMap::new();
        self.store
            .scan_pages(Collection::Unmatched, SWEEP_PAGE, |page| {
                for (k, _) in &page {
                    *held.entry(account_of(k)).or_default() += 1;
                }
                Ok::<_, StoreError>(())
            })?;
        // Keys sort by account, then by arrival (UUID v7 ids): an
        // account's first `held - most` are the ones over its cap.
        let (mut account, mut position) = (Vec::new(), 0);
        let mut removed = 0;
        self.store
            .scan_pages(Collection::Unmatched, SWEEP_PAGE, |page| {
                let mut gone = Vec::new();
                for (k, v) in page {
                    let of = account_of(&k);
                    if of != account {
                        (account, position) = (of, 0);
                    }
                    position += 1;
                    if !self.store.writes_locally(Collection::Unmatched, &k) {
                        continue;
                    }
                    let over = position <= held.get(&account).map_or(0, |n| n.saturating_sub(most));
                    let old = serde_json::from_slice::<Arrival>(&v)
                        .map_or(true, |a| a.received_at < before);
                    if over || old {
                        gone.push(Write {
                            collection: Collection::Unmatched,
                            key: k,
                            value: None,
                        });
                    }
                }
                removed += gone.len();
                self.store.write_in_order(&gone)
            })?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(account: &AccountKey, received_at: OffsetDateTime) -> Unmatched {
        Unmatched {
            id: uuid::Uuid::now_v7().to_string(),
            account_key: account.clone(),
            provider: Provider::Sendgrid,
            result: "unknown_message".into(),
            reason: "no message of the account has this id".into(),
            record: serde_json::json!({ "event": "delivered" }),
            record_bytes: None,
            received_at,
        }
    }

    #[test]
    fn a_record_over_what_is_kept_is_cut_at_a_character() {
        let small = serde_json::json!({ "event": "delivered" });
        assert_eq!(kept_record(small.clone()), (small, None));
        // JSON: its text, cut; the size is the whole text's.
        let large = serde_json::json!({ "report": "é".repeat(RECORD_KEPT) });
        let whole = large.to_string().len() as u64;
        let (kept, bytes) = kept_record(large);
        assert_eq!(bytes, Some(whole));
        let text = kept.as_str().expect("text");
        assert!(text.starts_with(r#"{"report":"éé"#), "{}", &text[..20]);
        assert!(text.len() <= RECORD_KEPT && text.len() >= RECORD_KEPT - 1);
        // A body that was not JSON: its first bytes.
        let (kept, bytes) = kept_record(Value::String("x".repeat(RECORD_KEPT + 1)));
        assert_eq!(
            (kept.as_str().map(str::len), bytes),
            (Some(RECORD_KEPT), Some(RECORD_KEPT as u64 + 1))
        );
    }

    #[test]
    fn a_sweep_removes_old_records_and_each_accounts_oldest_past_its_cap() {
        let unmatched = UnmatchedStore::new(Store::temporary().unwrap());
        let (acme, zeta) = (
            AccountKey::new("acme").unwrap(),
            AccountKey::new("zeta").unwrap(),
        );
        let now = switchboard_sdk::now();
        let day = time::Duration::days(1);
        // acme: two records a month old, then five of today; zeta: three of
        // today.
        let mut kept = Vec::new();
        for n in 0..7 {
            let at = if n < 2 { now - 30 * day } else { now };
            let r = record(&acme, at);
            unmatched.put(&r).unwrap();
            kept.push(r.id);
        }
        for _ in 0..3 {
            unmatched.put(&record(&zeta, now)).unwrap();
        }
        // Nothing is old, and no account is over 10: nothing goes.
        assert_eq!(unmatched.expire(now - 60 * day, 10).unwrap(), 0);
        // A week's retention and a cap of 3: acme's two old ones go, then
        // the oldest two of its five new ones; zeta keeps its three.
        assert_eq!(unmatched.expire(now - 7 * day, 3).unwrap(), 4);
        let left: Vec<String> = unmatched
            .list(&acme, 10)
            .unwrap()
            .into_iter()
            .rev()
            .map(|r| r.id)
            .collect();
        // (Ids sort by their time; within a millisecond, as they sort.)
        let mut new = kept[2..].to_vec();
        new.sort();
        assert_eq!(left, new[2..].to_vec());
        assert_eq!(unmatched.list(&zeta, 10).unwrap().len(), 3);
    }
}
