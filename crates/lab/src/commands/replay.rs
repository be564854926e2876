//! `precond replay`: run a recorded gradient sequence of one layer through a preconditioner and
//! save each step's raw direction, for cross-checks against other implementations.
//!
//! Input: a `.npy` array of shape (T, b, m), float32 or float64, C or Fortran order: T steps of
//! one layer's (b, m) gradient, blocks are the columns (`g[t, :, i]` is block i). Output: a
//! float32 C-order `.npy` of the same shape whose `[t]` is the raw direction u_t of eq. 6 of the
//! paper, minus sign included (θ_{t+1} = θ_t + lr·u_t), with no grafting, momentum, weight decay
//! or learning rate. float64 input runs `SharedBasis<f64>`, float32 input `SharedBasis<f32>`,
//! both through the [`Preconditioner`] trait.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use npyz::WriterBuilder;
use precond::block_diag::{BlockAdam, BlockAdamConfig};
use precond::diagonal::{Diagonal, DiagonalConfig, DiagonalKind};
use precond::faer::{MatMut, MatRef};
use precond::full_matrix::{FullMatrix, FullMatrixConfig};
use precond::shampoo::{Shampoo, ShampooConfig};
use precond::sketchy::{Sketchy, SketchyConfig};
use precond::soap::{Soap, SoapConfig};
use precond::{
    BlockEigensolver, PrecondError, Preconditioner, Result as PrecondResult, RhoMode, Scalar,
    SharedBasis, SharedBasisConfig,
};
use thiserror::Error;

use crate::data::npy::parse_grads;
pub use crate::data::npy::{GradData, Grads, Precision};
use crate::training::optimizers::NonFinite;

/// The long help of `precond replay` (used by main.rs).
pub const LONG_ABOUT: &str = "\
Replay a recorded gradient sequence of one layer through a preconditioner and save each step's \
raw preconditioned direction.

Input (--grads): a .npy array of shape (T, b, m), float32 or float64, C or Fortran order: T steps \
of one layer's (b, m) gradient; the blocks are the columns (g[t, :, i] is block i).

Output (--out): float32, C order, shape (T, b, m). OUT[t] is the raw direction u_t, minus sign \
included, so that a plain step reads theta_{t+1} = theta_t + lr * u_t. No grafting, momentum, \
weight decay or learning rate is applied. shared-basis: eq. 6 per block, \
u_i = -(B R_i B^T + (rho_i + eps) I)^(-1/2) g_i. shampoo: -(L+eps I)^(-1/4) G (R+eps I)^(-1/4) \
per block, the statistics including step t's gradient before a root is recomputed; -G before \
--start-step. sketchy: the same with each statistic a `--rank` frequent-directions sketch plus \
its escaped mass. block-adam: -(V^ + eps I)^(-1/2) m^ per block. full-adagrad: \
-(H + eps I)^(-1/2) g over the whole flattened gradient. sgd, adagrad, rmsprop, adam, adamw: the \
update before the learning rate, as PyTorch defines it (adam: -m^ / (sqrt(v^) + eps); adamw \
equals adam here, its decoupled decay needs the parameter). Steps count from 1.

A gradient holding NaN or infinity: with --nonfinite error (the default) the replay fails and \
writes nothing; with --nonfinite skip that step's direction is written as zeros and the method \
never sees that gradient, so the later directions equal those of a replay of the same file with \
that step removed.

Precision: float64 input runs the method in f64, float32 input in f32 (the output is float32 \
either way).";

/// The preconditioners `replay` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayOptimizer {
    /// SGD with momentum --beta1 (PyTorch: buf = beta1 buf + g, u = -buf).
    Sgd,
    /// Adagrad (PyTorch): v += g², u = -g / (sqrt(v) + eps).
    Adagrad,
    /// RMSprop (PyTorch, alpha = --beta2): u = -g / (sqrt(v) + eps).
    Rmsprop,
    /// Adam (PyTorch, bias-corrected): u = -m̂ / (sqrt(v̂) + eps).
    Adam,
    /// AdamW: Adam's direction (its decoupled decay needs the parameter, which replay lacks).
    Adamw,
    /// Block Adam: -(V̂ + eps I)^(-1/2) m̂ per block of --block-size rows of each column.
    BlockAdam,
    /// Shampoo with blocking: -(L+eps I)^(-1/4) G (R+eps I)^(-1/4) per block (-G before its
    /// first roots).
    Shampoo,
    /// Sketchy: Shampoo with `--rank` frequent-directions sketches, escaped mass added back.
    Sketchy,
    /// Full-matrix Adagrad over the whole (b, m) gradient: -(H + eps I)^(-1/2) g (small b·m only).
    FullAdagrad,
    /// The shared-basis block low-rank preconditioner (Algorithm 1).
    SharedBasis,
    /// SOAP: Adam (β1 --beta1, β2 --beta2) in the eigenbasis of Shampoo's factors, bases
    /// refreshed every --precondition-every steps, sides above --max-precond-dim the identity;
    /// the first direction is zero.
    Soap,
}

