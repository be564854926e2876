//! `precond analyze features`: is the input X of a layer close to low rank?
//!
//! The paper's §2.2 ("Why can we share basis?") notes that at a fixed θ every diagonal block of
//! a dense layer's preconditioner, H^(i) = Xᵀ (D_Z)_{:,i} ((D_Z)_{:,i})ᵀ X, lies in the row space
//! of X, the layer's input over n samples, so that one basis can serve every block when X is
//! close to low rank. Its Figure 2 shows the singular values of X over 1024 samples after each
//! Transformer block: "the top 10% of the rank accounts for over 80% of the singular values".
//! This measures the same on the user's model.
//!
//! What X is (one row per sample, one column per feature):
//!
//! - autoencoder: the input of each of the 8 dense layers — the images for `layers.0`, then each
//!   hidden activation (after its tanh; the linear 30-unit code for `layers.4`) — over the first
//!   N training images in file order (not a random sample: a model and N always give the same X;
//!   MNIST's file order is not sorted by digit).
//! - tagger: the residual stream after the embedding stage (token embedding + sinusoidal
//!   positions: the input of block 0) and after each encoder block, without dropout. One row per
//!   real token: the training sentences are taken whole, in file order, until they hold N real
//!   tokens, and X keeps the first N rows (the last sentence may be cut; its rows are still
//!   computed with the whole sentence in view). Padding rows are left out. Each sentence's ROOT
//!   token is kept: it is a real position of the training loss, so its rows belong to the X of
//!   §2.2.
//!
//! When the training data holds fewer than N samples, N is lowered to what there is, with a
//! warning on stderr (`n` in `features.json` is the number used).
//!
//! Per layer, from the singular values σ_1 ≥ … ≥ σ_m of X (m = min(n, d); faer's SVD in f64; X
//! is not centered, as in the paper):
//!
//! - `rank`: the numerical rank, #{σ_j > σ_1 · max(n, d) · ε₃₂} with ε₃₂ = 2⁻²³ the f32 machine
//!   epsilon (NumPy's `matrix_rank` default for f32 input): X is computed in f32, so smaller
//!   singular values are below the rounding error of X itself.
//! - `top10_share`: Σ_{j≤k} σ_j / Σ_j σ_j with k = ⌈m / 10⌉ (the top 10% of the spectrum: the
//!   paper's "top 10% of the rank"; the ceiling in integer arithmetic, so m = 30 gives k = 3).
//! - `top10_energy`: the same share of Σ σ_j² (the squared Frobenius norm of X).
//! - `effective_rank`: exp(−Σ p_j ln p_j) with p_j = σ_j / Σ σ (Roy & Vetterli, 2007): m for a
//!   flat spectrum, 1 for rank one.
//!
//! A layer whose X is all zeros has rank 0 and shares and effective rank 0.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use faer::Mat;
use serde_json::json;

use super::plot::{self, LinePlot, Series};
use super::{create_dir, to_mat, write_csv, write_json, AnalyzeError, Loaded, ModelArgs};
use crate::data::conllu::{Encoded, PAD};
use crate::data::mnist::{Split, PIXELS};
use crate::models::autoencoder::Autoencoder;
use crate::models::tagger::{Batch, Tagger};

/// Samples per X by default: the paper's Figure 2 uses 1024.
const PAPER_SAMPLES: usize = 1024;

/// Samples per X with `--quick`.
const QUICK_SAMPLES: usize = 256;

/// The paper's claim (§2.2, Figure 2): the top 10% of the spectrum carries more than this share
/// of Σσ.
const CLAIM_SHARE: f64 = 0.8;

/// Sentences per forward pass of the tagger (the rows do not depend on the batching: padding
/// keys are masked).
const TAGGER_BATCH: usize = 64;

/// `precond analyze features` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (features.csv, features.json, PNG and SVG plots; OUT/model holds the
    /// brief Adam run when there is no --run)
    #[arg(long)]
    pub out: PathBuf,
    /// A small configuration that finishes in about a minute on 2 cores (256 samples and a brief
    /// run on 2000 images / 200 sentences)
    #[arg(long)]
    pub quick: bool,
    /// Samples (rows of X): the first N training images (autoencoder) or the first N real
    /// tokens of the training sentences in order, ROOT included (tagger); lowered with a warning
    /// when the data holds fewer [default: 1024, as the paper's Figure 2; --quick: 256]
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,
}

