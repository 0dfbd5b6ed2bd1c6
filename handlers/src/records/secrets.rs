//! Account secrets (webhook signing keys and the like): written and used,
//! never read back through the API, never logged.

use switchboard_sdk::AccountKey;

use super::RecordError;

/// Secret names: `^[A-Za-z0-9_.-]{1,64}$`.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a secret name: use 1 to 64 of A-Z a-z 0-9 _ - ."
        ))
    }
}

/// Secrets of every account.
pub trait Secrets: Send + Sync + std::fmt::Debug {
    /// Sets (or replaces) a secret.
    fn set(&self, account: &AccountKey, name: &str, value: &str) -> Result<(), RecordError>;

    /// A secret's value, for a handler's use.
    fn get(&self, account: &AccountKey, name: &str) -> Result<Option<String>, RecordError>;

    /// The names of an account's secrets.
    fn names(&self, account: &AccountKey) -> Result<Vec<String>, RecordError>;

    /// Removes a secret; returns whether it existed.
    fn remove(&self, account: &AccountKey, name: &str) -> Result<bool, RecordError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, ok: bool) {
        assert_eq!(check_secret_name(name).is_ok(), ok, "{name:?}");
    }

    #[test]
    fn secret_names_are_short_and_plain() {
        check("gateway", true);
        check("Pay_Gate-2.v1", true);
        check(&"a".repeat(64), true);
        check(&"a".repeat(65), false);
        check("", false);
        check("pay gate", false);
        check("pay/gate", false);
        check("passé", false);
    }
}
