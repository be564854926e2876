//! `precond analyze eigensolver`: the batched block eigensolver against faer's, one block at a
//! time, on real gradient streams (issue 22's exactness check).
//!
//! For each dense layer, the gradients of T seeded Adam steps from the trained θ (the stream of
//! `analyze direction`) go through shared-basis (`--rank`, ρ × `--rho-scale`) and Block Adam
//! (`--block-size`) twice in f32, once per [`BlockEigensolver`], each from its own state, and
//! once in f64 (faer) as the reference. Per step: the relative difference
//! ‖u_batched − u_faer‖_F / ‖u_faer‖_F of the two f32 directions, and each one's relative
//! error against the f64 direction. The runs see the same gradients, so the differences are
//! the kernels' rounding carried through the states; while a block's statistics are rank
//! deficient (the first steps) both f32 paths' components along the null space are round-off
//! amplified by (ρ + ε)^{−1/2}, and they differ from each other as much as from f64.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use faer::Mat;
use precond::block_diag::{BlockAdam, BlockAdamConfig};
use precond::{BlockEigensolver, Preconditioner, SharedBasis, SharedBasisConfig};
use serde_json::json;

use super::{
    create_dir, for_each_layer_stream, select_layers, write_csv, write_json, AnalyzeError, Layer,
    Loaded, ModelArgs,
};

/// The CSV's columns.
const HEADER: [&str; 6] = [
    "layer",
    "method",
    "step",
    "rel_diff",
    "batched_vs_f64",
    "faer_vs_f64",
];

/// `precond analyze eigensolver` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EigensolverArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (eigensolver.csv, eigensolver.json)
    #[arg(long)]
    pub out: PathBuf,
    /// A small configuration: 30 steps of batch 64 on the two dense layers with the fewest
    /// weights
    #[arg(long)]
    pub quick: bool,
    /// Length T of the gradient stream [default: 200; --quick: 30]
    #[arg(long, value_name = "T")]
    pub steps: Option<usize>,
    /// Examples per mini-batch of the stream [default: the model's config; --quick: 64]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Dense layers, comma-separated module paths [default: all; --quick: the two smallest]
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub layers: Vec<String>,
    /// Rank k of the shared basis
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Multiplier on the shared basis' ρ increments (the `shared-basis` preset's by default)
    #[arg(long, default_value_t = precond::TUNED_RHO_SCALE)]
    pub rho_scale: f64,
    /// Block Adam's rows per block
    #[arg(long, default_value_t = 10)]
    pub block_size: usize,
}

/// One method's comparison on one layer.
struct Comparison {
    method: &'static str,
    /// Per step: ‖u_batched − u_faer‖ / ‖u_faer‖, and each f32 path's error against f64.
    rel_diff: Vec<f64>,
    batched_err: Vec<f64>,
    faer_err: Vec<f64>,
}

/// The two runs of one method.
struct Twin {
    batched: Box<dyn Preconditioner<f32>>,
    faer: Box<dyn Preconditioner<f32>>,
    reference: Box<dyn Preconditioner<f64>>,
}

fn make<T: precond::Scalar>(
    method: &'static str,
    args: &EigensolverArgs,
    b: usize,
    m: usize,
    eigensolver: BlockEigensolver,
) -> Result<Box<dyn Preconditioner<T>>, AnalyzeError> {
    Ok(match method {
        "shared-basis" => Box::new(SharedBasis::<T>::new(
            SharedBasisConfig {
                rank: args.rank,
                rho_scale: args.rho_scale,
                eigensolver,
                ..SharedBasisConfig::default()
            },
            b,
            m,
        )?),
        _ => Box::new(BlockAdam::<T>::new(
            &BlockAdamConfig {
                block_size: args.block_size,
                eigensolver,
                ..BlockAdamConfig::default()
            },
            b,
            m,
        )?),
    })
}

fn twins(
    method: &'static str,
    args: &EigensolverArgs,
    b: usize,
    m: usize,
) -> Result<Twin, AnalyzeError> {
    Ok(Twin {
        batched: make(method, args, b, m, BlockEigensolver::Batched)?,
        faer: make(method, args, b, m, BlockEigensolver::Faer)?,
        reference: make(method, args, b, m, BlockEigensolver::Faer)?,
    })
}

