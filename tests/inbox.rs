//! In-app notifications: a chain's `notify` steps leave text, Markdown
//! (sanitised) and action notifications in each person's inbox, once each;
//! content that cannot be shown safely is refused.

use serde_json::{Value, json};

use crate::util::{Dispatcher, TIMEOUT};

const CHAINS: &str = r#"
account_key = "acme"

[[chains]]
name = "welcome"
event_type = "signed_up"

[[chains.steps]]
handler = "notify"
name = "hello"
config = { to = "{{ event.event_data.user }}", body = "Welcome, {{ event.event_data.name }}!" }

[[chains.steps]]
handler = "notify"
name = "tips"
config = { to = "{{ event.event_data.user }}", content_type = "markdown", category = "tips", sender = "Acme", body = "**Tip:** see [the guide](https://acme.example/guide) <script>alert(1)</script> [x](javascript:alert(2)) <img src=x onerror=alert(3)>" }

[[chains.steps]]
handler = "notify"
name = "verify"
config = { to = "{{ event.event_data.user }}", content_type = "url_action", title = "Verify your e-mail", body = "One click and you are in.", url = "{{ event.event_data.link }}", action_label = "Verify" }
"#;

async fn signed_up(d: &Dispatcher, user: &str, link: &str) -> Value {
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "signed_up",
            "event_data": {"user": user, "name": "Ann & co", "link": link}}))
        .await;
    d.wait_for_trace("acme", &id, TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_leaves_each_kind_of_notification_in_its_receivers_inbox() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", CHAINS).await;
    for user in ["ann", "bob"] {
        let trace = signed_up(&d, user, "https://acme.example/verify?u=1").await;
        assert_eq!(trace["status"], "done", "{trace:#}");
    }

    let inbox = d
        .cli(&["inbox", "list", "acme", "ann", "--json"])
        .await
        .json();
    assert_eq!(
        (&inbox["unread"], &inbox["total"]),
        (&json!(3), &json!(3)),
        "{inbox:#}"
    );
    let notes = inbox["notifications"].as_array().unwrap();
    assert!(notes.iter().all(|n| n["receiver"] == "ann"), "{inbox:#}");
    let kinds: Vec<&str> = notes
        .iter()
        .map(|n| n["content"]["content_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["url_action", "markdown", "text"],
        "newest first: {inbox:#}"
    );
    assert_eq!(notes[2]["content"]["body"], "Welcome, Ann & co!");
    assert_eq!(notes[2]["category"], "basic");
    let markdown = &notes[1];
    assert_eq!(
        (&markdown["category"], &markdown["sender"]),
        (&json!("tips"), &json!("Acme"))
    );
    let html = markdown["content"]["html"].as_str().unwrap();
    assert!(html.contains("<strong>Tip:</strong>"), "{html}");
    assert!(
        html.contains("href=\"https://acme.example/guide\""),
        "{html}"
    );
    for bad in ["<script", "javascript:", "onerror", "<img src=x"] {
        assert!(!html.contains(bad), "{bad} in {html}");
    }
    assert_eq!(
        notes[0]["content"],
        json!({"content_type": "url_action", "title": "Verify your e-mail",
               "body": "One click and you are in.", "url": "https://acme.example/verify?u=1",
               "action_label": "Verify"})
    );
    let (_, bob) = d.get("/v1/accounts/acme/inbox/bob").await;
    assert_eq!(bob["total"], 3, "{bob:#}");
    let (_, nobody) = d.get("/v1/accounts/acme/inbox/carol").await;
    assert_eq!(
        (&nobody["total"], &nobody["notifications"]),
        (&json!(0), &json!([]))
    );

    // For people: the counts and a line per notification.
    let shown = d.cli(&["inbox", "list", "acme", "ann"]).await;
    assert!(
        shown.ok().contains("ann of account acme: 3 unread of 3"),
        "{shown:?}"
    );
    assert!(shown.ok().contains("Verify your e-mail"), "{shown:?}");

    // A link the event supplies that is not http(s): the step fails for
    // good, naming the field, and nothing is left.
    let trace = signed_up(&d, "dan", "javascript:alert(1)").await;
    let steps = trace["chains"][0]["steps"].as_array().unwrap();
    let verify = steps.iter().find(|s| s["name"] == "verify").unwrap();
    assert_eq!(verify["outcome"], "failed", "{trace:#}");
    assert!(
        verify["error"]
            .as_str()
            .unwrap()
            .contains("config.url: \"javascript:alert(1)\" is not an http or https link"),
        "{verify:#}"
    );
    let (_, dan) = d.get("/v1/accounts/acme/inbox/dan").await;
    let kinds: Vec<&Value> = dan["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["content"]["content_type"])
        .collect();
    assert_eq!(kinds, [&json!("markdown"), &json!("text")], "{dan:#}");
}

/// Static content that could not be shown safely is refused when the chain
/// is stored, naming the field.
#[tokio::test]
async fn unsafe_static_content_is_refused_at_apply() {
    let d = Dispatcher::embedded();
    let (status, answer) = d
        .request(
            reqwest::Method::PUT,
            "/v1/accounts/acme/chains",
            Some(d.admin_token()),
            Some(
                r#"
account_key = "acme"
[[chains]]
name = "bad"
event_type = "x"
[[chains.steps]]
handler = "notify"
config = { to = "ann", content_type = "url_action", title = "t", body = "b", url = "data:text/html,<script>alert(1)</script>", action_label = "go" }
"#
                .into(),
            ),
        )
        .await;
    assert_eq!(status, 400, "{answer:#}");
    let text = answer.to_string();
    assert!(
        text.contains("config.url") && text.contains("is not an http or https link"),
        "{answer:#}"
    );
}
