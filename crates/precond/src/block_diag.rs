//! Block Adam (AdaBlock; Yun, Lozano and Yang, 2022): Adam with a full-matrix second moment
//! on small diagonal blocks, for one layer seen as a (b, m) matrix whose columns are the
//! blocks of [`crate::view`] (b = d_in weights into each of m = d_out output neurons).
//!
//! Each column is split into ceil(b/s) consecutive chunks of s = `block_size` rows, the last
//! one smaller when s does not divide b: it has b − (ceil(b/s) − 1)·s rows (ours: the paper's
//! block 10 on d_in = 784 gives 78 chunks of 10 and one of 4). For chunk j of column i, with g
//! its gradient (length n, s or the last chunk's length) and t the 1-based step:
//!
//! 1. m ← β1 m + (1 − β1) g (elementwise; with β1 = 0 no buffer is kept and m = g),
//! 2. V ← β2 V + (1 − β2) g gᵀ (n × n; β2 = 1 is the plain sum V ← V + g gᵀ of Adagrad),
//! 3. m̂ = m / (1 − β1ᵗ) (skipped when β1 = 0), V̂ = V / (1 − β2ᵗ) (skipped when β2 = 1),
//! 4. u = −(V̂ + ε I)^{−1/2} m̂, by the eigendecomposition V = Q diag(λ) Qᵀ:
//!    u = −Q diag((max(λ, 0)/(1 − β2ᵗ) + ε)^{−1/2}) Qᵀ m̂. Negative eigenvalues can only come
//!    from round-off (V is a sum of outer products) and are clamped to 0 before adding ε.
//!    The denominator is kept at or above the eigensolver's rounding floor
//!    δ = n·u·λ_max/(1 − β2ᵗ) ([`SymEig::rounding_floor`]): m̂ lies in V's range, so its
//!    components along eigenvalues below δ are round-off, which a tiny ε (ε ≪ δ, e.g. at
//!    gradients of 1e30 or while V is rank deficient) would otherwise amplify by ε^{−1/2}
//!    instead of δ^{−1/2}. With ε ≥ δ (the presets at ordinary scales) nothing changes.
//!
//! With s = 1 this is Adam with ε inside the square root, u = −m̂ / √(v̂ + ε); with s = b,
//! β1 = 0 and β2 = 1 it is full-matrix Adagrad on every column.
//!
//! The step is transactional: a first pass computes every chunk's updated moments in per-task
//! scratch, eigendecomposes them and writes the direction into a workspace; only when every
//! chunk succeeded does a second pass apply the (bitwise identical) moment updates to the
//! state, so an error leaves the state as it was.
//!
//! **Linear-algebra failures** (the policy of [`crate::optimizer`]). A chunk's f32
//! eigendecomposition that fails is retried in f64 inside [`crate::linalg::SymEig`] (V converted
//! to f64, eigenpairs rounded back); a retry that succeeds is not counted. When it still fails
//! (no convergence in f64 too) the chunk keeps its previous root: the root of step t − 1,
//! (V_{t−1}/(1 − β2^{t−1}) + εI)^{−1/2} (ε^{−1/2} I at t = 1), recomputed from the state's
//! V_{t−1} (Block Adam stores no root), is applied to this step's m̂; the moments V and m absorb
//! this step's gradient all the same, and [`Preconditioner::linalg_health`] counts the step
//! (`failures`, and `consecutive`, which a step whose chunks all succeed resets). The step is
//! refused with [`PrecondError::LinalgFailure`] (state unchanged, nothing counted) when a
//! chunk's updated V holds ∞ (an f32 overflow: no root can be computed from it), when the
//! previous root cannot be recomputed either, or when the direction is not finite. Erroring
//! after too many failures in a row is [`crate::optimizer::ParamOptimizer`]'s job
//! ([`crate::OptimizerConfig::max_linalg_failures`]).

use crate::batched_eigen::{BlockEigensolver, EigenPack, Isa, LANES};
use crate::error::{invalid, PrecondError, Result};
use crate::linalg::{lower_finite, SymEig};
use crate::preconditioner::{check_finite, check_shapes, check_view, LinalgHealth, Preconditioner};
use crate::scalar::Scalar;
use faer::{ColRef, Mat, MatMut, MatRef};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Hyperparameters of Block Adam.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockAdamConfig {
    /// Rows s per diagonal block; must be at least 1. When s does not divide b the last
    /// chunk of each column has the remaining b mod s rows. Default 10.
    pub block_size: usize,
    /// First-moment decay β1 in [0, 1); 0 keeps no first-moment buffer. Default 0.9.
    pub beta1: f64,
    /// Second-moment decay β2 in (0, 1]; 1 is the plain sum (Adagrad). Default 0.999.
    pub beta2: f64,
    /// ε added to the eigenvalues of V̂ before the inverse square root. Must be finite and
    /// > 0. Default 1e-8.
    pub eps: f64,
    /// The kernel of the per-chunk eigenproblems: [`BlockEigensolver::Batched`] (default) or
    /// faer one chunk at a time; the same mathematics, rounding apart. Absent from a
    /// serialized config (states saved before it existed), it is faer, so such a state
    /// continues bit for bit.
    #[serde(default = "BlockEigensolver::legacy")]
    pub eigensolver: BlockEigensolver,
}

impl Default for BlockAdamConfig {
    fn default() -> Self {
        Self {
            block_size: 10,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            eigensolver: BlockEigensolver::Batched,
        }
    }
}

