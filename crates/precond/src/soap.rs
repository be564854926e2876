//! SOAP (Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade, "SOAP:
//! Improving and Stabilizing Shampoo using Adam", 2024): Adam run in the eigenbasis of
//! Shampoo's factors, for one parameter seen as a (b, m) matrix G.
//!
//! **State.** Left statistics L (b × b) and right statistics R (m × m), their eigenbases Q_L and
//! Q_R (orthogonal, columns ordered by decreasing estimated eigenvalue), and Adam's moments m'
//! and v' (b × m), both kept **in the rotated space**. That is the choice of the authors'
//! reference `soap.py` (the single-file `SOAP` class: its step uses `exp_avg_projected =
//! exp_avg`, and its `update_preconditioner` moves `exp_avg` back to the original space with the
//! old bases and into the new ones). Between two refreshes the bases do not change and that
//! round trip is the identity (QᵀQ = I), so it is done here only when a basis changes.
//!
//! **One step** t (1-based), the paper's Algorithm 1 (SOAP) with the reference's schedule; s = t − 1
//! counts Adam's steps (the reference's `state["step"]`), β_s = `shampoo_beta` (β2 when negative):
//!
//! * t = 1 (the reference skips it "so that we never use the current gradients in the
//!   projection"): L = (1 − β_s) G Gᵀ, R = (1 − β_s) Gᵀ G, and the first bases by full symmetric
//!   eigendecomposition, eigenvectors ordered by decreasing eigenvalue. The direction is **zero**
//!   and the moments stay zero. (The reference also leaves the parameter alone at this step,
//!   weight decay included; [`crate::ParamOptimizer`] still applies its decoupled decay.)
//! * t ≥ 2 (Algorithm 1, lines 3–12 in order):
//!   1. G' = Q_Lᵀ G Q_R (project).
//!   2. m' ← β1 m' + (1 − β1) G', v' ← β2 v' + (1 − β2) G'⊙G' (Adam in the rotated space).
//!   3. N' = m' / (√v' + ε); direction u = −(√(1 − β2ˢ) / (1 − β1ˢ)) · Q_L N' Q_Rᵀ (project
//!      back). The bias correction is the reference's: it scales the step, so ε sits beside √v'
//!      uncorrected (torch's Adam divides √v by √(1 − β2ˢ) before adding ε; the two differ only
//!      through ε).
//!   4. L ← β_s L + (1 − β_s) G Gᵀ, R ← β_s R + (1 − β_s) Gᵀ G (after the direction, as the
//!      reference: "update is done after the gradient step").
//!   5. When s mod `precondition_frequency` = 0, each basis is refreshed by one step of power
//!      iteration, as the reference's `get_orthogonal_matrix_QR` does: the estimated eigenvalues
//!      λ̂_j = q_jᵀ L q_j order the columns of Q (decreasing), the same permutation is applied to
//!      that side's axis of v' (v' is *only permuted*, not rotated, as the reference does), and
//!      Q ← QR(L Q) (Householder; the signs of Q's columns do not change any direction, since m'
//!      is rotated with Q and v' holds squares). Then m' ← Q_L,newᵀ Q_L,old m' Q_R,oldᵀ Q_R,new.
//!
//! **Sides not preconditioned.** A side whose dimension exceeds `max_precond_dim` keeps no
//! statistics and no basis: it is the identity, as in the reference (which skips such a side
//! rather than blocking it). With both sides the identity SOAP is Adam on the steps from t = 2
//! (with the reference's bias correction). A 1-D parameter is built by
//! [`crate::ParamOptimizer`] with both sides the identity ([`Soap::unrotated`]): the
//! reference's treatment of 1-D parameters (`precondition_1d = False`).
//!
//! **Linear-algebra failures** (the policy of [`crate::optimizer`], as Shampoo's). The
//! eigendecomposition and the QR of an f32 statistic are retried in f64 inside
//! [`crate::linalg`]. A factorization that still fails (or whose input is not finite, e.g. after
//! an overflow of the statistics) keeps that side's previous basis, and v' is then not permuted
//! along that side; the statistics have absorbed the gradient all the same. A side whose first
//! eigendecomposition failed is the identity until a later refresh step computes it, again by
//! full eigendecomposition. [`Soap::failed_bases`] counts every failed basis;
//! [`Preconditioner::linalg_health`] counts the steps with at least one (`failures`) and how many
//! came in a row (`consecutive`; a step whose factorizations all succeed resets it, a step
//! without factorizations leaves it alone). Apart from shape and non-finite-gradient errors
//! (returned before any state changes) a step cannot fail.

