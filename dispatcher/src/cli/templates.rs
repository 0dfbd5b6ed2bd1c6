//! `switchboard templates …`: an account's message templates.

use switchboard_api::scripts::VersionQuery;
use switchboard_api::templates::{
    Template, TemplateHistory, TemplateList, TemplateRendered, TemplateSummary, TemplateTest,
};

use super::*;

/// `switchboard templates put ACCOUNT SLUG FILE`
pub async fn templates_put(
    client: &Client,
    account_raw: &str,
    slug: &str,
    file: &std::path::Path,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let (answer, shown): (Template, String) = put_file(
        client,
        &paths::template(a.as_str(), slug),
        file,
        "application/toml; charset=utf-8",
    )
    .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "stored {shown} as {} template {slug} of account {a}, version {}",
        answer.summary.channel, answer.summary.version
    ))
}

fn summary_rows(list: &[TemplateSummary], empty: String) -> String {
    let header = format!(
        "{:<24} {:<8} {:<8} stored at",
        "template", "channel", "version"
    );
    rows(list, Some(header), empty, |t| {
        format!(
            "{:<24} {:<8} {:<8} {}",
            t.slug,
            t.channel,
            t.version,
            format_rfc3339(t.stored_at)
        )
    })
}

/// `switchboard templates list ACCOUNT`
pub async fn templates_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: TemplateList = client.get(&paths::templates(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(summary_rows(
        &answer.templates,
        format!("account {a} has no templates (`switchboard templates put`)"),
    ))
}

/// `switchboard templates show ACCOUNT SLUG [--at VERSION]`: the file.
pub async fn templates_show(
    client: &Client,
    account_raw: &str,
    slug: &str,
    version: Option<u64>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: Template = client
        .get_with(
            &paths::template(a.as_str(), slug),
            &VersionQuery { version },
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "# template {slug} of account {a}, version {} (stored {})\n{}",
        answer.summary.version,
        format_rfc3339(answer.summary.stored_at),
        answer.source.unwrap_or_default().trim_end()
    ))
}

/// `switchboard templates versions ACCOUNT SLUG`
pub async fn templates_versions(
    client: &Client,
    account_raw: &str,
    slug: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: TemplateHistory = client
        .get(&paths::template_versions(a.as_str(), slug))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(summary_rows(
        &answer.versions,
        format!("template {slug} of account {a} has no versions"),
    ))
}

/// `switchboard templates test ACCOUNT SLUG [--context JSON] [--recipient JSON]`:
/// every part rendered.
pub async fn templates_test(
    client: &Client,
    account_raw: &str,
    slug: &str,
    context: Option<&str>,
    recipient: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let read = |arg: Option<&str>, what: &str| -> Result<Value, CliError> {
        arg.map_or(Ok(Value::Null), |arg| read_json_arg(arg, what))
    };
    let test = TemplateTest {
        context: read(context, "--context")?,
        recipient: read(recipient, "--recipient")?,
    };
    let answer: TemplateRendered = client
        .post(&paths::template_test(a.as_str(), slug), &test)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let mut out = format!(
        "{} template {slug} of account {a}, version {}\n",
        answer.summary.channel, answer.summary.version
    );
    for (part, text) in [
        ("subject", &answer.subject),
        ("html", &answer.html),
        ("text", &answer.text),
        ("idempotency", &answer.idempotency),
    ] {
        if let Some(text) = text {
            out.push_str(&format!("--- {part}\n{}\n", text.trim_end()));
        }
    }
    Ok(out.trim_end().to_string())
}

/// `switchboard templates rm ACCOUNT SLUG`
pub async fn templates_rm(
    client: &Client,
    account_raw: &str,
    slug: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: Template = client.delete(&paths::template(a.as_str(), slug)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "removed template {slug} of account {a} (its {} version(s) are kept; a new put continues the numbering)",
        answer.summary.version
    ))
}
