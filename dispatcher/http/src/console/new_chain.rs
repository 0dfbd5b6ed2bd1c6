//! The seed's flow for a new handler: choose the event source and type
//! (offered from the kinds of event the account has had, or typed in),
//! choose the handler from the catalog, fill in its options in a form
//! generated from the handler's [`Options`] — the description `chains apply`
//! checks against, so the form says what apply will say — preview the step
//! against the latest real event of that kind (a dry run, refreshed as the
//! form is edited), and save it as a new chain version.

use std::collections::HashMap;

use axum::extract::{Form, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use minijinja::context;
use serde_json::{Map, Value, json};
use switchboard_engine::dry_run;
use switchboard_handlers::options::Kind;
use switchboard_handlers::{Options, Registry};
use switchboard_rules::{
    AccountChains, ChainFile, ChainProblem, ChainStoreError, Format, ValidChainFile,
    parse_chain_file, validate,
};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

use super::{Page, checked_form, internal, reachable, render, session_view, signed_in, view};
use crate::api::ApiState;

/// The form, as the browser sent it: `name`, `conversation_type`,
/// `event_type`, `conversation_key`, `when`, `handler`, `sample` (the
/// preview's event data), `opt.NAME` per option (`config` for a script's),
/// and `csrf` and `action` on a post.
type Fields = HashMap<String, String>;

fn field<'a>(f: &'a Fields, name: &str) -> &'a str {
    f.get(name).map(|v| v.trim()).unwrap_or("")
}

pub(super) async fn page(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(account): Path<String>,
    Query(fields): Query<Fields>,
) -> Page {
    let session = signed_in(&s, &headers)?;
    let key = reachable(&session, &account)?;
    let mut draft = Draft::new(&s, &key, fields);
    draft.fill_sample(&s, &key);
    Ok(draft.render(&s, &key, &session, None))
}

pub(super) async fn act(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(account): Path<String>,
    Form(fields): Form<Fields>,
) -> Page {
    let session = signed_in(&s, &headers)?;
    let key = reachable(&session, &account)?;
    checked_form(&session, field(&fields, "csrf"))?;
    let save = field(&fields, "action") == "save";
    let mut draft = Draft::new(&s, &key, fields);
    if draft.options.is_none() {
        return Ok(draft.render(&s, &key, &session, None));
    }
    if !save {
        let preview = match draft.preview(&s, &key).await {
            Some(preview) => preview,
            // The live preview replaces only its own section: it says why
            // there is nothing to show.
            None => json!({
                "outcome": "not previewed",
                "error": draft.all_problems(),
            }),
        };
        return Ok(draft.render(&s, &key, &session, Some(preview)));
    }
    let stored = {
        let _writes = s.config_writes.lock().expect("config write lock");
        match draft.checked(&s, &key) {
            Some(valid) => {
                let change = format!("console: new chain {}", field(&draft.fields, "name"));
                match s
                    .chains
                    .apply_changes(valid, true, &change, s.registry.as_ref())
                {
                    Ok((version, _)) => Some(version.version),
                    Err(ChainStoreError::Invalid(e)) => {
                        draft.file_problems(e.problems);
                        None
                    }
                    Err(e) => return Err(internal(&session, &e).into()),
                }
            }
            None => None,
        }
    };
    match stored {
        Some(version) => Ok(Redirect::to(&format!(
            "/console/accounts/{account}?saved={version}#chains"
        ))
        .into_response()),
        None => Ok(draft.render(&s, &key, &session, None)),
    }
}

/// A chain being written, and what is wrong with it so far.
struct Draft {
    fields: Fields,
    /// The chosen handler's options (none until a known one is chosen).
    options: Option<Options>,
    /// Problems by form field (`name`, `opt.to`, ...); `""` for the rest.
    problems: HashMap<String, Vec<String>>,
    /// Where the preview's sample came from.
    sample_from: Option<String>,
}

impl Draft {
    fn new(s: &ApiState, account: &AccountKey, fields: Fields) -> Self {
        let handler = field(&fields, "handler").to_string();
        let options = handler_options(&s.registry, account, &handler);
        let mut draft = Self {
            fields,
            options,
            problems: HashMap::new(),
            sample_from: None,
        };
        if !handler.is_empty() && draft.options.is_none() {
            draft.problem(
                "handler",
                format!("there is no handler {handler:?} here; pick one from the list"),
            );
        }
        draft
    }

