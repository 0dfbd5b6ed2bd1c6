mod util;

mod bad_input;
mod chains_cli;
mod e2e_embedded;
mod e2e_nats;
mod matching;
