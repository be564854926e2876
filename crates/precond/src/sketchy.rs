//! Sketchy (Feinberg, Chen, Sun, Anil and Hazan, NeurIPS 2023, "Sketchy: Memory-efficient
//! Adaptive Regularization with Frequent Directions"): blocked Shampoo (see [`crate::shampoo`])
//! whose left and right statistics are rank-ℓ frequent-directions (FD) sketches (Liberty 2013;
//! Ghashami, Liberty, Phillips and Woodruff 2016) instead of full matrices.
//!
//! **Blocking** is Shampoo's: rows and columns are cut into consecutive pieces of at most
//! `block_size`, giving a grid of blocks G_{pq} (rows × cols), each preconditioned on its own.
//!
//! **Sketch.** Each block keeps two sketches, the left one of Σ G Gᵀ (dimension d = rows, new
//! columns X = G) and the right one of Σ Gᵀ G (d = cols, X = Gᵀ). A sketch is held in eigen-form:
//! an orthonormal U (d × ℓ, ℓ = min(rank, d)), eigenvalues λ ≥ 0 (ℓ, descending) and the escaped
//! mass ρ ≥ 0, and stands for S = U diag(λ) Uᵀ. One update with X (d × c):
//!
//! 1. Z = [√β2 · U diag(λ)^{1/2}, √(1 − β2) · X] (d × (ℓ + c)); with β2 = 1 both weights are 1
//!    (plain sums, as Shampoo), so Z Zᵀ = β2 S + (1 − β2) X Xᵀ.
//! 2. Z Zᵀ = Σ_i σ_i² u_i u_iᵀ (σ descending) from a small symmetric eigendecomposition: of
//!    Z Zᵀ itself (d × d) when ℓ + c ≥ d, otherwise of R Rᵀ ((ℓ + c) × (ℓ + c)) with the thin
//!    QR factorization Z = Q R, u_i = Q v_i. Both give an orthonormal U without dividing by σ.
//! 3. Shrink (FD): with δ = σ²_{ℓ+1} (0 when Z Zᵀ has no (ℓ+1)-th eigenvalue, i.e. ℓ = d),
//!    U ← [u_1 … u_ℓ], λ_i ← σ_i² − δ and ρ ← β2 ρ + δ.
//!
//! With β2 = 1 this keeps 0 ⪯ Σ X Xᵀ − S ⪯ ρ I after every step (each step's residual
//! Z Zᵀ − S_new is PSD with norm δ), and ρ ≤ ‖A − A_k‖²_F / (ℓ + 1 − k) for every k ≤ ℓ, where
//! A Aᵀ = Σ X Xᵀ. When rank ≥ d nothing escapes (ρ = 0 exactly) and S is Shampoo's statistic.
//!
//! **Step** t (1-based): both sketches of every block are updated (every step); at the steps
//! t ≥ start_step with (t − start_step) mod precondition_every = 0 the *frozen copy* (U, λ, ρ)
//! used for the direction is refreshed from the sketch just updated (Shampoo's "roots"). The
//! preconditioner of a side is P = (S + (ρ + ε) I)^{−1/4} of its frozen copy, applied without
//! forming a d × d matrix:
//! P x = U diag((λ + ρ + ε)^{−1/4} − (ρ + ε)^{−1/4}) Uᵀ x + (ρ + ε)^{−1/4} x,
//! and the direction is u = −P_L G P_R per block. Before every side of every block holds a
//! frozen copy (and before start_step) the direction is −G and `is_ready()` is false, so that
//! the caller (grafting) uses its own direction.
//!
//! Decisions where the paper is silent (ours), chosen to match [`crate::shampoo`]:
//! eigenvalues that come out slightly negative by rounding are clamped at 0 (λ and δ); the
//! root coefficients are computed in f64 and rounded to `T`; the two sketches of a block are
//! updated and refreshed independently. When an update's eigendecomposition fails or produces
//! anything non-finite (e.g. f32 overflow), that sketch keeps its previous value (this step's
//! gradient is dropped from it), its frozen copy is not refreshed at this step, and
//! [`Sketchy::failed_roots`] is incremented; a side whose frozen copy was never refreshed leaves
//! the whole parameter unpreconditioned (u = −G).
//!
//! **Linear-algebra failures** (the policy of [`crate::optimizer`]). The thin QR and the
//! eigendecomposition of an f32 sketch update that fail are retried in f64 inside
//! [`crate::linalg`] (input converted to f64, result rounded back), so a retry that succeeds is
//! not counted. An update that still fails (no convergence in f64 too, or anything non-finite,
//! e.g. an overflow) keeps the previous sketch and frozen copy of that side, as described above:
//! the sketch *is* that side's statistic, so this step's gradient is dropped from it, and the
//! direction is computed with the kept frozen copy. [`Sketchy::failed_roots`] counts every such
//! update; [`Preconditioner::linalg_health`] counts the steps with at least one failed update
//! (`failures`) and how many came in a row (`consecutive`; every step updates the sketches, so a
//! step whose updates all succeed resets it). Erroring after too many failures in a row is
//! [`crate::optimizer::ParamOptimizer`]'s job ([`crate::OptimizerConfig::max_linalg_failures`]).
//!
//! Apart from shape, non-finite-gradient and state-mismatch errors (returned before any state
//! changes) a step cannot fail: update failures are counted, not returned.

use crate::error::{invalid, PrecondError, Result};
use crate::linalg::{gemm, par_layer, thin_q, SymEig};
use crate::preconditioner::{check_finite, check_shapes, check_view, LinalgHealth, Preconditioner};
use crate::scalar::Scalar;
use crate::shampoo::pieces;
use faer::reborrow::ReborrowMut;
use faer::{Mat, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Hyperparameters of blocked Sketchy. Defaults: rank 256, block 1024, β2 = 1 (plain sums),
/// ε = 1e-6, frozen copies refreshed from the first step and at every step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SketchyConfig {
    /// Rank ℓ of every FD sketch (capped at the side's dimension). Must be at least 1.
    pub rank: usize,
    /// Largest side of a block; rows and columns are cut into pieces of at most this size.
    pub block_size: usize,
    /// Statistics decay β2 in (0, 1]: 1 is the plain sum.
    pub beta2: f64,
    /// ε added to the escaped mass ρ before the inverse 4th root. Must be finite and > 0.
    pub eps: f64,
    /// First step (1-based) at which the frozen copies are refreshed and the direction is
    /// preconditioned.
    pub start_step: u64,
    /// Frozen copies are refreshed at the steps t ≥ start_step with
    /// (t − start_step) mod precondition_every = 0.
    pub precondition_every: u64,
}

