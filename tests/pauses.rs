//! Paused chains: a `delay` keeps its run durably (journal + timer) and it
//! goes on at the next step when due, never early, once, across a SIGKILL
//! of the dispatcher and a take-over; a `wait_for_event` goes on when a
//! matching event comes or times out; `cancel_on` cancels a paused run;
//! bad configs are refused at apply; the time to live holds during a pause.

use std::time::Duration;

use serde_json::{Value, json};

use crate::peers::HttpReceiver;
use crate::util::{Dispatcher, NatsServer, deliver_again, event, ms_of, now_ms, wait_until};

const TIMEOUT: Duration = Duration::from_secs(60);

fn config(receiver: &HttpReceiver) -> String {
    receiver.sms_gateway_config(3)
}

const REMINDER: &str = r#"
account_key = "acme"

[[chains]]
name = "remind"
conversation_type = "survey"
event_type = "signed_up"

[[chains.steps]]
name = "welcome"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "welcome" }

[[chains.steps]]
name = "wait"
handler = "delay"
config = { duration = "2s" }

[[chains.steps]]
name = "reminder"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "reminder" }
"#;

/// The SMS requests the receiver has with `body`.
async fn sms_saying(receiver: &HttpReceiver, body: &str) -> Vec<Value> {
    receiver
        .requests_to("/sms")
        .await
        .into_iter()
        .filter(|r| r["body"].as_str().is_some_and(|b| b.contains(body)))
        .collect()
}

