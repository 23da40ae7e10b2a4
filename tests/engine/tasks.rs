//! Downstream tasks: every loader reads its full evaluation split, and multiple-choice scoring with the shared
//! context cache equals scoring each context + option in full, on the real model and on the tiny architectures
//! (rotary llama and gptj, gpt2 with absolute positions).

use candle_core::DType;
use editguard::metrics::edit_quality::score_continuations;
use editguard::model::generation::extend_each;
use editguard::model::{GenerationRequest, LoadedModel, NoHooks, PackedBatch, Path, generate_greedy};
use editguard::tasks::choice::predict;
use editguard::tasks::{ChoiceItem, TASKS, TaskItems, task_entry};

use crate::support::{default_model, fixture_model};

/// Summed log-probability and "every token is the arg-max" of each choice, from a full pass over context + choice.
fn full_scores(model: &LoadedModel, item: &ChoiceItem) -> Vec<(f64, bool)> {
    let pairs: Vec<(String, String)> = item.choices.iter().map(|c| (item.context.clone(), format!(" {c}"))).collect();
    score_continuations(model, &pairs)
        .unwrap()
        .iter()
        .zip(&item.choices)
        .map(|(s, c)| (-s.mean_nll * model.encode(&format!(" {c}")).unwrap().len() as f64, s.token_accuracy == 1.0))
        .collect()
}

fn assert_shared_context_matches_full(model: &LoadedModel, items: &[ChoiceItem], budget: usize) {
    let predictions = predict(model, items, budget).unwrap();
    for (item, prediction) in items.iter().zip(&predictions) {
        let full = full_scores(model, item);
        for ((shared, greedy), (full, full_greedy)) in
            prediction.loglikelihoods.iter().zip(&prediction.greedy).zip(&full)
        {
            assert!((shared - full).abs() < 2e-3 * full.abs().max(1.0), "shared {shared} vs full {full} for {item:?}");
            assert_eq!(greedy, full_greedy, "greedy flags differ for {item:?}");
        }
    }
}

#[test]
fn every_task_reads_its_evaluation_split() {
    let expected = [
        ("piqa", 1838),
        ("hellaswag", 10042),
        ("mmlu", 438),
        ("mmlu-5shot", 438),
        ("sst2", 872),
        ("sst2-gu", 872),
        ("rte", 277),
        ("rte-gu", 277),
        ("boolq", 3270),
        ("boolq-gu", 3270),
        ("mutual", 886),
        ("mutual-gu", 886),
        ("lambada", 5153),
        ("nq-open", 3610),
        ("squad2", 706),
        ("gsm8k", 1314),
        ("samsum", 819),
        ("conll2003", 4 * 3453),
    ];
    assert_eq!(TASKS.len(), expected.len(), "every task has an expected count");
    for entry in TASKS {
        let items = (entry.build)().items(None).unwrap_or_else(|e| panic!("{}: {e}", entry.name));
        let count = expected.iter().find(|(n, _)| *n == entry.name).map(|(_, c)| *c);
        assert_eq!(Some(items.len()), count, "{}", entry.name);
        match &items {
            TaskItems::Choice(items) => {
                assert!(items.iter().all(|i| i.gold < i.choices.len() && !i.context.is_empty()), "{}", entry.name)
            }
            TaskItems::Generation(items) => assert!(
                items.iter().all(|i| !i.request.prompt.is_empty() && i.request.max_new_tokens > 0),
                "{}",
                entry.name
            ),
        }
        let sample = items.clone().select(Some(20), 7);
        assert_eq!(sample.len(), 20);
        assert_eq!(sample, items.select(Some(20), 7), "{}: seeded subsets repeat", entry.name);
    }
}

#[test]
fn squad_unanswerable_questions_have_no_reference() {
    let TaskItems::Generation(items) = (task_entry("squad2").unwrap().build)().items(None).unwrap() else {
        panic!("squad2 is a generation task")
    };
    assert_eq!(items.iter().filter(|i| i.references.is_empty()).count(), 320);
}

#[test]
fn shared_context_scoring_equals_full_scoring_on_the_default_model() {
    let items = vec![
        ChoiceItem {
            context: "Question: How do I keep bread fresh?\nAnswer:".into(),
            choices: vec!["Store it in a sealed bag.".into(), "Leave it in the rain.".into()],
            gold: 0,
        },
        ChoiceItem {
            context: "The capital of France is".into(),
            choices: vec!["Paris".into(), "Berlin".into(), "a large city in Europe".into(), "the".into()],
            gold: 0,
        },
    ];
    // A small budget splits the items into several chunks.
    assert_shared_context_matches_full(default_model(), &items, 24);
    assert_shared_context_matches_full(default_model(), &items, 4096);
}

#[test]
fn shared_context_scoring_equals_full_scoring_on_tiny_models() {
    let items = vec![
        ChoiceItem {
            context: "<t1> <t5> <t9> <t2>".into(),
            choices: vec!["<t3> <t4>".into(), "<t7>".into(), "<t8> <t8> <t1>".into()],
            gold: 1,
        },
        ChoiceItem {
            context: "<t6> <t13> <t14> <t15> <t16>".into(),
            choices: vec!["<t10>".into(), "<t11> <t12>".into()],
            gold: 0,
        },
        ChoiceItem { context: "<t20>".into(), choices: vec!["<t21>".into(), "<t22> <t23>".into()], gold: 1 },
    ];
    for arch in ["llama", "gpt2", "gptj", "gemma3"] {
        let file = "model.safetensors";
        let model = fixture_model(arch, file, DType::F32);
        assert_shared_context_matches_full(&model, &items, 4096);
    }
}

