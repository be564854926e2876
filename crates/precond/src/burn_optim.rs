//! One burn optimizer config per method (cargo feature `burn`), in burn's config style: each is
//! `XConfig::new().with_…().init()`, returning burn's [`ModuleOptimizer`] as
//! `burn::optim::AdamConfig::new().init()` does, or `init_with_handle()` for the optimizer and
//! its [`SharedBasisHandle`] (errors, refused steps, counters, state bytes: see
//! [`crate::burn_adapter`], "Refused and failed steps").
//!
//! | burn config | method | defaults beyond the method's own |
//! |---|---|---|
//! | [`SharedBasisConfig`] | [`Method::SharedBasis`] | [`OptimizerConfig::default`] |
//! | [`ShampooConfig`] | [`Method::Shampoo`] | as shared basis; preconditioning starts at Shampoo's `start_step` |
//! | [`SketchyConfig`] | [`Method::Sketchy`] | as Shampoo |
//! | [`BlockAdamConfig`] | [`Method::BlockAdam`] | grafting `None`, momentum β1 = 0 |
//! | [`SoapConfig`] | [`Method::Soap`] | grafting `None`, momentum β1 = 0, decoupled weight decay |
//! | [`DiagonalConfig`] | [`Method::Diagonal`] (SGD, Adagrad, RMSprop, Adam, AdamW) | grafting `None`, momentum β1 = 0 |
//! | [`FullMatrixConfig`] | [`Method::FullMatrix`] | [`OptimizerConfig::default`] |
//! | [`GraftOnlyConfig`] | [`Method::GraftOnly`] | [`OptimizerConfig::default`] |
//!
//! These names are those of the library's method configs ([`crate::shared_basis::SharedBasisConfig`],
//! [`crate::shampoo::ShampooConfig`], …), which hold one method's hyperparameters and nothing
//! else; the burn configs live in this module only (the crate root does not re-export them), so
//! `precond::burn_optim::ShampooConfig` is the burn optimizer and `precond::shampoo::ShampooConfig`
//! Shampoo's hyperparameters. Every burn config is a [`BurnConfig`] over its method's config:
//! the settings every method shares (grafting, momentum, weight decay, start step, max block
//! size, fallback, non-finite policy, linear-algebra failure limit) and the per-parameter rules
//! (names, exclusions, block axis by [`ParamId`] and by rule) are [`BurnConfig`]'s, the same for
//! all; each config adds its method's own settings. [`crate::burn_adapter::SharedBasisOptimizerConfig`]
//! is the same type over the whole [`Method`] enum (any [`OptimizerConfig`]).
//!
//! ```
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::GradientsParams;
//! use burn::tensor::{Device, Distribution, Tensor};
//! use precond::burn_optim::ShampooConfig;
//!
//! let device = Device::flex().autodiff();
//! let mut model: Linear = LinearConfig::new(8, 4).init(&device);
//! let (mut optim, handle) = ShampooConfig::new()
//!     .with_block_size(128)
//!     .with_start_step(2) // roots, and the preconditioned direction, from step 2
//!     .with_weight_decay_rate(1e-4)
//!     .init_with_handle()?;
//! let x = Tensor::<2>::random([16, 8], Distribution::Normal(0.0, 1.0), &device);
//! for _ in 0..3 {
//!     let loss = model.forward(x.clone()).square().mean();
//!     let grads = GradientsParams::from_grads(loss.backward(), &model);
//!     model = optim.step(1e-2, model, grads);
//! }
//! assert_eq!(handle.stats().applied, 6); // weight and bias, three steps
//! assert!(handle.last_error().is_none());
//! # Ok::<(), precond::PrecondError>(())
//! ```

use crate::batched_eigen::BlockEigensolver;
use crate::block_diag;
use crate::burn_adapter::{BlockAxisRule, ParamRules, SharedBasisHandle, SharedBasisOptimizer};
use crate::diagonal::{self, DiagonalKind};
use crate::error::Result;
use crate::full_matrix;
use crate::graft::{GraftConfig, GraftKind};
use crate::momentum::MomentumConfig;
use crate::optimizer::{Fallback, Method, NonFinitePolicy, OptimizerConfig};
use crate::shampoo;
use crate::shared_basis::{self, RhoMode};
use crate::sketchy;
use crate::soap;
use crate::weight_decay::{WeightDecayConfig, WeightDecayMode};
use burn::module::ParamId;
use burn::optim::ModuleOptimizer;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

mod sealed {
    /// Only the library's methods are [`super::BurnMethod`]s.
    pub trait Sealed {}
}

/// A method a [`BurnConfig`] can be built for: one of the library's method configs
/// ([`crate::shampoo::ShampooConfig`], …), [`GraftOnly`], or the whole [`Method`] enum (any
/// method: [`crate::burn_adapter::SharedBasisOptimizerConfig`]). Sealed.
pub trait BurnMethod: Clone + Default + sealed::Sealed {
    /// The burn config's name in `Debug` output.
    const NAME: &'static str;
    /// The per-parameter configuration the burn config starts from: this method's defaults and
    /// the shared settings it is meant to run with.
    fn defaults() -> OptimizerConfig;
    /// This method's configuration inside `method`, if `method` is this method.
    fn from_method(method: &Method) -> Option<Self>;
    /// `self` as a [`Method`].
    fn into_method(self) -> Method;
}

/// The marker of [`Method::GraftOnly`], which has no settings of its own: the grafting
/// optimizer alone ([`GraftOnlyConfig`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraftOnly;

