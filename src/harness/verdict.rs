//! Verdicts: the measurements of an edited model against its thresholds, and the diagnosis a failing test prints.
//!
//! A test measures the model at checkpoints (after the edit, or after every k edits of a sequential suite). At each
//! checkpoint a non-finite metric is a failure outright, and the mean ME-PPL perplexity is compared with two bounds:
//! an absolute one (`collapse_ppl`) and a multiple of the unedited baseline (`collapse_ratio`); crossing either is a
//! collapse, and a sequential run stops there ("collapsed at edit 7 of 50"). After the last checkpoint the share of
//! edits that took is compared with `min_efficacy`. The findings are then held against the expected outcome:
//! `hold` passes with no finding, `collapse` only with a detected collapse ("expected collapse, model held"
//! otherwise), `ineffective` only when the edit did not take and nothing collapsed.

use serde::{Deserialize, Serialize};

use crate::cases::Outcome;
use crate::harness::task_checks::TaskCheck;
use crate::thresholds::Thresholds;

/// The measurements at one checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Edits applied when measured.
    pub edits: usize,
    /// Mean per-sentence perplexity on the suite's corpus.
    pub mean_ppl: f64,
    /// Token-weighted corpus perplexity.
    pub corpus_ppl: f64,
    /// `mean_ppl` / the unedited model's.
    pub ppl_ratio: f64,
    /// Largest ‖ΔW‖_F/‖W‖_F over the weights changed so far (all kept edits together).
    pub relative_norm: f64,
    /// Share of the edited requests whose prompt prefers the new target.
    pub efficacy: f64,
    /// Mean target-token accuracy on the prompts.
    pub efficacy_accuracy: f64,
    /// Share of paraphrases preferring the new target, when the cases have paraphrases.
    pub generalization: Option<f64>,
    /// Share of locality answer tokens unchanged, when the cases have locality prompts.
    pub locality: Option<f64>,
}

/// Something wrong with an edited model.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// A metric is NaN or infinite.
    NonFinite {
        /// Which metric.
        metric: &'static str,
        /// Edits applied.
        edits: usize,
    },
    /// The perplexity crossed a collapse bound.
    Collapse {
        /// The mean perplexity.
        value: f64,
        /// The bound crossed.
        bound: f64,
        /// Which rule gave the bound.
        rule: String,
        /// Edits applied.
        edits: usize,
    },
    /// A downstream task score fell more than the tolerance below its baseline.
    TaskDrop {
        /// Task name.
        task: String,
        /// Metric name.
        metric: String,
        /// The edited model's score.
        score: f64,
        /// The unedited model's score.
        baseline: f64,
        /// The random-guess floor.
        floor: f64,
        /// The tolerance.
        tolerance: f64,
        /// Where the baseline came from.
        origin: String,
    },
    /// Too few edits took.
    Ineffective {
        /// Share of edits that took.
        efficacy: f64,
        /// The threshold.
        min: f64,
    },
}

/// The collapse or non-finite finding at a checkpoint, if any.
pub fn judge_checkpoint(checkpoint: &Checkpoint, thresholds: &Thresholds, baseline_ppl: f64) -> Option<Finding> {
    let metrics = [
        ("mean perplexity", checkpoint.mean_ppl),
        ("corpus perplexity", checkpoint.corpus_ppl),
        ("‖ΔW‖/‖W‖", checkpoint.relative_norm),
        ("efficacy", checkpoint.efficacy_accuracy),
    ];
    if let Some((metric, _)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Some(Finding::NonFinite { metric, edits: checkpoint.edits });
    }
    let (bound, rule) = collapse_bound(thresholds, baseline_ppl);
    (checkpoint.mean_ppl > bound).then_some(Finding::Collapse {
        value: checkpoint.mean_ppl,
        bound,
        rule,
        edits: checkpoint.edits,
    })
}

/// The collapse bound in force — the smaller of `collapse_ratio × baseline` and `collapse_ppl` — and which rule gave it.
pub fn collapse_bound(thresholds: &Thresholds, baseline_ppl: f64) -> (f64, String) {
    let ratio_bound = thresholds.collapse_ratio * baseline_ppl;
    if ratio_bound <= thresholds.collapse_ppl {
        (ratio_bound, format!("collapse_ratio {} × baseline {baseline_ppl:.2}", thresholds.collapse_ratio))
    } else {
        (thresholds.collapse_ppl, "collapse_ppl (absolute)".to_string())
    }
}