impl Default for SketchyConfig {
    fn default() -> Self {
        Self {
            rank: 256,
            block_size: 1024,
            beta2: 1.0,
            eps: 1e-6,
            start_step: 1,
            precondition_every: 1,
        }
    }
}

impl SketchyConfig {
    /// Checks every field; returns a clear error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(invalid("rank", self.rank, "must be at least 1"));
        }
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

    /// Whether the frozen copies are refreshed at step `t` (1-based).
    fn is_root_step(&self, t: u64) -> bool {
        t >= self.start_step && (t - self.start_step) % self.precondition_every == 0
    }
}

/// max(v, 0).
#[inline]
fn nonneg<T: Scalar>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

/// An FD sketch in eigen-form: S = U diag(λ) Uᵀ plus the escaped mass ρ.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
struct Sketch<T: Scalar> {
    /// U (d × ℓ, column-major, orthonormal columns).
    basis: Vec<T>,
    /// λ (ℓ, descending, ≥ 0).
    values: Vec<T>,
    /// ρ, the (decayed) sum of the shrinkage amounts δ.
    escaped: T,
}

impl<T: Scalar> Sketch<T> {
    fn zeros(dim: usize, rank: usize) -> Self {
        Self {
            basis: vec![T::zero(); dim * rank],
            values: vec![T::zero(); rank],
            escaped: T::zero(),
        }
    }

    fn fits(&self, dim: usize, rank: usize) -> bool {
        self.basis.len() == dim * rank && self.values.len() == rank
    }
}

/// One side (left or right) of a block: the running sketch and the frozen copy used for the
/// direction.
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "")]
struct Side<T: Scalar> {
    /// d.
    dim: usize,
    /// ℓ = min(rank, d).
    rank: usize,
    sketch: Sketch<T>,
    frozen: Sketch<T>,
    /// Whether `frozen` has ever been refreshed.
    ready: bool,
}

impl<T: Scalar> Side<T> {
    fn new(dim: usize, rank: usize) -> Self {
        let rank = rank.min(dim);
        Self {
            dim,
            rank,
            sketch: Sketch::zeros(dim, rank),
            frozen: Sketch::zeros(dim, rank),
            ready: false,
        }
    }

    /// Scalars held: sketch and frozen copy, each d·ℓ + ℓ + 1.
    fn scalars(&self) -> usize {
        2 * (self.dim * self.rank + self.rank + 1)
    }

    fn fits(&self, dim: usize, rank: usize) -> bool {
        self.dim == dim
            && self.rank == rank.min(dim)
            && self.sketch.fits(self.dim, self.rank)
            && self.frozen.fits(self.dim, self.rank)
    }

    /// FD update with the new columns `x` (d × c): S ← shrink(decay·S + weight·X Xᵀ).
    /// Returns false, leaving the sketch untouched, when the eigendecomposition fails or
    /// anything non-finite appears.
    fn update(
        &mut self,
        x: MatRef<'_, T>,
        decay: T,
        weight: T,
        cache: &mut EigCache<T>,
        par: Par,
    ) -> bool {
        let (d, l, c) = (self.dim, self.rank, x.ncols());
        let k = l + c;
        let one = T::one();
        // Z = [√decay · U diag(λ)^{1/2}, √weight · X].
        let mut z = Mat::<T>::zeros(d, k);
        for j in 0..l {
            let s = (decay * self.sketch.values[j]).sqrt();
            let u = &self.sketch.basis[j * d..(j + 1) * d];
            for (i, &v) in u.iter().enumerate() {
                z[(i, j)] = v * s;
            }
        }
        let sw = weight.sqrt();
        for j in 0..c {
            for i in 0..d {
                z[(i, l + j)] = x[(i, j)] * sw;
            }
        }
        // The small symmetric matrix whose eigenvalues are the nonzero σ² of Z.
        let (q, m) = if k >= d {
            let mut m = Mat::<T>::zeros(d, d);
            gemm(m.as_mut(), false, z.as_ref(), z.transpose(), one, par);
            (None, m)
        } else {
            let Ok(q) = thin_q(z.as_ref()) else {
                return false;
            };
            let mut r = Mat::<T>::zeros(k, k);
            gemm(r.as_mut(), false, q.transpose(), z.as_ref(), one, par);
            let mut m = Mat::<T>::zeros(k, k);
            gemm(m.as_mut(), false, r.as_ref(), r.transpose(), one, par);
            (Some(q), m)
        };
        if !m.col_iter().all(|col| col.iter().all(|v| v.is_finite())) {
            return false;
        }
        let n = m.nrows();
        let eig = cache.get(n);
        if !eig.compute(m.as_ref()) {
            return false;
        }
        // Eigenvalues are ascending: σ²_1 is value(n − 1), σ²_{ℓ+1} is value(n − ℓ − 1).
        let shrink = if n > l {
            nonneg(eig.value(n - l - 1))
        } else {
            T::zero()
        };
        let escaped = decay * self.sketch.escaped + shrink;
        let values: Vec<T> = (0..l)
            .map(|j| nonneg(eig.value(n - 1 - j) - shrink))
            .collect();
        let mut basis = vec![T::zero(); d * l];
        match q {
            None => {
                for j in 0..l {
                    let v = eig.vectors.col(n - 1 - j);
                    for i in 0..d {
                        basis[j * d + i] = v[i];
                    }
                }
            }
            Some(q) => {
                let top = Mat::<T>::from_fn(k, l, |i, j| eig.vectors[(i, n - 1 - j)]);
                gemm(
                    MatMut::from_column_major_slice_mut(&mut basis, d, l),
                    false,
                    q.as_ref(),
                    top.as_ref(),
                    one,
                    par,
                );
            }
        }
        let finite = escaped.is_finite()
            && values.iter().all(|v| v.is_finite())
            && basis.iter().all(|v| v.is_finite());
        if !finite {
            return false;
        }
        self.sketch = Sketch {
            basis,
            values,
            escaped,
        };
        true
    }

    /// Copies the sketch into the frozen copy.
    fn refresh(&mut self) {
        self.frozen.clone_from(&self.sketch);
        self.ready = true;
    }

    /// (s, a) of the frozen copy: P = U diag(a) Uᵀ + s I with s = (ρ + ε)^{−1/4} and
    /// a_j = (λ_j + ρ + ε)^{−1/4} − s, computed in f64.
    fn coefficients(&self, eps: f64, a: &mut Vec<T>) -> T {
        let base = self.frozen.escaped.f64() + eps;
        let s = base.powf(-0.25);
        a.clear();
        a.extend(
            self.frozen
                .values
                .iter()
                .map(|&l| T::of((l.f64() + base).powf(-0.25) - s)),
        );
        T::of(s)
    }

