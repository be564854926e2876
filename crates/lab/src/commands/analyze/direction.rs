//! `precond analyze direction`: how far each lost-mass policy of the shared-basis preconditioner
//! ([`RhoMode`] × [`SharedBasisConfig::rho_scale`]) moves its direction away from exact block
//! Adagrad, and why: under Algorithm 1's exact reading the ridge ρ_i dwarfs the low-rank
//! statistics B R_i Bᵀ, so u_i = −(B R_i Bᵀ + (ρ_i + ε) I)^{−1/2} g_i is nearly −g_i/√(ρ_i + ε).
//!
//! For each selected dense layer (b = d_in rows, m = d_out blocks, NOTES §1) the command records
//! the gradients g_1..g_T of T Adam steps from θ ([`Loaded::gradient_stream`]) and streams them
//! through one [`SharedBasis<f64>`] per policy (rank `--rank`, capped at b; every other setting
//! the library's default, so ε = [`SharedBasisConfig`]'s default eps, 1e-6). At every step t:
//!
//! - before `precondition`, the policy's `captured_energy(g_t)`: Σ_i |Bᵀ g_{t,i}|² / Σ_i |g_{t,i}|²
//!   for the basis built from g_1..g_{t−1} (0 at t = 1, before any basis exists). The ridge
//!   does not feed back into B or R_i, so this is the same for every policy on a layer (a
//!   check, and a reminder that the policies differ only in ρ_i);
//! - after it, for S sampled blocks i (`--sample-blocks`, a seeded choice, the same for every
//!   policy), the exact dense statistics H_i = Σ_{s≤t} g_{s,i} g_{s,i}ᵀ (b × b, f64) and the
//!   **exact block-Adagrad reference** e_i = −(H_i + εI)^{−1/2} g_{t,i} (dense eigendecomposition
//!   of H_i; eigenvalues λ enter as max(λ + ε, n·u·λ_max), the library's rounding floor, which
//!   changes nothing while ε is above it). The policy's direction u_i (column i of
//!   `precondition`'s output) is compared with it by the cosine uᵀe / (|u| |e|). As a reference
//!   line, per-block **diagonal Adagrad** d_i = −g_{t,i} / sqrt(diag(H_i) + ε) (elementwise) is
//!   compared with the same e_i. Cosines are skipped (blank in the CSV, null in the JSON, with a
//!   note) for layers with b > `--max-dense`, and a pair with a zero vector is left out.
//!
//! Every `--every` steps and at step T the policy's `ridge_report()` is summarised: per block
//! ρ_i / λ_max(R_i) (blocks with λ_max(R_i) = 0 left out) and the count of R_i's eigenvalues above
//! ρ_i (the directions in which eq. 6 does more than scale g_i by (ρ_i + ε)^{−1/2}). Medians of an
//! even count are the mean of the two middle values.
//!
//! Policies (`--policies`, comma-separated `NAME` or `NAME-SCALE`, SCALE the `rho_scale`, default
//! 1): `paper` = PowerIteration(10) (Algorithm 1's reading, the library's default), `exact` =
//! Exact, `fd` = FrequentDirections, `random-start` = RandomStart(1), `rayleigh` = Rayleigh. The
//! default set is `paper,fd,random-start,rayleigh,paper-0.001`. At full rank (k = b) every
//! unit-scale policy is exact block Adagrad, so its cosine is 1 and the comparison says nothing.
//!
//! Outputs in `--out`:
//!
//! - `direction.csv`, one row per layer × policy × report step, columns:
//!   `layer` (module path), `policy` (as given), `step` (1-based t of the report),
//!   `median_rho_over_top` (median over blocks of ρ_i / λ_max(R_i) at that step; blank when every
//!   block has λ_max = 0), `median_above_ridge` and `mean_above_ridge` (median and mean over all
//!   blocks of #{eigenvalues of R_i > ρ_i}, out of k), `captured_energy` (mean of the per-step
//!   captured energy over the steps since the previous report, this one included),
//!   `cos_exact` (mean over the sampled blocks and those steps of cos(u_i, e_i)), `cos_diagonal`
//!   (the same for cos(d_i, e_i): policy-independent, repeated on every policy's row).
//! - `direction.json`: the settings, and per layer its shape, rank, sampled blocks, whether the
//!   cosines were skipped, and per policy the final report (`final`), the means over the whole
//!   run (`run_mean`) and the final mean ρ_i.
//!
//! `--quick`: 30 steps of batch 64 on the two dense layers with the fewest weights.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use faer::{Mat, MatRef, Par};
use precond::linalg::{gemm, SymEig};
use precond::{BlockRidge, Preconditioner, RhoMode, SharedBasis, SharedBasisConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::json;

use super::{
    create_dir, for_each_layer_stream, select_layers, write_csv, write_json, AnalyzeError, Layer,
    Loaded, ModelArgs,
};

/// The CSV's columns.
const HEADER: [&str; 9] = [
    "layer",
    "policy",
    "step",
    "median_rho_over_top",
    "median_above_ridge",
    "mean_above_ridge",
    "captured_energy",
    "cos_exact",
    "cos_diagonal",
];

/// `precond analyze direction` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DirectionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (direction.csv, direction.json)
    #[arg(long)]
    pub out: PathBuf,
    /// A small configuration: 30 steps of batch 64 on the two dense layers with the fewest
    /// weights
    #[arg(long)]
    pub quick: bool,
    /// Length T of the gradient stream: the gradients of T Adam steps from θ [default: 200;
    /// --quick: 30]
    #[arg(long, value_name = "T")]
    pub steps: Option<usize>,
    /// Examples per mini-batch of the stream [default: the model's config; --quick: 64]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Dense layers to study, comma-separated module paths (e.g. layers.0.weight) [default: all;
    /// --quick: the two with the fewest weights]
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub layers: Vec<String>,
    /// Rank k of the shared basis (capped at each layer's d_in)
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Lost-mass policies, comma-separated NAME or NAME-SCALE, NAME in
    /// paper|exact|fd|random-start|rayleigh, SCALE the rho_scale (default 1)
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "POLICY,...",
        default_value = "paper,fd,random-start,rayleigh,paper-0.001"
    )]
    pub policies: Vec<String>,
    /// Blocks per layer (a seeded choice) whose exact dense statistics give the cosines
    #[arg(long, default_value_t = 4, value_name = "S")]
    pub sample_blocks: usize,
    /// Largest d_in for which the b × b exact statistics are kept (larger layers: no cosines)
    #[arg(long, default_value_t = 1024, value_name = "B")]
    pub max_dense: usize,
    /// Steps between ridge reports (and a report at step T) [default: T/5]
    #[arg(long, value_name = "N")]
    pub every: Option<usize>,
}

