//! `precond report DIR... [--out DIR]`: a Markdown table in the style of the paper's Table 2
//! and train-loss plots (against epochs and against wall time) of finished or partial runs.
//!
//! Inputs, per run directory (as `precond train` writes them): `summary.json` (read as untyped
//! JSON, so older and newer summaries both work) and `epochs.csv` (columns found by header
//! name: `epoch`, `train_loss` and `wall_s` are required; any other column is ignored).
//!
//! Outputs, in `--out` (default: the first run's parent directory): `report.md`,
//! `loss_vs_epoch.{png,svg}` and `loss_vs_time.{png,svg}`.
//!
//! Cell formats (a missing or null value prints as `-`):
//! - final train / test loss: `{:.3}`;
//! - total time (s): the last `wall_s` of `epochs.csv` (else the summary's `wall_s`), `{:.1}`;
//! - median optimizer step and median fwd+bwd (ms): seconds × 1e3, `{:.2}`;
//! - optimizer state and peak RSS (MB): bytes / 1e6, `{:.1}`;
//! - best eval accuracy (%), a column only when some summary has `best_eval`: a number, or an
//!   object with `accuracy` / `eval_accuracy`; a value in [0, 1] is a fraction (× 100), a larger
//!   one is already a percentage; `{:.2}`.
//!
//! Text in the PNGs is drawn with DejaVu Sans from the `dejavu` crate (registered with
//! plotters' `ab_glyph` backend), so no system font or fontconfig is needed.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;
use thiserror::Error;

/// Size of the PNG plots in pixels (the SVGs use the same user units).
pub const PLOT_SIZE: (u32, u32) = (960, 600);
/// The font family name the plots use (registered from the `dejavu` crate).
pub(crate) const FONT: &str = "sans-serif";

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("{dir}: not a run directory: {file} not found", dir = dir.display())]
    NotARun { dir: PathBuf, file: &'static str },
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}", path = path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("{path}: plotting failed: {msg}", path = path.display())]
    Plot { path: PathBuf, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `precond report` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Run directories (written by `precond train`); table rows follow this order
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// Directory for report.md and the plots [default: the first run's parent directory]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// One line of `epochs.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub epoch: f64,
    pub train_loss: f64,
    pub wall_s: f64,
    /// Tagger runs: the eval accuracy (ROOT excluded) in [0, 1].
    pub eval_accuracy: Option<f64>,
}

/// A run directory, read.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    /// The optimizer name from the summary.
    pub optimizer: String,
    pub summary: Value,
    pub points: Vec<Point>,
}

/// What `report` produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The Markdown table (also in `report.md`).
    pub table: String,
    /// Files written: `report.md`, then the plots.
    pub written: Vec<PathBuf>,
}

