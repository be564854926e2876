//! `precond bench step` and `precond bench optim`: timings measured in one process, so that
//! ratios between optimizers compare like with like.
//!
//! `step` times the whole autoencoder training step (forward+backward and optimizer step,
//! separately) for several optimizers at their presets (`NAME:faer` for a shared-basis or
//! Block Adam preset with faer's one-block-at-a-time eigensolver), and for shared-basis the
//! time of its step's m k×k block eigenproblems alone ([`EigProblems`]), by faer and by the
//! batched kernel: the part of its step that no GEMM tuning removes. `optim` times one optimizer step of
//! one layer (the library's `ParamOptimizer`: preconditioner, grafting, momentum) at the
//! autoencoder's and the Transformer tagger's layer shapes, plus scaling curves against the
//! paper's Table 1 complexities.
//!
//! Shampoo and Sketchy start preconditioning at step 1 here (their presets: 101) so that every
//! timed step is in steady state; their roots are recomputed every 10 steps, and the timed
//! steps are a multiple of 10 long, so their mean includes the roots at their real frequency.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use clap::{Args, Subcommand};
use plotters::prelude::*;
use precond::batched_eigen::{EigenPack, Isa, LANES};
use precond::linalg::{blocks_per_task, SymEig};
use precond::{
    diagonal::DiagonalConfig, GraftConfig, GraftKind, Method, MomentumConfig, OptimizerConfig,
    ParamOptimizer, PrecondError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use thiserror::Error;

use crate::commands::report;
use crate::data::mnist::{self, PIXELS};
use crate::models::autoencoder::{sigmoid_cross_entropy, Autoencoder, WIDTHS};
use crate::training::optimizers::{
    block_eigensolver, build_optimizer_for, library_config, OptimizerError, OptimizerHparams,
};
use crate::training::{self, Machine, DEFAULT_DATA};
use burn::module::Module;

#[derive(Debug, Subcommand)]
pub enum BenchTask {
    /// Whole autoencoder training step (forward+backward and optimizer step) per optimizer; for
    /// shared-basis also its block eigenproblems alone, by faer and batched
    Step(StepArgs),
    /// One optimizer step of one layer, per method, layer shape and rank, with scaling curves
    Optim(OptimArgs),
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Optimizer(#[from] OptimizerError),
    #[error(transparent)]
    Library(#[from] PrecondError),
    #[error(transparent)]
    Mnist(#[from] mnist::MnistError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Optimizers compared by default (the paper's Table 2 set).
const DEFAULT_OPTIMIZERS: &str = "adam,block-adam,shampoo-1000,sketchy,shared-basis";

#[derive(Debug, Args)]
pub struct StepArgs {
    /// Short run: 10 timed steps after 2 warm-up steps per optimizer (a few minutes on 2 cores)
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Optimizers to time, at their presets (comma-separated; NAME:faer runs a shared-basis or
    /// block-adam preset with faer's one-block-at-a-time eigensolver)
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_OPTIMIZERS)]
    pub optimizers: Vec<String>,
    /// Timed steps per optimizer (default 30; 10 with --quick); a multiple of 10 keeps
    /// Shampoo's and Sketchy's root recomputations at their real frequency
    #[arg(long)]
    pub steps: Option<usize>,
    /// Untimed warm-up steps per optimizer (default 3; 2 with --quick)
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Directory holding the MNIST IDX files (the batches are real images)
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// Uniform random pixels instead of MNIST (no data needed)
    #[arg(long)]
    pub synthetic: bool,
    /// Batch size
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Seed of the model's initialization (and of the synthetic pixels)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One optimizer's line of `bench step`.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub optimizer: String,
    pub steps: usize,
    pub median_step_s: f64,
    pub median_fwd_bwd_s: f64,
    pub median_opt_step_s: f64,
    pub mean_opt_step_s: f64,
    pub optimizer_state_bytes: u64,
    /// shared-basis only: the median time of its step's block eigendecompositions alone
    /// ([`EigProblems`]), measured right after its timed steps on the same threads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eig_floor_s: Option<f64>,
    /// shared-basis only: how many k×k eigendecompositions one step makes (one per output
    /// neuron of every weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eig_count: Option<usize>,
    /// shared-basis only: the median time of the same problems through the batched kernel
    /// ([`EigenPack`]: eigenvalues and one spectral function applied to one vector, the work
    /// of its block pass's eigen stage), right after `eig_floor_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eig_batched_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct StepReport {
    pub machine: Machine,
    pub batch: usize,
    pub warmup: usize,
    pub results: Vec<StepResult>,
}

/// The median of timings that are never empty here (steps and reps are at least 1).
fn median(v: &[f64]) -> f64 {
    training::median(v).unwrap_or(f64::NAN)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The preset of `name` with preconditioning from step 1 (see the module docs). `NAME:faer`
/// (shared-basis and block-adam presets) runs the preset with faer's one-block-at-a-time
/// eigensolver instead of the batched one, for a comparison in the same process.
fn steady_preset(name: &str) -> Result<OptimizerHparams, BenchError> {
    let (preset, eigensolver) = match name.split_once(':') {
        Some((preset, solver)) => (preset, Some(solver)),
        None => (name, None),
    };
    let mut h = OptimizerHparams::preset(preset)?;
    if let Some(lib) = h.library.as_mut() {
        lib.start_step = 1;
    }
    if let Some(solver) = eigensolver {
        block_eigensolver(Some(solver))?;
        match h.library.as_mut() {
            Some(lib) if preset.starts_with("shared-basis") || preset == "block-adam" => {
                lib.eigensolver = Some(solver.to_string());
            }
            _ => {
                return Err(BenchError::Invalid(format!(
                    "{name}: only shared-basis and block-adam presets take an eigensolver"
                )))
            }
        }
    }
    Ok(h)
}

/// Pixels of `batches` batches: MNIST's first images, or uniform random ones.
fn step_batches(args: &StepArgs, batches: usize) -> Result<Vec<Vec<f32>>, BenchError> {
    let bs = args.batch;
    if args.synthetic {
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
        return Ok((0..batches)
            .map(|_| (0..bs * PIXELS).map(|_| rng.random::<f32>()).collect())
            .collect());
    }
    let split = mnist::load_split(&args.data, "train", Some(bs * batches))?;
    if split.n < bs {
        return Err(BenchError::Invalid(format!(
            "{} holds {} training images, fewer than one batch of {bs}",
            args.data.display(),
            split.n
        )));
    }
    let per = split.n / bs;
    Ok((0..batches)
        .map(|i| split.images[(i % per) * bs * PIXELS..((i % per) + 1) * bs * PIXELS].to_vec())
        .collect())
}

/// `precond bench step`.
pub fn step(args: &StepArgs) -> Result<StepReport, BenchError> {
    if args.optimizers.is_empty() {
        return Err(BenchError::Invalid("--optimizers is empty".into()));
    }
    if args.batch == 0 {
        return Err(BenchError::Invalid("--batch must be at least 1".into()));
    }
    let steps = args.steps.unwrap_or(if args.quick { 10 } else { 30 });
    let warmup = args.warmup.unwrap_or(if args.quick { 2 } else { 3 });
    if steps == 0 {
        return Err(BenchError::Invalid("--steps must be at least 1".into()));
    }
    // Check every name before spending time on any.
    for name in &args.optimizers {
        steady_preset(name)?;
    }
    let batches = step_batches(args, 4)?;
    let device = Device::flex().autodiff();
    let mut results = Vec::new();
    for name in &args.optimizers {
        let h = steady_preset(name)?;
        let mut model = Autoencoder::new(args.seed, &device);
        let mut built = build_optimizer_for(&h, &model)?;
        let (mut fwd_bwd, mut opt) = (Vec::new(), Vec::new());
        for s in 0..warmup + steps {
            let pixels = batches[s % batches.len()].clone();
            let batch =
                Tensor::<2>::from_data(TensorData::new(pixels, [args.batch, PIXELS]), &device);
            let t0 = Instant::now();
            let loss = sigmoid_cross_entropy(model.forward(batch.clone()), batch);
            let grads = loss.backward();
            let _ = loss.into_scalar::<f32>();
            let _ = device.sync();
            let t1 = Instant::now();
            let grads = GradientsParams::from_grads(grads, &model);
            model = built.optim.step(h.lr, model, grads);
            let _ = device.sync();
            let t2 = Instant::now();
            if let Some(e) = built.take_last_error() {
                return Err(BenchError::Invalid(format!("{name}: step {}: {e}", s + 1)));
            }
            if s >= warmup {
                fwd_bwd.push((t1 - t0).as_secs_f64());
                opt.push((t2 - t1).as_secs_f64());
            }
        }
        let total: Vec<f64> = fwd_bwd.iter().zip(&opt).map(|(a, b)| a + b).collect();
        let floor = match (name.as_str(), h.library.as_ref().and_then(|l| l.rank)) {
            ("shared-basis", Some(rank)) => {
                let problems = EigProblems::autoencoder(rank, args.seed);
                Some((
                    problems.count(),
                    problems.median_time(steps, EigKernel::Faer)?,
                    problems.median_time(steps, EigKernel::Batched)?,
                ))
            }
            _ => None,
        };
        let result = StepResult {
            optimizer: name.clone(),
            steps,
            median_step_s: median(&total),
            median_fwd_bwd_s: median(&fwd_bwd),
            median_opt_step_s: median(&opt),
            mean_opt_step_s: mean(&opt),
            optimizer_state_bytes: built.state_bytes(model.num_params()),
            eig_floor_s: floor.map(|(_, t, _)| t),
            eig_count: floor.map(|(n, _, _)| n),
            eig_batched_s: floor.map(|(_, _, t)| t),
        };
        eprintln!(
            "{name}: step {:.1} ms (fwd+bwd {:.1} ms, opt median {:.1} ms, mean {:.1} ms)",
            result.median_step_s * 1e3,
            result.median_fwd_bwd_s * 1e3,
            result.median_opt_step_s * 1e3,
            result.mean_opt_step_s * 1e3
        );
        results.push(result);
    }
    let report = StepReport {
        machine: Machine::detect(),
        batch: args.batch,
        warmup,
        results,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(report)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), BenchError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let text = serde_json::to_string_pretty(value).expect("plain data serializes");
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

/// The Markdown table of `bench step`, with each optimizer's ratios to the first row's step
/// (Adam by default) and to its own forward+backward.
pub fn step_table(report: &StepReport) -> String {
    let mut out = String::from(
        "| optimizer | step (ms) | fwd+bwd (ms) | opt step median (ms) | opt step mean (ms) | opt / fwd+bwd | step / first | state (MB) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let first = report.results.first().map(|r| r.median_step_s);
    for r in &report.results {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
            r.optimizer,
            r.median_step_s * 1e3,
            r.median_fwd_bwd_s * 1e3,
            r.median_opt_step_s * 1e3,
            r.mean_opt_step_s * 1e3,
            r.median_opt_step_s / r.median_fwd_bwd_s,
            first.map_or(f64::NAN, |f| r.median_step_s / f),
            r.optimizer_state_bytes as f64 / 1e6
        );
    }
    for r in &report.results {
        if let (Some(floor), Some(count)) = (r.eig_floor_s, r.eig_count) {
            let _ = write!(
                out,
                "\n{}: its {count} block eigenproblems alone take {:.1} ms by faer, one at a \
                 time ({:.2} of its optimizer step, {:.2} of the forward+backward)",
                r.optimizer,
                floor * 1e3,
                floor / r.median_opt_step_s,
                floor / r.median_fwd_bwd_s
            );
            if let Some(batched) = r.eig_batched_s {
                let _ = write!(
                    out,
                    "; {:.1} ms batched ({:.1}x faster; {:.2} of its optimizer step)",
                    batched * 1e3,
                    floor / batched,
                    batched / r.median_opt_step_s
                );
            }
            out.push('\n');
        }
    }
    out
}

/// The kernel [`EigProblems`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EigKernel {
    /// faer's symmetric eigendecomposition, one block at a time.
    Faer,
    /// [`EigenPack`], eight blocks at a time.
    Batched,
}

/// The eigenproblems of one shared-basis step on the autoencoder: per weight (b, m), m
/// symmetric k×k matrices with k = min(rank, b), the size of each block's R̃_i (NOTES §2 step
/// 4). They are Gram matrices G Gᵀ of k×(k+1) matrices G with uniform entries in [−1, 1] whose
/// column j is scaled by 0.7^j, so that their eigenvalues spread over many decades as R̃_i's do.
pub struct EigProblems {
    /// Per weight: k and its m matrices, column-major, one after another.
    layers: Vec<(usize, Vec<f32>)>,
}

impl EigProblems {
    /// The autoencoder's problems at shared-basis rank `rank`.
    pub fn autoencoder(rank: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xe16e);
        let layers = WIDTHS
            .windows(2)
            .map(|w| {
                let (b, m) = (w[0], w[1]);
                let k = rank.min(b).max(1);
                let mut data = Vec::with_capacity(m * k * k);
                for _ in 0..m {
                    let g: Vec<f64> = (0..k * (k + 1))
                        .map(|i| rng.random_range(-1.0..1.0) * 0.7f64.powi((i / k) as i32))
                        .collect();
                    let g = faer::MatRef::from_column_major_slice(&g, k, k + 1);
                    let gram = g * g.transpose();
                    for c in 0..k {
                        data.extend(gram.col(c).iter().map(|&v| v as f32));
                    }
                }
                (k, data)
            })
            .collect();
        Self { layers }
    }

    /// How many eigendecompositions one step makes.
    pub fn count(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, data)| data.len() / (k * k))
            .sum()
    }

    /// One step's eigenproblems, layer after layer, each layer's split over the rayon threads
    /// in chunks as the optimizer's block pass splits its blocks, with one of the optimizer's
    /// kernels in f32: faer's [`SymEig`] (a full eigendecomposition per block) or the batched
    /// [`EigenPack`] (eigenvalues and (λ − λ_min + 1)^{−1/2} applied to one vector, what the
    /// block pass needs). Returns the sum of the smallest eigenvalues (to keep the work
    /// observable).
    pub fn solve_once(&self, kernel: EigKernel) -> Result<f64, BenchError> {
        if kernel == EigKernel::Batched {
            return self.solve_once_batched();
        }
        let mut total = 0.0;
        for (k, data) in &self.layers {
            let (k, kk) = (*k, k * k);
            let chunk = blocks_per_task(data.len() / kk);
            total += data
                .par_chunks(chunk * kk)
                .map(|mats| {
                    let mut eig = SymEig::<f32>::new(k);
                    let mut sum = 0.0;
                    for a in mats.chunks_exact(kk) {
                        eig.decompose(faer::MatRef::from_column_major_slice(a, k, k))
                            .map_err(|e| {
                                BenchError::Invalid(format!("eigendecomposition failed: {e:?}"))
                            })?;
                        sum += f64::from(eig.value(0));
                    }
                    Ok::<f64, BenchError>(sum)
                })
                .try_reduce(|| 0.0, |a, b| Ok(a + b))?;
        }
        Ok(total)
    }

    fn solve_once_batched(&self) -> Result<f64, BenchError> {
        let mut total = 0.0;
        for (k, data) in &self.layers {
            let (k, kk) = (*k, k * k);
            let chunk = blocks_per_task(data.len() / kk).next_multiple_of(LANES);
            total += data
                .par_chunks(chunk * kk)
                .map(|mats| {
                    let mut pack = EigenPack::<f32>::new(k);
                    let ones = vec![1.0f32; k];
                    let mut sum = 0.0;
                    for group in mats.chunks(LANES * kk) {
                        let count = group.len() / kk;
                        for lane in 0..LANES {
                            match group.get(lane * kk..(lane + 1) * kk) {
                                Some(a) => pack.load(lane, |r, c| a[c * k + r], &ones),
                                None => pack.clear(lane),
                            }
                        }
                        let solved = pack.solve(Isa::Detect);
                        if solved[..count].iter().any(|ok| !ok) {
                            return Err(BenchError::Invalid(
                                "batched eigensolve failed".to_string(),
                            ));
                        }
                        for lane in 0..count {
                            let lo = (0..k)
                                .map(|j| pack.eigenvalue(lane, j))
                                .fold(f32::INFINITY, f32::min);
                            for j in 0..k {
                                let l = pack.eigenvalue(lane, j) - lo;
                                pack.weight(lane, j, 1.0 / (l.max(0.0) + 1.0).sqrt());
                            }
                            sum += f64::from(lo);
                        }
                        pack.back_transform(Isa::Detect);
                        std::hint::black_box(pack.result(0, 0));
                    }
                    Ok::<f64, BenchError>(sum)
                })
                .try_reduce(|| 0.0, |a, b| Ok(a + b))?;
        }
        Ok(total)
    }

    /// Median wall time of [`solve_once`](Self::solve_once) over `reps` runs after one warm-up.
    pub fn median_time(&self, reps: usize, kernel: EigKernel) -> Result<f64, BenchError> {
        self.solve_once(kernel)?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            std::hint::black_box(self.solve_once(kernel)?);
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(median(&times))
    }
}

#[derive(Debug, Args)]
pub struct OptimArgs {
    /// Short run: the autoencoder's shapes only, k = 32, 10 timed steps, 3-point scaling curves
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory for scaling.csv and the scaling plots (PNG and SVG)
    #[arg(long, default_value = "runs/bench-optim")]
    pub out: PathBuf,
    /// Methods to time, at their presets (comma-separated; `adam` is the library's diagonal Adam)
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_OPTIMIZERS)]
    pub optimizers: Vec<String>,
    /// Ranks k of shared-basis
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64")]
    pub ranks: Vec<usize>,
    /// Timed steps per measurement (default 20; 10 with --quick); a multiple of 10 keeps
    /// Shampoo's and Sketchy's root recomputations at their real frequency
    #[arg(long)]
    pub reps: Option<usize>,
    /// Untimed warm-up steps per measurement
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Skip the scaling curves
    #[arg(long)]
    pub no_scaling: bool,
}

