//! Contacts: an account's people, each found by phone number or e-mail
//! address. `create_contact` upserts them, scripts read them with
//! `contact()`, the API lists and shows them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

use super::RecordError;

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

/// What finds a contact in its account: a phone number or an e-mail
/// address, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identifier {
    /// Phone number, E.164.
    Msisdn(String),
    /// E-mail address, lower-case.
    Email(String),
}

impl Identifier {
    /// What `msisdn_or_email` identifies: an e-mail address if it has an
    /// `@`, else a phone number; `None` when it is neither.
    pub fn parse(msisdn_or_email: &str) -> Option<Self> {
        if msisdn_or_email.contains('@') {
            normalize_email(msisdn_or_email).ok().map(Identifier::Email)
        } else {
            normalize_msisdn(msisdn_or_email)
                .ok()
                .map(Identifier::Msisdn)
        }
    }

    /// `msisdn` or `email`.
    pub fn kind(&self) -> &'static str {
        match self {
            Identifier::Msisdn(_) => "msisdn",
            Identifier::Email(_) => "email",
        }
    }

    /// The number or address.
    pub fn value(&self) -> &str {
        match self {
            Identifier::Msisdn(v) | Identifier::Email(v) => v,
        }
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
    /// The step that created it, when a step did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<StepRef>,
    /// The step that last upserted it, when a step did: the same step of
    /// the same event upserting again (run again after a crash, before its
    /// journal entry was written) finds it as it left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<StepRef>,
}

/// A step of a chain handling an event, as a contact records it: 16 hex
/// digits of a SHA-256 of the event's id, the chain and the step. Only
/// ever compared, and kept short: every contact holds two, and a
/// contact's size is what its tree's leaves copy on every write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepRef(String);

impl StepRef {
    /// Step `step` of chain `chain` handling event `event`.
    pub fn of(event: &str, chain: &str, step: &str) -> Self {
        let mut hex = super::sha256_hex(format!("{event}\0{chain}\0{step}").as_bytes());
        hex.truncate(16);
        StepRef(hex)
    }
}

/// The index entries an upsert changed: new ones to point at the contact,
/// and the ones it no longer has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reindex {
    /// Values the contact has now and did not have.
    pub added: Vec<Identifier>,
    /// Values the contact had and replaced.
    pub stale: Vec<Identifier>,
}

impl Contact {
    /// The contact as message templates see it (`recipient`): `key`,
    /// `name`, `email`, `phone`, `language` and its `fields`.
    pub fn as_recipient(&self) -> Value {
        serde_json::json!({
            "key": self.key,
            "name": self.name,
            "email": self.email,
            "phone": self.msisdn,
            "language": self.language,
            "fields": self.fields,
        })
    }

    /// A new contact of `account`, with a fresh key and nothing else yet.
    pub fn new(account: AccountKey, now: OffsetDateTime) -> Self {
        Self::with_key(account, uuid::Uuid::now_v7().to_string(), now)
    }

    /// A new contact of `account` under `key`, with nothing else yet.
    pub fn with_key(account: AccountKey, key: String, now: OffsetDateTime) -> Self {
        Self {
            key,
            account_key: account,
            msisdn: None,
            email: None,
            name: None,
            language: None,
            fields: Map::new(),
            created_at: now,
            updated_at: now,
            created_by: None,
            updated_by: None,
        }
    }

    /// Whether the contact has this number or address.
    pub fn has(&self, id: &Identifier) -> bool {
        let mine = match id {
            Identifier::Msisdn(_) => &self.msisdn,
            Identifier::Email(_) => &self.email,
        };
        mine.as_deref() == Some(id.value())
    }

    /// Gives up `id` (taken by another contact), if the contact has it.
    pub fn give_up(&mut self, id: &Identifier, now: OffsetDateTime) {
        if self.has(id) {
            match id {
                Identifier::Msisdn(_) => self.msisdn = None,
                Identifier::Email(_) => self.email = None,
            }
            self.updated_at = now;
        }
    }

