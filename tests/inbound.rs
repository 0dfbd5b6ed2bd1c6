//! Inbound provider webhooks, end to end: the fixture files of
//! `tests/fixtures` posted as-is to the dispatcher's inbound URLs after
//! real sends (through the SMTP sink and the fake Twilio API) recorded the
//! messages they report on; statuses, transitions, emitted events, chains
//! reacting to them, unmatched records, and the refusals (wrong secret,
//! bad Twilio signature, replayed Standard Webhooks message).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use switchboard_http::inbound::signed_events::VerificationKey;

use crate::peers::{HttpReceiver, SmtpSink, TWILIO_TOKEN, WEBHOOK_SECRET};
use crate::util::{Dispatcher, TIMEOUT, event, wait_until};

const SENDGRID_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/sendgrid-event-webhook.json"
);
const TWILIO_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/twilio-status-callbacks.txt"
);

/// The AccountSid of the Twilio fixture.
pub(crate) const TWILIO_ACCOUNT: &str = "AC00000000000000000000000000000000";

fn fixture(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading the fixture {path}: {e}"))
}

/// POSTs `body` to `url` with `headers`: the status and the JSON answer.
pub(crate) async fn post(
    url: &str,
    content_type: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body.to_string());
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.expect("a body");
    let answer = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {url} answered {status} without JSON ({e}): {text}"));
    (status, answer)
}

/// Asserts an API error answer: the status, the JSON error shape and a
/// message containing `text`.
#[track_caller]
fn assert_error(answer: &(u16, Value), status: u16, code: &str, text: &str) {
    assert_eq!(answer.0, status, "{:#}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{:#}", answer.1);
    let message = answer.1["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains(text),
        "{message:?} should contain {text:?}"
    );
}

/// `X-Twilio-Signature` of a form POST to `url`.
pub(crate) fn twilio_signature(token: &str, url: &str, body: &str) -> String {
    let parsed = reqwest::Url::parse(&format!("http://x/?{body}")).expect("a form body");
    let mut params: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    params.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    for (k, v) in params {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    BASE64.encode(mac.finalize().into_bytes())
}

/// Standard Webhooks headers for `body`, signed with `secret` at `timestamp`.
fn standard_headers(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &str,
) -> Vec<(&'static str, String)> {
    let key = BASE64
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let signature = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ]
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `switchboard inbound create ACCOUNT PROVIDER [ARGS] --json`: the URL.
pub(crate) async fn create(d: &Dispatcher, account: &str, provider: &str, args: &[&str]) -> String {
    let mut all = vec!["inbound", "create", account, provider, "--json"];
    all.extend(args);
    let answer = d.cli(&all).await.json();
    assert_eq!(answer["provider"], provider, "{answer:#}");
    answer["url"].as_str().expect("a URL").to_string()
}

/// The account's message records by recipient.
async fn messages_by_recipient(
    d: &Dispatcher,
    account: &str,
) -> std::collections::BTreeMap<String, Value> {
    let (status, body) = d.get(&format!("/v1/accounts/{account}/messages")).await;
    assert_eq!(status, 200, "{body}");
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["recipient"].as_str().unwrap().to_string(), m.clone()))
        .collect()
}

/// `switchboard messages show`: the record's status and its path of statuses.
async fn message_path(d: &Dispatcher, account: &str, id: &str) -> (String, Vec<String>) {
    let shown = d.cli(&["messages", "show", account, id]).await;
    let m: Value = serde_json::from_str(shown.ok()).expect("a message record");
    let path = m["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap().to_string())
        .collect();
    (m["status"].as_str().unwrap().to_string(), path)
}

/// The account's unmatched records, newest first.
async fn unmatched(d: &Dispatcher, account: &str) -> Vec<Value> {
    let out = d
        .cli(&["messages", "unmatched", account, "--json"])
        .await
        .json();
    assert_eq!(out["account_key"], account);
    out["unmatched"].as_array().expect("a list").clone()
}

/// `switchboard_inbound_records_total{provider, account, result}` (0 when absent).
async fn inbound_metric(d: &Dispatcher, provider: &str, account: &str, result: &str) -> u64 {
    let (_, body) = d.get("/metrics").await;
    let series = format!(
        "switchboard_inbound_records_total{{provider=\"{provider}\",account=\"{account}\",result=\"{result}\"}} "
    );
    body.as_str()
        .expect("metrics are text")
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |n| n.trim().parse().expect("a counter"))
}

