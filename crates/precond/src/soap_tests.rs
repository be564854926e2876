//! Tests of [`super::Soap`] against an independent f64 transcription of the reference
//! `soap.py` (plain nested vectors, Jacobi eigenvectors, Gram–Schmidt QR; nothing of soap.rs
//! or faer), against the library's diagonal Adam, and of its failure policy.

// The transcription indexes rows, columns and steps explicitly, as the formulas do.
#![allow(clippy::needless_range_loop)]

use super::*;
use crate::diagonal::{Diagonal, DiagonalConfig, DiagonalKind};
use crate::graft::{GraftConfig, GraftKind};
use crate::linalg::{inject_failures, inject_failures_after, injected_remaining, FaultKind};
use crate::momentum::MomentumConfig;
use crate::optimizer::{Method, OptimizerConfig, ParamOptimizer};
use crate::testing::{gradients, jacobi_eig, on_one_thread, to_f64};
use crate::weight_decay::{WeightDecayConfig, WeightDecayMode};

/// Row-major dense matrix of the transcription.
type Dense = Vec<Vec<f64>>;

fn zeros(r: usize, c: usize) -> Dense {
    vec![vec![0.0; c]; r]
}

fn product(a: &Dense, b: &Dense) -> Dense {
    let (n, k, m) = (a.len(), b.len(), b[0].len());
    let mut out = zeros(n, m);
    for i in 0..n {
        for j in 0..m {
            let mut s = 0.0;
            for l in 0..k {
                s += a[i][l] * b[l][j];
            }
            out[i][j] = s;
        }
    }
    out
}

fn transposed(a: &Dense) -> Dense {
    let mut out = zeros(a[0].len(), a.len());
    for i in 0..a.len() {
        for j in 0..a[0].len() {
            out[j][i] = a[i][j];
        }
    }
    out
}

fn dense(a: &Mat<f64>) -> Dense {
    (0..a.nrows())
        .map(|i| (0..a.ncols()).map(|j| a[(i, j)]).collect())
        .collect()
}

/// Orthonormal columns of the square `a` by modified Gram–Schmidt (torch's QR up to the signs
/// of the columns, which SOAP's directions do not depend on).
fn gram_schmidt(a: &Dense) -> Dense {
    let n = a.len();
    let mut q = a.clone();
    for j in 0..n {
        for p in 0..j {
            let dot: f64 = (0..n).map(|i| q[i][p] * q[i][j]).sum();
            for i in 0..n {
                q[i][j] -= dot * q[i][p];
            }
        }
        let norm: f64 = (0..n).map(|i| q[i][j] * q[i][j]).sum::<f64>().sqrt();
        for i in 0..n {
            q[i][j] /= norm;
        }
    }
    q
}

/// Eigenvectors by decreasing eigenvalue (torch.linalg.eigh, then flip), by Jacobi rotations.
fn eigenvectors_descending(a: &Dense) -> Dense {
    let n = a.len();
    let (_, vectors) = jacobi_eig(&Mat::from_fn(n, n, |i, j| a[i][j]));
    dense(&vectors)
}

/// The reference `soap.py` (the single-file `SOAP` class) for one 2-D parameter, in f64, as its
/// code reads: `exp_avg` in the rotated space, moved back to the original space and into the
/// (possibly new) bases inside every `update_preconditioner` call. `failures` lists
/// (step, side) pairs (side 0 = left) whose factorization is made to fail, per the library's
/// documented policy: a side keeps its basis and v is not permuted along it; a side without a
/// basis stays the identity until a later refresh step computes it by eigendecomposition.
struct Transcription {
    config: SoapConfig,
    /// Statistics L, R of the preconditioned sides.
    stats: [Option<Dense>; 2],
    /// Bases Q_L, Q_R once computed.
    bases: [Option<Dense>; 2],
    exp_avg: Dense,
    exp_avg_sq: Dense,
    /// The reference's state["step"].
    step: u64,
    calls: u64,
}