/// The shared settings of a method that carries its own moments (Block Adam, SOAP, diagonal):
/// no grafting and no momentum on top of the method (they would count them twice).
fn own_moments(method: Method) -> OptimizerConfig {
    OptimizerConfig {
        method,
        graft: GraftConfig {
            kind: GraftKind::None,
            ..GraftConfig::default()
        },
        momentum: MomentumConfig {
            beta1: 0.0,
            ..MomentumConfig::default()
        },
        ..OptimizerConfig::default()
    }
}

/// [`OptimizerConfig::default`] with `method`.
fn with_defaults(method: Method) -> OptimizerConfig {
    OptimizerConfig {
        method,
        ..OptimizerConfig::default()
    }
}

/// Implements [`BurnMethod`] for a method config held by `Method::$variant`.
macro_rules! burn_method {
    ($knobs:ty, $variant:ident, $name:literal, $defaults:expr) => {
        impl sealed::Sealed for $knobs {}
        impl BurnMethod for $knobs {
            const NAME: &'static str = $name;
            fn defaults() -> OptimizerConfig {
                $defaults(Method::$variant(Self::default()))
            }
            fn from_method(method: &Method) -> Option<Self> {
                match method {
                    Method::$variant(c) => Some(c).cloned(),
                    _ => None,
                }
            }
            fn into_method(self) -> Method {
                Method::$variant(self)
            }
        }
    };
}

/// Shampoo and Sketchy precondition from their own start step on.
fn from_start_step(start_step: u64) -> impl Fn(Method) -> OptimizerConfig {
    move |method| OptimizerConfig {
        start_preconditioning_step: start_step,
        ..with_defaults(method)
    }
}

burn_method!(
    shared_basis::SharedBasisConfig,
    SharedBasis,
    "SharedBasisConfig",
    with_defaults
);
burn_method!(
    shampoo::ShampooConfig,
    Shampoo,
    "ShampooConfig",
    from_start_step(shampoo::ShampooConfig::default().start_step)
);
burn_method!(
    sketchy::SketchyConfig,
    Sketchy,
    "SketchyConfig",
    from_start_step(sketchy::SketchyConfig::default().start_step)
);
burn_method!(
    block_diag::BlockAdamConfig,
    BlockAdam,
    "BlockAdamConfig",
    own_moments
);
burn_method!(
    diagonal::DiagonalConfig,
    Diagonal,
    "DiagonalConfig",
    own_moments
);
burn_method!(
    full_matrix::FullMatrixConfig,
    FullMatrix,
    "FullMatrixConfig",
    with_defaults
);
burn_method!(soap::SoapConfig, Soap, "SoapConfig", |method| {
    OptimizerConfig {
        weight_decay: WeightDecayConfig {
            rate: 0.0,
            mode: WeightDecayMode::Decoupled,
        },
        ..own_moments(method)
    }
});

impl sealed::Sealed for GraftOnly {}
impl BurnMethod for GraftOnly {
    const NAME: &'static str = "GraftOnlyConfig";
    fn defaults() -> OptimizerConfig {
        with_defaults(Method::GraftOnly)
    }
    fn from_method(method: &Method) -> Option<Self> {
        matches!(method, Method::GraftOnly).then_some(GraftOnly)
    }
    fn into_method(self) -> Method {
        Method::GraftOnly
    }
}

impl sealed::Sealed for Method {}
impl BurnMethod for Method {
    const NAME: &'static str = "SharedBasisOptimizerConfig";
    fn defaults() -> OptimizerConfig {
        OptimizerConfig::default()
    }
    fn from_method(method: &Method) -> Option<Self> {
        Some(method.clone())
    }
    fn into_method(self) -> Method {
        self
    }
}

/// The burn optimizer config of method `M`, in burn's config style: the per-parameter
/// configuration ([`OptimizerConfig`], method included) and the per-parameter rules. Use it
/// through its per-method names ([`SharedBasisConfig`], [`ShampooConfig`], …, or
/// [`crate::burn_adapter::SharedBasisOptimizerConfig`] for any method). The methods here are
/// those every method shares; each per-method name adds its method's own settings.
#[derive(Clone)]
pub struct BurnConfig<M> {
    /// The per-parameter configuration; its method is always an `M`.
    pub(crate) config: OptimizerConfig,
    /// Exclusions, fallbacks, block axes and names by parameter.
    pub(crate) rules: ParamRules,
    method: PhantomData<fn() -> M>,
}

impl<M: BurnMethod> Default for BurnConfig<M> {
    fn default() -> Self {
        Self {
            config: M::defaults(),
            rules: ParamRules::default(),
            method: PhantomData,
        }
    }
}

impl<M: BurnMethod> fmt::Debug for BurnConfig<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules = &self.rules;
        f.debug_struct(M::NAME)
            .field("config", &self.config)
            .field("excluded", &rules.excluded)
            .field("block_axes", &rules.block_axes)
            .field("rule", &rules.rule.as_ref().map(|_| "<closure>"))
            .field("names", &rules.names)
            .field("fallbacks", &rules.fallbacks)
            .finish()
    }
}

impl<M: BurnMethod> BurnConfig<M> {
    /// The defaults of method `M` (see its per-method name's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Edits the configuration of the method `K` (switching the method to `K`, with its
    /// defaults, when it is another: only [`crate::burn_adapter::SharedBasisOptimizerConfig`]
    /// can hold another).
    pub(crate) fn edit<K: BurnMethod>(mut self, edit: impl FnOnce(&mut K)) -> Self {
        let mut knobs = K::from_method(&self.config.method).unwrap_or_default();
        edit(&mut knobs);
        self.config.method = knobs.into_method();
        self
    }

    /// The full per-parameter configuration (e.g. for [`OptimizerConfig::gives_up`]).
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Replaces the method's whole configuration.
    pub fn with_method_config(mut self, method: M) -> Self {
        self.config.method = method.into_method();
        self
    }

