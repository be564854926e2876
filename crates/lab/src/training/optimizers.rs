//! The one place where optimizers are chosen by name.
//!
//! The training loop only needs a [`ModuleOptimizer`]: burn 0.22's whole-module optimizer, which
//! any per-tensor `burn::optim::Optimizer` converts into (`ModuleOptimizer::from(optim)`), with
//! `to_record`/`load_record` for checkpoints. Each optimizer also says how many bytes of state
//! it keeps ([`BuiltOptimizer::state_bytes`]): for ours, the library's own accounting.
//!
//! Two modern baselines: `soap` is the library's [`Method::Soap`] through the burn adapter;
//! `muon` is burn's own Muon (Newton–Schulz orthogonalized momentum) for the 2-D weights, with
//! burn's AdamW for every other parameter, as one [`ModuleOptimizer`] with a parameter group.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::decay::WeightDecayConfig as BurnWeightDecay;
use burn::optim::momentum::MomentumConfig as BurnMomentum;
use burn::optim::{AdamConfig, AdamWConfig, AdjustLrFn, ModuleOptimizer, MuonConfig};
use burn::tensor::Tensor;
use precond::block_diag::BlockAdamConfig;
use precond::burn_adapter::param_names;
use precond::optimizer::NonFinitePolicy;
use precond::shampoo::ShampooConfig;
use precond::sketchy::SketchyConfig;
use precond::soap::SoapConfig;
use precond::{
    BlockEigensolver, Fallback, GraftKind, Method, PrecondError, RhoMode, SharedBasisConfig,
    SharedBasisHandle, SharedBasisOptimizerConfig, WeightDecayConfig, WeightDecayMode,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Names accepted by `--optimizer`: the presets.
pub const OPTIMIZERS: &[&str] = &[
    "adam",
    "shared-basis",
    "shared-basis-paper",
    "shampoo-250",
    "shampoo-1000",
    "sketchy",
    "block-adam",
    "soap",
    "muon",
];

/// Names accepted by `--graft` (NOTES §4; the paper's choice is `rmsprop-normalized`).
pub const GRAFTS: &[&str] = &[
    "none",
    "sgd",
    "adagrad",
    "rmsprop",
    "rmsprop-normalized",
    "adam",
];

/// `--nonfinite`: what the library's optimizers do with a gradient holding NaN or ∞ (the
/// library's [`NonFinitePolicy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// An error naming the step and the parameter (`train` stops; `replay` fails).
    #[default]
    Error,
    /// Skip that parameter's update, its optimizer state untouched, with a warning (`replay`:
    /// a zero direction for that step).
    Skip,
}

impl NonFinite {
    /// The library's policy.
    pub fn policy(self) -> NonFinitePolicy {
        match self {
            NonFinite::Error => NonFinitePolicy::Error,
            NonFinite::Skip => NonFinitePolicy::Skip,
        }
    }
}

#[derive(Debug, Error)]
pub enum OptimizerError {
    #[error("unknown optimizer {0:?}; known: {known}", known = OPTIMIZERS.join(", "))]
    Unknown(String),
    #[error("unknown grafting {0:?}; known: {known}", known = GRAFTS.join(", "))]
    UnknownGraft(String),
    #[error("unknown lost-mass policy --rho {0:?}; known: {known}", known = RHO_POLICIES.join(", "))]
    UnknownRho(String),
    #[error("unknown block eigensolver --eigensolver {0:?}; known: {known}", known = EIGENSOLVERS.join(", "))]
    UnknownEigensolver(String),
    #[error("invalid {name} = {value}: {why}")]
    Invalid {
        name: &'static str,
        value: f64,
        why: &'static str,
    },
    #[error("--{flag} does not apply to {optimizer}")]
    NotApplicable {
        flag: &'static str,
        optimizer: String,
    },
    #[error(transparent)]
    Library(#[from] PrecondError),
}

/// Optimizer hyperparameters as configured (flags, config file); recorded in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerHparams {
    /// The preset's name (one of [`OPTIMIZERS`]).
    pub name: String,
    /// Peak learning rate (the schedule multiplies it by a factor in [0, 1]).
    pub lr: f64,
    /// adam: first-moment decay. Ours: momentum β1 (NOTES §4 step 4).
    pub beta1: f64,
    /// adam: second-moment decay. Ours: statistics decay β2 (1 = plain sums, as Algorithm 1 and
    /// distributed Shampoo).
    pub beta2: f64,
    /// adam: denominator epsilon. shared-basis: the ε added to ρ_i in eq. 6; Shampoo: the ε
    /// added to the statistics before their inverse 4th roots (absolute).
    pub eps: f64,
    /// Coupled weight decay (adam: L2 penalty on the gradient; ours: NOTES §4 step 3).
    pub weight_decay: f64,
    /// The settings of the library's optimizers; `None` for burn's Adam.
    #[serde(default)]
    pub library: Option<LibraryHparams>,
}

