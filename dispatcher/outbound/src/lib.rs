//! The dispatcher's outbound ports for the handlers: HTTP (reqwest, pooled
//! connections, no redirects, bodies read with a cap, account URLs checked
//! against the [outbound policy](policy)) and e-mail (lettre, one pooled
//! SMTP transport per provider). Commands to workers go over the bus, so
//! each bus backend provides that port (`switchboard-bus`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart, SinglePart, header};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;
use tracing::Instrument;

use switchboard_engine::metrics::Metrics;
use switchboard_handlers::ports::{
    Email, HttpError, HttpPort, HttpRequest, HttpResponse, MailError, MailPort, Method, redact_url,
};

/// Largest response body kept from an outbound call.
pub const RESPONSE_CAP: usize = 64 * 1024;

pub mod policy;

pub use policy::{OutboundConfig, OutboundPolicy};

/// Outbound HTTP over pooled reqwest clients: one for the deployment's own
/// endpoints, one whose resolver applies the outbound policy, for URLs that
/// accounts wrote.
#[derive(Debug, Clone)]
pub struct ReqwestHttp {
    deployment: reqwest::Client,
    accounts: reqwest::Client,
    policy: Arc<OutboundPolicy>,
    metrics: Arc<Metrics>,
}

impl ReqwestHttp {
    /// Clients that keep connections alive and follow no redirect.
    pub fn new(policy: OutboundPolicy, metrics: Arc<Metrics>) -> Self {
        let policy = Arc::new(policy);
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(60))
                // A step retries under its own policy, with the same ids; a
                // retry inside the client besides would copy every request
                // in case it is needed.
                .retry(reqwest::retry::never().max_retries_per_request(0))
                .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
        };
        let deployment = builder().build().expect("an HTTP client builds");
        let accounts = builder()
            .dns_resolver(Arc::new(policy::CheckedResolver {
                policy: policy.clone(),
            }))
            .build()
            .expect("an HTTP client builds");
        Self {
            deployment,
            accounts,
            policy,
            metrics,
        }
    }

    /// The client for `request`, once its host passes the policy if it
    /// must, and its URL, parsed; `url` names it in errors.
    fn client_for(
        &self,
        request: &HttpRequest,
        url: &str,
    ) -> Result<(&reqwest::Client, reqwest::Url), HttpError> {
        let refused = |message: String| HttpError::Refused {
            url: url.to_string(),
            message: format!("refused by the outbound policy: {message}"),
        };
        let parsed = reqwest::Url::parse(&request.url).map_err(|e| {
            let message = format!("not a URL: {e}");
            if request.from_account {
                refused(message)
            } else {
                HttpError::Connect {
                    url: url.to_string(),
                    message,
                }
            }
        })?;
        if !request.from_account {
            return Ok((&self.deployment, parsed));
        }
        match parsed.host() {
            Some(url::Host::Domain(host)) => self.policy.check_host(host).map_err(refused)?,
            Some(url::Host::Ipv4(ip)) => self
                .policy
                .check_ip(&ip.to_string(), ip.into())
                .map_err(refused)?,
            Some(url::Host::Ipv6(ip)) => self
                .policy
                .check_ip(&ip.to_string(), ip.into())
                .map_err(refused)?,
            None => return Err(refused("the URL has no host".into())),
        }
        Ok((&self.accounts, parsed))
    }
}

#[async_trait::async_trait]
impl HttpPort for ReqwestHttp {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let provider = request.provider.clone();
        let span = client_span(&request);
        let result = self.call(request).instrument(span.clone()).await;
        let status = match &result {
            Ok(response) => response.status.to_string(),
            Err(HttpError::Timeout { .. }) => "timeout".to_string(),
            Err(HttpError::Connect { .. }) => "error".to_string(),
            Err(HttpError::Refused { .. }) => "refused".to_string(),
        };
        match &result {
            Ok(response) => {
                span.record("http.response.status_code", i64::from(response.status));
                if response.status >= 400 {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", status.as_str());
                }
            }
            Err(e) => {
                span.record("error.type", status.as_str());
                switchboard_engine::otel::failed(&span, e);
            }
        }
        self.metrics.outbound("http", &provider, &status);
        result
    }
}

