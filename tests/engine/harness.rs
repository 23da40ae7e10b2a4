//! The harness judged by breaking methods on purpose: a hold test must fail with a readable diagnosis when ROME's ΔW
//! is scaled by 100, an expected-collapse test must fail with "expected collapse, model held" when the method does
//! nothing, and a sequential suite must stop at the first crossing. Snapshots go to a temporary directory, so these
//! runs never touch the accepted baselines.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Tensor;
use editguard::harness::{HarnessContext, find_trial, run_trial};
use editguard::methods::{AppliedEdit, EditEnv, EditMethod, EditRecorder, EditRequest};
use editguard::model::{LoadedModel, WeightId};

use crate::support::root;

/// Applies the wrapped method, then replaces each change ΔW by `factor`·ΔW.
struct ScaledDelta {
    inner: Box<dyn EditMethod>,
    factor: f64,
}

impl EditMethod for ScaledDelta {
    fn name(&self) -> &'static str {
        "scaled-delta"
    }

    fn apply(
        &self,
        model: &mut LoadedModel,
        requests: &[EditRequest],
        env: &EditEnv,
    ) -> editguard::Result<AppliedEdit> {
        let edit = self.inner.apply(model, requests, env)?;
        let deltas: Vec<(WeightId, Tensor)> = edit.changes.iter().map(|c| (c.weight, c.delta.clone())).collect();
        edit.undo(model)?;
        let mut recorder = EditRecorder::default();
        for (weight, delta) in deltas {
            recorder.apply(model, weight, (delta * self.factor)?)?;
        }
        Ok(recorder.finish())
    }
}

/// Changes nothing on its first `harmless` calls, then multiplies layer 0's down-projection by 6.
struct WrecksAtCall {
    harmless: usize,
    calls: AtomicUsize,
}

impl EditMethod for WrecksAtCall {
    fn name(&self) -> &'static str {
        "wrecks-at-call"
    }

    fn apply(&self, model: &mut LoadedModel, _: &[EditRequest], _: &EditEnv) -> editguard::Result<AppliedEdit> {
        let mut recorder = EditRecorder::default();
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.harmless {
            let weight = model.network.weight(WeightId::MlpDown(0))?;
            recorder.apply(model, WeightId::MlpDown(0), (weight * 5.0)?)?;
        }
        Ok(recorder.finish())
    }
}

fn context_with_scratch_snapshots(cases_dir: &std::path::Path) -> (HarnessContext, tempfile::TempDir) {
    let scratch = tempfile::tempdir().unwrap();
    let mut context = HarnessContext::new(&root(), &root().join("models.toml"), cases_dir).expect("suites load");
    context.snapshots.dir = scratch.path().to_path_buf();
    (context, scratch)
}

#[test]
fn rome_with_delta_scaled_by_100_fails_a_hold_test_with_a_diagnosis() {
    let (context, _scratch) = context_with_scratch_snapshots(&root().join("cases"));
    let name = "single::rome::smollm2-135m::hardedit::tesla-founder";
    let spec = find_trial(&context, name).expect("the hold test exists");
    let wrap = |inner: Box<dyn EditMethod>| -> Box<dyn EditMethod> { Box::new(ScaledDelta { inner, factor: 100.0 }) };
    let diagnosis = run_trial(&context, &spec, Some(&wrap)).expect_err("a 100x ROME update must fail the test");
    println!("{diagnosis}");
    for expected in [
        "COLLAPSE at edit 1",
        "mean per-sentence perplexity",
        "bound",
        "baseline",
        "‖ΔW‖/‖W‖",
        "efficacy",
        "expected     hold",
        "Tesla's founder is",
        "\"Gates\"",
    ] {
        assert!(diagnosis.contains(expected), "diagnosis lacks `{expected}`:\n{diagnosis}");
    }
}

#[test]
fn a_method_that_changes_nothing_fails_an_expected_collapse() {
    let (context, _scratch) = context_with_scratch_snapshots(&root().join("cases"));
    let name = "single::rome::smollm2-135m::hardcf::canada-nato";
    let spec = find_trial(&context, name).expect("the expected-collapse test exists");
    let wrap = |_: Box<dyn EditMethod>| -> Box<dyn EditMethod> {
        Box::new(WrecksAtCall { harmless: usize::MAX, calls: AtomicUsize::new(0) })
    };
    let diagnosis = run_trial(&context, &spec, Some(&wrap)).expect_err("no collapse, so the test must fail");
    println!("{diagnosis}");
    assert!(diagnosis.contains("expected collapse, model held"), "{diagnosis}");
}

#[test]
fn a_sequential_suite_stops_at_the_first_collapse() {
    let cases = tempfile::tempdir().unwrap();
    std::fs::write(
        cases.path().join("three.toml"),
        r#"
description = "three edits, the second wrecks the model"
setting = "sequential"
methods = ["ft-l-inf"]
edits = 3

[[cases]]
name = "a"
prompt = "The mother tongue of Danielle Darrieux is"
subject = "Danielle Darrieux"
target_new = "English"
ground_truth = "French"

[[cases]]
name = "b"
prompt = "Tesla's founder is"
subject = "Tesla"
target_new = "Gates"

[[cases]]
name = "c"
prompt = "Ireland is in"
subject = "Ireland"
target_new = "Antarctica"
"#,
    )
    .unwrap();
    let (context, _scratch) = context_with_scratch_snapshots(cases.path());
    let spec = find_trial(&context, "sequential::ft-l-inf::smollm2-135m::three::n3").expect("listed");
    let wrap = |_: Box<dyn EditMethod>| -> Box<dyn EditMethod> {
        Box::new(WrecksAtCall { harmless: 1, calls: AtomicUsize::new(0) })
    };
    let diagnosis = run_trial(&context, &spec, Some(&wrap)).expect_err("edit 2 wrecks the model");
    println!("{diagnosis}");
    assert!(diagnosis.contains("collapsed at edit 2 of 3"), "{diagnosis}");
    assert!(diagnosis.contains("trajectory"), "{diagnosis}");
}