impl BlockAdamConfig {
    /// Checks every field; returns a clear error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if self.block_size == 0 {
            return Err(invalid("block_size", self.block_size, "must be at least 1"));
        }
        if !(self.beta1 >= 0.0 && self.beta1 < 1.0) {
            return Err(invalid("beta1", self.beta1, "must be in [0, 1)"));
        }
        if !(self.beta2 > 0.0 && self.beta2 <= 1.0) {
            return Err(invalid("beta2", self.beta2, "must be in (0, 1]"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        Ok(())
    }
}

/// Per-task scratch of the first pass, reused across chunks and steps.
struct ChunkScratch<T: Scalar> {
    eig: SymEig<T>,
    /// Updated V of the current chunk (lower triangle filled; n × n).
    stat: Mat<T>,
    /// The chunk's gradient g (n).
    grad: Vec<T>,
    /// The chunk's m̂ (n).
    moment: Vec<T>,
    /// Qᵀ m̂, then scaled by (λ̂ + ε)^{−1/2} (n).
    coef: Vec<T>,
    /// The batched path: its pack and each lane's V (lower triangle) and m̂, built on first use.
    pack: Option<EigenPack<T>>,
    lane_stats: Vec<Mat<T>>,
    lane_moments: Vec<Vec<T>>,
}

impl<T: Scalar> ChunkScratch<T> {
    /// Scratch for chunks of n rows.
    fn new(n: usize) -> Self {
        Self {
            eig: SymEig::new(n),
            stat: Mat::zeros(n, n),
            grad: vec![T::zero(); n],
            moment: vec![T::zero(); n],
            coef: vec![T::zero(); n],
            pack: None,
            lane_stats: Vec::new(),
            lane_moments: Vec::new(),
        }
    }

    /// The batched path's workspace for chunks of this scratch's length.
    fn for_packs(&mut self) {
        let n = self.grad.len();
        if self.pack.is_none() {
            self.pack = Some(EigenPack::new(n));
            self.lane_stats = (0..LANES).map(|_| Mat::zeros(n, n)).collect();
            self.lane_moments = vec![vec![T::zero(); n]; LANES];
        }
    }
}

/// Scratch of one parallel task: one for the full chunks of s rows and, when s does not
/// divide b, one for the shorter last chunk.
struct TaskScratch<T: Scalar> {
    full: ChunkScratch<T>,
    ragged: Option<ChunkScratch<T>>,
}

impl<T: Scalar> TaskScratch<T> {
    fn new(s: usize, last: usize) -> Self {
        Self {
            full: ChunkScratch::new(s),
            ragged: (last < s).then(|| ChunkScratch::new(last)),
        }
    }

    /// Whether this scratch was built for full chunks of s rows and a last chunk of `last`.
    fn fits(&self, s: usize, last: usize) -> bool {
        self.full.eig.dim() == s
            && match &self.ragged {
                Some(r) => last < s && r.eig.dim() == last,
                None => last == s,
            }
    }

    /// The scratch for a chunk of n rows (s, or the last chunk's length).
    fn for_len(&mut self, n: usize) -> &mut ChunkScratch<T> {
        match &mut self.ragged {
            Some(r) if n != self.full.grad.len() => r,
            _ => &mut self.full,
        }
    }
}

/// Layer-sized workspace, reused across steps (not part of the saved state).
struct Workspace<T: Scalar> {
    /// The direction, column-major b × m, copied out once the whole step succeeded.
    direction: Vec<T>,
    /// Columns handled by one parallel task.
    cols_per_task: usize,
    /// One scratch per parallel task.
    scratch: Vec<TaskScratch<T>>,
}

impl<T: Scalar> Default for Workspace<T> {
    fn default() -> Self {
        Self {
            direction: Vec::new(),
            cols_per_task: 0,
            scratch: Vec::new(),
        }
    }
}

/// The step's scalars, shared by both passes so that they compute bitwise identical moments.
#[derive(Clone, Copy)]
struct StepScalars<T: Scalar> {
    beta1: T,
    one_minus_beta1: T,
    beta2: T,
    one_minus_beta2: T,
    /// β2 = 1: V ← V + g gᵀ, without the (1 − β2) weight.
    sum: bool,
    /// β1 > 0: a first-moment buffer exists.
    has_momentum: bool,
    /// 1 / (1 − β1ᵗ), or 1 with β1 = 0.
    moment_correction: T,
    /// 1 − β2ᵗ, or 1 with β2 = 1.
    stat_correction: T,
    /// 1 − β2^{t−1} (0 at t = 1), or 1 with β2 = 1: the previous step's correction.
    prev_stat_correction: T,
    eps: T,
}

impl<T: Scalar> StepScalars<T> {
    fn new(config: &BlockAdamConfig, t: u64) -> Self {
        let t = t as f64;
        let has_momentum = config.beta1 > 0.0;
        let sum = config.beta2 == 1.0;
        Self {
            beta1: T::of(config.beta1),
            one_minus_beta1: T::of(1.0 - config.beta1),
            beta2: T::of(config.beta2),
            one_minus_beta2: T::of(1.0 - config.beta2),
            sum,
            has_momentum,
            moment_correction: T::of(if has_momentum {
                1.0 / (1.0 - config.beta1.powf(t))
            } else {
                1.0
            }),
            stat_correction: T::of(if sum { 1.0 } else { 1.0 - config.beta2.powf(t) }),
            prev_stat_correction: T::of(if sum {
                1.0
            } else {
                1.0 - config.beta2.powf(t - 1.0)
            }),
            eps: T::of(config.eps),
        }
    }

    /// Updated first moment β1 m + (1 − β1) g.
    #[inline]
    fn moment(&self, old: T, g: T) -> T {
        self.beta1 * old + self.one_minus_beta1 * g
    }

    /// Updated second-moment entry β2 V + (1 − β2) g_r g_c, or V + g_r g_c when β2 = 1.
    #[inline]
    fn stat(&self, old: T, gr: T, gc: T) -> T {
        if self.sum {
            old + gr * gc
        } else {
            self.beta2 * old + self.one_minus_beta2 * (gr * gc)
        }
    }
}

/// State of one layer: the full second moment of every chunk (s × s, the ragged last one
/// smaller) and the first moment.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct BlockAdam<T: Scalar> {
    config: BlockAdamConfig,
    rows: usize,
    blocks: usize,
    step: u64,
    /// V of every chunk, full n × n column-major (n = s, or the last chunk's length l). A
    /// column holds col_len = (chunks − 1)·s² + l² values, column i's statistics are the
    /// contiguous range [i·col_len, (i+1)·col_len) and chunk j sits at offset j·s² inside it.
    second_moment: Vec<T>,
    /// m, column-major b × m; empty when β1 = 0.
    first_moment: Vec<T>,
    /// Steps with a chunk that kept its previous root (absent from states saved before it
    /// existed: zeros).
    #[serde(default)]
    linalg: LinalgHealth,
    #[serde(skip)]
    work: Workspace<T>,
}

impl<T: Scalar> Clone for BlockAdam<T> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            rows: self.rows,
            blocks: self.blocks,
            step: self.step,
            second_moment: self.second_moment.clone(),
            first_moment: self.first_moment.clone(),
            linalg: self.linalg,
            work: Workspace::default(),
        }
    }
}

impl<T: Scalar> std::fmt::Debug for BlockAdam<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockAdam")
            .field("config", &self.config)
            .field("rows", &self.rows)
            .field("blocks", &self.blocks)
            .field("step", &self.step)
            .field("linalg", &self.linalg)
            .finish_non_exhaustive()
    }
}

impl<T: Scalar> BlockAdam<T> {
    /// New state for a (b, m) = (`rows`, `blocks`) parameter view; a `block_size` above b is capped at b. When `block_size` does not
    /// divide b, the last chunk of each column is shorter (b mod s rows).
    pub fn new(config: &BlockAdamConfig, rows: usize, blocks: usize) -> Result<Self> {
        config.validate()?;
        check_view(rows, blocks)?;
        let first = if config.beta1 > 0.0 { rows * blocks } else { 0 };
        // A block larger than the column is the whole column: cap it, so that scratch and
        // chunk arithmetic never see the larger value.
        let config = BlockAdamConfig {
            block_size: config.block_size.min(rows),
            ..config.clone()
        };
        let mut opt = Self {
            config,
            rows,
            blocks,
            step: 0,
            second_moment: Vec::new(),
            first_moment: vec![T::zero(); first],
            linalg: LinalgHealth::default(),
            work: Workspace::default(),
        };
        opt.second_moment = vec![T::zero(); blocks * opt.column_len()];
        Ok(opt)
    }

    /// The configuration.
    pub fn config(&self) -> &BlockAdamConfig {
        &self.config
    }

    /// (b, m) this state was built for.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.blocks)
    }

    /// Chunks per column, ceil(b/s).
    pub fn chunks_per_column(&self) -> usize {
        self.rows.div_ceil(self.config.block_size)
    }

    /// Rows of the last chunk of a column, b − (ceil(b/s) − 1)·s (s when s divides b).
    fn last_len(&self) -> usize {
        self.rows - (self.chunks_per_column() - 1) * self.config.block_size
    }

    /// Second-moment values per column, (chunks − 1)·s² + last².
    fn column_len(&self) -> usize {
        let (s, last) = (self.config.block_size, self.last_len());
        (self.chunks_per_column() - 1) * s * s + last * last
    }

    /// The second moment V (n × n, not bias-corrected; n = s, or the last chunk's length for
    /// the last chunk) of chunk `chunk` of column `col`.
    pub fn second_moment(&self, col: usize, chunk: usize) -> MatRef<'_, T> {
        let s = self.config.block_size;
        let chunks = self.chunks_per_column();
        assert!(chunk < chunks, "chunk {chunk} out of {chunks}");
        let n = if chunk + 1 == chunks {
            self.last_len()
        } else {
            s
        };
        let at = col * self.column_len() + chunk * s * s;
        MatRef::from_column_major_slice(&self.second_moment[at..at + n * n], n, n)
    }

    /// The first moment m (b × m, not bias-corrected); `None` when β1 = 0.
    pub fn first_moment(&self) -> Option<MatRef<'_, T>> {
        (!self.first_moment.is_empty())
            .then(|| MatRef::from_column_major_slice(&self.first_moment, self.rows, self.blocks))
    }

    fn ensure_workspace(&mut self) {
        let (b, m, s) = (self.rows, self.blocks, self.config.block_size);
        let last = self.last_len();
        let w = &mut self.work;
        if w.direction.len() == b * m
            && w.cols_per_task > 0
            && w.scratch.len() == m.div_ceil(w.cols_per_task)
            && w.scratch.iter().all(|sc| sc.fits(s, last))
        {
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        w.cols_per_task = m.div_ceil(threads * 4).max(1);
        if self.config.eigensolver == BlockEigensolver::Batched {
            // Packs are columns [8p, 8p + 8) of one chunk row, whatever the thread count.
            w.cols_per_task = w.cols_per_task.next_multiple_of(LANES);
        }
        w.direction = vec![T::zero(); b * m];
        w.scratch = (0..m.div_ceil(w.cols_per_task))
            .map(|_| TaskScratch::new(s, last))
            .collect();
    }

    fn check_state(&self) -> Result<()> {
        let (b, m, s) = (self.rows, self.blocks, self.config.block_size);
        let first = if self.config.beta1 > 0.0 { b * m } else { 0 };
        if s == 0
            || b == 0
            || self.second_moment.len() != m * self.column_len()
            || self.first_moment.len() != first
        {
            return Err(PrecondError::StateMismatch(format!(
                "block Adam state for ({b}, {m}) with block size {s} holds {} second-moment and \
                 {} first-moment values",
                self.second_moment.len(),
                self.first_moment.len()
            )));
        }
        Ok(())
    }
}

