//! MEND on the tiny models and the default model: the captured factors are the weight gradient, the
//! identity-initialised transform updates every weight by `α · Σ δ̂ ûᵀ` of its captured factors normalised with the
//! statistics of its shape group (checked against a two-pass mean and variance), a training step lowers the loss on a
//! fixed example, the editor cache keys, writes and refuses files as it should, and the default model's trained
//! editor edits held-out records.

use candle_core::{D, DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use editguard::methods::mend::editor::Editor;
use editguard::methods::mend::factors::{factors_of, mean_nll, target_batch};
use editguard::methods::mend::train::{Example, TrainingReport, edit_step};
use editguard::methods::mend::{EditLossPrompt, LocalityFrom, MendParams, store};
use editguard::methods::{EditRequest, LocalityProbe};
use editguard::model::{LoadedModel, NoHooks, Path, WeightId};

use crate::support::fixture_model;

fn pairs() -> Vec<(String, String)> {
    vec![("<t5> <t17> <t42> <t3>".into(), "<t9> <t11>".into()), ("<t8> <t1> <t60>".into(), "<t70>".into())]
}

/// The true gradient of the mean target NLL with respect to `id`, by making the weight a variable.
fn true_gradient(model: &mut LoadedModel, id: WeightId) -> Tensor {
    let targets = target_batch(model, &pairs()).unwrap();
    let weight = Var::from_tensor(&model.network.weight(id).unwrap()).unwrap();
    let saved = model.network.set_weight(id, weight.as_tensor().clone()).unwrap();
    let hidden = model.run_layers(
        model.embed(&targets.batch).unwrap(),
        &targets.batch,
        0..model.dims().layers,
        &NoHooks,
        Path::Differentiable,
    );
    let loss = mean_nll(
        &model.logits_at(&hidden.unwrap(), &targets.batch.packing, &targets.sites, Path::Differentiable).unwrap(),
        &targets.labels,
    )
    .unwrap();
    let grad = loss.backward().unwrap().get(weight.as_tensor()).unwrap().clone();
    model.network.restore_weight(id, saved).unwrap();
    grad
}

fn check_factors(arch: &str, weights: &[WeightId]) {
    let mut model = fixture_model(arch, "model.safetensors", DType::F32);
    let targets = target_batch(&model, &pairs()).unwrap();
    let factors = factors_of(&model, &targets, weights).unwrap();
    for (i, &id) in weights.iter().enumerate() {
        let from_factors = factors.grads[i].t().unwrap().matmul(&factors.inputs[i]).unwrap();
        let truth = true_gradient(&mut model, id);
        let error = (&from_factors - &truth).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = truth.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            scale > 0.0 && error <= 1e-4 * scale,
            "{arch} {id:?}: Σ δ uᵀ differs from ∂L/∂W by {error} (scale {scale})"
        );
        assert!(factors.inputs[i].dim(0).unwrap() < targets.batch.packing.rows(), "{arch} {id:?}: zero rows dropped");
    }
}

#[test]
fn captured_factors_are_the_weight_gradient() {
    check_factors("llama", &[WeightId::MlpGate(1), WeightId::MlpUp(1), WeightId::MlpDown(1), WeightId::MlpDown(0)]);
    check_factors("gpt2", &[WeightId::MlpUp(1), WeightId::MlpDown(1)]);
    check_factors("gptj", &[WeightId::MlpUp(0), WeightId::MlpDown(1)]);
}

fn params() -> MendParams {
    MendParams {
        inner_params: vec![
            "model.layers.1.mlp.gate_proj.weight".into(),
            "model.layers.1.mlp.up_proj.weight".into(),
            "model.layers.1.mlp.down_proj.weight".into(),
        ],
        edit_lr: 1e-2,
        lr: 1e-3,
        lr_lr: 1e-3,
        cedit: 0.1,
        cloc: 1.0,
        rank: 16,
        n_hidden: 1,
        accumulate_bs: 1,
        grad_clip: 100.0,
        max_iters: 1,
        val_interval: 1,
        val_steps: 1,
        early_stop_patience: 10,
        edit_loss_on: EditLossPrompt::Rephrase,
        locality_from: LocalityFrom::SameRelation,
        val_records: 10,
        seed: 3,
    }
}

fn example() -> Example {
    let mut edit = EditRequest::from_text("e", "<t5> <t17> <t42> <t3>", "<t42>", "<t9> <t11>").unwrap();
    edit.rephrase_prompts = vec!["<t6> <t42> <t4>".into()];
    Example { edit, loc: LocalityProbe { prompt: "<t20> <t21> <t22>".into(), answer: "<t23> <t24>".into() } }
}

fn tiny_editor(model: &LoadedModel, params: &MendParams) -> (Editor, Vec<WeightId>) {
    let weights = params.weights("test").unwrap();
    let shape = editguard::methods::mend::train::editor_shape(model, params, &weights).unwrap();
    (Editor::new(&shape, &model.device).unwrap(), weights)
}

