//! Delivery guarantees, end to end with real processes: a receiver that fails
//! at random (every event ends handled or in dead letters, and a replay
//! finishes the dead ones), replays that resume at the failed step, poison in
//! the middle of good events, per-conversation order held across retries, and
//! a graceful shutdown with events in flight.
//!
//! Retry delays are tens of milliseconds so that every test stays fast; every
//! wait polls for a condition (`wait_until`), none sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::{Value, json};
use switchboard_sdk::nats::NatsEmitter;
use switchboard_sdk::{EventId, VumiApiEvent};

use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{Dispatcher, NatsServer, TIMEOUT, event, wait_until};

const ACCOUNT: &str = "acme";

/// Which bus a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BusKind {
    Nats,
    Embedded,
}

/// A dispatcher on one bus, and the way a worker publishes to it: the sdk's
/// NATS emitter, or `POST /v1/events` on the embedded bus. Fields drop in
/// order: the dispatcher stops before its NATS server.
struct Setup {
    d: Dispatcher,
    emitter: Option<NatsEmitter>,
    nats: Option<NatsServer>,
}

impl Setup {
    /// A dispatcher on `bus` with `config` as its config file, and the
    /// account's webhook secret set.
    async fn start(bus: BusKind, config: &str) -> Self {
        let nats = (bus == BusKind::Nats).then(NatsServer::start);
        let d = Dispatcher::with_config(nats.as_ref(), config);
        let emitter = match &nats {
            Some(n) => Some(
                NatsEmitter::connect(n.url())
                    .await
                    .expect("a NATS connection"),
            ),
            None => None,
        };
        set_secret(&d).await;
        Self { d, emitter, nats }
    }

    /// Publishes `e` as a worker would; returns its id once the bus has it.
    async fn publish(&self, e: &VumiApiEvent) -> String {
        match &self.emitter {
            Some(emitter) => {
                let published = emitter.emit(e).await.expect("JetStream stores the event");
                assert!(!published.duplicate, "event {} published twice", e.id);
                e.id.to_string()
            }
            None => {
                self.d
                    .post_event(&serde_json::to_value(e).expect("an event serialises"))
                    .await
            }
        }
    }
}

async fn set_secret(d: &Dispatcher) {
    d.set_secret(ACCOUNT, "gateway", WEBHOOK_SECRET).await;
}

/// The `webhook-id` that `payment_webhook` step `step` of `chain` sends for event `id`.
fn webhook_id(id: &str, chain: &str, step: &str) -> String {
    let id = EventId::parse(id).expect("an event id");
    format!(
        "msg_{}",
        EventId::derived(id, chain, step, 0).as_uuid().simple()
    )
}

/// One webhook request the receiver recorded.
#[derive(Debug, Clone)]
struct Hook {
    /// Its position among every request the receiver recorded.
    position: usize,
    path: String,
    webhook_id: String,
    /// The plan's answer (`200`, `500`, `hang`, ...).
    answer: String,
    /// The status sent; `None` while the request hangs.
    status: Option<u64>,
    body: Value,
    verified: bool,
}

impl Hook {
    fn succeeded(&self) -> bool {
        self.status == Some(200)
    }
}

/// The receiver's webhook requests (paths under `/hook` or `/chaos`), oldest first.
async fn hooks(receiver: &HttpReceiver) -> Vec<Hook> {
    receiver
        .requests()
        .await
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/hook") || p.starts_with("/chaos"))
        })
        .map(|(position, r)| Hook {
            position,
            path: r["path"].as_str().expect("a path").to_string(),
            webhook_id: r["headers"]["webhook-id"]
                .as_str()
                .unwrap_or_else(|| panic!("a webhook without a webhook-id: {r:#}"))
                .to_string(),
            answer: r["answer"].as_str().unwrap_or_default().to_string(),
            status: r["status"].as_u64(),
            body: r["body"]
                .as_str()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Value::Null),
            verified: r["verified"] == true,
        })
        .collect()
}

/// The requests grouped by `webhook-id`.
fn by_webhook_id(hooks: &[Hook]) -> BTreeMap<String, Vec<Hook>> {
    let mut out: BTreeMap<String, Vec<Hook>> = BTreeMap::new();
    for h in hooks {
        out.entry(h.webhook_id.clone()).or_default().push(h.clone());
    }
    out
}

/// Waits until the event's trace has status `status`; returns it.
async fn wait_for_status(d: &Dispatcher, id: &str, status: &str) -> Value {
    wait_until(&format!("event {id} to be {status}"), TIMEOUT, || async {
        d.trace(ACCOUNT, id).await.filter(|t| t["status"] == status)
    })
    .await
}

/// The step called `name` of the trace's only chain.
fn step<'a>(trace: &'a Value, name: &str) -> &'a Value {
    trace["chains"][0]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {trace:#}"))
}

/// The seed of the chaos receiver: with it and the fixed event ids below, the
/// receiver gives the same answers in every run.
const CHAOS_SEED: &str = "delivery-1";

/// Whatever a flaky receiver does, every event ends either handled or in dead
/// letters, never both and never neither; once the receiver recovers, one
/// replay of them all delivers each dead event exactly once (NATS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_receiver_leaves_every_event_done_or_dead_and_a_replay_delivers_the_dead_once_on_nats()
 {
    flaky_receiver_then_replay(BusKind::Nats).await;
}

