//! The shared-basis block low-rank preconditioner of Yen, Duvvuri, Dhillon and Hsieh
//! (NeurIPS 2023), Algorithm 1, for one layer seen as a (b, m) matrix whose columns are the
//! blocks (b = d_in weights into each of m = d_out output neurons).
//!
//! Every block's statistics Σ_t g_i g_iᵀ are approximated as B R_i Bᵀ + ρ_i I with one
//! orthonormal basis B (b×k) shared by the layer, a k×k symmetric PSD R_i per block and a
//! scalar lost mass ρ_i. One step (NOTES §2):
//!
//! 1. M_i = B R_i Bᵀ + g_i g_iᵀ, never formed.
//! 2. B ← randomized SVD of A = Σ_i M_i M_iᵀ (eq. 5), warm-started at the previous basis, with
//!    A·Y by the factored formula of §2.2: A Y = B S BᵀY + P GᵀY + G PᵀY + G diag(|g_i|²) GᵀY.
//! 3. R̃_i = B_tᵀ M_i B_t = Q R_i Qᵀ + c_i c_iᵀ with Q = B_tᵀ B_{t−1}, c_i = B_tᵀ g_i.
//! 4. R_i = R̃_i − λ_min(R̃_i) I (frequent-directions shrink).
//! 5. ρ_i += ‖M_i − B_t R_i B_tᵀ‖₂.
//! 6. u_i = −(B R_i Bᵀ + (ρ_i + ε) I)^{−1/2} g_i, computed as eq. 6.
//!
//! Decisions where the paper is silent (marked "(ours)" in NOTES and the README):
//! k = min(k, b); the first step starts the randomized SVD from a seeded Gaussian matrix;
//! with oversampling p > 0 the top k directions are chosen by Rayleigh–Ritz on Yᵀ A Y;
//! ρ's residual lives in span(B_{t−1}, B_t, g_i), so its norm is computed on a
//! (2k+1)-dimensional Gram representation (below) at O(k²) per block per power-iteration step;
//! ε must be > 0; with β2 < 1 the statistics are an exponential moving average
//! (M_i = β2 B R_i Bᵀ + (1−β2) g_i g_iᵀ, ρ_i ← β2 ρ_i + ‖·‖), and β2 = 1 is Algorithm 1's sum.
//!
//! **Lost mass in orthonormal coordinates.** The residual M_i − B_t R_i B_tᵀ lives in
//! span(B_{t−1}, B_t, g_i). One orthonormal W = [B_t, B_⊥] of span(B_t, B_{t−1}) is built per
//! layer (B_⊥ from the SVD of the part of B_{t−1} outside B_t, directions with singular value
//! below 10·√b·ε dropped), and each g_i = B_t c_i + B_⊥ h_i + ν_i w_i with ν_i the norm of the
//! rest (one GEMM for the layer). In those (k + r + 1) coordinates the residual is
//! E_i = L (β2 R_i^{old}) Lᵀ ⊕ 0 + e_i e_iᵀ − R_i ⊕ 0 with L = [Q; B_⊥ᵀ B_{t−1}] and
//! e_i = [c_i; h_i; ν_i], so a power-iteration step costs O(k²) per block, never O(b k).
//! The exact mode forms E_i and takes its eigenvalues.
//!
//! **Per-block kernel.** Steps 4 and 6 need λ_min(R̃_i) and one spectral function of R̃_i
//! applied to c_i, never the eigenvectors: by default eight blocks at a time go through
//! [`crate::batched_eigen`] in SIMD lanes ([`SharedBasisConfig::eigensolver`]), R_i is formed
//! as R̃_i − λ_min I, and a block the pack cannot solve is recomputed by faer.
//!
//! The step is transactional: new basis, coefficients and ρ are built in workspaces and swapped
//! in only when the whole step succeeded, so an error leaves the state as it was.
//!
//! **Linear-algebra failures** (the policy of [`crate::optimizer`]). Every factorization of a
//! step (the QR of the randomized SVD, the Rayleigh–Ritz eigendecomposition, the SVD and QR of
//! B_⊥, the per-block eigendecompositions of R̃_i and of the exact-mode residual) goes through
//! [`crate::linalg`], which retries an f32 failure in f64 (input converted to f64, result rounded
//! back); a retry that succeeds is not counted. When a factorization still fails (no
//! convergence in f64 too, or a non-finite result from a finite input) the whole layer keeps
//! its previous state: B, every R_i and every ρ_i stay those of step t − 1. They *are* the
//! statistics, so this step's gradient is dropped from them. The direction is then computed
//! from the kept state by eq. 6, u_i = −(B R_i Bᵀ + (ρ_i + ε) I)^{−1/2} g_i (one k × k
//! eigendecomposition of each kept R_i; before any basis exists, u = −ε^{−1/2} g), the step
//! counter advances, and [`Preconditioner::linalg_health`] counts the step (`failures`, and
//! `consecutive`, which a successful step resets). An overflow is not a kernel failure: a step
//! whose kernel input or new state holds ∞ or NaN (in f32 from |g| ≈ 1e19, where g gᵀ
//! overflows; A·Y, quartic in g, is computed pre-scaled by a power of two), or whose kept-state direction cannot be computed, is refused with
//! [`crate::PrecondError::LinalgFailure`] and changes nothing (nothing counted). Erroring after too
//! many failures in a row is [`crate::optimizer::ParamOptimizer`]'s job
//! ([`crate::OptimizerConfig::max_linalg_failures`]).

use crate::batched_eigen::{BlockEigensolver, EigenPack, Isa, LANES};
use crate::batched_power::{LaneNorm, ResidualPack};
use crate::error::{invalid, Result};
use crate::linalg::{
    all_finite, blocks_per_task, copy_columns, gemm, lower_finite_col_major, par_layer, symmetrize,
    symmetrize_col_major, thin_q, thin_svd_left, KernelError, SymEig,
};
use crate::preconditioner::{check_finite, check_shapes, check_view, LinalgHealth, Preconditioner};
use crate::scalar::Scalar;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Mat, MatMut, MatRef, Par};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{ChiSquared, Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How the lost mass ρ_i of step 5 grows: its increment δ_i in ρ_i ← β2 ρ_i + s·δ_i, with
/// s = [`SharedBasisConfig::rho_scale`] and E_i = M_i − B_t R_i B_tᵀ the step's residual.
///
/// Algorithm 1 reads δ_i = ‖E_i‖₂ "by power iteration" and does not say how the iteration
/// starts or how long it runs. The first two variants are that norm (our reading: started
/// inside the residual's span, so it converges in a few steps); the next two are the other
/// readings the text admits (a random start in ℝ^b), which give a far smaller ρ; the last is
/// the frequent-directions increment. Every δ_i is ≥ 0 by construction, so with ε > 0 the
/// shift ρ_i + ε of eq. 6 is always > 0.
///
/// What each keeps (β2 = 1, tested in `shared_basis_tests.rs`):
/// - `PowerIteration`, `Exact`: domination B R_i Bᵀ + ρ_i I ⪰ Σ_t g_i g_iᵀ (exactly for
///   `Exact`, up to the iteration's undershoot for `PowerIteration`), hence Theorem 1's regret
///   bound; full rank = block Adagrad.
/// - `RandomStart`, `Rayleigh`: δ_i ≤ ‖E_i‖₂ always (an underestimate of the paper's norm), so
///   ρ_i never exceeds the exact reading's for the same iterates; no domination guarantee.
/// - `FrequentDirections`: full rank = block Adagrad exactly, and mass conservation
///   tr(B R_i Bᵀ) + ρ_i ≤ Σ_t |g_i|² (the ridge never holds more than the gradients brought),
///   which gives Theorem 2's form of bound, Σ_i ρ_i^{1/2} ≤ (m Σ_i Tr H_i)^{1/2}; domination
///   can fail (the cross terms P g gᵀ (I − P) and the basis' rotation are not covered).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum RhoMode {
    /// δ_i = ‖E_i‖₂ by power iteration with this many iterations, started from the gradient's
    /// coordinates in span(B_t, B_{t−1}, g_i) plus a constant vector (the reading kept by the
    /// `paper` preset). It can only undershoot the norm, and in practice converges.
    PowerIteration(usize),
    /// δ_i = ‖E_i‖₂ exactly, by small symmetric eigendecompositions (tests and audits; O(k³)
    /// per block).
    Exact,
    /// δ_i = power-iteration estimate of ‖E_i‖₂ after this many steps from a seeded Gaussian
    /// start x ∈ ℝ^b (seeded by the config's seed, the step and the block): the estimate
    /// |E x_{n−1}| / |x_{n−1}|. One step gives about ‖E_i‖_F / √b.
    RandomStart(usize),
    /// δ_i = |xᵀ E_i x| / xᵀx, the Rayleigh quotient at a seeded Gaussian start x ∈ ℝ^b.
    Rayleigh,
    /// δ_i = max(λ_min(R̃_i), 0) + |(I − B_t B_tᵀ) g'_i|², what the shrink removed plus the
    /// gradient's energy outside the new basis (g'_i = √(1−β2)·g_i for β2 < 1): second order
    /// in what the basis misses, where ‖E_i‖₂ is first order.
    FrequentDirections,
}

impl RhoMode {
    /// Whether the increment is the residual's norm (by either method), the reading under which
    /// domination (Theorem 1) holds.
    pub fn dominates(self) -> bool {
        matches!(self, RhoMode::PowerIteration(_) | RhoMode::Exact)
    }
}

