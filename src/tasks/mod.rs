//! Downstream tasks: what users care about beyond perplexity, scored on the (edited) model.
//!
//! A task reads its data from `../shared/data` (or `$EDITGUARD_DATA`), turns each record into an item in the
//! task's prompt style and is scored by one of two shared scorers: loglikelihood multiple choice ([`choice`]) for
//! PIQA, HellaSwag, MMLU, SST-2, RTE, BoolQ and MuTual in lm-evaluation-harness's style (and greedy reproduction of a
//! continuation for LAMBADA), or greedy generation scored against references ([`generated`]) for NQ-open, SQuAD2.0,
//! GSM8K, SAMSum, CoNLL-2003 and the Gu et al. (2024) prompt variants of SST-2, RTE, BoolQ and MuTual. Adding a task
//! is one file implementing [`Task`] and one row in [`TASKS`]. Subsets are seeded samples of the items, so the same
//! `limit` and seed always score the same items.

pub mod boolq;
pub mod choice;
pub mod conll2003;
pub mod generated;
pub mod gsm8k;
pub mod hellaswag;
pub mod lambada;
pub mod mmlu;
pub mod mutual;
pub mod nq_open;
pub mod piqa;
pub mod rte;
pub mod samsum;
pub mod squad2;
pub mod sst2;
pub mod text_metrics;

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::index::sample;
use serde::Serialize;

use crate::error::{Error, Result, ensure_finite};
use crate::model::LoadedModel;

pub use choice::{ChoiceItem, ChoicePrediction};
pub use generated::GenerationItem;

/// A downstream task.
pub trait Task: Send + Sync {
    /// All items of the evaluation split, in file order.
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems>;
}

/// The items of a task, in the form its scorer takes.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskItems {
    /// Scored by loglikelihood of each choice.
    Choice(Vec<ChoiceItem>),
    /// Scored on greedily generated text.
    Generation(Vec<GenerationItem>),
}

impl TaskItems {
    /// Number of items.
    pub fn len(&self) -> usize {
        match self {
            TaskItems::Choice(items) => items.len(),
            TaskItems::Generation(items) => items.len(),
        }
    }

    /// True when there is no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A seeded sample of `limit` items in file order (all when `None` or more than there are).
    pub fn select(self, limit: Option<usize>, seed: u64) -> TaskItems {
        match self {
            TaskItems::Choice(items) => TaskItems::Choice(select_items(items, limit, seed)),
            TaskItems::Generation(items) => TaskItems::Generation(select_items(items, limit, seed)),
        }
    }
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
    /// The generated answer equals a reference after lm-eval's normalisation (NQ-open).
    ExactMatch,
    /// SQuAD's token-overlap F1 with the best reference; an unanswerable question's reference is the empty answer.
    F1,
    /// The number after `####` in the generated solution equals the reference's (GSM8K strict match).
    SolveRate,
    /// Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-scores against the reference summary (SAMSum).
    Rouge,
    /// Micro-averaged F1 of the entities listed against the gold entities (CoNLL-2003).
    EntityF1,
    /// The first generated word is the gold label (Gu et al.'s classification prompts).
    LabelWord,
}

impl Metric {
    /// The metric's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::RecallAt1 => "r@1",
            Metric::Greedy => "acc",
            Metric::ExactMatch => "exact_match",
            Metric::F1 => "f1",
            Metric::SolveRate => "solve_rate",
            Metric::Rouge => "rouge_mean",
            Metric::EntityF1 => "entity_f1",
            Metric::LabelWord => "acc",
        }
    }
}

/// Which prompt a task with two styles uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptStyle {
    /// lm-evaluation-harness's prompt, scored by loglikelihood of each choice.
    LmEval,
    /// Gu et al. (2024)'s zero-shot instruction prompt, answered by greedy generation and scored on the label word.
    Gu,
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
    mmlu::MMLU_0_SHOT,
    mmlu::MMLU_5_SHOT,
    sst2::SST2,
    sst2::SST2_GU,
    rte::RTE,
    rte::RTE_GU,
    boolq::BOOLQ,
    boolq::BOOLQ_GU,
    mutual::MUTUAL,
    mutual::MUTUAL_GU,
    lambada::LAMBADA,
    nq_open::NQ_OPEN,
    squad2::SQUAD2,
    gsm8k::GSM8K,
    samsum::SAMSUM,
    conll2003::CONLL2003,
];

