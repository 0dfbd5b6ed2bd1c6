//! The Switchboard event contract, for the workers that emit events.
//!
//! A worker depends on this crate alone. It holds [`VumiApiEvent`] (version 1 of
//! the public event format), the typed keys it is made of, its validation, the
//! JSON Schema (`schema/event.v1.json`, also as [`EVENT_SCHEMA_V1`]) and two
//! emitters: straight to NATS JetStream (feature `nats`) or to a dispatcher's
//! HTTP API (feature `http`). With feature `otel`, both carry the current
//! OpenTelemetry span's W3C trace context ([`trace_context`]).
//!
//! ```
//! use switchboard_sdk::{VumiApiEvent, AccountKey, ConversationKey, ConversationType, EventType};
//!
//! let event = VumiApiEvent::new(
//!     AccountKey::new("acme")?,
//!     ConversationKey::new("poll-2026")?,
//!     ConversationType::new("survey")?,
//!     EventType::new("poll_complete")?,
//!     serde_json::json!({"msisdn": "+27820000000", "score": 4}).as_object().unwrap().clone(),
//! );
//! assert_eq!(event.subject("vumi"), "vumi.events.acme.survey.poll_complete");
//! # Ok::<(), switchboard_sdk::KeyError>(())
//! ```

pub mod cloudevents;
mod event;
mod keys;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "otel")]
pub mod trace_context;

pub use event::{
    DEFAULT_MAX_DEPTH, DEFAULT_MAX_EVENT_BYTES, EventError, EventId, MAX_DATA_DEPTH,
    SCHEMA_VERSION, VumiApiEvent, format_rfc3339, in_rfc3339_range, nests_deeper, now,
};
pub use keys::{AccountKey, ConversationKey, ConversationType, EventType, KeyError};

/// The JSON Schema of version 1 of the event.
pub const EVENT_SCHEMA_V1: &str = include_str!("../schema/event.v1.json");

/// The default first segment of every Switchboard subject.
pub const DEFAULT_SUBJECT_PREFIX: &str = "vumi";

/// The header that carries the event id on every publish, so that JetStream
/// drops a retried publish as a duplicate.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// How often an emitter tries a publish before it gives up.
pub const DEFAULT_PUBLISH_ATTEMPTS: u32 = 5;

/// The delay before retry `attempt` (1-based) of a publish: 50 ms doubling, at most 2 s.
pub fn publish_backoff(attempt: u32) -> std::time::Duration {
    let ms = 50u64.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    std::time::Duration::from_millis(ms.min(2_000))
}
