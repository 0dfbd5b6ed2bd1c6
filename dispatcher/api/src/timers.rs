//! Timers: what brings back the events of chains paused by a `delay` step.

use serde::{Deserialize, Serialize};
use switchboard_sdk::{AccountKey, EventId};
use time::OffsetDateTime;

/// `GET /v1/accounts/{account}/timers`: the account's pending timers, the
/// soonest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerList {
    /// The account.
    pub account_key: AccountKey,
    /// Its timers.
    pub timers: Vec<Timer>,
}

/// One pending timer: a chain paused until `due_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// The paused event (its trace shows the chain `waiting`).
    pub event_id: EventId,
    /// The paused chain.
    pub chain: String,
    /// When the chain goes on.
    #[serde(with = "time::serde::rfc3339")]
    pub due_at: OffsetDateTime,
}
