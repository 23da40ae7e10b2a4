//! Screen signals: cheap measurements, taken before an edit's optimisation, of how violent a rank-one edit would be.
//!
//! A ROME-style edit is `ΔW = r ⊗ u / (k·u)`: `u` the unit key direction, `k` the key the update is solved for and
//! `r = v* − W k` the change of the value, whose norm the target optimisation clamps to `clamp_norm_factor · ‖v₀‖`.
//! Every other input `x` of the layer is moved by `r · (u·x) / (k·u)`. Before optimising anything the key side is
//! known exactly, and the value side is bounded, so the following can be computed in one fast pass over the context
//! templates (milliseconds, against seconds for the edit):
//! - `key_alignment = (k·u)/‖k̄‖`: 1 when the update key is the template average itself (r-ROME), small when the
//!   bare prompt's key points elsewhere than the average (ROME's asymmetry; the denominator of the update);
//! - `key_cosine = cos(k, k̄)`;
//! - `predicted_norm = clamp·‖v₀‖ / ((k·u)·‖W‖_F)`: the bound on ‖ΔW‖/‖W‖ when the clamp binds;
//! - `excitation = √(uᵀCu) / (k·u)`: how strongly ordinary text (second moment `C` of the layer's keys) excites
//!   the edited direction, relative to the edited key itself;
//! - `disruption = clamp·‖v₀‖ · √(uᵀCu)/(k·u) / √tr(W C Wᵀ)`: the bound on the change of a typical token's MLP
//!   output, relative to the typical output's size;
//! - request features: `subject_start` (1 when the subject opens the prompt), `subject_tokens`, `target_tokens`,
//!   and `target_nll`, the unedited model's mean NLL of the new target after the prompt.
//!
//! `editguard mine` journals these for every record and may skip records whose signal is below a threshold; how
//! much of the collapses such a rule keeps is measured against full edits (`mining::screen`), never assumed.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::subject::SubjectPrompt;
use super::{dot, l2_norm};
use crate::data::request::EditRequest;
use crate::error::Result;
use crate::metrics::edit_quality::score_continuations;
use crate::model::LoadedModel;

/// Named screen signals of one request (see the module header for their meaning).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScreenSignals(pub BTreeMap<String, f64>);

impl ScreenSignals {
    /// The value of a signal, if present.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    /// Records a signal; a non-finite value is left out (a missing signal never skips a record).
    fn set(&mut self, name: &str, value: f64) {
        if value.is_finite() {
            self.0.insert(name.to_string(), value);
        }
    }
}

/// The key side of a rank-one edit, as the method would compute it (all f64 vectors).
pub struct RankOneGeometry<'a> {
    /// The edited weight `W`, `(out, in)`.
    pub weight: &'a Tensor,
    /// The key the update is solved for.
    pub key: &'a Tensor,
    /// The template-averaged key `k̄`.
    pub mean_key: &'a Tensor,
    /// The unit direction `u`.
    pub direction: &'a Tensor,
    /// The bound on ‖v* − W k‖ (the clamp radius).
    pub residual_bound: f64,
    /// The second moment `C` of the layer's keys on ordinary text, `(in, in)` f64, when available.
    pub second_moment: Option<&'a Tensor>,
}