use crate::error::{invalid, PrecondError, Result};
use crate::linalg::{gemm, par_layer, thin_q, SymEig};
use crate::preconditioner::{check_finite, check_shapes, check_view, LinalgHealth, Preconditioner};
use crate::scalar::Scalar;
use faer::{Mat, MatMut, MatRef};
use serde::{Deserialize, Serialize};

/// The kernel named in [`LinalgHealth::last_kernel`] when a basis could not be computed.
const KERNEL: &str = "SOAP eigenbasis";

/// Hyperparameters of SOAP. Defaults are the reference's: β 0.95/0.95, `shampoo_beta` −1
/// (= β2), ε 1e-8, bases refreshed every 10 steps, sides up to 10000 preconditioned. The
/// reference's decoupled weight decay (0.01) and learning rate (3e-3) live outside the method:
/// [`crate::OptimizerConfig::weight_decay`] and the caller's learning rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SoapConfig {
    /// Adam's first-moment decay β1, in [0, 1).
    pub beta1: f64,
    /// Adam's second-moment decay β2, in [0, 1).
    pub beta2: f64,
    /// Decay β_s of the statistics L and R, in [0, 1); a negative value (default −1) uses β2,
    /// as the reference's `shampoo_beta=-1` does.
    pub shampoo_beta: f64,
    /// ε added to √v' (finite and > 0).
    pub eps: f64,
    /// The bases are refreshed when (t − 1) mod `precondition_frequency` = 0 (t ≥ 2); at least 1.
    pub precondition_frequency: u64,
    /// A side (b or m) larger than this is not preconditioned (the identity). 0 makes every side
    /// the identity, i.e. Adam.
    pub max_precond_dim: usize,
}

impl Default for SoapConfig {
    fn default() -> Self {
        Self {
            beta1: 0.95,
            beta2: 0.95,
            shampoo_beta: -1.0,
            eps: 1e-8,
            precondition_frequency: 10,
            max_precond_dim: 10000,
        }
    }
}

