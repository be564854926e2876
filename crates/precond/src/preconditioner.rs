//! The interface every second-order method implements: gradients of one parameter in,
//! a raw preconditioned direction out. Grafting, momentum, weight decay and schedules are
//! applied around it by [`crate::optimizer`], never inside it.

use crate::error::Result;
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
