//! Step idempotency keys in the store: under (account, chain, step, SHA-256
//! of the rendered key), the Unix time it was first recorded, in 8
//! big-endian bytes.

use std::time::Duration;

use sha2::{Digest, Sha256};
use switchboard_handlers::records::idempotency::within_window;
use switchboard_handlers::records::{IdempotencyKeys, RecordError, Records};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, key};

use super::About;

/// Step idempotency keys.
#[derive(Debug)]
pub struct StoredIdempotencyKeys {
    store: Store,
}

fn idempotency_key(account: &AccountKey, chain: &str, step: &str, rendered: &str) -> Vec<u8> {
    let hash = Sha256::digest(rendered.as_bytes());
    key(&[
        account.as_str().as_bytes(),
        chain.as_bytes(),
        step.as_bytes(),
        &hash,
    ])
}

impl StoredIdempotencyKeys {
    /// Keys kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl IdempotencyKeys for StoredIdempotencyKeys {
    fn seen(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
        window: Duration,
    ) -> Result<bool, RecordError> {
        let k = idempotency_key(account, chain, step, rendered);
        let Some(v) = self
            .store
            .get(Collection::Idempotency, &k)
            .about(Records::IdempotencyKeys, account)?
        else {
            return Ok(false);
        };
        let at = i64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8]));
        Ok(within_window(
            at,
            switchboard_sdk::now().unix_timestamp(),
            window,
        ))
    }

    fn record(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
    ) -> Result<(), RecordError> {
        let k = idempotency_key(account, chain, step, rendered);
        let now = switchboard_sdk::now().unix_timestamp();
        self.store
            .put(Collection::Idempotency, &k, &now.to_be_bytes())
            .about(Records::IdempotencyKeys, account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_key_is_seen_for_its_step_only() {
        let keys = StoredIdempotencyKeys::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let hour = Duration::from_secs(3_600);
        assert!(!keys.seen(&acme, "c", "s", "k-1", hour).unwrap());
        keys.record(&acme, "c", "s", "k-1").unwrap();
        assert!(keys.seen(&acme, "c", "s", "k-1", hour).unwrap());
        assert!(!keys.seen(&acme, "c", "s", "k-1", Duration::ZERO).unwrap());
        assert!(!keys.seen(&acme, "c", "s", "k-2", hour).unwrap());
        assert!(!keys.seen(&acme, "c", "t", "k-1", hour).unwrap());
        assert!(!keys.seen(&acme, "d", "s", "k-1", hour).unwrap());
        let other = AccountKey::new("other").unwrap();
        assert!(!keys.seen(&other, "c", "s", "k-1", hour).unwrap());
    }
}
