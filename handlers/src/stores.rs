//! The per-account records that built-in handlers keep: contacts, message
//! records, secrets and step idempotency keys. Each lives in its own
//! collection of the store, keyed by account first, so one account can never
//! read or overwrite another's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store, StoreError, Write, key};
use time::OffsetDateTime;

/// Normalises a phone number to E.164 (`+` and 8 to 15 digits); spaces,
/// dashes, dots and brackets are dropped and a leading `00` becomes `+`.
pub fn normalize_msisdn(raw: &str) -> Result<String, String> {
    let compact: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = compact
        .strip_prefix('+')
        .or_else(|| compact.strip_prefix("00"))
        .ok_or_else(|| {
            format!(
                "{raw:?} is not an E.164 number: write it with the country code, e.g. +27821234567"
            )
        })?;
    if !(8..=15).contains(&digits.len())
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err(format!(
            "{raw:?} is not an E.164 number: + then 8 to 15 digits, not starting with 0 (e.g. +27821234567)"
        ));
    }
    Ok(format!("+{digits}"))
}

/// Normalises an e-mail address: trimmed, lower-case, one `@`, a dot in the domain.
pub fn normalize_email(raw: &str) -> Result<String, String> {
    let e = raw.trim().to_lowercase();
    let valid = match e.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !e.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';')
                })
        }
        None => false,
    };
    if valid {
        Ok(e)
    } else {
        Err(format!("{raw:?} is not an e-mail address"))
    }
}

/// A contact of an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    /// The contact's key (a UUID), unique in the account.
    pub key: String,
    /// The account.
    pub account_key: AccountKey,
    /// Phone number, E.164.
    pub msisdn: Option<String>,
    /// E-mail address, lower-case.
    pub email: Option<String>,
    /// Name.
    pub name: Option<String>,
    /// Preferred language.
    pub language: Option<String>,
    /// Any other fields.
    pub fields: Map<String, Value>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// What `create_contact` asks for: the identifiers (already normalised) and
/// the fields to set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContactUpsert {
    /// Phone number, E.164.
    pub msisdn: Option<String>,
    /// E-mail, lower-case.
    pub email: Option<String>,
    /// Name to set.
    pub name: Option<String>,
    /// Language to set.
    pub language: Option<String>,
    /// Fields to set (merged over the existing ones).
    pub fields: Map<String, Value>,
}

/// How many times an upsert reads again after other replicas changed what
/// it read, before it gives up (the step fails, and is retried).
const UPSERT_ATTEMPTS: u32 = 50;

/// Contacts, by account.
#[derive(Debug, Clone)]
pub struct ContactStore {
    store: Store,
    /// Upserts look up, then write: serialise them so two events for one
    /// number never create two contacts.
    writer: Arc<Mutex<()>>,
}

fn index_key(account: &AccountKey, kind: &str, value: &str) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        format!("{kind}:{value}").as_bytes(),
    ])
}

fn contact_key(account: &AccountKey, key_: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), key_.as_bytes()])
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

