//! The target-vector optimisation shared by ROME (`v*`, at an MLP output) and MEMIT (`z*`, on the residual stream).
//!
//! Following `compute_v` of kmeng01/rome and `compute_z` of kmeng01/memit: a vector δ (zero at the start) is added at
//! one hook point of one layer, at the subject's last token of every rewriting prompt (`template(prompt) + target[:-1]`
//! for each context template) and of the KL prompt `"{subject} is a"`. Adam minimises
//! `NLL(target) + kl_factor · KL(p_δ ‖ p_0) + weight_decay · ‖δ‖ / ‖v₀‖²`, where the NLL is summed over the target's
//! tokens, divided by their number and averaged over prompts, the KL is taken at the KL prompt's subject token against
//! the unedited distribution, and `v₀` (the unedited activation at the bare prompt's subject token) scales the decay
//! term. After each step δ is projected onto the ball of radius `clamp_norm_factor · ‖v₀‖`. The loop stops when the
//! loss falls below `early_stop_loss` (5e-2) or at the last step, which, as in the references, computes the loss but
//! takes no step. Nothing before the subject's last token, and no layer below the edited one, can depend on δ: those
//! are computed once on the fast path, and each step recomputes only the edited layer and above for the tokens from
//! the subject on, reading the earlier tokens' keys and values from a prefix cache (`model/prefix.rs`).
//!
//! One deviation: rewriting prompts are built by appending the target's token ids to the prompt's ids, where the
//! references append decoded text and re-tokenise; the two agree unless the tokenizer would merge across the seam.

use candle_core::{D, DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::l2_norm;
use super::subject::SubjectPrompt;
use crate::data::request::EditRequest;
use crate::error::{Error, Result, ensure_finite};
use crate::model::{
    AddAtSites, Capture, HookPoint, HookSet, KvMode, KvRecorder, LoadedModel, NoHooks, PackedBatch, Path, Site,
};

/// Hyper-parameters of the optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetParams {
    /// Adam steps (`v_num_grad_steps`).
    pub steps: usize,
    /// Adam learning rate (`v_lr`).
    pub lr: f64,
    /// `v_weight_decay`.
    pub weight_decay: f64,
    /// `kl_factor`.
    pub kl_factor: f64,
    /// `clamp_norm_factor`.
    pub clamp_norm_factor: f64,
    /// Stop once the loss is below this (the references use 5e-2).
    #[serde(default = "default_early_stop")]
    pub early_stop_loss: f64,
}

fn default_early_stop() -> f64 {
    5e-2
}

/// The result: `v₀` and the optimised δ (the target is `v₀ + δ`).
#[derive(Debug, Clone)]
pub struct OptimizedTarget {
    /// The unedited activation at the bare prompt's subject token, `(hidden,)`.
    pub initial: Tensor,
    /// The optimised addition, `(hidden,)`.
    pub delta: Tensor,
    /// The loss at every evaluated step.
    pub losses: Vec<f64>,
}

impl OptimizedTarget {
    /// `v₀ + δ`.
    pub fn target(&self) -> Result<Tensor> {
        Ok((&self.initial + &self.delta)?)
    }
}

/// The prompts of one optimisation, packed.
struct RewritingBatch {
    batch: PackedBatch,
    /// Where δ is added: the subject's last token of every row (KL row last).
    inject: Vec<Site>,
    /// Positions whose next token is a target token, with that token.
    targets: Vec<(Site, u32)>,
    /// The KL prompt's subject token.
    kl_site: Site,
    /// Rewriting prompts (rows before the KL row).
    prompts: usize,
    /// Target length.
    target_len: usize,
}

/// Fills the last `{}` of a context template with the request's prompt template.
pub fn contextualise(template: &str, prompt: &str) -> String {
    match template.rfind("{}") {
        Some(at) => format!("{}{}{}", &template[..at], prompt, &template[at + 2..]),
        None => template.to_string(),
    }
}

fn rewriting_batch(model: &LoadedModel, request: &EditRequest, templates: &[String]) -> Result<RewritingBatch> {
    let target = model.encode_continuation(&format!(" {}", request.target_new.trim()))?;
    if target.is_empty() {
        return Err(Error::invalid(format!("request {}", request.id), "target_new", "tokenises to nothing"));
    }
    let mut rows: Vec<Vec<u32>> = Vec::new();
    let (mut inject, mut targets) = (Vec::new(), Vec::new());
    for template in templates {
        let prompt = SubjectPrompt::new(model, &contextualise(template, &request.prompt), &request.subject)?;
        let row = rows.len();
        inject.push((row, prompt.subject_last));
        for (j, &token) in target.iter().enumerate() {
            targets.push(((row, prompt.ids.len() - 1 + j), token));
        }
        let mut ids = prompt.ids;
        ids.extend_from_slice(&target[..target.len() - 1]);
        rows.push(ids);
    }
    let kl = SubjectPrompt::new(model, "{} is a", &request.subject)?;
    let kl_site = (rows.len(), kl.subject_last);
    inject.push(kl_site);
    // The KL term reads only the subject's last token, which (causal attention) sees nothing after it: the row
    // stops there, so the steps do not recompute " is a".
    rows.push(kl.ids[..=kl.subject_last].to_vec());
    let views: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    Ok(RewritingBatch {
        batch: model.batch(&views)?,
        inject,
        targets,
        kl_site,
        prompts: templates.len(),
        target_len: target.len(),
    })
}

