//! The scripts pages: an account's Rhai scripts, an editor that shows a
//! compile error at its line, and a test against a sample event.

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use minijinja::context;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_engine::dry_run;
use switchboard_handlers::script::ScriptStoreError;
use switchboard_sdk::{AccountKey, format_rfc3339};

use super::{OnAccount, Page, checked_form, error_page, internal, render, session_view, view};
use crate::api::ApiState;

/// The sample a new test starts from.
const SAMPLE: &str = r#"{
  "conversation_type": "survey",
  "conversation_key": "poll-2026",
  "event_type": "poll_complete",
  "event_data": {"msisdn": "+27820000001", "score": 4}
}"#;

#[derive(Deserialize)]
pub(super) struct Open {
    /// A script to open in the editor (new or not).
    #[serde(default)]
    open: String,
}

pub(super) async fn list(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Query(open): Query<Open>,
) -> Page {
    let name = open.open.trim();
    if !name.is_empty() {
        let name: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        return Ok(
            Redirect::to(&format!("/console/accounts/{key}/scripts/{name}")).into_response(),
        );
    }
    let scripts: Vec<Value> = match s.registry.scripts() {
        Some(store) => store
            .list(&key)
            .map_err(|e| internal(&session, &e))?
            .iter()
            .map(|v| {
                json!({
                    "name": v.name,
                    "version": v.version,
                    "stored_at": format_rfc3339(v.stored_at),
                    "lines": v.source.lines().count(),
                })
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(render(
        "scripts.html",
        context! {
            account => key.as_str(),
            scripts => view(&scripts),
            session => session_view(&session),
        },
    ))
}

/// What the editor page shows besides the script.
#[derive(Default)]
struct Shown {
    source: Option<String>,
    error: Option<(String, Option<usize>)>,
    sample: Option<String>,
    test: Option<Value>,
    saved: Option<u64>,
    restored: Option<u64>,
}

#[derive(Deserialize)]
pub(super) struct Saved {
    /// The version a save just stored, to say so.
    saved: Option<u64>,
    /// The version that save restored.
    restored: Option<u64>,
    /// `CONVERSATION_TYPE/EVENT_TYPE`: the sample is the latest real event
    /// of that kind.
    kind: Option<String>,
}

pub(super) async fn edit(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name)): Path<(String, String)>,
    Query(q): Query<Saved>,
) -> Page {
    let sample = q
        .kind
        .as_deref()
        .and_then(|kind| latest_event(&s, &key, kind));
    let shown = Shown {
        saved: q.saved,
        restored: q.restored,
        sample,
        ..Shown::default()
    };
    editor(&s, &session, &key, &name, shown, StatusCode::OK)
}

/// The latest real event of `kind` (`CONVERSATION_TYPE/EVENT_TYPE`) as a
/// sample, while its trace is kept.
fn latest_event(s: &ApiState, key: &AccountKey, kind: &str) -> Option<String> {
    let (ct, et) = kind.split_once('/')?;
    let latest = s.event_kinds.get(key, ct, et).ok()??;
    let trace = s.traces.get(key, &latest.last_event_id).ok()??;
    serde_json::to_string_pretty(&trace.event).ok()
}

/// The editor of script `name` of `key` (an account the session reaches).
fn editor(
    s: &ApiState,
    session: &super::session::Session,
    key: &AccountKey,
    name: &str,
    shown: Shown,
    status: StatusCode,
) -> Page {
    let Some(store) = s.registry.scripts() else {
        return Err(error_page(
            StatusCode::NOT_FOUND,
            Some(session),
            "This dispatcher has no script store.",
        )
        .into());
    };
    let history = store
        .history(key, name)
        .map_err(|e| internal(session, &e))?;
    let current = store
        .current(key, name)
        .map_err(|e| internal(session, &e))?;
    let source = shown
        .source
        .or_else(|| current.as_ref().map(|v| v.source.clone()))
        .unwrap_or_else(|| "fn handle(event, steps, config) {\n    #{}\n}\n".into());
    let (error, error_line) = match shown.error {
        Some((message, line)) => (Some(message), line),
        None => (None, None),
    };
    let lines: Vec<Value> = source
        .lines()
        .enumerate()
        .map(|(i, text)| json!({"n": i + 1, "text": text, "error": error_line == Some(i + 1)}))
        .collect();
    let versions: Vec<Value> = history
        .iter()
        .rev()
        .map(|v| json!({"version": v.version, "stored_at": format_rfc3339(v.stored_at)}))
        .collect();
    let kinds: Vec<String> = s
        .event_kinds
        .of(key)
        .unwrap_or_default()
        .iter()
        .map(|k| format!("{}/{}", k.conversation_type, k.event_type))
        .collect();
    let test = shown.test.map(|t| {
        json!({
            "outcome": t["outcome"],
            "pretty": serde_json::to_string_pretty(&t).unwrap_or_default(),
        })
    });
    let mut page = render(
        "script.html",
        context! {
            account => key.as_str(),
            name,
            source,
            lines => view(&lines),
            error,
            error_line,
            current => current.as_ref().map(|v| v.version),
            versions => view(&versions),
            sample => shown.sample.unwrap_or_else(|| SAMPLE.to_string()),
            kinds => view(&kinds),
            restored => shown.restored,
            test => view(&test),
            saved => shown.saved,
            session => session_view(session),
        },
    );
    *page.status_mut() = status;
    Ok(page)
}

#[derive(Deserialize)]
pub(super) struct ScriptForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    sample: String,
    action: String,
}

