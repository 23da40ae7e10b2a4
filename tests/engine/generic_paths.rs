//! The device-generic paths — what a GPU runs — forced on the CPU and compared with the CPU kernels: logits of ragged
//! batches on both paths (fast and differentiable), the gradient that ROME optimises, and a whole ROME update, on the
//! four tiny architectures and the default model. Nothing here can tell which path ran from the numbers alone, so each
//! comparison also checks that forcing the generic forms changed the arithmetic (the kernels tile and sum in their own
//! order): a switch that did nothing would fail.

use candle_core::{D, DType, Tensor, Var};
use editguard::methods::rome::{KeyChoice, Rome};
use editguard::methods::{EditEnv, EditRequest};
use editguard::model::kernels::generic::generic_only;
use editguard::model::{AddAtSites, HookPoint, LoadedModel, NoHooks, Path};

use crate::methods::{tiny_params, tiny_request};
use crate::support::{default_model, fixture_model, registry};

const ARCHITECTURES: [&str; 4] = ["llama", "gpt2", "gptj", "gemma3"];

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest difference relative to the largest magnitude of `expected`.
fn relative_difference(got: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(got.len(), expected.len());
    let scale = expected.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    got.iter().zip(expected).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// Logits at every position of a ragged batch (a long sequence spans several attention blocks).
fn all_logits(model: &LoadedModel, sequences: &[Vec<u32>], path: Path) -> Vec<f64> {
    let refs: Vec<&[u32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let batch = model.batch(&refs).unwrap();
    let hidden = model.hidden_states(&batch, &NoHooks, path).unwrap();
    let sites: Vec<(usize, usize)> =
        sequences.iter().enumerate().flat_map(|(s, seq)| (0..seq.len()).map(move |p| (s, p))).collect();
    values(&model.logits_at(&hidden, &batch.packing, &sites, path).unwrap())
}

/// The loss and gradient ROME's value optimisation sees: NLL of the last token with a vector added at an MLP output.
fn injected_gradient(model: &LoadedModel, ids: &[u32], layer: usize) -> (f64, Vec<f64>) {
    let hidden_size = model.dims().hidden;
    let start: Vec<f32> = (0..hidden_size).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.01).collect();
    let delta = Var::from_vec(start, hidden_size, &model.device).unwrap();
    let target = ids.len() - 1;
    let hook = AddAtSites::same(layer, HookPoint::MlpOutput, vec![(0, 2)], delta.as_tensor()).unwrap();
    let batch = model.batch(&[&ids[..target]]).unwrap();
    let hidden = model.hidden_states(&batch, &hook, Path::Differentiable).unwrap();
    let logits = model.logits_at(&hidden, &batch.packing, &[(0, target - 1)], Path::Differentiable).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let loss = log_probs.get(0).unwrap().get(ids[target] as usize).unwrap().neg().unwrap();
    let gradient = values(loss.backward().unwrap().get(delta.as_tensor()).expect("the gradient reaches the vector"));
    (values(&loss)[0], gradient)
}

/// Runs `measure` with the CPU kernels and with the generic forms forced; both must agree within `tolerance`
/// (relative to the largest magnitude) and must not be bit-identical.
fn compare(what: &str, tolerance: f64, measure: impl Fn() -> Vec<f64>) {
    if editguard::model::kernels::generic::generic_forced() {
        // EDITGUARD_KERNELS=generic (ci/gpu-check.sh --dry-run): there are no kernels to compare with in this
        // process; the generic values must still be finite.
        assert!(measure().iter().all(|x| x.is_finite()), "{what}: non-finite values");
        eprintln!("{what}: generic forms forced for the whole process, nothing to compare with");
        return;
    }
    let kernels = measure();
    let generic = {
        let _generic = generic_only();
        measure()
    };
    assert!(kernels.iter().chain(&generic).all(|x| x.is_finite()), "{what}: non-finite values");
    let difference = relative_difference(&generic, &kernels);
    eprintln!("{what}: generic path within {difference:.2e} of the kernels (tolerance {tolerance:e})");
    assert!(difference <= tolerance, "{what}: generic path differs from the kernels by {difference:e}");
    assert!(kernels != generic, "{what}: forcing the generic path changed nothing; is the switch honoured?");
}

fn ragged_batch(vocab_limit: u32) -> Vec<Vec<u32>> {
    let sequence = |length: usize, seed: u32| -> Vec<u32> {
        (0..length as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % vocab_limit).collect()
    };
    // The fixtures have 64 positions: 64 tokens span two blocks of query positions.
    vec![sequence(5, 1), sequence(64, 2), sequence(1, 3), sequence(33, 4)]
}

#[test]
fn tiny_architectures_agree_on_both_paths_and_in_gradients() {
    for arch in ARCHITECTURES {
        let model = fixture_model(arch, "model.safetensors", DType::F32);
        let batch = ragged_batch(100);
        let too_long =
            model.batch(&[&[1u32; 65]]).err().expect("65 tokens exceed the fixture's 64 positions").to_string();
        assert!(too_long.contains("65 tokens") && too_long.contains("64 positions"), "{too_long}");
        compare(&format!("{arch} fast-path logits"), 1e-5, || all_logits(&model, &batch, Path::Fast));
        compare(&format!("{arch} differentiable logits"), 1e-5, || all_logits(&model, &batch, Path::Differentiable));
        let ids = [5u32, 17, 42, 96, 0, 63, 28];
        compare(&format!("{arch} gradient"), 1e-4, || {
            let (loss, mut gradient) = injected_gradient(&model, &ids, 0);
            gradient.push(loss);
            gradient
        });
    }
}

#[test]
fn tiny_llama_rome_update_agrees() {
    let model = fixture_model("llama", "model.safetensors", DType::F32);
    let rome = Rome::new("rome", KeyChoice::Unprefixed, &tiny_params(), "test").unwrap();
    let request = tiny_request();
    compare("tiny llama ROME update", 1e-3, || {
        values(&rome.update_for(&model, &request, &EditEnv::default()).unwrap().delta)
    });
}

#[test]
fn default_model_agrees_on_logits_gradient_and_a_rome_update() {
    let model = default_model();
    let text = "The Eiffel Tower is located in the city of Paris, which is also the capital of France. It was built";
    let long: Vec<u32> = (0..6).flat_map(|_| model.encode(text).unwrap()).collect();
    let batch = vec![model.encode("Hello there").unwrap(), long, model.encode(text).unwrap()];
    compare("default model fast-path logits", 1e-4, || all_logits(model, &batch, Path::Fast));
    let ids = model.encode(text).unwrap();
    compare("default model gradient", 1e-3, || {
        let (loss, mut gradient) = injected_gradient(model, &ids[..12], 4);
        gradient.push(loss);
        gradient
    });
    let mut params = registry().get(&registry().default_model).unwrap().methods["rome"].clone();
    // The covariance statistics would take minutes to collect; the comparison needs only the optimisation.
    params.insert("mom2_adjustment".into(), toml::Value::Boolean(false));
    let rome = Rome::new("rome", KeyChoice::Unprefixed, &params, "test").unwrap();
    let request =
        EditRequest::from_text("eiffel", "The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
            .unwrap();
    compare("default model ROME update", 1e-2, || {
        values(&rome.update_for(model, &request, &EditEnv::default()).unwrap().delta)
    });
}