impl ContactStore {
    /// Contacts kept in `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            writer: Arc::new(Mutex::new(())),
        }
    }

    /// Creates the contact, or updates the one with the same msisdn or e-mail.
    /// Returns the contact and whether it was created.
    pub fn upsert(
        &self,
        account: &AccountKey,
        upsert: ContactUpsert,
    ) -> Result<(Contact, bool), StoreError> {
        let _guard = self.writer.lock().expect("contact writer lock");
        for attempt in 0..UPSERT_ATTEMPTS {
            if let Some(done) = self.try_upsert(account, &upsert)? {
                return Ok(done);
            }
            // Another writer (a replica) claimed a value or changed the
            // contact meanwhile: read again, after a moment.
            std::thread::sleep(Duration::from_millis(u64::from(attempt).min(20)));
        }
        Err(StoreError::Remote {
            message: format!(
                "upserting a contact of {account}: other replicas changed it {UPSERT_ATTEMPTS} \
                 times in a row"
            ),
        })
    }

    /// One attempt at [`ContactStore::upsert`]; `None` when another writer
    /// got in between.
    fn try_upsert(
        &self,
        account: &AccountKey,
        upsert: &ContactUpsert,
    ) -> Result<Option<(Contact, bool)>, StoreError> {
        // A read error fails the upsert (and the step, retryably): taking it
        // for "no such contact" would create a duplicate.
        let mut existing = None;
        for (kind, value) in [("msisdn", &upsert.msisdn), ("email", &upsert.email)] {
            let Some(value) = value else { continue };
            existing = self.indexed_raw(account, kind, value)?;
            if existing.is_some() {
                break;
            }
        }
        let now = switchboard_sdk::now();
        // The record as read: the compare-and-swap below writes only if it
        // is still what the changes were made to.
        let (before, existing) = match existing {
            Some((contact, raw)) => (Some(raw), Some(contact)),
            None => (None, None),
        };
        let (mut contact, created) = match existing {
            Some(c) => (c, false),
            None => (
                Contact {
                    key: uuid::Uuid::now_v7().to_string(),
                    account_key: account.clone(),
                    msisdn: None,
                    email: None,
                    name: None,
                    language: None,
                    fields: Map::new(),
                    created_at: now,
                    updated_at: now,
                },
                true,
            ),
        };
        let record_key = contact_key(account, &contact.key);
        // New index entries, the record, then stale entries go. With sled,
        // one after another and no transaction: every prefix a crash can
        // leave is harmless, since lookups skip an entry whose contact is
        // missing or no longer has the value.
        let (mut added, mut stale) = (Vec::new(), Vec::new());
        if let Some(m) = &upsert.msisdn
            && contact.msisdn.as_ref() != Some(m)
        {
            if let Some(old) = contact.msisdn.replace(m.clone()) {
                stale.push(index_key(account, "msisdn", &old));
            }
            added.push(index_key(account, "msisdn", m));
        }
        if let Some(e) = &upsert.email
            && contact.email.as_ref() != Some(e)
        {
            if let Some(old) = contact.email.replace(e.clone()) {
                stale.push(index_key(account, "email", &old));
            }
            added.push(index_key(account, "email", e));
        }
        if upsert.name.is_some() {
            contact.name.clone_from(&upsert.name);
        }
        if upsert.language.is_some() {
            contact.language.clone_from(&upsert.language);
        }
        contact
            .fields
            .extend(upsert.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        contact.updated_at = now;
        // New index entries (claimed from absent, or from an entry that no
        // longer holds) and the record (if still as read), together: in one
        // atomic batch with several replicas, one after another with sled.
        let mut writes = Vec::with_capacity(added.len() + 1);
        let mut found = Vec::with_capacity(added.len() + 1);
        for k in added {
            let holder = self.store.get(Collection::ContactIndex, &k)?;
            if created
                && let Some(holder) = &holder
                && holder.as_slice() != contact.key.as_bytes()
                && self.holds(account, holder, &k)?
            {
                // Another writer made a contact with this value meanwhile:
                // the next attempt finds it and updates it. (An existing
                // contact takes a value from another one, as a merge.)
                return Ok(None);
            }
            writes.push(Write {
                collection: Collection::ContactIndex,
                key: k,
                value: Some(contact.key.clone().into_bytes()),
            });
            found.push(holder);
        }
        writes.push(Write {
            collection: Collection::Contacts,
            key: record_key,
            value: Some(serde_json::to_vec(&contact).expect("a contact serialises")),
        });
        found.push(before);
        let expect: Vec<(usize, Option<&[u8]>)> = found
            .iter()
            .enumerate()
            .map(|(i, old)| (i, old.as_deref()))
            .collect();
        if !self.store.write_expecting(&writes, &expect)? {
            return Ok(None);
        }
        for k in stale {
            // Only if it still points here: another contact may hold the
            // value now.
            self.store.compare_and_swap(
                Collection::ContactIndex,
                &k,
                Some(contact.key.as_bytes()),
                None,
            )?;
        }
        Ok(Some((contact, created)))
    }

    /// Whether the index entry `index` (pointing at contact `holder`) still
    /// holds: the contact exists and has the entry's value.
    fn holds(&self, account: &AccountKey, holder: &[u8], index: &[u8]) -> Result<bool, StoreError> {
        let record = contact_key(account, &String::from_utf8_lossy(holder));
        // Missing here may mean not arrived yet from the replica that
        // wrote it: ask the bucket before taking the entry for stale.
        let found = match self.store.get(Collection::Contacts, &record)? {
            Some(found) => Some(found),
            None => self.store.get_latest(Collection::Contacts, &record)?,
        };
        let Some(contact) = found.and_then(|v| decode::<Contact>(&v)) else {
            return Ok(false);
        };
        Ok([("msisdn", &contact.msisdn), ("email", &contact.email)]
            .into_iter()
            .any(|(kind, value)| {
                value
                    .as_deref()
                    .is_some_and(|v| index_key(account, kind, v) == index)
            }))
    }

    /// The contact `key` of `account`.
    pub fn get(&self, account: &AccountKey, key_: &str) -> Result<Option<Contact>, StoreError> {
        Ok(self
            .store
            .get(Collection::Contacts, &contact_key(account, key_))?
            .and_then(|v| decode(&v)))
    }

    /// The contact of `account` with this msisdn or e-mail (normalised here).
    pub fn find(
        &self,
        account: &AccountKey,
        msisdn_or_email: &str,
    ) -> Result<Option<Contact>, StoreError> {
        let index = if msisdn_or_email.contains('@') {
            normalize_email(msisdn_or_email).map(|e| ("email", e))
        } else {
            normalize_msisdn(msisdn_or_email).map(|m| ("msisdn", m))
        };
        match index {
            Ok(("email", e)) => self.indexed(account, "email", &e),
            Ok((_, m)) => self.indexed(account, "msisdn", &m),
            Err(_) => Ok(None),
        }
    }

    /// The contact the index has for `kind` (`msisdn` or `email`) `value`,
    /// if that contact still has it: index entries are written without a
    /// transaction, so a crash can leave one pointing at a contact that no
    /// longer has the value, or at none.
    fn indexed(
        &self,
        account: &AccountKey,
        kind: &str,
        value: &str,
    ) -> Result<Option<Contact>, StoreError> {
        Ok(self.indexed_raw(account, kind, value)?.map(|(c, _)| c))
    }

    /// [`ContactStore::indexed`], with the record's bytes as stored.
    fn indexed_raw(
        &self,
        account: &AccountKey,
        kind: &str,
        value: &str,
    ) -> Result<Option<(Contact, Vec<u8>)>, StoreError> {
        let Some(k) = self
            .store
            .get(Collection::ContactIndex, &index_key(account, kind, value))?
        else {
            return Ok(None);
        };
        let Some(raw) = self.store.get(
            Collection::Contacts,
            &contact_key(account, &String::from_utf8_lossy(&k)),
        )?
        else {
            return Ok(None);
        };
        Ok(decode::<Contact>(&raw)
            .filter(|c| {
                let has = match kind {
                    "email" => c.email.as_deref(),
                    _ => c.msisdn.as_deref(),
                };
                has == Some(value)
            })
            .map(|c| (c, raw)))
    }

    /// Up to `limit` contacts of `account`, oldest first.
    pub fn list(&self, account: &AccountKey, limit: usize) -> Result<Vec<Contact>, StoreError> {
        Ok(self
            .store
            .scan_prefix(
                Collection::Contacts,
                &key(&[account.as_str().as_bytes(), b""]),
            )?
            .into_iter()
            .take(limit)
            .filter_map(|(_, v)| decode(&v))
            .collect())
    }
}

