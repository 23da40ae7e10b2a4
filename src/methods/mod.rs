//! Knowledge-editing methods behind one small trait, and the table that names them.
//!
//! An [`EditMethod`] applies one or a batch of [`EditRequest`]s to a [`LoadedModel`] in place and returns an
//! [`AppliedEdit`]: per changed weight the ΔW with ‖ΔW‖_F and ‖ΔW‖_F/‖W‖_F, plus the backups that undo the edit
//! exactly. Hyper-parameters come from `models.toml` (`[models.<id>.methods.<name>]`), parsed by each method into its
//! own struct so a misspelt or mistyped field is reported with its dotted path. Adding a method is one file here and
//! one row in [`METHODS`].

pub mod ft;
pub mod fused_adam;
pub mod held_out;
pub mod kn;
pub mod linalg;
pub mod memit;
pub mod mend;
pub mod rome;
pub mod screen;
pub mod stats;
pub mod subject;
pub mod target;
pub mod templates;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;

pub use crate::data::request::{EditRequest, LocalityProbe};
pub use screen::ScreenSignals;

use crate::error::{Error, Result};
use crate::model::{LoadedModel, WeightBackup, WeightId};
use crate::registry::Registry;

/// What a method needs besides the model and the requests.
#[derive(Debug, Clone, Default)]
pub struct EditEnv {
    /// Data directory override (statistics corpora).
    pub data_dir: Option<PathBuf>,
}

/// An editing method.
pub trait EditMethod: Send + Sync {
    /// Registry name.
    fn name(&self) -> &'static str;
    /// Applies `requests` to `model` in place (a batch for methods that support it; one after another otherwise).
    fn apply(&self, model: &mut LoadedModel, requests: &[EditRequest], env: &EditEnv) -> Result<AppliedEdit>;
    /// Cheap signals of how violent this request's edit would be, computed without editing (before any target
    /// optimisation), for `editguard mine`'s screen. `None`: the method offers no screen.
    fn screen(&self, _model: &LoadedModel, _request: &EditRequest, _env: &EditEnv) -> Result<Option<ScreenSignals>> {
        Ok(None)
    }
    /// Makes a trained component ready (MEND's editor: read from the cache, or trained now on the unedited model) and
    /// says how it was trained. `None`: the method has nothing to train.
    fn prepare(&self, _model: &mut LoadedModel, _env: &EditEnv) -> Result<Option<TrainedComponent>> {
        Ok(None)
    }
}

/// How a method's trained component came to be (see [`EditMethod::prepare`]).
#[derive(Debug, Clone, Serialize)]
pub struct TrainedComponent {
    /// Seconds the training took when it ran (read from the cache when it did not run now).
    pub training_seconds: f64,
    /// Training steps.
    pub steps: usize,
    /// True when it was trained by this call, false when read from the cache.
    pub trained_now: bool,
}

/// One weight's change.
#[derive(Debug, Clone, Serialize)]
pub struct WeightChange {
    /// Which weight.
    #[serde(serialize_with = "serialize_weight_id")]
    pub weight: WeightId,
    /// ΔW, `(out, in)`.
    #[serde(skip)]
    pub delta: Tensor,
    /// ‖ΔW‖_F.
    pub delta_norm: f64,
    /// ‖ΔW‖_F / ‖W‖_F (W before the edit).
    pub relative_norm: f64,
}

fn serialize_weight_id<S: serde::Serializer>(id: &WeightId, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{id:?}"))
}

/// An edit that has been applied: what changed, and how to take it back.
pub struct AppliedEdit {
    /// The changes, in the order they were applied.
    pub changes: Vec<WeightChange>,
    /// Wall-clock seconds the method took.
    pub seconds: f64,
    backups: Vec<WeightBackup>,
}

impl AppliedEdit {
    /// Restores every weight this edit changed, exactly.
    pub fn undo(mut self, model: &mut LoadedModel) -> Result<()> {
        while let Some(backup) = self.backups.pop() {
            model.restore(backup)?;
        }
        Ok(())
    }

    /// Keeps the edit, returning its changes.
    pub fn keep(self) -> Vec<WeightChange> {
        self.changes
    }

    /// Largest ‖ΔW‖/‖W‖ among the changes.
    pub fn max_relative_norm(&self) -> f64 {
        self.changes.iter().map(|c| c.relative_norm).fold(0.0, f64::max)
    }
}

