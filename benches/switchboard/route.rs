//! Route-only: the dispatcher drains a backlog through one chain of one `log`
//! step (below the log level, so it renders but writes nothing), next to a
//! bare client consuming the same backlog on the same server.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use futures::TryStreamExt as _;

use crate::common::{self, Dispatcher, NatsServer, Spec, mib, poll_event};
use crate::report::{Report, percent, rate};

const PREFIX: &str = "vumi";
const ACCOUNT: &str = "bench";

/// The one chain: every `poll_complete` of the account runs a `log` step.
const CHAIN_FILE: &str = r#"account_key = "bench"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "log"
config = { level = "debug", message = "{{ event.event_data.msisdn }} finished {{ event.conversation_key }}" }
"#;

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(200_000);
    println!("\n## route: one `log` step, {n} events on NATS");
    let server = NatsServer::start()?;
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    let stream = js
        .create_stream(switchboard_sdk::nats::events_stream_config(PREFIX))
        .await
        .context("creating the events stream")?;
    let (fill, _) = common::fill_nats(&js, PREFIX, n, |i| poll_event(ACCOUNT, i, 1_000)).await?;
    println!("backlog of {n} published in {:.1} s", fill.as_secs_f64());

    // The bus's limit on this very backlog, then the dispatcher on it.
    let (taken, took) = common::raw_consume(&stream, "raw").await?;
    let raw = taken as f64 / took.as_secs_f64();
    println!("raw pull consume + ack: {}", rate(raw));

    let root = tempfile::tempdir()?;
    let chains = write_chains(root.path())?;
    let mut dispatcher = Dispatcher::start(Spec {
        data: &root.path().join("data"),
        chains: Some(&chains),
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: None,
    })
    .await?;
    let took = drain_nats(&mut dispatcher, &js, n).await?;
    let nats_rate = n as f64 / took.as_secs_f64();
    let hwm = dispatcher.hwm_kib()?;
    dispatcher.stop().await;
    println!(
        "dispatcher drained {n} in {:.2} s ({}), peak RSS {} MiB",
        took.as_secs_f64(),
        rate(nats_rate),
        mib(hwm)
    );
    drop(server);

    let m = options.scaled(50_000);
    println!("\n## route: one `log` step, {m} events on the embedded bus");
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let fill = common::fill_embedded(&data, PREFIX, m, |i| poll_event(ACCOUNT, i, 1_000)).await?;
    println!("backlog of {m} queued in {:.1} s", fill.as_secs_f64());
    let chains = write_chains(root.path())?;
    let mut dispatcher = Dispatcher::start(Spec {
        data: &data,
        chains: Some(&chains),
        nats: None,
        concurrency: options.concurrency,
        config: None,
    })
    .await?;
    let took = drain(&mut dispatcher, Some(ACCOUNT), m).await?;
    let embedded_rate = m as f64 / took.as_secs_f64();
    let embedded_hwm = dispatcher.hwm_kib()?;
    dispatcher.stop().await;
    println!(
        "dispatcher drained {m} in {:.2} s ({}), peak RSS {} MiB",
        took.as_secs_f64(),
        rate(embedded_rate),
        mib(embedded_hwm)
    );

    report.figure("route", "raw pull consume + ack, same backlog", rate(raw));
    report.figure("route", "dispatcher on NATS", rate(nats_rate));
    let ratio = nats_rate / raw;
    report.check(
        "route",
        "dispatcher on NATS / raw consume + ack",
        percent(ratio),
        "≥ 50%",
        ratio >= 0.5,
    );
    report.figure("route", "peak RSS on NATS", format!("{} MiB", mib(hwm)));
    report.figure(
        "route",
        "dispatcher on the embedded bus",
        rate(embedded_rate),
    );
    report.figure(
        "route",
        "peak RSS on the embedded bus",
        format!("{} MiB", mib(embedded_hwm)),
    );
    Ok(())
}

pub fn write_chains(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = root.join("chains");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.toml"), CHAIN_FILE)?;
    Ok(dir)
}