/// Settings of the library's optimizers beyond the common ones. A field a method does not use is
/// `None` (and its flag is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LibraryHparams {
    /// shared-basis: rank k of the shared basis (capped at each layer's d_in); sketchy: rank ℓ
    /// of each frequent-directions sketch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// shared-basis: oversampling p of the randomized SVD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oversample: Option<usize>,
    /// shared-basis: power iterations of the randomized SVD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_iters: Option<usize>,
    /// shared-basis: power iterations estimating ρ_i (0 = exact, by eigendecompositions) under
    /// the `norm` policy; steps from the random start under `random-start`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rho_iters: Option<usize>,
    /// shared-basis: the lost-mass policy, one of [`RHO_POLICIES`] (absent: `norm`, the
    /// paper's reading; see [`rho_mode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho: Option<String>,
    /// shared-basis: multiplier s on every increment of ρ (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho_scale: Option<f64>,
    /// shared-basis, Block Adam: the per-block eigensolver, one of [`EIGENSOLVERS`] (absent:
    /// `batched`; runs recorded before it existed used `faer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eigensolver: Option<String>,
    /// Shampoo, Sketchy: largest block side; soap: `max_precond_dim`, the largest side
    /// preconditioned (a larger one is the identity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// Shampoo, Sketchy: steps between recomputations of the inverse roots; soap: between
    /// refreshes of the eigenbases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precondition_every: Option<u64>,
    /// Grafting (one of [`GRAFTS`]).
    pub graft: String,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// First (1-based) step using the preconditioned direction; the grafting direction before.
    pub start_step: u64,
    /// Seed of the method's randomness (shared-basis: the randomized SVD's Gaussian start).
    pub seed: u64,
    /// What a gradient holding NaN or ∞ does (absent from records written before it existed:
    /// `error`).
    #[serde(default)]
    pub nonfinite: NonFinite,
}

impl LibraryHparams {
    /// What every library preset shares: rmsprop-normalized grafting, Nesterov, from step 1.
    fn base() -> Self {
        LibraryHparams {
            rank: None,
            oversample: None,
            power_iters: None,
            rho_iters: None,
            rho: None,
            rho_scale: None,
            eigensolver: None,
            block_size: None,
            precondition_every: None,
            graft: "rmsprop-normalized".into(),
            nesterov: true,
            start_step: 1,
            seed: 0,
            nonfinite: NonFinite::Error,
        }
    }

    /// Algorithm 1 exactly as its text reads (NOTES §4): k 32, p 0, 1 power iteration, ρ
    /// increments ‖M_i − B R_i Bᵀ‖₂ by 10 power iterations (the `shared-basis-paper` preset).
    pub fn shared_basis_paper() -> Self {
        LibraryHparams {
            rank: Some(32),
            oversample: Some(0),
            power_iters: Some(1),
            rho_iters: Some(10),
            ..Self::base()
        }
    }

    /// The default `shared-basis` preset: the paper's settings with the lost-mass policy that
    /// measured best (README, "The lost-mass ridge").
    pub fn shared_basis() -> Self {
        LibraryHparams {
            rho: Some(DEFAULT_RHO.into()),
            rho_scale: Some(DEFAULT_RHO_SCALE),
            ..Self::shared_basis_paper()
        }
    }

    /// The paper's Shampoo settings (NOTES §5): blocks of `block_size`, roots every 10 steps
    /// from step 101, grafting before.
    pub fn shampoo(block_size: usize) -> Self {
        LibraryHparams {
            block_size: Some(block_size),
            precondition_every: Some(10),
            start_step: 101,
            ..Self::base()
        }
    }

    /// Block Adam with the paper's block of 10 (NOTES §5): its own first moment, so no grafting
    /// and no momentum on top.
    pub fn block_adam() -> Self {
        LibraryHparams {
            block_size: Some(10),
            graft: "none".into(),
            nesterov: false,
            ..Self::base()
        }
    }

    /// SOAP as the reference `soap.py` defaults it: bases refreshed every 10 steps, every side up
    /// to 10000 preconditioned; its own Adam, so no grafting and no momentum on top.
    pub fn soap() -> Self {
        LibraryHparams {
            block_size: Some(10000),
            precondition_every: Some(10),
            graft: "none".into(),
            nesterov: false,
            ..Self::base()
        }
    }

    /// The paper's Sketchy settings (NOTES §5): rank 256, block 1024; its start step and
    /// recomputation interval are not published, so Shampoo's (101, every 10) (ours).
    pub fn sketchy() -> Self {
        LibraryHparams {
            rank: Some(256),
            ..Self::shampoo(1024)
        }
    }
}

impl OptimizerHparams {
    /// The autoencoder preset of `name`: its defaults, with the peak learning rate of
    /// [`default_lr`] and, where the equal-budget search changed them, the searched moments and
    /// ε ([`autoencoder_searched`]).
    pub fn preset(name: &str) -> Result<OptimizerHparams, OptimizerError> {
        let mut h = Self::defaults(name, default_lr(name)?)?;
        if let Some(searched) = autoencoder_searched(name) {
            h.beta1 = searched.beta1;
            if let Some(beta2) = searched.beta2 {
                h.beta2 = beta2;
            }
            h.eps = searched.eps;
        }
        Ok(h)
    }

