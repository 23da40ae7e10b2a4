//! The real models' ME-PPL_50 tokens and perplexity against the PyTorch references in `../shared/reference`.
//!
//! SmolLM2 is checked under the Butterfly paper's convention (no BOS); Gemma-3 under both conventions its reference
//! records: no BOS (mean perplexity 13,860: the model breaks without it) and BOS first (139.05, its registry
//! setting). Every sentence's NLL must match to a relative 1e-4, and so must the mean and corpus perplexities.

use std::time::Instant;

use editguard::data::me_ppl::Corpus;
use editguard::metrics::perplexity::{PerplexityOptions, perplexity_of_ids};
use editguard::model::{LoadedModel, gguf::GgufFile, tokenizer};
use serde::Deserialize;

use crate::support::{default_model, gemma_model, root};

#[derive(Deserialize)]
struct Reference {
    mean_sentence_ppl: f64,
    corpus_ppl: f64,
    sentences: Vec<ReferenceSentence>,
}

#[derive(Deserialize)]
struct ReferenceSentence {
    nll_sum: f64,
    scored_tokens: usize,
    token_ids: Vec<u32>,
}

/// Gemma's file holds one [`Reference`] per convention.
#[derive(Deserialize)]
struct GemmaReference {
    no_bos: Reference,
    bos: Reference,
}

const TOLERANCE: f64 = 1e-4;
const SMOLLM2_REFERENCE: &str = "smollm2-135m-instruct-q4_1.me-ppl-50.json";
const GEMMA_REFERENCE: &str = "gemma3-270m-q4_k_m.me-ppl-50.json";

fn read_reference<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let candidates =
        [root().join("../shared/reference"), std::path::PathBuf::from("../shared/reference")].map(|d| d.join(name));
    let path = candidates.iter().find(|p| p.is_file()).expect("../shared/reference beside the checkout");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("reference JSON")
}

fn relative_error(actual: f64, expected: f64) -> f64 {
    ((actual - expected) / expected).abs()
}

/// The corpus, checked to hold as many sentences as the reference.
fn sentences(reference: &Reference) -> Vec<String> {
    let sentences = Corpus::MePpl50.load(None).expect("ME-PPL_50 in the data directory");
    assert_eq!(sentences.len(), reference.sentences.len());
    sentences
}

/// `encode` (what every caller uses, with the model's BOS setting) gives the reference ids of every sentence.
fn check_tokens(label: &str, model: &LoadedModel, reference: &Reference, encode: impl Fn(&str) -> Vec<u32>) {
    for (index, (text, expected)) in sentences(reference).iter().zip(&reference.sentences).enumerate() {
        assert_eq!(encode(text), expected.token_ids, "{label}, sentence {index}: {text:?}");
        let plain = model.encode_continuation(text).unwrap();
        assert_eq!(&model.tokenizer.decode(&plain, false).unwrap(), text, "{label}: decoding sentence {index}");
    }
}

/// The perplexity of the reference's token ids: every sentence, the mean and the corpus figure.
fn check_perplexity(label: &str, model: &LoadedModel, reference: &Reference) {
    let sequences: Vec<Vec<u32>> = reference.sentences.iter().map(|s| s.token_ids.clone()).collect();
    let report = perplexity_of_ids(model, &sequences, PerplexityOptions::default(), None).unwrap();
    assert_eq!(report.per_sentence.len(), reference.sentences.len());
    for (index, (ours, theirs)) in report.per_sentence.iter().zip(&reference.sentences).enumerate() {
        assert_eq!(ours.scored_tokens, theirs.scored_tokens, "{label}, sentence {index}");
        let error = relative_error(ours.nll_sum, theirs.nll_sum);
        assert!(
            error <= TOLERANCE,
            "{label}, sentence {index}: NLL {} vs reference {} (rel. error {error:.2e})",
            ours.nll_sum,
            theirs.nll_sum
        );
    }
    for (what, ours, theirs) in [
        ("mean ppl", report.mean_sentence_ppl, reference.mean_sentence_ppl),
        ("corpus ppl", report.corpus_ppl, reference.corpus_ppl),
    ] {
        let error = relative_error(ours, theirs);
        assert!(error <= TOLERANCE, "{label}: {what} {ours} vs {theirs} ({error:.2e})");
    }
}

#[test]
fn tokenizer_rebuilt_from_gguf_matches_reference_token_ids() {
    let reference: Reference = read_reference(SMOLLM2_REFERENCE);
    let model = default_model();
    check_tokens("smollm2", model, &reference, |text| model.encode(text).unwrap());
}

