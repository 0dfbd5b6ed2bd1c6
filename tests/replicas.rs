//! Several dispatcher replicas on one three-node JetStream cluster, sharing
//! account configuration through the `switchboard` key-value bucket and
//! partition-owned state through the partition changelog (`bus.replicated`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt as _;
use serde_json::{Value, json};
use switchboard_sdk::nats::NatsEmitter;
use switchboard_sdk::{EventId, VumiApiEvent};

use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{Dispatcher, EventStream, NatsCluster, event, long_tests, wait_until};

fn config(receiver: &HttpReceiver) -> String {
    config_with(receiver, true, 3)
}

/// The dispatchers' config: sharing the bus or not, on streams kept on
/// `stream_replicas` servers.
fn config_with(receiver: &HttpReceiver, replicated: bool, stream_replicas: usize) -> String {
    format!(
        r#"
[bus]
replicated = {replicated}
stream_replicas = {stream_replicas}
# Redeliver what a killed replica held after 3 s instead of 30.
ack_wait_secs = 3

[limits]
concurrency = 8

[providers.sms.gateway]
type = "http"
url = "{}/sms"
from = "Switchboard"
"#,
        receiver.url()
    )
}

/// `config` (of [`config_with`], replicated) with `standbys` copies of each
/// partition besides its owner's.
fn with_standbys(config: String, standbys: u16) -> String {
    let bus = "[bus]\nreplicated = true\n";
    assert!(config.contains(bus), "{config}");
    config.replace(bus, &format!("{bus}standbys = {standbys}\n"))
}

/// `create_contact` → `payment_webhook`, and a `log` step whose message
/// names the chain version (`tag`).
fn chains(receiver: &HttpReceiver, account: &str, tag: &str) -> String {
    let recv = receiver.url();
    format!(
        r#"
account_key = "{account}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }}

[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{recv}/hook/200", secret = "gateway", body = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}", account = "{{{{ event.account_key }}}}", conversation = "{{{{ event.conversation_key }}}}", n = "{{{{ event.event_data.n }}}}" }} }}
retry = {{ max_attempts = 20, initial = "100ms", max = "1s" }}

[[chains.steps]]
handler = "log"
config = {{ message = "{tag}" }}
"#
    )
}

fn account(i: usize) -> String {
    format!("acct-{i:03}")
}

/// A chain directory with a file for each of the first `accounts`
/// accounts, its text `chain` of the account.
fn chain_dir(accounts: usize, chain: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for i in 0..accounts {
        let a = account(i);
        std::fs::write(dir.path().join(format!("{a}.toml")), chain(&a)).expect("a chain file");
    }
    dir
}

/// `n` events over `accounts` accounts and 40 conversations each, with four
/// events per number, in different conversations. `n` in the event data
/// counts up within each conversation.
fn events(n: usize, accounts: usize) -> Vec<VumiApiEvent> {
    let numbers = (n / accounts / 4).max(1);
    (0..n)
        .map(|i| {
            let nth = i / accounts;
            event(
                &account(i % accounts),
                "survey",
                "poll_complete",
                &format!("poll-{}", nth % 40),
                json!({"msisdn": format!("+2782{:07}", nth % numbers), "n": nth}),
            )
        })
        .collect()
}

/// Publishes the events, each conversation's in order (each publish waits
/// for the previous one's ack), many conversations at once.
async fn emit_all(url: &str, events: &[VumiApiEvent]) {
    let client = async_nats::connect(url).await.expect("a NATS connection");
    let emitter = NatsEmitter::new(client).with_attempts(30);
    let mut conversations: Vec<Vec<&VumiApiEvent>> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for e in events {
        let key = (e.account_key.as_str(), e.conversation_key.as_str());
        let i = *index.entry(key).or_insert_with(|| {
            conversations.push(Vec::new());
            conversations.len() - 1
        });
        conversations[i].push(e);
    }
    futures::stream::iter(conversations)
        .for_each_concurrent(64, |conversation| {
            let emitter = emitter.clone();
            async move {
                for e in conversation {
                    emitter.emit(e).await.expect("stored by the cluster");
                }
            }
        })
        .await;
}

/// One request that says which event it is for: (its stable id, account,
/// conversation, the event's `n`).
type Arrival = (String, String, String, u64);

/// A `payment_webhook` request of the chains in [`chains`] (or of another
/// chain posting the same body under `/hook/`).
fn webhook_arrival(r: &Value) -> Option<Arrival> {
    if !r["path"].as_str().is_some_and(|p| p.starts_with("/hook/")) {
        return None;
    }
    let id = r["headers"]["webhook-id"].as_str().expect("a webhook-id");
    let body: Value = serde_json::from_str(r["body"].as_str().expect("a body")).expect("JSON");
    let n = match &body["n"] {
        Value::String(s) => s.parse().expect("a number"),
        v => v.as_u64().expect("a number"),
    };
    Some((
        id.to_string(),
        body["account"].as_str().expect("an account").to_string(),
        body["conversation"]
            .as_str()
            .expect("a conversation")
            .to_string(),
        n,
    ))
}

/// Checks that each conversation's requests first arrived in the order its
/// events were published (a repeat of an id counts where it first came);
/// returns how many conversations had more than one.
fn assert_in_conversation_order(arrivals: impl IntoIterator<Item = Arrival>) -> usize {
    let mut first_seen = HashSet::new();
    let mut order: HashMap<(String, String), Vec<u64>> = HashMap::new();
    for (id, account, conversation, n) in arrivals {
        if first_seen.insert(id) {
            order.entry((account, conversation)).or_default().push(n);
        }
    }
    for ((account, conversation), ns) in &order {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{account}/{conversation}: events handled out of order: {ns:?}"
        );
    }
    order.values().filter(|ns| ns.len() > 1).count()
}

/// How many events a replica has handled, by its `/metrics`.
async fn handled_by(d: &Dispatcher, accounts: usize) -> u64 {
    let mut handled = 0;
    for i in 0..accounts {
        handled += d.metric("handled", &account(i)).await;
    }
    handled
}

/// Every contact of `account`, as a replica's API lists them.
async fn contacts(d: &Dispatcher, account: &str) -> Vec<Value> {
    let (status, body) = d
        .get(&format!("/v1/accounts/{account}/contacts?limit=10000"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["contacts"].as_array().expect("contacts").clone()
}

/// Every contact of the first `accounts` accounts, as a replica's API lists
/// them, after asserting that each account has `conversations` of them,
/// each holding `wave`'s value.
async fn contacts_of_wave(
    d: &Dispatcher,
    accounts: usize,
    conversations: usize,
    wave: u64,
) -> Vec<Value> {
    let mut every = Vec::new();
    for i in 0..accounts {
        let listed = contacts(d, &account(i)).await;
        assert_eq!(listed.len(), conversations, "{}: {listed:#?}", account(i));
        for c in &listed {
            assert_eq!(c["fields"]["wave"], wave, "{}: {c:#}", account(i));
        }
        every.extend(listed);
    }
    every
}

/// The chain version a replica's API reports as current.
async fn version_at(d: &Dispatcher, account: &str) -> Option<u64> {
    let (status, body) = d.get(&format!("/v1/accounts/{account}/chains")).await;
    (status == 200).then(|| body["version"].as_u64()).flatten()
}

/// Three replicas, one on each node of a three-node cluster, each given two
/// seed servers. A chain applied through replica 0 reaches the others within
/// a bounded delay; the replica that has handled most is killed (SIGKILL)
/// mid-run and one NATS node with it; every chain still completes once,
/// each webhook arrives under its stable id, each conversation's events are
/// handled in the order they were published, contacts stay unique per
/// (account, msisdn) although several replicas upsert the same numbers at
/// once, and a replica started afterwards catches up before it serves. The
/// default run has 600 events over 8 accounts; `SWITCHBOARD_LONG_TESTS=1`
/// runs 20,000 over 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_state_and_survive_losing_a_replica_and_a_node() {
    let (n, accounts) = if long_tests() {
        (20_000, 200)
    } else {
        (600, 8)
    };
    let mut cluster = NatsCluster::start(3).await;
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let config = config(&receiver);
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let seeds = |first: usize, second: usize| format!("{},{}", urls[first], urls[second]);
    let mut replicas: Vec<Dispatcher> = (0..3)
        .map(|i| Dispatcher::nats_url(&seeds(i, (i + 1) % 3), &config))
        .collect();

    // The shared state lives in an R3 bucket.
    let client = async_nats::connect(cluster.url(1))
        .await
        .expect("a connection to node 1");
    let js = jetstream::new(client);
    let mut bucket = js.get_stream("KV_switchboard").await.expect("the bucket");
    let info = bucket.info().await.expect("its info");
    assert_eq!(info.config.num_replicas, 3);
    assert!(info.config.allow_atomic_publish);

    // Secrets and chains set through replica 0 are used by the others.
    let first = &replicas[0];
    futures::stream::iter(0..accounts)
        .for_each_concurrent(8, |i| {
            let (receiver, a) = (&receiver, account(i));
            async move {
                first.set_secret(&a, "gateway", WEBHOOK_SECRET).await;
                let v = first
                    .apply_chains(&format!("{a}.toml"), &chains(receiver, &a, "first"))
                    .await;
                assert_eq!(v, 1);
            }
        })
        .await;
    let applied = Instant::now();
    let v2 = first
        .apply_chains("acct-000.toml", &chains(&receiver, &account(0), "second"))
        .await;
    assert_eq!(v2, 2, "versions continue across the shared history");
    let mut delays = Vec::new();
    for d in &replicas[1..] {
        wait_until(
            "the chain on every replica",
            Duration::from_secs(10),
            || async { (version_at(d, &account(0)).await == Some(v2)).then_some(()) },
        )
        .await;
        delays.push(applied.elapsed());
    }
    eprintln!("replicas: chain version {v2} seen by replicas 1 and 2 after {delays:?}");

    // Four events per number, in different conversations, so often handled
    // by different replicas at once.
    let sent = events(n, accounts);
    let started = Instant::now();
    let emitting = {
        let url = cluster.url(1);
        let sent = sent.clone();
        tokio::spawn(async move { emit_all(&url, &sent).await })
    };
    wait_until(
        "a third of the webhooks",
        Duration::from_secs(600),
        || async { (receiver.count().await >= n / 3).then_some(()) },
    )
    .await;
    // The partitions (by account) are spread over the replicas: kill the
    // busiest, and the NATS node it was first given.
    let mut handled = Vec::new();
    for d in &replicas {
        handled.push(handled_by(d, accounts).await);
    }
    let victim = (0..3).max_by_key(|i| handled[*i]).expect("three replicas");
    eprintln!("replicas: handled {handled:?} when replica {victim} and node {victim} were killed");
    replicas[victim].kill9();
    cluster.kill(victim);
    emitting.await.expect("the publisher");
    let alive: Vec<usize> = (0..3).filter(|i| *i != victim).collect();

    // Every chain completes: the trace (shared: any replica answers) says
    // done, with the version applied last.
    let d = &replicas[alive[0]];
    futures::stream::iter(&sent)
        .for_each_concurrent(16, |e| async move {
            let trace = d
                .wait_for_trace(
                    e.account_key.as_str(),
                    &e.id.to_string(),
                    Duration::from_secs(600),
                )
                .await;
            assert_eq!(trace["status"], "done", "{trace:#}");
            let version = if e.account_key.as_str() == account(0) {
                v2
            } else {
                1
            };
            assert_eq!(trace["chains"][0]["version"], version, "{trace:#}");
        })
        .await;
    let elapsed = started.elapsed();

    // Each webhook arrived under its stable id. Raw repeats are bounded by
    // the steps in flight at the kills: the killed replica's, and, while the
    // lost node's streams elect new leaders, those of every replica whose
    // journal write failed meanwhile (3 replicas × 8 workers).
    let expected: HashSet<String> = sent
        .iter()
        .map(|e| {
            let id = EventId::derived(e.id, "poll-complete", "payment_webhook", 0);
            format!("msg_{}", id.as_uuid().simple())
        })
        .collect();
    let requests = receiver.requests().await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in requests.iter().filter(|r| r["path"] == "/hook/200") {
        let id = r["headers"]["webhook-id"].as_str().expect("a webhook-id");
        *seen.entry(id.to_string()).or_default() += 1;
        assert_eq!(r["verified"], true, "signed with the shared secret: {r:#}");
    }
    let ids: HashSet<String> = seen.keys().cloned().collect();
    assert_eq!(ids, expected, "one webhook per event, no other");
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    let ordered = assert_in_conversation_order(requests.iter().filter_map(webhook_arrival));
    assert!(ordered > 0, "conversations with several events");
    let mut handled = Vec::new();
    for i in &alive {
        handled.push(handled_by(&replicas[*i], accounts).await);
    }
    eprintln!(
        "replicas: {n} events over {accounts} accounts in {:.1}s, a replica and a node killed; \
         lost 0; raw webhook repeats: {repeats}; {ordered} conversations of several events \
         each in order; the surviving replicas handled {handled:?}",
        elapsed.as_secs_f64()
    );
    assert!(
        repeats <= 3 * 8,
        "{repeats} repeats: more than the 24 steps in flight at the kills"
    );

    // Contacts are unique per (account, msisdn) across replicas.
    let numbers = (n / accounts / 4).max(1);
    for i in 0..accounts {
        let all = contacts(&replicas[alive[1]], &account(i)).await;
        let distinct: HashSet<&str> = all
            .iter()
            .map(|c| c["msisdn"].as_str().expect("an msisdn"))
            .collect();
        assert_eq!(distinct.len(), numbers, "{}", account(i));
        assert_eq!(
            all.len(),
            numbers,
            "one contact per msisdn in {}",
            account(i)
        );
    }

    // A replica started now, its first seed the dead node, catches up
    // before it serves: it sees the same contacts, traces and chains, and
    // says it is ready.
    let late = Dispatcher::nats_url(&seeds(victim, alive[0]), &config);
    let (status, ready) = late.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["caught_up"], true, "{ready}");
    assert_eq!(ready["replicated"], true, "{ready}");
    let keys = |list: &[Value]| -> HashSet<String> {
        list.iter()
            .map(|c| c["key"].as_str().expect("a key").to_string())
            .collect()
    };
    let a0 = account(0);
    assert_eq!(
        keys(&contacts(&late, &a0).await),
        keys(&contacts(&replicas[alive[1]], &a0).await)
    );
    let last = &sent[n - 1];
    let trace = late
        .trace(last.account_key.as_str(), &last.id.to_string())
        .await;
    assert_eq!(trace.expect("the trace")["status"], "done");
    assert_eq!(version_at(&late, &a0).await, Some(v2));
}

