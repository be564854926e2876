//! Thin wrappers over faer's dense kernels (GEMM, thin QR, thin SVD, symmetric
//! eigendecomposition), so that the methods read like the paper and every call site picks its
//! parallelism once.
//!
//! **Failures and the f64 retry.** The factorizations ([`thin_q`], [`thin_svd_left`],
//! [`SymEig::decompose`] / [`SymEig::compute`] and [`sym_eig`]) report a failure instead of
//! returning garbage: a [`KernelError::NonFiniteInput`] when their input already holds NaN or ∞
//! (an overflow upstream: nothing is computed, nothing is retried), a [`KernelError::Failed`]
//! when faer does not converge or its output is not finite. **This is where the f64 retry
//! lives:** when a kernel fails on an `f32` input, the wrapper converts the input to `f64`,
//! runs the same kernel in `f64`, and rounds the result back to `f32` (accepted only if it is
//! finite after rounding); only when that fails too does the caller see `Failed`. An `f64`
//! kernel is not retried. Callers therefore never retry themselves: what to do with a `Failed`
//! (keep the previous state, count the failure) is each method's policy, see
//! [`crate::optimizer`]'s module docs. A retry that succeeded is not reported (it is not a
//! failure: the result is the f64 one, rounded).
//!
//! **Fault injection (tests only).** Under `cfg(test)`, `inject_failures(kind, n)` makes the
//! next `n` factorization calls *of the current thread* fail (`inject_failures_after(skip, kind,
//! n)` lets `skip` calls succeed first): with `FaultKind::F32Only` the `f32` attempt fails and
//! its f64 retry runs for real (f64 calls are not affected and count neither way); with
//! `FaultKind::Both` the call fails in both precisions. A call whose input is not finite fails
//! without consuming anything. The counter is thread-local because tests run in parallel
//! threads; tests that inject run the method inside a one-thread rayon pool
//! (`testing::on_one_thread`) so that the per-block parallel passes stay on the injecting
//! thread.

use crate::scalar::Scalar;
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::reborrow::ReborrowMut;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use std::any::TypeId;

/// Parallelism for layer-sized products: faer's rayon path over the global pool.
pub fn par_layer() -> Par {
    Par::rayon(0)
}

/// Elements per parallel task of the elementwise passes over a parameter (grafting, momentum,
/// weight decay, finiteness checks): a parameter below it is one task.
pub const PAR_CHUNK: usize = 1 << 15;

/// Every element of `x` is finite, tested in parallel chunks of [`PAR_CHUNK`] (each read whole,
/// so the test vectorizes).
pub fn par_all_finite(x: &[f32]) -> bool {
    use rayon::prelude::*;
    x.par_chunks(PAR_CHUNK)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

/// Blocks per parallel task when `blocks` independent per-block problems are split over the
/// rayon pool: about four tasks per thread (so a slow task is balanced by stealing), at least 8
/// blocks each (so the per-task scratch is amortized).
pub fn blocks_per_task(blocks: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    blocks.div_ceil(threads * 4).max(8)
}

/// `dst = alpha · lhs · rhs` (or `dst += …` with `accumulate`).
#[inline]
pub fn gemm<T: Scalar>(
    dst: MatMut<'_, T>,
    accumulate: bool,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    alpha: T,
    par: Par,
) {
    let accum = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    matmul(dst, accum, lhs, rhs, alpha, par);
}

/// Why a factorization returned no result (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelError {
    /// The input held NaN or ∞ (an overflow before the kernel): nothing was computed.
    NonFiniteInput,
    /// No convergence or a non-finite result, in f64 too when the input was f32.
    Failed,
}

/// Whether `T` is `f64` (no retry) rather than `f32`.
#[inline]
fn is_f64<T: Scalar>() -> bool {
    TypeId::of::<T>() == TypeId::of::<f64>()
}

/// Every entry of `a` is finite. A contiguous column is read whole (no early exit inside it),
/// so the test vectorizes.
pub fn all_finite<T: Scalar>(a: MatRef<'_, T>) -> bool {
    a.col_iter().all(|col| match col.try_as_col_major() {
        Some(col) => col.as_slice().iter().fold(true, |ok, v| ok & v.is_finite()),
        None => col.iter().all(|v| v.is_finite()),
    })
}