/// Hyperparameters of Algorithm 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedBasisConfig {
    /// Rank k of the shared basis (capped at b). Paper: 32.
    pub rank: usize,
    /// Oversampling p of the randomized SVD. Paper: 0.
    pub oversample: usize,
    /// Power iterations of the randomized SVD per step. Paper: 1.
    pub power_iters: usize,
    /// How ρ is measured. Default: 10 power iterations (ours).
    pub rho: RhoMode,
    /// ε added to ρ_i before the inverse square root (eq. 6). Must be > 0. Default 1e-6 (ours).
    pub eps: f64,
    /// Statistics decay β2 in (0, 1]: 1 is the plain sum of Algorithm 1 (default).
    pub beta2: f64,
    /// Seed of the Gaussian start (and oversampling columns) of the randomized SVD, and of the
    /// random starts of [`RhoMode::RandomStart`] and [`RhoMode::Rayleigh`].
    pub seed: u64,
    /// Multiplier s ≥ 0 on every increment of ρ (ρ_i ← β2 ρ_i + s·δ_i). 1 is Algorithm 1
    /// (default; the product is then exact, so results are bitwise those without it); 0 leaves
    /// ε as the only ridge. Absent from a serialized config (states saved before it existed),
    /// it is 1.
    #[serde(default = "unit_scale")]
    pub rho_scale: f64,
    /// The kernel of the per-block eigenproblems (steps 4 and 6): [`BlockEigensolver::Batched`]
    /// (default) or faer one block at a time; the same mathematics, rounding apart. Absent from
    /// a serialized config (states saved before it existed), it is faer, so such a state
    /// continues bit for bit.
    #[serde(default = "BlockEigensolver::legacy")]
    pub eigensolver: BlockEigensolver,
}

/// The ρ multiplier of [`SharedBasisConfig::tuned`] (and of the `shared-basis` preset of the
/// command line).
pub const TUNED_RHO_SCALE: f64 = 1e-3;

fn unit_scale() -> f64 {
    1.0
}

impl Default for SharedBasisConfig {
    fn default() -> Self {
        Self {
            rank: 32,
            oversample: 0,
            power_iters: 1,
            rho: RhoMode::PowerIteration(10),
            eps: 1e-6,
            beta2: 1.0,
            seed: 0,
            rho_scale: 1.0,
            eigensolver: BlockEigensolver::Batched,
        }
    }
}

impl SharedBasisConfig {
    /// Algorithm 1 exactly as its text reads (the same as [`Default`]): ρ increments
    /// ‖M_i − B R_i Bᵀ‖₂ by 10 power iterations, multiplier 1. Keeps domination (Theorem 1).
    pub fn paper() -> Self {
        Self::default()
    }

    /// The variant that measured best (README, "The lost-mass ridge"): the paper's settings
    /// with every ρ increment multiplied by [`TUNED_RHO_SCALE`]. The ridge then no longer swamps
    /// the statistics. Given up: domination (Theorem 1), and exactness at full rank (there
    /// B R_i Bᵀ + ρ_i I = H_i − (1 − s)·Σ_t λ_min,t I, block Adagrad with a lowered ridge).
    pub fn tuned() -> Self {
        Self {
            rho_scale: TUNED_RHO_SCALE,
            ..Self::default()
        }
    }

    /// Checks every field; returns a clear error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(invalid("rank", self.rank, "must be at least 1"));
        }
        if self.power_iters == 0 {
            return Err(invalid(
                "power_iters",
                self.power_iters,
                "must be at least 1",
            ));
        }
        if let RhoMode::PowerIteration(0) | RhoMode::RandomStart(0) = self.rho {
            return Err(invalid("rho_iters", 0, "must be at least 1"));
        }
        if !(self.rho_scale.is_finite() && self.rho_scale >= 0.0) {
            return Err(invalid(
                "rho_scale",
                self.rho_scale,
                "must be finite and >= 0",
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        if !(self.beta2 > 0.0 && self.beta2 <= 1.0) {
            return Err(invalid("beta2", self.beta2, "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// One block's line of [`SharedBasis::ridge_report`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockRidge {
    /// ρ_i.
    pub lost_mass: f64,
    /// λ_max(R_i).
    pub top: f64,
    /// How many of R_i's k eigenvalues exceed ρ_i.
    pub above_ridge: usize,
}

/// Layer-sized scratch matrices, reused across steps (not part of the saved state).
struct Workspace<T: Scalar> {
    /// [P | G'] (b × 2m): P = B_{t−1} R_i B_{t−1}ᵀ g_i next to the (scaled) gradient.
    pg: Mat<T>,
    /// B_{t−1}ᵀ G' (k × m), the a_i.
    coef_old: Mat<T>,
    /// R_i a_i (k × m).
    rc: Mat<T>,
    /// Σ R_i R_i (k × k).
    s: Mat<T>,
    /// [PᵀY; G'ᵀY] (2m × k') and the right factor [G'ᵀY; PᵀY + diag|g|² G'ᵀY].
    pgy: Mat<T>,
    right: Mat<T>,
    /// Bᵀ Y (k × k') and S Bᵀ Y.
    by: Mat<T>,
    sby: Mat<T>,
    /// A Y (b × k').
    ay: Mat<T>,
    /// B_tᵀ G (k × m), the c_i (unscaled gradient).
    coef_new: Mat<T>,
    /// Q = B_tᵀ B_{t−1} (k × k).
    overlap: Mat<T>,
    /// L = [Q; B_⊥ᵀ B_{t−1}] ((k + r) × k): the old basis in new coordinates.
    lift: Mat<T>,
    /// [B_t | B_⊥] (b × (k + r)).
    wide_basis: Mat<T>,
    /// Wᵀ G' ((k + r) × m): c'_i and h'_i.
    wide_coef: Mat<T>,
    /// ν_i, the norm of the part of g'_i outside span(W).
    outside: Vec<T>,
    /// Per-block coefficients of the direction (k × m, column-major).
    dir_coef: Vec<T>,
    /// Per-block (ρ_i + ε)^{−1/2}.
    iso_scale: Vec<T>,
    /// |g_i|² of the scaled gradient.
    sq_norms: Vec<T>,
    /// The exponent e of A·Y's power-of-two pre-scaling (see [`ay_exponent`]).
    ay_exponent: i32,
    /// 2^{−2e}·[R_1 … R_m] (k × mk): the coefficients as S is formed from them.
    scaled_coeffs: Mat<T>,
    /// The batched path's β2 Q R_i Qᵀ for every block (k × mk, block i in columns
    /// ik..(i+1)k), and the block transposes of β2 Q R_i on the way.
    rotated: Mat<T>,
    flipped: Mat<T>,
    /// New state, swapped in at the end of a successful step.
    new_basis: Vec<T>,
    new_coeffs: Vec<T>,
    new_lost_mass: Vec<T>,
}

impl<T: Scalar> Default for Workspace<T> {
    fn default() -> Self {
        let empty = || Mat::zeros(0, 0);
        Self {
            pg: empty(),
            coef_old: empty(),
            rc: empty(),
            s: empty(),
            pgy: empty(),
            right: empty(),
            by: empty(),
            sby: empty(),
            ay: empty(),
            coef_new: empty(),
            overlap: empty(),
            dir_coef: Vec::new(),
            lift: empty(),
            wide_basis: empty(),
            wide_coef: empty(),
            outside: Vec::new(),
            iso_scale: Vec::new(),
            sq_norms: Vec::new(),
            ay_exponent: 0,
            scaled_coeffs: empty(),
            rotated: empty(),
            flipped: empty(),
            new_basis: Vec::new(),
            new_coeffs: Vec::new(),
            new_lost_mass: Vec::new(),
        }
    }
}

/// State of one layer: basis B (b×k), coefficients R_i (k×k each), lost mass ρ_i.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct SharedBasis<T: Scalar> {
    config: SharedBasisConfig,
    rows: usize,
    blocks: usize,
    rank: usize,
    sketch: usize,
    step: u64,
    /// B, column-major b × k; all zero before the first step.
    basis: Vec<T>,
    /// R_i, column-major k × k each, block i at `i·k·k`.
    coeffs: Vec<T>,
    /// ρ_i.
    lost_mass: Vec<T>,
    /// Steps that kept the previous state after a failed factorization (absent from states
    /// saved before it existed: zeros).
    #[serde(default)]
    linalg: LinalgHealth,
    #[serde(skip)]
    work: Workspace<T>,
}

/// Why a step could not build its new state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepFault {
    /// A factorization failed (in f64 too): the previous state is kept.
    Kernel(&'static str),
    /// An overflow (non-finite kernel input or result): the step is refused.
    Refuse(&'static str),
}

impl StepFault {
    fn of(kernel: &'static str, e: KernelError) -> Self {
        match e {
            KernelError::Failed => StepFault::Kernel(kernel),
            KernelError::NonFiniteInput => StepFault::Refuse(kernel),
        }
    }
}

/// What the per-block pass did for one block (ordered: a worse outcome is larger).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum BlockOutcome {
    Done,
    /// An eigendecomposition failed (in f64 too).
    KernelFailed,
    /// An eigendecomposition's input was not finite.
    Overflow,
}

impl<T: Scalar> Clone for SharedBasis<T> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            rows: self.rows,
            blocks: self.blocks,
            rank: self.rank,
            sketch: self.sketch,
            step: self.step,
            basis: self.basis.clone(),
            coeffs: self.coeffs.clone(),
            lost_mass: self.lost_mass.clone(),
            linalg: self.linalg,
            work: Workspace::default(),
        }
    }
}

impl<T: Scalar> std::fmt::Debug for SharedBasis<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBasis")
            .field("rows", &self.rows)
            .field("blocks", &self.blocks)
            .field("rank", &self.rank)
            .field("step", &self.step)
            .field("linalg", &self.linalg)
            .finish_non_exhaustive()
    }
}

/// Read-only inputs of the per-block pass (steps 3–6).
struct BlockInputs<'a, T: Scalar> {
    k: usize,
    /// r: columns of B_⊥ (0 at the first step).
    extra: usize,
    has_basis: bool,
    decay: T,
    grad_scale: T,
    eps: T,
    rho: RhoMode,
    /// s of ρ_i ← β2 ρ_i + s·δ_i.
    rho_scale: T,
    /// b: the dimension of the random starts of [`RhoMode::RandomStart`] / [`RhoMode::Rayleigh`].
    rows: usize,
    /// Seed of this step's random starts (mixed with the block index).
    start_seed: u64,
    old_coeffs: &'a [T],
    old_lost_mass: &'a [T],
    overlap: MatRef<'a, T>,
    lift: MatRef<'a, T>,
    /// Wᵀ G' ((k + r) × m).
    wide_coef: MatRef<'a, T>,
    /// B_tᵀ G (k × m), unscaled.
    coef_new: MatRef<'a, T>,
    outside: &'a [T],
    /// The batched path's β2 Q R_i Qᵀ of every block (k × mk), formed by two layer GEMMs.
    rotated: Option<MatRef<'a, T>>,
}

