//! Crash tests: the full example chain (create_contact → send_sms →
//! payment_webhook → emit) under SIGKILLs of the dispatcher and a restart of
//! nats-server, against real receivers.
//!
//! What users rely on: every event's chain completes; each webhook and SMS
//! reaches the receiver under its stable id (`webhook-id`, `message_id`), so
//! that after deduplication by that id each event counts exactly once; raw
//! repeats (a call made just before a kill and made again on redelivery) stay
//! within the steps in flight at the kills; each contact exists once.
//!
//! The default run is short; `SWITCHBOARD_LONG_TESTS=1` runs 10,000 events.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use switchboard_sdk::nats::NatsEmitter;
use switchboard_sdk::{EventId, VumiApiEvent};

use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{Dispatcher, NatsServer, event, wait_until};

/// Workers per dispatcher: the most steps that can be in flight at a kill.
const CONCURRENCY: usize = 16;

fn long() -> bool {
    crate::util::long_tests()
}

fn config(receiver: &HttpReceiver) -> String {
    let recv = receiver.url();
    format!(
        r#"
[bus]
# Redeliver what a killed dispatcher held after 3 s instead of 30.
ack_wait_secs = 3

[limits]
concurrency = {CONCURRENCY}

[providers.sms.gateway]
type = "http"
url = "{recv}/sms"
from = "Switchboard"
"#
    )
}

fn chains(receiver: &HttpReceiver) -> String {
    let recv = receiver.url();
    format!(
        r#"
account_key = "acme"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}", fields = {{ last_poll = "{{{{ event.conversation_key }}}}" }} }}

[[chains.steps]]
handler = "send_sms"
config = {{ provider = "gateway", to = "{{{{ steps.create_contact.msisdn }}}}", body = "Thanks! You scored {{{{ event.event_data.score }}}}/5." }}
retry = {{ max_attempts = 20, initial = "100ms", max = "1s" }}

[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{recv}/hook/200", secret = "gateway", body = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}", reference = "{{{{ event.id }}}}" }} }}
retry = {{ max_attempts = 20, initial = "100ms", max = "1s" }}

[[chains.steps]]
handler = "emit"
name = "award"
config = {{ event_type = "points_awarded", conversation_type = "loyalty", data = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}" }} }}

[[chains]]
name = "points-awarded"
conversation_type = "loyalty"
event_type = "points_awarded"

[[chains.steps]]
handler = "log"
config = {{ message = "points for {{{{ event.event_data.msisdn }}}}" }}
"#
    )
}

/// `n` poll_complete events over 50 conversations, each with its own msisdn.
fn events(n: usize) -> Vec<VumiApiEvent> {
    (0..n)
        .map(|i| {
            event(
                "acme",
                "survey",
                "poll_complete",
                &format!("poll-{}", i % 50),
                json!({"msisdn": format!("+2782{:07}", i), "score": 4}),
            )
        })
        .collect()
}

/// A small deterministic generator, so that a failing run can be repeated
/// from the seed it prints.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Kills the dispatcher with SIGKILL `kills` times at random moments while
/// work remains (each of the 2 requests per event not yet seen), restarting it
/// each time. Returns how many kills happened while work remained.
async fn kill_repeatedly(
    d: &mut Dispatcher,
    receiver: &HttpReceiver,
    expected_requests: usize,
    kills: usize,
) -> usize {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_nanos() as u64;
    eprintln!("crash test: kill timing seed {seed}");
    let mut rng = Lcg(seed);
    let mut done = 0;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        if receiver.count().await >= expected_requests {
            break;
        }
        d.kill9();
        d.restart();
        done += 1;
    }
    done
}

