//! Rhai: the handlers and `when` conditions that account owners write.
//!
//! One [`ScriptRuntime`] holds the shared engine (Rhai's `sync` feature) with
//! the sandbox: operation, call-depth, expression-depth, variable and
//! string/array/map size limits, and a wall-clock deadline enforced from
//! `on_progress`. Scripts see only Rhai's own built-ins plus `emit`, `log`,
//! `contact`, `now`, `parse_json`, `to_json`, `stop` and `retry`: `eval` and
//! `import` are disabled (a syntax error at put time), there is no module
//! resolver, and nothing reads files, the network or processes.
//!
//! Per-call state (the account, the events emitted, the log lines, the
//! deadline) lives in a thread-local set before each call: the engine is
//! shared, so the functions registered on it cannot capture a call's state,
//! and cloning the engine per call would cost more than the call. Calls are
//! synchronous. [`ScriptRuntime::run_sandboxed`] runs them where they are
//! called, on the async worker, when the operation limit keeps them short
//! (at most [`INLINE_MAX_OPERATIONS`]): handing a call of microseconds to
//! another thread and back cost fifty times the call. Above that limit a
//! call runs under `block_in_place`, so that a long one never holds up the
//! other tasks of its worker thread.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rhai::{
    AST, CallFnOptions, Dynamic, Engine, EvalAltResult, ImmutableString, OptimizationLevel,
    ParseError, Position, Scope,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use switchboard_sdk::{
    AccountKey, ConversationKey, ConversationType, EventType, MAX_DATA_DEPTH, VumiApiEvent,
};

use crate::records::Contacts;
use crate::{EmitRequest, LogLine, StepError, StepOutput};

mod handler;
mod inspect;
mod store;

pub use handler::ScriptHandler;
pub use store::{CompiledScript, ScriptStore, ScriptStoreError, is_script_name};

/// The sandbox limits of every script and `when` condition (`[rhai]` in the
/// dispatcher's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RhaiLimits {
    /// Operations one call may perform (loop iterations, calls, expressions).
    pub max_operations: u64,
    /// Function call depth (set explicitly: Rhai's default differs between
    /// debug and release builds).
    pub max_call_levels: usize,
    /// Expression nesting at the top level of a script, checked at compile time.
    pub max_expr_depth: usize,
    /// Expression nesting inside functions, checked at compile time.
    pub max_function_expr_depth: usize,
    /// Longest string, in bytes.
    pub max_string_size: usize,
    /// Largest array, in items.
    pub max_array_size: usize,
    /// Largest object map, in entries.
    pub max_map_size: usize,
    /// Variables in scope at once.
    pub max_variables: usize,
    /// Wall-clock time one call may take.
    #[serde(
        serialize_with = "serialize_duration",
        deserialize_with = "deserialize_duration"
    )]
    pub timeout: Duration,
    /// Events one call may emit.
    pub max_emits: usize,
    /// Log lines one call may write (later ones are dropped and counted).
    pub max_log_lines: usize,
    /// Reading a field a map does not have is an error naming the field,
    /// instead of `()`.
    pub strict_fields: bool,
}

impl Default for RhaiLimits {
    fn default() -> Self {
        Self {
            max_operations: 100_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_function_expr_depth: 32,
            max_string_size: 64 * 1024,
            max_array_size: 10_000,
            max_map_size: 10_000,
            max_variables: 256,
            timeout: Duration::from_millis(100),
            max_emits: 100,
            max_log_lines: 100,
            strict_fields: false,
        }
    }
}

fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&switchboard_rules::duration::format(*d))
}

fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    switchboard_rules::duration::parse(&s).map_err(serde::de::Error::custom)
}

impl RhaiLimits {
    /// Checks values that parse but cannot work.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("max_operations", self.max_operations as usize),
            ("max_call_levels", self.max_call_levels),
            ("max_expr_depth", self.max_expr_depth),
            ("max_function_expr_depth", self.max_function_expr_depth),
            ("max_string_size", self.max_string_size),
            ("max_array_size", self.max_array_size),
            ("max_map_size", self.max_map_size),
            ("max_variables", self.max_variables),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("rhai.{name} must be at least 1"));
            }
        }
        if self.timeout.is_zero() {
            return Err("rhai.timeout must be longer than 0".into());
        }
        Ok(())
    }
}

/// A script or condition that does not compile: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", location(*line, *column))]
pub struct CompileError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        (Some(l), None) => format!("line {l}: "),
        _ => String::new(),
    }
}

/// Which script a call runs, for error messages (`script award v3`).
#[derive(Debug, Clone, Copy)]
pub struct ScriptLabel<'a> {
    /// The script's name.
    pub name: &'a str,
    /// Its version.
    pub version: u64,
}

impl fmt::Display for ScriptLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "script {} v{}", self.name, self.version)
    }
}

