//! The interface every second-order method implements: gradients of one parameter in,
//! a raw preconditioned direction out. Grafting, momentum, weight decay and schedules are
//! applied around it by [`crate::optimizer`], never inside it.

use crate::error::{PrecondError, Result};
use crate::scalar::Scalar;
use faer::{MatMut, MatRef};

/// A per-parameter second-order method working on the (b, m) matrix view of a parameter
/// (see [`crate::view`]): column i is block i.
pub trait Preconditioner<T: Scalar>: Send {
    /// Adds this step's gradient to the statistics and writes the raw preconditioned
    /// direction `u_t`, minus sign included (θ_{t+1} = θ_t + lr·u_t), into `direction`.
    /// `grad` and `direction` are (b, m). On error no state has changed
    /// (unless the error says otherwise).
    fn precondition(&mut self, grad: MatRef<'_, T>, direction: MatMut<'_, T>) -> Result<()>;

    /// Bytes of optimizer state this method holds (workspaces excluded).
    fn state_bytes(&self) -> usize;

    /// Number of `precondition` calls taken so far.
    fn steps(&self) -> u64;

    /// Whether the last direction written is the method's own. A method that needs warm-up
    /// (Shampoo before its first roots) writes a placeholder and returns false; the caller then
    /// uses the grafting direction. Default: always true.
    fn is_ready(&self) -> bool {
        true
    }
}

/// Refuses an empty (b, m) view: the constructors' shape check.
pub fn check_view(b: usize, m: usize) -> Result<()> {
    if b == 0 || m == 0 {
        return Err(PrecondError::ShapeMismatch {
            expected: "a non-empty (b, m) view".into(),
            got: format!("({b}, {m})"),
        });
    }
    Ok(())
}

/// `grad` and `direction` (given as their shapes) must both be (b, m).
pub fn check_shapes(
    grad: (usize, usize),
    direction: (usize, usize),
    b: usize,
    m: usize,
) -> Result<()> {
    for (name, shape) in [("gradient", grad), ("direction", direction)] {
        if shape != (b, m) {
            return Err(PrecondError::ShapeMismatch {
                expected: format!("{name} of shape ({b}, {m})"),
                got: format!("({}, {})", shape.0, shape.1),
            });
        }
    }
    Ok(())
}

/// A gradient holding NaN or ∞ is refused before any state changes (`step` is the 1-based step
/// it would have been).
pub fn check_finite<T: Scalar>(grad: MatRef<'_, T>, step: u64) -> Result<()> {
    if !grad.col_iter().all(|col| col.iter().all(|v| v.is_finite())) {
        return Err(PrecondError::NonFiniteGradient { step, param: None });
    }
    Ok(())
}
