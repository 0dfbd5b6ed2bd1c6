//! Stored scripts: each account's Rhai handlers, by name, versioned like
//! chains ([`crate::versioned`]): a put compiles the script first, and its
//! compiled AST is what the next event runs.

use std::sync::Arc;

use rhai::AST;

use super::{CompileError, ScriptRuntime};
use crate::versioned::{Compiled, SourceKind, SourceStore, SourceStoreError};

/// Rhai scripts as a kind of versioned source: compiled by a runtime.
#[derive(Debug)]
pub struct RhaiScripts {
    runtime: Arc<ScriptRuntime>,
}

impl SourceKind for RhaiScripts {
    type Compiled = AST;
    type Error = CompileError;
    const NOUN: &'static str = "script";
    const NAME_RULE: &'static str =
        "use a letter or _ followed by letters, digits or _ (at most 64)";

    fn is_name(name: &str) -> bool {
        is_script_name(name)
    }

    fn check(&self, _name: &str, source: &str) -> Result<AST, CompileError> {
        self.runtime.check_script(source)
    }

    fn compile(&self, _name: &str, source: &str) -> Result<AST, CompileError> {
        self.runtime.compile_script(source)
    }
}

/// A script's current version, compiled.
pub type CompiledScript = Compiled<AST>;

/// Every account's scripts.
pub type ScriptStore = SourceStore<RhaiScripts>;

/// Why a script store operation failed.
pub type ScriptStoreError = SourceStoreError<CompileError>;

impl SourceStore<RhaiScripts> {
    /// Scripts kept in `records`, compiled by `runtime`.
    pub fn scripts(
        records: Arc<dyn crate::records::SourceRecords>,
        runtime: Arc<ScriptRuntime>,
    ) -> Self {
        Self::new(records, RhaiScripts { runtime })
    }

    /// The runtime scripts are compiled and run by.
    pub fn runtime(&self) -> &Arc<ScriptRuntime> {
        &self.kind().runtime
    }
}

/// Whether `name` can name a script: step names default to it, and later
/// steps refer to them as `steps.<name>`, so it is an identifier.
pub fn is_script_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
