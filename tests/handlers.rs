//! The built-in handlers with side effects, against real peers on loopback:
//! `create_contact`, `send_sms` (HTTP gateway, Twilio, NATS), `send_email`
//! (SMTP), `payment_webhook` (Standard Webhooks), message records, secrets and
//! per-step idempotency.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::peers::{HttpReceiver, SmtpSink, TWILIO_TOKEN, WEBHOOK_SECRET};
use crate::util::{Dispatcher, NatsServer, TIMEOUT, event, wait_until};

/// The dispatcher's config: every provider aimed at the local peers.
fn providers(receiver: &HttpReceiver, smtp: &SmtpSink, with_nats: bool) -> String {
    let recv = receiver.url();
    let port = smtp.port();
    let mut config = format!(
        r#"
[providers.sms.gateway]
type = "http"
url = "{recv}/sms"
from = "Switchboard"

[providers.sms.twilio]
type = "twilio"
account_sid = "AC0123456789"
auth_token = "{TWILIO_TOKEN}"
from = "+15005550006"
base_url = "{recv}"
status_callback = "https://hooks.example.org/twilio/status"

[providers.email.sink]
host = "127.0.0.1"
port = {port}
security = "none"
from = "Switchboard <noreply@example.org>"
"#
    );
    if with_nats {
        config.push_str(
            "\n[providers.sms.smsc]\ntype = \"nats\"\ntransport = \"smsc\"\nfrom = \"1234\"\n",
        );
    }
    config
}

/// The use case: a completed poll creates a contact, texts them, tells the
/// payment gateway and e-mails them.
fn poll_chain(account: &str, hook: &str) -> String {
    format!(
        r#"
account_key = "{account}"

[[chains]]
name = "poll-complete"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}", email = "{{{{ event.event_data.email }}}}", name = "{{{{ event.event_data.name }}}}", fields = {{ score = "{{{{ event.event_data.score }}}}" }} }}

[[chains.steps]]
handler = "send_sms"
config = {{ provider = "gateway", to = "{{{{ steps.create_contact.msisdn }}}}", body = "Thanks {{{{ steps.create_contact.name }}}}, you scored {{{{ event.event_data.score }}}}!" }}

[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{hook}", secret = "gateway", body = {{ msisdn = "{{{{ steps.create_contact.msisdn }}}}", amount = 500, sms = "{{{{ steps.send_sms.message_id }}}}" }} }}

[[chains.steps]]
handler = "send_email"
config = {{ to = "{{{{ steps.create_contact.email }}}}", subject = "Your score: {{{{ event.event_data.score }}}}", text = "Hello {{{{ steps.create_contact.name }}}}", html = "<p>Hello {{{{ steps.create_contact.name }}}}</p>" }}
"#
    )
}

fn step<'a>(trace: &'a Value, chain: &str, name: &str) -> &'a Value {
    trace["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == chain)
        .flat_map(|c| c["steps"].as_array().into_iter().flatten())
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} of chain {chain} in {trace:#}"))
}

/// Another account's webhook secret, which the receiver does not know.
const OTHER_SECRET: &str = "whsec_b3RoZXItYWNjb3VudHMtc2lnbmluZy1rZXk=";

async fn set_secret(d: &Dispatcher, account: &str) {
    d.set_secret(account, "gateway", WEBHOOK_SECRET).await;
}

