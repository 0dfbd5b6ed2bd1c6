//! Watching dispatchers drain a backlog: when they are done, the CPU time
//! they spent on it, and how consumption went along the way.
//!
//! On NATS the watcher reads the dispatchers' consumers on the server
//! (events waiting to be delivered, and delivered but not acked), not
//! `/metrics`, which grows with the accounts and would cost the dispatchers
//! the reading; about 50 consumer reads a second in all, to keep the
//! server's load low. On the embedded bus it reads `/metrics` (one account
//! there) every 20 ms. Each reading is kept as a [`Sample`]: the events done
//! so far and the dispatchers' CPU time (user + system, `/proc/PID/stat`),
//! so that the CPU per event of any stretch of the drain, and the pauses in
//! it, are read off afterwards.

use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use futures::TryStreamExt as _;

use crate::common::{self, Counts, Dispatcher, Spec, mib};
use crate::compare::PerBuild;
use crate::report::{per_event, rate, secs};

const PREFIX: &str = "vumi";
/// Give up when nothing is done for this long.
const STALL: Duration = Duration::from_secs(60);
/// How often one consumer, or `/metrics`, is read.
const READ_EVERY: Duration = Duration::from_millis(20);

/// One reading of a drain.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// Events done: acked on NATS (neither waiting nor unacked), handled on
    /// the embedded bus.
    pub done: u64,
    /// The dispatchers' CPU time so far, summed over them.
    pub cpu: Duration,
}

impl Sample {
    /// The start of a drain by a dispatcher that has just started: when it
    /// said `listening on`, nothing done yet.
    pub fn listening(dispatcher: &Dispatcher) -> Self {
        Self {
            at: dispatcher.listening_at,
            done: 0,
            cpu: dispatcher.listening_cpu,
        }
    }

    /// Now, nothing done yet: the start of a drain by dispatchers that were
    /// already running.
    pub fn now(dispatchers: &[Dispatcher]) -> anyhow::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            done: 0,
            cpu: cpu_of(dispatchers)?,
        })
    }
}

fn cpu_of(dispatchers: &[Dispatcher]) -> anyhow::Result<Duration> {
    dispatchers.iter().map(Dispatcher::cpu_time).sum()
}

/// A stretch of a drain: from `from` events done to `to`.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    pub from: u64,
    pub to: u64,
    /// The dispatchers' CPU time over it.
    pub cpu: Duration,
    pub cpu_per_event: Duration,
}

impl Slice {
    /// The least CPU time over a slice whose CPU per event means something:
    /// CPU time counts in ticks of 10 ms, and the acked count moves in
    /// bursts (a flush acks all that waited for it, hundreds at a time),
    /// so that a short slice gets the work of events done before it.
    pub const ENOUGH_CPU: Duration = Duration::from_millis(200);

    /// Whether the slice is long enough to judge by.
    pub fn telling(&self) -> bool {
        self.cpu >= Self::ENOUGH_CPU
    }
}

/// A finished drain, as the watcher saw it.
#[derive(Debug, Clone)]
pub struct Drained {
    pub events: u64,
    /// On NATS (where pauses in consumption are a figure), or embedded.
    pub on_nats: bool,
    /// The dispatcher processes whose CPU time is summed.
    processes: usize,
    /// From the start to the reading that saw every event done.
    samples: Vec<Sample>,
    /// How often the watcher read (a pause is known to about this).
    every: Duration,
}

