//! The MNIST autoencoder of the paper's first benchmark (NOTES.md §6):
//! 784-1000-500-250-30-250-500-1000-784, tanh between hidden layers, a linear 30-unit code layer
//! and a linear output layer producing logits for a sigmoid cross-entropy loss.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Layer widths of the benchmark.
pub const WIDTHS: [usize; 9] = [784, 1000, 500, 250, 30, 250, 500, 1000, 784];

/// Index of the layer producing the 30-unit code (linear: no activation after it).
pub const CODE_LAYER: usize = 3;

/// A stack of dense layers; tanh after every layer except the code layer and the last one.
#[derive(Module, Debug)]
pub struct Autoencoder {
    pub layers: Vec<Linear>,
}

impl Autoencoder {
    /// The benchmark model, seeded.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self::with_widths(&WIDTHS, seed, device)
    }

    /// A model with arbitrary widths (the code layer stays at index [`CODE_LAYER`] when it
    /// exists), for tests.
    ///
    /// Weights: Glorot (Xavier) uniform, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), the
    /// distribution of burn's `Initializer::XavierUniform { gain: 1.0 }`, drawn here from a
    /// ChaCha8 stream seeded with `seed` so that initialization does not depend on burn's
    /// process-global RNG (tests run in parallel); weight i is drawn after weight i-1, row-major
    /// in burn's `[d_in, d_out]` layout. Biases: zero.
    pub fn with_widths(widths: &[usize], seed: u64, device: &Device) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let layers = widths
            .windows(2)
            .map(|w| {
                let (d_in, d_out) = (w[0], w[1]);
                let a = (6.0 / (d_in + d_out) as f64).sqrt() as f32;
                let weight: Vec<f32> = (0..d_in * d_out).map(|_| rng.random_range(-a..a)).collect();
                let weight = Tensor::<2>::from_data(TensorData::new(weight, [d_in, d_out]), device);
                let bias = Tensor::<1>::zeros([d_out], device);
                Linear {
                    weight: Param::from_tensor(weight),
                    bias: Some(Param::from_tensor(bias)),
                }
            })
            .collect();
        Self { layers }
    }

    /// Logits for a batch `[batch, 784]`.
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        self.run_layers(input, |_| {})
    }

    /// The input of every dense layer for a batch `[batch, 784]`: the images themselves, then
    /// each hidden activation (after its tanh, or the linear code), one `[batch, d_in]` tensor
    /// per layer in order.
    pub fn layer_inputs(&self, input: Tensor<2>) -> Vec<Tensor<2>> {
        let mut inputs = Vec::with_capacity(self.layers.len());
        self.run_layers(input, |x| inputs.push(x.clone()));
        inputs
    }

    /// The layers applied in order, calling `visit` on the input of each; returns the logits.
    fn run_layers(&self, input: Tensor<2>, mut visit: impl FnMut(&Tensor<2>)) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for (i, layer) in self.layers.iter().enumerate() {
            visit(&x);
            x = layer.forward(x);
            if i != last && i != CODE_LAYER {
                x = crate::models::fastmath::tanh(x);
            }
        }
        x
    }

    /// The parameters as f32 vectors in a fixed order: layer 0 weight (row-major `[d_in,
    /// d_out]`), layer 0 bias, layer 1 weight, ...
    pub fn flat_params(&self) -> Vec<Vec<f32>> {
        let mut out = Vec::with_capacity(2 * self.layers.len());
        for layer in &self.layers {
            out.push(to_vec(layer.weight.val()));
            if let Some(bias) = &layer.bias {
                out.push(to_vec(bias.val()));
            }
        }
        out
    }

    /// SHA-256 (hex) over the little-endian bytes of [`flat_params`](Self::flat_params).
    pub fn params_sha256(&self) -> String {
        sha256_hex(&self.flat_params())
    }
}

