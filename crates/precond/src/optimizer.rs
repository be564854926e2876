//! The full optimizer for ONE parameter: preconditioner, grafting, weight decay, momentum and the
//! parameter step, composed as distributed_shampoo composes them (NOTES §4). The burn adapter and
//! the CLI hold one [`ParamOptimizer`] per parameter and pass the scheduled learning rate in.
//!
//! One step, with every direction a descent direction (θ ← θ + lr·u):
//! 1. r = grafting direction of g ([`crate::graft`], NOTES §4 step 1).
//! 2. If the parameter is preconditioned: gather g into its (b, m) view, precondition, scatter
//!    back to d. The statistics are updated on *every* step from step 1, so Algorithm 1's sums stay
//!    exact. If t ≥ `start_preconditioning_step`, u = d rescaled to ‖r‖ (NOTES §4 step 2; unscaled
//!    for [`GraftKind::None`]), otherwise u = r.
//! 3. Coupled weight decay u ← u − rate·θ (NOTES §4 step 3).
//! 4. Momentum (NOTES §4 step 4).
//! 5. θ ← θ + lr·u, with decoupled decay θ ← θ − lr·rate·θ folded in (NOTES §4 step 5).
//!
//! Parameters that are 1-D, excluded by the caller, or whose view has b > `max_block_size` take
//! the [`Fallback`] path: the grafting optimizer alone, or SGD with momentum (the paper's choice
//! for the embedding table).
//!
//! A gradient holding NaN or ∞ is never used: [`OptimizerConfig::nonfinite`] says whether the step
//! is refused with an error ([`NonFinitePolicy::Error`], the default) or skipped
//! ([`NonFinitePolicy::Skip`]). Either way nothing changes: parameter, statistics, grafting and
//! momentum buffers and the step counter are as if that gradient had never been seen.
//!
//! **Linear-algebra failures.** The factorizations of shared-basis (QR, SVD, symmetric
//! eigendecompositions), Shampoo (inverse 4th roots), Sketchy (QR and eigendecomposition of the
//! sketch updates), Block Adam (inverse square roots) and SOAP (eigendecomposition and QR of its
//! eigenbases) are handled in three stages:
//! 1. *f64 retry.* A factorization that fails in f32 (no convergence, or a non-finite result from
//!    a finite input) is retried in f64: the input is converted to f64, factored, and the result
//!    rounded back to f32. This happens in one place, the wrappers of [`crate::linalg`]
//!    ([`crate::linalg::thin_q`], [`crate::linalg::thin_svd_left`],
//!    [`crate::linalg::SymEig::decompose`]); a retry that succeeds is not counted anywhere.
//! 2. *Keep the previous state.* If it fails in f64 too, the state that factorization would
//!    have replaced stays as it was, and the direction is computed from the kept state:
//!    shared-basis keeps the layer's B, R_i and ρ_i of the previous step (they are its
//!    statistics, so the gradient is dropped from them); Shampoo keeps that inverse root (L and
//!    R absorb the gradient); Sketchy keeps that side's sketch and frozen copy (the gradient is
//!    dropped from that sketch); Block Adam uses that chunk's previous root, recomputed from the
//!    statistics of the previous step (V and m absorb the gradient); SOAP keeps that side's
//!    eigenbasis (L and R absorb the gradient). The method's
//!    [`LinalgHealth`], read through
//!    [`Preconditioner::linalg_health`] and [`ParamOptimizer::linalg_failures`] /
//!    [`ParamOptimizer::consecutive_linalg_failures`], counts the steps with such a failure and
//!    how many came in a row; a step whose factorizations all succeed resets the run (a step
//!    that runs none, e.g. Shampoo between root steps, leaves it alone). The counts are part of
//!    the serialized state.
//! 3. *Give up.* A step is *refused* when the preconditioner returns
//!    [`PrecondError::LinalgFailure`] (an overflow, below) or a direction holding NaN or ∞; the
//!    parameter, grafting and momentum buffers and [`ParamOptimizer::steps`] are then
//!    untouched and [`ParamOptimizer::step`] returns `LinalgFailure` naming the parameter's step
//!    (`steps() + 1`, so a refusal repeated at every later step names the same step) and, in
//!    `consecutive`, the current run of failed steps: the preconditioner's
//!    [`LinalgHealth::consecutive`] plus [`ParamOptimizer::refused_in_row`], the refused steps
//!    since the last applied one that the preconditioner did not count itself (a refused step
//!    whose kernel failed is counted by the preconditioner only). So a refusal that repeats
//!    reports 1, 2, 3, …; an applied step resets `refused_in_row` to 0 (the count is part of the
//!    serialized state). A step whose factorizations failed (stage 2) is applied too, unless it
//!    makes [`OptimizerConfig::max_linalg_failures`] (default 3; 0 = never) failed steps in a
//!    row (the same run): then it is refused as well, with `consecutive` = the run's length.
//!    [`OptimizerConfig::gives_up`] says whether an error makes that limit, i.e. whether the
//!    caller should stop training rather than warn and go on: a refused step below the limit is
//!    worth a warning, a run at the limit means that parameter is frozen. Each further failed
//!    step errors again until one is applied.
//!
//!    What the preconditioner's state does on a refused step: a preconditioner that refuses
//!    with `LinalgFailure` has changed nothing (shared-basis also checks its direction before
//!    committing, so for it every refusal changes nothing), and its step counter stays equal to
//!    [`ParamOptimizer::steps`]. One that commits its step before its direction turns out
//!    non-finite (or whose failed factorizations reach the limit) has taken that step: its
//!    statistics hold the gradient and its own step counter ([`Preconditioner::steps`]) is then
//!    ahead of [`ParamOptimizer::steps`], which counts applied steps only.
//!
//! An overflow is not a factorization failure: a step whose statistics overflow f32 where no
//! previous state can stand in is refused at once with `LinalgFailure` and changes nothing
//! (shared-basis, whose A is quartic in g; Block Adam, whose V holds ∞), while Shampoo and Sketchy
//! keep their previous roots or sketches and count the step as above. A non-finite
//! preconditioned direction is refused at once too (stage 3).
//!
//! [`GraftKind::None`]: crate::graft::GraftKind::None

use crate::block_diag::{BlockAdam, BlockAdamConfig};
use crate::diagonal::{Diagonal, DiagonalConfig};
use crate::error::{invalid, PrecondError, Result};
use crate::full_matrix::{FullMatrix, FullMatrixConfig};
use crate::graft::{GraftConfig, GraftKind, GraftState};
use crate::linalg::par_all_finite;
use crate::momentum::{MomentumConfig, MomentumState};
use crate::preconditioner::{LinalgHealth, Preconditioner};
use crate::shampoo::{Shampoo, ShampooConfig};
use crate::shared_basis::{SharedBasis, SharedBasisConfig};
use crate::sketchy::{Sketchy, SketchyConfig};
use crate::soap::{Soap, SoapConfig};
use crate::view::ParamView;
use crate::weight_decay::WeightDecayConfig;
use faer::{MatMut, MatRef};
use serde::{Deserialize, Serialize};

/// The second-order method applied to eligible parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// The shared-basis block low-rank preconditioner (Algorithm 1).
    SharedBasis(SharedBasisConfig),
    /// Shampoo with blocking (Gupta et al. 2018; Anil et al. 2020). Set
    /// `start_preconditioning_step` to its `start_step` too: before its first roots the grafting
    /// direction is used whatever that setting says.
    Shampoo(ShampooConfig),
    /// Sketchy (Feinberg et al. 2023): Shampoo with frequent-directions sketches of rank `rank`;
    /// the same advice on `start_preconditioning_step` as Shampoo.
    Sketchy(SketchyConfig),
    /// Block Adam (AdaBlock, Yun et al. 2022): blocks of `block_size` consecutive rows inside
    /// each column. Its direction already holds its first moment: use it with grafting `None`
    /// and momentum β1 = 0 to get Block Adam itself. Elementwise in cost, so 1-D parameters and
    /// b > `max_block_size` are preconditioned too (a 1-D parameter, b = 1, is one chunk of one row:
    /// Adam).
    BlockAdam(BlockAdamConfig),
    /// The diagonal methods (SGD, Adagrad, RMSprop, Adam, AdamW) with PyTorch's definitions; use
    /// with grafting `None` and momentum β1 = 0 (and decoupled weight decay for AdamW). Every
    /// parameter is preconditioned.
    Diagonal(DiagonalConfig),
    /// Full-matrix Adagrad over the whole flattened parameter: a reference for small
    /// parameters (larger ones are a configuration error).
    FullMatrix(FullMatrixConfig),
    /// No preconditioner: the grafting optimizer alone (e.g. Adam or RMSProp as a baseline).
    GraftOnly,
    /// SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors. It carries its own
    /// Adam moments and bias correction: use it with grafting `None` and momentum β1 = 0 (and
    /// decoupled weight decay, as the reference). Every parameter is preconditioned by it: a side
    /// larger than its `max_precond_dim` (not `max_block_size`) is the identity, and 1-D
    /// parameters are Adam with SOAP's schedule ([`Soap::unrotated`]). (Appended last: variants
    /// are serialized by index.)
    Soap(SoapConfig),
}

impl Method {
    /// Whether the method takes parameters of every shape: its cost is elementwise in the
    /// parameter's size (Block Adam, diagonal) or it limits its sides itself (SOAP),
    /// so that 1-D parameters and b > `max_block_size` are preconditioned too instead of taking
    /// the fallback path. (A 1-D parameter is a (1, n) view: Block Adam's single chunk of one row
    /// is Adam with ε inside the root.)
    pub fn takes_every_shape(&self) -> bool {
        matches!(
            self,
            Method::BlockAdam(_) | Method::Diagonal(_) | Method::Soap(_)
        )
    }
}

impl Default for Method {
    fn default() -> Self {
        Method::SharedBasis(SharedBasisConfig::default())
    }
}

/// What a parameter that is not preconditioned (1-D, excluded, or b > `max_block_size`) does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fallback {
    /// The grafting direction, then weight decay and momentum as usual (distributed_shampoo's
    /// treatment of parameters it does not precondition).
    #[default]
    Graft,
    /// Direction −g, then weight decay and momentum: the paper's "sgd with momentum" for the
    /// embedding layer. Holds no grafting buffers.
    SgdMomentum,
}

