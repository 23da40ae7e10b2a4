//! The mining screen: a rule over a method's screen signals that skips the records least likely to collapse, and
//! the measurement of what such a rule would have missed.
//!
//! A rule is `signal >= min` (records below are skipped). Rules live in the registry, per model and method, as
//! `[models.<id>.screens.<method>]` with `signal`, `min` and a `measured` note saying where the threshold comes from,
//! because collapse geometry differs from model to model: a rule calibrated on one model says nothing about another.
//! [`evaluate`] holds a rule against records that were fully edited (a journal of a mine without screen): how many
//! of their collapses it keeps (recall), how many records it would skip, and the time it would have saved.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::methods::ScreenSignals;
use crate::methods::parse_params;
use crate::registry::Registry;

use super::journal::{EntryStatus, JournalEntry};

/// Skip a record when its `signal` is below `min`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenRule {
    /// A screen signal name (see `methods::screen`).
    pub signal: String,
    /// Records whose signal is below this are skipped.
    pub min: f64,
    /// Where the threshold comes from and what it was measured to keep.
    #[serde(default)]
    pub measured: String,
}

impl ScreenRule {
    /// Parses `signal>=min`.
    pub fn parse(text: &str) -> Result<ScreenRule> {
        let (signal, min) = text.split_once(">=").ok_or_else(|| {
            Error::invalid(
                "--screen",
                "rule",
                format!("expected `signal>=value`, e.g. `predicted_norm>=0.3`, not `{text}`"),
            )
        })?;
        let min: f64 = min
            .trim()
            .parse()
            .map_err(|_| Error::invalid("--screen", "rule", format!("`{}` is not a number", min.trim())))?;
        if !min.is_finite() {
            return Err(Error::invalid("--screen", "rule", "the threshold must be finite"));
        }
        Ok(ScreenRule { signal: signal.trim().to_string(), min, measured: String::new() })
    }

    /// The registry's rule for (model, method), if it has one.
    pub fn from_registry(registry: &Registry, model: &str, method: &str) -> Result<Option<ScreenRule>> {
        let entry = registry.get(model)?;
        entry
            .screens
            .get(method)
            .map(|table| parse_params(table, &format!("{}: models.{model}.screens.{method}", registry.origin)))
            .transpose()
    }

    /// True when the rule skips a record with these signals. A record without the signal is never skipped.
    pub fn skips(&self, signals: Option<&ScreenSignals>) -> bool {
        signals.and_then(|s| s.get(&self.signal)).is_some_and(|value| value < self.min)
    }

    /// `signal < min`, as journaled for skipped records.
    pub fn describe(&self) -> String {
        format!("{} < {}", self.signal, self.min)
    }
}

/// What a rule would have done to fully edited records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScreenEvaluation {
    /// The rule.
    pub rule: String,
    /// Fully edited records with the signal.
    pub records: usize,
    /// Their collapses.
    pub collapses: usize,
    /// Collapses the rule keeps.
    pub kept_collapses: usize,
    /// Records the rule would skip.
    pub skipped: usize,
    /// Seconds the full edits took in all (screen included).
    pub full_seconds: f64,
    /// Seconds with the rule: the screen for every record, the rest only for kept records.
    pub screened_seconds: f64,
}

impl ScreenEvaluation {
    /// Share of collapses kept.
    pub fn recall(&self) -> f64 {
        self.kept_collapses as f64 / self.collapses.max(1) as f64
    }

    /// Screened time over full time.
    pub fn time_share(&self) -> f64 {
        self.screened_seconds / self.full_seconds.max(f64::MIN_POSITIVE)
    }
}

/// The records edited without any screen: a random sample of the selection (records a screen kept, and audited
/// ones, are not: they were chosen by a screen).
pub fn unscreened(entries: &[JournalEntry]) -> Vec<JournalEntry> {
    entries.iter().filter(|e| e.status == EntryStatus::Edited && e.rule.is_none()).cloned().collect()
}

