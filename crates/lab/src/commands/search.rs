//! `precond search autoencoder` and `precond search tagger`: a resumable random hyperparameter
//! search. Trial i draws its hyperparameters from a search space (a TOML file, by default
//! `search/spaces/<task>/<optimizer>.toml`) with a ChaCha8 stream that depends only on the
//! search seed and i, then trains one ordinary run directory `--out/trial-NNN/` through
//! [`training::run`].
//!
//! Outputs in `--out`: `trial-NNN/` (a run directory, plus `sampled.toml`, written before the
//! training starts, and `failed.json` for a trial that diverged), `search.json` (task, optimizer
//! and seed, checked when the search continues), `summary.md` (every trial, sorted by the
//! objective) and `best.toml` (the best trial's values, a `precond train --config` file).
//!
//! Running the same command again continues: a finished trial (complete or failed) is kept, an
//! interrupted one is resumed from its checkpoint, a larger `--trials` adds the missing trials.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use thiserror::Error;

use crate::training::optimizers::{NonFinite, OPTIMIZERS};
use crate::training::{
    self, TaggerSettings, TrainArgs, TrainConfig, TrainError, TrainSettings, CHECKPOINT,
};

/// Where the search spaces live, relative to the repository root.
pub const SPACES_DIR: &str = "search/spaces";
/// The sampled values of a trial, in its run directory.
const SAMPLED: &str = "sampled.toml";
/// The record of a trial that diverged, in its run directory.
const FAILED: &str = "failed.json";
/// Task, optimizer and seed of a search, in `--out`.
const SEARCH_JSON: &str = "search.json";

#[derive(Debug, Error)]
pub enum SearchError {
    /// A bad search-space file (or a sample of it that the optimizer refuses).
    #[error("{path}: {msg}", path = path.display())]
    Space { path: PathBuf, msg: String },
    /// Bad arguments.
    #[error("{0}")]
    Setting(String),
    /// A directory of `--out` that does not belong to this search.
    #[error("{path}: {msg}", path = path.display())]
    Existing { path: PathBuf, msg: String },
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Train(#[from] TrainError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SearchError + '_ {
    move |source| SearchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Command line

/// `precond search` tasks.
#[derive(Debug, clap::Subcommand)]
pub enum SearchTask {
    /// The MNIST autoencoder; objective: the final training loss (lower is better)
    Autoencoder(SearchArgs),
    /// The Transformer tagger; objective: the best eval accuracy (higher is better)
    Tagger(SearchTaggerArgs),
}

/// The search's own options.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchOptions {
    /// Optimizer preset whose hyperparameters are searched: adam, shared-basis,
    /// shared-basis-paper, shampoo-250, shampoo-1000, sketchy, block-adam, soap, muon
    #[arg(long)]
    pub optimizer: String,
    /// Number of trials; the same command with more adds the missing ones
    #[arg(long)]
    pub trials: usize,
    /// Directory of the search: trial-000/, trial-001/, ... (run directories), summary.md,
    /// best.toml
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Search space (TOML) [default: search/spaces/<task>/<optimizer>.toml, relative to the
    /// working directory, else in the source tree]
    #[arg(long, value_name = "FILE")]
    pub space: Option<PathBuf>,
    /// Seed of the sampling: trial i draws from stream i of ChaCha8 seeded with it (the
    /// training's seed is --train-seed)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Training settings passed to every trial (those of `precond train`, less `--out` and
/// `--optimizer`, which the search sets, and with `--seed` as `--train-seed`). A setting that
/// the search space samples cannot be given.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
pub struct PassThrough {
    /// Peak learning rate [default: the preset's]
    #[arg(long)]
    pub lr: Option<f64>,
    /// adam, block-adam, soap: first-moment decay; shared-basis, shampoo, sketchy, muon: momentum
    #[arg(long)]
    pub beta1: Option<f64>,
    /// adam, block-adam, soap, muon (its AdamW): second-moment decay; shared-basis, shampoo,
    /// sketchy: statistics decay
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Epsilon (see `precond train --help`)
    #[arg(long)]
    pub eps: Option<f64>,
    /// Weight decay, coupled (decoupled for soap and muon) [default: 0; soap 0.01]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// shared-basis: rank k of the basis; sketchy: sketch rank
    #[arg(long)]
    pub rank: Option<usize>,
    /// shared-basis: oversampling p of the randomized SVD
    #[arg(long)]
    pub oversample: Option<usize>,
    /// shared-basis: power iterations of the randomized SVD
    #[arg(long)]
    pub power_iters: Option<usize>,
    /// shared-basis: power iterations estimating the lost mass rho (0 = exact)
    #[arg(long)]
    pub rho_iters: Option<usize>,
    /// shared-basis: lost-mass policy (norm, random-start, rayleigh, fd)
    #[arg(long)]
    pub rho: Option<String>,
    /// shared-basis: multiplier on every increment of rho
    #[arg(long)]
    pub rho_scale: Option<f64>,
    /// shared-basis, block-adam: the per-block eigensolver (batched, faer)
    #[arg(long)]
    pub eigensolver: Option<String>,
    /// shampoo, sketchy: largest block side; block-adam: rows per block; soap: largest side
    /// rotated (max_precond_dim)
    #[arg(long)]
    pub block_size: Option<usize>,
    /// shampoo, sketchy: steps between inverse-root recomputations; soap: between eigenbasis
    /// refreshes
    #[arg(long)]
    pub precondition_every: Option<u64>,
    /// ours: grafting: none, sgd, adagrad, rmsprop, rmsprop-normalized, adam
    #[arg(long)]
    pub graft: Option<String>,
    /// ours: Nesterov momentum
    #[arg(long)]
    pub nesterov: Option<bool>,
    /// ours: first step (1-based) of preconditioning
    #[arg(long)]
    pub start_step: Option<u64>,
    /// ours: a gradient with NaN or infinity: error (the trial fails) or skip [default: error]
    #[arg(long, value_enum)]
    pub nonfinite: Option<NonFinite>,
    /// Examples (images, sentences) per step [default: 1000; tagger 128]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Epochs of every trial [default: 100; tagger 30]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Fraction of all steps used for linear warmup [default: 0.05; tagger 0.1]
    #[arg(long)]
    pub warmup_frac: Option<f64>,
    /// Seed of the initialization, the shuffling and the dropout of every trial (`precond
    /// train --seed`) [default: 0]
    #[arg(long)]
    pub train_seed: Option<u64>,
    /// Use only the first N training images (sentences)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Use only the first N test images (eval and test sentences)
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Also write each trial's checkpoint every N epochs
    #[arg(long)]
    pub save_every: Option<usize>,
    /// End each trial after N epochs of this invocation, as if interrupted (the search stops
    /// there too)
    #[arg(long)]
    pub stop_after: Option<usize>,
}

impl PassThrough {
    /// The training settings of these flags (`data`: the autoencoder's `--data`). Every field
    /// is named, so that a new `TrainSettings` field fails to compile here until it is wired.
    pub fn settings(&self, data: Option<PathBuf>) -> TrainSettings {
        let p = self.clone();
        TrainSettings {
            data,
            out: None,
            optimizer: None,
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
            rank: p.rank,
            oversample: p.oversample,
            power_iters: p.power_iters,
            rho_iters: p.rho_iters,
            rho: p.rho,
            rho_scale: p.rho_scale,
            eigensolver: p.eigensolver,
            block_size: p.block_size,
            precondition_every: p.precondition_every,
            graft: p.graft,
            nesterov: p.nesterov,
            start_step: p.start_step,
            nonfinite: p.nonfinite,
            batch_size: p.batch_size,
            epochs: p.epochs,
            warmup_frac: p.warmup_frac,
            seed: p.train_seed,
            limit: p.limit,
            test_limit: p.test_limit,
            save_every: p.save_every,
            stop_after: p.stop_after,
        }
    }

    /// The flags given, as `precond train` spells them (for the comment of `best.toml`).
    fn flags(&self, data: Option<&Path>) -> String {
        let mut flags = Vec::new();
        if let Some(d) = data {
            flags.push(("data".to_string(), serde_json::json!(d)));
        }
        if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(self) {
            for (key, value) in map {
                let key = if key == "train_seed" {
                    "seed".into()
                } else {
                    key
                };
                flags.push((key, value));
            }
        }
        render_flags(flags)
    }
}

/// The tagger's flags given (for the comment of `best.toml`). Every field is named, so that a
/// new `TaggerSettings` field fails to compile here until it is listed.
fn tagger_flags(t: &TaggerSettings) -> String {
    let TaggerSettings {
        train,
        eval,
        test,
        tag,
        min_count,
        size,
        layers,
        width,
        mlp,
        heads,
        dropout,
        embedding,
    } = t;
    let json = |v: &dyn erased::Json| v.json();
    render_flags(vec![
        ("train".into(), json(train)),
        ("eval".into(), json(eval)),
        ("test".into(), json(test)),
        ("tag".into(), json(tag)),
        ("min_count".into(), json(min_count)),
        ("size".into(), json(size)),
        ("layers".into(), json(layers)),
        ("width".into(), json(width)),
        ("mlp".into(), json(mlp)),
        ("heads".into(), json(heads)),
        ("dropout".into(), json(dropout)),
        ("embedding".into(), json(embedding)),
    ])
}

mod erased {
    /// A value as JSON (`null` when it cannot be).
    pub trait Json {
        fn json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}

/// `--key value` for each set (non-null) value, `_` in keys as `-`.
fn render_flags(flags: Vec<(String, serde_json::Value)>) -> String {
    let mut out = Vec::new();
    for (key, value) in flags {
        let flag = key.replace('_', "-");
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => out.push(format!("--{flag} {s}")),
            v => out.push(format!("--{flag} {v}")),
        }
    }
    out.join(" ")
}

/// `precond search autoencoder` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub search: SearchOptions,
    /// Directory holding the MNIST IDX files [default: ../shared/data/mnist]
    #[arg(long, help_heading = "Training (every trial)")]
    pub data: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Training (every trial)")]
    pub train: PassThrough,
}

/// `precond search tagger` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchTaggerArgs {
    #[command(flatten)]
    pub search: SearchOptions,
    #[command(flatten, next_help_heading = "Training (every trial)")]
    pub train: PassThrough,
    #[command(flatten, next_help_heading = "Tagger (every trial)")]
    pub tagger: TaggerSettings,
}

/// A search, ready to run.
#[derive(Debug, Clone)]
pub struct Search {
    pub options: SearchOptions,
    /// The pass-through settings (`out` and `optimizer` unset).
    pub settings: TrainSettings,
    /// `Some` for the tagger.
    pub tagger: Option<TaggerSettings>,
    /// The pass-through flags as given (for `best.toml`'s comment).
    pub flags: String,
}

impl From<&SearchTask> for Search {
    fn from(task: &SearchTask) -> Search {
        match task {
            SearchTask::Autoencoder(a) => Search {
                options: a.search.clone(),
                settings: a.train.settings(a.data.clone()),
                tagger: None,
                flags: a.train.flags(a.data.as_deref()),
            },
            SearchTask::Tagger(a) => Search {
                options: a.search.clone(),
                settings: a.train.settings(None),
                tagger: Some(a.tagger.clone()),
                flags: [a.train.flags(None), tagger_flags(&a.tagger)]
                    .into_iter()
                    .filter(|f| !f.is_empty())
                    .collect::<Vec<_>>()
                    .join(" "),
            },
        }
    }
}

/// `precond search`: runs the search, prints the summary table; true when every trial has
/// finished (false when interrupted).
pub fn command(task: &SearchTask, stop: &AtomicBool) -> Result<bool, SearchError> {
    let outcome = run(&Search::from(task), stop)?;
    println!("{}", outcome.table);
    let count = |s: Status| outcome.rows.iter().filter(|r| r.status == s).count();
    println!(
        "{} complete, {} failed, {} interrupted (summary.md in {})",
        count(Status::Complete),
        count(Status::Failed),
        count(Status::Interrupted),
        task_out(task).display()
    );
    if let (Some(best), Some(row)) = (&outcome.best, outcome.rows.first()) {
        let tagger = matches!(task, SearchTask::Tagger(_));
        println!(
            "best: trial-{:03}, {}: {}; its settings: {}",
            row.trial,
            outcome.objective,
            objective_value(row.objective, tagger),
            best.display()
        );
    }
    Ok(outcome.done)
}

fn task_out(task: &SearchTask) -> &Path {
    match task {
        SearchTask::Autoencoder(a) => &a.search.out,
        SearchTask::Tagger(a) => &a.search.out,
    }
}

// ---------------------------------------------------------------------------------------------
// Search spaces

/// The type of a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
    Str,
    Bool,
}

