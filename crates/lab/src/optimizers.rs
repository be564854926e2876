//! The one place where optimizers are chosen by name.
//!
//! The training loop only needs a [`ModuleOptimizer`]: burn 0.22's whole-module optimizer, which
//! any per-tensor `burn::optim::Optimizer` converts into (`ModuleOptimizer::from(optim)`), with
//! `to_record`/`load_record` for checkpoints. Each optimizer also says how many bytes of state
//! it keeps ([`BuiltOptimizer::state_bytes`]): for ours, the library's own accounting.

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig as BurnWeightDecay;
use burn::optim::{AdamConfig, ModuleOptimizer};
use precond::{
    GraftKind, PrecondError, RhoMode, SharedBasisConfig, SharedBasisHandle,
    SharedBasisOptimizerConfig, WeightDecayConfig, WeightDecayMode,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::autoencoder::Autoencoder;

/// Names accepted by `--optimizer`.
pub const OPTIMIZERS: &[&str] = &["adam", "shared-basis"];

/// Names accepted by `--graft` (NOTES §4; the paper's choice is `rmsprop-normalized`).
pub const GRAFTS: &[&str] = &[
    "none",
    "sgd",
    "adagrad",
    "rmsprop",
    "rmsprop-normalized",
    "adam",
];

#[derive(Debug, Error)]
pub enum OptimizerError {
    #[error("unknown optimizer {0:?}; known: {known}", known = OPTIMIZERS.join(", "))]
    Unknown(String),
    #[error("unknown grafting {0:?}; known: {known}", known = GRAFTS.join(", "))]
    UnknownGraft(String),
    #[error("invalid {name} = {value}: {why}")]
    Invalid {
        name: &'static str,
        value: f64,
        why: &'static str,
    },
    #[error("--{0} applies to shared-basis only")]
    NotApplicable(&'static str),
    #[error(transparent)]
    Library(#[from] PrecondError),
}

/// Optimizer hyperparameters as configured (flags, config file); recorded in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerHparams {
    pub name: String,
    /// Peak learning rate (the schedule multiplies it by a factor in [0, 1]).
    pub lr: f64,
    /// adam: first-moment decay. shared-basis: momentum β1 (NOTES §4 step 4).
    pub beta1: f64,
    /// adam: second-moment decay. shared-basis: statistics decay β2 (1 = the plain sum of
    /// Algorithm 1).
    pub beta2: f64,
    /// adam: denominator epsilon. shared-basis: the ε added to ρ_i in eq. 6.
    pub eps: f64,
    /// adam: coupled L2 penalty added to the gradient (burn's Adam weight decay).
    /// shared-basis: coupled weight decay (NOTES §4 step 3).
    pub weight_decay: f64,
    /// The settings only shared-basis has; `None` for other optimizers.
    #[serde(default)]
    pub shared_basis: Option<SharedBasisHparams>,
}

/// Settings of the shared-basis optimizer beyond the common ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedBasisHparams {
    /// Rank k of the shared basis (capped at each layer's d_in).
    pub rank: usize,
    /// Oversampling p of the randomized SVD.
    pub oversample: usize,
    /// Power iterations of the randomized SVD.
    pub power_iters: usize,
    /// Power iterations estimating ρ_i (0 = exact, by eigendecompositions).
    pub rho_iters: usize,
    /// Grafting (one of [`GRAFTS`]).
    pub graft: String,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// First (1-based) step using the preconditioned direction; the grafting direction before.
    pub start_step: u64,
    /// Seed of the randomized SVD's Gaussian start.
    pub seed: u64,
}

impl Default for SharedBasisHparams {
    /// The paper's settings (NOTES §4): k 32, p 0, 1 power iteration, rmsprop-normalized grafting.
    fn default() -> Self {
        SharedBasisHparams {
            rank: 32,
            oversample: 0,
            power_iters: 1,
            rho_iters: 10,
            graft: "rmsprop-normalized".into(),
            nesterov: true,
            start_step: 1,
            seed: 0,
        }
    }
}

impl OptimizerHparams {
    /// The preset of `name`: its defaults, with the peak learning rate of [`default_lr`].
    pub fn preset(name: &str) -> Result<OptimizerHparams, OptimizerError> {
        let lr = default_lr(name)?;
        Ok(match name {
            "shared-basis" => OptimizerHparams {
                name: name.into(),
                lr,
                beta1: 0.9,
                beta2: 1.0,
                eps: 1e-6,
                weight_decay: 0.0,
                shared_basis: Some(SharedBasisHparams::default()),
            },
            _ => OptimizerHparams {
                name: name.into(),
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                shared_basis: None,
            },
        })
    }
}

/// The default peak learning rate of an optimizer, tuned on this benchmark (README, "Learning
/// rates of the presets", says how).
pub fn default_lr(name: &str) -> Result<f64, OptimizerError> {
    match name {
        "adam" => Ok(1e-3),
        "shared-basis" => Ok(1e-3),
        other => Err(OptimizerError::Unknown(other.to_string())),
    }
}

/// Parses a grafting name of [`GRAFTS`].
pub fn graft_kind(name: &str) -> Result<GraftKind, OptimizerError> {
    Ok(match name {
        "none" => GraftKind::None,
        "sgd" => GraftKind::Sgd,
        "adagrad" => GraftKind::Adagrad,
        "rmsprop" => GraftKind::Rmsprop,
        "rmsprop-normalized" => GraftKind::RmspropNormalized,
        "adam" => GraftKind::Adam,
        other => return Err(OptimizerError::UnknownGraft(other.to_string())),
    })
}

/// A built optimizer and what reports its state size.
pub struct BuiltOptimizer {
    pub optim: ModuleOptimizer,
    accounting: Accounting,
}

enum Accounting {
    /// Two f32 moments per parameter.
    Adam,
    /// The library's own accounting of the states that have stepped.
    Library(SharedBasisHandle),
}

impl BuiltOptimizer {
    /// Bytes of optimizer state for `model`. For shared-basis, the library's
    /// `ParamOptimizer::state_bytes` summed over the parameters that have taken a step.
    pub fn state_bytes(&self, model: &Autoencoder) -> u64 {
        match &self.accounting {
            Accounting::Adam => 2 * model.num_params() as u64 * 4,
            Accounting::Library(handle) => handle.state_bytes() as u64,
        }
    }

    /// The last error of the library's optimizer, if any (a skipped or failed parameter step).
    pub fn take_last_error(&self) -> Option<PrecondError> {
        match &self.accounting {
            Accounting::Adam => None,
            Accounting::Library(handle) => handle.take_last_error(),
        }
    }
}

/// The library configuration of a shared-basis `h` (also used by tests and the speed example).
pub fn shared_basis_config(
    h: &OptimizerHparams,
) -> Result<SharedBasisOptimizerConfig, OptimizerError> {
    let sb = h.shared_basis.clone().unwrap_or_default();
    let method = SharedBasisConfig {
        rank: sb.rank,
        oversample: sb.oversample,
        power_iters: sb.power_iters,
        rho: match sb.rho_iters {
            0 => RhoMode::Exact,
            n => RhoMode::PowerIteration(n),
        },
        eps: h.eps,
        beta2: h.beta2,
        seed: sb.seed,
    };
    let config = SharedBasisOptimizerConfig::new()
        .with_method(precond::Method::SharedBasis(method))
        .with_graft(graft_kind(&sb.graft)?)
        .with_beta1(h.beta1)
        .with_nesterov(sb.nesterov)
        .with_weight_decay(WeightDecayConfig {
            rate: h.weight_decay,
            mode: WeightDecayMode::Coupled,
        })
        .with_start_preconditioning_step(sb.start_step);
    config.config().validate()?;
    Ok(config)
}

/// Build the optimizer named in `h`.
pub fn build_optimizer(h: &OptimizerHparams) -> Result<BuiltOptimizer, OptimizerError> {
    check(h)?;
    match h.name.as_str() {
        "adam" => {
            let mut config = AdamConfig::new()
                .with_beta_1(h.beta1 as f32)
                .with_beta_2(h.beta2 as f32)
                .with_epsilon(h.eps as f32);
            if h.weight_decay != 0.0 {
                config = config.with_weight_decay(Some(BurnWeightDecay {
                    penalty: h.weight_decay as f32,
                }));
            }
            Ok(BuiltOptimizer {
                optim: config.init(),
                accounting: Accounting::Adam,
            })
        }
        "shared-basis" => {
            let (optim, handle) = shared_basis_config(h)?.init_with_handle()?;
            Ok(BuiltOptimizer {
                optim,
                accounting: Accounting::Library(handle),
            })
        }
        other => Err(OptimizerError::Unknown(other.to_string())),
    }
}

fn check(h: &OptimizerHparams) -> Result<(), OptimizerError> {
    let bad = |name, value, why| Err(OptimizerError::Invalid { name, value, why });
    if !(h.lr.is_finite() && h.lr > 0.0) {
        return bad("lr", h.lr, "must be positive");
    }
    if !(0.0..1.0).contains(&h.beta1) {
        return bad("beta1", h.beta1, "must be in [0, 1)");
    }
    if h.name == "adam" && !(0.0..1.0).contains(&h.beta2) {
        return bad("beta2", h.beta2, "must be in [0, 1)");
    }
    if !(h.eps.is_finite() && h.eps >= 0.0) {
        return bad("eps", h.eps, "must be >= 0");
    }
    if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
        return bad("weight_decay", h.weight_decay, "must be >= 0");
    }
    if h.name == "shared-basis" {
        shared_basis_config(h)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor};

    fn adam() -> OptimizerHparams {
        OptimizerHparams::preset("adam").unwrap()
    }

    #[test]
    fn builds_adam_and_rejects_unknown_or_invalid() {
        assert!(build_optimizer(&adam()).is_ok());
        let err = OptimizerHparams::preset("sgdx")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown optimizer \"sgdx\"; known: adam, shared-basis")
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
    fn shared_basis_rejects_bad_settings_with_the_library_message() {
        let sb = OptimizerHparams::preset("shared-basis").unwrap();
        assert!(build_optimizer(&sb).is_ok());
        let mut zero_rank = sb.clone();
        zero_rank.shared_basis.as_mut().unwrap().rank = 0;
        let err = build_optimizer(&zero_rank).err().unwrap().to_string();
        assert!(err.contains("rank"), "{err}");
        let mut graft = sb.clone();
        graft.shared_basis.as_mut().unwrap().graft = "lion".into();
        let err = build_optimizer(&graft).err().unwrap().to_string();
        assert!(err.starts_with("unknown grafting \"lion\""), "{err}");
        let err = build_optimizer(&OptimizerHparams { eps: 0.0, ..sb })
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("eps"), "{err}");
    }

    #[test]
    fn adam_state_is_two_moments_per_parameter() {
        let model = Autoencoder::new(0, &burn::tensor::Device::flex());
        let built = build_optimizer(&adam()).unwrap();
        assert_eq!(built.state_bytes(&model), 2 * 2_837_314 * 4);
    }

    /// After one step, the library's accounting for the autoencoder equals the formula: per weight
    /// (b = d_in, m = d_out, k = min(32, b)) b·k + m·k² + m floats of preconditioner plus 2·b·m of
    /// grafting and momentum; per bias (not preconditioned) 2·m.
    #[test]
    fn shared_basis_state_bytes_match_the_formula_on_the_autoencoder() {
        let device = Device::flex().autodiff();
        let model = Autoencoder::new(0, &device);
        let mut built =
            build_optimizer(&OptimizerHparams::preset("shared-basis").unwrap()).unwrap();
        let x = Tensor::<2>::ones([4, 784], &device);
        let loss = model.forward(x).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = built.optim.step(1e-3, model, grads);
        let dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784];
        let mut floats = 0u64;
        for w in dims.windows(2) {
            let (b, m) = (w[0] as u64, w[1] as u64);
            let k = b.min(32);
            floats += b * k + m * k * k + m + 2 * b * m + 2 * m;
        }
        assert_eq!(built.state_bytes(&model), 4 * floats);
        assert!(built.take_last_error().is_none());
        assert_eq!(model.num_params(), 2_837_314);
    }
}
