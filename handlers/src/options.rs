//! Checking and reading handler options.

use serde_json::{Map, Value};
use switchboard_rules::FieldProblem;

use crate::StepError;
use crate::template::is_template;

/// Flags options a handler does not know (usually typos), naming the known ones.
pub(crate) fn only_known(
    config: &Map<String, Value>,
    known: &[&str],
    problems: &mut Vec<FieldProblem>,
) {
    for key in config.keys() {
        if !known.contains(&key.as_str()) {
            problems.push(FieldProblem::new(
                format!("config.{key}"),
                format!("unknown option; this handler takes {}", known.join(", ")),
            ));
        }
    }
}

/// Checks an option that must be a string (a template or a literal that
/// `literal_ok` accepts).
pub(crate) fn string_option(
    config: &Map<String, Value>,
    key: &str,
    required: bool,
    literal_ok: impl Fn(&str) -> Result<(), String>,
    problems: &mut Vec<FieldProblem>,
) {
    match config.get(key) {
        None if required => problems.push(FieldProblem::new(
            format!("config.{key}"),
            "required option is missing",
        )),
        None => {}
        Some(Value::String(s)) if is_template(s) => {}
        Some(Value::String(s)) => {
            if let Err(message) = literal_ok(s) {
                problems.push(FieldProblem::new(format!("config.{key}"), message));
            }
        }
        Some(other) => problems.push(FieldProblem::new(
            format!("config.{key}"),
            format!("must be a string, not {other}"),
        )),
    }
}

pub(crate) fn any_str(_: &str) -> Result<(), String> {
    Ok(())
}

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

/// Checks an option that must be a table (or a template that gives one).
pub(crate) fn object_option(
    config: &Map<String, Value>,
    key: &str,
    problems: &mut Vec<FieldProblem>,
) {
    match config.get(key) {
        None | Some(Value::Object(_)) => {}
        Some(Value::String(s)) if is_template(s) => {}
        Some(_) => problems.push(FieldProblem::new(
            format!("config.{key}"),
            "must be a table of name = value, or a template that gives one",
        )),
    }
}
