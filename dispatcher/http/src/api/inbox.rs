//! The in-app inbox over HTTP: a receiver's own routes under `/v1/inbox`
//! (its receiver token says whose inbox), and the account's routes for
//! any of its receivers under `/v1/accounts/{account}/inbox/{receiver}`
//! (support staff, and the account's server minting receiver tokens).

use switchboard_api::inbox::{
    InboxCount, InboxList, InboxQuery, NewReceiverToken, ReadAll, ReadAllQuery, ReceiverToken,
    RotatedReceiverKey,
};
use switchboard_handlers::records::inbox::{check_label, check_receiver};
use switchboard_handlers::records::{Cursor, InboxFilter, Mark};

use super::*;
use crate::receiver_tokens::{self, MintError};

/// Whose inbox a request is about.
struct Receiver {
    account: AccountKey,
    receiver: String,
}

/// Whose inbox a `/v1/inbox` request is about: its receiver token's.
fn receiver_of(principal: &Principal) -> Result<Receiver, ApiError> {
    match principal {
        Principal::Receiver(r) => Ok(Receiver {
            account: r.account.clone(),
            receiver: r.receiver.clone(),
        }),
        // `auth::access` lets only receiver tokens here.
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the /v1/inbox routes need a receiver token",
        )),
    }
}

/// The receiver an account route names.
fn named(account: &str, receiver: String) -> Result<Receiver, ApiError> {
    let account = account_key(account)?;
    check_receiver(&receiver).map_err(|e| ApiError::bad_request("invalid_receiver", e))?;
    Ok(Receiver { account, receiver })
}

fn category(raw: Option<String>) -> Result<Option<String>, ApiError> {
    if let Some(c) = &raw {
        check_label(c).map_err(|e| ApiError::bad_request("invalid_category", e))?;
    }
    Ok(raw)
}

fn listing(s: &ApiState, who: Receiver, q: InboxQuery) -> ApiResult {
    let before = q
        .before
        .as_deref()
        .map(str::parse::<Cursor>)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_cursor", format!("before: {e}")))?;
    let filter = InboxFilter {
        unread: q.unread,
        category: category(q.category.clone())?,
        archived: q.archived.unwrap_or(false),
    };
    let page = s
        .inbox
        .page(
            &who.account,
            &who.receiver,
            &filter,
            before.as_ref(),
            q.effective_limit(),
        )
        .map_err(ApiError::internal)?;
    let count = s
        .inbox
        .count(&who.account, &who.receiver)
        .map_err(ApiError::internal)?;
    Ok(Json(InboxList {
        account_key: who.account,
        receiver: who.receiver,
        unread: count.unread,
        total: count.total,
        notifications: page.notifications.iter().map(to_json).collect(),
        next: page.next.map(|c| c.to_string()),
    })
    .into_response())
}

fn counts(s: &ApiState, who: &Receiver) -> Result<InboxCount, ApiError> {
    let count = s
        .inbox
        .count(&who.account, &who.receiver)
        .map_err(ApiError::internal)?;
    Ok(InboxCount {
        unread: count.unread,
        total: count.total,
    })
}

async fn mark(s: &ApiState, who: Receiver, id: &str, action: &str) -> ApiResult {
    let mark = match action {
        "read" => Mark::Read,
        "unread" => Mark::Unread,
        "archive" => Mark::Archive,
        "unarchive" => Mark::Unarchive,
        other => {
            return Err(ApiError::not_found(format!(
                "no such action {other:?} on a notification: use read, unread, archive or \
                 unarchive"
            )));
        }
    };
    let Some(changed) = s
        .inbox
        .mark(&who.account, &who.receiver, id, mark)
        .map_err(ApiError::internal)?
    else {
        return Err(ApiError::not_found(format!(
            "{} has no notification {id:?}",
            who.receiver
        )));
    };
    s.store.flush().await.map_err(ApiError::internal)?;
    Ok(Json(to_json(&changed)).into_response())
}

async fn read_all(s: &ApiState, who: Receiver, q: ReadAllQuery) -> ApiResult {
    let category = category(q.category)?;
    let marked = s
        .inbox
        .read_all(&who.account, &who.receiver, category.as_deref())
        .map_err(ApiError::internal)?;
    s.store.flush().await.map_err(ApiError::internal)?;
    let count = counts(s, &who)?;
    Ok(Json(ReadAll {
        marked,
        unread: count.unread,
        total: count.total,
    })
    .into_response())
}

