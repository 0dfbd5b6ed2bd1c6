//! The seed's flow for a new handler: choose the event source and type
//! (offered from the kinds of event the account has had, or typed in),
//! choose the handler from the catalog, fill in its options in a form
//! generated from the handler's [`Options`] — the description `chains apply`
//! checks against, so the form says what apply will say — preview the step
//! against the latest real event of that kind (a dry run, refreshed as the
//! form is edited), and save it as a new chain version.

use std::collections::HashMap;

use axum::extract::{Form, Query, State};
use axum::response::{IntoResponse, Redirect};
use minijinja::context;
use serde_json::{Map, Value, json};
use switchboard_engine::dry_run;
use switchboard_handlers::options::Kind;
use switchboard_handlers::{Options, Registry};
use switchboard_rules::{
    AccountChains, ChainFile, ChainProblem, ChainSpec, ChainStoreError, Format, ValidChainFile,
    parse_chain_file, validate,
};
use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType, VumiApiEvent};

use super::session::Session;
use super::{OnAccount, Page, checked_form, internal, render, session_view, view};
use crate::api::ApiState;

/// The form, as the browser sent it: `name`, `conversation_type`,
/// `event_type`, `conversation_key`, `when`, `handler`, `sample` (the
/// preview's event data), `opt.NAME` per option (`config` for a script's),
/// and `csrf` and `action` on a post.
pub(super) type Fields = HashMap<String, String>;

/// A field as a name or key: trimmed.
fn field<'a>(f: &'a Fields, name: &str) -> &'a str {
    f.get(name).map(|v| v.trim()).unwrap_or("")
}

/// A field as text (an option's value, the sample): as typed, but for the
/// line endings a browser sends (`\r\n`); empty when only whitespace.
fn text(f: &Fields, name: &str) -> String {
    match f.get(name) {
        Some(v) if !v.trim().is_empty() => v.replace("\r\n", "\n"),
        _ => String::new(),
    }
}

pub(super) async fn page(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Query(fields): Query<Fields>,
) -> Page {
    show(&s, &key, &session, Target::NewChain, fields)
}

pub(super) async fn act(
    State(s): State<ApiState>,
    OnAccount { session, key }: OnAccount,
    Form(fields): Form<Fields>,
) -> Page {
    submit(&s, &key, &session, Target::NewChain, fields).await
}

/// The form for `target`, from a link (`fields` from its query; a step
/// being edited starts from its config).
pub(super) fn show(
    s: &ApiState,
    key: &AccountKey,
    session: &Session,
    target: Target,
    fields: Fields,
) -> Page {
    let mut draft = Draft::new(s, key, target, fields);
    draft.fill_sample(s, key);
    Ok(draft.render(s, key, session, None))
}

/// The form for `target` posted: a preview (nothing saved), or a save as a
/// new chain version when it passes the checks `chains apply` makes.
pub(super) async fn submit(
    s: &ApiState,
    key: &AccountKey,
    session: &Session,
    target: Target,
    fields: Fields,
) -> Page {
    checked_form(session, field(&fields, "csrf"))?;
    let save = field(&fields, "action") == "save";
    let seen = field(&fields, "seen").to_string();
    let mut draft = Draft::new(s, key, target, fields);
    if draft.options.is_none() {
        return Ok(draft.render(s, key, session, None));
    }
    if !save {
        let preview = match draft.preview(s, key).await {
            Some(preview) => preview,
            // The live preview replaces only its own section: it says why
            // there is nothing to show.
            None => json!({
                "outcome": "not previewed",
                "error": draft.all_problems(),
            }),
        };
        return Ok(draft.render(s, key, session, Some(preview)));
    }
    let stored = {
        let _writes = s.config_write_lock();
        if let Target::Step { chain, .. } = &draft.target {
            // The step's place and the chain it edits, as the form showed
            // them: saved only onto that chain.
            let now = s
                .chains
                .current(key)
                .map_err(|e| internal(session, &e))?
                .and_then(|v| v.chains.into_iter().find(|c| c.name == chain.name));
            if now.is_none_or(|now| super::chain_page::fingerprint(&now) != seen) {
                return Err(super::error_page(
                    axum::http::StatusCode::CONFLICT,
                    Some(session),
                    super::chain_page::CHANGED_SINCE_FORM,
                )
                .into());
            }
        }
        match draft.checked(s, key) {
            Some(valid) => {
                let change = draft.change();
                match s
                    .chains
                    .apply_changes(valid, true, &change, s.registry.as_ref())
                {
                    Ok((version, _)) => Some(version.version),
                    Err(ChainStoreError::Invalid(e)) => {
                        draft.file_problems(e.problems);
                        None
                    }
                    Err(e) => return Err(internal(session, &e).into()),
                }
            }
            None => None,
        }
    };
    match stored {
        Some(version) => {
            let to = match &draft.target {
                Target::NewChain => format!("/console/accounts/{key}?saved={version}#chains"),
                Target::Step { chain, .. } => format!(
                    "/console/accounts/{key}/chain/{}?saved={version}",
                    chain.name
                ),
            };
            Ok(Redirect::to(&to).into_response())
        }
        None => Ok(draft.render(s, key, session, None)),
    }
}

