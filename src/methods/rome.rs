//! ROME (Meng et al. 2022, kmeng01/rome) and r-ROME (Gupta et al. 2024, "Rebuilding ROME").
//!
//! ROME writes one fact as a rank-one update of one MLP down-projection `W`:
//! 1. the key `k̄`: the input of `W` at the subject's last token, averaged over the context templates (the bare
//!    prompt and 20 generated prefixes); `u = C⁻¹k̄` normalised when `mom2_adjustment` is on, else `k̄/‖k̄‖`;
//! 2. the value `v*`: the MLP output at that token optimised so the model predicts the new target
//!    (`target.rs`, at [`HookPoint::MlpOutput`]);
//! 3. `ΔW = ((v* − W k) / (k·u)) ⊗ u`.
//!
//! The two methods differ only in step 3's key, exactly where the papers say. `rome` follows the reference code:
//! `k` is the key of the bare, unprefixed prompt and `W k` its current MLP output, while `u` comes from the
//! prefix-averaged `k̄`. This asymmetry is what the Butterfly-effect paper's collapses come from. `r-rome` uses the
//! prefix-averaged key in both places (`k = k̄`, and `W k` the average MLP output over the same templates), the
//! random-prefix-keys fix of Gupta et al. Requests are applied one after another, each to the model as the previous
//! left it; templates are generated once per method instance, from the model as it was at the first edit.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::screen::{RankOneGeometry, ScreenSignals, rank_one_signals, request_signals};
use super::target::{TargetParams, contextualise, optimize_target};
use super::templates::{TemplateCache, TemplateParams, TemplateStyle};
use super::{EditEnv, EditMethod, EditRecorder, EditRequest, MethodEntry, l2_norm, parse_params};
use crate::error::{Error, Result};
use crate::methods::subject::SubjectPrompt;
use crate::model::{Capture, HookPoint, HookSet, LoadedModel, Path, WeightId};

/// The `rome` row of the method table.
pub const ROME: MethodEntry = MethodEntry {
    name: "rome",
    summary: "ROME, faithful to kmeng01/rome (unprefixed key in the update)",
    batch: false,
    build: build_rome,
};
/// The `r-rome` row of the method table.
pub const R_ROME: MethodEntry = MethodEntry {
    name: "r-rome",
    summary: "r-ROME: prefix-averaged key in both places",
    batch: false,
    build: build_r_rome,
};

/// Hyper-parameters, named as in the reference implementations' hparams files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RomeParams {
    /// The edited layer (exactly one).
    pub layers: Vec<usize>,
    /// Adam steps for `v*`.
    pub v_num_grad_steps: usize,
    /// Adam learning rate.
    pub v_lr: f64,
    /// Layer whose output gives the loss; must be the last layer (the references read the final logits).
    pub v_loss_layer: usize,
    /// Weight decay of `v*` relative to `‖v₀‖²`.
    pub v_weight_decay: f64,
    /// Radius of δ relative to `‖v₀‖`.
    pub clamp_norm_factor: f64,
    /// Weight of the KL term on "{subject} is a".
    pub kl_factor: f64,
    /// Whiten the key with the second moment `C` (`u = C⁻¹k̄`).
    pub mom2_adjustment: bool,
    /// Sentences of the statistics corpus (0: all of ME-PPL minus ME-PPL_1k).
    #[serde(default)]
    pub mom2_n_samples: usize,
    /// `[length, count]` pairs of generated context templates.
    pub context_template_length_params: Vec<[usize; 2]>,
    /// `easyedit` (start words) or `kmeng01` (end-of-text start).
    #[serde(default)]
    pub context_template_style: TemplateStyle,
    /// Seed of the template sampler.
    #[serde(default)]
    pub seed: u64,
}

/// Which key enters the closed-form update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoice {
    /// The bare prompt's key (kmeng01/rome).
    Unprefixed,
    /// The prefix-averaged key (r-ROME).
    PrefixAveraged,
}

/// ROME or r-ROME.
pub struct Rome {
    name: &'static str,
    params: RomeParams,
    key: KeyChoice,
    templates: TemplateCache,
}

impl Rome {
    /// Builds the method from its hyper-parameter table (`origin` names the table in errors).
    pub fn new(name: &'static str, key: KeyChoice, table: &toml::Table, origin: &str) -> Result<Self> {
        let params: RomeParams = parse_params(table, origin)?;
        if params.layers.len() != 1 {
            let (file, path) = origin.split_once(": ").unwrap_or(("models.toml", origin));
            return Err(Error::invalid(file, format!("{path}.layers"), "ROME edits exactly one layer, e.g. [5]"));
        }
        let templates = TemplateCache::new(TemplateParams {
            style: params.context_template_style,
            lengths: params.context_template_length_params.clone(),
            seed: params.seed,
            top_k: 5,
        });
        Ok(Rome { name, params, key, templates })
    }
}

