//! `switchboard demo`: the first thing a new user runs. The dispatcher on the
//! embedded bus, in a temporary data directory, with the example chains
//! applied, and local demo peers started in-process on 127.0.0.1:8090: a
//! payment gateway that verifies webhook signatures (`/payments`) and an SMS
//! gateway (`/sms`). A few sample events go through; what each chain did and
//! what the peers received is printed. The API keeps serving so the user can
//! emit more.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use switchboard_handlers::sms::{HttpSms, SmsProvider};
use switchboard_handlers::webhook;
use switchboard_sdk::{
    AccountKey, ConversationKey, ConversationType, EventId, EventType, VumiApiEvent,
};

use switchboard_engine::trace::{Trace, TraceStatus};
use switchboard_http::auth::AdminToken;
use switchboard_outbound::{EmailProvider, SmtpSecurity};

use crate::config::Config;
use crate::runtime::{Dispatcher, StartError};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder of chain files to apply; `None`: the example chains built
    /// into the binary ([`EXAMPLE_CHAINS`]), so that the demo runs from
    /// any directory.
    pub chains_dir: Option<PathBuf>,
    /// Where the API listens.
    pub listen: SocketAddr,
    /// Stop after printing the traces instead of serving on.
    pub once: bool,
}

/// Runs the demo, printing to stdout. Returns when interrupted (or at once with `once`).
pub async fn run(options: DemoOptions) -> Result<(), StartError> {
    let data = tempfile::Builder::new()
        .prefix("switchboard-demo-")
        .tempdir()
        .map_err(|e| StartError::ChainFile(format!("creating a temporary data directory: {e}")))?;
    let mut config = Config::default();
    config.store.data_dir = data.path().to_path_buf();
    config.http.listen = options.listen;
    // A fresh admin token per demo, printed for the commands below.
    let admin_token = AdminToken::generate().map_err(|e| StartError::Config(e.to_string()))?;
    config.http.admin_token = Some(admin_token.clone());
    let peers = DemoPeers::start(&mut config).await?;
    let chains_dir = match &options.chains_dir {
        Some(dir) => dir.clone(),
        None => write_example_chains(data.path())?,
    };
    let dispatcher =
        Dispatcher::start_with_secrets(config, Some(&chains_dir), DemoPeers::SECRETS).await?;
    let addr = dispatcher.local_addr();

    println!("Switchboard demo: the dispatcher on the embedded bus (no NATS needed).");
    println!(
        "data directory: {} (removed on exit)",
        data.path().display()
    );
    for applied in dispatcher.applied() {
        let path = match &options.chains_dir {
            Some(_) => applied.path.display().to_string(),
            None => format!(
                "examples/chains/{} (built in)",
                applied
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ),
        };
        println!(
            "applied {path} → account {} at chain version {}",
            applied.account,
            applied
                .version
                .map_or("(unchanged)".to_string(), |v| v.to_string())
        );
    }
    let account = dispatcher
        .applied()
        .first()
        .map(|a| a.account.clone())
        .unwrap_or_else(|| "acme".to_string());
    println!(
        "account {account}: webhook secret \"gateway\" set; demo peers on http://{PEERS_ADDR}"
    );

    let samples = [
        (
            "survey",
            "poll_complete",
            "poll-2026",
            json!({"msisdn": "+27 82 000 0001", "name": "Thandi", "email": "Thandi@Example.org", "score": 4}),
        ),
        (
            "survey",
            "poll_complete",
            "poll-2026",
            json!({"msisdn": "0027820000002", "name": "Sipho", "score": 2}),
        ),
        (
            "ussd",
            "menu_shown",
            "main-menu",
            json!({"msisdn": "+27820000003"}),
        ),
    ];
    for (ct, et, ck, data) in samples {
        let event = VumiApiEvent::new(
            AccountKey::new(account.clone()).expect("applied accounts are valid"),
            ConversationKey::new(ck).expect("a valid sample key"),
            ConversationType::new(ct).expect("a valid sample type"),
            EventType::new(et).expect("a valid sample type"),
            data.as_object().expect("samples are objects").clone(),
        );
        println!("\n── emitting {ct}/{et} {} {}", event.id, data);
        if let Err(e) = dispatcher.publish(&event).await {
            println!("publishing failed: {e}");
            continue;
        }
        print!("{}", show_lineage(&dispatcher, &account, event.id).await);
        for line in peers.peers.take() {
            println!("   ↳ {line}");
        }
    }

    println!("\nThe API is at http://{addr}. Emit more events and read their traces:");
    println!(
        "  export SWITCHBOARD_TOKEN={}   # this demo's admin token",
        admin_token.expose()
    );
    println!(
        "  switchboard emit --server http://{addr} {account} survey poll_complete --conversation poll-2026 --data '{{\"msisdn\": \"+27820000009\", \"name\": \"Lindiwe\", \"score\": 5}}'"
    );
    println!("  switchboard trace --server http://{addr} {account} <event id>");
    println!("  switchboard chains list --server http://{addr} {account}");
    if !options.once {
        println!(
            "\nThe console: {} (signs you in once, within ten minutes; then http://{addr}/console \
             with the admin token)",
            dispatcher.console_sign_in_link()
        );
        println!("Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    dispatcher.shutdown().await;
    Ok(())
}

/// Waits for the trace of `id` and of every event it led to, and renders them.
async fn show_lineage(dispatcher: &Dispatcher, account: &str, id: EventId) -> String {
    let mut out = String::new();
    let mut pending = vec![id];
    while let Some(id) = pending.pop() {
        match wait_for_trace(dispatcher, account, id, Duration::from_secs(10)).await {
            Some(trace) => {
                let _ = writeln!(out, "{}", indent(&crate::cli::render_trace(&trace)));
                pending.extend(trace.children.iter().rev());
            }
            None => {
                let _ = writeln!(out, "  (event {id} was not handled within 10 s)");
            }
        }
    }
    out
}

async fn wait_for_trace(
    dispatcher: &Dispatcher,
    account: &str,
    id: EventId,
    limit: Duration,
) -> Option<Trace> {
    let account = switchboard_sdk::AccountKey::new(account).ok()?;
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(trace)) = dispatcher.traces().get(&account, &id)
            && trace.status != TraceStatus::Running
        {
            return Some(trace);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("   {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The example chains (`examples/chains/`), built into the binary: file
/// name and contents.
pub const EXAMPLE_CHAINS: &[(&str, &str)] =
    &[("acme.toml", include_str!("../../examples/chains/acme.toml"))];

/// Writes [`EXAMPLE_CHAINS`] into a folder under `data`; returns it.
fn write_example_chains(data: &Path) -> Result<PathBuf, StartError> {
    let dir = data.join("example-chains");
    let failed = |e: std::io::Error| {
        StartError::ChainFile(format!(
            "writing the example chains to {}: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(&dir).map_err(failed)?;
    for (name, contents) in EXAMPLE_CHAINS {
        std::fs::write(dir.join(name), contents).map_err(failed)?;
    }
    Ok(dir)
}

/// Where the demo peers listen (the example chain's webhook URL points here).
pub const PEERS_ADDR: &str = "127.0.0.1:8090";
/// The demo account's webhook signing secret.
const DEMO_SECRET: &str = "whsec_c3dpdGNoYm9hcmQtZGVtby1zaWduaW5nLWtleQ==";

/// The peers the example chains deliver to, on loopback: a payment gateway
/// that verifies webhook signatures and an SMS gateway on [`PEERS_ADDR`],
/// and an SMTP sink on a free port. `switchboard demo` starts them, and so
/// does `switchboard run --demo-peers`, so that the example chains deliver.
#[derive(Debug, Clone)]
pub struct DemoPeers {
    peers: Peers,
}

impl DemoPeers {
    /// The secrets the peers expect each account to have: `gateway`, which
    /// the payment gateway checks webhook signatures with (see
    /// [`Dispatcher::start_with_secrets`]).
    pub const SECRETS: &[(&str, &str)] = &[("gateway", DEMO_SECRET)];

    /// Starts the peers and points `config` at them: SMS provider `gateway`,
    /// e-mail provider `mail` (both replaced if configured), and loopback
    /// allowed for account URLs (the example chain's webhook).
    pub async fn start(config: &mut Config) -> Result<Self, StartError> {
        let peers = Peers::start(PEERS_ADDR).await?;
        config.outbound.allow.push("127.0.0.1".into());
        config.providers.sms.insert(
            "gateway".into(),
            SmsProvider::Http(HttpSms {
                url: format!("http://{PEERS_ADDR}/sms"),
                from: Some("Switchboard".into()),
                token: None,
                timeout: None,
            }),
        );
        let smtp_port = peers.start_smtp().await?;
        config.providers.email.insert(
            "mail".into(),
            EmailProvider {
                host: "127.0.0.1".into(),
                port: Some(smtp_port),
                security: SmtpSecurity::None,
                username: None,
                password: None,
                from: Some("Switchboard demo <demo@switchboard.invalid>".into()),
                timeout_secs: Some(10),
                event_webhook_key: None,
            },
        );
        Ok(Self { peers })
    }

    /// What the peers received since the last call, a line each.
    pub fn take(&self) -> Vec<String> {
        self.peers.take()
    }

    /// Logs what the peers receive from now on, a line each (target
    /// `switchboard::demo_peers`).
    pub fn log_what_arrives(self) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                for line in self.take() {
                    tracing::info!(target: "switchboard::demo_peers", "{line}");
                }
            }
        });
    }
}

/// The demo's payment and SMS gateways; they note what they receive.
#[derive(Debug, Clone)]
struct Peers {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Peers {
    async fn start(addr: &str) -> Result<Self, StartError> {
        let peers = Self {
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            StartError::Config(format!(
                "the demo peers need {addr} (the example chain's webhook URL points there): {e}"
            ))
        })?;
        let app = Router::new()
            .route("/payments", post(payment))
            .route("/sms", post(sms))
            .with_state(peers.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(peers)
    }

    /// A minimal SMTP sink on a free loopback port: it accepts every message
    /// and notes its recipient and subject.
    async fn start_smtp(&self) -> Result<u16, StartError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| StartError::Config(format!("the demo SMTP sink could not listen: {e}")))?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let peers = self.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let peers = peers.clone();
                tokio::spawn(async move {
                    let _ = smtp_session(socket, &peers).await;
                });
            }
        });
        Ok(port)
    }

    fn note(&self, line: String) {
        self.seen.lock().expect("demo peers lock").push(line);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().expect("demo peers lock"))
    }
}

