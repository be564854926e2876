//! Heavy-ball and Nesterov momentum on descent directions (NOTES §4 step 4, as in
//! distributed_shampoo): m ← β1 m + u, and the step uses m, or u + β1 m with Nesterov.
//!
//! Sign convention of the whole crate: u is a *descent* direction (θ ← θ + lr·u), so the buffer m
//! also holds a descent direction. The buffer is a plain sum (not a (1 − β1)-weighted average),
//! distributed_shampoo's default (`moving_average_for_momentum = False`).

use crate::error::{invalid, PrecondError, Result};
use crate::linalg::PAR_CHUNK;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Momentum hyperparameters. Defaults are distributed_shampoo's: β1 = 0.9, Nesterov on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MomentumConfig {
    /// Decay β1 in [0, 1). 0 disables momentum (no buffer is allocated).
    pub beta1: f64,
    /// Nesterov: output u + β1 m (with the updated m) instead of m.
    pub nesterov: bool,
}

impl Default for MomentumConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            nesterov: true,
        }
    }
}

impl MomentumConfig {
    /// Checks β1 ∈ [0, 1).
    pub fn validate(&self) -> Result<()> {
        if !(self.beta1 >= 0.0 && self.beta1 < 1.0) {
            return Err(invalid("momentum.beta1", self.beta1, "must be in [0, 1)"));
        }
        Ok(())
    }
}

/// The momentum buffer of one parameter (empty when β1 = 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MomentumState {
    config: MomentumConfig,
    len: usize,
    buf: Vec<f32>,
}

impl MomentumState {
    /// Zero buffer for `len` elements (none when β1 = 0).
    pub fn new(config: &MomentumConfig, len: usize) -> Result<Self> {
        config.validate()?;
        let n = if config.beta1 == 0.0 { 0 } else { len };
        Ok(Self {
            config: *config,
            len,
            buf: vec![0.0; n],
        })
    }

    /// The configuration this state was built with.
    pub fn config(&self) -> &MomentumConfig {
        &self.config
    }

    /// Bytes held by the buffer (0 when β1 = 0).
    pub fn state_bytes(&self) -> usize {
        self.buf.len() * std::mem::size_of::<f32>()
    }

    /// The current buffer m (empty when β1 = 0).
    pub fn buffer(&self) -> &[f32] {
        &self.buf
    }

    /// In place: m ← β1 m + u, then u ← m (heavy ball) or u ← u + β1 m (Nesterov).
    /// With β1 = 0, u is left unchanged. Errors (ShapeMismatch, no state change) on a wrong length.
    pub fn apply(&mut self, update: &mut [f32]) -> Result<()> {
        if update.len() != self.len {
            return Err(PrecondError::ShapeMismatch {
                expected: format!("{} elements", self.len),
                got: format!("{} elements", update.len()),
            });
        }
        if self.config.beta1 == 0.0 {
            return Ok(());
        }
        if self.buf.len() != self.len {
            return Err(PrecondError::StateMismatch(
                "momentum buffer has the wrong length".into(),
            ));
        }
        let b1 = self.config.beta1 as f32;
        let nesterov = self.config.nesterov;
        update
            .par_chunks_mut(PAR_CHUNK)
            .zip(self.buf.par_chunks_mut(PAR_CHUNK))
            .for_each(|(update, buf)| {
                for (u, m) in update.iter_mut().zip(buf.iter_mut()) {
                    *m = b1 * *m + *u;
                    if nesterov {
                        *u += b1 * *m;
                    } else {
                        *u = *m;
                    }
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_ball_sequence() {
        let cfg = MomentumConfig {
            beta1: 0.5,
            nesterov: false,
        };
        let mut st = MomentumState::new(&cfg, 2).unwrap();
        let us = [[1.0f32, -2.0], [1.0, 0.0], [0.0, 4.0]];
        // m1 = (1, -2); m2 = (1.5, -1); m3 = (0.75, 3.5)
        let want = [[1.0f32, -2.0], [1.5, -1.0], [0.75, 3.5]];
        for (u, w) in us.iter().zip(want) {
            let mut x = *u;
            st.apply(&mut x).unwrap();
            assert_eq!(x, w);
            assert_eq!(st.buffer(), &w);
        }
    }

    #[test]
    fn nesterov_sequence_matches_f64() {
        let cfg = MomentumConfig {
            beta1: 0.9,
            nesterov: true,
        };
        let mut st = MomentumState::new(&cfg, 3).unwrap();
        let mut m = [0.0f64; 3];
        for t in 0..20 {
            let u: Vec<f32> = (0..3).map(|i| ((t * 3 + i) as f32 * 0.7).sin()).collect();
            let mut x = u.clone();
            st.apply(&mut x).unwrap();
            for i in 0..3 {
                m[i] = 0.9 * m[i] + u[i] as f64;
                let want = u[i] as f64 + 0.9 * m[i];
                assert!(
                    (x[i] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "t {t}"
                );
            }
        }
        // First step explicitly: u + 0.9 u = 1.9 u.
        let mut st = MomentumState::new(&cfg, 1).unwrap();
        let mut x = [2.0f32];
        st.apply(&mut x).unwrap();
        assert!((x[0] - 3.8).abs() < 1e-6);
    }

    #[test]
    fn zero_beta_has_no_buffer() {
        let cfg = MomentumConfig {
            beta1: 0.0,
            nesterov: true,
        };
        let mut st = MomentumState::new(&cfg, 4).unwrap();
        assert_eq!(st.state_bytes(), 0);
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        st.apply(&mut x).unwrap();
        st.apply(&mut x).unwrap();
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            MomentumState::new(&MomentumConfig::default(), 4)
                .unwrap()
                .state_bytes(),
            16
        );
    }

    #[test]
    fn invalid_beta_and_length() {
        for b in [1.0, -0.5, f64::NAN, 2.0] {
            let c = MomentumConfig {
                beta1: b,
                nesterov: false,
            };
            assert!(matches!(
                c.validate(),
                Err(PrecondError::InvalidConfig { .. })
            ));
            assert!(MomentumState::new(&c, 2).is_err());
        }
        let mut st = MomentumState::new(&MomentumConfig::default(), 2).unwrap();
        assert!(matches!(
            st.apply(&mut [1.0; 3]),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        assert_eq!(st.buffer(), &[0.0, 0.0]);
    }
}
