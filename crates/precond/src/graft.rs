//! Grafting (Agarwal et al., "Disentangling adaptive gradient methods from learning rates"):
//! a cheap diagonal method supplies the *norm* of each step, the preconditioner its *direction*.
//!
//! The paper grafts "similar to Shampoo" with RMSPROP_NORMALIZED, as Google's scalable_shampoo
//! (`distributed_shampoo.py`) does; NOTES §4 steps 1–2 give that recipe, which
//! [`GraftKind::RmspropNormalized`] follows exactly. All directions here are *descent*
//! directions, minus sign included: the parameter moves as θ ← θ + lr·r.

use crate::error::{invalid, PrecondError, Result};
use crate::linalg::PAR_CHUNK;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Which diagonal method supplies the step norm (and the direction when not preconditioning).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GraftKind {
    /// No grafting: the grafting direction is −g and the preconditioned direction is used
    /// unscaled ([`GraftState::rescale`] is a no-op).
    None,
    /// SGD: r = −g; the preconditioned direction gets the gradient's norm.
    Sgd,
    /// Adagrad: v ← v + g², r = −g / (√v + eps).
    Adagrad,
    /// RMSProp: v ← β2 v + (1 − β2) g², r = −g / (√v + eps) (β2 = 1 means v ← v + g², as in
    /// distributed_shampoo).
    Rmsprop,
    /// NOTES §4 step 1 (distributed_shampoo RMSPROP_NORMALIZED): s = g/‖g‖ (whole tensor; s = 0
    /// when ‖g‖ = 0), v ← β2 v + (1 − β2) s², r = −s / (√v + eps). The paper's choice.
    #[default]
    RmspropNormalized,
    /// Adam with bias correction: m ← β1 m + (1 − β1) g, v ← β2 v + (1 − β2) g²,
    /// r = −m̂ / (√v̂ + eps) with m̂ = m/(1 − β1ᵗ), v̂ = v/(1 − β2ᵗ).
    Adam,
}

/// Grafting hyperparameters. Defaults are distributed_shampoo's (NOTES §4).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GraftConfig {
    /// The grafting method.
    pub kind: GraftKind,
    /// First-moment decay, used by [`GraftKind::Adam`] only; in [0, 1). Default 0.9.
    pub beta1: f64,
    /// Second-moment decay for RMSProp kinds (in [0, 1]) and Adam (in [0, 1)). Default 0.999.
    pub beta2: f64,
    /// The `diagonal_eps` added to √v; finite and ≥ 0. Default 1e-10.
    pub eps: f64,
}

impl Default for GraftConfig {
    fn default() -> Self {
        Self {
            kind: GraftKind::RmspropNormalized,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-10,
        }
    }
}