/// Per-thread scratch of the per-block pass.
struct BlockScratch<T: Scalar> {
    tmp: Mat<T>,
    tilde: Mat<T>,
    eig: SymEig<T>,
    x: Vec<T>,
    y: Vec<T>,
    u: Vec<T>,
    v: Vec<T>,
    w: Vec<T>,
    exact: Option<(Mat<T>, SymEig<T>)>,
    /// The batched path's pack and one block's c_i.
    pack: Option<EigenPack<T>>,
    coefs: Vec<T>,
    /// The batched path's step 5 for [`RhoMode::PowerIteration`], the layer's lift loaded.
    residual: Option<ResidualPack<T>>,
}

impl<T: Scalar> SharedBasis<T> {
    /// New state for a (b, m) = (`rows`, `blocks`) parameter view.
    pub fn new(config: SharedBasisConfig, rows: usize, blocks: usize) -> Result<Self> {
        config.validate()?;
        check_view(rows, blocks)?;
        if T::of(config.eps) <= T::zero() {
            return Err(invalid(
                "eps",
                config.eps,
                "rounds to 0 in this precision: use a larger eps",
            ));
        }
        let rank = config.rank.min(rows);
        let sketch = rank.saturating_add(config.oversample).min(rows);
        Ok(Self {
            config,
            rows,
            blocks,
            rank,
            sketch,
            step: 0,
            basis: vec![T::zero(); rows * rank],
            coeffs: vec![T::zero(); blocks * rank * rank],
            lost_mass: vec![T::zero(); blocks],
            linalg: LinalgHealth::default(),
            work: Workspace::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SharedBasisConfig {
        &self.config
    }

    /// Effective rank k = min(rank, b).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The shared basis B (b × k).
    pub fn basis(&self) -> MatRef<'_, T> {
        MatRef::from_column_major_slice(&self.basis, self.rows, self.rank)
    }

    /// The coefficient matrix R_i of block `i` (k × k).
    pub fn coeffs(&self, i: usize) -> MatRef<'_, T> {
        let kk = self.rank * self.rank;
        MatRef::from_column_major_slice(&self.coeffs[i * kk..(i + 1) * kk], self.rank, self.rank)
    }

    /// The lost mass ρ_i of every block.
    pub fn lost_mass(&self) -> &[T] {
        &self.lost_mass
    }

    /// (b, m) this state was built for.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.blocks)
    }

    /// How the ridge compares with the low-rank statistics it is added to, per block: ρ_i, the
    /// eigenvalues of R_i and how many of them exceed ρ_i (the directions in which eq. 6 does
    /// more than scale g_i by (ρ_i + ε)^{−1/2}). One k × k eigendecomposition per block, in f64
    /// (a diagnostic, not part of a step). Errors only if one fails to converge.
    pub fn ridge_report(&self) -> Result<Vec<BlockRidge>> {
        let k = self.rank;
        let mut eig = SymEig::<f64>::new(k);
        (0..self.blocks)
            .map(|i| {
                let r = self.coeffs(i);
                let r64 = Mat::<f64>::from_fn(k, k, |a, b| r[(a, b)].f64());
                eig.decompose(r64.as_ref())
                    .map_err(|_| crate::PrecondError::LinalgFailure {
                        kernel: "ridge report eigendecomposition",
                        step: self.step,
                        consecutive: 0,
                    })?;
                let rho = self.lost_mass[i].f64();
                let eigenvalues: Vec<f64> = (0..k).map(|j| eig.value(j).max(0.0)).collect();
                let above = eigenvalues.iter().filter(|&&l| l > rho).count();
                Ok(BlockRidge {
                    lost_mass: rho,
                    top: eigenvalues.last().copied().unwrap_or(0.0),
                    above_ridge: above,
                })
            })
            .collect()
    }

    /// The share of `grad`'s energy inside the current basis, Σ_i |Bᵀ g_i|² / Σ_i |g_i|²: called
    /// with the *next* gradient before [`Preconditioner::precondition`], how much of it the
    /// basis built so far captures. 0 before the first step (no basis) or for a zero gradient.
    /// Errors on a gradient of the wrong shape.
    pub fn captured_energy(&self, grad: MatRef<'_, T>) -> Result<f64> {
        check_shapes(
            (grad.nrows(), grad.ncols()),
            (self.rows, self.blocks),
            self.rows,
            self.blocks,
        )?;
        let total: f64 = grad
            .col_iter()
            .map(|c| c.iter().map(|v| v.f64() * v.f64()).sum::<f64>())
            .sum();
        if total <= 0.0 || !self.has_basis() {
            return Ok(0.0);
        }
        let basis = Mat::<f64>::from_fn(self.rows, self.rank, |a, b| {
            self.basis[b * self.rows + a].f64()
        });
        let g = Mat::<f64>::from_fn(self.rows, self.blocks, |a, b| grad[(a, b)].f64());
        let coords = basis.transpose() * &g;
        Ok(coords.squared_norm_l2() / total)
    }

    fn ensure_workspace(&mut self) {
        let (b, m, k, kp) = (self.rows, self.blocks, self.rank, self.sketch);
        let w = &mut self.work;
        if w.pg.nrows() == b && w.pg.ncols() == 2 * m && w.ay.ncols() == kp {
            return;
        }
        w.pg = Mat::zeros(b, 2 * m);
        w.coef_old = Mat::zeros(k, m);
        w.rc = Mat::zeros(k, m);
        w.s = Mat::zeros(k, k);
        w.pgy = Mat::zeros(2 * m, kp);
        w.right = Mat::zeros(2 * m, kp);
        w.by = Mat::zeros(k, kp);
        w.sby = Mat::zeros(k, kp);
        w.ay = Mat::zeros(b, kp);
        w.coef_new = Mat::zeros(k, m);
        w.overlap = Mat::zeros(k, k);
        w.dir_coef = vec![T::zero(); k * m];
        w.outside = vec![T::zero(); m];
        w.iso_scale = vec![T::zero(); m];
        w.sq_norms = vec![T::zero(); m];
        w.scaled_coeffs = Mat::zeros(k, m * k);
        w.new_basis = vec![T::zero(); b * k];
        w.new_coeffs = vec![T::zero(); m * k * k];
        w.new_lost_mass = vec![T::zero(); m];
    }

    /// Whether a basis exists: B is orthonormal after any successful step and zero before
    /// the first one (which a failed first step leaves as it was).
    fn has_basis(&self) -> bool {
        self.basis.iter().any(|&v| v != T::zero())
    }

    /// 2^{−3e}·A·Y by the factored formula (NOTES §2 step 2), into `work.ay` (e =
    /// `work.ay_exponent`; the scale does not change the span the QR extracts).
    fn apply_a(&mut self, y: MatRef<'_, T>, has_basis: bool, decay: T) {
        let m = self.blocks;
        let k = self.rank;
        let w = &mut self.work;
        // [Pᵀ Y; G'ᵀ Y] in one GEMM over the concatenated [P | G'].
        gemm(
            w.pgy.as_mut(),
            false,
            w.pg.transpose(),
            y,
            T::one(),
            par_layer(),
        );
        // right = [G'ᵀY; PᵀY + diag(|g_i|²) G'ᵀY], so that [P | G'] · right = P G'ᵀY + G' PᵀY
        // + G' diag(|g_i|²) G'ᵀY.
        // Pre-scaled by 2^{−3e} (see `ay_exponent`): P holds 2^{−3e}·P already.
        let sq_scale = pow2::<T>(-3 * w.ay_exponent);
        let cols = y.ncols();
        for j in 0..cols {
            for i in 0..m {
                let gty = w.pgy[(m + i, j)];
                w.right[(i, j)] = gty;
                w.right[(m + i, j)] = w.pgy[(i, j)] + (w.sq_norms[i] * sq_scale) * gty;
            }
        }
        gemm(
            w.ay.as_mut(),
            false,
            w.pg.as_ref(),
            w.right.as_ref(),
            T::one(),
            par_layer(),
        );
        if has_basis {
            // + B (S (Bᵀ Y)), with S = Σ (β2 R_i)(β2 R_i); `w.s` holds 2^{−4e}·S, so the factor
            // 2^{e} brings the term to the common 2^{−3e}.
            let basis = MatRef::from_column_major_slice(&self.basis, self.rows, k);
            gemm(
                w.by.as_mut(),
                false,
                basis.transpose(),
                y,
                T::one(),
                Par::Seq,
            );
            gemm(
                w.sby.as_mut(),
                false,
                w.s.as_ref(),
                w.by.as_ref(),
                decay * decay * pow2::<T>(w.ay_exponent),
                Par::Seq,
            );
            gemm(
                w.ay.as_mut(),
                true,
                basis,
                w.sby.as_ref(),
                T::one(),
                par_layer(),
            );
        }
    }

