//! Replicas: 1, 2 and 3 dispatchers with `--replicated` sharing one NATS
//! server, draining the same backlog through `create_contact` → `log` over
//! 32 accounts, two in each partition, so that the work divides among the
//! replicas by the partitions each holds (three of them again with one
//! standby copy of each partition, and with none: `bus.standbys`); and one
//! dispatcher with its own store, for the cost of keeping the state in the
//! changelog. The CPU per event is summed over the replicas; the
//! nats-server's CPU per event is printed beside it. After the one
//! replicated dispatcher's drain, a replica started with an empty data
//! directory is timed until it has caught up, and the changelog's size is
//! printed. Each setup drains three times (once with `--quick`), the
//! setups in turn; the drain of median CPU per event is reported, and the
//! median of the rounds' ratios: the ratio of three replicas' CPU to one's
//! moved by half between single runs on the shared development machine.
//! Last, the full chain's latency on three replicas at 500 events/s
//! offered ([`crate::chain::replicated`]).

use async_nats::jetstream;
use switchboard_bus::partitions::{PARTITIONS, partition_of};

use crate::common::{self, Dispatcher, NatsServer, Spec};
use crate::compare::{Build, PerBuild};
use crate::drain::{self, Drained, Sample};
use crate::effects::{contact_log_chain, write_chains};
use crate::report::{Report, Value};

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(20_000);
    println!(
        "\n## replicas: `create_contact` → `log`, {n} events over {} accounts (two in each \
         partition), one nats-server",
        accounts().len()
    );
    // Each setup drains `rounds` times, the setups in turn each round, so
    // that a change in the shared machine's load falls on all of them
    // alike; each figure is the drain of median CPU per event, and each
    // ratio the median of the rounds' ratios.
    let rounds = if options.quick { 1 } else { ROUNDS };
    let mut drains: Vec<Vec<PerBuild<Drained>>> = vec![Vec::new(); SETUPS.len()];
    for round in 0..rounds {
        for (setup, runs) in SETUPS.iter().zip(&mut drains) {
            println!("{} (round {} of {rounds}):", setup.what(), round + 1);
            let drained = PerBuild::measure(&options.builds, async |build| {
                drain_with(options, build, n, setup, round == 0).await
            })
            .await?;
            drain::print_ratios(&drained);
            runs.push(drained);
        }
    }
    // The own store's drains and one replica's, which the others are held
    // to, round by round: a ratio is the median of the rounds' ratios.
    let mut own: Option<&[PerBuild<Drained>]> = None;
    let mut one: Option<&[PerBuild<Drained>]> = None;
    for (setup, runs) in SETUPS.iter().zip(&drains) {
        let what = setup.what();
        if rounds > 1 {
            println!(
                "{what}: CPU per event over the rounds {} µs; the median's figures are reported",
                runs.iter()
                    .map(|r| format!("{:.1}", r.current.cpu_per_event_us()))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
        for (round, drained) in runs.iter().enumerate() {
            report.note_pauses("replicas", &format!("{what}, round {}", round + 1), drained);
        }
        let value = Value::drain(&median(runs));
        match (setup.replicas, setup.replicated) {
            (1, false) => {
                report.figure("replicas", what, value);
                own = Some(runs);
            }
            (1, true) => {
                report.figure("replicas", what, value);
                if let Some(own) = own {
                    let share = median_ratio(runs, own, Drained::rate);
                    report.check(
                        "replicas",
                        "1 replica's rate / the own store's",
                        Value::of(&share, |x| format!("{x:.2}")),
                        "≥ 0.6",
                        share.current >= 0.6,
                    );
                }
                one = Some(runs);
            }
            _ => {
                let one = one.expect("one replica's drains come first");
                let scaling = median_ratio(runs, one, Drained::rate);
                let value =
                    Value::join([value, Value::of(&scaling, |x| format!("×{x:.2} of one"))]);
                report.figure("replicas", what, value);
                if setup.replicas == 3 {
                    // Total CPU per event: what three replicas would cost
                    // with a core each, against one.
                    let cost = median_ratio(runs, one, Drained::cpu_per_event_us);
                    let copies = match setup.standbys {
                        None => String::new(),
                        Some(1) => " (one standby copy)".to_string(),
                        Some(s) => format!(" ({s} standby copies)"),
                    };
                    report.check(
                        "replicas",
                        format!("3 replicas' CPU per event / 1 replica's{copies}"),
                        Value::of(&cost, |x| format!("×{x:.2}")),
                        "≤ 1.25",
                        cost.current <= 1.25,
                    );
                }
            }
        }
    }
    crate::chain::replicated(options, report).await
}

/// The scenario's accounts: the first two of `bench-0`, `bench-1`, … in
/// each of the 16 partitions, so that the work divides among replicas by
/// the partitions each holds. With a few accounts (the other scenarios'
/// eight) some replicas would hold none of theirs and sit idle.
fn accounts() -> &'static [String] {
    static ACCOUNTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ACCOUNTS.get_or_init(|| {
        let mut in_partition = [0u8; PARTITIONS as usize];
        (0..)
            .map(|i| format!("bench-{i}"))
            .filter(|a| {
                let held = &mut in_partition[usize::from(partition_of(a))];
                *held += 1;
                *held <= 2
            })
            .take(32)
            .collect()
    })
}