/// The channel a message went out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// A text message.
    Sms,
    /// An e-mail.
    Email,
}

/// Where a message stands. The first five are what a send records; the rest
/// come from providers' delivery reports (inbound webhooks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Recorded, not yet handed to the provider.
    Pending,
    /// The provider accepted it.
    Sent,
    /// The provider reports it delivered.
    Delivered,
    /// Sending or delivery failed.
    Failed,
    /// The recipient's server bounced it.
    Bounced,
    /// Delivery was tried and will be tried again (a temporary failure).
    Deferred,
    /// The carrier could not deliver it (Twilio's `undelivered`).
    Undelivered,
    /// The provider would not send it (a suppressed or invalid address).
    Dropped,
    /// The recipient opened it.
    Opened,
    /// The recipient clicked a link in it.
    Clicked,
    /// The recipient reported it as spam.
    SpamReported,
    /// The recipient unsubscribed through it.
    Unsubscribed,
}

impl MessageStatus {
    /// How far along a message is: a delivery report never moves a message
    /// back to a lower rank (providers post reports out of order), and
    /// reports of equal rank replace each other (a later outcome wins).
    pub fn rank(self) -> u8 {
        match self {
            MessageStatus::Pending => 0,
            MessageStatus::Sent => 1,
            MessageStatus::Deferred => 2,
            MessageStatus::Delivered
            | MessageStatus::Failed
            | MessageStatus::Bounced
            | MessageStatus::Undelivered
            | MessageStatus::Dropped => 3,
            MessageStatus::Opened => 4,
            MessageStatus::Clicked => 5,
            MessageStatus::SpamReported | MessageStatus::Unsubscribed => 6,
        }
    }

