//! `switchboard demo`: the first thing a new user runs. The dispatcher on the
//! embedded bus, in a temporary data directory, with the example chains
//! applied; a few sample `poll_complete` events go through, and what each
//! chain did is printed. The API keeps serving so the user can emit more.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_sdk::{
    AccountKey, ConversationKey, ConversationType, EventId, EventType, VumiApiEvent,
};

use crate::config::Config;
use crate::records::{Trace, TraceStatus};
use crate::runtime::{Dispatcher, StartError};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder of chain files to apply.
    pub chains_dir: PathBuf,
    /// Where the API listens.
    pub listen: SocketAddr,
    /// Stop after printing the traces instead of serving on.
    pub once: bool,
}

/// Runs the demo, printing to stdout. Returns when interrupted (or at once with `once`).
pub async fn run(options: DemoOptions) -> Result<(), StartError> {
    let data = tempfile::Builder::new()
        .prefix("switchboard-demo-")
        .tempdir()
        .map_err(|e| StartError::ChainFile(format!("creating a temporary data directory: {e}")))?;
    let mut config = Config::default();
    config.store.data_dir = data.path().to_path_buf();
    config.http.listen = options.listen;
    let dispatcher = Dispatcher::start(config, Some(&options.chains_dir)).await?;
    let addr = dispatcher.local_addr();

    println!("Switchboard demo: the dispatcher on the embedded bus (no NATS needed).");
    println!(
        "data directory: {} (removed on exit)",
        data.path().display()
    );
    for applied in dispatcher.applied() {
        println!(
            "applied {} → account {} at chain version {}",
            applied.path.display(),
            applied.account,
            applied
                .version
                .map_or("(unchanged)".to_string(), |v| v.to_string())
        );
    }
    let account = dispatcher
        .applied()
        .first()
        .map(|a| a.account.clone())
        .unwrap_or_else(|| "acme".to_string());

    let samples = [
        (
            "survey",
            "poll_complete",
            "poll-2026",
            json!({"msisdn": "+27820000001", "score": 4}),
        ),
        (
            "survey",
            "poll_complete",
            "poll-2026",
            json!({"msisdn": "+27820000002", "score": 2}),
        ),
        (
            "ussd",
            "menu_shown",
            "main-menu",
            json!({"msisdn": "+27820000003"}),
        ),
    ];
    for (ct, et, ck, data) in samples {
        let event = VumiApiEvent::new(
            AccountKey::new(account.clone()).expect("applied accounts are valid"),
            ConversationKey::new(ck).expect("a valid sample key"),
            ConversationType::new(ct).expect("a valid sample type"),
            EventType::new(et).expect("a valid sample type"),
            data.as_object().expect("samples are objects").clone(),
        );
        println!("\n── emitting {ct}/{et} {} {}", event.id, data);
        if let Err(e) = dispatcher.publish(&event).await {
            println!("publishing failed: {e}");
            continue;
        }
        print!("{}", show_lineage(&dispatcher, &account, event.id).await);
    }

    println!("\nThe API is at http://{addr}. Emit more events and read their traces:");
    println!(
        "  switchboard emit --server http://{addr} {account} survey poll_complete --conversation poll-2026 --data '{{\"msisdn\": \"+27820000009\", \"score\": 5}}'"
    );
    println!("  switchboard trace --server http://{addr} {account} <event id>");
    println!("  switchboard chains list --server http://{addr} {account}");
    if !options.once {
        println!("Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    dispatcher.shutdown().await;
    Ok(())
}

/// Waits for the trace of `id` and of every event it led to, and renders them.
async fn show_lineage(dispatcher: &Dispatcher, account: &str, id: EventId) -> String {
    let mut out = String::new();
    let mut pending = vec![id];
    while let Some(id) = pending.pop() {
        match wait_for_trace(dispatcher, account, id, Duration::from_secs(10)).await {
            Some(trace) => {
                let value = serde_json::to_value(&trace).expect("a trace serialises");
                let _ = writeln!(out, "{}", indent(&crate::cli::render_trace(&value)));
                pending.extend(trace.children.iter().rev());
            }
            None => {
                let _ = writeln!(out, "  (event {id} was not handled within 10 s)");
            }
        }
    }
    out
}

async fn wait_for_trace(
    dispatcher: &Dispatcher,
    account: &str,
    id: EventId,
    limit: Duration,
) -> Option<Trace> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(trace)) = dispatcher.executor().traces.get(account, &id)
            && trace.status != TraceStatus::Running
        {
            return Some(trace);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("   {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The example chains folder, found from the current directory.
pub fn default_chains_dir() -> PathBuf {
    Path::new("examples").join("chains")
}
