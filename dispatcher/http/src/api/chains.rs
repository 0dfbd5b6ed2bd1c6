//! An account's chains: apply, show, remove, their versions and restore,
//! and dry runs.

use super::*;

pub(super) fn version_json(v: &ChainVersion) -> Json<ChainVersionAnswer> {
    Json(ChainVersionAnswer {
        account_key: v.account_key.clone(),
        version: v.version,
        applied_at: Some(v.applied_at),
        change: v.change.clone(),
        chains: v.chains.iter().map(to_json).collect(),
    })
}

pub(super) async fn show_chains(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    match s.chains.current(&account)? {
        Some(v) => Ok(version_json(&v).into_response()),
        // An account like any other, with nothing configured yet.
        None => Ok(Json(ChainVersionAnswer {
            account_key: account,
            version: 0,
            applied_at: None,
            change: String::new(),
            chains: Vec::new(),
        })
        .into_response()),
    }
}

pub(super) async fn apply_chains(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Query(q): Query<switchboard_api::chains::ApplyQuery>,
    headers: HeaderMap,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let format = if content_type.contains("json") {
        Format::Json
    } else if content_type.contains("toml") {
        Format::Toml
    } else {
        Format::sniff(&body)
    };
    let file = parse_chain_file(&body, format, "request body")
        .map_err(|e| ApiError::bad_request("invalid_chain_file", e.to_string()))?;
    let change = if q.merge { "apply (merge)" } else { "apply" };
    let (version, changes) = {
        let _writes = s.config_write_lock();
        let valid = validate(file, &account, s.registry.as_ref()).map_err(ChainStoreError::from)?;
        s.chains
            .apply_changes(valid, q.merge, change, s.registry.as_ref())?
    };
    tracing::info!(%account, version = version.version, added = ?changes.added,
        changed = ?changes.changed, removed = ?changes.removed, "chains applied");
    Ok(Json(switchboard_api::chains::ChainsApplied {
        version: version_json(&version).0,
        added: changes.added,
        changed: changes.changed,
        removed: changes.removed,
        unchanged: changes.unchanged,
        reordered: changes.reordered,
    })
    .into_response())
}

pub(super) async fn remove_all_chains(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let version = s.chains.remove_all(&account)?;
    Ok(version_json(&version).into_response())
}

pub(super) async fn show_chain(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let current = s
        .chains
        .current(&account)?
        .ok_or_else(|| ApiError::not_found(format!("account {account} has no chains")))?;
    let chain = current
        .chains
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| {
            ApiError::not_found(format!("account {account} has no chain named {name:?}"))
        })?;
    Ok(Json(ChainAnswer {
        version: current.version,
        chain: to_json(chain),
        account_key: account,
    })
    .into_response())
}

pub(super) async fn remove_chain(
    State(s): State<ApiState>,
    Path((account, name)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let version = s.chains.remove_chain(&account, &name)?;
    Ok(version_json(&version).into_response())
}

pub(super) async fn history(State(s): State<ApiState>, Path(account): Path<String>) -> ApiResult {
    let account = account_key(&account)?;
    let versions: Vec<ChainVersionSummary> = s
        .chains
        .history(&account)?
        .iter()
        .map(|v| ChainVersionSummary {
            version: v.version,
            applied_at: v.applied_at,
            change: v.change.clone(),
            chains: v.chains.iter().map(|c| c.name.clone()).collect(),
        })
        .collect();
    if versions.is_empty() {
        return Err(ApiError::not_found(format!(
            "account {account} has no chains"
        )));
    }
    Ok(Json(ChainHistory {
        account_key: account,
        versions,
    })
    .into_response())
}

pub(super) async fn show_version(
    State(s): State<ApiState>,
    Path((account, version)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let version = parse_version(&version)?;
    Ok(version_json(&s.chains.version(&account, version)?).into_response())
}

pub(super) async fn restore(
    State(s): State<ApiState>,
    Path((account, version)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let version = parse_version(&version)?;
    let restored = {
        let _writes = s.config_write_lock();
        s.chains.restore(&account, version, s.registry.as_ref())?
    };
    Ok(version_json(&restored).into_response())
}

pub(super) fn parse_version(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_version",
            format!("{raw:?} is not a version number"),
        )
    })
}

pub(super) async fn test_chains(
    State(s): State<ApiState>,
    Path(account): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let sample = dry_run::parse_sample(&body, &account, s.max_event_bytes)
        .map_err(|e| ApiError::bad_request("invalid_sample", e))?;
    let chains = s
        .chains
        .lookup(&account)
        .ok_or_else(|| ApiError::not_found(format!("account {account} has no chains")))?;
    let limits = dry_run::FollowLimits {
        max_depth: s.max_depth,
        max_event_bytes: s.max_event_bytes,
    };
    let report = dry_run::test_chains(&s.registry, &chains, &sample.event, limits).await;
    Ok(Json(report).into_response())
}
