//! The builds a run measures, and figures measured with each of them: the
//! current build and, with `--baseline PATH`, another `switchboard` binary.
//! Every scenario where a dispatcher runs measures the current build, then
//! the baseline, one unit of work after the other (a backlog drain, a chain
//! run, one scale), so that the machine's load of the moment falls on both
//! alike and their ratio means more than either figure.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// A `switchboard` binary the dispatchers run.
#[derive(Debug, Clone)]
pub struct Build {
    /// `current` or `baseline`.
    pub name: &'static str,
    pub binary: PathBuf,
    /// Whether lines of output name the build (when there are two).
    named: bool,
}

impl Build {
    /// The build of this checkout (or `SWITCHBOARD_BENCH_BINARY`), and the
    /// baseline binary if there is one.
    pub fn all(baseline: Option<PathBuf>) -> Vec<Build> {
        let named = baseline.is_some();
        let mut builds = vec![Build {
            name: "current",
            binary: crate::common::default_binary(),
            named,
        }];
        if let Some(binary) = baseline {
            builds.push(Build {
                name: "baseline",
                binary,
                named,
            });
        }
        builds
    }

    /// The build of this checkout (or `SWITCHBOARD_BENCH_BINARY`).
    pub fn is_current(&self) -> bool {
        self.name == "current"
    }

    /// What a line of output about this build starts with: `[baseline] `,
    /// or nothing in a run of one build.
    pub fn tag(&self) -> String {
        if self.named {
            format!("[{}] ", self.name)
        } else {
            String::new()
        }
    }
}

/// One measurement with each build: the current one and, in a run with a
/// baseline, the baseline's.
#[derive(Debug, Clone)]
pub struct PerBuild<T> {
    pub current: T,
    pub baseline: Option<T>,
}

/// Whether the next unit measures the baseline first.
static BASELINE_FIRST: AtomicBool = AtomicBool::new(false);

impl<T> PerBuild<T> {
    /// Measures with each of `builds` in turn: with a baseline, the two
    /// go first by turns from one unit to the next, since the first of two
    /// runs in a row can fare differently on a shared machine (in one day's
    /// runs the first of each pair was up to a fifth slower, whichever
    /// build it was).
    pub async fn measure(
        builds: &[Build],
        mut measure: impl AsyncFnMut(&Build) -> anyhow::Result<T>,
    ) -> anyhow::Result<Self> {
        let (first, rest) = builds.split_first().expect("the current build");
        let Some(other) = rest.first() else {
            let current = measure(first).await?;
            return Ok(Self {
                current,
                baseline: None,
            });
        };
        let (current, baseline) = if BASELINE_FIRST.fetch_xor(true, Ordering::Relaxed) {
            let baseline = measure(other).await?;
            (measure(first).await?, baseline)
        } else {
            let current = measure(first).await?;
            (current, measure(other).await?)
        };
        Ok(Self {
            current,
            baseline: Some(baseline),
        })
    }

    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> PerBuild<U> {
        PerBuild {
            current: f(&self.current),
            baseline: self.baseline.as_ref().map(f),
        }
    }

    /// `f` of this and `other`, build by build.
    pub fn zip_with<U, V>(
        &self,
        other: &PerBuild<U>,
        mut f: impl FnMut(&T, &U) -> V,
    ) -> PerBuild<V> {
        PerBuild {
            current: f(&self.current, &other.current),
            baseline: self
                .baseline
                .as_ref()
                .zip(other.baseline.as_ref())
                .map(|(a, b)| f(a, b)),
        }
    }
}

impl PerBuild<f64> {
    /// Current / baseline, in a run with a baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .filter(|&b| b > 0.0)
            .map(|baseline| self.current / baseline)
    }
}

/// `×1.23`: a ratio, as printed.
pub fn times(ratio: f64) -> String {
    format!("×{ratio:.2}")
}

/// The line that compares figures of both builds (`current / baseline:
/// events/s ×1.02, CPU per event ×0.97`), in a run with a baseline.
pub fn print_ratios(figures: &[(&str, PerBuild<f64>)]) {
    let ratios: Vec<String> = figures
        .iter()
        .filter_map(|(name, values)| Some(format!("{name} {}", times(values.ratio()?))))
        .collect();
    if !ratios.is_empty() {
        println!("current / baseline: {}", ratios.join(", "));
    }
}
