//! The example workers against the dispatcher on a real nats-server.
//!
//! The Python worker (`examples/python-worker/worker.py`) runs as a
//! subprocess with nothing of Switchboard but the event schema; the Rust one
//! (`examples/rust-worker/main.rs`) is compiled into this test binary and
//! called through its `run`, so both tests run the code a worker author
//! copies. The events they publish run the poll chains to the end, a resent
//! event is stored once, an event that breaks the contract is never
//! published, and an unreachable server is a clear failure.

use std::process::Stdio;

use clap::Parser;
use serde_json::Value;
use switchboard_sdk::nats::NatsEmitter;

use crate::util::{Dispatcher, NatsServer, TIMEOUT, check_poll_lineage, poll_chains};

// Its `main` is the one thing the tests do not call.
#[path = "../examples/rust-worker/main.rs"]
#[allow(dead_code)]
mod rust_worker;

/// What a run of the Python worker did.
#[derive(Debug)]
pub(crate) struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `python3 examples/python-worker/worker.py ARGS` (at most [`TIMEOUT`]).
pub(crate) async fn python_worker(args: &[&str]) -> Run {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python-worker/worker.py"
    );
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("worker.py {args:?} did not finish in {TIMEOUT:?}"))
        .expect("python3 runs");
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("ModuleNotFoundError"),
        "the Python worker's dependencies are missing: run ./scripts/test once (it installs \
         them into target/test-peers) and put target/test-peers/bin first on PATH\n{}",
        run.stderr
    );
    run
}

/// Checks what a worker run with `--resend --count N` printed — each of N
/// events published twice, `ID sequence=S duplicate=false` then the same id
/// and sequence with `duplicate=true` — and returns the N ids.
#[track_caller]
fn stored_once(stdout: &str, count: usize) -> Vec<String> {
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|line| line.split(' ').collect())
        .collect();
    assert_eq!(lines.len(), 2 * count, "two lines per event:\n{stdout}");
    let mut ids = Vec::new();
    for pair in lines.chunks(2) {
        let [first, again] = pair else {
            unreachable!("chunks of two")
        };
        assert_eq!(first.len(), 3, "`ID sequence=N duplicate=B`:\n{stdout}");
        assert!(first[1].starts_with("sequence="), "{stdout}");
        assert_eq!(first[2], "duplicate=false", "{stdout}");
        assert_eq!(
            again,
            &[first[0], first[1], "duplicate=true"],
            "the resent event is a duplicate of the same sequence:\n{stdout}"
        );
        switchboard_sdk::EventId::parse(first[0]).expect("a UUID");
        ids.push(first[0].to_string());
    }
    ids
}

/// Checks that the poll chains ran each of `ids` — `poll_complete` events
/// of respondents 1, 2, ... (+27820000001, ...) with score 4 — and the
/// event each emitted, to the end.
async fn check_poll_chains_ran(d: &Dispatcher, account: &str, ids: &[String]) {
    for (n, id) in ids.iter().enumerate() {
        let msisdn = format!("+2782{:07}", n + 1);
        let trace = d.wait_for_trace(account, id, TIMEOUT).await;
        let event = &trace["event"];
        assert_eq!(event["conversation_type"], "survey", "{trace:#}");
        assert_eq!(event["event_type"], "poll_complete", "{trace:#}");
        assert_eq!(event["conversation_key"], "poll-2026", "{trace:#}");
        assert_eq!(
            event["event_data"],
            serde_json::json!({"msisdn": msisdn, "name": format!("Respondent {}", n + 1), "score": 4})
        );
        assert_eq!(event["root_id"], Value::String(id.clone()));
        check_poll_lineage(d, account, id, &msisdn).await;
    }
    // Each event and its child, once: JetStream dropped the resent copies.
    assert_eq!(
        d.metric("received", account).await,
        2 * ids.len() as u64,
        "{}",
        d.log()
    );
}