/// Entry point of the subcommand: write the report and print the table and the paths written.
pub fn cli(args: &ReportArgs) -> Result<(), ReportError> {
    let report = report(&args.dirs, args.out.as_deref())?;
    print!("{}", report.table);
    println!();
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Read the runs in `dirs`, write `report.md` and the four plots into `out` (default: the first
/// run's parent directory).
pub fn report(dirs: &[PathBuf], out: Option<&Path>) -> Result<Report, ReportError> {
    let runs = dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    let out = match out {
        Some(out) => out.to_path_buf(),
        None => default_out(dirs.first().map(PathBuf::as_path).unwrap_or(Path::new(".")))?,
    };
    fs::create_dir_all(&out).map_err(io_err(&out))?;
    let labels = labels(&runs);
    let table = markdown_table(&runs, &labels);

    let mut written = Vec::new();
    let md_path = out.join("report.md");
    let mut md = String::from("# Training report\n\n");
    md.push_str(&table);
    md.push_str("\nRuns:\n\n");
    for (run, label) in runs.iter().zip(&labels) {
        md.push_str(&format!("- {label}: `{}`\n", run.dir.display()));
    }
    let with_eval = runs
        .iter()
        .any(|r| r.points.iter().any(|p| p.eval_accuracy.is_some()));
    md.push_str("\n![train loss vs epoch](loss_vs_epoch.svg)\n");
    md.push_str("\n![train loss vs time](loss_vs_time.svg)\n");
    if with_eval {
        md.push_str("\n![best eval accuracy vs time](best_eval_vs_time.svg)\n");
    }
    fs::write(&md_path, md).map_err(io_err(&md_path))?;
    written.push(md_path);

    let series = |x: fn(&Point) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        runs.iter()
            .zip(&labels)
            .map(|(run, label)| {
                let pts = run
                    .points
                    .iter()
                    .map(|p| (x(p), p.train_loss))
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                (label.clone(), pts)
            })
            .collect()
    };
    let mut plots = vec![
        (
            "loss_vs_epoch",
            "Train loss vs epoch",
            "epoch",
            "train loss",
            series(|p| p.epoch),
        ),
        (
            "loss_vs_time",
            "Train loss vs wall time",
            "wall time (s)",
            "train loss",
            series(|p| p.wall_s),
        ),
    ];
    if with_eval {
        let best = runs
            .iter()
            .zip(&labels)
            .map(|(run, label)| (label.clone(), best_eval_series(&run.points)))
            .collect();
        plots.push((
            "best_eval_vs_time",
            "Best eval accuracy vs wall time",
            "wall time (s)",
            "best eval accuracy (%)",
            best,
        ));
    }
    register_font();
    for (name, title, x_desc, y_desc, series) in &plots {
        let spec = PlotSpec {
            title,
            x_desc,
            integer_x: *name == "loss_vs_epoch",
            y_desc,
            series,
        };
        let png = out.join(format!("{name}.png"));
        let root = BitMapBackend::new(&png, PLOT_SIZE).into_drawing_area();
        draw(root, &spec).map_err(|msg| ReportError::Plot {
            path: png.clone(),
            msg,
        })?;
        written.push(png);
        let svg = out.join(format!("{name}.svg"));
        let root = SVGBackend::new(&svg, PLOT_SIZE).into_drawing_area();
        draw(root, &spec).map_err(|msg| ReportError::Plot {
            path: svg.clone(),
            msg,
        })?;
        written.push(svg);
    }
    Ok(Report { table, written })
}

/// Read `summary.json` and `epochs.csv` of a run directory.
pub fn read_run(dir: &Path) -> Result<Run, ReportError> {
    let summary_path = dir.join("summary.json");
    let csv_path = dir.join("epochs.csv");
    for (path, file) in [(&summary_path, "summary.json"), (&csv_path, "epochs.csv")] {
        if !path.is_file() {
            return Err(ReportError::NotARun {
                dir: dir.to_path_buf(),
                file,
            });
        }
    }
    let bytes = fs::read(&summary_path).map_err(io_err(&summary_path))?;
    let summary: Value = serde_json::from_slice(&bytes).map_err(|e| ReportError::Parse {
        path: summary_path.clone(),
        msg: e.to_string(),
    })?;
    if !summary.is_object() {
        return Err(ReportError::Parse {
            path: summary_path,
            msg: "not a JSON object".into(),
        });
    }
    let optimizer = summary["optimizer"]
        .as_str()
        .or_else(|| summary["config"]["optimizer"]["name"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| dir_name(dir));
    let text = fs::read_to_string(&csv_path).map_err(io_err(&csv_path))?;
    let points = parse_epochs_csv(&text).map_err(|msg| ReportError::Parse {
        path: csv_path,
        msg,
    })?;
    Ok(Run {
        dir: dir.to_path_buf(),
        optimizer,
        summary,
        points,
    })
}

/// The rows of an `epochs.csv`; columns are found by header name.
fn parse_epochs_csv(text: &str) -> Result<Vec<Point>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or("empty file (no header)")?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| format!("no `{name}` column in the header `{header}`"))
    };
    let (epoch, train, wall) = (col("epoch")?, col("train_loss")?, col("wall_s")?);
    let accuracy = col("eval_accuracy").ok();
    lines
        .map(|(i, line)| {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            let get = |c: usize| -> Result<f64, String> {
                let cell = cells
                    .get(c)
                    .ok_or_else(|| format!("line {}: missing `{}`", i + 1, names[c]))?;
                cell.parse()
                    .map_err(|_| format!("line {}: bad `{}` value `{cell}`", i + 1, names[c]))
            };
            Ok(Point {
                epoch: get(epoch)?,
                train_loss: get(train)?,
                wall_s: get(wall)?,
                // An empty cell (an epoch without evaluation) is no value.
                eval_accuracy: match accuracy {
                    Some(c) if cells.get(c).is_some_and(|v| !v.is_empty()) => Some(get(c)?),
                    _ => None,
                },
            })
        })
        .collect()
}

