//! The path of each endpoint, for clients: `paths::chains("acme")` is
//! `/v1/accounts/acme/chains`. Every argument is one path segment and is
//! percent-encoded (a msisdn's `+`, an e-mail's `@`, a `/` in a name), so a
//! value can never reach another route. The server declares the same routes
//! as templates (`/v1/accounts/{account}/chains`); a test of the server
//! checks that every path built here matches one of them.

use std::fmt::Write as _;

/// `s` as one path segment: everything but RFC 3986's unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) percent-encoded.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn account_path(account: &str, tail: &str) -> String {
    format!("/v1/accounts/{}/{tail}", segment(account))
}

/// `GET /healthz`.
pub fn healthz() -> String {
    "/healthz".to_string()
}

/// `GET /readyz`.
pub fn readyz() -> String {
    "/readyz".to_string()
}

/// `GET /v1/handlers`: the built-in handlers and their options.
pub fn handlers() -> String {
    "/v1/handlers".to_string()
}

/// `GET /v1/accounts/{account}/handlers`: the built-in handlers and the
/// account's scripts.
pub fn account_handlers(account: &str) -> String {
    account_path(account, "handlers")
}

/// `GET /v1/accounts/{account}/event-kinds`: the kinds of event the account
/// has had.
pub fn event_kinds(account: &str) -> String {
    account_path(account, "event-kinds")
}

/// `GET /v1/accounts/{account}/events`: the account's events, the latest
/// first.
pub fn events_of(account: &str) -> String {
    account_path(account, "events")
}

/// `POST /v1/accounts/{account}/events/{id}/rerun`: the event again, as a
/// new one.
pub fn event_rerun(account: &str, id: &str) -> String {
    account_path(account, &format!("events/{}/rerun", segment(id)))
}

/// `GET /v1/accounts/{account}/events/stream`: the live tail (Server-Sent
/// Events, [`crate::events::EventRow`]s).
pub fn event_stream(account: &str) -> String {
    account_path(account, "events/stream")
}

/// `GET /metrics` (Prometheus text, not JSON).
pub fn metrics() -> String {
    "/metrics".to_string()
}

/// `POST /v1/events`.
pub fn events() -> String {
    "/v1/events".to_string()
}

/// `GET /v1/accounts`.
pub fn accounts() -> String {
    "/v1/accounts".to_string()
}

/// `GET`, `PUT`, `DELETE` an account's chains.
pub fn chains(account: &str) -> String {
    account_path(account, "chains")
}

/// `GET`, `DELETE` one chain.
pub fn chain(account: &str, name: &str) -> String {
    account_path(account, &format!("chains/{}", segment(name)))
}

/// `GET` the versions of an account's chains.
pub fn chain_versions(account: &str) -> String {
    account_path(account, "chain-versions")
}

/// `GET` one version of an account's chains.
pub fn chain_version(account: &str, version: u64) -> String {
    account_path(account, &format!("chain-versions/{version}"))
}

/// `POST`: restore a version of an account's chains as a new version.
pub fn chain_version_restore(account: &str, version: u64) -> String {
    account_path(account, &format!("chain-versions/{version}/restore"))
}

/// `POST` a sample event for a dry run of an account's chains.
pub fn chain_test(account: &str) -> String {
    account_path(account, "chain-test")
}

/// `GET` an account's scripts.
pub fn scripts(account: &str) -> String {
    account_path(account, "scripts")
}

/// `GET`, `PUT`, `DELETE` one script.
pub fn script(account: &str, name: &str) -> String {
    account_path(account, &format!("scripts/{}", segment(name)))
}

/// `GET` the versions of a script.
pub fn script_versions(account: &str, name: &str) -> String {
    account_path(account, &format!("scripts/{}/versions", segment(name)))
}

/// `POST` a sample event for a dry run of a script.
pub fn script_test(account: &str, name: &str) -> String {
    account_path(account, &format!("scripts/{}/test", segment(name)))
}

/// `GET` an account's pending timers (chains paused by a `delay` step).
pub fn timers(account: &str) -> String {
    account_path(account, "timers")
}

/// `GET` an account's event and inbound counts since this replica started.
pub fn counts(account: &str) -> String {
    account_path(account, "counts")
}

/// `GET` an account's message templates.
pub fn templates(account: &str) -> String {
    account_path(account, "templates")
}

/// `GET`, `PUT`, `DELETE` one message template.
pub fn template(account: &str, slug: &str) -> String {
    account_path(account, &format!("templates/{}", segment(slug)))
}

/// `GET` the versions of a message template.
pub fn template_versions(account: &str, slug: &str) -> String {
    account_path(account, &format!("templates/{}/versions", segment(slug)))
}

