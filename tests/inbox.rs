//! In-app notifications: a chain's `notify` steps leave text, Markdown
//! (sanitised) and action notifications in each person's inbox, once each;
//! content that cannot be shown safely is refused.

use serde_json::{Value, json};

use crate::util::{Dispatcher, EventStream, StreamEvent, TIMEOUT, wait_until};

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

/// `token`'s inbox stream, resumed after `last_event_id` when given.
async fn open_stream(d: &Dispatcher, token: &str, last_event_id: Option<&str>) -> EventStream {
    let mut request =
        crate::util::http_client(Some(token)).get(format!("{}/v1/inbox/stream", d.url()));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    EventStream::new(request.send().await.unwrap())
}

const ONBOARDING: &str = r#"
account_key = "acme"

[[chains]]
name = "onboarding"
event_type = "joined"

[[chains.steps]]
handler = "notify"
name = "welcome"
config = { to = "ann", body = "Welcome, Ann" }

[[chains.steps]]
handler = "notify"
name = "guide"
config = { to = "bob", content_type = "markdown", category = "tips", body = "Read **the guide**" }

[[chains.steps]]
handler = "notify"
name = "verify"
config = { to = "cat", content_type = "url_action", title = "Verify", body = "Confirm your e-mail", url = "https://acme.example/verify", action_label = "Verify" }

[[chains]]
name = "ping"
event_type = "ping"

[[chains.steps]]
handler = "notify"
config = { to = "{{ event.event_data.to }}", category = "{{ event.event_data.category }}", body = "{{ event.event_data.text }}" }
"#;

async fn ping(d: &Dispatcher, to: &str, category: &str, text: &str) {
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "ping",
            "event_data": {"to": to, "category": category, "text": text}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
}

