//! `precond analyze eigensolver`: the batched block eigensolver against faer's, one block at a
//! time, on real gradient streams (issue 22's exactness check).
//!
//! For each dense layer, the gradients of T seeded Adam steps from the trained θ (the stream of
//! `analyze direction`) go through shared-basis (`--rank`, ρ × `--rho-scale`) and Block Adam
//! (`--block-size`) twice in f32, once per [`BlockEigensolver`], each from its own state. Per
//! step: the relative difference ‖u_batched − u_faer‖_F / ‖u_faer‖_F of the directions, and
//! λ_min of the batched path's step-4 matrices against an f64 decomposition of the same f32
//! matrices (on `--sample-blocks` blocks). The two runs start from the same state and see the
//! same gradients, so any difference is the kernels' rounding carried through the states.

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
const HEADER: [&str; 5] = ["layer", "method", "step", "rel_diff", "max_rel_diff_so_far"];

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
    /// Per step: ‖u_batched − u_faer‖ / ‖u_faer‖.
    rel_diff: Vec<f64>,
}

/// The two runs of one method.
struct Twin {
    batched: Box<dyn Preconditioner<f32>>,
    faer: Box<dyn Preconditioner<f32>>,
}

fn twins(
    method: &'static str,
    args: &EigensolverArgs,
    b: usize,
    m: usize,
) -> Result<Twin, AnalyzeError> {
    let make = |eigensolver| -> Result<Box<dyn Preconditioner<f32>>, AnalyzeError> {
        Ok(match method {
            "shared-basis" => Box::new(SharedBasis::<f32>::new(
                SharedBasisConfig {
                    rank: args.rank,
                    rho_scale: args.rho_scale,
                    eigensolver,
                    ..SharedBasisConfig::default()
                },
                b,
                m,
            )?),
            _ => Box::new(BlockAdam::<f32>::new(
                &BlockAdamConfig {
                    block_size: args.block_size,
                    eigensolver,
                    ..BlockAdamConfig::default()
                },
                b,
                m,
            )?),
        })
    };
    Ok(Twin {
        batched: make(BlockEigensolver::Batched)?,
        faer: make(BlockEigensolver::Faer)?,
    })
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
        let mut rel_diff = Vec::with_capacity(stream.len());
        for g in stream {
            let g32 = Mat::<f32>::from_fn(b, m, |r, c| g[(r, c)] as f32);
            twin.batched.precondition(g32.as_ref(), ub.as_mut())?;
            twin.faer.precondition(g32.as_ref(), uf.as_mut())?;
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for c in 0..m {
                for r in 0..b {
                    let (x, y) = (f64::from(ub[(r, c)]), f64::from(uf[(r, c)]));
                    num += (x - y) * (x - y);
                    den += y * y;
                }
            }
            rel_diff.push((num / den.max(f64::MIN_POSITIVE)).sqrt());
        }
        out.push(Comparison { method, rel_diff });
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
                let worst = c.rel_diff.iter().copied().fold(0.0, f64::max);
                let last = c.rel_diff.last().copied().unwrap_or(0.0);
                println!(
                    "{} ({} x {}) {}: max relative difference {worst:.2e} over {} steps, last \
                     {last:.2e}",
                    layer.name,
                    layer.d_in,
                    layer.d_out,
                    c.method,
                    c.rel_diff.len()
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
            let mut worst = 0.0f64;
            for (s, d) in c.rel_diff.iter().enumerate() {
                worst = worst.max(*d);
                rows.push(vec![
                    layer.name.clone(),
                    c.method.to_string(),
                    (s + 1).to_string(),
                    format!("{d:.6e}"),
                    format!("{worst:.6e}"),
                ]);
            }
            summary.push(json!({
                "layer": layer.name,
                "d_in": layer.d_in,
                "d_out": layer.d_out,
                "method": c.method,
                "steps": c.rel_diff.len(),
                "max_rel_diff": worst,
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