impl ReplayOptimizer {
    /// Default β2: 1 (plain sums) for the Adagrad family and the Shampoo family, PyTorch's
    /// defaults for the others.
    fn default_beta2(self) -> f64 {
        match self {
            Self::Rmsprop => 0.99,
            Self::Adam | Self::Adamw | Self::BlockAdam => 0.999,
            Self::Soap => 0.95,
            _ => 1.0,
        }
    }

    /// Default ε: PyTorch's for the diagonal methods, 1e-6 for the matrix methods.
    fn default_eps(self) -> f64 {
        match self {
            Self::Adagrad => 1e-10,
            Self::Sgd | Self::Rmsprop | Self::Adam | Self::Adamw | Self::BlockAdam | Self::Soap => {
                1e-8
            }
            _ => 1e-6,
        }
    }
}

/// Arguments of `precond replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The method.
    #[arg(long, value_enum)]
    pub optimizer: ReplayOptimizer,
    /// Input gradients: .npy, float32 or float64, shape (T, b, m); blocks are the columns.
    #[arg(long, value_name = "IN.npy")]
    pub grads: PathBuf,
    /// Output directions u_t (float32, shape (T, b, m)), θ_{t+1} = θ_t + lr·u_t.
    #[arg(long, value_name = "OUT.npy")]
    pub out: PathBuf,
    /// Rank k of the shared basis (capped at b); sketchy: rank of each sketch.
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Oversampling p of the randomized SVD.
    #[arg(long, default_value_t = 0)]
    pub oversample: usize,
    /// Power iterations of the randomized SVD per step.
    #[arg(long, default_value_t = 1)]
    pub power_iters: usize,
    /// Power iterations measuring the lost mass ρ.
    #[arg(long, default_value_t = 10, conflicts_with = "rho_exact")]
    pub rho_iters: usize,
    /// Measure ρ exactly (eigendecompositions) instead of by power iteration.
    #[arg(long)]
    pub rho_exact: bool,
    /// Lost-mass policy: norm (Algorithm 1: the residual's spectral norm, by --rho-iters power
    /// iterations or --rho-exact), random-start (--rho-iters steps from a random start in
    /// R^b), rayleigh, fd (frequent directions)
    #[arg(long, default_value = "norm", value_parser = ["norm", "random-start", "rayleigh", "fd"])]
    pub rho: String,
    /// Multiplier on every increment of ρ (0 = ε alone).
    #[arg(long, default_value_t = 1.0)]
    pub rho_scale: f64,
    /// shared-basis, block-adam: the per-block eigensolver: batched (eight blocks at a time in
    /// SIMD lanes) or faer (one block at a time)
    #[arg(long, default_value = "batched", value_parser = ["batched", "faer"])]
    pub eigensolver: String,
    /// ε (absolute): added to ρ_i (shared-basis), to the statistics before their roots (Shampoo,
    /// Sketchy, Block Adam, full-matrix Adagrad) or to the root (diagonal methods)
    /// [default: 1e-6 for matrix methods; PyTorch's for diagonal ones]
    #[arg(long)]
    pub eps: Option<f64>,
    /// First-moment decay (Adam, AdamW, Block Adam) or SGD momentum [default: 0.9]
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// Statistics decay; 1 is a plain sum [default: 1; rmsprop 0.99; adam, adamw, block-adam
    /// 0.999]
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Seed of the randomized SVD's Gaussian start.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shampoo, Sketchy: largest block side; Block Adam: rows per block [default: 1024; Block
    /// Adam 10]
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Shampoo, Sketchy: steps between root recomputations; SOAP: between eigenbasis refreshes.
    #[arg(long, default_value_t = 1)]
    pub precondition_every: u64,
    /// SOAP: a side (b or m) larger than this is not rotated.
    #[arg(long, default_value_t = 10000)]
    pub max_precond_dim: usize,
    /// Shampoo, Sketchy: first (1-based) preconditioned step; before it the direction is -G.
    #[arg(long, default_value_t = 1)]
    pub start_step: u64,
    /// Print the method's state bytes.
    #[arg(long)]
    pub print_memory: bool,
    /// A gradient with NaN or infinity: error fails the replay; skip writes a zero direction for
    /// that step and leaves the method's state untouched (the later directions are those of the
    /// same replay without that step).
    #[arg(long, value_enum, default_value_t = NonFinite::Error)]
    pub nonfinite: NonFinite,
}

impl ReplayArgs {
    fn eps(&self) -> f64 {
        self.eps.unwrap_or(self.optimizer.default_eps())
    }

    fn beta2(&self) -> f64 {
        self.beta2.unwrap_or(self.optimizer.default_beta2())
    }

    /// The Shampoo configuration these flags describe.
    pub fn shampoo_config(&self) -> ShampooConfig {
        ShampooConfig {
            block_size: self.block_size.unwrap_or(1024),
            beta2: self.beta2(),
            eps: self.eps(),
            start_step: self.start_step,
            precondition_every: self.precondition_every,
        }
    }

