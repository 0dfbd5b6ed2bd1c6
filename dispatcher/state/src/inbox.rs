//! Inboxes in the store: each notification under
//! `{account}\0{receiver}\0{created:BE u64 µs}\0{id}` (so a receiver's are
//! read newest first by a reverse scan, and a [`Cursor`] is a key), and its
//! id under `{account}\0{id}` pointing at that key (so a re-run step, and a
//! receiver marking one read, find it). Read and archived state change by
//! compare-and-swap, so a receiver's two tabs marking at once both land.
//!
//! A receiver's inbox is kept within its cap ([`InboxPolicy::max_per_receiver`])
//! as notifications are placed, about an eighth over at most: a chain notifying
//! one receiver at a high rate does not pile notifications up until the
//! next sweep (which also removes old read ones), and what a count or a
//! listing reads of one inbox stays bounded.

use switchboard_handlers::records::inbox::InboxPolicy;
use switchboard_handlers::records::{
    Cursor, Inbox, InboxCount, InboxFilter, InboxPage, Mark, Notification, RecordError, Records,
};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, KeyLocks, Store, Write, key};

use super::{About, decode};

/// How many times a change is tried against other writers.
const MARK_TRIES: u32 = 8;

/// Notifications housekeeping reads at a time.
const SWEEP_PAGE: usize = 1_024;

/// The `{account}\0{receiver}\0` a notification's key begins with.
pub fn receiver_of_key(key: &[u8]) -> &[u8] {
    let mut nuls = key
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == 0)
        .map(|(i, _)| i);
    match (nuls.next(), nuls.next()) {
        (Some(_), Some(second)) => &key[..=second],
        _ => key,
    }
}

/// The start of every key of `receiver`'s notifications.
pub fn receiver_prefix(account: &AccountKey, receiver: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), receiver.as_bytes(), b""])
}

/// The place a notification's key holds
/// (`{account}\0{receiver}\0{micros: BE u64}\0{id}`).
pub fn cursor_of_key(key: &[u8]) -> Option<Cursor> {
    let rest = key.get(receiver_of_key(key).len()..)?;
    let micros = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let id = std::str::from_utf8(rest.get(9..)?).ok()?;
    Some(Cursor {
        micros,
        id: id.to_string(),
    })
}

fn cursor_key(account: &AccountKey, receiver: &str, cursor: &Cursor) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        receiver.as_bytes(),
        &cursor.micros.to_be_bytes(),
        cursor.id.as_bytes(),
    ])
}

fn notification_key(n: &Notification) -> Vec<u8> {
    cursor_key(&n.account_key, &n.receiver, &n.cursor())
}

fn id_key(account: &AccountKey, id: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), id.as_bytes()])
}

/// What a count reads of a stored notification (the rest of it, its
/// content above all, is skipped over, not decoded).
#[derive(serde::Deserialize)]
struct Marks {
    #[serde(default)]
    read_at: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    archived_at: Option<serde::de::IgnoredAny>,
}

/// Held while a notification is placed: an account's deliveries (made
/// only by the owner of the account's partition, so in one process) take
/// their places one at a time.
static PLACING: KeyLocks = KeyLocks::new();

/// How many receivers' placements since their inbox was last counted
/// are remembered; past it, those of receivers left one notification are
/// forgotten (all, if they are most), and their inboxes counted later, or
/// by the sweep.
const PLACED_REMEMBERED: usize = 65_536;

/// Inboxes, by account and receiver.
#[derive(Debug)]
pub struct StoredInbox {
    store: Store,
    /// The most a receiver keeps, enforced as notifications are placed
    /// (`None`: by the sweep only).
    cap: Option<usize>,
    /// How many notifications each receiver (by its key prefix) was left
    /// here since its inbox was last counted.
    placed: std::sync::Mutex<std::collections::HashMap<Vec<u8>, usize>>,
}

