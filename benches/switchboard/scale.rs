//! Many accounts: 10, 1,000 and 10,000 accounts with 10 chains each. For each,
//! the dispatcher's start-up (applying the chain files, then again loading
//! them from its store), the cost of looking up and matching an event's
//! chains, and the route-only throughput with events spread over every
//! account and chain.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use switchboard_sdk::{EventType, VumiApiEvent};

use crate::common::{self, Dispatcher, NatsServer, Spec, mib, poll_event};
use crate::report::{Report, rate};

const PREFIX: &str = "vumi";
const SCALES: [u64; 3] = [10, 1_000, 10_000];
const CHAINS_PER_ACCOUNT: u64 = 10;

/// What one scale measured.
#[derive(Debug)]
struct Figures {
    accounts: u64,
    first_start: Duration,
    start: Duration,
    lookup_ns: f64,
    rate: f64,
    /// Resident once started, with every chain loaded.
    started_kib: u64,
    hwm_kib: u64,
}

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(100_000);
    let mut all = Vec::new();
    for accounts in SCALES {
        println!(
            "\n## scale: {accounts} accounts × {CHAINS_PER_ACCOUNT} chains, {n} events over all of them"
        );
        let figures = one_scale(options, accounts, n).await?;
        println!(
            "first start (applies {accounts} chain files) {:.2} s; start {:.2} s; \
             lookup + match {:.0} ns/event; {}; RSS {} MiB once started, peak {} MiB",
            figures.first_start.as_secs_f64(),
            figures.start.as_secs_f64(),
            figures.lookup_ns,
            rate(figures.rate),
            mib(figures.started_kib),
            mib(figures.hwm_kib)
        );
        all.push(figures);
    }

    println!();
    println!(
        "| accounts | first start s | start s | lookup ns/event | events/s | RSS started MiB | peak RSS MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for f in &all {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} |",
            f.accounts,
            f.first_start.as_secs_f64(),
            f.start.as_secs_f64(),
            f.lookup_ns,
            f.rate,
            mib(f.started_kib),
            mib(f.hwm_kib)
        );
    }
    for f in &all {
        report.figure(
            "scale",
            format!("{} accounts: start / lookup / throughput", f.accounts),
            format!(
                "{:.2} s / {:.0} ns / {}",
                f.start.as_secs_f64(),
                f.lookup_ns,
                rate(f.rate)
            ),
        );
    }
    let (small, large) = (&all[0], &all[all.len() - 1]);
    let growth = large.lookup_ns / small.lookup_ns;
    report.check(
        "scale",
        format!(
            "lookup cost, {} vs {} accounts",
            large.accounts, small.accounts
        ),
        format!("×{growth:.2}"),
        "flat (≤ ×1.5)",
        growth <= 1.5,
    );
    let kept = large.rate / small.rate;
    report.check(
        "scale",
        format!(
            "throughput, {} vs {} accounts",
            large.accounts, small.accounts
        ),
        format!("×{kept:.2}"),
        "does not fall (≥ ×0.8, noise)",
        kept >= 0.8,
    );
    report.check(
        "scale",
        format!("peak RSS at {} accounts", large.accounts),
        format!("{} MiB", mib(large.hwm_kib)),
        "< 300 MB",
        large.hwm_kib * 1024 < 300_000_000,
    );
    Ok(())
}

async fn one_scale(options: &crate::Options, accounts: u64, n: u64) -> anyhow::Result<Figures> {
    let root = tempfile::tempdir()?;
    let chains = write_chains(root.path(), accounts)?;
    let data = root.path().join("data");
    let server = NatsServer::start()?;
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    js.create_stream(switchboard_sdk::nats::events_stream_config(PREFIX))
        .await
        .context("creating the events stream")?;

    // First start: every chain file is validated and stored.
    let spec = Spec {
        data: &data,
        chains: Some(&chains),
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: None,
    };
    let dispatcher = Dispatcher::start(spec).await?;
    let first_start = dispatcher.start_took;
    dispatcher.stop().await;

    // The lookup the executor makes for every event, on the stored chains.
    let lookup_ns = {
        let store = switchboard_store::Store::open(&data.join("store"))
            .context("opening the dispatcher's store")?;
        let chain_store = switchboard_rules::ChainStore::open(store)?;
        let events: Vec<VumiApiEvent> = (0..4_096).map(|i| event(i, accounts)).collect();
        measure_lookup(&chain_store, &events)?
    };

    // A backlog spread over every account and chain, drained by a dispatcher
    // that loads its chains from its store.
    let (fill, _) = common::fill_nats(&js, PREFIX, n, |i| event(i, accounts)).await?;
    println!("backlog of {n} published in {:.1} s", fill.as_secs_f64());
    let mut dispatcher = Dispatcher::start(Spec {
        chains: None,
        ..spec
    })
    .await?;
    let start = dispatcher.start_took;
    let started_kib = dispatcher.rss_kib()?;
    let drain = crate::route::drain_nats(&mut dispatcher, &js, n).await?;
    let hwm_kib = dispatcher.hwm_kib()?;
    dispatcher.stop().await;
    Ok(Figures {
        accounts,
        first_start,
        start,
        lookup_ns,
        rate: n as f64 / drain.as_secs_f64(),
        started_kib,
        hwm_kib,
    })
}

/// The `i`th event: a pseudo-random account and one of its chains' types.
fn event(i: u64, accounts: u64) -> VumiApiEvent {
    // A multiplicative hash spreads consecutive events over the accounts.
    let account = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % accounts;
    let mut event = poll_event(&account_key(account), i, 100);
    event.event_type =
        EventType::new(format!("type_{}", i % CHAINS_PER_ACCOUNT)).expect("a valid event type");
    event
}

fn account_key(account: u64) -> String {
    format!("acct-{account:05}")
}

/// One file per account, each with 10 chains of one `log` step.
fn write_chains(root: &Path, accounts: u64) -> anyhow::Result<PathBuf> {
    let dir = root.join("chains");
    std::fs::create_dir_all(&dir)?;
    for account in 0..accounts {
        let key = account_key(account);
        let mut file = format!("account_key = \"{key}\"\n");
        for chain in 0..CHAINS_PER_ACCOUNT {
            file.push_str(&format!(
                r#"
[[chains]]
name = "chain-{chain}"
conversation_type = "survey"
event_type = "type_{chain}"

[[chains.steps]]
handler = "log"
config = {{ level = "debug", message = "{{{{ event.event_data.msisdn }}}} in {{{{ event.conversation_key }}}}" }}
"#
            ));
        }
        std::fs::write(dir.join(format!("{key}.toml")), file)?;
    }
    Ok(dir)
}

/// ns per event of what the executor does to find an event's chains: the
/// account's chains by key, then the ones matching the event.
fn measure_lookup(
    chains: &switchboard_rules::ChainStore,
    events: &[VumiApiEvent],
) -> anyhow::Result<f64> {
    let lookup = |e: &VumiApiEvent| {
        let account = chains
            .lookup(&e.account_key)
            .with_context(|| format!("account {} has no chains", e.account_key))?;
        let matched = account.route(e).chains().len();
        anyhow::ensure!(matched == 1, "{matched} chains matched, expected 1");
        Ok(black_box(matched))
    };
    for e in events {
        lookup(e)?;
    }
    let mut calls = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        for e in events {
            black_box(lookup(e)?);
        }
        calls += events.len() as u64;
    }
    Ok(started.elapsed().as_nanos() as f64 / calls as f64)
}