/// A chain file for `account`: one `send_sms` step whose text names the
/// event (`{account}|{conversation}|{n}`).
fn sms_chain(account: &str) -> String {
    format!(
        r#"
account_key = "{account}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "send_sms"
config = {{ provider = "gateway", to = "{{{{ event.event_data.msisdn }}}}", body = "{{{{ event.account_key }}}}|{{{{ event.conversation_key }}}}|{{{{ event.event_data.n }}}}" }}
retry = {{ max_attempts = 20, initial = "100ms", max = "1s" }}
"#
    )
}

/// A request to the SMS gateway of [`sms_chain`].
fn sms_arrival(r: &Value) -> Option<Arrival> {
    if r["path"] != "/sms" {
        return None;
    }
    let body: Value = serde_json::from_str(r["body"].as_str().expect("a body")).expect("JSON");
    let id = body["message_id"]
        .as_str()
        .expect("a message_id")
        .to_string();
    let text = body["content"].as_str().expect("the text");
    let mut parts = text.split('|');
    let mut part = || parts.next().expect("account|conversation|n").to_string();
    let (account, conversation, n) = (part(), part(), part());
    Some((id, account, conversation, n.parse().expect("a number")))
}

/// The list of partitions under `field` in a replica's `/readyz`.
async fn readyz_partitions(d: &Dispatcher, field: &str) -> Vec<u64> {
    let (_, ready) = d.get("/readyz").await;
    ready[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} in {ready}"))
        .iter()
        .map(|p| p.as_u64().expect("a partition"))
        .collect()
}

/// The partitions a replica's `/readyz` says it consumes.
async fn partitions_of(d: &Dispatcher) -> Vec<u64> {
    readyz_partitions(d, "partitions").await
}

/// The partitions whose state a replica's `/readyz` says it writes.
async fn state_partitions_of(d: &Dispatcher) -> Vec<u64> {
    readyz_partitions(d, "state_partitions").await
}

/// `a`'s share of the 16 partitions, when `a` and `b` each hold some and
/// together all.
fn shared(a: Vec<u64>, b: Vec<u64>) -> Option<Vec<u64>> {
    let mut every: Vec<u64> = a.iter().chain(&b).copied().collect();
    every.sort_unstable();
    (!a.is_empty() && !b.is_empty() && every == (0..16).collect::<Vec<u64>>()).then_some(a)
}

/// A chain file of `account` for every `poll_complete` of a `survey`:
/// `create_contact`, keeping the event's `wave` in a field, then `then`
/// (a `[[chains.steps]]` table).
fn wave_chain(account: &str, then: &str) -> String {
    format!(
        r#"
account_key = "{account}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}", fields = {{ wave = "{{{{ event.event_data.wave }}}}" }} }}
{then}"#
    )
}

/// A folder of chain files, one for each of `accounts` accounts: a wave's
/// contact, then a `log` step naming the wave.
fn wave_log_chains(accounts: usize) -> tempfile::TempDir {
    chain_dir(accounts, |a| {
        wave_chain(
            a,
            r#"
[[chains.steps]]
handler = "log"
config = { message = "wave {{ event.event_data.wave }}" }
"#,
        )
    })
}

/// A wave of events: one in each of `conversations` conversations of each
/// of `accounts` accounts, each conversation its own number, carrying
/// `wave` and `n`.
fn wave_events(accounts: usize, conversations: usize, wave: u64, n: u64) -> Vec<VumiApiEvent> {
    (0..accounts)
        .flat_map(|i| {
            (0..conversations).map(move |c| {
                event(
                    &account(i),
                    "survey",
                    "poll_complete",
                    &format!("talk-{c}"),
                    json!({"msisdn": format!("+2784{i:03}{c:04}"), "n": n, "wave": wave}),
                )
            })
        })
        .collect()
}

/// Waits until `d` reads each of `events` as done, each within `within`.
async fn all_done(d: &Dispatcher, events: &[VumiApiEvent], within: Duration) {
    for e in events {
        let trace = d
            .wait_for_trace(e.account_key.as_str(), &e.id.to_string(), within)
            .await;
        assert_eq!(trace["status"], "done", "{trace:#}");
    }
}

