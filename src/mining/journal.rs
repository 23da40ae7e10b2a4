//! The mining journal: one JSON line per record, written as the mine goes, so a killed mine resumes where it stopped.
//!
//! The first line is a header holding the settings every line depends on: model id and weights fingerprint, the
//! method and its hyper-parameters, the dataset and how records are chosen, the corpus, the thresholds and the
//! unedited baseline. Each further line is one [`JournalEntry`]: an edited record with its measurements, a record
//! the screen skipped (with the rule that skipped it), or a record the method could not edit (with the error).
//! Lines are appended and synced one at a time. Reopening a journal reads every complete line; a torn last line (the
//! process was killed mid-write) is cut off; a header from other settings is refused with the fields that differ,
//! never mixed into. An edited or failed record is never edited again; a skipped one may be, by a later run whose
//! screen keeps it, and the later line wins.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::methods::ScreenSignals;
use crate::thresholds::Thresholds;

/// The format tag of the header line.
pub const JOURNAL_FORMAT: &str = "editguard-mine-journal/1";

/// What every line of a journal depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MineSettings {
    /// Model id.
    pub model: String,
    /// Fingerprint of the weight files.
    pub fingerprint: String,
    /// Method name.
    pub method: String,
    /// The method's hyper-parameter table (as JSON).
    pub hyper_parameters: serde_json::Value,
    /// Edit dataset (`counterfact`, `counterfact-train`, `zsre`).
    pub dataset: String,
    /// How records are chosen: `seeded order, seed S` or `ids`.
    pub selection: String,
    /// Perplexity corpus.
    pub corpus: String,
    /// The thresholds in force.
    pub thresholds: Thresholds,
    /// The unedited mean perplexity on the corpus.
    pub baseline_ppl: f64,
}

impl MineSettings {
    /// The fields whose values differ from `other`'s, each as `field: journal value ≠ current value`.
    pub fn differences(&self, other: &MineSettings) -> Vec<String> {
        let (a, b) = (serde_json::to_value(self).unwrap_or_default(), serde_json::to_value(other).unwrap_or_default());
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec!["(settings)".into()] };
        let mut out = Vec::new();
        for (key, value) in a {
            let current = b.get(key).cloned().unwrap_or_default();
            let same = match (key.as_str(), value.as_f64(), current.as_f64()) {
                // The baseline is re-measured on resume: equal to the unedited-metrics tolerance.
                ("baseline_ppl", Some(x), Some(y)) => {
                    (x - y).abs() <= self.thresholds.baseline_tolerance * x.abs().max(y.abs())
                }
                _ => *value == current,
            };
            if !same {
                out.push(format!("{key}: journal {} ≠ now {}", short(value), short(&current)));
            }
        }
        out
    }
}

fn short(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 80 { format!("{}…", text.chars().take(80).collect::<String>()) } else { text }
}

/// f64 values that may be NaN or infinite (a collapsed model's perplexity): JSON numbers when finite, else the
/// strings `NaN`, `inf`, `-inf` (plain serde_json would write `null` and fail to read it back).
mod any_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() { s.serialize_f64(*value) } else { s.serialize_str(&value.to_string()) }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Number(v) => Ok(v),
            Repr::Text(t) => t.parse().map_err(|_| serde::de::Error::custom(format!("`{t}` is not a number"))),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    settings: MineSettings,
}

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryStatus {
    /// Edited and measured.
    Edited,
    /// Not edited: the screen's rule ruled it out.
    Skipped,
    /// The method failed on it (the error is recorded).
    Failed,
}

/// The measurements of one edited record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditMeasurement {
    /// Mean per-sentence perplexity after the edit.
    #[serde(with = "any_f64")]
    pub ppl: f64,
    /// Token-weighted corpus perplexity after the edit.
    #[serde(with = "any_f64")]
    pub corpus_ppl: f64,
    /// `ppl` / the baseline.
    #[serde(with = "any_f64")]
    pub ratio: f64,
    /// ‖ΔW‖/‖W‖ (largest over changed weights).
    #[serde(with = "any_f64")]
    pub relative_norm: f64,
    /// 1 when the prompt prefers the new target afterwards.
    pub efficacy: f64,
    /// Target-token accuracy on the prompt.
    #[serde(with = "any_f64")]
    pub efficacy_accuracy: f64,
    /// Generalisation (paraphrases), when the record has any.
    pub generalization: Option<f64>,
    /// Locality, when the record has probes.
    pub locality: Option<f64>,
    /// The harness's verdict: the perplexity crossed the collapse bound.
    pub collapsed: bool,
    /// A metric was NaN or infinite (the harness fails such a test outright).
    pub non_finite: bool,
    /// Seconds of the edit itself.
    pub edit_seconds: f64,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Position in the mine's order (0-based).
    pub index: usize,
    /// Dataset record id.
    pub id: String,
    /// The prompt template.
    pub prompt: String,
    /// The subject.
    pub subject: String,
    /// The new target.
    pub target_new: String,
    /// The old target.
    pub ground_truth: Option<String>,
    /// What happened.
    pub status: EntryStatus,
    /// The screen behind the record: `signal < min` for a record it skipped, `kept: signal>=min` for one it let
    /// through, `audit: signal < min` for a skipped record edited anyway; none when the record was mined unscreened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The error, for failed records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Screen signals (computed for every record when the method offers a screen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<ScreenSignals>,
    /// Seconds the screen took.
    #[serde(default)]
    pub screen_seconds: f64,
    /// The measurements, for edited records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<EditMeasurement>,
    /// Wall-clock seconds for the whole record (screen, edit, measurement, undo).
    pub seconds: f64,
}

