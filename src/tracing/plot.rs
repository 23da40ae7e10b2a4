//! The plots of a causal trace (SVG): average indirect effect against the centre layer over a sample (the paper's
//! Figure 2 curves), and one prompt's heat map of p(restored) per token and layer (its Figure 1).

use std::path::Path;

use plotters::prelude::*;

use super::average::{Category, SampleReport};
use super::{Kind, PromptTrace};
use crate::error::{Error, Result};
use crate::plotting::{COLOURS, draw_legend, write_svg};

/// The reference's colours: purple for hidden states, green for MLP outputs.
fn colour(kind: Kind) -> RGBColor {
    match kind {
        Kind::Hidden => COLOURS[4],
        Kind::Mlp => COLOURS[2],
    }
}

/// Average indirect effect against the centre layer: a solid line per kind at the subject's last token, a dashed
/// one at the prompt's last token.
pub fn write_average_svg(report: &SampleReport, path: &Path) -> Result<()> {
    let mut lines = Vec::new();
    for average in &report.kinds {
        for (category, dashed) in [(Category::LastSubject, false), (Category::LastToken, true)] {
            if let Some(curve) = average.curve(category) {
                let label = format!("{} (window {}), {}", average.kind.name(), average.window, category.label());
                lines.push((average.kind, dashed, label, curve.effect.clone()));
            }
        }
    }
    if lines.is_empty() {
        return Err(Error::invalid(path.display().to_string(), "(plot)", "no curve to draw"));
    }
    let values = lines.iter().flat_map(|l| l.3.iter().copied()).filter(|v| v.is_finite());
    let (low, high) = values.fold((0f64, 0f64), |(l, h), v| (l.min(v), h.max(v)));
    let pad = ((high - low) * 0.08).max(1e-3);
    let x_max = report.layers.saturating_sub(1).max(1) as f64;
    write_svg(path, (900, 560), |root| {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let caption = format!(
            "{}: average indirect effect over {} known facts ({} noise samples)",
            report.model, report.kept, report.settings.noise_samples
        );
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_max, (low - pad)..(high + pad))
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("centre layer of the restored window")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("p(restored) − p(corrupted)")
            .draw()
            .map_err(|x| e(&x))?;
        for (kind, dashed, label, effect) in lines {
            let points: Vec<(f64, f64)> = effect.iter().enumerate().map(|(l, &v)| (l as f64, v)).collect();
            let style = colour(kind).stroke_width(if dashed { 1 } else { 2 });
            let drawn = if dashed {
                chart.draw_series(DashedLineSeries::new(points.clone(), 6, 4, style)).map_err(|x| e(&x))?
            } else {
                chart.draw_series(LineSeries::new(points.clone(), style)).map_err(|x| e(&x))?
            };
            drawn.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            if !dashed {
                chart
                    .draw_series(points.into_iter().map(|p| Circle::new(p, 3, colour(kind).filled())))
                    .map_err(|x| e(&x))?;
            }
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

/// One heat map per kind: p(restored) for every traced token (rows, subject tokens starred) and centre layer
/// (columns), white at p(corrupted) and the kind's colour at the panel's largest value.
pub fn write_heatmap_svg(trace: &PromptTrace, path: &Path) -> Result<()> {
    if trace.kinds.is_empty() || trace.positions.is_empty() {
        return Err(Error::invalid(path.display().to_string(), "(plot)", "nothing was traced"));
    }
    let rows = trace.positions.len();
    let layers = trace.kinds[0].p_restored[0].len();
    let labels: Vec<String> = trace
        .positions
        .iter()
        .map(|&p| {
            let star = if (trace.prompt.subject_first..trace.prompt.subject_end).contains(&p) { "*" } else { "" };
            format!("{}{star}", trace.tokens[p].replace('\n', "\\n"))
        })
        .collect();
    let panel_height = 60 + 26 * rows as u32;
    let height = 40 + panel_height * trace.kinds.len() as u32;
    write_svg(path, (900, height), |root| {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let title = format!(
            "p({}) after \"{}\": clean {:.3}, corrupted {:.3}",
            trace.target.trim(),
            trace.prompt.template.replacen("{}", &trace.prompt.subject, 1),
            trace.p_clean,
            trace.p_corrupted
        );
        let root = root.titled(&title, ("sans-serif", 18)).map_err(|x| e(&x))?;
        let panels = root.split_evenly((trace.kinds.len(), 1));
        for (panel, kind) in panels.iter().zip(&trace.kinds) {
            let top = kind.p_restored.iter().flatten().copied().fold(trace.p_corrupted, f64::max);
            let span = (top - trace.p_corrupted).max(1e-9);
            let caption = format!("restoring {} (window {})", kind.kind.name(), kind.window);
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(150)
                .build_cartesian_2d(0f64..layers as f64, 0f64..rows as f64)
                .map_err(|x| e(&x))?;
            let labels = labels.clone();
            chart
                .configure_mesh()
                .disable_mesh()
                .y_labels(rows * 2 + 1)
                .y_label_formatter(&move |y| {
                    let half = y - y.floor();
                    let row = rows as f64 - y.floor() - 1.0;
                    if (half - 0.5).abs() < 1e-6 && row >= 0.0 { labels[row as usize].clone() } else { String::new() }
                })
                .x_labels(layers.min(16))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .x_desc("centre layer")
                .draw()
                .map_err(|x| e(&x))?;
            let base = colour(kind.kind);
            let cells = kind.p_restored.iter().enumerate().flat_map(|(row, values)| {
                values.iter().enumerate().map(move |(layer, &p)| {
                    let share = ((p - trace.p_corrupted) / span).clamp(0.0, 1.0);
                    let mix = |c: u8| (255.0 - share * (255.0 - f64::from(c))) as u8;
                    let fill = RGBColor(mix(base.0), mix(base.1), mix(base.2));
                    let y = (rows - 1 - row) as f64;
                    Rectangle::new([(layer as f64, y), (layer as f64 + 1.0, y + 1.0)], fill.filled())
                })
            });
            chart.draw_series(cells).map_err(|x| e(&x))?;
        }
        Ok(())
    })
}
