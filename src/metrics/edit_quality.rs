//! Edit quality: did the edit take (efficacy), does it carry over to paraphrases (generalisation), and did unrelated
//! facts stay put (locality)?
//!
//! Continuations are scored teacher-forced: the prompt's tokens followed by the tokens of `" " + target`, scored at
//! the target positions. Two readings are reported, as in the two source papers' tooling:
//! - *prefers new*: the edited model gives `target_new` a lower mean per-token NLL than `ground_truth` (ROME's
//!   COUNTERFACT efficacy / paraphrase scores);
//! - *token accuracy*: the share of target tokens that are the arg-max prediction (EasyEdit's rewrite accuracy).
//!
//! Locality compares arg-max predictions over the locality answer's positions before and after the edit.

use serde::Serialize;

use crate::data::request::EditRequest;
use crate::error::Result;
use crate::model::{LoadedModel, NoHooks, Path, Site};

/// A teacher-forced continuation's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContinuationScore {
    /// Mean NLL per continuation token (nats).
    pub mean_nll: f64,
    /// Share of continuation tokens that are the model's arg-max prediction.
    pub token_accuracy: f64,
    /// The arg-max predictions at the continuation positions.
    pub predicted: Vec<u32>,
}

/// Scores `(prompt, continuation)` pairs; the continuation is appended as given (include the leading space).
pub fn score_continuations(model: &LoadedModel, pairs: &[(String, String)]) -> Result<Vec<ContinuationScore>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let mut sequences = Vec::with_capacity(pairs.len());
    let mut target_spans = Vec::with_capacity(pairs.len());
    for (prompt, continuation) in pairs {
        let mut ids = model.encode(prompt)?;
        let target = model.encode_continuation(continuation)?;
        target_spans.push((ids.len(), target.clone()));
        ids.extend_from_slice(&target);
        sequences.push(ids);
    }
    let rows: Vec<&[u32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let batch = model.batch(&rows)?;
    let hidden = model.hidden_states(&batch, &NoHooks, Path::Fast)?;
    let mut sites: Vec<Site> = Vec::new();
    let mut targets: Vec<u32> = Vec::new();
    for (row, (start, target)) in target_spans.iter().enumerate() {
        for (offset, &token) in target.iter().enumerate() {
            sites.push((row, start + offset - 1));
            targets.push(token);
        }
    }
    let logits = model.logits_at(&hidden, &batch.packing, &sites, Path::Fast)?;
    let nll = super::perplexity::token_nll(&logits, &targets)?;
    let predicted: Vec<u32> = logits.argmax(1)?.to_vec1::<u32>()?;
    let mut scores = Vec::with_capacity(pairs.len());
    let mut cursor = 0;
    for (_, target) in &target_spans {
        let span = cursor..cursor + target.len();
        let hits = predicted[span.clone()].iter().zip(target).filter(|(p, t)| p == t).count();
        scores.push(ContinuationScore {
            mean_nll: nll[span.clone()].iter().sum::<f64>() / target.len().max(1) as f64,
            token_accuracy: hits as f64 / target.len().max(1) as f64,
            predicted: predicted[span].to_vec(),
        });
        cursor += target.len();
    }
    Ok(scores)
}

/// The unedited model's locality predictions, taken before an edit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LocalityBaseline {
    /// Per request, per locality probe: arg-max tokens over the answer positions.
    pub predictions: Vec<Vec<Vec<u32>>>,
}

/// Records the locality predictions of the (unedited) model for `requests`.
pub fn locality_baseline(model: &LoadedModel, requests: &[EditRequest]) -> Result<LocalityBaseline> {
    let mut predictions = Vec::with_capacity(requests.len());
    for request in requests {
        let pairs: Vec<(String, String)> =
            request.locality.iter().map(|p| (p.prompt.clone(), format!(" {}", p.answer.trim()))).collect();
        predictions.push(score_continuations(model, &pairs)?.into_iter().map(|s| s.predicted).collect());
    }
    Ok(LocalityBaseline { predictions })
}

