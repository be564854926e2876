//! `precond analyze regret`: the regret of diagonal, exact block-diagonal, shared-basis and
//! full-matrix Adagrad on an online convex problem (the paper's §2.3, Theorems 1–2).
//!
//! **The game** (§2.3). The decision is a matrix W ∈ R^{b×m} whose column i is block i, the
//! optimizer's block structure (NOTES §1). Round s reveals (x_s, y_s) from a seeded stream and
//! the learner pays f_s(W_s):
//!
//! * `logistic` (default): multiclass logistic regression, f_s(W) = −log softmax(Wᵀx_s)[y_s],
//!   on a Gaussian mixture: y_s uniform over m classes, x_s = μ_{y_s} + A z_s with z_s ~ N(0, I)
//!   and A = Q diag(σ), Q a random rotation and σ log-spaced from `--feature-scale` (3) down to
//!   `--feature-scale`/`--condition` (30): correlated, ill-conditioned features, where a full or
//!   block preconditioner can do what a diagonal one cannot. The class means are μ_c = Σ w°_c
//!   with Σ = AAᵀ and W° random with equal w°_cᵀ Σ w°_c for every class and ‖W°‖_F = R/2: the
//!   mixture's Bayes posterior is then exactly softmax(W°ᵀx), so the best W stays near W°,
//!   inside K, instead of growing with the classes' separability.
//! * `least-squares`: f_s(W) = ½‖Wᵀx_s − y_s‖² with x_s = A z_s and y_s = W°ᵀx_s + noise,
//!   ‖W°‖_F = R/2 (inside K).
//!
//! **Decision set.** K = {‖W‖_F ≤ R}. After every step W ← Π_K(W + η u) with the *Euclidean*
//! projection (a rescaling). Theorem 1's analysis projects in the preconditioner's norm
//! ‖·‖_{H_t^{1/2}}; the Euclidean projection is a simplification, harmless when the iterates stay
//! inside K, and the number of steps at which it acted is reported for every method.
//!
//! **Methods** (each the library's raw direction u, θ ← θ + η u, no grafting, momentum or
//! weight decay; β2 = 1 sums everywhere, so no bias correction):
//! * `diagonal`: [`Diagonal`] Adagrad, u = −g/(√v + ε) per entry (torch's ε placement);
//! * `block`: [`BlockAdam`] with block size b, β1 = 0, β2 = 1: exact block-diagonal Adagrad,
//!   u_i = −(H_i + εI)^{−1/2} g_i with H_i = Σ_s g_i g_iᵀ;
//! * `shared-k<k>`: [`SharedBasis`] (Algorithm 1) of rank k,
//!   u_i = −(B R_i Bᵀ + (ρ_i + ε) I)^{−1/2} g_i, with ρ measured exactly by default;
//! * `full`: [`FullMatrix`] Adagrad over all b·m variables, when b·m ≤ `--full-max`.
//!
//! Each method runs at every η of `--lrs` (in parallel over η) and keeps the η with the lowest
//! final regret; every curve is drawn at its method's η.
//!
//! **Regret.** Regret_t = Σ_{s≤t} f_s(W_s) − Σ_{s≤t} f_s(W*_T) with W*_T = argmin_{W∈K}
//! Σ_{s≤T} f_s(W), the best fixed decision for the *whole* horizon: at t < T the curve measures
//! against that same W*_T (so it can be negative early on; the log-log plot leaves such points
//! out). W*_T is computed by a projected Newton method in f64 (below) to a relative KKT residual
//! of [`KKT_TOL`], reported with the comparator's loss.
//!
//! **Theorems.** For every shared-basis run, Theorem 2's two sides Σ_i (ρ_T^{(i)})^{1/2} (from
//! [`SharedBasis::lost_mass`]) and (3m³)^{1/4} (Σ_i Tr H_T^{(i)})^{1/2}, with H_T^{(i)} = Σ_s
//! g_s^{(i)} g_s^{(i)ᵀ} accumulated from the gradients that run saw; and Theorem 1's right-hand
//! side √2 D Σ_i Tr((H_T^{(i)})^{1/2}) + √2 b Σ_i (ρ_T^{(i)})^{1/2} with D = 2R, for the
//! shared-basis runs and for `block` (Algorithm 1 at full rank, ρ = 0). Theorem 1 is proved for
//! its own step size and projection, so whether the final regret stays below it at the chosen η
//! with a Euclidean projection is an observation, not a check of the theorem; Theorem 2 holds
//! for any gradient sequence and is a check.
//!
//! Outputs in `--out`: `regret.csv` (`method,t,regret` at ~60 log-spaced t), `regret.json`
//! (configuration, comparator, per-method η grid, final regret, log-log slope over the last
//! decade, projection counts, the theorems' sides), `regret.png`/`.svg` (log-log regret vs t
//! with a dashed √T reference through the best method's first plotted value).
//!
//! Cost: the default run (b·m = 200, T = 10⁴, 7 step sizes) takes about 15 minutes on 2 busy
//! cores, most of it in full-matrix Adagrad (a 200 × 200 eigendecomposition per step);
//! `--full-max 0` leaves it out. `--quick` takes a few seconds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use faer::{Mat, MatRef, Side};
use precond::block_diag::{BlockAdam, BlockAdamConfig};
use precond::diagonal::{Diagonal, DiagonalConfig, DiagonalKind};
use precond::full_matrix::{FullMatrix, FullMatrixConfig};
use precond::{PrecondError, Preconditioner, RhoMode, SharedBasis, SharedBasisConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::plot::{self, LinePlot, Series};
use super::{create_dir, write_csv, write_json, AnalyzeError};

/// Relative KKT residual (‖∇F + λW‖ over ‖∇F(0)‖) the comparator's Newton method aims for.
pub const KKT_TOL: f64 = 1e-10;

/// Largest b·m for the comparator's dense (b·m)² Newton Hessian.
const COMPARATOR_MAX_PARAMS: usize = 2500;

/// Newton iterations of the comparator at most.
const MAX_NEWTON_STEPS: usize = 100;

/// Log-spaced rounds at which the regret is recorded.
const CHECKPOINTS: usize = 60;

/// The online convex problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProblemKind {
    /// Online multiclass logistic regression on a Gaussian mixture with correlated features
    #[default]
    Logistic,
    /// Online least squares y = W°ᵀx + noise with correlated features
    LeastSquares,
}

