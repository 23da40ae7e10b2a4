//! Writing mined collapses as a suite file the harness runs unchanged.
//!
//! Each collapsing record becomes an inline case with a readable name (`cf-<id>-<subject>-<target>`), the dataset and
//! id in `source`, and its paraphrase and locality prompts carried over from the dataset; each gets an `[[expect]]`
//! of `collapse` for the mining method whose reason quotes the measured perplexity, ratio and ‖ΔW‖/‖W‖. The text is
//! parsed back as a suite against the registry before it is written (atomically), so a file that the harness would
//! refuse is never published.

use std::fmt::Write as _;
use std::path::Path;

use crate::cases::Suite;
use crate::cases::write::{case_name, inline_case, quoted};
use crate::data::counterfact::select_ids;
use crate::error::{Error, Result};
use crate::methods::EditRequest;
use crate::registry::Registry;

use super::journal::{JournalEntry, MineSettings};

/// How the suite is written.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Methods the suite runs (the mining method first; others are expected to hold until measured otherwise).
    pub methods: Vec<String>,
    /// `default` or `heavy`.
    pub tier: String,
    /// The command line that produced it, for the header comment.
    pub command: String,
}

/// The collapsing entries of a mine (edited, perplexity over the bound, all metrics finite).
pub fn collapses(entries: &[JournalEntry]) -> Vec<&JournalEntry> {
    entries.iter().filter(|e| e.measured.as_ref().is_some_and(|m| m.collapsed && !m.non_finite)).collect()
}

/// The suite text for the collapses of a mine; `records` are the dataset records (for paraphrases and locality).
pub fn suite_text(
    settings: &MineSettings,
    entries: &[JournalEntry],
    records: &[EditRequest],
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
        "# (collapse_ratio {}, collapse_ppl {}). Command: {}",
        settings.thresholds.collapse_ratio, settings.thresholds.collapse_ppl, options.command
    );
    let _ = writeln!(text, "# Written by the mine; edit the expectations of other methods as measured.");
    let _ = writeln!(
        text,
        "description = {}",
        quoted(&format!(
            "COUNTERFACT records whose single {} edit collapses {} (mined)",
            settings.method, settings.model
        ))
    );
    let _ = writeln!(text, "setting = \"single\"");
    let methods: Vec<String> = options.methods.iter().map(|m| quoted(m)).collect();
    let _ = writeln!(text, "methods = [{}]", methods.join(", "));
    let _ = writeln!(text, "models = [{}]", quoted(&settings.model));
    let _ = writeln!(text, "tier = {}", quoted(&options.tier));
    let _ = writeln!(text, "corpus = {}", quoted(&settings.corpus));
    let ids: Vec<String> = found.iter().map(|e| e.id.clone()).collect();
    let requests = select_ids(records, &ids, &settings.dataset)?;
    let mut names = Vec::new();
    for (entry, request) in found.iter().zip(&requests) {
        let name = case_name(&settings.dataset, &entry.id, &entry.subject, &entry.target_new);
        text.push_str(&inline_case(&name, request, &format!("{} case {}", settings.dataset, entry.id), None));
        names.push(name);
    }
    for (entry, name) in found.iter().zip(&names) {
        let measured = entry.measured.as_ref().expect("collapses are measured");
        let _ = writeln!(text, "\n[[expect]]");
        let _ = writeln!(text, "outcome = \"collapse\"");
        let _ = writeln!(text, "methods = [{}]", quoted(&settings.method));
        let _ = writeln!(text, "cases = [{}]", quoted(name));
        let reason = format!(
            "mined: {} mean ppl {:.1} ({:.2}x baseline {:.2}), ‖ΔW‖/‖W‖ {:.3}",
            settings.corpus, measured.ppl, measured.ratio, settings.baseline_ppl, measured.relative_norm
        );
        let _ = writeln!(text, "reason = {}", quoted(&reason));
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
    let text = suite_text(settings, entries, records, options)?;
    Suite::parse(&text, path, registry)?;
    crate::cache::write_atomic(path, text.as_bytes())?;
    Ok(found)
}