/// The directory's last component (or the whole path when it has none).
fn dir_name(dir: &Path) -> String {
    match dir.components().next_back() {
        Some(Component::Normal(name)) => name.to_string_lossy().into_owned(),
        _ => dir.display().to_string(),
    }
}

/// The parent of `dir`, resolving `.`, `..` and the like through the file system.
fn default_out(dir: &Path) -> Result<PathBuf, ReportError> {
    if let Some(Component::Normal(_)) = dir.components().next_back() {
        let parent = dir.parent().unwrap_or(Path::new(""));
        return Ok(if parent.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            parent.to_path_buf()
        });
    }
    let abs = fs::canonicalize(dir).map_err(io_err(dir))?;
    Ok(abs.parent().map_or(abs.clone(), Path::to_path_buf))
}

/// Legend and table labels: the optimizer name; where runs share it, the directory name (the
/// whole path where those collide too).
pub fn labels(runs: &[Run]) -> Vec<String> {
    let count = |f: &dyn Fn(&Run) -> String, v: &str| runs.iter().filter(|r| f(r) == v).count();
    runs.iter()
        .map(|r| {
            if count(&|r| r.optimizer.clone(), &r.optimizer) == 1 {
                return r.optimizer.clone();
            }
            let name = dir_name(&r.dir);
            if count(&|r| dir_name(&r.dir), &name) == 1 {
                name
            } else {
                r.dir.display().to_string()
            }
        })
        .collect()
}

/// The best eval accuracy in percent, where the summary has `best_eval`.
fn best_eval_percent(summary: &Value) -> Option<f64> {
    let best = summary.get("best_eval")?;
    let v = best.as_f64().or_else(|| {
        ["accuracy", "eval_accuracy"]
            .iter()
            .find_map(|k| best.get(k).and_then(Value::as_f64))
    })?;
    Some(if (0.0..=1.0).contains(&v) {
        v * 100.0
    } else {
        v
    })
}

/// Wall time of the first epoch reaching the run's best eval accuracy.
fn time_to_best(points: &[Point]) -> Option<f64> {
    let best = points
        .iter()
        .filter_map(|p| p.eval_accuracy)
        .reduce(f64::max)?;
    points
        .iter()
        .find(|p| p.eval_accuracy == Some(best))
        .map(|p| p.wall_s)
}

/// The running maximum of the eval accuracy in percent against wall time (Figure 4's right
/// panel).
fn best_eval_series(points: &[Point]) -> Vec<(f64, f64)> {
    let mut best = f64::NEG_INFINITY;
    points
        .iter()
        .filter_map(|p| {
            let acc = p.eval_accuracy?;
            best = best.max(acc);
            Some((p.wall_s, 100.0 * best))
        })
        .collect()
}

