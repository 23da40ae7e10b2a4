//! Loglikelihood multiple choice, in lm-evaluation-harness's convention, with each item's context computed once.
//!
//! An item is a context and its choices; choice j is scored as the summed log-probability of the tokens of
//! `" " + choice_j` after the context. The prediction is the choice with the highest sum (`acc`) and the one with
//! the highest sum per character of the choice (`acc_norm`, lm-eval's length normalisation). Context and choice are
//! tokenised separately (lm-eval tokenises the joint string and splits it; the two differ only where a tokenizer
//! would merge across the seam).
//!
//! The options of an item share their context, so the context is run once: a first pass over the contexts of a chunk
//! of items records every layer's keys and values; the options then run as short sequences made of the context's
//! last token and the option's tokens, attending to their context's cached keys and values
//! ([`crate::model::PrefixCache::shared`]). The scores equal a full pass over context + option (tested).

use super::{Metric, Scored};
use crate::error::{Error, Result};
use crate::metrics::perplexity::token_nll;
use crate::model::packing::length_sorted_chunks;
use crate::model::{KvMode, KvRecorder, LoadedModel, NoHooks, Path, Site};

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    /// The prompt before the choices.
    pub context: String,
    /// The choices, without the leading space (it is added when scoring).
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub gold: usize,
}

/// The predictions for one item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoicePrediction {
    /// Summed log-probability of each choice.
    pub loglikelihoods: Vec<f64>,
    /// Arg-max of the sums.
    pub predicted: usize,
    /// Arg-max of the sums per character of the choice.
    pub predicted_norm: usize,
    /// Per choice: is every token of it the model's arg-max prediction (greedy decoding would produce it)?
    pub greedy: Vec<bool>,
}

/// The score of a multiple-choice (or greedy-continuation) task under `metric`.
pub fn score(model: &LoadedModel, items: &[ChoiceItem], metric: Metric, token_budget: usize) -> Result<Scored> {
    let predictions = predict(model, items, token_budget)?;
    let n = items.len() as f64;
    let right = |pick: fn(&ChoicePrediction) -> usize| {
        items.iter().zip(&predictions).filter(|(item, p)| pick(p) == item.gold).count() as f64 / n
    };
    let (acc, acc_norm) = (right(|p| p.predicted), right(|p| p.predicted_norm));
    let uniform_guess = items.iter().map(|i| 1.0 / i.choices.len() as f64).sum::<f64>() / n;
    let (score, floor) = match metric {
        Metric::Acc | Metric::RecallAt1 => (acc, uniform_guess),
        Metric::AccNorm => (acc_norm, uniform_guess),
        Metric::Greedy => {
            let greedy = items.iter().zip(&predictions).filter(|(item, p)| p.greedy[item.gold]).count();
            (greedy as f64 / n, 0.0)
        }
        other => {
            return Err(Error::invalid("(task table)", "metric", format!("`{}` is not a choice metric", other.name())));
        }
    };
    Ok(Scored { score, accuracies: Some((acc, acc_norm)), floor })
}

