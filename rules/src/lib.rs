//! Chains: what an account configures, how it is checked and stored, and which
//! chains an event runs.
//!
//! This crate knows chains and how they match events. It runs no handler and
//! opens no network connection: handler-specific checks come in through the
//! [`StepCatalog`] trait and `when` conditions through the [`Conditions`]
//! trait, both of which the handlers crate implements.

mod chain_store;
mod matching;
mod model;
mod selection;
mod validate;

pub use chain_store::{
    ChainChanges, ChainStore, ChainStoreError, ChainVersion, FROM_FILE, PRUNED_AT_ONCE,
    VERSIONS_KEPT,
};
pub use matching::{AccountChains, Routing, WAIT_FOR_EVENT};
pub use model::{
    ChainFile, ChainSpec, Concurrency, Control, DEFAULT_CHAIN, Debounce, EventMatch, Limit,
    OnError, Order, Pattern, RetrySpec, SAME_CONVERSATION, StepConfig, StepSpec, duration,
};
pub use selection::{Conditions, Selected, select_chains};
pub use validate::{
    ChainProblem, FieldProblem, Format, ParseError, StepCatalog, ValidChainFile, ValidationError,
    from_toml, parse_chain_file, toml_error_message, validate, validate_deferring_secrets,
};

#[cfg(test)]
mod tests;
