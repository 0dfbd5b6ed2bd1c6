//! The buses: NATS JetStream (production, many replicas, with the events
//! stream partitioned by account when replicas share it) and the embedded
//! bus (one process, durable in the store). Both implement the engine's
//! [`Bus`](switchboard_engine::bus::Bus) port; the engine does not know
//! which it runs on.

mod after_replicas;
pub mod commands;
pub mod embedded;
pub mod files;
mod marks;
pub mod nats;
pub mod partitions;
mod pull;
mod puller;
pub mod vumi_inbound;

pub use embedded::EmbeddedBus;
pub use nats::NatsBus;

/// How long a bus remembers an event id to drop duplicate publishes.
pub const DUPLICATE_WINDOW: std::time::Duration = switchboard_sdk::nats::DUPLICATE_WINDOW;

/// The account an event subject (`{prefix}.events.{account}.…`) names, if
/// it names a valid one: poison that cannot be decoded is filed under it.
fn account_of(prefix: &str, subject: &str) -> Option<String> {
    subject
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix(".events."))
        .and_then(|s| s.split('.').next())
        .and_then(|a| switchboard_sdk::AccountKey::new(a).ok())
        .map(|a| a.to_string())
}
