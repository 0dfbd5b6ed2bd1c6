//! What a changelog record costs, by how records are put in messages: the
//! replicated dispatcher's appender (`switchboard_store::changelog`, on a
//! stream with one copy: puts in packs of up to 128 of a partition, each
//! pack a message fenced by the partition's epoch, up to 64 in flight per
//! partition), and beside it the same records published raw, one to a
//! message (as the appender did before packs), and 50 of one partition to
//! a message (each record framed with its key and lengths, the message
//! fenced once); raw publishes keep 64 in flight in all. Each on a fresh
//! nats-server; the server's CPU per record and the writer's (this
//! process) are printed. Records alternate between a journal-sized value
//! (820 bytes) and a contact-sized one (300 bytes), as `create_contact` →
//! `log` writes them, over 16 partitions.
//!
//! Then what taking such batches out of the stream costs the server (the
//! stream cannot compact a message of many keys by itself): deleting
//! scattered batches one by one (as the API's default does, erasing each,
//! and without erasing), and purging each partition's batches below a
//! sequence. CPU times here are the threads' own clocks
//! (`/proc/PID/task/*/schedstat`, nanoseconds), not `/proc/PID/stat`'s
//! 10 ms ticks: some of these phases last a few ticks.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::{BufMut as _, Bytes, BytesMut};
use switchboard_store::Collection;
use switchboard_store::changelog::{Change, Changelog};

use crate::common::NatsServer;
use crate::report::{Report, micros_of, rate};

const PARTITIONS: u16 = 16;
/// Records per message when they are packed.
const PACKED: usize = 50;
/// Writes appended between two commits of the appender (a group commit
/// covering a few settled batches of events).
const COMMIT_EVERY: usize = 1_000;
/// Raw publishes awaiting their acks at once.
const IN_FLIGHT: usize = 64;

/// CPU per record, in µs, of the server and of this process, and the rate.
struct Cost {
    server_us: f64,
    writer_us: f64,
    per_second: f64,
}

impl Cost {
    fn line(&self) -> String {
        format!(
            "{}; nats-server {}/record, writer {}/record",
            rate(self.per_second),
            micros_of(self.server_us),
            micros_of(self.writer_us),
        )
    }
}

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(40_000) as usize;
    // Packed records cost a tenth as much: ten times as many of them.
    let n_packed = 10 * n;
    println!(
        "\n## changelog: what a record costs the nats-server and its writer, over {PARTITIONS} \
         partitions"
    );
    let appender = appender(n).await?;
    println!(
        "the appender, puts in packs ({n} records): {}",
        appender.line()
    );
    let each = raw(n, 1).await?;
    println!(
        "raw, a fenced message per record ({n} records): {}",
        each.line()
    );
    let packed = raw(n_packed, PACKED).await?;
    println!(
        "raw, {PACKED} records to a fenced message ({n_packed} records): {}",
        packed.line()
    );
    report.figure("changelog", "the appender, puts in packs", appender.line());
    report.figure("changelog", "raw, a message per record", each.line());
    report.figure(
        "changelog",
        format!("raw, {PACKED} records to a message"),
        packed.line(),
    );
    for (how, count, us) in removal(options.scaled(4_000) as usize).await? {
        let line = format!(
            "{us:.0} µs of nats-server CPU a batch of {PACKED} ({:.1} µs a record; {count} batches)",
            us / PACKED as f64
        );
        println!("taking batches out, {how}: {line}");
        report.figure("changelog", format!("taking batches out, {how}"), line);
    }
    Ok(())
}

fn value(i: usize) -> Bytes {
    Bytes::from(vec![b'v'; if i.is_multiple_of(2) { 820 } else { 300 }])
}

fn key(i: usize) -> Vec<u8> {
    format!("bench\0{i:012}").into_bytes()
}

fn partition(i: usize) -> u16 {
    ((i / 2) % usize::from(PARTITIONS)) as u16
}

/// A process's CPU time so far: the sum of its threads' run time
/// (`/proc/PID/task/*/schedstat`, in nanoseconds). Threads that ended are
/// not counted, so it is read over phases in which none does.
fn cpu_ns(pid: u32) -> anyhow::Result<Duration> {
    let mut total = 0u64;
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("no run time in {}: {text:?}", path.display()))?;
    }
    Ok(Duration::from_nanos(total))
}