/// Signals of the key side of a rank-one edit.
pub fn rank_one_signals(geometry: &RankOneGeometry) -> Result<ScreenSignals> {
    let mut signals = ScreenSignals::default();
    let denominator = dot(geometry.key, geometry.direction)?;
    let mean_norm = l2_norm(geometry.mean_key)?.max(f64::MIN_POSITIVE);
    let key_norm = l2_norm(geometry.key)?.max(f64::MIN_POSITIVE);
    let weight_norm = l2_norm(geometry.weight)?.max(f64::MIN_POSITIVE);
    signals.set("key_alignment", denominator / mean_norm);
    signals.set("key_cosine", dot(geometry.key, geometry.mean_key)? / (key_norm * mean_norm));
    let denominator = denominator.abs().max(f64::MIN_POSITIVE);
    signals.set("predicted_norm", geometry.residual_bound / (denominator * weight_norm));
    if let Some(moment) = geometry.second_moment {
        let u = geometry.direction.unsqueeze(1)?;
        let spread = u.t()?.matmul(&moment.matmul(&u)?)?.squeeze(0)?.squeeze(0)?.to_scalar::<f64>()?.max(0.0).sqrt();
        // tr(W C Wᵀ) = Σ (W C) ⊙ W: the mean squared norm of the layer's output on ordinary text.
        let weight = geometry.weight.to_dtype(DType::F32)?;
        let typical = weight
            .matmul(&moment.to_dtype(DType::F32)?)?
            .mul(&weight)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?
            .max(f64::MIN_POSITIVE)
            .sqrt();
        signals.set("excitation", spread / denominator);
        signals.set("disruption", geometry.residual_bound * spread / denominator / typical);
    }
    Ok(signals)
}

/// Signals of the request itself: where the subject stands, how long subject and target are, and how unlikely the
/// unedited model finds the new target.
pub fn request_signals(model: &LoadedModel, request: &EditRequest) -> Result<ScreenSignals> {
    let mut signals = ScreenSignals::default();
    let (prefix, _) = request.prompt.split_once("{}").unwrap_or(("", ""));
    let bare = SubjectPrompt::new(model, &request.prompt, &request.subject)?;
    let before_subject = model.encode(prefix.trim_end())?.len();
    signals.set("subject_start", f64::from(u8::from(prefix.trim().is_empty())));
    signals.set("subject_tokens", (bare.subject_last + 1).saturating_sub(before_subject).max(1) as f64);
    let target = format!(" {}", request.target_new.trim());
    signals.set("target_tokens", model.encode_continuation(&target)?.len() as f64);
    let scored = score_continuations(model, &[(request.prompt_text(), target)])?;
    signals.set("target_nll", scored.first().map(|s| s.mean_nll).unwrap_or(f64::NAN));
    Ok(signals)
}

impl Extend<(String, f64)> for ScreenSignals {
    fn extend<I: IntoIterator<Item = (String, f64)>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_update_key_orthogonal_to_the_average_blows_up_the_predicted_norm() {
        let device = Device::Cpu;
        let weight = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0]], &device).unwrap();
        let mean_key = Tensor::new(&[2.0f64, 0.0], &device).unwrap();
        let direction = Tensor::new(&[1.0f64, 0.0], &device).unwrap();
        let moment = Tensor::new(&[[4.0f64, 0.0], [0.0, 1.0]], &device).unwrap();
        let signals_for = |key: &Tensor| {
            rank_one_signals(&RankOneGeometry {
                weight: &weight,
                key,
                mean_key: &mean_key,
                direction: &direction,
                residual_bound: 1.0,
                second_moment: Some(&moment),
            })
            .unwrap()
        };
        let aligned = signals_for(&mean_key);
        assert!((aligned.get("key_alignment").unwrap() - 1.0).abs() < 1e-12);
        assert!((aligned.get("key_cosine").unwrap() - 1.0).abs() < 1e-12);
        // ‖W‖_F = √2, k·u = 2: 1 / (2√2).
        assert!((aligned.get("predicted_norm").unwrap() - 1.0 / (2.0 * 2f64.sqrt())).abs() < 1e-12);
        // √(uᵀCu) = 2, so excitation = 2/2; tr(W C Wᵀ) = 5.
        assert!((aligned.get("excitation").unwrap() - 1.0).abs() < 1e-12);
        assert!((aligned.get("disruption").unwrap() - 1.0 / 5f64.sqrt()).abs() < 1e-6);
        let skewed = signals_for(&Tensor::new(&[0.2f64, 3.0], &device).unwrap());
        assert!((skewed.get("key_alignment").unwrap() - 0.1).abs() < 1e-12);
        assert!(skewed.get("predicted_norm").unwrap() > 9.0 * aligned.get("predicted_norm").unwrap());
        assert!(skewed.get("disruption").unwrap() > 9.0 * aligned.get("disruption").unwrap());
    }
}