/// The table (header, alignment row, one row per run, in order), each line ending in `\n`.
pub fn markdown_table(runs: &[Run], labels: &[String]) -> String {
    let with_eval = runs.iter().any(|r| r.summary.get("best_eval").is_some());
    let mut header = vec![
        "Optimizer",
        "Epochs",
        "Final train loss",
        if with_eval {
            "Final eval loss"
        } else {
            "Final test loss"
        },
        "Total time (s)",
        "Median opt step (ms)",
        "Median fwd+bwd (ms)",
        "Optimizer state (MB)",
        "Peak RSS (MB)",
    ];
    if with_eval {
        header.extend([
            "Best eval accuracy (%)",
            "Time to best eval (s)",
            "Test accuracy (%)",
        ]);
    }
    let mut out = format!("| {} |\n", header.join(" | "));
    let align: Vec<&str> = (0..header.len())
        .map(|i| if i == 0 { "---" } else { "---:" })
        .collect();
    out.push_str(&format!("| {} |\n", align.join(" | ")));

    let fmt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for (run, label) in runs.iter().zip(labels) {
        let s = &run.summary;
        let num = |key: &str| s.get(key).and_then(Value::as_f64);
        let total = run
            .points
            .last()
            .map(|p| p.wall_s)
            .or_else(|| num("wall_s"));
        let mut cells = vec![
            label.replace('|', "\\|"),
            s.get("epochs")
                .and_then(Value::as_u64)
                .map_or("-".into(), |e| e.to_string()),
            fmt(num("final_train_loss"), 3),
            fmt(num("final_test_loss"), 3),
            fmt(total, 1),
            fmt(num("median_opt_step_s").map(|v| v * 1e3), 2),
            fmt(num("median_fwd_bwd_s").map(|v| v * 1e3), 2),
            fmt(num("optimizer_state_bytes").map(|v| v / 1e6), 1),
            fmt(num("peak_rss_bytes").map(|v| v / 1e6), 1),
        ];
        if with_eval {
            cells.push(fmt(best_eval_percent(s), 2));
            cells.push(fmt(time_to_best(&run.points), 1));
            cells.push(fmt(num("test_accuracy").map(|v| v * 100.0), 2));
        }
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

/// Register DejaVu Sans (from the `dejavu` crate) as plotters' `sans-serif`, once.
pub(crate) fn register_font() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // DejaVu Sans is a valid TrueType font, so registration cannot fail in practice;
        // without it text is skipped rather than the report failing.
        let font = dejavu::sans::regular();
        if plotters::style::register_font(FONT, FontStyle::Normal, font).is_err() {
            eprintln!("warning: could not load the bundled font; plots will lack text");
        }
    });
}

struct PlotSpec<'a> {
    title: &'a str,
    x_desc: &'a str,
    /// Whole-number x (epochs): no fractional tick labels.
    integer_x: bool,
    y_desc: &'a str,
    series: &'a [(String, Vec<(f64, f64)>)],
}

impl PlotSpec<'_> {
    /// Accuracy rises: its legend goes where loss curves end, at the bottom.
    fn legend_position(&self) -> SeriesLabelPosition {
        if self.y_desc.contains("accuracy") {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        }
    }
}

