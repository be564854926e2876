//! The diagonal (per-element) methods of `torch.optim` as one [`Preconditioner`]: SGD with
//! momentum, Adagrad, RMSprop, Adam and AdamW, for one parameter seen as a (b, m) matrix.
//!
//! The direction u is the update **before** the learning rate, minus sign included, so that the
//! parameter moves as θ ← θ + lr·u exactly as `torch.optim` moves it. Per element, with g the
//! gradient and t the 1-based step:
//!
//! * [`DiagonalKind::Sgd`] (`torch.optim.SGD`, momentum β1, dampening 0): with β1 = 0,
//!   u = −g and no buffer is kept. Otherwise buf ← g at t = 1 and buf ← β1 buf + g after,
//!   u = −(g + β1 buf) with Nesterov, u = −buf without.
//! * [`DiagonalKind::Adagrad`] (`torch.optim.Adagrad`, lr_decay 0): v starts at
//!   `initial_accumulator`, v ← v + g², u = −g / (√v + eps).
//! * [`DiagonalKind::Rmsprop`] (`torch.optim.RMSprop`, alpha = β2, centered false,
//!   momentum 0): v ← α v + (1 − α) g², u = −g / (√v + eps).
//! * [`DiagonalKind::Adam`] (`torch.optim.Adam`, amsgrad false): m ← β1 m + (1 − β1) g,
//!   v ← β2 v + (1 − β2) g², u = −(m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + eps), evaluated as torch
//!   does, √v / √(1 − β2ᵗ) + eps.
//! * [`DiagonalKind::AdamW`] (`torch.optim.AdamW`): the same u as Adam. AdamW's decoupled decay
//!   θ ← θ − lr·λ·θ needs θ, which a [`Preconditioner`] never sees; it is applied by the caller
//!   (the crate's [`crate::weight_decay`] decoupled mode does θ ← θ − lr·rate·θ_t + lr·u). The
//!   `weight_decay` field is kept here for that caller and read back by
//!   [`Diagonal::decoupled_decay`].
//!
//! torch's coupled `weight_decay` of SGD/Adagrad/RMSprop/Adam also needs θ; use the crate's
//! coupled weight decay for it. Bias corrections are computed in f64 (torch computes them as
//! Python floats) and rounded to `T` once per step.
//!
//! A step checks shapes and finiteness before it touches the state; after those checks it cannot
//! fail. As in torch, a finite gradient large enough to overflow `T` (g² in f32) propagates
//! into the state.

use crate::error::{invalid, PrecondError, Result};
use crate::preconditioner::{check_finite, check_shapes, check_view, Preconditioner};
use crate::scalar::Scalar;
use faer::{MatMut, MatRef};
use serde::{Deserialize, Serialize};

/// Which `torch.optim` method the state follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiagonalKind {
    /// `torch.optim.SGD` with momentum β1 (0: plain SGD) and dampening 0.
    Sgd,
    /// `torch.optim.Adagrad` with lr_decay 0.
    Adagrad,
    /// `torch.optim.RMSprop` with alpha = β2, centered false and momentum 0.
    Rmsprop,
    /// `torch.optim.Adam` (amsgrad false).
    #[default]
    Adam,
    /// `torch.optim.AdamW`: Adam's direction; the decoupled decay is the caller's (see
    /// [`Diagonal::decoupled_decay`]).
    AdamW,
}

/// Hyperparameters of the diagonal methods (torch's names in parentheses).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiagonalConfig {
    /// The method. Default Adam.
    pub kind: DiagonalKind,
    /// Adam/AdamW β1 (`betas[0]`) and SGD `momentum`; in [0, 1). Unused by Adagrad and RMSprop.
    /// Default 0.9.
    pub beta1: f64,
    /// Adam/AdamW β2 (`betas[1]`) and RMSprop `alpha`; in [0, 1) for those kinds, unused (but
    /// still in [0, 1]) otherwise. Default 0.999.
    pub beta2: f64,
    /// Added to the root of the second moment (Adagrad, RMSprop, Adam, AdamW); finite and > 0.
    /// Unused by SGD. Default 1e-8.
    pub eps: f64,
    /// AdamW's decoupled decay rate λ, finite and ≥ 0; applied by the caller. Must be 0 for the
    /// other kinds. Default 0.
    pub weight_decay: f64,
    /// SGD's Nesterov momentum; needs β1 > 0 and is rejected for the other kinds. Default false.
    pub nesterov: bool,
    /// Adagrad's `initial_accumulator_value`, finite and ≥ 0; must be 0 for the other kinds.
    /// Default 0.
    pub initial_accumulator: f64,
}