#[tokio::test]
async fn poll_complete_runs_the_whole_use_case() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &providers(&receiver, &smtp, false));
    set_secret(&d, "acme").await;
    d.apply_chains(
        "acme.toml",
        &poll_chain("acme", &format!("{}/hook/200", receiver.url())),
    )
    .await;

    let e = event(
        "acme",
        "survey",
        "poll_complete",
        "poll-2026",
        json!({"msisdn": "+27 82 000-0001", "email": "Thandi@Example.ORG", "name": "Thandi <3", "score": 4}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");

    // create_contact: normalised keys, output visible to later steps.
    let contact = &step(&trace, "poll-complete", "create_contact")["output"];
    assert_eq!(contact["msisdn"], "+27820000001");
    assert_eq!(contact["email"], "thandi@example.org");
    assert_eq!(contact["created"], true);
    assert_eq!(contact["fields"]["score"], 4);

    // send_sms through the HTTP gateway.
    let sms = &step(&trace, "poll-complete", "send_sms")["output"];
    let gateway = receiver.requests_to("/sms").await;
    assert_eq!(gateway.len(), 1, "{gateway:#?}");
    let body: Value = serde_json::from_str(gateway[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["to"], "+27820000001");
    assert_eq!(body["from"], "Switchboard");
    assert_eq!(body["content"], "Thanks Thandi <3, you scored 4!");
    assert_eq!(body["message_id"], sms["message_id"]);
    assert_eq!(gateway[0]["headers"]["idempotency-key"], sms["message_id"]);
    assert_eq!(sms["remote_id"], "gw-1");

    // payment_webhook: verified by the official Standard Webhooks package.
    let hooks = receiver.requests_to("/hook").await;
    assert_eq!(hooks.len(), 1, "{hooks:#?}");
    assert_eq!(hooks[0]["verified"], true, "{:#}", hooks[0]);
    let body: Value = serde_json::from_str(hooks[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"msisdn": "+27820000001", "amount": 500, "sms": sms["message_id"]})
    );
    let webhook = &step(&trace, "poll-complete", "payment_webhook")["output"];
    assert_eq!(webhook["status"], 200);
    assert_eq!(hooks[0]["headers"]["webhook-id"], webhook["webhook_id"]);

    // send_email: subject, escaped HTML, a text part, the message id header.
    let mail = wait_until("the e-mail", TIMEOUT, || async { smtp.messages().pop() }).await;
    let email_out = &step(&trace, "poll-complete", "send_email")["output"];
    assert_eq!(mail["rcpt_tos"], json!(["thandi@example.org"]));
    assert_eq!(mail["subject"], "Your score: 4");
    assert_eq!(mail["text"].as_str().unwrap().trim(), "Hello Thandi <3");
    assert_eq!(
        mail["html"].as_str().unwrap().trim(),
        "<p>Hello Thandi &lt;3</p>"
    );
    assert_eq!(
        mail["headers"]["x-switchboard-message-id"],
        email_out["message_id"]
    );
    let smtpapi: Value =
        serde_json::from_str(mail["headers"]["x-smtpapi"].as_str().unwrap()).unwrap();
    assert_eq!(
        smtpapi["unique_args"]["switchboard_message_id"],
        email_out["message_id"]
    );
    // SendGrid's events name the account that sent the message.
    assert_eq!(smtpapi["unique_args"]["switchboard_account"], "acme");

    // Message records, with their transitions, linked to the event.
    let (status, messages) = d.get("/v1/accounts/acme/messages").await;
    assert_eq!(status, 200);
    let messages = messages["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    for m in &messages {
        assert_eq!(m["status"], "sent");
        assert_eq!(m["event_id"], id.as_str());
        let path: Vec<&str> = m["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["to"].as_str().unwrap())
            .collect();
        assert_eq!(path, ["pending", "sent"]);
    }
    let sms_record = d
        .cli(&[
            "messages",
            "show",
            "acme",
            sms["message_id"].as_str().unwrap(),
        ])
        .await;
    let sms_record: Value = serde_json::from_str(sms_record.ok()).unwrap();
    assert_eq!(sms_record["channel"], "sms");
    assert_eq!(sms_record["remote_id"], "gw-1");
    assert_eq!(sms_record["body"], "Thanks Thandi <3, you scored 4!");
}

#[tokio::test]
async fn sms_through_twilio_and_a_nats_transport() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(Some(&nats), &providers(&receiver, &smtp, true));
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "notify"
event_type = "notify"
[[chains.steps]]
handler = "send_sms"
name = "by_twilio"
config = { provider = "twilio", to = "{{ event.event_data.msisdn }}", body = "via twilio" }
[[chains.steps]]
handler = "send_sms"
name = "by_transport"
config = { provider = "smsc", to = ["{{ event.event_data.msisdn }}", "+27820000099"], body = "via vumi" }
"#,
    )
    .await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut outbound = client.subscribe("vumi.outbound.smsc").await.unwrap();
    client.flush().await.unwrap();

    let e = event(
        "acme",
        "survey",
        "notify",
        "c1",
        json!({"msisdn": "+27820000005"}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");

    let twilio = receiver
        .requests_to("/2010-04-01/Accounts/AC0123456789/Messages.json")
        .await;
    assert_eq!(twilio.len(), 1, "{twilio:#?}");
    assert_eq!(
        twilio[0]["form"],
        json!({"To": "+27820000005", "From": "+15005550006", "Body": "via twilio",
               "StatusCallback": "https://hooks.example.org/twilio/status"})
    );
    let out = &step(&trace, "notify", "by_twilio")["output"];
    assert!(
        out["remote_id"].as_str().unwrap().starts_with("SM"),
        "{out}"
    );

    let mut commands = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(TIMEOUT, outbound.next())
            .await
            .expect("a command")
            .unwrap();
        commands.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    let out = &step(&trace, "notify", "by_transport")["output"];
    let ids: Vec<&Value> = out["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["message_id"])
        .collect();
    for (command, (to, id)) in commands
        .iter()
        .zip([("+27820000005", ids[0]), ("+27820000099", ids[1])])
    {
        assert_eq!(command["to_addr"], to);
        assert_eq!(command["from_addr"], "1234");
        assert_eq!(command["content"], "via vumi");
        assert_eq!(command["transport_name"], "smsc");
        assert_eq!(&command["message_id"], id);
        assert_eq!(
            command["helper_metadata"]["switchboard"]["event_id"],
            id_str(&e)
        );
    }
}

/// An embedded dispatcher whose Twilio provider gives up on an answer
/// after a second.
fn twilio_timing_out_in_a_second(receiver: &HttpReceiver, smtp: &SmtpSink) -> Dispatcher {
    let config = providers(receiver, smtp, false).replace(
        "status_callback = \"https://hooks.example.org/twilio/status\"",
        "timeout = \"1s\"",
    );
    Dispatcher::with_config(None, &config)
}

/// The requests Twilio's Messages resource got, and their methods.
async fn twilio_calls(receiver: &HttpReceiver) -> (Vec<Value>, Vec<String>) {
    let calls = receiver
        .requests_to("/2010-04-01/Accounts/AC0123456789/Messages.json")
        .await;
    let methods = calls
        .iter()
        .map(|r| r["method"].as_str().unwrap().to_string())
        .collect();
    (calls, methods)
}

/// Twilio takes no idempotency key: a send whose answer is lost after Twilio
/// created the message is found at Twilio on the retry, not sent again —
/// and the same text twice to one number is two messages, each found as
/// its own.
#[tokio::test]
async fn a_twilio_send_whose_answer_is_lost_is_not_sent_again() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let smtp = SmtpSink::start();
    let d = twilio_timing_out_in_a_second(&receiver, &smtp);
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "notify"
event_type = "notify"
[[chains.steps]]
handler = "send_sms"
config = { provider = "twilio", to = ["{{ event.event_data.msisdn }}", "{{ event.event_data.msisdn }}"], body = "Your code is 1234" }
retry = { max_attempts = 6, initial = "50ms", max = "100ms" }
"#,
    )
    .await;
    // Both sends to the number are created at Twilio, and their answers lost.
    receiver.twilio_hang(json!({"+27820000007": 2})).await;
    let e = event(
        "acme",
        "survey",
        "notify",
        "c1",
        json!({"msisdn": "+27820000007"}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    // Each lost answer: the attempt that timed out, one that waits until
    // Twilio's answer could no longer come (twice the timeout), and the one
    // that finds the message at Twilio.
    let send = step(&trace, "notify", "send_sms");
    assert_eq!(send["attempts"], 5, "{send:#}");

    let (calls, methods) = twilio_calls(&receiver).await;
    assert_eq!(methods, ["POST", "GET", "POST", "GET"], "{calls:#?}");
    assert_eq!(calls[1]["query"]["To"], "+27820000007");
    assert_eq!(calls[1]["query"]["From"], "+15005550006");

    // Each message has the sid Twilio gave it when its answer was lost.
    for post in calls.iter().filter(|r| r["method"] == "POST") {
        assert_eq!(post["form"]["Body"], "Your code is 1234");
        assert_eq!(post["answer"], "hang", "{post}");
    }
    let out = &send["output"]["messages"];
    let remote: Vec<&str> = (0..2)
        .map(|i| out[i]["remote_id"].as_str().unwrap())
        .collect();
    assert_ne!(remote[0], remote[1], "{out:#}");
    for (i, m) in out.as_array().unwrap().iter().enumerate() {
        assert_eq!(m["status"], "sent", "{m}");
        let record = d
            .cli(&[
                "messages",
                "show",
                "acme",
                m["message_id"].as_str().unwrap(),
            ])
            .await;
        let record: Value = serde_json::from_str(record.ok()).unwrap();
        assert_eq!(record["remote_id"], remote[i]);
        let path: Vec<&str> = record["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["to"].as_str().unwrap())
            .collect();
        assert_eq!(path, ["pending", "sending", "sent"], "{record:#}");
        let cause = record["transitions"][2]["cause"].as_str().unwrap();
        assert!(
            cause.contains(&format!("found at twilio as {}", remote[i]))
                && cause.contains("not sent again"),
            "{cause}"
        );
    }
}

/// A Twilio send whose answer is lost is looked for at Twilio as it was
/// handed over: a template that renders otherwise on the retry (its `now`
/// has moved on) still finds the message Twilio created, and it is not
/// sent again.
#[tokio::test]
async fn a_twilio_send_whose_text_renders_otherwise_on_the_retry_is_found_as_it_went() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let smtp = SmtpSink::start();
    let d = twilio_timing_out_in_a_second(&receiver, &smtp);
    let template = d.file(
        "code.toml",
        "channel = \"sms\"\ntext = \"Your code, as of {{ now }}: 1234\"\n",
    );
    d.cli(&[
        "templates",
        "put",
        "acme",
        "code",
        template.to_str().expect("a UTF-8 path"),
    ])
    .await
    .ok();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "notify"
event_type = "notify"
[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}" }
[[chains.steps]]
handler = "send_sms"
config = { provider = "twilio", template = "code", recipients = ["{{ event.event_data.msisdn }}"] }
retry = { max_attempts = 6, initial = "50ms", max = "100ms" }
"#,
    )
    .await;
    receiver.twilio_hang(json!({"+27820000008": 1})).await;
    let e = event(
        "acme",
        "survey",
        "notify",
        "c1",
        json!({"msisdn": "+27820000008"}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let (calls, methods) = twilio_calls(&receiver).await;
    assert_eq!(methods, ["POST", "GET"], "{calls:#?}");
    let sent = calls[0]["form"]["Body"].as_str().unwrap();
    assert!(sent.starts_with("Your code, as of "), "{sent}");
    let send = step(&trace, "notify", "send_sms");
    let message = &send["output"]["messages"][0];
    assert_eq!(message["status"], "sent", "{send:#}");
    assert!(message["remote_id"].as_str().is_some(), "{send:#}");
}

fn id_str(e: &switchboard_sdk::VumiApiEvent) -> String {
    e.id.to_string()
}

#[tokio::test]
async fn failures_give_the_documented_outcome() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &providers(&receiver, &smtp, false));
    set_secret(&d, "acme").await;
    let recv = receiver.url();
    let fast = "retry = { max_attempts = 3, initial = \"50ms\", max = \"200ms\" }";
    let chains = format!(
        r#"
account_key = "acme"

[[chains]]
name = "flaky"
event_type = "flaky"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/500,200", secret = "gateway" }}, {fast} }}]

[[chains]]
name = "throttled"
event_type = "throttled"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/429:1,200", secret = "gateway" }}, {fast} }}]

[[chains]]
name = "bad-request"
event_type = "bad_request"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/400", secret = "gateway" }}, {fast} }}]

[[chains]]
name = "slow"
event_type = "slow"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/hang", secret = "gateway", timeout = "500ms" }}, retry = {{ max_attempts = 2, initial = "50ms" }} }}]

[[chains]]
name = "patient"
event_type = "patient"
steps = [{{ handler = "payment_webhook", config = {{ url = "{recv}/hook/200", secret = "gateway", timeout = "{{{{ event.event_data.timeout | default('1h') }}}}" }} }}]

[[chains]]
name = "down"
event_type = "down"
steps = [{{ handler = "payment_webhook", config = {{ url = "http://127.0.0.1:9/hook", secret = "gateway" }}, {fast} }}]

[[chains]]
name = "bad-number"
event_type = "bad_number"
steps = [{{ handler = "create_contact", config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }} }}]

[[chains]]
name = "refused-mail"
event_type = "refused_mail"
steps = [{{ handler = "send_email", config = {{ to = "reject@example.org", subject = "s", text = "t" }} }}]
"#
    );
    d.apply_chains("acme.toml", &chains).await;

    let run = |et: &'static str| {
        let d = &d;
        async move {
            let e = event("acme", "test", et, et, json!({"msisdn": "12345"}));
            let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
            let trace = d.wait_for_trace("acme", &id, Duration::from_secs(30)).await;
            let chain = trace["chains"][0].clone();
            (trace, chain["steps"][0].clone())
        }
    };

    // A step may not wait an hour for an answer (a literal `timeout` of an
    // hour is refused at apply; this one is a template): it fails for good,
    // saying so, before anything is sent.
    let (trace, s) = run("patient").await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    assert_eq!(s["outcome"], "failed", "{trace:#}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("config.timeout: 3600s is longer than the 300s")),
        "{trace:#}"
    );
    assert!(receiver.requests_to("/hook/200").await.is_empty());

    // 500 then 200: retried, same webhook-id both times.
    let (trace, s) = run("flaky").await;
    assert_eq!(
        (
            trace["status"].as_str(),
            s["outcome"].as_str(),
            s["attempts"].as_u64()
        ),
        (Some("done"), Some("ok"), Some(2)),
        "{trace:#}"
    );
    let hooks = receiver.requests_to("/hook/500,200").await;
    assert_eq!(hooks.len(), 2);
    assert_eq!(
        hooks[0]["headers"]["webhook-id"],
        hooks[1]["headers"]["webhook-id"]
    );
    assert!(hooks.iter().all(|h| h["verified"] == true));

    // 429 with Retry-After: 1 → waited about a second, then succeeded.
    let (trace, s) = run("throttled").await;
    assert_eq!(
        (s["outcome"].as_str(), s["attempts"].as_u64()),
        (Some("ok"), Some(2)),
        "{trace:#}"
    );
    let started = time_of(&trace["started_at"]);
    let finished = time_of(&trace["finished_at"]);
    assert!(
        finished - started >= 0.9,
        "Retry-After was not honoured: {started} → {finished}"
    );

    // 400: permanent, one attempt, dead letter with the response.
    let (trace, s) = run("bad_request").await;
    assert_eq!(
        (
            trace["status"].as_str(),
            s["outcome"].as_str(),
            s["attempts"].as_u64()
        ),
        (Some("dead"), Some("failed"), Some(1))
    );
    assert!(
        s["error"].as_str().unwrap().contains("answered HTTP 400"),
        "{s}"
    );

    // No answer in time: retried, then given up.
    let (trace, s) = run("slow").await;
    assert_eq!(
        (trace["status"].as_str(), s["attempts"].as_u64()),
        (Some("dead"), Some(2)),
        "{trace:#}"
    );
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("no answer within 500ms"),
        "{s}"
    );
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 attempts"),
        "{s}"
    );

    // Gateway down: retried, then dead.
    let (trace, s) = run("down").await;
    assert_eq!(
        (trace["status"].as_str(), s["attempts"].as_u64()),
        (Some("dead"), Some(3)),
        "{trace:#}"
    );

    // Invalid msisdn: permanent, names the value.
    let (_, s) = run("bad_number").await;
    assert_eq!(s["attempts"], 1);
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("\"12345\" is not an E.164 number"),
        "{s}"
    );

    // SMTP refusing the recipient: permanent; the message record says failed.
    let (_, s) = run("refused_mail").await;
    assert_eq!(
        (s["outcome"].as_str(), s["attempts"].as_u64()),
        (Some("failed"), Some(1)),
        "{s}"
    );
    assert!(s["error"].as_str().unwrap().contains("550"), "{s}");
    let (_, messages) = d.get("/v1/accounts/acme/messages").await;
    let failed: Vec<&Value> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["recipient"] == "reject@example.org")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["status"], "failed");

    // Every failure above is in dead letters, with chain, step and error.
    let letters = d.dead_letters("acme").await;
    let mut chains: Vec<&str> = letters
        .iter()
        .map(|l| l["chain"].as_str().unwrap())
        .collect();
    chains.sort();
    assert_eq!(
        chains,
        [
            "bad-number",
            "bad-request",
            "down",
            "patient",
            "refused-mail",
            "slow"
        ]
    );
}