/// What one call of a script's `handle` did.
#[derive(Debug)]
pub struct ScriptRun {
    /// The version of the script that ran.
    pub version: u64,
    /// The step's outcome; on success the output carries the emits and logs.
    pub result: Result<StepOutput, StepError>,
    /// The log lines written (also on failure).
    pub logs: Vec<LogLine>,
    /// Operations performed.
    pub operations: u64,
    /// Wall-clock time of the call.
    pub duration: Duration,
}

/// What ended a call early on purpose.
#[derive(Debug, Clone)]
enum Control {
    Stop,
    Retry(Option<Duration>, String),
}

/// The state of the call running on this thread.
struct CallState {
    account: AccountKey,
    conversation_type: ConversationType,
    conversation_key: ConversationKey,
    contacts: Option<Arc<dyn Contacts>>,
    emits: Vec<EmitRequest>,
    logs: Vec<LogLine>,
    dropped_logs: usize,
    control: Option<Control>,
    max_emits: usize,
    max_log_lines: usize,
    label: String,
}

thread_local! {
    static CALL: RefCell<Option<CallState>> = const { RefCell::new(None) };
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static OPERATIONS: Cell<u64> = const { Cell::new(0) };
    static VARIABLE_READS: Cell<u64> = const { Cell::new(0) };
}

/// The token `on_progress` ends a call with when its deadline passes.
const TIMEOUT_TOKEN: &str = "switchboard:timeout";
/// The token `stop()` and `retry()` end a call with (not catchable by `try`).
const CONTROL_TOKEN: &str = "switchboard:control";
/// How many operations pass between two looks at the clock.
const CLOCK_EVERY: u64 = 256;
/// How many variable reads pass between two measurements of the variables
/// in scope (see `Runtime::engine`).
const SIZE_CHECK_EVERY: u64 = 16;
/// How many variable reads pass between two measurements of everything the
/// variables in scope hold, nested containers included.
const DEEP_CHECK_EVERY: u64 = 1024;

/// Undoes the thread-local call state however the call ends.
struct CallGuard;

impl Drop for CallGuard {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(None));
        CALL.with(|c| c.borrow_mut().take());
    }
}

/// The items of the arrays and the entries of the maps `value` is, with
/// (`deep`) those of the ones nested in it, as Rhai counts them against
/// its limits.
fn container_sizes(value: &Dynamic, deep: bool) -> (usize, usize) {
    let nested = |inner: &mut dyn Iterator<Item = &Dynamic>| {
        inner
            .map(|v| container_sizes(v, true))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    if let Some(map) = value.read_lock::<rhai::Map>() {
        let (arrays, maps) = if deep {
            nested(&mut map.values())
        } else {
            (0, 0)
        };
        (arrays, maps + map.len())
    } else if let Some(array) = value.read_lock::<rhai::Array>() {
        let (arrays, maps) = if deep {
            nested(&mut array.iter())
        } else {
            (0, 0)
        };
        (arrays + array.len(), maps)
    } else {
        (0, 0)
    }
}

fn with_call<R>(f: impl FnOnce(&mut CallState) -> R) -> Option<R> {
    CALL.with(|c| c.borrow_mut().as_mut().map(f))
}

fn runtime_error(message: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(message.into()),
        Position::NONE,
    ))
}

/// Calls whose operation limit is at most this run inline on the async
/// worker that makes them. At the roughly 50–150 ns an operation costs, a
/// call that uses all 100,000 holds the thread for about 5–15 ms, and its
/// wall-clock deadline (`rhai.timeout`) still ends it earlier if set so.
pub const INLINE_MAX_OPERATIONS: u64 = 100_000;

