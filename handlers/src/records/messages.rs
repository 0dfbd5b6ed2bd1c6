//! Message records: every SMS and e-mail a step sent, with where it stands
//! and how it got there. Send steps record them and move them on the
//! provider's answer; providers' delivery reports (inbound webhooks) move
//! them after, by the state machine here: never back, each report once.

use serde::{Deserialize, Serialize};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

use super::RecordError;

/// The channel a message went out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// A text message.
    Sms,
    /// An e-mail.
    Email,
}

impl Channel {
    /// The name it is serialised as.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Email => "email",
        }
    }
}

/// Where a message stands. A send records `scheduled`, `pending`, `sent`,
/// `failed` or `skipped`, and `cancelled` comes from the account; the rest
/// come from providers' delivery reports (inbound webhooks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Recorded to be sent at its `scheduled_at`; it can be cancelled until
    /// then.
    Scheduled,
    /// Recorded, not yet handed to the provider.
    Pending,
    /// Handed to a provider that takes no idempotency key (Twilio), with
    /// no answer yet: before it is handed over again, the provider is asked
    /// whether it has it.
    Sending,
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
    /// Not sent: the recipient has no address for the channel (or no
    /// contact); the record's log says why.
    Skipped,
    /// Cancelled while it was scheduled: never sent.
    Cancelled,
    /// Not sent: the recipient opted out of it (an unsubscribe, a spam
    /// report, a bounce, a STOP); the record's log says which.
    Suppressed,
}

impl MessageStatus {
    /// How far along a message is: a delivery report never moves a message
    /// back to a lower rank (providers post reports out of order), and
    /// reports of equal rank replace each other (a later outcome wins).
    pub fn rank(self) -> u8 {
        match self {
            MessageStatus::Scheduled | MessageStatus::Pending | MessageStatus::Sending => 0,
            MessageStatus::Sent => 1,
            MessageStatus::Deferred => 2,
            MessageStatus::Delivered
            | MessageStatus::Failed
            | MessageStatus::Bounced
            | MessageStatus::Undelivered
            | MessageStatus::Dropped
            | MessageStatus::Skipped
            | MessageStatus::Cancelled
            | MessageStatus::Suppressed => 3,
            MessageStatus::Opened => 4,
            MessageStatus::Clicked => 5,
            MessageStatus::SpamReported | MessageStatus::Unsubscribed => 6,
        }
    }

    /// The name it is serialised as.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Scheduled => "scheduled",
            MessageStatus::Pending => "pending",
            MessageStatus::Sending => "sending",
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
            MessageStatus::Skipped => "skipped",
            MessageStatus::Cancelled => "cancelled",
            MessageStatus::Suppressed => "suppressed",
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
    /// The provider's id of the send it is about: the one a send step's
    /// answer gave, or the one a report names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    /// That report as the provider posted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

impl Transition {
    /// Whether this is a delivery report that may be about the send the
    /// provider answered with `remote_id`: a report naming another send
    /// (the one a replay repeats) says nothing of this one.
    fn reports_on(&self, remote_id: Option<&str>) -> bool {
        self.source.is_some()
            && !matches!((self.remote_id.as_deref(), remote_id), (Some(a), Some(b)) if a != b)
    }
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
    /// Who it was sent from (a number, an address), when the step or the
    /// provider named one: a reply to it is matched by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
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
    /// The rendered HTML part of an e-mail, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// The message template it was rendered from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    /// When it is to be sent, for a message recorded `scheduled`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub scheduled_at: Option<OffsetDateTime>,
    /// When the provider accepted it: it first became `sent`, or its send
    /// step's answer came after a delivery report had moved it on.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub sent_at: Option<OffsetDateTime>,
    /// The SHA-256 (hex) of the idempotency key its template rendered for
    /// it, when it had one: which sends it held back, without the key
    /// (often an address) in the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Its bodies as recorded were cut at the deployment's cap: the cap,
    /// and the whole sizes of the parts cut (the message went whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<Cut>,
    /// The files attached to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentRef>,
}

/// A file attached to a message, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRef {
    /// The file's name.
    pub name: String,
    /// Its content type.
    pub content_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// The SHA-256 of its bytes, in hex.
    pub sha256: String,
}

