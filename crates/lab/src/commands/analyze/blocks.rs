//! `precond analyze blocks`: one dense layer's gradient second moment H in the two orderings of
//! the paper's Figure 1, and the numbers behind Lemma 1 (§2.1, eq. 2–3).
//!
//! At fixed parameters θ, N mini-batch gradients G_1..G_N of a layer (`d_in × d_out`) give
//! H = (1/N) Σ_s vec(G_s) vec(G_s)ᵀ. Its weights can be grouped into blocks two ways:
//!
//! - by output neuron (H_out, index `out·d_in + in`): block i is column i of G, the d_in weights
//!   into output neuron i: the method's blocks (NOTES §1), m = d_out blocks of size d_in;
//! - by input neuron (H_in, index `in·d_out + out`): block j is row j of G, m = d_in blocks of
//!   size d_out.
//!
//! Figure 1 shows that H_out is much closer to block diagonal than H_in. This subcommand draws a
//! window of both (H is `(d_in·d_out)²`, never formed) and measures, over the whole layer, the
//! diagonal-block Frobenius mass Σ_i ‖H^(i,i)‖²_F against the off-diagonal mass
//! Σ_{i≠j} ‖H^(i,j)‖²_F for each grouping (eq. 2's blocks), and Lemma 1's pairwise inequality
//! ‖H^(i,i)‖² + ‖H^(j,j)‖² ≥ ‖H^(i,j)‖² + ‖H^(j,i)‖² (eq. 3) on pairs of blocks.
//!
//! The masses come from N × N Gram matrices (see [`grouping_masses`]), so a 1000 × 500 layer
//! with N = 100 costs about 10¹⁰ flops in faer GEMMs and a few MB beyond the gradients.
//!
//! Note on eq. 3: with K_i the Gram of block i's samples, N²‖H^(i,j)‖²_F = ⟨K_i, K_j⟩_F, so the
//! inequality reads ‖K_i‖² + ‖K_j‖² ≥ 2⟨K_i, K_j⟩, i.e. ‖K_i − K_j‖² ≥ 0: it holds for every
//! positive semidefinite H and either grouping. The pair check is therefore a consistency check
//! of the computation (its minimum ratio says how tight the inequality is); what tells the two
//! groupings apart, as Figure 1 does, is the diagonal share.
//!
//! Ctrl-C (`stop`) is checked before the model is loaded, after the gradients are computed and
//! after each grouping of each layer; when it is set, `run` returns [`AnalyzeError::Invalid`]
//! saying the analysis was interrupted, and `blocks.json` / `blocks.csv` are not written (the
//! heatmaps of layers already finished stay).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::plot::{self, ColorScale, Heatmap};
use super::{create_dir, io_err, write_csv, write_json, AnalyzeError, Layer, Loaded, ModelArgs};

/// `precond analyze blocks` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BlocksArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (JSON, CSV, PNG, SVG; without --run the brief model goes to OUT/model)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A small configuration that finishes in about a minute on 2 cores: 16 batches of 32
    /// examples, and a brief model trained on a subset
    #[arg(long)]
    pub quick: bool,
    /// A dense layer to study, by module path (repeatable) [default: autoencoder
    /// `layers.1.weight`, the 1000→500 layer; tagger: the first encoder layer's attention output
    /// kernel `layers.0.attn_out.weight` and MLP input kernel `layers.0.mlp_in.weight`, as in the
    /// paper's Figure 1]
    #[arg(long = "layer", value_name = "NAME")]
    pub layers: Vec<String>,
    /// Mini-batch gradients sampled at the fixed parameters θ: the N samples of H
    /// [default: 100; --quick: 16]
    #[arg(long, value_name = "N")]
    pub batches: Option<usize>,
    /// Examples per mini-batch (at most the training set); 1 gives per-example gradients, the
    /// setting of Lemma 1's proof, where the mean gradient dominates H less [default: 100;
    /// --quick: 32]
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,
    /// Input neurons in the heatmap window: those with the largest mean squared gradient, in
    /// index order
    #[arg(long, value_name = "I", default_value_t = 16)]
    pub inputs: usize,
    /// Output neurons in the heatmap window: those with the largest mean squared gradient, in
    /// index order (the window is an (I·O) × (I·O) part of H)
    #[arg(long, value_name = "O", default_value_t = 8)]
    pub outputs: usize,
    /// Color scale of the heatmaps: |H| relative to each panel's largest magnitude, linear
    /// from 0, or logarithmic over --decades decades
    #[arg(long, value_enum, default_value_t = Scale::Linear)]
    pub color_scale: Scale,
    /// Decades of magnitude a log color scale shows below the largest |H| (smaller is white)
    #[arg(long, value_name = "D", default_value_t = 2.0)]
    pub decades: f64,
}

/// The heatmaps' color scale on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scale {
    Linear,
    Log,
}

/// Blocks of each grouping whose Grams are kept to check Lemma 1 on all pairs among them
/// (64 blocks: 2016 pairs).
const SAMPLED_BLOCKS: usize = 64;

/// Relative slack of Lemma 1's check for rounding: a pair satisfies eq. 3 when
/// lhs ≥ rhs · (1 − PAIR_TOLERANCE).
const PAIR_TOLERANCE: f64 = 1e-12;

/// How the window of the heatmaps is chosen (also written to `blocks.json`).
const WINDOW_SELECTION: &str = "the I input neurons (rows of G) and the O output neurons \
    (columns of G) with the largest mean squared gradient, mean over the N samples and over the \
    other axis, each in index order (ties: the lower index)";

/// How the weights of a layer are grouped into the blocks of H (Figure 1, eq. 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grouping {
    /// By output neuron: block i is column i of G (the method's blocks, NOTES §1); H_out.
    Output,
    /// By input neuron: block j is row j of G; H_in.
    Input,
}

