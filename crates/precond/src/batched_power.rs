//! Step 5 of Algorithm 1 for eight blocks at once: the power iteration for δ_i = ‖E_i‖₂ of the
//! residual E_i = M_i − B_t R_i B_tᵀ, in the (k + r + 1) W coordinates of the shared-basis
//! module's docs, with the blocks in SIMD lanes.
//!
//! One block's iteration is four small matrix-vector products (R_i, Lᵀ, β2 R_old, L) of k or
//! k + r rows; as four faer calls per block per iteration their call overhead was as costly as
//! their arithmetic. Here the vectors of [`LANES`] blocks are stored lane-interleaved
//! (`x[j][lane]`), each block's k×k matrices likewise, so every product is a loop of vertical
//! multiply-adds across the lanes (no horizontal sums) into a register accumulator per output
//! (so the compiler vectorizes across lanes, not across outputs), compiled once for the
//! baseline target and once for AVX2+FMA, chosen at run time ([`Isa`]). The lift L = Wᵀ B_{t−1}
//! is the layer's, shared by all lanes. One autoencoder step's 540 packs (k = 32, r = 32, 10
//! iterations) take 16.5 ms on one core (AVX2) here, against 66–85 ms for a first version whose
//! loops the compiler vectorized across the outputs.
//!
//! The iteration is the one of [`crate::shared_basis::RhoMode::PowerIteration`] block by block:
//! start from the gradient's W coordinates, normalized, plus the constant vector of norm 1,
//! normalized; then `iters` times y = E_i x, δ = |y|, x = y/δ, a block whose |y| is 0 stopping
//! with δ = 0. The sums run in a fixed order (not faer's), so δ agrees with the per-block path
//! to rounding. The AVX2 copy is the same code (Rust does not contract a·b + c into a fused
//! multiply-add, and each lane's sums keep their order), so both copies give the same bits.

// Lanes index several lane-interleaved arrays together.
#![allow(clippy::needless_range_loop)]

use crate::batched_eigen::{Isa, LANES};
use crate::scalar::Scalar;
use crate::shared_basis::norm2;
use faer::MatRef;

/// The residuals of up to [`LANES`] blocks, lane-interleaved, and the iteration's vectors.
#[derive(Debug, Clone)]
pub(crate) struct ResidualPack<T: Scalar> {
    /// k: the rank.
    k: usize,
    /// k + r: the W coordinates the gradient's part inside span(W) lives in.
    kr: usize,
    /// R_i (k×k, column-major), lane-interleaved: `r_new[c·k + r][lane]`.
    r_new: Vec<[T; LANES]>,
    /// β2·R_{i, t−1} (the decayed old coefficients), laid out as `r_new`.
    r_old: Vec<[T; LANES]>,
    /// e_i's first k + r coordinates, `e[j][lane]`.
    e: Vec<[T; LANES]>,
    /// ν_i: the length of g'_i outside span(W) (e_i's last coordinate).
    nu: [T; LANES],
    /// L = Wᵀ B_{t−1} ((k + r)×k), row-major: `lift[r·k + j]`.
    lift: Vec<T>,
    /// L column-major: `lift_t[j·(k + r) + r]`.
    lift_t: Vec<T>,
    x: Vec<[T; LANES]>,
    y: Vec<[T; LANES]>,
    u: Vec<[T; LANES]>,
    v: Vec<[T; LANES]>,
    /// One lane's y, for the overflow-safe norm.
    column: Vec<T>,
}

/// What [`ResidualPack::power_norms`] found for one lane.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LaneNorm<T> {
    /// δ_i.
    Norm(T),
    /// |y| overflowed: the caller refuses the step, as the per-block path does.
    Overflow,
}

impl<T: Scalar> ResidualPack<T> {
    /// An empty pack for rank `k` and `extra` = r complement directions.
    pub(crate) fn new(k: usize, extra: usize) -> Self {
        let kr = k + extra;
        let zeros = |n: usize| vec![[T::zero(); LANES]; n];
        Self {
            k,
            kr,
            r_new: zeros(k * k),
            r_old: zeros(k * k),
            e: zeros(kr),
            nu: [T::zero(); LANES],
            lift: vec![T::zero(); kr * k],
            lift_t: vec![T::zero(); kr * k],
            x: zeros(kr + 1),
            y: zeros(kr + 1),
            u: zeros(k),
            v: zeros(k),
            column: vec![T::zero(); kr + 1],
        }
    }

