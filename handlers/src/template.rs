//! Config templates: every string in a step's config is a minijinja template
//! over `event`, `steps` and `account`, rendered with strict undefined
//! behaviour, so a typo is an error rather than an empty string.
//!
//! A string that is one expression and nothing else (`"{{ event.event_data.score }}"`)
//! keeps the type of its value (a number stays a number, an object an object);
//! any other template renders to a string. Strings without `{{`, `{%` or `{#`
//! are literals and cost nothing to "render".

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock};

use minijinja::{AutoEscape, Environment, Expression, UndefinedBehavior, Value as JinjaValue};
use serde_json::{Map, Value};
use switchboard_rules::FieldProblem;
use switchboard_sdk::{AccountKey, VumiApiEvent};

/// The names a template may start from.
pub const ROOTS: [&str; 3] = ["event", "steps", "account"];
const EVENT_FIELDS: [&str; 12] = [
    "v",
    "id",
    "account_key",
    "conversation_key",
    "conversation_type",
    "event_type",
    "event_data",
    "occurred_at",
    "expires_at",
    "parent_id",
    "root_id",
    "depth",
];
const ACCOUNT_FIELDS: [&str; 1] = ["key"];
/// Functions minijinja provides that a template may call.
const GLOBALS: [&str; 5] = ["range", "dict", "namespace", "debug", "lipsum"];
/// Bounds the work one template may do (loops over large data).
const FUEL: u64 = 50_000;
/// Compiled templates, and compiled expressions, kept by source for
/// rendering: this many of each, then the cache starts over (chains change,
/// and their sources with them).
const CACHE_LIMIT: usize = 4_096;

/// The template engine, shared by every step. Rendering compiles a source
/// once and keeps it: compiling was half the cost of rendering a template.
pub struct Templates {
    env: Environment<'static>,
    /// Templates compiled for rendering, each named by its source.
    templates: RwLock<Compiled>,
    /// Sole expressions compiled for rendering, by source.
    expressions: RwLock<HashMap<String, Arc<Expression<'static, 'static>>>>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").finish_non_exhaustive()
    }
}

/// An engine holding compiled templates, named by their sources.
struct Compiled {
    env: Environment<'static>,
    count: usize,
}

impl Compiled {
    fn new() -> Self {
        let mut env = configured();
        // Names are sources: none of them may turn on HTML escaping (a
        // source ending in `.html`), which a template from a string never has.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        Self { env, count: 0 }
    }
}

/// An engine with strict undefined behaviour and bounded work.
fn configured() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env
}

/// The engine cached expressions belong to, for as long as they are kept.
fn expression_env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(configured)
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

/// What a template renders against, built once per step.
#[derive(Debug, Clone)]
pub struct Scope(JinjaValue);

/// The event as templates and scripts see it, converted once per event (for
/// scripts: on first use, so chains without scripts never pay for it).
#[derive(Debug, Clone)]
pub struct EventValue {
    jinja: JinjaValue,
    rhai: OnceLock<rhai::Dynamic>,
}

impl EventValue {
    /// Converts `event` for templates.
    pub fn new(event: &VumiApiEvent) -> Self {
        Self {
            jinja: JinjaValue::from(minijinja::value::Serde(event)),
            rhai: OnceLock::new(),
        }
    }

    /// The event as a shared (read-only by convention) Rhai value: cloning it
    /// is an `Arc` clone, so every `when` of the event reads the one
    /// conversion. Script calls take a private copy (`flatten_clone`), so a
    /// script that changes its `event` changes nobody else's. `event` must be
    /// the event this was made from.
    pub fn rhai(&self, event: &VumiApiEvent) -> &rhai::Dynamic {
        self.rhai
            .get_or_init(|| crate::script::ScriptRuntime::to_dynamic(event).into_shared())
    }
}

/// Is this string a template (rather than a literal)?
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// The inside of a string that is exactly one `{{ expression }}`.
fn sole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#")
    {
        return None;
    }
    Some(inner.trim().trim_start_matches('-').trim_end_matches('-'))
}

impl Templates {
    /// An engine with strict undefined behaviour and bounded work.
    pub fn new() -> Self {
        Self {
            env: configured(),
            templates: RwLock::new(Compiled::new()),
            expressions: RwLock::new(HashMap::new()),
        }
    }