    /// Every problem, each after the field it is about.
    fn all_problems(&self) -> String {
        let mut all: Vec<String> = self
            .problems
            .iter()
            .flat_map(|(field, list)| {
                let field = field.strip_prefix("opt.").unwrap_or(field);
                list.iter().map(move |p| {
                    if field.is_empty() {
                        p.clone()
                    } else {
                        format!("{field}: {p}")
                    }
                })
            })
            .collect();
        all.sort();
        all.join("; ")
    }

    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems
            .entry(field.to_string())
            .or_default()
            .push(message.into());
    }

    /// Prefills the sample with the data of the latest event of the chosen
    /// kind, while its trace is kept.
    fn fill_sample(&mut self, s: &ApiState, account: &AccountKey) {
        if !field(&self.fields, "sample").is_empty() {
            return;
        }
        let (ct, et) = (
            field(&self.fields, "conversation_type"),
            field(&self.fields, "event_type"),
        );
        if ct.is_empty() || et.is_empty() {
            return;
        }
        let Ok(Some(kind)) = s.event_kinds.get(account, ct, et) else {
            return;
        };
        if let Ok(Some(trace)) = s.traces.get(account, &kind.last_event_id) {
            let data = serde_json::to_string_pretty(&trace.event.event_data)
                .expect("event data serialises");
            self.fields.insert("sample".into(), data);
            self.sample_from = Some(kind.last_event_id.to_string());
        }
    }

    /// The chain as a chain file's JSON, from the form.
    fn chain_file(&mut self, account: &AccountKey) -> Value {
        let f = &self.fields;
        let mut chain = Map::new();
        for name in ["name", "conversation_type", "event_type"] {
            chain.insert(name.into(), json!(field(f, name)));
        }
        for name in ["conversation_key", "when"] {
            if !field(f, name).is_empty() {
                chain.insert(name.into(), json!(field(f, name)));
            }
        }
        let handler = field(f, "handler").to_string();
        let config = self.config();
        chain.insert(
            "steps".into(),
            json!([{ "handler": handler, "config": config }]),
        );
        json!({ "account_key": account, "chains": [chain] })
    }

    /// The step's config from the option fields: an empty field is an
    /// option not given; a table is JSON (or a template); recipients are
    /// one per line.
    fn config(&mut self) -> Map<String, Value> {
        let Some(options) = &self.options else {
            return Map::new();
        };
        if options.open {
            let raw = field(&self.fields, "config");
            if raw.is_empty() {
                return Map::new();
            }
            return match serde_json::from_str(raw) {
                Ok(Value::Object(map)) => map,
                _ => {
                    self.problem("config", "must be a JSON object, e.g. {\"threshold\": 3}");
                    Map::new()
                }
            };
        }
        let mut config = Map::new();
        for option in &options.options {
            let raw = field(&self.fields, &format!("opt.{}", option.name));
            if raw.is_empty() {
                continue;
            }
            let value = match option.kind {
                Kind::Text => json!(raw),
                Kind::Table => match serde_json::from_str::<Value>(raw) {
                    Ok(table @ Value::Object(_)) => table,
                    _ => json!(raw),
                },
                Kind::Recipients => {
                    let lines: Vec<&str> = raw
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect();
                    match lines.as_slice() {
                        [one] => json!(one),
                        _ => json!(lines),
                    }
                }
            };
            config.insert(option.name.to_string(), value);
        }
        config
    }

    /// The chain checked as `chains apply` checks it, or `None` with its
    /// problems filed next to their fields.
    fn checked(&mut self, s: &ApiState, account: &AccountKey) -> Option<ValidChainFile> {
        let text = self.chain_file(account).to_string();
        let file: ChainFile = match parse_chain_file(&text, Format::Json, "the form") {
            Ok(file) => file,
            Err(e) => {
                self.problem("", e.to_string());
                return None;
            }
        };
        let name = field(&self.fields, "name");
        if let Ok(Some(current)) = s.chains.current(account)
            && current.chains.iter().any(|c| c.name == name)
        {
            self.problem(
                "name",
                format!("account {account} has a chain named {name:?} already; pick another name"),
            );
        }
        match validate(file, account, s.registry.as_ref()) {
            Ok(valid) if self.problems.is_empty() => Some(valid),
            Ok(_) => None,
            Err(e) => {
                self.file_problems(e.problems);
                None
            }
        }
    }

    /// Files each problem next to the form field it is about.
    fn file_problems(&mut self, problems: Vec<ChainProblem>) {
        for p in problems {
            let at = match p.field.as_deref() {
                Some(f) if f.starts_with("config.") => {
                    let option = f["config.".len()..]
                        .split(['.', '['])
                        .next()
                        .unwrap_or_default();
                    if self.options.as_ref().is_some_and(|o| o.open) {
                        "config".to_string()
                    } else {
                        format!("opt.{option}")
                    }
                }
                Some(
                    f @ ("name" | "conversation_type" | "event_type" | "conversation_key" | "when"
                    | "handler" | "config"),
                ) => f.to_string(),
                _ => String::new(),
            };
            self.problem(&at, p.message);
        }
    }

    /// A dry run of the step against the sample: what it would run, with
    /// every template rendered, and what it would give.
    async fn preview(&mut self, s: &ApiState, account: &AccountKey) -> Option<Value> {
        let valid = self.checked(s, account)?;
        let sample = field(&self.fields, "sample");
        let data = if sample.is_empty() {
            Map::new()
        } else {
            match serde_json::from_str(sample) {
                Ok(Value::Object(map)) => map,
                _ => {
                    self.problem("sample", "must be a JSON object: the event's event_data");
                    return None;
                }
            }
        };
        let file = valid.into_file();
        let chain = &file.chains[0];
        let conversation = match &chain.conversation_key {
            Some(key) => key.clone(),
            None => ConversationKey::new("console-preview").expect("a valid key"),
        };
        let (Ok(ct), Ok(et)) = (
            ConversationType::new(field(&self.fields, "conversation_type")),
            EventType::new(field(&self.fields, "event_type")),
        ) else {
            self.problem(
                "",
                "a preview needs a concrete conversation type and event type, not `*`",
            );
            return None;
        };
        let event = VumiApiEvent::new(account.clone(), conversation, ct, et, data);
        let chains = AccountChains::new(0, file);
        let limits = dry_run::FollowLimits {
            max_depth: s.max_depth,
            max_event_bytes: s.max_event_bytes,
        };
        let report = dry_run::test_chains(&s.registry, &chains, &event, limits).await;
        let step = report["chains"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["runs"] == true))
            .and_then(|c| c["steps"].get(0))
            .cloned();
        Some(match step {
            Some(step) => json!({
                "outcome": step["outcome"],
                "error": step["error"],
                "config": step["would_run"]["config"].as_object().map(pretty),
                "output": step["output"].as_object().map(pretty),
            }),
            None => json!({
                "outcome": "not run",
                "error": report["chains"][0]["error"].as_str().unwrap_or(
                    "the chain does not run for this event (its `when` is false)"
                ),
            }),
        })
    }

    fn render(
        &self,
        s: &ApiState,
        account: &AccountKey,
        session: &super::session::Session,
        preview: Option<Value>,
    ) -> axum::response::Response {
        let kinds: Vec<Value> = s
            .event_kinds
            .of(account)
            .unwrap_or_default()
            .iter()
            .map(|k| {
                json!({
                    "conversation_type": k.conversation_type,
                    "event_type": k.event_type,
                    "count": k.count,
                    "last_seen": switchboard_sdk::format_rfc3339(k.last_seen),
                })
            })
            .collect();
        let mut handlers: Vec<Value> = s
            .registry
            .handlers()
            .iter()
            .map(|h| json!({ "name": h.name(), "description": h.description() }))
            .collect();
        if let Some(scripts) = s.registry.scripts()
            && let Ok(list) = scripts.list(account)
        {
            handlers.extend(list.iter().map(|v| {
                json!({
                    "name": format!("script:{}", v.name),
                    "description": format!("the account's Rhai script {} (version {})", v.name, v.version),
                })
            }));
        }
        let problems = |name: &str| self.problems.get(name).cloned().unwrap_or_default();
        let options: Vec<Value> = self
            .options
            .iter()
            .flat_map(|o| &o.options)
            .map(|o| {
                let name = format!("opt.{}", o.name);
                json!({
                    "field": name,
                    "id": format!("opt-{}", o.name),
                    "name": o.name,
                    "description": o.description,
                    "kind": match o.kind {
                        Kind::Text => "text",
                        Kind::Table => "table",
                        Kind::Recipients => "recipients",
                    },
                    "required": o.required,
                    "template": o.template,
                    "secret": o.secret,
                    "choices": o.choices,
                    "default": o.default.as_ref().map(|d| match d {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }),
                    "value": field(&self.fields, &name),
                    "problems": problems(&name),
                })
            })
            .collect();
        let one_of: Vec<String> = self
            .options
            .iter()
            .flat_map(|o| &o.one_of_required)
            .map(|names| names.join(" or "))
            .collect();
        let value = |name: &str| field(&self.fields, name).to_string();
        let mut errors = HashMap::new();
        for name in [
            "name",
            "conversation_type",
            "event_type",
            "conversation_key",
            "when",
            "handler",
            "config",
            "sample",
            "",
        ] {
            errors.insert(if name.is_empty() { "form" } else { name }, problems(name));
        }
        render(
            "new_chain.html",
            context! {
                account => account.to_string(),
                session => session_view(session),
                kinds => view(&kinds),
                handlers => view(&handlers),
                handler => value("handler"),
                open => self.options.as_ref().is_some_and(|o| o.open),
                chosen => self.options.is_some(),
                options => view(&options),
                one_of,
                values => view(json!({
                    "name": value("name"),
                    "conversation_type": value("conversation_type"),
                    "event_type": value("event_type"),
                    "conversation_key": value("conversation_key"),
                    "when": value("when"),
                    "config": value("config"),
                    "sample": value("sample"),
                })),
                sample_from => self.sample_from.clone(),
                errors => view(&errors),
                preview => preview.map(view),
            },
        )
    }
}

fn pretty(map: &Map<String, Value>) -> String {
    serde_json::to_string_pretty(map).expect("JSON serialises")
}

/// The options of `handler`, a built-in handler's or, for `script:NAME`,
/// any (when the account has that script).
fn handler_options(registry: &Registry, account: &AccountKey, handler: &str) -> Option<Options> {
    if let Some(name) = handler.strip_prefix("script:") {
        let scripts = registry.scripts()?;
        return match scripts.current(account, name) {
            Ok(Some(_)) => Some(Options::open()),
            _ => None,
        };
    }
    registry.get(handler).map(|h| h.options())
}
