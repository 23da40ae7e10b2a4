//! Unedited metrics: the baseline every edited model is judged against.
//!
//! A baseline test (`baseline::<model>::<corpus>`) measures the unedited model and compares the result with its
//! accepted snapshot (tolerance `baseline_tolerance`), so an engine change that moves the unedited perplexity is
//! caught on its own, before it shows up as a shift in every edit test. Edit tests take the accepted value as their
//! baseline; when none has been accepted yet they measure the unedited model themselves and say so.

use serde::{Deserialize, Serialize};

use crate::data::me_ppl::Corpus;
use crate::error::{Result, ensure_finite};
use crate::metrics::perplexity::{PerplexityOptions, perplexity};
use crate::model::LoadedModel;

use super::context::{HarnessContext, SnapshotInfo};
use super::trial::{TrialSpec, baseline_name, snapshot_name_of};
use crate::thresholds;

/// The unedited model's metrics on a corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UneditedMetrics {
    /// Corpus name.
    pub corpus: String,
    /// Sentences scored.
    pub sentences: usize,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// Mean per-sentence perplexity (the Butterfly paper's figure).
    pub mean_ppl: f64,
    /// Token-weighted corpus perplexity.
    pub corpus_ppl: f64,
}

/// Perplexity of `model` on `sentences` as baseline metrics, failing on NaN or infinity.
pub fn measure(model: &LoadedModel, corpus: &str, sentences: &[String]) -> Result<UneditedMetrics> {
    let report = perplexity(model, sentences, PerplexityOptions::default(), None)?;
    Ok(UneditedMetrics {
        corpus: corpus.to_string(),
        sentences: report.sentences,
        scored_tokens: report.scored_tokens,
        mean_ppl: ensure_finite("mean perplexity", report.mean_sentence_ppl)?,
        corpus_ppl: ensure_finite("corpus perplexity", report.corpus_ppl)?,
    })
}

/// The corpus sentences of a suite's `corpus` name.
pub fn corpus_sentences(context: &HarnessContext, corpus: &str) -> Result<Vec<String>> {
    Corpus::parse(corpus).load(context.data_dir.as_deref())
}

/// The baseline an edit test uses: the accepted snapshot, or a fresh measurement when none is accepted yet.
/// Returns the metrics and a phrase saying where they came from.
pub fn for_edit_test(
    context: &HarnessContext,
    model: &LoadedModel,
    corpus: &str,
    sentences: &[String],
) -> Result<(UneditedMetrics, String)> {
    let name = snapshot_name_of(&baseline_name(&model.id, corpus));
    match context.snapshots.accepted::<UneditedMetrics>(&name)? {
        Some(accepted) => Ok((accepted, format!("accepted snapshot {name}"))),
        None => Ok((
            measure(model, corpus, sentences)?,
            format!("measured now: no accepted snapshot {name} yet (run its baseline test)"),
        )),
    }
}

/// Runs a baseline test: measure the unedited model, compare with the accepted snapshot.
pub fn run(
    context: &HarnessContext,
    spec: &TrialSpec,
    model_id: &str,
    corpus: &str,
) -> std::result::Result<(), String> {
    let fail = |e: crate::Error| format!("{}: {e}", spec.name);
    let thresholds = thresholds::resolve(&context.registry, model_id, &Default::default()).map_err(fail)?;
    let model = context.load_model(model_id).map_err(fail)?;
    let sentences = corpus_sentences(context, corpus).map_err(fail)?;
    let metrics = measure(&model, corpus, &sentences).map_err(fail)?;
    let info = SnapshotInfo::unedited(&model);
    context.snapshots.check(&spec.snapshot_name(), &spec.name, &metrics, &info, thresholds.baseline_tolerance).map_err(
        |message| {
            format!(
                "{}: unedited {corpus} mean perplexity {:.4} (corpus {:.4}): {message}",
                spec.name, metrics.mean_ppl, metrics.corpus_ppl
            )
        },
    )
}