impl SoapConfig {
    /// Checks every field; returns a clear error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta1 >= 0.0 && self.beta1 < 1.0) {
            return Err(invalid("beta1", self.beta1, "must be in [0, 1)"));
        }
        if !(self.beta2 >= 0.0 && self.beta2 < 1.0) {
            return Err(invalid("beta2", self.beta2, "must be in [0, 1)"));
        }
        let beta = self.shampoo_beta;
        if !(beta.is_finite() && beta < 1.0) {
            return Err(invalid(
                "shampoo_beta",
                beta,
                "must be in [0, 1), or negative for beta2",
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        if self.precondition_frequency == 0 {
            return Err(invalid(
                "precondition_frequency",
                self.precondition_frequency,
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// β_s: `shampoo_beta`, or β2 when it is negative.
    pub fn statistics_beta(&self) -> f64 {
        if self.shampoo_beta >= 0.0 {
            self.shampoo_beta
        } else {
            self.beta2
        }
    }
}

/// One side: when preconditioned (`active`), its statistics (L or R) and eigenbasis,
/// column-major d × d; otherwise the identity, with both buffers empty.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound = "")]
struct Side<T: Scalar> {
    dim: usize,
    /// Whether this side is preconditioned (d ≤ max_precond_dim and not unrotated).
    active: bool,
    /// L = EMA of G Gᵀ (left) or R = EMA of Gᵀ G (right).
    stat: Vec<T>,
    /// Q, columns in decreasing order of (estimated) eigenvalue; meaningful once `has_basis`.
    basis: Vec<T>,
    /// Whether a basis has ever been computed (until then the side is the identity).
    has_basis: bool,
}

impl<T: Scalar> Side<T> {
    fn new(dim: usize, active: bool) -> Self {
        let len = if active { dim * dim } else { 0 };
        Self {
            dim,
            active,
            stat: vec![T::zero(); len],
            basis: vec![T::zero(); len],
            has_basis: false,
        }
    }

    /// Floats of statistics and basis: 2·d² when active.
    fn floats(&self) -> usize {
        if self.active {
            2 * self.dim * self.dim
        } else {
            0
        }
    }

    fn stat(&self) -> MatRef<'_, T> {
        MatRef::from_column_major_slice(&self.stat, self.dim, self.dim)
    }

    /// Q when it exists.
    fn q(&self) -> Option<MatRef<'_, T>> {
        (self.active && self.has_basis)
            .then(|| MatRef::from_column_major_slice(&self.basis, self.dim, self.dim))
    }

    /// stat ← decay·stat + weight·X Xᵀ, with X = G (left) or Gᵀ (right).
    fn accumulate(&mut self, x: MatRef<'_, T>, decay: T, weight: T) {
        self.stat.iter_mut().for_each(|v| *v *= decay);
        let d = self.dim;
        let stat = MatMut::from_column_major_slice_mut(&mut self.stat, d, d);
        gemm(stat, true, x, x.transpose(), weight, par_layer());
    }

    /// The first basis: eigenvectors of the statistics, by decreasing eigenvalue. Returns false,
    /// leaving the side as it was, on failure.
    fn first_basis(&mut self) -> bool {
        let d = self.dim;
        let mut eig = SymEig::<T>::new(d);
        if !eig.compute(self.stat()) {
            return false;
        }
        // faer orders eigenvalues ascending: reverse the columns (the reference's torch.flip).
        for j in 0..d {
            let src = eig.vectors.col(d - 1 - j);
            for i in 0..d {
                self.basis[j * d + i] = src[i];
            }
        }
        self.has_basis = true;
        true
    }

    /// One power-iteration refresh: P = L Q, columns ordered by λ̂_j = q_jᵀ (L q_j) decreasing,
    /// Q ← QR(P in that order). Returns the permutation (new column j was old column `perm[j]`),
    /// or `None`, leaving Q as it was, when the QR fails.
    fn refresh(&mut self) -> Option<Vec<usize>> {
        let d = self.dim;
        let q = self.q()?;
        let mut p = Mat::<T>::zeros(d, d);
        gemm(p.as_mut(), false, self.stat(), q, T::one(), par_layer());
        let estimate: Vec<f64> = (0..d)
            .map(|j| (0..d).map(|i| (q[(i, j)] * p[(i, j)]).f64()).sum())
            .collect();
        let mut perm: Vec<usize> = (0..d).collect();
        // Stable and total: ties (and NaN, whose QR fails below) keep their order.
        perm.sort_by(|&a, &b| estimate[b].total_cmp(&estimate[a]));
        let sorted = Mat::from_fn(d, d, |i, j| p[(i, perm[j])]);
        let fresh = thin_q(sorted.as_ref()).ok()?;
        MatMut::from_column_major_slice_mut(&mut self.basis, d, d).copy_from(fresh.as_ref());
        Some(perm)
    }
}

/// `q` or its transpose.
fn orient<T: Scalar>(q: MatRef<'_, T>, transpose: bool) -> MatRef<'_, T> {
    if transpose {
        q.transpose()
    } else {
        q
    }
}

/// out = Q_Lᵀ x Q_R (`back` false) or Q_L x Q_Rᵀ (`back` true); a missing Q is the identity.
fn rotate<T: Scalar>(
    left: Option<MatRef<'_, T>>,
    x: MatRef<'_, T>,
    right: Option<MatRef<'_, T>>,
    back: bool,
    mut out: MatMut<'_, T>,
) {
    let one = T::one();
    let par = par_layer();
    match (left, right) {
        (Some(l), Some(r)) => {
            let mut tmp = Mat::<T>::zeros(x.nrows(), x.ncols());
            gemm(tmp.as_mut(), false, orient(l, !back), x, one, par);
            gemm(out, false, tmp.as_ref(), orient(r, back), one, par);
        }
        (Some(l), None) => gemm(out, false, orient(l, !back), x, one, par),
        (None, Some(r)) => gemm(out, false, x, orient(r, back), one, par),
        (None, None) => out.copy_from(x),
    }
}

/// SOAP state of one (b, m) parameter (see the module docs).
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Soap<T: Scalar> {
    config: SoapConfig,
    rows: usize,
    cols: usize,
    /// `precondition` calls taken (t of the last step).
    step: u64,
    /// Left side (b × b), inactive when b > max_precond_dim or the parameter is unrotated.
    left: Side<T>,
    /// Right side (m × m), inactive when m > max_precond_dim or the parameter is unrotated.
    right: Side<T>,
    /// m' (rotated), column-major b × m.
    exp_avg: Vec<T>,
    /// v' (rotated), column-major b × m.
    exp_avg_sq: Vec<T>,
    failed_bases: u64,
    linalg: LinalgHealth,
}

impl<T: Scalar> std::fmt::Debug for Soap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Soap")
            .field("config", &self.config)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("step", &self.step)
            .field("left", &self.left.active)
            .field("right", &self.right.active)
            .field("failed_bases", &self.failed_bases)
            .field("linalg", &self.linalg)
            .finish_non_exhaustive()
    }
}

impl<T: Scalar> Soap<T> {
    /// New state for a (b, m) parameter view: each side of at most `max_precond_dim` is
    /// preconditioned.
    pub fn new(config: &SoapConfig, b: usize, m: usize) -> Result<Self> {
        let limit = config.max_precond_dim;
        Self::build(config, b, m, b <= limit, m <= limit)
    }

    /// New state with both sides the identity: Adam with SOAP's schedule and bias correction (the
    /// reference's treatment of 1-D parameters).
    pub fn unrotated(config: &SoapConfig, b: usize, m: usize) -> Result<Self> {
        Self::build(config, b, m, false, false)
    }

    fn build(config: &SoapConfig, b: usize, m: usize, left: bool, right: bool) -> Result<Self> {
        config.validate()?;
        check_view(b, m)?;
        if T::of(config.eps) <= T::zero() {
            return Err(invalid(
                "eps",
                config.eps,
                "rounds to 0 in this precision: use a larger eps",
            ));
        }
        let n = b
            .checked_mul(m)
            .ok_or_else(|| PrecondError::ShapeMismatch {
                expected: "b·m addressable".into(),
                got: format!("({b}, {m})"),
            })?;
        Ok(Self {
            config: config.clone(),
            rows: b,
            cols: m,
            step: 0,
            left: Side::new(b, left),
            right: Side::new(m, right),
            exp_avg: vec![T::zero(); n],
            exp_avg_sq: vec![T::zero(); n],
            failed_bases: 0,
            linalg: LinalgHealth::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SoapConfig {
        &self.config
    }

    /// (b, m) this state was built for.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Whether the left (b × b) and right (m × m) sides are preconditioned.
    pub fn preconditioned_sides(&self) -> (bool, bool) {
        (self.left.active, self.right.active)
    }

    /// Bases (one per side and factorization) that could not be computed, in f64 too, and kept
    /// their previous value (or stayed the identity).
    pub fn failed_bases(&self) -> u64 {
        self.failed_bases
    }

    /// Q_L, when the left side is preconditioned and its basis exists (b × b, column-major).
    pub fn left_basis(&self) -> Option<MatRef<'_, T>> {
        self.left.q()
    }

    /// Q_R, when the right side is preconditioned and its basis exists (m × m, column-major).
    pub fn right_basis(&self) -> Option<MatRef<'_, T>> {
        self.right.q()
    }

    /// Checks that a (deserialized) state is consistent with its configuration and shape.
    fn check_layout(&self) -> Result<()> {
        let mismatch = |what: &str| Err(PrecondError::StateMismatch(format!("soap: {what}")));
        if self.config.validate().is_err() {
            return mismatch("invalid config");
        }
        let n = self.rows * self.cols;
        if self.exp_avg.len() != n || self.exp_avg_sq.len() != n {
            return mismatch("moments do not match the shape");
        }
        for (side, dim) in [(&self.left, self.rows), (&self.right, self.cols)] {
            let len = if side.active { dim * dim } else { 0 };
            if side.dim != dim || side.stat.len() != len || side.basis.len() != len {
                return mismatch("statistics do not match the shape");
            }
        }
        Ok(())
    }

    fn sides(&self) -> (Option<MatRef<'_, T>>, Option<MatRef<'_, T>>) {
        (self.left_basis(), self.right_basis())
    }

    /// Algorithm 1 lines 10–11 and the refresh: statistics, then (when due) new bases, v'
    /// permuted and m' re-rotated. Returns whether any factorization ran and whether one failed.
    fn update_preconditioner(&mut self, grad: MatRef<'_, T>, refresh: bool) -> (bool, bool) {
        let beta = self.config.statistics_beta();
        let (decay, weight) = (T::of(beta), T::of(1.0 - beta));
        if self.left.active {
            self.left.accumulate(grad, decay, weight);
        }
        if self.right.active {
            self.right.accumulate(grad.transpose(), decay, weight);
        }
        if !refresh {
            return (false, false);
        }
        let (b, m) = (self.rows, self.cols);
        let old_left = self.left_basis().map(|q| q.to_owned());
        let old_right = self.right_basis().map(|q| q.to_owned());
        let mut failed = 0;
        let mut ran = false;
        let mut perms: [Option<Vec<usize>>; 2] = [None, None];
        for (k, side) in [&mut self.left, &mut self.right].into_iter().enumerate() {
            if !side.active {
                continue;
            }
            ran = true;
            if side.has_basis {
                match side.refresh() {
                    Some(perm) => perms[k] = Some(perm),
                    None => failed += 1,
                }
            } else if !side.first_basis() {
                failed += 1;
            }
        }
        // v' follows the new column order of each refreshed side (only permuted).
        if perms.iter().any(Option::is_some) {
            let v = &self.exp_avg_sq;
            let row = |i: usize| perms[0].as_ref().map_or(i, |p| p[i]);
            let col = |j: usize| perms[1].as_ref().map_or(j, |p| p[j]);
            let permuted: Vec<T> = (0..m)
                .flat_map(|j| (0..b).map(move |i| (i, j)))
                .map(|(i, j)| v[col(j) * b + row(i)])
                .collect();
            self.exp_avg_sq = permuted;
        }
        // m' = Q_newᵀ (Q_old m' Q_oldᵀ) Q_new, through the original space.
        let changed = |old: &Option<Mat<T>>, new: Option<MatRef<'_, T>>| match (old, new) {
            (Some(o), Some(n)) => o.as_ref() != n,
            (None, None) => false,
            _ => true,
        };
        let (new_left, new_right) = self.sides();
        if changed(&old_left, new_left) || changed(&old_right, new_right) {
            let avg = MatRef::from_column_major_slice(&self.exp_avg, b, m);
            let mut original = Mat::<T>::zeros(b, m);
            rotate(
                old_left.as_ref().map(Mat::as_ref),
                avg,
                old_right.as_ref().map(Mat::as_ref),
                true,
                original.as_mut(),
            );
            let mut rotated = Mat::<T>::zeros(b, m);
            rotate(
                new_left,
                original.as_ref(),
                new_right,
                false,
                rotated.as_mut(),
            );
            MatMut::from_column_major_slice_mut(&mut self.exp_avg, b, m).copy_from(rotated);
        }
        self.failed_bases += failed;
        (ran, failed > 0)
    }
}

impl<T: Scalar> Preconditioner<T> for Soap<T> {
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

        if t == 1 {
            // The first step only gathers statistics and the first bases (module docs).
            self.update_preconditioner(grad, false);
            let mut failed = 0;
            let mut ran = false;
            for side in [&mut self.left, &mut self.right] {
                if !side.active {
                    continue;
                }
                ran = true;
                if !side.first_basis() {
                    failed += 1;
                }
            }
            self.failed_bases += failed;
            if ran {
                self.linalg.record((failed > 0).then_some(KERNEL));
            }
            direction.fill(T::zero());
            self.step = t;
            return Ok(());
        }

        let s = t - 1;
        let c = &self.config;
        // Line 4: G' = Q_Lᵀ G Q_R.
        let mut projected = Mat::<T>::zeros(b, m);
        {
            let (left, right) = self.sides();
            rotate(left, grad, right, false, projected.as_mut());
        }
        // Lines 5–7: Adam's moments in the rotated space, N' = m' / (√v' + ε).
        let (beta1, beta2) = (T::of(c.beta1), T::of(c.beta2));
        let (one_minus_beta1, one_minus_beta2) = (T::of(1.0 - c.beta1), T::of(1.0 - c.beta2));
        let eps = T::of(c.eps);
        let sf = s as f64;
        let step_size = T::of((1.0 - c.beta2.powf(sf)).sqrt() / (1.0 - c.beta1.powf(sf)));
        let mut normalized = Mat::<T>::zeros(b, m);
        for j in 0..m {
            for i in 0..b {
                let k = j * b + i;
                let g = projected[(i, j)];
                let mk = &mut self.exp_avg[k];
                *mk = beta1 * *mk + one_minus_beta1 * g;
                let vk = &mut self.exp_avg_sq[k];
                *vk = beta2 * *vk + one_minus_beta2 * (g * g);
                normalized[(i, j)] = self.exp_avg[k] / (self.exp_avg_sq[k].sqrt() + eps);
            }
        }
        // Line 8: back to the original space, with the bias correction and the minus sign.
        let (left, right) = self.sides();
        rotate(left, normalized.as_ref(), right, true, direction.as_mut());
        let scale = -step_size;
        for j in 0..m {
            for i in 0..b {
                direction[(i, j)] *= scale;
            }
        }
        // Lines 10–12: statistics, and the bases when due.
        let refresh = s % self.config.precondition_frequency == 0;
        let (ran, failed) = self.update_preconditioner(grad, refresh);
        if ran {
            self.linalg.record(failed.then_some(KERNEL));
        }
        self.step = t;
        Ok(())
    }

    /// (Σ over preconditioned sides 2·d² + 2·b·m)·`size_of::<T>()`: L, Q_L (b × b), R, Q_R (m × m)
    /// and the moments m', v' (b × m).
    fn state_bytes(&self) -> usize {
        let sides = self.left.floats() + self.right.floats();
        (sides + 2 * self.rows * self.cols) * std::mem::size_of::<T>()
    }

    fn steps(&self) -> u64 {
        self.step
    }
}

#[cfg(test)]
#[path = "soap_tests.rs"]
mod tests;
