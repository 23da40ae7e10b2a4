//! Running one edit test: apply the suite's edits with the method, measure at each checkpoint, judge, snapshot.
//!
//! The plan follows the suite's setting. `single` applies one case; `sequential` applies the edits one at a time and
//! keeps them; `batch` applies batches of `batch_size` requests in one operation each, every batch from the original
//! weights; `batch-sequential` keeps the batches. Kept settings measure after every `check_every` operations and
//! after the last, and stop at the first collapse. Each checkpoint records the mean and corpus perplexity on the
//! suite's corpus, the ratio to the unedited baseline, ‖ΔW‖/‖W‖ of everything kept so far, and edit quality on the
//! requests edited so far.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::cases::{Setting, Suite};
use crate::error::Result;
use crate::methods::{EditEnv, EditMethod, EditRequest, build_method, l2_norm};
use crate::metrics::edit_quality::{LocalityBaseline, locality_baseline, measure};
use crate::metrics::perplexity::{PerplexityOptions, perplexity};
use crate::model::{LoadedModel, WeightId};

use super::baseline::{corpus_sentences, for_edit_test};
use super::context::{HarnessContext, SnapshotInfo};
use super::task_checks::{TaskCheck, baselines_for_edit_test, check_edited};
use super::trial::TrialSpec;
use super::verdict::{
    Checkpoint, DiagnosisContext, Finding, diagnose, judge_checkpoint, judge_efficacy, meets, outcome_line,
};
use crate::thresholds::{self, Thresholds};

/// Wraps the method a test builds; the harness's own tests use it to break a method on purpose.
pub type MethodWrapper = dyn Fn(Box<dyn EditMethod>) -> Box<dyn EditMethod> + Send + Sync;

/// What an edit test records in its snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    /// The measured outcome ("held", "collapsed at edit 7 of 50", …); the expectation stays in the suite file.
    pub outcome: String,
    /// The unedited mean perplexity the ratio uses.
    pub baseline_ppl: f64,
    /// The measurements.
    pub checkpoints: Vec<Checkpoint>,
    /// Task scores after the last operation, when the suite names tasks and the model did not collapse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskCheck>,
}

/// The measured run of an edit test, before the verdict.
pub struct EditRun {
    /// The record (snapshot contents).
    pub record: EditRecord,
    /// The findings.
    pub findings: Vec<Finding>,
    /// Where the baseline came from.
    pub baseline_origin: String,
    /// The thresholds in force.
    pub thresholds: Thresholds,
    /// One line per edit request.
    pub cases: Vec<String>,
    /// Edits the plan applies in all.
    pub total_edits: usize,
    /// The snapshot info.
    pub info: SnapshotInfo,
}

/// Runs an edit test and returns `Ok` or the failure message (diagnosis and snapshot status).
pub fn run(
    context: &HarnessContext,
    spec: &TrialSpec,
    suite: &Suite,
    method: &str,
    model_id: &str,
    case: &str,
    wrapper: Option<&MethodWrapper>,
) -> std::result::Result<(), String> {
    let expected = suite.expected(method, model_id, case);
    let run = measure_edits(context, suite, method, model_id, case, wrapper)
        .map_err(|e| format!("{}: could not run: {e}", spec.name))?;
    let verdict = meets(&run.findings, expected.0);
    let snapshot = context.snapshots.check(
        &spec.snapshot_name(),
        &spec.name,
        &run.record,
        &run.info,
        run.thresholds.drift_tolerance,
    );
    let diagnosis_context = DiagnosisContext {
        test: &spec.name,
        corpus: &suite.corpus,
        baseline_ppl: run.record.baseline_ppl,
        baseline_origin: &run.baseline_origin,
        total_edits: run.total_edits,
        thresholds: &run.thresholds,
        expected,
        cases: &run.cases,
        tasks: &run.record.tasks,
    };
    match (verdict, snapshot) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(headline), snapshot) => {
            let mut message = diagnose(&headline, &diagnosis_context, &run.findings, &run.record.checkpoints);
            if let Err(s) = snapshot {
                message.push_str(&format!("  snapshot     {s}\n"));
            }
            Err(message)
        }
        (Ok(()), Err(s)) => {
            let headline = format!("verdict as expected ({}), but {s}", run.record.outcome);
            Err(diagnose(&headline, &diagnosis_context, &run.findings, &run.record.checkpoints))
        }
    }
}

