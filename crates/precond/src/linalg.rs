//! Thin wrappers over faer's dense kernels (GEMM, thin QR, symmetric eigendecomposition),
//! so that the methods read like the paper and every call site picks its parallelism once.

use crate::scalar::Scalar;
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// Parallelism for layer-sized products: faer's rayon path over the global pool.
pub fn par_layer() -> Par {
    Par::rayon(0)
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

/// Orthonormal basis of the column space of `a` by Householder QR (the thin Q factor).
/// Householder's Q has orthonormal columns even when `a` is rank deficient.
pub fn thin_q<T: Scalar>(a: MatRef<'_, T>) -> Mat<T> {
    a.qr().compute_thin_Q()
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
        }
    }

    /// Dimension this workspace serves.
    pub fn dim(&self) -> usize {
        self.n
    }

    /// Eigendecomposition of the symmetric matrix `a` (only its lower triangle is read).
    /// Returns false on non-convergence or non-finite output.
    pub fn compute(&mut self, a: MatRef<'_, T>) -> bool {
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
    }

    /// Eigenvalue `j` (ascending order).
    #[inline]
    pub fn value(&self, j: usize) -> T {
        self.values.column_vector()[j]
    }
}

/// Symmetric eigendecomposition of a small matrix, allocating (for tests and cold paths).
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