impl Default for DiagonalConfig {
    fn default() -> Self {
        Self {
            kind: DiagonalKind::Adam,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            nesterov: false,
            initial_accumulator: 0.0,
        }
    }
}

impl DiagonalConfig {
    /// Checks every field; returns an error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        use DiagonalKind::*;
        if !(self.beta1 >= 0.0 && self.beta1 < 1.0) {
            return Err(invalid("beta1", self.beta1, "must be in [0, 1)"));
        }
        if !(self.beta2 >= 0.0 && self.beta2 <= 1.0) {
            return Err(invalid("beta2", self.beta2, "must be in [0, 1]"));
        }
        if matches!(self.kind, Rmsprop | Adam | AdamW) && self.beta2 >= 1.0 {
            return Err(invalid(
                "beta2",
                self.beta2,
                "must be below 1 for RMSprop (alpha), Adam and AdamW",
            ));
        }
        if self.kind != Sgd && !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(
                "weight_decay",
                self.weight_decay,
                "must be finite and >= 0",
            ));
        }
        if self.kind != AdamW && self.weight_decay != 0.0 {
            return Err(invalid(
                "weight_decay",
                self.weight_decay,
                "is AdamW's decoupled decay and must be 0 for other kinds (use the optimizer's \
                 weight decay instead)",
            ));
        }
        if self.nesterov && self.kind != Sgd {
            return Err(invalid("nesterov", self.nesterov, "is used by SGD only"));
        }
        if self.nesterov && self.beta1 == 0.0 {
            return Err(invalid(
                "nesterov",
                self.nesterov,
                "Nesterov momentum requires beta1 (momentum) > 0",
            ));
        }
        if !(self.initial_accumulator.is_finite() && self.initial_accumulator >= 0.0) {
            return Err(invalid(
                "initial_accumulator",
                self.initial_accumulator,
                "must be finite and >= 0",
            ));
        }
        if self.kind != Adagrad && self.initial_accumulator != 0.0 {
            return Err(invalid(
                "initial_accumulator",
                self.initial_accumulator,
                "is used by Adagrad only and must be 0 for other kinds",
            ));
        }
        Ok(())
    }

    /// Number of b·m-element buffers the state keeps: SGD 1 (0 with β1 = 0), Adagrad 1,
    /// RMSprop 1, Adam and AdamW 2.
    pub fn buffers(&self) -> usize {
        match self.kind {
            DiagonalKind::Sgd => usize::from(self.beta1 > 0.0),
            DiagonalKind::Adagrad | DiagonalKind::Rmsprop => 1,
            DiagonalKind::Adam | DiagonalKind::AdamW => 2,
        }
    }

    fn has_first(&self) -> bool {
        match self.kind {
            DiagonalKind::Sgd => self.beta1 > 0.0,
            DiagonalKind::Adagrad | DiagonalKind::Rmsprop => false,
            DiagonalKind::Adam | DiagonalKind::AdamW => true,
        }
    }

    fn has_second(&self) -> bool {
        self.kind != DiagonalKind::Sgd
    }
}

/// State of one parameter: the first-moment buffer (SGD momentum buffer or Adam's m) and the
/// second-moment buffer (Adagrad's sum, RMSprop's square average or Adam's v), each
/// column-major b × m and empty when the kind keeps none.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Diagonal<T: Scalar> {
    config: DiagonalConfig,
    rows: usize,
    blocks: usize,
    step: u64,
    /// SGD momentum buffer or Adam/AdamW m; empty otherwise.
    first: Vec<T>,
    /// Adagrad sum, RMSprop square average or Adam/AdamW v; empty for SGD.
    second: Vec<T>,
}

