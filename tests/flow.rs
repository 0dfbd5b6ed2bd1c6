//! Flow control per key, with replicas: 200 events over 5 keys run four
//! chains, one per control — `rate_limit` lets the first runs of a key go
//! and skips the rest, `debounce` runs only the last event of a burst,
//! `throttle` gives every run a turn (none dropped, none early),
//! `concurrency` keeps at most so many runs of a key going at once. Bad
//! controls are refused at apply; a key that renders empty files the
//! event in dead letters.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::peers::HttpReceiver;
use crate::util::{Dispatcher, NatsServer, event, ms_of, wait_until};

const TIMEOUT: Duration = Duration::from_secs(120);
const KEYS: usize = 5;
const EVENTS: usize = 200;

fn config(receiver: &HttpReceiver) -> String {
    receiver.sms_gateway_config(5)
}

/// One chain per control over the same events, each texting what it ran.
const CHAINS: &str = r#"
account_key = "acme"

[[chains]]
name = "limited"
conversation_type = "survey"
event_type = "replied"
rate_limit = { key = "{{ event.event_data.msisdn }}", limit = 3, period = "1h" }

[[chains.steps]]
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "rate {{ event.id }}" }

[[chains]]
name = "quiet"
conversation_type = "survey"
event_type = "replied"
debounce = { key = "{{ event.event_data.msisdn }}", period = "6s" }

[[chains.steps]]
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "debounce {{ event.id }}" }

[[chains]]
name = "paced"
conversation_type = "survey"
event_type = "replied"
throttle = { key = "{{ event.event_data.msisdn }}", limit = 4, period = "1s" }

[[chains.steps]]
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "throttle {{ event.id }}" }

[[chains]]
name = "bounded"
conversation_type = "survey"
event_type = "replied"
concurrency = { key = "{{ event.event_data.msisdn }}", limit = 2 }

[[chains.steps]]
name = "start"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "start {{ event.id }}" }

[[chains.steps]]
handler = "delay"
config = { duration = "300ms" }

[[chains.steps]]
name = "end"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "end {{ event.id }}" }
"#;

fn msisdn(key: usize) -> String {
    format!("+2782100{key:04}")
}

/// A text the receiver got: to whom, what it said (its first word), the
/// event id it names, and when it came.
#[derive(Debug, Clone)]
struct Text {
    to: String,
    kind: String,
    id: String,
    at_ms: i64,
}

async fn texts(receiver: &HttpReceiver) -> Vec<Text> {
    receiver
        .requests_to("/sms")
        .await
        .into_iter()
        .filter_map(|r| {
            let body: Value = serde_json::from_str(r["body"].as_str()?).ok()?;
            let (kind, id) = body["content"].as_str()?.split_once(' ')?;
            Some(Text {
                to: body["to"].as_str()?.to_string(),
                kind: kind.to_string(),
                id: id.to_string(),
                at_ms: r["at_ms"].as_i64()?,
            })
        })
        .collect()
}

fn of_kind<'a>(texts: &'a [Text], kind: &str) -> Vec<&'a Text> {
    texts.iter().filter(|t| t.kind == kind).collect()
}

