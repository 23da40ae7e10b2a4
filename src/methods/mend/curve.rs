//! MEND's learning curve as an SVG: validation and training edit loss and locality loss (log scale, left) and
//! validation accuracy and efficacy (right), against training steps.

use std::path::Path;

use plotters::prelude::*;

use super::train::{CurvePoint, TrainingReport};

/// A named series of the curve.
type Series = (&'static str, fn(&CurvePoint) -> f64);
use crate::error::{Error, Result};
use crate::plotting::{COLOURS, draw_legend, write_svg};

/// Writes the curve of `report` to `path`.
pub fn write_curve_svg(model: &str, report: &TrainingReport, path: &Path) -> Result<()> {
    if report.curve.is_empty() {
        return Err(Error::invalid(
            path.display().to_string(),
            "(plot)",
            "the training report has no validation point",
        ));
    }
    let steps = report.curve.last().map(|p| p.step).unwrap_or(1).max(1) as f64;
    let losses: Vec<f64> = report
        .curve
        .iter()
        .flat_map(|p| [p.train_edit, p.train_loc, p.val_edit, p.val_loc])
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(f64::log10)
        .collect();
    let (low, high) = losses.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(*v), h.max(*v)));
    let (low, high) = if low.is_finite() { (low - 0.2, high + 0.2) } else { (-3.0, 1.0) };
    write_svg(path, (1100, 480), |root| {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let (left, right) = root.split_horizontally(560);
        let mut chart = ChartBuilder::on(&left)
            .caption(format!("{model}: MEND losses"), ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..steps, low..high)
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("training edits").y_desc("log10 loss").draw().map_err(|x| e(&x))?;
        let series: [Series; 4] = [
            ("train L_edit", |p| p.train_edit),
            ("val L_edit", |p| p.val_edit),
            ("train L_loc", |p| p.train_loc),
            ("val L_loc", |p| p.val_loc),
        ];
        for (i, (label, pick)) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<(f64, f64)> = report
                .curve
                .iter()
                .filter(|p| pick(p) > 0.0 && pick(p).is_finite())
                .map(|p| (p.step as f64, pick(p).log10()))
                .collect();
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        let mut chart = ChartBuilder::on(&right)
            .caption("validation edits", ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..steps, 0f64..1f64)
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("training edits").y_desc("share of held-out edits").draw().map_err(|x| e(&x))?;
        let shares: [Series; 2] = [
            ("accuracy (paraphrase predicts the target)", |p| p.val_accuracy),
            ("efficacy (new > old)", |p| p.val_efficacy),
        ];
        for (i, (label, pick)) in shares.iter().enumerate() {
            let colour = COLOURS[(i + 4) % COLOURS.len()];
            let points: Vec<(f64, f64)> = report.curve.iter().map(|p| (p.step as f64, pick(p))).collect();
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    })
}