impl Transcription {
    fn new(config: &SoapConfig, b: usize, m: usize, sides: [bool; 2]) -> Self {
        let dims = [b, m];
        Self {
            config: config.clone(),
            stats: [0, 1].map(|k| sides[k].then(|| zeros(dims[k], dims[k]))),
            bases: [None, None],
            exp_avg: zeros(b, m),
            exp_avg_sq: zeros(b, m),
            step: 0,
            calls: 0,
        }
    }

    /// Q_Lᵀ x Q_R (or Q_L x Q_Rᵀ when `back`), identity for a side without a basis.
    fn project(&self, x: &Dense, back: bool) -> Dense {
        let mut out = x.clone();
        if let Some(q) = &self.bases[0] {
            out = if back {
                product(q, &out)
            } else {
                product(&transposed(q), &out)
            };
        }
        if let Some(q) = &self.bases[1] {
            out = if back {
                product(&out, &transposed(q))
            } else {
                product(&out, q)
            };
        }
        out
    }

    fn fails(&self, failures: &[(u64, usize)], side: usize) -> bool {
        failures.contains(&(self.calls, side))
    }

    fn update_preconditioner(&mut self, g: &Dense, failures: &[(u64, usize)]) {
        let first = self.bases.iter().all(Option::is_none) && self.step == 0;
        if !first {
            self.exp_avg = self.project(&self.exp_avg, true);
        }
        let c = &self.config;
        let beta = if c.shampoo_beta >= 0.0 {
            c.shampoo_beta
        } else {
            c.beta2
        };
        let outer = [product(g, &transposed(g)), product(&transposed(g), g)];
        for k in 0..2 {
            if let Some(stat) = &mut self.stats[k] {
                for i in 0..stat.len() {
                    for j in 0..stat.len() {
                        // torch's lerp_(outer, 1 − β).
                        stat[i][j] += (1.0 - beta) * (outer[k][i][j] - stat[i][j]);
                    }
                }
            }
        }
        if first {
            for k in 0..2 {
                if let Some(stat) = &self.stats[k] {
                    if !self.fails(failures, k) {
                        self.bases[k] = Some(eigenvectors_descending(stat));
                    }
                }
            }
        }
        if self.step > 0 && self.step % self.config.precondition_frequency == 0 {
            for k in 0..2 {
                let Some(stat) = self.stats[k].clone() else {
                    continue;
                };
                if self.fails(failures, k) {
                    continue;
                }
                let Some(q) = self.bases[k].clone() else {
                    self.bases[k] = Some(eigenvectors_descending(&stat));
                    continue;
                };
                let n = q.len();
                let lq = product(&stat, &q);
                let qtlq = product(&transposed(&q), &lq);
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&a, &b| qtlq[b][b].partial_cmp(&qtlq[a][a]).unwrap());
                let v = self.exp_avg_sq.clone();
                for i in 0..v.len() {
                    for j in 0..v[0].len() {
                        self.exp_avg_sq[i][j] = if k == 0 { v[idx[i]][j] } else { v[i][idx[j]] };
                    }
                }
                let sorted: Dense = (0..n)
                    .map(|i| (0..n).map(|j| q[i][idx[j]]).collect())
                    .collect();
                self.bases[k] = Some(gram_schmidt(&product(&stat, &sorted)));
            }
        }
        if self.step > 0 {
            self.exp_avg = self.project(&self.exp_avg, false);
        }
    }

    /// One call of the reference's `step` for this parameter: the update it makes, divided by
    /// lr (weight decay left out), i.e. the library's direction.
    fn step(&mut self, g: &Dense, failures: &[(u64, usize)]) -> Dense {
        self.calls += 1;
        let (b, m) = (g.len(), g[0].len());
        if self.calls == 1 {
            self.update_preconditioner(g, failures);
            return zeros(b, m);
        }
        let c = self.config.clone();
        let projected = self.project(g, false);
        self.step += 1;
        let mut normalized = zeros(b, m);
        for i in 0..b {
            for j in 0..m {
                let x = projected[i][j];
                self.exp_avg[i][j] = c.beta1 * self.exp_avg[i][j] + (1.0 - c.beta1) * x;
                self.exp_avg_sq[i][j] = c.beta2 * self.exp_avg_sq[i][j] + (1.0 - c.beta2) * x * x;
                normalized[i][j] = self.exp_avg[i][j] / (self.exp_avg_sq[i][j].sqrt() + c.eps);
            }
        }
        let s = self.step as i32;
        let step_size = (1.0 - c.beta2.powi(s)).sqrt() / (1.0 - c.beta1.powi(s));
        let mut u = self.project(&normalized, true);
        for row in &mut u {
            for x in row.iter_mut() {
                *x *= -step_size;
            }
        }
        self.update_preconditioner(g, failures);
        u
    }
}

