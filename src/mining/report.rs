//! The summary of a mine: collapse rate, distributions, which record features go with collapse, what a screen keeps,
//! and an SVG scatter of ‖ΔW‖/‖W‖ against the perplexity ratio.
//!
//! Features are the paper's §4.2 characterisation measured on the mined model: whether the subject opens the prompt,
//! how many tokens it has, and the relation — approximated by the prompt template with the subject taken out (the
//! EasyEdit form of COUNTERFACT carries no relation id; each relation has a handful of templates). Each screen signal
//! is scored by its AUC (the probability that a random collapse has a higher signal than a random hold, ties half),
//! with the threshold that would keep 90% and 100% of the collapses and the share of records it would skip there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::metrics::rank_correlation::average_ranks;
use crate::plotting::{COLOURS, draw_legend, write_svg};

use super::journal::{EntryStatus, JournalEntry, MineSettings};
use super::screen::{ScreenRule, calibrate, evaluate, unscreened};

/// Wilson's 95% interval of a proportion.
pub fn wilson_interval(successes: usize, trials: usize) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let (n, z) = (trials as f64, 1.959964);
    let p = successes as f64 / n;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The AUC of `positives` against `negatives` (Mann–Whitney U / (n₊ n₋), ties counted half); None if a side is empty.
pub fn auc(positives: &[f64], negatives: &[f64]) -> Option<f64> {
    if positives.is_empty() || negatives.is_empty() {
        return None;
    }
    let all: Vec<f64> = positives.iter().chain(negatives).copied().collect();
    let ranks = average_ranks(&all);
    let (p, n) = (positives.len() as f64, negatives.len() as f64);
    let rank_sum: f64 = ranks[..positives.len()].iter().sum();
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// The `q` quantile (0..1) of sorted values, by linear interpolation.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = q * (sorted.len() - 1) as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (at - low as f64)
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn rate(collapses: usize, n: usize) -> String {
    format!("{:.1}% ({collapses}/{n})", 100.0 * collapses as f64 / n.max(1) as f64)
}

/// Collapse rates by record feature (subject opens the prompt, subject token count, relation as prompt template).
fn feature_lines(records: &[&JournalEntry], collapsed: &dyn Fn(&JournalEntry) -> bool) -> String {
    let mut out = String::new();
    let by = |key: &dyn Fn(&JournalEntry) -> Option<String>| {
        let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for e in records {
            if let Some(k) = key(e) {
                let slot = groups.entry(k).or_default();
                slot.0 += usize::from(collapsed(e));
                slot.1 += 1;
            }
        }
        groups
    };
    let signal = |e: &JournalEntry, name: &str| e.signals.as_ref().and_then(|s| s.get(name));
    let start = by(&|e| signal(e, "subject_start").map(|v| if v > 0.5 { "yes".into() } else { "no".into() }));
    let start: Vec<String> = start.iter().map(|(k, (c, n))| format!("{k} {}", rate(*c, *n))).collect();
    let _ = writeln!(out, "  subject opens the prompt   {}", start.join(" · "));
    let tokens = by(&|e| signal(e, "subject_tokens").map(|v| if v >= 4.0 { "4+".into() } else { format!("{v:.0}") }));
    let tokens: Vec<String> = tokens.iter().map(|(k, (c, n))| format!("{k}: {}", rate(*c, *n))).collect();
    let _ = writeln!(out, "  subject tokens             {}", tokens.join(" · "));
    let relations = by(&|e| Some(e.prompt.clone()));
    let mut relations: Vec<(&String, &(usize, usize))> = relations.iter().filter(|(_, (c, _))| *c > 0).collect();
    relations.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
    let _ = writeln!(out, "  relation (prompt template), those with collapses, most first:");
    for (template, (c, n)) in relations.iter().take(12) {
        let _ = writeln!(out, "    {:<40} {}", format!("\"{template}\""), rate(*c, *n));
    }
    if relations.len() > 12 {
        let _ = writeln!(out, "    … and {} more templates with collapses", relations.len() - 12);
    }
    out
}

/// True when `entry` was edited and its edit collapsed the model (a record the screen skipped counts as held).
fn collapsed(entry: &JournalEntry) -> bool {
    entry.measured.as_ref().is_some_and(|m| m.collapsed)
}

/// The text summary of a journal's entries; `rule` is the screen rule to evaluate, if any.
pub fn summary(settings: &MineSettings, entries: &[JournalEntry], rule: Option<&ScreenRule>) -> String {
    let mut out = String::new();
    let all_edited: Vec<&JournalEntry> = entries.iter().filter(|e| e.status == EntryStatus::Edited).collect();
    let measured = |e: &&JournalEntry| e.measured.clone().expect("edited entries are measured");
    let with_rule =
        |prefix: &str| all_edited.iter().filter(|e| e.rule.as_deref().is_some_and(|r| r.starts_with(prefix))).count();
    // Rates, distributions and features are measured on the records edited without a screen: a random sample.
    let random_sample: Vec<&JournalEntry> = all_edited.iter().copied().filter(|e| e.rule.is_none()).collect();
    let edited: Vec<&JournalEntry> = if random_sample.is_empty() { all_edited.clone() } else { random_sample };
    let count = |status| entries.iter().filter(|e| e.status == status).count();
    let bound = (settings.thresholds.collapse_ratio * settings.baseline_ppl).min(settings.thresholds.collapse_ppl);
    let _ = writeln!(
        out,
        "mine        {} · {} · {} ({}) · {} baseline {:.2}, collapse bound {:.2}",
        settings.model,
        settings.method,
        settings.dataset,
        settings.selection,
        settings.corpus,
        settings.baseline_ppl,
        bound
    );
    let _ = writeln!(
        out,
        "records     {}: edited {} (unscreened {}, kept by the screen {}, audited {}), skipped by the screen {}, failed {}",
        entries.len(),
        all_edited.len(),
        all_edited.len() - with_rule("kept:") - with_rule("audit:"),
        with_rule("kept:"),
        with_rule("audit:"),
        count(EntryStatus::Skipped),
        count(EntryStatus::Failed)
    );
    let found = all_edited.iter().filter(|e| collapsed(e)).count();
    let collapses = edited.iter().filter(|e| collapsed(e)).count();
    let (low, high) = wilson_interval(collapses, edited.len());
    let sample = if edited.len() == all_edited.len() { "edited" } else { "edited without a screen (a random sample)" };
    let _ = writeln!(
        out,
        "collapses   {found} found; rate {collapses} of {} {sample} = {:.2}% (95% CI {:.2}–{:.2}%)",
        edited.len(),
        100.0 * collapses as f64 / edited.len().max(1) as f64,
        100.0 * low,
        100.0 * high
    );
    let non_finite = all_edited.iter().filter(|e| measured(e).non_finite).count();
    if non_finite > 0 {
        let _ = writeln!(
            out,
            "non-finite  {non_finite} edits gave NaN/inf metrics (not collapses: the harness fails them)"
        );
    }
    let seconds: f64 = entries.iter().map(|e| e.seconds).sum();
    let edit_seconds: f64 = all_edited.iter().map(|e| e.seconds).sum();
    let screen_seconds: f64 = entries.iter().map(|e| e.screen_seconds).sum();
    let _ = writeln!(
        out,
        "time        {:.2} h in all; {:.1} s per edited record; screen {:.3} s per record",
        seconds / 3600.0,
        edit_seconds / all_edited.len().max(1) as f64,
        screen_seconds / entries.len().max(1) as f64
    );
    if edited.is_empty() {
        return out;
    }
    let ratios = sorted(edited.iter().map(|e| measured(e).ratio));
    let _ = writeln!(
        out,
        "ratio       p50 {:.3} · p90 {:.3} · p99 {:.3} · max {:.3}",
        quantile(&ratios, 0.5),
        quantile(&ratios, 0.9),
        quantile(&ratios, 0.99),
        ratios.last().copied().unwrap_or(f64::NAN)
    );
    let edges = [1.05, 1.2, 1.5, 2.0, 5.0, 10.0];
    let mut bins = vec![0usize; edges.len() + 1];
    for r in &ratios {
        bins[edges.iter().position(|e| r < e).unwrap_or(edges.len())] += 1;
    }
    let labels = ["<1.05", "1.05–1.2", "1.2–1.5", "1.5–2", "2–5", "5–10", "≥10"];
    let histogram: Vec<String> = labels.iter().zip(&bins).map(|(l, n)| format!("{l}: {n}")).collect();
    let _ = writeln!(out, "            {}", histogram.join(" · "));
    for (label, group) in [("collapses", true), ("holds", false)] {
        let norms = sorted(edited.iter().filter(|e| collapsed(e) == group).map(|e| measured(e).relative_norm));
        if !norms.is_empty() {
            let _ = writeln!(
                out,
                "‖ΔW‖/‖W‖    {label:<9} p10 {:.3} · p50 {:.3} · p90 {:.3} (n = {})",
                quantile(&norms, 0.1),
                quantile(&norms, 0.5),
                quantile(&norms, 0.9),
                norms.len()
            );
        }
    }
    let _ = writeln!(out, "\nfeatures (collapse rate among the records edited without a screen):");
    out.push_str(&feature_lines(&edited, &collapsed));
    let screened: Vec<&JournalEntry> = entries.iter().filter(|e| e.status != EntryStatus::Failed).collect();
    if screened.len() > edited.len() {
        let _ = writeln!(
            out,
            "features over all {} records, those the screen skipped counted as held (see the audit below):",
            screened.len()
        );
        out.push_str(&feature_lines(&screened, &collapsed));
    }
    let signal = |e: &JournalEntry, name: &str| e.signals.as_ref().and_then(|s| s.get(name));
    let names: std::collections::BTreeSet<String> =
        edited.iter().filter_map(|e| e.signals.as_ref()).flat_map(|s| s.0.keys().cloned()).collect();
    if !names.is_empty() && collapses > 0 {
        let _ = writeln!(
            out,
            "\nscreen signals (computed before the edit): AUC collapse vs hold; median collapse | hold; threshold keeping 90% / 100% of the collapses → share of records skipped"
        );
        let owned: Vec<JournalEntry> = edited.iter().map(|e| (*e).clone()).collect();
        for name in &names {
            let values = |group: bool| -> Vec<f64> {
                edited.iter().filter(|e| collapsed(e) == group).filter_map(|e| signal(e, name)).collect()
            };
            let (positives, negatives) = (values(true), values(false));
            let Some(area) = auc(&positives, &negatives) else { continue };
            let median = |v: &[f64]| quantile(&sorted(v.iter().copied()), 0.5);
            if area < 0.5 {
                // Low values go with collapse: a `signal >= min` rule cannot use it.
                let _ = writeln!(
                    out,
                    "  {name:<16} AUC {:.3}↓  {:.4} | {:.4}   (lower values go with collapse)",
                    1.0 - area,
                    median(&positives),
                    median(&negatives)
                );
                continue;
            }
            let skip_share = |threshold: Option<f64>| match threshold {
                Some(t) => {
                    let rule = ScreenRule { signal: name.clone(), min: t, measured: String::new() };
                    let e = evaluate(&rule, &owned);
                    format!("{t:.4} → {:.0}%", 100.0 * e.skipped as f64 / e.records.max(1) as f64)
                }
                None => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {name:<16} AUC {area:.3}↑  {:.4} | {:.4}   90%: {}   100%: {}",
                median(&positives),
                median(&negatives),
                skip_share(calibrate(name, 0.9, &owned)),
                skip_share(calibrate(name, 1.0, &owned)),
            );
        }
    }
    if let Some(rule) = rule {
        let e = evaluate(rule, &unscreened(entries));
        let _ = writeln!(
            out,
            "\nscreen {} on the {} fully edited records: keeps {}/{} collapses (recall {:.1}%), skips {:.1}% of records, \
             time {:.1}% of the full mine",
            e.rule,
            e.records,
            e.kept_collapses,
            e.collapses,
            100.0 * e.recall(),
            100.0 * e.skipped as f64 / e.records.max(1) as f64,
            100.0 * e.time_share()
        );
    }
    let audited: Vec<&&JournalEntry> =
        all_edited.iter().filter(|e| e.rule.as_deref().is_some_and(|r| r.starts_with("audit:"))).collect();
    if !audited.is_empty() {
        let missed = audited.iter().filter(|e| collapsed(e)).count();
        let _ = writeln!(
            out,
            "audit       {} records the screen skipped were edited anyway: {missed} collapsed (what the screen missed)",
            audited.len()
        );
    }
    let skipped: Vec<&JournalEntry> = entries.iter().filter(|e| e.status == EntryStatus::Skipped).collect();
    if !skipped.is_empty() {
        let mut rules: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &skipped {
            *rules.entry(e.rule.as_deref().unwrap_or("?")).or_default() += 1;
        }
        let rules: Vec<String> = rules.iter().map(|(r, n)| format!("{n} by `{r}`")).collect();
        let _ = writeln!(out, "skipped     {} (not edited, so their outcome is unknown)", rules.join(", "));
    }
    out
}

/// Writes the scatter of ‖ΔW‖/‖W‖ (x, log) against the perplexity ratio (y, log) of the edited records, collapses
/// in red, with the collapse bound drawn.
pub fn write_scatter(settings: &MineSettings, entries: &[JournalEntry], path: &Path) -> Result<()> {
    let points: Vec<(f64, f64, bool)> = entries
        .iter()
        .filter_map(|e| e.measured.as_ref())
        .filter(|m| m.relative_norm > 0.0 && m.ratio.is_finite() && m.ratio > 0.0)
        .map(|m| (m.relative_norm.log10(), m.ratio.log10(), m.collapsed))
        .collect();
    if points.is_empty() {
        return Err(Error::invalid(path.display().to_string(), "(plot)", "no edited record to plot"));
    }
    let bound = (settings.thresholds.collapse_ratio * settings.baseline_ppl).min(settings.thresholds.collapse_ppl)
        / settings.baseline_ppl;
    let range = |pick: fn(&(f64, f64, bool)) -> f64, extra: f64| {
        let (low, high) = points.iter().map(pick).fold((extra, extra), |(l, h), v| (l.min(v), h.max(v)));
        let pad = ((high - low) * 0.05).max(0.05);
        (low - pad)..(high + pad)
    };
    let (x_range, y_range) = (range(|p| p.0, points[0].0), range(|p| p.1, bound.log10()));
    let collapses = points.iter().filter(|p| p.2).count();
    write_svg(path, (900, 600), |root| {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let caption = format!(
            "{} · {}: {} single edits of {}, {} collapses",
            settings.model,
            settings.method,
            points.len(),
            settings.dataset,
            collapses
        );
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), y_range.clone())
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("log10 ‖ΔW‖/‖W‖")
            .y_desc(format!("log10 {} perplexity / baseline", settings.corpus))
            .draw()
            .map_err(|x| e(&x))?;
        let line = vec![(x_range.start, bound.log10()), (x_range.end, bound.log10())];
        chart
            .draw_series(LineSeries::new(line, BLACK.stroke_width(1)))
            .map_err(|x| e(&x))?
            .label(format!("collapse bound ({bound:.2}× baseline)"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(1)));
        for (label, group, colour) in [("held", false, COLOURS[0]), ("collapsed", true, COLOURS[3])] {
            let series = points.iter().filter(|p| p.2 == group).map(|p| Circle::new((p.0, p.1), 3, colour.filled()));
            chart
                .draw_series(series)
                .map_err(|x| e(&x))?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, colour.filled()));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_and_wilson_match_hand_values() {
        assert_eq!(auc(&[3.0, 4.0], &[1.0, 2.0]), Some(1.0));
        assert_eq!(auc(&[1.0], &[1.0]), Some(0.5));
        assert_eq!(auc(&[2.0], &[1.0, 3.0]), Some(0.5));
        assert_eq!(auc(&[], &[1.0]), None);
        // statsmodels proportion_confint(5, 100, method="wilson") = (0.02154, 0.11175)
        let (low, high) = wilson_interval(5, 100);
        assert!((low - 0.02154).abs() < 1e-4 && (high - 0.11175).abs() < 1e-4, "{low} {high}");
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
    }
}