/// Replicas joining and leaving (SIGTERM) while events flow hand their
/// partitions over without losing, repeating or reordering anything. The
/// stream was used by a single dispatcher first: the replicas partition it,
/// start after what that dispatcher acked (so it is not handled twice), and
/// handle the events stored meanwhile under unpartitioned subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_joining_and_leaving_keep_every_conversation_in_order() {
    let nats = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let (accounts, conversations, per_conversation) = (16, 64, 10);
    let chains = chain_dir(accounts, sms_chain);
    // Event `n` of conversation `c`.
    let all: Vec<Vec<VumiApiEvent>> = (0..conversations)
        .map(|c| {
            (0..per_conversation)
                .map(|n| {
                    event(
                        &account(c % accounts),
                        "survey",
                        "poll_complete",
                        &format!("talk-{c}"),
                        json!({"msisdn": format!("+2783{c:07}"), "n": n}),
                    )
                })
                .collect()
        })
        .collect();
    let wave = |ns: std::ops::Range<usize>| -> Vec<VumiApiEvent> {
        all.iter().flat_map(|c| c[ns.clone()].to_vec()).collect()
    };

    // A single dispatcher, not sharing the bus, handles the first events.
    let mut single = Dispatcher::nats_url_with_chains(
        nats.url(),
        &config_with(&receiver, false, 1),
        chains.path(),
    );
    let first = wave(0..2);
    emit_all(nats.url(), &first).await;
    all_done(&single, &first, Duration::from_secs(60)).await;
    assert_eq!(single.stop(), Some(0));
    // Stored while no dispatcher runs, under the subjects as published.
    emit_all(nats.url(), &wave(2..3)).await;

    // Two replicas start; the rest is published at a steady pace, each
    // conversation in order, while a third replica joins and then one of
    // the first two leaves.
    let config = config_with(&receiver, true, 1);
    let replica = || Dispatcher::nats_url_with_chains(nats.url(), &config, chains.path());
    let a = replica();
    let mut b = replica();
    let client = async_nats::connect(nats.url())
        .await
        .expect("a NATS connection");
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream");
    let info = stream.info().await.expect("its info");
    let transform = info.config.subject_transform.clone().expect("partitioned");
    assert_eq!(transform.source, "vumi.events.*.*.*");
    let emitting = {
        let url = nats.url().to_string();
        let all = all.clone();
        tokio::spawn(async move {
            let client = async_nats::connect(url).await.expect("a NATS connection");
            let emitter = NatsEmitter::new(client).with_attempts(30);
            futures::stream::iter(all)
                .for_each_concurrent(None, |conversation| {
                    let emitter = emitter.clone();
                    async move {
                        for e in &conversation[3..] {
                            emitter.emit(e).await.expect("stored");
                            tokio::time::sleep(Duration::from_millis(1_200)).await;
                        }
                    }
                })
                .await;
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = tokio::task::block_in_place(replica);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(tokio::task::block_in_place(|| b.stop()), Some(0));
    emitting.await.expect("the publisher");

    // Every event is handled once, each conversation in order.
    futures::stream::iter(wave(2..per_conversation))
        .for_each_concurrent(16, |e| {
            let a = &a;
            async move {
                let trace = a
                    .wait_for_trace(
                        e.account_key.as_str(),
                        &e.id.to_string(),
                        Duration::from_secs(120),
                    )
                    .await;
                assert_eq!(trace["status"], "done", "{trace:#}");
            }
        })
        .await;
    let arrivals: Vec<Arrival> = receiver
        .requests()
        .await
        .iter()
        .filter_map(sms_arrival)
        .collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (id, ..) in &arrivals {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let expected: HashSet<String> = all
        .iter()
        .flatten()
        .map(|e| EventId::derived(e.id, "poll-complete", "send_sms", 0).to_string())
        .collect();
    let ids: HashSet<String> = seen.keys().map(|id| id.to_string()).collect();
    assert_eq!(ids, expected, "one SMS per event, no other");
    let repeats: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeats.is_empty(),
        "graceful hand-overs repeat nothing: {repeats:?}"
    );
    assert_eq!(assert_in_conversation_order(arrivals), conversations);

    // The two replicas left share the partitions between them.
    let (pa, pc) = wait_until(
        "the partitions shared by the replicas left",
        Duration::from_secs(20),
        || async {
            let (pa, pc) = (partitions_of(&a).await, partitions_of(&c).await);
            let mut every: Vec<u64> = pa.iter().chain(&pc).copied().collect();
            every.sort_unstable();
            (every == (0..16).collect::<Vec<u64>>()).then_some((pa, pc))
        },
    )
    .await;
    eprintln!("replicas: after the join and the leave, partitions {pa:?} and {pc:?}");

    // The admin's health page on `a` lists both live replicas with the
    // partitions each handles, as their own `/readyz` say.
    let http = crate::console::plain_client();
    let session = crate::console::sign_in(&http, a.url(), crate::util::ADMIN_TOKEN).await;
    let rows = wait_until(
        "the health page showing both replicas' partitions",
        Duration::from_secs(20),
        || async {
            let html = http
                .get(format!("{}/console/health", a.url()))
                .header(reqwest::header::COOKIE, format!("sb_session={session}"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let rows = replica_rows(&html);
            let mine: Vec<_> = rows.iter().filter(|r| r.0).collect();
            (rows.len() == 2
                && mine.len() == 1
                && mine[0].1 == pa
                && rows.iter().any(|r| r.1 == pc))
            .then_some(rows)
        },
    )
    .await;
    eprintln!("replicas: the health page shows {rows:?}");

    // The session works on the other replica too, and signing out on one
    // ends it on both.
    let page = |replica: &Dispatcher, path: &'static str| {
        let (http, cookie) = (&http, format!("sb_session={session}"));
        let url = format!("{}{path}", replica.url());
        async move {
            http.get(url)
                .header(reqwest::header::COOKIE, cookie)
                .send()
                .await
                .expect("the console answers")
        }
    };
    assert_eq!(page(&c, "/console").await.status(), 200);
    let html = page(&a, "/console").await.text().await.expect("a page");
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the sign-out form's token")
        .to_string();
    let out = http
        .post(format!("{}/console/sign-out", a.url()))
        .header(reqwest::header::COOKIE, format!("sb_session={session}"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("the console answers");
    assert_eq!(out.status(), 303);
    assert_eq!(page(&a, "/console").await.status(), 303);
    wait_until(
        "the session ended on the other replica",
        Duration::from_secs(20),
        || async { (page(&c, "/console").await.status() == 303).then_some(()) },
    )
    .await;
}

/// The replica rows of the console's health page: whether the row is the
/// page's own replica, and the partitions it lists.
fn replica_rows(html: &str) -> Vec<(bool, Vec<u64>)> {
    html.split("<tr id=\"replica-")
        .skip(1)
        .map(|row| {
            let row = row.split("</tr>").next().unwrap_or_default();
            let partitions = row
                .split("<td class=\"partitions\">")
                .nth(1)
                .and_then(|p| p.split("</td>").next())
                .unwrap_or_default()
                .split(", ")
                .filter_map(|p| p.trim().parse().ok())
                .collect();
            (row.contains("(this one)"), partitions)
        })
        .collect()
}

/// Two replicas applying chains for one account at the same moment never
/// take the same version number: the history holds every apply once, and
/// the current chains are the last version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_on_two_replicas_number_every_version_once() {
    let cluster = NatsCluster::start(3).await;
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let config = config(&receiver);
    let replicas: Vec<Dispatcher> = (0..2)
        .map(|i| Dispatcher::nats_url(&cluster.url(i), &config))
        .collect();
    let a = account(0);
    replicas[0].set_secret(&a, "gateway", WEBHOOK_SECRET).await;
    // The chains name the secret: both replicas must see it to apply them.
    wait_until(
        "the secret on the second replica",
        Duration::from_secs(10),
        || async {
            let (_, listed) = replicas[1].get(&format!("/v1/accounts/{a}/secrets")).await;
            (listed["secrets"] == json!(["gateway"])).then_some(())
        },
    )
    .await;
    let applies = 12;
    futures::stream::iter(0..2 * applies)
        .for_each_concurrent(4, |i| {
            let (d, a, receiver) = (&replicas[i % 2], &a, &receiver);
            async move {
                d.apply_chains(
                    &format!("{a}-{i}.toml"),
                    &chains(receiver, a, &format!("apply {i}")),
                )
                .await;
            }
        })
        .await;
    let (status, history) = replicas[1]
        .get(&format!("/v1/accounts/{a}/chain-versions"))
        .await;
    assert_eq!(status, 200, "{history}");
    let mut versions: Vec<u64> = history["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["version"].as_u64().expect("a number"))
        .collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=2 * applies as u64).collect::<Vec<_>>(),
        "{history:#}"
    );
    for d in &replicas {
        wait_until(
            "the last version everywhere",
            Duration::from_secs(10),
            || async { (version_at(d, &a).await == Some(2 * applies as u64)).then_some(()) },
        )
        .await;
    }

    // Merges at the same moment: each is made against the last version,
    // made again when another replica took its number, so none is lost.
    let merges = 6;
    futures::stream::iter(0..2 * merges)
        .for_each_concurrent(4, |i| {
            let (d, a) = (&replicas[i % 2], &a);
            async move {
                let file = d.file(
                    &format!("{a}-merge-{i}.toml"),
                    &format!(
                        "account_key = \"{a}\"\n[[chains]]\nname = \"m-{i}\"\nevent_type = \"m_{i}\"\nsteps = [{{ handler = \"log\" }}]\n"
                    ),
                );
                d.cli(&["chains", "apply", "--merge", file.to_str().expect("a UTF-8 path")])
                    .await
                    .ok();
            }
        })
        .await;
    let mut expected: Vec<String> = (0..2 * merges).map(|i| format!("m-{i}")).collect();
    expected.push("poll-complete".into());
    expected.sort();
    for d in &replicas {
        wait_until(
            "every merged chain everywhere",
            Duration::from_secs(10),
            || async {
                let (_, current) = d.get(&format!("/v1/accounts/{a}/chains")).await;
                let mut names: Vec<String> = current["chains"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["name"].as_str().map(str::to_string))
                    .collect();
                names.sort();
                (names == expected).then_some(())
            },
        )
        .await;
    }
}

/// A replicated store over `nats`, its local copy in `path`.
async fn replicated_store(
    nats: &crate::util::NatsServer,
    path: &std::path::Path,
) -> switchboard_store::Store {
    let url = nats.url().to_string();
    switchboard_store::Store::replicated(
        path,
        async_nats::ConnectOptions::new(),
        vec![url],
        switchboard_store::Replication::new(1, 16, switchboard_store::Copies::Every),
    )
    .await
    .expect("a replicated store")
}

/// Two replicated stores over `nats` in `dir`, `a` holding the partition of
/// account `acme` (so `b`'s writes to it are forwarded to `a`).
async fn two_stores_a_holding_acme(
    nats: &crate::util::NatsServer,
    dir: &std::path::Path,
) -> (switchboard_store::Store, switchboard_store::Store) {
    let a = replicated_store(nats, &dir.join("a")).await;
    let b = replicated_store(nats, &dir.join("b")).await;
    a.take_partition(switchboard_store::partition_of_account(b"acme", 16))
        .await
        .expect("replica a takes acme's partition");
    (a, b)
}

/// An event's writes are made under the term its partition was held under
/// when it began. Once that term ended (handed over, or fenced while the
/// replica was paused), its writes are refused and its flush fails, also
/// after this replica took the partition again under a new term: what the
/// event holds in memory may include writes the changelog refused, and it
/// must be handled again from what is durable. An event begun under the
/// new term writes as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_writes_under_a_term_that_ended_are_refused_after_a_new_term_began() {
    use switchboard_store::{Collection, StoreError, partition_of_account};

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = replicated_store(&nats, &dir.path().join("a")).await;
    let partition = partition_of_account(b"acme", 16);
    store
        .take_partition(partition)
        .await
        .expect("the partition is taken");
    let first = store.handling_events().under(&store.holding(b"acme"));
    first
        .put(Collection::Contacts, b"acme\0c1", b"first")
        .expect("a write under the current term");
    first.flush().await.expect("durable under the current term");

    store.release_partition(partition);
    store
        .take_partition(partition)
        .await
        .expect("the partition is taken again");
    let refused = first.put(Collection::Contacts, b"acme\0c2", b"late");
    assert!(
        matches!(refused, Err(StoreError::PartitionMoved { partition: p }) if p == partition),
        "{refused:?}"
    );
    let flushed = first.flush().await;
    assert!(
        matches!(flushed, Err(StoreError::PartitionMoved { .. })),
        "{flushed:?}"
    );

    let second = store.handling_events().under(&store.holding(b"acme"));
    second
        .put(Collection::Contacts, b"acme\0c3", b"second")
        .expect("a write under the new term");
    second.flush().await.expect("durable under the new term");
    assert_eq!(
        store
            .get(Collection::Contacts, b"acme\0c1")
            .expect("a read"),
        Some(b"first".to_vec())
    );
    assert_eq!(
        store
            .get(Collection::Contacts, b"acme\0c2")
            .expect("a read"),
        None
    );

    // A replica that follows the changelog has the writes made under a
    // current term, and not the refused one.
    let other = replicated_store(&nats, &dir.path().join("b")).await;
    other.caught_up().await;
    for (key, value) in [
        (&b"acme\0c1"[..], Some(b"first".to_vec())),
        (b"acme\0c2", None),
        (b"acme\0c3", Some(b"second".to_vec())),
    ] {
        assert_eq!(
            other.get(Collection::Contacts, key).expect("a read"),
            value,
            "{}",
            String::from_utf8_lossy(key)
        );
    }
}

/// A replica that takes a partition again after its term ended rebuilds
/// its copy from the changelog, and changes only what differs from it:
/// those watching the store (the inbox streams) see each change another
/// owner made meanwhile once, and nothing of the records the copy already
/// had as the changelog has them. (The rebuild once cleared the partition
/// and wrote it again: a stream on that replica saw every notification
/// removed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_partition_leaves_what_the_changelog_holds_alone() {
    use switchboard_store::{Collection, partition_of_account};

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let a = replicated_store(&nats, &dir.path().join("a")).await;
    let b = replicated_store(&nats, &dir.path().join("b")).await;
    let partition = partition_of_account(b"acme", 16);
    let key = |k: &str| format!("acme\0ann\0{k}").into_bytes();
    a.take_partition(partition)
        .await
        .expect("a takes the partition");
    let writes = a.handling_events().under(&a.holding(b"acme"));
    for (k, value) in [("k1", "one"), ("k2", "two"), ("k5", "five")] {
        writes
            .put(Collection::Inbox, &key(k), value.as_bytes())
            .expect("a write under a's term");
    }
    writes.flush().await.expect("durable");
    a.release_partition(partition);

    // Another owner changes two records and adds one meanwhile.
    let mut watched = a.watch(Collection::Inbox);
    b.take_partition(partition)
        .await
        .expect("b takes the partition");
    let writes = b.handling_events().under(&b.holding(b"acme"));
    writes
        .put(Collection::Inbox, &key("k2"), b"two again")
        .expect("b's update");
    writes
        .remove(Collection::Inbox, &key("k1"))
        .expect("b's removal");
    writes
        .put(Collection::Inbox, &key("k4"), b"four")
        .expect("b's new record");
    writes.flush().await.expect("durable");
    b.release_partition(partition);

    a.take_partition(partition)
        .await
        .expect("a takes the partition again, rebuilt");
    a.handling_events()
        .under(&a.holding(b"acme"))
        .put(Collection::Inbox, &key("k3"), b"three")
        .expect("a write under a's new term");
    // Everything the rebuild did reaches a watcher before this write.
    let mut seen = Vec::new();
    loop {
        let w = tokio::time::timeout(Duration::from_secs(10), watched.recv())
            .await
            .expect("the write after the rebuild is watched")
            .expect("a change");
        let k = String::from_utf8_lossy(&w.key).replace('\0', "/");
        let value = w.value.map(|v| String::from_utf8_lossy(&v).into_owned());
        if k == "acme/ann/k3" {
            break;
        }
        seen.push((k, value));
    }
    assert_eq!(
        seen,
        vec![
            ("acme/ann/k2".to_string(), Some("two again".to_string())),
            ("acme/ann/k1".to_string(), None),
            ("acme/ann/k4".to_string(), Some("four".to_string())),
        ],
        "b's changes, each once (by a's follower or its rebuild), and nothing else"
    );
    for (k, value) in [
        ("k1", None),
        ("k2", Some(&b"two again"[..])),
        ("k4", Some(b"four")),
        ("k5", Some(b"five")),
    ] {
        assert_eq!(
            a.get(Collection::Inbox, &key(k))
                .expect("a read")
                .as_deref(),
            value,
            "{k}"
        );
    }
}

/// A replica that keeps no copy of a partition (`bus.standbys`) reads it
/// at the owner: a get, a scan and a fresh read answer what the owner
/// wrote, and the local copy holds none of it. Kept again, the partition
/// is read whole from the changelog and answered here (with its owner
/// gone); dropped, its copy is emptied; taken while not copied, it is read
/// whole first, and the owner's latest writes are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_a_copy_reads_at_the_owner_and_copies_a_partition_kept_anew() {
    use switchboard_store::{Collection, partition_of_account};

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b) = two_stores_a_holding_acme(&nats, dir.path()).await;
    let partition = partition_of_account(b"acme", 16);
    b.keep_copies(Some(&[]));
    assert!(!b.copies_partition(partition));
    assert!(a.copies_partition(partition), "the owner reads its own");
    let key = |k: &str| format!("acme\0{k}").into_bytes();
    for (k, v) in [("ann", "1"), ("bob", "2"), ("cat", "3")] {
        a.put(Collection::Contacts, &key(k), v.as_bytes())
            .expect("the owner's write");
    }
    a.flush().await.expect("durable");
    let value = |s: &switchboard_store::Store, k: &str| {
        s.get(Collection::Contacts, &key(k))
            .expect("a read")
            .map(|v| String::from_utf8(v).expect("text"))
    };
    assert_eq!(value(&b, "bob").as_deref(), Some("2"), "read at the owner");
    assert_eq!(value(&b, "dan"), None);
    assert!(
        b.contains(Collection::Contacts, &key("cat"))
            .expect("a read")
    );
    let scanned = b
        .scan_prefix_rev(Collection::Contacts, b"acme\0", 2)
        .expect("a scan at the owner");
    assert_eq!(
        scanned,
        vec![(key("cat"), b"3".to_vec()), (key("bob"), b"2".to_vec())]
    );
    assert_eq!(
        b.get_latest(Collection::Contacts, &key("ann"))
            .expect("a fresh read")
            .as_deref(),
        Some(&b"1"[..])
    );
    // A write through b goes to the owner as before.
    b.put(Collection::Contacts, &key("dan"), b"4")
        .expect("a forwarded write");
    assert_eq!(value(&a, "dan").as_deref(), Some("4"));
    // Longer reads come in pages (of 256), whole and in order.
    let many: Vec<Vec<u8>> = (0..600)
        .map(|i| format!("acme\0m{i:04}").into_bytes())
        .collect();
    for k in &many {
        a.put(Collection::Inbox, k, b"x")
            .expect("the owner's write");
    }
    a.flush().await.expect("durable");
    let keys = |entries: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<Vec<u8>> {
        entries.into_iter().map(|(k, _)| k).collect()
    };
    assert_eq!(
        keys(
            b.scan_prefix(Collection::Inbox, b"acme\0")
                .expect("a scan in pages")
        ),
        many
    );
    let newest: Vec<Vec<u8>> = many.iter().rev().take(300).cloned().collect();
    assert_eq!(
        keys(
            b.scan_prefix_rev(Collection::Inbox, b"acme\0", 300)
                .expect("a reverse scan in pages")
        ),
        newest
    );
    assert_eq!(
        keys(
            b.scan_prefix_from(Collection::Inbox, b"acme\0", &many[100], 280)
                .expect("a page from a key")
        ),
        many[100..380].to_vec()
    );
    for k in &many {
        a.remove(Collection::Inbox, k).expect("the owner's removal");
    }
    a.flush().await.expect("durable");
    // Nothing of the partition is in b's own copy: a scan across accounts
    // reads only the local copy.
    assert_eq!(
        b.scan_prefix(Collection::Contacts, b"")
            .expect("a local scan"),
        vec![],
        "b's copy holds none of the partition's records"
    );
    // A walk of the whole collection (a sweep's) reads the local copy too,
    // wherever its cursor is.
    assert_eq!(
        b.scan_from(Collection::Contacts, &key("bob"), 10)
            .expect("a local walk"),
        vec![]
    );

    b.keep_copies(Some(&[partition]));
    wait_until(
        "b reading the partition whole",
        Duration::from_secs(30),
        || async { b.copies_partition(partition).then_some(()) },
    )
    .await;
    assert_eq!(
        b.scan_prefix(Collection::Contacts, b"")
            .expect("a local scan")
            .len(),
        4
    );
    a.put(Collection::Contacts, &key("eve"), b"5")
        .expect("the owner's write");
    a.flush().await.expect("durable");
    wait_until(
        "b following the owner's write",
        Duration::from_secs(30),
        || async {
            (b.scan_prefix(Collection::Contacts, b"")
                .expect("a local scan")
                .len()
                == 5)
                .then_some(())
        },
    )
    .await;

    b.keep_copies(Some(&[]));
    assert!(!b.copies_partition(partition));
    wait_until("b emptying its copy", Duration::from_secs(30), || async {
        b.scan_prefix(Collection::Contacts, b"")
            .expect("a local scan")
            .is_empty()
            .then_some(())
    })
    .await;
    a.put(Collection::Contacts, &key("ann"), b"1 again")
        .expect("the owner's write");
    a.flush().await.expect("durable");
    a.release_partition(partition);
    drop(a);

    b.take_partition(partition)
        .await
        .expect("b takes the partition it kept no copy of");
    assert!(b.copies_partition(partition));
    let all = b
        .scan_prefix(Collection::Contacts, b"acme\0")
        .expect("a local read");
    let all: Vec<(String, String)> = all
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k[5..]).into_owned(),
                String::from_utf8(v).expect("text"),
            )
        })
        .collect();
    let expected = [
        ("ann", "1 again"),
        ("bob", "2"),
        ("cat", "3"),
        ("dan", "4"),
        ("eve", "5"),
    ];
    assert_eq!(
        all,
        expected
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .to_vec()
    );
}

