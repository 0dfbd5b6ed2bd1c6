//! Parsing chain files and checking them before they are stored, so that a
//! stored chain never fails for a reason that could have been caught here.

use std::collections::HashSet;
use std::fmt;

use switchboard_sdk::AccountKey;

use crate::model::{ChainFile, ChainSpec, StepSpec};

/// The formats a chain file may be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML (the usual form).
    Toml,
    /// JSON with the same shape.
    Json,
}

impl Format {
    /// The format a file name's extension names; TOML unless it ends in `.json`.
    pub fn from_path(path: &str) -> Format {
        if path.to_ascii_lowercase().ends_with(".json") {
            Format::Json
        } else {
            Format::Toml
        }
    }

    /// The format of a text: JSON if it starts with `{`, TOML otherwise.
    pub fn sniff(text: &str) -> Format {
        if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Toml
        }
    }
}

/// A chain file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ParseError {
    /// Where the text came from (a file name, or "request body").
    pub source_name: String,
    /// What the parser said, with line and column.
    pub message: String,
}

/// The stack TOML is read on. A few kilobytes of TOML can nest tables
/// thousands of levels deep (an inline table may hold 80 levels of them,
/// each key of which may be dotted 80 deep), and building, checking and
/// dropping them recurses once a level: far past the 2 MiB of a worker
/// thread, whose overflow aborts the process. Only touched pages of it are
/// ever mapped in.
const TOML_STACK: usize = 64 << 20;

/// `toml::from_str`, on a thread of its own with a stack deep enough for
/// whatever TOML can nest, so that a file nested absurdly deep is refused
/// (by the limits of what it is read into, such as a step's options)
/// instead of overflowing the caller's stack. Whatever is read into must
/// hold no such depth itself: it is dropped on the caller's thread.
pub fn from_toml<T: serde::de::DeserializeOwned + Send>(text: &str) -> Result<T, toml::de::Error> {
    std::thread::scope(|scope| {
        let parsing = std::thread::Builder::new()
            .name("toml".into())
            .stack_size(TOML_STACK)
            .spawn_scoped(scope, || toml::from_str(text));
        match parsing {
            Ok(parsing) => parsing
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            // No thread to be had: read it here.
            Err(_) => toml::from_str(text),
        }
    })
}

/// Parses a chain file.
pub fn parse_chain_file(
    text: &str,
    format: Format,
    source_name: &str,
) -> Result<ChainFile, ParseError> {
    let result = match format {
        Format::Toml => from_toml(text).map_err(|e| toml_error_message(text, &e)),
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
    };
    result.map_err(|message| ParseError {
        source_name: source_name.to_string(),
        message,
    })
}

