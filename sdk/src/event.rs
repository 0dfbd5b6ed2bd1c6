//! `VumiApiEvent`, version 1 of the public event contract.
//!
//! The rules here and the JSON Schema in `sdk/schema/event.v1.json` describe the
//! same contract; a test keeps them in agreement.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::keys::{AccountKey, ConversationKey, ConversationType, EventType};

/// The schema version this crate reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// The default largest encoded event, in bytes.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;
/// The default largest lineage depth; deeper events go to dead letters.
pub const DEFAULT_MAX_DEPTH: u32 = 8;

/// Namespace of the ids that Switchboard derives for emitted events.
const DERIVED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1c_0b2e_9d1f_4e57_a1b3_51b0_a2d0_e7c4);

/// An event id: a UUID written in its hyphenated form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// A new time-ordered (v7) id.
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of the `index`th event emitted by `step` of `chain` while handling
    /// `parent`. The same inputs always give the same id, so a re-run step
    /// re-publishes the same ids and the bus drops the duplicates.
    pub fn derived(parent: EventId, chain: &str, step: &str, index: usize) -> Self {
        let name = format!("{}\n{chain}\n{step}\n{index}", parent.0);
        Self(Uuid::new_v5(&DERIVED_ID_NAMESPACE, name.as_bytes()))
    }

    /// Parses the hyphenated form (`8-4-4-4-12` hex digits).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() != 36 {
            return Err(format!(
                "{s:?} is not a UUID in hyphenated form (8-4-4-4-12 hex digits)"
            ));
        }
        Uuid::try_parse(s)
            .map(Self)
            .map_err(|e| format!("{s:?} is not a UUID: {e}"))
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl From<Uuid> for EventId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for EventId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.hyphenated())
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An event, as conversation workers emit it and the dispatcher handles it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VumiApiEvent {
    /// Schema version; always [`SCHEMA_VERSION`].
    pub v: u32,
    /// Unique id; the dedup key on the bus.
    pub id: EventId,
    /// The account the event belongs to.
    pub account_key: AccountKey,
    /// The conversation that emitted it.
    pub conversation_key: ConversationKey,
    /// The kind of conversation.
    pub conversation_type: ConversationType,
    /// What happened.
    pub event_type: EventType,
    /// Free-form payload.
    pub event_data: Map<String, Value>,
    /// When it happened (UTC).
    #[serde(with = "utc_timestamp")]
    pub occurred_at: OffsetDateTime,
    /// After this instant the event is dropped, never handled.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// The event whose handler emitted this one; `None` for a root event.
    #[serde(default)]
    pub parent_id: Option<EventId>,
    /// The first event of the lineage (`id` itself for a root event).
    pub root_id: EventId,
    /// 0 for a root event; the parent's depth + 1 otherwise.
    pub depth: u32,
}

impl VumiApiEvent {
    /// A new root event: a fresh v7 id, `occurred_at` now, depth 0.
    pub fn new(
        account_key: AccountKey,
        conversation_key: ConversationKey,
        conversation_type: ConversationType,
        event_type: EventType,
        event_data: Map<String, Value>,
    ) -> Self {
        let id = EventId::new_v7();
        Self {
            v: SCHEMA_VERSION,
            id,
            account_key,
            conversation_key,
            conversation_type,
            event_type,
            event_data,
            occurred_at: now(),
            expires_at: None,
            parent_id: None,
            root_id: id,
            depth: 0,
        }
    }

    /// Sets `expires_at`.
    pub fn with_expiry(mut self, expires_at: OffsetDateTime) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    /// An event emitted while handling `self`: same account, `self` as parent,
    /// same root, one level deeper.
    pub fn child(
        &self,
        id: EventId,
        conversation_key: ConversationKey,
        conversation_type: ConversationType,
        event_type: EventType,
        event_data: Map<String, Value>,
    ) -> Self {
        Self {
            v: SCHEMA_VERSION,
            id,
            account_key: self.account_key.clone(),
            conversation_key,
            conversation_type,
            event_type,
            event_data,
            occurred_at: now(),
            expires_at: self.expires_at,
            parent_id: Some(self.id),
            root_id: self.root_id,
            // Saturating: a sample put through a dry run may claim any depth.
            depth: self.depth.saturating_add(1),
        }
    }

