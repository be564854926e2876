//! `precond compare autoencoder` (the main job) and `precond compare tagger`: train the benchmark
//! with each named optimizer at its preset (one run directory each, under `--out`), then write
//! the report of all of them.
//! Running it again continues: a complete run is kept, an interrupted one is resumed from its
//! checkpoint (bitwise as if never interrupted).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::commands::report;
use crate::training::optimizers::OPTIMIZERS;
use crate::training::{self, Ending, TaggerSettings, TrainArgs, TrainSettings, CHECKPOINT};

/// `precond compare autoencoder` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Optimizers to compare, at their presets (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "adam,shared-basis")]
    pub optimizers: Vec<String>,
    /// Directory for one run directory per optimizer, report.md and the plots
    #[arg(long, default_value = "runs/autoencoder")]
    pub out: PathBuf,
    /// Epochs of every run (the paper trains 100; 10 keep the comparison near 10 minutes on
    /// 2 cores)
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Directory holding the MNIST IDX files [default: ../shared/data/mnist]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Seed of the initialization and the shuffling, the same for every optimizer [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use only the first N training images
    #[arg(long)]
    pub limit: Option<usize>,
    /// Use only the first N test images
    #[arg(long)]
    pub test_limit: Option<usize>,
}

/// `precond compare tagger` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareTaggerArgs {
    /// Optimizers to compare, at their presets (comma-separated)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "adam,block-adam,shampoo-1000,sketchy,shared-basis"
    )]
    pub optimizers: Vec<String>,
    /// Directory for one run directory per optimizer, report.md and the plots
    #[arg(long, default_value = "runs/tagger")]
    pub out: PathBuf,
    /// Epochs of every run
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Seed of the initialization, the shuffling and the dropout, the same for every optimizer
    /// [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use only the first N training sentences
    #[arg(long)]
    pub limit: Option<usize>,
    /// Use only the first N eval and test sentences
    #[arg(long)]
    pub test_limit: Option<usize>,
    #[command(flatten)]
    pub tagger: TaggerSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("unknown optimizer {0:?}; known: {known}", known = OPTIMIZERS.join(", "))]
    Unknown(String),
    #[error("{}: {msg}", dir.display())]
    Existing { dir: PathBuf, msg: String },
    #[error(transparent)]
    Train(#[from] training::TrainError),
    #[error(transparent)]
    Report(#[from] report::ReportError),
}

/// What a run directory holds before this invocation.
#[derive(Debug, PartialEq)]
enum Found {
    Nothing,
    Complete,
    Partial,
}

fn inspect(dir: &Path, epochs: usize) -> Result<Found, CompareError> {
    let existing = |msg: String| CompareError::Existing {
        dir: dir.to_path_buf(),
        msg,
    };
    if !dir.join(CHECKPOINT).is_file() {
        return Ok(Found::Nothing);
    }
    let summary = std::fs::read(dir.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let Some(summary) = summary else {
        // A checkpoint without a readable summary: resuming decides.
        return Ok(Found::Partial);
    };
    let planned = summary["config"]["epochs"].as_u64();
    if planned != Some(epochs as u64) {
        return Err(existing(format!(
            "holds a run of {} epochs, not {epochs}; use another --out",
            planned.map_or("?".into(), |e| e.to_string())
        )));
    }
    Ok(if summary["complete"].as_bool() == Some(true) {
        Found::Complete
    } else {
        Found::Partial
    })
}

/// Runs the autoencoder comparison; returns true if every run completed (false when
/// interrupted).
pub fn run(args: &CompareArgs, stop: &AtomicBool) -> Result<bool, CompareError> {
    let common = TrainSettings {
        data: args.data.clone(),
        epochs: Some(args.epochs),
        seed: args.seed,
        limit: args.limit,
        test_limit: args.test_limit,
        ..TrainSettings::default()
    };
    compare(&args.optimizers, &args.out, common, None, stop)
}

/// Runs the tagger comparison; returns true if every run completed.
pub fn run_tagger(args: &CompareTaggerArgs, stop: &AtomicBool) -> Result<bool, CompareError> {
    let common = TrainSettings {
        epochs: Some(args.epochs),
        seed: args.seed,
        limit: args.limit,
        test_limit: args.test_limit,
        ..TrainSettings::default()
    };
    let tagger = Some(args.tagger.clone());
    compare(&args.optimizers, &args.out, common, tagger, stop)
}

/// Trains `common` (whose `epochs` is set) with each optimizer into `out/<name>`, then reports.
fn compare(
    optimizers: &[String],
    out: &Path,
    common: TrainSettings,
    tagger: Option<TaggerSettings>,
    stop: &AtomicBool,
) -> Result<bool, CompareError> {
    let epochs = common.epochs.unwrap_or(1);
    for name in optimizers {
        if !OPTIMIZERS.contains(&name.as_str()) {
            return Err(CompareError::Unknown(name.clone()));
        }
    }
    let mut dirs = Vec::new();
    for name in optimizers {
        let dir = out.join(name);
        let train_args = match inspect(&dir, epochs)? {
            Found::Complete => {
                eprintln!("{}: complete, kept", dir.display());
                dirs.push(dir);
                continue;
            }
            Found::Partial => TrainArgs {
                settings: TrainSettings {
                    data: common.data.clone(),
                    ..TrainSettings::default()
                },
                config: None,
                resume: Some(dir.clone()),
                tagger: tagger.as_ref().map(|_| TaggerSettings::default()),
            },
            Found::Nothing => TrainArgs {
                settings: TrainSettings {
                    out: Some(dir.clone()),
                    optimizer: Some(name.clone()),
                    ..common.clone()
                },
                config: None,
                resume: None,
                tagger: tagger.clone(),
            },
        };
        let result = training::run(&train_args, stop)?;
        dirs.push(dir);
        if result.summary.ending != Ending::Completed || stop.load(Ordering::SeqCst) {
            eprintln!("interrupted; run the same command again to continue");
            return Ok(false);
        }
    }
    report::cli(&report::ReportArgs {
        dirs,
        out: Some(out.to_path_buf()),
    })?;
    Ok(true)
}
