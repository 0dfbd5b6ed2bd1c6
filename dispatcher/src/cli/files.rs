//! `switchboard files …`: the files an account attaches to its e-mails.

use switchboard_api::records::{FileList, RemovedFile};
use switchboard_handlers::records::FileInfo;

use super::*;

/// `switchboard files put ACCOUNT NAME PATH`
pub async fn files_put(
    client: &Client,
    account_raw: &str,
    name: &str,
    path: &std::path::Path,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::Input(format!("reading {}: {e}", path.display())))?;
    let answer: FileInfo = client
        .put_bytes(&paths::file(a.as_str(), name), bytes)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "stored {} as file {name} of account {a}: {}, {} bytes, sha256 {}",
        path.display(),
        answer.content_type,
        answer.size,
        answer.sha256
    ))
}

/// `switchboard files list ACCOUNT`
pub async fn files_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = paths::files(a.as_str());
    let answer: FileList = client.get(&path).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let files: Vec<FileInfo> = decode_all(answer.files, &path)?;
    let header = format!("{:<32} {:<18} {:>10}  stored at", "file", "type", "bytes");
    let empty = format!("account {a} has no files (`switchboard files put {a} NAME PATH`)");
    Ok(rows(&files, Some(header), empty, |f| {
        format!(
            "{:<32} {:<18} {:>10}  {}",
            f.name,
            f.content_type,
            f.size,
            format_rfc3339(f.created_at)
        )
    }))
}

/// `switchboard files rm ACCOUNT NAME`
pub async fn files_rm(
    client: &Client,
    account_raw: &str,
    name: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: RemovedFile = client.delete(&paths::file(a.as_str(), name)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!("removed file {name} of account {a}"))
}
