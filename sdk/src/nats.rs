//! Emitting events straight to NATS JetStream.
//!
//! The emitter publishes to `{prefix}.events.{account}.{conversation_type}.{event_type}`
//! with `Nats-Msg-Id` set to the event id and waits for JetStream's ack. A failed
//! publish is retried with the same id, so the stream stores the event once.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};

use crate::{DEFAULT_PUBLISH_ATTEMPTS, DEFAULT_SUBJECT_PREFIX, EventError, VumiApiEvent};

/// The name of the stream that holds events.
pub const EVENTS_STREAM: &str = "VUMI_EVENTS";
/// How long JetStream remembers an id to drop duplicate publishes.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The configuration of the events stream for a subject prefix. The dispatcher
/// creates the stream; a worker may create it too when it starts first.
pub fn events_stream_config(prefix: &str) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: stream_name(prefix, EVENTS_STREAM),
        subjects: vec![format!("{prefix}.events.>")],
        duplicate_window: DUPLICATE_WINDOW,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Stream names keep `VUMI_` for the default prefix and gain the prefix otherwise,
/// so that two deployments with different prefixes can share a server.
pub fn stream_name(prefix: &str, base: &str) -> String {
    if prefix == DEFAULT_SUBJECT_PREFIX {
        base.to_string()
    } else {
        let suffix = base.strip_prefix("VUMI_").unwrap_or(base);
        format!(
            "{}_{suffix}",
            prefix.to_ascii_uppercase().replace(['.', '-'], "_")
        )
    }
}

/// Connect options for a NATS URL that may carry credentials —
/// `nats://user:password@host:4222`, or `nats://token@host:4222` — and the
/// servers to connect to, without the credentials, fit for messages and
/// logs. (async-nats ignores credentials in a URL.) `%`-escapes in the
/// credentials are decoded, so a password with `@` or `:` is written `%40`
/// or `%3A`.
///
/// The URL may list several seed servers of one cluster, separated by
/// commas (`nats://a:4222,nats://b:4222`): the client connects to any of
/// them that answers, and learns the rest of the cluster from it.
/// Credentials are taken from the first server that carries them.
///
/// A worker confined by NATS permissions adds its own inbox prefix before
/// connecting (see `docs/nats-permissions.md`):
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let (options, servers) = switchboard_sdk::nats::connect_options("nats://acme-survey:pw@127.0.0.1:4222");
/// let client = options.custom_inbox_prefix("_INBOX_acme-survey").connect(&servers).await?;
/// let emitter = switchboard_sdk::nats::NatsEmitter::new(client);
/// # Ok(()) }
/// ```
pub fn connect_options(url: &str) -> (async_nats::ConnectOptions, Servers) {
    let mut options = async_nats::ConnectOptions::new();
    let mut credentials = false;
    let mut servers = Vec::new();
    for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (bare, found) = split_credentials(one);
        if let Some((user, password)) = found
            && !credentials
        {
            credentials = true;
            options = match password {
                Some(password) => options.user_and_password(user, password),
                None => options.token(user),
            };
        }
        servers.push(bare);
    }
    (options, Servers(servers))
}

/// A URL without its credentials, and the credentials: a user and
/// password, or a token (no password).
fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => (percent_decode(user), Some(percent_decode(password))),
        None => (percent_decode(userinfo), None),
    };
    let bare = match scheme {
        Some(scheme) => format!("{scheme}://{host}{tail}"),
        None => format!("{host}{tail}"),
    };
    (bare, Some(credentials))
}

/// The seed servers of a NATS URL, without credentials. Displays as the
/// comma-separated list; connects to any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Servers(Vec<String>);