/// What the first pass did for one chunk (ordered: a worse outcome is larger).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Chunk {
    /// The root of the updated V.
    Fresh,
    /// The eigendecomposition failed (in f64 too): the previous root was used.
    Kept,
    /// No direction: V overflowed, or the previous root could not be recomputed either.
    Refused,
}

/// u = −Q diag(max(max(λ, 0)/corr + ε, δ)^{−1/2}) Qᵀ m̂ from the decomposition in `sc.eig`
/// (eigenvalues taken as 0 when corr = 0, i.e. V̂ = 0; δ the rounding floor over corr).
fn apply_root<T: Scalar>(sc: &mut ChunkScratch<T>, correction: T, eps: T, out: &mut [T]) {
    let s = sc.grad.len();
    let q = &sc.eig.vectors;
    let floor = if correction > T::zero() {
        sc.eig.rounding_floor() / correction
    } else {
        T::zero()
    };
    for j in 0..s {
        let proj = (0..s).fold(T::zero(), |acc, r| acc + q[(r, j)] * sc.moment[r]);
        let lambda = sc.eig.value(j);
        let lambda = if lambda > T::zero() && correction > T::zero() {
            lambda / correction
        } else {
            T::zero()
        };
        sc.coef[j] = proj / (lambda + eps).max(floor).sqrt();
    }
    // u = −Q coef.
    for (r, u) in out.iter_mut().enumerate() {
        *u = -(0..s).fold(T::zero(), |acc, j| acc + q[(r, j)] * sc.coef[j]);
    }
}

/// Steps 1–3 for one chunk: m̂ = (β1 m + (1 − β1) g) / (1 − β1ᵗ) (or g) into `moment` and
/// V = β2 V + (1 − β2) g gᵀ into the lower triangle of `stat` (all the eigensolvers read).
fn updated_moments<T: Scalar>(
    k: &StepScalars<T>,
    grad: &[T],
    old_stat: &[T],
    old_moment: Option<&[T]>,
    moment: &mut [T],
    stat: &mut Mat<T>,
) {
    let s = grad.len();
    match old_moment {
        Some(old) => {
            for ((mhat, &m), &g) in moment.iter_mut().zip(old).zip(grad) {
                *mhat = k.moment(m, g) * k.moment_correction;
            }
        }
        None => moment.copy_from_slice(grad),
    }
    for c in 0..s {
        let gc = grad[c];
        for r in c..s {
            stat[(r, c)] = k.stat(old_stat[c * s + r], grad[r], gc);
        }
    }
}

