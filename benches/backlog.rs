//! A backlog of events on the bus is drained with bounded memory. A program
//! that prints numbers, not a test:
//!
//! ```sh
//! cargo bench --bench backlog -- [--events N] [--bus nats|embedded|both] [--concurrency C]
//! ```
//!
//! For each bus it fills a backlog of N ~350-byte `poll_complete` events of
//! account `bench`, spread over 1,000 conversations, *before* any dispatcher
//! runs; then starts the real `switchboard run` binary on it with one chain (a
//! single `log` step) and watches it drain: the handled count from `/metrics`
//! and the child's resident set (`VmRSS` from `/proc/PID/status`) every
//! 100 ms, and its high-water mark (`VmHWM`) at the end. Bounded means RSS
//! levels off once the store's cache is warm and does not grow with N.
//!
//! - NATS: a `nats-server -js` in a temporary directory; the events are
//!   published with a bare JetStream client, 1,024 acks in flight,
//!   `Nats-Msg-Id` set to the event id.
//! - Embedded: the events are published in-process into the data directory's
//!   store through `EmbeddedBus` (concurrent publishes share one flush), which
//!   is then closed so that the dispatcher opens the same store.
//!
//! Without `--events`, NATS gets 1,000,000 events and the embedded bus
//! [`EMBEDDED_DEFAULT_EVENTS`] (filling sled is the slow part there).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer::pull};
use serde_json::json;
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

#[path = "common/mod.rs"]
mod common;
use common::{Dispatcher, NatsServer, Spec, mib, proc_status};

/// The account every event belongs to.
const ACCOUNT: &str = "bench";
/// The subject prefix (the default).
const PREFIX: &str = "vumi";
/// Events are spread over this many conversations.
const CONVERSATIONS: u64 = 1_000;
/// NATS backlog without `--events`.
const NATS_DEFAULT_EVENTS: u64 = 1_000_000;
/// Embedded backlog without `--events`.
const EMBEDDED_DEFAULT_EVENTS: u64 = 200_000;
/// How often the dispatcher is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Give up when the handled count does not move for this long.
const STALL: Duration = Duration::from_secs(60);

/// The one chain: every `poll_complete` of the account runs a `log` step (at
/// debug level, so that `RUST_LOG=warn` keeps it off stderr but it still
/// renders its template).
const CHAIN_FILE: &str = r#"account_key = "bench"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"
config = { level = "debug", message = "{{ event.event_data.msisdn }} finished {{ event.conversation_key }} with {{ event.event_data.score }}/5" }
"#;

const USAGE: &str = "usage: cargo bench --bench backlog -- [--events N] [--bus nats|embedded|both] [--concurrency C]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Nats,
    Embedded,
    Both,
}