/// The `i`th event of a backlog: the accounts in turn, every msisdn new.
fn event(i: u64) -> switchboard_sdk::VumiApiEvent {
    let accounts = accounts();
    common::poll_event(&accounts[i as usize % accounts.len()], i, 1_000)
}

/// How many times each setup drains a backlog (once with `--quick`).
const ROUNDS: usize = 3;

/// One way of running the dispatchers: how many, sharing state or each
/// with its own store, and how many standby copies of each partition
/// (`None`: one on every replica).
struct Setup {
    replicas: usize,
    replicated: bool,
    standbys: Option<u16>,
}

const SETUPS: [Setup; 6] = [
    Setup::new(1, false, None),
    Setup::new(1, true, None),
    Setup::new(2, true, None),
    Setup::new(3, true, None),
    Setup::new(3, true, Some(1)),
    Setup::new(3, true, Some(0)),
];

impl Setup {
    const fn new(replicas: usize, replicated: bool, standbys: Option<u16>) -> Self {
        Self {
            replicas,
            replicated,
            standbys,
        }
    }

    fn what(&self) -> String {
        let replicas = self.replicas;
        match (self.replicated, self.standbys) {
            (false, _) => "1 dispatcher, own store".to_string(),
            (true, None) => format!("{replicas} replica(s), shared state"),
            (true, Some(1)) => format!("{replicas} replicas, one standby copy"),
            (true, Some(s)) => format!("{replicas} replicas, {s} standby copies"),
        }
    }
}

/// Of each build's drains, the one of median CPU per event.
fn median(runs: &[PerBuild<Drained>]) -> PerBuild<Drained> {
    median_by(runs, Drained::cpu_per_event_us)
}

/// Of each build's values over the rounds, the one of median `key`.
fn median_by<T: Clone>(runs: &[PerBuild<T>], key: fn(&T) -> f64) -> PerBuild<T> {
    let middle = |mut values: Vec<&T>| {
        values.sort_by(|a, b| key(a).total_cmp(&key(b)));
        values[values.len() / 2].clone()
    };
    PerBuild {
        current: middle(runs.iter().map(|r| &r.current).collect()),
        baseline: runs
            .iter()
            .map(|r| r.baseline.as_ref())
            .collect::<Option<Vec<_>>>()
            .filter(|b| !b.is_empty())
            .map(middle),
    }
}

/// `figure` of each round's drain over `figure` of the same round's `base`,
/// build by build: the median over the rounds.
fn median_ratio(
    runs: &[PerBuild<Drained>],
    base: &[PerBuild<Drained>],
    figure: fn(&Drained) -> f64,
) -> PerBuild<f64> {
    let ratios: Vec<PerBuild<f64>> = runs
        .iter()
        .zip(base)
        .map(|(r, b)| r.map(figure).zip_with(&b.map(figure), |x, b| x / b))
        .collect();
    median_by(&ratios, |x| *x)
}

