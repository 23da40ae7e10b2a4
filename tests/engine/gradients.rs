//! Autograd against finite differences for a vector injected at an MLP output: the quantity ROME optimises.

use candle_core::{D, DType, Tensor, Var};
use editguard::model::{AddAtSites, HookPoint, LoadedModel, Path};

use crate::support::{default_model, fixture_model};

/// NLL of `ids[target]` given the tokens before it, with `delta` added at `layer`'s MLP output at `site_position`.
fn loss(
    model: &LoadedModel,
    ids: &[u32],
    delta: &Tensor,
    layer: usize,
    site_position: usize,
    target: usize,
    path: Path,
) -> Tensor {
    let hook = AddAtSites::same(layer, HookPoint::MlpOutput, vec![(0, site_position)], delta).unwrap();
    let batch = model.batch(&[&ids[..target]]).unwrap();
    let hidden = model.hidden_states(&batch, &hook, path).unwrap();
    let logits = model.logits_at(&hidden, &batch.packing, &[(0, target - 1)], path).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    log_probs.get(0).unwrap().get(ids[target] as usize).unwrap().neg().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Every coordinate of the gradient against central differences, in f64.
fn check_fixture(arch: &str) {
    let model = fixture_model(arch, "model.safetensors", DType::F64);
    let ids = [5u32, 17, 42, 96, 0, 63, 28];
    let hidden = model.dims().hidden;
    let start: Vec<f64> = (0..hidden).map(|i| ((i * 7 % 11) as f64 - 5.0) * 0.05).collect();
    let delta = Var::from_vec(start.clone(), hidden, &model.device).unwrap();
    let value = loss(&model, &ids, delta.as_tensor(), 0, 2, 6, Path::Differentiable);
    let grads = value.backward().unwrap();
    let gradient: Vec<f64> = grads.get(delta.as_tensor()).expect("gradient reaches the vector").to_vec1().unwrap();
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for i in 0..hidden {
        let mut plus = start.clone();
        plus[i] += h;
        let mut minus = start.clone();
        minus[i] -= h;
        let at = |v: Vec<f64>| {
            scalar(&loss(
                &model,
                &ids,
                &Tensor::from_vec(v, hidden, &model.device).unwrap(),
                0,
                2,
                6,
                Path::Differentiable,
            ))
        };
        let numeric = (at(plus) - at(minus)) / (2.0 * h);
        worst = worst.max((numeric - gradient[i]).abs());
    }
    let scale = gradient.iter().map(|g| g.abs()).fold(0.0, f64::max);
    assert!(scale > 1e-6, "{arch}: gradient is (near) zero, the check would be vacuous");
    assert!(
        worst <= 1e-6 * scale.max(1.0),
        "{arch}: autograd vs finite differences differ by {worst:e} (gradient scale {scale:e})"
    );
}

#[test]
fn llama_gradient_matches_finite_differences() {
    check_fixture("llama");
}

#[test]
fn gpt2_gradient_matches_finite_differences() {
    check_fixture("gpt2");
}

#[test]
fn gptj_gradient_matches_finite_differences() {
    check_fixture("gptj");
}

#[test]
fn gemma3_gradient_matches_finite_differences() {
    check_fixture("gemma3");
}

/// On the real model (f32): the directional derivative along the gradient matches a central difference.
#[test]
fn default_model_gradient_matches_directional_difference() {
    let model = default_model();
    let ids = model.encode(" The mother tongue of Danielle Darrieux is French").unwrap();
    let hidden = model.dims().hidden;
    let delta = Var::zeros(hidden, DType::F32, &model.device).unwrap();
    let target = ids.len() - 1;
    let value = loss(model, &ids, delta.as_tensor(), 5, target - 2, target, Path::Differentiable);
    let gradient = value.backward().unwrap().get(delta.as_tensor()).expect("gradient reaches the vector").clone();
    let norm = scalar(&gradient.sqr().unwrap().sum_all().unwrap()).sqrt();
    assert!(norm > 1e-4, "gradient norm {norm} too small for a meaningful check");
    let direction = (&gradient / norm).unwrap();
    let epsilon = 0.05;
    let at = |sign: f64| {
        let shifted = (&direction * (sign * epsilon)).unwrap();
        scalar(&loss(model, &ids, &shifted, 5, target - 2, target, Path::Fast))
    };
    let numeric = (at(1.0) - at(-1.0)) / (2.0 * epsilon);
    let relative = ((numeric - norm) / norm).abs();
    assert!(
        relative < 0.02,
        "directional derivative: finite difference {numeric}, autograd {norm} (rel. error {relative:.3})"
    );
}
