//! Route-only: the dispatcher drains a backlog through one chain of one `log`
//! step (below the log level, so it renders but writes nothing), next to a
//! bare client consuming the same backlog on the same server; and the same
//! on the embedded bus. Each build drains a backlog of its own.

use std::path::Path;

use async_nats::jetstream;

use crate::common::{self, Dispatcher, EventsBus, Spec, poll_chain, poll_event};
use crate::compare::{Build, PerBuild};
use crate::drain::{self, Drained};
use crate::report::{Report, Value, mib_of, percent, rate};

const PREFIX: &str = "vumi";
const ACCOUNT: &str = "bench";

/// The one chain's step: every `poll_complete` of the account runs a `log`
/// step.
const LOG_STEP: &str = r#"
[[chains.steps]]
handler = "log"
config = { level = "debug", message = "{{ event.event_data.msisdn }} finished {{ event.conversation_key }}" }
"#;

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(200_000);
    println!("\n## route: one `log` step, {n} events on NATS");
    let nats = PerBuild::measure(&options.builds, async |build| {
        on_nats(options, build, n).await
    })
    .await?;
    let drains = nats.map(|(_, r)| r.drained.clone());
    drain::print_ratios(&drains);

    let m = options.scaled(50_000);
    println!("\n## route: one `log` step, {m} events on the embedded bus");
    let embedded = PerBuild::measure(&options.builds, async |build| {
        on_embedded(options, build, m).await
    })
    .await?;
    let embedded_drains = embedded.map(|r| r.drained.clone());
    drain::print_ratios(&embedded_drains);

    report.figure(
        "route",
        "raw pull consume + ack, same backlog",
        Value::of(&nats.map(|&(raw, _)| raw), rate),
    );
    report.drain("route", "dispatcher on NATS", &drains);
    let ratio = nats.map(|(raw, r)| r.drained.rate() / raw);
    report.check(
        "route",
        "dispatcher on NATS / raw consume + ack",
        Value::of(&ratio, percent),
        "≥ 50%",
        ratio.current >= 0.5,
    );
    report.check_cpu(
        "route",
        "dispatcher on NATS, CPU per event",
        &drains.map(Drained::cpu_per_event_us),
        20.0,
    );
    report.figure(
        "route",
        "peak RSS on NATS",
        Value::of(&nats.map(|(_, r)| r.hwm_kib as f64), mib_of),
    );
    report.drain("route", "dispatcher on the embedded bus", &embedded_drains);
    report.figure(
        "route",
        "peak RSS on the embedded bus",
        Value::of(&embedded.map(|r| r.hwm_kib as f64), mib_of),
    );
    Ok(())
}

/// What one build's drain of a backlog measured.
#[derive(Debug)]
struct Figures {
    drained: Drained,
    hwm_kib: u64,
}

/// A backlog of `n` on a fresh server; a bare consumer takes and acks it
/// (the bus's limit on this very backlog, events/s), then the dispatcher
/// drains it.
async fn on_nats(
    options: &crate::Options,
    build: &Build,
    n: u64,
) -> anyhow::Result<(f64, Figures)> {
    let EventsBus {
        server, js, stream, ..
    } = EventsBus::start(PREFIX).await?;
    let (fill, _) = common::fill_nats(&js, PREFIX, n, |i| poll_event(ACCOUNT, i, 1_000)).await?;
    let (taken, took) = common::raw_consume(&stream, "raw").await?;
    let raw = taken as f64 / took.as_secs_f64();
    println!(
        "{}backlog of {n} published in {:.1} s; raw pull consume + ack: {}",
        build.tag(),
        fill.as_secs_f64(),
        rate(raw)
    );
    let root = tempfile::tempdir()?;
    let figures = drain_with(options, build, root.path(), Some((server.url(), &js)), n).await?;
    Ok((raw, figures))
}

/// A backlog of `n` queued in a fresh data directory, drained by the
/// dispatcher on the embedded bus.
async fn on_embedded(options: &crate::Options, build: &Build, n: u64) -> anyhow::Result<Figures> {
    let root = tempfile::tempdir()?;
    let fill = common::fill_embedded(&root.path().join("data"), PREFIX, n, |i| {
        poll_event(ACCOUNT, i, 1_000)
    })
    .await?;
    println!(
        "{}backlog of {n} queued in {:.1} s",
        build.tag(),
        fill.as_secs_f64()
    );
    drain_with(options, build, root.path(), None, n).await
}

/// Starts a dispatcher of `build` with its data in `root`, on the NATS
/// server given or on the embedded bus, and waits until it has drained the
/// `n` events there.
async fn drain_with(
    options: &crate::Options,
    build: &Build,
    root: &Path,
    nats: Option<(&str, &jetstream::Context)>,
    n: u64,
) -> anyhow::Result<Figures> {
    let chains = write_chains(root)?;
    let mut dispatcher = Dispatcher::start(Spec {
        binary: Some(&build.binary),
        data: &root.join("data"),
        chains: Some(&chains),
        nats: nats.map(|(url, _)| url),
        concurrency: options.concurrency,
        config: None,
    })
    .await?;
    let drained = match nats {
        Some((_, js)) => drain::nats(&mut dispatcher, js, n).await?,
        None => drain::embedded(&mut dispatcher, Some(ACCOUNT), n).await?,
    };
    let hwm_kib = drain::stop_after(dispatcher, &drained, &build.tag()).await?;
    Ok(Figures { drained, hwm_kib })
}

fn write_chains(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = root.join("chains");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.toml"), poll_chain(ACCOUNT, LOG_STEP))?;
    Ok(dir)
}
