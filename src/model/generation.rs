//! Greedy decoding with a key/value cache, for the tasks that score generated text.
//!
//! The token prefix all prompts share (e.g. few-shot examples) runs once and is kept as a [`SharedPrefix`]; the rest
//! of the prompts of a chunk run as one packed batch in [`KvMode::Decode`], which appends their keys and values to a
//! per-sequence [`crate::model::DecodeCache`]; then each step runs only the newest token of every sequence. A step
//! therefore costs one token per sequence plus attention over its context, instead of a full pass over prompt and
//! continuation. Decoding is greedy
//! (arg-max, ties to the lowest id, as PyTorch's argmax), stops at a special token (end of text, end of turn), after
//! `max_new_tokens`, or when the decoded continuation contains a stop string; the stop string and what follows it are
//! cut off. The result equals re-running the whole sequence at every step (tested).

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::Tensor;

use super::LoadedModel;
use super::decode::SharedPrefix;
use super::hooks::{NoHooks, Site};
use super::layers::Path;
use super::packing::{PackedBatch, Packing, length_sorted_chunks};
use super::prefix::{KvMode, KvRecorder};
use crate::error::{Error, Result};

/// One prompt to continue.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// The prompt text (encoded without special tokens).
    pub prompt: String,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Decoding stops where the continuation first contains one of these; the text from it on is cut.
    pub stop: Vec<String>,
}

/// A greedy continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The decoded continuation, cut before the first stop string.
    pub text: String,
    /// The generated token ids (including any that held the stop string).
    pub tokens: Vec<u32>,
}

/// Greedy continuations of `requests`, in chunks of about `token_budget` tokens (prompts plus new tokens).
pub fn generate_greedy(
    model: &LoadedModel,
    requests: &[GenerationRequest],
    token_budget: usize,
) -> Result<Vec<Generation>> {
    let mut prompts = Vec::with_capacity(requests.len());
    for (index, request) in requests.iter().enumerate() {
        let ids = model.encode(&request.prompt)?;
        if ids.is_empty() || request.max_new_tokens == 0 {
            return Err(Error::invalid(
                format!("generation request {index}"),
                "prompt",
                "expected a non-empty prompt and max_new_tokens ≥ 1",
            ));
        }
        prompts.push(ids);
    }
    let special = special_tokens(model);
    let shared = shared_prefix(model, &prompts)?;
    let sizes: Vec<usize> =
        prompts.iter().zip(requests).map(|(p, r)| p.len() - shared.rows() + r.max_new_tokens).collect();
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    for chunk in length_sorted_chunks(&sizes, token_budget) {
        let chunk_prompts: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let chunk_requests: Vec<&GenerationRequest> = chunk.iter().map(|&i| &requests[i]).collect();
        let generated = generate_chunk(model, &shared, &chunk_prompts, &chunk_requests, &special)?;
        for (&index, generation) in chunk.iter().zip(generated) {
            results[index] = Some(generation);
        }
    }
    Ok(results.into_iter().map(|g| g.unwrap_or_else(|| unreachable!("every request is in one chunk"))).collect())
}

/// Shorter common prefixes are not worth a separate pass.
const MIN_SHARED_PREFIX: usize = 16;

/// The keys and values of the token prefix every prompt starts with (each prompt keeps at least its last token).
fn shared_prefix(model: &LoadedModel, prompts: &[Vec<u32>]) -> Result<Arc<SharedPrefix>> {
    let layers = model.dims().layers;
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(1);
    let first = &prompts[0];
    let common = (0..shortest - 1).take_while(|&i| prompts.iter().all(|p| p[i] == first[i])).count();
    if prompts.len() < 2 || common < MIN_SHARED_PREFIX {
        return Ok(SharedPrefix::empty(layers));
    }
    let batch = model.batch(&[&first[..common]])?;
    let recorder = KvRecorder::default();
    let embedded = model.embed(&batch)?;
    model.run_layers_kv(embedded, &batch.packing, 0..layers, &NoHooks, Path::Fast, KvMode::Record(&recorder))?;
    model.shared_prefix(recorder, common)
}

