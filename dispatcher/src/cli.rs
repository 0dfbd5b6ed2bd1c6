//! What the CLI's commands do, apart from parsing their arguments: each calls
//! the API and returns the text to print — for people, or JSON with `--json`.

use std::fmt::Write as _;

use serde_json::{Value, json};
use switchboard_rules::{ChainFile, ChainSpec, Format, parse_chain_file};
use switchboard_sdk::{
    AccountKey, ConversationKey, ConversationType, EventId, EventType, VumiApiEvent,
};

use crate::client::{Client, ClientError};

/// A command that failed: one line for stderr.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API call failed.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The arguments or a file are bad.
    #[error("{0}")]
    Input(String),
}

fn input(e: impl std::fmt::Display) -> CliError {
    CliError::Input(e.to_string())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("a JSON value prints")
}

fn account(raw: &str) -> Result<AccountKey, CliError> {
    AccountKey::new(raw).map_err(input)
}

/// What `emit` sends.
#[derive(Debug, Clone)]
pub struct EmitArgs {
    /// Account.
    pub account: String,
    /// Conversation type.
    pub conversation_type: String,
    /// Event type.
    pub event_type: String,
    /// Conversation key.
    pub conversation: String,
    /// `event_data` as JSON text.
    pub data: String,
    /// An id to use (for an idempotent retry).
    pub id: Option<String>,
}

/// `switchboard emit`: builds an event and posts it.
pub async fn emit(client: &Client, args: EmitArgs, json_out: bool) -> Result<String, CliError> {
    let data: Value =
        serde_json::from_str(&args.data).map_err(|e| input(format!("--data is not JSON: {e}")))?;
    let Value::Object(data) = data else {
        return Err(input("--data must be a JSON object, e.g. '{\"score\": 4}'"));
    };
    let mut event = VumiApiEvent::new(
        account(&args.account)?,
        ConversationKey::new(args.conversation).map_err(input)?,
        ConversationType::new(args.conversation_type).map_err(input)?,
        EventType::new(args.event_type).map_err(input)?,
        data,
    );
    if let Some(id) = args.id {
        event.id = EventId::parse(&id).map_err(|e| input(format!("--id: {e}")))?;
        event.root_id = event.id;
    }
    let body = serde_json::to_value(&event).expect("an event serialises");
    let answer = client.post("/v1/events", &body).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let dup = if answer["duplicate"] == json!(true) {
        " (duplicate: already on the bus)"
    } else {
        ""
    };
    Ok(format!(
        "accepted event {} on {}{dup}\nsee what it did: switchboard trace {} {}",
        answer["id"].as_str().unwrap_or_default(),
        answer["subject"].as_str().unwrap_or_default(),
        event.account_key,
        answer["id"].as_str().unwrap_or_default(),
    ))
}

/// `switchboard chains apply FILE...`
pub async fn chains_apply(
    client: &Client,
    files: &[std::path::PathBuf],
    json_out: bool,
) -> Result<String, CliError> {
    let mut out = String::new();
    let mut answers = Vec::new();
    for path in files {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| input(format!("reading {shown}: {e}")))?;
        let format = Format::from_path(&shown);
        // Parsed here to learn the account and to report syntax errors with
        // the file's name; the dispatcher checks everything else.
        let file = parse_chain_file(&text, format, &shown).map_err(input)?;
        let content_type = match format {
            Format::Json => "application/json",
            Format::Toml => "application/toml",
        };
        let path_url = format!("/v1/accounts/{}/chains", file.account_key);
        let answer = client
            .put_text(&path_url, text, content_type)
            .await
            .map_err(|e| match e {
                ClientError::Api { message, .. } => input(format!("{shown}: {message}")),
                other => CliError::Client(other),
            })?;
        let _ = writeln!(
            out,
            "applied {shown}: account {} now at chain version {} ({} chains)",
            file.account_key,
            answer["version"],
            answer["chains"].as_array().map_or(0, Vec::len)
        );
        answers.push(answer);
    }
    if json_out {
        return Ok(pretty(&Value::Array(answers)));
    }
    Ok(out.trim_end().to_string())
}

fn chains_of(version: &Value) -> Vec<ChainSpec> {
    serde_json::from_value(version["chains"].clone()).unwrap_or_default()
}

