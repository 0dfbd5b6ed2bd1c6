//! Inboxes in the store: each notification under
//! `{account}\0{receiver}\0{created:BE u64 µs}\0{id}` (so a receiver's are
//! read newest first by a reverse scan), and its id under
//! `{account}\0{id}` pointing at that key (so a re-run step finds it).

use switchboard_handlers::records::{Inbox, InboxCount, Notification, RecordError, Records};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, Write, key};

use super::{About, decode};

fn receiver_prefix(account: &AccountKey, receiver: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), receiver.as_bytes(), b""])
}

fn notification_key(n: &Notification) -> Vec<u8> {
    // Microseconds: a chain's notifications to one person, a step apart,
    // stay in the order they were left.
    let us = (n.created_at.unix_timestamp_nanos() / 1_000).max(0) as u64;
    key(&[
        n.account_key.as_str().as_bytes(),
        n.receiver.as_bytes(),
        &us.to_be_bytes(),
        n.id.as_bytes(),
    ])
}

fn id_key(account: &AccountKey, id: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), id.as_bytes()])
}

/// Inboxes, by account and receiver.
#[derive(Debug)]
pub struct StoredInbox {
    store: Store,
}

impl StoredInbox {
    /// Inboxes kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl Inbox for StoredInbox {
    fn deliver(&self, notification: Notification) -> Result<Notification, RecordError> {
        let account = notification.account_key.clone();
        let by_id = id_key(&account, &notification.id);
        if let Some(at) = self
            .store
            .get(Collection::InboxIds, &by_id)
            .about(Records::Inbox, &account)?
            && let Some(existing) = self
                .store
                .get(Collection::Inbox, &at)
                .about(Records::Inbox, &account)?
                .and_then(|v| decode::<Notification>(&v))
        {
            return Ok(existing);
        }
        let at = notification_key(&notification);
        self.store
            .write_atomically(&[
                Write {
                    collection: Collection::Inbox,
                    key: at.clone(),
                    value: Some(
                        serde_json::to_vec(&notification).expect("a notification serialises"),
                    ),
                },
                Write {
                    collection: Collection::InboxIds,
                    key: by_id,
                    value: Some(at),
                },
            ])
            .about(Records::Inbox, &account)?;
        Ok(notification)
    }

    fn list(
        &self,
        account: &AccountKey,
        receiver: &str,
        limit: usize,
    ) -> Result<Vec<Notification>, RecordError> {
        Ok(self
            .store
            .scan_prefix_rev(
                Collection::Inbox,
                &receiver_prefix(account, receiver),
                limit,
            )
            .about(Records::Inbox, account)?
            .into_iter()
            .filter_map(|(_, v)| decode(&v))
            .collect())
    }

    fn count(&self, account: &AccountKey, receiver: &str) -> Result<InboxCount, RecordError> {
        let all = self
            .store
            .scan_prefix(Collection::Inbox, &receiver_prefix(account, receiver))
            .about(Records::Inbox, account)?;
        let mut count = InboxCount {
            unread: 0,
            total: 0,
        };
        for n in all.iter().filter_map(|(_, v)| decode::<Notification>(v)) {
            if n.archived_at.is_none() {
                count.total += 1;
                if n.read_at.is_none() {
                    count.unread += 1;
                }
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use switchboard_handlers::records::Content;

    use super::*;

    fn notification(account: &AccountKey, receiver: &str, id: &str, ms: i64) -> Notification {
        Notification {
            id: id.into(),
            account_key: account.clone(),
            receiver: receiver.into(),
            category: "basic".into(),
            sender: None,
            content: Content::Text { body: id.into() },
            event_id: "e".into(),
            created_at: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap(),
            read_at: None,
            archived_at: None,
        }
    }

    #[test]
    fn each_receiver_sees_its_own_newest_first_once() {
        let inbox = StoredInbox::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let other = AccountKey::new("other").unwrap();
        inbox
            .deliver(notification(&acme, "ann", "n-1", 1_000))
            .unwrap();
        inbox
            .deliver(notification(&acme, "ann", "n-2", 2_000))
            .unwrap();
        inbox
            .deliver(notification(&acme, "annie", "n-3", 3_000))
            .unwrap();
        inbox
            .deliver(notification(&other, "ann", "n-4", 4_000))
            .unwrap();
        // A re-run step delivers the same again: kept as it was.
        let again = inbox
            .deliver(notification(&acme, "ann", "n-1", 9_000))
            .unwrap();
        assert_eq!(again.created_at.unix_timestamp(), 1);
        let ids: Vec<String> = inbox
            .list(&acme, "ann", 10)
            .unwrap()
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(ids, ["n-2", "n-1"]);
        assert_eq!(inbox.list(&acme, "ann", 1).unwrap().len(), 1);
        assert_eq!(
            inbox.count(&acme, "ann").unwrap(),
            InboxCount {
                unread: 2,
                total: 2
            }
        );
        assert_eq!(
            inbox.count(&other, "annie").unwrap(),
            InboxCount {
                unread: 0,
                total: 0
            }
        );
    }
}
