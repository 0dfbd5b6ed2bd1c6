//! CloudEvents 1.0, in and out: how a CloudEvent becomes an event and back.
//!
//! | CloudEvents | event |
//! |---|---|
//! | `specversion` | must be `1.0` |
//! | `id` | `id`: the id itself when it is a UUID; otherwise a UUID v5 of `source` and `id` (a CloudEvent is identified by the two, so one sent twice is one event, and deduplicated) |
//! | `type` | `event_type`: its last dot-separated part (`com.example.survey.signed_up` → `signed_up`) |
//! | `source` | `conversation_type`: its last non-empty segment between `/` and `:` (`/apps/survey` → `survey`), unless the `conversationtype` extension gives it |
//! | `subject` | `conversation_key` (required), unless the `conversationkey` extension gives it |
//! | `time` | `occurred_at` (default: when it was received) |
//! | `data` | `event_data`: a JSON object (none: `{}`); `data_base64` is refused |
//! | `datacontenttype` | none, `application/json` or a `+json` type |
//! | `account` (extension) | `account_key`; else the token's (HTTP) or the subject's (NATS) account, which it must agree with |
//! | `expiresat` (extension) | `expires_at` (RFC 3339) |
//! | `parentid`, `rootid`, `depth` (extensions) | the lineage of an emitted event |
//!
//! Other attributes are not kept. [`to_binary`] writes an event the other
//! way (binary content mode: `ce-` headers and the `event_data` as the
//! payload), and reading that back gives the same event.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::event::{SCHEMA_VERSION, format_rfc3339, now};
use crate::{AccountKey, ConversationKey, ConversationType, EventId, EventType, VumiApiEvent};

/// The media type of a structured-mode CloudEvent.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// The media type of a batch of structured-mode CloudEvents.
pub const BATCH: &str = "application/cloudevents-batch+json";

/// The prefix of a binary-mode CloudEvent's attribute headers.
pub const HEADER_PREFIX: &str = "ce-";

/// Why a CloudEvent is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CloudEvent attribute `{attribute}`: {message}")]
pub struct CloudEventError {
    /// The attribute at fault (`data` for the payload).
    pub attribute: String,
    /// What is wrong, and what to send instead.
    pub message: String,
}

fn error(attribute: &str, message: impl Into<String>) -> CloudEventError {
    CloudEventError {
        attribute: attribute.to_string(),
        message: message.into(),
    }
}

/// A structured-mode CloudEvent (a JSON object) as an event; `account` is
/// the account it arrived for (a token's, a subject's), if known.
pub fn from_structured(
    value: Value,
    account: Option<&AccountKey>,
) -> Result<VumiApiEvent, CloudEventError> {
    let Value::Object(mut attributes) = value else {
        return Err(error("(event)", "a structured CloudEvent is a JSON object"));
    };
    if attributes.contains_key("data_base64") {
        return Err(error(
            "data_base64",
            "binary data is not taken: send the event's data as a JSON object in `data`",
        ));
    }
    let data = attributes.remove("data");
    from_attributes(&attributes, data, account)
}

/// A binary-mode CloudEvent (its `ce-` headers, `content-type`, and the
/// payload as its data) as an event.
pub fn from_binary(
    headers: &[(String, String)],
    payload: &[u8],
    account: Option<&AccountKey>,
) -> Result<VumiApiEvent, CloudEventError> {
    let mut attributes = Map::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if let Some(attribute) = name.strip_prefix(HEADER_PREFIX) {
            attributes.insert(attribute.to_string(), Value::String(percent_decoded(value)));
        } else if name == "content-type" {
            attributes
                .entry("datacontenttype")
                .or_insert_with(|| Value::String(value.clone()));
        }
    }
    let data = if payload.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(serde_json::from_slice(payload).map_err(|e| {
            error(
                "data",
                format!("the payload is not JSON ({e}); send the event's data as a JSON object"),
            )
        })?)
    };
    from_attributes(&attributes, data, account)
}

/// A header value with its `%XX` escapes decoded (as the bindings escape
/// what a header cannot carry); one that does not decode to UTF-8 is kept
/// as it came.
fn percent_decoded(value: &str) -> String {
    if !value.contains('%') {
        return value.to_string();
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_string())
}

