//! Perplexity in the convention of the Butterfly-effect paper (Yang et al. 2024, "The Butterfly Effect of Model
//! Editing").
//!
//! Each sentence is tokenised without special tokens (no BOS). Tokens 2..n are scored, each given the tokens before
//! it; a sentence's perplexity is `exp(mean NLL)`, and the reported figure is the arithmetic mean of the sentences'
//! perplexities. The token-weighted corpus perplexity `exp(total NLL / scored tokens)` is reported beside it.
//! Sentences are scored in packed batches of similar length; logits are computed only at scored positions.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Result, ensure_finite};
use crate::model::kernels::fast_exp::{max_of, sum_exp_shifted, with_cpu_f32};
use crate::model::packing::length_sorted_chunks;
use crate::model::{LoadedModel, NoHooks, Path, Site};

/// Per-sentence result.
#[derive(Debug, Clone, Serialize)]
pub struct SentenceScore {
    /// Sum of the scored tokens' negative log-likelihoods (nats).
    pub nll_sum: f64,
    /// Number of scored tokens (length − 1).
    pub scored_tokens: usize,
}

impl SentenceScore {
    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.scored_tokens as f64).exp()
    }
}

/// The perplexity of a corpus.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// Arithmetic mean over sentences of per-sentence perplexity (the paper's figure).
    pub mean_sentence_ppl: f64,
    /// `exp(total NLL / total scored tokens)`.
    pub corpus_ppl: f64,
    /// Sentences scored.
    pub sentences: usize,
    /// Sentences skipped because they have fewer than two tokens.
    pub skipped_sentences: usize,
    /// Their indices in the corpus.
    pub skipped_indices: Vec<usize>,
    /// Tokens run through the model (all tokens of the scored sentences).
    pub tokens: usize,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Per-sentence details, in input order (scored sentences only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_sentence: Vec<SentenceScore>,
}

/// Batching knobs.
#[derive(Debug, Clone, Copy)]
pub struct PerplexityOptions {
    /// Upper bound on tokens per forward pass.
    pub token_budget: usize,
    /// Upper bound on logits rows computed at once (memory: rows × vocab floats).
    pub logit_rows: usize,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions { token_budget: 4096, logit_rows: 1024 }
    }
}

/// Tokenises `texts` and scores them.
pub fn perplexity(
    model: &LoadedModel,
    texts: &[String],
    options: PerplexityOptions,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<PerplexityReport> {
    let sequences = texts.iter().map(|t| model.encode(t)).collect::<Result<Vec<_>>>()?;
    perplexity_of_ids(model, &sequences, options, progress)
}

/// Scores already tokenised sentences.
pub fn perplexity_of_ids(
    model: &LoadedModel,
    sequences: &[Vec<u32>],
    options: PerplexityOptions,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<PerplexityReport> {
    let started = Instant::now();
    let kept: Vec<&Vec<u32>> = sequences.iter().filter(|s| s.len() >= 2).collect();
    let skipped: Vec<usize> = (0..sequences.len()).filter(|&i| sequences[i].len() < 2).collect();
    if kept.is_empty() {
        let shown: Vec<String> = skipped.iter().take(10).map(usize::to_string).collect();
        let more = if skipped.len() > 10 { format!(" and {} more", skipped.len() - 10) } else { String::new() };
        return Err(crate::error::Error::invalid(
            "(corpus)",
            "sentences",
            format!(
                "no sentence has the two tokens a perplexity needs (the first token is context only): sentences {}{} \
                 have fewer after tokenisation",
                shown.join(", "),
                more
            ),
        ));
    }
    let lengths: Vec<usize> = kept.iter().map(|s| s.len()).collect();
    let mut scores: Vec<Option<SentenceScore>> = vec![None; kept.len()];
    if let Some(bar) = progress {
        bar.set_length(lengths.iter().sum::<usize>() as u64);
    }
    for chunk in length_sorted_chunks(&lengths, options.token_budget) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| kept[i].as_slice()).collect();
        let nll = batch_token_nll(model, &rows, options.logit_rows)?;
        for (row, &index) in chunk.iter().enumerate() {
            let values = &nll[row];
            scores[index] = Some(SentenceScore { nll_sum: values.iter().sum(), scored_tokens: values.len() });
        }
        if let Some(bar) = progress {
            bar.inc(rows.iter().map(|r| r.len()).sum::<usize>() as u64);
        }
    }
    let per_sentence: Vec<SentenceScore> = scores.into_iter().flatten().collect();
    summarise(per_sentence, skipped, lengths.iter().sum(), started.elapsed().as_secs_f64())
}

