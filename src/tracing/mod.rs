//! Causal tracing: where in a model does a fact's recall happen? (Meng et al. 2022, *Locating and Editing Factual
//! Associations in GPT*, §2.1; the reference is kmeng01/rome's `experiments/causal_trace.py`.)
//!
//! A prompt such as "The Space Needle is located in the city of" is run three ways. The clean run records every
//! layer's residual stream after the layer ([`HookPoint::BlockOutput`], kind [`Kind::Hidden`]) and MLP output
//! ([`HookPoint::MlpOutput`], kind [`Kind::Mlp`]) at every token, and the probability of the answer's first token at
//! the last position, p(clean). Corrupted runs add Gaussian noise to the embeddings of the subject's tokens — several
//! noise samples from a seeded generator, the same samples for every run of the prompt — and give p(corrupted), the
//! mean over the samples. Restored runs are corrupted runs in which the clean state of one kind at one token and one
//! layer (for the MLP a window of layers around it, as the reference does) is put back; the indirect effect of that
//! state is p(restored) − p(corrupted). A large effect at the subject's last token in GPT-2-XL's middle-layer MLPs is
//! the paper's finding, and the reason ROME edits there.
//!
//! The restored runs are batched: the corrupted runs record every layer's keys and values, and every restoration of
//! the prompt (kind × centre layer × restored token × noise sample) runs in one sweep up the layers, joining the
//! packed batch at the first layer it can change and holding only the tokens from the restored one on (earlier
//! tokens cannot see it; their keys and values come from the corrupted runs through a
//! [`crate::model::PrefixCache`]). The results equal running every restoration from the embeddings up
//! ([`patched_probability`], tested).
//!
//! [`average`] traces a seeded sample of COUNTERFACT records the model knows and averages the effects per layer and
//! token category; [`plot`] draws the average curves and single-prompt heat maps.

pub mod average;
pub mod plot;
mod restore;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::data::request::template_of;
use crate::error::{Error, Result};
use crate::methods::subject::SubjectPrompt;
use crate::model::{HookPoint, LoadedModel, Path, Site};

/// What a restored run puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The residual stream after the layer (the reference's default kind, `kind=None`).
    Hidden,
    /// The MLP output before the residual addition (the reference's `kind="mlp"`).
    Mlp,
}

impl Kind {
    /// Parses `hidden`, `mlp` or `both` (hidden and mlp).
    pub fn parse_list(text: &str) -> Result<Vec<Kind>> {
        match text.to_ascii_lowercase().as_str() {
            "hidden" => Ok(vec![Kind::Hidden]),
            "mlp" => Ok(vec![Kind::Mlp]),
            "both" => Ok(vec![Kind::Hidden, Kind::Mlp]),
            other => Err(Error::invalid("(trace)", "kind", format!("unknown `{other}`; expected mlp, hidden or both"))),
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hidden => "hidden",
            Kind::Mlp => "mlp",
        }
    }

    /// The reference's window: one layer for hidden states, ten for MLP outputs.
    pub fn default_window(self) -> usize {
        match self {
            Kind::Hidden => 1,
            Kind::Mlp => 10,
        }
    }

    /// The hook point the kind restores.
    pub fn point(self) -> HookPoint {
        match self {
            Kind::Hidden => HookPoint::BlockOutput,
            Kind::Mlp => HookPoint::MlpOutput,
        }
    }
}

/// The layers a restoration centred on `layer` puts back: `[layer − ⌊w/2⌋, layer + ⌈w/2⌉)` clipped to the model,
/// the reference's window (w = 10: five layers below the centre, the centre and four above).
pub fn window_layers(layer: usize, window: usize, layers: usize) -> std::ops::Range<usize> {
    let window = window.max(1);
    layer.saturating_sub(window / 2)..(layer + window.div_ceil(2)).min(layers)
}

/// Which token positions are restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// The subject's last token and the prompt's last token (what the averages need; cheap).
    Key,
    /// Every token: the reference's heat map.
    All,
}