/// Starts `setup`'s dispatchers of `build` on a fresh server, waits until
/// they have divided the partitions, and publishes the backlog; the drain
/// runs from the first publish until the consumers have acked everything.
/// A baseline build is given no `bus.standbys` (it may not know it): it
/// keeps a copy on every replica. In the `first_round`, it also times a
/// fresh replica's catch-up (after one replica's drain) and the listings
/// through the API (after the drain of replicas without standby copies).
async fn drain_with(
    options: &crate::Options,
    build: &Build,
    n: u64,
    setup: &Setup,
    first_round: bool,
) -> anyhow::Result<Drained> {
    let Setup {
        replicas,
        replicated,
        standbys,
    } = *setup;
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let chains = write_chains(root.path(), accounts().iter().cloned(), contact_log_chain)?;
    let config = root.path().join("switchboard.toml");
    let mut bus = format!("[bus]\nreplicated = {replicated}\n");
    match standbys {
        Some(s) if build.is_current() => bus.push_str(&format!("standbys = {s}\n")),
        Some(_) => println!(
            "{}  (every replica keeps a copy: no bus.standbys given)",
            build.tag()
        ),
        None => {}
    }
    std::fs::write(&config, bus)?;
    let mut dispatchers = Vec::new();
    for i in 0..replicas {
        dispatchers.push(
            Dispatcher::start(Spec {
                binary: Some(&build.binary),
                data: &root.path().join(format!("data-{i}")),
                // The first applies the files; the others share them.
                chains: (i == 0).then_some(chains.as_path()),
                nats: Some(server.url()),
                concurrency: options.concurrency,
                config: Some(&config),
            })
            .await?,
        );
    }
    if replicated {
        settled(&dispatchers).await?;
    }
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    let cpu_before = dispatchers
        .iter()
        .map(Dispatcher::cpu_time)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let since = Sample::now(&dispatchers)?;
    let server_cpu = common::cpu_time(server.pid())?;
    // Watched while it is published, so that a pause at the start is seen
    // as it is, not as the time publishing took.
    let (_, drained) = tokio::try_join!(
        common::fill_nats(&js, "vumi", n, event),
        drain::nats_by(&mut dispatchers, &js, n, since)
    )?;
    let server_cpu = common::cpu_time(server.pid())? - server_cpu;
    println!("{}{}", build.tag(), drained.describe());
    if replicas > 1 {
        println!(
            "{}  each replica's CPU over the drain, with the accounts whose partitions it \
             held: {}",
            build.tag(),
            shares(&dispatchers, &cpu_before).await?
        );
    }
    println!(
        "{}  nats-server CPU per event (storing, delivering, acks{}): {:.1} µs",
        build.tag(),
        if replicated { ", the changelog" } else { "" },
        server_cpu.as_secs_f64() * 1e6 / n as f64
    );
    if first_round && replicated && replicas == 1 {
        catch_up(options, build, &js, root.path(), &server, n).await?;
    }
    if first_round && standbys == Some(0) && build.is_current() {
        reads_at_the_owner(build, &dispatchers).await?;
    }
    for d in dispatchers {
        d.stop().await;
    }
    Ok(drained)
}

/// Each of `dispatchers`' CPU time since `before`, and how many of the
/// scenario's accounts it held the partitions of: `1.62 s (5 accounts),
/// …`. The work divides by account, so with few accounts it divides
/// unevenly.
async fn shares(
    dispatchers: &[Dispatcher],
    before: &[std::time::Duration],
) -> anyhow::Result<String> {
    let mut each = Vec::new();
    for (d, before) in dispatchers.iter().zip(before) {
        let held = d.state_partitions().await?;
        let accounts = accounts()
            .iter()
            .filter(|a| held.contains(&u64::from(partition_of(a))))
            .count();
        let cpu = d.cpu_time()? - *before;
        each.push(format!("{:.2} s ({accounts} accounts)", cpu.as_secs_f64()));
    }
    Ok(each.join(", "))
}