pub(super) async fn act(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, name)): Path<(String, String)>,
    Form(form): Form<ScriptForm>,
) -> Page {
    checked_form(&session, &form.csrf)?;
    let Some(store) = s.registry.scripts().cloned() else {
        return Err(error_page(
            StatusCode::NOT_FOUND,
            Some(&session),
            "This dispatcher has no script store.",
        )
        .into());
    };
    // Browsers send a textarea's lines with CR LF.
    let source = form.source.replace("\r\n", "\n");
    let sample = form.sample.replace("\r\n", "\n");
    match form.action.as_str() {
        "save" => {
            let (k, n, src) = (key.clone(), name.clone(), source.clone());
            let stored = tokio::task::spawn_blocking(move || store.put(&k, &n, &src))
                .await
                .map_err(|e| internal(&session, &e))?;
            match stored {
                Ok(version) => Ok(Redirect::to(&format!(
                    "/console/accounts/{key}/scripts/{name}?saved={}",
                    version.version
                ))
                .into_response()),
                Err(e) => {
                    // A compile error is shown at its line; any other as it is.
                    let error = match &e {
                        ScriptStoreError::Compile { error, .. } => (error.to_string(), error.line),
                        other => (other.to_string(), None),
                    };
                    let shown = Shown {
                        error: Some(error),
                        source: Some(source),
                        sample: Some(sample),
                        ..Shown::default()
                    };
                    editor(&s, &session, &key, &name, shown, StatusCode::BAD_REQUEST)
                }
            }
        }
        "test" => {
            let result = match dry_run::parse_sample(sample.as_bytes(), &key, s.max_event_bytes) {
                Ok(parsed) => dry_run::test_script(&s.registry, &key, &name, &parsed).await,
                Err(e) => Err(e),
            };
            let shown = match result {
                Ok(answer) => Shown {
                    test: Some(answer),
                    source: Some(source),
                    sample: Some(sample),
                    ..Shown::default()
                },
                Err(e) => Shown {
                    error: Some((format!("The test did not run: {e}"), None)),
                    source: Some(source),
                    sample: Some(sample),
                    ..Shown::default()
                },
            };
            editor(&s, &session, &key, &name, shown, StatusCode::OK)
        }
        other => {
            let Some(version) = other
                .strip_prefix("restore:")
                .and_then(|v| v.parse::<u64>().ok())
            else {
                return Err(error_page(
                    StatusCode::BAD_REQUEST,
                    Some(&session),
                    &format!("{other:?} is not an action: save, test or restore:N"),
                )
                .into());
            };
            let (k, n) = (key.clone(), name.clone());
            let restored = tokio::task::spawn_blocking(move || {
                let old = store
                    .history(&k, &n)?
                    .into_iter()
                    .find(|v| v.version == version);
                old.map(|old| store.put(&k, &n, &old.source)).transpose()
            })
            .await
            .map_err(|e| internal(&session, &e))?;
            match restored {
                Ok(Some(new)) => Ok(Redirect::to(&format!(
                    "/console/accounts/{key}/scripts/{name}?saved={}&restored={version}",
                    new.version
                ))
                .into_response()),
                Ok(None) => Err(error_page(
                    StatusCode::NOT_FOUND,
                    Some(&session),
                    &format!("Script {name:?} has no version {version}."),
                )
                .into()),
                Err(e) => Err(error_page(
                    StatusCode::CONFLICT,
                    Some(&session),
                    &format!("Version {version} was not restored: {e}"),
                )
                .into()),
            }
        }
    }
}