fn time_of(v: &Value) -> f64 {
    let t = time::OffsetDateTime::parse(
        v.as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    t.unix_timestamp_nanos() as f64 / 1e9
}

#[tokio::test]
async fn contacts_secrets_and_idempotency_are_per_account() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &providers(&receiver, &smtp, false));
    let recv = receiver.url();
    let chains = |account: &str| {
        let chains = format!(
            r#"
account_key = "{account}"
[[chains]]
name = "order"
event_type = "order"
[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}", name = "{account} customer" }}
[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{recv}/hook/200", secret = "gateway", body = {{ order = "{{{{ event.event_data.order }}}}" }} }}
idempotency = {{ key = "{{{{ event.event_data.order }}}}", window = "1h" }}
"#
        );
        chains
    };
    // Secrets: set from stdin-like --value, listed by name only, never read back.
    set_secret(&d, "acme").await;
    d.apply_chains("acme.toml", &chains("acme")).await;
    let listed = d.cli(&["secrets", "list", "acme", "--json"]).await.json();
    assert_eq!(listed["secrets"], json!(["gateway"]));
    assert!(!listed.to_string().contains(WEBHOOK_SECRET));
    assert_eq!(
        d.cli(&["secrets", "list", "other", "--json"]).await.json()["secrets"],
        json!([])
    );
    // acme's secret is not other's: other's chain naming it is refused
    // until other sets its own.
    let path = d.file("other.toml", &chains("other"));
    let refused = d
        .cli(&["chains", "apply", path.to_str().expect("a UTF-8 path")])
        .await;
    assert!(
        refused
            .fails()
            .contains("account other has no secret named \"gateway\"; set it first with `switchboard secrets set other gateway`"),
        "{}",
        refused.stderr
    );
    d.set_secret("other", "gateway", OTHER_SECRET).await;
    d.apply_chains("other.toml", &chains("other")).await;

    let send = |account: &'static str, order: &'static str| {
        let d = &d;
        async move {
            let e = event(
                account,
                "shop",
                "order",
                order,
                json!({"msisdn": "+27820000042", "order": order}),
            );
            let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
            d.wait_for_trace(account, &id, TIMEOUT).await
        }
    };
    let first = send("acme", "A-1").await;
    assert_eq!(
        step(&first, "order", "payment_webhook")["outcome"],
        "ok",
        "{first:#}"
    );
    let again = send("acme", "A-1").await;
    let skipped = step(&again, "order", "payment_webhook");
    assert_eq!(skipped["outcome"], "skipped", "{again:#}");
    assert_eq!(skipped["output"]["skipped"], true);
    assert_eq!(receiver.requests_to("/hook").await.len(), 1);
    // The same order number in another account is another key, and its
    // webhook is signed with that account's own secret (which the receiver,
    // holding acme's, cannot verify): nothing crosses accounts.
    let other = send("other", "A-1").await;
    let sent = step(&other, "order", "payment_webhook");
    assert_eq!(sent["outcome"], "ok", "{other:#}");
    let hooks = receiver.requests_to("/hook").await;
    assert_eq!(hooks.len(), 2, "{hooks:#?}");
    assert_eq!(hooks[0]["verified"], true);
    assert_eq!(hooks[1]["verified"], false);

    // Contacts: one per account for the same number, each invisible to the other.
    let acme_contact = &step(&first, "order", "create_contact")["output"];
    let other_contact = &step(&other, "order", "create_contact")["output"];
    assert_ne!(acme_contact["key"], other_contact["key"]);
    assert_eq!(
        step(&again, "order", "create_contact")["output"]["created"],
        false
    );
    let (status, _) = d
        .get(&format!(
            "/v1/accounts/other/contacts/{}",
            acme_contact["key"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 404);
    let (_, list) = d.get("/v1/accounts/other/contacts").await;
    let names: Vec<&str> = list["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other customer"]);
    let shown = d.cli(&["contacts", "show", "acme", "+27820000042"]).await;
    let shown: Value = serde_json::from_str(shown.ok()).unwrap();
    assert_eq!(shown["name"], "acme customer");
    let listed = d.cli(&["contacts", "list", "other"]).await;
    assert!(!listed.ok().contains("acme customer"), "{}", listed.ok());
}

/// A step slower than the bus's ack wait is not handed to anyone else while
/// it runs: the dispatcher reports progress, so the call is made once.
#[tokio::test]
async fn a_step_slower_than_the_ack_wait_runs_once() {
    let nats = NatsServer::start();
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let smtp = SmtpSink::start();
    let config = format!(
        "[bus]\nack_wait_secs = 1\n{}",
        providers(&receiver, &smtp, false)
    );
    let d = Dispatcher::with_config(Some(&nats), &config);
    set_secret(&d, "acme").await;
    let hook = format!("{}/hook/hang", receiver.url());
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "acme"
[[chains]]
name = "slow"
event_type = "slow"
steps = [{{ handler = "payment_webhook", config = {{ url = "{hook}", secret = "gateway", timeout = "10s" }} }}]
"#
        ),
    )
    .await;
    let e = event("acme", "test", "slow", "c1", json!({}));
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(step(&trace, "slow", "payment_webhook")["attempts"], 1);
    // Without progress reports JetStream would have redelivered the event
    // after one second, and the webhook would have been called again.
    assert_eq!(receiver.requests_to("/hook/hang").await.len(), 1);
    assert_eq!(d.metric("handled", "acme").await, 1);
}

