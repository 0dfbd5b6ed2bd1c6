//! Counters, kept in one place so that `/metrics` can expose them all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// What happened to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Taken off the bus and decoded.
    Received,
    /// Every matching chain ran.
    Handled,
    /// No chain matched and the account has no default chain.
    Unrouted,
    /// Dropped because `expires_at` had passed.
    Expired,
    /// Sent to dead letters (poison, over-depth, failed step).
    DeadLettered,
    /// A step was tried again.
    Retried,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Handled => "handled",
            Outcome::Unrouted => "unrouted",
            Outcome::Expired => "expired",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Retried => "retried",
        }
    }
}

/// What one attempt at a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StepResult {
    /// It succeeded (or was skipped by its idempotency key).
    Ok,
    /// It failed and will be tried again.
    Retried,
    /// It failed for good.
    Failed,
}

impl StepResult {
    fn label(self) -> &'static str {
        match self {
            StepResult::Ok => "ok",
            StepResult::Retried => "retried",
            StepResult::Failed => "failed",
        }
    }
}

/// Event counters by outcome and account; step counters by handler and result.
#[derive(Debug, Default)]
pub struct Metrics {
    events: Mutex<BTreeMap<(Outcome, String), u64>>,
    steps: Mutex<BTreeMap<(String, StepResult), u64>>,
}

impl Metrics {
    /// Counts one event of `account` with `outcome`.
    pub fn count(&self, outcome: Outcome, account: &str) {
        let mut events = self.events.lock().expect("metrics lock");
        match events.get_mut(&(outcome, account.to_string())) {
            Some(n) => *n += 1,
            None => {
                events.insert((outcome, account.to_string()), 1);
            }
        }
    }

    /// The count for `outcome` and `account`.
    pub fn get(&self, outcome: Outcome, account: &str) -> u64 {
        self.events
            .lock()
            .expect("metrics lock")
            .get(&(outcome, account.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Counts one attempt at a step of `handler`.
    pub fn step(&self, handler: &str, result: StepResult) {
        let mut steps = self.steps.lock().expect("metrics lock");
        match steps.get_mut(&(handler.to_string(), result)) {
            Some(n) => *n += 1,
            None => {
                steps.insert((handler.to_string(), result), 1);
            }
        }
    }

    /// The count of step attempts of `handler` with `result`.
    pub fn step_count(&self, handler: &str, result: StepResult) -> u64 {
        self.steps
            .lock()
            .expect("metrics lock")
            .get(&(handler.to_string(), result))
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP switchboard_events_total Events by outcome and account.\n\
             # TYPE switchboard_events_total counter\n",
        );
        for ((outcome, account), n) in self.events.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "switchboard_events_total{{outcome=\"{}\",account=\"{}\"}} {n}",
                outcome.label(),
                account
            );
        }
        out.push_str(
            "# HELP switchboard_step_attempts_total Step attempts by handler and result.\n\
             # TYPE switchboard_step_attempts_total counter\n",
        );
        for ((handler, result), n) in self.steps.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "switchboard_step_attempts_total{{handler=\"{handler}\",result=\"{}\"}} {n}",
                result.label(),
            );
        }
        out
    }
}
