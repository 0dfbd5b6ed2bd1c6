//! Replies: what people send to an account's numbers and addresses, as
//! `message_response` events.
//!
//! A reply is matched to its account's address ([`super::numbers`]), to
//! the contact it came from, and to the message it answers: the latest one
//! sent to its sender from the address it was sent to, within
//! [`REPLY_WINDOW`]. Its first word is its `keyword`; a text that is STOP
//! alone (or a usual synonym) opts the sender out of the account's SMS,
//! START alone opts it back in ([`Keyword`]).

use serde_json::{Map, Value, json};
use switchboard_engine::metrics::InboundResult;
use switchboard_handlers::records::{Channel, Choice, Contact, MessageRecord, RecordError, Topic};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};
use time::OffsetDateTime;

use super::{Inbound, InboundError, RecordResult, digest, numbers, parse};

/// How long after a message was sent a reply is taken to answer it.
pub const REPLY_WINDOW: time::Duration = time::Duration::days(7);

/// A message a person sent to one of an account's addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// What it came on.
    pub channel: Channel,
    /// The transport or provider that took it (`twilio`).
    pub transport: String,
    /// Who sent it (E.164 for SMS).
    pub from: String,
    /// The account's address it was sent to.
    pub to: String,
    /// What it says.
    pub text: String,
    /// Identifies it (`twilio:{sid}`): the event's id derives from it.
    pub source: String,
    /// The provider's id for it (an e-mail's `Message-ID`).
    pub remote_id: String,
    /// An e-mail's own parts.
    pub email: Option<EmailParts>,
}

/// What an e-mail reply has besides its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailParts {
    /// Its subject.
    pub subject: String,
    /// The Message-IDs it answers (`In-Reply-To`, then `References`),
    /// without their angle brackets.
    pub answers: Vec<String>,
    /// The files it carried.
    pub carried: Vec<super::parse::Carried>,
}

/// `text` with every character but ASCII letters, digits and `kept` as `_`.
fn underscored(text: &str, kept: &[char]) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || kept.contains(&c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The name file `index` (sent as `file_name`) of the reply tagged `tag`
/// is kept by: `reply-{tag}-{index}-{file name}`, each character not
/// allowed in a file name as `_`, cut to 128 bytes keeping its extension.
pub fn carried_name(tag: &str, index: usize, file_name: &str) -> String {
    let clean = underscored(file_name, &['.', '_', '-']).replace("..", "_.");
    let (stem, extension) = match clean.rsplit_once('.') {
        Some((stem, ext)) if ext.len() <= 10 => (stem.to_string(), format!(".{ext}")),
        _ => (clean.clone(), String::new()),
    };
    let prefix = format!("reply-{tag}-{index}-");
    let room = 128usize.saturating_sub(prefix.len() + extension.len());
    let stem: String = stem.chars().take(room).collect();
    format!("{prefix}{stem}{extension}")
}

/// The message ids of ours the Message-IDs `answers` may hold, in order:
/// `send_email` gives each e-mail `<{message id}@{the sender's domain}>`,
/// and message ids are UUIDs.
pub fn our_message_ids(answers: &[String]) -> Vec<&str> {
    answers
        .iter()
        .filter_map(|id| id.split_once('@').map(|(local, _)| local))
        .filter(|local| uuid::Uuid::parse_str(local).is_ok())
        .collect()
}

/// What a reply asks when it is a keyword alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    /// Stop sending: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, OPTOUT.
    Stop,
    /// Start again: START, UNSTOP.
    Start,
    /// Help: HELP, INFO.
    Help,
}

/// Which keyword `word` (upper-cased) is, if any.
fn known(word: &str) -> Option<Keyword> {
    match word {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" | "OPTOUT" => {
            Some(Keyword::Stop)
        }
        "START" | "UNSTOP" => Some(Keyword::Start),
        "HELP" | "INFO" => Some(Keyword::Help),
        _ => None,
    }
}

