//! Replies: an SMS sent to one of an account's numbers becomes a
//! `message_response` event of that account, matched to the contact and to
//! the message it answers, and runs its chains; STOP and START set the
//! sender's preferences; a reply to a number no account owns is kept as
//! unmatched.

use serde_json::json;

use crate::inbound::{TWILIO_ACCOUNT, create, post, twilio_signature};
use crate::peers::{HttpReceiver, TWILIO_TOKEN};
use crate::util::{Dispatcher, TIMEOUT};

const CHAINS: &str = r#"
account_key = "acme"

[[chains]]
name = "notify"
event_type = "notify"
[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}", name = "Thandi" }
[[chains.steps]]
handler = "send_sms"
config = { to = "{{ steps.create_contact.msisdn }}", body = "Did you get your results?" }

[[chains]]
name = "on-reply"
conversation_type = "sms"
event_type = "message_response"
[[chains.steps]]
handler = "log"
config = { message = "{{ event.event_data.contact.name }} said {{ event.event_data.keyword }} to {{ event.event_data.message.id }}" }

# HELP answers with the account's text.
[[chains]]
name = "help"
conversation_type = "sms"
event_type = "message_response"
when = 'event.event_data.keyword == "HELP"'
[[chains.steps]]
handler = "send_sms"
config = { to = "{{ event.event_data.from }}", from = "{{ event.event_data.to }}", body = "Acme results: reply STOP to stop, START to start again." }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_replies_become_events_of_the_number_owner() {
    let receiver = HttpReceiver::start(std::time::Duration::from_secs(5));
    receiver
        .twilio_sids(json!({"+27820000007": "SM00000000000000000000000000000007"}))
        .await;
    let public = "https://hooks.example.org/switchboard";
    let config = format!(
        "[http]\npublic_url = \"{public}\"\n\n[providers.sms.twilio]\ntype = \"twilio\"\n\
         account_sid = \"{TWILIO_ACCOUNT}\"\nauth_token = \"{TWILIO_TOKEN}\"\nfrom = \"+15005550006\"\n\
         base_url = \"{}\"\n",
        receiver.url()
    );
    let d = Dispatcher::with_config(None, &config);
    d.apply_chains("acme.toml", CHAINS).await;
    let added = d
        .cli(&["numbers", "add", "acme", "twilio", "+1 500 555 0006"])
        .await;
    assert!(
        added
            .ok()
            .contains("+15005550006 on twilio is account acme's"),
        "{added:?}"
    );
    // One address, one account.
    let taken = d
        .cli(&["numbers", "add", "other", "twilio", "+15005550006"])
        .await;
    assert_ne!(taken.code, Some(0));
    assert!(
        taken.stderr.contains("belongs to another account"),
        "{taken:?}"
    );
    let listed = d.cli(&["numbers", "list", "acme", "--json"]).await.json();
    assert_eq!(
        listed["numbers"][0]["address"], "+15005550006",
        "{listed:#}"
    );

    let notify = || async {
        let id = d
            .post_event(&json!({"account_key": "acme", "conversation_key": "c1",
                "conversation_type": "survey", "event_type": "notify",
                "event_data": {"msisdn": "+27820000007"}}))
            .await;
        let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
        trace["chains"][0]["steps"][1]["output"]["messages"][0].clone()
    };
    let sent = notify().await;
    assert_eq!(sent["status"], "sent", "{sent:#}");

    let url = create(&d, "acme", "twilio", &[]).await;
    let local = format!("{}{}", d.url(), url.strip_prefix(public).unwrap());
    let reply = |sid: &str, to: &str, text: &str| {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("MessageSid", sid)
            .append_pair("SmsSid", sid)
            .append_pair("AccountSid", TWILIO_ACCOUNT)
            .append_pair("From", "+27820000007")
            .append_pair("To", to)
            .append_pair("Body", text)
            .append_pair("NumMedia", "0")
            .append_pair("SmsStatus", "received")
            .append_pair("ApiVersion", "2010-04-01")
            .finish();
        let signature = twilio_signature(TWILIO_TOKEN, &url, &body);
        let local = local.clone();
        async move {
            let (status, receipt) = post(
                &local,
                "application/x-www-form-urlencoded",
                &[("x-twilio-signature", signature)],
                &body,
            )
            .await;
            assert_eq!(status, 200, "{receipt:#}");
            receipt["results"][0].clone()
        }
    };

    // A reply: matched to the contact and the message it answers, and run.
    let thanks = reply("SMr1", "+15005550006", "Thanks, got them").await;
    assert_eq!(thanks["result"], "matched", "{thanks:#}");
    assert_eq!(thanks["message_id"], sent["message_id"], "{thanks:#}");
    let event_id = thanks["event_id"].as_str().unwrap().to_string();
    let trace = d.wait_for_trace("acme", &event_id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(trace["chains"][0]["name"], "on-reply", "{trace:#}");
    let data = &trace["event"]["event_data"];
    assert_eq!(
        (&data["from"], &data["to"], &data["text"], &data["provider"]),
        (
            &json!("+27820000007"),
            &json!("+15005550006"),
            &json!("Thanks, got them"),
            &json!("twilio")
        ),
        "{data:#}"
    );
    let (_, event) = d
        .get("/v1/accounts/acme/events?event_type=message_response")
        .await;
    assert!(event.to_string().contains(&event_id), "{event:#}");
    let logged = trace["chains"][0]["steps"][0]["logs"].to_string();
    assert!(
        logged.contains(&format!(
            "Thandi said THANKS to {}",
            sent["message_id"].as_str().unwrap()
        )),
        "{trace:#}"
    );
    // Posted again by Twilio: the same event.
    let again = reply("SMr1", "+15005550006", "Thanks, got them").await;
    assert_eq!(again["event_id"], event_id.as_str());

    // HELP: the help chain answers, from the number it was sent to.
    let help = reply("SMrh", "+15005550006", "help").await;
    let trace = d
        .wait_for_trace("acme", help["event_id"].as_str().unwrap(), TIMEOUT)
        .await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let texts = receiver
        .requests_to(&format!(
            "/2010-04-01/Accounts/{TWILIO_ACCOUNT}/Messages.json"
        ))
        .await;
    let answer = &texts.last().unwrap()["form"];
    assert_eq!(
        (&answer["To"], &answer["From"]),
        (&json!("+27820000007"), &json!("+15005550006")),
        "{texts:#?}"
    );
    assert!(answer["Body"].as_str().unwrap().starts_with("Acme results"));

    // What the sender opted in to and out of.
    let preferences = || async {
        d.cli(&["preferences", "show", "acme", "+27820000007", "--json"])
            .await
            .json()
    };
    // STOP: the next text to the number is suppressed; START undoes it.
    let stop = reply("SMr2", "+15005550006", "stop").await;
    assert_eq!(stop["result"], "matched", "{stop:#}");
    let shown = preferences().await;
    let choice = &shown["sms"]["topics"]["all"];
    assert_eq!(choice["subscribed"], false, "{shown:#}");
    assert_eq!(choice["cause"], "replied STOP to +15005550006", "{shown:#}");
    let suppressed = notify().await;
    assert_eq!(suppressed["status"], "suppressed", "{suppressed:#}");
    reply("SMr3", "+15005550006", "START").await;
    assert_eq!(notify().await["status"], "sent");
    // Twilio posting the STOP again does not undo the START; "stop please"
    // is no STOP.
    reply("SMr2", "+15005550006", "stop").await;
    reply("SMr6", "+15005550006", "stop please, I have them").await;
    let shown = preferences().await;
    assert_eq!(
        shown["sms"]["topics"]["all"]["subscribed"], true,
        "{shown:#}"
    );
    let texts = receiver
        .requests_to(&format!(
            "/2010-04-01/Accounts/{TWILIO_ACCOUNT}/Messages.json"
        ))
        .await;
    assert_eq!(
        texts.len(),
        3,
        "the first text, HELP's answer and the one after START: {texts:#?}"
    );

    // A STOP whose text would make an event too large for the bus: kept as
    // unmatched, and it changes nothing.
    let padded = format!("STOP{}", " ".repeat(300 * 1024));
    let large = reply("SMr7", "+15005550006", &padded).await;
    assert_eq!(large["result"], "malformed", "{large:#}");
    assert!(
        large["reason"]
            .as_str()
            .unwrap()
            .contains("its event would be over limits.max_event_bytes"),
        "{large:#}"
    );
    let shown = preferences().await;
    assert_eq!(
        shown["sms"]["topics"]["all"]["subscribed"], true,
        "{shown:#}"
    );

    // To a number no account owns: kept as unmatched, and nothing runs.
    let stray = reply("SMr4", "+15005550099", "hello?").await;
    assert_eq!(stray["result"], "unknown_address", "{stray:#}");
    assert!(
        stray["reason"].as_str().unwrap().contains(
            "a reply to +15005550099 on twilio, which is not one of account acme's \
                 addresses (`switchboard numbers add acme twilio +15005550099`)"
        ),
        "{stray:#}"
    );
    let unmatched = d
        .cli(&["messages", "unmatched", "acme", "--json"])
        .await
        .json();
    assert_eq!(
        unmatched["unmatched"][0]["result"], "unknown_address",
        "{unmatched:#}"
    );

    // Given up, the number's replies are unmatched too.
    d.cli(&["numbers", "rm", "acme", "twilio", "+15005550006"])
        .await
        .ok();
    let after = reply("SMr5", "+15005550006", "hi").await;
    assert_eq!(after["result"], "unknown_address", "{after:#}");
}

/// A multipart/form-data body as SendGrid Inbound Parse posts it: the
/// fields, then each file.
fn inbound_parse_body(
    boundary: &str,
    fields: &[(&str, String)],
    files: &[(&str, &str, &[u8])],
) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (name, file_name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                 filename=\"{file_name}\"\r\nContent-Type: application/pdf\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// An e-mail reply through SendGrid Inbound Parse: matched by our
/// Message-ID in its In-Reply-To, its file kept as the account's, run as a
/// message_response event; a post that is not Inbound Parse's, or to an
/// address the account does not own, is kept as unmatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_replies_through_inbound_parse_become_events() {
    use crate::peers::SmtpSink;
    use crate::util::wait_until;

    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(
        None,
        &format!(
            "[providers.email.sink]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
             from = \"Acme <hello@acme.example>\"\n",
            smtp.port()
        ),
    );
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "welcome"
event_type = "welcome"
[[chains.steps]]
handler = "send_email"
config = { to = "ann@example.org", subject = "Welcome", text = "Reply to tell us more." }

[[chains]]
name = "on-reply"
conversation_type = "email"
event_type = "message_response"
[[chains.steps]]
handler = "log"
config = { message = "{{ event.event_data.from }} wrote {{ event.event_data.subject }}" }
"#,
    )
    .await;
    d.cli(&["numbers", "add", "acme", "sendgrid", "replies@acme.example"])
        .await
        .ok();
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "welcome", "event_data": {}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    let sent_id = trace["chains"][0]["steps"][0]["output"]["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mail = wait_until("the e-mail", TIMEOUT, || async {
        smtp.messages().into_iter().next()
    })
    .await;
    // On the sender's domain, as spam filters want.
    let our_message_id = format!("<{sent_id}@acme.example>");
    assert_eq!(mail["headers"]["message-id"], our_message_id, "{mail:#}");

    let url = create(&d, "acme", "sendgrid", &[]).await;
    // No public URL configured: the listen address.
    let local = url.clone();
    let boundary = "xYzZY";
    let form = format!("multipart/form-data; boundary={boundary}");
    let scan = b"%PDF-1.4\nsigned form\n".to_vec();
    let parse_post = |to: &str, with_envelope: bool| {
        let mut fields = vec![
            (
                "headers",
                format!(
                    "From: Ann <ann@example.org>\r\nTo: replies@acme.example\r\nMessage-ID: \
                     <reply-1@mail.example.org>\r\nIn-Reply-To: {our_message_id}\r\nSubject: Re: \
                     Welcome"
                ),
            ),
            ("from", "Ann <ann@example.org>".to_string()),
            ("to", to.to_string()),
            ("subject", "Re: Welcome".to_string()),
            ("text", "Here is the signed form.".to_string()),
            ("attachments", "1".to_string()),
        ];
        if with_envelope {
            fields.push((
                "envelope",
                json!({"to": [to], "from": "ann@example.org"}).to_string(),
            ));
        }
        inbound_parse_body(
            boundary,
            &fields,
            &[("attachment1", "signed form.pdf", &scan)],
        )
    };
    let post_form = |body: Vec<u8>| {
        let (local, form) = (local.clone(), form.clone());
        async move {
            let response = reqwest::Client::new()
                .post(&local)
                .header("content-type", form)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.unwrap()["results"][0].clone()
        }
    };

    let result = post_form(parse_post("replies@acme.example", true)).await;
    assert_eq!(result["result"], "matched", "{result:#}");
    assert_eq!(result["message_id"], sent_id.as_str(), "{result:#}");
    let trace = d
        .wait_for_trace("acme", result["event_id"].as_str().unwrap(), TIMEOUT)
        .await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(trace["event"]["conversation_key"], "email-ann_example.org");
    let data = &trace["event"]["event_data"];
    assert_eq!(
        (
            &data["channel"],
            &data["from"],
            &data["to"],
            &data["subject"],
            &data["text"]
        ),
        (
            &json!("email"),
            &json!("ann@example.org"),
            &json!("replies@acme.example"),
            &json!("Re: Welcome"),
            &json!("Here is the signed form.")
        ),
        "{data:#}"
    );
    let file = &data["attachments"][0];
    let name = file["name"].as_str().unwrap();
    assert!(
        name.starts_with("reply-") && name.ends_with("-signed_form.pdf"),
        "{file:#}"
    );
    assert_eq!(file["content_type"], "application/pdf", "{file:#}");
    let (status, _) = d.get(&format!("/v1/accounts/acme/files/{name}")).await;
    assert_eq!(status, 200, "the file is the account's");

    // Not Inbound Parse's (no envelope), or to an address not the account's.
    let malformed = post_form(parse_post("replies@acme.example", false)).await;
    assert_eq!(malformed["result"], "malformed", "{malformed:#}");
    assert!(
        malformed["reason"]
            .as_str()
            .unwrap()
            .contains("no `envelope`"),
        "{malformed:#}"
    );
    let stray = post_form(parse_post("sales@acme.example", true)).await;
    assert_eq!(stray["result"], "unknown_address", "{stray:#}");
}

