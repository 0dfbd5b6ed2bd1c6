//! The records handlers keep per account — contacts, message records,
//! preferences, secrets, step idempotency keys and scripts — as ports.
//!
//! Each module holds one record: its domain types, the decisions about it as
//! plain functions over data (which delivery report moves a message, what an
//! upsert changes in a contact), and the trait through which handlers and
//! the API read and write it. The dispatcher implements the traits for each
//! backend it runs on; nothing in this crate knows how, or where, a record
//! is stored. Every operation is for one account, and an implementation
//! must only ever answer from that account's records.

use std::fmt;

use switchboard_sdk::AccountKey;

pub mod contacts;
pub mod files;
pub mod idempotency;
pub mod inbox;
pub mod messages;
pub mod preferences;
pub mod secrets;
pub mod sources;

#[cfg(test)]
pub(crate) mod test_util;

pub use contacts::{Contact, ContactUpsert, Contacts, Identifier, StepRef};
pub use files::{FileInfo, FilePolicy, FileRefused, Files};
pub use idempotency::IdempotencyKeys;
pub use inbox::{Content, Cursor, Inbox, InboxCount, InboxFilter, InboxPage, Mark, Notification};
pub use messages::{
    Channel, DeliveryReport, MessageRecord, MessageStatus, Messages, Reported, Transition,
};
pub use preferences::{AddressPreferences, Choice, Preferences, Topic};
pub use secrets::Secrets;
pub use sources::{PRUNED_AT_ONCE, SourceRecords, SourceVersion, VERSIONS_KEPT};

/// The SHA-256 of `bytes`, in hex: how records keep a hash (a file's, a
/// message's idempotency key, an inbound record without an id).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(bytes))
}

/// `bytes` in lower-case hex, two digits a byte. (On the event path, for
/// every `create_contact`'s step reference and every message's
/// idempotency key: one allocation, not one a byte.)
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(2 * bytes.len());
    for b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    hex
}

/// The 32 bytes (a SHA-256, a credential) that `hex` spells in 64 hex
/// digits, as [`hex`] writes them; `None` for anything else.
pub fn unhex32(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Which records a port keeps, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Records {
    /// [`Contacts`].
    Contacts,
    /// [`Messages`].
    Messages,
    /// [`Secrets`].
    Secrets,
    /// [`IdempotencyKeys`].
    IdempotencyKeys,
    /// Scripts' [`SourceRecords`].
    Scripts,
    /// Message templates' [`SourceRecords`].
    Templates,
    /// [`Preferences`].
    Preferences,
    /// [`Files`].
    Files,
    /// [`Inbox`].
    Inbox,
}

impl fmt::Display for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Records::Contacts => "contacts",
            Records::Messages => "message records",
            Records::Secrets => "secrets",
            Records::IdempotencyKeys => "idempotency keys",
            Records::Scripts => "scripts",
            Records::Templates => "message templates",
            Records::Preferences => "preferences",
            Records::Files => "files",
            Records::Inbox => "inbox",
        })
    }
}

/// Why a record port could not read or write.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The storage below failed; trying again later may succeed.
    #[error("{records} of account {account}: {source}")]
    Storage {
        /// The records involved.
        records: Records,
        /// The account.
        account: AccountKey,
        /// What the backend said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Other writers (replicas) changed the record every time it was read.
    #[error(
        "{records} of account {account}: other replicas changed the record {attempts} times in a \
         row"
    )]
    Contended {
        /// The records involved.
        records: Records,
        /// The account.
        account: AccountKey,
        /// How many times it was read.
        attempts: u32,
    },
    /// A stored record could not be read back.
    #[error("{records} of account {account}: stored record {id:?} is unreadable: {source}")]
    Unreadable {
        /// The records involved.
        records: Records,
        /// The account.
        account: AccountKey,
        /// The record's id (a script's name).
        id: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

impl RecordError {
    /// A failure of the backend under `account`'s `records`.
    pub fn storage(
        records: Records,
        account: &AccountKey,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        RecordError::Storage {
            records,
            account: account.clone(),
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Hex is two lower-case digits a byte, leading zeros kept; the hash
    /// of records is SHA-256's.
    #[test]
    fn hex_and_sha256_hex() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(super::hex(&[]), "");
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// 64 hex digits read back as the 32 bytes they spell; anything else
    /// is not read.
    #[test]
    fn unhex32_reads_what_hex_writes() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(super::unhex32(&super::hex(&bytes)), Some(bytes));
        assert_eq!(
            super::unhex32(&super::hex(&bytes).to_uppercase()),
            Some(bytes)
        );
        for bad in [
            "",
            "00",
            &"0".repeat(63),
            &"0".repeat(65),
            &"g".repeat(64),
            &"é".repeat(32),
        ] {
            assert_eq!(super::unhex32(bad), None, "{bad:?}");
        }
    }
}