/// Every entry of the lower triangle of the square `a` is finite (all that the symmetric
/// eigensolver reads).
pub fn lower_finite<T: Scalar>(a: MatRef<'_, T>) -> bool {
    (0..a.ncols()).all(|j| (j..a.nrows()).all(|i| a[(i, j)].is_finite()))
}

fn to_f64<T: Scalar>(a: MatRef<'_, T>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)].f64())
}

/// `a` rounded to `T`, or `None` when anything is not finite after rounding.
fn from_f64<T: Scalar>(a: MatRef<'_, f64>) -> Option<Mat<T>> {
    let out = Mat::from_fn(a.nrows(), a.ncols(), |i, j| T::of(a[(i, j)]));
    all_finite(out.as_ref()).then_some(out)
}

/// Which attempts of one kernel call an injected fault makes fail (always `None` outside tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Fault {
    None,
    /// The working-precision attempt fails; the f64 retry runs for real.
    Native,
    /// The working-precision attempt and the f64 retry fail.
    Both,
}

/// Which precisions an injected failure hits (tests only, see the module docs).
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// The f32 attempt fails, its f64 retry succeeds; f64 calls are not affected.
    F32Only,
    /// The call fails in f32 and in its f64 retry, or in f64.
    Both,
}

#[cfg(test)]
thread_local! {
    // Injected faults of this thread: (calls to let through first, kind, failures left).
    static FAULTS: std::cell::Cell<(usize, FaultKind, usize)> =
        const { std::cell::Cell::new((0, FaultKind::Both, 0)) };
}

/// Makes the next `n` factorization calls of this thread fail as `kind` says (replacing
/// whatever was left); `n = 0` clears it.
#[cfg(test)]
pub(crate) fn inject_failures(kind: FaultKind, n: usize) {
    inject_failures_after(0, kind, n);
}

/// Lets the next `skip` factorization calls of this thread (of the precisions `kind` hits)
/// succeed, then makes `n` fail.
#[cfg(test)]
pub(crate) fn inject_failures_after(skip: usize, kind: FaultKind, n: usize) {
    FAULTS.with(|f| f.set((skip, kind, n)));
}

/// Injected failures not consumed yet on this thread.
#[cfg(test)]
pub(crate) fn injected_remaining() -> usize {
    FAULTS.with(|f| f.get().2)
}

/// Consumes one injected failure (or one call to let through), if one applies to a kernel
/// in `T`.
#[cfg(test)]
fn take_fault<T: Scalar>() -> Fault {
    FAULTS.with(|f| {
        let (skip, kind, n) = f.get();
        if n == 0 || (kind == FaultKind::F32Only && is_f64::<T>()) {
            return Fault::None;
        }
        if skip > 0 {
            f.set((skip - 1, kind, n));
            return Fault::None;
        }
        f.set((0, kind, n - 1));
        match kind {
            FaultKind::F32Only => Fault::Native,
            FaultKind::Both => Fault::Both,
        }
    })
}

#[cfg(not(test))]
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // the test build's twin reads T
fn take_fault<T: Scalar>() -> Fault {
    Fault::None
}

/// Whether an injected failure hits this call of a kernel in `T` (consuming it; always false
/// outside tests): the batched eigensolver's lanes report such a lane as unsolved.
pub(crate) fn fault_injected<T: Scalar>() -> bool {
    take_fault::<T>() != Fault::None
}

/// Runs `native`; on failure (or an injected one) retries with `wide` in f64 when `T` is f32.
fn with_retry<T: Scalar, R>(
    native: impl FnOnce() -> Option<R>,
    wide: impl FnOnce() -> Option<R>,
) -> Result<R, KernelError> {
    let fault = take_fault::<T>();
    if fault == Fault::None {
        if let Some(r) = native() {
            return Ok(r);
        }
    }
    if is_f64::<T>() || fault == Fault::Both {
        return Err(KernelError::Failed);
    }
    wide().ok_or(KernelError::Failed)
}

/// Orthonormal basis of the column space of `a` by Householder QR (the thin Q factor).
/// Householder's Q has orthonormal columns even when `a` is rank deficient. Fails on a
/// non-finite input or output; an f32 failure is retried in f64 (module docs).
pub fn thin_q<T: Scalar>(a: MatRef<'_, T>) -> Result<Mat<T>, KernelError> {
    if !all_finite(a) {
        return Err(KernelError::NonFiniteInput);
    }
    with_retry::<T, _>(
        || {
            let q = a.qr().compute_thin_Q();
            all_finite(q.as_ref()).then_some(q)
        },
        || from_f64(to_f64(a).qr().compute_thin_Q().as_ref()),
    )
}

