//! The request and response bodies of Switchboard's HTTP API (`/v1`), one
//! module per resource, and the paths of its endpoints ([`paths`]).
//!
//! The server (`switchboard-http`) builds its answers from these types and
//! parses its request bodies with them; the CLI's client decodes the answers
//! with them. What they serialise to *is* the wire format: renaming a field
//! here renames it for both sides at once.
//!
//! This crate stays light — serde, `time` and the event contract
//! (`switchboard-sdk`) — so that any client can depend on it. Records whose
//! type lives in a heavier crate (a chain, a trace, a dead letter, a contact,
//! a message, a dry run's result) are carried as [`serde_json::Value`]; each
//! such field says which type it holds, and a caller that has that crate at
//! hand decodes it there.
//!
//! Times are RFC 3339 strings on the wire ([`time::serde::rfc3339`]).

pub mod chains;
pub mod dead_letters;
pub mod error;
pub mod events;
pub mod handlers;
pub mod health;
pub mod inbound;
pub mod inbox;
pub mod paths;
pub mod records;
pub mod scripts;
pub mod templates;
pub mod timers;
pub mod tokens;

pub use error::{ErrorBody, ErrorResponse};

use serde::{Deserialize, Serialize};

/// The query of the list endpoints (contacts, messages, unmatched inbound
/// records, dead letters, timers): `?limit=N`, 100 when absent, at most
/// 10,000.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListQuery {
    /// How many items to answer at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl ListQuery {
    /// The default number of items of a list.
    pub const DEFAULT_LIMIT: usize = 100;
    /// The most items a list answers, whatever the query asks.
    pub const MAX_LIMIT: usize = 10_000;

    /// A query for at most `limit` items.
    pub fn limit(limit: usize) -> Self {
        Self { limit: Some(limit) }
    }

    /// The number of items to answer: the query's limit (or the default),
    /// capped at [`ListQuery::MAX_LIMIT`].
    pub fn effective_limit(&self) -> usize {
        self.limit
            .unwrap_or(Self::DEFAULT_LIMIT)
            .min(Self::MAX_LIMIT)
    }
}

#[cfg(test)]
mod tests;