/// Names a search space may sample, with their types (sorted).
const PARAMS: &[(&str, Kind)] = &[
    ("beta1", Kind::Float),
    ("beta2", Kind::Float),
    ("block_size", Kind::Int),
    ("eps", Kind::Float),
    ("graft", Kind::Str),
    ("lr", Kind::Float),
    ("nesterov", Kind::Bool),
    ("one_minus_beta1", Kind::Float),
    ("one_minus_beta2", Kind::Float),
    ("oversample", Kind::Int),
    ("power_iters", Kind::Int),
    ("precondition_every", Kind::Int),
    ("rank", Kind::Int),
    ("rho", Kind::Str),
    ("rho_iters", Kind::Int),
    ("rho_scale", Kind::Float),
    ("start_step", Kind::Int),
    ("warmup_frac", Kind::Float),
    ("weight_decay", Kind::Float),
];

/// The `TrainSettings` key that parameter `name` sets.
fn setting_key(name: &str) -> &str {
    match name {
        "one_minus_beta1" => "beta1",
        "one_minus_beta2" => "beta2",
        other => other,
    }
}

/// A sampled (or listed) value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Float(f64),
    Int(u64),
    Str(String),
    Bool(bool),
}

impl Value {
    fn to_toml(&self) -> toml::Value {
        match self {
            Value::Float(x) => toml::Value::Float(*x),
            Value::Int(n) => toml::Value::Integer(*n as i64),
            Value::Str(s) => toml::Value::String(s.clone()),
            Value::Bool(b) => toml::Value::Boolean(*b),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Float(x) => serde_json::json!(x),
            Value::Int(n) => serde_json::json!(n),
            Value::Str(s) => serde_json::json!(s),
            Value::Bool(b) => serde_json::json!(b),
        }
    }

    /// A value of a sampled file (`sampled.toml`) as written by [`Value::to_toml`].
    fn from_toml(v: &toml::Value) -> Option<Value> {
        Some(match v {
            toml::Value::Float(x) => Value::Float(*x),
            toml::Value::Integer(n) => Value::Int(u64::try_from(*n).ok()?),
            toml::Value::String(s) => Value::Str(s.clone()),
            toml::Value::Boolean(b) => Value::Bool(*b),
            _ => return None,
        })
    }

    /// Short form for tables.
    fn cell(&self) -> String {
        match self {
            Value::Float(x) => format!("{x:.3e}"),
            Value::Int(n) => n.to_string(),
            Value::Str(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s:?}"),
            other => write!(f, "{}", other.to_toml()),
        }
    }
}

/// One parameter's distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// ln x uniform in [ln low, ln high).
    LogUniform { low: f64, high: f64 },
    /// x uniform in [low, high).
    Uniform { low: f64, high: f64 },
    /// One of the values, equally likely.
    Choice(Vec<Value>),
}

