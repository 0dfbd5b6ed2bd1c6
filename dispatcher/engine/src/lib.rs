//! The engine: what happens to an event between the bus and its ack.
//!
//! [`consume`] takes deliveries off a [`bus::Bus`] and hands each to a
//! worker per conversation; the [`executor`] decodes it, selects its
//! chains, runs their steps through the handlers, records every step in the
//! [`journal`] and files what fails in [`dead_letters`]; the settler acks
//! once what was written is durable. [`trace`] reads traces back from the
//! journal and [`dry_run`] shows what chains would do; [`event_kinds`]
//! counts the kinds of event each account has had, and [`tail`] shows each
//! pass over an event to whoever watches. [`timers`] bring back the events
//! of chains paused by a `delay` step when their pause ends. The event path
//! runs on the shared runtime or on [`event_threads`] of its own.
//!
//! It knows the bus only through the [`bus`] ports, the state only through
//! the store crate and the handlers' record ports, and no HTTP.

pub mod bus;
pub mod consume;
pub mod dead_letters;
pub mod dry_run;
pub mod event_kinds;
pub mod event_threads;
pub mod executor;
pub mod journal;
pub mod limits;
pub mod metrics;
pub mod otel;
mod panicked;
pub mod tail;
pub mod timers;
pub mod trace;

pub use limits::LimitsConfig;
