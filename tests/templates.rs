//! Message templates: each account's e-mail and SMS messages by slug,
//! versioned, through the CLI and the API.

use serde_json::{Value, json};

use crate::util::Dispatcher;

const SIGNED_UP_V1: &str = r#"
channel = "email"
subject = "Welcome"
text = "Hello"
"#;

const SIGNED_UP_V2: &str = r#"
slug = "signed-up"
channel = "email"
subject = "Welcome, {{ recipient.name }}"
html = """<p>Hi {{ recipient.name }},
your plan is <b>{{ context.plan }}</b>.</p>"""
text = "Hi {{ recipient.name }}, your plan is {{ context.plan }}."
idempotency = "{{ template }}:{{ recipient.email }}"

[context]
type = "object"
required = ["plan"]
properties.plan = { type = "string" }
"#;

/// An embedded dispatcher whose e-mail provider `sink` is `smtp`, with
/// `extra` lines of config before it, and the account `acme`'s template
/// `slug` put from `template` (TOML).
async fn mailing(
    smtp: &crate::peers::SmtpSink,
    extra: &str,
    (slug, template): (&str, &str),
) -> Dispatcher {
    let d = Dispatcher::with_config(
        None,
        &format!(
            "{extra}[providers.email.sink]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"noreply@example.org\"\n",
            smtp.port()
        ),
    );
    let file = d.file(&format!("{slug}.toml"), template);
    d.cli(&[
        "templates",
        "put",
        "acme",
        slug,
        file.to_str().expect("a UTF-8 path"),
    ])
    .await
    .ok();
    d
}

async fn api(
    d: &Dispatcher,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    d.request(
        method,
        path,
        Some(d.admin_token()),
        body.map(str::to_string),
    )
    .await
}