    /// The preconditioner these flags describe, for a (b, m) layer in precision `T`.
    pub fn build<T: Scalar>(
        &self,
        b: usize,
        m: usize,
    ) -> PrecondResult<Box<dyn Preconditioner<T>>> {
        let diagonal = |kind: DiagonalKind| DiagonalConfig {
            kind,
            beta1: self.beta1,
            beta2: self.beta2(),
            eps: self.eps(),
            ..DiagonalConfig::default()
        };
        Ok(match self.optimizer {
            ReplayOptimizer::Sgd => {
                Box::new(Diagonal::<T>::new(diagonal(DiagonalKind::Sgd), b, m)?)
            }
            ReplayOptimizer::Adagrad => {
                Box::new(Diagonal::<T>::new(diagonal(DiagonalKind::Adagrad), b, m)?)
            }
            ReplayOptimizer::Rmsprop => {
                Box::new(Diagonal::<T>::new(diagonal(DiagonalKind::Rmsprop), b, m)?)
            }
            ReplayOptimizer::Adam => {
                Box::new(Diagonal::<T>::new(diagonal(DiagonalKind::Adam), b, m)?)
            }
            ReplayOptimizer::Adamw => {
                Box::new(Diagonal::<T>::new(diagonal(DiagonalKind::AdamW), b, m)?)
            }
            ReplayOptimizer::BlockAdam => {
                let config = BlockAdamConfig {
                    block_size: self.block_size.unwrap_or(10),
                    beta1: self.beta1,
                    beta2: self.beta2(),
                    eps: self.eps(),
                    eigensolver: self.block_eigensolver(),
                };
                Box::new(BlockAdam::<T>::new(&config, b, m)?)
            }
            ReplayOptimizer::FullAdagrad => {
                let config = FullMatrixConfig {
                    eps: self.eps(),
                    beta2: self.beta2(),
                    ..FullMatrixConfig::default()
                };
                Box::new(FullMatrix::<T>::new(config, b, m)?)
            }
            ReplayOptimizer::SharedBasis => {
                Box::new(SharedBasis::<T>::new(self.shared_basis_config(), b, m)?)
            }
            ReplayOptimizer::Shampoo => Box::new(Shampoo::<T>::new(&self.shampoo_config(), b, m)?),
            ReplayOptimizer::Sketchy => {
                let s = self.shampoo_config();
                let config = SketchyConfig {
                    rank: self.rank,
                    block_size: s.block_size,
                    beta2: s.beta2,
                    eps: s.eps,
                    start_step: s.start_step,
                    precondition_every: s.precondition_every,
                };
                Box::new(Sketchy::<T>::new(&config, b, m)?)
            }
            ReplayOptimizer::Soap => {
                let config = SoapConfig {
                    beta1: self.beta1,
                    beta2: self.beta2(),
                    shampoo_beta: -1.0,
                    eps: self.eps(),
                    precondition_frequency: self.precondition_every,
                    max_precond_dim: self.max_precond_dim,
                };
                Box::new(Soap::<T>::new(&config, b, m)?)
            }
        })
    }

    /// The shared-basis configuration these flags describe.
    /// The `--eigensolver` choice (validated by clap).
    fn block_eigensolver(&self) -> BlockEigensolver {
        match self.eigensolver.as_str() {
            "faer" => BlockEigensolver::Faer,
            _ => BlockEigensolver::Batched,
        }
    }

    pub fn shared_basis_config(&self) -> SharedBasisConfig {
        SharedBasisConfig {
            rank: self.rank,
            oversample: self.oversample,
            power_iters: self.power_iters,
            rho: match self.rho.as_str() {
                "random-start" => RhoMode::RandomStart(self.rho_iters),
                "rayleigh" => RhoMode::Rayleigh,
                "fd" => RhoMode::FrequentDirections,
                _ if self.rho_exact => RhoMode::Exact,
                _ => RhoMode::PowerIteration(self.rho_iters),
            },
            eps: self.eps(),
            beta2: self.beta2(),
            seed: self.seed,
            rho_scale: self.rho_scale,
            eigensolver: self.block_eigensolver(),
        }
    }
}

/// Everything that can go wrong in `replay`; every variant names the file concerned.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    BadInput { path: PathBuf, msg: String },
    #[error("{path}: step {step}: {source}")]
    Step {
        path: PathBuf,
        step: usize,
        source: PrecondError,
    },
    #[error("invalid configuration: {0}")]
    Config(PrecondError),
}

/// What a replay did.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayReport {
    pub steps: usize,
    pub rows: usize,
    pub blocks: usize,
    pub precision: Precision,
    /// The preconditioner's state bytes after the last step.
    pub state_bytes: usize,
    /// Indices t (0-based, as in OUT[t]) of the steps skipped under `--nonfinite skip`.
    pub skipped: Vec<usize>,
}

