//! Edit quality of a method over held-out records: single edits of the first records of COUNTERFACT's edit split in a
//! seeded order, each from the unedited weights and undone afterwards.
//!
//! Each edit is scored as the harness scores one (`metrics::edit_quality::measure`: efficacy — the prompt prefers the
//! new target over the old — generalisation on the paraphrases, locality of the neighbourhood prompts against the
//! unedited predictions) and the means are reported with ‖ΔW‖/‖W‖ and the seconds per edit. It is how MEND's trained
//! editor is judged (`editguard train mend --evaluate N`): the edit split never feeds its training.

use std::time::Instant;

use serde::Serialize;

use super::{EditEnv, EditMethod};
use crate::data::counterfact::{EditDataset, seeded_order};
use crate::error::{Error, Result};
use crate::metrics::edit_quality::{locality_baseline, measure};
use crate::model::LoadedModel;

/// Means over the held-out records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldOutQuality {
    /// Records edited.
    pub records: usize,
    /// Share of records whose prompt prefers the new target after the edit.
    pub efficacy: f64,
    /// Mean teacher-forced token accuracy of the new target on the prompt.
    pub efficacy_accuracy: f64,
    /// Share of paraphrases preferring the new target (means over records that have paraphrases).
    pub generalization: f64,
    /// Share of locality answer tokens whose prediction did not change.
    pub locality: f64,
    /// Mean of the largest ‖ΔW‖/‖W‖ of each edit.
    pub relative_norm: f64,
    /// Mean seconds per edit (the method's own time).
    pub seconds_per_edit: f64,
}

/// Edits the first `n` records of COUNTERFACT's edit split in the seeded order of `seed` one at a time with `method`
/// and averages their edit quality; `progress` hears after each record.
pub fn held_out_quality(
    model: &mut LoadedModel,
    method: &dyn EditMethod,
    n: usize,
    seed: u64,
    env: &EditEnv,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HeldOutQuality> {
    let records = seeded_order(&EditDataset::CounterFact.load(env.data_dir.as_deref())?, seed);
    let records = &records[..n.min(records.len())];
    if records.is_empty() {
        return Err(Error::invalid("(held-out quality)", "n", "at least one record is needed"));
    }
    let (mut efficacy, mut accuracy, mut general, mut general_n) = (0.0, 0.0, 0.0, 0usize);
    let (mut locality, mut locality_n, mut norm, mut seconds) = (0.0, 0usize, 0.0, 0.0);
    for (i, record) in records.iter().enumerate() {
        let request = std::slice::from_ref(record);
        let baseline = locality_baseline(model, request)?;
        let started = Instant::now();
        let edit = method.apply(model, request, env)?;
        seconds += started.elapsed().as_secs_f64();
        norm += edit.max_relative_norm();
        let quality = measure(model, request, &baseline);
        edit.undo(model)?;
        let quality = quality?;
        efficacy += quality.efficacy.unwrap_or(f64::from(u8::from(quality.took[0])));
        accuracy += quality.efficacy_accuracy;
        if let Some(g) = quality.generalization {
            general += g;
            general_n += 1;
        }
        if let Some(l) = quality.locality {
            locality += l;
            locality_n += 1;
        }
        progress(i + 1, records.len());
    }
    let count = records.len() as f64;
    Ok(HeldOutQuality {
        records: records.len(),
        efficacy: efficacy / count,
        efficacy_accuracy: accuracy / count,
        generalization: general / general_n.max(1) as f64,
        locality: locality / locality_n.max(1) as f64,
        relative_norm: norm / count,
        seconds_per_edit: seconds / count,
    })
}