/// One layer's feature matrix X: `rows` samples × `cols` features, row-major f32.
#[derive(Debug, Clone)]
struct LayerFeatures {
    /// `layers.<i>.input` (autoencoder) or `embedding.output` / `layers.<i>.output` (tagger).
    name: String,
    /// What X is, in words.
    description: String,
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

/// The singular values of one X and the summaries of the module docs.
#[derive(Debug, Clone, PartialEq)]
struct Spectrum {
    /// Rows (samples).
    n: usize,
    /// Columns (features).
    d: usize,
    /// All min(n, d) singular values, nonincreasing.
    singular_values: Vec<f64>,
    /// σ_1 · max(n, d) · ε₃₂: singular values above it count towards the rank.
    tolerance: f64,
    rank: usize,
    /// k = ⌈min(n, d) / 10⌉: how many singular values make the top 10%.
    top_count: usize,
    top10_share: f64,
    top10_energy: f64,
    effective_rank: f64,
}

/// ⌈m / 10⌉ for m = min(n, d): the number of singular values in the top 10% of the spectrum.
fn top_count(n: usize, d: usize) -> usize {
    n.min(d).div_ceil(10)
}

impl Spectrum {
    /// The spectrum of `x` (faer's SVD, singular values only).
    fn of(x: &Mat<f64>) -> Result<Spectrum, String> {
        let values = x
            .singular_values()
            .map_err(|e| format!("the SVD did not converge: {e:?}"))?;
        Ok(Spectrum::from_singular_values(values, x.nrows(), x.ncols()))
    }

    /// The summaries of singular values `values` of an `n × d` matrix.
    fn from_singular_values(mut values: Vec<f64>, n: usize, d: usize) -> Spectrum {
        values.sort_by(|a, b| b.total_cmp(a));
        let sigma_max = values.first().copied().unwrap_or(0.0);
        let tolerance = sigma_max * n.max(d) as f64 * f64::from(f32::EPSILON);
        let rank = values.iter().filter(|&&s| s > tolerance).count();
        let k = top_count(n, d).min(values.len());
        let total: f64 = values.iter().sum();
        let energy: f64 = values.iter().map(|s| s * s).sum();
        let share = |part: f64, whole: f64| if whole > 0.0 { part / whole } else { 0.0 };
        let top10_share = share(values[..k].iter().sum(), total);
        let top10_energy = share(values[..k].iter().map(|s| s * s).sum(), energy);
        let effective_rank = if total > 0.0 {
            let entropy: f64 = values
                .iter()
                .filter(|&&s| s > 0.0)
                .map(|&s| {
                    let p = s / total;
                    -p * p.ln()
                })
                .sum();
            entropy.exp()
        } else {
            0.0
        };
        Spectrum {
            n,
            d,
            singular_values: values,
            tolerance,
            rank,
            top_count: k,
            top10_share,
            top10_energy,
            effective_rank,
        }
    }

    fn sigma_max(&self) -> f64 {
        self.singular_values.first().copied().unwrap_or(0.0)
    }