/// `precond replay`: runs and prints a one-line summary (and the state bytes on request).
pub fn command(args: &ReplayArgs) -> Result<ExitCode, ReplayError> {
    let r = run(args)?;
    for &t in &r.skipped {
        eprintln!(
            "warning: {}: OUT[{t}] (step {}): the gradient holds NaN or infinity; skipped, zero \
             direction written",
            args.grads.display(),
            t + 1
        );
    }
    println!(
        "{}: {} steps of a ({}, {}) layer, {:?} {:?}",
        args.out.display(),
        r.steps,
        r.rows,
        r.blocks,
        r.precision,
        args.optimizer
    );
    if args.print_memory {
        println!("state bytes: {}", r.state_bytes);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads `args.grads`, replays it, writes `args.out`.
pub fn run(args: &ReplayArgs) -> Result<ReplayReport, ReplayError> {
    let g = read_grads(&args.grads)?;
    let (t, b, m) = (g.steps, g.rows, g.blocks);
    let skip = args.nonfinite == NonFinite::Skip;
    let (r, precision) = match &g.data {
        GradData::F32(v) => {
            let precond = args.build::<f32>(b, m).map_err(ReplayError::Config)?;
            let r = replay::<f32>(v, t, b, m, precond, skip, &args.grads)?;
            (r, Precision::F32)
        }
        GradData::F64(v) => {
            let precond = args.build::<f64>(b, m).map_err(ReplayError::Config)?;
            let r = replay::<f64>(v, t, b, m, precond, skip, &args.grads)?;
            (r, Precision::F64)
        }
    };
    let Replayed {
        directions: dirs,
        state_bytes,
        skipped,
    } = r;
    write_f32(&args.out, &dirs, [t, b, m])?;
    Ok(ReplayReport {
        steps: t,
        rows: b,
        blocks: m,
        precision,
        state_bytes,
        skipped,
    })
}

/// What [`replay`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Replayed {
    /// The directions, C order (T, b, m), f32.
    pub directions: Vec<f32>,
    /// The method's state bytes after the last step.
    pub state_bytes: usize,
    /// Indices t (0-based) of the steps skipped for a non-finite gradient.
    pub skipped: Vec<usize>,
}

/// Runs `precond` over the C-order (T, b, m) `data`; returns the directions (C order, f32), the
/// final state bytes and the skipped steps. A step whose gradient holds NaN or ∞ is an error
/// naming it, or with `skip_nonfinite` a zero direction, the method never seeing that gradient.
pub fn replay<T: Scalar>(
    data: &[T],
    steps: usize,
    rows: usize,
    blocks: usize,
    mut precond: Box<dyn Preconditioner<T>>,
    skip_nonfinite: bool,
    path: &Path,
) -> Result<Replayed, ReplayError> {
    let (b, m) = (rows, blocks);
    let mut out = Vec::with_capacity(steps * b * m);
    // Column-major (b, m) buffers: column i is block i.
    let mut grad = vec![T::zero(); b * m];
    let mut dir = vec![T::zero(); b * m];
    let mut skipped = Vec::new();
    for (t, slab) in data.chunks_exact(b * m).take(steps).enumerate() {
        if slab.iter().any(|x| !x.is_finite()) {
            if skip_nonfinite {
                out.resize(out.len() + b * m, 0.0);
                skipped.push(t);
                continue;
            }
            return Err(ReplayError::BadInput {
                path: path.to_path_buf(),
                msg: format!("step {t}: the gradient holds NaN or infinity"),
            });
        }
        for r in 0..b {
            for c in 0..m {
                grad[c * b + r] = slab[r * m + c];
            }
        }
        precond
            .precondition(
                MatRef::from_column_major_slice(&grad, b, m),
                MatMut::from_column_major_slice_mut(&mut dir, b, m),
            )
            .map_err(|source| ReplayError::Step {
                path: path.to_path_buf(),
                step: t,
                source,
            })?;
        for r in 0..b {
            for c in 0..m {
                out.push(dir[c * b + r].f64() as f32);
            }
        }
    }
    Ok(Replayed {
        directions: out,
        state_bytes: precond.state_bytes(),
        skipped,
    })
}

/// Reads a (T, b, m) float32/float64 `.npy` (C or Fortran order) into C order, with errors that
/// name the file.
pub fn read_grads(path: &Path) -> Result<Grads, ReplayError> {
    let bytes = std::fs::read(path).map_err(|source| ReplayError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_grads(&bytes).map_err(|msg| ReplayError::BadInput {
        path: path.to_path_buf(),
        msg,
    })
}

/// Writes a float32 C-order `.npy` of `shape`.
pub fn write_f32(path: &Path, data: &[f32], shape: [usize; 3]) -> Result<(), ReplayError> {
    let io = |source| ReplayError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(io)?;
    let shape = shape.map(|d| d as u64);
    let mut w = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&shape)
        .writer(BufWriter::new(file))
        .begin_nd()
        .map_err(io)?;
    w.extend(data.iter().copied()).map_err(io)?;
    w.finish().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use npyz::{NpyFile, Order};
    use precond::faer::{Mat, Side};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn args(grads: PathBuf, out: PathBuf) -> ReplayArgs {
        ReplayArgs {
            optimizer: ReplayOptimizer::SharedBasis,
            grads,
            out,
            rank: 6,
            oversample: 0,
            power_iters: 1,
            rho_iters: 10,
            rho_exact: false,
            rho: "norm".into(),
            rho_scale: 1.0,
            eigensolver: "batched".into(),
            eps: Some(1e-2),
            beta1: 0.9,
            beta2: None,
            seed: 0,
            block_size: None,
            precondition_every: 1,
            max_precond_dim: 10000,
            start_step: 1,
            print_memory: false,
            nonfinite: NonFinite::Error,
        }
    }

    /// (A + εI)^{−1/4} of a symmetric f64 matrix, by faer's dense eigendecomposition.
    fn inv_fourth_root(a: &Mat<f64>, eps: f64) -> Mat<f64> {
        let n = a.nrows();
        let evd = a.self_adjoint_eigen(Side::Lower).unwrap();
        let (u, lam) = (evd.U(), evd.S().column_vector());
        Mat::from_fn(n, n, |i, j| {
            (0..n)
                .map(|k| u[(i, k)] * u[(j, k)] * (lam[k].max(0.0) + eps).powf(-0.25))
                .sum()
        })
    }

    /// Shampoo (one block, roots every step from step 1, plain sums) through replay equals
    /// −(L_t+εI)^{−1/4} G_t (R_t+εI)^{−1/4} in f64.
    #[test]
    fn shampoo_replay_equals_the_f64_formula() {
        let dir = tempfile::tempdir().unwrap();
        let (t, b, m, eps) = (6usize, 5usize, 4usize, 1e-2);
        let g = gradients(t, b, m, 3);
        let (mut l, mut r) = (Mat::<f64>::zeros(b, b), Mat::<f64>::zeros(m, m));
        let mut want = Vec::new();
        for s in 0..t {
            let gs = Mat::from_fn(b, m, |i, j| g[(s * b + i) * m + j]);
            l += &gs * gs.transpose();
            r += gs.transpose() * &gs;
            let u = inv_fourth_root(&l, eps) * &gs * inv_fourth_root(&r, eps);
            want.extend(
                (0..b)
                    .flat_map(|i| (0..m).map(move |j| (i, j)))
                    .map(|(i, j)| -u[(i, j)]),
            );
        }
        let (inp, out) = (dir.path().join("g.npy"), dir.path().join("u.npy"));
        write_npy(&inp, &g, &[t as u64, b as u64, m as u64], Order::C);
        let report = run(&ReplayArgs {
            optimizer: ReplayOptimizer::Shampoo,
            eps: Some(eps),
            ..args(inp, out.clone())
        })
        .unwrap();
        // Statistics and roots, f64: 2·(5² + 4²) floats.
        assert_eq!(report.state_bytes, 2 * (25 + 16) * 8);
        let err = max_err(&read_f32(&out).1, &want);
        // f64 run; what is left is the f32 rounding of the output.
        assert!(err <= 1e-6, "max error {err}");

        // Sketchy with a rank ≥ both sides keeps everything: the same directions.
        let out = dir.path().join("sketchy.npy");
        run(&ReplayArgs {
            optimizer: ReplayOptimizer::Sketchy,
            rank: 8,
            eps: Some(eps),
            ..args(dir.path().join("g.npy"), out.clone())
        })
        .unwrap();
        let err = max_err(&read_f32(&out).1, &want);
        assert!(err <= 1e-6, "sketchy max error {err}");
    }

    fn write_npy<T: npyz::AutoSerialize + Copy>(
        path: &Path,
        data: &[T],
        shape: &[u64],
        order: Order,
    ) {
        let mut w = npyz::WriteOptions::<T>::new()
            .default_dtype()
            .shape(shape)
            .order(order)
            .writer(BufWriter::new(File::create(path).unwrap()))
            .begin_nd()
            .unwrap();
        w.extend(data.iter().copied()).unwrap();
        w.finish().unwrap();
    }

    fn read_f32(path: &Path) -> (Vec<u64>, Vec<f32>) {
        let bytes = std::fs::read(path).unwrap();
        let npy = NpyFile::new(&bytes[..]).unwrap();
        assert_eq!(npy.order(), Order::C);
        let shape = npy.shape().to_vec();
        (shape, npy.into_vec::<f32>().unwrap())
    }

    /// Seeded gradients (T, b, m) in C order.
    fn gradients(t: usize, b: usize, m: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..t * b * m)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect()
    }

    /// Exact block-diagonal Adagrad in f64: u = −(Σ_{s≤t} g gᵀ + εI)^{−1/2} g per block (column).
    fn adagrad_reference(g: &[f64], t: usize, b: usize, m: usize, eps: f64) -> Vec<f64> {
        let mut stats = vec![Mat::<f64>::zeros(b, b); m];
        let mut out = vec![0.0; t * b * m];
        for s in 0..t {
            for (c, st) in stats.iter_mut().enumerate() {
                let col: Vec<f64> = (0..b).map(|r| g[(s * b + r) * m + c]).collect();
                for i in 0..b {
                    for j in 0..b {
                        st[(i, j)] += col[i] * col[j];
                    }
                }
                let mut a = st.clone();
                for i in 0..b {
                    a[(i, i)] += eps;
                }
                let evd = a.self_adjoint_eigen(Side::Lower).unwrap();
                let (u, lam) = (evd.U(), evd.S().column_vector());
                for r in 0..b {
                    let mut x = 0.0;
                    for k in 0..b {
                        let proj: f64 = (0..b).map(|i| u[(i, k)] * col[i]).sum();
                        x += u[(r, k)] * proj / lam[k].sqrt();
                    }
                    out[(s * b + r) * m + c] = -x;
                }
            }
        }
        out
    }

    fn max_err(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn full_rank_replay_equals_block_adagrad() {
        let dir = tempfile::tempdir().unwrap();
        let (t, b, m) = (5usize, 6usize, 3usize);
        let g = gradients(t, b, m, 1);
        let want = adagrad_reference(&g, t, b, m, 1e-2);
        let shape = [t as u64, b as u64, m as u64];

        // float32 input: SharedBasis<f32>.
        let (inp, out) = (dir.path().join("g32.npy"), dir.path().join("u32.npy"));
        let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        write_npy(&inp, &g32, &shape, Order::C);
        let report = run(&args(inp, out.clone())).unwrap();
        assert_eq!(report.precision, Precision::F32);
        assert_eq!((report.steps, report.rows, report.blocks), (t, b, m));
        // k = 6: basis 6·6, coefficients 3·6·6, ρ 3, all f32.
        assert_eq!(report.state_bytes, (36 + 108 + 3) * 4);
        let (got_shape, got) = read_f32(&out);
        assert_eq!(got_shape, shape);
        let err32 = max_err(&got, &want);
        // Measured 4.3e-5 (directions are O(1)): f32 kernels and the f32 rounding of g.
        assert!(err32 <= 1e-4, "f32 max error {err32}");

        // float64 input: SharedBasis<f64>; the error left is the f32 rounding of the output.
        let (inp, out) = (dir.path().join("g64.npy"), dir.path().join("u64.npy"));
        write_npy(&inp, &g, &shape, Order::C);
        let report = run(&args(inp, out.clone())).unwrap();
        assert_eq!(report.precision, Precision::F64);
        assert_eq!(report.state_bytes, (36 + 108 + 3) * 8);
        let err64 = max_err(&read_f32(&out).1, &want);
        assert!(err64 <= 1e-6, "f64 max error {err64}");
        eprintln!("max |err| vs exact block Adagrad: f32 input {err32:.2e}, f64 input {err64:.2e}");
    }

    /// Adam through replay (float64 input) equals PyTorch's update before the learning rate,
    /// −m̂/(√v̂ + ε), computed here in f64; Block Adam with blocks of 1 equals the same with ε
    /// inside the root, −m̂/√(v̂ + ε).
    #[test]
    fn adam_and_block_adam_replays_equal_the_f64_formulas() {
        let dir = tempfile::tempdir().unwrap();
        let (t, b, m) = (7usize, 4usize, 3usize);
        let g = gradients(t, b, m, 5);
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut mom, mut v) = (vec![0.0; b * m], vec![0.0; b * m]);
        let (mut adam, mut block) = (Vec::new(), Vec::new());
        for s in 0..t {
            let k = (s + 1) as i32;
            for i in 0..b * m {
                let x = g[s * b * m + i];
                mom[i] = b1 * mom[i] + (1.0 - b1) * x;
                v[i] = b2 * v[i] + (1.0 - b2) * x * x;
                let (mh, vh) = (mom[i] / (1.0 - b1.powi(k)), v[i] / (1.0 - b2.powi(k)));
                adam.push(-mh / (vh.sqrt() + eps));
                block.push(-mh / (vh + eps).sqrt());
            }
        }
        let inp = dir.path().join("g.npy");
        write_npy(&inp, &g, &[t as u64, b as u64, m as u64], Order::C);
        for (optimizer, want) in [
            (ReplayOptimizer::Adam, &adam),
            (ReplayOptimizer::BlockAdam, &block),
        ] {
            let out = dir.path().join("u.npy");
            run(&ReplayArgs {
                optimizer,
                eps: None,
                block_size: Some(1),
                ..args(inp.clone(), out.clone())
            })
            .unwrap();
            let err = max_err(&read_f32(&out).1, want);
            // Directions are O(1); what is left is the f32 rounding of the output.
            assert!(err <= 1e-6, "{optimizer:?} max error {err}");
        }
    }

    #[test]
    fn fortran_order_input_is_read_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let (t, b, m) = (4usize, 5usize, 3usize);
        let g: Vec<f32> = gradients(t, b, m, 2).iter().map(|&x| x as f32).collect();
        let shape = [t as u64, b as u64, m as u64];
        let c_path = dir.path().join("c.npy");
        write_npy(&c_path, &g, &shape, Order::C);
        // The same array stored in Fortran order: element (s, r, c) at s + T(r + b c).
        let mut f = vec![0.0f32; g.len()];
        for s in 0..t {
            for r in 0..b {
                for c in 0..m {
                    f[s + t * (r + b * c)] = g[(s * b + r) * m + c];
                }
            }
        }
        let f_path = dir.path().join("f.npy");
        write_npy(&f_path, &f, &shape, Order::Fortran);
        assert_eq!(read_grads(&c_path).unwrap(), read_grads(&f_path).unwrap());
        let mut a = args(c_path, dir.path().join("uc.npy"));
        a.rank = 2;
        run(&a).unwrap();
        let mut fa = args(f_path, dir.path().join("uf.npy"));
        fa.rank = 2;
        run(&fa).unwrap();
        assert_eq!(
            read_f32(&a.out).1,
            read_f32(&fa.out).1,
            "same directions from C and Fortran files"
        );
    }

    fn error_of(path: &Path) -> String {
        let out = path.with_extension("out.npy");
        let e = run(&args(path.to_path_buf(), out.clone())).unwrap_err();
        assert!(!out.exists(), "no output on error");
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "error must name the file: {msg}"
        );
        msg
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);

        write_npy(&p("2d.npy"), &[1.0f32; 6], &[2, 3], Order::C);
        let msg = error_of(&p("2d.npy"));
        assert!(msg.contains("3-D"), "{msg}");

        write_npy(&p("int.npy"), &[1i32; 12], &[2, 3, 2], Order::C);
        let msg = error_of(&p("int.npy"));
        assert!(msg.contains("dtype") && msg.contains("<i4"), "{msg}");

        write_npy(&p("full.npy"), &[1.0f32; 12], &[2, 3, 2], Order::C);
        let bytes = std::fs::read(p("full.npy")).unwrap();
        std::fs::write(p("trunc.npy"), &bytes[..bytes.len() - 5]).unwrap();
        let msg = error_of(&p("trunc.npy"));
        assert!(msg.contains("truncated"), "{msg}");
        let mut extra = bytes.clone();
        extra.extend_from_slice(&[0; 4]);
        std::fs::write(p("extra.npy"), &extra).unwrap();
        assert!(error_of(&p("extra.npy")).contains("unexpected bytes"));

        std::fs::write(p("garbage.npy"), b"this is not an npy file at all").unwrap();
        let msg = error_of(&p("garbage.npy"));
        assert!(msg.contains("not a valid .npy"), "{msg}");
        let mut bad_header = bytes.clone();
        bad_header[12] = b'#';
        std::fs::write(p("header.npy"), &bad_header).unwrap();
        error_of(&p("header.npy"));

        write_npy(&p("empty.npy"), &[0.0f32; 0], &[3, 0, 2], Order::C);
        assert!(error_of(&p("empty.npy")).contains("at least 1"));

        let mut nan = vec![1.0f64; 12];
        nan[7] = f64::NAN;
        write_npy(&p("nan.npy"), &nan, &[2, 3, 2], Order::C);
        assert!(error_of(&p("nan.npy")).contains("step 1"));

        let missing = p("missing.npy");
        let e = run(&args(missing.clone(), p("o.npy"))).unwrap_err();
        assert!(matches!(e, ReplayError::Io { .. }));
        assert!(e.to_string().contains("missing.npy"));

        // A bad configuration is refused before reading.
        let mut a = args(p("full.npy"), p("o2.npy"));
        a.eps = Some(0.0);
        assert!(matches!(run(&a), Err(ReplayError::Config(_))));
    }

    /// `--nonfinite skip`: a NaN/∞ gradient at step index 3 gives a zero direction there, and every
    /// other direction is bitwise that of a replay of the file with step 3 removed; for methods
    /// whose state counts steps (Adam's bias correction, Shampoo's root schedule, Sketchy's,
    /// shared-basis statistics). `--nonfinite error` (the default) fails naming the step.
    #[test]
    fn nonfinite_skip_equals_a_replay_without_that_step() {
        let dir = tempfile::tempdir().unwrap();
        let (t, b, m, bad_t) = (8usize, 5usize, 4usize, 3usize);
        let g = gradients(t, b, m, 11);
        let n = b * m;
        let removed: Vec<f64> = g[..bad_t * n]
            .iter()
            .chain(&g[(bad_t + 1) * n..])
            .copied()
            .collect();
        let cases = [
            (ReplayOptimizer::SharedBasis, f64::NAN),
            (ReplayOptimizer::Shampoo, f64::INFINITY),
            (ReplayOptimizer::Sketchy, f64::NAN),
            (ReplayOptimizer::Adam, f64::NEG_INFINITY),
            (ReplayOptimizer::Soap, f64::NAN),
            (ReplayOptimizer::BlockAdam, f64::NAN),
        ];
        for (k, (optimizer, poison)) in cases.into_iter().enumerate() {
            let mut bad = g.clone();
            bad[bad_t * n + 7] = poison;
            let a = |name: &str, out: &str| ReplayArgs {
                optimizer,
                rank: 2,
                block_size: Some(3),
                precondition_every: 2,
                start_step: 3,
                eps: None,
                ..args(dir.path().join(name), dir.path().join(out))
            };
            for f64_input in [true, false] {
                let shape = |t: usize| [t as u64, b as u64, m as u64];
                let write = |name: &str, v: &[f64], t: usize| {
                    let path = dir.path().join(name);
                    if f64_input {
                        write_npy(&path, v, &shape(t), Order::C);
                    } else {
                        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                        write_npy(&path, &v32, &shape(t), Order::C);
                    }
                };
                write("bad.npy", &bad, t);
                write("removed.npy", &removed, t - 1);
                write("good.npy", &g, t);
                let report = run(&ReplayArgs {
                    nonfinite: NonFinite::Skip,
                    ..a("bad.npy", "u_skip.npy")
                })
                .unwrap();
                assert_eq!(report.skipped, vec![bad_t]);
                assert_eq!(report.steps, t);
                let short = run(&a("removed.npy", "u_removed.npy")).unwrap();
                assert_eq!(report.state_bytes, short.state_bytes);
                run(&a("good.npy", "u_good.npy")).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                let (shape_skip, skip) = read_f32(&dir.path().join("u_skip.npy"));
                assert_eq!(shape_skip, shape(t));
                let removed_dirs = read_f32(&dir.path().join("u_removed.npy")).1;
                let good = read_f32(&dir.path().join("u_good.npy")).1;
                let label = format!("{optimizer:?} f64 input {f64_input} (case {k})");
                assert_eq!(
                    bits(&skip[bad_t * n..(bad_t + 1) * n]),
                    vec![0u32; n],
                    "{label}"
                );
                assert_eq!(
                    bits(&skip[..bad_t * n]),
                    bits(&removed_dirs[..bad_t * n]),
                    "{label}"
                );
                assert_eq!(
                    bits(&skip[(bad_t + 1) * n..]),
                    bits(&removed_dirs[bad_t * n..]),
                    "{label}"
                );
                // Not vacuous: with the finite gradient kept, the later directions differ.
                assert_ne!(
                    bits(&skip[(bad_t + 1) * n..]),
                    bits(&good[(bad_t + 1) * n..]),
                    "{label}"
                );
                // The default refuses the file, naming it and the step, and writes nothing.
                let out = dir.path().join("u_err.npy");
                let e = run(&a("bad.npy", "u_err.npy")).unwrap_err().to_string();
                assert!(!out.exists(), "{label}: no output on error");
                assert!(
                    e.contains("bad.npy") && e.contains(&format!("step {bad_t}")),
                    "{label}: {e}"
                );
            }
        }
    }

    #[test]
    fn nonfinite_flag_parses() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ReplayArgs,
        }
        let base = [
            "x",
            "--optimizer",
            "adam",
            "--grads",
            "a.npy",
            "--out",
            "b.npy",
        ];
        let parse = |extra: &[&str]| {
            let argv: Vec<&str> = base.iter().chain(extra).copied().collect();
            Cli::try_parse_from(argv).map(|c| c.args.nonfinite)
        };
        assert_eq!(parse(&[]).unwrap(), NonFinite::Error);
        assert_eq!(parse(&["--nonfinite", "skip"]).unwrap(), NonFinite::Skip);
        assert_eq!(parse(&["--nonfinite", "error"]).unwrap(), NonFinite::Error);
        let err = parse(&["--nonfinite", "ignore"]).unwrap_err().to_string();
        assert!(err.contains("possible values: error, skip"), "{err}");
    }

    #[test]
    fn help_states_the_direction_convention() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ReplayArgs,
        }
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("θ_{t+1} = θ_t + lr·u_t"), "{help}");
        assert!(LONG_ABOUT.contains("theta_{t+1} = theta_t + lr * u_t"));
        assert!(LONG_ABOUT.contains("float64 input runs the method in f64"));
        let ok = Cli::try_parse_from([
            "x",
            "--optimizer",
            "shared-basis",
            "--grads",
            "a.npy",
            "--out",
            "b.npy",
            "--rho-exact",
            "--print-memory",
        ])
        .unwrap();
        assert_eq!(ok.args.shared_basis_config().rho, RhoMode::Exact);
        assert!(Cli::try_parse_from([
            "x",
            "--optimizer",
            "shared-basis",
            "--grads",
            "a.npy",
            "--out",
            "b.npy",
            "--rho-exact",
            "--rho-iters",
            "3",
        ])
        .is_err());
    }
}
