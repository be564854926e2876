//! The interface every second-order method implements: gradients of one parameter in,
//! a raw preconditioned direction out. Grafting, momentum, weight decay and schedules are
//! applied around it by [`crate::optimizer`], never inside it.

use crate::error::{PrecondError, Result};
use crate::scalar::Scalar;
use faer::{MatMut, MatRef};
use serde::{Deserialize, Serialize};

/// Linear-algebra failure counts of one method's state (the policy is in [`crate::optimizer`]'s
/// module docs). Serialized with the state; a state saved before these counts existed loads
/// with zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinalgHealth {
    /// Steps in which a kernel failed (in f64 too, after the retry of an f32 failure) and the
    /// state that kernel would have replaced was kept.
    pub failures: u64,
    /// Such steps in a row, up to the last step that ran a kernel: a step whose kernels all
    /// succeeded resets it to 0, a step that runs no kernel leaves it as it is.
    pub consecutive: u64,
    /// The kernel that failed last (not serialized: `None` after loading).
    #[serde(skip)]
    pub last_kernel: Option<&'static str>,
}

impl LinalgHealth {
    /// Records a step that ran kernels: `Some(kernel)` when one failed and the previous state
    /// was kept, `None` when all succeeded.
    pub fn record(&mut self, failed: Option<&'static str>) {
        match failed {
            Some(kernel) => {
                self.failures += 1;
                self.consecutive += 1;
                self.last_kernel = Some(kernel);
            }
            None => self.consecutive = 0,
        }
    }

    /// The error of a step refused outright by `kernel` at step `step`: the refused step
    /// counts as one more failure in a row (the counts themselves do not change).
    pub fn refusal(&self, kernel: &'static str, step: u64) -> PrecondError {
        PrecondError::LinalgFailure {
            kernel,
            step,
            consecutive: self.consecutive + 1,
        }
    }
}

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

    /// Linear-algebra failure counts (see [`LinalgHealth`]). Default: all zero, for methods
    /// without a factorization that can fail while keeping state (diagonal, full matrix).
    fn linalg_health(&self) -> LinalgHealth {
        LinalgHealth::default()
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
    if !crate::linalg::all_finite(grad) {
        return Err(PrecondError::NonFiniteGradient { step, param: None });
    }
    Ok(())
}