/// Greedy continuation by re-running the whole sequence at every step (no cache), up to `steps` tokens.
fn naive_greedy(model: &LoadedModel, prompt: &str, steps: usize) -> Vec<u32> {
    let mut sequence = model.encode(prompt).unwrap();
    let mut generated = Vec::new();
    for _ in 0..steps {
        let batch = PackedBatch::single(&sequence, &model.device).unwrap();
        let logits = model.all_logits(&batch, &NoHooks, Path::Fast).unwrap();
        let last = logits.get(sequence.len() - 1).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        generated.push(last);
        sequence.push(last);
    }
    generated
}

fn assert_cached_generation_matches_naive(model: &LoadedModel, prompts: &[&str], steps: usize, budget: usize) {
    // Different caps make sequences finish (and leave the batch) at different steps.
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest { prompt: p.to_string(), max_new_tokens: steps - i % 3, stop: vec![] })
        .collect();
    let generated = generate_greedy(model, &requests, budget).unwrap();
    for (prompt, generation) in prompts.iter().zip(&generated) {
        let naive = naive_greedy(model, prompt, steps);
        let compared = generation.tokens.len();
        assert!(compared > 0, "nothing generated for {prompt:?}");
        assert_eq!(generation.tokens, naive[..compared], "cached and naive greedy differ for {prompt:?}");
        assert_eq!(generation.text, model.tokenizer.decode(&generation.tokens, false).unwrap());
    }
}

#[test]
fn cached_greedy_generation_equals_recomputing_every_step_on_the_default_model() {
    let prompts = ["The capital of France is", "Q: who wrote the novel Moby-Dick?\nA:", "1, 2, 3, 4,"];
    // A small budget gives one prompt per chunk; a large one decodes the ragged prompts together.
    assert_cached_generation_matches_naive(default_model(), &prompts, 12, 16);
    assert_cached_generation_matches_naive(default_model(), &prompts, 12, 4096);
    // Prompts that share a long prefix (few-shot examples) decode over one shared copy of it.
    let shots = "Question: What is 2 plus 3?\nAnswer: 5\n\nQuestion: What is 7 minus 4?\nAnswer: 3\n\n";
    let few_shot: Vec<String> =
        ["What is 6 plus 1?", "What is 9 minus 8?"].iter().map(|q| format!("{shots}Question: {q}\nAnswer:")).collect();
    let few_shot: Vec<&str> = few_shot.iter().map(String::as_str).collect();
    assert_cached_generation_matches_naive(default_model(), &few_shot, 8, 4096);
}

#[test]
fn cached_greedy_generation_equals_recomputing_every_step_on_tiny_models() {
    let prompts = ["<t1> <t5> <t9> <t2>", "<t6>", "<t13> <t14> <t15> <t16> <t17> <t18>"];
    let common = "<t3> <t4> ".repeat(10);
    let shared = [format!("{common}<t7>"), format!("{common}<t8> <t9>")];
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    for arch in ["llama", "gpt2", "gptj", "gemma3"] {
        let file = "model.safetensors";
        let model = fixture_model(arch, file, DType::F32);
        assert_cached_generation_matches_naive(&model, &prompts, 6, 4096);
        assert_cached_generation_matches_naive(&model, &shared, 6, 4096);
    }
}

#[test]
fn extending_with_a_chooser_equals_recomputing_every_step() {
    // The sampling path of the context templates: each sequence runs to its own length, tokens chosen per sequence.
    let texts = ["The", "Therefore the", "I"];
    for model in [default_model(), &fixture_model("gpt2", "model.safetensors", DType::F32)] {
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| model.encode(t).unwrap()).collect();
        let targets: Vec<usize> = prompts.iter().enumerate().map(|(i, p)| p.len() + 3 + 2 * i).collect();
        let mut calls = 0;
        let mut argmax = |logits: &candle_core::Tensor| {
            calls += 1;
            Ok(logits.argmax(0)?.to_scalar::<u32>()?)
        };
        let extended = extend_each(model, &prompts, &targets, &mut argmax).unwrap();
        for ((prompt, text), (row, &target)) in prompts.iter().zip(texts).zip(extended.iter().zip(&targets)) {
            assert_eq!(row.len(), target);
            assert_eq!(row[..prompt.len()], prompt[..]);
            assert_eq!(row[prompt.len()..], naive_greedy(model, text, target - prompt.len())[..], "{text:?}");
        }
        assert_eq!(calls, targets.iter().zip(&prompts).map(|(t, p)| t - p.len()).sum::<usize>());
    }
}

#[test]
fn generation_stops_at_a_stop_string_and_cuts_it() {
    let model = default_model();
    let request = GenerationRequest { prompt: "1, 2, 3, 4,".into(), max_new_tokens: 20, stop: vec![",".into()] };
    let generation = generate_greedy(model, &[request], 4096).unwrap().remove(0);
    assert!(!generation.text.contains(','), "stop string kept: {:?}", generation.text);
    assert!(generation.tokens.len() < 20, "decoding went on past the stop string: {:?}", generation.tokens);
    assert_eq!(generation.text.trim(), "5");
}
