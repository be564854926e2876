//! The one place where optimizers are chosen by name. Add the `precond` optimizers here.
//!
//! The training loop only needs a [`ModuleOptimizer`]: burn 0.22's whole-module optimizer, which
//! any per-tensor `burn::optim::Optimizer` converts into (`ModuleOptimizer::from(optim)`), with
//! `to_record`/`load_record` for checkpoints.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, ModuleOptimizer};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::autoencoder::Autoencoder;
use burn::module::Module;

/// Names accepted by `--optimizer`.
pub const OPTIMIZERS: &[&str] = &["adam"];

#[derive(Debug, Error)]
pub enum OptimizerError {
    #[error("unknown optimizer {0:?}; known: {known}", known = OPTIMIZERS.join(", "))]
    Unknown(String),
    #[error("invalid {name} = {value}: {why}")]
    Invalid {
        name: &'static str,
        value: f64,
        why: &'static str,
    },
}

/// Optimizer hyperparameters as configured (flags, config file); recorded in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerHparams {
    pub name: String,
    /// Peak learning rate (the schedule multiplies it by a factor in [0, 1]).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// For adam: coupled L2 penalty added to the gradient (burn's Adam weight decay).
    pub weight_decay: f64,
}

/// The default peak learning rate of an optimizer. Adam's 1e-3 is the common default and is
/// NOT tuned for this benchmark.
pub fn default_lr(name: &str) -> Result<f64, OptimizerError> {
    match name {
        "adam" => Ok(1e-3),
        other => Err(OptimizerError::Unknown(other.to_string())),
    }
}

/// Build the optimizer named in `h`.
pub fn build_optimizer(h: &OptimizerHparams) -> Result<ModuleOptimizer, OptimizerError> {
    check(h)?;
    match h.name.as_str() {
        "adam" => {
            let mut config = AdamConfig::new()
                .with_beta_1(h.beta1 as f32)
                .with_beta_2(h.beta2 as f32)
                .with_epsilon(h.eps as f32);
            if h.weight_decay != 0.0 {
                config = config.with_weight_decay(Some(WeightDecayConfig {
                    penalty: h.weight_decay as f32,
                }));
            }
            Ok(config.init())
        }
        other => Err(OptimizerError::Unknown(other.to_string())),
    }
}

fn check(h: &OptimizerHparams) -> Result<(), OptimizerError> {
    let bad = |name, value, why| Err(OptimizerError::Invalid { name, value, why });
    if !(h.lr.is_finite() && h.lr > 0.0) {
        return bad("lr", h.lr, "must be positive");
    }
    for (name, v) in [("beta1", h.beta1), ("beta2", h.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return bad(name, v, "must be in [0, 1)");
        }
    }
    if !(h.eps.is_finite() && h.eps >= 0.0) {
        return bad("eps", h.eps, "must be >= 0");
    }
    if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
        return bad("weight_decay", h.weight_decay, "must be >= 0");
    }
    Ok(())
}

/// Bytes of optimizer state for `model` (for now from the algorithm, not measured: Adam keeps
/// two f32 moments per parameter). To be replaced by the library's accounting.
pub fn optimizer_state_bytes(name: &str, model: &Autoencoder) -> u64 {
    let params = model.num_params() as u64;
    match name {
        "adam" => 2 * params * 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adam() -> OptimizerHparams {
        OptimizerHparams {
            name: "adam".into(),
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    #[test]
    fn builds_adam_and_rejects_unknown_or_invalid() {
        assert!(build_optimizer(&adam()).is_ok());
        let err = build_optimizer(&OptimizerHparams {
            name: "sgdx".into(),
            ..adam()
        })
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown optimizer \"sgdx\"; known: adam")
        );
        let err = build_optimizer(&OptimizerHparams {
            beta2: 1.0,
            ..adam()
        })
        .err()
        .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("invalid beta2 = 1: must be in [0, 1)"));
    }

    #[test]
    fn adam_state_is_two_moments_per_parameter() {
        let model = Autoencoder::new(0, &burn::tensor::Device::flex());
        assert_eq!(optimizer_state_bytes("adam", &model), 2 * 2_837_314 * 4);
    }
}