/// max |a − b| / max |b|.
fn rel_err(a: &Mat<f64>, b: &Dense) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            num = num.max((a[(i, j)] - b[i][j]).abs());
            den = den.max(b[i][j].abs());
        }
    }
    num / den
}

fn run<T: Scalar>(state: &mut Soap<T>, grads: &[Mat<T>]) -> Vec<Mat<f64>> {
    grads
        .iter()
        .map(|g| {
            let mut u = Mat::<T>::zeros(g.nrows(), g.ncols());
            state.precondition(g.as_ref(), u.as_mut()).unwrap();
            to_f64(u.as_ref())
        })
        .collect()
}

/// Worst relative difference of the library's directions from the transcription's over the
/// stream (the first direction must be exactly zero in both).
fn against_transcription<T: Scalar>(
    config: &SoapConfig,
    grads: &[Mat<T>],
    failures: &[(u64, usize)],
    inject: impl Fn(u64),
) -> f64 {
    let (b, m) = (grads[0].nrows(), grads[0].ncols());
    let mut state = Soap::<T>::new(config, b, m).unwrap();
    let limit = config.max_precond_dim;
    let mut reference = Transcription::new(config, b, m, [b <= limit, m <= limit]);
    let mut worst = 0f64;
    for (s, g) in grads.iter().enumerate() {
        let t = s as u64 + 1;
        inject(t);
        let got = run(&mut state, std::slice::from_ref(g)).remove(0);
        let want = reference.step(&dense(&to_f64(g.as_ref())), failures);
        if t == 1 {
            assert!(got.col_iter().all(|c| c.iter().all(|&v| v == 0.0)));
            continue;
        }
        let err = rel_err(&got, &want);
        assert!(err.is_finite(), "step {t}");
        worst = worst.max(err);
    }
    worst
}

fn config(freq: u64, max_dim: usize) -> SoapConfig {
    SoapConfig {
        beta1: 0.9,
        beta2: 0.95,
        shampoo_beta: 0.8,
        eps: 1e-8,
        precondition_frequency: freq,
        max_precond_dim: max_dim,
    }
}

/// 24 steps, bases refreshed every 3 (7 QR power iterations), against the transcription:
/// both sides (5 × 5), the left side only (4 × 6, m above max_precond_dim), the right side only
/// (6 × 4, b above it), and the default betas (`shampoo_beta` −1 = β2). (Square or one-sided
/// so that every first statistic has full rank: the eigenbasis of a rank-deficient first
/// statistic is not unique, and neither would the directions be.)
#[test]
fn matches_f64_transcription_of_the_reference() {
    let cases = [
        (5, 5, config(3, 100), 1),
        (4, 6, config(3, 5), 2),
        (6, 4, config(3, 5), 3),
        (
            5,
            5,
            SoapConfig {
                precondition_frequency: 4,
                ..SoapConfig::default()
            },
            4,
        ),
    ];
    for (b, m, config, seed) in cases {
        let grads = gradients::<f64>(b, m, 24, 0.5, seed);
        let err = against_transcription(&config, &grads, &[], |_| {});
        let every = config.precondition_frequency;
        println!("soap vs transcription ({b}x{m}, every {every}): f64 max rel err {err:.3e}");
        assert!(err <= 1e-6, "({b}, {m}): {err:e}");
        // Not vacuous: without the rotation (Adam) the directions differ.
        let adam = against_transcription(
            &SoapConfig {
                max_precond_dim: 0,
                ..config.clone()
            },
            &grads,
            &[],
            |_| {},
        );
        assert!(adam <= 1e-6);
        let mut identity = Transcription::new(&config, b, m, [false, false]);
        let mut state = Soap::<f64>::new(&config, b, m).unwrap();
        let got = run(&mut state, &grads);
        let far = got
            .iter()
            .zip(&grads)
            .map(|(u, g)| rel_err(u, &identity.step(&dense(g), &[])))
            .skip(1)
            .fold(0f64, f64::max);
        assert!(far > 1e-2, "({b}, {m}): SOAP equals Adam ({far:e})");
    }
}