/// The payment gateway: checks the Standard Webhooks signature.
async fn payment(State(peers): State<Peers>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let id = header("webhook-id");
    let timestamp: i64 = header("webhook-timestamp").parse().unwrap_or_default();
    let expected = webhook::sign(DEMO_SECRET, &id, timestamp, &body).unwrap_or_default();
    let verified = header("webhook-signature")
        .split(' ')
        .any(|s| s == expected);
    let payload: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    peers.note(format!(
        "payment gateway received webhook {id} ({}): {payload}",
        if verified {
            "signature verified"
        } else {
            "BAD SIGNATURE"
        }
    ));
    if verified {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}

/// The SMS gateway: takes the message.
async fn sms(State(peers): State<Peers>, body: Bytes) -> (StatusCode, axum::Json<Value>) {
    let message: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    peers.note(format!(
        "SMS gateway received for {}: {:?}",
        message["to"].as_str().unwrap_or("?"),
        message["content"].as_str().unwrap_or("?")
    ));
    (
        StatusCode::OK,
        axum::Json(json!({"id": format!("demo-{}", uuid::Uuid::now_v7().simple())})),
    )
}

/// One SMTP session of the demo sink (RFC 5321's happy path, no extensions).
async fn smtp_session(socket: tokio::net::TcpStream, peers: &Peers) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 switchboard-demo ESMTP\r\n").await?;
    let mut to = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 switchboard-demo\r\n",
            "MAIL" | "RSET" | "NOOP" => b"250 OK\r\n",
            "RCPT" => {
                to.push(
                    line.split_once(':')
                        .map_or("?", |(_, a)| a.trim())
                        .trim_matches(['<', '>'])
                        .to_string(),
                );
                b"250 OK\r\n"
            }
            "DATA" => {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut subject = String::new();
                while let Some(body) = lines.next_line().await? {
                    if body == "." {
                        break;
                    }
                    if let Some(s) = body.strip_prefix("Subject: ") {
                        subject = s.to_string();
                    }
                }
                peers.note(format!(
                    "SMTP sink received for {}: {subject:?}",
                    to.join(", ")
                ));
                to.clear();
                b"250 accepted\r\n"
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 not implemented\r\n",
        };
        write.write_all(reply).await?;
    }
    Ok(())
}