    /// The grafting method (keeps the other grafting fields).
    pub fn with_graft(mut self, kind: GraftKind) -> Self {
        self.config.graft.kind = kind;
        self
    }

    /// The full grafting configuration (kind, β1, β2, eps).
    pub fn with_graft_config(mut self, graft: GraftConfig) -> Self {
        self.config.graft = graft;
        self
    }

    /// Momentum β1 of the momentum applied to every method's direction (0 disables it).
    pub fn with_beta1(mut self, beta1: f64) -> Self {
        self.config.momentum.beta1 = beta1;
        self
    }

    /// Nesterov momentum on or off.
    pub fn with_nesterov(mut self, nesterov: bool) -> Self {
        self.config.momentum.nesterov = nesterov;
        self
    }

    /// Weight decay (rate and coupled/decoupled mode).
    pub fn with_weight_decay(mut self, weight_decay: WeightDecayConfig) -> Self {
        self.config.weight_decay = weight_decay;
        self
    }

    /// The weight-decay rate, keeping the mode (coupled, except for [`SoapConfig`]'s
    /// decoupled default).
    pub fn with_weight_decay_rate(mut self, rate: f64) -> Self {
        self.config.weight_decay.rate = rate;
        self
    }

    /// First step (1-based) using the preconditioned direction.
    pub fn with_start_preconditioning_step(mut self, step: u64) -> Self {
        self.config.start_preconditioning_step = step;
        self
    }

    /// Parameters whose view has more rows b than this take the fallback.
    pub fn with_max_block_size(mut self, max_block_size: usize) -> Self {
        self.config.max_block_size = max_block_size;
        self
    }

    /// What parameters that are not preconditioned do (1-D ones, excluded ones, b above the
    /// max block size).
    pub fn with_fallback(mut self, fallback: Fallback) -> Self {
        self.config.fallback = fallback;
        self
    }

    /// What a gradient holding NaN or ∞ does: [`NonFinitePolicy::Error`] (default) records
    /// [`crate::PrecondError::NonFiniteGradient`] in [`SharedBasisHandle::last_error`];
    /// [`NonFinitePolicy::Skip`] records it in [`SharedBasisHandle::last_warning`] instead.
    /// Either way that parameter keeps its value and state for this step and
    /// [`crate::burn_adapter::AdapterStats::skipped_non_finite`] counts it.
    pub fn with_nonfinite(mut self, policy: NonFinitePolicy) -> Self {
        self.config.nonfinite = policy;
        self
    }

    /// The limit on a parameter's run of failed or refused steps
    /// ([`OptimizerConfig::max_linalg_failures`]; default 3, 0 = no limit).
    pub fn with_max_linalg_failures(mut self, limit: u64) -> Self {
        self.config.max_linalg_failures = limit;
        self
    }

    /// Names parameters in the handle's errors and warnings (e.g. `"enc.0.weight"`; get them with
    /// [`crate::burn_adapter::param_names`]). [`init`](Self::init) then gives each named
    /// parameter its own burn parameter group (burn tells a per-tensor optimizer neither the id
    /// nor the path), with the same exclusion and block axis it would have had. Replaces earlier
    /// names.
    pub fn with_param_names(mut self, names: impl IntoIterator<Item = (ParamId, String)>) -> Self {
        self.rules.names = names
            .into_iter()
            .map(|(id, name)| (id, Arc::from(name)))
            .collect();
        self
    }

    /// Forces the fallback path for the parameter `id` (e.g. an embedding table).
    pub fn exclude(mut self, id: ParamId) -> Self {
        self.rules.excluded.push(id);
        self
    }

    /// Forces the fallback path for the parameter `id` with its own `fallback` (overriding
    /// [`with_fallback`](Self::with_fallback) for it): e.g. the paper's SGD with momentum for an
    /// embedding table while the other unpreconditioned parameters take the grafting direction.
    pub fn exclude_with(mut self, id: ParamId, fallback: Fallback) -> Self {
        let rules = &mut self.rules;
        rules.fallbacks.retain(|(i, _)| *i != id);
        rules.fallbacks.push((id, fallback));
        if !rules.excluded.contains(&id) {
            rules.excluded.push(id);
        }
        self
    }

    /// Forces the fallback path for all of `ids`.
    pub fn with_excluded(mut self, ids: impl IntoIterator<Item = ParamId>) -> Self {
        self.rules.excluded.extend(ids);
        self
    }

    /// Blocks of parameter `id` along `axis` (overrides the rule and the default). An axis out of
    /// range makes that parameter's first step fail (recorded in the handle).
    pub fn with_block_axis(mut self, id: ParamId, axis: usize) -> Self {
        self.rules.block_axes.retain(|(i, _)| *i != id);
        self.rules.block_axes.push((id, axis));
        self
    }

    /// A rule choosing the block axis from the parameter's shape (`None`: last axis). Applies to
    /// parameters without a per-id axis.
    pub fn with_block_axis_rule(
        mut self,
        rule: impl Fn(&[usize]) -> Option<usize> + Send + Sync + 'static,
    ) -> Self {
        let rule: BlockAxisRule = Arc::new(rule);
        self.rules.rule = Some(rule);
        self
    }

    /// The bare per-tensor optimizer for the default group (no exclusions or per-id axes; those
    /// are applied by [`init`](Self::init)). Validates the configuration.
    pub fn build(&self) -> Result<SharedBasisOptimizer> {
        self.rules.build(&self.config)
    }

    /// The whole-module optimizer, used like `AdamConfig::new().init()`. Validates the
    /// configuration.
    pub fn init(&self) -> Result<ModuleOptimizer> {
        self.init_with_handle().map(|(o, _)| o)
    }