/// A template is put from a file, versioned, listed, shown at any version,
/// rendered per recipient with its HTML escaped and its context checked,
/// and removed with its history kept.
#[tokio::test]
async fn templates_are_versioned_rendered_per_recipient_and_checked() {
    let d = Dispatcher::embedded();
    let v1 = d.file("v1.toml", SIGNED_UP_V1);
    let v2 = d.file("v2.toml", SIGNED_UP_V2);
    let path = |p: &std::path::PathBuf| p.to_str().expect("a UTF-8 path").to_string();
    let out = d
        .cli(&["templates", "put", "acme", "signed-up", &path(&v1)])
        .await;
    assert!(
        out.ok()
            .contains("as email template signed-up of account acme, version 1"),
        "{out:?}"
    );
    let out = d
        .cli(&["templates", "put", "acme", "signed-up", &path(&v2)])
        .await;
    assert!(out.ok().contains("version 2"), "{out:?}");

    let list = d.cli(&["templates", "list", "acme"]).await;
    let row = list
        .ok()
        .lines()
        .find(|l| l.starts_with("signed-up"))
        .unwrap_or_else(|| panic!("no row: {list:?}"))
        .to_string();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["signed-up", "email", "2"], "{row}");
    let shown = d
        .cli(&["templates", "show", "acme", "signed-up", "--at", "1"])
        .await;
    assert!(shown.ok().contains("subject = \"Welcome\""), "{shown:?}");
    assert!(shown.ok().contains("version 1"), "{shown:?}");

    let rendered = d
        .cli(&[
            "templates",
            "test",
            "acme",
            "signed-up",
            "--context",
            r#"{"plan": "<gold>"}"#,
            "--recipient",
            r#"{"name": "Ada & co", "email": "ada@example.org"}"#,
        ])
        .await;
    let text = rendered.ok();
    for expected in [
        "--- subject\nWelcome, Ada & co",
        "--- html\n<p>Hi Ada &amp; co,\nyour plan is <b>&lt;gold&gt;</b>.</p>",
        "--- text\nHi Ada & co, your plan is <gold>.",
        "--- idempotency\nsigned-up:ada@example.org",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }

    // A context that breaks the schema: the field and the rule.
    let (status, answer) = api(
        &d,
        reqwest::Method::POST,
        "/v1/accounts/acme/templates/signed-up/test",
        Some(r#"{"context": {"plan": 7}, "recipient": {"name": "Ada"}}"#),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "context_invalid", "{answer}");
    assert_eq!(answer["error"]["details"]["field"], "/plan", "{answer}");
    let refused = d
        .cli(&["templates", "test", "acme", "signed-up", "--context", "{}"])
        .await;
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("\"plan\" is a required property"),
        "{refused:?}"
    );

    // A syntax error names the part, line and column; nothing is stored.
    let broken = "channel = \"email\"\nsubject = \"Hi\"\nhtml = \"\"\"<p>ok</p>\n<p>{{ recipient.name }</p>\"\"\"\n";
    let (status, answer) = api(
        &d,
        reqwest::Method::PUT,
        "/v1/accounts/acme/templates/signed-up",
        Some(broken),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_template", "{answer}");
    let details = &answer["error"]["details"];
    assert_eq!(
        (details["part"].clone(), details["line"].clone()),
        (json!("html"), json!(2)),
        "{answer}"
    );
    assert!(
        details["column"].as_u64().is_some_and(|c| c > 1),
        "{answer}"
    );
    let file = d.file("broken.toml", broken);
    let out = d
        .cli(&["templates", "put", "acme", "signed-up", &path(&file)])
        .await;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("part `html` (line 2, column"),
        "{out:?}"
    );
    let (_, current) = api(
        &d,
        reqwest::Method::GET,
        "/v1/accounts/acme/templates/signed-up",
        None,
    )
    .await;
    assert_eq!(current["version"], 2, "{current}");

    // Slugs are lowercase words.
    let (status, answer) = api(
        &d,
        reqwest::Method::PUT,
        "/v1/accounts/acme/templates/Bad%20Slug",
        Some(SIGNED_UP_V1),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (400, json!("invalid_name")),
        "{answer}"
    );

    // Removed: gone, its versions kept, the numbering goes on.
    let out = d.cli(&["templates", "rm", "acme", "signed-up"]).await;
    assert!(out.ok().contains("removed template signed-up"), "{out:?}");
    let (status, _) = api(
        &d,
        reqwest::Method::GET,
        "/v1/accounts/acme/templates/signed-up",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let versions = d.cli(&["templates", "versions", "acme", "signed-up"]).await;
    assert_eq!(
        versions
            .ok()
            .lines()
            .filter(|l| l.starts_with("signed-up"))
            .count(),
        2,
        "{versions:?}"
    );
    let out = d
        .cli(&["templates", "put", "acme", "signed-up", &path(&v1)])
        .await;
    assert!(out.ok().contains("version 3"), "{out:?}");
    let (_, globex) = api(
        &d,
        reqwest::Method::GET,
        "/v1/accounts/globex/templates",
        None,
    )
    .await;
    assert_eq!(globex["templates"], json!([]), "{globex}");
}

/// A `send_email` step with a template: one message per recipient, each
/// rendered for it (a contact created by an earlier step, a manual
/// recipient), the HTML escaped; a recipient without an e-mail address is
/// recorded as skipped with the reason; a context that breaks the
/// template's schema fails the step for good and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_is_sent_to_each_recipient_rendered_for_it() {
    use crate::peers::SmtpSink;
    use crate::util::{TIMEOUT, wait_until};

    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(
        None,
        &format!(
            "[providers.email.sink]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"Switchboard <noreply@example.org>\"\n",
            smtp.port()
        ),
    );
    let file = d.file("signed-up.toml", SIGNED_UP_V2);
    d.cli(&[
        "templates",
        "put",
        "acme",
        "signed-up",
        file.to_str().expect("a UTF-8 path"),
    ])
    .await
    .ok();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "welcome"
event_type = "signed_up"

[[chains.steps]]
handler = "create_contact"
config = { email = "{{ event.event_data.email }}", name = "{{ event.event_data.name }}" }

[[chains.steps]]
handler = "send_email"
config = { template = "signed-up", context = { plan = "{{ event.event_data.plan }}" }, attachments = "terms.txt", recipients = [
  "{{ steps.create_contact.key }}",
  { name = "Bob <the builder>", email = "BOB@example.org" },
  { name = "Carol", phone = "+27820000003" },
] }
"#,
    )
    .await;
    let terms = d.file("terms.txt", "Be excellent to each other.\n");
    d.cli(&["files", "put", "acme", "terms.txt", terms.to_str().unwrap()])
        .await
        .ok();
    let sent = |plan: Value| {
        let d = &d;
        async move {
            let id = d
                .post_event(&json!({"account_key": "acme", "conversation_key": "c",
                    "conversation_type": "web", "event_type": "signed_up",
                    "event_data": {"email": "ada@example.org", "name": "Ada & co", "plan": plan}}))
                .await;
            d.wait_for_trace("acme", &id, TIMEOUT).await
        }
    };
    let trace = sent(json!("<gold>")).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let mails = wait_until("two e-mails", TIMEOUT, || async {
        let m = smtp.messages();
        (m.len() >= 2).then_some(m)
    })
    .await;
    let to = |address: &str| {
        mails
            .iter()
            .find(|m| m["rcpt_tos"] == json!([address]))
            .unwrap_or_else(|| panic!("no e-mail to {address}: {mails:#?}"))
            .clone()
    };
    let ada = to("ada@example.org");
    assert_eq!(ada["subject"], "Welcome, Ada & co");
    assert_eq!(
        ada["html"]
            .as_str()
            .expect("an HTML part")
            .replace("\r\n", "\n")
            .trim(),
        "<p>Hi Ada &amp; co,\nyour plan is <b>&lt;gold&gt;</b>.</p>"
    );
    assert_eq!(
        ada["text"].as_str().expect("a text part").trim(),
        "Hi Ada & co, your plan is <gold>."
    );
    let bob = to("bob@example.org");
    assert_eq!(bob["subject"], "Welcome, Bob <the builder>");
    assert!(
        bob["html"]
            .as_str()
            .expect("an HTML part")
            .contains("Hi Bob &lt;the builder&gt;,"),
        "{bob:#}"
    );
    assert_eq!(mails.len(), 2, "{mails:#?}");
    // Each with the file, intact.
    for mail in [&ada, &bob] {
        assert_eq!(
            mail["attachments"],
            json!([{"filename": "terms.txt", "content_type": "text/plain",
                    "size": 28, "sha256": "d5ba112a67de435d35ff876d45e68fd67aa33f285e74b4623f2a380374167bba"}]),
            "{mail:#}"
        );
    }

    let send = trace["chains"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == "send_email")
        .expect("the send_email step")
        .clone();
    let out = &send["output"];
    assert_eq!(
        out["template"],
        json!({"slug": "signed-up", "version": 1}),
        "{send:#}"
    );
    let statuses: Vec<(Value, Value)> = out["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["to"].clone(), m["status"].clone()))
        .collect();
    assert_eq!(
        statuses,
        [
            (json!("ada@example.org"), json!("sent")),
            (json!("bob@example.org"), json!("sent")),
            (json!("+27820000003"), json!("skipped")),
        ],
        "{send:#}"
    );
    let carol = &out["messages"][2];
    assert_eq!(
        carol["reason"], "the recipient has no e-mail address",
        "{carol}"
    );
    let (status, record) = d
        .get(&format!(
            "/v1/accounts/acme/messages/{}",
            carol["message_id"].as_str().expect("an id")
        ))
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "skipped", "{record}");
    assert_eq!(
        record["template"],
        json!({"slug": "signed-up", "version": 1})
    );
    // The record of a sent one keeps what was sent: both bodies, the
    // subject, the template and its version.
    let (_, record) = d
        .get(&format!(
            "/v1/accounts/acme/messages/{}",
            out["messages"][0]["message_id"].as_str().expect("an id")
        ))
        .await;
    assert_eq!(
        record["template"],
        json!({"slug": "signed-up", "version": 1}),
        "{record}"
    );
    assert_eq!(record["subject"], "Welcome, Ada & co", "{record}");
    assert_eq!(
        record["body"], "Hi Ada & co, your plan is <gold>.",
        "{record}"
    );
    assert!(
        record["html"]
            .as_str()
            .is_some_and(|h| h.contains("<b>&lt;gold&gt;</b>")),
        "{record}"
    );

    // A context that breaks the schema: dead, with the field named, and
    // nothing more sent.
    let trace = sent(json!(7)).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let text = trace.to_string();
    assert!(
        text.contains("/plan") && text.contains("is not of type"),
        "{trace:#}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(smtp.messages().len(), 2);

    // The same people again: the template's idempotency key (template and
    // address) holds for its window, so nothing is sent a second time.
    let trace = sent(json!("gold")).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let again = trace["chains"][0]["steps"][1]["output"]["messages"].clone();
    for (i, address) in ["ada@example.org", "bob@example.org"].iter().enumerate() {
        assert_eq!(again[i]["status"], "skipped", "{again:#}");
        assert_eq!(
            again[i]["reason"],
            format!(
                "template \"signed-up\": idempotency key \"signed-up:{address}\" was sent to within 24h"
            ),
            "{again:#}"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(smtp.messages().len(), 2);

    // A template a chain names is not removed; the step is named.
    let out = d.cli(&["templates", "rm", "acme", "signed-up"]).await;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains(
            "template \"signed-up\" of account acme is used by chain welcome step send_email"
        ),
        "{out:?}"
    );
}

/// A `send_sms` step with an SMS template: each recipient with a number
/// gets its own text; one with only an e-mail address is skipped; an
/// e-mail template is refused by an SMS step, naming both channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sms_template_is_sent_to_each_number_rendered_for_it() {
    use crate::peers::HttpReceiver;
    use crate::util::{TIMEOUT, wait_until};

    let receiver = HttpReceiver::start(std::time::Duration::ZERO);
    let d = Dispatcher::with_config(
        None,
        &format!(
            "[providers.sms.gateway]\ntype = \"http\"\nurl = \"{}/sms\"\nfrom = \"Switchboard\"\n",
            receiver.url()
        ),
    );
    for (slug, source) in [
        (
            "code",
            "channel = \"sms\"\ntext = \"Hi {{ recipient.name }}, your code is {{ context.code }}\"\n[context]\nrequired = [\"code\"]\n",
        ),
        ("signed-up", SIGNED_UP_V1),
    ] {
        let (status, answer) = api(
            &d,
            reqwest::Method::PUT,
            &format!("/v1/accounts/acme/templates/{slug}"),
            Some(source),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "code"
event_type = "code"

[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}", name = "Ada" }

[[chains.steps]]
handler = "send_sms"
config = { template = "{{ event.event_data.template }}", context = { code = "{{ event.event_data.code }}" }, recipients = [
  "{{ event.event_data.msisdn }}",
  { name = "Bob", phone = "+27820000002" },
  { name = "Carol", email = "carol@example.org" },
] }
"#,
    )
    .await;
    let run = |template: &str| {
        let d = &d;
        let template = template.to_string();
        async move {
            let id = d
                .post_event(&json!({"account_key": "acme", "conversation_key": "c",
                    "conversation_type": "web", "event_type": "code",
                    "event_data": {"msisdn": "+27820000001", "code": "4711", "template": template}}))
                .await;
            d.wait_for_trace("acme", &id, TIMEOUT).await
        }
    };
    let trace = run("code").await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let requests = wait_until("two SMS", TIMEOUT, || async {
        let r = receiver.requests_to("/sms").await;
        (r.len() >= 2).then_some(r)
    })
    .await;
    let mut texts: Vec<(String, String)> = requests
        .iter()
        .map(|r| {
            let body: Value =
                serde_json::from_str(r["body"].as_str().expect("a body")).expect("JSON");
            (
                body["to"].as_str().expect("to").to_string(),
                body["content"].as_str().expect("content").to_string(),
            )
        })
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        [
            (
                "+27820000001".to_string(),
                "Hi Ada, your code is 4711".to_string()
            ),
            (
                "+27820000002".to_string(),
                "Hi Bob, your code is 4711".to_string()
            ),
        ]
    );
    let send = trace["chains"][0]["steps"][1]["output"].clone();
    assert_eq!(send["messages"][2]["status"], "skipped", "{send:#}");
    assert_eq!(
        send["messages"][2]["reason"], "the recipient has no phone number",
        "{send:#}"
    );

    let trace = run("signed-up").await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    assert!(
        trace
            .to_string()
            .contains("template \\\"signed-up\\\" is an email template; this step sends sms"),
        "{trace:#}"
    );
}

