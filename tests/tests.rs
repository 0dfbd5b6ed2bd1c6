//! End-to-end tests of the `switchboard` binary.

mod rhai;
