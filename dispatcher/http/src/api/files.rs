//! Files: what an account keeps to attach to its e-mails (`send_email`'s
//! `attachments`), by name.

use switchboard_api::records::{FileList, RemovedFile};
use switchboard_handlers::records::{FileInfo, FileRefused};

use super::*;

/// A file's bytes as sent, read up to the deployment's file limit (not the
/// API's body limit, which is for events and chain files) and one byte
/// more, so that a larger file is told apart.
pub(super) struct FileBody(Vec<u8>);

impl axum::extract::FromRequest<ApiState> for FileBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, s: &ApiState) -> Result<Self, ApiError> {
        let limit = usize::try_from(s.file_policy.max_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let body = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| {
                if !crate::deadline::too_large(&e) {
                    return ApiError::bad_request("invalid_body", e.to_string());
                }
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "file_too_large",
                    format!(
                        "the file is larger than this deployment keeps: {} bytes (`[files] \
                         max_bytes`): {e}",
                        s.file_policy.max_bytes
                    ),
                )
            })?;
        Ok(FileBody(body.to_vec()))
    }
}

fn refused(e: FileRefused) -> ApiError {
    match e {
        FileRefused::Name(why) => ApiError::bad_request("invalid_file_name", why),
        e @ FileRefused::TooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            e.to_string(),
        ),
        e @ (FileRefused::Type { .. } | FileRefused::Extension { .. }) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "file_type_refused",
            e.to_string(),
        ),
    }
}

pub(super) async fn list_files(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let files = s.files.list(&account).await.map_err(ApiError::internal)?;
    Ok(Json(FileList {
        account_key: account,
        files: files.iter().map(to_json).collect(),
    })
    .into_response())
}

pub(super) async fn put_file(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    FileBody(bytes): FileBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let content_type = s.file_policy.check(&name, &bytes).map_err(refused)?;
    let info: FileInfo = s
        .files
        .put(&account, &name, content_type, bytes)
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(%account, file = name, size = info.size, content_type, "file stored");
    Ok(Json(info).into_response())
}

pub(super) async fn get_file(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    match s
        .files
        .get(&account, &name)
        .await
        .map_err(ApiError::internal)?
    {
        Some((info, bytes)) => Ok((
            [
                (header::CONTENT_TYPE, info.content_type),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{}\"", info.name),
                ),
            ],
            bytes,
        )
            .into_response()),
        None => Err(ApiError::not_found(format!(
            "account {account} has no file {name:?}"
        ))),
    }
}

pub(super) async fn remove_file(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    if !s
        .files
        .remove(&account, &name)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::not_found(format!(
            "account {account} has no file {name:?}"
        )));
    }
    tracing::info!(%account, file = name, "file removed");
    Ok(Json(RemovedFile {
        account_key: account,
        name,
        removed: true,
    })
    .into_response())
}