/// Waits until the dispatcher has taken and acked everything on the NATS
/// stream (see [`drain_nats_by`]); returns how long that took from when it
/// started listening.
pub async fn drain_nats(
    dispatcher: &mut Dispatcher,
    js: &jetstream::Context,
    n: u64,
) -> anyhow::Result<Duration> {
    let since = dispatcher.listening_at;
    drain_nats_by(std::slice::from_mut(dispatcher), js, n, since).await
}

/// Waits until `dispatchers` (sharing the consumer) have taken and acked
/// everything on the NATS stream, watching their consumer on the server (so
/// that the watching costs them nothing: `/metrics` grows with the
/// accounts), then checks that their `/metrics` count `n` events handled in
/// all; returns how long that took from `since`.
pub async fn drain_nats_by(
    dispatchers: &mut [Dispatcher],
    js: &jetstream::Context,
    n: u64,
    since: Instant,
) -> anyhow::Result<Duration> {
    const STALL: Duration = Duration::from_secs(60);
    let stream = js
        .get_stream(switchboard_sdk::nats::events_stream_config(PREFIX).name)
        .await?;
    // One consumer, or one per partition when replicas share the bus.
    let mut names: Vec<String> = stream.consumer_names().try_collect().await?;
    names.sort();
    if names.is_empty() {
        bail!("the stream has no consumer:\n{}", dispatchers[0].log_tail());
    }
    let mut consumers = Vec::with_capacity(names.len());
    for name in &names {
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(name)
            .await
            .map_err(|e| anyhow::anyhow!("the dispatcher's consumer {name}: {e}"))?;
        consumers.push(consumer);
    }
    let mut last = u64::MAX;
    let mut progressed = Instant::now();
    // About 50 consumer reads a second in all, whatever the number of
    // consumers: the reads cost the server too.
    let every = Duration::from_millis(20) * consumers.len() as u32;
    let took = loop {
        tokio::time::sleep(every).await;
        for d in dispatchers.iter_mut() {
            d.check_alive()?;
        }
        // Waiting to be delivered, or delivered and not acked.
        let (mut left, mut delivered) = (0, 0);
        for consumer in &mut consumers {
            let info = consumer.info().await?;
            left += info.num_pending + info.num_ack_pending as u64;
            delivered = delivered.max(info.delivered.stream_sequence);
        }
        if left == 0 && delivered >= n {
            break since.elapsed();
        }
        if left < last {
            last = left;
            progressed = Instant::now();
        } else if progressed.elapsed() > STALL {
            bail!(
                "no progress for {STALL:?} with {last} of {n} events left:\n{}",
                dispatchers[0].log_tail()
            );
        }
    };
    let (mut handled, mut other) = (0, 0);
    for d in dispatchers.iter() {
        let counts = d.counts(None).await?;
        handled += counts.handled;
        other += counts.other;
    }
    if handled != n || other != 0 {
        bail!(
            "the stream is drained, but {handled} events were handled and {other} not \
             (unrouted, expired or dead-lettered) of {n}:\n{}",
            dispatchers[0].log_tail()
        );
    }
    Ok(took)
}

/// Waits until the dispatcher has handled `n` events (of `account`, or of
/// all); returns how long that took from when it started listening.
pub async fn drain(
    dispatcher: &mut Dispatcher,
    account: Option<&str>,
    n: u64,
) -> anyhow::Result<Duration> {
    const STALL: Duration = Duration::from_secs(60);
    let mut last = 0;
    let mut progressed = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        dispatcher.check_alive()?;
        let counts = dispatcher.counts(account).await?;
        if counts.other > 0 {
            bail!(
                "{} events were not handled (unrouted, expired or dead-lettered):\n{}",
                counts.other,
                dispatcher.log_tail()
            );
        }
        if counts.handled >= n {
            return Ok(dispatcher.listening_at.elapsed());
        }
        if counts.handled > last {
            last = counts.handled;
            progressed = Instant::now();
        } else if progressed.elapsed() > STALL {
            bail!(
                "no progress for {STALL:?} at {last} of {n} handled:\n{}",
                dispatcher.log_tail()
            );
        }
    }
}
