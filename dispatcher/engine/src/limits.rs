//! The limits every event is held to (`[limits]` in the dispatcher's
//! config file).

use serde::Deserialize;
use switchboard_sdk::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_EVENT_BYTES};

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted event, in bytes.
    pub max_event_bytes: usize,
    /// Deepest lineage handled; deeper events go to dead letters.
    pub max_depth: u32,
    /// Conversations handled at once (each conversation in order).
    pub concurrency: usize,
    /// Events a second each account may post to `POST /v1/events`; 0 (the
    /// default) sets no limit. Over it the API answers 429 with `Retry-After`.
    pub ingest_rate: u32,
    /// How many events over the rate an account may post at once (default:
    /// the rate).
    pub ingest_burst: Option<u32>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
            concurrency: 32,
            ingest_rate: 0,
            ingest_burst: None,
        }
    }
}