/// `precond analyze regret` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RegretArgs {
    /// Output directory (CSV, JSON, PNG, SVG)
    #[arg(long)]
    pub out: PathBuf,
    /// A small configuration that finishes in seconds (b = 8, m = 4, T = 1000, η ∈ {0.1, 1, 10})
    #[arg(long)]
    pub quick: bool,
    /// The online problem
    #[arg(long, value_enum, default_value_t = ProblemKind::Logistic)]
    pub problem: ProblemKind,
    /// b: input features, the length of each block (rows of W) [default: 20; --quick: 8]
    #[arg(long)]
    pub features: Option<usize>,
    /// m: classes (logistic) or outputs (least squares), the number of blocks (columns of W)
    /// [default: 10; --quick: 4]
    #[arg(long)]
    pub outputs: Option<usize>,
    /// T: rounds of the online game [default: 10000; --quick: 1000]
    #[arg(long)]
    pub steps: Option<usize>,
    /// Step sizes η tried for every method, comma-separated; each method keeps the one with the
    /// lowest final regret [default: 0.01,0.03,0.1,0.3,1,3,10; --quick: 0.1,1,10]
    #[arg(long, value_delimiter = ',')]
    pub lrs: Option<Vec<f64>>,
    /// Ranks k of the shared-basis runs, comma-separated, each at most b [default: those of
    /// 1,2,4,8 that are at most b]
    #[arg(long, value_delimiter = ',')]
    pub ranks: Option<Vec<usize>>,
    /// Radius R of the decision set K = {‖W‖_F ≤ R} (Theorem 1's diameter is D = 2R)
    #[arg(long, default_value_t = 10.0)]
    pub radius: f64,
    /// Run full-matrix Adagrad only when b·m is at most this (its statistics hold (b·m)² values
    /// and every step eigendecomposes them)
    #[arg(long, default_value_t = 400)]
    pub full_max: usize,
    /// ε of every preconditioner (added to the eigenvalues before the inverse root; diagonal
    /// Adagrad adds it to √v)
    #[arg(long, default_value_t = 1e-6)]
    pub eps: f64,
    /// Condition number of the feature map x = A z: A's singular values are log-spaced from
    /// --feature-scale down to --feature-scale/condition
    #[arg(long, default_value_t = 30.0)]
    pub condition: f64,
    /// Largest singular value of the feature map A (with ‖W°‖_F = R/2 it sets how strongly the
    /// features determine the outputs)
    #[arg(long, default_value_t = 3.0)]
    pub feature_scale: f64,
    /// Standard deviation of the least-squares target noise
    #[arg(long, default_value_t = 0.5)]
    pub noise: f64,
    /// Measure the shared basis' lost mass ρ by N power iterations, as the optimizer does
    /// [default: the exact spectral norm, so that Theorem 2 is checked as stated]
    #[arg(long)]
    pub rho_power_iters: Option<usize>,
    /// Seed of the stream and of the shared basis' randomized SVD
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The resolved configuration of one analysis.
#[derive(Debug, Clone)]
struct Config {
    problem: ProblemKind,
    /// b.
    features: usize,
    /// m.
    outputs: usize,
    /// T.
    steps: usize,
    lrs: Vec<f64>,
    ranks: Vec<usize>,
    radius: f64,
    full_max: usize,
    eps: f64,
    condition: f64,
    feature_scale: f64,
    noise: f64,
    rho: RhoMode,
    seed: u64,
}

fn invalid(msg: impl Into<String>) -> AnalyzeError {
    AnalyzeError::Invalid(format!("analyze regret: {}", msg.into()))
}

impl Config {
    fn from_args(args: &RegretArgs) -> Result<Config, AnalyzeError> {
        let q = args.quick;
        let features = args.features.unwrap_or(if q { 8 } else { 20 });
        let outputs = args.outputs.unwrap_or(if q { 4 } else { 10 });
        let steps = args.steps.unwrap_or(if q { 1000 } else { 10_000 });
        let lrs = args.lrs.clone().unwrap_or_else(|| {
            if q {
                vec![0.1, 1.0, 10.0]
            } else {
                vec![0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
            }
        });
        let ranks = match &args.ranks {
            Some(r) => r.clone(),
            None => [1, 2, 4, 8]
                .into_iter()
                .filter(|&k| k <= features)
                .collect(),
        };
        let rho = match args.rho_power_iters {
            None => RhoMode::Exact,
            Some(0) => return Err(invalid("--rho-power-iters must be at least 1")),
            Some(n) => RhoMode::PowerIteration(n),
        };
        let cfg = Config {
            problem: args.problem,
            features,
            outputs,
            steps,
            lrs,
            ranks,
            radius: args.radius,
            full_max: args.full_max,
            eps: args.eps,
            condition: args.condition,
            feature_scale: args.feature_scale,
            noise: args.noise,
            rho,
            seed: args.seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), AnalyzeError> {
        let (b, m) = (self.features, self.outputs);
        if b == 0 || m == 0 {
            return Err(invalid(format!(
                "--features (b = {b}) and --outputs (m = {m}) must be at least 1"
            )));
        }
        if self.problem == ProblemKind::Logistic && m < 2 {
            return Err(invalid(
                "logistic regression needs at least 2 classes (--outputs)",
            ));
        }
        if b.saturating_mul(m) > COMPARATOR_MAX_PARAMS {
            return Err(invalid(format!(
                "b·m = {} exceeds {COMPARATOR_MAX_PARAMS}, the most the comparator's dense \
                 Newton Hessian handles",
                b.saturating_mul(m)
            )));
        }
        if self.steps == 0 {
            return Err(invalid("--steps must be at least 1"));
        }
        if self.lrs.is_empty() {
            return Err(invalid("--lrs is empty"));
        }
        if let Some(lr) = self.lrs.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(invalid(format!("step size {lr} must be finite and >= 0")));
        }
        if let Some(k) = self.ranks.iter().find(|&&k| k == 0 || k > b) {
            return Err(invalid(format!("rank {k} must be in 1..=b = {b}")));
        }
        if !(self.radius.is_finite() && self.radius > 0.0) {
            return Err(invalid(format!(
                "--radius {} must be finite and > 0",
                self.radius
            )));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid(format!(
                "--eps {} must be finite and > 0",
                self.eps
            )));
        }
        if !(self.condition.is_finite() && self.condition >= 1.0) {
            return Err(invalid(format!(
                "--condition {} must be finite and >= 1",
                self.condition
            )));
        }
        if !(self.feature_scale.is_finite() && self.feature_scale > 0.0) {
            return Err(invalid(format!(
                "--feature-scale {} must be finite and > 0",
                self.feature_scale
            )));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(invalid(format!(
                "--noise {} must be finite and >= 0",
                self.noise
            )));
        }
        Ok(())
    }

    /// The methods compared, in table order.
    fn methods(&self) -> Vec<Method> {
        let mut ranks = self.ranks.clone();
        ranks.sort_unstable();
        ranks.dedup();
        let mut methods = vec![Method::Diagonal, Method::Block];
        methods.extend(ranks.into_iter().map(Method::Shared));
        if self.features * self.outputs <= self.full_max {
            methods.push(Method::Full);
        }
        methods
    }

    fn to_json(&self) -> Value {
        json!({
            "problem": match self.problem {
                ProblemKind::Logistic => "logistic",
                ProblemKind::LeastSquares => "least-squares",
            },
            "features_b": self.features,
            "outputs_m": self.outputs,
            "steps_T": self.steps,
            "lrs": self.lrs,
            "ranks": self.ranks,
            "radius_R": self.radius,
            "diameter_D": 2.0 * self.radius,
            "full_max": self.full_max,
            "eps": self.eps,
            "condition": self.condition,
            "feature_scale": self.feature_scale,
            "noise": self.noise,
            "rho": match self.rho {
                RhoMode::Exact => "exact".to_string(),
                RhoMode::PowerIteration(n) => format!("power iteration ({n})"),
                other => format!("{other:?}"),
            },
            "seed": self.seed,
        })
    }
}

/// A standard normal draw (Box–Muller on two uniforms).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The rounds (x_s, y_s) of the online game, s = 0..T.
struct Stream {
    problem: ProblemKind,
    /// m: classes or outputs.
    outputs: usize,
    /// T × b: row s is x_s.
    inputs: Mat<f64>,
    /// Logistic: the class y_s of each round (empty otherwise).
    labels: Vec<usize>,
    /// Least squares: T × m, row s is y_s (0 × 0 otherwise).
    targets: Mat<f64>,
    /// W° (‖W°‖_F = R/2): the W* of the least-squares targets, the Bayes weights of the
    /// logistic mixture.
    truth: Mat<f64>,
}