/// What [`ParamOptimizer::step`] does with a gradient that holds NaN or ∞.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NonFinitePolicy {
    /// Refuse the step with [`PrecondError::NonFiniteGradient`] naming the step (the step it
    /// would have been); no state changes.
    #[default]
    Error,
    /// Skip the step: `Ok(`[`StepOutcome::Skipped`]`)`, no state changes (parameter,
    /// preconditioner statistics, grafting and momentum buffers, step counter), and
    /// [`ParamOptimizer::skipped`] counts it. The following steps are exactly those of an
    /// optimizer that never saw that gradient.
    Skip,
}

/// What one [`ParamOptimizer::step`] did when it returned `Ok`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepOutcome {
    /// The update was applied and [`ParamOptimizer::steps`] advanced by one.
    Applied,
    /// The gradient held NaN or ∞ and the policy is [`NonFinitePolicy::Skip`]: nothing changed.
    /// `step` is the 1-based step the gradient would have been (`steps() + 1`).
    Skipped {
        /// The step the skipped gradient would have been.
        step: u64,
    },
}

impl StepOutcome {
    /// True for [`StepOutcome::Skipped`].
    pub fn is_skipped(&self) -> bool {
        matches!(self, StepOutcome::Skipped { .. })
    }
}

/// Configuration of the per-parameter optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizerConfig {
    /// The preconditioner for eligible parameters.
    pub method: Method,
    /// Grafting (default RMSPROP_NORMALIZED, β2 0.999, eps 1e-10: NOTES §4).
    pub graft: GraftConfig,
    /// Momentum (default β1 0.9, Nesterov).
    pub momentum: MomentumConfig,
    /// Weight decay (default off).
    pub weight_decay: WeightDecayConfig,
    /// First step (1-based) at which the preconditioned direction is used; before it the grafting
    /// direction is used alone, while the statistics are still updated. Default 1 (**ours**:
    /// precondition from the first step, as Algorithm 1 does; distributed_shampoo defaults to 5).
    pub start_preconditioning_step: u64,
    /// A parameter whose view has more than this many rows b is not preconditioned (default 4096,
    /// distributed_shampoo's limit; the paper's embedding table falls under it).
    pub max_block_size: usize,
    /// What parameters that are not preconditioned do.
    pub fallback: Fallback,
    /// What a gradient holding NaN or ∞ does (default [`NonFinitePolicy::Error`]). Absent from
    /// a serialized config, it is the default. (The burn adapter's records of version 1 end the
    /// config before it: fields are only ever added at the end.)
    pub nonfinite: NonFinitePolicy,
    /// The limit on a parameter's run of failed steps (failed factorizations and refused
    /// steps in a row, see the module docs): a step whose factorizations failed and that makes
    /// the run this long is refused with [`PrecondError::LinalgFailure`] rather than applied,
    /// and [`OptimizerConfig::gives_up`] is true for a refusal that makes it this long. 0 = no
    /// limit. Default 3. Absent from a serialized config (burn adapter records of versions 1
    /// and 2), it is the default.
    pub max_linalg_failures: u64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            method: Method::default(),
            graft: GraftConfig::default(),
            momentum: MomentumConfig::default(),
            weight_decay: WeightDecayConfig::default(),
            start_preconditioning_step: 1,
            max_block_size: 4096,
            fallback: Fallback::Graft,
            nonfinite: NonFinitePolicy::Error,
            max_linalg_failures: 3,
        }
    }
}