/// With both sides the identity (max_precond_dim below both) SOAP at step t + 1 is the library's
/// diagonal Adam at step t on the same gradients (SOAP's first step only gathers statistics).
/// ε is tiny so that SOAP's bias correction, which leaves ε uncorrected, does not show.
#[test]
fn identity_basis_equals_diagonal_adam() {
    fn case<T: Scalar>() -> f64 {
        let (b, m) = (6, 5);
        let soap = SoapConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-12,
            max_precond_dim: 4,
            ..SoapConfig::default()
        };
        let adam = DiagonalConfig {
            kind: DiagonalKind::Adam,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-12,
            ..DiagonalConfig::default()
        };
        let grads = gradients::<T>(b, m, 25, 1.0, 7);
        let mut state = Soap::<T>::new(&soap, b, m).unwrap();
        assert_eq!(state.preconditioned_sides(), (false, false));
        let mut diagonal = Diagonal::<T>::new(adam, b, m).unwrap();
        let got = run(&mut state, &grads);
        assert!(got[0].col_iter().all(|c| c.iter().all(|&v| v == 0.0)));
        let mut worst = 0f64;
        for (u, g) in got[1..].iter().zip(&grads[1..]) {
            let mut w = Mat::<T>::zeros(b, m);
            diagonal.precondition(g.as_ref(), w.as_mut()).unwrap();
            worst = worst.max(rel_err(u, &dense(&to_f64(w.as_ref()))));
        }
        worst
    }
    let (e64, e32) = (case::<f64>(), case::<f32>());
    println!("soap with identity bases vs diagonal Adam: f64 {e64:.3e}, f32 {e32:.3e}");
    assert!(e64 <= 1e-6, "{e64:e}");
    assert!(e32 <= 1e-5, "{e32:e}");
}

/// Through [`ParamOptimizer`]: a 1-D parameter under `Method::Soap` is Adam (unrotated SOAP),
/// a 2-D one is preconditioned whatever `max_block_size` says; with grafting `None` and no
/// momentum the state is SOAP's alone, and AdamW's decoupled decay applies.
#[test]
fn param_optimizer_runs_soap_on_vectors_and_matrices() {
    let cfg = OptimizerConfig {
        method: Method::Soap(SoapConfig {
            eps: 1e-12,
            ..SoapConfig::default()
        }),
        graft: GraftConfig {
            kind: GraftKind::None,
            ..GraftConfig::default()
        },
        momentum: MomentumConfig {
            beta1: 0.0,
            nesterov: false,
        },
        weight_decay: WeightDecayConfig {
            rate: 0.01,
            mode: WeightDecayMode::Decoupled,
        },
        max_block_size: 2,
        ..OptimizerConfig::default()
    };
    let vector = ParamOptimizer::new(&cfg, &[7], None, false).unwrap();
    assert!(vector.is_preconditioned());
    assert_eq!(vector.state_bytes(), 2 * 7 * 4);
    let matrix = ParamOptimizer::new(&cfg, &[6, 5], None, false).unwrap();
    assert!(matrix.is_preconditioned());
    assert_eq!(matrix.state_bytes(), (2 * 36 + 2 * 25 + 2 * 30) * 4);

    // The vector against AdamW (Diagonal Adam + the same decoupled decay) shifted by one step.
    let adam_cfg = OptimizerConfig {
        method: Method::Diagonal(DiagonalConfig {
            kind: DiagonalKind::Adam,
            beta1: 0.95,
            beta2: 0.95,
            eps: 1e-12,
            ..DiagonalConfig::default()
        }),
        ..cfg.clone()
    };
    let mut soap = vector;
    let mut adam = ParamOptimizer::new(&adam_cfg, &[7], None, false).unwrap();
    let grads = crate::graft::tests::grads(7, 12, 3);
    let mut p: Vec<f32> = (0..7).map(|i| (i as f32 * 0.3).sin()).collect();
    soap.step(&mut p, &grads[0], 0.01).unwrap();
    // Step 1: zero direction, decoupled decay only.
    let decayed: Vec<f32> = (0..7)
        .map(|i| (i as f32 * 0.3).sin() * (1.0 - 0.01 * 0.01))
        .collect();
    for (a, b) in p.iter().zip(&decayed) {
        assert!((a - b).abs() <= 1e-7, "{a} {b}");
    }
    let mut q = p.clone();
    for g in &grads[1..] {
        soap.step(&mut p, g, 0.01).unwrap();
        adam.step(&mut q, g, 0.01).unwrap();
        for (a, b) in p.iter().zip(&q) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} {b}");
        }
    }
}

