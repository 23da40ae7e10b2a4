//! Fine-tuning baselines: `ft-l-inf`, the constrained fine-tuning of the ROME baselines (kmeng01/rome
//! `baselines/ft`, "FT-L"), and `ft`, the unconstrained variant EasyEdit runs for Llama.
//!
//! One MLP down-projection `W` is trained with Adam (no weight decay) for `num_steps` epochs over mini-batches of
//! `batch_size` requests. A batch whose loss is already below 1e-2 takes no step, and training stops once an epoch's
//! mean loss is below 1e-2. With `norm_constraint = ε`, `W` is clamped element-wise to `[W₀ − ε, W₀ + ε]` after every
//! batch (an L∞ ball, hence the name). Objectives, as EasyEdit names them:
//! - `prompt_last` (FT-L, the default): at the prompt's last token only, the mean over the target's tokens of their
//!   negative log-probability, not teacher-forced;
//! - `target_new` (FT-M): the teacher-forced NLL over the target positions, averaged per prompt.
//!
//! The layers below the trained one do not depend on `W` and run once on the fast path. Only the weight is trained
//! (GPT-2's `c_proj` bias, which the reference also trains, stays fixed).

use candle_core::{D, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::Deserialize;

use super::{EditEnv, EditMethod, EditRecorder, EditRequest, MethodEntry, parse_params};
use crate::error::{Error, Result, ensure_finite};
use crate::model::{LoadedModel, NoHooks, Path, Site, WeightId};

/// The `ft-l-inf` row of the method table.
pub const FT_L_INF: MethodEntry = MethodEntry {
    name: "ft-l-inf",
    summary: "constrained fine-tuning of one MLP down-projection (W₀ ± ε), as the ROME baselines",
    batch: true,
    build: build_constrained,
};
/// The `ft` row of the method table.
pub const FT: MethodEntry = MethodEntry {
    name: "ft",
    summary: "unconstrained fine-tuning of one MLP down-projection, as EasyEdit for Llama",
    batch: true,
    build: build_unconstrained,
};

/// What the loss looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// All target tokens scored at the prompt's last position (FT-L).
    PromptLast,
    /// Teacher-forced NLL of the target (FT-M).
    TargetNew,
}

/// Hyper-parameters, named as in the references' hparams files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtParams {
    /// The trained layer (exactly one).
    pub layers: Vec<usize>,
    /// Adam learning rate.
    pub lr: f64,
    /// Epochs.
    pub num_steps: usize,
    /// Requests per mini-batch.
    pub batch_size: usize,
    /// ε of the L∞ constraint (`ft-l-inf`); absent or false for `ft`.
    #[serde(default)]
    pub norm_constraint: Option<f64>,
    /// The objective.
    #[serde(default = "default_objective")]
    pub objective_optimization: Objective,
}

fn default_objective() -> Objective {
    Objective::PromptLast
}

/// FT-L∞ or FT.
pub struct FineTune {
    name: &'static str,
    params: FtParams,
}

fn build(name: &'static str, constrained: bool, table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    let params: FtParams = parse_params(table, origin)?;
    let (file, path) = origin.split_once(": ").unwrap_or(("models.toml", origin));
    if params.layers.len() != 1 {
        return Err(Error::invalid(file, format!("{path}.layers"), "fine-tuning trains exactly one layer, e.g. [0]"));
    }
    match (constrained, params.norm_constraint) {
        (true, None) => Err(Error::invalid(file, format!("{path}.norm_constraint"), "ft-l-inf needs ε, e.g. 5e-4")),
        (false, Some(_)) => {
            Err(Error::invalid(file, format!("{path}.norm_constraint"), "ft is unconstrained; use ft-l-inf"))
        }
        _ => Ok(Box::new(FineTune { name, params })),
    }
}

fn build_constrained(table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    build("ft-l-inf", true, table, origin)
}

fn build_unconstrained(table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    build("ft", false, table, origin)
}

/// A mini-batch prepared for training: ids, and for each prompt the scored `(site, token)` pairs.
struct Prepared {
    sequences: Vec<Vec<u32>>,
    scored: Vec<Vec<(Site, u32)>>,
}