impl Dist {
    fn sample(&self, rng: &mut ChaCha8Rng) -> Value {
        match self {
            Dist::LogUniform { low, high } => {
                let (a, b) = (low.ln(), high.ln());
                let u: f64 = rng.random();
                Value::Float((a + u * (b - a)).exp().clamp(*low, *high))
            }
            Dist::Uniform { low, high } => {
                let u: f64 = rng.random();
                Value::Float((low + u * (high - low)).clamp(*low, *high))
            }
            Dist::Choice(values) => values[rng.random_range(0..values.len())].clone(),
        }
    }

    /// Values that every sample must be able to take: the choices, or the lower bound.
    fn representatives(&self) -> Vec<Value> {
        match self {
            Dist::LogUniform { low, .. } | Dist::Uniform { low, .. } => vec![Value::Float(*low)],
            Dist::Choice(values) => values.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    kind: Kind,
    pub dist: Dist,
}

/// A search space: its file and its parameters, sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    pub path: PathBuf,
    pub params: Vec<Param>,
}

/// The values of one trial, by parameter name (sorted).
pub type Sample = BTreeMap<String, Value>;

impl Space {
    pub fn load(path: &Path) -> Result<Space, SearchError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        Space::parse(path, &text)
    }

    /// Parses and checks a space file's text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Space, SearchError> {
        let bad = |msg: String| SearchError::Space {
            path: path.to_path_buf(),
            msg,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let known = || {
            PARAMS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut params = Vec::new();
        for (name, spec) in &table {
            let Some(&(_, kind)) = PARAMS.iter().find(|(n, _)| n == name) else {
                return Err(bad(format!(
                    "unknown parameter [{name}]; known: {}",
                    known()
                )));
            };
            let spec = spec.as_table().ok_or_else(|| {
                bad(format!(
                    "[{name}] must be a table with dist = \"log-uniform\", \"uniform\" or \"choice\""
                ))
            })?;
            let dist = parse_dist(name, kind, spec).map_err(bad)?;
            params.push(Param {
                name: name.clone(),
                kind,
                dist,
            });
        }
        if params.is_empty() {
            return Err(bad("no parameters: nothing to search".into()));
        }
        for (a, b) in [("beta1", "one_minus_beta1"), ("beta2", "one_minus_beta2")] {
            if table.contains_key(a) && table.contains_key(b) {
                return Err(bad(format!(
                    "[{a}] and [{b}] set the same setting; keep one"
                )));
            }
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Space {
            path: path.to_path_buf(),
            params,
        })
    }

    /// Trial `trial`'s values: ChaCha8 seeded with `seed`, stream `trial`; parameters in name
    /// order. They depend on nothing else (not on the other trials).
    pub fn sample(&self, seed: u64, trial: usize) -> Sample {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(trial as u64);
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.dist.sample(&mut rng)))
            .collect()
    }
}

/// One parameter's table: `dist` and its fields, checked against the parameter's type.
fn parse_dist(name: &str, kind: Kind, spec: &toml::Table) -> Result<Dist, String> {
    let dist = match spec.get("dist") {
        Some(toml::Value::String(d)) => d.as_str(),
        Some(_) => return Err(format!("[{name}]: dist must be a string")),
        None => {
            return Err(format!(
                "[{name}]: missing dist (\"log-uniform\", \"uniform\" or \"choice\")"
            ))
        }
    };
    let allowed: &[&str] = match dist {
        "log-uniform" | "uniform" => &["dist", "low", "high"],
        "choice" => &["dist", "values"],
        other => {
            return Err(format!(
                "[{name}]: unknown dist {other:?}; known: log-uniform, uniform, choice"
            ))
        }
    };
    if let Some(key) = spec.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "[{name}]: unknown key {key:?} for dist = {dist:?} (allowed: {})",
            allowed.join(", ")
        ));
    }
    let kind_name = match kind {
        Kind::Float => "a number",
        Kind::Int => "an integer",
        Kind::Str => "a string",
        Kind::Bool => "a boolean",
    };
    if dist == "choice" {
        let values = match spec.get("values") {
            Some(toml::Value::Array(a)) => a,
            Some(_) => return Err(format!("[{name}]: values must be a list")),
            None => return Err(format!("[{name}]: choice needs values = [...]")),
        };
        if values.is_empty() {
            return Err(format!("[{name}]: values is empty"));
        }
        let mut out = Vec::new();
        for v in values {
            let value = match (kind, v) {
                (Kind::Float, toml::Value::Float(x)) if x.is_finite() => Value::Float(*x),
                (Kind::Float, toml::Value::Integer(n)) => Value::Float(*n as f64),
                (Kind::Int, toml::Value::Integer(n)) if *n >= 0 => Value::Int(*n as u64),
                (Kind::Str, toml::Value::String(s)) => Value::Str(s.clone()),
                (Kind::Bool, toml::Value::Boolean(b)) => Value::Bool(*b),
                _ => {
                    return Err(format!(
                        "[{name}]: value {v} has the wrong type: {name} takes {kind_name}{}",
                        if kind == Kind::Int {
                            " (non-negative)"
                        } else if kind == Kind::Float {
                            " (finite)"
                        } else {
                            ""
                        }
                    ))
                }
            };
            out.push(value);
        }
        return Ok(Dist::Choice(out));
    }
    if kind != Kind::Float {
        return Err(format!(
            "[{name}]: {name} takes {kind_name}: use dist = \"choice\" with values = [...]"
        ));
    }
    let bound = |key: &str| -> Result<f64, String> {
        match spec.get(key) {
            Some(toml::Value::Float(x)) => Ok(*x),
            Some(toml::Value::Integer(n)) => Ok(*n as f64),
            Some(v) => Err(format!("[{name}]: {key} = {v} is not a number")),
            None => Err(format!("[{name}]: {dist} needs low and high")),
        }
    };
    let (low, high) = (bound("low")?, bound("high")?);
    if !(low.is_finite() && high.is_finite()) {
        return Err(format!("[{name}]: low and high must be finite"));
    }
    if low >= high {
        return Err(format!("[{name}]: low ({low}) must be below high ({high})"));
    }
    if dist == "log-uniform" {
        if low <= 0.0 {
            return Err(format!(
                "[{name}]: log-uniform needs a positive low (got {low}); use uniform or choice \
                 for a range that includes 0"
            ));
        }
        Ok(Dist::LogUniform { low, high })
    } else {
        Ok(Dist::Uniform { low, high })
    }
}

/// Whether the pass-through settings `s` give the setting `key`.
fn is_given(s: &TrainSettings, key: &str) -> bool {
    match key {
        "lr" => s.lr.is_some(),
        "beta1" => s.beta1.is_some(),
        "beta2" => s.beta2.is_some(),
        "eps" => s.eps.is_some(),
        "weight_decay" => s.weight_decay.is_some(),
        "rank" => s.rank.is_some(),
        "oversample" => s.oversample.is_some(),
        "power_iters" => s.power_iters.is_some(),
        "rho_iters" => s.rho_iters.is_some(),
        "rho" => s.rho.is_some(),
        "rho_scale" => s.rho_scale.is_some(),
        "block_size" => s.block_size.is_some(),
        "precondition_every" => s.precondition_every.is_some(),
        "graft" => s.graft.is_some(),
        "nesterov" => s.nesterov.is_some(),
        "start_step" => s.start_step.is_some(),
        "warmup_frac" => s.warmup_frac.is_some(),
        _ => false,
    }
}