    /// The name it is serialised as.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "pending",
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Failed => "failed",
            MessageStatus::Bounced => "bounced",
            MessageStatus::Deferred => "deferred",
            MessageStatus::Undelivered => "undelivered",
            MessageStatus::Dropped => "dropped",
            MessageStatus::Opened => "opened",
            MessageStatus::Clicked => "clicked",
            MessageStatus::SpamReported => "spam_reported",
            MessageStatus::Unsubscribed => "unsubscribed",
        }
    }
}

impl std::fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of a message's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Status before (none for the first record).
    pub from: Option<MessageStatus>,
    /// Status after.
    pub to: MessageStatus,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Why, in words (the provider's answer, the callback's event).
    pub cause: String,
    /// The delivery report that caused it (provider and its event id), so
    /// that a report posted twice is applied once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A message Switchboard sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// The message id (stable for the event, chain, step and recipient).
    pub id: String,
    /// The account.
    pub account_key: AccountKey,
    /// SMS or e-mail.
    pub channel: Channel,
    /// Phone number or e-mail address.
    pub recipient: String,
    /// The rendered body (the plain-text part of an e-mail).
    pub body: String,
    /// The rendered subject (e-mail).
    pub subject: Option<String>,
    /// The provider's name in the dispatcher's config.
    pub provider: String,
    /// The provider's id for the message, when it gave one.
    pub remote_id: Option<String>,
    /// Where it stands.
    pub status: MessageStatus,
    /// The event that sent it.
    pub event_id: String,
    /// The chain that sent it.
    pub chain: String,
    /// The step that sent it.
    pub step: String,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Every status change, oldest first.
    pub transitions: Vec<Transition>,
}

impl MessageRecord {
    /// A pending record of the `index`th message a step sends. Its id is
    /// derived from (event, chain, step, index), so a re-run step finds it.
    pub fn for_step(
        input: &crate::StepInput<'_>,
        index: usize,
        channel: Channel,
        recipient: String,
        body: String,
        subject: Option<String>,
        provider: String,
    ) -> Self {
        let now = switchboard_sdk::now();
        Self {
            id: input.child_id(index).to_string(),
            account_key: input.event.account_key.clone(),
            channel,
            recipient,
            body,
            subject,
            provider,
            remote_id: None,
            status: MessageStatus::Pending,
            event_id: input.event.id.to_string(),
            chain: input.chain.to_string(),
            step: input.step_name().to_string(),
            created_at: now,
            updated_at: now,
            transitions: Vec::new(),
        }
    }