/// Waits until the receiver saw every expected id, then checks everything the
/// test promises; returns (webhook repeats, SMS repeats).
async fn check_exactly_once(
    d: &Dispatcher,
    receiver: &HttpReceiver,
    sent: &[VumiApiEvent],
    timeout: Duration,
) -> (usize, usize) {
    let expected_hooks: HashSet<String> = sent
        .iter()
        .map(|e| {
            let id = EventId::derived(e.id, "poll-complete", "payment_webhook", 0);
            format!("msg_{}", id.as_uuid().simple())
        })
        .collect();
    let expected_sms: HashSet<String> = sent
        .iter()
        .map(|e| EventId::derived(e.id, "poll-complete", "send_sms", 0).to_string())
        .collect();

    // Every event's chain completes: its trace, and its child's, are done.
    let started = Instant::now();
    let pending = futures::stream::iter(sent.iter())
        .map(|e| async move {
            let id = e.id.to_string();
            let trace = d.wait_for_trace("acme", &id, timeout).await;
            assert_eq!(trace["status"], "done", "{trace:#}\n{}", d.log());
            let steps = trace["chains"][0]["steps"].as_array().expect("steps");
            assert_eq!(steps.len(), 4, "{trace:#}");
            for step in steps {
                assert_eq!(step["outcome"], "ok", "{trace:#}");
            }
            let child = EventId::derived(e.id, "poll-complete", "award", 0).to_string();
            let child_trace = d.wait_for_trace("acme", &child, timeout).await;
            assert_eq!(child_trace["status"], "done", "{child_trace:#}");
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>();
    pending.await;
    eprintln!(
        "crash test: every trace done ({:.1}s to check)",
        started.elapsed().as_secs_f64()
    );

    let requests = receiver.requests().await;
    let count = |path: &str, id_of: &dyn Fn(&Value) -> Option<String>| {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for r in requests.iter().filter(|r| r["path"] == path) {
            let id = id_of(r).unwrap_or_else(|| panic!("a request without its id: {r:#}"));
            *seen.entry(id).or_default() += 1;
        }
        seen
    };
    let hooks = count("/hook/200", &|r| {
        r["headers"]["webhook-id"].as_str().map(str::to_string)
    });
    let sms = count("/sms", &|r| {
        serde_json::from_str::<Value>(r["body"].as_str()?).ok()?["message_id"]
            .as_str()
            .map(str::to_string)
    });
    let hook_ids: HashSet<String> = hooks.keys().cloned().collect();
    let sms_ids: HashSet<String> = sms.keys().cloned().collect();
    assert_eq!(
        hook_ids.difference(&expected_hooks).count(),
        0,
        "the receiver saw webhook-ids that belong to no event"
    );
    assert_eq!(
        expected_hooks.difference(&hook_ids).count(),
        0,
        "events whose webhook never arrived"
    );
    assert_eq!(
        sms_ids, expected_sms,
        "the SMS gateway saw other messages than one per event"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r["path"] == "/hook/200")
            .all(|r| r["verified"] == true)
    );
    let hook_repeats = hooks.values().map(|n| n - 1).sum::<usize>();
    let sms_repeats = sms.values().map(|n| n - 1).sum::<usize>();

    // Each contact exists once.
    let (status, answer) = d.get("/v1/accounts/acme/contacts?limit=10000").await;
    assert_eq!(status, 200, "{answer}");
    let contacts = answer["contacts"].as_array().expect("contacts");
    let msisdns: HashSet<&str> = contacts
        .iter()
        .map(|c| c["msisdn"].as_str().expect("an msisdn"))
        .collect();
    assert_eq!(contacts.len(), sent.len(), "one contact per msisdn");
    assert_eq!(msisdns.len(), sent.len());
    (hook_repeats, sms_repeats)
}

async fn crash_test(nats: Option<&NatsServer>) {
    let (n, kills) = if long() { (10_000, 8) } else { (600, 5) };
    let timeout = if long() {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(120)
    };
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(nats, &config(&receiver));
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    d.apply_chains("acme.toml", &chains(&receiver)).await;
    let sent = events(n);
    let started = Instant::now();

    // Publish: straight to NATS while the dispatcher dies and comes back, or
    // (embedded) through the API before the kills start.
    let publisher = match nats {
        Some(nats) => {
            let emitter = NatsEmitter::connect(nats.url())
                .await
                .expect("a NATS connection");
            let events = sent.clone();
            Some(tokio::spawn(async move {
                futures::stream::iter(events)
                    .map(|e| {
                        let emitter = emitter.clone();
                        async move { emitter.emit(&e).await.expect("emit") }
                    })
                    .buffer_unordered(32)
                    .collect::<Vec<_>>()
                    .await;
            }))
        }
        None => {
            let d = &d;
            futures::stream::iter(sent.iter())
                .map(|e| async move {
                    d.post_event(&serde_json::to_value(e).expect("JSON")).await;
                })
                .buffer_unordered(16)
                .collect::<Vec<()>>()
                .await;
            None
        }
    };

    let done_kills = kill_repeatedly(&mut d, &receiver, 2 * n, kills).await;
    if let Some(p) = publisher {
        p.await.expect("the publisher");
    }
    assert!(
        done_kills >= 5,
        "only {done_kills} kills happened before the work ran out: the run proves too little"
    );
    wait_until("every webhook and SMS", timeout, || async {
        (receiver.count().await >= 2 * n).then_some(())
    })
    .await;
    let (hook_repeats, sms_repeats) = check_exactly_once(&d, &receiver, &sent, timeout).await;
    let bound = done_kills * CONCURRENCY;
    eprintln!(
        "crash test ({}): {n} events, {done_kills} SIGKILLs, {:.1}s; lost 0; raw repeats: \
         {hook_repeats} webhooks, {sms_repeats} SMS (bound: {bound} steps in flight at the kills)",
        if nats.is_some() { "NATS" } else { "embedded" },
        started.elapsed().as_secs_f64()
    );
    assert!(
        hook_repeats + sms_repeats <= bound,
        "{hook_repeats} webhook and {sms_repeats} SMS repeats: more than the {bound} steps that \
         can have been in flight at {done_kills} kills"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_full_chain_on_nats_loses_and_repeats_nothing() {
    let nats = NatsServer::start();
    crash_test(Some(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_full_chain_on_the_embedded_bus_loses_and_repeats_nothing() {
    crash_test(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_mid_run_loses_nothing() {
    let n = if long() { 2_000 } else { 300 };
    let mut nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(Some(&nats), &config(&receiver));
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    d.apply_chains("acme.toml", &chains(&receiver)).await;
    let sent = events(n);
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection")
        .with_attempts(30);
    let (first, second) = sent.split_at(n / 2);
    for e in first {
        emitter.emit(e).await.expect("emit");
    }
    // Some of the first half is handled, some is in flight, some waits.
    wait_until("the first webhooks", Duration::from_secs(60), || async {
        (receiver.count().await >= n / 4).then_some(())
    })
    .await;
    nats.restart();
    for e in second {
        emitter
            .emit(e)
            .await
            .expect("emit after the server restart");
    }
    wait_until(
        "every webhook and SMS after the restart",
        Duration::from_secs(120),
        || async { (receiver.count().await >= 2 * n).then_some(()) },
    )
    .await;
    let (hook_repeats, sms_repeats) =
        check_exactly_once(&d, &receiver, &sent, Duration::from_secs(60)).await;
    eprintln!(
        "NATS restart: {n} events; lost 0; raw repeats: {hook_repeats} webhooks, {sms_repeats} SMS"
    );
    assert!(
        hook_repeats + sms_repeats <= CONCURRENCY,
        "{hook_repeats} webhook and {sms_repeats} SMS repeats after one server restart"
    );
}
