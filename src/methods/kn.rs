//! Knowledge neurons (Dai et al. 2022; EleutherAI knowledge-neurons, as EasyEdit and the ROME baselines run it).
//!
//! 1. Attribution: for every layer, the intermediate activation `a` of the MLP (the input of the down-projection)
//!    at the prompt's last token is replaced by `α·a` for `α` in `linspace(0, 1, steps)` (zero baseline), and the
//!    gradient of the probability of the current answer's first token is integrated: `IG = a ⊙ mean_α ∂p/∂(α a)`.
//!    All `α` of one layer run as one batch, recomputing only the last token (earlier tokens from a prefix cache).
//! 2. Selection: neurons whose attribution exceeds `adaptive_threshold × max` over all layers; with several prompts
//!    (the prompt and its paraphrases), only neurons found for more than `p` of the prompts are kept.
//! 3. Edit: each selected neuron's value vector (its column of the down-projection) gets
//!    `−2·E[old] + 2·E[new]`, with `E` the token embeddings, `old` the model's own arg-max next token and `new` the
//!    first token of `" " + target_new`.
//!
//! Deviations: the reference hooks the output of the first MLP linear (before the activation function); editguard
//! attributes the activation that multiplies the edited value vectors, which is the paper's definition of an
//! intermediate neuron. Multi-token answers are attributed and edited through their first token.

use std::collections::{BTreeMap, HashMap};

use candle_core::{D, DType, Tensor, Var};
use serde::Deserialize;

use super::{EditEnv, EditMethod, EditRecorder, EditRequest, MethodEntry, parse_params};
use crate::error::{Error, Result};
use crate::model::{Capture, HookPoint, KvMode, KvRecorder, LoadedModel, NoHooks, Path, ReplaceAtSites, WeightId};

/// The `kn` row of the method table.
pub const KN: MethodEntry = MethodEntry {
    name: "kn",
    summary: "knowledge neurons: integrated gradients, then ±2·embedding on the neurons' value vectors",
    batch: false,
    build,
};

/// Hyper-parameters, named as in the references' hparams files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnParams {
    /// Integration steps (`α` values, endpoints included).
    pub steps: usize,
    /// Share of the largest attribution a neuron must exceed.
    pub adaptive_threshold: f64,
    /// Share of prompts a neuron must be found for (when there are several).
    pub p: f64,
    /// Use the rephrase prompts too, and keep neurons shared by more than `p` of the prompts.
    #[serde(default = "default_refine")]
    pub refine: bool,
}

fn default_refine() -> bool {
    true
}

/// Knowledge neurons.
pub struct KnowledgeNeurons {
    params: KnParams,
}

fn build(table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    let params: KnParams = parse_params(table, origin)?;
    if params.steps < 2 {
        let (file, path) = origin.split_once(": ").unwrap_or(("models.toml", origin));
        return Err(Error::invalid(file, format!("{path}.steps"), "expected at least 2 integration steps"));
    }
    Ok(Box::new(KnowledgeNeurons { params }))
}

impl KnowledgeNeurons {
    /// Attribution scores `(layers, intermediate)` of `prompt` for `token`.
    ///
    /// Scaling the activation at the last token changes nothing before it, so one recorded fast pass over the prompt
    /// gives every layer's input at the last token and every earlier token's keys and values; each layer's
    /// integration batch then recomputes only the last token (one row per `α`) from that layer up, reading the
    /// earlier tokens from the prefix cache.
    fn attribute(&self, model: &LoadedModel, prompt: &[u32], token: u32) -> Result<Tensor> {
        let dims = model.dims();
        let steps = self.params.steps;
        let last = prompt.len() - 1;
        let batch = model.batch(&[prompt])?;
        let recorder = KvRecorder::default();
        let mut hidden = model.embed(&batch)?;
        let mut inputs = Vec::with_capacity(dims.layers);
        let mut activations = Vec::with_capacity(dims.layers);
        for layer in 0..dims.layers {
            inputs.push(hidden.narrow(0, last, 1)?);
            let capture = Capture::new(layer, HookPoint::MlpKey, vec![(0, last)]);
            let kv = KvMode::Record(&recorder);
            hidden = model.run_layers_kv(hidden, &batch.packing, layer..layer + 1, &capture, Path::Fast, kv)?;
            activations.push(capture.take().ok_or_else(|| Error::invalid("(kn)", "hook", "activation not captured"))?);
        }
        let cache = model.shared_prefix_cache(recorder, &batch.packing, &vec![0; steps], &vec![last; steps])?;
        let suffix = model.batch(&vec![&prompt[last..]; steps])?;
        let sites: Vec<(usize, usize)> = (0..steps).map(|r| (r, 0)).collect();
        let alphas: Vec<f32> = (0..steps).map(|k| k as f32 / (steps - 1) as f32).collect();
        let alphas = Tensor::from_vec(alphas, (steps, 1), &model.device)?.to_dtype(model.dtype)?;
        let mut scores = Vec::with_capacity(dims.layers);
        for (layer, (input, activation)) in inputs.into_iter().zip(activations).enumerate() {
            let scaled = Var::from_tensor(&alphas.broadcast_mul(&activation)?)?;
            let replace = ReplaceAtSites::new(layer, HookPoint::MlpKey, sites.clone(), scaled.as_tensor().clone());
            let below = input.broadcast_as((steps, dims.hidden))?.contiguous()?;
            let kv = KvMode::Prefix(&cache);
            let out =
                model.run_layers_kv(below, &suffix.packing, layer..dims.layers, &replace, Path::Differentiable, kv)?;
            let logits = model.logits_at(&out, &suffix.packing, &sites, Path::Differentiable)?;
            let probability = candle_nn::ops::softmax(&logits, D::Minus1)?.narrow(1, token as usize, 1)?.sum_all()?;
            let gradient = probability
                .backward()?
                .get(scaled.as_tensor())
                .cloned()
                .ok_or_else(|| Error::invalid("(kn)", "gradient", "no gradient reached the activations"))?;
            scores.push((activation.squeeze(0)? * (gradient.sum(0)? / steps as f64)?)?);
        }
        Ok(Tensor::stack(&scores, 0)?)
    }

