//! The web console: sessions, isolation and CSRF over plain HTTP, and what a
//! person sees in a real browser (Debian's chromium, driven headless through
//! chromedriver over WebDriver). Screenshots of each page are saved under
//! `target/console-screenshots/`.

use std::time::Duration;

use fantoccini::Locator;
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{self, Dispatcher, event, wait_until};

/// An account token for `account`, made with the CLI.
async fn account_token(d: &Dispatcher, account: &str) -> String {
    let created = d.cli(&["tokens", "create", account, "--json"]).await.json();
    created["token"]
        .as_str()
        .expect("a token in the answer")
        .to_string()
}

/// The CSRF token of the first form of a console page.
fn csrf_in(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in a form of the page")
        .to_string()
}

/// The chain a console page shows, as its forms post it back (`seen`).
fn seen_in(html: &str) -> String {
    html.split("name=\"seen\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the chain as seen in a form of the page")
        .to_string()
}

/// A client that follows no redirect, so that each answer can be checked.
pub(crate) fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client")
}

/// The value `name` is set to by the response's `Set-Cookie` headers, with
/// the whole header.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<(String, String)> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            let value = v[name.len() + 1..].split(';').next().unwrap_or("");
            (value.to_string(), v.to_string())
        })
}

fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Signs in over plain HTTP as a browser would; returns the session cookie.
pub(crate) async fn sign_in(http: &reqwest::Client, base: &str, token: &str) -> String {
    let page = http
        .get(format!("{base}/console/sign-in"))
        .send()
        .await
        .expect("the sign-in page");
    let (csrf, _) = set_cookie(&page, "sb_sign_in").expect("a sign-in cookie");
    let answer = http
        .post(format!("{base}/console/sign-in"))
        .header(reqwest::header::COOKIE, format!("sb_sign_in={csrf}"))
        .form(&[("token", token), ("csrf", csrf.as_str())])
        .send()
        .await
        .expect("signing in");
    assert_eq!(answer.status(), 303, "signing in");
    set_cookie(&answer, "sb_session")
        .expect("a session cookie")
        .0
}

