//! Auth and account isolation, end to end: the binary on the embedded bus,
//! driven over HTTP and the CLI with the admin token, account tokens and none.
//!
//! The isolation matrix is one table with a row for every
//! `/v1/accounts/{account}/...` route and method; every other route is in a
//! second table with how it authenticates. A route in
//! `switchboard_http::api::ROUTES` that neither table has fails
//! [`every_route_is_in_a_table`] (and the matrix test itself), so a new route
//! cannot be added without deciding, and testing, who may call it.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};
use switchboard_http::api::ROUTES;

use crate::peers::HttpReceiver;
use crate::util::{ADMIN_TOKEN, Dispatcher, NatsServer, TIMEOUT, wait_until};

/// The resources of one account that the matrix's paths and bodies name.
#[derive(Debug, Clone)]
struct Fixture {
    account: String,
    /// An account token of this account.
    token: String,
    /// A second token, for the revoke row.
    spare_token_id: String,
    event_id: String,
    contact_key: String,
    message_id: String,
    /// A number the account does not own yet (its own, not the other's).
    number: String,
    /// Three dead letters: shown, discarded, replayed.
    dead_letters: [String; 3],
    /// The receiver the handled event notified, and its notification.
    receiver: String,
    notification_id: String,
}

/// How a route authenticates when it is not an account route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// No token needed (`/healthz`, `/readyz`, `/metrics`).
    Open,
    /// A bearer token; account tokens are checked in the handler (tested below).
    Bearer,
    /// No token: the secret in the URL is the credential (inbound webhooks,
    /// tested in `tests/inbound.rs`); a wrong one answers 404.
    UrlSecret,
    /// No token: the provider's signature is the credential (Twilio's status
    /// callbacks, SendGrid's signed events; tested in `tests/inbound.rs`);
    /// unsigned, refused.
    ProviderSignature,
    /// No token: the link's signature is the credential (unsubscribe links,
    /// tested in `tests/preferences.rs`); a link not ours answers 404.
    SignedLink,
    /// A receiver token, and no other (see [`receiver_token_matrix`]).
    Receiver,
}

/// Every route outside `/v1/accounts/{account}/`, and how it authenticates.
const OTHER_ROUTES: &[(&str, &str, Guard)] = &[
    ("GET", "/healthz", Guard::Open),
    ("GET", "/readyz", Guard::Open),
    ("GET", "/metrics", Guard::Open),
    ("POST", "/v1/events", Guard::Bearer),
    ("GET", "/v1/accounts", Guard::Bearer),
    ("GET", "/v1/handlers", Guard::Bearer),
    (
        "POST",
        "/v1/inbound/{account}/{provider}/{secret}",
        Guard::UrlSecret,
    ),
    (
        "POST",
        "/v1/inbound/twilio-status/{account}",
        Guard::ProviderSignature,
    ),
    (
        "POST",
        "/v1/inbound/sendgrid-events",
        Guard::ProviderSignature,
    ),
    (
        "GET",
        "/v1/unsubscribe/{account}/{token}",
        Guard::SignedLink,
    ),
    (
        "POST",
        "/v1/unsubscribe/{account}/{token}",
        Guard::SignedLink,
    ),
    ("GET", "/v1/inbox", Guard::Receiver),
    ("GET", "/v1/inbox/count", Guard::Receiver),
    ("POST", "/v1/inbox/read_all", Guard::Receiver),
    ("POST", "/v1/inbox/{id}/{action}", Guard::Receiver),
    ("GET", "/v1/inbox/stream", Guard::Receiver),
    ("GET", "/inbox/widget.js", Guard::Open),
];

/// A row of the isolation matrix.
struct Row {
    method: &'static str,
    /// The route as `ROUTES` lists it.
    route: &'static str,
    /// The concrete path for an account's fixture.
    path: fn(&Fixture) -> String,
    /// The body to send for an account's fixture.
    body: fn(&Fixture) -> Option<String>,
    /// The status for the account's own token on its own account.
    own: u16,
    /// The status for the admin token on any account.
    admin: u16,
}

fn none(_: &Fixture) -> Option<String> {
    None
}

fn chain_file(account: &str) -> String {
    format!(
        r#"
account_key = "{account}"

[[chains]]
name = "main"
conversation_type = "survey"
event_type = "poll_complete"

[[chains.steps]]
handler = "create_contact"
config = {{ msisdn = "{{{{ event.event_data.msisdn }}}}" }}

[[chains.steps]]
handler = "send_sms"
config = {{ to = "{{{{ steps.create_contact.msisdn }}}}", body = "Thanks!", provider = "gateway" }}

[[chains.steps]]
handler = "notify"
config = {{ to = "{{{{ event.event_data.msisdn }}}}", body = "Thanks for your answers" }}

[[chains]]
name = "fail"
conversation_type = "survey"
event_type = "broken"

[[chains.steps]]
handler = "script:boom"

[[chains]]
name = "extra"
conversation_type = "other"
event_type = "other"

[[chains.steps]]
handler = "log"
config = {{ message = "extra" }}
"#
    )
}

const TEMPLATE: &str = "channel = \"sms\"\ntext = \"Hello {{ recipient.name }}\"\n";

const SAMPLE: &str = r#"{"conversation_key": "c", "conversation_type": "survey",
    "event_type": "poll_complete", "event_data": {"msisdn": "+27820000001"}}"#;

