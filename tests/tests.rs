//! End-to-end tests of the `switchboard` binary against real peers on
//! loopback: one test binary, one module per concern.

mod peers;
mod util;

mod auth;
mod bad_input;
mod browser;
mod chains_cli;
mod changelog;
mod cloudevents;
mod cluster;
mod console;
mod crash;
mod delivery;
mod digests;
mod e2e_embedded;
mod e2e_nats;
mod files;
mod first_hour;
mod flow;
mod handlers;
mod http_limits;
mod inbound;
mod inbox;
mod matching;
mod metrics;
mod otel;
mod pauses;
mod preferences;
mod pull_stall;
mod replicas;
mod replies;
mod rhai;
mod templates;
mod workers;