/// Whatever a flaky receiver does, every event ends either handled or in dead
/// letters, never both and never neither; once the receiver recovers, one
/// replay of them all delivers each dead event exactly once (embedded bus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_receiver_leaves_every_event_done_or_dead_and_a_replay_delivers_the_dead_once_on_the_embedded_bus()
 {
    flaky_receiver_then_replay(BusKind::Embedded).await;
}

/// 100 orders over 10 conversations, to a receiver that fails 30% of requests
/// with 500 and hangs past the step's timeout on 5%; three attempts each.
/// Then the receiver recovers and every dead letter is replayed.
async fn flaky_receiver_then_replay(bus: BusKind) {
    // A hang lasts well past the step's timeout; the timeout, well past the
    // time a loaded machine takes to answer.
    let receiver = HttpReceiver::start_seeded(Duration::from_millis(1500), CHAOS_SEED);
    let s = Setup::start(bus, "").await;
    let d = &s.d;
    let recv = receiver.url();
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "{ACCOUNT}"
[[chains]]
name = "orders"
event_type = "order"
[[chains.steps]]
handler = "payment_webhook"
name = "pay"
config = {{ url = "{recv}/chaos/30", secret = "gateway", timeout = "500ms", body = {{ n = "{{{{ event.event_data.n }}}}" }} }}
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms", multiplier = 2.0 }}
"#
        ),
    )
    .await;

    // 100 orders over 10 conversations. Their ids are fixed, so the webhook
    // ids and hence the receiver's answers are the same in every run.
    let mut ids = Vec::new();
    for n in 0..100 {
        let mut e = event(
            ACCOUNT,
            "shop",
            "order",
            &format!("customer-{}", n % 10),
            json!({"n": n}),
        );
        e.id = EventId::from(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{CHAOS_SEED}/{n}").as_bytes(),
        ));
        e.root_id = e.id;
        ids.push(s.publish(&e).await);
    }

    let mut done = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for id in &ids {
        let trace = d.wait_for_trace(ACCOUNT, id, TIMEOUT).await;
        match trace["status"].as_str() {
            Some("done") => done.insert(id.clone()),
            Some("dead") => dead.insert(id.clone()),
            _ => panic!("event {id} is neither done nor dead: {trace:#}"),
        };
    }
    let letters = d.dead_letters(ACCOUNT).await;
    let lettered: BTreeSet<String> = letters
        .iter()
        .map(|l| {
            l["event"]["id"]
                .as_str()
                .expect("a letter with its event")
                .to_string()
        })
        .collect();
    assert_eq!(
        letters.len(),
        lettered.len(),
        "one letter per event: {letters:#?}"
    );
    for l in &letters {
        assert_eq!(
            (
                l["reason"].as_str(),
                l["chain"].as_str(),
                l["step"].as_str()
            ),
            (Some("step_failed"), Some("orders"), Some("pay")),
            "{l:#}"
        );
        assert_eq!(l["attempts"], 3, "{l:#}");
        assert_eq!(l["status"], "dead", "{l:#}");
        assert!(
            l["error"]
                .as_str()
                .unwrap()
                .contains("gave up after 3 attempts"),
            "{l:#}"
        );
    }

    // What the receiver saw agrees: a 200 for exactly the done events, and
    // none for the dead ones, whose every attempt failed.
    let before = hooks(&receiver).await;
    assert!(before.iter().all(|h| h.verified), "unverified webhooks");
    for answer in ["500", "hang"] {
        assert!(
            before.iter().any(|h| h.answer == answer),
            "seed {CHAOS_SEED} gave no {answer}: choose one that does"
        );
    }
    let seen = by_webhook_id(&before);
    let mut succeeded = BTreeSet::new();
    for id in &ids {
        let tries = seen
            .get(&webhook_id(id, "orders", "pay"))
            .unwrap_or_else(|| panic!("the receiver never saw the webhook of {id}"));
        let oks = tries.iter().filter(|h| h.succeeded()).count();
        assert!(oks <= 1, "event {id} was delivered {oks} times: {tries:#?}");
        if oks == 1 {
            assert!(
                tries.last().unwrap().succeeded(),
                "a request after the 200: {tries:#?}"
            );
            succeeded.insert(id.clone());
        } else {
            assert_eq!(tries.len(), 3, "event {id}: {tries:#?}");
        }
    }
    let all: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(done, succeeded, "done events vs events the receiver took");
    assert_eq!(dead, lettered, "dead events vs dead letters");
    assert!(
        succeeded.is_disjoint(&lettered),
        "both delivered and dead: {:?}",
        succeeded.intersection(&lettered).collect::<Vec<_>>()
    );
    assert_eq!(
        &succeeded | &lettered,
        all,
        "neither delivered nor dead: {:?}",
        all.difference(&(&succeeded | &lettered))
            .collect::<Vec<_>>()
    );
    assert!(
        !dead.is_empty(),
        "seed {CHAOS_SEED} killed no event: choose one that does, or the replay goes untested"
    );
    eprintln!("{} done, {} dead before the replay", done.len(), dead.len());
    assert_eq!(d.metric("handled", ACCOUNT).await, done.len() as u64);
    assert_eq!(d.metric("dead_lettered", ACCOUNT).await, dead.len() as u64);
    if let Some(nats) = &s.nats {
        // Each letter is on the dead-letter stream too.
        let js = jetstream::new(
            async_nats::connect(nats.url())
                .await
                .expect("a NATS connection"),
        );
        let stream = js
            .get_stream("VUMI_DEAD_LETTERS")
            .await
            .expect("the dead-letter stream");
        assert_eq!(
            stream.get_info().await.unwrap().state.messages,
            dead.len() as u64
        );
    }

    // The receiver recovers; the operator replays every dead letter.
    receiver.set_healthy(true).await;
    let replayed = d.cli(&["dead-letters", "replay", ACCOUNT, "--all"]).await;
    assert_eq!(
        replayed.ok().trim(),
        format!("replayed {} dead letters of account {ACCOUNT}", dead.len())
    );
    for id in &dead {
        let trace = wait_for_status(d, id, "done").await;
        assert_eq!(step(&trace, "pay")["outcome"], "ok", "{trace:#}");
    }
    wait_until("the dead letters to be gone", TIMEOUT, || async {
        d.dead_letters(ACCOUNT).await.is_empty().then_some(())
    })
    .await;
    assert_eq!(
        d.cli(&["dead-letters", "list", ACCOUNT]).await.ok().trim(),
        format!("account {ACCOUNT} has no dead letters")
    );

    // After the recovery: one request, answered 200, per dead event; nothing
    // for the events that were done.
    let after = hooks(&receiver).await;
    let after = by_webhook_id(&after[before.len()..]);
    let expected: BTreeSet<String> = dead
        .iter()
        .map(|id| webhook_id(id, "orders", "pay"))
        .collect();
    assert_eq!(
        after.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "webhooks sent after the recovery"
    );
    for (webhook, tries) in &after {
        assert_eq!(tries.len(), 1, "{webhook}: {tries:#?}");
        assert!(tries[0].succeeded() && tries[0].verified, "{tries:#?}");
    }
    assert_eq!(d.metric("handled", ACCOUNT).await, ids.len() as u64);
}