/// `POST` a context and a recipient to render a message template with.
pub fn template_test(account: &str, slug: &str) -> String {
    account_path(account, &format!("templates/{}/test", segment(slug)))
}

/// `GET` the trace of an event.
pub fn trace(account: &str, event_id: &str) -> String {
    account_path(account, &format!("events/{}/trace", segment(event_id)))
}

/// `GET` an account's contacts.
pub fn contacts(account: &str) -> String {
    account_path(account, "contacts")
}

/// `GET` a contact by its key, msisdn or e-mail.
pub fn contact(account: &str, key: &str) -> String {
    account_path(account, &format!("contacts/{}", segment(key)))
}

/// `GET` the messages an account's chains sent.
pub fn messages(account: &str) -> String {
    account_path(account, "messages")
}

/// `GET` or `PUT` the preferences of a contact (by key, msisdn or e-mail)
/// or an address.
pub fn preferences(account: &str, contact: &str) -> String {
    account_path(account, &format!("preferences/{}", segment(contact)))
}

/// `GET` one message.
pub fn message(account: &str, id: &str) -> String {
    account_path(account, &format!("messages/{}", segment(id)))
}

/// `POST` to cancel a scheduled message before it goes.
pub fn message_cancel(account: &str, id: &str) -> String {
    account_path(account, &format!("messages/{}/cancel", segment(id)))
}

/// `GET` the inbound records of an account that matched nothing.
pub fn unmatched(account: &str) -> String {
    account_path(account, "messages/unmatched")
}

/// `GET` an account's inbound webhooks.
pub fn inbound_hooks(account: &str) -> String {
    account_path(account, "inbound")
}

/// `GET`, `POST` (create), `DELETE` (revoke) an account's inbound webhook
/// of `provider`.
pub fn inbound_hook(account: &str, provider: &str) -> String {
    account_path(account, &format!("inbound/{}", segment(provider)))
}

/// `GET` a receiver's in-app notifications.
pub fn inbox(account: &str, receiver: &str) -> String {
    account_path(account, &format!("inbox/{}", segment(receiver)))
}

/// `GET` a receiver's counts.
pub fn inbox_count(account: &str, receiver: &str) -> String {
    format!("{}/count", inbox(account, receiver))
}

/// `POST` marks all of a receiver's notifications read.
pub fn inbox_read_all(account: &str, receiver: &str) -> String {
    format!("{}/read_all", inbox(account, receiver))
}

/// `POST` marks one of a receiver's notifications (`read`, `unread`,
/// `archive`, `unarchive`).
pub fn inbox_mark(account: &str, receiver: &str, id: &str, mark: &str) -> String {
    format!(
        "{}/{}/{}",
        inbox(account, receiver),
        segment(id),
        segment(mark)
    )
}

/// `POST` mints a receiver token.
pub fn inbox_token(account: &str, receiver: &str) -> String {
    format!("{}/token", inbox(account, receiver))
}

/// `POST` ends every receiver token of the account.
pub fn inbox_tokens_rotate(account: &str) -> String {
    account_path(account, "inbox-tokens/rotate")
}

/// `GET` the inbox of the receiver token's person (`/v1/inbox`).
pub fn own_inbox() -> String {
    "/v1/inbox".to_string()
}

/// `GET` the counts of the receiver token's inbox.
pub fn own_inbox_count() -> String {
    "/v1/inbox/count".to_string()
}

/// `POST` marks all of the receiver token's notifications read.
pub fn own_inbox_read_all() -> String {
    "/v1/inbox/read_all".to_string()
}

/// `POST` marks one of the receiver token's notifications.
pub fn own_inbox_mark(id: &str, mark: &str) -> String {
    format!("/v1/inbox/{}/{}", segment(id), segment(mark))
}

/// `GET` the receiver token's inbox live (Server-Sent Events).
pub fn own_inbox_stream() -> String {
    "/v1/inbox/stream".to_string()
}

/// `GET` the inbox web component.
pub fn inbox_widget() -> String {
    "/inbox/widget.js".to_string()
}

/// `GET` an account's files.
pub fn files(account: &str) -> String {
    account_path(account, "files")
}

/// `GET`, `PUT` or `DELETE` one of an account's files.
pub fn file(account: &str, name: &str) -> String {
    account_path(account, &format!("files/{}", segment(name)))
}

/// `GET` the addresses an account owns, which replies are sent to.
pub fn numbers(account: &str) -> String {
    account_path(account, "numbers")
}