    /// B_⊥: an orthonormal basis of the part of span(B_{t−1}) outside span(B_t), and
    /// L = [Q; B_⊥ᵀ B_{t−1}], into the workspace. Returns r, the number of columns of B_⊥.
    fn complement_basis(&mut self) -> std::result::Result<usize, StepFault> {
        let (b, k) = (self.rows, self.rank);
        let w = &mut self.work;
        let new_basis = MatRef::from_column_major_slice(&w.new_basis, b, k);
        let old_basis = MatRef::from_column_major_slice(&self.basis, b, k);
        // D = (I − B_t B_tᵀ) B_{t−1}, projected twice ("twice is enough").
        let mut outside = old_basis.to_owned();
        gemm(
            outside.as_mut(),
            true,
            new_basis,
            w.overlap.as_ref(),
            -T::one(),
            par_layer(),
        );
        let mut coords = Mat::<T>::zeros(k, k);
        gemm(
            coords.as_mut(),
            false,
            new_basis.transpose(),
            outside.as_ref(),
            T::one(),
            Par::Seq,
        );
        gemm(
            outside.as_mut(),
            true,
            new_basis,
            coords.as_ref(),
            -T::one(),
            par_layer(),
        );
        let (sigma, left) =
            thin_svd_left(outside.as_ref()).map_err(|e| StepFault::of("complement SVD", e))?;
        // Singular values below the rounding floor of an orthonormal b × k basis are noise.
        let floor = T::of(10.0 * (b as f64).sqrt()) * T::epsilon();
        let extra = (0..k).filter(|&j| sigma[j] > floor).count();
        let kr = k + extra;
        w.wide_basis = Mat::zeros(b, kr);
        w.wide_basis
            .as_mut()
            .submatrix_mut(0, 0, b, k)
            .copy_from(new_basis);
        w.lift = Mat::zeros(kr, k);
        w.lift
            .as_mut()
            .submatrix_mut(0, 0, k, k)
            .copy_from(w.overlap.as_ref());
        if extra > 0 {
            let mut dirs = left.as_ref().submatrix(0, 0, b, extra).to_owned();
            let mut proj = Mat::<T>::zeros(k, extra);
            gemm(
                proj.as_mut(),
                false,
                new_basis.transpose(),
                dirs.as_ref(),
                T::one(),
                Par::Seq,
            );
            gemm(
                dirs.as_mut(),
                true,
                new_basis,
                proj.as_ref(),
                -T::one(),
                par_layer(),
            );
            let perp = thin_q(dirs.as_ref()).map_err(|e| StepFault::of("complement QR", e))?;
            w.wide_basis
                .as_mut()
                .submatrix_mut(0, k, b, extra)
                .copy_from(&perp);
            let mut tail = w.lift.as_mut().submatrix_mut(k, 0, extra, k);
            gemm(
                tail.rb_mut(),
                false,
                perp.transpose(),
                old_basis,
                T::one(),
                Par::Seq,
            );
        }
        Ok(extra)
    }

    /// Gaussian matrix for the first step and the oversampling columns, seeded by (seed, step).
    fn gaussian(&self, rows: usize, cols: usize, stream: u64) -> Mat<T> {
        let seed = self
            .config
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((self.step + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
            .wrapping_add(stream);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Mat::from_fn(rows, cols, |_, _| {
            let v: f64 = StandardNormal.sample(&mut rng);
            T::of(v)
        })
    }

    /// Step 2: the new basis B_t (b × k), into `work.new_basis`.
    fn new_basis(&mut self, has_basis: bool, decay: T) -> std::result::Result<(), StepFault> {
        let (b, k, kp) = (self.rows, self.rank, self.sketch);
        let mut y = if has_basis {
            let mut y = Mat::<T>::zeros(b, kp);
            y.as_mut()
                .submatrix_mut(0, 0, b, k)
                .copy_from(MatRef::from_column_major_slice(&self.basis, b, k));
            if kp > k {
                let extra = self.gaussian(b, kp - k, 1);
                y.as_mut().submatrix_mut(0, k, b, kp - k).copy_from(&extra);
            }
            y
        } else {
            self.gaussian(b, kp, 0)
        };
        for _ in 0..self.config.power_iters {
            self.apply_a(y.as_ref(), has_basis, decay);
            y = thin_q(self.work.ay.as_ref())
                .map_err(|e| StepFault::of("randomized SVD (QR)", e))?;
        }
        if kp > k {
            // Rayleigh–Ritz: the top k eigenvectors of Yᵀ A Y, mapped back through Y.
            self.apply_a(y.as_ref(), has_basis, decay);
            let mut small = Mat::<T>::zeros(kp, kp);
            gemm(
                small.as_mut(),
                false,
                y.transpose(),
                self.work.ay.as_ref(),
                T::one(),
                Par::Seq,
            );
            symmetrize(small.as_mut());
            let mut eig = SymEig::new(kp);
            eig.decompose(small.as_ref())
                .map_err(|e| StepFault::of("Rayleigh-Ritz eigendecomposition", e))?;
            // Columns kp-1, kp-2, … hold the largest eigenvalues.
            let mut top = Mat::<T>::zeros(kp, k);
            for j in 0..k {
                top.as_mut()
                    .col_mut(j)
                    .copy_from(eig.vectors.col(kp - 1 - j));
            }
            let mut basis = MatMut::from_column_major_slice_mut(&mut self.work.new_basis, b, k);
            gemm(
                basis.rb_mut(),
                false,
                y.as_ref(),
                top.as_ref(),
                T::one(),
                par_layer(),
            );
        } else {
            let mut basis = MatMut::from_column_major_slice_mut(&mut self.work.new_basis, b, k);
            basis.copy_from(&y);
        }
        if !self.work.new_basis.iter().all(|v| v.is_finite()) {
            return Err(StepFault::Refuse("randomized SVD (QR)"));
        }
        Ok(())
    }
}

impl<T: Scalar> BlockScratch<T> {
    fn new(k: usize, n: usize, exact: bool) -> Self {
        Self {
            tmp: Mat::zeros(k, k),
            tilde: Mat::zeros(k, k),
            eig: SymEig::new(k),
            x: vec![T::zero(); n],
            y: vec![T::zero(); n],
            u: vec![T::zero(); k],
            v: vec![T::zero(); k],
            w: vec![T::zero(); k],
            exact: exact.then(|| (Mat::zeros(n, n), SymEig::new(n))),
            pack: None,
            coefs: Vec::new(),
            residual: None,
        }
    }

    /// The batched path's workspace, built on first use.
    fn for_packs(&mut self, k: usize) {
        if self.pack.as_ref().map(|p| p.dim()) != Some(k) {
            self.pack = Some(EigenPack::new(k));
            self.coefs = vec![T::zero(); k];
        }
    }
}

/// `out[j] = Σ_r a[r, j]²`, each sum in row order (as a sequential fold), eight columns at a
/// time so that the sums' dependency chains overlap.
fn column_sq_sums<T: Scalar>(a: MatRef<'_, T>, out: &mut [T]) {
    out.par_chunks_mut(PAR_COLUMNS)
        .enumerate()
        .for_each(|(t, out)| column_sq_sums_serial(a.subcols(t * PAR_COLUMNS, out.len()), out));
}

/// `dst ← scale·src` (a plain copy for scale 1), in parallel tasks of columns.
fn par_scaled_copy<T: Scalar>(dst: MatMut<'_, T>, src: MatRef<'_, T>, scale: T) {
    dst.par_col_chunks_mut(PAR_COLUMNS)
        .enumerate()
        .for_each(|(t, mut d)| {
            let cols = d.ncols();
            copy_columns(d.rb_mut(), src.subcols(t * PAR_COLUMNS, cols));
            if scale != T::one() {
                d.col_iter_mut()
                    .for_each(|col| col.iter_mut().for_each(|v| *v *= scale));
            }
        });
}

/// Columns per parallel task of the column passes below.
const PAR_COLUMNS: usize = 64;

fn column_sq_sums_serial<T: Scalar>(a: MatRef<'_, T>, out: &mut [T]) {
    const GROUP: usize = 8;
    let (rows, cols) = (a.nrows(), a.ncols());
    let mut j = 0;
    while j < cols {
        let n = GROUP.min(cols - j);
        // The group's columns as slices, without allocating (None: a partial group or a
        // strided column).
        let mut slices: [&[T]; GROUP] = [&[]; GROUP];
        let contiguous = n == GROUP
            && slices.iter_mut().enumerate().all(|(c, s)| {
                a.col(j + c)
                    .try_as_col_major()
                    .map(|col| *s = col.as_slice())
                    .is_some()
            });
        if contiguous {
            let mut acc = [T::zero(); GROUP];
            for r in 0..rows {
                for (s, col) in acc.iter_mut().zip(&slices) {
                    *s += col[r] * col[r];
                }
            }
            out[j..j + GROUP].copy_from_slice(&acc);
        } else {
            for (c, o) in out[j..j + n].iter_mut().enumerate() {
                *o = a.col(j + c).iter().fold(T::zero(), |acc, &v| acc + v * v);
            }
        }
        j += n;
    }
}

/// Each k×k block of `src` (k × m·k) transposed into the same block of `dst`.
fn transpose_blocks<T: Scalar>(dst: MatMut<'_, T>, src: MatRef<'_, T>, k: usize) {
    if k == 0 {
        return;
    }
    let width = k * PAR_COLUMNS.div_ceil(k);
    dst.par_col_chunks_mut(width)
        .enumerate()
        .for_each(|(t, d)| {
            let cols = d.ncols();
            transpose_blocks_serial(d, src.subcols(t * width, cols), k)
        });
}

fn transpose_blocks_serial<T: Scalar>(mut dst: MatMut<'_, T>, src: MatRef<'_, T>, k: usize) {
    let blocks = src.ncols() / k;
    let mut columns: Vec<&[T]> = Vec::with_capacity(k);
    for i in 0..blocks {
        columns.clear();
        columns.extend((0..k).filter_map(|c| {
            src.col(i * k + c)
                .try_as_col_major()
                .map(|col| col.as_slice())
        }));
        for c in 0..k {
            let mut d = dst.rb_mut().col_mut(i * k + c);
            match d.rb_mut().try_as_col_major_mut() {
                Some(d) if columns.len() == k => {
                    for (v, col) in d.as_slice_mut().iter_mut().zip(&columns) {
                        *v = col[c];
                    }
                }
                _ => {
                    for r in 0..k {
                        d[r] = src[(c, i * k + r)];
                    }
                }
            }
        }
    }
}

/// `dst[:, j] −= scales[j] · src[:, j]`, on slices where both columns are contiguous.
fn subtract_scaled_columns<T: Scalar>(dst: MatMut<'_, T>, src: MatRef<'_, T>, scales: &[T]) {
    let cols = dst.ncols().min(src.ncols()).min(scales.len());
    dst.subcols_mut(0, cols)
        .par_col_chunks_mut(PAR_COLUMNS)
        .zip(scales[..cols].par_chunks(PAR_COLUMNS))
        .enumerate()
        .for_each(|(t, (d, s))| {
            subtract_scaled_columns_serial(d, src.subcols(t * PAR_COLUMNS, s.len()), s)
        });
}

fn subtract_scaled_columns_serial<T: Scalar>(
    mut dst: MatMut<'_, T>,
    src: MatRef<'_, T>,
    scales: &[T],
) {
    for (j, &s) in scales.iter().enumerate().take(src.ncols()) {
        let (mut d, g) = (dst.rb_mut().col_mut(j), src.col(j));
        match (d.rb_mut().try_as_col_major_mut(), g.try_as_col_major()) {
            (Some(d), Some(g)) => {
                for (v, &x) in d.as_slice_mut().iter_mut().zip(g.as_slice()) {
                    *v -= s * x;
                }
            }
            _ => {
                for (r, v) in d.iter_mut().enumerate() {
                    *v -= s * g[r];
                }
            }
        }
    }
}

/// A slice as a column vector.
fn col<T: Scalar>(v: &[T]) -> MatRef<'_, T> {
    MatRef::from_column_major_slice(v, v.len(), 1)
}

fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |acc, (&u, &v)| acc + u * v)
}