#[test]
fn state_bytes_count_statistics_bases_and_moments() {
    let (b, m) = (1000, 784);
    let full = Soap::<f32>::new(&SoapConfig::default(), b, m).unwrap();
    assert_eq!(full.preconditioned_sides(), (true, true));
    assert_eq!(full.state_bytes(), (2 * b * b + 2 * m * m + 2 * b * m) * 4);
    assert_eq!(full.state_bytes(), 19_189_248);
    let left_skipped = SoapConfig {
        max_precond_dim: 800,
        ..SoapConfig::default()
    };
    let one = Soap::<f64>::new(&left_skipped, b, m).unwrap();
    assert_eq!(one.preconditioned_sides(), (false, true));
    assert_eq!(one.state_bytes(), (2 * m * m + 2 * b * m) * 8);
    let adam = Soap::<f32>::unrotated(&SoapConfig::default(), 1, 30).unwrap();
    assert_eq!(adam.state_bytes(), 2 * 30 * 4);
}

#[test]
fn config_validation_and_errors_leave_state_unchanged() {
    let ok = SoapConfig::default();
    assert!(ok.validate().is_ok());
    assert_eq!(ok.statistics_beta(), 0.95);
    let bad = [
        SoapConfig {
            beta1: 1.0,
            ..ok.clone()
        },
        SoapConfig {
            beta2: -0.1,
            ..ok.clone()
        },
        SoapConfig {
            beta2: 1.0,
            ..ok.clone()
        },
        SoapConfig {
            shampoo_beta: 1.0,
            ..ok.clone()
        },
        SoapConfig {
            shampoo_beta: f64::NAN,
            ..ok.clone()
        },
        SoapConfig {
            eps: 0.0,
            ..ok.clone()
        },
        SoapConfig {
            eps: f64::NAN,
            ..ok.clone()
        },
        SoapConfig {
            precondition_frequency: 0,
            ..ok.clone()
        },
    ];
    for config in &bad {
        assert!(
            matches!(config.validate(), Err(PrecondError::InvalidConfig { .. })),
            "{config:?}"
        );
        assert!(Soap::<f32>::new(config, 2, 2).is_err());
    }
    assert!(Soap::<f32>::new(
        &SoapConfig {
            eps: 1e-50,
            ..ok.clone()
        },
        2,
        2
    )
    .is_err());
    assert!(matches!(
        Soap::<f32>::new(&ok, 0, 2),
        Err(PrecondError::ShapeMismatch { .. })
    ));
    let partial: SoapConfig = serde_json::from_str(r#"{"beta1": 0.9}"#).unwrap();
    assert_eq!(
        partial,
        SoapConfig {
            beta1: 0.9,
            ..ok.clone()
        }
    );

    let grads = gradients::<f64>(4, 3, 2, 0.0, 8);
    let mut state = Soap::<f64>::new(&ok, 4, 3).unwrap();
    run(&mut state, &grads[..1]);
    let before = serde_json::to_string(&state).unwrap();
    let mut u = Mat::<f64>::zeros(4, 3);
    let wrong = Mat::<f64>::zeros(3, 4);
    assert!(matches!(
        state.precondition(wrong.as_ref(), u.as_mut()),
        Err(PrecondError::ShapeMismatch { .. })
    ));
    let mut nan = grads[1].clone();
    nan[(2, 1)] = f64::NAN;
    assert_eq!(
        state.precondition(nan.as_ref(), u.as_mut()),
        Err(PrecondError::NonFiniteGradient {
            step: 2,
            param: None
        })
    );
    assert_eq!(state.steps(), 1);
    assert_eq!(serde_json::to_string(&state).unwrap(), before);

    // A state whose shape disagrees with its buffers is refused, not indexed out of bounds.
    let mut value = serde_json::to_value(&state).unwrap();
    value["rows"] = serde_json::json!(5);
    let mut broken: Soap<f64> = serde_json::from_value(value).unwrap();
    let g = Mat::<f64>::zeros(5, 3);
    let mut u = Mat::<f64>::zeros(5, 3);
    let err = broken.precondition(g.as_ref(), u.as_mut()).unwrap_err();
    assert!(matches!(err, PrecondError::StateMismatch(_)), "{err:?}");
}

/// Saved after 5 steps (past one refresh), restored and continued next to the original and a
/// clone: every direction bitwise equal (the workspace's serde_json keeps floats exactly).
#[test]
fn serde_round_trip_continues_bitwise() {
    fn case<T: Scalar>() {
        let grads = gradients::<T>(5, 4, 12, 0.5, 9);
        let mut state = Soap::<T>::new(&config(2, 100), 5, 4).unwrap();
        run(&mut state, &grads[..5]);
        let json = serde_json::to_string(&state).unwrap();
        let mut restored: Soap<T> = serde_json::from_str(&json).unwrap();
        let mut cloned = state.clone();
        assert_eq!(restored.steps(), 5);
        let a = run(&mut state, &grads[5..]);
        let b = run(&mut restored, &grads[5..]);
        let c = run(&mut cloned, &grads[5..]);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            serde_json::to_string(&restored).unwrap()
        );
    }
    case::<f32>();
    case::<f64>();
}