async fn a_delay_survives_a_sigkill(nats: Option<&NatsServer>) {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(nats, &config(&receiver));
    d.apply_chains("acme.toml", REMINDER).await;
    let e = event(
        "acme",
        "survey",
        "signed_up",
        "c-1",
        json!({ "msisdn": "+27820000001" }),
    );
    let id = e.id.to_string();
    d.post_event(&serde_json::to_value(&e).expect("JSON")).await;

    // Paused: the first SMS went, the trace says until when, a timer waits.
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let chain = &trace["chains"][0];
    let until = chain["waiting_until"]
        .as_str()
        .expect("waiting_until")
        .to_string();
    assert_eq!(chain["steps"][1]["name"], "wait");
    assert_eq!(chain["steps"][1]["outcome"], "waiting");
    assert_eq!(chain["steps"][1]["output"]["until"], until.as_str());
    let timers = d
        .cli(&["timers", "list", "acme", "--limit", "1", "--json"])
        .await
        .json();
    assert_eq!(timers["timers"][0]["event_id"], id.as_str(), "{timers:#}");
    assert_eq!(timers["timers"][0]["chain"], "remind");
    let listed = d.cli(&["timers", "list", "acme"]).await;
    assert!(listed.ok().contains(&id), "{}", listed.ok());
    assert_eq!(sms_saying(&receiver, "welcome").await.len(), 1);

    // Killed during the pause and started again: the reminder goes once,
    // not before the pause ends.
    let due_ms = ms_of(&until);
    assert!(
        now_ms() < due_ms,
        "the pause ended before the kill: the test proves too little"
    );
    d.kill9();
    d.restart();
    let reminders = wait_until("the reminder", TIMEOUT, || async {
        let sent = sms_saying(&receiver, "reminder").await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    let at_ms = i128::from(reminders[0]["at_ms"].as_i64().expect("at_ms"));
    assert!(
        at_ms >= due_ms,
        "the reminder went {} ms before the pause ended",
        due_ms - at_ms
    );
    let trace = wait_until("the chain's end", TIMEOUT, || async {
        d.trace("acme", &id).await.filter(|t| t["status"] == "done")
    })
    .await;
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[1]["outcome"], "ok", "{trace:#}");
    assert_eq!(steps[2]["outcome"], "ok", "{trace:#}");
    assert!(trace["chains"][0].get("waiting_until").is_none());
    // Once: a second firing would have sent it again by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sms_saying(&receiver, "reminder").await.len(), 1);
    assert_eq!(sms_saying(&receiver, "welcome").await.len(), 1);
    let timers = d.cli(&["timers", "list", "acme", "--json"]).await.json();
    assert_eq!(timers["timers"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_survives_a_sigkill_and_goes_on_once_not_early_on_nats() {
    let nats = NatsServer::start();
    a_delay_survives_a_sigkill(Some(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_survives_a_sigkill_and_goes_on_once_not_early_on_the_embedded_bus() {
    a_delay_survives_a_sigkill(None).await;
}

/// A bad `delay` is refused at apply naming the step and the option; an
/// `until` already past goes on at once (said in the output); one that does
/// not render to a time fails the step for good, naming the option.
#[tokio::test]
async fn a_delays_config_is_checked_and_a_past_until_goes_on_at_once() {
    let d = Dispatcher::embedded();
    let chain = |config: &str| {
        format!(
            "account_key = \"acme\"\n\n[[chains]]\nname = \"later\"\nconversation_type = \"survey\"\n\
             event_type = \"signed_up\"\n\n[[chains.steps]]\nname = \"pause\"\nhandler = \"delay\"\n\
             config = {config}\n\n[[chains.steps]]\nhandler = \"log\"\n"
        )
    };
    for (config, expected) in [
        (r#"{ duration = "-5s" }"#, "config.duration"),
        (r#"{ duration = "soon" }"#, "config.duration"),
        (r#"{ until = "next tuesday" }"#, "config.until"),
        (
            r#"{ duration = "1s", until = "2026-01-01T00:00:00Z" }"#,
            "config",
        ),
        ("{}", "config"),
    ] {
        let path = d.file("bad.toml", &chain(config));
        let out = d
            .cli(&["chains", "apply", path.to_str().expect("a UTF-8 path")])
            .await;
        let line = out.fails();
        for part in [r#"chain "later""#, "pause", expected] {
            assert!(line.contains(part), "{config}: {line:?} lacks {part:?}");
        }
    }

    d.apply_chains(
        "acme.toml",
        &chain(r#"{ until = "{{ event.event_data.at }}" }"#),
    )
    .await;
    let past = event(
        "acme",
        "survey",
        "signed_up",
        "c-1",
        json!({ "at": "2020-01-01T00:00:00Z" }),
    );
    let id = d
        .post_event(&serde_json::to_value(&past).expect("JSON"))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let pause = &trace["chains"][0]["steps"][0];
    assert_eq!(pause["output"]["past"], true, "{trace:#}");
    assert_eq!(pause["output"]["until"], "2020-01-01T00:00:00Z");

    let garbled = event(
        "acme",
        "survey",
        "signed_up",
        "c-2",
        json!({ "at": "tomorrow-ish" }),
    );
    let id = d
        .post_event(&serde_json::to_value(&garbled).expect("JSON"))
        .await;
    let letter = d
        .wait_for_dead_letter("acme", "the garbled until", |l| {
            l["event"]["id"] == id.as_str()
        })
        .await;
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("config.until") && error.contains("tomorrow-ish"),
        "{letter:#}"
    );
}

/// With replicas, a paused chain is the partition's state: the owner is
/// killed during the pause, and the replica that takes the partition over
/// sends the reminder, once, not before the pause ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_chain_goes_on_on_the_replica_that_took_its_partition_over() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        dir.path().join("acme.toml"),
        REMINDER.replace(r#"duration = "2s""#, r#"duration = "4s""#),
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
    let e = event(
        "acme",
        "survey",
        "signed_up",
        "c-1",
        json!({ "msisdn": "+27820000002" }),
    );
    let id = e.id.to_string();
    switchboard_sdk::nats::NatsEmitter::connect(nats.url())
        .await
        .expect("a NATS connection")
        .emit(&e)
        .await
        .expect("emitting");
    let trace = owner.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let until = trace["chains"][0]["waiting_until"]
        .as_str()
        .expect("waiting_until")
        .to_string();
    owner.kill9();

    let fresh = Dispatcher::nats_url_with_chains(nats.url(), &config, dir.path());
    let reminders = wait_until("the reminder, from the new owner", TIMEOUT, || async {
        let sent = sms_saying(&receiver, "reminder").await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    let due_ms = ms_of(&until);
    let at_ms = i128::from(reminders[0]["at_ms"].as_i64().expect("at_ms"));
    assert!(
        at_ms >= due_ms,
        "the reminder went {} ms early",
        due_ms - at_ms
    );
    let trace = wait_until("the chain's end", TIMEOUT, || async {
        fresh
            .trace("acme", &id)
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    assert_eq!(trace["chains"][0]["steps"][0]["attempts"], 1, "{trace:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sms_saying(&receiver, "reminder").await.len(), 1);
    assert_eq!(sms_saying(&receiver, "welcome").await.len(), 1);
}

/// The time to live holds at every step: an event whose `expires_at`
/// passes during a pause stops before the next step, its trace saying
/// which, and is counted expired.
#[tokio::test]
async fn an_event_expiring_during_a_pause_stops_there_counted_expired() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "later"
conversation_type = "survey"
event_type = "signed_up"

[[chains.steps]]
name = "before"
handler = "log"

[[chains.steps]]
name = "pause"
handler = "delay"
config = { duration = "3s" }

[[chains.steps]]
name = "after"
handler = "log"
"#,
    )
    .await;
    let mut e = event("acme", "survey", "signed_up", "c-1", json!({}));
    e.expires_at = Some(time::OffsetDateTime::now_utc() + Duration::from_millis(1500));
    let id = d.post_event(&serde_json::to_value(&e).expect("JSON")).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let trace = wait_until("the pause's end", TIMEOUT, || async {
        d.trace("acme", &id)
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "expired", "{trace:#}");
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[0]["outcome"], "ok", "{trace:#}");
    assert_eq!(steps[1]["outcome"], "ok", "{trace:#}");
    assert_eq!(steps[2]["name"], "after");
    assert_eq!(steps[2]["outcome"], "skipped", "{trace:#}");
    assert!(
        steps[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("expired")),
        "{trace:#}"
    );
    assert_eq!(d.metric("expired", "acme").await, 1);
    assert_eq!(d.metric("handled", "acme").await, 0);
}

/// Emitted children inherit their parent's `expires_at` unless the emit
/// sets one.
#[tokio::test]
async fn an_emitted_child_inherits_its_parents_expiry_unless_the_emit_sets_one() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "notes"
conversation_type = "survey"
event_type = "signed_up"

[[chains.steps]]
name = "inherits"
handler = "emit"
config = { event_type = "noted" }

[[chains.steps]]
name = "sets"
handler = "emit"
config = { event_type = "noted", expires_at = "{{ event.event_data.until }}" }
"#,
    )
    .await;
    let mut e = event(
        "acme",
        "survey",
        "signed_up",
        "c-1",
        json!({ "until": "2031-06-01T12:00:00Z" }),
    );
    let parent_expiry = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let parent_expiry = parent_expiry.replace_nanosecond(0).expect("whole seconds");
    e.expires_at = Some(parent_expiry);
    let id = d.post_event(&serde_json::to_value(&e).expect("JSON")).await;
    let trace = wait_until("the parent's end", TIMEOUT, || async {
        d.trace("acme", &id).await.filter(|t| t["status"] == "done")
    })
    .await;
    let steps = &trace["chains"][0]["steps"];
    let expiry_of = |step: usize| {
        let child = steps[step]["output"]["event_id"]
            .as_str()
            .expect("the child's id")
            .to_string();
        let d = &d;
        async move {
            let trace = d.wait_for_trace("acme", &child, TIMEOUT).await;
            trace["event"]["expires_at"].clone()
        }
    };
    let inherited = expiry_of(0).await;
    let parsed = time::OffsetDateTime::parse(
        inherited.as_str().expect("an expiry"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    assert_eq!(parsed, parent_expiry);
    assert_eq!(expiry_of(1).await, "2031-06-01T12:00:00Z");
}

const CANCELLABLE: &str = r#"
account_key = "acme"

[[chains]]
name = "remind"
conversation_type = "survey"
event_type = "signed_up"
cancel_on = { event_type = "replied" }

[[chains.steps]]
name = "welcome"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "welcome" }

[[chains.steps]]
name = "wait"
handler = "delay"
config = { duration = "3s" }

[[chains.steps]]
name = "reminder"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "reminder" }
"#;

/// `cancel_on`: a reply in the conversation cancels its paused reminder;
/// another conversation's reminder goes.
#[tokio::test]
async fn cancel_on_cancels_a_paused_reminder_of_the_same_conversation() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(None, &config(&receiver));
    d.apply_chains("acme.toml", CANCELLABLE).await;
    let signed_up = |conversation: &str, msisdn: &str| {
        event(
            "acme",
            "survey",
            "signed_up",
            conversation,
            json!({ "msisdn": msisdn }),
        )
    };
    let (quiet, talker) = (
        signed_up("c-quiet", "+27820000010"),
        signed_up("c-talker", "+27820000011"),
    );
    for e in [&quiet, &talker] {
        d.post_event(&serde_json::to_value(e).expect("JSON")).await;
    }
    for e in [&quiet, &talker] {
        let trace = d.wait_for_trace("acme", &e.id.to_string(), TIMEOUT).await;
        assert_eq!(trace["status"], "waiting", "{trace:#}");
    }
    let reply = event("acme", "survey", "replied", "c-talker", json!({}));
    let reply_id = d
        .post_event(&serde_json::to_value(&reply).expect("JSON"))
        .await;
    let trace = wait_until("the cancellation", TIMEOUT, || async {
        d.trace("acme", &talker.id.to_string())
            .await
            .filter(|t| t["status"] == "cancelled")
    })
    .await;
    let chain = &trace["chains"][0];
    assert_eq!(chain["cancelled_by"], reply_id.as_str(), "{trace:#}");
    let shown = d.cli(&["trace", "acme", &talker.id.to_string()]).await;
    assert!(
        shown
            .ok()
            .contains(&format!("cancelled by event {reply_id}")),
        "{}",
        shown.ok()
    );
    assert_eq!(chain["steps"][2]["name"], "reminder");
    assert_eq!(chain["steps"][2]["outcome"], "skipped", "{trace:#}");
    // The quiet conversation's reminder goes; the talker's never does.
    let trace = wait_until("the quiet reminder", TIMEOUT, || async {
        d.trace("acme", &quiet.id.to_string())
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    assert_eq!(trace["chains"][0]["steps"][2]["outcome"], "ok", "{trace:#}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reminders = sms_saying(&receiver, "reminder").await;
    assert_eq!(reminders.len(), 1, "{reminders:#?}");
    assert!(
        reminders[0]["body"]
            .as_str()
            .is_some_and(|b| b.contains("+27820000010")),
        "{reminders:#?}"
    );
    let timers = d.cli(&["timers", "list", "acme", "--json"]).await.json();
    assert_eq!(timers["timers"], json!([]));
}

/// An event reaches only the runs paused before it was taken up: when it is
/// handled again (here its own chain's pause ends), a run that paused since
/// (a later sign-up of the same conversation) is left alone.
#[tokio::test]
async fn an_event_handled_again_does_not_cancel_a_run_that_paused_after_it() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "remind"
conversation_type = "survey"
event_type = "signed_up"
cancel_on = { event_type = "replied" }

[[chains.steps]]
name = "wait"
handler = "delay"
config = { duration = "8s" }

[[chains.steps]]
name = "reminder"
handler = "log"
config = { message = "reminder" }

[[chains]]
name = "thank"
conversation_type = "survey"
event_type = "replied"

[[chains.steps]]
name = "wait"
handler = "delay"
config = { duration = "4s" }

[[chains.steps]]
name = "thanks"
handler = "log"
config = { message = "thanks" }
"#,
    )
    .await;
    let post = |event_type: &str| {
        let e = event("acme", "survey", event_type, "c-1", json!({}));
        let id = e.id.to_string();
        let d = &d;
        async move {
            d.post_event(&serde_json::to_value(&e).expect("JSON")).await;
            let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
            assert_eq!(trace["status"], "waiting", "{trace:#}");
            id
        }
    };
    let first = post("signed_up").await;
    let reply = post("replied").await;
    let trace = wait_until("the first reminder cancelled", TIMEOUT, || async {
        d.trace("acme", &first)
            .await
            .filter(|t| t["status"] == "cancelled")
    })
    .await;
    assert_eq!(trace["chains"][0]["cancelled_by"], reply.as_str());
    let second = post("signed_up").await;
    let reply_now = d.trace("acme", &reply).await.expect("the reply's trace");
    assert_eq!(
        reply_now["status"], "waiting",
        "the reply's pause ended before the second sign-up paused: too slow to show anything"
    );
    // The reply's pause ends, and its pass runs again: the second sign-up
    // paused after the reply was taken up, so its reminder still goes.
    let trace = wait_until("the reply's chain done", TIMEOUT, || async {
        d.trace("acme", &reply)
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    assert_eq!(trace["chains"][0]["steps"][1]["outcome"], "ok", "{trace:#}");
    let trace = wait_until("the second reminder", TIMEOUT, || async {
        d.trace("acme", &second)
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(trace["chains"][0]["steps"][1]["outcome"], "ok", "{trace:#}");
}

/// `wait_for_event`: a run goes on when an event meeting its `match` comes
/// (whatever its conversation), its step's output holding that event; one
/// no event meets times out, its output saying so.
#[tokio::test]
async fn wait_for_event_goes_on_when_its_event_comes_or_times_out() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "order"
conversation_type = "shop"
event_type = "order_placed"

[[chains.steps]]
name = "paid"
handler = "wait_for_event"
config = { event_type = "order_paid", match = "event.event_data.order_id == paused.event_data.order_id", timeout = "4s" }

[[chains.steps]]
name = "after"
handler = "log"
config = { message = "paid: {{ steps.paid.event.event_data.amount if steps.paid.matched else 'never' }}" }
"#,
    )
    .await;
    let placed = |order: u32| {
        event(
            "acme",
            "shop",
            "order_placed",
            &format!("order-{order}"),
            json!({ "order_id": order }),
        )
    };
    let (unpaid, paid) = (placed(1), placed(2));
    for e in [&unpaid, &paid] {
        d.post_event(&serde_json::to_value(e).expect("JSON")).await;
        let trace = d.wait_for_trace("acme", &e.id.to_string(), TIMEOUT).await;
        assert_eq!(trace["status"], "waiting", "{trace:#}");
        assert_eq!(
            trace["chains"][0]["steps"][0]["output"]["waiting_for"],
            "order_paid"
        );
        assert_eq!(trace["chains"][0]["waiting_for"], "order_paid", "{trace:#}");
        let shown = d.cli(&["trace", "acme", &e.id.to_string()]).await;
        assert!(
            shown
                .ok()
                .contains("or until an event of type order_paid matches"),
            "{}",
            shown.ok()
        );
    }
    // From another conversation: the match is on the order, not the
    // conversation.
    let payment = event(
        "acme",
        "payments",
        "order_paid",
        "gateway",
        json!({ "order_id": 2, "amount": 12 }),
    );
    let payment_id = d
        .post_event(&serde_json::to_value(&payment).expect("JSON"))
        .await;
    let trace = wait_until("the paid order going on", TIMEOUT, || async {
        d.trace("acme", &paid.id.to_string())
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[0]["outcome"], "ok", "{trace:#}");
    assert_eq!(steps[0]["output"]["matched"], true, "{trace:#}");
    assert_eq!(steps[0]["output"]["timed_out"], false, "{trace:#}");
    assert_eq!(steps[0]["output"]["event"]["id"], payment_id.as_str());
    assert_eq!(steps[0]["output"]["event"]["event_data"]["amount"], 12);
    assert_eq!(steps[1]["logs"][0]["message"], "paid: 12", "{trace:#}");
    // The unpaid order is still waiting, then times out.
    let trace = d
        .trace("acme", &unpaid.id.to_string())
        .await
        .expect("a trace");
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let trace = wait_until("the unpaid order timing out", TIMEOUT, || async {
        d.trace("acme", &unpaid.id.to_string())
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[0]["output"]["timed_out"], true, "{trace:#}");
    assert_eq!(steps[0]["output"]["matched"], false, "{trace:#}");
    assert_eq!(steps[0]["output"]["event"], Value::Null, "{trace:#}");
    assert_eq!(steps[1]["logs"][0]["message"], "paid: never", "{trace:#}");
}

/// Conditions of paused runs' matches are checked at apply: the field named,
/// a name other than `event`, `paused` and `steps` refused.
#[tokio::test]
async fn bad_matches_are_refused_at_apply() {
    let d = Dispatcher::embedded();
    let cases = [
        (
            r#"cancel_on = { event_type = "replied", match = "event.x ==" }
[[chains.steps]]
handler = "delay"
config = { duration = "1s" }"#,
            "cancel_on.match",
        ),
        (
            r#"[[chains.steps]]
name = "paid"
handler = "wait_for_event"
config = { event_type = "order_paid", match = "event.id == pasued.id", timeout = "1m" }"#,
            "config.match",
        ),
        (
            r#"[[chains.steps]]
name = "paid"
handler = "wait_for_event"
config = { event_type = "order_paid", timeout = "0s" }"#,
            "config.timeout",
        ),
        (
            r#"[[chains.steps]]
name = "paid"
handler = "wait_for_event"
config = { event_type = "order_paid" }"#,
            "config.timeout",
        ),
    ];
    for (body, field) in cases {
        let text = format!(
            "account_key = \"acme\"\n\n[[chains]]\nname = \"shop\"\nconversation_type = \"shop\"\n\
             event_type = \"order_placed\"\n{body}\n"
        );
        let path = d.file("bad.toml", &text);
        let out = d
            .cli(&["chains", "apply", path.to_str().expect("a UTF-8 path")])
            .await;
        let line = out.fails();
        assert!(
            line.contains(r#"chain "shop""#) && line.contains(field),
            "{body}: {line:?} lacks {field:?}"
        );
    }
}

const SCHEDULED: &str = r#"
account_key = "acme"

[[chains]]
name = "booking"
conversation_type = "survey"
event_type = "booked"
cancel_on = { event_type = "replied" }

[[chains.steps]]
name = "remind"
handler = "send_sms"
config = { provider = "gateway", to = "{{ event.event_data.msisdn }}", body = "see you, {{ event.event_data.msisdn }}", scheduled_at = "{{ event.event_data.at }}" }

[[chains.steps]]
name = "after"
handler = "log"
config = { message = "reminder {{ steps.remind.status }}" }
"#;

/// Scheduled sends: messages recorded `scheduled` go at their time, not
/// before, once, across a SIGKILL; one cancelled by the account and one
/// cancelled by the chain's `cancel_on` never go; a message that went can
/// no longer be cancelled; a `scheduled_at` that is no time is refused.
#[tokio::test]
async fn scheduled_sends_go_at_their_time_unless_cancelled() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(Some(&nats), &config(&receiver));

    let bad = SCHEDULED.replace("{{ event.event_data.at }}", "tomorrow at nine");
    let path = d.file("bad.toml", &bad);
    let out = d
        .cli(&["chains", "apply", path.to_str().expect("a UTF-8 path")])
        .await;
    let line = out.fails();
    for part in [r#"chain "booking""#, "remind", "config.scheduled_at"] {
        assert!(line.contains(part), "{line:?} lacks {part:?}");
    }
    d.apply_chains("acme.toml", SCHEDULED).await;

    let due = time::OffsetDateTime::now_utc() + Duration::from_secs(5);
    let due = due.replace_nanosecond(0).expect("a whole second");
    let due_ms = due.unix_timestamp_nanos() / 1_000_000;
    let at = due
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let booked = |conversation: &str, msisdn: &str| {
        event(
            "acme",
            "survey",
            "booked",
            conversation,
            json!({ "msisdn": msisdn, "at": at }),
        )
    };
    let kept = booked("c-kept", "+27820000021");
    let by_account = booked("c-account", "+27820000022");
    let by_reply = booked("c-reply", "+27820000023");
    // Expires before its message is due: the message is cancelled with it.
    let mut expiring = booked("c-expiring", "+27820000024");
    expiring.expires_at = Some(time::OffsetDateTime::now_utc() + Duration::from_secs(2));
    let mut message_of = std::collections::HashMap::new();
    for e in [&kept, &by_account, &by_reply, &expiring] {
        d.post_event(&serde_json::to_value(e).expect("JSON")).await;
    }
    for e in [&kept, &by_account, &by_reply, &expiring] {
        let trace = d.wait_for_trace("acme", &e.id.to_string(), TIMEOUT).await;
        assert_eq!(trace["status"], "waiting", "{trace:#}");
        let step = &trace["chains"][0]["steps"][0];
        assert_eq!(step["outcome"], "waiting", "{trace:#}");
        assert_eq!(step["output"]["status"], "scheduled", "{trace:#}");
        assert_eq!(step["output"]["scheduled_at"], at.as_str(), "{trace:#}");
        let id = step["output"]["message_id"].as_str().expect("a message id");
        message_of.insert(e.id, id.to_string());
    }
    let listed = d.cli(&["messages", "list", "acme", "--json"]).await.json();
    let messages = listed["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 4, "{listed:#}");
    for m in messages {
        assert_eq!(m["status"], "scheduled", "{m:#}");
        assert_eq!(m["scheduled_at"], at.as_str(), "{m:#}");
    }

    // Cancelled by the account, and by a reply in its conversation.
    let cancelled = d
        .cli(&["messages", "cancel", "acme", &message_of[&by_account.id]])
        .await;
    assert!(
        cancelled.ok().contains("cancelled message"),
        "{}",
        cancelled.ok()
    );
    let reply = event("acme", "survey", "replied", "c-reply", json!({}));
    d.post_event(&serde_json::to_value(&reply).expect("JSON"))
        .await;
    wait_until("the reply's cancellation", TIMEOUT, || async {
        d.trace("acme", &by_reply.id.to_string())
            .await
            .filter(|t| t["status"] == "cancelled")
    })
    .await;

    // Killed before the time and started again: the kept one goes once,
    // not early.
    assert!(
        now_ms() < due_ms,
        "the time came before the kill: the test proves too little"
    );
    d.kill9();
    d.restart();
    let sent = wait_until("the scheduled SMS", TIMEOUT, || async {
        let sent = sms_saying(&receiver, "see you").await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    let at_ms = i128::from(sent[0]["at_ms"].as_i64().expect("at_ms"));
    assert!(at_ms >= due_ms, "sent {} ms early", due_ms - at_ms);
    let trace = wait_until("the kept booking's end", TIMEOUT, || async {
        d.trace("acme", &kept.id.to_string())
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[0]["output"]["status"], "sent", "{trace:#}");
    assert_eq!(steps[1]["logs"][0]["message"], "reminder sent", "{trace:#}");
    // The account's cancel: the chain goes on, its message never sent.
    let trace = wait_until("the cancelled booking's end", TIMEOUT, || async {
        d.trace("acme", &by_account.id.to_string())
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    let steps = &trace["chains"][0]["steps"];
    assert_eq!(steps[0]["output"]["status"], "cancelled", "{trace:#}");

    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = sms_saying(&receiver, "see you").await;
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert!(
        sent[0]["body"]
            .as_str()
            .is_some_and(|b| b.contains("+27820000021")),
        "{sent:#?}"
    );
    let status = |id: &str| {
        let d = &d;
        let id = id.to_string();
        async move { d.cli(&["messages", "show", "acme", &id]).await.json() }
    };
    assert_eq!(status(&message_of[&kept.id]).await["status"], "sent");
    assert_eq!(
        status(&message_of[&by_account.id]).await["status"],
        "cancelled"
    );
    let m = status(&message_of[&by_reply.id]).await;
    assert_eq!(m["status"], "cancelled", "{m:#}");
    let cause = m["transitions"][1]["cause"].as_str().unwrap_or_default();
    assert!(cause.contains(&reply.id.to_string()), "{m:#}");
    let trace = wait_until("the expiring booking's end", TIMEOUT, || async {
        d.trace("acme", &expiring.id.to_string())
            .await
            .filter(|t| t["status"] == "expired")
    })
    .await;
    assert_eq!(
        trace["chains"][0]["steps"][0]["name"], "remind",
        "{trace:#}"
    );
    let m = status(&message_of[&expiring.id]).await;
    assert_eq!(m["status"], "cancelled", "{m:#}");
    let cause = m["transitions"][1]["cause"].as_str().unwrap_or_default();
    assert!(cause.contains("expired"), "{m:#}");

    // What went can no longer be cancelled.
    let refused = d
        .cli(&["messages", "cancel", "acme", &message_of[&kept.id]])
        .await;
    assert!(
        refused.fails().contains("not scheduled"),
        "{}",
        refused.fails()
    );
    let timers = d.cli(&["timers", "list", "acme", "--json"]).await.json();
    assert_eq!(timers["timers"], json!([]));
}

/// `order = "conversation"`: a later event of the conversation waits for
/// the chain's paused run of an earlier one to end, then runs; an event of
/// another conversation goes ahead at once.
#[tokio::test]
async fn with_order_conversation_a_later_event_waits_for_the_paused_run() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::with_config(None, &config(&receiver));
    d.apply_chains(
        "acme.toml",
        &REMINDER
            .replace(
                "event_type = \"signed_up\"\n",
                "event_type = \"signed_up\"\norder = \"conversation\"\n",
            )
            .replace(r#"duration = "2s""#, r#"duration = "4s""#)
            .replace(
                r#"body = "welcome""#,
                r#"body = "welcome {{ event.event_data.n }}""#,
            )
            .replace(
                r#"body = "reminder""#,
                r#"body = "reminder {{ event.event_data.n }}""#,
            ),
    )
    .await;
    let post = |conversation: &str, n: u32| {
        let e = event(
            "acme",
            "survey",
            "signed_up",
            conversation,
            json!({ "msisdn": "+27820000009", "n": n }),
        );
        serde_json::to_value(&e).expect("JSON")
    };
    let first = d.post_event(&post("c-1", 1)).await;
    d.wait_for_trace("acme", &first, TIMEOUT).await;
    let second = d.post_event(&post("c-1", 2)).await;
    let other = d.post_event(&post("c-2", 3)).await;

    // The second waits for a slot, with no time to show; the other
    // conversation's goes ahead.
    let held = d.wait_for_trace("acme", &second, TIMEOUT).await;
    assert_eq!(held["status"], "waiting", "{held:#}");
    let flow = &held["chains"][0]["flow"][0];
    assert_eq!(flow["control"], "concurrency", "{held:#}");
    assert_eq!(flow["result"], "held", "{held:#}");
    assert_eq!(flow["key"], "c-1", "{held:#}");
    assert!(held["chains"][0].get("waiting_until").is_none(), "{held:#}");
    d.wait_for_trace("acme", &other, TIMEOUT).await;
    assert_eq!(sms_saying(&receiver, "welcome 3").await.len(), 1);
    assert!(sms_saying(&receiver, "welcome 2").await.is_empty());

    // Once the first run ends, the second runs, after it.
    let at = |sent: Vec<Value>| sent[0]["at_ms"].as_i64().expect("at_ms");
    let welcome = wait_until("the second's welcome", TIMEOUT, || async {
        let sent = sms_saying(&receiver, "welcome 2").await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    let reminded = sms_saying(&receiver, "reminder 1").await;
    assert_eq!(
        reminded.len(),
        1,
        "the first run ended before the second began"
    );
    assert!(at(welcome) >= at(reminded));
    wait_until("the second's end", TIMEOUT, || async {
        d.trace("acme", &second)
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    assert_eq!(sms_saying(&receiver, "reminder 2").await.len(), 1);
}

/// A run under way follows its chain by name: a paused run goes on after
/// its chain's match was edited so the event no longer matches it; a
/// paused run whose chain was removed stops there (`removed`), and a
/// scheduled send's messages are cancelled with it, and its waiters go.
#[tokio::test]
async fn paused_runs_outlive_an_edit_of_their_chain_and_stop_when_it_is_removed() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let mut d = Dispatcher::with_config(None, &config(&receiver));
    let reminder = REMINDER.replace(r#"duration = "2s""#, r#"duration = "3s""#);
    let at = switchboard_sdk::format_rfc3339(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(5),
    );
    d.apply_chains(
        "acme.toml",
        &format!("{reminder}\n{}", chains_of(SCHEDULED)),
    )
    .await;
    let signed_up = event(
        "acme",
        "survey",
        "signed_up",
        "c-1",
        json!({ "msisdn": "+27820000011" }),
    );
    let booked = event(
        "acme",
        "survey",
        "booked",
        "c-2",
        json!({ "msisdn": "+27820000012", "at": at }),
    );
    let paused = d
        .post_event(&serde_json::to_value(&signed_up).expect("JSON"))
        .await;
    let scheduled = d
        .post_event(&serde_json::to_value(&booked).expect("JSON"))
        .await;
    for id in [&paused, &scheduled] {
        let trace = d.wait_for_trace("acme", id, TIMEOUT).await;
        assert_eq!(trace["status"], "waiting", "{trace:#}");
    }

    // The reminder chain now matches another event type; the booking
    // chain is gone; a chain added for `signed_up` does not start for the
    // paused event when it comes back (it was not selected for it).
    d.apply_chains(
        "acme.toml",
        &format!(
            "{}\n[[chains]]\nname = \"greet\"\nevent_type = \"signed_up\"\n\
             [[chains.steps]]\nhandler = \"log\"\nconfig = {{ message = \"hello\" }}\n",
            reminder.replace(
                "event_type = \"signed_up\"\n",
                "event_type = \"registered\"\n",
            )
        ),
    )
    .await;
    let trace = wait_until("the edited chain's run going on", TIMEOUT, || async {
        d.trace("acme", &paused)
            .await
            .filter(|t| t["status"] == "done")
    })
    .await;
    assert_eq!(trace["chains"][0]["steps"][2]["outcome"], "ok", "{trace:#}");
    let ran: Vec<&Value> = trace["chains"]
        .as_array()
        .expect("its chains")
        .iter()
        .map(|c| &c["name"])
        .collect();
    assert_eq!(ran, [&json!("remind")], "{trace:#}");
    assert_eq!(sms_saying(&receiver, "reminder").await.len(), 1);

    // The removed chain's run stops when its timer brings it back.
    let trace = wait_until("the removed chain's run stopping", TIMEOUT, || async {
        d.trace("acme", &scheduled)
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "cancelled", "{trace:#}");
    let listed = d.cli(&["messages", "list", "acme", "--json"]).await.json();
    let message = listed["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["recipient"] == "+27820000012"))
        .unwrap_or_else(|| panic!("the scheduled message in {listed:#}"));
    assert_eq!(message["status"], "cancelled", "{message:#}");
    assert!(sms_saying(&receiver, "see you").await.is_empty());
    // Its `cancel_on` waiter went with it.
    d.stop();
    assert_eq!(waiters_in(&d.data_dir(), false), 0);
}

/// The `[[chains]]` of a chain file, without its account line.
fn chains_of(file: &str) -> String {
    file.replace("account_key = \"acme\"\n", "")
}

/// An event that a paused run both waits for (`wait_for_event`) and is
/// cancelled by (its chain's `cancel_on`) cancels it: the cancel is not
/// overwritten by the wait's match.
#[tokio::test]
async fn an_event_both_awaited_and_cancelling_cancels_the_run() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "order"
conversation_type = "shop"
event_type = "order_placed"
cancel_on = { event_type = "order_update", match = "event.event_data.status == \"cancelled\"" }

[[chains.steps]]
name = "update"
handler = "wait_for_event"
config = { event_type = "order_update", match = "event.conversation_key == paused.conversation_key", timeout = "30s" }

[[chains.steps]]
handler = "log"
config = { message = "updated" }
"#,
    )
    .await;
    let placed = event("acme", "shop", "order_placed", "order-1", json!({}));
    d.post_event(&serde_json::to_value(&placed).expect("JSON"))
        .await;
    let trace = d
        .wait_for_trace("acme", &placed.id.to_string(), TIMEOUT)
        .await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let update = event(
        "acme",
        "shop",
        "order_update",
        "order-1",
        json!({ "status": "cancelled" }),
    );
    d.post_event(&serde_json::to_value(&update).expect("JSON"))
        .await;
    let trace = wait_until("the paused run's end", TIMEOUT, || async {
        d.trace("acme", &placed.id.to_string())
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "cancelled", "{trace:#}");
}

/// A run paused waiting for an event of a type its chain, edited since,
/// no longer awaits still goes on when such an event comes: edits do not
/// leave paused runs unreachable until their timeout.
#[tokio::test]
async fn a_run_paused_before_its_chain_was_edited_is_still_reached() {
    let d = Dispatcher::embedded();
    let chain = |awaited: &str| {
        format!(
            r#"
account_key = "acme"

[[chains]]
name = "order"
conversation_type = "shop"
event_type = "order_placed"

[[chains.steps]]
name = "paid"
handler = "wait_for_event"
config = {{ event_type = "{awaited}", match = "event.event_data.order_id == paused.event_data.order_id", timeout = "10m" }}

[[chains.steps]]
handler = "log"
config = {{ message = "paid" }}
"#
        )
    };
    d.apply_chains("acme.toml", &chain("order_paid")).await;
    let placed = event(
        "acme",
        "shop",
        "order_placed",
        "order-1",
        json!({ "order_id": 1 }),
    );
    d.post_event(&serde_json::to_value(&placed).expect("JSON"))
        .await;
    let trace = d
        .wait_for_trace("acme", &placed.id.to_string(), TIMEOUT)
        .await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");

    // The chain now waits for another type; the run paused before waits
    // for the one it was given.
    d.apply_chains("acme.toml", &chain("payment_done")).await;
    let paid = event(
        "acme",
        "payments",
        "order_paid",
        "gateway",
        json!({ "order_id": 1 }),
    );
    d.post_event(&serde_json::to_value(&paid).expect("JSON"))
        .await;
    let trace = wait_until("the paused run going on", TIMEOUT, || async {
        d.trace("acme", &placed.id.to_string())
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let step = &trace["chains"][0]["steps"][0];
    assert_eq!(step["output"]["matched"], true, "{trace:#}");
    assert_eq!(
        step["output"]["event"]["id"],
        paid.id.to_string(),
        "{trace:#}"
    );
}

/// The waiters of the runs of the store in `dir` (the dispatcher stopped),
/// removed if `remove`: as if a crash had taken them between the pause's
/// journal write and theirs. Returns how many there were.
fn waiters_in(dir: &std::path::Path, remove: bool) -> usize {
    use switchboard_store::{Collection, Store, Write};
    let store = Store::open(&dir.join("store")).expect("the store opens");
    let waiters = store
        .scan_prefix(Collection::Waiters, b"acme\0")
        .expect("the waiters read");
    if remove {
        let removals: Vec<Write> = waiters
            .iter()
            .map(|(k, _)| Write {
                collection: Collection::Waiters,
                key: k.clone(),
                value: None,
            })
            .collect();
        store
            .write_atomically(&removals)
            .expect("the waiters removed");
    }
    waiters.len()
}

/// A run whose waiters were lost after its pause was journaled (a crash
/// between the two writes) gets them back when its event is delivered
/// again: the awaited event still resumes it and its chain's `cancel_on`
/// still cancels it, instead of both waiting out the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_run_handled_again_after_losing_its_waiters_is_still_reached() {
    let nats = NatsServer::start();
    let mut d = Dispatcher::nats(&nats);
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "order"
conversation_type = "shop"
event_type = "order_placed"
cancel_on = { event_type = "order_cancelled" }

[[chains.steps]]
name = "paid"
handler = "wait_for_event"
config = { event_type = "order_paid", match = "event.event_data.order_id == paused.event_data.order_id", timeout = "1h" }

[[chains.steps]]
handler = "log"
config = { message = "paid" }
"#,
    )
    .await;
    let in_order = |conversation: &str, event_type: &str| {
        event(
            "acme",
            "shop",
            event_type,
            conversation,
            json!({ "order_id": conversation }),
        )
    };
    let (paid, cancelled) = (
        in_order("order-1", "order_placed"),
        in_order("order-2", "order_placed"),
    );
    for e in [&paid, &cancelled] {
        d.post_event(&serde_json::to_value(e).expect("JSON")).await;
        let trace = d.wait_for_trace("acme", &e.id.to_string(), TIMEOUT).await;
        assert_eq!(trace["status"], "waiting", "{trace:#}");
    }
    d.stop();
    // Each run waits for its payment and for its cancellation.
    assert_eq!(waiters_in(&d.data_dir(), true), 4);
    d.restart();

    // Delivered again, as after a crash before their acks, then the
    // events that reach them, each in its run's conversation (after it).
    deliver_again(
        nats.url(),
        &[
            paid.clone(),
            cancelled.clone(),
            in_order("order-1", "order_paid"),
            in_order("order-2", "order_cancelled"),
        ],
    )
    .await;
    let trace = wait_until("the paid order going on", TIMEOUT, || async {
        d.trace("acme", &paid.id.to_string())
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(
        trace["chains"][0]["steps"][0]["output"]["matched"], true,
        "{trace:#}"
    );
    let trace = wait_until("the cancelled order's end", TIMEOUT, || async {
        d.trace("acme", &cancelled.id.to_string())
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "cancelled", "{trace:#}");
    // Neither run left a waiter behind.
    d.stop();
    assert_eq!(waiters_in(&d.data_dir(), false), 0);
}