    /// The NATS subject of this event: `{prefix}.events.{account}.{conversation_type}.{event_type}`.
    pub fn subject(&self, prefix: &str) -> String {
        format!(
            "{prefix}.events.{}.{}.{}",
            self.account_key, self.conversation_type, self.event_type
        )
    }

    /// Whether the event has expired at `now`.
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Encodes the event as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serialises")
    }

    /// Encodes the event and checks it fits in `max_bytes`, and that its
    /// data nests no deeper than a consumer takes ([`MAX_DATA_DEPTH`]).
    pub fn encode(&self, max_bytes: usize) -> Result<Vec<u8>, EventError> {
        if nests_deeper(&self.event_data, MAX_DATA_DEPTH) {
            return Err(EventError::too_deep());
        }
        let bytes = self.to_json();
        if bytes.len() > max_bytes {
            return Err(EventError::TooLarge {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        Ok(bytes)
    }

    /// Decodes and validates an event. Every rule of the contract is checked.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Self, EventError> {
        if bytes.len() > max_bytes {
            return Err(EventError::TooLarge {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        // The plain decoder first: tracking the path of every field costs
        // as much as decoding, and only an error needs it.
        let event: Self = match serde_json::from_slice(bytes) {
            Ok(event) => event,
            Err(_) => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                let event: Self =
                    serde_path_to_error::deserialize(&mut de).map_err(|e| classify(bytes, e))?;
                de.end().map_err(|e| EventError::Syntax {
                    message: e.to_string(),
                })?;
                event
            }
        };
        event.check()?;
        Ok(event)
    }

    /// Decodes an event in which the fields that a producer may leave to the
    /// receiver are missing: `v`, `id`, `occurred_at`, `root_id`, `depth`,
    /// `parent_id` and `expires_at` get the values of a new root event. Used
    /// by the HTTP ingest endpoint; NATS publishers send whole events.
    pub fn decode_with_defaults(bytes: &[u8], max_bytes: usize) -> Result<Self, EventError> {
        if bytes.len() > max_bytes {
            return Err(EventError::TooLarge {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let mut value: Value = serde_json::from_slice(bytes).map_err(|e| EventError::Syntax {
            message: e.to_string(),
        })?;
        let Some(map) = value.as_object_mut() else {
            return Err(EventError::Syntax {
                message: "an event is a JSON object".into(),
            });
        };
        let id = match map.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => String::new(), // left for `decode` to reject
            None => {
                let id = EventId::new_v7().to_string();
                map.insert("id".into(), Value::String(id.clone()));
                id
            }
        };
        map.entry("v").or_insert(Value::from(SCHEMA_VERSION));
        map.entry("occurred_at")
            .or_insert_with(|| Value::String(format_rfc3339(now())));
        map.entry("root_id").or_insert(Value::String(id));
        map.entry("depth").or_insert(Value::from(0));
        let bytes = serde_json::to_vec(&value).expect("a JSON value serialises");
        Self::decode(&bytes, usize::MAX)
    }

    /// The rules that span fields.
    fn check(&self) -> Result<(), EventError> {
        if self.v != SCHEMA_VERSION {
            return Err(EventError::UnsupportedVersion {
                found: self.v.to_string(),
            });
        }
        if nests_deeper(&self.event_data, MAX_DATA_DEPTH) {
            return Err(EventError::too_deep());
        }
        match (self.depth, self.parent_id) {
            (0, Some(_)) => Err(EventError::Field {
                field: "parent_id".into(),
                message: "a root event (depth 0) has no parent_id; set it to null".into(),
            }),
            (d, None) if d > 0 => Err(EventError::Field {
                field: "parent_id".into(),
                message: format!(
                    "an event of depth {d} needs the parent_id of the event that emitted it"
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// How deep an event's data may nest objects and arrays (`event_data`
/// itself is the first level). The journal keeps the event a few levels
/// down in its own records, and step outputs that echo the data deeper
/// still; serde_json reads back at most 128 levels.
pub const MAX_DATA_DEPTH: usize = 64;

/// Whether `data` nests objects and arrays more than `limit` levels deep
/// (itself the first). Without recursion: an event may nest as deep as its
/// decoder let it.
pub fn nests_deeper(data: &Map<String, Value>, limit: usize) -> bool {
    fn containers<'a>(
        values: impl Iterator<Item = &'a Value>,
        level: usize,
    ) -> impl Iterator<Item = (&'a Value, usize)> {
        values
            .filter(|v| matches!(v, Value::Object(_) | Value::Array(_)))
            .map(move |v| (v, level))
    }
    // The objects and arrays still to look into, with their level.
    let mut stack: Vec<(&Value, usize)> = containers(data.values(), 2).collect();
    while let Some((value, level)) = stack.pop() {
        if level > limit {
            return true;
        }
        match value {
            Value::Object(map) => stack.extend(containers(map.values(), level + 1)),
            Value::Array(items) => stack.extend(containers(items.iter(), level + 1)),
            _ => {}
        }
    }
    false
}

fn classify(bytes: &[u8], err: serde_path_to_error::Error<serde_json::Error>) -> EventError {
    use serde_json::error::Category;
    let path = err.path().to_string();
    let inner = err.into_inner();
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => EventError::Syntax {
            message: inner.to_string(),
        },
        Category::Data => {
            // A version we do not know explains every other mismatch: say that.
            #[derive(Deserialize)]
            struct Probe {
                v: Option<Value>,
            }
            if let Ok(Probe { v: Some(v) }) = serde_json::from_slice::<Probe>(bytes)
                && v != SCHEMA_VERSION
            {
                return EventError::UnsupportedVersion {
                    found: v.to_string(),
                };
            }
            let message = strip_position(&inner.to_string());
            if path == "." || path.is_empty() || path == "?" {
                EventError::Field {
                    field: "(event)".into(),
                    message,
                }
            } else {
                EventError::Field {
                    field: path,
                    message,
                }
            }
        }
    }
}

/// serde_json appends " at line L column C"; on a field error the field name
/// says more than the position.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Why an event was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The encoded event is larger than the configured limit.
    #[error("event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the encoded event.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The bytes are not a JSON document.
    #[error("event is not valid JSON: {message}")]
    Syntax {
        /// What the JSON parser said, with line and column.
        message: String,
    },
    /// The event declares a schema version this build does not know.
    #[error(
        "event schema version {found} is not supported (this dispatcher reads version {SCHEMA_VERSION})"
    )]
    UnsupportedVersion {
        /// The `v` found in the event.
        found: String,
    },
    /// A field is missing, unknown, or breaks its rule.
    #[error("event field `{field}`: {message}")]
    Field {
        /// The field (a path for nested fields).
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl EventError {
    /// Data nested deeper than [`MAX_DATA_DEPTH`].
    fn too_deep() -> Self {
        EventError::Field {
            field: "event_data".into(),
            message: format!(
                "nests objects and arrays more than {MAX_DATA_DEPTH} levels deep: the \
                 dispatcher keeps an event inside its own records, which must read back within \
                 JSON's usual limit of 128"
            ),
        }
    }

    /// A short machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::TooLarge { .. } => "event_too_large",
            EventError::Syntax { .. } => "invalid_json",
            EventError::UnsupportedVersion { .. } => "unsupported_version",
            EventError::Field { .. } => "invalid_event",
        }
    }
}

/// Now, in UTC, to the microsecond (what RFC 3339 consumers keep).
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .expect("a truncated nanosecond is in range")
}

/// Formats a timestamp as RFC 3339.
pub fn format_rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("a valid timestamp formats as RFC 3339")
}

/// `t` in UTC, if RFC 3339 can write it there (the years 0000 to 9999):
/// a time from outside (a CloudEvent's, a provider's Unix time, a form's)
/// is checked with it before [`format_rfc3339`] may be asked to write it.
pub fn in_rfc3339_range(t: OffsetDateTime) -> Option<OffsetDateTime> {
    t.checked_to_offset(time::UtcOffset::UTC)
        .filter(|t| (0..=9999).contains(&t.year()))
}

/// `occurred_at`: RFC 3339, and in UTC.
mod utc_timestamp {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub(super) fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let t = OffsetDateTime::parse(&s, &Rfc3339).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not an RFC 3339 timestamp: {e}"))
        })?;
        if !t.offset().is_utc() {
            return Err(serde::de::Error::custom(format!(
                "{s:?} is not in UTC: end it with Z or +00:00"
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests;
