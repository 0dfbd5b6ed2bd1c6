//! What the CLI's commands do, apart from parsing their arguments: each calls
//! the API and returns the text to print — for people, or JSON with `--json`.
//!
//! Answers are read as the types of `switchboard_api`, the ones the server
//! builds them from. Records an answer carries as JSON (a chain, a trace, a
//! dead letter, a contact, a message) are decoded here into the type of the
//! crate that owns them. `--json` prints the answer as the server sent it
//! (the typed answer encoded again gives the same JSON).

use std::fmt::Write as _;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchboard_api::chains::{ChainHistory, ChainVersion};
use switchboard_api::events::{Accepted, EventList};
pub use switchboard_api::events::{EventListQuery, TailQuery};
use switchboard_api::handlers::{HandlerCatalog, HandlerEntry};
use switchboard_api::records::ContactList;
use switchboard_api::{ListQuery, paths};
use switchboard_engine::trace::Trace;
use switchboard_handlers::records::Contact;
use switchboard_rules::{ChainFile, ChainSpec, Format, parse_chain_file};
use switchboard_sdk::{
    AccountKey, ConversationKey, ConversationType, EventId, EventType, VumiApiEvent, format_rfc3339,
};

use crate::client::{Client, ClientError};

mod access;
mod dead_letters;
mod files;
mod inbox;
mod messages;
mod numbers;
mod preferences;
mod scripts;
mod templates;
mod timers;
pub use access::*;
pub use dead_letters::*;
pub use files::*;
pub use inbox::*;
pub use messages::*;
pub use numbers::*;
pub use preferences::*;
pub use scripts::*;
pub use templates::*;
pub use timers::*;

/// A command that failed: one line for stderr.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API call failed.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The arguments or a file are bad.
    #[error("{0}")]
    Input(String),
    /// A dry run found a step that would fail or be retried: `report` is
    /// the whole report, printed as usual; the command exits with
    /// [`WOULD_FAIL_EXIT`], so that a pipeline can stop on it.
    #[error("{summary}")]
    WouldFail {
        /// What the command prints on stdout.
        report: String,
        /// Which steps would fail, for stderr.
        summary: String,
    },
}

/// The exit code of `chains test` and `scripts test` when a step would fail
/// or be retried (1 is any other error: a bad file, the API unreachable).
pub const WOULD_FAIL_EXIT: u8 = 3;

/// The steps of a dry-run report that would fail or be retried, as
/// `chain c, step s (handler): outcome: error`.
fn failing_steps(report: &Value) -> Vec<String> {
    let mut failing = Vec::new();
    collect_failing(report, &mut failing);
    failing
}

/// [`failing_steps`] of `report` and of the events its steps would emit.
fn collect_failing(report: &Value, failing: &mut Vec<String>) {
    if let Some(error) = report["error"].as_str() {
        failing.push(format!(
            "emitted {}: {error}",
            report["event"]["event_type"].as_str().unwrap_or_default()
        ));
    }
    for c in report["chains"].as_array().into_iter().flatten() {
        if c["condition"] == "error" {
            failing.push(format!(
                "chain {}: its condition fails: {}",
                c["name"].as_str().unwrap_or_default(),
                c["error"].as_str().unwrap_or_default()
            ));
        }
        for s in c["steps"].as_array().into_iter().flatten() {
            if let outcome @ ("failed" | "retry") = s["outcome"].as_str().unwrap_or_default() {
                failing.push(format!(
                    "chain {}, step {} ({}): {outcome}: {}",
                    c["name"].as_str().unwrap_or_default(),
                    s["name"].as_str().unwrap_or_default(),
                    s["handler"].as_str().unwrap_or_default(),
                    s["error"].as_str().unwrap_or_default()
                ));
            }
            for child in s["children"].as_array().into_iter().flatten() {
                collect_failing(child, failing);
            }
        }
    }
}