impl FineTune {
    fn prepare(&self, model: &LoadedModel, requests: &[EditRequest]) -> Result<Prepared> {
        let mut sequences = Vec::new();
        let mut scored = Vec::new();
        for (row, request) in requests.iter().enumerate() {
            let prompt = model.encode(&request.prompt_text())?;
            let target = model.encode_continuation(&format!(" {}", request.target_new.trim()))?;
            if prompt.is_empty() || target.is_empty() {
                return Err(Error::invalid(format!("request {}", request.id), "prompt", "empty prompt or target"));
            }
            let last = prompt.len() - 1;
            let (ids, pairs) = match self.params.objective_optimization {
                Objective::PromptLast => (prompt, target.iter().map(|&t| ((row, last), t)).collect()),
                Objective::TargetNew => {
                    let pairs = target.iter().enumerate().map(|(j, &t)| ((row, last + j), t)).collect();
                    let mut ids = prompt;
                    ids.extend_from_slice(&target[..target.len() - 1]);
                    (ids, pairs)
                }
            };
            sequences.push(ids);
            scored.push(pairs);
        }
        Ok(Prepared { sequences, scored })
    }

    fn train(&self, model: &mut LoadedModel, requests: &[EditRequest]) -> Result<Tensor> {
        let layer = self.params.layers[0];
        let id = WeightId::MlpDown(layer);
        let original = model.network.weight(id)?;
        let weight = Var::from_tensor(&original)?;
        let mut optimizer = AdamW::new(
            vec![weight.clone()],
            ParamsAdamW { lr: self.params.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        )?;
        let batches: Vec<Prepared> = requests
            .chunks(self.params.batch_size.max(1))
            .map(|chunk| self.prepare(model, chunk))
            .collect::<Result<_>>()?;
        let previous = model.network.set_weight(id, weight.as_tensor().clone())?;
        let result = (|| -> Result<()> {
            let layers = model.dims().layers;
            let belows = batches
                .iter()
                .map(|b| {
                    let views: Vec<&[u32]> = b.sequences.iter().map(|s| s.as_slice()).collect();
                    let batch = model.batch(&views)?;
                    let below = model.run_layers(model.embed(&batch)?, &batch, 0..layer, &NoHooks, Path::Fast)?;
                    Ok((batch, below))
                })
                .collect::<Result<Vec<_>>>()?;
            for _epoch in 0..self.params.num_steps {
                let mut epoch_loss = 0.0;
                for (prepared, (batch, below)) in batches.iter().zip(&belows) {
                    let hidden =
                        model.run_layers(below.clone(), batch, layer..layers, &NoHooks, Path::Differentiable)?;
                    let loss = self.loss(model, prepared, batch, &hidden)?;
                    let value = ensure_finite("fine-tuning loss", f64::from(loss.to_scalar::<f32>()?))?;
                    epoch_loss += value / batches.len() as f64;
                    if value >= 1e-2 {
                        optimizer.backward_step(&loss)?;
                    }
                    if let Some(epsilon) = self.params.norm_constraint {
                        let clamped =
                            weight.as_tensor().minimum(&(&original + epsilon)?)?.maximum(&(&original - epsilon)?)?;
                        weight.set(&clamped)?;
                    }
                }
                if epoch_loss < 1e-2 {
                    break;
                }
            }
            Ok(())
        })();
        model.network.restore_weight(id, previous)?;
        result?;
        Ok((weight.as_tensor().detach() - &original)?)
    }

    fn loss(
        &self,
        model: &LoadedModel,
        prepared: &Prepared,
        batch: &crate::model::PackedBatch,
        hidden: &Tensor,
    ) -> Result<Tensor> {
        let sites: Vec<Site> = prepared.scored.iter().flatten().map(|(s, _)| *s).collect();
        let tokens: Vec<u32> = prepared.scored.iter().flatten().map(|(_, t)| *t).collect();
        let log_probs = candle_nn::ops::log_softmax(
            &model.logits_at(hidden, &batch.packing, &sites, Path::Differentiable)?,
            D::Minus1,
        )?;
        let labels = Tensor::from_vec(tokens, (sites.len(), 1), &model.device)?;
        let picked = log_probs.gather(&labels, 1)?.squeeze(1)?;
        let mut per_prompt = Vec::with_capacity(prepared.scored.len());
        let mut offset = 0;
        for pairs in &prepared.scored {
            per_prompt.push((picked.narrow(0, offset, pairs.len())?.sum_all()?.neg()? / pairs.len() as f64)?);
            offset += pairs.len();
        }
        Ok(Tensor::stack(&per_prompt, 0)?.mean_all()?)
    }
}

impl EditMethod for FineTune {
    fn name(&self) -> &'static str {
        self.name
    }

    fn apply(&self, model: &mut LoadedModel, requests: &[EditRequest], _env: &EditEnv) -> Result<super::AppliedEdit> {
        let mut recorder = EditRecorder::default();
        let delta = self.train(model, requests)?;
        recorder.apply(model, WeightId::MlpDown(self.params.layers[0]), delta)?;
        Ok(recorder.finish())
    }
}