fn build(name: &'static str, key: KeyChoice, table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    Ok(Box::new(Rome::new(name, key, table, origin)?))
}

fn build_rome(table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    build("rome", KeyChoice::Unprefixed, table, origin)
}

fn build_r_rome(table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    build("r-rome", KeyChoice::PrefixAveraged, table, origin)
}

/// Keys and MLP outputs at the subject's last token of each filled-in template, `(templates, width)` each.
pub struct KeysAndOutputs {
    /// Inputs of the down-projection.
    pub keys: Tensor,
    /// Outputs of the MLP.
    pub outputs: Tensor,
}

/// Runs the templates filled with the request (no target) through layers `0..=layer` and captures keys and outputs.
pub fn keys_and_outputs(
    model: &LoadedModel,
    request: &EditRequest,
    templates: &[String],
    layer: usize,
) -> Result<KeysAndOutputs> {
    let prompts = templates
        .iter()
        .map(|t| SubjectPrompt::new(model, &contextualise(t, &request.prompt), &request.subject))
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let batch = model.batch(&views)?;
    let sites: Vec<(usize, usize)> = prompts.iter().enumerate().map(|(i, p)| (i, p.subject_last)).collect();
    let key_capture = Capture::new(layer, HookPoint::MlpKey, sites.clone());
    let output_capture = Capture::new(layer, HookPoint::MlpOutput, sites);
    let hooks = HookSet::new().with(&key_capture).with(&output_capture);
    model.run_layers(model.embed(&batch)?, &batch, 0..layer + 1, &hooks, Path::Fast)?;
    let missing = || Error::invalid("(rome)", "hook", "keys were not captured");
    Ok(KeysAndOutputs {
        keys: key_capture.take().ok_or_else(missing)?,
        outputs: output_capture.take().ok_or_else(missing)?,
    })
}

impl Rome {
    fn target_params(&self) -> TargetParams {
        TargetParams {
            steps: self.params.v_num_grad_steps,
            lr: self.params.v_lr,
            weight_decay: self.params.v_weight_decay,
            kl_factor: self.params.kl_factor,
            clamp_norm_factor: self.params.clamp_norm_factor,
            early_stop_loss: 5e-2,
        }
    }

    fn check_layers(&self, model: &LoadedModel) -> Result<usize> {
        let layer = self.params.layers[0];
        let dims = model.dims();
        if self.params.v_loss_layer + 1 != dims.layers || layer >= dims.layers {
            return Err(Error::invalid(
                "models.toml",
                format!("methods.{}.v_loss_layer", self.name),
                format!("expected the last layer ({}) and an edit layer below it", dims.layers - 1),
            ));
        }
        Ok(layer)
    }

    /// The key side of the update: the keys and outputs over the templates, `k̄` and the unit direction `u`.
    fn key_side(
        &self,
        model: &LoadedModel,
        request: &EditRequest,
        templates: &[String],
        env: &EditEnv,
    ) -> Result<KeySide> {
        let layer = self.params.layers[0];
        let observed = keys_and_outputs(model, request, templates, layer)?;
        let mean_key = observed.keys.to_dtype(DType::F64)?.mean(0)?;
        let u = if self.params.mom2_adjustment {
            let moment = self.second_moment(model, env, self.params.mom2_n_samples)?;
            super::linalg::solve_spd(&moment, &mean_key.unsqueeze(1)?)?.squeeze(1)?
        } else {
            mean_key.clone()
        };
        let direction = (&u / l2_norm(&u)?)?;
        Ok(KeySide { observed, mean_key, direction })
    }

    fn second_moment(&self, model: &LoadedModel, env: &EditEnv, sentences: usize) -> Result<Tensor> {
        let corpus = super::stats::StatsCorpus::default_for(env.data_dir.as_deref(), sentences)?;
        Ok(super::stats::second_moments(model, &self.params.layers, &corpus, None)?.remove(0).matrix)
    }

    /// The key `k` the update is solved for and the current output `W k` it replaces (f64).
    fn update_key(&self, side: &KeySide) -> Result<(Tensor, Tensor)> {
        Ok(match self.key {
            KeyChoice::Unprefixed => {
                (side.observed.keys.get(0)?.to_dtype(DType::F64)?, side.observed.outputs.get(0)?.to_dtype(DType::F64)?)
            }
            KeyChoice::PrefixAveraged => (side.mean_key.clone(), side.observed.outputs.to_dtype(DType::F64)?.mean(0)?),
        })
    }

