//! Plots of `precond analyze`: line plots with optional log axes and heatmaps, each written as
//! `<stem>.png` and `<stem>.svg` with the bundled font (see [`crate::commands::report`]).

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::AnalyzeError;
use crate::commands::report::{register_font, COLORS, FONT};

/// Pixel size of a line plot.
const LINE_SIZE: (u32, u32) = (1000, 640);

/// One curve.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// A reference curve (for example √T): drawn dashed in black.
    pub reference: bool,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            label: label.into(),
            points,
            reference: false,
        }
    }

    pub fn reference(label: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            reference: true,
            ..Series::new(label, points)
        }
    }
}

/// A line plot. On a log axis, points with a coordinate ≤ 0 or non-finite are left out.
#[derive(Debug, Clone)]
pub struct LinePlot<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    pub series: &'a [Series],
}

/// One panel of a heatmap figure: a `rows × cols` row-major matrix.
#[derive(Debug, Clone)]
pub struct Heatmap<'a> {
    pub title: &'a str,
    pub rows: usize,
    pub cols: usize,
    pub values: &'a [f64],
}

fn plot_err(path: &Path) -> impl Fn(String) -> AnalyzeError + '_ {
    move |msg| AnalyzeError::Plot {
        path: path.to_path_buf(),
        msg,
    }
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut name = stem.as_os_str().to_os_string();
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
}

/// Draws `plot` into `<stem>.png` and `<stem>.svg`.
pub fn lines(stem: &Path, plot: &LinePlot) -> Result<(), AnalyzeError> {
    register_font();
    let series: Vec<Series> = plot
        .series
        .iter()
        .map(|s| Series {
            points: s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| {
                    x.is_finite()
                        && y.is_finite()
                        && (!plot.log_x || x > 0.0)
                        && (!plot.log_y || y > 0.0)
                })
                .collect(),
            ..s.clone()
        })
        .collect();
    let plot = LinePlot {
        series: &series,
        ..plot.clone()
    };
    let png = with_ext(stem, "png");
    draw_lines(
        BitMapBackend::new(&png, LINE_SIZE).into_drawing_area(),
        &plot,
    )
    .map_err(plot_err(&png))?;
    let svg = with_ext(stem, "svg");
    draw_lines(SVGBackend::new(&svg, LINE_SIZE).into_drawing_area(), &plot).map_err(plot_err(&svg))
}

/// `lo..hi` of `values`, padded: by 5% of the span on a linear axis, by a factor 1.25 on a log
/// axis (0..1, or 0.1..10 on a log axis, when there are none).
fn axis_range(values: impl Iterator<Item = f64>, log: bool) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    match (lo <= hi, log) {
        (false, false) => 0.0..1.0,
        (false, true) => 0.1..10.0,
        (true, false) => {
            let pad = if hi > lo { 0.05 * (hi - lo) } else { 1.0 };
            lo - pad..hi + pad
        }
        (true, true) => lo / 1.25..hi * 1.25,
    }
}

/// A tick label: plain for moderate magnitudes, scientific otherwise.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-2..1e5).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    plot: &LinePlot,
) -> Result<(), String> {
    let all = || plot.series.iter().flat_map(|s| s.points.iter().copied());
    let x = axis_range(all().map(|p| p.0), plot.log_x);
    let y = axis_range(all().map(|p| p.1), plot.log_y);
    match (plot.log_x, plot.log_y) {
        (false, false) => draw_lines_in(root, plot, x, y),
        (true, false) => draw_lines_in(root, plot, x.log_scale(), y),
        (false, true) => draw_lines_in(root, plot, x, y.log_scale()),
        (true, true) => draw_lines_in(root, plot, x.log_scale(), y.log_scale()),
    }
}