impl Stream {
    /// The seeded stream of `cfg` (module docs).
    fn generate(cfg: &Config) -> Stream {
        let (b, m, t_len) = (cfg.features, cfg.outputs, cfg.steps);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        // A = Q diag(σ): a random rotation of log-spaced scales s … s/condition.
        let rotation = Mat::from_fn(b, b, |_, _| gaussian(&mut rng))
            .qr()
            .compute_Q();
        let scale = |k: usize| {
            let frac = if b > 1 {
                k as f64 / (b - 1) as f64
            } else {
                0.0
            };
            cfg.feature_scale * cfg.condition.powf(-frac)
        };
        // xᵀ = vᵀ diag(σ) Qᵀ for every row v of V.
        let map = Mat::from_fn(b, b, |r, c| scale(r) * rotation[(c, r)]);
        // W° (b × m, ‖W°‖_F = R/2): the least-squares truth, or the logistic Bayes weights.
        let covariance = map.transpose() * &map;
        let mut truth = Mat::from_fn(b, m, |_, _| gaussian(&mut rng));
        if cfg.problem == ProblemKind::Logistic {
            // Equal Σ-norms w°_cᵀ Σ w°_c for every class (see below).
            let sigma_w = &covariance * &truth;
            for j in 0..m {
                let norm = (0..b)
                    .map(|i| truth[(i, j)] * sigma_w[(i, j)])
                    .sum::<f64>()
                    .sqrt()
                    .max(f64::MIN_POSITIVE);
                for i in 0..b {
                    truth[(i, j)] /= norm;
                }
            }
        }
        let factor = 0.5 * cfg.radius / truth.norm_l2().max(f64::MIN_POSITIVE);
        truth = Mat::from_fn(b, m, |i, j| factor * truth[(i, j)]);
        match cfg.problem {
            ProblemKind::Logistic => {
                // Class means μ_c = Σ w°_c with Σ = A Aᵀ: the posterior of the mixture
                // x = μ_y + A z is softmax(W°ᵀx + a) with a_c = −½ w°_cᵀ Σ w°_c, the same for
                // every class, so exactly softmax(W°ᵀx): the model is well specified and W*_T
                // tends to W° (inside K) as T grows.
                let means = &covariance * &truth;
                let labels: Vec<usize> = (0..t_len).map(|_| rng.random_range(0..m)).collect();
                let latent = Mat::from_fn(t_len, b, |_, _| gaussian(&mut rng));
                let noise = &latent * &map;
                let inputs = Mat::from_fn(t_len, b, |s, i| noise[(s, i)] + means[(i, labels[s])]);
                Stream {
                    problem: cfg.problem,
                    outputs: m,
                    inputs,
                    labels,
                    targets: Mat::zeros(0, 0),
                    truth,
                }
            }
            ProblemKind::LeastSquares => {
                let latent = Mat::from_fn(t_len, b, |_, _| gaussian(&mut rng));
                let inputs = &latent * &map;
                let clean = &inputs * &truth;
                let targets = Mat::from_fn(t_len, m, |s, j| {
                    clean[(s, j)] + cfg.noise * gaussian(&mut rng)
                });
                Stream {
                    problem: cfg.problem,
                    outputs: m,
                    inputs,
                    labels: Vec::new(),
                    targets,
                    truth,
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.inputs.nrows()
    }

    fn features(&self) -> usize {
        self.inputs.ncols()
    }

    /// f_s at the outputs z = Wᵀx_s, and ∂f_s/∂z into `residual` (m): softmax(z) − e_{y_s}
    /// (logistic) or z − y_s (least squares). The gradient in W is x_s residualᵀ.
    fn loss_at(&self, s: usize, outputs: &[f64], residual: &mut [f64]) -> f64 {
        match self.problem {
            ProblemKind::Logistic => {
                let max = outputs.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
                let mut sum = 0.0;
                for (r, &z) in residual.iter_mut().zip(outputs) {
                    *r = (z - max).exp();
                    sum += *r;
                }
                for r in residual.iter_mut() {
                    *r /= sum;
                }
                let y = self.labels[s];
                residual[y] -= 1.0;
                max + sum.ln() - outputs[y]
            }
            ProblemKind::LeastSquares => {
                let mut loss = 0.0;
                for (j, (r, &z)) in residual.iter_mut().zip(outputs).enumerate() {
                    *r = z - self.targets[(s, j)];
                    loss += 0.5 * *r * *r;
                }
                loss
            }
        }
    }

    /// f_s(W) for s = 0..T.
    fn losses(&self, weights: MatRef<'_, f64>) -> Vec<f64> {
        let outputs = self.inputs.as_ref() * weights;
        let m = weights.ncols();
        let mut z = vec![0.0; m];
        let mut residual = vec![0.0; m];
        (0..self.len())
            .map(|s| {
                for (j, v) in z.iter_mut().enumerate() {
                    *v = outputs[(s, j)];
                }
                self.loss_at(s, &z, &mut residual)
            })
            .collect()
    }

    /// F(W) = Σ_{s<n} f_s(W), its gradient Xᵀ R (b × m) and the residuals R (n × m).
    fn totals(&self, n: usize, weights: MatRef<'_, f64>) -> (f64, Mat<f64>, Mat<f64>) {
        let x = self.inputs.as_ref().subrows(0, n);
        let outputs = x * weights;
        let m = weights.ncols();
        let mut residuals = Mat::<f64>::zeros(n, m);
        let (mut z, mut r) = (vec![0.0; m], vec![0.0; m]);
        let mut total = 0.0;
        for s in 0..n {
            for (j, v) in z.iter_mut().enumerate() {
                *v = outputs[(s, j)];
            }
            total += self.loss_at(s, &z, &mut r);
            for (j, &v) in r.iter().enumerate() {
                residuals[(s, j)] = v;
            }
        }
        let grad = x.transpose() * &residuals;
        (total, grad, residuals)
    }

    /// ∇²F at the point whose residuals are `residuals` (n × m), over vec(W) flattened
    /// column-major (entry (i, j) at j·b + i, as [`FullMatrix`] flattens): block (j, l) is
    /// Σ_s C_s[j, l] x_s x_sᵀ with C_s = diag(p_s) − p_s p_sᵀ (logistic) or I (least squares).
    fn hessian(&self, residuals: MatRef<'_, f64>) -> Mat<f64> {
        let n = residuals.nrows();
        let m = residuals.ncols();
        let b = self.features();
        let x = self.inputs.as_ref().subrows(0, n);
        let mut h = Mat::<f64>::zeros(b * m, b * m);
        match self.problem {
            ProblemKind::LeastSquares => {
                let gram = x.transpose() * x;
                for j in 0..m {
                    h.as_mut()
                        .submatrix_mut(j * b, j * b, b, b)
                        .copy_from(&gram);
                }
            }
            ProblemKind::Logistic => {
                // p_s = residual + e_{y_s}.
                let prob = |s: usize, j: usize| {
                    residuals[(s, j)] + if self.labels[s] == j { 1.0 } else { 0.0 }
                };
                for j in 0..m {
                    for l in j..m {
                        let weighted = Mat::from_fn(n, b, |s, i| {
                            let pj = prob(s, j);
                            let c = if j == l {
                                pj - pj * pj
                            } else {
                                -pj * prob(s, l)
                            };
                            c * x[(s, i)]
                        });
                        let block = x.transpose() * &weighted;
                        h.as_mut()
                            .submatrix_mut(j * b, l * b, b, b)
                            .copy_from(&block);
                        if l != j {
                            h.as_mut()
                                .submatrix_mut(l * b, j * b, b, b)
                                .copy_from(block.transpose());
                        }
                    }
                }
            }
        }
        h
    }
}

/// ⟨a, b⟩ of two matrices of the same shape.
fn inner(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
    let mut sum = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            sum += a[(i, j)] * b[(i, j)];
        }
    }
    sum
}

/// The KKT residual of min F over the ball ‖W‖ ≤ R at W: ‖∇F‖ inside, ‖∇F + λW‖ with the
/// best multiplier λ = max(0, −⟨∇F, W⟩/‖W‖²) on the boundary. Returns (residual, λ).
fn kkt_residual(weights: MatRef<'_, f64>, grad: MatRef<'_, f64>, radius: f64) -> (f64, f64) {
    let norm = weights.norm_l2();
    if norm < radius * (1.0 - 1e-9) {
        return (grad.norm_l2(), 0.0);
    }
    let lambda = (-inner(grad, weights) / (norm * norm)).max(0.0);
    let r = Mat::from_fn(grad.nrows(), grad.ncols(), |i, j| {
        grad[(i, j)] + lambda * weights[(i, j)]
    });
    (r.norm_l2(), lambda)
}

/// The best fixed decision in hindsight, W*_T = argmin_{W∈K} Σ_{s≤T} f_s(W).
#[derive(Debug, Clone)]
struct Comparator {
    weights: Mat<f64>,
    /// Σ_s f_s(W*_T).
    total_loss: f64,
    /// KKT residual over ‖∇F(0)‖.
    kkt_residual: f64,
    /// The ball's multiplier λ (0: W*_T inside K).
    multiplier: f64,
    newton_steps: usize,
}

/// Minimizes the quadratic model F + ⟨g, V − W⟩ + ½ (V − W)ᵀ H (V − W) over ‖V‖ ≤ R exactly:
/// (H + λI) V = H W − g with the smallest λ ≥ 0 such that ‖V‖ ≤ R (λ = 0 with the
/// pseudo-inverse when that is inside), by H's eigendecomposition and bisection on λ.
fn model_minimizer(
    h: &Mat<f64>,
    weights: MatRef<'_, f64>,
    grad: MatRef<'_, f64>,
    radius: f64,
) -> Result<Mat<f64>, AnalyzeError> {
    let (b, m) = (weights.nrows(), weights.ncols());
    let n = b * m;
    let flat = |a: MatRef<'_, f64>| Mat::from_fn(n, 1, |k, _| a[(k % b, k / b)]);
    let (w, g) = (flat(weights), flat(grad));
    let rhs = h * &w - &g;
    let eig = h.self_adjoint_eigen(Side::Lower).map_err(|e| {
        invalid(format!(
            "comparator: Hessian eigendecomposition failed: {e:?}"
        ))
    })?;
    let (vecs, vals) = (eig.U(), eig.S().column_vector());
    let coef = vecs.transpose() * &rhs;
    let top = vals.iter().fold(0.0f64, |a, &v| a.max(v));
    // Eigenvalues below this are the null space (the softmax's shift invariance, round-off).
    let floor = 1e-13 * top.max(f64::MIN_POSITIVE);
    let shifted = |lambda: f64, k: usize| {
        let l = vals[k].max(0.0) + lambda;
        if lambda == 0.0 && vals[k] <= floor {
            0.0
        } else {
            coef[(k, 0)] / l
        }
    };
    let norm_at = |lambda: f64| {
        (0..n)
            .map(|k| shifted(lambda, k).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let lambda = if norm_at(0.0) <= radius {
        0.0
    } else {
        // ‖V(λ)‖ ≤ ‖c‖/λ, so ‖c‖/R is feasible.
        let (mut lo, mut hi) = (0.0f64, coef.norm_l2() / radius);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if norm_at(mid) > radius {
                lo = mid;
            } else {
                hi = mid;
            }
            if hi - lo <= 1e-15 * hi {
                break;
            }
        }
        hi
    };
    let scaled = Mat::from_fn(n, 1, |k, _| shifted(lambda, k));
    let v = vecs * &scaled;
    let mut out = Mat::from_fn(b, m, |i, j| v[(j * b + i, 0)]);
    let norm = out.norm_l2();
    if norm > radius {
        out = Mat::from_fn(b, m, |i, j| out[(i, j)] * radius / norm);
    }
    Ok(out)
}

/// W*_T over the first `n` rounds by projected Newton: each step minimizes the exact quadratic
/// model over K ([`model_minimizer`]) and backtracks along the segment to it (which stays in K,
/// a convex set) until F decreases (Armijo), from W = 0 until the relative KKT residual is at
/// most [`KKT_TOL`] or no step decreases F.
fn solve_comparator(stream: &Stream, n: usize, radius: f64) -> Result<Comparator, AnalyzeError> {
    let (b, m) = (stream.features(), stream.outputs);
    let mut weights = Mat::<f64>::zeros(b, m);
    let (mut total, mut grad, mut residuals) = stream.totals(n, weights.as_ref());
    let scale = grad.norm_l2().max(f64::MIN_POSITIVE);
    let mut steps = 0;
    while steps < MAX_NEWTON_STEPS {
        let (kkt, _) = kkt_residual(weights.as_ref(), grad.as_ref(), radius);
        if kkt <= KKT_TOL * scale {
            break;
        }
        let h = stream.hessian(residuals.as_ref());
        let target = model_minimizer(&h, weights.as_ref(), grad.as_ref(), radius)?;
        let step = &target - &weights;
        let slope = inner(grad.as_ref(), step.as_ref());
        // The model's minimizer over K is a descent direction (slope ≤ −½ dᵀHd); a positive
        // slope is round-off at the optimum, where only a step that keeps F is taken.
        let slope = slope.min(0.0);
        if step.norm_l2() == 0.0 {
            break;
        }
        let mut alpha = 1.0;
        let mut accepted = false;
        for _ in 0..60 {
            let trial = Mat::from_fn(b, m, |i, j| weights[(i, j)] + alpha * step[(i, j)]);
            let (t_total, t_grad, t_res) = stream.totals(n, trial.as_ref());
            // Armijo, with a slack of the rounding of a sum of n losses.
            if t_total <= total + 1e-4 * alpha * slope + 1e-14 * (1.0 + total.abs()) {
                weights = trial;
                (total, grad, residuals) = (t_total, t_grad, t_res);
                accepted = true;
                break;
            }
            alpha *= 0.5;
        }
        steps += 1;
        if !accepted {
            break;
        }
    }
    let (kkt, multiplier) = kkt_residual(weights.as_ref(), grad.as_ref(), radius);
    Ok(Comparator {
        weights,
        total_loss: total,
        kkt_residual: kkt / scale,
        multiplier,
        newton_steps: steps,
    })
}

/// One method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// Diagonal Adagrad.
    Diagonal,
    /// Exact block-diagonal Adagrad (one b × b statistic per block).
    Block,
    /// Algorithm 1 with a shared basis of this rank.
    Shared(usize),
    /// Full-matrix Adagrad over all b·m variables.
    Full,
}

impl Method {
    fn name(self) -> String {
        match self {
            Method::Diagonal => "diagonal".into(),
            Method::Block => "block".into(),
            Method::Shared(k) => format!("shared-k{k}"),
            Method::Full => "full".into(),
        }
    }
}

/// The library's preconditioner of a method (the shared basis kept concrete for its ρ).
enum Precond {
    Shared(Box<SharedBasis<f64>>),
    Other(Box<dyn Preconditioner<f64>>),
}

impl Precond {
    fn new(method: Method, cfg: &Config) -> Result<Precond, PrecondError> {
        let (b, m, eps) = (cfg.features, cfg.outputs, cfg.eps);
        Ok(match method {
            Method::Diagonal => Precond::Other(Box::new(Diagonal::<f64>::new(
                DiagonalConfig {
                    kind: DiagonalKind::Adagrad,
                    beta1: 0.0,
                    beta2: 1.0,
                    eps,
                    ..DiagonalConfig::default()
                },
                b,
                m,
            )?)),
            Method::Block => Precond::Other(Box::new(BlockAdam::<f64>::new(
                &BlockAdamConfig {
                    block_size: b,
                    beta1: 0.0,
                    beta2: 1.0,
                    eps,
                    ..BlockAdamConfig::default()
                },
                b,
                m,
            )?)),
            Method::Shared(rank) => Precond::Shared(Box::new(SharedBasis::new(
                SharedBasisConfig {
                    rank,
                    rho: cfg.rho,
                    eps,
                    beta2: 1.0,
                    seed: cfg.seed,
                    ..SharedBasisConfig::default()
                },
                b,
                m,
            )?)),
            Method::Full => Precond::Other(Box::new(FullMatrix::<f64>::new(
                FullMatrixConfig {
                    eps,
                    beta2: 1.0,
                    max_dim: cfg.full_max.max(1),
                },
                b,
                m,
            )?)),
        })
    }

