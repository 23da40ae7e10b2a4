//! The rank-one factors MEND transforms: for every edited weight, each token's input `u_t` and the gradient of the
//! edit loss at the weight's output `δ_t`, so that the weight's gradient is `Σ_t δ_t u_tᵀ`.
//!
//! The edit loss is the NLL of the target tokens of `prompt + " " + target` (mean over the target tokens of every
//! request, all requests in one packed batch). The layers below the lowest edited one run once on the fast path
//! (the backward stops there, as the reference's does); from that layer up the differentiable path runs with a zero
//! probe added at the output of every edited linear map — the MLP pre-activation (gate and up columns, or GPT-2/GPT-J's
//! first map) and the MLP output (down) — so the probe's gradient is `δ`, and with the MLP input and the MLP key
//! captured as `u`. Everything returned is detached (first order). Rows where `u` or `δ` is all zero are dropped.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{D, Tensor, Var};

use crate::data::request::EditRequest;
use crate::error::{Error, Result};
use crate::model::{Hook, HookPoint, LoadedModel, MlpProjection, NoHooks, PackedBatch, Packing, Path, Site, WeightId};

/// Token rows of a batch of edit requests with the sites that predict each target token.
pub struct TargetBatch {
    /// The packed batch.
    pub batch: PackedBatch,
    /// Sites whose next token is a target token.
    pub sites: Vec<Site>,
    /// Those target tokens.
    pub labels: Vec<u32>,
}

/// Packs `prompt + target` for each `(prompt, target)` (the target with a leading space), with the target sites.
pub fn target_batch(model: &LoadedModel, pairs: &[(String, String)]) -> Result<TargetBatch> {
    let mut rows = Vec::new();
    let (mut sites, mut labels) = (Vec::new(), Vec::new());
    for (row, (prompt, target)) in pairs.iter().enumerate() {
        let prompt_ids = model.encode(prompt)?;
        let target_ids = model.encode_continuation(&format!(" {}", target.trim()))?;
        if prompt_ids.is_empty() || target_ids.is_empty() {
            return Err(Error::invalid("(mend)", "request", format!("`{prompt}` → `{target}` tokenises to nothing")));
        }
        for (j, &token) in target_ids.iter().enumerate() {
            sites.push((row, prompt_ids.len() - 1 + j));
            labels.push(token);
        }
        let mut ids = prompt_ids;
        ids.extend_from_slice(&target_ids);
        rows.push(ids);
    }
    let views: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    Ok(TargetBatch { batch: model.batch(&views)?, sites, labels })
}

/// Mean NLL of `labels` under `logits` `(sites, vocab)`, differentiable.
pub fn mean_nll(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let labels = Tensor::from_vec(labels.to_vec(), (labels.len(), 1), logits.device())?;
    Ok(log_probs.gather(&labels, 1)?.neg()?.mean_all()?)
}

/// Factors of each edited weight, in the order asked.
pub struct Factors {
    /// `u`, `(tokens, in)` per weight.
    pub inputs: Vec<Tensor>,
    /// `δ`, `(tokens, out)` per weight.
    pub grads: Vec<Tensor>,
    /// The edit loss before editing.
    pub loss: f64,
}

impl Factors {
    /// `(u, δ)` per weight, as the editor takes them.
    pub fn pairs(&self) -> Vec<(Tensor, Tensor)> {
        self.inputs.iter().cloned().zip(self.grads.iter().cloned()).collect()
    }
}

/// Captures inputs and adds zero probes at the edited layers.
struct Probes {
    layers: Vec<usize>,
    captured: Mutex<HashMap<(usize, HookPoint), Tensor>>,
    probes: Mutex<HashMap<(usize, HookPoint), Var>>,
}

impl Hook for Probes {
    fn visit(&self, layer: usize, point: HookPoint, x: Tensor, _packing: &Packing) -> Result<Tensor> {
        if !self.layers.contains(&layer) {
            return Ok(x);
        }
        let poisoned = || Error::invalid("(mend)", "probes", "lock poisoned");
        match point {
            HookPoint::MlpInput | HookPoint::MlpKey => {
                self.captured.lock().map_err(|_| poisoned())?.insert((layer, point), x.detach());
                Ok(x)
            }
            HookPoint::MlpPreActivation | HookPoint::MlpOutput => {
                let probe = Var::zeros(x.shape(), x.dtype(), x.device())?;
                let out = (x + probe.as_tensor())?;
                self.probes.lock().map_err(|_| poisoned())?.insert((layer, point), probe);
                Ok(out)
            }
            HookPoint::BlockOutput => Ok(x),
        }
    }
}

/// The factors of the edit loss of `requests` for `weights` on the model as it is now.
pub fn edit_factors(model: &LoadedModel, requests: &[EditRequest], weights: &[WeightId]) -> Result<Factors> {
    let pairs: Vec<(String, String)> = requests.iter().map(|r| (r.prompt_text(), r.target_new.clone())).collect();
    let targets = target_batch(model, &pairs)?;
    factors_of(model, &targets, weights)
}

