//! `precond analyze sharing`: how much is lost by sharing one basis across the blocks of a layer
//! (paper §2.2, eq. 4, "Why can we share basis?", and Appendix 6.3, which reports the shared
//! basis "only slightly worse than forming an independent SVD of each diagonal block"), next to
//! Sketchy's Kronecker factor and Block Adam's small blocks, on real gradient streams.
//!
//! For each dense layer (b = d_in rows, m = d_out blocks, NOTES §1) the command records the
//! gradients g_{t,i} of T Adam steps from θ ([`Loaded::gradient_stream`]) and measures, for ranks
//! k, the relative Frobenius error of approximating the block diagonal
//! {H_i = Σ_t g_{t,i} g_{t,i}ᵀ}: sqrt(Σ_i ‖H_i − Ĥ_i‖²_F) / sqrt(Σ_i ‖H_i‖²_F). The methods:
//!
//! - `independent`: the best rank-k approximation of each H_i (its top k eigenpairs, the
//!   "independent SVD" of Appendix 6.3). With Z_i = [g_{1,i} … g_{T,i}] (b × T),
//!   H_i = Z_i Z_iᵀ shares its nonzero eigenvalues with the T × T Gram Z_iᵀ Z_i, so the optimal
//!   error² Σ_{j>k} λ_j² costs one T × T eigendecomposition per block. For k ≥ T it is exactly 0
//!   (rank H_i ≤ T). State: m (b k + k) floats.
//! - `shared-offline`: eq. 4 with the best single basis: B = top-k eigenvectors of
//!   A = Σ_i H_i² (what Algorithm 1's randomized SVD of eq. 5 targets, here exact and offline),
//!   Ĥ_i = B (Bᵀ H_i B) Bᵀ. A = Σ_i Z_i (Z_iᵀ Z_i) Z_iᵀ is formed without any H_i. State:
//!   b k + m k² + m floats.
//! - `shared-online`: the library's [`SharedBasis`] (f64, rank k, its defaults otherwise:
//!   oversampling 0, 1 power iteration, ρ by 10 power iterations) streamed over the T gradients;
//!   Ĥ_i = B R_i Bᵀ at the end, the frequent-directions-shrunk statistics Algorithm 1 keeps. The
//!   JSON also reports Ĥ_i = B R_i Bᵀ + ρ_i I (the matrix its eq. 6 inverts, less ε). Same
//!   state as shared-offline.
//! - `sketchy`: Sketchy/Shampoo's Kronecker structure at equal memory. The block diagonal of
//!   R ⊗ L (L = Σ_i H_i, Shampoo's left statistic, b × b) is {R_ii L}, so block i is
//!   approximated by c_i L̂ with L̂ the rank-k_s truncation of L, and
//!   k_s = round((b k + m k²) / (b + m)) so that Sketchy's (d_in + d_out) k_s floats equal the
//!   shared basis' b k + m k² (k_s is capped at b; the JSON says where). Two choices are
//!   *generous to Sketchy*, so its error here is a lower bound on what it achieves: L̂ is the
//!   exact top-k_s eigenpairs of L (Sketchy's frequent-directions sketch can only do worse), and
//!   c_i = ⟨H_i, L̂⟩ / ‖L̂‖² is the per-block least-squares scale (Sketchy uses the diagonal of
//!   its right factor). The CSV's k is the shared-basis k it is matched to; its state bytes are
//!   (b + m) k_s · 4.
//! - `block-adam`: Block Adam's small blocks (NOTES §5): Ĥ_i keeps the s × s diagonal sub-blocks
//!   of H_i over consecutive inputs (the last one r × r, r = b mod s, when s does not divide b),
//!   s ∈ {1, 2, 5, 10, 20}. The CSV's k is s; its state bytes count every stored sub-block in
//!   full: m (⌊b/s⌋ s² + r²) · 4 ≈ b m s · 4.
//!
//! State bytes are f32 (4 bytes a float), as the optimizers keep them. Ranks k > b (and block
//! sizes s > b) are skipped for that layer, with a note.
//!
//! **Numerics.** The errors of both shared methods are computed from the part of each Z_i
//! outside span(B), Y_i = Z_i − B Bᵀ Z_i, never as a difference of two large norms:
//! ‖H_i − B R_i Bᵀ‖² = ‖D_i D_iᵀ − R_i‖² + 2⟨D_iᵀ D_i, Y_iᵀ Y_i⟩ + ‖Y_iᵀ Y_i‖² with
//! D_i = Bᵀ Z_i, so an exact subspace gives an error at rounding level (tested at 1e-10).
//! Sketchy's and Block Adam's errors are ‖H_i‖² minus the captured mass (clamped at 0), so their
//! floor is about √ε ≈ 1e-8 relative; the independent error is a sum of discarded λ_j².
//!
//! Outputs in `--out`: `sharing.csv` (`method,layer,k,rel_error,state_bytes`),
//! `sharing_<layer>.png/.svg` (relative error vs k, log-log so that the small errors stay
//! apart; exact zeros, e.g. independent at k ≥ T, are in the CSV but not drawn; one series per
//! method),
//! `sharing.png/.svg` (the error of all layers' block diagonals together,
//! sqrt(Σ_layers Σ_i ‖H_i − Ĥ_i‖²) / sqrt(Σ_layers Σ_i ‖H_i‖²), vs the state bytes summed over
//! layers, log-log; at each k only the layers with k ≤ d_in enter) and `sharing.json`
//! (settings, per-layer details, per-rank shared/independent error ratios averaged over layers).

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use precond::linalg::{gemm, par_layer, SymEig};
use precond::{Preconditioner, SharedBasis, SharedBasisConfig};
use serde_json::json;

use super::plot::{self, LinePlot, Series};
use super::{
    create_dir, for_each_layer_stream, select_layers, write_csv, write_json, AnalyzeError, Layer,
    Loaded, ModelArgs,
};

/// Block Adam's block sizes s (NOTES §5: the paper used 10 and 8).
const BLOCK_SIZES: [usize; 5] = [1, 2, 5, 10, 20];

/// Columns (blocks × T) of a chunk of per-block streams Z_i processed at once.
const CHUNK_COLUMNS: usize = 4096;

/// Bytes of one stored float (f32, as the optimizers keep their state).
const FLOAT_BYTES: usize = 4;

/// `precond analyze sharing` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SharingArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (CSV, JSON, PNG, SVG)
    #[arg(long)]
    pub out: PathBuf,
    /// A small configuration that finishes in about a minute on 2 cores: 8 steps of batch 64 on
    /// the two smallest dense layers
    #[arg(long)]
    pub quick: bool,
    /// Length T of the gradient stream: the gradients of T Adam steps from θ [default: 64;
    /// --quick: 8]
    #[arg(long, value_name = "T")]
    pub steps: Option<usize>,
    /// Examples per mini-batch of the stream [default: 1000 autoencoder, 128 tagger (the
    /// paper's); --quick: 64]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Dense layers to study, comma-separated module paths (e.g. layers.0.weight) [default: all;
    /// --quick: the two with the fewest weights]
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub layers: Vec<String>,
    /// Ranks k of the low-rank approximations, comma-separated (ranks above a layer's d_in are
    /// skipped for it)
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "K,...",
        default_value = "4,8,16,32,64"
    )]
    pub ranks: Vec<usize>,
}

/// An approximation of the block diagonal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Independent,
    SharedOffline,
    SharedOnline,
    Sketchy,
    BlockAdam,
}