/// A forwarded write that its sender had no answer for in time (the
/// owner's commit waiting through a leader election, say) is sent again
/// with the same id. The owner answers it with the first sending's answer
/// instead of applying it again: a compare-and-swap applied twice would
/// answer "expectation failed" for a write that went in. The same write
/// under another id is a new write, and its expectation fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_sent_again_gets_its_first_answer() {
    use switchboard_store::forward::{self, Answer};
    use switchboard_store::{Collection, Write, partition_of_account};

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, _b) = two_stores_a_holding_acme(&nats, dir.path()).await;
    let partition = partition_of_account(b"acme", 16);
    let client = async_nats::connect(nats.url()).await.expect("a client");
    // Create c1 as "first", expecting it absent.
    let request = forward::encode(
        &[Write {
            collection: Collection::Contacts,
            key: b"acme\0c1".to_vec(),
            value: Some(b"first".to_vec()),
        }],
        &[(0, None)],
    );
    let send = |id: Option<&'static str>| {
        let client = client.clone();
        let request = request.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = id {
                headers.insert(forward::ID_HEADER, id);
            }
            // The owner's subscription may reach the server a moment
            // after the partition is taken.
            for _ in 0..50 {
                match client
                    .request_with_headers(
                        forward::subject(partition),
                        headers.clone(),
                        request.clone(),
                    )
                    .await
                {
                    Ok(reply) => return Answer::decode(&reply.payload),
                    Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("the owner does not answer: {e}"),
                }
            }
            panic!("no owner takes the partition's writes");
        }
    };

    assert_eq!(
        send(Some("write-1")).await,
        Answer::Written(true),
        "the first sending"
    );
    assert_eq!(
        send(Some("write-1")).await,
        Answer::Written(true),
        "sent again, the write has its first answer"
    );
    assert_eq!(
        send(Some("write-2")).await,
        Answer::Written(false),
        "another write expecting c1 absent finds it"
    );
    assert_eq!(
        send(None).await,
        Answer::Written(false),
        "a sender without ids (an older build) has every sending applied"
    );
    assert_eq!(
        a.get(Collection::Contacts, b"acme\0c1")
            .expect("a read")
            .as_deref(),
        Some(&b"first"[..])
    );
}