impl Drained {
    pub fn took(&self) -> Duration {
        self.last().at - self.samples[0].at
    }

    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.took().as_secs_f64()
    }

    /// The dispatchers' CPU time over the drain.
    pub fn cpu(&self) -> Duration {
        self.last().cpu.saturating_sub(self.samples[0].cpu)
    }

    /// The dispatchers' CPU time per event in µs, the unit of the targets.
    pub fn cpu_per_event_us(&self) -> f64 {
        self.cpu().as_secs_f64() * 1e6 / self.events.max(1) as f64
    }

    /// The CPU time per event from when `from` events were done until `to`
    /// were, over the readings that enclose that stretch (the last at or
    /// before `from`, the first at or past `to`), so over a little more.
    pub fn slice(&self, from: u64, to: u64) -> Option<Slice> {
        let a = self.samples.iter().rev().find(|s| s.done <= from)?;
        let b = self.samples.iter().find(|s| s.done >= to)?;
        let events = b.done.checked_sub(a.done).filter(|&e| e > 0)?;
        let cpu = b.cpu.saturating_sub(a.cpu);
        Some(Slice {
            from: a.done,
            to: b.done,
            cpu,
            cpu_per_event: cpu / events as u32,
        })
    }

    /// The longest time in which nothing more was done while events were
    /// left: from the reading that first showed a count to the one that
    /// showed more (so it is known to about a reading's interval).
    pub fn longest_pause(&self) -> Duration {
        self.longest_pause_at().0
    }

    /// The longest pause and how many events were done when it began.
    fn longest_pause_at(&self) -> (Duration, u64) {
        let mut longest = (Duration::ZERO, 0);
        let mut since = self.samples[0];
        for s in &self.samples[1..] {
            if s.done > since.done {
                if s.at - since.at > longest.0 {
                    longest = (s.at - since.at, since.done);
                }
                since = *s;
            }
        }
        longest
    }

    /// What one line of output says about the drain.
    pub fn describe(&self) -> String {
        let whose = match self.processes {
            1 => "dispatcher".to_string(),
            n => format!("{n} dispatchers'"),
        };
        let mut line = format!(
            "drained {} in {:.2} s ({}); {whose} CPU {:.2} s, {}",
            self.events,
            self.took().as_secs_f64(),
            rate(self.rate()),
            self.cpu().as_secs_f64(),
            per_event(self.cpu_per_event_us())
        );
        if self.on_nats {
            line.push_str(&format!(
                "; longest pause in consumption {}",
                self.longest_pause_read()
            ));
        }
        line
    }

    /// The longest pause and how often the watcher read: `0.24 s (read
    /// every 20 ms)`.
    pub fn longest_pause_read(&self) -> String {
        let (pause, done) = self.longest_pause_at();
        format!(
            "{} (read every {} ms; from {done} done)",
            secs(pause),
            self.every.as_millis()
        )
    }

    fn last(&self) -> &Sample {
        self.samples.last().expect("a drain has samples")
    }
}

/// Publishes a backlog of `n` events made by `make` while no dispatcher
/// runs, then starts one as `spec` says but without chain files: it loads
/// its chains from its store, as after a restart.
pub async fn start_on_backlog(
    js: &jetstream::Context,
    spec: Spec<'_>,
    n: u64,
    make: impl Fn(u64) -> switchboard_sdk::VumiApiEvent,
    tag: &str,
) -> anyhow::Result<Dispatcher> {
    let (fill, _) = common::fill_nats(js, PREFIX, n, make).await?;
    println!(
        "{tag}backlog of {n} published in {:.1} s",
        fill.as_secs_f64()
    );
    Dispatcher::start(Spec {
        chains: None,
        ..spec
    })
    .await
}

/// Stops `dispatcher` after its drain and prints the drain with the
/// dispatcher's peak resident set; returns the peak, KiB.
pub async fn stop_after(
    dispatcher: Dispatcher,
    drained: &Drained,
    tag: &str,
) -> anyhow::Result<u64> {
    let hwm_kib = dispatcher.hwm_kib()?;
    // Counted since the start, which flushes a few times itself.
    let flushes = match dispatcher.store_flushes().await? {
        Some(n) => format!(
            "; store flushes {:.3} per event",
            n as f64 / drained.events as f64
        ),
        None => String::new(),
    };
    dispatcher.stop().await;
    println!(
        "{tag}dispatcher {}; peak RSS {} MiB{flushes}",
        drained.describe(),
        mib(hwm_kib)
    );
    Ok(hwm_kib)
}

/// The line that compares the drains of both builds, in a run with a
/// baseline.
pub fn print_ratios(drains: &PerBuild<Drained>) {
    crate::compare::print_ratios(&[
        ("events/s", drains.map(Drained::rate)),
        ("CPU per event", drains.map(Drained::cpu_per_event_us)),
    ]);
}

