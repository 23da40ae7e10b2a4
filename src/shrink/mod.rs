//! Shrinking a collapsing multi-edit test to a minimal reproducer (`editguard shrink`).
//!
//! A red sequential test of 50 edits says that the method broke the model, not which edits did it. [`shrink`] first
//! runs the test exactly as the harness does ([`measure_edits`]) to find its first collapsing checkpoint, then keeps
//! only what can matter: for kept settings (`sequential`, `batch-sequential`) the edits up to that checkpoint, for
//! `batch` the collapsing batch. It then minimises that list with delta debugging ([`ddmin`]), keeping the order of
//! the edits: each candidate list is applied as the setting applies edits (kept one after another, or in batches of
//! the suite's size, or as one batch), measured after every operation with the harness's own checkpoint and verdict
//! code, stopped at the first collapse and restored. The result still collapses and loses that property when any
//! one edit is removed. [`suite_text`] writes it as a suite (check after every operation), so the reproducer is one
//! `cargo test` away.

pub mod ddmin;

use std::fmt::Write as _;
use std::time::Instant;

use crate::cases::write::{case_name, expect_block, inline_case, quoted};
use crate::cases::{Outcome, Setting, Suite};
use crate::error::{Error, Result};
use crate::harness::baseline::{corpus_sentences, for_edit_test};
use crate::harness::context::HarnessContext;
use crate::harness::execute::{measure_checkpoint, measure_edits};
use crate::harness::verdict::{Finding, judge_checkpoint};
use crate::methods::{AppliedEdit, EditEnv, EditMethod, EditRequest, build_method};
use crate::metrics::edit_quality::locality_baseline;
use crate::model::LoadedModel;
use crate::thresholds::Thresholds;

/// The test to shrink: a multi-edit suite, a method and a model.
#[derive(Debug, Clone)]
pub struct ShrinkTarget {
    /// The suite.
    pub suite: Suite,
    /// Method name.
    pub method: String,
    /// Model id.
    pub model: String,
}

impl ShrinkTarget {
    /// The harness's name of the test.
    pub fn test_name(&self) -> String {
        let case = self.suite.trial_cases().into_iter().next().unwrap_or_default();
        format!("{}::{}::{}::{}::{case}", self.suite.setting.name(), self.method, self.model, self.suite.name)
    }
}