/// The reply's keyword and what it asks. A reply that is one keyword alone
/// (any case, punctuation around it aside) is STOP, START or HELP for its
/// synonyms, and asks it — as carriers read them, "Cancel my appointment"
/// asks nothing; any other reply's keyword is its first word, upper-cased
/// (none for an empty reply).
pub fn keyword(text: &str) -> (Option<String>, Option<Keyword>) {
    let word = |w: &str| {
        w.trim_matches(|c: char| !c.is_alphanumeric())
            .to_uppercase()
    };
    let mut words = text.split_whitespace();
    let Some(first) = words.next().map(word).filter(|w| !w.is_empty()) else {
        return (None, None);
    };
    let asked = if words.next().is_none() {
        known(&first)
    } else {
        None
    };
    let shown = match asked {
        Some(Keyword::Stop) => "STOP".to_string(),
        Some(Keyword::Start) => "START".to_string(),
        Some(Keyword::Help) => "HELP".to_string(),
        None => first,
    };
    (Some(shown), asked)
}

/// Whether `message` is what a reply received at `now` answers: sent
/// within [`REPLY_WINDOW`] before it.
pub fn answers(message: &MessageRecord, now: OffsetDateTime) -> bool {
    message
        .sent_at
        .is_some_and(|at| at <= now && now - at <= REPLY_WINDOW)
}

/// The `event_data` of a reply's `message_response` event; an e-mail's
/// `subject` and `attachments` (`files`: each stored file's description,
/// or what became of a file that was not kept) besides.
pub fn event_data(
    reply: &Reply,
    (contact, message): (Option<&Contact>, Option<&MessageRecord>),
    files: Vec<Value>,
    received_at: OffsetDateTime,
) -> Map<String, Value> {
    let (keyword, _) = keyword(&reply.text);
    let mut data = Map::new();
    data.insert("channel".into(), json!(reply.channel));
    data.insert("from".into(), json!(reply.from));
    data.insert("to".into(), json!(reply.to));
    data.insert("text".into(), json!(reply.text));
    data.insert(
        "received_at".into(),
        json!(switchboard_sdk::format_rfc3339(received_at)),
    );
    data.insert("provider".into(), json!(reply.transport));
    data.insert("remote_id".into(), json!(reply.remote_id));
    data.insert("keyword".into(), json!(keyword));
    data.insert(
        "contact".into(),
        contact.map_or(
            Value::Null,
            |c| json!({"key": c.key, "name": c.name, "msisdn": c.msisdn, "email": c.email}),
        ),
    );
    if let Some(email) = &reply.email {
        data.insert("subject".into(), json!(email.subject));
        data.insert("attachments".into(), Value::Array(files));
    }
    data.insert(
        "message".into(),
        message.map_or(Value::Null, |m| {
            json!({"id": m.id, "event_id": m.event_id, "chain": m.chain, "step": m.step,
                   "sent_at": m.sent_at.map(switchboard_sdk::format_rfc3339),
                   "template": m.template.as_ref().map(|t| &t.slug)})
        }),
    );
    data
}

/// What a reply's event holds besides its text and subject, at most
/// about: addresses, ids, the contact and the message it answers.
const REPLY_EVENT_ROOM: usize = 4 * 1024;