/// The matrix, in the order it runs: reads before the writes that would
/// change what they read, removals last. Each row runs account A's token
/// against B (404), no token against B (401), A's token against A (`own`)
/// and the admin token against B (`admin`) — so a success of the admin on B
/// after A's 404 shows that A's request did not touch B's resource.
#[rustfmt::skip]
fn matrix() -> Vec<Row> {
    fn row(
        method: &'static str,
        route: &'static str,
        path: fn(&Fixture) -> String,
        body: fn(&Fixture) -> Option<String>,
        own: u16,
        admin: u16,
    ) -> Row {
        Row {
            method,
            route,
            path,
            body,
            own,
            admin,
        }
    }
    vec![
        row("GET", "/v1/accounts/{account}/chains",
            |f| format!("/v1/accounts/{}/chains", f.account), none, 200, 200),
        row("PUT", "/v1/accounts/{account}/chains",
            |f| format!("/v1/accounts/{}/chains", f.account),
            |f| Some(chain_file(&f.account)), 200, 200),
        row("GET", "/v1/accounts/{account}/chains/{name}",
            |f| format!("/v1/accounts/{}/chains/main", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/chain-versions",
            |f| format!("/v1/accounts/{}/chain-versions", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/chain-versions/{version}",
            |f| format!("/v1/accounts/{}/chain-versions/1", f.account), none, 200, 200),
        row("POST", "/v1/accounts/{account}/chain-versions/{version}/restore",
            |f| format!("/v1/accounts/{}/chain-versions/1/restore", f.account), none, 200, 200),
        row("POST", "/v1/accounts/{account}/chain-test",
            |f| format!("/v1/accounts/{}/chain-test", f.account),
            |_| Some(SAMPLE.into()), 200, 200),
        row("GET", "/v1/accounts/{account}/scripts",
            |f| format!("/v1/accounts/{}/scripts", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/handlers",
            |f| format!("/v1/accounts/{}/handlers", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/event-kinds",
            |f| format!("/v1/accounts/{}/event-kinds", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/counts",
            |f| format!("/v1/accounts/{}/counts", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/timers",
            |f| format!("/v1/accounts/{}/timers", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/events",
            |f| format!("/v1/accounts/{}/events", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/events/stream",
            |f| format!("/v1/accounts/{}/events/stream", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/scripts/{name}",
            |f| format!("/v1/accounts/{}/scripts/ok", f.account), none, 200, 200),
        row("PUT", "/v1/accounts/{account}/scripts/{name}",
            |f| format!("/v1/accounts/{}/scripts/ok", f.account),
            |_| Some("fn handle(event, steps, config) { #{ ok: 2 } }".into()), 200, 200),
        row("GET", "/v1/accounts/{account}/scripts/{name}/versions",
            |f| format!("/v1/accounts/{}/scripts/ok/versions", f.account), none, 200, 200),
        row("POST", "/v1/accounts/{account}/scripts/{name}/test",
            |f| format!("/v1/accounts/{}/scripts/ok/test", f.account),
            |_| Some(SAMPLE.into()), 200, 200),
        row("GET", "/v1/accounts/{account}/templates",
            |f| format!("/v1/accounts/{}/templates", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/templates/{slug}",
            |f| format!("/v1/accounts/{}/templates/hello", f.account), none, 200, 200),
        row("PUT", "/v1/accounts/{account}/templates/{slug}",
            |f| format!("/v1/accounts/{}/templates/hello", f.account),
            |_| Some(TEMPLATE.into()), 200, 200),
        row("GET", "/v1/accounts/{account}/templates/{slug}/versions",
            |f| format!("/v1/accounts/{}/templates/hello/versions", f.account), none, 200, 200),
        row("POST", "/v1/accounts/{account}/templates/{slug}/test",
            |f| format!("/v1/accounts/{}/templates/hello/test", f.account),
            |_| Some(r#"{"recipient": {"name": "Ada"}}"#.into()), 200, 200),
        row("POST", "/v1/accounts/{account}/events/{id}/rerun",
            |f| format!("/v1/accounts/{}/events/{}/rerun", f.account, f.event_id), none, 202, 202),
        row("GET", "/v1/accounts/{account}/events/{id}/trace",
            |f| format!("/v1/accounts/{}/events/{}/trace", f.account, f.event_id), none, 200, 200),
        row("GET", "/v1/accounts/{account}/contacts",
            |f| format!("/v1/accounts/{}/contacts", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/contacts/{key}",
            |f| format!("/v1/accounts/{}/contacts/{}", f.account, f.contact_key), none, 200, 200),
        row("GET", "/v1/accounts/{account}/preferences/{contact}",
            |f| format!("/v1/accounts/{}/preferences/{}", f.account, f.contact_key),
            none, 200, 200),
        row("PUT", "/v1/accounts/{account}/preferences/{contact}",
            |f| format!("/v1/accounts/{}/preferences/{}", f.account, f.contact_key),
            |_| Some(r#"{"channel": "sms", "subscribed": true}"#.into()), 200, 200),
        row("GET", "/v1/accounts/{account}/inbox/{receiver}",
            |f| format!("/v1/accounts/{}/inbox/{}", f.account, f.receiver), none, 200, 200),
        row("GET", "/v1/accounts/{account}/inbox/{receiver}/count",
            |f| format!("/v1/accounts/{}/inbox/{}/count", f.account, f.receiver), none, 200, 200),
        row("POST", "/v1/accounts/{account}/inbox/{receiver}/{id}/{action}",
            |f| format!("/v1/accounts/{}/inbox/{}/{}/read", f.account, f.receiver,
                f.notification_id), none, 200, 200),
        row("POST", "/v1/accounts/{account}/inbox/{receiver}/read_all",
            |f| format!("/v1/accounts/{}/inbox/{}/read_all", f.account, f.receiver),
            none, 200, 200),
        row("POST", "/v1/accounts/{account}/inbox/{receiver}/token",
            |f| format!("/v1/accounts/{}/inbox/{}/token", f.account, f.receiver),
            |_| Some(r#"{"ttl": "1h"}"#.into()), 201, 201),
        row("POST", "/v1/accounts/{account}/inbox-tokens/rotate",
            |f| format!("/v1/accounts/{}/inbox-tokens/rotate", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/files",
            |f| format!("/v1/accounts/{}/files", f.account), none, 200, 200),
        row("PUT", "/v1/accounts/{account}/files/{name}",
            |f| format!("/v1/accounts/{}/files/matrix.txt", f.account),
            |_| Some("a file".into()), 200, 200),
        row("GET", "/v1/accounts/{account}/files/{name}",
            |f| format!("/v1/accounts/{}/files/matrix.txt", f.account), none, 200, 200),
        row("DELETE", "/v1/accounts/{account}/files/{name}",
            |f| format!("/v1/accounts/{}/files/matrix.txt", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/numbers",
            |f| format!("/v1/accounts/{}/numbers", f.account), none, 200, 200),
        // Who owns an address is the deployment's to decide: 403 on the
        // caller's own account.
        row("PUT", "/v1/accounts/{account}/numbers/{transport}/{address}",
            |f| format!("/v1/accounts/{}/numbers/matrix/{}", f.account, f.number), none, 403, 200),
        row("DELETE", "/v1/accounts/{account}/numbers/{transport}/{address}",
            |f| format!("/v1/accounts/{}/numbers/matrix/{}", f.account, f.number), none, 403, 200),
        row("GET", "/v1/accounts/{account}/messages",
            |f| format!("/v1/accounts/{}/messages", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/messages/{id}",
            |f| format!("/v1/accounts/{}/messages/{}", f.account, f.message_id), none, 200, 200),
        // The fixture's message went: it is not scheduled, so 409 once
        // the token is let through.
        row("POST", "/v1/accounts/{account}/messages/{id}/cancel",
            |f| format!("/v1/accounts/{}/messages/{}/cancel", f.account, f.message_id),
            none, 409, 409),
        row("GET", "/v1/accounts/{account}/messages/unmatched",
            |f| format!("/v1/accounts/{}/messages/unmatched", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/inbound",
            |f| format!("/v1/accounts/{}/inbound", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/inbound/{provider}",
            |f| format!("/v1/accounts/{}/inbound/sendgrid", f.account), none, 200, 200),
        row("POST", "/v1/accounts/{account}/inbound/{provider}",
            |f| format!("/v1/accounts/{}/inbound/sendgrid", f.account),
            |_| Some(r#"{"rotate": true}"#.into()), 201, 201),
        row("GET", "/v1/accounts/{account}/secrets",
            |f| format!("/v1/accounts/{}/secrets", f.account), none, 200, 200),
        row("PUT", "/v1/accounts/{account}/secrets/{name}",
            |f| format!("/v1/accounts/{}/secrets/gateway", f.account),
            |_| Some("whsec_bmV3LXZhbHVl".into()), 200, 200),
        row("DELETE", "/v1/accounts/{account}/secrets/{name}",
            |f| format!("/v1/accounts/{}/secrets/spare", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/dead-letters",
            |f| format!("/v1/accounts/{}/dead-letters", f.account), none, 200, 200),
        row("GET", "/v1/accounts/{account}/dead-letters/{id}",
            |f| format!("/v1/accounts/{}/dead-letters/{}", f.account, f.dead_letters[0]),
            none, 200, 200),
        row("DELETE", "/v1/accounts/{account}/dead-letters/{id}",
            |f| format!("/v1/accounts/{}/dead-letters/{}", f.account, f.dead_letters[1]),
            none, 200, 200),
        row("POST", "/v1/accounts/{account}/dead-letters/{id}/replay",
            |f| format!("/v1/accounts/{}/dead-letters/{}/replay", f.account, f.dead_letters[2]),
            none, 200, 200),
        row("POST", "/v1/accounts/{account}/dead-letters/replay",
            |f| format!("/v1/accounts/{}/dead-letters/replay", f.account), none, 200, 200),
        // Managing tokens needs the admin token: 403 on the caller's own account.
        row("GET", "/v1/accounts/{account}/tokens",
            |f| format!("/v1/accounts/{}/tokens", f.account), none, 403, 200),
        row("POST", "/v1/accounts/{account}/tokens",
            |f| format!("/v1/accounts/{}/tokens", f.account),
            |_| Some(r#"{"name": "matrix"}"#.into()), 403, 201),
        row("DELETE", "/v1/accounts/{account}/tokens/{id}",
            |f| format!("/v1/accounts/{}/tokens/{}", f.account, f.spare_token_id),
            none, 403, 200),
        row("DELETE", "/v1/accounts/{account}/inbound/{provider}",
            |f| format!("/v1/accounts/{}/inbound/sendgrid", f.account), none, 200, 200),
        row("DELETE", "/v1/accounts/{account}/scripts/{name}",
            |f| format!("/v1/accounts/{}/scripts/spare", f.account), none, 200, 200),
        row("DELETE", "/v1/accounts/{account}/templates/{slug}",
            |f| format!("/v1/accounts/{}/templates/spare", f.account), none, 200, 200),
        row("DELETE", "/v1/accounts/{account}/chains/{name}",
            |f| format!("/v1/accounts/{}/chains/extra", f.account), none, 200, 200),
        row("DELETE", "/v1/accounts/{account}/chains",
            |f| format!("/v1/accounts/{}/chains", f.account), none, 200, 200),
    ]
}

/// Fails for a route of the API that neither table covers, and for a row
/// whose route the API does not have (any more).
#[track_caller]
fn check_coverage(rows: &[Row]) {
    let routes: BTreeSet<(&str, &str)> = ROUTES.iter().copied().collect();
    let mut covered = BTreeSet::new();
    for row in rows {
        assert!(
            covered.insert((row.method, row.route)),
            "the matrix has two rows for {} {}",
            row.method,
            row.route
        );
    }
    for (method, route, _) in OTHER_ROUTES {
        assert!(
            !route.starts_with("/v1/accounts/{account}"),
            "{method} {route} belongs in the matrix"
        );
        assert!(
            covered.insert((method, route)),
            "{method} {route} is listed twice"
        );
    }
    let missing: Vec<_> = routes.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "routes without a row in tests/auth.rs (add each to the isolation matrix, or to \
         OTHER_ROUTES with how it authenticates): {missing:?}"
    );
    let stale: Vec<_> = covered.difference(&routes).collect();
    assert!(
        stale.is_empty(),
        "rows for routes the API does not have: {stale:?}"
    );
}

#[test]
fn every_route_is_in_a_table() {
    check_coverage(&matrix());
}

/// `METHOD path` on `d` as `token`; the status and the JSON answer.
async fn call(
    d: &Dispatcher,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, Value) {
    let method = Method::from_bytes(method.as_bytes()).expect("an HTTP method");
    if path.ends_with("/stream") {
        // A stream does not end: its status, and its content type when it
        // answers.
        let response = crate::util::http_client(token)
            .request(method, format!("{}{path}", d.url()))
            .send()
            .await
            .expect("the stream answers");
        let status = response.status().as_u16();
        if status != 200 {
            return (status, response.json().await.unwrap_or(Value::Null));
        }
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        return (status, Value::Null);
    }
    d.request(method, path, token, body).await
}

/// As the admin; the call must answer `expected`.
async fn admin(
    d: &Dispatcher,
    method: &str,
    path: &str,
    body: Option<&str>,
    expected: u16,
) -> Value {
    let (status, answer) = call(d, method, path, Some(ADMIN_TOKEN), body.map(str::to_string)).await;
    assert_eq!(status, expected, "{method} {path}: {answer}");
    answer
}

/// Sets up `account` — scripts, secrets, chains, two tokens, an inbound
/// SendGrid webhook, a handled event (a trace, a contact, an SMS record) and
/// three dead letters — and returns its fixture.
async fn fixture(d: &Dispatcher, account: &str) -> Fixture {
    let base = format!("/v1/accounts/{account}");
    for (name, source) in [
        (
            "boom",
            "fn handle(event, steps, config) { throw \"boom\"; }",
        ),
        ("ok", "fn handle(event, steps, config) { #{ ok: 1 } }"),
        ("spare", "fn handle(event, steps, config) { #{} }"),
    ] {
        admin(
            d,
            "PUT",
            &format!("{base}/scripts/{name}"),
            Some(source),
            200,
        )
        .await;
    }
    for slug in ["hello", "spare"] {
        admin(
            d,
            "PUT",
            &format!("{base}/templates/{slug}"),
            Some(TEMPLATE),
            200,
        )
        .await;
    }
    for name in ["gateway", "spare"] {
        admin(
            d,
            "PUT",
            &format!("{base}/secrets/{name}"),
            Some("whsec_c2VjcmV0"),
            200,
        )
        .await;
    }
    admin(
        d,
        "PUT",
        &format!("{base}/chains"),
        Some(&chain_file(account)),
        200,
    )
    .await;
    let token = admin(
        d,
        "POST",
        &format!("{base}/tokens"),
        Some(r#"{"name": "main"}"#),
        201,
    )
    .await;
    let spare = admin(d, "POST", &format!("{base}/tokens"), None, 201).await;
    admin(d, "POST", &format!("{base}/inbound/sendgrid"), None, 201).await;

    let event = |event_type: &str| {
        json!({"account_key": account, "conversation_key": "c", "conversation_type": "survey",
               "event_type": event_type, "event_data": {"msisdn": "+27820000001"}})
    };
    let event_id = d.post_event(&event("poll_complete")).await;
    let trace = d.wait_for_trace(account, &event_id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let mut failed = Vec::new();
    for _ in 0..3 {
        failed.push(d.post_event(&event("broken")).await);
    }
    let dead_letters = wait_until("three dead letters", TIMEOUT, || async {
        let letters = d.dead_letters(account).await;
        let ids: Vec<String> = letters
            .iter()
            .filter(|l| failed.iter().any(|f| l["event"]["id"] == f.as_str()))
            .map(|l| l["id"].as_str().expect("a dead-letter id").to_string())
            .collect();
        <[String; 3]>::try_from(ids).ok()
    })
    .await;
    let receiver = "+27820000001".to_string();
    let inbox = admin(d, "GET", &format!("{base}/inbox/{receiver}"), None, 200).await;
    let notification_id = inbox["notifications"][0]["id"]
        .as_str()
        .expect("a notification")
        .to_string();
    let contacts = admin(d, "GET", &format!("{base}/contacts"), None, 200).await;
    let messages = admin(d, "GET", &format!("{base}/messages"), None, 200).await;
    Fixture {
        account: account.to_string(),
        token: token["token"].as_str().expect("a token").to_string(),
        spare_token_id: spare["id"].as_str().expect("a token id").to_string(),
        event_id,
        contact_key: contacts["contacts"][0]["key"]
            .as_str()
            .expect("a contact")
            .to_string(),
        message_id: messages["messages"][0]["id"]
            .as_str()
            .expect("a message")
            .to_string(),
        number: match account {
            "alpha" => "+27830000001",
            _ => "+27830000002",
        }
        .to_string(),
        dead_letters,
        receiver,
        notification_id,
    }
}

fn providers(receiver: &HttpReceiver) -> String {
    format!(
        "[providers.sms.gateway]\ntype = \"http\"\nurl = \"{}/sms\"\n",
        receiver.url()
    )
}

/// The issue's isolation matrix: for every account route and method, A's
/// token on B's resource → 404 (the same answer as for an account that does
/// not exist), no token → 401, A's token on its own → the row's status, the
/// admin → the row's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_matrix() {
    let rows = matrix();
    check_coverage(&rows);
    let receiver = HttpReceiver::start(std::time::Duration::from_secs(5));
    let d = Dispatcher::with_config(None, &providers(&receiver));
    let a = fixture(&d, "alpha").await;
    let b = fixture(&d, "beta").await;
    let nobody = Fixture {
        account: "nobody".into(),
        ..b.clone()
    };

    for row in &rows {
        let what = |who: &str| format!("{} {} ({who})", row.method, row.route);
        // A's token on B's resource: 404, the same answer as for an account
        // that does not exist.
        let path_b = (row.path)(&b);
        let (status, answer) = call(&d, row.method, &path_b, Some(&a.token), (row.body)(&b)).await;
        assert_eq!(status, 404, "{}: {answer}", what("A on B"));
        assert_eq!(
            answer["error"]["code"],
            "not_found",
            "{}: {answer}",
            what("A on B")
        );
        assert!(answer["error"]["message"].is_string(), "{answer}");
        let (status, unknown) = call(
            &d,
            row.method,
            &(row.path)(&nobody),
            Some(&a.token),
            (row.body)(&nobody),
        )
        .await;
        assert_eq!(
            (status, &unknown),
            (404, &answer),
            "{}",
            what("A on an unknown account")
        );

        // No token: 401.
        let (status, answer) = call(&d, row.method, &path_b, None, (row.body)(&b)).await;
        assert_eq!(status, 401, "{}: {answer}", what("no token"));
        assert_eq!(answer["error"]["code"], "unauthorized", "{answer}");

        // A's token on its own resource.
        let (status, answer) = call(
            &d,
            row.method,
            &(row.path)(&a),
            Some(&a.token),
            (row.body)(&a),
        )
        .await;
        assert_eq!(status, row.own, "{}: {answer}", what("A on A"));

        // The admin on B's resource (still there after A's attempt).
        let (status, answer) =
            call(&d, row.method, &path_b, Some(ADMIN_TOKEN), (row.body)(&b)).await;
        assert_eq!(status, row.admin, "{}: {answer}", what("admin on B"));
    }

    // Poison filed under no account is the admin's.
    let (status, _) = call(
        &d,
        "GET",
        "/v1/accounts/~unknown/dead-letters",
        Some(&a.token),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &d,
        "GET",
        "/v1/accounts/~unknown/dead-letters",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);

    // Neither token was logged.
    let log = d.log();
    for secret in [ADMIN_TOKEN, &a.token, &b.token] {
        assert!(!log.contains(secret), "a token is in the log:\n{log}");
    }
}

/// The routes outside the matrix: open ones answer without a token, the
/// others want one; ingest and the account list honour account tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_account_list_and_open_routes() {
    let d = Dispatcher::embedded();
    for (method, route, guard) in OTHER_ROUTES {
        let (status, answer) = call(&d, method, route, None, Some("{}".into())).await;
        match guard {
            Guard::Open => assert_eq!(status, 200, "{method} {route}: {answer}"),
            Guard::Bearer => {
                assert_eq!(status, 401, "{method} {route}: {answer}");
                assert_eq!(answer["error"]["code"], "unauthorized", "{answer}");
            }
            Guard::UrlSecret => {
                assert_eq!(status, 404, "{method} {route}: {answer}");
                assert_eq!(answer["error"]["code"], "not_found", "{answer}");
            }
            Guard::SignedLink => assert_eq!(status, 404, "{method} {route}: {answer}"),
            Guard::ProviderSignature => {
                assert!(
                    ![200, 401].contains(&status),
                    "{method} {route}: {status} {answer}"
                );
            }
            Guard::Receiver => {
                assert_eq!(status, 401, "{method} {route}: {answer}");
                assert_eq!(answer["error"]["code"], "unauthorized", "{answer}");
            }
        }
    }
    for account in ["alpha", "beta"] {
        d.apply_chains(
            &format!("{account}.toml"),
            &crate::util::poll_chains(account),
        )
        .await;
    }
    let alpha = admin(&d, "POST", "/v1/accounts/alpha/tokens", None, 201).await;
    let token = alpha["token"].as_str().unwrap();
    assert!(token.starts_with("sbt_"), "{alpha}");

    // The account list: only the caller's own account.
    let (status, answer) = call(&d, "GET", "/v1/accounts", Some(token), None).await;
    assert_eq!(
        (status, &answer["accounts"]),
        (200, &json!(["alpha"])),
        "{answer}"
    );
    let answer = admin(&d, "GET", "/v1/accounts", None, 200).await;
    assert_eq!(answer["accounts"], json!(["alpha", "beta"]));

    // Ingest: the token's own account only.
    let event = |account: &str| {
        json!({"account_key": account, "conversation_key": "c", "conversation_type": "survey",
               "event_type": "poll_complete", "event_data": {"msisdn": "+27820000001", "score": 4}})
        .to_string()
    };
    let (status, answer) = call(&d, "POST", "/v1/events", Some(token), Some(event("alpha"))).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    let (status, answer) = call(&d, "POST", "/v1/events", Some(token), Some(event("beta"))).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"]["code"], "forbidden");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("alpha") && message.contains("beta"),
        "{message}"
    );
    let (status, _) = call(
        &d,
        "POST",
        "/v1/events",
        Some(ADMIN_TOKEN),
        Some(event("beta")),
    )
    .await;
    assert_eq!(status, 202);
    let trace = d.wait_for_trace("alpha", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");

    // Bad tokens: 401 with a challenge, whatever the route.
    for (header, challenge) in [
        (None, "Bearer"),
        (
            Some("Bearer sbt_not-a-token"),
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(&*format!("Bearer {ADMIN_TOKEN}x")),
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some("Basic YWRtaW46YWRtaW4="),
            "Bearer error=\"invalid_request\"",
        ),
    ] {
        for path in ["/v1/accounts/alpha/chains", "/v1/nothing-here", "/v1"] {
            let mut request = reqwest::Client::new().get(format!("{}{path}", d.url()));
            if let Some(h) = header {
                request = request.header("authorization", h);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 401, "{path} with {header:?}");
            assert_eq!(
                response.headers()["www-authenticate"].to_str().unwrap(),
                challenge
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }
    // An account token outside its account's routes finds nothing.
    let (status, answer) = call(&d, "GET", "/v1/nothing-here", Some(token), None).await;
    assert_eq!(status, 404, "{answer}");
    // Provider callbacks carry their own secret: no bearer token asked for.
    let (status, answer) = call(&d, "POST", "/v1/inbound/alpha/webhook/x", None, None).await;
    assert_ne!(status, 401, "{answer}");

    // A revoked token is refused at once.
    let id = alpha["id"].as_str().unwrap();
    admin(
        &d,
        "DELETE",
        &format!("/v1/accounts/alpha/tokens/{id}"),
        None,
        200,
    )
    .await;
    let (status, _) = call(&d, "GET", "/v1/accounts/alpha/chains", Some(token), None).await;
    assert_eq!(status, 401);
    admin(
        &d,
        "DELETE",
        &format!("/v1/accounts/alpha/tokens/{id}"),
        None,
        404,
    )
    .await;
}

/// `switchboard tokens create|list|revoke`, the CLI sending
/// `SWITCHBOARD_TOKEN`, and its one-line hint on a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_through_the_cli() {
    let d = Dispatcher::embedded();
    d.apply_chains("alpha.toml", &crate::util::poll_chains("alpha"))
        .await;
    d.apply_chains("beta.toml", &crate::util::poll_chains("beta"))
        .await;

    let out = d.cli(&["tokens", "create", "alpha", "--name", "ci"]).await;
    let text = out.ok();
    let token = text
        .lines()
        .find(|l| l.starts_with("sbt_"))
        .unwrap_or_else(|| panic!("no token printed:\n{text}"))
        .to_string();
    assert!(text.contains("only time it is shown"), "{text}");
    let created = d.cli(&["tokens", "create", "alpha", "--json"]).await.json();
    assert!(created["token"].as_str().unwrap().starts_with("sbt_"));

    let listed = d.cli(&["tokens", "list", "alpha", "--json"]).await.json();
    let tokens = listed["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{listed}");
    assert_eq!(tokens[0]["name"], "ci");
    assert!(tokens.iter().all(|t| t.get("token").is_none()), "{listed}");
    let text = d.cli(&["tokens", "list", "alpha"]).await.ok().to_string();
    assert!(text.contains("ci") && !text.contains("sbt_"), "{text}");
    let id = tokens[0]["id"].as_str().unwrap().to_string();

    // The account token works for its account through the CLI, and finds
    // nothing of another.
    let out = d.cli_as(Some(&token), &["chains", "list", "alpha"]).await;
    assert!(out.ok().contains("poll-complete"), "{}", out.stdout);
    let line = d
        .cli_as(Some(&token), &["chains", "list", "beta"])
        .await
        .fails()
        .to_string();
    assert!(line.contains("HTTP 404"), "{line}");
    let line = d
        .cli_as(Some(&token), &["tokens", "list", "alpha"])
        .await
        .fails()
        .to_string();
    assert!(line.contains("admin token"), "{line}");

    // Without a token, or with a bad one: one line that says what to do.
    let line = d
        .cli_as(None, &["chains", "list", "alpha"])
        .await
        .fails()
        .to_string();
    assert!(
        line.contains("HTTP 401") && line.contains("SWITCHBOARD_TOKEN"),
        "{line}"
    );
    let line = d
        .cli_as(Some("sbt_wrong"), &["chains", "list", "alpha"])
        .await
        .fails()
        .to_string();
    assert!(
        line.contains("HTTP 401") && line.contains("SWITCHBOARD_TOKEN"),
        "{line}"
    );
    assert!(!line.contains("sbt_wrong"), "{line}");

    let out = d.cli(&["tokens", "revoke", "alpha", &id]).await;
    assert!(out.ok().contains("revoked"), "{}", out.stdout);
    let line = d
        .cli_as(Some(&token), &["chains", "list", "alpha"])
        .await
        .fails()
        .to_string();
    assert!(line.contains("HTTP 401"), "{line}");
    let line = d
        .cli(&["tokens", "revoke", "alpha", &id])
        .await
        .fails()
        .to_string();
    assert!(line.contains("HTTP 404"), "{line}");
    assert!(!d.log().contains(&token), "the token is in the log");
}

/// Without a configured admin token, `run` makes one at first start, in a
/// file only its owner can read, logs where (never the token) and reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_generates_an_admin_token_once() {
    let mut d = Dispatcher::with_generated_admin_token();
    let path = d.data_dir().join("admin-token");
    let token = d.admin_token().to_string();
    assert!(token.starts_with("sba_"), "{token}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    let (status, _) = d.get("/v1/accounts").await;
    assert_eq!(status, 200);
    let (status, _) = call(&d, "GET", "/v1/accounts", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 401, "only the generated token is the admin's");

    d.restart();
    assert_eq!(d.admin_token(), token, "the token is reused");
    let (status, _) = d.get("/v1/accounts").await;
    assert_eq!(status, 200);
    let log = d.log();
    assert!(log.contains(&path.display().to_string()), "{log}");
    assert!(
        !log.contains(&token),
        "the admin token is in the log:\n{log}"
    );
}

/// A configured admin token that is too short stops start-up, without
/// repeating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_admin_token_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, "[http]\nadmin_token = \"short\"\n").unwrap();
    let out = crate::util::switchboard(&[
        "run",
        "--data",
        dir.path().join("data").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
    ])
    .await;
    let line = out.fails();
    assert!(line.contains("admin token"), "{line}");
    assert!(!line.contains("\"short\""), "{line}");
}

/// `examples/nats-server.conf`, as shipped, on a real nats-server: the
/// dispatcher works as its user; a worker publishes its own account's
/// events and nothing else, and cannot read the events the dispatcher pulls;
/// a transport worker takes its SMS commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_nats_config_confines_each_worker_to_its_account() {
    use futures::StreamExt as _;
    use switchboard_sdk::nats::NatsEmitter;

    // The example as shipped, but storing in a temporary directory.
    let example = crate::util::read(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nats-server.conf"),
    );
    let store = tempfile::tempdir().unwrap();
    let shipped_store = "store_dir: \"nats-data\"";
    assert!(
        example.contains(shipped_store),
        "the example's store_dir moved"
    );
    let config = store.path().join("nats-server.conf");
    std::fs::write(
        &config,
        example.replace(
            shipped_store,
            &format!("store_dir: {:?}", store.path().join("js")),
        ),
    )
    .unwrap();
    let nats = NatsServer::with_config(&config);
    let with_user = |user: &str, password: &str| {
        nats.url()
            .replacen("nats://", &format!("nats://{user}:{password}@"), 1)
    };
    let d = Dispatcher::nats_url(
        &with_user("dispatcher", "change-me-dispatcher"),
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
config = { provider = "smsc", to = "{{ event.event_data.msisdn }}", body = "hello" }
"#,
    )
    .await;

    // Someone with a worker's password trying to read what the dispatcher
    // pulls (its inbox) or what workers publish: refused, so nothing arrives.
    let sniffer = async_nats::ConnectOptions::with_user_and_password(
        "acme-survey".into(),
        "change-me-acme".into(),
    )
    .connect(nats.url())
    .await
    .expect("acme's worker connects");
    let mut sniffed = futures::stream::select(
        sniffer.subscribe("_INBOX.>").await.unwrap(),
        sniffer.subscribe("vumi.>").await.unwrap(),
    );
    sniffer.flush().await.unwrap();

    let worker = async_nats::ConnectOptions::with_user_and_password(
        "acme-survey".into(),
        "change-me-acme".into(),
    )
    .custom_inbox_prefix("_INBOX_acme-survey")
    .connect(nats.url())
    .await
    .expect("acme's worker connects");
    let emitter = NatsEmitter::new(worker).with_attempts(1);
    let own = crate::util::event(
        "acme",
        "survey",
        "notify",
        "c1",
        json!({"msisdn": "+27820000005"}),
    );
    emitter
        .emit(&own)
        .await
        .expect("acme's worker publishes acme's events");
    let trace = d.wait_for_trace("acme", &own.id.to_string(), TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");

    let other = crate::util::event(
        "globex",
        "survey",
        "notify",
        "c1",
        json!({"msisdn": "+27820000006"}),
    );
    let refused = emitter.emit(&other).await;
    assert!(refused.is_err(), "acme's worker published a globex event");

    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), sniffed.next())
            .await
            .is_err(),
        "a worker read someone else's messages"
    );

    // The transport worker takes the SMS command from VUMI_OUTBOUND.
    let transport = async_nats::ConnectOptions::with_user_and_password(
        "smsc-transport".into(),
        "change-me-smsc".into(),
    )
    .custom_inbox_prefix("_INBOX_smsc-transport")
    .connect(nats.url())
    .await
    .expect("the transport worker connects");
    let js = async_nats::jetstream::new(transport);
    let stream = js.get_stream("VUMI_OUTBOUND").await.expect("stream info");
    let consumer = stream
        .get_or_create_consumer(
            "smsc",
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("smsc".into()),
                filter_subject: "vumi.outbound.smsc".into(),
                ..Default::default()
            },
        )
        .await
        .expect("the transport worker's consumer");
    let mut messages = consumer.fetch().max_messages(1).messages().await.unwrap();
    let message = tokio::time::timeout(TIMEOUT, messages.next())
        .await
        .expect("a command in time")
        .expect("a command")
        .expect("a message");
    let command: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(command["to_addr"], "+27820000005", "{command}");
    message.ack().await.expect("the transport worker acks");

    // ... and the server says why.
    let log = nats.log();
    for violation in [
        "Publish Violation - Subject \"vumi.events.globex.",
        "Subscription Violation - Subject \"_INBOX.>\"",
        "Subscription Violation - Subject \"vumi.>\"",
    ] {
        assert!(log.contains(violation), "no {violation:?} in:\n{log}");
    }
    // The globex event never reached the dispatcher.
    assert!(d.trace("globex", &other.id.to_string()).await.is_none());
    assert!(
        !d.log().contains("change-me-dispatcher"),
        "the NATS password is in the log"
    );
}

/// Regression: a secret set (or removed) through the API was answered
/// before it reached the disk, so a crash right after lost it although the
/// caller had been told it was set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_set_or_removed_through_the_api_survive_a_crash_right_after() {
    let mut d = Dispatcher::embedded();
    let names = |body: Value| -> Vec<String> {
        body["secrets"]
            .as_array()
            .unwrap_or_else(|| panic!("a list of secrets: {body}"))
            .iter()
            .map(|s| s.as_str().expect("a secret's name").to_string())
            .collect()
    };
    for name in ["gateway", "mailer"] {
        d.set_secret("acme", name, "whsec_c2VjcmV0").await;
    }
    d.kill9();
    d.restart();
    let (status, body) = d.get("/v1/accounts/acme/secrets").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(body), ["gateway", "mailer"]);

    d.cli(&["secrets", "rm", "acme", "mailer"]).await.ok();
    d.kill9();
    d.restart();
    let (_, body) = d.get("/v1/accounts/acme/secrets").await;
    assert_eq!(names(body), ["gateway"]);
}

const NOTIFY_CHAINS: &str = r#"
[[chains]]
name = "notify"
event_type = "signed_up"

[[chains.steps]]
handler = "notify"
config = { to = "{{ event.event_data.user }}", body = "Hello {{ event.event_data.user }}" }
"#;

/// Receiver tokens in the isolation matrix: on each receiver route, the
/// receiver's own token (200), another receiver's of the same account and
/// the same receiver's of another account (never the first one's
/// notifications: 404 for it by id, their own in listings), and an
/// expired, a forged and no token (401); the admin and account tokens get
/// 403 there. A receiver token on any account route: 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_token_matrix() {
    let d = Dispatcher::embedded();
    for account in ["alpha", "beta"] {
        d.apply_chains(
            &format!("{account}.toml"),
            &format!("account_key = \"{account}\"\n{NOTIFY_CHAINS}"),
        )
        .await;
    }
    for (account, user) in [("alpha", "ann"), ("alpha", "bob"), ("beta", "ann")] {
        let id = d
            .post_event(&json!({"account_key": account, "conversation_key": "c",
                "conversation_type": "web", "event_type": "signed_up",
                "event_data": {"user": user}}))
            .await;
        let trace = d.wait_for_trace(account, &id, TIMEOUT).await;
        assert_eq!(trace["status"], "done", "{trace:#}");
    }
    let mint = |account: &'static str, receiver: &'static str, ttl: &'static str| {
        let d = &d;
        async move {
            let minted = admin(
                d,
                "POST",
                &format!("/v1/accounts/{account}/inbox/{receiver}/token"),
                Some(&format!(r#"{{"ttl": "{ttl}"}}"#)),
                201,
            )
            .await;
            assert_eq!(minted["receiver"], receiver, "{minted}");
            minted["token"].as_str().unwrap().to_string()
        }
    };
    let expired = mint("alpha", "ann", "1s").await;
    let own = mint("alpha", "ann", "1h").await;
    let other_receiver = mint("alpha", "bob", "1h").await;
    let other_account = mint("beta", "ann", "1h").await;
    // The same claims, saying bob, under ann's signature.
    let forged = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (signed, mac) = own.rsplit_once('.').unwrap();
        let claims: Value =
            serde_json::from_slice(&b64.decode(signed.strip_prefix("sbr_").unwrap()).unwrap())
                .unwrap();
        let mut claims = claims;
        claims["r"] = json!("bob");
        format!("sbr_{}.{mac}", b64.encode(claims.to_string()))
    };
    let alpha_token = admin(&d, "POST", "/v1/accounts/alpha/tokens", None, 201).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let ann_note =
        admin(&d, "GET", "/v1/accounts/alpha/inbox/ann", None, 200).await["notifications"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;

    // Listings and counts: each token its own receiver's, nobody else's.
    for (token, account, receiver) in [
        (&own, "alpha", "ann"),
        (&other_receiver, "alpha", "bob"),
        (&other_account, "beta", "ann"),
    ] {
        let (status, list) = call(&d, "GET", "/v1/inbox", Some(token), None).await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(
            (&list["account_key"], &list["receiver"], &list["total"]),
            (&json!(account), &json!(receiver), &json!(1)),
            "{list}"
        );
        let body = format!("Hello {receiver}");
        assert_eq!(list["notifications"][0]["content"]["body"], body.as_str());
        assert_eq!(
            list["notifications"][0]["id"] == ann_note.as_str(),
            token == &own,
            "{list}"
        );
        let (status, count) = call(&d, "GET", "/v1/inbox/count", Some(token), None).await;
        assert_eq!(
            (status, count),
            (200, json!({"unread": 1, "total": 1})),
            "{receiver} of {account}"
        );
    }

    // Ann's notification by id: only ann of alpha reaches it.
    let read = format!("/v1/inbox/{ann_note}/read");
    for token in [&other_receiver, &other_account] {
        let (status, answer) = call(&d, "POST", &read, Some(token), None).await;
        assert_eq!(status, 404, "{answer}");
        assert_eq!(answer["error"]["code"], "not_found", "{answer}");
    }
    let answer = admin(&d, "GET", "/v1/accounts/alpha/inbox/ann", None, 200).await;
    assert_eq!(answer["unread"], 1, "nobody else read it: {answer}");
    let (status, answer) = call(&d, "POST", &read, Some(&own), None).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["read_at"].is_string(), "{answer}");

    // Expired, forged, none: 401 on every receiver route; the admin and
    // account tokens: 403 there.
    let receiver_routes = [
        ("GET", "/v1/inbox".to_string()),
        ("GET", "/v1/inbox/count".to_string()),
        ("POST", "/v1/inbox/read_all".to_string()),
        ("POST", read.clone()),
        ("GET", "/v1/inbox/stream".to_string()),
    ];
    for (method, path) in &receiver_routes {
        for (who, token) in [
            ("expired", Some(expired.as_str())),
            ("forged", Some(forged.as_str())),
            ("none", None),
        ] {
            let (status, answer) = call(&d, method, path, token, None).await;
            assert_eq!(status, 401, "{who} on {method} {path}: {answer}");
            assert_eq!(answer["error"]["code"], "unauthorized", "{answer}");
        }
        for token in [ADMIN_TOKEN, alpha_token.as_str()] {
            let (status, answer) = call(&d, method, path, Some(token), None).await;
            assert_eq!(status, 403, "{method} {path}: {answer}");
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("receiver token"),
                "{answer}"
            );
        }
        let (status, _) = call(&d, method, path, Some(&own), None).await;
        assert_eq!(status, 200, "own on {method} {path}");
    }

    // A receiver token on the account routes, its own account's included:
    // 401, whatever the route.
    let fixture = Fixture {
        account: "alpha".into(),
        token: String::new(),
        spare_token_id: "none".into(),
        event_id: "0190d0b6-3c4e-7f00-8000-000000000000".into(),
        contact_key: "ann".into(),
        message_id: "none".into(),
        number: "+27830000009".into(),
        dead_letters: ["a".into(), "b".into(), "c".into()],
        receiver: "ann".into(),
        notification_id: ann_note.clone(),
    };
    for row in matrix() {
        let path = (row.path)(&fixture);
        let (status, answer) = call(&d, row.method, &path, Some(&own), (row.body)(&fixture)).await;
        assert_eq!(
            status, 401,
            "ann's token on {} {path}: {answer}",
            row.method
        );
    }
    for (method, path) in [
        ("POST", "/v1/events"),
        ("GET", "/v1/accounts"),
        ("GET", "/v1/handlers"),
    ] {
        let (status, _) = call(&d, method, path, Some(&own), Some("{}".into())).await;
        assert_eq!(status, 401, "{method} {path}");
    }

    // Rotating the account's key ends its receiver tokens, not another's.
    admin(
        &d,
        "POST",
        "/v1/accounts/alpha/inbox-tokens/rotate",
        None,
        200,
    )
    .await;
    for token in [&own, &other_receiver] {
        let (status, _) = call(&d, "GET", "/v1/inbox", Some(token), None).await;
        assert_eq!(status, 401);
    }
    let (status, _) = call(&d, "GET", "/v1/inbox", Some(&other_account), None).await;
    assert_eq!(status, 200);

    let log = d.log();
    for secret in [&own, &other_receiver, &other_account] {
        assert!(
            !log.contains(secret.as_str()),
            "a receiver token is in the log"
        );
    }
}

/// A live tail stream lasts only while its token does: revoked, the stream
/// ends (within the stream's check interval); another token's stream goes
/// on past the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_tokens_open_tail_stream_ends() {
    use std::time::{Duration, Instant};
    let d = Dispatcher::embedded();
    d.apply_chains("alpha.toml", &crate::util::poll_chains("alpha"))
        .await;
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let created = d.cli(&["tokens", "create", "alpha", "--json"]).await.json();
        tokens.push((
            created["token"].as_str().unwrap().to_string(),
            created["id"].as_str().unwrap().to_string(),
        ));
    }
    let open = |token: String| {
        let url = format!("{}/v1/accounts/alpha/events/stream", d.url());
        async move {
            let response = crate::util::http_client(Some(&token))
                .get(url)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response
        }
    };
    let (mut revoked, mut kept) = (
        open(tokens[0].0.clone()).await,
        open(tokens[1].0.clone()).await,
    );
    let kept_opened = Instant::now();
    // Live: a row of an event posted now comes.
    row_comes(&d, &mut revoked, "c-0", "before the revocation").await;
    let out = d.cli(&["tokens", "revoke", "alpha", &tokens[0].1]).await;
    assert!(out.ok().contains("revoked"), "{}", out.stdout);
    let since = Instant::now();
    // Events keep coming meanwhile.
    let posting = async {
        loop {
            d.post_event(&poll_event("c-1")).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let reading = async { while let Ok(Some(_)) = revoked.chunk().await {} };
    tokio::select! {
        _ = reading => {}
        _ = posting => unreachable!(),
        _ = tokio::time::sleep(TIMEOUT) => panic!("the stream stayed open after its token was revoked"),
    };
    assert!(
        since.elapsed() <= switchboard_http::api::tail::RECHECK + Duration::from_secs(2),
        "ended {:?} after the revocation",
        since.elapsed()
    );
    // The other token's stream was checked too, and is still open: a row
    // of an event posted now comes.
    let checked = kept_opened + switchboard_http::api::tail::RECHECK + Duration::from_millis(500);
    tokio::time::sleep_until(checked.into()).await;
    row_comes(&d, &mut kept, "c-2", "on the live token's stream").await;
}

/// An event of alpha's poll chains in `conversation`.
fn poll_event(conversation: &str) -> Value {
    json!({"account_key": "alpha", "conversation_key": conversation,
        "conversation_type": "survey", "event_type": "poll_complete",
        "event_data": {"msisdn": "+27820000001", "score": 4}})
}

/// Posts an event in `conversation` and reads `stream` until its row
/// comes; fails naming `when` if it does not.
async fn row_comes(d: &Dispatcher, stream: &mut reqwest::Response, conversation: &str, when: &str) {
    let posted = d.post_event(&poll_event(conversation)).await;
    let mut text = String::new();
    tokio::time::timeout(TIMEOUT, async {
        while !text.contains(&posted) {
            let chunk = stream.chunk().await.unwrap().expect("the stream is open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no row of {posted} {when}: {text:?}"));
}