/// Distinct line colors (the Tableau 10 palette), cycled.
pub(crate) const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// `lo..hi` of `values`, padded by 5% (or by 1 when they are all equal; 0..1 when none).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 1.0 };
    (lo - pad, hi + pad)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, spec: &PlotSpec) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let all = || spec.series.iter().flat_map(|(_, pts)| pts.iter().copied());
    // x starts at 0 (epoch 0 / time 0) unless some value is negative.
    let (x_pad_lo, x_hi) = padded_range(all().map(|p| p.0).chain([0.0]));
    let x_lo = if all().any(|p| p.0 < 0.0) {
        x_pad_lo
    } else {
        0.0
    };
    let (y_lo, y_hi) = padded_range(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(spec.title, (FONT, 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(err)?;
    // Integer x: at most 11 labels, so that the ticks plotters picks are whole numbers.
    let x_labels = if spec.integer_x {
        (x_hi.max(0.0) as usize + 1).clamp(2, 11)
    } else {
        10
    };
    let whole = |x: &f64| format!("{x:.0}");
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(x_labels)
        .x_desc(spec.x_desc)
        .y_desc(spec.y_desc)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18));
    if spec.integer_x {
        mesh.x_label_formatter(&whole);
    }
    mesh.draw().map_err(err)?;
    for (i, (label, pts)) in spec.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        // A single point draws no line: mark it.
        if pts.len() == 1 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(spec.legend_position())
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture run directory.
    fn write_run(dir: &Path, summary: &Value, csv: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(summary).unwrap(),
        )
        .unwrap();
        fs::write(dir.join("epochs.csv"), csv).unwrap();
    }

    fn summary(optimizer: &str, epochs: u64, train: f64, test: f64) -> Value {
        serde_json::json!({
            "optimizer": optimizer,
            "config": {"optimizer": {"name": optimizer, "lr": 1e-3}, "epochs": epochs},
            "ending": "completed",
            "complete": true,
            "epochs": epochs,
            "final_train_loss": train,
            "final_test_loss": test,
            "median_step_s": 0.0456,
            "median_fwd_bwd_s": 0.04213,
            "median_opt_step_s": 0.003456,
            "mean_opt_step_s": 0.0036,
            "wall_s": 99.0,
            "optimizer_state_bytes": 22_698_512u64,
            "peak_rss_bytes": 812_345_678u64,
            "params_sha256": "00",
            "machine": {"cpu_model": null, "threads": 2},
        })
    }

    /// PNG width and height from the IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    #[test]
    fn report_writes_table_and_plots() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = tmp.path().join("runs");
        let a = runs.join("adam-1");
        let b = runs.join("shampoo-1");
        write_run(
            &a,
            &summary("adam", 3, 60.12345, 61.5),
            "epoch,train_loss,test_loss,wall_s\n1,120.5,110.25,1.500\n2,80.25,79.5,3.000\n3,60.12345,61.5,4.260\n",
        );
        let mut sb = summary("shampoo", 2, 55.0004, 58.9996);
        sb["optimizer_state_bytes"] = 150_000_000u64.into();
        sb["peak_rss_bytes"] = Value::Null;
        sb["median_opt_step_s"] = 0.1.into();
        // Extra columns (a later tagger run) are ignored.
        write_run(
            &b,
            &sb,
            "epoch,train_loss,test_loss,wall_s,eval_accuracy\n1,90,85,10.049,0.5\n2,55.0004,58.9996,20.04,0.6\n",
        );

        let r = report(&[a.clone(), b.clone()], None).unwrap();
        let expected = "\
| Optimizer | Epochs | Final train loss | Final test loss | Total time (s) | Median opt step (ms) | Median fwd+bwd (ms) | Optimizer state (MB) | Peak RSS (MB) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| adam | 3 | 60.123 | 61.500 | 4.3 | 3.46 | 42.13 | 22.7 | 812.3 |
| shampoo | 2 | 55.000 | 59.000 | 20.0 | 100.00 | 42.13 | 150.0 | - |
";
        assert_eq!(r.table, expected);

        // Default output: the first run's parent directory.
        let names: Vec<PathBuf> = [
            "report.md",
            "loss_vs_epoch.png",
            "loss_vs_epoch.svg",
            "loss_vs_time.png",
            "loss_vs_time.svg",
            // The fixture's runs have an eval_accuracy column.
            "best_eval_vs_time.png",
            "best_eval_vs_time.svg",
        ]
        .iter()
        .map(|n| runs.join(n))
        .collect();
        assert_eq!(r.written, names);
        for path in &names {
            assert!(fs::metadata(path).unwrap().len() > 0, "{}", path.display());
        }
        let md = fs::read_to_string(&names[0]).unwrap();
        assert!(md.contains(expected), "{md}");
        for png in [&names[1], &names[3]] {
            let bytes = fs::read(png).unwrap();
            assert_eq!(png_size(&bytes), PLOT_SIZE);
            let img = image::load_from_memory(&bytes).unwrap();
            assert_eq!((img.width(), img.height()), PLOT_SIZE);
            // Not blank: the white background plus lines of the first two palette colors.
            let rgb = img.to_rgb8();
            for c in &COLORS[..2] {
                assert!(
                    rgb.pixels().any(|p| p.0 == [c.0, c.1, c.2]),
                    "{}: no pixel of {c:?}",
                    png.display()
                );
            }
        }
        for svg in [&names[2], &names[4]] {
            let text = fs::read_to_string(svg).unwrap();
            assert!(text.starts_with("<svg"), "{}", svg.display());
            for label in ["adam", "shampoo", "train loss"] {
                assert!(
                    text.contains(&format!(">\n{label}\n</text>")),
                    "{label} missing"
                );
            }
        }
    }

    #[test]
    fn shared_optimizer_names_use_directory_names_and_best_eval_adds_a_column() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a/lr-1e-3");
        let b = tmp.path().join("a/lr-1e-2");
        let c = tmp.path().join("b/lr-1e-2");
        let csv = "epoch,train_loss,test_loss,wall_s\n1,2.0,2.5,0.5\n";
        let mut s = summary("adam", 1, 2.0, 2.5);
        write_run(&a, &s, csv);
        s["best_eval"] = 0.97346.into();
        write_run(&b, &s, csv);
        s["best_eval"] = serde_json::json!({"epoch": 1, "accuracy": 0.5});
        write_run(&c, &s, csv);
        let out = tmp.path().join("out");
        let r = report(&[a.clone(), b.clone(), c.clone()], Some(&out)).unwrap();
        let rows: Vec<&str> = r.table.lines().collect();
        assert!(rows[0].ends_with(
            "| Peak RSS (MB) | Best eval accuracy (%) | Time to best eval (s) | Test accuracy (%) |"
        ));
        assert!(rows[0].contains("| Final eval loss |"), "{}", rows[0]);
        assert_eq!(
            rows[2],
            "| lr-1e-3 | 1 | 2.000 | 2.500 | 0.5 | 3.46 | 42.13 | 22.7 | 812.3 | - | - | - |"
        );
        let b_label = b.display().to_string();
        let c_label = c.display().to_string();
        assert!(
            rows[3].starts_with(&format!("| {b_label} |")),
            "{}",
            rows[3]
        );
        assert!(rows[3].ends_with("| 97.35 | - | - |"), "{}", rows[3]);
        assert!(
            rows[4].starts_with(&format!("| {c_label} |")),
            "{}",
            rows[4]
        );
        assert!(rows[4].ends_with("| 50.00 | - | - |"), "{}", rows[4]);
        assert!(r.written.iter().all(|p| p.starts_with(&out)));
        let svg = fs::read_to_string(out.join("loss_vs_epoch.svg")).unwrap();
        assert!(svg.contains(">\nlr-1e-3\n</text>"));
        // One point per run: drawn as a marker.
        assert!(svg.contains("<circle"));
    }

    #[test]
    fn missing_run_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        write_run(
            &good,
            &summary("adam", 1, 1.0, 1.0),
            "epoch,train_loss,test_loss,wall_s\n1,1,1,1\n",
        );
        let empty = tmp.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        let err = report(&[good.clone(), empty.clone()], None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: not a run directory: summary.json not found",
                empty.display()
            )
        );
        fs::write(empty.join("summary.json"), "{}").unwrap();
        let err = report(std::slice::from_ref(&empty), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: not a run directory: epochs.csv not found",
                empty.display()
            )
        );
        let nowhere = tmp.path().join("nowhere");
        let err = report(std::slice::from_ref(&nowhere), None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&nowhere.display().to_string()), "{err}");
        // Nothing was written for the failed reports.
        assert!(!tmp.path().join("report.md").exists());

        fs::write(empty.join("epochs.csv"), "epoch,loss\n1,2\n").unwrap();
        let err = report(std::slice::from_ref(&empty), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `train_loss` column"), "{err}");
        fs::write(empty.join("summary.json"), "[1]").unwrap();
        let err = report(&[empty], None).unwrap_err().to_string();
        assert!(err.ends_with("summary.json: not a JSON object"), "{err}");
    }
}