/// Edit quality over a set of requests (means over requests; `None` where no request has the probe).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EditQuality {
    /// Share of requests whose prompt prefers `target_new` over `ground_truth`.
    pub efficacy: Option<f64>,
    /// Mean token accuracy of `target_new` on the prompt.
    pub efficacy_accuracy: f64,
    /// Share of paraphrases preferring `target_new` over `ground_truth`.
    pub generalization: Option<f64>,
    /// Mean token accuracy of `target_new` on the paraphrases.
    pub generalization_accuracy: Option<f64>,
    /// Share of locality answer tokens whose prediction is unchanged.
    pub locality: Option<f64>,
    /// Per request: did the prompt prefer the new target (or, without a ground truth, predict it fully)?
    pub took: Vec<bool>,
}

/// Measures edit quality of the (edited) model on `requests`, locality against `baseline`.
pub fn measure(model: &LoadedModel, requests: &[EditRequest], baseline: &LocalityBaseline) -> Result<EditQuality> {
    let mut quality = EditQuality::default();
    let (mut efficacy, mut efficacy_n, mut accuracy) = (0.0, 0, 0.0);
    let (mut general, mut general_n, mut general_accuracy) = (0.0, 0, 0.0);
    let (mut kept, mut locality_tokens) = (0usize, 0usize);
    for (index, request) in requests.iter().enumerate() {
        let new = format!(" {}", request.target_new.trim());
        let old = request.ground_truth.as_ref().map(|g| format!(" {}", g.trim()));
        let mut prompts = vec![request.prompt_text()];
        prompts.extend(request.rephrase_prompts.iter().cloned());
        let mut pairs: Vec<(String, String)> = prompts.iter().map(|p| (p.clone(), new.clone())).collect();
        if let Some(old) = &old {
            pairs.extend(prompts.iter().map(|p| (p.clone(), old.clone())));
        }
        let scores = score_continuations(model, &pairs)?;
        let (new_scores, old_scores) = scores.split_at(prompts.len());
        accuracy += new_scores[0].token_accuracy;
        let prefers = |i: usize| old_scores.get(i).map(|o| new_scores[i].mean_nll < o.mean_nll);
        let took = prefers(0).unwrap_or(new_scores[0].token_accuracy == 1.0);
        quality.took.push(took);
        if let Some(p) = prefers(0) {
            efficacy += f64::from(u8::from(p));
            efficacy_n += 1;
        }
        for (i, score) in new_scores.iter().enumerate().skip(1) {
            general_accuracy += score.token_accuracy;
            if let Some(p) = prefers(i) {
                general += f64::from(u8::from(p));
                general_n += 1;
            }
        }
        let locality_pairs: Vec<(String, String)> =
            request.locality.iter().map(|p| (p.prompt.clone(), format!(" {}", p.answer.trim()))).collect();
        let now = score_continuations(model, &locality_pairs)?;
        if let Some(before) = baseline.predictions.get(index) {
            for (after, before) in now.iter().zip(before) {
                kept += after.predicted.iter().zip(before).filter(|(a, b)| a == b).count();
                locality_tokens += before.len();
            }
        }
    }
    let n = requests.len().max(1) as f64;
    let rephrases: usize = requests.iter().map(|r| r.rephrase_prompts.len()).sum();
    quality.efficacy = (efficacy_n > 0).then(|| efficacy / efficacy_n as f64);
    quality.efficacy_accuracy = accuracy / n;
    quality.generalization = (general_n > 0).then(|| general / general_n as f64);
    quality.generalization_accuracy = (rephrases > 0).then(|| general_accuracy / rephrases as f64);
    quality.locality = (locality_tokens > 0).then(|| kept as f64 / locality_tokens as f64);
    Ok(quality)
}
