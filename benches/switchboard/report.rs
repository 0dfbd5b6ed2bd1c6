//! The figures of a run, and the summary that compares them with the targets.

use crate::Options;

/// One figure of the summary.
#[derive(Debug)]
struct Row {
    scenario: &'static str,
    figure: String,
    value: String,
    /// The target and whether it was met; none for figures without one.
    target: Option<(String, bool)>,
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Report {
    rows: Vec<Row>,
    quick: bool,
    concurrency: usize,
}

impl Report {
    pub fn new(options: &Options) -> Self {
        Self {
            rows: Vec::new(),
            quick: options.quick,
            concurrency: options.concurrency,
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
        println!(
            "- {nats}; dispatchers run with --concurrency {}",
            self.concurrency
        );
    }

    /// A figure without a target.
    pub fn figure(&mut self, scenario: &'static str, figure: impl Into<String>, value: String) {
        self.rows.push(Row {
            scenario,
            figure: figure.into(),
            value,
            target: None,
        });
    }

    /// A figure checked against its target.
    pub fn check(
        &mut self,
        scenario: &'static str,
        figure: impl Into<String>,
        value: String,
        target: &str,
        met: bool,
    ) {
        self.rows.push(Row {
            scenario,
            figure: figure.into(),
            value,
            target: Some((target.to_string(), met)),
        });
    }

    /// The table of every figure, with the targets.
    pub fn print_summary(&self) {
        println!();
        println!("## Summary");
        println!();
        println!("| scenario | figure | value | target | |");
        println!("|---|---|---:|---|---|");
        for row in &self.rows {
            let (target, verdict) = match &row.target {
                Some((target, true)) => (target.as_str(), "met"),
                Some((target, false)) => (target.as_str(), "**missed**"),
                None => ("", ""),
            };
            println!(
                "| {} | {} | {} | {target} | {verdict} |",
                row.scenario, row.figure, row.value
            );
        }
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