impl GraftConfig {
    /// Checks every field; returns an error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta1 >= 0.0 && self.beta1 < 1.0) {
            return Err(invalid("graft.beta1", self.beta1, "must be in [0, 1)"));
        }
        if !(self.beta2 >= 0.0 && self.beta2 <= 1.0) {
            return Err(invalid("graft.beta2", self.beta2, "must be in [0, 1]"));
        }
        if self.kind == GraftKind::Adam && self.beta2 >= 1.0 {
            return Err(invalid(
                "graft.beta2",
                self.beta2,
                "must be below 1 for Adam (bias correction)",
            ));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(invalid("graft.eps", self.eps, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// Euclidean norm of a slice, accumulated in f64.
pub fn norm(x: &[f32]) -> f64 {
    // Eight f64 partial sums (element j into sum j mod 8), added pairwise at the end: the
    // chains overlap and vectorize; the rounding differs from one sequential sum only in f64's
    // last bits.
    const LANES: usize = 8;
    let mut sums = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (s, &a) in sums.iter_mut().zip(chunk) {
            *s += (a as f64) * (a as f64);
        }
    }
    for (s, &a) in sums.iter_mut().zip(tail) {
        *s += (a as f64) * (a as f64);
    }
    let quads = [
        sums[0] + sums[4],
        sums[1] + sums[5],
        sums[2] + sums[6],
        sums[3] + sums[7],
    ];
    ((quads[0] + quads[2]) + (quads[1] + quads[3])).sqrt()
}

/// NOTES §4 step 2: d ← d · ‖r‖ / (‖d‖ + 1e-16) (distributed_shampoo's grafting rescale).
pub fn rescale_to_norm(d: &mut [f32], r: &[f32]) {
    let scale = (norm(r) / (norm(d) + 1e-16)) as f32;
    d.par_chunks_mut(PAR_CHUNK)
        .for_each(|d| d.iter_mut().for_each(|x| *x *= scale));
}

/// Per-element grafting state of one parameter (flat, in the tensor's own layout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraftState {
    config: GraftConfig,
    len: usize,
    step: u64,
    /// Second moment (Adagrad / RMSProp kinds / Adam); empty otherwise.
    v: Vec<f32>,
    /// First moment (Adam); empty otherwise.
    m: Vec<f32>,
}

/// `num / den`, with 0 where `den` is 0: with `eps` = 0 an entry whose gradients have all been 0
/// has v = 0 and m = 0, and its direction is 0 (not 0/0).
#[inline(always)]
fn ratio(num: f32, den: f32) -> f32 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

impl GraftState {
    /// Fresh (zero) state for a parameter of `len` elements.
    pub fn new(config: &GraftConfig, len: usize) -> Result<Self> {
        config.validate()?;
        let (nv, nm) = match config.kind {
            GraftKind::None | GraftKind::Sgd => (0, 0),
            GraftKind::Adagrad | GraftKind::Rmsprop | GraftKind::RmspropNormalized => (len, 0),
            GraftKind::Adam => (len, len),
        };
        Ok(Self {
            config: *config,
            len,
            step: 0,
            v: vec![0.0; nv],
            m: vec![0.0; nm],
        })
    }

    /// The configuration this state was built with.
    pub fn config(&self) -> &GraftConfig {
        &self.config
    }

    /// Number of `direction` calls so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Bytes of per-element buffers held.
    pub fn state_bytes(&self) -> usize {
        (self.v.len() + self.m.len()) * std::mem::size_of::<f32>()
    }

    /// Updates the statistics with `grad` and writes the grafting descent direction r
    /// (minus sign included) into `out`. Errors (ShapeMismatch, no state change) when a length
    /// differs from the state's.
    pub fn direction(&mut self, grad: &[f32], out: &mut [f32]) -> Result<()> {
        if grad.len() != self.len || out.len() != self.len {
            return Err(PrecondError::ShapeMismatch {
                expected: format!("{} elements", self.len),
                got: format!("grad {} / out {} elements", grad.len(), out.len()),
            });
        }
        if self.v.len() != self.v_len() || self.m.len() != self.m_len() {
            return Err(PrecondError::StateMismatch(
                "grafting buffers have the wrong length".into(),
            ));
        }
        self.step += 1;
        let c = &self.config;
        let eps = c.eps as f32;
        match c.kind {
            GraftKind::None | GraftKind::Sgd => {
                for (o, &g) in out.iter_mut().zip(grad) {
                    *o = -g;
                }
            }
            GraftKind::Adagrad => {
                for ((o, &g), v) in out.iter_mut().zip(grad).zip(self.v.iter_mut()) {
                    *v += g * g;
                    *o = ratio(-g, v.sqrt() + eps);
                }
            }
            GraftKind::Rmsprop | GraftKind::RmspropNormalized => {
                let w1 = c.beta2 as f32;
                // distributed_shampoo: w2 = 1 when beta2 == 1.
                let w2 = if c.beta2 == 1.0 {
                    1.0
                } else {
                    (1.0 - c.beta2) as f32
                };
                let inv = if c.kind == GraftKind::RmspropNormalized {
                    let n = norm(grad);
                    if n > 0.0 {
                        (1.0 / n) as f32
                    } else {
                        0.0
                    }
                } else {
                    1.0
                };
                out.par_chunks_mut(PAR_CHUNK)
                    .zip(grad.par_chunks(PAR_CHUNK))
                    .zip(self.v.par_chunks_mut(PAR_CHUNK))
                    .for_each(|((out, grad), v)| {
                        for ((o, &g), v) in out.iter_mut().zip(grad).zip(v.iter_mut()) {
                            let s = g * inv;
                            *v = w1 * *v + w2 * s * s;
                            *o = ratio(-s, v.sqrt() + eps);
                        }
                    });
            }
            GraftKind::Adam => {
                let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
                let t = self.step.min(i32::MAX as u64) as i32;
                let bc1 = (1.0 - c.beta1.powi(t)) as f32;
                let bc2 = (1.0 - c.beta2.powi(t)) as f32;
                for (((o, &g), v), m) in out
                    .iter_mut()
                    .zip(grad)
                    .zip(self.v.iter_mut())
                    .zip(self.m.iter_mut())
                {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *o = ratio(-(*m / bc1), (*v / bc2).sqrt() + eps);
                }
            }
        }
        Ok(())
    }

    /// NOTES §4 step 2: rescales the preconditioned direction `precond_dir` to the norm of the
    /// grafting direction `graft_dir`, d · ‖r‖/(‖d‖ + 1e-16). A no-op for [`GraftKind::None`].
    pub fn rescale(&self, precond_dir: &mut [f32], graft_dir: &[f32]) {
        if self.config.kind != GraftKind::None {
            rescale_to_norm(precond_dir, graft_dir);
        }
    }

    fn v_len(&self) -> usize {
        match self.config.kind {
            GraftKind::None | GraftKind::Sgd => 0,
            _ => self.len,
        }
    }

    fn m_len(&self) -> usize {
        if self.config.kind == GraftKind::Adam {
            self.len
        } else {
            0
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random gradients with varying scale (LCG; no external RNG).
    pub(crate) fn grads(n: usize, steps: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        (0..steps)
            .map(|t| {
                let scale = 0.1 + (t % 5) as f64;
                (0..n).map(|_| (next() * scale) as f32).collect()
            })
            .collect()
    }

    /// Independent f64 reference of every graft kind.
    fn reference(kind: GraftKind, b1: f64, b2: f64, eps: f64, gs: &[Vec<f32>]) -> Vec<Vec<f64>> {
        let n = gs[0].len();
        let (mut v, mut m) = (vec![0.0f64; n], vec![0.0f64; n]);
        let mut out = Vec::new();
        for (t, g32) in gs.iter().enumerate() {
            let g: Vec<f64> = g32.iter().map(|&x| x as f64).collect();
            let t = (t + 1) as i32;
            let r: Vec<f64> = match kind {
                GraftKind::None | GraftKind::Sgd => g.iter().map(|x| -x).collect(),
                GraftKind::Adagrad => (0..n)
                    .map(|i| {
                        v[i] += g[i] * g[i];
                        -g[i] / (v[i].sqrt() + eps)
                    })
                    .collect(),
                GraftKind::Rmsprop => (0..n)
                    .map(|i| {
                        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                        -g[i] / (v[i].sqrt() + eps)
                    })
                    .collect(),
                GraftKind::RmspropNormalized => {
                    let nrm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                    (0..n)
                        .map(|i| {
                            let s = if nrm > 0.0 { g[i] / nrm } else { 0.0 };
                            v[i] = b2 * v[i] + (1.0 - b2) * s * s;
                            -s / (v[i].sqrt() + eps)
                        })
                        .collect()
                }
                GraftKind::Adam => (0..n)
                    .map(|i| {
                        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                        let mh = m[i] / (1.0 - b1.powi(t));
                        let vh = v[i] / (1.0 - b2.powi(t));
                        -mh / (vh.sqrt() + eps)
                    })
                    .collect(),
            };
            out.push(r);
        }
        out
    }

    fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0.0f64, |acc, x| acc.max(x.abs())).max(1e-30);
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn every_kind_matches_f64_reference_over_25_steps() {
        let gs = grads(37, 25, 7);
        for kind in [
            GraftKind::None,
            GraftKind::Sgd,
            GraftKind::Adagrad,
            GraftKind::Rmsprop,
            GraftKind::RmspropNormalized,
            GraftKind::Adam,
        ] {
            let cfg = GraftConfig {
                kind,
                beta1: 0.8,
                beta2: 0.95,
                eps: 1e-3,
            };
            let mut st = GraftState::new(&cfg, 37).unwrap();
            let want = reference(kind, 0.8, 0.95, 1e-3, &gs);
            let mut out = vec![0.0f32; 37];
            for (t, g) in gs.iter().enumerate() {
                st.direction(g, &mut out).unwrap();
                let e = max_rel_err(&out, &want[t]);
                assert!(e <= 1e-5, "{kind:?} step {}: rel err {e}", t + 1);
                // Element-wise too (looser: f32 cancellation in Adam's first moment).
                for (x, y) in out.iter().zip(&want[t]) {
                    if y.abs() > 1e-3 {
                        assert!(((*x as f64 - y) / y).abs() <= 1e-4, "{kind:?}: {x} vs {y}");
                    }
                }
            }
            assert_eq!(st.steps(), 25);
        }
    }

    #[test]
    fn defaults_match_reference_with_paper_eps() {
        let gs = grads(20, 22, 3);
        for kind in [
            GraftKind::RmspropNormalized,
            GraftKind::Adam,
            GraftKind::Adagrad,
        ] {
            let cfg = GraftConfig {
                kind,
                ..GraftConfig::default()
            };
            let mut st = GraftState::new(&cfg, 20).unwrap();
            let want = reference(kind, 0.9, 0.999, 1e-10, &gs);
            let mut out = vec![0.0f32; 20];
            for (t, g) in gs.iter().enumerate() {
                st.direction(g, &mut out).unwrap();
                assert!(
                    max_rel_err(&out, &want[t]) <= 1e-5,
                    "{kind:?} step {}",
                    t + 1
                );
            }
        }
    }

    #[test]
    fn normalized_zero_gradient_is_guarded() {
        let mut st = GraftState::new(&GraftConfig::default(), 3).unwrap();
        let mut out = vec![1.0f32; 3];
        st.direction(&[1.0, -2.0, 2.0], &mut out).unwrap();
        st.direction(&[0.0; 3], &mut out).unwrap();
        assert_eq!(out, vec![0.0; 3]);
        assert!(out.iter().all(|x| x.is_finite()));
        // v decayed: v = 0.999 * 0.001 * s^2 with s = (1, -2, 2)/3.
        let want = 0.999 * 0.001 * (1.0f64 / 9.0);
        assert!(
            (st.v[0] as f64 - want).abs() <= 1e-6 * want,
            "{} vs {want}",
            st.v[0]
        );
    }

    #[test]
    fn rmsprop_beta2_one_is_a_sum() {
        let cfg = GraftConfig {
            kind: GraftKind::Rmsprop,
            beta2: 1.0,
            eps: 0.0,
            ..Default::default()
        };
        let mut st = GraftState::new(&cfg, 1).unwrap();
        let mut out = [0.0f32];
        st.direction(&[3.0], &mut out).unwrap();
        assert_eq!(out[0], -1.0);
        st.direction(&[4.0], &mut out).unwrap();
        assert_eq!(out[0], -0.8); // -4 / sqrt(9 + 16)
    }

    #[test]
    fn rescale_matches_notes_step_2() {
        let st = GraftState::new(&GraftConfig::default(), 2).unwrap();
        let mut d = [3.0f32, 4.0];
        st.rescale(&mut d, &[0.0, -10.0]);
        assert!(
            (d[0] - 6.0).abs() < 1e-6 && (d[1] - 8.0).abs() < 1e-6,
            "{d:?}"
        );
        // Zero direction stays zero (the 1e-16 guard).
        let mut z = [0.0f32, 0.0];
        st.rescale(&mut z, &[1.0, 1.0]);
        assert_eq!(z, [0.0, 0.0]);
        // None: no-op.
        let none = GraftState::new(
            &GraftConfig {
                kind: GraftKind::None,
                ..Default::default()
            },
            2,
        )
        .unwrap();
        let mut d = [3.0f32, 4.0];
        none.rescale(&mut d, &[0.0, -10.0]);
        assert_eq!(d, [3.0, 4.0]);
    }

    #[test]
    fn state_bytes_per_kind() {
        let b = |kind| {
            GraftState::new(
                &GraftConfig {
                    kind,
                    ..Default::default()
                },
                10,
            )
            .unwrap()
            .state_bytes()
        };
        assert_eq!(b(GraftKind::None), 0);
        assert_eq!(b(GraftKind::Sgd), 0);
        assert_eq!(b(GraftKind::Adagrad), 40);
        assert_eq!(b(GraftKind::Rmsprop), 40);
        assert_eq!(b(GraftKind::RmspropNormalized), 40);
        assert_eq!(b(GraftKind::Adam), 80);
    }

    #[test]
    fn invalid_configs_and_lengths() {
        let bad = [
            GraftConfig {
                beta1: 1.0,
                ..Default::default()
            },
            GraftConfig {
                beta1: -0.1,
                ..Default::default()
            },
            GraftConfig {
                beta2: 1.01,
                ..Default::default()
            },
            GraftConfig {
                beta2: f64::NAN,
                ..Default::default()
            },
            GraftConfig {
                kind: GraftKind::Adam,
                beta2: 1.0,
                ..Default::default()
            },
            GraftConfig {
                eps: -1e-10,
                ..Default::default()
            },
            GraftConfig {
                eps: f64::INFINITY,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(
                matches!(c.validate(), Err(PrecondError::InvalidConfig { .. })),
                "{c:?}"
            );
            assert!(GraftState::new(&c, 3).is_err());
        }
        GraftConfig::default().validate().unwrap();
        let mut st = GraftState::new(&GraftConfig::default(), 3).unwrap();
        let before = st.clone();
        let mut out = [0.0f32; 3];
        assert!(matches!(
            st.direction(&[1.0; 4], &mut out),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        assert_eq!(st, before);
    }
}