    /// U of the frozen copy.
    fn basis(&self) -> MatRef<'_, T> {
        MatRef::from_column_major_slice(&self.frozen.basis, self.dim, self.rank)
    }
}

/// One [`SymEig`] workspace per distinct dimension, built on first use.
struct EigCache<T: Scalar>(Vec<SymEig<T>>);

impl<T: Scalar> Default for EigCache<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Scalar> EigCache<T> {
    fn get(&mut self, n: usize) -> &mut SymEig<T> {
        let pos = match self.0.iter().position(|w| w.dim() == n) {
            Some(pos) => pos,
            None => {
                self.0.push(SymEig::new(n));
                self.0.len() - 1
            }
        };
        &mut self.0[pos]
    }
}

/// One block G_{pq} = G[row0 .. row0 + rows, col0 .. col0 + cols] with its two sketches.
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "")]
struct Block<T: Scalar> {
    row0: usize,
    rows: usize,
    col0: usize,
    cols: usize,
    /// Sketch of Σ G Gᵀ (dimension rows).
    left: Side<T>,
    /// Sketch of Σ Gᵀ G (dimension cols).
    right: Side<T>,
}

impl<T: Scalar> Block<T> {
    fn new(row0: usize, rows: usize, col0: usize, cols: usize, rank: usize) -> Self {
        Self {
            row0,
            rows,
            col0,
            cols,
            left: Side::new(rows, rank),
            right: Side::new(cols, rank),
        }
    }

    fn ready(&self) -> bool {
        self.left.ready && self.right.ready
    }

    /// This block's piece of a (b, m) matrix.
    fn of<'a>(&self, g: MatRef<'a, T>) -> MatRef<'a, T> {
        g.submatrix(self.row0, self.col0, self.rows, self.cols)
    }

    /// Updates both sketches and, with `refresh`, the frozen copy of every side whose update
    /// succeeded; returns how many of the two updates failed.
    fn update(
        &mut self,
        grad: MatRef<'_, T>,
        decay: T,
        weight: T,
        refresh: bool,
        cache: &mut EigCache<T>,
        par: Par,
    ) -> u64 {
        let g = self.of(grad);
        let mut failed = 0;
        for (side, x) in [(&mut self.left, g), (&mut self.right, g.transpose())] {
            if side.update(x, decay, weight, cache, par) {
                if refresh {
                    side.refresh();
                }
            } else {
                failed += 1;
            }
        }
        failed
    }
}

/// Scratch that is not part of the saved state.
struct Workspace<T: Scalar> {
    /// Eigendecomposition workspaces of the sequential update path, one per dimension.
    eigs: EigCache<T>,
    /// U_Lᵀ G, then scaled (ℓ_L × cols).
    left_proj: Mat<T>,
    /// H = P_L G (rows × cols).
    product: Mat<T>,
    /// H U_R, then scaled (rows × ℓ_R).
    right_proj: Mat<T>,
    /// Root coefficients a of one side.
    coeffs: Vec<T>,
}

impl<T: Scalar> Default for Workspace<T> {
    fn default() -> Self {
        Self {
            eigs: EigCache::default(),
            left_proj: Mat::zeros(0, 0),
            product: Mat::zeros(0, 0),
            right_proj: Mat::zeros(0, 0),
            coeffs: Vec::new(),
        }
    }
}

/// Resizes `m` to (r, c) when its shape differs.
fn ensure<T: Scalar>(m: &mut Mat<T>, r: usize, c: usize) {
    if m.nrows() != r || m.ncols() != c {
        *m = Mat::zeros(r, c);
    }
}

/// Blocked Sketchy state of one (b, m) parameter: per block a left and a right FD sketch, each
/// with its frozen copy.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Sketchy<T: Scalar> {
    config: SketchyConfig,
    rows: usize,
    cols: usize,
    step: u64,
    failed_roots: u64,
    /// Blocks in column-major grid order (row pieces vary fastest).
    blocks: Vec<Block<T>>,
    /// Steps with a failed sketch update (absent from states saved before it existed: zeros).
    #[serde(default)]
    linalg: LinalgHealth,
    #[serde(skip)]
    work: Workspace<T>,
}

