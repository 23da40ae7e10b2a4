//! MEMIT (Meng et al. 2023, kmeng01/memit): many facts at once, spread over a range of MLP layers.
//!
//! For each request, `z*` is the residual stream after the last layer `L` of the range at the subject's last token,
//! optimised like ROME's `v*` (`target.rs`, at [`HookPoint::BlockOutput`]) with the context templates `"{}"` plus
//! one 10-token prefix per start word. Then, for each layer `l` of the range in order, on the model as the previous
//! layers left it:
//! - `K` (intermediate × n): the down-projection inputs at the subject's last token, each request's key the mean of
//!   the bare prompt's key and the mean of the prefixed prompts' keys (the references' two template groups);
//! - `R = (Z − Z_cur) / (layers left)`: what is still missing at layer `L` for the bare prompts, shared out over the
//!   remaining layers;
//! - `ΔW_l = R · solve(λ·C_l + K Kᵀ, K)ᵀ` in f64, with `C_l = E[kkᵀ]` (`stats.rs`) and `λ = mom2_update_weight`.
//!
//! MEMIT assumes the MLP output is added to the residual stream as it is. Gemma normalises it first (a
//! post-feed-forward RMS norm), so there `R`, a change of the residual stream, is first turned into the change of the
//! MLP output whose normalised value points along `p + R` (`through_output_norm`; `p` the current normalised output):
//! a deviation the reference has no counterpart for. Unmapped, `R` applied before the norm gave ‖ΔW‖/‖W‖ ≈ 530 and
//! collapsed every normal edit on gemma3-270m.
//!
//! Batches of any size are one call; statistics are computed (or read from the cache) before the first layer changes.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::rome::keys_and_outputs;
use super::subject::SubjectPrompt;
use super::target::{TargetParams, optimize_target};
use super::templates::{TemplateCache, TemplateParams, TemplateStyle};
use super::{EditEnv, EditMethod, EditRecorder, EditRequest, MethodEntry, parse_params};
use crate::error::{Error, Result};
use crate::model::{Capture, HookPoint, LoadedModel, Path, WeightId};

/// The `memit` row of the method table.
pub const MEMIT: MethodEntry = MethodEntry {
    name: "memit",
    summary: "MEMIT, as kmeng01/memit (batch edits over a layer range)",
    batch: true,
    build,
};

/// Hyper-parameters, named as in kmeng01/memit's hparams files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemitParams {
    /// The edited layers, e.g. `[4, 5, 6, 7, 8]`; `z*` lives after the last one.
    pub layers: Vec<usize>,
    /// Adam steps for `z*`.
    pub v_num_grad_steps: usize,
    /// Adam learning rate.
    pub v_lr: f64,
    /// Must be the last layer of the model.
    pub v_loss_layer: usize,
    /// Weight decay of δ relative to `‖z₀‖²`.
    pub v_weight_decay: f64,
    /// Radius of δ relative to `‖z₀‖`.
    pub clamp_norm_factor: f64,
    /// Weight of the KL term.
    pub kl_factor: f64,
    /// λ, the weight of the second moment against the new keys.
    pub mom2_update_weight: f64,
    /// Sentences of the statistics corpus (0: all of ME-PPL minus ME-PPL_1k).
    #[serde(default)]
    pub mom2_n_samples: usize,
    /// `[length, count]` pairs of generated context templates (the reference: `[[10, 5]]`).
    pub context_template_length_params: Vec<[usize; 2]>,
    /// Seed of the template sampler.
    #[serde(default)]
    pub seed: u64,
}

/// MEMIT.
pub struct Memit {
    params: MemitParams,
    templates: TemplateCache,
}

fn build(table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    let params: MemitParams = parse_params(table, origin)?;
    if params.layers.is_empty() || params.layers.windows(2).any(|w| w[0] >= w[1]) {
        let (file, path) = origin.split_once(": ").unwrap_or(("models.toml", origin));
        return Err(Error::invalid(
            file,
            format!("{path}.layers"),
            "expected increasing layer indices, e.g. [4, 5, 6]",
        ));
    }
    let templates = TemplateCache::new(TemplateParams {
        style: TemplateStyle::Easyedit,
        lengths: params.context_template_length_params.clone(),
        seed: params.seed,
        top_k: 5,
    });
    Ok(Box::new(Memit { params, templates }))
}