/// A sender that has no answer in time sends the write again with the same
/// id, and takes the answer to a later sending; an answer that the outcome
/// is unknown (the owner applied the write, its commit failed) ends the
/// write at once, saying so. The owner here is this test, answering by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_with_no_answer_is_sent_again_with_its_id() {
    use futures::StreamExt as _;
    use switchboard_store::forward::{self, Answer};
    use switchboard_store::{Collection, partition_of_account};

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sender = replicated_store(&nats, &dir.path().join("b")).await;
    let partition = partition_of_account(b"acme", 16);
    let client = async_nats::connect(nats.url()).await.expect("a client");
    let mut owner = client
        .queue_subscribe(forward::subject(partition), "owner".into())
        .await
        .expect("subscribing as the owner");
    client.flush().await.expect("the subscription is sent");
    let next = async |owner: &mut async_nats::Subscriber| {
        let request = tokio::time::timeout(crate::util::TIMEOUT, owner.next())
            .await
            .expect("a sending in time")
            .expect("the subscription is open");
        let id = request
            .headers
            .as_ref()
            .and_then(|h| h.get(forward::ID_HEADER))
            .map(|id| id.as_str().to_string())
            .expect("a sending names its write");
        (id, request.reply.expect("a request"))
    };

    let store = sender.clone();
    let write =
        tokio::task::spawn_blocking(move || store.put(Collection::Contacts, b"acme\0c1", b"v"));
    let (first, _) = next(&mut owner).await;
    let (again, reply) = next(&mut owner).await;
    assert_eq!(again, first, "sent again under the same id");
    client
        .publish(reply, Answer::Written(true).encode())
        .await
        .expect("answering");
    write
        .await
        .expect("the write's thread")
        .expect("the later sending's answer is the write's");

    let store = sender.clone();
    let write =
        tokio::task::spawn_blocking(move || store.put(Collection::Contacts, b"acme\0c2", b"v"));
    let (second, reply) = next(&mut owner).await;
    assert_ne!(second, first, "another write, another id");
    client
        .publish(
            reply,
            Answer::Unknown("the changelog did not answer".into()).encode(),
        )
        .await
        .expect("answering");
    let error = write
        .await
        .expect("the write's thread")
        .expect_err("an unknown outcome fails the write")
        .to_string();
    assert!(
        error.contains("the changelog did not answer")
            && error.contains("may or may not be stored"),
        "{error}"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(1), owner.next())
            .await
            .is_err(),
        "an unknown outcome is not sent again"
    );
}

/// Two replicas' stores upserting the same numbers at the same moment make
/// one contact per number: the account's partition is held by one of them,
/// which decides every compare-and-swap on its own copy; the other's writes
/// are forwarded to it. A third replica, following the changelog, sees the
/// result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_upserting_the_same_numbers_make_one_contact_each() {
    use switchboard_handlers::records::{ContactUpsert, Contacts};
    use switchboard_state::StoredContacts;
    use switchboard_store::Store;

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b) = two_stores_a_holding_acme(&nats, dir.path()).await;
    let acme = switchboard_sdk::AccountKey::new("acme").expect("an account key");
    let numbers = 200;
    let upsert_all = |store: Store, tag: &'static str| {
        let acme = acme.clone();
        tokio::task::spawn_blocking(move || {
            let contacts = StoredContacts::new(store);
            for i in 0..numbers {
                let mut fields = serde_json::Map::new();
                fields.insert(tag.into(), json!(i));
                contacts
                    .upsert(
                        &acme,
                        ContactUpsert {
                            msisdn: Some(format!("+2782{i:07}")),
                            email: None,
                            name: None,
                            language: None,
                            fields,
                            by: None,
                        },
                    )
                    .expect("an upsert");
            }
        })
    };
    let (first, second) = (upsert_all(a.clone(), "a"), upsert_all(b, "b"));
    first.await.expect("replica a");
    second.await.expect("replica b");
    a.flush().await.expect("replica a's writes are durable");

    // A third replica, caught up, sees one contact per number, with both
    // replicas' fields.
    let c = replicated_store(&nats, &dir.path().join("c")).await;
    c.caught_up().await;
    let all = StoredContacts::new(c)
        .list(&acme, 10_000)
        .expect("the contacts");
    let distinct: HashSet<&str> = all
        .iter()
        .map(|c| c.msisdn.as_deref().expect("an msisdn"))
        .collect();
    assert_eq!(distinct.len(), numbers);
    assert_eq!(all.len(), numbers, "one contact per number");
    assert!(
        all.iter()
            .all(|c| c.fields.contains_key("a") && c.fields.contains_key("b")),
        "no replica's update was lost"
    );
}

/// Removing an expired record (a journal entry) leaves a removal marker in
/// the changelog that the stream drops after a day, so that markers do not
/// pile up and every start does not replay them; a contact's marker has no
/// time to live (the partition's owner purges it once unneeded: see
/// `changelog::removed_records_leave_the_changelog_for_good`); removing a
/// chain keeps its marker in the bucket, so that a replica that was cut off
/// for longer still learns of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_delete_markers_expire_and_others_stay() {
    use base64::Engine as _;
    use switchboard_store::{Collection, MARKER_TTL, partition_of_account};

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = replicated_store(&nats, &dir.path().join("replica")).await;
    let partition = partition_of_account(b"acme", 16);
    store
        .take_partition(partition)
        .await
        .expect("the partition of acme");
    let writes = store.clone();
    tokio::task::spawn_blocking(move || {
        for c in [
            Collection::Journal,
            Collection::Contacts,
            Collection::Chains,
        ] {
            writes.put(c, b"acme\0key", b"value").expect("a put");
            writes.remove(c, b"acme\0key").expect("a removal");
        }
    })
    .await
    .expect("the writes");
    store.flush().await.expect("the changelog has them");

    let client = async_nats::connect(nats.url()).await.expect("a connection");
    let js = jetstream::new(client);
    let last = |stream: String, subject: String| {
        let js = js.clone();
        async move {
            let stream = js.get_stream(&stream).await.expect("the stream");
            stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .unwrap_or_else(|e| panic!("the last message on {subject}: {e}"))
                .headers
        }
    };
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"acme\0key");
    for collection in ["event_journal", "contacts"] {
        let marker = last(
            switchboard_store::changelog::STREAM.to_string(),
            format!("switchboard.changelog.{partition}.w.{collection}.{key}"),
        )
        .await;
        assert_eq!(
            marker.get("Switchboard-Op").map(|v| v.as_str()),
            Some("del"),
            "{collection}: {marker:?}"
        );
        let ttl = (collection == "event_journal").then(|| MARKER_TTL.as_secs().to_string());
        assert_eq!(
            marker.get("Nats-TTL").map(|v| v.as_str().to_string()),
            ttl,
            "{collection}"
        );
    }
    let chains = last(
        format!("KV_{}", switchboard_store::BUCKET),
        format!("$KV.{}.chains.{key}", switchboard_store::BUCKET),
    )
    .await;
    assert_eq!(
        chains.get("KV-Operation").map(|v| v.as_str()),
        Some("DEL"),
        "{chains:?}"
    );
    assert_eq!(chains.get("Nats-TTL"), None);
}

/// A changelog record that does not decode (written by hand into the
/// stream) is logged with its subject, counted on `/metrics`, and passed
/// over by every replica that reads it: one that follows the partition
/// (here a replica started afterwards, which reads the whole changelog),
/// and, for a record in a term marker's place, one that holds the
/// partition too (an owner does not read its partition's writes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_changelog_record_is_counted_and_passed_over() {
    let nats = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let config = config_with(&receiver, true, 1);
    let first = Dispatcher::nats_url(nats.url(), &config);
    async fn undecodable(d: &Dispatcher) -> u64 {
        let (status, body) = d.get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics");
        body.as_str()
            .expect("metrics are text")
            .lines()
            .find_map(|l| l.strip_prefix("switchboard_changelog_undecodable_records_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .expect("the counter is exported")
    }
    assert_eq!(undecodable(&first).await, 0);

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("a connection"));
    for subject in [
        "switchboard.changelog.3.w.no_such_collection.AAAA",
        "switchboard.changelog.x.epoch",
    ] {
        js.publish(subject, "junk".into())
            .await
            .expect("published")
            .await
            .expect("stored");
    }
    wait_until(
        "the marker-like record counted",
        Duration::from_secs(10),
        || async { (undecodable(&first).await >= 1).then_some(()) },
    )
    .await;
    assert!(
        first.log().contains("switchboard.changelog.x.epoch"),
        "{}",
        first.log()
    );

    let second = Dispatcher::nats_url(nats.url(), &config);
    wait_until("both records counted", Duration::from_secs(20), || async {
        (undecodable(&second).await == 2).then_some(())
    })
    .await;
    let log = second.log();
    assert!(
        log.contains("an undecodable changelog record was skipped")
            && log.contains("switchboard.changelog.3.w.no_such_collection.AAAA")
            && log.contains("switchboard.changelog.x.epoch"),
        "{log}"
    );
}

/// An owner does not read its own writes back from the changelog; once it
/// hands partitions over, it reads the new owner's writes of them. `a`
/// holds every partition and handles a first wave; `b` joins and takes a
/// share; a second wave over the same numbers is handled by both. Then
/// every event is done and every contact holds the second wave's value as
/// either replica reads it, so `a` applied `b`'s writes of the partitions
/// it gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_handed_partitions_over_reads_the_new_owners_writes() {
    let nats = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let (accounts, conversations) = (8, 3);
    let dir = wave_log_chains(accounts);
    let within = Duration::from_secs(60);
    let config = config_with(&receiver, true, 1);
    let a = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    let every: Vec<u64> = (0..16).collect();
    wait_until(
        "a holding every partition's state",
        Duration::from_secs(60),
        || async { (state_partitions_of(&a).await == every).then_some(()) },
    )
    .await;
    let first = wave_events(accounts, conversations, 1, 1);
    emit_all(nats.url(), &first).await;
    all_done(&a, &first, within).await;

    let b = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    wait_until(
        "the replicas sharing the partitions",
        Duration::from_secs(60),
        || async { shared(partitions_of(&a).await, partitions_of(&b).await) },
    )
    .await;
    let second = wave_events(accounts, conversations, 2, 2);
    emit_all(nats.url(), &second).await;
    for d in [&a, &b] {
        all_done(d, &[first.as_slice(), second.as_slice()].concat(), within).await;
        contacts_of_wave(d, accounts, conversations, 2).await;
    }
}

/// Two replicas that keep no standby copies (`bus.standbys = 0`): each
/// copies only the partitions it owns, and each one's API reads every
/// account's contacts (those of the other's partitions at their owner).
/// When one is killed, the other takes its partitions, which it never
/// copied, reads them whole from the changelog, and handles the next wave
/// over the same contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_without_standbys_read_at_the_owner_and_take_over_from_the_changelog() {
    read_everywhere_then_lose_a_replica(2, 0).await;
}