/// Singular values (descending) and the thin left singular vectors U of `a`. Fails on a
/// non-finite input, no convergence or a non-finite output; an f32 failure is retried in f64.
pub fn thin_svd_left<T: Scalar>(a: MatRef<'_, T>) -> Result<(Vec<T>, Mat<T>), KernelError> {
    if !all_finite(a) {
        return Err(KernelError::NonFiniteInput);
    }
    with_retry::<T, _>(
        || {
            let svd = a.thin_svd().ok()?;
            let s: Vec<T> = svd.S().column_vector().iter().copied().collect();
            let u = svd.U().to_owned();
            (s.iter().all(|v| v.is_finite()) && all_finite(u.as_ref())).then_some((s, u))
        },
        || {
            let svd = to_f64(a).thin_svd().ok()?;
            let s: Vec<T> = svd.S().column_vector().iter().map(|&v| T::of(v)).collect();
            let u = from_f64(svd.U())?;
            s.iter().all(|v| v.is_finite()).then_some((s, u))
        },
    )
}

/// Reusable workspace for the symmetric eigendecomposition of `n × n` matrices, so that
/// a loop over many small blocks allocates nothing.
pub struct SymEig<T: Scalar> {
    n: usize,
    buffer: MemBuffer,
    /// Eigenvalues, ascending, after [`SymEig::compute`].
    pub values: Diag<T>,
    /// Eigenvectors as columns, matching `values`.
    pub vectors: Mat<T>,
    /// The f64 workspace of the retry of an f32 decomposition, built on first use.
    wide: Option<Box<SymEig<f64>>>,
}

impl<T: Scalar> SymEig<T> {
    /// Workspace for dimension `n`.
    pub fn new(n: usize) -> Self {
        let req = evd::self_adjoint_evd_scratch::<T>(
            n,
            ComputeEigenvectors::Yes,
            Par::Seq,
            Default::default(),
        );
        Self {
            n,
            buffer: MemBuffer::new(req),
            values: Diag::zeros(n),
            vectors: Mat::zeros(n, n),
            wide: None,
        }
    }

    /// Dimension this workspace serves.
    pub fn dim(&self) -> usize {
        self.n
    }

    /// faer's decomposition in `T`, no retry; true when it converged with finite output.
    fn native(&mut self, a: MatRef<'_, T>) -> bool {
        let stack = MemStack::new(&mut self.buffer);
        let ok = evd::self_adjoint_evd(
            a,
            self.values.as_mut(),
            Some(self.vectors.as_mut()),
            Par::Seq,
            stack,
            Default::default(),
        )
        .is_ok();
        ok && self.values.column_vector().iter().all(|v| v.is_finite())
            && all_finite(self.vectors.as_ref())
    }

    /// Eigendecomposition of the symmetric matrix `a` (only its lower triangle is read) into
    /// [`values`](Self::values) and [`vectors`](Self::vectors). A failure of an f32
    /// decomposition is retried in f64 and rounded back (module docs).
    pub fn decompose(&mut self, a: MatRef<'_, T>) -> Result<(), KernelError> {
        if !lower_finite(a) {
            return Err(KernelError::NonFiniteInput);
        }
        let n = self.n;
        let fault = take_fault::<T>();
        if fault == Fault::None && self.native(a) {
            return Ok(());
        }
        if is_f64::<T>() || fault == Fault::Both {
            return Err(KernelError::Failed);
        }
        let wide = self.wide.get_or_insert_with(|| Box::new(SymEig::new(n)));
        let a64 = Mat::from_fn(n, n, |i, j| if i >= j { a[(i, j)].f64() } else { 0.0 });
        if !wide.native(a64.as_ref()) {
            return Err(KernelError::Failed);
        }
        for j in 0..n {
            let v = T::of(wide.values.column_vector()[j]);
            if !v.is_finite() {
                return Err(KernelError::Failed);
            }
            self.values.column_vector_mut()[j] = v;
            for i in 0..n {
                self.vectors[(i, j)] = T::of(wide.vectors[(i, j)]);
            }
        }
        Ok(())
    }