/// The failure policy (as Shampoo's), by injected failures in both precisions:
/// * the first eigendecomposition of the left side fails at step 1: that side is the identity,
///   the failure is counted (one step, one basis), and the next refresh computes it by
///   eigendecomposition, which resets the run;
/// * both QR refreshes of a later refresh step fail: both bases are kept bitwise, v is not
///   permuted, the step is counted; the following steps match the transcription run under
///   the same policy to 1e-6.
#[test]
fn failed_bases_keep_the_previous_basis() {
    on_one_thread(|| {
        let (b, m) = (5, 5);
        let config = config(3, 100);
        let grads = gradients::<f64>(b, m, 16, 0.5, 10);
        // Step 1: the left eigendecomposition (the first factorization call) fails; steps 4
        // (first refresh: left eigendecomposition, right QR) succeed; step 7 (second refresh):
        // both QRs fail.
        let failures = [(1, 0), (7, 0), (7, 1)];
        let inject = |t: u64| match t {
            1 => inject_failures(FaultKind::Both, 1),
            7 => inject_failures(FaultKind::Both, 2),
            _ => inject_failures(FaultKind::Both, 0),
        };
        let err = against_transcription(&config, &grads, &failures, inject);
        println!("soap with failed bases vs transcription: f64 max rel err {err:.3e}");
        assert!(err <= 1e-6, "{err:e}");
        // Not vacuous: the same stream without failures gives other directions.
        let clean = against_transcription(&config, &grads, &failures, |_| {
            inject_failures(FaultKind::Both, 0)
        });
        assert!(clean > 1e-3, "{clean:e}");

        // The counts and the kept bases, step by step.
        let mut state = Soap::<f64>::new(&config, b, m).unwrap();
        inject_failures(FaultKind::Both, 1);
        run(&mut state, &grads[..1]);
        assert_eq!(injected_remaining(), 0);
        assert!(state.left_basis().is_none());
        assert!(state.right_basis().is_some());
        assert_eq!(state.failed_bases(), 1);
        let health = state.linalg_health();
        assert_eq!((health.failures, health.consecutive), (1, 1));
        assert_eq!(health.last_kernel, Some("SOAP eigenbasis"));
        run(&mut state, &grads[1..4]);
        assert!(state.left_basis().is_some());
        assert_eq!(state.linalg_health().consecutive, 0);
        run(&mut state, &grads[4..6]);
        let kept = (
            state.left_basis().unwrap().to_owned(),
            state.right_basis().unwrap().to_owned(),
        );
        inject_failures(FaultKind::Both, 2);
        run(&mut state, &grads[6..7]);
        assert_eq!(injected_remaining(), 0);
        assert_eq!(state.left_basis().unwrap().to_owned(), kept.0);
        assert_eq!(state.right_basis().unwrap().to_owned(), kept.1);
        assert_eq!(state.failed_bases(), 3);
        let health = state.linalg_health();
        assert_eq!((health.failures, health.consecutive), (2, 1));
        // Steps without factorizations leave the run alone; the next refresh resets it.
        run(&mut state, &grads[7..9]);
        assert_eq!(state.linalg_health().consecutive, 1);
        run(&mut state, &grads[9..10]);
        assert_eq!(state.linalg_health().consecutive, 0);
        assert_ne!(state.left_basis().unwrap().to_owned(), kept.0);
    });
}