/// What a shrink found.
#[derive(Debug, Clone)]
pub struct ShrinkReport {
    /// The test shrunk.
    pub test: String,
    /// Edits of the original test.
    pub original_edits: usize,
    /// Edits applied when the original run's collapse was seen.
    pub collapsed_at: usize,
    /// Mean perplexity at the original collapse.
    pub original_ppl: f64,
    /// The minimal list, in the original order.
    pub minimal: Vec<EditRequest>,
    /// Mean perplexity when the minimal run collapsed.
    pub minimal_ppl: f64,
    /// The unedited baseline.
    pub baseline_ppl: f64,
    /// The thresholds in force.
    pub thresholds: Thresholds,
    /// Runs of the method in all: the original test plus every candidate list tried.
    pub runs: usize,
    /// Edit operations applied in all.
    pub edits_applied: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl ShrinkReport {
    /// One line: where the original collapsed and what the reproducer does.
    pub fn headline(&self) -> String {
        format!(
            "collapsed at edit {} of {} (ppl {:.1}); these {} edits collapse at ppl {:.1} ({:.2}x baseline {:.2})",
            self.collapsed_at,
            self.original_edits,
            self.original_ppl,
            self.minimal.len(),
            self.minimal_ppl,
            self.minimal_ppl / self.baseline_ppl,
            self.baseline_ppl
        )
    }
}

/// Shrinks `target`; `progress` receives one line per run.
pub fn shrink(context: &HarnessContext, target: &ShrinkTarget, progress: &mut dyn FnMut(&str)) -> Result<ShrinkReport> {
    let started = Instant::now();
    let suite = &target.suite;
    if suite.setting == Setting::Single {
        return Err(Error::invalid(
            suite.path.display().to_string(),
            "setting",
            "a single-setting test edits one case; there is nothing to shrink (shrink sequential, batch and \
             batch-sequential tests)",
        ));
    }
    let test = target.test_name();
    progress(&format!("running {test} as the harness does"));
    let case = suite.trial_cases().remove(0);
    let original = measure_edits(context, suite, &target.method, &target.model, &case, None)?;
    let collapse = original.findings.iter().find_map(|f| match f {
        Finding::Collapse { edits, value, .. } => Some((*edits, *value)),
        _ => None,
    });
    let Some((collapsed_at, original_ppl)) = collapse else {
        return Err(Error::invalid(
            &test,
            "outcome",
            format!("the test does not collapse ({}); shrink reduces collapsing runs", original.record.outcome),
        ));
    };
    let requests = suite.requests(context.data_dir.as_deref(), None)?;
    let candidates: Vec<EditRequest> = if suite.setting.keeps_edits() {
        requests[..collapsed_at].to_vec()
    } else {
        let start = (collapsed_at - 1) / suite.batch_size * suite.batch_size;
        requests[start..collapsed_at].to_vec()
    };
    progress(&format!(
        "{test}: collapsed at edit {collapsed_at} of {} (ppl {original_ppl:.1}); minimising {} edits",
        requests.len(),
        candidates.len()
    ));
    let mut model = context.load_model(&target.model)?;
    let method = build_method(&context.registry, &target.model, &target.method)?;
    let sentences = corpus_sentences(context, &suite.corpus)?;
    let (baseline, _) = for_edit_test(context, &model, &suite.corpus, &sentences)?;
    let runner = Runner {
        method: method.as_ref(),
        env: EditEnv { data_dir: context.data_dir.clone() },
        sentences,
        baseline_ppl: baseline.mean_ppl,
        thresholds: original.thresholds,
        setting: suite.setting,
        batch_size: suite.batch_size,
    };
    let mut runs = 1usize;
    let mut edits_applied = original.total_edits;
    let mut collapse_ppl = std::collections::HashMap::new();
    let minimised = ddmin::ddmin(candidates.len(), &mut |subset: &[usize]| -> Result<bool> {
        let list: Vec<EditRequest> = subset.iter().map(|&i| candidates[i].clone()).collect();
        let outcome = runner.run(&mut model, &list)?;
        runs += 1;
        edits_applied += outcome.applied;
        let verdict = match outcome.collapse_ppl {
            Some(ppl) => {
                collapse_ppl.insert(subset.to_vec(), ppl);
                format!("collapses (ppl {ppl:.1})")
            }
            None => "holds".to_string(),
        };
        progress(&format!("run {runs}: {} edits [{}] {verdict}", list.len(), ids(&list)));
        Ok(outcome.collapse_ppl.is_some())
    })?;
    let minimal: Vec<EditRequest> = minimised.indices.iter().map(|&i| candidates[i].clone()).collect();
    let minimal_ppl = collapse_ppl.get(&minimised.indices).copied().unwrap_or(original_ppl);
    Ok(ShrinkReport {
        test,
        original_edits: requests.len(),
        collapsed_at,
        original_ppl,
        minimal,
        minimal_ppl,
        baseline_ppl: baseline.mean_ppl,
        thresholds: original.thresholds,
        runs,
        edits_applied,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn ids(requests: &[EditRequest]) -> String {
    requests.iter().map(|r| r.id.as_str()).collect::<Vec<_>>().join(", ")
}

/// Applies candidate lists the way the suite's setting applies edits.
struct Runner<'a> {
    method: &'a dyn EditMethod,
    env: EditEnv,
    sentences: Vec<String>,
    baseline_ppl: f64,
    thresholds: Thresholds,
    setting: Setting,
    batch_size: usize,
}

struct RunOutcome {
    collapse_ppl: Option<f64>,
    applied: usize,
}

impl Runner<'_> {
    /// Applies `list` (kept, checked after every operation, stopped at the first collapse) and restores the model.
    fn run(&self, model: &mut LoadedModel, list: &[EditRequest]) -> Result<RunOutcome> {
        let batch = match self.setting {
            Setting::Sequential => 1,
            Setting::Batch => list.len().max(1),
            Setting::BatchSequential | Setting::Single => self.batch_size,
        };
        let locality = locality_baseline(model, list)?;
        let mut applied: Vec<AppliedEdit> = Vec::new();
        let mut outcome = RunOutcome { collapse_ppl: None, applied: 0 };
        let result = (|| -> Result<()> {
            for (index, chunk) in list.chunks(batch).enumerate() {
                let edit = self.method.apply(model, chunk, &self.env)?;
                let relative_norm = edit.max_relative_norm();
                applied.push(edit);
                outcome.applied += chunk.len();
                let done = index * batch + chunk.len();
                let slice = crate::metrics::edit_quality::LocalityBaseline {
                    predictions: locality.predictions[..done].to_vec(),
                };
                let (checkpoint, _) = measure_checkpoint(
                    model,
                    &list[..done],
                    &slice,
                    &self.sentences,
                    self.baseline_ppl,
                    relative_norm,
                    done,
                )?;
                match judge_checkpoint(&checkpoint, &self.thresholds, self.baseline_ppl) {
                    Some(Finding::Collapse { value, .. }) => {
                        outcome.collapse_ppl = Some(value);
                        return Ok(());
                    }
                    Some(Finding::NonFinite { metric, .. }) => {
                        return Err(Error::invalid(
                            "(shrink)",
                            "metrics",
                            format!("{metric} is not finite after {done} edits; shrink keeps collapses, not NaN"),
                        ));
                    }
                    _ => {}
                }
            }
            Ok(())
        })();
        while let Some(edit) = applied.pop() {
            edit.undo(model)?;
        }
        result.map(|()| outcome)
    }
}

/// The reproducer as a suite file (the suite's thresholds and corpus, check after every operation, tier default).
pub fn suite_text(target: &ShrinkTarget, report: &ShrinkReport) -> Result<String> {
    let suite = &target.suite;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Shrunk by `editguard shrink` from {}: {} of its {} edits still collapse {} ({} runs, {} edit operations, {:.1} min).",
        report.test,
        report.minimal.len(),
        report.original_edits,
        target.model,
        report.runs,
        report.edits_applied,
        report.seconds / 60.0
    );
    let _ = writeln!(
        text,
        "description = {}",
        quoted(&format!(
            "Minimal reproducer of {}: {} of its {} edits collapse {}",
            report.test,
            report.minimal.len(),
            report.original_edits,
            target.model
        ))
    );
    let _ = writeln!(text, "setting = {}", quoted(suite.setting.name()));
    let _ = writeln!(text, "methods = [{}]", quoted(&target.method));
    let _ = writeln!(text, "models = [{}]", quoted(&target.model));
    let _ = writeln!(text, "tier = \"default\"");
    let _ = writeln!(text, "corpus = {}", quoted(&suite.corpus));
    if suite.setting.batches() {
        let _ = writeln!(text, "batch_size = {}", suite.batch_size.min(report.minimal.len()));
    }
    if suite.setting.keeps_edits() {
        let _ = writeln!(text, "check_every = 1");
    }
    let overrides =
        toml::to_string(&suite.thresholds).map_err(|e| Error::invalid("(shrink)", "thresholds", e.to_string()))?;
    if !overrides.trim().is_empty() {
        let _ = write!(text, "\n[thresholds]\n{overrides}");
    }
    let dataset = suite.dataset.as_ref().map(|d| d.name.clone());
    for request in &report.minimal {
        let (name, source) = match &dataset {
            Some(d) => {
                (case_name(d, &request.id, &request.subject, &request.target_new), format!("{d} case {}", request.id))
            }
            None => (request.id.clone(), format!("case {} of {}", request.id, suite.path.display())),
        };
        text.push_str(&inline_case(&name, request, &source, None));
    }
    let reason = format!("shrunk from {}: {}", report.test, report.headline());
    text.push_str(&expect_block(Outcome::Collapse, &target.method, None, &reason));
    Ok(text)
}