/// The OpenTelemetry client span of an outbound request (HTTP semantic
/// conventions), the URL without its credentials or query.
fn client_span(request: &HttpRequest) -> tracing::Span {
    use tracing::field::Empty;
    if !switchboard_engine::otel::on() {
        return tracing::Span::none();
    }
    let url = url::Url::parse(&request.url).ok();
    tracing::info_span!(
        target: switchboard_engine::otel::TARGET,
        "HTTP",
        otel.name = request.method.as_str(),
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        http.request.method = request.method.as_str(),
        url.full = %redact_url(&request.url),
        server.address = url.as_ref().and_then(|u| u.host_str()).unwrap_or_default(),
        server.port = i64::from(url.as_ref().and_then(|u| u.port_or_known_default()).unwrap_or_default()),
        http.response.status_code = Empty,
        error.type = Empty,
        switchboard.provider = %request.provider,
    )
}

impl ReqwestHttp {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        // Errors name the URL without its credentials or query.
        let url = redact_url(&request.url);
        let (client, parsed) = self.client_for(&request, &url)?;
        let mut builder = client
            .request(
                match request.method {
                    Method::Post => reqwest::Method::POST,
                    Method::Get => reqwest::Method::GET,
                },
                parsed,
            )
            .timeout(request.timeout)
            .body(request.body);
        for (k, v) in &request.headers {
            builder = builder.header(k, v);
        }
        // The client span's trace context (run inside it), so that the
        // receiver's trace goes on from this call.
        for (k, v) in switchboard_sdk::trace_context::current_headers() {
            builder = builder.header(k, v);
        }
        if let Some((user, password)) = &request.basic_auth {
            builder = builder.basic_auth(user, Some(password));
        }
        let mut response = builder
            .send()
            .await
            .map_err(|e| classify(&url, request.timeout, &e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = RESPONSE_CAP - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= RESPONSE_CAP {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(classify(&url, request.timeout, &e)),
            }
        }
        Ok(HttpResponse {
            status,
            body,
            retry_after,
        })
    }
}

fn classify(url: &str, timeout: Duration, e: &reqwest::Error) -> HttpError {
    if e.is_timeout() {
        return HttpError::Timeout {
            url: url.to_string(),
            timeout,
        };
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        if let Some(refusal) = next.downcast_ref::<policy::Refusal>() {
            return HttpError::Refused {
                url: url.to_string(),
                message: format!("refused by the outbound policy: {refusal}"),
            };
        }
        cause = next;
    }
    HttpError::Connect {
        url: url.to_string(),
        message: cause.to_string(),
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let format = time::format_description::well_known::Rfc2822;
    let at = time::OffsetDateTime::parse(v.trim(), &format).ok()?;
    let wait = at - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs(
        wait.whole_seconds().clamp(0, 3600) as u64
    ))
}

/// An e-mail's body: one part, or text and HTML as alternatives.
enum Body {
    One(SinglePart),
    Many(MultiPart),
}

/// How to talk to an SMTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain text (local relays and test sinks only).
    None,
    /// Plain, upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// An e-mail provider of the deployment (`[providers.email.NAME]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailProvider {
    /// SMTP host.
    pub host: String,
    /// SMTP port (default: 25, 587 for STARTTLS, 465 for TLS).
    #[serde(default)]
    pub port: Option<u16>,
    /// `none`, `starttls` (default) or `tls`.
    #[serde(default)]
    pub security: SmtpSecurity,
    /// Login.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// Default sender (`Name <address>` or `address`).
    #[serde(default)]
    pub from: Option<String>,
    /// Give up on one message after this many seconds (default 30).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// The verification key of SendGrid's Signed Event Webhook, as SendGrid
    /// shows it (base64), when this is a SendGrid account that posts its
    /// events to the deployment's route (`/v1/inbound/sendgrid-events`).
    #[serde(default)]
    pub event_webhook_key: Option<String>,
}

/// E-mail through lettre, one pooled transport per provider.
#[derive(Debug, Clone)]
pub struct LettreMail {
    providers: BTreeMap<String, (EmailProvider, AsyncSmtpTransport<Tokio1Executor>)>,
    metrics: Arc<Metrics>,
}