/// A lost-mass policy: how ρ grows, and the multiplier on its increments.
#[derive(Clone, Debug, PartialEq)]
struct Policy {
    /// As given on the command line (trimmed).
    name: String,
    rho: RhoMode,
    scale: f64,
}

/// The policy names and their modes.
const POLICY_NAMES: [(&str, RhoMode); 5] = [
    ("paper", RhoMode::PowerIteration(10)),
    ("exact", RhoMode::Exact),
    ("fd", RhoMode::FrequentDirections),
    ("random-start", RhoMode::RandomStart(1)),
    ("rayleigh", RhoMode::Rayleigh),
];

/// Parses `NAME` or `NAME-SCALE` (SCALE a finite number ≥ 0, e.g. `paper-0.001`, `fd-1e-3`).
fn parse_policy(text: &str) -> Result<Policy, String> {
    let text = text.trim();
    let names = || {
        POLICY_NAMES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join("|")
    };
    if let Some(&(_, rho)) = POLICY_NAMES.iter().find(|(n, _)| *n == text) {
        return Ok(Policy {
            name: text.to_string(),
            rho,
            scale: 1.0,
        });
    }
    for &(name, rho) in &POLICY_NAMES {
        let Some(rest) = text.strip_prefix(name).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let scale: f64 = rest.parse().map_err(|_| {
            format!("policy {text:?}: {rest:?} is not a number (NAME-SCALE, e.g. paper-0.001)")
        })?;
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(format!("policy {text:?}: the scale must be finite and ≥ 0"));
        }
        return Ok(Policy {
            name: text.to_string(),
            rho,
            scale,
        });
    }
    Err(format!(
        "unknown policy {text:?}: give NAME or NAME-SCALE with NAME in {}",
        names()
    ))
}

/// cos(a, b) = aᵀb / (|a| |b|); None when either is zero.
fn cosine(a: &[f64], b: &[f64]) -> Option<f64> {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    (na > 0.0 && nb > 0.0).then(|| dot / (na * nb))
}

/// The median (mean of the two middle values for an even count); None when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    })
}

/// (median of ρ_i/λ_max(R_i) over blocks with λ_max > 0, median and mean of above_ridge).
fn ridge_summary(ridge: &[BlockRidge]) -> (Option<f64>, f64, f64) {
    let ratios: Vec<f64> = ridge
        .iter()
        .filter(|r| r.top > 0.0)
        .map(|r| r.lost_mass / r.top)
        .collect();
    let above: Vec<f64> = ridge.iter().map(|r| r.above_ridge as f64).collect();
    let mean_above = if above.is_empty() {
        0.0
    } else {
        above.iter().sum::<f64>() / above.len() as f64
    };
    (median(ratios), median(above).unwrap_or(0.0), mean_above)
}

/// One sampled block's references at one step.
#[derive(Clone, Debug)]
struct BlockReference {
    /// Exact block Adagrad's e_i = −(H_i + εI)^{−1/2} g_i.
    exact: Vec<f64>,
    /// cos(d_i, e_i) for diagonal Adagrad d_i = −g_i / sqrt(diag(H_i) + ε).
    cos_diagonal: Option<f64>,
}

/// The exact dense statistics H_i of the sampled blocks.
struct ExactBlocks {
    blocks: Vec<usize>,
    stats: Vec<Mat<f64>>,
    eigs: Vec<SymEig<f64>>,
    eps: f64,
}

impl ExactBlocks {
    fn new(b: usize, blocks: &[usize], eps: f64) -> Self {
        Self {
            blocks: blocks.to_vec(),
            stats: blocks.iter().map(|_| Mat::zeros(b, b)).collect(),
            eigs: blocks.iter().map(|_| SymEig::new(b)).collect(),
            eps,
        }
    }

