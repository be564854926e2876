//! Shampoo with blocking (Gupta, Koren and Singer, ICML 2018; Anil, Gupta, Koren, Regan and
//! Singer 2020, "Scalable Second Order Optimization for Deep Learning", distributed Shampoo) for
//! one parameter seen as a (b, m) matrix G.
//!
//! **Blocking.** The rows are cut into consecutive pieces of at most `block_size` and the columns
//! likewise (the last piece of each may be smaller), giving a grid of blocks G_{pq}. Every block
//! is preconditioned on its own, with left statistics L (rows × rows) and right statistics R
//! (cols × cols).
//!
//! **One step** t (1-based), per block with gradient block G:
//!
//! 1. Statistics: L ← β2 L + (1 − β2) G Gᵀ and R ← β2 R + (1 − β2) Gᵀ G; with β2 = 1 the plain
//!    sums L ← L + G Gᵀ, R ← R + Gᵀ G (as distributed Shampoo).
//! 2. Roots, at the steps t ≥ start_step with (t − start_step) mod precondition_every = 0 (after
//!    step 1, so they include the current gradient): P_L = (L + ε I)^{−1/4} and
//!    P_R = (R + ε I)^{−1/4} by symmetric eigendecomposition, L = V diag(λ) Vᵀ ↦
//!    V diag((max(λ, 0) + ε)^{−1/4}) Vᵀ. When an eigendecomposition fails or yields non-finite
//!    values, that root keeps its previous value and [`Shampoo::failed_roots`] is incremented.
//! 3. Direction: u = −P_L G P_R, once every block holds both roots (which happens at
//!    t ≥ start_step). Before that the preconditioner has no direction of its own: it writes
//!    u = −G and [`Shampoo::is_preconditioning`] is false, so that the caller (grafting) uses its
//!    own direction instead.
//!
//! With precondition_every = 1, start_step = 1 and β2 = 1:
//! u_t = −(L_t + εI)^{−1/4} G_t (R_t + εI)^{−1/4} with L_t = Σ_{s≤t} G_s G_sᵀ and
//! R_t = Σ_{s≤t} G_sᵀ G_s.
//!
//! Decisions where the papers are silent (ours): a root that could never be computed leaves the
//! whole parameter unpreconditioned (u = −G, `is_preconditioning()` false) rather than mixing
//! preconditioned and raw blocks; the two roots of a block are recomputed and kept independently
//! (as distributed Shampoo falls back per statistics matrix); statistics that overflowed stay
//! non-finite, so every later root of that matrix fails and is counted.
//!
//! **Linear-algebra failures** (the policy of [`crate::optimizer`]). The eigendecomposition of an
//! f32 statistic that fails is retried in f64 inside [`crate::linalg::SymEig`] (statistic
//! converted to f64, eigenpairs rounded back), so a retry that succeeds gives the root of the
//! f64 decomposition and is not counted. A root that still fails (no convergence in f64 too, a
//! non-finite statistic or root, e.g. after an overflow) keeps its previous value; the
//! statistics L and R have absorbed this step's gradient all the same, and the direction is
//! computed with the kept root. [`Shampoo::failed_roots`] counts every such root;
//! [`Preconditioner::linalg_health`] counts the root steps with at least one failed root
//! (`failures`) and how many of them came in a row (`consecutive`: a root step whose roots all
//! succeed resets it, a step that computes no roots leaves it alone). Erroring after too many
//! failures in a row is [`crate::optimizer::ParamOptimizer`]'s job
//! ([`crate::OptimizerConfig::max_linalg_failures`]).
//!
//! Apart from shape and non-finite-gradient errors (returned before any state changes) a step
//! cannot fail: root failures are counted, not returned.

use crate::error::{invalid, PrecondError, Result};
use crate::linalg::{gemm, par_layer, symmetrize, SymEig};
use crate::preconditioner::{check_finite, check_shapes, check_view, LinalgHealth, Preconditioner};
use crate::scalar::Scalar;
use faer::reborrow::ReborrowMut;
use faer::{Mat, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Hyperparameters of blocked Shampoo. Defaults: block 1024, β2 = 1 (plain sums), ε = 1e-6,
/// roots from the first step and at every step (the papers' start 101 / every 10 are presets
/// chosen elsewhere).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShampooConfig {
    /// Largest side of a block; rows and columns are cut into pieces of at most this size.
    pub block_size: usize,
    /// Statistics decay β2 in (0, 1]: 1 is the plain sum (distributed Shampoo's β2 = 1).
    pub beta2: f64,
    /// ε added to the (clamped) eigenvalues of the statistics before the inverse 4th root.
    /// Must be finite and > 0.
    pub eps: f64,
    /// First step (1-based) at which roots are computed and the direction is preconditioned.
    pub start_step: u64,
    /// Roots are recomputed at the steps t ≥ start_step with
    /// (t − start_step) mod precondition_every = 0.
    pub precondition_every: u64,
}

impl Default for ShampooConfig {
    fn default() -> Self {
        Self {
            block_size: 1024,
            beta2: 1.0,
            eps: 1e-6,
            start_step: 1,
            precondition_every: 1,
        }
    }
}