/// |v|₂ without overflow: √(v·v) where that is finite, else computed on v scaled by a power of
/// two (exact), so that a residual of norm ≈ 1e19 … 1e38 in f32 still has its norm. ∞ or NaN
/// only for a vector holding them.
pub(crate) fn norm2<T: Scalar>(v: &[T]) -> T {
    let direct = dot(v, v);
    if direct.is_finite() {
        return direct.sqrt();
    }
    let largest = v.iter().fold(T::zero(), |acc, &x| acc.max(x.abs()));
    if !largest.is_finite() {
        return largest + T::one();
    }
    // `max` skips NaN: a vector of NaN (and zeros) has no scale to find; its norm is NaN.
    if largest <= T::zero() {
        return direct;
    }
    let shift = pow2::<T>(-(largest.f64().log2().floor() as i32));
    let scaled = v
        .iter()
        .fold(T::zero(), |acc, &x| acc + (x * shift) * (x * shift));
    scaled.sqrt() / shift
}

impl<'a, T: Scalar> BlockInputs<'a, T> {
    /// A seeded Gaussian x ∈ ℝ^b for block `i`, in the (k + r + 1) W coordinates of the
    /// residual (module docs): its components along [B_t, B_⊥] and along the unit direction w_i
    /// of g'_i outside span(W) go into `x`; the rest of ℝ^b, where E_i vanishes, only adds to
    /// |x|². Returns |x|² (the full b-dimensional one). Seeded by (seed, step, block), so the
    /// result does not depend on the thread schedule.
    fn random_start(&self, i: usize, x: &mut [T]) -> T {
        let kr = self.k + self.extra;
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.start_seed
                .wrapping_add((i as u64).wrapping_mul(0xA24B_AED4_963E_E407)),
        );
        let mut sq = 0.0f64;
        for v in x[..kr].iter_mut() {
            let z: f64 = StandardNormal.sample(&mut rng);
            sq += z * z;
            *v = T::of(z);
        }
        // w_i exists when g'_i has a part outside span(W) (and then b > k + r).
        let has_outside = self.outside[i] > T::zero() && self.rows > kr;
        x[kr] = if has_outside {
            let z: f64 = StandardNormal.sample(&mut rng);
            sq += z * z;
            T::of(z)
        } else {
            T::zero()
        };
        let rest = self.rows.saturating_sub(kr + usize::from(has_outside));
        if rest > 0 {
            if let Ok(chi) = ChiSquared::new(rest as f64) {
                sq += chi.sample(&mut rng);
            }
        }
        T::of(sq)
    }

    /// y = E_i x with E_i = L (β2 R_old) Lᵀ ⊕ 0 + e eᵀ − R_new ⊕ 0 (module docs).
    #[allow(clippy::too_many_arguments)] // the hot loop's borrowed inputs and two scratch rows
    fn residual_apply(
        &self,
        i: usize,
        r_old: MatRef<'_, T>,
        r_new: MatRef<'_, T>,
        x: &[T],
        y: &mut [T],
        sc_u: &mut [T],
        sc_v: &mut [T],
    ) {
        let (k, kr) = (self.k, self.k + self.extra);
        let e = self.wide_coef.col(i);
        let nu = self.outside[i];
        let ex = e
            .iter()
            .zip(&x[..kr])
            .fold(T::zero(), |acc, (&a, &b)| acc + a * b)
            + nu * x[kr];
        // y_top = −R_new x_top; the rest starts at zero.
        {
            let (top, rest) = y.split_at_mut(k);
            let top = MatMut::from_column_major_slice_mut(top, k, 1);
            gemm(top, false, r_new, col(&x[..k]), -T::one(), Par::Seq);
            rest.iter_mut().for_each(|v| *v = T::zero());
        }
        if self.has_basis {
            // y_{:k+r} += L (β2 R_old (Lᵀ x_{:k+r})).
            let u = MatMut::from_column_major_slice_mut(sc_u, k, 1);
            gemm(
                u,
                false,
                self.lift.transpose(),
                col(&x[..kr]),
                T::one(),
                Par::Seq,
            );
            let v = MatMut::from_column_major_slice_mut(sc_v, k, 1);
            gemm(v, false, r_old, col(sc_u), self.decay, Par::Seq);
            let head = MatMut::from_column_major_slice_mut(&mut y[..kr], kr, 1);
            gemm(head, true, self.lift, col(sc_v), T::one(), Par::Seq);
        }
        for (yr, &er) in y[..kr].iter_mut().zip(e.iter()) {
            *yr += er * ex;
        }
        y[kr] += nu * ex;
    }

    /// δ_i of step 5 by the chosen policy ([`RhoMode`]), the residual
    /// E_i = M_i − B_t R_i B_tᵀ in W coordinates (module docs); Err for an overflow or a
    /// failed exact-mode eigendecomposition.
    fn increment(
        &self,
        i: usize,
        sc: &mut BlockScratch<T>,
        r_old: MatRef<'_, T>,
        r_new: MatRef<'_, T>,
        lambda_min: T,
    ) -> std::result::Result<T, BlockOutcome> {
        let k = self.k;
        let n = k + self.extra + 1;
        let norm = match self.rho {
            RhoMode::FrequentDirections => {
                // max(λ_min(R̃_i), 0) + |(I − B_t B_tᵀ) g'_i|²: h'_i and ν_i hold g'_i's part
                // outside B_t.
                let e = self.wide_coef.col(i);
                let outside = (k..k + self.extra)
                    .fold(self.outside[i] * self.outside[i], |acc, j| {
                        acc + e[j] * e[j]
                    });
                let shrink = if lambda_min > T::zero() {
                    lambda_min
                } else {
                    T::zero()
                };
                shrink + outside
            }
            RhoMode::RandomStart(iters) => {
                let (x, y) = (&mut sc.x[..n], &mut sc.y[..n]);
                let start_sq = self.random_start(i, x);
                let mut est = T::zero();
                let mut len_x = start_sq.sqrt();
                for _ in 0..iters {
                    if len_x <= T::zero() {
                        break;
                    }
                    self.residual_apply(i, r_old, r_new, x, y, &mut sc.u, &mut sc.v);
                    let len = norm2(y);
                    if !len.is_finite() {
                        return Err(BlockOutcome::Overflow);
                    }
                    est = len / len_x;
                    if len <= T::zero() {
                        break;
                    }
                    x.copy_from_slice(y);
                    len_x = len;
                }
                est
            }
            RhoMode::Rayleigh => {
                let (x, y) = (&mut sc.x[..n], &mut sc.y[..n]);
                let start_sq = self.random_start(i, x);
                if start_sq > T::zero() {
                    self.residual_apply(i, r_old, r_new, x, y, &mut sc.u, &mut sc.v);
                    let q = dot(x, y) / start_sq;
                    if !q.is_finite() {
                        return Err(BlockOutcome::Overflow);
                    }
                    q.abs()
                } else {
                    T::zero()
                }
            }
            RhoMode::PowerIteration(iters) => {
                let (x, y) = (&mut sc.x[..n], &mut sc.y[..n]);
                // Start from the gradient's coordinates plus a constant vector, normalized.
                let e = self.wide_coef.col(i);
                let spread = T::one() / T::of(n as f64).sqrt();
                for (j, v) in x.iter_mut().enumerate() {
                    let ej = if j + 1 < n { e[j] } else { self.outside[i] };
                    *v = ej;
                }
                let enorm = norm2(x);
                let enorm = if enorm > T::zero() { enorm } else { T::one() };
                x.iter_mut().for_each(|v| *v = *v / enorm + spread);
                let xn = dot(x, x).sqrt();
                x.iter_mut().for_each(|v| *v /= xn);
                let mut est = T::zero();
                for _ in 0..iters {
                    self.residual_apply(i, r_old, r_new, x, y, &mut sc.u, &mut sc.v);
                    let len = norm2(y);
                    if !len.is_finite() {
                        // An overflowed residual: refuse the step rather than store ρ = 0.
                        return Err(BlockOutcome::Overflow);
                    }
                    est = len;
                    if len <= T::zero() {
                        break;
                    }
                    for (xv, &yv) in x.iter_mut().zip(y.iter()) {
                        *xv = yv / len;
                    }
                }
                est
            }
            RhoMode::Exact => {
                let Some((dense, eig)) = sc.exact.as_mut() else {
                    return Err(BlockOutcome::Overflow);
                };
                let x = &mut sc.x[..n];
                let y = &mut sc.y[..n];
                for j in 0..n {
                    x.iter_mut().for_each(|v| *v = T::zero());
                    x[j] = T::one();
                    self.residual_apply(i, r_old, r_new, x, y, &mut sc.u, &mut sc.v);
                    for (r, &v) in y.iter().enumerate() {
                        dense[(r, j)] = v;
                    }
                }
                let mut sub = dense.as_mut().submatrix_mut(0, 0, n, n);
                symmetrize(sub.rb_mut());
                let fits = eig.dim() == n;
                let mut local;
                let eig = if fits {
                    eig
                } else {
                    local = SymEig::<T>::new(n);
                    &mut local
                };
                match eig.decompose(sub.rb()) {
                    Ok(()) => {}
                    Err(KernelError::Failed) => return Err(BlockOutcome::KernelFailed),
                    Err(KernelError::NonFiniteInput) => return Err(BlockOutcome::Overflow),
                }
                let lo = eig.value(0).abs();
                let hi = eig.value(n - 1).abs();
                if lo > hi {
                    lo
                } else {
                    hi
                }
            }
        };
        Ok(norm)
    }

    /// Step 3 for block `i`: R̃_i = β2 Q R_i Qᵀ + γ c_i c_iᵀ into `tilde` (not yet
    /// symmetrized: the caller does that), using `tmp` as scratch.
    fn form_tilde(&self, i: usize, tmp: &mut Mat<T>, mut tilde: MatMut<'_, T>) {
        let k = self.k;
        let kk = k * k;
        let r_old = MatRef::from_column_major_slice(&self.old_coeffs[i * kk..(i + 1) * kk], k, k);
        let c = self.coef_new.col(i);
        if let Some(rotated) = self.rotated.filter(|_| self.has_basis) {
            copy_columns(tilde.rb_mut(), rotated.submatrix(0, i * k, k, k));
        } else if self.has_basis {
            gemm(
                tmp.as_mut(),
                false,
                self.overlap,
                r_old,
                self.decay,
                Par::Seq,
            );
            gemm(
                tilde.rb_mut(),
                false,
                tmp.as_ref(),
                self.overlap.transpose(),
                T::one(),
                Par::Seq,
            );
        } else {
            tilde.fill(T::zero());
        }
        let gamma = self.grad_scale * self.grad_scale;
        let c_mat = c.as_mat();
        gemm(tilde, true, c_mat, c_mat.transpose(), gamma, Par::Seq);
    }

    /// Steps 3–6 for block `i` with faer's eigendecomposition: writes R_i, ρ_i and the
    /// direction coefficients.
    fn run(
        &self,
        i: usize,
        sc: &mut BlockScratch<T>,
        mut r_new: MatMut<'_, T>,
        lost_mass: &mut T,
        mut dir_coef: MatMut<'_, T>,
        iso_scale: &mut T,
    ) -> BlockOutcome {
        let k = self.k;
        let kk = k * k;
        let r_old = MatRef::from_column_major_slice(&self.old_coeffs[i * kk..(i + 1) * kk], k, k);
        let c_mat = self.coef_new.col(i).as_mat();
        self.form_tilde(i, &mut sc.tmp, sc.tilde.as_mut());
        symmetrize(sc.tilde.as_mut());
        // Step 4: R_i = R̃_i − λ_min I = V diag(λ − λ_min) Vᵀ.
        match sc.eig.decompose(sc.tilde.as_ref()) {
            Ok(()) => {}
            Err(KernelError::Failed) => return BlockOutcome::KernelFailed,
            Err(KernelError::NonFiniteInput) => return BlockOutcome::Overflow,
        }
        let lambda_min = sc.eig.value(0);
        for (j, (mut dst, src)) in sc
            .tmp
            .as_mut()
            .col_iter_mut()
            .zip(sc.eig.vectors.col_iter())
            .enumerate()
        {
            let l = sc.eig.value(j) - lambda_min;
            let l = if l > T::zero() { l } else { T::zero() };
            dst.copy_from(src);
            dst *= faer::Scale(l);
        }
        gemm(
            r_new.rb_mut(),
            false,
            sc.tmp.as_ref(),
            sc.eig.vectors.transpose(),
            T::one(),
            Par::Seq,
        );
        symmetrize(r_new.rb_mut());
        // Step 5: ρ_i ← β2 ρ_i + s·δ_i, δ_i by the chosen policy ([`RhoMode`]).
        let norm = match self.increment(i, sc, r_old, r_new.rb(), lambda_min) {
            Ok(norm) => norm,
            Err(outcome) => return outcome,
        };
        let rho = self.updated_lost_mass(i, norm);
        *lost_mass = rho;
        // Step 6 (eq. 6): u_i = −B (R_i + cI)^{−1/2} Bᵀ g_i + c^{−1/2} B Bᵀ g_i − c^{−1/2} g_i,
        // c = ρ_i + ε. The first two terms are B V diag((l + c)^{−1/2} − c^{−1/2}) Vᵀ c_i,
        // stored as that k-vector; the caller forms −B·coef − c^{−1/2} g_i with one GEMM.
        let shift = rho + self.eps;
        let iso = T::one() / shift.sqrt();
        // w = diag((l + c)^{−1/2} − c^{−1/2}) Vᵀ c_i, then dir_coef = V w.
        {
            let proj = MatMut::from_column_major_slice_mut(&mut sc.w, k, 1);
            gemm(
                proj,
                false,
                sc.eig.vectors.transpose(),
                c_mat,
                T::one(),
                Par::Seq,
            );
        }
        for (j, w) in sc.w.iter_mut().enumerate() {
            let l = sc.eig.value(j) - lambda_min;
            let l = if l > T::zero() { l } else { T::zero() };
            *w *= T::one() / (l + shift).sqrt() - iso;
        }
        gemm(
            dir_coef.rb_mut(),
            false,
            sc.eig.vectors.as_ref(),
            col(&sc.w),
            T::one(),
            Par::Seq,
        );
        *iso_scale = iso;
        BlockOutcome::Done
    }

    /// ρ_i ← β2 ρ_i + s·δ_i. δ_i ≥ 0 for every policy; s ≥ 0 (validated), so ρ_i ≥ 0 and
    /// ρ_i + ε > 0. s = 1 is exact: Algorithm 1's ρ bit for bit.
    fn updated_lost_mass(&self, i: usize, norm: T) -> T {
        let increment = if self.rho_scale == T::one() {
            norm
        } else {
            self.rho_scale * norm
        };
        self.decay * self.old_lost_mass[i] + increment
    }

    /// Steps 3–6 for the blocks `first..first + n` (n = `lost_mass.len()` ≤ [`LANES`]) with
    /// the batched eigensolver ([`crate::batched_eigen`]); the slices hold those blocks' R_i,
    /// ρ_i, direction coefficients and (ρ_i + ε)^{−1/2}. Step 4 is R_i = R̃_i − λ_min I itself
    /// (mathematically V diag(λ − λ_min) Vᵀ); step 6 applies
    /// diag((l + c)^{−1/2} − c^{−1/2}) in the eigenbasis to c_i without forming V. A block the
    /// pack cannot solve goes through faer ([`Self::run`]).
    #[allow(clippy::needless_range_loop)] // lanes index the pack and its per-lane flags together
    fn run_pack(
        &self,
        first: usize,
        sc: &mut BlockScratch<T>,
        coeffs: &mut [T],
        lost_mass: &mut [T],
        dirs: &mut [T],
        iso: &mut [T],
    ) -> BlockOutcome {
        let k = self.k;
        let kk = k * k;
        let count = lost_mass.len();
        sc.for_packs(k);
        let Some(mut pack) = sc.pack.take() else {
            return BlockOutcome::KernelFailed;
        };
        let mut worst = BlockOutcome::Done;
        let mut loaded = [false; LANES];
        for lane in 0..LANES {
            if lane >= count {
                pack.clear(lane);
                continue;
            }
            let i = first + lane;
            // R̃_i is formed in R_i's slot: step 4 below only shifts its diagonal.
            let tilde = &mut coeffs[lane * kk..(lane + 1) * kk];
            self.form_tilde(
                i,
                &mut sc.tmp,
                MatMut::from_column_major_slice_mut(tilde, k, k),
            );
            symmetrize_col_major(tilde, k);
            if !lower_finite_col_major(tilde, k) {
                pack.clear(lane);
                worst = worst.max(BlockOutcome::Overflow);
                continue;
            }
            for (dst, &v) in sc.coefs.iter_mut().zip(self.coef_new.col(i).iter()) {
                *dst = v;
            }
            pack.load_col_major(lane, tilde, &sc.coefs);
            loaded[lane] = true;
        }
        let solved = pack.solve(Isa::Detect);
        // Step 4 for the solved lanes: R_i = R̃_i − λ_min I. A lane the pack could not solve
        // goes through faer, steps 4–6 at once.
        let mut lambda_mins = [T::zero(); LANES];
        let mut formed = [false; LANES];
        for lane in 0..count {
            if !loaded[lane] {
                continue;
            }
            let i = first + lane;
            let mut r_new =
                MatMut::from_column_major_slice_mut(&mut coeffs[lane * kk..(lane + 1) * kk], k, k);
            if !solved[lane] {
                let dir =
                    MatMut::from_column_major_slice_mut(&mut dirs[lane * k..(lane + 1) * k], k, 1);
                let outcome = self.run(i, sc, r_new, &mut lost_mass[lane], dir, &mut iso[lane]);
                worst = worst.max(outcome);
                continue;
            }
            let lambda_min = (0..k)
                .map(|j| pack.eigenvalue(lane, j))
                .fold(T::infinity(), |a, b| a.min(b));
            for j in 0..k {
                r_new[(j, j)] -= lambda_min;
            }
            lambda_mins[lane] = lambda_min;
            formed[lane] = true;
        }
        // Step 5: δ_i, eight blocks at once for the power iteration, else block by block.
        let norms = self.pack_increments(first, sc, coeffs, &formed, &lambda_mins);
        let mut done = [false; LANES];
        for lane in 0..count {
            if !formed[lane] {
                continue;
            }
            let norm = match norms[lane] {
                Ok(norm) => norm,
                Err(outcome) => {
                    worst = worst.max(outcome);
                    continue;
                }
            };
            let rho = self.updated_lost_mass(first + lane, norm);
            lost_mass[lane] = rho;
            // Step 6 (eq. 6), as in `run`: w = diag((l + c)^{−1/2} − c^{−1/2}) Vᵀ c_i.
            let lambda_min = lambda_mins[lane];
            let shift = rho + self.eps;
            let iso_l = T::one() / shift.sqrt();
            iso[lane] = iso_l;
            for j in 0..k {
                let l = pack.eigenvalue(lane, j) - lambda_min;
                let l = if l > T::zero() { l } else { T::zero() };
                pack.weight(lane, j, T::one() / (l + shift).sqrt() - iso_l);
            }
            done[lane] = true;
        }
        pack.back_transform(Isa::Detect);
        for lane in (0..count).filter(|&l| done[l]) {
            for (r, d) in dirs[lane * k..(lane + 1) * k].iter_mut().enumerate() {
                *d = pack.result(lane, r);
            }
        }
        sc.pack = Some(pack);
        worst
    }

    /// Step 5 for the `formed` lanes of the pack at `first` (their R_i in `coeffs`): with
    /// [`RhoMode::PowerIteration`] all lanes at once ([`crate::batched_power`]), with the other
    /// policies block by block ([`Self::increment`]).
    fn pack_increments(
        &self,
        first: usize,
        sc: &mut BlockScratch<T>,
        coeffs: &[T],
        formed: &[bool; LANES],
        lambda_mins: &[T; LANES],
    ) -> [std::result::Result<T, BlockOutcome>; LANES] {
        let (k, kk) = (self.k, self.k * self.k);
        let r_new = |lane: usize| {
            MatRef::from_column_major_slice(&coeffs[lane * kk..(lane + 1) * kk], k, k)
        };
        let r_old = |i: usize| {
            MatRef::from_column_major_slice(&self.old_coeffs[i * kk..(i + 1) * kk], k, k)
        };
        let mut out = [Ok(T::zero()); LANES];
        if let (RhoMode::PowerIteration(iters), Some(mut residual)) = (self.rho, sc.residual.take())
        {
            for (lane, &formed) in formed.iter().enumerate() {
                if !formed {
                    residual.clear(lane);
                    continue;
                }
                let i = first + lane;
                residual.load(
                    lane,
                    r_new(lane),
                    self.has_basis.then(|| r_old(i)),
                    self.decay,
                    self.wide_coef.col(i).iter().copied(),
                    self.outside[i],
                );
            }
            let norms = residual.power_norms(iters, Isa::Detect);
            for (o, n) in out.iter_mut().zip(norms) {
                *o = match n {
                    LaneNorm::Norm(v) => Ok(v),
                    LaneNorm::Overflow => Err(BlockOutcome::Overflow),
                };
            }
            sc.residual = Some(residual);
            return out;
        }
        for lane in (0..LANES).filter(|&l| formed[l]) {
            let i = first + lane;
            out[lane] = self.increment(i, sc, r_old(i), r_new(lane), lambda_mins[lane]);
        }
        out
    }
}