fn describe_match(c: &ChainSpec) -> String {
    let mut m = format!("{}/{}", c.conversation_type, c.event_type);
    if let Some(k) = &c.conversation_key {
        let _ = write!(m, " in {k}");
    }
    m
}

/// `switchboard chains list ACCOUNT`
pub async fn chains_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let version = client.get(&format!("/v1/accounts/{a}/chains")).await?;
    if json_out {
        return Ok(pretty(&version));
    }
    let chains = chains_of(&version);
    let mut out = format!("account {a}, chain version {}\n", version["version"]);
    if chains.is_empty() {
        out.push_str("(no chains)");
    }
    for c in &chains {
        let steps: Vec<&str> = c.steps.iter().map(|s| s.handler.as_str()).collect();
        let _ = writeln!(
            out,
            "{:<24} {:<36} {}",
            c.name,
            describe_match(c),
            steps.join(" → ")
        );
    }
    Ok(out.trim_end().to_string())
}

/// `switchboard chains show ACCOUNT [CHAIN]`: the chains as a TOML chain file
/// (which `chains apply` reads back).
pub async fn chains_show(
    client: &Client,
    account_raw: &str,
    chain: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let version = client.get(&format!("/v1/accounts/{a}/chains")).await?;
    let mut chains = chains_of(&version);
    if let Some(name) = chain {
        chains.retain(|c| c.name == name);
        if chains.is_empty() {
            return Err(input(format!("account {a} has no chain named {name:?}")));
        }
    }
    let file = ChainFile {
        account_key: a,
        chains,
    };
    if json_out {
        return Ok(pretty(
            &serde_json::to_value(&file).expect("a chain file serialises"),
        ));
    }
    let toml =
        toml::to_string(&file).map_err(|e| input(format!("showing as TOML: {e}; try --json")))?;
    Ok(format!(
        "# chain version {}\n{}",
        version["version"],
        toml.trim_end()
    ))
}

