//! Errors returned by the library. Nothing in `precond` panics on user input.

use thiserror::Error;

/// Everything that can go wrong when configuring or stepping an optimizer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PrecondError {
    /// A configuration value is out of its valid range.
    #[error("invalid config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The configuration field (or command-line name) at fault.
        field: &'static str,
        /// Its value, as given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A gradient or parameter does not have the shape the state was built for.
    #[error("shape mismatch: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The shape the state was built for.
        expected: String,
        /// The shape given.
        got: String,
    },
    /// A gradient holds NaN or infinity; the step was refused and no state changed.
    #[error("non-finite gradient at step {step}{}", .param.as_ref().map(|p| format!(" in parameter {p}")).unwrap_or_default())]
    NonFiniteGradient {
        /// The 1-based step.
        step: u64,
        /// The parameter's name, where known.
        param: Option<String>,
    },
    /// A dense linear-algebra kernel failed (no convergence or non-finite output) or its
    /// input overflowed, and the step was refused; or the kernels of one parameter failed at
    /// [`OptimizerConfig::max_linalg_failures`] steps in a row (see [`crate::optimizer`]).
    ///
    /// [`OptimizerConfig::max_linalg_failures`]: crate::OptimizerConfig::max_linalg_failures
    #[error(
        "linear algebra failure in {kernel} at step {step} ({consecutive} failed step(s) in a row)"
    )]
    LinalgFailure {
        /// The kernel (or computation) that failed last.
        kernel: &'static str,
        /// The 1-based step of the failure.
        step: u64,
        /// Failed steps of this parameter in a row, this one included (1 for a single refused
        /// step).
        consecutive: u64,
    },
    /// A saved state cannot be loaded into this optimizer.
    #[error("state mismatch: {0}")]
    StateMismatch(String),
}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, PrecondError>;

/// Builds an [`PrecondError::InvalidConfig`].
pub(crate) fn invalid(
    field: &'static str,
    value: impl ToString,
    reason: &'static str,
) -> PrecondError {
    PrecondError::InvalidConfig {
        field,
        value: value.to_string(),
        reason,
    }
}