/// Whether a JSON payload that is no event envelope is a structured-mode
/// CloudEvent (one published without headers).
pub fn looks_structured(payload: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        specversion: Option<Value>,
        v: Option<Value>,
    }
    serde_json::from_slice::<Probe>(payload).is_ok_and(|p| p.specversion.is_some() && p.v.is_none())
}

/// Whether binary-mode `headers` carry a CloudEvent.
pub fn is_binary(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("ce-specversion"))
}

/// An event as a binary-mode CloudEvent: its headers (`ce-` attributes and
/// `content-type`) and payload (the event's data).
pub fn to_binary(event: &VumiApiEvent) -> (Vec<(String, String)>, Vec<u8>) {
    let mut headers = vec![
        ("ce-specversion".to_string(), "1.0".to_string()),
        ("ce-id".to_string(), event.id.to_string()),
        (
            "ce-source".to_string(),
            format!("/{}/{}", event.account_key, event.conversation_type),
        ),
        ("ce-type".to_string(), event.event_type.to_string()),
        ("ce-subject".to_string(), event.conversation_key.to_string()),
        ("ce-time".to_string(), format_rfc3339(event.occurred_at)),
        ("ce-account".to_string(), event.account_key.to_string()),
        (
            "ce-datacontenttype".to_string(),
            "application/json".to_string(),
        ),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    if let Some(expires) = event.expires_at {
        headers.push(("ce-expiresat".into(), format_rfc3339(expires)));
    }
    if let Some(parent) = event.parent_id {
        headers.push(("ce-parentid".into(), parent.to_string()));
    }
    if event.depth > 0 || event.root_id != event.id {
        headers.push(("ce-rootid".into(), event.root_id.to_string()));
        headers.push(("ce-depth".into(), event.depth.to_string()));
    }
    let payload = serde_json::to_vec(&event.event_data).expect("a JSON object serialises");
    (headers, payload)
}

/// An attribute's text, if it has one; a non-text value is an error.
fn text<'a>(
    attributes: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, CloudEventError> {
    match attributes.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(error(name, format!("must be a string, not {other}"))),
    }
}

fn required<'a>(
    attributes: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a str, CloudEventError> {
    text(attributes, name)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| error(name, "required, and missing or empty"))
}

fn time_of(
    attributes: &Map<String, Value>,
    name: &str,
) -> Result<Option<OffsetDateTime>, CloudEventError> {
    text(attributes, name)?
        .map(|s| {
            let t = OffsetDateTime::parse(s, &Rfc3339)
                .map_err(|e| error(name, format!("{s:?} is not an RFC 3339 time: {e}")))?;
            // In UTC it must still be a time RFC 3339 can write (years 0000
            // to 9999): the event is written back with it.
            crate::in_rfc3339_range(t).ok_or_else(|| {
                error(
                    name,
                    format!("{s:?} is outside the years 0000 to 9999 once in UTC"),
                )
            })
        })
        .transpose()
}

fn event_id(
    attributes: &Map<String, Value>,
    name: &str,
) -> Result<Option<EventId>, CloudEventError> {
    text(attributes, name)?
        .map(|s| EventId::parse(s).map_err(|e| error(name, e)))
        .transpose()
}