/// `report` as the answer, or as [`CliError::WouldFail`] naming `failing`.
fn dry_run_result(report: String, failing: Vec<String>) -> Result<String, CliError> {
    if failing.is_empty() {
        return Ok(report);
    }
    Err(CliError::WouldFail {
        report,
        summary: format!("the dry run would fail: {}", failing.join("; ")),
    })
}

fn input(e: impl std::fmt::Display) -> CliError {
    CliError::Input(e.to_string())
}

/// An answer as `--json` prints it. Through a `Value`, so that keys come out
/// in the order they always have (sorted), whatever the type's field order.
fn pretty(v: &impl Serialize) -> String {
    let value = serde_json::to_value(v).expect("an answer serialises");
    serde_json::to_string_pretty(&value).expect("a JSON value prints")
}

/// A record an answer carries as JSON, decoded into the type of the crate
/// that owns it; `path` says which call answered it.
fn decode<T: DeserializeOwned>(record: Value, path: &str) -> Result<T, CliError> {
    serde_json::from_value(record).map_err(|e| {
        CliError::Client(ClientError::Unexpected {
            url: path.to_string(),
            message: e.to_string(),
        })
    })
}

/// Each of `records`, decoded (see [`decode`]).
fn decode_all<T: DeserializeOwned>(records: Vec<Value>, path: &str) -> Result<Vec<T>, CliError> {
    records.into_iter().map(|r| decode(r, path)).collect()
}

/// A unit enum's name as the API spells it (`step_failed`, `done`).
fn wire_name(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_string(),
    }
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
    let answer: Accepted = client.post(&paths::events(), &event).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let dup = if answer.duplicate {
        " (duplicate: already on the bus)"
    } else {
        ""
    };
    Ok(format!(
        "accepted event {} on {}{dup}\nsee what it did: switchboard trace {} {}",
        answer.id, answer.subject, event.account_key, answer.id,
    ))
}

/// `switchboard chains apply FILE...`
pub async fn chains_apply(
    client: &Client,
    files: &[std::path::PathBuf],
    merge: bool,
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
        let mut path_url = paths::chains(file.account_key.as_str());
        if merge {
            path_url.push_str("?merge=true");
        }
        let answer: switchboard_api::chains::ChainsApplied = client
            .put_text(&path_url, text, content_type)
            .await
            .map_err(|e| match e {
                ClientError::Api { message, .. } => input(format!("{shown}: {message}")),
                other => CliError::Client(other),
            })?;
        let _ = writeln!(out, "{}", describe_apply(&shown, &answer));
        answers.push(answer);
    }
    if json_out {
        return Ok(pretty(&answers));
    }
    Ok(out.trim_end().to_string())
}

/// What an apply did, for people: the version and the chains it added,
/// changed and removed.
fn describe_apply(shown: &str, a: &switchboard_api::chains::ChainsApplied) -> String {
    let account = &a.version.account_key;
    let mut parts = Vec::new();
    for (what, names) in [
        ("added", &a.added),
        ("changed", &a.changed),
        ("removed", &a.removed),
    ] {
        if !names.is_empty() {
            parts.push(format!("{what} {}", names.join(", ")));
        }
    }
    if a.reordered {
        parts.push("reordered".into());
    }
    if parts.is_empty() {
        parts.push("no chain changed".into());
    }
    let mut line = format!(
        "applied {shown}: account {account} now at chain version {} ({} chains): {}",
        a.version.version,
        a.version.chains.len(),
        parts.join("; ")
    );
    if !a.removed.is_empty() {
        line.push_str(
            "\n  (the file replaces the account's chains; `chains apply --merge` keeps those it does not name)",
        );
    }
    line
}

/// The chains of a version, decoded into the rules' model.
fn chains_of(version: &ChainVersion, path: &str) -> Result<Vec<ChainSpec>, CliError> {
    decode_all(version.chains.clone(), path)
}

