//! `precond analyze ablate`: the knobs of Algorithm 1's randomized SVD (NOTES §2) on the MNIST
//! autoencoder at a short budget (paper Appendix 6.10), one factor at a time around the
//! shared-basis preset (rank k 32, oversampling p 0, 1 power iteration, 10 power iterations for
//! ρ; [`LibraryHparams::shared_basis`]).
//!
//! Each knob's values are tried with the other knobs at the preset. Every configuration is an
//! ordinary `precond train autoencoder --optimizer shared-basis` run directory
//! `OUT/runs/k<k>-p<p>-it<it>-rho<ρ iterations>` (`rho-exact` for 0: exact ρ by
//! eigendecompositions); a configuration that several knobs share (the preset) is trained once.
//!
//! Outputs in `--out`:
//! - `ablate.csv`: one row per (knob, value): `knob,value,rank,oversample,power_iters,rho_iters,
//!   final_train_loss,final_test_loss,median_opt_step_ms,state_bytes,wall_s` (`rho_iters` 0 =
//!   exact; a run that diverged has empty result cells and its error in `failed.json`);
//! - `ablate.json`: the settings, the preset and every run's directory and status;
//! - `ablate_<knob>.png/.svg` (knob = rank, oversample, power_iters, rho_iters): final train and
//!   test loss against the knob's value (log x for the rank and ρ's iterations; exact ρ is drawn
//!   as horizontal lines);
//! - `ablate_time.png/.svg`: the median optimizer step (ms) against the value, one series per
//!   knob on one linear x axis (exact ρ as a horizontal line).
//!
//! Running the same command again continues: a complete run (or one recorded as diverged) is
//! kept, an interrupted one is resumed from its checkpoint, and a run directory holding a run of
//! other settings is refused before anything trains. Ctrl-C stops after the current step; the
//! outputs then hold the finished runs and the command ends with an error saying so.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{json, Value};

use super::plot::{self, LinePlot, Series};
use super::{create_dir, write_csv, write_json, AnalyzeError};
use crate::commands::search::{diff, read_json};
use crate::training::optimizers::LibraryHparams;
use crate::training::{self, TrainArgs, TrainConfig, TrainError, TrainSettings, CHECKPOINT};

/// The optimizer every run uses.
const OPTIMIZER: &str = "shared-basis";
/// The record of a run that diverged, in its run directory.
const FAILED: &str = "failed.json";
/// Columns of `ablate.csv`.
const HEADER: [&str; 11] = [
    "knob",
    "value",
    "rank",
    "oversample",
    "power_iters",
    "rho_iters",
    "final_train_loss",
    "final_test_loss",
    "median_opt_step_ms",
    "state_bytes",
    "wall_s",
];

/// `precond analyze ablate` arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AblateArgs {
    /// Output directory: runs/<configuration>/ (one `precond train` run directory each),
    /// ablate.csv, ablate.json, ablate_<knob>.png/.svg, ablate_time.png/.svg
    #[arg(long)]
    pub out: PathBuf,
    /// A small configuration that finishes in well under a minute on 2 cores: 2000 training and
    /// 500 test images, 1 epoch, ranks 8,32, oversampling 0,8, power iterations 1,2, rho
    /// iterations 10,0 (flags given still apply)
    #[arg(long)]
    pub quick: bool,
    /// Directory holding the MNIST IDX files [default: ../shared/data/mnist]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Ranks k of the shared basis to try, the other knobs at the preset (comma-separated)
    /// [default: 8,16,32,64; --quick: 8,32]
    #[arg(long, value_delimiter = ',')]
    pub ranks: Option<Vec<usize>>,
    /// Oversampling p of the randomized SVD to try (comma-separated) [default: 0,8,32; --quick:
    /// 0,8]
    #[arg(long, value_delimiter = ',')]
    pub oversample: Option<Vec<usize>>,
    /// Power iterations of the randomized SVD to try, each at least 1 (comma-separated)
    /// [default: 1,2,5; --quick: 1,2]
    #[arg(long, value_delimiter = ',')]
    pub power_iters: Option<Vec<usize>>,
    /// Power iterations estimating the lost mass rho to try, 0 = exact (eigendecompositions)
    /// (comma-separated) [default: 1,3,10,0; --quick: 10,0]
    #[arg(long, value_delimiter = ',')]
    pub rho_iters: Option<Vec<usize>>,
    /// Epochs of every run [default: 5; --quick: 1]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Use only the first N training images [default: all 60000; --quick: 2000]
    #[arg(long)]
    pub limit: Option<usize>,
    /// Use only the first N test images [default: all 10000; --quick: 500]
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Images per step [default: 1000, the autoencoder's]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate of every run [default: the shared-basis preset's, 1e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the initialization, the shuffling and the randomized SVD, the same for every run
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A knob of Algorithm 1 varied by the ablation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Knob {
    Rank,
    Oversample,
    PowerIters,
    RhoIters,
}

impl Knob {
    /// Its name in `ablate.csv` and in the plots' file names.
    fn name(self) -> &'static str {
        match self {
            Knob::Rank => "rank",
            Knob::Oversample => "oversample",
            Knob::PowerIters => "power_iters",
            Knob::RhoIters => "rho_iters",
        }
    }

    /// The flag giving its values.
    fn flag(self) -> &'static str {
        match self {
            Knob::Rank => "--ranks",
            Knob::Oversample => "--oversample",
            Knob::PowerIters => "--power-iters",
            Knob::RhoIters => "--rho-iters",
        }
    }

    /// The x-axis description of its plot.
    fn axis(self) -> &'static str {
        match self {
            Knob::Rank => "rank k of the shared basis",
            Knob::Oversample => "oversampling p of the randomized SVD",
            Knob::PowerIters => "power iterations of the randomized SVD",
            Knob::RhoIters => "power iterations estimating rho (exact: horizontal lines)",
        }
    }

    /// Whether its plot has a log x axis.
    fn log_x(self) -> bool {
        matches!(self, Knob::Rank | Knob::RhoIters)
    }

    /// The smallest value it takes.
    fn min_value(self) -> usize {
        match self {
            Knob::Rank | Knob::PowerIters => 1,
            Knob::Oversample | Knob::RhoIters => 0,
        }
    }

    /// `config` with this knob at `value`.
    fn set(self, config: Config, value: usize) -> Config {
        let mut c = config;
        match self {
            Knob::Rank => c.rank = value,
            Knob::Oversample => c.oversample = value,
            Knob::PowerIters => c.power_iters = value,
            Knob::RhoIters => c.rho_iters = value,
        }
        c
    }
}

