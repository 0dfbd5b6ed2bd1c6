//! A client of a running dispatcher's HTTP API, for the CLI. It sends the
//! token it is given (the CLI's `SWITCHBOARD_TOKEN`) as a bearer token.

use std::time::Duration;

use serde_json::Value;

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

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.get(self.url(path)), path).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.delete(self.url(path)), path).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.http.post(self.url(path)).json(body), path)
            .await
    }

    /// `PUT path` with a text body of `content_type`.
    pub async fn put_text(
        &self,
        path: &str,
        body: String,
        content_type: &str,
    ) -> Result<Value, ClientError> {
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

    async fn send(
        &self,
        mut request: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<Value, ClientError> {
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
        let value: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        if status.is_success() {
            return Ok(value);
        }
        let error = &value["error"];
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized {
                message: error["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{url} answered {status}")),
                hint: if self.token.is_some() {
                    "the token in SWITCHBOARD_TOKEN was refused: set SWITCHBOARD_TOKEN to the admin \
                     token or a live account token"
                } else {
                    "set SWITCHBOARD_TOKEN to the admin token (`run` keeps a generated one in \
                     DATA_DIR/admin-token) or to an account token"
                },
            });
        }
        Err(ClientError::Api {
            status: status.as_u16(),
            code: error["code"].as_str().unwrap_or("unknown").to_string(),
            message: error["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{url} answered {status}")),
            details: error.get("details").cloned(),
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
