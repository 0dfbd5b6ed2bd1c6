//! The dispatcher's HTTP surface on one listener: the JSON API under `/v1`
//! ([`api`]), who may call it ([`auth`]), provider webhooks ([`inbound`]),
//! receiver tokens of the in-app inbox ([`receiver_tokens`]), the ingest
//! rate limit ([`ratelimit`]) and the web console at `/console`
//! ([`console`]). It reaches the engine and the
//! records through the state handed to [`api::router`], never the bus's or
//! the store's internals.

pub mod api;
pub mod auth;
pub mod console;
pub mod deadline;
pub mod inbound;
pub mod inbox_feed;
pub mod ratelimit;
pub mod receiver_tokens;
pub mod unsubscribe;