/// Applies the suite's plan and measures; no verdict, no snapshot.
pub fn measure_edits(
    context: &HarnessContext,
    suite: &Suite,
    method_name: &str,
    model_id: &str,
    case: &str,
    wrapper: Option<&MethodWrapper>,
) -> Result<EditRun> {
    let thresholds = thresholds::resolve(&context.registry, model_id, &suite.thresholds)?;
    let mut model = context.load_model(model_id)?;
    let mut method = build_method(&context.registry, model_id, method_name)?;
    if let Some(wrap) = wrapper {
        method = wrap(method);
    }
    let requests = suite.requests(context.data_dir.as_deref(), Some(case))?;
    let sentences = corpus_sentences(context, &suite.corpus)?;
    let (baseline, baseline_origin) = for_edit_test(context, &model, &suite.corpus, &sentences)?;
    let locality = locality_baseline(&model, &requests)?;
    let task_baselines = baselines_for_edit_test(context, &model, suite)?;
    let mut tasks = Vec::new();
    let env = EditEnv { data_dir: context.data_dir.clone() };
    let plan = Plan::of(suite, requests.len());
    let mut kept: HashMap<WeightId, Tensor> = HashMap::new();
    let mut checkpoints = Vec::new();
    let mut findings = Vec::new();
    let mut took = Vec::new();
    for (index, chunk) in requests.chunks(plan.batch_size).enumerate() {
        let start = index * plan.batch_size;
        let edit = method.apply(&mut model, chunk, &env)?;
        let relative_norm = if plan.keep {
            for change in &edit.changes {
                let sum = match kept.remove(&change.weight) {
                    Some(previous) => (previous + change.delta.to_dtype(DType::F32)?)?,
                    None => change.delta.to_dtype(DType::F32)?,
                };
                kept.insert(change.weight, sum);
            }
            kept_relative_norm(&model, &kept)?
        } else {
            edit.max_relative_norm()
        };
        let done = start + chunk.len();
        let last = done == requests.len();
        if !plan.keep || (index + 1) % plan.check_every == 0 || last {
            let (measured, local) = if plan.keep { (&requests[..done], 0) } else { (chunk, start) };
            let slice = LocalityBaseline { predictions: locality.predictions[local..local + measured.len()].to_vec() };
            let (checkpoint, quality_took) =
                measure_checkpoint(&model, measured, &slice, &sentences, baseline.mean_ppl, relative_norm, done)?;
            if plan.keep {
                took = quality_took;
            } else {
                took.extend(quality_took);
            }
            let finding = judge_checkpoint(&checkpoint, &thresholds, baseline.mean_ppl);
            checkpoints.push(checkpoint);
            let collapsed_before = findings.iter().any(|f| matches!(f, Finding::Collapse { .. }));
            match finding {
                // A suite drawing the whole curve keeps editing after the first crossing (recorded once).
                Some(Finding::Collapse { .. }) if !suite.stop_at_collapse && collapsed_before => {}
                Some(finding @ Finding::Collapse { .. }) if !suite.stop_at_collapse => findings.push(finding),
                Some(finding) => {
                    findings.push(finding);
                    break;
                }
                None => {}
            }
            let collapsed = findings.iter().any(|f| matches!(f, Finding::Collapse { .. }));
            if last && !collapsed && !task_baselines.is_empty() {
                let (checks, drops) = check_edited(context, &model, &task_baselines, thresholds.task_tolerance)?;
                tasks = checks;
                findings.extend(drops);
            }
        }
        if !plan.keep {
            edit.undo(&mut model)?;
        }
    }
    if !findings.iter().any(|f| matches!(f, Finding::Collapse { .. } | Finding::NonFinite { .. }))
        && let Some(finding) = judge_efficacy(share(&took), &thresholds)
    {
        findings.push(finding);
    }
    let record = EditRecord {
        outcome: outcome_line(&findings, requests.len()),
        baseline_ppl: baseline.mean_ppl,
        checkpoints,
        tasks,
    };
    let mut info = SnapshotInfo::unedited(&model);
    info.method = Some(method_name.to_string());
    info.hyper_parameters = context.registry.get(model_id)?.methods.get(method_name).cloned();
    info.suite = Some(describe_plan(suite));
    info.thresholds = Some(thresholds);
    Ok(EditRun {
        record,
        findings,
        baseline_origin,
        thresholds,
        cases: requests.iter().map(case_line).collect(),
        total_edits: requests.len(),
        info,
    })
}

