//! The bus's own limit with a bare async-nats client, and the
//! `switchboard-sdk` emitter next to it.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use switchboard_sdk::VumiApiEvent;
use switchboard_sdk::nats::NatsEmitter;

use crate::common::{self, EventsBus, PUBLISH_WINDOW, poll_event};
use crate::report::{Report, percent, rate};

const PREFIX: &str = "vumi";
/// Publish rounds of each kind, alternated; the median is reported.
const ROUNDS: usize = 3;
/// Events published one at a time, each waiting for its ack.
const SERIAL_EVENTS: u64 = 2_000;

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let per_round = options.scaled(100_000);
    println!("\n## bus: the limit, with a bare async-nats client");
    let EventsBus {
        server: _server,
        client,
        js,
        stream,
    } = EventsBus::start(PREFIX).await?;
    let emitter = NatsEmitter::new(client);

    // Raw and emitter rounds alternate, so that both see the same server
    // (its stream grows as they go) and the same load.
    let mut next = 0u64;
    let mut batch = |n: u64| {
        let events: Vec<VumiApiEvent> = (next..next + n)
            .map(|i| poll_event("bench", i, 1_000))
            .collect();
        next += n;
        events
    };
    let size = batch(1)[0].to_json().len();
    let (mut raw, mut emitted) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let events = batch(per_round);
        let (_, took) = raw_publish(&js, &events, PUBLISH_WINDOW, None).await?;
        raw.push(per_round as f64 / took.as_secs_f64());
        let events = batch(per_round);
        let took = emit(&emitter, &events, PUBLISH_WINDOW).await?;
        emitted.push(per_round as f64 / took.as_secs_f64());
        println!(
            "round {round}: {per_round} events each, raw publish {}, emitter {}",
            rate(raw[round - 1]),
            rate(emitted[round - 1])
        );
    }
    let raw_rate = median(&mut raw);
    let emit_rate = median(&mut emitted);

    // One at a time: the cost the emitter adds to a worker that waits for
    // each event to be stored.
    let events = batch(SERIAL_EVENTS);
    let raw_serial =
        SERIAL_EVENTS as f64 / raw_publish(&js, &events, 1, None).await?.1.as_secs_f64();
    let events = batch(SERIAL_EVENTS);
    let emit_serial = SERIAL_EVENTS as f64 / emit(&emitter, &events, 1).await?.as_secs_f64();
    println!(
        "one at a time ({SERIAL_EVENTS} events): raw publish {}, emitter {}",
        rate(raw_serial),
        rate(emit_serial)
    );

    let (taken, took) = common::raw_consume(&stream, "raw").await?;
    let consume_rate = taken as f64 / took.as_secs_f64();
    println!(
        "raw pull consume + ack: {taken} messages in {:.2} s ({})",
        took.as_secs_f64(),
        rate(consume_rate)
    );

    report.figure(
        "bus",
        format!("raw publish, {PUBLISH_WINDOW} acks in flight ({size}-byte events)"),
        rate(raw_rate),
    );
    report.figure("bus", "raw pull consume + ack", rate(consume_rate));
    report.figure(
        "emit",
        format!("sdk emitter, {PUBLISH_WINDOW} in flight"),
        rate(emit_rate),
    );
    let ratio = emit_rate / raw_rate;
    report.check(
        "emit",
        "emitter / raw publish",
        percent(ratio),
        "≥ 80%",
        ratio >= 0.8,
    );
    report.figure(
        "emit",
        "emitter / raw publish, one at a time",
        percent(emit_serial / raw_serial),
    );
    Ok(())
}

/// The middle value.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Publishes `events` with a bare client and `window` acks in flight, at
/// `per_second` or as fast as the bus takes them; returns when each was
/// published and how long it all took.
pub async fn raw_publish(
    js: &jetstream::Context,
    events: &[VumiApiEvent],
    window: usize,
    per_second: Option<f64>,
) -> anyhow::Result<(Vec<Instant>, Duration)> {
    // Encoding is not the bus's cost: done before the clock starts.
    let encoded: Vec<(String, Bytes, String)> = events
        .iter()
        .map(|e| {
            (
                e.subject(PREFIX),
                Bytes::from(e.to_json()),
                e.id.to_string(),
            )
        })
        .collect();
    let mut published = Vec::with_capacity(events.len());
    let mut acks = FuturesUnordered::new();
    let started = tokio::time::Instant::now();
    for (i, (subject, payload, id)) in encoded.into_iter().enumerate() {
        if let Some(per_second) = per_second {
            tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / per_second))
                .await;
        }
        published.push(Instant::now());
        let message = PublishMessage::build().payload(payload).message_id(id);
        acks.push(js.send_publish(subject, message).await?.into_future());
        while acks.len() >= window {
            acks.next().await.expect("a pending ack")?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok((published, started.elapsed()))
}

/// Emits events through the sdk with `window` emits in flight.
async fn emit(
    emitter: &NatsEmitter,
    events: &[VumiApiEvent],
    window: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for event in events {
        pending.push(emitter.emit(event));
        while pending.len() >= window {
            pending.next().await.expect("a pending emit")?;
        }
    }
    while let Some(emitted) = pending.next().await {
        emitted?;
    }
    Ok(started.elapsed())
}
