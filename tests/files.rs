//! Files and attachments: an account's files — kept in the store on the
//! embedded bus, in a JetStream object store on NATS — attached to e-mails
//! by name, arriving intact; and every way a file can be refused.

use serde_json::json;

use crate::peers::SmtpSink;
use crate::util::{Dispatcher, NatsServer, TIMEOUT, wait_until};

/// A PDF of `size` bytes (its magic, then a pattern).
fn pdf(size: usize) -> Vec<u8> {
    let mut bytes = b"%PDF-1.7\n".to_vec();
    bytes.extend((0..size - bytes.len()).map(|i| (i * 31 % 251) as u8));
    bytes
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const CHAINS: &str = r#"
account_key = "acme"
[[chains]]
name = "invoice"
event_type = "invoice"
[[chains.steps]]
handler = "send_email"
config = { to = "ann@example.org", subject = "Invoice {{ event.event_data.invoice }}", text = "Attached.", attachments = ["invoice-{{ event.event_data.invoice }}.pdf", "terms.txt"] }
"#;

fn config(smtp: &SmtpSink) -> String {
    format!(
        "[files]\nmax_bytes = 400000\n\n[providers.email.sink]\nhost = \"127.0.0.1\"\nport = {}\n\
         security = \"none\"\nfrom = \"billing@example.org\"\n",
        smtp.port()
    )
}

/// Puts the invoice and the terms, sends invoice 42, and checks what
/// arrived and what its record says.
async fn attach_and_send(d: &Dispatcher, smtp: &SmtpSink, invoice: &[u8]) {
    let put = |name: &'static str, bytes: Vec<u8>| {
        let path = d.file(name, "");
        std::fs::write(&path, bytes).unwrap();
        async move {
            d.cli(&[
                "files",
                "put",
                "acme",
                name,
                path.to_str().unwrap(),
                "--json",
            ])
            .await
            .json()
        }
    };
    let stored = put("invoice-42.pdf", invoice.to_vec()).await;
    assert_eq!(
        (&stored["content_type"], &stored["size"], &stored["sha256"]),
        (
            &json!("application/pdf"),
            &json!(invoice.len()),
            &json!(sha256(invoice))
        ),
        "{stored:#}"
    );
    let terms = b"Pay within 30 days.\n".to_vec();
    put("terms.txt", terms.clone()).await;
    let listed = d.cli(&["files", "list", "acme"]).await;
    assert!(listed.ok().contains("invoice-42.pdf"), "{listed:?}");
    assert!(listed.ok().contains("text/plain"), "{listed:?}");

    d.apply_chains("acme.toml", CHAINS).await;
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "billing", "event_type": "invoice",
            "event_data": {"invoice": 42}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let mail = wait_until("the e-mail", TIMEOUT, || async {
        smtp.messages().into_iter().next()
    })
    .await;
    assert_eq!(mail["text"].as_str().unwrap().trim(), "Attached.");
    assert_eq!(
        mail["attachments"],
        json!([
            {"filename": "invoice-42.pdf", "content_type": "application/pdf",
             "size": invoice.len(), "sha256": sha256(invoice)},
            {"filename": "terms.txt", "content_type": "text/plain",
             "size": terms.len(), "sha256": sha256(&terms)},
        ]),
        "{mail:#}"
    );
    let message_id = trace["chains"][0]["steps"][0]["output"]["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let record = d
        .cli(&["messages", "show", "acme", &message_id])
        .await
        .json();
    assert_eq!(
        record["attachments"][0],
        json!({"name": "invoice-42.pdf", "content_type": "application/pdf",
               "size": invoice.len(), "sha256": sha256(invoice)}),
        "{record:#}"
    );

    // A file the account does not have fails the step for good, naming it;
    // nothing is sent.
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "billing", "event_type": "invoice",
            "event_data": {"invoice": 43}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    let step = &trace["chains"][0]["steps"][0];
    assert_eq!(step["outcome"], "failed", "{trace:#}");
    assert!(
        step["error"]
            .as_str()
            .unwrap()
            .contains("account acme has no file \"invoice-43.pdf\""),
        "{step:#}"
    );
    assert_eq!(smtp.messages().len(), 1);

    // Removed, it is gone.
    d.cli(&["files", "rm", "acme", "terms.txt"]).await.ok();
    let (status, _) = d.get("/v1/accounts/acme/files/terms.txt").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_attached_intact_on_the_embedded_bus() {
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &config(&smtp));
    attach_and_send(&d, &smtp, &pdf(20_000)).await;
}

/// On NATS the bytes live in a JetStream object store, in chunks: a file
/// larger than one chunk arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_attached_intact_from_the_object_store_on_nats() {
    let nats = NatsServer::start();
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(Some(&nats), &config(&smtp));
    attach_and_send(&d, &smtp, &pdf(300_000)).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let bucket = js.get_object_store("SWITCHBOARD_FILES").await.unwrap();
    let info = bucket.info("acme/invoice-42.pdf").await.unwrap();
    assert_eq!(info.size, 300_000);
    assert!(info.chunks > 1, "{info:?}");
}