/// Collects weight changes as a method applies them.
pub struct EditRecorder {
    started: Instant,
    changes: Vec<WeightChange>,
    backups: Vec<WeightBackup>,
}

impl Default for EditRecorder {
    fn default() -> Self {
        EditRecorder { started: Instant::now(), changes: Vec::new(), backups: Vec::new() }
    }
}

impl EditRecorder {
    /// Applies `W += delta` to the model and records it.
    pub fn apply(&mut self, model: &mut LoadedModel, weight: WeightId, delta: Tensor) -> Result<()> {
        let current = model.network.weight(weight)?;
        let norm =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
        let delta_norm = crate::error::ensure_finite("‖ΔW‖", norm(&delta)?)?;
        let relative_norm = delta_norm / norm(&current)?.max(f64::MIN_POSITIVE);
        let delta = delta.to_dtype(current.dtype())?;
        self.backups.push(model.apply_delta(weight, &delta)?);
        self.changes.push(WeightChange { weight, delta, delta_norm, relative_norm });
        Ok(())
    }

    /// Finishes the record.
    pub fn finish(self) -> AppliedEdit {
        AppliedEdit { changes: self.changes, seconds: self.started.elapsed().as_secs_f64(), backups: self.backups }
    }

    /// Undoes what was applied so far (used when a method fails half-way).
    pub fn abandon(self, model: &mut LoadedModel) -> Result<()> {
        self.finish().undo(model)
    }
}

/// Builds a method from its hyper-parameter table; `origin` names the table in errors.
pub type BuildMethod = fn(&toml::Table, &str) -> Result<Box<dyn EditMethod>>;

/// One row of the method table.
pub struct MethodEntry {
    /// The name used in models.toml, cases and the CLI.
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// True when the method edits a batch of requests in one operation.
    pub batch: bool,
    /// Constructor.
    pub build: BuildMethod,
}

/// The method table: adding a method is one file plus one row here (and its hyper-parameters in models.toml).
pub const METHODS: &[MethodEntry] = &[rome::ROME, rome::R_ROME, memit::MEMIT, ft::FT_L_INF, ft::FT, kn::KN, mend::MEND];

/// Looks a method up by name.
pub fn method_entry(name: &str) -> Result<&'static MethodEntry> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| Error::invalid("(method)", "method", unknown_method(name)))
}

/// The message for a method name not in [`METHODS`], listing the known ones (callers add file and field).
pub fn unknown_method(name: &str) -> String {
    let known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    format!("unknown method `{name}`; expected one of {}", known.join(", "))
}

/// Checks every `[models.<id>.methods.<method>]` table of the registry: the method exists and its settings build it
/// (unknown or ill-typed hyper-parameters are named with their dotted field).
pub fn check_settings(registry: &Registry) -> Result<()> {
    for (id, model) in &registry.models {
        for (method, table) in &model.methods {
            let entry = method_entry(method).map_err(|_| {
                Error::invalid(&registry.origin, format!("models.{id}.methods.{method}"), unknown_method(method))
            })?;
            (entry.build)(table, &format!("{}: models.{id}.methods.{method}", registry.origin))?;
        }
    }
    Ok(())
}

/// Builds `method` with the hyper-parameters models.toml gives it for `model_id`.
pub fn build_method(registry: &Registry, model_id: &str, method: &str) -> Result<Box<dyn EditMethod>> {
    let entry = method_entry(method)?;
    let model = registry.get(model_id)?;
    let table = model.methods.get(method).ok_or_else(|| {
        Error::invalid(
            &registry.origin,
            format!("models.{model_id}.methods.{method}"),
            format!(
                "no hyper-parameters for `{method}` on `{model_id}`; add a [models.{model_id}.methods.{method}] table"
            ),
        )
    })?;
    (entry.build)(table, &format!("{}: models.{model_id}.methods.{method}", registry.origin))
}

/// Parses a method's hyper-parameter table into its struct, naming the field on error.
pub fn parse_params<T: serde::de::DeserializeOwned>(table: &toml::Table, origin: &str) -> Result<T> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let (file, table_path) = origin.split_once(": ").unwrap_or(("models.toml", origin));
        Error::invalid(file, format!("{table_path}.{}", e.path()), e.inner().to_string())
    })
}

/// ‖x‖₂ of a vector as f64.
pub fn l2_norm(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// The dot product of two vectors as f64.
pub fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? * b.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()?)
}