impl Method {
    const ALL: [Method; 5] = [
        Method::Independent,
        Method::SharedOffline,
        Method::SharedOnline,
        Method::Sketchy,
        Method::BlockAdam,
    ];

    /// The name in the CSV and the plots.
    fn name(self) -> &'static str {
        match self {
            Method::Independent => "independent",
            Method::SharedOffline => "shared-offline",
            Method::SharedOnline => "shared-online",
            Method::Sketchy => "sketchy",
            Method::BlockAdam => "block-adam",
        }
    }
}

/// One method at one rank (block size for Block Adam) on one layer.
#[derive(Clone, Debug)]
struct Row {
    method: Method,
    /// Rank k (Sketchy: the shared-basis k it is matched to; Block Adam: the block size s).
    k: usize,
    /// Σ_i ‖H_i − Ĥ_i‖²_F.
    err_sq: f64,
    state_bytes: usize,
}

/// Sketchy's rank at one shared-basis rank.
#[derive(Clone, Copy, Debug)]
struct SketchyRank {
    k: usize,
    /// round((b k + m k²) / (b + m)), capped at b.
    k_s: usize,
    /// Before the cap.
    uncapped: usize,
}

/// Shared-online with the lost mass: Ĥ_i = B R_i Bᵀ + ρ_i I.
#[derive(Clone, Copy, Debug)]
struct OnlineWithRho {
    k: usize,
    err_sq: f64,
    mean_lost_mass: f64,
}

/// The errors of every method on one layer's stream.
#[derive(Clone, Debug)]
struct LayerErrors {
    b: usize,
    m: usize,
    steps: usize,
    /// Σ_i ‖H_i‖²_F.
    total_sq: f64,
    rows: Vec<Row>,
    online_with_rho: Vec<OnlineWithRho>,
    sketchy_ranks: Vec<SketchyRank>,
    /// Sketchy's least-squares scales c_i, `[rank][block]` (in `sketchy_ranks` order; read by
    /// the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    sketchy_scales: Vec<Vec<f64>>,
    skipped_ranks: Vec<usize>,
    skipped_block_sizes: Vec<usize>,
    /// Wall seconds of the phases of [`layer_errors`].
    phase_seconds: Vec<(&'static str, f64)>,
}

impl LayerErrors {
    /// sqrt(err² / Σ‖H_i‖²); 0 for an all-zero stream (every method is exact on it).
    fn rel(&self, err_sq: f64) -> f64 {
        if self.total_sq > 0.0 {
            (err_sq / self.total_sq).sqrt()
        } else {
            0.0
        }
    }