impl JournalEntry {
    /// True when the record needs no further work (edited or failed).
    pub fn settled(&self) -> bool {
        self.status != EntryStatus::Skipped
    }
}

/// An open journal: its settings, the entries so far (the latest per record id) and the file to append to.
pub struct Journal {
    /// Where it lives.
    pub path: PathBuf,
    /// The settings of its header.
    pub settings: MineSettings,
    entries: BTreeMap<String, JournalEntry>,
    order: Vec<String>,
    file: File,
}

impl Journal {
    /// Opens `path` for `settings`: creates it with a header, or resumes it when its header has the same settings.
    /// Returns the journal and, when a torn last line was cut off, a note saying so.
    pub fn open(path: &Path, settings: &MineSettings) -> Result<(Journal, Option<String>)> {
        let mut note = None;
        let (entries, order) = if path.exists() {
            let (header, entries, order, complete_len, total_len) = read_lines(path)?;
            let differences = header.differences(settings);
            if !differences.is_empty() {
                return Err(Error::invalid(
                    path.display().to_string(),
                    "settings",
                    format!(
                        "this journal was written with other settings ({}); it is not mixed with this run: \
                         give another --journal, or run with the journal's settings",
                        differences.join("; ")
                    ),
                ));
            }
            if complete_len < total_len {
                let file = OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
                file.set_len(complete_len).map_err(|e| Error::io(path, e))?;
                file.sync_all().map_err(|e| Error::io(path, e))?;
                note = Some(format!(
                    "{}: cut off a torn last line ({} bytes) left by an interrupted run",
                    path.display(),
                    total_len - complete_len
                ));
            }
            (entries, order)
        } else {
            let header = Header { format: JOURNAL_FORMAT.to_string(), settings: settings.clone() };
            let line = serde_json::to_string(&header)
                .map_err(|e| Error::invalid(path.display().to_string(), "header", e.to_string()))?;
            crate::cache::write_atomic(path, format!("{line}\n").as_bytes())?;
            (BTreeMap::new(), Vec::new())
        };
        let file = OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok((Journal { path: path.to_path_buf(), settings: settings.clone(), entries, order, file }, note))
    }

    /// Reads a journal without opening it for writing (for reports).
    pub fn read(path: &Path) -> Result<(MineSettings, Vec<JournalEntry>)> {
        let (settings, mut entries, order, _, _) = read_lines(path)?;
        Ok((settings, order.iter().filter_map(|id| entries.remove(id)).collect()))
    }

    /// The latest entry of a record.
    pub fn entry(&self, id: &str) -> Option<&JournalEntry> {
        self.entries.get(id)
    }

    /// The latest entry of every record, in the order records were first journaled.
    pub fn entries(&self) -> impl Iterator<Item = &JournalEntry> {
        self.order.iter().filter_map(|id| self.entries.get(id))
    }

    /// Appends an entry (one line, synced to disk).
    pub fn append(&mut self, entry: JournalEntry) -> Result<()> {
        let line = serde_json::to_string(&entry)
            .map_err(|e| Error::invalid(self.path.display().to_string(), "entry", e.to_string()))?;
        self.file.write_all(format!("{line}\n").as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))?;
        if !self.entries.contains_key(&entry.id) {
            self.order.push(entry.id.clone());
        }
        self.entries.insert(entry.id.clone(), entry);
        Ok(())
    }
}

type Lines = (MineSettings, BTreeMap<String, JournalEntry>, Vec<String>, u64, u64);

