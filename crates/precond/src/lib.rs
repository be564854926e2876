//! precond: memory-efficient second-order optimizers for deep learning.
//!
//! The flagship is the shared-basis block low-rank preconditioner of Yen, Duvvuri, Dhillon and
//! Hsieh (NeurIPS 2023), [`shared_basis`]. Methods are composed the way Google's tearfree and
//! optax compose optimizers: a [`preconditioner::Preconditioner`] turns a gradient into a raw
//! direction; grafting, momentum, weight decay and learning-rate schedules wrap it.

#![warn(missing_docs)]

pub mod batched_eigen;
mod batched_power;
pub mod block_diag;
#[cfg(feature = "burn")]
pub mod burn_adapter;
#[cfg(feature = "burn")]
pub mod burn_optim;
#[cfg(feature = "burn")]
pub mod burn_schedule;
pub mod diagonal;
pub mod error;
pub mod full_matrix;
pub mod graft;
pub mod linalg;
pub mod momentum;
pub mod optimizer;
pub mod preconditioner;
pub mod scalar;
pub mod schedule;
pub mod shampoo;
pub mod shared_basis;
pub mod sketchy;
pub mod soap;
#[cfg(test)]
mod testing;
pub mod view;
pub mod weight_decay;

pub use batched_eigen::BlockEigensolver;
#[cfg(feature = "burn")]
pub use burn_adapter::{SharedBasisHandle, SharedBasisOptimizer, SharedBasisOptimizerConfig};
#[cfg(feature = "burn")]
pub use burn_schedule::ScheduledLr;
pub use error::{PrecondError, Result};
/// The faer version whose `MatRef`/`MatMut` appear in [`Preconditioner`]'s signature.
pub use faer;
pub use graft::{GraftConfig, GraftKind, GraftState};
pub use momentum::{MomentumConfig, MomentumState};
pub use optimizer::{
    Fallback, Method, MethodState, NonFinitePolicy, OptimizerConfig, ParamOptimizer, ParamPath,
    StepOutcome,
};
pub use preconditioner::{LinalgHealth, Preconditioner};
pub use scalar::Scalar;
pub use schedule::Schedule;
pub use shared_basis::{BlockRidge, RhoMode, SharedBasis, SharedBasisConfig, TUNED_RHO_SCALE};
pub use soap::{Soap, SoapConfig};
pub use view::ParamView;
pub use weight_decay::{WeightDecayConfig, WeightDecayMode};

/// The README's Rust block, compiled and run as a doctest (`cargo test --workspace` builds this
/// crate with `burn`), so the front page's example cannot rot.
#[cfg(all(doctest, feature = "burn"))]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctest;
