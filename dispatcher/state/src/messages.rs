//! Message records in the store: each under (account, id), and an index
//! entry per remote id, under (account, channel, remote id), that holds the
//! message's id, for providers' delivery reports.

use switchboard_handlers::records::{
    Channel, DeliveryReport, MessageRecord, MessageStatus, Messages, RecordError, Records, Reported,
};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, KeyLocks, Store, StoreError, key};
use time::OffsetDateTime;

use super::{About, decode};

fn remote_key(account: &AccountKey, channel: Channel, remote_id: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        channel.as_str().as_bytes(),
        remote_id.as_bytes(),
    ])
}

fn latest_key(
    account: &AccountKey,
    channel: Channel,
    recipient: &str,
    sender: Option<&str>,
) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        channel.as_str().as_bytes(),
        recipient.as_bytes(),
        sender.unwrap_or_default().as_bytes(),
    ])
}

fn message_key(account: &AccountKey, id: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), id.as_bytes()])
}

/// How many message records an expiry sweep reads at a time.
const EXPIRY_PAGE: usize = 1024;

/// Messages a listing reads at a time.
const LIST_PAGE: usize = 1024;

/// A record is read, then written: an account's writers go one at a time
/// in this process, whichever instance runs them.
static WRITERS: KeyLocks = KeyLocks::new();

/// Message records, by account.
#[derive(Debug)]
pub struct StoredMessages {
    store: Store,
}

impl StoredMessages {
    /// Message records kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Reads message `id`, lets `change` edit it and writes it back if
    /// `change` says so, with its remote-id index entry: the write only
    /// lands if the record did not change meanwhile (another writer, e.g. a
    /// send step on one replica and a delivery report on another at once),
    /// else it is read and changed again. With `known` (the record as the
    /// caller last saw it written), the first try takes it for what is
    /// stored instead of reading it.
    fn update(
        &self,
        account: &AccountKey,
        id: &str,
        mut known: Option<&MessageRecord>,
        mut change: impl FnMut(&mut MessageRecord) -> bool,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let k = message_key(account, id);
        loop {
            let (before, mut m) = match known.take() {
                Some(m) => (
                    serde_json::to_vec(m).expect("a message record serialises"),
                    m.clone(),
                ),
                None => {
                    let Some(before) = self.store.get(Collection::Messages, &k)? else {
                        return Ok(None);
                    };
                    let Some(m) = decode::<MessageRecord>(&before) else {
                        return Ok(None);
                    };
                    (before, m)
                }
            };
            if !change(&mut m) {
                return Ok(Some(m));
            }
            // The remote-id index entry first (it only ever points at this
            // message), then the record, if it did not change meanwhile.
            // No transaction: those write to disk at once.
            if let Some(remote) = &m.remote_id {
                self.store.put(
                    Collection::MessageRemoteIds,
                    &remote_key(account, m.channel, remote),
                    m.id.as_bytes(),
                )?;
            }
            let after = serde_json::to_vec(&m).expect("a message record serialises");
            if self.store.compare_and_swap(
                Collection::Messages,
                &k,
                Some(before.as_slice()),
                Some(after.as_slice()),
            )? {
                return Ok(Some(m));
            }
        }
    }

    /// The message `id` of `account`, if it parses.
    fn read(&self, account: &AccountKey, id: &str) -> Result<Option<MessageRecord>, StoreError> {
        Ok(self
            .store
            .get(Collection::Messages, &message_key(account, id))?
            .and_then(|v| decode(&v)))
    }