impl LettreMail {
    /// Transports for every provider; a bad provider is an error naming it.
    pub fn new(
        providers: &BTreeMap<String, EmailProvider>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let mut built = BTreeMap::new();
        for (name, p) in providers {
            let builder = match p.security {
                SmtpSecurity::None => {
                    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&p.host)
                }
                SmtpSecurity::Starttls => {
                    AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&p.host)
                        .map_err(|e| format!("providers.email.{name}: {e}"))?
                }
                SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&p.host)
                    .map_err(|e| format!("providers.email.{name}: {e}"))?,
            };
            let mut builder =
                builder.timeout(Some(Duration::from_secs(p.timeout_secs.unwrap_or(30))));
            if let Some(port) = p.port {
                builder = builder.port(port);
            }
            if let (Some(user), Some(password)) = (&p.username, &p.password) {
                builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
            }
            if let Some(from) = &p.from {
                from.parse::<Mailbox>()
                    .map_err(|e| format!("providers.email.{name}.from {from:?}: {e}"))?;
            }
            built.insert(name.clone(), (p.clone(), builder.build()));
        }
        Ok(Self {
            providers: built,
            metrics,
        })
    }

    /// The configured provider names.
    pub fn names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }
}

#[async_trait::async_trait]
impl MailPort for LettreMail {
    async fn send(&self, provider: &str, email: Email) -> Result<String, MailError> {
        let permanent = |message: String| MailError {
            permanent: true,
            message,
        };
        let (_, transport) = self
            .providers
            .get(provider)
            .ok_or_else(|| permanent(format!("e-mail provider {provider:?} is not configured")))?;
        let from: Mailbox = email
            .from
            .parse()
            .map_err(|e| permanent(format!("sender {:?}: {e}", email.from)))?;
        let to: Mailbox = email
            .to
            .parse()
            .map_err(|e| permanent(format!("recipient {:?}: {e}", email.to)))?;
        let mut builder = Message::builder().from(from).to(to).subject(email.subject);
        for (name, value) in email.headers {
            if name.eq_ignore_ascii_case("message-id") {
                builder = builder.message_id(Some(value));
                continue;
            }
            builder = builder.raw_header(header::HeaderValue::new(
                header::HeaderName::new_from_ascii(name)
                    .map_err(|e| permanent(format!("header name: {e}")))?,
                value,
            ));
        }
        // An HTML-only message (a template without a text part) is one
        // HTML part, not an empty text beside it.
        let body = match email.html {
            Some(html) if email.text.is_empty() => Body::One(SinglePart::html(html)),
            Some(html) => Body::Many(
                MultiPart::alternative()
                    .singlepart(SinglePart::plain(email.text))
                    .singlepart(SinglePart::html(html)),
            ),
            None => Body::One(SinglePart::plain(email.text)),
        };
        let message = if email.attachments.is_empty() {
            match body {
                Body::One(part) => builder.singlepart(part),
                Body::Many(parts) => builder.multipart(parts),
            }
        } else {
            // The body, then each file: multipart/mixed.
            let mut mixed = match body {
                Body::One(part) => MultiPart::mixed().singlepart(part),
                Body::Many(parts) => MultiPart::mixed().multipart(parts),
            };
            for a in email.attachments {
                let content_type = header::ContentType::parse(&a.content_type).map_err(|e| {
                    permanent(format!("attachment {:?}: content type: {e}", a.name))
                })?;
                mixed = mixed.singlepart(
                    lettre::message::Attachment::new(a.name).body(a.bytes.to_vec(), content_type),
                );
            }
            builder.multipart(mixed)
        }
        .map_err(|e| permanent(format!("building the message: {e}")))?;
        let span = tracing::info_span!(
            target: switchboard_engine::otel::TARGET,
            "SMTP send",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            network.protocol.name = "smtp",
            switchboard.provider = provider,
        );
        let result = transport.send(message).instrument(span.clone()).await;
        if let Err(e) = &result {
            switchboard_engine::otel::failed(&span, e);
        }
        let status = match &result {
            Ok(_) => "accepted",
            Err(e) if e.is_permanent() => "rejected",
            Err(_) => "error",
        };
        self.metrics.outbound("smtp", provider, status);
        match result {
            Ok(response) => Ok(format!(
                "accepted by {provider}: {} {}",
                response.code(),
                response.message().collect::<Vec<_>>().join(" ")
            )),
            Err(e) => Err(MailError {
                permanent: e.is_permanent(),
                message: format!("e-mail provider {provider}: {e}"),
            }),
        }
    }

    fn has_provider(&self, provider: &str) -> bool {
        self.providers.contains_key(provider)
    }

    fn default_from(&self, provider: &str) -> Option<String> {
        self.providers
            .get(provider)
            .and_then(|(p, _)| p.from.clone())
    }

    fn check_sender(&self, from: &str) -> Result<(), String> {
        from.parse::<Mailbox>()
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