impl<T: Scalar> SharedBasis<T> {
    /// Steps 1–6 and the direction, the new state left in the workspace (committed by the
    /// caller).
    fn try_step(
        &mut self,
        grad: MatRef<'_, T>,
        mut direction: MatMut<'_, T>,
    ) -> std::result::Result<(), StepFault> {
        let (b, m, k) = (self.rows, self.blocks, self.rank);
        let has_basis = self.has_basis();
        let beta2 = self.config.beta2;
        let decay = T::of(beta2);
        let grad_scale = T::of(if beta2 < 1.0 {
            (1.0 - beta2).sqrt()
        } else {
            1.0
        });

        // Step 1: G' = √γ G next to P = B_{t−1} (β2 R_i) B_{t−1}ᵀ g'_i, and |g'_i|².
        {
            let w = &mut self.work;
            let mut gs = w.pg.as_mut().submatrix_mut(0, m, b, m);
            par_scaled_copy(gs.rb_mut(), grad, grad_scale);
            column_sq_sums(w.pg.as_ref().submatrix(0, m, b, m), &mut w.sq_norms);
            w.ay_exponent = ay_exponent(&w.sq_norms, &self.coeffs, k, decay);
            let basis = MatRef::from_column_major_slice(&self.basis, b, k);
            if has_basis {
                let gs = w.pg.as_ref().submatrix(0, m, b, m);
                // 2^{−e}·a_i: the pre-scaling of A·Y (`ay_exponent`); a_i is used nowhere else.
                let e = w.ay_exponent;
                gemm(
                    w.coef_old.as_mut(),
                    false,
                    basis.transpose(),
                    gs,
                    pow2::<T>(-e),
                    par_layer(),
                );
                let kk = k * k;
                let coeffs = &self.coeffs;
                let coef_old = w.coef_old.as_ref();
                w.rc.as_mut()
                    .col_iter_mut()
                    .enumerate()
                    .for_each(|(i, out)| {
                        let r =
                            MatRef::from_column_major_slice(&coeffs[i * kk..(i + 1) * kk], k, k);
                        gemm(
                            out.as_mat_mut(),
                            false,
                            r,
                            coef_old.col(i).as_mat(),
                            decay * pow2::<T>(-2 * e),
                            Par::Seq,
                        );
                    });
                let mut p = w.pg.as_mut().submatrix_mut(0, 0, b, m);
                gemm(
                    p.rb_mut(),
                    false,
                    basis,
                    w.rc.as_ref(),
                    T::one(),
                    par_layer(),
                );
                // S = Σ R_i R_iᵀ = R_h R_hᵀ with R_h = [R_1 … R_m] (k × mk); β2² is applied in A·Y.
                // Formed from 2^{−2e}·R_h (so 2^{−4e}·S), since R_h R_hᵀ itself overflows f32 for
                // |R| ≳ 1e19.
                let stacked = MatRef::from_column_major_slice(&self.coeffs, k, m * k);
                let to_unit = pow2::<T>(-2 * e);
                par_scaled_copy(w.scaled_coeffs.as_mut(), stacked, to_unit);
                gemm(
                    w.s.as_mut(),
                    false,
                    w.scaled_coeffs.as_ref(),
                    w.scaled_coeffs.transpose(),
                    T::one(),
                    par_layer(),
                );
            } else {
                w.pg.as_mut().submatrix_mut(0, 0, b, m).fill(T::zero());
                w.coef_old.fill(T::zero());
            }
        }

        // Step 2: the new basis.
        self.new_basis(has_basis, decay)?;

        // Step 3's shared products: Q = B_tᵀ B_{t−1} and c_i = B_tᵀ g_i.
        {
            let w = &mut self.work;
            let new_basis = MatRef::from_column_major_slice(&w.new_basis, b, k);
            let old_basis = MatRef::from_column_major_slice(&self.basis, b, k);
            gemm(
                w.overlap.as_mut(),
                false,
                new_basis.transpose(),
                old_basis,
                T::one(),
                Par::Seq,
            );
            gemm(
                w.coef_new.as_mut(),
                false,
                new_basis.transpose(),
                grad,
                T::one(),
                par_layer(),
            );
        }

        // The batched path forms every β2 Q R_i Qᵀ by two layer GEMMs: β2 Q [R_1 … R_m], the
        // block transposes β2 R_i Qᵀ (R_i is symmetric), then Q times those.
        let batched = self.config.eigensolver == BlockEigensolver::Batched;
        if batched && has_basis {
            let w = &mut self.work;
            if w.rotated.nrows() != k || w.rotated.ncols() != m * k {
                w.rotated = Mat::zeros(k, m * k);
                w.flipped = Mat::zeros(k, m * k);
            }
            let stacked = MatRef::from_column_major_slice(&self.coeffs, k, m * k);
            gemm(
                w.rotated.as_mut(),
                false,
                w.overlap.as_ref(),
                stacked,
                decay,
                par_layer(),
            );
            transpose_blocks(w.flipped.as_mut(), w.rotated.as_ref(), k);
            gemm(
                w.rotated.as_mut(),
                false,
                w.overlap.as_ref(),
                w.flipped.as_ref(),
                T::one(),
                par_layer(),
            );
        }

        // Step 5's coordinates: W = [B_t | B_⊥] spanning span(B_t, B_{t−1}), Wᵀ G' and the
        // norm ν_i of each g'_i outside span(W).
        let extra = if has_basis {
            self.complement_basis()?
        } else {
            0
        };
        {
            let w = &mut self.work;
            let kr = k + extra;
            if !has_basis {
                w.lift = Mat::zeros(k, k);
                w.wide_basis = Mat::zeros(b, k);
                w.wide_basis
                    .as_mut()
                    .copy_from(MatRef::from_column_major_slice(&w.new_basis, b, k));
            }
            w.wide_coef = Mat::zeros(kr, m);
            let gs = w.pg.as_ref().submatrix(0, m, b, m);
            gemm(
                w.wide_coef.as_mut(),
                false,
                w.wide_basis.transpose(),
                gs,
                T::one(),
                par_layer(),
            );
            let (mut rest, gs) = w.pg.as_mut().split_at_col_mut(m);
            par_scaled_copy(rest.rb_mut(), gs.rb(), T::one());
            gemm(
                rest.rb_mut(),
                true,
                w.wide_basis.as_ref(),
                w.wide_coef.as_ref(),
                -T::one(),
                par_layer(),
            );
            column_sq_sums(rest.rb(), &mut w.outside);
            w.outside.iter_mut().for_each(|v| *v = v.sqrt());
        }

        // Steps 3–6 per block, in parallel over chunks of blocks.
        let w = &mut self.work;
        let inputs = BlockInputs {
            k,
            extra,
            has_basis,
            decay,
            grad_scale,
            eps: T::of(self.config.eps),
            rho: self.config.rho,
            rho_scale: T::of(self.config.rho_scale),
            rows: b,
            start_seed: self
                .config
                .seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add((self.step + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
                .wrapping_add(2),
            old_coeffs: &self.coeffs,
            old_lost_mass: &self.lost_mass,
            overlap: w.overlap.as_ref(),
            lift: w.lift.as_ref(),
            wide_coef: w.wide_coef.as_ref(),
            coef_new: w.coef_new.as_ref(),
            outside: &w.outside,
            rotated: (batched && has_basis).then(|| w.rotated.as_ref()),
        };
        let exact = matches!(self.config.rho, RhoMode::Exact);
        // The batched path's packs are blocks [8p, 8p + 8) whatever the thread count.
        let chunk = if batched {
            blocks_per_task(m).next_multiple_of(LANES)
        } else {
            blocks_per_task(m)
        };
        let kk = k * k;
        // Every block runs (no short cut), so that the worst outcome does not depend on the
        // scheduling.
        let worst = w
            .new_coeffs
            .par_chunks_mut(chunk * kk)
            .zip(w.new_lost_mass.par_chunks_mut(chunk))
            .zip(w.dir_coef.par_chunks_mut(chunk * k))
            .zip(w.iso_scale.par_chunks_mut(chunk))
            .enumerate()
            .map(|(c, (((coeffs, rho), dirs), iso))| {
                let mut sc = BlockScratch::new(k, k + extra + 1, exact);
                let first = c * chunk;
                let mut worst = BlockOutcome::Done;
                if batched {
                    if let RhoMode::PowerIteration(_) = inputs.rho {
                        let mut residual = ResidualPack::new(k, extra);
                        residual.set_lift(inputs.has_basis.then_some(inputs.lift));
                        sc.residual = Some(residual);
                    }
                    for (p, start) in (0..rho.len()).step_by(LANES).enumerate() {
                        let end = (start + LANES).min(rho.len());
                        worst = worst.max(inputs.run_pack(
                            first + p * LANES,
                            &mut sc,
                            &mut coeffs[start * kk..end * kk],
                            &mut rho[start..end],
                            &mut dirs[start * k..end * k],
                            &mut iso[start..end],
                        ));
                    }
                    return worst;
                }
                for j in 0..rho.len() {
                    let r_new = MatMut::from_column_major_slice_mut(
                        &mut coeffs[j * kk..(j + 1) * kk],
                        k,
                        k,
                    );
                    let dir =
                        MatMut::from_column_major_slice_mut(&mut dirs[j * k..(j + 1) * k], k, 1);
                    worst = worst.max(inputs.run(
                        first + j,
                        &mut sc,
                        r_new,
                        &mut rho[j],
                        dir,
                        &mut iso[j],
                    ));
                }
                worst
            })
            .reduce(|| BlockOutcome::Done, BlockOutcome::max);
        match worst {
            BlockOutcome::Done => {}
            BlockOutcome::KernelFailed => {
                return Err(StepFault::Kernel("block eigendecomposition"));
            }
            BlockOutcome::Overflow => return Err(StepFault::Refuse("block eigendecomposition")),
        }
        if !w.new_coeffs.iter().all(|v| v.is_finite())
            || !w.new_lost_mass.iter().all(|v| v.is_finite())
        {
            return Err(StepFault::Refuse("block coefficients"));
        }

        // Direction (eq. 6): U = −B_t · dir_coef − G diag((ρ_i + ε)^{−1/2}).
        let new_basis = MatRef::from_column_major_slice(&w.new_basis, b, k);
        let dir_coef = MatRef::from_column_major_slice(&w.dir_coef, k, m);
        gemm(
            direction.rb_mut(),
            false,
            new_basis,
            dir_coef,
            -T::one(),
            par_layer(),
        );
        subtract_scaled_columns(direction.rb_mut(), grad, &w.iso_scale);
        // A non-finite direction from a finite state is refused before anything is committed.
        if !all_finite(direction.rb()) {
            return Err(StepFault::Refuse("direction"));
        }

        Ok(())
    }

    /// The direction from the kept state (B, R_i, ρ_i of step t − 1) by eq. 6, after a failed
    /// factorization: u_i = −B V diag((l + c)^{−1/2} − c^{−1/2}) Vᵀ Bᵀ g_i − c^{−1/2} g_i with
    /// R_i = V diag(l) Vᵀ and c = ρ_i + ε. Writes only the workspace and `direction`.
    fn kept_direction(
        &mut self,
        grad: MatRef<'_, T>,
        mut direction: MatMut<'_, T>,
    ) -> std::result::Result<(), StepFault> {
        let (b, m, k) = (self.rows, self.blocks, self.rank);
        let eps = T::of(self.config.eps);
        let has_basis = self.has_basis();
        let w = &mut self.work;
        for (iso, &rho) in w.iso_scale.iter_mut().zip(&self.lost_mass) {
            *iso = T::one() / (rho + eps).sqrt();
        }
        let basis = MatRef::from_column_major_slice(&self.basis, b, k);
        if has_basis {
            gemm(
                w.coef_new.as_mut(),
                false,
                basis.transpose(),
                grad,
                T::one(),
                par_layer(),
            );
            let chunk = blocks_per_task(m);
            let kk = k * k;
            let (coeffs, lost_mass) = (&self.coeffs, &self.lost_mass);
            let (coef_new, iso_scale) = (w.coef_new.as_ref(), &w.iso_scale);
            let ok = w
                .dir_coef
                .par_chunks_mut(chunk * k)
                .enumerate()
                .map(|(c, dirs)| {
                    let mut eig = SymEig::<T>::new(k);
                    let mut proj = vec![T::zero(); k];
                    let mut ok = true;
                    for (j, dir) in dirs.chunks_mut(k).enumerate() {
                        let i = c * chunk + j;
                        let r =
                            MatRef::from_column_major_slice(&coeffs[i * kk..(i + 1) * kk], k, k);
                        if eig.decompose(r).is_err() {
                            ok = false;
                            continue;
                        }
                        let (iso, shift) = (iso_scale[i], lost_mass[i] + eps);
                        gemm(
                            MatMut::from_column_major_slice_mut(&mut proj, k, 1),
                            false,
                            eig.vectors.transpose(),
                            coef_new.col(i).as_mat(),
                            T::one(),
                            Par::Seq,
                        );
                        for (q, p) in proj.iter_mut().enumerate() {
                            let l = eig.value(q);
                            let l = if l > T::zero() { l } else { T::zero() };
                            *p *= T::one() / (l + shift).sqrt() - iso;
                        }
                        gemm(
                            MatMut::from_column_major_slice_mut(dir, k, 1),
                            false,
                            eig.vectors.as_ref(),
                            col(&proj),
                            T::one(),
                            Par::Seq,
                        );
                    }
                    ok
                })
                .reduce(|| true, |a, b| a && b);
            if !ok {
                return Err(StepFault::Refuse("kept-state eigendecomposition"));
            }
            let dir_coef = MatRef::from_column_major_slice(&w.dir_coef, k, m);
            gemm(
                direction.rb_mut(),
                false,
                basis,
                dir_coef,
                -T::one(),
                par_layer(),
            );
        } else {
            direction.fill(T::zero());
        }
        subtract_scaled_columns(direction.rb_mut(), grad, &w.iso_scale);
        if !all_finite(direction.rb()) {
            return Err(StepFault::Refuse("kept-state direction"));
        }
        Ok(())
    }
}

impl<T: Scalar> Preconditioner<T> for SharedBasis<T> {
    fn precondition(&mut self, grad: MatRef<'_, T>, mut direction: MatMut<'_, T>) -> Result<()> {
        let (b, m) = (self.rows, self.blocks);
        check_shapes(
            (grad.nrows(), grad.ncols()),
            (direction.nrows(), direction.ncols()),
            b,
            m,
        )?;
        let t = self.step + 1;
        check_finite(grad, t)?;
        self.ensure_workspace();
        // On one of rayon's workers (the calling thread waits, asleep): called from outside the
        // pool, the serial parts would run on an extra thread that the idle workers' spinning
        // competes with for the cores (measured: no gain from two threads on a 2-core machine).
        let outcome = rayon::scope(|_| self.try_step(grad, direction.rb_mut()));
        match outcome {
            Ok(()) => {
                // Commit.
                let w = &mut self.work;
                std::mem::swap(&mut self.basis, &mut w.new_basis);
                std::mem::swap(&mut self.coeffs, &mut w.new_coeffs);
                std::mem::swap(&mut self.lost_mass, &mut w.new_lost_mass);
                self.linalg.record(None);
            }
            Err(StepFault::Refuse(kernel)) => return Err(self.linalg.refusal(kernel, t)),
            Err(StepFault::Kernel(kernel)) => match self.kept_direction(grad, direction) {
                // Keep B, R_i and ρ_i as they were.
                Ok(()) => self.linalg.record(Some(kernel)),
                Err(StepFault::Kernel(k) | StepFault::Refuse(k)) => {
                    return Err(self.linalg.refusal(k, t))
                }
            },
        }
        self.step = t;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        (self.basis.len() + self.coeffs.len() + self.lost_mass.len()) * std::mem::size_of::<T>()
    }

    fn linalg_health(&self) -> LinalgHealth {
        self.linalg
    }

    fn steps(&self) -> u64 {
        self.step
    }
}

/// 2^p as a `T` (exact: |p| ≤ 120 stays inside f32's normal range).
fn pow2<T: Scalar>(p: i32) -> T {
    T::of(2f64.powi(p))
}

/// The exponent e of A·Y's pre-scaling. A = Σ_i M_i M_iᵀ is quartic in the gradient's scale,
/// so in f32 it overflows from |g| ≈ 1e9 on (and loses precision to underflow for tiny ones)
/// although B, R_i and the direction do not. Step 2 only needs span(A·Y), so it runs on
/// g̃ = 2^{−e} g and R̃_i = 2^{−2e} R_i with 4^e ≈ the larger of max_i |g_i|² and max_i
/// β2·max diag R_i, i.e. computes 2^{−3e}·A·Y. Scaling by powers of two is exact, so away
/// from overflow and underflow the new basis is bitwise what the unscaled product gives.
/// e = 0 when the scale is 0 or not finite (an overflow the step then refuses).
fn ay_exponent<T: Scalar>(sq_norms: &[T], coeffs: &[T], k: usize, decay: T) -> i32 {
    let grad = sq_norms.iter().fold(0.0f64, |acc, &v| acc.max(v.f64()));
    let coef = if k == 0 {
        0.0
    } else {
        coeffs
            .chunks_exact(k * k)
            .flat_map(|r| (0..k).map(move |j| r[j * (k + 1)]))
            .fold(0.0f64, |acc, v| acc.max(v.f64()))
            * decay.f64()
    };
    let scale = grad.max(coef);
    if !(scale.is_finite() && scale > 0.0) {
        return 0;
    }
    ((scale.log2() / 2.0).floor() as i32).clamp(-40, 40)
}

#[cfg(test)]
#[path = "shared_basis_tests.rs"]
mod tests;