/// The randomized-SVD settings of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Config {
    rank: usize,
    oversample: usize,
    power_iters: usize,
    /// 0: exact ρ.
    rho_iters: usize,
}

impl Config {
    /// The shared-basis preset's.
    fn preset() -> Result<Config, AnalyzeError> {
        let lib = LibraryHparams::shared_basis();
        let missing = || AnalyzeError::Invalid("the shared-basis preset lacks a knob".into());
        Ok(Config {
            rank: lib.rank.ok_or_else(missing)?,
            oversample: lib.oversample.ok_or_else(missing)?,
            power_iters: lib.power_iters.ok_or_else(missing)?,
            rho_iters: lib.rho_iters.ok_or_else(missing)?,
        })
    }

    /// Its run directory's name, e.g. `k32-p0-it1-rho10` or `k32-p0-it1-rho-exact`.
    fn dir_name(self) -> String {
        let rho = match self.rho_iters {
            0 => "-exact".to_string(),
            n => n.to_string(),
        };
        format!(
            "k{}-p{}-it{}-rho{rho}",
            self.rank, self.oversample, self.power_iters
        )
    }

    /// The training settings of its run: `common` with these knobs.
    fn settings(self, common: &TrainSettings) -> TrainSettings {
        TrainSettings {
            rank: Some(self.rank),
            oversample: Some(self.oversample),
            power_iters: Some(self.power_iters),
            rho_iters: Some(self.rho_iters),
            ..common.clone()
        }
    }
}

/// One configuration to run.
struct Run {
    config: Config,
    dir: PathBuf,
    settings: TrainSettings,
    train_config: TrainConfig,
}

/// What a run directory holds.
#[derive(Debug, Clone, PartialEq)]
enum Found {
    /// Nothing to resume: train afresh.
    Fresh,
    /// A checkpoint of an unfinished run of these settings: resume it.
    Partial,
    /// A finished run of these settings: its `summary.json`.
    Complete(Value),
    /// A run of these settings that diverged: its error.
    Failed(String),
}

impl Found {
    fn status(&self) -> &'static str {
        match self {
            Found::Fresh => "not run",
            Found::Partial => "interrupted",
            Found::Complete(_) => "complete",
            Found::Failed(_) => "diverged",
        }
    }
}

/// The resolved settings of the ablation.
struct Plan {
    common: TrainSettings,
    /// The knobs with their values, in the order given.
    knobs: Vec<(Knob, Vec<usize>)>,
    preset: Config,
    /// One row per (knob, value).
    rows: Vec<(Knob, usize, Config)>,
    /// The distinct configurations, in order of first appearance.
    runs: Vec<Run>,
}