    /// The scope of one step.
    pub fn scope(
        &self,
        event: &EventValue,
        steps: &Map<String, Value>,
        account: &AccountKey,
    ) -> Scope {
        Scope(minijinja::context! {
            event => event.jinja.clone(),
            steps => JinjaValue::from(minijinja::value::Serde(steps)),
            account => minijinja::context! { key => account.as_str() },
        })
    }

    /// Checks every template in `value` (found at `path`): it compiles, and it
    /// refers only to `event` fields, `account.key` and the steps in `earlier`.
    pub fn check(
        &self,
        value: &Value,
        path: &str,
        earlier: &[&str],
        problems: &mut Vec<FieldProblem>,
    ) {
        match value {
            Value::String(s) if is_template(s) => {
                if let Err(message) = self.check_one(s, earlier) {
                    problems.push(FieldProblem::new(path, message));
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.check(item, &format!("{path}[{i}]"), earlier, problems);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    self.check(v, &format!("{path}.{k}"), earlier, problems);
                }
            }
            _ => {}
        }
    }

    fn check_one(&self, source: &str, earlier: &[&str]) -> Result<(), String> {
        let names: HashSet<String> = match sole_expression(source) {
            Some(expr) => self
                .env
                .compile_expression(expr)
                .map_err(|e| format!("template {source:?} does not compile: {}", describe(&e)))?
                .undeclared_variables(true),
            None => self
                .env
                .template_from_str(source)
                .map_err(|e| format!("template {source:?} does not compile: {}", describe(&e)))?
                .undeclared_variables(true),
        };
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        for name in names {
            let mut parts = name.split('.');
            let root = parts.next().unwrap_or_default();
            let field = parts.next();
            let known = match (root, field) {
                (r, _) if GLOBALS.contains(&r) => true,
                ("event", None) | ("steps", None) | ("account", None) => true,
                ("event", Some(f)) => EVENT_FIELDS.contains(&f),
                ("account", Some(f)) => ACCOUNT_FIELDS.contains(&f),
                ("steps", Some(s)) => {
                    if earlier.contains(&s) {
                        true
                    } else {
                        return Err(format!(
                            "template {source:?} refers to steps.{s}, but no earlier step of this chain is \
                             called {s:?} (earlier steps: {})",
                            if earlier.is_empty() {
                                "none".to_string()
                            } else {
                                earlier.join(", ")
                            }
                        ));
                    }
                }
                _ => false,
            };
            if !known {
                return Err(format!(
                    "template {source:?} refers to `{name}`, which is not defined: templates see \
                     event.<field> ({}), steps.<earlier step>.<output> and account.key",
                    EVENT_FIELDS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Renders every template in `value` against `scope`.
    pub fn render(&self, value: &Value, path: &str, scope: &Scope) -> Result<Value, String> {
        let mut value = value.clone();
        self.render_in_place(&mut value, path, scope)?;
        Ok(value)
    }

    /// Renders every template in `value` against `scope`, in place: what
    /// holds no template is neither copied nor rebuilt. `path` names
    /// `value` in errors. After an error `value` is partly rendered: drop
    /// it.
    pub fn render_in_place(
        &self,
        value: &mut Value,
        path: &str,
        scope: &Scope,
    ) -> Result<(), String> {
        /// Whether `v` is or holds something to render.
        fn renders(v: &Value) -> bool {
            match v {
                Value::String(s) => is_template(s),
                Value::Array(_) | Value::Object(_) => true,
                _ => false,
            }
        }
        match value {
            Value::String(s) if is_template(s) => {
                *value = self
                    .render_one(s, scope)
                    .map_err(|e| format!("{path}: {e}"))?;
            }
            Value::Array(items) => {
                for (i, v) in items.iter_mut().enumerate().filter(|(_, v)| renders(v)) {
                    self.render_in_place(v, &format!("{path}[{i}]"), scope)?;
                }
            }
            Value::Object(map) => {
                for (k, v) in map.iter_mut().filter(|(_, v)| renders(v)) {
                    self.render_in_place(v, &format!("{path}.{k}"), scope)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn render_one(&self, source: &str, scope: &Scope) -> Result<Value, String> {
        if let Some(expr) = sole_expression(source) {
            let compiled = self
                .expression(expr)
                .map_err(|e| format!("template {source:?}: {}", describe(&e)))?;
            let value = compiled.eval(scope.0.clone()).map_err(|e| {
                self.explain(source, &e, compiled.undeclared_variables(true), scope)
            })?;
            if value.is_undefined() {
                return Err(format!(
                    "template {source:?}: `{expr}` is undefined for this event"
                ));
            }
            return serde_json::to_value(&value).map_err(|e| {
                format!("template {source:?}: the value cannot be written as JSON: {e}")
            });
        }
        {
            let compiled = self.templates.read().expect("template cache lock");
            if let Ok(template) = compiled.env.get_template(source) {
                return self.render_template(source, &template, scope);
            }
        }
        {
            let mut compiled = self.templates.write().expect("template cache lock");
            if compiled.count >= CACHE_LIMIT {
                *compiled = Compiled::new();
            }
            compiled
                .env
                .add_template_owned(source.to_string(), source.to_string())
                .map_err(|e| format!("template {source:?}: {}", describe(&e)))?;
            compiled.count += 1;
        }
        let compiled = self.templates.read().expect("template cache lock");
        match compiled.env.get_template(source) {
            Ok(template) => self.render_template(source, &template, scope),
            // The cache started over in between: compile it for this once.
            Err(_) => {
                let template = self
                    .env
                    .template_from_str(source)
                    .map_err(|e| format!("template {source:?}: {}", describe(&e)))?;
                self.render_template(source, &template, scope)
            }
        }
    }

    fn render_template(
        &self,
        source: &str,
        template: &minijinja::Template<'_, '_>,
        scope: &Scope,
    ) -> Result<Value, String> {
        template
            .render(scope.0.clone())
            .map(Value::String)
            .map_err(|e| self.explain(source, &e, template.undeclared_variables(true), scope))
    }

    /// The sole expression `expr`, compiled once.
    fn expression(
        &self,
        expr: &str,
    ) -> Result<Arc<Expression<'static, 'static>>, minijinja::Error> {
        if let Some(found) = self
            .expressions
            .read()
            .expect("expression cache lock")
            .get(expr)
        {
            return Ok(found.clone());
        }
        let compiled = Arc::new(expression_env().compile_expression_owned(expr.to_string())?);
        let mut cache = self.expressions.write().expect("expression cache lock");
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(expr.to_string(), compiled.clone());
        Ok(compiled)
    }

    /// Renders `source` as HTML: every value inserted is HTML-escaped.
    pub fn render_html(&self, source: &str, path: &str, scope: &Scope) -> Result<String, String> {
        // minijinja escapes by the template name's extension.
        let template = self
            .env
            .template_from_named_str("config.html", source)
            .map_err(|e| format!("{path}: template {source:?}: {}", describe(&e)))?;
        template.render(scope.0.clone()).map_err(|e| {
            format!(
                "{path}: {}",
                self.explain(source, &e, template.undeclared_variables(true), scope)
            )
        })
    }

    /// Says which variable was undefined, when that was the error: minijinja
    /// reports only that *something* was.
    fn explain(
        &self,
        source: &str,
        e: &minijinja::Error,
        names: HashSet<String>,
        scope: &Scope,
    ) -> String {
        if e.kind() == minijinja::ErrorKind::UndefinedError {
            let mut names: Vec<String> = names.into_iter().collect();
            names.sort();
            for name in names {
                if let Some(missing) = first_undefined(&scope.0, &name) {
                    return format!("template {source:?}: `{missing}` is undefined for this event");
                }
            }
        }
        format!("template {source:?}: {}", describe(e))
    }
}

/// The shortest prefix of the dotted `path` that is undefined in `root`.
fn first_undefined(root: &JinjaValue, path: &str) -> Option<String> {
    let mut value = root.clone();
    let mut walked = String::new();
    for part in path.split('.') {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        value = value.get_attr(part).ok()?;
        if value.is_undefined() {
            return Some(walked);
        }
    }
    None
}

/// A minijinja error in one line: kind, detail, and line when known.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(detail) = e.detail() {
        s.push_str(": ");
        s.push_str(detail);
    }
    if let Some(line) = e.line() {
        s.push_str(&format!(" (line {line})"));
    }
    s
}

#[cfg(test)]
mod tests;
