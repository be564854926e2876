//! Lane-batched symmetric eigensolves for many small matrices at once: the per-block kernel of
//! [`crate::shared_basis`] (one k × k problem per output neuron per step) and
//! [`crate::block_diag`] (one per chunk).
//!
//! Both methods need, per block, every eigenvalue λ_j of a symmetric A and one spectral
//! function applied to one vector, y = V diag(f(λ)) Vᵀ x — never the eigenvectors themselves.
//! A general one-matrix eigensolver (faer's, one call per block) spends most of its time
//! forming V; here [`LANES`] problems of the same size n travel together, one per SIMD lane, in
//! a structure-of-arrays layout:
//!
//! 1. each A is scaled by a power of two (exact) so its largest entry lies in (½, 1];
//! 2. Householder tridiagonalization, A = H T Hᵀ (Golub & Van Loan, Alg. 8.3.1), with Hᵀx
//!    formed on the way (the reflectors kept in A's lower part);
//! 3. implicit symmetric QR steps with the Wilkinson shift on T (GVL Alg. 8.3.2/8.3.3), in
//!    lockstep over the lanes: each lane has its own unreduced window and shift, lanes outside
//!    their window get the identity rotation; every rotation is applied to the one vector
//!    (w ← Gᵀw, so w ends as Vᵀx) and stored;
//! 4. the caller reads the eigenvalues, sets w_j ← f(λ_j)·w_j, and [`EigenPack::back_transform`]
//!    replays the rotations in reverse and then the reflectors: y = H Z w = V diag(f) Vᵀ x.
//!
//! Cost per problem: (4/3)n³ for the reduction in SIMD lanes plus O(n²) rotations, against
//! ~9n³ for a decomposition that forms V. Convergence: a lane's bottom off-diagonal is
//! negligible when |e_j| ≤ u·(|d_j| + |d_{j+1}|) or |e_j| ≤ u·‖T‖ (u the unit round-off), so
//! every eigenvalue is that of A + E with ‖E‖ = O(n·u·‖A‖), as for a backward-stable
//! one-matrix solver. A lane that does not converge within 30·n QR steps, or whose result is
//! not finite, is reported in [`EigenPack::solve`]'s mask and the caller falls back to faer.
//!
//! **Dispatch.** The lane loops are plain fixed-size array loops that LLVM vectorizes; the same
//! body is compiled for AVX2+FMA (x86-64, chosen at run time) and for the baseline target. No
//! floating-point contraction is allowed in Rust, so both paths give bitwise the same results
//! (tested): a run does not depend on the machine's SIMD width.

// The lane loops index several lane arrays in lockstep (`for l in 0..LANES`): the shape LLVM
// vectorizes, clearer than zipped iterators over four arrays.
#![allow(clippy::needless_range_loop)]

use crate::scalar::Scalar;
use serde::{Deserialize, Serialize};

/// Problems per pack (SIMD lanes): 8 f32 fill one AVX2 register.
pub const LANES: usize = 8;

type Lane<T> = [T; LANES];

/// Which kernel solves the per-block eigenproblems of [`crate::shared_basis`] and
/// [`crate::block_diag`]. Both compute the same mathematics (eigenvalues and one spectral
/// function of each block applied to one vector); they differ in rounding only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockEigensolver {
    /// [`EigenPack`]: [`LANES`] blocks at a time in SIMD lanes (default); a block it cannot
    /// solve is recomputed by faer.
    #[default]
    Batched,
    /// faer's one-matrix symmetric eigendecomposition per block (the path of states saved
    /// before this choice existed, which resume with it).
    Faer,
}

impl BlockEigensolver {
    /// The choice of a state serialized before the field existed: faer, so that such a state
    /// continues bit for bit.
    pub fn legacy() -> Self {
        Self::Faer
    }
}

/// Which compiled copy of the lane loops runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The best the running CPU supports (AVX2+FMA on x86-64 when present).
    Detect,
    /// The baseline target's code (SSE2 on x86-64), whatever the CPU.
    Baseline,
}

/// One stored QR step: rotations for k in `start..end` (planes (k, k+1)), `offset` into the
/// rotation arrays.
#[derive(Clone, Copy, Debug)]
struct Sweep {
    start: usize,
    end: usize,
    offset: usize,
}