/// `switchboard chains history ACCOUNT`
pub async fn chains_history(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let history = client
        .get(&format!("/v1/accounts/{a}/chain-versions"))
        .await?;
    if json_out {
        return Ok(pretty(&history));
    }
    let mut out = format!(
        "{:<8} {:<28} {:<24} chains\n",
        "version", "applied at", "change"
    );
    for v in history["versions"].as_array().into_iter().flatten() {
        let names: Vec<&str> = v["chains"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "{:<8} {:<28} {:<24} {}",
            v["version"].to_string(),
            v["applied_at"].as_str().unwrap_or_default(),
            v["change"].as_str().unwrap_or_default(),
            if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    Ok(out.trim_end().to_string())
}

/// `switchboard chains restore ACCOUNT VERSION`
pub async fn chains_restore(
    client: &Client,
    account_raw: &str,
    version: u64,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = client
        .post(
            &format!("/v1/accounts/{a}/chain-versions/{version}/restore"),
            &json!({}),
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "restored version {version} of account {a} as version {}",
        answer["version"]
    ))
}

/// `switchboard chains rm ACCOUNT CHAIN` or `--all`
pub async fn chains_rm(
    client: &Client,
    account_raw: &str,
    chain: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = match chain {
        Some(name) => {
            client
                .delete(&format!("/v1/accounts/{a}/chains/{name}"))
                .await?
        }
        None => client.delete(&format!("/v1/accounts/{a}/chains")).await?,
    };
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(match chain {
        Some(name) => format!(
            "removed chain {name:?} of account {a}; now at version {}",
            answer["version"]
        ),
        None => format!(
            "removed every chain of account {a}; now at version {}",
            answer["version"]
        ),
    })
}

/// `switchboard trace ACCOUNT ID`
pub async fn trace(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let id = EventId::parse(id).map_err(input)?;
    let trace = client
        .get(&format!("/v1/accounts/{a}/events/{id}/trace"))
        .await?;
    if json_out {
        return Ok(pretty(&trace));
    }
    Ok(render_trace(&trace))
}

/// A trace, for people.
pub fn render_trace(t: &Value) -> String {
    let e = &t["event"];
    let mut out = format!(
        "event {} ({}/{}, conversation {}, depth {})\nstatus: {}\n",
        e["id"].as_str().unwrap_or_default(),
        e["conversation_type"].as_str().unwrap_or_default(),
        e["event_type"].as_str().unwrap_or_default(),
        e["conversation_key"].as_str().unwrap_or_default(),
        e["depth"],
        t["status"].as_str().unwrap_or_default(),
    );
    if let Some(parent) = t["parent_id"].as_str() {
        let _ = writeln!(out, "emitted by: {parent}");
    }
    let chains = t["chains"].as_array().cloned().unwrap_or_default();
    if chains.is_empty() {
        out.push_str("no chain ran\n");
    }
    for c in chains {
        let _ = writeln!(
            out,
            "chain {} (version {})",
            c["name"].as_str().unwrap_or_default(),
            c["version"]
        );
        for (i, s) in c["steps"].as_array().into_iter().flatten().enumerate() {
            let _ = write!(
                out,
                "  {}. {:<20} {:<8} {:>3} attempt(s) {:>8.2} ms",
                i + 1,
                s["name"].as_str().unwrap_or_default(),
                s["outcome"].as_str().unwrap_or_default(),
                s["attempts"].to_string(),
                s["duration_ms"].as_f64().unwrap_or(0.0),
            );
            if let Some(output) = s["output"].as_object().filter(|o| !o.is_empty()) {
                let _ = write!(
                    out,
                    "  output {}",
                    shorten(&Value::Object(output.clone()).to_string(), 100)
                );
            }
            if let Some(error) = s["error"].as_str() {
                let _ = write!(out, "\n     error: {error}");
            }
            out.push('\n');
        }
    }
    let children: Vec<&str> = t["children"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !children.is_empty() {
        let _ = writeln!(out, "emitted: {}", children.join(", "));
    }
    out.trim_end().to_string()
}

/// `switchboard dead-letters list ACCOUNT`
pub async fn dead_letters_list(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let path = format!("/v1/accounts/{account_raw}/dead-letters?limit={limit}");
    let empty = format!("account {account_raw} has no dead letters");
    list(client, &path, "dead_letters", json_out, None, empty, |l| {
        let status = match l["status"].as_str() {
            Some("replaying") => " (replaying)",
            _ => "",
        };
        format!(
            "{}  {}  {:<11} {}{status}",
            l["id"].as_str().unwrap_or_default(),
            l["at"].as_str().unwrap_or_default(),
            l["reason"].as_str().unwrap_or_default(),
            l["error"].as_str().unwrap_or_default(),
        )
    })
    .await
}

/// `switchboard dead-letters show ACCOUNT ID`
pub async fn dead_letters_show(
    client: &Client,
    account_raw: &str,
    id: &str,
) -> Result<String, CliError> {
    let answer = client
        .get(&format!("/v1/accounts/{account_raw}/dead-letters/{id}"))
        .await?;
    Ok(pretty(&answer))
}

/// `switchboard dead-letters replay ACCOUNT ID`
pub async fn dead_letters_replay(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let answer = client
        .post(
            &format!("/v1/accounts/{account_raw}/dead-letters/{id}/replay"),
            &Value::Null,
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let letter = &answer["replayed"];
    let at = match (letter["chain"].as_str(), letter["step"].as_str()) {
        (Some(chain), Some(step)) if step != "when" => {
            format!("; chain {chain} resumes at step {step}")
        }
        _ => String::new(),
    };
    Ok(format!(
        "replayed dead letter {id}: event {} is back on the bus{at}",
        letter["event"]["id"].as_str().unwrap_or("?")
    ))
}

/// `switchboard dead-letters replay ACCOUNT --all [--chain NAME] [--since T]`.
/// `since` is an RFC 3339 time or a duration back from now (`"2h"`).
pub async fn dead_letters_replay_all(
    client: &Client,
    account_raw: &str,
    chain: Option<&str>,
    since: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let mut filter = serde_json::Map::new();
    if let Some(chain) = chain {
        filter.insert("chain".into(), Value::String(chain.to_string()));
    }
    if let Some(since) = since {
        filter.insert("since".into(), Value::String(since_time(since)?));
    }
    let answer = client
        .post(
            &format!("/v1/accounts/{account_raw}/dead-letters/replay"),
            &Value::Object(filter),
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let replayed = answer["replayed"].as_array().map_or(0, Vec::len);
    let mut out = format!("replayed {replayed} dead letters of account {account_raw}");
    for skipped in answer["skipped"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            "\nskipped {}: {}",
            skipped["id"].as_str().unwrap_or("?"),
            skipped["error"].as_str().unwrap_or("?")
        );
    }
    Ok(out)
}

/// An RFC 3339 time given as one, or as a duration back from now.
fn since_time(raw: &str) -> Result<String, CliError> {
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(raw, rfc3339) {
        return Ok(t.format(rfc3339).expect("a parsed time formats"));
    }
    let ago = switchboard_rules::duration::parse(raw).map_err(|_| {
        input(format!(
            "--since {raw:?} is neither an RFC 3339 time (2026-11-22T09:00:00Z) nor a duration back \
             from now (30m, 2h, 1d)"
        ))
    })?;
    Ok((switchboard_sdk::now() - ago)
        .format(rfc3339)
        .expect("a time formats"))
}

/// `switchboard dead-letters discard ACCOUNT ID`
pub async fn dead_letters_discard(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let answer = client
        .delete(&format!("/v1/accounts/{account_raw}/dead-letters/{id}"))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "discarded dead letter {id} of account {account_raw}"
    ))
}

fn read_json_file(path: &std::path::Path) -> Result<Value, CliError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| input(format!("reading {shown}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| input(format!("{shown} is not JSON: {e}")))
}

/// `switchboard scripts put ACCOUNT NAME FILE`
pub async fn scripts_put(
    client: &Client,
    account_raw: &str,
    name: &str,
    file: &std::path::Path,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let shown = file.display().to_string();
    let source =
        std::fs::read_to_string(file).map_err(|e| input(format!("reading {shown}: {e}")))?;
    let answer = client
        .put_text(
            &format!("/v1/accounts/{a}/scripts/{name}"),
            source,
            "text/plain; charset=utf-8",
        )
        .await
        .map_err(|e| match e {
            ClientError::Api { message, .. } => input(format!("{shown}: {message}")),
            other => CliError::Client(other),
        })?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "stored {shown} as script {name} of account {a}, version {}\nuse it in a chain: handler = \"script:{name}\"",
        answer["version"]
    ))
}