/// The chain called `name` in an event's trace.
fn chain<'a>(trace: &'a Value, name: &str) -> &'a Value {
    trace["chains"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no chain {name} in {trace:#}"))
}

/// A counter of `/metrics`, summed over the replicas.
async fn flow_count(replicas: &[&Dispatcher], control: &str, result: &str) -> u64 {
    let series =
        format!("switchboard_flow_control_total{{control=\"{control}\",result=\"{result}\"}} ");
    let mut total = 0;
    for d in replicas {
        let (_, text) = d.get("/metrics").await;
        total += text
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(&series))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_controls_hold_per_key_with_replicas() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("acme.toml"), CHAINS).expect("a chain file");
    let config =
        config(&receiver).replace("[bus]\n", "[bus]\nreplicated = true\nstream_replicas = 1\n");
    let a = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    let b = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    wait_until("the replicas sharing the partitions", TIMEOUT, || async {
        let mut held = 0;
        for d in [&a, &b] {
            let (_, ready) = d.get("/readyz").await;
            held += ready["partitions"].as_array().map_or(0, Vec::len);
        }
        (held == 16).then_some(())
    })
    .await;

    let emitter = switchboard_sdk::nats::NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    // Each event is a conversation of its own: events of a key are handled
    // by different workers at once, and meet only in the key's state.
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..EVENTS {
        let k = i % KEYS;
        let e = event(
            "acme",
            "survey",
            "replied",
            &format!("c-{i}"),
            json!({ "msisdn": msisdn(k), "n": i }),
        );
        emitter.emit(&e).await.expect("emitting");
        ids.entry(msisdn(k)).or_default().push(e.id.to_string());
    }

    // Every run of the throttled and the bounded chain, and each key's
    // debounced one, happen: nothing is dropped.
    let sent = wait_until("every run", TIMEOUT, || async {
        let sent = texts(&receiver).await;
        let done = of_kind(&sent, "throttle").len() >= EVENTS
            && of_kind(&sent, "end").len() >= EVENTS
            && of_kind(&sent, "debounce").len() >= KEYS
            && of_kind(&sent, "rate").len() >= KEYS * 3;
        done.then_some(sent)
    })
    .await;
    // Settled: nothing more comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = texts(&receiver).await;
    assert_eq!(again.len(), sent.len(), "more runs came after the last");
    let owner = |id: &str| {
        let a = &a;
        let b = &b;
        let id = id.to_string();
        async move {
            match a.trace("acme", &id).await {
                Some(t) => t,
                None => b.trace("acme", &id).await.expect("a trace on one replica"),
            }
        }
    };

    for (number, ids) in &ids {
        let of = |kind: &str| -> Vec<&Text> {
            of_kind(&sent, kind)
                .into_iter()
                .filter(|t| t.to == *number)
                .collect()
        };
        // rate_limit: three runs of the key, each of its events.
        let rated: Vec<&str> = of("rate").iter().map(|t| t.id.as_str()).collect();
        assert_eq!(rated.len(), 3, "rate-limited runs of {number}: {rated:?}");
        assert!(rated.iter().all(|id| ids.iter().any(|i| i == id)));

        // debounce: one run, the event of the key handled last; every other
        // one superseded by it.
        let quiet: Vec<&str> = of("debounce").iter().map(|t| t.id.as_str()).collect();
        assert_eq!(quiet.len(), 1, "debounced runs of {number}: {quiet:?}");
        let last = quiet[0];
        let other = ids.iter().find(|id| *id != last).expect("another event");
        let superseded = owner(other).await;
        let flow = &chain(&superseded, "quiet")["flow"][0];
        assert_eq!(flow["result"], "superseded", "{superseded:#}");
        assert_eq!(flow["by"], last, "{superseded:#}");

        // throttle: every event once; no five turns within a second; none
        // ran before its turn.
        let paced = of("throttle");
        assert_eq!(paced.len(), ids.len(), "throttled runs of {number}");
        let mut turns = Vec::new();
        for t in &paced {
            let trace = owner(&t.id).await;
            let flow = &chain(&trace, "paced")["flow"][0];
            assert_eq!(flow["control"], "throttle", "{trace:#}");
            assert_eq!(flow["result"], "passed", "{trace:#}");
            let turn = ms_of(flow["at"].as_str().expect("its turn"));
            let at_ms = i128::from(t.at_ms);
            assert!(
                at_ms >= turn,
                "a throttled run went {} ms before its turn",
                turn - at_ms
            );
            turns.push(turn);
        }
        turns.sort_unstable();
        for w in turns.windows(5) {
            assert!(
                w[4] - w[0] >= 1000,
                "five turns of {number} within {} ms",
                w[4] - w[0]
            );
        }

        // concurrency: every run started and ended; never more than two
        // between a start and its end.
        let mut marks: Vec<(i64, i32)> = of("start")
            .iter()
            .map(|t| (t.at_ms, 1))
            .chain(of("end").iter().map(|t| (t.at_ms, -1)))
            .collect();
        assert_eq!(of("start").len(), ids.len(), "bounded runs of {number}");
        assert_eq!(of("end").len(), ids.len(), "bounded runs of {number}");
        // At the same millisecond, an end frees its slot first.
        marks.sort_unstable();
        let (mut running, mut most) = (0, 0);
        for (_, step) in marks {
            running += step;
            most = most.max(running);
        }
        assert!(most <= 2, "{most} runs of {number} at once");
        assert_eq!(
            most, 2,
            "the limit was never reached: the test proves too little"
        );
    }

    // A skipped run says so in its trace.
    let rated: Vec<String> = of_kind(&sent, "rate")
        .iter()
        .map(|t| t.id.clone())
        .collect();
    let skipped_id = ids[&msisdn(0)]
        .iter()
        .find(|id| !rated.contains(id))
        .expect("a skipped event");
    let skipped = owner(skipped_id).await;
    let limited = chain(&skipped, "limited");
    assert_eq!(limited["flow"][0]["result"], "skipped", "{skipped:#}");
    assert_eq!(limited["steps"][0]["outcome"], "skipped", "{skipped:#}");

    let replicas = [&a, &b];
    let rate_skipped = (EVENTS - KEYS * 3) as u64;
    assert_eq!(
        flow_count(&replicas, "rate_limit", "skipped").await,
        rate_skipped
    );
    assert_eq!(
        flow_count(&replicas, "debounce", "superseded").await,
        (EVENTS - KEYS) as u64
    );
    assert!(flow_count(&replicas, "throttle", "held").await > 0);
    assert!(flow_count(&replicas, "concurrency", "held").await > 0);
}