/// The issue's receiver flow: a chain notifies three people (text,
/// Markdown, an action); each one's token lists only its own, with the
/// right counts; read, unread, archive and read-all change them; the
/// stream brings a new notification and the count change within a
/// second; a stream reconnecting with Last-Event-ID gets what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_read_their_own_inbox_live() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", ONBOARDING).await;
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "joined", "event_data": {}}))
        .await;
    assert_eq!(
        d.wait_for_trace("acme", &id, TIMEOUT).await["status"],
        "done"
    );

    // Tokens through the CLI, as an account's server script would.
    let token = |receiver: &str| {
        let receiver = receiver.to_string();
        let d = &d;
        async move {
            let out = d
                .cli(&["inbox", "token", "acme", &receiver, "--ttl", "2h"])
                .await;
            let token = out.ok().trim().to_string();
            assert!(token.starts_with("sbr_"), "{out:?}");
            token
        }
    };
    let (ann, bob, cat) = (token("ann").await, token("bob").await, token("cat").await);
    let get = |token: &str, path: &str| {
        let (token, path) = (token.to_string(), path.to_string());
        let d = &d;
        async move {
            let (status, body) = d
                .request(reqwest::Method::GET, &path, Some(&token), None)
                .await;
            assert_eq!(status, 200, "{path}: {body}");
            body
        }
    };
    let post = |token: &str, path: &str| {
        let (token, path) = (token.to_string(), path.to_string());
        let d = &d;
        async move {
            let (status, body) = d
                .request(reqwest::Method::POST, &path, Some(&token), None)
                .await;
            assert_eq!(status, 200, "{path}: {body}");
            body
        }
    };
    for (token, receiver, content_type) in [
        (&ann, "ann", "text"),
        (&bob, "bob", "markdown"),
        (&cat, "cat", "url_action"),
    ] {
        let list = get(token, "/v1/inbox").await;
        let notes = list["notifications"].as_array().unwrap();
        assert_eq!(notes.len(), 1, "{list:#}");
        assert_eq!(notes[0]["receiver"], receiver);
        assert_eq!(notes[0]["content"]["content_type"], content_type);
        assert_eq!((&list["unread"], &list["total"]), (&json!(1), &json!(1)));
    }

    // Ann's inbox grows; her stream is open.
    ping(&d, "ann", "billing", "Invoice 1").await;
    ping(&d, "ann", "billing", "Invoice 2").await;
    let mut stream = open_stream(&d, &ann, None).await;
    let opening = stream.next(TIMEOUT).await;
    assert_eq!(opening.kind, "count");
    assert_eq!(opening.data, json!({"unread": 3, "total": 3}));
    // The opening counts carry the newest notification's place, so a
    // client that reconnects before anything new resumes from there.
    assert!(opening.id.is_some(), "{opening:?}");

    // The account's pages, on another origin, may call the receiver
    // routes: preflight without a token, and every answer says so.
    let preflight = reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/inbox/stream", d.url()),
        )
        .header("origin", "https://app.acme.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization, last-event-id",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let allowed = |name: &str| preflight.headers()[name].to_str().unwrap().to_string();
    assert_eq!(allowed("access-control-allow-origin"), "*");
    assert!(allowed("access-control-allow-headers").contains("last-event-id"));
    assert!(allowed("access-control-allow-methods").contains("POST"));
    let listed = crate::util::http_client(Some(&ann))
        .get(format!("{}/v1/inbox", d.url()))
        .header("origin", "https://app.acme.example")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.headers()["access-control-allow-origin"], "*");
    // Not the account's routes.
    let account_route = reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/accounts/acme/chains", d.url()),
        )
        .header("origin", "https://app.acme.example")
        .send()
        .await
        .unwrap();
    assert!(
        account_route
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // Keyset pages, newest first, and the filters.
    let first = get(&ann, "/v1/inbox?limit=2").await;
    let texts = |list: &Value| -> Vec<String> {
        list["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["content"]["body"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&first), ["Invoice 2", "Invoice 1"]);
    let next = first["next"].as_str().expect("a next page").to_string();
    let second = get(&ann, &format!("/v1/inbox?limit=2&before={next}")).await;
    assert_eq!(texts(&second), ["Welcome, Ann"]);
    assert!(second.get("next").is_none(), "{second:#}");
    let billing = get(&ann, "/v1/inbox?category=billing").await;
    assert_eq!(texts(&billing), ["Invoice 2", "Invoice 1"]);

    // Read, unread, archive: each changes the counts, and the stream says so.
    let welcome = second["notifications"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let read = post(&ann, &format!("/v1/inbox/{welcome}/read")).await;
    assert!(read["read_at"].is_string(), "{read:#}");
    let updated = stream.next(TIMEOUT).await;
    assert_eq!(
        (updated.kind.as_str(), &updated.data["id"]),
        ("updated", &json!(welcome))
    );
    assert_eq!(updated.id, None, "updates move no resume point");
    let count = stream.next(TIMEOUT).await;
    assert_eq!(
        (count.kind.as_str(), count.data),
        ("count", json!({"unread": 2, "total": 3}))
    );
    assert_eq!(
        texts(&get(&ann, "/v1/inbox?unread=true").await),
        ["Invoice 2", "Invoice 1"]
    );
    assert_eq!(
        texts(&get(&ann, "/v1/inbox?unread=false").await),
        ["Welcome, Ann"]
    );
    // Each change, then the counts it moved.
    for (action, unread, total) in [("unread", 3, 3), ("archive", 2, 2)] {
        post(&ann, &format!("/v1/inbox/{welcome}/{action}")).await;
        let updated = stream.next(TIMEOUT).await;
        assert_eq!(
            (updated.kind.as_str(), &updated.data["id"]),
            ("updated", &json!(welcome)),
            "{action}"
        );
        let count = stream.next(TIMEOUT).await;
        assert_eq!(
            (count.kind.as_str(), count.data),
            ("count", json!({"unread": unread, "total": total})),
            "{action}"
        );
    }
    assert_eq!(
        get(&ann, "/v1/inbox/count").await,
        json!({"unread": 2, "total": 2})
    );
    assert_eq!(
        texts(&get(&ann, "/v1/inbox").await),
        ["Invoice 2", "Invoice 1"]
    );
    assert_eq!(
        texts(&get(&ann, "/v1/inbox?archived=true").await),
        ["Welcome, Ann"]
    );

    // A new notification reaches the open stream within a second of its
    // step, with the count after it; bob's, left just before, does not.
    ping(&d, "bob", "news", "For bob").await;
    ping(&d, "ann", "news", "Live one").await;
    let live = stream.next(std::time::Duration::from_secs(1)).await;
    assert_eq!(live.kind, "notification");
    assert_eq!(live.data["content"]["body"], "Live one");
    let count = stream.next(std::time::Duration::from_secs(1)).await;
    assert_eq!(count.data, json!({"unread": 3, "total": 3}));
    let resume_at = live.id.expect("a notification's event has an id");
    drop(stream);

    // Missed while away: two more; a reconnecting stream gets both, in
    // order, then the counts.
    ping(&d, "ann", "news", "Missed 1").await;
    ping(&d, "ann", "news", "Missed 2").await;
    let mut again = open_stream(&d, &ann, Some(&resume_at)).await;
    let missed: Vec<StreamEvent> = vec![again.next(TIMEOUT).await, again.next(TIMEOUT).await];
    assert_eq!(
        missed
            .iter()
            .map(|e| (e.kind.as_str(), e.data["content"]["body"].as_str().unwrap()))
            .collect::<Vec<_>>(),
        [("notification", "Missed 1"), ("notification", "Missed 2")]
    );
    let count = again.next(TIMEOUT).await;
    assert_eq!(
        (count.kind.as_str(), count.data),
        ("count", json!({"unread": 5, "total": 5}))
    );
    let (status, bad) = d
        .request(
            reqwest::Method::GET,
            "/v1/inbox?before=nonsense",
            Some(&ann),
            None,
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_cursor");

    // Read all of a category, then all; the stream follows.
    let marked = post(&ann, "/v1/inbox/read_all?category=billing").await;
    assert_eq!(marked, json!({"marked": 2, "unread": 3, "total": 5}));
    let marked = post(&ann, "/v1/inbox/read_all").await;
    assert_eq!(marked, json!({"marked": 3, "unread": 0, "total": 5}));
    let last_count = tokio::time::timeout(TIMEOUT, async {
        loop {
            let e = again.next(TIMEOUT).await;
            if e.kind == "count" && e.data["unread"] == 0 {
                return e.data;
            }
        }
    })
    .await
    .expect("the stream's counts reach 0 unread");
    assert_eq!(last_count, json!({"unread": 0, "total": 5}));

    // Support staff see and manage the same through the account's routes.
    let (_, staff) = d.get("/v1/accounts/acme/inbox/ann/count").await;
    assert_eq!(staff, json!({"unread": 0, "total": 5}));
    let shown = d
        .cli(&["inbox", "mark", "acme", "ann", &welcome, "unarchive"])
        .await;
    assert!(shown.ok().contains("archived no"), "{shown:?}");
    let shown = d.cli(&["inbox", "count", "acme", "ann"]).await;
    assert!(
        shown.ok().contains("ann of account acme: 1 unread of 6"),
        "{shown:?}"
    );
    let shown = d.cli(&["inbox", "read-all", "acme", "ann"]).await;
    assert!(shown.ok().contains("marked 1 read"), "{shown:?}");
    let shown = d
        .cli(&["inbox", "list", "acme", "ann", "--limit", "2"])
        .await;
    assert!(shown.ok().contains("more: --before "), "{shown:?}");
    let bob_list = get(&bob, "/v1/inbox").await;
    assert_eq!(texts(&bob_list), ["For bob", "Read **the guide**"]);
}

/// A page of the account's own app, on an origin of its own (another
/// port), that embeds the widget from the dispatcher: a loopback server
/// answering every request with `html`, until the test ends.
fn app_page(html: String) -> String {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    url
}

/// The widget in a real browser, embedded in a page of another origin:
/// the bell shows the unread count, a notification a chain leaves appears
/// live, a click marks one read, "Mark all read" the rest; Markdown shows
/// as the sanitised HTML and nothing in any content runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_shows_the_inbox_live_and_runs_nothing_from_it() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", ONBOARDING).await;
    ping(
        &d,
        "ann",
        "billing",
        "<script>window.pwned = 'text'</script>Invoice 1",
    )
    .await;
    d.apply_chains(
        "acme.toml",
        &format!(
            "{ONBOARDING}{}",
            r#"
[[chains]]
name = "tip"
event_type = "tip"

[[chains.steps]]
handler = "notify"
config = { to = "ann", content_type = "markdown", body = "**Bold tip** <img src=x onerror=\"window.pwned='img'\"> [click](javascript:window.pwned='link') <script>window.pwned='script'</script>" }
"#
        ),
    )
    .await;
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "web", "event_type": "tip", "event_data": {}}))
        .await;
    assert_eq!(
        d.wait_for_trace("acme", &id, TIMEOUT).await["status"],
        "done"
    );
    let token = d
        .cli(&["inbox", "token", "acme", "ann"])
        .await
        .ok()
        .trim()
        .to_string();
    let page = app_page(format!(
        "<!doctype html><html><head><title>Acme</title>\
         <script src=\"{}/inbox/widget.js\"></script></head>\
         <body><h1>Acme</h1><switchboard-inbox id=\"inbox\" token=\"{token}\">\
         </switchboard-inbox></body></html>",
        d.url()
    ));

    let browser = crate::browser::Browser::start().await;
    let c = &browser.client;
    c.goto(&page).await.unwrap();
    // What the widget shows, read from inside its shadow root.
    let shown = || async {
        c.execute(
            "const root = document.getElementById('inbox').shadowRoot;
             const badge = root.querySelector('.badge');
             return {
               badge: badge.hidden ? '' : badge.textContent,
               items: [...root.querySelectorAll('li[data-id]')].map(li => ({
                 id: li.dataset.id, unread: li.classList.contains('unread'),
                 text: li.querySelector('.body').textContent,
                 html: li.querySelector('.body').innerHTML })),
               pwned: window.pwned === undefined ? null : String(window.pwned),
             };",
            vec![],
        )
        .await
        .expect("the page runs the script")
    };
    let wait_for = |what: &'static str, check: fn(&Value) -> bool| async move {
        wait_until(what, TIMEOUT, || async {
            let now = shown().await;
            check(&now).then_some(now)
        })
        .await
    };
    let now = wait_for("the bell to count two unread", |v| {
        v["badge"] == "2" && v["items"].as_array().is_some_and(|i| i.len() == 2)
    })
    .await;
    let items = now["items"].as_array().unwrap();
    assert!(
        items[0]["html"]
            .as_str()
            .unwrap()
            .contains("<strong>Bold tip</strong>"),
        "{now:#}"
    );
    assert_eq!(
        items[1]["text"], "<script>window.pwned = 'text'</script>Invoice 1",
        "text is shown as text: {now:#}"
    );
    c.execute(
        "document.getElementById('inbox').shadowRoot.querySelector('.bell').click()",
        vec![],
    )
    .await
    .unwrap();
    browser.screenshot("inbox-widget-open").await;
    let panel = c
        .execute(
            "const r = document.getElementById('inbox').shadowRoot
               .querySelector('.panel').getBoundingClientRect();
             return {left: r.left, right: r.right, width: r.width, window: window.innerWidth};",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        panel["left"].as_f64().unwrap() >= 0.0
            && panel["right"].as_f64().unwrap() <= panel["window"].as_f64().unwrap()
            && panel["width"].as_f64().unwrap() > 200.0,
        "the open panel is on screen: {panel}"
    );

    // A chain notifies ann while the page is open: it appears, counted.
    ping(&d, "ann", "news", "Fresh news").await;
    let now = wait_for("the live notification", |v| {
        v["badge"] == "3" && v["items"][0]["text"] == "Fresh news"
    })
    .await;
    let fresh = now["items"][0]["id"].as_str().unwrap().to_string();

    // A click marks it read, here and in the dispatcher.
    c.execute(
        "document.getElementById('inbox').shadowRoot
           .querySelector(`li[data-id='${arguments[0]}']`).click()",
        vec![json!(fresh)],
    )
    .await
    .unwrap();
    wait_for("the badge at two after a click", |v| {
        v["badge"] == "2" && v["items"][0]["unread"] == false
    })
    .await;
    let (_, count) = d.get("/v1/accounts/acme/inbox/ann/count").await;
    assert_eq!(count, json!({"unread": 2, "total": 3}));

    // Mark all read: the bell empties.
    c.execute(
        "document.getElementById('inbox').shadowRoot.querySelector('.read-all').click()",
        vec![],
    )
    .await
    .unwrap();
    let now = wait_for("no unread left", |v| {
        v["badge"] == ""
            && v["items"]
                .as_array()
                .is_some_and(|i| i.iter().all(|n| n["unread"] == false))
    })
    .await;
    browser.screenshot("inbox-widget-read").await;
    let (_, count) = d.get("/v1/accounts/acme/inbox/ann/count").await;
    assert_eq!(count, json!({"unread": 0, "total": 3}));

    // Nothing from any content ran: no script, no handler, no link.
    for link in ["a[href^='javascript']", "img", "script"] {
        let found = c
            .execute(
                "return document.getElementById('inbox').shadowRoot
                   .querySelectorAll(arguments[0]).length",
                vec![json!(link)],
            )
            .await
            .unwrap();
        assert_eq!(found, json!(0), "{link} in the widget");
    }
    assert_eq!(now["pwned"], Value::Null, "content ran: {now:#}");
}