/// `switchboard scripts list ACCOUNT`
pub async fn scripts_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = client.get(&format!("/v1/accounts/{a}/scripts")).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let scripts = answer["scripts"].as_array().cloned().unwrap_or_default();
    if scripts.is_empty() {
        return Ok(format!("account {a} has no scripts"));
    }
    let mut out = format!(
        "{:<24} {:<8} {:<28} lines\n",
        "script", "version", "stored at"
    );
    for s in scripts {
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<28} {}",
            s["name"].as_str().unwrap_or_default(),
            s["version"].to_string(),
            s["stored_at"].as_str().unwrap_or_default(),
            s["lines"]
        );
    }
    Ok(out.trim_end().to_string())
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
    let mut path = format!("/v1/accounts/{a}/scripts/{name}");
    if let Some(v) = version {
        let _ = write!(path, "?version={v}");
    }
    let answer = client.get(&path).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "// script {name} of account {a}, version {} (stored {})\n{}",
        answer["version"],
        answer["stored_at"].as_str().unwrap_or_default(),
        answer["source"].as_str().unwrap_or_default().trim_end()
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
    let answer = client
        .delete(&format!("/v1/accounts/{a}/scripts/{name}"))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "removed script {name} of account {a} (its {} version(s) are kept; a new put continues the numbering)",
        answer["version"]
    ))
}

/// `switchboard scripts test ACCOUNT NAME --event FILE`
pub async fn scripts_test(
    client: &Client,
    account_raw: &str,
    name: &str,
    event_file: &std::path::Path,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let sample = read_json_file(event_file)?;
    let answer = client
        .post(&format!("/v1/accounts/{a}/scripts/{name}/test"), &sample)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let mut out = format!(
        "script {name} v{} (dry run: nothing was published)\noutcome: {}\n",
        answer["version"],
        answer["outcome"].as_str().unwrap_or_default()
    );
    render_run(&answer, "", &mut out);
    Ok(out.trim_end().to_string())
}

