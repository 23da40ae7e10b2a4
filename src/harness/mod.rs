//! The regression harness: `cases/*.toml` × methods × models as generated tests (libtest-mimic).
//!
//! `tests/harness.rs` is one call to [`main`]. It reads `models.toml` and `cases/`, builds the matrix
//! ([`trial::plan`]: one test per case × method × model for single suites, per suite × method × model otherwise, plus
//! one baseline test per model and corpus) and hands it to libtest-mimic, so `cargo test`, `--list`, `--exact`,
//! `--ignored` and `cargo nextest run` (one process per test, `--partition hash:m/n`) all work. Listing loads no
//! model. A filter that matches nothing, an empty matrix or a bad suite is an error (exit code 2), never a silent pass.
//!
//! Heavy-tier suites are ignored unless `--ignored`/`--include-ignored` is given or `EDITGUARD_TIER=heavy`. Tests
//! run one at a time unless `--test-threads` says otherwise: each test already uses every core, and a big model
//! loaded twice would not fit.

pub mod baseline;
pub mod checked_registry;
pub mod context;
pub mod curves;
pub mod execute;
pub mod snapshot;
pub mod task_checks;
pub mod trial;
pub mod verdict;

use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

pub use context::HarnessContext;
pub use execute::MethodWrapper;
pub use trial::{TrialKind, TrialSpec};

/// Environment variable selecting the tier: `heavy` (or `all`) runs heavy suites too.
pub const TIER_ENV: &str = "EDITGUARD_TIER";

/// The harness entry point for `tests/harness.rs`.
pub fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    match prepare(&args) {
        Ok(trials) => libtest_mimic::run(&args, trials).exit_code(),
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// Builds the libtest-mimic trials, or says why there are none to run.
fn prepare(args: &Arguments) -> anyhow::Result<Vec<Trial>> {
    let context = Arc::new(HarnessContext::from_env()?);
    let specs = trial::plan(&context.suites);
    if specs.is_empty() {
        anyhow::bail!("the test matrix is empty: no suite under cases/ names a method and a model");
    }
    if let Some(filter) = &args.filter {
        let matched =
            specs.iter().any(|s| if args.exact { &s.name == filter } else { s.name.contains(filter.as_str()) });
        if !matched {
            anyhow::bail!("{}", trial::explain_unmatched(filter, &specs, &context.suites));
        }
    }
    let heavy = std::env::var(TIER_ENV).is_ok_and(|t| t == "heavy" || t == "all");
    Ok(specs
        .into_iter()
        .map(|spec| {
            let ignored = spec.heavy && !heavy;
            let context = Arc::clone(&context);
            let name = spec.name.clone();
            Trial::test(name, move || run_trial(&context, &spec, None).map_err(Failed::from)).with_ignored_flag(ignored)
        })
        .collect())
}

/// Runs one test; `Err` carries the diagnosis.
pub fn run_trial(context: &HarnessContext, spec: &TrialSpec, wrapper: Option<&MethodWrapper>) -> Result<(), String> {
    match &spec.kind {
        TrialKind::Baseline { model, corpus } => baseline::run(context, spec, model, corpus),
        TrialKind::TaskBaseline { model, task, items, seed } => {
            task_checks::run_baseline(context, spec, model, task, *items, *seed)
        }
        TrialKind::Edit { suite, method, model, case } => {
            execute::run(context, spec, &context.suites[*suite], method, model, case, wrapper)
        }
    }
}

/// Finds a test of the matrix by its exact name.
pub fn find_trial(context: &HarnessContext, name: &str) -> Option<TrialSpec> {
    trial::plan(&context.suites).into_iter().find(|s| s.name == name)
}
