//! Median time of one optimizer step for one (d_in, d_out) layer: the shared-basis
//! preconditioner alone, the full `ParamOptimizer` step (grafting + momentum around it), and
//! burn's own Adam on the Flex backend, all in this process.
//!
//! `cargo run --release -p precond --example step_time -- [d_in d_out rank reps]`

use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Distribution, Tensor};
use faer::Mat;
use precond::{OptimizerConfig, ParamOptimizer, Preconditioner, SharedBasis, SharedBasisConfig};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let d_in = args.first().copied().unwrap_or(1000);
    let d_out = args.get(1).copied().unwrap_or(784);
    let rank = args.get(2).copied().unwrap_or(32);
    let reps = args.get(3).copied().unwrap_or(20);
    let warmup = 3;
    let grads: Vec<Mat<f32>> = (0..reps + warmup)
        .map(|t| {
            Mat::from_fn(d_in, d_out, |i, j| {
                (((i * 31 + j * 17 + t * 7) % 97) as f32 - 48.0) * 1e-3
            })
        })
        .collect();

    let cfg = SharedBasisConfig {
        rank,
        ..Default::default()
    };
    let mut state = SharedBasis::<f32>::new(cfg.clone(), d_in, d_out).expect("config");
    let mut dir = Mat::<f32>::zeros(d_in, d_out);
    let mut precond_times = Vec::new();
    for (t, g) in grads.iter().enumerate() {
        let start = Instant::now();
        state.precondition(g.as_ref(), dir.as_mut()).expect("step");
        if t >= warmup {
            precond_times.push(start.elapsed().as_secs_f64());
        }
    }

    let opt_cfg = OptimizerConfig {
        method: precond::Method::SharedBasis(cfg),
        ..Default::default()
    };
    let mut param_opt = ParamOptimizer::new(&opt_cfg, &[d_in, d_out], None, false).expect("config");
    let mut param = vec![0.01f32; d_in * d_out];
    let flat: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| {
            (0..d_in)
                .flat_map(|i| (0..d_out).map(move |j| (i, j)))
                .map(|(i, j)| g[(i, j)])
                .collect()
        })
        .collect();
    let mut full_times = Vec::new();
    for (t, g) in flat.iter().enumerate() {
        let start = Instant::now();
        param_opt.step(&mut param, g, 1e-3).expect("step");
        if t >= warmup {
            full_times.push(start.elapsed().as_secs_f64());
        }
    }

    let device = Device::flex().autodiff();
    let mut model: Linear = LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .init(&device);
    let mut adam: ModuleOptimizer = AdamConfig::new().init();
    let mut adam_times = Vec::new();
    for t in 0..reps + warmup {
        let x = Tensor::<2>::random([8, d_in], Distribution::Default, &device);
        let grads = GradientsParams::from_grads(model.forward(x).sum().backward(), &model);
        let _ = device.sync();
        let start = Instant::now();
        model = adam.step(1e-3, model, grads);
        let _ = model.weight.val().into_data();
        if t >= warmup {
            adam_times.push(start.elapsed().as_secs_f64());
        }
    }
    let (p, f, a) = (
        median(precond_times),
        median(full_times),
        median(adam_times),
    );
    println!(
        "layer ({d_in}, {d_out}) rank {rank}, {reps} reps, {} threads: shared-basis precondition {:.2} ms, full ParamOptimizer step {:.2} ms, burn Adam step {:.2} ms (ratio {:.2}x)",
        rayon::current_num_threads(),
        p * 1e3,
        f * 1e3,
        a * 1e3,
        f / a
    );
}
