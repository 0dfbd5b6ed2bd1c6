//! Pending timers: a dispatcher on NATS holds `n` chains paused in a
//! `delay` (each a durable timer), most of them due in a day and a tenth
//! of them due in the same second. Measured: the cost of pausing (rate and
//! CPU per event), the resident set holding them, the start-up of a
//! dispatcher over them (to listening, and to every timer known), and how
//! late the tenth due together go on: from their due time to the event the
//! next step emits reaching a subscriber in this program (p50, p99, max),
//! with the dispatcher's CPU per fired timer (the fire, the event's pass,
//! the emit and the child's own pass, unrouted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::common::{self, Dispatcher, EventsBus, Spec, poll_chain, poll_event};
use crate::receiver::{self, Arrivals};
use crate::report::{Report, mib_of, micros_of, per_event, rate, secs};

const PREFIX: &str = "vumi";
const ACCOUNT: &str = "bench";

/// `delay` until the event's `at`, then an event naming it.
fn chain() -> String {
    poll_chain(
        ACCOUNT,
        r#"
[[chains.steps]]
handler = "delay"
config = { until = "{{ event.event_data.at }}" }

[[chains.steps]]
handler = "emit"
config = { event_type = "woke", data = { parent = "{{ event.id }}" } }
"#,
    )
}

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(100_000);
    let together = n / 10;
    println!(
        "\n## timers: {n} chains paused in a delay, {together} of them due in the same second"
    );
    let build = &options.builds[0];
    let EventsBus {
        server, js, client, ..
    } = EventsBus::start(PREFIX).await?;
    let woke = Woke::subscribe(&client).await?;
    let root = tempfile::tempdir()?;
    let chains = root.path().join("chains");
    std::fs::create_dir_all(&chains)?;
    std::fs::write(chains.join("bench.toml"), chain())?;
    let spec = Spec {
        binary: Some(&build.binary),
        data: &root.path().join("data"),
        chains: Some(&chains),
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: None,
    };
    let mut dispatcher = Dispatcher::start(spec).await?;

    // The far ones: paused, measured as a drain.
    let far = n - together;
    let tomorrow = at(SystemTime::now() + Duration::from_secs(86_400));
    let cpu_before = dispatcher.cpu_time()?;
    let started = Instant::now();
    common::fill_nats(&js, PREFIX, far, |i| event_at(i, &tomorrow)).await?;
    wait_for_pending(&mut dispatcher, far).await?;
    let took = started.elapsed();
    let cpu = dispatcher.cpu_time()? - cpu_before;
    let pause_rate = far as f64 / took.as_secs_f64();
    let pause_cpu_us = cpu.as_secs_f64() * 1e6 / far as f64;
    println!(
        "{far} paused in {:.1} s (publishing included): {}, {}/event",
        took.as_secs_f64(),
        rate(pause_rate),
        micros_of(pause_cpu_us)
    );

    // The ones due together: late enough for them to be paused and for a
    // restart before they are due.
    let margin = Duration::from_secs_f64(together as f64 / pause_rate * 2.0 + 20.0);
    let due = SystemTime::now() + margin;
    let due = due
        .checked_sub(Duration::from_nanos(u64::from(
            OffsetDateTime::from(due).nanosecond(),
        )))
        .unwrap_or(due);
    let due_text = at(due);
    let events: Vec<_> = (0..together)
        .map(|i| event_at(far + i, &due_text))
        .collect();
    common::fill_nats(&js, PREFIX, together, |i| events[i as usize].clone()).await?;
    wait_for_pending(&mut dispatcher, n).await?;
    let rss_holding = dispatcher.rss_kib()?;
    println!("{n} pending: resident set {}", mib_of(rss_holding as f64));

    // A restart over them.
    dispatcher.shut_down().await?;
    let mut dispatcher = Dispatcher::start(spec).await?;
    let listening = dispatcher.start_took;
    wait_for_pending(&mut dispatcher, n).await?;
    let known = dispatcher.listening_at.elapsed() + listening;
    let rss_started = dispatcher.rss_kib()?;
    println!(
        "restarted over {n} pending: listening after {}, every timer known after {}, resident \
         set {}",
        secs(listening),
        secs(known),
        mib_of(rss_started as f64)
    );
    let left = due
        .duration_since(SystemTime::now())
        .map_err(|_| anyhow::anyhow!("the timers fell due before the restart was over"))?;

    // Due together.
    tokio::time::sleep(left.saturating_sub(Duration::from_millis(500))).await;
    let cpu_before = dispatcher.cpu_time()?;
    let due_instant = Instant::now() + due.duration_since(SystemTime::now()).unwrap_or_default();
    let arrivals = woke.wait_for(&events, &mut dispatcher).await?;
    let cpu = dispatcher.cpu_time()? - cpu_before;
    let mut lateness: Vec<Duration> = Vec::with_capacity(arrivals.len());
    let mut early = 0;
    for at in arrivals.values() {
        match at.checked_duration_since(due_instant) {
            Some(late) => lateness.push(late),
            None => early += 1,
        }
    }
    if early > 0 {
        bail!("{early} timers went on before they were due");
    }
    lateness.sort();
    let quantile = |q: f64| lateness[((lateness.len() - 1) as f64 * q).round() as usize];
    let (p50, p99, max) = (quantile(0.5), quantile(0.99), quantile(1.0));
    let fired_cpu_us = cpu.as_secs_f64() * 1e6 / together as f64;
    println!(
        "{together} due at once went on (their next step's event arrived) p50 {} p99 {} max {} \
         after their time, none early; {} of CPU per timer",
        ms(p50),
        ms(p99),
        ms(max),
        micros_of(fired_cpu_us)
    );
    if woke.repeats() > 0 {
        bail!("{} paused chains went on twice", woke.repeats());
    }
    dispatcher.shut_down().await?;

    let scenario = "timers";
    report.figure(
        scenario,
        format!("pausing {far} in a delay"),
        format!("{}, {}", rate(pause_rate), per_event(pause_cpu_us)),
    );
    report.figure(
        scenario,
        format!("resident set holding {n} pending"),
        mib_of(rss_holding as f64),
    );
    report.figure(
        scenario,
        format!("start over {n} pending: listening / every timer known"),
        format!("{} / {}", secs(listening), secs(known)),
    );
    report.check(
        scenario,
        format!("lateness of {together} due in one second, p50 / p99"),
        format!("{} / {} (max {})", ms(p50), ms(p99), ms(max)),
        "p99 ≤ 1 s",
        p99 <= Duration::from_secs(1),
    );
    report.figure(
        scenario,
        "CPU per fired timer (fire, wake, emit, the child's pass)",
        micros_of(fired_cpu_us),
    );
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// `t` as RFC 3339, to the millisecond.
fn at(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    let t = t
        .replace_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(t);
    t.format(&Rfc3339).expect("an RFC 3339 time")
}