/// One measurement of `bench optim`.
#[derive(Debug, Clone, Serialize)]
pub struct OptimResult {
    pub optimizer: String,
    /// Where the shape comes from: autoencoder, tagger-small (2 layers, width 128), tagger-paper
    /// (width 512), or scaling.
    pub model: String,
    pub d_in: usize,
    pub d_out: usize,
    /// shared-basis's k (None for the other methods).
    pub rank: Option<usize>,
    pub median_s: f64,
    pub mean_s: f64,
    pub state_bytes: usize,
    /// shared-basis: its GEMM flops (the 24·d_in·d_out·k of the layer-sized products, counted
    /// from the code) divided by the median step time — the rate the step runs at if it were
    /// all GEMM; a lower bound on the GEMMs' own rate.
    pub gemm_gflop_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct OptimReport {
    pub machine: Machine,
    pub reps: usize,
    pub warmup: usize,
    pub results: Vec<OptimResult>,
}

/// The layer shapes (d_in, d_out) of each benchmark model.
fn model_shapes(quick: bool) -> Vec<(&'static str, Vec<(usize, usize)>)> {
    let autoencoder: Vec<(usize, usize)> = WIDTHS.windows(2).map(|w| (w[0], w[1])).collect();
    let mut shapes = vec![("autoencoder", autoencoder)];
    if !quick {
        // Attention projections (d, d) and the MLP's (d, 4d) and (4d, d).
        shapes.push(("tagger-small", vec![(128, 128), (128, 512), (512, 128)]));
        shapes.push(("tagger-paper", vec![(512, 512), (512, 2048), (2048, 512)]));
    }
    shapes
}

/// The library configuration of optimizer `name` for one layer, preconditioning from step 1.
fn layer_config(name: &str, rank: Option<usize>) -> Result<OptimizerConfig, BenchError> {
    if name == "adam" {
        return Ok(OptimizerConfig {
            method: Method::Diagonal(DiagonalConfig::default()),
            graft: GraftConfig {
                kind: GraftKind::None,
                ..GraftConfig::default()
            },
            momentum: MomentumConfig {
                beta1: 0.0,
                nesterov: false,
            },
            ..OptimizerConfig::default()
        });
    }
    let mut h = steady_preset(name)?;
    if let (Some(k), Some(lib)) = (rank, h.library.as_mut()) {
        lib.rank = Some(k);
    }
    Ok(library_config(&h)?.config().clone())
}

/// GEMM flops of one shared-basis step on a (b, m) layer at rank k: the layer-sized products
/// (Bᵀ G, B·RA, two in A·Y, B·SBᵀY, the new coefficients, Wᵀ G' and its removal, the
/// direction; W has up to 2k columns) — 24·b·m·k — plus Σ R_i R_iᵀ and the per-block
/// Q R Qᵀ (2·m·k³ + 4·m·k³).
fn shared_basis_gemm_flops(b: usize, m: usize, k: usize) -> f64 {
    let (b, m, k) = (b as f64, m as f64, k.min(b) as f64);
    24.0 * b * m * k + 6.0 * m * k * k * k
}

/// Median and mean seconds of `reps` steps after `warmup`, and the state bytes after them.
fn time_layer(
    config: &OptimizerConfig,
    d_in: usize,
    d_out: usize,
    reps: usize,
    warmup: usize,
) -> Result<(f64, f64, usize), BenchError> {
    let mut opt = ParamOptimizer::new(config, &[d_in, d_out], None, false)?;
    let mut rng = ChaCha8Rng::seed_from_u64((d_in * 7919 + d_out) as u64);
    let n = d_in * d_out;
    let grads: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..n).map(|_| rng.random::<f32>() * 2e-3 - 1e-3).collect())
        .collect();
    let mut param: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 0.1 - 0.05).collect();
    let mut times = Vec::with_capacity(reps);
    for s in 0..warmup + reps {
        let t = Instant::now();
        opt.step(&mut param, &grads[s % grads.len()], 1e-4)?;
        if s >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok((median(&times), mean(&times), opt.state_bytes()))
}