/// Taking replies: what [`Inbound`] does with one.
impl Inbound {
    /// Takes a reply to one of the account's addresses: matched to its
    /// contact and the message it answers, STOP and START applied to the
    /// sender's preferences, and published as a `message_response` event.
    /// `Err` (the result and the reason) when the address it was sent to is
    /// not the account's, or the event would be too large for the bus: it
    /// is kept as unmatched.
    pub(super) async fn reply(
        &self,
        account: &AccountKey,
        provider: &str,
        reply: &Reply,
    ) -> Result<Result<RecordResult, (InboundResult, String)>, InboundError> {
        let owner = self.numbers.owner(&reply.transport, &reply.to)?;
        if owner.as_ref().is_none_or(|n| n.account_key != *account) {
            return Ok(Err((
                InboundResult::UnknownAddress,
                format!(
                    "a reply to {} on {}, which is not one of account {account}'s addresses \
                 (`switchboard numbers add {account} {} {}`)",
                    reply.to, reply.transport, reply.transport, reply.to
                ),
            )));
        }
        // A reply whose text alone would make its event too large for the
        // bus changes nothing (no keyword applied, no file kept).
        let text_bytes = reply.text.len() + reply.email.as_ref().map_or(0, |e| e.subject.len());
        if text_bytes + REPLY_EVENT_ROOM > self.max_event_bytes {
            return Ok(Err((
                InboundResult::Malformed,
                format!(
                    "the reply's text is {text_bytes} bytes: its event would be over \
                     limits.max_event_bytes ({} bytes)",
                    self.max_event_bytes
                ),
            )));
        }
        let now = switchboard_sdk::now();
        let contact = self.contacts.find(account, &reply.from)?;
        let message = self.answered(account, reply, now)?;
        let files = match &reply.email {
            Some(email) => self.keep_carried(account, reply, &email.carried).await?,
            None => Vec::new(),
        };
        // Texts only: an e-mail's first word is no carrier keyword.
        if let (Channel::Sms, (_, Some(keyword @ (Keyword::Stop | Keyword::Start)))) =
            (reply.channel, keyword(&reply.text))
        {
            self.apply_keyword(account, reply, keyword == Keyword::Start, now)?;
        }
        let data = event_data(reply, (contact.as_ref(), message.as_ref()), files, now);
        // `sms-27820000001`, `email-ann_example.org`: a conversation per sender.
        let conversation = underscored(
            &format!(
                "{}-{}",
                reply.channel.as_str(),
                reply.from.trim_start_matches('+')
            ),
            &['_', '.', ':', '-'],
        )
        .chars()
        .take(128)
        .collect::<String>();
        let made = self.event(
            account,
            provider,
            &reply.source,
            ConversationKey::new(conversation)
                .unwrap_or_else(|_| ConversationKey::new("reply").expect("a valid key")),
            ConversationType::new(reply.channel.as_str()).expect("a valid type"),
            EventType::new("message_response").expect("a valid event type"),
            data,
            None,
        );
        let event = match made {
            Ok(event) => event,
            Err(reason) => return Ok(Err((InboundResult::Malformed, reason))),
        };
        self.bus.publish(&event).await?;
        tracing::info!(%account, provider, event_id = %event.id,
            answers = message.as_ref().map(|m| m.id.as_str()), "reply published");
        Ok(Ok(RecordResult {
            account_key: None,
            result: InboundResult::Matched.label().to_string(),
            message_id: message.map(|m| m.id),
            status: None,
            transition: None,
            event_id: Some(event.id.to_string()),
            unmatched_id: None,
            reason: None,
        }))
    }

