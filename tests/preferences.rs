//! Preferences and suppression: one-click unsubscribe links (RFC 8058),
//! SendGrid's unsubscribes, and the account's own `preferences set` stop
//! the next send to an address — recorded `suppressed`, the step going on —
//! and opting in again lets it through.

use serde_json::{Value, json};

use crate::peers::{HttpReceiver, SmtpSink};
use crate::util::{Dispatcher, TIMEOUT, wait_until};

const NEWS: &str = r#"
channel = "email"
category = "newsletter"
subject = "News for {{ recipient.name }}"
text = "Hello {{ recipient.name }}: {{ context.headline }}"
"#;

const CHAINS: &str = r#"
account_key = "acme"

[[chains]]
name = "news"
event_type = "news"

[[chains.steps]]
handler = "send_email"
config = { template = "news", context = { headline = "{{ event.event_data.headline }}" }, recipients = [
  { name = "Ann", email = "ann@example.org" },
  { name = "Bob", email = "bob@example.org" },
  { name = "Cat", email = "cat@example.org" },
] }

[[chains.steps]]
handler = "send_sms"
config = { to = "+27820000004", body = "{{ event.event_data.headline }}" }
"#;

/// Posts a `news` event and waits for its trace; the trace's steps by name.
async fn news(d: &Dispatcher, headline: &str) -> std::collections::BTreeMap<String, Value> {
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "news",
            "event_data": {"headline": headline}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    trace["chains"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

/// Each message of a step's output: (to, status, reason).
fn outcomes(step: &Value) -> Vec<(String, String, String)> {
    step["output"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["to"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
                m["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The e-mails the sink has with `headline` in their text, by recipient.
fn mails_with(smtp: &SmtpSink, headline: &str) -> std::collections::BTreeMap<String, Value> {
    smtp.messages()
        .into_iter()
        .filter(|m| m["text"].as_str().is_some_and(|t| t.contains(headline)))
        .map(|m| (m["rcpt_tos"][0].as_str().unwrap().to_string(), m))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_out_addresses_are_suppressed_until_they_opt_in() {
    let smtp = SmtpSink::start();
    let receiver = HttpReceiver::start(std::time::Duration::from_secs(5));
    let config = format!(
        "[providers.email.sink]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
         from = \"Switchboard <noreply@example.org>\"\n\n\
         [providers.sms.gateway]\ntype = \"http\"\nurl = \"{}/sms\"\nfrom = \"Switchboard\"\n",
        smtp.port(),
        receiver.url()
    );
    let d = Dispatcher::with_config(None, &config);
    let file = d.file("news.toml", NEWS);
    d.cli(&["templates", "put", "acme", "news", file.to_str().unwrap()])
        .await
        .ok();
    d.apply_chains("acme.toml", CHAINS).await;

    // First: everyone is sent to, each e-mail with its own one-click link.
    let steps = news(&d, "first").await;
    let mails = wait_until("three e-mails", TIMEOUT, || async {
        let m = mails_with(&smtp, "first");
        (m.len() == 3).then_some(m)
    })
    .await;
    let mut links = std::collections::BTreeMap::new();
    for (to, mail) in &mails {
        let header = mail["headers"]["list-unsubscribe"]
            .as_str()
            .unwrap_or_else(|| panic!("no List-Unsubscribe: {mail:#}"));
        let url = header
            .strip_prefix('<')
            .and_then(|h| h.strip_suffix('>'))
            .unwrap_or_else(|| panic!("{header}"));
        assert!(
            url.starts_with(&format!("{}/v1/unsubscribe/acme/", d.url())),
            "{url}"
        );
        assert_eq!(
            mail["headers"]["list-unsubscribe-post"], "List-Unsubscribe=One-Click",
            "{mail:#}"
        );
        links.insert(to.clone(), url.to_string());
    }
    assert_ne!(links["ann@example.org"], links["bob@example.org"]);
    assert!(
        outcomes(&steps["send_email"])
            .iter()
            .all(|(_, status, _)| status == "sent"),
        "{:#}",
        steps["send_email"]
    );
    let ann_message = steps["send_email"]["output"]["messages"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let bob_message = steps["send_email"]["output"]["messages"][1]["message_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Ann: the page asks and changes nothing (link scanners GET); the
    // one-click POST unsubscribes her from the template's category.
    let http = reqwest::Client::new();
    let page = http.get(&links["ann@example.org"]).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(
        page.contains(
            "Stop sending e-mail in the category “newsletter” to <strong>ann@example.org</strong>?"
        ) && page.contains("<form method=\"post\">"),
        "{page}"
    );
    let shown = d
        .cli(&["preferences", "show", "acme", "ann@example.org", "--json"])
        .await
        .json();
    assert_eq!(shown["email"]["topics"], json!({}), "{shown:#}");
    let done = http
        .post(&links["ann@example.org"])
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    assert!(done.text().await.unwrap().contains("will not be sent"));
    // A link altered or cut short does nothing.
    let altered = links["cat@example.org"].replace("/acme/", "/acme/x");
    for bad in [
        altered,
        links["cat@example.org"][..links["cat@example.org"].len() - 3].to_string(),
    ] {
        let answer = http.post(&bad).send().await.unwrap();
        assert_eq!(answer.status(), 404, "{bad}");
        assert!(answer.text().await.unwrap().contains("not valid"));
    }
    let (_, ann) = d
        .get(&format!("/v1/accounts/acme/messages/{ann_message}"))
        .await;
    assert_eq!(ann["status"], "unsubscribed", "{ann:#}");

    // Bob: SendGrid reports he unsubscribed.
    let printed = d
        .cli(&["inbound", "create", "acme", "sendgrid", "--json"])
        .await
        .json();
    let hook = printed["url"].as_str().unwrap().to_string();
    let report_body = json!([{"email": "bob@example.org", "event": "unsubscribe",
        "sg_event_id": "unsub-1", "switchboard_message_id": bob_message,
        "timestamp": switchboard_sdk::now().unix_timestamp() - 1}]);
    let receipt = http
        .post(&hook)
        .header("content-type", "application/json")
        .body(report_body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(receipt.status(), 200);

    // Dan: the account opts his number out of SMS.
    let set = d
        .cli(&[
            "preferences",
            "set",
            "acme",
            "+27820000004",
            "sms",
            "out",
            "--reason",
            "asked by phone",
        ])
        .await;
    assert!(set.ok().contains("sms +27820000004"), "{set:?}");
    assert!(set.ok().contains("opted out"), "{set:?}");

    // A dry run says who would be suppressed, and sends nothing.
    let (status, report) = d
        .request(
            reqwest::Method::POST,
            "/v1/accounts/acme/chain-test",
            Some(d.admin_token()),
            Some(
                json!({"account_key": "acme", "conversation_key": "c",
                    "conversation_type": "web", "event_type": "news",
                    "event_data": {"headline": "dry"}})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(status, 200, "{report:#}");
    let dry: Vec<(Value, Value)> = report["chains"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .flat_map(|s| {
            s["output"]["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|m| (m["to"].clone(), m["status"].clone()))
        .collect();
    assert_eq!(
        dry,
        [
            (json!("ann@example.org"), json!("suppressed")),
            (json!("bob@example.org"), json!("suppressed")),
            (json!("cat@example.org"), json!("simulated")),
            (json!("+27820000004"), json!("suppressed")),
        ],
        "{report:#}"
    );
    assert!(mails_with(&smtp, "dry").is_empty());

    // Second: only Cat is sent to; the others are suppressed, each saying why.
    let steps = news(&d, "second").await;
    let email = outcomes(&steps["send_email"]);
    assert_eq!(
        email
            .iter()
            .map(|(to, s, _)| (to.as_str(), s.as_str()))
            .collect::<Vec<_>>(),
        [
            ("ann@example.org", "suppressed"),
            ("bob@example.org", "suppressed"),
            ("cat@example.org", "sent")
        ],
        "{:#}",
        steps["send_email"]
    );
    assert!(
        email[0].2.contains("opted out of category \"newsletter\"")
            && email[0].2.contains("one-click unsubscribe"),
        "{}",
        email[0].2
    );
    assert!(
        email[1].2.contains("opted out of all email")
            && email[1].2.contains("sendgrid unsubscribe"),
        "{}",
        email[1].2
    );
    let sms = outcomes(&steps["send_sms"]);
    assert_eq!(sms[0].1, "suppressed", "{sms:?}");
    assert!(sms[0].2.contains("asked by phone"), "{sms:?}");
    let second = wait_until("Cat's e-mail", TIMEOUT, || async {
        let m = mails_with(&smtp, "second");
        (!m.is_empty()).then_some(m)
    })
    .await;
    let gateway = receiver.requests_to("/sms").await;
    assert_eq!(gateway.len(), 1, "only the first SMS went: {gateway:#?}");
    let suppressed_id = steps["send_email"]["output"]["messages"][0]["message_id"]
        .as_str()
        .unwrap();
    let (_, record) = d
        .get(&format!("/v1/accounts/acme/messages/{suppressed_id}"))
        .await;
    assert_eq!(record["status"], "suppressed", "{record:#}");

    // Bob opts in again; Ann's category opt-out holds. SendGrid posting
    // its (older) unsubscribe again does not undo his choice.
    d.cli(&[
        "preferences",
        "set",
        "acme",
        "bob@example.org",
        "email",
        "in",
    ])
    .await
    .ok();
    let again = http
        .post(&hook)
        .header("content-type", "application/json")
        .body(report_body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let steps = news(&d, "third").await;
    let email = outcomes(&steps["send_email"]);
    assert_eq!(
        email.iter().map(|(_, s, _)| s.as_str()).collect::<Vec<_>>(),
        ["suppressed", "sent", "sent"],
        "{:#}",
        steps["send_email"]
    );
    let shown = d
        .cli(&["preferences", "show", "acme", "bob@example.org", "--json"])
        .await
        .json();
    assert_eq!(
        shown["email"]["topics"]["all"]["subscribed"], true,
        "{shown:#}"
    );
    assert_eq!(shown["sms"], Value::Null, "{shown:#}");
    wait_until("Bob's third e-mail", TIMEOUT, || async {
        mails_with(&smtp, "third")
            .contains_key("bob@example.org")
            .then_some(())
    })
    .await;
    assert_eq!(second.len(), 1, "{second:#?}");
}
