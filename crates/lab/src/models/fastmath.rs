//! Fast elementwise math for the autoencoder on burn's `flex` CPU backend.
//!
//! burn-flex evaluates `tanh` with libm's scalar `tanhf`, one element at a time on one thread,
//! and burn's autodiff evaluates it a second time in the backward pass to get 1 - tanh²; that is
//! about a fifth of a training step. [`tanh`] computes the value on the host with
//! [`tanh_slice`], a branch-free f32 kernel that LLVM auto-vectorizes (at opt-level ≥ 2: the
//! workspace builds this crate at opt-level 3 in both profiles; at opt-level 1 it runs as scalar
//! code, still about twice as fast as `tanhf`), split across threads for large tensors, and
//! keeps the gradient exact through autodiff with constants: `t + (x - x₀)·s`, where `x₀` is `x`
//! without autodiff (a constant), `t = tanh(x)` and `s = 1 - t²`. Its value is exactly `t`
//! (`x - x₀` is 0) and its derivative with respect to `x` is `s`, so the backward pass is a
//! single multiplication.
//!
//! [`sigmoid_cross_entropy_sum`] does the same for the loss (burn evaluates its `exp` and `log1p`
//! with scalar libm calls too, and differentiates through five elementwise ops): the value is
//! summed on the host, the gradient with respect to the logits is the constant σ(l) - y.
//!
//! # The tanh kernel
//!
//! For `a = |x|` (the sign is restored at the end with `copysign`, so odd symmetry is exact):
//!
//! - `a < 0.625`: `tanh(a) = a + a·z·P(z)`, `z = a²`, `P` of degree 4;
//! - otherwise `tanh(a) = 1 - 2/(e + 1)` with `e = exp(2a)` and `a` clamped to 9.5 (tanh rounds to
//!   1 in f32 from 9.01 on; the clamp sends ±∞ to ±1 and keeps NaN). `exp(y)` is computed by
//!   range reduction `y = n·ln 2 + r`, `|r| ≤ ln 2 / 2` (`n` rounded with the 1.5·2²³ trick, `ln 2`
//!   split into a 16-bit head and a tail so that `n·LN2_HI` is exact), `exp(r) = 1 + r + r²·Q(r)`
//!   with `Q` of degree 4, and the scaling by 2ⁿ done by building the float's exponent bits.
//!
//! Both branches are computed for every element and one is selected, so the loop has no branch
//! and no libm call.
//!
//! `P` and `Q` were fitted for this file (not taken from any library) with a short numpy +
//! mpmath script: Lawson's iteratively reweighted least squares (a discrete minimax fit) on 3000
//! Chebyshev-distributed points, references from mpmath at 40 digits; `P` fits
//! `(tanh(a)/a - 1)/a²` on `z ∈ [0, 0.625²]` weighted by `z·a/tanh(a)` (the relative error of
//! tanh), max weighted error 4.4e-9; `Q` fits `(eʳ - 1 - r)/r²` on `|r| ≤ 1.0001·ln 2/2` weighted
//! by `r²/eʳ` (the relative error of exp), max weighted error 3.1e-9. The coefficients are those
//! fits rounded to f32.
//!
//! Accuracy, measured exhaustively over every f32 in [0, 20] against f64 `tanh`: at most 1.33 ulp
//! (ulp = the smaller gap between the f32 neighbours of the exact value), 99.997% of inputs under
//! 1 ulp; the worst cases sit just above the branch point (the exp branch at tanh ≈ 0.56).
//! Beyond 20 the result is exactly ±1, the correctly rounded value.

use std::sync::OnceLock;

use burn::tensor::{DType, Tensor, TensorData};

/// Below this |x| the polynomial branch is used; above, the exp branch.
const CUTOFF: f32 = 0.625;
/// |x| is clamped here before the exp branch: tanh(9.5) rounds to 1 in f32.
const SATURATE: f32 = 9.5;
/// ln 2 rounded to 16 significant bits (0x3f31_7200): `n·LN2_HI` is exact for |n| < 2⁸.
const LN2_HI: f32 = 0.693_145_75;
/// ln 2 - LN2_HI, rounded to f32.
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2²³: adding and subtracting it rounds an f32 of magnitude < 2²² to the nearest integer,
/// whose value then sits in the low mantissa bits of the sum.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// P(z) ≈ (tanh(a)/a - 1)/a², z = a² ∈ [0, 0.625²].
const P0: f32 = -0.333_332_8;
const P1: f32 = 0.133_314_42;
const P2: f32 = -0.053_739_715;
const P3: f32 = 0.020_639_088;
const P4: f32 = -0.005_704_987;