/// A replay resumes at the step that failed: the steps before it are not run
/// again, the rest run once. A dead letter can be shown while dead and
/// discarded for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_resumes_at_the_failed_step_and_a_discarded_letter_is_gone() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let s = Setup::start(BusKind::Embedded, "").await;
    let d = &s.d;
    let recv = receiver.url();
    // `pay` fails twice per webhook-id, then succeeds: its two attempts are
    // used up before the replay, which makes the third.
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "{ACCOUNT}"
[[chains]]
name = "orders"
event_type = "order"
[[chains.steps]]
handler = "payment_webhook"
name = "notify"
config = {{ url = "{recv}/hook/200/notify", secret = "gateway" }}
[[chains.steps]]
handler = "payment_webhook"
name = "pay"
config = {{ url = "{recv}/hook/500,500,200", secret = "gateway" }}
retry = {{ max_attempts = 2, initial = "50ms", max = "100ms" }}
[[chains.steps]]
handler = "emit"
name = "paid"
config = {{ event_type = "paid", data = {{ order = "{{{{ event.event_data.order }}}}" }} }}

[[chains]]
name = "receipts"
event_type = "paid"
[[chains.steps]]
handler = "payment_webhook"
name = "receipt"
config = {{ url = "{recv}/hook/200/receipt", secret = "gateway" }}
"#
        ),
    )
    .await;

    let replayed = s
        .publish(&event(
            ACCOUNT,
            "shop",
            "order",
            "a",
            json!({"order": "A-1"}),
        ))
        .await;
    let discarded = s
        .publish(&event(
            ACCOUNT,
            "shop",
            "order",
            "b",
            json!({"order": "B-1"}),
        ))
        .await;
    for id in [&replayed, &discarded] {
        let trace = wait_for_status(d, id, "dead").await;
        assert_eq!(step(&trace, "notify")["outcome"], "ok", "{trace:#}");
        let pay = step(&trace, "pay");
        assert_eq!(
            (pay["outcome"].as_str(), pay["attempts"].as_u64()),
            (Some("failed"), Some(2)),
            "{trace:#}"
        );
        assert_eq!(step(&trace, "paid")["outcome"], "skipped", "{trace:#}");
    }
    let dead_trace = d.trace(ACCOUNT, &replayed).await.unwrap();
    let letter_of = |id: &str, letters: &[Value]| {
        letters
            .iter()
            .find(|l| l["event"]["id"] == id)
            .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:#?}"))
            .clone()
    };
    let letters = d.dead_letters(ACCOUNT).await;
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let letter = letter_of(&replayed, &letters);
    let letter_id = letter["id"].as_str().unwrap().to_string();
    let other = letter_of(&discarded, &letters);
    let other_id = other["id"].as_str().unwrap().to_string();

    // Shown while dead: where it failed, how often, why.
    let shown = d
        .cli(&["dead-letters", "show", ACCOUNT, &letter_id, "--json"])
        .await
        .json();
    assert_eq!(shown, letter);
    let text = d.cli(&["dead-letters", "show", ACCOUNT, &letter_id]).await;
    let text = text.ok();
    assert!(
        text.contains("after 2 attempt(s)")
            && text.contains("reason: step_failed")
            && text.contains("chain orders, step pay")
            && text.contains("HTTP 500"),
        "{text}"
    );
    assert_eq!(shown["status"], "dead");
    assert_eq!(shown["reason"], "step_failed");
    assert_eq!(
        (shown["chain"].as_str(), shown["step"].as_str()),
        (Some("orders"), Some("pay"))
    );
    assert_eq!(shown["attempts"], 2);
    let error = shown["error"].as_str().unwrap();
    assert!(
        error.contains("HTTP 500") && error.contains("gave up after 2 attempts"),
        "{error}"
    );

    // Replayed: it resumes at `pay`.
    let out = d
        .cli(&["dead-letters", "replay", ACCOUNT, &letter_id])
        .await;
    assert_eq!(
        out.ok().trim(),
        format!(
            "replayed dead letter {letter_id}: event {replayed} is back on the bus; \
             chain orders resumes at step pay"
        )
    );
    let trace = wait_for_status(d, &replayed, "done").await;
    let notify = step(&trace, "notify");
    assert_eq!(
        notify,
        step(&dead_trace, "notify"),
        "the finished step is kept as it was"
    );
    assert_eq!(notify["attempts"], 1);
    assert_eq!(step(&trace, "pay")["outcome"], "ok", "{trace:#}");
    let child =
        EventId::derived(EventId::parse(&replayed).unwrap(), "orders", "paid", 0).to_string();
    assert_eq!(
        step(&trace, "paid")["output"],
        json!({"event_id": child, "event_type": "paid"})
    );
    assert_eq!(trace["children"], json!([child]));
    let child_trace = wait_for_status(d, &child, "done").await;
    assert_eq!(child_trace["event"]["event_data"], json!({"order": "A-1"}));

    let seen = by_webhook_id(&hooks(&receiver).await);
    let tries = |id: &str, chain: &str, step: &str| -> Vec<Hook> {
        seen.get(&webhook_id(id, chain, step))
            .cloned()
            .unwrap_or_default()
    };
    // The step before the failed one ran once, before the failure.
    let notified = tries(&replayed, "orders", "notify");
    assert_eq!(notified.len(), 1, "`notify` ran again: {notified:#?}");
    assert_eq!(notified[0].path, "/hook/200/notify");
    let paid: Vec<String> = tries(&replayed, "orders", "pay")
        .iter()
        .map(|h| h.answer.clone())
        .collect();
    assert_eq!(paid, ["500", "500", "200"]);
    // The emitted event exists once and ran its chain once.
    assert_eq!(tries(&child, "receipts", "receipt").len(), 1);
    assert!(seen.values().flatten().all(|h| h.verified));

    // The replayed letter is gone.
    let (status, _) = d
        .get(&format!("/v1/accounts/{ACCOUNT}/dead-letters/{letter_id}"))
        .await;
    assert_eq!(status, 404);

    // The other letter, discarded, is gone for good.
    let out = d
        .cli(&["dead-letters", "discard", ACCOUNT, &other_id])
        .await;
    assert_eq!(
        out.ok().trim(),
        format!("discarded dead letter {other_id} of account {ACCOUNT}")
    );
    assert_eq!(d.dead_letters(ACCOUNT).await, Vec::<Value>::new());
    let again = d
        .cli(&["dead-letters", "discard", ACCOUNT, &other_id])
        .await;
    let line = again.fails();
    assert!(
        line.contains(&format!("account {ACCOUNT} has no dead letter {other_id}"))
            && line.contains("404"),
        "{line}"
    );
    let replay_all = d.cli(&["dead-letters", "replay", ACCOUNT, "--all"]).await;
    assert_eq!(
        replay_all.ok().trim(),
        format!("replayed 0 dead letters of account {ACCOUNT}")
    );
    assert_eq!(tries(&discarded, "orders", "pay").len(), 2);
    assert_eq!(
        d.trace(ACCOUNT, &discarded).await.unwrap()["status"],
        "dead",
        "a discarded event stays dead"
    );
}