/// Measures `work` from outside: the server's CPU and this process's.
async fn measured(
    server: &NatsServer,
    n: usize,
    work: impl AsyncFnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Cost> {
    let me = std::process::id();
    let (server0, writer0) = (cpu_ns(server.pid())?, cpu_ns(me)?);
    let started = Instant::now();
    work().await?;
    let took = started.elapsed();
    let server_cpu = cpu_ns(server.pid())? - server0;
    let writer_cpu = cpu_ns(me)? - writer0;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(Cost {
        server_us: per(server_cpu),
        writer_us: per(writer_cpu),
        per_second: n as f64 / took.as_secs_f64(),
    })
}

/// `n` writes through the changelog's appender, committed every
/// [`COMMIT_EVERY`], each partition under a term of its own.
async fn appender(n: usize) -> anyhow::Result<Cost> {
    let server = NatsServer::start()?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let log = Changelog::bind(js, PARTITIONS, 1).await?;
    let mut terms = Vec::new();
    for p in 0..PARTITIONS {
        terms.push(log.begin_term(p, "bench").await?);
    }
    let appender = log.appender();
    measured(&server, n, async || {
        for i in 0..n {
            let collection = if i.is_multiple_of(2) {
                Collection::Journal
            } else {
                Collection::Contacts
            };
            appender.append(
                terms[usize::from(partition(i))],
                Change {
                    collection,
                    key: key(i),
                    value: Some(value(i)),
                },
            );
            if (i + 1).is_multiple_of(COMMIT_EVERY) {
                appender.commit().await?;
            }
        }
        appender.commit().await?;
        Ok(())
    })
    .await
}

/// `per_message` records of partition `p`, from record `first` on, framed
/// as a batch: each its key's and its value's lengths, then both.
fn batch(first: usize, per_message: usize) -> Bytes {
    let mut packed = BytesMut::new();
    for i in first..first + per_message {
        let (key, value) = (key(i), value(i));
        packed.put_u16(key.len() as u16);
        packed.put_u32(value.len() as u32);
        packed.put_slice(&key);
        packed.put_slice(&value);
    }
    packed.freeze()
}

/// A stream like the changelog (one message kept per subject) with a
/// term marker per partition; the markers' sequences.
async fn raw_stream(js: &jetstream::Context) -> anyhow::Result<(stream::Stream, Vec<u64>)> {
    let stream = js
        .create_stream(stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw.>".into()],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let mut epochs = Vec::new();
    for p in 0..PARTITIONS {
        let ack = js
            .publish(format!("raw.{p}.epoch"), Bytes::new())
            .await?
            .await?;
        epochs.push(ack.sequence);
    }
    Ok((stream, epochs))
}

/// The fence a write carries: the partition's term marker is still its last.
fn fence(p: u16, epoch: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        epoch.to_string().as_str(),
    );
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence-Subject",
        format!("raw.{p}.epoch").as_str(),
    );
    headers
}

/// `n` records published raw, `per_message` to a message (a message's
/// records all of one partition), each message fenced as the appender
/// fences a write; [`IN_FLIGHT`] in flight.
async fn raw(n: usize, per_message: usize) -> anyhow::Result<Cost> {
    let server = NatsServer::start()?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let (_stream, epochs) = raw_stream(&js).await?;
    measured(&server, n, async || {
        let mut acks = Vec::new();
        for (message, first) in (0..n).step_by(per_message).enumerate() {
            let (p, subject, payload) = if per_message == 1 {
                let p = partition(first);
                (p, format!("raw.{p}.w.{first:012}"), value(first))
            } else {
                let p = (message % usize::from(PARTITIONS)) as u16;
                let count = per_message.min(n - first);
                (p, format!("raw.{p}.b.{message}"), batch(first, count))
            };
            let headers = fence(p, epochs[usize::from(p)]);
            acks.push(js.publish_with_headers(subject, headers, payload).await?);
            if acks.len() == IN_FLIGHT {
                for ack in acks.drain(..) {
                    ack.await?;
                }
            }
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    })
    .await
}

/// Publishes `n` batches of [`PACKED`] records and takes most of them out
/// again three ways; for each, how many batches and the server's CPU per
/// batch. The deletes are of scattered batches (every tenth of the first
/// half, then every other one left there), as a cleaner deleting batches
/// whose records are all dead would make them; the purge takes, partition
/// by partition, everything below the third quarter's start, as a cleaner
/// that has written a partition's live records again would.
async fn removal(n: usize) -> anyhow::Result<Vec<(&'static str, usize, f64)>> {
    let server = NatsServer::start()?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let (stream, _) = raw_stream(&js).await?;
    let mut seqs = Vec::with_capacity(n);
    for i in 0..n {
        let p = i % usize::from(PARTITIONS);
        let ack = js
            .publish(format!("raw.{p}.b.{i}"), batch(i * PACKED, PACKED))
            .await?
            .await?;
        seqs.push(ack.sequence);
    }
    // Each phase on a server at rest: what the publishes left to do is
    // done, and counted in none.
    let settle = || tokio::time::sleep(Duration::from_secs(1));
    let mut out = Vec::new();
    let half = &seqs[..n / 2];
    let erased: Vec<u64> = half.iter().step_by(10).copied().collect();
    settle().await;
    let started = cpu_ns(server.pid())?;
    for seq in &erased {
        anyhow::ensure!(
            stream.delete_message(*seq).await?,
            "deleting {seq}: not deleted"
        );
    }
    let cpu = cpu_ns(server.pid())? - started;
    out.push(("deleted one by one (erased)", erased.len(), cpu));
    let kept: Vec<u64> = half
        .iter()
        .filter(|s| !erased.contains(s))
        .step_by(2)
        .copied()
        .collect();
    settle().await;
    let started = cpu_ns(server.pid())?;
    for seq in &kept {
        let answer: serde_json::Value = js
            .request(
                "STREAM.MSG.DELETE.RAW".to_string(),
                &serde_json::json!({ "seq": seq, "no_erase": true }),
            )
            .await?;
        anyhow::ensure!(answer["success"] == true, "deleting {seq}: {answer}");
    }
    let cpu = cpu_ns(server.pid())? - started;
    out.push(("deleted one by one, not erased", kept.len(), cpu));
    let below = seqs[3 * n / 4];
    settle().await;
    let started = cpu_ns(server.pid())?;
    let mut purged = 0;
    for p in 0..PARTITIONS {
        purged += stream
            .purge()
            .filter(format!("raw.{p}.b.>"))
            .sequence(below)
            .await?
            .purged as usize;
    }
    let cpu = cpu_ns(server.pid())? - started;
    out.push(("purged by partition below a sequence", purged, cpu));
    Ok(out
        .into_iter()
        .map(|(how, count, cpu)| (how, count, cpu.as_secs_f64() * 1e6 / count.max(1) as f64))
        .collect())
}