/// Bad flow controls are refused at apply, naming the chain and the
/// field; a key that renders empty files the event in dead letters.
#[tokio::test]
async fn bad_flow_controls_are_refused_at_apply_or_dead_lettered() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(None, &config(&receiver));
    let chain = |control: &str| {
        format!(
            "account_key = \"acme\"\n\n[[chains]]\nname = \"paced\"\nconversation_type = \"survey\"\n\
             event_type = \"replied\"\n{control}\n\n[[chains.steps]]\nhandler = \"log\"\n"
        )
    };
    for (control, expected) in [
        (
            r#"rate_limit = { key = "k", limit = 0, period = "1m" }"#,
            "rate_limit.limit",
        ),
        (
            r#"throttle = { key = "k", limit = 2, period = "0s" }"#,
            "throttle.period",
        ),
        (
            r#"concurrency = { key = "{{ event.nope }}", limit = 2 }"#,
            "concurrency.key",
        ),
        (r#"debounce = { key = "", period = "1s" }"#, "debounce.key"),
        (
            "debounce = { key = \"k\", period = \"1s\" }\nthrottle = { key = \"k\", limit = 1, period = \"1s\" }",
            "one of debounce, throttle, concurrency",
        ),
        (
            r#"rate_limit = { key = "k", limit = 1, period = "1m", burst = 3 }"#,
            "burst",
        ),
        (
            "order = \"conversation\"\n\n[[chains.steps]]\nhandler = \"digest\"\nconfig = { key = \"k\", window = \"1m\" }",
            "a chain with a digest takes no concurrency",
        ),
    ] {
        let path = d.file("bad.toml", &chain(control));
        let out = d
            .cli(&["chains", "apply", path.to_str().expect("a UTF-8 path")])
            .await;
        let line = out.fails();
        // A field the control does not take is the file's error, at its
        // line; the others are the chain's.
        let whose = if expected == "burst" {
            "line 7"
        } else {
            "paced"
        };
        for part in [whose, expected] {
            assert!(line.contains(part), "{control}: {line:?} lacks {part:?}");
        }
    }

    d.apply_chains(
        "acme.toml",
        &chain(r#"rate_limit = { key = "{{ event.event_data.who }}", limit = 1, period = "1m" }"#),
    )
    .await;
    let keyless = event("acme", "survey", "replied", "c-1", json!({ "who": " " }));
    let id = d
        .post_event(&serde_json::to_value(&keyless).expect("JSON"))
        .await;
    let letter = d
        .wait_for_dead_letter("acme", "the empty key", |l| l["event"]["id"] == id.as_str())
        .await;
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("rate_limit.key") && error.contains("empty"),
        "{letter:#}"
    );
}

