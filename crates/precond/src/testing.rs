//! Test-only f64 oracles shared by the methods' tests: an eigensolver independent of faer's
//! (cyclic Jacobi rotations) and small dense helpers.

use crate::scalar::Scalar;
use faer::{Mat, MatRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Aᵀ as a new matrix.
pub fn transpose(a: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(a.ncols(), a.nrows(), |i, j| a[(j, i)])
}

/// Eigenvalues (descending) and eigenvectors of a symmetric matrix by cyclic Jacobi
/// rotations (independent of faer's eigensolver).
pub fn jacobi_eig(a: &Mat<f64>) -> (Vec<f64>, Mat<f64>) {
    let n = a.nrows();
    let mut a = Mat::from_fn(n, n, |i, j| 0.5 * (a[(i, j)] + a[(j, i)]));
    let mut v = Mat::<f64>::from_fn(n, n, |i, j| if i == j { 1.0 } else { 0.0 });
    let total: f64 = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| a[(i, j)] * a[(i, j)])
        .sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .filter(|&(i, j)| i != j)
            .map(|(i, j)| a[(i, j)] * a[(i, j)])
            .sum();
        if off <= 1e-32 * total {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = a[(p, q)];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[(q, q)] - a[(p, p)]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[(k, p)], a[(k, q)]);
                    a[(k, p)] = c * akp - s * akq;
                    a[(k, q)] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[(p, k)], a[(q, k)]);
                    a[(p, k)] = c * apk - s * aqk;
                    a[(q, k)] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[(k, p)], v[(k, q)]);
                    v[(k, p)] = c * vkp - s * vkq;
                    v[(k, q)] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[(y, y)].total_cmp(&a[(x, x)]));
    let vals = order.iter().map(|&i| a[(i, i)]).collect();
    let vecs = Mat::from_fn(n, n, |i, j| v[(i, order[j])]);
    (vals, vecs)
}

/// [`jacobi_eig`] on nested rows `a[r][c]`: eigenvalues (descending) and eigenvectors as
/// columns, `vecs[r][k]`.
pub fn jacobi_eigen_rows(a: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let (values, vectors) = jacobi_eig(&Mat::from_fn(n, n, |i, j| a[i][j]));
    let rows = (0..n)
        .map(|r| (0..n).map(|k| vectors[(r, k)]).collect())
        .collect();
    (values, rows)
}

/// Seeded (b, m) gradients with a per-step scale 10^{U(−decades, decades)}, rounded to `T`
/// so that the f64 oracle sees exactly the gradients the method sees.
pub fn gradients<T: Scalar>(
    b: usize,
    m: usize,
    steps: usize,
    decades: f64,
    seed: u64,
) -> Vec<Mat<T>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..steps)
        .map(|_| {
            let scale = 10f64.powf(rng.random_range(-decades..=decades));
            Mat::from_fn(b, m, |_, _| {
                let z: f64 = StandardNormal.sample(&mut rng);
                T::of(scale * z)
            })
        })
        .collect()
}

pub fn to_f64<T: Scalar>(a: MatRef<'_, T>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)].f64())
}

/// Naive product (independent of faer's GEMM).
pub fn mul(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    assert_eq!(a.ncols(), b.nrows());
    Mat::from_fn(a.nrows(), b.ncols(), |i, j| {
        (0..a.ncols()).map(|k| a[(i, k)] * b[(k, j)]).sum()
    })
}

/// (S + εI)^{−1/4} with eigenvalues clamped at 0, by Jacobi in f64.
pub fn oracle_root(s: &Mat<f64>, eps: f64) -> Mat<f64> {
    let (vals, vecs) = jacobi_eig(s);
    let n = s.nrows();
    let scaled = Mat::from_fn(n, n, |i, j| {
        vecs[(i, j)] * (vals[j].max(0.0) + eps).powf(-0.25)
    });
    mul(&scaled, &transpose(&vecs))
}

/// Gradients `g[t]` as flat column-major vectors of `n` entries, with a per-step scale over
/// 10^±1, rounded to f32 so that both precisions see the same values.
pub fn flat_gradients(n: usize, steps: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..steps)
        .map(|_| {
            let scale = 10f64.powf(rng.random_range(-1.0..=1.0));
            (0..n)
                .map(|_| {
                    let x: f64 = StandardNormal.sample(&mut rng);
                    (scale * x) as f32 as f64
                })
                .collect()
        })
        .collect()
}

/// Runs `f` on the single thread of a fresh one-thread rayon pool, so that every parallel pass
/// inside it (and the thread-local fault injection of [`crate::linalg`]) stays on that thread.
pub fn on_one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool")
        .install(f)
}
