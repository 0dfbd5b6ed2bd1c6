//! A handler's options: one description that `chains apply` checks a step's
//! config against ([`Options::check`]), that `GET /v1/handlers` publishes as
//! a JSON Schema ([`Options::json_schema`]) and that the console builds its
//! form from — so the three agree on which options there are, which are
//! required, what each takes, which may be templates and which take fixed
//! choices (a literal's own form, an E.164 number or a URL, is the option's
//! check, said in its description). And the helpers handlers read
//! their rendered options with.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use switchboard_rules::FieldProblem;

use crate::StepError;
use crate::template::is_template;

/// A check of a literal string option (a template is checked when rendered).
type Literal = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What one option takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string: a template, or a literal the option's check accepts.
    Text,
    /// A table of name = value (each value may be a template), or one
    /// template that renders to a table.
    Table,
    /// A recipient, or a non-empty list of them (each may be a template).
    Recipients,
    /// A person: a contact's key or a `{ name, email, phone }` table; or a
    /// non-empty list of them (each may be a template).
    People,
    /// A whole number, one or more (never a template).
    Count,
    /// A string (a template, or a literal the option's check accepts), or
    /// a literal table its table check accepts.
    TextOrTable,
}

/// One option of a handler.
#[derive(Clone)]
pub struct OptionSpec {
    /// The option's name in `config`.
    pub name: &'static str,
    /// What it does, for people.
    pub description: String,
    /// What it takes.
    pub kind: Kind,
    /// A step must give it.
    pub required: bool,
    /// What the handler uses when it is not given.
    pub default: Option<Value>,
    /// It may be a template, rendered against the event and earlier steps.
    pub template: bool,
    /// It names one of the account's secrets.
    pub secret: bool,
    /// The only values it takes (besides a template, if it may be one),
    /// when `closed`.
    pub choices: Vec<String>,
    /// It takes only its `choices` (which may be none at all: a provider
    /// option where the deployment has no provider).
    pub closed: bool,
    /// The largest whole number a [`Kind::Count`] takes.
    pub most: u32,
    literal: Option<Literal>,
    /// The check of a literal table ([`Kind::TextOrTable`]).
    table_literal: Option<TableLiteral>,
    /// What a missing required option is told, when more than that.
    missing: Option<String>,
}

type TableLiteral = Arc<dyn Fn(&Map<String, Value>) -> Result<(), String> + Send + Sync>;

