//! Account secrets in the store, under (account, name), as written.

use switchboard_handlers::records::{RecordError, Records, Secrets};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, key};

use super::About;

/// Account secrets.
#[derive(Debug)]
pub struct StoredSecrets {
    store: Store,
}

fn secret_key(account: &AccountKey, name: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), name.as_bytes()])
}

impl StoredSecrets {
    /// Secrets kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl Secrets for StoredSecrets {
    fn set(&self, account: &AccountKey, name: &str, value: &str) -> Result<(), RecordError> {
        self.store
            .put(
                Collection::Secrets,
                &secret_key(account, name),
                value.as_bytes(),
            )
            .about(Records::Secrets, account)
    }

    fn get(&self, account: &AccountKey, name: &str) -> Result<Option<String>, RecordError> {
        Ok(self
            .store
            .get(Collection::Secrets, &secret_key(account, name))
            .about(Records::Secrets, account)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn names(&self, account: &AccountKey) -> Result<Vec<String>, RecordError> {
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        Ok(self
            .store
            .scan_prefix(Collection::Secrets, &prefix)
            .about(Records::Secrets, account)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect())
    }

    fn remove(&self, account: &AccountKey, name: &str) -> Result<bool, RecordError> {
        Ok(self
            .store
            .remove(Collection::Secrets, &secret_key(account, name))
            .about(Records::Secrets, account)?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_kept_per_account() {
        let secrets = StoredSecrets::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let other = AccountKey::new("acme2").unwrap();
        secrets.set(&acme, "gateway", "whsec_a").unwrap();
        secrets.set(&acme, "gateway", "whsec_b").unwrap();
        secrets.set(&acme, "mail", "m").unwrap();
        secrets.set(&other, "gateway", "whsec_c").unwrap();
        assert_eq!(
            secrets.get(&acme, "gateway").unwrap().as_deref(),
            Some("whsec_b")
        );
        assert_eq!(secrets.names(&acme).unwrap(), ["gateway", "mail"]);
        assert!(secrets.remove(&acme, "gateway").unwrap());
        assert!(!secrets.remove(&acme, "gateway").unwrap());
        assert_eq!(secrets.get(&acme, "gateway").unwrap(), None);
        assert_eq!(
            secrets.get(&other, "gateway").unwrap().as_deref(),
            Some("whsec_c")
        );
    }
}