/// The lowest edited layer of `weights`, and the layers holding them.
fn edited_layers(weights: &[WeightId]) -> Result<(usize, Vec<usize>)> {
    let mut layers = Vec::new();
    for id in weights {
        let (_, layer) = id.mlp().ok_or_else(|| Error::invalid("(mend)", format!("{id:?}"), "not an MLP weight"))?;
        if !layers.contains(&layer) {
            layers.push(layer);
        }
    }
    let lowest = *layers.iter().min().ok_or_else(|| Error::invalid("(mend)", "inner_params", "no edited weight"))?;
    Ok((lowest, layers))
}

/// The lowest layer holding one of `weights` (an error when one is not an MLP weight or there is none).
pub fn lowest_edited_layer(weights: &[WeightId]) -> Result<usize> {
    Ok(edited_layers(weights)?.0)
}

/// The hidden state entering the lowest edited layer of `weights` (the fast path: nothing below it is differentiated).
pub fn below_edited(model: &LoadedModel, batch: &PackedBatch, weights: &[WeightId]) -> Result<Tensor> {
    let lowest = lowest_edited_layer(weights)?;
    model.run_layers(model.embed(batch)?, batch, 0..lowest, &NoHooks, Path::Fast)
}

/// The factors of the NLL of a prepared target batch (see [`edit_factors`]).
pub fn factors_of(model: &LoadedModel, targets: &TargetBatch, weights: &[WeightId]) -> Result<Factors> {
    let below = below_edited(model, &targets.batch, weights)?;
    Ok(factors_above(model, &targets.batch, below, &targets.sites, &targets.labels, weights)?.0)
}

/// The factors of the mean NLL of `labels` at `sites`, from `below` (see [`below_edited`]) up; also returns the
/// unedited final hidden states of every row (detached, from the differentiable path), so a caller that packed more
/// rows than the loss reads gets their unedited outputs from the same pass. Rows without a site get `δ = 0` and are
/// dropped from the factors.
pub fn factors_above(
    model: &LoadedModel,
    batch: &PackedBatch,
    below: Tensor,
    sites: &[Site],
    labels: &[u32],
    weights: &[WeightId],
) -> Result<(Factors, Tensor)> {
    let (lowest, layers) = edited_layers(weights)?;
    let probes = Probes { layers, captured: Mutex::new(HashMap::new()), probes: Mutex::new(HashMap::new()) };
    let hidden = model.run_layers(below, batch, lowest..model.dims().layers, &probes, Path::Differentiable)?;
    let logits = model.logits_at(&hidden, &batch.packing, sites, Path::Differentiable)?;
    let loss = mean_nll(&logits, labels)?;
    let value = crate::error::ensure_finite("MEND edit loss", f64::from(loss.to_scalar::<f32>()?))?;
    let grads = loss.backward()?;
    let captured = probes.captured.into_inner().map_err(|_| Error::invalid("(mend)", "probes", "lock poisoned"))?;
    let probe_vars = probes.probes.into_inner().map_err(|_| Error::invalid("(mend)", "probes", "lock poisoned"))?;
    let width = model.dims().intermediate;
    let gated = model.network.weight(WeightId::MlpGate(lowest)).is_ok();
    let missing = |what: &str| Error::invalid("(mend)", "hooks", format!("{what} was not seen"));
    let (mut inputs, mut deltas) = (Vec::new(), Vec::new());
    for id in weights {
        let (projection, layer) = id.mlp().expect("checked above");
        let (input_point, output_point) = match projection {
            MlpProjection::Gate | MlpProjection::Up => (HookPoint::MlpInput, HookPoint::MlpPreActivation),
            MlpProjection::Down => (HookPoint::MlpKey, HookPoint::MlpOutput),
        };
        let input = captured.get(&(layer, input_point)).ok_or_else(|| missing("the layer input"))?.clone();
        let probe = probe_vars.get(&(layer, output_point)).ok_or_else(|| missing("the output probe"))?;
        let grad = grads.get(probe.as_tensor()).ok_or_else(|| missing("the output gradient"))?.detach();
        let grad = match (projection, gated) {
            (MlpProjection::Gate, true) => grad.narrow(1, 0, width)?.contiguous()?,
            (MlpProjection::Up, true) => grad.narrow(1, width, width)?.contiguous()?,
            _ => grad,
        };
        let (input, grad) = drop_zero_rows(&input, &grad)?;
        inputs.push(input);
        deltas.push(grad);
    }
    Ok((Factors { inputs, grads: deltas, loss: value }, hidden.detach()))
}

/// Keeps the rows where both `u` and `δ` have a non-zero entry.
fn drop_zero_rows(u: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
    let nonzero = |t: &Tensor| -> Result<Vec<bool>> {
        Ok(t.abs()?
            .max(D::Minus1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .map(|m| *m > 0.0)
            .collect())
    };
    let keep: Vec<u32> = nonzero(u)?
        .iter()
        .zip(nonzero(delta)?)
        .enumerate()
        .filter(|(_, (a, b))| **a && *b)
        .map(|(i, _)| i as u32)
        .collect();
    if keep.len() == u.dim(0)? {
        return Ok((u.clone(), delta.clone()));
    }
    let index = Tensor::new(keep.as_slice(), u.device())?;
    Ok((u.index_select(&index, 0)?, delta.index_select(&index, 0)?))
}
