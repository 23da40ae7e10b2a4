//! The default model's ME-PPL_50 perplexity against the PyTorch reference in `../shared/reference`.

use editguard::data::me_ppl::Corpus;
use editguard::metrics::perplexity::{PerplexityOptions, perplexity_of_ids};
use serde::Deserialize;

use crate::support::{default_model, root};

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

const TOLERANCE: f64 = 1e-4;

fn reference() -> Reference {
    let candidates = [
        root().join("../shared/reference/smollm2-135m-instruct-q4_1.me-ppl-50.json"),
        std::path::PathBuf::from("../shared/reference/smollm2-135m-instruct-q4_1.me-ppl-50.json"),
    ];
    let path = candidates.iter().find(|p| p.is_file()).expect("../shared/reference beside the checkout");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("reference JSON")
}

fn relative_error(actual: f64, expected: f64) -> f64 {
    ((actual - expected) / expected).abs()
}

#[test]
fn tokenizer_rebuilt_from_gguf_matches_reference_token_ids() {
    let reference = reference();
    let sentences = Corpus::MePpl50.load(None).expect("ME-PPL_50 in the data directory");
    assert_eq!(sentences.len(), reference.sentences.len());
    let model = default_model();
    for (index, (text, expected)) in sentences.iter().zip(&reference.sentences).enumerate() {
        let ids = model.encode(text).unwrap();
        assert_eq!(ids, expected.token_ids, "sentence {index}: {text:?}");
    }
}

#[test]
fn me_ppl_50_perplexity_matches_pytorch_reference() {
    let reference = reference();
    let sequences: Vec<Vec<u32>> = reference.sentences.iter().map(|s| s.token_ids.clone()).collect();
    let report = perplexity_of_ids(default_model(), &sequences, PerplexityOptions::default(), None).unwrap();
    assert_eq!(report.per_sentence.len(), reference.sentences.len());
    for (index, (ours, theirs)) in report.per_sentence.iter().zip(&reference.sentences).enumerate() {
        assert_eq!(ours.scored_tokens, theirs.scored_tokens, "sentence {index}");
        let error = relative_error(ours.nll_sum, theirs.nll_sum);
        assert!(
            error <= TOLERANCE,
            "sentence {index}: NLL {} vs reference {} (rel. error {error:.2e})",
            ours.nll_sum,
            theirs.nll_sum
        );
    }
    let mean_error = relative_error(report.mean_sentence_ppl, reference.mean_sentence_ppl);
    let corpus_error = relative_error(report.corpus_ppl, reference.corpus_ppl);
    assert!(
        mean_error <= TOLERANCE,
        "mean ppl {} vs {} ({mean_error:.2e})",
        report.mean_sentence_ppl,
        reference.mean_sentence_ppl
    );
    assert!(
        corpus_error <= TOLERANCE,
        "corpus ppl {} vs {} ({corpus_error:.2e})",
        report.corpus_ppl,
        reference.corpus_ppl
    );
}

#[test]
fn batching_does_not_change_perplexity() {
    let reference = reference();
    let sequences: Vec<Vec<u32>> = reference.sentences.iter().take(12).map(|s| s.token_ids.clone()).collect();
    let one_by_one = PerplexityOptions { token_budget: 1, logit_rows: 7 };
    let a = perplexity_of_ids(default_model(), &sequences, one_by_one, None).unwrap();
    let b = perplexity_of_ids(default_model(), &sequences, PerplexityOptions::default(), None).unwrap();
    for (x, y) in a.per_sentence.iter().zip(&b.per_sentence) {
        assert!(relative_error(x.nll_sum, y.nll_sum) < 1e-5, "{} vs {}", x.nll_sum, y.nll_sum);
    }
}