/// The ineffective finding after the last checkpoint, if any.
pub fn judge_efficacy(efficacy: f64, thresholds: &Thresholds) -> Option<Finding> {
    (efficacy < thresholds.min_efficacy).then_some(Finding::Ineffective { efficacy, min: thresholds.min_efficacy })
}

/// The finding when an edited model's task score fell more than `tolerance` below its baseline.
pub fn judge_task(check: &TaskCheck, tolerance: f64, origin: &str) -> Option<Finding> {
    (check.score < check.baseline - tolerance).then(|| Finding::TaskDrop {
        task: check.task.clone(),
        metric: check.metric.clone(),
        score: check.score,
        baseline: check.baseline,
        floor: check.random_floor,
        tolerance,
        origin: origin.to_string(),
    })
}

/// A short outcome line, also stored in the test's snapshot.
pub fn outcome_line(findings: &[Finding], total_edits: usize) -> String {
    let mut parts = Vec::new();
    for finding in findings {
        parts.push(match finding {
            Finding::NonFinite { metric, edits } => format!("non-finite {metric} at edit {edits} of {total_edits}"),
            Finding::Collapse { edits, .. } => format!("collapsed at edit {edits} of {total_edits}"),
            Finding::Ineffective { .. } => "edit did not take".to_string(),
            Finding::TaskDrop { task, score, baseline, .. } => format!("{task} fell {baseline:.3} → {score:.3}"),
        });
    }
    if parts.is_empty() { "held".to_string() } else { parts.join("; ") }
}

/// Whether the findings meet the expectation; on failure, the headline of the diagnosis.
pub fn meets(findings: &[Finding], expected: Outcome) -> Result<(), String> {
    if let Some(Finding::NonFinite { metric, edits }) = findings.iter().find(|f| matches!(f, Finding::NonFinite { .. }))
    {
        return Err(format!("NON-FINITE {metric} after edit {edits}: NaN and infinity always fail"));
    }
    let collapse = findings.iter().find(|f| matches!(f, Finding::Collapse { .. }));
    let ineffective = findings.iter().find(|f| matches!(f, Finding::Ineffective { .. }));
    let drops: Vec<String> = findings
        .iter()
        .filter_map(|f| match f {
            Finding::TaskDrop { task, metric, score, baseline, tolerance, .. } => {
                Some(format!("{task} {metric} {score:.3} < baseline {baseline:.3} − {tolerance}"))
            }
            _ => None,
        })
        .collect();
    if expected == Outcome::Degrade {
        return match (collapse, drops.is_empty()) {
            (Some(Finding::Collapse { edits, .. }), _) => {
                Err(format!("expected task scores to fall, but the model COLLAPSED at edit {edits}"))
            }
            (_, true) => Err("expected a task score to fall, but every asserted task held".to_string()),
            _ => Ok(()),
        };
    }
    if !drops.is_empty() && expected != Outcome::Collapse {
        return Err(format!("TASK SCORE DROP: {}", drops.join("; ")));
    }
    match (expected, collapse, ineffective) {
        (Outcome::Hold, None, None) => Ok(()),
        (Outcome::Hold, Some(Finding::Collapse { edits, .. }), _) => Err(format!("COLLAPSE at edit {edits}")),
        (Outcome::Hold, None, Some(_)) => Err("EDIT DID NOT TAKE".to_string()),
        (Outcome::Collapse, Some(_), _) => Ok(()),
        (Outcome::Collapse, None, _) => Err("expected collapse, model held".to_string()),
        (Outcome::Ineffective, None, Some(_)) => Ok(()),
        (Outcome::Ineffective, Some(Finding::Collapse { edits, .. }), _) => {
            Err(format!("expected an ineffective edit, but the model COLLAPSED at edit {edits}"))
        }
        (Outcome::Ineffective, _, None) => Err("expected the edit not to take, but it took".to_string()),
        (_, Some(_), _) => unreachable!("collapse findings are handled above"),
        (Outcome::Degrade, ..) => unreachable!("degradation is judged above"),
    }
}