fn draw_lines_in<DB, X, Y>(
    root: DrawingArea<DB, Shift>,
    plot: &LinePlot,
    x: X,
    y: Y,
) -> Result<(), String>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(plot.title, (FONT, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(plot.x_desc)
        .y_desc(plot.y_desc)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(err)?;
    let mut color_at = 0;
    for s in plot.series {
        if s.points.is_empty() {
            continue;
        }
        let pts = s.points.iter().copied();
        let anno = if s.reference {
            let style = BLACK.stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(pts, 6, 4, style))
                .map_err(err)?
        } else {
            let color = COLORS[color_at % COLORS.len()];
            color_at += 1;
            // A single point draws no line: mark it.
            if s.points.len() == 1 {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(err)?;
            }
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
        };
        let color = if s.reference {
            BLACK
        } else {
            COLORS[(color_at + COLORS.len() - 1) % COLORS.len()]
        };
        anno.label(s.label.as_str()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// The color of `t` ∈ [0, 1] on a white → dark-blue ramp (through light blue).
fn ramp(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let stops = [
        (255.0, 255.0, 255.0),
        (107.0, 174.0, 214.0),
        (8.0, 48.0, 107.0),
    ];
    let (a, b, u) = if t < 0.5 {
        (stops[0], stops[1], t * 2.0)
    } else {
        (stops[1], stops[2], t * 2.0 - 1.0)
    };
    let mix = |p: f64, q: f64| (p + (q - p) * u).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// How a heatmap maps |value| to a shade in [0, 1], relative to the panel's largest magnitude.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorScale {
    /// |v| / max: white at 0, darkest at the largest magnitude.
    Linear,
    /// log10(|v| / max) over this many decades: |v| ≤ max·10^-decades is white.
    Log { decades: f64 },
}

impl ColorScale {
    /// The scale in words, for titles and JSON.
    pub fn describe(self) -> String {
        match self {
            ColorScale::Linear => "linear color scale from 0".to_string(),
            ColorScale::Log { decades } => format!("log color scale over {decades} decades"),
        }
    }
}

/// The shade of |v| relative to `max` on `scale` (0: white, also for zero, non-finite or a
/// non-positive `max`).
pub fn shade(v: f64, max: f64, scale: ColorScale) -> f64 {
    if max <= 0.0 || !v.is_finite() || v == 0.0 {
        return 0.0;
    }
    let ratio = v.abs() / max;
    match scale {
        ColorScale::Linear => ratio.clamp(0.0, 1.0),
        ColorScale::Log { decades } => (ratio.log10() / decades + 1.0).clamp(0.0, 1.0),
    }
}

/// Draws the panels side by side into `<stem>.png` and `<stem>.svg`: |value| on `scale`
/// relative to each panel's largest magnitude (white: zero). Row 0 is at the top.
pub fn heatmaps(
    stem: &Path,
    title: &str,
    panels: &[Heatmap],
    scale: ColorScale,
) -> Result<(), AnalyzeError> {
    register_font();
    for p in panels {
        if p.values.len() != p.rows * p.cols {
            return Err(AnalyzeError::Invalid(format!(
                "heatmap {:?}: {} values for {}×{}",
                p.title,
                p.values.len(),
                p.rows,
                p.cols
            )));
        }
    }
    let size = (560 * panels.len().max(1) as u32, 620);
    let png = with_ext(stem, "png");
    draw_heatmaps(
        BitMapBackend::new(&png, size).into_drawing_area(),
        title,
        panels,
        scale,
    )
    .map_err(plot_err(&png))?;
    let svg = with_ext(stem, "svg");
    draw_heatmaps(
        SVGBackend::new(&svg, size).into_drawing_area(),
        title,
        panels,
        scale,
    )
    .map_err(plot_err(&svg))
}

fn draw_heatmaps<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    panels: &[Heatmap],
    scale: ColorScale,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, (FONT, 22)).map_err(err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, p) in areas.into_iter().zip(panels) {
        let mut chart = ChartBuilder::on(&area)
            .caption(p.title, (FONT, 17))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(44)
            .build_cartesian_2d(0..p.cols, p.rows..0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .label_style((FONT, 13))
            .draw()
            .map_err(err)?;
        let max = p.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        chart
            .draw_series((0..p.rows).flat_map(|r| {
                (0..p.cols).map(move |c| {
                    let color = ramp(shade(p.values[r * p.cols + c], max, scale));
                    Rectangle::new([(c, r), (c + 1, r + 1)], color.filled())
                })
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shade_on_log_and_linear_scales() {
        let log = ColorScale::Log { decades: 4.0 };
        assert_eq!(shade(2.0, 2.0, log), 1.0);
        assert_eq!(shade(-2.0, 2.0, log), 1.0);
        assert!((shade(0.02, 2.0, log) - 0.5).abs() < 1e-12);
        assert_eq!(shade(2e-5, 2.0, log), 0.0);
        assert_eq!(shade(0.0, 2.0, log), 0.0);
        assert_eq!(shade(1.0, 0.0, log), 0.0);
        let two = ColorScale::Log { decades: 2.0 };
        assert!((shade(0.2, 2.0, two) - 0.5).abs() < 1e-12);
        let lin = ColorScale::Linear;
        assert_eq!(shade(-2.0, 2.0, lin), 1.0);
        assert_eq!(shade(0.5, 2.0, lin), 0.25);
        assert_eq!(shade(0.0, 2.0, lin), 0.0);
        assert_eq!(shade(f64::NAN, 2.0, lin), 0.0);
        assert_eq!(shade(1.0, -1.0, lin), 0.0);
        assert_eq!(ramp(0.0), RGBColor(255, 255, 255));
        assert_eq!(ramp(1.0), RGBColor(8, 48, 107));
    }

    #[test]
    fn writes_png_and_svg() {
        let tmp = tempfile::tempdir().unwrap();
        let stem = tmp.path().join("curves");
        let series = [
            Series::new("a", vec![(1.0, 1.0), (10.0, 3.0), (100.0, 9.0)]),
            Series::new("nonpositive dropped", vec![(0.0, 1.0), (10.0, -1.0)]),
            Series::reference("√T", vec![(1.0, 1.0), (100.0, 10.0)]),
        ];
        for (log_x, log_y) in [(false, false), (true, true), (true, false), (false, true)] {
            let plot = LinePlot {
                title: "t",
                x_desc: "x",
                y_desc: "y",
                log_x,
                log_y,
                series: &series,
            };
            lines(&stem, &plot).unwrap();
            let png = std::fs::read(with_ext(&stem, "png")).unwrap();
            assert_eq!(&png[1..4], b"PNG");
            let svg = std::fs::read_to_string(with_ext(&stem, "svg")).unwrap();
            assert!(svg.contains("<svg") && svg.contains("√T"));
        }
        let values: Vec<f64> = (0..12).map(f64::from).collect();
        let panel = Heatmap {
            title: "m",
            rows: 3,
            cols: 4,
            values: &values,
        };
        let stem = tmp.path().join("heat");
        heatmaps(
            &stem,
            "two",
            &[panel.clone(), panel.clone()],
            ColorScale::Linear,
        )
        .unwrap();
        let svg = std::fs::read_to_string(with_ext(&stem, "svg")).unwrap();
        // 2 panels × 12 cells (the zero cell is drawn white too).
        assert!(svg.matches("<rect").count() >= 24, "{svg}");
        let bad = Heatmap { rows: 5, ..panel };
        assert!(heatmaps(&stem, "bad", &[bad], ColorScale::Linear).is_err());
    }
}
