//! Causal tracing: the batched restorations against full runs, the exact limits (everything restored, no noise),
//! seeded noise and BOS-aware subject positions on tiny fixture models; and the layers where the default model's
//! known facts are recalled.

use candle_core::DType;
use editguard::data::counterfact::{EditDataset, seeded_order};
use editguard::model::{HookPoint, LoadedModel};
use editguard::tracing::average::{Category, trace_sample};
use editguard::tracing::{
    Kind, Noise, Positions, PromptTrace, TracePrompt, TraceSettings, embedding_std, next_token, patched_probability,
    trace_prompt, window_layers,
};

use crate::support::{default_model, fixture_model};

const PROMPT: &str = "<t3> <t7> {} <t5> <t20> <t11>";
const SUBJECT: &str = "<t9> <t12> <t40>";

/// The tiny gemma3 (4 layers, sliding windows, scaled embeddings) with a BOS token, or the tiny llama (2 layers).
fn tiny(arch: &str) -> LoadedModel {
    let mut model = fixture_model(arch, "model.safetensors", DType::F32);
    if arch == "gemma3" {
        model.bos_token = Some(2);
        model.set_bos(true).unwrap();
    }
    model
}

fn settings(window: Option<usize>, samples: usize) -> TraceSettings {
    TraceSettings { kinds: vec![Kind::Hidden, Kind::Mlp], window, noise_samples: samples, positions: Positions::All }
}

fn traced(model: &LoadedModel, std: f64, seed: u64, window: Option<usize>) -> PromptTrace {
    let prompt = TracePrompt::new(model, PROMPT, SUBJECT).unwrap();
    let (target, _) = next_token(model, &prompt.ids).unwrap();
    let noise = Noise::gaussian(model, &prompt, 3, std, seed).unwrap();
    trace_prompt(model, &prompt, target, &settings(window, 3), &noise).unwrap()
}

#[test]
fn subject_positions_account_for_bos() {
    let plain = fixture_model("gemma3", "model.safetensors", DType::F32);
    let without = TracePrompt::new(&plain, PROMPT, SUBJECT).unwrap();
    assert_eq!((without.subject_first, without.subject_end, without.ids.len()), (2, 5, 8));
    let with = TracePrompt::new(&tiny("gemma3"), PROMPT, SUBJECT).unwrap();
    assert_eq!(with.ids[0], 2, "BOS first");
    assert_eq!(&with.ids[1..], &without.ids[..]);
    assert_eq!((with.subject_first, with.subject_end, with.last()), (3, 6, 8));
    // A subject that opens the prompt starts right after the BOS token; a text without `{}` works too.
    let opening = TracePrompt::new(&tiny("gemma3"), "<t9> <t12> <t5>", "<t9> <t12>").unwrap();
    assert_eq!((opening.subject_first, opening.subject_end), (1, 3));
    assert_eq!(opening.positions(Positions::Key), vec![2, 3]);
    // The noise touches exactly the subject's rows of every sample.
    let model = tiny("gemma3");
    let noise = Noise::gaussian(&model, &with, 2, 1.0, 0).unwrap();
    let rows = noise.rows.abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    for (row, value) in rows.iter().enumerate() {
        let position = row % with.ids.len();
        let noised = (with.subject_first..with.subject_end).contains(&position);
        assert_eq!(*value > 0.0, noised, "row {row} (position {position})");
    }
}

#[test]
fn batched_restorations_equal_full_runs() {
    for (arch, window) in [("llama", None), ("gemma3", None), ("gemma3", Some(3))] {
        let model = tiny(arch);
        let layers = model.dims().layers;
        let trace = traced(&model, 0.5, 7, window);
        let prompt = &trace.prompt;
        let corrupted =
            patched_probability(&model, prompt, trace.target_id, &noise_of(&model, prompt, 7), &[]).unwrap();
        assert!((corrupted - trace.p_corrupted).abs() < 1e-6, "{arch}: {corrupted} vs {}", trace.p_corrupted);
        assert!((trace.p_clean - trace.p_corrupted).abs() > 1e-3, "{arch}: the noise must change the prediction");
        let mut worst: f64 = 0.0;
        for kind in &trace.kinds {
            for (index, &position) in trace.positions.iter().enumerate() {
                for centre in 0..layers {
                    let restore: Vec<(usize, HookPoint, usize)> = window_layers(centre, kind.window, layers)
                        .map(|layer| (layer, kind.kind.point(), position))
                        .collect();
                    let noise = noise_of(&model, prompt, 7);
                    let full = patched_probability(&model, prompt, trace.target_id, &noise, &restore).unwrap();
                    let batched = kind.p_restored[index][centre];
                    worst = worst.max((full - batched).abs());
                    assert!(
                        (full - batched).abs() < 1e-5,
                        "{arch} {:?} position {position} centre {centre}: batched {batched} vs full {full}",
                        kind.kind
                    );
                }
            }
        }
        let strongest =
            trace.kinds.iter().flat_map(|k| k.p_restored.concat()).fold(0f64, |m, p| m.max((p - corrupted).abs()));
        println!("{arch} window {window:?}: largest |batched − full| = {worst:.2e}; largest effect {strongest:.3}");
        assert!(strongest > 1e-2, "{arch}: the comparison needs restorations that matter");
    }
}