    fn row(&self, method: Method, k: usize) -> Option<&Row> {
        self.rows.iter().find(|r| r.method == method && r.k == k)
    }
}

/// Sketchy's equal-memory rank: (d_in + d_out) k_s = b k + m k², rounded, at least 1.
fn sketchy_rank(b: usize, m: usize, k: usize) -> usize {
    let floats = (b * k + m * k * k) as f64;
    ((floats / (b + m) as f64).round() as usize).max(1)
}

/// Floats of Block Adam's s × s diagonal sub-blocks of one b-vector block (the last r × r).
fn block_adam_floats(b: usize, s: usize) -> usize {
    let r = b % s;
    (b / s) * s * s + r * r
}

/// The per-block streams Z_i = [g_{1,i} … g_{T,i}] of blocks `first..first + count`, side by
/// side: a b × (count · T) matrix whose column j·T + t is g_{t, first + j}.
fn block_streams(stream: &[Mat<f64>], first: usize, count: usize) -> Mat<f64> {
    let steps = stream.len();
    let b = stream.first().map_or(0, |g| g.nrows());
    let mut z = Mat::zeros(b, count * steps);
    for j in 0..count {
        for (t, g) in stream.iter().enumerate() {
            z.col_mut(j * steps + t).copy_from(g.col(first + j));
        }
    }
    z
}

fn kernel_failed(what: &str, b: usize, m: usize) -> AnalyzeError {
    AnalyzeError::Invalid(format!(
        "analyze sharing: the eigendecomposition of {what} did not converge (layer {b}×{m})"
    ))
}

/// The `count` eigenpairs of the symmetric `a` with the largest eigenvalues, largest first.
fn top_eigen(
    a: &Mat<f64>,
    count: usize,
    what: &str,
    m: usize,
) -> Result<(Vec<f64>, Mat<f64>), AnalyzeError> {
    let n = a.nrows();
    let eig = a
        .self_adjoint_eigen(Side::Lower)
        .map_err(|_| kernel_failed(what, n, m))?;
    let count = count.min(n);
    let values = eig.S().column_vector();
    let vectors = eig.U();
    let top: Vec<usize> = (0..count).map(|j| n - 1 - j).collect();
    let vals: Vec<f64> = top.iter().map(|&j| values[j]).collect();
    if !vals.iter().all(|v| v.is_finite()) {
        return Err(kernel_failed(what, n, m));
    }
    Ok((vals, Mat::from_fn(n, count, |r, c| vectors[(r, top[c])])))
}

/// dst += lhs · rhs on the lower triangle of the square `dst` (faer's triangular product).
fn lower_product_add(dst: MatMut<'_, f64>, lhs: MatRef<'_, f64>, rhs: MatRef<'_, f64>) {
    triangular::matmul(
        dst,
        BlockStructure::TriangularLower,
        Accum::Add,
        lhs,
        BlockStructure::Rectangular,
        rhs,
        BlockStructure::Rectangular,
        1.0,
        par_layer(),
    );
}

/// Frobenius inner product ⟨a, b⟩ of two matrices of the same shape.
fn frobenius_dot(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
    a.col_iter()
        .zip(b.col_iter())
        .map(|(x, y)| x.iter().zip(y.iter()).map(|(p, q)| p * q).sum::<f64>())
        .sum()
}

/// Σ_i ‖H_i − Ĥ_i‖² over the blocks of the chunk `z` (blocks `first..`, T columns each) for
/// Ĥ_i in span(`basis`) (b × k, orthonormal columns): with `online` None, the best
/// Ĥ_i = B (Bᵀ H_i B) Bᵀ (shared-offline); with the state of [`SharedBasis`], Ĥ_i = B R_i Bᵀ.
/// Returns (that, the same with + ρ_i I for `online`, else 0).
///
/// With D_i = Bᵀ Z_i and Y_i = Z_i − B D_i (the part outside the basis), H_i splits into the
/// blocks B D_i D_iᵀ Bᵀ, B D_i Y_iᵀ (and its transpose) and Y_i Y_iᵀ, which are Frobenius-
/// orthogonal: ‖H_i − B R Bᵀ‖² = ‖D_i D_iᵀ − R‖² + 2⟨D_iᵀ D_i, Y_iᵀ Y_i⟩ + ‖Y_iᵀ Y_i‖², the last
/// two in T × T form. With ρ I, the span(B) block loses ρ I_k and the outside block
/// ‖Y Yᵀ − ρ P⊥‖² = ‖Yᵀ Y‖² − 2ρ tr(Yᵀ Y) + ρ² (b − k).
fn subspace_errors(
    z: MatRef<'_, f64>,
    steps: usize,
    first: usize,
    basis: MatRef<'_, f64>,
    online: Option<&SharedBasis<f64>>,
) -> (f64, f64) {
    let (b, k) = (basis.nrows(), basis.ncols());
    let count = z.ncols() / steps;
    let mut coords = Mat::<f64>::zeros(k, z.ncols());
    gemm(
        coords.as_mut(),
        false,
        basis.transpose(),
        z,
        1.0,
        par_layer(),
    );
    let mut outside = z.to_owned();
    gemm(
        outside.as_mut(),
        true,
        basis,
        coords.as_ref(),
        -1.0,
        par_layer(),
    );
    let mut outside_gram = Mat::<f64>::zeros(steps, steps);
    let mut inside_gram = Mat::<f64>::zeros(steps, steps);
    let mut projected = Mat::<f64>::zeros(k, k);
    let (mut err_sq, mut err_rho_sq) = (0.0, 0.0);
    for j in 0..count {
        let d = coords.subcols(j * steps, steps);
        let y = outside.subcols(j * steps, steps);
        gemm(
            outside_gram.as_mut(),
            false,
            y.transpose(),
            y,
            1.0,
            Par::Seq,
        );
        gemm(inside_gram.as_mut(), false, d.transpose(), d, 1.0, Par::Seq);
        let cross = frobenius_dot(inside_gram.as_ref(), outside_gram.as_ref());
        let perp = outside_gram.squared_norm_l2();
        let Some(state) = online else {
            err_sq += 2.0 * cross + perp;
            continue;
        };
        gemm(projected.as_mut(), false, d, d.transpose(), 1.0, Par::Seq);
        let coeffs = state.coeffs(first + j);
        let rho = state.lost_mass()[first + j];
        let (mut inner, mut inner_rho) = (0.0, 0.0);
        for c in 0..k {
            for r in 0..k {
                let e = projected[(r, c)] - coeffs[(r, c)];
                inner += e * e;
                let e = e - if r == c { rho } else { 0.0 };
                inner_rho += e * e;
            }
        }
        let trace: f64 = (0..steps).map(|t| outside_gram[(t, t)]).sum();
        let perp_rho = perp - 2.0 * rho * trace + rho * rho * (b - k) as f64;
        err_sq += inner + 2.0 * cross + perp;
        err_rho_sq += (inner_rho + 2.0 * cross + perp_rho).max(0.0);
    }
    (err_sq, err_rho_sq)
}

/// Streams the library's [`SharedBasis`] (rank k, defaults otherwise) over the gradients.
fn online_state(stream: &[Mat<f64>], k: usize) -> Result<SharedBasis<f64>, AnalyzeError> {
    let (b, m) = (stream[0].nrows(), stream[0].ncols());
    let config = SharedBasisConfig {
        rank: k,
        ..Default::default()
    };
    let mut state = SharedBasis::<f64>::new(config, b, m)?;
    let mut direction = Mat::<f64>::zeros(b, m);
    for g in stream {
        state.precondition(g.as_ref(), direction.as_mut())?;
    }
    Ok(state)
}

/// Every method's error on one layer's gradient stream (`[step]`, each b × m).
fn layer_errors(
    stream: &[Mat<f64>],
    ranks: &[usize],
    block_sizes: &[usize],
) -> Result<LayerErrors, AnalyzeError> {
    let steps = stream.len();
    let Some(g0) = stream.first() else {
        return Err(AnalyzeError::Invalid(
            "analyze sharing: empty gradient stream".into(),
        ));
    };
    let (b, m) = (g0.nrows(), g0.ncols());
    if b == 0 || m == 0 || stream.iter().any(|g| (g.nrows(), g.ncols()) != (b, m)) {
        return Err(AnalyzeError::Invalid(format!(
            "analyze sharing: gradient stream of inconsistent or empty shape ({b}×{m})"
        )));
    }
    let (ranks, skipped_ranks): (Vec<usize>, Vec<usize>) = ranks.iter().partition(|&&k| k <= b);
    let (sizes, skipped_block_sizes): (Vec<usize>, Vec<usize>) =
        block_sizes.iter().partition(|&&s| s <= b);
    let chunk = (CHUNK_COLUMNS / steps).max(1);

    let mut clock = Instant::now();
    let mut phase_seconds = Vec::new();
    let mut lap = |name: &'static str| {
        phase_seconds.push((name, clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    // Pass 1: ‖H_i‖², the independent optimum (T × T Grams), Block Adam's kept mass, and the
    // layer-wide A = Σ_i H_i² (shared-offline) and L = Σ_i H_i (Sketchy).
    let mut block_sq = vec![0.0; m];
    let mut independent_sq = vec![0.0; ranks.len()];
    let mut block_adam_sq = vec![0.0; sizes.len()];
    let mut sum_sq_h = Mat::<f64>::zeros(b, b);
    let mut left = Mat::<f64>::zeros(b, b);
    let mut gram = Mat::<f64>::zeros(steps, steps);
    let mut eig = SymEig::<f64>::new(steps);
    let largest_block = sizes.iter().copied().max().unwrap_or(1);
    let mut sub_block = Mat::<f64>::zeros(largest_block, largest_block);
    for first in (0..m).step_by(chunk) {
        let count = chunk.min(m - first);
        let z = block_streams(stream, first, count);
        // Z_i (Z_iᵀ Z_i), side by side: A = Σ_i Z_i (Z_iᵀ Z_i) Z_iᵀ = Σ_i H_i².
        let mut z_gram = Mat::<f64>::zeros(b, count * steps);
        for j in 0..count {
            let zj = z.subcols(j * steps, steps);
            gemm(gram.as_mut(), false, zj.transpose(), zj, 1.0, Par::Seq);
            let h_sq = gram.squared_norm_l2();
            block_sq[first + j] = h_sq;
            eig.decompose(gram.as_ref())
                .map_err(|_| kernel_failed("a block's T×T Gram", b, m))?;
            // Ascending eigenvalues: the best rank-k approximation drops all but the top k.
            for (r, &k) in ranks.iter().enumerate() {
                independent_sq[r] += (0..steps.saturating_sub(k))
                    .map(|q| eig.value(q).powi(2))
                    .sum::<f64>();
            }
            gemm(
                z_gram.subcols_mut(j * steps, steps),
                false,
                zj,
                gram.as_ref(),
                1.0,
                Par::Seq,
            );
            for (r, &s) in sizes.iter().enumerate() {
                let mut kept_sq = 0.0;
                for p in (0..b).step_by(s) {
                    let len = s.min(b - p);
                    let zp = zj.subrows(p, len);
                    let mut h_pp = sub_block.as_mut().submatrix_mut(0, 0, len, len);
                    gemm(h_pp.as_mut(), false, zp, zp.transpose(), 1.0, Par::Seq);
                    kept_sq += h_pp.as_ref().squared_norm_l2();
                }
                block_adam_sq[r] += (h_sq - kept_sq).max(0.0);
            }
        }
        // Both are symmetric: only their lower triangles are accumulated (and read by the
        // eigensolver, Side::Lower), half the flops of a full product.
        lower_product_add(sum_sq_h.as_mut(), z.as_ref(), z_gram.transpose());
        lower_product_add(left.as_mut(), z.as_ref(), z.transpose());
    }
    let total_sq: f64 = block_sq.iter().sum();
    lap("statistics");

    let max_rank = ranks.iter().copied().max().unwrap_or(0);
    let (_, offline_basis) = top_eigen(&sum_sq_h, max_rank, "A = Σ_i H_i²", m)?;
    drop(sum_sq_h);
    let sketchy_ranks: Vec<SketchyRank> = ranks
        .iter()
        .map(|&k| {
            let uncapped = sketchy_rank(b, m, k);
            SketchyRank {
                k,
                k_s: uncapped.min(b),
                uncapped,
            }
        })
        .collect();
    let max_sketchy = sketchy_ranks.iter().map(|s| s.k_s).max().unwrap_or(0);
    let (left_values, left_vectors) = top_eigen(&left, max_sketchy, "L = Σ_i H_i", m)?;
    drop(left);
    // Prefix sums of λ_j² (‖L̂‖² at every truncation).
    let lhat_sq: Vec<f64> = std::iter::once(0.0)
        .chain(left_values.iter().scan(0.0, |acc, v| {
            *acc += v * v;
            Some(*acc)
        }))
        .collect();

    lap("eigendecompositions");
    let online: Vec<SharedBasis<f64>> = ranks
        .iter()
        .map(|&k| online_state(stream, k))
        .collect::<Result<_, _>>()?;

    lap("shared_online_stream");
    let (mut offline_seconds, mut online_seconds) = (0.0, 0.0);
    // Pass 2: the two shared bases and Sketchy's truncations.
    let mut offline_sq = vec![0.0; ranks.len()];
    let mut online_sq = vec![0.0; ranks.len()];
    let mut online_rho_sq = vec![0.0; ranks.len()];
    let mut sketchy_sq = vec![0.0; ranks.len()];
    let mut sketchy_scales = vec![vec![0.0; m]; ranks.len()];
    let mut weighted = vec![0.0; max_sketchy + 1];
    for first in (0..m).step_by(chunk) {
        let count = chunk.min(m - first);
        let z = block_streams(stream, first, count);
        for (r, &k) in ranks.iter().enumerate() {
            let start = Instant::now();
            let basis = offline_basis.subcols(0, k);
            offline_sq[r] += subspace_errors(z.as_ref(), steps, first, basis, None).0;
            offline_seconds += start.elapsed().as_secs_f64();
            let start = Instant::now();
            let state = &online[r];
            let (e, e_rho) = subspace_errors(z.as_ref(), steps, first, state.basis(), Some(state));
            online_seconds += start.elapsed().as_secs_f64();
            online_sq[r] += e;
            online_rho_sq[r] += e_rho;
        }
        if max_sketchy == 0 {
            continue;
        }
        // ⟨H_i, L̂⟩ = Σ_{j<k_s} λ_j ‖v_jᵀ Z_i‖².
        let mut proj = Mat::<f64>::zeros(max_sketchy, count * steps);
        gemm(
            proj.as_mut(),
            false,
            left_vectors.transpose(),
            z.as_ref(),
            1.0,
            par_layer(),
        );
        for j in 0..count {
            let pj = proj.subcols(j * steps, steps);
            let mut acc = 0.0;
            for (q, w) in weighted.iter_mut().skip(1).enumerate() {
                acc += left_values[q] * pj.row(q).squared_norm_l2();
                *w = acc;
            }
            for (r, s) in sketchy_ranks.iter().enumerate() {
                let (inner, norm_sq) = (weighted[s.k_s], lhat_sq[s.k_s]);
                let scale = if norm_sq > 0.0 { inner / norm_sq } else { 0.0 };
                sketchy_scales[r][first + j] = scale;
                // ‖H − c L̂‖² = ‖H‖² − 2c⟨H, L̂⟩ + c²‖L̂‖² = ‖H‖² − c⟨H, L̂⟩ at the optimum.
                sketchy_sq[r] += (block_sq[first + j] - scale * inner).max(0.0);
            }
        }
    }

    lap("errors");
    phase_seconds.push(("errors_shared_offline", offline_seconds));
    phase_seconds.push(("errors_shared_online", online_seconds));
    let shared_bytes = |k: usize| (b * k + m * k * k + m) * FLOAT_BYTES;
    let mut rows = Vec::new();
    for (r, &k) in ranks.iter().enumerate() {
        rows.push(Row {
            method: Method::Independent,
            k,
            err_sq: independent_sq[r],
            state_bytes: m * (b * k + k) * FLOAT_BYTES,
        });
        rows.push(Row {
            method: Method::SharedOffline,
            k,
            err_sq: offline_sq[r],
            state_bytes: shared_bytes(k),
        });
        rows.push(Row {
            method: Method::SharedOnline,
            k,
            err_sq: online_sq[r],
            state_bytes: shared_bytes(k),
        });
        rows.push(Row {
            method: Method::Sketchy,
            k,
            err_sq: sketchy_sq[r],
            state_bytes: (b + m) * sketchy_ranks[r].k_s * FLOAT_BYTES,
        });
    }
    for (r, &s) in sizes.iter().enumerate() {
        rows.push(Row {
            method: Method::BlockAdam,
            k: s,
            err_sq: block_adam_sq[r],
            state_bytes: m * block_adam_floats(b, s) * FLOAT_BYTES,
        });
    }
    let online_with_rho = ranks
        .iter()
        .zip(&online)
        .zip(&online_rho_sq)
        .map(|((&k, state), &err_sq)| OnlineWithRho {
            k,
            err_sq,
            mean_lost_mass: state.lost_mass().iter().sum::<f64>() / m as f64,
        })
        .collect();
    Ok(LayerErrors {
        b,
        m,
        steps,
        total_sq,
        rows,
        online_with_rho,
        sketchy_ranks,
        sketchy_scales,
        skipped_ranks,
        skipped_block_sizes,
        phase_seconds,
    })
}

/// The checked settings of a run.
struct Settings {
    steps: usize,
    ranks: Vec<usize>,
}

impl Settings {
    /// Checks what can be checked before the model is loaded.
    fn resolve(args: &SharingArgs) -> Result<Settings, AnalyzeError> {
        let invalid = |msg: String| Err(AnalyzeError::Invalid(format!("analyze sharing: {msg}")));
        let steps = args.steps.unwrap_or(if args.quick { 8 } else { 64 });
        if steps == 0 {
            return invalid("--steps must be at least 1".into());
        }
        if args.ranks.is_empty() {
            return invalid("--ranks is empty: give ranks k ≥ 1, e.g. 4,8,16,32,64".into());
        }
        if args.ranks.contains(&0) {
            return invalid(format!("--ranks {:?}: every rank must be ≥ 1", args.ranks));
        }
        if args.batch_size == Some(0) {
            return invalid("--batch-size must be at least 1".into());
        }
        if let Some(bad) = args.layers.iter().find(|n| n.trim().is_empty()) {
            return invalid(format!("--layers holds an empty name ({bad:?})"));
        }
        let mut ranks = args.ranks.clone();
        ranks.sort_unstable();
        ranks.dedup();
        Ok(Settings { steps, ranks })
    }
}

/// A layer name as a file-name part.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One finished layer.
struct Done {
    layer: Layer,
    errors: LayerErrors,
    seconds: f64,
}

/// Prints one layer's compact table to stdout.
fn print_layer(done: &Done) {
    let e = &done.errors;
    println!(
        "\n{} ({}×{}, T = {}): relative Frobenius error of the block diagonal ({:.1} s)",
        done.layer.name, e.b, e.m, e.steps, done.seconds
    );
    let ranks: Vec<usize> = e.sketchy_ranks.iter().map(|s| s.k).collect();
    let header: String = ranks.iter().map(|k| format!("{:>10}", k)).collect();
    println!("  {:<16}{header}", "k");
    for method in &Method::ALL[..4] {
        let cells: String = ranks
            .iter()
            .map(|&k| {
                e.row(*method, k).map_or_else(
                    || format!("{:>10}", "-"),
                    |r| format!("{:>10.4}", e.rel(r.err_sq)),
                )
            })
            .collect();
        println!("  {:<16}{cells}", method.name());
    }
    let cells: String = e
        .online_with_rho
        .iter()
        .map(|o| format!("{:>10.4}", e.rel(o.err_sq)))
        .collect();
    println!("  {:<16}{cells}", "  online + ρI");
    let cells: String = e
        .sketchy_ranks
        .iter()
        .map(|s| format!("{:>10}", s.k_s))
        .collect();
    println!("  {:<16}{cells}", "  sketchy k_s");
    let sizes: Vec<&Row> = e
        .rows
        .iter()
        .filter(|r| r.method == Method::BlockAdam)
        .collect();
    let header: String = sizes.iter().map(|r| format!("{:>10}", r.k)).collect();
    println!("  {:<16}{header}", "block size s");
    let cells: String = sizes
        .iter()
        .map(|r| format!("{:>10.4}", e.rel(r.err_sq)))
        .collect();
    println!("  {:<16}{cells}", Method::BlockAdam.name());
    if !e.skipped_ranks.is_empty() {
        println!(
            "  note: ranks {:?} > d_in = {} skipped",
            e.skipped_ranks, e.b
        );
    }
    if !e.skipped_block_sizes.is_empty() {
        println!(
            "  note: block sizes {:?} > d_in = {} skipped",
            e.skipped_block_sizes, e.b
        );
    }
    let exact: Vec<usize> = ranks.iter().copied().filter(|&k| k >= e.steps).collect();
    if !exact.is_empty() {
        println!(
            "  note: at k = {exact:?} ≥ T = {} the independent error is exactly 0 (rank H_i ≤ T)",
            e.steps
        );
    }
    let capped: Vec<usize> = e
        .sketchy_ranks
        .iter()
        .filter(|s| s.uncapped > s.k_s)
        .map(|s| s.k)
        .collect();
    if !capped.is_empty() {
        println!(
            "  note: at k = {capped:?} Sketchy's equal-memory rank exceeds d_in and is capped at {}",
            e.b
        );
    }
}

/// A shared method against the independent bases at one rank, over the layers that have it.
struct Comparison {
    /// Per layer: shared rel_error / independent rel_error (layers with an independent error
    /// of 0, e.g. k ≥ T, are left out: the ratio is undefined).
    ratios: Vec<f64>,
    /// Per layer: shared rel_error − independent rel_error (every layer with the rank).
    differences: Vec<f64>,
    /// Layers left out of `ratios`, with why.
    left_out: Vec<(String, &'static str)>,
}

fn compare(done: &[Done], k: usize, method: Method) -> Comparison {
    let mut c = Comparison {
        ratios: Vec::new(),
        differences: Vec::new(),
        left_out: Vec::new(),
    };
    for d in done {
        let e = &d.errors;
        let (Some(shared), Some(ind)) = (e.row(method, k), e.row(Method::Independent, k)) else {
            c.left_out.push((d.layer.name.clone(), "k > d_in"));
            continue;
        };
        let (shared, ind) = (e.rel(shared.err_sq), e.rel(ind.err_sq));
        c.differences.push(shared - ind);
        if ind > 0.0 {
            c.ratios.push(shared / ind);
        } else {
            c.left_out
                .push((d.layer.name.clone(), "independent error is 0 (k ≥ T)"));
        }
    }
    c
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Per rank: the mean over layers of a shared method's error divided by (and minus) the
/// independent one.
fn ratio_summary(done: &[Done], ranks: &[usize], method: Method) -> serde_json::Value {
    ranks
        .iter()
        .map(|&k| {
            let c = compare(done, k, method);
            json!({
                "k": k,
                "mean_over_layers": mean(&c.ratios),
                "layers": c.ratios.len(),
                "min": c.ratios.iter().copied().reduce(f64::min),
                "max": c.ratios.iter().copied().reduce(f64::max),
                "mean_difference_over_layers": mean(&c.differences),
                "left_out": c.left_out.iter()
                    .map(|(layer, why)| json!({ "layer": layer, "why": why }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// All layers together, per method and k: (Σ state bytes, sqrt(Σ err²) / sqrt(Σ ‖H‖²),
/// layers), over the layers that have that k.
fn overall(done: &[Done], method: Method) -> Vec<(usize, usize, f64, usize)> {
    let mut by_k: BTreeMap<usize, (usize, f64, f64, usize)> = BTreeMap::new();
    for d in done {
        for r in d.errors.rows.iter().filter(|r| r.method == method) {
            let e = by_k.entry(r.k).or_default();
            e.0 += r.state_bytes;
            e.1 += r.err_sq;
            e.2 += d.errors.total_sq;
            e.3 += 1;
        }
    }
    by_k.into_iter()
        .map(|(k, (bytes, err, total, n))| {
            let rel = if total > 0.0 {
                (err / total).sqrt()
            } else {
                0.0
            };
            (k, bytes, rel, n)
        })
        .collect()
}

/// Writes the CSV, the plots and the JSON.
fn write_outputs(
    out: &Path,
    args: &SharingArgs,
    settings: &Settings,
    task: &str,
    batch_size: usize,
    done: &[Done],
    interrupted: bool,
) -> Result<(), AnalyzeError> {
    let mut rows = Vec::new();
    for d in done {
        for method in Method::ALL {
            for r in d.errors.rows.iter().filter(|r| r.method == method) {
                rows.push(vec![
                    method.name().to_string(),
                    d.layer.name.clone(),
                    r.k.to_string(),
                    format!("{}", d.errors.rel(r.err_sq)),
                    r.state_bytes.to_string(),
                ]);
            }
        }
    }
    write_csv(
        &out.join("sharing.csv"),
        &["method", "layer", "k", "rel_error", "state_bytes"],
        &rows,
    )?;

    for d in done {
        let e = &d.errors;
        let series: Vec<Series> = Method::ALL
            .iter()
            .map(|&method| {
                let label = if method == Method::BlockAdam {
                    "block-adam (k = block size s)".to_string()
                } else {
                    method.name().to_string()
                };
                let points = e
                    .rows
                    .iter()
                    .filter(|r| r.method == method)
                    .map(|r| (r.k as f64, e.rel(r.err_sq)))
                    .collect();
                Series::new(label, points)
            })
            .collect();
        let title = format!(
            "{} ({}×{}), T = {}: error of the block diagonal",
            d.layer.name, e.b, e.m, e.steps
        );
        plot::lines(
            &out.join(format!("sharing_{}", file_stem(&d.layer.name))),
            &LinePlot {
                title: &title,
                x_desc: "rank k (block-adam: block size s)",
                y_desc: "relative Frobenius error (exact zeros not drawn)",
                log_x: true,
                log_y: true,
                series: &series,
            },
        )?;
    }

    let overall_series: Vec<Series> = Method::ALL
        .iter()
        .map(|&method| {
            let points = overall(done, method)
                .into_iter()
                .map(|(_, bytes, rel, _)| (bytes as f64, rel))
                .collect();
            Series::new(method.name(), points)
        })
        .collect();
    let title = format!(
        "All {} layers' block diagonals, T = {}: error vs optimizer state",
        done.len(),
        settings.steps
    );
    plot::lines(
        &out.join("sharing"),
        &LinePlot {
            title: &title,
            x_desc: "state bytes summed over layers (f32)",
            y_desc: "relative Frobenius error (all layers together)",
            log_x: true,
            log_y: true,
            series: &overall_series,
        },
    )?;

    let layers: Vec<serde_json::Value> = done
        .iter()
        .map(|d| {
            let e = &d.errors;
            json!({
                "name": d.layer.name,
                "d_in": e.b,
                "d_out": e.m,
                "sum_sq_frobenius_h": e.total_sq,
                "seconds": d.seconds,
                "phase_seconds": e.phase_seconds.iter()
                    .map(|(name, s)| ((*name).to_string(), json!(s)))
                    .collect::<serde_json::Map<_, _>>(),
                "skipped_ranks": e.skipped_ranks,
                "skipped_block_sizes": e.skipped_block_sizes,
                "independent_exact_ranks": e.sketchy_ranks.iter().map(|s| s.k)
                    .filter(|&k| k >= e.steps).collect::<Vec<_>>(),
                "sketchy_ranks": e.sketchy_ranks.iter().map(|s| json!({
                    "k": s.k, "k_s": s.k_s, "k_s_before_cap": s.uncapped,
                })).collect::<Vec<_>>(),
                "shared_online_with_lost_mass": e.online_with_rho.iter().map(|o| json!({
                    "k": o.k,
                    "rel_error": e.rel(o.err_sq),
                    "rel_error_without_lost_mass": e.row(Method::SharedOnline, o.k)
                        .map(|r| e.rel(r.err_sq)),
                    "mean_lost_mass": o.mean_lost_mass,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let overall_json: serde_json::Value = Method::ALL
        .iter()
        .map(|&method| {
            let points: Vec<serde_json::Value> = overall(done, method)
                .into_iter()
                .map(|(k, bytes, rel, n)| {
                    json!({ "k": k, "state_bytes": bytes, "rel_error": rel, "layers": n })
                })
                .collect();
            (method.name().to_string(), serde_json::Value::Array(points))
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let value = json!({
        "task": task,
        "run": args.model.run,
        "seed": args.model.seed,
        "quick": args.quick,
        "steps": settings.steps,
        "batch_size": batch_size,
        "ranks": settings.ranks,
        "block_sizes": BLOCK_SIZES,
        "layers": layers,
        "interrupted": interrupted,
        "ratio_shared_offline_to_independent": ratio_summary(done, &settings.ranks, Method::SharedOffline),
        "ratio_shared_online_to_independent": ratio_summary(done, &settings.ranks, Method::SharedOnline),
        "overall": overall_json,
        "notes": [
            "rel_error = sqrt(sum_i ||H_i - Hhat_i||_F^2) / sqrt(sum_i ||H_i||_F^2), H_i = sum_t g_{t,i} g_{t,i}^T over the T steps (paper §2.2, eq. 4)",
            "independent: best rank-k approximation of each H_i (T x T Grams); exactly 0 for k >= T since rank H_i <= T",
            "shared-offline: B = top-k eigenvectors of A = sum_i H_i^2, Hhat_i = B B^T H_i B B^T",
            "shared-online: the library's SharedBasis (f64, rank k, oversampling 0, 1 power iteration) over the stream, Hhat_i = B R_i B^T; shared_online_with_lost_mass adds rho_i I",
            "sketchy: Hhat_i = c_i Lhat, Lhat = exact rank-k_s truncation of L = sum_i H_i, c_i = <H_i, Lhat>/||Lhat||^2 (least squares); k_s = round((b k + m k^2)/(b + m)) capped at b, equal memory with the shared basis; both choices favour Sketchy (a lower bound on its error)",
            "block-adam: k is the block size s; Hhat_i keeps the s x s diagonal sub-blocks (the last r x r, r = b mod s); state_bytes = m (floor(b/s) s^2 + r^2) * 4",
            "state_bytes in f32: independent m (b k + k), shared (b k + m k^2 + m), sketchy (b + m) k_s",
            "overall: per method and k, sqrt(sum over layers of err^2) / sqrt(sum over layers of sum_i ||H_i||^2) and the state bytes summed, over the layers with k <= d_in",
            "sketchy and block-adam errors are ||H||^2 minus the captured mass: values below ~1e-8 are rounding",
        ],
    });
    write_json(&out.join("sharing.json"), &value)
}

pub fn run(args: &SharingArgs, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    let settings = Settings::resolve(args)?;
    create_dir(&args.out)?;
    let loaded = Loaded::open(&args.model, args.quick, &args.out)?;
    let tagger = matches!(loaded, Loaded::Tagger { .. });
    let task = if tagger { "tagger" } else { "autoencoder" };
    let batch_size = args.batch_size.unwrap_or(if args.quick {
        64
    } else if tagger {
        128
    } else {
        1000
    });
    let layers = select_layers("sharing", &loaded, &args.layers, args.quick)?;
    eprintln!(
        "analyze sharing: {} layer(s), T = {} steps of batch {batch_size}, ranks {:?}",
        layers.len(),
        settings.steps,
        settings.ranks
    );

    let mut done: Vec<Done> = Vec::new();
    let interrupted = for_each_layer_stream(
        "sharing",
        &loaded,
        &layers,
        settings.steps,
        batch_size,
        args.model.seed,
        stop,
        |layer, layer_stream| {
            let start = Instant::now();
            let errors = layer_errors(&layer_stream, &settings.ranks, &BLOCK_SIZES)?;
            drop(layer_stream);
            let finished = Done {
                layer,
                errors,
                seconds: start.elapsed().as_secs_f64(),
            };
            print_layer(&finished);
            done.push(finished);
            Ok(false)
        },
    )?;
    if interrupted {
        eprintln!(
            "analyze sharing: stopped after {} of {} layers; writing those",
            done.len(),
            layers.len()
        );
    }
    write_outputs(
        &args.out,
        args,
        &settings,
        task,
        batch_size,
        &done,
        interrupted,
    )?;
    println!("\nshared vs independent, mean over layers (ratio of errors; difference):");
    for &k in &settings.ranks {
        let cell = |method: Method| {
            let c = compare(&done, k, method);
            let ratio = mean(&c.ratios).map_or_else(|| "undefined".into(), |r| format!("{r:.2}"));
            let diff = mean(&c.differences).map_or_else(|| "-".into(), |d| format!("{d:+.4}"));
            format!("{:<14} ratio {ratio:>9}  diff {diff:>8}", method.name())
        };
        println!(
            "  k = {k:>3}: {}   {}",
            cell(Method::SharedOffline),
            cell(Method::SharedOnline)
        );
    }
    println!("wrote {}", args.out.join("sharing.csv").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A stream of T gradients (b × m) with entry (r, i) of step t given by `entry(t, r, i)`.
    fn stream_of(
        b: usize,
        m: usize,
        steps: usize,
        mut entry: impl FnMut(usize, usize, usize) -> f64,
    ) -> Vec<Mat<f64>> {
        (0..steps)
            .map(|t| Mat::from_fn(b, m, |r, i| entry(t, r, i)))
            .collect()
    }

    fn uniform(rng: &mut ChaCha8Rng) -> f64 {
        2.0 * rng.random::<f64>() - 1.0
    }

    fn rel(e: &LayerErrors, method: Method, k: usize) -> f64 {
        e.rel(e.row(method, k).expect("row").err_sq)
    }

    /// The dense H_i = Σ_t g_{t,i} g_{t,i}ᵀ of every block.
    fn dense_blocks(stream: &[Mat<f64>]) -> Vec<Mat<f64>> {
        let (b, m) = (stream[0].nrows(), stream[0].ncols());
        (0..m)
            .map(|i| {
                let mut h = Mat::<f64>::zeros(b, b);
                for g in stream {
                    let gi = g.col(i).as_mat();
                    h += gi * gi.transpose();
                }
                h
            })
            .collect()
    }

    #[test]
    fn one_shared_subspace_is_found_by_every_shared_method() {
        // g_{t,i} = U c_{t,i}, U b × r orthonormal: every H_i lies in span(U) (the situation of
        // §2.2's argument, H_i = V C_i Vᵀ).
        let (b, m, r, steps) = (12, 5, 3, 10);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let gauss = Mat::<f64>::from_fn(b, r, |_, _| uniform(&mut rng));
        let u = gauss.qr().compute_thin_Q();
        let coeffs: Vec<Mat<f64>> = (0..steps)
            .map(|_| Mat::from_fn(r, m, |_, _| uniform(&mut rng)))
            .collect();
        let stream: Vec<Mat<f64>> = coeffs.iter().map(|c| &u * c).collect();
        let ranks = [1, 2, 3, 4, 6, 12];
        let e = layer_errors(&stream, &ranks, &BLOCK_SIZES).unwrap();
        for k in [3, 4, 6, 12] {
            assert!(rel(&e, Method::Independent, k) < 1e-10, "k={k}");
            assert!(rel(&e, Method::SharedOffline, k) < 1e-10, "k={k}");
        }
        // Above r the frequent-directions shrink removes nothing (λ_min(R̃_i) = 0): B R_i Bᵀ is
        // H_i itself, and so is B R_i Bᵀ + ρ_i I (ρ_i = 0).
        for k in [4, 6, 12] {
            assert!(rel(&e, Method::SharedOnline, k) < 1e-10, "k={k}");
            let o = e.online_with_rho.iter().find(|o| o.k == k).unwrap();
            assert!(e.rel(o.err_sq) < 1e-10, "k={k}: {}", e.rel(o.err_sq));
        }
        // At k = r the shrink loses mass, but the online basis spans U: the best coefficients
        // in it are exact.
        let state = online_state(&stream, r).unwrap();
        let z = block_streams(&stream, 0, m);
        let (in_span, _) = subspace_errors(z.as_ref(), steps, 0, state.basis(), None);
        assert!((in_span / e.total_sq).sqrt() < 1e-10);
        // Below r the independent optimum is at least as good as any shared basis.
        for k in [1, 2] {
            let ind = rel(&e, Method::Independent, k);
            assert!(ind > 1e-3);
            assert!(
                ind <= rel(&e, Method::SharedOffline, k) * (1.0 + 1e-12),
                "k={k}"
            );
            assert!(
                ind <= rel(&e, Method::SharedOnline, k) * (1.0 + 1e-12),
                "k={k}"
            );
        }
    }

    #[test]
    fn full_rank_online_state_plus_lost_mass_is_exact() {
        // NOTES §3: with k = b, ρ_i collects exactly the mass the shrink removed, so
        // B R_i Bᵀ + ρ_i I = H_i on a generic (full-rank) stream.
        let (b, m, steps) = (6, 4, 15);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let stream = stream_of(b, m, steps, |_, _, _| uniform(&mut rng));
        let e = layer_errors(&stream, &[b], &[1]).unwrap();
        let o = e.online_with_rho[0];
        assert!(e.rel(o.err_sq) < 1e-9, "{}", e.rel(o.err_sq));
        assert!(o.mean_lost_mass > 0.0);
        assert!(rel(&e, Method::SharedOnline, b) > 1e-3);
        assert!(rel(&e, Method::SharedOffline, b) < 1e-10);
    }

    #[test]
    fn disjoint_supports_defeat_the_shared_basis() {
        // Block i's gradients live on coordinate i only: H_i = h_i e_i e_iᵀ. Integer gradients
        // keep every sum exact, so exact methods give exactly 0.
        let (m, steps) = (6, 9);
        let b = m;
        let stream = stream_of(b, m, steps, |t, r, i| {
            if r != i {
                0.0
            } else if t + 1 < steps {
                3.0
            } else {
                (i + 1) as f64
            }
        });
        let h: Vec<f64> = (0..m)
            .map(|i| 9.0 * (steps - 1) as f64 + ((i + 1) * (i + 1)) as f64)
            .collect();
        let total: f64 = h.iter().map(|v| v * v).sum();
        let ranks: Vec<usize> = (1..=m).collect();
        let e = layer_errors(&stream, &ranks, &BLOCK_SIZES).unwrap();
        assert_eq!(e.total_sq, total);
        for &k in &ranks {
            assert!(rel(&e, Method::Independent, k) < 1e-14, "k={k}");
            // A = Σ H_i² = diag(h_i²): the best shared basis keeps the k largest h_i and loses
            // the other blocks entirely.
            let lost: f64 = h[..m - k].iter().map(|v| v * v).sum();
            let want = (lost / total).sqrt();
            let got = rel(&e, Method::SharedOffline, k);
            assert!((got - want).abs() < 1e-12, "k={k}: {got} vs {want}");
            if 2 * k <= m {
                assert!(got > 0.5, "k={k}: {got}");
            }
        }
        for s in BLOCK_SIZES.iter().filter(|&&s| s <= b) {
            assert_eq!(rel(&e, Method::BlockAdam, *s), 0.0, "s={s}");
        }
        assert_eq!(e.skipped_block_sizes, vec![10, 20]);
    }

    #[test]
    fn independent_error_via_gram_matches_dense_eigendecomposition() {
        for (b, m, steps, seed) in [(7, 4, 5, 3), (5, 3, 11, 4)] {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let stream = stream_of(b, m, steps, |_, _, _| uniform(&mut rng));
            let ranks: Vec<usize> = (1..=b).collect();
            let e = layer_errors(&stream, &ranks, &[1]).unwrap();
            let blocks = dense_blocks(&stream);
            let total: f64 = blocks.iter().map(|h| h.squared_norm_l2()).sum();
            assert!((e.total_sq - total).abs() < 1e-12 * total);
            for &k in &ranks {
                // Reference: the best rank-k approximation V_k Λ_k V_kᵀ of each H_i, formed
                // from its b × b eigendecomposition, and the Frobenius norm of the difference.
                let mut err_sq = 0.0;
                for h in &blocks {
                    let eig = h.self_adjoint_eigen(Side::Lower).unwrap();
                    let (vals, vecs) = (eig.S().column_vector(), eig.U());
                    let mut approx = Mat::<f64>::zeros(b, b);
                    for j in b - k..b {
                        let v = vecs.col(j).as_mat();
                        approx += faer::Scale(vals[j]) * (v * v.transpose());
                    }
                    err_sq += (h - &approx).squared_norm_l2();
                }
                let want = (err_sq / total).sqrt();
                let got = rel(&e, Method::Independent, k);
                assert!(
                    (got - want).abs() < 1e-10,
                    "b={b} T={steps} k={k}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn sketchy_scale_is_the_least_squares_optimum() {
        let (b, m, steps) = (6, 3, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let stream = stream_of(b, m, steps, |_, _, _| uniform(&mut rng));
        let ranks = [1, 2];
        let e = layer_errors(&stream, &ranks, &[1]).unwrap();
        let blocks = dense_blocks(&stream);
        let total: f64 = blocks.iter().map(|h| h.squared_norm_l2()).sum();
        let mut left = Mat::<f64>::zeros(b, b);
        for h in &blocks {
            left += h;
        }
        let eig = left.self_adjoint_eigen(Side::Lower).unwrap();
        for (q, s) in e.sketchy_ranks.iter().enumerate() {
            assert_eq!(s.k_s, sketchy_rank(b, m, s.k));
            // Dense reference: L̂ = the top k_s eigenpairs of L = Σ H_i.
            let mut lhat = Mat::<f64>::zeros(b, b);
            for j in b - s.k_s..b {
                let v = eig.U().col(j).as_mat();
                lhat += faer::Scale(eig.S().column_vector()[j]) * (v * v.transpose());
            }
            let err_sq = |scales: &[f64]| -> f64 {
                blocks
                    .iter()
                    .zip(scales)
                    .map(|(h, &c)| (h - faer::Scale(c) * &lhat).squared_norm_l2())
                    .sum()
            };
            let scales = &e.sketchy_scales[q];
            for (i, h) in blocks.iter().enumerate() {
                let want = frobenius_dot(h.as_ref(), lhat.as_ref()) / lhat.squared_norm_l2();
                assert!((scales[i] - want).abs() < 1e-12 * want.abs().max(1.0));
            }
            let best = err_sq(scales);
            let got = rel(&e, Method::Sketchy, s.k);
            assert!((got - (best / total).sqrt()).abs() < 1e-8, "k={}", s.k);
            for i in 0..m {
                for delta in [1e-3, -1e-3] {
                    let mut moved = scales.clone();
                    moved[i] += delta * scales[i].abs().max(1e-3);
                    assert!(err_sq(&moved) > best, "k={} block {i}", s.k);
                }
            }
        }
    }

    #[test]
    fn equal_memory_and_block_counts() {
        // (b + m) k_s ≈ b k + m k².
        assert_eq!(sketchy_rank(784, 1000, 4), 11); // 19136 / 1784 = 10.7
        assert_eq!(sketchy_rank(30, 250, 4), 15); // 4120 / 280 = 14.7
                                                  // Block Adam: ⌊b/s⌋ full s × s blocks and one r × r.
        assert_eq!(block_adam_floats(10, 3), 3 * 9 + 1);
        assert_eq!(block_adam_floats(784, 1), 784);
        assert_eq!(block_adam_floats(20, 20), 400);
    }

    /// Timing of the phases on the autoencoder's largest layer shape (random gradients):
    /// `cargo test -p lab --bin precond sharing_phase_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn sharing_phase_timing() {
        let (b, m, steps) = (784, 1000, 64);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let stream = stream_of(b, m, steps, |_, _, _| uniform(&mut rng));
        let e = layer_errors(&stream, &[4, 8, 16, 32, 64], &BLOCK_SIZES).unwrap();
        eprintln!("{:?}", e.phase_seconds);
    }

    fn quick_args(out: PathBuf, data: PathBuf) -> SharingArgs {
        SharingArgs {
            model: ModelArgs {
                data: Some(data),
                ..Default::default()
            },
            out,
            quick: true,
            steps: None,
            batch_size: None,
            layers: Vec::new(),
            ranks: vec![4, 8, 16, 32, 64],
        }
    }

    /// The tagger path: a tagger trained for one epoch on train.rs's synthetic treebank, loaded
    /// with --run. Every dense layer of it (query, key, value, attention output, MLP in and out,
    /// output; all seven named, since --quick alone takes the first and the last) gets rows, and
    /// per block the independent rank-k approximation is the best one, so
    /// its error is at most the shared bases' (offline and online) on every layer and k.
    #[test]
    fn quick_on_a_tagger_run() {
        let tmp = tempfile::tempdir().unwrap();
        let train_args = crate::training::run::tests::tagger_args(tmp.path(), "tagger", "adam", 1);
        crate::training::run(&train_args, &AtomicBool::new(false)).unwrap();
        let out = tmp.path().join("sharing");
        let mut layers: Vec<String> = ["query", "key", "value", "attn_out", "mlp_in", "mlp_out"]
            .iter()
            .map(|n| format!("layers.0.{n}.weight"))
            .collect();
        layers.push("output.weight".into());
        let args = SharingArgs {
            model: ModelArgs {
                run: Some(tmp.path().join("tagger")),
                ..Default::default()
            },
            ranks: vec![2, 4, 8],
            layers: layers.clone(),
            ..quick_args(out.clone(), PathBuf::new())
        };
        run(&args, &AtomicBool::new(false)).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("sharing.json")).unwrap())
                .unwrap();
        assert_eq!(json["task"], "tagger");
        let names: Vec<&str> = json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, layers);
        let csv = std::fs::read_to_string(out.join("sharing.csv")).unwrap();
        let error = |method: &str, layer: &str, k: usize| -> f64 {
            csv.lines()
                .map(|l| l.split(',').collect::<Vec<_>>())
                .find(|r| r[0] == method && r[1] == layer && r[2] == k.to_string())
                .unwrap_or_else(|| panic!("no row {method},{layer},{k}"))[3]
                .parse()
                .unwrap()
        };
        for layer in &names {
            for k in [2, 4, 8] {
                let independent = error("independent", layer, k);
                assert!((0.0..=1.0).contains(&independent), "{layer} {k}");
                for shared in ["shared-offline", "shared-online"] {
                    let e = error(shared, layer, k);
                    assert!(
                        independent <= e * (1.0 + 1e-9) + 1e-12,
                        "{layer} k {k}: independent {independent} > {shared} {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn quick_end_to_end_on_the_autoencoder() {
        let tmp = tempfile::tempdir().unwrap();
        let data = super::super::test_support::mnist_dir(tmp.path());
        let out = tmp.path().join("sharing");
        let args = quick_args(out.clone(), data);
        run(&args, &AtomicBool::new(false)).unwrap();
        let csv = std::fs::read_to_string(out.join("sharing.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("method,layer,k,rel_error,state_bytes"));
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        for method in Method::ALL {
            assert!(
                rows.iter().any(|r| r[0] == method.name()),
                "no {} row",
                method.name()
            );
        }
        for r in &rows {
            assert_eq!(r.len(), 5);
            let err: f64 = r[3].parse().unwrap();
            assert!(err.is_finite() && err >= 0.0, "{r:?}");
            if r[0] == "independent" || r[0] == "shared-offline" {
                assert!(err <= 1.0000001, "{r:?}");
            }
            assert!(r[4].parse::<usize>().unwrap() > 0);
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("sharing.json")).unwrap())
                .unwrap();
        assert_eq!(json["steps"], 8);
        assert_eq!(json["layers"].as_array().unwrap().len(), 2);
        for name in ["sharing.png", "sharing.svg"] {
            assert!(out.join(name).is_file(), "{name}");
        }
        let layers = json["layers"].as_array().unwrap();
        for l in layers {
            let stem = file_stem(l["name"].as_str().unwrap());
            assert!(out.join(format!("sharing_{stem}.png")).is_file());
            assert!(out.join(format!("sharing_{stem}.svg")).is_file());
        }

        // Bad input: a clear error, no panic (the model in OUT/model is reused).
        let bad = |f: &dyn Fn(&mut SharingArgs)| {
            let mut a = args.clone();
            f(&mut a);
            match run(&a, &AtomicBool::new(false)) {
                Err(AnalyzeError::Invalid(msg)) => msg,
                other => panic!("{other:?}"),
            }
        };
        assert!(bad(&|a| a.steps = Some(0)).contains("--steps"));
        assert!(bad(&|a| a.ranks = Vec::new()).contains("--ranks"));
        assert!(bad(&|a| a.ranks = vec![4, 0]).contains("--ranks"));
        assert!(bad(&|a| a.layers = vec!["nope".into()]).contains("nope"));
    }
}