    /// Takes a Vumi inbound message a transport worker published on
    /// `{prefix}.inbound.{transport}`: a reply of the account that owns its
    /// `to_addr` on `transport`. `Ok` when it is done with (published, or
    /// unusable: logged and counted, and kept a week in the stream);
    /// `Err` when it should come again (the store or the bus failed).
    pub async fn vumi(&self, transport: &str, payload: &[u8]) -> Result<(), InboundError> {
        let unusable = |why: String| {
            self.metrics.inbound(
                "vumi",
                switchboard_engine::dead_letters::UNKNOWN_ACCOUNT,
                InboundResult::Malformed,
            );
            tracing::warn!(transport, reason = %why, "a Vumi inbound message cannot be used: it stays in the stream for a week");
            Ok(())
        };
        let Ok(message) = serde_json::from_slice::<Value>(payload) else {
            return unusable("it is not JSON".into());
        };
        let field = |k: &str| message.get(k).and_then(Value::as_str).unwrap_or_default();
        if field("message_type") != "user_message" {
            return unusable(format!(
                "message_type {:?} is not user_message",
                field("message_type")
            ));
        }
        let (from, to) = match (
            numbers::normalize_address(field("from_addr")),
            numbers::normalize_address(field("to_addr")),
        ) {
            (Ok(from), Ok(to)) => (from, to),
            (Err(e), _) => return unusable(format!("from_addr: {e}")),
            (_, Err(e)) => return unusable(format!("to_addr: {e}")),
        };
        let id = field("message_id");
        if id.is_empty() {
            return unusable("it has no message_id".into());
        }
        let Some(owner) = self.numbers.owner(transport, &to)? else {
            self.metrics.inbound(
                "vumi",
                switchboard_engine::dead_letters::UNKNOWN_ACCOUNT,
                InboundResult::UnknownAddress,
            );
            tracing::warn!(
                transport,
                to,
                "a reply to an address no account owns (`switchboard numbers add ACCOUNT {transport} {to}`): it stays in the stream for a week"
            );
            return Ok(());
        };
        let reply = Reply {
            channel: Channel::Sms,
            transport: transport.to_string(),
            from,
            to,
            text: field("content").to_string(),
            source: format!("vumi:{transport}:{id}"),
            remote_id: id.to_string(),
            email: None,
        };
        let account = owner.account_key;
        match self.reply(&account, "vumi", &reply).await? {
            Ok(_) => {
                self.metrics
                    .inbound("vumi", account.as_str(), InboundResult::Matched);
            }
            Err((result, reason)) => {
                self.metrics.inbound("vumi", account.as_str(), result);
                tracing::warn!(%account, transport, %reason, "a Vumi reply was not published");
            }
        }
        self.store.flush().await?;
        Ok(())
    }

    /// Opts the sender of `reply` (a STOP or START alone) out of or back in
    /// to the account's texts — once per reply: a provider's repeat of it
    /// (a retry, a redelivery) finds it noted and changes nothing, so a
    /// STOP repeated after a later START does not undo the START.
    fn apply_keyword(
        &self,
        account: &AccountKey,
        reply: &Reply,
        subscribed: bool,
        now: OffsetDateTime,
    ) -> Result<(), RecordError> {
        let noted = uuid::Uuid::new_v4().to_string();
        let window = REPLY_WINDOW.unsigned_abs();
        let (scope, kind) = ("~replies", reply.channel.as_str());
        if !self
            .idempotency
            .claim(account, scope, kind, &reply.source, window, &noted)?
        {
            tracing::info!(%account, source = reply.source, "a repeated reply: its keyword was applied before");
            return Ok(());
        }
        let chosen = self.preferences.choose(
            account,
            (reply.channel, &reply.from),
            &Topic::All,
            Choice {
                subscribed,
                at: now,
                cause: format!(
                    "replied {} to {}",
                    if subscribed { "START" } else { "STOP" },
                    reply.to
                ),
                source: Some(reply.source.clone()),
            },
        );
        if let Err(e) = chosen {
            // Not applied: the provider's repeat must apply it.
            let _ = self
                .idempotency
                .release(account, scope, kind, &reply.source, &noted);
            return Err(e);
        }
        Ok(())
    }

