//! Switchboard next to the limit of the bus it runs on, measured in the same
//! run. A program that prints numbers, not a test:
//!
//! ```sh
//! cargo bench --bench switchboard -- [--quick] [--only bus,route,effects,chain,scale,rhai,replicas,changelog,timers,inbox]
//!     [--concurrency C] [--baseline PATH]
//! ```
//!
//! `SWITCHBOARD_WORKER_THREADS` and `SWITCHBOARD_EVENT_THREADS`, if set,
//! are passed on to every dispatcher (`runtime.worker_threads`,
//! `runtime.event_threads`); nothing else of the environment configures
//! them.
//!
//! Every scenario starts its own `nats-server -js` on loopback (in a
//! temporary directory) and, where a dispatcher runs, the real `switchboard
//! run` binary as a child process, whose peak resident set (`VmHWM`) is read
//! at the end of the scenario, and whose CPU time (user + system, from
//! `/proc/PID/stat`) per event is printed beside every rate: it is far
//! steadier than a rate on a shared machine. With `--baseline PATH`, every
//! scenario where a dispatcher runs runs it with that binary too, right
//! after the current build (see `compare`), and the figures of both are
//! printed with their ratio. The events are `poll_complete` events of about
//! 300 bytes. The scenarios:
//!
//! - `bus`: the bus's own limit, with a bare async-nats client: JetStream
//!   publish with acks in flight, and pull consume + ack. Then the
//!   `switchboard-sdk` emitter's publish rate as a ratio of the raw one.
//! - `route`: the dispatcher draining a backlog through a one-step `log`
//!   chain with logging off, as a ratio of the raw consume + ack rate; and the
//!   same on the embedded bus.
//! - `effects`: backlogs drained by a freshly started dispatcher through
//!   steps with effects: `create_contact` → `log` (every event a new
//!   contact; the CPU per event as the store grows), the same for
//!   returning contacts (1,000 numbers an account) and `create_contact` →
//!   `payment_webhook` to a keep-alive HTTP receiver in this program.
//! - `chain`: a full chain (Rhai scoring → `create_contact` → `send_sms` over
//!   NATS → `payment_webhook` to a keep-alive HTTP receiver in this program):
//!   end-to-end latency from publish to the webhook's arrival at a fixed
//!   offered load, and events/s at saturation.
//! - `scale`: 10, 1,000 and 10,000 accounts with 10 chains each: start time,
//!   chain lookup cost per event, throughput and peak RSS.
//! - `rhai`: per-call cost of a 20-line `handle` and of a `when` condition.
//! - `replicas`: 1, 2 and 3 dispatchers with `--replicated` draining one
//!   backlog through `create_contact` → `log`, next to one dispatcher with its
//!   own store.
//! - `changelog`: what a changelog record costs the nats-server and its
//!   writer: the replicated dispatcher's appender (a message per record),
//!   and raw publishes of a record to a message and of 50 to a message;
//!   then what deleting and purging batches of 50 costs the server.
//! - `timers`: 100,000 chains paused in a `delay` on NATS, a tenth of them
//!   due in the same second: pausing's cost, the resident set, a start over
//!   them, and how late the ones due together go on (p50, p99).
//! - `inbox`: notifications/s through a one-step `notify` chain; 1,000
//!   receivers with a live stream open (the resident set with them), and a
//!   broadcast to them: publish → each stream's notification (p50, p99).
//!
//! Every drain on NATS also gives the longest pause in consumption while
//! events wait (see `drain`). The summary at the end compares each figure
//! with its target.

use std::process::ExitCode;

use anyhow::{Context as _, bail};

#[path = "../common/mod.rs"]
mod common;

mod bus;
mod chain;
mod changelog;
mod compare;
mod drain;
mod effects;
mod inbox;
mod receiver;
mod replicas;
mod report;
mod rhai;
mod route;
mod scale;
mod timers;

use compare::Build;

use report::Report;

const USAGE: &str = "usage: cargo bench --bench switchboard -- [--quick] \
[--only bus,route,effects,chain,scale,rhai,replicas,changelog,timers,inbox] [--concurrency C] [--baseline PATH]";

/// What a run measures, and how much.
#[derive(Debug, Clone)]
pub struct Options {
    /// Smaller runs (a tenth or so), for a quick look; the figures are noisier.
    pub quick: bool,
    pub only: Vec<Scenario>,
    /// The dispatchers' `--concurrency`.
    pub concurrency: usize,
    /// The builds the dispatchers run: the current one, then the baseline
    /// of `--baseline PATH` if given.
    pub builds: Vec<Build>,
}

impl Options {
    /// `full` events, or a tenth of them with `--quick`.
    pub fn scaled(&self, full: u64) -> u64 {
        if self.quick { (full / 10).max(1) } else { full }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Bus,
    Route,
    Effects,
    Chain,
    Scale,
    Rhai,
    Replicas,
    Changelog,
    Timers,
    Inbox,
}

impl Scenario {
    const ALL: [Scenario; 10] = [
        Scenario::Bus,
        Scenario::Route,
        Scenario::Effects,
        Scenario::Chain,
        Scenario::Scale,
        Scenario::Rhai,
        Scenario::Replicas,
        Scenario::Changelog,
        Scenario::Timers,
        Scenario::Inbox,
    ];

    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "bus" => Self::Bus,
            "route" => Self::Route,
            "effects" => Self::Effects,
            "chain" => Self::Chain,
            "scale" => Self::Scale,
            "rhai" => Self::Rhai,
            "replicas" => Self::Replicas,
            "changelog" => Self::Changelog,
            "timers" => Self::Timers,
            "inbox" => Self::Inbox,
            other => {
                bail!(
                    "unknown scenario {other:?}: use bus, route, effects, chain, scale, rhai, replicas, changelog, timers or inbox"
                )
            }
        })
    }
}

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        quick: false,
        only: Scenario::ALL.to_vec(),
        concurrency: 32,
        builds: Vec::new(),
    };
    let mut baseline = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "--quick" => options.quick = true,
            "--only" => {
                options.only = value("--only")?
                    .split(',')
                    .map(|s| Scenario::parse(s.trim()))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--concurrency" => {
                let v = value("--concurrency")?;
                options.concurrency = v
                    .parse()
                    .ok()
                    .filter(|&c| c > 0)
                    .with_context(|| format!("--concurrency {v:?} is not a positive number"))?;
            }
            "--baseline" => {
                let path = std::path::PathBuf::from(value("--baseline")?);
                if !path.is_file() {
                    bail!("--baseline {}: no such file", path.display());
                }
                baseline = Some(path);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    options.builds = Build::all(baseline);
    Ok(options)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|options| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(run(options))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    let mut report = Report::new(&options);
    report.print_header();
    for scenario in &options.only {
        match scenario {
            Scenario::Bus => bus::run(&options, &mut report).await?,
            Scenario::Route => route::run(&options, &mut report).await?,
            Scenario::Effects => effects::run(&options, &mut report).await?,
            Scenario::Chain => chain::run(&options, &mut report).await?,
            Scenario::Scale => scale::run(&options, &mut report).await?,
            Scenario::Rhai => rhai::run(&mut report)?,
            Scenario::Replicas => replicas::run(&options, &mut report).await?,
            Scenario::Changelog => changelog::run(&options, &mut report).await?,
            Scenario::Timers => timers::run(&options, &mut report).await?,
            Scenario::Inbox => inbox::run(&options, &mut report).await?,
        }
    }
    report.print_summary();
    Ok(())
}
