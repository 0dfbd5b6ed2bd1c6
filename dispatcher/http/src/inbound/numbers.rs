//! The numbers and addresses each account owns, per transport or provider:
//! how a reply — sent to one of them — finds its account (the original
//! design's account-level tag routing). One address belongs to one account
//! at most.
//!
//! `Numbers` maps `{transport}\0{address}` to its [`Number`]; `NumberIndex`
//! maps `{account}\0{transport}\0{address}` to the same, for listing. Both
//! are account configuration, shared by every replica.

use serde::{Deserialize, Serialize};
use switchboard_handlers::records::contacts::{normalize_email, normalize_msisdn};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

/// An address an account owns on a transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Number {
    /// The account.
    pub account_key: AccountKey,
    /// The transport or provider it is reached through (`twilio`, a Vumi
    /// transport's name, `sendgrid`).
    pub transport: String,
    /// The address: an E.164 number, a short code, or an e-mail address.
    pub address: String,
    /// When it was added.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// Why an address could not be added.
#[derive(Debug, thiserror::Error)]
pub enum NumberError {
    /// Not a transport name or not an address.
    #[error("{0}")]
    Invalid(String),
    /// Another account owns it.
    #[error(
        "{address} on {transport} belongs to another account: an address belongs to one account at most (remove it there first)"
    )]
    Taken {
        /// The transport.
        transport: String,
        /// The address.
        address: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `address` as it is kept: an e-mail address lower-cased, a number in
/// E.164, a short code (digits, 3 to 8) as it is. A number of 9 to 15
/// digits without its `+` (as SMPP gateways write them) is international.
pub fn normalize_address(address: &str) -> Result<String, String> {
    let address = address.trim();
    if address.contains('@') {
        return normalize_email(address);
    }
    if address.bytes().all(|b| b.is_ascii_digit()) {
        match address.len() {
            3..=8 => return Ok(address.to_string()),
            9..=15 => return normalize_msisdn(&format!("+{address}")),
            _ => {}
        }
    }
    normalize_msisdn(address).map_err(|e| {
        format!("{e} (an address is an E.164 number, a short code of 3 to 8 digits, or an e-mail address)")
    })
}

/// A transport's name: `^[a-z0-9_-]{1,64}$`.
fn check_transport(transport: &str) -> Result<(), String> {
    if !transport.is_empty()
        && transport.len() <= 64
        && transport
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    {
        Ok(())
    } else {
        Err(format!(
            "{transport:?} is not a transport name: use 1 to 64 of a-z 0-9 _ -"
        ))
    }
}

/// The addresses accounts own.
#[derive(Debug, Clone)]
pub struct NumberStore {
    store: Store,
}

impl NumberStore {
    /// Addresses kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Adds `address` on `transport` to `account`; adding it again is no
    /// change. Refused when another account owns it.
    pub fn add(
        &self,
        account: &AccountKey,
        transport: &str,
        address: &str,
    ) -> Result<Number, NumberError> {
        check_transport(transport).map_err(NumberError::Invalid)?;
        let address = normalize_address(address).map_err(NumberError::Invalid)?;
        let at = key(&[transport.as_bytes(), address.as_bytes()]);
        if let Some(existing) = self.owner(transport, &address)? {
            if existing.account_key == *account {
                return Ok(existing);
            }
            return Err(NumberError::Taken {
                transport: transport.to_string(),
                address,
            });
        }
        let number = Number {
            account_key: account.clone(),
            transport: transport.to_string(),
            address: address.clone(),
            created_at: switchboard_sdk::now(),
        };
        let value = serde_json::to_vec(&number).expect("a number serialises");
        // Claimed first, so that two accounts adding it at once cannot both
        // own it; then listed.
        if !self
            .store
            .compare_and_swap(Collection::Numbers, &at, None, Some(&value))?
        {
            return match self.owner(transport, &address)? {
                Some(n) if n.account_key == *account => Ok(n),
                _ => Err(NumberError::Taken {
                    transport: transport.to_string(),
                    address,
                }),
            };
        }
        self.store.put(
            Collection::NumberIndex,
            &key(&[
                account.as_str().as_bytes(),
                transport.as_bytes(),
                address.as_bytes(),
            ]),
            &value,
        )?;
        Ok(number)
    }

    /// Who owns `address` on `transport`.
    pub fn owner(&self, transport: &str, address: &str) -> Result<Option<Number>, StoreError> {
        Ok(self
            .store
            .get(
                Collection::Numbers,
                &key(&[transport.as_bytes(), address.as_bytes()]),
            )?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The account's addresses, by transport and address.
    pub fn list(&self, account: &AccountKey) -> Result<Vec<Number>, StoreError> {
        Ok(self
            .store
            .scan_prefix(
                Collection::NumberIndex,
                &key(&[account.as_str().as_bytes(), b""]),
            )?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Removes `address` on `transport` from `account`; the number, if the
    /// account had it.
    pub fn remove(
        &self,
        account: &AccountKey,
        transport: &str,
        address: &str,
    ) -> Result<Option<Number>, StoreError> {
        let Ok(address) = normalize_address(address) else {
            return Ok(None);
        };
        match self.owner(transport, &address)? {
            Some(n) if n.account_key == *account => {
                self.store.write_atomically(&[
                    Write {
                        collection: Collection::Numbers,
                        key: key(&[transport.as_bytes(), address.as_bytes()]),
                        value: None,
                    },
                    Write {
                        collection: Collection::NumberIndex,
                        key: key(&[
                            account.as_str().as_bytes(),
                            transport.as_bytes(),
                            address.as_bytes(),
                        ]),
                        value: None,
                    },
                ])?;
                Ok(Some(n))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_belongs_to_one_account() {
        let store = Store::temporary().unwrap();
        let numbers = NumberStore::new(store);
        let acme = AccountKey::new("acme").unwrap();
        let other = AccountKey::new("other").unwrap();
        let added = numbers.add(&acme, "twilio", "+27 82 000 0001").unwrap();
        assert_eq!(added.address, "+27820000001");
        assert_eq!(numbers.add(&acme, "twilio", "+27820000001").unwrap(), added);
        assert!(matches!(
            numbers.add(&other, "twilio", "+27820000001"),
            Err(NumberError::Taken { .. })
        ));
        // Another transport is another address.
        numbers.add(&other, "smsc", "+27820000001").unwrap();
        numbers.add(&acme, "smsc", "1234").unwrap();
        // Without its `+`, as SMPP writes it: the same number.
        assert_eq!(normalize_address("27820000001"), Ok("+27820000001".into()));
        assert!(matches!(
            numbers.add(&acme, "Twilio", "+27820000002"),
            Err(NumberError::Invalid(_))
        ));
        assert!(matches!(
            numbers.add(&acme, "twilio", "not a number"),
            Err(NumberError::Invalid(_))
        ));
        let listed: Vec<(String, String)> = numbers
            .list(&acme)
            .unwrap()
            .into_iter()
            .map(|n| (n.transport, n.address))
            .collect();
        assert_eq!(
            listed,
            [
                ("smsc".to_string(), "1234".to_string()),
                ("twilio".to_string(), "+27820000001".to_string())
            ]
        );
        assert_eq!(
            numbers.remove(&other, "twilio", "+27820000001").unwrap(),
            None
        );
        assert!(
            numbers
                .remove(&acme, "twilio", "+27820000001")
                .unwrap()
                .is_some()
        );
        assert_eq!(numbers.owner("twilio", "+27820000001").unwrap(), None);
        numbers.add(&other, "twilio", "+27820000001").unwrap();
    }
}
