//! Errors returned by the library. Nothing in `precond` panics on user input.

use thiserror::Error;

/// Everything that can go wrong when configuring or stepping an optimizer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PrecondError {
    /// A configuration value is out of its valid range.
    #[error("invalid config: {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A gradient or parameter does not have the shape the state was built for.
    #[error("shape mismatch: expected {expected}, got {got}")]
    ShapeMismatch { expected: String, got: String },
    /// A gradient holds NaN or infinity; the step was refused and no state changed.
    #[error("non-finite gradient at step {step}{}", .param.as_ref().map(|p| format!(" in parameter {p}")).unwrap_or_default())]
    NonFiniteGradient { step: u64, param: Option<String> },
    /// A dense linear-algebra kernel failed (no convergence or non-finite output).
    #[error("linear algebra failure in {kernel} at step {step}")]
    LinalgFailure { kernel: &'static str, step: u64 },
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