impl Servers {
    /// Each server's URL.
    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl async_nats::ToServerAddrs for Servers {
    type Iter = std::vec::IntoIter<async_nats::ServerAddr>;

    fn to_server_addrs(&self) -> std::io::Result<Self::Iter> {
        self.0.to_server_addrs()
    }
}

/// Decodes `%XX` escapes; anything else is kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why an emit failed.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The event breaks the contract (for instance, it is too large).
    #[error(transparent)]
    Event(#[from] EventError),
    /// Connecting to the server failed.
    #[error("connecting to NATS at {url}: {source}")]
    Connect {
        /// The server address.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// Every attempt to publish failed; the last error is kept.
    #[error("publishing event {id} to {subject} failed after {attempts} attempts: {last}")]
    Publish {
        /// The event id.
        id: String,
        /// The subject.
        subject: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last error seen.
        last: String,
    },
}

/// What JetStream said about a stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The stream sequence number of the event.
    pub sequence: u64,
    /// True when the stream already had an event with this id (a retried emit).
    pub duplicate: bool,
}

/// Publishes events to JetStream and waits for each ack.
#[derive(Debug, Clone)]
pub struct NatsEmitter {
    js: jetstream::Context,
    prefix: String,
    max_bytes: usize,
    attempts: u32,
    cloudevents: bool,
}

impl NatsEmitter {
    /// Connects to `url` with default options and the credentials the URL
    /// carries, if any (see [`connect_options`]).
    pub async fn connect(url: &str) -> Result<Self, EmitError> {
        let (options, servers) = connect_options(url);
        let client = options
            .connect(&servers)
            .await
            .map_err(|source| EmitError::Connect {
                url: servers.to_string(),
                source,
            })?;
        Ok(Self::new(client))
    }

    /// An emitter over an existing client.
    pub fn new(client: async_nats::Client) -> Self {
        Self {
            js: jetstream::new(client),
            prefix: DEFAULT_SUBJECT_PREFIX.to_string(),
            max_bytes: crate::DEFAULT_MAX_EVENT_BYTES,
            attempts: DEFAULT_PUBLISH_ATTEMPTS,
            cloudevents: false,
        }
    }

    /// Publishes events as binary-mode CloudEvents (`ce-` headers, the
    /// event's data as the payload; see [`crate::cloudevents`]) when `yes`,
    /// instead of the event envelope. A dispatcher reads both.
    pub fn with_cloudevents(mut self, yes: bool) -> Self {
        self.cloudevents = yes;
        self
    }

    /// Uses `prefix` instead of `vumi` as the first subject segment.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Refuses events larger than `max_bytes` before sending them.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Tries each publish at most `attempts` times (at least once).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Creates the events stream if it does not exist yet.
    pub async fn ensure_stream(&self) -> Result<(), EmitError> {
        self.js
            .get_or_create_stream(events_stream_config(&self.prefix))
            .await
            .map(|_| ())
            .map_err(|e| EmitError::Publish {
                id: String::new(),
                subject: format!("{}.events.>", self.prefix),
                attempts: 1,
                last: format!("creating stream: {e}"),
            })
    }

    /// Publishes `event` and waits until JetStream has stored it.
    pub async fn emit(&self, event: &VumiApiEvent) -> Result<Emitted, EmitError> {
        self.emit_as(event, &event.id.to_string()).await
    }

    /// Publishes `event` with `Nats-Msg-Id` set to `dedup_id` instead of the
    /// event id: to put an event that was already published back on the bus
    /// (a replay) without the duplicate window dropping it.
    pub async fn emit_as(
        &self,
        event: &VumiApiEvent,
        dedup_id: &str,
    ) -> Result<Emitted, EmitError> {
        let encoded = event.encode(self.max_bytes)?;
        let (headers, payload) = if self.cloudevents {
            let (attributes, data) = crate::cloudevents::to_binary(event);
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in attributes {
                headers.insert(name.as_str(), value.as_str());
            }
            (Some(headers), bytes::Bytes::from(data))
        } else {
            (None, bytes::Bytes::from(encoded))
        };
        let subject = event.subject(&self.prefix);
        let id = dedup_id.to_string();
        #[cfg(feature = "otel")]
        let trace = crate::trace_context::current_headers();
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                tokio::time::sleep(crate::publish_backoff(attempt - 1)).await;
            }
            let mut publish = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id.as_str());
            if let Some(headers) = &headers {
                for (name, values) in headers.iter() {
                    for value in values {
                        publish = publish.header(name.clone(), value.clone());
                    }
                }
            }
            #[cfg(feature = "otel")]
            for (name, value) in &trace {
                publish = publish.header(*name, value.as_str());
            }
            match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => {
                        return Ok(Emitted {
                            sequence: ack.sequence,
                            duplicate: ack.duplicate,
                        });
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        Err(EmitError::Publish {
            id,
            subject,
            attempts: self.attempts,
            last,
        })
    }
}

#[cfg(test)]
mod tests;
