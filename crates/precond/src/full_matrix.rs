//! Full-matrix Adagrad (Duchi, Hazan and Singer, 2011) over a whole parameter: a reference for
//! small parameters, where its n² statistics and O(n³) eigendecomposition per step are
//! affordable.
//!
//! The (b, m) parameter view is flattened column-major to a vector of n = b·m entries
//! (element (i, j) at j·b + i). With g that flattened gradient, one step is
//!
//! 1. H ← H + g gᵀ when β2 = 1 (Adagrad's plain sum), H ← β2 H + (1 − β2) g gᵀ when β2 < 1
//!    (an exponential moving average, without bias correction);
//! 2. u = −(H + εI)^{−1/2} g, by the eigendecomposition H = Q diag(λ) Qᵀ
//!    ([`crate::linalg::SymEig`]): u = −Q diag((max(λ, 0) + ε)^{−1/2}) Qᵀ g. Negative
//!    eigenvalues can only come from round-off (H is a sum of outer products) and are clamped to
//!    0 before adding ε. The denominator is kept at or above the eigensolver's rounding floor
//!    δ = n·u·λ_max ([`SymEig::rounding_floor`]): g lies in H's range, so its components along
//!    eigenvalues below δ are round-off, which ε ≪ δ (rank-deficient H, huge gradients) would
//!    otherwise amplify by ε^{−1/2}; ε ≥ δ leaves the direction bitwise unchanged.
//!
//! With m = 1 this is the block-diagonal (per-column) full-matrix Adagrad of that column; with
//! m > 1 it also couples the columns, which the block methods of this crate do not.
//!
//! The step is transactional: the updated H is built in a workspace and swapped in only when
//! its eigendecomposition and the direction are finite, so an error leaves the state as it was.
//! (An f32 eigendecomposition that fails is first retried in f64 by [`crate::linalg::SymEig`];
//! this reference method has no previous state to fall back on and no failure counts.)

use crate::error::{invalid, PrecondError, Result};
use crate::linalg::{gemm, SymEig};
use crate::preconditioner::{check_finite, check_shapes, check_view, Preconditioner};
use crate::scalar::Scalar;
use faer::{Mat, MatMut, MatRef, Par};
use serde::{Deserialize, Serialize};

/// Hyperparameters of full-matrix Adagrad.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FullMatrixConfig {
    /// ε added to the eigenvalues of H before the inverse square root; finite and > 0.
    /// Default 1e-6.
    pub eps: f64,
    /// Statistics decay β2 in (0, 1]: 1 is Adagrad's plain sum (default), below 1 an
    /// exponential moving average H ← β2 H + (1 − β2) g gᵀ.
    pub beta2: f64,
    /// Largest n = b·m accepted (the state is n² values); at least 1. Default 4096.
    pub max_dim: usize,
}

impl Default for FullMatrixConfig {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            beta2: 1.0,
            max_dim: 4096,
        }
    }
}

impl FullMatrixConfig {
    /// Checks every field; returns an error naming the bad one. Whether b·m fits `max_dim` is
    /// checked by [`FullMatrix::new`], which knows b and m.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        if !(self.beta2 > 0.0 && self.beta2 <= 1.0) {
            return Err(invalid("beta2", self.beta2, "must be in (0, 1]"));
        }
        if self.max_dim == 0 {
            return Err(invalid("max_dim", self.max_dim, "must be at least 1"));
        }
        Ok(())
    }
}

/// Scratch reused across steps (not part of the saved state).
struct Workspace<T: Scalar> {
    /// Eigendecomposition workspace for n × n.
    eig: Option<SymEig<T>>,
    /// The updated H, column-major n × n, swapped into the state on success.
    new_stat: Vec<T>,
    /// The flattened gradient g (n × 1).
    grad: Mat<T>,
    /// Qᵀ g, then scaled by (max(λ, 0) + ε)^{−1/2} (n × 1).
    coef: Mat<T>,
    /// −Q coef (n × 1).
    dir: Mat<T>,
}

impl<T: Scalar> Default for Workspace<T> {
    fn default() -> Self {
        Self {
            eig: None,
            new_stat: Vec::new(),
            grad: Mat::zeros(0, 0),
            coef: Mat::zeros(0, 0),
            dir: Mat::zeros(0, 0),
        }
    }
}

