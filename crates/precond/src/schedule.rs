//! Learning-rate schedules. Steps count from 1: the first update uses `factor(1)`.
//!
//! Every schedule is a multiplier of a base (peak) learning rate: `lr(base, t) = base · factor(t)`,
//! with `factor = 1` at the end of warmup. The paper's autoencoder uses
//! [`Schedule::WarmupLinearDecay`] (5 warm-up epochs of 100, decay to 0); its Transformer uses
//! Flax `examples/nlp_seq`'s rsqrt decay with linear warm-up, [`Schedule::WarmupRsqrt`].

use crate::error::{invalid, Result};
use serde::{Deserialize, Serialize};

/// A learning-rate schedule (a multiplier of the base rate as a function of the 1-based step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// factor(t) = 1.
    #[default]
    Constant,
    /// Linear warm-up t / warmup_steps for t ≤ warmup_steps, then linear decay
    /// (total_steps − t) / (total_steps − warmup_steps), reaching 0 at t = total_steps and staying 0
    /// after. `warmup_steps = 0` means no warm-up.
    WarmupLinearDecay {
        /// Steps of linear warm-up (may be 0).
        warmup_steps: u64,
        /// Step at which the rate reaches 0; must exceed `warmup_steps`.
        total_steps: u64,
    },
    /// Flax `examples/nlp_seq` `create_learning_rate_scheduler` with factors
    /// "constant * linear_warmup * rsqrt_decay": min(1, t/w) / sqrt(max(t, w)). We normalise it so
    /// that the peak (t = w) is 1: factor(t) = min(1, t/w) · sqrt(w / max(t, w)), i.e. t/w during
    /// warm-up, then sqrt(w/t). Flax's `base_learning_rate` B therefore equals our base rate
    /// B / sqrt(w) (see [`Schedule::flax_base_to_peak`]). Flax evaluates the schedule at the
    /// 0-based step (its first update has rate 0); we evaluate it at the 1-based step.
    WarmupRsqrt {
        /// Steps of linear warm-up; must be ≥ 1.
        warmup_steps: u64,
    },
    /// Linear warm-up, then cosine decay from 1 to `final_fraction` at `total_steps`:
    /// f + (1 − f)·(1 + cos(π p))/2 with p = (t − w)/(total − w) clamped to [0, 1].
    Cosine {
        /// Steps of linear warm-up (may be 0).
        warmup_steps: u64,
        /// Step at which the decay ends; must exceed `warmup_steps`.
        total_steps: u64,
        /// Final multiplier, in [0, 1].
        final_fraction: f64,
    },
}

