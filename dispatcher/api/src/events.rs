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

/// The answer of `POST /v1/events` with a batch of CloudEvents (202):
/// every event is on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedBatch {
    /// Each event's acceptance, in the batch's order.
    pub accepted: Vec<Accepted>,
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

/// A row of the live tail: one pass over an event as it ended, sent as the
/// data (JSON) of an `event: handled` of `GET
/// /v1/accounts/{account}/events/stream` (Server-Sent Events). Rows a slow
/// reader could not take are dropped (never the events): an `event:
/// dropped` says how many, as `{"dropped": N}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    /// The account.
    pub account_key: AccountKey,
    /// The event.
    pub id: EventId,
    /// Its conversation type.
    pub conversation_type: ConversationType,
    /// Its type.
    pub event_type: EventType,
    /// Its conversation.
    pub conversation_key: switchboard_sdk::ConversationKey,
    /// Where it stands after this pass: `done`, `running` (a step waits to
    /// be tried again), `dead`, `expired` or `unrouted`.
    pub status: String,
    /// The chains that ran, and how each stands.
    pub chains: Vec<ChainRow>,
    /// When the pass ended.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// How a chain stands after a pass over an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainRow {
    /// The chain.
    pub name: String,
    /// `done`, `dead` (in dead letters), `retrying`, `discarded` or
    /// `condition_failed`.
    pub outcome: String,
    /// The step that failed or waits to be tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// The filters of the live tail: `?conversation_type=&event_type=
/// &conversation_key=&status=`, each an exact match when given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailQuery {
    /// Only events of this conversation type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_type: Option<String>,
    /// Only events of this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Only events of this conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_key: Option<String>,
    /// Only rows with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl TailQuery {
    /// Whether `row` passes the filters (an empty filter passes all).
    pub fn admits(&self, row: &EventRow) -> bool {
        let pass = |filter: &Option<String>, value: &str| {
            filter.as_deref().is_none_or(|f| f.is_empty() || f == value)
        };
        pass(&self.conversation_type, row.conversation_type.as_str())
            && pass(&self.event_type, row.event_type.as_str())
            && pass(&self.conversation_key, row.conversation_key.as_str())
            && pass(&self.status, &row.status)
    }
}

/// The query of `GET /v1/accounts/{account}/events`: `?limit=N` (50 when
/// absent, at most 500), `before=CURSOR` (the `next` of the page before) and
/// the filters of [`TailQuery`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventListQuery {
    /// How many events to answer at most.
    #[serde(
        default,
        deserialize_with = "whole_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit: Option<usize>,
    /// Where the page before ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// Which events.
    #[serde(flatten)]
    pub filters: TailQuery,
}

/// A whole number, given as one (JSON) or as text (a query string: what
/// serde's `flatten` hands on of one is text).
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Number(usize),
        Text(String),
    }
    match Option::<Given>::deserialize(d)? {
        None => Ok(None),
        Some(Given::Number(n)) => Ok(Some(n)),
        Some(Given::Text(t)) => {
            t.trim().parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!("limit: {t:?} is not a whole number"))
            })
        }
    }
}

impl EventListQuery {
    /// The default number of events of a page.
    pub const DEFAULT_LIMIT: usize = 50;
    /// The most events a page answers.
    pub const MAX_LIMIT: usize = 500;

    /// The number of events to answer.
    pub fn effective_limit(&self) -> usize {
        self.limit
            .unwrap_or(Self::DEFAULT_LIMIT)
            .clamp(1, Self::MAX_LIMIT)
    }
}

/// `GET /v1/accounts/{account}/events`: the account's events, the latest
/// taken up first (while their traces are kept), each as a [`EventRow`]
/// whose `at` is when it was taken up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventList {
    /// The account.
    pub account_key: AccountKey,
    /// The events.
    pub events: Vec<EventRow>,
    /// Pass as `before` for the next page; absent at the end. A page may
    /// hold fewer events than asked for and still have a next one, when
    /// the filters passed few of those it looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The answer of `GET /v1/accounts/{account}/counts`: the account's events
/// and inbound records as this replica counted them since it started (what
/// `/metrics` shows only for the accounts `metrics.accounts` names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountCounts {
    /// The account.
    pub account_key: AccountKey,
    /// When this replica began counting.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Its events by type, sorted by type.
    pub events: Vec<EventTypeCounts>,
    /// Records posted to its inbound webhooks, by provider and result.
    pub inbound: Vec<InboundCount>,
}

/// One event type's events by outcome (as `switchboard_events_total`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTypeCounts {
    /// The event type (`~unknown` for what could not be decoded).
    pub event_type: String,
    /// Taken off the bus (first deliveries).
    pub received: u64,
    /// Every matching chain ran.
    pub handled: u64,
    /// No chain matched.
    pub unrouted: u64,
    /// Dropped: expired.
    pub expired: u64,
    /// Sent to dead letters.
    pub dead_lettered: u64,
    /// Steps tried again.
    pub retried: u64,
}

/// Records of one provider with one result (as
/// `switchboard_inbound_records_total`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundCount {
    /// `sendgrid`, `twilio` or `webhook`.
    pub provider: String,
    /// `matched`, `unknown_message`, `unknown_address`, `other_account`, `undocumented`,
    /// `malformed` or `rejected`.
    pub result: String,
    /// How many.
    pub count: u64,
}