/// A file that is not a plain name, too large, or of a type not allowed is
/// refused with the reason; a step naming a path is refused at apply.
#[tokio::test]
async fn files_that_cannot_be_kept_are_refused_with_the_reason() {
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &config(&smtp));
    let d = &d;
    let refused = |name: &'static str, bytes: Vec<u8>| {
        let path = d.file("upload", "");
        std::fs::write(&path, bytes).unwrap();
        async move {
            let out = d
                .cli(&["files", "put", "acme", name, path.to_str().unwrap()])
                .await;
            assert_ne!(out.code, Some(0), "{name}: {out:?}");
            out.stderr
        }
    };
    let why = refused("../etc.pdf", pdf(100)).await;
    assert!(why.contains("is not a file name"), "{why}");
    let why = refused("big.pdf", pdf(400_001)).await;
    assert!(
        why.contains("400001 bytes, over this deployment's limit of 400000"),
        "{why}"
    );
    let why = refused("tool.pdf", b"\x7fELF\x02\x01\x01\x00".to_vec()).await;
    assert!(
        why.contains(
            "\"tool.pdf\" is of a type not recognised, which this deployment does not keep"
        ),
        "{why}"
    );
    let (_, listed) = d.get("/v1/accounts/acme/files").await;
    assert_eq!(listed["files"], json!([]), "{listed:#}");

    let (status, answer) = d
        .request(
            reqwest::Method::PUT,
            "/v1/accounts/acme/chains",
            Some(d.admin_token()),
            Some(CHAINS.replace("\"terms.txt\"", "\"../terms.txt\"")),
        )
        .await;
    assert_eq!(status, 400, "{answer:#}");
    assert!(answer.to_string().contains("../terms.txt"), "{answer:#}");
}

/// A scheduled e-mail whose attachment is removed before its time fails
/// for good when its time comes, naming the file, and its message is
/// recorded `failed`: not left `scheduled`, as if still to go.
#[tokio::test]
async fn a_scheduled_email_whose_attachment_went_is_recorded_failed() {
    let smtp = SmtpSink::start();
    let d = Dispatcher::with_config(None, &config(&smtp));
    let path = d.file("terms.txt", "Pay within 30 days.\n");
    d.cli(&["files", "put", "acme", "terms.txt", path.to_str().unwrap()])
        .await
        .ok();
    d.apply_chains(
        "acme.toml",
        r#"
account_key = "acme"
[[chains]]
name = "reminder"
event_type = "reminder"
[[chains.steps]]
handler = "send_email"
config = { to = "ann@example.org", subject = "Terms", text = "Attached.", attachments = ["terms.txt"], scheduled_at = "{{ event.event_data.at }}" }
"#,
    )
    .await;
    let at = (time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(6))
        .replace_nanosecond(0)
        .expect("a whole second")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let id = d
        .post_event(&json!({"account_key": "acme", "conversation_key": "c",
            "conversation_type": "billing", "event_type": "reminder",
            "event_data": {"at": at}}))
        .await;
    let trace = d.wait_for_trace("acme", &id, TIMEOUT).await;
    assert_eq!(trace["status"], "waiting", "{trace:#}");
    let message_id = trace["chains"][0]["steps"][0]["output"]["message_id"]
        .as_str()
        .expect("a message id")
        .to_string();
    d.cli(&["files", "rm", "acme", "terms.txt"]).await.ok();

    let trace = wait_until("the scheduled send", TIMEOUT, || async {
        d.trace("acme", &id)
            .await
            .filter(|t| t["status"] != "waiting")
    })
    .await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let record = d
        .cli(&["messages", "show", "acme", &message_id])
        .await
        .json();
    assert_eq!(record["status"], "failed", "{record:#}");
    let last = &record["transitions"][1];
    assert_eq!(last["from"], "scheduled", "{record:#}");
    let cause = last["cause"].as_str().unwrap_or_default();
    assert!(
        cause.starts_with("not sent: its step failed for good: ")
            && cause.contains("account acme has no file \"terms.txt\""),
        "{record:#}"
    );
    assert!(smtp.messages().is_empty());
}
