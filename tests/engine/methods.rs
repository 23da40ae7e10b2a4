//! Editing methods: ROME's algebra, r-ROME's difference, determinism and the statistics cache on the tiny llama
//! fixture (fast), and real edits of a fact the default model knows.

use candle_core::{DType, Tensor};
use editguard::methods::rome::{KeyChoice, Rome};
use editguard::methods::stats::{Provenance, StatsCache, StatsCorpus, second_moments_in};
use editguard::methods::{EditEnv, EditMethod, EditRequest, build_method, method_entry};
use editguard::metrics::edit_quality::score_continuations;
use editguard::metrics::perplexity::{PerplexityOptions, perplexity};
use editguard::model::{LoadedModel, WeightId};

use crate::support::{default_model_owned, fixture_model, registry};

/// ROME's hyper-parameters for the tiny llama (a few steps; also used by the generic-path comparison).
pub(crate) fn tiny_params() -> toml::Table {
    toml::from_str(
        r#"
        layers = [0]
        v_num_grad_steps = 8
        v_lr = 0.5
        v_loss_layer = 1
        v_weight_decay = 1e-3
        clamp_norm_factor = 4.0
        kl_factor = 0.0625
        mom2_adjustment = false
        context_template_length_params = [[3, 5], [4, 5]]
        seed = 7
        "#,
    )
    .unwrap()
}

/// An edit the tiny llama's tokenizer can express.
pub(crate) fn tiny_request() -> EditRequest {
    EditRequest::from_text("tiny", "<t5> <t17> <t42> <t96> <t3> is", "<t42> <t96>", "<t9> <t11>").unwrap()
}