/// Runs `precond analyze ablate`.
pub fn run(args: &AblateArgs, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    let plan = plan(args)?;
    // Check every run directory before training any.
    let mut found = plan
        .runs
        .iter()
        .map(inspect)
        .collect::<Result<Vec<_>, _>>()?;
    create_dir(&args.out.join("runs"))?;

    let total = plan.runs.len();
    let mut interrupted = false;
    for (i, (run, found)) in plan.runs.iter().zip(found.iter_mut()).enumerate() {
        let resume = match found {
            Found::Complete(_) => {
                eprintln!("{}: complete, kept", run.dir.display());
                continue;
            }
            Found::Failed(_) => {
                eprintln!("{}: diverged before, kept", run.dir.display());
                continue;
            }
            Found::Partial => true,
            Found::Fresh => false,
        };
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        eprintln!(
            "ablate: run {} of {total}{}: {}",
            i + 1,
            if resume { " (resumed)" } else { "" },
            run.dir.display()
        );
        *found = train_one(run, resume, &plan.common, stop)?;
        if matches!(found, Found::Partial) {
            interrupted = true;
            break;
        }
    }

    let rows = result_rows(&plan, &found);
    write_csv(&args.out.join("ablate.csv"), &HEADER, &rows)?;
    write_json(
        &args.out.join("ablate.json"),
        &settings_json(args, &plan, &found),
    )?;
    plot_losses(&args.out, &plan, &found)?;
    plot_times(&args.out, &plan, &found)?;
    println!("{}", table(&plan, &found));

    let done = found
        .iter()
        .filter(|f| matches!(f, Found::Complete(_) | Found::Failed(_)))
        .count();
    if interrupted || done < total {
        return Err(AnalyzeError::Invalid(format!(
            "analyze ablate interrupted: {done} of {total} runs finished (the outputs in {} hold \
             those); run the same command again to continue",
            args.out.display()
        )));
    }
    Ok(())
}

/// The settings of `args` with the quick and preset defaults, checked; every configuration's
/// settings resolved (an invalid one is refused naming it) before anything runs.
fn plan(args: &AblateArgs) -> Result<Plan, AnalyzeError> {
    let quick = args.quick;
    let list = |given: &Option<Vec<usize>>, full: &[usize], small: &[usize]| {
        given
            .clone()
            .unwrap_or_else(|| if quick { small } else { full }.to_vec())
    };
    let knobs = vec![
        (Knob::Rank, list(&args.ranks, &[8, 16, 32, 64], &[8, 32])),
        (
            Knob::Oversample,
            list(&args.oversample, &[0, 8, 32], &[0, 8]),
        ),
        (
            Knob::PowerIters,
            list(&args.power_iters, &[1, 2, 5], &[1, 2]),
        ),
        (
            Knob::RhoIters,
            list(&args.rho_iters, &[1, 3, 10, 0], &[10, 0]),
        ),
    ];
    for (knob, values) in &knobs {
        check_values(*knob, values)?;
    }
    let positive = |flag: &str, v: Option<usize>| match v {
        Some(0) => Err(AnalyzeError::Invalid(format!("{flag} must be at least 1"))),
        _ => Ok(()),
    };
    positive("--epochs", args.epochs)?;
    positive("--limit", args.limit)?;
    positive("--test-limit", args.test_limit)?;
    positive("--batch-size", args.batch_size)?;
    if let Some(lr) = args.lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(AnalyzeError::Invalid(format!(
                "--lr {lr}: the learning rate must be positive and finite"
            )));
        }
    }

    let common = TrainSettings {
        data: args.data.clone(),
        optimizer: Some(OPTIMIZER.into()),
        lr: args.lr,
        epochs: Some(args.epochs.unwrap_or(if quick { 1 } else { 5 })),
        limit: args.limit.or(quick.then_some(2000)),
        test_limit: args.test_limit.or(quick.then_some(500)),
        batch_size: args.batch_size,
        seed: Some(args.seed),
        ..Default::default()
    };
    let preset = Config::preset()?;
    let mut rows = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    for (knob, values) in &knobs {
        for &value in values {
            let config = knob.set(preset, value);
            rows.push((*knob, value, config));
            if runs.iter().any(|r| r.config == config) {
                continue;
            }
            let settings = config.settings(&common);
            let train_config = TrainConfig::resolve(&settings, None).map_err(|e| {
                AnalyzeError::Invalid(format!(
                    "configuration {} ({} {value}): {e}",
                    config.dir_name(),
                    knob.flag()
                ))
            })?;
            runs.push(Run {
                config,
                dir: args.out.join("runs").join(config.dir_name()),
                settings,
                train_config,
            });
        }
    }
    Ok(Plan {
        common,
        knobs,
        preset,
        rows,
        runs,
    })
}

/// Refuses an empty list, a repeated value and a value below the knob's least.
fn check_values(knob: Knob, values: &[usize]) -> Result<(), AnalyzeError> {
    let flag = knob.flag();
    if values.is_empty() {
        return Err(AnalyzeError::Invalid(format!(
            "{flag}: the list is empty; give at least one value"
        )));
    }
    let mut seen = BTreeSet::new();
    for &v in values {
        if v < knob.min_value() {
            return Err(AnalyzeError::Invalid(format!(
                "{flag}: {v} is too small: {} must be at least {}",
                knob.name(),
                knob.min_value()
            )));
        }
        if !seen.insert(v) {
            return Err(AnalyzeError::Invalid(format!("{flag}: {v} is given twice")));
        }
    }
    Ok(())
}