    /// The tagger preset of `name`: the same defaults with the peak learning rate of
    /// [`default_tagger_lr`] (the autoencoder's searched momentum and ε are not carried over:
    /// the tagger's own searches kept the presets), and SOAP's largest rotated side
    /// [`SOAP_TAGGER_MAX_PRECOND_DIM`].
    pub fn tagger_preset(name: &str) -> Result<OptimizerHparams, OptimizerError> {
        let mut h = Self::defaults(name, default_tagger_lr(name)?)?;
        if name == "soap" {
            if let Some(lib) = h.library.as_mut() {
                lib.block_size = Some(SOAP_TAGGER_MAX_PRECOND_DIM);
            }
        }
        Ok(h)
    }

    /// What the presets of `name` share before tuning, with peak learning rate `lr`.
    fn defaults(name: &str, lr: f64) -> Result<OptimizerHparams, OptimizerError> {
        let ours = |library: LibraryHparams| OptimizerHparams {
            name: name.into(),
            lr,
            beta1: 0.9,
            beta2: 1.0,
            eps: 1e-6,
            weight_decay: 0.0,
            library: Some(library),
        };
        Ok(match name {
            "shared-basis" => ours(LibraryHparams::shared_basis()),
            "shared-basis-paper" => ours(LibraryHparams::shared_basis_paper()),
            "shampoo-250" => ours(LibraryHparams::shampoo(250)),
            "shampoo-1000" => ours(LibraryHparams::shampoo(1000)),
            "sketchy" => ours(LibraryHparams::sketchy()),
            // Block Adam's β1, β2, ε are its own moments' (no grafting, no extra momentum).
            "block-adam" => OptimizerHparams {
                beta2: 0.999,
                eps: 1e-8,
                ..ours(LibraryHparams::block_adam())
            },
            // The reference's defaults: β 0.95/0.95, ε 1e-8, decoupled weight decay 0.01.
            "soap" => OptimizerHparams {
                beta1: 0.95,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.01,
                ..ours(LibraryHparams::soap())
            },
            "adam" => OptimizerHparams {
                name: name.into(),
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                library: None,
            },
            // burn's Muon (momentum 0.95, Nesterov) on the 2-D weights; β2 and ε are its AdamW's
            // (the other parameters), weight decay both's.
            "muon" => OptimizerHparams {
                name: name.into(),
                lr,
                beta1: 0.95,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                library: None,
            },
            other => return Err(OptimizerError::Unknown(other.to_string())),
        })
    }
}

/// Autoencoder settings found by the equal-budget search of 2026-12-02 (README,
/// "Hyperparameter search"; docs/search/autoencoder-2026-12-02.md): one trial's draw, kept to the
/// last digit so that the preset is the measured run's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Searched {
    /// The trial of the search (seed 0) that drew these values.
    pub trial: usize,
    pub lr: f64,
    pub beta1: f64,
    /// β2 where the space searches it (Block Adam's second moment); `None` keeps the default.
    pub beta2: Option<f64>,
    pub eps: f64,
}

/// Shampoo(1000)'s and Sketchy's: trial 0 of their searches (seed 0, stream 0 of
/// `search/spaces/autoencoder/{shampoo-1000,sketchy}.toml`), the best of both searches and far
/// beyond the seed spread (Shampoo 113.94 -> 86.72, Sketchy 102.23 -> 82.58 final train loss
/// at 10 epochs).
const SHAMPOO_SKETCHY_SEARCHED: Searched = Searched {
    trial: 0,
    lr: 8.547585321237619e-5,
    beta1: 0.8921750305304045,
    beta2: None,
    eps: 6.859645331755325e-6,
};

/// Block Adam's: trial 2 of its search (stream 2 of `search/spaces/autoencoder/block-adam.toml`),
/// the best of its three trials and far beyond the seed spread (84.68 -> 67.03 final train loss
/// at 10 epochs, seed 0; 66.45 at seed 1).
const BLOCK_ADAM_SEARCHED: Searched = Searched {
    trial: 2,
    lr: 1.9392994370517308e-3,
    beta1: 0.9134536803273109,
    beta2: Some(0.999835325062509),
    eps: 2.1324625496704706e-9,
};

/// SOAP's: trial 1 of its search (stream 1 of `search/spaces/autoencoder/soap.toml`, 2026-12-03),
/// the best of its three trials (89.29 / 55.35 / 61.31 final train loss at 10 epochs, seed 0,
/// against 80.04 with the reference's defaults).
const SOAP_SEARCHED: Searched = Searched {
    trial: 1,
    lr: 8.981622196423681e-3,
    beta1: 0.9256129353429233,
    beta2: Some(0.7779392239243175),
    eps: 1.0522624351664683e-7,
};

/// Muon's: trial 1 of its search (stream 1 of `search/spaces/autoencoder/muon.toml`, centred on
/// lr 3e-3, 2026-12-03), the best of its three trials (docs/search/autoencoder-2026-12-03.md: t0
/// 70.97, t1 55.47 final train loss at 10 epochs, seed 0), against
/// 376 (at epoch 9) with lr 3e-4. β2 and ε are its AdamW's.
const MUON_SEARCHED: Searched = Searched {
    trial: 1,
    lr: 8.981622196423681e-3,
    beta1: 0.9256129353429233,
    beta2: Some(0.945718229037659),
    eps: 1.0522624351664683e-7,
};