/// Sets parameter `name` (of [`PARAMS`]) to `value` in `s` (`one_minus_beta1` as
/// `beta1 = 1 − value`). The space's parser has checked the type.
fn apply(s: &mut TrainSettings, name: &str, value: &Value) {
    let float = || match value {
        Value::Float(x) => Some(*x),
        _ => None,
    };
    let int = || match value {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    let usize_ = || int().and_then(|n| usize::try_from(n).ok());
    match name {
        "lr" => s.lr = float(),
        "beta1" => s.beta1 = float(),
        "beta2" => s.beta2 = float(),
        "one_minus_beta1" => s.beta1 = float().map(|x| 1.0 - x),
        "one_minus_beta2" => s.beta2 = float().map(|x| 1.0 - x),
        "eps" => s.eps = float(),
        "weight_decay" => s.weight_decay = float(),
        "warmup_frac" => s.warmup_frac = float(),
        "rank" => s.rank = usize_(),
        "oversample" => s.oversample = usize_(),
        "power_iters" => s.power_iters = usize_(),
        "rho_iters" => s.rho_iters = usize_(),
        "rho_scale" => s.rho_scale = float(),
        "rho" => {
            s.rho = match value {
                Value::Str(r) => Some(r.clone()),
                _ => None,
            }
        }
        "block_size" => s.block_size = usize_(),
        "precondition_every" => s.precondition_every = int(),
        "start_step" => s.start_step = int(),
        "graft" => {
            s.graft = match value {
                Value::Str(g) => Some(g.clone()),
                _ => None,
            }
        }
        "nesterov" => {
            s.nesterov = match value {
                Value::Bool(b) => Some(*b),
                _ => None,
            }
        }
        _ => {}
    }
}

/// The settings key and value that a sampled value sets (for `best.toml`).
fn setting_value(name: &str, value: &Value) -> Value {
    match (name, value) {
        ("one_minus_beta1" | "one_minus_beta2", Value::Float(x)) => Value::Float(1.0 - x),
        _ => value.clone(),
    }
}

fn describe(sample: &Sample) -> String {
    sample
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// The search

/// The search space file of `optimizer` on `task` when `--space` is not given:
/// `search/spaces/<task>/<optimizer>.toml` relative to the working directory, else in the source
/// tree.
fn default_space(task: &str, optimizer: &str) -> Result<PathBuf, SearchError> {
    let file = Path::new(task).join(format!("{optimizer}.toml"));
    let relative = Path::new(SPACES_DIR).join(&file);
    if relative.is_file() {
        return Ok(relative);
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(SPACES_DIR)
        .join(&file);
    if source.is_file() {
        return Ok(source);
    }
    Err(SearchError::Setting(format!(
        "no search space for {optimizer} on the {task}: neither {} nor {} exists; give --space FILE",
        relative.display(),
        source.display()
    )))
}

/// What a trial directory holds before this invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Nothing to resume (no directory, or no checkpoint): train afresh.
    Fresh,
    /// A checkpoint of an unfinished run: resume it.
    Partial,
    Complete,
    Failed,
}

/// One trial as planned.
struct Trial {
    index: usize,
    dir: PathBuf,
    sample: Sample,
    /// The trial's settings: pass-through, optimizer, sampled values (`out` unset).
    settings: TrainSettings,
    found: Found,
}

/// How a trial stands, for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Complete,
    Interrupted,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Complete => "complete",
            Status::Interrupted => "interrupted",
            Status::Failed => "failed",
        }
    }
}

/// One row of `summary.md`.
#[derive(Debug, Clone)]
pub struct Row {
    pub trial: usize,
    pub status: Status,
    /// Autoencoder: the final training loss; tagger: the best eval accuracy in [0, 1].
    pub objective: Option<f64>,
    pub sample: Sample,
    pub wall_s: Option<f64>,
}

/// The outcome of [`run`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every trial finished (false: interrupted).
    pub done: bool,
    /// `summary.md`'s table.
    pub table: String,
    /// The rows, best first (failed last).
    pub rows: Vec<Row>,
    /// `best.toml`, when a trial is complete.
    pub best: Option<PathBuf>,
    /// The objective's name.
    pub objective: &'static str,
}

/// `search.json`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct SearchRecord {
    task: String,
    optimizer: String,
    seed: u64,
}

fn trial_dir(out: &Path, i: usize) -> PathBuf {
    out.join(format!("trial-{i:03}"))
}