    /// [`Messages::transition`]; [`Messages::transition_known`] with
    /// `known`.
    fn move_to(
        &self,
        account: &AccountKey,
        id: &str,
        known: Option<&MessageRecord>,
        (to, cause, remote_id): (MessageStatus, &str, Option<String>),
    ) -> Result<Option<MessageRecord>, RecordError> {
        let _guard = WRITERS.lock(account.as_str().as_bytes());
        let seen = known.map(|k| k.transitions.len());
        let moved = self
            .update(account, id, known, |m| {
                let (remote_id, at) = (remote_id.as_deref(), switchboard_sdk::now());
                match seen {
                    Some(seen) => m.answer(seen, to, cause, remote_id, at),
                    None => m.move_to(to, cause, remote_id, at),
                }
                true
            })
            .about(Records::Messages, account)?;
        // The latest sent to its recipient from its sender, for replies.
        if let Some(m) = &moved
            && to == MessageStatus::Sent
        {
            self.store
                .put(
                    Collection::LatestSent,
                    &latest_key(account, m.channel, &m.recipient, m.sender.as_deref()),
                    m.id.as_bytes(),
                )
                .about(Records::Messages, account)?;
        }
        Ok(moved)
    }
}

impl Messages for StoredMessages {
    fn record(&self, mut message: MessageRecord) -> Result<MessageRecord, RecordError> {
        let account = message.account_key.clone();
        let _guard = WRITERS.lock(account.as_str().as_bytes());
        if let Some(existing) = self
            .read(&account, &message.id)
            .about(Records::Messages, &account)?
        {
            return Ok(existing);
        }
        message.start();
        self.store
            .put(
                Collection::Messages,
                &message_key(&account, &message.id),
                &serde_json::to_vec(&message).expect("a message record serialises"),
            )
            .about(Records::Messages, &account)?;
        Ok(message)
    }

    fn transition(
        &self,
        account: &AccountKey,
        id: &str,
        to: MessageStatus,
        cause: &str,
        remote_id: Option<String>,
    ) -> Result<Option<MessageRecord>, RecordError> {
        self.move_to(account, id, None, (to, cause, remote_id))
    }

    fn transition_known(
        &self,
        known: &MessageRecord,
        to: MessageStatus,
        cause: &str,
        remote_id: Option<String>,
    ) -> Result<Option<MessageRecord>, RecordError> {
        let (account, id) = (&known.account_key, known.id.as_str());
        self.move_to(account, id, Some(known), (to, cause, remote_id))
    }

    fn transition_from(
        &self,
        account: &AccountKey,
        id: &str,
        from: MessageStatus,
        to: MessageStatus,
        cause: &str,
    ) -> Result<Option<(MessageRecord, bool)>, RecordError> {
        let _guard = WRITERS.lock(account.as_str().as_bytes());
        let mut moved = false;
        let updated = self
            .update(account, id, None, |m| {
                moved = m.status == from;
                if moved {
                    m.move_to(to, cause, None, switchboard_sdk::now());
                }
                moved
            })
            .about(Records::Messages, account)?;
        Ok(updated.map(|m| (m, moved)))
    }

    fn report(
        &self,
        account: &AccountKey,
        id: &str,
        (to, cause): (MessageStatus, &str),
        report: DeliveryReport<'_>,
    ) -> Result<Option<(MessageRecord, Reported)>, RecordError> {
        let _guard = WRITERS.lock(account.as_str().as_bytes());
        let mut outcome = Reported::Applied { from: to };
        let updated = self
            .update(account, id, None, |m| {
                outcome = m.apply_report(to, cause, report, switchboard_sdk::now());
                outcome.applied()
            })
            .about(Records::Messages, account)?;
        Ok(updated.map(|m| (m, outcome)))
    }

