//! Mining hard cases: single edits over many dataset records, keeping the ones that collapse the model.
//!
//! The Butterfly-effect paper's HardCF set is the COUNTERFACT records whose single ROME edit collapses a given model.
//! [`mine`] reproduces that recipe on any model of the registry: each record is edited once from the original
//! weights, measured exactly as an edit test of the harness measures it ([`measure_checkpoint`] on the same corpus,
//! thresholds resolved from `models.toml` as for a test, the same [`judge_checkpoint`] verdict), and restored. Every
//! record leaves a line in a journal ([`journal`]) as soon as it is done, so an interrupted mine resumes without
//! redoing a record, and a journal of other settings is refused. Records come in a seeded random order of the whole
//! dataset ([`seeded_order`]): the same seed gives the same records, and asking for more extends a mine.
//!
//! A screen ([`screen`]) can skip records before their edit: the method computes cheap signals of how violent the
//! edit would be (for ROME the geometry of its key, `methods::screen`), and a rule skips the records below a
//! threshold; skipped records are journaled with the rule. [`suite`] writes the collapses as a suite file the
//! harness runs, and [`report`] summarises a journal.

pub mod journal;
pub mod report;
pub mod screen;
pub mod suite;

use std::path::PathBuf;
use std::time::Instant;

use crate::data::counterfact::{EditDataset, seeded_order, select_ids};
use crate::data::me_ppl::Corpus;
use crate::error::{Error, Result};
use crate::harness::baseline;
use crate::harness::execute::measure_checkpoint;
use crate::harness::verdict::{Finding, judge_checkpoint};
use crate::methods::{EditEnv, EditMethod, EditRequest, build_method};
use crate::metrics::edit_quality::locality_baseline;
use crate::model::LoadedModel;
use crate::registry::Registry;
use crate::thresholds;

use journal::{EditMeasurement, EntryStatus, Journal, JournalEntry, MineSettings};
use screen::ScreenRule;

/// Which records a mine visits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The first `n` records of the dataset in the seeded order of `seed`.
    Order {
        /// How many.
        n: usize,
        /// The seed of the order.
        seed: u64,
    },
    /// These record ids, in this order.
    Ids(Vec<String>),
}

impl Selection {
    /// How the selection is described in the journal header (what must match on resume).
    fn describe(&self) -> String {
        match self {
            Selection::Order { seed, .. } => format!("seeded order, seed {seed}"),
            Selection::Ids(_) => "ids".to_string(),
        }
    }
}

/// What to mine.
#[derive(Debug, Clone)]
pub struct MineOptions {
    /// Model id.
    pub model: String,
    /// Method name.
    pub method: String,
    /// Dataset name (`counterfact`, `counterfact-train`, `zsre`).
    pub dataset: String,
    /// Which records.
    pub selection: Selection,
    /// Perplexity corpus name (as in suites).
    pub corpus: String,
    /// The journal file.
    pub journal: PathBuf,
    /// The screen rule, if any.
    pub screen: Option<ScreenRule>,
    /// Share of the records the screen skips that are edited anyway, to measure what the screen misses (an audit);
    /// chosen by a hash of the record id and the seed, so the same records are audited on every run.
    pub audit: f64,
    /// Data directory override.
    pub data_dir: Option<PathBuf>,
}

/// Running counts, for progress reporting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MineCounts {
    /// Records in the selection.
    pub total: usize,
    /// Records already settled in the journal when this run started.
    pub resumed: usize,
    /// Edited records (all runs).
    pub edited: usize,
    /// Skipped records (all runs).
    pub skipped: usize,
    /// Failed records (all runs).
    pub failed: usize,
    /// Collapses among the edited.
    pub collapses: usize,
}

impl MineCounts {
    fn count(&mut self, entry: &JournalEntry) {
        match entry.status {
            EntryStatus::Edited => self.edited += 1,
            EntryStatus::Skipped => self.skipped += 1,
            EntryStatus::Failed => self.failed += 1,
        }
        self.collapses += usize::from(entry.measured.as_ref().is_some_and(|m| m.collapsed));
    }

    /// One line for a progress bar.
    pub fn line(&self) -> String {
        format!(
            "collapses {} · edited {} · skipped {} · failed {}",
            self.collapses, self.edited, self.skipped, self.failed
        )
    }
}

/// What a finished (or resumed and finished) mine has: the settings and every record's latest entry, in order.
pub struct MineResult {
    /// The journal's settings.
    pub settings: MineSettings,
    /// Entries of the selection, in the mine's order.
    pub entries: Vec<JournalEntry>,
    /// Counts.
    pub counts: MineCounts,
    /// Notes (resumption, torn lines).
    pub notes: Vec<String>,
}

