//! Step idempotency keys in the store: under (account, chain, step, SHA-256
//! of the rendered key), the claim on it ([`Claim`]: its time, the end of
//! its window and the event that made it).

use std::time::Duration;

use sha2::{Digest, Sha256};
use switchboard_handlers::records::idempotency::Claim;
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
    hashed_key(account, chain, step, &Sha256::digest(rendered.as_bytes()))
}

/// The store key of a key whose SHA-256 is `hash`.
fn hashed_key(account: &AccountKey, chain: &str, step: &str, hash: &[u8]) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        chain.as_bytes(),
        step.as_bytes(),
        hash,
    ])
}

impl StoredIdempotencyKeys {
    /// Keys kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Gives `claimant`'s claim on store key `k` back, if it holds it.
    fn release_at(
        &self,
        account: &AccountKey,
        k: &[u8],
        claimant: &str,
    ) -> Result<(), RecordError> {
        let current = self
            .store
            .get(Collection::Idempotency, k)
            .about(Records::IdempotencyKeys, account)?;
        let ours = current
            .as_deref()
            .and_then(Claim::decode)
            .is_some_and(|c| c.claimant.as_deref() == Some(claimant));
        if ours {
            // Another claim in between (none can be, while ours holds) is kept.
            self.store
                .compare_and_swap(Collection::Idempotency, k, current.as_deref(), None)
                .about(Records::IdempotencyKeys, account)?;
        }
        Ok(())
    }
}

/// How many times a claim is tried while other claims on the key change it.
const CLAIM_TRIES: usize = 8;

impl IdempotencyKeys for StoredIdempotencyKeys {
    fn claim(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
        window: Duration,
        claimant: &str,
    ) -> Result<bool, RecordError> {
        let k = idempotency_key(account, chain, step, rendered);
        for attempt in 0..CLAIM_TRIES {
            let now = switchboard_sdk::now().unix_timestamp();
            // After a lost compare-and-set, read past a replica's copy, which
            // may lag the partition's owner.
            let current = if attempt == 0 {
                self.store.get(Collection::Idempotency, &k)
            } else {
                self.store.get_latest(Collection::Idempotency, &k)
            }
            .about(Records::IdempotencyKeys, account)?;
            match current.as_deref().map(Claim::decode) {
                Some(Some(held)) if held.claimant.as_deref() == Some(claimant) => return Ok(true),
                Some(Some(held)) if !held.yields_to(claimant, now, window) => return Ok(false),
                // Absent, past its window, or unreadable: claimed anew.
                _ => {}
            }
            let claim = Claim::new(now, window, claimant).encode();
            if self
                .store
                .compare_and_swap(
                    Collection::Idempotency,
                    &k,
                    current.as_deref(),
                    Some(&claim),
                )
                .about(Records::IdempotencyKeys, account)?
            {
                return Ok(true);
            }
        }
        Err(RecordError::Contended {
            records: Records::IdempotencyKeys,
            account: account.clone(),
            attempts: CLAIM_TRIES as u32,
        })
    }

    fn release(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
        claimant: &str,
    ) -> Result<(), RecordError> {
        self.release_at(
            account,
            &idempotency_key(account, chain, step, rendered),
            claimant,
        )
    }

    fn release_hashed(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        hashed: &str,
        claimant: &str,
    ) -> Result<(), RecordError> {
        // A hash that is none was never a claim's.
        match switchboard_handlers::records::unhex32(hashed) {
            Some(hash) => {
                self.release_at(account, &hashed_key(account, chain, step, &hash), claimant)
            }
            None => Ok(()),
        }
    }

