//! Typed keys: strings whose shape is checked once, when they are made.
//!
//! Every key that appears in a NATS subject (`account_key`, `conversation_type`,
//! `event_type`) excludes `.`, `*` and `>`, so a key can never change the shape of
//! a subject. `conversation_key` may contain `.` and `:` because it never appears
//! in one.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A key that did not have the required shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {rule}")]
pub struct KeyError {
    /// The field the key was meant for, e.g. `account_key`.
    pub field: &'static str,
    /// The rejected value (truncated to 80 characters).
    pub value: String,
    /// The rule it broke, in the words of the contract.
    pub rule: &'static str,
}

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:literal, $extra:literal, $rule:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The field name this key has in the event.
            pub const FIELD: &'static str = $field;
            /// The rule a valid key follows, as a regular expression.
            pub const RULE: &'static str = $rule;

            /// Checks `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, KeyError> {
                let value = value.into();
                if is_valid(&value, $max, $extra) {
                    Ok(Self(value))
                } else {
                    Err(KeyError {
                        field: $field,
                        value: value.chars().take(80).collect(),
                        rule: concat!("must match ", $rule),
                    })
                }
            }

            /// The key as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = KeyError;
            fn try_from(s: &str) -> Result<Self, KeyError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = KeyError;
            fn try_from(s: String) -> Result<Self, KeyError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

fn is_valid(value: &str, max: usize, extra: &str) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || extra.as_bytes().contains(&b)
        })
}

key_type!(
    /// The account an event belongs to: `^[A-Za-z0-9_-]{1,64}$`.
    AccountKey, "account_key", 64, "", "^[A-Za-z0-9_-]{1,64}$"
);
key_type!(
    /// The conversation an event comes from: `^[A-Za-z0-9_.:-]{1,128}$`.
    ConversationKey, "conversation_key", 128, ".:", "^[A-Za-z0-9_.:-]{1,128}$"
);
key_type!(
    /// The kind of conversation (`survey`, `sms`, ...): `^[A-Za-z0-9_-]{1,64}$`.
    ConversationType, "conversation_type", 64, "", "^[A-Za-z0-9_-]{1,64}$"
);
key_type!(
    /// What happened (`poll_complete`, ...): `^[A-Za-z0-9_-]{1,64}$`.
    EventType, "event_type", 64, "", "^[A-Za-z0-9_-]{1,64}$"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_their_rules() {
        assert!(AccountKey::new("acme_01-x").is_ok());
        assert!(AccountKey::new("").is_err());
        assert!(AccountKey::new("a".repeat(64)).is_ok());
        assert!(AccountKey::new("a".repeat(65)).is_err());
        assert!(AccountKey::new("acme.corp").is_err());
        assert!(AccountKey::new("ac*").is_err());
        assert!(EventType::new("poll>").is_err());
        assert!(ConversationKey::new("poll-2026:v1.2").is_ok());
        assert!(ConversationKey::new("a".repeat(129)).is_err());
        assert!(ConversationType::new("sürvey").is_err());
    }

    #[test]
    fn error_names_field_and_rule() {
        let err = AccountKey::new("a b").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid account_key "a b": must match ^[A-Za-z0-9_-]{1,64}$"#
        );
    }
}
