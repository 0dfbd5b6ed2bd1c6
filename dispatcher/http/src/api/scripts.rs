//! An account's Rhai scripts: put (compiled first), show, versions, remove
//! (refused while a chain names it) and test.

use super::*;

pub(super) fn scripts(s: &ApiState) -> Result<&ScriptStore, ApiError> {
    s.registry
        .scripts()
        .map(|s| s.as_ref())
        .ok_or_else(|| ApiError::not_found("this dispatcher has no script store"))
}

/// A script without its source (lists, history).
pub(super) fn script_summary(v: &SourceVersion) -> ScriptSummary {
    ScriptSummary {
        name: v.name.clone(),
        version: v.version,
        stored_at: v.stored_at,
        lines: v.source.lines().count(),
    }
}

pub(super) async fn list_scripts(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let list: Vec<ScriptSummary> = scripts(&s)?
        .list(&account)?
        .iter()
        .map(script_summary)
        .collect();
    Ok(Json(ScriptList {
        account_key: account,
        scripts: list,
    })
    .into_response())
}

pub(super) async fn show_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let store = scripts(&s)?;
    let version = match q.version {
        Some(v) => store.version(&account, &name, v)?,
        None => store
            .current(&account, &name)?
            .ok_or(ScriptStore::missing(&account, &name))?,
    };
    Ok(Json(Script {
        account_key: version.account_key,
        name: version.name,
        version: version.version,
        stored_at: version.stored_at,
        source: version.source,
    })
    .into_response())
}

pub(super) async fn put_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let store = s
        .registry
        .scripts()
        .cloned()
        .ok_or_else(|| ApiError::not_found("this dispatcher has no script store"))?;
    // Compiling and the flush block: off the async workers.
    let version = tokio::task::spawn_blocking(move || store.put(&account, &name, &body))
        .await
        .map_err(ApiError::internal)??;
    tracing::info!(account = %version.account_key, script = version.name, version = version.version, "script stored");
    let summary = script_summary(&version);
    Ok(Json(StoredScript {
        account_key: version.account_key,
        name: summary.name,
        version: summary.version,
        stored_at: summary.stored_at,
        lines: summary.lines,
    })
    .into_response())
}

pub(super) async fn remove_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let handler = format!("script:{name}");
    let _writes = s.config_write_lock();
    if let Some(current) = s.chains.current(&account)? {
        let users: Vec<&str> = current
            .chains
            .iter()
            .filter(|c| c.steps.iter().any(|st| st.handler == handler))
            .map(|c| c.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "script_in_use",
                format!(
                    "script {name:?} of account {account} is used by chain(s) {}; change or \
                     remove them first",
                    users.join(", ")
                ),
            ));
        }
    }
    let removed = scripts(&s)?.remove(&account, &name)?;
    let summary = script_summary(&removed);
    Ok(Json(RemovedScript {
        account_key: account,
        name: summary.name,
        version: summary.version,
        stored_at: summary.stored_at,
        lines: summary.lines,
        removed: true,
    })
    .into_response())
}

pub(super) async fn script_history(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let versions: Vec<ScriptSummary> = scripts(&s)?
        .history(&account, &name)?
        .iter()
        .map(script_summary)
        .collect();
    if versions.is_empty() {
        return Err(ApiError::not_found(format!(
            "account {account} has no script named {name:?}"
        )));
    }
    Ok(Json(ScriptHistory {
        account_key: account,
        name,
        versions,
    })
    .into_response())
}

pub(super) async fn test_script(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> ApiResult {
    let account = account_key(&account)?;
    if scripts(&s)?.current(&account, &name)?.is_none() {
        return Err(ScriptStore::missing(&account, &name).into());
    }
    let sample = dry_run::parse_sample(&body, &account, s.max_event_bytes)
        .map_err(|e| ApiError::bad_request("invalid_sample", e))?;
    let answer = dry_run::test_script(&s.registry, &account, &name, &sample)
        .await
        .map_err(|e| ApiError::bad_request("script_test_failed", e))?;
    Ok(Json(answer).into_response())
}
