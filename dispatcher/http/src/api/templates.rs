//! An account's message templates: put (compiled first), list, show (any
//! version), versions, test (render with a context and a recipient) and
//! remove.

use switchboard_api::scripts::VersionQuery;
use switchboard_api::templates::{
    Template, TemplateHistory, TemplateList, TemplateProblem, TemplateRendered, TemplateSummary,
    TemplateTest,
};
use switchboard_handlers::message_template::{
    TemplateError, TemplateStore, TemplateStoreError, channel_of,
};

use super::*;

fn templates(s: &ApiState) -> Result<&Arc<TemplateStore>, ApiError> {
    s.registry
        .message_templates()
        .ok_or_else(|| ApiError::not_found("this dispatcher has no template store"))
}

/// A version without its file.
fn summary(v: &SourceVersion) -> TemplateSummary {
    let channel = channel_of(&v.source).unwrap_or_else(|| "unknown".to_string());
    TemplateSummary {
        slug: v.name.clone(),
        version: v.version,
        stored_at: v.stored_at,
        channel,
    }
}

fn problem(e: &TemplateError) -> TemplateProblem {
    match e {
        TemplateError::Part {
            part,
            line,
            column,
            message,
        } => TemplateProblem {
            part: Some(part.to_string()),
            line: *line,
            column: *column,
            field: None,
            message: message.clone(),
        },
        TemplateError::Context { field, rule } => TemplateProblem {
            part: None,
            line: None,
            column: None,
            field: Some(field.clone()),
            message: rule.clone(),
        },
        TemplateError::File(_) | TemplateError::Schema(_) => TemplateProblem {
            part: None,
            line: None,
            column: None,
            field: None,
            message: e.to_string(),
        },
    }
}

impl From<TemplateStoreError> for ApiError {
    fn from(e: TemplateStoreError) -> Self {
        match &e {
            TemplateStoreError::NoSuch { .. } | TemplateStoreError::NoSuchVersion { .. } => {
                ApiError::not_found(e.to_string())
            }
            TemplateStoreError::InvalidName { .. } => {
                ApiError::bad_request("invalid_name", e.to_string())
            }
            TemplateStoreError::Compile { error, .. } => {
                let mut err = ApiError::bad_request("invalid_template", e.to_string());
                err.details = Some(to_json(&problem(error)));
                err
            }
            TemplateStoreError::Records(_) => ApiError::internal(e),
        }
    }
}

pub(super) async fn list_templates(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult {
    let account = account_key(&account)?;
    let list = templates(&s)?.list(&account)?.iter().map(summary).collect();
    Ok(Json(TemplateList {
        account_key: account,
        templates: list,
    })
    .into_response())
}

pub(super) async fn show_template(
    State(s): State<ApiState>,
    Path((account, slug)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult {
    let account = account_key(&account)?;
    let store = templates(&s)?;
    let version = match q.version {
        Some(v) => store.version(&account, &slug, v)?,
        None => store
            .current(&account, &slug)?
            .ok_or_else(|| TemplateStore::missing(&account, &slug))?,
    };
    Ok(Json(Template {
        account_key: account,
        summary: summary(&version),
        source: Some(version.source),
        removed: false,
    })
    .into_response())
}

pub(super) async fn put_template(
    State(s): State<ApiState>,
    Path((account, slug)): Path<(String, String)>,
    TextBody(body): TextBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let store = templates(&s)?.clone();
    // The flush blocks: off the async workers.
    let version = tokio::task::spawn_blocking(move || store.put(&account, &slug, &body))
        .await
        .map_err(ApiError::internal)??;
    tracing::info!(account = %version.account_key, template = version.name, version = version.version, "template stored");
    Ok(Json(Template {
        account_key: version.account_key.clone(),
        summary: summary(&version),
        source: None,
        removed: false,
    })
    .into_response())
}

pub(super) async fn remove_template(
    State(s): State<ApiState>,
    Path((account, slug)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    // A step names a template by a literal slug; one given as a template
    // (`{{ ... }}`) is known only when it runs, and fails then.
    let _writes = s.config_write_lock();
    if let Some(current) = s.chains.current(&account)? {
        let users: Vec<String> = current
            .chains
            .iter()
            .flat_map(|c| c.steps.iter().map(move |st| (c, st)))
            .filter(|(_, st)| {
                st.config.to_map().get("template") == Some(&Value::String(slug.clone()))
            })
            .map(|(c, st)| format!("chain {} step {}", c.name, st.step_name()))
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "template_in_use",
                format!(
                    "template {slug:?} of account {account} is used by {}; change or remove them first",
                    users.join(", ")
                ),
            ));
        }
    }
    let removed = templates(&s)?.remove(&account, &slug)?;
    tracing::info!(%account, template = slug, version = removed.version, "template removed");
    Ok(Json(Template {
        account_key: account,
        summary: summary(&removed),
        source: None,
        removed: true,
    })
    .into_response())
}

pub(super) async fn template_history(
    State(s): State<ApiState>,
    Path((account, slug)): Path<(String, String)>,
) -> ApiResult {
    let account = account_key(&account)?;
    let versions: Vec<TemplateSummary> = templates(&s)?
        .history(&account, &slug)?
        .iter()
        .map(summary)
        .collect();
    if versions.is_empty() {
        return Err(TemplateStore::missing(&account, &slug).into());
    }
    Ok(Json(TemplateHistory {
        account_key: account,
        slug,
        versions,
    })
    .into_response())
}

pub(super) async fn test_template(
    State(s): State<ApiState>,
    Path((account, slug)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> ApiResult {
    let account = account_key(&account)?;
    let test: TemplateTest = if body.is_empty() {
        TemplateTest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_test",
                format!("the body is {{\"context\": …, \"recipient\": …}} as JSON: {e}"),
            )
        })?
    };
    let store = templates(&s)?;
    let compiled = store
        .compiled(&account, &slug)?
        .ok_or_else(|| TemplateStore::missing(&account, &slug))?;
    let version = store.version(&account, &slug, compiled.version)?;
    let rendered = compiled
        .compiled
        .render(&test.context, &test.recipient)
        .map_err(|e| {
            let code = match e {
                TemplateError::Context { .. } => "context_invalid",
                _ => "render_failed",
            };
            let mut err =
                ApiError::bad_request(code, format!("template {slug:?} of account {account}: {e}"));
            err.details = Some(to_json(&problem(&e)));
            err
        })?;
    Ok(Json(TemplateRendered {
        account_key: account,
        summary: summary(&version),
        subject: rendered.subject,
        html: rendered.html,
        text: rendered.text,
        idempotency: rendered.idempotency,
    })
    .into_response())
}