    /// The layer's lift L ((k + r)×k); `None` (no previous basis) leaves β2 R_old out of E_i.
    pub(crate) fn set_lift(&mut self, lift: Option<MatRef<'_, T>>) {
        let k = self.k;
        match lift {
            Some(lift) => {
                for r in 0..self.kr {
                    for j in 0..k {
                        self.lift[r * k + j] = lift[(r, j)];
                        self.lift_t[j * self.kr + r] = lift[(r, j)];
                    }
                }
            }
            None => {
                self.lift.iter_mut().for_each(|v| *v = T::zero());
                self.lift_t.iter_mut().for_each(|v| *v = T::zero());
            }
        }
    }

    /// Loads block data into `lane` (R_i and R_old symmetric, as Algorithm 1's are): R_i, β2·R_old (`decay` times `r_old`; `None` at the first
    /// step, where there is none), e_i's first k + r coordinates and ν_i.
    pub(crate) fn load(
        &mut self,
        lane: usize,
        r_new: MatRef<'_, T>,
        r_old: Option<MatRef<'_, T>>,
        decay: T,
        e: impl IntoIterator<Item = T>,
        nu: T,
    ) {
        let k = self.k;
        for c in 0..k {
            let news = &mut self.r_new[c * k..(c + 1) * k];
            match r_new.col(c).try_as_col_major() {
                Some(col) => {
                    for (dst, &v) in news.iter_mut().zip(col.as_slice()) {
                        dst[lane] = v;
                    }
                }
                None => {
                    for (r, dst) in news.iter_mut().enumerate() {
                        dst[lane] = r_new[(r, c)];
                    }
                }
            }
            let olds = &mut self.r_old[c * k..(c + 1) * k];
            match r_old.map(|m| (m, m.col(c).try_as_col_major())) {
                Some((_, Some(col))) => {
                    for (dst, &v) in olds.iter_mut().zip(col.as_slice()) {
                        dst[lane] = decay * v;
                    }
                }
                Some((m, None)) => {
                    for (r, dst) in olds.iter_mut().enumerate() {
                        dst[lane] = decay * m[(r, c)];
                    }
                }
                None => olds.iter_mut().for_each(|dst| dst[lane] = T::zero()),
            }
        }
        for (j, v) in e.into_iter().take(self.kr).enumerate() {
            self.e[j][lane] = v;
        }
        self.nu[lane] = nu;
    }

    /// Empties `lane` (its residual is 0, so its δ is 0).
    pub(crate) fn clear(&mut self, lane: usize) {
        for (a, b) in self.r_new.iter_mut().zip(self.r_old.iter_mut()) {
            a[lane] = T::zero();
            b[lane] = T::zero();
        }
        for e in self.e.iter_mut() {
            e[lane] = T::zero();
        }
        self.nu[lane] = T::zero();
    }

    /// δ of every lane after `iters` power-iteration steps.
    pub(crate) fn power_norms(&mut self, iters: usize, isa: Isa) -> [LaneNorm<T>; LANES] {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Detect
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the copy was compiled for.
            return unsafe { self.power_norms_avx2(iters) };
        }
        let _ = isa;
        self.power_norms_body(iters)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn power_norms_avx2(&mut self, iters: usize) -> [LaneNorm<T>; LANES] {
        self.power_norms_body(iters)
    }

