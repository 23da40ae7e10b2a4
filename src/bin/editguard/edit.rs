//! `editguard edit`: apply edits with a method and report edit quality, perplexity and the size of the change.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use editguard::data::counterfact::{EditDataset, seeded_sample, select_ids};
use editguard::data::me_ppl::Corpus;
use editguard::methods::{EditEnv, EditRequest, build_method};
use editguard::metrics::edit_quality::{EditQuality, locality_baseline, measure};
use editguard::metrics::perplexity::{PerplexityOptions, perplexity};
use editguard::model::LoadedModel;
use editguard::registry::Registry;

/// Arguments of `editguard edit`.
#[derive(Args)]
pub struct EditArgs {
    /// Model id (default: the registry's default model).
    #[arg(long)]
    model: Option<String>,
    /// Editing method (a row of the method table: rome, r-rome, …).
    #[arg(long)]
    method: String,
    /// Full prompt text containing the subject (single request).
    #[arg(long, requires_all = ["subject", "target"], conflicts_with = "dataset")]
    prompt: Option<String>,
    /// The subject inside --prompt.
    #[arg(long)]
    subject: Option<String>,
    /// The new target.
    #[arg(long)]
    target: Option<String>,
    /// The current answer (enables the efficacy comparison).
    #[arg(long)]
    ground_truth: Option<String>,
    /// Paraphrases of the prompt (repeatable).
    #[arg(long)]
    rephrase: Vec<String>,
    /// Take requests from an edit dataset: counterfact or zsre.
    #[arg(long)]
    dataset: Option<String>,
    /// Number of requests sampled from --dataset (seeded).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Comma-separated record ids of --dataset instead of a sample.
    #[arg(long, value_delimiter = ',')]
    ids: Vec<String>,
    /// Sampling seed for --dataset.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests per method call (batch editing; 1 = one at a time).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Keep every edit (sequential editing) instead of restoring the weights after each batch.
    #[arg(long)]
    sequential: bool,
    /// Skip the perplexity measurements.
    #[arg(long)]
    no_ppl: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct BatchReport {
    requests: Vec<String>,
    seconds: f64,
    max_relative_norm: f64,
    delta_norms: Vec<f64>,
    quality: EditQuality,
    ppl_after: Option<f64>,
}

#[derive(Serialize)]
struct EditReport {
    model: String,
    method: String,
    setting: &'static str,
    ppl_before: Option<f64>,
    ppl_after: Option<f64>,
    seconds_per_edit: f64,
    batches: Vec<BatchReport>,
    overall: EditQuality,
}

impl EditArgs {
    /// The model asked for, if any.
    pub fn model_id(&self) -> Option<String> {
        self.model.clone()
    }
}

fn requests(args: &EditArgs, data_dir: Option<&std::path::Path>) -> Result<Vec<EditRequest>> {
    if let Some(prompt) = &args.prompt {
        let (subject, target) = (args.subject.as_deref().unwrap_or(""), args.target.as_deref().unwrap_or(""));
        let mut request = EditRequest::from_text("cli", prompt, subject, target)?;
        request.ground_truth = args.ground_truth.clone();
        request.rephrase_prompts = args.rephrase.clone();
        return Ok(vec![request]);
    }
    let Some(name) = &args.dataset else { bail!("give either --prompt/--subject/--target or --dataset") };
    let dataset = EditDataset::parse(name)?;
    let all = dataset.load(data_dir)?;
    Ok(if args.ids.is_empty() { seeded_sample(&all, args.n, args.seed) } else { select_ids(&all, &args.ids, name)? })
}

/// Runs `editguard edit`.
pub fn run(args: EditArgs, registry: &Registry, data_dir: Option<PathBuf>, model: LoadedModel) -> Result<()> {
    let mut model = model;
    let requests = requests(&args, data_dir.as_deref())?;
    let method = build_method(registry, &model.id, &args.method)?;
    let env = EditEnv { data_dir: data_dir.clone() };
    let corpus = if args.no_ppl { None } else { Some(Corpus::MePpl50.load(data_dir.as_deref())?) };
    let ppl = |model: &LoadedModel| -> Result<Option<f64>> {
        match &corpus {
            Some(sentences) => {
                Ok(Some(perplexity(model, sentences, PerplexityOptions::default(), None)?.mean_sentence_ppl))
            }
            None => Ok(None),
        }
    };
    let ppl_before = ppl(&model)?;
    let baseline = locality_baseline(&model, &requests)?;
    let mut batches = Vec::new();
    let mut edit_seconds = 0.0;
    let mut applied = Vec::new();
    for (index, chunk) in requests.chunks(args.batch_size.max(1)).enumerate() {
        let edit =
            method.apply(&mut model, chunk, &env).with_context(|| format!("{} on batch {index}", args.method))?;
        edit_seconds += edit.seconds;
        let offset = index * args.batch_size.max(1);
        let local_baseline = editguard::metrics::edit_quality::LocalityBaseline {
            predictions: baseline.predictions[offset..offset + chunk.len()].to_vec(),
        };
        let quality = measure(&model, chunk, &local_baseline)?;
        let report = BatchReport {
            requests: chunk.iter().map(|r| r.id.clone()).collect(),
            seconds: edit.seconds,
            max_relative_norm: edit.max_relative_norm(),
            delta_norms: edit.changes.iter().map(|c| c.delta_norm).collect(),
            quality,
            ppl_after: if args.sequential { None } else { ppl(&model)? },
        };
        if !args.json {
            print_batch(&report);
        }
        batches.push(report);
        if args.sequential {
            applied.push(edit);
        } else {
            edit.undo(&mut model)?;
        }
    }
    let overall = if args.sequential { measure(&model, &requests, &baseline)? } else { mean_quality(&batches) };
    let ppl_after = if args.sequential { ppl(&model)? } else { None };
    let report = EditReport {
        model: model.id.clone(),
        method: args.method.clone(),
        setting: match (args.sequential, args.batch_size > 1) {
            (false, false) => "single",
            (true, false) => "sequential",
            (false, true) => "batch",
            (true, true) => "batch-sequential",
        },
        ppl_before,
        ppl_after,
        seconds_per_edit: edit_seconds / requests.len().max(1) as f64,
        batches,
        overall,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn mean_quality(batches: &[BatchReport]) -> EditQuality {
    let n = batches.len().max(1) as f64;
    let mean = |f: &dyn Fn(&EditQuality) -> Option<f64>| {
        let values: Vec<f64> = batches.iter().filter_map(|b| f(&b.quality)).collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    EditQuality {
        efficacy: mean(&|q| q.efficacy),
        efficacy_accuracy: batches.iter().map(|b| b.quality.efficacy_accuracy).sum::<f64>() / n,
        generalization: mean(&|q| q.generalization),
        generalization_accuracy: mean(&|q| q.generalization_accuracy),
        locality: mean(&|q| q.locality),
        took: batches.iter().flat_map(|b| b.quality.took.clone()).collect(),
    }
}

fn fmt(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

fn print_batch(report: &BatchReport) {
    println!(
        "edit {:<12} {:>6.2} s  ‖ΔW‖/‖W‖ {:.4}  efficacy {}  acc {:.3}  generalization {}  locality {}  ppl {}",
        report.requests.join(","),
        report.seconds,
        report.max_relative_norm,
        fmt(report.quality.efficacy),
        report.quality.efficacy_accuracy,
        fmt(report.quality.generalization),
        fmt(report.quality.locality),
        fmt(report.ppl_after),
    );
}

fn print_summary(report: &EditReport) {
    println!("model {} · method {} · setting {}", report.model, report.method, report.setting);
    println!("ME-PPL_50 mean ppl before {}  after {}", fmt(report.ppl_before), fmt(report.ppl_after));
    println!(
        "efficacy {}  (token acc {:.3})  generalization {}  locality {}",
        fmt(report.overall.efficacy),
        report.overall.efficacy_accuracy,
        fmt(report.overall.generalization),
        fmt(report.overall.locality)
    );
    println!("seconds per edit {:.2}", report.seconds_per_edit);
}
