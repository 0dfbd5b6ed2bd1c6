//! Contacts in the store: each contact's record under (account, key), and
//! an index entry per msisdn and e-mail, under (account, `kind:value`),
//! that holds the key of the contact with that value.
//!
//! A contact created with a value is keyed by that value when it can be:
//! its key is a UUID derived from the account and the value
//! ([`derived_key`]), so a lookup finds it there without an index entry,
//! and creating it writes one record instead of a record and an entry.
//! The index holds the rest: the values a contact took later, and values
//! whose derived key a contact already has (one that gave the value up).
//! A lookup reads the derived key first, then the index. At most one
//! contact has a value: a contact that takes a value from another (by its
//! index entry, or from under its derived key) writes the other without it
//! before anything else, so a contact under the derived key that has the
//! value is the one, and a returning contact found by the value it was
//! created with costs one read.

use std::time::Duration;

use switchboard_handlers::records::{
    Contact, ContactUpsert, Contacts, Identifier, RecordError, Records,
};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, KeyLocks, Store, StoreError, Write, key};
use time::OffsetDateTime;

use super::{About, decode};

/// How many times an upsert reads again after other replicas changed what
/// it read, before it gives up (the step fails, and is retried).
const UPSERT_ATTEMPTS: u32 = 50;

/// Upserts look up, then write: an account's go one at a time in this
/// process, whichever instance runs them, so that two events for one
/// number do not race to create two contacts.
static WRITERS: KeyLocks = KeyLocks::new();

/// Contacts, by account.
#[derive(Debug)]
pub struct StoredContacts {
    store: Store,
}

fn index_key(account: &AccountKey, id: &Identifier) -> Vec<u8> {
    key(&[
        account.as_str().as_bytes(),
        format!("{}:{}", id.kind(), id.value()).as_bytes(),
    ])
}

fn contact_key(account: &AccountKey, key_: &str) -> Vec<u8> {
    key(&[account.as_str().as_bytes(), key_.as_bytes()])
}

/// The namespace of [`derived_key`]'s UUIDs.
const DERIVED: uuid::Uuid = uuid::Uuid::from_u128(0x5b1c_0c3e_8f0a_4d6e_9a71_3e2f_c0de_c047);

/// The key of a contact created with `id` in `account`, unless a contact
/// already has it: a name-based UUID (version 5) of the account and the
/// value, as the index writes it.
fn derived_key(account: &AccountKey, id: &Identifier) -> String {
    let name = format!("{}\0{}:{}", account.as_str(), id.kind(), id.value());
    uuid::Uuid::new_v5(&DERIVED, name.as_bytes()).to_string()
}

/// A contact, with its record's bytes as stored.
type Stored = (Contact, Vec<u8>);

/// The contact a record holds, if it has `id`.
fn having(raw: Option<&[u8]>, id: &Identifier) -> Option<Contact> {
    raw.and_then(decode::<Contact>).filter(|c| c.has(id))
}

/// A contact an upsert claims a value from.
struct Holder {
    /// Its record's key.
    key: Vec<u8>,
    /// Its record, as read.
    read: Option<Vec<u8>>,
    /// Its record, decoded, with the values it gives up taken off.
    giving_up: Option<Contact>,
    /// Whether it gives any value up.
    gives_up: bool,
}

impl Holder {
    /// Notes that the contact under `key` (`read`) is claimed `id` from:
    /// it gives the value up if it has it. False if the claiming contact
    /// is being `created`, and the holder has the value: another writer
    /// made a contact with it meanwhile, which the next attempt finds and
    /// updates. (An existing contact takes a value from another one, as a
    /// merge.)
    fn note(
        holders: &mut Vec<Holder>,
        key: Vec<u8>,
        read: Option<Vec<u8>>,
        id: &Identifier,
        created: bool,
        now: OffsetDateTime,
    ) -> bool {
        let at = match holders.iter().position(|h| h.key == key) {
            Some(at) => at,
            None => {
                let giving_up = read.as_deref().and_then(decode::<Contact>);
                holders.push(Holder {
                    key,
                    read,
                    giving_up,
                    gives_up: false,
                });
                holders.len() - 1
            }
        };
        let Some(contact) = &mut holders[at].giving_up else {
            return true;
        };
        if !contact.has(id) {
            return true;
        }
        if created {
            return false;
        }
        contact.give_up(id, now);
        holders[at].gives_up = true;
        true
    }

