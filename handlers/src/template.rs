//! Config templates: every string in a step's config is a minijinja template
//! over `event`, `steps` and `account`, rendered with strict undefined
//! behaviour, so a typo is an error rather than an empty string.
//!
//! A string that is one expression and nothing else (`"{{ event.event_data.score }}"`)
//! keeps the type of its value (a number stays a number, an object an object);
//! any other template renders to a string. Strings without `{{`, `{%` or `{#`
//! are literals and cost nothing to "render".

use std::collections::HashSet;
use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior, Value as JinjaValue};
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

/// The template engine, shared by every step.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
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
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        Self { env }
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
        Ok(match value {
            Value::String(s) if is_template(s) => self
                .render_one(s, scope)
                .map_err(|e| format!("{path}: {e}"))?,
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.render(v, &format!("{path}[{i}]"), scope))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.render(v, &format!("{path}.{k}"), scope)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    fn render_one(&self, source: &str, scope: &Scope) -> Result<Value, String> {
        if let Some(expr) = sole_expression(source) {
            let compiled = self
                .env
                .compile_expression(expr)
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
        let template = self
            .env
            .template_from_str(source)
            .map_err(|e| format!("template {source:?}: {}", describe(&e)))?;
        template
            .render(scope.0.clone())
            .map(Value::String)
            .map_err(|e| self.explain(source, &e, template.undeclared_variables(true), scope))
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