/// [`LANES`] symmetric n × n problems with one vector each, in structure-of-arrays layout, and
/// the workspace of their solve. Reused across packs of the same n.
pub struct EigenPack<T: Scalar> {
    n: usize,
    /// A, row-major n × n, one lane vector per entry; after the reduction column j below the
    /// diagonal holds the reflector v_j (v_j[j+1] = 1 implicit).
    a: Vec<Lane<T>>,
    /// β_j of the reflectors (0: no reflection).
    beta: Vec<Lane<T>>,
    /// Diagonal and off-diagonal of T; after the solve, d holds the (scaled) eigenvalues.
    d: Vec<Lane<T>>,
    e: Vec<Lane<T>>,
    /// The vector: x on load, Vᵀx after the solve, y after the back-transform.
    w: Vec<Lane<T>>,
    /// Scratch of the reduction.
    v: Vec<Lane<T>>,
    p: Vec<Lane<T>>,
    /// Stored rotations (cosine, sine) and the QR steps they belong to.
    cos: Vec<Lane<T>>,
    sin: Vec<Lane<T>>,
    sweeps: Vec<Sweep>,
    /// Per lane: the power of two A was multiplied by, and its inverse.
    scale: Lane<T>,
    unscale: Lane<T>,
    /// QR steps of the last solve.
    steps: usize,
    /// Lanes holding a problem (not [`EigenPack::clear`]ed).
    loaded: [bool; LANES],
}

impl<T: Scalar> EigenPack<T> {
    /// Workspace for problems of size `n` (n ≥ 1).
    pub fn new(n: usize) -> Self {
        let z = [T::zero(); LANES];
        Self {
            n,
            a: vec![z; n * n],
            beta: vec![z; n],
            d: vec![z; n],
            e: vec![z; n],
            w: vec![z; n],
            v: vec![z; n],
            p: vec![z; n],
            cos: Vec::new(),
            sin: Vec::new(),
            sweeps: Vec::new(),
            scale: [T::one(); LANES],
            unscale: [T::one(); LANES],
            steps: 0,
            loaded: [false; LANES],
        }
    }

    /// Problem size.
    pub fn dim(&self) -> usize {
        self.n
    }

    /// QR steps the last [`solve`](Self::solve) took (lanes in lockstep).
    pub fn qr_steps(&self) -> usize {
        self.steps
    }

    /// Puts problem `lane`: `lower(r, c)` gives A's entry for r ≥ c (only the lower triangle
    /// is read), `x` the vector (length n). Entries must be finite (the caller checks).
    pub fn load(&mut self, lane: usize, lower: impl Fn(usize, usize) -> T, x: &[T]) {
        let n = self.n;
        let mut largest = T::zero();
        for c in 0..n {
            for r in c..n {
                let v = lower(r, c);
                largest = largest.max(v.abs());
                self.a[r * n + c][lane] = v;
            }
        }
        self.finish_load(lane, largest, x);
    }

    /// [`load`](Self::load) from an n×n matrix held column-major in `a` (its lower triangle is
    /// read), without a closure call per element.
    pub fn load_col_major(&mut self, lane: usize, a: &[T], x: &[T]) {
        let n = self.n;
        let mut largest = T::zero();
        for c in 0..n {
            for (r, &v) in a[c * n + c..(c + 1) * n].iter().enumerate() {
                largest = largest.max(v.abs());
                self.a[(c + r) * n + c][lane] = v;
            }
        }
        self.finish_load(lane, largest, x);
    }

    /// The rest of a load: lane `lane`'s power-of-two scale from its `largest` entry, and `x`.
    fn finish_load(&mut self, lane: usize, largest: T, x: &[T]) {
        let (scale, unscale) = power_of_two_scale(largest);
        self.scale[lane] = scale;
        self.unscale[lane] = unscale;
        self.loaded[lane] = true;
        for (wr, &xr) in self.w.iter_mut().zip(x) {
            wr[lane] = xr;
        }
    }