impl fmt::Debug for OptionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptionSpec")
            .field("name", &self.name)
            .field("required", &self.required)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl OptionSpec {
    fn new(name: &'static str, kind: Kind, description: impl Into<String>) -> Self {
        Self {
            name,
            description: description.into(),
            kind,
            required: false,
            default: None,
            template: true,
            secret: false,
            choices: Vec::new(),
            closed: false,
            most: u32::MAX,
            literal: None,
            table_literal: None,
            missing: None,
        }
    }

    /// A string (each literal checked by [`OptionSpec::literal`]) or a
    /// table checked by `check`.
    pub fn text_or_table(
        name: &'static str,
        description: impl Into<String>,
        check: impl Fn(&Map<String, Value>) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        let mut spec = Self::new(name, Kind::TextOrTable, description);
        spec.table_literal = Some(Arc::new(check));
        spec
    }

    /// A string option (a template by default).
    pub fn text(name: &'static str, description: impl Into<String>) -> Self {
        Self::new(name, Kind::Text, description)
    }

    /// A whole-number option, one or more: a literal, not a template.
    pub fn count(name: &'static str, description: impl Into<String>) -> Self {
        Self::new(name, Kind::Count, description).no_template()
    }

    /// The largest whole number a count option takes.
    pub fn at_most(mut self, most: u32) -> Self {
        self.most = most;
        self
    }

    /// A table option.
    pub fn table(name: &'static str, description: impl Into<String>) -> Self {
        Self::new(name, Kind::Table, description)
    }

    /// A recipient or a list of them, each literal checked by `check`.
    pub fn recipients(
        name: &'static str,
        description: impl Into<String>,
        check: fn(&str) -> Result<String, String>,
    ) -> Self {
        Self::new(name, Kind::Recipients, description).literal(move |s| check(s).map(|_| ()))
    }

    /// A person or a list of them ([`Kind::People`]).
    pub fn people(name: &'static str, description: impl Into<String>) -> Self {
        Self::new(name, Kind::People, description)
    }

    /// A step must give it.
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// A step must give it, and one that does not is told `message`.
    pub fn required_saying(mut self, message: impl Into<String>) -> Self {
        self.missing = Some(message.into());
        self.required()
    }

    /// What the handler uses when the step does not give it.
    pub fn default(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self
    }

    /// It must be a literal: a template is refused.
    pub fn no_template(mut self) -> Self {
        self.template = false;
        self
    }

    /// It names an account secret (and is a literal).
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self.no_template()
    }

    /// A literal must pass `check` (whose error is the problem's message).
    pub fn literal(
        mut self,
        check: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.literal = Some(Arc::new(check));
        self
    }

    /// It takes one of `choices`; another literal is refused by `check`
    /// when given (its message), or by a message naming the choices.
    pub fn choices<S: ToString>(mut self, choices: impl IntoIterator<Item = S>) -> Self {
        self.choices = choices.into_iter().map(|c| c.to_string()).collect();
        self.closed = true;
        if self.literal.is_none() {
            let choices = self.choices.clone();
            self.literal = Some(Arc::new(move |s: &str| {
                if choices.iter().any(|c| c == s) {
                    Ok(())
                } else {
                    Err(format!("{s:?} is not one of {}", choices.join(", ")))
                }
            }));
        }
        self
    }

    fn check(&self, value: Option<&Value>, problems: &mut Vec<FieldProblem>) {
        let field = format!("config.{}", self.name);
        let Some(value) = value else {
            if self.required {
                let message = self
                    .missing
                    .as_deref()
                    .unwrap_or("required option is missing");
                problems.push(FieldProblem::new(field, message));
            }
            return;
        };
        match (&self.kind, value) {
            (_, Value::String(s)) if is_template(s) => {
                if !self.template {
                    let what = if self.secret {
                        "names a secret; it cannot be a template".to_string()
                    } else if self.closed && !self.choices.is_empty() {
                        format!(
                            "must be one of {}; it cannot be a template",
                            self.choices.join(", ")
                        )
                    } else {
                        "must be a literal value; it cannot be a template".to_string()
                    };
                    problems.push(FieldProblem::new(field, what));
                }
            }
            (Kind::Text | Kind::Recipients | Kind::TextOrTable, Value::String(s)) => {
                self.check_literal(s, field, problems)
            }
            (Kind::TextOrTable, Value::Object(table)) => {
                if let Some(check) = &self.table_literal
                    && let Err(message) = check(table)
                {
                    problems.push(FieldProblem::new(field, message));
                }
            }
            (Kind::TextOrTable, other) => problems.push(FieldProblem::new(
                field,
                format!("must be a string or a table, not {other}"),
            )),
            (Kind::Text, other) => {
                problems.push(FieldProblem::new(
                    field,
                    format!("must be a string, not {other}"),
                ));
            }
            (Kind::Table, Value::Object(_)) => {}
            (Kind::Table, _) => problems.push(FieldProblem::new(
                field,
                "must be a table of name = value, or a template that gives one",
            )),
            (Kind::Recipients, Value::Array(items)) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    let field = format!("{field}[{i}]");
                    match item {
                        Value::String(s) if is_template(s) => {}
                        Value::String(s) => self.check_literal(s, field, problems),
                        _ => problems.push(FieldProblem::new(field, "must be a string")),
                    }
                }
            }
            (Kind::Recipients, _) => problems.push(FieldProblem::new(
                field,
                "must be a recipient or a non-empty list of them",
            )),
            (Kind::People, Value::String(_)) => {}
            (Kind::People, Value::Object(person)) => check_person(person, field, problems),
            (Kind::People, Value::Array(items)) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    let field = format!("{field}[{i}]");
                    match item {
                        Value::String(_) => {}
                        Value::Object(person) => check_person(person, field, problems),
                        _ => problems.push(FieldProblem::new(
                            field,
                            "must be a contact's key or a { name, email, phone } table",
                        )),
                    }
                }
            }
            (Kind::People, _) => problems.push(FieldProblem::new(
                field,
                "must be a contact's key, a { name, email, phone } table, or a non-empty list of them",
            )),
            (Kind::Count, value) => {
                if count(value).is_none_or(|n| n > self.most) {
                    problems.push(FieldProblem::new(
                        field,
                        format!("must be a whole number from 1 to {}, not {value}", self.most),
                    ));
                }
            }
        }
    }

    fn check_literal(&self, s: &str, field: String, problems: &mut Vec<FieldProblem>) {
        if let Some(check) = &self.literal
            && let Err(message) = check(s)
        {
            problems.push(FieldProblem::new(field, message));
        }
    }

    /// The option as a JSON Schema. A template is a string holding `{{`,
    /// `{%` or `{#` (`#/$defs/template`); `x-template` and `x-secret` say
    /// what the option is for a form.
    fn json_schema(&self) -> Value {
        let template = || json!({ "$ref": "#/$defs/template" });
        let mut schema = match &self.kind {
            Kind::Text if !self.closed && self.template => json!({ "type": "string" }),
            Kind::Text if !self.closed => {
                json!({ "type": "string", "not": template() })
            }
            Kind::Text if self.template => {
                json!({ "anyOf": [{ "enum": self.choices }, template()] })
            }
            Kind::Text => json!({ "enum": self.choices }),
            Kind::Table if self.template => {
                json!({ "anyOf": [{ "type": "object" }, template()] })
            }
            Kind::Table => json!({ "type": "object" }),
            Kind::Count => json!({ "type": "integer", "minimum": 1, "maximum": self.most }),
            Kind::TextOrTable => json!({ "anyOf": [{ "type": "string" }, { "type": "object" }] }),
            Kind::Recipients => json!({
                "anyOf": [
                    { "type": "string" },
                    { "type": "array", "items": { "type": "string" }, "minItems": 1 }
                ]
            }),
            Kind::People => {
                let person = json!({
                    "anyOf": [
                        { "type": "string" },
                        {
                            "type": "object",
                            "additionalProperties": { "type": "string" },
                            "anyOf": [
                                { "required": ["email"] },
                                { "required": ["phone"] },
                                { "required": ["name"] }
                            ]
                        }
                    ]
                });
                json!({
                    "anyOf": [
                        person,
                        { "type": "array", "items": person, "minItems": 1 }
                    ]
                })
            }
        };
        let object = schema.as_object_mut().expect("a schema is an object");
        object.insert("description".into(), self.description.clone().into());
        if let Some(default) = &self.default {
            object.insert("default".into(), default.clone());
        }
        object.insert("x-template".into(), self.template.into());
        if self.secret {
            object.insert("x-secret".into(), true.into());
        }
        schema
    }
}