/// Three replicas with one standby copy of each partition: each replica
/// reads the third of the partitions it does not copy at their owners;
/// when one is killed, each of its partitions goes to the replica that
/// kept its standby copy, and the other survivor, which now copies every
/// partition, reads the ones it lacked whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_one_standby_read_at_the_owner_and_take_over_from_the_standby() {
    read_everywhere_then_lose_a_replica(3, 1).await;
}

/// `replicas` dispatchers keeping `standbys` standby copies of each
/// partition: every replica's API reads every account's contacts after a
/// first wave; once the last replica is killed (SIGKILL), the others take
/// its partitions and a second wave updates the same contacts, as every
/// survivor reads them.
async fn read_everywhere_then_lose_a_replica(replicas: usize, standbys: u16) {
    let nats = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let (accounts, conversations) = (8, 3);
    let dir = wave_log_chains(accounts);
    let within = Duration::from_secs(60);
    let config = with_standbys(config_with(&receiver, true, 1), standbys);
    let mut all: Vec<Dispatcher> = (0..replicas)
        .map(|_| Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path()))
        .collect();
    wait_until(
        "the replicas dividing the partitions",
        Duration::from_secs(60),
        || divided(&all),
    )
    .await;
    let first = wave_events(accounts, conversations, 1, 1);
    emit_all(nats.url(), &first).await;
    for d in &all {
        all_done(d, &first, within).await;
    }
    let mut wave_of = HashMap::new();
    for d in &all {
        for c in contacts_of_wave(d, accounts, conversations, 1).await {
            wave_of.insert(c["key"].to_string(), 1);
        }
    }
    assert_eq!(
        wave_of.len(),
        accounts * conversations,
        "every replica read the same contacts"
    );

    let mut lost = all.pop().expect("a replica");
    let lost_partitions = state_partitions_of(&lost).await;
    let logged_before: Vec<usize> = all.iter().map(|d| d.log().len()).collect();
    lost.kill9();
    wait_until(
        "the survivors holding every partition's state",
        Duration::from_secs(60),
        || divided(&all),
    )
    .await;
    // Each of the lost replica's partitions was taken by a survivor that
    // had its standby copy when there was one, else read it whole from
    // the changelog. (As the survivors' shares grow, one may also hand
    // another a partition.) A survivor that held a partition's state
    // before (the first replica holds every idle partition until the
    // others join) reads it whole when it takes it again, standby or not:
    // those are left out.
    let mut taken = Vec::new();
    for (d, before) in all.iter().zip(logged_before) {
        let log = d.log();
        let (earlier, since) = log.split_at(before);
        let held_before = logged_partitions(earlier, "partition taken");
        let rebuilt = logged_partitions(since, "the partition's copy is rebuilt");
        for partition in logged_partitions(since, "partition taken") {
            if !lost_partitions.contains(&partition) {
                continue;
            }
            taken.push(partition);
            if held_before.contains(&partition) {
                continue;
            }
            assert_eq!(
                rebuilt.contains(&partition),
                standbys == 0,
                "partition {partition} of the lost replica, rebuilt: {rebuilt:?}\n{since}"
            );
        }
    }
    taken.sort_unstable();
    taken.dedup();
    assert_eq!(
        taken, lost_partitions,
        "the lost replica's partitions taken"
    );
    let second = wave_events(accounts, conversations, 2, 2);
    emit_all(nats.url(), &second).await;
    let both = [first.as_slice(), second.as_slice()].concat();
    for d in &all {
        all_done(d, &both, within).await;
        for c in contacts_of_wave(d, accounts, conversations, 2).await {
            assert_eq!(
                wave_of.get(&c["key"].to_string()),
                Some(&1),
                "the same contact: {c:#}"
            );
        }
    }
}

/// The partitions named by the lines of `log` that say `what`.
fn logged_partitions(log: &str, what: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(what))
        .map(|line| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("partition="))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("a partition in {line}"))
        })
        .collect()
}

/// Whether the state of the 16 partitions is divided among `replicas`:
/// each holds some, and together they hold each once.
async fn divided(replicas: &[Dispatcher]) -> Option<()> {
    let mut every = Vec::new();
    for d in replicas {
        let held = state_partitions_of(d).await;
        if held.is_empty() {
            return None;
        }
        every.extend(held);
    }
    every.sort_unstable();
    (every == (0..16).collect::<Vec<u64>>()).then_some(())
}

/// A take-over from the changelog alone: the only replica is killed
/// (SIGKILL) while its events wait on their second step; a replica that
/// never saw the partitions (a fresh data directory) starts, reads their
/// state from the changelog, and resumes each event at the step it was at:
/// the first step's webhook is never sent again, the second's goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_resumes_a_killed_owners_events_from_the_changelog() {
    let nats = crate::util::NatsServer::start();
    // The second step's first attempt hangs until the owner is dead.
    let receiver = HttpReceiver::start(Duration::from_secs(20));
    let accounts = 4;
    let recv = receiver.url();
    let dir = chain_dir(accounts, |a| {
        format!(
            r#"
account_key = "{a}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "payment_webhook"
name = "first"
config = {{ url = "{recv}/hook/200", secret = "gateway", body = {{ account = "{{{{ event.account_key }}}}", conversation = "{{{{ event.conversation_key }}}}", n = "{{{{ event.event_data.n }}}}" }} }}

[[chains.steps]]
handler = "payment_webhook"
name = "second"
config = {{ url = "{recv}/hook/hang,200", secret = "gateway", timeout = "60s", body = {{ account = "{{{{ event.account_key }}}}", conversation = "{{{{ event.conversation_key }}}}", n = "{{{{ event.event_data.n }}}}" }} }}
retry = {{ max_attempts = 20, initial = "100ms", max = "1s" }}
"#
        )
    });
    let config = config_with(&receiver, true, 1);
    let mut owner = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    for i in 0..accounts {
        owner
            .set_secret(&account(i), "gateway", WEBHOOK_SECRET)
            .await;
    }
    wait_until(
        "the owner holding every partition",
        Duration::from_secs(30),
        || async { (partitions_of(&owner).await == (0..16).collect::<Vec<u64>>()).then_some(()) },
    )
    .await;
    let sent: Vec<VumiApiEvent> = (0..accounts)
        .map(|i| {
            event(
                &account(i),
                "survey",
                "poll_complete",
                "talk-0",
                json!({"msisdn": format!("+2785{i:07}"), "n": 0}),
            )
        })
        .collect();
    emit_all(nats.url(), &sent).await;
    let by_path = |requests: &[Value], path: &str| -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for r in requests.iter().filter(|r| r["path"] == path) {
            let id = r["headers"]["webhook-id"].as_str().expect("a webhook-id");
            *seen.entry(id.to_string()).or_default() += 1;
        }
        seen
    };
    wait_until(
        "an event waiting on its second step",
        Duration::from_secs(60),
        || async {
            let requests = receiver.requests().await;
            requests
                .iter()
                .any(|r| r["path"] == "/hook/hang,200" && r["status"].is_null())
                .then_some(())
        },
    )
    .await;
    owner.kill9();
    // The events whose second step had begun: their first step had
    // finished, and its record was made durable before the second (an
    // outside step) started. Another event may have been in its first step
    // at the kill: that one step may run again, as for any crash.
    let past_first: HashSet<String> = receiver
        .requests()
        .await
        .iter()
        .filter(|r| r["path"] == "/hook/hang,200")
        .filter_map(|r| {
            let body: Value = serde_json::from_str(r["body"].as_str()?).ok()?;
            Some(body["account"].as_str()?.to_string())
        })
        .collect();
    assert!(!past_first.is_empty());

    let fresh = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    for e in &sent {
        let trace = fresh
            .wait_for_trace(
                e.account_key.as_str(),
                &e.id.to_string(),
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(trace["status"], "done", "{trace:#}");
        let steps = &trace["chains"][0]["steps"];
        assert_eq!(steps[0]["name"], "first", "{trace:#}");
        assert_eq!(
            steps[0]["attempts"], 1,
            "done once, by the owner: {trace:#}"
        );
        assert_eq!(steps[1]["name"], "second", "{trace:#}");
    }
    let requests = receiver.requests().await;
    let first = by_path(&requests, "/hook/200");
    let second = by_path(&requests, "/hook/hang,200");
    assert_eq!(first.len(), accounts, "{first:?}");
    assert!(first.values().all(|n| *n <= 2), "{first:?}");
    for account in &past_first {
        let sent = requests
            .iter()
            .filter(|r| r["path"] == "/hook/200")
            .filter(|r| {
                r["body"]
                    .as_str()
                    .and_then(|b| serde_json::from_str::<Value>(b).ok())
                    .is_some_and(|b| b["account"] == account.as_str())
            })
            .count();
        assert_eq!(sent, 1, "{account}: its finished first step ran again");
    }
    // A second step the owner had sent when it died is sent again by the
    // new replica (its outcome was unknown); one it had not reached is
    // sent once.
    assert_eq!(second.len(), accounts, "{second:?}");
    assert!(second.values().all(|n| *n <= 2), "{second:?}");
    assert!(
        second.values().any(|n| *n == 2),
        "the hung second step resumed by the new replica: {second:?}"
    );
}

/// Step idempotency keys on the replicated backend: claims made through
/// two replicas at once (one holds the account's partition, the other's are
/// forwarded to it) let one event run the step; keys past their window are
/// swept by the partition's owner, others kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_claims_are_won_once_and_expire_on_the_replicated_backend() {
    use switchboard_handlers::records::IdempotencyKeys;
    use switchboard_state::StoredIdempotencyKeys;
    use switchboard_store::{Collection, Store};

    let nats = crate::util::NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b) = two_stores_a_holding_acme(&nats, dir.path()).await;
    let acme = switchboard_sdk::AccountKey::new("acme").expect("an account key");
    let hour = Duration::from_secs(3_600);
    let rounds = 20;
    let claims = |store: Store, claimant: &'static str| {
        let acme = acme.clone();
        tokio::task::spawn_blocking(move || {
            let keys = StoredIdempotencyKeys::new(store);
            (0..rounds)
                .map(|i| {
                    keys.claim(&acme, "c", "s", &format!("k-{i}"), hour, claimant)
                        .expect("a claim")
                })
                .collect::<Vec<bool>>()
        })
    };
    let (first, second) = (claims(a.clone(), "event-a"), claims(b.clone(), "event-b"));
    let (first, second) = (first.await.expect("a"), second.await.expect("b"));
    for i in 0..rounds {
        assert!(
            first[i] ^ second[i],
            "key {i}: a {} b {}",
            first[i],
            second[i]
        );
    }

    let keys = StoredIdempotencyKeys::new(a.clone());
    let claim = |key: &str, window: Duration| {
        keys.claim(&acme, "c", "t", key, window, "event-c")
            .expect("a claim")
    };
    assert!(claim("short", Duration::ZERO) && claim("long", hour));
    let before = a.len(Collection::Idempotency);
    let now = switchboard_sdk::now().unix_timestamp();
    // Replica b holds no partition: it sweeps nothing of acme's.
    assert_eq!(
        StoredIdempotencyKeys::new(b.clone()).expire(now).unwrap(),
        0
    );
    assert_eq!(keys.expire(now).expect("a sweep"), 1);
    assert_eq!(a.len(Collection::Idempotency), before - 1);
    assert!(
        !StoredIdempotencyKeys::new(b)
            .claim(&acme, "c", "t", "long", hour, "event-d")
            .expect("a claim")
    );
}

