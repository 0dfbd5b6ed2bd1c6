//! Dead letters: events (or undecodable payloads) a chain gave up on, to
//! list, show, replay and discard.
//!
//! The account of these routes is the account key, or `~unknown` for poison
//! whose subject named no valid account; it is a plain string here for that
//! reason. A dead letter itself is a `switchboard_engine::dead_letters::DeadLetter`
//! (id, reason, error, the event or payload, chain, step, attempts, when,
//! status), kept as JSON here because that crate is not light enough for
//! clients.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// `GET /v1/accounts/{account}/dead-letters[?limit=N]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterList {
    /// The account (or `~unknown`).
    pub account_key: String,
    /// The letters, each a `DeadLetter` as JSON.
    pub dead_letters: Vec<Value>,
}

/// `POST /v1/accounts/{account}/dead-letters/{id}/replay`: the letter whose
/// event is back on the bus. The request has no body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayedLetter {
    /// The account (or `~unknown`).
    pub account_key: String,
    /// The letter, a `DeadLetter` as JSON (status `replaying`).
    pub replayed: Value,
}

/// `DELETE /v1/accounts/{account}/dead-letters/{id}`: the letter discarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscardedLetter {
    /// The account (or `~unknown`).
    pub account_key: String,
    /// The letter, a `DeadLetter` as JSON.
    pub discarded: Value,
}

/// The body of `POST /v1/accounts/{account}/dead-letters/replay`: which of
/// the account's letters to replay. Both fields are optional; an empty body
/// replays every letter that holds an event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    /// Only letters of this chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// Only letters filed at or after this instant (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub since: Option<OffsetDateTime>,
}

/// The answer of `POST /v1/accounts/{account}/dead-letters/replay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayedLetters {
    /// The account (or `~unknown`).
    pub account_key: String,
    /// The ids of the letters replayed, oldest first.
    pub replayed: Vec<String>,
    /// Letters the filter selected that could not be replayed.
    pub skipped: Vec<SkippedLetter>,
}

/// A letter a replay left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedLetter {
    /// The letter's id.
    pub id: String,
    /// Why it was not replayed (it holds no event, only an undecodable payload).
    pub error: String,
}
