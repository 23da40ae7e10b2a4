//! MEND (Mitchell et al. 2022, eric-mitchell/mend; EasyEdit's `trainer/algs/MEND.py`): a trained editor network that
//! turns the gradient of the edit loss into a weight update.
//!
//! An edit computes, for every edited weight, the rank-one factors of the gradient of the target's NLL — each token's
//! input `u_t` and output gradient `δ_t` ([`factors`]) — transforms them with the editor ([`editor`]) and adds
//! `α_w · Σ_t δ̃_t ũ_tᵀ` to the weight. A batch of requests is one forward/backward and one update per weight from all
//! their tokens; sequential editing applies each request to the weights the previous left, with a fresh gradient.
//! The editor is trained per model ([`train`]) and cached by content ([`store`]); the first edit on a model without a
//! cached editor trains one and says so.
//!
//! Edited weights are named as the references name them (`inner_params`): `model.layers.29.mlp.gate_proj.weight`
//! (Llama: gate, up and down), `transformer.h.45.mlp.c_fc.weight` (GPT-2: `c_fc`, `c_proj`),
//! `transformer.h.25.mlp.fc_in.weight` (GPT-J: `fc_in`, `fc_out`).

pub mod accumulate;
pub mod curve;
pub mod editor;
pub mod factors;
pub mod store;
pub mod train;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{EditEnv, EditMethod, EditRecorder, EditRequest, MethodEntry, TrainedComponent, parse_params};
use crate::error::{Error, Result};
use crate::model::{LoadedModel, WeightId};

pub use editor::Editor;

/// The `mend` row of the method table.
pub const MEND: MethodEntry = MethodEntry {
    name: "mend",
    summary: "MEND: a trained editor transforms the edit gradient's rank-one factors (trained on first use)",
    batch: true,
    build,
};

/// Hyper-parameters, named as in the references' configs (`config/alg/mend.yaml`, `config/config.yaml`,
/// EasyEdit's `hparams/TRAINING/MEND/*.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MendParams {
    /// The edited weights, by their Hugging Face names.
    pub inner_params: Vec<String>,
    /// Initial step size `α` of every edited weight.
    pub edit_lr: f64,
    /// Adam learning rate of the transforms.
    pub lr: f64,
    /// Adam learning rate of the step sizes.
    pub lr_lr: f64,
    /// Weight of the edit loss.
    pub cedit: f64,
    /// Weight of the locality loss.
    pub cloc: f64,
    /// Rank of the low-rank layers.
    pub rank: usize,
    /// Hidden layers of the transform (`n_hidden + 1` residual layers).
    pub n_hidden: usize,
    /// Edits whose gradients are accumulated per optimiser step.
    pub accumulate_bs: usize,
    /// Gradient norm clip.
    pub grad_clip: f64,
    /// Training edits (one edit per training step).
    pub max_iters: usize,
    /// Validate every this many training edits.
    pub val_interval: usize,
    /// Held-out requests per validation.
    pub val_steps: usize,
    /// Stop when the validation loss has not improved for this many training edits.
    pub early_stop_patience: usize,
    /// Which prompt the edit loss reads after the edit: `rephrase` (the paper) or `prompt` (EasyEdit).
    #[serde(default)]
    pub edit_loss_on: EditLossPrompt,
    /// Where a training example's locality probe comes from: `same-relation` (default) or `any` other record.
    #[serde(default)]
    pub locality_from: LocalityFrom,
    /// Records of COUNTERFACT's train split held out for validation (the last ones of its seeded order).
    #[serde(default = "default_val_records")]
    pub val_records: usize,
    /// Seed of the initialisation and of the record order.
    #[serde(default)]
    pub seed: u64,
}

fn default_val_records() -> usize {
    200
}

/// The prompt the training edit loss is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditLossPrompt {
    /// A paraphrase of the edit prompt (the MEND paper: edits must generalise).
    #[default]
    Rephrase,
    /// The edit prompt itself (EasyEdit).
    Prompt,
}

/// Where a training example's locality probe comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalityFrom {
    /// A neighbourhood probe of another record with the same relation (prompt template): the kind of prompt an edit
    /// bleeds into and COUNTERFACT's locality score reads. editguard's choice; with unrelated probes the trained
    /// editor of smollm2-135m kept only 49% of neighbourhood answers (see README).
    #[default]
    SameRelation,
    /// A neighbourhood probe of any other record (the references draw locality examples from unrelated data).
    Any,
}

impl MendParams {
    /// The edited weights as weight ids, in order; an unknown name is an error naming it.
    pub fn weights(&self, origin: &str) -> Result<Vec<WeightId>> {
        if self.inner_params.is_empty() {
            return Err(Error::invalid(origin, "inner_params", "expected at least one weight"));
        }
        self.inner_params
            .iter()
            .enumerate()
            .map(|(i, name)| {
                weight_of_name(name).ok_or_else(|| {
                    Error::invalid(
                        origin,
                        format!("inner_params[{i}]"),
                        format!(
                            "`{name}` is not an MLP weight name editguard knows (e.g. model.layers.29.mlp.gate_proj.weight, \
                             transformer.h.45.mlp.c_fc.weight, transformer.h.25.mlp.fc_out.weight)"
                        ),
                    )
                })
            })
            .collect()
    }
}

