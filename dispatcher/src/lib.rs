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

pub use config::Config;
pub use runtime::{AppliedFile, Dispatcher, StartError};

/// Whether log lines are coloured: only on a terminal, and never with
/// `NO_COLOR` set to anything but the empty string (no-color.org).
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets up logging to stderr: human-readable text, or JSON lines with
/// `json`. `RUST_LOG` overrides `default_filter` (e.g. `info`).
pub fn init_logging(json: bool, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