/// One run per conversation (`order = "conversation"`): a text, then a
/// two-second pause.
const ONE_AT_A_TIME: &str = r#"
account_key = "acme"

[[chains]]
name = "one-at-a-time"
conversation_type = "survey"
event_type = "replied"
order = "conversation"

[[chains.steps]]
name = "start"
handler = "send_sms"
config = { provider = "gateway", to = "+27821000001", body = "start {{ event.id }}" }

[[chains.steps]]
handler = "delay"
config = { duration = "2s" }
"#;

/// The trace of `acme`'s event `id` once its run is neither waiting nor
/// running.
async fn ended(d: &Dispatcher, id: &str) -> Value {
    wait_until("a run's end", TIMEOUT, || async {
        d.trace("acme", id)
            .await
            .filter(|t| t["status"] != "waiting" && t["status"] != "running")
    })
    .await
}

/// A run waiting for a `concurrency` slot whose event expires meanwhile
/// ends `expired` when its turn comes and gives the slot on: the runs
/// after it are not held up for good.
#[tokio::test]
async fn an_expired_waiting_run_gives_its_slot_on() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(None, &config(&receiver));
    d.apply_chains("acme.toml", ONE_AT_A_TIME).await;
    let post = |expires: Option<String>| {
        let mut e = event("acme", "survey", "replied", "c-1", json!({}));
        e.expires_at = expires.map(|t| {
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .expect("a time")
        });
        serde_json::to_value(&e).expect("JSON")
    };
    let first = d.post_event(&post(None)).await;
    d.wait_for_trace("acme", &first, TIMEOUT).await;
    let soon = switchboard_sdk::format_rfc3339(
        time::OffsetDateTime::now_utc() + time::Duration::milliseconds(800),
    );
    let expiring = d.post_event(&post(Some(soon))).await;
    let last = d.post_event(&post(None)).await;
    assert_eq!(ended(&d, &first).await["status"], "done");
    let trace = ended(&d, &expiring).await;
    assert_eq!(trace["status"], "expired", "{trace:#}");
    let trace = ended(&d, &last).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let started: Vec<Text> = of_kind(&texts(&receiver).await, "start")
        .into_iter()
        .cloned()
        .collect();
    assert!(started.iter().any(|t| t.id == last), "{started:?}");
    assert!(!started.iter().any(|t| t.id == expiring), "{started:?}");
}

/// A chain removed while one run holds its `concurrency` slot and another
/// waits for it: both end `removed`, and the slot is free again, so that
/// the chain applied again runs its next event instead of queueing it
/// behind a run that ended.
#[tokio::test]
async fn a_removed_chains_waiting_runs_leave_its_slot_free() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(None, &config(&receiver));
    d.apply_chains("acme.toml", ONE_AT_A_TIME).await;
    let post = || {
        serde_json::to_value(event("acme", "survey", "replied", "c-1", json!({}))).expect("JSON")
    };
    let holding = d.post_event(&post()).await;
    d.wait_for_trace("acme", &holding, TIMEOUT).await;
    let queued = d.post_event(&post()).await;
    let trace = d.wait_for_trace("acme", &queued, TIMEOUT).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    // The chain removed: the account keeps another one.
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "other"
event_type = "other"
[[chains.steps]]
handler = "log"
config = { message = "other" }
"#,
    )
    .await;
    for id in [holding, queued] {
        let trace = ended(&d, &id).await;
        assert_eq!(trace["status"], "cancelled", "{trace:#}");
    }
    d.apply_chains("acme.toml", ONE_AT_A_TIME).await;
    let next = d.post_event(&post()).await;
    let trace = ended(&d, &next).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
}

