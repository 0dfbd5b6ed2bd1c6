//! `switchboard scripts …`: an account's Rhai scripts, stored, listed, shown,
//! removed and tried.

use switchboard_api::scripts::{RemovedScript, Script, ScriptList, StoredScript, VersionQuery};

use super::*;

/// `switchboard scripts put ACCOUNT NAME FILE`
pub async fn scripts_put(
    client: &Client,
    account_raw: &str,
    name: &str,
    file: &std::path::Path,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let (answer, shown): (StoredScript, String) = put_file(
        client,
        &paths::script(a.as_str(), name),
        file,
        "text/plain; charset=utf-8",
    )
    .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "stored {shown} as script {name} of account {a}, version {}\nuse it in a chain: handler = \"script:{name}\"",
        answer.version
    ))
}

/// `switchboard scripts list ACCOUNT`
pub async fn scripts_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: ScriptList = client.get(&paths::scripts(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!(
        "{:<24} {:<8} {:<28} lines",
        "script", "version", "stored at"
    );
    let empty = format!("account {a} has no scripts");
    Ok(rows(&answer.scripts, Some(header), empty, |s| {
        format!(
            "{:<24} {:<8} {:<28} {}",
            s.name,
            s.version,
            format_rfc3339(s.stored_at),
            s.lines
        )
    }))
}

/// `switchboard scripts show ACCOUNT NAME [--at VERSION]`: the source.
pub async fn scripts_show(
    client: &Client,
    account_raw: &str,
    name: &str,
    version: Option<u64>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: Script = client
        .get_with(&paths::script(a.as_str(), name), &VersionQuery { version })
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "// script {name} of account {a}, version {} (stored {})\n{}",
        answer.version,
        format_rfc3339(answer.stored_at),
        answer.source.trim_end()
    ))
}

/// `switchboard scripts rm ACCOUNT NAME`
pub async fn scripts_rm(
    client: &Client,
    account_raw: &str,
    name: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: RemovedScript = client.delete(&paths::script(a.as_str(), name)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "removed script {name} of account {a} (its {} version(s) are kept; a new put continues the numbering)",
        answer.version
    ))
}

/// `switchboard scripts test ACCOUNT NAME --event FILE`
pub async fn scripts_test(
    client: &Client,
    account_raw: &str,
    name: &str,
    event: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let sample = read_sample(event)?;
    let answer: switchboard_api::scripts::ScriptTest = client
        .post(&paths::script_test(a.as_str(), name), &sample)
        .await?;
    let failing = match answer["outcome"].as_str().unwrap_or_default() {
        outcome @ ("failed" | "retry") => vec![format!(
            "script {name}: {outcome}: {}",
            answer["error"].as_str().unwrap_or_default()
        )],
        _ => Vec::new(),
    };
    if json_out {
        return dry_run_result(pretty(&answer), failing);
    }
    let mut out = format!(
        "script {name} v{} (dry run: nothing was published)\noutcome: {}\n",
        answer["version"],
        answer["outcome"].as_str().unwrap_or_default()
    );
    render_run(&answer, "", &mut out);
    dry_run_result(out.trim_end().to_string(), failing)
}