/// What `run.dir` holds; refuses a run (or a recorded divergence) of other settings.
fn inspect(run: &Run) -> Result<Found, AnalyzeError> {
    let dir = &run.dir;
    let other = |recorded: &Value, what: &str| -> Result<(), AnalyzeError> {
        let want = serde_json::to_value(&run.train_config)
            .map_err(|e| AnalyzeError::Invalid(format!("{}: {e}", dir.display())))?;
        let mut diffs = Vec::new();
        diff("", recorded, &want, &mut diffs);
        // The data folder may move between invocations.
        diffs.retain(|d| !d.starts_with("data: "));
        if diffs.is_empty() {
            return Ok(());
        }
        Err(AnalyzeError::Invalid(format!(
            "{}: {what} holds a run with other settings ({}: recorded vs now); rerun with the \
             original flags or use another --out",
            dir.display(),
            diffs.join("; ")
        )))
    };
    if let Some(failed) = read_json(&dir.join(FAILED)) {
        other(&failed["config"], FAILED)?;
        let error = failed["error"].as_str().unwrap_or("diverged").to_string();
        return Ok(Found::Failed(error));
    }
    if !dir.join(CHECKPOINT).is_file() {
        return Ok(Found::Fresh);
    }
    match read_json(&dir.join("summary.json")) {
        Some(summary) => {
            other(&summary["config"], "summary.json")?;
            Ok(if summary["complete"].as_bool() == Some(true) {
                Found::Complete(summary)
            } else {
                Found::Partial
            })
        }
        None => {
            // A checkpoint without a readable summary: its own record of the settings decides.
            let (config, _) = training::load_run(dir)?;
            let recorded = serde_json::to_value(&config)
                .map_err(|e| AnalyzeError::Invalid(format!("{}: {e}", dir.display())))?;
            other(&recorded, CHECKPOINT)?;
            Ok(Found::Partial)
        }
    }
}

/// Trains (or resumes) one configuration; a divergence is recorded in `failed.json`.
fn train_one(
    run: &Run,
    resume: bool,
    common: &TrainSettings,
    stop: &AtomicBool,
) -> Result<Found, AnalyzeError> {
    let args = if resume {
        TrainArgs {
            // The checkpoint holds the hyperparameters (checked by `inspect`); the data may move.
            settings: TrainSettings {
                data: common.data.clone(),
                ..Default::default()
            },
            resume: Some(run.dir.clone()),
            ..Default::default()
        }
    } else {
        TrainArgs {
            settings: TrainSettings {
                out: Some(run.dir.clone()),
                ..run.settings.clone()
            },
            ..Default::default()
        }
    };
    match training::run(&args, stop) {
        Ok(r) if r.summary.complete => {
            let summary = read_json(&r.out.join("summary.json")).ok_or_else(|| {
                AnalyzeError::Invalid(format!(
                    "{}: summary.json unreadable after training",
                    r.out.display()
                ))
            })?;
            Ok(Found::Complete(summary))
        }
        Ok(_) => Ok(Found::Partial),
        Err(
            e @ (TrainError::Diverged { .. }
            | TrainError::NonFinite { .. }
            | TrainError::LinalgFailure { .. }),
        ) => {
            eprintln!("{}: diverged: {e}", run.dir.display());
            let record = json!({
                "error": e.to_string(),
                "config": run.train_config,
            });
            create_dir(&run.dir)?;
            write_json(&run.dir.join(FAILED), &record)?;
            Ok(Found::Failed(e.to_string()))
        }
        Err(e) => Err(AnalyzeError::Invalid(format!(
            "configuration {}: {e}",
            run.dir.display()
        ))),
    }
}

/// The results of one finished run.
#[derive(Debug, Clone, Copy)]
struct Results {
    final_train_loss: Option<f64>,
    final_test_loss: Option<f64>,
    median_opt_step_ms: Option<f64>,
    state_bytes: Option<u64>,
    wall_s: Option<f64>,
}

impl Results {
    fn of(found: &Found) -> Option<Results> {
        let Found::Complete(s) = found else {
            return None;
        };
        Some(Results {
            final_train_loss: s["final_train_loss"].as_f64(),
            final_test_loss: s["final_test_loss"].as_f64(),
            median_opt_step_ms: s["median_opt_step_s"].as_f64().map(|v| v * 1e3),
            state_bytes: s["optimizer_state_bytes"].as_u64(),
            wall_s: s["wall_s"].as_f64(),
        })
    }
}