impl StoredInbox {
    /// Inboxes kept in `store`, within their cap by the sweep only.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cap: None,
            placed: std::sync::Mutex::default(),
        }
    }

    /// Inboxes kept in `store`, each kept within `cap` notifications
    /// (about an eighth over at most: the placements counted are this
    /// process's) as they are placed, the oldest going first, read or not.
    pub fn capped(store: Store, cap: usize) -> Self {
        Self {
            cap: Some(cap.max(1)),
            ..Self::new(store)
        }
    }

    /// Removes `account`'s notification stored under `at` as `value`, and
    /// its id (the key names it), if it is still as it was read; returns
    /// whether it did.
    fn remove_unchanged(
        &self,
        account: &AccountKey,
        at: &[u8],
        value: &[u8],
    ) -> Result<bool, switchboard_store::StoreError> {
        if !self
            .store
            .compare_and_swap(Collection::Inbox, at, Some(value), None)?
        {
            return Ok(false);
        }
        if let Some(cursor) = cursor_of_key(at) {
            let id = id_key(account, &cursor.id);
            self.store
                .compare_and_swap(Collection::InboxIds, &id, Some(at), None)?;
        }
        Ok(true)
    }

    /// After a notification was left for `receiver`: once an eighth of
    /// the cap were left since its inbox was last counted, counts it and
    /// removes the oldest past the cap (with their ids); a count or a
    /// removal that fails is tried again at the next placement. One
    /// changed since it was read is left for the sweep.
    fn keep_within_cap(&self, account: &AccountKey, receiver: &str) -> Result<(), RecordError> {
        let Some(cap) = self.cap else {
            return Ok(());
        };
        let prefix = receiver_prefix(account, receiver);
        {
            let mut placed = self.placed.lock().expect("placed lock");
            if placed.len() >= PLACED_REMEMBERED && !placed.contains_key(&prefix) {
                // Those left one notification go first (a broadcast's
                // receivers), so that a busy receiver keeps its count.
                placed.retain(|_, n| *n > 1);
                if placed.len() >= PLACED_REMEMBERED / 2 {
                    placed.clear();
                }
            }
            let n = placed.entry(prefix.clone()).or_default();
            *n += 1;
            if *n < (cap / 8).max(1) {
                return Ok(());
            }
        }
        let held = self
            .store
            .scan_prefix(Collection::Inbox, &prefix)
            .about(Records::Inbox, account)?;
        let over = held.len().saturating_sub(cap);
        for (k, v) in held.into_iter().take(over) {
            self.remove_unchanged(account, &k, &v)
                .about(Records::Inbox, account)?;
        }
        // Counted anew from here; after a failure, at the next placement.
        self.placed.lock().expect("placed lock").remove(&prefix);
        Ok(())
    }

    /// Makes `mark` to the notification under `at`, if it is `receiver`'s.
    fn mark_at(
        &self,
        account: &AccountKey,
        receiver: &str,
        at: &[u8],
        mark: Mark,
    ) -> Result<Option<(Notification, bool)>, RecordError> {
        for attempt in 0..MARK_TRIES {
            // After a lost compare-and-set, read past a replica's copy,
            // which may lag the partition's owner.
            let before = if attempt == 0 {
                self.store.get(Collection::Inbox, at)
            } else {
                self.store.get_latest(Collection::Inbox, at)
            }
            .about(Records::Inbox, account)?;
            let Some(mut n) = before.as_deref().and_then(decode::<Notification>) else {
                return Ok(None);
            };
            if n.receiver != receiver || n.account_key != *account {
                return Ok(None);
            }
            if !mark.apply(&mut n, switchboard_sdk::now()) {
                return Ok(Some((n, false)));
            }
            let after = serde_json::to_vec(&n).expect("a notification serialises");
            if self
                .store
                .compare_and_swap(Collection::Inbox, at, before.as_deref(), Some(&after))
                .about(Records::Inbox, account)?
            {
                return Ok(Some((n, true)));
            }
        }
        Err(RecordError::Contended {
            records: Records::Inbox,
            account: account.clone(),
            attempts: MARK_TRIES,
        })
    }
}

