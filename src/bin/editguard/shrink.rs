//! `editguard shrink`: reduce a collapsing sequential or batch test to a minimal list of edits that still collapses,
//! print it and write it as a suite.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use editguard::cases::Suite;
use editguard::harness::{HarnessContext, TrialKind, find_trial};
use editguard::shrink::{ShrinkTarget, shrink, suite_text};

/// Arguments of `editguard shrink`.
#[derive(Args)]
pub struct ShrinkArgs {
    /// The test to shrink, by its harness name (e.g. `sequential::rome::smollm2-135m::heavy-sequential::n50`).
    test: Option<String>,
    /// Or: a suite file (any path) ...
    #[arg(long, conflicts_with = "test", requires = "method")]
    suite: Option<PathBuf>,
    /// ... and the method to run it with.
    #[arg(long)]
    method: Option<String>,
    /// ... on this model (default: the suite's first model).
    #[arg(long)]
    model: Option<String>,
    /// Where to write the reproducer suite (default: cases/shrunk-<suite>-<method>.toml).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn target(args: &ShrinkArgs, context: &HarnessContext) -> Result<ShrinkTarget> {
    if let Some(name) = &args.test {
        let Some(spec) = find_trial(context, name) else {
            bail!("no test named `{name}` (list them with `cargo test --release --test harness -- --list`)")
        };
        let TrialKind::Edit { suite, method, model, .. } = spec.kind else {
            bail!("`{name}` is a baseline test; shrink reduces the edits of an edit test")
        };
        return Ok(ShrinkTarget { suite: context.suites[suite].clone(), method, model });
    }
    let Some(path) = &args.suite else { bail!("give a test name, or --suite FILE --method M") };
    let suite = Suite::load(path, &context.registry)?;
    let method = args.method.clone().expect("clap requires --method with --suite");
    if !suite.methods.contains(&method) {
        bail!("{}: the suite does not run `{method}` (it runs {})", path.display(), suite.methods.join(", "));
    }
    let model = match &args.model {
        Some(m) if suite.models.contains(m) => m.clone(),
        Some(m) => {
            bail!("{}: the suite does not run on `{m}` (it runs on {})", path.display(), suite.models.join(", "))
        }
        None => suite.models[0].clone(),
    };
    Ok(ShrinkTarget { suite, method, model })
}

/// Runs `editguard shrink`.
pub fn run(args: ShrinkArgs, data_dir: Option<PathBuf>) -> Result<()> {
    let mut context = HarnessContext::from_env()?;
    context.data_dir = data_dir;
    let target = target(&args, &context)?;
    let report = shrink(&context, &target, &mut |line| eprintln!("{line}"))
        .with_context(|| format!("shrinking {}", target.test_name()))?;
    println!("{}: {}", report.test, report.headline());
    for request in &report.minimal {
        println!("  [{}] \"{}\" → \"{}\"", request.id, request.prompt_text(), request.target_new);
    }
    println!("cost: {} runs, {} edit operations, {:.1} min", report.runs, report.edits_applied, report.seconds / 60.0);
    let out = args.out.clone().unwrap_or_else(|| {
        context.root.join("cases").join(format!("shrunk-{}-{}.toml", target.suite.name, target.method))
    });
    let text = suite_text(&target, &report)?;
    Suite::parse(&text, &out, &context.registry)
        .with_context(|| format!("the reproducer suite for {}", out.display()))?;
    editguard::cache::write_atomic(&out, text.as_bytes())?;
    println!("suite: {}", out.display());
    Ok(())
}
