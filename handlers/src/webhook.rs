//! `payment_webhook`: a general signed webhook, per the Standard Webhooks
//! specification (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::options::{OptionSpec, Options, required_string};
use crate::ports::{HttpPort, HttpRequest, Method, redact_url};
use crate::records::Secrets;
use crate::records::secrets::check_secret_name;
use crate::template::is_template;
use crate::{Handler, StepError, StepInput, StepOutput};

/// The prefix of a Standard Webhooks secret: `whsec_` + base64 of the key.
pub const SECRET_PREFIX: &str = "whsec_";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a step waits for the receiver's answer: a step holds its
/// conversation's worker while it waits (and a retry waits again), so a
/// receiver that never answers must not hold it for long.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// How far a `webhook-timestamp` may be from now, either way, for [`verify`]
/// to accept the message: older ones are replays.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// The signing key of a `whsec_` secret: its base64 part, decoded.
fn key_of(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = BASE64.decode(encoded).map_err(|e| {
        format!("is not a Standard Webhooks secret (whsec_ + base64 of the key): {e}")
    })?;
    if key.is_empty() {
        return Err("is empty".into());
    }
    Ok(key)
}

/// The HMAC of a message under `key`.
fn mac_with(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The HMAC of a message, keyed by the base64 part of a `whsec_` secret.
fn mac(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> Result<Hmac<Sha256>, String> {
    Ok(mac_with(&key_of(secret)?, id, timestamp, body))
}

/// The `webhook-signature` value for a message under `key`.
fn sign_with(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mac = mac_with(key, id, &timestamp.to_string(), body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` value for a message: `v1,` + base64 of
/// HMAC-SHA256(key, `{id}.{timestamp}.{body}`), where the key is the base64
/// part of a `whsec_` secret.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    Ok(sign_with(&key_of(secret)?, id, timestamp, body))
}

/// Why a Standard Webhooks message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A header the specification requires is absent.
    #[error(
        "the {0} header is missing (Standard Webhooks needs webhook-id, webhook-timestamp and webhook-signature)"
    )]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not a number.
    #[error("webhook-timestamp {0:?} is not a Unix time in seconds")]
    BadTimestamp(String),
    /// `webhook-timestamp` is too far from now: a replayed message, or a sender whose clock is off.
    #[error(
        "webhook-timestamp {timestamp} is {off} s from now, more than the {TIMESTAMP_TOLERANCE_SECS} s allowed \
         (a replayed message, or a sender whose clock is off)"
    )]
    Stale {
        /// The timestamp sent.
        timestamp: i64,
        /// How many seconds it is from now.
        off: i64,
    },
    /// No `v1` signature in `webhook-signature` matches the body and secret.
    #[error("no v1 signature in webhook-signature matches the message and the account's secret")]
    Mismatch,
    /// The account secret is not a Standard Webhooks secret.
    #[error("the account secret {0}")]
    Secret(String),
}

/// Verifies a Standard Webhooks message received at Unix time `now`: the
/// timestamp within [`TIMESTAMP_TOLERANCE_SECS`] of now, and one of the
/// space-separated `v1,<base64>` signatures matching (compared in constant
/// time).
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    let at: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp(timestamp.to_string()))?;
    // (Any i64 may be sent: the difference is taken without overflow.)
    let off = i64::try_from(now.abs_diff(at)).unwrap_or(i64::MAX);
    if off > TIMESTAMP_TOLERANCE_SECS {
        return Err(VerifyError::Stale { timestamp: at, off });
    }
    let mac = mac(secret, id, timestamp.trim(), body).map_err(VerifyError::Secret)?;
    let matches = signatures.split_whitespace().any(|candidate| {
        candidate
            .strip_prefix("v1,")
            .and_then(|sig| BASE64.decode(sig).ok())
            .is_some_and(|sig| mac.clone().verify_slice(&sig).is_ok())
    });
    if matches {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

/// `payment_webhook`.
///
/// Options: `url` (required), `secret` (required: the name of an account
/// secret), `body` (a table of templates, sent as JSON), `headers` (a table),
/// `timeout` (e.g. `"5s"`, default 10 s, at most 300 s). Output: `status`, `webhook_id`,
/// `response` (a bounded excerpt of the body).
#[derive(Debug, Clone)]
pub struct PaymentWebhook {
    http: Arc<dyn HttpPort>,
    secrets: Arc<dyn Secrets>,
}

impl PaymentWebhook {
    /// The handler over an HTTP port and the account secrets.
    pub fn new(http: Arc<dyn HttpPort>, secrets: Arc<dyn Secrets>) -> Self {
        Self { http, secrets }
    }
}

fn check_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("{s:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{s:?} has no host"));
    }
    Ok(())
}

/// A literal `timeout`: a duration a step may wait (a template's is
/// checked once it renders).
fn check_timeout(s: &str) -> Result<(), String> {
    match switchboard_rules::duration::parse(s)? {
        t if t > MAX_TIMEOUT => Err(too_long(t)),
        _ => Ok(()),
    }
}

fn too_long(timeout: Duration) -> String {
    format!(
        "{}s is longer than the {}s a step may wait for its answer",
        timeout.as_secs(),
        MAX_TIMEOUT.as_secs()
    )
}

#[async_trait::async_trait]
impl Handler for PaymentWebhook {
    fn name(&self) -> &'static str {
        "payment_webhook"
    }

    fn description(&self) -> &'static str {
        "POSTs a JSON body to a URL, signed as Standard Webhooks specify with one of the \
         account's secrets; the same webhook id on every attempt."
    }

    fn output(&self) -> &'static str {
        "`status`, `webhook_id`, and `response` (its first 500 characters)"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text("url", "Where to POST (http or https).")
                .required()
                .literal(check_url),
            OptionSpec::text(
                "secret",
                "The name of the account secret that signs the request.",
            )
            .required()
            .secret()
            .literal(check_secret_name),
            OptionSpec::table(
                "body",
                "The JSON body: a table of templates, or one template that gives a table.",
            )
            .default(json!({})),
            OptionSpec::table("headers", "Request headers, name = value."),
            OptionSpec::text(
                "timeout",
                "How long to wait for the answer (e.g. 5s, 1m; at most 300s).",
            )
            .default("10s")
            .literal(check_timeout),
        ])
    }

    fn secrets_named(&self, config: &Map<String, Value>) -> Vec<(&'static str, String)> {
        // A name that is not one (a template, bad characters) is refused
        // by `check_config`; there is no secret to look for.
        match config.get("secret") {
            Some(Value::String(name)) if check_secret_name(name).is_ok() && !is_template(name) => {
                vec![("config.secret", name.clone())]
            }
            _ => Vec::new(),
        }
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let Prepared {
            config,
            url,
            key,
            webhook_id,
            timeout,
        } = self.prepare(input)?;
        let body =
            serde_json::to_vec(config.get("body").unwrap_or(&json!({}))).expect("JSON serialises");
        let timestamp = switchboard_sdk::now().unix_timestamp();
        let signature = sign_with(&key, &webhook_id, timestamp, &body);
        let mut headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("webhook-id".to_string(), webhook_id.clone()),
            ("webhook-timestamp".to_string(), timestamp.to_string()),
            ("webhook-signature".to_string(), signature),
        ];
        if let Some(Value::Object(extra)) = config.get("headers") {
            for (k, v) in extra {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                headers.push((k.clone(), v));
            }
        }
        let response = self
            .http
            .send(HttpRequest {
                method: Method::Post,
                url: url.clone(),
                headers,
                body,
                basic_auth: None,
                timeout,
                provider: "webhook".to_string(),
                from_account: true,
            })
            .await?;
        response.check(&format!("webhook {}", redact_url(&url)))?;
        let mut output = Map::new();
        output.insert("status".into(), json!(response.status));
        output.insert("webhook_id".into(), json!(webhook_id));
        output.insert("response".into(), json!(response.excerpt()));
        Ok(StepOutput::next(output))
    }

    /// The request it would sign and send (its secret must be set); the
    /// receiver's status and answer are `simulated`.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let prepared = self.prepare(input)?;
        let mut output = Map::new();
        output.insert("status".into(), json!(crate::SIMULATED));
        output.insert("webhook_id".into(), json!(prepared.webhook_id));
        output.insert("response".into(), json!(crate::SIMULATED));
        Ok(StepOutput::next(output))
    }
}

/// What a `payment_webhook` step sends, from its rendered config.
struct Prepared {
    config: Map<String, Value>,
    url: String,
    /// The signing key of the account's secret.
    key: Vec<u8>,
    /// Stable for the (event, chain, step): a retry carries the same id.
    webhook_id: String,
    timeout: std::time::Duration,
}

impl PaymentWebhook {
    /// Renders and checks the step's config and reads its secret:
    /// everything the step checks before it sends anything.
    fn prepare(&self, input: &StepInput<'_>) -> Result<Prepared, StepError> {
        let config = input.render_config()?;
        let url = required_string(&config, "url")?;
        check_url(&url).map_err(|e| StepError::permanent(format!("config.url: {e}")))?;
        let account = &input.event.account_key;
        let secret_name = required_string(&config, "secret")?;
        let secret = self
            .secrets
            .get(account, &secret_name)
            .map_err(|e| {
                StepError::retryable(format!("reading secret {secret_name:?}: {e}"), None)
            })?
            .ok_or_else(|| {
                StepError::permanent(format!(
                    "secret {secret_name:?} of account {account} is not set; set it with \
                     `switchboard secrets set {account} {secret_name}`"
                ))
            })?;
        let webhook_id = format!("msg_{}", input.child_id(0).as_uuid().simple());
        // A secret that cannot sign fails here, before anything is sent (and
        // in a dry run too).
        let key = key_of(&secret)
            .map_err(|e| StepError::permanent(format!("secret {secret_name:?} {e}")))?;
        let timeout = match config.get("timeout").and_then(Value::as_str) {
            Some(t) => switchboard_rules::duration::parse(t)
                .map_err(|e| StepError::permanent(format!("config.timeout: {e}")))?,
            None => DEFAULT_TIMEOUT,
        };
        if timeout > MAX_TIMEOUT {
            return Err(StepError::permanent(format!(
                "config.timeout: {}",
                too_long(timeout)
            )));
        }
        Ok(Prepared {
            config,
            url,
            key,
            webhook_id,
            timeout,
        })
    }
}