impl Grouping {
    const BOTH: [Grouping; 2] = [Grouping::Output, Grouping::Input];

    /// The key in `blocks.json` and `blocks.csv`.
    fn key(self) -> &'static str {
        match self {
            Grouping::Output => "output",
            Grouping::Input => "input",
        }
    }

    /// A sample G with this grouping's blocks as its columns: G, or Gᵀ.
    fn blocks_as_columns(self, g: MatRef<'_, f64>) -> MatRef<'_, f64> {
        match self {
            Grouping::Output => g,
            Grouping::Input => g.transpose(),
        }
    }
}

/// Lemma 1's inequality (eq. 3) over a set of block pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PairStats {
    /// Pairs i < j checked.
    pairs: usize,
    /// Pairs with ‖H^(i,i)‖² + ‖H^(j,j)‖² ≥ (‖H^(i,j)‖² + ‖H^(j,i)‖²)(1 − [`PAIR_TOLERANCE`]).
    satisfied: usize,
    /// The least lhs / rhs over pairs with rhs > 0 (None when there is none).
    min_ratio: Option<f64>,
}

impl PairStats {
    /// Checks eq. 3 on all pairs of `blocks` blocks, given `sq_norm(i, j)` = ‖H^(i,j)‖²_F (up to
    /// a common positive scale).
    fn of(blocks: usize, sq_norm: impl Fn(usize, usize) -> f64) -> PairStats {
        let mut stats = PairStats {
            pairs: 0,
            satisfied: 0,
            min_ratio: None,
        };
        for i in 0..blocks {
            for j in i + 1..blocks {
                let lhs = sq_norm(i, i) + sq_norm(j, j);
                let rhs = sq_norm(i, j) + sq_norm(j, i);
                stats.pairs += 1;
                if lhs >= rhs * (1.0 - PAIR_TOLERANCE) {
                    stats.satisfied += 1;
                }
                if rhs > 0.0 {
                    let ratio = lhs / rhs;
                    stats.min_ratio = Some(stats.min_ratio.map_or(ratio, |m: f64| m.min(ratio)));
                }
            }
        }
        stats
    }

    fn fraction(&self) -> f64 {
        if self.pairs == 0 {
            1.0
        } else {
            self.satisfied as f64 / self.pairs as f64
        }
    }

    fn to_json(self) -> Value {
        json!({
            "pairs": self.pairs,
            "satisfied": self.satisfied,
            "satisfied_fraction": self.fraction(),
            "min_ratio": self.min_ratio,
        })
    }
}

/// The Frobenius mass of H over a whole layer, for one grouping (Lemma 1).
#[derive(Debug, Clone, PartialEq)]
struct Masses {
    /// Number of blocks m.
    blocks: usize,
    /// Variables per block.
    block_size: usize,
    /// Σ_i ‖H^(i,i)‖²_F.
    diag: f64,
    /// Σ_{i≠j} ‖H^(i,j)‖²_F.
    off: f64,
    /// The blocks whose pairs were checked (seeded sample, index order).
    sampled: Vec<usize>,
    /// Eq. 3 on all pairs among `sampled`.
    sample_pairs: PairStats,
}

impl Masses {
    /// ‖H‖²_F.
    fn total(&self) -> f64 {
        self.diag + self.off
    }

    /// diag / (diag + off): 1 for a block-diagonal H.
    fn diag_share(&self) -> f64 {
        let total = self.total();
        if total > 0.0 {
            self.diag / total
        } else {
            f64::NAN
        }
    }

    /// The diagonal share if the mass were spread evenly over the m² blocks: 1/m.
    fn uniform_share(&self) -> f64 {
        1.0 / self.blocks as f64
    }
}

/// ⟨a, b⟩_F, the sum of the elementwise products (a reduction, not a matrix product).
fn frobenius_dot(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
    let mut sum = 0.0;
    for c in 0..a.ncols() {
        for r in 0..a.nrows() {
            sum += a[(r, c)] * b[(r, c)];
        }
    }
    sum
}