/// The weight id of a Hugging Face MLP weight name (Llama, GPT-2 or GPT-J naming).
pub fn weight_of_name(name: &str) -> Option<WeightId> {
    let pattern = regex::Regex::new(
        r"^(?:model\.|transformer\.)?(?:layers|h)\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj|c_fc|c_proj|fc_in|fc_out)\.weight$",
    )
    .expect("valid pattern");
    let captures = pattern.captures(name)?;
    let layer: usize = captures[1].parse().ok()?;
    Some(match &captures[2] {
        "gate_proj" => WeightId::MlpGate(layer),
        "up_proj" | "c_fc" | "fc_in" => WeightId::MlpUp(layer),
        _ => WeightId::MlpDown(layer),
    })
}

/// MEND with its (lazily loaded or trained) editor.
pub struct Mend {
    params: MendParams,
    weights: Vec<WeightId>,
    origin: String,
    editor: Mutex<Option<(Arc<Editor>, TrainedComponent)>>,
}

fn build(table: &toml::Table, origin: &str) -> Result<Box<dyn EditMethod>> {
    Ok(Box::new(Mend::new(table, origin)?))
}

impl Mend {
    /// Builds the method from its hyper-parameter table (`origin` names the table in errors).
    pub fn new(table: &toml::Table, origin: &str) -> Result<Self> {
        let params: MendParams = parse_params(table, origin)?;
        let weights = params.weights(origin)?;
        Ok(Mend { params, weights, origin: origin.to_string(), editor: Mutex::new(None) })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &MendParams {
        &self.params
    }

    /// The editor: kept from an earlier call, read from the cache, or trained now (on the unedited model).
    pub fn editor(&self, model: &mut LoadedModel, env: &EditEnv) -> Result<Arc<Editor>> {
        Ok(self.ready(model, env)?.0)
    }

    /// The editor with how it was trained.
    fn ready(&self, model: &mut LoadedModel, env: &EditEnv) -> Result<(Arc<Editor>, TrainedComponent)> {
        let mut slot = self.editor.lock().map_err(|_| Error::invalid("(mend)", "editor", "lock poisoned"))?;
        if let Some((editor, trained)) = slot.as_ref() {
            return Ok((Arc::clone(editor), TrainedComponent { trained_now: false, ..trained.clone() }));
        }
        let (editor, report, provenance) =
            store::load_or_train(model, &self.params, &self.weights, &self.origin, env, &mut |_| {})?;
        let trained = TrainedComponent {
            training_seconds: report.seconds,
            steps: report.steps,
            trained_now: provenance == store::Provenance::Trained,
        };
        let editor = Arc::new(editor);
        *slot = Some((Arc::clone(&editor), trained.clone()));
        Ok((editor, trained))
    }
}

impl EditMethod for Mend {
    fn name(&self) -> &'static str {
        "mend"
    }

    fn prepare(&self, model: &mut LoadedModel, env: &EditEnv) -> Result<Option<TrainedComponent>> {
        Ok(Some(self.ready(model, env)?.1))
    }

    fn apply(&self, model: &mut LoadedModel, requests: &[EditRequest], env: &EditEnv) -> Result<super::AppliedEdit> {
        let editor = self.editor(model, env)?;
        let mut recorder = EditRecorder::default();
        let factors = factors::edit_factors(model, requests, &self.weights)?;
        // Every update is computed from the gradient of the model before this edit, then all are applied.
        let updates = editor.updates(&factors.pairs(), false)?;
        for (&id, update) in self.weights.iter().zip(updates) {
            if let Err(e) = recorder.apply(model, id, update.detach()) {
                recorder.abandon(model)?;
                return Err(e);
            }
        }
        Ok(recorder.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_names_map_to_weights() {
        assert_eq!(weight_of_name("model.layers.29.mlp.gate_proj.weight"), Some(WeightId::MlpGate(29)));
        assert_eq!(weight_of_name("model.layers.3.mlp.up_proj.weight"), Some(WeightId::MlpUp(3)));
        assert_eq!(weight_of_name("model.layers.3.mlp.down_proj.weight"), Some(WeightId::MlpDown(3)));
        assert_eq!(weight_of_name("transformer.h.45.mlp.c_fc.weight"), Some(WeightId::MlpUp(45)));
        assert_eq!(weight_of_name("transformer.h.45.mlp.c_proj.weight"), Some(WeightId::MlpDown(45)));
        assert_eq!(weight_of_name("transformer.h.25.mlp.fc_out.weight"), Some(WeightId::MlpDown(25)));
        assert_eq!(weight_of_name("model.layers.3.self_attn.q_proj.weight"), None);
    }
}