/// The searched autoencoder settings of `name`, where the search changed its preset (the other
/// presets kept their values; Shampoo(250) was not searched).
pub fn autoencoder_searched(name: &str) -> Option<Searched> {
    match name {
        "shampoo-1000" | "sketchy" => Some(SHAMPOO_SKETCHY_SEARCHED),
        "block-adam" => Some(BLOCK_ADAM_SEARCHED),
        "soap" => Some(SOAP_SEARCHED),
        "muon" => Some(MUON_SEARCHED),
        _ => None,
    }
}

/// SOAP's largest rotated side on the tagger: every side of the model's weights (≤ 512 in the
/// small and the paper's model) but not the vocabulary side of the embedding table (3,356 words
/// on PTNK), whose 3356×3356 eigendecomposition every 10 steps about doubled the epoch's time.
pub const SOAP_TAGGER_MAX_PRECOND_DIM: usize = 1024;

/// The default peak learning rate of a preset, tuned on this benchmark (README, "Learning rates
/// of the presets", says how).
pub fn default_lr(name: &str) -> Result<f64, OptimizerError> {
    // Shampoo(1000), Sketchy, Block Adam, SOAP, Muon: searched on equal budgets (with their
    // moments and ε).
    if let Some(searched) = autoencoder_searched(name) {
        return Ok(searched.lr);
    }
    match name {
        // Best final training loss of a 10-epoch full-MNIST sweep (README).
        "adam" => Ok(3e-4),
        "shared-basis" | "shared-basis-paper" => Ok(1e-4),
        // Same grafting as shared-basis, so the same step norm; not searched (README).
        "shampoo-250" => Ok(1e-4),
        other => Err(OptimizerError::Unknown(other.to_string())),
    }
}

/// The default peak learning rate of a preset on the Transformer tagger (README, "Learning
/// rates of the presets", says how they were chosen).
pub fn default_tagger_lr(name: &str) -> Result<f64, OptimizerError> {
    match name {
        // Best eval accuracy of 30-epoch runs at 1e-3, 3e-3, 1e-2 (86.4% at 3e-3 and 1e-2).
        "adam" => Ok(3e-3),
        // Not tuned: the reference's default, and Adam's for Muon (its RMS matches AdamW's).
        "soap" | "muon" => Ok(3e-3),
        // 15-epoch runs at 1e-3 (stopped: behind), 3e-3, 1e-2: 1e-2 best.
        "block-adam" => Ok(1e-2),
        // 15-epoch runs of shared-basis at 3e-5, 1e-4, 3e-4, 1e-3: 1e-4 best; Shampoo and
        // Sketchy share its grafting, so its step size.
        "shared-basis" | "shared-basis-paper" | "shampoo-250" | "shampoo-1000" | "sketchy" => {
            Ok(1e-4)
        }
        other => Err(OptimizerError::Unknown(other.to_string())),
    }
}

/// The `shared-basis` preset's lost-mass policy and multiplier (README, "The lost-mass ridge").
pub const DEFAULT_RHO: &str = "norm";
pub const DEFAULT_RHO_SCALE: f64 = precond::TUNED_RHO_SCALE;

/// Names accepted by `--rho` (shared-basis' lost-mass policy, [`RhoMode`]): `norm` is
/// Algorithm 1's ‖M_i − B R_i Bᵀ‖₂ (by `--rho-iters` power iterations from inside the
/// residual's span, 0 = exact), `random-start` the power-iteration estimate from a random start
/// in ℝ^b after `--rho-iters` steps, `rayleigh` the Rayleigh quotient at a random start, `fd`
/// the frequent-directions increment λ_min(R̃_i) + |(I − B Bᵀ) g_i|².
pub const RHO_POLICIES: &[&str] = &["norm", "random-start", "rayleigh", "fd"];

/// The [`RhoMode`] of a `--rho` policy name and its `--rho-iters` (default 10 for `norm`, 1 for
/// `random-start`; `rayleigh` and `fd` take none).
pub fn rho_mode(policy: &str, iters: Option<usize>) -> Result<RhoMode, OptimizerError> {
    Ok(match (policy, iters) {
        ("norm", None) => RhoMode::PowerIteration(10),
        ("norm", Some(0)) => RhoMode::Exact,
        ("norm", Some(n)) => RhoMode::PowerIteration(n),
        ("random-start", n) => RhoMode::RandomStart(n.unwrap_or(1)),
        ("rayleigh", None) => RhoMode::Rayleigh,
        ("fd", None) => RhoMode::FrequentDirections,
        ("rayleigh" | "fd", Some(_)) => {
            return Err(OptimizerError::NotApplicable {
                flag: "rho-iters",
                optimizer: format!("shared-basis with --rho {policy}"),
            })
        }
        (other, _) => return Err(OptimizerError::UnknownRho(other.to_string())),
    })
}

/// The block eigensolvers of shared-basis and Block Adam (`--eigensolver`): `batched` (eight
/// blocks at a time in SIMD lanes, the default) and `faer` (one block at a time; the kernel of
/// every run recorded before the batched one existed).
pub const EIGENSOLVERS: &[&str] = &["batched", "faer"];

