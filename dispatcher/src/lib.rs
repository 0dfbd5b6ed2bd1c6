//! The Switchboard runtime: buses, the chain executor, traces, dead letters and
//! the HTTP API.
//!
//! This is the only crate that knows the bus, the journal and the HTTP server.
//! [`Dispatcher::start`] puts it all together; [`client`] talks to a running
//! dispatcher's API for the CLI.

pub mod api;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod dead_letters;
pub mod demo;
pub mod dry_run;
pub mod executor;
pub mod inbound;
pub mod journal;
pub mod metrics;
pub mod outbound;
pub mod ratelimit;
pub mod runtime;
pub mod state;
pub mod trace;

pub use config::Config;
pub use runtime::{AppliedFile, Dispatcher, StartError};

/// How long a bus remembers an event id to drop duplicate publishes.
pub const DUPLICATE_WINDOW: std::time::Duration = switchboard_sdk::nats::DUPLICATE_WINDOW;

/// Sets up logging to stderr: human-readable text, or JSON lines with
/// `json`. `RUST_LOG` overrides `default_filter` (e.g. `info`).
pub fn init_logging(json: bool, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