/// A zombie owner. Replica `a` is frozen (SIGSTOP) while it holds events
/// in flight, past its pin timeout; `b` takes its partitions (new terms,
/// fencing `a`'s) and handles those events and the next ones of the same
/// conversations; then `a` is resumed (SIGCONT), wakes up mid-step, finds
/// its terms ended, rejoins and gets a share of the partitions back (read
/// again from the changelog). Afterwards every event is done as either
/// replica reads it, each contact holds the last wave's value (nothing `a`
/// wrote after the take-over overwrote `b`'s), no webhook went out a third
/// time, and each conversation's webhooks came in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_resumed_after_a_take_over_overwrites_nothing() {
    use switchboard_store::partition_of_account;

    let nats = crate::util::NatsServer::start();
    // Every webhook hangs a second, so a frozen replica holds events
    // mid-chain.
    let receiver = HttpReceiver::start(Duration::from_secs(1));
    let (accounts, conversations) = (8, 3);
    let recv = receiver.url();
    let dir = chain_dir(accounts, |a| {
        wave_chain(
            a,
            &format!(
                r#"
[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{recv}/hook/hang", secret = "gateway", body = {{ account = "{{{{ event.account_key }}}}", conversation = "{{{{ event.conversation_key }}}}", n = "{{{{ event.event_data.n }}}}" }} }}
retry = {{ max_attempts = 20, initial = "100ms", max = "1s" }}
"#
            ),
        )
    });
    let config = config_with(&receiver, true, 1);
    let a = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    let b = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    for d in [&a, &b] {
        for i in 0..accounts {
            d.set_secret(&account(i), "gateway", WEBHOOK_SECRET).await;
        }
    }
    let held_by_a = wait_until(
        "the replicas sharing the partitions",
        Duration::from_secs(30),
        || async { shared(partitions_of(&a).await, partitions_of(&b).await) },
    )
    .await;
    let of_a: HashSet<String> = (0..accounts)
        .map(account)
        .filter(|x| held_by_a.contains(&u64::from(partition_of_account(x.as_bytes(), 16))))
        .collect();
    assert!(!of_a.is_empty(), "replica a handles some of the accounts");

    let wave = |wave: u64, n: u64| wave_events(accounts, conversations, wave, n);
    let mut sent: Vec<VumiApiEvent> = wave(1, 0).into_iter().chain(wave(1, 1)).collect();
    emit_all(nats.url(), &sent).await;

    // Freeze `a` while a webhook of one of its accounts hangs.
    wait_until(
        "a webhook in flight at replica a",
        Duration::from_secs(30),
        || async {
            receiver
                .requests()
                .await
                .iter()
                .filter_map(webhook_arrival)
                .any(|(_, account, ..)| of_a.contains(&account))
                .then_some(())
        },
    )
    .await;
    a.signal("STOP");
    let frozen = Instant::now();
    wait_until(
        "b holding every partition",
        Duration::from_secs(90),
        || async { (partitions_of(&b).await == (0..16).collect::<Vec<u64>>()).then_some(()) },
    )
    .await;
    let taken = frozen.elapsed();
    let second = wave(2, 2);
    emit_all(nats.url(), &second).await;
    sent.extend(second);
    all_done(&b, &sent, Duration::from_secs(120)).await;

    // `a` wakes up mid-step, rejoins and takes its share back.
    a.signal("CONT");
    let resumed = Instant::now();
    wait_until(
        "the replicas sharing the partitions again",
        Duration::from_secs(90),
        || async { shared(partitions_of(&a).await, partitions_of(&b).await) },
    )
    .await;
    let rejoined = resumed.elapsed();
    let third = wave(3, 3);
    emit_all(nats.url(), &third).await;
    sent.extend(third);
    let last_wave = Instant::now();
    for d in [&a, &b] {
        all_done(d, &sent, Duration::from_secs(120)).await;
    }

    let last_wave = last_wave.elapsed();

    // No webhook a third time, none missing, each conversation in order.
    let requests = receiver.requests().await;
    let arrivals: Vec<Arrival> = requests.iter().filter_map(webhook_arrival).collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (id, ..) in &arrivals {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let expected: HashSet<String> = sent
        .iter()
        .map(|e| {
            let id = EventId::derived(e.id, "poll-complete", "payment_webhook", 0);
            format!("msg_{}", id.as_uuid().simple())
        })
        .collect();
    let ids: HashSet<String> = seen.keys().map(|id| id.to_string()).collect();
    assert_eq!(ids, expected, "a webhook per event, no other");
    let thrice: Vec<_> = seen.iter().filter(|(_, n)| **n > 2).collect();
    assert!(thrice.is_empty(), "webhooks sent a third time: {thrice:?}");
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    assert_in_conversation_order(arrivals);

    // Each contact holds the last wave's value, as either replica reads it.
    for d in [&a, &b] {
        contacts_of_wave(d, accounts, conversations, 3).await;
    }
    eprintln!(
        "replicas: a zombie owner resumed after a take-over: {} events done, {repeats} webhook \
         repeats (each at most twice), contacts as the new owner left them; the take-over \
         took {taken:.1?}, the rejoin {rejoined:.1?}, the last wave {last_wave:.1?}",
        sent.len()
    );
    // `a` held terms when it froze, and learnt they had ended; none of its
    // conversations then waited for an event that `b` had handled.
    let log = a.log();
    assert!(
        log.contains("another replica took the partition over"),
        "{log}"
    );
    assert!(
        !log.contains("has not come back; going on without it"),
        "{log}"
    );
}

/// An inbox stream on any replica: a notification the owner of the
/// account's partition leaves reaches streams open on both replicas, and a
/// receiver marking it read through the replica that does not own the
/// partition (the write forwarded to the owner) reaches both too. A
/// receiver token minted on one replica opens a stream on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_streams_on_every_replica_see_the_owners_notifications() {
    inbox_streams_on_both_replicas(None).await;
}

/// The same with no standby copies (`bus.standbys = 0`): the replica that
/// does not own the account's partition keeps a copy of it while its
/// stream is open, so its stream hears what the owner writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_streams_on_a_replica_without_a_standby_copy_see_the_owners_notifications() {
    inbox_streams_on_both_replicas(Some(0)).await;
}

/// Two replicas (with `standbys` copies of each partition, or one on
/// each), a stream on each, as
/// [`inbox_streams_on_every_replica_see_the_owners_notifications`] says.
async fn inbox_streams_on_both_replicas(standbys: Option<u16>) {
    const WITHIN: Duration = Duration::from_secs(30);
    let server = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let config = match standbys {
        Some(n) => with_standbys(config_with(&receiver, true, 1), n),
        None => config_with(&receiver, true, 1),
    };
    let replicas: Vec<Dispatcher> = (0..2)
        .map(|_| Dispatcher::nats_url(server.url(), &config))
        .collect();
    replicas[0]
        .apply_chains(
            "acme.toml",
            r#"
account_key = "acme"
[[chains]]
name = "notify"
event_type = "ping"
[[chains.steps]]
handler = "notify"
config = { to = "ann", body = "{{ event.event_data.text }}" }
"#,
        )
        .await;
    wait_until(
        "the chain on both replicas",
        Duration::from_secs(10),
        || async { (version_at(&replicas[1], "acme").await == Some(1)).then_some(()) },
    )
    .await;
    let (status, minted) = replicas[0]
        .request(
            reqwest::Method::POST,
            "/v1/accounts/acme/inbox/ann/token",
            Some(replicas[0].admin_token()),
            None,
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().unwrap().to_string();

    // A stream on each replica, each past its opening counts.
    let mut streams = Vec::new();
    for d in &replicas {
        let response = wait_until(
            "a stream on the replica",
            Duration::from_secs(10),
            || async {
                let r = crate::util::http_client(Some(&token))
                    .get(format!("{}/v1/inbox/stream", d.url()))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(r)
            },
        )
        .await;
        let mut stream = EventStream::new(response);
        assert_eq!(stream.next(WITHIN).await.kind, "count");
        streams.push(stream);
    }

    let id = replicas[0]
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "ping", "event_data": {"text": "hello"}}))
        .await;
    replicas[0]
        .wait_for_trace("acme", &id, Duration::from_secs(30))
        .await;
    let mut note = String::new();
    for stream in &mut streams {
        let data = stream.next_of(&["notification"], WITHIN).await.data;
        assert_eq!(data["content"]["body"], "hello", "{data}");
        note = data["id"].as_str().unwrap().to_string();
        let count = stream.next_of(&["count"], WITHIN).await.data;
        assert_eq!(count, json!({"unread": 1, "total": 1}));
    }

    // Read through each replica in turn: both streams hear both changes.
    for (d, action) in [
        (&replicas[0], "read"),
        (&replicas[1], "unread"),
        (&replicas[1], "read"),
    ] {
        let (status, changed) = d
            .request(
                reqwest::Method::POST,
                &format!("/v1/inbox/{note}/{action}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{action} through {}: {changed}", d.url());
        let unread = u64::from(action == "unread");
        for stream in &mut streams {
            let count = stream.next_of(&["count"], WITHIN).await.data;
            assert_eq!(
                count,
                json!({"unread": unread, "total": 1}),
                "after {action}"
            );
        }
    }
}