/// Parses a name of [`EIGENSOLVERS`] (absent: batched).
pub fn block_eigensolver(name: Option<&str>) -> Result<BlockEigensolver, OptimizerError> {
    match name.unwrap_or("batched") {
        "batched" => Ok(BlockEigensolver::Batched),
        "faer" => Ok(BlockEigensolver::Faer),
        other => Err(OptimizerError::UnknownEigensolver(other.to_string())),
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
    /// burn's Muon and AdamW: one momentum buffer per Muon parameter, two moments per AdamW
    /// parameter (counted when built, from the model's parameters).
    Muon { bytes: u64 },
}

impl BuiltOptimizer {
    /// Bytes of optimizer state for a model of `num_params` parameters. For the library's
    /// methods, its `ParamOptimizer::state_bytes` summed over the parameters that have taken a
    /// step.
    pub fn state_bytes(&self, num_params: usize) -> u64 {
        match &self.accounting {
            Accounting::Adam => 2 * num_params as u64 * 4,
            Accounting::Library(handle) => handle.state_bytes() as u64,
            Accounting::Muon { bytes } => *bytes,
        }
    }

    /// The last error of the library's optimizer, if any (a skipped or failed parameter step;
    /// under `--nonfinite error` a non-finite gradient is one).
    pub fn take_last_error(&self) -> Option<PrecondError> {
        match &self.accounting {
            Accounting::Adam | Accounting::Muon { .. } => None,
            Accounting::Library(handle) => handle.take_last_error(),
        }
    }

    /// The last warning of the library's optimizer, if any: a parameter update skipped under
    /// `--nonfinite skip` (the message names the parameter and its step).
    pub fn take_last_warning(&self) -> Option<PrecondError> {
        match &self.accounting {
            Accounting::Adam | Accounting::Muon { .. } => None,
            Accounting::Library(handle) => handle.take_last_warning(),
        }
    }

    /// Parameter updates skipped so far because their gradient held NaN or ∞ (0 for adam).
    pub fn nonfinite_skips(&self) -> u64 {
        match &self.accounting {
            Accounting::Adam | Accounting::Muon { .. } => 0,
            Accounting::Library(handle) => handle.stats().skipped_non_finite,
        }
    }
}

/// The library configuration of `h` (one of our presets), for the burn adapter.
/// Whether `h` is a library method that takes parameters of every shape itself and has no
/// grafting (Block Adam, SOAP, the diagonal methods): such a method has nothing sensible to give
/// a parameter it is told not to precondition, so the tagger leaves its embedding table to it.
pub fn takes_every_shape(h: &OptimizerHparams) -> Result<bool, OptimizerError> {
    if h.library.is_none() {
        return Ok(false);
    }
    let config = library_config(h)?;
    let config = config.config();
    Ok(config.method.takes_every_shape() && config.graft.kind == GraftKind::None)
}

pub fn library_config(h: &OptimizerHparams) -> Result<SharedBasisOptimizerConfig, OptimizerError> {
    let lib = h
        .library
        .clone()
        .unwrap_or_else(LibraryHparams::shared_basis);
    let block_adam = h.name == "block-adam";
    let soap = h.name == "soap";
    let method = if soap {
        Method::Soap(SoapConfig {
            beta1: h.beta1,
            beta2: h.beta2,
            shampoo_beta: -1.0,
            eps: h.eps,
            precondition_frequency: lib.precondition_every.unwrap_or(10),
            max_precond_dim: lib.block_size.unwrap_or(10000),
        })
    } else if block_adam {
        Method::BlockAdam(BlockAdamConfig {
            block_size: lib.block_size.unwrap_or(10),
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            eigensolver: block_eigensolver(lib.eigensolver.as_deref())?,
        })
    } else if h.name == "sketchy" {
        Method::Sketchy(SketchyConfig {
            rank: lib.rank.unwrap_or(256),
            block_size: lib.block_size.unwrap_or(1024),
            beta2: h.beta2,
            eps: h.eps,
            start_step: lib.start_step,
            precondition_every: lib.precondition_every.unwrap_or(1),
        })
    } else if h.name.starts_with("shampoo") {
        Method::Shampoo(ShampooConfig {
            block_size: lib.block_size.unwrap_or(1024),
            beta2: h.beta2,
            eps: h.eps,
            start_step: lib.start_step,
            precondition_every: lib.precondition_every.unwrap_or(1),
        })
    } else {
        Method::SharedBasis(SharedBasisConfig {
            rank: lib.rank.unwrap_or(32),
            oversample: lib.oversample.unwrap_or(0),
            power_iters: lib.power_iters.unwrap_or(1),
            rho: rho_mode(lib.rho.as_deref().unwrap_or("norm"), lib.rho_iters)?,
            eps: h.eps,
            beta2: h.beta2,
            seed: lib.seed,
            rho_scale: lib.rho_scale.unwrap_or(1.0),
            eigensolver: block_eigensolver(lib.eigensolver.as_deref())?,
        })
    };
    let config = SharedBasisOptimizerConfig::new()
        .with_method(method)
        .with_graft(graft_kind(&lib.graft)?)
        // Block Adam's and SOAP's β1 is their own first moment; momentum on top would count it
        // twice.
        .with_beta1(if block_adam || soap { 0.0 } else { h.beta1 })
        .with_nesterov(lib.nesterov)
        // SOAP's weight decay is decoupled, as the reference's (AdamW's); the others' coupled.
        .with_weight_decay(WeightDecayConfig {
            rate: h.weight_decay,
            mode: if soap {
                WeightDecayMode::Decoupled
            } else {
                WeightDecayMode::Coupled
            },
        })
        .with_start_preconditioning_step(lib.start_step)
        .with_nonfinite(lib.nonfinite.policy());
    config.config().validate()?;
    Ok(config)
}

/// Build the optimizer named in `h` without a model (tests). `muon` needs the model (its 2-D
/// weights form the Muon group): use [`build_optimizer_for`].
#[cfg(test)]
pub fn build_optimizer(h: &OptimizerHparams) -> Result<BuiltOptimizer, OptimizerError> {
    assert_ne!(h.name, "muon", "muon needs the model: build_optimizer_for");
    build(h, Vec::new(), &[], &[])
}

/// Checks `h` as [`build_optimizer`] would, for every preset (`muon` included) without a model.
pub fn validate(h: &OptimizerHparams) -> Result<(), OptimizerError> {
    check(h)
}

/// The float parameters of `module` with their shapes.
pub fn param_shapes<M: Module>(module: &M) -> Vec<(ParamId, Vec<usize>)> {
    #[derive(Default)]
    struct Shapes(Vec<(ParamId, Vec<usize>)>);
    impl ModuleVisitor for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push((param.id, param.val().shape().to_vec()));
        }
    }
    let mut shapes = Shapes::default();
    module.visit(&mut shapes);
    shapes.0
}

