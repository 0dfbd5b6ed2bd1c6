//! Account tokens (the admin's): create, list, revoke.

use super::*;

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match &e {
            TokenError::InvalidName(_) => {
                ApiError::bad_request("invalid_token_name", e.to_string())
            }
            TokenError::Random(_)
            | TokenError::Corrupt { .. }
            | TokenError::Store(_)
            | TokenError::Records(_) => ApiError::internal(e),
        }
    }
}

/// Creates an account token and answers it, the only time it is shown.
pub(super) async fn create_token(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let request: NewTokenRequest = if body.trim().is_empty() {
        NewTokenRequest::default()
    } else {
        serde_json::from_str(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("the body must be {{\"name\": NAME}} (optional) or empty: {e}"),
            )
        })?
    };
    let new = s
        .auth
        .tokens()
        .create(&account, request.name.as_deref())
        .await?;
    tracing::info!(%account, token_id = new.record.id, "account token created");
    let answer = CreatedToken {
        id: new.record.id,
        account_key: new.record.account_key,
        name: new.record.name,
        created_at: new.record.created_at,
        token: new.token,
    };
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        Json(answer),
    )
        .into_response())
}

/// The account's tokens: ids, names and creation times, never the tokens.
pub(super) async fn list_tokens(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let tokens = s.auth.tokens().list(&account)?;
    Ok(Json(TokenList {
        account_key: account,
        tokens: tokens.iter().map(auth::TokenRecord::answer).collect(),
    })
    .into_response())
}

pub(super) async fn revoke_token(
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    match s.auth.tokens().revoke(&account, &id).await? {
        Some(record) => {
            tracing::info!(%account, token_id = record.id, "account token revoked");
            Ok(Json(RevokedToken {
                revoked: record.answer(),
                account_key: account,
            })
            .into_response())
        }
        None => Err(ApiError::not_found(format!(
            "account {account} has no token {id:?}"
        ))),
    }
}
