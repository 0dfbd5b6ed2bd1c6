//! Counters and histograms, kept in one place so that `/metrics` can expose
//! them all in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// What happened to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Taken off the bus (first delivery) and decoded.
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

/// Upper bounds of the step-duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A cumulative histogram with the buckets above.
#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, n) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Values read when `/metrics` is scraped rather than counted as they happen.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Messages on the bus not yet handled (NATS: the consumer's pending and
    /// unacked messages; embedded: the queue's length).
    pub bus_lag: Option<u64>,
    /// Rhai operations run by scripts and conditions since start.
    pub rhai_operations: u64,
}

/// What became of one record a provider posted to an inbound webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum InboundResult {
    /// Matched (a message record, or a verified generic webhook) and emitted.
    Matched,
    /// Well-formed, but for a message this account never sent.
    UnknownMessage,
    /// An event type or status the provider does not document.
    Undocumented,
    /// Not a record that can be read.
    Malformed,
    /// The whole request was refused (bad signature, stale timestamp).
    Rejected,
}

impl InboundResult {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            InboundResult::Matched => "matched",
            InboundResult::UnknownMessage => "unknown_message",
            InboundResult::Undocumented => "undocumented",
            InboundResult::Malformed => "malformed",
            InboundResult::Rejected => "rejected",
        }
    }
}

/// Every counter and histogram of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    events: Mutex<BTreeMap<(Outcome, String, String), u64>>,
    steps: Mutex<BTreeMap<(String, StepResult), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
    outbound: Mutex<BTreeMap<(&'static str, String, String), u64>>,
    inbound: Mutex<BTreeMap<(String, String, InboundResult), u64>>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock().expect("metrics lock").entry(key).or_default() += 1;
}

impl Metrics {
    /// Counts one event of `account` and `event_type` with `outcome`.
    pub fn count(&self, outcome: Outcome, account: &str, event_type: &str) {
        bump(
            &self.events,
            (outcome, account.to_string(), event_type.to_string()),
        );
    }

    /// The count for `outcome` and `account`, over every event type.
    pub fn get(&self, outcome: Outcome, account: &str) -> u64 {
        self.events
            .lock()
            .expect("metrics lock")
            .iter()
            .filter(|((o, a, _), _)| *o == outcome && a == account)
            .map(|(_, n)| n)
            .sum()
    }

    /// Counts one attempt at a step of `handler`, and how long it took.
    pub fn step(&self, handler: &str, result: StepResult, took: Duration) {
        bump(&self.steps, (handler.to_string(), result));
        self.durations
            .lock()
            .expect("metrics lock")
            .entry(handler.to_string())
            .or_default()
            .observe(took.as_secs_f64());
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

    /// Counts one outbound call over `channel` (`http`, `smtp`) to `provider`
    /// that ended with `status` (an HTTP status code, `timeout`, `error`,
    /// `refused`, `accepted`, `rejected`).
    pub fn outbound(&self, channel: &'static str, provider: &str, status: &str) {
        bump(
            &self.outbound,
            (channel, provider.to_string(), status.to_string()),
        );
    }

    /// Counts one record posted to `account`'s `provider` inbound webhook.
    pub fn inbound(&self, provider: &str, account: &str, result: InboundResult) {
        bump(
            &self.inbound,
            (provider.to_string(), account.to_string(), result),
        );
    }

    /// The count of records posted to `account`'s `provider` webhook with `result`.
    pub fn inbound_count(&self, provider: &str, account: &str, result: InboundResult) -> u64 {
        self.inbound
            .lock()
            .expect("metrics lock")
            .get(&(provider.to_string(), account.to_string(), result))
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition of everything, with `gauges`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "switchboard_events_total",
            "counter",
            "Events by outcome, account and event type.",
        );
        for ((outcome, account, event_type), n) in self.events.lock().expect("metrics lock").iter()
        {
            let _ = writeln!(
                out,
                "switchboard_events_total{{outcome=\"{}\",account=\"{}\",event_type=\"{}\"}} {n}",
                outcome.label(),
                escape(account),
                escape(event_type)
            );
        }
        header(
            &mut out,
            "switchboard_step_attempts_total",
            "counter",
            "Step attempts by handler and result.",
        );
        for ((handler, result), n) in self.steps.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "switchboard_step_attempts_total{{handler=\"{}\",result=\"{}\"}} {n}",
                escape(handler),
                result.label(),
            );
        }
        header(
            &mut out,
            "switchboard_step_duration_seconds",
            "histogram",
            "Time spent in one attempt at a step, by handler.",
        );
        for (handler, h) in self.durations.lock().expect("metrics lock").iter() {
            let handler = escape(handler);
            for (bound, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "switchboard_step_duration_seconds_bucket{{handler=\"{handler}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "switchboard_step_duration_seconds_bucket{{handler=\"{handler}\",le=\"+Inf\"}} {}\n\
                 switchboard_step_duration_seconds_sum{{handler=\"{handler}\"}} {}\n\
                 switchboard_step_duration_seconds_count{{handler=\"{handler}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        header(
            &mut out,
            "switchboard_outbound_calls_total",
            "counter",
            "Outbound calls by channel, provider and status.",
        );
        for ((channel, provider, status), n) in self.outbound.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "switchboard_outbound_calls_total{{channel=\"{channel}\",provider=\"{}\",status=\"{}\"}} {n}",
                escape(provider),
                escape(status)
            );
        }
        header(
            &mut out,
            "switchboard_inbound_records_total",
            "counter",
            "Records posted to inbound webhooks by provider, account and result.",
        );
        for ((provider, account, result), n) in self.inbound.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "switchboard_inbound_records_total{{provider=\"{provider}\",account=\"{}\",result=\"{}\"}} {n}",
                escape(account),
                result.label()
            );
        }
        if let Some(lag) = gauges.bus_lag {
            header(
                &mut out,
                "switchboard_bus_lag_messages",
                "gauge",
                "Messages on the bus not yet handled.",
            );
            let _ = writeln!(out, "switchboard_bus_lag_messages {lag}");
        }
        header(
            &mut out,
            "switchboard_rhai_operations_total",
            "counter",
            "Rhai operations run by scripts and conditions.",
        );
        let _ = writeln!(
            out,
            "switchboard_rhai_operations_total {}",
            gauges.rhai_operations
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        m.step("log", StepResult::Ok, Duration::from_millis(3));
        m.step("log", StepResult::Ok, Duration::from_millis(30));
        m.outbound("http", "odd\"name", "200");
        let text = m.render(&Gauges::default());
        assert!(
            text.contains(
                "switchboard_step_duration_seconds_bucket{handler=\"log\",le=\"0.001\"} 0"
            )
        );
        assert!(
            text.contains(
                "switchboard_step_duration_seconds_bucket{handler=\"log\",le=\"0.005\"} 1"
            )
        );
        assert!(
            text.contains(
                "switchboard_step_duration_seconds_bucket{handler=\"log\",le=\"0.05\"} 2"
            )
        );
        assert!(text.contains("switchboard_step_duration_seconds_count{handler=\"log\"} 2"));
        assert!(text.contains("provider=\"odd\\\"name\""), "{text}");
    }
}
