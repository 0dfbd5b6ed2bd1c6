//! Events: `POST /v1/events` and an event's trace.
//!
//! The body of `POST /v1/events` is the event itself, a
//! [`switchboard_sdk::VumiApiEvent`] (missing ids and times are filled in).

use serde::{Deserialize, Serialize};
use switchboard_sdk::EventId;

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