fn tiny_rome(key: KeyChoice, params: &toml::Table) -> Box<dyn EditMethod> {
    let name = if key == KeyChoice::Unprefixed { "rome" } else { "r-rome" };
    (method_entry(name).unwrap().build)(params, "test: methods").unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// `(W + ΔW) k` for the key the update was solved for must equal `v*`.
fn check_maps_key_to_target(model: &LoadedModel, rome: &Rome, request: &EditRequest) -> (Tensor, Tensor) {
    let update = rome.update_for(model, request, &EditEnv::default()).unwrap();
    let w = model.network.weight(WeightId::MlpDown(0)).unwrap();
    let edited = (&w + &update.delta).unwrap();
    let mapped = edited.matmul(&update.key.unsqueeze(1).unwrap()).unwrap().squeeze(1).unwrap();
    let error = max_abs(&(&mapped - &update.target).unwrap()) / max_abs(&update.target);
    assert!(error < 1e-4, "W'k should equal v*: relative error {error:e}");
    (update.key, update.delta)
}

#[test]
fn rome_and_r_rome_solve_for_different_keys_with_the_same_u_and_v() {
    let model = fixture_model("llama", "model.safetensors", DType::F32);
    let request = tiny_request();
    let params = tiny_params();
    let rome = Rome::new("rome", KeyChoice::Unprefixed, &params, "test").unwrap();
    let r_rome = Rome::new("r-rome", KeyChoice::PrefixAveraged, &params, "test").unwrap();
    let (bare_key, rome_delta) = check_maps_key_to_target(&model, &rome, &request);
    let (mean_key, r_rome_delta) = check_maps_key_to_target(&model, &r_rome, &request);
    assert!(max_abs(&(&bare_key - &mean_key).unwrap()) > 1e-3, "the bare and the averaged key must differ");
    // Both updates are rank one with the same row direction u: ΔW_rome = a ⊗ u, ΔW_rrome = b ⊗ u.
    let u_of = |delta: &Tensor| {
        let row = delta.get(0).unwrap();
        (&row / row.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64).unwrap()
    };
    let (u1, u2) = (u_of(&rome_delta), u_of(&r_rome_delta));
    let same = max_abs(&(&u1 - &u2).unwrap()).min(max_abs(&(&u1 + &u2).unwrap()));
    assert!(same < 1e-4, "rome and r-rome must share u; differ by {same:e}");
    assert!(max_abs(&(&rome_delta - &r_rome_delta).unwrap()) > 1e-6, "and differ in the value side");
}

#[test]
fn same_seed_gives_bit_identical_delta_and_undo_is_exact() {
    let mut model = fixture_model("llama", "model.safetensors", DType::F32);
    let before = model.network.weight(WeightId::MlpDown(0)).unwrap();
    let request = [tiny_request()];
    let first =
        tiny_rome(KeyChoice::Unprefixed, &tiny_params()).apply(&mut model, &request, &EditEnv::default()).unwrap();
    let first_delta = first.changes[0].delta.clone();
    first.undo(&mut model).unwrap();
    assert_eq!(max_abs(&(&model.network.weight(WeightId::MlpDown(0)).unwrap() - &before).unwrap()), 0.0);
    let second =
        tiny_rome(KeyChoice::Unprefixed, &tiny_params()).apply(&mut model, &request, &EditEnv::default()).unwrap();
    assert_eq!(max_abs(&(&second.changes[0].delta - &first_delta).unwrap()), 0.0, "ΔW must be bit-identical");
    assert!(second.changes[0].relative_norm > 0.0);
    second.undo(&mut model).unwrap();
    let mut other_seed = tiny_params();
    other_seed.insert("seed".into(), toml::Value::Integer(8));
    let third = tiny_rome(KeyChoice::Unprefixed, &other_seed).apply(&mut model, &request, &EditEnv::default()).unwrap();
    assert!(max_abs(&(&third.changes[0].delta - &first_delta).unwrap()) > 0.0, "another seed, other templates");
}

#[test]
fn bad_hyper_parameters_name_the_field() {
    let mut params = tiny_params();
    params.insert("v_lrr".into(), toml::Value::Float(0.1));
    let err = (method_entry("rome").unwrap().build)(&params, "models.toml: models.x.methods.rome").err().unwrap();
    assert!(err.to_string().contains("models.x.methods.rome") && err.to_string().contains("v_lrr"), "{err}");
    let err = build_method(&registry(), "smollm2-135m", "no-such-method").err().unwrap().to_string();
    assert!(err.contains("unknown method `no-such-method`"), "{err}");
}

#[test]
fn statistics_cache_is_reused_and_a_truncated_or_corrupted_file_is_rebuilt() {
    let model = fixture_model("llama", "model.safetensors", DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let cache = StatsCache { root: dir.path().to_path_buf() };
    let corpus = StatsCorpus {
        name: "tiny".into(),
        sentences: vec!["<t1> <t2> <t3> <t4>".into(), "<t9> <t8> <t7>".into(), "<t50> <t60> <t70> <t80> <t90>".into()],
    };
    let first = second_moments_in(&cache, &model, &[0, 1], &corpus, None).unwrap();
    assert!(first.iter().all(|(_, p)| *p == Provenance::Computed));
    assert_eq!(first[0].0.tokens, 12);
    let second = second_moments_in(&cache, &model, &[0, 1], &corpus, None).unwrap();
    assert!(second.iter().all(|(_, p)| *p == Provenance::Cached));
    assert_eq!(max_abs(&(&first[1].0.matrix - &second[1].0.matrix).unwrap()), 0.0);
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("layer1") && p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let third = second_moments_in(&cache, &model, &[0, 1], &corpus, None).unwrap();
    assert_eq!(third[0].1, Provenance::Cached);
    assert_eq!(third[1].1, Provenance::Computed, "a truncated cache file must be rebuilt, not used");
    assert_eq!(max_abs(&(&first[1].0.matrix - &third[1].0.matrix).unwrap()), 0.0);

    // Bytes flipped inside the values, size unchanged: still a readable safetensors file of the right key and shape,
    // caught only by the recorded digest.
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() - 8 * 3;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let fourth = second_moments_in(&cache, &model, &[0, 1], &corpus, None).unwrap();
    assert_eq!(fourth[1].1, Provenance::Computed, "statistics with flipped bytes must be rebuilt, not used");
    assert_eq!(max_abs(&(&first[1].0.matrix - &fourth[1].0.matrix).unwrap()), 0.0);
}

fn prefers(model: &LoadedModel, prompt: &str, better: &str, worse: &str) -> bool {
    let scores =
        score_continuations(model, &[(prompt.into(), format!(" {better}")), (prompt.into(), format!(" {worse}"))])
            .unwrap();
    scores[0].mean_nll < scores[1].mean_nll
}

/// A real edit of a fact the default model knows: it flips, and ME-PPL_50 perplexity stays within 3%.
fn edit_known_fact(method: &str) {
    edit_known_fact_checking(method, true);
}

/// As [`edit_known_fact`]; `holds` says whether perplexity must stay within 3% (knowledge neurons need not).
fn edit_known_fact_checking(method: &str, holds: bool) {
    let mut model = default_model_owned();
    let request = EditRequest {
        ground_truth: Some("French".into()),
        ..EditRequest::from_text("0", "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English")
            .unwrap()
    };
    let prompt = request.prompt_text();
    assert!(prefers(&model, &prompt, "French", "English"), "the unedited model must know the fact");
    let sentences = editguard::data::me_ppl::Corpus::MePpl50.load(None).unwrap();
    let before = perplexity(&model, &sentences, PerplexityOptions::default(), None).unwrap().mean_sentence_ppl;
    let edit = build_method(&registry(), "smollm2-135m", method)
        .unwrap()
        .apply(&mut model, std::slice::from_ref(&request), &EditEnv::default())
        .unwrap();
    assert!(prefers(&model, &prompt, "English", "French"), "{method}: the edit must take");
    let after = perplexity(&model, &sentences, PerplexityOptions::default(), None).unwrap().mean_sentence_ppl;
    assert!(!holds || (after / before - 1.0).abs() < 0.03, "{method}: perplexity {before:.2} → {after:.2}");
    edit.undo(&mut model).unwrap();
    assert!(prefers(&model, &prompt, "French", "English"), "undo must bring the fact back");
}

#[test]
fn rome_flips_a_known_fact_and_keeps_perplexity() {
    edit_known_fact("rome");
}

#[test]
fn r_rome_flips_a_known_fact_and_keeps_perplexity() {
    edit_known_fact("r-rome");
}

#[test]
fn memit_flips_a_known_fact_and_keeps_perplexity() {
    edit_known_fact("memit");
}

#[test]
fn ft_l_inf_flips_a_known_fact_and_keeps_perplexity() {
    edit_known_fact("ft-l-inf");
}

#[test]
fn ft_flips_a_known_fact_and_keeps_perplexity() {
    edit_known_fact("ft");
}

#[test]
fn ft_l_inf_stays_inside_its_box() {
    let mut model = fixture_model("llama", "model.safetensors", DType::F32);
    let params: toml::Table = toml::from_str(
        "layers = [0]\nlr = 0.05\nnum_steps = 10\nbatch_size = 4\nnorm_constraint = 1e-3\nobjective_optimization = \"target_new\"",
    )
    .unwrap();
    let method = (method_entry("ft-l-inf").unwrap().build)(&params, "test: ft").unwrap();
    let edit = method.apply(&mut model, &[tiny_request()], &EditEnv::default()).unwrap();
    let largest = max_abs(&edit.changes[0].delta);
    assert!(largest > 0.0 && largest <= 1e-3 + 1e-7, "|ΔW|∞ = {largest:e} must be within ε = 1e-3");
    let mut unconstrained = params.clone();
    unconstrained.remove("norm_constraint");
    assert!((method_entry("ft-l-inf").unwrap().build)(&unconstrained, "test: ft").is_err(), "ft-l-inf needs ε");
    let ft = (method_entry("ft").unwrap().build)(&unconstrained, "test: ft").unwrap();
    let free = ft.apply(&mut model, &[tiny_request()], &EditEnv::default()).unwrap();
    assert!(max_abs(&free.changes[0].delta) > 1e-3, "unconstrained FT leaves the box");
}

/// Knowledge neurons flip the fact too; on this model they also wreck perplexity (the selected last-layer neurons
/// fire on most tokens), which the harness is there to catch, so only efficacy and exact undo are asserted here.
#[test]
fn kn_flips_a_known_fact() {
    edit_known_fact_checking("kn", false);
}
