//! Digests: the events of a key gather in one window, and the chain goes
//! on once per window with all of them, through SIGKILLs of the
//! dispatcher and a take-over by another replica; bad digests are refused
//! at apply or fail their step for good.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::peers::HttpReceiver;
use crate::util::{Dispatcher, NatsServer, deliver_again, event, ms_of, now_ms, wait_until};

const TIMEOUT: Duration = Duration::from_secs(60);

fn config(receiver: &HttpReceiver) -> String {
    receiver.sms_gateway_config(3)
}

/// A chain gathering `signed_up` events (`gather` is the digest step's
/// config), then texting the event's number the ids it gathered.
fn digest_chain(gather: &str) -> String {
    format!(
        r#"
account_key = "acme"

[[chains]]
name = "daily"
conversation_type = "survey"
event_type = "signed_up"

[[chains.steps]]
name = "gather"
handler = "digest"
config = {{ {gather} }}

[[chains.steps]]
name = "text"
handler = "send_sms"
config = {{ provider = "gateway", to = "{{{{ event.event_data.msisdn }}}}", body = "digest {{{{ steps.gather.count }}}}: {{{{ steps.gather.events | map(attribute='id') | join(',') }}}}" }}
"#
    )
}

fn msisdn(key: usize) -> String {
    format!("+2782000{key:04}")
}