impl Positions {
    /// Parses `key` or `all`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "key" => Ok(Positions::Key),
            "all" => Ok(Positions::All),
            other => Err(Error::invalid("(trace)", "positions", format!("unknown `{other}`; expected key or all"))),
        }
    }
}

/// How a trace runs.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSettings {
    /// The kinds restored.
    pub kinds: Vec<Kind>,
    /// Layers restored around the centre layer, for every kind (None: each kind's [`Kind::default_window`]).
    pub window: Option<usize>,
    /// Noise samples (corrupted runs) per prompt; the reference uses 10.
    pub noise_samples: usize,
    /// Which tokens are restored.
    pub positions: Positions,
}

impl TraceSettings {
    /// The window used for `kind`.
    pub fn window(&self, kind: Kind) -> usize {
        self.window.unwrap_or(kind.default_window()).max(1)
    }

    fn check(&self) -> Result<()> {
        if self.kinds.is_empty() {
            return Err(Error::invalid("(trace)", "kind", "at least one kind must be traced"));
        }
        if self.noise_samples == 0 {
            return Err(Error::invalid("(trace)", "noise_samples", "at least one noise sample is needed"));
        }
        Ok(())
    }
}

/// A tokenised prompt with the token range of its subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TracePrompt {
    /// The prompt template, `{}` standing for the subject.
    pub template: String,
    /// The subject.
    pub subject: String,
    /// Token ids of the filled-in prompt, with the model's BOS token first when its `bos` setting is on.
    pub ids: Vec<u32>,
    /// Index of the subject's first token in `ids`.
    pub subject_first: usize,
    /// One past the index of the subject's last token.
    pub subject_end: usize,
}

impl TracePrompt {
    /// Tokenises `prompt` — a template with `{}` for the subject, or a text containing the subject (its first
    /// occurrence is the subject) — and finds the subject's tokens. The last one is [`SubjectPrompt`]'s (the tokens
    /// of the text up to the subject's end); the first one follows the longest run of tokens the prompt shares with
    /// the text before the subject (whitespace before the subject trimmed), so a token that straddles the seam counts
    /// as the subject's. Both encodings go through [`LoadedModel::encode`], so a BOS token shifts them alike.
    pub fn new(model: &LoadedModel, prompt: &str, subject: &str) -> Result<Self> {
        let template = if prompt.contains("{}") {
            prompt.to_string()
        } else {
            template_of(prompt, subject).ok_or_else(|| {
                Error::invalid("(trace)", "subject", format!("`{subject}` does not occur in `{prompt}`"))
            })?
        };
        let located = SubjectPrompt::new(model, &template, subject)?;
        let (prefix, _) = template.split_once("{}").unwrap_or(("", ""));
        let prefix_ids = model.encode(prefix.trim_end())?;
        let shared = prefix_ids.iter().zip(&located.ids).take_while(|(a, b)| a == b).count();
        let subject_first = shared.min(located.subject_last);
        Ok(TracePrompt {
            template,
            subject: subject.to_string(),
            subject_first,
            subject_end: located.subject_last + 1,
            ids: located.ids,
        })
    }

    /// Index of the subject's last token.
    pub fn subject_last(&self) -> usize {
        self.subject_end - 1
    }

    /// Index of the prompt's last token (where the answer is predicted).
    pub fn last(&self) -> usize {
        self.ids.len() - 1
    }

    /// The positions `positions` asks for, ascending and without repeats.
    pub fn positions(&self, positions: Positions) -> Vec<usize> {
        match positions {
            Positions::All => (0..self.ids.len()).collect(),
            Positions::Key if self.subject_last() == self.last() => vec![self.last()],
            Positions::Key => vec![self.subject_last(), self.last()],
        }
    }
}

/// The first token of a target as a continuation of a prompt (`" " + target`, no BOS).
pub fn target_token(model: &LoadedModel, target: &str) -> Result<u32> {
    model
        .encode_continuation(&format!(" {}", target.trim()))?
        .first()
        .copied()
        .ok_or_else(|| Error::invalid("(trace)", "target", format!("`{target}` has no tokens")))
}

