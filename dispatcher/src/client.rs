//! A client of a running dispatcher's HTTP API, for the CLI. It sends the
//! token it is given (the CLI's `SWITCHBOARD_TOKEN`) as a bearer token.
//!
//! Requests and answers are the types of `switchboard_api`, which the server
//! builds its answers from, and paths come from `switchboard_api::paths`:
//! each call names the type it expects (`client.get::<ChainVersion>(...)`).

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchboard_api::ErrorResponse;

/// Why a call to the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The dispatcher could not be reached.
    #[error(
        "cannot reach the dispatcher at {url}: {message} (is `switchboard run` running there? \
         set --server or SWITCHBOARD_URL)"
    )]
    Unreachable {
        /// The URL called.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The dispatcher refused the request's token, or the missing token.
    #[error("{message} (HTTP 401) — {hint}")]
    Unauthorized {
        /// The dispatcher's message.
        message: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The dispatcher answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// The error message.
        message: String,
        /// Structured details (e.g. each chain problem).
        details: Option<Value>,
    },
    /// The dispatcher answered something that is not the expected type.
    #[error(
        "the dispatcher at {url} answered something this CLI does not understand: {message} \
         (are the CLI and the dispatcher the same version?)"
    )]
    Unexpected {
        /// The URL called.
        url: String,
        /// What did not fit.
        message: String,
    },
}

/// A client of one dispatcher.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the dispatcher at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a default HTTP client builds");
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// `GET path`, answered a `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path)), path).await
    }

    /// `GET path?query`, answered a `T`.
    pub async fn get_with<Q: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path)).query(query), path)
            .await
    }

    /// `DELETE path`, answered a `T`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.delete(self.url(path)), path).await
    }

    /// `POST path` with `body` as JSON, answered a `T`.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body), path)
            .await
    }

    /// `PUT path` with `body` as JSON, answered a `T`.
    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.put(self.url(path)).json(body), path)
            .await
    }

    /// `PUT path` with the bytes of a file, answered a `T`.
    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let request = self
            .http
            .put(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(request, path).await
    }

    /// `PUT path` with a text body of `content_type`, answered a `T`.
    pub async fn put_text<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
        content_type: &str,
    ) -> Result<T, ClientError> {
        let request = self
            .http
            .put(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.send(request, path).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        mut request: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<T, ClientError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let url = self.url(path);
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            message: root_cause(&e),
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                message: root_cause(&e),
            })?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected {
                url,
                message: e.to_string(),
            });
        }
        // Not every failure is the API's: a proxy may answer with HTML.
        let error = serde_json::from_slice::<ErrorResponse>(&body)
            .ok()
            .map(|e| e.error);
        let message = error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| format!("{url} answered {status}"));
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized {
                message,
                hint: if self.token.is_some() {
                    "the token in SWITCHBOARD_TOKEN was refused: set SWITCHBOARD_TOKEN to the admin \
                     token or a live account token"
                } else {
                    "set SWITCHBOARD_TOKEN to the admin token (`run` keeps a generated one in \
                     DATA_DIR/admin-token) or to an account token"
                },
            });
        }
        let (code, details) = match error {
            Some(e) => (e.code, e.details),
            None => ("unknown".to_string(), None),
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            code,
            message,
            details,
        })
    }
}

/// The innermost error message: reqwest's own says only "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