/// A message record keeps what was sent — its bodies cut at the
/// deployment's cap (the message goes whole), when it was sent, the hash of
/// its idempotency key — and is removed once its retention has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_records_are_capped_and_expire_after_their_retention() {
    use crate::peers::SmtpSink;
    use crate::util::{TIMEOUT, wait_until};
    use sha2::Digest;

    let smtp = SmtpSink::start();
    let d = mailing(
        &smtp,
        "[messages]\nretention = \"3s\"\nmax_body_bytes = 1024\n\n",
        (
            "long",
            "channel = \"email\"\nsubject = \"Long\"\ntext = \"{{ context.text }}\"\n\
             idempotency = \"long:{{ recipient.email }}\"\n",
        ),
    )
    .await;
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "long"
event_type = "long"
[[chains.steps]]
handler = "send_email"
config = { template = "long", context = { text = "{{ event.event_data.text }}" }, recipients = [{ email = "ann@example.org" }] }
"#,
    )
    .await;
    let text = "ü".repeat(1500);
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "long", "event_data": {"text": text}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let message_id = trace["chains"][0]["steps"][0]["output"]["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mail = wait_until("the e-mail", TIMEOUT, || async {
        smtp.messages().into_iter().next()
    })
    .await;
    assert_eq!(
        mail["text"].as_str().unwrap().trim_end(),
        text,
        "sent whole"
    );

    let record = d
        .cli(&["messages", "show", "acme", &message_id])
        .await
        .json();
    let body = record["body"].as_str().unwrap();
    assert_eq!(body, "ü".repeat(512), "cut at 1024 bytes: {record:#}");
    assert_eq!(
        record["cut"],
        json!({"cap": 1024, "text_bytes": 3000}),
        "{record:#}"
    );
    assert_eq!(
        record["sent_at"], record["transitions"][1]["at"],
        "{record:#}"
    );
    let key: String = sha2::Sha256::digest(b"long:ann@example.org")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(record["idempotency_key"], key, "{record:#}");

    // Past its retention (3 s after it last changed), it is gone.
    wait_until("the record to expire", TIMEOUT, || async {
        let (status, _) = d
            .get(&format!("/v1/accounts/acme/messages/{message_id}"))
            .await;
        (status == 404).then_some(())
    })
    .await;
    let (_, list) = d.get("/v1/accounts/acme/messages").await;
    assert_eq!(list["messages"], json!([]), "{list:#}");
}

