//! The command line: every command, its arguments and options, as clap
//! parses them (`main.rs` runs them).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use switchboard_dispatcher::client::Client;

/// An event dispatcher with pluggable, chained handlers.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How commands reach a running dispatcher. The token comes from the
/// environment only (`SWITCHBOARD_TOKEN`), so that it never shows in a
/// process list or a shell history.
#[derive(Debug, Args)]
pub(crate) struct Remote {
    /// The dispatcher's API.
    #[arg(
        long,
        env = "SWITCHBOARD_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub(crate) server: String,
    /// Print JSON instead of text for people.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

impl Remote {
    /// A client that sends `SWITCHBOARD_TOKEN` as its bearer token.
    pub(crate) fn client(&self) -> Client {
        Client::new(
            &self.server,
            std::env::var("SWITCHBOARD_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        )
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum TokensCommand {
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
pub(crate) enum InboxCommand {
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
pub(crate) enum FilesCommand {
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
pub(crate) enum NumbersCommand {
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
pub(crate) enum PreferencesCommand {
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
pub(crate) enum MessagesCommand {
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
pub(crate) enum InboundCommand {
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
pub(crate) enum SecretsCommand {
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
pub(crate) enum RecordsCommand {
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
pub(crate) struct RunArgs {
    /// Config file (TOML); flags and SWITCHBOARD_* variables override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// NATS server URL; without it the embedded bus is used.
    #[arg(long, env = "SWITCHBOARD_NATS_URL")]
    pub(crate) nats: Option<String>,
    /// Run as one of several replicas on one NATS JetStream cluster, sharing
    /// chains, scripts, secrets, contacts, the journal and the rest through
    /// a JetStream key-value bucket (`bus.replicated`).
    #[arg(long, env = "SWITCHBOARD_REPLICATED")]
    pub(crate) replicated: bool,
    /// With --replicated: how many replicas besides a partition's owner
    /// keep a copy of its state (`bus.standbys`; default: every replica).
    #[arg(long, env = "SWITCHBOARD_STANDBYS")]
    pub(crate) standbys: Option<u16>,
    /// Data directory.
    #[arg(long, env = "SWITCHBOARD_DATA")]
    pub(crate) data: Option<PathBuf>,
    /// Listen address of the HTTP API.
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    /// Apply every chain file (*.toml, *.json) in this folder at start.
    #[arg(long, env = "SWITCHBOARD_CHAINS")]
    pub(crate) chains: Option<PathBuf>,
    /// First segment of every NATS subject (default: vumi).
    #[arg(long, env = "SWITCHBOARD_SUBJECT_PREFIX")]
    pub(crate) subject_prefix: Option<String>,
    /// Conversations handled at once.
    #[arg(long, env = "SWITCHBOARD_CONCURRENCY")]
    pub(crate) concurrency: Option<usize>,
    /// The async runtime's worker threads (`runtime.worker_threads`;
    /// default one per CPU).
    #[arg(long, env = "SWITCHBOARD_WORKER_THREADS")]
    pub(crate) worker_threads: Option<usize>,
    /// Threads of the event path's own (`runtime.event_threads`; 0: the
    /// event path shares the runtime's worker threads; default 1 on a
    /// machine of up to 2 CPUs, else 0).
    #[arg(long, env = "SWITCHBOARD_EVENT_THREADS")]
    pub(crate) event_threads: Option<usize>,
    /// Hosts, addresses or networks that account URLs (webhooks) may reach
    /// even when private or loopback; added to `outbound.allow`. Repeat it,
    /// or separate entries with commas.
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_ALLOW", value_delimiter = ',')]
    pub(crate) outbound_allow: Vec<String>,
    /// The base URL providers post inbound webhooks to (default: http:// + the listen address).
    #[arg(long, env = "SWITCHBOARD_PUBLIC_URL")]
    pub(crate) public_url: Option<String>,
    /// Log lines as JSON.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub(crate) log_format: String,
    /// Start the demo's peers and deliver to them, as `demo` does: SMS
    /// provider `gateway` and the payment gateway on 127.0.0.1:8090, e-mail
    /// provider `mail` to an SMTP sink; sets the webhook secret `gateway` of
    /// every account --chains applies. What they receive is logged.
    #[arg(long)]
    pub(crate) demo_peers: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Folder of chain files to apply [default: the example chains, built in].
    #[arg(long)]
    pub(crate) chains: Option<PathBuf>,
    /// Listen address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// Exit after showing the sample events instead of serving on.
    #[arg(long)]
    pub(crate) once: bool,
}

#[derive(Debug, Args)]
pub(crate) struct EmitCommand {
    /// The account.
    pub(crate) account: String,
    /// The conversation type (e.g. survey).
    pub(crate) conversation_type: String,
    /// The event type (e.g. poll_complete).
    pub(crate) event_type: String,
    /// The conversation key.
    #[arg(long, default_value = "cli")]
    pub(crate) conversation: String,
    /// event_data, a JSON object.
    #[arg(long, default_value = "{}")]
    pub(crate) data: String,
    /// Use this event id (a UUID), e.g. to retry an emit safely.
    #[arg(long)]
    pub(crate) id: Option<String>,
    #[command(flatten)]
    pub(crate) remote: Remote,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ChainsCommand {
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
pub(crate) enum TimersCommand {
    /// List an account's pending timers, the soonest first.
    List {
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
pub(crate) enum TemplatesCommand {
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
pub(crate) enum ScriptsCommand {
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
pub(crate) enum EventsCommand {
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
pub(crate) enum DeadLettersCommand {
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