fn optim_row(
    name: &str,
    model: &str,
    (d_in, d_out): (usize, usize),
    rank: Option<usize>,
    reps: usize,
    warmup: usize,
) -> Result<OptimResult, BenchError> {
    let config = layer_config(name, rank)?;
    let (median_s, mean_s, state_bytes) = time_layer(&config, d_in, d_out, reps, warmup)?;
    Ok(OptimResult {
        optimizer: name.to_string(),
        model: model.to_string(),
        d_in,
        d_out,
        rank,
        median_s,
        mean_s,
        state_bytes,
        gemm_gflop_s: rank.map(|k| shared_basis_gemm_flops(d_in, d_out, k) / median_s / 1e9),
    })
}

/// `precond bench optim`.
pub fn optim(args: &OptimArgs) -> Result<OptimReport, BenchError> {
    if args.optimizers.is_empty() {
        return Err(BenchError::Invalid("--optimizers is empty".into()));
    }
    if args.ranks.contains(&0) {
        return Err(BenchError::Invalid("--ranks: k must be at least 1".into()));
    }
    let reps = args.reps.unwrap_or(if args.quick { 10 } else { 20 });
    if reps == 0 {
        return Err(BenchError::Invalid("--reps must be at least 1".into()));
    }
    let ranks: Vec<usize> = if args.quick {
        vec![32]
    } else {
        args.ranks.clone()
    };
    for name in &args.optimizers {
        layer_config(name, None)?;
    }
    let mut results = Vec::new();
    for (model, shapes) in model_shapes(args.quick) {
        for &shape in &shapes {
            for name in &args.optimizers {
                let per_rank: Vec<Option<usize>> = if name == "shared-basis" {
                    ranks.iter().map(|&k| Some(k)).collect()
                } else {
                    vec![None]
                };
                for rank in per_rank {
                    let row = optim_row(name, model, shape, rank, reps, args.warmup)?;
                    eprintln!(
                        "{model} ({}, {}) {name}{}: median {:.2} ms, mean {:.2} ms",
                        shape.0,
                        shape.1,
                        rank.map_or(String::new(), |k| format!(" k={k}")),
                        row.median_s * 1e3,
                        row.mean_s * 1e3
                    );
                    results.push(row);
                }
            }
        }
    }
    if !args.no_scaling && args.optimizers.iter().any(|n| n == "shared-basis") {
        results.extend(scaling(args, reps)?);
    }
    let report = OptimReport {
        machine: Machine::detect(),
        reps,
        warmup: args.warmup,
        results,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(report)
}

/// The Markdown table of `bench optim` (scaling rows excluded).
pub fn optim_table(report: &OptimReport) -> String {
    let mut out = String::from(
        "| model | d_in × d_out | optimizer | k | median (ms) | mean (ms) | state (MB) | GEMM-equivalent GFLOP/s |\n|---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in report.results.iter().filter(|r| r.model != "scaling") {
        let _ = writeln!(
            out,
            "| {} | {} × {} | {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            r.model,
            r.d_in,
            r.d_out,
            r.optimizer,
            r.rank.map_or("-".into(), |k| k.to_string()),
            r.median_s * 1e3,
            r.mean_s * 1e3,
            r.state_bytes as f64 / 1e6,
            r.gemm_gflop_s.map_or("-".into(), |g| format!("{g:.1}"))
        );
    }
    out
}

/// Table 1's time complexity of our method: d_in·d_out·k + d_in·k² + d_out·k³.
fn table1_ours(d_in: usize, d_out: usize, k: usize) -> f64 {
    let (b, m, k) = (d_in as f64, d_out as f64, k.min(d_in) as f64);
    b * m * k + b * k * k + m * k * k * k
}

/// Shared-basis step time against d_in, d_out and k (the others fixed at 512, 512, 32), with
/// Table 1's complexity scaled to the middle point; scaling.csv and three log-log plots.
fn scaling(args: &OptimArgs, reps: usize) -> Result<Vec<OptimResult>, BenchError> {
    let sizes: &[usize] = if args.quick {
        &[128, 512, 2048]
    } else {
        &[128, 256, 512, 1024, 2048]
    };
    let ks: &[usize] = if args.quick {
        &[8, 32, 128]
    } else {
        &[8, 16, 32, 64, 128]
    };
    // (d_in, d_out, k) along each axis.
    type Axis = (&'static str, Vec<(usize, usize, usize)>);
    let axes: [Axis; 3] = [
        ("d_in", sizes.iter().map(|&s| (s, 512, 32)).collect()),
        ("d_out", sizes.iter().map(|&s| (512, s, 32)).collect()),
        ("k", ks.iter().map(|&k| (512, 512, k)).collect()),
    ];
    std::fs::create_dir_all(&args.out).map_err(io_err(&args.out))?;
    let mut csv = String::from("axis,d_in,d_out,k,median_s,table1_s\n");
    let mut rows = Vec::new();
    for (axis, points) in &axes {
        let mut measured = Vec::new();
        for &(d_in, d_out, k) in points {
            let row = optim_row(
                "shared-basis",
                "scaling",
                (d_in, d_out),
                Some(k),
                reps,
                args.warmup,
            )?;
            eprintln!(
                "scaling {axis}: ({d_in}, {d_out}) k={k}: median {:.2} ms",
                row.median_s * 1e3
            );
            measured.push((d_in, d_out, k, row.median_s));
            rows.push(row);
        }
        // Scale Table 1's count to the middle measurement.
        let (b0, m0, k0, t0) = measured[measured.len() / 2];
        let scale = t0 / table1_ours(b0, m0, k0);
        let x_of = |&(b, m, k, _): &(usize, usize, usize, f64)| match *axis {
            "d_in" => b,
            "d_out" => m,
            _ => k,
        } as f64;
        let mut ours = Vec::new();
        let mut model = Vec::new();
        for p in &measured {
            let predicted = scale * table1_ours(p.0, p.1, p.2);
            let _ = writeln!(csv, "{axis},{},{},{},{},{}", p.0, p.1, p.2, p.3, predicted);
            ours.push((x_of(p), p.3));
            model.push((x_of(p), predicted));
        }
        let fixed = match *axis {
            "d_in" => "d_out 512, k 32",
            "d_out" => "d_in 512, k 32",
            _ => "d_in 512, d_out 512",
        };
        let title = format!("shared-basis step time vs {axis} ({fixed})");
        for ext in ["png", "svg"] {
            let path = args.out.join(format!("scaling_{axis}.{ext}"));
            log_log_plot(&path, &title, axis, &ours, &model)?;
        }
    }
    let path = args.out.join("scaling.csv");
    std::fs::write(&path, csv).map_err(io_err(&path))?;
    Ok(rows)
}

/// A log-log plot of measured times and the scaled Table 1 complexity, as PNG or SVG by the
/// extension of `path`.
fn log_log_plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    measured: &[(f64, f64)],
    model: &[(f64, f64)],
) -> Result<(), BenchError> {
    report::register_font();
    let spec = LogLog {
        title,
        x_desc,
        measured,
        model,
    };
    let size = report::PLOT_SIZE;
    let drawn = if path.extension().is_some_and(|e| e == "svg") {
        draw_log_log(SVGBackend::new(path, size).into_drawing_area(), &spec)
    } else {
        draw_log_log(BitMapBackend::new(path, size).into_drawing_area(), &spec)
    };
    drawn.map_err(|message| BenchError::Plot {
        path: path.to_path_buf(),
        message,
    })
}

struct LogLog<'a> {
    title: &'a str,
    x_desc: &'a str,
    /// (x, seconds).
    measured: &'a [(f64, f64)],
    model: &'a [(f64, f64)],
}