    fn as_dyn(&mut self) -> &mut dyn Preconditioner<f64> {
        match self {
            Precond::Shared(p) => p.as_mut(),
            Precond::Other(p) => p.as_mut(),
        }
    }

    fn lost_mass(&self) -> Option<Vec<f64>> {
        match self {
            Precond::Shared(p) => Some(p.lost_mass().to_vec()),
            Precond::Other(_) => None,
        }
    }
}

/// One online run of a method at one η.
struct OnlineRun {
    /// f_s(W_s), s = 0..T.
    losses: Vec<f64>,
    /// Steps at which the projection onto K acted.
    projections: usize,
    /// H_T^{(i)} = Σ_s g_s^{(i)} g_s^{(i)ᵀ} (b × b) of every block.
    block_stats: Vec<Mat<f64>>,
    /// ρ_T^{(i)} (shared basis only).
    lost_mass: Option<Vec<f64>>,
    /// W_s for s = 0..T, when recorded (the tests compare trajectories).
    #[cfg_attr(not(test), allow(dead_code))]
    iterates: Vec<Mat<f64>>,
}

/// Plays the game: W_0 = 0; at round s pay f_s(W_s), then W_{s+1} = Π_K(W_s + η u_s) with u_s
/// the method's raw direction for g_s = ∇f_s(W_s).
fn run_online(
    stream: &Stream,
    method: Method,
    lr: f64,
    cfg: &Config,
    record_iterates: bool,
) -> Result<OnlineRun, PrecondError> {
    let (b, m) = (cfg.features, cfg.outputs);
    let mut precond = Precond::new(method, cfg)?;
    let mut weights = Mat::<f64>::zeros(b, m);
    let mut grad = Mat::<f64>::zeros(b, m);
    let mut direction = Mat::<f64>::zeros(b, m);
    let (mut x, mut z, mut residual) = (vec![0.0; b], vec![0.0; m], vec![0.0; m]);
    let mut block_stats = vec![Mat::<f64>::zeros(b, b); m];
    let mut losses = Vec::with_capacity(stream.len());
    let mut iterates = Vec::new();
    let mut projections = 0;
    for s in 0..stream.len() {
        if record_iterates {
            iterates.push(weights.clone());
        }
        for (i, v) in x.iter_mut().enumerate() {
            *v = stream.inputs[(s, i)];
        }
        for (j, v) in z.iter_mut().enumerate() {
            *v = (0..b).map(|i| x[i] * weights[(i, j)]).sum();
        }
        losses.push(stream.loss_at(s, &z, &mut residual));
        for (j, (&r, stat)) in residual.iter().zip(block_stats.iter_mut()).enumerate() {
            for i in 0..b {
                grad[(i, j)] = x[i] * r;
            }
            // H^{(j)} += g_j g_jᵀ = r_j² x xᵀ.
            let r2 = r * r;
            for c in 0..b {
                let xc = r2 * x[c];
                for (row, &xr) in x.iter().enumerate() {
                    stat[(row, c)] += xc * xr;
                }
            }
        }
        precond
            .as_dyn()
            .precondition(grad.as_ref(), direction.as_mut())?;
        for j in 0..m {
            for i in 0..b {
                weights[(i, j)] += lr * direction[(i, j)];
            }
        }
        let norm = weights.norm_l2();
        if norm > cfg.radius {
            let shrink = cfg.radius / norm;
            for j in 0..m {
                for i in 0..b {
                    weights[(i, j)] *= shrink;
                }
            }
            projections += 1;
        }
    }
    Ok(OnlineRun {
        losses,
        projections,
        block_stats,
        lost_mass: precond.lost_mass(),
        iterates,
    })
}

/// Regret_t = Σ_{s<t} (f_s(W_s) − f_s(W*_T)) at each t of `checkpoints` (1-based rounds).
fn regret_curve(online: &[f64], comparator: &[f64], checkpoints: &[usize]) -> Vec<(usize, f64)> {
    let mut out = Vec::with_capacity(checkpoints.len());
    let mut sum = 0.0;
    let mut next = checkpoints.iter().peekable();
    for (s, (&f, &fc)) in online.iter().zip(comparator).enumerate() {
        sum += f - fc;
        while next.peek().is_some_and(|&&t| t == s + 1) {
            out.push((s + 1, sum));
            next.next();
        }
    }
    out
}

/// About `count` log-spaced rounds in 1..=t_max, always including 1 and t_max.
fn checkpoints(t_max: usize, count: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let span = count.max(2) - 1;
    for k in 0..=span {
        let t = (t_max as f64).powf(k as f64 / span as f64).round() as usize;
        let t = t.clamp(1, t_max);
        if out.last() != Some(&t) {
            out.push(t);
        }
    }
    if out.last() != Some(&t_max) {
        out.push(t_max);
    }
    out
}

/// Least-squares slope of ln regret against ln t over the points with t ≥ t_min and
/// regret > 0 (None with fewer than two).
fn loglog_slope(curve: &[(usize, f64)], t_min: usize) -> Option<f64> {
    let pts: Vec<(f64, f64)> = curve
        .iter()
        .filter(|&&(t, r)| t >= t_min && r > 0.0 && r.is_finite())
        .map(|&(t, r)| ((t as f64).ln(), r.ln()))
        .collect();
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Tr(H^{1/2}) of a symmetric PSD matrix (negative round-off eigenvalues count as 0).
fn trace_root(h: &Mat<f64>) -> Result<f64, AnalyzeError> {
    let eig = h
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| invalid(format!("eigendecomposition of H_T failed: {e:?}")))?;
    Ok(eig
        .S()
        .column_vector()
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum())
}

/// One η of a method's grid.
#[derive(Debug, Clone)]
struct GridPoint {
    lr: f64,
    /// Regret_T, or why the run failed.
    outcome: Result<f64, String>,
}

/// Theorem 2's two sides for one shared-basis run.
#[derive(Debug, Clone, Copy)]
struct Theorem2 {
    /// Σ_i (ρ_T^{(i)})^{1/2}.
    rho_root_sum: f64,
    /// (3m³)^{1/4} (Σ_i Tr H_T^{(i)})^{1/2}.
    rhs: f64,
}

/// A method at its chosen η.
#[derive(Debug, Clone)]
struct MethodResult {
    method: Method,
    grid: Vec<GridPoint>,
    lr: f64,
    curve: Vec<(usize, f64)>,
    final_regret: f64,
    /// Log-log slope of the regret over the last decade of rounds.
    slope: Option<f64>,
    projections: usize,
    /// Σ_i Tr((H_T^{(i)})^{1/2}).
    trace_root_sum: f64,
    /// Σ_i Tr H_T^{(i)}.
    trace_sum: f64,
    /// Theorem 1's right-hand side (Algorithm 1's runs: shared-basis and block).
    theorem1_rhs: Option<f64>,
    theorem2: Option<Theorem2>,
}

impl MethodResult {
    fn theorem1_held(&self) -> Option<bool> {
        self.theorem1_rhs.map(|rhs| self.final_regret <= rhs)
    }