/// ‖x − y‖_F / ‖y‖_F.
fn relative(x: &Mat<f32>, y: impl Fn(usize, usize) -> f64) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for c in 0..x.ncols() {
        for r in 0..x.nrows() {
            let (a, b) = (f64::from(x[(r, c)]), y(r, c));
            num += (a - b) * (a - b);
            den += b * b;
        }
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn compare_layer(
    args: &EigensolverArgs,
    stream: &[Mat<f64>],
) -> Result<Vec<Comparison>, AnalyzeError> {
    let (b, m) = (stream[0].nrows(), stream[0].ncols());
    let mut out = Vec::new();
    for method in ["shared-basis", "block-adam"] {
        let mut twin = twins(method, args, b, m)?;
        let (mut ub, mut uf) = (Mat::<f32>::zeros(b, m), Mat::<f32>::zeros(b, m));
        let mut u64 = Mat::<f64>::zeros(b, m);
        let mut rel_diff = Vec::with_capacity(stream.len());
        let (mut batched_err, mut faer_err) = (Vec::new(), Vec::new());
        for g in stream {
            let g32 = Mat::<f32>::from_fn(b, m, |r, c| g[(r, c)] as f32);
            let g64 = Mat::<f64>::from_fn(b, m, |r, c| f64::from(g32[(r, c)]));
            twin.batched.precondition(g32.as_ref(), ub.as_mut())?;
            twin.faer.precondition(g32.as_ref(), uf.as_mut())?;
            twin.reference.precondition(g64.as_ref(), u64.as_mut())?;
            rel_diff.push(relative(&ub, |r, c| f64::from(uf[(r, c)])));
            batched_err.push(relative(&ub, |r, c| u64[(r, c)]));
            faer_err.push(relative(&uf, |r, c| u64[(r, c)]));
        }
        out.push(Comparison {
            method,
            rel_diff,
            batched_err,
            faer_err,
        });
    }
    Ok(out)
}

pub fn run(args: &EigensolverArgs, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    let steps = args.steps.unwrap_or(if args.quick { 30 } else { 200 });
    if steps == 0 {
        return Err(AnalyzeError::Invalid(
            "analyze eigensolver: --steps must be at least 1".into(),
        ));
    }
    create_dir(&args.out)?;
    let loaded = Loaded::open(&args.model, args.quick, &args.out)?;
    let batch_size = args.batch_size.unwrap_or(if args.quick {
        64
    } else {
        loaded.config().batch_size
    });
    let layers = select_layers("eigensolver", &loaded, &args.layers, args.quick)?;
    let mut done: Vec<(Layer, Vec<Comparison>, f64)> = Vec::new();
    let interrupted = for_each_layer_stream(
        "eigensolver",
        &loaded,
        &layers,
        steps,
        batch_size,
        args.model.seed,
        stop,
        |layer, stream| {
            let start = Instant::now();
            let result = compare_layer(args, &stream)?;
            let seconds = start.elapsed().as_secs_f64();
            for c in &result {
                let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
                let median = |v: &[f64]| {
                    let mut s = v.to_vec();
                    s.sort_by(f64::total_cmp);
                    s[s.len() / 2]
                };
                println!(
                    "{} ({} x {}) {}, {} steps: batched vs faer max {:.2e} median {:.2e}; \
                     against f64: batched max {:.2e} median {:.2e}, faer max {:.2e} median {:.2e}",
                    layer.name,
                    layer.d_in,
                    layer.d_out,
                    c.method,
                    c.rel_diff.len(),
                    max(&c.rel_diff),
                    median(&c.rel_diff),
                    max(&c.batched_err),
                    median(&c.batched_err),
                    max(&c.faer_err),
                    median(&c.faer_err),
                );
            }
            done.push((layer, result, seconds));
            Ok(false)
        },
    )?;
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for (layer, result, seconds) in &done {
        for c in result {
            for (s, d) in c.rel_diff.iter().enumerate() {
                rows.push(vec![
                    layer.name.clone(),
                    c.method.to_string(),
                    (s + 1).to_string(),
                    format!("{d:.6e}"),
                    format!("{:.6e}", c.batched_err[s]),
                    format!("{:.6e}", c.faer_err[s]),
                ]);
            }
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            summary.push(json!({
                "layer": layer.name,
                "d_in": layer.d_in,
                "d_out": layer.d_out,
                "method": c.method,
                "steps": c.rel_diff.len(),
                "max_rel_diff": max(&c.rel_diff),
                "max_batched_vs_f64": max(&c.batched_err),
                "max_faer_vs_f64": max(&c.faer_err),
                "seconds": seconds,
            }));
        }
    }
    write_csv(&args.out.join("eigensolver.csv"), &HEADER, &rows)?;
    write_json(
        &args.out.join("eigensolver.json"),
        &json!({
            "steps": steps,
            "batch_size": batch_size,
            "rank": args.rank,
            "rho_scale": args.rho_scale,
            "block_size": args.block_size,
            "interrupted": interrupted,
            "layers": summary,
        }),
    )?;
    println!("wrote {}", args.out.join("eigensolver.csv").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// On a synthetic stream (unit-scale Gaussian gradients), once the statistics have full
    /// rank (step 5 on: more steps than rows per block and than k), the two f32 kernels agree to
    /// f32 rounding, and each is as close to the f64 run as the other.
    #[test]
    fn kernels_agree_on_a_synthetic_stream() {
        let (b, m, steps) = (12, 9, 30);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let stream: Vec<Mat<f64>> = (0..steps)
            .map(|_| Mat::from_fn(b, m, |_, _| rng.random::<f64>() - 0.5))
            .collect();
        let args = EigensolverArgs {
            model: ModelArgs::default(),
            out: PathBuf::new(),
            quick: true,
            steps: Some(steps),
            batch_size: None,
            layers: Vec::new(),
            rank: 4,
            rho_scale: precond::TUNED_RHO_SCALE,
            block_size: 3,
        };
        let result = compare_layer(&args, &stream).unwrap();
        assert_eq!(result.len(), 2);
        for c in &result {
            assert_eq!(c.rel_diff.len(), steps);
            let max = |v: &[f64]| v[4..].iter().copied().fold(0.0, f64::max);
            assert!(
                max(&c.rel_diff) < 2e-5,
                "{}: {:e}",
                c.method,
                max(&c.rel_diff)
            );
            // Both f32 paths sit at f32 rounding from f64, neither 10x worse than the other.
            let (eb, ef) = (max(&c.batched_err), max(&c.faer_err));
            assert!(eb < 2e-5 && ef < 2e-5, "{}: {eb:e} {ef:e}", c.method);
            assert!(eb < 10.0 * ef.max(1e-7), "{}: {eb:e} vs {ef:e}", c.method);
            // Not vacuous: the kernels round differently.
            assert!(c.rel_diff.iter().any(|&d| d > 0.0), "{}", c.method);
        }
    }
}