/// Runs (or continues) the search: trials `0..trials`, then `summary.md` and `best.toml`.
pub fn run(search: &Search, stop: &AtomicBool) -> Result<Outcome, SearchError> {
    let opts = &search.options;
    let name = opts.optimizer.as_str();
    let tagger = search.tagger.as_ref();
    let task = if tagger.is_some() {
        "tagger"
    } else {
        "autoencoder"
    };
    if !OPTIMIZERS.contains(&name) {
        return Err(SearchError::Setting(format!(
            "unknown optimizer {name:?}; known: {}",
            OPTIMIZERS.join(", ")
        )));
    }
    if opts.trials == 0 {
        return Err(SearchError::Setting("--trials must be at least 1".into()));
    }
    if search.settings.out.is_some() || search.settings.optimizer.is_some() {
        return Err(SearchError::Setting(
            "the search sets each trial's --out and --optimizer (use the search's --out DIR and \
             --optimizer NAME)"
                .into(),
        ));
    }
    let space_path = match &opts.space {
        Some(p) => p.clone(),
        None => default_space(task, name)?,
    };
    let space = Space::load(&space_path)?;
    let space_err = |msg: String| SearchError::Space {
        path: space_path.clone(),
        msg,
    };
    for p in &space.params {
        let key = setting_key(&p.name);
        if is_given(&search.settings, key) {
            return Err(SearchError::Setting(format!(
                "--{} is given, but the search space {} samples it ([{}]); drop the flag or the \
                 parameter",
                key.replace('_', "-"),
                space_path.display(),
                p.name
            )));
        }
    }
    let base = TrainSettings {
        optimizer: Some(name.to_string()),
        ..search.settings.clone()
    };
    // The flags alone must make a valid run; then each parameter's values, one at a time (so
    // that the error names it); then every trial's sample.
    TrainConfig::resolve(&base, tagger)?;
    for p in &space.params {
        for v in p.dist.representatives() {
            let mut s = base.clone();
            apply(&mut s, &p.name, &v);
            TrainConfig::resolve(&s, tagger)
                .map_err(|e| space_err(format!("[{}] = {v} with {name}: {e}", p.name)))?;
        }
    }

    // Every trial's sample must make a valid run too.
    let mut drawn = Vec::with_capacity(opts.trials);
    for i in 0..opts.trials {
        let sample = space.sample(opts.seed, i);
        let mut settings = base.clone();
        for (k, v) in &sample {
            apply(&mut settings, k, v);
        }
        let config = TrainConfig::resolve(&settings, tagger)
            .map_err(|e| space_err(format!("trial {i} draws {}: {e}", describe(&sample))))?;
        drawn.push((sample, settings, config));
    }

    fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    check_record(
        &opts.out,
        &SearchRecord {
            task: task.into(),
            optimizer: name.into(),
            seed: opts.seed,
        },
    )?;
    // Check what the trial directories hold before training any.
    let mut plan = Vec::with_capacity(opts.trials);
    for (i, (sample, settings, config)) in drawn.into_iter().enumerate() {
        let dir = trial_dir(&opts.out, i);
        let found = inspect(&dir, &sample, &config, opts.seed, &space_path)?;
        plan.push(Trial {
            index: i,
            dir,
            sample,
            settings,
            found,
        });
    }

    let mut done = true;
    for trial in &plan {
        match trial.found {
            Found::Complete => {
                eprintln!("{}: complete, kept", trial.dir.display());
                continue;
            }
            Found::Failed => {
                eprintln!("{}: failed, kept", trial.dir.display());
                continue;
            }
            Found::Fresh | Found::Partial => {}
        }
        if stop.load(Ordering::SeqCst) {
            done = false;
            break;
        }
        fs::create_dir_all(&trial.dir).map_err(io_err(&trial.dir))?;
        let sampled = trial.dir.join(SAMPLED);
        if !sampled.is_file() {
            let text = sampled_toml(trial, opts.seed, &space_path);
            training::write_atomic(&sampled, text.as_bytes())?;
        }
        let args = match trial.found {
            Found::Partial => TrainArgs {
                settings: trial.settings.clone(),
                config: None,
                resume: Some(trial.dir.clone()),
                tagger: search.tagger.clone(),
            },
            _ => TrainArgs {
                settings: TrainSettings {
                    out: Some(trial.dir.clone()),
                    ..trial.settings.clone()
                },
                config: None,
                resume: None,
                tagger: search.tagger.clone(),
            },
        };
        eprintln!(
            "{} ({} of {}{}): {}",
            trial.dir.display(),
            trial.index + 1,
            opts.trials,
            if trial.found == Found::Partial {
                ", resumed"
            } else {
                ""
            },
            describe(&trial.sample)
        );
        let t0 = Instant::now();
        match training::run(&args, stop) {
            Ok(r) => {
                if !r.summary.complete || stop.load(Ordering::SeqCst) {
                    done = false;
                    break;
                }
            }
            Err(
                e @ (TrainError::Diverged { .. }
                | TrainError::NonFinite { .. }
                | TrainError::LinalgFailure { .. }),
            ) => {
                eprintln!("{}: failed: {e}", trial.dir.display());
                let record = serde_json::json!({
                    "trial": trial.index,
                    "error": e.to_string(),
                    "sampled": trial
                        .sample
                        .iter()
                        .map(|(k, v)| (k.clone(), v.to_json()))
                        .collect::<serde_json::Map<_, _>>(),
                    "wall_s": t0.elapsed().as_secs_f64(),
                });
                let json = serde_json::to_string_pretty(&record).unwrap_or_default();
                training::write_atomic(&trial.dir.join(FAILED), json.as_bytes())?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !done {
        eprintln!("search interrupted; run the same command again to continue");
    }

    // Report what the directories hold.
    let mut rows = Vec::new();
    for trial in &plan {
        if let Some(row) = load_row(trial, tagger.is_some()) {
            rows.push(row);
        }
    }
    let higher_is_better = tagger.is_some();
    sort_rows(&mut rows, higher_is_better);
    let objective = if higher_is_better {
        "best eval accuracy (higher is better)"
    } else {
        "final train loss (lower is better)"
    };
    let columns: Vec<String> = space.params.iter().map(|p| p.name.clone()).collect();
    let table = table(&rows, &columns, higher_is_better);
    let mut md =
        format!(
        "# precond search {task} --optimizer {name}\n\n{} of {} trials finished; seed {}, space \
         {}{}.\nObjective: {objective}.\n\n",
        rows.iter().filter(|r| r.status != Status::Interrupted).count(),
        opts.trials,
        opts.seed,
        space_path.display(),
        if search.flags.is_empty() {
            String::new()
        } else {
            format!(", every trial with {}", search.flags)
        },
    );
    md.push_str(&table);
    let summary = opts.out.join("summary.md");
    fs::write(&summary, md).map_err(io_err(&summary))?;

    let best = match rows.first().filter(|r| r.status == Status::Complete) {
        Some(row) => {
            let path = opts.out.join("best.toml");
            let text = best_toml(search, task, &space_path, row, objective);
            fs::write(&path, text).map_err(io_err(&path))?;
            Some(path)
        }
        None => None,
    };
    Ok(Outcome {
        done,
        table,
        rows,
        best,
        objective,
    })
}

/// Writes `search.json` in a new search; in an existing one, checks that it is the same search.
fn check_record(out: &Path, record: &SearchRecord) -> Result<(), SearchError> {
    let path = out.join(SEARCH_JSON);
    match fs::read(&path) {
        Ok(bytes) => {
            let old: SearchRecord =
                serde_json::from_slice(&bytes).map_err(|e| SearchError::Existing {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            if &old != record {
                return Err(SearchError::Existing {
                    path,
                    msg: format!(
                        "holds a search of {} with --optimizer {} --seed {}, not {} with \
                         --optimizer {} --seed {}; continue it with those or use another --out",
                        old.task,
                        old.optimizer,
                        old.seed,
                        record.task,
                        record.optimizer,
                        record.seed
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let json = serde_json::to_string_pretty(record).unwrap_or_default();
            training::write_atomic(&path, json.as_bytes())?;
            Ok(())
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// What `dir` holds; checks that its recorded sample and config are this trial's.
fn inspect(
    dir: &Path,
    sample: &Sample,
    config: &TrainConfig,
    seed: u64,
    space: &Path,
) -> Result<Found, SearchError> {
    let existing = |msg: String| SearchError::Existing {
        path: dir.to_path_buf(),
        msg,
    };
    let sampled = dir.join(SAMPLED);
    if sampled.is_file() {
        let recorded = read_sample(&sampled)?;
        if &recorded != sample {
            return Err(existing(format!(
                "{SAMPLED} records {}, but --seed {seed} and {} draw {}: the space or the seed \
                 changed; use the original ones or another --out",
                describe(&recorded),
                space.display(),
                describe(sample)
            )));
        }
    }
    if dir.join(FAILED).is_file() {
        return Ok(Found::Failed);
    }
    if !dir.join(CHECKPOINT).is_file() {
        return Ok(Found::Fresh);
    }
    let Some(summary) = read_json(&dir.join("summary.json")) else {
        // A checkpoint without a readable summary: resuming checks its settings.
        return Ok(Found::Partial);
    };
    let mut want = serde_json::to_value(config).unwrap_or_default();
    let mut have = summary["config"].clone();
    // The data directory may move (as `precond train --resume --data`).
    for v in [&mut want, &mut have] {
        if let Some(m) = v.as_object_mut() {
            m.remove("data");
        }
    }
    let mut diffs = Vec::new();
    diff("", &have, &want, &mut diffs);
    if !diffs.is_empty() {
        return Err(existing(format!(
            "holds a run with other settings ({}: recorded vs now); continue the search with \
             its original flags or use another --out",
            diffs.join("; ")
        )));
    }
    Ok(if summary["complete"].as_bool() == Some(true) {
        Found::Complete
    } else {
        Found::Partial
    })
}

/// The paths where `a` and `b` differ, as `path: a vs b`.
/// The differences between two JSON values as `path: a vs b` lines (keys joined by `.`).
pub(crate) fn diff(
    path: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value as J;
    match (a, b) {
        (J::Object(x), J::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    &p,
                    x.get(k).unwrap_or(&J::Null),
                    y.get(k).unwrap_or(&J::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

/// A JSON file, or `None` when it is missing or unreadable.
pub(crate) fn read_json(path: &Path) -> Option<serde_json::Value> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Reads a trial's `sampled.toml`.
fn read_sample(path: &Path) -> Result<Sample, SearchError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let bad = |msg: String| SearchError::Existing {
        path: path.to_path_buf(),
        msg,
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    table
        .iter()
        .map(|(k, v)| {
            Value::from_toml(v)
                .map(|v| (k.clone(), v))
                .ok_or_else(|| bad(format!("{k}: not a sampled value")))
        })
        .collect()
}

fn sampled_toml(trial: &Trial, seed: u64, space: &Path) -> String {
    let table: toml::Table = trial
        .sample
        .iter()
        .map(|(k, v)| (k.clone(), v.to_toml()))
        .collect();
    format!(
        "# Trial {} of `precond search` (seed {seed}, stream {0}), drawn from {}\n{}",
        trial.index,
        space.display(),
        toml::to_string(&table).unwrap_or_default()
    )
}

/// The table row of a planned trial, from what its directory holds (None: not started).
fn load_row(trial: &Trial, tagger: bool) -> Option<Row> {
    let dir = &trial.dir;
    let row = |status, objective, wall_s| Row {
        trial: trial.index,
        status,
        objective,
        sample: trial.sample.clone(),
        wall_s,
    };
    if let Some(failed) = read_json(&dir.join(FAILED)) {
        return Some(row(Status::Failed, None, failed["wall_s"].as_f64()));
    }
    if let Some(s) = read_json(&dir.join("summary.json")) {
        let objective = if tagger {
            s["best_eval"].as_f64()
        } else {
            s["final_train_loss"].as_f64()
        };
        let status = if s["complete"].as_bool() == Some(true) {
            Status::Complete
        } else {
            Status::Interrupted
        };
        return Some(row(status, objective, s["wall_s"].as_f64()));
    }
    // Started (sampled.toml written) but no summary yet: stopped before its first save.
    dir.join(SAMPLED)
        .is_file()
        .then(|| row(Status::Interrupted, None, None))
}

/// Complete trials by objective (best first), then interrupted, then failed ones; ties and the
/// rest by trial number.
fn sort_rows(rows: &mut [Row], higher_is_better: bool) {
    rows.sort_by(|a, b| {
        let by_status = a.status.cmp(&b.status);
        let by_objective = || {
            if a.status != Status::Complete {
                return std::cmp::Ordering::Equal;
            }
            // A missing objective sorts last.
            let key = |r: &Row| match r.objective {
                Some(x) if x.is_finite() => {
                    if higher_is_better {
                        -x
                    } else {
                        x
                    }
                }
                _ => f64::INFINITY,
            };
            key(a).total_cmp(&key(b))
        };
        by_status
            .then_with(by_objective)
            .then(a.trial.cmp(&b.trial))
    });
}

/// The Markdown table of `rows`.
fn table(rows: &[Row], columns: &[String], percent: bool) -> String {
    let head = if percent {
        "best eval accuracy (%)"
    } else {
        "final train loss"
    };
    let mut t = format!("| trial | status | {head} |");
    for c in columns {
        let _ = write!(t, " {c} |");
    }
    t.push_str(" wall (s) |\n|---|---|---:|");
    for _ in columns {
        t.push_str("---|");
    }
    t.push_str("---:|\n");
    for r in rows {
        let objective = match r.objective {
            Some(x) if percent => format!("{:.2}", 100.0 * x),
            Some(x) => format!("{x:.4}"),
            None => "-".into(),
        };
        let _ = write!(
            t,
            "| {:03} | {} | {objective} |",
            r.trial,
            r.status.as_str()
        );
        for c in columns {
            let cell = r.sample.get(c).map_or("-".into(), Value::cell);
            let _ = write!(t, " {cell} |");
        }
        let wall = r.wall_s.map_or("-".into(), |w| format!("{w:.1}"));
        let _ = writeln!(t, " {wall} |");
    }
    t
}

/// The objective as shown: a loss, or an accuracy in percent.
fn objective_value(objective: Option<f64>, percent: bool) -> String {
    match objective {
        Some(x) if percent => format!("{:.2}%", 100.0 * x),
        Some(x) => format!("{x:.4}"),
        None => "-".into(),
    }
}

/// `best.toml`: the optimizer and the best trial's values as `precond train` settings.
fn best_toml(search: &Search, task: &str, space: &Path, row: &Row, objective: &str) -> String {
    let opts = &search.options;
    let value = objective_value(row.objective, search.tagger.is_some());
    let table: toml::Table = row
        .sample
        .iter()
        .map(|(k, v)| (setting_key(k).to_string(), setting_value(k, v).to_toml()))
        .collect();
    let mut text = format!(
        "# The best trial of `precond search {task} --optimizer {name} --seed {seed}` (space \
         {space}) in {out}:\n# trial-{trial:03}, {objective}: {value}.\n",
        name = opts.optimizer,
        seed = opts.seed,
        space = space.display(),
        out = opts.out.display(),
        trial = row.trial,
    );
    if !search.flags.is_empty() {
        let _ = writeln!(
            text,
            "# Every trial also had: {} (not written below; give them again to reproduce it).",
            search.flags
        );
    }
    let _ = writeln!(
        text,
        "# Train with it: precond train {task} --config {}",
        opts.out.join("best.toml").display()
    );
    let _ = writeln!(text, "optimizer = {:?}", opts.optimizer);
    text.push_str(&toml::to_string(&table).unwrap_or_default());
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        task: SearchTask,
    }

    fn parse(args: &[&str]) -> Result<Search, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("search").chain(args.iter().copied()))?;
        Ok(Search::from(&cli.task))
    }

    fn space(text: &str) -> Space {
        Space::parse(Path::new("test.toml"), text).unwrap()
    }

    fn space_error(text: &str) -> String {
        Space::parse(Path::new("spaces/x.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let s = parse(&[
            "autoencoder",
            "--optimizer",
            "adam",
            "--trials",
            "3",
            "--out",
            "x",
            "--seed",
            "7",
            "--train-seed",
            "2",
            "--epochs",
            "4",
        ])
        .unwrap();
        assert_eq!(s.options.trials, 3);
        assert_eq!(s.options.seed, 7);
        assert_eq!(s.settings.seed, Some(2));
        assert_eq!(s.settings.epochs, Some(4));
        assert_eq!(
            (s.settings.out.clone(), s.settings.optimizer.clone()),
            (None, None)
        );
        assert_eq!(s.flags, "--epochs 4 --seed 2");
        let t = parse(&[
            "tagger",
            "--optimizer",
            "sketchy",
            "--trials",
            "1",
            "--out",
            "y",
            "--layers",
            "1",
        ])
        .unwrap();
        assert_eq!(t.flags, "--layers 1");
        assert_eq!(t.tagger.unwrap().layers, Some(1));
        assert!(parse(&[
            "tagger",
            "--optimizer",
            "adam",
            "--trials",
            "1",
            "--out",
            "y",
            "--data",
            "d"
        ])
        .is_err());
    }

    #[test]
    fn sampler_statistics_and_determinism() {
        let s = space(
            r#"
            [lr]
            dist = "log-uniform"
            low = 1e-5
            high = 1e-1
            [warmup_frac]
            dist = "uniform"
            low = 0.2
            high = 0.6
            [graft]
            dist = "choice"
            values = ["sgd", "adam", "rmsprop", "adagrad"]
            "#,
        );
        let names: Vec<&str> = s.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["graft", "lr", "warmup_frac"]);
        let n = 20_000;
        let (mut sum_ln, mut sum_u) = (0.0, 0.0);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..n {
            let sample = s.sample(11, i);
            let Value::Float(lr) = sample["lr"] else {
                panic!("lr {:?}", sample["lr"])
            };
            assert!((1e-5..=1e-1).contains(&lr), "lr {lr}");
            sum_ln += lr.ln();
            let Value::Float(w) = sample["warmup_frac"] else {
                panic!()
            };
            assert!((0.2..0.6).contains(&w), "warmup_frac {w}");
            sum_u += w;
            let Value::Str(g) = &sample["graft"] else {
                panic!()
            };
            *counts.entry(g.clone()).or_default() += 1;
        }
        let mid = (1e-5f64.ln() + 1e-1f64.ln()) / 2.0;
        let mean_ln = sum_ln / n as f64;
        assert!((mean_ln - mid).abs() < 0.05, "mean ln {mean_ln} vs {mid}");
        // Uniform on [0.2, 0.6): mean 0.4, standard error 0.4/sqrt(12 n) ≈ 0.0008.
        let mean_u = sum_u / n as f64;
        assert!((mean_u - 0.4).abs() < 0.005, "uniform mean {mean_u}");
        assert_eq!(counts.len(), 4);
        for (g, c) in &counts {
            // Expected 5000, standard deviation ≈ 61.
            assert!((*c as f64 - 5000.0).abs() < 300.0, "{g}: {c}");
        }
        // Trial i depends on (seed, i) only.
        assert_eq!(s.sample(11, 5), s.sample(11, 5));
        assert_ne!(s.sample(11, 5), s.sample(11, 6));
        assert_ne!(s.sample(11, 5), s.sample(12, 5));
    }

    #[test]
    fn shipped_spaces_cover_the_presets() {
        use crate::training::optimizers::{autoencoder_searched, default_lr, default_tagger_lr};
        for task in ["autoencoder", "tagger"] {
            let tagger = (task == "tagger").then(TaggerSettings::default);
            for name in OPTIMIZERS {
                let path = default_space(task, name).unwrap();
                let space = Space::load(&path).unwrap();
                let Some(lr) = space.params.iter().find(|p| p.name == "lr") else {
                    panic!("{task} {name}: no lr")
                };
                let Dist::LogUniform { low, high } = lr.dist else {
                    panic!("{task} {name}: lr {:?}", lr.dist)
                };
                // Two decades, centred on this task's preset; a preset that is a draw of the
                // space itself (the autoencoder's searched ones, whose spaces stay centred on
                // the preset searched from, so that the search repeats) need only lie inside.
                let preset = match tagger {
                    None => default_lr(name).unwrap(),
                    Some(_) => default_tagger_lr(name).unwrap(),
                };
                let below = (preset / low).log10();
                let above = (high / preset).log10();
                let centred = (below - 1.0).abs() < 1e-9 && (above - 1.0).abs() < 1e-9;
                let searched = tagger.is_none() && autoencoder_searched(name).is_some();
                assert!(
                    ((below + above) - 2.0).abs() < 1e-9
                        && (centred || (searched && below > 0.0 && above > 0.0)),
                    "{task} {name}: {preset} in [{low}, {high}]"
                );
                // The grafting stays the preset's: the lr range is meant for it.
                assert!(
                    space.params.iter().all(|p| p.name != "graft"),
                    "{task} {name}"
                );
                let base = TrainSettings {
                    optimizer: Some(name.to_string()),
                    ..Default::default()
                };
                for i in 0..100 {
                    let mut s = base.clone();
                    for (k, v) in &space.sample(0, i) {
                        apply(&mut s, k, v);
                    }
                    let c = TrainConfig::resolve(&s, tagger.as_ref()).unwrap();
                    assert!((0.7..=0.99).contains(&c.optimizer.beta1), "{name}: {c:?}");
                    assert_eq!(s.lr, Some(c.optimizer.lr));
                    assert!(
                        low <= c.optimizer.lr && c.optimizer.lr < high,
                        "{name}: {c:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn searched_autoencoder_presets_are_draws_of_their_spaces() {
        use crate::training::optimizers::autoencoder_searched;
        let names: Vec<&str> = OPTIMIZERS
            .iter()
            .copied()
            .filter(|name| autoencoder_searched(name).is_some())
            .collect();
        assert_eq!(
            names,
            ["shampoo-1000", "sketchy", "block-adam", "soap", "muon"]
        );
        for name in names {
            let space = Space::load(&default_space("autoencoder", name).unwrap()).unwrap();
            let searched = autoencoder_searched(name).unwrap();
            let draw = space.sample(0, searched.trial);
            let float = |key: &str| match draw.get(key) {
                Some(Value::Float(x)) => Some(*x),
                None => None,
                other => panic!("{name} {key}: {other:?}"),
            };
            // Bit for bit: the preset is the measured run's configuration.
            assert_eq!(float("lr"), Some(searched.lr), "{name}");
            assert_eq!(
                float("one_minus_beta1").map(|x| 1.0 - x),
                Some(searched.beta1),
                "{name}"
            );
            // β2 exactly where the space searches it.
            assert_eq!(
                float("one_minus_beta2").map(|x| 1.0 - x),
                searched.beta2,
                "{name}"
            );
            assert_eq!(float("eps"), Some(searched.eps), "{name}");
            let c = TrainConfig::from_settings(&TrainSettings {
                optimizer: Some(name.to_string()),
                ..Default::default()
            })
            .unwrap();
            let o = &c.optimizer;
            assert_eq!(
                (o.lr, o.beta1, o.eps),
                (searched.lr, searched.beta1, searched.eps),
                "{name}"
            );
            if let Some(beta2) = searched.beta2 {
                assert_eq!(o.beta2, beta2, "{name}");
            }
        }
    }

    /// A search over the synthetic MNIST: 2 steps per trial, each a few hundred ms.
    fn fixture(tmp: &Path) -> PathBuf {
        let data = tmp.join("mnist");
        mnist::write_fixture(&data, 64, 32, true).unwrap();
        data
    }

    fn search(data: &Path, out: &Path, space: &Path, trials: usize) -> Search {
        Search {
            options: SearchOptions {
                optimizer: "adam".into(),
                trials,
                out: out.to_path_buf(),
                space: Some(space.to_path_buf()),
                seed: 3,
            },
            settings: TrainSettings {
                data: Some(data.to_path_buf()),
                limit: Some(64),
                test_limit: Some(32),
                batch_size: Some(32),
                epochs: Some(1),
                ..Default::default()
            },
            tagger: None,
            flags: "--epochs 1".into(),
        }
    }

    const LR_SPACE: &str = "[lr]\ndist = \"log-uniform\"\nlow = 1e-4\nhigh = 1e-2\n\
                            [one_minus_beta1]\ndist = \"log-uniform\"\nlow = 0.01\nhigh = 0.3\n";

    #[test]
    fn resume_adds_only_the_missing_trials_and_best_toml_parses() {
        let tmp = tempfile::tempdir().unwrap();
        let data = fixture(tmp.path());
        let space_path = tmp.path().join("space.toml");
        fs::write(&space_path, LR_SPACE).unwrap();
        let out = tmp.path().join("search");
        let no_stop = AtomicBool::new(false);
        let first = run(&search(&data, &out, &space_path, 2), &no_stop).unwrap();
        assert!(first.done);
        assert_eq!(first.rows.len(), 2);
        let snapshot = |i: usize| {
            let p = trial_dir(&out, i).join("summary.json");
            (
                fs::read(&p).unwrap(),
                fs::metadata(&p).unwrap().modified().unwrap(),
            )
        };
        let before = [snapshot(0), snapshot(1)];
        assert!(!trial_dir(&out, 2).exists());

        let second = run(&search(&data, &out, &space_path, 3), &no_stop).unwrap();
        assert!(second.done);
        assert_eq!([snapshot(0), snapshot(1)], before);
        let s2: serde_json::Value = serde_json::from_slice(&snapshot(2).0).unwrap();
        assert_eq!(s2["complete"], true);
        // The run's config holds the sampled values.
        let space = Space::load(&space_path).unwrap();
        let sample = space.sample(3, 2);
        let Value::Float(lr) = sample["lr"] else {
            panic!()
        };
        let Value::Float(omb1) = sample["one_minus_beta1"] else {
            panic!()
        };
        assert_eq!(s2["config"]["optimizer"]["lr"].as_f64(), Some(lr));
        assert_eq!(
            s2["config"]["optimizer"]["beta1"].as_f64(),
            Some(1.0 - omb1)
        );
        assert_eq!(
            read_sample(&trial_dir(&out, 2).join(SAMPLED)).unwrap(),
            sample
        );

        let md = fs::read_to_string(out.join("summary.md")).unwrap();
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| 0")).collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(rows.iter().all(|r| r.contains("| complete |")), "{md}");
        // Sorted by the final training loss, lowest first.
        let losses: Vec<f64> = second.rows.iter().map(|r| r.objective.unwrap()).collect();
        assert!(losses.windows(2).all(|w| w[0] <= w[1]), "{losses:?}");
        for r in &second.rows {
            let s = read_json(&trial_dir(&out, r.trial).join("summary.json")).unwrap();
            assert_eq!(s["final_train_loss"].as_f64(), r.objective);
        }

        // best.toml: a `precond train --config` file with the best trial's values.
        let best = second.best.as_ref().unwrap();
        let text = fs::read_to_string(best).unwrap();
        let parsed: TrainSettings = toml::from_str(&text).unwrap();
        let best_trial = second.rows[0].trial;
        let s = read_json(&trial_dir(&out, best_trial).join("summary.json")).unwrap();
        assert_eq!(parsed.lr, s["config"]["optimizer"]["lr"].as_f64());
        assert_eq!(parsed.beta1, s["config"]["optimizer"]["beta1"].as_f64());
        assert_eq!(parsed.optimizer.as_deref(), Some("adam"));
        assert_eq!(parsed.epochs, None);
        let config = TrainConfig::resolve(
            &TrainSettings {
                epochs: Some(1),
                ..parsed
            },
            None,
        )
        .unwrap();
        assert_eq!(
            Some(config.optimizer.lr),
            s["config"]["optimizer"]["lr"].as_f64()
        );

        // Another seed or space, or other training flags, are refused before any training.
        let mut other_seed = search(&data, &out, &space_path, 3);
        other_seed.options.seed = 4;
        let e = run(&other_seed, &no_stop).unwrap_err().to_string();
        assert!(e.contains("--seed 3") && e.contains("search.json"), "{e}");
        let mut other_epochs = search(&data, &out, &space_path, 3);
        other_epochs.settings.epochs = Some(2);
        let e = run(&other_epochs, &no_stop).unwrap_err().to_string();
        assert!(
            e.contains("trial-000") && e.contains("epochs: 1 vs 2"),
            "{e}"
        );
        fs::write(&space_path, LR_SPACE.replace("1e-2", "2e-2")).unwrap();
        let e = run(&search(&data, &out, &space_path, 3), &no_stop)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sampled.toml") && e.contains("the space or the seed changed"),
            "{e}"
        );
        assert_eq!([snapshot(0), snapshot(1)], before);
    }

    #[test]
    fn an_interrupted_trial_resumes_from_its_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let data = fixture(tmp.path());
        let space_path = tmp.path().join("space.toml");
        fs::write(&space_path, LR_SPACE).unwrap();
        let out = tmp.path().join("search");
        let no_stop = AtomicBool::new(false);
        let mut s = search(&data, &out, &space_path, 2);
        s.settings.epochs = Some(2);
        s.settings.stop_after = Some(1);
        let first = run(&s, &no_stop).unwrap();
        assert!(!first.done);
        assert_eq!(first.rows.len(), 1);
        assert_eq!(first.rows[0].status, Status::Interrupted);
        assert!(first.best.is_none());
        let partial = read_json(&trial_dir(&out, 0).join("summary.json")).unwrap();
        assert_eq!(partial["epochs"], 1);
        assert!(!trial_dir(&out, 1).exists());

        s.settings.stop_after = None;
        let second = run(&s, &no_stop).unwrap();
        assert!(second.done);
        let done = read_json(&trial_dir(&out, 0).join("summary.json")).unwrap();
        assert_eq!(
            (done["epochs"].as_u64(), done["complete"].as_bool()),
            (Some(2), Some(true))
        );
        assert_eq!(done["steps"], 4);
        assert!(second.rows.iter().all(|r| r.status == Status::Complete));
    }

    #[test]
    fn diverged_trials_are_recorded_as_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = fixture(tmp.path());
        let space_path = tmp.path().join("space.toml");
        // Adam moves every weight by about lr on its first step: logits overflow f32.
        fs::write(
            &space_path,
            "[lr]\ndist = \"choice\"\nvalues = [1e37]\n\
             [one_minus_beta1]\ndist = \"uniform\"\nlow = 0.05\nhigh = 0.2\n",
        )
        .unwrap();
        let out = tmp.path().join("search");
        let no_stop = AtomicBool::new(false);
        let outcome = run(&search(&data, &out, &space_path, 2), &no_stop).unwrap();
        assert!(outcome.done);
        assert!(outcome.best.is_none());
        assert_eq!(outcome.rows.len(), 2);
        for i in 0..2 {
            let failed = read_json(&trial_dir(&out, i).join(FAILED)).unwrap();
            assert_eq!(failed["trial"], i);
            assert_eq!(failed["sampled"]["lr"].as_f64(), Some(1e37));
            let omb1 = failed["sampled"]["one_minus_beta1"].as_f64().unwrap();
            assert!((0.05..0.2).contains(&omb1));
            assert!(
                failed["error"].as_str().unwrap().contains("diverged"),
                "{failed}"
            );
            assert_eq!(outcome.rows[i].status, Status::Failed);
        }
        let md = fs::read_to_string(out.join("summary.md")).unwrap();
        assert_eq!(md.matches("| failed |").count(), 2, "{md}");
        assert!(!out.join("best.toml").exists());
        // Failed trials are kept, not rerun.
        let before = fs::read(trial_dir(&out, 0).join(FAILED)).unwrap();
        let again = run(&search(&data, &out, &space_path, 2), &no_stop).unwrap();
        assert_eq!(again.rows.len(), 2);
        assert_eq!(fs::read(trial_dir(&out, 0).join(FAILED)).unwrap(), before);
    }

    #[test]
    fn space_errors_name_the_file_and_the_parameter() {
        let e = space_error("[learning_rate]\ndist = \"uniform\"\nlow = 0\nhigh = 1\n");
        assert!(
            e.starts_with("spaces/x.toml: ") && e.contains("[learning_rate]"),
            "{e}"
        );
        let e = space_error("[lr]\ndist = \"log-uniform\"\nlow = 1e-2\nhigh = 1e-2\n");
        assert!(
            e.starts_with("spaces/x.toml: [lr]") && e.contains("below high"),
            "{e}"
        );
        let e = space_error("[eps]\ndist = \"log-uniform\"\nlow = 0\nhigh = 1e-2\n");
        assert!(
            e.starts_with("spaces/x.toml: [eps]") && e.contains("positive low"),
            "{e}"
        );
        let e = space_error("[rank]\ndist = \"choice\"\nvalues = [1.5]\n");
        assert!(
            e.starts_with("spaces/x.toml: [rank]") && e.contains("integer"),
            "{e}"
        );
        let e = space_error("[rank]\ndist = \"uniform\"\nlow = 1\nhigh = 4\n");
        assert!(e.contains("[rank]") && e.contains("choice"), "{e}");
        let e = space_error("[graft]\ndist = \"choice\"\nvalues = []\n");
        assert!(e.contains("[graft]") && e.contains("empty"), "{e}");
        let e = space_error("[lr]\ndist = \"normal\"\n");
        assert!(e.contains("[lr]") && e.contains("normal"), "{e}");
        let e = space_error("[lr]\ndist = \"uniform\"\nlow = 1\nhigh = 2\nmean = 3\n");
        assert!(e.contains("[lr]") && e.contains("mean"), "{e}");
        let e = space_error(
            "[beta1]\ndist = \"choice\"\nvalues = [0.9]\n\
             [one_minus_beta1]\ndist = \"choice\"\nvalues = [0.1]\n",
        );
        assert!(
            e.contains("[beta1]") && e.contains("[one_minus_beta1]"),
            "{e}"
        );

        // Checked against the optimizer and the flags before anything runs.
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("search");
        let path = tmp.path().join("s.toml");
        let no_stop = AtomicBool::new(false);
        let with = |text: &str, s: Search| {
            fs::write(&path, text).unwrap();
            run(&s, &no_stop).unwrap_err().to_string()
        };
        let base = || search(tmp.path(), &out, &path, 2);
        let e = with("[rank]\ndist = \"choice\"\nvalues = [8, 16]\n", base());
        assert!(
            e.contains("s.toml") && e.contains("[rank]") && e.contains("adam"),
            "{e}"
        );
        let e = with(
            "[lr]\ndist = \"choice\"\nvalues = [1e-3]\n[one_minus_beta1]\ndist = \"uniform\"\n\
             low = 1.0\nhigh = 1.5\n",
            base(),
        );
        assert!(
            e.contains("s.toml") && e.contains("trial 0 draws") && e.contains("beta1"),
            "{e}"
        );
        let mut given = base();
        given.settings.lr = Some(1e-3);
        let e = with(LR_SPACE, given);
        assert!(e.contains("--lr") && e.contains("[lr]"), "{e}");
        let mut given = base();
        given.settings.beta1 = Some(0.95);
        let e = with(LR_SPACE, given);
        assert!(
            e.contains("--beta1") && e.contains("[one_minus_beta1]"),
            "{e}"
        );
        assert!(!out.exists());
    }
}
