//! The full chain: a Rhai scoring step, `create_contact`, `send_sms` through a
//! NATS transport and `payment_webhook` to a keep-alive HTTP receiver in this
//! program. Latency is from the publish call to the webhook's arrival at the
//! receiver (the chain's last step), measured at a fixed offered load and at
//! saturation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use axum::extract::State;
use axum::http::StatusCode;
use bytes::Bytes;
use switchboard_sdk::VumiApiEvent;

use crate::common::{Dispatcher, NatsServer, PUBLISH_WINDOW, Spec, mib, poll_event};
use crate::report::{Report, rate};

const PREFIX: &str = "vumi";
const ACCOUNT: &str = "bench";
/// Respondents are spread over this many conversations.
const CONVERSATIONS: u64 = 1_000;
/// The offered load of the latency run.
const OFFERED_PER_SECOND: f64 = 2_000.0;
/// A load below what this machine sustains, to show latency without a queue.
const LIGHT_PER_SECOND: f64 = 250.0;
/// The webhook signing secret of the account.
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

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

fn chain_file(receiver: std::net::SocketAddr) -> String {
    format!(
        r#"account_key = "{ACCOUNT}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

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
config = {{ url = "http://{receiver}/payments", secret = "gateway", body = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}", amount_cents = "{{{{ steps.score.points }}}}", reference = "{{{{ event.id }}}}" }} }}
"#
    )
}

const CONFIG: &str = r#"
[providers.sms.transport]
type = "nats"
transport = "bench_sms"
"#;

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let offered = options.scaled(20_000);
    let saturation = options.scaled(30_000);
    println!(
        "\n## chain: Rhai → create_contact → send_sms (NATS) → payment_webhook, \
         {} events at {LIGHT_PER_SECOND}/s, {offered} at {OFFERED_PER_SECOND}/s, then {saturation} at once",
        options.scaled(5_000)
    );
    let server = NatsServer::start()?;
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    js.create_stream(switchboard_sdk::nats::events_stream_config(PREFIX))
        .await
        .context("creating the events stream")?;
    let receiver = Receiver::start().await?;

    let root = tempfile::tempdir()?;
    let config = root.path().join("switchboard.toml");
    std::fs::write(&config, CONFIG)?;
    let mut dispatcher = Dispatcher::start(Spec {
        data: &root.path().join("data"),
        chains: None,
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: Some(&config),
    })
    .await?;
    dispatcher
        .put_text(
            &format!("/v1/accounts/{ACCOUNT}/scripts/score"),
            SCORE.into(),
            "text/plain",
        )
        .await?;
    dispatcher
        .put_text(
            &format!("/v1/accounts/{ACCOUNT}/secrets/gateway"),
            WEBHOOK_SECRET.into(),
            "text/plain",
        )
        .await?;
    dispatcher
        .put_text(
            &format!("/v1/accounts/{ACCOUNT}/chains"),
            chain_file(receiver.addr),
            "application/toml",
        )
        .await?;

    let mut next = 0u64;
    let mut batch = |n: u64| {
        let events: Vec<VumiApiEvent> = (next..next + n)
            .map(|i| poll_event(ACCOUNT, i, CONVERSATIONS))
            .collect();
        next += n;
        events
    };

    // A short warm-up: connections, caches, the first sled pages.
    let warm = batch(options.scaled(2_000));
    offer(&js, &warm, Some(OFFERED_PER_SECOND)).await?;
    receiver.wait_for(&warm, &mut dispatcher).await?;

    let events = batch(options.scaled(5_000));
    let published = offer(&js, &events, Some(LIGHT_PER_SECOND)).await?;
    let light = receiver.wait_for(&events, &mut dispatcher).await?;
    let light = Run::new(&events, &published, &light);
    println!("offered {LIGHT_PER_SECOND}/s: {light}");

    let events = batch(offered);
    let published = offer(&js, &events, Some(OFFERED_PER_SECOND)).await?;
    let fixed = receiver.wait_for(&events, &mut dispatcher).await?;
    let fixed = Run::new(&events, &published, &fixed);
    println!("offered {OFFERED_PER_SECOND}/s: {fixed}");

    let events = batch(saturation);
    let published = offer(&js, &events, None).await?;
    let saturated = receiver.wait_for(&events, &mut dispatcher).await?;
    let saturated = Run::new(&events, &published, &saturated);
    println!("saturation: {saturated}");

    // Every event went all the way: handled, an SMS command on the
    // transport's stream, a webhook.
    let total = next;
    let counts = dispatcher.counts(Some(ACCOUNT)).await?;
    let mut outbound = js
        .get_stream(switchboard_sdk::nats::stream_name(
            PREFIX,
            switchboard_dispatcher::outbound::OUTBOUND_STREAM,
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
    println!("mean time per step: {steps}");
    let repeats = receiver.repeats();
    let hwm = dispatcher.hwm_kib()?;
    dispatcher.stop().await;
    println!(
        "all {total} handled, {sms} SMS commands, {repeats} repeated webhooks; peak RSS {} MiB",
        mib(hwm)
    );

    report.check(
        "chain",
        format!("latency p99 at {OFFERED_PER_SECOND}/s offered"),
        ms(fixed.p99),
        "< 50 ms",
        fixed.p99 < Duration::from_millis(50),
    );
    report.figure(
        "chain",
        format!("latency p50 / p99.9 at {OFFERED_PER_SECOND}/s offered"),
        format!("{} / {}", ms(fixed.p50), ms(fixed.p999)),
    );
    report.figure(
        "chain",
        format!("achieved at {OFFERED_PER_SECOND}/s offered"),
        rate(fixed.rate),
    );
    report.figure(
        "chain",
        format!("latency p50 / p99 / p99.9 at {LIGHT_PER_SECOND}/s offered"),
        format!("{} / {} / {}", ms(light.p50), ms(light.p99), ms(light.p999)),
    );
    report.check(
        "chain",
        "events/s at saturation",
        rate(saturated.rate),
        "≥ 10k/s",
        saturated.rate >= 10_000.0,
    );
    report.figure(
        "chain",
        "latency p50 / p99 / p99.9 at saturation (queueing included)",
        format!(
            "{} / {} / {}",
            ms(saturated.p50),
            ms(saturated.p99),
            ms(saturated.p999)
        ),
    );
    report.figure("chain", "mean time per step", steps);
    report.figure("chain", "peak RSS", format!("{} MiB", mib(hwm)));
    Ok(())
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
}

impl Run {
    fn new(
        events: &[VumiApiEvent],
        published: &[Instant],
        arrived: &HashMap<String, Instant>,
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
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, latency p50 {} p99 {} p99.9 {}",
            rate(self.rate),
            ms(self.p50),
            ms(self.p99),
            ms(self.p999)
        )
    }
}

/// Webhook arrivals, by the event id the body carries as `reference`.
#[derive(Debug, Default)]
struct Arrivals {
    first: HashMap<String, Instant>,
    repeats: u64,
}

/// The payment gateway: an HTTP/1.1 server with keep-alive that answers every
/// webhook 200 and notes when it arrived.
#[derive(Debug)]
struct Receiver {
    addr: std::net::SocketAddr,
    arrivals: Arc<Mutex<Arrivals>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> anyhow::Result<Self> {
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let app = axum::Router::new()
            .route("/payments", axum::routing::post(payment))
            .with_state(arrivals.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            arrivals,
            task,
        })
    }

    fn repeats(&self) -> u64 {
        self.arrivals.lock().expect("arrivals").repeats
    }

    /// Waits until every one of `events` has arrived; returns their arrivals.
    async fn wait_for(
        &self,
        events: &[VumiApiEvent],
        dispatcher: &mut Dispatcher,
    ) -> anyhow::Result<HashMap<String, Instant>> {
        const STALL: Duration = Duration::from_secs(60);
        let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
        let mut seen = 0;
        let mut progressed = Instant::now();
        loop {
            {
                let arrivals = self.arrivals.lock().expect("arrivals");
                let arrived = ids
                    .iter()
                    .filter(|id| arrivals.first.contains_key(*id))
                    .count();
                if arrived == ids.len() {
                    return Ok(ids
                        .into_iter()
                        .map(|id| {
                            let at = arrivals.first[&id];
                            (id, at)
                        })
                        .collect());
                }
                if arrived > seen {
                    seen = arrived;
                    progressed = Instant::now();
                }
            }
            dispatcher.check_alive()?;
            if progressed.elapsed() > STALL {
                bail!(
                    "no webhook for {STALL:?} at {seen} of {}:\n{}",
                    ids.len(),
                    dispatcher.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn payment(State(arrivals): State<Arc<Mutex<Arrivals>>>, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let Some(reference) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["reference"].as_str().map(str::to_string))
    else {
        return StatusCode::BAD_REQUEST;
    };
    let mut guard = arrivals.lock().expect("arrivals");
    let arrivals = &mut *guard;
    match arrivals.first.entry(reference) {
        std::collections::hash_map::Entry::Occupied(_) => arrivals.repeats += 1,
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(at);
        }
    }
    StatusCode::OK
}