/// How many events the stream `VUMI_EVENTS` holds.
async fn stored_events(nats: &NatsServer) -> u64 {
    let client = async_nats::connect(nats.url())
        .await
        .expect("a NATS connection");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream");
    stream.info().await.expect("stream info").state.messages
}

/// A NATS server with the events stream and nothing consuming it.
async fn nats_with_stream() -> NatsServer {
    let nats = NatsServer::start();
    NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection")
        .ensure_stream()
        .await
        .expect("the events stream");
    nats
}

/// A URL where no NATS server listens: a port just given up by the OS.
fn unreachable_nats() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = listener.local_addr().expect("its address");
    drop(listener);
    format!("nats://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_worker_publishes_events_that_run_the_poll_chains() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &poll_chains("acme")).await;

    let run = python_worker(&[
        "--nats",
        nats.url(),
        "--account",
        "acme",
        "--count",
        "3",
        "--resend",
    ])
    .await;
    assert_eq!(run.code, Some(0), "worker.py failed:\n{}", run.stderr);
    assert_eq!(run.stderr, "");
    let ids = stored_once(&run.stdout, 3);
    check_poll_chains_ran(&d, "acme", &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_worker_publishes_events_that_run_the_poll_chains() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &poll_chains("acme")).await;

    let args = rust_worker::Args::parse_from([
        "worker",
        "--nats",
        nats.url(),
        "--account",
        "acme",
        "--count",
        "3",
        "--resend",
    ]);
    let mut out = Vec::new();
    rust_worker::run(&args, &mut out)
        .await
        .expect("the worker emits its events");
    let ids = stored_once(&String::from_utf8(out).expect("UTF-8"), 3);
    check_poll_chains_ran(&d, "acme", &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_worker_refuses_an_event_that_breaks_the_schema_before_publishing() {
    let nats = nats_with_stream().await;
    // An account key that would make a bad subject, and a conversation key
    // that would not: the schema stops both, not NATS.
    for (args, at, value) in [
        (["--account", "acme corp"], "$.account_key", "'acme corp'"),
        (
            ["--conversation", "poll 2026"],
            "$.conversation_key",
            "'poll 2026'",
        ),
    ] {
        let mut all = vec!["--nats", nats.url(), "--account", "acme"];
        all.extend(args);
        let run = python_worker(&all).await;
        assert_eq!(run.code, Some(1), "worker.py {all:?}: {run:?}");
        assert_eq!(run.stdout, "", "nothing was published");
        let line = run.stderr.trim_end();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(
            line.starts_with("worker.py: event ")
                && line.contains(&format!(
                    "breaks the event schema at {at}: {value} does not match"
                ))
                && line.ends_with("; not published"),
            "{line}"
        );
    }
    assert_eq!(stored_events(&nats).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_worker_refuses_an_invalid_key_before_publishing() {
    let nats = nats_with_stream().await;
    let args =
        rust_worker::Args::parse_from(["worker", "--nats", nats.url(), "--account", "acme corp"]);
    let mut out = Vec::new();
    let error = rust_worker::run(&args, &mut out)
        .await
        .expect_err("an invalid account key");
    assert_eq!(
        error.to_string(),
        r#"invalid account_key "acme corp": must match ^[A-Za-z0-9_-]{1,64}$"#
    );
    assert!(out.is_empty());
    assert_eq!(stored_events(&nats).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_fail_clearly_when_nats_is_unreachable() {
    let url = unreachable_nats();
    let run = python_worker(&["--nats", &url, "--account", "acme"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    let line = run.stderr.trim_end();
    assert!(!line.contains('\n'), "one line: {line}");
    assert!(
        line.starts_with(&format!("worker.py: cannot reach NATS at {url}: ")),
        "{line}"
    );

    let args = rust_worker::Args::parse_from(["worker", "--nats", &url, "--account", "acme"]);
    let error = rust_worker::run(&args, &mut Vec::new())
        .await
        .expect_err("no server");
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot reach NATS at {url}: ")),
        "{error}"
    );
}