    /// Fills lane `lane` with the zero problem (for a pack with fewer than [`LANES`] blocks).
    pub fn clear(&mut self, lane: usize) {
        for a in self.a.iter_mut() {
            a[lane] = T::zero();
        }
        for w in self.w.iter_mut() {
            w[lane] = T::zero();
        }
        self.scale[lane] = T::one();
        self.unscale[lane] = T::one();
        self.loaded[lane] = false;
    }

    /// Reduces and solves every lane. Returns, per lane, whether it converged with finite
    /// eigenvalues and vector (false: recompute that problem with faer).
    pub fn solve(&mut self, isa: Isa) -> [bool; LANES] {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Detect
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the copy was compiled for.
            return unsafe { self.solve_avx2() };
        }
        let _ = isa;
        self.solve_body()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn solve_avx2(&mut self) -> [bool; LANES] {
        self.solve_body()
    }

    #[inline(always)]
    fn solve_body(&mut self) -> [bool; LANES] {
        self.scale_and_mirror();
        self.tridiagonalize();
        let converged = self.qr_iterate();
        let mut ok = [true; LANES];
        for (l, ok) in ok.iter_mut().enumerate() {
            *ok = converged[l]
                && self.d.iter().all(|d| d[l].is_finite())
                && self.w.iter().all(|w| w[l].is_finite())
                // A failure injected by a test (one per loaded lane).
                && !(self.loaded[l] && crate::linalg::fault_injected::<T>());
        }
        ok
    }

    /// Eigenvalue j of lane `lane` (unsorted; in A's units).
    pub fn eigenvalue(&self, lane: usize, j: usize) -> T {
        self.d[j][lane] * self.unscale[lane]
    }

    /// Multiplies component j of lane `lane`'s Vᵀx by `weight` (the f(λ_j) of the spectral
    /// function, for eigenvalue j as [`eigenvalue`](Self::eigenvalue) numbers them).
    pub fn weight(&mut self, lane: usize, j: usize, weight: T) {
        self.w[j][lane] *= weight;
    }

    /// y = V w for every lane, after the weights: V diag(f) Vᵀ x.
    pub fn back_transform(&mut self, isa: Isa) {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Detect
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the copy was compiled for.
            unsafe { self.back_transform_avx2() };
            return;
        }
        let _ = isa;
        self.back_transform_body();
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn back_transform_avx2(&mut self) {
        self.back_transform_body();
    }

    /// Component r of lane `lane`'s result (after [`back_transform`](Self::back_transform)).
    pub fn result(&self, lane: usize, r: usize) -> T {
        self.w[r][lane]
    }

    /// Applies each lane's power-of-two scale to the loaded lower triangle and mirrors it.
    #[inline(always)]
    fn scale_and_mirror(&mut self) {
        let n = self.n;
        let scale = self.scale;
        for r in 0..n {
            for c in 0..=r {
                let mut v = self.a[r * n + c];
                for l in 0..LANES {
                    v[l] *= scale[l];
                }
                self.a[r * n + c] = v;
                self.a[c * n + r] = v;
            }
        }
    }