impl Memit {
    /// `(intermediate, n)` keys — per request, ½·(bare key) + ½·(mean of the prefixed keys) — and `(hidden, n)` the
    /// bare prompts' MLP outputs.
    fn keys(
        &self,
        model: &LoadedModel,
        requests: &[EditRequest],
        templates: &[String],
        layer: usize,
    ) -> Result<(Tensor, Tensor)> {
        let mut columns = Vec::with_capacity(requests.len());
        let mut outputs = Vec::with_capacity(requests.len());
        for request in requests {
            let observed = keys_and_outputs(model, request, templates, layer)?;
            let keys = observed.keys.to_dtype(DType::F64)?;
            outputs.push(observed.outputs.get(0)?.to_dtype(DType::F64)?);
            let bare = keys.get(0)?;
            columns.push(match keys.dim(0)? {
                1 => bare,
                n => ((bare + keys.narrow(0, 1, n - 1)?.mean(0)?)? * 0.5)?,
            });
        }
        Ok((Tensor::stack(&columns, 1)?, Tensor::stack(&outputs, 1)?))
    }

    /// `(hidden, n)`: the residual stream after `layer` at each bare prompt's subject token.
    fn residual_at(&self, model: &LoadedModel, requests: &[EditRequest], layer: usize) -> Result<Tensor> {
        let prompts =
            requests.iter().map(|r| SubjectPrompt::new(model, &r.prompt, &r.subject)).collect::<Result<Vec<_>>>()?;
        let views: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
        let batch = model.batch(&views)?;
        let sites = prompts.iter().enumerate().map(|(i, p)| (i, p.subject_last)).collect();
        let capture = Capture::new(layer, HookPoint::BlockOutput, sites);
        model.run_layers(model.embed(&batch)?, &batch, 0..layer + 1, &capture, Path::Fast)?;
        let rows = capture.take().ok_or_else(|| Error::invalid("(memit)", "hook", "residual not captured"))?;
        Ok(rows.to_dtype(DType::F64)?.t()?.contiguous()?)
    }

    fn edit(
        &self,
        model: &mut LoadedModel,
        requests: &[EditRequest],
        env: &EditEnv,
        recorder: &mut EditRecorder,
    ) -> Result<()> {
        let layers = &self.params.layers;
        let last = *layers.last().unwrap_or(&0);
        if self.params.v_loss_layer + 1 != model.dims().layers || last >= model.dims().layers {
            return Err(Error::invalid(
                "models.toml",
                "methods.memit.v_loss_layer",
                format!("expected the last layer ({}) and edited layers below it", model.dims().layers - 1),
            ));
        }
        let corpus = super::stats::StatsCorpus::default_for(env.data_dir.as_deref(), self.params.mom2_n_samples)?;
        let moments = super::stats::second_moments(model, layers, &corpus, None)?;
        let templates = self.templates.get(model)?;
        let target = TargetParams {
            steps: self.params.v_num_grad_steps,
            lr: self.params.v_lr,
            weight_decay: self.params.v_weight_decay,
            kl_factor: self.params.kl_factor,
            clamp_norm_factor: self.params.clamp_norm_factor,
            early_stop_loss: 5e-2,
        };
        let targets = requests
            .iter()
            .map(|r| optimize_target(model, r, &templates, last, HookPoint::BlockOutput, &target)?.target())
            .collect::<Result<Vec<_>>>()?;
        let z = Tensor::stack(&targets, 1)?.to_dtype(DType::F64)?;
        for (i, (&layer, moment)) in layers.iter().zip(&moments).enumerate() {
            let (keys, outputs) = self.keys(model, requests, &templates, layer)?;
            let current = self.residual_at(model, requests, last)?;
            let mut residual = ((&z - &current)? / (layers.len() - i) as f64)?;
            if let Some((weight, eps)) = model.network.mlp_output_norm(layer) {
                residual = through_output_norm(&outputs, &residual, weight, eps)?;
            }
            let system = ((&moment.matrix * self.params.mom2_update_weight)? + keys.matmul(&keys.t()?)?)?;
            let adjusted = super::linalg::solve_spd(&system, &keys)?;
            let delta = residual.matmul(&adjusted.t()?)?.to_dtype(model.dtype)?;
            recorder.apply(model, WeightId::MlpDown(layer), delta)?;
        }
        Ok(())
    }
}