/// Waits until the replicas have divided the partitions' state among
/// themselves, each holding a term on its share: the drain measures the
/// replicas as they run, not the first one handing partitions over to the
/// others as they join (a replica takes an idle partition once it has
/// pulled it for 5 s).
async fn settled(dispatchers: &[Dispatcher]) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let mut shares = Vec::new();
        for d in dispatchers {
            shares.push(d.state_partitions().await?);
        }
        let mut every: Vec<u64> = shares.iter().flatten().copied().collect();
        every.sort_unstable();
        if shares.iter().all(|s| !s.is_empty())
            && every == (0..u64::from(PARTITIONS)).collect::<Vec<u64>>()
        {
            return Ok(());
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            anyhow::bail!(
                "the {} replicas did not divide the partitions' state in 60 s: {shares:?}",
                dispatchers.len()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Times contact listings through each replica's API, which keeps no
/// standby copies: a replica answers an account of a partition it holds
/// from its own copy, any other at the partition's owner (one NATS request
/// per page of 256 entries).
async fn reads_at_the_owner(build: &Build, dispatchers: &[Dispatcher]) -> anyhow::Result<()> {
    const ROUNDS: usize = 25;
    for limit in [100, 1000] {
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        let mut listed_most = 0;
        for d in dispatchers {
            let held = d.state_partitions().await?;
            for account in accounts() {
                let partition = partition_of(account);
                let path = format!("/v1/accounts/{account}/contacts?limit={limit}");
                for _ in 0..ROUNDS {
                    let (took, listed) = d.get_timed(&path).await?;
                    let count = listed["contacts"].as_array().map_or(0, Vec::len);
                    anyhow::ensure!(count > 0, "GET {path} listed none: {listed}");
                    listed_most = listed_most.max(count);
                    if held.contains(&u64::from(partition)) {
                        local.push(took);
                    } else {
                        remote.push(took);
                    }
                }
            }
        }
        println!(
            "{}  a listing of up to {limit} contacts ({listed_most}) through a replica's API: \
             from its own copy {}, at the owner {}",
            build.tag(),
            latencies(&mut local),
            latencies(&mut remote),
        );
    }
    Ok(())
}

/// The median and 99th percentile of `took`, in ms.
fn latencies(took: &mut [std::time::Duration]) -> String {
    if took.is_empty() {
        return "(none)".to_string();
    }
    took.sort_unstable();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms ({} reads)",
        at(0.5),
        at(0.99),
        took.len()
    )
}

/// Times a replica started with an empty data directory until it has
/// caught up with the shared state (`/readyz`), and prints the changelog's
/// size: the records it holds (many to a message), against the events.
async fn catch_up(
    options: &crate::Options,
    build: &Build,
    js: &jetstream::Context,
    root: &std::path::Path,
    server: &NatsServer,
    n: u64,
) -> anyhow::Result<()> {
    let (messages, held) = changelog_size(js).await?;
    let started = std::time::Instant::now();
    let late = Dispatcher::start(Spec {
        binary: Some(&build.binary),
        data: &root.join("data-late"),
        chains: None,
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: Some(&root.join("switchboard.toml")),
    })
    .await?;
    let deadline = started + std::time::Duration::from_secs(300);
    while !late.is_ready().await? {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a fresh replica did not catch up in 300 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    println!(
        "{}  a fresh replica caught up in {took:.2?} (start included; its CPU {:.2?}); the \
         changelog holds {held} records in {messages} messages after {n} events ({:.2} records \
         an event)",
        build.tag(),
        late.cpu_time()?,
        held as f64 / n as f64
    );
    late.stop().await;
    Ok(())
}

/// The changelog's messages, and the records they carry: read from its
/// start to its last message (a build writing a message per record gives
/// as many of each).
async fn changelog_size(js: &jetstream::Context) -> anyhow::Result<(u64, u64)> {
    use futures::StreamExt;
    use switchboard_store::changelog::{Changelog, PARTITIONS_KEY, Record, STREAM};
    let info = js.get_stream(STREAM).await?.info().await?.clone();
    let partitions: u16 = info
        .config
        .metadata
        .get(PARTITIONS_KEY)
        .ok_or_else(|| anyhow::anyhow!("the changelog's metadata names no partition count"))?
        .parse()?;
    let (messages, last) = (info.state.messages, info.state.last_sequence);
    if messages == 0 {
        return Ok((0, 0));
    }
    let log = Changelog::bind(js.clone(), partitions, 1).await?;
    let mut records = Box::pin(log.records(1).await?);
    let mut held = 0;
    loop {
        let record = tokio::time::timeout(std::time::Duration::from_secs(30), records.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the changelog's reader ended"))??;
        if let Record::Write { changes, .. } = &record {
            held += changes.len() as u64;
        }
        if record.seq() >= last {
            return Ok((messages, held));
        }
    }
}
