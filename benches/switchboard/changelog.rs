//! What a changelog record costs, by how records are put in messages: the
//! replicated dispatcher's appender (`switchboard_store::changelog`: one
//! message per record, on the record's own subject, each fenced by the
//! partition's epoch), and beside it the same records published raw, one
//! to a message and then 50 to a message (one fenced message holding a
//! batch of a partition's records, as a changelog of batches would).
//! Each on a fresh nats-server; the server's CPU per record and the
//! writer's (this process) are printed. Records alternate between a
//! journal-sized value (820 bytes) and a contact-sized one (300 bytes),
//! over 16 partitions, as `create_contact` → `log` writes them.

use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use switchboard_store::Collection;
use switchboard_store::changelog::{Change, Changelog};

use crate::common::{self, NatsServer};
use crate::report::{Report, per_event, rate};

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
            "{}; nats-server {}, writer {}",
            rate(self.per_second),
            per_event(self.server_us).replace("event", "record"),
            per_event(self.writer_us).replace("event", "record"),
        )
    }
}

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(40_000) as usize;
    println!(
        "\n## changelog: what a record costs the nats-server and its writer, {n} records over \
         {PARTITIONS} partitions"
    );
    let appender = appender(n).await?;
    println!("the appender (a message per record): {}", appender.line());
    let each = raw(n, 1).await?;
    println!("raw, a fenced message per record: {}", each.line());
    let packed = raw(n, PACKED).await?;
    println!(
        "raw, {PACKED} records to a fenced message: {}",
        packed.line()
    );
    report.figure(
        "changelog",
        "the appender, a message per record",
        appender.line(),
    );
    report.figure("changelog", "raw, a message per record", each.line());
    report.figure(
        "changelog",
        format!("raw, {PACKED} records to a message"),
        packed.line(),
    );
    Ok(())
}

fn value(i: usize) -> Bytes {
    Bytes::from(vec![b'v'; if i.is_multiple_of(2) { 820 } else { 300 }])
}

fn partition(i: usize) -> u16 {
    ((i / 2) % usize::from(PARTITIONS)) as u16
}

/// Measures `work` from outside: the server's CPU and this process's.
async fn measured(
    server: &NatsServer,
    n: usize,
    work: impl AsyncFnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Cost> {
    let me = std::process::id();
    let (server0, writer0) = (common::cpu_time(server.pid())?, common::cpu_time(me)?);
    let started = Instant::now();
    work().await?;
    let took = started.elapsed();
    let server_cpu = common::cpu_time(server.pid())? - server0;
    let writer_cpu = common::cpu_time(me)? - writer0;
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / n as f64;
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
                    key: format!("bench\0{i:012}").into_bytes(),
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

/// `n` records published raw, `per_message` to a message, each message
/// fenced as the appender fences a write; [`IN_FLIGHT`] in flight.
async fn raw(n: usize, per_message: usize) -> anyhow::Result<Cost> {
    let server = NatsServer::start()?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    js.create_stream(stream::Config {
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
    measured(&server, n, async || {
        let mut acks = Vec::new();
        let mut i = 0;
        let mut message = 0usize;
        while i < n {
            let p = partition(i);
            let (subject, payload) = if per_message == 1 {
                (format!("raw.{p}.w.{i:012}"), value(i))
            } else {
                let mut packed = Vec::new();
                for k in i..(i + per_message).min(n) {
                    packed.extend_from_slice(&value(k));
                }
                (format!("raw.{p}.b.{message}"), Bytes::from(packed))
            };
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                epochs[usize::from(p)].to_string().as_str(),
            );
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence-Subject",
                format!("raw.{p}.epoch").as_str(),
            );
            acks.push(js.publish_with_headers(subject, headers, payload).await?);
            if acks.len() == IN_FLIGHT {
                for ack in acks.drain(..) {
                    ack.await?;
                }
            }
            i += per_message;
            message += 1;
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    })
    .await
}
