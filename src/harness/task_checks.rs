//! Downstream task scores in the harness: unedited baselines and the check of an edited model against them.
//!
//! A suite that names `tasks` scores a seeded sample of `task_items` items of each (seed `task_seed`). Each
//! (model × task × sample) has a baseline test, `baseline::<model>::<task>-n<items>-s<seed>`, that scores the unedited
//! model and compares with its accepted snapshot (score and random-guess floor; tolerance `baseline_tolerance`). An
//! edit test scores the same items on the edited model after its last operation and reports a finding when a score
//! falls more than `task_tolerance` below the baseline; a collapsed model is not scored (the collapse already decides).

use serde::{Deserialize, Serialize};

use crate::cases::Suite;
use crate::error::Result;
use crate::model::LoadedModel;
use crate::tasks::{EvalOptions, evaluate, task_entry};

use super::context::{HarnessContext, SnapshotInfo};
use super::trial::{TrialSpec, snapshot_name_of, task_baseline_name};
use super::verdict::{Finding, judge_task};
use crate::thresholds;

/// An unedited model's score on a task sample (a baseline snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskBaseline {
    /// Task name.
    pub task: String,
    /// Metric name.
    pub metric: String,
    /// The score.
    pub score: f64,
    /// The random-guess floor of the sample.
    pub random_floor: f64,
    /// Items scored.
    pub items: usize,
    /// Sample seed.
    pub seed: u64,
}

/// An edited model's score on a task, beside its baseline (stored in the edit test's snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCheck {
    /// Task name.
    pub task: String,
    /// Metric name.
    pub metric: String,
    /// The edited model's score.
    pub score: f64,
    /// The unedited model's score.
    pub baseline: f64,
    /// The random-guess floor.
    pub random_floor: f64,
}

/// Scores `model` on a seeded sample of a task.
pub fn measure(
    context: &HarnessContext,
    model: &LoadedModel,
    task: &str,
    items: usize,
    seed: u64,
) -> Result<TaskBaseline> {
    let options = EvalOptions { limit: Some(items), seed, data_dir: context.data_dir.clone(), ..Default::default() };
    let score = evaluate(model, task_entry(task)?, &options)?;
    Ok(TaskBaseline {
        task: score.task,
        metric: score.metric,
        score: score.score,
        random_floor: score.random_floor,
        items: score.items,
        seed,
    })
}

/// Runs a task baseline test: score the unedited model, compare with the accepted snapshot.
pub fn run_baseline(
    context: &HarnessContext,
    spec: &TrialSpec,
    model_id: &str,
    task: &str,
    items: usize,
    seed: u64,
) -> std::result::Result<(), String> {
    let fail = |e: crate::Error| format!("{}: {e}", spec.name);
    let thresholds = thresholds::resolve(&context.registry, model_id, &Default::default()).map_err(fail)?;
    let model = context.load_model(model_id).map_err(fail)?;
    let baseline = measure(context, &model, task, items, seed).map_err(fail)?;
    let info = SnapshotInfo::unedited(&model);
    context.snapshots.check(&spec.snapshot_name(), &spec.name, &baseline, &info, thresholds.baseline_tolerance).map_err(
        |message| {
            format!(
                "{}: unedited {task} {} {:.4} (floor {:.4}, {} items): {message}",
                spec.name, baseline.metric, baseline.score, baseline.random_floor, baseline.items
            )
        },
    )
}

/// The baselines an edit test uses, each with where it came from: the accepted snapshot, or a measurement of the
/// (still unedited) model when none is accepted yet.
pub fn baselines_for_edit_test(
    context: &HarnessContext,
    model: &LoadedModel,
    suite: &Suite,
) -> Result<Vec<(TaskBaseline, String)>> {
    suite
        .tasks
        .iter()
        .map(|task| {
            let name = snapshot_name_of(&task_baseline_name(&model.id, task, suite.task_items, suite.task_seed));
            match context.snapshots.accepted::<TaskBaseline>(&name)? {
                Some(accepted) => Ok((accepted, format!("accepted snapshot {name}"))),
                None => Ok((
                    measure(context, model, task, suite.task_items, suite.task_seed)?,
                    format!("measured now: no accepted snapshot {name} yet (run its baseline test)"),
                )),
            }
        })
        .collect()
}

/// Scores the edited model on every baseline's sample; a score more than `tolerance` below its baseline is a finding.
pub fn check_edited(
    context: &HarnessContext,
    model: &LoadedModel,
    baselines: &[(TaskBaseline, String)],
    tolerance: f64,
) -> Result<(Vec<TaskCheck>, Vec<Finding>)> {
    let (mut checks, mut findings) = (Vec::new(), Vec::new());
    for (baseline, origin) in baselines {
        let edited = measure(context, model, &baseline.task, baseline.items, baseline.seed)?;
        let check = TaskCheck {
            task: baseline.task.clone(),
            metric: baseline.metric.clone(),
            score: edited.score,
            baseline: baseline.score,
            random_floor: baseline.random_floor,
        };
        findings.extend(judge_task(&check, tolerance, origin));
        checks.push(check);
    }
    Ok((checks, findings))
}