/// Webhook URLs are written by accounts, so they may not reach the
/// deployment's own network: private, link-local and denied addresses fail
/// the step at once with a message saying why, and nothing is sent; a host
/// name is checked by every address it resolves to.
#[tokio::test]
async fn webhooks_to_refused_addresses_fail_permanently_and_send_nothing() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let port = receiver
        .url()
        .rsplit(':')
        .next()
        .expect("a port")
        .to_string();
    // The test harness allows 127.0.0.1 (the receivers' address); the config
    // denies the name `denied.localhost` on top.
    let d = Dispatcher::with_config(None, "[outbound]\ndeny = [\"denied.localhost\"]\n");
    set_secret(&d, "acme").await;
    let step = |url: String| {
        format!(
            "steps = [{{ handler = \"payment_webhook\", config = {{ url = \"{url}\", secret = \"gateway\" }}, retry = {{ max_attempts = 3, initial = \"50ms\" }} }}]"
        )
    };
    let chains = format!(
        r#"
account_key = "acme"

[[chains]]
name = "private"
event_type = "private"
{}

[[chains]]
name = "metadata"
event_type = "metadata"
{}

[[chains]]
name = "denied"
event_type = "denied"
{}

[[chains]]
name = "by-name"
event_type = "by_name"
{}
"#,
        step("http://10.255.255.1/hook/200".into()),
        step("http://169.254.169.254/latest/meta-data".into()),
        step(format!("http://denied.localhost:{port}/hook/200")),
        // localhost resolves to 127.0.0.1 (allowed) and ::1 (not): the
        // request goes to the allowed address.
        step(format!("http://localhost:{port}/hook/200")),
    );
    d.apply_chains("acme.toml", &chains).await;

    for (event_type, expected) in [
        ("private", "10.255.255.1, a private address"),
        ("metadata", "169.254.169.254, a link-local address"),
        ("denied", "denied.localhost is in outbound.deny"),
    ] {
        let e = event("acme", "test", event_type, event_type, json!({}));
        let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
        let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
        assert_eq!(trace["status"], "dead", "{trace:#}");
        let step = &trace["chains"][0]["steps"][0];
        assert_eq!(step["attempts"], 1, "refusals are not retried: {trace:#}");
        let error = step["error"].as_str().expect("an error");
        assert!(
            error.contains("refused by the outbound policy") && error.contains(expected),
            "{event_type}: {error}"
        );
    }
    let e = event("acme", "test", "by_name", "by-name", json!({}));
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let hooks = receiver.requests_to("/hook").await;
    assert_eq!(
        hooks.len(),
        1,
        "only the allowed request was sent: {hooks:#?}"
    );
    assert_eq!(hooks[0]["headers"]["host"], format!("localhost:{port}"));
}