    /// Householder tridiagonalization of every lane (GVL Alg. 8.3.1), Hᵀx on the way.
    #[inline(always)]
    fn tridiagonalize(&mut self) {
        let n = self.n;
        let zero = T::zero();
        let one = T::one();
        let two = one + one;
        let half = one / two;
        for j in 0..n.saturating_sub(2) {
            // x = A[j+1.., j]; σ = Σ_{i ≥ j+2} x_i².
            let mut sigma = [zero; LANES];
            for i in j + 2..n {
                let col = &self.a[i * n + j];
                for l in 0..LANES {
                    sigma[l] += col[l] * col[l];
                }
            }
            let x0 = self.a[(j + 1) * n + j];
            let mut beta = [zero; LANES];
            let mut inv_v0 = [zero; LANES];
            let mut alpha = [zero; LANES];
            for l in 0..LANES {
                let mu = (x0[l] * x0[l] + sigma[l]).sqrt();
                let v0 = if x0[l] <= zero {
                    x0[l] - mu
                } else {
                    -sigma[l] / (x0[l] + mu)
                };
                let none = sigma[l] == zero;
                beta[l] = if none {
                    zero
                } else {
                    two * v0 * v0 / (sigma[l] + v0 * v0)
                };
                inv_v0[l] = if none { zero } else { one / v0 };
                alpha[l] = if none { x0[l] } else { mu };
            }
            // v = [1, x_{j+2..}/v0], kept in column j.
            self.v[j + 1] = [one; LANES];
            for i in j + 2..n {
                let mut vi = self.a[i * n + j];
                for l in 0..LANES {
                    vi[l] *= inv_v0[l];
                }
                self.v[i] = vi;
                self.a[i * n + j] = vi;
            }
            self.d[j] = self.a[j * n + j];
            self.e[j] = alpha;
            self.beta[j] = beta;
            // p = β A₂₂ v, then w = p − (β/2)(pᵀv) v.
            let mut pv = [zero; LANES];
            for r in j + 1..n {
                let mut acc = [zero; LANES];
                let row = &self.a[r * n..(r + 1) * n];
                for c in j + 1..n {
                    let (arc, vc) = (&row[c], &self.v[c]);
                    for l in 0..LANES {
                        acc[l] += arc[l] * vc[l];
                    }
                }
                let vr = &self.v[r];
                let mut pr = [zero; LANES];
                for l in 0..LANES {
                    pr[l] = beta[l] * acc[l];
                    pv[l] += pr[l] * vr[l];
                }
                self.p[r] = pr;
            }
            let mut k = [zero; LANES];
            for l in 0..LANES {
                k[l] = half * beta[l] * pv[l];
            }
            for r in j + 1..n {
                let vr = self.v[r];
                let mut pr = self.p[r];
                for l in 0..LANES {
                    pr[l] -= k[l] * vr[l];
                }
                self.p[r] = pr;
            }
            // A₂₂ ← A₂₂ − v wᵀ − w vᵀ.
            for r in j + 1..n {
                let (vr, wr) = (self.v[r], self.p[r]);
                for c in j + 1..n {
                    let (vc, wc) = (self.v[c], self.p[c]);
                    let arc = &mut self.a[r * n + c];
                    for l in 0..LANES {
                        arc[l] = arc[l] - vr[l] * wc[l] - wr[l] * vc[l];
                    }
                }
            }
            // x ← H_j x = x − β v (vᵀx).
            let mut vx = [zero; LANES];
            for r in j + 1..n {
                for l in 0..LANES {
                    vx[l] += self.v[r][l] * self.w[r][l];
                }
            }
            for r in j + 1..n {
                let vr = self.v[r];
                let wr = &mut self.w[r];
                for l in 0..LANES {
                    wr[l] -= beta[l] * vx[l] * vr[l];
                }
            }
        }
        if n >= 2 {
            self.d[n - 2] = self.a[(n - 2) * n + n - 2];
            self.e[n - 2] = self.a[(n - 1) * n + n - 2];
            for j in n.saturating_sub(2)..n {
                self.beta[j] = [zero; LANES];
            }
        }
        self.d[n - 1] = self.a[(n - 1) * n + n - 1];
        self.e[n - 1] = [zero; LANES];
    }