/// How a message record's bodies were cut to the deployment's cap
/// (`[messages] max_body_bytes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// The cap, in bytes, of each body kept.
    pub cap: usize,
    /// The text body's whole size, when it was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_bytes: Option<usize>,
    /// The HTML body's whole size, when it was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html_bytes: Option<usize>,
}

/// A template's idempotency key as a message record keeps it: its SHA-256,
/// in hex.
pub fn hashed_key(key: &str) -> String {
    super::sha256_hex(key.as_bytes())
}

/// `text` cut to at most `cap` bytes, on a character boundary; its whole
/// size when it was cut.
fn cut_to(text: &mut String, cap: usize) -> Option<usize> {
    if text.len() <= cap {
        return None;
    }
    let whole = text.len();
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    Some(whole)
}

/// A message template and the version a message was rendered from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    /// The template's slug.
    pub slug: String,
    /// Its version.
    pub version: u64,
    /// Its category, when it has one (preferences can be per category).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
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
            sender: None,
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
            html: None,
            template: None,
            scheduled_at: None,
            sent_at: None,
            idempotency_key: None,
            cut: None,
            attachments: Vec::new(),
        }
    }

    /// The record with its bodies cut to `cap` bytes each, and the cut
    /// recorded ([`Cut`]); as it was when they fit.
    pub fn capped(mut self, cap: usize) -> Self {
        let text_bytes = cut_to(&mut self.body, cap);
        let html_bytes = self.html.as_mut().and_then(|h| cut_to(h, cap));
        if text_bytes.is_some() || html_bytes.is_some() {
            self.cut = Some(Cut {
                cap,
                text_bytes,
                html_bytes,
            });
        }
        self
    }

    /// Whether the provider still has to be asked to send it (a re-run step
    /// does not send again what was already sent).
    pub fn unsent(&self) -> bool {
        matches!(
            self.status,
            MessageStatus::Pending | MessageStatus::Sending | MessageStatus::Failed
        )
    }

    /// When the message was last handed to its provider with no answer
    /// ([`MessageStatus::Sending`]): the provider may have it since then.
    pub fn handed_over_at(&self) -> Option<OffsetDateTime> {
        if self.status != MessageStatus::Sending {
            return None;
        }
        self.transitions
            .iter()
            .rev()
            .find(|t| t.to == MessageStatus::Sending)
            .map(|t| t.at)
    }

    /// Starts the record's log: pending, sent by its chain and step, or
    /// scheduled when it has a `scheduled_at`.
    pub fn start(&mut self) {
        let (status, cause) = match self.scheduled_at {
            Some(at) => (
                MessageStatus::Scheduled,
                format!(
                    "scheduled for {} by chain {} step {}",
                    switchboard_sdk::format_rfc3339(at),
                    self.chain,
                    self.step
                ),
            ),
            None => (
                MessageStatus::Pending,
                format!("sent by chain {} step {}", self.chain, self.step),
            ),
        };
        self.status = status;
        self.transitions = vec![Transition {
            from: None,
            to: status,
            at: self.created_at,
            cause,
            source: None,
            remote_id: None,
            payload: None,
        }];
    }

    /// Moves the message to `to` as its send step decided (on the
    /// provider's answer), logging `cause`; sets `remote_id` when given.
    pub fn move_to(
        &mut self,
        to: MessageStatus,
        cause: &str,
        remote_id: Option<&str>,
        at: OffsetDateTime,
    ) {
        if let Some(remote_id) = remote_id {
            self.remote_id = Some(remote_id.to_string());
        }
        self.log(to, cause, None, at);
        if let Some(logged) = self.transitions.last_mut() {
            logged.remote_id = remote_id.map(str::to_string);
        }
    }

    /// Moves the message to `to` as its send step decided, when the step
    /// last saw the record with `seen` transitions in its log. When the
    /// step records the provider's acceptance (`to` is
    /// [`MessageStatus::Sent`]) and a delivery report logged since then,
    /// not naming another send than `remote_id`, has the message at
    /// `sent`'s rank or beyond (a fast provider can report
    /// before the step has its answer), the report's status is kept: the
    /// answer is logged beside it (from and to that status) and sets
    /// `remote_id` and `sent_at`. Anything else moves as
    /// [`MessageRecord::move_to`]: a step handing a message over (`sending`)
    /// or sending a failed one again moves it whatever a report had said
    /// before the step read it.
    pub fn answer(
        &mut self,
        seen: usize,
        to: MessageStatus,
        cause: &str,
        remote_id: Option<&str>,
        at: OffsetDateTime,
    ) {
        let reported_since = self
            .transitions
            .iter()
            .skip(seen)
            .any(|t| t.reports_on(remote_id));
        let accepted = MessageStatus::Sent;
        if to != accepted || !reported_since || self.status.rank() < accepted.rank() {
            self.move_to(to, cause, remote_id, at);
            return;
        }
        self.sent_at.get_or_insert(at);
        let kept = self.status;
        let cause =
            format!("{cause} (the step's answer, {to}; a delivery report had it {kept} already)");
        self.move_to(kept, &cause, remote_id, at);
    }

    /// What a provider's delivery `report` that the message is now `to`
    /// does to the message: nothing if the log has its source already
    /// ([`Reported::Duplicate`]), if it is about an earlier send than the
    /// latest answer's (a send step answered with the send it names, then
    /// a replay sent the message again: [`Reported::Stale`]), or if `to`
    /// would move it back ([`MessageStatus::rank`], [`Reported::Stale`]);
    /// else it moves ([`Reported::Applied`]). A report naming a send no
    /// answer gave yet may be about one under way: it moves the message.
    pub fn judge_report(&self, to: MessageStatus, report: &DeliveryReport<'_>) -> Reported {
        let earlier_send = report.remote_id.is_some_and(|named| {
            self.remote_id.as_deref() != Some(named)
                && self
                    .transitions
                    .iter()
                    .any(|t| t.source.is_none() && t.remote_id.as_deref() == Some(named))
        });
        if self
            .transitions
            .iter()
            .any(|t| t.source.as_deref() == Some(report.source))
        {
            Reported::Duplicate
        } else if earlier_send || to.rank() < self.status.rank() {
            Reported::Stale {
                current: self.status,
            }
        } else {
            Reported::Applied { from: self.status }
        }
    }

    /// Applies a delivery report as [`MessageRecord::judge_report`] says,
    /// logging `cause` and the report when it moves the message.
    pub fn apply_report(
        &mut self,
        to: MessageStatus,
        cause: &str,
        report: DeliveryReport<'_>,
        at: OffsetDateTime,
    ) -> Reported {
        let verdict = self.judge_report(to, &report);
        if let Reported::Applied { .. } = verdict {
            self.log(to, cause, Some(report), at);
        }
        verdict
    }

    fn log(
        &mut self,
        to: MessageStatus,
        cause: &str,
        report: Option<DeliveryReport<'_>>,
        at: OffsetDateTime,
    ) {
        self.transitions.push(Transition {
            from: Some(self.status),
            to,
            at,
            cause: cause.to_string(),
            source: report.map(|r| r.source.to_string()),
            remote_id: report.and_then(|r| r.remote_id).map(str::to_string),
            payload: report.and_then(|r| r.payload).cloned(),
        });
        if to == MessageStatus::Sent && self.sent_at.is_none() {
            self.sent_at = Some(at);
        }
        self.status = to;
        self.updated_at = at;
    }
}