    /// Whether the provider still has to be asked to send it (a re-run step
    /// does not send again what was already sent).
    pub fn unsent(&self) -> bool {
        matches!(self.status, MessageStatus::Pending | MessageStatus::Failed)
    }
}

/// What a delivery report did to a message record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// The status moved (or was confirmed) from `from`.
    Applied {
        /// The status before.
        from: MessageStatus,
    },
    /// The same report was applied before: nothing changed.
    Duplicate,
    /// The message is further along already (the report came late): nothing changed.
    Stale {
        /// The status it keeps.
        current: MessageStatus,
    },
}

fn remote_key(account: &AccountKey, channel: Channel, remote_id: &str) -> Vec<u8> {
    let channel = match channel {
        Channel::Sms => "sms",
        Channel::Email => "email",
    };
    key(&[
        account.as_str().as_bytes(),
        channel.as_bytes(),
        remote_id.as_bytes(),
    ])
}

/// Message records, by account.
#[derive(Debug, Clone)]
pub struct MessageStore {
    store: Store,
    writer: Arc<Mutex<()>>,
}

impl MessageStore {
    /// Message records kept in `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            writer: Arc::new(Mutex::new(())),
        }
    }

    /// Records a new message as pending; a record with the same id (a re-run
    /// step) is returned as it is.
    pub fn record(&self, mut message: MessageRecord) -> Result<MessageRecord, StoreError> {
        let _guard = self.writer.lock().expect("message writer lock");
        if let Some(existing) = self.get(&message.account_key, &message.id)? {
            return Ok(existing);
        }
        message.status = MessageStatus::Pending;
        message.transitions = vec![Transition {
            from: None,
            to: MessageStatus::Pending,
            at: message.created_at,
            cause: format!("sent by chain {} step {}", message.chain, message.step),
            source: None,
        }];
        self.put(&message)?;
        Ok(message)
    }

    /// Moves a message to `to`, logging `cause`; sets `remote_id` when given
    /// (and indexes the message by it, for delivery reports).
    pub fn transition(
        &self,
        account: &AccountKey,
        id: &str,
        to: MessageStatus,
        cause: &str,
        remote_id: Option<String>,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let _guard = self.writer.lock().expect("message writer lock");
        let updated = self.update(account, id, |m| {
            if remote_id.is_some() {
                m.remote_id.clone_from(&remote_id);
            }
            let now = switchboard_sdk::now();
            m.transitions.push(Transition {
                from: Some(m.status),
                to,
                at: now,
                cause: cause.to_string(),
                source: None,
            });
            m.status = to;
            m.updated_at = now;
            true
        })?;
        Ok(updated.map(|(m, _)| m))
    }

    /// Applies a provider's delivery report to message `id`: moves it to
    /// `to` unless that would move it back ([`MessageStatus::rank`]), logging
    /// `cause`. A report whose `source` is already in the log is not applied
    /// again. `None` when the account has no such message.
    pub fn report(
        &self,
        account: &AccountKey,
        id: &str,
        to: MessageStatus,
        cause: &str,
        source: &str,
    ) -> Result<Option<(MessageRecord, Reported)>, StoreError> {
        let _guard = self.writer.lock().expect("message writer lock");
        let mut outcome = Reported::Applied { from: to };
        let updated = self.update(account, id, |m| {
            if m.transitions
                .iter()
                .any(|t| t.source.as_deref() == Some(source))
            {
                outcome = Reported::Duplicate;
                return false;
            }
            if to.rank() < m.status.rank() {
                outcome = Reported::Stale { current: m.status };
                return false;
            }
            outcome = Reported::Applied { from: m.status };
            let now = switchboard_sdk::now();
            m.transitions.push(Transition {
                from: Some(m.status),
                to,
                at: now,
                cause: cause.to_string(),
                source: Some(source.to_string()),
            });
            m.status = to;
            m.updated_at = now;
            true
        })?;
        Ok(updated.map(|(m, _)| (m, outcome)))
    }

    /// Reads message `id`, lets `change` edit it and writes it back if
    /// `change` says so, with its remote-id index entry: the write only
    /// lands if the record did not change meanwhile (another store
    /// instance, e.g. a send step and a delivery report at once), else it is
    /// read and changed again.
    fn update(
        &self,
        account: &AccountKey,
        id: &str,
        mut change: impl FnMut(&mut MessageRecord) -> bool,
    ) -> Result<Option<(MessageRecord, bool)>, StoreError> {
        let k = key(&[account.as_str().as_bytes(), id.as_bytes()]);
        loop {
            let Some(before) = self.store.get(Collection::Messages, &k)? else {
                return Ok(None);
            };
            let Some(mut m) = decode::<MessageRecord>(&before) else {
                return Ok(None);
            };
            if !change(&mut m) {
                return Ok(Some((m, false)));
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
                return Ok(Some((m, true)));
            }
        }
    }

    fn put(&self, m: &MessageRecord) -> Result<(), StoreError> {
        self.store.put(
            Collection::Messages,
            &key(&[m.account_key.as_str().as_bytes(), m.id.as_bytes()]),
            &serde_json::to_vec(m).expect("a message record serialises"),
        )
    }

    /// The message of `account` sent on `channel` that the provider knows as `remote_id`.
    pub fn find_by_remote_id(
        &self,
        account: &AccountKey,
        channel: Channel,
        remote_id: &str,
    ) -> Result<Option<MessageRecord>, StoreError> {
        if remote_id.is_empty() {
            return Ok(None);
        }
        match self.store.get(
            Collection::MessageRemoteIds,
            &remote_key(account, channel, remote_id),
        )? {
            Some(id) => self.get(account, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// The message `id` of `account`.
    pub fn get(&self, account: &AccountKey, id: &str) -> Result<Option<MessageRecord>, StoreError> {
        Ok(self
            .store
            .get(
                Collection::Messages,
                &key(&[account.as_str().as_bytes(), id.as_bytes()]),
            )?
            .and_then(|v| decode(&v)))
    }

    /// Up to `limit` messages of `account`.
    pub fn list(
        &self,
        account: &AccountKey,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        Ok(self
            .store
            .scan_prefix(
                Collection::Messages,
                &key(&[account.as_str().as_bytes(), b""]),
            )?
            .into_iter()
            .take(limit)
            .filter_map(|(_, v)| decode(&v))
            .collect())
    }
}

/// Account secrets (webhook signing keys and the like): written and used,
/// never read back through the API, never logged.
#[derive(Debug, Clone)]
pub struct SecretStore {
    store: Store,
}

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

impl SecretStore {
    /// Secrets kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Sets (or replaces) a secret.
    pub fn set(&self, account: &AccountKey, name: &str, value: &str) -> Result<(), StoreError> {
        self.store.put(
            Collection::Secrets,
            &key(&[account.as_str().as_bytes(), name.as_bytes()]),
            value.as_bytes(),
        )
    }

    /// A secret's value, for a handler's use.
    pub fn get(&self, account: &AccountKey, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .get(
                Collection::Secrets,
                &key(&[account.as_str().as_bytes(), name.as_bytes()]),
            )?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The names of an account's secrets.
    pub fn names(&self, account: &AccountKey) -> Result<Vec<String>, StoreError> {
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        Ok(self
            .store
            .scan_prefix(Collection::Secrets, &prefix)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect())
    }

    /// Removes a secret; returns whether it existed.
    pub fn remove(&self, account: &AccountKey, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .store
            .remove(
                Collection::Secrets,
                &key(&[account.as_str().as_bytes(), name.as_bytes()]),
            )?
            .is_some())
    }
}

/// Step idempotency keys, stored hashed with the time they were first seen.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    store: Store,
}

impl IdempotencyStore {
    /// Keys kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    fn key(account: &AccountKey, chain: &str, step: &str, rendered: &str) -> Vec<u8> {
        let hash = Sha256::digest(rendered.as_bytes());
        key(&[
            account.as_str().as_bytes(),
            chain.as_bytes(),
            step.as_bytes(),
            &hash,
        ])
    }

    /// Whether `rendered` was recorded for this step less than `window` ago.
    pub fn seen(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let k = Self::key(account, chain, step, rendered);
        let Some(v) = self.store.get(Collection::Idempotency, &k)? else {
            return Ok(false);
        };
        let at = i64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8]));
        let age = switchboard_sdk::now().unix_timestamp() - at;
        Ok(age < window.as_secs() as i64)
    }

    /// Records `rendered` for this step, now.
    pub fn record(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
    ) -> Result<(), StoreError> {
        let k = Self::key(account, chain, step, rendered);
        let now = switchboard_sdk::now().unix_timestamp();
        self.store
            .put(Collection::Idempotency, &k, &now.to_be_bytes())
    }
}

