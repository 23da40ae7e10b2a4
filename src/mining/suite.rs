//! Writing mined collapses as a suite file the harness runs unchanged.
//!
//! Each collapsing record becomes an inline case with a readable name (`cf-<id>-<subject>-<target>`), the dataset and
//! id in `source`, and its paraphrase and locality prompts carried over from the dataset. Every (method, case) gets
//! an `[[expect]]` with the outcome measured: `collapse` for the mining method, with the perplexity, ratio and
//! ‖ΔW‖/‖W‖ in the reason, and for each further method the outcome of its own single edit of the record
//! ([`super::measure_other_methods`]): `collapse`, `ineffective` when the edit did not take, or `hold`. The first
//! `default_cases` cases run in the default tier, the rest in the suite's tier. The text is parsed back as a suite
//! against the registry before it is written (atomically), so a file the harness would refuse is never published.

use std::fmt::Write as _;
use std::path::Path;

use crate::cases::write::{case_name, expect_block, inline_case, quoted};
use crate::cases::{Outcome, Suite};
use crate::data::counterfact::select_ids;
use crate::error::{Error, Result};
use crate::methods::EditRequest;
use crate::registry::Registry;

use super::OtherMethodOutcome;
use super::journal::{EditMeasurement, JournalEntry, MineSettings};

/// How the suite is written.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Methods the suite runs: the mining method first, then those measured in `others`.
    pub methods: Vec<String>,
    /// `default` or `heavy`.
    pub tier: String,
    /// How many of the cases (the first in mining order) run in the default tier.
    pub default_cases: usize,
    /// The command line that produced it, for the header comment.
    pub command: String,
}

/// The collapsing entries of a mine (edited, perplexity over the bound, all metrics finite).
pub fn collapses(entries: &[JournalEntry]) -> Vec<&JournalEntry> {
    entries.iter().filter(|e| e.measured.as_ref().is_some_and(|m| m.collapsed && !m.non_finite)).collect()
}

/// The outcome a single edit's measurement shows, and the reason to write.
fn outcome_of(measured: &EditMeasurement, settings: &MineSettings, origin: &str) -> (Outcome, String) {
    let outcome = if measured.collapsed {
        Outcome::Collapse
    } else if measured.efficacy < settings.thresholds.min_efficacy {
        Outcome::Ineffective
    } else {
        Outcome::Hold
    };
    let reason = format!(
        "{origin}: {} mean ppl {:.1} ({:.2}x baseline {:.2}), ‖ΔW‖/‖W‖ {:.3}, efficacy {:.0}",
        settings.corpus, measured.ppl, measured.ratio, settings.baseline_ppl, measured.relative_norm, measured.efficacy
    );
    (outcome, reason)
}

/// The suite text for the collapses of a mine; `records` are the dataset records (for paraphrases and locality),
/// `others` the measured outcomes of further methods on the collapses.
pub fn suite_text(
    settings: &MineSettings,
    entries: &[JournalEntry],
    records: &[EditRequest],
    others: &[OtherMethodOutcome],
    options: &SuiteOptions,
) -> Result<String> {
    let found = collapses(entries);
    let edited = entries.iter().filter(|e| e.measured.is_some()).count();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Mined by `editguard mine` on {} with {}: {} collapses among {} edited records of {} ({}),",
        settings.model,
        settings.method,
        found.len(),
        edited,
        settings.dataset,
        settings.selection
    );
    let _ = writeln!(
        text,
        "# single edits from the original weights measured on {} against the unedited mean perplexity {:.2}",
        settings.corpus, settings.baseline_ppl
    );
    let _ = writeln!(
        text,
        "# (collapse_ratio {}, collapse_ppl {}); every expectation below is a measured outcome.",
        settings.thresholds.collapse_ratio, settings.thresholds.collapse_ppl
    );
    let _ = writeln!(text, "# Command: {}", options.command);
    let description =
        format!("COUNTERFACT records whose single {} edit collapses {} (mined)", settings.method, settings.model);
    let _ = writeln!(text, "description = {}", quoted(&description));
    let _ = writeln!(text, "setting = \"single\"");
    let methods: Vec<String> = options.methods.iter().map(|m| quoted(m)).collect();
    let _ = writeln!(text, "methods = [{}]", methods.join(", "));
    let _ = writeln!(text, "models = [{}]", quoted(&settings.model));
    let _ = writeln!(text, "tier = {}", quoted(&options.tier));
    let _ = writeln!(text, "corpus = {}", quoted(&settings.corpus));
    let ids: Vec<String> = found.iter().map(|e| e.id.clone()).collect();
    let requests = select_ids(records, &ids, &settings.dataset)?;
    let mut names = Vec::new();
    for (index, (entry, request)) in found.iter().zip(&requests).enumerate() {
        let name = case_name(&settings.dataset, &entry.id, &entry.subject, &entry.target_new);
        let tier = (index < options.default_cases && options.tier != "default").then_some("default");
        text.push_str(&inline_case(&name, request, &format!("{} case {}", settings.dataset, entry.id), tier));
        names.push(name);
    }
    for (entry, name) in found.iter().zip(&names) {
        let measured = entry.measured.as_ref().expect("collapses are measured");
        let (_, reason) = outcome_of(measured, settings, "mined");
        text.push_str(&expect_block(Outcome::Collapse, &settings.method, Some(name), &reason));
        for other in others.iter().filter(|o| o.id == entry.id) {
            match &other.measured {
                Ok(m) if !m.non_finite => {
                    let (outcome, reason) = outcome_of(m, settings, "measured when mined");
                    text.push_str(&expect_block(outcome, &other.method, Some(name), &reason));
                }
                // NaN always fails a test: no expectation can make it pass, so none is written.
                Ok(_) => {}
                Err(error) => return Err(Error::invalid(&other.method, &other.id, error.clone())),
            }
        }
    }
    Ok(text)
}

/// Writes the suite for the collapses of a mine to `path` (checked by parsing it back first).
pub fn write_suite(
    path: &Path,
    registry: &Registry,
    settings: &MineSettings,
    entries: &[JournalEntry],
    records: &[EditRequest],
    others: &[OtherMethodOutcome],
    options: &SuiteOptions,
) -> Result<usize> {
    let found = collapses(entries).len();
    if found == 0 {
        return Err(Error::invalid(
            path.display().to_string(),
            "cases",
            "the mine found no collapse, so there is no suite to write (a suite needs at least one case)",
        ));
    }
    let text = suite_text(settings, entries, records, others, options)?;
    Suite::parse(&text, path, registry)?;
    crate::cache::write_atomic(path, text.as_bytes())?;
    Ok(found)
}