/// Lemma 1's masses of H = (1/N) Σ_s vec(G_s) vec(G_s)ᵀ for `grouping` over the whole layer,
/// without forming H.
///
/// With B_i (`block_size × N`, column s = block i of G_s), H^(i,j) = (1/N) B_i B_jᵀ (eq. 2's
/// blocks), and with K_i = B_iᵀ B_i the N × N Gram of block i's samples,
/// ‖H^(i,j)‖²_F = (1/N²) tr(B_iᵀ B_i B_jᵀ B_j) = (1/N²) ⟨K_i, K_j⟩_F. Hence
/// diag = (1/N²) Σ_i ‖K_i‖²_F and off = (1/N²) Σ_{i≠j} ⟨K_i, K_j⟩ = (2/N²) Σ_i ⟨K_i, Σ_{j<i} K_j⟩,
/// summed with a running prefix Σ_{j<i} K_j: no difference of large sums, so a block-diagonal H
/// gives exactly 0 (and diag + off = (1/N²) ‖Σ_i K_i‖²_F = ‖H‖²_F).
///
/// The Grams of the `sampled` blocks (sorted) are kept, and eq. 3 is checked on all pairs among
/// them from the Gram of their vec(K_i) (one GEMM).
fn grouping_masses(samples: &[MatRef<'_, f64>], grouping: Grouping, sampled: &[usize]) -> Masses {
    let n = samples.len();
    let (block_size, blocks) = samples.first().map_or((0, 0), |g| {
        let g = grouping.blocks_as_columns(*g);
        (g.nrows(), g.ncols())
    });
    let par = Par::rayon(0);
    let mut block = Mat::<f64>::zeros(block_size, n);
    let mut gram = Mat::<f64>::zeros(n, n);
    let mut prefix = Mat::<f64>::zeros(n, n);
    let mut kept = Mat::<f64>::zeros(n * n, sampled.len());
    let (mut diag, mut off) = (0.0, 0.0);
    for i in 0..blocks {
        for (s, g) in samples.iter().enumerate() {
            block
                .col_mut(s)
                .copy_from(grouping.blocks_as_columns(*g).col(i));
        }
        // K_i = B_iᵀ B_i.
        matmul(
            gram.as_mut(),
            Accum::Replace,
            block.transpose(),
            block.as_ref(),
            1.0,
            par,
        );
        diag += frobenius_dot(gram.as_ref(), gram.as_ref());
        off += 2.0 * frobenius_dot(gram.as_ref(), prefix.as_ref());
        prefix += &gram;
        if let Ok(k) = sampled.binary_search(&i) {
            let mut col = kept.col_mut(k);
            for c in 0..n {
                for r in 0..n {
                    col[c * n + r] = gram[(r, c)];
                }
            }
        }
    }
    // ⟨K_i, K_j⟩ for the sampled blocks: N² ‖H^(i,j)‖²_F.
    let mut inner = Mat::<f64>::zeros(sampled.len(), sampled.len());
    matmul(
        inner.as_mut(),
        Accum::Replace,
        kept.transpose(),
        kept.as_ref(),
        1.0,
        par,
    );
    let scale = 1.0 / (n as f64 * n as f64).max(1.0);
    Masses {
        blocks,
        block_size,
        diag: diag * scale,
        // A sum of squares: a negative value can only be rounding.
        off: (off * scale).max(0.0),
        sampled: sampled.to_vec(),
        sample_pairs: PairStats::of(sampled.len(), |i, j| inner[(i, j)]),
    }
}

/// The window of H drawn in Figure 1's heatmaps: the I·O weights from `inputs` to `outputs`,
/// as `(h_in, h_out)`. With a = position in `inputs`, b = position in `outputs`:
/// `h_out[(b·I + a, b'·I + a')] = (1/N) Σ_s G_s[in_a, out_b] G_s[in_a', out_b']` (grouped by
/// output neuron: O blocks of I), and `h_in` holds the same entries at `a·O + b` (grouped by
/// input neuron: I blocks of O). Each is VᵀV/N for V (N × I·O) the samples' window entries.
fn window_matrices(
    samples: &[MatRef<'_, f64>],
    inputs: &[usize],
    outputs: &[usize],
) -> (Mat<f64>, Mat<f64>) {
    let (i_len, o_len) = (inputs.len(), outputs.len());
    let n = samples.len();
    let second_moment = |v: Mat<f64>| {
        let mut h = Mat::<f64>::zeros(v.ncols(), v.ncols());
        matmul(
            h.as_mut(),
            Accum::Replace,
            v.transpose(),
            v.as_ref(),
            1.0 / (n as f64).max(1.0),
            Par::Seq,
        );
        h
    };
    let v_out = Mat::from_fn(n, i_len * o_len, |s, p| {
        samples[s][(inputs[p % i_len], outputs[p / i_len])]
    });
    let v_in = Mat::from_fn(n, i_len * o_len, |s, q| {
        samples[s][(inputs[q / o_len], outputs[q % o_len])]
    });
    (second_moment(v_in), second_moment(v_out))
}

/// Eq. 3 on all pairs of the `block_size` diagonal blocks of a window matrix, from its blocks.
fn window_pairs(h: MatRef<'_, f64>, block_size: usize) -> PairStats {
    let blocks = h.nrows() / block_size.max(1);
    PairStats::of(blocks, |i, j| {
        h.submatrix(i * block_size, j * block_size, block_size, block_size)
            .squared_norm_l2()
    })
}

/// The diagonal share of a window matrix with blocks of `block_size`: Σ_i ‖H^(i,i)‖²_F / ‖H‖²_F
/// over the window's blocks (what the heatmap shows; NaN for a zero window).
fn window_diag_share(h: MatRef<'_, f64>, block_size: usize) -> f64 {
    let blocks = h.nrows() / block_size.max(1);
    let diag: f64 = (0..blocks)
        .map(|i| {
            h.submatrix(i * block_size, i * block_size, block_size, block_size)
                .squared_norm_l2()
        })
        .sum();
    let total = h.squared_norm_l2();
    if total > 0.0 {
        diag / total
    } else {
        f64::NAN
    }
}

/// The mean squared gradient of each input neuron (row of G) and of each output neuron
/// (column), the mean over the samples and the other axis: `(inputs, outputs)`.
fn neuron_energy(samples: &[MatRef<'_, f64>]) -> (Vec<f64>, Vec<f64>) {
    let (d_in, d_out) = samples.first().map_or((0, 0), |g| (g.nrows(), g.ncols()));
    let (mut rows, mut cols) = (vec![0.0; d_in], vec![0.0; d_out]);
    for g in samples {
        for (c, col_sum) in cols.iter_mut().enumerate() {
            for (r, row_sum) in rows.iter_mut().enumerate() {
                let sq = g[(r, c)] * g[(r, c)];
                *row_sum += sq;
                *col_sum += sq;
            }
        }
    }
    let n = samples.len().max(1) as f64;
    rows.iter_mut().for_each(|v| *v /= n * d_out.max(1) as f64);
    cols.iter_mut().for_each(|v| *v /= n * d_in.max(1) as f64);
    (rows, cols)
}

/// The indices of the `k` largest `values`, in index order (ties: the lower index first).
fn largest(values: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    order
}

/// `min(m, SAMPLED_BLOCKS)` of `m` blocks, seeded, in index order.
fn sample_blocks(rng: &mut ChaCha8Rng, m: usize) -> Vec<usize> {
    let mut picked = rand::seq::index::sample(rng, m, m.min(SAMPLED_BLOCKS)).into_vec();
    picked.sort_unstable();
    picked
}

/// A layer name as a file-name part: anything but ASCII letters, digits, `-` and `_` → `_`.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes a matrix as CSV: one line per row, no header.
fn write_matrix_csv(path: &Path, m: MatRef<'_, f64>) -> Result<(), AnalyzeError> {
    let mut text = String::with_capacity(m.nrows() * m.ncols() * 24);
    for r in 0..m.nrows() {
        for c in 0..m.ncols() {
            if c > 0 {
                text.push(',');
            }
            // `write!` to a String cannot fail.
            let _ = write!(text, "{}", m[(r, c)]);
        }
        text.push('\n');
    }
    fs::write(path, text).map_err(io_err(path))
}

/// The numeric settings after defaults, validated before anything is loaded.
#[derive(Debug, Clone, Copy)]
struct Settings {
    batches: usize,
    batch_size: usize,
    inputs: usize,
    outputs: usize,
    color_scale: ColorScale,
}

impl Settings {
    fn of(args: &BlocksArgs) -> Result<Settings, AnalyzeError> {
        let s = Settings {
            batches: args.batches.unwrap_or(if args.quick { 16 } else { 100 }),
            batch_size: args.batch_size.unwrap_or(if args.quick { 32 } else { 100 }),
            inputs: args.inputs,
            outputs: args.outputs,
            color_scale: match args.color_scale {
                Scale::Linear => ColorScale::Linear,
                Scale::Log => ColorScale::Log {
                    decades: args.decades,
                },
            },
        };
        let bad = |msg: &str| Err(AnalyzeError::Invalid(format!("analyze blocks: {msg}")));
        if s.batches == 0 {
            return bad("--batches must be at least 1");
        }
        if s.batch_size == 0 {
            return bad("--batch-size must be at least 1");
        }
        if s.inputs == 0 || s.outputs == 0 {
            return bad("--inputs and --outputs must be at least 1");
        }
        if !(args.decades.is_finite() && args.decades > 0.0) {
            return bad("--decades must be finite and > 0");
        }
        Ok(s)
    }
}

/// The layers of `names`, or the defaults of the model (see [`BlocksArgs::layers`]).
fn chosen_layers(loaded: &Loaded, names: &[String]) -> Result<Vec<Layer>, AnalyzeError> {
    let layers = if names.is_empty() {
        let all = loaded.layers();
        let listed = || {
            let names: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
            names.join(", ")
        };
        match loaded {
            Loaded::Autoencoder { .. } => {
                let (d_in, d_out) = (
                    crate::models::autoencoder::WIDTHS[1],
                    crate::models::autoencoder::WIDTHS[2],
                );
                let layer = all
                    .iter()
                    .find(|l| (l.d_in, l.d_out) == (d_in, d_out))
                    .ok_or_else(|| {
                        AnalyzeError::Invalid(format!(
                            "analyze blocks: the autoencoder has no {d_in}→{d_out} layer; pick \
                             one with --layer from: {}",
                            listed()
                        ))
                    })?;
                vec![layer.clone()]
            }
            Loaded::Tagger { .. } => ["attn_out.weight", "mlp_in.weight"]
                .iter()
                .map(|suffix| {
                    all.iter()
                        .find(|l| l.name.ends_with(&format!(".{suffix}")))
                        .cloned()
                        .ok_or_else(|| {
                            AnalyzeError::Invalid(format!(
                                "analyze blocks: the tagger has no layer *.{suffix}; pick one \
                                 with --layer from: {}",
                                listed()
                            ))
                        })
                })
                .collect::<Result<_, _>>()?,
        }
    } else {
        names
            .iter()
            .map(|name| loaded.layer(name))
            .collect::<Result<Vec<_>, _>>()?
    };
    for (k, layer) in layers.iter().enumerate() {
        if let Some(other) = layers[..k]
            .iter()
            .find(|l| file_stem(&l.name) == file_stem(&layer.name))
        {
            return Err(AnalyzeError::Invalid(format!(
                "analyze blocks: layers {:?} and {:?} share the file name {:?} (each --layer once)",
                other.name,
                layer.name,
                file_stem(&layer.name)
            )));
        }
    }
    Ok(layers)
}

fn interrupted(stop: &AtomicBool, done: usize, total: usize) -> Result<(), AnalyzeError> {
    if stop.load(Ordering::Relaxed) {
        Err(AnalyzeError::Invalid(format!(
            "analyze blocks: interrupted after {done} of {total} layers; blocks.json not written"
        )))
    } else {
        Ok(())
    }
}

/// A grouping's numbers on the heatmap window.
struct WindowStats {
    /// Blocks in the window (O for H_out, I for H_in).
    blocks: usize,
    /// Diagonal-block share of the window's squared Frobenius norm.
    diag_share: f64,
    /// Eq. 3 on all pairs of the window's blocks.
    pairs: PairStats,
}

/// One layer's results.
struct LayerReport {
    layer: Layer,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Output grouping, then input grouping.
    masses: Vec<(Grouping, Masses, WindowStats)>,
    files: Value,
}

/// Analyses one layer from its gradient samples and writes its heatmaps and window CSVs.
fn analyze_layer(
    layer: &Layer,
    samples: &[MatRef<'_, f64>],
    settings: &Settings,
    seed: u64,
    out: &Path,
    stop: &AtomicBool,
    (done, total): (usize, usize),
) -> Result<LayerReport, AnalyzeError> {
    let (input_energy, output_energy) = neuron_energy(samples);
    let inputs = largest(&input_energy, settings.inputs);
    let outputs = largest(&output_energy, settings.outputs);
    let (h_in, h_out) = window_matrices(samples, &inputs, &outputs);

    let stem = file_stem(&layer.name);
    let h_in_csv = format!("h_in_{stem}.csv");
    let h_out_csv = format!("h_out_{stem}.csv");
    write_matrix_csv(&out.join(&h_in_csv), h_in.as_ref())?;
    write_matrix_csv(&out.join(&h_out_csv), h_out.as_ref())?;
    let (i_len, o_len) = (inputs.len(), outputs.len());
    let size = i_len * o_len;
    let row_major = |m: &Mat<f64>| -> Vec<f64> {
        (0..m.nrows())
            .flat_map(|r| (0..m.ncols()).map(move |c| m[(r, c)]))
            .collect()
    };
    let (in_values, out_values) = (row_major(&h_in), row_major(&h_out));
    let in_title = format!("H_in: grouped by input neuron ({i_len} blocks of {o_len})");
    let out_title = format!("H_out: grouped by output neuron ({o_len} blocks of {i_len})");
    let figure = format!("blocks_{stem}");
    plot::heatmaps(
        &out.join(&figure),
        &format!(
            "{}: |H| of {i_len} inputs × {o_len} outputs, N = {} ({})",
            layer.name,
            samples.len(),
            settings.color_scale.describe()
        ),
        &[
            Heatmap {
                title: &in_title,
                rows: size,
                cols: size,
                values: &in_values,
            },
            Heatmap {
                title: &out_title,
                rows: size,
                cols: size,
                values: &out_values,
            },
        ],
        settings.color_scale,
    )?;

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut masses = Vec::with_capacity(2);
    for grouping in Grouping::BOTH {
        let m = match grouping {
            Grouping::Output => layer.d_out,
            Grouping::Input => layer.d_in,
        };
        let sampled = sample_blocks(&mut rng, m);
        let (window, block_size) = match grouping {
            Grouping::Output => (h_out.as_ref(), i_len),
            Grouping::Input => (h_in.as_ref(), o_len),
        };
        let window = WindowStats {
            blocks: window.nrows() / block_size,
            diag_share: window_diag_share(window, block_size),
            pairs: window_pairs(window, block_size),
        };
        masses.push((
            grouping,
            grouping_masses(samples, grouping, &sampled),
            window,
        ));
        interrupted(stop, done, total)?;
    }
    Ok(LayerReport {
        layer: layer.clone(),
        inputs,
        outputs,
        masses,
        files: json!({
            "heatmap": [format!("{figure}.png"), format!("{figure}.svg")],
            "h_in": h_in_csv,
            "h_out": h_out_csv,
        }),
    })
}

/// Runs `precond analyze blocks` (see the module documentation).
pub fn run(args: &BlocksArgs, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    let settings = Settings::of(args)?;
    interrupted(stop, 0, args.layers.len().max(1))?;
    create_dir(&args.out)?;
    let loaded = Loaded::open(&args.model, args.quick, &args.out)?;
    let layers = chosen_layers(&loaded, &args.layers)?;
    for layer in &layers {
        if settings.inputs > layer.d_in || settings.outputs > layer.d_out {
            return Err(AnalyzeError::Invalid(format!(
                "analyze blocks: the window of --inputs {} × --outputs {} does not fit layer {} \
                 ({} inputs × {} outputs)",
                settings.inputs, settings.outputs, layer.name, layer.d_in, layer.d_out
            )));
        }
    }
    let batch_size = settings.batch_size.min(loaded.train_len());
    if batch_size == 0 {
        return Err(AnalyzeError::Invalid(
            "analyze blocks: the training set is empty".into(),
        ));
    }
    let total = layers.len();
    eprintln!(
        "analyze blocks: {} gradients of batches of {batch_size} at fixed θ for {}",
        settings.batches,
        layers
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let grads = loaded.gradients(&layers, settings.batches, batch_size, args.model.seed);
    interrupted(stop, 0, total)?;

    // [batch][layer] → [layer][batch], so that each layer's samples can be freed after use.
    let mut per_layer: Vec<Vec<Mat<f64>>> = layers
        .iter()
        .map(|_| Vec::with_capacity(grads.len()))
        .collect();
    for batch in grads {
        for (k, g) in batch.into_iter().enumerate() {
            if let Some(samples) = per_layer.get_mut(k) {
                samples.push(g);
            }
        }
    }

    let mut reports = Vec::with_capacity(total);
    for (k, (layer, samples)) in layers.iter().zip(per_layer).enumerate() {
        let finite = samples
            .iter()
            .all(|g| (0..g.ncols()).all(|c| (0..g.nrows()).all(|r| g[(r, c)].is_finite())));
        if !finite {
            return Err(AnalyzeError::Invalid(format!(
                "analyze blocks: a gradient of layer {} is not finite (has the model diverged?)",
                layer.name
            )));
        }
        let views: Vec<MatRef<'_, f64>> = samples.iter().map(Mat::as_ref).collect();
        let seed = args.model.seed.wrapping_add(k as u64);
        reports.push(analyze_layer(
            layer,
            &views,
            &settings,
            seed,
            &args.out,
            stop,
            (k, total),
        )?);
    }

    let mut entries = Vec::with_capacity(reports.len());
    let mut rows = Vec::new();
    for report in &reports {
        let layer = &report.layer;
        let mut entry = json!({
            "name": layer.name,
            "d_in": layer.d_in,
            "d_out": layer.d_out,
            "samples": settings.batches,
            "batch_size": batch_size,
            "window": {
                "inputs": report.inputs,
                "outputs": report.outputs,
                "selection": WINDOW_SELECTION,
            },
            "files": report.files,
        });
        for (grouping, masses, window) in &report.masses {
            entry[grouping.key()] = json!({
                "blocks": masses.blocks,
                "block_size": masses.block_size,
                "diag_mass": masses.diag,
                "off_mass": masses.off,
                "total_mass": masses.total(),
                "diag_share": masses.diag_share(),
                "uniform_share": masses.uniform_share(),
                "lemma1": {
                    "layer_sample": {
                        "blocks": masses.sampled,
                        "stats": masses.sample_pairs.to_json(),
                    },
                    "window": window.pairs.to_json(),
                },
                "window": {
                    "blocks": window.blocks,
                    "diag_share": window.diag_share,
                    "uniform_share": 1.0 / window.blocks as f64,
                },
            });
            let min = |s: &PairStats| s.min_ratio.map_or("-".into(), |r| format!("{r:.4}"));
            println!(
                "{} ({}×{}, N={}) by {:<6}: diag share {:.4} (uniform {:.2e}, ×{:.1}); \
                 diag {:.3e} off {:.3e}; Lemma 1 on {}/{} sampled pairs (min lhs/rhs {}), \
                 {}/{} window pairs (min {}); window diag share {:.3} (uniform {:.3})",
                layer.name,
                layer.d_in,
                layer.d_out,
                settings.batches,
                grouping.key(),
                masses.diag_share(),
                masses.uniform_share(),
                masses.diag_share() / masses.uniform_share(),
                masses.diag,
                masses.off,
                masses.sample_pairs.satisfied,
                masses.sample_pairs.pairs,
                min(&masses.sample_pairs),
                window.pairs.satisfied,
                window.pairs.pairs,
                min(&window.pairs),
                window.diag_share,
                1.0 / window.blocks as f64,
            );
            rows.push(vec![
                layer.name.clone(),
                grouping.key().to_string(),
                masses.blocks.to_string(),
                masses.block_size.to_string(),
                masses.diag.to_string(),
                masses.off.to_string(),
                masses.diag_share().to_string(),
                masses.uniform_share().to_string(),
                masses.sample_pairs.fraction().to_string(),
                masses
                    .sample_pairs
                    .min_ratio
                    .map_or(String::new(), |r| r.to_string()),
                window.pairs.fraction().to_string(),
                window
                    .pairs
                    .min_ratio
                    .map_or(String::new(), |r| r.to_string()),
                window.diag_share.to_string(),
            ]);
        }
        entries.push(entry);
    }
    let task = match &loaded {
        Loaded::Autoencoder { .. } => "autoencoder",
        Loaded::Tagger { .. } => "tagger",
    };
    let model_dir = args
        .model
        .run
        .clone()
        .unwrap_or_else(|| args.out.join("model"));
    let model_config = serde_json::to_value(loaded.config())
        .map_err(|e| AnalyzeError::Invalid(format!("analyze blocks: model config: {e}")))?;
    write_json(
        &args.out.join("blocks.json"),
        &json!({
            "task": task,
            "model_dir": model_dir.display().to_string(),
            "model_config": model_config,
            "seed": args.model.seed,
            "batches": settings.batches,
            "batch_size": batch_size,
            "window_selection": WINDOW_SELECTION,
            "color_scale": settings.color_scale.describe(),
            "pair_tolerance": PAIR_TOLERANCE,
            "sampled_blocks": SAMPLED_BLOCKS,
            "layers": entries,
        }),
    )?;
    write_csv(
        &args.out.join("blocks.csv"),
        &[
            "layer",
            "grouping",
            "blocks",
            "block_size",
            "diag_mass",
            "off_mass",
            "diag_share",
            "uniform_share",
            "lemma1_sample_fraction",
            "lemma1_sample_min_ratio",
            "lemma1_window_fraction",
            "lemma1_window_min_ratio",
            "window_diag_share",
        ],
        &rows,
    )?;
    eprintln!("analyze blocks: wrote {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn random_samples(d_in: usize, d_out: usize, n: usize, seed: u64) -> Vec<Mat<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| Mat::from_fn(d_in, d_out, |_, _| rng.random_range(-1.0..1.0)))
            .collect()
    }

    fn views(samples: &[Mat<f64>]) -> Vec<MatRef<'_, f64>> {
        samples.iter().map(Mat::as_ref).collect()
    }

    /// The index of weight (input, output) in vec(G) under `grouping`: out·d_in + in (H_out) or
    /// in·d_out + out (H_in).
    fn index(grouping: Grouping, d_in: usize, d_out: usize, input: usize, output: usize) -> usize {
        match grouping {
            Grouping::Output => output * d_in + input,
            Grouping::Input => input * d_out + output,
        }
    }

    /// The full H = (1/N) Σ_s vec(G_s) vec(G_s)ᵀ in `grouping`'s order, by explicit loops.
    fn dense_h(samples: &[Mat<f64>], grouping: Grouping) -> Vec<Vec<f64>> {
        let (d_in, d_out) = (samples[0].nrows(), samples[0].ncols());
        let dim = d_in * d_out;
        let mut h = vec![vec![0.0; dim]; dim];
        for g in samples {
            let mut v = vec![0.0; dim];
            for i in 0..d_in {
                for o in 0..d_out {
                    v[index(grouping, d_in, d_out, i, o)] = g[(i, o)];
                }
            }
            for p in 0..dim {
                for q in 0..dim {
                    h[p][q] += v[p] * v[q] / samples.len() as f64;
                }
            }
        }
        h
    }

    /// ‖H^(i,j)‖²_F of a dense H with blocks of `b`, for all i, j.
    fn dense_block_norms(h: &[Vec<f64>], b: usize) -> Vec<Vec<f64>> {
        let m = h.len() / b;
        let mut norms = vec![vec![0.0; m]; m];
        for (p, row) in h.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                norms[p / b][q / b] += v * v;
            }
        }
        norms
    }

    /// (diag, off) masses of a dense H with blocks of `b`.
    fn dense_masses(h: &[Vec<f64>], b: usize) -> (f64, f64) {
        let norms = dense_block_norms(h, b);
        let mut diag = 0.0;
        let mut off = 0.0;
        for (i, row) in norms.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                if i == j {
                    diag += v;
                } else {
                    off += v;
                }
            }
        }
        (diag, off)
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs())
    }

    /// The Gram-based masses of both groupings equal those of the explicitly formed H, and so
    /// does Lemma 1's pair check on all blocks.
    #[test]
    fn gram_masses_match_the_dense_second_moment() {
        let (d_in, d_out, n) = (3, 4, 5);
        let samples = random_samples(d_in, d_out, n, 7);
        for grouping in Grouping::BOTH {
            let (b, m) = match grouping {
                Grouping::Output => (d_in, d_out),
                Grouping::Input => (d_out, d_in),
            };
            let all: Vec<usize> = (0..m).collect();
            let masses = grouping_masses(&views(&samples), grouping, &all);
            assert_eq!((masses.blocks, masses.block_size), (m, b));
            let h = dense_h(&samples, grouping);
            let (diag, off) = dense_masses(&h, b);
            assert!(
                close(masses.diag, diag, 1e-12),
                "{grouping:?}: {} vs {diag}",
                masses.diag
            );
            assert!(
                close(masses.off, off, 1e-12),
                "{grouping:?}: {} vs {off}",
                masses.off
            );
            let total: f64 = h.iter().flatten().map(|v| v * v).sum();
            assert!(close(masses.total(), total, 1e-12));
            assert!(masses.diag_share() > 0.0 && masses.diag_share() < 1.0);
            assert_eq!(masses.uniform_share(), 1.0 / m as f64);
            // Eq. 3 on all pairs, against the dense blocks.
            let norms = dense_block_norms(&h, b);
            let want = PairStats::of(m, |i, j| norms[i][j]);
            let got = masses.sample_pairs;
            assert_eq!(
                (got.pairs, got.satisfied),
                (m * (m - 1) / 2, m * (m - 1) / 2)
            );
            assert_eq!(want.pairs, got.pairs);
            assert!(close(
                got.min_ratio.unwrap(),
                want.min_ratio.unwrap(),
                1e-12
            ));
            assert!(got.min_ratio.unwrap() >= 1.0);
        }
        // A sample of blocks checks only the pairs among them.
        let masses = grouping_masses(&views(&samples), Grouping::Output, &[1, 3]);
        assert_eq!(masses.sample_pairs.pairs, 1);
    }

    /// Samples each with one nonzero column make H_out exactly block diagonal; H_in is not.
    #[test]
    fn one_column_gradients_give_a_block_diagonal_h_out() {
        let (d_in, d_out, n) = (5, 3, 9);
        let mut samples = random_samples(d_in, d_out, n, 11);
        for (s, g) in samples.iter_mut().enumerate() {
            for c in (0..d_out).filter(|&c| c != s % d_out) {
                g.col_mut(c).fill(0.0);
            }
        }
        let by_output = grouping_masses(&views(&samples), Grouping::Output, &[0, 1, 2]);
        assert_eq!(by_output.off, 0.0);
        assert_eq!(by_output.diag_share(), 1.0);
        assert!(by_output.diag > 0.0);
        // The off-diagonal blocks of H_out are zero: eq. 3's right side vanishes.
        assert_eq!(by_output.sample_pairs.min_ratio, None);
        assert_eq!(by_output.sample_pairs.satisfied, 3);
        let by_input = grouping_masses(&views(&samples), Grouping::Input, &[0, 1]);
        assert!(by_input.off > 0.0);
        assert!(by_input.diag_share() < 0.9 * by_output.diag_share());
        assert!(close(by_input.total(), by_output.total(), 1e-12));
    }

    /// The window matrices are the explicit H restricted to the window, in each grouping's
    /// order; the window's pair check uses their blocks; the window picks the neurons with the
    /// largest mean squared gradient.
    #[test]
    fn window_matrices_are_the_permuted_dense_h() {
        let (d_in, d_out, n) = (5, 4, 3);
        let samples = random_samples(d_in, d_out, n, 3);
        let inputs = [0, 2, 4];
        let outputs = [1, 3];
        let (i_len, o_len) = (inputs.len(), outputs.len());
        let (h_in, h_out) = window_matrices(&views(&samples), &inputs, &outputs);
        assert_eq!((h_in.nrows(), h_out.ncols()), (6, 6));
        let dense_in = dense_h(&samples, Grouping::Input);
        let dense_out = dense_h(&samples, Grouping::Output);
        for (a, &i) in inputs.iter().enumerate() {
            for (b, &o) in outputs.iter().enumerate() {
                for (a2, &i2) in inputs.iter().enumerate() {
                    for (b2, &o2) in outputs.iter().enumerate() {
                        let want_out = dense_out[o * d_in + i][o2 * d_in + i2];
                        let got_out = h_out[(b * i_len + a, b2 * i_len + a2)];
                        assert!(close(got_out, want_out, 1e-12), "{got_out} vs {want_out}");
                        let want_in = dense_in[i * d_out + o][i2 * d_out + o2];
                        let got_in = h_in[(a * o_len + b, a2 * o_len + b2)];
                        assert!(close(got_in, want_in, 1e-12), "{got_in} vs {want_in}");
                    }
                }
            }
        }
        // The window's pair check: O blocks of I in H_out, I blocks of O in H_in.
        assert_eq!(window_pairs(h_out.as_ref(), i_len).pairs, 1);
        let stats = window_pairs(h_in.as_ref(), o_len);
        assert_eq!((stats.pairs, stats.satisfied), (3, 3));
        let full = dense_h(&samples, Grouping::Input);
        let norms = dense_block_norms(&full, d_out);
        // With the whole layer as the window, the pair check is the dense one.
        let (h_all_in, _) = window_matrices(&views(&samples), &[0, 1, 2, 3, 4], &[0, 1, 2, 3]);
        let got = window_pairs(h_all_in.as_ref(), d_out);
        let want = PairStats::of(d_in, |i, j| norms[i][j]);
        assert_eq!(got.pairs, want.pairs);
        let (diag, off) = dense_masses(&full, d_out);
        let share = window_diag_share(h_all_in.as_ref(), d_out);
        assert!(close(share, diag / (diag + off), 1e-12), "{share}");
        assert!(close(
            got.min_ratio.unwrap(),
            want.min_ratio.unwrap(),
            1e-12
        ));

        // Selection: the largest mean squared gradients, in index order.
        assert_eq!(largest(&[1.0, 5.0, 3.0, 5.0, 0.0], 2), vec![1, 3]);
        assert_eq!(largest(&[2.0, 2.0, 2.0], 2), vec![0, 1]);
        let (rows, cols) = neuron_energy(&views(&samples));
        for i in 0..d_in {
            let mut want = 0.0;
            for g in &samples {
                for o in 0..d_out {
                    want += g[(i, o)] * g[(i, o)] / (n * d_out) as f64;
                }
            }
            assert!(close(rows[i], want, 1e-12));
        }
        for o in 0..d_out {
            let mut want = 0.0;
            for g in &samples {
                for i in 0..d_in {
                    want += g[(i, o)] * g[(i, o)] / (n * d_in) as f64;
                }
            }
            assert!(close(cols[o], want, 1e-12));
        }
        assert_eq!(
            file_stem("layers.0.attn_out.weight"),
            "layers_0_attn_out_weight"
        );
    }

    fn quick_args(tmp: &Path, out: &Path) -> BlocksArgs {
        BlocksArgs {
            model: ModelArgs {
                data: Some(super::super::test_support::mnist_dir(tmp)),
                ..Default::default()
            },
            out: out.to_path_buf(),
            quick: true,
            layers: Vec::new(),
            batches: None,
            batch_size: None,
            inputs: 16,
            outputs: 8,
            color_scale: Scale::Linear,
            decades: 2.0,
        }
    }

    /// Bad numbers and Ctrl-C are refused before anything is loaded or written.
    #[test]
    fn bad_flags_and_stop_fail_early() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("never");
        let args = quick_args(tmp.path(), &out);
        let no_stop = AtomicBool::new(false);
        for bad in [
            BlocksArgs {
                batches: Some(0),
                ..args.clone()
            },
            BlocksArgs {
                batch_size: Some(0),
                ..args.clone()
            },
            BlocksArgs {
                inputs: 0,
                ..args.clone()
            },
            BlocksArgs {
                color_scale: Scale::Log,
                decades: 0.0,
                ..args.clone()
            },
        ] {
            let err = run(&bad, &no_stop).unwrap_err();
            assert!(matches!(err, AnalyzeError::Invalid(_)), "{err}");
        }
        let err = run(&args, &AtomicBool::new(true)).unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert!(!out.exists());
    }

    /// `--quick` on the autoencoder writes the figure, the window CSVs and a blocks.json with
    /// consistent numbers; a window larger than the layer and an unknown layer are refused.
    #[test]
    fn quick_autoencoder_end_to_end() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let args = quick_args(tmp.path(), &out);
        run(&args, &AtomicBool::new(false)).unwrap();
        for file in [
            "blocks_layers_1_weight.png",
            "blocks_layers_1_weight.svg",
            "h_in_layers_1_weight.csv",
            "h_out_layers_1_weight.csv",
            "blocks.csv",
        ] {
            assert!(out.join(file).is_file(), "{file}");
        }
        let csv = fs::read_to_string(out.join("h_out_layers_1_weight.csv")).unwrap();
        assert_eq!(csv.lines().count(), 128);
        assert!(csv.lines().all(|l| l.split(',').count() == 128));
        let text = fs::read_to_string(out.join("blocks.json")).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        let layers = json["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        let layer = &layers[0];
        assert_eq!(layer["name"], "layers.1.weight");
        assert_eq!(
            (layer["d_in"].as_u64(), layer["d_out"].as_u64()),
            (Some(1000), Some(500))
        );
        assert_eq!(layer["samples"].as_u64(), Some(16));
        assert_eq!(layer["window"]["inputs"].as_array().unwrap().len(), 16);
        assert_eq!(layer["window"]["outputs"].as_array().unwrap().len(), 8);
        for key in ["output", "input"] {
            let g = &layer[key];
            let share = g["diag_share"].as_f64().unwrap();
            assert!(share > 0.0 && share <= 1.0, "{key}: {share}");
            let uniform = g["uniform_share"].as_f64().unwrap();
            assert!(
                uniform > 0.0 && uniform < share,
                "{key}: {uniform} vs {share}"
            );
            let sample = &g["lemma1"]["layer_sample"]["stats"];
            let window_share = g["window"]["diag_share"].as_f64().unwrap();
            assert!(window_share > 0.0 && window_share <= 1.0, "{window_share}");
            assert_eq!(sample["pairs"].as_u64(), Some(2016));
            assert_eq!(sample["satisfied_fraction"].as_f64(), Some(1.0));
            assert_eq!(
                g["lemma1"]["window"]["satisfied_fraction"].as_f64(),
                Some(1.0)
            );
        }
        assert_eq!(layer["output"]["blocks"].as_u64(), Some(500));
        assert_eq!(layer["input"]["blocks"].as_u64(), Some(1000));

        // The model in OUT/model is reused by these.
        let too_wide = BlocksArgs {
            inputs: 1001,
            ..args.clone()
        };
        let err = run(&too_wide, &AtomicBool::new(false)).unwrap_err();
        assert!(err.to_string().contains("--inputs"), "{err}");
        let unknown = BlocksArgs {
            layers: vec!["nope".into()],
            ..args
        };
        assert!(run(&unknown, &AtomicBool::new(false)).is_err());
    }
}
