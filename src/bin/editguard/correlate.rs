//! `editguard correlate`: sequential edits to a range of perplexities, task scores at each point, Spearman's ρ.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::ProgressBar;

use editguard::correlate::{CorrelateOptions, plot};
use editguard::data::counterfact::{EditDataset, seeded_sample};
use editguard::data::me_ppl::Corpus;
use editguard::model::LoadedModel;
use editguard::registry::Registry;
use editguard::tasks::{EvalOptions, entries_named};

/// Arguments of `editguard correlate`.
#[derive(Args)]
pub struct CorrelateArgs {
    /// Model id (default: the registry's default model).
    #[arg(long)]
    pub model: Option<String>,
    /// Editing method; its edits are kept.
    #[arg(long, default_value = "rome")]
    method: String,
    /// Edit counts to measure at, ascending (0 = unedited).
    #[arg(long, value_delimiter = ',', default_value = "0,2,4,8,16,32")]
    checkpoints: Vec<usize>,
    /// Tasks to score at each checkpoint (comma-separated, or `all`).
    #[arg(long, value_delimiter = ',', default_value = "piqa,lambada,sst2")]
    tasks: Vec<String>,
    /// Items per task (a seeded sample).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Seed of the item samples and of the COUNTERFACT requests.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the plot here (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `editguard correlate`.
pub fn run(args: CorrelateArgs, registry: &Registry, data_dir: Option<PathBuf>, model: LoadedModel) -> Result<()> {
    let mut model = model;
    let wanted = args.checkpoints.iter().copied().max().unwrap_or(0);
    if args.checkpoints.is_empty() {
        bail!("--checkpoints needs at least one edit count");
    }
    let all = EditDataset::parse("counterfact")?.load(data_dir.as_deref())?;
    let requests = seeded_sample(&all, wanted, args.seed);
    let sentences = Corpus::MePpl50.load(data_dir.as_deref())?;
    let options = CorrelateOptions {
        method: args.method.clone(),
        checkpoints: args.checkpoints.clone(),
        tasks: entries_named(&args.tasks)?,
        eval: EvalOptions { limit: Some(args.limit), seed: args.seed, data_dir, ..Default::default() },
        sentences: &sentences,
    };
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let report = editguard::correlate::run(&mut model, registry, &requests, &options, &mut |m| bar.set_message(m));
    bar.finish_and_clear();
    let report = report?;
    if let Some(path) = &args.plot {
        plot::write_svg(&report, path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} edited sequentially with {} (COUNTERFACT sample, seed {}); {} items per task",
        report.model, report.method, args.seed, args.limit
    );
    let mut header = format!("{:>6} {:>12}", "edits", "ME-PPL_50");
    for (task, metric) in &report.tasks {
        header.push_str(&format!(" {:>14}", format!("{task} {metric}")));
    }
    println!("{header}");
    for point in &report.points {
        let mut row = format!("{:>6} {:>12.2}", point.edits, point.mean_ppl);
        for score in &point.scores {
            row.push_str(&format!(" {score:>14.3}"));
        }
        println!("{row}");
    }
    let mut rho = format!("{:>19}", "Spearman ρ(ppl, ·)");
    for value in &report.spearman {
        rho.push_str(&match value {
            Some(v) => format!(" {v:>14.3}"),
            None => format!(" {:>14}", "undefined"),
        });
    }
    println!("{rho}");
    if let Some(reason) = &report.stopped {
        println!("stopped early: {reason}");
    }
    if let Some(path) = &args.plot {
        println!("plot written to {}", path.display());
    }
    Ok(())
}