impl Schedule {
    /// Checks the schedule's parameters; returns an error naming the bad field.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Schedule::Constant => Ok(()),
            Schedule::WarmupLinearDecay {
                warmup_steps,
                total_steps,
            } => {
                if total_steps <= warmup_steps {
                    return Err(invalid(
                        "total_steps",
                        total_steps,
                        "must exceed warmup_steps",
                    ));
                }
                Ok(())
            }
            Schedule::WarmupRsqrt { warmup_steps } => {
                if warmup_steps == 0 {
                    return Err(invalid(
                        "warmup_steps",
                        0,
                        "rsqrt decay needs at least 1 warm-up step",
                    ));
                }
                Ok(())
            }
            Schedule::Cosine {
                warmup_steps,
                total_steps,
                final_fraction,
            } => {
                if total_steps <= warmup_steps {
                    return Err(invalid(
                        "total_steps",
                        total_steps,
                        "must exceed warmup_steps",
                    ));
                }
                if !(0.0..=1.0).contains(&final_fraction) {
                    return Err(invalid(
                        "final_fraction",
                        final_fraction,
                        "must be in [0, 1]",
                    ));
                }
                Ok(())
            }
        }
    }

    /// The multiplier at 1-based step `step` (step 0 is "before training" and gives the formula's
    /// value there, 0 for any schedule with warm-up). Meaningful only for a validated schedule;
    /// never panics or returns NaN for an invalid one.
    pub fn factor(&self, step: u64) -> f64 {
        let t = step as f64;
        let warm = |w: u64| if w == 0 { 1.0 } else { (t / w as f64).min(1.0) };
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupLinearDecay {
                warmup_steps,
                total_steps,
            } => {
                if step <= warmup_steps {
                    return warm(warmup_steps);
                }
                if total_steps <= warmup_steps || step >= total_steps {
                    return 0.0;
                }
                (total_steps - step) as f64 / (total_steps - warmup_steps) as f64
            }
            Schedule::WarmupRsqrt { warmup_steps } => {
                let w = warmup_steps.max(1) as f64;
                (t / w).min(1.0) * (w / t.max(w)).sqrt()
            }
            Schedule::Cosine {
                warmup_steps,
                total_steps,
                final_fraction,
            } => {
                if step <= warmup_steps {
                    return warm(warmup_steps);
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let p = ((step - warmup_steps) as f64 / span).clamp(0.0, 1.0);
                let final_fraction = if final_fraction.is_finite() {
                    final_fraction.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                final_fraction
                    + (1.0 - final_fraction) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }

    /// The learning rate at 1-based step `step`: `base · factor(step)`.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        base * self.factor(step)
    }

    /// Converts Flax's `base_learning_rate` for "constant * linear_warmup * rsqrt_decay" into
    /// our peak base rate for [`Schedule::WarmupRsqrt`]: B / sqrt(warmup_steps).
    pub fn flax_base_to_peak(flax_base: f64, warmup_steps: u64) -> f64 {
        flax_base / (warmup_steps.max(1) as f64).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::PrecondError;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-15 * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn constant_is_one() {
        let s = Schedule::Constant;
        s.validate().unwrap();
        for t in [0, 1, 7, 1_000_000] {
            assert_eq!(s.factor(t), 1.0);
        }
        assert_eq!(s.lr(0.25, 9), 0.25);
    }

    #[test]
    fn warmup_linear_decay_key_steps() {
        let s = Schedule::WarmupLinearDecay {
            warmup_steps: 4,
            total_steps: 12,
        };
        s.validate().unwrap();
        close(s.factor(1), 0.25);
        close(s.factor(2), 0.5);
        close(s.factor(4), 1.0);
        close(s.factor(5), 7.0 / 8.0);
        close(s.factor(8), 0.5);
        close(s.factor(11), 1.0 / 8.0);
        assert_eq!(s.factor(12), 0.0);
        assert_eq!(s.factor(100), 0.0);
        close(s.lr(2.0, 2), 1.0);
        // No warm-up: decay from the first step.
        let s0 = Schedule::WarmupLinearDecay {
            warmup_steps: 0,
            total_steps: 10,
        };
        s0.validate().unwrap();
        close(s0.factor(1), 0.9);
        close(s0.factor(5), 0.5);
        assert_eq!(s0.factor(10), 0.0);
        // The paper's autoencoder: 60 steps/epoch, 5 warm-up epochs of 100.
        let ae = Schedule::WarmupLinearDecay {
            warmup_steps: 300,
            total_steps: 6000,
        };
        close(ae.factor(150), 0.5);
        close(ae.factor(300), 1.0);
        close(ae.factor(3150), 0.5);
    }

    #[test]
    fn warmup_rsqrt_matches_flax_up_to_peak_normalisation() {
        let w = 16u64;
        let s = Schedule::WarmupRsqrt { warmup_steps: w };
        s.validate().unwrap();
        close(s.factor(1), 1.0 / 16.0);
        close(s.factor(8), 0.5);
        close(s.factor(16), 1.0);
        close(s.factor(64), 0.5);
        close(s.factor(400), 0.2);
        // Flax: base * min(1, t/w) / sqrt(max(t, w)), written independently.
        let flax = |base: f64, t: f64| base * (t / 16.0).min(1.0) / t.max(16.0).sqrt();
        for t in [1u64, 3, 15, 16, 17, 100, 12345] {
            let ours = s.lr(Schedule::flax_base_to_peak(0.5, w), t);
            close(ours, flax(0.5, t as f64));
        }
    }

    #[test]
    fn cosine_key_steps() {
        let s = Schedule::Cosine {
            warmup_steps: 2,
            total_steps: 6,
            final_fraction: 0.1,
        };
        s.validate().unwrap();
        close(s.factor(1), 0.5);
        close(s.factor(2), 1.0);
        // p = 1/4: 0.1 + 0.9 (1 + cos(π/4)) / 2
        close(
            s.factor(3),
            0.1 + 0.45 * (1.0 + std::f64::consts::FRAC_1_SQRT_2),
        );
        close(s.factor(4), 0.55);
        close(s.factor(6), 0.1);
        close(s.factor(60), 0.1);
        let s0 = Schedule::Cosine {
            warmup_steps: 0,
            total_steps: 4,
            final_fraction: 0.0,
        };
        close(s0.factor(2), 0.5);
        assert!(s0.factor(4).abs() < 1e-16);
    }

    #[test]
    fn invalid_schedules_rejected() {
        let bad = [
            Schedule::WarmupLinearDecay {
                warmup_steps: 5,
                total_steps: 5,
            },
            Schedule::WarmupLinearDecay {
                warmup_steps: 0,
                total_steps: 0,
            },
            Schedule::WarmupRsqrt { warmup_steps: 0 },
            Schedule::Cosine {
                warmup_steps: 3,
                total_steps: 2,
                final_fraction: 0.0,
            },
            Schedule::Cosine {
                warmup_steps: 0,
                total_steps: 2,
                final_fraction: 1.5,
            },
            Schedule::Cosine {
                warmup_steps: 0,
                total_steps: 2,
                final_fraction: f64::NAN,
            },
        ];
        for s in bad {
            assert!(
                matches!(s.validate(), Err(PrecondError::InvalidConfig { .. })),
                "{s:?}"
            );
            assert!(s.factor(3).is_finite());
        }
    }
}
