//! An account's chain versions: the history (what made each), the
//! difference between two versions as their chain files, and restoring an
//! old one as a new version.

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use minijinja::context;
use serde::Deserialize;
use serde_json::{Value, json};
use similar::{ChangeTag, TextDiff};
use switchboard_rules::{ChainFile, ChainStoreError, ChainVersion};
use switchboard_sdk::format_rfc3339;

use super::{
    CsrfForm, OnAccount, Page, checked_form, error_page, internal, render, session_view, view,
};
use crate::api::ApiState;

#[derive(Deserialize)]
pub(super) struct Compare {
    /// The older version (default: the one before `to`).
    from: Option<u64>,
    /// The newer version (default: the current one).
    to: Option<u64>,
    /// A version just restored (shown as done).
    restored: Option<u64>,
}

/// A version as the chain file `chains show` prints (TOML), for the diff.
fn file_text(v: &ChainVersion) -> String {
    let file = ChainFile {
        account_key: v.account_key.clone(),
        chains: v.chains.clone(),
    };
    toml::to_string(&file).unwrap_or_else(|e| format!("# not shown as TOML: {e}\n"))
}

pub(super) async fn page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Query(q): Query<Compare>,
) -> Page {
    let history = s.chains.history(&key).map_err(|e| internal(&session, &e))?;
    let current = history.last().map(|v| v.version);
    let to = q.to.or(current);
    let from = q.from.or(to.map(|t| t.saturating_sub(1)));
    let find = |n: Option<u64>| n.and_then(|n| history.iter().find(|v| v.version == n));
    let diff = match (find(from), find(to)) {
        (Some(old), Some(new)) => Some(diff_lines(&file_text(old), &file_text(new))),
        (None, Some(new)) if from == Some(0) => Some(diff_lines("", &file_text(new))),
        _ => None,
    };
    let versions: Vec<Value> = history
        .iter()
        .rev()
        .map(|v| {
            json!({
                "version": v.version,
                "applied_at": format_rfc3339(v.applied_at),
                "change": v.change,
                "chains": v.chains.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                "current": Some(v.version) == current,
            })
        })
        .collect();
    Ok(render(
        "versions.html",
        context! {
            account => key.as_str(),
            versions => view(&versions),
            from,
            to,
            diff => diff.map(view),
            restored => q.restored,
            session => session_view(&session),
        },
    ))
}

/// The lines of a unified diff of `old` and `new` with three lines of
/// context, each as `{tag, text}` (`tag`: `add`, `remove`, `same`, or
/// `gap` between hunks).
fn diff_lines(old: &str, new: &str) -> Vec<Value> {
    let diff = TextDiff::from_lines(old, new);
    let mut lines = Vec::new();
    for (i, group) in diff.grouped_ops(3).iter().enumerate() {
        if i > 0 {
            lines.push(json!({"tag": "gap", "text": "…"}));
        }
        for op in group {
            for change in diff.iter_changes(op) {
                let (tag, sign) = match change.tag() {
                    ChangeTag::Insert => ("add", "+"),
                    ChangeTag::Delete => ("remove", "-"),
                    ChangeTag::Equal => ("same", " "),
                };
                let text = change.value().trim_end_matches('\n');
                lines.push(json!({"tag": tag, "text": format!("{sign} {text}")}));
            }
        }
    }
    lines
}

pub(super) async fn restore(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Path((_, version)): Path<(String, u64)>,
    Form(form): Form<CsrfForm>,
) -> Page {
    checked_form(&session, &form.csrf)?;
    let restored = {
        let _writes = s.config_write_lock();
        s.chains.restore(&key, version, s.registry.as_ref())
    };
    match restored {
        Ok(new) => Ok(Redirect::to(&format!(
            "/console/accounts/{key}/chains/versions?restored={version}&from={version}&to={}",
            new.version
        ))
        .into_response()),
        Err(e @ (ChainStoreError::Invalid(_) | ChainStoreError::NoSuchVersion { .. })) => {
            let status = match e {
                ChainStoreError::NoSuchVersion { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::CONFLICT,
            };
            Err(error_page(
                status,
                Some(&session),
                &format!("Version {version} was not restored: {e}"),
            )
            .into())
        }
        Err(e) => Err(internal(&session, &e).into()),
    }
}
