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
    let mut progress: Vec<Progress> =
        requests.iter().map(|&request| Progress { request, tokens: Vec::new(), text: None }).collect();
    let cache = model.decode_cache(shared.clone(), prompts.len());
    // Each step runs every active sequence's pending tokens (first the prompt after the shared prefix, then the token
    // just chosen) at their positions in the sequence; finished sequences leave the batch and the cache.
    let mut steps = DecodeSteps::new(prompts, shared.rows());
    while !steps.active.is_empty() {
        let next = steps.logits(model, &cache)?.argmax(1)?.to_vec1::<u32>()?;
        for (&i, &token) in steps.active.iter().zip(&next) {
            progress[i].push(model, token, special)?;
        }
        let keep: Vec<bool> = steps.active.iter().map(|&i| progress[i].text.is_none()).collect();
        steps.advance(&next, &keep, &cache)?;
    }
    Ok(progress.into_iter().map(|p| Generation { text: p.text.unwrap_or_default(), tokens: p.tokens }).collect())
}

/// The decoding state of a batch of sequences: which are still running, and the tokens each must run next.
struct DecodeSteps {
    /// Tokens not yet run, per sequence (first the prompt after any shared prefix, then the token just chosen).
    pending: Vec<Vec<u32>>,
    /// Position of each sequence's first pending token.
    starts: Vec<usize>,
    /// The sequences still running, in order.
    active: Vec<usize>,
}

impl DecodeSteps {
    fn new(prompts: &[&[u32]], shared_rows: usize) -> Self {
        DecodeSteps {
            pending: prompts.iter().map(|p| p[shared_rows..].to_vec()).collect(),
            starts: vec![shared_rows; prompts.len()],
            active: (0..prompts.len()).collect(),
        }
    }

    /// Runs every active sequence's pending tokens at their positions, appending their keys and values to `cache`;
    /// returns the logits `(active, vocab)` at each one's last token.
    fn logits(&self, model: &LoadedModel, cache: &super::DecodeCache) -> Result<Tensor> {
        let lengths: Vec<usize> = self.active.iter().map(|&i| self.pending[i].len()).collect();
        let starts: Vec<usize> = self.active.iter().map(|&i| self.starts[i]).collect();
        let ids: Vec<u32> = self.active.iter().flat_map(|&i| self.pending[i].iter().copied()).collect();
        let packing = Packing::starting_at(&lengths, &starts, &model.device)?;
        let step = PackedBatch { ids: Tensor::from_vec(ids, packing.rows(), &model.device)?, packing };
        let layers = model.dims().layers;
        let embedded = model.embed(&step)?;
        let hidden =
            model.run_layers_kv(embedded, &step.packing, 0..layers, &NoHooks, Path::Fast, KvMode::Decode(cache))?;
        let last: Vec<Site> = lengths.iter().enumerate().map(|(row, &length)| (row, length - 1)).collect();
        model.logits_at(&hidden, &step.packing, &last, Path::Fast)
    }

    /// Makes `next[j]` the pending token of the `j`-th active sequence; the sequences whose `keep` is false leave
    /// the batch and the cache.
    fn advance(&mut self, next: &[u32], keep: &[bool], cache: &super::DecodeCache) -> Result<()> {
        for (&i, &token) in self.active.iter().zip(next) {
            self.starts[i] += self.pending[i].len();
            self.pending[i] = vec![token];
        }
        if keep.contains(&false) {
            cache.retain(keep)?;
            self.active = self.active.iter().zip(keep).filter(|(_, k)| **k).map(|(&i, _)| i).collect();
        }
        Ok(())
    }
}

/// Continues each prompt until it holds `targets[i]` tokens, choosing every new token with `choose` (called with
/// one sequence's next-token logits `(vocab,)`, sequences in order at each step). No prefix is shared and nothing
/// stops a sequence early: this serves sampling, e.g. the context templates of ROME and MEMIT.
pub fn extend_each(
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    targets: &[usize],
    choose: &mut dyn FnMut(&Tensor) -> Result<u32>,
) -> Result<Vec<Vec<u32>>> {
    if prompts.iter().zip(targets).any(|(p, &t)| p.is_empty() || t <= p.len()) || prompts.len() != targets.len() {
        return Err(Error::invalid("(generation)", "targets", "one target per non-empty prompt, longer than it"));
    }
    let mut rows: Vec<Vec<u32>> = prompts.to_vec();
    let views: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let cache = model.decode_cache(SharedPrefix::empty(model.dims().layers), prompts.len());
    let mut steps = DecodeSteps::new(&views, 0);
    while !steps.active.is_empty() {
        let logits = steps.logits(model, &cache)?;
        let mut next = Vec::with_capacity(steps.active.len());
        for (slot, &i) in steps.active.iter().enumerate() {
            let token = choose(&logits.get(slot)?)?;
            rows[i].push(token);
            next.push(token);
        }
        let keep: Vec<bool> = steps.active.iter().map(|&i| rows[i].len() < targets[i]).collect();
        steps.advance(&next, &keep, &cache)?;
    }
    Ok(rows)
}
