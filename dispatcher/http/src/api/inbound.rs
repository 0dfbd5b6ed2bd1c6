//! Inbound provider webhooks: their URLs, the records they posted that
//! matched nothing, and receiving a provider's post.

use super::*;

pub(super) async fn list_unmatched(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let unmatched = s
        .inbound
        .unmatched
        .list(&account, q.effective_limit())
        .map_err(ApiError::internal)?;
    Ok(Json(UnmatchedList {
        account_key: account,
        unmatched: unmatched
            .iter()
            .map(crate::inbound::Unmatched::answer)
            .collect(),
    })
    .into_response())
}

pub(super) fn provider(raw: &str) -> Result<Provider, ApiError> {
    Provider::parse(raw).ok_or_else(|| {
        ApiError::bad_request(
            "unknown_provider",
            CreateError::UnknownProvider(raw.to_string()).to_string(),
        )
    })
}

pub(super) async fn list_inbound(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let hooks = s.inbound.hooks.list(&account).map_err(ApiError::internal)?;
    Ok(Json(InboundList {
        account_key: account,
        inbound: hooks.iter().map(crate::inbound::Hook::answer).collect(),
    })
    .into_response())
}

pub(super) async fn show_inbound(
    State(s): State<ApiState>,
    Path((account, raw)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let provider = provider(&raw)?;
    match s
        .inbound
        .hooks
        .get(&account, provider)
        .map_err(ApiError::internal)?
    {
        Some(hook) => Ok(Json(hook.answer()).into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no inbound {raw} webhook"
        ))),
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        match &e {
            CreateError::UnknownProvider(_) => {
                ApiError::bad_request("unknown_provider", e.to_string())
            }
            CreateError::SecretRequired(_) | CreateError::SecretNotTaken(_) => {
                ApiError::bad_request("invalid_secret", e.to_string())
            }
            CreateError::SecretNotSet { .. } | CreateError::NotConfigured(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_configured", e.to_string())
            }
            CreateError::Exists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "exists", e.to_string())
            }
            CreateError::Store(_) | CreateError::Records(_) => ApiError::internal(e),
        }
    }
}