    /// [`decompose`](Self::decompose) as a bool: false on non-convergence (in f64 too for an
    /// f32 input), non-finite output or non-finite input.
    pub fn compute(&mut self, a: MatRef<'_, T>) -> bool {
        self.decompose(a).is_ok()
    }

    /// Eigenvalue `j` (ascending order).
    #[inline]
    pub fn value(&self, j: usize) -> T {
        self.values.column_vector()[j]
    }

    /// The rounding floor of the last decomposition: n·u·max_j |λ_j| (u the unit round-off of
    /// `T`). A backward-stable eigensolver returns the eigenvalues of A + E with
    /// ‖E‖₂ = O(n·u·‖A‖₂), so eigenvalues below this floor carry no information, and the
    /// components of a vector along their eigenvectors are round-off when the vector lies in
    /// A's range. Inverse roots `(λ + ε)^{−1/p}` use `max(λ + ε, floor)` so that such round-off
    /// is never amplified by more than floor^{−1/p} when ε is far below it (ε ≥ floor leaves
    /// the result bitwise unchanged).
    pub fn rounding_floor(&self) -> T {
        let largest = self
            .values
            .column_vector()
            .iter()
            .fold(T::zero(), |acc, v| acc.max(v.abs()));
        T::of(self.n as f64) * T::epsilon() * largest
    }
}

/// Symmetric eigendecomposition of a small matrix, allocating (for tests and cold paths).
/// Same failure handling (and f64 retry) as [`SymEig::decompose`].
pub fn sym_eig<T: Scalar>(a: MatRef<'_, T>) -> Option<(Vec<T>, Mat<T>)> {
    let mut eig = SymEig::new(a.nrows());
    if !eig.compute(a) {
        return None;
    }
    let values = (0..a.nrows()).map(|j| eig.value(j)).collect();
    Some((values, eig.vectors))
}

/// Replaces a square matrix by its symmetric part, (A + Aᵀ)/2.
pub fn symmetrize<T: Scalar>(mut a: MatMut<'_, T>) {
    let n = a.nrows();
    let half = T::of(0.5);
    for j in 0..n {
        for i in (j + 1)..n {
            let v = (a[(i, j)] + a[(j, i)]) * half;
            a[(i, j)] = v;
            a[(j, i)] = v;
        }
    }
}

/// [`symmetrize`] of the n×n matrix held column-major in `a`: the same arithmetic, without
/// faer's per-element indexing (the per-block pass's hot loop).
pub fn symmetrize_col_major<T: Scalar>(a: &mut [T], n: usize) {
    let half = T::of(0.5);
    for j in 0..n {
        for i in (j + 1)..n {
            let v = (a[j * n + i] + a[i * n + j]) * half;
            a[j * n + i] = v;
            a[i * n + j] = v;
        }
    }
}

/// [`lower_finite`] of the n×n matrix held column-major in `a`; every element is read (no early
/// exit), so the test vectorizes.
pub fn lower_finite_col_major<T: Scalar>(a: &[T], n: usize) -> bool {
    (0..n).all(|j| {
        a[j * n + j..(j + 1) * n]
            .iter()
            .fold(true, |ok, v| ok & v.is_finite())
    })
}