/// A Vumi inbound message a transport worker publishes on NATS becomes a
/// reply of the account that owns its `to_addr` on that transport, matched
/// to the text it answers; one to an address no account owns is counted
/// and left in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vumi_inbound_messages_on_nats_become_replies() {
    use crate::util::{NatsServer, wait_until};

    let nats = NatsServer::start();
    let d = Dispatcher::with_config(
        Some(&nats),
        "[providers.sms.smsc]\ntype = \"nats\"\ntransport = \"smsc\"\nfrom = \"1234\"\n",
    );
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "notify"
event_type = "notify"
[[chains.steps]]
handler = "send_sms"
config = { to = "+27820000008", body = "Your results are in" }

[[chains]]
name = "on-reply"
conversation_type = "sms"
event_type = "message_response"
[[chains.steps]]
handler = "log"
config = { message = "{{ event.event_data.keyword }} to {{ event.event_data.message.id }}" }
"#,
    )
    .await;
    d.cli(&["numbers", "add", "acme", "smsc", "1234"])
        .await
        .ok();
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "survey", "event_type": "notify", "event_data": {}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    let sent_id = trace["chains"][0]["steps"][0]["output"]["message_id"]
        .as_str()
        .unwrap()
        .to_string();

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let publish = |message_id: &str, to: &str, content: &str| {
        let message = json!({"message_version": "20110921", "message_type": "user_message",
            "message_id": message_id, "timestamp": "2026-12-04 17:00:00.000000",
            "to_addr": to, "from_addr": "+27820000008", "content": content,
            "transport_name": "smsc", "transport_type": "sms", "in_reply_to": null,
            "session_event": null, "transport_metadata": {}, "helper_metadata": {}});
        let js = js.clone();
        async move {
            js.publish("vumi.inbound.smsc", message.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish("vumi-1", "1234", "Yes please").await;
    let listed = wait_until("the reply's event", TIMEOUT, || async {
        let (_, list) = d
            .get("/v1/accounts/acme/events?event_type=message_response")
            .await;
        list["events"].as_array().filter(|e| !e.is_empty()).cloned()
    })
    .await;
    let event_id = listed[0]["id"].as_str().unwrap();
    let trace = d.wait_for_trace("acme", event_id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let data = &trace["event"]["event_data"];
    assert_eq!(
        (
            &data["from"],
            &data["to"],
            &data["provider"],
            &data["keyword"]
        ),
        (
            &json!("+27820000008"),
            &json!("1234"),
            &json!("smsc"),
            &json!("YES")
        ),
        "{data:#}"
    );
    assert_eq!(data["message"]["id"], sent_id.as_str(), "{data:#}");

    // To a number no account owns: counted, no event.
    publish("vumi-2", "5678", "hello?").await;
    wait_until("the stray reply counted", TIMEOUT, || async {
        let (_, text) = d.get("/metrics").await;
        text.as_str()
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("provider=\"vumi\"") && l.contains("unknown_address"))
            .then_some(())
    })
    .await;
    let (_, list) = d
        .get("/v1/accounts/acme/events?event_type=message_response")
        .await;
    assert_eq!(list["events"].as_array().unwrap().len(), 1, "{list:#}");
}