    fn expire(
        &self,
        before: OffsetDateTime,
    ) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let mut removed = 0;
        let mut first_error = None;
        self.store
            .scan_pages(Collection::Messages, EXPIRY_PAGE, |page| {
                for (k, v) in &page {
                    let Some(m) = decode::<MessageRecord>(v) else {
                        continue;
                    };
                    let done = !matches!(
                        m.status,
                        MessageStatus::Scheduled | MessageStatus::Pending | MessageStatus::Sending
                    );
                    // Another replica's partition: its own sweep removes it.
                    if !done
                        || m.updated_at >= before
                        || !self.store.writes_locally(Collection::Messages, k)
                    {
                        continue;
                    }
                    // A message changed since the scan is kept; one that
                    // cannot be removed now is left for the next sweep.
                    let gone = self
                        .store
                        .compare_and_swap(Collection::Messages, k, Some(v), None)
                        .and_then(|gone| {
                            if !gone {
                                return Ok(false);
                            }
                            // Its index entries, while they still point at it.
                            let mut entries = vec![(
                                Collection::LatestSent,
                                latest_key(
                                    &m.account_key,
                                    m.channel,
                                    &m.recipient,
                                    m.sender.as_deref(),
                                ),
                            )];
                            if let Some(remote) = &m.remote_id {
                                entries.push((
                                    Collection::MessageRemoteIds,
                                    remote_key(&m.account_key, m.channel, remote),
                                ));
                            }
                            for (collection, at) in entries {
                                self.store.compare_and_swap(
                                    collection,
                                    &at,
                                    Some(m.id.as_bytes()),
                                    None,
                                )?;
                            }
                            Ok(true)
                        });
                    match gone {
                        Ok(true) => removed += 1,
                        Ok(false) => {}
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                Ok::<_, StoreError>(())
            })?;
        // Removed ones are counted; an error is told only when nothing could
        // be removed (the next sweep tries the rest again).
        match first_error {
            Some(e) if removed == 0 => Err(e.into()),
            _ => Ok(removed),
        }
    }

    fn find_by_remote_id(
        &self,
        account: &AccountKey,
        channel: Channel,
        remote_id: &str,
    ) -> Result<Option<MessageRecord>, RecordError> {
        if remote_id.is_empty() {
            return Ok(None);
        }
        let found = self
            .store
            .get(
                Collection::MessageRemoteIds,
                &remote_key(account, channel, remote_id),
            )
            .about(Records::Messages, account)?;
        match found {
            Some(id) => self.get(account, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    fn get(&self, account: &AccountKey, id: &str) -> Result<Option<MessageRecord>, RecordError> {
        self.read(account, id).about(Records::Messages, account)
    }

    fn latest_sent(
        &self,
        account: &AccountKey,
        channel: Channel,
        recipient: &str,
        sender: Option<&str>,
    ) -> Result<Option<MessageRecord>, RecordError> {
        let found = self
            .store
            .get(
                Collection::LatestSent,
                &latest_key(account, channel, recipient, sender),
            )
            .about(Records::Messages, account)?;
        match found {
            Some(id) => self.get(account, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    fn list(&self, account: &AccountKey, limit: usize) -> Result<Vec<MessageRecord>, RecordError> {
        // Message ids do not sort by time: every record's time is read
        // (only that field decoded), the newest `limit` kept, then read.
        #[derive(serde::Deserialize)]
        struct Made {
            #[serde(with = "time::serde::rfc3339")]
            created_at: OffsetDateTime,
        }
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        let mut newest = std::collections::BinaryHeap::new();
        let mut from = prefix.clone();
        loop {
            let page = self
                .store
                .scan_prefix_from(Collection::Messages, &prefix, &from, LIST_PAGE)
                .about(Records::Messages, account)?;
            let Some((last, _)) = page.last() else { break };
            from = last.clone();
            from.push(0);
            for (k, v) in &page {
                let Ok(made) = serde_json::from_slice::<Made>(v) else {
                    continue;
                };
                newest.push(std::cmp::Reverse((made.created_at, k.clone())));
                if newest.len() > limit {
                    newest.pop();
                }
            }
            if page.len() < LIST_PAGE {
                break;
            }
        }
        let mut found = Vec::with_capacity(newest.len());
        for std::cmp::Reverse((_, k)) in newest.into_sorted_vec() {
            if let Some(m) = self
                .store
                .get(Collection::Messages, &k)
                .about(Records::Messages, account)?
                .and_then(|v| decode::<MessageRecord>(&v))
            {
                found.push(m);
            }
        }
        Ok(found)
    }

    fn flush<'a>(
        &'a self,
        account: &'a AccountKey,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RecordError>> + Send + 'a>>
    {
        Box::pin(async move { self.store.flush().await.about(Records::Messages, account) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing is of the newest messages, newest first, whatever order
    /// their ids sort in (another account's are not among them).
    #[test]
    fn a_listing_is_of_the_newest_messages() {
        let store = Store::temporary().unwrap();
        let messages = StoredMessages::new(store);
        let (acme, other) = (
            AccountKey::new("acme").unwrap(),
            AccountKey::new("b").unwrap(),
        );
        let base = switchboard_sdk::now();
        for i in 0..300u32 {
            // Ids in an order unrelated to the messages' times.
            let id = format!("m-{:04}", (i * 7919) % 300);
            let mut m = sms(&acme, &id);
            m.created_at = base + time::Duration::seconds(i.into());
            messages.record(m).unwrap();
        }
        let mut late = sms(&other, "m-late");
        late.created_at = base + time::Duration::days(1);
        messages.record(late).unwrap();
        let listed = messages.list(&acme, 200).unwrap();
        assert_eq!(listed.len(), 200);
        let times: Vec<OffsetDateTime> = listed.iter().map(|m| m.created_at).collect();
        let expected: Vec<OffsetDateTime> = (100..300u32)
            .rev()
            .map(|i| base + time::Duration::seconds(i.into()))
            .collect();
        assert_eq!(times, expected);
        assert_eq!(listed[0].id, format!("m-{:04}", (299 * 7919) % 300));
        assert!(listed.iter().all(|m| m.account_key == acme));
        assert_eq!(messages.list(&acme, 0).unwrap(), []);
    }

    /// A pending SMS `id` of `account`, through `twilio`.
    fn sms(account: &AccountKey, id: &str) -> MessageRecord {
        let now = switchboard_sdk::now();
        MessageRecord {
            id: id.into(),
            account_key: account.clone(),
            channel: Channel::Sms,
            recipient: "+27820000001".into(),
            sender: None,
            body: "hi".into(),
            subject: None,
            provider: "twilio".into(),
            remote_id: None,
            status: MessageStatus::Pending,
            event_id: "e".into(),
            chain: "c".into(),
            step: "s".into(),
            created_at: now,
            updated_at: now,
            transitions: Vec::new(),
            html: None,
            template: None,
            scheduled_at: None,
            sent_at: None,
            idempotency_key: None,
            cut: None,
            attachments: Vec::new(),
        }
    }

    /// Of a scheduled message falling due and its cancellation, the first
    /// wins and the second changes nothing.
    #[test]
    fn a_scheduled_message_is_cancelled_or_sent_never_both() {
        let store = Store::temporary().unwrap();
        let messages = StoredMessages::new(store);
        let acme = AccountKey::new("acme").unwrap();
        let scheduled = |id: &str| MessageRecord {
            scheduled_at: Some(switchboard_sdk::now() + std::time::Duration::from_secs(60)),
            ..sms(&acme, id)
        };
        let first = messages.record(scheduled("m-1")).unwrap();
        assert_eq!(first.status, MessageStatus::Scheduled);
        assert!(first.transitions[0].cause.starts_with("scheduled for "));
        let moved = |id: &str, to: MessageStatus| {
            messages
                .transition_from(&acme, id, MessageStatus::Scheduled, to, "test")
                .unwrap()
                .map(|(m, moved)| (m.status, moved))
        };
        // Cancelled first: falling due finds it cancelled.
        assert_eq!(
            moved("m-1", MessageStatus::Cancelled),
            Some((MessageStatus::Cancelled, true))
        );
        assert_eq!(
            moved("m-1", MessageStatus::Pending),
            Some((MessageStatus::Cancelled, false))
        );
        // Due first: the cancel finds it on its way.
        messages.record(scheduled("m-2")).unwrap();
        assert_eq!(
            moved("m-2", MessageStatus::Pending),
            Some((MessageStatus::Pending, true))
        );
        assert_eq!(
            moved("m-2", MessageStatus::Cancelled),
            Some((MessageStatus::Pending, false))
        );
        assert_eq!(moved("m-3", MessageStatus::Cancelled), None);
    }

    /// A send step moves the record it wrote without reading it back; a
    /// delivery report that came in between is kept: the move finds the
    /// record changed and is made on the record as it is.
    #[test]
    fn a_move_from_the_record_as_written_keeps_what_came_in_between() {
        let store = Store::temporary().unwrap();
        let messages = StoredMessages::new(store);
        let acme = AccountKey::new("acme").unwrap();
        let path = |id: &str| -> Vec<(Option<MessageStatus>, MessageStatus)> {
            let m = messages.get(&acme, id).unwrap().unwrap();
            m.transitions.iter().map(|t| (t.from, t.to)).collect()
        };

        let written = messages.record(sms(&acme, "m-1")).unwrap();
        let sending = messages
            .transition_known(&written, MessageStatus::Sending, "handing over", None)
            .unwrap()
            .unwrap();
        let sent = messages
            .transition_known(
                &sending,
                MessageStatus::Sent,
                "accepted",
                Some("SM1".into()),
            )
            .unwrap()
            .unwrap();
        assert_eq!(messages.get(&acme, "m-1").unwrap(), Some(sent));
        assert_eq!(
            path("m-1"),
            [
                (None, MessageStatus::Pending),
                (Some(MessageStatus::Pending), MessageStatus::Sending),
                (Some(MessageStatus::Sending), MessageStatus::Sent),
            ]
        );
        let found = messages
            .find_by_remote_id(&acme, Channel::Sms, "SM1")
            .unwrap();
        assert_eq!(found.map(|m| m.id), Some("m-1".into()));

        // The provider's report comes before the step records the send.
        let written = messages.record(sms(&acme, "m-2")).unwrap();
        messages
            .report(
                &acme,
                "m-2",
                (MessageStatus::Delivered, "report"),
                DeliveryReport::new("t:1"),
            )
            .unwrap()
            .unwrap();
        let moved = messages
            .transition_known(
                &written,
                MessageStatus::Sent,
                "accepted",
                Some("SM2".into()),
            )
            .unwrap()
            .unwrap();
        // The report is kept; the answer is logged beside it.
        assert_eq!(moved.status, MessageStatus::Delivered, "{moved:#?}");
        assert!(moved.sent_at.is_some(), "{moved:#?}");
        assert_eq!(messages.get(&acme, "m-2").unwrap(), Some(moved));
        assert_eq!(
            path("m-2"),
            [
                (None, MessageStatus::Pending),
                (Some(MessageStatus::Pending), MessageStatus::Delivered),
                (Some(MessageStatus::Delivered), MessageStatus::Delivered),
            ]
        );
        let latest = messages
            .latest_sent(&acme, Channel::Sms, "+27820000001", None)
            .unwrap();
        assert_eq!(latest.map(|m| m.id), Some("m-2".into()));
        let found = messages
            .find_by_remote_id(&acme, Channel::Sms, "SM2")
            .unwrap();
        assert_eq!(found.map(|m| m.id), Some("m-2".into()));

        // A record that is gone stays gone.
        let stray = sms(&acme, "m-3");
        assert_eq!(
            messages
                .transition_known(&stray, MessageStatus::Sent, "accepted", None)
                .unwrap(),
            None
        );
    }

    #[test]
    fn delivery_reports_apply_once_and_in_order() {
        let store = Store::temporary().unwrap();
        let messages = StoredMessages::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        let record = sms(&acme, "m-1");
        messages.record(record.clone()).unwrap();
        messages
            .transition(
                &acme,
                "m-1",
                MessageStatus::Sent,
                "accepted",
                Some("SM1".into()),
            )
            .unwrap();
        // A re-run step records the same message again: it is kept as it is.
        assert_eq!(messages.record(record).unwrap().status, MessageStatus::Sent);
        // Found by the provider's id, on its channel and account only.
        let found = |channel, account: &AccountKey| {
            messages
                .find_by_remote_id(account, channel, "SM1")
                .unwrap()
                .map(|m| m.id)
        };
        assert_eq!(found(Channel::Sms, &acme), Some("m-1".into()));
        assert_eq!(found(Channel::Email, &acme), None);
        assert_eq!(
            found(Channel::Sms, &AccountKey::new("other").unwrap()),
            None
        );

        // A second instance over the same store (standing in for another
        // replica's) sees and keeps every change.
        let other_instance = StoredMessages::new(store);
        let report = |to, source: &str| {
            let payload = serde_json::json!({"event": "delivered", "id": source});
            other_instance
                .report(
                    &acme,
                    "m-1",
                    (to, &format!("report {source}")),
                    DeliveryReport {
                        payload: Some(&payload),
                        ..DeliveryReport::new(source)
                    },
                )
                .unwrap()
                .map(|(m, r)| (m.status, r))
        };
        assert_eq!(
            report(MessageStatus::Delivered, "t:1"),
            Some((
                MessageStatus::Delivered,
                Reported::Applied {
                    from: MessageStatus::Sent
                }
            ))
        );
        assert_eq!(
            report(MessageStatus::Delivered, "t:1"),
            Some((MessageStatus::Delivered, Reported::Duplicate))
        );
        assert_eq!(
            report(MessageStatus::Sent, "t:0"),
            Some((
                MessageStatus::Delivered,
                Reported::Stale {
                    current: MessageStatus::Delivered
                }
            ))
        );
        assert_eq!(
            other_instance
                .report(
                    &acme,
                    "m-2",
                    (MessageStatus::Sent, "x"),
                    DeliveryReport::new("t:2")
                )
                .unwrap(),
            None
        );
        let m = messages.get(&acme, "m-1").unwrap().unwrap();
        let path: Vec<(Option<MessageStatus>, MessageStatus, Option<&str>)> = m
            .transitions
            .iter()
            .map(|t| (t.from, t.to, t.source.as_deref()))
            .collect();
        assert_eq!(
            path,
            [
                (None, MessageStatus::Pending, None),
                (Some(MessageStatus::Pending), MessageStatus::Sent, None),
                (
                    Some(MessageStatus::Sent),
                    MessageStatus::Delivered,
                    Some("t:1")
                ),
            ]
        );
        // The report as the provider posted it, in the log; when it was
        // sent.
        assert_eq!(
            m.transitions[2].payload,
            Some(serde_json::json!({"event": "delivered", "id": "t:1"}))
        );
        assert_eq!(m.sent_at, Some(m.transitions[1].at));
    }

    /// Done messages last changed before the cut-off go, with their
    /// remote-id entries; newer ones, and ones still to go, stay.
    #[test]
    fn expired_messages_are_removed_with_their_remote_ids() {
        let store = Store::temporary().unwrap();
        let messages = StoredMessages::new(store);
        let acme = AccountKey::new("acme").unwrap();
        for id in ["old-sent", "old-pending", "new-sent"] {
            messages.record(sms(&acme, id)).unwrap();
        }
        for (id, remote) in [("old-sent", "SM1"), ("new-sent", "SM2")] {
            messages
                .transition(&acme, id, MessageStatus::Sent, "ok", Some(remote.into()))
                .unwrap();
        }
        let cutoff = switchboard_sdk::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        messages
            .transition(&acme, "new-sent", MessageStatus::Delivered, "later", None)
            .unwrap();
        assert_eq!(messages.expire(cutoff).unwrap(), 1);
        let left: Vec<String> = messages
            .list(&acme, 10)
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(left, ["new-sent", "old-pending"]);
        assert_eq!(
            messages
                .find_by_remote_id(&acme, Channel::Sms, "SM1")
                .unwrap(),
            None
        );
        assert!(
            messages
                .find_by_remote_id(&acme, Channel::Sms, "SM2")
                .unwrap()
                .is_some()
        );
        assert_eq!(messages.expire(cutoff).unwrap(), 0);
        // What a reply answers: the newer, kept one; the expired one's entry gone.
        let latest = |m: &StoredMessages| {
            m.latest_sent(&acme, Channel::Sms, "+27820000001", None)
                .unwrap()
                .map(|m| m.id)
        };
        assert_eq!(latest(&messages), Some("new-sent".into()));
        messages
            .transition(&acme, "new-sent", MessageStatus::Sent, "again", None)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(messages.expire(switchboard_sdk::now()).unwrap(), 1);
        assert_eq!(latest(&messages), None);
    }
}