    /// `(layer, neuron)` pairs above the adaptive threshold.
    fn coarse_neurons(&self, scores: &Tensor) -> Result<Vec<(usize, usize)>> {
        let rows = scores.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let max = rows.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
        let threshold = self.params.adaptive_threshold * max;
        Ok(rows
            .iter()
            .enumerate()
            .flat_map(|(l, row)| row.iter().enumerate().filter(|(_, v)| **v > threshold).map(move |(i, _)| (l, i)))
            .collect())
    }

    fn edit_one(&self, model: &mut LoadedModel, request: &EditRequest, recorder: &mut EditRecorder) -> Result<()> {
        let prompt_text = request.prompt_text();
        let mut prompts = vec![prompt_text.clone()];
        if self.params.refine {
            prompts.extend(request.rephrase_prompts.iter().cloned());
        }
        let new = *model
            .encode_continuation(&format!(" {}", request.target_new.trim()))?
            .first()
            .ok_or_else(|| Error::invalid(format!("request {}", request.id), "target_new", "tokenises to nothing"))?;
        let ids = model.encode(&prompt_text)?;
        let old = self.greedy_next(model, &ids)?;
        let answer = match &request.ground_truth {
            Some(truth) => model.encode_continuation(&format!(" {}", truth.trim()))?.first().copied().unwrap_or(old),
            None => old,
        };
        let mut counts: HashMap<(usize, usize), usize> = HashMap::new();
        for prompt in &prompts {
            let ids = model.encode(prompt)?;
            for neuron in self.coarse_neurons(&self.attribute(model, &ids, answer)?)? {
                *counts.entry(neuron).or_default() += 1;
            }
        }
        let needed = if prompts.len() > 1 { self.params.p * prompts.len() as f64 } else { 0.0 };
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for ((layer, neuron), count) in counts {
            if count as f64 > needed {
                by_layer.entry(layer).or_default().push(neuron);
            }
        }
        if std::env::var_os("EDITGUARD_TRACE").is_some() {
            let counts: Vec<String> = by_layer.iter().map(|(l, n)| format!("{l}:{}", n.len())).collect();
            eprintln!("kn: old token {old}, new token {new}, neurons per layer {}", counts.join(" "));
        }
        let embeddings = model.network.weight(WeightId::TokenEmbedding)?;
        let direction = ((embeddings.get(new as usize)? - embeddings.get(old as usize)?)? * 2.0)?;
        let dims = model.dims();
        for (layer, neurons) in by_layer {
            let mut mask = vec![0f32; dims.intermediate];
            for neuron in neurons {
                mask[neuron] = 1.0;
            }
            let mask = Tensor::from_vec(mask, (1, dims.intermediate), &model.device)?.to_dtype(model.dtype)?;
            let delta = direction.unsqueeze(1)?.matmul(&mask)?;
            recorder.apply(model, WeightId::MlpDown(layer), delta)?;
        }
        Ok(())
    }

    fn greedy_next(&self, model: &LoadedModel, ids: &[u32]) -> Result<u32> {
        let batch = model.batch(&[ids])?;
        let hidden = model.hidden_states(&batch, &NoHooks, Path::Fast)?;
        let logits = model.logits_at(&hidden, &batch.packing, &[(0, ids.len() - 1)], Path::Fast)?;
        Ok(logits.argmax(D::Minus1)?.get(0)?.to_scalar::<u32>()?)
    }
}

impl EditMethod for KnowledgeNeurons {
    fn name(&self) -> &'static str {
        "kn"
    }

    fn apply(&self, model: &mut LoadedModel, requests: &[EditRequest], _env: &EditEnv) -> Result<super::AppliedEdit> {
        let mut recorder = EditRecorder::default();
        for request in requests {
            if let Err(e) = self.edit_one(model, request, &mut recorder) {
                recorder.abandon(model)?;
                return Err(e);
            }
        }
        Ok(recorder.finish())
    }
}