impl OptimizerConfig {
    /// Checks every field; returns an error naming the bad one.
    pub fn validate(&self) -> Result<()> {
        match &self.method {
            Method::SharedBasis(c) => c.validate()?,
            Method::Shampoo(c) => c.validate()?,
            Method::Sketchy(c) => c.validate()?,
            Method::BlockAdam(c) => c.validate()?,
            Method::Diagonal(c) => c.validate()?,
            Method::FullMatrix(c) => c.validate()?,
            Method::Soap(c) => c.validate()?,
            Method::GraftOnly => {}
        }
        self.graft.validate()?;
        self.momentum.validate()?;
        self.weight_decay.validate()?;
        if self.start_preconditioning_step == 0 {
            return Err(invalid(
                "start_preconditioning_step",
                0,
                "steps count from 1",
            ));
        }
        if self.max_block_size == 0 {
            return Err(invalid("max_block_size", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// Whether `err`, returned by [`ParamOptimizer::step`] under this config, means giving up:
    /// a [`PrecondError::LinalgFailure`] whose `consecutive` run has reached
    /// [`max_linalg_failures`](Self::max_linalg_failures) (never when that is 0). A training
    /// loop should stop on it (that parameter no longer moves) and may warn and go on
    /// otherwise (module docs, "Linear-algebra failures", stage 3).
    pub fn gives_up(&self, err: &PrecondError) -> bool {
        let limit = self.max_linalg_failures;
        match err {
            PrecondError::LinalgFailure { consecutive, .. } => limit > 0 && *consecutive >= limit,
            _ => false,
        }
    }
}

/// The serializable state of the second-order method of one parameter. New methods add variants.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // one per parameter, built once and never moved in the hot loop
pub enum MethodState {
    /// Algorithm 1's basis, coefficients and lost mass.
    SharedBasis(SharedBasis<f32>),
    /// Shampoo's per-block statistics and roots.
    Shampoo(Shampoo<f32>),
    /// Sketchy's per-block sketches and their frozen copies.
    Sketchy(Sketchy<f32>),
    /// Block Adam's moments.
    BlockAdam(BlockAdam<f32>),
    /// A diagonal method's moments.
    Diagonal(Diagonal<f32>),
    /// Full-matrix Adagrad's statistics.
    FullMatrix(FullMatrix<f32>),
    /// SOAP's statistics, eigenbases and rotated moments (appended last: variants are
    /// serialized by index).
    Soap(Soap<f32>),
}

impl Preconditioner<f32> for MethodState {
    fn precondition(&mut self, grad: MatRef<'_, f32>, direction: MatMut<'_, f32>) -> Result<()> {
        match self {
            MethodState::SharedBasis(s) => s.precondition(grad, direction),
            MethodState::Shampoo(s) => s.precondition(grad, direction),
            MethodState::Sketchy(s) => s.precondition(grad, direction),
            MethodState::BlockAdam(s) => s.precondition(grad, direction),
            MethodState::Diagonal(s) => s.precondition(grad, direction),
            MethodState::FullMatrix(s) => s.precondition(grad, direction),
            MethodState::Soap(s) => s.precondition(grad, direction),
        }
    }
    fn state_bytes(&self) -> usize {
        match self {
            MethodState::SharedBasis(s) => s.state_bytes(),
            MethodState::Shampoo(s) => s.state_bytes(),
            MethodState::Sketchy(s) => s.state_bytes(),
            MethodState::BlockAdam(s) => s.state_bytes(),
            MethodState::Diagonal(s) => s.state_bytes(),
            MethodState::FullMatrix(s) => s.state_bytes(),
            MethodState::Soap(s) => s.state_bytes(),
        }
    }
    fn steps(&self) -> u64 {
        match self {
            MethodState::SharedBasis(s) => Preconditioner::<f32>::steps(s),
            MethodState::Shampoo(s) => Preconditioner::<f32>::steps(s),
            MethodState::Sketchy(s) => Preconditioner::<f32>::steps(s),
            MethodState::BlockAdam(s) => Preconditioner::<f32>::steps(s),
            MethodState::Diagonal(s) => Preconditioner::<f32>::steps(s),
            MethodState::FullMatrix(s) => Preconditioner::<f32>::steps(s),
            MethodState::Soap(s) => Preconditioner::<f32>::steps(s),
        }
    }
    fn linalg_health(&self) -> LinalgHealth {
        match self {
            MethodState::SharedBasis(s) => Preconditioner::<f32>::linalg_health(s),
            MethodState::Shampoo(s) => Preconditioner::<f32>::linalg_health(s),
            MethodState::Sketchy(s) => Preconditioner::<f32>::linalg_health(s),
            MethodState::BlockAdam(s) => Preconditioner::<f32>::linalg_health(s),
            MethodState::Diagonal(s) => Preconditioner::<f32>::linalg_health(s),
            MethodState::FullMatrix(s) => Preconditioner::<f32>::linalg_health(s),
            MethodState::Soap(s) => Preconditioner::<f32>::linalg_health(s),
        }
    }
    fn is_ready(&self) -> bool {
        match self {
            MethodState::SharedBasis(s) => Preconditioner::<f32>::is_ready(s),
            MethodState::Shampoo(s) => Preconditioner::<f32>::is_ready(s),
            MethodState::Sketchy(s) => Preconditioner::<f32>::is_ready(s),
            MethodState::BlockAdam(s) => Preconditioner::<f32>::is_ready(s),
            MethodState::Diagonal(s) => Preconditioner::<f32>::is_ready(s),
            MethodState::FullMatrix(s) => Preconditioner::<f32>::is_ready(s),
            MethodState::Soap(s) => Preconditioner::<f32>::is_ready(s),
        }
    }
}

/// Which path a parameter takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamPath {
    /// Preconditioned direction, grafted.
    Preconditioned,
    /// The grafting direction alone.
    Graft,
    /// −g with momentum.
    SgdMomentum,
}

/// Optimizer state of one parameter. `P` is the preconditioner; the default [`MethodState`] is
/// built from the config by [`ParamOptimizer::new`]. Serializable (work buffers are skipped and
/// reallocated on the first step after loading).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParamOptimizer<P = MethodState> {
    config: OptimizerConfig,
    view: ParamView,
    path: ParamPath,
    precond: Option<P>,
    graft: GraftState,
    momentum: MomentumState,
    step: u64,
    /// Gradients skipped under [`NonFinitePolicy::Skip`] since this value was built or loaded
    /// (not serialized, so that a skip leaves the serialized state unchanged).
    #[serde(skip)]
    skipped: u64,
    #[serde(skip)]
    work_a: Vec<f32>,
    #[serde(skip)]
    work_b: Vec<f32>,
    /// Steps refused in a row since the last applied one, each not already counted by the
    /// preconditioner's [`LinalgHealth::consecutive`] (module docs, "Linear-algebra
    /// failures"). Serialized last (absent from states saved before it existed: 0).
    #[serde(default)]
    refused_in_row: u64,
}

impl ParamOptimizer<MethodState> {
    /// State for a parameter of `shape` (row-major), blocks along `block_axis` (default last),
    /// `excluded` forcing the fallback path. Validates the config.
    pub fn new(
        config: &OptimizerConfig,
        shape: &[usize],
        block_axis: Option<usize>,
        excluded: bool,
    ) -> Result<Self> {
        Self::with_preconditioner(config, shape, block_axis, excluded, |view| {
            match &config.method {
                Method::SharedBasis(c) => Ok(MethodState::SharedBasis(SharedBasis::new(
                    c.clone(),
                    view.rows(),
                    view.blocks(),
                )?)),
                Method::Shampoo(c) => Ok(MethodState::Shampoo(Shampoo::new(
                    c,
                    view.rows(),
                    view.blocks(),
                )?)),
                Method::Sketchy(c) => Ok(MethodState::Sketchy(Sketchy::new(
                    c,
                    view.rows(),
                    view.blocks(),
                )?)),
                Method::BlockAdam(c) => Ok(MethodState::BlockAdam(BlockAdam::new(
                    c,
                    view.rows(),
                    view.blocks(),
                )?)),
                Method::Diagonal(c) => Ok(MethodState::Diagonal(Diagonal::new(
                    *c,
                    view.rows(),
                    view.blocks(),
                )?)),
                Method::FullMatrix(c) => Ok(MethodState::FullMatrix(FullMatrix::new(
                    *c,
                    view.rows(),
                    view.blocks(),
                )?)),
                Method::Soap(c) if view.is_vector() => Ok(MethodState::Soap(Soap::unrotated(
                    c,
                    view.rows(),
                    view.blocks(),
                )?)),
                Method::Soap(c) => Ok(MethodState::Soap(Soap::new(c, view.rows(), view.blocks())?)),
                Method::GraftOnly => Err(invalid("method", "GraftOnly", "has no preconditioner")),
            }
        })
    }
}

impl<P: Preconditioner<f32>> ParamOptimizer<P> {
    /// Like [`ParamOptimizer::new`] with a caller-built preconditioner: `make(view)` is called
    /// only when the parameter is preconditioned, i.e. when `config.method` is not
    /// [`Method::GraftOnly`], the parameter is not excluded, and (except for the elementwise-cost
    /// methods BlockAdam and Diagonal, and SOAP) it is not 1-D and has b ≤ `max_block_size`. (The
    /// method's own config in `config.method` is then not used.)
    pub fn with_preconditioner(
        config: &OptimizerConfig,
        shape: &[usize],
        block_axis: Option<usize>,
        excluded: bool,
        make: impl FnOnce(&ParamView) -> Result<P>,
    ) -> Result<Self> {
        config.validate()?;
        let view = ParamView::new(shape, block_axis)?;
        // Elementwise-cost methods and SOAP take every shape; the others skip vectors and huge blocks.
        let any_shape = config.method.takes_every_shape();
        let falls_back =
            excluded || (!any_shape && (view.is_vector() || view.rows() > config.max_block_size));
        let path = if falls_back {
            match config.fallback {
                Fallback::Graft => ParamPath::Graft,
                Fallback::SgdMomentum => ParamPath::SgdMomentum,
            }
        } else if config.method == Method::GraftOnly {
            ParamPath::Graft
        } else {
            ParamPath::Preconditioned
        };
        let precond = if path == ParamPath::Preconditioned {
            Some(make(&view)?)
        } else {
            None
        };
        let n = view.numel();
        let graft_cfg = if path == ParamPath::SgdMomentum {
            GraftConfig {
                kind: GraftKind::None,
                ..config.graft
            }
        } else {
            config.graft
        };
        let graft = GraftState::new(&graft_cfg, n)?;
        let momentum = MomentumState::new(&config.momentum, n)?;
        let work_b = if path == ParamPath::Preconditioned {
            vec![0.0; n]
        } else {
            Vec::new()
        };
        Ok(Self {
            config: config.clone(),
            view,
            path,
            precond,
            graft,
            momentum,
            step: 0,
            skipped: 0,
            work_a: vec![0.0; n],
            work_b,
            refused_in_row: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The parameter's (b, m) view.
    pub fn view(&self) -> &ParamView {
        &self.view
    }

    /// Which path this parameter takes.
    pub fn path(&self) -> ParamPath {
        self.path
    }

    /// True when the parameter is preconditioned.
    pub fn is_preconditioned(&self) -> bool {
        self.path == ParamPath::Preconditioned
    }

    /// The preconditioner, when there is one.
    pub fn preconditioner(&self) -> Option<&P> {
        self.precond.as_ref()
    }

    /// Steps applied so far (skipped gradients and refused steps do not count; see the module
    /// docs for how this relates to the preconditioner's own step counter).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Steps refused in a row since the last applied step that the preconditioner's
    /// [`LinalgHealth::consecutive`] does not count (module docs, "Linear-algebra failures",
    /// stage 3); an applied step resets it. Serialized with the state.
    pub fn refused_in_row(&self) -> u64 {
        self.refused_in_row
    }

    /// Gradients skipped under [`NonFinitePolicy::Skip`] since this value was built or loaded
    /// (the count is not serialized).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Steps in which the preconditioner's linear algebra failed and kept its previous state
    /// (see the module docs); 0 without a preconditioner. Serialized with the state.
    pub fn linalg_failures(&self) -> u64 {
        self.linalg_health().failures
    }

    /// The current run of such failed steps; a step whose factorizations all succeed resets it.
    pub fn consecutive_linalg_failures(&self) -> u64 {
        self.linalg_health().consecutive
    }

    /// The preconditioner's [`LinalgHealth`] (all zero without a preconditioner).
    pub fn linalg_health(&self) -> LinalgHealth {
        self.precond
            .as_ref()
            .map_or_else(LinalgHealth::default, |p| p.linalg_health())
    }

    /// Bytes of optimizer state: preconditioner + grafting + momentum buffers (workspaces
    /// excluded).
    pub fn state_bytes(&self) -> usize {
        self.precond.as_ref().map_or(0, |p| p.state_bytes())
            + self.graft.state_bytes()
            + self.momentum.state_bytes()
    }

    /// One optimizer step: `param` ← `param` + `lr`·(update), see the module docs. `param` and
    /// `grad` are the flat row-major tensor.
    ///
    /// Returns [`StepOutcome::Applied`] when the update was applied, or
    /// [`StepOutcome::Skipped`] when `grad` holds NaN/∞ and `config.nonfinite` is
    /// [`NonFinitePolicy::Skip`]; a skip changes no state (parameter, statistics, grafting and
    /// momentum buffers, [`steps`](Self::steps)) and is counted by [`skipped`](Self::skipped).
    /// Callers that only care about errors can ignore the outcome (`opt.step(..)?;`).
    ///
    /// Errors, with no state changed: ShapeMismatch on a wrong length, InvalidConfig on a
    /// non-finite `lr`, NonFiniteGradient (naming the step it would have been) on NaN/∞ in `grad`
    /// under [`NonFinitePolicy::Error`], and any error of the preconditioner.
    ///
    /// Refused steps (module docs, "Linear-algebra failures", stage 3): LinalgFailure when the
    /// preconditioner refuses the step, when it returns a direction holding NaN or ∞, or when
    /// this step's factorizations failed and that makes
    /// [`OptimizerConfig::max_linalg_failures`] failed steps in a row. The error names step
    /// `steps() + 1` and, in `consecutive`, the run of failed steps this one ends (the
    /// preconditioner's [`LinalgHealth::consecutive`] plus
    /// [`refused_in_row`](Self::refused_in_row), which a refusal the preconditioner did not
    /// count increments). The parameter, grafting and momentum buffers and
    /// [`steps`](Self::steps) are untouched; the preconditioner's state is too when it refused
    /// itself, and has moved on otherwise. [`OptimizerConfig::gives_up`] tells whether the
    /// error reaches the limit. An applied step resets `refused_in_row`.
    pub fn step(&mut self, param: &mut [f32], grad: &[f32], lr: f32) -> Result<StepOutcome> {
        // On one of rayon's workers, the caller asleep, so that the serial parts do not compete
        // with idle workers for the cores (see `SharedBasis::precondition`).
        rayon::scope(|_| self.step_on_worker(param, grad, lr))
    }

    fn step_on_worker(&mut self, param: &mut [f32], grad: &[f32], lr: f32) -> Result<StepOutcome> {
        let n = self.view.numel();
        if param.len() != n || grad.len() != n {
            return Err(PrecondError::ShapeMismatch {
                expected: format!("{n} elements (shape {:?})", self.view.shape()),
                got: format!("param {} / grad {} elements", param.len(), grad.len()),
            });
        }
        if !lr.is_finite() {
            return Err(invalid("lr", lr, "must be finite"));
        }
        let t = self.step + 1;
        if !par_all_finite(grad) {
            return match self.config.nonfinite {
                NonFinitePolicy::Error => Err(PrecondError::NonFiniteGradient {
                    step: t,
                    param: None,
                }),
                NonFinitePolicy::Skip => {
                    self.skipped += 1;
                    Ok(StepOutcome::Skipped { step: t })
                }
            };
        }
        // Workspaces are skipped by serde: reallocate after loading.
        if self.work_a.len() != n {
            self.work_a = vec![0.0; n];
        }
        let Self {
            view,
            path,
            precond,
            graft,
            momentum,
            config,
            work_a,
            work_b,
            refused_in_row,
            ..
        } = self;
        let update: &mut [f32] = match *path {
            ParamPath::Preconditioned => {
                let p = precond.as_mut().ok_or_else(|| {
                    PrecondError::StateMismatch(
                        "preconditioned parameter has no preconditioner".into(),
                    )
                })?;
                if work_b.len() != n {
                    *work_b = vec![0.0; n];
                }
                let (b, m) = (view.rows(), view.blocks());
                view.gather(grad, MatMut::from_column_major_slice_mut(work_a, b, m))?;
                let failures_before = p.linalg_health().failures;
                match p.precondition(
                    MatRef::from_column_major_slice(work_a, b, m),
                    MatMut::from_column_major_slice_mut(work_b, b, m),
                ) {
                    Ok(()) => {}
                    // Refused by the preconditioner, which changed nothing and counted nothing:
                    // this run of refusals counts it.
                    Err(PrecondError::LinalgFailure { kernel, .. }) => {
                        *refused_in_row += 1;
                        return Err(PrecondError::LinalgFailure {
                            kernel,
                            step: t,
                            consecutive: p.linalg_health().consecutive + *refused_in_row,
                        });
                    }
                    Err(e) => return Err(e),
                }
                let health = p.linalg_health();
                let failed_now = health.failures > failures_before;
                let limit = config.max_linalg_failures;
                let run = health.consecutive + *refused_in_row;
                if failed_now && limit > 0 && run >= limit {
                    // Counted by the preconditioner already.
                    return Err(PrecondError::LinalgFailure {
                        kernel: health.last_kernel.unwrap_or("preconditioner"),
                        step: t,
                        consecutive: run,
                    });
                }
                view.scatter(MatRef::from_column_major_slice(work_b, b, m), work_a)?;
                if !par_all_finite(work_a) {
                    // A step whose kernel failed is counted by the preconditioner; any other
                    // refused step by this run.
                    if !failed_now {
                        *refused_in_row += 1;
                    }
                    return Err(PrecondError::LinalgFailure {
                        kernel: "precondition",
                        step: t,
                        consecutive: health.consecutive + *refused_in_row,
                    });
                }
                // r into work_b (its matrix content has been scattered to d = work_a).
                graft.direction(grad, work_b)?;
                if t >= config.start_preconditioning_step && p.is_ready() {
                    graft.rescale(work_a, work_b);
                    work_a
                } else {
                    work_b
                }
            }
            ParamPath::Graft => {
                graft.direction(grad, work_a)?;
                work_a
            }
            ParamPath::SgdMomentum => {
                for (u, &g) in work_a.iter_mut().zip(grad) {
                    *u = -g;
                }
                work_a
            }
        };
        config.weight_decay.apply_coupled(update, param);
        momentum.apply(update)?;
        config.weight_decay.apply_step(param, update, lr);
        self.step = t;
        self.refused_in_row = 0;
        Ok(StepOutcome::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graft::tests::grads;
    use crate::schedule::Schedule;
    use crate::weight_decay::WeightDecayMode;

    /// Test-only preconditioner: per-block (column) Adagrad on the block norm,
    /// d_i = −g_i / (sqrt(Σ_t ‖g_i‖²) + c), plus a fixed per-row weight so that the direction
    /// is not parallel to g and depends on the view's row order. Faults on demand: `poison`
    /// writes NaN directions after committing the step; `refuse` refuses the step with
    /// [`LinalgHealth::refusal`] and changes nothing; `fail_kernel` records a failed kernel in
    /// `health` (the previous state "kept") and still writes the usual direction.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct BlockNorm {
        acc: Vec<f64>,
        c: f64,
        calls: u64,
        poison: bool,
        refuse: bool,
        fail_kernel: bool,
        health: LinalgHealth,
    }

    impl BlockNorm {
        fn new(view: &ParamView) -> Self {
            Self {
                acc: vec![0.0; view.blocks()],
                c: 0.5,
                calls: 0,
                poison: false,
                refuse: false,
                fail_kernel: false,
                health: LinalgHealth::default(),
            }
        }
    }

    fn row_weight(r: usize) -> f64 {
        1.0 + 0.25 * (r % 3) as f64
    }

    impl Preconditioner<f32> for BlockNorm {
        fn precondition(
            &mut self,
            grad: MatRef<'_, f32>,
            mut direction: MatMut<'_, f32>,
        ) -> Result<()> {
            if self.refuse {
                return Err(self.health.refusal("test refusal", self.calls + 1));
            }
            self.health
                .record(self.fail_kernel.then_some("test kernel"));
            for j in 0..grad.ncols() {
                let s: f64 = (0..grad.nrows())
                    .map(|i| (grad[(i, j)] as f64).powi(2))
                    .sum();
                self.acc[j] += s;
                for i in 0..grad.nrows() {
                    let d = -row_weight(i) * grad[(i, j)] as f64 / (self.acc[j].sqrt() + self.c);
                    direction[(i, j)] = if self.poison { f32::NAN } else { d as f32 };
                }
            }
            self.calls += 1;
            Ok(())
        }
        fn state_bytes(&self) -> usize {
            self.acc.len() * 8
        }
        fn steps(&self) -> u64 {
            self.calls
        }
        fn linalg_health(&self) -> LinalgHealth {
            self.health
        }
    }

    fn with_block_norm(
        cfg: &OptimizerConfig,
        shape: &[usize],
        axis: Option<usize>,
    ) -> ParamOptimizer<BlockNorm> {
        ParamOptimizer::with_preconditioner(cfg, shape, axis, false, |v| Ok(BlockNorm::new(v)))
            .unwrap()
    }

    fn init_param(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37).cos()).collect()
    }

    #[test]
    fn never_reached_start_equals_graft_alone() {
        let shape = [6usize, 4];
        let n = 24;
        let cfg = OptimizerConfig {
            start_preconditioning_step: u64::MAX,
            weight_decay: WeightDecayConfig {
                rate: 0.01,
                mode: WeightDecayMode::Coupled,
            },
            ..Default::default()
        };
        let mut opt = with_block_norm(&cfg, &shape, None);
        assert!(opt.is_preconditioned());
        let mut graft_only = ParamOptimizer::new(
            &OptimizerConfig {
                method: Method::GraftOnly,
                ..cfg.clone()
            },
            &shape,
            None,
            false,
        )
        .unwrap();
        assert_eq!(graft_only.path(), ParamPath::Graft);
        // Manual composition: graft state + coupled wd + momentum + step.
        let mut graft = GraftState::new(&cfg.graft, n).unwrap();
        let mut mom = MomentumState::new(&cfg.momentum, n).unwrap();
        let (mut p1, mut p2, mut p3) = (init_param(n), init_param(n), init_param(n));
        let gs = grads(n, 20, 11);
        let sched = Schedule::WarmupLinearDecay {
            warmup_steps: 5,
            total_steps: 30,
        };
        for (t, g) in gs.iter().enumerate() {
            let lr = sched.lr(0.1, t as u64 + 1) as f32;
            opt.step(&mut p1, g, lr).unwrap();
            graft_only.step(&mut p2, g, lr).unwrap();
            let mut u = vec![0.0f32; n];
            graft.direction(g, &mut u).unwrap();
            for (ui, &pi) in u.iter_mut().zip(&p3) {
                *ui -= 0.01 * pi;
            }
            mom.apply(&mut u).unwrap();
            for (pi, ui) in p3.iter_mut().zip(&u) {
                *pi += lr * ui;
            }
            assert_eq!(p1, p3, "step {}", t + 1);
            assert_eq!(p2, p3, "step {}", t + 1);
        }
        // The statistics were updated on every step even though they were never used.
        assert_eq!(opt.preconditioner().unwrap().steps(), 20);
        assert_eq!(opt.steps(), 20);
        assert_ne!(p1, init_param(n));
    }

    /// Independent f64 implementation of NOTES §4 steps 1–5 around the BlockNorm preconditioner,
    /// on a row-major tensor with blocks along `axis`.
    #[allow(clippy::too_many_arguments)]
    fn reference_run(
        shape: &[usize],
        axis: usize,
        gs: &[Vec<f32>],
        p0: &[f32],
        lrs: &[f64],
        start: u64,
        wd: f64,
        beta2: f64,
        eps: f64,
        beta1: f64,
    ) -> Vec<Vec<f64>> {
        let n = p0.len();
        let m = shape[axis];
        // block index and within-block row of each flat element (row-major over other axes)
        let pos: Vec<(usize, usize)> = (0..n)
            .map(|f| {
                let mut rem = f;
                let mut idx = vec![0; shape.len()];
                for a in (0..shape.len()).rev() {
                    idx[a] = rem % shape[a];
                    rem /= shape[a];
                }
                let mut row = 0;
                for a in 0..shape.len() {
                    if a != axis {
                        row = row * shape[a] + idx[a];
                    }
                }
                (idx[axis], row)
            })
            .collect();
        let mut theta: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut v, mut mom, mut acc) = (vec![0.0; n], vec![0.0; n], vec![0.0; m]);
        let mut out = Vec::new();
        for (t, g32) in gs.iter().enumerate() {
            let t1 = t as u64 + 1;
            let g: Vec<f64> = g32.iter().map(|&x| x as f64).collect();
            // preconditioner (every step)
            let mut blk = vec![0.0; m];
            for f in 0..n {
                blk[pos[f].0] += g[f] * g[f];
            }
            for j in 0..m {
                acc[j] += blk[j];
            }
            let d: Vec<f64> = (0..n)
                .map(|f| -row_weight(pos[f].1) * g[f] / (acc[pos[f].0].sqrt() + 0.5))
                .collect();
            // step 1
            let gn = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            let mut r = vec![0.0; n];
            for f in 0..n {
                let s = g[f] / gn;
                v[f] = beta2 * v[f] + (1.0 - beta2) * s * s;
                r[f] = -s / (v[f].sqrt() + eps);
            }
            // step 2 / 5's start rule
            let mut u = if t1 >= start {
                let rn = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                let dn = d.iter().map(|x| x * x).sum::<f64>().sqrt();
                d.iter().map(|x| x * rn / (dn + 1e-16)).collect::<Vec<_>>()
            } else {
                r
            };
            // step 3
            for f in 0..n {
                u[f] -= wd * theta[f];
            }
            // step 4 (Nesterov)
            for f in 0..n {
                mom[f] = beta1 * mom[f] + u[f];
                u[f] += beta1 * mom[f];
            }
            // step 5
            for f in 0..n {
                theta[f] += lrs[t] * u[f];
            }
            out.push(theta.clone());
        }
        out
    }

    #[test]
    fn rmsprop_normalized_grafting_matches_f64_reference() {
        for (shape, axis) in [
            (vec![6usize, 4], None),
            (vec![3, 4, 5], Some(1)),
            (vec![3, 4, 5], Some(0)),
        ] {
            let n: usize = shape.iter().product();
            let ax = axis.unwrap_or(shape.len() - 1);
            let cfg = OptimizerConfig {
                start_preconditioning_step: 4,
                weight_decay: WeightDecayConfig {
                    rate: 0.003,
                    mode: WeightDecayMode::Coupled,
                },
                graft: GraftConfig {
                    beta2: 0.99,
                    eps: 1e-8,
                    ..Default::default()
                },
                momentum: MomentumConfig {
                    beta1: 0.8,
                    nesterov: true,
                },
                ..Default::default()
            };
            let mut opt = with_block_norm(&cfg, &shape, axis);
            let gs = grads(n, 24, 5 + n as u64);
            let sched = Schedule::WarmupRsqrt { warmup_steps: 6 };
            let lrs: Vec<f64> = (1..=24).map(|t| sched.lr(0.05, t)).collect();
            let p0 = init_param(n);
            let want = reference_run(&shape, ax, &gs, &p0, &lrs, 4, 0.003, 0.99, 1e-8, 0.8);
            let mut p = p0.clone();
            for (t, g) in gs.iter().enumerate() {
                opt.step(&mut p, g, lrs[t] as f32).unwrap();
                // Error relative to the size of this step's change (sharp) and to θ (the usual rel err).
                let prev: Vec<f64> = if t == 0 {
                    p0.iter().map(|&x| x as f64).collect()
                } else {
                    want[t - 1].clone()
                };
                let scale = want[t]
                    .iter()
                    .zip(&prev)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                let err = p
                    .iter()
                    .zip(&want[t])
                    .map(|(&a, b)| (a as f64 - b).abs())
                    .fold(0.0, f64::max);
                // f32 rounding accumulates in θ; any formula error would be of the step's size.
                assert!(
                    err <= 5e-5 * scale,
                    "{shape:?} axis {ax} step {}: err {err} step size {scale}",
                    t + 1
                );
                let size = want[t].iter().fold(0.0f64, |a, b| a.max(b.abs()));
                let rel = err / size;
                assert!(rel <= 1e-5, "{shape:?} axis {ax} step {}: rel {rel}", t + 1);
            }
        }
    }

    #[test]
    fn preconditioned_direction_is_used_from_start_step_and_differs_from_graft() {
        // A test that fails if the start rule or the view were ignored: with start = 1 the
        // result must differ from the graft-only run.
        let cfg = OptimizerConfig::default();
        let shape = [5usize, 3];
        let mut a = with_block_norm(&cfg, &shape, None);
        let mut b = ParamOptimizer::new(
            &OptimizerConfig {
                method: Method::GraftOnly,
                ..cfg.clone()
            },
            &shape,
            None,
            false,
        )
        .unwrap();
        let g = grads(15, 1, 2).remove(0);
        let (mut pa, mut pb) = (init_param(15), init_param(15));
        a.step(&mut pa, &g, 0.1).unwrap();
        b.step(&mut pb, &g, 0.1).unwrap();
        let diff = pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff > 1e-4, "preconditioned step equals graft step");
        // Grafting: the first update's norm equals the graft direction's norm times 1.9 (Nesterov).
        let step_norm = pa
            .iter()
            .zip(init_param(15))
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let mut gr = GraftState::new(&cfg.graft, 15).unwrap();
        let mut r = vec![0.0f32; 15];
        gr.direction(&g, &mut r).unwrap();
        let want = 0.1 * 1.9 * crate::graft::norm(&r);
        assert!(
            (step_norm - want).abs() <= 1e-5 * want,
            "{step_norm} vs {want}"
        );
    }

    #[test]
    fn fallbacks_for_vector_excluded_and_large() {
        let sgd = OptimizerConfig {
            fallback: Fallback::SgdMomentum,
            max_block_size: 8,
            ..Default::default()
        };
        let vec_opt = ParamOptimizer::new(&sgd, &[7], None, false).unwrap();
        assert_eq!(vec_opt.path(), ParamPath::SgdMomentum);
        assert_eq!(vec_opt.state_bytes(), 7 * 4);
        let excl = ParamOptimizer::new(&sgd, &[3, 4], None, true).unwrap();
        assert_eq!(excl.path(), ParamPath::SgdMomentum);
        let large = ParamOptimizer::new(&sgd, &[9, 2], None, false).unwrap();
        assert_eq!(large.path(), ParamPath::SgdMomentum);
        let ok = ParamOptimizer::new(&sgd, &[8, 2], None, false).unwrap();
        assert_eq!(ok.path(), ParamPath::Preconditioned);
        // b counts the folded axes: [3, 3, 2] with block axis 2 has b = 9 > 8.
        assert_eq!(
            ParamOptimizer::new(&sgd, &[3, 3, 2], None, false)
                .unwrap()
                .path(),
            ParamPath::SgdMomentum
        );
        let graft = OptimizerConfig {
            max_block_size: 8,
            ..Default::default()
        };
        assert_eq!(
            ParamOptimizer::new(&graft, &[7], None, false)
                .unwrap()
                .path(),
            ParamPath::Graft
        );
        assert_eq!(
            ParamOptimizer::new(&graft, &[9, 2], None, false)
                .unwrap()
                .path(),
            ParamPath::Graft
        );

        // SGD + Nesterov momentum numbers against f64.
        let mut o = ParamOptimizer::new(&sgd, &[7], None, false).unwrap();
        let mut p = init_param(7);
        let mut th: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let mut m = [0.0f64; 7];
        for g in grads(7, 20, 9) {
            o.step(&mut p, &g, 0.05).unwrap();
            for i in 0..7 {
                let u = -(g[i] as f64);
                m[i] = 0.9 * m[i] + u;
                th[i] += 0.05 * (u + 0.9 * m[i]);
                assert!((p[i] as f64 - th[i]).abs() <= 1e-5 * th[i].abs().max(1.0));
            }
        }
    }

    #[test]
    fn decoupled_weight_decay_step() {
        let cfg = OptimizerConfig {
            method: Method::GraftOnly,
            graft: GraftConfig {
                kind: GraftKind::Sgd,
                ..Default::default()
            },
            momentum: MomentumConfig {
                beta1: 0.0,
                nesterov: false,
            },
            weight_decay: WeightDecayConfig {
                rate: 0.5,
                mode: WeightDecayMode::Decoupled,
            },
            ..Default::default()
        };
        let mut o = ParamOptimizer::new(&cfg, &[2, 2], None, false).unwrap();
        let mut p = vec![1.0f32, 2.0, -4.0, 8.0];
        o.step(&mut p, &[1.0, 1.0, 0.0, -2.0], 0.5).unwrap();
        // θ(1 − 0.25) − 0.5 g
        assert_eq!(p, vec![0.25, 1.0, -3.0, 7.0]);
        // Coupled with momentum: decay enters the buffer.
        let cfg2 = OptimizerConfig {
            momentum: MomentumConfig {
                beta1: 0.5,
                nesterov: false,
            },
            weight_decay: WeightDecayConfig {
                rate: 0.5,
                mode: WeightDecayMode::Coupled,
            },
            ..cfg
        };
        let mut o = ParamOptimizer::new(&cfg2, &[1], None, false).unwrap();
        let mut p = vec![2.0f32];
        o.step(&mut p, &[0.0], 1.0).unwrap(); // u = −1, m = −1, θ = 1
        assert_eq!(p, vec![1.0]);
        o.step(&mut p, &[0.0], 1.0).unwrap(); // u = −0.5, m = −1, θ = 0
        assert_eq!(p, vec![0.0]);
    }

    #[test]
    fn refused_steps_change_nothing() {
        let cfg = OptimizerConfig::default();
        let mut o = with_block_norm(&cfg, &[4, 3], None);
        let gs = grads(12, 3, 4);
        let mut p = init_param(12);
        o.step(&mut p, &gs[0], 0.1).unwrap();
        let twin = o.clone();
        let p_before = p.clone();
        assert!(matches!(
            o.step(&mut p, &gs[1][..11], 0.1),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            o.step(&mut p[..11], &gs[1][..11], 0.1),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        let mut bad = gs[1].clone();
        bad[5] = f32::NAN;
        assert_eq!(
            o.step(&mut p, &bad, 0.1),
            Err(PrecondError::NonFiniteGradient {
                step: 2,
                param: None
            })
        );
        bad[5] = f32::INFINITY;
        assert!(o.step(&mut p, &bad, 0.1).is_err());
        assert!(matches!(
            o.step(&mut p, &gs[1], f32::NAN),
            Err(PrecondError::InvalidConfig { .. })
        ));
        assert_eq!(p, p_before);
        assert_eq!(o.steps(), 1);
        assert_eq!(o.preconditioner().unwrap().calls, 1);
        // Continuing gives exactly what the untouched twin gives.
        let mut twin = twin;
        let mut q = p.clone();
        o.step(&mut p, &gs[1], 0.1).unwrap();
        twin.step(&mut q, &gs[1], 0.1).unwrap();
        assert_eq!(p, q);

        // A non-finite preconditioned direction is refused; the parameter is untouched.
        let mut o = with_block_norm(&cfg, &[4, 3], None);
        o.precond.as_mut().unwrap().poison = true;
        let mut p = init_param(12);
        assert!(matches!(
            o.step(&mut p, &gs[0], 0.1),
            Err(PrecondError::LinalgFailure { .. })
        ));
        assert_eq!(p, init_param(12));
        assert_eq!(o.steps(), 0);
    }

    /// The grafting and momentum buffers as JSON (serde_json writes every f32 exactly).
    fn buffers<P>(o: &ParamOptimizer<P>) -> (String, String) {
        (
            serde_json::to_string(&o.graft).unwrap(),
            serde_json::to_string(&o.momentum).unwrap(),
        )
    }

    fn linalg_failure(kernel: &'static str, step: u64, consecutive: u64) -> PrecondError {
        PrecondError::LinalgFailure {
            kernel,
            step,
            consecutive,
        }
    }

    /// Fault injection (issue 21): a preconditioner whose direction comes out NaN at four steps
    /// in a row. Each refused step leaves the parameter and the grafting and momentum buffers
    /// bitwise as they were and `steps()` at 2; the errors name step 3 with runs 1, 2, 3, 4, and
    /// under the default limit 3 `gives_up` is false for the first two and true from the third.
    /// A clean step then applies (step 3) and resets the run; the next NaN direction starts a
    /// new run at 1.
    #[test]
    fn non_finite_directions_escalate_and_an_applied_step_resets() {
        let cfg = OptimizerConfig::default();
        assert_eq!(cfg.max_linalg_failures, 3);
        let mut o = with_block_norm(&cfg, &[4, 3], None);
        let gs = grads(12, 8, 41);
        let mut p = init_param(12);
        for g in &gs[..2] {
            assert_eq!(o.step(&mut p, g, 0.1), Ok(StepOutcome::Applied));
        }
        let (p_before, bufs_before) = (bits(&p), buffers(&o));
        o.precond.as_mut().unwrap().poison = true;
        for (i, g) in gs[2..6].iter().enumerate() {
            let run = i as u64 + 1;
            let e = o.step(&mut p, g, 0.1).unwrap_err();
            assert_eq!(e, linalg_failure("precondition", 3, run));
            assert_eq!(cfg.gives_up(&e), run >= 3, "run {run}");
            assert_eq!(bits(&p), p_before, "run {run}: the parameter moved");
            assert_eq!(
                buffers(&o),
                bufs_before,
                "run {run}: grafting or momentum moved"
            );
            assert_eq!(o.steps(), 2);
            assert_eq!(o.refused_in_row(), run);
            // BlockNorm commits before its direction is checked: its own counter moves on.
            assert_eq!(o.preconditioner().unwrap().calls, 2 + run);
        }
        assert!(!cfg.gives_up(&linalg_failure("precondition", 3, 2)));
        o.precond.as_mut().unwrap().poison = false;
        assert_eq!(o.step(&mut p, &gs[6], 0.1), Ok(StepOutcome::Applied));
        assert_ne!(bits(&p), p_before);
        assert!(p.iter().all(|v| v.is_finite()));
        assert_eq!((o.steps(), o.refused_in_row()), (3, 0));
        assert_ne!(buffers(&o), bufs_before);
        o.precond.as_mut().unwrap().poison = true;
        let e = o.step(&mut p, &gs[7], 0.1).unwrap_err();
        assert_eq!(e, linalg_failure("precondition", 4, 1));
        assert!(!cfg.gives_up(&e));
    }

    /// With `max_linalg_failures` 0 no run gives up (the errors still count up), and
    /// `gives_up` is false for every error that is not a LinalgFailure.
    #[test]
    fn without_a_limit_nothing_gives_up() {
        let unlimited = OptimizerConfig {
            max_linalg_failures: 0,
            ..Default::default()
        };
        let mut o = with_block_norm(&unlimited, &[4, 3], None);
        o.precond.as_mut().unwrap().poison = true;
        let gs = grads(12, 6, 42);
        let mut p = init_param(12);
        for (i, g) in gs.iter().enumerate() {
            let e = o.step(&mut p, g, 0.1).unwrap_err();
            assert_eq!(e, linalg_failure("precondition", 1, i as u64 + 1));
            assert!(!unlimited.gives_up(&e), "run {}", i + 1);
            // The same error under the default limit would.
            assert_eq!(OptimizerConfig::default().gives_up(&e), i + 1 >= 3);
        }
        assert_eq!((o.steps(), o.refused_in_row()), (0, 6));
        assert_eq!(p, init_param(12));
        let limited = OptimizerConfig::default();
        assert!(limited.gives_up(&linalg_failure("x", 9, 3)));
        assert!(limited.gives_up(&linalg_failure("x", 9, 100)));
        assert!(!limited.gives_up(&linalg_failure("x", 9, 2)));
        for other in [
            PrecondError::NonFiniteGradient {
                step: 5,
                param: None,
            },
            PrecondError::StateMismatch("x".into()),
            PrecondError::ShapeMismatch {
                expected: "a".into(),
                got: "b".into(),
            },
            invalid("lr", f32::NAN, "must be finite"),
        ] {
            assert!(!limited.gives_up(&other), "{other:?}");
        }
    }

    /// A preconditioner that refuses (returns LinalgFailure, changing nothing) at every step
    /// from step 3: the errors name step 3 with runs 1, 2, 3, 4 (the preconditioner's own
    /// error says 1 each time), giving up from the third; nothing moves, not even the
    /// preconditioner, and the next clean step is bitwise the one of a twin that never saw the
    /// refusals. A run the preconditioner already started (its `consecutive` 1) continues: 2,
    /// 3. A failed kernel is counted once: refusal (run 1), failed kernel applied (run 2, which
    /// resets the refusals), refusal (run 2), failed kernel at run 3 = the limit: refused; a
    /// failed kernel with a NaN direction counts once (runs 1, 2, then 3 = the limit).
    /// Non-refusal errors (a non-finite gradient) count nothing.
    #[test]
    fn repeated_refusals_escalate_and_change_nothing() {
        let cfg = OptimizerConfig::default();
        let mut o = with_block_norm(&cfg, &[4, 3], None);
        let gs = grads(12, 6, 43);
        let mut p = init_param(12);
        for g in &gs[..2] {
            o.step(&mut p, g, 0.1).unwrap();
        }
        let mut twin = o.clone();
        let (p_before, bufs_before) = (bits(&p), buffers(&o));
        o.precond.as_mut().unwrap().refuse = true;
        for (i, g) in gs[2..].iter().enumerate() {
            let run = i as u64 + 1;
            let e = o.step(&mut p, g, 0.1).unwrap_err();
            assert_eq!(e, linalg_failure("test refusal", 3, run));
            assert_eq!(cfg.gives_up(&e), run >= 3, "run {run}");
            assert_eq!(bits(&p), p_before);
            assert_eq!(buffers(&o), bufs_before);
            assert_eq!((o.steps(), o.refused_in_row()), (2, run));
            assert_eq!(o.preconditioner().unwrap().calls, 2);
            // Not a refusal: counts nothing.
            let mut bad = g.clone();
            bad[0] = f32::NAN;
            assert!(matches!(
                o.step(&mut p, &bad, 0.1),
                Err(PrecondError::NonFiniteGradient { step: 3, .. })
            ));
            assert_eq!(o.refused_in_row(), run);
        }
        o.precond.as_mut().unwrap().refuse = false;
        let mut q = p.clone();
        assert_eq!(o.step(&mut p, &gs[2], 0.1), Ok(StepOutcome::Applied));
        twin.step(&mut q, &gs[2], 0.1).unwrap();
        assert_eq!(bits(&p), bits(&q));
        assert_eq!(buffers(&o), buffers(&twin));
        assert_eq!((o.steps(), o.refused_in_row()), (3, 0));

        // The preconditioner's own run adds in.
        o.precond.as_mut().unwrap().health.consecutive = 1;
        o.precond.as_mut().unwrap().refuse = true;
        let e = o.step(&mut p, &gs[3], 0.1).unwrap_err();
        assert_eq!(e, linalg_failure("test refusal", 4, 2));
        assert!(!cfg.gives_up(&e));
        let e = o.step(&mut p, &gs[3], 0.1).unwrap_err();
        assert_eq!(e, linalg_failure("test refusal", 4, 3));
        assert!(cfg.gives_up(&e));

        // Refusals and failed kernels in one run.
        let mut o = with_block_norm(&cfg, &[4, 3], None);
        let mut p = init_param(12);
        o.step(&mut p, &gs[0], 0.1).unwrap();
        let pre = |o: &mut ParamOptimizer<BlockNorm>, refuse: bool, fail: bool| {
            let b = o.precond.as_mut().unwrap();
            (b.refuse, b.fail_kernel) = (refuse, fail);
        };
        pre(&mut o, true, false);
        assert_eq!(
            o.step(&mut p, &gs[1], 0.1),
            Err(linalg_failure("test refusal", 2, 1))
        );
        pre(&mut o, false, true);
        assert_eq!(o.step(&mut p, &gs[1], 0.1), Ok(StepOutcome::Applied));
        assert_eq!(
            (o.consecutive_linalg_failures(), o.refused_in_row()),
            (1, 0)
        );
        pre(&mut o, true, false);
        assert_eq!(
            o.step(&mut p, &gs[2], 0.1),
            Err(linalg_failure("test refusal", 3, 2))
        );
        pre(&mut o, false, true);
        let before = bits(&p);
        let e = o.step(&mut p, &gs[2], 0.1).unwrap_err();
        assert_eq!(e, linalg_failure("test kernel", 3, 3));
        assert!(cfg.gives_up(&e));
        assert_eq!(bits(&p), before);
        // Counted by the preconditioner (2 in a row), not as a refusal.
        assert_eq!(
            (o.consecutive_linalg_failures(), o.refused_in_row()),
            (2, 1)
        );
        // A failed kernel whose direction is NaN too is counted once, by the preconditioner:
        // runs 1 and 2 are refused for the direction, run 3 for the limit.
        let mut o = with_block_norm(&cfg, &[4, 3], None);
        let mut p = init_param(12);
        let b = o.precond.as_mut().unwrap();
        (b.poison, b.fail_kernel) = (true, true);
        for run in 1..=2 {
            let e = o.step(&mut p, &gs[run as usize], 0.1).unwrap_err();
            assert_eq!(e, linalg_failure("precondition", 1, run));
            assert_eq!(
                (o.consecutive_linalg_failures(), o.refused_in_row()),
                (run, 0)
            );
        }
        let e = o.step(&mut p, &gs[3], 0.1).unwrap_err();
        assert_eq!(e, linalg_failure("test kernel", 1, 3));
        assert!(cfg.gives_up(&e));
        assert_eq!(p, init_param(12));
    }

    /// A real refusal: Block Adam refuses a step whose second moment overflows f32 (an entry
    /// of 1e20, finite itself) and changes nothing. Repeated at steps 3, 4, 5 it reports runs
    /// 1, 2, 3 for step 3 and gives up at the third; the preconditioner's counter stays at 2
    /// with `steps()`, and a clean step continues exactly as a twin that never saw them.
    #[test]
    fn block_adam_overflow_refusals_escalate() {
        use crate::block_diag::BlockAdamConfig;
        let cfg = OptimizerConfig {
            method: Method::BlockAdam(BlockAdamConfig {
                block_size: 4,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut o = ParamOptimizer::new(&cfg, &[6, 5], None, false).unwrap();
        let gs = grads(30, 4, 44);
        let mut p = init_param(30);
        for g in &gs[..2] {
            o.step(&mut p, g, 0.05).unwrap();
        }
        let mut twin = o.clone();
        let p_before = bits(&p);
        let mut huge = gs[2].clone();
        huge[7] = 1e20;
        for run in 1..=3u64 {
            let e = o.step(&mut p, &huge, 0.05).unwrap_err();
            let PrecondError::LinalgFailure {
                step, consecutive, ..
            } = e
            else {
                panic!("run {run}: {e:?}")
            };
            assert_eq!((step, consecutive), (3, run));
            assert_eq!(cfg.gives_up(&e), run == 3);
            assert_eq!(bits(&p), p_before);
            assert_eq!(o.steps(), 2);
            assert_eq!(Preconditioner::steps(o.preconditioner().unwrap()), 2);
            assert_eq!(o.refused_in_row(), run);
        }
        let mut q = p.clone();
        o.step(&mut p, &gs[3], 0.05).unwrap();
        twin.step(&mut q, &gs[3], 0.05).unwrap();
        assert_eq!(bits(&p), bits(&q));
        assert_eq!(
            serde_json::to_value(&o).unwrap(),
            serde_json::to_value(&twin).unwrap()
        );
    }

    /// The run of refusals is part of the serialized state: after two refused steps a JSON
    /// copy holds `refused_in_row` 2, and its next refusal reports run 3 and gives up, as the
    /// original's does. A state saved before the field existed loads with 0.
    #[test]
    fn refused_in_row_survives_serde() {
        let cfg = OptimizerConfig::default();
        let mut o = with_block_norm(&cfg, &[4, 3], None);
        let gs = grads(12, 3, 45);
        let mut p = init_param(12);
        o.step(&mut p, &gs[0], 0.1).unwrap();
        o.precond.as_mut().unwrap().refuse = true;
        for _ in 0..2 {
            assert!(o.step(&mut p, &gs[1], 0.1).is_err());
        }
        let value = serde_json::to_value(&o).unwrap();
        assert_eq!(value["refused_in_row"], 2);
        let mut back: ParamOptimizer<BlockNorm> = serde_json::from_value(value.clone()).unwrap();
        assert_eq!((back.steps(), back.refused_in_row()), (1, 2));
        let mut q = p.clone();
        for opt in [&mut o, &mut back] {
            let e = opt.step(&mut q, &gs[1], 0.1).unwrap_err();
            assert_eq!(e, linalg_failure("test refusal", 2, 3));
            assert!(cfg.gives_up(&e));
        }
        let mut old = value;
        assert!(old
            .as_object_mut()
            .unwrap()
            .remove("refused_in_row")
            .is_some());
        let old: ParamOptimizer<BlockNorm> = serde_json::from_value(old).unwrap();
        assert_eq!(old.refused_in_row(), 0);
    }

    /// One configuration per method (small shapes, settings under which a wrongly advanced step
    /// counter would show: Adam's bias correction, Shampoo's root schedule, the start step).
    fn nonfinite_cases() -> Vec<(&'static str, OptimizerConfig, Vec<usize>)> {
        use crate::block_diag::BlockAdamConfig;
        use crate::diagonal::DiagonalConfig;
        use crate::full_matrix::FullMatrixConfig;
        use crate::shampoo::ShampooConfig;
        use crate::sketchy::SketchyConfig;
        let base = OptimizerConfig {
            weight_decay: WeightDecayConfig {
                rate: 0.01,
                mode: WeightDecayMode::Coupled,
            },
            ..Default::default()
        };
        // The diagonal and block methods as themselves: no grafting, no extra momentum.
        let bare = OptimizerConfig {
            graft: GraftConfig {
                kind: GraftKind::None,
                ..Default::default()
            },
            momentum: MomentumConfig {
                beta1: 0.0,
                nesterov: false,
            },
            ..base.clone()
        };
        vec![
            (
                "shared-basis",
                OptimizerConfig {
                    method: Method::SharedBasis(SharedBasisConfig {
                        rank: 3,
                        ..Default::default()
                    }),
                    ..base.clone()
                },
                vec![6, 4],
            ),
            (
                "shampoo",
                OptimizerConfig {
                    method: Method::Shampoo(ShampooConfig {
                        block_size: 4,
                        start_step: 2,
                        precondition_every: 2,
                        ..Default::default()
                    }),
                    start_preconditioning_step: 2,
                    ..base.clone()
                },
                vec![6, 4],
            ),
            (
                "diagonal-adam",
                OptimizerConfig {
                    method: Method::Diagonal(DiagonalConfig::default()),
                    ..bare.clone()
                },
                vec![6, 4],
            ),
            (
                "sketchy",
                OptimizerConfig {
                    method: Method::Sketchy(SketchyConfig {
                        rank: 2,
                        block_size: 4,
                        precondition_every: 2,
                        ..Default::default()
                    }),
                    ..base.clone()
                },
                vec![6, 4],
            ),
            (
                "block-adam",
                OptimizerConfig {
                    method: Method::BlockAdam(BlockAdamConfig {
                        block_size: 4,
                        ..Default::default()
                    }),
                    ..bare
                },
                vec![6, 4],
            ),
            (
                "full-matrix",
                OptimizerConfig {
                    method: Method::FullMatrix(FullMatrixConfig::default()),
                    ..base.clone()
                },
                vec![3, 4],
            ),
            (
                "graft-only-adam",
                OptimizerConfig {
                    method: Method::GraftOnly,
                    graft: GraftConfig {
                        kind: GraftKind::Adam,
                        ..Default::default()
                    },
                    ..base.clone()
                },
                vec![6, 4],
            ),
            (
                "sgd-momentum-vector",
                OptimizerConfig {
                    fallback: Fallback::SgdMomentum,
                    ..base
                },
                vec![7],
            ),
        ]
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A NaN (or ∞) gradient at step 3: under Skip it is skipped and under Error (the default)
    /// refused with NonFiniteGradient naming step 3; either way param, steps(), state_bytes()
    /// and the serialized state are bitwise unchanged, and the following steps equal those of
    /// an optimizer that never saw that gradient.
    #[test]
    fn nonfinite_gradient_under_skip_and_error_changes_nothing() {
        let lr = 0.05f32;
        for (i, (name, cfg, shape)) in nonfinite_cases().into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let gs = grads(n, 8, 40 + i as u64);
            for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Error] {
                let cfg = OptimizerConfig {
                    nonfinite: policy,
                    ..cfg.clone()
                };
                let mut bad = gs[2].clone();
                bad[n / 2] = if i % 2 == 0 {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                };
                let mut o = ParamOptimizer::new(&cfg, &shape, None, false).unwrap();
                let mut p = init_param(n);
                for g in &gs[..2] {
                    assert_eq!(o.step(&mut p, g, lr).unwrap(), StepOutcome::Applied);
                }
                let p_before = bits(&p);
                let json_before = serde_json::to_string(&o).unwrap();
                let bytes_before = o.state_bytes();
                let got = o.step(&mut p, &bad, lr);
                match policy {
                    NonFinitePolicy::Skip => {
                        assert_eq!(got, Ok(StepOutcome::Skipped { step: 3 }), "{name}");
                        assert_eq!(o.skipped(), 1, "{name}");
                    }
                    NonFinitePolicy::Error => {
                        assert_eq!(
                            got,
                            Err(PrecondError::NonFiniteGradient {
                                step: 3,
                                param: None
                            }),
                            "{name}"
                        );
                        assert_eq!(o.skipped(), 0, "{name}");
                    }
                }
                assert_eq!(bits(&p), p_before, "{name} {policy:?}: param changed");
                assert_eq!(o.steps(), 2, "{name} {policy:?}");
                assert_eq!(o.state_bytes(), bytes_before, "{name} {policy:?}");
                assert_eq!(
                    serde_json::to_string(&o).unwrap(),
                    json_before,
                    "{name} {policy:?}: serialized state changed"
                );

                // The twin never sees gs[2]; the skipping one continues with gs[3..].
                let mut twin = ParamOptimizer::new(&cfg, &shape, None, false).unwrap();
                let mut q = init_param(n);
                for g in &gs[..2] {
                    twin.step(&mut q, g, lr).unwrap();
                }
                for (k, g) in gs[3..].iter().enumerate() {
                    let before = bits(&p);
                    assert_eq!(o.step(&mut p, g, lr).unwrap(), StepOutcome::Applied);
                    twin.step(&mut q, g, lr).unwrap();
                    assert_ne!(bits(&p), before, "{name}: step {} moved nothing", k + 3);
                    assert_eq!(bits(&p), bits(&q), "{name} {policy:?}: step {}", k + 3);
                }
                assert_eq!(o.steps(), 7);
                assert_eq!(
                    serde_json::to_string(&o).unwrap(),
                    serde_json::to_string(&twin).unwrap(),
                    "{name} {policy:?}"
                );
                // Not vacuous: an optimizer that used a finite gradient at step 3 ends elsewhere.
                let mut other = ParamOptimizer::new(&cfg, &shape, None, false).unwrap();
                let mut r = init_param(n);
                for g in &gs[..7] {
                    other.step(&mut r, g, lr).unwrap();
                }
                assert_ne!(bits(&r), bits(&p), "{name}");
            }
        }
    }

    /// The four methods with factorizations, on a [6, 5] parameter (several Shampoo, Sketchy
    /// and Block Adam blocks; roots and frozen copies refreshed every step).
    fn linalg_cases() -> Vec<(&'static str, OptimizerConfig)> {
        use crate::block_diag::BlockAdamConfig;
        use crate::shampoo::ShampooConfig;
        use crate::sketchy::SketchyConfig;
        let with = |method| OptimizerConfig {
            method,
            ..Default::default()
        };
        vec![
            (
                "shared-basis",
                with(Method::SharedBasis(SharedBasisConfig {
                    rank: 3,
                    ..Default::default()
                })),
            ),
            (
                "shampoo",
                with(Method::Shampoo(ShampooConfig {
                    block_size: 4,
                    ..Default::default()
                })),
            ),
            (
                "sketchy",
                with(Method::Sketchy(SketchyConfig {
                    rank: 2,
                    block_size: 4,
                    ..Default::default()
                })),
            ),
            (
                // faer's per-chunk path: the batched one recovers a failed lane with faer
                // (block_diag's `batched_lane_failure_falls_back_to_faer`).
                "block-adam",
                with(Method::BlockAdam(BlockAdamConfig {
                    block_size: 4,
                    eigensolver: crate::BlockEigensolver::Faer,
                    ..Default::default()
                })),
            ),
        ]
    }

    /// Steps 3, 4 and 5 of every method have their first factorization fail in both
    /// precisions (injected). Under the default limit of 3: steps 3 and 4 keep the previous
    /// state, are counted and still move the parameter (finite); step 5 makes 3 failed steps in
    /// a row and returns LinalgFailure naming step 5 and the run, with the parameter and
    /// `steps()` untouched; the good step 6 applies and resets the run (the total stays 3).
    /// The counts survive a JSON round trip (which then continues bitwise), a state saved
    /// before they existed loads with zeros and the default limit, and with
    /// `max_linalg_failures` 0 no step errors.
    #[test]
    fn repeated_linalg_failures_error_at_the_limit_and_reset() {
        use crate::linalg::{inject_failures, injected_remaining, FaultKind};
        crate::testing::on_one_thread(|| {
            let shape = [6usize, 5];
            let gs = grads(30, 7, 77);
            let lr = 0.05f32;
            // Runs step t (1-based) of `o`, its first factorization failing when `fail`.
            let step = |o: &mut ParamOptimizer, p: &mut Vec<f32>, t: usize, fail: bool| {
                inject_failures(FaultKind::Both, usize::from(fail));
                let r = o.step(p, &gs[t - 1], lr);
                assert_eq!(injected_remaining(), 0);
                r
            };
            for (name, cfg) in linalg_cases() {
                assert_eq!(cfg.max_linalg_failures, 3);
                let mut o = ParamOptimizer::new(&cfg, &shape, None, false).unwrap();
                assert!(o.is_preconditioned(), "{name}");
                let mut p = init_param(30);
                let mut saved = None;
                for t in 1..=6 {
                    let before = p.clone();
                    let r = step(&mut o, &mut p, t, (3..=5).contains(&t));
                    if t == 5 {
                        match r {
                            Err(PrecondError::LinalgFailure {
                                step: 5,
                                consecutive: 3,
                                ..
                            }) => {}
                            other => panic!("{name}: step 5 gave {other:?}"),
                        }
                        assert_eq!(p, before, "{name}: refused step moved the parameter");
                        assert_eq!(o.steps(), 4, "{name}");
                    } else {
                        assert_eq!(r, Ok(StepOutcome::Applied), "{name} step {t}");
                        assert_ne!(p, before, "{name} step {t}: parameter did not move");
                        assert!(p.iter().all(|v| v.is_finite()), "{name} step {t}");
                        assert_eq!(o.steps(), t as u64 - u64::from(t > 5), "{name}");
                    }
                    let want = match t {
                        1 | 2 => (0, 0),
                        3 => (1, 1),
                        4 => (2, 2),
                        5 => (3, 3),
                        _ => (3, 0),
                    };
                    assert_eq!(
                        (o.linalg_failures(), o.consecutive_linalg_failures()),
                        want,
                        "{name} step {t}"
                    );
                    if t == 4 {
                        saved = Some((serde_json::to_value(&o).unwrap(), p.clone()));
                    }
                }

                // Serde: the counts survive, and the copy continues bitwise.
                let (value, p4) = saved.unwrap();
                let mut back: ParamOptimizer = serde_json::from_value(value.clone()).unwrap();
                assert_eq!(
                    (back.linalg_failures(), back.consecutive_linalg_failures()),
                    (2, 2),
                    "{name}"
                );
                let mut q = p4.clone();
                assert!(step(&mut back, &mut q, 5, true).is_err());
                assert_eq!(step(&mut back, &mut q, 6, false), Ok(StepOutcome::Applied));
                assert_eq!(q, p, "{name}: the reloaded state diverged");
                assert_eq!(back.linalg_failures(), 3);
                // A state saved before the counts (and the limit) existed.
                let mut old = value;
                assert!(old["config"]
                    .as_object_mut()
                    .unwrap()
                    .remove("max_linalg_failures")
                    .is_some());
                let method = old["precond"].as_object_mut().unwrap();
                let (_, state) = method.iter_mut().next().unwrap();
                assert!(state.as_object_mut().unwrap().remove("linalg").is_some());
                let old: ParamOptimizer = serde_json::from_value(old).unwrap();
                assert_eq!(old.config().max_linalg_failures, 3);
                assert_eq!(old.linalg_health(), LinalgHealth::default(), "{name}");

                // No limit: five failed steps in a row all apply.
                let unlimited = OptimizerConfig {
                    max_linalg_failures: 0,
                    ..cfg.clone()
                };
                let mut o = ParamOptimizer::new(&unlimited, &shape, None, false).unwrap();
                let mut p = init_param(30);
                for t in 1..=7 {
                    let r = step(&mut o, &mut p, t, t >= 2);
                    assert_eq!(r, Ok(StepOutcome::Applied), "{name} step {t}");
                }
                assert_eq!(o.consecutive_linalg_failures(), 6, "{name}");
                assert!(p.iter().all(|v| v.is_finite()));
            }
        });
    }

    #[test]
    fn workspaces_are_rebuilt_after_loading() {
        let cfg = OptimizerConfig::default();
        let mut a = with_block_norm(&cfg, &[4, 3], None);
        let mut b = a.clone();
        // What serde's skip leaves after deserialization.
        b.work_a = Vec::new();
        b.work_b = Vec::new();
        let (mut pa, mut pb) = (init_param(12), init_param(12));
        for g in grads(12, 3, 8) {
            a.step(&mut pa, &g, 0.1).unwrap();
            b.step(&mut pb, &g, 0.1).unwrap();
        }
        assert_eq!(pa, pb);
    }

    #[test]
    fn state_bytes_sum_components() {
        let cfg = OptimizerConfig::default();
        let o = ParamOptimizer::new(&cfg, &[10, 6], None, false).unwrap();
        let pre = o.preconditioner().unwrap().state_bytes();
        assert!(pre > 0);
        assert_eq!(o.state_bytes(), pre + 60 * 4 + 60 * 4);
        let t = with_block_norm(&cfg, &[10, 6], None);
        assert_eq!(t.state_bytes(), 6 * 8 + 60 * 4 + 60 * 4);
        let no_mom = OptimizerConfig {
            momentum: MomentumConfig {
                beta1: 0.0,
                nesterov: true,
            },
            ..cfg
        };
        assert_eq!(
            ParamOptimizer::new(&no_mom, &[5], None, false)
                .unwrap()
                .state_bytes(),
            5 * 4
        );
    }

    #[test]
    fn state_bytes_of_a_1000_by_784_layer_follow_the_paper_formula() {
        // A burn Linear weight [d_in, d_out] = [1000, 784]: b = 1000, m = 784, k = 32.
        let (b, m, k) = (1000usize, 784usize, 32usize);
        let cfg = OptimizerConfig::default();
        let o = ParamOptimizer::new(&cfg, &[b, m], None, false).unwrap();
        let floats = b * k + m * k * k + m;
        // rmsprop-normalized grafting keeps one second moment and momentum one buffer.
        assert_eq!(o.state_bytes(), (floats + b * m + b * m) * 4);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let d = OptimizerConfig::default();
        d.validate().unwrap();
        let bad = [
            OptimizerConfig {
                start_preconditioning_step: 0,
                ..d.clone()
            },
            OptimizerConfig {
                max_block_size: 0,
                ..d.clone()
            },
            OptimizerConfig {
                graft: GraftConfig {
                    beta2: 1.5,
                    ..Default::default()
                },
                ..d.clone()
            },
            OptimizerConfig {
                graft: GraftConfig {
                    eps: -1.0,
                    ..Default::default()
                },
                ..d.clone()
            },
            OptimizerConfig {
                momentum: MomentumConfig {
                    beta1: 1.0,
                    nesterov: true,
                },
                ..d.clone()
            },
            OptimizerConfig {
                weight_decay: WeightDecayConfig {
                    rate: -0.1,
                    ..Default::default()
                },
                ..d.clone()
            },
            OptimizerConfig {
                method: Method::SharedBasis(SharedBasisConfig {
                    rank: 0,
                    ..Default::default()
                }),
                ..d.clone()
            },
        ];
        for c in bad {
            assert!(
                matches!(c.validate(), Err(PrecondError::InvalidConfig { .. })),
                "{c:?}"
            );
            assert!(ParamOptimizer::new(&c, &[3, 3], None, false).is_err());
        }
        assert!(ParamOptimizer::new(&d, &[3, 0], None, false).is_err());
        assert!(ParamOptimizer::new(&d, &[3, 3], Some(2), false).is_err());
    }

    #[test]
    fn serde_round_trip_continues_bitwise() {
        let cfg = OptimizerConfig {
            start_preconditioning_step: 2,
            ..Default::default()
        };
        let mut a = with_block_norm(&cfg, &[4, 3], Some(0));
        let gs = grads(12, 6, 21);
        let mut pa = init_param(12);
        for g in &gs[..3] {
            a.step(&mut pa, g, 0.1).unwrap();
        }
        let json = serde_json::to_string(&a).unwrap();
        let mut b: ParamOptimizer<BlockNorm> = serde_json::from_str(&json).unwrap();
        assert!(b.work_a.is_empty());
        assert_eq!(b.steps(), 3);
        let mut pb = pa.clone();
        for g in &gs[3..] {
            a.step(&mut pa, g, 0.1).unwrap();
            b.step(&mut pb, g, 0.1).unwrap();
        }
        assert_eq!(pa, pb);
        // The default state type (graft-only here) round-trips too.
        let go = OptimizerConfig {
            method: Method::GraftOnly,
            ..Default::default()
        };
        let o = ParamOptimizer::new(&go, &[3, 2], None, false).unwrap();
        let back: ParamOptimizer =
            serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(back.path(), ParamPath::Graft);
    }

    #[test]
    fn config_serde_defaults_and_round_trip() {
        let c: OptimizerConfig =
            serde_json::from_str(r#"{"start_preconditioning_step": 5}"#).unwrap();
        assert_eq!(
            c,
            OptimizerConfig {
                start_preconditioning_step: 5,
                ..Default::default()
            }
        );
        assert_eq!(c.nonfinite, NonFinitePolicy::Error);
        assert_eq!(c.max_linalg_failures, 3);
        let c: OptimizerConfig = serde_json::from_str(r#"{"nonfinite": "Skip"}"#).unwrap();
        assert_eq!(c.nonfinite, NonFinitePolicy::Skip);
        let c: OptimizerConfig = serde_json::from_str(r#"{"max_linalg_failures": 0}"#).unwrap();
        assert_eq!(c.max_linalg_failures, 0);
        let c = OptimizerConfig {
            method: Method::GraftOnly,
            graft: GraftConfig {
                kind: GraftKind::Adam,
                ..Default::default()
            },
            fallback: Fallback::SgdMomentum,
            nonfinite: NonFinitePolicy::Skip,
            max_linalg_failures: 7,
            ..Default::default()
        };
        let back: OptimizerConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let s = Schedule::Cosine {
            warmup_steps: 3,
            total_steps: 10,
            final_fraction: 0.1,
        };
        let back: Schedule = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