const BROADCAST: &str = r#"
account_key = "acme"

[[chains]]
name = "register"
event_type = "register"

[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}", fields = { plan = "{{ event.event_data.plan }}" } }

[[chains]]
name = "announce"
event_type = "announce"

[[chains.steps]]
handler = "notify"
name = "announcement"
config = { to = { all = true }, category = "news", body = "Announcement {{ event.event_data.n }}" }

[[chains]]
name = "upsell"
event_type = "upsell"

[[chains.steps]]
handler = "notify"
config = { to = { field = "plan", equals = "{{ event.event_data.plan }}" }, body = "Upgrade?" }
"#;

/// How many notifications of event `event` the store in `dir` holds (the
/// dispatcher stopped): what a killed dispatcher had made durable.
fn durable_notifications(dir: &std::path::Path, event: &str) -> usize {
    let store = switchboard_store::Store::open(&dir.join("store")).expect("the store opens");
    store
        .scan_prefix(switchboard_store::Collection::Inbox, b"acme\0")
        .unwrap()
        .iter()
        .filter(|(_, v)| serde_json::from_slice::<Value>(v).unwrap()["event_id"] == event)
        .count()
}

/// A broadcast to 1,000 contacts, the dispatcher SIGKILLed part-way:
/// after the restart every contact has exactly one notification of it (the
/// re-run step left exactly those the killed one had not made durable),
/// and a filtered broadcast reaches only the contacts it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_killed_midway_reaches_everyone_once() {
    const CONTACTS: usize = 1_000;
    let mut d = Dispatcher::embedded();
    d.apply_chains("acme.toml", BROADCAST).await;
    for chunk in (0..CONTACTS).collect::<Vec<_>>().chunks(100) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|i| {
                let plan = if i % 10 == 0 { "gold" } else { "basic" };
                json!({"account_key": "acme", "conversation_key": format!("r{i}"),
                    "conversation_type": "web", "event_type": "register",
                    "event_data": {"msisdn": format!("+2782{i:07}"), "plan": plan}})
            })
            .collect();
        let posts = events.iter().map(|e| d.post_event(e));
        futures::future::join_all(posts).await;
    }
    let contacts: Vec<String> = wait_until("1,000 contacts", TIMEOUT * 4, || async {
        let (_, list) = d.get("/v1/accounts/acme/contacts?limit=5000").await;
        let keys: Vec<String> = list["contacts"]
            .as_array()?
            .iter()
            .map(|c| c["key"].as_str().unwrap().to_string())
            .collect();
        (keys.len() == CONTACTS).then_some(keys)
    })
    .await;
    let mut sorted = contacts.clone();
    sorted.sort();

    // Kill once the broadcast has passed the 300th contact (in the order
    // it goes): its first batch of 200 is durable, the rest not all. Again
    // with a new announcement if the kill came too early or too late.
    let mut midway = None;
    let mut announcements = Vec::new();
    for n in 0..6 {
        let id = d
            .post_event(&json!({"account_key": "acme", "conversation_key": "news",
                "conversation_type": "web", "event_type": "announce",
                "event_data": {"n": n}}))
            .await;
        announcements.push(id.clone());
        let watched = format!("/v1/accounts/acme/inbox/{}/count", sorted[300]);
        wait_until("the broadcast past the 300th contact", TIMEOUT, || async {
            let (_, count) = d.get(&watched).await;
            (count["total"].as_u64()? > n).then_some(())
        })
        .await;
        d.kill9();
        let durable = durable_notifications(&d.data_dir(), &id);
        d.restart();
        let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
        if (1..CONTACTS).contains(&durable) {
            let output = &trace["chains"][0]["steps"][0]["output"];
            midway = Some((durable, output.clone()));
            break;
        }
    }
    let (durable, output) = midway.expect("a kill landed part-way through a broadcast");
    assert_eq!(output["receivers"], CONTACTS, "{output:#}");
    assert_eq!(
        output["left_now"],
        CONTACTS - durable,
        "the re-run left exactly those not yet durable: {output:#}"
    );

    // Every contact: exactly one notification of each announcement.
    for key in &contacts {
        let (_, inbox) = d
            .get(&format!("/v1/accounts/acme/inbox/{key}?limit=100"))
            .await;
        let mut events: Vec<&str> = inbox["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["event_id"].as_str().unwrap())
            .collect();
        events.sort();
        let mut expected: Vec<&str> = announcements.iter().map(String::as_str).collect();
        expected.sort();
        assert_eq!(events, expected, "contact {key}");
    }

    // A broadcast to those whose plan is gold: 100 of them, nobody else.
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "news",
            "conversation_type": "web", "event_type": "upsell",
            "event_data": {"plan": "gold"}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(
        trace["chains"][0]["steps"][0]["output"]["receivers"], 100,
        "{trace:#}"
    );
    let (_, contacts) = d.get("/v1/accounts/acme/contacts?limit=5000").await;
    for contact in contacts["contacts"].as_array().unwrap() {
        let key = contact["key"].as_str().unwrap();
        let (_, inbox) = d
            .get(&format!("/v1/accounts/acme/inbox/{key}?limit=100"))
            .await;
        let upsold = inbox["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["event_id"] == id.as_str());
        assert_eq!(upsold, contact["fields"]["plan"] == "gold", "{contact}");
    }
}

/// A stream ends when its account's receiver-token key is rotated: the
/// way to shut out a token that leaked, open streams included. Another
/// account's rotation leaves it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_accounts_key_is_rotated() {
    let d = Dispatcher::embedded();
    let token = |account: &str| {
        let d = &d;
        let account = account.to_string();
        async move {
            d.cli(&["inbox", "token", &account, "ann"])
                .await
                .ok()
                .trim()
                .to_string()
        }
    };
    let (acme, other) = (token("acme").await, token("other").await);
    let mut stream = open_stream(&d, &acme, None).await;
    assert_eq!(stream.next(TIMEOUT).await.kind, "count");
    d.cli(&["inbox", "rotate-tokens", "other"]).await.ok();
    let still_open =
        tokio::time::timeout(std::time::Duration::from_secs(1), stream.response.chunk()).await;
    assert!(
        still_open.is_err(),
        "another account's rotation ended it: {still_open:?}"
    );
    d.cli(&["inbox", "rotate-tokens", "acme"]).await.ok();
    assert!(
        stream.ends_within(TIMEOUT).await,
        "the stream outlived the rotation"
    );
    let (status, _) = d
        .request(reqwest::Method::GET, "/v1/inbox", Some(&acme), None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = d
        .request(reqwest::Method::GET, "/v1/inbox", Some(&other), None)
        .await;
    assert_eq!(status, 401, "other's own rotation ended its token");
}

/// A receiver may have `[inbox] max_streams_per_receiver` streams open;
/// one more is refused, saying why, and other receivers are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_has_at_most_its_streams_open() {
    let d = Dispatcher::with_config(None, "[inbox]\nmax_streams_per_receiver = 2\n");
    let token = |receiver: &str| {
        let d = &d;
        let receiver = receiver.to_string();
        async move {
            d.cli(&["inbox", "token", "acme", &receiver])
                .await
                .ok()
                .trim()
                .to_string()
        }
    };
    let (ann, bob) = (token("ann").await, token("bob").await);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = open_stream(&d, &ann, None).await;
        assert_eq!(stream.next(TIMEOUT).await.kind, "count");
        open.push(stream);
    }
    let (status, refused) = d
        .request(reqwest::Method::GET, "/v1/inbox/stream", Some(&ann), None)
        .await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["code"], "too_many_streams", "{refused}");
    let mut other = open_stream(&d, &bob, None).await;
    assert_eq!(other.next(TIMEOUT).await.kind, "count");
}

