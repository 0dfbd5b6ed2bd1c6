//! The in-app inbox: notifications a chain's `notify` step leaves for a
//! person (a receiver: a contact's key, or the account's own id for that
//! person), each with its content — plain text, Markdown (kept with its
//! HTML, rendered and sanitised here), or an action with a link — a
//! category, and its read and archived state.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

use super::{Contact, RecordError};

/// The largest body or title, in bytes.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// What a notification says, by its `content_type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "content_type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Content {
    /// Plain text.
    Text {
        /// The text.
        body: String,
    },
    /// Markdown (CommonMark), with the HTML it renders to, sanitised: no
    /// raw HTML, no scripts, no `javascript:` links.
    Markdown {
        /// The Markdown as given.
        body: String,
        /// Its HTML, safe to put in a page.
        html: String,
    },
    /// A call to act: a title, a text and a link (http or https).
    UrlAction {
        /// The title.
        title: String,
        /// The text.
        body: String,
        /// Where the action goes.
        url: String,
        /// The button's label.
        action_label: String,
    },
}

/// The content types, as `content_type` names them.
pub const CONTENT_TYPES: [&str; 3] = ["text", "markdown", "url_action"];

/// The content a `notify` step's (rendered) config gives: `content_type`
/// (`text` by default) and its fields. A missing or bad field is an error
/// naming it.
pub fn content_of(config: &Map<String, Value>) -> Result<Content, String> {
    let field = |name: &str| -> Result<String, String> {
        match config.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                if s.len() > MAX_TEXT_BYTES {
                    Err(format!(
                        "config.{name}: {} bytes, over the {MAX_TEXT_BYTES} a notification takes",
                        s.len()
                    ))
                } else {
                    Ok(s.clone())
                }
            }
            Some(Value::String(_)) | None => {
                Err(format!("config.{name}: required for this content_type"))
            }
            Some(other) => Err(format!("config.{name}: must be text, not {other}")),
        }
    };
    let content_type = match config.get("content_type") {
        None => "text",
        Some(Value::String(t)) => t.as_str(),
        Some(other) => return Err(format!("config.content_type: must be text, not {other}")),
    };
    match content_type {
        "text" => Ok(Content::Text {
            body: field("body")?,
        }),
        "markdown" => {
            let body = field("body")?;
            let html = markdown_html(&body);
            Ok(Content::Markdown { body, html })
        }
        "url_action" => {
            let url = field("url")?;
            check_action_url(&url).map_err(|e| format!("config.url: {e}"))?;
            Ok(Content::UrlAction {
                title: field("title")?,
                body: field("body")?,
                url,
                action_label: field("action_label")?,
            })
        }
        other => Err(format!(
            "config.content_type: {other:?} is not one of {}",
            CONTENT_TYPES.join(", ")
        )),
    }
}

/// An action's link: an absolute http or https URL with a host.
pub fn check_action_url(url: &str) -> Result<(), String> {
    let refused = || {
        format!(
            "{url:?} is not an http or https link (javascript:, data: and other schemes are \
             refused)"
        )
    };
    // Written out in full: the URL standard reads `https:evil` as a host.
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(refused());
    }
    let parsed = url::Url::parse(url).map_err(|_| refused())?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        _ => Err(refused()),
    }
}

/// A notification's `category` or `sender`: at most 128 characters, no
/// control characters.
pub fn check_label(label: &str) -> Result<(), String> {
    if label.chars().count() > 128 || label.chars().any(char::is_control) {
        Err(format!(
            "{label:?}: at most 128 characters, and no control characters"
        ))
    } else {
        Ok(())
    }
}