    /// Adds g_{t,i} g_{t,i}ᵀ to every sampled H_i and returns the references of step t, in
    /// `blocks` order.
    fn update(&mut self, g: MatRef<'_, f64>) -> Result<Vec<BlockReference>, AnalyzeError> {
        let eps = self.eps;
        self.stats
            .par_iter_mut()
            .zip(self.eigs.par_iter_mut())
            .zip(self.blocks.par_iter())
            .map(|((h, eig), &i)| {
                let gi = g.col(i).as_mat();
                gemm(h.as_mut(), true, gi, gi.transpose(), 1.0, Par::Seq);
                eig.decompose(h.as_ref()).map_err(|_| {
                    AnalyzeError::Invalid(format!(
                        "analyze direction: the eigendecomposition of block {i}'s exact \
                         statistics did not converge"
                    ))
                })?;
                let floor = eig.rounding_floor();
                let b = h.nrows();
                let mut coords = Mat::<f64>::zeros(b, 1);
                gemm(
                    coords.as_mut(),
                    false,
                    eig.vectors.transpose(),
                    gi,
                    1.0,
                    Par::Seq,
                );
                for j in 0..b {
                    coords[(j, 0)] /= (eig.value(j) + eps).max(floor).sqrt();
                }
                let mut exact = Mat::<f64>::zeros(b, 1);
                gemm(
                    exact.as_mut(),
                    false,
                    eig.vectors.as_ref(),
                    coords.as_ref(),
                    -1.0,
                    Par::Seq,
                );
                let exact: Vec<f64> = exact.col(0).iter().copied().collect();
                let diagonal: Vec<f64> = (0..b)
                    .map(|r| -g[(r, i)] / (h[(r, r)] + eps).sqrt())
                    .collect();
                Ok(BlockReference {
                    cos_diagonal: cosine(&diagonal, &exact),
                    exact,
                })
            })
            .collect()
    }
}

/// Sums of the per-step measurements over a window of steps.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    captured: f64,
    steps: usize,
    cos_exact: f64,
    cos_exact_n: usize,
    cos_diagonal: f64,
    cos_diagonal_n: usize,
}

impl Sums {
    fn mean_captured(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.captured / self.steps as f64
        }
    }

    fn mean_cos_exact(&self) -> Option<f64> {
        (self.cos_exact_n > 0).then(|| self.cos_exact / self.cos_exact_n as f64)
    }

    fn mean_cos_diagonal(&self) -> Option<f64> {
        (self.cos_diagonal_n > 0).then(|| self.cos_diagonal / self.cos_diagonal_n as f64)
    }
}

/// One ridge report of one policy on one layer.
#[derive(Clone, Debug, PartialEq)]
struct Report {
    step: usize,
    median_rho_over_top: Option<f64>,
    median_above_ridge: f64,
    mean_above_ridge: f64,
    /// Means over the steps since the previous report.
    captured_energy: f64,
    cos_exact: Option<f64>,
    cos_diagonal: Option<f64>,
}

/// What one step measured for one policy (read by the tests; the run keeps window sums).
#[derive(Clone, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
struct StepRecord {
    captured_energy: f64,
    /// cos(u_i, e_i) per sampled block (empty without references).
    cos_exact: Vec<Option<f64>>,
}

/// One policy streamed over one layer.
struct PolicyRun {
    policy: Policy,
    state: SharedBasis<f64>,
    direction: Mat<f64>,
    window: Sums,
    total: Sums,
    reports: Vec<Report>,
}

impl PolicyRun {
    fn new(policy: Policy, rank: usize, b: usize, m: usize) -> Result<Self, AnalyzeError> {
        let config = SharedBasisConfig {
            rank,
            rho: policy.rho,
            rho_scale: policy.scale,
            ..Default::default()
        };
        Ok(Self {
            policy,
            state: SharedBasis::new(config, b, m)?,
            direction: Mat::zeros(b, m),
            window: Sums::default(),
            total: Sums::default(),
            reports: Vec::new(),
        })
    }

    /// One step: the captured energy of `g` before it, `precondition`, then the cosines of the
    /// sampled blocks' directions with `reference` (in `blocks` order).
    fn step(
        &mut self,
        g: MatRef<'_, f64>,
        blocks: &[usize],
        reference: Option<&[BlockReference]>,
    ) -> Result<StepRecord, AnalyzeError> {
        let captured_energy = self.state.captured_energy(g)?;
        self.state.precondition(g, self.direction.as_mut())?;
        let mut cos_exact = Vec::new();
        for sums in [&mut self.window, &mut self.total] {
            sums.captured += captured_energy;
            sums.steps += 1;
        }
        if let Some(reference) = reference {
            for (&i, r) in blocks.iter().zip(reference) {
                let u: Vec<f64> = self.direction.col(i).iter().copied().collect();
                let cos = cosine(&u, &r.exact);
                for sums in [&mut self.window, &mut self.total] {
                    if let Some(c) = cos {
                        sums.cos_exact += c;
                        sums.cos_exact_n += 1;
                    }
                    if let Some(c) = r.cos_diagonal {
                        sums.cos_diagonal += c;
                        sums.cos_diagonal_n += 1;
                    }
                }
                cos_exact.push(cos);
            }
        }
        Ok(StepRecord {
            captured_energy,
            cos_exact,
        })
    }