    fn theorem2_held(&self) -> Option<bool> {
        self.theorem2.map(|t| t.rho_root_sum <= t.rhs)
    }
}

/// Everything one analysis measured.
struct Report {
    cfg: Config,
    /// ‖W°‖_F of the stream (R/2).
    truth_norm: f64,
    comparator: Comparator,
    checkpoints: Vec<usize>,
    methods: Vec<MethodResult>,
    /// Methods left out (and why).
    skipped: Vec<(String, String)>,
    interrupted: bool,
}

/// Runs `method` at every η of the grid (in parallel), keeps the η of lowest final regret and
/// measures the theorems' quantities of that run. `Err` names why no η finished.
fn evaluate_method(
    stream: &Stream,
    method: Method,
    cfg: &Config,
    comparator_losses: &[f64],
    checkpoints: &[usize],
) -> Result<Result<MethodResult, String>, AnalyzeError> {
    let n_lrs = cfg.lrs.len();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(n_lrs)
        .max(1);
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<Result<OnlineRun, String>>>> =
        Mutex::new((0..n_lrs).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n_lrs {
                    break;
                }
                let run =
                    run_online(stream, method, cfg.lrs[i], cfg, false).map_err(|e| e.to_string());
                slots.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(run);
            });
        }
    });
    let runs: Vec<Result<OnlineRun, String>> = slots
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not run".into())))
        .collect();
    let total = |run: &OnlineRun| -> f64 {
        run.losses
            .iter()
            .zip(comparator_losses)
            .map(|(f, fc)| f - fc)
            .sum()
    };
    let grid: Vec<GridPoint> = cfg
        .lrs
        .iter()
        .zip(&runs)
        .map(|(&lr, run)| GridPoint {
            lr,
            outcome: match run {
                Ok(run) => {
                    let r = total(run);
                    if r.is_finite() {
                        Ok(r)
                    } else {
                        Err(format!("regret {r}"))
                    }
                }
                Err(e) => Err(e.clone()),
            },
        })
        .collect();
    let best = grid
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.outcome.as_ref().ok().map(|&r| (i, r)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let Some((best, final_regret)) = best else {
        let why: Vec<String> = grid
            .iter()
            .map(|p| format!("η={}: {}", p.lr, p.outcome.as_ref().err().map_or("", |s| s)))
            .collect();
        return Ok(Err(format!("every η failed ({})", why.join("; "))));
    };
    let Some(Ok(run)) = runs.into_iter().nth(best) else {
        return Ok(Err("the chosen run is missing".into()));
    };
    let curve = regret_curve(&run.losses, comparator_losses, checkpoints);
    let mut trace_root_sum = 0.0;
    let mut trace_sum = 0.0;
    for h in &run.block_stats {
        trace_root_sum += trace_root(h)?;
        trace_sum += (0..h.nrows()).map(|k| h[(k, k)]).sum::<f64>();
    }
    let (b, m) = (cfg.features as f64, cfg.outputs as f64);
    let diameter = 2.0 * cfg.radius;
    let rho_root_sum = run
        .lost_mass
        .as_ref()
        .map(|rho| rho.iter().map(|r| r.max(0.0).sqrt()).sum::<f64>());
    // Theorem 1: √2 D Σ_i Tr((H_T^{(i)})^{1/2}) + √2 b Σ_i (ρ_T^{(i)})^{1/2}; exact block
    // Adagrad is Algorithm 1 at full rank with ρ = 0.
    let theorem1_rhs = match method {
        Method::Block => Some(2f64.sqrt() * diameter * trace_root_sum),
        Method::Shared(_) => {
            rho_root_sum.map(|s| 2f64.sqrt() * diameter * trace_root_sum + 2f64.sqrt() * b * s)
        }
        Method::Diagonal | Method::Full => None,
    };
    // Theorem 2: Σ_i (ρ_T^{(i)})^{1/2} ≤ (3m³)^{1/4} (Σ_i Tr H_T^{(i)})^{1/2}.
    let theorem2 = rho_root_sum.map(|rho_root_sum| Theorem2 {
        rho_root_sum,
        rhs: (3.0 * m.powi(3)).powf(0.25) * trace_sum.sqrt(),
    });
    let t_max = cfg.steps;
    Ok(Ok(MethodResult {
        method,
        lr: cfg.lrs[best],
        grid,
        slope: loglog_slope(&curve, (t_max / 10).max(1)),
        curve,
        final_regret,
        projections: run.projections,
        trace_root_sum,
        trace_sum,
        theorem1_rhs,
        theorem2,
    }))
}