/// A receipt's counts: records, matched, unmatched.
fn counts(receipt: &Value) -> (u64, u64, u64) {
    let count = |name: &str| {
        receipt[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{receipt:#}"))
    };
    (count("records"), count("matched"), count("unmatched"))
}

/// What became of each record of a receipt.
fn results(receipt: &Value) -> Vec<&str> {
    receipt["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["result"].as_str().expect("a result"))
        .collect()
}

/// The e-mail topics `account` holds choices of `address` on.
async fn email_topics(d: &Dispatcher, account: &str, address: &str) -> Value {
    let shown = d
        .cli(&["preferences", "show", account, address, "--json"])
        .await
        .json();
    shown["email"]["topics"].clone()
}

/// A dispatcher config whose SendGrid provider is `smtp`, with `extra`
/// lines of provider options.
fn sendgrid(smtp: &SmtpSink, extra: &str) -> String {
    format!(
        "[providers.email.sendgrid]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"noreply@example.org\"\n{extra}",
        smtp.port()
    )
}

const SENDGRID_CHAINS: &str = r#"
account_key = "acme"

[[chains]]
name = "mail"
event_type = "mail"
[[chains.steps]]
handler = "send_email"
config = { to = ["thandi@example.com", "nobody@example.org", "old@example.org"], subject = "Your results", text = "They are in." }

# A bounce marks the contact's address invalid.
[[chains]]
name = "bounced"
conversation_type = "email"
event_type = "email_bounced"
[[chains.steps]]
handler = "create_contact"
config = { email = "{{ event.event_data.email }}", fields = { email_invalid = true, bounce_reason = "{{ event.event_data.reason }}" } }
"#;

#[tokio::test]
async fn sendgrid_events_update_messages_and_reach_chains() {
    let smtp = SmtpSink::start();
    // SendGrid answers each message with its X-Message-Id, which starts the
    // sg_message_id of the fixture's events.
    smtp.queue_ids(json!({
        "thandi@example.com": "sgm-0001",
        "nobody@example.org": "sgm-0002",
        "old@example.org": "sgm-0003",
    }));
    let d = Dispatcher::with_config(None, &sendgrid(&smtp, ""));
    d.apply_chains("acme.toml", SENDGRID_CHAINS).await;
    let sent = event("acme", "survey", "mail", "poll-2026", json!({}));
    let id = d.post_event(&serde_json::to_value(&sent).unwrap()).await;
    assert_eq!(
        d.wait_for_trace("acme", &id, TIMEOUT).await["status"],
        "done"
    );
    let before = messages_by_recipient(&d, "acme").await;
    for (to, remote) in [
        ("thandi@example.com", "sgm-0001"),
        ("nobody@example.org", "sgm-0002"),
        ("old@example.org", "sgm-0003"),
    ] {
        assert_eq!(before[to]["status"], "sent", "{:#}", before[to]);
        assert_eq!(before[to]["remote_id"], remote, "{:#}", before[to]);
    }

    // The URL, printed once for people.
    let printed = d.cli(&["inbound", "create", "acme", "sendgrid"]).await;
    let url = printed
        .ok()
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in:\n{}", printed.ok()))
        .to_string();
    assert!(
        url.starts_with(&format!("{}/v1/inbound/acme/sendgrid/", d.url())),
        "{url}"
    );
    assert!(printed.ok().contains("Event Webhook"), "{}", printed.ok());

    // The fixture, posted as-is.
    let body = fixture(SENDGRID_FIXTURE);
    let (status, receipt) = post(&url, "application/json", &[], &body).await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(counts(&receipt), (12, 9, 3), "{receipt:#}");
    assert_eq!(
        results(&receipt),
        [
            "matched",
            "matched",
            "matched",
            "matched",
            "matched",
            "matched",
            "matched",
            "matched",
            "matched",
            "undocumented",
            "unknown_message",
            "malformed"
        ]
    );

    // Statuses moved, every transition logged with its cause.
    let thandi = before["thandi@example.com"]["id"].as_str().unwrap();
    let (status, path) = message_path(&d, "acme", thandi).await;
    assert_eq!(status, "unsubscribed");
    assert_eq!(
        path,
        [
            "pending",
            "sent",
            "sent",
            "deferred",
            "delivered",
            "opened",
            "clicked",
            "spam_reported",
            "unsubscribed"
        ]
    );
    let nobody = before["nobody@example.org"]["id"].as_str().unwrap();
    let shown: Value =
        serde_json::from_str(d.cli(&["messages", "show", "acme", nobody]).await.ok()).unwrap();
    assert_eq!(shown["status"], "bounced");
    let last = shown["transitions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["from"], "sent");
    assert_eq!(last["to"], "bounced");
    assert_eq!(
        last["cause"],
        "sendgrid bounce: 550 5.1.1 unknown recipient"
    );
    assert_eq!(last["source"], "sendgrid:ZmE1YjM0-bounce-2");
    assert!(last["at"].is_string());
    let old = before["old@example.org"]["id"].as_str().unwrap();
    assert_eq!(message_path(&d, "acme", old).await.0, "dropped");

    // Each matched record is an event: the bounce ran the chain that marks
    // the contact's address invalid.
    let bounce = &receipt["results"][5];
    assert_eq!(bounce["message_id"], nobody);
    assert_eq!(bounce["status"], "bounced");
    assert_eq!(bounce["transition"], "applied");
    let bounce_id = bounce["event_id"].as_str().unwrap();
    let trace = d.wait_for_trace("acme", bounce_id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let e = &trace["event"];
    assert_eq!(
        (
            e["conversation_type"].as_str(),
            e["event_type"].as_str(),
            e["conversation_key"].as_str()
        ),
        (Some("email"), Some("email_bounced"), Some(nobody))
    );
    assert_eq!(e["event_data"]["email"], "nobody@example.org");
    assert_eq!(e["event_data"]["previous_status"], "sent");
    assert_eq!(e["event_data"]["sent_by"]["event_id"], id.as_str());
    assert_eq!(
        e["event_data"]["record"]["sg_event_id"],
        "ZmE1YjM0-bounce-2"
    );
    assert_eq!(e["occurred_at"], "2025-11-22T06:40:20Z");
    let contact = &trace["chains"][0]["steps"][0]["output"];
    assert_eq!(contact["email"], "nobody@example.org");
    assert_eq!(contact["fields"]["email_invalid"], true);
    assert_eq!(
        contact["fields"]["bounce_reason"],
        "550 5.1.1 unknown recipient"
    );
    // The others have traces too (no chain takes them: unrouted, counted).
    let open_id = receipt["results"][3]["event_id"].as_str().unwrap();
    let trace = d.wait_for_trace("acme", open_id, TIMEOUT).await;
    assert_eq!(trace["event"]["event_type"], "email_opened");
    assert_eq!(trace["status"], "unrouted");

    // Unmatched: kept with the record and the reason, listed newest first.
    let kept = unmatched(&d, "acme").await;
    let mut reasons: Vec<(&str, &str)> = kept
        .iter()
        .map(|u| (u["result"].as_str().unwrap(), u["reason"].as_str().unwrap()))
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{kept:#?}");
    assert_eq!(reasons[0].0, "malformed");
    assert!(
        reasons[0].1.contains("`timestamp` \"not-a-number\""),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, "undocumented");
    assert!(
        reasons[1].1.contains("a_new_event_type_nobody_documented"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2].0, "unknown_message");
    assert!(
        reasons[2]
            .1
            .contains("0192f1c0-7b1c-7cc3-9a55-00000000ffff")
            && reasons[2].1.contains("sgm-9999.unknown"),
        "{reasons:?}"
    );
    let ghost = kept
        .iter()
        .find(|u| u["result"] == "unknown_message")
        .unwrap();
    assert_eq!(ghost["provider"], "sendgrid");
    assert_eq!(ghost["record"]["email"], "ghost@example.org");
    let listed = d.cli(&["messages", "unmatched", "acme"]).await;
    assert!(listed.ok().contains("unknown_message"), "{}", listed.ok());
    assert!(listed.ok().contains("sendgrid"), "{}", listed.ok());
    assert_eq!(inbound_metric(&d, "sendgrid", "acme", "matched").await, 9);
    assert_eq!(
        inbound_metric(&d, "sendgrid", "acme", "unknown_message").await,
        1
    );
    assert_eq!(
        inbound_metric(&d, "sendgrid", "acme", "undocumented").await,
        1
    );
    assert_eq!(inbound_metric(&d, "sendgrid", "acme", "malformed").await, 1);

    // SendGrid posts the batch again (it saw no answer): the same events, no
    // transition applied twice.
    let (status, again) = post(&url, "application/json", &[], &body).await;
    assert_eq!(status, 200, "{again:#}");
    for (first, second) in receipt["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(again["results"].as_array().unwrap())
    {
        assert_eq!(first["event_id"], second["event_id"]);
        if first["result"] == "matched" {
            assert_eq!(second["transition"], "duplicate", "{second:#}");
        }
    }
    assert_eq!(message_path(&d, "acme", thandi).await.1.len(), 9);

    // A wrong secret, account or provider: 404, in the API's error shape.
    let secret = url.rsplit('/').next().unwrap();
    let base = d.url();
    for wrong in [
        format!("{base}/v1/inbound/acme/sendgrid/{}", "0".repeat(64)),
        format!("{base}/v1/inbound/other/sendgrid/{secret}"),
        format!("{base}/v1/inbound/acme/twilio/{secret}"),
        format!("{base}/v1/inbound/acme/nosuch/{secret}"),
    ] {
        let answer = post(&wrong, "application/json", &[], &body).await;
        assert_error(&answer, 404, "not_found", "no inbound webhook at this URL");
    }
}

/// A provider can report a message delivered before the send step has its
/// answer (SendGrid's events carry the message's id): the step then records
/// the answer without moving the message back to `sent`.
#[tokio::test]
async fn a_delivery_report_that_comes_before_the_senders_answer_is_kept() {
    let smtp = SmtpSink::start();
    smtp.queue_ids(json!({"fast@example.org": "sgm-0009"}));
    smtp.hold(json!(["fast@example.org"]));
    // Time enough for the answer held while the test posts the report.
    let d = Dispatcher::with_config(None, &sendgrid(&smtp, "timeout_secs = 120\n"));
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "mail"
event_type = "mail"
[[chains.steps]]
handler = "send_email"
config = { to = ["fast@example.org"], subject = "Your results", text = "They are in." }
"#,
    )
    .await;
    let id = d
        .post_event(
            &serde_json::to_value(event("acme", "survey", "mail", "c1", json!({}))).unwrap(),
        )
        .await;

    // The message is with the provider, whose answer is held.
    let message_id = wait_until("the message at the SMTP sink", TIMEOUT, || async {
        smtp.messages().first().map(|m| {
            m["headers"]["x-switchboard-message-id"]
                .as_str()
                .unwrap()
                .to_string()
        })
    })
    .await;
    let url = create(&d, "acme", "sendgrid", &[]).await;
    let report = json!([{
        "email": "fast@example.org",
        "timestamp": now(),
        "event": "delivered",
        "response": "250 OK",
        "sg_event_id": "fast-delivered-1",
        "sg_message_id": "sgm-0009.filter0001.16648.5515E0B88.0",
        "switchboard_message_id": message_id,
    }]);
    let (status, receipt) = post(&url, "application/json", &[], &report.to_string()).await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(receipt["results"][0]["result"], "matched", "{receipt:#}");
    assert_eq!(message_path(&d, "acme", &message_id).await.0, "delivered");

    // The answer comes: recorded beside the report, the status kept.
    smtp.release();
    assert_eq!(
        d.wait_for_trace("acme", &id, TIMEOUT).await["status"],
        "done"
    );
    let (status, path) = message_path(&d, "acme", &message_id).await;
    assert_eq!(status, "delivered");
    assert_eq!(path, ["pending", "delivered", "delivered"]);
    let shown: Value =
        serde_json::from_str(d.cli(&["messages", "show", "acme", &message_id]).await.ok()).unwrap();
    assert_eq!(shown["remote_id"], "sgm-0009", "{shown:#}");
    assert!(shown["sent_at"].is_string(), "{shown:#}");
    let answer = shown["transitions"][2]["cause"].as_str().unwrap();
    assert!(
        answer.contains("a delivery report had it delivered already"),
        "{answer}"
    );
}

/// One Twilio provider for every account: with `{account}` in its
/// `status_callback`, each message's callback goes to the account that sent
/// it, verified by Twilio's signature; nothing lands with another account.
#[tokio::test]
async fn twilio_status_callbacks_reach_the_account_that_sent_the_message() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    receiver
        .twilio_sids(json!({"+27831234567": "SM0001aaaabbbbccccddddeeeeffff0001"}))
        .await;
    let public = "https://hooks.example.org/switchboard";
    let config = format!(
        "[http]\npublic_url = \"{public}\"\n[providers.sms.twilio]\ntype = \"twilio\"\n\
         account_sid = \"{TWILIO_ACCOUNT}\"\nauth_token = \"{TWILIO_TOKEN}\"\n\
         from = \"+15005550006\"\nbase_url = \"{}\"\n\
         status_callback = \"{public}/v1/inbound/twilio-status/{{account}}\"\n",
        receiver.url()
    );
    let d = Dispatcher::with_config(None, &config);
    for account in ["acme", "beta"] {
        d.apply_chains(
            &format!("{account}.toml"),
            &format!(
                r#"
account_key = "{account}"
[[chains]]
name = "notify"
event_type = "notify"
[[chains.steps]]
handler = "send_sms"
config = {{ to = "+27831234567", body = "Your results are in" }}
"#
            ),
        )
        .await;
    }
    let id = d
        .post_event(
            &serde_json::to_value(event("beta", "survey", "notify", "c1", json!({}))).unwrap(),
        )
        .await;
    assert_eq!(
        d.wait_for_trace("beta", &id, TIMEOUT).await["status"],
        "done"
    );
    let asked = receiver
        .requests_to(&format!(
            "/2010-04-01/Accounts/{TWILIO_ACCOUNT}/Messages.json"
        ))
        .await;
    let callback = format!("{public}/v1/inbound/twilio-status/beta");
    assert_eq!(
        asked[0]["form"]["StatusCallback"],
        callback.as_str(),
        "{asked:#?}"
    );

    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("AccountSid", TWILIO_ACCOUNT)
        .append_pair("MessageSid", "SM0001aaaabbbbccccddddeeeeffff0001")
        .append_pair("MessageStatus", "delivered")
        .append_pair("To", "+27831234567")
        .finish();
    let local = format!("{}/v1/inbound/twilio-status/beta", d.url());
    let form = "application/x-www-form-urlencoded";
    // Unsigned, or signed for another account's URL: refused.
    let (status, answer) = post(&local, form, &[], &body).await;
    assert_eq!(status, 403, "{answer:#}");
    let other = format!("{public}/v1/inbound/twilio-status/acme");
    let wrong = twilio_signature(TWILIO_TOKEN, &other, &body);
    let (status, answer) = post(&local, form, &[("x-twilio-signature", wrong)], &body).await;
    assert_eq!(status, 403, "{answer:#}");
    // Anyone may post here under any name: refused unsigned, it is not
    // counted under that name.
    let made_up = format!("{}/v1/inbound/twilio-status/nobody-here", d.url());
    let (status, _) = post(&made_up, form, &[], &body).await;
    assert_eq!(status, 403);
    let (_, metrics) = d.get("/metrics").await;
    assert!(!metrics.as_str().unwrap().contains("nobody-here"));
    let signature = twilio_signature(TWILIO_TOKEN, &callback, &body);
    let (status, receipt) = post(&local, form, &[("x-twilio-signature", signature)], &body).await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(receipt["results"][0]["result"], "matched", "{receipt:#}");
    let sent = messages_by_recipient(&d, "beta").await;
    assert_eq!(sent["+27831234567"]["status"], "delivered", "{sent:#?}");
    assert_eq!(unmatched(&d, "acme").await, Vec::<Value>::new());
}

/// A signing key of SendGrid's Signed Event Webhook: the pair, and its
/// verification key as SendGrid shows it.
fn sendgrid_signing_key() -> (EcdsaKeyPair, String) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let shown = VerificationKey::shown(pair.public_key().as_ref());
    (pair, shown)
}

/// The Signed Event Webhook's headers for `body` at `timestamp`, signed by
/// `pair`.
fn sendgrid_signed_at(
    pair: &EcdsaKeyPair,
    timestamp: i64,
    body: &str,
) -> Vec<(&'static str, String)> {
    let timestamp = timestamp.to_string();
    let signed = [timestamp.as_bytes(), body.as_bytes()].concat();
    let signature = BASE64.encode(pair.sign(&SystemRandom::new(), &signed).unwrap().as_ref());
    vec![
        ("x-twilio-email-event-webhook-timestamp", timestamp),
        ("x-twilio-email-event-webhook-signature", signature),
    ]
}

/// The Signed Event Webhook's headers for `body`, signed by `pair` now.
fn sendgrid_signed(pair: &EcdsaKeyPair, body: &str) -> Vec<(&'static str, String)> {
    sendgrid_signed_at(pair, now(), body)
}

#[tokio::test]
async fn sendgrid_events_of_several_accounts_reach_each_the_account_that_sent() {
    let smtp = SmtpSink::start();
    smtp.queue_ids(json!({"ann@example.com": "sgm-a", "bob@example.com": "sgm-b"}));
    // Two SendGrid accounts of the deployment's, each with its own key:
    // acme sends through the first, beta through the second.
    let (pair, key) = sendgrid_signing_key();
    let (second_pair, second_key) = sendgrid_signing_key();
    let config = format!(
        "{}\n[providers.email.second]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
         from = \"noreply@example.org\"\nevent_webhook_key = \"{second_key}\"\n",
        sendgrid(&smtp, &format!("event_webhook_key = \"{key}\"\n")),
        smtp.port()
    );
    let d = Dispatcher::with_config(None, &config);
    for (account, to, provider) in [
        ("acme", "ann@example.com", "sendgrid"),
        ("beta", "bob@example.com", "second"),
    ] {
        d.apply_chains(
            &format!("{account}.toml"),
            &format!(
                r#"
account_key = "{account}"
[[chains]]
name = "mail"
event_type = "mail"
[[chains.steps]]
handler = "send_email"
config = {{ to = "{to}", subject = "Your results", text = "They are in.", provider = "{provider}" }}
"#
            ),
        )
        .await;
        let sent = event(account, "survey", "mail", "c1", json!({}));
        let id = d.post_event(&serde_json::to_value(&sent).unwrap()).await;
        assert_eq!(
            d.wait_for_trace(account, &id, TIMEOUT).await["status"],
            "done"
        );
    }
    let ann = messages_by_recipient(&d, "acme").await["ann@example.com"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bob = messages_by_recipient(&d, "beta").await["bob@example.com"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A batch: a delivery of acme's, a bounce of beta's, and a record of a
    // message no account sent.
    let at = now();
    let delivered = json!({"email": "ann@example.com", "event": "delivered", "timestamp": at,
         "sg_event_id": "d-1", "sg_message_id": "sgm-a.filter1",
         "switchboard_message_id": ann, "switchboard_account": "acme"});
    let bounced = json!({"email": "bob@example.com", "event": "bounce", "timestamp": at,
         "reason": "550 5.1.1 unknown recipient", "type": "bounce",
         "sg_event_id": "b-1", "sg_message_id": "sgm-b.filter1",
         "switchboard_message_id": bob, "switchboard_account": "beta"});
    let stray = json!({"email": "eve@example.com", "event": "delivered", "timestamp": at,
         "sg_event_id": "x-1", "sg_message_id": "sgm-x.filter1"});
    let body = json!([delivered, bounced, stray]).to_string();

    // Posted to acme's own URL, beta's bounce is not acme's to apply: it
    // neither moves a message nor opts Bob out of acme's mail, and acme
    // keeps what happened, not to whom.
    let acme_url = create(&d, "acme", "sendgrid", &[]).await;
    let (status, receipt) = post(&acme_url, "application/json", &[], &body).await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(
        results(&receipt),
        ["matched", "other_account", "unknown_message"],
        "{receipt:#}"
    );
    let refused = receipt["results"][1]["reason"].as_str().unwrap();
    assert!(
        refused.contains("account \"beta\" sent")
            && refused.contains(&format!("{}/v1/inbound/sendgrid-events", d.url())),
        "{refused}"
    );
    assert_eq!(
        messages_by_recipient(&d, "beta").await["bob@example.com"]["status"],
        "sent"
    );
    assert_eq!(email_topics(&d, "acme", "bob@example.com").await, json!({}));
    let kept = unmatched(&d, "acme").await;
    let other = kept
        .iter()
        .find(|u| u["result"] == "other_account")
        .expect("beta's record kept as acme's other_account");
    assert_eq!(
        other["record"],
        json!({"event": "bounce", "timestamp": at, "sg_event_id": "b-1",
               "switchboard_account": "beta"})
    );
    assert_eq!(
        inbound_metric(&d, "sendgrid", "acme", "other_account").await,
        1
    );

    // The deployment's route: refused unsigned, signed by a key not
    // configured, for another body, or long ago.
    let route = format!("{}/v1/inbound/sendgrid-events", d.url());
    let json_type = "application/json";
    let (status, answer) = post(&route, json_type, &[], &body).await;
    assert_error(
        &(status, answer),
        403,
        "signature_rejected",
        "X-Twilio-Email-Event-Webhook-Signature or -Timestamp header is missing",
    );
    let (stranger, _) = sendgrid_signing_key();
    let (status, answer) = post(&route, json_type, &sendgrid_signed(&stranger, &body), &body).await;
    let message = answer["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_error(
        &(status, answer),
        403,
        "signature_rejected",
        "not a signature of the timestamp header and the body",
    );
    // The answer does not name the deployment's providers.
    assert!(
        !message.contains("second") && !message.contains("providers.email.sendgrid"),
        "{message}"
    );
    let (status, _) = post(&route, json_type, &sendgrid_signed(&pair, "[]"), &body).await;
    assert_eq!(status, 403);
    let replayed = sendgrid_signed_at(&pair, now() - 4 * 86_400, &body);
    let (status, answer) = post(&route, json_type, &replayed, &body).await;
    assert_error(&(status, answer), 403, "signature_rejected", "a replay");
    assert_eq!(message_path(&d, "beta", &bob).await.0, "sent");

    // Signed by the first provider's key: each record reaches the account
    // it names, but beta's bounce is about a message the second provider
    // sent, which the first's key does not speak for.
    let (status, receipt) = post(&route, json_type, &sendgrid_signed(&pair, &body), &body).await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(counts(&receipt), (3, 1, 2), "{receipt:#}");
    let routed: Vec<(&str, &Value)> = receipt["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["result"].as_str().unwrap(), &r["account_key"]))
        .collect();
    assert_eq!(
        routed,
        [
            ("matched", &json!("acme")),
            ("unknown_message", &json!("beta")),
            ("no_account", &Value::Null)
        ],
        "{receipt:#}"
    );
    // acme's delivery was applied before, from its own URL.
    assert_eq!(receipt["results"][0]["transition"], "duplicate");
    let outside = receipt["results"][1]["reason"].as_str().unwrap();
    assert!(
        outside.contains("through e-mail provider \"sendgrid\""),
        "{outside}"
    );
    assert_eq!(message_path(&d, "beta", &bob).await.0, "sent");
    assert_eq!(email_topics(&d, "beta", "bob@example.com").await, json!({}));

    // Signed by the second provider's key, beta's bounce is applied, and
    // opts Bob out of beta's mail only.
    let (status, receipt) = post(
        &route,
        json_type,
        &sendgrid_signed(&second_pair, &body),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(receipt["results"][1]["result"], "matched", "{receipt:#}");
    assert_eq!(receipt["results"][1]["account_key"], "beta");
    assert_eq!(receipt["results"][1]["transition"], "applied");
    // The second provider sent no message of acme's.
    assert_eq!(receipt["results"][0]["result"], "unknown_message");
    assert_eq!(message_path(&d, "beta", &bob).await.0, "bounced");
    let beta_bob = email_topics(&d, "beta", "bob@example.com").await;
    assert_eq!(beta_bob["all"]["subscribed"], false, "{beta_bob:#}");
    assert_eq!(email_topics(&d, "acme", "bob@example.com").await, json!({}));
    // A record Switchboard does not read still goes to the account it
    // names, kept there as unmatched.
    let mystery = json!([{"event": "mystery", "timestamp": at, "sg_event_id": "m-1",
        "sg_message_id": "sgm-b.filter1", "switchboard_account": "beta"}])
    .to_string();
    let signed = sendgrid_signed(&second_pair, &mystery);
    let (status, receipt) = post(&route, json_type, &signed, &mystery).await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(
        (
            &receipt["results"][0]["result"],
            &receipt["results"][0]["account_key"]
        ),
        (&json!("undocumented"), &json!("beta")),
        "{receipt:#}"
    );
    assert!(
        unmatched(&d, "beta")
            .await
            .iter()
            .any(|u| u["record"]["sg_event_id"] == "m-1")
    );
    // The record no account sent is logged and counted, without an account.
    assert!(
        d.log().contains("SendGrid event record went to no account"),
        "{}",
        d.log()
    );
    let (_, metrics) = d.get("/metrics").await;
    assert!(
        metrics.as_str().unwrap().lines().any(|l| l
            == "switchboard_inbound_records_total{provider=\"sendgrid\",result=\"no_account\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn twilio_status_callbacks_are_verified_and_applied() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    // The fake Twilio API answers with the fixture's sids.
    receiver
        .twilio_sids(json!({
            "+27831234567": "SM0001aaaabbbbccccddddeeeeffff0001",
            "+27830000000": "SM0002aaaabbbbccccddddeeeeffff0002",
            "+27839999999": "SM0003aaaabbbbccccddddeeeeffff0003",
        }))
        .await;
    // Behind a proxy: Twilio signs the public URL, not the listen address.
    let public = "https://hooks.example.org/switchboard";
    let twilio = format!(
        "[providers.sms.twilio]\ntype = \"twilio\"\naccount_sid = \"{TWILIO_ACCOUNT}\"\nauth_token = \"{TWILIO_TOKEN}\"\nfrom = \"+15005550006\"\nbase_url = \"{}\"\n",
        receiver.url()
    );
    let config = format!("[http]\npublic_url = \"{public}\"\n{twilio}");
    let mut d = Dispatcher::with_config(None, &config);
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "notify"
event_type = "notify"
[[chains.steps]]
handler = "send_sms"
config = { to = ["+27831234567", "+27830000000", "+27839999999"], body = "Your results are in" }

[[chains]]
name = "failed-sms"
conversation_type = "sms"
event_type = "sms_failed"
[[chains.steps]]
handler = "log"
config = { message = "SMS {{ event.event_data.message_id }} failed: {{ event.event_data.error_code }}" }
"#,
    )
    .await;
    let id = d
        .post_event(
            &serde_json::to_value(event("acme", "survey", "notify", "c1", json!({}))).unwrap(),
        )
        .await;
    assert_eq!(
        d.wait_for_trace("acme", &id, TIMEOUT).await["status"],
        "done"
    );
    let sent = messages_by_recipient(&d, "acme").await;
    assert_eq!(
        sent["+27831234567"]["remote_id"],
        "SM0001aaaabbbbccccddddeeeeffff0001"
    );

    let url = create(&d, "acme", "twilio", &[]).await;
    assert!(
        url.starts_with(&format!("{public}/v1/inbound/acme/twilio/")),
        "{url}"
    );
    // Where the proxy forwards it.
    let local = format!("{}{}", d.url(), url.strip_prefix(public).unwrap());

    // Each callback of the fixture, as-is, signed as Twilio signs it.
    let fixture = fixture(TWILIO_FIXTURE);
    let mut receipts = Vec::new();
    for body in fixture.lines() {
        let signature = twilio_signature(TWILIO_TOKEN, &url, body);
        let (status, receipt) = post(
            &local,
            "application/x-www-form-urlencoded",
            &[("x-twilio-signature", signature)],
            body,
        )
        .await;
        assert_eq!(status, 200, "{body}: {receipt:#}");
        receipts.push(receipt);
    }
    let results: Vec<&str> = receipts
        .iter()
        .map(|r| r["results"][0]["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        results,
        ["matched", "matched", "matched", "matched", "malformed"]
    );
    for (to, status, path) in [
        (
            "+27831234567",
            "delivered",
            vec!["pending", "sending", "sent", "sent", "delivered"],
        ),
        (
            "+27830000000",
            "undelivered",
            vec!["pending", "sending", "sent", "undelivered"],
        ),
        (
            "+27839999999",
            "failed",
            vec!["pending", "sending", "sent", "failed"],
        ),
    ] {
        let id = sent[to]["id"].as_str().unwrap();
        assert_eq!(
            message_path(&d, "acme", id).await,
            (
                status.to_string(),
                path.iter().map(|s| s.to_string()).collect()
            )
        );
    }
    // Events sms_<status>: the failure ran its chain.
    let failed = &receipts[3]["results"][0];
    let trace = d
        .wait_for_trace("acme", failed["event_id"].as_str().unwrap(), TIMEOUT)
        .await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(trace["event"]["event_type"], "sms_failed");
    assert_eq!(trace["event"]["conversation_type"], "sms");
    assert_eq!(trace["event"]["event_data"]["error_code"], "21211");
    assert_eq!(trace["chains"][0]["name"], "failed-sms");
    let delivered = d
        .wait_for_trace(
            "acme",
            receipts[1]["results"][0]["event_id"].as_str().unwrap(),
            TIMEOUT,
        )
        .await;
    assert_eq!(delivered["event"]["event_type"], "sms_delivered");
    let kept = unmatched(&d, "acme").await;
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert_eq!(
        kept[0]["record"],
        json!({"MessageSid": "", "MessageStatus": "delivered"})
    );

    // A bad signature (another token, another URL, a changed body, none): 403.
    let first = fixture.lines().next().unwrap();
    let tampered = first.replace("MessageStatus=sent", "MessageStatus=failed");
    for (body, signature) in [
        (first, Some(twilio_signature("another-token", &url, first))),
        (first, Some(twilio_signature(TWILIO_TOKEN, &local, first))),
        (
            tampered.as_str(),
            Some(twilio_signature(TWILIO_TOKEN, &url, first)),
        ),
        (first, None),
    ] {
        let headers: Vec<(&str, String)> = signature
            .into_iter()
            .map(|s| ("x-twilio-signature", s))
            .collect();
        let answer = post(&local, "application/x-www-form-urlencoded", &headers, body).await;
        assert_error(&answer, 403, "signature_rejected", "X-Twilio-Signature");
    }
    let tampered_id = sent["+27831234567"]["id"].as_str().unwrap();
    assert_eq!(message_path(&d, "acme", tampered_id).await.0, "delivered");
    assert_eq!(inbound_metric(&d, "twilio", "acme", "rejected").await, 4);
    assert_eq!(inbound_metric(&d, "twilio", "acme", "matched").await, 4);

    // Without a Twilio provider the callbacks fail closed, naming the missing config.
    d.set_config(&format!("[http]\npublic_url = \"{public}\"\n"));
    d.restart();
    let local = format!("{}{}", d.url(), url.strip_prefix(public).unwrap());
    let answer = post(
        &local,
        "application/x-www-form-urlencoded",
        &[(
            "x-twilio-signature",
            twilio_signature(TWILIO_TOKEN, &url, first),
        )],
        first,
    )
    .await;
    assert_error(
        &answer,
        503,
        "not_configured",
        "no Twilio provider is configured",
    );
    assert_error(&answer, 503, "not_configured", "type = \"twilio\"");
    let refused = d
        .cli(&["inbound", "create", "acme", "twilio", "--rotate"])
        .await;
    assert!(
        refused.fails().contains("no Twilio provider is configured"),
        "{}",
        refused.stderr
    );
}

#[tokio::test]
async fn standard_webhooks_are_verified_and_replays_refused() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "settled"
conversation_type = "webhook"
event_type = "payment_settled"
[[chains.steps]]
handler = "log"
config = { message = "payment {{ event.event_data.reference }} settled: {{ event.event_data.amount }}" }
"#,
    )
    .await;
    // The account secret signatures are checked with: named, and set first.
    let no_secret = d.cli(&["inbound", "create", "acme", "webhook"]).await;
    assert!(
        no_secret.fails().contains("--secret NAME"),
        "{}",
        no_secret.stderr
    );
    let unset = d
        .cli(&[
            "inbound", "create", "acme", "webhook", "--secret", "gateway",
        ])
        .await;
    assert!(
        unset
            .fails()
            .contains("`switchboard secrets set acme gateway`"),
        "{}",
        unset.stderr
    );
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    let url = create(&d, "acme", "webhook", &["--secret", "gateway"]).await;

    let body = r#"{"event_type": "payment_settled", "reference": "PAY-42", "amount": 500}"#;
    let signed = standard_headers(
        WEBHOOK_SECRET,
        "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        now(),
        body,
    );
    let (status, receipt) = post(&url, "application/json", &signed, body).await;
    assert_eq!(status, 200, "{receipt:#}");
    let event_id = receipt["results"][0]["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let trace = d.wait_for_trace("acme", &event_id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(trace["chains"][0]["name"], "settled");
    let e = &trace["event"];
    assert_eq!(e["conversation_type"], "webhook");
    assert_eq!(e["conversation_key"], "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W");
    assert_eq!(e["event_data"]["reference"], "PAY-42");
    // The same message again (a sender's retry): the same event.
    let (_, again) = post(&url, "application/json", &signed, body).await;
    assert_eq!(again["results"][0]["event_id"], event_id.as_str());

    // Without event_type: webhook_received.
    let plain = r#"{"status": "ok"}"#;
    let (status, receipt) = post(
        &url,
        "application/json",
        &standard_headers(WEBHOOK_SECRET, "msg_plain", now(), plain),
        plain,
    )
    .await;
    assert_eq!(status, 200);
    let trace = d
        .wait_for_trace(
            "acme",
            receipt["results"][0]["event_id"].as_str().unwrap(),
            TIMEOUT,
        )
        .await;
    assert_eq!(trace["event"]["event_type"], "webhook_received");

    // A replay: a validly signed message ten minutes old.
    let replayed = standard_headers(WEBHOOK_SECRET, "msg_old", now() - 600, body);
    let answer = post(&url, "application/json", &replayed, body).await;
    assert_error(
        &answer,
        403,
        "signature_rejected",
        "more than the 300 s allowed",
    );
    // From the future, a wrong secret, a changed body, no signature: 403.
    let future = standard_headers(WEBHOOK_SECRET, "msg_new", now() + 600, body);
    assert_error(
        &post(&url, "application/json", &future, body).await,
        403,
        "signature_rejected",
        "webhook-timestamp",
    );
    let wrong = standard_headers(
        "whsec_c2VjcmV0LWtleS1vZi1zb21lb25lLWVsc2U=",
        "msg_x",
        now(),
        body,
    );
    assert_error(
        &post(&url, "application/json", &wrong, body).await,
        403,
        "signature_rejected",
        "no v1 signature",
    );
    assert_error(
        &post(
            &url,
            "application/json",
            &signed,
            r#"{"event_type": "payment_settled", "amount": 5000}"#,
        )
        .await,
        403,
        "signature_rejected",
        "no v1 signature",
    );
    assert_error(
        &post(&url, "application/json", &[], body).await,
        403,
        "signature_rejected",
        "webhook-id header is missing",
    );
    assert_eq!(inbound_metric(&d, "webhook", "acme", "rejected").await, 5);

    // Signed, but not an event: accepted and kept as unmatched.
    let bad = r#"{"event_type": "payment.settled"}"#;
    let (status, receipt) = post(
        &url,
        "application/json",
        &standard_headers(WEBHOOK_SECRET, "msg_bad", now(), bad),
        bad,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(receipt["results"][0]["result"], "malformed");
    let kept = unmatched(&d, "acme").await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["record"], json!({"event_type": "payment.settled"}));

    // A secret that cannot verify anything: the sender learns that, and
    // nothing of the secret's text (the log names what is wrong with it).
    d.set_secret("acme", "gateway", "hunter2!").await;
    let answer = post(&url, "application/json", &signed, body).await;
    assert_error(
        &answer,
        503,
        "not_configured",
        "the signing secret is not a Standard Webhooks secret: set account secret \"gateway\" \
         of account acme to whsec_ + base64 of the key",
    );
    let message = answer.1["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("symbol") && !message.contains("offset") && !message.contains("33"),
        "{message}"
    );
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;

    // The secret stays while the URL checks signatures with it.
    let kept = d.cli(&["secrets", "rm", "acme", "gateway"]).await;
    assert!(
        kept.fails().contains(
            "secret \"gateway\" of account acme is used by the inbound webhook URL \
             (`switchboard inbound revoke acme webhook`)"
        ),
        "{}",
        kept.stderr
    );
}

/// A signed webhook whose body would make an event over
/// `limits.max_event_bytes` is answered with why and kept as unmatched:
/// it is neither accepted and then lost (poison) nor refused for ever.
#[tokio::test]
async fn a_webhook_too_large_for_an_event_is_kept_as_unmatched() {
    let d = Dispatcher::embedded();
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    let url = create(&d, "acme", "webhook", &["--secret", "gateway"]).await;
    // 300 KiB of data: over the 256 KiB events may be, under the 1 MiB a
    // request may be.
    let body = json!({"event_type": "report_ready", "report": "x".repeat(300 * 1024)}).to_string();
    let headers = standard_headers(WEBHOOK_SECRET, "msg_large", now(), &body);
    let (status, receipt) = post(&url, "application/json", &headers, &body).await;
    assert_eq!(status, 200, "{receipt:#}");
    let result = &receipt["results"][0];
    assert_eq!(result["result"], "malformed", "{receipt:#}");
    let reason = result["reason"].as_str().unwrap();
    assert!(
        reason.contains("too large for the bus") && reason.contains("limits.max_event_bytes"),
        "{reason}"
    );
    // Kept, its first 64 KiB: the size says it was cut.
    let kept = unmatched(&d, "acme").await;
    assert_eq!(kept.len(), 1);
    let record = kept[0]["record"].as_str().expect("the record's text, cut");
    assert!(
        record.starts_with(r#"{"event_type":"report_ready","report":"xxx"#),
        "{}",
        &record[..60]
    );
    assert_eq!(record.len(), 64 * 1024);
    assert_eq!(kept[0]["record_bytes"], body.len());
    assert_eq!(
        d.cli(&["dead-letters", "list", "acme"]).await.ok().trim(),
        "account acme has no dead letters"
    );
}

/// Unmatched records are kept for `[messages] retention`, as message
/// records are: then the sweep removes them (SendGrid's posts are not
/// signed, so anyone holding the URL could otherwise fill the store).
#[tokio::test]
async fn unmatched_records_go_after_the_messages_retention() {
    let d = Dispatcher::with_config(None, "[messages]\nretention = \"8s\"\n");
    let url = create(&d, "acme", "sendgrid", &[]).await;
    let body = json!([{
        "email": "someone@example.org", "event": "delivered",
        "sg_message_id": "nobody-sent-this", "timestamp": now(),
    }])
    .to_string();
    let posted = std::time::Instant::now();
    let (status, receipt) = post(&url, "application/json", &[], &body).await;
    assert_eq!(status, 200, "{receipt:#}");
    assert_eq!(counts(&receipt), (1, 0, 1), "{receipt:#}");
    let kept = unmatched(&d, "acme").await;
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert_eq!(kept[0]["record"]["sg_message_id"], "nobody-sent-this");
    // Swept every second (an eighth of the retention, at least a second):
    // kept for 8 s, gone by about 9 s after it came.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = unmatched(&d, "acme").await.len();
    if posted.elapsed() < Duration::from_secs(7) {
        assert_eq!(still, 1, "gone before its time");
    }
    wait_until("the record's expiry", Duration::from_secs(20), || async {
        unmatched(&d, "acme").await.is_empty().then_some(())
    })
    .await;
    assert!(posted.elapsed() >= Duration::from_secs(8));
}

/// A large post (an Inbound Parse e-mail may be up to 20 MiB) to a URL
/// that is none is refused before its body is read: the answer comes while
/// the body has not been sent.
#[tokio::test]
async fn a_large_post_to_a_wrong_inbound_url_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Dispatcher::embedded();
    let url = create(&d, "acme", "sendgrid", &[]).await;
    let address = d.url().trim_start_matches("http://").to_string();
    let answer_to = |path: String| {
        let address = address.clone();
        async move {
            let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {address}\r\n\
                 Content-Type: multipart/form-data; boundary=xyz\r\n\
                 Content-Length: {}\r\n\r\n--xyz\r\n",
                20 * 1024 * 1024
            );
            socket.write_all(head.as_bytes()).await.unwrap();
            let mut answer = vec![0; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
                .await
                .map(|n| String::from_utf8_lossy(&answer[..n.unwrap()]).into_owned());
            read.ok()
        }
    };
    let path = url.trim_start_matches(d.url()).to_string();
    let wrong = path
        .rsplit_once('/')
        .map(|(p, _)| format!("{p}/not-the-secret"))
        .unwrap();
    let answer = answer_to(wrong)
        .await
        .expect("an answer before the body is sent");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // The URL itself waits for the body it was promised.
    assert_eq!(answer_to(path).await, None);
}

#[tokio::test]
async fn inbound_urls_are_listed_rotated_and_revoked_per_account() {
    let d = Dispatcher::embedded();
    let url = create(&d, "acme", "sendgrid", &[]).await;
    let secret = url.rsplit('/').next().unwrap().to_string();
    assert_eq!(secret.len(), 64, "{url}");

    // Listed without the URL or its secret.
    let listed = d.cli(&["inbound", "list", "acme", "--json"]).await.json();
    let hooks = listed["inbound"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["provider"], "sendgrid");
    assert!(hooks[0]["created_at"].is_string());
    assert!(!listed.to_string().contains(&secret), "{listed}");
    let text = d.cli(&["inbound", "list", "acme"]).await;
    assert!(text.ok().contains("sendgrid"), "{}", text.ok());
    assert!(!text.ok().contains(&secret));
    assert_eq!(
        d.cli(&["inbound", "list", "other", "--json"]).await.json()["inbound"],
        json!([])
    );
    let (status, one) = d.get("/v1/accounts/acme/inbound/sendgrid").await;
    assert_eq!((status, &one["provider"]), (200, &json!("sendgrid")));

    // A second create is refused; --rotate replaces the URL.
    let again = d.cli(&["inbound", "create", "acme", "sendgrid"]).await;
    assert!(
        again
            .fails()
            .contains("already has an inbound sendgrid webhook"),
        "{}",
        again.stderr
    );
    let rotated = create(&d, "acme", "sendgrid", &["--rotate"]).await;
    assert_ne!(rotated, url);
    let ok = post(&rotated, "application/json", &[], "[]").await;
    assert_eq!(ok.0, 200, "{:#}", ok.1);
    assert_error(
        &post(&url, "application/json", &[], "[]").await,
        404,
        "not_found",
        "no inbound webhook",
    );

    // Revoked: 404 from then on.
    let revoked = d.cli(&["inbound", "revoke", "acme", "sendgrid"]).await;
    assert!(revoked.ok().contains("answers 404"), "{}", revoked.ok());
    assert_error(
        &post(&rotated, "application/json", &[], "[]").await,
        404,
        "not_found",
        "no inbound webhook",
    );
    assert_eq!(
        d.cli(&["inbound", "list", "acme", "--json"]).await.json()["inbound"],
        json!([])
    );

    // Unknown providers, secrets for providers that take none.
    let unknown = d.cli(&["inbound", "create", "acme", "mailgun"]).await;
    assert!(
        unknown
            .fails()
            .contains("use one of sendgrid, twilio, webhook"),
        "{}",
        unknown.stderr
    );
    let stray = d
        .cli(&[
            "inbound", "create", "acme", "sendgrid", "--secret", "gateway",
        ])
        .await;
    assert!(
        stray
            .fails()
            .contains("--secret is for the webhook provider only"),
        "{}",
        stray.stderr
    );

    // messages/unmatched is its own route, not the message called "unmatched".
    let (status, body) = d.get("/v1/accounts/acme/messages/unmatched").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["unmatched"], json!([]));
    let (status, body) = d
        .get("/v1/accounts/acme/messages/0192f1c0-7b1c-7cc3-9a55-000000000001")
        .await;
    assert_eq!(status, 404, "{body}");
    let empty = d.cli(&["messages", "unmatched", "acme"]).await;
    assert!(
        empty.ok().contains("no unmatched inbound records"),
        "{}",
        empty.ok()
    );
}

/// A provider's batch over the body limit is refused with 413, saying what
/// the limit is and how to raise it; nothing of it is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_batch_over_the_body_limit_says_the_limit_and_how_to_raise_it() {
    let d = Dispatcher::embedded();
    let url = create(&d, "acme", "sendgrid", &[]).await;
    let record = json!({"event": "delivered", "sg_message_id": "x.y", "timestamp": 1,
                        "sg_event_id": "e", "padding": "p".repeat(1_000)});
    let batch = Value::Array(vec![record; 1_100]).to_string();
    assert!(batch.len() > 1 << 20);
    let (status, answer) = post(&url, "application/json", &[], &batch).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "body_too_large", "{answer}");
    let message = answer["error"]["message"].as_str().expect("a message");
    for part in [
        "1048576 bytes",
        "limits.max_event_bytes",
        "fewer records a post",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert!(unmatched(&d, "acme").await.is_empty());
    // A batch within the limit is read.
    let (status, answer) = post(&url, "application/json", &[], "[]").await;
    assert_eq!(status, 200, "{answer}");
}