/// A scheduled e-mail goes to the address it was recorded for, the one
/// its opt-out check and unsubscribe link are about, even when the
/// contact's address changed before it fell due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_email_goes_to_the_address_it_was_recorded_for() {
    use crate::peers::SmtpSink;
    use crate::util::{TIMEOUT, wait_until};

    let smtp = SmtpSink::start();
    let d = mailing(
        &smtp,
        "",
        (
            "note",
            "slug = \"note\"\nchannel = \"email\"\nsubject = \"A note\"\ntext = \"Hi {{ recipient.name }}.\"\n",
        ),
    )
    .await;
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "contact"
event_type = "contact"
[[chains.steps]]
handler = "create_contact"
config = { msisdn = "+27820000031", name = "Ann", email = "{{ event.event_data.email }}" }

[[chains]]
name = "later"
event_type = "later"
[[chains.steps]]
handler = "send_email"
config = { template = "note", recipients = ["+27820000031"], scheduled_at = "{{ event.event_data.at }}" }
"#,
    )
    .await;
    let post = |event_type: &str, data: Value| {
        let d = &d;
        let body = json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": event_type, "event_data": data});
        async move {
            let id = d.post_event(&body).await;
            d.wait_for_trace("acme", &id, TIMEOUT).await
        }
    };
    let contact = post("contact", json!({"email": "old@example.org"})).await;
    assert_eq!(contact["status"], "done", "{contact:#}");
    let due = time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(3);
    let at = due
        .replace_nanosecond(0)
        .expect("a whole second")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let later = post("later", json!({"at": at})).await;
    assert_eq!(later["status"], "waiting", "{later:#}");
    let moved = post("contact", json!({"email": "new@example.org"})).await;
    assert_eq!(moved["status"], "done", "{moved:#}");
    assert!(
        time::OffsetDateTime::now_utc() < due,
        "the e-mail fell due before the address changed: the test proves too little"
    );
    let mails = wait_until("the scheduled e-mail", TIMEOUT, || async {
        let m = smtp.messages();
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(mails.len(), 1, "{mails:#?}");
    assert_eq!(
        mails[0]["rcpt_tos"],
        json!(["old@example.org"]),
        "{mails:#?}"
    );
}

/// A scheduled message cancelled before its time, by the account or by
/// its chain's `cancel_on`, gives its template's idempotency key back: the
/// next message with the key goes, instead of being skipped for the rest
/// of the window as if it had been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_scheduled_message_gives_its_idempotency_key_back() {
    use crate::peers::SmtpSink;
    use crate::util::{TIMEOUT, wait_until};

    let smtp = SmtpSink::start();
    let d = mailing(
        &smtp,
        "",
        (
            "code",
            "slug = \"code\"\nchannel = \"email\"\nsubject = \"Your code\"\ntext = \"1234\"\nidempotency = \"{{ template }}:{{ recipient.email }}\"\n",
        ),
    )
    .await;
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "later"
event_type = "later"
cancel_on = { event_type = "stop" }
[[chains.steps]]
handler = "send_email"
config = { template = "code", recipients = [{ email = "{{ event.event_data.email }}" }], scheduled_at = "{{ event.event_data.at }}" }

[[chains]]
name = "now"
event_type = "now"
[[chains.steps]]
handler = "send_email"
config = { template = "code", recipients = [{ email = "{{ event.event_data.email }}" }] }
"#,
    )
    .await;
    let post = |event_type: &str, conversation: &str, data: Value| {
        let d = &d;
        let body = json!({"account_key": "acme", "conversation_key": conversation,
            "conversation_type": "web", "event_type": event_type, "event_data": data});
        async move {
            let id = d.post_event(&body).await;
            (id.clone(), d.wait_for_trace("acme", &id, TIMEOUT).await)
        }
    };
    let at = (time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(3600))
        .replace_nanosecond(0)
        .expect("a whole second")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let status_now = |email: &'static str| {
        let post = &post;
        async move {
            let (_, trace) = post("now", &email.replace('@', "_"), json!({"email": email})).await;
            assert_eq!(trace["status"], "done", "{trace:#}");
            trace["chains"][0]["steps"][0]["output"]["messages"][0]["status"].clone()
        }
    };

    // Cancelled by the account: the key is free at once, and stays free
    // once the message's time comes and its step finds it cancelled.
    let soon = (time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(2))
        .replace_nanosecond(0)
        .expect("a whole second")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let (later, trace) = post(
        "later",
        "c-a",
        json!({"email": "a@example.org", "at": soon}),
    )
    .await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let id = trace["chains"][0]["steps"][0]["output"]["message_id"]
        .as_str()
        .expect("a message id")
        .to_string();
    let cancelled = d.cli(&["messages", "cancel", "acme", &id]).await;
    assert!(
        cancelled.ok().contains("cancelled message"),
        "{cancelled:?}"
    );
    let ended = wait_until("the cancelled message's time", TIMEOUT, || async {
        d.trace("acme", &later)
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(
        ended["chains"][0]["steps"][0]["output"]["messages"][0]["status"], "cancelled",
        "{ended:#}"
    );
    assert_eq!(status_now("a@example.org").await, "sent");

    // Cancelled by the chain's cancel_on.
    let (later, trace) = post("later", "c-b", json!({"email": "b@example.org", "at": at})).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    post("stop", "c-b", json!({})).await;
    wait_until("the cancel_on", TIMEOUT, || async {
        d.trace("acme", &later)
            .await
            .filter(|t| t["status"] == "cancelled")
    })
    .await;
    assert_eq!(status_now("b@example.org").await, "sent");

    // A key still held by a message that went is kept.
    assert_eq!(status_now("a@example.org").await, "skipped");
}

/// A message whose step ran out of retries is recorded `failed`, naming
/// why, and gives its template's idempotency key back: the next message
/// with the key goes (it was recorded `skipped` as if the first had gone),
/// and the failed one is not left `pending` for good.
#[tokio::test]
async fn a_message_whose_step_gave_up_is_failed_and_gives_its_key_back() {
    use crate::peers::SmtpSink;
    use crate::util::{TIMEOUT, free_port};

    let smtp = SmtpSink::start();
    // Nothing listens there: every attempt is refused, a retryable failure.
    let down = free_port();
    let d = mailing(
        &smtp,
        &format!(
            "[providers.email.down]\nhost = \"127.0.0.1\"\nport = {down}\nsecurity = \"none\"\nfrom = \"noreply@example.org\"\n"
        ),
        (
            "code",
            "slug = \"code\"\nchannel = \"email\"\nsubject = \"Your code\"\ntext = \"1234\"\nidempotency = \"{{ template }}:{{ recipient.email }}\"\n",
        ),
    )
    .await;
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "flaky"
event_type = "flaky"
[[chains.steps]]
handler = "send_email"
config = { provider = "down", template = "code", recipients = [{ email = "{{ event.event_data.email }}" }] }
retry = { max_attempts = 2, initial = "50ms", max = "100ms" }

[[chains]]
name = "expiring"
event_type = "expiring"
[[chains.steps]]
handler = "send_email"
config = { provider = "down", template = "code", recipients = [{ email = "{{ event.event_data.email }}" }] }
retry = { max_attempts = 10, initial = "1s", max = "1s" }

[[chains]]
name = "now"
event_type = "now"
[[chains.steps]]
handler = "send_email"
config = { provider = "sink", template = "code", recipients = [{ email = "{{ event.event_data.email }}" }] }
"#,
    )
    .await;
    let post = |event_type: &str, data: Value| {
        let d = &d;
        let body = json!({"account_key": "acme", "conversation_key": "c-1",
            "conversation_type": "web", "event_type": event_type, "event_data": data});
        async move {
            let id = d.post_event(&body).await;
            d.wait_for_trace("acme", &id, TIMEOUT).await
        }
    };
    let record_of = |email: &'static str| {
        let d = &d;
        async move {
            let (status, list) = d.get("/v1/accounts/acme/messages").await;
            assert_eq!(status, 200, "{list:#}");
            let id = list["messages"]
                .as_array()
                .expect("a list of messages")
                .iter()
                .find(|m| m["recipient"] == email)
                .and_then(|m| m["id"].as_str())
                .expect("its message")
                .to_string();
            d.get(&format!("/v1/accounts/acme/messages/{id}")).await.1
        }
    };

    let trace = post("flaky", json!({"email": "a@example.org"})).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let record = record_of("a@example.org").await;
    assert_eq!(record["status"], "failed", "{record:#}");
    assert_eq!(record["provider"], "down", "{record:#}");
    let cause = record["transitions"]
        .as_array()
        .and_then(|t| t.last())
        .map(|t| t["cause"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(
        cause.starts_with("not sent: its step failed for good: ")
            && cause.ends_with("(gave up after 2 attempts)"),
        "{record:#}"
    );

    // The key is free: the next message with it goes.
    let sent = |email: &'static str| {
        let post = &post;
        async move {
            let trace = post("now", json!({ "email": email })).await;
            assert_eq!(trace["status"], "done", "{trace:#}");
            assert_eq!(
                trace["chains"][0]["steps"][0]["output"]["messages"][0]["status"], "sent",
                "{trace:#}"
            );
        }
    };
    sent("a@example.org").await;
    assert_eq!(smtp.messages().len(), 1);

    // The event expires while its step waits to be tried again: the same.
    let expires = switchboard_sdk::format_rfc3339(
        time::OffsetDateTime::now_utc() + time::Duration::milliseconds(3000),
    );
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c-2",
            "conversation_type": "web", "event_type": "expiring",
            "event_data": {"email": "b@example.org"}, "expires_at": expires}))
        .await;
    let trace = crate::util::wait_until("the event's expiry", TIMEOUT, || async {
        d.trace("acme", &id)
            .await
            .filter(|t| t["status"] == "expired")
    })
    .await;
    assert_eq!(trace["chains"][0]["name"], "expiring", "{trace:#}");
    let record = record_of("b@example.org").await;
    assert_eq!(record["status"], "failed", "{record:#}");
    let cause = record["transitions"][1]["cause"]
        .as_str()
        .unwrap_or_default();
    assert!(
        cause.starts_with(
            "not sent: its step failed for good: the event expired before it was tried again \
             (its last attempt: "
        ),
        "{record:#}"
    );
    sent("b@example.org").await;
    assert_eq!(smtp.messages().len(), 2);
}