    /// The ridge report at `step`, closing the current window.
    fn report(&mut self, step: usize) -> Result<Report, AnalyzeError> {
        let (median_rho_over_top, median_above_ridge, mean_above_ridge) =
            ridge_summary(&self.state.ridge_report()?);
        let w = std::mem::take(&mut self.window);
        let report = Report {
            step,
            median_rho_over_top,
            median_above_ridge,
            mean_above_ridge,
            captured_energy: w.mean_captured(),
            cos_exact: w.mean_cos_exact(),
            cos_diagonal: w.mean_cos_diagonal(),
        };
        self.reports.push(report.clone());
        Ok(report)
    }
}

/// How one layer is measured.
#[derive(Clone, Debug)]
struct LayerOptions {
    rank: usize,
    sample_blocks: usize,
    max_dense: usize,
    every: usize,
    seed: u64,
}

/// One layer's results.
struct LayerResult {
    b: usize,
    m: usize,
    rank: usize,
    steps: usize,
    blocks: Vec<usize>,
    /// Whether the exact statistics (and so the cosines) were kept.
    dense: bool,
    runs: Vec<PolicyRun>,
    interrupted: bool,
}

/// S of the m block indices, seeded, ascending.
fn sample_blocks(m: usize, s: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut blocks = rand::seq::index::sample(&mut rng, m, s.min(m)).into_vec();
    blocks.sort_unstable();
    blocks
}

/// Streams every policy over one layer's gradients (`[step]`, each b × m).
fn layer_direction(
    stream: &[Mat<f64>],
    policies: &[Policy],
    opts: &LayerOptions,
    stop: &AtomicBool,
) -> Result<LayerResult, AnalyzeError> {
    let Some(g0) = stream.first() else {
        return Err(AnalyzeError::Invalid(
            "analyze direction: empty gradient stream".into(),
        ));
    };
    let (b, m) = (g0.nrows(), g0.ncols());
    if b == 0 || m == 0 || stream.iter().any(|g| (g.nrows(), g.ncols()) != (b, m)) {
        return Err(AnalyzeError::Invalid(format!(
            "analyze direction: gradient stream of inconsistent or empty shape ({b}×{m})"
        )));
    }
    let blocks = sample_blocks(m, opts.sample_blocks, opts.seed);
    let dense = b <= opts.max_dense && !blocks.is_empty();
    let eps = SharedBasisConfig::default().eps;
    let mut exact = dense.then(|| ExactBlocks::new(b, &blocks, eps));
    let mut runs: Vec<PolicyRun> = policies
        .iter()
        .map(|p| PolicyRun::new(p.clone(), opts.rank, b, m))
        .collect::<Result<_, _>>()?;
    let every = opts.every.max(1);
    let mut interrupted = false;
    let mut last_report = 0;
    let mut done = 0;
    for (t, g) in stream.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let step = t + 1;
        let reference = match exact.as_mut() {
            Some(e) => Some(e.update(g.as_ref())?),
            None => None,
        };
        for run in &mut runs {
            run.step(g.as_ref(), &blocks, reference.as_deref())?;
        }
        done = step;
        if step % every == 0 || step == stream.len() {
            for run in &mut runs {
                run.report(step)?;
            }
            last_report = step;
        }
    }
    if done > last_report {
        for run in &mut runs {
            run.report(done)?;
        }
    }
    let rank = runs.first().map_or(opts.rank.min(b), |r| r.state.rank());
    Ok(LayerResult {
        b,
        m,
        rank,
        steps: done,
        blocks,
        dense,
        runs,
        interrupted,
    })
}

/// The checked settings of a run.
struct Settings {
    steps: usize,
    every: usize,
    policies: Vec<Policy>,
}

impl Settings {
    /// Checks what can be checked before the model is loaded.
    fn resolve(args: &DirectionArgs) -> Result<Settings, AnalyzeError> {
        let invalid = |msg: String| Err(AnalyzeError::Invalid(format!("analyze direction: {msg}")));
        let steps = args.steps.unwrap_or(if args.quick { 30 } else { 200 });
        if steps == 0 {
            return invalid("--steps must be at least 1".into());
        }
        if args.rank == 0 {
            return invalid("--rank must be at least 1".into());
        }
        if args.sample_blocks == 0 {
            return invalid("--sample-blocks must be at least 1".into());
        }
        if args.batch_size == Some(0) {
            return invalid("--batch-size must be at least 1".into());
        }
        if args.every == Some(0) {
            return invalid("--every must be at least 1".into());
        }
        if let Some(bad) = args.layers.iter().find(|n| n.trim().is_empty()) {
            return invalid(format!("--layers holds an empty name ({bad:?})"));
        }
        if args.policies.is_empty() {
            return invalid("--policies is empty: e.g. paper,fd,random-start,rayleigh".into());
        }
        let mut policies: Vec<Policy> = Vec::new();
        for text in &args.policies {
            let p = parse_policy(text).map_err(|e| {
                AnalyzeError::Invalid(format!("analyze direction: --policies: {e}"))
            })?;
            if policies.iter().any(|q| q.name == p.name) {
                return invalid(format!("--policies names {:?} twice", p.name));
            }
            policies.push(p);
        }
        let every = args.every.unwrap_or((steps / 5).max(1));
        Ok(Settings {
            steps,
            every,
            policies,
        })
    }
}

/// A CSV / table cell: the number, or blank.
fn cell(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v}"))
}

/// One finished layer.
struct Done {
    layer: Layer,
    result: LayerResult,
    seconds: f64,
}