/// The records of a selection, in mining order.
pub fn selected_records(options: &MineOptions) -> Result<Vec<EditRequest>> {
    let dataset = EditDataset::parse(&options.dataset)?;
    let records = dataset.load(options.data_dir.as_deref())?;
    match &options.selection {
        Selection::Order { n, seed } => {
            if *n == 0 || *n > records.len() {
                return Err(Error::invalid(
                    "--n",
                    "n",
                    format!("expected between 1 and {} (usable records of {})", records.len(), options.dataset),
                ));
            }
            Ok(seeded_order(&records, *seed).into_iter().take(*n).collect())
        }
        Selection::Ids(ids) => select_ids(&records, ids, &options.dataset),
    }
}

/// Mines `options`' records on `model` (pristine; restored after every record). `progress` is called after each
/// record with the counts so far and the position in the selection.
pub fn mine(
    registry: &Registry,
    model: &mut LoadedModel,
    options: &MineOptions,
    progress: &mut dyn FnMut(&MineCounts, usize),
) -> Result<MineResult> {
    if !model.is_pristine() {
        return Err(Error::invalid("(mine)", "model", "mining starts from the unedited model"));
    }
    let thresholds = thresholds::resolve(registry, &options.model, &Default::default())?;
    let method = build_method(registry, &options.model, &options.method)?;
    let records = selected_records(options)?;
    let sentences = Corpus::parse(&options.corpus).load(options.data_dir.as_deref())?;
    let unedited = baseline::measure(model, &options.corpus, &sentences)?;
    let hyper_parameters = registry.get(&options.model)?.methods.get(&options.method).cloned().unwrap_or_default();
    let settings = MineSettings {
        model: options.model.clone(),
        fingerprint: model.fingerprint.clone(),
        method: options.method.clone(),
        hyper_parameters: serde_json::to_value(&hyper_parameters)
            .map_err(|e| Error::invalid("models.toml", "methods", e.to_string()))?,
        dataset: options.dataset.clone(),
        selection: options.selection.describe(),
        corpus: options.corpus.clone(),
        thresholds,
        baseline_ppl: unedited.mean_ppl,
    };
    let (mut journal, note) = Journal::open(&options.journal, &settings)?;
    let mut notes: Vec<String> = note.into_iter().collect();
    let mut counts = MineCounts { total: records.len(), ..Default::default() };
    counts.resumed = records.iter().filter(|r| journal.entry(&r.id).is_some_and(JournalEntry::settled)).count();
    if counts.resumed > 0 {
        notes.push(format!(
            "resumed {}: {} of {} records already done",
            options.journal.display(),
            counts.resumed,
            records.len()
        ));
    }
    let env = EditEnv { data_dir: options.data_dir.clone() };
    let context = RecordContext {
        method: method.as_ref(),
        env: &env,
        sentences: &sentences,
        baseline_ppl: unedited.mean_ppl,
        thresholds: &settings.thresholds,
        screen: options.screen.as_ref(),
        audit: Audit {
            share: options.audit,
            seed: match options.selection {
                Selection::Order { seed, .. } => seed,
                Selection::Ids(_) => 0,
            },
        },
    };
    for (index, request) in records.iter().enumerate() {
        let done = journal.entry(&request.id).filter(|e| e.settled() || skipped_again(e, options.screen.as_ref()));
        let entry = match done {
            Some(entry) => entry.clone(),
            None => {
                let entry = mine_record(model, &context, index, request)?;
                journal.append(entry.clone())?;
                entry
            }
        };
        counts.count(&entry);
        progress(&counts, index + 1);
    }
    let entries = records.iter().filter_map(|r| journal.entry(&r.id).cloned()).collect();
    Ok(MineResult { settings, entries, counts, notes })
}

/// A skipped record stays skipped when the current screen would skip it by the same rule.
fn skipped_again(entry: &JournalEntry, screen: Option<&ScreenRule>) -> bool {
    entry.status == EntryStatus::Skipped
        && screen
            .is_some_and(|rule| entry.rule.as_deref() == Some(&rule.describe()) && rule.skips(entry.signals.as_ref()))
}

struct RecordContext<'a> {
    method: &'a dyn EditMethod,
    env: &'a EditEnv,
    sentences: &'a [String],
    baseline_ppl: f64,
    thresholds: &'a thresholds::Thresholds,
    screen: Option<&'a ScreenRule>,
    audit: Audit,
}

/// Which skipped records are edited anyway.
#[derive(Debug, Clone, Copy)]
struct Audit {
    share: f64,
    seed: u64,
}

impl Audit {
    /// True for a fixed pseudo-random `share` of record ids.
    fn picks(&self, id: &str) -> bool {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("audit/{}/{id}", self.seed).as_bytes());
        let draw = u64::from_le_bytes(digest[..8].try_into().expect("eight bytes")) as f64 / u64::MAX as f64;
        draw < self.share
    }
}

/// The `rule` text of an audited record: the rule that would have skipped it.
pub fn audit_rule(rule: &ScreenRule) -> String {
    format!("audit: {}", rule.describe())
}