/// A run that held a `concurrency` slot gives it back when it ends in dead
/// letters; replayed, it takes one again, or waits its turn behind the run
/// holding it, instead of going on beside it (one more than the limit).
#[tokio::test]
async fn a_replayed_dead_letter_waits_for_a_concurrency_slot() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(None, &config(&receiver));
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "one-at-a-time"
conversation_type = "survey"
event_type = "replied"
concurrency = { key = "all", limit = 1 }
cancel_on = { event_type = "release" }

[[chains.steps]]
handler = "log"
config = { message = "first {{ event.id }}" }

[[chains.steps]]
name = "text"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.to }}", body = "text {{ event.id }}" }

[[chains.steps]]
handler = "delay"
config = { duration = "10m" }
"#,
    )
    .await;
    let post = |conversation: &str, to: &str| {
        serde_json::to_value(event(
            "acme",
            "survey",
            "replied",
            conversation,
            json!({ "to": to }),
        ))
        .expect("JSON")
    };
    // Its text cannot go: the run ends in dead letters, its slot free.
    let failing = d.post_event(&post("c-1", "not a number")).await;
    let trace = ended(&d, &failing).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let letter = d.dead_letters("acme").await[0]["id"]
        .as_str()
        .expect("a letter id")
        .to_string();
    // Another run takes the slot and holds it until it is let go.
    let holding = d.post_event(&post("c-2", "+27821000001")).await;
    let trace = d.wait_for_trace("acme", &holding, TIMEOUT).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");

    d.cli(&["dead-letters", "replay", "acme", &letter])
        .await
        .ok();
    let trace = wait_until("the replay's pass", TIMEOUT, || async {
        d.trace("acme", &failing)
            .await
            .filter(|t| t["status"] != "dead" && t["status"] != "running")
    })
    .await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let holder = d.trace("acme", &holding).await.expect("its trace");
    assert_eq!(holder["status"], "waiting", "{holder:#}");
    // Discarding the letter now would not stop its run: refused.
    let refused = d.cli(&["dead-letters", "discard", "acme", &letter]).await;
    assert!(
        refused.fails().contains("is being replayed"),
        "{}",
        refused.fails()
    );
    assert_eq!(d.dead_letters("acme").await[0]["status"], "replaying");

    // The holder's end (cancelled) gives it the slot: it goes on at its
    // failed step.
    let release =
        serde_json::to_value(event("acme", "survey", "release", "c-2", json!({}))).expect("JSON");
    d.post_event(&release).await;
    assert_eq!(ended(&d, &holding).await["status"], "cancelled");
    let trace = ended(&d, &failing).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let step = &trace["chains"][0]["steps"][1];
    assert_eq!(step["name"], "text", "{trace:#}");
    assert!(
        step["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not an E.164 number")),
        "{trace:#}"
    );
    // Failed again, it is a dead letter again, and can be discarded.
    d.cli(&["dead-letters", "discard", "acme", &letter])
        .await
        .ok();
    assert_eq!(d.dead_letters("acme").await, Vec::<Value>::new());
}

