//! Which chains an event runs, `when` conditions included.
//!
//! [`AccountChains`] finds the chains whose match holds; this module adds
//! their conditions and the `default` chain's rule. Conditions are Rhai
//! expressions, which this crate cannot run: they come in through the
//! [`Conditions`] trait, which the handlers crate implements with its
//! sandboxed engine (and tests with plain closures). The executor and the
//! dry runs both select through [`select_chains`], so a dry run shows
//! exactly what the dispatcher would do.

use switchboard_sdk::VumiApiEvent;

use crate::matching::AccountChains;
use crate::model::ChainSpec;

/// Evaluates `when` conditions against one event.
pub trait Conditions {
    /// Whether `expr` holds; `Err` with the reason when it cannot be
    /// evaluated (a runtime error, a sandbox limit).
    fn holds(&mut self, expr: &str) -> Result<bool, String>;
}

impl<F: FnMut(&str) -> Result<bool, String>> Conditions for F {
    fn holds(&mut self, expr: &str) -> Result<bool, String> {
        self(expr)
    }
}

/// A chain an event runs, or whose `when` condition could not be evaluated.
#[derive(Debug, Clone, PartialEq)]
pub enum Selected<'a> {
    /// Its match and condition hold: run it.
    Run(&'a ChainSpec),
    /// Its condition failed to evaluate (the error): a failure of that chain.
    ConditionFailed(&'a ChainSpec, String),
}

impl<'a> Selected<'a> {
    /// The chain, whichever way it was selected.
    pub fn chain(&self) -> &'a ChainSpec {
        match self {
            Selected::Run(chain) | Selected::ConditionFailed(chain, _) => chain,
        }
    }
}

/// The chains `event` runs, in file order: every candidate whose `when`
/// holds (or that has none), and the ones whose `when` failed to evaluate,
/// as failures; when no candidate runs or fails, the `default` chain if its
/// match and condition hold. A condition is evaluated only when its chain's
/// match holds, and the default's only when it is needed.
pub fn select_chains<'a>(
    chains: &'a AccountChains,
    event: &VumiApiEvent,
    conditions: &mut dyn Conditions,
) -> Vec<Selected<'a>> {
    let mut selected: Vec<Selected<'a>> = chains
        .candidates(event)
        .into_iter()
        .filter_map(|chain| judge(chain, conditions))
        .collect();
    if selected.is_empty()
        && let Some(chain) = chains.default_for(event)
    {
        selected.extend(judge(chain, conditions));
    }
    selected
}

/// A chain whose match holds, judged by its condition: `None` when the
/// condition does not hold.
fn judge<'a>(chain: &'a ChainSpec, conditions: &mut dyn Conditions) -> Option<Selected<'a>> {
    let Some(expr) = chain.when() else {
        return Some(Selected::Run(chain));
    };
    match conditions.holds(expr) {
        Ok(true) => Some(Selected::Run(chain)),
        Ok(false) => None,
        Err(error) => Some(Selected::ConditionFailed(chain, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChainFile;
    use crate::validate::{Format, parse_chain_file};
    use switchboard_sdk::{AccountKey, ConversationKey, ConversationType, EventType};

    /// Three survey chains with conditions a test evaluates by name (`a`,
    /// `b`, `fails`), one without, and a default chain with a condition.
    const FILE: &str = r#"
account_key = "acme"

[[chains]]
name = "first"
conversation_type = "survey"
event_type = "poll_complete"
when = "a"
steps = [{ handler = "log" }]

[[chains]]
name = "second"
conversation_type = "survey"
event_type = "*"
when = "b"
steps = [{ handler = "log" }]

[[chains]]
name = "broken"
conversation_type = "survey"
event_type = "poll_complete"
when = "fails"
steps = [{ handler = "log" }]

[[chains]]
name = "plain"
conversation_type = "ussd"
event_type = "*"
steps = [{ handler = "log" }]

[[chains]]
name = "default"
when = "d"
steps = [{ handler = "log" }]
"#;

    fn chains() -> AccountChains {
        let file: ChainFile = parse_chain_file(FILE, Format::Toml, "test.toml").expect("parses");
        AccountChains::new(1, file)
    }

    fn event(conversation_type: &str, event_type: &str) -> VumiApiEvent {
        VumiApiEvent::new(
            AccountKey::new("acme").expect("a key"),
            ConversationKey::new("c1").expect("a key"),
            ConversationType::new(conversation_type).expect("a type"),
            EventType::new(event_type).expect("a type"),
            Default::default(),
        )
    }

    /// Selects for an event of (`conversation_type`, `event_type`) with the
    /// conditions named in `hold` holding (and `fails` failing), and
    /// compares the chains selected (`!name` for a failed condition) and the
    /// conditions evaluated, in order.
    fn check(event_type: (&str, &str), hold: &[&str], expected: &[&str], evaluated: &[&str]) {
        let chains = chains();
        let mut asked = Vec::new();
        let mut conditions = |expr: &str| {
            asked.push(expr.to_string());
            if expr == "fails" {
                Err("boom".to_string())
            } else {
                Ok(hold.contains(&expr))
            }
        };
        let selected = select_chains(&chains, &event(event_type.0, event_type.1), &mut conditions);
        let names: Vec<String> = selected
            .iter()
            .map(|s| match s {
                Selected::Run(c) => c.name.clone(),
                Selected::ConditionFailed(c, e) => {
                    assert_eq!(e, "boom");
                    format!("!{}", c.name)
                }
            })
            .collect();
        assert_eq!(names, expected, "selected for {event_type:?} with {hold:?}");
        assert_eq!(asked, evaluated, "conditions evaluated for {event_type:?}");
    }

    #[test]
    fn selection_follows_matches_conditions_and_the_default_rule() {
        let survey = ("survey", "poll_complete");
        // Every matching chain whose condition holds, in file order; a
        // condition that fails to evaluate is that chain's failure.
        check(
            survey,
            &["a", "b"],
            &["first", "second", "!broken"],
            &["a", "b", "fails"],
        );
        check(survey, &["b"], &["second", "!broken"], &["a", "b", "fails"]);
        // A failed condition counts as a chain that ran: no default.
        check(survey, &["d"], &["!broken"], &["a", "b", "fails"]);
        // Another event type of the survey: only `second` matches; when its
        // condition does not hold, the default's is evaluated.
        check(("survey", "started"), &["b"], &["second"], &["b"]);
        check(("survey", "started"), &["d"], &["default"], &["b", "d"]);
        check(("survey", "started"), &[], &[], &["b", "d"]);
        // A chain without a condition needs no evaluation.
        check(("ussd", "started"), &[], &["plain"], &[]);
        // Nothing matches: the default, by its condition.
        check(("sms", "inbound"), &["d"], &["default"], &["d"]);
        check(("sms", "inbound"), &[], &[], &["d"]);
    }
}