/// Holds `rule` against the fully edited records among `entries` (pass [`unscreened`] ones for an unbiased figure).
pub fn evaluate(rule: &ScreenRule, entries: &[JournalEntry]) -> ScreenEvaluation {
    let mut evaluation = ScreenEvaluation {
        rule: format!("{}>={}", rule.signal, rule.min),
        records: 0,
        collapses: 0,
        kept_collapses: 0,
        skipped: 0,
        full_seconds: 0.0,
        screened_seconds: 0.0,
    };
    for entry in entries {
        let (Some(measured), Some(_)) = (&entry.measured, entry.signals.as_ref().and_then(|s| s.get(&rule.signal)))
        else {
            continue;
        };
        if entry.status != EntryStatus::Edited {
            continue;
        }
        let skipped = rule.skips(entry.signals.as_ref());
        evaluation.records += 1;
        evaluation.full_seconds += entry.seconds;
        evaluation.screened_seconds += if skipped { entry.screen_seconds } else { entry.seconds };
        if skipped {
            evaluation.skipped += 1;
        }
        if measured.collapsed {
            evaluation.collapses += 1;
            evaluation.kept_collapses += usize::from(!skipped);
        }
    }
    evaluation
}

/// The largest threshold on `signal` that keeps at least `recall` of the collapses among `entries`' full edits
/// (None without collapses or without the signal).
pub fn calibrate(signal: &str, recall: f64, entries: &[JournalEntry]) -> Option<f64> {
    let mut values: Vec<f64> = entries
        .iter()
        .filter(|e| e.status == EntryStatus::Edited && e.measured.as_ref().is_some_and(|m| m.collapsed))
        .filter_map(|e| e.signals.as_ref().and_then(|s| s.get(signal)))
        .filter(|v| v.is_finite())
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| b.total_cmp(a));
    let keep = ((recall * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[keep - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mining::journal::EditMeasurement;

    fn edited(id: &str, signal: f64, collapsed: bool) -> JournalEntry {
        let mut signals = ScreenSignals::default();
        signals.0.insert("predicted_norm".into(), signal);
        JournalEntry {
            index: 0,
            id: id.into(),
            prompt: "{} is".into(),
            subject: "x".into(),
            target_new: "y".into(),
            ground_truth: None,
            status: EntryStatus::Edited,
            rule: None,
            error: None,
            signals: Some(signals),
            screen_seconds: 0.5,
            measured: Some(EditMeasurement {
                ppl: if collapsed { 900.0 } else { 170.0 },
                corpus_ppl: 1.0,
                ratio: 1.0,
                relative_norm: 0.1,
                efficacy: 1.0,
                efficacy_accuracy: 1.0,
                generalization: None,
                locality: None,
                collapsed,
                non_finite: false,
                edit_seconds: 9.0,
            }),
            seconds: 10.0,
        }
    }

    #[test]
    fn rules_parse_skip_below_and_keep_records_without_the_signal() {
        let rule = ScreenRule::parse("predicted_norm>=0.3").unwrap();
        assert_eq!((rule.signal.as_str(), rule.min), ("predicted_norm", 0.3));
        assert!(rule.skips(edited("a", 0.2, false).signals.as_ref()));
        assert!(!rule.skips(edited("a", 0.3, false).signals.as_ref()));
        assert!(!rule.skips(None));
        assert!(ScreenRule::parse("predicted_norm>0.3").is_err());
        assert!(ScreenRule::parse("predicted_norm>=x").is_err());
    }

    #[test]
    fn evaluation_counts_recall_skips_and_time() {
        let entries =
            vec![edited("1", 0.9, true), edited("2", 0.1, true), edited("3", 0.05, false), edited("4", 0.5, false)];
        let e = evaluate(&ScreenRule::parse("predicted_norm>=0.2").unwrap(), &entries);
        assert_eq!((e.records, e.collapses, e.kept_collapses, e.skipped), (4, 2, 1, 2));
        assert_eq!(e.recall(), 0.5);
        assert_eq!((e.full_seconds, e.screened_seconds), (40.0, 21.0));
        assert_eq!(calibrate("predicted_norm", 1.0, &entries), Some(0.1));
        assert_eq!(calibrate("predicted_norm", 0.5, &entries), Some(0.9));
        assert_eq!(calibrate("other", 0.5, &entries), None);
    }
}
