//! The in-app inbox on one nats-server: notifications/s through a one-step
//! `notify` chain, drained from a backlog (with the dispatcher's CPU per
//! event); then 1,000 receivers (contacts) each with a live stream open
//! (`/v1/inbox/stream`, a receiver token each), the dispatcher's resident
//! set with them open, and a broadcast to all of them (`to = { all = true
//! }`), round after round: from the event's publish to each stream's
//! `notification` event (p50, p99, max), with the dispatcher's CPU per
//! notification delivered and streamed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::common::{ADMIN_TOKEN, Dispatcher, EventsBus, Spec, poll_chain, poll_event};
use crate::drain;
use crate::report::{Report, mib_of, micros_of, rate};

const PREFIX: &str = "vumi";
const ACCOUNT: &str = "bench-inbox";
/// Events of the drain (a tenth with `--quick`).
const EVENTS: u64 = 20_000;
/// Receivers with a stream open (a tenth with `--quick`).
const STREAMS: u64 = 1_000;
/// Broadcasts to all of them.
const ROUNDS: usize = 5;

fn chains() -> String {
    format!(
        "{}\n{}",
        poll_chain(
            ACCOUNT,
            r#"
[[chains.steps]]
handler = "notify"
config = { to = "{{ event.event_data.msisdn }}", body = "Thanks: you answered {{ event.event_data.answers.q1 }}" }
"#
        ),
        r#"
[[chains]]
name = "register"
event_type = "register"

[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}" }

[[chains]]
name = "announce"
event_type = "announce"

[[chains.steps]]
handler = "notify"
config = { to = { all = true }, body = "Announcement {{ event.event_data.round }}" }
"#
    )
}

fn event(event_type: &str, conversation: &str, data: Value) -> switchboard_sdk::VumiApiEvent {
    use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};
    switchboard_sdk::VumiApiEvent::new(
        AccountKey::new(ACCOUNT).expect("an account key"),
        ConversationKey::new(conversation).expect("a conversation key"),
        ConversationType::new("web").expect("a conversation type"),
        EventType::new(event_type).expect("an event type"),
        data.as_object().expect("an object").clone(),
    )
}

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(EVENTS);
    let streams = options.scaled(STREAMS);
    let build = &options.builds[0];
    println!("\n## inbox: a one-step notify chain, {n} events drained from a backlog");
    let EventsBus { server, js, .. } = EventsBus::start(PREFIX).await?;
    let root = tempfile::tempdir()?;
    let dir = root.path().join("chains");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{ACCOUNT}.toml")), chains())?;
    let spec = Spec {
        binary: Some(&build.binary),
        data: &root.path().join("data"),
        chains: Some(&dir),
        nats: Some(server.url()),
        concurrency: options.concurrency,
        config: None,
    };
    Dispatcher::start(spec).await?.shut_down().await?;
    let mut dispatcher = drain::start_on_backlog(
        &js,
        spec,
        n,
        |i| poll_event(ACCOUNT, i, 1_000),
        &build.tag(),
    )
    .await?;
    let drained = drain::nats(&mut dispatcher, &js, n).await?;
    println!("notify: {}", drained.describe());
    report.figure(
        "inbox",
        format!("notifications/s through a one-step notify chain, {n} events"),
        format!(
            "{}, {}/event",
            rate(drained.rate()),
            micros_of(drained.cpu_per_event_us())
        ),
    );

    // Receivers: contacts, each with a token and a stream open.
    println!("\n## inbox: {streams} receivers with a stream open, a broadcast to them");
    common_fill(&js, streams).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let keys = contacts(&dispatcher, &http, streams).await?;
    let arrivals = Arc::new(Mutex::new(vec![Vec::<Instant>::new(); ROUNDS]));
    let opened = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tokens = Vec::with_capacity(keys.len());
    for key in &keys {
        tokens.push(mint(&dispatcher, &http, key).await?);
    }
    let rss_before = dispatcher.rss_kib()?;
    for token in &tokens {
        let response = http
            .get(format!("{}/v1/inbox/stream", dispatcher.url))
            .bearer_auth(token)
            .send()
            .await
            .context("opening a stream")?;
        if !response.status().is_success() {
            bail!("a stream answered {}", response.status());
        }
        tokio::spawn(read_stream(response, arrivals.clone(), opened.clone()));
    }
    let _all_open = tokio::time::timeout(
        Duration::from_secs(60),
        opened.acquire_many(u32::try_from(streams)?),
    )
    .await
    .context("every stream opening in a minute")??;
    let rss_open = dispatcher.rss_kib()?;
    println!(
        "{streams} streams open: dispatcher resident set {} (before them {})",
        mib_of(rss_open as f64),
        mib_of(rss_before as f64)
    );

    let cpu_before = dispatcher.cpu_time()?;
    let mut latencies = Vec::new();
    for round in 0..ROUNDS {
        let published = Instant::now();
        let e = event("announce", "news", json!({ "round": round }));
        js.publish(e.subject(PREFIX), e.to_json().into())
            .await?
            .await
            .context("publishing the broadcast")?;
        let all = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let got = arrivals.lock().expect("arrivals")[round].clone();
                if got.len() as u64 >= streams {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .with_context(|| format!("round {round}: every stream told within two minutes"))?;
        latencies.extend(all.iter().map(|at| at.duration_since(published)));
        let last = all
            .iter()
            .max()
            .expect("arrivals")
            .duration_since(published);
        println!(
            "round {round}: all {streams} streams told within {} ms",
            last.as_millis()
        );
    }
    let cpu = dispatcher.cpu_time()? - cpu_before;
    let per = cpu.as_secs_f64() * 1e6 / (ROUNDS as u64 * streams) as f64;
    latencies.sort();
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let (p50, p99, max) = (quantile(0.5), quantile(0.99), quantile(1.0));
    println!(
        "publish → a stream's notification, {} deliveries: p50 {} ms, p99 {} ms, max {} ms; \
         dispatcher CPU {} per notification left and streamed",
        latencies.len(),
        p50.as_millis(),
        p99.as_millis(),
        max.as_millis(),
        micros_of(per)
    );
    report.figure(
        "inbox",
        format!("dispatcher resident set with {streams} streams open"),
        format!(
            "{} ({} before)",
            mib_of(rss_open as f64),
            mib_of(rss_before as f64)
        ),
    );
    report.figure(
        "inbox",
        format!("publish → each of {streams} streams, a broadcast to them, p50 / p99 / max"),
        format!(
            "{} / {} / {} ms, {}/notification",
            p50.as_millis(),
            p99.as_millis(),
            max.as_millis(),
            micros_of(per)
        ),
    );
    dispatcher.stop().await;
    Ok(())
}