#[derive(Debug)]
struct Options {
    events: Option<u64>,
    bus: Which,
    concurrency: usize,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        events: None,
        bus: Which::Both,
        concurrency: 32,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "--events" => {
                let v = value("--events")?;
                let n: u64 = v
                    .replace(['_', ','], "")
                    .parse()
                    .with_context(|| format!("--events {v:?} is not a number\n{USAGE}"))?;
                if n == 0 {
                    bail!("--events must be at least 1");
                }
                options.events = Some(n);
            }
            "--bus" => {
                options.bus = match value("--bus")?.as_str() {
                    "nats" => Which::Nats,
                    "embedded" => Which::Embedded,
                    "both" => Which::Both,
                    other => bail!("--bus {other:?}: use nats, embedded or both\n{USAGE}"),
                }
            }
            "--concurrency" => {
                let v = value("--concurrency")?;
                options.concurrency = v
                    .parse()
                    .ok()
                    .filter(|&c| c > 0)
                    .with_context(|| format!("--concurrency {v:?} is not a positive number"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|options| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(run(options))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backlog: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    let sample = event(0).to_json().len();
    println!(
        "backlog drain: account {ACCOUNT}, {CONVERSATIONS} conversations, {sample}-byte events, \
         one `log` step, --concurrency {}, {} CPUs",
        options.concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows = Vec::new();
    if matches!(options.bus, Which::Nats | Which::Both) {
        let n = options.events.unwrap_or(NATS_DEFAULT_EVENTS);
        rows.push(nats_case(n, options.concurrency).await?);
    }
    if matches!(options.bus, Which::Embedded | Which::Both) {
        let n = options.events.unwrap_or(EMBEDDED_DEFAULT_EVENTS);
        rows.push(embedded_case(n, options.concurrency).await?);
    }
    println!();
    print_table(&rows);
    Ok(())
}

/// The `i`th event of the backlog: about 350 bytes of JSON, most of it the
/// envelope (two UUIDs, a timestamp, the keys).
fn event(i: u64) -> VumiApiEvent {
    VumiApiEvent::new(
        AccountKey::new(ACCOUNT).expect("a valid account key"),
        ConversationKey::new(format!("poll-2026-{:04}", i % CONVERSATIONS))
            .expect("a valid conversation key"),
        ConversationType::new("survey").expect("a valid conversation type"),
        EventType::new("poll_complete").expect("a valid event type"),
        json!({"msisdn": format!("+2782{:07}", i % 10_000_000), "score": i % 6})
            .as_object()
            .expect("an object")
            .clone(),
    )
}

/// The NATS case: publish the backlog to a fresh server, then drain it.
async fn nats_case(n: u64, concurrency: usize) -> anyhow::Result<Row> {
    println!("\n== nats: {n} events");
    let server = NatsServer::start()?;
    let client = async_nats::connect(server.url())
        .await
        .with_context(|| format!("connecting to {}", server.url()))?;
    let js = jetstream::new(client.clone());
    js.create_stream(switchboard_sdk::nats::events_stream_config(PREFIX))
        .await
        .context("creating the events stream")?;

    let (fill, duplicates) = common::fill_nats(&js, PREFIX, n, event).await?;
    let mut stream = js
        .get_stream(switchboard_sdk::nats::events_stream_config(PREFIX).name)
        .await?;
    let stored = stream.info().await?.state.messages;
    println!(
        "published {n} in {:.1} s ({:.0}/s); stream holds {stored}, {duplicates} duplicates",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64()
    );
    if stored != n {
        bail!("the stream holds {stored} events, expected {n}");
    }

    let root = tempfile::tempdir().context("a temporary directory")?;
    let chains = write_chains(root.path())?;
    let mut dispatcher = Dispatcher::start(Spec {
        binary: None,
        data: &root.path().join("data"),
        chains: Some(&chains),
        nats: Some(server.url()),
        concurrency,
        config: None,
    })
    .await?;
    let mut row = drain(&mut dispatcher, "nats", n, fill).await?;

    // Every message acked, none left: the consumer agrees with /metrics.
    let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_consumer(switchboard_bus::nats::CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("opening the dispatcher's consumer: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await?;
        if (info.num_pending == 0 && info.num_ack_pending == 0) || Instant::now() > deadline {
            row.note = format!(
                "consumer: {} pending, {} unacked, {} redelivered; max_ack_pending {}",
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
                info.config.max_ack_pending
            );
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    println!("{}", row.note);
    dispatcher.stop().await;
    Ok(row)
}

/// The embedded case: publish the backlog into a data directory's store,
/// close it, then drain it with a dispatcher on that directory.
async fn embedded_case(n: u64, concurrency: usize) -> anyhow::Result<Row> {
    println!("\n== embedded: {n} events");
    let root = tempfile::tempdir().context("a temporary directory")?;
    let data = root.path().join("data");
    let fill = common::fill_embedded(&data, PREFIX, n, event).await?;
    println!(
        "published {n} in {:.1} s ({:.0}/s)",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64()
    );
    let chains = write_chains(root.path())?;
    let mut dispatcher = Dispatcher::start(Spec {
        binary: None,
        data: &data,
        chains: Some(&chains),
        nats: None,
        concurrency,
        config: None,
    })
    .await?;
    let row = drain(&mut dispatcher, "embedded", n, fill).await?;
    dispatcher.stop().await;
    Ok(row)
}

fn write_chains(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("chains");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.toml"), CHAIN_FILE)?;
    Ok(dir)
}

/// One sample of the draining dispatcher.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Since the dispatcher said it was listening.
    at: Duration,
    rss_kib: u64,
    handled: u64,
}

/// One bus's result.
#[derive(Debug)]
struct Row {
    bus: &'static str,
    events: u64,
    fill: Duration,
    start: Duration,
    drain: Duration,
    hwm_kib: u64,
    /// RSS when the dispatcher started listening, then at every tenth drained.
    rss_kib: [u64; 11],
    note: String,
}

/// Watches the dispatcher until it has handled `n` events.
async fn drain(
    dispatcher: &mut Dispatcher,
    bus: &'static str,
    n: u64,
    fill: Duration,
) -> anyhow::Result<Row> {
    let pid = dispatcher.pid;
    let t0 = dispatcher.listening_at;
    let mut samples = vec![Sample {
        at: Duration::ZERO,
        rss_kib: proc_status(pid, "VmRSS")?,
        handled: 0,
    }];
    let mut progressed = Instant::now();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        if let Some(status) = dispatcher.child.try_wait()? {
            bail!(
                "the dispatcher exited ({status}) while draining:\n{}",
                dispatcher.log_tail()
            );
        }
        let rss_kib = proc_status(pid, "VmRSS")?;
        let counts = dispatcher.counts(Some(ACCOUNT)).await?;
        let at = t0.elapsed();
        if counts.handled > samples.last().map_or(0, |s| s.handled) {
            progressed = Instant::now();
        }
        samples.push(Sample {
            at,
            rss_kib,
            handled: counts.handled,
        });
        if counts.other > 0 {
            bail!(
                "{} events were not handled (unrouted, expired or dead-lettered); is the chain right?\n{}",
                counts.other,
                dispatcher.log_tail()
            );
        }
        if counts.handled >= n {
            break;
        }
        if progressed.elapsed() > STALL {
            bail!(
                "no progress for {STALL:?} at {} of {n} handled:\n{}",
                counts.handled,
                dispatcher.log_tail()
            );
        }
    }
    let hwm_kib = proc_status(pid, "VmHWM")?;
    let last = *samples.last().expect("samples");
    // RSS at start, then the first sample at or past each tenth.
    let mut rss_kib = [samples[0].rss_kib; 11];
    for (tenth, slot) in rss_kib.iter_mut().enumerate().skip(1) {
        let target = n * tenth as u64 / 10;
        *slot = samples
            .iter()
            .find(|s| s.handled >= target)
            .unwrap_or(&last)
            .rss_kib;
    }
    let row = Row {
        bus,
        events: n,
        fill,
        start: dispatcher.start_took,
        drain: last.at,
        hwm_kib,
        rss_kib,
        note: String::new(),
    };
    println!(
        "drained {} in {:.1} s; RSS MiB at 0%, 10%, ..., 100%: {}; peak (VmHWM) {}",
        last.handled,
        last.at.as_secs_f64(),
        row.rss_kib
            .iter()
            .map(|&k| mib(k))
            .collect::<Vec<_>>()
            .join(" "),
        mib(hwm_kib)
    );
    // Steps stand out from a steady climb: they point at what allocated.
    let mut rises: Vec<(u64, Sample)> = samples
        .windows(2)
        .filter(|w| w[1].rss_kib > w[0].rss_kib)
        .map(|w| (w[1].rss_kib - w[0].rss_kib, w[1]))
        .collect();
    rises.sort_by_key(|&(rise, _)| std::cmp::Reverse(rise));
    println!(
        "largest RSS rises in one sample: {}",
        rises
            .iter()
            .take(3)
            .map(|(rise, s)| format!(
                "+{} MiB at {:.1} s ({}% drained)",
                mib(*rise),
                s.at.as_secs_f64(),
                s.handled * 100 / n
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(row)
}

fn print_table(rows: &[Row]) {
    println!(
        "| bus | events | fill s | start s | drain s | events/s | peak RSS MiB | RSS start | RSS 10% | RSS 50% | RSS 100% |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.1} | {:.0} | {} | {} | {} | {} | {} |",
            r.bus,
            r.events,
            r.fill.as_secs_f64(),
            r.start.as_secs_f64(),
            r.drain.as_secs_f64(),
            r.events as f64 / r.drain.as_secs_f64(),
            mib(r.hwm_kib),
            mib(r.rss_kib[0]),
            mib(r.rss_kib[1]),
            mib(r.rss_kib[5]),
            mib(r.rss_kib[10]),
        );
    }
}