/// The ids of the tokenizer's special tokens: any of them ends a continuation.
fn special_tokens(model: &LoadedModel) -> HashSet<u32> {
    model.tokenizer.get_added_tokens_decoder().iter().filter(|(_, token)| token.special).map(|(&id, _)| id).collect()
}

/// Where a sequence's decoding stands.
struct Progress<'a> {
    request: &'a GenerationRequest,
    tokens: Vec<u32>,
    text: Option<String>,
}

impl Progress<'_> {
    /// Records the next token; sets `text` once the continuation is finished.
    fn push(&mut self, model: &LoadedModel, token: u32, special: &HashSet<u32>) -> Result<()> {
        if self.text.is_some() {
            return Ok(());
        }
        let ended = special.contains(&token);
        if !ended {
            self.tokens.push(token);
        }
        let decoded = model.tokenizer.decode(&self.tokens, false)?;
        let cut = self.request.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| decoded.find(s.as_str())).min();
        if let Some(at) = cut {
            self.text = Some(decoded[..at].to_string());
        } else if ended || self.tokens.len() >= self.request.max_new_tokens {
            self.text = Some(decoded);
        }
        Ok(())
    }
}

fn generate_chunk(
    model: &LoadedModel,
    shared: &Arc<SharedPrefix>,
    prompts: &[&[u32]],
    requests: &[&GenerationRequest],
    special: &HashSet<u32>,
) -> Result<Vec<Generation>> {
    let layers = model.dims().layers;
    let mut progress: Vec<Progress> =
        requests.iter().map(|&request| Progress { request, tokens: Vec::new(), text: None }).collect();
    let cache = model.decode_cache(shared.clone(), prompts.len());
    // Each step runs every active sequence's pending tokens (first the prompt after the shared prefix, then the token
    // just chosen) at their positions in the sequence; finished sequences leave the batch and the cache.
    let mut pending: Vec<Vec<u32>> = prompts.iter().map(|p| p[shared.rows()..].to_vec()).collect();
    let mut starts: Vec<usize> = vec![shared.rows(); prompts.len()];
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    while !active.is_empty() {
        let lengths: Vec<usize> = active.iter().map(|&i| pending[i].len()).collect();
        let active_starts: Vec<usize> = active.iter().map(|&i| starts[i]).collect();
        let ids: Vec<u32> = active.iter().flat_map(|&i| pending[i].iter().copied()).collect();
        let packing = Packing::starting_at(&lengths, &active_starts, &model.device)?;
        let step = PackedBatch { ids: Tensor::from_vec(ids, packing.rows(), &model.device)?, packing };
        let hidden = model.run_layers_kv(
            model.embed(&step)?,
            &step.packing,
            0..layers,
            &NoHooks,
            Path::Fast,
            KvMode::Decode(&cache),
        )?;
        let last: Vec<Site> = lengths.iter().enumerate().map(|(row, &length)| (row, length - 1)).collect();
        let next = model.logits_at(&hidden, &step.packing, &last, Path::Fast)?.argmax(1)?.to_vec1::<u32>()?;
        for (&i, &token) in active.iter().zip(&next) {
            progress[i].push(model, token, special)?;
            starts[i] += pending[i].len();
            pending[i] = vec![token];
        }
        let keep: Vec<bool> = active.iter().map(|&i| progress[i].text.is_none()).collect();
        if keep.contains(&false) {
            cache.retain(&keep)?;
            active = active.iter().zip(&keep).filter(|(_, k)| **k).map(|(&i, _)| i).collect();
        }
    }
    Ok(progress.into_iter().map(|p| Generation { text: p.text.unwrap_or_default(), tokens: p.tokens }).collect())
}