fn summarise(
    per_sentence: Vec<SentenceScore>,
    skipped: Vec<usize>,
    tokens: usize,
    seconds: f64,
) -> Result<PerplexityReport> {
    let sentences = per_sentence.len();
    let scored_tokens: usize = per_sentence.iter().map(|s| s.scored_tokens).sum();
    let nll_total: f64 = per_sentence.iter().map(|s| s.nll_sum).sum();
    let mean = per_sentence.iter().map(SentenceScore::perplexity).sum::<f64>() / sentences.max(1) as f64;
    let corpus = (nll_total / scored_tokens.max(1) as f64).exp();
    Ok(PerplexityReport {
        mean_sentence_ppl: ensure_finite("mean sentence perplexity", if sentences == 0 { f64::NAN } else { mean })?,
        corpus_ppl: ensure_finite("corpus perplexity", if scored_tokens == 0 { f64::NAN } else { corpus })?,
        sentences,
        skipped_sentences: skipped.len(),
        skipped_indices: skipped,
        tokens,
        scored_tokens,
        seconds,
        per_sentence,
    })
}

/// At most this many logits (256 MiB of f32) exist at once: with Gemma's 262,144-token vocabulary, 256 rows; with
/// SmolLM2's 49,152, the `logit_rows` option's 1,024 decide.
pub const LOGIT_VALUES: usize = 1 << 26;

/// Negative log-likelihood of tokens 2..n of every row (each row at least two tokens long), computed from the logits
/// of row chunks so that a large vocabulary never needs all of them at once.
pub fn batch_token_nll(model: &LoadedModel, rows: &[&[u32]], logit_rows: usize) -> Result<Vec<Vec<f64>>> {
    let batch = model.batch(rows)?;
    let hidden = model.hidden_states(&batch, &NoHooks, Path::Fast)?;
    let mut sites: Vec<Site> = Vec::new();
    let mut targets: Vec<u32> = Vec::new();
    for (row, tokens) in rows.iter().enumerate() {
        for position in 0..tokens.len() - 1 {
            sites.push((row, position));
            targets.push(tokens[position + 1]);
        }
    }
    let mut nll = Vec::with_capacity(sites.len());
    let chunk = logit_rows.min(LOGIT_VALUES / model.dims().vocab.max(1)).max(1);
    for (site_chunk, target_chunk) in sites.chunks(chunk).zip(targets.chunks(chunk)) {
        let logits = model.logits_at(&hidden, &batch.packing, site_chunk, Path::Fast)?;
        nll.extend(token_nll(&logits, target_chunk)?);
    }
    let mut out = Vec::with_capacity(rows.len());
    let mut cursor = 0;
    for tokens in rows {
        out.push(nll[cursor..cursor + tokens.len() - 1].to_vec());
        cursor += tokens.len() - 1;
    }
    Ok(out)
}

/// `−log softmax(logits)[target]` per row of `(n, vocab)` logits; exponentials are summed in f64, rows are split
/// across the available cores.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (rows, vocab) = logits.dims2()?;
    let compute = |values: &[f32]| {
        let mut nll = vec![0f64; rows];
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(rows.max(1));
        let per_thread = rows.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|scope| {
            for (chunk_index, out) in nll.chunks_mut(per_thread).enumerate() {
                scope.spawn(move || {
                    for (offset, slot) in out.iter_mut().enumerate() {
                        let row = chunk_index * per_thread + offset;
                        let logits = &values[row * vocab..(row + 1) * vocab];
                        let max = max_of(logits);
                        *slot = sum_exp_shifted(logits, max).ln() - f64::from(logits[targets[row] as usize] - max);
                    }
                });
            }
        });
        nll
    };
    match with_cpu_f32(&logits, compute) {
        Some(nll) => Ok(nll),
        None => Ok(compute(&logits.flatten_all()?.to_vec1::<f32>()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_nll_matches_hand_computation() {
        let logits = Tensor::new(&[[0f32, 1.0, 2.0], [3.0, 3.0, 3.0]], &Device::Cpu).unwrap();
        let nll = token_nll(&logits, &[2, 0]).unwrap();
        let expected0 = -(2.0f64 - (1.0f64 + 1f64.exp() + 2f64.exp()).ln());
        assert!((nll[0] - expected0).abs() < 1e-6);
        assert!((nll[1] - 3f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn summary_is_mean_of_sentence_ppl_and_token_weighted_corpus_ppl() {
        let scores =
            vec![SentenceScore { nll_sum: 2.0, scored_tokens: 1 }, SentenceScore { nll_sum: 4.0, scored_tokens: 4 }];
        let report = summarise(scores, vec![2], 7, 0.0).unwrap();
        assert!((report.mean_sentence_ppl - (2f64.exp() + 1f64.exp()) / 2.0).abs() < 1e-12);
        assert!((report.corpus_ppl - (6.0f64 / 5.0).exp()).abs() < 1e-12);
        assert_eq!(report.skipped_sentences, 1);
    }

    #[test]
    fn non_finite_perplexity_is_an_error() {
        let scores = vec![SentenceScore { nll_sum: f64::NAN, scored_tokens: 3 }];
        assert!(summarise(scores, vec![], 4, 0.0).is_err());
        assert!(summarise(vec![], vec![], 0, 0.0).is_err());
    }
}