/// Parses a journal: header, entries (latest per id), first-seen order, the length of its complete lines and the
/// file's length. A malformed complete line is an error naming its line; only an unterminated last line is torn.
fn read_lines(path: &Path) -> Result<Lines> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let origin = path.display().to_string();
    let complete_len = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let mut lines = text[..complete_len].lines().enumerate();
    let Some((_, first)) = lines.next() else {
        return Err(Error::invalid(format!("{origin}:1"), "header", "empty journal: expected a header line"));
    };
    let header: Header = serde_json::from_str(first)
        .map_err(|e| Error::invalid(format!("{origin}:1"), "header", format!("not a mining journal header: {e}")))?;
    if header.format != JOURNAL_FORMAT {
        return Err(Error::invalid(
            format!("{origin}:1"),
            "format",
            format!("expected `{JOURNAL_FORMAT}`, found `{}`", header.format),
        ));
    }
    let mut entries = BTreeMap::new();
    let mut order = Vec::new();
    for (number, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let entry: JournalEntry = serde_json::from_str(line)
            .map_err(|e| Error::invalid(format!("{origin}:{}", number + 1), "entry", e.to_string()))?;
        if !entries.contains_key(&entry.id) {
            order.push(entry.id.clone());
        }
        entries.insert(entry.id.clone(), entry);
    }
    Ok((header.settings, entries, order, complete_len as u64, text.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MineSettings {
        MineSettings {
            model: "m".into(),
            fingerprint: "f".into(),
            method: "rome".into(),
            hyper_parameters: serde_json::json!({"layers": [5]}),
            dataset: "counterfact".into(),
            selection: "seeded order, seed 0".into(),
            corpus: "me-ppl-50".into(),
            thresholds: Thresholds::shipped_defaults(),
            baseline_ppl: 167.29,
        }
    }

    fn entry(id: &str, status: EntryStatus) -> JournalEntry {
        JournalEntry {
            index: 0,
            id: id.into(),
            prompt: "{} is in".into(),
            subject: "Paris".into(),
            target_new: "Italy".into(),
            ground_truth: Some("France".into()),
            status,
            rule: None,
            error: None,
            signals: None,
            screen_seconds: 0.0,
            measured: None,
            seconds: 1.0,
        }
    }

    #[test]
    fn resumes_cuts_a_torn_line_and_keeps_the_latest_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (mut journal, note) = Journal::open(&path, &settings()).unwrap();
        assert!(note.is_none());
        journal.append(entry("1", EntryStatus::Skipped)).unwrap();
        journal.append(entry("2", EntryStatus::Edited)).unwrap();
        drop(journal);
        // A killed writer leaves half a line.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"index\":2,\"id\":\"3\",\"pro").unwrap();
        drop(file);
        let (mut journal, note) = Journal::open(&path, &settings()).unwrap();
        assert!(note.unwrap().contains("torn last line"));
        assert!(journal.entry("3").is_none());
        assert!(!journal.entry("1").unwrap().settled() && journal.entry("2").unwrap().settled());
        journal.append(entry("1", EntryStatus::Edited)).unwrap();
        drop(journal);
        let (_, entries) = Journal::read(&path).unwrap();
        let ids: Vec<(&str, EntryStatus)> = entries.iter().map(|e| (e.id.as_str(), e.status)).collect();
        assert_eq!(ids, vec![("1", EntryStatus::Edited), ("2", EntryStatus::Edited)]);
    }

    #[test]
    fn a_journal_of_other_settings_is_refused_naming_the_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        Journal::open(&path, &settings()).unwrap();
        let mut other = settings();
        other.hyper_parameters = serde_json::json!({"layers": [6]});
        other.baseline_ppl = 167.2901; // within the baseline tolerance: not a difference
        let err = Journal::open(&path, &other).err().unwrap().to_string();
        assert!(err.contains("hyper_parameters") && err.contains("not mixed"), "{err}");
        assert!(!err.contains("baseline_ppl"), "{err}");
        other = settings();
        other.baseline_ppl = 170.0;
        assert!(Journal::open(&path, &other).err().unwrap().to_string().contains("baseline_ppl"));
    }

    #[test]
    fn non_finite_measurements_survive_the_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (mut journal, _) = Journal::open(&path, &settings()).unwrap();
        let mut nan = entry("9", EntryStatus::Edited);
        nan.measured = Some(EditMeasurement {
            ppl: f64::NAN,
            corpus_ppl: f64::INFINITY,
            ratio: f64::NAN,
            relative_norm: 0.5,
            efficacy: 1.0,
            efficacy_accuracy: 0.0,
            generalization: None,
            locality: None,
            collapsed: false,
            non_finite: true,
            edit_seconds: 1.0,
        });
        journal.append(nan).unwrap();
        let (_, entries) = Journal::read(&path).unwrap();
        let measured = entries[0].measured.as_ref().unwrap();
        assert!(measured.ppl.is_nan() && measured.corpus_ppl == f64::INFINITY && measured.relative_norm == 0.5);
    }

    #[test]
    fn a_malformed_complete_line_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        Journal::open(&path, &settings()).unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"not json\n").unwrap();
        let err = Journal::read(&path).err().unwrap().to_string();
        assert!(err.contains("j.jsonl:2"), "{err}");
    }
}