/// A [`Kind::Count`] option's value: a whole number from 1 to `u32::MAX`.
pub fn count(value: &Value) -> Option<u32> {
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
}

/// Every option of a handler.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The options, in the order a form shows them.
    pub options: Vec<OptionSpec>,
    /// Groups of options of which a step must give at least one, each with
    /// what they are for.
    pub one_of_required: Vec<(&'static [&'static str], &'static str)>,
    /// Ways of giving what a step does, of which a step uses exactly one
    /// (an inline message, or a template).
    pub alternatives: Vec<Alternative>,
    /// Options not listed are accepted too (a script reads what it wants).
    pub open: bool,
}

/// One way of giving what a step does (see [`Options::alternatives`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alternative {
    /// What it is, for people ("an inline message").
    pub what: &'static str,
    /// The options it needs.
    pub needs: &'static [&'static str],
    /// The options only it takes (its `needs` among them).
    pub only: &'static [&'static str],
}

impl Options {
    /// These options, and no other.
    pub fn of(options: Vec<OptionSpec>) -> Self {
        Self {
            options,
            ..Self::default()
        }
    }

    /// Any option at all.
    pub fn open() -> Self {
        Self {
            open: true,
            ..Self::default()
        }
    }

    /// A step must give at least one of `names`, `why` (e.g. "to key the
    /// contact").
    pub fn one_of(mut self, names: &'static [&'static str], why: &'static str) -> Self {
        self.one_of_required.push((names, why));
        self
    }

    /// A step uses exactly one of `alternatives`: it gives every option
    /// one `needs` and none that only another takes.
    pub fn alternatives(mut self, alternatives: Vec<Alternative>) -> Self {
        self.alternatives = alternatives;
        self
    }

    /// The alternatives as words: "to, subject and text (an inline
    /// message) or template and recipients (a template)".
    pub fn alternatives_text(&self) -> String {
        self.alternatives
            .iter()
            .map(|a| format!("{} ({})", and_list(a.needs), a.what))
            .collect::<Vec<_>>()
            .join(" or ")
    }

    /// The option called `name`.
    pub fn get(&self, name: &str) -> Option<&OptionSpec> {
        self.options.iter().find(|o| o.name == name)
    }

    /// Checks a step's config: no unknown option (usually a typo, so the
    /// known ones are named), every required one, each of the kind it
    /// takes, and literals accepted by their option's check.
    pub fn check(&self, config: &Map<String, Value>) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        if !self.open {
            for key in config.keys() {
                if self.get(key).is_none() {
                    let known: Vec<_> = self.options.iter().map(|o| o.name).collect();
                    problems.push(FieldProblem::new(
                        format!("config.{key}"),
                        format!("unknown option; this handler takes {}", known.join(", ")),
                    ));
                }
            }
        }
        for (names, why) in &self.one_of_required {
            if !names.iter().any(|n| config.contains_key(*n)) {
                problems.push(FieldProblem::new(
                    "config",
                    format!("needs {} (at least one) {why}", names.join(" or ")),
                ));
            }
        }
        if !self.alternatives.is_empty() {
            let used: Vec<&Alternative> = self
                .alternatives
                .iter()
                .filter(|a| a.only.iter().any(|o| config.contains_key(*o)))
                .collect();
            match used.as_slice() {
                [] => problems.push(FieldProblem::new(
                    "config",
                    format!("needs {}", self.alternatives_text()),
                )),
                [one] => {
                    for need in one.needs.iter().filter(|n| !config.contains_key(**n)) {
                        problems.push(FieldProblem::new(
                            format!("config.{need}"),
                            format!("required with {} ({})", and_list(one.needs), one.what),
                        ));
                    }
                }
                several => problems.push(FieldProblem::new(
                    "config",
                    format!(
                        "gives options of {}: use one of them ({})",
                        several
                            .iter()
                            .map(|a| a.what)
                            .collect::<Vec<_>>()
                            .join(" and of "),
                        self.alternatives_text()
                    ),
                )),
            }
        }
        for option in &self.options {
            option.check(config.get(option.name), &mut problems);
        }
        problems
    }

    /// The options as a JSON Schema (draft 2020-12) of a step's `config`;
    /// `x-order` lists them in the order a form shows them.
    pub fn json_schema(&self) -> Value {
        let properties: Map<String, Value> = self
            .options
            .iter()
            .map(|o| (o.name.to_string(), o.json_schema()))
            .collect();
        let required: Vec<&str> = self
            .options
            .iter()
            .filter(|o| o.required)
            .map(|o| o.name)
            .collect();
        let order: Vec<&str> = self.options.iter().map(|o| o.name).collect();
        let mut schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": properties,
            "required": required,
            "x-order": order,
            "additionalProperties": self.open,
            "$defs": {
                "template": {
                    "type": "string",
                    "pattern": "\\{\\{|\\{%|\\{#",
                    "description": "a template (minijinja), rendered against `event`, `steps` and `now` when the step runs"
                }
            }
        });
        if !self.one_of_required.is_empty() {
            let all: Vec<Value> = self
                .one_of_required
                .iter()
                .map(|(names, _)| {
                    let any: Vec<Value> =
                        names.iter().map(|n| json!({ "required": [n] })).collect();
                    json!({ "anyOf": any })
                })
                .collect();
            schema["allOf"] = Value::Array(all);
        }
        if !self.alternatives.is_empty() {
            let ways: Vec<Value> = self
                .alternatives
                .iter()
                .map(|a| {
                    let others: Vec<Value> = self
                        .alternatives
                        .iter()
                        .filter(|o| o != &a)
                        .flat_map(|o| o.only.iter())
                        .filter(|name| !a.only.contains(name))
                        .map(|name| json!({ "required": [name] }))
                        .collect();
                    json!({
                        "description": a.what,
                        "required": a.needs,
                        "not": { "anyOf": others },
                    })
                })
                .collect();
            schema["oneOf"] = Value::Array(ways);
        }
        schema
    }
}