    #[inline(always)]
    fn power_norms_body(&mut self, iters: usize) -> [LaneNorm<T>; LANES] {
        let n = self.kr + 1;
        let mut out = [LaneNorm::Norm(T::zero()); LANES];
        // The start: x = e/|e| (e = 0: x = e) plus the constant vector of norm 1, normalized.
        self.x[..self.kr].copy_from_slice(&self.e);
        self.x[self.kr] = self.nu;
        let len = self.lane_norms(false);
        let spread = T::one() / T::of(n as f64).sqrt();
        let mut inv = [T::zero(); LANES];
        for l in 0..LANES {
            inv[l] = if len[l] > T::zero() {
                T::one() / len[l]
            } else {
                T::one()
            };
        }
        for xj in self.x.iter_mut() {
            for l in 0..LANES {
                xj[l] = xj[l] * inv[l] + spread;
            }
        }
        let len = self.lane_norms(false);
        for xj in self.x.iter_mut() {
            for l in 0..LANES {
                xj[l] /= len[l];
            }
        }
        let mut live = [true; LANES];
        for _ in 0..iters {
            if !live.iter().any(|&a| a) {
                break;
            }
            self.apply();
            let len = self.lane_norms(true);
            for l in 0..LANES {
                if !live[l] {
                    continue;
                }
                if !len[l].is_finite() {
                    out[l] = LaneNorm::Overflow;
                    live[l] = false;
                } else {
                    out[l] = LaneNorm::Norm(len[l]);
                    live[l] = len[l] > T::zero();
                }
            }
            // x = y/|y| on the live lanes; a finished lane's x is 0 from here on.
            let mut scale = [T::zero(); LANES];
            for l in 0..LANES {
                if live[l] {
                    scale[l] = T::one() / len[l];
                }
            }
            for (xj, yj) in self.x.iter_mut().zip(self.y.iter()) {
                for l in 0..LANES {
                    xj[l] = yj[l] * scale[l];
                }
            }
        }
        out
    }

    /// |x| (or |y|, `of_y`) of every lane; a lane whose sum of squares overflows is measured
    /// again rescaled (as the per-block norm is).
    #[inline(always)]
    fn lane_norms(&mut self, of_y: bool) -> [T; LANES] {
        let v = if of_y { &self.y } else { &self.x };
        let mut sq = [T::zero(); LANES];
        for vj in v.iter() {
            for l in 0..LANES {
                sq[l] += vj[l] * vj[l];
            }
        }
        let mut len = [T::zero(); LANES];
        for l in 0..LANES {
            len[l] = if sq[l].is_finite() {
                sq[l].sqrt()
            } else {
                for (dst, vj) in self.column.iter_mut().zip(v.iter()) {
                    *dst = vj[l];
                }
                norm2(&self.column)
            };
        }
        len
    }