/// Publishes a `register` event for each of `n` receivers.
async fn common_fill(js: &async_nats::jetstream::Context, n: u64) -> anyhow::Result<()> {
    crate::common::fill_nats(js, PREFIX, n, |i| {
        event(
            "register",
            &format!("r{i}"),
            json!({ "msisdn": format!("+2783{i:07}") }),
        )
    })
    .await?;
    Ok(())
}

/// The keys of the account's `n` contacts made by `register`, once there.
async fn contacts(
    dispatcher: &Dispatcher,
    http: &reqwest::Client,
    n: u64,
) -> anyhow::Result<Vec<String>> {
    let started = Instant::now();
    loop {
        let list: Value = http
            .get(format!(
                "{}/v1/accounts/{ACCOUNT}/contacts?limit=10000",
                dispatcher.url
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let keys: Vec<String> = list["contacts"]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter(|c| c["msisdn"].as_str().is_some_and(|m| m.starts_with("+2783")))
                    .filter_map(|c| c["key"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if keys.len() as u64 >= n {
            return Ok(keys);
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{} of {n} contacts after two minutes", keys.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A receiver token for `receiver`.
async fn mint(
    dispatcher: &Dispatcher,
    http: &reqwest::Client,
    receiver: &str,
) -> anyhow::Result<String> {
    let minted: Value = http
        .post(format!(
            "{}/v1/accounts/{ACCOUNT}/inbox/{receiver}/token",
            dispatcher.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    minted["token"]
        .as_str()
        .map(str::to_string)
        .context("a token in the answer")
}

/// Reads one stream: its first `count` event says it is open; each
/// `notification` of round `k` is noted when it arrives.
async fn read_stream(
    mut response: reqwest::Response,
    arrivals: Arc<Mutex<Vec<Vec<Instant>>>>,
    opened: Arc<tokio::sync::Semaphore>,
) {
    let mut buffer = String::new();
    let mut open = false;
    while let Ok(Some(chunk)) = response.chunk().await {
        let at = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let kind = block
                .lines()
                .find_map(|l| l.strip_prefix("event:"))
                .map(str::trim);
            match kind {
                Some("count") if !open => {
                    open = true;
                    opened.add_permits(1);
                }
                Some("notification") => {
                    let round = block
                        .lines()
                        .find_map(|l| l.strip_prefix("data:"))
                        .and_then(|d| serde_json::from_str::<Value>(d.trim()).ok())
                        .and_then(|n| {
                            n["content"]["body"]
                                .as_str()?
                                .strip_prefix("Announcement ")?
                                .parse::<usize>()
                                .ok()
                        });
                    if let Some(round) = round {
                        arrivals.lock().expect("arrivals")[round].push(at);
                    }
                }
                _ => {}
            }
        }
    }
}