/// The found state of `config`'s run.
fn found_of<'a>(plan: &Plan, found: &'a [Found], config: Config) -> &'a Found {
    let i = plan.runs.iter().position(|r| r.config == config);
    // Every row's configuration is planned.
    i.map_or(&Found::Fresh, |i| &found[i])
}

/// `ablate.csv` rows: every (knob, value) whose run finished.
fn result_rows(plan: &Plan, found: &[Found]) -> Vec<Vec<String>> {
    let cell = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    plan.rows
        .iter()
        .filter_map(|&(knob, value, c)| {
            let f = found_of(plan, found, c);
            if !matches!(f, Found::Complete(_) | Found::Failed(_)) {
                return None;
            }
            let r = Results::of(f);
            Some(vec![
                knob.name().to_string(),
                value.to_string(),
                c.rank.to_string(),
                c.oversample.to_string(),
                c.power_iters.to_string(),
                c.rho_iters.to_string(),
                cell(r.and_then(|r| r.final_train_loss)),
                cell(r.and_then(|r| r.final_test_loss)),
                cell(r.and_then(|r| r.median_opt_step_ms)),
                r.and_then(|r| r.state_bytes)
                    .map_or(String::new(), |b| b.to_string()),
                cell(r.and_then(|r| r.wall_s)),
            ])
        })
        .collect()
}

/// `ablate.json`: the settings and every run's directory and status.
fn settings_json(args: &AblateArgs, plan: &Plan, found: &[Found]) -> Value {
    let c = plan.runs.first().map(|r| &r.train_config);
    let knobs: serde_json::Map<String, Value> = plan
        .knobs
        .iter()
        .map(|(k, v)| (k.name().to_string(), json!(v)))
        .collect();
    let runs: Vec<Value> = plan
        .runs
        .iter()
        .zip(found)
        .map(|(r, f)| {
            let mut v = json!({
                "dir": r.dir,
                "rank": r.config.rank,
                "oversample": r.config.oversample,
                "power_iters": r.config.power_iters,
                "rho_iters": r.config.rho_iters,
                "status": f.status(),
            });
            if let Found::Failed(e) = f {
                v["error"] = json!(e);
            }
            v
        })
        .collect();
    json!({
        "task": "autoencoder",
        "optimizer": OPTIMIZER,
        "quick": args.quick,
        "data": c.map(|c| &c.data),
        "epochs": c.map(|c| c.epochs),
        "limit": c.and_then(|c| c.limit),
        "test_limit": c.and_then(|c| c.test_limit),
        "batch_size": c.map(|c| c.batch_size),
        "lr": c.map(|c| c.optimizer.lr),
        "seed": args.seed,
        "preset": {
            "rank": plan.preset.rank,
            "oversample": plan.preset.oversample,
            "power_iters": plan.preset.power_iters,
            "rho_iters": plan.preset.rho_iters,
        },
        "knobs": knobs,
        "rho_iters_0": "exact rho (eigendecompositions)",
        "runs": runs,
    })
}

/// A knob's finished points `(value, results)` sorted by value.
fn knob_points(plan: &Plan, found: &[Found], knob: Knob) -> Vec<(usize, Results)> {
    let mut points: Vec<(usize, Results)> = plan
        .rows
        .iter()
        .filter(|(k, _, _)| *k == knob)
        .filter_map(|&(_, v, c)| Results::of(found_of(plan, found, c)).map(|r| (v, r)))
        .collect();
    points.sort_by_key(|(v, _)| *v);
    points
}

/// A horizontal line at `y` over `x_span` (the exact-ρ result).
fn level(label: String, x_span: (f64, f64), y: Option<f64>) -> Option<Series> {
    y.map(|y| Series::new(label, vec![(x_span.0, y), (x_span.1, y)]))
}

/// The x span of `values`, widened around a single positive value (halved and doubled, so
/// that a level over it shows on a log axis too), 1..10 when there are none.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    match (lo < hi, lo == hi) {
        (true, _) => (lo, hi),
        (false, true) if lo > 0.0 => (lo / 2.0, hi * 2.0),
        (false, true) => (lo - 1.0, hi + 1.0),
        (false, false) => (1.0, 10.0),
    }
}