/// [`build_optimizer`] for `model`: the library's errors and warnings name its parameters by
/// module path (`layers.0.weight`).
pub fn build_optimizer_for<M: Module>(
    h: &OptimizerHparams,
    model: &M,
) -> Result<BuiltOptimizer, OptimizerError> {
    build(h, param_names(model), &param_shapes(model), &[])
}

/// [`build_optimizer_for`] with parameters that the library's methods do not precondition, each
/// with its own fallback (the tagger's embedding table). Adam treats every parameter alike.
pub fn build_optimizer_with<M: Module>(
    h: &OptimizerHparams,
    model: &M,
    unpreconditioned: &[(ParamId, Fallback)],
) -> Result<BuiltOptimizer, OptimizerError> {
    build(
        h,
        param_names(model),
        &param_shapes(model),
        unpreconditioned,
    )
}

fn build(
    h: &OptimizerHparams,
    names: Vec<(ParamId, String)>,
    shapes: &[(ParamId, Vec<usize>)],
    unpreconditioned: &[(ParamId, Fallback)],
) -> Result<BuiltOptimizer, OptimizerError> {
    check(h)?;
    match h.name.as_str() {
        "muon" => Ok(build_muon(h, shapes, unpreconditioned)),
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
        _ if h.library.is_some() => {
            let mut config = library_config(h)?.with_param_names(names);
            for &(id, fallback) in unpreconditioned {
                config = config.exclude_with(id, fallback);
            }
            let (optim, handle) = config.init_with_handle()?;
            Ok(BuiltOptimizer {
                optim,
                accounting: Accounting::Library(handle),
            })
        }
        other => Err(OptimizerError::Unknown(other.to_string())),
    }
}

