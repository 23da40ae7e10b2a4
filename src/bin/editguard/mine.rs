//! `editguard mine`: single edits over dataset records, keeping those that collapse the model, journaled and
//! resumable; `--report JOURNAL` summarises a journal.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use editguard::data::counterfact::EditDataset;
use editguard::data::counterfact::select_ids;
use editguard::mining::journal::Journal;
use editguard::mining::screen::ScreenRule;
use editguard::mining::suite::{SuiteOptions, collapses, write_suite};
use editguard::mining::{MineOptions, Selection, measure_other_methods, mine, report};
use editguard::registry::Registry;

/// Arguments of `editguard mine`.
#[derive(Args)]
pub struct MineArgs {
    /// Model id (default: the registry's default model).
    #[arg(long)]
    model: Option<String>,
    /// Editing method (a row of the method table).
    #[arg(long, default_value = "rome")]
    method: String,
    /// Edit dataset: counterfact, counterfact-train or zsre.
    #[arg(long, default_value = "counterfact")]
    dataset: String,
    /// Mine the first N records of the dataset in the seeded order of --seed.
    #[arg(long, default_value_t = 100, conflicts_with = "ids")]
    n: usize,
    /// Seed of the record order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Comma-separated record ids instead of a seeded order.
    #[arg(long, value_delimiter = ',')]
    ids: Vec<String>,
    /// Perplexity corpus (as in suites).
    #[arg(long, default_value = "me-ppl-50")]
    corpus: String,
    /// The suite file to write with the collapses (e.g. cases/hardcf-<model>.toml).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Further methods the written suite runs; each edits every collapse once when the suite is written, and its
    /// measured outcome becomes the expectation.
    #[arg(long, value_delimiter = ',')]
    suite_methods: Vec<String>,
    /// Tier of the written suite.
    #[arg(long, default_value = "heavy")]
    tier: String,
    /// How many cases (the first collapses in mining order) run in the default tier when --tier is heavy.
    #[arg(long, default_value_t = 0)]
    default_cases: usize,
    /// The journal (default: mining/<out stem>.jsonl, or mining/<model>-<method>-<dataset>.jsonl).
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Screen: `registry` (the model's calibrated rule, if any), `off`, or a rule `signal>=value`.
    #[arg(long, default_value = "registry")]
    screen: String,
    /// Share of the records the screen skips that are edited anyway (an audit of what the screen misses).
    #[arg(long, default_value_t = 0.0)]
    audit: f64,
    /// Summarise this journal and exit (nothing is edited).
    #[arg(long)]
    report: Option<PathBuf>,
    /// With --report (or after a mine): write the ‖ΔW‖/‖W‖ vs ratio scatter here (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

impl MineArgs {
    /// The model asked for, if any.
    pub fn model_id(&self) -> Option<String> {
        self.model.clone()
    }

    /// True when only a report is asked for.
    pub fn report_only(&self) -> bool {
        self.report.is_some()
    }
}

fn screen_rule(args: &MineArgs, registry: &Registry, model: &str) -> Result<Option<ScreenRule>> {
    Ok(match args.screen.as_str() {
        "off" | "none" => None,
        "registry" => ScreenRule::from_registry(registry, model, &args.method)?,
        rule => Some(ScreenRule::parse(rule)?),
    })
}

/// `editguard mine --report JOURNAL`.
pub fn report_only(args: &MineArgs, registry: &Registry) -> Result<()> {
    let path = args.report.as_deref().expect("report_only is called with --report");
    let (settings, entries) = Journal::read(path)?;
    let rule = screen_rule(args, registry, &settings.model).unwrap_or(None);
    print!("{}", report::summary(&settings, &entries, rule.as_ref()));
    if let Some(plot) = &args.plot {
        report::write_scatter(&settings, &entries, plot)?;
        println!("plot        {}", plot.display());
    }
    Ok(())
}

fn default_journal(args: &MineArgs, model: &str) -> PathBuf {
    let stem = match &args.out {
        Some(out) => out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "mine".into()),
        None => format!("{model}-{}-{}", args.method, args.dataset),
    };
    Path::new("mining").join(format!("{stem}.jsonl"))
}

/// Runs `editguard mine`.
pub fn run(
    args: MineArgs,
    registry: &Registry,
    data_dir: Option<PathBuf>,
    mut model: editguard::model::LoadedModel,
) -> Result<()> {
    EditDataset::parse(&args.dataset)?;
    anyhow::ensure!((0.0..=1.0).contains(&args.audit), "--audit: expected a share between 0 and 1, not {}", args.audit);
    let rule = screen_rule(&args, registry, &model.id)?;
    let journal = args.journal.clone().unwrap_or_else(|| default_journal(&args, &model.id));
    let options = MineOptions {
        model: model.id.clone(),
        method: args.method.clone(),
        dataset: args.dataset.clone(),
        selection: if args.ids.is_empty() {
            Selection::Order { n: args.n, seed: args.seed }
        } else {
            Selection::Ids(args.ids.clone())
        },
        corpus: args.corpus.clone(),
        journal: journal.clone(),
        screen: rule.clone(),
        audit: args.audit,
        data_dir: data_dir.clone(),
    };
    match &rule {
        Some(r) => eprintln!(
            "screen: skip records with {} (measured: {})",
            r.describe(),
            if r.measured.is_empty() { "not calibrated here" } else { &r.measured }
        ),
        None => eprintln!("screen: off (every record is edited)"),
    }
    eprintln!("journal: {}", journal.display());
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("mining {bar:30} {pos}/{len} records ({per_sec}, eta {eta}) {msg}")
            .expect("valid template"),
    );
    let result = mine(registry, &mut model, &options, &mut |counts, done| {
        bar.set_length(counts.total as u64);
        bar.set_position(done as u64);
        bar.set_message(counts.line());
    });
    bar.finish_and_clear();
    let result = result.with_context(|| format!("mining into {}", journal.display()))?;
    for note in &result.notes {
        eprintln!("{note}");
    }
    print!("{}", report::summary(&result.settings, &result.entries, rule.as_ref()));
    if let Some(plot) = &args.plot {
        report::write_scatter(&result.settings, &result.entries, plot)?;
        println!("plot        {}", plot.display());
    }
    if let Some(out) = &args.out {
        if result.counts.collapses == 0 {
            println!("suite       not written: the mine found no collapse");
            return Ok(());
        }
        let records = editguard::mining::selected_records(&options)?;
        let others: Vec<String> = args.suite_methods.iter().filter(|m| **m != args.method).cloned().collect();
        let collapsed: Vec<String> = collapses(&result.entries).iter().map(|e| e.id.clone()).collect();
        let requests = select_ids(&records, &collapsed, &args.dataset)?;
        let measured = measure_other_methods(
            registry,
            &mut model,
            &result.settings,
            &requests,
            &others,
            data_dir.as_deref(),
            &mut |o| match &o.measured {
                Ok(m) => eprintln!(
                    "{} on {}: ppl {:.1} ({:.2}x), ‖ΔW‖/‖W‖ {:.3}, efficacy {:.0}",
                    o.method, o.id, m.ppl, m.ratio, m.relative_norm, m.efficacy
                ),
                Err(e) => eprintln!("{} on {}: failed: {e}", o.method, o.id),
            },
        )?;
        let mut methods = vec![args.method.clone()];
        methods.extend(others);
        let suite_options = SuiteOptions {
            methods,
            tier: args.tier.clone(),
            default_cases: args.default_cases,
            command: format!("editguard {}", std::env::args().skip(1).collect::<Vec<_>>().join(" ")),
        };
        let n = write_suite(out, registry, &result.settings, &result.entries, &records, &measured, &suite_options)?;
        println!("suite       {} ({n} cases)", out.display());
    }
    Ok(())
}