impl Inbox for StoredInbox {
    /// A new notification is placed after every one its receiver has, so
    /// the order of an inbox is the order notifications were left in: a
    /// stream that resumes after one misses none left later, even when
    /// two workers' clocks, or two replicas', disagree. Its `created_at`
    /// is moved on (by microseconds) when it must be.
    fn place(&self, mut notification: Notification) -> Result<(Notification, bool), RecordError> {
        let account = notification.account_key.clone();
        let _placing = PLACING.lock(account.as_str().as_bytes());
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
            return Ok((existing, false));
        }
        if let Some(newest) = self.newest(&account, &notification.receiver)?
            && notification.cursor().micros <= newest.micros
            && let Ok(after) = time::OffsetDateTime::from_unix_timestamp_nanos(
                (i128::from(newest.micros) + 1) * 1_000,
            )
        {
            notification.created_at = after;
        }
        let at = notification_key(&notification);
        // In order, the id first (a transaction would write the store's
        // log out per notification): a crash between leaves an id whose
        // notification is missing, which the step run again (with the same
        // id) finds so and places anew.
        self.store
            .write_in_order(&[
                Write {
                    collection: Collection::InboxIds,
                    key: by_id,
                    value: Some(at.clone()),
                },
                Write {
                    collection: Collection::Inbox,
                    key: at,
                    value: Some(
                        serde_json::to_vec(&notification).expect("a notification serialises"),
                    ),
                },
            ])
            .about(Records::Inbox, &account)?;
        // The notification is left: an inbox not trimmed now is at the
        // next count, or by the sweep.
        if let Err(e) = self.keep_within_cap(&account, &notification.receiver) {
            tracing::warn!(%account, receiver = notification.receiver, error = %e,
                "keeping an inbox within its cap failed");
        }
        Ok((notification, true))
    }

    fn newest(&self, account: &AccountKey, receiver: &str) -> Result<Option<Cursor>, RecordError> {
        Ok(self
            .store
            .scan_prefix_rev(Collection::Inbox, &receiver_prefix(account, receiver), 1)
            .about(Records::Inbox, account)?
            .first()
            .and_then(|(k, _)| cursor_of_key(k)))
    }

    fn page(
        &self,
        account: &AccountKey,
        receiver: &str,
        filter: &InboxFilter,
        before: Option<&Cursor>,
        limit: usize,
    ) -> Result<InboxPage, RecordError> {
        let prefix = receiver_prefix(account, receiver);
        let mut from = before.map(|c| cursor_key(account, receiver, c));
        let mut notifications = Vec::new();
        // Filtered out ones are read past, a batch at a time.
        let batch = limit.clamp(16, 512);
        while notifications.len() < limit {
            let entries = self
                .store
                .scan_prefix_before(Collection::Inbox, &prefix, from.as_deref(), batch)
                .about(Records::Inbox, account)?;
            let Some((last, _)) = entries.last() else {
                break;
            };
            let exhausted = entries.len() < batch;
            from = Some(last.clone());
            for (_, v) in entries {
                if notifications.len() == limit {
                    // The page ends before this one: `next` is the last shown.
                    break;
                }
                if let Some(n) = decode::<Notification>(&v)
                    && filter.admits(&n)
                {
                    notifications.push(n);
                }
            }
            if notifications.len() < limit && exhausted {
                return Ok(InboxPage {
                    notifications,
                    next: None,
                });
            }
        }
        let next = (notifications.len() == limit)
            .then(|| notifications.last().map(Notification::cursor))
            .flatten();
        Ok(InboxPage {
            notifications,
            next,
        })
    }

    fn after(
        &self,
        account: &AccountKey,
        receiver: &str,
        after: &Cursor,
        limit: usize,
    ) -> Result<Vec<Notification>, RecordError> {
        let prefix = receiver_prefix(account, receiver);
        let from = cursor_key(account, receiver, after);
        Ok(self
            .store
            .scan_prefix_from(Collection::Inbox, &prefix, &from, limit.saturating_add(1))
            .about(Records::Inbox, account)?
            .into_iter()
            .filter(|(k, _)| *k != from)
            .take(limit)
            .filter_map(|(_, v)| decode(&v))
            .collect())
    }

    /// Reads only whether each was read or archived: a stream counts its
    /// receiver's inbox again at every change.
    fn count(&self, account: &AccountKey, receiver: &str) -> Result<InboxCount, RecordError> {
        let mut count = InboxCount {
            unread: 0,
            total: 0,
        };
        for (_, v) in self
            .store
            .scan_prefix(Collection::Inbox, &receiver_prefix(account, receiver))
            .about(Records::Inbox, account)?
        {
            let Ok(marks) = serde_json::from_slice::<Marks>(&v) else {
                continue;
            };
            if marks.archived_at.is_none() {
                count.total += 1;
                if marks.read_at.is_none() {
                    count.unread += 1;
                }
            }
        }
        Ok(count)
    }

    fn mark(
        &self,
        account: &AccountKey,
        receiver: &str,
        id: &str,
        mark: Mark,
    ) -> Result<Option<Notification>, RecordError> {
        let Some(at) = self
            .store
            .get_latest(Collection::InboxIds, &id_key(account, id))
            .about(Records::Inbox, account)?
        else {
            return Ok(None);
        };
        Ok(self.mark_at(account, receiver, &at, mark)?.map(|(n, _)| n))
    }

    fn read_all(
        &self,
        account: &AccountKey,
        receiver: &str,
        category: Option<&str>,
    ) -> Result<u64, RecordError> {
        let filter = InboxFilter {
            unread: Some(true),
            category: category.map(str::to_string),
            archived: false,
        };
        let mut marked = 0;
        for (at, v) in self
            .store
            .scan_prefix(Collection::Inbox, &receiver_prefix(account, receiver))
            .about(Records::Inbox, account)?
        {
            if decode::<Notification>(&v).is_some_and(|n| filter.admits(&n))
                && let Some((_, true)) = self.mark_at(account, receiver, &at, Mark::Read)?
            {
                marked += 1;
            }
        }
        Ok(marked)
    }

    fn flush<'a>(
        &'a self,
        account: &'a AccountKey,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RecordError>> + Send + 'a>>
    {
        Box::pin(async move { self.store.flush().await.about(Records::Inbox, account) })
    }

    fn expire(
        &self,
        policy: &InboxPolicy,
        now: time::OffsetDateTime,
    ) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let mut removed = 0;
        // One receiver's notifications at a time, oldest first as stored.
        let mut group: Vec<u8> = Vec::new();
        let mut held: Vec<(Vec<u8>, Vec<u8>, Notification)> = Vec::new();
        let mut sweep = |held: &mut Vec<(Vec<u8>, Vec<u8>, Notification)>| {
            held.reverse();
            let newest_first: Vec<Notification> = held.iter().map(|(_, _, n)| n.clone()).collect();
            for i in policy.to_remove(&newest_first, now) {
                let (k, v, n) = &held[i];
                // Another replica's partition: its own sweep removes it.
                if !self.store.writes_locally(Collection::Inbox, k) {
                    continue;
                }
                // One changed since it was read is left for the next sweep.
                if self.remove_unchanged(&n.account_key, k, v)? {
                    removed += 1;
                }
            }
            held.clear();
            Ok::<_, switchboard_store::StoreError>(())
        };
        self.store
            .scan_pages(Collection::Inbox, SWEEP_PAGE, |page| {
                for (k, v) in page {
                    if receiver_of_key(&k) != group.as_slice() {
                        sweep(&mut held)?;
                        group = receiver_of_key(&k).to_vec();
                    }
                    if let Some(n) = decode::<Notification>(&v) {
                        held.push((k, v, n));
                    }
                }
                Ok::<_, switchboard_store::StoreError>(())
            })?;
        sweep(&mut held)?;
        Ok(removed)
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

    fn ids(notifications: &[Notification]) -> Vec<&str> {
        notifications.iter().map(|n| n.id.as_str()).collect()
    }

    #[test]
    fn pages_filters_marks_and_resumes() {
        let inbox = StoredInbox::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        for i in 1..=7 {
            let mut n = notification(&acme, "ann", &format!("n-{i}"), i * 1_000);
            if i % 2 == 0 {
                n.category = "tips".into();
            }
            inbox.deliver(n).unwrap();
        }
        // Someone else's, between ann's keys: never in ann's pages.
        inbox
            .deliver(notification(&acme, "ann2", "x-1", 3_500))
            .unwrap();
        let all = InboxFilter::default();

        // Keyset pages, newest first, end to end without gaps or repeats.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = inbox.page(&acme, "ann", &all, before.as_ref(), 3).unwrap();
            seen.extend(page.notifications.iter().map(|n| n.id.clone()));
            match page.next {
                Some(next) => before = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, ["n-7", "n-6", "n-5", "n-4", "n-3", "n-2", "n-1"]);

        // Marks: only the receiver's own, and counts follow.
        assert_eq!(inbox.mark(&acme, "ann2", "n-7", Mark::Read).unwrap(), None);
        assert_eq!(inbox.mark(&acme, "ann", "nope", Mark::Read).unwrap(), None);
        let read = inbox
            .mark(&acme, "ann", "n-7", Mark::Read)
            .unwrap()
            .unwrap();
        assert!(read.read_at.is_some());
        inbox
            .mark(&acme, "ann", "n-6", Mark::Archive)
            .unwrap()
            .unwrap();
        assert_eq!(
            inbox.count(&acme, "ann").unwrap(),
            InboxCount {
                unread: 5,
                total: 6
            }
        );
        let unread_tips = InboxFilter {
            unread: Some(true),
            category: Some("tips".into()),
            archived: false,
        };
        let page = inbox.page(&acme, "ann", &unread_tips, None, 10).unwrap();
        assert_eq!(ids(&page.notifications), ["n-4", "n-2"]);
        let archived = InboxFilter {
            archived: true,
            ..all.clone()
        };
        let page = inbox.page(&acme, "ann", &archived, None, 10).unwrap();
        assert_eq!(ids(&page.notifications), ["n-6"]);
        // A filtered page that fills up says where to go on.
        let page = inbox.page(&acme, "ann", &unread_tips, None, 1).unwrap();
        let page = inbox
            .page(&acme, "ann", &unread_tips, page.next.as_ref(), 1)
            .unwrap();
        assert_eq!(ids(&page.notifications), ["n-2"]);

        // Read all of a category, then all.
        assert_eq!(inbox.read_all(&acme, "ann", Some("tips")).unwrap(), 2);
        assert_eq!(inbox.count(&acme, "ann").unwrap().unread, 3);
        assert_eq!(inbox.read_all(&acme, "ann", None).unwrap(), 3);
        assert_eq!(inbox.read_all(&acme, "ann", None).unwrap(), 0);
        assert_eq!(
            inbox.count(&acme, "ann").unwrap(),
            InboxCount {
                unread: 0,
                total: 6
            }
        );
        assert_eq!(inbox.count(&acme, "ann2").unwrap().unread, 1);

        // What a stream that saw n-4 missed, oldest first.
        let n4 = inbox
            .page(&acme, "ann", &all, None, 10)
            .unwrap()
            .notifications[2]
            .clone();
        assert_eq!(n4.id, "n-4");
        let missed = inbox.after(&acme, "ann", &n4.cursor(), 10).unwrap();
        assert_eq!(ids(&missed), ["n-5", "n-6", "n-7"]);
        assert_eq!(
            ids(&inbox.after(&acme, "ann", &n4.cursor(), 1).unwrap()),
            ["n-5"]
        );
        let last = missed.last().unwrap().cursor();
        assert!(inbox.after(&acme, "ann", &last, 10).unwrap().is_empty());
    }

    /// Left later means placed later, whatever the clock said.
    #[test]
    fn a_notification_left_later_is_placed_after_the_newest() {
        let inbox = StoredInbox::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let first = inbox
            .deliver(notification(&acme, "ann", "n-1", 5_000))
            .unwrap();
        // A worker whose clock is behind.
        let second = inbox
            .deliver(notification(&acme, "ann", "n-2", 4_000))
            .unwrap();
        assert!(second.cursor() > first.cursor(), "{second:?}");
        assert_eq!(second.cursor().micros, first.cursor().micros + 1);
        let page = inbox
            .page(&acme, "ann", &InboxFilter::default(), None, 10)
            .unwrap();
        assert_eq!(ids(&page.notifications), ["n-2", "n-1"]);
        let missed = inbox.after(&acme, "ann", &first.cursor(), 10).unwrap();
        assert_eq!(ids(&missed), ["n-2"]);
        // Another receiver's inbox is its own.
        let bob = inbox
            .deliver(notification(&acme, "bob", "b-1", 1_000))
            .unwrap();
        assert_eq!(bob.cursor().micros, 1_000_000);
    }

    #[test]
    fn a_key_names_its_receiver_and_place() {
        let acme = AccountKey::new("acme").unwrap();
        let n = notification(&acme, "ann", "n-1", 5_000);
        let k = notification_key(&n);
        assert_eq!(receiver_of_key(&k), receiver_prefix(&acme, "ann"));
        assert_eq!(cursor_of_key(&k), Some(n.cursor()));
        assert_eq!(receiver_of_key(b"odd"), b"odd");
        assert_eq!(cursor_of_key(b"acme\0ann\0short"), None);
    }

    #[test]
    fn housekeeping_removes_past_the_cap_and_old_read_ones_with_their_ids() {
        let inbox = StoredInbox::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let now = time::OffsetDateTime::from_unix_timestamp(10).unwrap();
        for i in 1..=5 {
            inbox
                .deliver(notification(&acme, "ann", &format!("n-{i}"), i * 1_000))
                .unwrap();
        }
        inbox
            .deliver(notification(&acme, "bob", "b-1", 500))
            .unwrap();
        inbox
            .mark(&acme, "ann", "n-4", Mark::Read)
            .unwrap()
            .unwrap();
        inbox
            .mark(&acme, "bob", "b-1", Mark::Read)
            .unwrap()
            .unwrap();
        let policy = InboxPolicy {
            read_retention: std::time::Duration::from_secs(3600),
            max_per_receiver: 3,
            ..InboxPolicy::default()
        };
        // n-4 read but recent; n-1 and n-2 past the cap.
        assert_eq!(inbox.expire(&policy, now).unwrap(), 2);
        let all = InboxFilter::default();
        let left = inbox.page(&acme, "ann", &all, None, 10).unwrap();
        assert_eq!(ids(&left.notifications), ["n-5", "n-4", "n-3"]);
        // Their ids went too: marking one finds nothing.
        assert_eq!(inbox.mark(&acme, "ann", "n-1", Mark::Read).unwrap(), None);
        // Later: the read ones (made long before) go, the unread stay.
        let later = now + time::Duration::days(2);
        assert_eq!(inbox.expire(&policy, later).unwrap(), 2);
        let left = inbox.page(&acme, "ann", &all, None, 10).unwrap();
        assert_eq!(ids(&left.notifications), ["n-5", "n-3"]);
        assert!(
            inbox
                .page(&acme, "bob", &all, None, 10)
                .unwrap()
                .notifications
                .is_empty()
        );
        assert_eq!(inbox.expire(&policy, later).unwrap(), 0);
    }

    /// Placed one after another, a receiver's notifications stay within
    /// the cap and an eighth over, the oldest going first with their ids;
    /// another receiver's are its own.
    #[test]
    fn placing_keeps_an_inbox_within_its_cap() {
        let inbox = StoredInbox::capped(Store::temporary().unwrap(), 16);
        let acme = AccountKey::new("acme").unwrap();
        let all = InboxFilter::default();
        inbox
            .deliver(notification(&acme, "bob", "b-1", 500))
            .unwrap();
        for i in 1..=100 {
            inbox
                .deliver(notification(&acme, "ann", &format!("n-{i}"), i * 1_000))
                .unwrap();
            let held = inbox.count(&acme, "ann").unwrap().total;
            assert!(held <= 18, "{held} notifications after {i} placed");
        }
        let left = inbox.page(&acme, "ann", &all, None, 100).unwrap();
        let expected: Vec<String> = (85..=100).rev().map(|i| format!("n-{i}")).collect();
        assert_eq!(ids(&left.notifications), expected);
        // The ids of those gone went with them: marking one finds nothing.
        assert_eq!(inbox.mark(&acme, "ann", "n-1", Mark::Read).unwrap(), None);
        assert_eq!(inbox.count(&acme, "bob").unwrap().total, 1);
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
        let all = InboxFilter::default();
        let page = inbox.page(&acme, "ann", &all, None, 10).unwrap();
        assert_eq!(ids(&page.notifications), ["n-2", "n-1"]);
        assert_eq!(page.next, None);
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