/// Publishes raw bytes to the events stream, as a worker with a bug would.
async fn publish_raw(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    js.publish(subject.to_string(), payload.into())
        .await
        .expect("publish")
        .await
        .expect("JetStream stores the message");
}

/// What is wrong with a bad payload, and what its dead letter must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poison {
    BadJson,
    NoAccountKey,
    WrongSubject,
}

/// Poison in the middle of good events: every good event is handled, and
/// every bad payload lands in dead letters, once, with what was wrong with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_between_good_events_is_filed_one_letter_each_and_the_good_are_handled() {
    let s = Setup::start(BusKind::Nats, "").await;
    let d = &s.d;
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "{ACCOUNT}"
[[chains]]
name = "answers"
event_type = "answer"
[[chains.steps]]
handler = "log"
config = {{ message = "answer {{{{ event.event_data.n }}}}" }}
"#
        ),
    )
    .await;
    let js = jetstream::new(
        async_nats::connect(s.nats.as_ref().unwrap().url())
            .await
            .expect("a NATS connection"),
    );
    let subject = format!("vumi.events.{ACCOUNT}.survey.answer");
    let elsewhere = format!("vumi.events.{ACCOUNT}.survey.question");

    let kinds = [Poison::BadJson, Poison::NoAccountKey, Poison::WrongSubject];
    let mut good = Vec::new();
    let mut bad: BTreeMap<String, (Poison, String)> = BTreeMap::new();
    for n in 0..36 {
        let e = event(
            ACCOUNT,
            "survey",
            "answer",
            &format!("respondent-{}", n % 4),
            json!({"n": n}),
        );
        if n % 3 != 2 {
            publish_raw(&js, &subject, e.to_json()).await;
            good.push(e.id.to_string());
            continue;
        }
        let kind = kinds[(n / 3) % 3];
        let (on, payload) = match kind {
            Poison::BadJson => (&subject, format!(r#"{{"v": 1, "id": "truncated-{n}"#)),
            Poison::NoAccountKey => {
                let mut v = serde_json::to_value(&e).unwrap();
                v.as_object_mut().unwrap().remove("account_key");
                (&subject, v.to_string())
            }
            Poison::WrongSubject => (&elsewhere, String::from_utf8(e.to_json()).unwrap()),
        };
        publish_raw(&js, on, payload.clone().into_bytes()).await;
        bad.insert(payload, (kind, e.id.to_string()));
    }
    assert_eq!(bad.len(), 12);

    for id in &good {
        let trace = d.wait_for_trace(ACCOUNT, id, TIMEOUT).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
    }
    let letters = wait_until("a letter per bad payload", TIMEOUT, || async {
        let letters = d.dead_letters(ACCOUNT).await;
        (letters.len() >= bad.len()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), bad.len(), "{letters:#?}");
    let mut filed = BTreeSet::new();
    for l in &letters {
        assert_eq!(l["reason"], "poison", "{l:#}");
        assert_eq!(l["event"], Value::Null, "{l:#}");
        let payload = l["payload"].as_str().expect("the payload");
        let (kind, id) = bad
            .get(payload)
            .unwrap_or_else(|| panic!("a letter for a payload never published: {l:#}"));
        assert!(
            filed.insert(payload.to_string()),
            "two letters for one payload: {l:#}"
        );
        let error = l["error"].as_str().unwrap();
        match kind {
            Poison::BadJson => {
                assert_eq!(l["subject"], subject.as_str());
                assert!(error.contains("not valid JSON"), "{error}");
            }
            Poison::NoAccountKey => {
                assert_eq!(l["subject"], subject.as_str());
                assert!(error.contains("missing field `account_key`"), "{error}");
            }
            Poison::WrongSubject => {
                assert_eq!(l["subject"], elsewhere.as_str());
                assert!(
                    error.contains(id.as_str())
                        && error.contains(&format!("was published on {elsewhere}"))
                        && error.contains(&subject),
                    "{error}"
                );
                assert_eq!(d.trace(ACCOUNT, id).await, None, "poison is never handled");
            }
        }
    }
    let total = (good.len() + bad.len()) as u64;
    wait_until("the counters", TIMEOUT, || async {
        (d.metric("received", ACCOUNT).await == total
            && d.metric("dead_lettered", ACCOUNT).await == bad.len() as u64)
            .then_some(())
    })
    .await;
    assert_eq!(d.metric("handled", ACCOUNT).await, good.len() as u64);
    let stream = js
        .get_stream("VUMI_DEAD_LETTERS")
        .await
        .expect("the dead-letter stream");
    assert_eq!(
        stream.get_info().await.unwrap().state.messages,
        bad.len() as u64
    );
}

/// Events of one conversation reach the receiver in publish order even when
/// each one's first attempt fails: a later event waits for the earlier one's
/// retry.
async fn order_is_held_across_retries(bus: BusKind) {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let s = Setup::start(bus, "").await;
    let d = &s.d;
    let recv = receiver.url();
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "{ACCOUNT}"
[[chains]]
name = "steps"
event_type = "step"
[[chains.steps]]
handler = "payment_webhook"
name = "pay"
config = {{ url = "{recv}/hook/500,200", secret = "gateway", body = {{ n = "{{{{ event.event_data.n }}}}" }} }}
retry = {{ max_attempts = 3, initial = "50ms", max = "100ms" }}
"#
        ),
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let e = event(
            ACCOUNT,
            "survey",
            "step",
            "one-conversation",
            json!({"n": n}),
        );
        ids.push(s.publish(&e).await);
    }
    for id in &ids {
        let trace = d.wait_for_trace(ACCOUNT, id, TIMEOUT).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
        assert_eq!(step(&trace, "pay")["attempts"], 2, "{trace:#}");
    }

    let hooks = hooks(&receiver).await;
    let n_of = |h: &Hook| {
        h.body["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("no n in {h:#?}"))
    };
    let answers: Vec<(u64, String)> = hooks.iter().map(|h| (n_of(h), h.answer.clone())).collect();
    let delivered: Vec<u64> = hooks.iter().filter(|h| h.succeeded()).map(n_of).collect();
    assert_eq!(
        delivered,
        (0..20).collect::<Vec<u64>>(),
        "successful deliveries out of order; every request (n, answer): {answers:?}"
    );
    for n in 0..20u64 {
        let tries: Vec<&Hook> = hooks.iter().filter(|h| n_of(h) == n).collect();
        let plan: Vec<&str> = tries.iter().map(|h| h.answer.as_str()).collect();
        assert_eq!(
            plan,
            ["500", "200"],
            "event {n}; every request: {answers:?}"
        );
        if n > 0 {
            let previous_ok = hooks
                .iter()
                .find(|h| n_of(h) == n - 1 && h.succeeded())
                .unwrap();
            assert!(
                tries[0].position > previous_ok.position,
                "event {n} was first tried before event {} was delivered: {answers:?}",
                n - 1
            );
        }
    }
}

/// On NATS, events of one conversation are delivered in order across retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conversation_is_delivered_in_order_across_retries_on_nats() {
    order_is_held_across_retries(BusKind::Nats).await;
}

/// On the embedded bus, events of one conversation are delivered in order across retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conversation_is_delivered_in_order_across_retries_on_the_embedded_bus() {
    order_is_held_across_retries(BusKind::Embedded).await;
}

