//! Steps with effects, drained from a backlog by a freshly started
//! dispatcher: `create_contact` → `log` (every event a new contact), with the
//! dispatcher's CPU per event over the first and the last slice of the drain
//! as the contact store grows; the same chain for returning contacts (each
//! account's events over 1,000 numbers); and `create_contact` →
//! `payment_webhook` (signed) to a keep-alive HTTP receiver in this program.
//!
//! Each backlog goes on a fresh server while no dispatcher runs: a first
//! start applies the chain files (and gives the accounts the webhook
//! secret) and is shut down; then the backlog is published, and a second
//! start, loading its chains from its store as after a restart, drains it.

use std::path::Path;

use anyhow::bail;

use crate::common::{Dispatcher, EventsBus, Spec, poll_chain, poll_event};
use crate::compare::{Build, PerBuild, times};
use crate::drain::{self, Drained, Slice};
use crate::receiver::{self, Receiver, SECRET_NAME};
use crate::report::{Report, Value, micros};

const PREFIX: &str = "vumi";
/// The events are spread over this many accounts.
pub const ACCOUNTS: u64 = 8;
/// Events in each backlog (a tenth with `--quick`).
const EVENTS: u64 = 30_000;
/// The first and the last this many events are the slices whose CPU per
/// event shows whether the cost grows with the store.
const SLICE: u64 = 4_000;
/// How much more the last slice may cost per event than the first and still
/// count as flat.
const FLAT: f64 = 1.2;

/// The `i`th account's key.
pub fn account(i: u64) -> String {
    format!("bench-{i}")
}

/// `create_contact` (every event's msisdn is new) → `log` (below the log
/// level: rendered, not written).
pub fn contact_log_chain(account: &str) -> String {
    poll_chain(
        account,
        r#"
[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}" }

[[chains.steps]]
handler = "log"
config = { level = "debug", message = "{{ steps.create_contact.key }}" }
"#,
    )
}

/// `create_contact` → `payment_webhook` to `receiver`.
fn contact_webhook_chain(account: &str, receiver: std::net::SocketAddr) -> String {
    poll_chain(
        account,
        &format!(
            r#"
[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }}

[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "http://{receiver}/payments", secret = "{SECRET_NAME}", body = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}", amount_cents = "100", reference = "{{{{ event.id }}}}" }} }}
"#
        ),
    )
}

/// Writes one chain file for each of `accounts` into `root/chains`.
pub fn write_chains(
    root: &Path,
    accounts: impl IntoIterator<Item = String>,
    chain_file: impl Fn(&str) -> String,
) -> anyhow::Result<std::path::PathBuf> {
    let dir = root.join("chains");
    std::fs::create_dir_all(&dir)?;
    for account in accounts {
        std::fs::write(dir.join(format!("{account}.toml")), chain_file(&account))?;
    }
    Ok(dir)
}

/// The `i`th event of a backlog: the accounts in turn, every msisdn new.
pub fn event(i: u64) -> switchboard_sdk::VumiApiEvent {
    poll_event(&account(i % ACCOUNTS), i, 1_000)
}

/// Events in the one-conversation backlog (a tenth with `--quick`).
const ONE_CONVERSATION: u64 = 3_000;

/// The `i`th event of the one-conversation backlog: all of the first
/// account's first conversation, every msisdn new. Its events are handled
/// one after another, in order, each outside step waiting for the record of
/// the one before it to be durable: what one busy conversation can do.
fn one_conversation_event(i: u64) -> switchboard_sdk::VumiApiEvent {
    poll_event(&account(0), i, 1)
}

/// Numbers per account in the returning contacts' backlog.
const RETURNING: u64 = 1_000;