/// Scripts' `contact()` reads the account's contacts, read-only.
impl crate::script::ContactLookup for ContactStore {
    fn find(&self, account: &AccountKey, msisdn_or_email: &str) -> Option<Map<String, Value>> {
        let contact = ContactStore::find(self, account, msisdn_or_email)
            .ok()
            .flatten()?;
        match serde_json::to_value(contact) {
            Ok(Value::Object(mut m)) => {
                m.remove("account_key");
                Some(m)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(msisdn: &str) -> ContactUpsert {
        ContactUpsert {
            msisdn: Some(msisdn.to_string()),
            email: None,
            name: None,
            language: None,
            fields: Map::new(),
        }
    }

    /// An upsert whose number belongs to one contact and whose e-mail to
    /// another finishes (it once retried for ever): the e-mail moves to the
    /// contact found by number.
    #[test]
    fn a_number_and_an_email_of_two_contacts_merge_into_the_first() {
        let contacts = ContactStore::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let (thandi, _) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        let by_email = ContactUpsert {
            email: Some("sipho@example.org".into()),
            ..upsert("+27820000002")
        };
        let (sipho, _) = contacts.upsert(&acme, by_email).unwrap();
        let both = ContactUpsert {
            email: Some("sipho@example.org".into()),
            ..upsert("+27820000001")
        };
        let (merged, created) = contacts.upsert(&acme, both).unwrap();
        assert!(!created);
        assert_eq!(merged.key, thandi.key);
        assert_eq!(merged.email.as_deref(), Some("sipho@example.org"));
        let found = contacts.find(&acme, "sipho@example.org").unwrap().unwrap();
        assert_eq!(found.key, thandi.key);
        assert_ne!(found.key, sipho.key);
    }

    /// A crash between a contact's writes can leave an index entry pointing
    /// at a contact that no longer has that number: lookups must not take
    /// it, or a stranger's number would be merged into that contact.
    #[test]
    fn a_stale_index_entry_is_taken_for_none() {
        let store = Store::temporary().unwrap();
        let contacts = ContactStore::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        let (thandi, created) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        assert!(created);
        // As a crash could leave it: the number's entry points at a contact
        // with another number.
        store
            .put(
                Collection::ContactIndex,
                &index_key(&acme, "msisdn", "+27820000002"),
                thandi.key.as_bytes(),
            )
            .unwrap();
        assert_eq!(contacts.find(&acme, "+27820000002").unwrap(), None);
        let (other, created) = contacts.upsert(&acme, upsert("+27820000002")).unwrap();
        assert!(created, "a new contact, not Thandi's");
        assert_ne!(other.key, thandi.key);
        let thandi_now = contacts.find(&acme, "+27820000001").unwrap().unwrap();
        assert_eq!(thandi_now.key, thandi.key);
        assert_eq!(thandi_now.msisdn.as_deref(), Some("+27820000001"));
        assert_eq!(
            contacts.find(&acme, "+27820000002").unwrap().unwrap().key,
            other.key
        );
    }
}