fn draw_log_log<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    spec: &LogLog,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let all = || spec.measured.iter().chain(spec.model);
    let (x_lo, x_hi) = all().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y_lo, y_hi) = all().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
        (lo.min(p.1 * 1e3), hi.max(p.1 * 1e3))
    });
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(spec.title, (report::FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x_lo / 1.2..x_hi * 1.2).log_scale(),
            (y_lo / 1.5..y_hi * 1.5).log_scale(),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(spec.x_desc)
        .y_desc("median step (ms)")
        .label_style((report::FONT, 15))
        .axis_desc_style((report::FONT, 17))
        .draw()
        .map_err(e)?;
    let blue = RGBColor(31, 119, 180);
    let grey = RGBColor(127, 127, 127);
    let ms = |pts: &[(f64, f64)]| pts.iter().map(|&(x, y)| (x, y * 1e3)).collect::<Vec<_>>();
    chart
        .draw_series(LineSeries::new(ms(spec.measured), blue.stroke_width(2)))
        .map_err(e)?
        .label("measured")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], blue.stroke_width(2)));
    chart
        .draw_series(
            ms(spec.measured)
                .into_iter()
                .map(|p| Circle::new(p, 4, blue.filled())),
        )
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(ms(spec.model), grey.stroke_width(1)))
        .map_err(e)?
        .label("Table 1: d_in·d_out·k + d_in·k² + d_out·k³ (scaled to the middle point)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], grey.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((report::FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_args(optimizers: &[&str]) -> StepArgs {
        StepArgs {
            quick: false,
            json: None,
            optimizers: optimizers.iter().map(|s| s.to_string()).collect(),
            steps: Some(2),
            warmup: Some(1),
            data: PathBuf::from("/nonexistent"),
            synthetic: true,
            batch: 20,
            seed: 0,
        }
    }

    #[test]
    fn step_times_each_optimizer_and_writes_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = step_args(&["adam", "shared-basis"]);
        args.json = Some(dir.path().join("sub/step.json"));
        let report = step(&args).unwrap();
        assert_eq!(report.results.len(), 2);
        for r in &report.results {
            assert_eq!(r.steps, 2);
            assert!(r.median_fwd_bwd_s > 0.0 && r.median_opt_step_s > 0.0);
            assert!((r.median_step_s - (r.median_fwd_bwd_s + r.median_opt_step_s)).abs() < 0.5);
        }
        // Adam's two f32 moments over the 2,837,314 parameters.
        assert_eq!(report.results[0].optimizer_state_bytes, 2 * 2_837_314 * 4);
        // Ours: per weight (b, m) b·k + m·k² + m, grafting and momentum b·m each; per bias
        // (not preconditioned) grafting and momentum n each; f32.
        let mut floats = 0;
        for w in WIDTHS.windows(2) {
            let (b, m) = (w[0], w[1]);
            let k = b.min(32);
            floats += b * k + m * k * k + m + 2 * b * m + 2 * m;
        }
        assert_eq!(report.results[1].optimizer_state_bytes, floats as u64 * 4);
        // The eigendecomposition floor is measured for ours only.
        assert_eq!(report.results[0].eig_count, None);
        assert_eq!(report.results[1].eig_count, Some(4314));
        assert!(report.results[1].eig_floor_s.unwrap() > 0.0);
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("sub/step.json")).unwrap(),
        )
        .unwrap();
        let first = &json["results"][0];
        for key in [
            "optimizer",
            "median_step_s",
            "median_fwd_bwd_s",
            "median_opt_step_s",
            "mean_opt_step_s",
            "optimizer_state_bytes",
        ] {
            assert!(!first[key].is_null(), "{key} missing");
        }
        assert!(json["machine"]["threads"].as_u64().unwrap() >= 1);
    }

    #[test]
    fn step_rejects_bad_arguments_before_timing() {
        let err = step(&step_args(&["adam", "nope"])).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        let mut args = step_args(&["adam"]);
        args.steps = Some(0);
        assert!(step(&args).unwrap_err().to_string().contains("--steps"));
        let mut args = step_args(&["adam"]);
        args.synthetic = false;
        let err = step(&args).unwrap_err().to_string();
        assert!(err.contains("/nonexistent"), "{err}");
    }

    #[test]
    fn step_table_ratios() {
        let row = |name: &str, fb: f64, opt: f64| StepResult {
            optimizer: name.into(),
            steps: 10,
            median_step_s: fb + opt,
            median_fwd_bwd_s: fb,
            median_opt_step_s: opt,
            mean_opt_step_s: opt,
            optimizer_state_bytes: 2_000_000,
            eig_floor_s: (name == "shared-basis").then_some(0.025),
            eig_count: (name == "shared-basis").then_some(4314),
            eig_batched_s: (name == "shared-basis").then_some(0.005),
        };
        let report = StepReport {
            machine: Machine {
                cpu_model: None,
                threads: 2,
            },
            batch: 1000,
            warmup: 3,
            results: vec![row("adam", 0.2, 0.01), row("shared-basis", 0.2, 0.1)],
        };
        let table = step_table(&report);
        // 0.1 / 0.2 = 0.50 of fwd+bwd; 0.3 / 0.21 = 1.43 of Adam's step.
        assert!(
            table.contains("| shared-basis | 300.0 | 200.0 | 100.0 | 100.0 | 0.50 | 1.43 | 2.00 |"),
            "{table}"
        );
        // 25 ms of eigendecompositions: a quarter of the 100 ms step, an eighth of fwd+bwd; the
        // batched kernel's 5 ms are 5x faster, 0.05 of the step.
        assert!(
            table.contains(
                "shared-basis: its 4314 block eigenproblems alone take 25.0 ms by faer, one at a \
                 time (0.25 of its optimizer step, 0.12 of the forward+backward); 5.0 ms batched \
                 (5.0x faster; 0.05 of its optimizer step)"
            ),
            "{table}"
        );
        assert_eq!(table.matches("eigenproblems").count(), 1, "{table}");
    }

    #[test]
    fn eig_problems_are_the_steps() {
        // One per output neuron of every weight; k = min(32, d_in): the 30 → 250 layer has k 30.
        let problems = EigProblems::autoencoder(32, 0);
        assert_eq!(problems.count(), 4314);
        let sizes: Vec<usize> = problems.layers.iter().map(|(k, _)| *k).collect();
        assert_eq!(sizes, [32, 32, 32, 32, 30, 32, 32, 32]);
        // Symmetric, positive semidefinite up to f32 rounding, eigenvalues over many decades
        // (f64 reference).
        let (k, data) = &problems.layers[0];
        let a = faer::Mat::<f64>::from_fn(*k, *k, |r, c| f64::from(data[c * k + r]));
        for r in 0..*k {
            for c in 0..*k {
                assert_eq!(a[(r, c)], a[(c, r)]);
            }
        }
        let values = a.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
        assert!(values[0] >= -1e-7 * values[k - 1], "{values:?}");
        assert!(values[k - 1] / values[k / 4] > 1e6, "{values:?}");
        // The smallest eigenvalues the timed kernel finds are those of the f64 reference.
        let small = EigProblems {
            layers: vec![(*k, data[..k * k].to_vec())],
        };
        for kernel in [EigKernel::Faer, EigKernel::Batched] {
            let found = small.solve_once(kernel).unwrap();
            assert!(
                (found - values[0]).abs() <= 1e-6 * values[k - 1],
                "{kernel:?}: {found} vs {values:?}"
            );
        }
        assert!(problems.median_time(1, EigKernel::Faer).unwrap() > 0.0);
        assert!(problems.median_time(1, EigKernel::Batched).unwrap() > 0.0);
    }

    #[test]
    fn layer_state_bytes_follow_the_formulas() {
        let (b, m, k) = (40, 12, 8);
        let config = layer_config("shared-basis", Some(k)).unwrap();
        let (median_s, mean_s, bytes) = time_layer(&config, b, m, 2, 1).unwrap();
        assert!(median_s > 0.0 && mean_s > 0.0);
        // b·k + m·k² + m, plus grafting and momentum b·m each, f32.
        assert_eq!(bytes, (b * k + m * k * k + m + 2 * b * m) * 4);
        let adam = layer_config("adam", None).unwrap();
        let (_, _, bytes) = time_layer(&adam, b, m, 2, 1).unwrap();
        assert_eq!(bytes, 2 * b * m * 4);
        // Shampoo preconditions from step 1 here: its preset starts at 101.
        let shampoo = layer_config("shampoo-1000", None).unwrap();
        assert_eq!(shampoo.start_preconditioning_step, 1);
        assert!(layer_config("nope", None).is_err());
    }

    #[test]
    fn optim_quick_rows_cover_every_autoencoder_layer() {
        let args = OptimArgs {
            quick: true,
            json: None,
            out: PathBuf::from("/nonexistent"),
            optimizers: vec!["adam".into(), "shared-basis".into()],
            ranks: vec![8, 16],
            reps: Some(1),
            warmup: 0,
            no_scaling: true,
        };
        let report = optim(&args).unwrap();
        // Quick: the 8 autoencoder layers, k = 32 only, one row per optimizer.
        assert_eq!(report.results.len(), 16);
        let ours: Vec<&OptimResult> = report
            .results
            .iter()
            .filter(|r| r.optimizer == "shared-basis")
            .collect();
        assert!(ours
            .iter()
            .all(|r| r.rank == Some(32) && r.gemm_gflop_s.unwrap() > 0.0));
        assert_eq!((ours[0].d_in, ours[0].d_out), (784, 1000));
        let table = optim_table(&report);
        assert_eq!(table.lines().count(), 2 + 16);
    }

    #[test]
    fn complexity_counts() {
        // 512·512·32 + 512·32² + 512·32³.
        assert_eq!(
            table1_ours(512, 512, 32),
            (8_388_608 + 524_288 + 16_777_216) as f64
        );
        // k is capped at d_in.
        assert_eq!(table1_ours(30, 250, 32), table1_ours(30, 250, 30));
        assert_eq!(
            shared_basis_gemm_flops(100, 10, 4),
            24.0 * 4000.0 + 6.0 * 10.0 * 64.0
        );
    }

    #[test]
    fn log_log_plots_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let measured = [(128.0, 0.001), (512.0, 0.004), (2048.0, 0.02)];
        let model = [(128.0, 0.001), (512.0, 0.004), (2048.0, 0.016)];
        for ext in ["png", "svg"] {
            let path = dir.path().join(format!("p.{ext}"));
            log_log_plot(&path, "t", "d_in", &measured, &model).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        }
        let svg = std::fs::read_to_string(dir.path().join("p.svg")).unwrap();
        assert!(svg.contains("Table 1"));
    }
}
