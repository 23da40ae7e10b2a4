//! Long inputs for `editguard bench`: perplexity of single long documents and the time per generated token over a
//! long cache.
//!
//! ME-PPL's sentences are short (27 tokens on average), so its throughput says little about what users also score:
//! documents of thousands of tokens, few-shot prompts of 500–1,000 tokens, generation over a growing cache. A long
//! document here is ME-PPL_1k's sentences concatenated in corpus order until the text has at least the asked number
//! of tokens — the same text every run and for every implementation (PyTorch reads it from a temporary corpus file).
//! Its perplexity pass runs as one sequence, whatever the token budget. Decoding is timed as the difference between
//! a greedy continuation of `new` tokens and one of a single token after the same long prompt, divided by the extra
//! tokens, so the prompt's own pass cancels out.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::metrics::perplexity::{PerplexityOptions, perplexity};
use crate::model::LoadedModel;
use crate::model::generation::{GenerationRequest, generate_greedy};

/// Perplexity throughput on one long document.
#[derive(Debug, Clone, Serialize)]
pub struct LongDocument {
    /// The length asked for.
    pub asked_tokens: usize,
    /// Its tokens (BOS included when the model uses one).
    pub tokens: usize,
    /// Seconds of the best pass.
    pub seconds: f64,
    /// Tokens per second of the best pass.
    pub tokens_per_second: f64,
    /// Perplexity of the document (a check that implementations computed the same thing).
    pub ppl: f64,
}

/// Greedy decoding over a long cache.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeSpeed {
    /// Tokens in the cache when decoding starts (the prompt).
    pub cache_tokens: usize,
    /// Tokens generated beyond the first.
    pub timed_tokens: usize,
    /// Seconds per generated token.
    pub seconds_per_token: f64,
}

/// ME-PPL_1k's sentences concatenated in order until the text has at least `tokens` tokens.
pub fn document_of(model: &LoadedModel, sentences: &[String], tokens: usize) -> Result<String> {
    let mut text = String::new();
    for sentence in sentences {
        text.push_str(sentence);
        // Tokens are rarely shorter than two bytes: encode only once the text could be long enough.
        if text.len() >= 2 * tokens && model.encode(&text)?.len() >= tokens {
            return Ok(text);
        }
    }
    Err(Error::invalid("(bench)", "corpus", format!("too short to build a document of {tokens} tokens")))
}

/// Perplexity throughput on `document`, best of `repeats`.
pub fn long_document(model: &LoadedModel, document: &str, asked: usize, repeats: usize) -> Result<LongDocument> {
    let tokens = model.encode(document)?.len();
    let options =
        PerplexityOptions { token_budget: tokens.max(PerplexityOptions::default().token_budget), ..Default::default() };
    let mut best: Option<(f64, f64)> = None;
    for _ in 0..repeats.max(1) {
        let report = perplexity(model, &[document.to_string()], options, None)?;
        if best.is_none_or(|(seconds, _)| report.seconds < seconds) {
            best = Some((report.seconds, report.mean_sentence_ppl));
        }
    }
    let (seconds, ppl) = best.expect("at least one repeat");
    Ok(LongDocument { asked_tokens: asked, tokens, seconds, tokens_per_second: tokens as f64 / seconds, ppl })
}

/// Seconds per generated token after `document` as the prompt (greedy, no stop strings), over `new` tokens.
pub fn decode_speed(model: &LoadedModel, document: &str, new: usize) -> Result<DecodeSpeed> {
    let run = |max_new_tokens: usize| -> Result<(f64, usize)> {
        let request = GenerationRequest { prompt: document.to_string(), max_new_tokens, stop: Vec::new() };
        let started = Instant::now();
        let generated = generate_greedy(model, &[request], usize::MAX)?;
        Ok((started.elapsed().as_secs_f64(), generated[0].tokens.len()))
    };
    let (one, _) = run(1)?;
    let (many, produced) = run(new.max(2))?;
    let timed = produced.saturating_sub(1).max(1);
    Ok(DecodeSpeed {
        cache_tokens: model.encode(document)?.len(),
        timed_tokens: timed,
        seconds_per_token: (many - one).max(0.0) / timed as f64,
    })
}
