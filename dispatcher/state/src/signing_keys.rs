//! Accounts' signing keys: 32 random bytes per (account, purpose), made on
//! first use and shared by every replica (a key made by two replicas at
//! once is settled by compare-and-swap: both use the one that landed).

use switchboard_handlers::records::{RecordError, Records};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, key};

use super::About;

/// What a key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// One-click unsubscribe links.
    Unsubscribe,
    /// Receiver tokens of the in-app inbox.
    ReceiverTokens,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Purpose::Unsubscribe => "unsubscribe",
            Purpose::ReceiverTokens => "receiver_tokens",
        }
    }
}

/// The signing keys of accounts.
#[derive(Debug, Clone)]
pub struct SigningKeys {
    store: Store,
}

impl SigningKeys {
    /// Keys kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The account's key for `purpose`, if it has one (for checking a
    /// signature: what was never signed needs no key made).
    pub fn find(
        &self,
        account: &AccountKey,
        purpose: Purpose,
    ) -> Result<Option<[u8; 32]>, RecordError> {
        let k = key_of(account, purpose);
        Ok(self
            .store
            .get(Collection::SigningKeys, &k)
            .about(Records::Secrets, account)?
            .and_then(|existing| <[u8; 32]>::try_from(existing.as_slice()).ok()))
    }

    /// The account's key for `purpose`, made now if it has none (for
    /// signing).
    pub fn get(&self, account: &AccountKey, purpose: Purpose) -> Result<[u8; 32], RecordError> {
        let k = key_of(account, purpose);
        if let Some(existing) = self.find(account, purpose)? {
            return Ok(existing);
        }
        loop {
            let made = random_key();
            if self
                .store
                .compare_and_swap(Collection::SigningKeys, &k, None, Some(&made))
                .about(Records::Secrets, account)?
            {
                return Ok(made);
            }
            // Another replica made it first: its key, read where it was
            // made (this replica's copy may not have it yet).
            if let Some(existing) = self
                .store
                .get_latest(Collection::SigningKeys, &k)
                .about(Records::Secrets, account)?
                .and_then(|existing| <[u8; 32]>::try_from(existing.as_slice()).ok())
            {
                return Ok(existing);
            }
        }
    }
}

impl SigningKeys {
    /// Replaces the account's key for `purpose` with a new one: everything
    /// signed with the old one stops being valid. Durable when this returns.
    pub async fn rotate(
        &self,
        account: &AccountKey,
        purpose: Purpose,
    ) -> Result<[u8; 32], RecordError> {
        let k = key_of(account, purpose);
        let made = random_key();
        self.store
            .put(Collection::SigningKeys, &k, &made)
            .about(Records::Secrets, account)?;
        self.store.flush().await.about(Records::Secrets, account)?;
        Ok(made)
    }
}

/// Where the account's key for `purpose` is kept.
fn key_of(account: &AccountKey, purpose: Purpose) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), purpose.name().as_bytes()])
}

/// The start of every key of `account`'s signing keys (to watch them).
pub fn account_prefix(account: &AccountKey) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), b""])
}

fn random_key() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system gives random bytes");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keys = SigningKeys::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        assert_eq!(keys.find(&acme, Purpose::Unsubscribe).unwrap(), None);
        let first = keys.get(&acme, Purpose::Unsubscribe).unwrap();
        assert_eq!(keys.find(&acme, Purpose::Unsubscribe).unwrap(), Some(first));
        assert_eq!(
            SigningKeys::new(store)
                .get(&acme, Purpose::Unsubscribe)
                .unwrap(),
            first
        );
        let other = keys
            .get(&AccountKey::new("other").unwrap(), Purpose::Unsubscribe)
            .unwrap();
        assert_ne!(first, other);
        // Each purpose its own key.
        assert_ne!(keys.get(&acme, Purpose::ReceiverTokens).unwrap(), first);
    }

    #[tokio::test]
    async fn a_rotated_key_replaces_the_old_one() {
        let keys = SigningKeys::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let first = keys.get(&acme, Purpose::ReceiverTokens).unwrap();
        let rotated = keys.rotate(&acme, Purpose::ReceiverTokens).await.unwrap();
        assert_ne!(first, rotated);
        assert_eq!(
            keys.find(&acme, Purpose::ReceiverTokens).unwrap(),
            Some(rotated)
        );
    }
}