/// State of one parameter: the n × n statistics H.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct FullMatrix<T: Scalar> {
    config: FullMatrixConfig,
    rows: usize,
    blocks: usize,
    step: u64,
    /// H, column-major n × n (both triangles stored).
    stat: Vec<T>,
    #[serde(skip)]
    work: Workspace<T>,
}

impl<T: Scalar> Clone for FullMatrix<T> {
    fn clone(&self) -> Self {
        Self {
            config: self.config,
            rows: self.rows,
            blocks: self.blocks,
            step: self.step,
            stat: self.stat.clone(),
            work: Workspace::default(),
        }
    }
}

impl<T: Scalar> std::fmt::Debug for FullMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FullMatrix")
            .field("config", &self.config)
            .field("rows", &self.rows)
            .field("blocks", &self.blocks)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl<T: Scalar> FullMatrix<T> {
    /// New (zero) state for a (b, m) = (`rows`, `blocks`) parameter view. Fails with
    /// [`PrecondError::InvalidConfig`] naming `max_dim` when n = b·m exceeds it: full-matrix
    /// Adagrad is for small parameters.
    pub fn new(config: FullMatrixConfig, rows: usize, blocks: usize) -> Result<Self> {
        config.validate()?;
        check_view(rows, blocks)?;
        let n = rows.saturating_mul(blocks);
        if n > config.max_dim {
            return Err(invalid(
                "max_dim",
                format!(
                    "{} (parameter ({rows}, {blocks}) has n = b·m = {})",
                    config.max_dim,
                    rows as u128 * blocks as u128
                ),
                "full-matrix Adagrad is for small parameters: it keeps n² statistics and \
                 eigendecomposes them every step, so n = b·m must not exceed max_dim",
            ));
        }
        Ok(Self {
            config,
            rows,
            blocks,
            step: 0,
            stat: vec![T::zero(); n * n],
            work: Workspace::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FullMatrixConfig {
        &self.config
    }

    /// (b, m) this state was built for.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.blocks)
    }

    /// n = b·m, the dimension of H.
    pub fn dim(&self) -> usize {
        self.rows * self.blocks
    }

    /// The statistics H (n × n), indexed by the column-major flattening of the (b, m) view.
    pub fn statistics(&self) -> MatRef<'_, T> {
        let n = self.dim();
        MatRef::from_column_major_slice(&self.stat, n, n)
    }

    fn ensure_workspace(&mut self) {
        let n = self.dim();
        let w = &mut self.work;
        if w.eig.as_ref().is_some_and(|e| e.dim() == n) && w.new_stat.len() == n * n {
            return;
        }
        w.eig = Some(SymEig::new(n));
        w.new_stat = vec![T::zero(); n * n];
        w.grad = Mat::zeros(n, 1);
        w.coef = Mat::zeros(n, 1);
        w.dir = Mat::zeros(n, 1);
    }

    fn check_state(&self) -> Result<()> {
        let n = self.dim();
        if self.stat.len() != n * n {
            return Err(PrecondError::StateMismatch(format!(
                "full-matrix state for ({}, {}) holds {} statistics values, expected {}",
                self.rows,
                self.blocks,
                self.stat.len(),
                n * n
            )));
        }
        Ok(())
    }

    fn linalg_error(&self, kernel: &'static str) -> PrecondError {
        PrecondError::LinalgFailure {
            kernel,
            step: self.step + 1,
            consecutive: 1,
        }
    }
}

impl<T: Scalar> Preconditioner<T> for FullMatrix<T> {
    fn precondition(&mut self, grad: MatRef<'_, T>, mut direction: MatMut<'_, T>) -> Result<()> {
        let (b, m) = (self.rows, self.blocks);
        check_shapes(
            (grad.nrows(), grad.ncols()),
            (direction.nrows(), direction.ncols()),
            b,
            m,
        )?;
        self.check_state()?;
        check_finite(grad, self.step + 1)?;
        self.ensure_workspace();
        let n = self.dim();
        let sum = self.config.beta2 == 1.0;
        let beta2 = T::of(self.config.beta2);
        let weight = T::of(1.0 - self.config.beta2);
        let eps = T::of(self.config.eps);

        // Step 1: g flattened column-major, H' = β2 H + (1 − β2) g gᵀ (or H + g gᵀ).
        let w = &mut self.work;
        for j in 0..m {
            for i in 0..b {
                w.grad[(j * b + i, 0)] = grad[(i, j)];
            }
        }
        for c in 0..n {
            let gc = w.grad[(c, 0)];
            let old = &self.stat[c * n..(c + 1) * n];
            let new = &mut w.new_stat[c * n..(c + 1) * n];
            for (r, (v, &h)) in new.iter_mut().zip(old).enumerate() {
                let outer = w.grad[(r, 0)] * gc;
                *v = if sum {
                    h + outer
                } else {
                    beta2 * h + weight * outer
                };
            }
        }

        // Step 2: u = −Q diag(max(max(λ, 0) + ε, δ)^{−1/2}) Qᵀ g.
        let eig = w.eig.as_mut().expect("workspace ensured");
        if !eig.compute(MatRef::from_column_major_slice(&w.new_stat, n, n)) {
            return Err(self.linalg_error("full-matrix eigendecomposition"));
        }
        gemm(
            w.coef.as_mut(),
            false,
            eig.vectors.transpose(),
            w.grad.as_ref(),
            T::one(),
            Par::Seq,
        );
        let floor = eig.rounding_floor();
        for k in 0..n {
            let lambda = eig.value(k).max(T::zero());
            w.coef[(k, 0)] /= (lambda + eps).max(floor).sqrt();
        }
        gemm(
            w.dir.as_mut(),
            false,
            eig.vectors.as_ref(),
            w.coef.as_ref(),
            -T::one(),
            Par::Seq,
        );
        if !w.dir.col(0).iter().all(|v| v.is_finite()) {
            return Err(self.linalg_error("full-matrix direction"));
        }

        // Commit.
        for j in 0..m {
            for i in 0..b {
                direction[(i, j)] = w.dir[(j * b + i, 0)];
            }
        }
        std::mem::swap(&mut self.stat, &mut w.new_stat);
        self.step += 1;
        Ok(())
    }

    /// n² · `size_of::<T>()` with n = b·m: the full statistics H.
    fn state_bytes(&self) -> usize {
        self.stat.len() * std::mem::size_of::<T>()
    }

    fn steps(&self) -> u64 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    // Oracle code indexes rows and columns explicitly, as the formulas do.
    #![allow(clippy::needless_range_loop)]

    //! Tests against an independent f64 oracle: the statistics as an explicit sum of outer
    //! products on nested vectors and a cyclic Jacobi eigensolver, no faer.

    use super::*;
    use crate::block_diag::{BlockAdam, BlockAdamConfig};
    use crate::testing::flat_gradients;
    use crate::testing::jacobi_eigen_rows;

    /// One step of the oracle: the direction and the eigendecomposition of H_t.
    struct OracleStep {
        /// u = −(H_t + εI)^{−1/2} g_t, flat column-major.
        u: Vec<f64>,
        /// Eigenvalues of H_t (clamped at 0) and eigenvectors (columns, `vecs[r][k]`).
        vals: Vec<f64>,
        vecs: Vec<Vec<f64>>,
    }

    /// The oracle at every step: H_t = Σ_{s≤t} w_{t,s} g_s g_sᵀ written as an explicit sum
    /// (w = 1 for β2 = 1, (1 − β2) β2^{t−s} otherwise), then u = −(H_t + εI)^{−1/2} g_t by
    /// Jacobi. Gradients are flat column-major vectors.
    fn oracle(config: &FullMatrixConfig, grads: &[Vec<f64>]) -> Vec<OracleStep> {
        let n = grads[0].len();
        let beta2 = config.beta2;
        (0..grads.len())
            .map(|t| {
                let mut h = vec![vec![0.0f64; n]; n];
                for s in 0..=t {
                    let w = if beta2 == 1.0 {
                        1.0
                    } else {
                        (1.0 - beta2) * beta2.powi((t - s) as i32)
                    };
                    let g = &grads[s];
                    for r in 0..n {
                        for c in 0..n {
                            h[r][c] += w * g[r] * g[c];
                        }
                    }
                }
                let (vals, vecs) = jacobi_eigen_rows(&h);
                let vals: Vec<f64> = vals.iter().map(|v| v.max(0.0)).collect();
                let g = &grads[t];
                let mut u = vec![0.0f64; n];
                for k in 0..n {
                    let proj: f64 = (0..n).map(|r| vecs[r][k] * g[r]).sum();
                    let scaled = proj / (vals[k] + config.eps).sqrt();
                    for r in 0..n {
                        u[r] -= vecs[r][k] * scaled;
                    }
                }
                OracleStep { u, vals, vecs }
            })
            .collect()
    }

    fn to_mat<T: Scalar>(g: &[f64], b: usize, m: usize) -> Mat<T> {
        Mat::from_fn(b, m, |i, j| T::of(g[j * b + i]))
    }

    /// ‖u − u_ref‖_∞ / ‖u_ref‖_∞ over the flattened direction.
    fn rel_err<T: Scalar>(u: MatRef<'_, T>, want: &[f64]) -> f64 {
        let b = u.nrows();
        let mut diff = 0.0f64;
        let mut scale = 0.0f64;
        for j in 0..u.ncols() {
            for i in 0..b {
                let w = want[j * b + i];
                diff = diff.max((u[(i, j)].f64() - w).abs());
                scale = scale.max(w.abs());
            }
        }
        diff / scale.max(1e-300)
    }

    /// How one step's direction compares with the oracle's.
    #[derive(Debug)]
    struct StepError {
        /// ‖u − u_ref‖_∞ / ‖u_ref‖_∞.
        forward: f64,
        /// ‖(H + εI)^{1/2} u + g‖₂ / ‖g‖₂ with the oracle's H: the relative residual of the
        /// equation that defines u.
        residual: f64,
        /// cond(H + εI) = (λ_max + ε) / (λ_min + ε).
        cond: f64,
    }

    /// Runs `grads` through a `FullMatrix<T>`; returns every step's error against `want`.
    fn run<T: Scalar>(
        config: FullMatrixConfig,
        b: usize,
        m: usize,
        grads: &[Vec<f64>],
        want: &[OracleStep],
    ) -> Vec<StepError> {
        let n = b * m;
        let eps = config.eps;
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut opt = FullMatrix::<T>::new(config, b, m).unwrap();
        let mut dir = Mat::<T>::zeros(b, m);
        let mut errors = Vec::new();
        for (g, w) in grads.iter().zip(want) {
            opt.precondition(to_mat::<T>(g, b, m).as_ref(), dir.as_mut())
                .unwrap();
            let u: Vec<f64> = (0..n).map(|k| dir[(k % b, k / b)].f64()).collect();
            let mut res = g.clone();
            for k in 0..n {
                let proj: f64 = (0..n).map(|r| w.vecs[r][k] * u[r]).sum();
                let scaled = proj * (w.vals[k] + eps).sqrt();
                for r in 0..n {
                    res[r] += w.vecs[r][k] * scaled;
                }
            }
            let hi = w.vals.iter().fold(0.0f64, |a, &v| a.max(v));
            let lo = w.vals.iter().fold(f64::INFINITY, |a, &v| a.min(v));
            errors.push(StepError {
                forward: rel_err(dir.as_ref(), &w.u),
                residual: norm(&res) / norm(g).max(1e-300),
                cond: (hi + eps) / (lo + eps),
            });
        }
        assert_eq!(opt.steps(), grads.len() as u64);
        errors
    }

    fn max_of(errors: &[StepError], f: impl Fn(&StepError) -> f64) -> f64 {
        errors.iter().map(f).fold(0.0, f64::max)
    }

    /// Asserts the f64 and f32 bounds and prints the measured errors. f64: forward ≤ 1e-9 and
    /// residual ≤ 1e-12 at every step. f32: the statistics carry relative round-off
    /// 2^-24 ≈ 6e-8, which moves the direction by up to about 2^-24·cond(H + εI); while H is
    /// rank deficient (t < n) cond reaches 1e8 with ε = 1e-6 and no f32 method can match the
    /// exact answer to 1e-3 (the exact direction of the f32-rounded H is itself off by 3e-3).
    /// So the f32 forward error is held to 1e-3 on steps with cond ≤ 1e4 and to 1e-6·cond
    /// beyond, and the residual to 1e-3 at every step.
    /// Returns the f32 forward error over all steps.
    fn check(name: &str, e64: &[StepError], e32: &[StepError]) -> f64 {
        let forward64 = max_of(e64, |e| e.forward);
        let residual64 = max_of(e64, |e| e.residual);
        let forward32_all = max_of(e32, |e| e.forward);
        let well: Vec<&StepError> = e32.iter().filter(|e| e.cond <= 1e4).collect();
        let forward32 = well.iter().map(|e| e.forward).fold(0.0, f64::max);
        let ratio32 = max_of(e32, |e| e.forward / e.cond);
        let residual32 = max_of(e32, |e| e.residual);
        println!(
            "{name}: f64 max forward rel err {forward64:.3e}, residual {residual64:.3e}; \
             f32 max forward rel err {forward32:.3e} on the {} of {} steps with cond <= 1e4 \
             ({forward32_all:.3e} on all, max cond {:.1e}), max forward/cond {ratio32:.3e}, \
             residual {residual32:.3e}",
            well.len(),
            e32.len(),
            max_of(e32, |e| e.cond),
        );
        assert!(forward64 <= 1e-9, "{name}: f64 forward error {forward64}");
        assert!(residual64 <= 1e-12, "{name}: f64 residual {residual64}");
        assert!(!well.is_empty(), "{name}: no well-conditioned step");
        assert!(forward32 <= 1e-3, "{name}: f32 forward error {forward32}");
        assert!(
            ratio32 <= 1e-6,
            "{name}: f32 forward error / cond {ratio32}"
        );
        assert!(residual32 <= 1e-3, "{name}: f32 residual {residual32}");
        forward32_all
    }

    #[test]
    fn matches_oracle_over_20_steps() {
        let (b, m) = (4, 3);
        let grads = flat_gradients(b * m, 20, 21);
        for (name, config) in [
            ("sum (beta2 = 1)", FullMatrixConfig::default()),
            (
                "ema (beta2 = 0.9)",
                FullMatrixConfig {
                    beta2: 0.9,
                    ..Default::default()
                },
            ),
        ] {
            let want = oracle(&config, &grads);
            let e64 = run::<f64>(config, b, m, &grads, &want);
            let e32 = run::<f32>(config, b, m, &grads, &want);
            let _ = check(&format!("(4, 3) {name}"), &e64, &e32);
        }
        // With ε = 1e-2, cond(H + εI) stays below 1e5 from the first step and f32 meets 1e-3
        // at every step.
        let config = FullMatrixConfig {
            eps: 1e-2,
            ..Default::default()
        };
        let want = oracle(&config, &grads);
        let e64 = run::<f64>(config, b, m, &grads, &want);
        let e32 = run::<f32>(config, b, m, &grads, &want);
        let all32 = check("(4, 3) sum, eps = 1e-2", &e64, &e32);
        assert!(all32 <= 1e-3, "f32 forward error with eps = 1e-2: {all32}");
    }

    #[test]
    fn single_column_is_block_diagonal_adagrad_of_that_column() {
        let b = 6;
        let config = FullMatrixConfig::default();
        let grads = flat_gradients(b, 20, 22);
        let want = oracle(&config, &grads);
        let e64 = run::<f64>(config, b, 1, &grads, &want);
        let e32 = run::<f32>(config, b, 1, &grads, &want);
        let _ = check("(6, 1)", &e64, &e32);

        // The crate's block-diagonal Adagrad of the column (Block Adam with one block of b rows,
        // β1 = 0, β2 = 1) gives the same directions.
        let block_config = BlockAdamConfig {
            block_size: b,
            beta1: 0.0,
            beta2: 1.0,
            eps: config.eps,
            ..Default::default()
        };
        let mut full = FullMatrix::<f64>::new(config, b, 1).unwrap();
        let mut block = BlockAdam::<f64>::new(&block_config, b, 1).unwrap();
        let (mut df, mut db) = (Mat::<f64>::zeros(b, 1), Mat::<f64>::zeros(b, 1));
        let mut vs_block = 0.0f64;
        for g in &grads {
            let g = to_mat::<f64>(g, b, 1);
            full.precondition(g.as_ref(), df.as_mut()).unwrap();
            block.precondition(g.as_ref(), db.as_mut()).unwrap();
            let flat: Vec<f64> = (0..b).map(|i| db[(i, 0)]).collect();
            vs_block = vs_block.max(rel_err(df.as_ref(), &flat));
        }
        println!(
            "(6, 1): max rel err vs BlockAdam(s = b, beta1 = 0, beta2 = 1) f64 {vs_block:.3e}"
        );
        assert!(vs_block <= 1e-9, "vs block Adagrad {vs_block}");

        // With m > 1 the columns are coupled: per-column Adagrad is a different method.
        let (b, m) = (4, 3);
        let grads = flat_gradients(b * m, 5, 23);
        let want = oracle(&config, &grads);
        let per_column: Vec<Vec<f64>> = {
            let cols: Vec<Vec<OracleStep>> = (0..m)
                .map(|j| {
                    let gj: Vec<Vec<f64>> = grads
                        .iter()
                        .map(|g| g[j * b..(j + 1) * b].to_vec())
                        .collect();
                    oracle(&config, &gj)
                })
                .collect();
            (0..grads.len())
                .map(|t| (0..m).flat_map(|j| cols[j][t].u.clone()).collect())
                .collect()
        };
        let differs = per_column
            .iter()
            .zip(want.iter().map(|w| &w.u))
            .skip(1)
            .map(|(p, w)| {
                let scale = w.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                p.iter()
                    .zip(w)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max)
                    / scale
            })
            .fold(0.0, f64::max);
        assert!(differs > 1e-2, "full matrix equals per-column: {differs}");
    }

    #[test]
    fn too_large_parameters_are_refused() {
        let config = FullMatrixConfig::default();
        let err = FullMatrix::<f32>::new(config, 4097, 1).unwrap_err();
        match &err {
            PrecondError::InvalidConfig {
                field,
                value,
                reason,
            } => {
                assert_eq!(*field, "max_dim");
                assert!(value.contains("4097"), "{value}");
                assert!(reason.contains("small parameters"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        println!("{err}");
        let small = FullMatrixConfig {
            max_dim: 11,
            ..Default::default()
        };
        assert!(matches!(
            FullMatrix::<f64>::new(small, 4, 3),
            Err(PrecondError::InvalidConfig {
                field: "max_dim",
                ..
            })
        ));
        assert!(matches!(
            FullMatrix::<f64>::new(config, usize::MAX, 2),
            Err(PrecondError::InvalidConfig {
                field: "max_dim",
                ..
            })
        ));
        FullMatrix::<f64>::new(
            FullMatrixConfig {
                max_dim: 12,
                ..Default::default()
            },
            4,
            3,
        )
        .unwrap();
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let d = FullMatrixConfig::default();
        let field = |c: FullMatrixConfig| match FullMatrix::<f64>::new(c, 4, 3) {
            Err(PrecondError::InvalidConfig { field, .. }) => field,
            other => panic!("{c:?}: {other:?}"),
        };
        assert_eq!(field(FullMatrixConfig { eps: 0.0, ..d }), "eps");
        assert_eq!(field(FullMatrixConfig { eps: f64::NAN, ..d }), "eps");
        assert_eq!(field(FullMatrixConfig { beta2: 0.0, ..d }), "beta2");
        assert_eq!(field(FullMatrixConfig { beta2: 1.5, ..d }), "beta2");
        assert_eq!(field(FullMatrixConfig { max_dim: 0, ..d }), "max_dim");
        assert!(matches!(
            FullMatrix::<f64>::new(d, 4, 0),
            Err(PrecondError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn state_bytes_is_n_squared() {
        let opt = FullMatrix::<f32>::new(FullMatrixConfig::default(), 64, 64).unwrap();
        assert_eq!(opt.state_bytes(), 4096 * 4096 * 4);
        let opt = FullMatrix::<f64>::new(FullMatrixConfig::default(), 4, 3).unwrap();
        assert_eq!(opt.state_bytes(), 12 * 12 * 8);
        assert_eq!(opt.dim(), 12);
        assert_eq!(opt.statistics().nrows(), 12);
    }

    #[test]
    fn wrong_shapes_are_rejected() {
        let mut opt = FullMatrix::<f64>::new(FullMatrixConfig::default(), 4, 3).unwrap();
        let mut dir = Mat::<f64>::zeros(4, 3);
        let err = opt
            .precondition(Mat::<f64>::zeros(3, 4).as_ref(), dir.as_mut())
            .unwrap_err();
        assert_eq!(
            err,
            PrecondError::ShapeMismatch {
                expected: "gradient of shape (4, 3)".into(),
                got: "(3, 4)".into(),
            }
        );
        let mut small = Mat::<f64>::zeros(4, 2);
        let err = opt
            .precondition(Mat::<f64>::zeros(4, 3).as_ref(), small.as_mut())
            .unwrap_err();
        assert!(matches!(err, PrecondError::ShapeMismatch { .. }), "{err:?}");
        assert_eq!(opt.steps(), 0);
    }

    /// Runs `grads[..k]` on `a` and `fresh`, feeds `bad` to `a` expecting `expected`, then checks
    /// that both continue identically.
    fn refused_step_leaves_state_unchanged<T: Scalar>(
        grads: &[Vec<f64>],
        k: usize,
        bad: Mat<T>,
        expected: impl Fn(&PrecondError) -> bool,
    ) {
        let (b, m) = (bad.nrows(), bad.ncols());
        let config = FullMatrixConfig::default();
        let mut a = FullMatrix::<T>::new(config, b, m).unwrap();
        let mut fresh = FullMatrix::<T>::new(config, b, m).unwrap();
        let (mut da, mut df) = (Mat::<T>::zeros(b, m), Mat::<T>::zeros(b, m));
        for g in &grads[..k] {
            a.precondition(to_mat::<T>(g, b, m).as_ref(), da.as_mut())
                .unwrap();
            fresh
                .precondition(to_mat::<T>(g, b, m).as_ref(), df.as_mut())
                .unwrap();
        }
        let before: Vec<T> = a.stat.clone();
        let err = a.precondition(bad.as_ref(), da.as_mut()).unwrap_err();
        assert!(expected(&err), "{err:?}");
        assert_eq!(a.steps(), k as u64);
        assert_eq!(a.stat, before);
        for g in &grads[k..] {
            a.precondition(to_mat::<T>(g, b, m).as_ref(), da.as_mut())
                .unwrap();
            fresh
                .precondition(to_mat::<T>(g, b, m).as_ref(), df.as_mut())
                .unwrap();
            assert_eq!(da, df);
        }
    }

    #[test]
    fn non_finite_gradient_leaves_state_unchanged() {
        let (b, m) = (4, 3);
        let grads = flat_gradients(b * m, 6, 24);
        let mut bad = to_mat::<f64>(&grads[3], b, m);
        bad[(2, 1)] = f64::NAN;
        refused_step_leaves_state_unchanged(&grads, 3, bad, |e| {
            *e == PrecondError::NonFiniteGradient {
                step: 4,
                param: None,
            }
        });
    }

    #[test]
    fn failed_eigendecomposition_leaves_state_unchanged() {
        // 1e20² overflows f32: H becomes infinite and the step must fail.
        let (b, m) = (4, 3);
        let grads = flat_gradients(b * m, 5, 25);
        let mut huge = to_mat::<f32>(&grads[2], b, m);
        huge[(1, 1)] = 1e20;
        refused_step_leaves_state_unchanged(&grads, 2, huge, |e| {
            matches!(e, PrecondError::LinalgFailure { step: 3, .. })
        });
    }

    #[test]
    fn serde_round_trip_continues_bitwise() {
        let (b, m) = (4, 3);
        let config = FullMatrixConfig {
            beta2: 0.95,
            ..Default::default()
        };
        let grads = flat_gradients(b * m, 8, 26);
        let mut a = FullMatrix::<f32>::new(config, b, m).unwrap();
        let mut da = Mat::<f32>::zeros(b, m);
        for g in &grads[..4] {
            a.precondition(to_mat::<f32>(g, b, m).as_ref(), da.as_mut())
                .unwrap();
        }
        let saved = serde_json::to_string(&a).unwrap();
        let mut restored: FullMatrix<f32> = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored.steps(), 4);
        assert_eq!(restored.config(), &config);
        assert_eq!(restored.stat, a.stat);
        let mut db = Mat::<f32>::zeros(b, m);
        for g in &grads[4..] {
            let g = to_mat::<f32>(g, b, m);
            a.precondition(g.as_ref(), da.as_mut()).unwrap();
            restored.precondition(g.as_ref(), db.as_mut()).unwrap();
            assert_eq!(da, db);
        }
        let defaulted: FullMatrixConfig = serde_json::from_str(r#"{"eps": 1e-4}"#).unwrap();
        assert_eq!(
            defaulted,
            FullMatrixConfig {
                eps: 1e-4,
                ..Default::default()
            }
        );

        let mut json: serde_json::Value = serde_json::to_value(&a).unwrap();
        json["stat"] = serde_json::json!([1.0]);
        let mut bad: FullMatrix<f32> = serde_json::from_value(json).unwrap();
        let err = bad
            .precondition(to_mat::<f32>(&grads[0], b, m).as_ref(), da.as_mut())
            .unwrap_err();
        assert!(matches!(err, PrecondError::StateMismatch(_)), "{err:?}");
    }
}
