//! `switchboard`: parses arguments and calls library code. Errors are reported
//! once, here, as one line on stderr with a non-zero exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use switchboard_dispatcher::cli::{self, CliError, EmitArgs};
use switchboard_dispatcher::client::Client;
use switchboard_dispatcher::config::{Overrides, RuntimeConfig};
use switchboard_dispatcher::{Config, Dispatcher, demo};

/// mimalloc rather than the system allocator: an event allocates a few
/// hundred small blocks across threads, and glibc's arenas spent a tenth of
/// the dispatcher's time on them and on their locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An event dispatcher with pluggable, chained handlers.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How commands reach a running dispatcher. The token comes from the
/// environment only (`SWITCHBOARD_TOKEN`), so that it never shows in a
/// process list or a shell history.
#[derive(Debug, Args)]
struct Remote {
    /// The dispatcher's API.
    #[arg(
        long,
        env = "SWITCHBOARD_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// Print JSON instead of text for people.
    #[arg(long, global = true)]
    json: bool,
}

impl Remote {
    /// A client that sends `SWITCHBOARD_TOKEN` as its bearer token.
    fn client(&self) -> Client {
        Client::new(
            &self.server,
            std::env::var("SWITCHBOARD_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        )
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the dispatcher (embedded bus unless --nats is given).
    Run(RunArgs),
    /// Run the dispatcher on the embedded bus with the example chains, emit sample events and show what the chains did.
    Demo(DemoArgs),
    /// Emit an event through a running dispatcher.
    Emit(EmitCommand),
    /// Manage an account's chains.
    #[command(subcommand)]
    Chains(ChainsCommand),
    /// Manage an account's Rhai scripts (`handler = "script:NAME"` in chains).
    #[command(subcommand)]
    Scripts(ScriptsCommand),
    /// Manage an account's message templates (e-mail and SMS, by slug).
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// Show the chains paused by a `delay` step, and when each goes on.
    #[command(subcommand)]
    Timers(TimersCommand),
    /// List the handlers a chain step can run, with the options each takes
    /// (and, given an account, its scripts).
    Handlers {
        /// The account whose scripts to list too.
        account: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List an account's events, the latest taken up first.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Show what the dispatcher did with an event.
    Trace {
        /// The account.
        account: String,
        /// The event id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Inspect events that could not be handled.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Manage an account's secrets (write-only: values are never shown).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Look at an account's contacts.
    #[command(subcommand)]
    Contacts(RecordsCommand),
    /// Look at the messages (SMS, e-mail) an account's chains sent, and at
    /// provider reports that matched none.
    #[command(subcommand)]
    Messages(MessagesCommand),
    /// Look at and manage the in-app notifications `notify` steps leave for
    /// a person, and mint the receiver tokens that open a person's inbox.
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// Manage the files an account attaches to its e-mails (`send_email`'s
    /// `attachments`).
    #[command(subcommand)]
    Files(FilesCommand),
    /// Manage the numbers and addresses an account owns, which replies are
    /// sent to (a reply becomes a `message_response` event of its owner).
    #[command(subcommand)]
    Numbers(NumbersCommand),
    /// See and set what a contact (or an address) opted in to and out of:
    /// sends to an address that opted out are recorded `suppressed`.
    #[command(subcommand)]
    Preferences(PreferencesCommand),
    /// Manage account tokens, which reach one account's API only (needs the admin token).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Manage the URLs providers post delivery reports and callbacks to.
    #[command(subcommand)]
    Inbound(InboundCommand),
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create a token for an account; it is printed this once and never again.
    Create {
        /// The account the token reaches.
        account: String,
        /// A name for people (e.g. the worker or person it is for).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List an account's tokens: ids, names, creation times (never the tokens).
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke a token: requests with it are refused from now on.
    Revoke {
        /// The account.
        account: String,
        /// The token's id (from `tokens list`).
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum InboxCommand {
    /// List a receiver's notifications, newest first, with the unread count.
    List {
        /// The account.
        account: String,
        /// The receiver (a contact's key, or the account's own id for the person).
        receiver: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only unread ones.
        #[arg(long)]
        unread: bool,
        /// Only those of this category.
        #[arg(long)]
        category: Option<String>,
        /// Only archived ones (otherwise those not archived).
        #[arg(long)]
        archived: bool,
        /// Go on from where a listing said `more: --before …`.
        #[arg(long)]
        before: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// A receiver's unread and total counts.
    Count {
        /// The account.
        account: String,
        /// The receiver.
        receiver: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Mark one notification: read, unread, archive or unarchive.
    Mark {
        /// The account.
        account: String,
        /// The receiver.
        receiver: String,
        /// The notification's id.
        id: String,
        /// read, unread, archive or unarchive.
        #[arg(value_parser = ["read", "unread", "archive", "unarchive"])]
        action: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Mark all of a receiver's notifications read.
    ReadAll {
        /// The account.
        account: String,
        /// The receiver.
        receiver: String,
        /// Only those of this category.
        #[arg(long)]
        category: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Mint a receiver token: it opens this receiver's inbox (`/v1/inbox`,
    /// the widget) and nothing else, until it expires or the account's
    /// key is rotated. Printed alone, for a script to hand on.
    Token {
        /// The account.
        account: String,
        /// The receiver.
        receiver: String,
        /// How long it lasts (at most 90d).
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// End every receiver token of the account (a new signing key).
    RotateTokens {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum FilesCommand {
    /// Store a file (its type is sniffed from its bytes and checked against
    /// the deployment's allow list; a file of that name is replaced).
    Put {
        /// The account.
        account: String,
        /// The name steps attach it by (`invoice-42.pdf`).
        name: String,
        /// The file to read.
        path: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the account's files.
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a file.
    Rm {
        /// The account.
        account: String,
        /// The file's name.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum NumbersCommand {
    /// Make an address the account's on a transport (refused when another
    /// account has it).
    Add {
        /// The account.
        account: String,
        /// The transport or provider replies come through (`twilio`, a Vumi
        /// transport's name).
        transport: String,
        /// An E.164 number, a short code, or an e-mail address.
        address: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the account's addresses.
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Give an address up: replies to it are kept as unmatched.
    Rm {
        /// The account.
        account: String,
        /// The transport.
        transport: String,
        /// The address.
        address: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum PreferencesCommand {
    /// Show a contact's (or an address's) preferences, per channel and topic.
    Show {
        /// The account.
        account: String,
        /// A contact's key, msisdn or e-mail, or an address no contact has.
        contact: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Opt a contact's address on a channel in or out, of everything on it
    /// or of one template or category.
    Set {
        /// The account.
        account: String,
        /// A contact's key, msisdn or e-mail, or an address no contact has.
        contact: String,
        /// `email` or `sms`.
        channel: String,
        /// `in` or `out`.
        #[arg(value_parser = ["in", "out"])]
        choice: String,
        /// Only the messages of this template (by slug).
        #[arg(long, conflicts_with = "category")]
        template: Option<String>,
        /// Only the messages of this template category.
        #[arg(long)]
        category: Option<String>,
        /// Why, recorded with the choice.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum MessagesCommand {
    /// List them.
    List {
        /// The account.
        account: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one in full, with its status transitions.
    Show {
        /// The account.
        account: String,
        /// The message id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a scheduled message (a send step's `scheduled_at`) before it
    /// goes; refused once it went.
    Cancel {
        /// The account.
        account: String,
        /// The message id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List records posted to inbound webhooks that matched nothing (unknown
    /// messages, undocumented event types, malformed records), newest first.
    Unmatched {
        /// The account.
        account: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum InboundCommand {
    /// Make the URL a provider posts to, and print it (once: only a hash of
    /// its secret is kept).
    Create {
        /// The account.
        account: String,
        /// sendgrid, twilio or webhook.
        provider: String,
        /// webhook: the account secret (`secrets set`) that signatures are checked with.
        #[arg(long)]
        secret: Option<String>,
        /// Replace the account's URL for this provider (the old one stops working).
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List an account's inbound webhooks (providers and when they were made; never their URLs).
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove an account's URL for a provider: it answers 404 from then on.
    Revoke {
        /// The account.
        account: String,
        /// The provider.
        provider: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Set a secret; the value is read from stdin unless --value is given.
    Set {
        /// The account.
        account: String,
        /// The secret's name (what chain steps refer to).
        name: String,
        /// The value (prefer stdin: command lines end up in shell history).
        #[arg(long)]
        value: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the names of an account's secrets.
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a secret; refused while a chain or an inbound webhook names it.
    Rm {
        /// The account.
        account: String,
        /// The secret's name.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum RecordsCommand {
    /// List them.
    List {
        /// The account.
        account: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one in full (a contact by key, msisdn or e-mail; a message by id).
    Show {
        /// The account.
        account: String,
        /// Which one.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Config file (TOML); flags and SWITCHBOARD_* variables override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL; without it the embedded bus is used.
    #[arg(long, env = "SWITCHBOARD_NATS_URL")]
    nats: Option<String>,
    /// Run as one of several replicas on one NATS JetStream cluster, sharing
    /// chains, scripts, secrets, contacts, the journal and the rest through
    /// a JetStream key-value bucket (`bus.replicated`).
    #[arg(long, env = "SWITCHBOARD_REPLICATED")]
    replicated: bool,
    /// With --replicated: how many replicas besides a partition's owner
    /// keep a copy of its state (`bus.standbys`; default: every replica).
    #[arg(long, env = "SWITCHBOARD_STANDBYS")]
    standbys: Option<u16>,
    /// Data directory.
    #[arg(long, env = "SWITCHBOARD_DATA")]
    data: Option<PathBuf>,
    /// Listen address of the HTTP API.
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Apply every chain file (*.toml, *.json) in this folder at start.
    #[arg(long, env = "SWITCHBOARD_CHAINS")]
    chains: Option<PathBuf>,
    /// First segment of every NATS subject (default: vumi).
    #[arg(long, env = "SWITCHBOARD_SUBJECT_PREFIX")]
    subject_prefix: Option<String>,
    /// Conversations handled at once.
    #[arg(long, env = "SWITCHBOARD_CONCURRENCY")]
    concurrency: Option<usize>,
    /// The async runtime's worker threads (`runtime.worker_threads`;
    /// default one per CPU).
    #[arg(long, env = "SWITCHBOARD_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Threads of the event path's own (`runtime.event_threads`; 0: the
    /// event path shares the runtime's worker threads; default 1 on a
    /// machine of up to 2 CPUs, else 0).
    #[arg(long, env = "SWITCHBOARD_EVENT_THREADS")]
    event_threads: Option<usize>,
    /// Hosts, addresses or networks that account URLs (webhooks) may reach
    /// even when private or loopback; added to `outbound.allow`. Repeat it,
    /// or separate entries with commas.
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_ALLOW", value_delimiter = ',')]
    outbound_allow: Vec<String>,
    /// The base URL providers post inbound webhooks to (default: http:// + the listen address).
    #[arg(long, env = "SWITCHBOARD_PUBLIC_URL")]
    public_url: Option<String>,
    /// Log lines as JSON.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Start the demo's peers and deliver to them, as `demo` does: SMS
    /// provider `gateway` and the payment gateway on 127.0.0.1:8090, e-mail
    /// provider `mail` to an SMTP sink; sets the webhook secret `gateway` of
    /// every account --chains applies. What they receive is logged.
    #[arg(long)]
    demo_peers: bool,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Folder of chain files to apply [default: the example chains, built in].
    #[arg(long)]
    chains: Option<PathBuf>,
    /// Listen address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Exit after showing the sample events instead of serving on.
    #[arg(long)]
    once: bool,
}

#[derive(Debug, Args)]
struct EmitCommand {
    /// The account.
    account: String,
    /// The conversation type (e.g. survey).
    conversation_type: String,
    /// The event type (e.g. poll_complete).
    event_type: String,
    /// The conversation key.
    #[arg(long, default_value = "cli")]
    conversation: String,
    /// event_data, a JSON object.
    #[arg(long, default_value = "{}")]
    data: String,
    /// Use this event id (a UUID), e.g. to retry an emit safely.
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, Subcommand)]
enum ChainsCommand {
    /// Apply chain files (TOML or JSON); each names its account. A file's
    /// chains replace the account's: chains it does not name are removed,
    /// unless --merge. Prints what each file added, changed and removed.
    Apply {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Keep the account's chains that the file does not name (a chain of
        /// the file replaces the one of the same name).
        #[arg(long)]
        merge: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List an account's chains.
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show an account's chains (or one chain) as a chain file.
    Show {
        /// The account.
        account: String,
        /// Only this chain.
        chain: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the versions of an account's chains.
    History {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Make an old version current again (as a new version).
    Restore {
        /// The account.
        account: String,
        /// The version to restore.
        #[arg(value_name = "VERSION")]
        chain_version: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show what the account's chains would do with a sample event (a dry run: every step simulated, nothing performed or published); exits with status 3 if a step would fail.
    Test {
        /// The account.
        account: String,
        /// The sample event: a JSON file, `-` for stdin, or the JSON itself
        /// (`'{...}'`); fields a worker may omit get defaults.
        #[arg(long)]
        event: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove one chain, or every chain with --all (as a new version).
    Rm {
        /// The account.
        account: String,
        /// The chain to remove.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        chain: Option<String>,
        /// Remove every chain of the account.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum TimersCommand {
    /// List an account's pending timers, the soonest first.
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum TemplatesCommand {
    /// Compile a template file (TOML) and store it as the next version of SLUG.
    Put {
        /// The account.
        account: String,
        /// The template's slug (lowercase letters, digits, - and _).
        slug: String,
        /// The template file: channel, subject/html/text, context schema.
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// List an account's templates.
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a template's file (the current version, or --at VERSION).
    Show {
        /// The account.
        account: String,
        /// The template.
        slug: String,
        /// An older version (`--version` is the program's own version).
        #[arg(long, value_name = "VERSION")]
        at: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a template's versions.
    Versions {
        /// The account.
        account: String,
        /// The template.
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Render a template's current version with a context and a recipient.
    Test {
        /// The account.
        account: String,
        /// The template.
        slug: String,
        /// The context (checked against the template's schema): a JSON
        /// file, `-` for stdin, or the JSON itself.
        #[arg(long)]
        context: Option<String>,
        /// The recipient (`name`, `email`, `phone`, fields): a JSON file,
        /// `-` for stdin, or the JSON itself.
        #[arg(long)]
        recipient: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a template (its versions are kept).
    Rm {
        /// The account.
        account: String,
        /// The template.
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum ScriptsCommand {
    /// Compile a Rhai script and store it as the next version of NAME.
    Put {
        /// The account.
        account: String,
        /// The script's name (chains use `script:NAME`).
        name: String,
        /// The Rhai source file.
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// List an account's scripts.
    List {
        /// The account.
        account: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a script's source (the current version, or --at VERSION).
    Show {
        /// The account.
        account: String,
        /// The script.
        name: String,
        /// An older version (`--version` is the program's own version).
        #[arg(long, value_name = "VERSION")]
        at: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run a script against a sample event (a dry run: its emits are shown, not published); exits with status 3 if it would fail.
    Test {
        /// The account.
        account: String,
        /// The script.
        name: String,
        /// The sample: an event, or {"event": ..., "steps": ..., "config": ...}; a
        /// JSON file, `-` for stdin, or the JSON itself (`'{...}'`).
        #[arg(long)]
        event: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a script (refused while a chain uses it; its versions are kept).
    Rm {
        /// The account.
        account: String,
        /// The script.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// The account's events, the latest taken up first, while their traces
    /// are kept: types, conversation, status and each chain's outcome.
    List {
        /// The account.
        account: String,
        /// At most this many (up to 500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue below this cursor (the `--before` a page ends with).
        #[arg(long)]
        before: Option<String>,
        /// Only events of this conversation type.
        #[arg(long = "conversation-type")]
        conversation_type: Option<String>,
        /// Only events of this type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events of this conversation.
        #[arg(long)]
        conversation: Option<String>,
        /// Only events with this status: done, running, dead, expired or unrouted.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run an event again, whole, as a new event (a new id: every chain
    /// from its first step, and steps with effects act again). To resume a
    /// dead event at its failed step, replay its dead letter instead.
    Rerun {
        /// The account.
        account: String,
        /// The event's id (its trace must still be kept).
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLettersCommand {
    /// List an account's dead letters, newest first.
    List {
        /// The account (`~unknown` for poison whose subject named no account).
        account: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one dead letter in full.
    Show {
        /// The account.
        account: String,
        /// The dead letter's id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Put a dead letter's event back on the bus. A failed step resumes
    /// there: the steps before it are not run again.
    Replay {
        /// The account.
        account: String,
        /// The dead letter's id (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter of the account (narrowed by --chain and --since).
        #[arg(long)]
        all: bool,
        /// With --all: only letters of this chain.
        #[arg(long, requires = "all")]
        chain: Option<String>,
        /// With --all: only letters filed since this RFC 3339 time or this
        /// long ago (30m, 2h, 1d).
        #[arg(long, requires = "all")]
        since: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a dead letter for good.
    Discard {
        /// The account.
        account: String,
        /// The dead letter's id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run`'s configuration says how many threads its runtime has, so it is
    // read before the runtime starts.
    let (config, runtime) = match &cli.command {
        Command::Run(args) => match run_config(args) {
            Ok(config) => {
                let runtime = config.runtime.build();
                (Some(config), runtime)
            }
            Err(message) => return report(Err(Failure::Error(message))),
        },
        _ => (None, RuntimeConfig::default().build()),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(command(cli, config)),
        Err(e) => report(Err(Failure::Error(format!(
            "starting the async runtime: {e}"
        )))),
    }
}

/// Runs `cli`'s command; `config` is `run`'s.
async fn command(cli: Cli, config: Option<Config>) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => run(args, config.expect("run's configuration is read"))
            .await
            .map_err(Failure::Error),
        Command::Demo(args) => {
            // Quiet internals; the `log` steps of the example chains still show.
            switchboard_dispatcher::init_logging(false, "warn,switchboard::log=info");
            demo::run(demo::DemoOptions {
                chains_dir: args.chains,
                listen: args.listen,
                once: args.once,
            })
            .await
            .map(|()| None)
            .map_err(|e| Failure::Error(e.to_string()))
        }
        Command::Emit(e) => {
            let args = EmitArgs {
                account: e.account,
                conversation_type: e.conversation_type,
                event_type: e.event_type,
                conversation: e.conversation,
                data: e.data,
                id: e.id,
            };
            print(cli::emit(&e.remote.client(), args, e.remote.json).await)
        }
        Command::Chains(c) => print(match c {
            ChainsCommand::Apply {
                files,
                merge,
                remote,
            } => cli::chains_apply(&remote.client(), &files, merge, remote.json).await,
            ChainsCommand::List { account, remote } => {
                cli::chains_list(&remote.client(), &account, remote.json).await
            }
            ChainsCommand::Show {
                account,
                chain,
                remote,
            } => cli::chains_show(&remote.client(), &account, chain.as_deref(), remote.json).await,
            ChainsCommand::History { account, remote } => {
                cli::chains_history(&remote.client(), &account, remote.json).await
            }
            ChainsCommand::Restore {
                account,
                chain_version,
                remote,
            } => cli::chains_restore(&remote.client(), &account, chain_version, remote.json).await,
            ChainsCommand::Test {
                account,
                event,
                remote,
            } => cli::chains_test(&remote.client(), &account, &event, remote.json).await,
            ChainsCommand::Rm {
                account,
                chain,
                remote,
                ..
            } => cli::chains_rm(&remote.client(), &account, chain.as_deref(), remote.json).await,
        }),
        Command::Events(EventsCommand::List {
            account,
            limit,
            before,
            conversation_type,
            event_type,
            conversation,
            status,
            remote,
        }) => {
            let query = cli::EventListQuery {
                limit: Some(limit),
                before,
                filters: cli::TailQuery {
                    conversation_type,
                    event_type,
                    conversation_key: conversation,
                    status,
                },
            };
            print(cli::events_list(&remote.client(), &account, &query, remote.json).await)
        }
        Command::Events(EventsCommand::Rerun {
            account,
            id,
            remote,
        }) => print(cli::events_rerun(&remote.client(), &account, &id, remote.json).await),
        Command::Handlers { account, remote } => {
            print(cli::handlers(&remote.client(), account.as_deref(), remote.json).await)
        }
        Command::Scripts(c) => print(match c {
            ScriptsCommand::Put {
                account,
                name,
                file,
                remote,
            } => cli::scripts_put(&remote.client(), &account, &name, &file, remote.json).await,
            ScriptsCommand::List { account, remote } => {
                cli::scripts_list(&remote.client(), &account, remote.json).await
            }
            ScriptsCommand::Show {
                account,
                name,
                at,
                remote,
            } => cli::scripts_show(&remote.client(), &account, &name, at, remote.json).await,
            ScriptsCommand::Test {
                account,
                name,
                event,
                remote,
            } => cli::scripts_test(&remote.client(), &account, &name, &event, remote.json).await,
            ScriptsCommand::Rm {
                account,
                name,
                remote,
            } => cli::scripts_rm(&remote.client(), &account, &name, remote.json).await,
        }),
        Command::Timers(TimersCommand::List { account, remote }) => {
            print(cli::timers_list(&remote.client(), &account, remote.json).await)
        }
        Command::Templates(c) => print(match c {
            TemplatesCommand::Put {
                account,
                slug,
                file,
                remote,
            } => cli::templates_put(&remote.client(), &account, &slug, &file, remote.json).await,
            TemplatesCommand::List { account, remote } => {
                cli::templates_list(&remote.client(), &account, remote.json).await
            }
            TemplatesCommand::Show {
                account,
                slug,
                at,
                remote,
            } => cli::templates_show(&remote.client(), &account, &slug, at, remote.json).await,
            TemplatesCommand::Versions {
                account,
                slug,
                remote,
            } => cli::templates_versions(&remote.client(), &account, &slug, remote.json).await,
            TemplatesCommand::Test {
                account,
                slug,
                context,
                recipient,
                remote,
            } => {
                cli::templates_test(
                    &remote.client(),
                    &account,
                    &slug,
                    context.as_deref(),
                    recipient.as_deref(),
                    remote.json,
                )
                .await
            }
            TemplatesCommand::Rm {
                account,
                slug,
                remote,
            } => cli::templates_rm(&remote.client(), &account, &slug, remote.json).await,
        }),
        Command::Trace {
            account,
            id,
            remote,
        } => print(cli::trace(&remote.client(), &account, &id, remote.json).await),
        Command::DeadLetters(d) => print(match d {
            DeadLettersCommand::List {
                account,
                limit,
                remote,
            } => cli::dead_letters_list(&remote.client(), &account, limit, remote.json).await,
            DeadLettersCommand::Show {
                account,
                id,
                remote,
            } => cli::dead_letters_show(&remote.client(), &account, &id, remote.json).await,
            DeadLettersCommand::Replay {
                account,
                id: Some(id),
                remote,
                ..
            } => cli::dead_letters_replay(&remote.client(), &account, &id, remote.json).await,
            DeadLettersCommand::Replay {
                account,
                chain,
                since,
                remote,
                ..
            } => {
                cli::dead_letters_replay_all(
                    &remote.client(),
                    &account,
                    chain.as_deref(),
                    since.as_deref(),
                    remote.json,
                )
                .await
            }
            DeadLettersCommand::Discard {
                account,
                id,
                remote,
            } => cli::dead_letters_discard(&remote.client(), &account, &id, remote.json).await,
        }),
        Command::Secrets(c) => print(match c {
            SecretsCommand::Set {
                account,
                name,
                value,
                remote,
            } => cli::secrets_set(&remote.client(), &account, &name, value, remote.json).await,
            SecretsCommand::List { account, remote } => {
                cli::secrets_list(&remote.client(), &account, remote.json).await
            }
            SecretsCommand::Rm {
                account,
                name,
                remote,
            } => cli::secrets_rm(&remote.client(), &account, &name, remote.json).await,
        }),
        Command::Contacts(c) => print(match c {
            RecordsCommand::List {
                account,
                limit,
                remote,
            } => cli::contacts_list(&remote.client(), &account, limit, remote.json).await,
            RecordsCommand::Show {
                account,
                id,
                remote,
            } => cli::contacts_show(&remote.client(), &account, &id).await,
        }),
        Command::Messages(c) => print(match c {
            MessagesCommand::List {
                account,
                limit,
                remote,
            } => cli::messages_list(&remote.client(), &account, limit, remote.json).await,
            MessagesCommand::Show {
                account,
                id,
                remote,
            } => cli::messages_show(&remote.client(), &account, &id).await,
            MessagesCommand::Cancel {
                account,
                id,
                remote,
            } => cli::messages_cancel(&remote.client(), &account, &id, remote.json).await,
            MessagesCommand::Unmatched {
                account,
                limit,
                remote,
            } => cli::messages_unmatched(&remote.client(), &account, limit, remote.json).await,
        }),
        Command::Inbox(c) => print(match c {
            InboxCommand::List {
                account,
                receiver,
                limit,
                unread,
                category,
                archived,
                before,
                remote,
            } => {
                let query = cli::InboxQuery {
                    limit: Some(limit),
                    before,
                    unread: unread.then_some(true),
                    category,
                    archived: archived.then_some(true),
                };
                cli::inbox_list(&remote.client(), &account, &receiver, &query, remote.json).await
            }
            InboxCommand::Count {
                account,
                receiver,
                remote,
            } => cli::inbox_count(&remote.client(), &account, &receiver, remote.json).await,
            InboxCommand::Mark {
                account,
                receiver,
                id,
                action,
                remote,
            } => {
                cli::inbox_mark(
                    &remote.client(),
                    &account,
                    &receiver,
                    &id,
                    &action,
                    remote.json,
                )
                .await
            }
            InboxCommand::ReadAll {
                account,
                receiver,
                category,
                remote,
            } => {
                cli::inbox_read_all(
                    &remote.client(),
                    &account,
                    &receiver,
                    category.as_deref(),
                    remote.json,
                )
                .await
            }
            InboxCommand::Token {
                account,
                receiver,
                ttl,
                remote,
            } => {
                cli::inbox_token(
                    &remote.client(),
                    &account,
                    &receiver,
                    Some(&ttl),
                    remote.json,
                )
                .await
            }
            InboxCommand::RotateTokens { account, remote } => {
                cli::inbox_rotate_tokens(&remote.client(), &account, remote.json).await
            }
        }),
        Command::Files(c) => print(match c {
            FilesCommand::Put {
                account,
                name,
                path,
                remote,
            } => cli::files_put(&remote.client(), &account, &name, &path, remote.json).await,
            FilesCommand::List { account, remote } => {
                cli::files_list(&remote.client(), &account, remote.json).await
            }
            FilesCommand::Rm {
                account,
                name,
                remote,
            } => cli::files_rm(&remote.client(), &account, &name, remote.json).await,
        }),
        Command::Numbers(c) => print(match c {
            NumbersCommand::Add {
                account,
                transport,
                address,
                remote,
            } => {
                let at = (transport.as_str(), address.as_str());
                cli::numbers_add(&remote.client(), &account, at, remote.json).await
            }
            NumbersCommand::List { account, remote } => {
                cli::numbers_list(&remote.client(), &account, remote.json).await
            }
            NumbersCommand::Rm {
                account,
                transport,
                address,
                remote,
            } => {
                let at = (transport.as_str(), address.as_str());
                cli::numbers_rm(&remote.client(), &account, at, remote.json).await
            }
        }),
        Command::Preferences(c) => print(match c {
            PreferencesCommand::Show {
                account,
                contact,
                remote,
            } => cli::preferences_show(&remote.client(), &account, &contact, remote.json).await,
            PreferencesCommand::Set {
                account,
                contact,
                channel,
                choice,
                template,
                category,
                reason,
                remote,
            } => {
                let topic = match (template, category) {
                    (Some(slug), _) => Some(format!("template:{slug}")),
                    (None, Some(name)) => Some(format!("category:{name}")),
                    (None, None) => None,
                };
                let set = cli::SetPreference {
                    channel,
                    subscribed: choice == "in",
                    topic,
                    reason,
                };
                cli::preferences_set(&remote.client(), &account, &contact, set, remote.json).await
            }
        }),
        Command::Inbound(c) => print(match c {
            InboundCommand::Create {
                account,
                provider,
                secret,
                rotate,
                remote,
            } => {
                cli::inbound_create(
                    &remote.client(),
                    &account,
                    &provider,
                    secret.as_deref(),
                    rotate,
                    remote.json,
                )
                .await
            }
            InboundCommand::List { account, remote } => {
                cli::inbound_list(&remote.client(), &account, remote.json).await
            }
            InboundCommand::Revoke {
                account,
                provider,
                remote,
            } => cli::inbound_revoke(&remote.client(), &account, &provider, remote.json).await,
        }),
        Command::Tokens(c) => print(match c {
            TokensCommand::Create {
                account,
                name,
                remote,
            } => cli::tokens_create(&remote.client(), &account, name.as_deref(), remote.json).await,
            TokensCommand::List { account, remote } => {
                cli::tokens_list(&remote.client(), &account, remote.json).await
            }
            TokensCommand::Revoke {
                account,
                id,
                remote,
            } => cli::tokens_revoke(&remote.client(), &account, &id, remote.json).await,
        }),
    };
    report(result)
}

/// Prints a command's result and gives its exit code.
fn report(result: Result<Option<String>, Failure>) -> ExitCode {
    match result {
        Ok(Some(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(Failure::WouldFail { report, summary }) => {
            println!("{report}");
            eprintln!("switchboard: {summary}");
            ExitCode::from(cli::WOULD_FAIL_EXIT)
        }
        Err(Failure::Error(message)) => {
            eprintln!("switchboard: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Why a command did not succeed.
enum Failure {
    /// An error: one line on stderr, exit code 1.
    Error(String),
    /// A dry run that would fail: its report on stdout, which steps on
    /// stderr, exit code [`cli::WOULD_FAIL_EXIT`].
    WouldFail { report: String, summary: String },
}

fn print(result: Result<String, CliError>) -> Result<Option<String>, Failure> {
    result.map(Some).map_err(|e| match e {
        CliError::WouldFail { report, summary } => Failure::WouldFail { report, summary },
        other => Failure::Error(other.to_string()),
    })
}

/// `run`'s configuration: its file, with the flags and variables given.
fn run_config(args: &RunArgs) -> Result<Config, String> {
    let overrides = Overrides {
        nats_url: args.nats.clone(),
        replicated: args.replicated,
        standbys: args.standbys,
        data_dir: args.data.clone(),
        listen: args.listen,
        subject_prefix: args.subject_prefix.clone(),
        concurrency: args.concurrency,
        outbound_allow: args.outbound_allow.clone(),
        admin_token: std::env::var("SWITCHBOARD_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        public_url: args.public_url.clone(),
        worker_threads: args.worker_threads,
        event_threads: args.event_threads,
    };
    Config::load(args.config.as_deref(), overrides).map_err(|e| e.to_string())
}

async fn run(args: RunArgs, mut config: Config) -> Result<Option<String>, String> {
    let telemetry = switchboard_dispatcher::telemetry::init(
        args.log_format == "json",
        "info",
        Some(&config.otel),
    );
    let peers = if args.demo_peers {
        let peers = demo::DemoPeers::start(&mut config).await;
        Some(peers.map_err(|e| e.to_string())?)
    } else {
        None
    };
    let secrets = if peers.is_some() {
        demo::DemoPeers::SECRETS
    } else {
        &[]
    };
    let dispatcher = Dispatcher::start_with_secrets(config, args.chains.as_deref(), secrets)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(peers) = peers {
        eprintln!(
            "demo peers on http://{}: webhook secret \"gateway\" set for the accounts applied",
            demo::PEERS_ADDR
        );
        peers.log_what_arrives();
    }
    for applied in dispatcher.applied() {
        eprintln!(
            "applied {} → account {} {}",
            applied.path.display(),
            applied.account,
            applied
                .version
                .map_or("unchanged".to_string(), |v| format!("at chain version {v}"))
        );
    }
    if let Some(path) = dispatcher.admin_token_file() {
        eprintln!(
            "admin token in {} (for the CLI: export SWITCHBOARD_TOKEN=\"$(cat {})\")",
            path.display(),
            path.display()
        );
    }
    eprintln!(
        "console at http://{}/console (sign in with the admin token or an account token)",
        dispatcher.local_addr()
    );
    // The address on stdout, so that scripts (and tests) can find a port chosen by the OS.
    println!("listening on http://{}", dispatcher.local_addr());
    switchboard_dispatcher::runtime::wait_for_shutdown_signal().await;
    dispatcher.shutdown().await;
    telemetry.shutdown().await;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