/// The output, error, emits, logs and cost of a dry-run step.
fn render_run(run: &Value, indent: &str, out: &mut String) {
    if let Some(output) = run["output"].as_object().filter(|o| !o.is_empty()) {
        let _ = writeln!(out, "{indent}output: {}", Value::Object(output.clone()));
    }
    if let Some(error) = run["error"].as_str() {
        let _ = writeln!(out, "{indent}error: {error}");
    }
    if let Some(after) = run["retry_after_ms"].as_u64() {
        let _ = writeln!(out, "{indent}retry after: {after} ms");
    }
    if let Some(would) = run.get("would_run") {
        let _ = writeln!(
            out,
            "{indent}would run {} with config {} (not performed)",
            would["handler"].as_str().unwrap_or_default(),
            would["config"]
        );
    }
    for e in run["emits"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{indent}would emit {}/{} in {}: {}",
            e["conversation_type"].as_str().unwrap_or_default(),
            e["event_type"].as_str().unwrap_or_default(),
            e["conversation_key"].as_str().unwrap_or_default(),
            e["event_data"]
        );
    }
    for l in run["logs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{indent}log {}: {}",
            l["level"].as_str().unwrap_or_default(),
            l["message"].as_str().unwrap_or_default()
        );
    }
    if let Some(ops) = run["operations"].as_u64() {
        let _ = writeln!(
            out,
            "{indent}{ops} operations, {:.3} ms",
            run["duration_ms"].as_f64().unwrap_or(0.0)
        );
    }
}

/// `switchboard chains test ACCOUNT --event FILE`
pub async fn chains_test(
    client: &Client,
    account_raw: &str,
    event_file: &std::path::Path,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let sample = read_json_file(event_file)?;
    let answer = client
        .post(&format!("/v1/accounts/{a}/chain-test"), &sample)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let mut out = format!(
        "account {a}, chain version {} (dry run: nothing was performed or published)\n",
        answer["chain_version"]
    );
    if answer["unrouted"] == json!(true) {
        out.push_str("no chain would run: the event would be unrouted\n");
    }
    for c in answer["chains"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or_default();
        let when = c["when"]
            .as_str()
            .map(|w| format!(" (when {w})"))
            .unwrap_or_default();
        match c["condition"].as_str().unwrap_or_default() {
            "false" => {
                let _ = writeln!(
                    out,
                    "chain {name}: matches, but its condition is false{when}"
                );
            }
            "error" => {
                let _ = writeln!(
                    out,
                    "chain {name}: its condition fails{when}: {}",
                    c["error"].as_str().unwrap_or_default()
                );
            }
            _ => {
                let _ = writeln!(out, "chain {name}: runs{when}");
                for (i, s) in c["steps"].as_array().into_iter().flatten().enumerate() {
                    let _ = writeln!(
                        out,
                        "  {}. {} ({}): {}",
                        i + 1,
                        s["name"].as_str().unwrap_or_default(),
                        s["handler"].as_str().unwrap_or_default(),
                        s["outcome"].as_str().unwrap_or_default()
                    );
                    render_run(s, "     ", &mut out);
                }
            }
        }
    }
    Ok(out.trim_end().to_string())
}

/// `switchboard secrets set ACCOUNT NAME`: the value from `--value`, or stdin.
pub async fn secrets_set(
    client: &Client,
    account_raw: &str,
    name: &str,
    value: Option<String>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let value = match value {
        Some(v) => v,
        None => {
            let mut v = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut v)
                .map_err(|e| input(format!("reading the secret from stdin: {e}")))?;
            v
        }
    };
    let answer = client
        .put_text(
            &format!("/v1/accounts/{a}/secrets/{name}"),
            value,
            "text/plain",
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!("secret {name:?} of account {a} set"))
}

/// `switchboard secrets list ACCOUNT`: names only; values are never read back.
pub async fn secrets_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = format!("/v1/accounts/{a}/secrets");
    let empty = format!("account {a} has no secrets");
    list(client, &path, "secrets", json_out, None, empty, |name| {
        name.as_str().unwrap_or_default().to_string()
    })
    .await
}

/// `switchboard secrets rm ACCOUNT NAME`
pub async fn secrets_rm(
    client: &Client,
    account_raw: &str,
    name: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = client
        .delete(&format!("/v1/accounts/{a}/secrets/{name}"))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!("secret {name:?} of account {a} removed"))
}

