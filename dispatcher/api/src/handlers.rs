//! The handler catalog: what a chain step can run, and the options each
//! takes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_sdk::AccountKey;

use crate::scripts::ScriptSummary;

/// `GET /v1/handlers`: the built-in handlers; `GET
/// /v1/accounts/{account}/handlers`: those and the account's scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerCatalog {
    /// The account whose scripts are listed (absent for `/v1/handlers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_key: Option<AccountKey>,
    /// The built-in handlers, by name.
    pub handlers: Vec<HandlerEntry>,
    /// The account's scripts (each a `script:NAME` handler), by name.
    #[serde(default)]
    pub scripts: Vec<ScriptSummary>,
    /// The options of every `script:NAME` step (any: the script reads its
    /// `config`), as a JSON Schema.
    pub script_options: Value,
}

/// A built-in handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerEntry {
    /// What a step names in `handler = "..."`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// What its output holds (`steps.NAME` for later steps).
    pub output: String,
    /// What it changes besides its output: `none`, `local` (records the
    /// dispatcher keeps) or `external` (the world outside).
    pub effects: String,
    /// Its options, as a JSON Schema (draft 2020-12) of the step's `config`:
    /// `required`, each option's `type` (or `enum`), `default` and
    /// `description`, and keywords of ours: `x-template` (the option may
    /// be a template, rendered when the step runs), `x-secret` (it names
    /// one of the account's secrets) and, at the top, `x-order` (the
    /// options in the order a form shows them). `chains apply` checks a step's config
    /// against the same description.
    pub options: Value,
}