/// Q(r) ≈ (eʳ - 1 - r)/r², |r| ≤ ln 2 / 2.
const Q0: f32 = 0.499_999_94;
const Q1: f32 = 0.166_665_21;
const Q2: f32 = 0.041_668_39;
const Q3: f32 = 0.008_368_717;
const Q4: f32 = 0.001_381_459_9;

/// eʸ for y ∈ [-87, 88] (2ⁿ stays a normal float), branch-free, within about 1 ulp; NaN → NaN.
/// Callers clamp y (no check here, to keep the loop free of branches).
#[inline(always)]
fn exp_f32(y: f32) -> f32 {
    let k = y * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n_float = k - ROUND_MAGIC;
    let n = (k.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = (y - n_float * LN2_HI) - n_float * LN2_LO;
    let exp_r = 1.0 + (r + r * r * (Q0 + r * (Q1 + r * (Q2 + r * (Q3 + r * Q4)))));
    let two_to_n = f32::from_bits((n.wrapping_add(127) as u32) << 23);
    exp_r * two_to_n
}

/// tanh of one f32, branch-free (see the module documentation).
#[inline(always)]
fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    // Written as a comparison so that NaN stays NaN (`f32::min` would return 9.5).
    let a_clamped = if a > SATURATE { SATURATE } else { a };

    let z = a_clamped * a_clamped;
    let small = a_clamped + a_clamped * z * (P0 + z * (P1 + z * (P2 + z * (P3 + z * P4))));

    let e = exp_f32(a_clamped + a_clamped);
    let large = 1.0 - 2.0 / (e + 1.0);

    let t = if a < CUTOFF { small } else { large };
    t.copysign(x)
}

/// tanh in place, to within 1.33 ulp of the exact value (see the module documentation);
/// ±∞ → ±1, NaN → NaN, tanh(-x) = -tanh(x) exactly. Single-threaded; vectorized by LLVM.
pub fn tanh_slice(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v = tanh_f32(*v);
    }
}

/// `values ← tanh(values)` and `slope ← 1 - tanh²` (as (1 - t)(1 + t), which keeps the
/// relative accuracy of small slopes), for slices of equal length.
fn tanh_and_slope(values: &mut [f32], slope: &mut [f32]) {
    debug_assert_eq!(values.len(), slope.len());
    for (v, s) in values.iter_mut().zip(slope.iter_mut()) {
        let t = tanh_f32(*v);
        *v = t;
        *s = (1.0 - t) * (1.0 + t);
    }
}

/// Elements per extra thread below which splitting costs more than it saves (spawning a
/// thread is tens of µs; the kernel does about 1e6 elements per ms per core).
const MIN_PER_THREAD: usize = 1 << 16;

fn max_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `f` over matching chunks of `a` and `b` (`b` empty: `f` gets empty slices), on scoped
/// threads when `a` is large. (std threads: the lab crate does not depend on rayon.)
fn parallel_pairs<F>(a: &mut [f32], b: &mut [f32], f: F)
where
    F: Fn(&mut [f32], &mut [f32]) + Sync,
{
    let n = a.len();
    debug_assert!(b.is_empty() || b.len() == n);
    let threads = max_threads().min(n / MIN_PER_THREAD).max(1);
    if threads == 1 {
        f(a, b);
        return;
    }
    let chunk = n.div_ceil(threads);
    let with_b = !b.is_empty();
    let f = &f;
    std::thread::scope(|scope| {
        let mut b_chunks = b.chunks_mut(chunk);
        let mut jobs = a.chunks_mut(chunk).map(|a| {
            let b: &mut [f32] = if with_b {
                b_chunks.next().expect("equal lengths")
            } else {
                &mut []
            };
            (a, b)
        });
        let (first_a, first_b) = jobs.next().expect("n > 0");
        for (a, b) in jobs {
            scope.spawn(move || f(a, b));
        }
        f(first_a, first_b);
    });
}

/// `tanh_and_slope` over `values` and `slope`, or `tanh_slice` over `values` when `slope` is
/// empty, split across threads when large.
fn tanh_parallel(values: &mut [f32], slope: &mut [f32]) {
    if slope.is_empty() {
        parallel_pairs(values, slope, |v, _| tanh_slice(v));
    } else {
        parallel_pairs(values, slope, tanh_and_slope);
    }
}