/// Without a session every page sends the browser to sign in; a session
/// reaches only what its token reaches (another account is 404, as in the
/// API); forms without their CSRF token change nothing; every page carries
/// a Content-Security-Policy without inline scripts.
#[tokio::test]
async fn console_sessions_are_isolated_and_forms_need_their_token() {
    let d = Dispatcher::embedded();
    for account in ["acme", "other"] {
        d.apply_chains(
            &format!("{account}.toml"),
            &format!(
                "account_key = \"{account}\"\n[[chains]]\nname = \"fail\"\nevent_type = \"fail\"\nsteps = [{{ handler = \"script:missing\" }}]\n"
            )
            .replace("script:missing", "emit")
            .replace("steps = [{ handler = \"emit\" }]", "steps = [{ handler = \"emit\", config = { event_type = \"{{ event.event_data.next }}\" } }]"),
        )
        .await;
    }
    // A dead event of `other`: its emit names an invalid event type.
    let e = event("other", "test", "fail", "k", json!({"next": "not valid!"}));
    let other_id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("other", &other_id, util::TIMEOUT).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let other_letter = d.dead_letters("other").await[0]["id"]
        .as_str()
        .expect("a letter id")
        .to_string();

    let http = plain_client();
    let base = d.url();
    for path in [
        "/console".to_string(),
        "/console/accounts/acme".to_string(),
        format!("/console/accounts/other/events/{other_id}"),
    ] {
        let answer = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 303, "{path}");
        assert_eq!(location(&answer), "/console/sign-in", "{path}");
    }
    assert_eq!(
        location(&http.get(format!("{base}/")).send().await.unwrap()),
        "/console"
    );

    // The sign-in page: its CSRF cookie is HttpOnly and SameSite=Strict,
    // and the policy allows no inline script.
    let page = http
        .get(format!("{base}/console/sign-in"))
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let (csrf, cookie) = set_cookie(&page, "sb_sign_in").expect("a sign-in cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    // Without the form's token, or with a wrong API token: no session.
    let token = account_token(&d, "acme").await;
    let answer = http
        .post(format!("{base}/console/sign-in"))
        .header(reqwest::header::COOKIE, format!("sb_sign_in={csrf}"))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    assert!(set_cookie(&answer, "sb_session").is_none());
    let answer = http
        .post(format!("{base}/console/sign-in"))
        .header(reqwest::header::COOKIE, format!("sb_sign_in={csrf}"))
        .form(&[("token", "sbt_wrong"), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    assert!(
        answer
            .text()
            .await
            .unwrap()
            .contains("That token is not the admin token or a live account token.")
    );

    // acme's session: its account, and nothing of other's.
    let session = sign_in(&http, base, &token).await;
    let get = |path: String| {
        let (http, session) = (&http, &session);
        async move {
            http.get(format!("{base}{path}"))
                .header(reqwest::header::COOKIE, format!("sb_session={session}"))
                .send()
                .await
                .unwrap()
        }
    };
    let home = get("/console".into()).await;
    assert_eq!(location(&home), "/console/accounts/acme");
    let page = get("/console/accounts/acme".into()).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("account acme"), "{html}");
    let csrf = csrf_in(&html);
    for path in [
        "/console/accounts/other".to_string(),
        format!("/console/accounts/other/events/{other_id}"),
        "/console/accounts/other/chains/new?conversation_type=test&event_type=fail&handler=log"
            .to_string(),
        "/console/accounts/other/chains/versions".to_string(),
        "/console/accounts/other/chain/fail".to_string(),
        "/console/accounts/other/chain/fail/steps/0".to_string(),
        "/console/accounts/other/tail".to_string(),
        "/console/accounts/other/tail/stream".to_string(),
        "/console/health".to_string(),
    ] {
        assert_eq!(get(path.clone()).await.status(), 404, "{path}");
    }
    let post = |path: String, form: Vec<(&'static str, String)>| {
        let (http, session) = (&http, &session);
        async move {
            http.post(format!("{base}{path}"))
                .header(reqwest::header::COOKIE, format!("sb_session={session}"))
                .form(&form)
                .send()
                .await
                .unwrap()
        }
    };
    let replay_other = format!("/console/accounts/other/dead-letters/{other_letter}/replay");
    assert_eq!(
        post(replay_other.clone(), vec![("csrf", csrf.clone())])
            .await
            .status(),
        404
    );
    assert_eq!(d.dead_letters("other").await[0]["status"], "dead");
    let new_chain = |csrf: Option<&str>| {
        let mut form = vec![
            ("name", "sneaky".to_string()),
            ("conversation_type", "test".to_string()),
            ("event_type", "fail".to_string()),
            ("handler", "log".to_string()),
            ("action", "save".to_string()),
        ];
        if let Some(csrf) = csrf {
            form.push(("csrf", csrf.to_string()));
        }
        form
    };
    assert_eq!(
        post(
            "/console/accounts/other/chains/new".into(),
            new_chain(Some(&csrf))
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        post(
            "/console/accounts/other/dead-letters/range".into(),
            vec![
                ("csrf", csrf.clone()),
                ("from", "2020-01-01T00:00:00Z".into()),
                ("to", "2099-01-01T00:00:00Z".into()),
                ("action", "discard".into()),
            ]
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        post(
            format!("/console/accounts/other/events/{other_id}/rerun"),
            vec![("csrf", csrf.clone())]
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        post(
            "/console/accounts/other/chain/fail".into(),
            vec![("csrf", csrf.clone()), ("action", "remove_chain".into())]
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        post(
            "/console/accounts/other/chains/versions/1/restore".into(),
            vec![("csrf", csrf.clone())]
        )
        .await
        .status(),
        404
    );
    // acme's own new chain, without the form's token: refused, not saved.
    assert_eq!(
        post("/console/accounts/acme/chains/new".into(), new_chain(None))
            .await
            .status(),
        403
    );
    for account in ["acme", "other"] {
        let (_, history) = d
            .get(&format!("/v1/accounts/{account}/chain-versions"))
            .await;
        assert_eq!(
            history["versions"].as_array().map(Vec::len),
            Some(1),
            "{history}"
        );
    }
    // Signing out without the form's token does not; with it, it does.
    assert_eq!(post("/console/sign-out".into(), vec![]).await.status(), 403);
    assert_eq!(get("/console/accounts/acme".into()).await.status(), 200);
    let out = post("/console/sign-out".into(), vec![("csrf", csrf)]).await;
    assert_eq!(location(&out), "/console/sign-in");
    assert_eq!(get("/console/accounts/acme".into()).await.status(), 303);

    // The admin reaches every account.
    let admin = sign_in(&http, base, d.admin_token()).await;
    let page = http
        .get(format!("{base}/console"))
        .header(reqwest::header::COOKIE, format!("sb_session={admin}"))
        .send()
        .await
        .unwrap();
    let html = page.text().await.unwrap();
    assert!(
        html.contains("href=\"/console/accounts/acme\"")
            && html.contains("href=\"/console/accounts/other\""),
        "{html}"
    );
    // And the dispatcher's health: other's dead event, counted.
    let health = http
        .get(format!("{base}/console/health"))
        .header(reqwest::header::COOKIE, format!("sb_session={admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let html = health.text().await.unwrap();
    for part in [
        "<span id=\"dead-total\">1</span>",
        "<tr id=\"outcome-dead_lettered\"><td>dead_lettered</td><td>1</td></tr>",
        "<tr id=\"outcome-received\"><td>received</td><td>1</td></tr>",
        "<td id=\"lag\">0</td>",
        "href=\"/console/accounts/other/dead-letters\"",
    ] {
        assert!(html.contains(part), "no {part} in {html}");
    }
}

/// In a real browser: sign in with an account token, find a dead event
/// from the account page, see each step of its run, replay it from the
/// failed step once the receiver recovers (delivered once); an event whose
/// data holds markup renders as text and runs nothing; the run view fits a
/// 390-pixel-wide window.
#[tokio::test]
async fn a_browser_signs_in_sees_a_run_and_replays_it() {
    let receiver = HttpReceiver::start(Duration::from_secs(3));
    let d = Dispatcher::embedded();
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    d.apply_chains(
        "acme.toml",
        &format!(
            r#"account_key = "acme"

[[chains]]
name = "pay"
event_type = "paid"
[[chains.steps]]
handler = "log"
config = {{ message = "paying {{{{ event.event_data.name }}}}" }}
[[chains.steps]]
handler = "payment_webhook"
config = {{ url = "{}/hook/500,200", secret = "gateway" }}
retry = {{ max_attempts = 1 }}
"#,
            receiver.url()
        ),
    )
    .await;
    let hostile = json!({
        "name": "<script>alert(1)</script>",
        "quote": "\"><img src=x onerror=alert(2)>",
        "link": "javascript:alert(3)",
    });
    let e = event("acme", "shop", "paid", "order-1", hostile);
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, util::TIMEOUT).await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let token = account_token(&d, "acme").await;

    let browser = Browser::start().await;
    let c = &browser.client;
    let base = d.url();
    c.goto(&format!("{base}/console/accounts/acme"))
        .await
        .unwrap();
    assert_eq!(
        c.current_url().await.unwrap().path(),
        "/console/sign-in",
        "no session: sent to sign in"
    );
    browser.screenshot("sign-in").await;
    browser.sign_in(&token).await;
    browser.on_page("/console/accounts/acme").await;
    assert!(
        browser
            .text("#chain-table")
            .await
            .contains("log → payment_webhook")
    );
    browser.screenshot("account").await;

    // The dead event, from the dead letters.
    browser.click(Locator::Css("#dead-letters a")).await;
    browser
        .on_page(&format!("/console/accounts/acme/events/{id}"))
        .await;
    assert_eq!(browser.text("#status").await, "dead");
    let data = browser.text("#event-data").await;
    assert!(
        data.contains("<script>alert(1)</script>")
            && data.contains("\"><img src=x onerror=alert(2)>")
            && data.contains("javascript:alert(3)"),
        "{data}"
    );
    let steps = browser.text(".steps").await;
    assert!(
        steps.contains("paying <script>alert(1)</script>") && steps.contains("answered HTTP 500"),
        "{steps}"
    );
    // Rendered as text: no dialog opened, no element injected.
    assert!(c.get_alert_text().await.is_err(), "a script ran");
    assert!(c.find_all(Locator::Css("img")).await.unwrap().is_empty());
    assert!(
        c.find_all(Locator::Css("main script"))
            .await
            .unwrap()
            .is_empty()
    );
    browser.screenshot("run-dead").await;

    // Narrow: nothing of the run view is cut off.
    c.set_window_size(390, 844).await.unwrap();
    let (scroll_width, inner_width): (Value, Value) = (
        c.execute("return document.documentElement.scrollWidth", vec![])
            .await
            .unwrap(),
        c.execute("return window.innerWidth", vec![]).await.unwrap(),
    );
    assert!(
        scroll_width.as_u64() <= inner_width.as_u64(),
        "the run view is {scroll_width} pixels wide in a {inner_width}-pixel window"
    );
    browser.screenshot("run-narrow").await;
    c.set_window_size(1280, 900).await.unwrap();

    // The receiver answers 200 now: replay from the failed step.
    browser.click(Locator::Css("button.replay")).await;
    // The replay delivered before the page is reloaded: a reload while the
    // form's post is under way would cancel it.
    wait_until("the replayed delivery", util::TIMEOUT, || async {
        (receiver.requests_to("/hook/500,200").await.len() >= 2).then_some(())
    })
    .await;
    let status = wait_until("the replayed run", util::TIMEOUT, || async {
        c.refresh().await.ok()?;
        let status = browser.text("#status").await;
        (status == "done").then_some(status)
    })
    .await;
    assert_eq!(status, "done");
    browser.screenshot("run-replayed").await;
    let hooks = receiver.requests_to("/hook/500,200").await;
    assert_eq!(
        hooks.len(),
        2,
        "one failed attempt, one delivery: {hooks:#?}"
    );

    // Signing out ends the session.
    browser.click(Locator::Css("header form button")).await;
    browser.on_page("/console/sign-in").await;
    c.goto(&format!("{base}/console/accounts/acme"))
        .await
        .unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/console/sign-in");
    c.clone().close().await.unwrap();
}

/// The dead-letters page groups letters that failed the same way (numbers
/// aside), and a group is discarded or replayed in one action, only with
/// the form's token.
#[tokio::test]
async fn dead_letters_are_grouped_and_a_group_is_handled_at_once() {
    let d = Dispatcher::embedded();
    let failing = |name: &str, event_type: &str| {
        format!(
            "[[chains]]\nname = \"{name}\"\nevent_type = \"{event_type}\"\nsteps = [{{ handler = \"emit\", config = {{ event_type = \"{{{{ event.event_data.next }}}}\" }} }}]\n"
        )
    };
    d.apply_chains(
        "acme.toml",
        &format!(
            "account_key = \"acme\"\n{}{}",
            failing("fail", "fail"),
            failing("other", "other")
        ),
    )
    .await;
    let mut ids = Vec::new();
    for (event_type, next) in [
        ("fail", "bad 1"),
        ("fail", "bad 22"),
        ("fail", "bad 333"),
        ("other", "worse!"),
    ] {
        let e = event("acme", "test", event_type, "k", json!({ "next": next }));
        ids.push(d.post_event(&serde_json::to_value(&e).unwrap()).await);
    }
    for id in &ids {
        let trace = d.wait_for_trace("acme", id, util::TIMEOUT).await;
        assert_eq!(trace["status"], "dead", "{trace:#}");
    }

    let http = plain_client();
    let base = d.url();
    let session = sign_in(&http, base, &account_token(&d, "acme").await).await;
    let page = http
        .get(format!("{base}/console/accounts/acme/dead-letters"))
        .header(reqwest::header::COOKIE, format!("sb_session={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(">Discard 3</button>") && html.contains(">Replay 1</button>"),
        "{html}"
    );
    // The first group's form, as the page rendered it.
    let form = html
        .split("<form method=\"post\" action=\"/console/accounts/acme/dead-letters/groups\"")
        .nth(2)
        .expect("the first group's discard form");
    let field = |name: &str| {
        let start = form
            .find(&format!("name=\"{name}\" value=\""))
            .unwrap_or_else(|| panic!("no {name} in {form}"))
            + name.len()
            + 15;
        let raw = &form[start..start + form[start..].find('"').unwrap()];
        raw.replace("&quot;", "\"")
            .replace("&#x27;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&#x2f;", "/")
            .replace("&amp;", "&")
    };
    let fields: Vec<(&str, String)> = ["csrf", "chain", "step", "kind", "last", "action"]
        .into_iter()
        .map(|n| (n, field(n)))
        .collect();
    assert_eq!(fields[5].1, "discard");
    let post = |fields: Vec<(&'static str, String)>| {
        let (http, session) = (&http, &session);
        async move {
            http.post(format!("{base}/console/accounts/acme/dead-letters/groups"))
                .header(reqwest::header::COOKIE, format!("sb_session={session}"))
                .form(&fields)
                .send()
                .await
                .unwrap()
        }
    };
    let without_token: Vec<_> = fields.iter().skip(1).cloned().collect();
    assert_eq!(post(without_token).await.status(), 403);
    assert_eq!(d.dead_letters("acme").await.len(), 4);
    let done = post(fields).await;
    assert_eq!(done.status(), 303);
    let left = d.dead_letters("acme").await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["chain"], "other");

    // By time: a range's preview counts what it holds; its discard takes
    // them, and a range before them holds none.
    let get = |query: String| {
        let (http, session) = (&http, &session);
        async move {
            http.get(format!("{base}/console/accounts/acme/dead-letters?{query}"))
                .header(reqwest::header::COOKIE, format!("sb_session={session}"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let html = get("from=2020-01-01T00:00&to=2020-01-02T00:00".into()).await;
    assert!(
        html.contains("<span class=\"count\">0</span> dead letters filed"),
        "{html}"
    );
    let html = get("from=2020-01-01T00:00&to=2099-01-01T00:00".into()).await;
    assert!(
        html.contains("<span class=\"count\">1</span> dead letters filed"),
        "{html}"
    );
    let html = get("from=yesterday&to=2099-01-01T00:00".into()).await;
    assert!(html.contains("id=\"range-error\""), "{html}");
    let html = get("from=2020-01-01T00:00&to=2099-01-01T00:00".into()).await;
    let form = html
        .split("<form method=\"post\" action=\"/console/accounts/acme/dead-letters/range\"")
        .nth(2)
        .expect("the range's discard form");
    let value = |name: &str| {
        let at = form.find(&format!("name=\"{name}\" value=\"")).unwrap() + name.len() + 15;
        form[at..at + form[at..].find('"').unwrap()].to_string()
    };
    let done = http
        .post(format!("{base}/console/accounts/acme/dead-letters/range"))
        .header(reqwest::header::COOKIE, format!("sb_session={session}"))
        .form(&[
            ("csrf", value("csrf")),
            ("from", value("from")),
            ("to", value("to")),
            ("action", value("action")),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 303);
    assert!(d.dead_letters("acme").await.is_empty());
}

/// The contacts page lists what chains made and finds one by msisdn,
/// e-mail or key; the messages page lists what they sent with each
/// status change; values from events are shown as text.
#[tokio::test]
async fn contacts_and_messages_pages_show_what_chains_made_and_sent() {
    let smtp = crate::peers::SmtpSink::start();
    let d = Dispatcher::with_config(
        None,
        &format!(
            "[providers.email.sink]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"Switchboard <noreply@example.org>\"\n",
            smtp.port()
        ),
    );
    d.apply_chains(
        "acme.toml",
        r#"account_key = "acme"
[[chains]]
name = "welcome"
event_type = "joined"
[[chains.steps]]
handler = "create_contact"
config = { msisdn = "{{ event.event_data.msisdn }}", email = "{{ event.event_data.email }}", name = "{{ event.event_data.name }}" }
[[chains.steps]]
handler = "send_email"
config = { to = "{{ steps.create_contact.email }}", subject = "Welcome {{ event.event_data.name }}", text = "Hello {{ event.event_data.name }}" }
"#,
    )
    .await;
    let e = event(
        "acme",
        "signup",
        "joined",
        "k",
        json!({"msisdn": "+27 82 000 0001", "email": "thandi@example.org", "name": "<b>Thandi</b>"}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    let trace = d.wait_for_trace("acme", &id, util::TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");

    let http = plain_client();
    let base = d.url();
    let session = sign_in(&http, base, &account_token(&d, "acme").await).await;
    let page = |path: &'static str| {
        let (http, session) = (&http, &session);
        async move {
            let answer = http
                .get(format!("{base}{path}"))
                .header(reqwest::header::COOKIE, format!("sb_session={session}"))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200, "{path}");
            answer.text().await.unwrap()
        }
    };
    let all = page("/console/accounts/acme/contacts").await;
    assert!(
        all.contains("&lt;b&gt;Thandi&lt;&#x2f;b&gt;") && !all.contains("<b>Thandi"),
        "{all}"
    );
    let found = page("/console/accounts/acme/contacts?q=%2B27%2082%20000%200001").await;
    assert!(found.contains("thandi@example.org"), "{found}");
    let none = page("/console/accounts/acme/contacts?q=nobody%40example.org").await;
    assert!(none.contains("id=\"none\""), "{none}");
    let messages = page("/console/accounts/acme/messages").await;
    assert!(
        messages.contains("email: thandi@example.org")
            && messages.contains("Welcome &lt;b&gt;Thandi&lt;&#x2f;b&gt;")
            && messages.contains("→ sent"),
        "{messages}"
    );

    // A provider's report that names no message of the account.
    let created = d
        .cli(&["inbound", "create", "acme", "sendgrid", "--json"])
        .await
        .json();
    let url = created["url"].as_str().expect("a URL");
    let answer = reqwest::Client::new()
        .post(url)
        .json(&json!([{
            "event": "delivered",
            "email": "someone@example.org",
            "timestamp": 1_700_000_000,
            "sg_event_id": "<script>alert(1)</script>",
        }]))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let unmatched = page("/console/accounts/acme/messages/unmatched").await;
    assert!(
        unmatched.contains("sendgrid")
            && unmatched.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;")
            && !unmatched.contains("<script>alert"),
        "{unmatched}"
    );
}

/// In a real browser: a script with a syntax error is not stored and its
/// error is shown at its line; the fixed script is stored, and its test
/// against a sample is green.
#[tokio::test]
async fn a_browser_edits_a_script_and_sees_its_error_at_its_line() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        "account_key = \"acme\"\n[[chains]]\nname = \"x\"\nevent_type = \"x\"\nsteps = [{ handler = \"log\" }]\n",
    )
    .await;
    let token = account_token(&d, "acme").await;
    let browser = Browser::start().await;
    let c = &browser.client;
    let base = d.url();
    c.goto(&format!("{base}/console/sign-in")).await.unwrap();
    browser.sign_in(&token).await;
    // Signed in (the session cookie set) before going on.
    browser.on_page("/console/accounts/acme").await;
    c.goto(&format!("{base}/console/accounts/acme/scripts"))
        .await
        .unwrap();
    browser
        .type_into(Locator::Css("#new-script input"), "award")
        .await;
    browser.click(Locator::Css("#new-script button")).await;
    browser
        .on_page("/console/accounts/acme/scripts/award")
        .await;
    browser
        .type_into(
            Locator::Id("source"),
            "fn handle(event, steps, config) {\n  let points = event.event_data.score * 10\n  #{ points: points }\n}\n",
        )
        .await;
    browser.click(Locator::Id("save")).await;
    let error = browser.text("#error").await;
    assert!(
        error.contains("line 2, column 43: missing `;` at the end of this line"),
        "{error}"
    );
    assert_eq!(
        browser.text(".error-line").await,
        "  let points = event.event_data.score * 10"
    );
    let listed = d.cli(&["scripts", "list", "acme", "--json"]).await.json();
    assert_eq!(listed["scripts"], json!([]), "nothing stored");
    browser.screenshot("script-error").await;

    // Fixed, stored, and tested against the sample.
    browser
        .type_into(
            Locator::Id("source"),
            "fn handle(event, steps, config) {\n  let points = event.event_data.score * 10;\n  #{ points: points }\n}\n",
        )
        .await;
    browser.click(Locator::Id("save")).await;
    assert_eq!(browser.text("#saved").await, "Stored as version 1.");
    browser.click(Locator::Id("test")).await;
    assert_eq!(browser.text("#test-outcome").await, "ok");
    assert!(
        browser
            .text("#test-result")
            .await
            .contains("\"points\": 40"),
        "{}",
        browser.text("#test-result").await
    );
    browser.screenshot("script-tested").await;
    c.clone().close().await.unwrap();
}

/// In a real browser, the seed's flow for a new handler: the kind of an
/// event emitted first is offered as the source; `send_sms` is picked from
/// the catalog; its generated form refuses a bad option with the message
/// `chains apply` gives, next to the field, and saves nothing; the preview
/// renders the step against the latest real event of that kind as the form
/// is edited; once saved, the chain handles the next event emitted with the
/// CLI, which appears in the live tail without a reload, and its run view
/// shows the step's output.
#[tokio::test]
async fn a_browser_creates_a_chain_through_the_seeds_flow() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let d = Dispatcher::with_config(
        None,
        &format!(
            "[providers.sms.gateway]\ntype = \"http\"\nurl = \"{}/sms\"\nfrom = \"Switchboard\"\n",
            receiver.url()
        ),
    );
    d.apply_chains(
        "acme.toml",
        "account_key = \"acme\"\n[[chains]]\nname = \"noted\"\nevent_type = \"joined\"\n\
         [[chains.steps]]\nhandler = \"log\"\n",
    )
    .await;
    let first = event(
        "acme",
        "signup",
        "joined",
        "k1",
        json!({"msisdn": "+27820000001", "name": "Thandi"}),
    );
    let id = d.post_event(&serde_json::to_value(&first).unwrap()).await;
    d.wait_for_trace("acme", &id, util::TIMEOUT).await;
    // Kinds are counted off the hot path, about once a second.
    let kinds = wait_until("the event's kind counted", util::TIMEOUT, || async {
        let (_, answer) = d.get("/v1/accounts/acme/event-kinds").await;
        (answer["kinds"][0]["event_type"] == "joined").then_some(answer)
    })
    .await;
    assert_eq!(kinds["kinds"][0]["conversation_type"], "signup", "{kinds}");
    assert_eq!(kinds["kinds"][0]["count"], 1, "{kinds}");
    assert_eq!(kinds["kinds"][0]["last_event_id"], id.as_str(), "{kinds}");

    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&format!("{}/console", d.url())).await.unwrap();
    browser.sign_in(&account_token(&d, "acme").await).await;
    browser.on_page("/console/accounts/acme").await;
    browser.click(Locator::Id("new-chain")).await;
    browser.on_page("/console/accounts/acme/chains/new").await;
    assert!(browser.text("#kinds").await.contains("signup / joined"));
    browser.screenshot("new-chain-source").await;
    browser.click(Locator::Css("#kinds a.kind")).await;
    let value = |id: &'static str| async move {
        c.find(Locator::Id(id))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .unwrap_or_default()
    };
    wait_until("the kind picked", util::TIMEOUT, || async {
        (value("event_type").await == "joined").then_some(())
    })
    .await;
    assert_eq!(value("conversation_type").await, "signup");
    browser
        .click(Locator::Css("#handler option[value='send_sms']"))
        .await;
    browser.click(Locator::Id("next")).await;
    // The sample is the latest real event's data.
    assert!(browser.text("#sample").await.contains("Thandi"));
    browser.type_into(Locator::Id("name"), "welcome-sms").await;
    browser.type_into(Locator::Id("opt-to"), "call me").await;
    browser
        .type_into(
            Locator::Id("opt-body"),
            "Hi {{ event.event_data.name }}, welcome!",
        )
        .await;
    browser.click(Locator::Id("save")).await;
    let shown = browser.text(".field-error").await;
    browser.screenshot("new-chain-refused").await;
    // The same message `chains apply` gives, and nothing saved.
    let file = json!({"account_key": "acme", "chains": [{
        "name": "welcome-sms", "conversation_type": "signup", "event_type": "joined",
        "steps": [{"handler": "send_sms", "config": {
            "to": "call me", "body": "Hi {{ event.event_data.name }}, welcome!"}}]}]});
    let (status, refused) = d
        .request(
            reqwest::Method::PUT,
            "/v1/accounts/acme/chains?merge=true",
            Some(d.admin_token()),
            Some(file.to_string()),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(
        shown, refused["error"]["details"][0]["message"],
        "{refused}"
    );
    let (_, chains) = d.get("/v1/accounts/acme/chains").await;
    assert!(!chains.to_string().contains("welcome-sms"), "{chains}");

    // The preview follows the form as it is edited.
    browser
        .type_into(Locator::Id("opt-to"), "{{ event.event_data.msisdn }}")
        .await;
    let previewed = wait_until("the live preview", util::TIMEOUT, || async {
        let text = c
            .find(Locator::Id("preview-config"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("+27820000001").then_some(text)
    })
    .await;
    assert!(previewed.contains("Hi Thandi, welcome!"), "{previewed}");
    assert_eq!(browser.text("#preview-outcome").await, "ok");
    browser.screenshot("new-chain-preview").await;
    browser.fits_narrow("new-chain").await;
    browser.click(Locator::Id("save")).await;
    browser.on_page("/console/accounts/acme").await;
    let table = browser.text("#chain-table").await;
    assert!(
        table.contains("welcome-sms") && table.contains("send_sms"),
        "{table}"
    );

    // The version history shows what the save changed.
    browser.click(Locator::Id("versions-link")).await;
    browser
        .on_page("/console/accounts/acme/chains/versions")
        .await;
    let diff = browser.text("#diff").await;
    assert!(
        diff.contains("+ name = \"welcome-sms\"") && diff.contains("+ handler = \"send_sms\""),
        "{diff}"
    );
    browser.screenshot("chain-versions").await;
    browser.fits_narrow("chain-versions").await;
    c.goto(&format!(
        "{}/console/accounts/acme/chain/welcome-sms",
        d.url()
    ))
    .await
    .unwrap();
    assert!(browser.text("#steps").await.contains("send_sms"));
    browser.screenshot("chain").await;
    browser.fits_narrow("chain").await;
    c.goto(&format!("{}/console/accounts/acme", d.url()))
        .await
        .unwrap();

    // The next event runs it, and the live tail shows it without a reload.
    browser.click(Locator::Id("tail-link")).await;
    browser.on_page("/console/accounts/acme/tail").await;
    wait_until("the tail connected", util::TIMEOUT, || async {
        browser
            .text("#tail-state")
            .await
            .starts_with("Watching")
            .then_some(())
    })
    .await;
    let emitted = d
        .cli(&[
            "emit",
            "acme",
            "signup",
            "joined",
            "--conversation",
            "k2",
            "--data",
            r#"{"msisdn": "+27820000002", "name": "Lindiwe"}"#,
            "--json",
        ])
        .await
        .json();
    let id = emitted["id"].as_str().unwrap().to_string();
    let trace = d.wait_for_trace("acme", &id, util::TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let sent = receiver.requests_to("/sms").await;
    assert_eq!(sent.len(), 1, "{sent:#?}");
    let body: Value = serde_json::from_str(sent[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["content"], "Hi Lindiwe, welcome!");
    let row = wait_until("the event in the live tail", util::TIMEOUT, || async {
        let text = c
            .find(Locator::Css("#tail tbody tr"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("welcome-sms: done").then_some(text)
    })
    .await;
    assert!(
        row.contains("signup / joined") && row.contains("k2"),
        "{row}"
    );
    browser.screenshot("live-events").await;
    browser.fits_narrow("live-events").await;
    browser.click(Locator::Css("#tail tbody tr a")).await;
    browser
        .on_page(&format!("/console/accounts/acme/events/{id}"))
        .await;
    let run = browser.text("main").await;
    assert!(
        run.contains("welcome-sms") && run.contains("+27820000002"),
        "{run}"
    );
    browser.screenshot("new-chain-run").await;
    // The whole event, again: a new event, a second SMS.
    browser.click(Locator::Id("rerun-button")).await;
    let again = browser.text("#rerun").await;
    assert!(again.starts_with("Run again as a new event: "), "{again}");
    browser.click(Locator::Css("#rerun a")).await;
    let again_id = again
        .trim_start_matches("Run again as a new event: ")
        .trim_end_matches('.')
        .to_string();
    let trace = d.wait_for_trace("acme", &again_id, util::TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    assert_eq!(receiver.requests_to("/sms").await.len(), 2);
}

/// The version history shows what each change did as a diff of chain files,
/// and an old version is restored as a new one.
#[tokio::test]
async fn chain_versions_show_their_changes_and_restore() {
    let d = Dispatcher::embedded();
    let file = |message: &str| {
        format!(
            "account_key = \"acme\"\n[[chains]]\nname = \"greet\"\nevent_type = \"joined\"\n\
             [[chains.steps]]\nhandler = \"log\"\nconfig = {{ message = \"{message}\" }}\n"
        )
    };
    d.apply_chains("v1.toml", &file("hello <b>you</b>")).await;
    d.apply_chains("v2.toml", &file("welcome")).await;
    let http = plain_client();
    let base = d.url();
    let session = sign_in(&http, base, &account_token(&d, "acme").await).await;
    let cookie = format!("sb_session={session}");
    let page = http
        .get(format!("{base}/console/accounts/acme/chains/versions"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("Version 1 → version 2"), "{html}");
    // Values from the chains are escaped in the diff.
    assert!(
        html.contains(
            "<span class=\"diff-remove\">- message = &quot;hello &lt;b&gt;you&lt;&#x2f;b&gt;&quot;</span>"
        ),
        "{html}"
    );
    assert!(
        html.contains("<span class=\"diff-add\">+ message = &quot;welcome&quot;</span>"),
        "{html}"
    );
    let csrf = csrf_in(&html);
    let restored = http
        .post(format!(
            "{base}/console/accounts/acme/chains/versions/1/restore"
        ))
        .header(reqwest::header::COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(restored.status(), 303);
    assert_eq!(
        location(&restored),
        "/console/accounts/acme/chains/versions?restored=1&from=1&to=3"
    );
    let (_, v3) = d.get("/v1/accounts/acme/chain-versions/3").await;
    assert_eq!(v3["change"], "restore 1", "{v3}");
    assert_eq!(
        v3["chains"][0]["steps"][0]["config"]["message"], "hello <b>you</b>",
        "{v3}"
    );
    let page = http
        .get(format!(
            "{base}/console/accounts/acme/chains/versions?restored=1&from=1&to=3"
        ))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Version 1 restored as version 3."), "{page}");
    assert!(page.contains("id=\"diff\">No difference."), "{page}");
    // A version that does not exist: refused, nothing made.
    let missing = http
        .post(format!(
            "{base}/console/accounts/acme/chains/versions/9/restore"
        ))
        .header(reqwest::header::COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let (_, history) = d.get("/v1/accounts/acme/chain-versions").await;
    assert_eq!(
        history["versions"].as_array().map(Vec::len),
        Some(3),
        "{history}"
    );
}

/// A chain's page changes it one step at a time, each change a new version
/// checked as `chains apply` checks a file: steps moved, edited (in the form
/// generated from the handler's options), added and removed, its condition
/// changed, and the chain removed; a change that does not pass is refused
/// with apply's message and saves nothing.
#[tokio::test]
async fn a_chains_steps_are_edited_moved_added_and_removed() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        "account_key = \"acme\"\n[[chains]]\nname = \"greet\"\nevent_type = \"joined\"\n\
         [[chains.steps]]\nhandler = \"log\"\nname = \"one\"\nconfig = { message = \"one\" }\n\
         [[chains.steps]]\nhandler = \"log\"\nname = \"two\"\nconfig = { message = \"two\" }\n",
    )
    .await;
    let http = plain_client();
    let base = d.url();
    let session = sign_in(&http, base, &account_token(&d, "acme").await).await;
    let cookie = format!("sb_session={session}");
    let page = http
        .get(format!("{base}/console/accounts/acme/chain/greet"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let csrf = csrf_in(&html);
    // Each change posted from its page as just shown (what a browser posts
    // after the redirect that follows the last change).
    let post = |path: &'static str, form: Vec<(&'static str, &'static str)>| {
        let (http, cookie, csrf) = (&http, &cookie, &csrf);
        async move {
            let shown = http
                .get(format!("{base}/console/accounts/acme/{path}"))
                .header(reqwest::header::COOKIE, cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let seen = seen_in(&shown);
            let mut form: Vec<(&str, &str)> = form;
            form.push(("csrf", csrf));
            form.push(("seen", &seen));
            let answer = http
                .post(format!("{base}/console/accounts/acme/{path}"))
                .header(reqwest::header::COOKIE, cookie)
                .form(&form)
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.text().await.unwrap())
        }
    };
    let steps = || async {
        let (_, chain) = d.get("/v1/accounts/acme/chains/greet").await;
        chain["chain"]["steps"].clone()
    };
    let version = || async {
        let (_, history) = d.get("/v1/accounts/acme/chain-versions").await;
        history["versions"].as_array().map(Vec::len).unwrap()
    };

    assert_eq!(post("chain/greet", vec![("action", "down:0")]).await.0, 303);
    let now = steps().await;
    assert_eq!(
        (now[0]["name"].clone(), now[1]["name"].clone()),
        (json!("two"), json!("one")),
        "{now}"
    );

    // The step's form starts from its config, and saves what it says.
    let form = http
        .get(format!("{base}/console/accounts/acme/chain/greet/steps/1"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        form.contains(">one</textarea>") && form.contains("value=\"one\""),
        "{form}"
    );
    let (status, _) = post(
        "chain/greet/steps/1",
        vec![
            ("action", "save"),
            ("handler", "log"),
            ("step_name", "first"),
            ("opt.message", "edited {{ event.event_type }}"),
            ("opt.level", "warn"),
        ],
    )
    .await;
    assert_eq!(status, 303);
    let now = steps().await;
    assert_eq!(now[1]["name"], "first", "{now}");
    assert_eq!(
        now[1]["config"],
        json!({"message": "edited {{ event.event_type }}", "level": "warn"})
    );

    // Refused, with apply's message next to the field; nothing saved.
    let before = version().await;
    let (status, page) = post(
        "chain/greet/steps/0",
        vec![
            ("action", "save"),
            ("handler", "log"),
            ("opt.level", "loud"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<p class=\"error field-error\">&quot;loud&quot; is not one of trace, debug, info, warn, error</p>"),
        "{page}"
    );
    let (status, page) = post(
        "chain/greet",
        vec![
            ("action", "settings"),
            ("event_type", "joined"),
            ("when", "(("),
        ],
    )
    .await;
    assert_eq!(status, 422);
    assert!(page.contains("not a valid Rhai expression"), "{page}");
    assert_eq!(version().await, before);

    let (status, _) = post(
        "chain/greet/steps/add",
        vec![
            ("action", "save"),
            ("handler", "emit"),
            ("opt.event_type", "greeted"),
        ],
    )
    .await;
    assert_eq!(status, 303);
    let (status, _) = post(
        "chain/greet",
        vec![
            ("action", "settings"),
            ("conversation_type", "signup"),
            ("event_type", "joined"),
            ("when", "event.event_data.score > 3"),
        ],
    )
    .await;
    assert_eq!(status, 303);
    // A remove sent twice from the same page (a double click) removes one
    // step: the second finds the chain changed since the page was shown.
    let shown = http
        .get(format!("{base}/console/accounts/acme/chain/greet"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let seen = seen_in(&shown);
    let mut answers = Vec::new();
    for _ in 0..2 {
        let answer = http
            .post(format!("{base}/console/accounts/acme/chain/greet"))
            .header(reqwest::header::COOKIE, &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("seen", &seen),
                ("action", "remove:0"),
            ])
            .send()
            .await
            .unwrap();
        answers.push((answer.status().as_u16(), answer.text().await.unwrap()));
    }
    assert_eq!(answers[0].0, 303);
    assert_eq!(answers[1].0, 409, "{}", answers[1].1);
    assert!(
        answers[1]
            .1
            .contains("The chain changed since this page was shown"),
        "{}",
        answers[1].1
    );
    // So does a step's form saved after its chain changed.
    let (status, page) = {
        let answer = http
            .post(format!("{base}/console/accounts/acme/chain/greet/steps/0"))
            .header(reqwest::header::COOKIE, &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("seen", &seen),
                ("action", "save"),
                ("handler", "log"),
                ("opt.message", "stale"),
            ])
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    assert_eq!(status, 409, "{page}");
    assert!(
        page.contains("The chain changed since this form was shown"),
        "{page}"
    );
    let (_, chain) = d.get("/v1/accounts/acme/chains/greet").await;
    let chain = &chain["chain"];
    assert_eq!(chain["conversation_type"], "signup", "{chain}");
    assert_eq!(chain["when"], "event.event_data.score > 3", "{chain}");
    let names: Vec<&str> = chain["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["handler"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["log", "emit"], "{chain}");
    let (_, history) = d.get("/v1/accounts/acme/chain-versions").await;
    let changes: Vec<&str> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["change"].as_str().unwrap())
        .collect();
    assert_eq!(
        changes[1..],
        [
            "console: chain greet: step 1 moved down",
            "console: chain greet step 2 edited",
            "console: chain greet step added",
            "console: chain greet: match and condition changed",
            "console: chain greet: step 1 removed",
        ],
        "{history}"
    );

    let missing = http
        .get(format!("{base}/console/accounts/acme/chain/greet/steps/9"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        post("chain/greet", vec![("action", "remove_chain")])
            .await
            .0,
        303
    );
    let (status, _) = d.get("/v1/accounts/acme/chains/greet").await;
    assert_eq!(status, 404);
}

/// A save re-checks the account's chains as a merge does: when another
/// chain no longer passes (here: a second SMS provider makes its step's
/// `provider` necessary), the form says so, naming that chain, and saves
/// nothing.
#[tokio::test]
async fn a_save_refused_for_another_chain_names_that_chain() {
    let receiver = HttpReceiver::start(Duration::from_secs(5));
    let gateway = |name: &str| {
        format!(
            "[providers.sms.{name}]\ntype = \"http\"\nurl = \"{}/sms\"\nfrom = \"Switchboard\"\n",
            receiver.url()
        )
    };
    let mut d = Dispatcher::with_config(None, &gateway("one"));
    d.apply_chains(
        "acme.toml",
        "account_key = \"acme\"\n[[chains]]\nname = \"texts\"\nevent_type = \"joined\"\n\
         [[chains.steps]]\nhandler = \"send_sms\"\nconfig = { to = \"+27820000001\", body = \"hi\" }\n",
    )
    .await;
    let token = account_token(&d, "acme").await;
    d.set_config(&format!("{}{}", gateway("one"), gateway("two")));
    d.restart();
    let http = plain_client();
    let base = d.url().to_string();
    let session = sign_in(&http, &base, &token).await;
    let cookie = format!("sb_session={session}");
    let page = http
        .get(format!("{base}/console/accounts/acme/chains/new?conversation_type=signup&event_type=left&handler=log"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = csrf_in(&page);
    let answer = http
        .post(format!("{base}/console/accounts/acme/chains/new"))
        .header(reqwest::header::COOKIE, &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("action", "save"),
            ("name", "farewell"),
            ("conversation_type", "signup"),
            ("event_type", "left"),
            ("handler", "log"),
            ("opt.message", "bye"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let page = answer.text().await.unwrap();
    assert!(
        page.contains("chain &quot;texts&quot;") && page.contains("name the SMS provider to use"),
        "{page}"
    );
    let (_, chains) = d.get("/v1/accounts/acme/chains").await;
    assert!(!chains.to_string().contains("farewell"), "{chains}");
}

/// A session outlives a restart of the dispatcher (it is kept in the store,
/// under a hash of its id): the browser stays signed in and its live
/// events stream connects again; signing out ends it for good.
#[tokio::test]
async fn a_session_outlives_a_restart() {
    let mut d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        "account_key = \"acme\"\n[[chains]]\nname = \"noted\"\nevent_type = \"joined\"\n\
         [[chains.steps]]\nhandler = \"log\"\n",
    )
    .await;
    let http = plain_client();
    let token = account_token(&d, "acme").await;
    let session = sign_in(&http, d.url(), &token).await;
    let cookie = format!("sb_session={session}");
    d.restart();
    let base = d.url().to_string();
    let page = http
        .get(format!("{base}/console/accounts/acme"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let stream = http
        .get(format!("{base}/console/accounts/acme/tail/stream"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    drop(stream);
    let csrf = csrf_in(&html);
    let out = http
        .post(format!("{base}/console/sign-out"))
        .header(reqwest::header::COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&out), "/console/sign-in");
    d.restart();
    let page = http
        .get(format!("{}/console/accounts/acme", d.url()))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 303, "signed out for good");

    // A session lasts only while its token does: revoking it ends it.
    let created = d.cli(&["tokens", "create", "acme", "--json"]).await.json();
    let (token, id) = (
        created["token"].as_str().unwrap().to_string(),
        created["id"].as_str().unwrap().to_string(),
    );
    let base = d.url().to_string();
    let session = sign_in(&http, &base, &token).await;
    let cookie = format!("sb_session={session}");
    let get = || {
        http.get(format!("{base}/console/accounts/acme"))
            .header(reqwest::header::COOKIE, &cookie)
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);
    d.cli(&["tokens", "revoke", "acme", &id]).await.ok();
    let page = get().await.unwrap();
    assert_eq!(page.status(), 303, "the token was revoked");
    assert_eq!(location(&page), "/console/sign-in");
}

/// The script editor tests against the latest real event of a kind the
/// account has had, and restores an old version as a new one.
#[tokio::test]
async fn a_script_is_tested_on_a_real_event_and_an_old_version_restored() {
    let d = Dispatcher::embedded();
    d.apply_chains(
        "acme.toml",
        "account_key = \"acme\"\n[[chains]]\nname = \"noted\"\nevent_type = \"joined\"\n\
         [[chains.steps]]\nhandler = \"log\"\n",
    )
    .await;
    for (file, source) in [
        (
            "v1.rhai",
            "fn handle(event, steps, config) { #{ version: 1 } }\n",
        ),
        (
            "v2.rhai",
            "fn handle(event, steps, config) { #{ version: 2 } }\n",
        ),
    ] {
        let path = d.file(file, source);
        d.cli(&["scripts", "put", "acme", "score", path.to_str().unwrap()])
            .await
            .ok();
    }
    let e = event(
        "acme",
        "signup",
        "joined",
        "k",
        json!({"name": "Thandi <3"}),
    );
    let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
    d.wait_for_trace("acme", &id, util::TIMEOUT).await;
    wait_until("the kind counted", util::TIMEOUT, || async {
        let (_, answer) = d.get("/v1/accounts/acme/event-kinds").await;
        (answer["kinds"][0]["event_type"] == "joined").then_some(())
    })
    .await;

    let http = plain_client();
    let base = d.url();
    let session = sign_in(&http, base, &account_token(&d, "acme").await).await;
    let cookie = format!("sb_session={session}");
    let get = |path: String| {
        let (http, cookie) = (&http, &cookie);
        async move {
            http.get(format!("{base}{path}"))
                .header(reqwest::header::COOKIE, cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let page = get("/console/accounts/acme/scripts/score".into()).await;
    assert!(page.contains("href=\"?kind=signup&#x2f;joined\""), "{page}");
    let page = get("/console/accounts/acme/scripts/score?kind=signup%2Fjoined".into()).await;
    assert!(
        page.contains(&id) && page.contains("Thandi &lt;3"),
        "{page}"
    );
    let csrf = csrf_in(&page);
    let restored = http
        .post(format!("{base}/console/accounts/acme/scripts/score"))
        .header(reqwest::header::COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str()), ("action", "restore:1")])
        .send()
        .await
        .unwrap();
    assert_eq!(restored.status(), 303);
    assert_eq!(
        location(&restored),
        "/console/accounts/acme/scripts/score?saved=3&restored=1"
    );
    let (_, script) = d.get("/v1/accounts/acme/scripts/score").await;
    assert_eq!(script["version"], 3, "{script}");
    assert!(
        script["source"].as_str().unwrap().contains("version: 1"),
        "{script}"
    );
    let page = get("/console/accounts/acme/scripts/score?saved=3&restored=1".into()).await;
    assert!(
        page.contains("Stored as version 3 (version 1's source)."),
        "{page}"
    );
}

/// Reached over https (`http.public_url`), the console's cookies are
/// `Secure`; over plain http they cannot be (a browser would drop them).
#[tokio::test]
async fn cookies_are_secure_when_the_console_is_served_over_https() {
    for (public_url, secure) in [
        ("https://console.example.org", true),
        ("http://127.0.0.1:1", false),
    ] {
        let d = Dispatcher::with_config(None, &format!("[http]\npublic_url = \"{public_url}\"\n"));
        let page = plain_client()
            .get(format!("{}/console/sign-in", d.url()))
            .send()
            .await
            .unwrap();
        let (_, cookie) = set_cookie(&page, "sb_sign_in").expect("a sign-in cookie");
        assert_eq!(
            cookie.contains("; Secure"),
            secure,
            "{public_url}: {cookie}"
        );
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
    }
}
