//! SendGrid's Event Webhook: a JSON array of event records, each read on its
//! own so that one bad record never fails the batch.
//!
//! A record names its message by the custom argument
//! `switchboard_message_id` (which `send_email` sets) and by `sg_message_id`
//! (SendGrid's X-Message-Id, which the SMTP answer gives and `send_email`
//! records as the message's `remote_id`, followed by `.filter…` routing
//! suffixes). `open`, `click` and the engagement events carry only the latter.
//! It names the account that sent the message by `switchboard_account`
//! (which `send_email` sets too).

use serde_json::{Map, Value, json};
use switchboard_handlers::records::contacts::normalize_email;
use switchboard_handlers::records::messages::TemplateRef;
use switchboard_handlers::records::{Channel, MessageRecord, MessageStatus, Topic};

use super::{Parsed, Report};
use switchboard_engine::metrics::InboundResult;

/// The custom argument naming the account that sent the message, which
/// `send_email` sets beside `switchboard_message_id`: what routes a record
/// on the deployment's events route, and what keeps an account's URL from
/// applying another account's records.
pub const ACCOUNT_ARG: &str = "switchboard_account";

/// Every SendGrid event Switchboard reads: its name, the status it moves a
/// message to (none: the message keeps its status) and the event type emitted.
pub const EVENTS: [(&str, Option<MessageStatus>, &str); 11] = [
    ("processed", Some(MessageStatus::Sent), "email_processed"),
    ("deferred", Some(MessageStatus::Deferred), "email_deferred"),
    (
        "delivered",
        Some(MessageStatus::Delivered),
        "email_delivered",
    ),
    ("bounce", Some(MessageStatus::Bounced), "email_bounced"),
    ("dropped", Some(MessageStatus::Dropped), "email_dropped"),
    ("open", Some(MessageStatus::Opened), "email_opened"),
    ("click", Some(MessageStatus::Clicked), "email_clicked"),
    (
        "spamreport",
        Some(MessageStatus::SpamReported),
        "email_spam_reported",
    ),
    (
        "unsubscribe",
        Some(MessageStatus::Unsubscribed),
        "email_unsubscribed",
    ),
    (
        "group_unsubscribe",
        Some(MessageStatus::Unsubscribed),
        "email_group_unsubscribed",
    ),
    ("group_resubscribe", None, "email_group_resubscribed"),
];

/// Reads a POST body: one [`Parsed`] per record, with the record as posted.
/// A body that is not a JSON array is one malformed record.
pub fn parse(body: &[u8]) -> Vec<(Value, Parsed)> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(records)) => records
            .into_iter()
            .map(|r| {
                let parsed = parse_record(&r);
                (r, parsed)
            })
            .collect(),
        Ok(other) => vec![(
            other,
            Parsed::unusable(
                InboundResult::Malformed,
                "the body is JSON but not an array of event records (SendGrid posts an array)",
            ),
        )],
        Err(e) => vec![(
            Value::String(String::from_utf8_lossy(body).into_owned()),
            Parsed::unusable(
                InboundResult::Malformed,
                format!("the body is not JSON: {e}"),
            ),
        )],
    }
}

fn string_field<'a>(record: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    record
        .get(name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// An id field (`name`, the text of `what`): absent (or null, or empty) is
/// `None`; any other kind of value than text is refused, naming the field
/// and the kind.
fn id_field<'a>(
    record: &'a Map<String, Value>,
    (name, what): (&str, &str),
) -> Result<Option<&'a str>, String> {
    match record.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim()).filter(|s| !s.is_empty())),
        Some(other) => {
            let kind = match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::Array(_) => "an array",
                _ => "an object",
            };
            Err(format!(
                "`{name}` is {kind} ({other}), not the text of {what}"
            ))
        }
    }
}

