//! A conversation worker that emits `poll_complete` events to Switchboard over
//! NATS JetStream with `switchboard-sdk` (feature `nats`): the example to copy.
//!
//! ```sh
//! cargo run -p switchboard-example-worker -- --nats nats://127.0.0.1:4222 --account acme --count 3
//! ```
//!
//! For each event it prints `ID sequence=N duplicate=false|true`. The
//! emitter waits for JetStream's ack and retries a failed publish with the
//! same event id (`Nats-Msg-Id`), so a retry that follows a lost ack is stored
//! once: JetStream answers `duplicate=true`, which `--resend` shows.

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use switchboard_sdk::nats::{EmitError, NatsEmitter, connect_options};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

/// Emits `poll_complete` events (survey conversations) to Switchboard over NATS JetStream.
#[derive(Debug, Parser)]
pub struct Args {
    /// The NATS server; credentials may be given in it (nats://user:password@host:4222).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The inbox prefix that the worker's NATS user may subscribe to, where
    /// JetStream's acks arrive (see docs/nats-permissions.md).
    #[arg(long)]
    pub inbox_prefix: Option<String>,
    /// The account the events belong to.
    #[arg(long)]
    pub account: String,
    /// The survey (conversation key).
    #[arg(long, default_value = "poll-2026")]
    pub conversation: String,
    /// How many events to emit, for respondents 1, 2, ... (+27820000001, +27820000002, ...)
    #[arg(long, default_value_t = 3)]
    pub count: u32,
    /// Each respondent's score.
    #[arg(long, default_value_t = 4)]
    pub score: u32,
    /// Publish every event a second time, as a worker does when an ack is
    /// lost: JetStream stores it once and answers `duplicate=true`.
    #[arg(long)]
    pub resend: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(&Args::parse(), &mut std::io::stdout()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connects, emits the events and prints a line for each publish.
pub async fn run(args: &Args, out: &mut impl Write) -> Result<(), Box<dyn Error>> {
    // Credentials in the URL become connect options; the URL without them is
    // fit for messages.
    let (mut options, url) = connect_options(&args.nats);
    if let Some(prefix) = &args.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    let client = options
        .connect(&url)
        .await
        .map_err(|e| format!("cannot reach NATS at {url}: {e}"))?;
    // The dispatcher creates the stream VUMI_EVENTS when it starts: a worker
    // only publishes (and under the example permissions may do nothing else).
    let emitter = NatsEmitter::new(client);

    let publishes = if args.resend { 2 } else { 1 };
    for n in 1..=args.count {
        let (msisdn, name) = (format!("+2782{n:07}"), format!("Respondent {n}"));
        let event = poll_complete(
            &args.account,
            &args.conversation,
            &msisdn,
            &name,
            args.score,
        )?;
        for _ in 0..publishes {
            let emitted = emitter.emit(&event).await.map_err(|e| match e {
                EmitError::Publish { .. } => {
                    format!("{e} (is the dispatcher running? it creates the stream)")
                }
                e => e.to_string(),
            })?;
            writeln!(
                out,
                "{} sequence={} duplicate={}",
                event.id, emitted.sequence, emitted.duplicate
            )?;
        }
    }
    Ok(())
}

/// A `poll_complete` event of a survey: a new root event with a fresh v7 id.
/// The typed keys refuse values that break the contract.
pub fn poll_complete(
    account: &str,
    conversation: &str,
    msisdn: &str,
    name: &str,
    score: u32,
) -> Result<VumiApiEvent, Box<dyn Error>> {
    let mut data = serde_json::Map::new();
    data.insert("msisdn".into(), msisdn.into());
    data.insert("name".into(), name.into());
    data.insert("score".into(), score.into());
    Ok(VumiApiEvent::new(
        AccountKey::new(account)?,
        ConversationKey::new(conversation)?,
        ConversationType::new("survey")?,
        EventType::new("poll_complete")?,
        data,
    ))
}