/// The clean model's next-token prediction after `ids`: the top-1 token and every token's probability.
pub fn next_token(model: &LoadedModel, ids: &[u32]) -> Result<(u32, Vec<f64>)> {
    let batch = model.batch(&[ids])?;
    let hidden = model.hidden_states(&batch, &crate::model::NoHooks, Path::Fast)?;
    let logits = model.logits_at(&hidden, &batch.packing, &[(0, ids.len() - 1)], Path::Fast)?;
    let row = logits.to_dtype(DType::F32)?.squeeze(0)?.to_vec1::<f32>()?;
    Ok((top_token(&row)?, softmax(&row)))
}

/// The clean model's top-1 next token after each of `prompts`, in one packed pass.
pub fn top_tokens(model: &LoadedModel, prompts: &[&[u32]]) -> Result<Vec<u32>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let batch = model.batch(prompts)?;
    let hidden = model.hidden_states(&batch, &crate::model::NoHooks, Path::Fast)?;
    let last: Vec<Site> = prompts.iter().enumerate().map(|(i, p)| (i, p.len() - 1)).collect();
    let logits = model.logits_at(&hidden, &batch.packing, &last, Path::Fast)?;
    logits.to_dtype(DType::F32)?.to_vec2::<f32>()?.iter().map(|row| top_token(row)).collect()
}

/// The arg-max of a row of logits (the first of equal maxima).
fn top_token(row: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in row.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32).ok_or_else(|| Error::invalid("(trace)", "logits", "empty vocabulary"))
}