/// The digest step's config gathering by phone number, closing as `rest` says.
fn by_number(rest: &str) -> String {
    format!(r#"key = "{{{{ event.event_data.msisdn }}}}", {rest}"#)
}

/// The digests texted so far: the number each went to, and the ids it
/// listed.
async fn digests(receiver: &HttpReceiver) -> Vec<(String, Vec<String>)> {
    receiver
        .requests_to("/sms")
        .await
        .into_iter()
        .filter_map(|r| {
            let body: Value = serde_json::from_str(r["body"].as_str()?).ok()?;
            let text = body["content"].as_str()?;
            let (_, ids) = text.strip_prefix("digest ")?.split_once(": ")?;
            Some((
                body["to"].as_str()?.to_string(),
                ids.split(',').map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// Posts `n` events from `first` on, over `keys` numbers in turn; returns
/// each number's event ids.
async fn post(
    d: &Dispatcher,
    first: usize,
    n: usize,
    keys: usize,
    ids: &mut BTreeMap<String, Vec<String>>,
) {
    for i in first..first + n {
        let number = msisdn(i % keys);
        let e = event(
            "acme",
            "survey",
            "signed_up",
            &format!("c-{i}"),
            json!({ "msisdn": number }),
        );
        let id = d.post_event(&serde_json::to_value(&e).expect("JSON")).await;
        ids.entry(number).or_default().push(id);
    }
}

/// Waits until every event of `ids` was handled (paused in its window, or
/// joined one).
async fn handled(d: &Dispatcher, ids: &BTreeMap<String, Vec<String>>) {
    for id in ids.values().flatten() {
        d.wait_for_trace("acme", id, TIMEOUT).await;
    }
}

/// Exactly one digest per number, listing its events once each.
async fn one_digest_per_key(receiver: &HttpReceiver, ids: &BTreeMap<String, Vec<String>>) {
    let sent = wait_until("a digest per number", TIMEOUT, || async {
        let sent = digests(receiver).await;
        (sent.len() >= ids.len()).then_some(sent)
    })
    .await;
    // Once: a second continuation of a window would have texted by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = digests(receiver).await;
    assert_eq!(
        again.len(),
        sent.len(),
        "a window went on twice: {again:#?}"
    );
    assert_eq!(sent.len(), ids.len(), "{sent:#?}");
    for (to, listed) in &sent {
        let expected: BTreeSet<&String> = ids[to].iter().collect();
        let got: BTreeSet<&String> = listed.iter().collect();
        assert_eq!(got, expected, "the digest to {to}");
        assert_eq!(listed.len(), expected.len(), "an event twice in {listed:?}");
    }
}

/// 50 events over 10 numbers, with the dispatcher SIGKILLed twice while
/// the windows are open: 10 digests, each with its number's 5 events, in
/// the order they came; the events that joined stop there, saying whose
/// window they joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_goes_on_once_per_window_with_every_event_through_sigkills_on_nats() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(Some(&nats), &config(&receiver));
    d.apply_chains("acme.toml", &digest_chain(&by_number(r#"window = "12s""#)))
        .await;
    let mut ids = BTreeMap::new();
    post(&d, 0, 25, 10, &mut ids).await;
    handled(&d, &ids).await;

    // The first event of a number opened its window and waits; the next
    // joined it and stopped.
    let opener = &ids[&msisdn(0)][0].clone();
    let trace = d.wait_for_trace("acme", opener, TIMEOUT).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let chain = &trace["chains"][0];
    assert_eq!(chain["waiting_digest"], msisdn(0).as_str(), "{trace:#}");
    let until = ms_of(chain["waiting_until"].as_str().expect("waiting_until"));
    assert_eq!(chain["steps"][0]["outcome"], "waiting");
    let joiner = d.wait_for_trace("acme", &ids[&msisdn(0)][1], TIMEOUT).await;
    assert_eq!(joiner["status"], "done", "{joiner:#}");
    let gather = &joiner["chains"][0]["steps"][0];
    assert_eq!(gather["outcome"], "stopped", "{joiner:#}");
    assert_eq!(gather["output"]["joined"], opener.as_str());
    assert_eq!(gather["output"]["position"], 2);
    assert_eq!(joiner["chains"][0]["steps"][1]["outcome"], "skipped");
    let (_, metrics) = d.get("/metrics").await;
    let metrics = metrics.as_str().expect("metrics are text").to_string();
    assert!(
        metrics.lines().any(|l| l == "switchboard_digests_open 10"),
        "{metrics}"
    );

    d.kill9();
    d.restart();
    post(&d, 25, 25, 10, &mut ids).await;
    handled(&d, &ids).await;
    assert!(
        now_ms() < until,
        "the windows closed before the second kill: the test proves too little"
    );
    d.kill9();
    d.restart();

    one_digest_per_key(&receiver, &ids).await;
    // In the order they came, and not before the window closed.
    let sent = digests(&receiver).await;
    let first = sent.iter().find(|(to, _)| *to == msisdn(0)).expect("sent");
    assert_eq!(&first.1, &ids[&msisdn(0)]);
    let at = receiver.requests_to("/sms").await[0]["at_ms"]
        .as_i64()
        .expect("at_ms");
    assert!(
        i128::from(at) >= until - 1000,
        "a digest went before its window closed"
    );
    let trace = wait_until("the opener's end", TIMEOUT, || async {
        d.trace("acme", opener)
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    let gather = &trace["chains"][0]["steps"][0]["output"];
    assert_eq!(gather["count"], 5, "{trace:#}");
    assert_eq!(gather["events"][4]["id"], ids[&msisdn(0)][4].as_str());
    let (_, metrics) = d.get("/metrics").await;
    let metrics = metrics.as_str().expect("metrics are text").to_string();
    assert!(
        metrics.lines().any(|l| l == "switchboard_digests_open 0"),
        "{metrics}"
    );
}

/// A window closed by its count alone (`max_events`, no time): each
/// number's fifth event closes it, across a SIGKILL, on the embedded bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_closes_at_max_events_through_a_sigkill_on_the_embedded_bus() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(None, &config(&receiver));
    d.apply_chains("acme.toml", &digest_chain(&by_number("max_events = 5")))
        .await;
    let mut ids = BTreeMap::new();
    post(&d, 0, 30, 10, &mut ids).await;
    handled(&d, &ids).await;
    let trace = d.wait_for_trace("acme", &ids[&msisdn(3)][0], TIMEOUT).await;
    let chain = &trace["chains"][0];
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    assert_eq!(chain["waiting_digest"], msisdn(3).as_str());
    assert!(chain.get("waiting_until").is_none(), "{trace:#}");
    assert!(digests(&receiver).await.is_empty());

    d.kill9();
    d.restart();
    post(&d, 30, 20, 10, &mut ids).await;
    one_digest_per_key(&receiver, &ids).await;
}

/// With replicas, open windows are the partition's state: the owner is
/// killed while they are open, and the replica that takes the partition
/// over closes each once, with every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_digests_close_on_the_replica_that_took_their_partition_over() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        dir.path().join("acme.toml"),
        digest_chain(&by_number(r#"window = "5s""#)),
    )
    .expect("a chain file");
    let config =
        config(&receiver).replace("[bus]\n", "[bus]\nreplicated = true\nstream_replicas = 1\n");
    let mut owner = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    wait_until("the owner holding every partition", TIMEOUT, || async {
        let (_, ready) = owner.get("/readyz").await;
        (ready["partitions"].as_array().map(Vec::len) == Some(16)).then_some(())
    })
    .await;
    let emitter = switchboard_sdk::nats::NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..6 {
        let number = msisdn(i % 2);
        let e = event(
            "acme",
            "survey",
            "signed_up",
            &format!("c-{i}"),
            json!({ "msisdn": number }),
        );
        emitter.emit(&e).await.expect("emitting");
        ids.entry(number).or_default().push(e.id.to_string());
    }
    handled(&owner, &ids).await;
    // Every join durable (an event is acked once its writes are): a join
    // the kill took is handled again, and if its window closed first, it
    // opens one of its own, which is right but not what this test is for.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("NATS"));
    let stream = js
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream");
    wait_until("every event acked", TIMEOUT, || async {
        let mut left = 0;
        for p in 0..16 {
            let info = stream
                .consumer_info(format!("switchboard-p{p}"))
                .await
                .ok()?;
            left += info.num_pending + info.num_ack_pending as u64;
        }
        (left == 0).then_some(())
    })
    .await;
    owner.kill9();

    let _fresh = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    one_digest_per_key(&receiver, &ids).await;
}

/// A digest without a way to close, with a count below one or a window
/// that is no duration is refused at apply, naming the step and option; a
/// key that renders empty fails the step for good, into dead letters.
#[tokio::test]
async fn bad_digests_are_refused_at_apply_or_fail_their_step() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(None, &config(&receiver));
    for (config, expected) in [
        (
            r#"key = "{{ event.event_data.msisdn }}""#,
            "window or max_events",
        ),
        (r#"key = "k", max_events = 0"#, "config.max_events"),
        (r#"key = "k", max_events = "5""#, "config.max_events"),
        (r#"key = "k", window = "-1h""#, "config.window"),
        (r#"key = "k", window = "soon""#, "config.window"),
        (r#"window = "1h""#, "config.key"),
    ] {
        let text = digest_chain(config);
        let path = d.file("bad.toml", &text);
        let out = d
            .cli(&["chains", "apply", path.to_str().expect("a UTF-8 path")])
            .await;
        let line = out.fails();
        for part in [r#"chain "daily""#, "gather", expected] {
            assert!(line.contains(part), "{config}: {line:?} lacks {part:?}");
        }
    }

    d.apply_chains("acme.toml", &digest_chain(&by_number(r#"window = "1h""#)))
        .await;
    let keyless = event(
        "acme",
        "survey",
        "signed_up",
        "c-1",
        json!({ "msisdn": "" }),
    );
    let id = d
        .post_event(&serde_json::to_value(&keyless).expect("JSON"))
        .await;
    let letter = d
        .wait_for_dead_letter("acme", "the empty key", |l| l["event"]["id"] == id.as_str())
        .await;
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("config.key") && error.contains("empty"),
        "{letter:#}"
    );
}

/// A window that filled is closing: an event that comes before its opener
/// went on opens the next window instead of joining it. A backlog of 8
/// events of one key (published while the dispatcher was down) makes
/// windows of at most `max_events`, each event in one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_takes_no_more_events() {
    use switchboard_sdk::nats::NatsEmitter;

    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(Some(&nats), &config(&receiver));
    d.apply_chains(
        "acme.toml",
        &digest_chain(&by_number(r#"max_events = 3, window = "2s""#)),
    )
    .await;
    d.stop();
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    let mut ids = Vec::new();
    for i in 0..8 {
        let e = event(
            "acme",
            "survey",
            "signed_up",
            &format!("c-{i}"),
            json!({ "msisdn": msisdn(0) }),
        );
        emitter.emit(&e).await.expect("emit");
        ids.push(e.id.to_string());
    }
    d.restart();
    let sent = wait_until("every event in a digest", TIMEOUT, || async {
        let sent = digests(&receiver).await;
        (sent.iter().map(|(_, ids)| ids.len()).sum::<usize>() >= ids.len()).then_some(sent)
    })
    .await;
    let sizes: Vec<usize> = sent.iter().map(|(_, ids)| ids.len()).collect();
    assert!(sizes.iter().all(|&n| n <= 3), "{sent:#?}");
    let listed: Vec<&String> = sent.iter().flat_map(|(_, ids)| ids).collect();
    let unique: BTreeSet<&String> = listed.iter().copied().collect();
    assert_eq!(listed.len(), unique.len(), "an event twice: {sent:#?}");
    assert_eq!(unique, ids.iter().collect(), "{sent:#?}");
}

/// Removes the records of `member` (the dispatcher stopped) that a crash
/// between its join's window entries and its own journal would lose: its
/// journal record and its mark that it joined.
fn forget_the_join(dir: &std::path::Path, member: &str) {
    use switchboard_store::{Collection, Store, Write};
    let store = Store::open(&dir.join("store")).expect("the store opens");
    let mut writes: Vec<Write> = store
        .scan_prefix(Collection::Journal, format!("acme\0{member}").as_bytes())
        .expect("the journal reads")
        .into_iter()
        .map(|(key, _)| Write {
            collection: Collection::Journal,
            key,
            value: None,
        })
        .collect();
    assert!(!writes.is_empty(), "the member has no journal record");
    let mark = format!("acme\0{member}\0daily\0joined").into_bytes();
    assert!(
        store.contains(Collection::DigestEvents, &mark).unwrap(),
        "the member has no mark"
    );
    writes.push(Write {
        collection: Collection::DigestEvents,
        key: mark,
        value: None,
    });
    store.write_atomically(&writes).expect("the removals");
}

/// A member whose join a crash half kept (the window's entry of it, not
/// its mark and journal) comes back after its window closed: it finds
/// itself gathered there instead of opening a second window, so it is in
/// one digest only, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_after_its_window_closed_is_not_gathered_again() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(Some(&nats), &config(&receiver));
    d.apply_chains("acme.toml", &digest_chain(&by_number(r#"window = "2s""#)))
        .await;
    let signed_up = |conversation: &str| {
        event(
            "acme",
            "survey",
            "signed_up",
            conversation,
            json!({ "msisdn": msisdn(0) }),
        )
    };
    let (opener, member) = (signed_up("c-0"), signed_up("c-1"));
    for e in [&opener, &member] {
        d.post_event(&serde_json::to_value(e).expect("JSON")).await;
        d.wait_for_trace("acme", &e.id.to_string(), TIMEOUT).await;
    }
    d.stop();
    forget_the_join(&d.data_dir(), &member.id.to_string());
    d.restart();
    let both = vec![opener.id.to_string(), member.id.to_string()];
    let sent = wait_until("the window's digest", TIMEOUT, || async {
        let sent = digests(&receiver).await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    assert_eq!(sent, vec![(msisdn(0), both.clone())]);

    // Delivered again, as after the crash (its ack never went).
    deliver_again(nats.url(), std::slice::from_ref(&member)).await;
    let trace = d
        .wait_for_trace("acme", &member.id.to_string(), TIMEOUT)
        .await;
    let gather = &trace["chains"][0]["steps"][0];
    assert_eq!(gather["outcome"], "stopped", "{trace:#}");
    assert_eq!(gather["output"]["joined"], both[0].as_str(), "{trace:#}");
    // A window it opened would have closed and texted by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(digests(&receiver).await, vec![(msisdn(0), both)]);
    d.stop();
    let store = switchboard_store::Store::open(&d.data_dir().join("store")).expect("the store");
    let left: Vec<String> = store
        .scan_prefix(switchboard_store::Collection::DigestEvents, b"acme\0")
        .expect("the windows read")
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Whether `store` holds nothing of acme's digest windows.
fn no_windows_left(store: &std::path::Path) {
    let store = switchboard_store::Store::open(store).expect("the store");
    for collection in [
        switchboard_store::Collection::Digests,
        switchboard_store::Collection::DigestEvents,
    ] {
        let left: Vec<String> = store
            .scan_prefix(collection, b"acme\0")
            .expect("the windows read")
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert!(left.is_empty(), "left behind in {collection:?}: {left:?}");
    }
}

/// A chain file for acme without the digest's chain.
const WITHOUT_THE_DIGEST: &str = r#"
account_key = "acme"

[[chains]]
name = "other"
conversation_type = "survey"
event_type = "opted_out"

[[chains.steps]]
handler = "log"
"#;

/// An open window whose chain is removed goes when its opener comes back:
/// by its timer, or, for a window closed only by its count, by the expiry
/// sweep (as the dispatcher starts, then now and then). The opener's run
/// stops (`removed`), no digest is sent, and neither the window nor its
/// members' entries and marks are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_chains_open_window_leaves_nothing() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    for close in [r#"window = "3s""#, "max_events = 5"] {
        let mut d = Dispatcher::with_config(None, &config(&receiver));
        d.apply_chains("acme.toml", &digest_chain(&by_number(close)))
            .await;
        let mut ids = BTreeMap::new();
        post(&d, 0, 3, 1, &mut ids).await;
        handled(&d, &ids).await;
        let opener = ids[&msisdn(0)][0].clone();
        // The chain goes while its window is open.
        d.apply_chains("acme.toml", WITHOUT_THE_DIGEST).await;
        if close.starts_with("max_events") {
            // Nothing brings a count's window back but the sweep.
            d.restart();
        }
        let trace = wait_until("the opener's run stopping", TIMEOUT, || async {
            d.trace("acme", &opener)
                .await
                .filter(|t| t["status"] != "waiting")
        })
        .await;
        assert_eq!(trace["status"], "cancelled", "{close}: {trace:#}");
        d.stop();
        assert!(digests(&receiver).await.is_empty());
        no_windows_left(&d.data_dir().join("store"));
    }
}

/// A window holds at most 1,000 events, and events that come to at most
/// 512 KiB: one with only a `window` of an hour closes early at 1,000, or
/// before an event that would take it past 512 KiB, its opener going on
/// with what it gathered, and the next event of its key opens the next
/// window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_closes_early_at_a_thousand_events_or_512_kib_of_them() {
    use switchboard_sdk::nats::NatsEmitter;

    const MOST_BYTES: usize = 512 << 10;
    let nats = NatsServer::start();
    let mut d = Dispatcher::nats(&nats);
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "daily"
conversation_type = "survey"
event_type = "signed_up"

[[chains.steps]]
name = "gather"
handler = "digest"
config = { key = "{{ event.event_data.msisdn }}", window = "1h" }

[[chains.steps]]
handler = "log"
config = { message = "gathered {{ steps.gather.count }}" }
"#,
    )
    .await;
    // A backlog, so that the events come as fast as the dispatcher takes
    // them, each series in one conversation (in order).
    d.stop();
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    let emit = async |conversation: &str, number: String, padding: &str| {
        let e = event(
            "acme",
            "survey",
            "signed_up",
            conversation,
            json!({ "msisdn": number, "padding": padding }),
        );
        emitter.emit(&e).await.expect("emit");
        (
            e.id.to_string(),
            serde_json::to_vec(&e).expect("JSON").len(),
        )
    };
    let mut small = Vec::new();
    for _ in 0..1_003 {
        small.push(emit("small", msisdn(0), "").await.0);
    }
    let padding = "x".repeat(100 * 1024);
    let mut big = Vec::new();
    for _ in 0..10 {
        big.push(emit("big", msisdn(1), &padding).await);
    }
    d.restart();

    let done = |id: String| {
        let d = &d;
        async move {
            wait_until("the opener's end", TIMEOUT, || async {
                d.trace("acme", &id).await.filter(|t| t["status"] == "done")
            })
            .await
        }
    };
    // 1,000 events: the window closed an hour early, with all of them.
    let trace = done(small[0].clone()).await;
    let gather = &trace["chains"][0]["steps"][0]["output"];
    assert_eq!(gather["count"], 1_000, "{}", trace["status"]);
    assert_eq!(gather["events"][999]["id"], small[999].as_str());
    // The next opened a window of its own, which the rest joined.
    let next = d.wait_for_trace("acme", &small[1_000], TIMEOUT).await;
    assert_eq!(next["status"], "waiting", "{next:#}");
    for (position, id) in small[1_001..].iter().enumerate() {
        let joiner = d.wait_for_trace("acme", id, TIMEOUT).await;
        let gather = &joiner["chains"][0]["steps"][0]["output"];
        assert_eq!(gather["joined"], small[1_000].as_str(), "{joiner:#}");
        assert_eq!(gather["position"], position + 2, "{joiner:#}");
    }

    // 100 KiB each: the event that would have taken the window past 512 KiB
    // closed it, and opened the next.
    let trace = done(big[0].0.clone()).await;
    let count = trace["chains"][0]["steps"][0]["output"]["count"]
        .as_u64()
        .expect("a count") as usize;
    let size = big[0].1;
    assert!(
        count < big.len() && count * size <= MOST_BYTES && (count + 1) * size > MOST_BYTES,
        "a window of {count} events of {size} bytes"
    );
    let next = d.wait_for_trace("acme", &big[count].0, TIMEOUT).await;
    assert_eq!(next["status"], "waiting", "{next:#}");
    d.stop();
}
