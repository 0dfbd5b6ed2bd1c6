//! The dispatcher on its embedded bus, end to end: events emitted with the
//! CLI and over HTTP; duplicates dropped; and a crash (SIGKILL) in the middle
//! of a burst, after which a restart on the same data directory handles every
//! accepted event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use switchboard_sdk::EventId;
use tokio::task::JoinSet;

use crate::util::{Dispatcher, TIMEOUT, chain_names, check_poll_lineage, poll_chains};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_complete_emitted_with_the_cli_runs_its_chain_and_the_next() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", &poll_chains("acme")).await;

    let data = r#"{"msisdn": "+27820000003", "score": 4}"#;
    let emitted = d
        .cli(&[
            "emit",
            "acme",
            "survey",
            "poll_complete",
            "--conversation",
            "poll-2026",
            "--data",
            data,
            "--json",
        ])
        .await
        .json();
    assert_eq!(emitted["subject"], "vumi.events.acme.survey.poll_complete");
    assert_eq!(emitted["duplicate"], false);
    let id = emitted["id"].as_str().expect("an event id");
    EventId::parse(id).expect("the CLI makes a UUID");
    check_poll_lineage(&d, "acme", id, "+27820000003").await;

    // For people, `emit` says where the event went and how to follow it.
    let text = d
        .cli(&[
            "emit",
            "acme",
            "survey",
            "poll_complete",
            "--conversation",
            "poll-2026",
            "--data",
            data,
        ])
        .await;
    let text = text.ok();
    assert!(text.starts_with("accepted event "), "{text}");
    assert!(
        text.contains(" on vumi.events.acme.survey.poll_complete"),
        "{text}"
    );
    let second = text
        .split_whitespace()
        .nth(2)
        .expect("accepted event ID on SUBJECT");
    assert!(
        text.contains(&format!("switchboard trace acme {second}")),
        "{text}"
    );
    check_poll_lineage(&d, "acme", second, "+27820000003").await;

    // The same scenario, posted over HTTP with only the fields a producer must send.
    let posted = d
        .post_event(&json!({
            "account_key": "acme",
            "conversation_key": "poll-2026",
            "conversation_type": "survey",
            "event_type": "poll_complete",
            "event_data": {"msisdn": "+27820000004", "score": 4},
        }))
        .await;
    check_poll_lineage(&d, "acme", &posted, "+27820000004").await;
    assert_eq!(d.metric("handled", "acme").await, 6);

    let (status, ready) = d.get("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(ready["bus"], "embedded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_retried_with_the_same_id_runs_its_chains_once() {
    let d = Dispatcher::embedded();
    d.apply_chains("dedup.toml", &poll_chains("dedup")).await;
    let id = EventId::new_v7().to_string();
    let args = [
        "emit",
        "dedup",
        "survey",
        "poll_complete",
        "--conversation",
        "poll-1",
        "--data",
        r#"{"msisdn": "+27820000005", "score": 4}"#,
        "--id",
        &id,
    ];
    let first = d.cli(&args).await;
    assert!(!first.ok().contains("duplicate"), "{}", first.stdout);
    assert!(
        first.ok().contains(&format!("accepted event {id} ")),
        "{}",
        first.stdout
    );
    let again = d.cli(&args).await;
    assert!(
        again.ok().contains("(duplicate: already on the bus)"),
        "{}",
        again.stdout
    );
    check_poll_lineage(&d, "dedup", &id, "+27820000005").await;

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let third = d.cli(&json_args).await.json();
    assert_eq!(third["duplicate"], true);
    assert_eq!(third["id"], id.as_str());

    // Events of one conversation are handled in order: once a later one is
    // handled, no copy of the first can still be on its way.
    let later = d
        .post_event(&json!({
            "account_key": "dedup",
            "conversation_key": "poll-1",
            "conversation_type": "survey",
            "event_type": "poll_started",
            "event_data": {},
        }))
        .await;
    let trace = d.wait_for_trace("dedup", &later, TIMEOUT).await;
    assert_eq!(chain_names(&trace), ["default"]);
    assert_eq!(d.metric("received", "dedup").await, 3);
    assert_eq!(d.metric("handled", "dedup").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_event_is_dropped_and_counted_never_handled() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let id = d
        .post_event(&json!({
            "account_key": "acme",
            "conversation_key": "poll-2026",
            "conversation_type": "survey",
            "event_type": "poll_complete",
            "event_data": {"msisdn": "+27820000006", "score": 4},
            "expires_at": "2001-01-01T00:00:00Z",
        }))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "expired", "{trace:#}");
    assert_eq!(trace["chains"], json!([]));
    assert_eq!(trace["children"], json!([]));
    assert_eq!(d.metric("expired", "acme").await, 1);
    assert_eq!(d.metric("handled", "acme").await, 0);
}

/// Each `tick` emits a `tock`; every event of the burst is in one
/// conversation, so they are handled one at a time (each emit is a durable
/// publish) while the API accepts them concurrently: a backlog builds up.
const CRASH_CHAINS: &str = r#"
account_key = "crash"

[[chains]]
name = "tick"
conversation_type = "load"
event_type = "tick"

[[chains.steps]]
handler = "emit"
config = { event_type = "tock", data = { n = "{{ event.event_data.n }}" } }

[[chains]]
name = "tock"
conversation_type = "load"
event_type = "tock"

[[chains.steps]]
handler = "log"
config = { level = "debug", message = "tock {{ event.event_data.n }}" }
"#;

/// Posts `count` tick events numbered from `first`, 32 requests at a time;
/// returns their ids once every one was accepted (202).
async fn post_ticks(d: &Dispatcher, first: usize, count: usize) -> Vec<String> {
    let client = d.http().clone();
    let url = Arc::new(format!("{}/v1/events", d.url()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(first));
    let end = first + count;
    let mut tasks = JoinSet::new();
    for _ in 0..32 {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= end {
                    return ids;
                }
                let body = json!({
                    "account_key": "crash",
                    "conversation_key": "burst",
                    "conversation_type": "load",
                    "event_type": "tick",
                    "event_data": {"n": n},
                });
                let response = client
                    .post(url.as_str())
                    .json(&body)
                    .send()
                    .await
                    .expect("POST /v1/events");
                assert_eq!(response.status().as_u16(), 202, "tick {n}");
                let answer: Value = response.json().await.expect("a JSON answer");
                assert_eq!(answer["duplicate"], false, "tick {n}");
                ids.push(answer["id"].as_str().expect("an id").to_string());
            }
        });
    }
    let mut ids = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        ids.extend(done.expect("a posting task"));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_handled_after_a_sigkill_and_restart() {
    let mut d = Dispatcher::embedded();
    d.apply_chains("crash.toml", CRASH_CHAINS).await;

    // Publish until the dispatcher is clearly behind, then kill it at once.
    // Each accepted tick makes two events (tick and tock) to handle.
    let mut ids = Vec::new();
    let mut batch = 1000;
    loop {
        let started = Instant::now();
        ids.extend(post_ticks(&d, ids.len(), batch).await);
        let handled = d.metric("handled", "crash").await as usize;
        let pending = 2 * ids.len() - handled;
        eprintln!(
            "posted {batch} ticks in {:?}; {handled} of {} events handled",
            started.elapsed(),
            2 * ids.len()
        );
        if pending >= ids.len() / 10 {
            break;
        }
        assert!(
            ids.len() < 8000,
            "the dispatcher kept up with {} events; cannot test a crash with a backlog",
            ids.len()
        );
        batch *= 2;
    }
    d.kill9();
    d.restart();

    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        // The backlog is handled in order, so the first waits are the long ones.
        let timeout = if i == 0 {
            TIMEOUT
        } else {
            Duration::from_secs(5)
        };
        let trace = d.wait_for_trace("crash", id, timeout).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
        assert_eq!(chain_names(&trace), ["tick"]);
        let child =
            EventId::derived(EventId::parse(id).expect("an id"), "tick", "emit", 0).to_string();
        assert_eq!(trace["children"], json!([child]), "{trace:#}");
        let child_trace = d.wait_for_trace("crash", &child, timeout).await;
        assert_eq!(child_trace["status"], "done", "{child_trace:#}");
        assert_eq!(
            child_trace["event"]["event_data"]["n"],
            trace["event"]["event_data"]["n"]
        );
    }
    eprintln!(
        "{} ticks checked {:?} after the restart",
        ids.len(),
        started.elapsed()
    );
    // Counters start from zero in a new process: the restarted dispatcher
    // handled what the killed one left behind.
    let after = d.metric("handled", "crash").await;
    assert!(after > 0, "the restarted dispatcher handled nothing");
    assert_eq!(d.dead_letters("crash").await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_traces_and_seen_ids_survive_a_graceful_restart() {
    let mut d = Dispatcher::embedded();
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let body = json!({
        "id": EventId::new_v7().to_string(),
        "account_key": "acme",
        "conversation_key": "poll-2026",
        "conversation_type": "survey",
        "event_type": "poll_complete",
        "event_data": {"msisdn": "+27820000007", "score": 4},
    });
    let id = d.post_event(&body).await;
    let before = check_poll_lineage(&d, "acme", &id, "+27820000007").await;

    assert_eq!(d.stop(), Some(0), "SIGTERM is a clean stop:\n{}", d.log());
    d.restart();

    let (status, chains) = d.get("/v1/accounts/acme/chains").await;
    assert_eq!(status, 200, "{chains}");
    assert_eq!(chains["version"], 1);
    let child = before["event"]["id"].as_str().expect("a child id");
    assert_eq!(d.wait_for_trace("acme", child, TIMEOUT).await, before);
    // The bus still knows the id: a retried post is a duplicate.
    let (status, answer) = d.post_event_raw(&body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["duplicate"], true, "{answer}");

    // Nothing handled before the stop comes back: the next event of the
    // conversation is the only one this process handles.
    let next = d
        .post_event(&json!({
            "account_key": "acme",
            "conversation_key": "poll-2026",
            "conversation_type": "survey",
            "event_type": "poll_started",
            "event_data": {},
        }))
        .await;
    let trace = d.wait_for_trace("acme", &next, TIMEOUT).await;
    assert_eq!(chain_names(&trace), ["default"]);
    assert_eq!(d.metric("received", "acme").await, 1);
    assert_eq!(d.metric("handled", "acme").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_http_emitter_delivers_and_a_retried_emit_is_dropped() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let emitter = switchboard_sdk::http::HttpEmitter::new(d.url()).with_token(d.admin_token());
    let event = crate::util::event(
        "acme",
        "survey",
        "poll_complete",
        "poll-2026",
        json!({"msisdn": "+27820000004", "score": 4}),
    );
    emitter
        .emit(&event)
        .await
        .expect("the dispatcher accepts the event");
    // A worker that retries after a lost answer sends the same id again.
    emitter
        .emit(&event)
        .await
        .expect("a retried emit is accepted");
    let id = event.id.to_string();
    check_poll_lineage(&d, "acme", &id, "+27820000004").await;
    assert_eq!(
        d.metric("handled", "acme").await,
        2,
        "the event and its child, once each"
    );

    // A bad event is refused with the dispatcher's reason, not retried.
    let mut bad = event.clone();
    bad.id = switchboard_sdk::EventId::new_v7();
    bad.root_id = bad.id;
    bad.depth = 1;
    let err = emitter
        .emit(&bad)
        .await
        .expect_err("a child without a parent is refused");
    assert!(err.to_string().contains("HTTP 400"), "{err}");
    assert!(err.to_string().contains("parent_id"), "{err}");
}

/// An account may have 32 live tails open at once: each is handed every
/// account's rows, so their number is what the tail costs per event. The
/// 33rd is refused (429 `too_many_streams`, naming the account); another
/// account's still opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_has_at_most_32_live_tails_open() {
    let d = Dispatcher::embedded();
    let client = crate::util::http_client(Some(d.admin_token()));
    let open = |account: &str| {
        client
            .get(format!("{}/v1/accounts/{account}/events/stream", d.url()))
            .send()
    };
    let mut streams = Vec::new();
    for _ in 0..32 {
        let response = open("acme").await.unwrap();
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    let refused = open("acme").await.unwrap();
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("acme"),
        "{body}"
    );
    assert_eq!(open("other").await.unwrap().status(), 200);
}

/// The live tail over Server-Sent Events: a row for each pass over an
/// event of the account as it ends, filtered — none for another account's
/// events, none for events the filter leaves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_tail_streams_the_accounts_handled_events() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    d.apply_chains("other.toml", &poll_chains("other")).await;
    let mut response = crate::util::http_client(Some(d.admin_token()))
        .get(format!(
            "{}/v1/accounts/acme/events/stream?event_type=poll_complete",
            d.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let poll = |account: &str, event_type: &str| {
        json!({"account_key": account, "conversation_key": "poll-2026",
               "conversation_type": "survey", "event_type": event_type,
               "event_data": {"msisdn": "+27820000001", "score": 4}})
    };
    let others = d.post_event(&poll("other", "poll_complete")).await;
    let unwanted = d.post_event(&poll("acme", "poll_started")).await;
    d.wait_for_trace("other", &others, TIMEOUT).await;
    d.wait_for_trace("acme", &unwanted, TIMEOUT).await;
    let wanted = d.post_event(&poll("acme", "poll_complete")).await;

    let mut text = String::new();
    let row: Value = tokio::time::timeout(TIMEOUT, async {
        loop {
            let chunk = response
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            if let Some(data) = text
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .filter(|_| text.contains("\n\n"))
            {
                return serde_json::from_str(data.trim()).unwrap();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no row in time; read so far: {text:?}"));
    assert!(
        text.starts_with("event: handled\n") || text.contains("\nevent: handled\n"),
        "{text:?}"
    );
    assert_eq!(row["id"], wanted.as_str(), "{row:#}");
    assert_eq!(row["account_key"], "acme");
    assert_eq!(row["status"], "done", "{row:#}");
    assert_eq!(
        row["chains"][0],
        json!({"name": "poll-complete", "outcome": "done"}),
        "{row:#}"
    );

    // An open stream does not hold up a graceful stop: it ends.
    let mut d = d;
    let stopping = tokio::task::spawn_blocking(move || d.stop());
    let rest = tokio::time::timeout(TIMEOUT, async {
        while let Some(chunk) = response.chunk().await.unwrap_or(None) {
            drop(chunk);
        }
    })
    .await;
    assert!(
        rest.is_ok(),
        "the stream did not end when the dispatcher stopped"
    );
    assert_eq!(stopping.await.unwrap(), Some(0));
}

/// Moves the complete chunks of an HTTP/1.1 chunked body from the start of
/// `raw` into `text` (the body's bytes, without the chunks' framing).
fn dechunk(raw: &mut Vec<u8>, text: &mut String) {
    let mut body = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("a chunk size, not {size_text:?}"));
        let start = line_end + 2;
        if raw.len() < start + size + 2 {
            break;
        }
        body.extend_from_slice(&raw[start..start + size]);
        raw.drain(..start + size + 2);
        if size == 0 {
            break;
        }
    }
    text.push_str(&String::from_utf8_lossy(&body));
}

/// A tail reader that stops reading loses rows, not events: the
/// dispatcher handles every event at its own pace while the reader's
/// socket is full, and the reader is told how many rows it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_reader_that_falls_behind_loses_rows_not_events() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let d = Dispatcher::embedded();
    // Forty chains of one `log` step: a row of about four kilobytes per
    // event (each chain named with its outcome).
    let chains: String = (0..40)
        .map(|i| {
            format!(
                "[[chains]]\nname = \"a-chain-with-a-long-name-so-that-rows-are-large-{i:02}\"\n\
                 event_type = \"tick\"\n\
                 steps = [{{ handler = \"log\" }}]\n"
            )
        })
        .collect();
    d.apply_chains("acme.toml", &format!("account_key = \"acme\"\n{chains}"))
        .await;
    // A reader with a small receive buffer that reads nothing for now.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address = d.url().trim_start_matches("http://").to_string();
    let mut reader = socket.connect(address.parse().unwrap()).await.unwrap();
    reader
        .write_all(
            format!(
                "GET /v1/accounts/acme/events/stream HTTP/1.1\r\nHost: {address}\r\n\
                 Authorization: Bearer {}\r\n\r\n",
                d.admin_token()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The response's head; what follows it is the chunked body.
    let mut raw = Vec::new();
    let mut buffer = vec![0; 64 * 1024];
    let body_at = loop {
        let got = reader.read(&mut buffer).await.unwrap();
        assert!(got > 0, "the stream ended before its head");
        raw.extend_from_slice(&buffer[..got]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..body_at]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    raw.drain(..body_at);

    // Enough rows to fill the socket's buffers (up to 4 MiB on the
    // server's side) and the tail's backlog.
    let n = 3_000;
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..n)
        .map(|i| {
            let d = &d;
            async move {
                d.post_event(
                    &json!({"account_key": "acme", "conversation_key": format!("c{}", i % 50),
                    "conversation_type": "clock", "event_type": "tick",
                    "event_data": {"n": i}}),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    // (120,000 chain runs in a debug build: on a loaded machine they take
    // longer than the usual wait.)
    futures::stream::iter(&ids[n - 100..])
        .for_each_concurrent(16, |id| {
            let d = &d;
            async move {
                let trace = d.wait_for_trace("acme", id, TIMEOUT * 6).await;
                assert_eq!(trace["status"], "done", "{trace:#}");
            }
        })
        .await;
    eprintln!(
        "tail: {n} events handled in {:?} while a tail reader read nothing",
        started.elapsed()
    );

    // Now the reader reads: what its socket held, word of the rows it
    // lost, then the tail's backlog. Every pass is accounted for.
    // The body is read as sent: chunks, whose boundaries may fall
    // anywhere in an event (so the text is taken from whole chunks only).
    let mut text = String::new();
    let (rows, dropped) = tokio::time::timeout(TIMEOUT, async {
        loop {
            dechunk(&mut raw, &mut text);
            let got = reader.read(&mut buffer).await.unwrap();
            assert!(got > 0, "the stream ended");
            raw.extend_from_slice(&buffer[..got]);
            dechunk(&mut raw, &mut text);
            let rows = text.matches("event: handled").count();
            let dropped: usize = text
                .split("event: dropped\ndata: {\"dropped\":")
                .skip(1)
                .filter_map(|rest| rest.split('}').next()?.parse::<usize>().ok())
                .sum();
            if rows + dropped >= n {
                return (rows, dropped);
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "every row read or reported lost; read {} rows and {} reports",
            text.matches("event: handled").count(),
            text.matches("event: dropped").count()
        )
    });
    eprintln!("tail: the reader read {rows} rows and was told of {dropped} lost");
    assert!(
        dropped > 0,
        "the reader fell behind by more than its socket held"
    );
    assert_eq!(rows + dropped, n, "one account's rows: the count is exact");
}

/// The account's events, the latest taken up first, page by page and
/// filtered, through the API and the CLI; another account's never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_latest_first_page_by_page() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    d.apply_chains("other.toml", &poll_chains("other")).await;
    let post = |account: &'static str, event_type: &'static str, n: u32| {
        let d = &d;
        async move {
            let id = d
                .post_event(
                    &json!({"account_key": account, "conversation_key": format!("c{n}"),
                    "conversation_type": "survey", "event_type": event_type,
                    "event_data": {"msisdn": "+27820000001", "score": n}}),
                )
                .await;
            let trace = d.wait_for_trace(account, &id, TIMEOUT).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            (id, trace)
        }
    };
    let mut ticks = Vec::new();
    for n in 1..=4 {
        ticks.push(post("acme", "tick", n).await.0);
    }
    post("other", "tick", 9).await;
    let (poll, trace) = post("acme", "poll_complete", 5).await;
    let child = trace["children"][0].as_str().expect("a child").to_string();
    d.wait_for_trace("acme", &child, TIMEOUT).await;

    let page = |query: &str| {
        let d = &d;
        let path = format!("/v1/accounts/acme/events?{query}");
        async move {
            let (status, answer) = d.get(&path).await;
            assert_eq!(status, 200, "{path}: {answer}");
            answer
        }
    };
    let ids = |answer: &Value| -> Vec<String> {
        answer["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    let first = page("limit=3").await;
    assert_eq!(
        ids(&first),
        [child.clone(), poll.clone(), ticks[3].clone()],
        "{first:#}"
    );
    assert_eq!(
        first["events"][1]["chains"][0],
        json!({"name": "poll-complete", "outcome": "done"})
    );
    assert_eq!(first["events"][1]["status"], "done");
    let next = first["next"].as_str().expect("a next page").to_string();
    let second = page(&format!("limit=3&before={next}")).await;
    assert_eq!(
        ids(&second),
        [ticks[2].clone(), ticks[1].clone(), ticks[0].clone()],
        "{second:#}"
    );
    assert!(second.get("next").is_none(), "{second:#}");
    let filtered = page("event_type=tick&status=done").await;
    let mut expected = ticks.clone();
    expected.reverse();
    assert_eq!(ids(&filtered), expected, "{filtered:#}");
    assert_eq!(filtered["events"][0]["chains"][0]["name"], "default");

    let (status, bad) = d.get("/v1/accounts/acme/events?before=yesterday").await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_cursor");
    let (status, bad) = d.get("/v1/accounts/acme/events?limit=ten").await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad.to_string()
            .contains("limit: \\\"ten\\\" is not a whole number"),
        "{bad}"
    );

    let out = d.cli(&["events", "list", "acme", "--limit", "2"]).await;
    let text = out.ok();
    assert!(text.contains(&child) && text.contains(&poll), "{text}");
    assert!(!text.contains(&ticks[3]), "{text}");
    assert!(
        text.contains("more: switchboard events list acme --before "),
        "{text}"
    );
    assert!(text.contains("loyalty/points_awarded"), "{text}");
}

/// An event run again, whole, is a new event with the same data: its own
/// trace, every chain from its first step; the first is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_run_again_whole_as_a_new_event() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let first = d
        .post_event(
            &json!({"account_key": "acme", "conversation_key": "poll-2026",
            "conversation_type": "survey", "event_type": "poll_complete",
            "event_data": {"msisdn": "+27820000001", "score": 4}}),
        )
        .await;
    let before = d.wait_for_trace("acme", &first, TIMEOUT).await;
    let out = d.cli(&["events", "rerun", "acme", &first, "--json"]).await;
    let again = out.json()["id"].as_str().expect("a new id").to_string();
    assert_ne!(again, first);
    let trace = d.wait_for_trace("acme", &again, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(trace["event"]["event_data"], before["event"]["event_data"]);
    assert_eq!(chain_names(&trace), chain_names(&before));
    assert_ne!(
        trace["children"], before["children"],
        "new children, new ids"
    );
    assert_eq!(d.trace("acme", &first).await.unwrap(), before);
    // An event with no trace cannot be.
    let out = d
        .cli(&[
            "events",
            "rerun",
            "acme",
            "0190d0b6-3c4e-7f00-8000-000000000000",
        ])
        .await;
    assert!(
        out.fails().contains("has no trace of event"),
        "{}",
        out.fails()
    );
}
