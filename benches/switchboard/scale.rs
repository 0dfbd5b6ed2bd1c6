//! Many accounts: 10, 1,000 and 10,000 accounts with 10 chains each. For each,
//! the dispatcher's start-up (applying the chain files, then again loading
//! them from its store), the cost of looking up and matching an event's
//! chains, and the route-only throughput (with the dispatcher's CPU per
//! event) with events spread over every account and chain.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use switchboard_sdk::{EventType, VumiApiEvent};

use crate::common::{Dispatcher, EventsBus, Spec, mib, poll_event};
use crate::compare::{Build, PerBuild, times};
use crate::drain::{self, Drained};
use crate::report::{Report, Value, mib_of};

const PREFIX: &str = "vumi";
const SCALES: [u64; 3] = [10, 1_000, 10_000];
const CHAINS_PER_ACCOUNT: u64 = 10;

/// What one scale measured with one build.
#[derive(Debug)]
struct Figures {
    first_start: Duration,
    start: Duration,
    /// In this process, on the current build's store only.
    lookup_ns: Option<f64>,
    drained: Drained,
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
        let figures = PerBuild::measure(&options.builds, async |build| {
            let f = one_scale(options, build, accounts, n).await?;
            println!(
                "{}first start (applies {accounts} chain files) {:.2} s; start {:.2} s; \
                 lookup + match {} ns/event; {}; RSS {} MiB once started, peak {} MiB",
                build.tag(),
                f.first_start.as_secs_f64(),
                f.start.as_secs_f64(),
                f.lookup_ns.map_or("-".into(), |ns| format!("{ns:.0}")),
                f.drained.describe(),
                mib(f.started_kib),
                mib(f.hwm_kib)
            );
            Ok(f)
        })
        .await?;
        let drains = figures.map(|f| f.drained.clone());
        drain::print_ratios(&drains);
        all.push((accounts, figures, drains));
    }

    println!();
    println!(
        "| accounts | build | first start s | start s | lookup ns/event | events/s | CPU µs/event | RSS started MiB | peak RSS MiB |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for (accounts, figures, _) in &all {
        let builds = std::iter::once(("current", &figures.current))
            .chain(figures.baseline.as_ref().map(|f| ("baseline", f)));
        for (build, f) in builds {
            println!(
                "| {accounts} | {build} | {:.2} | {:.2} | {} | {:.0} | {:.1} | {} | {} |",
                f.first_start.as_secs_f64(),
                f.start.as_secs_f64(),
                f.lookup_ns.map_or("-".into(), |ns| format!("{ns:.0}")),
                f.drained.rate(),
                f.drained.cpu_per_event_us(),
                mib(f.started_kib),
                mib(f.hwm_kib)
            );
        }
    }
    for (accounts, figures, drains) in &all {
        report.figure(
            "scale",
            format!("{accounts} accounts: start / lookup"),
            Value::text(&figures.map(|f| {
                format!(
                    "{:.2} s / {}",
                    f.start.as_secs_f64(),
                    f.lookup_ns.map_or("-".into(), |ns| format!("{ns:.0} ns"))
                )
            })),
        );
        report.drain("scale", format!("{accounts} accounts: throughput"), drains);
    }
    let ((small, small_figures, small_drains), (large, large_figures, large_drains)) =
        (&all[0], &all[all.len() - 1]);
    if let (Some(small_ns), Some(large_ns)) = (
        small_figures.current.lookup_ns,
        large_figures.current.lookup_ns,
    ) {
        let growth = large_ns / small_ns;
        report.check(
            "scale",
            format!("lookup cost, {large} vs {small} accounts"),
            times(growth),
            "flat (≤ ×1.5)",
            growth <= 1.5,
        );
    }
    let kept = large_drains.zip_with(small_drains, |l, s| l.rate() / s.rate());
    report.check(
        "scale",
        format!("throughput, {large} vs {small} accounts"),
        Value::of(&kept, times),
        "does not fall (≥ ×0.8, noise)",
        kept.current >= 0.8,
    );
    let hwm = large_figures.map(|f| f.hwm_kib as f64);
    report.check(
        "scale",
        format!("peak RSS at {large} accounts × {CHAINS_PER_ACCOUNT} chains"),
        Value::of(&hwm, mib_of),
        "< 150 MiB",
        hwm.current < 150.0 * 1024.0,
    );
    Ok(())
}

async fn one_scale(
    options: &crate::Options,
    build: &Build,
    accounts: u64,
    n: u64,
) -> anyhow::Result<Figures> {
    let root = tempfile::tempdir()?;
    let chains = write_chains(root.path(), accounts)?;
    let data = root.path().join("data");
    let EventsBus { server, js, .. } = EventsBus::start(PREFIX).await?;

    // First start: every chain file is validated and stored.
    let spec = Spec {
        binary: Some(&build.binary),
        data: &data,
        chains: Some(&chains),
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: None,
    };
    let dispatcher = Dispatcher::start(spec).await?;
    let first_start = dispatcher.start_took;
    dispatcher.stop().await;

    // The lookup the executor makes for every event, on the stored chains,
    // with this checkout's code (so not for another build's store).
    let lookup_ns = if build.is_current() {
        let store = switchboard_store::Store::open(&data.join("store"))
            .context("opening the dispatcher's store")?;
        let chain_store = switchboard_rules::ChainStore::open(store)?;
        let events: Vec<VumiApiEvent> = (0..4_096).map(|i| event(i, accounts)).collect();
        Some(measure_lookup(&chain_store, &events)?)
    } else {
        None
    };

    // A backlog spread over every account and chain, drained by a dispatcher
    // that loads its chains from its store.
    let mut dispatcher =
        drain::start_on_backlog(&js, spec, n, |i| event(i, accounts), &build.tag()).await?;
    let start = dispatcher.start_took;
    let started_kib = dispatcher.rss_kib()?;
    let drained = drain::nats(&mut dispatcher, &js, n).await?;
    let hwm_kib = dispatcher.hwm_kib()?;
    dispatcher.stop().await;
    Ok(Figures {
        first_start,
        start,
        lookup_ns,
        drained,
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