/// `switchboard contacts list ACCOUNT`
pub async fn contacts_list(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = format!("/v1/accounts/{a}/contacts?limit={limit}");
    let header = format!("{:<38} {:<16} {:<28} name", "key", "msisdn", "email");
    let empty = format!("account {a} has no contacts");
    list(
        client,
        &path,
        "contacts",
        json_out,
        Some(header),
        empty,
        |c| {
            format!(
                "{:<38} {:<16} {:<28} {}",
                c["key"].as_str().unwrap_or_default(),
                c["msisdn"].as_str().unwrap_or("-"),
                c["email"].as_str().unwrap_or("-"),
                c["name"].as_str().unwrap_or("-"),
            )
        },
    )
    .await
}

/// `switchboard contacts show ACCOUNT KEY|MSISDN|EMAIL`
pub async fn contacts_show(
    client: &Client,
    account_raw: &str,
    key: &str,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = client
        .get(&format!("/v1/accounts/{a}/contacts/{}", url_segment(key)))
        .await?;
    Ok(pretty(&answer))
}

/// `switchboard messages list ACCOUNT`
pub async fn messages_list(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = format!("/v1/accounts/{a}/messages?limit={limit}");
    let empty = format!("account {a} has no messages");
    list(client, &path, "messages", json_out, None, empty, |m| {
        format!(
            "{}  {:<5} {:<9} {:<28} {}",
            m["id"].as_str().unwrap_or_default(),
            m["channel"].as_str().unwrap_or_default(),
            m["status"].as_str().unwrap_or_default(),
            m["recipient"].as_str().unwrap_or_default(),
            m["provider"].as_str().unwrap_or_default(),
        )
    })
    .await
}

/// Gets `path` and prints the answer as JSON with `--json`, or else one line
/// per item of its `field` array (after `header`), or `empty` when there is none.
async fn list(
    client: &Client,
    path: &str,
    field: &str,
    json_out: bool,
    header: Option<String>,
    empty: String,
    row: impl Fn(&Value) -> String,
) -> Result<String, CliError> {
    let answer = client.get(path).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let items = answer[field].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return Ok(empty);
    }
    let lines = header.into_iter().chain(items.iter().map(row));
    Ok(lines.collect::<Vec<_>>().join("\n").trim_end().to_string())
}

/// `switchboard messages show ACCOUNT ID`
pub async fn messages_show(
    client: &Client,
    account_raw: &str,
    id: &str,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = client
        .get(&format!("/v1/accounts/{a}/messages/{}", url_segment(id)))
        .await?;
    Ok(pretty(&answer))
}

/// `switchboard messages unmatched ACCOUNT`: records providers posted that
/// matched nothing, newest first.
pub async fn messages_unmatched(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = format!("/v1/accounts/{a}/messages/unmatched?limit={limit}");
    let header = format!(
        "{:<26} {:<9} {:<16} reason",
        "received at", "provider", "result"
    );
    let empty = format!("account {a} has no unmatched inbound records");
    list(
        client,
        &path,
        "unmatched",
        json_out,
        Some(header),
        empty,
        |u| {
            format!(
                "{:<26} {:<9} {:<16} {}",
                u["received_at"].as_str().unwrap_or_default(),
                u["provider"].as_str().unwrap_or_default(),
                u["result"].as_str().unwrap_or_default(),
                shorten(u["reason"].as_str().unwrap_or_default(), 120),
            )
        },
    )
    .await
}

/// What each inbound provider's URL is for, told once it is made.
fn inbound_hint(provider: &str, secret: Option<&str>) -> String {
    match provider {
        "sendgrid" => "Set it as the HTTP Post URL of SendGrid's Event Webhook (Settings → Mail \
                       Settings → Event Webhook), with the events you want."
            .to_string(),
        "twilio" => "Give it to Twilio as the StatusCallback of the messages you send (the \
                     `status_callback` of the Twilio provider in the dispatcher's config). \
                     Callbacks are verified with the provider's auth token over this exact URL."
            .to_string(),
        _ => format!(
            "Give it to the sender. It signs per Standard Webhooks with the account secret {:?} \
             (webhook-id, webhook-timestamp, webhook-signature); messages more than 5 minutes \
             old are refused.",
            secret.unwrap_or_default()
        ),
    }
}

