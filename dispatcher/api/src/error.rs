//! Errors: every failed request is answered `{"error": {"code", "message",
//! "details"?}}` with the HTTP status that fits.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of every error answer: `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorBody,
}

/// What went wrong with a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code (`not_found`, `invalid_chains`,
    /// `rate_limited`, ...).
    pub code: String,
    /// What was wrong, where, and what to do, for people.
    pub message: String,
    /// Structured details, for the codes that have them: the
    /// [`ChainProblem`]s of `invalid_chains`, the [`ScriptCompileError`] of
    /// `invalid_script`. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl ErrorResponse {
    /// An error without details.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorBody {
                code: code.into(),
                message: message.into(),
                details: None,
            },
        }
    }
}

/// One thing wrong with a chain file: an item of the details of
/// `invalid_chains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainProblem {
    /// The chain (by name, or by position when it has no usable name); null
    /// for a problem of the whole file.
    pub chain: Option<String>,
    /// The step, when the problem is in one; null otherwise.
    pub step: Option<StepRef>,
    /// The field (`config.to`, `handler`); null when not about one field.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// A step of a chain, as problems name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRef {
    /// Its position in the chain, from 1.
    pub position: usize,
    /// Its name.
    pub name: String,
}

/// Where a script does not compile: the details of `invalid_script`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptCompileError {
    /// 1-based line, when known (else null).
    pub line: Option<usize>,
    /// 1-based column, when known (else null).
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}
