//! Preferences in the store: each address's under (account, channel,
//! address), changed by compare-and-swap so that an unsubscribe and a
//! resubscribe at once both land, in some order.

use switchboard_handlers::records::{
    AddressPreferences, Channel, Choice, Preferences, RecordError, Records, Topic,
};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, key};

use super::{About, decode};

fn preferences_key(account: &AccountKey, channel: Channel, address: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        channel.as_str().as_bytes(),
        address.as_bytes(),
    ])
}

/// Preferences, by account.
#[derive(Debug)]
pub struct StoredPreferences {
    store: Store,
}

impl StoredPreferences {
    /// Preferences kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl Preferences for StoredPreferences {
    fn get(
        &self,
        account: &AccountKey,
        channel: Channel,
        address: &str,
    ) -> Result<Option<AddressPreferences>, RecordError> {
        Ok(self
            .store
            .get(
                Collection::Preferences,
                &preferences_key(account, channel, address),
            )
            .about(Records::Preferences, account)?
            .and_then(|v| decode(&v)))
    }

    fn choose(
        &self,
        account: &AccountKey,
        (channel, address): (Channel, &str),
        topic: &Topic,
        choice: Choice,
    ) -> Result<AddressPreferences, RecordError> {
        let k = preferences_key(account, channel, address);
        for attempt in 0..CHOOSE_TRIES {
            // After a lost compare-and-set, read past a replica's copy,
            // which may lag the partition's owner.
            let before = if attempt == 0 {
                self.store.get(Collection::Preferences, &k)
            } else {
                self.store.get_latest(Collection::Preferences, &k)
            }
            .about(Records::Preferences, account)?;
            let mut preferences = before
                .as_deref()
                .and_then(decode::<AddressPreferences>)
                .unwrap_or_else(|| {
                    AddressPreferences::new(account.clone(), channel, address.to_string())
                });
            if !preferences.choose(topic, choice.clone()) {
                return Ok(preferences);
            }
            let after = serde_json::to_vec(&preferences).expect("preferences serialise");
            if self
                .store
                .compare_and_swap(Collection::Preferences, &k, before.as_deref(), Some(&after))
                .about(Records::Preferences, account)?
            {
                return Ok(preferences);
            }
        }
        Err(RecordError::Contended {
            records: Records::Preferences,
            account: account.clone(),
            attempts: CHOOSE_TRIES,
        })
    }
}

/// How many times a choice is read and written before giving up to
/// contention.
const CHOOSE_TRIES: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(subscribed: bool, cause: &str) -> Choice {
        Choice {
            subscribed,
            at: switchboard_sdk::now(),
            cause: cause.into(),
            source: None,
        }
    }

    #[test]
    fn preferences_are_per_account_channel_and_address() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let preferences = StoredPreferences::new(store);
        let acme = AccountKey::new("acme").unwrap();
        let other = AccountKey::new("other").unwrap();
        let ann = (Channel::Email, "ann@example.org");
        let opted_out = preferences
            .choose(&acme, ann, &Topic::All, choice(false, "one-click"))
            .unwrap();
        assert!(opted_out.suppression(None).unwrap().contains("one-click"));
        let read = preferences
            .get(&acme, Channel::Email, "ann@example.org")
            .unwrap();
        assert_eq!(read, Some(opted_out));
        assert_eq!(
            preferences
                .get(&other, Channel::Email, "ann@example.org")
                .unwrap(),
            None
        );
        assert_eq!(
            preferences
                .get(&acme, Channel::Sms, "ann@example.org")
                .unwrap(),
            None
        );
        let back = preferences
            .choose(&acme, ann, &Topic::All, choice(true, "resubscribed"))
            .unwrap();
        assert_eq!(back.suppression(None), None);
        let template = Topic::Template("welcome".into());
        let both = preferences
            .choose(&acme, ann, &template, choice(false, "group unsubscribe"))
            .unwrap();
        assert_eq!(both.topics.len(), 2);
        assert!(both.suppression(Some(("welcome", None))).is_some());
        assert!(both.suppression(Some(("receipt", None))).is_none());
    }
}