/// tanh of a float tensor, a drop-in for `x.tanh()`: same shape, device and dtype.
///
/// f32 tensors use [`tanh_slice`] on the host (≤ 1.33 ulp); other dtypes fall back to burn's
/// `tanh`. On a tensor tracked by autodiff the result is `t + (x - x₀)·s` with `x₀` = `x`
/// without autodiff, `t` and `s = 1 - t²` constants: the value is exactly `t` and the gradient
/// is the upstream gradient times `s`, as burn's own. (Not `x.detach()`: detaching a leaf that
/// requires grad makes another leaf that requires grad, which would get a gradient of its own.)
/// Where `x` is ±∞ or NaN the tracked result is NaN (∞ - ∞), as only a diverged model sees.
pub fn tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() != DType::F32 {
        return x.tanh();
    }
    let device = x.device();
    let tracked = x.is_tracked();
    let mut data = x.to_data();
    let shape = data.shape().clone();
    let values = data
        .as_mut_slice::<f32>()
        .expect("an F32 tensor reads back as f32");
    if !tracked {
        tanh_parallel(values, &mut []);
        return Tensor::from_data(data, (&device, DType::F32));
    }
    let mut slope = vec![0.0f32; values.len()];
    tanh_parallel(values, &mut slope);
    let x0 = x.clone().without_autodiff();
    let constants = x0.device();
    let t = Tensor::<D>::from_data(data, (&constants, DType::F32));
    let s = Tensor::<D>::from_data(TensorData::new(slope, shape), (&constants, DType::F32));
    (x - x0) * s + t
}

/// R(w) ≈ (atanh(s)/s - 1)/s², w = s² ∈ [0, 1/9], for log1p(e) = 2·atanh(e/(2 + e)), e ∈ (0, 1].
/// Fitted like `P` and `Q` (Lawson, mpmath references, weight w·s/atanh(s), the relative error
/// of log1p): max weighted error 4.5e-9.
const R0: f32 = 0.333_332_1;
const R1: f32 = 0.200_107_66;
const R2: f32 = 0.140_008_39;
const R3: f32 = 0.140_063_33;

/// |logit| is clamped here before exp(-|logit|), which then stays a normal float (e⁻⁸⁷ ≈ 1.6e-38);
/// the log1p term it feeds is below 1e-37 there, far under the f32 resolution of the loss.
const LOGIT_CLAMP: f32 = 87.0;

/// Per element, in place: `logits[i] ← max(l, 0) - l·y + log1p(exp(-|l|))` (the loss, in the
/// order burn's formula adds it, in f32) and `targets[i] ← σ(l) - y` (its derivative in `l`).
/// Branch-free; log1p(e) = 2·atanh(s) with s = e/(2 + e) exact in form (no cancellation for
/// small e), σ(l) = 1/(1 + e) for l ≥ 0 and e/(1 + e) otherwise (e = exp(-|l|)).
fn sigmoid_cross_entropy_chunk(logits: &mut [f32], targets: &mut [f32]) {
    debug_assert_eq!(logits.len(), targets.len());
    for (l_slot, y_slot) in logits.iter_mut().zip(targets.iter_mut()) {
        let (l, y) = (*l_slot, *y_slot);
        let a = l.abs();
        let a_clamped = if a > LOGIT_CLAMP { LOGIT_CLAMP } else { a };
        let e = exp_f32(-a_clamped);
        let s = e / (2.0 + e);
        let w = s * s;
        let softplus = (s + s) + (s + s) * w * (R0 + w * (R1 + w * (R2 + w * R3)));
        let relu = if l > 0.0 { l } else { 0.0 };
        *l_slot = relu - l * y + softplus;
        let inv = 1.0 / (1.0 + e);
        let sigmoid = if l >= 0.0 { inv } else { e * inv };
        *y_slot = sigmoid - y;
    }
}

/// Sum in f64 over 8 interleaved accumulators (vectorizable; independent of thread counts, so
/// the loss is the same on every machine).
fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// burn's formula for the summed sigmoid cross-entropy with logits: the fallback of
/// [`sigmoid_cross_entropy_sum`], and its reference in tests.
fn sigmoid_cross_entropy_sum_burn(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let stable = logits.clone().abs().neg().exp().log1p();
    (logits.clone().clamp_min(0.0) - logits * targets + stable).sum()
}