impl ShampooConfig {
    /// Checks every field; returns a clear error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if self.block_size == 0 {
            return Err(invalid("block_size", self.block_size, "must be at least 1"));
        }
        if !(self.beta2 > 0.0 && self.beta2 <= 1.0) {
            return Err(invalid("beta2", self.beta2, "must be in (0, 1]"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        if self.start_step == 0 {
            return Err(invalid("start_step", self.start_step, "must be at least 1"));
        }
        if self.precondition_every == 0 {
            return Err(invalid(
                "precondition_every",
                self.precondition_every,
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Whether roots are recomputed at step `t` (1-based).
    fn is_root_step(&self, t: u64) -> bool {
        t >= self.start_step && (t - self.start_step) % self.precondition_every == 0
    }
}

/// Consecutive pieces (start, len) of `0..n`, each at most `size` long.
pub(crate) fn pieces(n: usize, size: usize) -> Vec<(usize, usize)> {
    (0..n)
        .step_by(size)
        .map(|start| (start, size.min(n - start)))
        .collect()
}

/// One block G_{pq} = G[row0 .. row0 + rows, col0 .. col0 + cols] with its statistics and roots,
/// all column-major and symmetric.
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "")]
struct Block<T: Scalar> {
    row0: usize,
    rows: usize,
    col0: usize,
    cols: usize,
    /// L (rows × rows).
    left: Vec<T>,
    /// R (cols × cols).
    right: Vec<T>,
    /// P_L = (L + εI)^{−1/4} as of the last successful recomputation (rows × rows).
    left_root: Vec<T>,
    /// P_R = (R + εI)^{−1/4} as of the last successful recomputation (cols × cols).
    right_root: Vec<T>,
    /// Whether `left_root` has ever been computed.
    left_ready: bool,
    /// Whether `right_root` has ever been computed.
    right_ready: bool,
}

impl<T: Scalar> Block<T> {
    fn new(row0: usize, rows: usize, col0: usize, cols: usize) -> Self {
        Self {
            row0,
            rows,
            col0,
            cols,
            left: vec![T::zero(); rows * rows],
            right: vec![T::zero(); cols * cols],
            left_root: vec![T::zero(); rows * rows],
            right_root: vec![T::zero(); cols * cols],
            left_ready: false,
            right_ready: false,
        }
    }

    fn ready(&self) -> bool {
        self.left_ready && self.right_ready
    }

    /// This block's piece of a (b, m) matrix.
    fn of<'a>(&self, g: MatRef<'a, T>) -> MatRef<'a, T> {
        g.submatrix(self.row0, self.col0, self.rows, self.cols)
    }

    /// L ← decay·L + weight·G Gᵀ and R ← decay·R + weight·Gᵀ G.
    fn accumulate(&mut self, g: MatRef<'_, T>, decay: T, weight: T, par: Par) {
        if decay != T::one() {
            self.left.iter_mut().for_each(|v| *v *= decay);
            self.right.iter_mut().for_each(|v| *v *= decay);
        }
        let (r, c) = (self.rows, self.cols);
        let left = MatMut::from_column_major_slice_mut(&mut self.left, r, r);
        gemm(left, true, g, g.transpose(), weight, par);
        let right = MatMut::from_column_major_slice_mut(&mut self.right, c, c);
        gemm(right, true, g.transpose(), g, weight, par);
    }

    /// Recomputes both roots; returns how many of the two failed (and kept their old value).
    fn recompute_roots(&mut self, eps: T, cache: &mut RootCache<T>, par: Par) -> u64 {
        let mut failed = 0;
        let work = cache.get(self.rows);
        if inverse_fourth_root(&self.left, eps, work, &mut self.left_root, par) {
            self.left_ready = true;
        } else {
            failed += 1;
        }
        let work = cache.get(self.cols);
        if inverse_fourth_root(&self.right, eps, work, &mut self.right_root, par) {
            self.right_ready = true;
        } else {
            failed += 1;
        }
        failed
    }
}

/// Scratch for the inverse 4th root of one n × n matrix.
struct RootWorkspace<T: Scalar> {
    eig: SymEig<T>,
    /// V diag(s).
    scaled: Mat<T>,
    /// V diag(s) Vᵀ before it is accepted.
    root: Mat<T>,
}

impl<T: Scalar> RootWorkspace<T> {
    fn new(n: usize) -> Self {
        Self {
            eig: SymEig::new(n),
            scaled: Mat::zeros(n, n),
            root: Mat::zeros(n, n),
        }
    }
}

/// One [`RootWorkspace`] per distinct dimension (at most four: full and last row piece, full
/// and last column piece), built on first use.
struct RootCache<T: Scalar>(Vec<RootWorkspace<T>>);

impl<T: Scalar> Default for RootCache<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Scalar> RootCache<T> {
    fn get(&mut self, n: usize) -> &mut RootWorkspace<T> {
        let pos = match self.0.iter().position(|w| w.eig.dim() == n) {
            Some(pos) => pos,
            None => {
                self.0.push(RootWorkspace::new(n));
                self.0.len() - 1
            }
        };
        &mut self.0[pos]
    }
}

/// Writes (S + εI)^{−1/4} = V diag((max(λ, 0) + ε)^{−1/4}) Vᵀ of the symmetric n × n `stat`
/// (column-major, lower triangle read) into `root`. Returns false, leaving `root` untouched, when
/// the eigendecomposition fails or anything non-finite appears.
fn inverse_fourth_root<T: Scalar>(
    stat: &[T],
    eps: T,
    work: &mut RootWorkspace<T>,
    root: &mut [T],
    par: Par,
) -> bool {
    let n = work.eig.dim();
    let stat = MatRef::from_column_major_slice(stat, n, n);
    if !work.eig.compute(stat) {
        return false;
    }
    for j in 0..n {
        let lambda = work.eig.value(j);
        let lambda = if lambda > T::zero() {
            lambda
        } else {
            T::zero()
        } + eps;
        let scale = T::one() / lambda.sqrt().sqrt();
        if !scale.is_finite() {
            return false;
        }
        for i in 0..n {
            work.scaled[(i, j)] = work.eig.vectors[(i, j)] * scale;
        }
    }
    gemm(
        work.root.as_mut(),
        false,
        work.scaled.as_ref(),
        work.eig.vectors.transpose(),
        T::one(),
        par,
    );
    symmetrize(work.root.as_mut());
    if !work
        .root
        .col_iter()
        .all(|col| col.iter().all(|v| v.is_finite()))
    {
        return false;
    }
    MatMut::from_column_major_slice_mut(root, n, n).copy_from(work.root.as_ref());
    true
}

/// Scratch that is not part of the saved state.
struct Workspace<T: Scalar> {
    /// Eigendecomposition workspaces of the sequential root path, one per dimension.
    roots: RootCache<T>,
    /// P_L G of the largest block (block_rows × block_cols).
    product: Mat<T>,
}

impl<T: Scalar> Default for Workspace<T> {
    fn default() -> Self {
        Self {
            roots: RootCache::default(),
            product: Mat::zeros(0, 0),
        }
    }
}

/// Blocked Shampoo state of one (b, m) parameter: per block L, R, P_L and P_R.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Shampoo<T: Scalar> {
    config: ShampooConfig,
    rows: usize,
    cols: usize,
    step: u64,
    failed_roots: u64,
    /// Blocks in column-major grid order (row pieces vary fastest).
    blocks: Vec<Block<T>>,
    /// Root steps with a failed root (absent from states saved before it existed: zeros).
    #[serde(default)]
    linalg: LinalgHealth,
    #[serde(skip)]
    work: Workspace<T>,
}