    /// The record to write: as read, or without the values given up.
    fn written(&self) -> Option<Vec<u8>> {
        match &self.giving_up {
            Some(c) if self.gives_up => Some(serde_json::to_vec(c).expect("a contact serialises")),
            _ => self.read.clone(),
        }
    }
}

/// What looking a value up read.
struct Looked {
    /// The value.
    id: Identifier,
    /// Its index entry, as read, when the derived key did not lead to a
    /// contact with the value (`None`: not read).
    entry: Option<Option<Vec<u8>>>,
    /// The record under the value's derived key, as read.
    derived: Option<Vec<u8>>,
}

impl StoredContacts {
    /// Contacts kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// One attempt at [`Contacts::upsert`]; `None` when another writer got
    /// in between.
    fn try_upsert(
        &self,
        account: &AccountKey,
        upsert: &ContactUpsert,
    ) -> Result<Option<(Contact, bool)>, StoreError> {
        // A read error fails the upsert (and the step, retryably): taking it
        // for "no such contact" would create a duplicate.
        // What the lookups read is kept for the claims below: a new
        // contact's values are each looked up once, not twice.
        let mut existing = None;
        let mut looked: Vec<Looked> = Vec::new();
        for id in upsert.identifiers() {
            let (found, read) = self.look_up(account, id)?;
            looked.push(read);
            if found.is_some() {
                existing = found;
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
        if let Some(c) = &existing
            && upsert.by.is_some()
            && c.updated_by == upsert.by
        {
            // This step upserted it last: it runs again (a crash came
            // before its journal entry), and finds it as it left it.
            let created = c.created_by == upsert.by;
            return Ok(existing.map(|c| (c, created)));
        }
        let (mut contact, created) = match existing {
            Some(c) => (c, false),
            None => {
                let mut new = self.new_contact(account, &looked, now);
                new.created_by.clone_from(&upsert.by);
                (new, true)
            }
        };
        // What the upsert answers: created, also when this step made the
        // contact and runs again after another upsert of it.
        let answer = created || (upsert.by.is_some() && contact.created_by == upsert.by);
        let record_key = contact_key(account, &contact.key);
        let reindex = contact.apply(upsert, now);
        // New index entries, the record, then stale entries go. With sled,
        // one after another and no transaction: every prefix a crash can
        // leave is harmless, since lookups skip an entry whose contact is
        // missing or no longer has the value.
        // New index entries (claimed from absent, or from an entry that no
        // longer holds) and the record (if still as read), together: in one
        // atomic batch with several replicas, one after another with sled.
        // Contacts that give up a value to this one (or, missing or
        // without it, must still be so where the write is decided), as
        // read and as they are to be written.
        let mut holders: Vec<Holder> = Vec::new();
        let mut claims: Vec<(Write, Option<Vec<u8>>)> = Vec::new();
        for id in &reindex.added {
            let k = index_key(account, id);
            let (entry, derived) = match looked.iter().position(|read| read.id == *id) {
                Some(at) => {
                    let read = looked.swap_remove(at);
                    (read.entry, Some(read.derived))
                }
                None => (None, None),
            };
            let entry = match entry {
                Some(entry) => entry,
                None => self.store.get(Collection::ContactIndex, &k)?,
            };
            let derived_key = derived_key(account, id);
            // Found under its key, a value needs no entry. The entry's
            // absence is as read when this replica writes the account's
            // contacts (one upsert at a time: `WRITERS`); when another
            // replica does, this copy may lag, and the entry is claimed
            // from absent, which the owner checks.
            if entry.is_none()
                && contact.key == derived_key
                && self.store.writes_locally(Collection::ContactIndex, &k)
            {
                continue;
            }
            match &entry {
                Some(holder) if holder.as_slice() != contact.key.as_bytes() => {
                    // The holder as read here (missing, or without the
                    // value) must still be so where the write is decided: a
                    // replica's copy can show an index entry before the
                    // record it points at, and the entry alone would let
                    // this claim it from a contact that has the value (a
                    // duplicate contact).
                    let (holder_key, holder_raw) = self.holder_record(account, holder)?;
                    if !Holder::note(&mut holders, holder_key, holder_raw, id, created, now) {
                        return Ok(None);
                    }
                }
                Some(_) => {}
                None if contact.key != derived_key => {
                    // The contact under the value's derived key, if it has
                    // the value, gives it up (as when its entry names it).
                    let holder_key = contact_key(account, &derived_key);
                    let holder_raw = match derived {
                        Some(raw) => raw,
                        None => self.store.get(Collection::Contacts, &holder_key)?,
                    };
                    if having(holder_raw.as_deref(), id).is_some()
                        && !Holder::note(&mut holders, holder_key, holder_raw, id, created, now)
                    {
                        return Ok(None);
                    }
                }
                None => {}
            }
            claims.push((
                Write {
                    collection: Collection::ContactIndex,
                    key: k,
                    value: Some(contact.key.clone().into_bytes()),
                },
                entry,
            ));
        }
        let mut writes = Vec::with_capacity(holders.len() + claims.len() + 1);
        let mut found = Vec::with_capacity(writes.capacity());
        for holder in holders {
            writes.push(Write {
                collection: Collection::Contacts,
                value: holder.written(),
                key: holder.key,
            });
            found.push(holder.read);
        }
        for (write, entry) in claims {
            writes.push(write);
            found.push(entry);
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
        for id in &reindex.stale {
            // Only if it still points here: another contact may hold the
            // value now.
            self.store.compare_and_swap(
                Collection::ContactIndex,
                &index_key(account, id),
                Some(contact.key.as_bytes()),
                None,
            )?;
        }
        Ok(Some((contact, answer)))
    }

    /// Whether the index entry for `id` (pointing at contact `holder`)
    /// still holds: the contact exists and has that value.
    /// The key and record of the contact an index entry names (`holder`).
    /// Missing here may mean not arrived yet from the replica that wrote
    /// it: the latest copy is asked for before taking it for missing.
    fn holder_record(
        &self,
        account: &AccountKey,
        holder: &[u8],
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), StoreError> {
        let record = contact_key(account, &String::from_utf8_lossy(holder));
        let found = match self.store.get(Collection::Contacts, &record)? {
            Some(found) => Some(found),
            None => self.store.get_latest(Collection::Contacts, &record)?,
        };
        Ok((record, found))
    }

    /// The contact that has `id`, with its record's bytes: the one under
    /// its derived key, if that has it (no other can: see the module's
    /// doc); otherwise the one its index entry names, if that contact still
    /// has it (index entries are written without a transaction, so a crash
    /// can leave one pointing at a contact that no longer has the value, or
    /// at none). With what was read.
    fn look_up(
        &self,
        account: &AccountKey,
        id: Identifier,
    ) -> Result<(Option<Stored>, Looked), StoreError> {
        let derived = self.store.get(
            Collection::Contacts,
            &contact_key(account, &derived_key(account, &id)),
        )?;
        if let Some(found) = having(derived.as_deref(), &id).zip(derived.clone()) {
            let read = Looked {
                id,
                entry: None,
                derived,
            };
            return Ok((Some(found), read));
        }
        let entry = self
            .store
            .get(Collection::ContactIndex, &index_key(account, &id))?;
        let found = self.indexed_at(account, &id, entry.as_deref())?;
        let read = Looked {
            id,
            entry: Some(entry),
            derived,
        };
        Ok((found, read))
    }

    /// A new contact, keyed by its first value (the number, if it has
    /// one) when no contact has that key yet.
    fn new_contact(&self, account: &AccountKey, looked: &[Looked], now: OffsetDateTime) -> Contact {
        match looked.first() {
            Some(first) if first.derived.is_none() => {
                Contact::with_key(account.clone(), derived_key(account, &first.id), now)
            }
            _ => Contact::new(account.clone(), now),
        }
    }

    /// The contact index entry `entry` (for `id`) names, if it has `id`.
    fn indexed_at(
        &self,
        account: &AccountKey,
        id: &Identifier,
        entry: Option<&[u8]>,
    ) -> Result<Option<Stored>, StoreError> {
        let Some(k) = entry else {
            return Ok(None);
        };
        let Some(raw) = self.store.get(
            Collection::Contacts,
            &contact_key(account, &String::from_utf8_lossy(k)),
        )?
        else {
            return Ok(None);
        };
        Ok(having(Some(&raw), id).map(|c| (c, raw)))
    }
}

impl Contacts for StoredContacts {
    fn upsert(
        &self,
        account: &AccountKey,
        upsert: ContactUpsert,
    ) -> Result<(Contact, bool), RecordError> {
        let _guard = WRITERS.lock(account.as_str().as_bytes());
        for attempt in 0..UPSERT_ATTEMPTS {
            if let Some(done) = self
                .try_upsert(account, &upsert)
                .about(Records::Contacts, account)?
            {
                return Ok(done);
            }
            // Another writer (a replica) claimed a value or changed the
            // contact meanwhile: read again, after a moment.
            std::thread::sleep(Duration::from_millis(u64::from(attempt).min(20)));
        }
        Err(RecordError::Contended {
            records: Records::Contacts,
            account: account.clone(),
            attempts: UPSERT_ATTEMPTS,
        })
    }

    fn get(&self, account: &AccountKey, key_: &str) -> Result<Option<Contact>, RecordError> {
        Ok(self
            .store
            .get(Collection::Contacts, &contact_key(account, key_))
            .about(Records::Contacts, account)?
            .and_then(|v| decode(&v)))
    }

    fn find(
        &self,
        account: &AccountKey,
        msisdn_or_email: &str,
    ) -> Result<Option<Contact>, RecordError> {
        let Some(id) = Identifier::parse(msisdn_or_email) else {
            return Ok(None);
        };
        Ok(self
            .look_up(account, id)
            .about(Records::Contacts, account)?
            .0
            .map(|(c, _)| c))
    }

    fn list(&self, account: &AccountKey, limit: usize) -> Result<Vec<Contact>, RecordError> {
        super::list(
            &self.store,
            Collection::Contacts,
            Records::Contacts,
            account,
            limit,
        )
    }

    fn list_after(
        &self,
        account: &AccountKey,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Contact>, RecordError> {
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        let from = key(&[account.as_str().as_bytes(), after.unwrap_or("").as_bytes()]);
        Ok(self
            .store
            .scan_prefix_from(
                Collection::Contacts,
                &prefix,
                &from,
                limit.saturating_add(1),
            )
            .about(Records::Contacts, account)?
            .into_iter()
            // `after` itself, when it is a contact's key.
            .filter(|(k, _)| after.is_none() || *k != from)
            .take(limit)
            .filter_map(|(_, v)| decode(&v))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use switchboard_sdk::AccountKey;

    use super::*;

    fn upsert(msisdn: &str) -> ContactUpsert {
        ContactUpsert {
            msisdn: Some(msisdn.to_string()),
            ..ContactUpsert::default()
        }
    }

    #[test]
    fn contacts_upsert_by_msisdn_or_email_within_an_account() {
        let contacts = StoredContacts::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let other = AccountKey::new("other").unwrap();
        let by_msisdn = ContactUpsert {
            name: Some("Thandi".into()),
            ..upsert("+27820000001")
        };
        let (first, created) = contacts.upsert(&acme, by_msisdn.clone()).unwrap();
        assert!(created);
        // The same number again, now with an e-mail: the same contact, updated.
        let (second, created) = contacts
            .upsert(
                &acme,
                ContactUpsert {
                    email: Some("t@example.org".into()),
                    ..by_msisdn.clone()
                },
            )
            .unwrap();
        assert!(!created);
        assert_eq!(second.key, first.key);
        assert_eq!(second.email.as_deref(), Some("t@example.org"));
        // Found by e-mail too; another account has its own contact for the number.
        assert_eq!(
            contacts.find(&acme, "T@example.org").unwrap().unwrap().key,
            first.key
        );
        assert!(contacts.find(&other, "+27820000001").unwrap().is_none());
        let (theirs, created) = contacts.upsert(&other, by_msisdn).unwrap();
        assert!(created);
        assert_ne!(theirs.key, first.key);
        assert_eq!(contacts.list(&acme, 10).unwrap().len(), 1);
        assert!(contacts.get(&other, &first.key).unwrap().is_none());
    }

    /// Upserts on several threads at once, in several accounts, of
    /// numbers whose e-mails already belong to contacts (made by e-mail
    /// alone): some threads bring a number alone, others the number with
    /// its e-mail. However they interleave, each number ends with one
    /// contact, the one its e-mail finds. (A number alone creates a contact
    /// keyed by it without an index entry; an upsert adding the number to
    /// the e-mail's contact must not miss it: an account's upserts go one
    /// at a time.)
    #[test]
    fn concurrent_upserts_of_the_same_values_make_one_contact_each() {
        let contacts = std::sync::Arc::new(StoredContacts::new(Store::temporary().unwrap()));
        let accounts: Vec<AccountKey> = ["acme", "other", "third"]
            .iter()
            .map(|a| AccountKey::new(*a).unwrap())
            .collect();
        let numbers = 100;
        let number = |n: usize| format!("+2782000{n:04}");
        let email = |n: usize| format!("c{n}@example.org");
        for account in &accounts {
            for n in 0..numbers {
                let by_email = ContactUpsert {
                    email: Some(email(n)),
                    ..ContactUpsert::default()
                };
                contacts.upsert(account, by_email).unwrap();
            }
        }
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let contacts = std::sync::Arc::clone(&contacts);
                let accounts = accounts.clone();
                std::thread::spawn(move || {
                    for n in 0..numbers {
                        for account in &accounts {
                            // Every other thread goes through the numbers
                            // backwards; half bring the e-mail along.
                            let n = if t % 2 == 0 { n } else { numbers - 1 - n };
                            let mut u = upsert(&number(n));
                            if t < 2 {
                                u.email = Some(email(n));
                            }
                            contacts.upsert(account, u).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for account in &accounts {
            let all = contacts.list(account, 10_000).unwrap();
            for n in 0..numbers {
                let having: Vec<&str> = all
                    .iter()
                    .filter(|c| c.msisdn.as_deref() == Some(number(n).as_str()))
                    .map(|c| c.key.as_str())
                    .collect();
                assert_eq!(
                    having.len(),
                    1,
                    "{account}: contacts with number {n}: {having:?}"
                );
                let by_email = contacts.find(account, &email(n)).unwrap();
                assert_eq!(
                    by_email.map(|c| c.key).as_deref(),
                    Some(having[0]),
                    "{account}: number {n}'s e-mail finds its contact"
                );
            }
        }
    }

    /// An upsert whose number belongs to one contact and whose e-mail to
    /// another finishes (it once retried for ever): the e-mail moves to the
    /// contact found by number.
    #[test]
    fn a_number_and_an_email_of_two_contacts_merge_into_the_first() {
        let contacts = StoredContacts::new(Store::temporary().unwrap());
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
        // Sipho gave the e-mail up.
        let sipho = contacts.get(&acme, &sipho.key).unwrap().unwrap();
        assert_eq!(sipho.email, None);
        assert_eq!(sipho.msisdn.as_deref(), Some("+27820000002"));
    }

    /// A crash between a contact's writes can leave an index entry pointing
    /// at a contact that no longer has that number: lookups must not take
    /// it, or a stranger's number would be merged into that contact.
    #[test]
    fn a_stale_index_entry_is_taken_for_none() {
        let store = Store::temporary().unwrap();
        let contacts = StoredContacts::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        let (thandi, created) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        assert!(created);
        // As a crash could leave it: the number's entry points at a contact
        // with another number.
        store
            .put(
                Collection::ContactIndex,
                &index_key(&acme, &Identifier::Msisdn("+27820000002".into())),
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

    /// The index keys stay as they were written before: `kind:value`
    /// under the account.
    #[test]
    fn index_entries_keep_their_layout() {
        let acme = AccountKey::new("acme").unwrap();
        assert_eq!(
            index_key(&acme, &Identifier::Email("t@example.org".into())),
            key(&[b"acme", b"email:t@example.org"])
        );
        assert_eq!(
            index_key(&acme, &Identifier::Msisdn("+27820000001".into())),
            key(&[b"acme", b"msisdn:+27820000001"])
        );
    }

    /// The index entries of `account`, as `kind:value`.
    fn indexed(store: &Store, account: &AccountKey) -> Vec<String> {
        let prefix = key(&[account.as_str().as_bytes(), b""]);
        store
            .scan_prefix(Collection::ContactIndex, &prefix)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect()
    }

    /// A contact created with a number is keyed by it: the index gets no
    /// entry for the number, only for values the contact takes later.
    #[test]
    fn a_contact_is_keyed_by_the_value_it_was_created_with() {
        let store = Store::temporary().unwrap();
        let contacts = StoredContacts::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        let (thandi, created) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        assert!(created);
        let number = Identifier::Msisdn("+27820000001".into());
        assert_eq!(thandi.key, derived_key(&acme, &number));
        assert_eq!(indexed(&store, &acme), Vec::<String>::new());
        assert_eq!(
            contacts.find(&acme, "+27820000001").unwrap(),
            Some(thandi.clone())
        );
        // Another account's contact for the number has a key of its own.
        let other = AccountKey::new("other").unwrap();
        let (theirs, _) = contacts.upsert(&other, upsert("+27820000001")).unwrap();
        assert_ne!(theirs.key, thandi.key);

        let with_email = ContactUpsert {
            email: Some("t@example.org".into()),
            ..upsert("+27820000001")
        };
        let (updated, created) = contacts.upsert(&acme, with_email).unwrap();
        assert!(!created);
        assert_eq!(updated.key, thandi.key);
        assert_eq!(indexed(&store, &acme), ["email:t@example.org"]);
        assert_eq!(
            contacts.find(&acme, "t@example.org").unwrap().unwrap().key,
            thandi.key
        );
    }

    /// A contact that gave up the number it was created with keeps its
    /// key; the number's next contact gets a fresh key and an index entry.
    #[test]
    fn a_number_given_up_goes_to_a_new_contact_through_the_index() {
        let store = Store::temporary().unwrap();
        let contacts = StoredContacts::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        let thandi_email = ContactUpsert {
            email: Some("t@example.org".into()),
            ..upsert("+27820000001")
        };
        let (thandi, _) = contacts.upsert(&acme, thandi_email).unwrap();
        // Found by e-mail, the contact takes a new number.
        let new_number = ContactUpsert {
            email: Some("t@example.org".into()),
            ..upsert("+27820000009")
        };
        let (moved, created) = contacts.upsert(&acme, new_number).unwrap();
        assert!(!created);
        assert_eq!(moved.key, thandi.key);
        assert_eq!(moved.msisdn.as_deref(), Some("+27820000009"));
        assert_eq!(contacts.find(&acme, "+27820000001").unwrap(), None);

        let (sipho, created) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        assert!(created);
        assert_ne!(sipho.key, thandi.key);
        assert_eq!(
            contacts.find(&acme, "+27820000001").unwrap().unwrap().key,
            sipho.key
        );
        assert_eq!(
            contacts.find(&acme, "+27820000009").unwrap().unwrap().key,
            thandi.key
        );
        let mut entries = indexed(&store, &acme);
        entries.sort();
        assert_eq!(
            entries,
            [
                "email:t@example.org",
                "msisdn:+27820000001",
                "msisdn:+27820000009"
            ]
        );
        // Sipho's number again: the same contact, not a third.
        let (again, created) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        assert!(!created);
        assert_eq!(again.key, sipho.key);
    }

    /// An e-mail taken by another contact moves to it through the index,
    /// which wins over the contact keyed by the e-mail.
    #[test]
    fn an_index_entry_wins_over_the_contact_keyed_by_the_value() {
        let contacts = StoredContacts::new(Store::temporary().unwrap());
        let acme = AccountKey::new("acme").unwrap();
        let by_email = ContactUpsert {
            email: Some("s@example.org".into()),
            ..ContactUpsert::default()
        };
        let (sipho, _) = contacts.upsert(&acme, by_email.clone()).unwrap();
        let email = Identifier::Email("s@example.org".into());
        assert_eq!(sipho.key, derived_key(&acme, &email));
        let (thandi, _) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        let both = ContactUpsert {
            email: Some("s@example.org".into()),
            ..upsert("+27820000001")
        };
        let (merged, created) = contacts.upsert(&acme, both).unwrap();
        assert!(!created);
        assert_eq!(merged.key, thandi.key);
        assert_eq!(
            contacts.find(&acme, "s@example.org").unwrap().unwrap().key,
            thandi.key
        );
        // The contact keyed by the e-mail gave it up.
        assert_eq!(
            contacts.get(&acme, &sipho.key).unwrap().unwrap().email,
            None
        );
        // Upserting by the e-mail alone updates the contact that has it now.
        let (again, created) = contacts.upsert(&acme, by_email).unwrap();
        assert!(!created);
        assert_eq!(again.key, thandi.key);
        // Once that contact gives it up too, no contact has it.
        let other_email = ContactUpsert {
            email: Some("t@example.org".into()),
            ..upsert("+27820000001")
        };
        contacts.upsert(&acme, other_email).unwrap();
        assert_eq!(contacts.find(&acme, "s@example.org").unwrap(), None);
    }

    use switchboard_handlers::records::StepRef;

    fn by(event: &str, step: &str) -> Option<StepRef> {
        Some(StepRef::of(event, "welcome", step))
    }

    /// A step run again for the same event (its journal entry lost to a
    /// crash) finds the contact as it left it and answers as it did; the
    /// next step, or the next event, upserts as usual.
    #[test]
    fn the_same_step_upserting_again_finds_the_contact_as_it_left_it() {
        let store = Store::temporary().unwrap();
        let contacts = StoredContacts::new(store.clone());
        let acme = AccountKey::new("acme").unwrap();
        let first = ContactUpsert {
            name: Some("Thandi".into()),
            by: by("e1", "contact"),
            ..upsert("+27820000001")
        };
        let (made, created) = contacts.upsert(&acme, first.clone()).unwrap();
        assert!(created);
        assert_eq!(made.created_by, by("e1", "contact"));
        assert_eq!(made.updated_by, by("e1", "contact"));
        let raw = |key: &str| {
            store
                .get(Collection::Contacts, &contact_key(&acme, key))
                .unwrap()
        };
        let stored = raw(&made.key);

        let (again, created) = contacts.upsert(&acme, first.clone()).unwrap();
        assert!(created, "it answers as the first run did");
        assert_eq!(again, made);
        assert_eq!(raw(&made.key), stored, "nothing written");

        // Another step of the same event: an update, not a creation.
        let second = ContactUpsert {
            name: Some("Thandi M".into()),
            by: by("e1", "rename"),
            ..upsert("+27820000001")
        };
        let (renamed, created) = contacts.upsert(&acme, second).unwrap();
        assert!(!created);
        assert_eq!(renamed.name.as_deref(), Some("Thandi M"));
        assert_eq!(renamed.created_by, by("e1", "contact"));
        assert_eq!(renamed.updated_by, by("e1", "rename"));
        // The first step again, after that: no longer the last to upsert,
        // it applies its values as any upsert does, and still answers that
        // it created the contact.
        let (back, created) = contacts.upsert(&acme, first).unwrap();
        assert!(created);
        assert_eq!(back.name.as_deref(), Some("Thandi"));
        assert_eq!(back.updated_by, by("e1", "contact"));
        // An upsert by no step (nothing names it) never takes that path.
        let (plain, created) = contacts.upsert(&acme, upsert("+27820000001")).unwrap();
        assert!(!created);
        assert_eq!(plain.updated_by, None);
        assert_eq!(plain.created_by, by("e1", "contact"));
    }
}