/// Sigmoid cross-entropy with logits summed over all elements, max(l, 0) - l·y + ln(1 + e^{-|l|}),
/// as a one-element tensor: the value is computed on the host (per element in f32 with
/// [`sigmoid_cross_entropy_chunk`], summed in f64), the gradient with respect to the logits is
/// σ(l) - y through the constant trick of [`tanh`]: `c + sum((l - l₀)·g)`. The targets are
/// treated as constants; when they are tracked by autodiff, when the dtypes are not f32 or the
/// shapes differ, burn's formula is used instead.
pub fn sigmoid_cross_entropy_sum(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    if logits.dtype() != DType::F32
        || targets.dtype() != DType::F32
        || logits.dims() != targets.dims()
        || targets.is_tracked()
    {
        return sigmoid_cross_entropy_sum_burn(logits, targets);
    }
    let device = logits.device();
    let tracked = logits.is_tracked();
    let mut values = logits.to_data();
    let mut grad = targets.into_data();
    let v = values
        .as_mut_slice::<f32>()
        .expect("an F32 tensor reads back as f32");
    let g = grad
        .as_mut_slice::<f32>()
        .expect("an F32 tensor reads back as f32");
    parallel_pairs(v, g, sigmoid_cross_entropy_chunk);
    let total = TensorData::new(vec![sum_f64(v) as f32], [1]);
    if !tracked {
        return Tensor::from_data(total, (&device, DType::F32));
    }
    let l0 = logits.clone().without_autodiff();
    let constants = l0.device();
    let c = Tensor::<1>::from_data(total, (&constants, DType::F32));
    let g = Tensor::<2>::from_data(grad, (&constants, DType::F32));
    ((logits - l0) * g).sum() + c
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The smaller gap between the f32 neighbours of `exact` (rounded to f32), in f64: the unit
    /// in which errors are measured (conservative at powers of two, where the gap below is the
    /// smaller one).
    fn ulp(exact: f64) -> f64 {
        let f = (exact.abs() as f32).max(f32::from_bits(1));
        let b = f.to_bits();
        let up = f64::from(f32::from_bits(b + 1)) - f64::from(f);
        let down = f64::from(f) - f64::from(f32::from_bits(b - 1));
        up.min(down)
    }

    /// Max error of `tanh_slice` over `xs`, in ulp of the f64 reference, with its argument.
    fn max_ulp_error(xs: &[f32]) -> (f64, f32) {
        let mut out = xs.to_vec();
        tanh_slice(&mut out);
        let mut worst = (0.0, 0.0);
        for (&x, &t) in xs.iter().zip(&out) {
            let exact = f64::from(x).tanh();
            let err = (f64::from(t) - exact).abs() / ulp(exact);
            if err > worst.0 {
                worst = (err, x);
            }
        }
        worst
    }

    #[test]
    fn tanh_slice_is_within_1_5_ulp_on_a_dense_grid() {
        // 2²² evenly spaced points over [-20, 20] (spacing 1e-5: every region of both branches
        // and the branch point), and every 199th f32 from the smallest subnormal to 20 with
        // both signs (5.5 million values, all binades). The exhaustive maximum is 1.33 ulp (see
        // the module documentation); 1.5 leaves a margin for nothing else: an error in a
        // coefficient or in the range reduction costs many ulp.
        let n = 1 << 22;
        let uniform: Vec<f32> = (0..=n)
            .map(|i| (-20.0 + 40.0 * i as f64 / n as f64) as f32)
            .collect();
        let (worst, at) = max_ulp_error(&uniform);
        assert!(worst <= 1.5, "{worst} ulp at {at}");
        assert!(worst > 0.5, "the grid reaches the rounding error: {worst}");

        let end = 20f32.to_bits();
        let strided: Vec<f32> = (1..end)
            .step_by(199)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .collect();
        let (worst, at) = max_ulp_error(&strided);
        assert!(worst <= 1.5, "{worst} ulp at {at}");
    }

    #[test]
    fn tanh_slice_is_odd_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let xs: Vec<f32> = (0..100_000)
            .map(|_| rng.random_range(0.0f32..12.0))
            .collect();
        let mut pos = xs.clone();
        let mut neg: Vec<f32> = xs.iter().map(|x| -x).collect();
        tanh_slice(&mut pos);
        tanh_slice(&mut neg);
        for ((x, p), m) in xs.iter().zip(&pos).zip(&neg) {
            assert_eq!(p.to_bits(), (-m).to_bits(), "x = {x}");
        }
    }

    #[test]
    fn tanh_slice_special_values() {
        let tiny = f32::from_bits(1); // smallest subnormal
        let sub = f32::from_bits(0x0012_3456); // a mid-range subnormal
                                               // tanh(9) = 1 - 3.05e-8 rounds to 1 - 2⁻²⁴; tanh(10) = 1 - 4.1e-9 rounds to 1.
        let below_one = 1.0 - f32::EPSILON / 2.0;
        let cases = [
            (0.0f32, 0.0f32),
            (1e-30, 1e-30),
            (tiny, tiny),
            (sub, sub),
            (9.0, below_one),
            (10.0, 1.0),
            (20.0, 1.0),
            (1e30, 1.0),
            (f32::MAX, 1.0),
            (f32::INFINITY, 1.0),
        ];
        for (x, expected) in cases {
            let mut v = [x, -x];
            tanh_slice(&mut v);
            assert_eq!(
                v[0].to_bits(),
                expected.to_bits(),
                "tanh({x:e}) = {:e}",
                v[0]
            );
            assert_eq!(
                v[1].to_bits(),
                (-expected).to_bits(),
                "tanh({:e}) = {:e}",
                -x,
                v[1]
            );
        }
        let mut v = [f32::NAN, -f32::NAN];
        tanh_slice(&mut v);
        assert!(v[0].is_nan() && v[1].is_nan(), "{v:?}");
    }

    fn random_data(rows: usize, cols: usize, range: f32, seed: u64) -> TensorData {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-range..range))
            .collect();
        TensorData::new(v, [rows, cols])
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().expect("f32 data")
    }

    /// |a - b| ≤ rel·|b| + abs elementwise, with a message naming the worst element.
    fn assert_close(got: &[f32], want: &[f32], rel: f32, abs: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs() + abs,
                "{what}[{i}]: {g:e} vs {w:e}"
            );
        }
    }

    #[test]
    fn tanh_tensor_matches_burn_without_autodiff() {
        let device = Device::flex();
        let x = Tensor::<2>::from_data(random_data(37, 53, 6.0, 1), &device);
        let ours = tanh(x.clone());
        assert_eq!(ours.dims(), [37, 53]);
        assert_eq!(ours.dtype(), DType::F32);
        assert!(!ours.is_autodiff());
        // burn uses libm's tanhf (< 1 ulp), ours ≤ 1.33 ulp: together < 2.5 ulp ≤ 3e-7 relative.
        assert_close(&values(ours), &values(x.tanh()), 3e-7, 0.0, "tanh");

        let special = Tensor::<1>::from_data(
            [f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 30.0, -30.0],
            &device,
        );
        let got = values(tanh(special));
        assert_eq!(got, [1.0, -1.0, 0.0, -0.0, 1.0, -1.0]);
        assert!(got[3].is_sign_negative());
    }

    /// (x, w) → gradient of sum(w ⊙ f(x)) with respect to x, on the autodiff device.
    fn weighted_grad(f: fn(Tensor<2>) -> Tensor<2>, x: &TensorData, w: &TensorData) -> Vec<f32> {
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::from_data(x.clone(), &device).require_grad();
        let w = Tensor::<2>::from_data(w.clone(), &device);
        let y = f(x.clone());
        assert!(y.is_tracked());
        let grads = (y * w).sum().backward();
        values(x.grad(&grads).expect("x requires grad"))
    }

    #[test]
    fn tanh_gradient_matches_burn_and_the_derivative() {
        let xd = random_data(37, 53, 4.0, 2);
        let wd = random_data(37, 53, 2.0, 3);
        let ours = weighted_grad(tanh, &xd, &wd);
        let burns = weighted_grad(|x| x.tanh(), &xd, &wd);
        // Independent reference: w·(1 - tanh(x)²) in f64.
        let xs = xd.try_to_vec::<f32>().unwrap();
        let ws = wd.try_to_vec::<f32>().unwrap();
        let reference: Vec<f32> = xs
            .iter()
            .zip(&ws)
            .map(|(&x, &w)| (f64::from(w) * (1.0 - f64::from(x).tanh().powi(2))) as f32)
            .collect();
        // 1 - t² carries the error of t (≤ 2.5 ulp of t, i.e. ≤ 2.4e-7 absolute after the factor
        // 2t) plus burn's rounding of t² (6e-8): 4e-7·|w| absolute, |w| < 2.
        assert_close(&ours, &reference, 1e-6, 8e-7, "ours vs f64");
        assert_close(&burns, &reference, 1e-6, 8e-7, "burn vs f64");
        assert_close(&ours, &burns, 1e-6, 8e-7, "ours vs burn");

        // The forward value through autodiff is exactly tanh_slice's.
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::from_data(xd.clone(), &device).require_grad();
        let mut expected = xs.clone();
        tanh_slice(&mut expected);
        assert_eq!(values(tanh(x)), expected);
    }

    #[test]
    fn tanh_gradient_flows_back_through_a_matmul() {
        // loss = sum(w ⊙ tanh(a·b)), a (37, 20), b (20, 53): dL/dh = w ⊙ (1 - tanh(h)²),
        // dL/da = G·bᵀ, dL/db = aᵀ·G.
        let (m, k, n) = (37, 20, 53);
        let ad = random_data(m, k, 1.0, 4);
        let bd = random_data(k, n, 1.0, 5);
        let wd = random_data(m, n, 1.0, 6);
        let run = |f: fn(Tensor<2>) -> Tensor<2>| {
            let device = Device::flex().autodiff();
            let a = Tensor::<2>::from_data(ad.clone(), &device).require_grad();
            let b = Tensor::<2>::from_data(bd.clone(), &device).require_grad();
            let w = Tensor::<2>::from_data(wd.clone(), &device);
            let grads = (f(a.clone().matmul(b.clone())) * w).sum().backward();
            (
                values(a.grad(&grads).unwrap()),
                values(b.grad(&grads).unwrap()),
            )
        };
        let (ga, gb) = run(tanh);
        let (ga_burn, gb_burn) = run(|h| h.tanh());

        let a = ad.try_to_vec::<f32>().unwrap();
        let b = bd.try_to_vec::<f32>().unwrap();
        let w = wd.try_to_vec::<f32>().unwrap();
        let mut g = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let h: f64 = (0..k)
                    .map(|l| f64::from(a[i * k + l]) * f64::from(b[l * n + j]))
                    .sum();
                g[i * n + j] = f64::from(w[i * n + j]) * (1.0 - h.tanh().powi(2));
            }
        }
        let ga_ref: Vec<f32> = (0..m * k)
            .map(|ik| {
                let (i, l) = (ik / k, ik % k);
                (0..n)
                    .map(|j| g[i * n + j] * f64::from(b[l * n + j]))
                    .sum::<f64>() as f32
            })
            .collect();
        let gb_ref: Vec<f32> = (0..k * n)
            .map(|lj| {
                let (l, j) = (lj / n, lj % n);
                (0..m)
                    .map(|i| f64::from(a[i * k + l]) * g[i * n + j])
                    .sum::<f64>() as f32
            })
            .collect();
        // Sums of 53 (resp. 37) terms of size ≤ 1 with f32 products: 2e-6 absolute is about
        // 20 roundings' worth.
        assert_close(&ga, &ga_ref, 1e-5, 2e-6, "da ours");
        assert_close(&gb, &gb_ref, 1e-5, 2e-6, "db ours");
        assert_close(&ga_burn, &ga_ref, 1e-5, 2e-6, "da burn");
        assert_close(&gb_burn, &gb_ref, 1e-5, 2e-6, "db burn");
        assert_close(&ga, &ga_burn, 1e-5, 2e-6, "da ours vs burn");
        assert_close(&gb, &gb_burn, 1e-5, 2e-6, "db ours vs burn");
    }

    #[test]
    fn large_tensors_split_across_threads_agree_with_the_serial_kernel() {
        // 3·MIN_PER_THREAD + 5 elements: several uneven chunks where threads are available.
        let n = 3 * MIN_PER_THREAD + 5;
        let data = random_data(1, n, 10.0, 7);
        let mut expected = data.try_to_vec::<f32>().unwrap();
        tanh_slice(&mut expected);
        let device = Device::flex();
        assert_eq!(
            values(tanh(Tensor::<2>::from_data(data.clone(), &device))),
            expected
        );

        let mut v = data.try_to_vec::<f32>().unwrap();
        let mut s = vec![0f32; n];
        tanh_parallel(&mut v, &mut s);
        assert_eq!(v, expected);
        for (t, s) in expected.iter().zip(&s) {
            assert_eq!(*s, (1.0 - t) * (1.0 + t));
        }
    }

    /// (logits, targets) like the autoencoder's: logits over [-range, range] with a few
    /// saturated ones, targets with exact 0s and 1s (background and ink) and grey values.
    fn loss_data(rows: usize, cols: usize, range: f32, seed: u64) -> (TensorData, TensorData) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = rows * cols;
        let l: Vec<f32> = (0..n)
            .map(|i| {
                if i % 97 == 0 {
                    rng.random_range(-120.0f32..120.0)
                } else {
                    rng.random_range(-range..range)
                }
            })
            .collect();
        let y: Vec<f32> = (0..n)
            .map(|_| match rng.random_range(0..4) {
                0 | 1 => 0.0,
                2 => 1.0,
                _ => rng.random_range(0.0f32..1.0),
            })
            .collect();
        (
            TensorData::new(l, [rows, cols]),
            TensorData::new(y, [rows, cols]),
        )
    }

    /// f64 reference: (sum of the losses, σ(l) - y per element).
    fn loss_reference(l: &TensorData, y: &TensorData) -> (f64, Vec<f32>) {
        let l = l.try_to_vec::<f32>().unwrap();
        let y = y.try_to_vec::<f32>().unwrap();
        let mut sum = 0.0;
        let mut grad = Vec::with_capacity(l.len());
        for (&l, &y) in l.iter().zip(&y) {
            let (l, y) = (f64::from(l), f64::from(y));
            sum += l.max(0.0) - l * y + (-l.abs()).exp().ln_1p();
            grad.push((1.0 / (1.0 + (-l).exp()) - y) as f32);
        }
        (sum, grad)
    }

    /// (loss, gradient in the logits) of `f` on the autodiff device.
    fn loss_and_grad(
        f: fn(Tensor<2>, Tensor<2>) -> Tensor<1>,
        l: &TensorData,
        y: &TensorData,
    ) -> (f32, Vec<f32>) {
        let device = Device::flex().autodiff();
        let logits = Tensor::<2>::from_data(l.clone(), &device).require_grad();
        let targets = Tensor::<2>::from_data(y.clone(), &device);
        let loss = f(logits.clone(), targets);
        let grads = loss.backward();
        let grad = values(logits.grad(&grads).expect("logits require grad"));
        (loss.into_scalar::<f32>(), grad)
    }

    #[test]
    fn loss_value_and_gradient_match_burn_and_f64() {
        let (l, y) = loss_data(64, 784, 12.0, 9);
        let (reference, grad_ref) = loss_reference(&l, &y);
        let (ours, grad) = loss_and_grad(sigmoid_cross_entropy_sum, &l, &y);
        let (burns, grad_burn) = loss_and_grad(sigmoid_cross_entropy_sum_burn, &l, &y);
        let rel = |a: f32, b: f64| ((f64::from(a) - b) / b).abs();
        // Ours: per-element f32 (a few ulp), summed in f64: ~1e-7 of the f64 reference.
        assert!(rel(ours, reference) < 2e-7, "{ours} vs {reference}");
        // The formula it replaces, summed in f32 by burn: within 1e-6 of each other.
        assert!(rel(ours, f64::from(burns)) < 1e-6, "{ours} vs burn {burns}");
        assert!(rel(burns, reference) < 1e-6, "burn {burns} vs {reference}");
        // σ(l) - y: a few ulp of σ ≤ 1; burn's chain (exp, log1p, abs, clamp) rounds more.
        assert_close(&grad, &grad_ref, 0.0, 3e-7, "grad ours vs f64");
        assert_close(&grad_burn, &grad_ref, 0.0, 3e-7, "grad burn vs f64");

        // Without autodiff: the same value.
        let device = Device::flex();
        let plain = sigmoid_cross_entropy_sum(
            Tensor::<2>::from_data(l.clone(), &device),
            Tensor::<2>::from_data(y.clone(), &device),
        );
        assert!(!plain.is_autodiff());
        assert_eq!(plain.into_scalar::<f32>(), ours);
    }

    #[test]
    fn loss_kernel_extremes() {
        // (l, y) → (loss, σ(l) - y), references in f64.
        let cases: [(f32, f32); 10] = [
            (0.0, 0.5),
            (0.0, 0.0),
            (1000.0, 0.0),
            (-1000.0, 0.0),
            (1000.0, 1.0),
            (-1000.0, 1.0),
            (87.5, 0.25),
            (-87.5, 0.25),
            (1e-30, 1.0),
            (-30.0, 0.0),
        ];
        let mut l: Vec<f32> = cases.iter().map(|c| c.0).collect();
        let mut y: Vec<f32> = cases.iter().map(|c| c.1).collect();
        sigmoid_cross_entropy_chunk(&mut l, &mut y);
        for (i, &(x, t)) in cases.iter().enumerate() {
            let (xd, td) = (f64::from(x), f64::from(t));
            let loss = xd.max(0.0) - xd * td + (-xd.abs()).exp().ln_1p();
            let grad = 1.0 / (1.0 + (-xd).exp()) - td;
            let tol = 3e-7 * loss.abs().max(1e-30);
            assert!(
                (f64::from(l[i]) - loss).abs() <= tol,
                "loss({x}, {t}) = {} vs {loss}",
                l[i]
            );
            assert!(
                (f64::from(y[i]) - grad).abs() <= 3e-7 * grad.abs().max(1e-30),
                "grad({x}, {t}) = {} vs {grad}",
                y[i]
            );
        }
        let mut l = [f32::NAN];
        let mut y = [0.5f32];
        sigmoid_cross_entropy_chunk(&mut l, &mut y);
        assert!(l[0].is_nan() && y[0].is_nan(), "{l:?} {y:?}");
    }

    #[test]
    fn loss_falls_back_to_burn_when_targets_are_tracked() {
        let (l, y) = loss_data(5, 7, 4.0, 10);
        let device = Device::flex().autodiff();
        let run = |f: fn(Tensor<2>, Tensor<2>) -> Tensor<1>| {
            let logits = Tensor::<2>::from_data(l.clone(), &device).require_grad();
            let targets = Tensor::<2>::from_data(y.clone(), &device).require_grad();
            let grads = f(logits.clone(), targets.clone()).backward();
            (
                values(logits.grad(&grads).unwrap()),
                values(targets.grad(&grads).unwrap()),
            )
        };
        let (gl, gy) = run(sigmoid_cross_entropy_sum);
        let (gl_burn, gy_burn) = run(sigmoid_cross_entropy_sum_burn);
        assert_eq!(gl, gl_burn);
        assert_eq!(gy, gy_burn);
        // d/dy = -l.
        let minus_l: Vec<f32> = l.try_to_vec::<f32>().unwrap().iter().map(|v| -v).collect();
        assert_eq!(gy, minus_l);
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    #[test]
    #[ignore = "timing: run with --ignored --nocapture, preferably in release"]
    fn tanh_forward_backward_timing() {
        let device = Device::flex().autodiff();
        let data = random_data(1000, 1000, 3.0, 8);
        let reps = 15;
        let time = |f: fn(Tensor<2>) -> Tensor<2>| {
            let x = Tensor::<2>::from_data(data.clone(), &device).require_grad();
            let start = std::time::Instant::now();
            let grads = f(x.clone()).sum().backward();
            let g = x.grad(&grads).unwrap();
            let _ = g.into_data();
            start.elapsed().as_secs_f64()
        };
        let (mut burn_s, mut ours_s) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            burn_s.push(time(|x| x.tanh()));
            ours_s.push(time(tanh));
        }
        let (b, o) = (median(burn_s), median(ours_s));
        println!(
            "tanh forward+backward on (1000, 1000), median of {reps}: burn {:.2} ms, fastmath {:.2} ms ({:.1}x)",
            b * 1e3,
            o * 1e3,
            b / o
        );
    }

    #[test]
    #[ignore = "timing: run with --ignored --nocapture, preferably in release"]
    fn loss_forward_backward_timing() {
        let device = Device::flex().autodiff();
        let (l, y) = loss_data(1000, 784, 12.0, 12);
        let targets = Tensor::<2>::from_data(y, &device);
        let reps = 15;
        let time = |f: fn(Tensor<2>, Tensor<2>) -> Tensor<1>| {
            let logits = Tensor::<2>::from_data(l.clone(), &device).require_grad();
            let start = std::time::Instant::now();
            let loss = f(logits.clone(), targets.clone());
            let grads = loss.backward();
            let _ = loss.into_scalar::<f32>();
            let _ = logits.grad(&grads).unwrap().into_data();
            start.elapsed().as_secs_f64()
        };
        let (mut burn_s, mut ours_s) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            burn_s.push(time(sigmoid_cross_entropy_sum_burn));
            ours_s.push(time(sigmoid_cross_entropy_sum));
        }
        let (b, o) = (median(burn_s), median(ours_s));
        println!(
            "loss forward+backward on (1000, 784), median of {reps}: burn {:.2} ms, fastmath {:.2} ms ({:.1}x)",
            b * 1e3,
            o * 1e3,
            b / o
        );
    }

    #[test]
    #[ignore = "timing: run with --ignored --nocapture, preferably in release"]
    fn autoencoder_forward_backward_timing() {
        use crate::models::autoencoder::{Autoencoder, CODE_LAYER, WIDTHS};
        let device = Device::flex().autodiff();
        let model = Autoencoder::new(0, &device);
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let pixels: Vec<f32> = (0..1000 * WIDTHS[0])
            .map(|_| rng.random_range(0.0f32..1.0))
            .collect();
        let batch = Tensor::<2>::from_data(TensorData::new(pixels, [1000, WIDTHS[0]]), &device);
        let last = model.layers.len() - 1;
        let burn_forward = |input: Tensor<2>| {
            let mut x = input;
            for (i, layer) in model.layers.iter().enumerate() {
                x = layer.forward(x);
                if i != last && i != CODE_LAYER {
                    x = x.tanh();
                }
            }
            sigmoid_cross_entropy_sum_burn(x, batch.clone())
        };
        let ours_forward =
            |input: Tensor<2>| sigmoid_cross_entropy_sum(model.forward(input), batch.clone());
        let time = |f: &dyn Fn(Tensor<2>) -> Tensor<1>| {
            let start = std::time::Instant::now();
            let loss = f(batch.clone());
            let grads = loss.backward();
            let value = loss.into_scalar::<f32>();
            let g = model.layers[0].weight.grad(&grads).unwrap().into_data();
            (start.elapsed().as_secs_f64(), value, g)
        };
        let reps = 7;
        let (mut burn_s, mut ours_s) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let (tb, lb, gb) = time(&burn_forward);
            let (to, lo, go) = time(&ours_forward);
            assert!((lb - lo).abs() <= 1e-6 * lb.abs(), "{lb} vs {lo}");
            let (gb, go) = (
                gb.try_into_vec::<f32>().unwrap(),
                go.try_into_vec::<f32>().unwrap(),
            );
            let scale = gb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(&go, &gb, 0.0, 1e-4 * scale, "first-layer weight gradient");
            burn_s.push(tb);
            ours_s.push(to);
        }
        let (b, o) = (median(burn_s), median(ours_s));
        println!(
            "autoencoder forward+backward, batch 1000, median of {reps}: burn ops {:.1} ms, fastmath {:.1} ms ({:.2}x)",
            b * 1e3,
            o * 1e3,
            b / o
        );
    }
}