/// Scores `items` in chunks of about `token_budget` tokens (contexts plus options).
pub fn predict(model: &LoadedModel, items: &[ChoiceItem], token_budget: usize) -> Result<Vec<ChoicePrediction>> {
    let mut encoded = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let context = model.encode(&item.context)?;
        if context.is_empty() || item.choices.is_empty() || item.gold >= item.choices.len() {
            return Err(Error::invalid(
                format!("task item {index}"),
                "context",
                "expected a non-empty context, at least one choice and a gold index among them",
            ));
        }
        let options = item
            .choices
            .iter()
            .map(|c| model.encode_continuation(&format!(" {c}")))
            .collect::<Result<Vec<Vec<u32>>>>()?;
        if options.iter().any(|o| o.is_empty()) {
            return Err(Error::invalid(format!("task item {index}"), "choices", "a choice encodes to no tokens"));
        }
        encoded.push((context, options));
    }
    let sizes: Vec<usize> =
        encoded.iter().map(|(c, o)| c.len() + o.iter().map(|o| o.len() + 1).sum::<usize>()).collect();
    let mut predictions: Vec<Option<ChoicePrediction>> = vec![None; items.len()];
    for chunk in length_sorted_chunks(&sizes, token_budget) {
        let scored = score_chunk(model, &chunk.iter().map(|&i| &encoded[i]).collect::<Vec<_>>())?;
        for (&index, (loglikelihoods, greedy)) in chunk.iter().zip(scored) {
            let lengths: Vec<f64> = items[index].choices.iter().map(|c| c.chars().count().max(1) as f64).collect();
            let per_char: Vec<f64> = loglikelihoods.iter().zip(&lengths).map(|(l, n)| l / n).collect();
            predictions[index] = Some(ChoicePrediction {
                predicted: arg_max(&loglikelihoods),
                predicted_norm: arg_max(&per_char),
                loglikelihoods,
                greedy,
            });
        }
    }
    Ok(predictions.into_iter().map(|p| p.unwrap_or_else(|| unreachable!("every item is in one chunk"))).collect())
}

/// Summed log-probabilities of every option of every item of a chunk, and whether each option is the greedy one.
type ChunkScores = Vec<(Vec<f64>, Vec<bool>)>;

fn score_chunk(model: &LoadedModel, items: &[&(Vec<u32>, Vec<Vec<u32>>)]) -> Result<ChunkScores> {
    let layers = model.dims().layers;
    let contexts: Vec<&[u32]> = items.iter().map(|(c, _)| c.as_slice()).collect();
    let context_batch = model.batch(&contexts)?;
    let recorder = KvRecorder::default();
    model.run_layers_kv(
        model.embed(&context_batch)?,
        &context_batch.packing,
        0..layers,
        &NoHooks,
        Path::Fast,
        KvMode::Record(&recorder),
    )?;
    // Each option runs as [last context token, option tokens…] over its context's cached prefix; the embeddings are
    // taken from the full sequence so that absolute position embeddings see the right positions.
    let (mut full, mut sources, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    for (item, (context, options)) in items.iter().enumerate() {
        for option in options {
            full.push([context.as_slice(), option.as_slice()].concat());
            sources.push(item);
            starts.push(context.len() - 1);
        }
    }
    let full_rows: Vec<&[u32]> = full.iter().map(|s| s.as_slice()).collect();
    let full_batch = model.batch(&full_rows)?;
    let (suffix, suffix_embedded) = full_batch.packing.suffix_rows(&starts, &model.embed(&full_batch)?)?;
    let cache = model.shared_prefix_cache(recorder, &context_batch.packing, &sources, &starts)?;
    let hidden =
        model.run_layers_kv(suffix_embedded, &suffix, 0..layers, &NoHooks, Path::Fast, KvMode::Prefix(&cache))?;
    let (mut sites, mut targets): (Vec<Site>, Vec<u32>) = (Vec::new(), Vec::new());
    let mut row = 0;
    for (_, options) in items {
        for option in options {
            for (position, &token) in option.iter().enumerate() {
                sites.push((row, position));
                targets.push(token);
            }
            row += 1;
        }
    }
    let logits = model.logits_at(&hidden, &suffix, &sites, Path::Fast)?;
    let nll = token_nll(&logits, &targets)?;
    let argmax: Vec<u32> = logits.argmax(1)?.to_vec1::<u32>()?;
    let mut cursor = 0;
    let mut scores = Vec::with_capacity(items.len());
    for (_, options) in items {
        let (mut sums, mut greedy) = (Vec::with_capacity(options.len()), Vec::with_capacity(options.len()));
        for option in options {
            let span = cursor..cursor + option.len();
            sums.push(-nll[span.clone()].iter().sum::<f64>());
            greedy.push(argmax[span.clone()] == targets[span]);
            cursor += option.len();
        }
        scores.push((sums, greedy));
    }
    Ok(scores)
}

/// Index of the largest value (the first one on ties, as numpy's argmax).
pub fn arg_max(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}