/// The `i`th event, paused until `at`.
fn event_at(i: u64, at: &str) -> switchboard_sdk::VumiApiEvent {
    let mut e = poll_event(ACCOUNT, i, 1_000);
    e.event_data
        .insert("at".into(), serde_json::Value::String(at.to_string()));
    e
}

/// Waits until the dispatcher knows of `n` pending timers.
async fn wait_for_pending(dispatcher: &mut Dispatcher, n: u64) -> anyhow::Result<()> {
    const STALL: Duration = Duration::from_secs(60);
    let mut seen = 0;
    let mut progressed = Instant::now();
    loop {
        let pending = pending(dispatcher).await?;
        if pending >= n {
            return Ok(());
        }
        if pending > seen {
            seen = pending;
            progressed = Instant::now();
        }
        dispatcher.check_alive()?;
        if progressed.elapsed() > STALL {
            bail!(
                "{seen} of {n} timers pending after {STALL:?} without progress:\n{}",
                dispatcher.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The dispatcher's `switchboard_timers_pending`.
async fn pending(dispatcher: &Dispatcher) -> anyhow::Result<u64> {
    let text = dispatcher.metrics().await?;
    text.lines()
        .find_map(|l| l.strip_prefix("switchboard_timers_pending "))
        .context("no switchboard_timers_pending in /metrics")?
        .trim()
        .parse::<f64>()
        .map(|v| v as u64)
        .context("switchboard_timers_pending is not a number")
}

/// The `woke` events the paused chains emit when they go on, by the event
/// that paused: when each first arrived, on a core subscription.
struct Woke {
    arrivals: Arc<Mutex<Arrivals>>,
    task: tokio::task::JoinHandle<()>,
}

impl Woke {
    async fn subscribe(client: &async_nats::Client) -> anyhow::Result<Self> {
        use futures::StreamExt as _;
        let mut subscriber = client
            .subscribe(format!("{PREFIX}.events.{ACCOUNT}.survey.woke"))
            .await?;
        client.flush().await?;
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let noted = arrivals.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let at = Instant::now();
                let parent = serde_json::from_slice::<serde_json::Value>(&message.payload)
                    .ok()
                    .and_then(|e| e["event_data"]["parent"].as_str().map(str::to_string));
                if let Some(parent) = parent {
                    noted.lock().expect("arrivals").note(parent, at);
                }
            }
        });
        Ok(Self { arrivals, task })
    }

    /// Events that went on twice.
    fn repeats(&self) -> u64 {
        self.arrivals.lock().expect("arrivals").repeats()
    }

    /// Waits until each of `events` went on; returns when, by event id.
    async fn wait_for(
        &self,
        events: &[switchboard_sdk::VumiApiEvent],
        dispatcher: &mut Dispatcher,
    ) -> anyhow::Result<HashMap<String, Instant>> {
        receiver::wait_for(
            &self.arrivals,
            "paused chain going on",
            events,
            std::slice::from_mut(dispatcher),
        )
        .await
    }
}

impl Drop for Woke {
    fn drop(&mut self) {
        self.task.abort();
    }
}