/// A conversation waiting for an event the bus holds back for a retry
/// still waits for it after a graceful restart (on NATS the event waits on
/// the server): a later event of the conversation, published after the
/// restart, is not delivered first, and the retry waits out its
/// `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_waits_for_its_retrying_event_across_a_graceful_restart() {
    retrying_across_a_graceful_restart(BusKind::Nats).await;
}

/// The same on the embedded bus, which gives back what it held at a stop
/// at once at the next start: the retry still waits out its
/// `Retry-After`, by the hold the stop kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_out_its_retry_after_across_a_graceful_restart_on_the_embedded_bus() {
    retrying_across_a_graceful_restart(BusKind::Embedded).await;
}

async fn retrying_across_a_graceful_restart(bus: BusKind) {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let mut s = Setup::start(bus, "").await;
    apply_planned_payments(&s.d, &receiver).await;
    let step_event = |n: u64, plan: &str| planned_step("one-conversation", n, plan);
    // Unavailable: come back in 10 s.
    let retry = Duration::from_secs(10);
    let first = s.publish(&step_event(0, "503:10,200")).await;
    wait_until("the first event's refusal", TIMEOUT, || async {
        (!hooks(&receiver).await.is_empty()).then_some(())
    })
    .await;
    let refused = Instant::now();
    // Its retry is recorded once the refusal is in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.d.stop(), Some(0), "a clean stop:\n{}", s.d.log());
    s.d.restart();
    let second = s.publish(&step_event(1, "200")).await;
    assert!(
        refused.elapsed() < retry,
        "the restart took past the first event's retry: too slow to show anything"
    );
    for id in [&first, &second] {
        let trace = wait_for_status(&s.d, id, "done").await;
        assert_eq!(step(&trace, "pay")["output"]["status"], 200, "{trace:#}");
        assert!(
            refused.elapsed() >= retry - Duration::from_secs(1),
            "done {:?} after the refusal, before its Retry-After of {retry:?}",
            refused.elapsed()
        );
    }
    let delivered: Vec<u64> = hooks(&receiver)
        .await
        .iter()
        .filter(|h| h.succeeded())
        .map(|h| h.body["n"].as_u64().expect("an event number"))
        .collect();
    assert_eq!(delivered, [0, 1], "successful deliveries in arrival order");
}

