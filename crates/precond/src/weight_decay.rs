//! Weight decay, coupled (distributed_shampoo, NOTES §4 step 3) or decoupled (AdamW).
//!
//! Sign convention of the whole crate: an update u is a *descent* direction and the parameter
//! moves as θ ← θ + lr·u. distributed_shampoo's "add weight_decay · θ to the update" (its update
//! is later *subtracted*) therefore reads here as u ← u − rate·θ.

use crate::error::{invalid, Result};
use crate::linalg::PAR_CHUNK;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Where weight decay enters the step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightDecayMode {
    /// u ← u − rate·θ after grafting and before momentum, so the decay passes through the
    /// momentum buffer (distributed_shampoo, NOTES §4 step 3).
    #[default]
    Coupled,
    /// θ ← θ − lr·rate·θ, outside momentum and grafting (AdamW / optax `add_decayed_weights`):
    /// the full step is θ ← θ − lr·rate·θ_t + lr·u with θ_t the parameter before the step.
    Decoupled,
}

/// Weight-decay hyperparameters. Default: rate 0 (off), coupled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WeightDecayConfig {
    /// Decay rate, finite and ≥ 0; 0 disables decay.
    pub rate: f64,
    /// Coupled or decoupled.
    pub mode: WeightDecayMode,
}

impl WeightDecayConfig {
    /// Checks that the rate is finite and ≥ 0.
    pub fn validate(&self) -> Result<()> {
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return Err(invalid(
                "weight_decay.rate",
                self.rate,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }

    /// Coupled decay on a descent direction: u ← u − rate·θ (no-op unless coupled with rate > 0).
    /// Lengths must match (the caller checks); extra elements are ignored.
    pub fn apply_coupled(&self, update: &mut [f32], param: &[f32]) {
        if self.mode == WeightDecayMode::Coupled && self.rate != 0.0 {
            let r = self.rate as f32;
            for (u, &p) in update.iter_mut().zip(param) {
                *u -= r * p;
            }
        }
    }

    /// The parameter step θ ← θ + lr·u, with decoupled decay folded in when configured:
    /// θ ← θ − lr·rate·θ + lr·u (θ before the step on the right).
    pub fn apply_step(&self, param: &mut [f32], update: &[f32], lr: f32) {
        if self.mode == WeightDecayMode::Decoupled && self.rate != 0.0 {
            let keep = 1.0 - lr * self.rate as f32;
            param
                .par_chunks_mut(PAR_CHUNK)
                .zip(update.par_chunks(PAR_CHUNK))
                .for_each(|(param, update)| {
                    for (p, &u) in param.iter_mut().zip(update) {
                        *p = keep * *p + lr * u;
                    }
                });
        } else {
            param
                .par_chunks_mut(PAR_CHUNK)
                .zip(update.par_chunks(PAR_CHUNK))
                .for_each(|(param, update)| {
                    for (p, &u) in param.iter_mut().zip(update) {
                        *p += lr * u;
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::PrecondError;

    #[test]
    fn coupled_subtracts_rate_theta_then_plain_step() {
        let wd = WeightDecayConfig {
            rate: 0.1,
            mode: WeightDecayMode::Coupled,
        };
        let mut u = [1.0f32, -1.0];
        wd.apply_coupled(&mut u, &[2.0, 10.0]);
        assert_eq!(u, [0.8, -2.0]);
        let mut p = [2.0f32, 10.0];
        wd.apply_step(&mut p, &u, 0.5);
        assert_eq!(p, [2.4, 9.0]);
    }

    #[test]
    fn decoupled_leaves_update_and_shrinks_param() {
        let wd = WeightDecayConfig {
            rate: 0.1,
            mode: WeightDecayMode::Decoupled,
        };
        let mut u = [1.0f32, -1.0];
        wd.apply_coupled(&mut u, &[2.0, 10.0]);
        assert_eq!(u, [1.0, -1.0]);
        let mut p = [2.0f32, 10.0];
        wd.apply_step(&mut p, &u, 0.5);
        // θ − lr·rate·θ + lr·u = 2 − 0.1 + 0.5 = 2.4 ; 10 − 0.5 − 0.5 = 9.0
        assert!(
            (p[0] - 2.4).abs() < 1e-6 && (p[1] - 9.0).abs() < 1e-6,
            "{p:?}"
        );
        // lr = 0: no decay at all (unlike coupled decay, which is scaled by lr too).
        let mut q = [2.0f32];
        wd.apply_step(&mut q, &[5.0], 0.0);
        assert_eq!(q, [2.0]);
    }

    #[test]
    fn zero_rate_is_plain_step_and_invalid_rates() {
        let wd = WeightDecayConfig::default();
        let mut u = [1.0f32];
        wd.apply_coupled(&mut u, &[3.0]);
        assert_eq!(u, [1.0]);
        let mut p = [3.0f32];
        wd.apply_step(&mut p, &u, 0.25);
        assert_eq!(p, [3.25]);
        for r in [-1e-4, f64::NAN, f64::INFINITY] {
            let c = WeightDecayConfig {
                rate: r,
                mode: WeightDecayMode::Decoupled,
            };
            assert!(matches!(
                c.validate(),
                Err(PrecondError::InvalidConfig { .. })
            ));
        }
    }
}