/// Going back from replicas to one dispatcher: the single dispatcher
/// passes over what the replicas' partition consumers handled, whether its
/// consumer is made then or was left by a single dispatcher that ran before
/// the replicas. The stream keeps every event, and the new dispatcher has no
/// journal of the replicas' work: delivering it again would send every SMS
/// of their time twice. What came while no dispatcher ran is handled. And
/// replicas started again on the partition consumers they left pass over
/// what the single dispatcher handled meanwhile; and a single dispatcher
/// whose consumer is made then (the old one deleted) starts after what
/// the partitions handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dispatcher_after_replicas_passes_over_what_they_handled() {
    let nats = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let accounts = 4;
    let chains = chain_dir(accounts, sms_chain);
    // Each wave's events, told apart by their `n`.
    let wave = |n: usize, wave: u64| -> Vec<VumiApiEvent> {
        events(n, accounts)
            .into_iter()
            .map(|mut e| {
                let n = e.event_data["n"].as_u64().expect("n");
                e.event_data["n"] = json!(n + 1_000 * wave);
                e
            })
            .collect()
    };
    let single_config = config_with(&receiver, false, 1);
    let single = || Dispatcher::nats_url_with_chains(nats.url(), &single_config, chains.path());

    // A single dispatcher first: it leaves its consumer behind.
    let mut first = single();
    let before = wave(20, 0);
    emit_all(nats.url(), &before).await;
    all_done(&first, &before, Duration::from_secs(60)).await;
    assert_eq!(first.stop(), Some(0));

    let replicated = config_with(&receiver, true, 1);
    let mut a = Dispatcher::nats_url_with_chains(nats.url(), &replicated, chains.path());
    let mut b = Dispatcher::nats_url_with_chains(nats.url(), &replicated, chains.path());
    let theirs = wave(80, 1);
    emit_all(nats.url(), &theirs).await;
    all_done(&a, &theirs, Duration::from_secs(60)).await;
    assert_eq!(a.stop(), Some(0));
    assert_eq!(b.stop(), Some(0));
    // Stored while no dispatcher runs.
    let meanwhile = wave(12, 2);
    emit_all(nats.url(), &meanwhile).await;

    let last = single();
    let after = wave(40, 3);
    emit_all(nats.url(), &after).await;
    all_done(&last, &meanwhile, Duration::from_secs(60)).await;
    all_done(&last, &after, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    for e in before.iter().chain(&theirs) {
        assert_eq!(
            last.trace(e.account_key.as_str(), &e.id.to_string()).await,
            None,
            "the single dispatcher handled an event the replicas had handled"
        );
    }
    let mut last = last;
    assert_eq!(last.stop(), Some(0));

    // Replicas again, on the partition consumers they left: they pass over
    // what the single dispatcher handled since.
    let mut c = Dispatcher::nats_url_with_chains(nats.url(), &replicated, chains.path());
    let mut d = Dispatcher::nats_url_with_chains(nats.url(), &replicated, chains.path());
    let again_theirs = wave(40, 4);
    emit_all(nats.url(), &again_theirs).await;
    all_done(&c, &again_theirs, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for e in meanwhile.iter().chain(&after) {
        assert_eq!(
            c.trace(e.account_key.as_str(), &e.id.to_string()).await,
            None,
            "the replicas handled an event the single dispatcher had handled"
        );
    }
    assert_eq!(c.stop(), Some(0));
    assert_eq!(d.stop(), Some(0));

    // One dispatcher again, its consumer made now (the old one deleted):
    // it starts after what the partitions handled, and passes over the rest
    // of it.
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    jetstream::new(client)
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream")
        .delete_consumer("switchboard")
        .await
        .expect("the consumer deleted");
    let stored = wave(12, 5);
    emit_all(nats.url(), &stored).await;
    let mut fresh = single();
    let latest = wave(20, 6);
    emit_all(nats.url(), &latest).await;
    all_done(&fresh, &stored, Duration::from_secs(60)).await;
    all_done(&fresh, &latest, Duration::from_secs(60)).await;
    for e in &again_theirs {
        assert_eq!(
            fresh.trace(e.account_key.as_str(), &e.id.to_string()).await,
            None,
            "the single dispatcher handled an event the replicas had handled"
        );
    }
    // Past the ack wait (3 s): anything delivered again would be in.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(fresh.stop(), Some(0));

    let mut sent: HashMap<(String, String, u64), usize> = HashMap::new();
    for arrival in receiver.requests().await.iter().filter_map(sms_arrival) {
        let (_, account, conversation, n) = arrival;
        *sent.entry((account, conversation, n)).or_default() += 1;
    }
    let twice: Vec<_> = sent.iter().filter(|(_, times)| **times > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    assert_eq!(
        sent.len(),
        before.len()
            + theirs.len()
            + meanwhile.len()
            + after.len()
            + again_theirs.len()
            + stored.len()
            + latest.len()
    );
}

/// `switchboard run` on `nats` with `config`, in a data directory of its
/// own, expected to refuse to start: returns its logs.
async fn refused_start(nats: &str, config: &str) -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("switchboard.toml");
    // Replicas share an admin token (the running ones have it from the
    // environment).
    let config = format!(
        "{config}\n[http]\nadmin_token = \"{}\"\n",
        crate::util::ADMIN_TOKEN
    );
    std::fs::write(&path, config).expect("writing the config file");
    let data = dir.path().join("data");
    let out = crate::util::switchboard(&[
        "run",
        "--data",
        data.to_str().expect("a UTF-8 path"),
        "--listen",
        "127.0.0.1:0",
        "--nats",
        nats,
        "--config",
        path.to_str().expect("a UTF-8 path"),
    ])
    .await;
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "the dispatcher should have refused to start:\n{}",
        out.stderr
    );
    out.stderr
}

/// A single dispatcher refuses to start while replicas or another single
/// dispatcher consume the stream, and a replica while a single dispatcher
/// does: either would handle events the other handles, with a journal of
/// its own. The running ones go on undisturbed, and once they stop, the
/// other kind starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_refuses_to_start_beside_dispatchers_it_would_handle_events_again_of() {
    let nats = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let accounts = 2;
    let chains = chain_dir(accounts, sms_chain);
    let single_config = config_with(&receiver, false, 1);
    let replicated = config_with(&receiver, true, 1);
    let numbered = |n: usize, from: u64| -> Vec<VumiApiEvent> {
        events(n, accounts)
            .into_iter()
            .map(|mut e| {
                let n = e.event_data["n"].as_u64().expect("n");
                e.event_data["n"] = json!(n + from);
                e
            })
            .collect()
    };

    let mut single = Dispatcher::nats_url_with_chains(nats.url(), &single_config, chains.path());
    let first = numbered(8, 0);
    emit_all(nats.url(), &first).await;
    all_done(&single, &first, Duration::from_secs(30)).await;

    let second_single = refused_start(nats.url(), &single_config).await;
    assert!(
        second_single.contains("another single dispatcher is consuming stream")
            && second_single.contains("consumer switchboard")
            && second_single.contains("run replicas (bus.replicated = true)"),
        "{second_single}"
    );
    let replica = refused_start(nats.url(), &replicated).await;
    assert!(
        replica.contains("a single dispatcher (bus.replicated = false) is consuming stream")
            && replica.contains("replicas beside it would handle its events again"),
        "{replica}"
    );
    // Busy with a backlog of slow steps, its pull may have nothing waiting
    // on the server (its executor's queue is full), but it takes more
    // deliveries as its events are done. (With only waiting requests
    // looked at, this second one started.)
    let slow = HttpReceiver::start(Duration::from_millis(700));
    single.set_secret("busy", "gateway", WEBHOOK_SECRET).await;
    single
        .apply_chains(
            "busy.toml",
            &format!(
                r#"
account_key = "busy"

[[chains]]
name = "slow"
event_type = "slow"
steps = [{{ handler = "payment_webhook", config = {{ url = "{}/hook/hang,200", secret = "gateway", timeout = "10s" }} }}]
"#,
                slow.url()
            ),
        )
        .await;
    let backlog: Vec<VumiApiEvent> = (0..60)
        .map(|i| event("busy", "survey", "slow", &format!("b-{i}"), json!({})))
        .collect();
    emit_all(nats.url(), &backlog).await;
    let busy = refused_start(nats.url(), &single_config).await;
    assert!(
        busy.contains("another single dispatcher is consuming stream"),
        "{busy}"
    );
    all_done(&single, &backlog, Duration::from_secs(60)).await;
    // The running one lost nothing to them.
    let later = numbered(8, 100);
    emit_all(nats.url(), &later).await;
    all_done(&single, &later, Duration::from_secs(30)).await;
    assert_eq!(single.stop(), Some(0));

    let mut a = Dispatcher::nats_url_with_chains(nats.url(), &replicated, chains.path());
    let theirs = numbered(8, 200);
    emit_all(nats.url(), &theirs).await;
    all_done(&a, &theirs, Duration::from_secs(30)).await;
    let beside = refused_start(nats.url(), &single_config).await;
    assert!(
        beside.contains("replicas (bus.replicated) are consuming stream")
            && beside.contains("switchboard-p")
            && beside.contains("start this one as a replica"),
        "{beside}"
    );
    // Another replica is a peer.
    let mut b = Dispatcher::nats_url_with_chains(nats.url(), &replicated, chains.path());
    assert_eq!(a.stop(), Some(0));
    assert_eq!(b.stop(), Some(0));

    // Stopped, they leave nothing that keeps a single dispatcher out.
    let mut last = Dispatcher::nats_url_with_chains(nats.url(), &single_config, chains.path());
    let after = numbered(8, 300);
    emit_all(nats.url(), &after).await;
    all_done(&last, &after, Duration::from_secs(30)).await;
    assert_eq!(last.stop(), Some(0));
}

/// A changelog that refuses every write for a while (its stream's largest
/// message made smaller than any record) while a replica handles events:
/// the flushes under way fail, the partitions' terms end, and what was
/// handled meanwhile is handled again once the changelog takes writes
/// again. Nothing is lost or dead-lettered, each conversation's webhooks
/// first arrive in publish order, and none more than twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_refusing_writes_for_a_while_loses_nothing_and_keeps_order() {
    let nats = crate::util::NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let accounts = 2;
    let dir = chain_dir(accounts, |a| chains(&receiver, a, "v1"));
    let config = config_with(&receiver, true, 1);
    let d = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    for i in 0..accounts {
        d.set_secret(&account(i), "gateway", WEBHOOK_SECRET).await;
    }
    wait_until(
        "the replica holding every partition",
        Duration::from_secs(30),
        || async { (partitions_of(&d).await == (0..16).collect::<Vec<u64>>()).then_some(()) },
    )
    .await;
    let all = events(240, accounts);
    let (before, during) = all.split_at(40);
    emit_all(nats.url(), before).await;
    all_done(&d, before, Duration::from_secs(60)).await;

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("NATS"));
    let mut changelog = js
        .get_stream(switchboard_store::changelog::STREAM)
        .await
        .expect("the changelog stream");
    let mut refusing = changelog.info().await.expect("its info").config.clone();
    let accepting = refusing.clone();
    refusing.max_message_size = 8;
    js.update_stream(&refusing)
        .await
        .expect("the changelog refusing");
    emit_all(nats.url(), during).await;
    wait_until(
        "the replica's writes refused",
        Duration::from_secs(30),
        || async { d.log().contains("the partition's term ended").then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    js.update_stream(&accepting)
        .await
        .expect("the changelog taking writes again");

    all_done(&d, &all, Duration::from_secs(120)).await;
    let arrivals: Vec<Arrival> = receiver
        .requests()
        .await
        .iter()
        .filter_map(webhook_arrival)
        .collect();
    assert_in_conversation_order(arrivals.clone());
    let mut times: HashMap<(String, u64), usize> = HashMap::new();
    for (_, account, conversation, n) in &arrivals {
        *times
            .entry((format!("{account}/{conversation}"), *n))
            .or_default() += 1;
    }
    assert_eq!(times.len(), all.len(), "every event's webhook arrived");
    assert!(
        times.values().all(|t| *t <= 2),
        "a webhook sent more than twice: {times:?}"
    );
    for i in 0..accounts {
        assert_eq!(d.dead_letters(&account(i)).await, Vec::<Value>::new());
    }
}