/// `switchboard inbound create ACCOUNT PROVIDER [--secret NAME] [--rotate]`:
/// prints the URL, which is never shown again.
pub async fn inbound_create(
    client: &Client,
    account_raw: &str,
    provider: &str,
    secret: Option<&str>,
    rotate: bool,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let mut body = serde_json::Map::new();
    if let Some(secret) = secret {
        body.insert("secret".into(), json!(secret));
    }
    body.insert("rotate".into(), json!(rotate));
    let answer = client
        .post(
            &format!("/v1/accounts/{a}/inbound/{}", url_segment(provider)),
            &Value::Object(body),
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let verb = if rotate { "rotated" } else { "created" };
    Ok(format!(
        "{verb} the inbound {provider} webhook of account {a}:\n\n  {}\n\n{}\nThe URL is shown \
         this once (only a hash of its secret is kept); `switchboard inbound create {a} {provider} \
         --rotate` makes a new one.",
        answer["url"].as_str().unwrap_or_default(),
        inbound_hint(provider, secret),
    ))
}

/// `switchboard inbound list ACCOUNT`: providers and when their URLs were
/// made (the URLs' secrets are not kept).
pub async fn inbound_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = format!("/v1/accounts/{a}/inbound");
    let header = format!("{:<10} {:<26} secret", "provider", "created at");
    let empty = format!("account {a} has no inbound webhooks");
    list(
        client,
        &path,
        "inbound",
        json_out,
        Some(header),
        empty,
        |h| {
            format!(
                "{:<10} {:<26} {}",
                h["provider"].as_str().unwrap_or_default(),
                h["created_at"].as_str().unwrap_or_default(),
                h["secret"].as_str().unwrap_or("-"),
            )
        },
    )
    .await
}

/// `switchboard inbound revoke ACCOUNT PROVIDER`
pub async fn inbound_revoke(
    client: &Client,
    account_raw: &str,
    provider: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = client
        .delete(&format!(
            "/v1/accounts/{a}/inbound/{}",
            url_segment(provider)
        ))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "revoked the inbound {provider} webhook of account {a}: its URL answers 404 from now on"
    ))
}

/// Escapes a path segment (`+` and `@` in msisdns and e-mails).
fn url_segment(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// `s` cut to `max` characters, with `…` when cut (`--json` shows everything).
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(max).collect();
    cut.push('…');
    cut
}

/// `switchboard tokens create ACCOUNT [--name N]`: the token is printed this
/// once; the dispatcher keeps only its hash.
pub async fn tokens_create(
    client: &Client,
    account_raw: &str,
    name: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let body = match name {
        Some(n) => json!({ "name": n }),
        None => json!({}),
    };
    let answer = client
        .post(&format!("/v1/accounts/{a}/tokens"), &body)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let token = answer["token"].as_str().unwrap_or_default();
    let named = answer["name"]
        .as_str()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    Ok(format!(
        "created token {}{named} for account {a}; it reaches account {a} only:\n{token}\n\
         This is the only time it is shown: store it now (the dispatcher keeps only its hash).\n\
         Use it: export SWITCHBOARD_TOKEN={token}",
        answer["id"].as_str().unwrap_or_default(),
    ))
}

/// `switchboard tokens list ACCOUNT`: ids, names and creation times.
pub async fn tokens_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = format!("/v1/accounts/{a}/tokens");
    let header = format!("{:<36}  {:<28} name", "id", "created at");
    let empty = format!("account {a} has no tokens");
    list(
        client,
        &path,
        "tokens",
        json_out,
        Some(header),
        empty,
        |t| {
            format!(
                "{:<36}  {:<28} {}",
                t["id"].as_str().unwrap_or_default(),
                t["created_at"].as_str().unwrap_or_default(),
                t["name"].as_str().unwrap_or("-"),
            )
        },
    )
    .await
}

/// `switchboard tokens revoke ACCOUNT ID`
pub async fn tokens_revoke(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer = client
        .delete(&format!("/v1/accounts/{a}/tokens/{}", url_segment(id)))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "revoked token {id} of account {a}: requests with it are refused from now on"
    ))
}