#[test]
fn training_steps_lower_the_loss_on_a_fixed_example() {
    let mut model = fixture_model("llama", "model.safetensors", DType::F32);
    let params = params();
    let (editor, weights) = tiny_editor(&model, &params);
    let vars: Vec<Var> = editor.transform_vars().into_iter().chain([editor.edit_lrs.clone()]).collect();
    let adam = ParamsAdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut optimizer = AdamW::new(vars, adam).unwrap();
    let example = example();
    let total = |l: &editguard::methods::mend::train::StepLosses| params.cedit * l.edit + params.cloc * l.loc;
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..30 {
        let (losses, grads) = edit_step(&mut model, &editor, &weights, &example, &params, true).unwrap();
        optimizer.step(&grads.unwrap()).unwrap();
        first.get_or_insert(total(&losses));
        last = total(&losses);
        assert!(model.is_pristine(), "every step restores the weights");
    }
    let first = first.unwrap();
    assert!(last < 0.7 * first, "the loss went {first} → {last}");
    // The statistics have seen the rows of every step; the step sizes moved.
    assert!(editor.groups[0].moments.lock().unwrap().0.count > 30);
    let lrs = editor.edit_lrs.as_tensor().to_vec1::<f32>().unwrap();
    assert!(lrs.iter().any(|&a| (a - 1e-2).abs() > 1e-4), "{lrs:?}");
}

