//! The ports through which built-in handlers reach the outside world. The
//! dispatcher provides the implementations (reqwest, lettre, NATS); the
//! handlers only say what to send and how to read the answer.

use std::time::Duration;

use crate::StepError;

/// A URL fit for errors, traces and logs: credentials in the user part and
/// the query string (where gateways often take API keys) are left out.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let path = match path.split_once('?') {
        Some((p, q)) if !q.is_empty() => format!("{p}?…"),
        Some((p, _)) => p.to_string(),
        None => path.to_string(),
    };
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

/// The method of an outbound request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Send something (a webhook, a message).
    #[default]
    Post,
    /// Look something up (whether a provider has a message); the body is
    /// empty.
    Get,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Get => "GET",
        }
    }
}

/// An outbound HTTP request.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// POST or GET.
    pub method: Method,
    /// The URL (`http` or `https`).
    pub url: String,
    /// Extra headers (content type included).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// HTTP basic credentials.
    pub basic_auth: Option<(String, String)>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Who is called, for the outbound metrics: the provider's name, or
    /// `webhook` for an account's webhook.
    pub provider: String,
    /// The URL comes from an account's chain, not from the deployment's
    /// configuration: the dispatcher checks it against its outbound policy
    /// (private and loopback addresses are refused unless allowed).
    pub from_account: bool,
}

/// The answer to an outbound request.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, cut at the port's size cap.
    pub body: Vec<u8>,
    /// What `Retry-After` asked for, if anything.
    pub retry_after: Option<Duration>,
}

impl HttpResponse {
    /// A bounded, printable excerpt of the body.
    pub fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let mut s: String = text.chars().take(500).collect();
        if text.chars().count() > 500 {
            s.push('…');
        }
        s
    }

    /// The step outcome this answer means: 2xx is success; 408, 429 and 5xx
    /// are worth retrying (after `Retry-After`, when given); other codes are not.
    pub fn check(&self, what: &str) -> Result<(), StepError> {
        match self.status {
            200..=299 => Ok(()),
            408 | 429 | 500..=599 => Err(StepError::retryable(
                format!("{what} answered HTTP {}: {}", self.status, self.excerpt()),
                self.retry_after,
            )),
            _ => Err(StepError::permanent(format!(
                "{what} answered HTTP {}: {}",
                self.status,
                self.excerpt()
            ))),
        }
    }
}

/// Why an outbound request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No answer in time.
    #[error("{url}: no answer within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The connection failed (refused, reset, DNS).
    #[error("{url}: {message}")]
    Connect {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The deployment does not allow this target.
    #[error("{url}: {message}")]
    Refused {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
}

impl From<HttpError> for StepError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Timeout { .. } | HttpError::Connect { .. } => {
                StepError::retryable(e.to_string(), None)
            }
            HttpError::Refused { .. } => StepError::permanent(e.to_string()),
        }
    }
}

/// Outbound HTTP.
#[async_trait::async_trait]
pub trait HttpPort: Send + Sync + std::fmt::Debug {
    /// Sends `request`; an answer of any status is `Ok`.
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError>;
}

/// An e-mail to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Email {
    /// Sender address (`Name <a@b>` or `a@b`).
    pub from: String,
    /// Recipient address.
    pub to: String,
    /// Subject.
    pub subject: String,
    /// Plain-text part.
    pub text: String,
    /// HTML part.
    pub html: Option<String>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Files attached, in order.
    pub attachments: Vec<Attachment>,
}

/// A file attached to an e-mail.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    /// Its file name.
    pub name: String,
    /// Its content type.
    pub content_type: String,
    /// Its bytes.
    pub bytes: std::sync::Arc<[u8]>,
}

/// Why an e-mail was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MailError {
    /// True when retrying cannot help (a refused recipient, a bad address).
    pub permanent: bool,
    /// What went wrong.
    pub message: String,
}

impl From<MailError> for StepError {
    fn from(e: MailError) -> Self {
        if e.permanent {
            StepError::permanent(e.message)
        } else {
            StepError::retryable(e.message, None)
        }
    }
}

/// Outbound e-mail, through the deployment's configured providers.
#[async_trait::async_trait]
pub trait MailPort: Send + Sync + std::fmt::Debug {
    /// Sends `email` through `provider`; returns the server's acceptance line.
    async fn send(&self, provider: &str, email: Email) -> Result<String, MailError>;
    /// Whether a provider of that name is configured.
    fn has_provider(&self, provider: &str) -> bool;
    /// The configured default sender of `provider`.
    fn default_from(&self, provider: &str) -> Option<String>;
    /// Checks a sender (`Name <address>` or an address) as sending would.
    fn check_sender(&self, from: &str) -> Result<(), String>;
}

/// Publishing commands to workers (Vumi outbound messages) on the bus.
#[async_trait::async_trait]
pub trait CommandPort: Send + Sync + std::fmt::Debug {
    /// Publishes `payload` on `subject` (under the deployment's prefix), with
    /// `msg_id` as its dedup id.
    async fn publish(&self, subject: &str, payload: Vec<u8>, msg_id: &str) -> Result<(), String>;
    /// The full subject for `suffix` (e.g. `vumi.outbound.sms_transport`).
    fn subject(&self, suffix: &str) -> String;
}

/// What a one-click unsubscribe link unsubscribes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The account.
    pub account: switchboard_sdk::AccountKey,
    /// The channel.
    pub channel: crate::records::Channel,
    /// The recipient's address.
    pub address: String,
    /// What from: the template's category, else the template, else all.
    pub topic: crate::records::Topic,
    /// The message the link came in.
    pub message_id: String,
}

/// The dispatcher's signed one-click unsubscribe links (RFC 8058).
pub trait UnsubscribeLinks: Send + Sync + std::fmt::Debug {
    /// The public URL that records `unsubscribe`, signed so that nothing
    /// else can be made of it; `None` when links cannot be made now (the
    /// account's key could not be read), and the e-mail goes without.
    fn url(&self, unsubscribe: &Unsubscribe) -> Option<String>;
}