    /// The rank-one update for one request on the current model: `(ΔW, u, v*)`.
    pub fn update_for(&self, model: &LoadedModel, request: &EditRequest, env: &EditEnv) -> Result<RankOneUpdate> {
        let layer = self.check_layers(model)?;
        let started = std::time::Instant::now();
        let templates = self.templates.get(model)?;
        let templates_seconds = started.elapsed().as_secs_f64();
        let side = self.key_side(model, request, &templates, env)?;
        let keys_seconds = started.elapsed().as_secs_f64() - templates_seconds;
        let optimized =
            optimize_target(model, request, &templates, layer, HookPoint::MlpOutput, &self.target_params())?;
        if std::env::var_os("EDITGUARD_TRACE").is_some() {
            let total = started.elapsed().as_secs_f64();
            let steps = optimized.losses.len();
            eprintln!(
                "{}: templates {templates_seconds:.2}s, keys {keys_seconds:.2}s, total {total:.2}s, {steps} steps",
                self.name
            );
        }
        let target = optimized.target()?.to_dtype(DType::F64)?;
        let (key, output) = self.update_key(&side)?;
        let u = &side.direction;
        let denominator = (&key * u)?.sum_all()?.to_scalar::<f64>()?;
        let right = ((target - output)? / denominator)?;
        let delta = right.unsqueeze(1)?.matmul(&u.unsqueeze(0)?)?.to_dtype(model.dtype)?;
        Ok(RankOneUpdate {
            delta,
            key: key.to_dtype(model.dtype)?,
            target: optimized.target()?,
            losses: optimized.losses,
        })
    }
}

/// Sentences of the statistics corpus the screen's second moment `C` uses when the method itself uses none
/// (`mom2_adjustment` off): MEMIT's setting on the default model, so the two share one cache entry.
pub const SCREEN_MOMENT_SENTENCES: usize = 2000;

struct KeySide {
    observed: KeysAndOutputs,
    mean_key: Tensor,
    direction: Tensor,
}

/// What one ROME step computed (exposed for tests of the algebra).
pub struct RankOneUpdate {
    /// `ΔW`, `(hidden, intermediate)`.
    pub delta: Tensor,
    /// The key the update was solved for (`k_bare` for rome, `k̄` for r-rome).
    pub key: Tensor,
    /// `v*`.
    pub target: Tensor,
    /// Loss per optimisation step.
    pub losses: Vec<f64>,
}

impl EditMethod for Rome {
    fn name(&self) -> &'static str {
        self.name
    }

    fn screen(&self, model: &LoadedModel, request: &EditRequest, env: &EditEnv) -> Result<Option<ScreenSignals>> {
        let layer = self.check_layers(model)?;
        let templates = self.templates.get(model)?;
        let side = self.key_side(model, request, &templates, env)?;
        let (key, _) = self.update_key(&side)?;
        let weight = model.network.weight(WeightId::MlpDown(layer))?.to_dtype(DType::F64)?;
        // v₀ is the bare prompt's MLP output; δ is clamped to clamp_norm_factor · ‖v₀‖. For rome the residual
        // v* − W k is δ itself; r-rome replaces W k by the template mean, which adds ‖v₀ − mean output‖.
        let bare_output = side.observed.outputs.get(0)?.to_dtype(DType::F64)?;
        let mut residual_bound = self.params.clamp_norm_factor * l2_norm(&bare_output)?;
        if self.key == KeyChoice::PrefixAveraged {
            let mean_output = side.observed.outputs.to_dtype(DType::F64)?.mean(0)?;
            residual_bound += l2_norm(&(bare_output - mean_output)?)?;
        }
        let sentences = if self.params.mom2_adjustment { self.params.mom2_n_samples } else { SCREEN_MOMENT_SENTENCES };
        let moment = self.second_moment(model, env, sentences)?;
        let mut signals = rank_one_signals(&RankOneGeometry {
            weight: &weight,
            key: &key,
            mean_key: &side.mean_key,
            direction: &side.direction,
            residual_bound,
            second_moment: Some(&moment),
        })?;
        signals.extend(request_signals(model, request)?.0);
        Ok(Some(signals))
    }

    fn apply(&self, model: &mut LoadedModel, requests: &[EditRequest], env: &EditEnv) -> Result<super::AppliedEdit> {
        let mut recorder = EditRecorder::default();
        for request in requests {
            let update = match self.update_for(model, request, env) {
                Ok(update) => update,
                Err(e) => {
                    recorder.abandon(model)?;
                    return Err(e);
                }
            };
            recorder.apply(model, WeightId::MlpDown(self.params.layers[0]), update.delta)?;
        }
        Ok(recorder.finish())
    }
}
