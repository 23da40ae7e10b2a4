//! Downstream tasks: what users care about beyond perplexity, scored on the (edited) model.
//!
//! A task reads its data from `../shared/data` (or `$EDITGUARD_DATA`), turns each record into an item in the
//! task's prompt style and is scored by a shared scorer: loglikelihood multiple choice ([`choice`]) for PIQA,
//! HellaSwag, MMLU, SST-2, RTE, BoolQ and MuTual, and greedy reproduction of a continuation for LAMBADA. Adding a task is one file implementing [`Task`] and one row in
//! [`TASKS`]. Subsets are seeded samples of the items, so the same `limit` and seed always score the same items.

pub mod boolq;
pub mod choice;
pub mod hellaswag;
pub mod lambada;
pub mod mmlu;
pub mod mutual;
pub mod piqa;
pub mod rte;
pub mod sst2;

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::index::sample;
use serde::Serialize;

use crate::error::{Error, Result, ensure_finite};
use crate::model::LoadedModel;

pub use choice::{ChoiceItem, ChoicePrediction};

/// A downstream task.
pub trait Task: Send + Sync {
    /// All items of the evaluation split, in file order.
    fn items(&self, data_dir: Option<&Path>) -> Result<Vec<ChoiceItem>>;
}

/// How a task's items are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// The choice with the highest summed log-probability is the gold one.
    Acc,
    /// The choice with the highest log-probability per character is the gold one.
    AccNorm,
    /// MuTual's r@1: the same as `Acc`.
    RecallAt1,
    /// Greedy decoding reproduces the gold continuation token for token (LAMBADA).
    Greedy,
}

impl Metric {
    /// The metric's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::RecallAt1 => "r@1",
            Metric::Greedy => "acc",
        }
    }
}

/// One row of the task table.
pub struct TaskEntry {
    /// The name used in suites and on the command line.
    pub name: &'static str,
    /// The metric reported.
    pub metric: Metric,
    /// Prompt style and where it comes from.
    pub prompt: &'static str,
    /// Constructor.
    pub build: fn() -> Box<dyn Task>,
}

/// The task table: adding a task is one file plus one row here.
pub const TASKS: &[TaskEntry] = &[
    piqa::PIQA,
    hellaswag::HELLASWAG,
    lambada::LAMBADA,
    mmlu::MMLU_0_SHOT,
    mmlu::MMLU_5_SHOT,
    sst2::SST2,
    rte::RTE,
    boolq::BOOLQ,
    mutual::MUTUAL,
];

/// Looks a task up by name.
pub fn task_entry(name: &str) -> Result<&'static TaskEntry> {
    TASKS.iter().find(|t| t.name == name).ok_or_else(|| {
        let known: Vec<&str> = TASKS.iter().map(|t| t.name).collect();
        Error::invalid("(task)", "task", format!("unknown task `{name}`; expected one of {}", known.join(", ")))
    })
}

/// A task's score on a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskScore {
    /// Task name.
    pub task: String,
    /// Metric name.
    pub metric: String,
    /// The headline score: the value of `metric`.
    pub score: f64,
    /// Accuracy (the highest summed log-probability is right).
    pub acc: f64,
    /// Length-normalised accuracy (the highest log-probability per character is right).
    pub acc_norm: f64,
    /// The expected score of guessing uniformly among the choices (0 for greedy generation).
    pub random_floor: f64,
    /// Items scored.
    pub items: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Options of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Score a seeded sample of this many items (all when `None`).
    pub limit: Option<usize>,
    /// The sampling seed.
    pub seed: u64,
    /// Tokens per forward pass.
    pub token_budget: usize,
    /// Data directory override.
    pub data_dir: Option<PathBuf>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { limit: None, seed: 0, token_budget: 4096, data_dir: None }
    }
}

/// The items an evaluation scores: all, or a seeded sample of `limit` in file order.
pub fn select_items(items: Vec<ChoiceItem>, limit: Option<usize>, seed: u64) -> Vec<ChoiceItem> {
    match limit {
        Some(n) if n < items.len() => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut picked = sample(&mut rng, items.len(), n).into_vec();
            picked.sort_unstable();
            picked.into_iter().map(|i| items[i].clone()).collect()
        }
        _ => items,
    }
}

/// Scores one task on `model`.
pub fn evaluate(model: &LoadedModel, entry: &TaskEntry, options: &EvalOptions) -> Result<TaskScore> {
    let started = Instant::now();
    let items = select_items((entry.build)().items(options.data_dir.as_deref())?, options.limit, options.seed);
    if items.is_empty() {
        return Err(Error::Dataset { name: entry.name.to_string(), message: "no items to score".into() });
    }
    let predictions = choice::predict(model, &items, options.token_budget)?;
    let n = items.len() as f64;
    let right = |pick: fn(&ChoicePrediction) -> usize| {
        items.iter().zip(&predictions).filter(|(item, p)| pick(p) == item.gold).count() as f64 / n
    };
    let (acc, acc_norm) = (right(|p| p.predicted), right(|p| p.predicted_norm));
    let uniform_guess = items.iter().map(|i| 1.0 / i.choices.len() as f64).sum::<f64>() / n;
    let (score, floor) = match entry.metric {
        Metric::Acc | Metric::RecallAt1 => (acc, uniform_guess),
        Metric::AccNorm => (acc_norm, uniform_guess),
        Metric::Greedy => {
            let greedy = items.iter().zip(&predictions).filter(|(item, p)| p.greedy[item.gold]).count();
            (greedy as f64 / n, 0.0)
        }
    };
    Ok(TaskScore {
        task: entry.name.to_string(),
        metric: entry.metric.name().to_string(),
        score: ensure_finite("task score", score)?,
        acc,
        acc_norm,
        random_floor: floor,
        items: items.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads a data file of a task, naming it in errors.
pub fn read_data_file(data_dir: Option<&Path>, relative: &str) -> Result<(PathBuf, String)> {
    let path = crate::data::data_dir(data_dir)?.join(relative);
    let text = crate::data::read_text(&path)?;
    Ok((path, text))
}

/// A record-level error of a task file.
pub fn bad_record(path: &Path, line: usize, message: impl Into<String>) -> Error {
    Error::Dataset { name: format!("{}:{line}", path.display()), message: message.into() }
}

/// A 0/1 label of a task file, or an error naming the file and line.
pub fn binary_label(path: &Path, line: usize, text: &str) -> Result<usize> {
    match text.trim() {
        "0" => Ok(0),
        "1" => Ok(1),
        other => Err(bad_record(path, line, format!("expected label 0 or 1, found `{other}`"))),
    }
}