/// A provider's delivery report, as a message record logs it.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryReport<'a> {
    /// The provider and its event id, so that a report posted twice is
    /// applied once.
    pub source: &'a str,
    /// The provider's id of the message the report is about, when it names
    /// one (SendGrid's X-Message-Id, Twilio's MessageSid): a report about
    /// an earlier send of the message is told from one about the latest.
    pub remote_id: Option<&'a str>,
    /// The report as the provider posted it.
    pub payload: Option<&'a serde_json::Value>,
}

impl<'a> DeliveryReport<'a> {
    /// A report known only by its `source`.
    pub fn new(source: &'a str) -> Self {
        Self {
            source,
            remote_id: None,
            payload: None,
        }
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

impl Reported {
    /// Whether the report moved the message.
    pub fn applied(self) -> bool {
        matches!(self, Reported::Applied { .. })
    }
}

/// Records a step's message `index` to `recipient` on `channel` (rendered
/// from `template`, if one) as skipped for `reason` (a re-run step finds it
/// so and leaves it): nothing was sent to its recipient.
pub(crate) fn record_skipped(
    messages: &dyn Messages,
    input: &crate::StepInput<'_>,
    (index, channel, template): (usize, Channel, Option<&crate::templated::TemplateUse>),
    (recipient, provider): (String, String),
    reason: &str,
) -> Result<MessageRecord, crate::StepError> {
    let failed =
        |e: RecordError| crate::StepError::retryable(format!("recording the message: {e}"), None);
    let message = MessageRecord {
        template: template.map(crate::templated::TemplateUse::reference),
        ..MessageRecord::for_step(
            input,
            index,
            channel,
            recipient,
            String::new(),
            None,
            provider,
        )
    };
    let record = messages.record(message).map_err(failed)?;
    // A fresh record is pending; one scheduled by the step's first run
    // (whose recipient is now skipped: a contact gone, a key claimed) is
    // skipped too, unless it was cancelled meanwhile.
    if !matches!(
        record.status,
        MessageStatus::Pending | MessageStatus::Scheduled
    ) {
        return Ok(record);
    }
    Ok(messages
        .transition_from(
            &record.account_key,
            &record.id,
            record.status,
            MessageStatus::Skipped,
            reason,
        )
        .map_err(failed)?
        .map_or(record, |(m, _)| m))
}

/// Message records of every account.
pub trait Messages: Send + Sync + std::fmt::Debug {
    /// Records a new message as pending ([`MessageRecord::start`]); a record
    /// with the same id (a re-run step) is returned as it is.
    fn record(&self, message: MessageRecord) -> Result<MessageRecord, RecordError>;

    /// Moves message `id` to `to` ([`MessageRecord::move_to`]); sets
    /// `remote_id` when given, and from then on the message is found by it
    /// ([`Messages::find_by_remote_id`]). `None` when the account has no
    /// such message.
    fn transition(
        &self,
        account: &AccountKey,
        id: &str,
        to: MessageStatus,
        cause: &str,
        remote_id: Option<String>,
    ) -> Result<Option<MessageRecord>, RecordError>;

    /// A send step's move of a message it holds as it last saw it written
    /// (`known`: as [`Messages::record`] or a transition returned it) to
    /// `to` ([`MessageRecord::answer`]): when `to` is the provider's
    /// acceptance (`sent`), a delivery report applied since `known` that
    /// has the message at `sent`'s rank or beyond is kept. A store may try
    /// the write against `known`
    /// first, without reading the record back, and read it only if it
    /// changed meanwhile. `None` when the account has no such message.
    fn transition_known(
        &self,
        known: &MessageRecord,
        to: MessageStatus,
        cause: &str,
        remote_id: Option<String>,
    ) -> Result<Option<MessageRecord>, RecordError>;

    /// Moves message `id` to `to` only if it is `from` now, logging
    /// `cause`: of a scheduled message falling due and its cancellation,
    /// exactly one happens. The record as it is after, and whether it
    /// moved; `None` when the account has no such message.
    fn transition_from(
        &self,
        account: &AccountKey,
        id: &str,
        from: MessageStatus,
        to: MessageStatus,
        cause: &str,
    ) -> Result<Option<(MessageRecord, bool)>, RecordError>;

    /// Applies a provider's delivery report that message `id` is now
    /// `moved.0`, because of `moved.1` ([`MessageRecord::apply_report`]).
    /// `None` when the account has no such message.
    fn report(
        &self,
        account: &AccountKey,
        id: &str,
        moved: (MessageStatus, &str),
        report: DeliveryReport<'_>,
    ) -> Result<Option<(MessageRecord, Reported)>, RecordError>;

    /// Removes the messages last changed before `before` that are done (not
    /// scheduled, pending or sending), with their remote-id entries: the
    /// retention of message records. How many were removed.
    fn expire(
        &self,
        before: OffsetDateTime,
    ) -> Result<usize, Box<dyn std::error::Error + Send + Sync>>;

    /// The message of `account` sent on `channel` that the provider knows as
    /// `remote_id`.
    fn find_by_remote_id(
        &self,
        account: &AccountKey,
        channel: Channel,
        remote_id: &str,
    ) -> Result<Option<MessageRecord>, RecordError>;

    /// The message `id` of `account`.
    fn get(&self, account: &AccountKey, id: &str) -> Result<Option<MessageRecord>, RecordError>;

    /// The latest message of `account` sent (it became `sent`) on
    /// `channel` to `recipient` from `sender` (`None`: from no sender named,
    /// a messaging service's pool): what a reply from `recipient` to
    /// `sender` answers.
    fn latest_sent(
        &self,
        account: &AccountKey,
        channel: Channel,
        recipient: &str,
        sender: Option<&str>,
    ) -> Result<Option<MessageRecord>, RecordError>;

    /// The `limit` newest messages of `account` (by when they were
    /// made), newest first.
    fn list(&self, account: &AccountKey, limit: usize) -> Result<Vec<MessageRecord>, RecordError>;

    /// Makes every change to `account`'s messages so far durable: before
    /// an effect that must not be repeated on the strength of a change lost
    /// in a crash (a message marked `sending`).
    fn flush<'a>(
        &'a self,
        account: &'a AccountKey,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RecordError>> + Send + 'a>>;
}

#[cfg(test)]
mod tests {
    use super::MessageStatus::*;
    use super::*;

    fn message(status: MessageStatus, sources: &[&str]) -> MessageRecord {
        let now = switchboard_sdk::now();
        let mut m = MessageRecord {
            id: "m-1".into(),
            account_key: AccountKey::new("acme").unwrap(),
            channel: Channel::Sms,
            recipient: "+27820000001".into(),
            sender: None,
            body: "hi".into(),
            subject: None,
            provider: "twilio".into(),
            remote_id: None,
            status: Pending,
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
        };
        m.start();
        for source in sources {
            m.log(status, "earlier", Some(DeliveryReport::new(source)), now);
        }
        m.status = status;
        m
    }

    /// A report that the message (at `status`, with reports `seen`) is now
    /// `to`, from `source`.
    fn check_report(
        (status, seen): (MessageStatus, &[&str]),
        (to, source): (MessageStatus, &str),
        expected: Reported,
    ) {
        let mut m = message(status, seen);
        let before = m.clone();
        let verdict = m.apply_report(
            to,
            "report",
            DeliveryReport::new(source),
            switchboard_sdk::now(),
        );
        assert_eq!(verdict, expected, "{status} + {to} from {source}");
        if verdict.applied() {
            assert_eq!(m.status, to);
            let last = m.transitions.last().unwrap();
            assert_eq!(
                (last.from, last.to, last.source.as_deref()),
                (Some(status), to, Some(source))
            );
        } else {
            assert_eq!(m, before, "a report not applied changes nothing");
        }
    }

    #[test]
    fn delivery_reports_apply_once_and_never_move_a_message_back() {
        check_report(
            (Sent, &[]),
            (Delivered, "t:1"),
            Reported::Applied { from: Sent },
        );
        // The same report posted again.
        check_report(
            (Delivered, &["t:1"]),
            (Delivered, "t:1"),
            Reported::Duplicate,
        );
        // Out of order: `sent` after `delivered` is stale.
        check_report(
            (Delivered, &["t:1"]),
            (Sent, "t:0"),
            Reported::Stale { current: Delivered },
        );
        check_report(
            (Opened, &[]),
            (Deferred, "sg:2"),
            Reported::Stale { current: Opened },
        );
        // Equal ranks replace each other: a later outcome wins.
        check_report(
            (Delivered, &[]),
            (Bounced, "sg:3"),
            Reported::Applied { from: Delivered },
        );
        // Further along is always taken, from any status.
        check_report(
            (Pending, &[]),
            (Clicked, "sg:4"),
            Reported::Applied { from: Pending },
        );
        check_report(
            (Failed, &[]),
            (Unsubscribed, "sg:5"),
            Reported::Applied { from: Failed },
        );
    }

    #[test]
    fn statuses_rank_by_how_far_along_they_are() {
        let ranks: Vec<(MessageStatus, u8)> = [
            Pending,
            Sent,
            Deferred,
            Delivered,
            Failed,
            Bounced,
            Undelivered,
            Dropped,
            Opened,
            Clicked,
            SpamReported,
            Unsubscribed,
        ]
        .into_iter()
        .map(|s| (s, s.rank()))
        .collect();
        assert_eq!(
            ranks,
            [
                (Pending, 0),
                (Sent, 1),
                (Deferred, 2),
                (Delivered, 3),
                (Failed, 3),
                (Bounced, 3),
                (Undelivered, 3),
                (Dropped, 3),
                (Opened, 4),
                (Clicked, 5),
                (SpamReported, 6),
                (Unsubscribed, 6),
            ]
        );
    }

    #[test]
    fn statuses_keep_the_names_they_are_stored_by() {
        let names: Vec<String> = [Pending, Sent, Delivered, Failed, Bounced, SpamReported]
            .iter()
            .map(|s| {
                let stored = serde_json::to_value(s).unwrap();
                assert_eq!(stored, s.as_str(), "{s:?}");
                s.to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "pending",
                "sent",
                "delivered",
                "failed",
                "bounced",
                "spam_reported"
            ]
        );
    }

    #[test]
    fn bodies_over_the_cap_are_cut_on_a_character_and_the_cut_recorded() {
        let whole = MessageRecord {
            body: "héllo wörld".into(),
            html: Some("<p>short</p>".into()),
            ..message(Pending, &[])
        };
        // Byte 2 falls inside "é": the text is cut before it.
        let cut = whole.clone().capped(2);
        assert_eq!(cut.body, "h");
        assert_eq!(cut.html.as_deref(), Some("<p"));
        assert_eq!(
            cut.cut,
            Some(Cut {
                cap: 2,
                text_bytes: Some("héllo wörld".len()),
                html_bytes: Some("<p>short</p>".len()),
            })
        );
        // Only the part over the cap is cut, and said to be.
        let cut = whole.clone().capped(12);
        assert_eq!(cut.body, "héllo wörl");
        assert_eq!(cut.html.as_deref(), Some("<p>short</p>"));
        assert_eq!(cut.cut.as_ref().and_then(|c| c.html_bytes), None);
        assert_eq!(
            whole.clone().capped(1024),
            whole,
            "within the cap: as it was"
        );
        assert_eq!(hashed_key("k").len(), 64);
    }

    #[test]
    fn a_send_step_logs_each_move() {
        let mut m = message(Pending, &[]);
        let at = switchboard_sdk::now();
        m.move_to(Sent, "accepted", Some("SM1"), at);
        m.move_to(Failed, "refused", None, at);
        assert_eq!(m.remote_id.as_deref(), Some("SM1"));
        let path: Vec<_> = m
            .transitions
            .iter()
            .map(|t| (t.from, t.to, t.cause.as_str()))
            .collect();
        assert_eq!(
            path,
            [
                (None, Pending, "sent by chain c step s"),
                (Some(Pending), Sent, "accepted"),
                (Some(Sent), Failed, "refused"),
            ]
        );
        assert_eq!(m.updated_at, at);
        assert_eq!(m.sent_at, Some(at), "when it was first sent");
    }

    /// A send step's answer against what a delivery report did since the
    /// step last saw the record: (reports since, the step's move) → the
    /// status after.
    #[test]
    fn a_send_steps_answer_keeps_a_report_that_came_first() {
        let at = switchboard_sdk::now();
        let cases: &[(&[MessageStatus], MessageStatus, MessageStatus)] = &[
            // Nothing came in between: the step moves it.
            (&[], Sent, Sent),
            (&[], Sending, Sending),
            // The step's own moves before an answer stand.
            (&[Delivered], Sending, Sending),
            // A fast provider reported before the step recorded its answer.
            (&[Delivered], Sent, Delivered),
            (&[Delivered, Opened], Sent, Opened),
            (&[Deferred], Sent, Deferred),
            (&[Sent], Sent, Sent),
            // A failure the step decided stands.
            (&[Sent], Failed, Failed),
            (&[Delivered], Failed, Failed),
        ];
        for &(reports, to, expected) in cases {
            let mut m = message(Pending, &[]);
            let seen = m.transitions.len();
            for (i, &report) in reports.iter().enumerate() {
                let source = format!("t:{i}");
                m.apply_report(report, "report", DeliveryReport::new(&source), at);
            }
            m.answer(seen, to, "accepted", Some("SM1"), at);
            let case = format!("{reports:?} then the step's {to:?}");
            assert_eq!(m.status, expected, "{case}");
            assert_eq!(m.remote_id.as_deref(), Some("SM1"), "{case}");
            let sent = to == Sent || reports.contains(&Sent);
            assert_eq!(m.sent_at.is_some(), sent, "{case}");
            let last = m.transitions.last().unwrap();
            assert_eq!(
                (last.from, last.to),
                (Some(*reports.last().unwrap_or(&Pending)), expected),
                "{case}"
            );
            assert!(last.cause.starts_with("accepted"), "{case}: {}", last.cause);
        }

        // A step that sends again a message a report had failed (a replay)
        // saw that report: its answer moves the message on.
        let mut m = message(Pending, &[]);
        m.apply_report(Failed, "report", DeliveryReport::new("t:1"), at);
        let seen = m.transitions.len();
        m.answer(seen, Sent, "accepted", None, at);
        assert_eq!(m.status, Sent);

        // A report that names the message as the provider knows it counts
        // only when it is this send's answer: a late report on the send a
        // replay repeats (SM0) says nothing of the new one (SM1).
        for (named, expected) in [
            (Some("SM1"), Delivered),
            (Some("SM0"), Sent),
            (None, Delivered),
        ] {
            let mut m = message(Pending, &[]);
            let seen = m.transitions.len();
            let report = DeliveryReport {
                remote_id: named,
                ..DeliveryReport::new("t:1")
            };
            m.apply_report(Delivered, "report", report, at);
            assert_eq!(m.transitions.last().unwrap().remote_id.as_deref(), named);
            m.answer(seen, Sent, "accepted", Some("SM1"), at);
            assert_eq!(m.status, expected, "a report on {named:?}");
            assert_eq!(m.remote_id.as_deref(), Some("SM1"));
        }
    }

    /// A report on an earlier send of a message sent again (a replay) is
    /// stale, whenever it comes: it leaves the status of the latest send.
    /// One naming a send no answer gave yet may be about one under way.
    #[test]
    fn a_report_on_an_earlier_send_is_stale() {
        let at = switchboard_sdk::now();
        let on = |remote_id: &'static str, source: &'static str| DeliveryReport {
            remote_id: Some(remote_id),
            ..DeliveryReport::new(source)
        };
        let mut m = message(Pending, &[]);
        m.move_to(Sent, "accepted", Some("SM0"), at);
        m.apply_report(Failed, "report", on("SM0", "t:1"), at);
        // The replay sends it again.
        let seen = m.transitions.len();
        m.answer(seen, Sent, "accepted", Some("SM1"), at);
        assert_eq!((m.status, m.remote_id.as_deref()), (Sent, Some("SM1")));
        assert_eq!(
            m.apply_report(Delivered, "report", on("SM0", "t:2"), at),
            Reported::Stale { current: Sent }
        );
        assert_eq!(m.status, Sent);
        assert_eq!(
            m.apply_report(Delivered, "report", on("SM1", "t:3"), at),
            Reported::Applied { from: Sent }
        );
        assert_eq!(
            m.apply_report(Bounced, "report", on("SM0", "t:4"), at),
            Reported::Stale { current: Delivered }
        );
        assert_eq!(m.status, Delivered);
        assert_eq!(
            m.apply_report(Opened, "report", on("SM2", "t:5"), at),
            Reported::Applied { from: Delivered }
        );
        assert_eq!(
            m.apply_report(Clicked, "report", DeliveryReport::new("t:6"), at),
            Reported::Applied { from: Opened }
        );
    }
}