/// `ablate_<knob>.png/.svg`: final train and test loss against each knob's value.
fn plot_losses(out: &Path, plan: &Plan, found: &[Found]) -> Result<(), AnalyzeError> {
    for (knob, _) in &plan.knobs {
        let knob = *knob;
        let points = knob_points(plan, found, knob);
        // Exact ρ (rho_iters 0) has no place on the iterations' axis: horizontal lines.
        let exact = knob == Knob::RhoIters;
        let (on_axis, off_axis): (Vec<_>, Vec<_>) =
            points.iter().partition(|(v, _)| !(exact && *v == 0));
        let xy = |f: fn(&Results) -> Option<f64>| -> Vec<(f64, f64)> {
            on_axis
                .iter()
                .filter_map(|(v, r)| f(r).map(|y| (*v as f64, y)))
                .collect()
        };
        let mut series = vec![
            Series::new("final train loss", xy(|r| r.final_train_loss)),
            Series::new("final test loss", xy(|r| r.final_test_loss)),
        ];
        let x_span = span(on_axis.iter().map(|(v, _)| *v as f64));
        for (_, r) in &off_axis {
            series.extend(level(
                "final train loss, exact rho".into(),
                x_span,
                r.final_train_loss,
            ));
            series.extend(level(
                "final test loss, exact rho".into(),
                x_span,
                r.final_test_loss,
            ));
        }
        let title = format!(
            "shared-basis on the autoencoder: {} (others at the preset)",
            knob.name()
        );
        plot::lines(
            &out.join(format!("ablate_{}", knob.name())),
            &LinePlot {
                title: &title,
                x_desc: knob.axis(),
                y_desc: "final loss (sum over pixels, mean over images)",
                log_x: knob.log_x(),
                log_y: false,
                series: &series,
            },
        )?;
    }
    Ok(())
}

/// `ablate_time.png/.svg`: the median optimizer step against the value, one series per knob.
fn plot_times(out: &Path, plan: &Plan, found: &[Found]) -> Result<(), AnalyzeError> {
    let mut series = Vec::new();
    let mut exact = None;
    for (knob, _) in &plan.knobs {
        let mut points = Vec::new();
        for (v, r) in knob_points(plan, found, *knob) {
            if *knob == Knob::RhoIters && v == 0 {
                exact = r.median_opt_step_ms;
            } else if let Some(ms) = r.median_opt_step_ms {
                points.push((v as f64, ms));
            }
        }
        series.push(Series::new(knob.name(), points));
    }
    let x_span = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    series.extend(level("rho_iters = 0 (exact)".into(), x_span, exact));
    plot::lines(
        &out.join("ablate_time"),
        &LinePlot {
            title: "shared-basis on the autoencoder: optimizer step time",
            x_desc: "the knob's value (others at the preset)",
            y_desc: "median optimizer step (ms)",
            log_x: false,
            log_y: false,
            series: &series,
        },
    )
}

