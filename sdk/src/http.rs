//! Emitting events to a dispatcher's HTTP API (`POST /v1/events`).
//!
//! For workers that cannot reach NATS. A failed or 5xx request is retried with
//! the same event id, which the dispatcher's bus deduplicates.

use std::time::Duration;

use crate::{DEFAULT_PUBLISH_ATTEMPTS, EventError, VumiApiEvent};

/// Why an emit over HTTP failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpEmitError {
    /// The event breaks the contract.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The dispatcher refused the event (a 4xx answer); retrying will not help.
    #[error("dispatcher at {url} refused event {id}: HTTP {status}: {body}")]
    Rejected {
        /// The endpoint.
        url: String,
        /// The event id.
        id: String,
        /// The HTTP status.
        status: u16,
        /// The error body the dispatcher returned.
        body: String,
    },
    /// Every attempt failed on the network or with a 5xx answer.
    #[error("posting event {id} to {url} failed after {attempts} attempts: {last}")]
    Unavailable {
        /// The endpoint.
        url: String,
        /// The event id.
        id: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last error seen.
        last: String,
    },
}

/// Posts events to `{base}/v1/events`.
#[derive(Debug, Clone)]
pub struct HttpEmitter {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    attempts: u32,
}

impl HttpEmitter {
    /// An emitter for the dispatcher at `base_url` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base_url: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            // Sooner than the dispatcher closes an idle connection
            // (`http.header_timeout`, 30 s by default), so that an event
            // never goes out on a connection being closed.
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .expect("a default HTTP client builds");
        Self {
            client,
            url: format!("{}/v1/events", base_url.trim_end_matches('/')),
            token: None,
            attempts: DEFAULT_PUBLISH_ATTEMPTS,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Tries each post at most `attempts` times (at least once).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Posts `event`; returns once the dispatcher has accepted it durably.
    pub async fn emit(&self, event: &VumiApiEvent) -> Result<(), HttpEmitError> {
        let body = event.to_json();
        let id = event.id.to_string();
        let mut last = String::new();
        let mut wait: Option<Duration> = None;
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                let backoff = crate::publish_backoff(attempt - 1);
                tokio::time::sleep(wait.take().map_or(backoff, |w| w.max(backoff))).await;
            }
            let mut request = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            #[cfg(feature = "otel")]
            for (name, value) in crate::trace_context::current_headers() {
                request = request.header(name, value);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                // Over the account's ingest rate: wait as asked, then again.
                Ok(response) if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    wait = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|secs| Duration::from_secs(secs.min(60)));
                    last = "HTTP 429 (over the account's ingest rate)".to_string();
                }
                Ok(response) if response.status().is_client_error() => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    return Err(HttpEmitError::Rejected {
                        url: self.url.clone(),
                        id,
                        status,
                        body,
                    });
                }
                Ok(response) => last = format!("HTTP {}", response.status()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(HttpEmitError::Unavailable {
            url: self.url.clone(),
            id,
            attempts: self.attempts,
            last,
        })
    }
}