    /// y = E x for every lane: y_top = −R_i x_top; y_{:k+r} += L (β2 R_old (Lᵀ x_{:k+r}));
    /// y += e (e·x).
    #[inline(always)]
    fn apply(&mut self) {
        let (k, kr) = (self.k, self.kr);
        let zero = [T::zero(); LANES];
        // Every product below sums into a register accumulator per output (a loop-carried
        // [T; LANES]), which keeps the compiler vectorizing across the lanes rather than across
        // the outputs (which would gather). R_i and R_old are symmetric, so row r of either is
        // its column r, contiguous here.
        // e·x over all k + r + 1 coordinates (ν the last).
        let mut ex = zero;
        for (ej, xj) in self.e.iter().zip(self.x.iter()) {
            for l in 0..LANES {
                ex[l] += ej[l] * xj[l];
            }
        }
        let x_last = self.x[kr];
        for l in 0..LANES {
            ex[l] += self.nu[l] * x_last[l];
        }
        // u = Lᵀ x_{:k+r}: column j of L against x.
        for (uj, column) in self.u.iter_mut().zip(self.lift_t.chunks_exact(kr)) {
            let mut acc = zero;
            for (&ljr, xr) in column.iter().zip(self.x.iter()) {
                for l in 0..LANES {
                    acc[l] += ljr * xr[l];
                }
            }
            *uj = acc;
        }
        // v = β2 R_old u (β2 already in r_old).
        for (vj, row) in self.v.iter_mut().zip(self.r_old.chunks_exact(k)) {
            let mut acc = zero;
            for (a, uc) in row.iter().zip(self.u.iter()) {
                for l in 0..LANES {
                    acc[l] += a[l] * uc[l];
                }
            }
            *vj = acc;
        }
        // y_top = −R_i x_top.
        for (yr, row) in self.y[..k].iter_mut().zip(self.r_new.chunks_exact(k)) {
            let mut acc = zero;
            for (a, xc) in row.iter().zip(self.x.iter()) {
                for l in 0..LANES {
                    acc[l] += a[l] * xc[l];
                }
            }
            for l in 0..LANES {
                yr[l] = -acc[l];
            }
        }
        for yr in self.y[k..].iter_mut() {
            *yr = zero;
        }
        // y_{:k+r} += L v + e (e·x); y_{k+r} += ν (e·x).
        for ((yr, er), row) in self.y[..kr]
            .iter_mut()
            .zip(self.e.iter())
            .zip(self.lift.chunks_exact(k))
        {
            let mut acc = zero;
            for (vj, &lrj) in self.v.iter().zip(row) {
                for l in 0..LANES {
                    acc[l] += lrj * vj[l];
                }
            }
            for l in 0..LANES {
                yr[l] = yr[l] + acc[l] + er[l] * ex[l];
            }
        }
        let y_last = &mut self.y[kr];
        for l in 0..LANES {
            y_last[l] += self.nu[l] * ex[l];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// E_i of one block as a dense (k + r + 1)² f64 matrix, from its definition.
    fn dense_residual(
        r_new: &Mat<f64>,
        r_old: &Mat<f64>,
        decay: f64,
        lift: Option<&Mat<f64>>,
        e: &[f64],
    ) -> Mat<f64> {
        let k = r_new.nrows();
        let n = e.len();
        let mut m = Mat::<f64>::zeros(n, n);
        for a in 0..n {
            for b in 0..n {
                m[(a, b)] = e[a] * e[b];
            }
        }
        for a in 0..k {
            for b in 0..k {
                m[(a, b)] -= r_new[(a, b)];
            }
        }
        if let Some(lift) = lift {
            let old = lift * (r_old * lift.transpose()) * decay;
            for a in 0..lift.nrows() {
                for b in 0..lift.nrows() {
                    m[(a, b)] += old[(a, b)];
                }
            }
        }
        m
    }

    fn spd(k: usize, rng: &mut ChaCha8Rng) -> Mat<f64> {
        let a = Mat::<f64>::from_fn(k, k, |_, _| rng.random::<f64>() - 0.5);
        &a * a.transpose()
    }

    /// The per-block iteration, in f64, as `RhoMode::PowerIteration` defines it.
    fn reference(m: &Mat<f64>, e: &[f64], iters: usize) -> f64 {
        let n = e.len();
        let en = e.iter().map(|v| v * v).sum::<f64>().sqrt();
        let en = if en > 0.0 { en } else { 1.0 };
        let spread = 1.0 / (n as f64).sqrt();
        let mut x: Vec<f64> = e.iter().map(|v| v / en + spread).collect();
        let xn = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        x.iter_mut().for_each(|v| *v /= xn);
        let mut est = 0.0;
        for _ in 0..iters {
            let y: Vec<f64> = (0..n)
                .map(|a| (0..n).map(|b| m[(a, b)] * x[b]).sum())
                .collect();
            let len = y.iter().map(|v| v * v).sum::<f64>().sqrt();
            est = len;
            if len <= 0.0 {
                break;
            }
            x = y.iter().map(|v| v / len).collect();
        }
        est
    }

    /// Eight blocks of random data (lane 5 empty, lane 6 with a zero residual start) against the
    /// f64 definition, in f64 (to 1e-12) and f32 (to 1e-4), with and without a previous basis,
    /// on both instruction sets (which must agree bit for bit).
    #[test]
    fn lanes_match_the_dense_residual_power_iteration() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (k, extra, iters, decay) = (6, 4, 10, 0.9);
        let kr = k + extra;
        let lift = Mat::<f64>::from_fn(kr, k, |_, _| rng.random::<f64>() - 0.5);
        for with_lift in [true, false] {
            let mut p64 = ResidualPack::<f64>::new(k, extra);
            let mut p32 = ResidualPack::<f32>::new(k, extra);
            let lift_f32 = Mat::<f32>::from_fn(kr, k, |r, c| lift[(r, c)] as f32);
            p64.set_lift(with_lift.then(|| lift.as_ref()));
            p32.set_lift(with_lift.then(|| lift_f32.as_ref()));
            let mut expect = [0.0f64; LANES];
            for lane in 0..LANES {
                if lane == 5 {
                    p64.clear(lane);
                    p32.clear(lane);
                    continue;
                }
                let r_new = spd(k, &mut rng);
                let r_old = spd(k, &mut rng);
                let mut e: Vec<f64> = (0..=kr).map(|_| rng.random::<f64>() - 0.5).collect();
                if lane == 6 {
                    e.iter_mut().for_each(|v| *v = 0.0);
                }
                let m = dense_residual(&r_new, &r_old, decay, with_lift.then_some(&lift), &e);
                expect[lane] = reference(&m, &e, iters);
                p64.load(
                    lane,
                    r_new.as_ref(),
                    Some(r_old.as_ref()),
                    decay,
                    e[..kr].iter().copied(),
                    e[kr],
                );
                let cast = |m: &Mat<f64>| Mat::<f32>::from_fn(k, k, |r, c| m[(r, c)] as f32);
                p32.load(
                    lane,
                    cast(&r_new).as_ref(),
                    Some(cast(&r_old).as_ref()),
                    decay as f32,
                    e[..kr].iter().map(|&v| v as f32),
                    e[kr] as f32,
                );
            }
            let got64 = p64.power_norms(iters, Isa::Detect);
            let got32 = p32.power_norms(iters, Isa::Detect);
            assert_eq!(got32, p32.power_norms(iters, Isa::Baseline));
            for lane in 0..LANES {
                let LaneNorm::Norm(a) = got64[lane] else {
                    panic!("lane {lane} overflowed")
                };
                let LaneNorm::Norm(b) = got32[lane] else {
                    panic!("lane {lane} overflowed in f32")
                };
                let want = expect[lane];
                if lane == 5 {
                    assert_eq!((a, b), (0.0, 0.0));
                    continue;
                }
                assert!(
                    want > 0.1,
                    "lane {lane}: a residual worth measuring ({want})"
                );
                assert!(
                    (a - want).abs() <= 1e-12 * want,
                    "lane {lane}: {a} vs {want}"
                );
                assert!(
                    (f64::from(b) - want).abs() <= 1e-4 * want,
                    "lane {lane}: {b} vs {want}"
                );
            }
        }
    }

    #[test]
    fn an_overflowing_lane_is_reported_and_the_others_are_not() {
        let (k, extra) = (2, 1);
        let mut pack = ResidualPack::<f32>::new(k, extra);
        pack.set_lift(None);
        let eye = Mat::<f32>::identity(k, k);
        let huge = Mat::<f32>::from_fn(k, k, |r, c| if r == c { 3e38 } else { 0.0 });
        for lane in 0..LANES {
            let r_new = if lane == 2 {
                huge.as_ref()
            } else {
                eye.as_ref()
            };
            pack.load(lane, r_new, Some(eye.as_ref()), 1.0, [0.0f32; 3], 0.0);
        }
        let got = pack.power_norms(3, Isa::Detect);
        for (lane, g) in got.iter().enumerate() {
            match lane {
                // |R x| with |x| = 1 and R = 3e38 I: finite (≈ 3e38), found by the rescaled norm.
                2 => assert!(matches!(g, LaneNorm::Norm(v) if (*v - 3e38).abs() < 1e33)),
                // E = −I ⊕ 0: δ = 1.
                _ => assert!(matches!(g, LaneNorm::Norm(v) if (*v - 1.0).abs() < 1e-6)),
            }
        }
        let inf = Mat::<f32>::from_fn(k, k, |r, c| if r == c { f32::INFINITY } else { 0.0 });
        pack.load(4, inf.as_ref(), Some(eye.as_ref()), 1.0, [0.0f32; 3], 0.0);
        let got = pack.power_norms(3, Isa::Detect);
        assert_eq!(got[4], LaneNorm::Overflow);
        assert!(matches!(got[3], LaneNorm::Norm(v) if (v - 1.0).abs() < 1e-6));
    }
}