/// `dst ← src` column by column: slice copies where both columns are contiguous, else
/// element by element.
pub fn copy_columns<T: Scalar>(mut dst: MatMut<'_, T>, src: MatRef<'_, T>) {
    for j in 0..src.ncols() {
        let (mut d, s) = (dst.rb_mut().col_mut(j), src.col(j));
        match (d.rb_mut().try_as_col_major_mut(), s.try_as_col_major()) {
            (Some(d), Some(s)) => d.as_slice_mut().copy_from_slice(s.as_slice()),
            _ => d.copy_from(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn random(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Mat::from_fn(rows, cols, |_, _| StandardNormal.sample(&mut rng))
    }

    fn round(a: &Mat<f64>) -> Mat<f32> {
        Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32)
    }

    /// A G Gᵀ-like symmetric 6 × 6 matrix, exactly representable in f32.
    fn sym6() -> (Mat<f32>, Mat<f64>) {
        let g = random(6, 4, 1);
        let a32 = round(&(&g * g.transpose()));
        let a64 = Mat::from_fn(6, 6, |i, j| a32[(i, j)] as f64);
        (a32, a64)
    }

    #[test]
    fn f32_eigendecomposition_failure_is_retried_in_f64() {
        let (a32, a64) = sym6();
        let mut eig32 = SymEig::<f32>::new(6);
        let mut eig64 = SymEig::<f64>::new(6);
        eig64.decompose(a64.as_ref()).unwrap();
        eig32.decompose(a32.as_ref()).unwrap();
        let native: Vec<f32> = (0..6).map(|j| eig32.value(j)).collect();

        inject_failures(FaultKind::F32Only, 1);
        eig32.decompose(a32.as_ref()).unwrap();
        assert_eq!(injected_remaining(), 0, "the f32 attempt did not fail");
        // The result is the f64 decomposition, rounded.
        for j in 0..6 {
            assert_eq!(eig32.value(j), eig64.value(j) as f32);
            assert!((eig32.value(j) - native[j]).abs() <= 1e-5 * native[5]);
            for i in 0..6 {
                assert_eq!(eig32.vectors[(i, j)], eig64.vectors[(i, j)] as f32);
            }
        }
        // f64 calls are not hit by F32Only (and do not consume it).
        inject_failures(FaultKind::F32Only, 1);
        assert_eq!(eig64.decompose(a64.as_ref()), Ok(()));
        assert_eq!(injected_remaining(), 1);
        assert!(sym_eig(a64.as_ref()).is_some());
        inject_failures(FaultKind::F32Only, 0);

        // Both precisions: f32 and f64 calls fail, one count each.
        inject_failures(FaultKind::Both, 2);
        assert_eq!(eig32.decompose(a32.as_ref()), Err(KernelError::Failed));
        assert!(!eig64.compute(a64.as_ref()));
        assert_eq!(injected_remaining(), 0);
        assert!(eig32.compute(a32.as_ref()));

        // A non-finite input is reported as such and consumes nothing.
        let mut bad = a32.clone();
        bad[(4, 1)] = f32::INFINITY;
        inject_failures(FaultKind::Both, 1);
        assert_eq!(
            eig32.decompose(bad.as_ref()),
            Err(KernelError::NonFiniteInput)
        );
        assert_eq!(injected_remaining(), 1);
        // Only the lower triangle is read.
        bad[(4, 1)] = a32[(4, 1)];
        bad[(1, 4)] = f32::NAN;
        inject_failures(FaultKind::Both, 0);
        assert_eq!(eig32.decompose(bad.as_ref()), Ok(()));
    }

    #[test]
    fn f32_qr_and_svd_failures_are_retried_in_f64() {
        let a64 = random(9, 4, 2);
        let a32 = round(&a64);
        let a64 = Mat::from_fn(9, 4, |i, j| a32[(i, j)] as f64);
        let q64 = thin_q(a64.as_ref()).unwrap();
        let native = thin_q(a32.as_ref()).unwrap();

        inject_failures_after(1, FaultKind::F32Only, 1);
        assert_eq!(thin_q(a32.as_ref()).unwrap(), native);
        let q = thin_q(a32.as_ref()).unwrap();
        assert_eq!(injected_remaining(), 0);
        assert_eq!(q, round(&q64));
        let diff = (q.as_ref() - native.as_ref()).norm_max();
        assert!(diff <= 1e-5, "{diff:e}");

        inject_failures(FaultKind::Both, 1);
        assert_eq!(thin_q(a32.as_ref()), Err(KernelError::Failed));
        let mut bad = a32.clone();
        bad[(8, 3)] = f32::NAN;
        assert_eq!(thin_q(bad.as_ref()), Err(KernelError::NonFiniteInput));

        let (s64, u64_) = thin_svd_left(a64.as_ref()).unwrap();
        inject_failures(FaultKind::F32Only, 1);
        let (s, u) = thin_svd_left(a32.as_ref()).unwrap();
        assert_eq!(injected_remaining(), 0);
        assert_eq!(s, s64.iter().map(|&v| v as f32).collect::<Vec<_>>());
        assert_eq!(u, round(&u64_));
        inject_failures(FaultKind::Both, 1);
        assert_eq!(thin_svd_left(a32.as_ref()), Err(KernelError::Failed));
        assert_eq!(
            thin_svd_left(bad.as_ref()),
            Err(KernelError::NonFiniteInput)
        );
    }
}