    /// Implicit symmetric QR steps with the Wilkinson shift (GVL Alg. 8.3.2), lanes in
    /// lockstep; returns per lane whether it converged.
    #[inline(always)]
    fn qr_iterate(&mut self) -> [bool; LANES] {
        let n = self.n;
        let zero = T::zero();
        let one = T::one();
        let two = one + one;
        let u = T::epsilon();
        self.cos.clear();
        self.sin.clear();
        self.sweeps.clear();
        self.steps = 0;
        let mut converged = [true; LANES];
        // ‖T‖ ≤ max_j |e_{j−1}| + |d_j| + |e_j| (Gershgorin).
        let mut norm = [zero; LANES];
        for j in 0..n {
            for l in 0..LANES {
                let below = if j > 0 { self.e[j - 1][l].abs() } else { zero };
                let g = below + self.d[j][l].abs() + self.e[j][l].abs();
                norm[l] = norm[l].max(g);
            }
        }
        let cap = 30 * n;
        let mut hi = n - 1;
        while hi > 0 {
            // Each lane's unreduced window [lo, hi]: lo is the largest s ≤ hi with e_{s−1}
            // negligible (0 if none); negligible off-diagonals are set to zero.
            let mut lo = [zero; LANES];
            for s in 1..=hi {
                let sf = T::of(s as f64);
                let (es, ds, ds1) = (self.e[s - 1], self.d[s - 1], self.d[s]);
                let mut e_new = es;
                for l in 0..LANES {
                    let e = es[l].abs();
                    let negligible = e <= u * (ds[l].abs() + ds1[l].abs()) || e <= u * norm[l];
                    e_new[l] = if negligible { zero } else { es[l] };
                    lo[l] = if negligible { sf } else { lo[l] };
                }
                self.e[s - 1] = e_new;
            }
            let hif = T::of(hi as f64);
            let mut start = hi;
            for &v in &lo {
                if v < hif {
                    start = start.min(v.f64() as usize);
                }
            }
            if start == hi {
                hi -= 1;
                continue;
            }
            if self.steps >= cap {
                for l in 0..LANES {
                    if lo[l] < hif {
                        converged[l] = false;
                    }
                }
                break;
            }
            self.steps += 1;
            // Wilkinson shift from each lane's trailing 2 × 2.
            let mut shift = [zero; LANES];
            for l in 0..LANES {
                let f = self.e[hi - 1][l];
                let dd = (self.d[hi - 1][l] - self.d[hi][l]) / two;
                let root = (dd * dd + f * f).sqrt();
                let denom = if dd >= zero { dd + root } else { dd - root };
                shift[l] = if denom != zero {
                    self.d[hi][l] - f * f / denom
                } else {
                    self.d[hi][l]
                };
            }
            self.sweeps.push(Sweep {
                start,
                end: hi,
                offset: self.cos.len(),
            });
            let mut xc = [one; LANES];
            let mut zc = [zero; LANES];
            for k in start..hi {
                let kf = T::of(k as f64);
                let mut cs = [one; LANES];
                let mut sn = [zero; LANES];
                let (dk, ek, dk1) = (self.d[k], self.e[k], self.d[k + 1]);
                let ek1 = if k + 1 < hi {
                    self.e[k + 1]
                } else {
                    [zero; LANES]
                };
                let mut prev = if k > 0 { self.e[k - 1] } else { [zero; LANES] };
                let (mut nd, mut nd1, mut ne, mut ne1) = (dk, dk1, ek, ek1);
                for l in 0..LANES {
                    let active = lo[l] <= kf && lo[l] < hif;
                    let first = kf == lo[l];
                    let x = if first { dk[l] - shift[l] } else { xc[l] };
                    let z = if first { ek[l] } else { zc[l] };
                    let x = if active { x } else { one };
                    let z = if active { z } else { zero };
                    let r = (x * x + z * z).sqrt();
                    let inv = if r != zero { one / r } else { zero };
                    let c = if r != zero { x * inv } else { one };
                    let s = z * inv;
                    if active && !first {
                        prev[l] = r;
                    }
                    let (a, b, q) = (dk[l], ek[l], dk1[l]);
                    let cc = c * c;
                    let ss = s * s;
                    let csb = two * c * s * b;
                    nd[l] = cc * a + csb + ss * q;
                    nd1[l] = ss * a - csb + cc * q;
                    ne[l] = c * s * (q - a) + (cc - ss) * b;
                    zc[l] = s * ek1[l];
                    ne1[l] = c * ek1[l];
                    xc[l] = ne[l];
                    cs[l] = c;
                    sn[l] = s;
                }
                if k > 0 {
                    self.e[k - 1] = prev;
                }
                self.d[k] = nd;
                self.d[k + 1] = nd1;
                self.e[k] = ne;
                if k + 1 < hi {
                    self.e[k + 1] = ne1;
                }
                // w ← Gᵀ w on (k, k+1).
                let (wk, wk1) = (self.w[k], self.w[k + 1]);
                let (mut nk, mut nk1) = (wk, wk1);
                for l in 0..LANES {
                    nk[l] = cs[l] * wk[l] + sn[l] * wk1[l];
                    nk1[l] = cs[l] * wk1[l] - sn[l] * wk[l];
                }
                self.w[k] = nk;
                self.w[k + 1] = nk1;
                self.cos.push(cs);
                self.sin.push(sn);
            }
        }
        converged
    }

