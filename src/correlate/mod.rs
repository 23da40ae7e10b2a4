//! `editguard correlate`: does perplexity track downstream ability? (The Butterfly-effect paper's Figure 3 claim.)
//!
//! The model is edited sequentially (the edits kept) with one method on seeded COUNTERFACT requests; at each
//! checkpoint (an edit count, 0 = unedited) editguard measures ME-PPL_50 mean perplexity and scores every chosen task
//! on the same seeded item sample. The result is one row per checkpoint and, per task, Spearman's ρ of perplexity with
//! the task score across the checkpoints (a strong negative ρ: as perplexity rises, the task score falls). A run stops
//! early when perplexity becomes non-finite, keeping the checkpoints measured so far. [`plot`] draws the points.

pub mod plot;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::methods::{EditEnv, EditRequest, build_method};
use crate::metrics::perplexity::{PerplexityOptions, perplexity};
use crate::metrics::rank_correlation::spearman;
use crate::model::LoadedModel;
use crate::registry::Registry;
use crate::tasks::{EvalOptions, TaskEntry, load_items, score_items};

/// What to measure.
pub struct CorrelateOptions<'a> {
    /// Editing method (kept edits).
    pub method: String,
    /// Edit counts to measure at, ascending (0 = the unedited model).
    pub checkpoints: Vec<usize>,
    /// Tasks to score at each checkpoint.
    pub tasks: Vec<&'static TaskEntry>,
    /// Item sample and seed of the tasks.
    pub eval: EvalOptions,
    /// ME-PPL_50 sentences.
    pub sentences: &'a [String],
}

/// The measurements at one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CorrelationPoint {
    /// Edits applied.
    pub edits: usize,
    /// ME-PPL_50 mean per-sentence perplexity.
    pub mean_ppl: f64,
    /// One score per task, in the order of [`CorrelationReport::tasks`].
    pub scores: Vec<f64>,
}

/// What `editguard correlate` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CorrelationReport {
    /// Model id.
    pub model: String,
    /// Method.
    pub method: String,
    /// Task names and metrics.
    pub tasks: Vec<(String, String)>,
    /// Items per task.
    pub items: Option<usize>,
    /// The checkpoints measured.
    pub points: Vec<CorrelationPoint>,
    /// Per task: Spearman's ρ of perplexity with the score (`None` when undefined).
    pub spearman: Vec<Option<f64>>,
    /// Why the run ended before the last checkpoint, if it did.
    pub stopped: Option<String>,
}

/// Edits `model` with `requests` one by one (kept) and measures at each checkpoint; `progress` hears what is happening.
pub fn run(
    model: &mut LoadedModel,
    registry: &Registry,
    requests: &[EditRequest],
    options: &CorrelateOptions,
    progress: &mut dyn FnMut(String),
) -> Result<CorrelationReport> {
    let wanted = options.checkpoints.last().copied().unwrap_or(0);
    if options.checkpoints.windows(2).any(|w| w[0] >= w[1]) || wanted > requests.len() {
        return Err(Error::invalid(
            "(correlate)",
            "checkpoints",
            format!("expected ascending edit counts up to the {} requests", requests.len()),
        ));
    }
    let method = build_method(registry, &model.id, &options.method)?;
    // The same item sample of every task is scored at every checkpoint.
    let items = options.tasks.iter().map(|entry| load_items(entry, &options.eval)).collect::<Result<Vec<_>>>()?;
    let env = EditEnv { data_dir: options.eval.data_dir.clone() };
    let mut points = Vec::new();
    let mut applied = 0;
    let mut stopped = None;
    for &checkpoint in &options.checkpoints {
        while applied < checkpoint {
            progress(format!("edit {} of {wanted} with {}", applied + 1, options.method));
            // The edit is kept: its undo record is dropped.
            let _kept = method.apply(model, std::slice::from_ref(&requests[applied]), &env)?;
            applied += 1;
        }
        progress(format!("perplexity after {applied} edits"));
        let mean_ppl = match perplexity(model, options.sentences, PerplexityOptions::default(), None) {
            Ok(report) if report.mean_sentence_ppl.is_finite() => report.mean_sentence_ppl,
            Ok(_) | Err(Error::NonFinite { .. }) => {
                stopped = Some(format!("perplexity became non-finite after {applied} edits"));
                break;
            }
            Err(e) => return Err(e),
        };
        let mut scores = Vec::with_capacity(options.tasks.len());
        for (entry, items) in options.tasks.iter().zip(&items) {
            progress(format!("{} after {applied} edits", entry.name));
            scores.push(score_items(model, entry, items, options.eval.token_budget)?.score);
        }
        points.push(CorrelationPoint { edits: applied, mean_ppl, scores });
    }
    let ppl: Vec<f64> = points.iter().map(|p| p.mean_ppl).collect();
    let spearman = (0..options.tasks.len())
        .map(|t| spearman(&ppl, &points.iter().map(|p| p.scores[t]).collect::<Vec<_>>()))
        .collect();
    Ok(CorrelationReport {
        model: model.id.clone(),
        method: options.method.clone(),
        tasks: options.tasks.iter().map(|t| (t.name.to_string(), t.metric.name().to_string())).collect(),
        items: options.eval.limit,
        points,
        spearman,
        stopped,
    })
}