#[test]
fn me_ppl_50_perplexity_matches_pytorch_reference() {
    check_perplexity("smollm2", default_model(), &read_reference(SMOLLM2_REFERENCE));
}

#[test]
fn batching_does_not_change_perplexity() {
    let reference: Reference = read_reference(SMOLLM2_REFERENCE);
    let sequences: Vec<Vec<u32>> = reference.sentences.iter().take(12).map(|s| s.token_ids.clone()).collect();
    let one_by_one = PerplexityOptions { token_budget: 1, logit_rows: 7 };
    let a = perplexity_of_ids(default_model(), &sequences, one_by_one, None).unwrap();
    let b = perplexity_of_ids(default_model(), &sequences, PerplexityOptions::default(), None).unwrap();
    for (x, y) in a.per_sentence.iter().zip(&b.per_sentence) {
        assert!(relative_error(x.nll_sum, y.nll_sum) < 1e-5, "{} vs {}", x.nll_sum, y.nll_sum);
    }
}

/// Gemma's SentencePiece tokenizer, rebuilt from its GGUF metadata, gives transformers' ids under both conventions;
/// `encode` puts the BOS first because the registry says so, `encode_continuation` never does.
#[test]
fn gemma3_tokenizer_rebuilt_from_gguf_matches_reference_token_ids() {
    let reference: GemmaReference = read_reference(GEMMA_REFERENCE);
    let model = gemma_model();
    assert_eq!(model.prepended_bos(), Some(2), "gemma3-270m starts sequences with <bos> (id 2)");
    check_tokens("gemma3 with BOS", model, &reference.bos, |text| model.encode(text).unwrap());
    check_tokens("gemma3 without BOS", model, &reference.no_bos, |text| model.encode_continuation(text).unwrap());

    // Rebuilding is part of every load: keep an eye on its cost.
    let registry = crate::support::registry();
    let files = editguard::source::fetch(&registry, "gemma3-270m").unwrap();
    let file = GgufFile::open(&files.weights[0]).unwrap();
    assert_eq!(tokenizer::gguf_bos(&file).unwrap(), Some(2), "the file asks for BOS <bos> (id 2)");
    let started = Instant::now();
    let rebuilt = tokenizer::from_gguf(&file).unwrap();
    println!("Gemma-3 tokenizer rebuilt in {:.2} s", started.elapsed().as_secs_f64());
    assert_eq!(rebuilt.get_vocab_size(true), 262_144);
}

#[test]
fn gemma3_perplexity_matches_pytorch_with_and_without_bos() {
    let reference: GemmaReference = read_reference(GEMMA_REFERENCE);
    let model = gemma_model();
    check_perplexity("gemma3 with BOS", model, &reference.bos);
    check_perplexity("gemma3 without BOS", model, &reference.no_bos);
}

#[test]
fn sentences_too_short_to_score_are_named_by_index() {
    let model = crate::support::fixture_model("llama", "model.safetensors", candle_core::DType::F32);
    let options = PerplexityOptions::default();
    let mixed = perplexity_of_ids(&model, &[vec![1, 2, 3], vec![4], vec![], vec![5, 6]], options, None).unwrap();
    assert_eq!((mixed.sentences, mixed.skipped_sentences, mixed.skipped_indices.clone()), (2, 2, vec![1, 2]));
    let error = perplexity_of_ids(&model, &[vec![7], vec![]], options, None).unwrap_err().to_string();
    assert!(error.contains("sentences 0, 1") && !error.contains("NaN"), "{error}");
}

/// A subject whose last token merges with the text after it (`F.C.` + `,` → `.,` in Gemma's vocabulary) is located
/// as the references locate it, at the merged token; a subject whose earlier tokens differ is still refused.
#[test]
fn gemma3_subject_whose_last_token_merges_with_the_prompt_is_found() {
    use editguard::methods::subject::SubjectPrompt;
    let model = gemma_model();
    let prompt = SubjectPrompt::new(model, "{}, whose headquarters are in", "Keshavarz F.C.").unwrap();
    let head = model.encode("Keshavarz F.C.").unwrap();
    assert_eq!(prompt.subject_last, head.len() - 1);
    assert_eq!(prompt.ids[..head.len() - 1], head[..head.len() - 1]);
    assert_ne!(prompt.ids[head.len() - 1], head[head.len() - 1], "the last subject token merged with the comma");
    assert_eq!(model.tokenizer.decode(&prompt.ids[prompt.subject_last..=prompt.subject_last], false).unwrap(), ".,");
}
