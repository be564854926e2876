//! The floating-point types the dense kernels run in: `f32` for training, `f64` for references.

use faer::traits::RealField;
use num_traits::Float;
use std::fmt::Debug;

/// A real scalar usable by faer's kernels and by ordinary arithmetic.
pub trait Scalar:
    RealField
    + Float
    + Default
    + Debug
    + Send
    + Sync
    + serde::Serialize
    + serde::de::DeserializeOwned
    + 'static
{
    /// Converts from `f64` (rounding for `f32`).
    fn of(x: f64) -> Self;
    /// Converts to `f64`.
    fn f64(self) -> f64;
}

impl Scalar for f32 {
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Scalar for f64 {
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
}