/// A stream ends when its token expires: a token that leaked cannot watch
/// an inbox past its lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires() {
    let d = Dispatcher::embedded();
    d.apply_chains("acme.toml", ONBOARDING).await;
    let token = d
        .cli(&["inbox", "token", "acme", "ann", "--ttl", "2s"])
        .await
        .ok()
        .trim()
        .to_string();
    let mut stream = open_stream(&d, &token, None).await;
    assert_eq!(stream.next(TIMEOUT).await.kind, "count");
    assert!(
        stream.ends_within(TIMEOUT).await,
        "the stream outlived its token"
    );
    let (status, _) = d
        .request(reqwest::Method::GET, "/v1/inbox/stream", Some(&token), None)
        .await;
    assert_eq!(status, 401);
}

/// Housekeeping: past `[inbox] max_per_receiver` the oldest go, read or
/// not; a read one goes once `read_retention` has passed since it was
/// made; unread ones within the cap stay. An open stream says `removed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_keeps_inboxes_within_their_cap_and_retention() {
    let d = Dispatcher::with_config(
        None,
        "[inbox]\nread_retention = \"1s\"\nmax_per_receiver = 3\n",
    );
    d.apply_chains("acme.toml", ONBOARDING).await;
    let token = d
        .cli(&["inbox", "token", "acme", "dan"])
        .await
        .ok()
        .trim()
        .to_string();
    let mut stream = open_stream(&d, &token, None).await;
    assert_eq!(stream.next(TIMEOUT).await.kind, "count");
    for n in 1..=5 {
        ping(&d, "dan", "news", &format!("News {n}")).await;
    }
    let (_, list) = d.get("/v1/accounts/acme/inbox/dan?limit=10").await;
    let newest = list["notifications"][0]["id"].as_str().unwrap().to_string();
    d.request(
        reqwest::Method::POST,
        &format!("/v1/inbox/{newest}/read"),
        Some(&token),
        None,
    )
    .await;
    let bodies = wait_until("housekeeping", TIMEOUT, || async {
        let (_, list) = d.get("/v1/accounts/acme/inbox/dan?limit=10").await;
        let bodies: Vec<String> = list["notifications"]
            .as_array()?
            .iter()
            .map(|n| n["content"]["body"].as_str().unwrap().to_string())
            .collect();
        (bodies.len() == 2).then_some(bodies)
    })
    .await;
    assert_eq!(bodies, ["News 4", "News 3"]);
    let mut removed = 0;
    while removed < 3 {
        let e = stream.next(TIMEOUT).await;
        if e.kind == "removed" {
            assert!(e.data["id"].is_string(), "{e:?}");
            removed += 1;
        }
    }
}