fn describe_match(c: &ChainSpec) -> String {
    let mut m = format!("{}/{}", c.conversation_type, c.event_type);
    if let Some(k) = c.conversation_key() {
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
    let path = paths::chains(a.as_str());
    let version: ChainVersion = client.get(&path).await?;
    if json_out {
        return Ok(pretty(&version));
    }
    if version.version == 0 {
        return Ok(format!("account {a} has no chains"));
    }
    let chains = chains_of(&version, &path)?;
    let mut out = format!("account {a}, chain version {}\n", version.version);
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
    let path = paths::chains(a.as_str());
    let version: ChainVersion = client.get(&path).await?;
    let mut chains = chains_of(&version, &path)?;
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
        version.version,
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
    let history: ChainHistory = client.get(&paths::chain_versions(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&history));
    }
    let mut out = format!(
        "{:<8} {:<28} {:<24} chains\n",
        "version", "applied at", "change"
    );
    for v in &history.versions {
        let _ = writeln!(
            out,
            "{:<8} {:<28} {:<24} {}",
            v.version,
            format_rfc3339(v.applied_at),
            v.change,
            if v.chains.is_empty() {
                "(none)".to_string()
            } else {
                v.chains.join(", ")
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
    // The restore takes no body; `{}` says so.
    let answer: ChainVersion = client
        .post(
            &paths::chain_version_restore(a.as_str(), version),
            &serde_json::Map::new(),
        )
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "restored version {version} of account {a} as version {}",
        answer.version
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
    let path = match chain {
        Some(name) => paths::chain(a.as_str(), name),
        None => paths::chains(a.as_str()),
    };
    let answer: ChainVersion = client.delete(&path).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(match chain {
        Some(name) => format!(
            "removed chain {name:?} of account {a}; now at version {}",
            answer.version
        ),
        None => format!(
            "removed every chain of account {a}; now at version {}",
            answer.version
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
    let path = paths::trace(a.as_str(), &id.to_string());
    let trace: switchboard_api::events::Trace = client.get(&path).await?;
    if json_out {
        return Ok(pretty(&trace));
    }
    Ok(render_trace(&decode(trace, &path)?))
}

/// A trace, for people.
pub fn render_trace(t: &Trace) -> String {
    let e = &t.event;
    let mut out = format!(
        "event {} ({}/{}, conversation {}, depth {})\nstatus: {}\n",
        e.id,
        e.conversation_type,
        e.event_type,
        e.conversation_key,
        e.depth,
        wire_name(&t.status),
    );
    if let Some(parent) = &t.parent_id {
        let _ = writeln!(out, "emitted by: {parent}");
    }
    if t.chains.is_empty() {
        out.push_str("no chain ran\n");
    }
    for c in &t.chains {
        let _ = writeln!(out, "chain {} (version {})", c.name, c.version);
        if let Some(until) = c.waiting_until {
            let awaited = c.waiting_for.as_ref().map_or_else(String::new, |t| {
                format!(", or until an event of type {t} matches")
            });
            let until = switchboard_sdk::format_rfc3339(until);
            let _ = writeln!(out, "  waiting until {until}{awaited}");
        }
        if let Some(key) = &c.waiting_digest {
            let until = c.waiting_until.map_or_else(
                || " (when it is full)".to_string(),
                |u| {
                    format!(
                        " (at {} or when it is full)",
                        switchboard_sdk::format_rfc3339(u)
                    )
                },
            );
            let _ = writeln!(
                out,
                "  gathering the digest of {key:?}: goes on when its window closes{until}"
            );
        }
        for f in &c.flow {
            let mut line = format!(
                "  {}: {} (key {:?}",
                f.control.as_str(),
                serde_json::to_value(f.result)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                f.key
            );
            if let Some(at) = f.at {
                let _ = write!(line, ", at {}", switchboard_sdk::format_rfc3339(at));
            }
            if let Some(by) = f.by {
                let _ = write!(line, ", by event {by}");
            }
            let _ = writeln!(out, "{line})");
        }
        if let Some(by) = c.cancelled_by {
            let _ = writeln!(out, "  cancelled by event {by}");
        }
        for (i, s) in c.steps.iter().enumerate() {
            let _ = write!(
                out,
                "  {}. {:<20} {:<8} {:>3} attempt(s) {:>8.2} ms",
                i + 1,
                s.name,
                wire_name(&s.outcome),
                s.attempts,
                s.duration_ms,
            );
            if let Some(output) = s.output.as_ref().filter(|o| !o.is_empty()) {
                let _ = write!(
                    out,
                    "  output {}",
                    shorten(&Value::Object(output.clone()).to_string(), 100)
                );
            }
            if let Some(error) = &s.error {
                let _ = write!(out, "\n     error: {error}");
            }
            for l in &s.logs {
                let _ = write!(out, "\n     log {}: {}", l.level, l.message);
            }
            out.push('\n');
        }
    }
    if !t.children.is_empty() {
        let children: Vec<String> = t.children.iter().map(EventId::to_string).collect();
        let _ = writeln!(out, "emitted: {}", children.join(", "));
    }
    out.trim_end().to_string()
}

/// A sample given as `--event`: a JSON file, `-` for stdin, or the JSON
/// itself (an argument that starts with `{`).
fn read_sample(arg: &str) -> Result<Value, CliError> {
    read_json_arg(arg, "--event")
}

/// JSON given as the argument `flag`: a file, `-` for stdin, or the JSON
/// itself (an argument that starts with `{` or `[`).
fn read_json_arg(arg: &str, flag: &str) -> Result<Value, CliError> {
    let (shown, text) = if arg == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| input(format!("reading {flag} from stdin: {e}")))?;
        (format!("{flag} on stdin"), text)
    } else if arg.trim_start().starts_with(['{', '[']) {
        (format!("the {flag} argument"), arg.to_string())
    } else {
        let text = std::fs::read_to_string(arg).map_err(|e| {
            input(format!(
                "reading {arg}: {e} ({flag} takes a JSON file, `-` for stdin, or the JSON itself)"
            ))
        })?;
        (arg.to_string(), text)
    };
    serde_json::from_str(&text).map_err(|e| input(format!("{shown} is not JSON: {e}")))
}

/// PUTs `file`'s text to `path`; a refusal is reported against the file.
/// Returns the answer and the file as shown.
async fn put_file<T: DeserializeOwned>(
    client: &Client,
    path: &str,
    file: &std::path::Path,
    content_type: &str,
) -> Result<(T, String), CliError> {
    let shown = file.display().to_string();
    let source =
        std::fs::read_to_string(file).map_err(|e| input(format!("reading {shown}: {e}")))?;
    let answer = client
        .put_text(path, source, content_type)
        .await
        .map_err(|e| match e {
            ClientError::Api { message, .. } => input(format!("{shown}: {message}")),
            other => CliError::Client(other),
        })?;
    Ok((answer, shown))
}

/// `switchboard events list ACCOUNT [filters]`: a page of the account's
/// events, the latest first, and how to get the next.
pub async fn events_list(
    client: &Client,
    account_raw: &str,
    query: &EventListQuery,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: EventList = client
        .get_with(&paths::events_of(a.as_str()), query)
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!(
        "{:<28} {:<36} {:<32} {:<16} {:<9} chains",
        "taken up", "event", "type", "conversation", "status"
    );
    let empty = format!("account {a} has no events to show (with these filters)");
    let mut out = rows(&answer.events, Some(header), empty, |e| {
        let chains: Vec<String> = e
            .chains
            .iter()
            .map(|c| match &c.step {
                Some(step) => format!("{}: {} at {step}", c.name, c.outcome),
                None => format!("{}: {}", c.name, c.outcome),
            })
            .collect();
        format!(
            "{:<28} {:<36} {:<32} {:<16} {:<9} {}",
            format_rfc3339(e.at),
            e.id,
            format!("{}/{}", e.conversation_type, e.event_type),
            e.conversation_key,
            e.status,
            chains.join(", ")
        )
    });
    if let Some(next) = &answer.next {
        let _ = write!(out, "\nmore: switchboard events list {a} --before {next}");
    }
    Ok(out)
}

/// `switchboard events rerun ACCOUNT ID`
pub async fn events_rerun(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: Accepted = client
        .post(&paths::event_rerun(a.as_str(), id), &serde_json::json!({}))
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "event {id} runs again as event {} on {}\nfollow it: switchboard trace {a} {}",
        answer.id, answer.subject, answer.id
    ))
}

/// `switchboard handlers [ACCOUNT]`: the built-in handlers with their
/// options (and the account's scripts).
pub async fn handlers(
    client: &Client,
    account_raw: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let path = match account_raw {
        Some(raw) => paths::account_handlers(account(raw)?.as_str()),
        None => paths::handlers(),
    };
    let answer: HandlerCatalog = client.get(&path).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let mut out = String::new();
    for h in &answer.handlers {
        render_handler(&mut out, h);
    }
    if let Some(a) = &answer.account_key {
        if answer.scripts.is_empty() {
            let _ = writeln!(
                out,
                "account {a} has no scripts (`switchboard scripts put`)"
            );
        }
        for s in &answer.scripts {
            let _ = writeln!(
                out,
                "script:{:<17} (none)      account {a}'s Rhai script, version {}; any options \
                 (the script reads its config)",
                s.name, s.version
            );
        }
    }
    Ok(out.trim_end().to_string())
}

/// A handler and one line per option: its name, what it takes (required,
/// a template or a literal, a secret's name, its default) and what it does.
fn render_handler(out: &mut String, h: &HandlerEntry) {
    let _ = writeln!(out, "{:<24} ({})  {}", h.name, h.effects, h.description);
    let schema = &h.options;
    let required: Vec<&str> = strings(&schema["required"]);
    let order = strings(&schema["x-order"]);
    let width = order.iter().map(|n| n.len()).max().unwrap_or(0);
    for name in order {
        let option = &schema["properties"][name];
        let mut what = vec![if required.contains(&name) {
            "required"
        } else {
            "optional"
        }];
        if option["x-secret"] == true {
            what.push("a secret's name");
        } else if option["x-template"] == false {
            what.push("literal");
        }
        let mut line = format!("  {name:<width$}  {:<25}  ", what.join(", "));
        line.push_str(option["description"].as_str().unwrap_or(""));
        let choices = strings(&option["enum"]);
        let choices = if choices.is_empty() {
            strings(&option["anyOf"][0]["enum"])
        } else {
            choices
        };
        if !choices.is_empty() {
            let _ = write!(line, " One of: {}.", choices.join(", "));
        }
        if let Some(default) = option.get("default") {
            let _ = write!(line, " Default: {default}.");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    for group in schema["allOf"].as_array().into_iter().flatten() {
        let names: Vec<&str> = group["anyOf"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["required"][0].as_str())
            .collect();
        let _ = writeln!(out, "  (needs {}, at least one)", names.join(" or "));
    }
    let ways: Vec<String> = schema["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|way| {
            format!(
                "{} ({})",
                strings(&way["required"]).join(", "),
                way["description"].as_str().unwrap_or_default()
            )
        })
        .collect();
    if !ways.is_empty() {
        let _ = writeln!(out, "  (needs {})", ways.join(" or "));
    }
}

/// The strings of a JSON array (none for anything else).
fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
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
            "{indent}would run {} with config {} (simulated, not performed)",
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
    event: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let sample = read_sample(event)?;
    let answer: switchboard_api::chains::ChainTest =
        client.post(&paths::chain_test(a.as_str()), &sample).await?;
    let failing = failing_steps(&answer);
    if json_out {
        return dry_run_result(pretty(&answer), failing);
    }
    let mut out = format!(
        "account {a}, chain version {} (dry run: nothing was performed or published)\n",
        answer["chain_version"]
    );
    render_chains(&answer, "", &mut out);
    dry_run_result(out.trim_end().to_string(), failing)
}

/// `switchboard contacts list ACCOUNT`
pub async fn contacts_list(
    client: &Client,
    account_raw: &str,
    limit: usize,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let path = paths::contacts(a.as_str());
    let answer: ContactList = client.get_with(&path, &ListQuery::limit(limit)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let contacts: Vec<Contact> = decode_all(answer.contacts, &path)?;
    let header = format!("{:<38} {:<16} {:<28} name", "key", "msisdn", "email");
    let empty = format!("account {a} has no contacts");
    Ok(rows(&contacts, Some(header), empty, |c| {
        format!(
            "{:<38} {:<16} {:<28} {}",
            c.key,
            c.msisdn.as_deref().unwrap_or("-"),
            c.email.as_deref().unwrap_or("-"),
            c.name.as_deref().unwrap_or("-"),
        )
    }))
}

/// `switchboard contacts show ACCOUNT KEY|MSISDN|EMAIL`
pub async fn contacts_show(
    client: &Client,
    account_raw: &str,
    key: &str,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: Value = client.get(&paths::contact(a.as_str(), key)).await?;
    Ok(pretty(&answer))
}

/// One line per item (after `header`), or `empty` when there is none.
fn rows<T>(
    items: &[T],
    header: Option<String>,
    empty: String,
    row: impl Fn(&T) -> String,
) -> String {
    if items.is_empty() {
        return empty;
    }
    let lines = header.into_iter().chain(items.iter().map(row));
    lines.collect::<Vec<_>>().join("\n").trim_end().to_string()
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

/// What a dry-run report says each chain would do, with the events its
/// steps would emit followed beneath them.
fn render_chains(report: &Value, indent: &str, out: &mut String) {
    if report["unrouted"] == Value::Bool(true) {
        let _ = writeln!(
            out,
            "{indent}no chain would run: the event would be unrouted"
        );
    }
    for c in report["chains"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or_default();
        let when = c["when"]
            .as_str()
            .map(|w| format!(" (when {w})"))
            .unwrap_or_default();
        match c["condition"].as_str().unwrap_or_default() {
            "false" => {
                let _ = writeln!(
                    out,
                    "{indent}chain {name}: matches, but its condition is false{when}"
                );
            }
            "error" => {
                let _ = writeln!(
                    out,
                    "{indent}chain {name}: its condition fails{when}: {}",
                    c["error"].as_str().unwrap_or_default()
                );
            }
            _ => {
                let _ = writeln!(out, "{indent}chain {name}: runs{when}");
                for (i, s) in c["steps"].as_array().into_iter().flatten().enumerate() {
                    let _ = writeln!(
                        out,
                        "{indent}  {}. {} ({}): {}",
                        i + 1,
                        s["name"].as_str().unwrap_or_default(),
                        s["handler"].as_str().unwrap_or_default(),
                        s["outcome"].as_str().unwrap_or_default()
                    );
                    let inner = format!("{indent}     ");
                    render_run(s, &inner, out);
                    for child in s["children"].as_array().into_iter().flatten() {
                        let event = &child["event"];
                        let _ = writeln!(
                            out,
                            "{inner}emitted {}/{} would run:",
                            event["conversation_type"].as_str().unwrap_or_default(),
                            event["event_type"].as_str().unwrap_or_default(),
                        );
                        let deeper = format!("{inner}  ");
                        match child["error"].as_str() {
                            Some(error) => {
                                let _ = writeln!(out, "{deeper}{error}");
                            }
                            None => render_chains(child, &deeper, out),
                        }
                    }
                }
            }
        }
    }
}
