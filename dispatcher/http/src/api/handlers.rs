//! The handler catalog: `GET /v1/handlers` and
//! `GET /v1/accounts/{account}/handlers`.

use axum::Json;
use axum::extract::{Path, State};
use switchboard_api::handlers::{HandlerCatalog, HandlerEntry};
use switchboard_handlers::{Options, Registry};

use super::{ApiError, ApiState, account_key, script_summary};

/// The built-in handlers of `registry`, each with its options' JSON Schema.
pub(crate) fn catalog(registry: &Registry) -> Vec<HandlerEntry> {
    registry
        .handlers()
        .into_iter()
        .map(|h| HandlerEntry {
            name: h.name().to_string(),
            description: h.description().to_string(),
            output: h.output().to_string(),
            effects: h.effects().as_str().to_string(),
            options: h.options().json_schema(),
        })
        .collect()
}

pub(super) async fn builtin(State(s): State<ApiState>) -> Json<HandlerCatalog> {
    Json(HandlerCatalog {
        account_key: None,
        handlers: catalog(&s.registry),
        scripts: Vec::new(),
        script_options: Options::open().json_schema(),
    })
}

pub(super) async fn of_account(
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> Result<Json<HandlerCatalog>, ApiError> {
    let account = account_key(&account)?;
    let scripts = match s.registry.scripts() {
        Some(store) => store.list(&account)?.iter().map(script_summary).collect(),
        None => Vec::new(),
    };
    Ok(Json(HandlerCatalog {
        account_key: Some(account),
        handlers: catalog(&s.registry),
        scripts,
        script_options: Options::open().json_schema(),
    }))
}