    /// Applies `upsert`: its identifiers replace the contact's, its name
    /// and language are set if given, its fields merged over the existing
    /// ones. Returns the index entries that changed.
    pub fn apply(&mut self, upsert: &ContactUpsert, now: OffsetDateTime) -> Reindex {
        let mut reindex = Reindex::default();
        for (mine, theirs, id) in [
            (
                &mut self.msisdn,
                &upsert.msisdn,
                Identifier::Msisdn as fn(String) -> _,
            ),
            (&mut self.email, &upsert.email, Identifier::Email),
        ] {
            if let Some(new) = theirs
                && mine.as_ref() != Some(new)
            {
                if let Some(old) = mine.replace(new.clone()) {
                    reindex.stale.push(id(old));
                }
                reindex.added.push(id(new.clone()));
            }
        }
        if upsert.name.is_some() {
            self.name.clone_from(&upsert.name);
        }
        if upsert.language.is_some() {
            self.language.clone_from(&upsert.language);
        }
        self.fields
            .extend(upsert.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.updated_at = now;
        self.updated_by.clone_from(&upsert.by);
        reindex
    }

    /// The contact as handlers and scripts see it: every field but the
    /// account, which is theirs anyway, and the steps that wrote it.
    pub fn without_account(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(mut m)) => {
                m.remove("account_key");
                m.remove("created_by");
                m.remove("updated_by");
                m
            }
            _ => Map::new(),
        }
    }
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
    /// The step asking, if a step is: the contact records it
    /// ([`Contact::created_by`], [`Contact::updated_by`]).
    pub by: Option<StepRef>,
}

impl ContactUpsert {
    /// The identifiers to look the contact up by, in order: the number
    /// first, so that a number and an e-mail of two contacts update the
    /// number's contact (and move the e-mail to it).
    pub fn identifiers(&self) -> impl Iterator<Item = Identifier> + '_ {
        let msisdn = self.msisdn.clone().map(Identifier::Msisdn);
        let email = self.email.clone().map(Identifier::Email);
        msisdn.into_iter().chain(email)
    }
}

/// Contacts of every account.
pub trait Contacts: Send + Sync + std::fmt::Debug {
    /// Creates the contact, or updates the one with the same msisdn or
    /// e-mail ([`Contact::apply`]), so that two events for one number never
    /// make two contacts. Returns the contact and whether it was created.
    fn upsert(
        &self,
        account: &AccountKey,
        upsert: ContactUpsert,
    ) -> Result<(Contact, bool), RecordError>;

    /// The contact `key` of `account`.
    fn get(&self, account: &AccountKey, key: &str) -> Result<Option<Contact>, RecordError>;

    /// The contact of `account` with this msisdn or e-mail (normalised
    /// here, see [`Identifier::parse`]); none for a value that is neither.
    fn find(
        &self,
        account: &AccountKey,
        msisdn_or_email: &str,
    ) -> Result<Option<Contact>, RecordError>;

    /// Up to `limit` contacts of `account`, in key order (UUIDs, most of
    /// them derived from a number or an e-mail: no order a reader relies on).
    fn list(&self, account: &AccountKey, limit: usize) -> Result<Vec<Contact>, RecordError>;