impl<T: Scalar> Diagonal<T> {
    /// New state for a (b, m) = (`rows`, `blocks`) parameter view (Adagrad's sum starts at
    /// `initial_accumulator`, every other buffer at 0).
    pub fn new(config: DiagonalConfig, rows: usize, blocks: usize) -> Result<Self> {
        config.validate()?;
        check_view(rows, blocks)?;
        if config.kind != DiagonalKind::Sgd && T::of(config.eps) <= T::zero() {
            return Err(invalid(
                "eps",
                config.eps,
                "rounds to 0 in this precision: use a larger eps",
            ));
        }
        let n = rows
            .checked_mul(blocks)
            .ok_or_else(|| PrecondError::ShapeMismatch {
                expected: "b·m addressable".into(),
                got: format!("({rows}, {blocks})"),
            })?;
        let first = if config.has_first() {
            vec![T::zero(); n]
        } else {
            Vec::new()
        };
        let second = if config.has_second() {
            vec![T::of(config.initial_accumulator); n]
        } else {
            Vec::new()
        };
        Ok(Self {
            config,
            rows,
            blocks,
            step: 0,
            first,
            second,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DiagonalConfig {
        &self.config
    }

    /// The method.
    pub fn kind(&self) -> DiagonalKind {
        self.config.kind
    }

    /// (b, m) this state was built for.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.blocks)
    }

    /// The decoupled decay rate λ the caller applies as θ ← θ − lr·λ·θ (AdamW's
    /// `weight_decay`; 0 for every other kind).
    pub fn decoupled_decay(&self) -> f64 {
        if self.config.kind == DiagonalKind::AdamW {
            self.config.weight_decay
        } else {
            0.0
        }
    }

    /// The SGD momentum buffer or Adam's m (b × m, not bias-corrected); `None` when the kind
    /// keeps none.
    pub fn first_moment(&self) -> Option<MatRef<'_, T>> {
        (!self.first.is_empty())
            .then(|| MatRef::from_column_major_slice(&self.first, self.rows, self.blocks))
    }

    /// Adagrad's sum, RMSprop's square average or Adam's v (b × m, not bias-corrected); `None`
    /// for SGD.
    pub fn second_moment(&self) -> Option<MatRef<'_, T>> {
        (!self.second.is_empty())
            .then(|| MatRef::from_column_major_slice(&self.second, self.rows, self.blocks))
    }

    fn check_state(&self) -> Result<()> {
        let n = self.rows * self.blocks;
        let want = |has: bool| if has { n } else { 0 };
        if self.first.len() != want(self.config.has_first())
            || self.second.len() != want(self.config.has_second())
        {
            return Err(PrecondError::StateMismatch(format!(
                "{:?} state for ({}, {}) holds {} first-moment and {} second-moment values",
                self.config.kind,
                self.rows,
                self.blocks,
                self.first.len(),
                self.second.len()
            )));
        }
        Ok(())
    }
}

impl<T: Scalar> Preconditioner<T> for Diagonal<T> {
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