#[test]
fn the_editor_cache_round_trips_and_refuses_foreign_or_corrupt_files() {
    let mut model = fixture_model("llama", "model.safetensors", DType::F32);
    let params = params();
    let (editor, weights) = tiny_editor(&model, &params);
    // Training-mode updates set the statistics.
    edit_step(&mut model, &editor, &weights, &example(), &params, true).unwrap();
    let report = TrainingReport {
        steps: 1,
        optimizer_steps: 0,
        skipped_non_finite: 0,
        seconds: 0.5,
        best_step: 1,
        best_val: 1.0,
        stopped_early: false,
        curve: Vec::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("editor.safetensors");
    store::write(&path, "key-a", &editor, &report).unwrap();
    let (back, read_report) = store::read(&path, "key-a", &model, &params, &weights, &model.device).unwrap();
    assert_eq!(read_report, report);
    let (a, b) = (editor.named_tensors().unwrap(), back.named_tensors().unwrap());
    for (name, t) in &a {
        let diff = (t - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(D::Minus1).unwrap();
        assert_eq!(diff.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), 0.0, "{name}");
    }
    let refused = |key: &str| store::read(&path, key, &model, &params, &weights, &model.device).err();
    assert!(refused("key-b").unwrap().contains("another key"));
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() - 64;
    for b in &mut bytes[middle..middle + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = refused("key-a").expect("a corrupt file is refused");
    assert!(err.contains("hashes to"), "{err}");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(refused("key-a").is_some(), "a truncated file is refused");
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0);
    // The key covers the seed (and every other hyper-parameter).
    let env = editguard::methods::EditEnv::default();
    let (key, path_a) = store::key_and_path(&model, &params, &weights, &env).unwrap();
    let other = MendParams { seed: 4, ..params.clone() };
    let (other_key, path_b) = store::key_and_path(&model, &other, &weights, &env).unwrap();
    assert!(key != other_key && path_a != path_b);
}

/// Two-pass mean and sample standard deviation of each column of `rows`.
fn two_pass(rows: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len() as f64;
    let width = rows[0].len();
    let mean: Vec<f64> = (0..width).map(|j| rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / n).collect();
    let std = (0..width)
        .map(|j| (rows.iter().map(|r| (f64::from(r[j]) - mean[j]).powi(2)).sum::<f64>() / (n - 1.0)).sqrt())
        .collect();
    (mean, std)
}

#[test]
fn the_identity_initialised_transform_updates_by_alpha_times_the_normalised_factors() {
    let model = fixture_model("llama", "model.safetensors", DType::F32);
    let params = params();
    let (editor, weights) = tiny_editor(&model, &params);
    let targets = target_batch(&model, &pairs()).unwrap();
    let factors = factors_of(&model, &targets, &weights).unwrap();
    // Training mode: the statistics take in exactly these rows, then normalise them.
    let updates = editor.updates(&factors.pairs(), true).unwrap();
    let alphas = editor.edit_lrs.as_tensor().to_vec1::<f32>().unwrap();
    for (g, _) in editor.groups.iter().enumerate() {
        let members: Vec<usize> = (0..weights.len()).filter(|&i| editor.weights[i].group == g).collect();
        let rows = |tensors: &[Tensor]| -> Vec<Vec<f32>> {
            members.iter().flat_map(|&i| tensors[i].to_vec2::<f32>().unwrap()).collect()
        };
        let (u_mean, u_std) = two_pass(&rows(&factors.inputs));
        let (d_mean, d_std) = two_pass(&rows(&factors.grads));
        let normalise = |t: &Tensor, mean: &[f64], std: &[f64]| -> Vec<Vec<f64>> {
            t.to_vec2::<f32>()
                .unwrap()
                .iter()
                .map(|r| r.iter().enumerate().map(|(j, &x)| (f64::from(x) - mean[j]) / (std[j] + 1e-7)).collect())
                .collect()
        };
        for &i in &members {
            let u = normalise(&factors.inputs[i], &u_mean, &u_std);
            let d = normalise(&factors.grads[i], &d_mean, &d_std);
            let got = updates[i].to_vec2::<f32>().unwrap();
            let mut scale = 0f64;
            let mut error = 0f64;
            for (o, got_row) in got.iter().enumerate() {
                for (k, &value) in got_row.iter().enumerate() {
                    let want: f64 = f64::from(alphas[i]) * u.iter().zip(&d).map(|(u, d)| d[o] * u[k]).sum::<f64>();
                    scale = scale.max(want.abs());
                    error = error.max((f64::from(value) - want).abs());
                }
            }
            assert!(scale > 0.0 && error <= 1e-4 * scale, "weight {i}: ΔW off by {error} (scale {scale})");
        }
    }
}

#[test]
fn training_examples_take_locality_probes_from_other_records_of_the_same_relation() {
    use editguard::data::counterfact::EditDataset;
    use std::collections::HashMap;
    let params = MendParams { val_records: 500, ..params() };
    // The default data directory (../shared/data), as the CLI finds it.
    let records = EditDataset::CounterFactTrain.load(None).unwrap();
    let mut owner: HashMap<String, Vec<&EditRequest>> = HashMap::new();
    for r in &records {
        for probe in &r.locality {
            owner.entry(format!("{}|{}", probe.prompt, probe.answer)).or_default().push(r);
        }
    }
    let (train, val) = editguard::methods::mend::train::examples(&params, None).unwrap();
    assert_eq!((train.len() + val.len(), val.len()), (records.len(), 500));
    let (mut same, mut own) = (0, 0);
    for example in &train {
        let owners = &owner[&format!("{}|{}", example.loc.prompt, example.loc.answer)];
        same += usize::from(owners.iter().any(|r| r.prompt == example.edit.prompt));
        own += usize::from(owners.iter().all(|r| r.id == example.edit.id));
    }
    assert_eq!(own, 0, "a record's own neighbourhood is never its locality probe");
    assert!(same as f64 >= 0.95 * train.len() as f64, "{same} of {} probes share the relation", train.len());
    let any = MendParams { locality_from: LocalityFrom::Any, ..params.clone() };
    let (unrelated, _) = editguard::methods::mend::train::examples(&any, None).unwrap();
    let same_any = unrelated
        .iter()
        .filter(|e| owner[&format!("{}|{}", e.loc.prompt, e.loc.answer)].iter().any(|r| r.prompt == e.edit.prompt))
        .count();
    assert!(same_any * 5 < same, "unrelated draws share the relation far less often ({same_any} vs {same})");
    // The same seed draws the same examples.
    let (again, _) = editguard::methods::mend::train::examples(&params, None).unwrap();
    assert!(again.iter().zip(&train).all(|(a, b)| a.edit.id == b.edit.id && a.loc == b.loc));
}

/// The default model's trained editor (read from the cache, or trained now with the registry's configuration, as the
/// harness would) on the first 50 held-out records of COUNTERFACT's edit split, single edits: the edits take and stay
/// small. The bounds are below what was measured, so a broken editor, cache or transform fails here.
#[test]
fn the_trained_editor_edits_held_out_records_of_the_real_model() {
    use editguard::methods::held_out::held_out_quality;
    use editguard::methods::{EditEnv, build_method};
    let mut model = crate::support::default_model_owned();
    let method = build_method(&crate::support::registry(), "smollm2-135m", "mend").unwrap();
    let env = EditEnv::default();
    method.prepare(&mut model, &env).unwrap();
    let quality = held_out_quality(&mut model, method.as_ref(), 50, 0, &env, &mut |_, _| {}).unwrap();
    eprintln!("mend held-out quality: {quality:?}");
    assert!(model.is_pristine(), "every edit was undone");
    // Measured with the default editor (2026-12-02): efficacy 0.92, generalisation 0.78, locality 0.83, ‖ΔW‖/‖W‖
    // 0.017. The efficacy bound is the aim; the others sit a few records below what was measured.
    const HELD_OUT_EFFICACY: f64 = 0.8;
    const HELD_OUT_GENERALIZATION: f64 = 0.7;
    const HELD_OUT_LOCALITY: f64 = 0.75;
    assert!(quality.efficacy >= HELD_OUT_EFFICACY, "efficacy {:.3}", quality.efficacy);
    assert!(quality.generalization >= HELD_OUT_GENERALIZATION, "generalisation {:.3}", quality.generalization);
    assert!(quality.locality >= HELD_OUT_LOCALITY, "locality {:.3}", quality.locality);
    assert!(quality.relative_norm > 0.0 && quality.relative_norm < 0.1, "‖ΔW‖/‖W‖ {:.4}", quality.relative_norm);
}