fn noise_of(model: &LoadedModel, prompt: &TracePrompt, seed: u64) -> Noise {
    Noise::gaussian(model, prompt, 3, 0.5, seed).unwrap()
}

#[test]
fn restoring_every_hidden_state_gives_the_clean_probability() {
    for arch in ["llama", "gemma3"] {
        let model = tiny(arch);
        let trace = traced(&model, 0.5, 1, None);
        let prompt = &trace.prompt;
        let everything: Vec<(usize, HookPoint, usize)> = (0..model.dims().layers)
            .flat_map(|layer| (0..prompt.ids.len()).map(move |position| (layer, HookPoint::BlockOutput, position)))
            .collect();
        let noise = noise_of(&model, prompt, 1);
        let restored = patched_probability(&model, prompt, trace.target_id, &noise, &everything).unwrap();
        assert_eq!(restored, trace.p_clean, "{arch}: all hidden states restored");
        // The last layer's state at the last token decides the prediction on its own.
        let hidden = trace.kinds.iter().find(|k| k.kind == Kind::Hidden).unwrap();
        let last = trace.positions.iter().position(|&p| p == prompt.last()).unwrap();
        assert_eq!(hidden.p_restored[last][model.dims().layers - 1], trace.p_clean, "{arch}: last layer, last token");
        // Tokens before the subject are not corrupted: restoring them changes nothing.
        for position in 0..prompt.subject_first {
            let effects = trace.effects(Kind::Hidden, position).unwrap();
            assert!(effects.iter().all(|e| e.abs() < 1e-6), "{arch}: position {position}: {effects:?}");
        }
    }
}

#[test]
fn zero_noise_has_zero_effect() {
    let model = tiny("gemma3");
    let trace = traced(&model, 0.0, 3, None);
    assert!((trace.p_clean - trace.p_corrupted).abs() < 1e-6, "{} vs {}", trace.p_clean, trace.p_corrupted);
    for kind in [Kind::Hidden, Kind::Mlp] {
        for &position in &trace.positions {
            let effects = trace.effects(kind, position).unwrap();
            assert!(effects.iter().all(|e| e.abs() < 1e-6), "{kind:?} at {position}: {effects:?}");
        }
    }
}

#[test]
fn noise_is_seeded() {
    let model = tiny("llama");
    let numbers = |t: &PromptTrace| -> Vec<f64> {
        std::iter::once(t.p_corrupted).chain(t.kinds.iter().flat_map(|k| k.p_restored.concat())).collect()
    };
    let (first, again, other) =
        (traced(&model, 0.5, 11, None), traced(&model, 0.5, 11, None), traced(&model, 0.5, 12, None));
    assert_eq!(numbers(&first), numbers(&again), "same seed, same trace");
    assert_ne!(first.p_corrupted, other.p_corrupted, "another seed, other noise");
    assert_eq!(first.p_clean, other.p_clean);
}

#[test]
fn embedding_std_includes_the_embedding_scale() {
    for (arch, scale) in [("llama", 1.0), ("gemma3", 32f64.sqrt())] {
        let model = tiny(arch);
        let matrix = model.network.token_embedding().to_dtype(DType::F64).unwrap();
        let values = matrix.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        let measured = embedding_std(&model, None).unwrap();
        assert!((measured / (std * scale) - 1.0).abs() < 1e-4, "{arch}: {measured} vs {std} × {scale}");
        let some = embedding_std(&model, Some(&[3, 7, 9])).unwrap();
        assert!(some > 0.0 && some.is_finite());
    }
}

