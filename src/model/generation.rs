//! Greedy decoding with a key/value cache, for the tasks that score generated text.
//!
//! The prompts of a chunk run once as a packed batch that records every layer's keys and values; then each step runs
//! only the newest token of every sequence over the cached prefix ([`KvMode::PrefixRecord`]) and appends that token's
//! keys and values to the cache ([`crate::model::PrefixCache::extended`]). A step therefore costs one token per
//! sequence plus attention over its context, instead of a full pass over prompt and continuation. Decoding is greedy
//! (arg-max, ties to the lowest id, as PyTorch's argmax), stops at a special token (end of text, end of turn), after
//! `max_new_tokens`, or when the decoded continuation contains a stop string; the stop string and what follows it are
//! cut off. The result equals re-running the whole sequence at every step (tested).

use std::collections::HashSet;

use super::LoadedModel;
use super::hooks::{NoHooks, Site};
use super::layers::Path;
use super::packing::length_sorted_chunks;
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
    let sizes: Vec<usize> = prompts.iter().zip(requests).map(|(p, r)| p.len() + r.max_new_tokens).collect();
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    for chunk in length_sorted_chunks(&sizes, token_budget) {
        let chunk_prompts: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let chunk_requests: Vec<&GenerationRequest> = chunk.iter().map(|&i| &requests[i]).collect();
        let generated = generate_chunk(model, &chunk_prompts, &chunk_requests, &special)?;
        for (&index, generation) in chunk.iter().zip(generated) {
            results[index] = Some(generation);
        }
    }
    Ok(results.into_iter().map(|g| g.unwrap_or_else(|| unreachable!("every request is in one chunk"))).collect())
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
    prompts: &[&[u32]],
    requests: &[&GenerationRequest],
    special: &HashSet<u32>,
) -> Result<Vec<Generation>> {
    let layers = model.dims().layers;
    let mut progress: Vec<Progress> =
        requests.iter().map(|&request| Progress { request, tokens: Vec::new(), text: None }).collect();
    let batch = model.batch(prompts)?;
    let recorder = KvRecorder::default();
    let hidden = model.run_layers_kv(
        model.embed(&batch)?,
        &batch.packing,
        0..layers,
        &NoHooks,
        Path::Fast,
        KvMode::Record(&recorder),
    )?;
    let last: Vec<Site> = prompts.iter().enumerate().map(|(row, p)| (row, p.len() - 1)).collect();
    let mut next = model.logits_at(&hidden, &batch.packing, &last, Path::Fast)?.argmax(1)?.to_vec1::<u32>()?;
    let sources: Vec<usize> = (0..prompts.len()).collect();
    let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut cache = model.shared_prefix_cache(recorder, &batch.packing, &sources, &lengths)?;
    // Every sequence's tokens so far: the embeddings of the newest token are taken from the whole sequence, so that
    // absolute position embeddings see its position.
    let mut sequences: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    loop {
        for ((state, sequence), &token) in progress.iter_mut().zip(&mut sequences).zip(&next) {
            state.push(model, token, special)?;
            sequence.push(token);
        }
        if progress.iter().all(|p| p.text.is_some()) {
            break;
        }
        let rows: Vec<&[u32]> = sequences.iter().map(|s| s.as_slice()).collect();
        let full = model.batch(&rows)?;
        let starts: Vec<usize> = sequences.iter().map(|s| s.len() - 1).collect();
        let (step, embedded) = full.packing.suffix_rows(&starts, &model.embed(&full)?)?;
        let recorder = KvRecorder::default();
        let hidden = model.run_layers_kv(
            embedded,
            &step,
            0..layers,
            &NoHooks,
            Path::Fast,
            KvMode::PrefixRecord(&cache, &recorder),
        )?;
        let sites: Vec<Site> = (0..sequences.len()).map(|row| (row, 0)).collect();
        next = model.logits_at(&hidden, &step, &sites, Path::Fast)?.argmax(1)?.to_vec1::<u32>()?;
        cache = model.extend_prefix_cache(&cache, recorder, &step)?;
    }
    Ok(progress.into_iter().map(|p| Generation { text: p.text.unwrap_or_default(), tokens: p.tokens }).collect())
}
