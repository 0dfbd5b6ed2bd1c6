//! Events: `POST /v1/events` and an event's trace.
//!
//! The body of `POST /v1/events` is the event itself, a
//! [`switchboard_sdk::VumiApiEvent`] (missing ids and times are filled in).

use serde::{Deserialize, Serialize};
use switchboard_sdk::{AccountKey, ConversationType, EventId, EventType};
use time::OffsetDateTime;

/// The answer of `POST /v1/events` (202): the event is on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The event's id (the one sent, or the one given to it).
    pub id: EventId,
    /// The subject it was published on.
    pub subject: String,
    /// The bus had it already (the same id was published before).
    pub duplicate: bool,
}

/// The answer of `GET /v1/accounts/{account}/events/{id}/trace`: a
/// `switchboard_engine::trace::Trace` (the event, its status, the chains and
/// steps that ran, its parent and children), kept as JSON here because that
/// crate is not light enough for clients.
pub type Trace = serde_json::Value;

/// A kind of event an account has had: its (conversation type, event type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventKind {
    /// The events' conversation type.
    pub conversation_type: ConversationType,
    /// Their type.
    pub event_type: EventType,
    /// How many were consumed (first deliveries; a replayed event counts again).
    pub count: u64,
    /// When the latest was consumed.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// The latest one (its trace holds it, while traces are kept).
    pub last_event_id: EventId,
}

/// `GET /v1/accounts/{account}/event-kinds`: the kinds of event the account
/// has had, the most recently seen first, as the answering dispatcher
/// consumed them (each replica counts the events it consumed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventKindList {
    /// The account.
    pub account_key: AccountKey,
    /// Its kinds of event.
    pub kinds: Vec<EventKind>,
}