    fn expire(&self, now: i64) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let mut removed = 0;
        let mut first_error = None;
        for (k, v) in self.store.scan_prefix(Collection::Idempotency, &[])? {
            let expired = Claim::decode(&v).is_some_and(|c| c.expired(now));
            // Another replica's partition: its own sweep removes it.
            if !expired || !self.store.writes_locally(Collection::Idempotency, &k) {
                continue;
            }
            // A claim made since the scan is kept; a key that cannot be
            // removed now (its partition moving) is left for the next sweep.
            match self
                .store
                .compare_and_swap(Collection::Idempotency, &k, Some(&v), None)
            {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Removed ones are counted; an error is told only when nothing could
        // be removed (the next sweep tries the rest again).
        match first_error {
            Some(e) if removed == 0 => Err(e.into()),
            _ => Ok(removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3_600);

    #[test]
    fn a_claim_is_its_claimants_and_per_step() {
        let keys = StoredIdempotencyKeys::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        assert!(keys.claim(&acme, "c", "s", "k-1", HOUR, "event-a").unwrap());
        // Held: another event is skipped; the claimant runs again.
        assert!(!keys.claim(&acme, "c", "s", "k-1", HOUR, "event-b").unwrap());
        assert!(keys.claim(&acme, "c", "s", "k-1", HOUR, "event-a").unwrap());
        // Other keys, steps, chains and accounts are their own.
        assert!(keys.claim(&acme, "c", "s", "k-2", HOUR, "event-b").unwrap());
        assert!(keys.claim(&acme, "c", "t", "k-1", HOUR, "event-b").unwrap());
        assert!(keys.claim(&acme, "d", "s", "k-1", HOUR, "event-b").unwrap());
        let other = AccountKey::new("other").unwrap();
        assert!(
            keys.claim(&other, "c", "s", "k-1", HOUR, "event-b")
                .unwrap()
        );
        // Released by someone else: nothing; by its claimant: free.
        keys.release(&acme, "c", "s", "k-1", "event-b").unwrap();
        assert!(!keys.claim(&acme, "c", "s", "k-1", HOUR, "event-c").unwrap());
        keys.release(&acme, "c", "s", "k-1", "event-a").unwrap();
        assert!(keys.claim(&acme, "c", "s", "k-1", HOUR, "event-c").unwrap());
        // A claim whose window has ended yields to the next event.
        assert!(
            keys.claim(&acme, "c", "s", "k-3", Duration::ZERO, "event-a")
                .unwrap()
        );
        assert!(keys.claim(&acme, "c", "s", "k-3", HOUR, "event-b").unwrap());
    }

    #[test]
    fn keys_past_their_window_are_swept_and_others_kept() {
        let store = Store::temporary().unwrap();
        let keys = StoredIdempotencyKeys::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        assert!(
            keys.claim(&acme, "c", "s", "short", Duration::ZERO, "e")
                .unwrap()
        );
        assert!(keys.claim(&acme, "c", "s", "long", HOUR, "e").unwrap());
        // An earlier release's key (its time only) is left to its step's window.
        let legacy = idempotency_key(&acme, "c", "s", "legacy");
        store
            .put(Collection::Idempotency, &legacy, &0i64.to_be_bytes())
            .unwrap();
        let now = switchboard_sdk::now().unix_timestamp();
        assert_eq!(keys.expire(now).unwrap(), 1);
        assert_eq!(store.len(Collection::Idempotency), 2);
        assert!(!keys.claim(&acme, "c", "s", "long", HOUR, "f").unwrap());
        assert_eq!(keys.expire(now + 3_600).unwrap(), 1);
        assert_eq!(store.len(Collection::Idempotency), 1);
        // The earlier release's key still holds within its step's window.
        assert!(
            keys.claim(&acme, "c", "s", "legacy", Duration::from_secs(60), "f")
                .unwrap()
        );
    }

    /// Of many events claiming one key at once, one runs the step.
    #[test]
    fn of_concurrent_claims_one_wins() {
        let keys = std::sync::Arc::new(StoredIdempotencyKeys::new(Store::temporary().unwrap()));
        let acme = AccountKey::new("acme").unwrap();
        for round in 0..20 {
            let key = format!("k-{round}");
            let winners: usize = std::thread::scope(|s| {
                let claims: Vec<_> = (0..8)
                    .map(|i| {
                        let (keys, acme, key) = (&keys, &acme, &key);
                        s.spawn(move || {
                            keys.claim(acme, "c", "s", key, HOUR, &format!("event-{i}"))
                                .unwrap()
                        })
                    })
                    .collect();
                claims
                    .into_iter()
                    .map(|c| usize::from(c.join().unwrap()))
                    .sum()
            });
            assert_eq!(winners, 1, "round {round}");
        }
    }
}