/// Markdown as sanitised HTML: CommonMark rendered without the raw HTML it
/// holds, then cleaned by an allow-list sanitiser all the same (no
/// `script`, no event attributes, links only to http, https and mailto).
pub fn markdown_html(markdown: &str) -> String {
    use pulldown_cmark::Event;
    // Raw HTML in the Markdown is dropped, not passed through.
    let parser = pulldown_cmark::Parser::new_ext(markdown, pulldown_cmark::Options::empty())
        .filter(|event| !matches!(event, Event::Html(_) | Event::InlineHtml(_)));
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, parser);
    // No images (a picture from elsewhere is a tracking pixel, one from
    // here a request in the reader's name) and no relative links.
    ammonia::Builder::default()
        .url_schemes(["http", "https", "mailto"].into())
        .url_relative(ammonia::UrlRelative::Deny)
        .rm_tags(["img"])
        .link_rel(Some("noopener noreferrer"))
        .clean(&html)
        .to_string()
}

/// Receivers: `^[A-Za-z0-9_.:@+-]{1,128}$` (a contact's key, an e-mail,
/// the account's own user id).
pub fn check_receiver(receiver: &str) -> Result<(), String> {
    if !receiver.is_empty()
        && receiver.len() <= 128
        && receiver.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'+' | b'-')
        })
    {
        Ok(())
    } else {
        Err(format!(
            "{receiver:?} is not a receiver: use 1 to 128 of A-Z a-z 0-9 _ . : @ + -"
        ))
    }
}

/// Whom a `notify` step is for: `to` names one receiver, or is a table
/// for a broadcast to the account's contacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// One receiver.
    One(String),
    /// Every contact (`{ all = true }`).
    All,
    /// Every contact whose `field` is `equals` (`{ field = "language",
    /// equals = "fr" }`): `msisdn`, `email`, `name`, `language`, or one of
    /// the contact's own fields.
    Where {
        /// The field.
        field: String,
        /// Its value, as text (a number or a boolean as written).
        equals: String,
    },
}

impl Audience {
    /// The broadcast a `to` table asks for.
    pub fn of_table(table: &Map<String, Value>) -> Result<Self, String> {
        let shape = "a broadcast's `to` is { all = true } or { field = NAME, equals = VALUE }";
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        match keys.as_slice() {
            ["all"] => match table["all"] {
                Value::Bool(true) => Ok(Audience::All),
                _ => Err(format!("all must be true ({shape})")),
            },
            ["equals", "field"] => {
                let field = match &table["field"] {
                    Value::String(f) if !f.trim().is_empty() => f.clone(),
                    _ => return Err(format!("field must name a contact field ({shape})")),
                };
                check_label(&field).map_err(|e| format!("field {e}"))?;
                let equals = scalar_text(&table["equals"]).ok_or_else(|| {
                    format!("equals must be text, a number or a boolean ({shape})")
                })?;
                Ok(Audience::Where { field, equals })
            }
            _ => Err(format!(
                "{} ({shape})",
                serde_json::Value::Object(table.clone())
            )),
        }
    }

    /// Whether `contact` is one of the audience.
    pub fn admits(&self, contact: &Contact) -> bool {
        match self {
            Audience::One(receiver) => contact.key == *receiver,
            Audience::All => true,
            Audience::Where { field, equals } => {
                let value = match field.as_str() {
                    "key" => Some(contact.key.clone()),
                    "msisdn" => contact.msisdn.clone(),
                    "email" => contact.email.clone(),
                    "name" => contact.name.clone(),
                    "language" => contact.language.clone(),
                    other => contact.fields.get(other).and_then(scalar_text),
                };
                value.as_deref() == Some(equals.as_str())
            }
        }
    }
}

/// A string, number or boolean as text.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The id of a broadcast's notification to one contact: the same for the
/// same step and contact however often the step runs, whatever other
/// contacts came or went meanwhile (a UUID-shaped digest of both).
pub fn broadcast_id(step: &str, contact_key: &str) -> String {
    let hex = super::sha256_hex(format!("{step}\0{contact_key}").as_bytes());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// Its id (stable for the event, chain and step: a re-run step finds it).
    pub id: String,
    /// The account.
    pub account_key: AccountKey,
    /// Whom it is for.
    pub receiver: String,
    /// Its category (`basic` unless the step says).
    pub category: String,
    /// Who it is from, when the step says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// What it says.
    pub content: Content,
    /// The event that made it.
    pub event_id: String,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When its receiver read it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub read_at: Option<OffsetDateTime>,
    /// When its receiver archived it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub archived_at: Option<OffsetDateTime>,
}