/// Optimises the vector added at `point` of `layer` so that the model predicts the request's new target.
/// `templates[0]` must be the bare `"{}"` (its row defines `v₀`).
pub fn optimize_target(
    model: &LoadedModel,
    request: &EditRequest,
    templates: &[String],
    layer: usize,
    point: HookPoint,
    params: &TargetParams,
) -> Result<OptimizedTarget> {
    let layers = model.dims().layers;
    let setup_started = std::time::Instant::now();
    let prepared = rewriting_batch(model, request, templates)?;
    let batch = &prepared.batch;
    let below = model.run_layers(model.embed(batch)?, batch, 0..layer, &NoHooks, Path::Fast)?;

    // Unedited pass over the whole batch: v₀, the KL reference distribution, and every layer's keys and values.
    let capture = Capture::new(layer, point, vec![prepared.inject[0]]);
    let recorder = KvRecorder::default();
    let hidden = model.run_layers_kv(
        below.clone(),
        &batch.packing,
        layer..layers,
        &capture,
        Path::Fast,
        KvMode::Record(&recorder),
    )?;
    let initial = capture.take().ok_or_else(|| Error::invalid("(rome)", "hook", "v₀ was not captured"))?.squeeze(0)?;
    let kl_reference = candle_nn::ops::log_softmax(
        &model.logits_at(&hidden, &batch.packing, &[prepared.kl_site], Path::Fast)?,
        D::Minus1,
    )?
    .detach();
    let initial_norm = l2_norm(&initial)?;
    let max_norm = params.clamp_norm_factor * initial_norm;

    // From here on only the tokens from each row's subject on are recomputed.
    let starts: Vec<usize> = prepared.inject.iter().map(|&(_, position)| position).collect();
    let cache = model.prefix_cache(recorder, &batch.packing, &starts)?;
    let (suffix, suffix_below) = batch.packing.suffix_rows(&starts, &below)?;
    let shift = |(row, position): Site| (row, position - starts[row]);
    let inject: Vec<Site> = prepared.inject.iter().map(|&s| shift(s)).collect();
    let kl_site = shift(prepared.kl_site);

    let delta = Var::zeros(initial.dim(0)?, initial.dtype(), &model.device)?;
    let mut optimizer = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW { lr: params.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
    )?;
    let target_sites: Vec<Site> = prepared.targets.iter().map(|(s, _)| shift(*s)).collect();
    let labels: Vec<u32> = prepared.targets.iter().map(|(_, t)| *t).collect();
    let labels = Tensor::from_vec(labels, (target_sites.len(), 1), &model.device)?;
    let scored_sites: Vec<Site> = target_sites.iter().copied().chain([kl_site]).collect();
    let mut losses = Vec::new();
    let trace = std::env::var_os("EDITGUARD_TRACE").is_some();
    if trace {
        eprintln!("setup (unedited pass, prefix cache): {:.2}s", setup_started.elapsed().as_secs_f64());
    }
    for step in 0..params.steps {
        let started = std::time::Instant::now();
        let add = AddAtSites::same(layer, point, inject.clone(), delta.as_tensor())?;
        let hooks = HookSet::new().with(&add);
        let kv = KvMode::Prefix(&cache);
        let hidden =
            model.run_layers_kv(suffix_below.clone(), &suffix, layer..layers, &hooks, Path::Differentiable, kv)?;
        let forward_seconds = started.elapsed().as_secs_f64();
        // One pass through the output layer for the target positions and the KL position (the last row).
        let all_log_probs = candle_nn::ops::log_softmax(
            &model.logits_at(&hidden, &suffix, &scored_sites, Path::Differentiable)?,
            D::Minus1,
        )?;
        let log_probs = all_log_probs.narrow(0, 0, target_sites.len())?;
        let picked = log_probs.gather(&labels, 1)?.reshape((prepared.prompts, prepared.target_len))?;
        let nll = (picked.sum(1)?.neg()? / prepared.target_len as f64)?.mean(0)?;
        let kl_new = all_log_probs.narrow(0, target_sites.len(), 1)?;
        let kl = ((kl_new.exp()? * (&kl_new - &kl_reference)?)?.sum_all()? * params.kl_factor)?;
        let mut loss = (nll + kl)?;
        if l2_norm(delta.as_tensor())? > 0.0 {
            // ‖δ‖ has no gradient at δ = 0; PyTorch's norm gives 0 there, so the term is left out at that point.
            let norm = delta.as_tensor().sqr()?.sum_all()?.sqrt()?;
            loss = (loss + (norm * (params.weight_decay / (initial_norm * initial_norm)))?)?;
        }
        let value = ensure_finite("rewriting loss", f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?))?;
        losses.push(value);
        let loss_seconds = started.elapsed().as_secs_f64();
        if value < params.early_stop_loss || step + 1 == params.steps {
            break;
        }
        optimizer.backward_step(&loss)?;
        if trace {
            eprintln!(
                "step {step}: loss {value:.4}; layers {forward_seconds:.2}s, loss {:.2}s, backward {:.2}s ({} tokens)",
                loss_seconds - forward_seconds,
                started.elapsed().as_secs_f64() - loss_seconds,
                batch.packing.rows()
            );
        }
        let norm = l2_norm(delta.as_tensor())?;
        if norm > max_norm {
            delta.set(&(delta.as_tensor() * (max_norm / norm))?)?;
        }
    }
    Ok(OptimizedTarget { initial, delta: delta.as_tensor().detach(), losses })
}