/// Looks a task up by name.
pub fn task_entry(name: &str) -> Result<&'static TaskEntry> {
    TASKS.iter().find(|t| t.name == name).ok_or_else(|| {
        let known: Vec<&str> = TASKS.iter().map(|t| t.name).collect();
        Error::invalid("(task)", "task", format!("unknown task `{name}`; expected one of {}", known.join(", ")))
    })
}

/// The tasks named on a command line: `all`, or comma-separated names of the table.
pub fn entries_named(names: &[String]) -> Result<Vec<&'static TaskEntry>> {
    if names.iter().any(|n| n == "all") {
        return Ok(TASKS.iter().collect());
    }
    names.iter().map(|n| task_entry(n)).collect()
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
    /// Multiple choice: accuracy (the highest summed log-probability is right).
    pub acc: Option<f64>,
    /// Multiple choice: length-normalised accuracy (the highest log-probability per character is right).
    pub acc_norm: Option<f64>,
    /// The expected score of guessing uniformly among the choices or labels (0 for free generation).
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
pub fn select_items<T: Clone>(items: Vec<T>, limit: Option<usize>, seed: u64) -> Vec<T> {
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

/// A score and the random-guess floor, as a scorer computes them.
pub struct Scored {
    /// The value of the task's metric.
    pub score: f64,
    /// Multiple choice only: plain and length-normalised accuracy.
    pub accuracies: Option<(f64, f64)>,
    /// The random-guess floor.
    pub floor: f64,
}

/// Scores one task on `model`: its seeded item sample ([`load_items`]) scored by [`score_items`]; the seconds include
/// reading the data.
pub fn evaluate(model: &LoadedModel, entry: &TaskEntry, options: &EvalOptions) -> Result<TaskScore> {
    let started = Instant::now();
    let items = load_items(entry, options)?;
    let mut score = score_items(model, entry, &items, options.token_budget)?;
    score.seconds = started.elapsed().as_secs_f64();
    Ok(score)
}

/// The items an evaluation with `options` scores: the task's seeded sample of `limit` items (all without a limit).
pub fn load_items(entry: &TaskEntry, options: &EvalOptions) -> Result<TaskItems> {
    let items = (entry.build)().items(options.data_dir.as_deref())?.select(options.limit, options.seed);
    if items.is_empty() {
        return Err(Error::Dataset { name: entry.name.to_string(), message: "no items to score".into() });
    }
    Ok(items)
}

/// Scores already loaded items of a task on `model` (e.g. the same sample after every edit).
pub fn score_items(
    model: &LoadedModel,
    entry: &TaskEntry,
    items: &TaskItems,
    token_budget: usize,
) -> Result<TaskScore> {
    let started = Instant::now();
    let scored = match items {
        TaskItems::Choice(items) => choice::score(model, items, entry.metric, token_budget)?,
        TaskItems::Generation(items) => generated::score(model, items, entry.metric, token_budget)?,
    };
    Ok(TaskScore {
        task: entry.name.to_string(),
        metric: entry.metric.name().to_string(),
        score: ensure_finite(&format!("{} {}", entry.name, entry.metric.name()), scored.score)?,
        acc: scored.accuracies.map(|a| a.0),
        acc_norm: scored.accuracies.map(|a| a.1),
        random_floor: scored.floor,
        items: items.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads a data file of a task, naming it in errors.
pub fn read_data_file(data_dir: Option<&Path>, relative: &str) -> Result<(PathBuf, String)> {
    let path = crate::data::data_file(data_dir, relative)?;
    let text = crate::data::read_text(&path)?;
    Ok((path, text))
}

/// The records of a JSON-lines task file with their line numbers (1-based); a line that does not parse is an error
/// naming file and line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(
    data_dir: Option<&Path>,
    relative: &str,
) -> Result<(PathBuf, Vec<(usize, T)>)> {
    let (path, text) = read_data_file(data_dir, relative)?;
    let records = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| Ok((i + 1, serde_json::from_str(line).map_err(|e| bad_record(&path, i + 1, e.to_string()))?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((path, records))
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