/// `PUT` (add) or `DELETE` an address an account owns on a transport.
pub fn number(account: &str, transport: &str, address: &str) -> String {
    account_path(
        account,
        &format!("numbers/{}/{}", segment(transport), segment(address)),
    )
}

/// A one-click unsubscribe link's path (the link's signed `token`).
pub fn unsubscribe(account: &str, token: &str) -> String {
    format!("/v1/unsubscribe/{}/{}", segment(account), segment(token))
}

/// `POST`: where a provider posts (the URL that creating a hook answers).
pub fn inbound_receive(account: &str, provider: &str, secret: &str) -> String {
    format!(
        "/v1/inbound/{}/{}/{}",
        segment(account),
        segment(provider),
        segment(secret)
    )
}

/// `POST`: where Twilio posts the status callbacks of `account`'s
/// messages (a Twilio provider's `status_callback` with `{account}`).
pub fn twilio_status(account: &str) -> String {
    format!("/v1/inbound/twilio-status/{}", segment(account))
}

/// `POST`: where SendGrid's Signed Event Webhook posts for a SendGrid
/// account that several accounts send through.
pub fn sendgrid_events() -> String {
    "/v1/inbound/sendgrid-events".to_string()
}

/// `GET` the names of an account's secrets.
pub fn secrets(account: &str) -> String {
    account_path(account, "secrets")
}

/// `PUT`, `DELETE` one secret.
pub fn secret(account: &str, name: &str) -> String {
    account_path(account, &format!("secrets/{}", segment(name)))
}

/// `GET` an account's dead letters (`~unknown` for poison of no account).
pub fn dead_letters(account: &str) -> String {
    account_path(account, "dead-letters")
}

/// `POST` a filter: replay an account's dead letters.
pub fn dead_letters_replay(account: &str) -> String {
    account_path(account, "dead-letters/replay")
}

/// `GET`, `DELETE` (discard) one dead letter.
pub fn dead_letter(account: &str, id: &str) -> String {
    account_path(account, &format!("dead-letters/{}", segment(id)))
}

/// `POST`: replay one dead letter.
pub fn dead_letter_replay(account: &str, id: &str) -> String {
    account_path(account, &format!("dead-letters/{}/replay", segment(id)))
}

/// `GET`, `POST` (create) an account's tokens.
pub fn tokens(account: &str) -> String {
    account_path(account, "tokens")
}

/// `DELETE` (revoke) one token.
pub fn token(account: &str, id: &str) -> String {
    account_path(account, &format!("tokens/{}", segment(id)))
}

/// Every path function, called with sample arguments: what the server's
/// test matches against its route table.
pub fn samples() -> Vec<String> {
    let (a, n) = ("acme", "a name/with+odd@chars");
    vec![
        healthz(),
        readyz(),
        metrics(),
        events(),
        accounts(),
        handlers(),
        account_handlers(a),
        event_kinds(a),
        counts(a),
        timers(a),
        events_of(a),
        event_rerun(a, "0190d0b6-3c4e-7f00-8000-000000000000"),
        event_stream(a),
        chains(a),
        chain(a, n),
        chain_versions(a),
        chain_version(a, 3),
        chain_version_restore(a, 3),
        chain_test(a),
        scripts(a),
        script(a, n),
        script_versions(a, n),
        script_test(a, n),
        templates(a),
        template(a, n),
        template_versions(a, n),
        template_test(a, n),
        trace(a, "0190d0b6-3c4e-7f00-8000-000000000000"),
        contacts(a),
        contact(a, "+27820000001"),
        preferences(a, "ann@example.org"),
        messages(a),
        message(a, n),
        message_cancel(a, n),
        unmatched(a),
        inbound_hooks(a),
        inbound_hook(a, "sendgrid"),
        inbound_receive(a, "sendgrid", "s3cr3t"),
        twilio_status(a),
        sendgrid_events(),
        unsubscribe(a, "payload.mac"),
        numbers(a),
        files(a),
        inbox(a, "ann"),
        inbox_count(a, "ann"),
        inbox_read_all(a, "ann"),
        inbox_mark(a, "ann", n, "read"),
        inbox_token(a, "ann"),
        inbox_tokens_rotate(a),
        own_inbox(),
        own_inbox_count(),
        own_inbox_read_all(),
        own_inbox_mark(n, "archive"),
        own_inbox_stream(),
        inbox_widget(),
        file(a, "invoice.pdf"),
        number(a, "twilio", "+27820000001"),
        secrets(a),
        secret(a, n),
        dead_letters("~unknown"),
        dead_letters_replay(a),
        dead_letter(a, n),
        dead_letter_replay(a, n),
        tokens(a),
        token(a, n),
    ]
}