/// Softmax in f64 of one row of logits.
fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let exps: Vec<f64> = row.iter().map(|&x| (f64::from(x) - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The standard deviation (over all entries) of token embeddings as the model's `embed` produces them: over the
/// whole vocabulary (`tokens = None`), or over the rows of the given tokens (e.g. the subjects' tokens, which is
/// what the reference measures). `embed` may scale the embedding matrix (Gemma multiplies by √hidden) and may add
/// a position embedding (GPT-2); the scale is measured on single-token sequences of 64 tokens spread over the
/// vocabulary, centred per dimension so that the position-0 embedding cancels, and the matrix's standard deviation
/// is multiplied by it. Position embeddings themselves are not counted (the reference corrupts GPT-2's `wte`
/// output, before positions are added).
pub fn embedding_std(model: &LoadedModel, tokens: Option<&[u32]>) -> Result<f64> {
    let matrix = model.network.token_embedding();
    let vocab = matrix.dim(0)?;
    let (mut sum, mut squares, mut count) = (0f64, 0f64, 0usize);
    let mut add = |rows: &Tensor| -> Result<()> {
        let rows = rows.to_dtype(DType::F64)?;
        sum += rows.sum_all()?.to_scalar::<f64>()?;
        squares += rows.sqr()?.sum_all()?.to_scalar::<f64>()?;
        count += rows.elem_count();
        Ok(())
    };
    match tokens {
        None => {
            let chunk = 4096;
            for start in (0..vocab).step_by(chunk) {
                add(&matrix.narrow(0, start, chunk.min(vocab - start))?)?;
            }
        }
        Some(tokens) => {
            if tokens.is_empty() {
                return Err(Error::invalid("(trace)", "noise", "no tokens to measure the embedding spread on"));
            }
            let index = Tensor::from_vec(tokens.to_vec(), tokens.len(), matrix.device())?;
            add(&matrix.index_select(&index, 0)?)?;
        }
    }
    let mean = sum / count as f64;
    let std = (squares / count as f64 - mean * mean).max(0.0).sqrt();
    Ok(std * embedding_scale(model)?)
}

/// The factor `embed` multiplies token embedding rows by (1 for most architectures).
fn embedding_scale(model: &LoadedModel) -> Result<f64> {
    let vocab = model.dims().vocab.min(model.network.token_embedding().dim(0)?);
    let probe: Vec<u32> = (0..64).map(|i| (i * vocab / 64) as u32).collect();
    let sequences: Vec<&[u32]> = probe.iter().map(std::slice::from_ref).collect();
    let batch = model.batch(&sequences)?;
    let embedded = model.embed(&batch)?.to_dtype(DType::F64)?;
    let rows = model.network.token_embedding().index_select(&batch.ids, 0)?.to_dtype(DType::F64)?;
    let centred_norm = |x: &Tensor| -> Result<f64> {
        Ok(x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
    };
    let (outer, inner) = (centred_norm(&embedded)?, centred_norm(&rows)?);
    if inner == 0.0 {
        return Err(Error::invalid("(trace)", "noise", "the token embeddings do not vary; no noise scale"));
    }
    Ok(outer / inner)
}

/// The Gaussian noise of a prompt's corrupted runs: one `(tokens, hidden)` block per sample, zero outside the
/// subject's tokens. The same noise serves the corrupted run and every restored run of the prompt (as in the
/// reference, which re-seeds its generator for every run).
#[derive(Debug, Clone)]
pub struct Noise {
    /// `(samples · tokens, hidden)`, sample-major.
    pub rows: Tensor,
    /// Number of samples.
    pub samples: usize,
    /// Standard deviation of the noise.
    pub std: f64,
}

impl Noise {
    /// `samples` draws of N(0, std²) per subject-token coordinate from a ChaCha8 generator seeded with `seed`
    /// (Box–Muller on its uniform draws).
    pub fn gaussian(model: &LoadedModel, prompt: &TracePrompt, samples: usize, std: f64, seed: u64) -> Result<Self> {
        let (tokens, hidden) = (prompt.ids.len(), model.dims().hidden);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut data = vec![0f32; samples * tokens * hidden];
        for sample in 0..samples {
            for position in prompt.subject_first..prompt.subject_end {
                let row = (sample * tokens + position) * hidden;
                for pair in data[row..row + hidden].chunks_mut(2) {
                    let (u, v): (f64, f64) = (rng.random(), rng.random());
                    let radius = (-2.0 * (1.0 - u).ln()).sqrt() * std;
                    let angle = std::f64::consts::TAU * v;
                    pair[0] = (radius * angle.cos()) as f32;
                    if let Some(second) = pair.get_mut(1) {
                        *second = (radius * angle.sin()) as f32;
                    }
                }
            }
        }
        let rows = Tensor::from_vec(data, (samples * tokens, hidden), &model.device)?.to_dtype(model.dtype)?;
        Ok(Noise { rows, samples, std })
    }
}

/// The restorations of one kind: p(target) at the last token, averaged over the noise samples.
#[derive(Debug, Clone, Serialize)]
pub struct KindTrace {
    /// The kind restored.
    pub kind: Kind,
    /// Layers restored around each centre layer.
    pub window: usize,
    /// `p_restored[i][layer]`: restoring at `positions[i]` (of the [`PromptTrace`]), window centred on `layer`.
    pub p_restored: Vec<Vec<f64>>,
}

/// The causal trace of one prompt.
#[derive(Debug, Clone, Serialize)]
pub struct PromptTrace {
    /// The prompt.
    pub prompt: TracePrompt,
    /// Each token decoded on its own.
    pub tokens: Vec<String>,
    /// The token whose probability is traced (the first token of the answer).
    pub target_id: u32,
    /// It, decoded.
    pub target: String,
    /// p(target) in the clean run.
    pub p_clean: f64,
    /// p(target) in the corrupted runs (mean over the noise samples).
    pub p_corrupted: f64,
    /// Standard deviation of the noise.
    pub noise_std: f64,
    /// Number of noise samples.
    pub noise_samples: usize,
    /// The restored token positions.
    pub positions: Vec<usize>,
    /// One entry per traced kind.
    pub kinds: Vec<KindTrace>,
    /// Seconds the trace took.
    pub seconds: f64,
}

impl PromptTrace {
    /// The indirect effect p(restored) − p(corrupted) of `kind` at token `position`, per layer (None when the kind
    /// or the position was not traced).
    pub fn effects(&self, kind: Kind, position: usize) -> Option<Vec<f64>> {
        let index = self.positions.iter().position(|&p| p == position)?;
        let trace = self.kinds.iter().find(|k| k.kind == kind)?;
        Some(trace.p_restored[index].iter().map(|p| p - self.p_corrupted).collect())
    }
}

/// Traces `prompt` for the target token `target`: the clean run, the corrupted runs with `noise`, and every
/// restoration of `settings` (every kind × restored position × centre layer).
pub fn trace_prompt(
    model: &LoadedModel,
    prompt: &TracePrompt,
    target: u32,
    settings: &TraceSettings,
    noise: &Noise,
) -> Result<PromptTrace> {
    settings.check()?;
    let started = std::time::Instant::now();
    let clean = restore::clean_run(model, &prompt.ids, target)?;
    let corrupted = restore::corrupted_run(model, &prompt.ids, target, noise)?;
    let positions = prompt.positions(settings.positions);
    let windows: Vec<(Kind, usize)> = settings.kinds.iter().map(|&kind| (kind, settings.window(kind))).collect();
    let restored = restore::restored(model, &prompt.ids, target, &windows, &positions, &clean, &corrupted)?;
    let kinds = windows
        .iter()
        .zip(restored)
        .map(|(&(kind, window), p_restored)| KindTrace { kind, window, p_restored })
        .collect();
    let decode = |ids: &[u32]| model.tokenizer.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()));
    Ok(PromptTrace {
        prompt: prompt.clone(),
        tokens: prompt.ids.iter().map(|&id| decode(&[id])).collect::<Result<_>>()?,
        target_id: target,
        target: decode(&[target])?,
        p_clean: clean.p,
        p_corrupted: corrupted.p,
        noise_std: noise.std,
        noise_samples: noise.samples,
        positions,
        kinds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The reference's `trace_with_patch`, unbatched: p(target) at the last token in the corrupted runs of `noise`
/// with the clean activations put back at every `(layer, point, position)` of `restore`, averaged over the noise
/// samples. Every run goes from the embeddings through all layers; the batched tracer is tested against it.
pub fn patched_probability(
    model: &LoadedModel,
    prompt: &TracePrompt,
    target: u32,
    noise: &Noise,
    restore: &[(usize, HookPoint, usize)],
) -> Result<f64> {
    restore::patched(model, &prompt.ids, target, noise, restore)
}

/// The sites `(sample, position)` of every noise sample at `position`.
fn sites_of(samples: usize, position: usize) -> Vec<Site> {
    (0..samples).map(|sample| (sample, position)).collect()
}

/// The subjects' tokens of `prompts` (what the reference measures the noise scale on).
pub fn subject_tokens(prompts: &[TracePrompt]) -> Vec<u32> {
    prompts.iter().flat_map(|p| p.ids[p.subject_first..p.subject_end].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_reference() {
        // range(max(0, L − w // 2), min(n, L − (−w // 2)))
        assert_eq!(window_layers(0, 10, 30), 0..5);
        assert_eq!(window_layers(7, 10, 30), 2..12);
        assert_eq!(window_layers(28, 10, 30), 23..30);
        assert_eq!(window_layers(4, 1, 30), 4..5);
        assert_eq!(window_layers(4, 3, 30), 3..6);
        assert_eq!(window_layers(0, 0, 30), 0..1, "a zero window restores the centre layer");
    }

    #[test]
    fn softmax_is_stable_and_normalised() {
        let p = softmax(&[1000.0, 1000.0, f32::NEG_INFINITY]);
        assert_eq!(p, vec![0.5, 0.5, 0.0]);
        assert_eq!(top_token(&[0.0, 3.0, 3.0]).unwrap(), 1, "the first of equal maxima");
        assert!(top_token(&[]).is_err());
    }

    #[test]
    fn kinds_and_positions_parse() {
        assert_eq!(Kind::parse_list("both").unwrap(), vec![Kind::Hidden, Kind::Mlp]);
        assert_eq!(Kind::parse_list("MLP").unwrap(), vec![Kind::Mlp]);
        assert!(Kind::parse_list("attn").unwrap_err().to_string().contains("expected mlp, hidden or both"));
        assert_eq!(Positions::parse("all").unwrap(), Positions::All);
        assert!(Positions::parse("some").is_err());
    }
}