/// Waits until a dispatcher that has just started has taken and acked
/// everything on the NATS stream (see [`nats_by`]).
pub async fn nats(
    dispatcher: &mut Dispatcher,
    js: &jetstream::Context,
    n: u64,
) -> anyhow::Result<Drained> {
    let since = Sample::listening(dispatcher);
    nats_by(std::slice::from_mut(dispatcher), js, n, since).await
}

/// Waits until `dispatchers` (sharing the bus) have taken and acked the `n`
/// events on the NATS stream, watching their consumers on the server, then
/// checks that their `/metrics` count `n` events handled in all; the drain
/// runs from `since`. The events may still be being published while it
/// watches: what counts as done is what was published and is neither
/// pending nor waiting for its ack.
pub async fn nats_by(
    dispatchers: &mut [Dispatcher],
    js: &jetstream::Context,
    n: u64,
    since: Sample,
) -> anyhow::Result<Drained> {
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
    let every = READ_EVERY * consumers.len() as u32;
    let drained = watch(dispatchers, n, since, every, async |_| {
        let (mut left, mut delivered) = (0, 0);
        for consumer in &mut consumers {
            let info = consumer.info().await?;
            left += info.num_pending + info.num_ack_pending as u64;
            delivered = delivered.max(info.delivered.stream_sequence);
        }
        // Read after the consumers: an event published meanwhile counts as
        // published, never only as pending (which would count one fewer
        // done than the reading before).
        let published = stream.get_info().await?.state.last_sequence;
        Ok((published.saturating_sub(left), left == 0 && delivered >= n))
    })
    .await?;
    let mut counts = Counts::default();
    for d in dispatchers.iter() {
        let c = d.counts(None).await?;
        counts.handled += c.handled;
        counts.other += c.other;
    }
    if counts.handled != n || counts.other != 0 {
        bail!(
            "the stream is drained, but {} events were handled and {} not \
             (unrouted, expired or dead-lettered) of {n}:\n{}",
            counts.handled,
            counts.other,
            dispatchers[0].log_tail()
        );
    }
    Ok(Drained {
        on_nats: true,
        ..drained
    })
}

/// Waits until a dispatcher that has just started has handled `n` events
/// of `account` (or of all), reading its `/metrics`.
pub async fn embedded(
    dispatcher: &mut Dispatcher,
    account: Option<&str>,
    n: u64,
) -> anyhow::Result<Drained> {
    let since = Sample::listening(dispatcher);
    watch(
        std::slice::from_mut(dispatcher),
        n,
        since,
        READ_EVERY,
        async |dispatchers| {
            let d = &dispatchers[0];
            let counts = d.counts(account).await?;
            if counts.other > 0 {
                bail!(
                    "{} events were not handled (unrouted, expired or dead-lettered):\n{}",
                    counts.other,
                    d.log_tail()
                );
            }
            Ok((counts.handled, counts.handled >= n))
        },
    )
    .await
}

/// Reads `done` (events done, and whether the drain is over) and the
/// dispatchers' CPU time every `every` until the drain is over; fails if a
/// dispatcher exits or nothing is done for [`STALL`].
async fn watch(
    dispatchers: &mut [Dispatcher],
    n: u64,
    since: Sample,
    every: Duration,
    mut done: impl AsyncFnMut(&[Dispatcher]) -> anyhow::Result<(u64, bool)>,
) -> anyhow::Result<Drained> {
    let mut samples = vec![since];
    let mut progressed = since;
    loop {
        tokio::time::sleep(every).await;
        for d in dispatchers.iter_mut() {
            d.check_alive()?;
        }
        let (count, over) = done(dispatchers).await?;
        let sample = Sample {
            at: Instant::now(),
            done: count,
            cpu: cpu_of(dispatchers)?,
        };
        samples.push(sample);
        if over {
            return Ok(Drained {
                events: n,
                on_nats: false,
                processes: dispatchers.len(),
                samples,
                every,
            });
        }
        if count > progressed.done {
            progressed = sample;
        } else if progressed.at.elapsed() > STALL {
            bail!(
                "nothing done for {STALL:?} at {} of {n} events:\n{}",
                progressed.done,
                dispatchers[0].log_tail()
            );
        }
    }
}