fn report_json(r: &Report) -> serde_json::Value {
    json!({
        "step": r.step,
        "median_rho_over_top": r.median_rho_over_top,
        "median_above_ridge": r.median_above_ridge,
        "mean_above_ridge": r.mean_above_ridge,
        "captured_energy": r.captured_energy,
        "cos_exact": r.cos_exact,
        "cos_diagonal": r.cos_diagonal,
    })
}

/// Writes the CSV and the JSON.
fn write_outputs(
    out: &Path,
    args: &DirectionArgs,
    settings: &Settings,
    task: &str,
    batch_size: usize,
    done: &[Done],
    interrupted: bool,
) -> Result<(), AnalyzeError> {
    let mut rows = Vec::new();
    for d in done {
        for run in &d.result.runs {
            for r in &run.reports {
                rows.push(vec![
                    d.layer.name.clone(),
                    run.policy.name.clone(),
                    r.step.to_string(),
                    cell(r.median_rho_over_top),
                    format!("{}", r.median_above_ridge),
                    format!("{}", r.mean_above_ridge),
                    format!("{}", r.captured_energy),
                    cell(r.cos_exact),
                    cell(r.cos_diagonal),
                ]);
            }
        }
    }
    write_csv(&out.join("direction.csv"), &HEADER, &rows)?;

    let layers: Vec<serde_json::Value> = done
        .iter()
        .map(|d| {
            let e = &d.result;
            let policies: Vec<serde_json::Value> = e
                .runs
                .iter()
                .map(|run| {
                    let lost = run.state.lost_mass();
                    json!({
                        "policy": run.policy.name,
                        "rho_mode": format!("{:?}", run.policy.rho),
                        "rho_scale": run.policy.scale,
                        "final": run.reports.last().map(report_json),
                        "run_mean": {
                            "captured_energy": run.total.mean_captured(),
                            "cos_exact": run.total.mean_cos_exact(),
                            "cos_diagonal": run.total.mean_cos_diagonal(),
                        },
                        "final_mean_lost_mass": lost.iter().sum::<f64>() / lost.len().max(1) as f64,
                    })
                })
                .collect();
            json!({
                "name": d.layer.name,
                "d_in": e.b,
                "d_out": e.m,
                "rank": e.rank,
                "full_rank": e.rank >= e.b,
                "steps": e.steps,
                "sampled_blocks": e.blocks,
                "cosines_skipped": !e.dense,
                "seconds": d.seconds,
                "interrupted": e.interrupted,
                "policies": policies,
            })
        })
        .collect();
    let value = json!({
        "task": task,
        "run": args.model.run,
        "seed": args.model.seed,
        "quick": args.quick,
        "steps": settings.steps,
        "batch_size": batch_size,
        "rank": args.rank,
        "eps": SharedBasisConfig::default().eps,
        "policies": settings.policies.iter().map(|p| json!({
            "name": p.name,
            "rho_mode": format!("{:?}", p.rho),
            "rho_scale": p.scale,
        })).collect::<Vec<_>>(),
        "sample_blocks": args.sample_blocks,
        "max_dense": args.max_dense,
        "every": settings.every,
        "interrupted": interrupted,
        "layers": layers,
        "notes": [
            "direction u_i = -(B R_i B^T + (rho_i + eps) I)^{-1/2} g_i of SharedBasis<f64> (rank capped at d_in, other settings the library's defaults)",
            "cos_exact: cosine of u_i with exact block Adagrad -(H_i + eps I)^{-1/2} g_i, H_i = sum_{s<=t} g_{s,i} g_{s,i}^T (dense, sampled blocks), mean over sampled blocks and the steps since the previous report",
            "cos_diagonal: cosine of diagonal Adagrad -g_i / sqrt(diag(H_i) + eps) with the same exact block Adagrad direction (policy-independent)",
            "captured_energy: sum_i |B^T g_i|^2 / sum_i |g_i|^2 with the basis before the step, mean over the steps since the previous report",
            "median_rho_over_top: median over blocks of rho_i / lambda_max(R_i) (blocks with lambda_max = 0 left out); above_ridge: eigenvalues of R_i above rho_i",
        ],
    });
    write_json(&out.join("direction.json"), &value)
}

/// Prints one layer's final values per policy.
fn print_layer(d: &Done) {
    let e = &d.result;
    println!(
        "\n{} ({}×{}, k = {}, T = {}, blocks {:?}; {:.1} s)",
        d.layer.name, e.b, e.m, e.rank, e.steps, e.blocks, d.seconds
    );
    println!(
        "  {:<16}{:>12}{:>10}{:>10}{:>10}{:>11}{:>11}",
        "policy", "ρ/λmax med", "above md", "above mn", "captured", "cos exact", "cos diag"
    );
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    for run in &e.runs {
        let Some(r) = run.reports.last() else {
            continue;
        };
        println!(
            "  {:<16}{:>12}{:>10.1}{:>10.2}{:>10.4}{:>11}{:>11}",
            run.policy.name,
            r.median_rho_over_top
                .map_or_else(|| "-".to_string(), |v| format!("{v:.3e}")),
            r.median_above_ridge,
            r.mean_above_ridge,
            r.captured_energy,
            fmt(r.cos_exact),
            fmt(r.cos_diagonal),
        );
    }
    if !e.dense {
        println!("  note: d_in = {} > --max-dense: cosines skipped", e.b);
    }
    if e.rank >= e.b {
        println!(
            "  note: k = d_in (full rank): every unit-scale policy is exact block Adagrad here"
        );
    }
}

