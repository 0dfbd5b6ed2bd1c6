//! The full chain: a Rhai scoring step, `create_contact`, `send_sms` through a
//! NATS transport and `payment_webhook` to a keep-alive HTTP receiver in this
//! program. Latency is from the publish call to the webhook's arrival at the
//! receiver (the chain's last step), measured at a fixed offered load and at
//! saturation, with the dispatcher's CPU time per event in each.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use switchboard_sdk::VumiApiEvent;

use crate::common::{Dispatcher, EventsBus, PUBLISH_WINDOW, Spec, mib, poll_chain, poll_event};
use crate::compare::{Build, PerBuild, print_ratios, times};
use crate::receiver::{self, Receiver, SECRET_NAME};
use crate::report::{Report, Value, mib_of, micros_of, per_event, rate};

const PREFIX: &str = "vumi";
const ACCOUNT: &str = "bench";
/// Respondents are spread over this many conversations.
const CONVERSATIONS: u64 = 1_000;
/// The offered load of the latency run.
const OFFERED_PER_SECOND: f64 = 2_000.0;
/// A load below what this machine sustains, to show latency without a queue.
const LIGHT_PER_SECOND: f64 = 250.0;

/// The scoring script: a little of what a real one does.
const SCORE: &str = r#"
fn handle(event, steps, config) {
    let answers = event.event_data.answers;
    let key = #{ q1: "b", q2: "a", q3: "d" };
    let score = 0;
    for q in key.keys() {
        if answers[q] == key[q] { score += 1; }
    }
    #{ score: score, points: score * config.per_answer }
}
"#;

fn chain_file(account: &str, receiver: std::net::SocketAddr) -> String {
    let steps = format!(
        r#"
[[chains.steps]]
handler = "script:score"
config = {{ per_answer = 10 }}

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}", fields = {{ last_poll = "{{{{ event.conversation_key }}}}", score = "{{{{ steps.score.score }}}}" }} }}

[[chains.steps]]
handler = "send_sms"
config = {{ provider = "transport", to = "{{{{ steps.create_contact.msisdn }}}}", body = "Thanks! You scored {{{{ steps.score.score }}}}/3. Airtime is on its way." }}

[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "http://{receiver}/payments", secret = "{SECRET_NAME}", body = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}", amount_cents = "{{{{ steps.score.points }}}}", reference = "{{{{ event.id }}}}" }} }}
"#
    );
    poll_chain(account, &steps)
}

const CONFIG: &str = r#"
[providers.sms.transport]
type = "nats"
transport = "bench_sms"
"#;

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    println!(
        "\n## chain: Rhai → create_contact → send_sms (NATS) → payment_webhook, \
         {} events at {LIGHT_PER_SECOND}/s, {} at {OFFERED_PER_SECOND}/s, then {} at once",
        options.scaled(5_000),
        options.scaled(20_000),
        options.scaled(30_000)
    );
    let runs = PerBuild::measure(&options.builds, async |build| {
        one_build(options, build).await
    })
    .await?;
    print_ratios(&[
        ("events/s at saturation", runs.map(|r| r.saturated.rate)),
        (
            "CPU per event at saturation",
            runs.map(|r| r.saturated.cpu_per_event_us),
        ),
        (
            &format!("p99 at {OFFERED_PER_SECOND}/s"),
            runs.map(|r| r.fixed.p99.as_secs_f64()),
        ),
    ]);

    let p99 = runs.map(|r| r.fixed.p99.as_secs_f64() * 1e3);
    report.check(
        "chain",
        format!("latency p99 at {OFFERED_PER_SECOND}/s offered"),
        Value::of(&p99, |v| format!("{v:.1} ms")),
        "< 10 ms",
        p99.current < 10.0,
    );
    report.figure(
        "chain",
        format!("latency p50 / p99.9 at {OFFERED_PER_SECOND}/s offered"),
        Value::text(&runs.map(|r| format!("{} / {}", ms(r.fixed.p50), ms(r.fixed.p999)))),
    );
    report.figure(
        "chain",
        format!("achieved at {OFFERED_PER_SECOND}/s offered"),
        Value::join([
            Value::of(&runs.map(|r| r.fixed.rate), rate),
            Value::of(&runs.map(|r| r.fixed.cpu_per_event_us), per_event),
        ]),
    );
    report.figure(
        "chain",
        format!("latency p50 / p99 / p99.9 at {LIGHT_PER_SECOND}/s offered"),
        Value::text(&runs.map(|r| r.light.latencies())),
    );
    report.figure(
        "chain",
        "events/s at saturation",
        Value::join([
            Value::of(&runs.map(|r| r.saturated.rate), rate),
            Value::of(&runs.map(|r| r.saturated.cpu_per_event_us), per_event),
        ]),
    );
    report.check_cpu(
        "chain",
        "dispatcher CPU per event at saturation",
        &runs.map(|r| r.saturated.cpu_per_event_us),
        150.0,
    );
    let multiple = runs.map(|r| r.saturated.rate / OFFERED_PER_SECOND);
    report.check(
        "chain",
        format!("events/s at saturation / the {OFFERED_PER_SECOND}/s offered"),
        Value::of(&multiple, times),
        "≥ 3×",
        multiple.current >= 3.0,
    );
    let figure = "events/s at saturation / the baseline build's";
    match runs.map(|r| r.saturated.rate).ratio() {
        Some(ratio) => report.check("chain", figure, times(ratio), "≥ 4×", ratio >= 4.0),
        None => report.check(
            "chain",
            figure,
            "(needs --baseline PATH)".to_string(),
            "≥ 4×",
            None,
        ),
    }
    report.figure(
        "chain",
        "latency p50 / p99 / p99.9 at saturation (queueing included)",
        Value::text(&runs.map(|r| r.saturated.latencies())),
    );
    report.figure(
        "chain",
        "mean time per step",
        Value::text(&runs.map(|r| r.steps.clone())),
    );
    report.figure(
        "chain",
        "peak RSS",
        Value::of(&runs.map(|r| r.hwm_kib as f64), mib_of),
    );
    Ok(())
}

