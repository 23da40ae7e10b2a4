//! The correlation plot: each task's score against log₁₀ of the ME-PPL_50 perplexity, one line per task (SVG).

use std::path::Path;

use plotters::prelude::*;

use super::CorrelationReport;
use crate::error::{Error, Result};
use crate::plotting::{COLOURS, draw_legend, write_svg as render};

/// Writes the plot of `report` to `path` as SVG (written to a temporary file first, then renamed into place).
pub fn write_svg(report: &CorrelationReport, path: &Path) -> Result<()> {
    if report.points.is_empty() {
        return Err(Error::invalid(path.display().to_string(), "(plot)", "no checkpoint was measured"));
    }
    let x: Vec<f64> = report.points.iter().map(|p| p.mean_ppl.log10()).collect();
    let (low, high) = x.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(*v), h.max(*v)));
    let pad = ((high - low) * 0.05).max(0.05);
    render(path, (900, 560), |root| {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let caption = format!("{}: task scores vs perplexity ({} edits)", report.model, report.method);
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(low - pad..high + pad, 0f64..1f64)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("log10 ME-PPL_50 mean perplexity")
            .y_desc("task score")
            .draw()
            .map_err(|x| e(&x))?;
        for (t, ((task, metric), rho)) in report.tasks.iter().zip(&report.spearman).enumerate() {
            let colour = COLOURS[t % COLOURS.len()];
            let series: Vec<(f64, f64)> = x.iter().zip(&report.points).map(|(x, p)| (*x, p.scores[t])).collect();
            let label = match rho {
                Some(rho) => format!("{task} {metric} (ρ = {rho:.2})"),
                None => format!("{task} {metric} (ρ undefined)"),
            };
            chart
                .draw_series(LineSeries::new(series.clone(), colour.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            chart
                .draw_series(series.into_iter().map(|point| Circle::new(point, 4, colour.filled())))
                .map_err(|x| e(&x))?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        Ok(())
    })
}