/// SHA-256 (hex) over the little-endian bytes of `params`, in order (a model's fingerprint).
pub fn sha256_hex(params: &[Vec<f32>]) -> String {
    let mut hasher = Sha256::new();
    for values in params {
        for v in values {
            hasher.update(v.to_le_bytes());
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

/// Sigmoid cross-entropy with logits, summed over the pixels and averaged over the batch, in the
/// numerically stable form max(x, 0) - x y + log(1 + exp(-|x|)). Returns a one-element tensor.
pub fn sigmoid_cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let [batch, _] = logits.dims();
    sigmoid_cross_entropy_sum(logits, targets).div_scalar(batch as f64)
}

/// The same loss summed over the batch too (for evaluation in batches).
pub fn sigmoid_cross_entropy_sum(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    crate::models::fastmath::sigmoid_cross_entropy_sum(logits, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_matches_the_paper() {
        let model = Autoencoder::new(0, &Device::flex());
        assert_eq!(model.num_params(), 2_837_314);
        let shapes: Vec<[usize; 2]> = model.layers.iter().map(|l| l.weight.val().dims()).collect();
        assert_eq!(shapes[0], [784, 1000]);
        assert_eq!(shapes[3], [250, 30]);
        assert_eq!(shapes[7], [1000, 784]);
    }

    #[test]
    fn init_is_glorot_uniform_with_zero_bias_and_seeded() {
        let device = Device::flex();
        let a = Autoencoder::with_widths(&[20, 30, 10], 7, &device);
        let b = Autoencoder::with_widths(&[20, 30, 10], 7, &device);
        let c = Autoencoder::with_widths(&[20, 30, 10], 8, &device);
        assert_eq!(a.params_sha256(), b.params_sha256());
        assert_ne!(a.params_sha256(), c.params_sha256());
        let p = a.flat_params();
        let bound = (6.0f32 / 50.0).sqrt();
        assert!(p[0].iter().all(|w| w.abs() <= bound));
        let max = p[0].iter().fold(0f32, |m, w| m.max(w.abs()));
        assert!(max > 0.9 * bound);
        assert!(p[1].iter().all(|&b| b == 0.0));
    }

    #[test]
    fn loss_matches_hand_computed_value() {
        let device = Device::flex();
        // Two examples, two "pixels". Per element: max(x,0) - x y + ln(1 + e^{-|x|}).
        //  x= 0, y=0.5: 0 - 0 + ln 2                 = 0.693147
        //  x= 2, y=1  : 2 - 2 + ln(1 + e^-2)         = 0.126928
        //  x=-3, y=0  : 0 + 0 + ln(1 + e^-3)         = 0.048587
        //  x= 1, y=0.25: 1 - 0.25 + ln(1 + e^-1)     = 1.063262
        // Sum over pixels, mean over the batch: (0.820075 + 1.111849) / 2 = 0.965962.
        let logits = Tensor::<2>::from_data([[0.0f32, 2.0], [-3.0, 1.0]], &device);
        let targets = Tensor::<2>::from_data([[0.5f32, 1.0], [0.0, 0.25]], &device);
        let loss: f32 = sigmoid_cross_entropy(logits.clone(), targets.clone()).into_scalar();
        let expected = (2f32.ln() + (1.0 + (-2f32).exp()).ln())
            + ((1.0 + (-3f32).exp()).ln() + 0.75 + (1.0 + (-1f32).exp()).ln());
        assert!((loss - expected / 2.0).abs() < 1e-6, "{loss}");
        assert!((loss - 0.965962).abs() < 1e-5, "{loss}");
        let sum: f32 = sigmoid_cross_entropy_sum(logits, targets).into_scalar();
        assert!((sum - 2.0 * loss).abs() < 1e-5);
    }

    #[test]
    fn loss_is_stable_for_large_logits() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data([[1000.0f32, -1000.0]], &device);
        let targets = Tensor::<2>::from_data([[0.0f32, 0.0]], &device);
        let loss: f32 = sigmoid_cross_entropy(logits, targets).into_scalar();
        assert!((loss - 1000.0).abs() < 1e-3, "{loss}");
    }

    #[test]
    fn tiny_model_forward_matches_manual_computation() {
        // widths [2, 2, 1, 2]: layer 0 tanh, layer 1 is not the code layer (index 3) so tanh,
        // layer 2 is the last: linear.
        let device = Device::flex();
        let model = Autoencoder::with_widths(&[2, 2, 1, 2], 3, &device);
        let p = model.flat_params();
        let x = [0.3f32, -0.7];
        let h0: Vec<f32> = (0..2)
            .map(|j| (x[0] * p[0][j] + x[1] * p[0][2 + j] + p[1][j]).tanh())
            .collect();
        let h1 = (h0[0] * p[2][0] + h0[1] * p[2][1] + p[3][0]).tanh();
        let out: Vec<f32> = (0..2).map(|j| h1 * p[4][j] + p[5][j]).collect();
        let got = to_vec(model.forward(Tensor::<2>::from_data([x], &device)));
        for (g, e) in got.iter().zip(&out) {
            assert!((g - e).abs() < 1e-6, "{got:?} vs {out:?}");
        }
    }
}