/// The offered load of the replicated latency run.
const REPLICATED_PER_SECOND: f64 = 500.0;
/// How many replicas it runs.
const REPLICAS: usize = 3;
/// Its accounts, so that the partitions (by account) spread over the
/// replicas.
const REPLICATED_ACCOUNTS: u64 = 16;

/// The full chain on three replicas with `--replicated` sharing one
/// nats-server, at 500 events/s offered over 16 accounts: latency from
/// publish to webhook, and the replicas' CPU per event in total.
pub async fn replicated(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(10_000);
    println!(
        "\n## chain on {REPLICAS} replicas: the full chain over {REPLICATED_ACCOUNTS} accounts, \
         {n} events at {REPLICATED_PER_SECOND}/s offered, one nats-server"
    );
    let runs = PerBuild::measure(&options.builds, async |build| {
        replicated_build(options, build, n).await
    })
    .await?;
    print_ratios(&[
        (
            &format!("p99 at {REPLICATED_PER_SECOND}/s"),
            runs.map(|r| r.p99.as_secs_f64()),
        ),
        (
            "CPU per event (all replicas)",
            runs.map(|r| r.cpu_per_event_us),
        ),
    ]);
    let p99 = runs.map(|r| r.p99.as_secs_f64() * 1e3);
    let what = format!("{REPLICAS} replicas, latency p99 at {REPLICATED_PER_SECOND}/s offered");
    report.check(
        "replicas",
        what,
        Value::of(&p99, |v| format!("{v:.1} ms")),
        "< 25 ms",
        p99.current < 25.0,
    );
    report.figure(
        "replicas",
        format!("{REPLICAS} replicas, full chain at {REPLICATED_PER_SECOND}/s offered"),
        Value::join([
            Value::text(&runs.map(|r| format!("p50 / p99.9 {} / {}", ms(r.p50), ms(r.p999)))),
            Value::of(&runs.map(|r| r.rate), rate),
            Value::of(&runs.map(|r| r.cpu_per_event_us), per_event),
        ]),
    );
    Ok(())
}