/// The `provider` option of a sending handler over the deployment's
/// `[providers.SECTION.NAME]` (`names`): one of them, required unless there
/// is only one. `what` names the kind in messages ("SMS", "e-mail").
pub(crate) fn provider(
    what: &'static str,
    section: &'static str,
    names: Vec<String>,
) -> OptionSpec {
    let configured = if names.is_empty() {
        format!(
            "none is configured: add [providers.{section}.NAME] to the dispatcher's config file"
        )
    } else {
        format!("configured: {}", names.join(", "))
    };
    let spec = OptionSpec::text(
        "provider",
        format!("The {what} provider to send through, one of the deployment's [providers.{section}.NAME]."),
    )
    .no_template()
    .choices(&names);
    let spec = match names.as_slice() {
        [only] => spec.default(only.clone()),
        _ => spec.required_saying(format!("name the {what} provider to use ({configured})")),
    };
    spec.literal(move |name| {
        if names.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(format!(
                "{what} provider {name:?} is not configured in this deployment ({configured})"
            ))
        }
    })
}

/// The literal check of an option that holds a key of the event contract.
pub(crate) fn check_key<K>(s: &str) -> Result<(), String>
where
    K: TryFrom<String, Error = switchboard_sdk::KeyError>,
{
    K::try_from(s.to_string())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub(crate) fn rendered_key<K>(
    config: &Map<String, Value>,
    key: &str,
) -> Result<Option<K>, StepError>
where
    K: TryFrom<String, Error = switchboard_sdk::KeyError>,
{
    match config.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => K::try_from(s.clone())
            .map(Some)
            .map_err(|e| StepError::permanent(format!("config.{key}: rendered to {e}"))),
        Some(other) => Err(StepError::permanent(format!(
            "config.{key}: must give a string, but gave {other}"
        ))),
    }
}

