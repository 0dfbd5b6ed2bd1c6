//! The dispatcher on NATS JetStream, end to end: chains applied with the CLI,
//! events published by a worker with the sdk's `NatsEmitter`, straight to the
//! stream the dispatcher consumes.

use serde_json::json;
use switchboard_sdk::nats::NatsEmitter;

use crate::util::{Dispatcher, NatsServer, TIMEOUT, check_poll_lineage, event, poll_chains};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_complete_runs_its_chain_and_the_emitted_event_runs_the_next() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    let version = d.apply_chains("acme.toml", &poll_chains("acme")).await;
    assert_eq!(version, 1);

    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    let parent = event(
        "acme",
        "survey",
        "poll_complete",
        "poll-2026",
        json!({"msisdn": "+27820000001", "score": 4}),
    );
    let emitted = emitter
        .emit(&parent)
        .await
        .expect("JetStream stores the event");
    assert!(!emitted.duplicate);

    let parent_id = parent.id.to_string();
    let child = check_poll_lineage(&d, "acme", &parent_id, "+27820000001").await;
    let trace = d.wait_for_trace("acme", &parent_id, TIMEOUT).await;
    assert_eq!(trace["chains"][0]["version"], version);
    assert_eq!(child["chains"][0]["version"], version);
    // The dispatcher hands the event to the chain as the worker sent it.
    assert_eq!(
        trace["event"],
        serde_json::to_value(&parent).expect("an event serialises")
    );

    // The CLI shows the same trace, as JSON and for people.
    let shown = d.cli(&["trace", "acme", &parent_id, "--json"]).await.json();
    assert_eq!(shown, trace);
    let text = d.cli(&["trace", "acme", &parent_id]).await;
    let text = text.ok();
    let child_id = child["event"]["id"].as_str().expect("a child id");
    assert!(text.contains("status: done"), "{text}");
    assert!(text.contains("chain poll-complete (version 1)"), "{text}");
    assert!(text.contains(&format!("emitted: {child_id}")), "{text}");
    let text = d.cli(&["trace", "acme", child_id]).await;
    assert!(
        text.ok().contains(&format!("emitted by: {parent_id}")),
        "{}",
        text.stdout
    );

    assert_eq!(d.metric("handled", "acme").await, 2);
    let (status, ready) = d.get("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(ready["bus"], "nats");
    assert_eq!(ready["ready"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_emitted_twice_runs_its_chains_once() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("dedup.toml", &poll_chains("dedup")).await;
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");

    // A worker that retries an emit sends the same event (same id) again.
    let ev = event(
        "dedup",
        "survey",
        "poll_complete",
        "poll-1",
        json!({"msisdn": "+27820000002", "score": 4}),
    );
    let first = emitter.emit(&ev).await.expect("the first emit");
    let again = emitter.emit(&ev).await.expect("the second emit");
    assert!(!first.duplicate);
    assert!(
        again.duplicate,
        "JetStream should drop the second publish of {}",
        ev.id
    );
    assert_eq!(again.sequence, first.sequence);
    check_poll_lineage(&d, "dedup", &ev.id.to_string(), "+27820000002").await;

    // Posting it over HTTP after it was handled is a duplicate too.
    let (status, answer) = d
        .post_event_raw(&serde_json::to_value(&ev).expect("an event serialises"))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["duplicate"], true, "{answer}");
    assert_eq!(answer["id"], ev.id.to_string());

    // Events of one conversation are handled in order, so once a later event
    // of the same conversation is handled, every copy that could have been
    // delivered before it has been: the counters are final.
    let later = event("dedup", "survey", "poll_started", "poll-1", json!({}));
    emitter.emit(&later).await.expect("the later emit");
    let trace = d
        .wait_for_trace("dedup", &later.id.to_string(), TIMEOUT)
        .await;
    assert_eq!(crate::util::chain_names(&trace), ["default"]);
    // The event, its child and the later event: three, not four or five.
    assert_eq!(d.metric("received", "dedup").await, 3);
    assert_eq!(d.metric("handled", "dedup").await, 3);
}

/// An RFC 3339 UTC timestamp as (date and time to the second, nanoseconds),
/// which compare in time order whatever the number of fraction digits.
fn instant(t: &serde_json::Value) -> (String, u32) {
    let t = t.as_str().expect("a timestamp").trim_end_matches('Z');
    let (seconds, fraction) = t.split_once('.').unwrap_or((t, "0"));
    let nanos = format!("{fraction:0<9}")
        .parse()
        .expect("a fraction of a second");
    (seconds.to_string(), nanos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_conversation_are_handled_one_after_another_in_order() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    let mut ids = Vec::new();
    for n in 0..40 {
        let e = event(
            "acme",
            "survey",
            "step",
            "one-conversation",
            json!({"n": n}),
        );
        emitter.emit(&e).await.expect("emit");
        ids.push(e.id.to_string());
    }
    let mut previous: Option<serde_json::Value> = None;
    for id in &ids {
        let trace = d.wait_for_trace("acme", id, TIMEOUT).await;
        assert_eq!(trace["status"], "done");
        if let Some(p) = &previous {
            assert!(
                instant(&trace["started_at"]) >= instant(&p["finished_at"]),
                "event {} started before event {} finished",
                trace["event"]["event_data"]["n"],
                p["event"]["event_data"]["n"]
            );
        }
        previous = Some(trace);
    }
}

/// With the event path on threads of its own (`runtime.event_threads`),
/// the events of several conversations are all handled, each
/// conversation's one after another in order, emitted events included;
/// `/metrics` shows the threads, a script timeout longer than the progress
/// reports' interval is warned of, and a stop is still clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_path_on_threads_of_its_own_keeps_each_conversation_in_order() {
    let nats = NatsServer::start();
    let mut d = Dispatcher::with_config(
        Some(&nats),
        "[runtime]\nevent_threads = 2\n[rhai]\ntimeout = \"15s\"\n",
    );
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 4];
    for n in 0..10 {
        for (c, conversation) in ids.iter_mut().enumerate() {
            let e = event(
                "acme",
                "survey",
                "step",
                &format!("conversation-{c}"),
                json!({"n": n}),
            );
            emitter.emit(&e).await.expect("emit");
            conversation.push(e.id.to_string());
        }
    }
    for conversation in &ids {
        let mut previous: Option<serde_json::Value> = None;
        for id in conversation {
            let trace = d.wait_for_trace("acme", id, TIMEOUT).await;
            assert_eq!(trace["status"], "done", "{trace:#}");
            if let Some(p) = &previous {
                assert!(
                    instant(&trace["started_at"]) >= instant(&p["finished_at"]),
                    "event {} of {} started before event {} finished",
                    trace["event"]["event_data"]["n"],
                    trace["event"]["conversation_key"],
                    p["event"]["event_data"]["n"]
                );
            }
            previous = Some(trace);
        }
    }
    // A poll's lineage (an emitted event and its chain) runs there too.
    let poll = event(
        "acme",
        "survey",
        "poll_complete",
        "poll-2026",
        json!({"msisdn": "+27820000009", "score": 4}),
    );
    emitter.emit(&poll).await.expect("emit");
    check_poll_lineage(&d, "acme", &poll.id.to_string(), "+27820000009").await;

    let metrics = reqwest::get(format!("{}/metrics", d.url()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the text");
    assert!(
        metrics
            .lines()
            .any(|l| l == "switchboard_runtime_event_threads 2"),
        "{metrics}"
    );
    // A script call may hold an event thread longer than a third of the
    // ack wait (30 s): the start warns, naming both settings.
    assert!(
        d.log()
            .contains("rhai.timeout lets one script call hold an event thread")
            && d.log().contains("bus.ack_wait_secs"),
        "{}",
        d.log()
    );
    assert_eq!(d.stop(), Some(0), "SIGTERM is a clean stop:\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_while_the_dispatcher_is_down_are_handled_when_it_is_back() {
    let nats = NatsServer::start();
    let mut d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    assert_eq!(d.stop(), Some(0), "SIGTERM is a clean stop:\n{}", d.log());

    // The stream outlives the dispatcher: a worker can still emit.
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");
    let e = event(
        "acme",
        "survey",
        "poll_complete",
        "poll-2026",
        json!({"msisdn": "+27820000008", "score": 4}),
    );
    emitter
        .emit(&e)
        .await
        .expect("emit while the dispatcher is down");

    d.restart();
    check_poll_lineage(&d, "acme", &e.id.to_string(), "+27820000008").await;
}

/// Deletes the dispatcher's consumer, as an operator's `nats consumer rm`.
async fn delete_consumer(stream: &async_nats::jetstream::stream::Stream) {
    assert!(
        stream
            .delete_consumer("switchboard")
            .await
            .expect("the consumer deleted")
            .success
    );
}

/// The dispatcher's consumer deleted under it (an operator's `nats
/// consumer rm`, a stream made again): it makes the consumer again and goes
/// on consuming, instead of answering while it handles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_is_made_again_and_events_flow_on() {
    let nats = NatsServer::start();
    let d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    let handled = |conversation: &'static str, msisdn: &'static str| {
        let d = &d;
        async move {
            let e = event(
                "acme",
                "survey",
                "poll_complete",
                conversation,
                json!({"msisdn": msisdn, "score": 4}),
            );
            let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
            d.wait_for_trace("acme", &id, TIMEOUT).await["status"].clone()
        }
    };
    assert_eq!(handled("c-before", "+27820000011").await, "done");

    let client = async_nats::connect(nats.url())
        .await
        .expect("a NATS connection");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream");
    delete_consumer(&stream).await;
    assert_eq!(handled("c-after", "+27820000012").await, "done");
    assert!(
        d.log()
            .contains("the pull of the events ended; starting it again"),
        "{}",
        d.log()
    );
}

/// A consumer made with another limit of unacked messages (by an earlier
/// version, or before `bus.max_ack_pending` changed) takes the configured
/// one at the next start, and keeps its place: what the first dispatcher
/// handled is not delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_takes_the_configured_limit_of_unacked_messages_at_start() {
    let nats = NatsServer::start();
    let mut d = Dispatcher::with_config(Some(&nats), "[bus]\nmax_ack_pending = 2000\n");
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    post_and_wait(&d, 1).await;
    let client = async_nats::connect(nats.url())
        .await
        .expect("a NATS connection");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream");
    let consumer = async |stream: &mut async_nats::jetstream::stream::Stream| {
        stream
            .consumer_info("switchboard")
            .await
            .expect("the consumer's state")
    };
    assert_eq!(consumer(&mut stream).await.config.max_ack_pending, 2000);
    assert_eq!(d.stop(), Some(0), "a clean stop:\n{}", d.log());

    d.set_config("");
    d.restart();
    post_and_wait(&d, 2).await;
    let info = consumer(&mut stream).await;
    assert_eq!(
        info.config.max_ack_pending,
        switchboard_bus::nats::DEFAULT_MAX_ACK_PENDING as i64,
        "{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("updating the consumer's limit of unacked messages")
    );
    // The first event and its child, then the second and its: four
    // deliveries, none of them again.
    assert_eq!(info.delivered.stream_sequence, 4);
    assert_eq!(info.num_redelivered, 0);
}

/// Posts a `poll_complete` event of conversation `c-{n}` and waits until
/// it is done.
async fn post_and_wait(d: &Dispatcher, n: u32) {
    let e = event(
        "acme",
        "survey",
        "poll_complete",
        &format!("c-{n}"),
        json!({"msisdn": format!("+2782000{n:04}"), "score": 4}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
}

/// Waits until the dispatcher has handled `n` events of acme since it
/// started.
async fn handled_all(d: &Dispatcher, n: u64) {
    crate::util::wait_until("every event handled", TIMEOUT, || async {
        (d.metric("handled", "acme").await == n).then_some(())
    })
    .await;
}

/// A consumer deleted while the dispatcher was down is made anew after
/// what the dispatcher handled (its mark, kept in its store), not at the
/// stream's start, where every event older than the journal's retention
/// would run again; a stream made again starts at its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_anew_starts_after_what_the_dispatcher_handled() {
    let nats = NatsServer::start();
    let mut d = Dispatcher::nats(&nats);
    d.apply_chains("acme.toml", &poll_chains("acme")).await;
    for n in 0..5 {
        post_and_wait(&d, n).await;
    }
    // Each event and the one its chain emitted, all handled.
    handled_all(&d, 10).await;
    assert_eq!(d.stop(), Some(0), "SIGTERM is a clean stop:\n{}", d.log());

    let js = async_nats::jetstream::new(
        async_nats::connect(nats.url())
            .await
            .expect("a NATS connection"),
    );
    let mut stream = js
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream");
    let last = stream.info().await.expect("its info").state.last_sequence;
    assert_eq!(last, 10, "one stream message per event");
    delete_consumer(&stream).await;
    d.restart();
    post_and_wait(&d, 5).await;
    let consumer = stream
        .consumer_info("switchboard")
        .await
        .expect("the consumer made anew");
    assert_eq!(
        consumer.config.deliver_policy,
        async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: last + 1
        }
    );
    // The new event and the one it emitted only: none of the earlier ones
    // came back.
    handled_all(&d, 2).await;
    assert_eq!(d.metric("received", "acme").await, 2, "{}", d.log());
    assert!(d.log().contains("consumer made anew"), "{}", d.log());

    // The stream made again: its sequences start over, and so does the
    // consumer, whatever the mark says.
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    js.delete_stream("VUMI_EVENTS")
        .await
        .expect("the stream deleted");
    d.restart();
    post_and_wait(&d, 6).await;
    post_and_wait(&d, 7).await;
    assert!(
        d.log().contains("the events stream was made again"),
        "{}",
        d.log()
    );
}

/// A step that runs longer than the ack wait is not redelivered meanwhile
/// (the dispatcher reports progress), and a dead letter is also published to
/// the `VUMI_DEAD_LETTERS` stream, where alerting can pick it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_steps_are_kept_alive_and_dead_letters_reach_their_stream() {
    use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
    use futures::StreamExt;

    let nats = NatsServer::start();
    // Answers /hook/hang,200 after 2.5 s, past the 1 s ack wait.
    let receiver = HttpReceiver::start(std::time::Duration::from_millis(2500));
    let d = Dispatcher::with_config(Some(&nats), "[bus]\nack_wait_secs = 1\n");
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    let recv = receiver.url();
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "acme"

[[chains]]
name = "slow"
event_type = "slow"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/hang,200", secret = "gateway", timeout = "10s" }} }}]

[[chains]]
name = "refused"
event_type = "refused"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/400", secret = "gateway" }} }}]
"#
        ),
    )
    .await;
    let emitter = NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection");

    let slow = event("acme", "test", "slow", "c-1", json!({}));
    emitter.emit(&slow).await.expect("emit");
    let trace = d
        .wait_for_trace("acme", &slow.id.to_string(), TIMEOUT)
        .await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert!(
        trace["chains"][0]["steps"][0]["duration_ms"].as_f64() > Some(2000.0),
        "{trace:#}"
    );
    let js = async_nats::jetstream::new(
        async_nats::connect(nats.url())
            .await
            .expect("a NATS connection"),
    );
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("VUMI_EVENTS")
        .await
        .expect("the events stream")
        .get_consumer("switchboard")
        .await
        .expect("the dispatcher's consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(
        info.num_redelivered, 0,
        "the slow event was redelivered while it was being handled: {info:?}"
    );
    assert_eq!(receiver.requests_to("/hook/hang").await.len(), 1);

    let refused = event("acme", "test", "refused", "c-2", json!({}));
    emitter.emit(&refused).await.expect("emit");
    let refused_id = refused.id.to_string();
    let letter = d
        .wait_for_dead_letter("acme", "the refused webhook", |l| {
            l["event"]["id"] == refused_id.as_str()
        })
        .await;
    let dead = js
        .get_stream("VUMI_DEAD_LETTERS")
        .await
        .expect("the dead-letter stream")
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "vumi.dead.acme".into(),
            ..Default::default()
        })
        .await
        .expect("a consumer of dead letters");
    let mut messages = dead
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch");
    let message = tokio::time::timeout(TIMEOUT, messages.next())
        .await
        .expect("a dead letter on the stream in time")
        .expect("a message")
        .expect("not an error");
    let published: serde_json::Value =
        serde_json::from_slice(&message.payload).expect("a JSON dead letter");
    assert_eq!(published["id"], letter["id"]);
    assert_eq!(published["event"]["id"], refused.id.to_string());
    assert_eq!(published["chain"], "refused");
    assert_eq!(published["reason"], "step_failed");
    assert!(
        published["error"]
            .as_str()
            .is_some_and(|e| e.contains("400")),
        "{published:#}"
    );
}