/// Reads one event record.
pub fn parse_record(raw: &Value) -> Parsed {
    let Value::Object(record) = raw else {
        return Parsed::unusable(InboundResult::Malformed, "the record is not a JSON object");
    };
    let Some(event) = string_field(record, "event") else {
        return Parsed::unusable(
            InboundResult::Malformed,
            "the record has no `event` (the SendGrid event type)",
        );
    };
    let occurred_at = match record.get("timestamp") {
        None => None,
        Some(t) => match t
            .as_i64()
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(switchboard_sdk::in_rfc3339_range)
        {
            Some(t) => Some(t),
            None => {
                return Parsed::unusable(
                    InboundResult::Malformed,
                    format!(
                        "`timestamp` {t} is not a Unix time in seconds (of the years 0000 to 9999)"
                    ),
                );
            }
        },
    };
    let Some((_, status, event_type)) = EVENTS.iter().find(|(name, _, _)| *name == event) else {
        return Parsed::unusable(
            InboundResult::Undocumented,
            format!(
                "SendGrid event type {event:?} is not one Switchboard reads ({})",
                EVENTS.map(|(n, _, _)| n).join(", ")
            ),
        );
    };
    const MESSAGE: &str = "a message id";
    let ids = id_field(record, ("switchboard_message_id", MESSAGE)).and_then(|ours| {
        Ok((
            ours,
            id_field(record, ("sg_message_id", MESSAGE))?,
            id_field(record, (ACCOUNT_ARG, "an account key"))?,
        ))
    });
    let (message_id, sg_message_id, account) = match ids {
        Ok((ours, theirs, account)) => (ours.map(str::to_string), theirs, account),
        Err(why) => return Parsed::unusable(InboundResult::Malformed, why),
    };
    // The X-Message-Id is what precedes the first `.` of sg_message_id.
    let mut remote_ids = Vec::new();
    if let Some(sg) = sg_message_id {
        remote_ids.push(sg.to_string());
        if let Some((x_message_id, _)) = sg.split_once('.') {
            remote_ids.push(x_message_id.to_string());
        }
    }
    if message_id.is_none() && remote_ids.is_empty() {
        return Parsed::unusable(
            InboundResult::Malformed,
            "the record names no message: it has neither switchboard_message_id nor sg_message_id",
        );
    }
    // sg_event_id is unique per event; without one the record itself is.
    let source = match string_field(record, "sg_event_id") {
        Some(id) => format!("sendgrid:{id}"),
        None => format!("sendgrid:{}", super::digest(raw.to_string().as_bytes())),
    };
    let mut cause = format!("sendgrid {event}");
    if let Some(why) = string_field(record, "reason").or_else(|| string_field(record, "response")) {
        cause.push_str(&format!(": {why}"));
    }
    let mut details = Map::new();
    for (from, to) in [
        ("email", "email"),
        ("reason", "reason"),
        ("response", "response"),
        ("status", "smtp_status"),
        ("type", "bounce_type"),
        ("url", "url"),
        ("attempt", "attempt"),
        ("asm_group_id", "asm_group_id"),
    ] {
        if let Some(v) = record.get(from) {
            details.insert(to.to_string(), v.clone());
        }
    }
    details.insert("sg_message_id".into(), json!(sg_message_id));
    details.insert(
        "sg_event_id".into(),
        json!(string_field(record, "sg_event_id")),
    );
    Parsed::Report(Report {
        channel: Channel::Email,
        message_id,
        account: account.map(str::to_string),
        remote_ids,
        status: *status,
        event_type: (*event_type).to_string(),
        provider_event: event.to_string(),
        source,
        occurred_at,
        details,
        cause,
    })
}

/// What an account is told of another account's record posted to its URL:
/// what happened and whose it is, not the recipient or the message.
pub fn redacted(raw: &Value) -> Value {
    let Value::Object(record) = raw else {
        return Value::Null;
    };
    Value::Object(
        ["event", "timestamp", "sg_event_id", ACCOUNT_ARG]
            .into_iter()
            .filter_map(|k| Some((k.to_string(), record.get(k)?.clone())))
            .collect(),
    )
}

/// What a SendGrid report says of its recipient's preferences, given the
/// message it is about (when known): the address, the topic and whether it
/// is now subscribed. An `unsubscribe`, a `spamreport` and a `bounce`
/// (not a `blocked` one, which is temporary) opt the address out of all
/// e-mail; a `group_unsubscribe` opts it out of the message's template's
/// category, else its template, and a `group_resubscribe` opts it back in
/// — nothing when the message is unknown or had no template (SendGrid's
/// own group suppression still holds; a group is not all e-mail).
pub fn preference_change(
    report: &Report,
    message: Option<&MessageRecord>,
) -> Option<(String, Topic, bool)> {
    let address = report
        .details
        .get("email")
        .and_then(Value::as_str)
        .and_then(|e| normalize_email(e).ok())
        .or_else(|| message.map(|m| m.recipient.clone()))?;
    let template_topic = || match message?.template.as_ref()? {
        TemplateRef {
            category: Some(category),
            ..
        } => Some(Topic::Category(category.clone())),
        t => Some(Topic::Template(t.slug.clone())),
    };
    let bounce_type = report.details.get("bounce_type").and_then(Value::as_str);
    match report.provider_event.as_str() {
        "unsubscribe" | "spamreport" => Some((address, Topic::All, false)),
        "bounce" if bounce_type != Some("blocked") => Some((address, Topic::All, false)),
        "group_unsubscribe" => Some((address, template_topic()?, false)),
        "group_resubscribe" => Some((address, template_topic()?, true)),
        _ => None,
    }
}