/// The cap holds as notifications are left, not only at the sweep (ten
/// minutes apart with the default retention): a receiver notified many
/// times in a row keeps only its newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_is_kept_within_its_cap_as_notifications_are_left() {
    let d = Dispatcher::with_config(None, "[inbox]\nmax_per_receiver = 8\n");
    d.apply_chains("acme.toml", ONBOARDING).await;
    for n in 1..=20 {
        ping(&d, "eve", "news", &format!("News {n}")).await;
    }
    let (_, list) = d.get("/v1/accounts/acme/inbox/eve?limit=50").await;
    let bodies: Vec<&str> = list["notifications"]
        .as_array()
        .expect("a listing")
        .iter()
        .map(|n| n["content"]["body"].as_str().expect("a body"))
        .collect();
    let newest: Vec<String> = (13..=20).rev().map(|n| format!("News {n}")).collect();
    assert_eq!(bodies, newest);
}

/// The example of docs/inbox.md, as shipped in `examples/inbox/`: the
/// "before" callbacks stop a send (a `when`, a script's `stop()`) or
/// redirect it (the script picks the receiver); "upon" is the notify
/// step's output, the notification as stored; "after" steps run once it is
/// stored, and see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_upon_and_after_a_notification() {
    let d = Dispatcher::embedded();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inbox");
    let put = d
        .cli(&[
            "scripts",
            "put",
            "shop",
            "route_notice",
            example.join("route_notice.rhai").to_str().unwrap(),
        ])
        .await;
    assert_eq!(put.code, Some(0), "{put:?}");
    d.apply_chains(
        "shop.toml",
        &std::fs::read_to_string(example.join("chains.toml")).unwrap(),
    )
    .await;
    let shipped = |data: Value| {
        let d = &d;
        async move {
            let id = d
                .post_event(&json!({"account_key": "shop", "conversation_key": "orders",
                    "conversation_type": "shop", "event_type": "order_shipped",
                    "event_data": data}))
                .await;
            d.wait_for_trace("shop", &id, TIMEOUT).await
        }
    };
    let inbox = |receiver: &'static str| {
        let d = &d;
        async move {
            let (_, list) = d.get(&format!("/v1/accounts/shop/inbox/{receiver}")).await;
            list["notifications"].as_array().unwrap().clone()
        }
    };

    // Plain: the customer is told; the after step saw the stored one.
    let trace = shipped(json!({"order": "A-1", "customer": "ann"})).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let ann = inbox("ann").await;
    assert_eq!(ann.len(), 1);
    assert_eq!(ann[0]["content"]["title"], "Order A-1 shipped");
    let steps = trace["chains"][0]["steps"].as_array().unwrap();
    let notice = &steps[1]["output"];
    assert_eq!(notice["notification_id"], ann[0]["id"], "upon: {notice:#}");
    let told = trace["children"][0]
        .as_str()
        .expect("the after step's event");
    let child = d.wait_for_trace("shop", told, TIMEOUT).await;
    assert_eq!(child["event"]["event_type"], "notice_left", "{child:#}");
    let data = &child["event"]["event_data"];
    assert_eq!(
        (&data["notification"], &data["receiver"]),
        (&ann[0]["id"], &json!("ann")),
        "after: {child:#}"
    );

    // Redirect: the delegate is told, not the customer.
    let trace = shipped(json!({"order": "A-2", "customer": "ann", "delegate": "bob"})).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(inbox("bob").await.len(), 1);
    assert_eq!(inbox("ann").await.len(), 1);

    // Stop, by the script: nobody is told, and no after step ran.
    let trace = shipped(json!({"order": "A-3", "customer": "cat", "muted": true})).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert!(inbox("cat").await.is_empty());
    let outcomes: Vec<&Value> = trace["chains"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["outcome"])
        .collect();
    assert_eq!(
        outcomes,
        [&json!("stopped"), &json!("skipped"), &json!("skipped")],
        "the chain ended at the script: {trace:#}"
    );
    assert_eq!(trace["children"], json!([]));

    // Stop, by the chain's `when`: the chain does not run.
    let trace = shipped(json!({"order": "A-4", "customer": "dan", "quiet": true})).await;
    assert!(inbox("dan").await.is_empty(), "{trace:#}");
    assert_eq!(trace["chains"], json!([]), "{trace:#}");
}