/// Screens, edits, measures and restores one record.
fn mine_record(
    model: &mut LoadedModel,
    context: &RecordContext,
    index: usize,
    request: &EditRequest,
) -> Result<JournalEntry> {
    let started = Instant::now();
    let mut entry = JournalEntry {
        index,
        id: request.id.clone(),
        prompt: request.prompt.clone(),
        subject: request.subject.clone(),
        target_new: request.target_new.clone(),
        ground_truth: request.ground_truth.clone(),
        status: EntryStatus::Edited,
        rule: None,
        error: None,
        signals: None,
        screen_seconds: 0.0,
        measured: None,
        seconds: 0.0,
    };
    match context.method.screen(model, request, context.env) {
        Ok(signals) => entry.signals = signals,
        Err(e) => {
            entry.status = EntryStatus::Failed;
            entry.error = Some(format!("screen: {e}"));
        }
    }
    entry.screen_seconds = started.elapsed().as_secs_f64();
    if entry.status == EntryStatus::Failed {
        entry.seconds = entry.screen_seconds;
        return Ok(entry);
    }
    if let Some(rule) = context.screen {
        if !rule.skips(entry.signals.as_ref()) {
            entry.rule = Some(format!("kept: {}>={}", rule.signal, rule.min));
        } else if context.audit.picks(&request.id) {
            entry.rule = Some(audit_rule(rule));
        } else {
            entry.status = EntryStatus::Skipped;
            entry.rule = Some(rule.describe());
            entry.seconds = entry.screen_seconds;
            return Ok(entry);
        }
    }
    match edit_once(
        model,
        context.method,
        request,
        context.env,
        context.sentences,
        context.baseline_ppl,
        context.thresholds,
    )? {
        Ok(measured) => entry.measured = Some(measured),
        Err(error) => {
            entry.status = EntryStatus::Failed;
            entry.error = Some(error);
        }
    }
    entry.seconds = started.elapsed().as_secs_f64();
    Ok(entry)
}

/// Edits `request` once from the current (pristine) weights, measures it exactly as a single-setting edit test does,
/// and restores the weights. The inner `Err` is the method's own failure (the model is left pristine).
pub fn edit_once(
    model: &mut LoadedModel,
    method: &dyn EditMethod,
    request: &EditRequest,
    env: &EditEnv,
    sentences: &[String],
    baseline_ppl: f64,
    thresholds: &thresholds::Thresholds,
) -> Result<std::result::Result<EditMeasurement, String>> {
    let requests = std::slice::from_ref(request);
    let locality = locality_baseline(model, requests)?;
    let edit = match method.apply(model, requests, env) {
        Ok(edit) => edit,
        Err(e) if model.is_pristine() => return Ok(Err(e.to_string())),
        Err(e) => {
            return Err(Error::invalid("(mine)", "model", format!("the method failed and left the model edited: {e}")));
        }
    };
    let edit_seconds = edit.seconds;
    let relative_norm = edit.max_relative_norm();
    let measured = measure_checkpoint(model, requests, &locality, sentences, baseline_ppl, relative_norm, 1);
    edit.undo(model)?;
    let (checkpoint, _) = measured?;
    let finding = judge_checkpoint(&checkpoint, thresholds, baseline_ppl);
    Ok(Ok(EditMeasurement {
        ppl: checkpoint.mean_ppl,
        corpus_ppl: checkpoint.corpus_ppl,
        ratio: checkpoint.ppl_ratio,
        relative_norm,
        efficacy: checkpoint.efficacy,
        efficacy_accuracy: checkpoint.efficacy_accuracy,
        generalization: checkpoint.generalization,
        locality: checkpoint.locality,
        collapsed: matches!(finding, Some(Finding::Collapse { .. })),
        non_finite: matches!(finding, Some(Finding::NonFinite { .. })),
        edit_seconds,
    }))
}

/// How another method fares on a mined collapse.
#[derive(Debug, Clone)]
pub struct OtherMethodOutcome {
    /// The method.
    pub method: String,
    /// The record id.
    pub id: String,
    /// The measurement, or the method's error.
    pub measured: std::result::Result<EditMeasurement, String>,
}

/// Edits each of `requests` once with each of `methods` (single edits from the original weights, measured as the
/// harness measures), so a mined suite can record every method's outcome as measured.
pub fn measure_other_methods(
    registry: &Registry,
    model: &mut LoadedModel,
    settings: &MineSettings,
    requests: &[EditRequest],
    methods: &[String],
    data_dir: Option<&std::path::Path>,
    progress: &mut dyn FnMut(&OtherMethodOutcome),
) -> Result<Vec<OtherMethodOutcome>> {
    let sentences = Corpus::parse(&settings.corpus).load(data_dir)?;
    let env = EditEnv { data_dir: data_dir.map(|d| d.to_path_buf()) };
    let mut out = Vec::new();
    for name in methods {
        let method = build_method(registry, &settings.model, name)?;
        for request in requests {
            let measured = edit_once(
                model,
                method.as_ref(),
                request,
                &env,
                &sentences,
                settings.baseline_ppl,
                &settings.thresholds,
            )?;
            let outcome = OtherMethodOutcome { method: name.clone(), id: request.id.clone(), measured };
            progress(&outcome);
            out.push(outcome);
        }
    }
    Ok(out)
}