impl<T: Scalar> Clone for Sketchy<T> {
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

impl<T: Scalar> std::fmt::Debug for Sketchy<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketchy")
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

impl<T: Scalar> Sketchy<T> {
    /// New state for a (b, m) parameter view.
    pub fn new(config: &SketchyConfig, b: usize, m: usize) -> Result<Self> {
        config.validate()?;
        check_view(b, m)?;
        let row_pieces = pieces(b, config.block_size);
        let rank = config.rank;
        let blocks = pieces(m, config.block_size)
            .into_iter()
            .flat_map(|(col0, cols)| {
                row_pieces
                    .iter()
                    .map(move |&(row0, rows)| Block::new(row0, rows, col0, cols, rank))
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
    pub fn config(&self) -> &SketchyConfig {
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

    /// Sketch updates (one per side, block and step) whose QR or eigendecomposition failed (in
    /// f64 too) or was non-finite; each kept its previous sketch and frozen copy.
    pub fn failed_roots(&self) -> u64 {
        self.failed_roots
    }

    /// Whether the last direction written was preconditioned, −P_L G P_R: true once every side
    /// of every block holds a frozen copy and steps() ≥ start_step. When false the direction
    /// was −G and the caller should use its own (grafting) direction instead.
    pub fn is_preconditioning(&self) -> bool {
        self.step >= self.config.start_step && self.blocks.iter().all(Block::ready)
    }

    /// Checks that a (deserialized) state is consistent with its configuration and shape.
    fn check_layout(&self) -> Result<()> {
        let mismatch = |what: &str| Err(PrecondError::StateMismatch(format!("sketchy: {what}")));
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
        let rank = self.config.rank;
        for (block, ((row0, rows), (col0, cols))) in self.blocks.iter().zip(expected) {
            let fits = (block.row0, block.rows, block.col0, block.cols) == (row0, rows, col0, cols)
                && block.left.fits(rows, rank)
                && block.right.fits(cols, rank);
            if !fits {
                return mismatch("block layout does not match the shape");
            }
        }
        Ok(())
    }

    /// Updates every block's sketches (refreshing the frozen copies with `refresh`), in
    /// parallel over blocks when there are several.
    fn update_sketches(&mut self, grad: MatRef<'_, T>, decay: T, weight: T, refresh: bool) {
        let threads = rayon::current_num_threads().max(1);
        let n = self.blocks.len();
        let failed: u64 = if n == 1 || threads == 1 {
            let cache = &mut self.work.eigs;
            self.blocks
                .iter_mut()
                .map(|block| block.update(grad, decay, weight, refresh, cache, par_layer()))
                .sum()
        } else {
            let chunk = n.div_ceil(threads);
            self.blocks
                .par_chunks_mut(chunk)
                .map(|blocks| {
                    let mut cache = EigCache::default();
                    blocks
                        .iter_mut()
                        .map(|block| {
                            block.update(grad, decay, weight, refresh, &mut cache, Par::Seq)
                        })
                        .sum::<u64>()
                })
                .sum()
        };
        self.failed_roots += failed;
        self.linalg
            .record((failed > 0).then_some("Sketchy sketch update"));
    }
}

impl<T: Scalar> Preconditioner<T> for Sketchy<T> {
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

        // 1. Sketches, and 2. frozen copies at the refresh steps.
        let beta2 = self.config.beta2;
        let (decay, weight) = if beta2 < 1.0 {
            (T::of(beta2), T::of(1.0 - beta2))
        } else {
            (T::one(), T::one())
        };
        let refresh = self.config.is_root_step(t);
        self.update_sketches(grad, decay, weight, refresh);
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
        let eps = self.config.eps;
        let work = &mut self.work;
        for block in &self.blocks {
            let (r, c) = (block.rows, block.cols);
            let (ll, lr) = (block.left.rank, block.right.rank);
            let g = block.of(grad);

            // H = P_L G = U_L diag(a_L) U_Lᵀ G + s_L G.
            let s_left = block.left.coefficients(eps, &mut work.coeffs);
            ensure(&mut work.left_proj, ll, c);
            gemm(
                work.left_proj.as_mut(),
                false,
                block.left.basis().transpose(),
                g,
                T::one(),
                par_layer(),
            );
            for j in 0..c {
                for (i, &a) in work.coeffs.iter().enumerate() {
                    work.left_proj[(i, j)] *= a;
                }
            }
            ensure(&mut work.product, r, c);
            for j in 0..c {
                for i in 0..r {
                    work.product[(i, j)] = s_left * g[(i, j)];
                }
            }
            gemm(
                work.product.as_mut(),
                true,
                block.left.basis(),
                work.left_proj.as_ref(),
                T::one(),
                par_layer(),
            );

            // u = −H P_R = −(H U_R diag(a_R) U_Rᵀ + s_R H).
            let s_right = block.right.coefficients(eps, &mut work.coeffs);
            ensure(&mut work.right_proj, r, lr);
            gemm(
                work.right_proj.as_mut(),
                false,
                work.product.as_ref(),
                block.right.basis(),
                T::one(),
                par_layer(),
            );
            for (j, &a) in work.coeffs.iter().enumerate() {
                for i in 0..r {
                    work.right_proj[(i, j)] *= a;
                }
            }
            let mut out = direction
                .rb_mut()
                .submatrix_mut(block.row0, block.col0, r, c);
            for j in 0..c {
                for i in 0..r {
                    out[(i, j)] = -(s_right * work.product[(i, j)]);
                }
            }
            gemm(
                out,
                true,
                work.right_proj.as_ref(),
                block.right.basis().transpose(),
                -T::one(),
                par_layer(),
            );
        }
        Ok(())
    }

    /// Σ over blocks and sides (left: d = rows, right: d = cols; ℓ = min(rank, d)) of
    /// 2·(d·ℓ + ℓ + 1)·`size_of::<T>()`: the sketch (U, λ, ρ) and its frozen copy (workspaces
    /// excluded).
    fn state_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.left.scalars() + b.right.scalars())
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
    use crate::shampoo::{Shampoo, ShampooConfig};
    use crate::testing::{
        gradients, jacobi_eig, mul, on_one_thread, oracle_root, to_f64, transpose,
    };

    /// An explicit d × d FD sketch S and escaped mass ρ (f64).
    #[derive(Clone)]
    struct OracleSketch {
        s: Mat<f64>,
        rho: f64,
    }

    impl OracleSketch {
        fn new(d: usize) -> Self {
            Self {
                s: Mat::zeros(d, d),
                rho: 0.0,
            }
        }

        /// FD step on the explicit matrix A = decay·S + weight·X Xᵀ: keep the top ℓ
        /// eigenpairs, shrink them by the (ℓ+1)-th eigenvalue δ, ρ ← decay·ρ + δ.
        fn update(&mut self, x: &Mat<f64>, rank: usize, decay: f64, weight: f64) {
            let d = self.s.nrows();
            let l = rank.min(d);
            let xxt = mul(x, &transpose(x));
            let a = Mat::from_fn(d, d, |i, j| decay * self.s[(i, j)] + weight * xxt[(i, j)]);
            let (vals, vecs) = jacobi_eig(&a);
            let delta = if d > l { vals[l].max(0.0) } else { 0.0 };
            self.s = Mat::from_fn(d, d, |i, j| {
                (0..l)
                    .map(|p| (vals[p] - delta).max(0.0) * vecs[(i, p)] * vecs[(j, p)])
                    .sum()
            });
            self.rho = decay * self.rho + delta;
        }

        fn root(&self, eps: f64) -> Mat<f64> {
            oracle_root(&self.s, self.rho + eps)
        }
    }

    /// Single-block Sketchy in f64 on explicit matrices, with the given schedule. Returns the
    /// direction of every step (−G before the first refresh).
    fn oracle(config: &SketchyConfig, grads: &[Mat<f64>]) -> Vec<Mat<f64>> {
        let (b, m) = (grads[0].nrows(), grads[0].ncols());
        let mut left = OracleSketch::new(b);
        let mut right = OracleSketch::new(m);
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
            left.update(g, config.rank, decay, weight);
            right.update(&transpose(g), config.rank, decay, weight);
            if t >= config.start_step && (t - config.start_step) % config.precondition_every == 0 {
                roots = Some((left.root(config.eps), right.root(config.eps)));
            }
            let u = match &roots {
                Some((pl, pr)) => mul(&mul(pl, g), pr),
                None => g.clone(),
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

    /// Runs any preconditioner over `grads`, returning the directions in f64.
    fn run<T: Scalar, P: Preconditioner<T>>(state: &mut P, grads: &[Mat<T>]) -> Vec<Mat<f64>> {
        grads
            .iter()
            .map(|g| {
                let mut u = Mat::<T>::zeros(g.nrows(), g.ncols());
                state.precondition(g.as_ref(), u.as_mut()).unwrap();
                to_f64(u.as_ref())
            })
            .collect()
    }

    fn max_rel_err(got: &[Mat<f64>], want: &[Mat<f64>]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(a, b)| rel_err(a, b))
            .fold(0.0, f64::max)
    }

    /// The sketch S = U diag(λ) Uᵀ of a side, in f64.
    fn sketch_matrix<T: Scalar>(side: &Side<T>) -> Mat<f64> {
        let d = side.dim;
        let u = to_f64(MatRef::from_column_major_slice(
            &side.sketch.basis,
            d,
            side.rank,
        ));
        Mat::from_fn(d, d, |i, j| {
            (0..side.rank)
                .map(|p| side.sketch.values[p].f64() * u[(i, p)] * u[(j, p)])
                .sum()
        })
    }

    #[test]
    fn jacobi_and_fd_oracles_are_consistent() {
        let g = &gradients::<f64>(6, 6, 1, 0.0, 9)[0];
        let s = mul(g, &transpose(g));
        let (vals, vecs) = jacobi_eig(&s);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        let d = Mat::from_fn(6, 6, |i, j| if i == j { vals[i] } else { 0.0 });
        let back = mul(&mul(&vecs, &d), &transpose(&vecs));
        assert!(rel_err(&back, &s) < 1e-13);
        // Full-rank FD is the plain sum.
        let mut full = OracleSketch::new(6);
        full.update(g, 6, 1.0, 1.0);
        assert!(rel_err(&full.s, &s) < 1e-13);
        assert_eq!(full.rho, 0.0);
        // Rank 2: the top two eigenpairs shrunk by the third eigenvalue.
        let mut low = OracleSketch::new(6);
        low.update(g, 2, 1.0, 1.0);
        assert_eq!(low.rho, vals[2]);
        let (lv, _) = jacobi_eig(&low.s);
        assert!((lv[0] - (vals[0] - vals[2])).abs() < 1e-12 * vals[0]);
        assert!((lv[1] - (vals[1] - vals[2])).abs() < 1e-12 * vals[0]);
        assert!(lv[2].abs() < 1e-12 * vals[0]);
    }

    /// Sketchy with rank ≥ every block dimension against Shampoo (same ε, block size) and
    /// against the f64 FD oracle; returns (vs Shampoo<f64>, vs Shampoo<T>).
    fn full_rank_vs_shampoo<T: Scalar>(block_size: usize) -> (f64, f64) {
        let (b, m) = (6, 5);
        let config = SketchyConfig {
            rank: 6,
            block_size,
            ..SketchyConfig::default()
        };
        let shampoo_config = ShampooConfig {
            block_size,
            eps: config.eps,
            ..ShampooConfig::default()
        };
        let grads = gradients::<T>(b, m, 20, 1.0, 1);
        let grads64: Vec<_> = grads.iter().map(|g| to_f64(g.as_ref())).collect();
        let mut sketchy = Sketchy::<T>::new(&config, b, m).unwrap();
        let got = run(&mut sketchy, &grads);
        assert!(sketchy.is_ready());
        assert_eq!(sketchy.failed_roots(), 0);
        for block in &sketchy.blocks {
            // Nothing escapes when ℓ = d.
            assert_eq!(block.left.sketch.escaped, T::zero());
            assert_eq!(block.right.sketch.escaped, T::zero());
        }
        let mut shampoo64 = Shampoo::<f64>::new(&shampoo_config, b, m).unwrap();
        let want64 = run(&mut shampoo64, &grads64);
        let mut shampoo = Shampoo::<T>::new(&shampoo_config, b, m).unwrap();
        let want = run(&mut shampoo, &grads);
        (max_rel_err(&got, &want64), max_rel_err(&got, &want))
    }

    #[test]
    fn full_rank_equals_shampoo() {
        let mut report = Vec::new();
        for block_size in [1024, 4] {
            let (err64, _) = full_rank_vs_shampoo::<f64>(block_size);
            let (err32, err32_own) = full_rank_vs_shampoo::<f32>(block_size);
            report.push(format!(
                "block {block_size}: f64 {err64:.3e}, f32 vs Shampoo<f64> {err32:.3e}, \
                 f32 vs Shampoo<f32> {err32_own:.3e}"
            ));
            assert!(err64 <= 1e-8, "block {block_size}: f64 {err64}");
            assert!(err32 <= 2e-3, "block {block_size}: f32 {err32}");
            assert!(err32_own <= 2e-3, "block {block_size}: f32 {err32_own}");
        }
        println!(
            "full_rank_equals_shampoo: max rel err {}",
            report.join("; ")
        );
    }

    fn max_rel_err_against_oracle<T: Scalar>(config: &SketchyConfig, grads: &[Mat<T>]) -> f64 {
        let (b, m) = (grads[0].nrows(), grads[0].ncols());
        let mut state = Sketchy::<T>::new(config, b, m).unwrap();
        let got = run(&mut state, grads);
        assert_eq!(state.failed_roots(), 0);
        let grads64: Vec<_> = grads.iter().map(|g| to_f64(g.as_ref())).collect();
        max_rel_err(&got, &oracle(config, &grads64))
    }

    #[test]
    fn low_rank_matches_f64_oracle() {
        // Left: d = 9, ℓ = 3, c = 4 (QR path, 7 < 9); right: d = 4, ℓ = 3, c = 9 (direct path).
        let config = SketchyConfig {
            rank: 3,
            block_size: 16,
            ..SketchyConfig::default()
        };
        let err64 = max_rel_err_against_oracle(&config, &gradients::<f64>(9, 4, 20, 1.0, 11));
        let err32 = max_rel_err_against_oracle(&config, &gradients::<f32>(9, 4, 20, 1.0, 11));
        println!("low_rank_matches_f64_oracle: f64 max rel err {err64:.3e}, f32 {err32:.3e}");
        assert!(err64 <= 1e-8, "f64 {err64}");
        assert!(err32 <= 2e-3, "f32 {err32}");
    }

    #[test]
    fn schedule_start_every_and_ema() {
        let (b, m) = (7, 3);
        let config = SketchyConfig {
            rank: 2,
            block_size: 8,
            beta2: 0.9,
            start_step: 4,
            precondition_every: 3,
            ..SketchyConfig::default()
        };
        let grads = gradients::<f64>(b, m, 10, 1.0, 3);
        let want = oracle(&config, &grads);
        // Same sketches, frozen copies refreshed at every step from 4 on: must differ at
        // 5, 6, 8, 9.
        let every_step = oracle(
            &SketchyConfig {
                precondition_every: 1,
                ..config.clone()
            },
            &grads,
        );
        let mut state = Sketchy::<f64>::new(&config, b, m).unwrap();
        let mut worst = 0f64;
        for (s, g) in grads.iter().enumerate() {
            let t = s + 1;
            let mut u = Mat::<f64>::zeros(b, m);
            state.precondition(g.as_ref(), u.as_mut()).unwrap();
            assert_eq!(state.is_ready(), t >= 4, "step {t}");
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
                    "step {t} used a fresh frozen copy"
                );
            }
        }
        println!("schedule_start_every_and_ema: max rel err {worst:.3e}");
        assert!(worst <= 1e-8, "{worst}");
        assert_eq!(state.failed_roots(), 0);
    }

    /// Runs rank-3 Sketchy on (12, 4) gradients (left: d = 12, ℓ = 3, c = 4, QR path; right:
    /// d = 4, ℓ = 3, c = 12, direct path) and checks the FD guarantee of both sides against the
    /// explicit (decayed) sum A Aᵀ = Σ_t β2^{T−t} w X_t X_tᵀ. Returns the worst violation / trace.
    fn fd_guarantee(beta2: f64) -> f64 {
        let (b, m, steps) = (12, 4, 30);
        let config = SketchyConfig {
            rank: 3,
            block_size: 64,
            beta2,
            ..SketchyConfig::default()
        };
        let (decay, weight) = if beta2 < 1.0 {
            (beta2, 1.0 - beta2)
        } else {
            (1.0, 1.0)
        };
        let grads = gradients::<f64>(b, m, steps, 1.0, 21);
        let mut state = Sketchy::<f64>::new(&config, b, m).unwrap();
        run(&mut state, &grads);
        assert_eq!(state.failed_roots(), 0);
        let block = &state.blocks[0];
        let mut worst = 0f64;
        for (side, transposed) in [(&block.left, false), (&block.right, true)] {
            let d = side.dim;
            let l = side.rank;
            let mut sum = Mat::<f64>::zeros(d, d);
            for g in &grads {
                let x = if transposed { transpose(g) } else { g.clone() };
                let xxt = mul(&x, &transpose(&x));
                sum = Mat::from_fn(d, d, |i, j| decay * sum[(i, j)] + weight * xxt[(i, j)]);
            }
            let trace: f64 = (0..d).map(|i| sum[(i, i)]).sum();
            let tol = 1e-9 * trace;
            let s = sketch_matrix(side);
            let rho = side.sketch.escaped;
            assert!(rho > 0.0, "something must escape with ℓ < d");
            // U is orthonormal and λ ≥ 0, descending.
            let u = to_f64(MatRef::from_column_major_slice(&side.sketch.basis, d, l));
            let utu = mul(&transpose(&u), &u);
            for i in 0..l {
                for j in 0..l {
                    let e = if i == j { 1.0 } else { 0.0 };
                    assert!((utu[(i, j)] - e).abs() < 1e-12, "UᵀU {i} {j}");
                }
            }
            assert!(side.sketch.values.windows(2).all(|w| w[0] >= w[1]));
            assert!(side.sketch.values.iter().all(|&v| v >= 0.0));

            // 0 ⪯ Σ X Xᵀ − S ⪯ ρ I.
            let residual = Mat::from_fn(d, d, |i, j| sum[(i, j)] - s[(i, j)]);
            let (rv, _) = jacobi_eig(&residual);
            let (min, max) = (rv[d - 1], rv[0]);
            assert!(min >= -tol, "Σ X Xᵀ − S not PSD: {min} (tol {tol})");
            assert!(max <= rho + tol, "‖Σ X Xᵀ − S‖ = {max} > ρ = {rho}");
            // S + ρ I ⪰ Σ X Xᵀ.
            let upper = Mat::from_fn(d, d, |i, j| {
                s[(i, j)] + if i == j { rho } else { 0.0 } - sum[(i, j)]
            });
            let (uv, _) = jacobi_eig(&upper);
            assert!(uv[d - 1] >= -tol, "S + ρI − Σ X Xᵀ: {}", uv[d - 1]);
            if beta2 == 1.0 {
                // FD bound: ρ ≤ ‖A − A_k‖²_F / (ℓ + 1 − k) for k = 0..=ℓ.
                let (sv, _) = jacobi_eig(&sum);
                for k in 0..=l {
                    let tail: f64 = sv[k..].iter().map(|v| v.max(0.0)).sum();
                    let bound = tail / (l + 1 - k) as f64;
                    assert!(rho <= bound + tol, "k {k}: ρ {rho} > {bound}");
                }
            }
            worst = worst.max((-min).max(0.0) / trace);
            worst = worst.max((max - rho).max(0.0) / trace);
            worst = worst.max((-uv[d - 1]).max(0.0) / trace);
            println!(
                "frequent_directions_guarantee: β2 {beta2}, d {d}, ℓ {l}: \
                 λ_min(ΣXXᵀ − S)/tr {:.3e}, (ρ − ‖ΣXXᵀ − S‖₂)/tr {:.3e}, \
                 λ_min(S + ρI − ΣXXᵀ)/tr {:.3e}, ρ/tr {:.3e}",
                min / trace,
                (rho - max) / trace,
                uv[d - 1] / trace,
                rho / trace
            );
        }
        worst
    }

    #[test]
    fn frequent_directions_guarantee() {
        let worst = fd_guarantee(1.0).max(fd_guarantee(0.9));
        println!("frequent_directions_guarantee: max violation / trace {worst:.3e} (tol 1e-9)");
    }

    #[test]
    fn blocked_equals_per_block() {
        let (b, m) = (10, 7);
        let config = SketchyConfig {
            rank: 3,
            block_size: 4,
            beta2: 0.95,
            start_step: 2,
            precondition_every: 2,
            ..SketchyConfig::default()
        };
        let whole = SketchyConfig {
            block_size: 1024,
            ..config.clone()
        };
        let grads = gradients::<f64>(b, m, 12, 1.0, 2);
        let mut state = Sketchy::<f64>::new(&config, b, m).unwrap();
        assert_eq!(state.num_blocks(), 6);
        let got = run(&mut state, &grads);
        let mut worst = 0f64;
        for (row0, rows) in [(0, 4), (4, 4), (8, 2)] {
            for (col0, cols) in [(0, 4), (4, 3)] {
                let sub: Vec<Mat<f64>> = grads
                    .iter()
                    .map(|g| g.as_ref().submatrix(row0, col0, rows, cols).to_owned())
                    .collect();
                let mut single = Sketchy::<f64>::new(&whole, rows, cols).unwrap();
                assert_eq!(single.num_blocks(), 1);
                let want = run(&mut single, &sub);
                for (u, w) in got.iter().zip(&want) {
                    let u = u.as_ref().submatrix(row0, col0, rows, cols).to_owned();
                    worst = worst.max(rel_err(&u, w));
                }
            }
        }
        println!("blocked_equals_per_block: max rel err {worst:.3e}");
        assert!(worst <= 1e-12, "{worst}");
    }

    #[test]
    fn errors_leave_state_unchanged() {
        let config = SketchyConfig {
            rank: 2,
            block_size: 3,
            ..SketchyConfig::default()
        };
        let mut state = Sketchy::<f64>::new(&config, 5, 4).unwrap();
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
        let ok = SketchyConfig::default();
        assert!(ok.validate().is_ok());
        let bad = [
            SketchyConfig {
                rank: 0,
                ..ok.clone()
            },
            SketchyConfig {
                block_size: 0,
                ..ok.clone()
            },
            SketchyConfig {
                beta2: 0.0,
                ..ok.clone()
            },
            SketchyConfig {
                beta2: 1.5,
                ..ok.clone()
            },
            SketchyConfig {
                eps: 0.0,
                ..ok.clone()
            },
            SketchyConfig {
                eps: f64::NAN,
                ..ok.clone()
            },
            SketchyConfig {
                start_step: 0,
                ..ok.clone()
            },
            SketchyConfig {
                precondition_every: 0,
                ..ok.clone()
            },
        ];
        for config in &bad {
            assert!(
                matches!(config.validate(), Err(PrecondError::InvalidConfig { .. })),
                "{config:?}"
            );
            assert!(Sketchy::<f32>::new(config, 2, 2).is_err());
        }
        assert!(matches!(
            Sketchy::<f32>::new(&ok, 0, 2),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        // Missing fields take their defaults.
        let partial: SketchyConfig = serde_json::from_str(r#"{"rank": 32}"#).unwrap();
        assert_eq!(partial, SketchyConfig { rank: 32, ..ok });
    }

    #[test]
    fn state_bytes_counts_sketches_and_frozen_copies() {
        let side = |d: usize, rank: usize| {
            let l = rank.min(d);
            2 * (d * l + l + 1)
        };
        let config = SketchyConfig {
            rank: 256,
            block_size: 1024,
            ..SketchyConfig::default()
        };
        let state = Sketchy::<f32>::new(&config, 1000, 784).unwrap();
        assert_eq!(state.num_blocks(), 1);
        let expected = (side(1000, 256) + side(784, 256)) * 4;
        assert_eq!(expected, 3_657_744);
        assert_eq!(state.state_bytes(), expected);

        // Blocks 250 and rank 64: rows 4 × 250, columns 250, 250, 250, 34 (ℓ = 34 there).
        let blocked = SketchyConfig {
            rank: 64,
            block_size: 250,
            ..SketchyConfig::default()
        };
        let state = Sketchy::<f32>::new(&blocked, 1000, 784).unwrap();
        assert_eq!(state.num_blocks(), 16);
        let mut expected = 0;
        for rows in [250, 250, 250, 250] {
            for cols in [250, 250, 250, 34] {
                expected += (side(rows, 64) + side(cols, 64)) * 4;
            }
        }
        assert_eq!(state.state_bytes(), expected);
        let state64 = Sketchy::<f64>::new(&blocked, 1000, 784).unwrap();
        assert_eq!(state64.state_bytes(), 2 * expected);
    }

    /// Saves after 5 steps, restores and continues 5 more steps next to the original and a clone;
    /// returns the largest relative difference (`bitwise` demands identical bits).
    fn serde_continues<T: Scalar>(seed: u64, bitwise: bool) -> f64 {
        let config = SketchyConfig {
            rank: 2,
            block_size: 3,
            beta2: 0.99,
            start_step: 2,
            precondition_every: 2,
            ..SketchyConfig::default()
        };
        let grads = gradients::<T>(7, 5, 10, 1.0, seed);
        let mut state = Sketchy::<T>::new(&config, 7, 5).unwrap();
        run(&mut state, &grads[..5]);
        let json = serde_json::to_string(&state).unwrap();
        let mut restored: Sketchy<T> = serde_json::from_str(&json).unwrap();
        assert_eq!(restored.steps(), 5);
        assert!(restored.is_ready());
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
        let state = Sketchy::<f64>::new(&SketchyConfig::default(), 3, 2).unwrap();
        let mut value: serde_json::Value = serde_json::to_value(&state).unwrap();
        value["rows"] = serde_json::json!(4);
        let mut broken: Sketchy<f64> = serde_json::from_value(value).unwrap();
        let g = Mat::<f64>::zeros(4, 2);
        let mut u = Mat::<f64>::zeros(4, 2);
        let err = broken.precondition(g.as_ref(), u.as_mut()).unwrap_err();
        assert!(matches!(err, PrecondError::StateMismatch(_)), "{err:?}");
        assert_eq!(broken.steps(), 0);

        let mut value: serde_json::Value = serde_json::to_value(&state).unwrap();
        value["blocks"][0]["left"]["sketch"]["values"] = serde_json::json!([1.0]);
        let mut broken: Sketchy<f64> = serde_json::from_value(value).unwrap();
        let mut g = Mat::<f64>::zeros(3, 2);
        g[(0, 0)] = 1.0;
        let mut u = Mat::<f64>::zeros(3, 2);
        let err = broken.precondition(g.as_ref(), u.as_mut()).unwrap_err();
        assert!(matches!(err, PrecondError::StateMismatch(_)), "{err:?}");
    }

    #[test]
    fn failed_updates_keep_previous_sketch_and_frozen_copy() {
        // f32 statistics overflow for a finite gradient of 1e20: both updates fail, the sketches
        // and frozen copies stay those of step 1 and the direction uses them.
        let config = SketchyConfig {
            rank: 2,
            block_size: 8,
            ..SketchyConfig::default()
        };
        let grads = gradients::<f32>(4, 3, 1, 0.0, 7);
        let mut state = Sketchy::<f32>::new(&config, 4, 3).unwrap();
        let first = run(&mut state, &grads);
        assert!(state.is_ready());
        let saved = state.blocks[0].clone();
        let huge = Mat::<f32>::from_fn(4, 3, |i, j| 1e20 * grads[0][(i, j)]);
        let mut u = Mat::<f32>::zeros(4, 3);
        state.precondition(huge.as_ref(), u.as_mut()).unwrap();
        assert_eq!(state.failed_roots(), 2);
        assert!(state.is_ready());
        for (now, then) in [
            (&state.blocks[0].left, &saved.left),
            (&state.blocks[0].right, &saved.right),
        ] {
            assert!(now.sketch == then.sketch && now.frozen == then.frozen);
        }
        // P_L huge P_R = 1e20 · P_L G_1 P_R with the step-1 roots (up to f32 rounding).
        let want = Mat::from_fn(4, 3, |i, j| 1e20 * first[0][(i, j)]);
        let err = rel_err(&to_f64(u.as_ref()), &want);
        assert!(err < 1e-5, "{err}");

        // A first update that fails leaves the parameter unpreconditioned: u = −G.
        let mut fresh = Sketchy::<f32>::new(&config, 4, 3).unwrap();
        fresh.precondition(huge.as_ref(), u.as_mut()).unwrap();
        assert_eq!(fresh.failed_roots(), 2);
        assert!(!fresh.is_ready());
        for j in 0..3 {
            for i in 0..4 {
                assert_eq!(u[(i, j)], -huge[(i, j)]);
            }
        }
    }

    /// Single-block Sketchy in `T` (left: d = 10, ℓ = 2, c = 3, QR path; right: d = 3, direct
    /// path) whose step-3 kernel calls fail in both precisions after `skip` good ones (`n` of
    /// them; the calls are left QR, left eigendecomposition, right eigendecomposition): a side
    /// whose update failed keeps its step-2 sketch and frozen copy bitwise (this gradient is
    /// dropped from it), the direction applies the kept frozen copy (against the explicit FD
    /// oracle in f64, fed G_1, G_2 on a failed side and G_1..G_3 on the other), the step is
    /// counted once, and step 4 (the failed side continuing without G_3) resets the run.
    /// Returns the worst relative error of the directions.
    fn kept_sketch_case<T: Scalar>(skip: usize, n: usize) -> f64 {
        let config = SketchyConfig {
            rank: 2,
            block_size: 16,
            ..SketchyConfig::default()
        };
        let (b, m) = (10, 3);
        let grads = gradients::<T>(b, m, 4, 0.5, 15);
        let g64: Vec<_> = grads.iter().map(|g| to_f64(g.as_ref())).collect();
        let mut state = Sketchy::<T>::new(&config, b, m).unwrap();
        run(&mut state, &grads[..2]);
        let saved = state.blocks[0].clone();
        inject_failures_after(skip, FaultKind::Both, n);
        let u3 = run(&mut state, &grads[2..3]).remove(0);
        assert_eq!(injected_remaining(), 0);
        // The left update makes two calls (a failed QR ends it), the right one one.
        let left_failed = skip <= 1;
        let right_failed = skip + n == 3 || (skip == 0 && n == 2);
        assert_eq!(
            state.failed_roots(),
            u64::from(left_failed) + u64::from(right_failed)
        );
        let health = state.linalg_health();
        assert_eq!((health.failures, health.consecutive), (1, 1));
        let block = &state.blocks[0];
        for (now, then, failed) in [
            (&block.left, &saved.left, left_failed),
            (&block.right, &saved.right, right_failed),
        ] {
            assert_eq!(
                now.sketch == then.sketch && now.frozen == then.frozen,
                failed
            );
        }
        let (mut left, mut right) = (OracleSketch::new(b), OracleSketch::new(m));
        let steps_into = |side: &mut OracleSketch, failed: bool, right: bool| {
            for (t, g) in g64[..3].iter().enumerate() {
                if !(failed && t == 2) {
                    let x = if right { transpose(g) } else { g.clone() };
                    side.update(&x, config.rank, 1.0, 1.0);
                }
            }
        };
        steps_into(&mut left, left_failed, false);
        steps_into(&mut right, right_failed, true);
        let direction = |left: &OracleSketch, right: &OracleSketch, g: &Mat<f64>| {
            let u = mul(&mul(&left.root(config.eps), g), &right.root(config.eps));
            Mat::from_fn(b, m, |i, j| -u[(i, j)])
        };
        let mut worst = rel_err(&u3, &direction(&left, &right, &g64[2]));
        // Not vacuous: the direction without the failure differs.
        let (mut l3, mut r3) = (OracleSketch::new(b), OracleSketch::new(m));
        steps_into(&mut l3, false, false);
        steps_into(&mut r3, false, true);
        assert!(rel_err(&u3, &direction(&l3, &r3, &g64[2])) > 1e-3);
        // Step 4: the failed side continues from its step-2 sketch; the run resets.
        let u4 = run(&mut state, &grads[3..4]).remove(0);
        left.update(&g64[3], config.rank, 1.0, 1.0);
        right.update(&transpose(&g64[3]), config.rank, 1.0, 1.0);
        worst = worst.max(rel_err(&u4, &direction(&left, &right, &g64[3])));
        let health = state.linalg_health();
        assert_eq!((health.failures, health.consecutive), (1, 0));
        worst
    }

    #[test]
    fn failed_updates_in_both_precisions_keep_the_previous_sketch() {
        on_one_thread(|| {
            for (skip, n) in [(0, 1), (1, 1), (2, 1), (0, 2)] {
                let err64 = kept_sketch_case::<f64>(skip, n);
                let err32 = kept_sketch_case::<f32>(skip, n);
                println!("skip {skip}, fail {n}: max rel err f64 {err64:.2e}, f32 {err32:.2e}");
                assert!(err64 <= 1e-10, "f64 {err64:e}");
                assert!(err32 <= 1e-4, "f32 {err32:e}");
            }
        });
    }

    /// Every f32 QR and eigendecomposition of step 3 fails and is retried in f64: every
    /// direction equals an untouched twin's within f32 rounding, and nothing is counted.
    #[test]
    fn f32_update_failure_is_retried_in_f64() {
        on_one_thread(|| {
            let config = SketchyConfig {
                rank: 2,
                block_size: 16,
                ..SketchyConfig::default()
            };
            let grads = gradients::<f32>(10, 3, 5, 0.5, 16);
            let mut state = Sketchy::<f32>::new(&config, 10, 3).unwrap();
            let mut twin = state.clone();
            for (s, g) in grads.iter().enumerate() {
                inject_failures(FaultKind::F32Only, if s == 2 { 100 } else { 0 });
                let u = run(&mut state, std::slice::from_ref(g)).remove(0);
                if s == 2 {
                    // Left QR, left and right eigendecompositions.
                    assert_eq!(injected_remaining(), 97);
                    inject_failures(FaultKind::F32Only, 0);
                }
                let w = run(&mut twin, std::slice::from_ref(g)).remove(0);
                let err = rel_err(&u, &w);
                assert!(err <= 1e-4, "step {}: {err:e}", s + 1);
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
            let config = SketchyConfig {
                rank: 2,
                block_size: 3,
                ..SketchyConfig::default()
            };
            let grads = gradients::<f32>(5, 4, 4, 0.5, 17);
            let mut state = Sketchy::<f32>::new(&config, 5, 4).unwrap();
            run(&mut state, &grads[..1]);
            inject_failures(FaultKind::Both, 1);
            run(&mut state, &grads[1..2]);
            let mut back: Sketchy<f32> =
                serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
            assert_eq!(back.failed_roots(), 1);
            let health = back.linalg_health();
            assert_eq!((health.failures, health.consecutive), (1, 1));
            let mut value = serde_json::to_value(&state).unwrap();
            assert!(value.as_object_mut().unwrap().remove("linalg").is_some());
            let mut old: Sketchy<f32> = serde_json::from_value(value).unwrap();
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