/// The Rhai engine with its sandbox, shared by every script and condition.
pub struct ScriptRuntime {
    engine: Engine,
    /// The same sandbox with strict variables: what is stored from now on
    /// (scripts put, conditions applied) must use only names it defines.
    /// Versions stored before run as they did: `engine` is not strict.
    checker: Engine,
    /// The names of the functions the engine has, for [`Self::check_script`]
    /// (made the first time a script is checked).
    functions: std::sync::OnceLock<std::collections::HashSet<String>>,
    limits: RhaiLimits,
    contacts: Option<Arc<dyn Contacts>>,
    /// Compiled `when` conditions, by their text.
    conditions: RwLock<HashMap<String, Arc<AST>>>,
    /// Operations run by every call so far.
    operations: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for ScriptRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptRuntime")
            .field("limits", &self.limits)
            .field("contacts", &self.contacts.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ScriptRuntime {
    fn default() -> Self {
        Self::new(RhaiLimits::default(), None)
    }
}

/// The functions a script may call besides Rhai's built-ins, for error messages.
pub const SCRIPT_FUNCTIONS: &str =
    "emit, log, contact, now, parse_json, to_json, stop, retry and Rhai's built-ins";

impl ScriptRuntime {
    /// An engine with the sandbox `limits`; `contacts` answers `contact()`.
    pub fn new(limits: RhaiLimits, contacts: Option<Arc<dyn Contacts>>) -> Self {
        let engine = Self::engine(&limits);
        let mut checker = Self::engine(&limits);
        // Not optimized, so that code the optimizer would drop (`if false
        // { ... }`) is checked too.
        checker
            .set_strict_variables(true)
            .set_optimization_level(OptimizationLevel::None);
        Self {
            engine,
            checker,
            functions: std::sync::OnceLock::new(),
            limits,
            contacts,
            conditions: RwLock::new(HashMap::new()),
            operations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn engine(limits: &RhaiLimits) -> Engine {
        let mut engine = Engine::new();
        engine
            .set_optimization_level(OptimizationLevel::Simple)
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_function_expr_depth)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_max_variables(limits.max_variables)
            .set_max_modules(0)
            .set_fail_on_invalid_map_property(limits.strict_fields)
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new())
            .disable_symbol("eval")
            .disable_symbol("import")
            .disable_symbol("export");
        // Rhai checks the size limits when a value is written as a literal,
        // passed to or returned by a function, but not when `m[key] = value`
        // grows what a variable holds. Every [`SIZE_CHECK_EVERY`]th read of
        // a variable measures the variables in scope against the limits: the
        // maps and arrays they hold themselves (a container grown in a loop
        // stops within a few entries of its limit), and every
        // [`DEEP_CHECK_EVERY`]th read everything they hold, nested ones
        // included (walking a large event at every check made a script ten
        // times slower). Only containers are measured: strings are checked
        // by Rhai as they grow, and an event's strings may add up to more
        // than one string may hold. (`on_var` is marked deprecated as
        // "volatile": it may change, not go.)
        let (max_maps, max_arrays) = (limits.max_map_size, limits.max_array_size);
        #[allow(deprecated)]
        engine.on_var(move |_, _, context| {
            let reads = VARIABLE_READS.with(|r| {
                r.set(r.get().wrapping_add(1));
                r.get()
            });
            if !reads.is_multiple_of(SIZE_CHECK_EVERY) {
                return Ok(None);
            }
            let deep = reads.is_multiple_of(DEEP_CHECK_EVERY);
            for (_, _, value) in context.scope().iter_raw() {
                let (arrays, maps) = container_sizes(value, deep);
                let what = if maps > max_maps {
                    "Size of object map"
                } else if arrays > max_arrays {
                    "Size of array"
                } else {
                    continue;
                };
                return Err(EvalAltResult::ErrorDataTooLarge(what.into(), Position::NONE).into());
            }
            Ok(None)
        });
        engine.on_progress(|ops| {
            OPERATIONS.with(|o| o.set(ops));
            if ops % CLOCK_EVERY == 0
                && let Some(deadline) = DEADLINE.with(Cell::get)
                && Instant::now() >= deadline
            {
                return Some(Dynamic::from(TIMEOUT_TOKEN));
            }
            None
        });
        // `print` and `debug` write to stdout by default; here they are log lines.
        engine.on_print(|s| push_log("info", s.to_string()));
        engine.on_debug(|s, _, _| push_log("debug", s.to_string()));
        register_functions(&mut engine);
        engine
    }

    /// The sandbox limits.
    pub fn limits(&self) -> &RhaiLimits {
        &self.limits
    }

    /// Runs `call` (a script call or conditions) from async code: inline
    /// when the operation limit keeps it short (see
    /// [`INLINE_MAX_OPERATIONS`]) or when the runtime has a single thread,
    /// otherwise under `block_in_place`, which moves the worker's other
    /// tasks to another thread while the call runs.
    pub fn run_sandboxed<R>(&self, call: impl FnOnce() -> R) -> R {
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if self.limits.max_operations <= INLINE_MAX_OPERATIONS || !multi_threaded {
            call()
        } else {
            tokio::task::block_in_place(call)
        }
    }

    /// Checks a handler script about to be stored, then compiles it: as
    /// [`Self::compile_script`], and every name it uses must be defined where
    /// it is used (a typo, or a top-level `const` read inside `fn handle`,
    /// is refused with its line and column).
    pub fn check_script(&self, source: &str) -> Result<AST, CompileError> {
        let strict = self
            .checker
            .compile(source)
            .map_err(|e| self.parse_error(&e, source))?;
        let functions = self
            .functions
            .get_or_init(|| inspect::engine_functions(&self.engine));
        inspect::check_calls(&strict, functions)?;
        self.compile_script(source)
    }

    /// Compiles a handler script: it must parse and define `fn handle(event, steps, config)`.
    pub fn compile_script(&self, source: &str) -> Result<AST, CompileError> {
        let ast = self
            .engine
            .compile(source)
            .map_err(|e| self.parse_error(&e, source))?;
        let handle = ast
            .iter_functions()
            .find(|f| f.name == "handle" && f.params.len() == 3);
        if handle.is_none() {
            return Err(CompileError {
                line: None,
                column: None,
                message: "the script defines no `fn handle(event, steps, config)`: that is the \
                          function a chain step calls"
                    .into(),
            });
        }
        Ok(ast)
    }

    /// Checks a `when` condition about to be stored: it compiles, and uses
    /// no name but `event` and what it defines.
    pub fn check_condition(&self, expr: &str) -> Result<(), CompileError> {
        self.check_expression(expr, &["event"])
    }

    /// Checks the condition of a paused run's match (`cancel_on`,
    /// `wait_for_event`) about to be stored: it compiles, and uses no name
    /// but `event`, `paused`, `steps` and what it defines.
    pub fn check_match(&self, expr: &str) -> Result<(), CompileError> {
        self.check_expression(expr, &["event", "paused", "steps"])
    }

    fn check_expression(&self, expr: &str, names: &[&str]) -> Result<(), CompileError> {
        // Variables, not constants: the optimizer would fold a constant's
        // placeholder value into the expression.
        let mut scope = Scope::new();
        for name in names {
            scope.push_dynamic(*name, Dynamic::UNIT);
        }
        let strict = self
            .checker
            .compile_expression_with_scope(&scope, expr)
            .map_err(|e| self.parse_error(&e, expr))?;
        let functions = self
            .functions
            .get_or_init(|| inspect::engine_functions(&self.engine));
        inspect::check_calls(&strict, functions)?;
        self.compile_condition(expr).map(|_| ())
    }

    /// Compiles a `when` condition (a Rhai expression over `event`).
    pub fn compile_condition(&self, expr: &str) -> Result<Arc<AST>, CompileError> {
        if let Some(ast) = self
            .conditions
            .read()
            .expect("condition cache lock")
            .get(expr)
        {
            return Ok(ast.clone());
        }
        let ast = Arc::new(
            self.engine
                .compile_expression(expr)
                .map_err(|e| self.parse_error(&e, expr))?,
        );
        let mut cache = self.conditions.write().expect("condition cache lock");
        // Conditions come from stored chains, so the cache only grows with
        // applies; a bound keeps a churning deployment from growing it forever.
        if cache.len() >= 10_000 {
            cache.clear();
        }
        cache.insert(expr.to_string(), ast.clone());
        Ok(ast)
    }

    fn parse_error(&self, e: &ParseError, source: &str) -> CompileError {
        let pos = e.position();
        if let rhai::ParseErrorType::MissingToken(token, _) = e.err_type()
            && token == ";"
            && let (Some(line), Some(column)) = (pos.line(), pos.position())
            && let Some((line, column)) = end_of_line_before(source, line, column)
        {
            // Rhai finds the missing `;` at the next statement's start, on
            // the next line; it belongs at the end of this one.
            return CompileError {
                line: Some(line),
                column: Some(column),
                message: "missing `;` at the end of this line (statements are separated by `;`)"
                    .into(),
            };
        }
        let message = match e.err_type() {
            rhai::ParseErrorType::ExprTooDeep => format!(
                "expressions nested too deeply (limits: {} levels at the top, {} in functions)",
                self.limits.max_expr_depth, self.limits.max_function_expr_depth
            ),
            rhai::ParseErrorType::VariableUndefined(name) => format!(
                "`{name}` is not defined here: `fn handle` sees its parameters (event, steps, \
                 config) and what it declares itself; a top-level `let` or `const` is not \
                 visible inside a function (declare it inside, or pass it in `config`)"
            ),
            rhai::ParseErrorType::Reserved(word) if word == "eval" => {
                "`eval` is not available to scripts".into()
            }
            rhai::ParseErrorType::Reserved(word) if word == "import" || word == "export" => {
                format!("`{word}` is not available: scripts cannot load modules")
            }
            other => {
                let text = other.to_string();
                // Disabled keywords: say why, not just that.
                if text.contains("'eval'") {
                    "`eval` is not available to scripts".into()
                } else if text.contains("'import'") || text.contains("'export'") {
                    "`import` and `export` are not available: scripts cannot load modules".into()
                } else {
                    text
                }
            }
        };
        CompileError {
            line: pos.line(),
            column: pos.position(),
            message,
        }
    }

    /// Converts a serialisable value (the event, step outputs, config) for scripts.
    pub fn to_dynamic<T: Serialize>(value: &T) -> Dynamic {
        rhai::serde::to_dynamic(value).unwrap_or(Dynamic::UNIT)
    }

    /// Evaluates a compiled `when` condition against `event` (see [`Self::to_dynamic`]).
    pub fn eval_condition(&self, ast: &AST, event: &Dynamic) -> Result<bool, String> {
        self.eval_with(ast, &[("event", event.clone())])
    }

    /// Whether an arriving `event` matches a paused run (of event `paused`,
    /// whose steps gave `steps`) by the condition `expr`.
    pub fn event_matches(
        &self,
        expr: &str,
        event: &VumiApiEvent,
        paused: &VumiApiEvent,
        steps: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<bool, String> {
        let ast = self.compile_condition(expr).map_err(|e| e.to_string())?;
        let constants = [
            ("event", Self::to_dynamic(event)),
            ("paused", Self::to_dynamic(paused)),
            ("steps", Self::to_dynamic(steps)),
        ];
        self.run_sandboxed(|| self.eval_with(&ast, &constants))
    }

    fn eval_with(&self, ast: &AST, constants: &[(&'static str, Dynamic)]) -> Result<bool, String> {
        let _guard = self.begin(None);
        let mut scope = Scope::new();
        for (name, value) in constants {
            scope.push_constant_dynamic(*name, value.clone());
        }
        let result = self.engine.eval_ast_with_scope::<Dynamic>(&mut scope, ast);
        self.count_operations(OPERATIONS.with(Cell::get));
        match result {
            Ok(v) => v.as_bool().map_err(|t| {
                format!("the condition must give true or false, but gave a value of type {t}")
            }),
            Err(e) => Err(self.describe(&e, None, Some(ast))),
        }
    }

    /// Calls a script's `handle(event, steps, config)`.
    #[allow(clippy::too_many_arguments)]
    pub fn call_handle(
        &self,
        label: ScriptLabel<'_>,
        ast: &AST,
        account: &AccountKey,
        conversation: (&ConversationType, &ConversationKey),
        event: Dynamic,
        steps: Dynamic,
        config: Dynamic,
    ) -> ScriptRun {
        let started = Instant::now();
        let guard = self.begin(Some(CallState {
            account: account.clone(),
            conversation_type: conversation.0.clone(),
            conversation_key: conversation.1.clone(),
            contacts: self.contacts.clone(),
            emits: Vec::new(),
            logs: Vec::new(),
            dropped_logs: 0,
            control: None,
            max_emits: self.limits.max_emits,
            max_log_lines: self.limits.max_log_lines,
            label: label.to_string(),
        }));
        let mut scope = Scope::new();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let result = self.engine.call_fn_with_options::<Dynamic>(
            options,
            &mut scope,
            ast,
            "handle",
            (event, steps, config),
        );
        let operations = OPERATIONS.with(Cell::get);
        self.count_operations(operations);
        let state = CALL
            .with(|c| c.borrow_mut().take())
            .expect("the call state is set");
        drop(guard);
        let mut logs = state.logs;
        if state.dropped_logs > 0 {
            logs.push(LogLine {
                level: "warn".into(),
                message: format!(
                    "{} more log lines dropped (limit {})",
                    state.dropped_logs, self.limits.max_log_lines
                ),
            });
        }
        let result = match (result, state.control) {
            (Err(e), Some(Control::Stop)) if is_control(&e) => Ok(StepOutput {
                stop: true,
                emit: state.emits,
                logs: logs.clone(),
                ..StepOutput::default()
            }),
            (Err(e), Some(Control::Retry(after, message))) if is_control(&e) => {
                Err(StepError::retryable(format!("{label}: {message}"), after))
            }
            (Err(e), _) => {
                let mut message = self.describe(&e, Some(label), Some(ast));
                // Rhai does not always say where a limit was reached: the
                // loops are where to look.
                if innermost(&e).1.is_none()
                    && matches!(
                        innermost(&e).0,
                        EvalAltResult::ErrorTooManyOperations(_)
                            | EvalAltResult::ErrorTerminated(..)
                    )
                    && !is_control(&e)
                    && let Some(loops) = inspect::loop_lines(ast)
                {
                    message.push_str(&format!("; {loops}"));
                }
                Err(StepError::permanent(message))
            }
            (Ok(value), _) => output_of(label, value).map(|data| StepOutput {
                data,
                stop: false,
                emit: state.emits,
                logs: logs.clone(),
                pause: None,
            }),
        };
        ScriptRun {
            version: label.version,
            result,
            logs,
            operations,
            duration: started.elapsed(),
        }
    }

    /// Rhai operations run by scripts and conditions since the runtime was made.
    pub fn operations_total(&self) -> u64 {
        self.operations.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_operations(&self, n: u64) {
        self.operations
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn begin(&self, state: Option<CallState>) -> CallGuard {
        OPERATIONS.with(|o| o.set(0));
        DEADLINE.with(|d| d.set(Some(Instant::now() + self.limits.timeout)));
        CALL.with(|c| *c.borrow_mut() = state);
        CallGuard
    }

    /// An error in words: `script award v3, line 4: too many operations (limit 100000)`.
    /// `ast`, when given, names the field a missing-field error is about.
    fn describe(
        &self,
        e: &EvalAltResult,
        label: Option<ScriptLabel<'_>>,
        ast: Option<&AST>,
    ) -> String {
        let (inner, pos) = innermost(e);
        let l = &self.limits;
        let reason = match inner {
            EvalAltResult::ErrorTooManyOperations(_) => format!(
                "too many operations (limit {}; raise `[rhai] max_operations` if the script \
                 needs more)",
                l.max_operations
            ),
            EvalAltResult::ErrorStackOverflow(_) => format!(
                "function calls nested too deeply (limit {} levels; `[rhai] max_call_levels`)",
                l.max_call_levels
            ),
            EvalAltResult::ErrorTooManyVariables(_) => format!(
                "too many variables (limit {}; `[rhai] max_variables`)",
                l.max_variables
            ),
            EvalAltResult::ErrorPropertyNotFound(name, at) => {
                match ast.and_then(|ast| inspect::path_at(ast, *at, None)) {
                    Some(field) => format!(
                        "`{}` is missing (`[rhai] strict_fields` is on): test for it first with \
                         `{} in {}`",
                        field.path,
                        field.key.unwrap_or_else(|| format!("{name:?}")),
                        field.parent
                    ),
                    None => format!(
                        "field {name:?} is missing (`[rhai] strict_fields` is on): test for it \
                         first with `\"{name}\" in ...`"
                    ),
                }
            }
            EvalAltResult::ErrorTooManyModules(_) => {
                "`import` is not available: scripts cannot load modules".into()
            }
            EvalAltResult::ErrorDataTooLarge(what, _) => {
                let what = what.to_ascii_lowercase();
                if what.contains("string") {
                    format!(
                        "string too large (limit {} bytes; `[rhai] max_string_size`)",
                        l.max_string_size
                    )
                } else if what.contains("array") {
                    format!(
                        "array too large (limit {} items; `[rhai] max_array_size`)",
                        l.max_array_size
                    )
                } else if what.contains("map") {
                    format!(
                        "object map too large (limit {} entries; `[rhai] max_map_size`)",
                        l.max_map_size
                    )
                } else {
                    format!("{what} too large")
                }
            }
            EvalAltResult::ErrorTerminated(token, _)
                if token.clone().into_string().ok().as_deref() == Some(TIMEOUT_TOKEN) =>
            {
                format!(
                    "ran out of time (limit {}; `[rhai] timeout`)",
                    switchboard_rules::duration::format(l.timeout)
                )
            }
            EvalAltResult::ErrorFunctionNotFound(signature, at) => {
                function_not_found(signature, |i| {
                    ast.and_then(|ast| inspect::path_at(ast, *at, Some(i)))
                })
            }
            EvalAltResult::ErrorModuleNotFound(module, _) => {
                format!("`import {module:?}` is not available: scripts cannot load modules")
            }
            EvalAltResult::ErrorRuntime(value, _) => value.to_string(),
            other => {
                // Rhai's message ends with its own " (line L, position C)"; the line is said once, below.
                let text = other.to_string();
                match text.rfind(" (line ") {
                    Some(i) => text[..i].to_string(),
                    None => text,
                }
            }
        };
        let mut out = String::new();
        if let Some(label) = label {
            out.push_str(&label.to_string());
        }
        if let Some(line) = pos.line() {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&format!("line {line}"));
        }
        if out.is_empty() {
            reason
        } else {
            format!("{out}: {reason}")
        }
    }
}

/// Where the last non-blank line before 1-based `line` ends (line, column
/// just after its last character), when `column` is where `line`'s text
/// starts (what Rhai stopped at is the first thing on its line).
fn end_of_line_before(source: &str, line: usize, column: usize) -> Option<(usize, usize)> {
    let lines: Vec<&str> = source.lines().collect();
    let this = lines.get(line.checked_sub(1)?)?;
    let starts = this.chars().take_while(|c| c.is_whitespace()).count() + 1;
    if this.trim().is_empty() || column != starts {
        return None;
    }
    (1..line).rev().find_map(|n| {
        let text = without_line_comment(lines[n - 1]).trim_end();
        let trimmed = text.trim_start();
        // Blank lines and the lines of a block comment hold no statement.
        let code = !trimmed.is_empty()
            && !trimmed.starts_with("/*")
            && !trimmed.starts_with('*')
            && !trimmed.ends_with("*/");
        code.then(|| (n, text.chars().count() + 1))
    })
}

/// `line` without a trailing `// comment` (a `//` inside a string stays).
fn without_line_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = '\0';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q && previous != '\\' => quote = None,
            Some(_) => {}
            None if c == '"' || c == '`' => quote = Some(c),
            None if c == '/' && previous == '/' => return &line[..i - 1],
            None => {}
        }
        previous = c;
    }
    line
}

/// Each function Switchboard gives scripts (see `register_functions`):
/// the numbers of arguments it takes, and how it is called.
const OUR_FUNCTIONS: &[(&str, &[usize], &str)] = &[
    (
        "emit",
        &[2, 4],
        "emit(event_type, data) or emit(conversation_type, conversation_key, event_type, data)",
    ),
    ("log", &[1, 2], "log(level, message) or log(message)"),
    ("contact", &[1], "contact(msisdn_or_email)"),
    ("now", &[0], "now()"),
    ("parse_json", &[1], "parse_json(text)"),
    ("to_json", &[1], "to_json(value)"),
    ("stop", &[0], "stop()"),
    ("retry", &[1, 2], "retry(delay) or retry(delay, message)"),
];

/// A call no function takes, in words that say what to do: a function of
/// ours called with the wrong number of arguments, or an operand that is
/// `()` (most often a field the map does not have).
///
/// `path_of` gives the field path the script wrote as the `i`th argument,
/// when it is one.
fn function_not_found(
    signature: &str,
    path_of: impl Fn(usize) -> Option<inspect::FieldPath>,
) -> String {
    let (name, args) = match signature.split_once(" (") {
        Some((name, rest)) => (name.trim(), rest.strip_suffix(')').unwrap_or(rest)),
        None => (signature.trim(), ""),
    };
    let arity = if args.trim().is_empty() {
        0
    } else {
        args.split(", ").count()
    };
    if let Some((_, arities, usage)) = OUR_FUNCTIONS.iter().find(|(n, _, _)| *n == name)
        && !arities.contains(&arity)
    {
        return format!("{name} was given {arity} argument(s); call it as {usage}");
    }
    if let Some(i) = args.split(", ").position(|a| a.trim() == "()") {
        if let Some(field) = path_of(i) {
            let test = match &field.key {
                Some(key) => format!(", test for it with `{key} in {}`", field.parent),
                None => String::new(),
            };
            return format!(
                "`{}` is missing or null, and {signature} cannot use the `()` it reads as: give a \
                 default with `{} ?? value`{test}, or turn on `[rhai] strict_fields` to have \
                 missing fields named where they are read",
                field.path, field.path
            );
        }
        return format!(
            "{signature}: an operand is `()`, which is what reading a field the map does not \
             have gives; test for it first with `\"field\" in map`, give a default with \
             `map.field ?? value`, or turn on `[rhai] strict_fields` to have missing fields \
             named where they are read"
        );
    }
    format!(
        "unknown function {signature}: scripts may call {SCRIPT_FUNCTIONS} and the functions \
         they define"
    )
}

/// The error that started it all, and the best position known for it.
/// The `when` conditions of one event: each compiled once per text (and
/// cached by the runtime), evaluated against the event converted once.
#[derive(Debug)]
pub struct EventConditions<'a> {
    runtime: &'a ScriptRuntime,
    event: &'a VumiApiEvent,
    value: &'a crate::EventValue,
}

impl<'a> EventConditions<'a> {
    /// The conditions of `event` (`value` is its conversion), run by `runtime`.
    pub fn new(
        runtime: &'a ScriptRuntime,
        event: &'a VumiApiEvent,
        value: &'a crate::EventValue,
    ) -> Self {
        Self {
            runtime,
            event,
            value,
        }
    }
}

impl switchboard_rules::Conditions for EventConditions<'_> {
    fn holds(&mut self, expr: &str) -> Result<bool, String> {
        let ast = self
            .runtime
            .compile_condition(expr)
            .map_err(|e| e.to_string())?;
        self.runtime
            .eval_condition(&ast, self.value.rhai(self.event))
    }
}

fn innermost(e: &EvalAltResult) -> (&EvalAltResult, Position) {
    let mut current = e;
    let mut pos = e.position();
    loop {
        match current {
            EvalAltResult::ErrorInFunctionCall(_, _, inner, p)
            | EvalAltResult::ErrorInModule(_, inner, p) => {
                if !p.is_none() {
                    pos = *p;
                }
                current = inner;
            }
            other => {
                if !other.position().is_none() {
                    pos = other.position();
                }
                return (other, pos);
            }
        }
    }
}

fn is_control(e: &EvalAltResult) -> bool {
    matches!(innermost(e).0, EvalAltResult::ErrorTerminated(token, _)
        if token.clone().into_string().ok().as_deref() == Some(CONTROL_TOKEN))
}

/// The step output a `handle` returned: a map, or `()` for none.
fn output_of(label: ScriptLabel<'_>, value: Dynamic) -> Result<Map<String, Value>, StepError> {
    if value.is_unit() {
        return Ok(Map::new());
    }
    if !value.is_map() {
        return Err(StepError::permanent(format!(
            "{label}: handle must return an object map (#{{...}}) or nothing, but returned a value \
             of type {}",
            value.type_name()
        )));
    }
    let output = rhai::serde::from_dynamic::<Map<String, Value>>(&value)
        .map_err(|e| StepError::permanent(format!("{label}: the returned map is not JSON: {e}")))?;
    // The journal keeps the output a few levels down in its own records,
    // which must read back within JSON's usual limit of 128 levels.
    if switchboard_sdk::nests_deeper(&output, MAX_DATA_DEPTH) {
        return Err(StepError::permanent(format!(
            "{label}: the returned map nests maps and arrays more than {MAX_DATA_DEPTH} levels \
             deep, as deep as an event's data may"
        )));
    }
    Ok(output)
}

fn push_log(level: &str, message: String) {
    with_call(|c| {
        tracing::event!(target: "switchboard::script", tracing::Level::INFO, account = %c.account,
            script = c.label, level, "{message}");
        if c.logs.len() < c.max_log_lines {
            c.logs.push(LogLine {
                level: level.to_string(),
                message,
            });
        } else {
            c.dropped_logs += 1;
        }
    });
}

fn json_of(value: Dynamic, what: &str) -> Result<Map<String, Value>, Box<EvalAltResult>> {
    if value.is_unit() {
        return Ok(Map::new());
    }
    rhai::serde::from_dynamic::<Map<String, Value>>(&value)
        .map_err(|_| runtime_error(format!("{what} must be an object map (#{{...}})")))
}

fn emit(
    conversation: Option<(&str, &str)>,
    event_type: &str,
    data: Dynamic,
) -> Result<(), Box<EvalAltResult>> {
    let event_type = EventType::new(event_type).map_err(|e| runtime_error(format!("emit: {e}")))?;
    let event_data = json_of(data, "emit: data")?;
    let keys = match conversation {
        Some((ct, ck)) => Some((
            ConversationType::new(ct).map_err(|e| runtime_error(format!("emit: {e}")))?,
            ConversationKey::new(ck).map_err(|e| runtime_error(format!("emit: {e}")))?,
        )),
        None => None,
    };
    with_call(|c| {
        if c.emits.len() >= c.max_emits {
            return Err(runtime_error(format!(
                "emit: too many events emitted (limit {})",
                c.max_emits
            )));
        }
        let (conversation_type, conversation_key) = keys
            .clone()
            .unwrap_or_else(|| (c.conversation_type.clone(), c.conversation_key.clone()));
        c.emits.push(EmitRequest {
            conversation_type,
            conversation_key,
            event_type,
            event_data,
            expires_at: None,
        });
        Ok(())
    })
    .unwrap_or_else(|| Err(runtime_error("emit is only available in fn handle")))
}

fn control(c: Control) -> Result<(), Box<EvalAltResult>> {
    with_call(|s| s.control = Some(c));
    Err(Box::new(EvalAltResult::ErrorTerminated(
        Dynamic::from(CONTROL_TOKEN),
        Position::NONE,
    )))
}

fn retry_delay(delay: &Dynamic) -> Result<Option<Duration>, Box<EvalAltResult>> {
    if delay.is_unit() {
        return Ok(None);
    }
    if let Ok(seconds) = delay.as_int() {
        return Ok(Some(Duration::from_secs(seconds.clamp(0, 86_400) as u64)));
    }
    if let Ok(text) = delay.clone().into_immutable_string() {
        return switchboard_rules::duration::parse(&text)
            .map(Some)
            .map_err(|e| runtime_error(format!("retry: {e}")));
    }
    Err(runtime_error(
        "retry: the delay is a number of seconds or a duration such as \"30s\" or \"500ms\"",
    ))
}

fn register_functions(engine: &mut Engine) {
    engine.register_fn(
        "emit",
        |event_type: ImmutableString, data: Dynamic| -> Result<(), Box<EvalAltResult>> {
            emit(None, &event_type, data)
        },
    );
    engine.register_fn(
        "emit",
        |ct: ImmutableString,
         ck: ImmutableString,
         event_type: ImmutableString,
         data: Dynamic|
         -> Result<(), Box<EvalAltResult>> { emit(Some((&ct, &ck)), &event_type, data) },
    );
    engine.register_fn(
        "log",
        |level: ImmutableString, message: Dynamic| -> Result<(), Box<EvalAltResult>> {
            const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];
            if !LEVELS.contains(&level.as_str()) {
                return Err(runtime_error(format!(
                    "log: {level:?} is not a level; use one of {}",
                    LEVELS.join(", ")
                )));
            }
            push_log(&level, message.to_string());
            Ok(())
        },
    );
    engine.register_fn("log", |message: Dynamic| {
        push_log("info", message.to_string())
    });
    engine.register_fn("contact", |who: ImmutableString| -> Dynamic {
        // Only the calling account's; a contact that cannot be read is
        // answered as none, like an unknown one.
        with_call(|c| {
            let contacts = c.contacts.as_ref()?;
            contacts.find(&c.account, &who).ok().flatten()
        })
        .flatten()
        .map_or(Dynamic::UNIT, |contact| {
            ScriptRuntime::to_dynamic(&contact.without_account())
        })
    });
    engine.register_fn("now", || -> ImmutableString {
        switchboard_sdk::format_rfc3339(switchboard_sdk::now()).into()
    });
    engine.register_fn(
        "parse_json",
        |text: ImmutableString| -> Result<Dynamic, Box<EvalAltResult>> {
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| runtime_error(format!("parse_json: {e}")))?;
            rhai::serde::to_dynamic(value)
        },
    );
    engine.register_fn(
        "to_json",
        |value: Dynamic| -> Result<ImmutableString, Box<EvalAltResult>> {
            let json: Value = rhai::serde::from_dynamic(&value)
                .map_err(|e| runtime_error(format!("to_json: {e}")))?;
            Ok(json.to_string().into())
        },
    );
    engine.register_fn("stop", || control(Control::Stop));
    engine.register_fn("retry", |delay: Dynamic| {
        control(Control::Retry(
            retry_delay(&delay)?,
            "asked to be retried".into(),
        ))
    });
    engine.register_fn("retry", |delay: Dynamic, message: ImmutableString| {
        control(Control::Retry(retry_delay(&delay)?, message.to_string()))
    });
}

#[cfg(test)]
mod tests;