        let c = self.config;
        let t = self.step + 1;
        let beta1 = T::of(c.beta1);
        let beta2 = T::of(c.beta2);
        let one_minus_beta1 = T::of(1.0 - c.beta1);
        let one_minus_beta2 = T::of(1.0 - c.beta2);
        let eps = T::of(c.eps);
        let at = |i: usize, j: usize| j * b + i;
        match c.kind {
            DiagonalKind::Sgd if c.beta1 == 0.0 => {
                for j in 0..m {
                    for i in 0..b {
                        direction[(i, j)] = -grad[(i, j)];
                    }
                }
            }
            DiagonalKind::Sgd => {
                let first_step = t == 1;
                for j in 0..m {
                    for i in 0..b {
                        let g = grad[(i, j)];
                        let buf = &mut self.first[at(i, j)];
                        *buf = if first_step { g } else { beta1 * *buf + g };
                        direction[(i, j)] = if c.nesterov {
                            -(g + beta1 * *buf)
                        } else {
                            -*buf
                        };
                    }
                }
            }
            DiagonalKind::Adagrad => {
                for j in 0..m {
                    for i in 0..b {
                        let g = grad[(i, j)];
                        let v = &mut self.second[at(i, j)];
                        *v += g * g;
                        direction[(i, j)] = -g / (v.sqrt() + eps);
                    }
                }
            }
            DiagonalKind::Rmsprop => {
                for j in 0..m {
                    for i in 0..b {
                        let g = grad[(i, j)];
                        let v = &mut self.second[at(i, j)];
                        *v = beta2 * *v + one_minus_beta2 * (g * g);
                        direction[(i, j)] = -g / (v.sqrt() + eps);
                    }
                }
            }
            DiagonalKind::Adam | DiagonalKind::AdamW => {
                let tf = t as f64;
                let step_size = T::of(1.0 / (1.0 - c.beta1.powf(tf)));
                let correction2_sqrt = T::of((1.0 - c.beta2.powf(tf)).sqrt());
                for j in 0..m {
                    for i in 0..b {
                        let g = grad[(i, j)];
                        let k = at(i, j);
                        let mk = &mut self.first[k];
                        *mk = beta1 * *mk + one_minus_beta1 * g;
                        let vk = &mut self.second[k];
                        *vk = beta2 * *vk + one_minus_beta2 * (g * g);
                        let denom = vk.sqrt() / correction2_sqrt + eps;
                        direction[(i, j)] = -(self.first[k] * step_size) / denom;
                    }
                }
            }
        }
        self.step = t;
        Ok(())
    }

    /// (number of buffers kept) · b · m · `size_of::<T>()`: SGD 1 (0 with β1 = 0), Adagrad 1,
    /// RMSprop 1, Adam and AdamW 2.
    fn state_bytes(&self) -> usize {
        (self.first.len() + self.second.len()) * std::mem::size_of::<T>()
    }

    fn steps(&self) -> u64 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    //! Tests against a plain f64 oracle of each `torch.optim` formula on nested vectors.

    use super::*;
    use crate::testing::flat_gradients;
    use faer::Mat;

    const B: usize = 7;
    const M: usize = 3;
    const STEPS: usize = 50;

    /// The torch update of every step in plain f64, written from the formulas in the docs.
    fn oracle(c: &DiagonalConfig, grads: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let n = grads[0].len();
        let (b1, b2, eps) = (c.beta1, c.beta2, c.eps);
        let mut buf = vec![0.0f64; n];
        let mut m = vec![0.0f64; n];
        let mut v = vec![c.initial_accumulator; n];
        let mut out = Vec::new();
        for (s, g) in grads.iter().enumerate() {
            let t = (s + 1) as i32;
            let mut u = vec![0.0f64; n];
            for k in 0..n {
                u[k] = match c.kind {
                    DiagonalKind::Sgd => {
                        if b1 == 0.0 {
                            -g[k]
                        } else {
                            buf[k] = if t == 1 { g[k] } else { b1 * buf[k] + g[k] };
                            if c.nesterov {
                                -(g[k] + b1 * buf[k])
                            } else {
                                -buf[k]
                            }
                        }
                    }
                    DiagonalKind::Adagrad => {
                        v[k] += g[k] * g[k];
                        -g[k] / (v[k].sqrt() + eps)
                    }
                    DiagonalKind::Rmsprop => {
                        v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                        -g[k] / (v[k].sqrt() + eps)
                    }
                    DiagonalKind::Adam | DiagonalKind::AdamW => {
                        m[k] = b1 * m[k] + (1.0 - b1) * g[k];
                        v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                        let mhat = m[k] / (1.0 - b1.powi(t));
                        let vhat = v[k] / (1.0 - b2.powi(t));
                        -mhat / (vhat.sqrt() + eps)
                    }
                };
            }
            out.push(u);
        }
        out
    }

    fn to_mat<T: Scalar>(g: &[f64], b: usize, m: usize) -> Mat<T> {
        Mat::from_fn(b, m, |i, j| T::of(g[j * b + i]))
    }

    /// ‖u − u_ref‖_∞ / ‖u_ref‖_∞ of one step.
    fn rel_err<T: Scalar>(u: MatRef<'_, T>, want: &[f64]) -> f64 {
        let (b, m) = (u.nrows(), u.ncols());
        let mut diff = 0.0f64;
        let mut scale = 0.0f64;
        for j in 0..m {
            for i in 0..b {
                let w = want[j * b + i];
                diff = diff.max((u[(i, j)].f64() - w).abs());
                scale = scale.max(w.abs());
            }
        }
        diff / scale.max(1e-300)
    }

    /// Max over steps of the relative error of a `Diagonal<T>` against the oracle.
    fn run<T: Scalar>(c: &DiagonalConfig, grads: &[Vec<f64>]) -> f64 {
        let want = oracle(c, grads);
        let mut opt = Diagonal::<T>::new(*c, B, M).unwrap();
        let mut dir = Mat::<T>::zeros(B, M);
        let mut worst = 0.0f64;
        for (g, w) in grads.iter().zip(&want) {
            opt.precondition(to_mat::<T>(g, B, M).as_ref(), dir.as_mut())
                .unwrap();
            worst = worst.max(rel_err(dir.as_ref(), w));
        }
        assert_eq!(opt.steps(), grads.len() as u64);
        worst
    }

    /// Every kind in several settings (defaults and non-default hyperparameters).
    fn configs() -> Vec<(&'static str, DiagonalConfig)> {
        let d = DiagonalConfig::default();
        vec![
            (
                "sgd (beta1 = 0)",
                DiagonalConfig {
                    kind: DiagonalKind::Sgd,
                    beta1: 0.0,
                    ..d
                },
            ),
            (
                "sgd momentum 0.9",
                DiagonalConfig {
                    kind: DiagonalKind::Sgd,
                    ..d
                },
            ),
            (
                "sgd nesterov 0.8",
                DiagonalConfig {
                    kind: DiagonalKind::Sgd,
                    beta1: 0.8,
                    nesterov: true,
                    ..d
                },
            ),
            (
                "adagrad",
                DiagonalConfig {
                    kind: DiagonalKind::Adagrad,
                    eps: 1e-10,
                    ..d
                },
            ),
            (
                "adagrad init 0.1",
                DiagonalConfig {
                    kind: DiagonalKind::Adagrad,
                    initial_accumulator: 0.1,
                    eps: 1e-3,
                    ..d
                },
            ),
            (
                "rmsprop alpha 0.99",
                DiagonalConfig {
                    kind: DiagonalKind::Rmsprop,
                    beta2: 0.99,
                    ..d
                },
            ),
            ("adam defaults", d),
            (
                "adam 0.8/0.95 eps 1e-3",
                DiagonalConfig {
                    beta1: 0.8,
                    beta2: 0.95,
                    eps: 1e-3,
                    ..d
                },
            ),
            (
                "adamw wd 0.01",
                DiagonalConfig {
                    kind: DiagonalKind::AdamW,
                    weight_decay: 0.01,
                    ..d
                },
            ),
        ]
    }

    #[test]
    fn every_kind_matches_torch_oracle_over_50_steps() {
        let grads = flat_gradients(B * M, STEPS, 11);
        for (name, c) in configs() {
            let e64 = run::<f64>(&c, &grads);
            let e32 = run::<f32>(&c, &grads);
            println!("{name:>24}: max rel err f64 {e64:.3e}, f32 {e32:.3e}");
            assert!(e64 <= 1e-12, "{name}: f64 rel err {e64}");
            assert!(e32 <= 1e-5, "{name}: f32 rel err {e32}");
        }
    }

    #[test]
    fn adamw_is_adam_plus_a_decay_for_the_caller() {
        let grads = flat_gradients(B * M, 10, 3);
        let adamw_config = DiagonalConfig {
            kind: DiagonalKind::AdamW,
            weight_decay: 0.05,
            ..Default::default()
        };
        let mut adam = Diagonal::<f64>::new(DiagonalConfig::default(), B, M).unwrap();
        let mut adamw = Diagonal::<f64>::new(adamw_config, B, M).unwrap();
        assert_eq!(adamw.decoupled_decay(), 0.05);
        assert_eq!(adam.decoupled_decay(), 0.0);
        let (mut da, mut dw) = (Mat::<f64>::zeros(B, M), Mat::<f64>::zeros(B, M));
        for g in &grads {
            let g = to_mat::<f64>(g, B, M);
            adam.precondition(g.as_ref(), da.as_mut()).unwrap();
            adamw.precondition(g.as_ref(), dw.as_mut()).unwrap();
            assert_eq!(da, dw);
        }
    }

    #[test]
    fn strided_gradient_views_are_read_correctly() {
        let grads = flat_gradients(B * M, 5, 4);
        let c = DiagonalConfig::default();
        let mut a = Diagonal::<f64>::new(c, B, M).unwrap();
        let mut b = Diagonal::<f64>::new(c, B, M).unwrap();
        let (mut da, mut db) = (Mat::<f64>::zeros(B, M), Mat::<f64>::zeros(B, M));
        for g in &grads {
            let g = to_mat::<f64>(g, B, M);
            let gt = g.transpose().to_owned();
            a.precondition(g.as_ref(), da.as_mut()).unwrap();
            b.precondition(gt.transpose(), db.as_mut()).unwrap();
            assert_eq!(da, db);
        }
    }

    #[test]
    fn state_bytes_is_buffers_times_elements() {
        let d = DiagonalConfig::default();
        let cases = [
            (
                DiagonalConfig {
                    kind: DiagonalKind::Sgd,
                    beta1: 0.0,
                    ..d
                },
                0,
            ),
            (
                DiagonalConfig {
                    kind: DiagonalKind::Sgd,
                    ..d
                },
                1,
            ),
            (
                DiagonalConfig {
                    kind: DiagonalKind::Adagrad,
                    ..d
                },
                1,
            ),
            (
                DiagonalConfig {
                    kind: DiagonalKind::Rmsprop,
                    ..d
                },
                1,
            ),
            (d, 2),
            (
                DiagonalConfig {
                    kind: DiagonalKind::AdamW,
                    weight_decay: 0.1,
                    ..d
                },
                2,
            ),
        ];
        for (c, buffers) in cases {
            assert_eq!(c.buffers(), buffers, "{c:?}");
            let s32 = Diagonal::<f32>::new(c, 1000, 784).unwrap();
            assert_eq!(s32.state_bytes(), buffers * 1000 * 784 * 4, "{c:?}");
            let s64 = Diagonal::<f64>::new(c, B, M).unwrap();
            assert_eq!(s64.state_bytes(), buffers * B * M * 8, "{c:?}");
            assert_eq!(s64.first_moment().is_some(), c.has_first());
            assert_eq!(s64.second_moment().is_some(), c.kind != DiagonalKind::Sgd);
        }
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let d = DiagonalConfig::default();
        let field = |c: DiagonalConfig| match Diagonal::<f64>::new(c, B, M) {
            Err(PrecondError::InvalidConfig { field, .. }) => field,
            other => panic!("{c:?}: {other:?}"),
        };
        assert_eq!(field(DiagonalConfig { beta1: 1.0, ..d }), "beta1");
        assert_eq!(field(DiagonalConfig { beta1: -0.1, ..d }), "beta1");
        assert_eq!(
            field(DiagonalConfig {
                beta1: f64::NAN,
                ..d
            }),
            "beta1"
        );
        assert_eq!(field(DiagonalConfig { beta2: 1.0, ..d }), "beta2");
        assert_eq!(
            field(DiagonalConfig {
                kind: DiagonalKind::Rmsprop,
                beta2: 1.0,
                ..d
            }),
            "beta2"
        );
        assert_eq!(field(DiagonalConfig { beta2: 1.5, ..d }), "beta2");
        assert_eq!(field(DiagonalConfig { eps: 0.0, ..d }), "eps");
        assert_eq!(
            field(DiagonalConfig {
                eps: f64::INFINITY,
                ..d
            }),
            "eps"
        );
        assert_eq!(
            field(DiagonalConfig {
                weight_decay: 0.1,
                ..d
            }),
            "weight_decay"
        );
        assert_eq!(
            field(DiagonalConfig {
                kind: DiagonalKind::AdamW,
                weight_decay: -1.0,
                ..d
            }),
            "weight_decay"
        );
        assert_eq!(
            field(DiagonalConfig {
                nesterov: true,
                ..d
            }),
            "nesterov"
        );
        assert_eq!(
            field(DiagonalConfig {
                kind: DiagonalKind::Sgd,
                beta1: 0.0,
                nesterov: true,
                ..d
            }),
            "nesterov"
        );
        assert_eq!(
            field(DiagonalConfig {
                initial_accumulator: 0.1,
                ..d
            }),
            "initial_accumulator"
        );
        assert_eq!(
            field(DiagonalConfig {
                kind: DiagonalKind::Adagrad,
                initial_accumulator: -0.1,
                ..d
            }),
            "initial_accumulator"
        );
        // Unused fields only need to be in range: SGD ignores eps and beta2 = 1 is fine there.
        for kind in [DiagonalKind::Sgd, DiagonalKind::Adagrad] {
            Diagonal::<f64>::new(
                DiagonalConfig {
                    kind,
                    beta2: 1.0,
                    ..d
                },
                B,
                M,
            )
            .unwrap();
        }
        Diagonal::<f64>::new(
            DiagonalConfig {
                kind: DiagonalKind::Sgd,
                eps: 0.0,
                ..d
            },
            B,
            M,
        )
        .unwrap();
        assert!(matches!(
            Diagonal::<f64>::new(d, 0, M),
            Err(PrecondError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn wrong_shapes_are_rejected_without_state_change() {
        let mut opt = Diagonal::<f64>::new(DiagonalConfig::default(), B, M).unwrap();
        let mut dir = Mat::<f64>::zeros(B, M);
        let err = opt
            .precondition(Mat::<f64>::zeros(B, M + 1).as_ref(), dir.as_mut())
            .unwrap_err();
        assert_eq!(
            err,
            PrecondError::ShapeMismatch {
                expected: format!("gradient of shape ({B}, {M})"),
                got: format!("({B}, {})", M + 1),
            }
        );
        let mut small = Mat::<f64>::zeros(B - 1, M);
        let err = opt
            .precondition(Mat::<f64>::zeros(B, M).as_ref(), small.as_mut())
            .unwrap_err();
        assert!(matches!(err, PrecondError::ShapeMismatch { .. }), "{err:?}");
        assert_eq!(opt.steps(), 0);
        assert_eq!(
            opt,
            Diagonal::<f64>::new(DiagonalConfig::default(), B, M).unwrap()
        );
    }

    #[test]
    fn non_finite_gradient_leaves_state_unchanged() {
        let grads = flat_gradients(B * M, 6, 5);
        for (name, c) in configs() {
            let mut a = Diagonal::<f32>::new(c, B, M).unwrap();
            let mut fresh = Diagonal::<f32>::new(c, B, M).unwrap();
            let (mut da, mut df) = (Mat::<f32>::zeros(B, M), Mat::<f32>::zeros(B, M));
            for g in &grads[..3] {
                a.precondition(to_mat::<f32>(g, B, M).as_ref(), da.as_mut())
                    .unwrap();
                fresh
                    .precondition(to_mat::<f32>(g, B, M).as_ref(), df.as_mut())
                    .unwrap();
            }
            let before = a.clone();
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut g = to_mat::<f32>(&grads[3], B, M);
                g[(B - 1, M - 1)] = bad;
                let err = a.precondition(g.as_ref(), da.as_mut()).unwrap_err();
                assert_eq!(
                    err,
                    PrecondError::NonFiniteGradient {
                        step: 4,
                        param: None
                    },
                    "{name}"
                );
                assert_eq!(a, before, "{name}");
            }
            for g in &grads[3..] {
                a.precondition(to_mat::<f32>(g, B, M).as_ref(), da.as_mut())
                    .unwrap();
                fresh
                    .precondition(to_mat::<f32>(g, B, M).as_ref(), df.as_mut())
                    .unwrap();
                assert_eq!(da, df, "{name}");
            }
        }
    }

    #[test]
    fn serde_round_trip_continues_bitwise() {
        let grads = flat_gradients(B * M, 8, 6);
        for (name, c) in configs() {
            let mut a = Diagonal::<f32>::new(c, B, M).unwrap();
            let mut da = Mat::<f32>::zeros(B, M);
            for g in &grads[..4] {
                a.precondition(to_mat::<f32>(g, B, M).as_ref(), da.as_mut())
                    .unwrap();
            }
            let saved = serde_json::to_string(&a).unwrap();
            let mut restored: Diagonal<f32> = serde_json::from_str(&saved).unwrap();
            assert_eq!(restored, a, "{name}");
            assert_eq!(restored.steps(), 4);
            let mut db = Mat::<f32>::zeros(B, M);
            for g in &grads[4..] {
                let g = to_mat::<f32>(g, B, M);
                a.precondition(g.as_ref(), da.as_mut()).unwrap();
                restored.precondition(g.as_ref(), db.as_mut()).unwrap();
                assert_eq!(da, db, "{name}");
            }
        }
        let defaulted: DiagonalConfig = serde_json::from_str(r#"{"kind": "AdamW"}"#).unwrap();
        assert_eq!(
            defaulted,
            DiagonalConfig {
                kind: DiagonalKind::AdamW,
                ..Default::default()
            }
        );
    }

    #[test]
    fn tampered_state_is_a_state_mismatch() {
        let a = Diagonal::<f64>::new(DiagonalConfig::default(), B, M).unwrap();
        let mut json: serde_json::Value = serde_json::to_value(&a).unwrap();
        json["second"] = serde_json::json!([1.0, 2.0]);
        let mut bad: Diagonal<f64> = serde_json::from_value(json).unwrap();
        let mut dir = Mat::<f64>::zeros(B, M);
        let err = bad
            .precondition(Mat::<f64>::zeros(B, M).as_ref(), dir.as_mut())
            .unwrap_err();
        assert!(matches!(err, PrecondError::StateMismatch(_)), "{err:?}");
        assert_eq!(bad.steps(), 0);
    }
}
