//! Replies: what people send to an account's numbers and addresses, as
//! `message_response` events.
//!
//! A reply is matched to its account's address ([`super::numbers`]), to
//! the contact it came from, and to the message it answers: the latest one
//! sent to its sender from the address it was sent to, within
//! [`REPLY_WINDOW`]. Its first word is its `keyword`; STOP (and its usual
//! synonyms) opts the sender out of the account's SMS, START opts it back
//! in ([`Keyword`]).

use serde_json::{Map, Value, json};
use switchboard_handlers::records::{Channel, Contact, MessageRecord};
use time::OffsetDateTime;

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

/// The domain of the Message-IDs `send_email` gives its e-mails:
/// `<{message id}@switchboard>`.
pub const MESSAGE_ID_DOMAIN: &str = "switchboard";

/// The message ids of ours among the Message-IDs `answers`, in order.
pub fn our_message_ids(answers: &[String]) -> Vec<&str> {
    answers
        .iter()
        .filter_map(|id| id.strip_suffix(&format!("@{MESSAGE_ID_DOMAIN}")))
        .collect()
}

/// What a reply's first word asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    /// Stop sending: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, OPTOUT.
    Stop,
    /// Start again: START, UNSTOP, YES.
    Start,
    /// Help: HELP, INFO.
    Help,
}

/// The reply's keyword, upper-cased: STOP, START or HELP for their
/// synonyms, else its first word (none for an empty reply); and which of
/// the three it is.
pub fn keyword(text: &str) -> (Option<String>, Option<Keyword>) {
    let Some(first) = text.split_whitespace().next() else {
        return (None, None);
    };
    let word: String = first
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_uppercase();
    let known = match word.as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" | "OPTOUT" => {
            Some(Keyword::Stop)
        }
        "START" | "UNSTOP" | "YES" => Some(Keyword::Start),
        "HELP" | "INFO" => Some(Keyword::Help),
        _ => None,
    };
    let shown = match known {
        Some(Keyword::Stop) => "STOP".to_string(),
        Some(Keyword::Start) => "START".to_string(),
        Some(Keyword::Help) => "HELP".to_string(),
        None => word,
    };
    (Some(shown).filter(|w| !w.is_empty()), known)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: (Option<&str>, Option<Keyword>)) {
        let (shown, known) = keyword(text);
        assert_eq!((shown.as_deref(), known), expected, "{text:?}");
    }

    #[test]
    fn only_our_message_ids_are_taken() {
        let answers =
            ["m-1@switchboard", "abc@mail.example.org", "m-2@switchboard"].map(str::to_string);
        assert_eq!(our_message_ids(&answers), ["m-1", "m-2"]);
    }

    #[test]
    fn a_replys_first_word_is_its_keyword() {
        check("STOP", (Some("STOP"), Some(Keyword::Stop)));
        check("  stop please", (Some("STOP"), Some(Keyword::Stop)));
        check("Unsubscribe.", (Some("STOP"), Some(Keyword::Stop)));
        check("quit!", (Some("STOP"), Some(Keyword::Stop)));
        check("start", (Some("START"), Some(Keyword::Start)));
        check("YES", (Some("START"), Some(Keyword::Start)));
        check("help me", (Some("HELP"), Some(Keyword::Help)));
        check("Thanks, see you", (Some("THANKS"), None));
        check("stopping by later", (Some("STOPPING"), None));
        check("", (None, None));
        check("!!!", (None, None));
    }
}