    /// [`init`](Self::init) plus the handle reporting errors, counters and state bytes.
    pub fn init_with_handle(&self) -> Result<(ModuleOptimizer, SharedBasisHandle)> {
        self.rules.init_with_handle(&self.config)
    }
}

/// Setters of a method's own settings: `fn with_x(field: T, …);` sets those fields of `$knobs`.
macro_rules! setters {
    ($knobs:ty; $($(#[$doc:meta])* fn $name:ident($($field:ident: $t:ty),+);)*) => {$(
        $(#[$doc])*
        pub fn $name(self, $($field: $t),+) -> Self {
            self.edit(|knobs: &mut $knobs| {
                $(knobs.$field = $field;)+
            })
        }
    )*};
}
pub(crate) use setters;

/// The shared-basis setters, of [`SharedBasisConfig`] and of
/// [`crate::burn_adapter::SharedBasisOptimizerConfig`] (where they switch the method to shared
/// basis).
macro_rules! shared_basis_setters {
    () => {
        $crate::burn_optim::setters!($crate::shared_basis::SharedBasisConfig;
            /// Rank k of the shared basis.
            fn with_rank(rank: usize);
            /// Oversampling p of the randomized SVD.
            fn with_oversample(oversample: usize);
            /// Power iterations of the randomized SVD per step.
            fn with_power_iters(power_iters: usize);
            /// How ρ grows: the lost-mass policy ([`RhoMode`]: the paper's norm, a random start,
            /// the Rayleigh quotient, frequent directions).
            fn with_rho(rho: RhoMode);
            /// Multiplier on every ρ increment
            /// ([`rho_scale`](crate::shared_basis::SharedBasisConfig::rho_scale); 1 = Algorithm
            /// 1, [`crate::TUNED_RHO_SCALE`] = the command line's `shared-basis` preset).
            fn with_rho_scale(rho_scale: f64);
            /// ε of eq. 6.
            fn with_eps(eps: f64);
            /// Decay β2 of the shared-basis statistics (1 = Algorithm 1's plain sum).
            fn with_beta2(beta2: f64);
            /// Seed of the randomized SVD's Gaussian start.
            fn with_seed(seed: u64);
        );

        /// ρ by `iters` power iterations.
        pub fn with_rho_iters(self, iters: usize) -> Self {
            self.with_rho(RhoMode::PowerIteration(iters))
        }

        /// ρ computed exactly (audits; O(k³) per block).
        pub fn with_rho_exact(self) -> Self {
            self.with_rho(RhoMode::Exact)
        }
    };
}
pub(crate) use shared_basis_setters;

/// The shared-basis optimizer ([`Method::SharedBasis`], Algorithm 1 of Yen et al.) for burn.
/// Defaults: [`crate::shared_basis::SharedBasisConfig::default`] (k = 32, ρ by the paper's
/// norm) and [`OptimizerConfig::default`] (RMSPROP_NORMALIZED grafting, Nesterov momentum 0.9,
/// no weight decay, preconditioning from step 1, max block size 4096).
///
/// ```
/// use precond::burn_optim::SharedBasisConfig;
/// let optim = SharedBasisConfig::new().with_rank(16).with_rho_scale(precond::TUNED_RHO_SCALE).init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type SharedBasisConfig = BurnConfig<shared_basis::SharedBasisConfig>;

impl BurnConfig<shared_basis::SharedBasisConfig> {
    shared_basis_setters!();

    setters!(shared_basis::SharedBasisConfig;
        /// The kernel of the per-block eigenproblems ([`BlockEigensolver`]; default batched).
        fn with_eigensolver(eigensolver: BlockEigensolver);
    );
}

/// Blocked Shampoo ([`Method::Shampoo`]) for burn. Defaults:
/// [`crate::shampoo::ShampooConfig::default`] (blocks of 1024, β2 = 1, ε = 1e-6, roots from
/// step 1 at every step) and [`OptimizerConfig::default`], preconditioning from Shampoo's start
/// step ([`with_start_step`](Self::with_start_step) moves both).
///
/// ```
/// use precond::burn_optim::ShampooConfig;
/// let optim = ShampooConfig::new().with_start_step(101).with_precondition_every(10).init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type ShampooConfig = BurnConfig<shampoo::ShampooConfig>;

impl BurnConfig<shampoo::ShampooConfig> {
    setters!(shampoo::ShampooConfig;
        /// Largest side of a block.
        fn with_block_size(block_size: usize);
        /// Decay β2 of the statistics (1 = plain sums).
        fn with_beta2(beta2: f64);
        /// ε added to the statistics' eigenvalues before the inverse 4th root.
        fn with_eps(eps: f64);
        /// Roots are recomputed every this many steps from the start step.
        fn with_precondition_every(precondition_every: u64);
    );

    /// First step (1-based) with roots, and with the preconditioned direction: sets
    /// [`start_step`](crate::shampoo::ShampooConfig::start_step) and
    /// [`with_start_preconditioning_step`](Self::with_start_preconditioning_step) both.
    pub fn with_start_step(self, start_step: u64) -> Self {
        self.edit(|c: &mut shampoo::ShampooConfig| c.start_step = start_step)
            .with_start_preconditioning_step(start_step)
    }
}

/// Blocked Sketchy ([`Method::Sketchy`]: Shampoo with frequent-directions sketches) for burn.
/// Defaults: [`crate::sketchy::SketchyConfig::default`] (rank 256, blocks of 1024, β2 = 1,
/// ε = 1e-6, from step 1 at every step) and [`OptimizerConfig::default`], preconditioning from
/// Sketchy's start step ([`with_start_step`](Self::with_start_step) moves both).
///
/// ```
/// use precond::burn_optim::SketchyConfig;
/// let optim = SketchyConfig::new().with_rank(64).with_block_size(512).init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type SketchyConfig = BurnConfig<sketchy::SketchyConfig>;

impl BurnConfig<sketchy::SketchyConfig> {
    setters!(sketchy::SketchyConfig;
        /// Rank ℓ of every sketch.
        fn with_rank(rank: usize);
        /// Largest side of a block.
        fn with_block_size(block_size: usize);
        /// Decay β2 of the statistics (1 = plain sums).
        fn with_beta2(beta2: f64);
        /// ε added to the escaped mass before the inverse 4th root.
        fn with_eps(eps: f64);
        /// The frozen copies are refreshed every this many steps from the start step.
        fn with_precondition_every(precondition_every: u64);
    );

    /// First step (1-based) with refreshed copies, and with the preconditioned direction: sets
    /// [`start_step`](crate::sketchy::SketchyConfig::start_step) and
    /// [`with_start_preconditioning_step`](Self::with_start_preconditioning_step) both.
    pub fn with_start_step(self, start_step: u64) -> Self {
        self.edit(|c: &mut sketchy::SketchyConfig| c.start_step = start_step)
            .with_start_preconditioning_step(start_step)
    }
}

/// Block Adam ([`Method::BlockAdam`], AdaBlock) for burn. Defaults:
/// [`crate::block_diag::BlockAdamConfig::default`] (blocks of 10 rows, β 0.9/0.999, ε = 1e-8),
/// **grafting `None` and momentum β1 = 0**: its direction already holds its first moment, so
/// this is Block Adam itself (grafting or momentum on top would count it twice). Every
/// parameter is preconditioned, 1-D ones included.
///
/// ```
/// use precond::burn_optim::BlockAdamConfig;
/// let config = BlockAdamConfig::new().with_block_size(8).with_betas(0.9, 0.99);
/// assert_eq!(config.config().momentum.beta1, 0.0);
/// let optim = config.init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type BlockAdamConfig = BurnConfig<block_diag::BlockAdamConfig>;

impl BurnConfig<block_diag::BlockAdamConfig> {
    setters!(block_diag::BlockAdamConfig;
        /// Rows per diagonal block.
        fn with_block_size(block_size: usize);
        /// Block Adam's first- and second-moment decays (not the shared momentum's β1).
        fn with_betas(beta1: f64, beta2: f64);
        /// ε added to the eigenvalues of the second moment before the inverse square root.
        fn with_eps(eps: f64);
        /// The kernel of the per-chunk eigenproblems ([`BlockEigensolver`]; default batched).
        fn with_eigensolver(eigensolver: BlockEigensolver);
    );
}

/// SOAP ([`Method::Soap`]: Adam in the eigenbasis of Shampoo's factors) for burn. Defaults:
/// [`crate::soap::SoapConfig::default`] (the reference's: β 0.95/0.95, ε = 1e-8, bases
/// refreshed every 10 steps, sides up to 10000), **grafting `None`, momentum β1 = 0 and
/// decoupled weight decay** (rate 0: set it with
/// [`with_weight_decay_rate`](Self::with_weight_decay_rate); the reference's is 0.01).
///
/// ```
/// use precond::burn_optim::SoapConfig;
/// let optim = SoapConfig::new().with_betas(0.9, 0.95).with_weight_decay_rate(0.01).init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type SoapConfig = BurnConfig<soap::SoapConfig>;

impl BurnConfig<soap::SoapConfig> {
    setters!(soap::SoapConfig;
        /// SOAP's Adam moment decays β1 and β2 (not the shared momentum's β1).
        fn with_betas(beta1: f64, beta2: f64);
        /// Decay of the statistics L and R (negative: β2).
        fn with_shampoo_beta(shampoo_beta: f64);
        /// ε added to the root of the second moment.
        fn with_eps(eps: f64);
        /// The eigenbases are refreshed every this many steps.
        fn with_precondition_frequency(precondition_frequency: u64);
        /// Sides larger than this are not rotated (the identity).
        fn with_max_precond_dim(max_precond_dim: usize);
    );
}

/// The diagonal methods ([`Method::Diagonal`]: SGD, Adagrad, RMSprop, Adam, AdamW, with
/// PyTorch's definitions) for burn. Defaults: [`crate::diagonal::DiagonalConfig::default`]
/// (Adam, β 0.9/0.999, ε = 1e-8), **grafting `None` and momentum β1 = 0** (the method is
/// the whole update). For AdamW's decay use decoupled weight decay
/// ([`with_weight_decay`](Self::with_weight_decay) with [`WeightDecayMode::Decoupled`]).
///
/// ```
/// use precond::burn_optim::DiagonalConfig;
/// use precond::diagonal::DiagonalKind;
/// let optim = DiagonalConfig::new().with_kind(DiagonalKind::Adagrad).with_eps(1e-10).init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type DiagonalConfig = BurnConfig<diagonal::DiagonalConfig>;

impl BurnConfig<diagonal::DiagonalConfig> {
    setters!(diagonal::DiagonalConfig;
        /// Which `torch.optim` method.
        fn with_kind(kind: DiagonalKind);
        /// Adam's β1 and β2 (SGD's momentum is β1, RMSprop's alpha β2; not the shared
        /// momentum's β1).
        fn with_betas(beta1: f64, beta2: f64);
        /// ε added to the root of the second moment.
        fn with_eps(eps: f64);
        /// SGD's Nesterov momentum (not the shared momentum's).
        fn with_sgd_nesterov(nesterov: bool);
        /// Adagrad's initial accumulator value.
        fn with_initial_accumulator(initial_accumulator: f64);
    );
}

/// Full-matrix Adagrad ([`Method::FullMatrix`], a reference for small parameters) for burn.
/// Defaults: [`crate::full_matrix::FullMatrixConfig::default`] (ε = 1e-6, plain sums, b·m up
/// to 4096) and [`OptimizerConfig::default`].
///
/// ```
/// use precond::burn_optim::FullMatrixConfig;
/// let optim = FullMatrixConfig::new().with_max_dim(1024).init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type FullMatrixConfig = BurnConfig<full_matrix::FullMatrixConfig>;

impl BurnConfig<full_matrix::FullMatrixConfig> {
    setters!(full_matrix::FullMatrixConfig;
        /// ε added to the statistics' eigenvalues before the inverse square root.
        fn with_eps(eps: f64);
        /// Decay β2 of the statistics (1 = Adagrad's plain sum).
        fn with_beta2(beta2: f64);
        /// Largest b·m accepted (the state is (b·m)² values); larger parameters fail.
        fn with_max_dim(max_dim: usize);
    );
}

/// The grafting optimizer alone ([`Method::GraftOnly`]: e.g. Adam or RMSprop as a baseline)
/// for burn. Defaults: [`OptimizerConfig::default`] (RMSPROP_NORMALIZED, Nesterov momentum 0.9).
///
/// ```
/// use precond::burn_optim::GraftOnlyConfig;
/// use precond::GraftKind;
/// let optim = GraftOnlyConfig::new().with_graft(GraftKind::Adam).with_beta1(0.0).init()?;
/// # Ok::<(), precond::PrecondError>(())
/// ```
pub type GraftOnlyConfig = BurnConfig<GraftOnly>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::burn_adapter::{param_names, AdapterStats, SharedBasisOptimizerConfig};
    use crate::optimizer::ParamOptimizer;
    use burn::module::{Module, Param};
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Distribution, Tensor};

    /// Two burn `Linear` layers, 6 → 5 → 3.
    #[derive(Module, Debug)]
    struct Net {
        l1: Linear,
        l2: Linear,
    }

    /// Parameter shapes in the order of [`Net::flat`].
    const SHAPES: [&[usize]; 4] = [&[6, 5], &[5], &[5, 3], &[3]];

    impl Net {
        fn new(device: &Device) -> Self {
            Self {
                l1: LinearConfig::new(6, 5).init(device),
                l2: LinearConfig::new(5, 3).init(device),
            }
        }
        fn forward(&self, x: Tensor<2>) -> Tensor<2> {
            self.l2.forward(self.l1.forward(x).tanh())
        }
        fn ids(&self) -> [ParamId; 4] {
            let bias = |l: &Linear| l.bias.as_ref().map(|b| b.id).unwrap();
            [
                self.l1.weight.id,
                bias(&self.l1),
                self.l2.weight.id,
                bias(&self.l2),
            ]
        }
        /// l1.weight, l1.bias, l2.weight, l2.bias as host vectors.
        fn flat(&self) -> Vec<Vec<f32>> {
            let v2 = |p: &Param<Tensor<2>>| p.val().try_into_vec_as::<f32>().unwrap();
            let v1 = |p: &Option<Param<Tensor<1>>>| {
                p.as_ref().unwrap().val().try_into_vec_as::<f32>().unwrap()
            };
            vec![
                v2(&self.l1.weight),
                v1(&self.l1.bias),
                v2(&self.l2.weight),
                v1(&self.l2.bias),
            ]
        }
        /// The gradients of [`Net::flat`]'s parameters as host vectors.
        fn host_grads(&self, grads: &GradientsParams) -> Vec<Vec<f32>> {
            let [w1, b1, w2, b2] = self.ids();
            let v2 = |id| {
                grads
                    .get::<2>(id)
                    .unwrap()
                    .try_into_vec_as::<f32>()
                    .unwrap()
            };
            let v1 = |id| {
                grads
                    .get::<1>(id)
                    .unwrap()
                    .try_into_vec_as::<f32>()
                    .unwrap()
            };
            vec![v2(w1), v1(b1), v2(w2), v1(b2)]
        }
    }

    fn bits(params: &[Vec<f32>]) -> Vec<Vec<u32>> {
        params
            .iter()
            .map(|p| p.iter().map(|v| v.to_bits()).collect())
            .collect()
    }

    const LR: f64 = 0.05;
    const STEPS: usize = 4;

    /// A seeded model and batch (x, y).
    fn setup(seed: u64) -> (Net, Tensor<2>, Tensor<2>) {
        let device = Device::flex().autodiff();
        device.seed(seed);
        let model = Net::new(&device);
        let x = Tensor::<2>::random([16, 6], Distribution::Normal(0.0, 1.0), &device);
        let y = Tensor::<2>::random([16, 3], Distribution::Normal(0.0, 1.0), &device);
        (model, x, y)
    }

    fn grads(model: &Net, x: &Tensor<2>, y: &Tensor<2>) -> GradientsParams {
        let loss = (model.forward(x.clone()) - y.clone()).square().mean();
        GradientsParams::from_grads(loss.backward(), model)
    }

    /// The parameters after [`STEPS`] steps of `optim` from `model`, every step checked clean.
    fn train(
        mut model: Net,
        x: &Tensor<2>,
        y: &Tensor<2>,
        (mut optim, handle): (ModuleOptimizer, SharedBasisHandle),
    ) -> Vec<Vec<f32>> {
        for _ in 0..STEPS {
            let g = grads(&model, x, y);
            model = optim.step(LR, model, g);
            assert_eq!(handle.last_error(), None);
        }
        let stats = handle.stats();
        assert_eq!(stats.applied, 4 * STEPS as u64, "{stats:?}");
        model.flat()
    }

    /// `cfg` has the per-parameter configuration `expected`, and its optimizer's steps on a
    /// two-layer burn model are bit for bit those of [`ParamOptimizer`]s built from
    /// `expected`, and those of [`SharedBasisOptimizerConfig`] given `expected`; the parameters
    /// move.
    fn steps_match_param_optimizer<M: BurnMethod>(cfg: BurnConfig<M>, expected: OptimizerConfig) {
        assert_eq!(cfg.config(), &expected, "{cfg:?}");
        let (model, x, y) = setup(11);
        let start = model.flat();
        // ParamOptimizer directly, on host copies, with the burn model's gradients.
        let mut direct: Vec<ParamOptimizer> = SHAPES
            .iter()
            .map(|s| ParamOptimizer::new(&expected, s, None, false).unwrap())
            .collect();
        let mut host = start.clone();
        let mut probe = model.clone();
        let (mut probe_optim, _) = cfg.init_with_handle().unwrap();
        for _ in 0..STEPS {
            let g = grads(&probe, &x, &y);
            let hg = probe.host_grads(&g);
            probe = probe_optim.step(LR, probe, g);
            for ((o, p), g) in direct.iter_mut().zip(&mut host).zip(&hg) {
                o.step(p, g, LR as f32).unwrap();
            }
        }
        let ours = train(model.clone(), &x, &y, cfg.init_with_handle().unwrap());
        let any = SharedBasisOptimizerConfig::new().with_config(expected);
        let general = train(model, &x, &y, any.init_with_handle().unwrap());
        assert_eq!(bits(&ours), bits(&host), "{cfg:?}");
        assert_eq!(bits(&ours), bits(&general), "{cfg:?}");
        assert_eq!(bits(&probe.flat()), bits(&ours));
        for (i, (a, b)) in ours.iter().zip(&start).enumerate() {
            assert!(a.iter().all(|v| v.is_finite()), "parameter {i}: {a:?}");
            assert_ne!(a, b, "parameter {i} did not move");
        }
    }

    /// The shared settings of Block Adam, SOAP and the diagonal methods.
    fn no_graft_no_momentum(method: Method) -> OptimizerConfig {
        OptimizerConfig {
            method,
            graft: GraftConfig {
                kind: GraftKind::None,
                ..Default::default()
            },
            momentum: MomentumConfig {
                beta1: 0.0,
                nesterov: true,
            },
            ..Default::default()
        }
    }

    #[test]
    fn shared_basis_config_steps_as_param_optimizer() {
        let cfg = SharedBasisConfig::new()
            .with_rank(3)
            .with_rho_scale(1e-3)
            .with_seed(7)
            .with_eps(1e-5)
            .with_weight_decay_rate(1e-3);
        let expected = OptimizerConfig {
            method: Method::SharedBasis(shared_basis::SharedBasisConfig {
                rank: 3,
                rho_scale: 1e-3,
                seed: 7,
                eps: 1e-5,
                ..Default::default()
            }),
            weight_decay: WeightDecayConfig {
                rate: 1e-3,
                mode: WeightDecayMode::Coupled,
            },
            ..Default::default()
        };
        steps_match_param_optimizer(cfg, expected);
    }

    #[test]
    fn shampoo_config_steps_as_param_optimizer() {
        // The default preconditions from Shampoo's default start step.
        assert_eq!(
            ShampooConfig::new().config(),
            &OptimizerConfig {
                method: Method::Shampoo(Default::default()),
                ..Default::default()
            }
        );
        let cfg = ShampooConfig::new()
            .with_block_size(4)
            .with_start_step(2)
            .with_precondition_every(2)
            .with_beta2(0.99);
        let expected = OptimizerConfig {
            method: Method::Shampoo(shampoo::ShampooConfig {
                block_size: 4,
                start_step: 2,
                precondition_every: 2,
                beta2: 0.99,
                ..Default::default()
            }),
            start_preconditioning_step: 2,
            ..Default::default()
        };
        steps_match_param_optimizer(cfg, expected);
    }

    #[test]
    fn sketchy_config_steps_as_param_optimizer() {
        let cfg = SketchyConfig::new()
            .with_rank(2)
            .with_block_size(4)
            .with_start_step(2)
            .with_eps(1e-5);
        let expected = OptimizerConfig {
            method: Method::Sketchy(sketchy::SketchyConfig {
                rank: 2,
                block_size: 4,
                start_step: 2,
                eps: 1e-5,
                ..Default::default()
            }),
            start_preconditioning_step: 2,
            ..Default::default()
        };
        steps_match_param_optimizer(cfg, expected);
    }

    #[test]
    fn block_adam_config_steps_as_param_optimizer() {
        let cfg = BlockAdamConfig::new()
            .with_block_size(2)
            .with_betas(0.8, 0.99)
            .with_eigensolver(BlockEigensolver::Faer);
        let expected = no_graft_no_momentum(Method::BlockAdam(block_diag::BlockAdamConfig {
            block_size: 2,
            beta1: 0.8,
            beta2: 0.99,
            eigensolver: BlockEigensolver::Faer,
            ..Default::default()
        }));
        steps_match_param_optimizer(cfg, expected);
    }

    #[test]
    fn soap_config_steps_as_param_optimizer() {
        let cfg = SoapConfig::new()
            .with_precondition_frequency(2)
            .with_betas(0.9, 0.95)
            .with_weight_decay_rate(0.01);
        let expected = OptimizerConfig {
            weight_decay: WeightDecayConfig {
                rate: 0.01,
                mode: WeightDecayMode::Decoupled,
            },
            ..no_graft_no_momentum(Method::Soap(soap::SoapConfig {
                precondition_frequency: 2,
                beta1: 0.9,
                beta2: 0.95,
                ..Default::default()
            }))
        };
        steps_match_param_optimizer(cfg, expected);
    }

    #[test]
    fn diagonal_config_steps_as_param_optimizer() {
        let cfg = DiagonalConfig::new()
            .with_kind(DiagonalKind::Adagrad)
            .with_eps(1e-10)
            .with_initial_accumulator(0.1);
        let expected = no_graft_no_momentum(Method::Diagonal(diagonal::DiagonalConfig {
            kind: DiagonalKind::Adagrad,
            eps: 1e-10,
            initial_accumulator: 0.1,
            ..Default::default()
        }));
        steps_match_param_optimizer(cfg, expected);
    }

    #[test]
    fn full_matrix_config_steps_as_param_optimizer() {
        let cfg = FullMatrixConfig::new().with_beta2(0.99).with_max_dim(64);
        let expected = OptimizerConfig {
            method: Method::FullMatrix(full_matrix::FullMatrixConfig {
                beta2: 0.99,
                max_dim: 64,
                ..Default::default()
            }),
            ..Default::default()
        };
        steps_match_param_optimizer(cfg, expected);
    }

    #[test]
    fn graft_only_config_steps_as_param_optimizer() {
        let cfg = GraftOnlyConfig::new()
            .with_graft(GraftKind::Adam)
            .with_nesterov(false);
        let expected = OptimizerConfig {
            method: Method::GraftOnly,
            graft: GraftConfig {
                kind: GraftKind::Adam,
                ..Default::default()
            },
            momentum: MomentumConfig {
                beta1: 0.9,
                nesterov: false,
            },
            ..Default::default()
        };
        steps_match_param_optimizer(cfg, expected);
    }

    /// The per-parameter rules of `cfg` (a block-axis rule, a per-id axis overriding it, an
    /// exclusion with its own fallback, names) on the two-layer model: the steps equal those of
    /// [`ParamOptimizer`]s built with those rules by hand, and differ from the steps without the
    /// rules.
    fn rules_apply<M: BurnMethod>(cfg: BurnConfig<M>) {
        let (model, x, y) = setup(21);
        let [w1, _, w2, b2] = model.ids();
        let plain = train(model.clone(), &x, &y, cfg.init_with_handle().unwrap());
        let cfg = cfg
            .with_block_axis_rule(|shape| (shape.len() == 2).then_some(0))
            .with_block_axis(w2, 1)
            .exclude_with(b2, Fallback::SgdMomentum)
            .with_param_names(param_names(&model));
        let sgd = OptimizerConfig {
            fallback: Fallback::SgdMomentum,
            ..cfg.config().clone()
        };
        let c = cfg.config();
        let mut direct = [
            ParamOptimizer::new(c, SHAPES[0], Some(0), false).unwrap(),
            ParamOptimizer::new(c, SHAPES[1], None, false).unwrap(),
            ParamOptimizer::new(c, SHAPES[2], Some(1), false).unwrap(),
            ParamOptimizer::new(&sgd, SHAPES[3], None, true).unwrap(),
        ];
        // Blocks along axis 0 (the rule): b = 5, where the default last axis gives b = 6.
        assert_eq!(direct[0].view().rows(), 5);
        assert_eq!(direct[2].view().rows(), 5);
        assert!(!direct[3].is_preconditioned());
        let mut host = model.flat();
        let mut probe = model.clone();
        let (mut optim, handle) = cfg.init_with_handle().unwrap();
        for _ in 0..STEPS {
            let g = grads(&probe, &x, &y);
            let hg = probe.host_grads(&g);
            probe = optim.step(LR, probe, g);
            for ((o, p), g) in direct.iter_mut().zip(&mut host).zip(&hg) {
                o.step(p, g, LR as f32).unwrap();
            }
        }
        let ruled = probe.flat();
        assert_eq!(bits(&ruled), bits(&host), "{cfg:?}");
        assert_ne!(ruled[3], plain[3], "the exclusion must matter");
        // The rule reaches the default group's optimizer (l1.weight has its name's group).
        let base = cfg.build().unwrap();
        assert_eq!(
            base.new_param_optimizer(SHAPES[0]).unwrap().view().rows(),
            5
        );
        assert_eq!(
            base.new_param_optimizer(SHAPES[1]).unwrap().view().rows(),
            1
        );
        assert_eq!(
            handle.stats(),
            AdapterStats {
                applied: 16,
                skipped_non_finite: 0,
                failed: 0
            }
        );
        // The names reach the handle: a NaN gradient names its parameter.
        let mut g = grads(&probe, &x, &y);
        g.remove::<2>(w1);
        g.register::<2>(w1, Tensor::full([6, 5], f32::NAN, &Device::flex()));
        let _ = optim.step(LR, probe, g);
        let error = handle.take_last_error().map(|e| e.to_string());
        let expected = "non-finite gradient at step 5 in parameter l1.weight with shape [6, 5]";
        assert_eq!(error.as_deref(), Some(expected));
    }

    /// The same rules give the same per-parameter treatment in two method configs.
    #[test]
    fn shared_rules_behave_alike_in_shampoo_and_block_adam() {
        rules_apply(ShampooConfig::new().with_block_size(4));
        rules_apply(BlockAdamConfig::new().with_block_size(2));
    }

    #[test]
    fn debug_names_the_config() {
        assert!(format!("{:?}", ShampooConfig::new()).starts_with("ShampooConfig {"));
        let any = format!("{:?}", SharedBasisOptimizerConfig::new());
        assert!(
            any.starts_with("SharedBasisOptimizerConfig { config: "),
            "{any}"
        );
    }
}