    /// Σ_{j≤i} σ_j / Σσ for i = 1..=m (zeros when Σσ = 0).
    fn cumulative_shares(&self) -> Vec<f64> {
        let total: f64 = self.singular_values.iter().sum();
        let mut running = 0.0;
        self.singular_values
            .iter()
            .map(|s| {
                running += s;
                if total > 0.0 {
                    running / total
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Whether the top 10% of the spectrum carries more than 80% of Σσ (§2.2).
    fn claim_holds(&self) -> bool {
        self.top10_share > CLAIM_SHARE
    }
}

/// `requested` samples, lowered to `available` with a warning when there are fewer.
fn clamp_samples(requested: usize, available: usize, what: &str) -> Result<usize, AnalyzeError> {
    if available == 0 {
        return Err(AnalyzeError::Invalid(format!(
            "analyze features: the training data holds no {what}"
        )));
    }
    if requested > available {
        eprintln!(
            "analyze features: warning: {requested} samples requested but the training data \
             holds {available} {what}; using {available}"
        );
    }
    Ok(requested.min(available))
}

/// A float tensor read back to the host as f32.
fn host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, AnalyzeError> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| AnalyzeError::Invalid(format!("reading features back: {e:?}")))
}

/// The input of every dense layer of `model` over the first `n` images of `split`
/// (`n ≤ split.n`).
fn autoencoder_features(
    model: &Autoencoder,
    split: &Split,
    n: usize,
    device: &Device,
) -> Result<Vec<LayerFeatures>, AnalyzeError> {
    let images = split.images[..n * PIXELS].to_vec();
    let input = Tensor::<2>::from_data(TensorData::new(images, [n, PIXELS]), device);
    let last = model.layers.len().saturating_sub(1);
    model
        .layer_inputs(input)
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            let [rows, cols] = x.dims();
            let what = match i {
                0 => "the images".to_string(),
                i if i == crate::models::autoencoder::CODE_LAYER + 1 => "the linear code".into(),
                _ => format!("tanh of layers.{}", i - 1),
            };
            let d_out = model.layers[i].weight.dims()[1];
            let role = if i == last { ", the output layer" } else { "" };
            Ok(LayerFeatures {
                name: format!("layers.{i}.input"),
                description: format!("input of layers.{i} ({cols}×{d_out}{role}): {what}"),
                rows,
                cols,
                values: host(x)?,
            })
        })
        .collect()
}

/// Rows of the tagger's residual stream for the first `n` real tokens of `sentences` in order
/// (`n` ≤ their real tokens), plus the number of sentences used and of ROOT rows among the `n`.
fn tagger_features(
    model: &Tagger,
    sentences: &[Encoded],
    n: usize,
    batch_size: usize,
    device: &Device,
    stop: &AtomicBool,
) -> Result<(Vec<LayerFeatures>, usize, usize), AnalyzeError> {
    // Whole sentences in order until they hold n tokens.
    let mut used = 0;
    let mut tokens = 0;
    while tokens < n && used < sentences.len() {
        tokens += sentences[used].tokens.len();
        used += 1;
    }
    let mut stages: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut rows = 0;
    let mut roots = 0;
    for chunk in sentences[..used].chunks(batch_size.max(1)) {
        if stop.load(Ordering::SeqCst) {
            return Err(interrupted());
        }
        let pairs: Vec<(&[u32], &[u32])> =
            chunk.iter().map(|s| (&s.tokens[..], &s.tags[..])).collect();
        let batch = Batch::new(&pairs);
        let outputs = model.block_outputs(&batch, device);
        if stages.is_empty() {
            stages = outputs.iter().map(|t| (t.dims()[2], Vec::new())).collect();
        }
        // Real positions in batch order, at most the rows still missing.
        let real: Vec<usize> = (0..batch.n * batch.len)
            .filter(|&pos| batch.tokens[pos] != PAD as i32)
            .take(n - rows)
            .collect();
        roots += real.iter().filter(|&&pos| pos % batch.len == 0).count();
        for ((width, buffer), output) in stages.iter_mut().zip(outputs) {
            let values = host(output)?;
            for &pos in &real {
                buffer.extend_from_slice(&values[pos * *width..(pos + 1) * *width]);
            }
        }
        rows += real.len();
    }
    let features = stages
        .into_iter()
        .enumerate()
        .map(|(i, (cols, values))| {
            let (name, description) = if i == 0 {
                (
                    "embedding.output".to_string(),
                    "token embedding + positions (the input of block 0)".to_string(),
                )
            } else {
                (
                    format!("layers.{}.output", i - 1),
                    format!("output of encoder block {}", i - 1),
                )
            };
            LayerFeatures {
                name,
                description,
                rows,
                cols,
                values,
            }
        })
        .collect();
    Ok((features, used, roots))
}

fn interrupted() -> AnalyzeError {
    AnalyzeError::Invalid("analyze features: interrupted; nothing was written".into())
}

/// X of every layer of the loaded model, with a description of the samples for the JSON.
fn collect(
    loaded: &Loaded,
    requested: usize,
    stop: &AtomicBool,
) -> Result<(Vec<LayerFeatures>, serde_json::Value), AnalyzeError> {
    let device = Device::flex();
    match loaded {
        Loaded::Autoencoder { work, model, .. } => {
            let split = &work.data.train;
            let n = clamp_samples(requested, split.n, "images")?;
            let features = autoencoder_features(&model.valid(), split, n, &device)?;
            let samples = json!({
                "task": "autoencoder",
                "requested": requested,
                "n": n,
                "rows": format!("the first {n} training images, in file order"),
            });
            Ok((features, samples))
        }
        Loaded::Tagger { work, model, .. } => {
            let available: usize = work.train.iter().map(|s| s.tokens.len()).sum();
            let n = clamp_samples(requested, available, "tokens")?;
            let (features, sentences, roots) =
                tagger_features(&model.valid(), &work.train, n, TAGGER_BATCH, &device, stop)?;
            let samples = json!({
                "task": "tagger",
                "requested": requested,
                "n": n,
                "rows": format!(
                    "the first {n} real tokens of the first {sentences} training sentences, in \
                     file order; padding excluded, ROOT included"
                ),
                "sentences": sentences,
                "root_rows": roots,
            });
            Ok((features, samples))
        }
    }
}

/// Runs `precond analyze features`.
pub fn run(args: &FeaturesArgs, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    let requested = args.samples.unwrap_or(if args.quick {
        QUICK_SAMPLES
    } else {
        PAPER_SAMPLES
    });
    if requested == 0 {
        return Err(AnalyzeError::Invalid(
            "analyze features: --samples must be at least 1".into(),
        ));
    }
    create_dir(&args.out)?;
    let loaded = Loaded::open(&args.model, args.quick, &args.out)?;
    if stop.load(Ordering::SeqCst) {
        return Err(interrupted());
    }
    let (features, samples) = collect(&loaded, requested, stop)?;
    let mut spectra = Vec::with_capacity(features.len());
    for f in &features {
        if stop.load(Ordering::SeqCst) {
            return Err(interrupted());
        }
        if let Some(bad) = f.values.iter().find(|v| !v.is_finite()) {
            return Err(AnalyzeError::Invalid(format!(
                "analyze features: {} holds a non-finite value ({bad}): the model diverged?",
                f.name
            )));
        }
        let x = to_mat(&f.values, f.rows, f.cols);
        let s = Spectrum::of(&x).map_err(|e| AnalyzeError::Invalid(format!("{}: {e}", f.name)))?;
        println!(
            "{:<18} n={:<5} d={:<5} rank={:<5} top10%({:>3} σ)={:.3} energy={:.3} \
             effective_rank={:.1} >80%: {}",
            f.name,
            s.n,
            s.d,
            s.rank,
            s.top_count,
            s.top10_share,
            s.top10_energy,
            s.effective_rank,
            if s.claim_holds() { "yes" } else { "no" }
        );
        spectra.push(s);
    }
    let holding = spectra.iter().filter(|s| s.claim_holds()).count();
    println!(
        "the top 10% of the singular values carry over 80% of Σσ in {holding} of {} layers",
        spectra.len()
    );
    write_outputs(&args.out, &features, &spectra, samples)
}

/// features.csv, features.json and the two plots.
fn write_outputs(
    out: &Path,
    features: &[LayerFeatures],
    spectra: &[Spectrum],
    samples: serde_json::Value,
) -> Result<(), AnalyzeError> {
    let mut rows = Vec::new();
    for (f, s) in features.iter().zip(spectra) {
        let sigma_max = s.sigma_max();
        for (j, (&sigma, cumulative)) in s
            .singular_values
            .iter()
            .zip(s.cumulative_shares())
            .enumerate()
        {
            let normalized = if sigma_max > 0.0 {
                sigma / sigma_max
            } else {
                0.0
            };
            rows.push(vec![
                f.name.clone(),
                (j + 1).to_string(),
                format!("{sigma:e}"),
                format!("{normalized:e}"),
                format!("{cumulative:e}"),
            ]);
        }
    }
    write_csv(
        &out.join("features.csv"),
        &[
            "layer",
            "index",
            "singular_value",
            "normalized",
            "cumulative_share",
        ],
        &rows,
    )?;

    let layers: Vec<serde_json::Value> = features
        .iter()
        .zip(spectra)
        .map(|(f, s)| {
            json!({
                "name": f.name,
                "description": f.description,
                "n": s.n,
                "d": s.d,
                "sigma_max": s.sigma_max(),
                "rank_tolerance": s.tolerance,
                "rank": s.rank,
                "top10_count": s.top_count,
                "top10_share": s.top10_share,
                "top10_energy": s.top10_energy,
                "effective_rank": s.effective_rank,
                "claim_holds": s.claim_holds(),
            })
        })
        .collect();
    let holding = spectra.iter().filter(|s| s.claim_holds()).count();
    let summary = json!({
        "samples": samples,
        "definitions": {
            "singular_values": "of X (n samples × d features), not centered, by faer's SVD in f64",
            "rank": "#{σ_j > σ_1 · max(n, d) · 2^-23} (f32 machine epsilon: X is computed in f32)",
            "top10_count": "ceil(min(n, d) / 10)",
            "top10_share": "sum of the top10_count largest σ / Σσ",
            "top10_energy": "sum of the top10_count largest σ² / Σσ²",
            "effective_rank": "exp(-Σ p ln p), p = σ / Σσ",
        },
        "layers": layers,
        "claim": {
            "statement": "the top 10% of the rank accounts for over 80% of the singular values \
                          (paper §2.2, Figure 2)",
            "threshold": CLAIM_SHARE,
            "holds_per_layer": spectra.iter().map(Spectrum::claim_holds).collect::<Vec<_>>(),
            "layers_holding": holding,
            "holds_for_all_layers": holding == spectra.len(),
        },
    });
    write_json(&out.join("features.json"), &summary)?;

    let n = samples["n"].as_u64().unwrap_or(0);
    // Figure 2: σ_j / σ_1 against j / min(n, d), on a log axis; values at or below the rank
    // tolerance (rounding noise of the f32 features) are left out.
    let normalized: Vec<Series> = features
        .iter()
        .zip(spectra)
        .map(|(f, s)| {
            let m = s.singular_values.len() as f64;
            let sigma_max = s.sigma_max();
            let points = s
                .singular_values
                .iter()
                .take(s.rank)
                .enumerate()
                .map(|(j, &sigma)| ((j + 1) as f64 / m, sigma / sigma_max))
                .collect();
            Series::new(format!("{} (d={})", f.name, s.d), points)
        })
        .collect();
    let title = format!("Singular values of each layer's input X over {n} samples");
    plot::lines(
        &out.join("features"),
        &LinePlot {
            title: &title,
            x_desc: "index / min(n, d)",
            y_desc: "σ / σ_max",
            log_x: false,
            log_y: true,
            series: &normalized,
        },
    )?;

    let mut cumulative: Vec<Series> = features
        .iter()
        .zip(spectra)
        .map(|(f, s)| {
            let m = s.singular_values.len() as f64;
            let points = std::iter::once((0.0, 0.0))
                .chain(
                    s.cumulative_shares()
                        .into_iter()
                        .enumerate()
                        .map(|(j, c)| ((j + 1) as f64 / m, c)),
                )
                .collect();
            let label = format!("{} (top 10%: {:.0}%)", f.name, 100.0 * s.top10_share);
            Series::new(label, points)
        })
        .collect();
    cumulative.push(Series::reference(
        "10% of the spectrum",
        vec![(0.1, 0.0), (0.1, 1.0)],
    ));
    cumulative.push(Series::reference(
        "80% (the paper's claim)",
        vec![(0.0, CLAIM_SHARE), (1.0, CLAIM_SHARE)],
    ));
    let title = format!("Cumulative share of Σσ of each layer's input X over {n} samples");
    plot::lines(
        &out.join("features_cumulative"),
        &LinePlot {
            title: &title,
            x_desc: "index / min(n, d)",
            y_desc: "cumulative share of Σσ",
            log_x: false,
            log_y: false,
            series: &cumulative,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::conllu::ROOT;
    use crate::models::tagger::TaggerDims;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// An `rows × cols` matrix with orthonormal columns: the thin Q of a seeded random matrix.
    fn orthonormal(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Mat<f64> {
        let a = Mat::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0));
        a.qr().compute_thin_Q()
    }

    /// X = U diag(σ) Vᵀ with orthonormal U, V: its singular values are σ exactly.
    fn with_singular_values(n: usize, d: usize, sigma: &[f64], seed: u64) -> Mat<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = sigma.len();
        let u = orthonormal(n, r, &mut rng);
        let v = orthonormal(d, r, &mut rng);
        let u_sigma = Mat::from_fn(n, r, |i, j| u[(i, j)] * sigma[j]);
        &u_sigma * v.transpose()
    }

    #[test]
    fn top_count_is_the_ceiling_of_a_tenth() {
        assert_eq!(top_count(1024, 784), 79); // 78.4
        assert_eq!(top_count(256, 30), 3); // 0.1 · 30 = 3.0000000000000004 in f64
        assert_eq!(top_count(200, 45), 5); // 4.5
        assert_eq!(top_count(1, 100), 1);
        assert_eq!(top_count(10, 10), 1);
        assert_eq!(top_count(11, 500), 2);
    }

    /// A rank-8 200×45 matrix with known singular values: exactly 8 above the tolerance, the
    /// rest at rounding level, and the shares equal the hand computation.
    #[test]
    fn synthetic_low_rank_spectrum_matches_the_known_singular_values() {
        let sigma = [10.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5];
        let x = with_singular_values(200, 45, &sigma, 7);
        let s = Spectrum::of(&x).unwrap();
        assert_eq!((s.n, s.d, s.singular_values.len()), (200, 45, 45));
        for (got, want) in s.singular_values.iter().zip(&sigma) {
            assert!((got - want).abs() < 1e-10, "{got} vs {want}");
        }
        assert!(s.singular_values[8..].iter().all(|&v| v < 1e-12));
        assert_eq!(s.rank, 8);
        assert!((s.tolerance - 10.0 * 200.0 * 2f64.powi(-23)).abs() < 1e-15);
        // k = ⌈45 / 10⌉ = 5: (10 + 6 + 4 + 3 + 2) / 28 and (100 + 36 + 16 + 9 + 4) / 168.5.
        assert_eq!(s.top_count, 5);
        assert!(
            (s.top10_share - 25.0 / 28.0).abs() < 1e-10,
            "{}",
            s.top10_share
        );
        assert!((s.top10_energy - 165.0 / 168.5).abs() < 1e-10);
        let entropy: f64 = sigma.iter().map(|v| -(v / 28.0) * (v / 28.0).ln()).sum();
        assert!((s.effective_rank - entropy.exp()).abs() < 1e-9);
        assert!(s.effective_rank > 1.0 && s.effective_rank < 8.0);
        assert!(s.claim_holds());
        let cumulative = s.cumulative_shares();
        assert!((cumulative[0] - 10.0 / 28.0).abs() < 1e-10);
        assert!((cumulative[4] - s.top10_share).abs() < 1e-12);
        assert!((cumulative[44] - 1.0).abs() < 1e-12);
        // Xᵀ (45×200) has the same spectrum.
        let t = Spectrum::of(&x.transpose().to_owned()).unwrap();
        assert_eq!((t.n, t.d, t.rank, t.top_count), (45, 200, 8, 5));
        assert!((t.top10_share - s.top10_share).abs() < 1e-10);
        // A flat spectrum: effective rank 8, the top 10% (k = 5 of 45) carries 5/8.
        let flat = Spectrum::of(&with_singular_values(200, 45, &[3.0; 8], 1)).unwrap();
        assert!((flat.effective_rank - 8.0).abs() < 1e-9);
        assert!((flat.top10_share - 5.0 / 8.0).abs() < 1e-10);
        assert!(!flat.claim_holds());
        // All zeros: rank 0 and zero shares, no NaN.
        let zero = Spectrum::of(&Mat::zeros(20, 10)).unwrap();
        assert_eq!((zero.rank, zero.top_count), (0, 1));
        assert_eq!((zero.top10_share, zero.effective_rank), (0.0, 0.0));
        assert!(zero.cumulative_shares().iter().all(|&c| c == 0.0));
    }

    #[test]
    fn autoencoder_layer_inputs_are_the_images_then_the_activations() {
        let device = Device::flex();
        let model = Autoencoder::new(3, &device);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 5;
        let images: Vec<f32> = (0..n * PIXELS)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let input =
            || Tensor::<2>::from_data(TensorData::new(images.clone(), [n, PIXELS]), &device);
        let inputs = model.layer_inputs(input());
        let widths = crate::models::autoencoder::WIDTHS;
        let dims: Vec<[usize; 2]> = inputs.iter().map(|x| x.dims()).collect();
        let expect: Vec<[usize; 2]> = widths[..8].iter().map(|&w| [n, w]).collect();
        assert_eq!(dims, expect);
        assert_eq!(host(inputs[0].clone()).unwrap(), images);
        let last = model.layers[7].forward(inputs[7].clone());
        let logits = host(model.forward(input())).unwrap();
        assert_eq!(host(last).unwrap(), logits);
        // The code layer's output enters layers.4 without tanh; the others after tanh.
        let code = model.layers[3].forward(inputs[3].clone());
        assert_eq!(host(code).unwrap(), host(inputs[4].clone()).unwrap());
        let hidden = host(model.layers[0].forward(inputs[0].clone())).unwrap();
        let act = host(inputs[1].clone()).unwrap();
        for (h, a) in hidden.iter().zip(&act) {
            assert!((h.tanh() - a).abs() < 1e-5, "{h} {a}");
        }
        // The helper: the first n images, one X per layer, with clamping of too many samples.
        let split = Split {
            images: images.clone(),
            labels: vec![0; n],
            n,
        };
        let features = autoencoder_features(&model, &split, 3, &device).unwrap();
        assert_eq!(features.len(), 8);
        assert_eq!((features[0].rows, features[0].cols), (3, 784));
        assert_eq!(features[0].values, images[..3 * PIXELS]);
        assert_eq!(features[4].name, "layers.4.input");
        assert_eq!((features[4].rows, features[4].cols), (3, 30));
        assert_eq!(clamp_samples(9, n, "images").unwrap(), n);
        assert_eq!(clamp_samples(2, n, "images").unwrap(), 2);
        assert!(clamp_samples(2, 0, "images").is_err());
    }

    fn tiny_tagger(seed: u64) -> Tagger {
        let dims = TaggerDims {
            vocab: 11,
            tags: 5,
            layers: 2,
            width: 8,
            mlp: 16,
            heads: 2,
            dropout: 0.3,
        };
        Tagger::new(&dims, seed, &Device::flex())
    }

    fn encoded(tokens: &[u32], tags: &[u32]) -> Encoded {
        Encoded {
            tokens: tokens.to_vec(),
            tags: tags.to_vec(),
        }
    }

    #[test]
    fn tagger_block_outputs_lead_to_the_logits_and_padding_is_excluded() {
        let device = Device::flex();
        let model = tiny_tagger(5);
        let short = encoded(&[ROOT, 4, 7], &[ROOT, 3, 4]);
        let long = encoded(&[ROOT, 5, 9, 3, 10, 6], &[ROOT, 1, 3, 4, 3, 4]);
        let batch = Batch::new(&[
            (&short.tokens[..], &short.tags[..]),
            (&long.tokens[..], &long.tags[..]),
        ]);
        let outputs = model.block_outputs(&batch, &device);
        assert_eq!(outputs.len(), 3);
        assert!(outputs.iter().all(|t| t.dims() == [2, 6, 8]));
        // The last block's output through final_norm and the output layer gives forward's
        // logits without dropout (the model's rate is 0.3: no mask was drawn).
        let last = outputs[2].clone();
        let logits = model.output.forward(model.final_norm.forward(last));
        let want = host(model.forward(&batch, None, &device)).unwrap();
        let got = host(logits).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        // Block 0's input is the embedding + positions: position 0 of sentence 0 is ROOT's
        // embedding row plus (sin 0, cos 0, ...) = (0, 1, 0, 1, ...).
        let embedding = host(model.embedding.weight.val()).unwrap();
        let first = host(outputs[0].clone()).unwrap();
        for c in 0..8 {
            let pe = if c % 2 == 0 { 0.0 } else { 1.0 };
            let want = embedding[ROOT as usize * 8 + c] + pe;
            assert!((first[c] - want).abs() < 1e-6);
        }

        // X: both sentences in one padded batch give 3 + 6 real rows (not 2 × 6), each equal to
        // the sentence's rows computed alone.
        let sentences = [short.clone(), long.clone()];
        let no = AtomicBool::new(false);
        let (features, used, roots) =
            tagger_features(&model, &sentences, 9, 2, &device, &no).unwrap();
        assert_eq!((used, roots), (2, 2));
        assert_eq!(features.len(), 3);
        let names: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["embedding.output", "layers.0.output", "layers.1.output"]
        );
        for (stage, f) in features.iter().enumerate() {
            assert_eq!((f.rows, f.cols, f.values.len()), (9, 8, 72));
            let mut want = Vec::new();
            for s in &sentences {
                let alone = Batch::new(&[(&s.tokens[..], &s.tags[..])]);
                want.extend(host(model.block_outputs(&alone, &device)[stage].clone()).unwrap());
            }
            for (g, w) in f.values.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "stage {stage}: {g} vs {w}");
            }
        }
        // N = 4 takes both sentences (the first holds 3 tokens) and keeps the first 4 rows.
        let (cut, used, roots) = tagger_features(&model, &sentences, 4, 1, &device, &no).unwrap();
        assert_eq!((cut[2].rows, used, roots), (4, 2, 2));
        assert_eq!(cut[2].values[..], features[2].values[..32]);
        // N = 2 needs only the first sentence.
        let (cut, used, roots) = tagger_features(&model, &sentences, 2, 8, &device, &no).unwrap();
        assert_eq!((cut[0].rows, used, roots), (2, 1, 1));
        // A raised stop flag ends the pass.
        let stop = AtomicBool::new(true);
        assert!(tagger_features(&model, &sentences, 9, 2, &device, &stop).is_err());
    }

    #[test]
    fn quick_autoencoder_run_writes_the_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("features");
        let mut args = FeaturesArgs {
            model: ModelArgs {
                data: Some(super::super::test_support::mnist_dir(tmp.path())),
                ..Default::default()
            },
            out: out.clone(),
            quick: true,
            samples: Some(0),
        };
        let go = AtomicBool::new(false);
        let err = run(&args, &go).unwrap_err().to_string();
        assert!(err.contains("--samples"), "{err}");
        args.samples = None;
        run(&args, &go).unwrap();
        for file in [
            "features.csv",
            "features.json",
            "features.png",
            "features.svg",
            "features_cumulative.png",
            "features_cumulative.svg",
        ] {
            assert!(out.join(file).is_file(), "{file}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("features.json")).unwrap())
                .unwrap();
        assert_eq!(json["samples"]["n"], 256);
        let layers = json["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 8);
        let csv = std::fs::read_to_string(out.join("features.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("layer,index,singular_value,normalized,cumulative_share")
        );
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        let widths = crate::models::autoencoder::WIDTHS;
        for (i, layer) in layers.iter().enumerate() {
            let name = format!("layers.{i}.input");
            assert_eq!(layer["name"], name.as_str());
            assert_eq!(layer["n"], 256);
            assert_eq!(layer["d"], widths[i]);
            let mine: Vec<&Vec<&str>> = rows.iter().filter(|r| r[0] == name).collect();
            let m = widths[i].min(256);
            assert_eq!(mine.len(), m, "{name}");
            assert_eq!(mine[0][3].parse::<f64>().unwrap(), 1.0);
            let last: f64 = mine[m - 1][4].parse().unwrap();
            assert!((last - 1.0).abs() < 1e-12);
            // The cumulative share at k = ⌈m/10⌉ is top10_share.
            let k = layer["top10_count"].as_u64().unwrap() as usize;
            assert_eq!(k, m.div_ceil(10));
            let at_k: f64 = mine[k - 1][4].parse().unwrap();
            let share = layer["top10_share"].as_f64().unwrap();
            assert!((at_k - share).abs() < 1e-12);
            let rank = layer["rank"].as_u64().unwrap() as usize;
            assert!(rank >= 1 && rank <= m);
            assert_eq!(layer["claim_holds"], share > 0.8);
        }
        assert_eq!(
            rows.len(),
            widths[..8].iter().map(|&w| w.min(256)).sum::<usize>()
        );
        assert_eq!(
            json["claim"]["holds_per_layer"].as_array().unwrap().len(),
            8
        );
        // A raised stop flag: an error, not a panic (the model is reused).
        let stop = AtomicBool::new(true);
        assert!(run(&args, &stop).is_err());
    }
}