/// The replicated latency run with `build`: the replicas started and
/// sharing the partitions, the accounts configured through the first, a
/// warm-up, then the measured run; every event must come all the way.
async fn replicated_build(options: &crate::Options, build: &Build, n: u64) -> anyhow::Result<Run> {
    let tag = build.tag();
    let server = crate::common::NatsServer::start()?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let receiver = Receiver::start().await?;
    let root = tempfile::tempdir()?;
    let config = root.path().join("switchboard.toml");
    std::fs::write(&config, format!("[bus]\nreplicated = true\n{CONFIG}"))?;
    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        replicas.push(
            Dispatcher::start(Spec {
                binary: Some(&build.binary),
                data: &root.path().join(format!("data-{i}")),
                chains: None,
                nats: Some(server.url()),
                concurrency: options.concurrency,
                config: Some(&config),
            })
            .await?,
        );
    }
    let accounts: Vec<String> = (0..REPLICATED_ACCOUNTS)
        .map(|i| format!("{ACCOUNT}-{i}"))
        .collect();
    for account in &accounts {
        set_up_account(&replicas[0], account, &receiver).await?;
    }
    // Each replica pulls its share of the partitions before the clock runs.
    let started = Instant::now();
    loop {
        let mut shares = Vec::new();
        for r in &replicas {
            shares.push(r.partitions().await?);
        }
        let mut every: Vec<u64> = shares.iter().flatten().copied().collect();
        every.sort_unstable();
        if shares.iter().all(|s| !s.is_empty()) && every == (0..16).collect::<Vec<u64>>() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the {REPLICAS} replicas did not share the partitions in 60 s: {shares:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut next = 0u64;
    let mut batch = |n: u64| -> Vec<VumiApiEvent> {
        let events = (next..next + n)
            .map(|i| {
                let account = &accounts[(i % REPLICATED_ACCOUNTS) as usize];
                poll_event(account, i / REPLICATED_ACCOUNTS, CONVERSATIONS)
            })
            .collect();
        next += n;
        events
    };
    // A warm-up: every account's partition taken, connections, caches.
    let warm_up = batch(options.scaled(2_000));
    offer(&js, &warm_up, Some(REPLICATED_PER_SECOND)).await?;
    receiver.wait_for(&warm_up, &mut replicas).await?;

    let events = batch(n);
    let cpu = |replicas: &[Dispatcher]| -> anyhow::Result<Duration> {
        replicas.iter().map(Dispatcher::cpu_time).sum()
    };
    let before = cpu(&replicas)?;
    let published = offer(&js, &events, Some(REPLICATED_PER_SECOND)).await?;
    let arrived = receiver.wait_for(&events, &mut replicas).await?;
    let used = cpu(&replicas)?.saturating_sub(before);
    let run = Run::new(&events, &published, &arrived, used);
    println!("{tag}offered {REPLICATED_PER_SECOND}/s to {REPLICAS} replicas: {run}");

    let total = next;
    let mut handled = 0;
    for r in &replicas {
        for account in &accounts {
            handled += r.counts(Some(account)).await?.handled;
        }
    }
    let repeats = receiver.repeats();
    println!(
        "{tag}{handled} of {total} handled (summed over the replicas), {repeats} repeated webhooks"
    );
    if handled < total {
        bail!("{total} events published, but the replicas handled {handled}");
    }
    for r in replicas {
        r.stop().await;
    }
    Ok(run)
}

/// Gives `account` the scoring script, the webhook's secret and the chain,
/// through `dispatcher`'s API.
async fn set_up_account(
    dispatcher: &Dispatcher,
    account: &str,
    receiver: &Receiver,
) -> anyhow::Result<()> {
    dispatcher
        .put_text(
            &format!("/v1/accounts/{account}/scripts/score"),
            SCORE.into(),
            "text/plain",
        )
        .await?;
    receiver::put_secret(dispatcher, account).await?;
    dispatcher
        .put_text(
            &format!("/v1/accounts/{account}/chains"),
            chain_file(account, receiver.addr),
            "application/toml",
        )
        .await?;
    Ok(())
}

/// What the chain measured with one build.
#[derive(Debug)]
struct ChainRun {
    light: Run,
    fixed: Run,
    saturated: Run,
    /// The mean time of each step.
    steps: String,
    hwm_kib: u64,
}

/// The chain on a fresh server with a dispatcher of `build`: a warm-up, a
/// light load, the offered load, then saturation.
async fn one_build(options: &crate::Options, build: &Build) -> anyhow::Result<ChainRun> {
    let tag = build.tag();
    let EventsBus { server, js, .. } = EventsBus::start(PREFIX).await?;
    let receiver = Receiver::start().await?;

    let root = tempfile::tempdir()?;
    let config = root.path().join("switchboard.toml");
    std::fs::write(&config, CONFIG)?;
    let mut dispatcher = Dispatcher::start(Spec {
        binary: Some(&build.binary),
        data: &root.path().join("data"),
        chains: None,
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: Some(&config),
    })
    .await?;
    set_up_account(&dispatcher, ACCOUNT, &receiver).await?;

    let mut next = 0u64;
    let mut batch = |n: u64| {
        let events: Vec<VumiApiEvent> = (next..next + n)
            .map(|i| poll_event(ACCOUNT, i, CONVERSATIONS))
            .collect();
        next += n;
        events
    };

    let mut phase = async |events: u64, per_second: Option<f64>| {
        let events = batch(options.scaled(events));
        Run::offer(&js, &receiver, &mut dispatcher, &events, per_second).await
    };
    // A short warm-up: connections, caches, the first sled pages.
    phase(2_000, Some(OFFERED_PER_SECOND)).await?;
    let light = phase(5_000, Some(LIGHT_PER_SECOND)).await?;
    println!("{tag}offered {LIGHT_PER_SECOND}/s: {light}");
    let fixed = phase(20_000, Some(OFFERED_PER_SECOND)).await?;
    println!("{tag}offered {OFFERED_PER_SECOND}/s: {fixed}");
    let saturated = phase(30_000, None).await?;
    println!("{tag}saturation: {saturated}");

    // Every event went all the way: handled, an SMS command on the
    // transport's stream, a webhook.
    let total = next;
    let counts = dispatcher.counts(Some(ACCOUNT)).await?;
    let mut outbound = js
        .get_stream(switchboard_sdk::nats::stream_name(
            PREFIX,
            switchboard_bus::commands::OUTBOUND_STREAM,
        ))
        .await
        .context("the outbound stream")?;
    let sms = outbound.info().await?.state.messages;
    if counts.handled != total || counts.other != 0 || sms != total {
        bail!(
            "{total} events published, but {} handled, {} not handled, {sms} SMS commands",
            counts.handled,
            counts.other
        );
    }
    // Where an event's time goes: the mean attempt at each step, its own
    // waits included (the bus's and the receiver's answers), not the flush
    // before it.
    let mut steps = Vec::new();
    for handler in [
        "script:score",
        "create_contact",
        "send_sms",
        "payment_webhook",
    ] {
        if let Some(mean) = dispatcher.mean_step(handler).await? {
            steps.push(format!("{handler} {}", ms(mean)));
        }
    }
    let steps = steps.join(", ");
    println!("{tag}mean time per step: {steps}");
    if let Some(flushes) = dispatcher.store_flushes().await? {
        println!(
            "{tag}store flushes: {flushes} ({:.2} per event)",
            flushes as f64 / total as f64
        );
    }
    let repeats = receiver.repeats();
    let hwm_kib = dispatcher.hwm_kib()?;
    dispatcher.stop().await;
    println!(
        "{tag}all {total} handled, {sms} SMS commands, {repeats} repeated webhooks; peak RSS {} MiB",
        mib(hwm_kib)
    );
    Ok(ChainRun {
        light,
        fixed,
        saturated,
        steps,
        hwm_kib,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Publishes `events` at `per_second`, or as fast as the bus takes them;
/// returns when each was published.
async fn offer(
    js: &jetstream::Context,
    events: &[VumiApiEvent],
    per_second: Option<f64>,
) -> anyhow::Result<Vec<Instant>> {
    Ok(
        crate::bus::raw_publish(js, events, PUBLISH_WINDOW, per_second)
            .await?
            .0,
    )
}

/// What one run of events measured.
#[derive(Debug)]
struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    /// The dispatcher's CPU time from the first publish to the last
    /// webhook, per event, µs.
    cpu_per_event_us: f64,
}

impl Run {
    /// Publishes `events` at `per_second` (or as fast as the bus takes
    /// them) and waits for every webhook.
    async fn offer(
        js: &jetstream::Context,
        receiver: &Receiver,
        dispatcher: &mut Dispatcher,
        events: &[VumiApiEvent],
        per_second: Option<f64>,
    ) -> anyhow::Result<Self> {
        let cpu = dispatcher.cpu_time()?;
        let published = offer(js, events, per_second).await?;
        let arrived = receiver
            .wait_for(events, std::slice::from_mut(dispatcher))
            .await?;
        let cpu = dispatcher.cpu_time()?.saturating_sub(cpu);
        Ok(Self::new(events, &published, &arrived, cpu))
    }

    fn new(
        events: &[VumiApiEvent],
        published: &[Instant],
        arrived: &HashMap<String, Instant>,
        cpu: Duration,
    ) -> Self {
        let mut latencies: Vec<Duration> = events
            .iter()
            .zip(published)
            .map(|(e, &at)| arrived[&e.id.to_string()].saturating_duration_since(at))
            .collect();
        latencies.sort();
        let at =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        let first = published.iter().min().expect("events");
        let last = arrived.values().max().expect("arrivals");
        Self {
            rate: events.len() as f64 / last.duration_since(*first).as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            cpu_per_event_us: cpu.as_secs_f64() * 1e6 / events.len() as f64,
        }
    }

    /// `p50 / p99 / p99.9`.
    fn latencies(&self) -> String {
        format!("{} / {} / {}", ms(self.p50), ms(self.p99), ms(self.p999))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, dispatcher CPU {}/event, latency p50 {} p99 {} p99.9 {}",
            rate(self.rate),
            micros_of(self.cpu_per_event_us),
            ms(self.p50),
            ms(self.p99),
            ms(self.p999)
        )
    }
}