/// Measures an edited model at a checkpoint, exactly as every edit test does: edit quality on `measured` (locality
/// against `locality`, taken before the edits), mean and corpus perplexity on `sentences`, and the ratio to
/// `baseline_ppl`. Returns the checkpoint and, per measured request, whether its edit took. `editguard mine` measures
/// its single edits with this too, so a mined verdict is the harness's verdict.
pub fn measure_checkpoint(
    model: &LoadedModel,
    measured: &[EditRequest],
    locality: &LocalityBaseline,
    sentences: &[String],
    baseline_ppl: f64,
    relative_norm: f64,
    edits: usize,
) -> Result<(Checkpoint, Vec<bool>)> {
    let quality = measure(model, measured, locality)?;
    let report = perplexity(model, sentences, PerplexityOptions::default(), None)?;
    let checkpoint = Checkpoint {
        edits,
        mean_ppl: report.mean_sentence_ppl,
        corpus_ppl: report.corpus_ppl,
        ppl_ratio: report.mean_sentence_ppl / baseline_ppl,
        relative_norm,
        efficacy: share(&quality.took),
        efficacy_accuracy: quality.efficacy_accuracy,
        generalization: quality.generalization,
        locality: quality.locality,
    };
    Ok((checkpoint, quality.took))
}

struct Plan {
    batch_size: usize,
    keep: bool,
    check_every: usize,
}

impl Plan {
    fn of(suite: &Suite, requests: usize) -> Plan {
        match suite.setting {
            Setting::Single => Plan { batch_size: requests.max(1), keep: false, check_every: 1 },
            Setting::Sequential => Plan { batch_size: 1, keep: true, check_every: suite.check_every },
            Setting::Batch => Plan { batch_size: suite.batch_size, keep: false, check_every: 1 },
            Setting::BatchSequential => {
                Plan { batch_size: suite.batch_size, keep: true, check_every: suite.check_every }
            }
        }
    }
}

fn describe_plan(suite: &Suite) -> String {
    let mut text = format!("{} ({})", suite.name, suite.setting.name());
    if suite.setting != Setting::Single {
        text.push_str(&format!(", {} edits", suite.edits));
    }
    if suite.setting.batches() {
        text.push_str(&format!(", batch size {}", suite.batch_size));
    }
    if suite.setting.keeps_edits() {
        text.push_str(&format!(", check every {}", suite.check_every));
        if !suite.stop_at_collapse {
            text.push_str(", measured past a collapse");
        }
    }
    if !suite.tasks.is_empty() {
        text.push_str(&format!(
            ", tasks {} ({} items, seed {})",
            suite.tasks.join("/"),
            suite.task_items,
            suite.task_seed
        ));
    }
    if let Some(dataset) = &suite.dataset {
        match dataset.sample {
            Some(n) => text.push_str(&format!(", {} sample of {n} (seed {})", dataset.name, dataset.seed)),
            None => text.push_str(&format!(", {} ids", dataset.name)),
        }
    }
    text
}

/// Largest ‖ΣΔW‖/‖W₀‖ over the kept changes, with W₀ = W − ΣΔW.
fn kept_relative_norm(model: &LoadedModel, kept: &HashMap<WeightId, Tensor>) -> Result<f64> {
    let mut largest: f64 = 0.0;
    for (weight, delta) in kept {
        let current = model.network.weight(*weight)?.to_dtype(DType::F32)?;
        let original = (current - delta)?;
        largest = largest.max(l2_norm(delta)? / l2_norm(&original)?.max(f64::MIN_POSITIVE));
    }
    Ok(largest)
}

fn share(flags: &[bool]) -> f64 {
    flags.iter().filter(|&&f| f).count() as f64 / flags.len().max(1) as f64
}

fn case_line(request: &EditRequest) -> String {
    let was = request.ground_truth.as_ref().map(|g| format!(" (was \"{g}\")")).unwrap_or_default();
    format!(
        "[{}] \"{}\" → \"{}\"{was}, subject \"{}\"",
        request.id,
        request.prompt_text(),
        request.target_new,
        request.subject
    )
}