/// Applies the account's chain `steps`: on events of type `step`, a
/// webhook step `pay` posting `{ n }` to `receiver` at `/hook/{plan}`, the
/// plan (how the receiver answers) taken from the event's data.
async fn apply_planned_payments(d: &Dispatcher, receiver: &HttpReceiver) {
    let recv = receiver.url();
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "{ACCOUNT}"
[[chains]]
name = "steps"
event_type = "step"
[[chains.steps]]
handler = "payment_webhook"
name = "pay"
config = {{ url = "{recv}/hook/{{{{ event.event_data.plan }}}}", secret = "gateway", body = {{ n = "{{{{ event.event_data.n }}}}" }} }}
"#
        ),
    )
    .await;
}

/// Event `n` of `conversation`, of type `step`, whose webhook the receiver
/// answers as `plan` says (see [`apply_planned_payments`]).
fn planned_step(conversation: &str, n: u64, plan: &str) -> VumiApiEvent {
    event(
        ACCOUNT,
        "survey",
        "step",
        conversation,
        json!({"n": n, "plan": plan}),
    )
}

/// Conversations handled at once in the shutdown tests.
const CONCURRENCY: usize = 4;

/// SIGTERM with webhooks in flight (the receiver answers after `hang`): the
/// dispatcher exits 0, within `grace` plus `slack`; after a restart every
/// event is delivered, each conversation's in publish order. Returns the
/// webhook ids in flight at the stop and the ids the receiver saw more than
/// once.
async fn stop_with_events_in_flight(
    bus: BusKind,
    customers: u64,
    grace: Duration,
    hang: Duration,
    slack: Duration,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let receiver = HttpReceiver::start(hang);
    let config = format!(
        "[limits]\nconcurrency = {CONCURRENCY}\n[delivery]\nshutdown_grace = \"{}ms\"\n",
        grace.as_millis()
    );
    let mut s = Setup::start(bus, &config).await;
    let recv = receiver.url();
    s.d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "{ACCOUNT}"
[[chains]]
name = "orders"
event_type = "order"
[[chains.steps]]
handler = "payment_webhook"
name = "pay"
config = {{ url = "{recv}/hook/hang", secret = "gateway", timeout = "10s", body = {{ n = "{{{{ event.event_data.n }}}}" }} }}
"#
        ),
    )
    .await;
    // 12 orders, of `customers` customers in turn.
    let mut ids = Vec::new();
    for n in 0..12 {
        let e = event(
            ACCOUNT,
            "shop",
            "order",
            &format!("customer-{}", n % customers),
            json!({"n": n}),
        );
        ids.push(s.publish(&e).await);
    }
    // Some webhooks are in flight (the receiver holds them for `hang`).
    wait_until("webhooks in flight", TIMEOUT, || async {
        (receiver.count().await >= 2).then_some(())
    })
    .await;

    let stopping = Instant::now();
    let code = s.d.stop();
    let took = stopping.elapsed();
    assert_eq!(code, Some(0), "SIGTERM is a clean stop:\n{}", s.d.log());
    assert!(
        took < grace + slack,
        "the dispatcher took {took:?} to stop, with a grace period of {grace:?}:\n{}",
        s.d.log()
    );
    let before = hooks(&receiver).await;
    let stopped_at = before.len();
    let in_flight: BTreeSet<String> = before.into_iter().map(|h| h.webhook_id).collect();
    assert!(!in_flight.is_empty());
    assert!(in_flight.len() <= CONCURRENCY, "{in_flight:?}");

    receiver.set_healthy(true).await;
    s.d.restart();
    for id in &ids {
        let trace = wait_for_status(&s.d, id, "done").await;
        assert_eq!(step(&trace, "pay")["output"]["status"], 200, "{trace:#}");
    }
    let seen = by_webhook_id(&hooks(&receiver).await);
    let expected: BTreeSet<String> = ids
        .iter()
        .map(|id| webhook_id(id, "orders", "pay"))
        .collect();
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), expected);
    let mut repeated = BTreeSet::new();
    for (webhook, tries) in &seen {
        assert!(tries.iter().any(Hook::succeeded), "{webhook}: {tries:#?}");
        if tries.len() > 1 {
            assert_eq!(tries.len(), 2, "{webhook}: {tries:#?}");
            repeated.insert(webhook.clone());
        }
    }
    assert!(
        repeated.is_subset(&in_flight),
        "repeated webhooks {repeated:?} were not in flight at the stop ({in_flight:?})"
    );
    // A customer's next order went out only once the previous one was done,
    // across the stop and the restart: each customer's requests carry
    // non-decreasing order numbers.
    let all = hooks(&receiver).await;
    for customer in 0..customers {
        let sent: Vec<u64> = all
            .iter()
            .map(|h| h.body["n"].as_u64().expect("an order number"))
            .filter(|n| n % customers == customer)
            .collect();
        assert!(
            sent.is_sorted(),
            "customer-{customer}'s orders reached the receiver as {sent:?} (order numbers in \
             arrival order; the first {} before the stop)",
            all[..stopped_at]
                .iter()
                .filter(|h| {
                    h.body["n"]
                        .as_u64()
                        .is_some_and(|n| n % customers == customer)
                })
                .count()
        );
    }
    (in_flight, repeated)
}