/// The `i`th event of the returning contacts' backlog: the accounts in
/// turn, each account's events over [`RETURNING`] numbers (the first of
/// each creates its contact, the others find it).
fn returning_event(i: u64) -> switchboard_sdk::VumiApiEvent {
    poll_event(&account(i % ACCOUNTS), i % (RETURNING * ACCOUNTS), 1_000)
}

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(EVENTS);
    let slice = options.scaled(SLICE);
    println!(
        "\n## effects: create_contact → log, {n} events over {ACCOUNTS} accounts, drained from a \
         backlog"
    );
    let log = PerBuild::measure(&options.builds, async |build| {
        let drained = drain_backlog(options, build, n, contact_log_chain, event).await?;
        let slices = drained.slice(0, slice).zip(drained.slice(n - slice, n));
        println!(
            "{}CPU per event over the first and the last {slice} events: {}",
            build.tag(),
            show_slices(slices)
        );
        Ok((drained, slices))
    })
    .await?;
    let log_drains = log.map(|(d, _)| d.clone());
    drain::print_ratios(&log_drains);

    println!(
        "\n## effects: create_contact → log for returning contacts, {n} events over {ACCOUNTS} \
         accounts × {RETURNING} numbers, drained from a backlog"
    );
    let returning = PerBuild::measure(&options.builds, async |build| {
        drain_backlog(options, build, n, contact_log_chain, returning_event).await
    })
    .await?;
    drain::print_ratios(&returning);

    println!(
        "\n## effects: create_contact → payment_webhook (signed, to a keep-alive receiver), {n} \
         events over {ACCOUNTS} accounts, drained from a backlog"
    );
    let webhook = PerBuild::measure(&options.builds, async |build| {
        drain_to_receiver(options, build, n, event).await
    })
    .await?;
    drain::print_ratios(&webhook);

    let one = options.scaled(ONE_CONVERSATION);
    println!(
        "\n## effects: create_contact → payment_webhook, {one} events of one conversation, \
         drained from a backlog"
    );
    let one_conversation = PerBuild::measure(&options.builds, async |build| {
        drain_to_receiver(options, build, one, one_conversation_event).await
    })
    .await?;
    drain::print_ratios(&one_conversation);

    report.drain("effects", "create_contact → log", &log_drains);
    report.check_cpu(
        "effects",
        format!("create_contact → log, dispatcher CPU per event, {n} events"),
        &log_drains.map(Drained::cpu_per_event_us),
        60.0,
    );
    // Judged only on slices long enough to tell (not in a --quick run).
    let flat = log.current.1.and_then(|(first, last)| {
        (first.telling() && last.telling()).then(|| growth(first, last) <= FLAT)
    });
    report.check(
        "effects",
        format!("create_contact → log, CPU per event, first / last {slice} events"),
        Value::text(&log.map(|(_, slices)| show_slices(*slices))),
        &format!("flat as the store grows (last ≤ ×{FLAT} the first)"),
        flat,
    );
    report.drain(
        "effects",
        format!("create_contact → log, returning contacts ({RETURNING} numbers an account)"),
        &returning,
    );
    report.drain("effects", "create_contact → payment_webhook", &webhook);
    report.check_cpu(
        "effects",
        "create_contact → payment_webhook, dispatcher CPU per event",
        &webhook.map(Drained::cpu_per_event_us),
        150.0,
    );
    report.drain(
        "effects",
        "create_contact → payment_webhook, one conversation",
        &one_conversation,
    );
    Ok(())
}

/// `172 µs / 180 µs (×1.05; events 0–412 / 2588–3000)`: the CPU per event
/// over the first and the last slice of a drain, and the stretches the
/// readings gave.
fn show_slices(slices: Option<(Slice, Slice)>) -> String {
    match slices {
        Some((first, last)) => format!(
            "{} / {} ({}; events {}–{} / {}–{}{})",
            micros(first.cpu_per_event),
            micros(last.cpu_per_event),
            times(growth(first, last)),
            first.from,
            first.to,
            last.from,
            last.to,
            if first.telling() && last.telling() {
                ""
            } else {
                "; too short to tell"
            }
        ),
        None => "no readings".into(),
    }
}

/// The last slice's CPU per event as a multiple of the first's.
fn growth(first: Slice, last: Slice) -> f64 {
    last.cpu_per_event.as_secs_f64() / first.cpu_per_event.as_secs_f64()
}

/// [`drain_backlog`] of `n` events made by `event` through `create_contact`
/// → `payment_webhook` to a receiver started for it, which must have had
/// every event's webhook.
async fn drain_to_receiver(
    options: &crate::Options,
    build: &Build,
    n: u64,
    event: fn(u64) -> switchboard_sdk::VumiApiEvent,
) -> anyhow::Result<Drained> {
    let receiver = Receiver::start().await?;
    let drained = drain_backlog(
        options,
        build,
        n,
        |account| contact_webhook_chain(account, receiver.addr),
        event,
    )
    .await?;
    let arrived = receiver.arrived() as u64;
    if arrived != n {
        bail!("the backlog is drained, but {arrived} of {n} events made a webhook");
    }
    println!(
        "{}{arrived} webhooks, {} repeated",
        build.tag(),
        receiver.repeats()
    );
    Ok(drained)
}

/// On a fresh server, a dispatcher of `build` applies a chain file made by
/// `chain_file` for each account (and gives each the webhook secret) and is
/// shut down; then `n` events made by `event` are published, and a freshly
/// started dispatcher drains them.
async fn drain_backlog(
    options: &crate::Options,
    build: &Build,
    n: u64,
    chain_file: impl Fn(&str) -> String,
    event: fn(u64) -> switchboard_sdk::VumiApiEvent,
) -> anyhow::Result<Drained> {
    let EventsBus { server, js, .. } = EventsBus::start(PREFIX).await?;
    let root = tempfile::tempdir()?;
    let chains = write_chains(root.path(), (0..ACCOUNTS).map(account), chain_file)?;
    let spec = Spec {
        binary: Some(&build.binary),
        data: &root.path().join("data"),
        chains: Some(&chains),
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: None,
    };
    let first = Dispatcher::start(spec).await?;
    for a in 0..ACCOUNTS {
        receiver::put_secret(&first, &account(a)).await?;
    }
    first.shut_down().await?;

    let mut dispatcher = drain::start_on_backlog(&js, spec, n, event, &build.tag()).await?;
    let drained = drain::nats(&mut dispatcher, &js, n).await?;
    drain::stop_after(dispatcher, &drained, &build.tag()).await?;
    Ok(drained)
}
