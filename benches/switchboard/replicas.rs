//! Replicas: 1, 2 and 3 dispatchers with `--replicated` sharing one NATS
//! server, draining the same backlog through `create_contact` → `log`; and
//! one dispatcher with its own store, for the cost of keeping the state in
//! the key-value bucket.

use std::time::Instant;

use async_nats::jetstream;

use crate::common::{self, Dispatcher, NatsServer, Spec, poll_event};
use crate::report::{Report, rate};

const PREFIX: &str = "vumi";
const ACCOUNTS: u64 = 8;

fn chain_file(account: &str) -> String {
    format!(
        r#"account_key = "{account}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }}

[[chains.steps]]
handler = "log"
config = {{ level = "debug", message = "{{{{ steps.create_contact.key }}}}" }}
"#
    )
}

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(20_000);
    println!(
        "\n## replicas: `create_contact` → `log`, {n} events over {ACCOUNTS} accounts, one \
         nats-server"
    );
    let local = drain_with(options, n, 1, false).await?;
    println!("1 dispatcher, own store: {}", rate(local));
    report.figure("replicas", "1 dispatcher, own store", rate(local));
    let mut one = None;
    for replicas in 1..=3 {
        let r = drain_with(options, n, replicas, true).await?;
        let scaling = match one {
            None => {
                one = Some(r);
                String::new()
            }
            Some(base) => format!(" (×{:.2} of one)", r / base),
        };
        println!("{replicas} replica(s), shared bucket: {}{scaling}", rate(r));
        report.figure(
            "replicas",
            format!("{replicas} replica(s), shared state"),
            format!("{}{scaling}", rate(r)),
        );
    }
    Ok(())
}

/// Starts `replicas` dispatchers (replicated or not) on a fresh server,
/// publishes the backlog, and returns events/s from the first publish until
/// the consumer has acked everything.
async fn drain_with(
    options: &crate::Options,
    n: u64,
    replicas: usize,
    replicated: bool,
) -> anyhow::Result<f64> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let chains = root.path().join("chains");
    std::fs::create_dir_all(&chains)?;
    for a in 0..ACCOUNTS {
        let account = format!("bench-{a}");
        std::fs::write(chains.join(format!("{account}.toml")), chain_file(&account))?;
    }
    let config = root.path().join("switchboard.toml");
    std::fs::write(&config, format!("[bus]\nreplicated = {replicated}\n"))?;
    let mut dispatchers = Vec::new();
    for i in 0..replicas {
        dispatchers.push(
            Dispatcher::start(Spec {
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
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    let started = Instant::now();
    let (_, _) = common::fill_nats(&js, PREFIX, n, |i| {
        poll_event(&format!("bench-{}", i % ACCOUNTS), i, 1_000)
    })
    .await?;
    let took = crate::route::drain_nats_by(&mut dispatchers, &js, n, started).await?;
    for d in dispatchers {
        d.stop().await;
    }
    Ok(n as f64 / took.as_secs_f64())
}