    #[inline(always)]
    fn back_transform_body(&mut self) {
        let n = self.n;
        let zero = T::zero();
        // Z w: the rotations in reverse, each G applied (not Gᵀ).
        for sweep in self.sweeps.iter().rev() {
            for k in (sweep.start..sweep.end).rev() {
                let idx = sweep.offset + (k - sweep.start);
                let (cs, sn) = (self.cos[idx], self.sin[idx]);
                let (wk, wk1) = (self.w[k], self.w[k + 1]);
                let (mut nk, mut nk1) = (wk, wk1);
                for l in 0..LANES {
                    nk[l] = cs[l] * wk[l] - sn[l] * wk1[l];
                    nk1[l] = sn[l] * wk[l] + cs[l] * wk1[l];
                }
                self.w[k] = nk;
                self.w[k + 1] = nk1;
            }
        }
        // H w = H_0 (H_1 (… H_{n−3} w)).
        for j in (0..n.saturating_sub(2)).rev() {
            let beta = self.beta[j];
            let mut vw = self.w[j + 1];
            for i in j + 2..n {
                let vi = &self.a[i * n + j];
                for l in 0..LANES {
                    vw[l] += vi[l] * self.w[i][l];
                }
            }
            let mut t = [zero; LANES];
            for l in 0..LANES {
                t[l] = beta[l] * vw[l];
            }
            for l in 0..LANES {
                self.w[j + 1][l] -= t[l];
            }
            for i in j + 2..n {
                let vi = self.a[i * n + j];
                let wi = &mut self.w[i];
                for l in 0..LANES {
                    wi[l] -= t[l] * vi[l];
                }
            }
        }
    }
}