/// An in-app template (`channel = "inbox"`) fills a notify step's content,
/// rendered for each receiver: one person, or each contact of a broadcast;
/// values inserted into Markdown show as written; an e-mail template is
/// refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_renders_an_inbox_template_for_each_receiver() {
    let d = Dispatcher::embedded();
    for (slug, source) in [
        (
            "shipped",
            "channel = \"inbox\"\ncategory = \"orders\"\ncontent_type = \"url_action\"\n\
             title = \"Order {{ context.order }} shipped\"\n\
             text = \"On its way, {{ recipient.name | default('friend') }}.\"\n\
             url = \"https://shop.example/orders/{{ context.order }}\"\n\
             action_label = \"Track it\"\n\
             [context]\ntype = \"object\"\nrequired = [\"order\"]\n",
        ),
        (
            "hello",
            "channel = \"inbox\"\ncontent_type = \"markdown\"\n\
             text = \"**Hello** {{ recipient.name }}\"\n",
        ),
        (
            "mail",
            "channel = \"email\"\nsubject = \"s\"\ntext = \"t\"\n",
        ),
        (
            "plan",
            "channel = \"inbox\"\ntext = \"Your plan: {{ recipient.fields.plan }}\"\n",
        ),
    ] {
        let (status, answer) = d
            .request(
                reqwest::Method::PUT,
                &format!("/v1/accounts/acme/templates/{slug}"),
                Some(d.admin_token()),
                Some(source.into()),
            )
            .await;
        assert_eq!(status, 200, "{slug}: {answer}");
    }
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"