/// f32 factorizations that fail are retried in f64 (inside `linalg`): nothing is counted and
/// the directions equal an untouched twin's within f32 rounding.
#[test]
fn f32_failures_are_retried_in_f64() {
    on_one_thread(|| {
        let grads = gradients::<f32>(5, 4, 8, 0.5, 11);
        let mut state = Soap::<f32>::new(&config(2, 100), 5, 4).unwrap();
        let mut twin = state.clone();
        for (s, g) in grads.iter().enumerate() {
            // Steps 1 (eigendecompositions), 3 and 5 (QRs): both sides' f32 attempts fail.
            let n = if [0, 2, 4].contains(&s) { 2 } else { 0 };
            inject_failures(FaultKind::F32Only, n);
            let u = run(&mut state, std::slice::from_ref(g)).remove(0);
            assert_eq!(injected_remaining(), 0, "step {}", s + 1);
            let w = run(&mut twin, std::slice::from_ref(g)).remove(0);
            let err = rel_err(&u, &dense(&w));
            assert!(s == 0 || err <= 1e-3, "step {}: {err:e}", s + 1);
        }
        assert_eq!(state.failed_bases(), 0);
        assert_eq!(state.linalg_health(), LinalgHealth::default());
    });
}

/// Injected failures after `skip` successful calls exercise the right side alone.
#[test]
fn a_failed_right_basis_alone_is_kept() {
    on_one_thread(|| {
        let grads = gradients::<f64>(4, 4, 6, 0.5, 12);
        let mut state = Soap::<f64>::new(&config(2, 100), 4, 4).unwrap();
        run(&mut state, &grads[..2]);
        let left = state.left_basis().unwrap().to_owned();
        let right = state.right_basis().unwrap().to_owned();
        inject_failures_after(1, FaultKind::Both, 1);
        run(&mut state, &grads[2..3]);
        assert_eq!(injected_remaining(), 0);
        assert_ne!(state.left_basis().unwrap().to_owned(), left);
        assert_eq!(state.right_basis().unwrap().to_owned(), right);
        assert_eq!(state.failed_bases(), 1);
    });
}