    /// The message `reply` answers: an e-mail's, by our Message-ID in its
    /// `In-Reply-To` or `References`; a text's, the latest sent to its
    /// sender from the number it was sent to (or from no number named)
    /// within [`REPLY_WINDOW`].
    fn answered(
        &self,
        account: &AccountKey,
        reply: &Reply,
        now: OffsetDateTime,
    ) -> Result<Option<MessageRecord>, RecordError> {
        if let Some(email) = &reply.email {
            for id in our_message_ids(&email.answers) {
                if let Some(m) = self.messages.get(account, id)?
                    && m.channel == Channel::Email
                {
                    return Ok(Some(m));
                }
            }
            return Ok(None);
        }
        for sender in [Some(reply.to.as_str()), None] {
            if let Some(m) =
                self.messages
                    .latest_sent(account, reply.channel, &reply.from, sender)?
                && answers(&m, now)
            {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Keeps the files an e-mail reply carried as the account's files
    /// ([`carried_name`]); each one's
    /// description, or why it was not kept (a name that is not plain, a
    /// size or type the deployment does not keep, the store failing).
    async fn keep_carried(
        &self,
        account: &AccountKey,
        reply: &Reply,
        carried: &[parse::Carried],
    ) -> Result<Vec<Value>, RecordError> {
        let tag = &digest(reply.source.as_bytes())[..16];
        let mut kept = Vec::with_capacity(carried.len());
        for (i, file) in carried.iter().enumerate() {
            let name = carried_name(tag, i, &file.file_name);
            let outcome = match self.file_policy.check(&name, &file.bytes) {
                Ok(content_type) => {
                    let info = self
                        .files
                        .put(account, &name, content_type, file.bytes.clone())
                        .await?;
                    serde_json::to_value(&info).unwrap_or(Value::Null)
                }
                Err(e) => json!({"file_name": file.file_name, "refused": e.to_string()}),
            };
            kept.push(outcome);
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: (Option<&str>, Option<Keyword>)) {
        let (shown, known) = keyword(text);
        assert_eq!((shown.as_deref(), known), expected, "{text:?}");
    }

    #[test]
    fn carried_files_get_plain_unique_names() {
        use switchboard_handlers::records::files::check_file_name;
        let tag = "0123456789abcdef";
        for (i, sent, expected) in [
            (
                0,
                "signed form.pdf",
                "reply-0123456789abcdef-0-signed_form.pdf",
            ),
            (1, "image001.png", "reply-0123456789abcdef-1-image001.png"),
            (
                2,
                "../../etc/passwd",
                "reply-0123456789abcdef-2-_.__._etc_passwd",
            ),
            (3, "naïve..txt", "reply-0123456789abcdef-3-na_ve_.txt"),
        ] {
            let name = carried_name(tag, i, sent);
            assert_eq!(name, expected, "{sent}");
            assert_eq!(check_file_name(&name), Ok(()), "{name}");
        }
        let long = carried_name(tag, 0, &format!("{}.pdf", "x".repeat(300)));
        assert_eq!(long.len(), 128);
        assert!(long.ends_with("x.pdf"), "{long}");
    }

    #[test]
    fn only_our_message_ids_are_taken() {
        let ours = "0192f1c0-7b1c-7cc3-9a55-000000000001";
        let answers = [
            format!("{ours}@acme.example"),
            "abc@mail.example.org".to_string(),
            "not-an-id@acme.example".to_string(),
        ];
        assert_eq!(our_message_ids(&answers), [ours]);
    }

    #[test]
    fn a_keyword_alone_asks_it_and_any_reply_has_a_first_word() {
        check("STOP", (Some("STOP"), Some(Keyword::Stop)));
        check("  stop. ", (Some("STOP"), Some(Keyword::Stop)));
        check("Unsubscribe", (Some("STOP"), Some(Keyword::Stop)));
        check("quit!", (Some("STOP"), Some(Keyword::Stop)));
        check("start", (Some("START"), Some(Keyword::Start)));
        check("help", (Some("HELP"), Some(Keyword::Help)));
        // Not alone: the first word, asking nothing.
        check("stop please", (Some("STOP"), None));
        check("Cancel my appointment", (Some("CANCEL"), None));
        check("Yes please", (Some("YES"), None));
        check("YES", (Some("YES"), None));
        check("Thanks, see you", (Some("THANKS"), None));
        check("", (None, None));
        check("!!!", (None, None));
    }
}
