//! Real peers for the handler tests, started per test on 127.0.0.1 and
//! stopped when dropped: an HTTP receiver (webhooks verified with the official
//! Standard Webhooks package, an SMS gateway, the Twilio API), an SMTP sink
//! and an OTLP trace receiver. All are the Python programs in `tests/peers/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

/// The secret the HTTP receiver verifies webhooks with.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The auth token the receiver's Twilio API accepts (account SID: any).
pub const TWILIO_TOKEN: &str = "twilio-token";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("peers")
        .join(name)
}

/// What a peer's JSON endpoint at `url` answers.
async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("{url} answers: {e}"))
        .json::<Value>()
        .await
        .unwrap_or_else(|e| panic!("{url} answers JSON: {e}"))
}

/// The items of a JSON array (none for anything else).
fn list(answer: Value) -> Vec<Value> {
    match answer {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// A peer process that printed `listening on PORT`.
#[derive(Debug)]
struct Process {
    child: Child,
    port: u16,
}

impl Process {
    fn start(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(script(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {name} (run ./scripts/test once, and put target/test-peers/bin \
                     first on PATH): {e}"
                )
            });
        let listening =
            crate::util::lines_after(child.stdout.take().expect("piped stdout"), "listening on ");
        let port = listening
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{name} did not start (are its Python packages installed? see tests/peers/requirements.txt)"))
            .trim()
            .parse::<u16>()
            .expect("a port");
        Self { child, port }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP receiver.
#[derive(Debug)]
pub struct HttpReceiver {
    process: Process,
}

impl HttpReceiver {
    /// Starts one; a webhook that sees no answer hangs for `hang`.
    pub fn start(hang: Duration) -> Self {
        let hang = hang.as_secs_f64().to_string();
        Self {
            process: Process::start(
                "http_receiver.py",
                &["--secret", WEBHOOK_SECRET, "--hang", &hang],
            ),
        }
    }

    /// Starts one whose `/chaos` plans draw their answers from `seed`; a
    /// webhook that sees no answer hangs for `hang`.
    pub fn start_seeded(hang: Duration, seed: &str) -> Self {
        let hang = hang.as_secs_f64().to_string();
        Self {
            process: Process::start(
                "http_receiver.py",
                &["--secret", WEBHOOK_SECRET, "--hang", &hang, "--seed", seed],
            ),
        }
    }

    /// With `true`, every `/hook` and `/chaos` path answers 200 from now on,
    /// whatever its plan; with `false`, the plans apply again.
    pub async fn set_healthy(&self, healthy: bool) {
        let answer = reqwest::Client::new()
            .post(format!("{}/_control", self.url()))
            .json(&serde_json::json!({ "healthy": healthy }))
            .send()
            .await
            .expect("the receiver answers")
            .json::<Value>()
            .await
            .expect("JSON");
        assert_eq!(answer["healthy"], healthy, "the receiver's settings");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port)
    }

    /// Makes the fake Twilio API answer a message to each number with the
    /// sid given for it (`{"+27831234567": "SM..."}`).
    pub async fn twilio_sids(&self, sids: Value) {
        let answer = self.twilio_control("_twilio_sids", &sids).await;
        assert_eq!(answer, sids, "the receiver's Twilio sids");
    }

    /// Makes the fake Twilio API create the next message to each number
    /// given (`{"+27831234567": 1}`: how many sends) and then hang before
    /// answering: a send whose answer is lost.
    pub async fn twilio_hang(&self, numbers: Value) {
        let answer = self.twilio_control("_twilio_hang", &numbers).await;
        assert_eq!(answer, numbers, "the receiver's Twilio hangs");
    }

    async fn twilio_control(&self, path: &str, body: &Value) -> Value {
        reqwest::Client::new()
            .post(format!("{}/{path}", self.url()))
            .json(body)
            .send()
            .await
            .expect("the receiver answers")
            .json::<Value>()
            .await
            .expect("JSON")
    }

    /// A dispatcher config whose SMS provider `gateway` posts to this
    /// receiver's `/sms`, with NATS deliveries redelivered after
    /// `ack_wait_secs`.
    pub fn sms_gateway_config(&self, ack_wait_secs: u64) -> String {
        format!(
            r#"
[bus]
ack_wait_secs = {ack_wait_secs}

[providers.sms.gateway]
type = "http"
url = "{}/sms"
from = "Switchboard"
"#,
            self.url()
        )
    }

    /// Every request received so far, oldest first.
    pub async fn requests(&self) -> Vec<Value> {
        list(get_json(&format!("{}/_requests", self.url())).await)
    }

    /// How many requests it has received.
    pub async fn count(&self) -> usize {
        let answer = get_json(&format!("{}/_count", self.url())).await;
        answer["count"].as_u64().expect("a count") as usize
    }

    /// The requests to paths starting with `prefix`.
    pub async fn requests_to(&self, prefix: &str) -> Vec<Value> {
        self.requests()
            .await
            .into_iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .collect()
    }
}

/// The OTLP/HTTP trace receiver (`otlp_receiver.py`): decodes what the
/// dispatcher exports with the OpenTelemetry project's protobuf classes.
#[derive(Debug)]
pub struct OtlpReceiver {
    process: Process,
}

impl OtlpReceiver {
    /// Starts one.
    pub fn start() -> Self {
        Self {
            process: Process::start("otlp_receiver.py", &[]),
        }
    }

    /// Its base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port)
    }

    /// Every span received so far, oldest first.
    pub async fn spans(&self) -> Vec<Value> {
        list(get_json(&format!("{}/_spans", self.url())).await)
    }
}

/// The SMTP sink.
#[derive(Debug)]
pub struct SmtpSink {
    process: Process,
    dir: TempDir,
}

impl SmtpSink {
    /// Starts one.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let process = Process::start(
            "smtp_sink.py",
            &[dir.path().to_str().expect("a UTF-8 path")],
        );
        Self { process, dir }
    }

    /// The SMTP port.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// Makes the sink answer a message to each listed recipient `250 Ok:
    /// queued as ID` (`{"a@example.org": "ID"}`), as SendGrid does.
    pub fn queue_ids(&self, ids: Value) {
        std::fs::write(self.dir.path().join("queue-ids.conf"), ids.to_string())
            .expect("writing the sink's queue ids");
    }

    /// Makes the sink hold its answer to a message to each listed recipient
    /// (`["a@example.org"]`) until [`SmtpSink::release`]: the message is
    /// written out (so [`SmtpSink::messages`] has it) before its answer goes.
    pub fn hold(&self, recipients: Value) {
        // Whole or not at all: the sink reads the file while it holds.
        let path = self.dir.path().join("held.conf");
        let partial = path.with_extension("tmp");
        std::fs::write(&partial, recipients.to_string())
            .and_then(|()| std::fs::rename(&partial, &path))
            .expect("writing the sink's held recipients");
    }

    /// Lets every held answer go.
    pub fn release(&self) {
        self.hold(Value::Array(Vec::new()));
    }

    /// Every message accepted so far.
    pub fn messages(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir.path()).expect("the sink's directory") {
            let path = entry.expect("an entry").path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).expect("a message file");
                out.push(serde_json::from_str(&text).expect("JSON"));
            }
        }
        out
    }
}