pub(super) async fn create_inbound(
    State(s): State<ApiState>,
    Path((account, raw)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let request: CreateInboundRequest = if body.trim().is_empty() {
        CreateInboundRequest::default()
    } else {
        serde_json::from_str(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!(
                    "the body must be {{\"secret\": NAME, \"rotate\": true|false}}, both optional: {e}"
                ),
            )
        })?
    };
    if let Some(name) = &request.secret {
        check_secret_name(name).map_err(|e| ApiError::bad_request("invalid_secret", e))?;
    }
    let (url, hook) = s
        .inbound
        .create(&account, &raw, request.secret, request.rotate)
        .await?;
    let answer = CreatedInbound {
        account_key: hook.account_key,
        provider: hook.provider,
        created_at: hook.created_at,
        secret: hook.secret,
        url,
        rotated: request.rotate,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

pub(super) async fn revoke_inbound(
    State(s): State<ApiState>,
    Path((account, raw)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let provider = provider(&raw)?;
    match s
        .inbound
        .revoke(&account, provider)
        .await
        .map_err(ApiError::internal)?
    {
        Some(hook) => {
            tracing::info!(%account, provider = raw, "inbound webhook revoked");
            Ok(Json(RevokedInbound {
                account_key: hook.account_key,
                provider: hook.provider,
                created_at: hook.created_at,
                secret: hook.secret,
                revoked: true,
            })
            .into_response())
        }
        None => Err(ApiError::not_found(format!(
            "account {account} has no inbound {raw} webhook"
        ))),
    }
}

fn number_answer(n: crate::inbound::numbers::Number) -> NumberAnswer {
    NumberAnswer {
        account_key: n.account_key,
        transport: n.transport,
        address: n.address,
        created_at: n.created_at,
    }
}

pub(super) async fn list_numbers(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let numbers = s
        .inbound
        .numbers
        .list(&account)
        .map_err(ApiError::internal)?;
    Ok(Json(NumberList {
        account_key: account,
        numbers: numbers.into_iter().map(number_answer).collect(),
    })
    .into_response())
}

pub(super) async fn add_number(
    State(s): State<ApiState>,
    Path((account, transport, address)): Path<(String, String, String)>,
) -> ApiResult {
    use crate::inbound::numbers::NumberError;
    let account = account_key(&account)?;
    let number = s
        .inbound
        .numbers
        .add(&account, &transport, &address)
        .map_err(|e| match e {
            NumberError::Invalid(why) => ApiError::bad_request("invalid_address", why),
            e @ NumberError::Taken { .. } => {
                ApiError::new(StatusCode::CONFLICT, "address_taken", e.to_string())
            }
            NumberError::Store(e) => ApiError::internal(e),
        })?;
    s.store.flush().await.map_err(ApiError::internal)?;
    tracing::info!(%account, transport, address = number.address, "address added");
    Ok(Json(number_answer(number)).into_response())
}

pub(super) async fn remove_number(
    State(s): State<ApiState>,
    Path((account, transport, address)): Path<(String, String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    match s
        .inbound
        .numbers
        .remove(&account, &transport, &address)
        .map_err(ApiError::internal)?
    {
        Some(number) => {
            s.store.flush().await.map_err(ApiError::internal)?;
            tracing::info!(%account, transport, address = number.address, "address removed");
            Ok(Json(number_answer(number)).into_response())
        }
        None => Err(ApiError::not_found(format!(
            "account {account} has no address {address:?} on {transport}"
        ))),
    }
}

impl From<InboundError> for ApiError {
    fn from(e: InboundError) -> Self {
        match &e {
            InboundError::NotFound => ApiError::not_found(e.to_string()),
            InboundError::NotConfigured(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_configured",
                e.to_string(),
            ),
            InboundError::Rejected(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "signature_rejected", e.to_string())
            }
            InboundError::Store(_) | InboundError::Records(_) => ApiError::internal(e),
            InboundError::Bus(bus) => ApiError::bus(&e, bus),
        }
    }
}

/// `POST /v1/inbound/{account}/{provider}/{secret}`: what a provider posts.
/// A provider's post. SendGrid Inbound Parse posts whole e-mails, files
/// and all (`multipart/form-data`): those are read up to four times the
/// deployment's file limit, once the URL's secret is known to be one;
/// everything else up to the API's body limit.
pub(super) struct InboundBody(axum::body::Bytes);

impl axum::extract::FromRequest<ApiState> for InboundBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, s: &ApiState) -> Result<Self, ApiError> {
        let multipart = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("multipart/form-data"));
        if !multipart {
            return RawBody::from_request(req, s)
                .await
                .map(|RawBody(b)| InboundBody(b));
        }
        // A large body is read only for a URL that is one.
        let (mut parts, body) = req.into_parts();
        let params =
            <axum::extract::RawPathParams as axum::extract::FromRequestParts<_>>::from_request_parts(
                &mut parts, s,
            )
            .await
            .map_err(|e| ApiError::not_found(e.body_text()))?;
        let param = |name: &str| {
            params
                .iter()
                .find_map(|(n, v)| (n == name).then_some(v))
                .unwrap_or_default()
        };
        s.inbound
            .opens(param("account"), param("provider"), param("secret"))?;
        let req = axum::extract::Request::from_parts(parts, body);
        let limit = usize::try_from(s.file_policy.max_bytes.saturating_mul(4))
            .unwrap_or(usize::MAX)
            .max(body_limit(s.max_event_bytes));
        axum::body::to_bytes(req.into_body(), limit)
            .await
            .map(InboundBody)
            .map_err(|e| {
                if !crate::deadline::too_large(&e) {
                    return ApiError::bad_request("invalid_body", e.to_string());
                }
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "an Inbound Parse post is read up to {limit} bytes (four times `[files] \
                         max_bytes`): {e}"
                    ),
                )
            })
    }
}

/// The path and query a request came to, as received (what a provider
/// signed, after the public URL).
fn path_and_query(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string())
}

/// `POST /v1/inbound/twilio-status/{account}`: a Twilio status callback
/// for a message `account` sent.
pub(super) async fn receive_twilio_status(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult {
    let path = path_and_query(&uri);
    let receipt = s
        .inbound
        .receive_twilio_status(&account, &path, &headers, &body)
        .await?;
    Ok(Json(receipt).into_response())
}

/// `POST /v1/inbound/sendgrid-events`: SendGrid's Signed Event Webhook,
/// each record for the account that sent its message.
pub(super) async fn receive_sendgrid_events(
    State(s): State<ApiState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult {
    let receipt = s.inbound.receive_sendgrid_events(&headers, &body).await?;
    Ok(Json(receipt).into_response())
}

pub(super) async fn receive_inbound(
    State(s): State<ApiState>,
    Path((account, raw, secret)): Path<(String, String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    InboundBody(body): InboundBody,
) -> ApiResult {
    let path = path_and_query(&uri);
    let receipt = s
        .inbound
        .receive(&account, &raw, &secret, &path, &headers, &body)
        .await?;
    Ok(Json(receipt).into_response())
}