pub(super) async fn own_inbox(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<InboxQuery>,
) -> ApiResult {
    listing(&s, receiver_of(&principal)?, q)
}

pub(super) async fn own_count(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
) -> ApiResult {
    Ok(Json(counts(&s, &receiver_of(&principal)?)?).into_response())
}

pub(super) async fn own_mark(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult {
    mark(&s, receiver_of(&principal)?, &id, &action).await
}

pub(super) async fn own_read_all(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<ReadAllQuery>,
) -> ApiResult {
    read_all(&s, receiver_of(&principal)?, q).await
}

pub(super) async fn show_inbox(
    State(s): State<ApiState>,
    Path((account, receiver)): Path<(String, String)>,
    Query(q): Query<InboxQuery>,
) -> ApiResult {
    listing(&s, named(&account, receiver)?, q)
}

pub(super) async fn inbox_count(
    State(s): State<ApiState>,
    Path((account, receiver)): Path<(String, String)>,
) -> ApiResult {
    Ok(Json(counts(&s, &named(&account, receiver)?)?).into_response())
}

pub(super) async fn inbox_mark(
    State(s): State<ApiState>,
    Path((account, receiver, id, action)): Path<(String, String, String, String)>,
) -> ApiResult {
    mark(&s, named(&account, receiver)?, &id, &action).await
}

pub(super) async fn inbox_read_all(
    State(s): State<ApiState>,
    Path((account, receiver)): Path<(String, String)>,
    Query(q): Query<ReadAllQuery>,
) -> ApiResult {
    read_all(&s, named(&account, receiver)?, q).await
}

/// Mints a receiver token (the body, `{"ttl": "24h"}`, may be left out).
pub(super) async fn mint_receiver_token(
    State(s): State<ApiState>,
    Path((account, receiver)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> ApiResult {
    let who = named(&account, receiver)?;
    let request: NewReceiverToken = if body.iter().all(u8::is_ascii_whitespace) {
        NewReceiverToken::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("the body: {e}")))?
    };
    let ttl = match &request.ttl {
        Some(text) => switchboard_rules::duration::parse(text)
            .map_err(|e| ApiError::bad_request("invalid_ttl", format!("ttl: {e}")))?,
        None => receiver_tokens::DEFAULT_TTL,
    };
    let minted = s
        .auth
        .receivers()
        .mint(&who.account, &who.receiver, ttl)
        .map_err(|e| match e {
            MintError::Receiver(_) => ApiError::bad_request("invalid_receiver", e.to_string()),
            MintError::Ttl(_) => ApiError::bad_request("invalid_ttl", e.to_string()),
            MintError::Records(e) => ApiError::internal(e),
        })?;
    // A key made just now must outlive a crash before the token is used.
    s.store.flush().await.map_err(ApiError::internal)?;
    Ok((
        StatusCode::CREATED,
        Json(ReceiverToken {
            account_key: who.account,
            receiver: who.receiver,
            token: minted.token,
            expires_at: minted.expires_at,
        }),
    )
        .into_response())
}

/// Ends every receiver token of the account.
pub(super) async fn rotate_receiver_tokens(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    s.auth
        .receivers()
        .rotate(&account)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(RotatedReceiverKey {
        account_key: account,
        rotated: true,
    })
    .into_response())
}

/// `GET /inbox/widget.js`: the `<switchboard-inbox>` web component.
pub(super) async fn inbox_widget() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
            (
                header::HeaderName::from_static("access-control-allow-origin"),
                "*",
            ),
        ],
        include_str!("inbox_widget.js"),
    )
        .into_response()
}

/// The receiver's routes are called from the account's own pages, on
/// another origin: they answer any origin, and preflight requests, without
/// a token. Safe because a receiver token travels in a header, never in a
/// cookie, so another site cannot make a browser use one unasked.
pub(super) async fn inbox_cors(
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if !auth::is_receiver_route(request.uri().path()) {
        return next.run(request).await;
    }
    let allow_origin = (
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    if request.method() == axum::http::Method::OPTIONS {
        return (
            StatusCode::NO_CONTENT,
            [
                allow_origin,
                (
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    header::HeaderValue::from_static("GET, POST"),
                ),
                (
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    header::HeaderValue::from_static("authorization, last-event-id, accept"),
                ),
                (
                    header::ACCESS_CONTROL_MAX_AGE,
                    header::HeaderValue::from_static("600"),
                ),
            ],
        )
            .into_response();
    }
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(allow_origin.0, allow_origin.1);
    response
}