/// Pass 1 for chunk row `j` (rows r0..r0 + n) of up to [`LANES`] consecutive columns with the
/// batched eigensolver: u = −V diag(max(max(λ, 0)/corr + ε, δ)^{−1/2}) Vᵀ m̂ as
/// [`apply_root`] computes it, without forming V. `cols` are (column, its direction slice
/// of length b, its gradient column); a chunk the pack cannot solve goes through
/// [`chunk_direction`] (faer, and its previous-root policy).
#[allow(clippy::too_many_arguments)] // the pass's shared inputs
#[allow(clippy::needless_range_loop)] // lanes index the pack and its per-lane flags together
fn pack_directions<T: Scalar>(
    k: &StepScalars<T>,
    sc: &mut ChunkScratch<T>,
    r0: usize,
    at: &dyn Fn(usize) -> usize,
    second_moment: &[T],
    first_moment: &[T],
    b: usize,
    cols: &mut [(usize, &mut [T], ColRef<'_, T>)],
) -> Chunk {
    let n = sc.grad.len();
    sc.for_packs();
    let Some(mut pack) = sc.pack.take() else {
        return Chunk::Refused;
    };
    let mut worst = Chunk::Fresh;
    let mut loaded = [false; LANES];
    for lane in 0..LANES {
        let Some((i, _, g)) = cols.get(lane) else {
            pack.clear(lane);
            continue;
        };
        for (r, v) in sc.grad.iter_mut().enumerate() {
            *v = g[r0 + r];
        }
        let old_moment = k
            .has_momentum
            .then(|| &first_moment[i * b + r0..i * b + r0 + n]);
        let at = at(*i);
        updated_moments(
            k,
            &sc.grad,
            &second_moment[at..at + n * n],
            old_moment,
            &mut sc.lane_moments[lane],
            &mut sc.lane_stats[lane],
        );
        if !lower_finite(sc.lane_stats[lane].as_ref()) {
            pack.clear(lane);
            worst = worst.max(Chunk::Refused);
            continue;
        }
        let stat = &sc.lane_stats[lane];
        pack.load(lane, |r, c| stat[(r, c)], &sc.lane_moments[lane]);
        loaded[lane] = true;
    }
    let solved = pack.solve(Isa::Detect);
    let mut done = [false; LANES];
    for (lane, (i, dir, g)) in cols.iter_mut().enumerate() {
        if !loaded[lane] {
            continue;
        }
        if !solved[lane] {
            for (r, v) in sc.grad.iter_mut().enumerate() {
                *v = g[r0 + r];
            }
            let old_moment = k
                .has_momentum
                .then(|| &first_moment[*i * b + r0..*i * b + r0 + n]);
            let at = at(*i);
            worst = worst.max(chunk_direction(
                k,
                sc,
                &second_moment[at..at + n * n],
                old_moment,
                &mut dir[r0..r0 + n],
            ));
            continue;
        }
        // The weights of `apply_root`, with the same rounding floor n·u·max|λ| / corr.
        let largest = (0..n).fold(T::zero(), |acc, j| acc.max(pack.eigenvalue(lane, j).abs()));
        let correction = k.stat_correction;
        let floor = if correction > T::zero() {
            T::of(n as f64) * T::epsilon() * largest / correction
        } else {
            T::zero()
        };
        for j in 0..n {
            let lambda = pack.eigenvalue(lane, j);
            let lambda = if lambda > T::zero() && correction > T::zero() {
                lambda / correction
            } else {
                T::zero()
            };
            pack.weight(lane, j, T::one() / (lambda + k.eps).max(floor).sqrt());
        }
        done[lane] = true;
    }
    pack.back_transform(Isa::Detect);
    for (lane, (_, dir, _)) in cols.iter_mut().enumerate() {
        if done[lane] {
            for (r, u) in dir[r0..r0 + n].iter_mut().enumerate() {
                *u = -pack.result(lane, r);
            }
        }
    }
    sc.pack = Some(pack);
    worst
}

/// First pass for one chunk: updated moments into scratch, then u = −(V̂ + εI)^{−1/2} m̂ into
/// `out` (length n, the scratch's chunk length), or with the previous root when the
/// eigendecomposition fails (module docs). Reads the state, never writes it.
fn chunk_direction<T: Scalar>(
    k: &StepScalars<T>,
    sc: &mut ChunkScratch<T>,
    old_stat: &[T],
    old_moment: Option<&[T]>,
    out: &mut [T],
) -> Chunk {
    let s = sc.grad.len();
    updated_moments(
        k,
        &sc.grad,
        old_stat,
        old_moment,
        &mut sc.moment,
        &mut sc.stat,
    );
    if !lower_finite(sc.stat.as_ref()) {
        return Chunk::Refused;
    }
    if sc.eig.compute(sc.stat.as_ref()) {
        apply_root(sc, k.stat_correction, k.eps, out);
        return Chunk::Fresh;
    }
    // The previous root: (V_{t−1}/(1 − β2^{t−1}) + εI)^{−1/2}, from the state's V_{t−1}.
    for c in 0..s {
        for r in c..s {
            sc.stat[(r, c)] = old_stat[c * s + r];
        }
    }
    if !sc.eig.compute(sc.stat.as_ref()) {
        return Chunk::Refused;
    }
    apply_root(sc, k.prev_stat_correction, k.eps, out);
    Chunk::Kept
}

impl<T: Scalar> Preconditioner<T> for BlockAdam<T> {
    fn precondition(&mut self, grad: MatRef<'_, T>, mut direction: MatMut<'_, T>) -> Result<()> {
        let (b, m, s) = (self.rows, self.blocks, self.config.block_size);
        check_shapes(
            (grad.nrows(), grad.ncols()),
            (direction.nrows(), direction.ncols()),
            b,
            m,
        )?;
        self.check_state()?;
        check_finite(grad, self.step + 1)?;
        self.ensure_workspace();
        let k = StepScalars::<T>::new(&self.config, self.step + 1);
        let chunks = self.chunks_per_column();
        let last = self.last_len();
        let col_len = self.column_len();
        // Rows of chunk j: s, or `last` for the final one.
        let chunk_len = |j: usize| if j + 1 == chunks { last } else { s };

        // Pass 1: directions into the workspace, state only read.
        let w = &mut self.work;
        let per_task = w.cols_per_task;
        let second_moment = &self.second_moment;
        let first_moment = &self.first_moment;
        let batched = self.config.eigensolver == BlockEigensolver::Batched;
        // Every chunk runs (no short cut), so that the worst outcome does not depend on the
        // scheduling.
        let worst = w
            .direction
            .par_chunks_mut(per_task * b)
            .zip(w.scratch.par_iter_mut())
            .enumerate()
            .map(|(task, (dirs, sc))| {
                let first_col = task * per_task;
                let mut worst = Chunk::Fresh;
                if batched {
                    let at = |i: usize| -> usize { i * col_len };
                    for (p, group) in dirs.chunks_mut(LANES * b).enumerate() {
                        let mut cols: Vec<(usize, &mut [T], ColRef<'_, T>)> = group
                            .chunks_mut(b)
                            .enumerate()
                            .map(|(c, dir)| {
                                let i = first_col + p * LANES + c;
                                (i, dir, grad.col(i))
                            })
                            .collect();
                        for j in 0..chunks {
                            let (r0, n) = (j * s, chunk_len(j));
                            let at_chunk = |i: usize| at(i) + j * s * s;
                            worst = worst.max(pack_directions(
                                &k,
                                sc.for_len(n),
                                r0,
                                &at_chunk,
                                second_moment,
                                first_moment,
                                b,
                                &mut cols,
                            ));
                        }
                    }
                    return worst;
                }
                for (c, dir) in dirs.chunks_mut(b).enumerate() {
                    let i = first_col + c;
                    let g = grad.col(i);
                    for j in 0..chunks {
                        let (r0, n) = (j * s, chunk_len(j));
                        let sc = sc.for_len(n);
                        for (r, v) in sc.grad.iter_mut().enumerate() {
                            *v = g[r0 + r];
                        }
                        let at = i * col_len + j * s * s;
                        let old_moment = k
                            .has_momentum
                            .then(|| &first_moment[i * b + r0..i * b + r0 + n]);
                        worst = worst.max(chunk_direction(
                            &k,
                            sc,
                            &second_moment[at..at + n * n],
                            old_moment,
                            &mut dir[r0..r0 + n],
                        ));
                    }
                }
                worst
            })
            .reduce(|| Chunk::Fresh, Chunk::max);
        let t = self.step + 1;
        if worst == Chunk::Refused {
            return Err(self.linalg.refusal("block eigendecomposition", t));
        }
        if !w.direction.iter().all(|v| v.is_finite()) {
            return Err(self.linalg.refusal("block direction", t));
        }

        // Pass 2 (commit): the same moment updates, in place.
        self.second_moment
            .par_chunks_mut(col_len)
            .enumerate()
            .for_each(|(i, stats)| {
                let g = grad.col(i);
                // Chunks of s² values; the remainder is exactly the last chunk's last².
                for (j, v) in stats.chunks_mut(s * s).enumerate() {
                    let (r0, n) = (j * s, chunk_len(j));
                    for c in 0..n {
                        let gc = g[r0 + c];
                        for r in 0..n {
                            v[c * n + r] = k.stat(v[c * n + r], g[r0 + r], gc);
                        }
                    }
                }
            });
        if k.has_momentum {
            self.first_moment
                .par_chunks_mut(b)
                .enumerate()
                .for_each(|(i, mom)| {
                    let g = grad.col(i);
                    for (r, v) in mom.iter_mut().enumerate() {
                        *v = k.moment(*v, g[r]);
                    }
                });
        }
        direction.copy_from(MatRef::from_column_major_slice(&self.work.direction, b, m));
        self.linalg
            .record((worst == Chunk::Kept).then_some("Block Adam inverse root"));
        self.step = t;
        Ok(())
    }

    fn linalg_health(&self) -> LinalgHealth {
        self.linalg
    }

    /// (m·((chunks − 1)·s² + last²) + (β1 > 0 ? b·m : 0)) · `size_of::<T>()`, with
    /// chunks = ceil(b/s) and last = b − (chunks − 1)·s: the full second moment of each chunk
    /// (s × s, the last one last × last), plus the first moment when β1 > 0.
    fn state_bytes(&self) -> usize {
        (self.second_moment.len() + self.first_moment.len()) * std::mem::size_of::<T>()
    }

    fn steps(&self) -> u64 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    // Oracle code indexes columns, chunks and rows explicitly, as the formulas do.
    #![allow(clippy::needless_range_loop)]

    //! Tests against an independent f64 oracle: nested `Vec<f64>` statistics and a cyclic
    //! Jacobi eigensolver, no faer.

    use super::*;
    use crate::linalg::{inject_failures, inject_failures_after, injected_remaining, FaultKind};
    use crate::testing::{jacobi_eigen_rows, on_one_thread};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};
    /// −(H + εI)^{−1/2} x, eigenvalues of H clamped at 0.
    fn inv_root_apply(h: &[Vec<f64>], eps: f64, x: &[f64]) -> Vec<f64> {
        let n = x.len();
        let (vals, vecs) = jacobi_eigen_rows(h);
        let mut u = vec![0.0; n];
        for k in 0..n {
            let proj: f64 = (0..n).map(|r| vecs[r][k] * x[r]).sum();
            let scale = proj / (vals[k].max(0.0) + eps).sqrt();
            for r in 0..n {
                u[r] -= vecs[r][k] * scale;
            }
        }
        u
    }

    /// A chunk's bias-corrected (V̂[r][c], m̂[r]).
    type ChunkMoments = (Vec<Vec<f64>>, Vec<f64>);

    /// Block Adam in plain f64 on nested vectors; gradients are `g[col][row]`.
    struct Oracle {
        s: usize,
        beta1: f64,
        beta2: f64,
        eps: f64,
        t: i32,
        /// m[col][row].
        m: Vec<Vec<f64>>,
        /// v[col][chunk][r][c]; chunks of s rows, the last one of b − (ceil(b/s) − 1)·s.
        v: Vec<Vec<Vec<Vec<f64>>>>,
        /// (V̂, m̂) of every chunk at the last step, `last[col][chunk]`.
        last: Vec<Vec<ChunkMoments>>,
    }

    impl Oracle {
        fn new(config: &BlockAdamConfig, b: usize, m: usize) -> Self {
            let s = config.block_size;
            Self {
                s,
                beta1: config.beta1,
                beta2: config.beta2,
                eps: config.eps,
                t: 0,
                m: vec![vec![0.0; b]; m],
                v: vec![
                    (0..b.div_ceil(s))
                        .map(|j| {
                            let n = s.min(b - j * s);
                            vec![vec![0.0; n]; n]
                        })
                        .collect();
                    m
                ],
                last: vec![Vec::new(); m],
            }
        }

        /// Updates the moments and records every chunk's (V̂, m̂) in `last`.
        fn step(&mut self, g: &[Vec<f64>]) {
            self.t += 1;
            let s = self.s;
            for i in 0..g.len() {
                let b = g[i].len();
                self.last[i].clear();
                for j in 0..b.div_ceil(s) {
                    let chunk = &g[i][j * s..((j + 1) * s).min(b)];
                    let n = chunk.len();
                    let mut mhat = vec![0.0; n];
                    for r in 0..n {
                        if self.beta1 > 0.0 {
                            let mr = &mut self.m[i][j * s + r];
                            *mr = self.beta1 * *mr + (1.0 - self.beta1) * chunk[r];
                            mhat[r] = *mr / (1.0 - self.beta1.powi(self.t));
                        } else {
                            mhat[r] = chunk[r];
                        }
                    }
                    let v = &mut self.v[i][j];
                    let mut vhat = vec![vec![0.0; n]; n];
                    for r in 0..n {
                        for c in 0..n {
                            if self.beta2 == 1.0 {
                                v[r][c] += chunk[r] * chunk[c];
                                vhat[r][c] = v[r][c];
                            } else {
                                v[r][c] =
                                    self.beta2 * v[r][c] + (1.0 - self.beta2) * chunk[r] * chunk[c];
                                vhat[r][c] = v[r][c] / (1.0 - self.beta2.powi(self.t));
                            }
                        }
                    }
                    self.last[i].push((vhat, mhat));
                }
            }
        }
    }

    /// Gradients g[col][row] with a per-step scale over 10^±`decades` and a per-column scale
    /// over 10^±(`decades`/2), rounded to f32 so that both precisions see the same values.
    fn gradients(b: usize, m: usize, steps: usize, decades: f64, seed: u64) -> Vec<Vec<Vec<f64>>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let half = decades / 2.0;
        let col_scale: Vec<f64> = (0..m)
            .map(|_| 10f64.powf(rng.random_range(-half..=half)))
            .collect();
        (0..steps)
            .map(|_| {
                let scale = 10f64.powf(rng.random_range(-decades..=decades));
                (0..m)
                    .map(|i| {
                        (0..b)
                            .map(|_| {
                                let n: f64 = StandardNormal.sample(&mut rng);
                                (scale * col_scale[i] * n) as f32 as f64
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    fn to_mat<T: Scalar>(g: &[Vec<f64>]) -> Mat<T> {
        Mat::from_fn(g[0].len(), g.len(), |r, c| T::of(g[c][r]))
    }

    /// max over chunks (of s rows, the last one possibly shorter) of ‖u − u_ref‖_∞ / ‖u_ref‖_∞
    /// on that chunk.
    fn max_chunk_rel_err<T: Scalar>(u: MatRef<'_, T>, oracle: &[Vec<f64>], s: usize) -> f64 {
        let mut worst = 0.0f64;
        for (i, col) in oracle.iter().enumerate() {
            for j in 0..col.len().div_ceil(s) {
                let mut diff = 0.0f64;
                let mut scale = 0.0f64;
                for r in j * s..((j + 1) * s).min(col.len()) {
                    diff = diff.max((u[(r, i)].f64() - col[r]).abs());
                    scale = scale.max(col[r].abs());
                }
                worst = worst.max(diff / scale.max(1e-300));
            }
        }
        worst
    }

    /// How one chunk's direction compares with the oracle's.
    struct ChunkError {
        /// ‖u − u_ref‖_∞ / ‖u_ref‖_∞.
        forward: f64,
        /// ‖(V̂ + εI)^{1/2} u + m̂‖₂ / ‖m̂‖₂ with the oracle's V̂ and m̂: the relative residual
        /// of the equation (V̂ + εI)^{1/2} u = −m̂ that defines u.
        residual: f64,
        /// cond(V̂ + εI) = (λ_max + ε) / (λ_min + ε), eigenvalues clamped at 0.
        cond: f64,
    }

    /// Compares every chunk of `u` with the oracle's last step.
    fn chunk_errors<T: Scalar>(u: MatRef<'_, T>, oracle: &Oracle) -> Vec<ChunkError> {
        let s = oracle.s;
        let eps = oracle.eps;
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut out = Vec::new();
        for (i, chunks) in oracle.last.iter().enumerate() {
            for (j, (vhat, mhat)) in chunks.iter().enumerate() {
                // Rows of this chunk: s, or fewer for a ragged last chunk.
                let n = mhat.len();
                let (vals, vecs) = jacobi_eigen_rows(vhat);
                let uj: Vec<f64> = (0..n).map(|r| u[(j * s + r, i)].f64()).collect();
                let expected = inv_root_apply(vhat, eps, mhat);
                let mut diff = 0.0f64;
                let mut scale = 0.0f64;
                for r in 0..n {
                    diff = diff.max((uj[r] - expected[r]).abs());
                    scale = scale.max(expected[r].abs());
                }
                let mut res = mhat.clone();
                for k in 0..n {
                    let proj: f64 = (0..n).map(|r| vecs[r][k] * uj[r]).sum();
                    let scaled = proj * (vals[k].max(0.0) + eps).sqrt();
                    for r in 0..n {
                        res[r] += vecs[r][k] * scaled;
                    }
                }
                let hi = vals.iter().fold(0.0f64, |a, &v| a.max(v));
                let lo = vals.iter().fold(f64::INFINITY, |a, &v| a.min(v.max(0.0)));
                out.push(ChunkError {
                    forward: diff / scale.max(1e-300),
                    residual: norm(&res) / norm(mhat).max(1e-300),
                    cond: (hi + eps) / (lo + eps),
                });
            }
        }
        out
    }

    /// Runs `grads` through a `BlockAdam<T>` and the oracle; returns every chunk's error at
    /// every step.
    fn run_against_oracle<T: Scalar>(
        config: &BlockAdamConfig,
        grads: &[Vec<Vec<f64>>],
    ) -> Vec<ChunkError> {
        let (b, m) = (grads[0][0].len(), grads[0].len());
        let mut opt = BlockAdam::<T>::new(config, b, m).unwrap();
        let mut oracle = Oracle::new(config, b, m);
        let mut dir = Mat::<T>::zeros(b, m);
        let mut errors = Vec::new();
        for g in grads {
            opt.precondition(to_mat::<T>(g).as_ref(), dir.as_mut())
                .unwrap();
            oracle.step(g);
            errors.extend(chunk_errors(dir.as_ref(), &oracle));
        }
        assert_eq!(opt.steps(), grads.len() as u64);
        errors
    }

    fn max_of(errors: &[ChunkError], f: impl Fn(&ChunkError) -> f64) -> f64 {
        errors.iter().map(f).fold(0.0, f64::max)
    }

    fn adam_config(block_size: usize) -> BlockAdamConfig {
        BlockAdamConfig {
            block_size,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            ..Default::default()
        }
    }

    #[test]
    fn matches_oracle_in_f64_and_f32() {
        let config = adam_config(4);
        let grads = gradients(12, 5, 20, 2.0, 1);
        let err64 = run_against_oracle::<f64>(&config, &grads);
        let forward64 = max_of(&err64, |e| e.forward);
        let residual64 = max_of(&err64, |e| e.residual);
        println!("f64: max chunk forward rel err {forward64:.3e}, residual {residual64:.3e}");
        assert!(forward64 <= 1e-9, "f64 forward error {forward64}");
        assert!(residual64 <= 1e-12, "f64 residual {residual64}");

        // In f32 the statistics themselves carry relative round-off 2^-24 ≈ 6e-8, which moves
        // the direction by up to about 2^-24·cond(V̂ + εI): with ε = 1e-8 and rank-deficient
        // early steps cond reaches 1e7 and no f32 method can match the exact answer to 1e-3.
        // So the forward error is held to 1e-3 on chunks with cond ≤ 1e3 and to 1e-6·cond
        // (16× the round-off bound) beyond, and the residual to 1e-3 everywhere.
        let err32 = run_against_oracle::<f32>(&config, &grads);
        let well_conditioned: Vec<&ChunkError> = err32.iter().filter(|e| e.cond <= 1e3).collect();
        let forward32 = well_conditioned
            .iter()
            .map(|e| e.forward)
            .fold(0.0, f64::max);
        let forward32_all = max_of(&err32, |e| e.forward);
        let ratio32 = max_of(&err32, |e| e.forward / e.cond);
        let residual32 = max_of(&err32, |e| e.residual);
        println!(
            "f32: max chunk forward rel err {forward32:.3e} on the {} of {} chunks with \
             cond <= 1e3 ({forward32_all:.3e} on all), max forward/cond {ratio32:.3e}, \
             residual {residual32:.3e}",
            well_conditioned.len(),
            err32.len()
        );
        assert!(well_conditioned.len() >= err32.len() / 2);
        assert!(forward32 <= 1e-3, "f32 forward error {forward32}");
        assert!(ratio32 <= 1e-6, "f32 forward error / cond {ratio32}");
        assert!(residual32 <= 1e-3, "f32 residual {residual32}");
    }

    #[test]
    fn full_block_without_decay_is_full_matrix_adagrad() {
        let (b, m) = (8, 3);
        let config = BlockAdamConfig {
            block_size: b,
            beta1: 0.0,
            beta2: 1.0,
            eps: 1e-8,
            ..Default::default()
        };
        // Unit-scale gradients: during the 7 rank-deficient steps, round-off of relative size δ
        // in the eigenvectors leaks into the null space and is amplified by ε^{−1/2} = 1e4, an
        // error of about δ·‖g‖·ε^{−1/2} in any implementation (the oracle's too), so larger
        // gradients would measure the conditioning rather than the method.
        let grads = gradients(b, m, 15, 0.0, 2);
        // Exact full-matrix Adagrad per column: −(Σ g gᵀ + εI)^{−1/2} g.
        let mut opt = BlockAdam::<f64>::new(&config, b, m).unwrap();
        assert!(opt.first_moment().is_none());
        let mut sums = vec![vec![vec![0.0; b]; b]; m];
        let mut dir = Mat::<f64>::zeros(b, m);
        let mut worst = 0.0f64;
        for g in &grads {
            opt.precondition(to_mat::<f64>(g).as_ref(), dir.as_mut())
                .unwrap();
            let expected: Vec<Vec<f64>> = (0..m)
                .map(|i| {
                    for r in 0..b {
                        for c in 0..b {
                            sums[i][r][c] += g[i][r] * g[i][c];
                        }
                    }
                    inv_root_apply(&sums[i], config.eps, &g[i])
                })
                .collect();
            worst = worst.max(max_chunk_rel_err(dir.as_ref(), &expected, b));
        }
        println!("full-matrix Adagrad: max rel err {worst:.3e}");
        assert!(worst <= 1e-9, "error {worst}");
    }

    #[test]
    fn unit_blocks_are_adam_with_eps_inside_the_root() {
        let (b, m) = (6, 4);
        let config = adam_config(1);
        let grads = gradients(b, m, 12, 2.0, 3);
        let mut opt = BlockAdam::<f64>::new(&config, b, m).unwrap();
        let mut first = vec![vec![0.0; b]; m];
        let mut second = vec![vec![0.0; b]; m];
        let mut dir = Mat::<f64>::zeros(b, m);
        let mut worst = 0.0f64;
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            opt.precondition(to_mat::<f64>(g).as_ref(), dir.as_mut())
                .unwrap();
            for i in 0..m {
                for r in 0..b {
                    first[i][r] = 0.9 * first[i][r] + 0.1 * g[i][r];
                    second[i][r] = 0.999 * second[i][r] + (1.0 - 0.999) * g[i][r] * g[i][r];
                    let mhat = first[i][r] / (1.0 - 0.9f64.powi(t));
                    let vhat = second[i][r] / (1.0 - 0.999f64.powi(t));
                    let expected = -mhat / (vhat + 1e-8).sqrt();
                    worst = worst.max((dir[(r, i)] - expected).abs() / expected.abs());
                }
            }
        }
        println!("block size 1 vs Adam: max elementwise rel err {worst:.3e}");
        assert!(worst <= 1e-12, "error {worst}");
    }

    #[test]
    fn ragged_last_chunk_matches_oracle_and_bad_configs_are_rejected() {
        // b = 10, s = 4: chunks of 4, 4 and 2 rows.
        let (b, m) = (10, 5);
        let config = adam_config(4);
        let opt = BlockAdam::<f64>::new(&config, b, m).unwrap();
        assert_eq!(opt.chunks_per_column(), 3);
        assert_eq!(opt.second_moment(0, 0).nrows(), 4);
        assert_eq!(opt.second_moment(m - 1, 1).ncols(), 4);
        assert_eq!(opt.second_moment(m - 1, 2).nrows(), 2);
        assert_eq!(opt.second_moment(m - 1, 2).ncols(), 2);
        assert_eq!(opt.state_bytes(), (m * (2 * 16 + 4) + b * m) * 8);
        // Unit-scale gradients, as in `full_block_without_decay_is_full_matrix_adagrad`: with
        // step scales over 10^±2 the full 4-row chunks reach cond(V̂ + εI) ≈ 1e11 in their
        // rank-deficient first steps, where any f64 method (the oracle's too) is only good to
        // about 2^-53·cond, so the 1e-9 bound would measure the seed rather than the method.
        let grads = gradients(b, m, 20, 0.0, 7);
        let err = run_against_oracle::<f64>(&config, &grads);
        assert_eq!(err.len(), grads.len() * m * 3);
        let forward = max_of(&err, |e| e.forward);
        let residual = max_of(&err, |e| e.residual);
        // The ragged chunks alone (every third chunk).
        let ragged: Vec<&ChunkError> = err.iter().skip(2).step_by(3).collect();
        let forward_last = ragged.iter().map(|e| e.forward).fold(0.0, f64::max);
        let residual_last = ragged.iter().map(|e| e.residual).fold(0.0, f64::max);
        println!(
            "ragged (b = 10, s = 4) f64: max chunk forward rel err {forward:.3e}, residual \
             {residual:.3e}; last chunk only: forward {forward_last:.3e}, residual \
             {residual_last:.3e}"
        );
        assert!(forward <= 1e-9, "f64 forward error {forward}");
        assert!(residual <= 1e-12, "f64 residual {residual}");

        // A block larger than b is one chunk of b rows.
        let one = BlockAdam::<f32>::new(&adam_config(12), 8, 3).unwrap();
        assert_eq!(one.chunks_per_column(), 1);
        assert_eq!(one.second_moment(2, 0).nrows(), 8);

        let err = BlockAdam::<f32>::new(&adam_config(0), 12, 3).unwrap_err();
        assert!(
            matches!(
                err,
                PrecondError::InvalidConfig {
                    field: "block_size",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(BlockAdam::<f32>::new(&adam_config(12), 12, 3).is_ok());
        for (config, field) in [
            (
                BlockAdamConfig {
                    beta1: 1.0,
                    ..adam_config(4)
                },
                "beta1",
            ),
            (
                BlockAdamConfig {
                    beta2: 0.0,
                    ..adam_config(4)
                },
                "beta2",
            ),
            (
                BlockAdamConfig {
                    eps: 0.0,
                    ..adam_config(4)
                },
                "eps",
            ),
            (
                BlockAdamConfig {
                    eps: f64::INFINITY,
                    ..adam_config(4)
                },
                "eps",
            ),
        ] {
            let err = config.validate().unwrap_err();
            assert!(
                matches!(err, PrecondError::InvalidConfig { field: f, .. } if f == field),
                "{err:?}"
            );
        }
    }

    #[test]
    fn wrong_shapes_are_rejected() {
        let mut opt = BlockAdam::<f64>::new(&adam_config(4), 12, 5).unwrap();
        let mut dir = Mat::<f64>::zeros(12, 5);
        let err = opt
            .precondition(Mat::<f64>::zeros(12, 4).as_ref(), dir.as_mut())
            .unwrap_err();
        assert!(matches!(err, PrecondError::ShapeMismatch { .. }), "{err:?}");
        let mut small = Mat::<f64>::zeros(8, 5);
        let err = opt
            .precondition(Mat::<f64>::zeros(12, 5).as_ref(), small.as_mut())
            .unwrap_err();
        assert!(matches!(err, PrecondError::ShapeMismatch { .. }), "{err:?}");
        assert_eq!(opt.steps(), 0);
    }

    #[test]
    fn non_finite_gradient_leaves_state_unchanged() {
        let (b, m) = (12, 5);
        let config = adam_config(4);
        let grads = gradients(b, m, 6, 2.0, 4);
        let mut a = BlockAdam::<f64>::new(&config, b, m).unwrap();
        let mut fresh = BlockAdam::<f64>::new(&config, b, m).unwrap();
        let mut da = Mat::<f64>::zeros(b, m);
        let mut df = Mat::<f64>::zeros(b, m);
        for g in &grads[..3] {
            a.precondition(to_mat::<f64>(g).as_ref(), da.as_mut())
                .unwrap();
            fresh
                .precondition(to_mat::<f64>(g).as_ref(), df.as_mut())
                .unwrap();
        }
        let mut bad = to_mat::<f64>(&grads[3]);
        bad[(5, 2)] = f64::NAN;
        let err = a.precondition(bad.as_ref(), da.as_mut()).unwrap_err();
        assert_eq!(
            err,
            PrecondError::NonFiniteGradient {
                step: 4,
                param: None
            }
        );
        assert_eq!(a.steps(), 3);
        for g in &grads[3..] {
            a.precondition(to_mat::<f64>(g).as_ref(), da.as_mut())
                .unwrap();
            fresh
                .precondition(to_mat::<f64>(g).as_ref(), df.as_mut())
                .unwrap();
            assert_eq!(da, df);
        }
        assert_eq!(a.steps(), fresh.steps());
    }

    #[test]
    fn failed_eigendecomposition_leaves_state_unchanged() {
        // 1e20² overflows f32: the statistics become infinite and the step must fail.
        let (b, m) = (8, 3);
        let config = adam_config(4);
        let grads = gradients(b, m, 4, 2.0, 5);
        let mut a = BlockAdam::<f32>::new(&config, b, m).unwrap();
        let mut fresh = BlockAdam::<f32>::new(&config, b, m).unwrap();
        let mut da = Mat::<f32>::zeros(b, m);
        let mut df = Mat::<f32>::zeros(b, m);
        for g in &grads[..2] {
            a.precondition(to_mat::<f32>(g).as_ref(), da.as_mut())
                .unwrap();
            fresh
                .precondition(to_mat::<f32>(g).as_ref(), df.as_mut())
                .unwrap();
        }
        let mut huge = to_mat::<f32>(&grads[2]);
        huge[(1, 1)] = 1e20;
        let err = a.precondition(huge.as_ref(), da.as_mut()).unwrap_err();
        assert!(
            matches!(err, PrecondError::LinalgFailure { step: 3, .. }),
            "{err:?}"
        );
        assert_eq!(a.steps(), 2);
        for g in &grads[2..] {
            a.precondition(to_mat::<f32>(g).as_ref(), da.as_mut())
                .unwrap();
            fresh
                .precondition(to_mat::<f32>(g).as_ref(), df.as_mut())
                .unwrap();
            assert_eq!(da, df);
        }
    }

    #[test]
    fn state_bytes_counts_blocks_and_first_moment() {
        let (b, m) = (1000, 784);
        let opt = BlockAdam::<f32>::new(&adam_config(10), b, m).unwrap();
        assert_eq!(opt.state_bytes(), (784 * 1000 * 10 + 1000 * 784) * 4);
        let no_momentum = BlockAdam::<f64>::new(
            &BlockAdamConfig {
                beta1: 0.0,
                ..adam_config(4)
            },
            12,
            5,
        )
        .unwrap();
        assert_eq!(no_momentum.state_bytes(), 5 * 12 * 4 * 8);
        // The MNIST autoencoder's first layer, (b, m) = (784, 1000) with the paper's block 10:
        // 78 chunks of 10 rows and one of 4 per column.
        let (b, m) = (784, 1000);
        let ragged = BlockAdam::<f32>::new(&adam_config(10), b, m).unwrap();
        assert_eq!(ragged.chunks_per_column(), 79);
        assert_eq!(ragged.second_moment(999, 78).nrows(), 4);
        assert_eq!(
            ragged.state_bytes(),
            (1000 * (78 * 100 + 16) + 784 * 1000) * 4
        );
    }

    #[test]
    fn serde_round_trip_continues_bitwise() {
        let (b, m) = (12, 5);
        let config = adam_config(4);
        let grads = gradients(b, m, 8, 2.0, 6);
        let mut a = BlockAdam::<f32>::new(&config, b, m).unwrap();
        let mut da = Mat::<f32>::zeros(b, m);
        for g in &grads[..4] {
            a.precondition(to_mat::<f32>(g).as_ref(), da.as_mut())
                .unwrap();
        }
        let saved = serde_json::to_string(&a).unwrap();
        let mut restored: BlockAdam<f32> = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored.steps(), 4);
        assert_eq!(restored.config(), &config);
        let mut db = Mat::<f32>::zeros(b, m);
        for g in &grads[4..] {
            let g = to_mat::<f32>(g);
            a.precondition(g.as_ref(), da.as_mut()).unwrap();
            restored.precondition(g.as_ref(), db.as_mut()).unwrap();
            assert_eq!(da, db);
        }
        let config_json = serde_json::to_string(&config).unwrap();
        let back: BlockAdamConfig = serde_json::from_str(&config_json).unwrap();
        assert_eq!(back, config);
        // Missing fields take the defaults, except the eigensolver: faer, the kernel of the
        // states saved before the choice existed.
        let defaulted: BlockAdamConfig = serde_json::from_str(r#"{"block_size": 4}"#).unwrap();
        assert_eq!(
            defaulted,
            BlockAdamConfig {
                eigensolver: BlockEigensolver::Faer,
                ..adam_config(4)
            }
        );
    }

    /// Directions of every chunk from the oracle's moments after its last step: the root of
    /// V̂_t, except chunk (0, 0) when `kept` gives the previous V̂ (the failed chunk).
    fn oracle_direction(oracle: &Oracle, kept: Option<&Vec<Vec<f64>>>) -> Vec<Vec<f64>> {
        oracle
            .last
            .iter()
            .enumerate()
            .map(|(i, chunks)| {
                chunks
                    .iter()
                    .enumerate()
                    .flat_map(|(j, (vhat, mhat))| {
                        let v = match kept {
                            Some(prev) if (i, j) == (0, 0) => prev,
                            _ => vhat,
                        };
                        inv_root_apply(v, oracle.eps, mhat)
                    })
                    .collect()
            })
            .collect()
    }

    /// ε large enough that f32 directions are well conditioned from step 1.
    /// On faer's per-chunk path, where each chunk is one factorization call (the batched
    /// path recovers a failed lane with faer: `batched_lane_failure_falls_back_to_faer`).
    fn conditioned_config() -> BlockAdamConfig {
        BlockAdamConfig {
            eps: 1e-2,
            eigensolver: BlockEigensolver::Faer,
            ..adam_config(3)
        }
    }

    /// A lane of the batched eigensolver that fails is recomputed by faer: that chunk's
    /// direction is bitwise the faer path's, every other chunk's the batched run's, nothing is
    /// counted, and the two paths agree to f32 rounding.
    #[test]
    fn batched_lane_failure_falls_back_to_faer() {
        on_one_thread(|| {
            let (b, m) = (10, 11);
            let batched = adam_config(4);
            let faer = BlockAdamConfig {
                eigensolver: BlockEigensolver::Faer,
                ..batched.clone()
            };
            // More steps than rows per chunk: V has full rank (no ε^{−1/2}-amplified round-off).
            let grads = gradients(b, m, 9, 1.0, 31);
            let run = |config: &BlockAdamConfig, fail_after: Option<usize>| {
                let mut st = BlockAdam::<f32>::new(config, b, m).unwrap();
                let mut u = Mat::<f32>::zeros(b, m);
                for (s, g) in grads.iter().enumerate() {
                    let last = s + 1 == grads.len();
                    match fail_after {
                        Some(skip) if last => inject_failures_after(skip, FaultKind::Both, 1),
                        _ => inject_failures(FaultKind::Both, 0),
                    }
                    st.precondition(to_mat::<f32>(g).as_ref(), u.as_mut())
                        .unwrap();
                    if last {
                        assert_eq!(injected_remaining(), 0);
                    }
                    inject_failures(FaultKind::Both, 0);
                }
                (st, u)
            };
            let (_, plain) = run(&batched, None);
            let (_, reference) = run(&faer, None);
            let err = (plain.as_ref() - reference.as_ref()).norm_max() / reference.norm_max();
            assert!(err <= 1e-5, "{err:e}");
            assert!(plain != reference, "the paths differ in rounding");
            // The third lane of the first pack (column 2, chunk rows 0..4).
            let (st, u) = run(&batched, Some(2));
            assert_eq!(st.linalg_health(), LinalgHealth::default());
            for i in 0..m {
                for r in 0..b {
                    let want = if i == 2 && r < 4 {
                        reference[(r, i)]
                    } else {
                        plain[(r, i)]
                    };
                    assert_eq!(u[(r, i)], want, "({r}, {i})");
                }
            }
        });
    }

    /// Block Adam in `T` with chunk (0, 0)'s eigendecomposition failing in both precisions at
    /// step `fail_at` (injected): that chunk applies the previous root, (V̂_{t−1} + εI)^{−1/2}
    /// (ε^{−1/2} I at t = 1), to m̂_t, checked against the Jacobi oracle; the moments absorb the
    /// gradient exactly as in an untouched twin; the step is counted, and the next one resets
    /// the run. Returns the worst relative error against the oracle.
    fn previous_root_case<T: Scalar>(fail_at: usize) -> f64 {
        let (b, m) = (7, 2);
        let config = conditioned_config();
        let grads = gradients(b, m, 5, 0.5, 21);
        let mut state = BlockAdam::<T>::new(&config, b, m).unwrap();
        let mut twin = state.clone();
        let mut oracle = Oracle::new(&config, b, m);
        let mut worst = 0.0f64;
        for (s, g) in grads.iter().enumerate() {
            let t = s + 1;
            // V̂_{t−1} of chunk (0, 0): zero before the first step.
            let prev = oracle
                .last
                .first()
                .and_then(|c| c.first())
                .map_or_else(|| vec![vec![0.0; 3]; 3], |c| c.0.clone());
            oracle.step(g);
            let failed = t == fail_at;
            let want = oracle_direction(&oracle, failed.then_some(&prev));
            let gt = to_mat::<T>(g);
            let (mut u, mut w) = (Mat::<T>::zeros(b, m), Mat::<T>::zeros(b, m));
            inject_failures(FaultKind::Both, usize::from(failed));
            state.precondition(gt.as_ref(), u.as_mut()).unwrap();
            assert_eq!(injected_remaining(), 0);
            twin.precondition(gt.as_ref(), w.as_mut()).unwrap();
            worst = worst.max(max_chunk_rel_err(u.as_ref(), &want, 3));
            assert!((0..m).all(|i| (0..b).all(|r| u[(r, i)].is_finite())));
            if failed {
                // Not vacuous: the failed chunk moved differently from the twin's.
                let diff = (0..3).fold(0.0f64, |a, r| a.max((u[(r, 0)] - w[(r, 0)]).f64().abs()));
                assert!(diff > 1e-3 * w[(0, 0)].f64().abs(), "step {t}: {diff:e}");
                // The other chunks are untouched by the failure.
                assert_eq!(u.as_ref().subrows(3, 4), w.as_ref().subrows(3, 4));
                assert_eq!(u.col(1), w.col(1));
            } else {
                assert_eq!(u, w, "step {t}");
            }
            for i in 0..m {
                for j in 0..state.chunks_per_column() {
                    assert_eq!(state.second_moment(i, j), twin.second_moment(i, j));
                }
            }
            assert_eq!(state.first_moment(), twin.first_moment());
            let health = state.linalg_health();
            assert_eq!(
                (health.failures, health.consecutive),
                (u64::from(t >= fail_at), u64::from(failed)),
                "step {t}"
            );
        }
        worst
    }

    #[test]
    fn failed_root_in_both_precisions_uses_the_previous_root() {
        on_one_thread(|| {
            for fail_at in [1, 3] {
                let err64 = previous_root_case::<f64>(fail_at);
                let err32 = previous_root_case::<f32>(fail_at);
                println!("fail at {fail_at}: max rel err f64 {err64:.2e}, f32 {err32:.2e}");
                assert!(err64 <= 1e-10, "f64 {err64:e}");
                assert!(err32 <= 1e-4, "f32 {err32:e}");
            }
        });
    }

    /// An f32 eigendecomposition failure (every chunk of step 3) retried in f64 gives the
    /// direction of an untouched twin within f32 rounding, and is not counted.
    #[test]
    fn f32_root_failure_is_retried_in_f64() {
        on_one_thread(|| {
            let (b, m) = (7, 2);
            let config = conditioned_config();
            let grads = gradients(b, m, 5, 0.5, 22);
            let mut state = BlockAdam::<f32>::new(&config, b, m).unwrap();
            let mut twin = state.clone();
            let chunks = m * state.chunks_per_column();
            for (s, g) in grads.iter().enumerate() {
                let gt = to_mat::<f32>(g);
                let (mut u, mut w) = (Mat::<f32>::zeros(b, m), Mat::<f32>::zeros(b, m));
                inject_failures(FaultKind::F32Only, if s == 2 { 100 } else { 0 });
                state.precondition(gt.as_ref(), u.as_mut()).unwrap();
                if s == 2 {
                    // Every chunk's f32 attempt failed, and nothing else was called.
                    assert_eq!(injected_remaining(), 100 - chunks);
                    inject_failures(FaultKind::F32Only, 0);
                }
                twin.precondition(gt.as_ref(), w.as_mut()).unwrap();
                let err = (u.as_ref() - w.as_ref()).norm_max() / w.norm_max();
                assert!(err <= 1e-5, "step {}: {err:e}", s + 1);
            }
            assert_eq!(state.linalg_health(), LinalgHealth::default());
        });
    }
}