/// The states of `rate_limit` and `throttle` keys stay only while their
/// turns can still decide something: the expiry sweep removes a key's
/// state once its last turn is a period old (the period the chain has
/// now), and not before; and a removed chain's at once. (A key per
/// recipient would otherwise keep a state for every recipient ever seen.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_rate_and_throttle_state_is_swept_a_period_after_its_last_turn() {
    use switchboard_rules::ChainStore;
    use switchboard_store::{Collection, Store};
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(None, &config(&receiver));
    let chains = |limited: &str, paced: &str| {
        format!(
            r#"
account_key = "acme"

[[chains]]
name = "limited"
conversation_type = "survey"
event_type = "replied"
rate_limit = {{ key = "{{{{ event.event_data.msisdn }}}}", limit = 3, period = "{limited}" }}

[[chains.steps]]
handler = "log"
{paced}"#
        )
    };
    let paced = r#"
[[chains]]
name = "paced"
conversation_type = "survey"
event_type = "replied"
throttle = { key = "{{ event.event_data.msisdn }}", limit = 4, period = "2h" }

[[chains.steps]]
handler = "log"
"#;
    d.apply_chains("acme.toml", &chains("1h", paced)).await;
    let before = crate::util::now_ms() as u64;
    for key in 0..3 {
        let e = event(
            "acme",
            "survey",
            "replied",
            &format!("c-{key}"),
            json!({ "msisdn": msisdn(key) }),
        );
        let id = d.post_event(&serde_json::to_value(&e).expect("JSON")).await;
        let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
    }
    let after = crate::util::now_ms() as u64;
    let hour = 3_600_000;
    d.stop();
    let open = |d: &Dispatcher| {
        let store = Store::open(&d.data_dir().join("store")).expect("the store opens");
        let chains = ChainStore::open(store.clone()).expect("the chains");
        (store, chains)
    };
    let sweep = |(store, chains): &(Store, ChainStore), now| {
        switchboard_engine::executor::expire_flow_states(store, now, chains).unwrap()
    };
    let states = |(store, _): &(Store, ChainStore)| store.len(Collection::Flow);
    let opened = open(&d);
    assert_eq!(states(&opened), 6, "a state per key and chain");
    assert_eq!(sweep(&opened, after), 0);
    assert_eq!(
        sweep(&opened, before + hour - 1),
        0,
        "within the rate limit's hour"
    );
    drop(opened);

    // The rate limit's period made longer holds the turns given under the
    // shorter one. (The dispatcher's own sweep, as it starts, finds
    // nothing quiet yet, whatever the chains.)
    d.restart();
    d.apply_chains("acme.toml", &chains("3h", paced)).await;
    d.stop();
    let opened = open(&d);
    assert_eq!(states(&opened), 6);
    assert_eq!(
        sweep(&opened, after + hour),
        0,
        "within the rate limit's 3 h"
    );
    assert_eq!(
        sweep(&opened, before + 2 * hour - 1),
        0,
        "within the throttle's 2 h"
    );
    assert_eq!(sweep(&opened, after + 2 * hour), 3, "the throttle's states");
    assert_eq!(
        sweep(&opened, after + 3 * hour),
        3,
        "the rate limit's, 3 h on"
    );
    assert_eq!(states(&opened), 0);
    drop(opened);

    // A chain removed lets its states go at once.
    d.restart();
    let e = event(
        "acme",
        "survey",
        "replied",
        "c-9",
        json!({ "msisdn": msisdn(9) }),
    );
    let id = d.post_event(&serde_json::to_value(&e).expect("JSON")).await;
    d.wait_for_trace("acme", &id, TIMEOUT).await;
    d.apply_chains("acme.toml", &chains("3h", "")).await;
    let last = crate::util::now_ms() as u64;
    d.stop();
    let opened = open(&d);
    assert_eq!(states(&opened), 2, "the new key's, one per chain");
    assert_eq!(
        sweep(&opened, last),
        1,
        "the removed chain's throttle state"
    );
    assert_eq!(
        sweep(&opened, last + hour),
        0,
        "the new key's turn, within 3 h"
    );
    assert_eq!(sweep(&opened, last + 3 * hour), 1);
    assert_eq!(states(&opened), 0);
}