/// SIGTERM lets the webhooks in flight finish within the grace period, exits
/// 0, and nothing is sent twice after the restart (NATS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_events_in_flight_and_nothing_is_sent_twice_on_nats() {
    let (_, repeated) = stop_with_events_in_flight(
        BusKind::Nats,
        4,
        Duration::from_secs(5),
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
    assert_eq!(repeated, BTreeSet::new(), "finished events sent again");
}

/// SIGTERM lets the webhooks in flight finish within the grace period, exits
/// 0, and nothing is sent twice after the restart (embedded bus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_events_in_flight_and_nothing_is_sent_twice_on_the_embedded_bus() {
    let (_, repeated) = stop_with_events_in_flight(
        BusKind::Embedded,
        4,
        Duration::from_secs(5),
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
    assert_eq!(repeated, BTreeSet::new(), "finished events sent again");
}

/// When the grace period ends before the webhooks in flight do, SIGTERM
/// still exits 0 promptly; after the restart only those webhooks are sent
/// again. `hang` is well past `grace + slack`, so a stop that waited for
/// them fails.
async fn stop_cuts_off_what_outlasts_the_grace_period(bus: BusKind) {
    let (in_flight, repeated) = stop_with_events_in_flight(
        bus,
        4,
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(2),
    )
    .await;
    assert!(repeated.len() <= CONCURRENCY);
    assert_eq!(
        repeated, in_flight,
        "the webhooks cut off at the stop are sent again, and only they"
    );
}

/// When the grace period ends first, SIGTERM releases the events in flight,
/// exits 0, and only those are sent again after the restart (NATS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_what_outlasts_the_grace_period_and_only_that_is_sent_again_on_nats() {
    stop_cuts_off_what_outlasts_the_grace_period(BusKind::Nats).await;
}