fn from_attributes(
    attributes: &Map<String, Value>,
    data: Option<Value>,
    account: Option<&AccountKey>,
) -> Result<VumiApiEvent, CloudEventError> {
    let version = required(attributes, "specversion")?;
    if version != "1.0" {
        return Err(error(
            "specversion",
            format!("{version:?} is not supported: send CloudEvents 1.0"),
        ));
    }
    let id = required(attributes, "id")?;
    let source = required(attributes, "source")?;
    let kind = required(attributes, "type")?;
    let last = kind.rsplit('.').next().unwrap_or(kind);
    let event_type = EventType::new(last)
        .map_err(|e| error("type", format!("{kind:?}: its last part {last:?}: {e}")))?;
    let conversation_type = match text(attributes, "conversationtype")? {
        Some(given) => {
            ConversationType::new(given).map_err(|e| error("conversationtype", e.to_string()))?
        }
        None => {
            let segment = source
                .rsplit(['/', ':'])
                .find(|s| !s.is_empty())
                .unwrap_or(source);
            ConversationType::new(segment).map_err(|e| {
                error(
                    "source",
                    format!(
                        "{source:?}: its last segment {segment:?} names the conversation type: {e} \
                         (or give the conversationtype extension)"
                    ),
                )
            })?
        }
    };
    let (key_attribute, key) = match text(attributes, "conversationkey")? {
        Some(k) => ("conversationkey", Some(k)),
        None => ("subject", text(attributes, "subject")?),
    };
    let key = key.filter(|k| !k.is_empty()).ok_or_else(|| {
        error(
            "subject",
            "required: the conversation's key (or give the conversationkey extension)",
        )
    })?;
    let conversation_key =
        ConversationKey::new(key).map_err(|e| error(key_attribute, e.to_string()))?;
    let account_key = match (text(attributes, "account")?, account) {
        (Some(given), known) => {
            let given = AccountKey::new(given).map_err(|e| error("account", e.to_string()))?;
            if let Some(known) = known.filter(|k| **k != given) {
                return Err(error(
                    "account",
                    format!("{given} is not the account it was sent for ({known})"),
                ));
            }
            given
        }
        (None, Some(known)) => known.clone(),
        (None, None) => {
            return Err(error(
                "account",
                "required here: give the account extension (an admin token names no account)",
            ));
        }
    };
    if let Some(media) = text(attributes, "datacontenttype")? {
        let essence = media.split(';').next().unwrap_or(media).trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(error(
                "datacontenttype",
                format!("{media:?}: the data must be JSON (application/json)"),
            ));
        }
    }
    let event_data = match data {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(error(
                "data",
                format!("must be a JSON object (it becomes the event's event_data), not {other}"),
            ));
        }
    };
    let id = match Uuid::parse_str(id) {
        Ok(uuid) => EventId::parse(&uuid.to_string()).map_err(|e| error("id", e))?,
        Err(_) => {
            let derived = Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("{source}\n{id}").as_bytes());
            EventId::parse(&derived.to_string()).map_err(|e| error("id", e))?
        }
    };
    let depth = match attributes.get("depth") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| error("depth", format!("{n} is not a depth")))?,
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| error("depth", format!("{s:?} is not a depth")))?,
        Some(other) => return Err(error("depth", format!("{other} is not a depth"))),
    };
    let event = VumiApiEvent {
        v: SCHEMA_VERSION,
        id,
        account_key,
        conversation_key,
        conversation_type,
        event_type,
        event_data,
        occurred_at: time_of(attributes, "time")?.unwrap_or_else(now),
        expires_at: time_of(attributes, "expiresat")?,
        parent_id: event_id(attributes, "parentid")?,
        root_id: event_id(attributes, "rootid")?.unwrap_or(id),
        depth,
    };
    // Every rule of the envelope holds for it too (the lineage's, the
    // sizes').
    let bytes = serde_json::to_vec(&event).expect("an event serialises");
    VumiApiEvent::decode(&bytes, usize::MAX).map_err(|e| error("(event)", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn acme() -> AccountKey {
        AccountKey::new("acme").unwrap()
    }

    fn signed_up() -> Value {
        json!({
            "specversion": "1.0",
            "id": "A234-1234-1234",
            "source": "/apps/survey",
            "type": "com.example.survey.signed_up",
            "subject": "poll-2026",
            "time": "2026-12-03T10:00:00Z",
            "datacontenttype": "application/json",
            "data": { "msisdn": "+27820000001" }
        })
    }

    #[test]
    fn a_structured_cloudevent_maps_by_the_table() {
        let e = from_structured(signed_up(), Some(&acme())).unwrap();
        assert_eq!(e.account_key.as_str(), "acme");
        assert_eq!(e.event_type.as_str(), "signed_up");
        assert_eq!(e.conversation_type.as_str(), "survey");
        assert_eq!(e.conversation_key.as_str(), "poll-2026");
        assert_eq!(e.event_data["msisdn"], "+27820000001");
        assert_eq!(format_rfc3339(e.occurred_at), "2026-12-03T10:00:00Z");
        assert_eq!((e.depth, e.parent_id, e.root_id), (0, None, e.id));
        // The same source and id: the same event.
        let again = from_structured(signed_up(), Some(&acme())).unwrap();
        assert_eq!(again.id, e.id);
        let mut other = signed_up();
        other["source"] = json!("/apps/other/survey");
        assert_ne!(from_structured(other, Some(&acme())).unwrap().id, e.id);
    }

    #[test]
    fn an_event_read_back_from_binary_mode_is_the_same_event() {
        let mut e = from_structured(signed_up(), Some(&acme())).unwrap();
        e.expires_at = Some(OffsetDateTime::parse("2027-01-01T00:00:00Z", &Rfc3339).unwrap());
        let child_id = EventId::new_v7();
        let mut child = e.clone();
        child.id = child_id;
        child.parent_id = Some(e.id);
        child.depth = 1;
        for event in [e, child] {
            let (headers, payload) = to_binary(&event);
            assert!(is_binary(&headers));
            let back = from_binary(&headers, &payload, Some(&acme())).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn what_is_wrong_is_named_by_its_attribute() {
        type Change = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Change, &str, &str)> = vec![
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("type");
                }),
                "type",
                "required",
            ),
            (
                Box::new(|v| v["specversion"] = json!("0.3")),
                "specversion",
                "1.0",
            ),
            (
                Box::new(|v| v["type"] = json!("com.example.signed up")),
                "type",
                "signed up",
            ),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("subject");
                }),
                "subject",
                "conversation",
            ),
            (
                Box::new(|v| v["data"] = json!([1, 2])),
                "data",
                "JSON object",
            ),
            (
                Box::new(|v| v["data_base64"] = json!("AAAA")),
                "data_base64",
                "JSON object",
            ),
            (
                Box::new(|v| v["time"] = json!("yesterday")),
                "time",
                "RFC 3339",
            ),
            (
                Box::new(|v| v["time"] = json!("9999-12-31T23:59:59-01:00")),
                "time",
                "years 0000 to 9999",
            ),
            (
                Box::new(|v| v["expiresat"] = json!("0000-01-01T00:00:00+00:01")),
                "expiresat",
                "years 0000 to 9999",
            ),
            (
                Box::new(|v| v["account"] = json!("globex")),
                "account",
                "globex",
            ),
            (
                Box::new(|v| v["datacontenttype"] = json!("text/plain")),
                "datacontenttype",
                "JSON",
            ),
            (
                Box::new(|v| v["source"] = json!("/apps/a survey")),
                "source",
                "conversation type",
            ),
        ];
        for (change, attribute, says) in cases {
            let mut v = signed_up();
            change(&mut v);
            let e = from_structured(v, Some(&acme())).unwrap_err();
            assert_eq!(e.attribute, attribute, "{e}");
            assert!(e.to_string().contains(says), "{e} lacks {says:?}");
        }
        let e = from_structured(signed_up(), None).unwrap_err();
        assert_eq!(e.attribute, "account", "{e}");
        let headers = vec![("ce-specversion".to_string(), "1.0".to_string())];
        let e = from_binary(&headers, b"not json", Some(&acme())).unwrap_err();
        assert_eq!(e.attribute, "data", "{e}");
    }

    #[test]
    fn times_with_an_offset_and_escaped_headers_are_read() {
        let mut v = signed_up();
        v["time"] = json!("2026-12-03T12:00:00+02:00");
        let e = from_structured(v, Some(&acme())).unwrap();
        assert_eq!(format_rfc3339(e.occurred_at), "2026-12-03T10:00:00Z");
        let headers: Vec<(String, String)> = [
            ("ce-specversion", "1.0"),
            ("ce-id", "A234-1234-1234"),
            ("ce-source", "%2Fapps%2Fsurvey"),
            ("CE-Type", "com.example.survey.signed_up"),
            ("ce-subject", "poll-2026"),
            ("ce-time", "2026-12-03T10:00:00Z"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let binary =
            from_binary(&headers, br#"{"msisdn": "+27820000001"}"#, Some(&acme())).unwrap();
        let structured = from_structured(signed_up(), Some(&acme())).unwrap();
        assert_eq!(binary, structured);
        assert!(looks_structured(signed_up().to_string().as_bytes()));
        assert!(!looks_structured(br#"{"v": 1, "specversion": "1.0"}"#));
    }
}