/// What a diagnosis shows besides the findings.
pub struct DiagnosisContext<'a> {
    /// The test name.
    pub test: &'a str,
    /// The corpus name.
    pub corpus: &'a str,
    /// The unedited mean perplexity and where it came from.
    pub baseline_ppl: f64,
    /// Where the baseline came from.
    pub baseline_origin: &'a str,
    /// Edits the test applies in all.
    pub total_edits: usize,
    /// The thresholds in force.
    pub thresholds: &'a Thresholds,
    /// The expected outcome and why.
    pub expected: (Outcome, Option<&'a str>),
    /// The edit cases, one line each.
    pub cases: &'a [String],
    /// The task scores of the edited model, when the suite names tasks.
    pub tasks: &'a [TaskCheck],
}

/// The readable diagnosis of a failing test.
pub fn diagnose(
    headline: &str,
    context: &DiagnosisContext,
    findings: &[Finding],
    checkpoints: &[Checkpoint],
) -> String {
    let mut out = format!("{}: {headline}\n", context.test);
    let last = checkpoints.last();
    let collapse = findings.iter().find_map(|f| match f {
        Finding::Collapse { value, bound, rule, edits } => Some((*value, *bound, rule.clone(), *edits)),
        _ => None,
    });
    let line = |out: &mut String, key: &str, value: String| out.push_str(&format!("  {key:<12} {value}\n"));
    line(&mut out, "metric", format!("{} mean per-sentence perplexity", context.corpus));
    match (collapse.clone(), last) {
        (Some((value, bound, rule, _)), _) => {
            line(&mut out, "value", format!("{value:.2}"));
            line(&mut out, "bound", format!("{bound:.2} ({rule}; absolute bound {})", context.thresholds.collapse_ppl));
        }
        (None, Some(c)) => {
            line(&mut out, "value", format!("{:.2}", c.mean_ppl));
            let (bound, rule) = collapse_bound(context.thresholds, context.baseline_ppl);
            line(
                &mut out,
                "bound",
                format!("{bound:.2} ({rule}; absolute bound {}); not crossed", context.thresholds.collapse_ppl),
            );
        }
        (None, None) => {}
    }
    line(&mut out, "baseline", format!("{:.2} ({})", context.baseline_ppl, context.baseline_origin));
    if let Some(c) = checkpoints.iter().find(|c| collapse.as_ref().is_some_and(|x| x.3 == c.edits)).or(last) {
        line(&mut out, "edit", format!("{} of {}", c.edits, context.total_edits));
        line(&mut out, "ratio", format!("{:.3} × baseline", c.ppl_ratio));
        line(&mut out, "‖ΔW‖/‖W‖", format!("{:.4}", c.relative_norm));
        line(
            &mut out,
            "efficacy",
            format!(
                "{:.3} (min_efficacy {}; target-token accuracy {:.3})",
                c.efficacy, context.thresholds.min_efficacy, c.efficacy_accuracy
            ),
        );
        if let Some(g) = c.generalization {
            line(&mut out, "generalize", format!("{g:.3}"));
        }
        if let Some(l) = c.locality {
            line(&mut out, "locality", format!("{l:.3}"));
        }
    }
    for check in context.tasks {
        let dropped = findings.iter().find_map(|f| match f {
            Finding::TaskDrop { task, tolerance, origin, .. } if *task == check.task => Some((*tolerance, origin)),
            _ => None,
        });
        let verdict = match dropped {
            Some((tolerance, origin)) => format!("DROPPED more than {tolerance}; baseline from {origin}"),
            None => format!("within task_tolerance {}", context.thresholds.task_tolerance),
        };
        line(
            &mut out,
            "task",
            format!(
                "{} {} {:.3} (baseline {:.3}, floor {:.3}) {verdict}",
                check.task, check.metric, check.score, check.baseline, check.random_floor
            ),
        );
    }
    let (outcome, reason) = context.expected;
    line(&mut out, "expected", format!("{}{}", outcome.name(), reason.map(|r| format!(" — {r}")).unwrap_or_default()));
    line(&mut out, "found", outcome_line(findings, context.total_edits));
    for (i, case) in context.cases.iter().enumerate().take(5) {
        line(&mut out, if i == 0 { "case" } else { "" }, case.clone());
    }
    if context.cases.len() > 5 {
        line(&mut out, "", format!("… and {} more", context.cases.len() - 5));
    }
    if checkpoints.len() > 1 {
        let trail: Vec<String> = checkpoints.iter().map(|c| format!("{}:{:.1}", c.edits, c.mean_ppl)).collect();
        line(&mut out, "trajectory", trail.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds::shipped_defaults()
    }

    fn checkpoint(ppl: f64) -> Checkpoint {
        Checkpoint {
            edits: 1,
            mean_ppl: ppl,
            corpus_ppl: ppl / 2.0,
            ppl_ratio: ppl / 167.0,
            relative_norm: 0.1,
            efficacy: 1.0,
            efficacy_accuracy: 1.0,
            generalization: None,
            locality: None,
        }
    }

    #[test]
    fn the_tighter_bound_decides() {
        let t = thresholds();
        assert!(judge_checkpoint(&checkpoint(300.0), &t, 167.0).is_none());
        let Some(Finding::Collapse { bound, .. }) = judge_checkpoint(&checkpoint(400.0), &t, 167.0) else { panic!() };
        assert_eq!(bound, 334.0);
        let Some(Finding::Collapse { bound, .. }) = judge_checkpoint(&checkpoint(1200.0), &t, 800.0) else { panic!() };
        assert_eq!(bound, 1000.0);
    }

    #[test]
    fn nan_fails_even_when_collapse_is_expected() {
        let f = judge_checkpoint(&checkpoint(f64::NAN), &thresholds(), 167.0).unwrap();
        assert!(matches!(f, Finding::NonFinite { .. }));
        assert!(meets(&[f], Outcome::Collapse).unwrap_err().contains("NON-FINITE"));
    }

    #[test]
    fn expectations() {
        let collapse = judge_checkpoint(&checkpoint(2000.0), &thresholds(), 167.0).unwrap();
        assert!(meets(std::slice::from_ref(&collapse), Outcome::Collapse).is_ok());
        assert!(meets(std::slice::from_ref(&collapse), Outcome::Hold).unwrap_err().contains("COLLAPSE"));
        assert_eq!(meets(&[], Outcome::Collapse).unwrap_err(), "expected collapse, model held");
        let ineffective = judge_efficacy(0.0, &thresholds()).unwrap();
        assert!(meets(std::slice::from_ref(&ineffective), Outcome::Ineffective).is_ok());
        assert!(meets(&[ineffective], Outcome::Hold).is_err());
        assert!(meets(&[], Outcome::Ineffective).is_err());
    }

    #[test]
    fn a_task_score_below_baseline_minus_tolerance_fails_with_task_baseline_and_floor() {
        let t = thresholds();
        let check =
            |score| TaskCheck { task: "piqa".into(), metric: "acc".into(), score, baseline: 0.64, random_floor: 0.5 };
        assert!(judge_task(&check(0.60), t.task_tolerance, "snapshot").is_none());
        let drop = judge_task(&check(0.52), t.task_tolerance, "accepted snapshot x").unwrap();
        let headline = meets(std::slice::from_ref(&drop), Outcome::Hold).unwrap_err();
        assert!(
            headline.contains("TASK SCORE DROP") && headline.contains("piqa acc 0.520 < baseline 0.640"),
            "{headline}"
        );
        assert!(meets(std::slice::from_ref(&drop), Outcome::Ineffective).is_err());
        assert!(meets(std::slice::from_ref(&drop), Outcome::Collapse).is_err(), "a collapse must still be found");
        // An expected degradation needs a drop and no collapse.
        assert!(meets(std::slice::from_ref(&drop), Outcome::Degrade).is_ok());
        assert!(meets(&[], Outcome::Degrade).unwrap_err().contains("every asserted task held"));
        let collapse = Finding::Collapse { value: 5e3, bound: 1e3, rule: "collapse_ppl".into(), edits: 1 };
        assert!(meets(&[drop.clone(), collapse], Outcome::Degrade).unwrap_err().contains("COLLAPSED"));
        let tasks = [check(0.52)];
        let context = DiagnosisContext {
            test: "single::rome::m::s::c",
            corpus: "me-ppl-50",
            baseline_ppl: 167.0,
            baseline_origin: "snapshot",
            total_edits: 1,
            thresholds: &t,
            expected: (Outcome::Hold, None),
            cases: &[],
            tasks: &tasks,
        };
        let text = diagnose(&headline, &context, &[drop], &[checkpoint(170.0)]);
        assert!(text.contains("piqa acc 0.520 (baseline 0.640, floor 0.500) DROPPED"), "{text}");
        assert!(text.contains("piqa fell 0.640 → 0.520"), "{text}");
    }
}