/// When the grace period ends first, SIGTERM releases the events in flight,
/// exits 0, and only those are sent again after the restart (embedded bus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_what_outlasts_the_grace_period_and_only_that_is_sent_again_on_the_embedded_bus()
 {
    stop_cuts_off_what_outlasts_the_grace_period(BusKind::Embedded).await;
}

/// Events the dispatcher had taken from NATS but not started when SIGTERM
/// came are handled as soon as it is back, not after the bus's ack wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_taken_but_not_started_at_a_sigterm_are_handled_at_once_after_the_restart() {
    // One order per customer: 12 conversations over 4 workers, so the
    // workers' queues fill and the rest wait in the dispatcher's buffers.
    let (_, repeated) = stop_with_events_in_flight(
        BusKind::Nats,
        12,
        Duration::from_secs(5),
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
    assert_eq!(repeated, BTreeSet::new(), "finished events sent again");
}

/// `replay --all` narrowed by `--chain` and `--since` replays only the letters
/// they select; a bad `--since` is refused with a message saying what it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_is_narrowed_by_chain_and_time() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let s = Setup::start(BusKind::Embedded, "").await;
    let recv = receiver.url();
    let step = format!(
        "steps = [{{ handler = \"payment_webhook\", config = {{ url = \"{recv}/chaos/100,0\", secret = \"gateway\" }}, retry = {{ max_attempts = 1 }} }}]"
    );
    s.d.apply_chains(
        "acme.toml",
        &format!(
            "account_key = \"{ACCOUNT}\"\n[[chains]]\nname = \"a\"\nevent_type = \"a\"\n{step}\n\
             [[chains]]\nname = \"b\"\nevent_type = \"b\"\n{step}\n"
        ),
    )
    .await;
    let mut ids = BTreeMap::new();
    for (n, chain) in ["a", "b", "a", "b"].into_iter().enumerate() {
        let e = event(ACCOUNT, "shop", chain, &format!("c-{n}"), json!({}));
        let id = s.publish(&e).await;
        wait_for_status(&s.d, &id, "dead").await;
        ids.insert(id, chain);
    }
    receiver.set_healthy(true).await;

    let bad =
        s.d.cli(&[
            "dead-letters",
            "replay",
            ACCOUNT,
            "--all",
            "--since",
            "yesterday",
        ])
        .await;
    assert!(
        bad.fails().contains("neither an RFC 3339 time") && bad.fails().contains("2h"),
        "{}",
        bad.fails()
    );
    let future = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a time");
    let none =
        s.d.cli(&[
            "dead-letters",
            "replay",
            ACCOUNT,
            "--all",
            "--since",
            &future,
        ])
        .await;
    assert!(
        none.ok().contains("replayed 0 dead letters"),
        "{}",
        none.ok()
    );

    let only_a =
        s.d.cli(&[
            "dead-letters",
            "replay",
            ACCOUNT,
            "--all",
            "--chain",
            "a",
            "--since",
            "1h",
        ])
        .await;
    assert!(
        only_a.ok().contains("replayed 2 dead letters"),
        "{}",
        only_a.ok()
    );
    for (id, chain) in &ids {
        if *chain == "a" {
            wait_for_status(&s.d, id, "done").await;
        }
    }
    let left = s.d.dead_letters(ACCOUNT).await;
    let left_events: BTreeSet<&str> = left
        .iter()
        .map(|l| l["event"]["id"].as_str().expect("an event id"))
        .collect();
    let b_events: BTreeSet<&str> = ids
        .iter()
        .filter(|(_, c)| **c == "b")
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(
        left_events, b_events,
        "only chain b's letters are left: {left:#?}"
    );
    assert!(
        left.iter()
            .all(|l| l["chain"] == "b" && l["status"] == "dead")
    );
}

/// A conversation held behind a retry does not hold up the others, however
/// many of its later events wait meanwhile: here one conversation's first
/// webhook is refused with `Retry-After: 60` and 1,100 more of its events
/// follow (more than a NATS consumer's default of unacked messages, which
/// counts those nakked to wait), then one event of another conversation,
/// which is handled within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_held_behind_a_retry_do_not_hold_up_other_conversations() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let s = Setup::start(BusKind::Nats, "").await;
    apply_planned_payments(&s.d, &receiver).await;
    s.publish(&planned_step("busy", 0, "503:60,200")).await;
    wait_until("the first event's refusal", TIMEOUT, || async {
        (!hooks(&receiver).await.is_empty()).then_some(())
    })
    .await;
    for n in 1..=1_100 {
        s.publish(&planned_step("busy", n, "200")).await;
    }
    let other = s.publish(&planned_step("other", 0, "200")).await;
    let trace = wait_for_status(&s.d, &other, "done").await;
    assert_eq!(step(&trace, "pay")["output"]["status"], 200, "{trace:#}");
    let delivered: Vec<u64> = hooks(&receiver)
        .await
        .iter()
        .filter(|h| h.succeeded())
        .map(|h| h.body["n"].as_u64().expect("an event number"))
        .collect();
    assert_eq!(
        delivered,
        [0],
        "only the other conversation's event went out, the busy one still waits"
    );
}
