//! The dispatcher, put together: the configuration, the backend factory,
//! the wiring of the engine, the buses, the HTTP surface, the outbound ports
//! and the record stores ([`Dispatcher::start`]), the demo, and the CLI with
//! its [`client`] of a running dispatcher's API.
//!
//! Each part lives in a crate of its own under `dispatcher/` (see
//! `docs/architecture.md`); this one only wires them.

pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod runtime;
pub mod serve;
pub mod telemetry;

pub use config::Config;
pub use runtime::{AppliedFile, Dispatcher, StartError};

/// Sets up logging to stderr, without traces: human-readable text, or
/// JSON lines with `json`. `RUST_LOG` overrides `default_filter` (e.g.
/// `info`). `switchboard run` sets up traces too ([`telemetry::init`]).
pub fn init_logging(json: bool, default_filter: &str) {
    telemetry::init(json, default_filter, None);
}