/// What the form makes: a new chain of one step, or a step of an existing
/// chain (`index`: the step replaced; `None` adds one at the end).
pub(super) enum Target {
    NewChain,
    Step {
        chain: Box<ChainSpec>,
        index: Option<usize>,
    },
}

/// A chain being written, and what is wrong with it so far.
struct Draft {
    target: Target,
    fields: Fields,
    /// The chosen handler's options (none until a known one is chosen).
    options: Option<Options>,
    /// Problems by form field (`name`, `opt.to`, ...); `""` for the rest.
    problems: HashMap<String, Vec<String>>,
    /// Where the preview's sample came from.
    sample_from: Option<String>,
}

impl Draft {
    fn new(s: &ApiState, account: &AccountKey, target: Target, mut fields: Fields) -> Self {
        // The options of the handler an edited step names, when the form
        // does not name another.
        let mut prefilled = None;
        if let Target::Step { chain, index } = &target {
            // The chain's own match, for the preview's event.
            for (name, value) in [
                ("conversation_type", chain.conversation_type.to_string()),
                ("event_type", chain.event_type.to_string()),
                ("name", chain.name.clone()),
            ] {
                fields.insert(name.into(), value);
            }
            // A step being edited starts from what it is.
            if let Some(step) = index.and_then(|i| chain.steps.get(i))
                && !fields.contains_key("handler")
            {
                fields.insert("handler".into(), step.handler.clone());
                if let Some(name) = &step.name {
                    fields.insert("step_name".into(), name.clone());
                }
                let options = handler_options(&s.registry, account, &step.handler);
                prefill(&mut fields, options.as_ref(), &step.config.to_map());
                prefilled = Some(options);
            }
        }
        let handler = field(&fields, "handler").to_string();
        let options = prefilled.unwrap_or_else(|| handler_options(&s.registry, account, &handler));
        let mut draft = Self {
            target,
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

    /// What a save of the form is recorded as, in the version history.
    fn change(&self) -> String {
        match &self.target {
            Target::NewChain => format!("console: new chain {}", field(&self.fields, "name")),
            Target::Step {
                chain,
                index: Some(i),
            } => format!("console: chain {} step {} edited", chain.name, i + 1),
            Target::Step { chain, index: None } => {
                format!("console: chain {} step added", chain.name)
            }
        }
    }

    /// The step as the form gives it (with what the form does not show of
    /// a step being edited: `on_error`, `retry`, `idempotency`).
    fn step(&mut self) -> Value {
        let handler = field(&self.fields, "handler").to_string();
        let step_name = field(&self.fields, "step_name").to_string();
        let config = self.config();
        let mut step = match &self.target {
            Target::Step {
                chain,
                index: Some(i),
            } => chain
                .steps
                .get(*i)
                .and_then(|old| serde_json::to_value(old).ok())
                .unwrap_or_else(|| json!({})),
            _ => json!({}),
        };
        step["handler"] = json!(handler);
        step["config"] = Value::Object(config);
        match step.as_object_mut() {
            Some(map) if step_name.is_empty() => {
                map.remove("name");
            }
            Some(map) => {
                map.insert("name".into(), json!(step_name));
            }
            None => {}
        }
        step
    }

    /// The chain as a chain file's JSON, from the form.
    fn chain_file(&mut self, account: &AccountKey) -> Value {
        if let Target::Step { chain, index } = &self.target {
            let mut chain_json = serde_json::to_value(chain.as_ref()).expect("a chain serialises");
            let at = *index;
            let step = self.step();
            if let Some(steps) = chain_json["steps"].as_array_mut() {
                match at {
                    Some(i) if i < steps.len() => steps[i] = step,
                    _ => steps.push(step),
                }
            }
            return json!({ "account_key": account, "chains": [chain_json] });
        }
        let step = self.step();
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
        chain.insert("steps".into(), json!([step]));
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
            let raw = text(&self.fields, &format!("opt.{}", option.name));
            if raw.is_empty() {
                continue;
            }
            let raw = raw.as_str();
            let value = match option.kind {
                // A literal (a provider, a secret's name) is a name: trimmed.
                Kind::Text if !option.template => json!(raw.trim()),
                Kind::Text => json!(raw),
                // A number as a number; anything else as written, for the
                // check to name.
                Kind::Count => raw
                    .trim()
                    .parse::<u64>()
                    .map_or_else(|_| json!(raw.trim()), |n| json!(n)),
                Kind::Table => match serde_json::from_str::<Value>(raw) {
                    Ok(table @ Value::Object(_)) => table,
                    _ => json!(raw),
                },
                // A JSON object is the table; anything else is the text.
                Kind::TextOrTable => match serde_json::from_str::<Value>(raw.trim()) {
                    Ok(table @ Value::Object(_)) => table,
                    _ => json!(raw.trim()),
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
                // One per line: a contact's key (or a template), or a
                // person as a JSON object.
                Kind::People => {
                    let people: Vec<Value> = raw
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(|l| match serde_json::from_str::<Value>(l) {
                            Ok(person @ Value::Object(_)) => person,
                            _ => json!(l),
                        })
                        .collect();
                    match people.as_slice() {
                        [one] => one.clone(),
                        _ => Value::Array(people),
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
                self.problem("", form_error(&e));
                return None;
            }
        };
        let name = field(&self.fields, "name");
        if matches!(self.target, Target::NewChain)
            && let Ok(Some(current)) = s.chains.current(account)
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
        let chain = field(&self.fields, "name").to_string();
        // The step of the form, as problems number steps (from 1).
        let position = match &self.target {
            Target::NewChain => 1,
            Target::Step { index: Some(i), .. } => i + 1,
            Target::Step { chain, index: None } => chain.steps.len() + 1,
        };
        for p in problems {
            // A problem of another chain (a merge re-checks the account's
            // chains) or of another step is said whole, above the form.
            let ours = p.chain.as_deref() == Some(chain.as_str())
                && p.step.as_ref().is_none_or(|(n, _)| *n == position);
            let at = match p.field.as_deref() {
                _ if !ours => None,
                Some(f) if f.starts_with("config.") => {
                    let option = f["config.".len()..]
                        .split(['.', '['])
                        .next()
                        .unwrap_or_default();
                    match &self.options {
                        Some(o) if o.open => Some("config".to_string()),
                        Some(o) if o.get(option).is_some() => Some(format!("opt.{option}")),
                        _ => None,
                    }
                }
                Some("name") if p.step.is_some() => Some("step_name".to_string()),
                Some(
                    f @ ("name" | "conversation_type" | "event_type" | "conversation_key" | "when"
                    | "handler" | "config"),
                ) => Some(f.to_string()),
                _ => None,
            };
            match at {
                Some(at) => self.problem(&at, p.message),
                None => self.problem("", p.to_string()),
            }
        }
    }

    /// A dry run of the step against the sample: what it would run, with
    /// every template rendered, and what it would give.
    async fn preview(&mut self, s: &ApiState, account: &AccountKey) -> Option<Value> {
        let valid = self.checked(s, account)?;
        let sample = text(&self.fields, "sample");
        let data = if sample.is_empty() {
            Map::new()
        } else {
            match serde_json::from_str(&sample) {
                Ok(Value::Object(map)) => map,
                _ => {
                    self.problem("sample", "must be a JSON object: the event's event_data");
                    return None;
                }
            }
        };
        let file = valid.into_file();
        let chain = &file.chains[0];
        let conversation = match chain.conversation_key() {
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
        let at = match &self.target {
            Target::NewChain => 0,
            Target::Step { index: Some(i), .. } => *i,
            Target::Step { chain, index: None } => chain.steps.len(),
        };
        let step = report["chains"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["runs"] == true))
            .and_then(|c| c["steps"].get(at))
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
                    "the step does not run for this event (the chain's `when` is false, or an \
                     earlier step stops it)"
                ),
            }),
        })
    }

    fn render(
        &self,
        s: &ApiState,
        account: &AccountKey,
        session: &Session,
        preview: Option<Value>,
    ) -> axum::response::Response {
        // Offered only where the events are chosen: a new chain's form, not
        // a step's.
        let offered = match self.target {
            Target::NewChain => s.event_kinds.of(account).unwrap_or_default(),
            Target::Step { .. } => Vec::new(),
        };
        let kinds: Vec<Value> = offered
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
                        Kind::People => "people",
                        Kind::Count => "count",
                        Kind::TextOrTable => "text_or_table",
                    },
                    "required": o.required,
                    "template": o.template,
                    "secret": o.secret,
                    "choices": o.choices,
                    "default": o.default.as_ref().map(|d| match d {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }),
                    "value": text(&self.fields, &name),
                    "problems": problems(&name),
                })
            })
            .collect();
        let one_of: Vec<String> = self
            .options
            .iter()
            .flat_map(|o| &o.one_of_required)
            .map(|(names, why)| format!("{} {why}", names.join(" or ")))
            .collect();
        let alternatives: Vec<String> = self
            .options
            .iter()
            .filter(|o| !o.alternatives.is_empty())
            .map(|o| o.alternatives_text())
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
            "step_name",
            "",
        ] {
            errors.insert(if name.is_empty() { "form" } else { name }, problems(name));
        }
        let (mode, action, step_number) = match &self.target {
            Target::NewChain => (
                "new",
                format!("/console/accounts/{account}/chains/new"),
                None,
            ),
            Target::Step {
                chain,
                index: Some(i),
            } => (
                "edit",
                format!("/console/accounts/{account}/chain/{}/steps/{i}", chain.name),
                Some(i + 1),
            ),
            Target::Step { chain, index: None } => (
                "add",
                format!("/console/accounts/{account}/chain/{}/steps/add", chain.name),
                Some(chain.steps.len() + 1),
            ),
        };
        // The chain as the form was first shown, carried through previews.
        let seen = match &self.target {
            Target::NewChain => None,
            Target::Step { chain, .. } => Some(match field(&self.fields, "seen") {
                "" => super::chain_page::fingerprint(chain),
                seen => seen.to_string(),
            }),
        };
        render(
            "new_chain.html",
            context! {
                mode,
                action,
                step_number,
                seen,
                account => account.to_string(),
                session => session_view(session),
                kinds => view(&kinds),
                handlers => view(&handlers),
                handler => value("handler"),
                open => self.options.as_ref().is_some_and(|o| o.open),
                chosen => self.options.is_some(),
                options => view(&options),
                one_of,
                alternatives,
                values => view(json!({
                    "name": value("name"),
                    "conversation_type": value("conversation_type"),
                    "event_type": value("event_type"),
                    "conversation_key": value("conversation_key"),
                    "when": value("when"),
                    "config": text(&self.fields, "config"),
                    "sample": text(&self.fields, "sample"),
                    "step_name": value("step_name"),
                })),
                sample_from => self.sample_from.clone(),
                errors => view(&errors),
                preview => preview.map(view),
            },
        )
    }
}

/// A chain file built from a form that does not parse, said without the
/// place in that file (which no one wrote).
pub(super) fn form_error(e: &switchboard_rules::ParseError) -> String {
    let message = e.to_string();
    let message = message.strip_prefix("the form: ").unwrap_or(&message);
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// The option fields of a step's `config`, for its form: strings as they
/// are, recipients one per line, tables (and anything else) as JSON.
fn prefill(fields: &mut Fields, options: Option<&Options>, config: &Map<String, Value>) {
    let Some(options) = options else {
        return;
    };
    if options.open {
        if !config.is_empty() {
            fields.insert("config".into(), pretty(config));
        }
        return;
    }
    for option in &options.options {
        let Some(value) = config.get(option.name) else {
            continue;
        };
        let text = match (option.kind, value) {
            (_, Value::String(s)) => s.clone(),
            (Kind::Recipients | Kind::People, Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join("\n"),
            (Kind::People, Value::Object(_)) => value.to_string(),
            (_, other) => serde_json::to_string_pretty(other).expect("JSON serialises"),
        };
        fields.insert(format!("opt.{}", option.name), text);
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