/// The catalog serves each built-in handler's options as a JSON Schema, and
/// `chains apply` gives the same verdict as that schema on every config
/// below: a form built from the catalog cannot accept what apply refuses,
/// nor refuse what it accepts.
#[tokio::test]
async fn the_catalog_and_chains_apply_agree() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &providers(&receiver, &smtp, false));
    set_secret(&d, "acme").await;
    let (status, catalog) = d.get("/v1/handlers").await;
    assert_eq!(status, 200, "{catalog}");
    let names: Vec<&str> = catalog["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "create_contact",
            "delay",
            "digest",
            "emit",
            "log",
            "notify",
            "payment_webhook",
            "send_email",
            "send_sms",
            "wait_for_event"
        ]
    );
    let entry = |name: &str| {
        catalog["handlers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap()
            .clone()
    };
    let sms = entry("send_sms");
    assert_eq!(sms["effects"], "external");
    // A provider always; then an inline message or a template.
    assert_eq!(sms["options"]["required"], json!(["provider"]));
    let ways: Vec<(Value, Value)> = sms["options"]["oneOf"]
        .as_array()
        .expect("the ways of giving a message")
        .iter()
        .map(|w| (w["description"].clone(), w["required"].clone()))
        .collect();
    assert_eq!(
        ways,
        [
            (json!("an inline message"), json!(["to", "body"])),
            (json!("a template"), json!(["template", "recipients"])),
        ]
    );
    assert_eq!(
        sms["options"]["properties"]["provider"]["enum"],
        json!(["gateway", "twilio"])
    );
    assert_eq!(sms["options"]["properties"]["body"]["x-template"], true);
    let webhook = entry("payment_webhook");
    assert_eq!(webhook["options"]["properties"]["secret"]["x-secret"], true);
    assert_eq!(
        webhook["options"]["properties"]["timeout"]["default"],
        "10s"
    );
    let email = entry("send_email");
    assert_eq!(
        email["options"]["properties"]["provider"]["default"],
        "sink"
    );

    let hook = format!("{}/hook", receiver.url());
    let cases: Vec<(&str, Value, bool)> = vec![
        (
            "create_contact",
            json!({"msisdn": "{{ event.event_data.msisdn }}"}),
            true,
        ),
        ("create_contact", json!({"name": "Thandi"}), false),
        ("notify", json!({"to": "ann", "body": "hi"}), true),
        ("notify", json!({"body": "hi"}), false),
        (
            "notify",
            json!({"to": "ann", "content_type": "video", "body": "hi"}),
            false,
        ),
        (
            "create_contact",
            json!({"msisdn": "+27820000001", "fields": [1]}),
            false,
        ),
        (
            "create_contact",
            json!({"email": "t@example.org", "fields": "{{ event.event_data }}"}),
            true,
        ),
        (
            "send_sms",
            json!({"to": "+27820000001", "body": "hi", "provider": "gateway"}),
            true,
        ),
        (
            "send_sms",
            json!({"to": ["{{ event.event_data.msisdn }}"], "body": "hi", "provider": "twilio"}),
            true,
        ),
        (
            "send_sms",
            json!({"to": "+27820000001", "body": "hi"}),
            false,
        ),
        (
            "send_sms",
            json!({"to": "+27820000001", "body": "hi", "provider": "nope"}),
            false,
        ),
        (
            "send_sms",
            json!({"to": [], "body": "hi", "provider": "gateway"}),
            false,
        ),
        (
            "send_sms",
            json!({"to": "+27820000001", "body": ["hi"], "provider": "gateway"}),
            false,
        ),
        (
            "send_sms",
            json!({"template": "code", "recipients": ["+27820000001"], "provider": "gateway"}),
            true,
        ),
        (
            "send_sms",
            json!({"template": "code", "body": "hi", "recipients": "k", "provider": "gateway"}),
            false,
        ),
        (
            "send_email",
            json!({"to": "a@example.org", "subject": "s", "text": "t"}),
            true,
        ),
        (
            "send_email",
            json!({"to": "a@example.org", "subject": "s"}),
            false,
        ),
        (
            "send_email",
            json!({"to": "a@example.org", "subject": "s", "text": "t", "cc": "b"}),
            false,
        ),
        (
            "send_email",
            json!({"template": "signed-up", "context": {"plan": "gold"},
                   "recipients": ["{{ event.event_data.contact }}", {"name": "Bob", "email": "b@example.org"}]}),
            true,
        ),
        ("send_email", json!({"template": "signed-up"}), false),
        (
            "send_email",
            json!({"template": "signed-up", "recipients": "k", "subject": "s"}),
            false,
        ),
        (
            "send_email",
            json!({"template": "signed-up", "recipients": [{"nickname": "x"}]}),
            false,
        ),
        (
            "send_email",
            json!({"recipients": "k", "to": "a@example.org"}),
            false,
        ),
        (
            "payment_webhook",
            json!({"url": hook, "secret": "gateway"}),
            true,
        ),
        (
            "payment_webhook",
            json!({"url": hook, "secret": "{{ event.event_data.s }}"}),
            false,
        ),
        (
            "payment_webhook",
            json!({"url": hook, "secret": "gateway", "headers": 3}),
            false,
        ),
        ("payment_webhook", json!({"secret": "gateway"}), false),
        (
            "emit",
            json!({"event_type": "done", "data": {"n": "{{ event.event_data.n }}"}}),
            true,
        ),
        ("emit", json!({"event_type": 5}), false),
        (
            "log",
            json!({"level": "warn", "fields": {"a": "{{ event.event_type }}"}}),
            true,
        ),
        ("log", json!({"level": "loud"}), false),
        ("log", json!({"mesage": "x"}), false),
        ("delay", json!({"duration": "24h"}), true),
        ("delay", json!({"until": "{{ event.event_data.at }}"}), true),
        ("delay", json!({}), false),
        (
            "delay",
            json!({"duration": "1s", "until": "2026-01-01T00:00:00Z"}),
            false,
        ),
        ("delay", json!({"wait": "1s"}), false),
        (
            "wait_for_event",
            json!({"event_type": "replied", "timeout": "1h"}),
            true,
        ),
        ("wait_for_event", json!({"event_type": "replied"}), false),
        ("wait_for_event", json!({"timeout": "1h"}), false),
        (
            "digest",
            json!({"key": "{{ event.event_data.msisdn }}", "window": "1h"}),
            true,
        ),
        ("digest", json!({"key": "k", "max_events": 3}), true),
        (
            "digest",
            json!({"key": "k", "window": "1h", "max_events": 3}),
            true,
        ),
        ("digest", json!({"key": "k"}), false),
        ("digest", json!({"key": "k", "max_events": 0}), false),
        ("digest", json!({"key": "k", "max_events": 2.5}), false),
        ("digest", json!({"key": "k", "max_events": 1000}), true),
        ("digest", json!({"key": "k", "max_events": 1001}), false),
        ("digest", json!({"window": "1h"}), false),
    ];
    let mut disagreements = Vec::new();
    for (handler, config, valid) in cases {
        let schema = entry(handler)["options"].clone();
        let by_schema = jsonschema::validator_for(&schema)
            .expect("a served schema compiles")
            .is_valid(&config);
        let file = json!({
            "account_key": "acme",
            "chains": [{
                "name": "c", "conversation_type": "survey", "event_type": "poll_complete",
                "steps": [{"handler": handler, "config": config}]
            }]
        });
        let (status, answer) = d
            .request(
                reqwest::Method::PUT,
                "/v1/accounts/acme/chains",
                Some(d.admin_token()),
                Some(file.to_string()),
            )
            .await;
        let by_apply = match status {
            200 => true,
            400 if answer["error"]["code"] == "invalid_chains" => false,
            other => panic!("{handler} {config}: {other} {answer}"),
        };
        if by_schema != valid || by_apply != valid {
            disagreements.push(format!(
                "{handler} {config}: expected valid={valid}, the schema says {by_schema}, apply \
                 says {status} {answer}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));

    // An account's catalog lists its scripts too; the CLI shows both.
    d.cli(&[
        "scripts",
        "put",
        "acme",
        "score",
        d.file("score.rhai", SCORE).to_str().unwrap(),
    ])
    .await
    .ok();
    let (status, own) = d.get("/v1/accounts/acme/handlers").await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(own["scripts"][0]["name"], "score", "{own}");
    assert_eq!(own["script_options"]["additionalProperties"], true);
    let out = d.cli(&["handlers", "acme"]).await;
    let text = out.ok();
    for line in [
        "send_sms                 (external)  Sends an SMS",
        "  provider      required, literal          The SMS provider to send through, one of the \
         deployment's [providers.sms.NAME]. One of: gateway, twilio.",
        "  (needs to, body (an inline message) or template, recipients (a template))",
        "  scheduled_at  optional                   When to send: an RFC 3339 time",
        "  secret   required, a secret's name  The name of the account secret",
        "  (needs msisdn or email, at least one)",
        "script:score",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
}

const SCORE: &str = "fn handle(event, steps, config) { #{ score: 1 } }\n";

/// A dispatcher whose chain `order` posts each `order` event's order to
/// the receiver's `/hook/{plan}`, keyed by the order for an hour; with its
/// peers, kept while the test runs.
async fn orders_keyed_by_order() -> (HttpReceiver, SmtpSink, Dispatcher) {
    let receiver = HttpReceiver::start(Duration::from_secs(1));
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &providers(&receiver, &smtp, false));
    let recv = receiver.url();
    set_secret(&d, "acme").await;
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"
account_key = "acme"
[[chains]]
name = "order"
event_type = "order"
[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{recv}/hook/{{{{ event.event_data.plan }}}}", secret = "gateway", body = {{ order = "{{{{ event.event_data.order }}}}" }} }}
idempotency = {{ key = "{{{{ event.event_data.order }}}}", window = "1h" }}
"#
        ),
    )
    .await;
    (receiver, smtp, d)
}

/// An idempotency key is claimed before its step runs: two events with the
/// same key in different conversations, handled at once while the webhook
/// takes a second to answer, send one webhook; the other is skipped. A step
/// that fails for good gives its key back: the next event with the key
/// runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_at_once_with_one_idempotency_key_run_its_step_once() {
    let (receiver, _smtp, d) = orders_keyed_by_order().await;
    let post = |conversation: &str, order: &str, plan: &str| {
        let e = event(
            "acme",
            "shop",
            "order",
            conversation,
            json!({"order": order, "plan": plan}),
        );
        let body = serde_json::to_value(&e).unwrap();
        let d = &d;
        async move { d.post_event(&body).await }
    };
    let (first, second) = futures::join!(post("c-1", "B-7", "hang"), post("c-2", "B-7", "hang"));
    let mut outcomes = Vec::new();
    for id in [&first, &second] {
        let trace = d.wait_for_trace("acme", id, TIMEOUT).await;
        outcomes.push(step(&trace, "order", "payment_webhook")["outcome"].clone());
    }
    outcomes.sort_by_key(|o| o.to_string());
    assert_eq!(outcomes, [json!("ok"), json!("skipped")]);
    assert_eq!(receiver.requests_to("/hook/hang").await.len(), 1);

    // A step refused for good (HTTP 400) gives the key back.
    let refused = post("c-3", "C-9", "400").await;
    let trace = d.wait_for_trace("acme", &refused, TIMEOUT).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let after = post("c-4", "C-9", "200").await;
    let trace = d.wait_for_trace("acme", &after, TIMEOUT).await;
    assert_eq!(
        step(&trace, "order", "payment_webhook")["outcome"],
        "ok",
        "{trace:#}"
    );
}

/// A step waiting to be tried again holds its idempotency key; when its
/// event expires meanwhile, the run ends and the key goes back: the next
/// event with the key runs the step.
#[tokio::test]
async fn a_retrying_steps_key_goes_back_when_its_event_expires() {
    let (receiver, _smtp, d) = orders_keyed_by_order().await;
    // Unavailable, come back in 8 s: past the event's expiry.
    let mut expiring = event(
        "acme",
        "shop",
        "order",
        "c-1",
        json!({"order": "D-1", "plan": "503:8,200"}),
    );
    expiring.expires_at = Some(time::OffsetDateTime::now_utc() + Duration::from_secs(4));
    let id = d
        .post_event(&serde_json::to_value(&expiring).unwrap())
        .await;
    let trace = wait_until("the run expired", TIMEOUT, || async {
        d.trace("acme", &id)
            .await
            .filter(|t| t["status"] == "expired")
    })
    .await;
    let expired = step(&trace, "order", "payment_webhook");
    assert_eq!(expired["outcome"], "skipped", "{trace:#}");
    assert_eq!(
        expired["error"],
        "the event expired (its expires_at passed) before this step"
    );
    // It was tried once, refused for the time being.
    assert_eq!(receiver.requests_to("/hook/503:8,200").await.len(), 1);
    let next = event(
        "acme",
        "shop",
        "order",
        "c-2",
        json!({"order": "D-1", "plan": "200"}),
    );
    let next = d.post_event(&serde_json::to_value(&next).unwrap()).await;
    let trace = d.wait_for_trace("acme", &next, TIMEOUT).await;
    assert_eq!(
        step(&trace, "order", "payment_webhook")["outcome"],
        "ok",
        "{trace:#}"
    );
    assert_eq!(receiver.requests_to("/hook/200").await.len(), 1);
}