/// A step with an idempotency key whose send went to some recipients and
/// failed for good for another keeps its key: a duplicate event (another
/// event with the same key) does not send to the first ones again.
#[tokio::test]
async fn a_partly_sent_step_keeps_its_idempotency_key() {
    use crate::peers::SmtpSink;
    use crate::util::TIMEOUT;

    let smtp = SmtpSink::start();
    let d = mailing(
        &smtp,
        "",
        (
            "note",
            "slug = \"note\"\nchannel = \"email\"\nsubject = \"Note\"\ntext = \"Hello {{ recipient.email }}\"\n",
        ),
    )
    .await;
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "batch"
event_type = "batch"
[[chains.steps]]
handler = "send_email"
config = { template = "note", recipients = [{ email = "a@example.org" }, { email = "{{ event.event_data.second }}" }] }
idempotency = { key = "{{ event.event_data.batch }}", window = "1h" }
"#,
    )
    .await;
    let post = |batch: &str, second: &str| {
        let d = &d;
        let body = json!({"account_key": "acme", "conversation_key": format!("c-{batch}-{}", second.len()),
            "conversation_type": "web", "event_type": "batch",
            "event_data": {"batch": batch, "second": second}});
        async move {
            let id = d.post_event(&body).await;
            d.wait_for_trace("acme", &id, TIMEOUT).await
        }
    };

    // The sink refuses the second address for good: the first went.
    let trace = post("b1", "reject@example.org").await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    assert_eq!(smtp.messages().len(), 1);

    // The same batch again: skipped, nobody mailed twice.
    let trace = post("b1", "b@example.org").await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(
        trace["chains"][0]["steps"][0]["outcome"], "skipped",
        "{trace:#}"
    );
    assert_eq!(smtp.messages().len(), 1);

    // Another batch goes to both.
    let trace = post("b2", "b@example.org").await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(smtp.messages().len(), 3);
}