impl Notification {
    /// Its place in its receiver's inbox.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            // Microseconds: a chain's notifications to one person, a step
            // apart, keep the order they were left in.
            micros: (self.created_at.unix_timestamp_nanos() / 1_000).max(0) as u64,
            id: self.id.clone(),
        }
    }
}

/// A place in a receiver's inbox, which is ordered by when each
/// notification was made, then by id: `{micros}.{id}` as text (the keyset
/// of a page, and a live stream's event ids).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// When the notification was made, in microseconds since 1970.
    pub micros: u64,
    /// Its id.
    pub id: String,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.micros, self.id)
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{:?} is not a place in an inbox: use a `next` of a listing, or an event id of \
                 the stream",
                text.chars().take(80).collect::<String>()
            )
        };
        let (micros, id) = text.split_once('.').ok_or_else(bad)?;
        let micros = micros.parse().map_err(|_| bad())?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad());
        }
        Ok(Cursor {
            micros,
            id: id.to_string(),
        })
    }
}

/// Which of a receiver's notifications a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboxFilter {
    /// Only unread ones (`Some(true)`) or only read ones (`Some(false)`).
    pub unread: Option<bool>,
    /// Only those of this category.
    pub category: Option<String>,
    /// Only archived ones when set; otherwise only those not archived.
    pub archived: bool,
}

impl InboxFilter {
    /// Whether `n` is shown.
    pub fn admits(&self, n: &Notification) -> bool {
        n.archived_at.is_some() == self.archived
            && self.unread.is_none_or(|u| n.read_at.is_none() == u)
            && self.category.as_deref().is_none_or(|c| n.category == c)
    }
}

/// A page of a receiver's notifications, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    /// The notifications.
    pub notifications: Vec<Notification>,
    /// Where the next page begins, when there may be more.
    pub next: Option<Cursor>,
}

/// A change a receiver (or the account, for one) makes to a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Read now.
    Read,
    /// Not read after all.
    Unread,
    /// Put away: out of the listing and the counts, kept.
    Archive,
    /// Back from the archive.
    Unarchive,
}

impl Mark {
    /// Makes the change to `n` at `now`; whether anything changed (reading
    /// what was read keeps the first time it was).
    pub fn apply(self, n: &mut Notification, now: OffsetDateTime) -> bool {
        let (field, set) = match self {
            Mark::Read => (&mut n.read_at, true),
            Mark::Unread => (&mut n.read_at, false),
            Mark::Archive => (&mut n.archived_at, true),
            Mark::Unarchive => (&mut n.archived_at, false),
        };
        match (field.is_some(), set) {
            (false, true) => *field = Some(now),
            (true, false) => *field = None,
            _ => return false,
        }
        true
    }
}

/// A receiver's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxCount {
    /// Not read and not archived.
    pub unread: u64,
    /// Not archived.
    pub total: u64,
}

impl InboxCount {
    /// The counts of `notifications`.
    pub fn of<'a>(notifications: impl IntoIterator<Item = &'a Notification>) -> Self {
        let mut count = InboxCount {
            unread: 0,
            total: 0,
        };
        for n in notifications {
            if n.archived_at.is_none() {
                count.total += 1;
                if n.read_at.is_none() {
                    count.unread += 1;
                }
            }
        }
        count
    }
}

/// How long inboxes keep what they hold (`[inbox]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxPolicy {
    /// A notification read this long after it was made is removed
    /// (`"30d"`); unread ones stay, up to the cap.
    #[serde(with = "switchboard_rules::duration")]
    pub read_retention: std::time::Duration,
    /// The most a receiver keeps: beyond it the oldest go, read or not.
    pub max_per_receiver: usize,
    /// The most live streams a receiver may have open on one dispatcher
    /// (its tabs and devices); one more is refused.
    pub max_streams_per_receiver: usize,
}