/// (2^e, 2^−e) with 2^e·largest in (½, 1], both finite; (1, 1) for 0 or a non-finite input.
fn power_of_two_scale<T: Scalar>(largest: T) -> (T, T) {
    if !(largest > T::zero() && largest.is_finite()) {
        return (T::one(), T::one());
    }
    let limit = T::max_value().f64().log2().floor() as i32 - 1;
    let e = (-(largest.f64().log2().ceil()) as i32).clamp(-limit, limit);
    let two = T::one() + T::one();
    (two.powi(e), two.powi(-e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::jacobi_eig;
    use faer::Mat;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A random symmetric matrix with eigenvalues spread over `decades`, and its f64
    /// eigenpairs (Q diag(λ) Qᵀ with Q from faer's QR of a Gaussian matrix).
    fn problem(n: usize, decades: f64, rank: usize, rng: &mut ChaCha8Rng) -> (Mat<f64>, Vec<f64>) {
        let g = Mat::<f64>::from_fn(n, n, |_, _| rng.random::<f64>() - 0.5);
        let q = g.qr().compute_thin_Q();
        let values: Vec<f64> = (0..n)
            .map(|j| {
                if j < rank {
                    10f64.powf(-decades * rng.random::<f64>())
                } else {
                    0.0
                }
            })
            .collect();
        let a = Mat::<f64>::from_fn(n, n, |r, c| {
            (0..n).map(|j| q[(r, j)] * values[j] * q[(c, j)]).sum()
        });
        (a, values)
    }

    /// f(A) x in f64 by the tests' cyclic Jacobi eigensolver (independent of faer).
    fn oracle(a: &Mat<f64>, x: &[f64], f: impl Fn(f64) -> f64) -> (Vec<f64>, Vec<f64>) {
        let (values, vectors) = jacobi_eig(a);
        let n = x.len();
        let proj: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|r| vectors[(r, j)] * x[r]).sum::<f64>() * f(values[j]))
            .collect();
        let y = (0..n)
            .map(|r| (0..n).map(|j| vectors[(r, j)] * proj[j]).sum())
            .collect();
        (values, y)
    }

    struct Solved<T> {
        values: Vec<Vec<T>>,
        results: Vec<Vec<T>>,
        ok: [bool; LANES],
        steps: usize,
    }

    fn run<T: Scalar>(
        mats: &[Mat<f64>],
        xs: &[Vec<f64>],
        f: &dyn Fn(f64) -> f64,
        isa: Isa,
    ) -> Solved<T> {
        let n = mats[0].nrows();
        let mut pack = EigenPack::<T>::new(n);
        for lane in 0..LANES {
            match mats.get(lane) {
                Some(a) => {
                    let x: Vec<T> = xs[lane].iter().map(|&v| T::of(v)).collect();
                    pack.load(lane, |r, c| T::of(a[(r, c)]), &x);
                }
                None => pack.clear(lane),
            }
        }
        let ok = pack.solve(isa);
        let values: Vec<Vec<T>> = (0..LANES)
            .map(|l| (0..n).map(|j| pack.eigenvalue(l, j)).collect())
            .collect();
        for (l, vals) in values.iter().enumerate() {
            for (j, &v) in vals.iter().enumerate() {
                pack.weight(l, j, T::of(f(v.f64())));
            }
        }
        pack.back_transform(isa);
        let results = (0..LANES)
            .map(|l| (0..n).map(|r| pack.result(l, r)).collect())
            .collect();
        Solved {
            values,
            results,
            ok,
            steps: pack.qr_steps(),
        }
    }

    fn sorted<T: Scalar>(v: &[T]) -> Vec<f64> {
        let mut s: Vec<f64> = v.iter().map(|x| x.f64()).collect();
        s.sort_by(f64::total_cmp);
        s
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let num = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>();
        let den = b.iter().map(|y| y * y).sum::<f64>();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// The eigenvalues and V diag(f) Vᵀ x match an f64 reference for n = 1 … 40, spectra over
    /// 0 to 8 decades, rank-deficient matrices, and an inverse root with a shift.
    fn check_against_oracle<T: Scalar>(tol_values: f64, tol_result: f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &n in &[1usize, 2, 3, 4, 5, 10, 17, 32, 40] {
            for &(decades, rank) in &[(0.0, n), (3.0, n), (8.0, n), (2.0, n.div_ceil(3))] {
                let mats: Vec<Mat<f64>> = (0..LANES - 1)
                    .map(|_| problem(n, decades, rank, &mut rng).0)
                    .collect();
                let xs: Vec<Vec<f64>> = (0..LANES - 1)
                    .map(|_| (0..n).map(|_| rng.random::<f64>() - 0.5).collect())
                    .collect();
                let shift = 1e-3;
                let f = |l: f64| 1.0 / (l.max(0.0) + shift).sqrt();
                let got = run::<T>(&mats, &xs, &f, Isa::Detect);
                for (lane, (a, x)) in mats.iter().zip(&xs).enumerate() {
                    assert!(got.ok[lane], "n {n} lane {lane} did not converge");
                    let (values, y) = oracle(a, x, f);
                    let top = values.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let ours = sorted(&got.values[lane]);
                    for (o, r) in ours.iter().zip(&sorted(&values)) {
                        assert!(
                            (o - r).abs() <= tol_values * top.max(f64::MIN_POSITIVE),
                            "n {n} decades {decades}: eigenvalue {o} vs {r}"
                        );
                    }
                    let ours: Vec<f64> = got.results[lane].iter().map(|v| v.f64()).collect();
                    let err = rel(&ours, &y);
                    assert!(
                        err <= tol_result,
                        "n {n} decades {decades}: f(A)x error {err}"
                    );
                }
                // The empty lane stays zero.
                assert!(got.ok[LANES - 1]);
                assert!(got.results[LANES - 1].iter().all(|v| *v == T::zero()));
            }
        }
    }

    #[test]
    fn f64_matches_reference() {
        check_against_oracle::<f64>(1e-13, 1e-10);
    }

    #[test]
    fn f32_matches_reference() {
        // f(A)x with the shift 1e-3 amplifies eigenvalue errors of ~n·u·‖A‖ by up to ~1e3.
        check_against_oracle::<f32>(2e-6, 2e-3);
    }

    #[test]
    fn well_conditioned_f32_is_accurate() {
        // With the shift well above the rounding floor, f32 is accurate to ~1e-6.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 32;
        let mats: Vec<Mat<f64>> = (0..LANES).map(|_| problem(n, 4.0, n, &mut rng).0).collect();
        let xs: Vec<Vec<f64>> = (0..LANES)
            .map(|_| (0..n).map(|_| rng.random::<f64>() - 0.5).collect())
            .collect();
        let f = |l: f64| 1.0 / (l.max(0.0) + 0.1).sqrt() - 1.0 / 0.1f64.sqrt();
        let got = run::<f32>(&mats, &xs, &f, Isa::Detect);
        for (lane, (a, x)) in mats.iter().zip(&xs).enumerate() {
            let (_, y) = oracle(a, x, f);
            let ours: Vec<f64> = got.results[lane].iter().map(|v| v.f64()).collect();
            let err = rel(&ours, &y);
            assert!(err < 2e-5, "lane {lane}: {err}");
        }
        // Lockstep QR steps stay near 2 per eigenvalue.
        assert!(got.steps <= 3 * n, "{} QR steps", got.steps);
    }

    #[test]
    fn simd_and_baseline_paths_agree_bitwise() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &n in &[4usize, 10, 32] {
            let mats: Vec<Mat<f64>> = (0..LANES).map(|_| problem(n, 6.0, n, &mut rng).0).collect();
            let xs: Vec<Vec<f64>> = (0..LANES)
                .map(|_| (0..n).map(|_| rng.random::<f64>() - 0.5).collect())
                .collect();
            let f = |l: f64| 1.0 / (l.max(0.0) + 1e-4).sqrt();
            let fast = run::<f32>(&mats, &xs, &f, Isa::Detect);
            let base = run::<f32>(&mats, &xs, &f, Isa::Baseline);
            for l in 0..LANES {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast.values[l]), bits(&base.values[l]));
                assert_eq!(bits(&fast.results[l]), bits(&base.results[l]));
            }
        }
    }

    #[test]
    fn scaling_handles_extreme_magnitudes_and_special_matrices() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 12;
        for &magnitude in &[1e-30f64, 1e-12, 1.0, 1e15, 1e30] {
            let mut mats = Vec::new();
            let mut xs = Vec::new();
            // Random, diagonal, a multiple of I, rank one, a 2 × 2 rotation-invariant block.
            mats.push(problem(n, 3.0, n, &mut rng).0 * faer::Scale(magnitude));
            mats.push(Mat::from_fn(n, n, |r, c| {
                if r == c {
                    magnitude * (r + 1) as f64
                } else {
                    0.0
                }
            }));
            mats.push(Mat::from_fn(
                n,
                n,
                |r, c| if r == c { magnitude } else { 0.0 },
            ));
            let g: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
            mats.push(Mat::from_fn(n, n, |r, c| magnitude * g[r] * g[c]));
            mats.push(Mat::zeros(n, n));
            for _ in 0..mats.len() {
                xs.push((0..n).map(|_| rng.random::<f64>() - 0.5).collect());
            }
            let f = |l: f64| l.max(0.0) / magnitude + 1.0;
            let got = run::<f32>(&mats, &xs, &f, Isa::Detect);
            for (lane, (a, x)) in mats.iter().zip(&xs).enumerate() {
                assert!(got.ok[lane], "magnitude {magnitude} lane {lane}");
                let (values, y) = oracle(a, x, f);
                let top = values.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (o, r) in sorted(&got.values[lane]).iter().zip(&sorted(&values)) {
                    assert!(
                        (o - r).abs() <= 1e-5 * top,
                        "{magnitude} lane {lane}: {o} vs {r}"
                    );
                }
                let ours: Vec<f64> = got.results[lane].iter().map(|v| v.f64()).collect();
                assert!(
                    rel(&ours, &y) < 1e-5,
                    "{magnitude} lane {lane}: {}",
                    rel(&ours, &y)
                );
            }
        }
    }

    #[test]
    fn scale_is_a_power_of_two_into_half_one() {
        for &v in &[1e-40f64, 1e-30, 0.3, 0.5, 1.0, 3.0, 1e300] {
            let (s, u) = power_of_two_scale(v);
            assert_eq!(s * u, 1.0);
            if v > 1e-300 {
                assert!(v * s > 0.5 && v * s <= 1.0, "{v}");
            }
        }
        assert_eq!(power_of_two_scale(0.0f32), (1.0, 1.0));
        assert_eq!(power_of_two_scale(f32::INFINITY), (1.0, 1.0));
        let (s, _) = power_of_two_scale(1e-40f32);
        assert!(s.is_finite());
    }
}
