//! `script:NAME` steps: run the account's stored script `NAME`.

use std::sync::Arc;

use rhai::Dynamic;

use super::{ScriptLabel, ScriptRun, ScriptRuntime, ScriptStore};
use crate::{Handler, Options, StepError, StepInput, StepOutput};

/// Runs stored scripts: one handler serves every `script:NAME`.
#[derive(Debug, Clone)]
pub struct ScriptHandler {
    scripts: Arc<ScriptStore>,
}

impl ScriptHandler {
    /// The handler of the scripts in `scripts`.
    pub fn new(scripts: Arc<ScriptStore>) -> Self {
        Self { scripts }
    }

    /// Runs the step's script and reports everything it did (its emits are
    /// returned, never published here). Used by steps and by dry runs.
    pub async fn run(&self, input: &StepInput<'_>) -> Result<ScriptRun, StepError> {
        let name = input
            .step
            .handler
            .strip_prefix("script:")
            .unwrap_or(&input.step.handler);
        let account = &input.event.account_key;
        let compiled = self
            .scripts
            .compiled(account, name)
            .map_err(|e| StepError::permanent(e.to_string()))?
            .ok_or_else(|| {
                StepError::permanent(format!(
                    "account {account} has no script named {name:?} any more; put it again \
                     (`switchboard scripts put`) or change the chain"
                ))
            })?;
        let config = input.render_config()?;
        let event = input.event_value.rhai(input.event).flatten_clone();
        let steps = ScriptRuntime::to_dynamic(input.steps);
        let config: Dynamic = ScriptRuntime::to_dynamic(&config);
        let runtime = self.scripts.runtime();
        let label = ScriptLabel {
            name: &compiled.name,
            version: compiled.version,
        };
        let conversation = (
            &input.event.conversation_type,
            &input.event.conversation_key,
        );
        Ok(runtime.run_sandboxed(|| {
            runtime.call_handle(
                label,
                &compiled.compiled,
                account,
                conversation,
                event,
                steps,
                config,
            )
        }))
    }
}

#[async_trait::async_trait]
impl Handler for ScriptHandler {
    fn name(&self) -> &'static str {
        "script"
    }

    fn description(&self) -> &'static str {
        "Runs the account's Rhai script NAME (`script:NAME`): its `handle(event, steps, config)` \
         returns the step's output, and it may emit events, log and read contacts."
    }

    fn output(&self) -> &'static str {
        "the map the script's `handle` returns"
    }

    /// Any config: the script reads what it wants from `config`.
    fn options(&self) -> Options {
        Options::open()
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        self.run(input).await?.result
    }

    /// A script runs as it would: its `emit`s are returned, not published,
    /// and `contact()` only reads.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        self.handle(input).await
    }

    /// A script computes: it reads contacts but writes nothing and calls no one.
    fn effects(&self) -> crate::Effects {
        crate::Effects::None
    }
}
