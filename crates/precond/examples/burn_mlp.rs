//! A burn model trained with the shared-basis optimizer: a two-layer MLP fitting a random
//! teacher network, the loss printed every 20 steps. Exits with an error when the loss did not
//! fall by at least 10×.
//!
//! `cargo run -p precond --features burn --example burn_mlp`

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};
use precond::burn_optim::SharedBasisConfig;

#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    output: Linear,
}

impl Mlp {
    fn new(d_in: usize, width: usize, d_out: usize, device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(d_in, width).init(device),
            output: LinearConfig::new(width, d_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.output.forward(self.hidden.forward(x).tanh())
    }
}

fn loss(model: &Mlp, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
    (model.forward(x.clone()) - y.clone()).square().mean()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex().autodiff();
    device.seed(0);
    let (d_in, width, d_out, batch) = (32, 64, 8, 256);
    // The data: x ~ N(0, 1), y from a fixed random teacher of the same shape.
    let teacher = Mlp::new(d_in, width, d_out, &device);
    let x = Tensor::<2>::random([batch, d_in], Distribution::Normal(0.0, 1.0), &device);
    let y = teacher.forward(x.clone()).detach();

    let mut model = Mlp::new(d_in, width, d_out, &device);
    // The shared-basis optimizer with the `shared-basis` preset's ridge, rank 16 < 32 and 64.
    let (mut optim, handle) = SharedBasisConfig::new()
        .with_rank(16)
        .with_rho_scale(precond::TUNED_RHO_SCALE)
        .init_with_handle()?;
    let lr = 1e-3;
    let first = loss(&model, &x, &y).into_scalar::<f32>();
    let mut last = first;
    for step in 1..=200 {
        let l = loss(&model, &x, &y);
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = optim.step(lr, model, grads);
        // A refused or failed step is reported on the handle, never by a panic.
        if let Some(error) = handle.take_last_error() {
            return Err(format!("step {step}: {error}").into());
        }
        if step % 20 == 0 {
            last = loss(&model, &x, &y).into_scalar::<f32>();
            println!("step {step:>3}  loss {last:.6}");
        }
    }
    println!("loss {first:.6} -> {last:.6}");
    if !(last.is_finite() && last < first / 10.0) {
        return Err(format!("the loss did not fall 10x: {first} -> {last}").into());
    }
    Ok(())
}