    /// Up to `limit` contacts of `account` in key order, from just after
    /// the key `after` (from the first when `None`): every contact, a page
    /// at a time.
    fn list_after(
        &self,
        account: &AccountKey,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Contact>, RecordError>;

    /// The contact of `account` asked for by its key, or else by its msisdn
    /// or e-mail (how the API and the console look one up).
    fn lookup(
        &self,
        account: &AccountKey,
        key_or_identifier: &str,
    ) -> Result<Option<Contact>, RecordError> {
        match self.get(account, key_or_identifier)? {
            Some(contact) => Ok(Some(contact)),
            None => self.find(account, key_or_identifier),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A step's digest tells steps apart, whichever part differs (the
    /// parts are separated, so moving a character between them does too).
    #[test]
    fn a_step_ref_names_one_step() {
        let a = StepRef::of("e1", "welcome", "contact");
        assert_eq!(a, StepRef::of("e1", "welcome", "contact"));
        assert_eq!(a.0.len(), 16);
        assert!(a.0.bytes().all(|b| b.is_ascii_hexdigit()));
        for other in [
            StepRef::of("e2", "welcome", "contact"),
            StepRef::of("e1", "welcome2", "contact"),
            StepRef::of("e1", "welcome", "contact2"),
            StepRef::of("e1", "welcomec", "ontact"),
        ] {
            assert_ne!(a, other);
        }
    }

    fn check_msisdn(raw: &str, expected: Option<&str>) {
        assert_eq!(normalize_msisdn(raw).ok().as_deref(), expected, "{raw:?}");
    }

    #[test]
    fn msisdns_normalise_to_e164() {
        check_msisdn("+27 82 000-0001", Some("+27820000001"));
        check_msisdn("0027820000001", Some("+27820000001"));
        check_msisdn("+1 (500) 555.0006", Some("+15005550006"));
        check_msisdn("0820000001", None);
        check_msisdn("12345", None);
        check_msisdn("+0820000001", None);
        check_msisdn("+2782000000112345", None);
        check_msisdn("+27abc", None);
        check_msisdn("", None);
    }

    fn check_email(raw: &str, expected: Option<&str>) {
        assert_eq!(normalize_email(raw).ok().as_deref(), expected, "{raw:?}");
    }

    #[test]
    fn emails_normalise_to_lower_case() {
        check_email(" Thandi@Example.ORG ", Some("thandi@example.org"));
        check_email("thandi", None);
        check_email("@example.org", None);
        check_email("a@b", None);
        check_email("a b@example.org", None);
        check_email("a@example.org.", None);
        check_email("a@b@c.org", None);
    }

    fn check_identifier(raw: &str, expected: Option<Identifier>) {
        assert_eq!(Identifier::parse(raw), expected, "{raw:?}");
    }

    #[test]
    fn a_lookup_is_by_email_when_it_has_an_at_sign() {
        check_identifier(
            "T@Example.org",
            Some(Identifier::Email("t@example.org".into())),
        );
        check_identifier(
            "+27 82 000 0001",
            Some(Identifier::Msisdn("+27820000001".into())),
        );
        check_identifier("t@example", None);
        check_identifier("Thandi", None);
    }

    fn contact(msisdn: Option<&str>, email: Option<&str>) -> Contact {
        let mut c = Contact::new(AccountKey::new("acme").unwrap(), switchboard_sdk::now());
        c.msisdn = msisdn.map(str::to_string);
        c.email = email.map(str::to_string);
        c
    }

    /// Applies `upsert` to a contact with `before` (msisdn, e-mail) and
    /// checks its identifiers after and the index entries that changed.
    fn check_apply(
        before: (Option<&str>, Option<&str>),
        upsert: (Option<&str>, Option<&str>),
        after: (Option<&str>, Option<&str>),
        reindex: (&[Identifier], &[Identifier]),
    ) {
        let mut c = contact(before.0, before.1);
        let upsert = ContactUpsert {
            msisdn: upsert.0.map(str::to_string),
            email: upsert.1.map(str::to_string),
            ..ContactUpsert::default()
        };
        let changed = c.apply(&upsert, switchboard_sdk::now());
        assert_eq!((c.msisdn.as_deref(), c.email.as_deref()), after);
        assert_eq!(
            (changed.added.as_slice(), changed.stale.as_slice()),
            reindex,
            "{before:?} + {upsert:?}"
        );
    }

    #[test]
    fn an_upsert_indexes_new_values_and_drops_replaced_ones() {
        let m = |v: &str| Identifier::Msisdn(v.into());
        let e = |v: &str| Identifier::Email(v.into());
        // A new contact: everything is added.
        check_apply(
            (None, None),
            (Some("+27820000001"), Some("t@example.org")),
            (Some("+27820000001"), Some("t@example.org")),
            (&[m("+27820000001"), e("t@example.org")], &[]),
        );
        // The same values: nothing to index.
        check_apply(
            (Some("+27820000001"), None),
            (Some("+27820000001"), None),
            (Some("+27820000001"), None),
            (&[], &[]),
        );
        // An e-mail added, the number kept when not given.
        check_apply(
            (Some("+27820000001"), None),
            (None, Some("t@example.org")),
            (Some("+27820000001"), Some("t@example.org")),
            (&[e("t@example.org")], &[]),
        );
        // A new number replaces the old, whose entry is stale.
        check_apply(
            (Some("+27820000001"), Some("t@example.org")),
            (Some("+27820000002"), None),
            (Some("+27820000002"), Some("t@example.org")),
            (&[m("+27820000002")], &[m("+27820000001")]),
        );
    }

    #[test]
    fn an_upsert_sets_what_it_gives_and_merges_fields() {
        let mut c = contact(Some("+27820000001"), None);
        c.name = Some("Thandi".into());
        c.language = Some("zu".into());
        c.fields = json!({"score": 1, "team": "red"})
            .as_object()
            .unwrap()
            .clone();
        let upsert = ContactUpsert {
            language: Some("xh".into()),
            fields: json!({"score": 2}).as_object().unwrap().clone(),
            ..ContactUpsert::default()
        };
        c.apply(&upsert, switchboard_sdk::now());
        assert_eq!(c.name.as_deref(), Some("Thandi"));
        assert_eq!(c.language.as_deref(), Some("xh"));
        assert_eq!(Value::Object(c.fields), json!({"score": 2, "team": "red"}));
    }

    #[test]
    fn handlers_see_a_contact_without_its_account() {
        let c = contact(Some("+27820000001"), None);
        let seen = c.without_account();
        assert!(!seen.contains_key("account_key"));
        assert_eq!(seen["msisdn"], json!("+27820000001"));
        assert_eq!(seen["key"], json!(c.key));
    }
}