/// A TOML error on one line: `line L, column C: reason`. (toml's own message
/// spans several lines with a source excerpt.)
pub fn toml_error_message(text: &str, e: &toml::de::Error) -> String {
    let reason = e.message().to_string();
    match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!("line {line}, column {col}: {reason}")
        }
        None => reason,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A problem with one field of a step's configuration, as a handler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// The field, as a path under the step (`config.to`, `handler`).
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl FieldProblem {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What the chain checker needs to know about handlers: the handlers crate
/// implements it, so this crate runs no handler itself.
pub trait StepCatalog {
    /// Checks one step: the handler exists and its config is complete and well
    /// formed. `earlier_steps` are the names of the steps before it in its chain,
    /// which its templates may refer to as `steps.<name>`.
    fn check_step(
        &self,
        account: &AccountKey,
        step: &StepSpec,
        earlier_steps: &[&str],
    ) -> Result<(), Vec<FieldProblem>>;

    /// Checks that the account secrets a step names are set. Apart from
    /// [`StepCatalog::check_step`] because it depends on the account's
    /// state, not the file: see [`validate_deferring_secrets`].
    fn check_secrets(&self, _account: &AccountKey, _step: &StepSpec) -> Vec<FieldProblem> {
        Vec::new()
    }

    /// Checks a chain's `when` condition (a Rhai expression over `event`):
    /// it compiles under the sandbox. The error says what is wrong and where.
    fn check_condition(&self, account: &AccountKey, expr: &str) -> Result<(), String>;

    /// Checks the condition of a paused run's match (`cancel_on.match`, a
    /// Rhai expression over `event`, `paused` and `steps`), as
    /// [`StepCatalog::check_condition`].
    fn check_match(&self, account: &AccountKey, expr: &str) -> Result<(), String>;

    /// Checks a flow control's key (a template over `event` and `account`,
    /// rendered before the chain's first step): it compiles and refers
    /// only to what is in scope. Each problem's message.
    fn check_key_template(&self, _account: &AccountKey, _template: &str) -> Vec<String> {
        Vec::new()
    }
}

/// One thing wrong with a chain file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainProblem {
    /// The chain (by name, or by position when it has no usable name).
    pub chain: Option<String>,
    /// The step: position (1-based) and name.
    pub step: Option<(usize, String)>,
    /// The field.
    pub field: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(chain) = &self.chain {
            write!(f, "chain {chain:?}")?;
        }
        if let Some((n, name)) = &self.step {
            write!(f, ", step {n} ({name})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with a chain file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// The account the file is for.
    pub account: String,
    /// The problems, in file order.
    pub problems: Vec<ChainProblem>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "account {}: ", self.account)?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A chain file that passed every check. Only [`validate`] makes one, so a
/// value of this type is proof that the chains can be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidChainFile(ChainFile);

impl ValidChainFile {
    /// The checked file.
    pub fn file(&self) -> &ChainFile {
        &self.0
    }

    /// The checked file, by value.
    pub fn into_file(self) -> ChainFile {
        self.0
    }
}

fn is_chain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Step names are used in templates as `steps.<name>`, so they are identifiers.
fn is_step_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && s.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks every rule of a chain file, collecting every problem, and that
/// the secrets its steps name are set.
///
/// `expected_account` is the account the file is being applied to; the file's
/// `account_key` must name it.
pub fn validate(
    file: ChainFile,
    expected_account: &AccountKey,
    catalog: &dyn StepCatalog,
) -> Result<ValidChainFile, ValidationError> {
    check(file, expected_account, catalog, None)
}

/// Like [`validate`], but a step naming a secret that is not set passes:
/// those problems are returned beside the file, for the caller to warn of.
/// For chain files applied as a dispatcher starts, before the secrets can
/// be set through its API.
pub fn validate_deferring_secrets(
    file: ChainFile,
    expected_account: &AccountKey,
    catalog: &dyn StepCatalog,
) -> Result<(ValidChainFile, Vec<ChainProblem>), ValidationError> {
    let mut unset = Vec::new();
    let valid = check(file, expected_account, catalog, Some(&mut unset))?;
    Ok((valid, unset))
}

/// Checks `file`; unset secrets are problems like the others, or set aside
/// in `unset` when given.
fn check(
    file: ChainFile,
    expected_account: &AccountKey,
    catalog: &dyn StepCatalog,
    mut unset: Option<&mut Vec<ChainProblem>>,
) -> Result<ValidChainFile, ValidationError> {
    let mut problems = Vec::new();
    if &file.account_key != expected_account {
        problems.push(ChainProblem {
            chain: None,
            step: None,
            field: Some("account_key".into()),
            message: format!(
                "the file is for account {:?} but is being applied to account {:?}",
                file.account_key.as_str(),
                expected_account.as_str()
            ),
        });
    }
    let mut names = HashSet::new();
    for (i, chain) in file.chains.iter().enumerate() {
        let label = if chain.name.is_empty() {
            format!("#{}", i + 1)
        } else {
            chain.name.clone()
        };
        if !is_chain_name(&chain.name) {
            problems.push(chain_problem(
                &label,
                "name",
                format!(
                    "{:?} is not a chain name: use 1 to 64 of A-Z a-z 0-9 _ -",
                    chain.name
                ),
            ));
        } else if !names.insert(chain.name.as_str()) {
            problems.push(chain_problem(
                &label,
                "name",
                "another chain of this account has the same name; chain names are unique".into(),
            ));
        }
        check_chain(&file.account_key, &label, chain, catalog, &mut problems);
        for (i, step) in chain.steps.iter().enumerate() {
            for p in catalog.check_secrets(&file.account_key, step) {
                let problem = ChainProblem {
                    chain: Some(label.clone()),
                    step: Some((i + 1, step.step_name().to_string())),
                    field: Some(p.field),
                    message: p.message,
                };
                match unset.as_deref_mut() {
                    Some(unset) => unset.push(problem),
                    None => problems.push(problem),
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(ValidChainFile(file))
    } else {
        Err(ValidationError {
            account: expected_account.to_string(),
            problems,
        })
    }
}

fn chain_problem(chain: &str, field: &str, message: String) -> ChainProblem {
    ChainProblem {
        chain: Some(chain.to_string()),
        step: None,
        field: Some(field.to_string()),
        message,
    }
}

/// Checks a chain's flow controls: keys that render, limits of one or
/// more, periods longer than zero, and at most one control that holds runs
/// back (debounce, throttle, concurrency) beside a `rate_limit`.
fn check_flow(
    account: &AccountKey,
    label: &str,
    chain: &ChainSpec,
    catalog: &dyn StepCatalog,
    problems: &mut Vec<ChainProblem>,
) {
    use crate::model::Control;
    for control in chain.controls() {
        let name = control.as_str();
        let key = chain.flow_key(control).unwrap_or_default();
        if key.trim().is_empty() {
            problems.push(chain_problem(
                label,
                &format!("{name}.key"),
                "an empty key; write a template over `event` (e.g. \"{{ event.event_data.msisdn }}\"), \
                 or a fixed text for one key for all"
                    .into(),
            ));
        }
        for message in catalog.check_key_template(account, key) {
            problems.push(chain_problem(label, &format!("{name}.key"), message));
        }
        let (limit, period) = match control {
            Control::RateLimit => chain.rate_limit().map(|l| (Some(l.limit), Some(l.period))),
            Control::Throttle => chain.throttle().map(|l| (Some(l.limit), Some(l.period))),
            Control::Debounce => chain.debounce().map(|d| (None, Some(d.period))),
            Control::Concurrency => chain.concurrency_rule().map(|c| (Some(c.limit), None)),
        }
        .unwrap_or((None, None));
        if limit == Some(0) {
            problems.push(chain_problem(
                label,
                &format!("{name}.limit"),
                "must be 1 or more".into(),
            ));
        }
        if period.is_some_and(|p| p.is_zero()) {
            problems.push(chain_problem(
                label,
                &format!("{name}.period"),
                "must be longer than zero".into(),
            ));
        }
    }
    let mut holding: Vec<&str> = [
        (chain.debounce().is_some(), "debounce"),
        (chain.throttle().is_some(), "throttle"),
        (chain.concurrency().is_some(), "concurrency"),
        (
            chain.order == crate::model::Order::Conversation,
            "order = \"conversation\"",
        ),
    ]
    .into_iter()
    .filter_map(|(has, name)| has.then_some(name))
    .collect();
    holding.dedup();
    if chain.concurrency_rule().is_some() && chain.steps.iter().any(|s| s.handler == "digest") {
        let field = if chain.concurrency().is_some() {
            "concurrency"
        } else {
            "order"
        };
        problems.push(chain_problem(
            label,
            field,
            "a digest step keeps its window's first run going until the window closes, so the \
             events that would join it would wait behind it for good: a chain with a digest \
             takes no concurrency or order = \"conversation\""
                .into(),
        ));
    }
    if holding.len() > 1 {
        problems.push(chain_problem(
            label,
            holding[1].split(' ').next().unwrap_or("order"),
            format!(
                "a chain takes one of debounce, throttle, concurrency and order = \
                 \"conversation\" (which is a concurrency of one per conversation; this one \
                 has {}); a rate_limit may go with any of them",
                holding.join(" and ")
            ),
        ));
    }
}

fn check_chain(
    account: &AccountKey,
    label: &str,
    chain: &ChainSpec,
    catalog: &dyn StepCatalog,
    problems: &mut Vec<ChainProblem>,
) {
    if let Some(expr) = chain.when() {
        if expr.trim().is_empty() {
            problems.push(chain_problem(
                label,
                "when",
                "an empty condition; write a Rhai expression over `event` (e.g. \
                 'event.event_data.score >= 3') or remove the field"
                    .into(),
            ));
        } else if let Err(message) = catalog.check_condition(account, expr) {
            problems.push(chain_problem(label, "when", message));
        }
    }
    if let Some(cancel) = chain.cancel_on() {
        match cancel.condition.as_deref().map(str::trim) {
            Some("") => problems.push(chain_problem(
                label,
                "cancel_on.match",
                "an empty condition; write a Rhai expression over `event`, `paused` and \
                 `steps`, or leave it out for the same conversation"
                    .into(),
            )),
            Some(expr) => {
                if let Err(message) = catalog.check_match(account, expr) {
                    problems.push(chain_problem(label, "cancel_on.match", message));
                }
            }
            None => {}
        }
    }
    check_flow(account, label, chain, catalog, problems);
    if chain.steps.is_empty() {
        problems.push(chain_problem(
            label,
            "steps",
            "a chain needs at least one step ([[chains.steps]] with a handler)".into(),
        ));
    }
    let mut earlier: Vec<&str> = Vec::new();
    for (i, step) in chain.steps.iter().enumerate() {
        let name = step.step_name();
        let step_ref = Some((i + 1, name.to_string()));
        let mut push = |field: &str, message: String| {
            problems.push(ChainProblem {
                chain: Some(label.to_string()),
                step: step_ref.clone(),
                field: Some(field.to_string()),
                message,
            })
        };
        if !is_step_name(name) {
            push(
                "name",
                format!(
                    "{name:?} is not a step name: later steps refer to it as steps.<name>, so use \
                     a letter or _ followed by letters, digits or _ (at most 64)"
                ),
            );
        } else if earlier.contains(&name) {
            push(
                "name",
                format!(
                    "another step of this chain is already called {name:?}; give one of them a \
                     distinct `name`"
                ),
            );
        }
        if let Some(retry) = &step.retry {
            if retry.max_attempts == 0 {
                push(
                    "retry.max_attempts",
                    "must be at least 1 (the first attempt counts)".into(),
                );
            }
            if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
                push("retry.multiplier", "must be a number of at least 1".into());
            }
            if retry.initial > retry.max {
                push("retry.initial", "must not be longer than retry.max".into());
            }
        }
        if let Err(found) = catalog.check_step(account, step, &earlier) {
            for p in found {
                push(&p.field, p.message);
            }
        }
        earlier.push(name);
    }
}