pub fn run(args: &DirectionArgs, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    let settings = Settings::resolve(args)?;
    create_dir(&args.out)?;
    let loaded = Loaded::open(&args.model, args.quick, &args.out)?;
    let task = if matches!(loaded, Loaded::Tagger { .. }) {
        "tagger"
    } else {
        "autoencoder"
    };
    let batch_size = args.batch_size.unwrap_or(if args.quick {
        64
    } else {
        loaded.config().batch_size
    });
    let layers = select_layers("direction", &loaded, &args.layers, args.quick)?;
    eprintln!(
        "analyze direction: {} layer(s), T = {} steps of batch {batch_size}, rank {}, policies {}",
        layers.len(),
        settings.steps,
        args.rank,
        settings
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut done: Vec<Done> = Vec::new();
    let mut index = 0u64;
    let interrupted = for_each_layer_stream(
        "direction",
        &loaded,
        &layers,
        settings.steps,
        batch_size,
        args.model.seed,
        stop,
        |layer, layer_stream| {
            let start = Instant::now();
            let opts = LayerOptions {
                rank: args.rank,
                sample_blocks: args.sample_blocks,
                max_dense: args.max_dense,
                every: settings.every,
                seed: args.model.seed.wrapping_add(index),
            };
            index += 1;
            let result = layer_direction(&layer_stream, &settings.policies, &opts, stop)?;
            drop(layer_stream);
            let interrupted = result.interrupted;
            let finished = Done {
                layer,
                result,
                seconds: start.elapsed().as_secs_f64(),
            };
            print_layer(&finished);
            done.push(finished);
            Ok(interrupted)
        },
    )?;
    if interrupted {
        eprintln!(
            "analyze direction: stopped after {} of {} layers; writing those",
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
    println!("wrote {}", args.out.join("direction.csv").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Side;
    use rand::Rng;

    fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
        // Box–Muller.
        let u: f64 = 1.0 - rng.random::<f64>();
        let v: f64 = rng.random::<f64>();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// T seeded Gaussian gradients (b × m) with a correlated, anisotropic covariance:
    /// g = A z, A b × b with entries scaled so that directions differ in size.
    fn stream(b: usize, m: usize, steps: usize, seed: u64) -> Vec<Mat<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = Mat::<f64>::from_fn(b, b, |_, c| gaussian(&mut rng) / (1.0 + c as f64));
        (0..steps)
            .map(|_| {
                let z = Mat::<f64>::from_fn(b, m, |_, _| gaussian(&mut rng));
                &a * &z
            })
            .collect()
    }

    fn policies(names: &[&str]) -> Vec<Policy> {
        names.iter().map(|n| parse_policy(n).unwrap()).collect()
    }

    /// −(S + shift·I)^{−1/2} g for a symmetric S, by faer's dense eigendecomposition.
    fn inv_root_apply(s: &Mat<f64>, shift: f64, g: MatRef<'_, f64>) -> Vec<f64> {
        let eig = s.self_adjoint_eigen(Side::Lower).unwrap();
        let (vals, vecs) = (eig.S().column_vector(), eig.U());
        let n = s.nrows();
        let scaled = Mat::<f64>::from_fn(n, n, |r, c| vecs[(r, c)] / (vals[c] + shift).sqrt());
        let out = -(&scaled * (vecs.transpose() * g));
        out.col(0).iter().copied().collect()
    }

    fn dense_cos(a: &[f64], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    }

    #[test]
    fn direction_policy_names_parse() {
        let p = parse_policy("paper").unwrap();
        assert_eq!((p.rho, p.scale), (RhoMode::PowerIteration(10), 1.0));
        let p = parse_policy(" paper-0.001 ").unwrap();
        assert_eq!((p.name.as_str(), p.scale), ("paper-0.001", 0.001));
        let p = parse_policy("random-start").unwrap();
        assert_eq!((p.rho, p.scale), (RhoMode::RandomStart(1), 1.0));
        let p = parse_policy("random-start-0.5").unwrap();
        assert_eq!((p.rho, p.scale), (RhoMode::RandomStart(1), 0.5));
        let p = parse_policy("fd-1e-3").unwrap();
        assert_eq!((p.rho, p.scale), (RhoMode::FrequentDirections, 1e-3));
        assert_eq!(parse_policy("exact").unwrap().rho, RhoMode::Exact);
        assert_eq!(parse_policy("rayleigh").unwrap().rho, RhoMode::Rayleigh);
        assert!(parse_policy("paper--1").is_err());
        assert!(parse_policy("paper-x").is_err());
        assert!(parse_policy("nope").is_err());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn direction_full_rank_cosine_is_one() {
        // k = b: B R_i Bᵀ + ρ_i I = H_i for every unit-scale policy, so u_i is exact block
        // Adagrad's direction at every step, on every block.
        let (b, m, steps) = (6, 5, 20);
        let g = stream(b, m, steps, 11);
        let all = policies(&["paper", "fd", "exact", "random-start", "rayleigh"]);
        let blocks: Vec<usize> = (0..m).collect();
        let mut exact = ExactBlocks::new(b, &blocks, SharedBasisConfig::default().eps);
        let mut runs: Vec<PolicyRun> = all
            .iter()
            .map(|p| PolicyRun::new(p.clone(), b, b, m).unwrap())
            .collect();
        let mut worst_diag = 1.0f64;
        for gt in &g {
            let reference = exact.update(gt.as_ref()).unwrap();
            for r in &reference {
                worst_diag = worst_diag.min(r.cos_diagonal.unwrap());
            }
            for run in &mut runs {
                let rec = run.step(gt.as_ref(), &blocks, Some(&reference)).unwrap();
                assert_eq!(rec.cos_exact.len(), m);
                for c in &rec.cos_exact {
                    let c = c.unwrap();
                    assert!((c - 1.0).abs() < 1e-9, "{}: cos {c}", run.policy.name);
                }
            }
        }
        // The diagonal reference line is not exact on this correlated stream.
        assert!(worst_diag < 0.99, "{worst_diag}");
        // The same through the layer driver's reports (every step).
        let opts = LayerOptions {
            rank: b,
            sample_blocks: m,
            max_dense: 1024,
            every: 1,
            seed: 0,
        };
        let result = layer_direction(&g, &all, &opts, &AtomicBool::new(false)).unwrap();
        assert_eq!(result.blocks, blocks);
        assert_eq!(result.rank, b);
        for run in &result.runs {
            assert_eq!(run.reports.len(), steps);
            for r in &run.reports {
                let c = r.cos_exact.unwrap();
                assert!(
                    (c - 1.0).abs() < 1e-9,
                    "{} step {}: {c}",
                    run.policy.name,
                    r.step
                );
                assert!(r.cos_diagonal.unwrap() < 1.0);
            }
        }
    }

    #[test]
    fn direction_cosines_and_ridge_match_dense_references() {
        let (b, m, k, steps) = (10, 5, 3, 20);
        let eps = SharedBasisConfig::default().eps;
        let g = stream(b, m, steps, 12);
        let all = policies(&["paper", "fd", "rayleigh", "paper-0.001"]);
        let blocks = sample_blocks(m, 3, 5);
        assert_eq!(blocks.len(), 3);
        let mut exact = ExactBlocks::new(b, &blocks, eps);
        let mut runs: Vec<PolicyRun> = all
            .iter()
            .map(|p| PolicyRun::new(p.clone(), k, b, m).unwrap())
            .collect();
        // The test's own dense statistics of every block.
        let mut stats = vec![Mat::<f64>::zeros(b, b); m];
        let mut below_one = 0;
        for (t, gt) in g.iter().enumerate() {
            for (i, h) in stats.iter_mut().enumerate() {
                let gi = gt.col(i).as_mat();
                *h += gi * gi.transpose();
            }
            let reference = exact.update(gt.as_ref()).unwrap();
            for (j, &i) in blocks.iter().enumerate() {
                let want_exact = inv_root_apply(&stats[i], eps, gt.col(i).as_mat());
                let diag: Vec<f64> = (0..b)
                    .map(|r| -gt[(r, i)] / (stats[i][(r, r)] + eps).sqrt())
                    .collect();
                let want = dense_cos(&diag, &want_exact);
                let got = reference[j].cos_diagonal.unwrap();
                assert!(
                    (got - want).abs() < 1e-9,
                    "diag t={t} i={i}: {got} vs {want}"
                );
            }
            for run in &mut runs {
                // Captured energy with the basis before the step (0 at t = 0: no basis yet).
                let before = run.state.basis().transpose() * gt;
                let want_captured = before.squared_norm_l2() / gt.squared_norm_l2();
                let rec = run.step(gt.as_ref(), &blocks, Some(&reference)).unwrap();
                assert!(
                    (rec.captured_energy - want_captured).abs() < 1e-12,
                    "{} t={t}: {} vs {want_captured}",
                    run.policy.name,
                    rec.captured_energy
                );
                if t > 0 {
                    assert!(rec.captured_energy > 0.0);
                }
                let state = &run.state;
                let basis = state.basis();
                for (j, &i) in blocks.iter().enumerate() {
                    // u_i from the state's accessors: −(B R_i Bᵀ + (ρ_i + ε) I)^{−1/2} g_i.
                    let approx = basis * state.coeffs(i) * basis.transpose();
                    let u = inv_root_apply(&approx, state.lost_mass()[i] + eps, gt.col(i).as_mat());
                    let e = inv_root_apply(&stats[i], eps, gt.col(i).as_mat());
                    let want = dense_cos(&u, &e);
                    let got = rec.cos_exact[j].unwrap();
                    assert!(
                        (got - want).abs() < 1e-9,
                        "{} t={t} i={i}: {got} vs {want}",
                        run.policy.name
                    );
                    if want < 0.999 {
                        below_one += 1;
                    }
                }
                if (t + 1) % 5 == 0 {
                    let report = run.report(t + 1).unwrap();
                    let state = &run.state;
                    // Reference ridge summary from coeffs(i) and lost_mass().
                    let mut ratios = Vec::new();
                    let mut above = Vec::new();
                    for i in 0..m {
                        let eig = state.coeffs(i).to_owned().self_adjoint_eigen(Side::Lower);
                        let vals: Vec<f64> = eig
                            .unwrap()
                            .S()
                            .column_vector()
                            .iter()
                            .map(|v| v.max(0.0))
                            .collect();
                        let top = vals.iter().copied().fold(0.0, f64::max);
                        let rho = state.lost_mass()[i];
                        if top > 0.0 {
                            ratios.push(rho / top);
                        }
                        above.push(vals.iter().filter(|&&l| l > rho).count() as f64);
                    }
                    ratios.sort_by(f64::total_cmp);
                    above.sort_by(f64::total_cmp);
                    let mid = |v: &[f64]| {
                        let n = v.len();
                        if n % 2 == 1 {
                            v[n / 2]
                        } else {
                            (v[n / 2 - 1] + v[n / 2]) / 2.0
                        }
                    };
                    let want_ratio = mid(&ratios);
                    let got_ratio = report.median_rho_over_top.unwrap();
                    assert!(
                        (got_ratio - want_ratio).abs() <= 1e-9 * want_ratio.abs().max(1e-300),
                        "{} t={}: {got_ratio} vs {want_ratio}",
                        run.policy.name,
                        t + 1
                    );
                    assert_eq!(report.median_above_ridge, mid(&above));
                    let mean = above.iter().sum::<f64>() / m as f64;
                    assert!((report.mean_above_ridge - mean).abs() < 1e-12);
                }
            }
        }
        // At rank < b the directions are not exact block Adagrad's: the comparison bites.
        assert!(below_one > 0);
        // Algorithm 1's ridge dwarfs the statistics, FD's does not.
        let final_ratio = |name: &str| {
            let run = runs.iter().find(|r| r.policy.name == name).unwrap();
            run.reports.last().unwrap().median_rho_over_top.unwrap()
        };
        assert!(final_ratio("paper") > final_ratio("fd"));
        assert!(final_ratio("paper") > final_ratio("paper-0.001"));
    }

    #[test]
    fn direction_quick_end_to_end_on_the_autoencoder() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("direction");
        let loaded = super::super::test_support::quick_autoencoder(tmp.path(), &out);
        let expected_layers: Vec<Layer> = select_layers("direction", &loaded, &[], true).unwrap();
        drop(loaded);
        let args = DirectionArgs {
            model: ModelArgs {
                data: Some(super::super::test_support::mnist_dir(tmp.path())),
                ..Default::default()
            },
            out: out.clone(),
            quick: true,
            steps: None,
            batch_size: None,
            layers: Vec::new(),
            rank: 32,
            policies: ["paper", "fd", "random-start", "rayleigh", "paper-0.001"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            sample_blocks: 4,
            max_dense: 1024,
            every: None,
        };
        run(&args, &AtomicBool::new(false)).unwrap();
        let csv = std::fs::read_to_string(out.join("direction.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some(HEADER.join(",").as_str()));
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        // 30 steps, every 6: reports at 6, 12, ..., 30.
        let report_steps: Vec<String> = (1..=5).map(|q| (6 * q).to_string()).collect();
        assert_eq!(expected_layers.len(), 2);
        for layer in &expected_layers {
            for policy in &args.policies {
                let steps: Vec<&str> = rows
                    .iter()
                    .filter(|r| r[0] == layer.name && r[1] == policy)
                    .map(|r| r[2])
                    .collect();
                assert_eq!(steps, report_steps, "{} {policy}", layer.name);
            }
        }
        assert_eq!(rows.len(), 2 * 5 * 5);
        let value = |layer: &str, policy: &str, col: usize| -> f64 {
            rows.iter()
                .rfind(|r| r[0] == layer && r[1] == policy)
                .unwrap()[col]
                .parse()
                .unwrap()
        };
        let mut low_rank = 0;
        for layer in &expected_layers {
            for r in rows.iter().filter(|r| r[0] == layer.name) {
                assert_eq!(r.len(), HEADER.len());
                let captured: f64 = r[6].parse().unwrap();
                assert!((0.0..=1.0 + 1e-12).contains(&captured), "{r:?}");
                for col in [7, 8] {
                    let c: f64 = r[col].parse().unwrap();
                    assert!(c.abs() <= 1.0 + 1e-12, "{r:?}");
                }
            }
            if layer.d_in > 32 {
                low_rank += 1;
                let paper = value(&layer.name, "paper", 3);
                let fd = value(&layer.name, "fd", 3);
                assert!(paper > fd, "{}: paper {paper} vs fd {fd}", layer.name);
            } else {
                // Full rank: the paper's and FD's directions are exact block Adagrad's.
                for policy in ["paper", "fd"] {
                    let c = value(&layer.name, policy, 7);
                    assert!(c > 1.0 - 1e-6, "{} {policy}: {c}", layer.name);
                }
            }
        }
        assert!(low_rank > 0, "no layer with rank < d_in");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("direction.json")).unwrap())
                .unwrap();
        assert_eq!(json["steps"], 30);
        assert_eq!(json["layers"].as_array().unwrap().len(), 2);
        assert_eq!(json["layers"][0]["policies"].as_array().unwrap().len(), 5);

        // Bad input: a clear error (the model in OUT/model is reused).
        let bad = |f: &dyn Fn(&mut DirectionArgs)| {
            let mut a = args.clone();
            f(&mut a);
            match run(&a, &AtomicBool::new(false)) {
                Err(AnalyzeError::Invalid(msg)) => msg,
                other => panic!("{other:?}"),
            }
        };
        assert!(bad(&|a| a.steps = Some(0)).contains("--steps"));
        assert!(bad(&|a| a.policies = vec!["nope".into()]).contains("nope"));
        assert!(bad(&|a| a.policies = vec!["fd".into(), "fd".into()]).contains("twice"));
        assert!(bad(&|a| a.layers = vec!["nope".into()]).contains("nope"));
    }
}
