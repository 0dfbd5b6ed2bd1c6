//! In-memory implementations of the record ports, for this crate's tests:
//! they keep the ports' contracts (one account never sees another's
//! records) without a store.

use std::sync::Mutex;

use switchboard_sdk::AccountKey;

use super::{
    Contact, ContactUpsert, Contacts, Identifier, RecordError, SourceRecords, SourceVersion,
};

/// Contacts in a list, upserted by [`Contact::apply`].
#[derive(Debug, Default)]
pub(crate) struct MemoryContacts(Mutex<Vec<Contact>>);

impl MemoryContacts {
    fn position(contacts: &[Contact], account: &AccountKey, id: &Identifier) -> Option<usize> {
        contacts
            .iter()
            .position(|c| c.account_key == *account && c.has(id))
    }
}

impl Contacts for MemoryContacts {
    fn upsert(
        &self,
        account: &AccountKey,
        upsert: ContactUpsert,
    ) -> Result<(Contact, bool), RecordError> {
        let mut all = self.0.lock().unwrap();
        let now = switchboard_sdk::now();
        let found = upsert
            .identifiers()
            .find_map(|id| Self::position(&all, account, &id));
        let created = found.is_none();
        let at = found.unwrap_or_else(|| {
            all.push(Contact::new(account.clone(), now));
            all.len() - 1
        });
        all[at].apply(&upsert, now);
        Ok((all[at].clone(), created))
    }

    fn get(&self, account: &AccountKey, key: &str) -> Result<Option<Contact>, RecordError> {
        let all = self.0.lock().unwrap();
        Ok(all
            .iter()
            .find(|c| c.account_key == *account && c.key == key)
            .cloned())
    }

    fn find(
        &self,
        account: &AccountKey,
        msisdn_or_email: &str,
    ) -> Result<Option<Contact>, RecordError> {
        let all = self.0.lock().unwrap();
        Ok(Identifier::parse(msisdn_or_email)
            .and_then(|id| Self::position(&all, account, &id))
            .map(|at| all[at].clone()))
    }

    fn list(&self, account: &AccountKey, limit: usize) -> Result<Vec<Contact>, RecordError> {
        let all = self.0.lock().unwrap();
        Ok(all
            .iter()
            .filter(|c| c.account_key == *account)
            .take(limit)
            .cloned()
            .collect())
    }

    fn list_after(
        &self,
        account: &AccountKey,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Contact>, RecordError> {
        let mut all: Vec<Contact> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.account_key == *account && after.is_none_or(|a| c.key.as_str() > a))
            .cloned()
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all.truncate(limit);
        Ok(all)
    }
}

/// Script versions in a list; the current ones in another.
#[derive(Debug, Default)]
pub(crate) struct MemorySources {
    versions: Mutex<Vec<SourceVersion>>,
    current: Mutex<Vec<SourceVersion>>,
}

fn of<'a>(
    list: &'a [SourceVersion],
    account: &'a AccountKey,
    name: &'a str,
) -> impl Iterator<Item = &'a SourceVersion> + 'a {
    list.iter()
        .filter(move |v| v.account_key == *account && v.name == name)
}

impl SourceRecords for MemorySources {
    fn last_version(&self, account: &AccountKey, name: &str) -> Result<Option<u64>, RecordError> {
        let versions = self.versions.lock().unwrap();
        Ok(of(&versions, account, name).map(|v| v.version).max())
    }

    fn create(&self, version: &SourceVersion) -> Result<bool, RecordError> {
        let mut versions = self.versions.lock().unwrap();
        if of(&versions, &version.account_key, &version.name).any(|v| v.version == version.version)
        {
            return Ok(false);
        }
        versions.push(version.clone());
        versions.retain(|v| {
            v.account_key != version.account_key
                || v.name != version.name
                || v.version + super::VERSIONS_KEPT > version.version
        });
        let mut current = self.current.lock().unwrap();
        current.retain(|v| !(v.account_key == version.account_key && v.name == version.name));
        current.push(version.clone());
        Ok(true)
    }

    fn current(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<SourceVersion>, RecordError> {
        Ok(of(&self.current.lock().unwrap(), account, name)
            .next()
            .cloned())
    }

    fn list(&self, account: &AccountKey) -> Result<Vec<SourceVersion>, RecordError> {
        let mut list: Vec<SourceVersion> = self
            .current
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v.account_key == *account)
            .cloned()
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    fn history(&self, account: &AccountKey, name: &str) -> Result<Vec<SourceVersion>, RecordError> {
        Ok(of(&self.versions.lock().unwrap(), account, name)
            .cloned()
            .collect())
    }

    fn version(
        &self,
        account: &AccountKey,
        name: &str,
        version: u64,
    ) -> Result<Option<SourceVersion>, RecordError> {
        Ok(of(&self.versions.lock().unwrap(), account, name)
            .find(|v| v.version == version)
            .cloned())
    }

    fn remove(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<SourceVersion>, RecordError> {
        let mut current = self.current.lock().unwrap();
        let at = current
            .iter()
            .position(|v| v.account_key == *account && v.name == name);
        Ok(at.map(|at| current.remove(at)))
    }
}