/// The change of the MLP outputs `y` (`(hidden, n)`, before the norm) that changes the normalised outputs
/// `w ⊙ y / rms(y)` by about `r`, for an architecture whose MLP output passes an RMS norm (weight `w`) before the
/// residual add: to first order the norm scales dimension `i` by `w_i / rms(y)` (and cancels any change along `y`,
/// which only rescales it), so `Δy = rms(y) · r ⊙ w / (w² + δ)`, the inverse of that scale regularised with
/// `δ = (10⁻⁴ · max|w|)²`: gemma3-270m's post-feed-forward weights include exact zeros (a dimension the norm switches
/// off cannot be reached, and dividing by it gave infinite updates), next to dimensions of several hundred.
fn through_output_norm(outputs: &Tensor, residual: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let weight = weight.to_dtype(DType::F64)?.unsqueeze(1)?;
    let largest = weight.abs()?.max_all()?.to_scalar::<f64>()?;
    let inverse = weight.broadcast_div(&(weight.sqr()? + (1e-4 * largest).powi(2))?)?;
    let scale = (outputs.sqr()?.mean_keepdim(0)? + eps)?.sqrt()?;
    Ok(residual.broadcast_mul(&inverse)?.broadcast_mul(&scale)?)
}

impl EditMethod for Memit {
    fn name(&self) -> &'static str {
        "memit"
    }

    fn apply(&self, model: &mut LoadedModel, requests: &[EditRequest], env: &EditEnv) -> Result<super::AppliedEdit> {
        let mut recorder = EditRecorder::default();
        if let Err(e) = self.edit(model, requests, env, &mut recorder) {
            recorder.abandon(model)?;
            return Err(e);
        }
        Ok(recorder.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_small_change_after_the_output_norm_maps_to_one_before_it_that_makes_it() {
        let device = Device::Cpu;
        let outputs = Tensor::new(&[[0.02f64, -0.5], [0.01, 0.25], [-0.03, 1.0]], &device).unwrap();
        let weight = Tensor::new(&[1.5f32, 0.8, 2.0], &device).unwrap();
        // A change whose pre-norm counterpart is orthogonal to `y` (a radial one would only rescale the output):
        // `r = a' ⊙ w` with `a'` the part of `a` orthogonal to each column of `y`.
        let a = Tensor::new(&[[3e-4f64, 2e-4], [-3e-4, 6e-4], [5e-5, 1e-4]], &device).unwrap();
        let along = ((&a * &outputs).unwrap().sum_keepdim(0).unwrap() / outputs.sqr().unwrap().sum_keepdim(0).unwrap())
            .unwrap();
        let orthogonal = (&a - outputs.broadcast_mul(&along).unwrap()).unwrap();
        let w = weight.to_dtype(DType::F64).unwrap().unsqueeze(1).unwrap();
        let residual = orthogonal.broadcast_mul(&w).unwrap();
        let norm = |y: &Tensor| {
            let w = weight.to_dtype(DType::F64).unwrap().unsqueeze(1).unwrap();
            let rms = (y.sqr().unwrap().mean_keepdim(0).unwrap() + 1e-6).unwrap().sqrt().unwrap();
            y.broadcast_div(&rms).unwrap().broadcast_mul(&w).unwrap()
        };
        let change = through_output_norm(&outputs, &residual, &weight, 1e-6).unwrap();
        let reached = (norm(&(&outputs + &change).unwrap()) - norm(&outputs)).unwrap();
        let error = (&reached - &residual).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        let size = residual.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(error < 0.01 * size, "reached {reached} for {residual}");
        let zero = through_output_norm(&outputs, &residual.zeros_like().unwrap(), &weight, 1e-6).unwrap();
        assert_eq!(zero.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
        // A dimension the norm switches off is not amplified without bound.
        let off = Tensor::new(&[1.5f32, 0.0, 2.0], &device).unwrap();
        let change = through_output_norm(&outputs, &residual, &off, 1e-6).unwrap();
        assert!(change.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().is_finite());
    }
}