impl<T: Scalar> Clone for Shampoo<T> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            rows: self.rows,
            cols: self.cols,
            step: self.step,
            failed_roots: self.failed_roots,
            blocks: self.blocks.clone(),
            linalg: self.linalg,
            work: Workspace::default(),
        }
    }
}

impl<T: Scalar> std::fmt::Debug for Shampoo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shampoo")
            .field("config", &self.config)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("blocks", &self.blocks.len())
            .field("step", &self.step)
            .field("failed_roots", &self.failed_roots)
            .field("linalg", &self.linalg)
            .finish_non_exhaustive()
    }
}

impl<T: Scalar> Shampoo<T> {
    /// New state for a (b, m) parameter view.
    pub fn new(config: &ShampooConfig, b: usize, m: usize) -> Result<Self> {
        config.validate()?;
        check_view(b, m)?;
        let row_pieces = pieces(b, config.block_size);
        let blocks = pieces(m, config.block_size)
            .into_iter()
            .flat_map(|(col0, cols)| {
                row_pieces
                    .iter()
                    .map(move |&(row0, rows)| Block::new(row0, rows, col0, cols))
            })
            .collect();
        Ok(Self {
            config: config.clone(),
            rows: b,
            cols: m,
            step: 0,
            failed_roots: 0,
            blocks,
            linalg: LinalgHealth::default(),
            work: Workspace::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ShampooConfig {
        &self.config
    }

    /// (b, m) this state was built for.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Number of blocks, ⌈b / block_size⌉ · ⌈m / block_size⌉.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Inverse roots (one per statistics matrix and recomputation) that could not be computed
    /// (failed or non-finite eigendecomposition, in f64 too) and kept their previous value.
    pub fn failed_roots(&self) -> u64 {
        self.failed_roots
    }

    /// Whether the last direction written was preconditioned, −P_L G P_R: true once every block
    /// holds both roots and steps() ≥ start_step. When false the direction was −G and the caller
    /// should use its own (grafting) direction instead.
    pub fn is_preconditioning(&self) -> bool {
        self.step >= self.config.start_step && self.blocks.iter().all(Block::ready)
    }

    /// Checks that a (deserialized) state is consistent with its configuration and shape.
    fn check_layout(&self) -> Result<()> {
        let mismatch = |what: &str| Err(PrecondError::StateMismatch(format!("shampoo: {what}")));
        if self.config.validate().is_err() {
            return mismatch("invalid config");
        }
        let row_pieces = pieces(self.rows, self.config.block_size);
        let col_pieces = pieces(self.cols, self.config.block_size);
        if self.blocks.len() != row_pieces.len() * col_pieces.len() {
            return mismatch("wrong number of blocks");
        }
        let expected = col_pieces
            .iter()
            .flat_map(|&c| row_pieces.iter().map(move |&r| (r, c)));
        for (block, ((row0, rows), (col0, cols))) in self.blocks.iter().zip(expected) {
            let fits = (block.row0, block.rows, block.col0, block.cols) == (row0, rows, col0, cols)
                && block.left.len() == rows * rows
                && block.left_root.len() == rows * rows
                && block.right.len() == cols * cols
                && block.right_root.len() == cols * cols;
            if !fits {
                return mismatch("block layout does not match the shape");
            }
        }
        Ok(())
    }

    /// Recomputes every block's roots, in parallel over blocks when there are several.
    fn recompute_roots(&mut self) {
        let eps = T::of(self.config.eps);
        let threads = rayon::current_num_threads().max(1);
        let n = self.blocks.len();
        let failed: u64 = if n == 1 || threads == 1 {
            let cache = &mut self.work.roots;
            self.blocks
                .iter_mut()
                .map(|block| block.recompute_roots(eps, cache, par_layer()))
                .sum()
        } else {
            // One transient cache per chunk: its cost is O(n²) against the O(n³) eigensolves.
            let chunk = n.div_ceil(threads);
            self.blocks
                .par_chunks_mut(chunk)
                .map(|blocks| {
                    let mut cache = RootCache::default();
                    blocks
                        .iter_mut()
                        .map(|block| block.recompute_roots(eps, &mut cache, Par::Seq))
                        .sum::<u64>()
                })
                .sum()
        };
        self.failed_roots += failed;
        self.linalg
            .record((failed > 0).then_some("Shampoo inverse root"));
    }
}

impl<T: Scalar> Preconditioner<T> for Shampoo<T> {
    fn is_ready(&self) -> bool {
        self.is_preconditioning()
    }

    fn linalg_health(&self) -> LinalgHealth {
        self.linalg
    }

    fn precondition(&mut self, grad: MatRef<'_, T>, mut direction: MatMut<'_, T>) -> Result<()> {
        let (b, m) = (self.rows, self.cols);
        check_shapes(
            (grad.nrows(), grad.ncols()),
            (direction.nrows(), direction.ncols()),
            b,
            m,
        )?;
        check_finite(grad, self.step + 1)?;
        self.check_layout()?;
        let t = self.step + 1;

        // 1. Statistics.
        let beta2 = self.config.beta2;
        let (decay, weight) = if beta2 < 1.0 {
            (T::of(beta2), T::of(1.0 - beta2))
        } else {
            (T::one(), T::one())
        };
        for block in &mut self.blocks {
            let g = block.of(grad);
            block.accumulate(g, decay, weight, par_layer());
        }

        // 2. Roots.
        if self.config.is_root_step(t) {
            self.recompute_roots();
        }
        self.step = t;

        // 3. Direction.
        if !self.is_preconditioning() {
            for (j, col) in direction.rb_mut().col_iter_mut().enumerate() {
                let g = grad.col(j);
                for (i, v) in col.iter_mut().enumerate() {
                    *v = -g[i];
                }
            }
            return Ok(());
        }
        let (max_rows, max_cols) = (self.config.block_size.min(b), self.config.block_size.min(m));
        let product = &mut self.work.product;
        if product.nrows() != max_rows || product.ncols() != max_cols {
            *product = Mat::zeros(max_rows, max_cols);
        }
        for block in &self.blocks {
            let (r, c) = (block.rows, block.cols);
            let left_root = MatRef::from_column_major_slice(&block.left_root, r, r);
            let right_root = MatRef::from_column_major_slice(&block.right_root, c, c);
            let mut pg = product.as_mut().submatrix_mut(0, 0, r, c);
            gemm(
                pg.rb_mut(),
                false,
                left_root,
                block.of(grad),
                T::one(),
                par_layer(),
            );
            gemm(
                direction
                    .rb_mut()
                    .submatrix_mut(block.row0, block.col0, r, c),
                false,
                pg.as_ref(),
                right_root,
                -T::one(),
                par_layer(),
            );
        }
        Ok(())
    }

    /// Σ over blocks of 2·(rows² + cols²)·`size_of::<T>()`: the statistics L, R and the roots
    /// P_L, P_R of every block (workspaces excluded).
    fn state_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| 2 * (b.rows * b.rows + b.cols * b.cols))
            .sum::<usize>()
            * std::mem::size_of::<T>()
    }

    fn steps(&self) -> u64 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    // Oracle code indexes rows, columns and steps explicitly, as the formulas do.
    #![allow(clippy::needless_range_loop)]

    use super::*;
    use crate::linalg::{inject_failures, inject_failures_after, injected_remaining, FaultKind};
    use crate::testing::{
        gradients, jacobi_eig, mul, on_one_thread, oracle_root, to_f64, transpose,
    };

    /// Single-block Shampoo in f64 with the given schedule: L, R as EMA (β2 < 1) or sums,
    /// roots recomputed on `is_root_step`. Returns the direction of every step (−G while no
    /// root exists or before start).
    fn oracle(config: &ShampooConfig, grads: &[Mat<f64>]) -> Vec<Mat<f64>> {
        let (b, m) = (grads[0].nrows(), grads[0].ncols());
        let mut l = Mat::<f64>::zeros(b, b);
        let mut r = Mat::<f64>::zeros(m, m);
        let mut roots: Option<(Mat<f64>, Mat<f64>)> = None;
        let beta2 = config.beta2;
        let (decay, weight) = if beta2 < 1.0 {
            (beta2, 1.0 - beta2)
        } else {
            (1.0, 1.0)
        };
        let mut out = Vec::new();
        for (s, g) in grads.iter().enumerate() {
            let t = s as u64 + 1;
            let ggt = mul(g, &transpose(g));
            let gtg = mul(&transpose(g), g);
            l = Mat::from_fn(b, b, |i, j| decay * l[(i, j)] + weight * ggt[(i, j)]);
            r = Mat::from_fn(m, m, |i, j| decay * r[(i, j)] + weight * gtg[(i, j)]);
            if t >= config.start_step && (t - config.start_step) % config.precondition_every == 0 {
                roots = Some((oracle_root(&l, config.eps), oracle_root(&r, config.eps)));
            }
            let u = match (&roots, t >= config.start_step) {
                (Some((pl, pr)), true) => mul(&mul(pl, g), pr),
                _ => g.clone(),
            };
            out.push(Mat::from_fn(b, m, |i, j| -u[(i, j)]));
        }
        out
    }

    /// max |a − b| / max |b|.
    fn rel_err(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
        let mut num = 0f64;
        let mut den = 0f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                num = num.max((a[(i, j)] - b[(i, j)]).abs());
                den = den.max(b[(i, j)].abs());
            }
        }
        num / den
    }

    /// Runs `state` over `grads`, returning the directions in f64.
    fn run<T: Scalar>(state: &mut Shampoo<T>, grads: &[Mat<T>]) -> Vec<Mat<f64>> {
        grads
            .iter()
            .map(|g| {
                let mut u = Mat::<T>::zeros(g.nrows(), g.ncols());
                state.precondition(g.as_ref(), u.as_mut()).unwrap();
                to_f64(u.as_ref())
            })
            .collect()
    }

    fn max_rel_err_against_oracle<T: Scalar>(config: &ShampooConfig, grads: &[Mat<T>]) -> f64 {
        let (b, m) = (grads[0].nrows(), grads[0].ncols());
        let mut state = Shampoo::<T>::new(config, b, m).unwrap();
        let got = run(&mut state, grads);
        let grads64: Vec<_> = grads.iter().map(|g| to_f64(g.as_ref())).collect();
        let want = oracle(config, &grads64);
        assert_eq!(state.failed_roots(), 0);
        got.iter()
            .zip(&want)
            .map(|(a, b)| rel_err(a, b))
            .fold(0.0, f64::max)
    }

    #[test]
    fn jacobi_oracle_reconstructs() {
        let g = &gradients::<f64>(5, 5, 1, 0.0, 9)[0];
        let s = mul(g, &transpose(g));
        let (vals, vecs) = jacobi_eig(&s);
        let d = Mat::from_fn(5, 5, |i, j| if i == j { vals[i] } else { 0.0 });
        let back = mul(&mul(&vecs, &d), &transpose(&vecs));
        assert!(rel_err(&back, &s) < 1e-13);
        let root = oracle_root(&s, 0.0);
        let fourth = mul(&mul(&root, &root), &mul(&root, &root));
        let id = mul(&fourth, &s);
        let eye = Mat::from_fn(5, 5, |i, j| if i == j { 1.0 } else { 0.0 });
        assert!(rel_err(&id, &eye) < 1e-9, "{}", rel_err(&id, &eye));
    }

    #[test]
    fn single_block_matches_f64_oracle() {
        let config = ShampooConfig {
            block_size: 16,
            ..ShampooConfig::default()
        };
        let err64 = max_rel_err_against_oracle(&config, &gradients::<f64>(6, 4, 20, 1.0, 1));
        let err32 = max_rel_err_against_oracle(&config, &gradients::<f32>(6, 4, 20, 1.0, 1));
        println!("single_block_matches_f64_oracle: f64 max rel err {err64:.3e}, f32 {err32:.3e}");
        assert!(err64 <= 1e-8, "f64 {err64}");
        assert!(err32 <= 2e-3, "f32 {err32}");
    }

    #[test]
    fn blocked_equals_shampoo_per_block() {
        let (b, m) = (10, 7);
        let config = ShampooConfig {
            block_size: 4,
            beta2: 0.95,
            start_step: 2,
            precondition_every: 2,
            ..ShampooConfig::default()
        };
        let whole = ShampooConfig {
            block_size: 1024,
            ..config.clone()
        };
        let grads = gradients::<f64>(b, m, 12, 1.0, 2);
        let mut state = Shampoo::<f64>::new(&config, b, m).unwrap();
        assert_eq!(state.num_blocks(), 6);
        let got = run(&mut state, &grads);
        let mut worst = 0f64;
        for (row0, rows) in [(0, 4), (4, 4), (8, 2)] {
            for (col0, cols) in [(0, 4), (4, 3)] {
                let sub: Vec<Mat<f64>> = grads
                    .iter()
                    .map(|g| g.as_ref().submatrix(row0, col0, rows, cols).to_owned())
                    .collect();
                let mut single = Shampoo::<f64>::new(&whole, rows, cols).unwrap();
                assert_eq!(single.num_blocks(), 1);
                let want = run(&mut single, &sub);
                for (u, w) in got.iter().zip(&want) {
                    let u = u.as_ref().submatrix(row0, col0, rows, cols).to_owned();
                    worst = worst.max(rel_err(&u, w));
                }
            }
        }
        println!("blocked_equals_shampoo_per_block: max rel err {worst:.3e}");
        assert!(worst <= 1e-12, "{worst}");
    }

    #[test]
    fn schedule_start_every_and_ema() {
        let (b, m) = (5, 3);
        let config = ShampooConfig {
            block_size: 8,
            beta2: 0.9,
            start_step: 4,
            precondition_every: 3,
            ..ShampooConfig::default()
        };
        let grads = gradients::<f64>(b, m, 10, 1.0, 3);
        let want = oracle(&config, &grads);
        // Same statistics, roots recomputed at every step from 4 on: must differ at 5, 6, 8, 9.
        let every_step = oracle(
            &ShampooConfig {
                precondition_every: 1,
                ..config.clone()
            },
            &grads,
        );
        let mut state = Shampoo::<f64>::new(&config, b, m).unwrap();
        let mut worst = 0f64;
        for (s, g) in grads.iter().enumerate() {
            let t = s + 1;
            let mut u = Mat::<f64>::zeros(b, m);
            state.precondition(g.as_ref(), u.as_mut()).unwrap();
            assert_eq!(state.is_preconditioning(), t >= 4, "step {t}");
            if t < 4 {
                for j in 0..m {
                    for i in 0..b {
                        assert_eq!(u[(i, j)], -g[(i, j)]);
                    }
                }
            }
            worst = worst.max(rel_err(&u, &want[s]));
            if [5, 6, 8, 9].contains(&t) {
                assert!(
                    rel_err(&u, &every_step[s]) > 1e-6,
                    "step {t} used fresh roots"
                );
            }
        }
        println!("schedule_start_every_and_ema: max rel err {worst:.3e}");
        assert!(worst <= 1e-8, "{worst}");
        assert_eq!(state.failed_roots(), 0);
    }

    #[test]
    fn errors_leave_state_unchanged() {
        let config = ShampooConfig {
            block_size: 3,
            ..ShampooConfig::default()
        };
        let mut state = Shampoo::<f64>::new(&config, 5, 4).unwrap();
        let grads = gradients::<f64>(5, 4, 2, 0.0, 4);
        run(&mut state, &grads[..1]);
        let before = serde_json::to_string(&state).unwrap();
        let mut u = Mat::<f64>::zeros(5, 4);

        let bad = Mat::<f64>::zeros(4, 5);
        let err = state.precondition(bad.as_ref(), u.as_mut()).unwrap_err();
        assert!(matches!(err, PrecondError::ShapeMismatch { .. }), "{err:?}");
        let mut bad_dir = Mat::<f64>::zeros(5, 3);
        let err = state
            .precondition(grads[1].as_ref(), bad_dir.as_mut())
            .unwrap_err();
        assert!(matches!(err, PrecondError::ShapeMismatch { .. }), "{err:?}");

        let mut nan = grads[1].clone();
        nan[(4, 3)] = f64::NAN;
        let err = state.precondition(nan.as_ref(), u.as_mut()).unwrap_err();
        assert_eq!(
            err,
            PrecondError::NonFiniteGradient {
                step: 2,
                param: None
            }
        );
        let mut inf = grads[1].clone();
        inf[(0, 0)] = f64::INFINITY;
        assert!(state.precondition(inf.as_ref(), u.as_mut()).is_err());

        assert_eq!(state.steps(), 1);
        assert_eq!(serde_json::to_string(&state).unwrap(), before);
    }

    #[test]
    fn config_validation() {
        let ok = ShampooConfig::default();
        assert!(ok.validate().is_ok());
        let bad = [
            ShampooConfig {
                block_size: 0,
                ..ok.clone()
            },
            ShampooConfig {
                beta2: 0.0,
                ..ok.clone()
            },
            ShampooConfig {
                beta2: 1.5,
                ..ok.clone()
            },
            ShampooConfig {
                eps: 0.0,
                ..ok.clone()
            },
            ShampooConfig {
                eps: f64::NAN,
                ..ok.clone()
            },
            ShampooConfig {
                start_step: 0,
                ..ok.clone()
            },
            ShampooConfig {
                precondition_every: 0,
                ..ok.clone()
            },
        ];
        for config in &bad {
            assert!(
                matches!(config.validate(), Err(PrecondError::InvalidConfig { .. })),
                "{config:?}"
            );
            assert!(Shampoo::<f32>::new(config, 2, 2).is_err());
        }
        assert!(matches!(
            Shampoo::<f32>::new(&ok, 0, 2),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        // Missing fields take their defaults.
        let partial: ShampooConfig = serde_json::from_str(r#"{"block_size": 128}"#).unwrap();
        assert_eq!(
            partial,
            ShampooConfig {
                block_size: 128,
                ..ok
            }
        );
    }

    #[test]
    fn state_bytes_counts_statistics_and_roots() {
        let whole = ShampooConfig {
            block_size: 1000,
            ..ShampooConfig::default()
        };
        let state = Shampoo::<f32>::new(&whole, 1000, 784).unwrap();
        assert_eq!(state.num_blocks(), 1);
        assert_eq!(state.state_bytes(), 2 * (1000 * 1000 + 784 * 784) * 4);

        let blocked = ShampooConfig {
            block_size: 250,
            ..ShampooConfig::default()
        };
        let state = Shampoo::<f32>::new(&blocked, 1000, 784).unwrap();
        assert_eq!(state.num_blocks(), 16);
        // Rows 4 × 250; columns 250, 250, 250, 34: every one of the 16 blocks holds two
        // rows × rows and two cols × cols matrices.
        let mut expected = 0;
        for rows in [250, 250, 250, 250] {
            for cols in [250, 250, 250, 34] {
                expected += 2 * (rows * rows + cols * cols) * 4;
            }
        }
        assert_eq!(expected, 14_036_992);
        assert_eq!(state.state_bytes(), expected);
    }

    /// Saves after 5 steps, restores and continues 5 more steps next to the original and a clone;
    /// returns the largest relative difference (`bitwise` demands identical bits).
    fn serde_continues<T: Scalar>(seed: u64, bitwise: bool) -> f64 {
        let config = ShampooConfig {
            block_size: 3,
            beta2: 0.99,
            start_step: 2,
            precondition_every: 2,
            ..ShampooConfig::default()
        };
        let grads = gradients::<T>(7, 5, 10, 1.0, seed);
        let mut state = Shampoo::<T>::new(&config, 7, 5).unwrap();
        run(&mut state, &grads[..5]);
        let json = serde_json::to_string(&state).unwrap();
        let mut restored: Shampoo<T> = serde_json::from_str(&json).unwrap();
        assert_eq!(restored.steps(), 5);
        assert!(restored.is_preconditioning());
        let mut cloned = state.clone();
        let a = run(&mut state, &grads[5..]);
        let b = run(&mut restored, &grads[5..]);
        let c = run(&mut cloned, &grads[5..]);
        let mut worst = 0f64;
        for ((a, b), c) in a.iter().zip(&b).zip(&c) {
            for j in 0..a.ncols() {
                for i in 0..a.nrows() {
                    assert_eq!(a[(i, j)].to_bits(), c[(i, j)].to_bits());
                    if bitwise {
                        assert_eq!(a[(i, j)].to_bits(), b[(i, j)].to_bits());
                    }
                }
            }
            worst = worst.max(rel_err(b, a));
        }
        if bitwise {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                serde_json::to_string(&restored).unwrap()
            );
        }
        worst
    }

    #[test]
    fn serde_round_trip_continues_bitwise() {
        // The workspace builds serde_json with `float_roundtrip`: f32 and f64 survive JSON
        // text exactly.
        serde_continues::<f32>(6, true);
        let err64 = serde_continues::<f64>(5, true);
        println!("serde_round_trip_continues_bitwise: f32 bitwise, f64 max rel err {err64:.3e}");
        assert!(err64 <= 1e-12, "{err64}");
    }

    #[test]
    fn corrupt_state_is_refused() {
        let state = Shampoo::<f64>::new(&ShampooConfig::default(), 3, 2).unwrap();
        let mut value: serde_json::Value = serde_json::to_value(&state).unwrap();
        value["rows"] = serde_json::json!(4);
        let mut broken: Shampoo<f64> = serde_json::from_value(value).unwrap();
        let g = Mat::<f64>::zeros(4, 2);
        let mut u = Mat::<f64>::zeros(4, 2);
        let err = broken.precondition(g.as_ref(), u.as_mut()).unwrap_err();
        assert!(matches!(err, PrecondError::StateMismatch(_)), "{err:?}");
        assert_eq!(broken.steps(), 0);
    }

    #[test]
    fn failed_roots_keep_previous_roots() {
        // f32 statistics overflow for a finite gradient of 1e20: both roots fail and the
        // direction uses the roots of step 1.
        let config = ShampooConfig {
            block_size: 8,
            ..ShampooConfig::default()
        };
        let grads = gradients::<f32>(4, 3, 1, 0.0, 7);
        let mut state = Shampoo::<f32>::new(&config, 4, 3).unwrap();
        run(&mut state, &grads);
        assert!(state.is_preconditioning());
        let roots = (
            state.blocks[0].left_root.clone(),
            state.blocks[0].right_root.clone(),
        );
        let huge = Mat::<f32>::from_fn(4, 3, |i, j| 1e20 * grads[0][(i, j)]);
        let mut u = Mat::<f32>::zeros(4, 3);
        state.precondition(huge.as_ref(), u.as_mut()).unwrap();
        assert_eq!(state.failed_roots(), 2);
        assert!(state.is_preconditioning());
        assert_eq!(state.blocks[0].left_root, roots.0);
        assert_eq!(state.blocks[0].right_root, roots.1);
        let pl = to_f64(MatRef::from_column_major_slice(&roots.0, 4, 4));
        let pr = to_f64(MatRef::from_column_major_slice(&roots.1, 3, 3));
        let want = mul(&mul(&pl, &to_f64(huge.as_ref())), &pr);
        let want = Mat::from_fn(4, 3, |i, j| -want[(i, j)]);
        let err = rel_err(&to_f64(u.as_ref()), &want);
        assert!(err < 1e-5, "{err}");

        // A first root computation that fails leaves the parameter unpreconditioned: u = −G.
        let mut fresh = Shampoo::<f32>::new(&config, 4, 3).unwrap();
        fresh.precondition(huge.as_ref(), u.as_mut()).unwrap();
        assert_eq!(fresh.failed_roots(), 2);
        assert!(!fresh.is_preconditioning());
        for j in 0..3 {
            for i in 0..4 {
                assert_eq!(u[(i, j)], -huge[(i, j)]);
            }
        }
    }

    /// L_t = Σ G Gᵀ and R_t = Σ Gᵀ G over `grads` (β2 = 1), in f64.
    fn sums(grads: &[Mat<f64>]) -> (Mat<f64>, Mat<f64>) {
        let (b, m) = (grads[0].nrows(), grads[0].ncols());
        let (mut l, mut r) = (Mat::<f64>::zeros(b, b), Mat::<f64>::zeros(m, m));
        for g in grads {
            l += mul(g, &transpose(g));
            r += mul(&transpose(g), g);
        }
        (l, r)
    }

    /// −P_L G P_R.
    fn apply_roots(pl: &Mat<f64>, g: &Mat<f64>, pr: &Mat<f64>) -> Mat<f64> {
        let u = mul(&mul(pl, g), pr);
        Mat::from_fn(u.nrows(), u.ncols(), |i, j| -u[(i, j)])
    }

    /// Single-block Shampoo in `T` whose root eigendecompositions fail in both precisions at
    /// step 3 (injected: after `skip` good ones, `n` failures, so both roots, the left or the
    /// right one): a failed root keeps its step-2 value bitwise, L and R still absorb G_3, the
    /// direction is −P_L G_3 P_R with the kept roots (against Jacobi roots of the step-2 and
    /// step-3 sums in f64), the step is counted once, and step 4 recomputes both roots and
    /// resets the run. Returns the worst relative error of the directions.
    fn kept_roots_case<T: Scalar>(skip: usize, n: usize) -> f64 {
        let config = ShampooConfig {
            block_size: 8,
            ..ShampooConfig::default()
        };
        let (b, m) = (4, 3);
        let grads = gradients::<T>(b, m, 4, 0.5, 12);
        let g64: Vec<_> = grads.iter().map(|g| to_f64(g.as_ref())).collect();
        let roots = |t: usize| {
            let (l, r) = sums(&g64[..t]);
            (oracle_root(&l, config.eps), oracle_root(&r, config.eps))
        };
        let mut state = Shampoo::<T>::new(&config, b, m).unwrap();
        run(&mut state, &grads[..2]);
        let (left2, right2) = (
            state.blocks[0].left_root.clone(),
            state.blocks[0].right_root.clone(),
        );
        inject_failures_after(skip, FaultKind::Both, n);
        let u3 = run(&mut state, &grads[2..3]).remove(0);
        assert_eq!(injected_remaining(), 0);
        let (left_failed, right_failed) = (skip == 0, skip + n == 2);
        assert_eq!(
            state.failed_roots(),
            u64::from(left_failed) + u64::from(right_failed)
        );
        let health = state.linalg_health();
        assert_eq!((health.failures, health.consecutive), (1, 1));
        assert_eq!(health.last_kernel, Some("Shampoo inverse root"));
        assert_eq!(state.blocks[0].left_root == left2, left_failed);
        assert_eq!(state.blocks[0].right_root == right2, right_failed);
        assert!(state.is_preconditioning());
        // The statistics absorbed G_3.
        let (l3, r3) = sums(&g64[..3]);
        let block = &state.blocks[0];
        let tol_stats = if std::mem::size_of::<T>() == 4 {
            1e-6
        } else {
            1e-14
        };
        assert!(
            rel_err(
                &to_f64(MatRef::from_column_major_slice(&block.left, b, b)),
                &l3
            ) <= tol_stats
        );
        assert!(
            rel_err(
                &to_f64(MatRef::from_column_major_slice(&block.right, m, m)),
                &r3
            ) <= tol_stats
        );
        let ((pl2, pr2), (pl3, pr3)) = (roots(2), roots(3));
        let pl = if left_failed { &pl2 } else { &pl3 };
        let pr = if right_failed { &pr2 } else { &pr3 };
        let mut worst = rel_err(&u3, &apply_roots(pl, &g64[2], pr));
        // Not vacuous: fresh roots give another direction.
        assert!(rel_err(&u3, &apply_roots(&pl3, &g64[2], &pr3)) > 1e-3);
        // A good root step recomputes both roots and resets the run.
        let u4 = run(&mut state, &grads[3..4]).remove(0);
        let (pl4, pr4) = roots(4);
        worst = worst.max(rel_err(&u4, &apply_roots(&pl4, &g64[3], &pr4)));
        let health = state.linalg_health();
        assert_eq!((health.failures, health.consecutive), (1, 0));
        worst
    }

    #[test]
    fn failed_roots_in_both_precisions_keep_the_previous_roots() {
        on_one_thread(|| {
            for (skip, n) in [(0, 2), (0, 1), (1, 1)] {
                let err64 = kept_roots_case::<f64>(skip, n);
                let err32 = kept_roots_case::<f32>(skip, n);
                println!("skip {skip}, fail {n}: max rel err f64 {err64:.2e}, f32 {err32:.2e}");
                assert!(err64 <= 1e-10, "f64 {err64:e}");
                assert!(err32 <= 1e-4, "f32 {err32:e}");
            }
        });
    }

    /// Both f32 root eigendecompositions of step 3 fail and are retried in f64: every direction
    /// equals an untouched twin's within f32 rounding, and nothing is counted.
    #[test]
    fn f32_root_failure_is_retried_in_f64() {
        on_one_thread(|| {
            let config = ShampooConfig {
                block_size: 8,
                ..ShampooConfig::default()
            };
            let grads = gradients::<f32>(4, 3, 5, 0.5, 13);
            let mut state = Shampoo::<f32>::new(&config, 4, 3).unwrap();
            let mut twin = state.clone();
            for (s, g) in grads.iter().enumerate() {
                inject_failures(FaultKind::F32Only, if s == 2 { 2 } else { 0 });
                let u = run(&mut state, std::slice::from_ref(g)).remove(0);
                assert_eq!(injected_remaining(), 0);
                let w = run(&mut twin, std::slice::from_ref(g)).remove(0);
                let err = rel_err(&u, &w);
                assert!(err <= 1e-5, "step {}: {err:e}", s + 1);
            }
            assert_eq!(state.failed_roots(), 0);
            assert_eq!(state.linalg_health(), LinalgHealth::default());
        });
    }

    /// The failure counts survive a JSON round trip; a state saved before they existed (no
    /// `linalg` key) loads with zeros and continues like the original.
    #[test]
    fn linalg_counts_survive_serde_and_old_states_load() {
        on_one_thread(|| {
            let config = ShampooConfig {
                block_size: 3,
                ..ShampooConfig::default()
            };
            let grads = gradients::<f32>(5, 4, 4, 0.5, 14);
            let mut state = Shampoo::<f32>::new(&config, 5, 4).unwrap();
            run(&mut state, &grads[..1]);
            inject_failures(FaultKind::Both, 1);
            run(&mut state, &grads[1..2]);
            let mut back: Shampoo<f32> =
                serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
            assert_eq!(back.failed_roots(), 1);
            let health = back.linalg_health();
            assert_eq!((health.failures, health.consecutive), (1, 1));
            let mut value = serde_json::to_value(&state).unwrap();
            assert!(value.as_object_mut().unwrap().remove("linalg").is_some());
            let mut old: Shampoo<f32> = serde_json::from_value(value).unwrap();
            assert_eq!(old.linalg_health(), LinalgHealth::default());
            let a = run(&mut state, &grads[2..]);
            let b = run(&mut back, &grads[2..]);
            let c = run(&mut old, &grads[2..]);
            for ((a, b), c) in a.iter().zip(&b).zip(&c) {
                assert_eq!(a, b);
                assert_eq!(a, c);
            }
            assert_eq!(back.linalg_health().consecutive, 0);
        });
    }
}