[[chains]]
name = "register"
event_type = "register"
[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}", name = "{{ event.event_data.name }}" }

[[chains]]
name = "shipped"
event_type = "shipped"
[[chains.steps]]
handler = "notify"
config = { to = "{{ event.event_data.to }}", template = "shipped", context = { order = "{{ event.event_data.order }}" } }

[[chains]]
name = "hello-all"
event_type = "hello_all"
[[chains.steps]]
handler = "notify"
config = { to = { all = true }, template = "hello" }

[[chains]]
name = "wrong"
event_type = "wrong"
[[chains.steps]]
handler = "notify"
config = { to = "ann", template = "mail" }

[[chains]]
name = "plans"
event_type = "plans"
[[chains.steps]]
handler = "notify"
config = { to = { all = true }, template = "plan" }
"#,
    )
    .await;
    let run = |event_type: &str, data: Value| {
        let d = &d;
        let event_type = event_type.to_string();
        async move {
            let id = d
                .post_event(&json!({"account_key": "acme", "conversation_key": "c",
                    "conversation_type": "web", "event_type": event_type, "event_data": data}))
                .await;
            d.wait_for_trace("acme", &id, TIMEOUT).await
        }
    };
    for (msisdn, name) in [("+27820000001", "Ann"), ("+27820000002", "**Bob**")] {
        let trace = run("register", json!({"msisdn": msisdn, "name": name})).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
    }
    let (_, contacts) = d.get("/v1/accounts/acme/contacts").await;
    let key_of = |name: &str| {
        contacts["contacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (ann, bob) = (key_of("Ann"), key_of("**Bob**"));

    // One receiver, a contact: its name; one that is not: the default.
    for (to, greeting) in [
        (ann.as_str(), "On its way, Ann."),
        ("guest-7", "On its way, friend."),
    ] {
        let trace = run("shipped", json!({"to": to, "order": "A-9"})).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
        let (_, inbox) = d.get(&format!("/v1/accounts/acme/inbox/{to}")).await;
        let n = &inbox["notifications"][0];
        assert_eq!(n["category"], "orders", "{n:#}");
        assert_eq!(
            n["content"],
            json!({"content_type": "url_action", "title": "Order A-9 shipped",
                   "body": greeting, "url": "https://shop.example/orders/A-9",
                   "action_label": "Track it"})
        );
    }
    // An event without an order: the step fails for good, naming it.
    let trace = run("shipped", json!({"to": ann})).await;
    let error = trace["chains"][0]["steps"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("config.context.order"), "{trace:#}");
    assert_eq!(trace["status"], "dead", "{trace:#}");

    // A broadcast: each contact's own name, Markdown in a name shown as
    // written.
    let trace = run("hello_all", json!({})).await;
    assert_eq!(
        trace["chains"][0]["steps"][0]["output"]["receivers"], 2,
        "{trace:#}"
    );
    for (key, shown) in [(&ann, "Ann"), (&bob, "**Bob**")] {
        let (_, inbox) = d.get(&format!("/v1/accounts/acme/inbox/{key}")).await;
        let html = inbox["notifications"][0]["content"]["html"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(html.contains("<strong>Hello</strong>"), "{html}");
        assert!(html.contains(shown), "{shown} in {html}");
    }

    // A broadcast whose template needs what the contacts lack: each is
    // passed over, named, and the step says so.
    let trace = run("plans", json!({})).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let output = &trace["chains"][0]["steps"][0]["output"];
    assert_eq!(
        (
            &output["receivers"],
            &output["left_now"],
            &output["skipped"]
        ),
        (&json!(2), &json!(0), &json!(2)),
        "{output:#}"
    );
    let reasons = output["skipped_reasons"].to_string();
    assert!(
        reasons.contains(&ann) && reasons.contains("plan"),
        "{reasons}"
    );

    // An e-mail template: refused for good, saying why.
    let trace = run("wrong", json!({})).await;
    let error = trace["chains"][0]["steps"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("\"mail\" is an email template"), "{trace:#}");
}