/// The whole analysis of `cfg` (no files).
fn experiment(cfg: &Config, stop: &AtomicBool) -> Result<Report, AnalyzeError> {
    let start = Instant::now();
    let stream = Stream::generate(cfg);
    let comparator = solve_comparator(&stream, cfg.steps, cfg.radius)?;
    eprintln!(
        "regret: comparator W*_T: loss {:.6e}, ‖W*‖ {:.4} (R = {}), relative KKT residual {:.2e}, \
         {} Newton steps ({:.1} s)",
        comparator.total_loss,
        comparator.weights.norm_l2(),
        cfg.radius,
        comparator.kkt_residual,
        comparator.newton_steps,
        start.elapsed().as_secs_f64()
    );
    if comparator.kkt_residual > 1e-9 {
        eprintln!(
            "regret: warning: the comparator's relative KKT residual {:.2e} is above 1e-9",
            comparator.kkt_residual
        );
    }
    let comparator_losses = stream.losses(comparator.weights.as_ref());
    let points = checkpoints(cfg.steps, CHECKPOINTS);
    let mut methods = Vec::new();
    let mut skipped = Vec::new();
    if cfg.features * cfg.outputs > cfg.full_max {
        skipped.push((
            Method::Full.name(),
            format!(
                "b·m = {} > --full-max {}",
                cfg.features * cfg.outputs,
                cfg.full_max
            ),
        ));
    }
    let mut interrupted = false;
    for method in cfg.methods() {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        match evaluate_method(&stream, method, cfg, &comparator_losses, &points)? {
            Ok(result) => {
                eprintln!(
                    "regret: {:<10} η = {:<6} regret_T = {:.4e} ({:.1} s for {} step sizes)",
                    method.name(),
                    result.lr,
                    result.final_regret,
                    t0.elapsed().as_secs_f64(),
                    cfg.lrs.len()
                );
                methods.push(result);
            }
            Err(why) => {
                eprintln!("regret: {}: {why}", method.name());
                skipped.push((method.name(), why));
            }
        }
    }
    Ok(Report {
        cfg: cfg.clone(),
        truth_norm: stream.truth.norm_l2(),
        comparator,
        checkpoints: points,
        methods,
        skipped,
        interrupted,
    })
}

fn opt_json(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!(x))
}

impl Report {
    /// The method of lowest final regret.
    fn best(&self) -> Option<&MethodResult> {
        self.methods
            .iter()
            .min_by(|a, b| a.final_regret.total_cmp(&b.final_regret))
    }