/// The stdout table: one line per (knob, value).
fn table(plan: &Plan, found: &[Found]) -> String {
    let mut s = format!(
        "{:<12} {:>6} {:>5} {:>4} {:>4} {:>5} {:>11} {:>11} {:>10} {:>10} {:>9}\n",
        "knob",
        "value",
        "k",
        "p",
        "it",
        "rho",
        "train loss",
        "test loss",
        "opt ms",
        "state MB",
        "wall s"
    );
    let num = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for &(knob, value, c) in &plan.rows {
        let f = found_of(plan, found, c);
        let r = Results::of(f);
        let rho = match c.rho_iters {
            0 => "exact".to_string(),
            n => n.to_string(),
        };
        let status = match f {
            Found::Complete(_) => "",
            Found::Failed(_) => "  diverged",
            Found::Fresh | Found::Partial => "  not run",
        };
        let _ = writeln!(
            s,
            "{:<12} {:>6} {:>5} {:>4} {:>4} {:>5} {:>11} {:>11} {:>10} {:>10} {:>9}{status}",
            knob.name(),
            value,
            c.rank,
            c.oversample,
            c.power_iters,
            rho,
            num(r.and_then(|r| r.final_train_loss), 4),
            num(r.and_then(|r| r.final_test_loss), 4),
            num(r.and_then(|r| r.median_opt_step_ms), 1),
            num(r.and_then(|r| r.state_bytes).map(|b| b as f64 / 1e6), 3),
            num(r.and_then(|r| r.wall_s), 1),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::test_support::mnist_dir;
    use super::*;
    use crate::models::autoencoder::WIDTHS;
    use std::fs;

    fn quick(tmp: &Path, out: &Path) -> AblateArgs {
        AblateArgs {
            out: out.to_path_buf(),
            quick: true,
            data: Some(mnist_dir(tmp)),
            ..Default::default()
        }
    }

    /// `ablate.csv` as rows of cells, header checked.
    fn read_csv(path: &Path) -> Vec<Vec<String>> {
        let text = fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(HEADER.join(",").as_str()));
        lines
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect()
    }

    /// Shared-basis state of the autoencoder at rank k, from the library's accounting (f32):
    /// per weight (b = d_in, m = d_out, k' = min(k, b)) the basis b·k', the coefficients m·k'²
    /// and the lost masses m, plus grafting and momentum buffers 2·b·m; per bias (not
    /// preconditioned) grafting and momentum 2·m. Oversampling and iterations keep no state.
    fn state_bytes(rank: usize) -> u64 {
        let floats: u64 = WIDTHS
            .windows(2)
            .map(|w| {
                let (b, m) = (w[0] as u64, w[1] as u64);
                let k = (rank as u64).min(b);
                b * k + m * k * k + m + 2 * b * m + 2 * m
            })
            .sum();
        4 * floats
    }

    /// `(modified time, bytes)` of every run's summary.json.
    fn summaries(out: &Path) -> Vec<(String, std::time::SystemTime, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(out.join("runs"))
            .unwrap()
            .map(|e| {
                let dir = e.unwrap().path();
                let p = dir.join("summary.json");
                let name = dir.file_name().unwrap().to_string_lossy().to_string();
                (
                    name,
                    fs::metadata(&p).unwrap().modified().unwrap(),
                    fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The quick ablation end to end (tests 1 and 2 of the brief share its runs): the rows
    /// (the preset trained once for all knobs), finite losses, state bytes from the formula;
    /// then the same command again reuses every run and writes the same CSV, and other settings
    /// are refused before anything trains.
    #[test]
    fn quick_ablation_rows_state_bytes_and_rerun_reuses_every_run() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ablate");
        let args = quick(tmp.path(), &out);
        let no_stop = AtomicBool::new(false);
        run(&args, &no_stop).unwrap();

        let rows = read_csv(&out.join("ablate.csv"));
        let keys: Vec<[&str; 6]> = rows
            .iter()
            .map(|r| [&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]].map(String::as_str))
            .collect();
        assert_eq!(
            keys,
            [
                ["rank", "8", "8", "0", "1", "10"],
                ["rank", "32", "32", "0", "1", "10"],
                ["oversample", "0", "32", "0", "1", "10"],
                ["oversample", "8", "32", "8", "1", "10"],
                ["power_iters", "1", "32", "0", "1", "10"],
                ["power_iters", "2", "32", "0", "2", "10"],
                ["rho_iters", "10", "32", "0", "1", "10"],
                ["rho_iters", "0", "32", "0", "1", "0"],
            ]
        );
        let mut dirs: Vec<String> = fs::read_dir(out.join("runs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        dirs.sort();
        assert_eq!(
            dirs,
            [
                "k32-p0-it1-rho-exact",
                "k32-p0-it1-rho10",
                "k32-p0-it2-rho10",
                "k32-p8-it1-rho10",
                "k8-p0-it1-rho10",
            ]
        );
        let num = |s: &str| s.parse::<f64>().unwrap();
        for r in &rows {
            for cell in [&r[6], &r[7], &r[8], &r[10]] {
                assert!(num(cell).is_finite() && num(cell) > 0.0, "{r:?}");
            }
            let rank: usize = r[2].parse().unwrap();
            assert_eq!(r[9].parse::<u64>().unwrap(), state_bytes(rank), "{r:?}");
        }
        // The differences between ranks, layer by layer: 4·(b·Δk + m·Δ(k²)), k capped at b.
        let bytes_at = |k: &str| -> i64 {
            rows.iter().find(|r| r[0] == "rank" && r[1] == k).unwrap()[9]
                .parse()
                .unwrap()
        };
        let delta: i64 = WIDTHS
            .windows(2)
            .map(|w| {
                let (b, m) = (w[0] as i64, w[1] as i64);
                let (k1, k2) = (8.min(b), 32.min(b));
                4 * (b * (k2 - k1) + m * (k2 * k2 - k1 * k1))
            })
            .sum();
        assert_eq!(bytes_at("32") - bytes_at("8"), delta);
        // The preset's row is the same run under every knob.
        let preset: Vec<&Vec<String>> = rows
            .iter()
            .filter(|r| r[2..6] == ["32", "0", "1", "10"])
            .collect();
        assert_eq!(preset.len(), 4);
        assert!(preset.iter().all(|r| r[6..] == preset[0][6..]));
        // Each row is its run's summary.json.
        let s = read_json(&out.join("runs/k8-p0-it1-rho10/summary.json")).unwrap();
        assert_eq!(s["complete"], true);
        assert_eq!(s["steps"], 2);
        assert_eq!(s["config"]["limit"], 2000);
        assert_eq!(s["config"]["test_limit"], 500);
        assert_eq!(s["config"]["optimizer"]["library"]["rank"], 8);
        assert_eq!(num(&rows[0][6]), s["final_train_loss"].as_f64().unwrap());
        assert_eq!(
            num(&rows[0][8]),
            s["median_opt_step_s"].as_f64().unwrap() * 1e3
        );
        let exact = read_json(&out.join("runs/k32-p0-it1-rho-exact/summary.json")).unwrap();
        assert_eq!(exact["config"]["optimizer"]["library"]["rho_iters"], 0);

        let settings = read_json(&out.join("ablate.json")).unwrap();
        assert_eq!(settings["knobs"]["rank"], json!([8, 32]));
        assert_eq!(settings["epochs"], 1);
        assert_eq!(settings["preset"]["rank"], 32);
        assert_eq!(settings["runs"].as_array().unwrap().len(), 5);
        for stem in [
            "ablate_rank",
            "ablate_oversample",
            "ablate_power_iters",
            "ablate_rho_iters",
            "ablate_time",
        ] {
            for ext in ["png", "svg"] {
                let p = out.join(format!("{stem}.{ext}"));
                assert!(fs::metadata(&p).unwrap().len() > 1000, "{}", p.display());
            }
        }

        // The same command again: nothing retrains, the CSV is the same.
        let csv = fs::read(out.join("ablate.csv")).unwrap();
        let before = summaries(&out);
        run(&args, &no_stop).unwrap();
        assert_eq!(summaries(&out), before);
        assert_eq!(fs::read(out.join("ablate.csv")).unwrap(), csv);

        // Other settings are refused before anything trains, naming the run and the setting.
        let e = run(
            &AblateArgs {
                epochs: Some(2),
                ..args.clone()
            },
            &no_stop,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("k8-p0-it1-rho10") && e.contains("epochs: 1 vs 2"),
            "{e}"
        );
        assert_eq!(summaries(&out), before);
    }

    /// An interrupted run resumes from its checkpoint; a stop before a run trains nothing.
    #[test]
    fn an_interrupted_run_resumes_and_a_stop_trains_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ablate");
        let args = AblateArgs {
            ranks: Some(vec![32]),
            oversample: Some(vec![0]),
            power_iters: Some(vec![1]),
            rho_iters: Some(vec![10]),
            // One step of 1000 images per epoch.
            epochs: Some(2),
            limit: Some(1000),
            test_limit: Some(100),
            ..quick(tmp.path(), &out)
        };
        let stopped = AtomicBool::new(true);
        let e = run(&args, &stopped).unwrap_err().to_string();
        assert!(e.contains("interrupted") && e.contains("0 of 1"), "{e}");
        assert!(!out.join("runs/k32-p0-it1-rho10").exists());

        // The first epoch of the planned run, as if interrupted.
        let planned = plan(&args).unwrap();
        assert_eq!(planned.runs.len(), 1);
        let first = &planned.runs[0];
        let part = training::run(
            &TrainArgs {
                settings: TrainSettings {
                    out: Some(first.dir.clone()),
                    stop_after: Some(1),
                    ..first.settings.clone()
                },
                ..Default::default()
            },
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(!part.summary.complete);
        run(&args, &AtomicBool::new(false)).unwrap();
        let s = read_json(&first.dir.join("summary.json")).unwrap();
        assert_eq!(
            (
                s["complete"].as_bool(),
                s["steps"].as_u64(),
                s["epochs"].as_u64()
            ),
            (Some(true), Some(2), Some(2))
        );
        let rows = read_csv(&out.join("ablate.csv"));
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[0][6],
            s["final_train_loss"].as_f64().unwrap().to_string()
        );
    }

    /// Bad lists and settings are refused before anything is written, naming the flag.
    #[test]
    fn bad_lists_are_refused_naming_the_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ablate");
        let no_stop = AtomicBool::new(false);
        let base = AblateArgs {
            out: out.clone(),
            quick: true,
            data: Some(tmp.path().join("no-mnist-here")),
            ..Default::default()
        };
        let refused = |args: AblateArgs, words: &[&str]| {
            let e = run(&args, &no_stop).unwrap_err().to_string();
            for w in words {
                assert!(e.contains(w), "{e:?} lacks {w:?}");
            }
        };
        refused(
            AblateArgs {
                ranks: Some(vec![]),
                ..base.clone()
            },
            &["--ranks", "empty"],
        );
        refused(
            AblateArgs {
                ranks: Some(vec![8, 0]),
                ..base.clone()
            },
            &["--ranks", "0", "at least 1"],
        );
        refused(
            AblateArgs {
                oversample: Some(vec![0, 8, 0]),
                ..base.clone()
            },
            &["--oversample", "0 is given twice"],
        );
        refused(
            AblateArgs {
                power_iters: Some(vec![0]),
                ..base.clone()
            },
            &["--power-iters", "at least 1"],
        );
        refused(
            AblateArgs {
                rho_iters: Some(vec![]),
                ..base.clone()
            },
            &["--rho-iters", "empty"],
        );
        refused(
            AblateArgs {
                epochs: Some(0),
                ..base.clone()
            },
            &["--epochs"],
        );
        refused(
            AblateArgs {
                lr: Some(-1.0),
                ..base.clone()
            },
            &["--lr"],
        );
        assert!(!out.exists());
        // Missing data: the training's error, naming the configuration.
        refused(base, &["k8-p0-it1-rho10", "no-mnist-here"]);
    }
}
