//! Perplexity curves of kept-edit tests, read from their accepted snapshots and drawn as one SVG panel per suite with
//! one line per method (`editguard plot`) — the Butterfly-effect paper's Figure 4 (hard vs normal cases) when the two
//! suites are the mined hard cases and normal records.
//!
//! Nothing is re-run: every sequential and batch-sequential test of a suite records its checkpoints (edits applied,
//! mean perplexity) in its snapshot. A test without an accepted snapshot is an error naming the command that makes it.

use std::path::Path;

use plotters::prelude::*;

use crate::cases::Suite;
use crate::error::{Error, Result};
use crate::plotting::{COLOURS, draw_legend, write_svg};

use super::context::HarnessContext;
use super::execute::EditRecord;
use super::trial::{TrialKind, plan};

/// One test's curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Suite name.
    pub suite: String,
    /// Method name.
    pub method: String,
    /// Model id.
    pub model: String,
    /// (edits applied, mean perplexity) at each checkpoint, starting with (0, baseline).
    pub points: Vec<(usize, f64)>,
    /// The measured outcome line.
    pub outcome: String,
}

/// The curves of every edit test of the named suites (which must keep their edits).
pub fn curves(context: &HarnessContext, suites: &[String]) -> Result<Vec<Curve>> {
    let mut out = Vec::new();
    for name in suites {
        let index = context.suites.iter().position(|s| &s.name == name).ok_or_else(|| {
            let known: Vec<&str> = context.suites.iter().map(|s| s.name.as_str()).collect();
            Error::invalid("--suites", name, format!("no such suite (known: {})", known.join(", ")))
        })?;
        let suite: &Suite = &context.suites[index];
        if !suite.setting.keeps_edits() {
            return Err(Error::invalid(
                suite.path.display().to_string(),
                "setting",
                "a curve needs a sequential or batch-sequential suite",
            ));
        }
        for spec in plan(&context.suites) {
            let TrialKind::Edit { suite: s, method, model, .. } = &spec.kind else { continue };
            if *s != index {
                continue;
            }
            let record: EditRecord = context.snapshots.accepted(&spec.snapshot_name())?.ok_or_else(|| {
                Error::invalid(
                    &spec.name,
                    "snapshot",
                    format!(
                        "no accepted snapshot yet; run `INSTA_UPDATE=always EDITGUARD_TIER=heavy cargo test --release \
                         --test harness -- --exact '{}'` first",
                        spec.name
                    ),
                )
            })?;
            let mut points = vec![(0, record.baseline_ppl)];
            points.extend(record.checkpoints.iter().map(|c| (c.edits, c.mean_ppl)));
            out.push(Curve {
                suite: suite.name.clone(),
                method: method.clone(),
                model: model.clone(),
                points,
                outcome: record.outcome,
            });
        }
    }
    Ok(out)
}

/// Decades above the collapse bound where the perplexity axis stops.
const CLIP_DECADES: f64 = 4.0;

/// Draws `curves` to `path`: one panel per suite (in order of appearance), log₁₀ perplexity against edits, one colour
/// per method (the same in every panel), and the collapse bound `bound` (absolute perplexity) as a dashed line.
pub fn write_curves_svg(curves: &[Curve], bound: f64, path: &Path) -> Result<()> {
    if curves.is_empty() {
        return Err(Error::invalid(path.display().to_string(), "(plot)", "no curve to draw"));
    }
    let mut panels: Vec<&str> = Vec::new();
    let mut methods: Vec<&str> = Vec::new();
    for c in curves {
        if !panels.contains(&c.suite.as_str()) {
            panels.push(&c.suite);
        }
        if !methods.contains(&c.method.as_str()) {
            methods.push(&c.method);
        }
    }
    let values = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).filter(|v| v.is_finite() && *v > 0.0);
    let (low, high) = values.fold((bound.log10(), bound.log10()), |(l, h), v| (l.min(v.log10()), h.max(v.log10())));
    // A collapsed model's perplexity can reach 10^100 and more, which would flatten every other curve: the axis stops
    // CLIP_DECADES above the collapse bound and higher values are drawn on its top edge as triangles.
    let ceiling = bound.log10() + CLIP_DECADES;
    let clipped = high > ceiling;
    let high = high.min(ceiling);
    let y_range = (low - 0.1)..(high + 0.1);
    let max_edits = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).max().unwrap_or(1).max(1);
    let width = 560 * panels.len() as u32;
    write_svg(path, (width, 520), |root| {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let areas = root.split_evenly((1, panels.len()));
        for (area, panel) in areas.iter().zip(&panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(*panel, ("sans-serif", 18))
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(0f64..max_edits as f64, y_range.clone())
                .map_err(|x| e(&x))?;
            chart
                .configure_mesh()
                .x_desc("edits applied (kept)")
                .y_desc(if clipped {
                    format!("log10 mean perplexity (▲: above 10^{ceiling:.1}, drawn at the top)")
                } else {
                    "log10 mean perplexity".to_string()
                })
                .draw()
                .map_err(|x| e(&x))?;
            let line = vec![(0.0, bound.log10()), (max_edits as f64, bound.log10())];
            chart
                .draw_series(DashedLineSeries::new(line, 6, 4, BLACK.stroke_width(1)))
                .map_err(|x| e(&x))?
                .label(format!("collapse bound {bound:.0}"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(1)));
            for curve in curves.iter().filter(|c| c.suite == *panel) {
                let colour = COLOURS[methods.iter().position(|m| *m == curve.method).unwrap_or(0) % COLOURS.len()];
                let series: Vec<(f64, f64)> = curve
                    .points
                    .iter()
                    .filter(|p| p.1.is_finite() && p.1 > 0.0)
                    .map(|p| (p.0 as f64, p.1.log10()))
                    .collect();
                let shown: Vec<(f64, f64)> = series.iter().map(|&(x, y)| (x, y.min(ceiling))).collect();
                chart
                    .draw_series(LineSeries::new(shown.clone(), colour.stroke_width(2)))
                    .map_err(|x| e(&x))?
                    .label(curve.method.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
                let (over, under): (Vec<_>, Vec<_>) = shown.into_iter().partition(|p| p.1 >= ceiling);
                chart.draw_series(under.into_iter().map(|p| Circle::new(p, 3, colour.filled()))).map_err(|x| e(&x))?;
                chart
                    .draw_series(over.into_iter().map(|p| TriangleMarker::new(p, 5, colour.filled())))
                    .map_err(|x| e(&x))?;
            }
            draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_draw_to_an_svg_with_one_panel_per_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.svg");
        let curve = |suite: &str, method: &str, last: f64| Curve {
            suite: suite.into(),
            method: method.into(),
            model: "m".into(),
            points: vec![(0, 167.0), (5, 170.0), (10, last)],
            outcome: "held".into(),
        };
        let all = [curve("hard", "rome", 5e4), curve("hard", "memit", 200.0), curve("normal", "rome", 180.0)];
        write_curves_svg(&all, 334.6, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("hard") && svg.contains("normal") && svg.contains("memit"), "{}", &svg[..200]);
        assert!(write_curves_svg(&[], 334.6, &path).is_err());
    }
}