impl Default for InboxPolicy {
    fn default() -> Self {
        Self {
            read_retention: std::time::Duration::from_secs(30 * 86400),
            max_per_receiver: 1_000,
            max_streams_per_receiver: 10,
        }
    }
}

impl InboxPolicy {
    /// Which of one receiver's notifications (newest first) housekeeping
    /// removes at `now`: every one past the cap, and each read one made
    /// more than the retention ago. Their positions.
    pub fn to_remove(&self, newest_first: &[Notification], now: OffsetDateTime) -> Vec<usize> {
        let cut = now - self.read_retention;
        newest_first
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                *i >= self.max_per_receiver || (n.read_at.is_some() && n.created_at < cut)
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// The inboxes of every account.
pub trait Inbox: Send + Sync + std::fmt::Debug {
    /// Leaves `notification` in its receiver's inbox; one with the same id
    /// (a re-run step) is returned as it is. Whether it was left now.
    fn place(&self, notification: Notification) -> Result<(Notification, bool), RecordError>;

    /// [`Inbox::place`], without saying whether it was left now.
    fn deliver(&self, notification: Notification) -> Result<Notification, RecordError> {
        self.place(notification).map(|(n, _)| n)
    }

    /// The place of `receiver`'s newest notification, archived or not.
    fn newest(&self, account: &AccountKey, receiver: &str) -> Result<Option<Cursor>, RecordError>;

    /// Up to `limit` of `receiver`'s notifications that `filter` admits,
    /// newest first, from just before `before` (from the newest when
    /// `None`).
    fn page(
        &self,
        account: &AccountKey,
        receiver: &str,
        filter: &InboxFilter,
        before: Option<&Cursor>,
        limit: usize,
    ) -> Result<InboxPage, RecordError>;

    /// Up to `limit` of `receiver`'s notifications made after `after`,
    /// oldest first, archived or not (what a stream resuming there missed).
    fn after(
        &self,
        account: &AccountKey,
        receiver: &str,
        after: &Cursor,
        limit: usize,
    ) -> Result<Vec<Notification>, RecordError>;

    /// `receiver`'s counts.
    fn count(&self, account: &AccountKey, receiver: &str) -> Result<InboxCount, RecordError>;

    /// Makes `mark` to `receiver`'s notification `id`; `None` when
    /// `receiver` has no such notification (another receiver's answers
    /// the same).
    fn mark(
        &self,
        account: &AccountKey,
        receiver: &str,
        id: &str,
        mark: Mark,
    ) -> Result<Option<Notification>, RecordError>;

    /// Marks every unread notification of `receiver` (of `category` only,
    /// when given) read; how many it marked.
    fn read_all(
        &self,
        account: &AccountKey,
        receiver: &str,
        category: Option<&str>,
    ) -> Result<u64, RecordError>;

    /// Housekeeping over every inbox this process writes: removes what
    /// `policy` says goes at `now` ([`InboxPolicy::to_remove`]). How many
    /// it removed.
    fn expire(
        &self,
        policy: &InboxPolicy,
        now: OffsetDateTime,
    ) -> Result<usize, Box<dyn std::error::Error + Send + Sync>>;

    /// Makes every notification of `account` delivered so far durable (a
    /// broadcast's progress, a batch at a time).
    fn flush<'a>(
        &'a self,
        account: &'a AccountKey,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RecordError>> + Send + 'a>>;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn content(config: Value) -> Result<Content, String> {
        content_of(config.as_object().unwrap())
    }

    #[test]
    fn each_content_type_takes_its_fields() {
        assert_eq!(
            content(json!({"body": "hi"})),
            Ok(Content::Text { body: "hi".into() })
        );
        let action = content(json!({"content_type": "url_action", "title": "Pay",
            "body": "Your bill", "url": "https://acme.example/pay", "action_label": "Pay now"}));
        assert!(
            matches!(action, Ok(Content::UrlAction { .. })),
            "{action:?}"
        );
        for (config, error) in [
            (json!({"content_type": "text"}), "config.body: required"),
            (
                json!({"content_type": "url_action", "title": "t", "body": "b", "action_label": "a"}),
                "config.url: required",
            ),
            (
                json!({"content_type": "url_action", "title": "t", "body": "b", "url": "javascript:alert(1)", "action_label": "a"}),
                "config.url: \"javascript:alert(1)\" is not an http or https link",
            ),
            (
                json!({"content_type": "url_action", "title": "t", "body": "b", "url": "data:text/html,x", "action_label": "a"}),
                "is not an http or https link",
            ),
            (
                json!({"content_type": "url_action", "title": "t", "body": "b", "url": "https:evil", "action_label": "a"}),
                "is not an http or https link",
            ),
            (
                json!({"content_type": "url_action", "title": "t", "body": "b", "url": "https://", "action_label": "a"}),
                "is not an http or https link",
            ),
            (
                json!({"content_type": "video", "body": "b"}),
                "config.content_type: \"video\" is not one of text, markdown, url_action",
            ),
            (
                json!({"body": "x".repeat(MAX_TEXT_BYTES + 1)}),
                "over the 16384 a notification takes",
            ),
        ] {
            let got = content(config.clone()).unwrap_err();
            assert!(got.contains(error), "{config}: {got}");
        }
    }

    #[test]
    fn markdown_is_rendered_and_nothing_in_it_runs() {
        let html = markdown_html(
            "**Hi** [site](https://acme.example) [bad](javascript:alert(1))\n\n\
             <script>alert(1)</script><img src=x onerror=\"alert(1)\"><b onclick=\"x()\">b</b>",
        );
        assert!(html.contains("<strong>Hi</strong>"), "{html}");
        assert!(html.contains("href=\"https://acme.example\""), "{html}");
        // Nor does anything leave for elsewhere unasked.
        let html = format!(
            "{html}{}",
            markdown_html("![pixel](https://evil.example/px) [rel](/v1/x) [proto](//evil.example)")
        );
        for bad in [
            "<script",
            "javascript:",
            "onerror",
            "onclick",
            "<img",
            "<b ",
            "evil.example/px",
            "/v1/x",
            "//evil.example",
        ] {
            assert!(!html.contains(bad), "{bad} in {html}");
        }
    }

    fn note(read: bool, archived: bool, category: &str) -> Notification {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        Notification {
            id: "0192f1c0-7b1c-7000-8000-000000000001".into(),
            account_key: AccountKey::new("acme").unwrap(),
            receiver: "ann".into(),
            category: category.into(),
            sender: None,
            content: Content::Text { body: "b".into() },
            event_id: "e".into(),
            created_at: at,
            read_at: read.then_some(at),
            archived_at: archived.then_some(at),
        }
    }

    #[test]
    fn filters_marks_and_counts() {
        let unread = note(false, false, "basic");
        let read = note(true, false, "tips");
        let archived = note(false, true, "basic");
        let all = InboxFilter::default();
        for (filter, expected) in [
            (all.clone(), [true, true, false]),
            (
                InboxFilter {
                    unread: Some(true),
                    ..all.clone()
                },
                [true, false, false],
            ),
            (
                InboxFilter {
                    unread: Some(false),
                    ..all.clone()
                },
                [false, true, false],
            ),
            (
                InboxFilter {
                    category: Some("tips".into()),
                    ..all.clone()
                },
                [false, true, false],
            ),
            (
                InboxFilter {
                    archived: true,
                    ..all.clone()
                },
                [false, false, true],
            ),
        ] {
            let got = [&unread, &read, &archived].map(|n| filter.admits(n));
            assert_eq!(got, expected, "{filter:?}");
        }
        // Unread and total leave out what is archived.
        assert_eq!(
            InboxCount::of([&unread, &read, &archived]),
            InboxCount {
                unread: 1,
                total: 2
            }
        );

        let later = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let mut n = read.clone();
        // Reading again keeps when it was first read.
        assert!(!Mark::Read.apply(&mut n, later));
        assert_eq!(n.read_at, read.read_at);
        assert!(Mark::Unread.apply(&mut n, later));
        assert_eq!(n.read_at, None);
        assert!(!Mark::Unread.apply(&mut n, later));
        assert!(Mark::Archive.apply(&mut n, later));
        assert_eq!(n.archived_at, Some(later));
        assert!(Mark::Unarchive.apply(&mut n, later));
        assert_eq!(n.archived_at, None);
    }

    #[test]
    fn cursors_read_back_what_they_wrote() {
        let n = note(false, false, "basic");
        let cursor = n.cursor();
        assert_eq!(cursor.micros, 1_700_000_000_000_000);
        assert_eq!(cursor.to_string().parse::<Cursor>(), Ok(cursor.clone()));
        assert!(
            Cursor {
                micros: 2,
                id: "a".into()
            } > Cursor {
                micros: 1,
                id: "z".into()
            }
        );
        for bad in ["", "12", "x.id", "12.", "12.a b"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn audiences() {
        let table = |v: Value| Audience::of_table(v.as_object().unwrap());
        assert_eq!(table(json!({"all": true})), Ok(Audience::All));
        let french = table(json!({"field": "language", "equals": "fr"})).unwrap();
        let gold = table(json!({"field": "tier", "equals": 3})).unwrap();
        for (bad, says) in [
            (json!({"all": false}), "all must be true"),
            (json!({"all": true, "field": "x"}), "{ all = true } or"),
            (json!({"field": "", "equals": "x"}), "field must name"),
            (json!({"field": "x", "equals": [1]}), "equals must be"),
            (json!({}), "{ all = true } or"),
        ] {
            let got = table(bad.clone()).unwrap_err();
            assert!(got.contains(says), "{bad}: {got}");
        }
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let mut contact = Contact::new(AccountKey::new("acme").unwrap(), at);
        contact.language = Some("fr".into());
        contact.fields.insert("tier".into(), json!(3));
        assert!(Audience::All.admits(&contact));
        assert!(french.admits(&contact));
        assert!(gold.admits(&contact));
        contact.language = Some("en".into());
        contact.fields.insert("tier".into(), json!("3"));
        assert!(!french.admits(&contact));
        assert!(gold.admits(&contact), "3 as text or number");
        assert!(Audience::One(contact.key.clone()).admits(&contact));

        // Ids: stable per step and contact, distinct across either.
        let id = broadcast_id("step-1", "c-1");
        assert_eq!(id, broadcast_id("step-1", "c-1"));
        assert_ne!(id, broadcast_id("step-1", "c-2"));
        assert_ne!(id, broadcast_id("step-2", "c-1"));
        assert_eq!(id.len(), 36);
        assert!(format!("1.{id}").parse::<Cursor>().is_ok());
    }

    #[test]
    fn housekeeping_keeps_the_newest_and_the_unread() {
        let policy = InboxPolicy {
            read_retention: std::time::Duration::from_secs(3600),
            max_per_receiver: 3,
            ..InboxPolicy::default()
        };
        let now = OffsetDateTime::from_unix_timestamp(1_700_100_000).unwrap();
        let at = |minutes_ago: i64, read: bool| {
            let mut n = note(read, false, "basic");
            n.created_at = now - time::Duration::minutes(minutes_ago);
            n
        };
        // Newest first: a read one within the hour, a read one older, an
        // unread one older, then two past the cap.
        let inbox = [
            at(10, true),
            at(90, true),
            at(120, false),
            at(130, false),
            at(140, true),
        ];
        assert_eq!(policy.to_remove(&inbox, now), [1, 3, 4]);
        assert!(policy.to_remove(&inbox[..1], now).is_empty());
    }

    #[test]
    fn receivers_are_plain_ids() {
        for ok in [
            "0192f1c0-7b1c",
            "ann@example.org",
            "user:42",
            "+27820000001",
        ] {
            assert_eq!(check_receiver(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a b", "a/b", "<x>"] {
            assert!(check_receiver(bad).is_err(), "{bad:?}");
        }
    }
}