/// The default model over known COUNTERFACT facts: recall happens at the subject's last token in the early and
/// middle layers (hidden states), and restoring states there brings the answer back.
#[test]
fn smollm2_trace_locates_known_facts() {
    let model = default_model();
    let layers = model.dims().layers;
    let records = seeded_order(&EditDataset::CounterFact.load(None).unwrap(), 0);
    let settings = TraceSettings {
        kinds: vec![Kind::Hidden, Kind::Mlp],
        window: None,
        noise_samples: 3,
        positions: Positions::Key,
    };
    let std = 3.0 * embedding_std(model, None).unwrap();
    let report = trace_sample(model, &records, 10, 0, &settings, std, &mut |_| {}).unwrap();
    println!(
        "{} known of {} examined; noise std {std:.4}; p(clean) {:.4}, p(corrupted) {:.4}; {:.1} s",
        report.kept, report.examined, report.mean_p_clean, report.mean_p_corrupted, report.seconds
    );
    let curve = |kind: Kind, category: Category| report.kind(kind).unwrap().curve(category).unwrap().clone();
    let (hidden, mlp, last) = (
        curve(Kind::Hidden, Category::LastSubject),
        curve(Kind::Mlp, Category::LastSubject),
        curve(Kind::Hidden, Category::LastToken),
    );
    println!("layer  hidden@subject-last  mlp@subject-last  hidden@last");
    for layer in 0..layers {
        println!("{layer:>5} {:>20.4} {:>17.4} {:>12.4}", hidden.effect[layer], mlp.effect[layer], last.effect[layer]);
    }
    let (hidden_peak, mlp_peak) = (hidden.peak().unwrap(), mlp.peak().unwrap());
    println!("peaks at the subject's last token: hidden {hidden_peak:?}, mlp {mlp_peak:?}");
    assert_eq!(report.kept, 10);
    assert!(report.traces.iter().all(|t| t.kinds.iter().all(|k| k.p_restored.concat().iter().all(|p| p.is_finite()))));
    assert!(report.mean_p_clean > report.mean_p_corrupted + 0.05, "the noise must hide the subject");
    assert!(hidden_peak.0 < layers / 2, "hidden-state effect at the subject's last token peaks late: {hidden_peak:?}");
    assert!(hidden_peak.1 > 0.05, "restoring the subject's last token must matter: {hidden_peak:?}");
    assert!(mlp_peak.0 < layers / 2, "MLP effect at the subject's last token peaks late: {mlp_peak:?}");
    // The paper's two sites: early and middle layers matter at the subject's last token, late layers at the last token.
    let mean = |e: &[f64]| e.iter().sum::<f64>() / e.len() as f64;
    let (early, late) = (0..layers / 3, layers - 5..layers);
    assert!(mean(&hidden.effect[early.clone()]) > mean(&last.effect[early]), "early layers");
    assert!(mean(&last.effect[late.clone()]) > mean(&hidden.effect[late]), "late layers");
}

/// `editguard trace` as a user runs it, on the tiny llama through a path registry: JSON and a heat map for one
/// prompt; a clear error without a prompt or a sample.
#[test]
fn trace_command_writes_json_and_a_heat_map() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = crate::support::fixture_dir("llama");
    let registry = dir.path().join("models.toml");
    std::fs::write(
        &registry,
        format!(
            "default_model = \"tiny\"\n\n[models.tiny]\narchitecture = \"llama\"\nsource = {{ kind = \"path\", \
             weights = [\"{}\"], config = \"{}\", tokenizer = \"{}\" }}\n",
            fixture.join("model.safetensors").display(),
            fixture.join("config.json").display(),
            crate::support::root().join("tests/fixtures/tokenizer.json").display()
        ),
    )
    .unwrap();
    let plot = dir.path().join("heat.svg");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_editguard"))
            .arg("--registry")
            .arg(&registry)
            .args(args)
            .output()
            .expect("editguard runs")
    };
    let output = run(&[
        "trace",
        "--prompt",
        PROMPT,
        "--subject",
        SUBJECT,
        "--noise-samples",
        "2",
        "--json",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let trace: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(trace["prompt"]["subject_first"], 2);
    assert_eq!(trace["positions"].as_array().unwrap().len(), 8, "every token");
    assert_eq!(trace["kinds"][1]["kind"], "mlp");
    assert_eq!(trace["kinds"][1]["window"], 10);
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));
    let output = run(&["trace", "--subject", SUBJECT]);
    assert!(!output.status.success());
    let output = run(&["trace"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("--sample N"), "{stderr}");
}