    fn to_json(&self) -> Value {
        let c = &self.comparator;
        let methods: Vec<Value> = self
            .methods
            .iter()
            .map(|r| {
                json!({
                    "method": r.method.name(),
                    "lr": r.lr,
                    "final_regret": r.final_regret,
                    "final_regret_per_step": r.final_regret / self.cfg.steps as f64,
                    "loglog_slope_last_decade": opt_json(r.slope),
                    "projections": r.projections,
                    "projection_fraction": r.projections as f64 / self.cfg.steps as f64,
                    "trace_root_sum": r.trace_root_sum,
                    "trace_sum": r.trace_sum,
                    "theorem1": r.theorem1_rhs.map(|rhs| json!({
                        "rhs": rhs,
                        "held": r.theorem1_held(),
                    })),
                    "theorem2": r.theorem2.map(|t| json!({
                        "rho_root_sum": t.rho_root_sum,
                        "rhs": t.rhs,
                        "held": t.rho_root_sum <= t.rhs,
                    })),
                    "grid": r.grid.iter().map(|p| match &p.outcome {
                        Ok(v) => json!({"lr": p.lr, "final_regret": v}),
                        Err(e) => json!({"lr": p.lr, "final_regret": null, "error": e}),
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "config": self.cfg.to_json(),
            "comparator": {
                "total_loss": c.total_loss,
                "mean_loss": c.total_loss / self.cfg.steps as f64,
                "norm": c.weights.norm_l2(),
                "truth_norm": self.truth_norm,
                "on_boundary": c.multiplier > 0.0,
                "multiplier": c.multiplier,
                "kkt_residual_relative": c.kkt_residual,
                "kkt_tolerance": KKT_TOL,
                "newton_steps": c.newton_steps,
            },
            "methods": methods,
            "best_method": self.best().map(|r| r.method.name()),
            "skipped": self.skipped.iter().map(|(m, why)| json!({"method": m, "why": why}))
                .collect::<Vec<_>>(),
            "interrupted": self.interrupted,
            "notes": [
                "Regret_t is measured against W*_T, the best fixed decision for the whole \
                 horizon T, also at t < T (so it can be negative early on).",
                "The log-log plot leaves out t with regret <= 0.",
                "Projection onto K = {||W||_F <= R} is Euclidean; Theorem 1's analysis projects \
                 in the preconditioner's norm. 'projections' counts the steps at which it acted.",
                "Theorem 1 (block and shared runs) is proved for its own step size and projection: \
                 'held' at the chosen step size with a Euclidean projection is an observation. \
                 Theorem 2 holds for any gradient sequence.",
                "diagonal is the library's Adagrad, u = -g/(sqrt(v) + eps); block, shared and \
                 full add eps to the eigenvalues before the inverse square root.",
            ],
        })
    }

    fn print_table(&self) {
        let c = &self.comparator;
        println!(
            "regret ({:?}, b = {}, m = {}, T = {}, R = {}): comparator loss {:.6e} \
             (mean {:.4e}), ‖W*‖ = {:.4}{}, relative KKT residual {:.2e}",
            self.cfg.problem,
            self.cfg.features,
            self.cfg.outputs,
            self.cfg.steps,
            self.cfg.radius,
            c.total_loss,
            c.total_loss / self.cfg.steps as f64,
            c.weights.norm_l2(),
            if c.multiplier > 0.0 {
                " (on the boundary)"
            } else {
                ""
            },
            c.kkt_residual
        );
        println!(
            "{:<11} {:>6} {:>12} {:>10} {:>6} {:>6} {:>12} {:>5} {:>11} {:>11} {:>5}",
            "method",
            "η",
            "regret_T",
            "regret/T",
            "slope",
            "proj",
            "Thm1 RHS",
            "held",
            "Σ√ρ",
            "Thm2 RHS",
            "held"
        );
        let yes_no = |v: Option<bool>| match v {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let num = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.4e}"));
        for r in &self.methods {
            println!(
                "{:<11} {:>6} {:>12.4e} {:>10.3e} {:>6} {:>6} {:>12} {:>5} {:>11} {:>11} {:>5}",
                r.method.name(),
                r.lr,
                r.final_regret,
                r.final_regret / self.cfg.steps as f64,
                r.slope
                    .map_or_else(|| "-".to_string(), |s| format!("{s:.3}")),
                r.projections,
                num(r.theorem1_rhs),
                yes_no(r.theorem1_held()),
                num(r.theorem2.map(|t| t.rho_root_sum)),
                num(r.theorem2.map(|t| t.rhs)),
                yes_no(r.theorem2_held()),
            );
        }
        for (m, why) in &self.skipped {
            println!("{m}: skipped ({why})");
        }
        println!(
            "slope: log-log slope of regret over the last decade of rounds; proj: steps at which \
             the projection onto K acted; regret is vs W*_T at every t; points with regret <= 0 \
             are not drawn on the log plot."
        );
        if self.interrupted {
            println!("interrupted: only the methods above were run");
        }
    }

    fn write(&self, out: &Path) -> Result<(), AnalyzeError> {
        create_dir(out)?;
        let rows: Vec<Vec<String>> = self
            .methods
            .iter()
            .flat_map(|r| {
                r.curve
                    .iter()
                    .map(move |&(t, v)| vec![r.method.name(), t.to_string(), format!("{v:e}")])
            })
            .collect();
        write_csv(&out.join("regret.csv"), &["method", "t", "regret"], &rows)?;
        write_json(&out.join("regret.json"), &self.to_json())?;
        let mut series: Vec<Series> = self
            .methods
            .iter()
            .map(|r| {
                let pts = r.curve.iter().map(|&(t, v)| (t as f64, v)).collect();
                Series::new(format!("{} (η = {})", r.method.name(), r.lr), pts)
            })
            .collect();
        // √T through the best method's first plotted (positive) value.
        if let Some(best) = self.best() {
            if let Some(&(t0, r0)) = best.curve.iter().find(|&&(_, v)| v > 0.0) {
                let c = r0 / (t0 as f64).sqrt();
                let pts = self
                    .checkpoints
                    .iter()
                    .filter(|&&t| t >= t0)
                    .map(|&t| (t as f64, c * (t as f64).sqrt()))
                    .collect();
                series.push(Series::reference("√T", pts));
            }
        }
        let title = format!(
            "Regret vs W*_T, {} (b = {}, m = {})",
            match self.cfg.problem {
                ProblemKind::Logistic => "online logistic regression",
                ProblemKind::LeastSquares => "online least squares",
            },
            self.cfg.features,
            self.cfg.outputs
        );
        plot::lines(
            &out.join("regret"),
            &LinePlot {
                title: &title,
                x_desc: "round t",
                y_desc: "regret (points <= 0 not drawn)",
                log_x: true,
                log_y: true,
                series: &series,
            },
        )
    }
}

/// Runs `precond analyze regret`.
pub fn run(args: &RegretArgs, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    let cfg = Config::from_args(args)?;
    create_dir(&args.out)?;
    let report = experiment(&cfg, stop)?;
    report.write(&args.out)?;
    report.print_table();
    println!(
        "wrote regret.csv, regret.json, regret.png, regret.svg to {}",
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: &Path) -> RegretArgs {
        RegretArgs {
            out: out.to_path_buf(),
            quick: true,
            problem: ProblemKind::Logistic,
            features: None,
            outputs: None,
            steps: None,
            lrs: None,
            ranks: None,
            radius: 10.0,
            full_max: 400,
            eps: 1e-6,
            condition: 30.0,
            feature_scale: 3.0,
            noise: 0.5,
            rho_power_iters: None,
            seed: 0,
        }
    }

    fn config(problem: ProblemKind, b: usize, m: usize, steps: usize) -> Config {
        let mut a = args(Path::new("unused"));
        a.problem = problem;
        a.features = Some(b);
        a.outputs = Some(m);
        a.steps = Some(steps);
        Config::from_args(&a).unwrap()
    }

    #[test]
    fn comparator_recovers_the_least_squares_truth_and_is_optimal_for_logistic() {
        // Noise 0 and ‖W*‖ = R/2: the minimizer over K is W* itself, with loss 0.
        let mut cfg = config(ProblemKind::LeastSquares, 6, 3, 300);
        cfg.noise = 0.0;
        let stream = Stream::generate(&cfg);
        let truth = stream.truth.clone();
        let c = solve_comparator(&stream, cfg.steps, cfg.radius).unwrap();
        let err = (&c.weights - &truth).norm_l2() / truth.norm_l2();
        assert!(err < 1e-8, "‖W − W*‖/‖W*‖ = {err:e}");
        assert!(c.total_loss.abs() < 1e-12, "loss {}", c.total_loss);
        assert!(c.kkt_residual <= KKT_TOL, "{}", c.kkt_residual);
        assert_eq!(c.multiplier, 0.0);

        // Logistic (‖W°‖ = 5, ‖W*‖ ≈ 5.5), with K large and with K small enough to bind: the KKT residual
        // is below tolerance and no random feasible perturbation lowers the total loss.
        let cfg = config(ProblemKind::Logistic, 8, 4, 1000);
        let stream = Stream::generate(&cfg);
        for radius in [10.0, 1.0] {
            let c = solve_comparator(&stream, cfg.steps, radius).unwrap();
            assert!(
                c.kkt_residual <= KKT_TOL,
                "R = {radius}: {}",
                c.kkt_residual
            );
            assert!(c.weights.norm_l2() <= radius * (1.0 + 1e-12));
            if radius == 1.0 {
                assert!(c.multiplier > 0.0, "R = 1 should bind");
            } else {
                assert_eq!(c.multiplier, 0.0, "R = 10 should not bind");
            }
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            for scale in [1e-4, 1e-3, 1e-2, 1e-1, 1.0] {
                for _ in 0..10 {
                    let mut w =
                        Mat::from_fn(8, 4, |i, j| c.weights[(i, j)] + scale * gaussian(&mut rng));
                    let norm = w.norm_l2();
                    if norm > radius {
                        w = Mat::from_fn(8, 4, |i, j| w[(i, j)] * radius / norm);
                    }
                    let (f, _, _) = stream.totals(cfg.steps, w.as_ref());
                    assert!(
                        f >= c.total_loss - 1e-10 * (1.0 + c.total_loss.abs()),
                        "R = {radius}, scale {scale}: {f} < {}",
                        c.total_loss
                    );
                }
            }
        }
    }

    #[test]
    fn full_rank_shared_basis_has_the_iterates_of_exact_block_adagrad() {
        // ε = 1e-3 as in the library's own full-rank test: while H_i is still rank-deficient,
        // ε^{−1/2} amplifies the round-off of B R_i Bᵀ + ρ_i I in its null space (ε = 1e-6 gives
        // gaps of ~2e-8).
        let mut cfg = config(ProblemKind::Logistic, 6, 4, 300);
        cfg.eps = 1e-3;
        let stream = Stream::generate(&cfg);
        for lr in [0.3, 3.0] {
            let shared = run_online(&stream, Method::Shared(6), lr, &cfg, true).unwrap();
            let block = run_online(&stream, Method::Block, lr, &cfg, true).unwrap();
            let mut worst = 0.0f64;
            for (a, b) in shared.iterates.iter().zip(&block.iterates) {
                let scale = b.norm_l2().max(1e-12);
                worst = worst.max((a - b).norm_l2() / scale);
            }
            eprintln!("η = {lr}: max relative iterate gap {worst:e}");
            assert_eq!(shared.iterates.len(), 300);
            assert!(worst < 1e-8, "η = {lr}: max relative iterate gap {worst:e}");
            // The run moved, and the projection acted the same number of times.
            assert!(block.iterates[299].norm_l2() > 0.1);
            assert_eq!(shared.projections, block.projections);
        }
    }

    #[test]
    fn block_adagrad_regret_is_sublinear_and_a_frozen_learner_is_linear() {
        let t_max = 4096;
        let cfg = config(ProblemKind::LeastSquares, 8, 4, t_max);
        let stream = Stream::generate(&cfg);
        let c = solve_comparator(&stream, t_max, cfg.radius).unwrap();
        let comp = stream.losses(c.weights.as_ref());
        let points = [t_max / 16, t_max];
        let slope = |lr: f64| {
            let run = run_online(&stream, Method::Block, lr, &cfg, false).unwrap();
            let curve = regret_curve(&run.losses, &comp, &points);
            let (r0, r1) = (curve[0].1, curve[1].1);
            assert!(r0 > 0.0 && r1 > 0.0, "η = {lr}: regret {r0}, {r1}");
            (r1 / r0).ln() / 16f64.ln()
        };
        let learning = slope(1.0);
        let frozen = slope(0.0);
        eprintln!("log-log slope from T/16 to T: block Adagrad {learning:.3}, η = 0 {frozen:.3}");
        assert!(learning < 0.8, "block Adagrad log-log slope {learning}");
        assert!(frozen > 0.95, "η = 0 log-log slope {frozen}");
    }

    #[test]
    fn theorem_2_holds_for_every_shared_basis_run_of_the_quick_config() {
        let cfg = Config::from_args(&args(Path::new("unused"))).unwrap();
        let report = experiment(&cfg, &AtomicBool::new(false)).unwrap();
        let shared: Vec<&MethodResult> = report
            .methods
            .iter()
            .filter(|r| matches!(r.method, Method::Shared(_)))
            .collect();
        assert_eq!(shared.len(), 4);
        for r in shared {
            let t = r.theorem2.unwrap();
            assert!(t.rho_root_sum <= t.rhs, "{}: {t:?}", r.method.name());
            assert!(t.rhs > 0.0);
            if r.method != Method::Shared(cfg.features) {
                // Below full rank the shrink removes mass: ρ > 0.
                assert!(t.rho_root_sum > 0.0, "{}: {t:?}", r.method.name());
            }
        }
    }

    #[test]
    fn quick_run_writes_every_output() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("regret");
        run(&args(&out), &AtomicBool::new(false)).unwrap();
        for f in ["regret.csv", "regret.json", "regret.png", "regret.svg"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let csv = std::fs::read_to_string(out.join("regret.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("method,t,regret"));
        let mut names: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
        names.dedup();
        assert_eq!(
            names,
            [
                "diagonal",
                "block",
                "shared-k1",
                "shared-k2",
                "shared-k4",
                "shared-k8",
                "full"
            ]
        );
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("regret.json")).unwrap())
                .unwrap();
        assert_eq!(json["methods"].as_array().unwrap().len(), 7);
        assert!(
            json["comparator"]["kkt_residual_relative"]
                .as_f64()
                .unwrap()
                <= KKT_TOL
        );
        let svg = std::fs::read_to_string(out.join("regret.svg")).unwrap();
        assert!(svg.contains("√T"));
    }

    #[test]
    fn bad_input_is_refused() {
        let base = args(Path::new("unused"));
        let bad = [
            RegretArgs {
                features: Some(0),
                ..base.clone()
            },
            RegretArgs {
                outputs: Some(0),
                ..base.clone()
            },
            RegretArgs {
                steps: Some(0),
                ..base.clone()
            },
            RegretArgs {
                ranks: Some(vec![1, 9]),
                ..base.clone()
            },
            RegretArgs {
                ranks: Some(vec![0]),
                ..base.clone()
            },
            RegretArgs {
                lrs: Some(vec![]),
                ..base.clone()
            },
            RegretArgs {
                lrs: Some(vec![f64::NAN]),
                ..base.clone()
            },
            RegretArgs {
                radius: 0.0,
                ..base.clone()
            },
            RegretArgs {
                radius: -1.0,
                ..base.clone()
            },
            RegretArgs {
                eps: 0.0,
                ..base.clone()
            },
            RegretArgs {
                feature_scale: 0.0,
                ..base.clone()
            },
            RegretArgs {
                condition: 0.5,
                ..base.clone()
            },
            RegretArgs {
                outputs: Some(1),
                ..base.clone()
            },
            RegretArgs {
                rho_power_iters: Some(0),
                ..base.clone()
            },
        ];
        for a in &bad {
            assert!(
                matches!(Config::from_args(a), Err(AnalyzeError::Invalid(_))),
                "{a:?}"
            );
        }
        // Default ranks are capped at b; a least-squares problem may have one output.
        let cfg = Config::from_args(&RegretArgs {
            features: Some(3),
            problem: ProblemKind::LeastSquares,
            outputs: Some(1),
            ..base
        })
        .unwrap();
        assert_eq!(cfg.ranks, [1, 2]);
    }

    #[test]
    fn checkpoints_are_log_spaced_and_regret_accumulates() {
        let pts = checkpoints(1000, 60);
        assert_eq!(pts[0], 1);
        assert_eq!(*pts.last().unwrap(), 1000);
        assert!(pts.windows(2).all(|w| w[0] < w[1]));
        let curve = regret_curve(&[3.0, 2.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 2.0], &[1, 2, 4]);
        assert_eq!(curve, [(1, 2.0), (2, 3.0), (4, 2.0)]);
        let line: Vec<(usize, f64)> = (1..100).map(|t| (t, 3.0 * (t as f64).sqrt())).collect();
        assert!((loglog_slope(&line, 10).unwrap() - 0.5).abs() < 1e-12);
    }
}
