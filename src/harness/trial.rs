//! Test names and the test matrix.
//!
//! Every (case × method × model) of a single-setting suite and every (suite × method × model) of a multi-edit suite is
//! one test, named `setting::method::model::suite::case`, e.g.
//! `single::rome::smollm2-135m::hardedit::france-pyramids` or `sequential::ft-l-inf::smollm2-135m::counterfact-normal::n50`.
//! Each (model × corpus) the suites use also gets a test of the unedited model against its accepted baseline,
//! `baseline::smollm2-135m::me-ppl-50`, and each (model × task sample) a suite asserts a task baseline test,
//! `baseline::smollm2-135m::sst2-n100-s0`. The matrix is built from `cases/*.toml` and `models.toml` alone: listing
//! loads no model and reads no dataset.

use std::collections::BTreeMap;

use crate::cases::{Setting, Suite, Tier};

/// What a test does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrialKind {
    /// Measures the unedited model and compares with its accepted baseline snapshot.
    Baseline {
        /// Model id.
        model: String,
        /// Perplexity corpus name.
        corpus: String,
    },
    /// Scores the unedited model on a seeded task sample and compares with its accepted baseline snapshot.
    TaskBaseline {
        /// Model id.
        model: String,
        /// Task name.
        task: String,
        /// Items in the sample.
        items: usize,
        /// Sample seed.
        seed: u64,
    },
    /// Applies a suite's edits with a method and judges the edited model.
    Edit {
        /// Index into the suite list.
        suite: usize,
        /// Method name.
        method: String,
        /// Model id.
        model: String,
        /// Case name (single suites) or `n<edits>[-b<batch>]`.
        case: String,
    },
}

/// One generated test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialSpec {
    /// The stable `::`-separated name.
    pub name: String,
    /// What it does.
    pub kind: TrialKind,
    /// True for heavy-tier tests (ignored unless asked for).
    pub heavy: bool,
}

impl TrialSpec {
    /// The snapshot file stem of this test (`::` becomes `__`).
    pub fn snapshot_name(&self) -> String {
        snapshot_name_of(&self.name)
    }
}

/// The snapshot file stem of a test name (`::` becomes `__`).
pub fn snapshot_name_of(test_name: &str) -> String {
    test_name.replace("::", "__")
}

/// The name of a model's baseline test on a corpus.
pub fn baseline_name(model: &str, corpus: &str) -> String {
    format!("baseline::{model}::{corpus}")
}

/// The name of a model's baseline test on a seeded task sample.
pub fn task_baseline_name(model: &str, task: &str, items: usize, seed: u64) -> String {
    format!("baseline::{model}::{task}-n{items}-s{seed}")
}

/// The full matrix: baselines first, then each suite's tests in file order.
pub fn plan(suites: &[Suite]) -> Vec<TrialSpec> {
    let mut baselines: BTreeMap<(String, String), bool> = BTreeMap::new();
    let mut task_baselines: BTreeMap<(String, String, usize, u64), bool> = BTreeMap::new();
    let mut edits = Vec::new();
    for (index, suite) in suites.iter().enumerate() {
        for model in &suite.models {
            let cases = suite.trial_cases();
            let is_heavy = |method: &str, case: &str| suite.tier_of(method, model, case) == Tier::Heavy;
            // A baseline is heavy only when every test that needs it is.
            let heavy = suite.methods.iter().all(|method| cases.iter().all(|case| is_heavy(method, case)));
            let slot = baselines.entry((model.clone(), suite.corpus.clone())).or_insert(true);
            *slot &= heavy;
            for task in &suite.tasks {
                let key = (model.clone(), task.clone(), suite.task_items, suite.task_seed);
                *task_baselines.entry(key).or_insert(true) &= heavy;
            }
            for method in &suite.methods {
                for case in cases.iter().cloned() {
                    let heavy = is_heavy(method, &case);
                    edits.push(TrialSpec {
                        name: format!("{}::{method}::{model}::{}::{case}", suite.setting.name(), suite.name),
                        kind: TrialKind::Edit { suite: index, method: method.clone(), model: model.clone(), case },
                        heavy,
                    });
                }
            }
        }
    }
    let mut trials: Vec<TrialSpec> = baselines
        .into_iter()
        .map(|((model, corpus), heavy)| TrialSpec {
            name: baseline_name(&model, &corpus),
            kind: TrialKind::Baseline { model, corpus },
            heavy,
        })
        .collect();
    trials.extend(task_baselines.into_iter().map(|((model, task, items, seed), heavy)| TrialSpec {
        name: task_baseline_name(&model, &task, items, seed),
        kind: TrialKind::TaskBaseline { model, task, items, seed },
        heavy,
    }));
    trials.extend(edits);
    trials
}

/// Explains why `filter` matches no test: which part of the name is unknown, with what is known.
pub fn explain_unmatched(filter: &str, trials: &[TrialSpec], suites: &[Suite]) -> String {
    let parts: Vec<&str> = filter.split("::").collect();
    let mut known: [Vec<String>; 5] = Default::default();
    for trial in trials {
        let is_baseline = matches!(trial.kind, TrialKind::Baseline { .. } | TrialKind::TaskBaseline { .. });
        for (i, part) in trial.name.split("::").enumerate().take(5) {
            if is_baseline && i > 0 {
                break;
            }
            if !known[i].iter().any(|k| k == part) {
                known[i].push(part.to_string());
            }
        }
    }
    let labels = ["setting", "method", "model", "suite", "case"];
    let settings = [Setting::Single, Setting::Sequential, Setting::Batch, Setting::BatchSequential];
    let mut message = format!("the filter `{filter}` matches no test");
    if parts.len() > 1 {
        for (i, part) in parts.iter().enumerate().take(5) {
            if !part.is_empty() && !known[i].iter().any(|k| k.contains(part)) {
                message.push_str(&format!("; unknown {} `{part}` (known: {})", labels[i], known[i].join(", ")));
                break;
            }
        }
    }
    let setting_names: Vec<&str> = settings.iter().map(|s| s.name()).collect();
    message.push_str(&format!(
        ". Names are `setting::method::model::suite::case` (settings: baseline, {}; suites: {}); \
         run with --list to see them all",
        setting_names.join(", "),
        suites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
    ));
    message
}