/// burn's Muon for the 2-D parameters (not those in `unpreconditioned`, e.g. an embedding table,
/// which Muon's authors leave to AdamW), burn's AdamW for the rest: AdamW is the module's default
/// optimizer and the Muon weights one parameter group. Muon: momentum `beta1` (Nesterov, no
/// dampening), burn's Newton–Schulz defaults (5 steps, coefficients (3.4445, −4.775, 2.0315)),
/// its step scaled by 0.2·√max(A, B) ([`AdjustLrFn::MatchRmsAdamW`]) so that one learning rate
/// serves both groups; decoupled weight decay `weight_decay` in both. AdamW: β1 0.9 (burn's
/// default), `beta2`, `eps`.
fn build_muon(
    h: &OptimizerHparams,
    shapes: &[(ParamId, Vec<usize>)],
    unpreconditioned: &[(ParamId, Fallback)],
) -> BuiltOptimizer {
    let is_muon = |id: &ParamId, shape: &[usize]| {
        shape.len() == 2 && !unpreconditioned.iter().any(|(u, _)| u == id)
    };
    let muon_ids: Vec<ParamId> = shapes
        .iter()
        .filter(|(id, shape)| is_muon(id, shape))
        .map(|(id, _)| *id)
        .collect();
    let (mut muon_floats, mut adamw_floats) = (0u64, 0u64);
    for (id, shape) in shapes {
        let n = shape.iter().product::<usize>() as u64;
        if is_muon(id, shape) {
            muon_floats += n;
        } else {
            adamw_floats += n;
        }
    }
    let adamw = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(h.beta2 as f32)
        .with_epsilon(h.eps as f32)
        .with_weight_decay(h.weight_decay as f32);
    let decay = (h.weight_decay != 0.0).then_some(BurnWeightDecay {
        penalty: h.weight_decay as f32,
    });
    let muon = MuonConfig::new()
        .with_momentum(BurnMomentum {
            momentum: h.beta1,
            dampening: 0.0,
            nesterov: true,
        })
        .with_weight_decay(decay)
        .with_adjust_lr_fn(AdjustLrFn::MatchRmsAdamW)
        .build();
    let mut optim = adamw.init();
    if !muon_ids.is_empty() {
        optim = optim.with_group(ParamGroup::from_ids(muon_ids), muon, None);
    }
    BuiltOptimizer {
        optim,
        accounting: Accounting::Muon {
            bytes: 4 * (muon_floats + 2 * adamw_floats),
        },
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
    if (h.name == "adam" || h.name == "muon") && !(0.0..1.0).contains(&h.beta2) {
        return bad("beta2", h.beta2, "must be in [0, 1)");
    }
    if !(h.eps.is_finite() && h.eps >= 0.0) {
        return bad("eps", h.eps, "must be >= 0");
    }
    if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
        return bad("weight_decay", h.weight_decay, "must be >= 0");
    }
    if h.library.is_some() {
        library_config(h)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::autoencoder::Autoencoder;
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor};

    fn adam() -> OptimizerHparams {
        OptimizerHparams::preset("adam").unwrap()
    }

    /// SOAP's and Muon's autoencoder presets are their searches' best trials to the last digit;
    /// the tagger keeps the untuned values, with SOAP's vocabulary side unrotated.
    #[test]
    fn soap_and_muon_presets_are_the_searched_draws() {
        for (name, beta2) in [("soap", 0.7779392239243175), ("muon", 0.945718229037659)] {
            let h = OptimizerHparams::preset(name).unwrap();
            assert_eq!(
                (h.lr, h.beta1, h.beta2, h.eps),
                (
                    8.981622196423681e-3,
                    0.9256129353429233,
                    beta2,
                    1.0522624351664683e-7
                ),
                "{name}"
            );
            let t = OptimizerHparams::tagger_preset(name).unwrap();
            assert_eq!((t.lr, t.beta1), (3e-3, 0.95), "{name}");
        }
        let soap = OptimizerHparams::tagger_preset("soap").unwrap();
        assert_eq!(
            soap.library.unwrap().block_size,
            Some(SOAP_TAGGER_MAX_PRECOND_DIM)
        );
        let soap = OptimizerHparams::preset("soap").unwrap();
        assert_eq!(soap.library.unwrap().block_size, Some(10000));
    }

    #[test]
    fn builds_adam_and_rejects_unknown_or_invalid() {
        assert!(build_optimizer(&adam()).is_ok());
        let err = OptimizerHparams::preset("sgdx")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "unknown optimizer \"sgdx\"; known: adam, shared-basis, shared-basis-paper, \
                 shampoo-250, shampoo-1000, sketchy, block-adam, soap, muon"
            )
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
        zero_rank.library.as_mut().unwrap().rank = Some(0);
        let err = build_optimizer(&zero_rank).err().unwrap().to_string();
        assert!(err.contains("rank"), "{err}");
        let mut graft = sb.clone();
        graft.library.as_mut().unwrap().graft = "lion".into();
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
        assert_eq!(built.state_bytes(model.num_params()), 2 * 2_837_314 * 4);
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
        assert_eq!(built.state_bytes(model.num_params()), 4 * floats);
        assert!(built.take_last_error().is_none());
        assert_eq!(model.num_params(), 2_837_314);
    }

    /// Shampoo(250)'s accounting on the autoencoder equals Σ over 250×250 (or smaller) blocks of
    /// statistics and roots, 2·(r² + c²) floats, plus grafting and momentum buffers.
    #[test]
    fn shampoo_state_bytes_match_the_formula_on_the_autoencoder() {
        let device = Device::flex().autodiff();
        let model = Autoencoder::new(0, &device);
        let mut built = build_optimizer(&OptimizerHparams::preset("shampoo-250").unwrap()).unwrap();
        let x = Tensor::<2>::ones([4, 784], &device);
        let loss = model.forward(x).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = built.optim.step(1e-3, model, grads);
        let pieces = |n: u64| -> Vec<u64> {
            (0..n.div_ceil(250))
                .map(|j| (n - 250 * j).min(250))
                .collect()
        };
        let dims = [784u64, 1000, 500, 250, 30, 250, 500, 1000, 784];
        let mut floats = 0u64;
        for w in dims.windows(2) {
            let (b, m) = (w[0], w[1]);
            for r in pieces(b) {
                for c in pieces(m) {
                    floats += 2 * (r * r + c * c);
                }
            }
            floats += 2 * b * m + 2 * m;
        }
        assert_eq!(built.state_bytes(model.num_params()), 4 * floats);
        assert!(built.take_last_error().is_none());
    }

    /// One step of `built` on the autoencoder (a batch of ones); returns the stepped model.
    fn step_once(built: &mut BuiltOptimizer, model: Autoencoder) -> Autoencoder {
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::ones([4, 784], &device);
        let loss = model.forward(x).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        built.optim.step(1e-3, model, grads)
    }

    /// SOAP on the autoencoder: per weight (b = d_in, m = d_out; every side ≤ 10000 is rotated)
    /// L, Q_L (b²), R, Q_R (m²) and the rotated moments (2·b·m); a bias is Adam (2·m). No
    /// grafting or momentum buffers. Its preset: decoupled decay 0.01, no momentum, no grafting.
    #[test]
    fn soap_state_bytes_match_the_formula_on_the_autoencoder() {
        let h = OptimizerHparams::tagger_preset("soap").unwrap();
        assert_eq!((h.lr, h.beta1, h.beta2, h.eps), (3e-3, 0.95, 0.95, 1e-8));
        // The autoencoder's searched values (`soap_and_muon_presets_are_the_searched_draws`),
        // on the same library settings.
        let h = OptimizerHparams::preset("soap").unwrap();
        let lib = library_config(&h).unwrap().config().clone();
        assert_eq!(lib.weight_decay.mode, WeightDecayMode::Decoupled);
        assert_eq!(lib.weight_decay.rate, 0.01);
        assert_eq!(lib.momentum.beta1, 0.0);
        assert_eq!(lib.graft.kind, GraftKind::None);
        let Method::Soap(soap) = &lib.method else {
            panic!("{:?}", lib.method)
        };
        assert_eq!(
            (soap.precondition_frequency, soap.max_precond_dim),
            (10, 10000)
        );
        let model = Autoencoder::new(0, &Device::flex().autodiff());
        let mut built = build_optimizer(&h).unwrap();
        let model = step_once(&mut built, model);
        let dims = [784u64, 1000, 500, 250, 30, 250, 500, 1000, 784];
        let floats: u64 = dims
            .windows(2)
            .map(|w| {
                let (b, m) = (w[0], w[1]);
                2 * b * b + 2 * m * m + 2 * b * m + 2 * m
            })
            .sum();
        assert_eq!(built.state_bytes(model.num_params()), 4 * floats);
        assert!(built.take_last_error().is_none());
    }

    /// burn's Muon on the autoencoder: the 8 weights (2-D) in the Muon group, one momentum
    /// buffer each; the 8 biases by AdamW, two moments each. The step moves every parameter.
    #[test]
    fn muon_groups_weights_and_counts_its_state() {
        let h = OptimizerHparams::preset("muon").unwrap();
        let device = Device::flex().autodiff();
        let model = Autoencoder::new(0, &device);
        let shapes = param_shapes(&model);
        assert_eq!(shapes.len(), 16);
        let before: Vec<Vec<f32>> = model_values(&model);
        let mut built = build_optimizer_for(&h, &model).unwrap();
        let model = step_once(&mut built, model);
        let dims = [784u64, 1000, 500, 250, 30, 250, 500, 1000, 784];
        let floats: u64 = dims.windows(2).map(|w| w[0] * w[1] + 2 * w[1]).sum();
        assert_eq!(built.state_bytes(model.num_params()), 4 * floats);
        let after = model_values(&model);
        for (a, b) in before.iter().zip(&after) {
            assert!(
                a.iter().zip(b).any(|(x, y)| x != y),
                "a parameter did not move"
            );
            assert!(b.iter().all(|v| v.is_finite()));
        }
        // An excluded 2-D parameter goes to AdamW (two moments instead of one buffer).
        let first = shapes[0].clone();
        assert_eq!(first.1, vec![784, 1000]);
        let built = build_optimizer_with(&h, &model, &[(first.0, Fallback::Graft)]).unwrap();
        assert_eq!(
            built.state_bytes(model.num_params()),
            4 * (floats + 784 * 1000)
        );
    }

    /// Every float parameter's values, in visiting order.
    fn model_values(model: &Autoencoder) -> Vec<Vec<f32>> {
        #[derive(Default)]
        struct Values(Vec<Vec<f32>>);
        impl ModuleVisitor for Values {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push(param.val().try_into_vec_as::<f32>().unwrap());
            }
        }
        let mut values = Values::default();
        model.visit(&mut values);
        values.0
    }

    /// Block Adam(10) on the autoencoder: per weight m·((⌈b/10⌉ − 1)·10² + last²) second-moment
    /// floats (d_in = 784: 78 blocks of 10 and one of 4) and b·m first-moment floats; a bias is
    /// Adam (blocks of 1): 2·m. No grafting or momentum buffers.
    #[test]
    fn block_adam_state_bytes_match_the_formula_on_the_autoencoder() {
        let device = Device::flex().autodiff();
        let model = Autoencoder::new(0, &device);
        let mut built = build_optimizer(&OptimizerHparams::preset("block-adam").unwrap()).unwrap();
        let x = Tensor::<2>::ones([4, 784], &device);
        let loss = model.forward(x).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = built.optim.step(1e-3, model, grads);
        let dims = [784u64, 1000, 500, 250, 30, 250, 500, 1000, 784];
        let floats: u64 = dims
            .windows(2)
            .map(|w| {
                let (b, m) = (w[0], w[1]);
                let last = b - 10 * (b.div_ceil(10) - 1);
                m * ((b.div_ceil(10) - 1) * 100 + last * last) + b * m + 2 * m
            })
            .sum();
        assert_eq!(built.state_bytes(model.num_params()), 4 * floats);
        assert!(built.take_last_error().is_none());
    }
}