/// A rendered option that must be a string (numbers are written out).
pub(crate) fn rendered_string(
    config: &Map<String, Value>,
    key: &str,
) -> Result<Option<String>, StepError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
        Some(other) => Err(StepError::permanent(format!(
            "config.{key}: must give a string, but gave {other}"
        ))),
    }
}

/// A rendered option that must be present and a string.
pub(crate) fn required_string(config: &Map<String, Value>, key: &str) -> Result<String, StepError> {
    rendered_string(config, key)?
        .ok_or_else(|| StepError::permanent(format!("config.{key}: required option is missing")))
}

#[cfg(test)]
mod tests;

/// `a`, `a and b`, `a, b and c`.
fn and_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// A `{ name, email, phone }` table: string values (each may be a template),
/// and a name or an address.
fn check_person(person: &Map<String, Value>, field: String, problems: &mut Vec<FieldProblem>) {
    for (key, value) in person {
        if !value.is_string() {
            problems.push(FieldProblem::new(
                format!("{field}.{key}"),
                "must be a string",
            ));
        }
    }
    if !["email", "phone", "name"]
        .iter()
        .any(|k| person.contains_key(*k))
    {
        problems.push(FieldProblem::new(
            field,
            "a person needs a name, an email or a phone",
        ));
    }
}

/// A provider's optional `timeout` in the deployment's config (`"5s"`,
/// `"1m"`): refused at start when it does not parse or is zero.
pub(crate) fn deserialize_timeout<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    use serde::Deserialize;
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    match switchboard_rules::duration::parse(&s) {
        Ok(t) if t.is_zero() => Err(serde::de::Error::custom("timeout: must be more than 0s")),
        Ok(t) => Ok(Some(t)),
        Err(e) => Err(serde::de::Error::custom(format!("timeout: {e}"))),
    }
}
