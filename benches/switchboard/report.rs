//! The figures of a run, and the summary that compares them with the targets
//! and, in a run with a baseline, with the baseline build's figures.

use std::time::Duration;

use crate::Options;
use crate::compare::{PerBuild, times};
use crate::drain::Drained;

/// One figure of the summary.
#[derive(Debug)]
struct Row {
    scenario: &'static str,
    figure: String,
    value: Value,
    /// The target and whether it was met (none if it could not be
    /// measured); none for figures without a target.
    target: Option<(String, Option<bool>)>,
}

/// A figure's value as printed: the current build's and, in a run with a
/// baseline, the baseline's and their ratio.
#[derive(Debug, Clone)]
pub struct Value {
    current: String,
    baseline: Option<String>,
    ratio: Option<String>,
}

impl From<String> for Value {
    fn from(current: String) -> Self {
        Self {
            current,
            baseline: None,
            ratio: None,
        }
    }
}

impl Value {
    /// A number measured with each build, shown by `show`, with the ratio
    /// current / baseline.
    pub fn of(values: &PerBuild<f64>, show: impl Fn(f64) -> String) -> Self {
        Self {
            current: show(values.current),
            baseline: values.baseline.map(&show),
            ratio: values.ratio().map(times),
        }
    }

    /// A text for each build, with no ratio.
    pub fn text(values: &PerBuild<String>) -> Self {
        Self {
            current: values.current.clone(),
            baseline: values.baseline.clone(),
            ratio: None,
        }
    }

    /// A drain's rate and its dispatcher CPU per event, side by side.
    pub fn drain(drains: &PerBuild<Drained>) -> Self {
        Self::join([
            Self::of(&drains.map(Drained::rate), rate),
            Self::of(&drains.map(Drained::cpu_per_event_us), per_event),
        ])
    }

