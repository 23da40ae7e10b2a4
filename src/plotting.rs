//! Shared pieces of the SVG plots (plotters): the colour cycle and an atomic write of a drawing.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// The colour cycle of every plot (matplotlib's tab10 start).
pub const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The drawing area a plot draws on.
pub type Canvas<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws an SVG of `size` with `draw` into a temporary file beside `path` and renames it into place, so a reader
/// never sees half a plot. Drawing errors are reported naming the file.
pub fn write_svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Canvas) -> std::result::Result<(), String>,
) -> Result<()> {
    let failed = |message: String| Error::invalid(path.display().to_string(), "(plot)", message);
    let temporary = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&temporary, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(e.to_string()))?;
        draw(&root).map_err(failed)?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    std::fs::rename(&temporary, path).map_err(|e| Error::io(path, e))
}

/// A chart with two f64 axes, as every plot here draws.
pub type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws the series labels of `chart` at `position` on a translucent white box.
pub fn draw_legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
) -> std::result::Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}