    /// Values side by side: `9.1k/s, 110 µs/event`.
    pub fn join(parts: impl IntoIterator<Item = Value>) -> Self {
        let parts: Vec<Value> = parts.into_iter().collect();
        let joined = |f: fn(&Value) -> Option<&String>| {
            parts
                .iter()
                .map(f)
                .collect::<Option<Vec<_>>>()
                .map(|v| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
        };
        Self {
            current: joined(|v| Some(&v.current)).unwrap_or_default(),
            baseline: joined(|v| v.baseline.as_ref()),
            ratio: joined(|v| v.ratio.as_ref()),
        }
    }
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Report {
    rows: Vec<Row>,
    /// The NATS drains, for their longest pauses in consumption.
    pauses: Vec<(String, PerBuild<Drained>)>,
    quick: bool,
    concurrency: usize,
    builds: Vec<crate::compare::Build>,
}

impl Report {
    pub fn new(options: &Options) -> Self {
        Self {
            rows: Vec::new(),
            pauses: Vec::new(),
            quick: options.quick,
            concurrency: options.concurrency,
            builds: options.builds.clone(),
        }
    }

    /// Where and on what the run was made.
    pub fn print_header(&self) {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "?".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or("?".into(), |kib| {
                format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0)
            });
        let command = |program: &str, args: &[&str]| {
            std::process::Command::new(program)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let commit = command("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = command("git", &["status", "--porcelain", "--untracked-files=no"]);
        let nats = crate::common::nats_server_program()
            .map(|p| command(&p.to_string_lossy(), &["--version"]))
            .unwrap_or_else(|_| "not found".into());
        println!("# switchboard benchmark");
        println!();
        println!(
            "- commit {commit}{}, release build{}",
            if dirty.is_empty() || dirty == "?" {
                ""
            } else {
                " (with uncommitted changes)"
            },
            if self.quick {
                ", --quick (a tenth of the events: noisier)"
            } else {
                ""
            }
        );
        println!(
            "- {} CPUs ({cpu}), {memory}, Linux {}; load average at start {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            read("/proc/sys/kernel/osrelease"),
            read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let threads = std::env::var(crate::common::WORKER_THREADS).map_or_else(
            |_| "one per CPU".into(),
            |n| format!("{n} ({})", crate::common::WORKER_THREADS),
        );
        let event_threads = std::env::var(crate::common::EVENT_THREADS).map_or_else(
            |_| "as the dispatchers' default (1 on a machine of up to 2 CPUs, else 0)".into(),
            |n| format!("{n} ({})", crate::common::EVENT_THREADS),
        );
        println!(
            "- {nats}; dispatchers run with --concurrency {}, worker threads {threads} and event threads {event_threads}; CPU times in ticks of 1/{} s",
            self.concurrency,
            crate::common::clock_ticks_per_second().map_or_else(|_| "?".into(), |t| t.to_string())
        );
        for build in &self.builds {
            println!("- {} build: {}", build.name, build.binary.display());
        }
    }

    /// A figure without a target.
    pub fn figure(
        &mut self,
        scenario: &'static str,
        figure: impl Into<String>,
        value: impl Into<Value>,
    ) {
        self.rows.push(Row {
            scenario,
            figure: figure.into(),
            value: value.into(),
            target: None,
        });
    }

    /// A figure checked against its target (the current build's value):
    /// `met` is none where the run cannot tell (the figure is too coarse to
    /// judge, or needs what the run did not have).
    pub fn check(
        &mut self,
        scenario: &'static str,
        figure: impl Into<String>,
        value: impl Into<Value>,
        target: &str,
        met: impl Into<Option<bool>>,
    ) {
        self.rows.push(Row {
            scenario,
            figure: figure.into(),
            value: value.into(),
            target: Some((target.to_string(), met.into())),
        });
    }

    /// A dispatcher's CPU per event, in µs, against its ceiling.
    pub fn check_cpu(
        &mut self,
        scenario: &'static str,
        figure: impl Into<String>,
        us: &PerBuild<f64>,
        ceiling_us: f64,
    ) {
        self.check(
            scenario,
            figure,
            Value::of(us, micros_of),
            &format!("≤ {ceiling_us} µs"),
            us.current <= ceiling_us,
        );
    }

    /// A drain's rate and CPU per event as a figure; on NATS its longest
    /// pause in consumption also counts toward the run's.
    pub fn drain(
        &mut self,
        scenario: &'static str,
        figure: impl Into<String>,
        drains: &PerBuild<Drained>,
    ) {
        let figure = figure.into();
        self.note_pauses(scenario, &figure, drains);
        self.figure(scenario, figure, Value::drain(drains));
    }

    /// Counts the longest pauses in consumption of drains on NATS toward
    /// the run's.
    pub fn note_pauses(&mut self, scenario: &str, figure: &str, drains: &PerBuild<Drained>) {
        if drains.current.on_nats {
            self.pauses
                .push((format!("{scenario}: {figure}"), drains.clone()));
        }
    }

    /// The table of every figure, with the targets; last, the longest pause
    /// in consumption of all the NATS drains.
    pub fn print_summary(&mut self) {
        self.check_pauses();
        let compared = self.builds.len() > 1;
        println!();
        println!("## Summary");
        println!();
        if compared {
            println!("| scenario | figure | value | baseline | current / baseline | target | |");
            println!("|---|---|---:|---:|---:|---|---|");
        } else {
            println!("| scenario | figure | value | target | |");
            println!("|---|---|---:|---|---|");
        }
        for row in &self.rows {
            let (target, verdict) = match &row.target {
                Some((target, Some(true))) => (target.as_str(), "met"),
                Some((target, Some(false))) => (target.as_str(), "**missed**"),
                Some((target, None)) => (target.as_str(), "cannot tell"),
                None => ("", ""),
            };
            let value = &row.value;
            if compared {
                println!(
                    "| {} | {} | {} | {} | {} | {target} | {verdict} |",
                    row.scenario,
                    row.figure,
                    value.current,
                    value.baseline.as_deref().unwrap_or(""),
                    value.ratio.as_deref().unwrap_or(""),
                );
            } else {
                println!(
                    "| {} | {} | {} | {target} | {verdict} |",
                    row.scenario, row.figure, value.current
                );
            }
        }
    }

    /// The row of the longest pause of all the NATS drains, if any ran.
    fn check_pauses(&mut self) {
        const TARGET: Duration = Duration::from_secs(1);
        let longest = |pick: fn(&PerBuild<Drained>) -> Option<&Drained>| {
            self.pauses
                .iter()
                .filter_map(|(name, drains)| Some((pick(drains)?, name.as_str())))
                .max_by_key(|&(drain, _)| drain.longest_pause())
                .map(|(drain, name)| format!("{}, {name}", drain.longest_pause_read()))
        };
        let Some(current) = longest(|d| Some(&d.current)) else {
            return;
        };
        let met = self
            .pauses
            .iter()
            .all(|(_, d)| d.current.longest_pause() <= TARGET);
        let value = Value {
            current,
            baseline: longest(|d| d.baseline.as_ref()),
            ratio: None,
        };
        self.check(
            "all",
            "longest pause in consumption while events wait (NATS drains)",
            value,
            "none over 1 s",
            met,
        );
    }
}

/// A rate, rounded to a sensible precision.
pub fn rate(per_second: f64) -> String {
    if per_second >= 1_000.0 {
        format!("{:.1}k/s", per_second / 1_000.0)
    } else {
        format!("{per_second:.0}/s")
    }
}

/// A ratio as a percentage.
pub fn percent(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}

/// A short duration in µs: `110 µs`, `8.4 µs`.
pub fn micros(d: Duration) -> String {
    micros_of(d.as_secs_f64() * 1e6)
}

/// A number of µs, as [`micros`] shows it.
pub fn micros_of(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// CPU µs per event: `110 µs/event`.
pub fn per_event(us: f64) -> String {
    format!("{}/event", micros_of(us))
}

/// Seconds with two decimals: `0.04 s`.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// KiB as `95.9 MiB`.
pub fn mib_of(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}
