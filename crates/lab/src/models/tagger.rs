//! The Transformer part-of-speech tagger of Flax's `examples/nlp_seq` (the third benchmark of
//! Yen et al., NeurIPS 2023, Table 3), in burn.
//!
//! The model follows `examples/nlp_seq/models.py` (`Transformer`, `Encoder1DBlock`, `MlpBlock`,
//! `AddPositionEmbs`):
//!
//! ```text
//! x = Dropout(Embed(tokens)) + PE                      (fixed sinusoidal encodings)
//! repeat `layers` times (pre-LayerNorm blocks):
//!     x = x + Dropout(AttnOut(MHA(LN(x))))             (dropout on the attention weights too)
//!     x = x + Dropout(Dense_out(Dropout(ELU(Dense_in(LN(x))))))
//! logits = Dense(LN(x))
//! ```
//!
//! - LayerNorm epsilon 1e-6 (Flax's default), scale 1, bias 0.
//! - Attention: q, k, v and the output projection are `[width, width]` dense layers without bias
//!   (Flax's `SelfAttention(use_bias=False, qkv_features=width)`); the query is divided by
//!   sqrt(head_dim) before the dot product, as Flax's `dot_product_attention` does.
//! - One dropout rate for every dropout (Flax's `dropout_rate` and `attention_dropout_rate` are
//!   both 0.3 in the example); attention dropout is not broadcast (`broadcast_dropout=False`).
//!
//! One deliberate difference: Flax's example passes no mask to the attention, so real tokens
//! attend to the padding of their batch. Here padding keys are masked (a -1e9 bias before the
//! softmax), so a sentence's logits do not depend on what it is batched with.
//!
//! Initialization (`examples/nlp_seq/models.py`'s `TransformerConfig`, not Flax's generic
//! defaults): every dense kernel Glorot (Xavier) uniform, biases normal with std 1e-6, the
//! embedding Flax's `nn.Embed` default (`variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)`:
//! a plain normal with std sqrt(1/width)), LayerNorm scale 1 and bias 0. All draws come from a ChaCha8 stream seeded with the model seed,
//! never from burn's process-global RNG.
//!
//! Dropout masks come from a [`DropoutRng`] keyed by the run seed and the training step, so a
//! resumed run draws the same masks as an uninterrupted one.

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::data::conllu::PAD;

/// LayerNorm epsilon: Flax's `nn.LayerNorm` default.
const LAYER_NORM_EPS: f64 = 1e-6;

/// Added to the attention scores of padding keys before the softmax (finite, so that a row whose
/// keys were all padding would still give finite weights).
const MASKED_SCORE: f32 = -1e9;

/// Standard deviation of the dense biases at initialization (`nlp_seq`'s
/// `bias_init=nn.initializers.normal(stddev=1e-6)`).
const BIAS_INIT_STD: f64 = 1e-6;

/// Domain separation of the dropout key from the seed (see [`DropoutRng::new`]).
const DROPOUT_KEY_DOMAIN: &[u8] = b"precond tagger dropout v1";

/// Sizes of the tagger.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaggerDims {
    /// Number of word ids (including PAD, UNK and ROOT).
    pub vocab: usize,
    /// Number of tag ids (including PAD, UNK and ROOT).
    pub tags: usize,
    /// Number of encoder blocks.
    pub layers: usize,
    /// Model width (embedding, attention and residual stream).
    pub width: usize,
    /// Hidden width of the MLP blocks.
    pub mlp: usize,
    /// Attention heads; must divide `width`.
    pub heads: usize,
    /// Dropout rate of every dropout (embedding, attention weights, attention output, MLP).
    pub dropout: f64,
}

impl TaggerDims {
    /// A small tagger for quick runs: 2 layers, width 128, MLP 512, 4 heads, dropout 0.3.
    pub fn small(vocab: usize, tags: usize) -> Self {
        Self {
            vocab,
            tags,
            layers: 2,
            width: 128,
            mlp: 512,
            heads: 4,
            dropout: 0.3,
        }
    }

    /// The `nlp_seq` example's `TransformerConfig`: 6 layers, width 512, MLP 2048, 8 heads,
    /// dropout 0.3.
    pub fn paper(vocab: usize, tags: usize) -> Self {
        Self {
            vocab,
            tags,
            layers: 6,
            width: 512,
            mlp: 2048,
            heads: 8,
            dropout: 0.3,
        }
    }

    /// Checks that every size is at least 1, that `heads` divides `width` and that the dropout
    /// rate lies in [0, 1).
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("vocab", self.vocab),
            ("tags", self.tags),
            ("layers", self.layers),
            ("width", self.width),
            ("mlp", self.mlp),
            ("heads", self.heads),
        ] {
            if value == 0 {
                return Err(format!("tagger {name} must be at least 1"));
            }
        }
        if self.width % self.heads != 0 {
            return Err(format!(
                "tagger width {} is not divisible by its {} heads",
                self.width, self.heads
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "tagger dropout must lie in [0, 1), got {}",
                self.dropout
            ));
        }
        Ok(())
    }
}

/// One pre-LayerNorm Transformer encoder block (Flax `Encoder1DBlock`).
#[derive(Module, Debug)]
pub struct EncoderLayer {
    pub attn_norm: LayerNorm,
    /// `[width, width]`, no bias.
    pub query: Linear,
    /// `[width, width]`, no bias.
    pub key: Linear,
    /// `[width, width]`, no bias.
    pub value: Linear,
    /// `[width, width]`, no bias.
    pub attn_out: Linear,
    pub mlp_norm: LayerNorm,
    /// `[width, mlp]` with bias.
    pub mlp_in: Linear,
    /// `[mlp, width]` with bias.
    pub mlp_out: Linear,
}

/// The tagger: embedding, sinusoidal positions, encoder blocks, final LayerNorm, output layer.
#[derive(Module, Debug)]
pub struct Tagger {
    /// `[vocab, width]`.
    pub embedding: Embedding,
    pub layers: Vec<EncoderLayer>,
    pub final_norm: LayerNorm,
    /// `[width, tags]` with bias: the logits.
    pub output: Linear,
    heads: usize,
    dropout: f64,
}

/// Dropout masks drawn on the host from a ChaCha8 stream, independent of burn's global RNG.
#[derive(Debug, Clone)]
pub struct DropoutRng {
    rng: ChaCha8Rng,
}

impl DropoutRng {
    /// The stream of training step `step` of a run seeded with `seed`: the ChaCha8 key is
    /// SHA-256 of a fixed domain string and the little-endian seed (so that it never coincides
    /// with the initialization stream `ChaCha8Rng::seed_from_u64(seed)`), the ChaCha stream
    /// number is `step`.
    pub fn new(seed: u64, step: u64) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DROPOUT_KEY_DOMAIN);
        hasher.update(seed.to_le_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(step);
        Self { rng }
    }

    /// `count` mask values, each 1/(1-p) with probability 1-p (up to the 2⁻³² resolution of
    /// the threshold) and 0 otherwise: one u32 per element compared against a threshold.
    fn mask_values(&mut self, count: usize, p: f64) -> Vec<f32> {
        let threshold = ((1.0 - p) * 4_294_967_296.0).round() as u64;
        let scale = (1.0 / (1.0 - p)) as f32;
        (0..count)
            .map(|_| {
                if u64::from(self.rng.next_u32()) < threshold {
                    scale
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// A mask tensor of `shape` on `device` (see [`mask_values`](Self::mask_values)).
    fn mask<const D: usize>(&mut self, shape: [usize; D], p: f64, device: &Device) -> Tensor<D> {
        let count = shape.iter().product();
        Tensor::<D>::from_data(TensorData::new(self.mask_values(count, p), shape), device)
    }
}

/// A batch of sentences on the host, row-major `[n, len]`, padded with PAD to the longest
/// sentence. A position is real iff its token is not PAD.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Word ids, i32: the default int dtype of burn's flex device (the embedding's index type).
    pub tokens: Vec<i32>,
    /// Tag ids (PAD at padding positions).
    pub tags: Vec<u32>,
    /// Number of sentences.
    pub n: usize,
    /// Padded length (the longest sentence).
    pub len: usize,
}

impl Batch {
    /// Pads `(tokens, tags)` sentences, each already starting with ROOT at position 0.
    ///
    /// # Panics
    ///
    /// If there is no sentence, a sentence is empty, its tokens and tags differ in length, a
    /// real token or tag is PAD, or a token id does not fit in i32.
    pub fn new(sentences: &[(&[u32], &[u32])]) -> Batch {
        assert!(!sentences.is_empty(), "a batch needs at least one sentence");
        let n = sentences.len();
        let len = sentences.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
        let mut tokens = vec![PAD as i32; n * len];
        let mut tags = vec![PAD; n * len];
        for (i, (words, labels)) in sentences.iter().enumerate() {
            assert!(!words.is_empty(), "sentence {i} is empty");
            assert_eq!(
                words.len(),
                labels.len(),
                "sentence {i}: {} tokens but {} tags",
                words.len(),
                labels.len()
            );
            for (j, (&w, &t)) in words.iter().zip(labels.iter()).enumerate() {
                assert!(
                    w != PAD && t != PAD,
                    "sentence {i} position {j}: PAD inside a sentence"
                );
                tokens[i * len + j] = i32::try_from(w).expect("token id fits in i32");
                tags[i * len + j] = t;
            }
        }
        Batch {
            tokens,
            tags,
            n,
            len,
        }
    }

    /// Number of real (non-PAD) positions, ROOT included.
    pub fn real_positions(&self) -> usize {
        self.tokens.iter().filter(|&&t| t != PAD as i32).count()
    }

    /// Additive attention bias `[n, 1, 1, len]`: 0 for real keys, [`MASKED_SCORE`] for padding.
    fn key_padding_bias(&self, device: &Device) -> Tensor<4> {
        let bias: Vec<f32> = self
            .tokens
            .iter()
            .map(|&t| if t == PAD as i32 { MASKED_SCORE } else { 0.0 })
            .collect();
        Tensor::<4>::from_data(TensorData::new(bias, [self.n, 1, 1, self.len]), device)
    }
}

/// Fixed sinusoidal position encodings `[len, width]` (row-major), as Flax's `sinusoidal_init`:
/// for even `i`, `pe[pos, i] = sin(pos·f)` and `pe[pos, i+1] = cos(pos·f)` with
/// `f = exp(-i·ln(10000)/width) = 10000^(-i/width)`, computed in f64 and rounded to f32.
fn position_encoding(len: usize, width: usize) -> Vec<f32> {
    let mut pe = vec![0f32; len * width];
    let log_base = -(10000f64.ln()) / width as f64;
    for pos in 0..len {
        let row = &mut pe[pos * width..(pos + 1) * width];
        for i in (0..width).step_by(2) {
            let angle = pos as f64 * (i as f64 * log_base).exp();
            row[i] = angle.sin() as f32;
            if i + 1 < width {
                row[i + 1] = angle.cos() as f32;
            }
        }
    }
    pe
}

/// ELU with α = 1: x for x > 0, exp(x) - 1 otherwise. The exponential is taken of min(x, 0) so
/// that large positive inputs cannot overflow to inf (whose zero gradient in the unselected
/// branch would otherwise turn into NaN).
fn elu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let negative = x.clone().clamp_max(0.0).exp().sub_scalar(1.0);
    let mask = x.clone().lower_equal_elem(0.0);
    x.mask_where(mask, negative)
}

/// A standard normal from two uniforms (Box–Muller, cosine branch only).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Glorot (Xavier) uniform `[d_in, d_out]` kernel, row-major.
fn xavier_uniform(rng: &mut ChaCha8Rng, d_in: usize, d_out: usize, device: &Device) -> Tensor<2> {
    let a = (6.0 / (d_in + d_out) as f64).sqrt();
    let values: Vec<f32> = (0..d_in * d_out)
        .map(|_| rng.random_range(-a..a) as f32)
        .collect();
    Tensor::<2>::from_data(TensorData::new(values, [d_in, d_out]), device)
}

fn dense(rng: &mut ChaCha8Rng, d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    let weight = Param::from_tensor(xavier_uniform(rng, d_in, d_out, device));
    let bias = bias.then(|| {
        let values: Vec<f32> = (0..d_out)
            .map(|_| (BIAS_INIT_STD * standard_normal(rng)) as f32)
            .collect();
        Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(values, [d_out]),
            device,
        ))
    });
    Linear { weight, bias }
}

fn layer_norm(width: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(width)
        .with_epsilon(LAYER_NORM_EPS)
        .init(device)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>()
        .expect("reading a float tensor back to the host")
}

impl EncoderLayer {
    fn new(dims: &TaggerDims, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        let w = dims.width;
        Self {
            attn_norm: layer_norm(w, device),
            query: dense(rng, w, w, false, device),
            key: dense(rng, w, w, false, device),
            value: dense(rng, w, w, false, device),
            attn_out: dense(rng, w, w, false, device),
            mlp_norm: layer_norm(w, device),
            mlp_in: dense(rng, w, dims.mlp, true, device),
            mlp_out: dense(rng, dims.mlp, w, true, device),
        }
    }

    /// `x`: `[n, len, width]`; `bias`: `[n, 1, 1, len]` (see [`Batch::key_padding_bias`]).
    fn forward(
        &self,
        x: Tensor<3>,
        bias: Tensor<4>,
        heads: usize,
        drop: &mut Dropper<'_>,
    ) -> Tensor<3> {
        let [n, len, width] = x.dims();
        let head_dim = width / heads;
        let split = |t: Tensor<3>| t.reshape([n, len, heads, head_dim]).swap_dims(1, 2);

        // Attention block.
        let h = self.attn_norm.forward(x.clone());
        let q = split(self.query.forward(h.clone())).div_scalar((head_dim as f64).sqrt());
        let k = split(self.key.forward(h.clone()));
        let v = split(self.value.forward(h));
        let scores = q.matmul(k.swap_dims(2, 3)) + bias; // [n, heads, len, len]
        let weights = drop.apply(softmax(scores, 3));
        let attended = weights
            .matmul(v) // [n, heads, len, head_dim]
            .swap_dims(1, 2)
            .reshape([n, len, width]);
        let x = x + drop.apply(self.attn_out.forward(attended));

        // MLP block.
        let h = self.mlp_norm.forward(x.clone());
        let h = drop.apply(elu(self.mlp_in.forward(h)));
        let h = drop.apply(self.mlp_out.forward(h));
        x + h
    }
}

/// Dropout at a fixed rate with an optional mask stream (none: identity).
struct Dropper<'a> {
    rng: Option<&'a mut DropoutRng>,
    p: f64,
    device: &'a Device,
}

impl Dropper<'_> {
    fn apply<const D: usize>(&mut self, x: Tensor<D>) -> Tensor<D> {
        match self.rng.as_deref_mut() {
            Some(rng) if self.p > 0.0 => {
                let mask = rng.mask(x.dims(), self.p, self.device);
                x * mask
            }
            _ => x,
        }
    }
}

impl Tagger {
    /// A seeded model.
    ///
    /// Every value is drawn from `ChaCha8Rng::seed_from_u64(seed)`, in this order: the
    /// embedding (row-major `[vocab, width]`), then per layer query, key, value, attn_out,
    /// mlp_in (weight then bias), mlp_out (weight then bias), then the output layer (weight then
    /// bias); weights row-major in burn's `[d_in, d_out]` layout.
    ///
    /// - Dense kernels: Glorot uniform U(-a, a), a = sqrt(6 / (fan_in + fan_out)), as the
    ///   `nlp_seq` example's `kernel_init=xavier_uniform()` (the attention kernels, `[width,
    ///   heads, head_dim]` in Flax, have fans width and width there as here).
    /// - Dense biases: normal with std 1e-6 (`bias_init=normal(stddev=1e-6)`).
    /// - Embedding: Flax's `nn.Embed` default `variance_scaling(1.0, 'fan_in', 'normal',
    ///   out_axis=0)`, whose fan_in is `width` (for a `[vocab, width]` table with in_axis -2 and
    ///   out_axis 0 the receptive field is width/vocab): jax's "normal" is a plain (not
    ///   truncated) normal, here with std sqrt(1/width), drawn with Box–Muller.
    /// - LayerNorm: scale 1, bias 0, epsilon 1e-6.
    ///
    /// # Panics
    ///
    /// If `dims.check()` fails.
    pub fn new(dims: &TaggerDims, seed: u64, device: &Device) -> Tagger {
        if let Err(e) = dims.check() {
            panic!("invalid tagger dims: {e}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = (1.0 / dims.width as f64).sqrt();
        let table: Vec<f32> = (0..dims.vocab * dims.width)
            .map(|_| (std * standard_normal(&mut rng)) as f32)
            .collect();
        let embedding = Embedding {
            weight: Param::from_tensor(Tensor::<2>::from_data(
                TensorData::new(table, [dims.vocab, dims.width]),
                device,
            )),
        };
        let layers = (0..dims.layers)
            .map(|_| EncoderLayer::new(dims, &mut rng, device))
            .collect();
        Tagger {
            embedding,
            layers,
            final_norm: layer_norm(dims.width, device),
            output: dense(&mut rng, dims.width, dims.tags, true, device),
            heads: dims.heads,
            dropout: dims.dropout,
        }
    }

    /// Logits `[n, len, tags]` of a batch. With `dropout` `Some` (training) every dropout draws
    /// its mask from that stream, in forward order; with `None` (evaluation) or a zero rate
    /// there is no dropout.
    ///
    /// # Panics
    ///
    /// If a token id is not below the vocabulary size.
    pub fn forward(
        &self,
        batch: &Batch,
        dropout: Option<&mut DropoutRng>,
        device: &Device,
    ) -> Tensor<3> {
        let x = self.encode(batch, dropout, device, |_| {});
        self.output.forward(self.final_norm.forward(x))
    }

    /// The residual stream `[n, len, width]` without dropout (evaluation): first the embedding
    /// stage's output (token embedding + positions, the input of block 0), then the output of
    /// each encoder block (`layers + 1` tensors; the last one is what `forward` passes to
    /// `final_norm`). Padding positions are included; a sentence's real rows do not depend on
    /// the padding (padding keys are masked).
    ///
    /// # Panics
    ///
    /// If a token id is not below the vocabulary size.
    pub fn block_outputs(&self, batch: &Batch, device: &Device) -> Vec<Tensor<3>> {
        let mut outputs = Vec::with_capacity(self.layers.len() + 1);
        self.encode(batch, None, device, |x| outputs.push(x.clone()));
        outputs
    }

    /// The embedding stage and the encoder blocks (everything before `final_norm`), calling
    /// `visit` on the embedding stage's output and on each block's output, in order.
    fn encode(
        &self,
        batch: &Batch,
        dropout: Option<&mut DropoutRng>,
        device: &Device,
        mut visit: impl FnMut(&Tensor<3>),
    ) -> Tensor<3> {
        let [vocab, width] = self.embedding.weight.dims();
        if let Some(&t) = batch.tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            panic!("token id {t} is outside the vocabulary of {vocab}");
        }
        let (n, len) = (batch.n, batch.len);
        let mut drop = Dropper {
            rng: dropout,
            p: self.dropout,
            device,
        };
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(batch.tokens.clone(), [n, len]), device);
        let positions = Tensor::<3>::from_data(
            TensorData::new(position_encoding(len, width), [1, len, width]),
            device,
        );
        // Flax: Dropout(Embed(x)), then AddPositionEmbs.
        let mut x = drop.apply(self.embedding.forward(tokens)) + positions;
        visit(&x);
        let bias = batch.key_padding_bias(device);
        for layer in &self.layers {
            x = layer.forward(x, bias.clone(), self.heads, &mut drop);
            visit(&x);
        }
        x
    }

    /// The parameters as f32 vectors in a fixed order (the field order): embedding; per layer
    /// attn_norm scale and bias, query, key, value, attn_out, mlp_norm scale and bias, mlp_in
    /// weight and bias, mlp_out weight and bias; final_norm scale and bias; output weight and
    /// bias. Weights row-major `[d_in, d_out]`.
    pub fn flat_params(&self) -> Vec<Vec<f32>> {
        fn linear(out: &mut Vec<Vec<f32>>, l: &Linear) {
            out.push(to_vec(l.weight.val()));
            if let Some(b) = &l.bias {
                out.push(to_vec(b.val()));
            }
        }
        fn norm(out: &mut Vec<Vec<f32>>, l: &LayerNorm) {
            out.push(to_vec(l.gamma.val()));
            if let Some(b) = &l.beta {
                out.push(to_vec(b.val()));
            }
        }
        let mut out = vec![to_vec(self.embedding.weight.val())];
        for layer in &self.layers {
            norm(&mut out, &layer.attn_norm);
            for l in [&layer.query, &layer.key, &layer.value, &layer.attn_out] {
                linear(&mut out, l);
            }
            norm(&mut out, &layer.mlp_norm);
            linear(&mut out, &layer.mlp_in);
            linear(&mut out, &layer.mlp_out);
        }
        norm(&mut out, &self.final_norm);
        linear(&mut out, &self.output);
        out
    }

    /// SHA-256 (hex) over the little-endian bytes of [`flat_params`](Self::flat_params).
    pub fn params_sha256(&self) -> String {
        crate::models::autoencoder::sha256_hex(&self.flat_params())
    }
}

/// One-hot targets `[n, len, tags]`: 1 at the tag of every real position, 0 elsewhere (all of a
/// padding position's row).
fn target_weights(batch: &Batch, tags: usize, device: &Device) -> Tensor<3> {
    let mut onehot = vec![0f32; batch.n * batch.len * tags];
    for (pos, (&token, &tag)) in batch.tokens.iter().zip(&batch.tags).enumerate() {
        if token != PAD as i32 {
            let tag = tag as usize;
            assert!(tag < tags, "tag id {tag} is outside the {tags} tags");
            onehot[pos * tags + tag] = 1.0;
        }
    }
    Tensor::<3>::from_data(TensorData::new(onehot, [batch.n, batch.len, tags]), device)
}

/// Softmax cross-entropy summed over the real (non-PAD) positions, ROOT included (its target is
/// the ROOT tag); a one-element tensor. Flax's `compute_weighted_cross_entropy` with weights
/// `targets > 0`.
pub fn masked_cross_entropy_sum(logits: Tensor<3>, batch: &Batch) -> Tensor<1> {
    let [n, len, tags] = logits.dims();
    assert_eq!(
        (n, len),
        (batch.n, batch.len),
        "logits do not match the batch"
    );
    let targets = target_weights(batch, tags, &logits.device());
    (log_softmax(logits, 2) * targets).sum().neg()
}

/// [`masked_cross_entropy_sum`] divided by the number of real positions (the training loss of
/// the `nlp_seq` example); 0 for a batch without real positions.
pub fn masked_cross_entropy(logits: Tensor<3>, batch: &Batch) -> Tensor<1> {
    let count = batch.real_positions().max(1);
    masked_cross_entropy_sum(logits, batch).div_scalar(count as f64)
}

/// Tagging accuracy counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accuracy {
    /// Correct predictions over every real position (ROOT included, as Flax's metric).
    pub correct: u64,
    /// Real positions.
    pub total: u64,
    /// Correct predictions over the words (the ROOT position 0 of each sentence excluded).
    pub correct_words: u64,
    /// Words.
    pub total_words: u64,
}

impl Accuracy {
    /// Adds the counts of `other`.
    pub fn add(&mut self, other: Accuracy) {
        self.correct += other.correct;
        self.total += other.total;
        self.correct_words += other.correct_words;
        self.total_words += other.total_words;
    }

    /// correct / total (0 when there is nothing).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    /// correct_words / total_words (0 when there is nothing).
    pub fn word_fraction(&self) -> f64 {
        if self.total_words == 0 {
            0.0
        } else {
            self.correct_words as f64 / self.total_words as f64
        }
    }
}

/// Argmax predictions (on the host; ties go to the lowest tag id) compared with the batch's
/// tags at the real positions.
pub fn accuracy(logits: Tensor<3>, batch: &Batch) -> Accuracy {
    let [n, len, tags] = logits.dims();
    assert_eq!(
        (n, len),
        (batch.n, batch.len),
        "logits do not match the batch"
    );
    let values = to_vec(logits);
    let mut acc = Accuracy::default();
    for pos in 0..n * len {
        if batch.tokens[pos] == PAD as i32 {
            continue;
        }
        let row = &values[pos * tags..(pos + 1) * tags];
        let mut best = 0;
        for (j, &v) in row.iter().enumerate().skip(1) {
            if v > row[best] {
                best = j;
            }
        }
        let hit = u64::from(best as u32 == batch.tags[pos]);
        acc.correct += hit;
        acc.total += 1;
        if pos % len != 0 {
            acc.correct_words += hit;
            acc.total_words += 1;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::conllu::ROOT;

    fn tiny(layers: usize, dropout: f64) -> TaggerDims {
        TaggerDims {
            vocab: 11,
            tags: 5,
            layers,
            width: 8,
            mlp: 16,
            heads: 2,
            dropout,
        }
    }

    fn logits_vec(model: &Tagger, batch: &Batch, rng: Option<&mut DropoutRng>) -> Vec<f32> {
        to_vec(model.forward(batch, rng, &Device::flex()))
    }

    #[test]
    fn dims_check_and_presets() {
        assert_eq!(tiny(1, 0.3).check(), Ok(()));
        assert!(TaggerDims::small(100, 20).check().is_ok());
        let paper = TaggerDims::paper(100, 20);
        assert_eq!(
            (paper.layers, paper.width, paper.mlp, paper.heads),
            (6, 512, 2048, 8)
        );
        assert_eq!(paper.dropout, 0.3);
        let mut d = tiny(1, 0.3);
        d.width = 9;
        assert!(d.check().unwrap_err().contains("divisible"));
        let mut d = tiny(1, 0.3);
        d.layers = 0;
        assert!(d.check().unwrap_err().contains("layers"));
        for p in [1.0, -0.1, f64::NAN] {
            let mut d = tiny(1, 0.3);
            d.dropout = p;
            assert!(d.check().is_err(), "{p}");
        }
    }

    #[test]
    fn parameter_count_and_shapes() {
        let d = tiny(2, 0.3);
        let model = Tagger::new(&d, 0, &Device::flex());
        let (v, t, w, m) = (11, 5, 8, 16);
        let per_layer = 2 * w + 4 * w * w + 2 * w + w * m + m + m * w + w;
        assert_eq!(
            model.num_params(),
            v * w + 2 * per_layer + 2 * w + w * t + t
        );
        let p = model.flat_params();
        assert_eq!(p.len(), 1 + 2 * 12 + 2 + 2);
        assert!(model.layers[0].query.bias.is_none());
        assert!(model.layers[0].attn_out.bias.is_none());
        assert_eq!(model.layers[0].mlp_in.weight.dims(), [8, 16]);
        assert_eq!(model.output.weight.dims(), [8, 5]);
        // LayerNorm scale 1 and bias 0; biases ~1e-6.
        assert!(p[1].iter().all(|&g| g == 1.0));
        assert!(p[2].iter().all(|&b| b == 0.0));
        let mlp_bias = &p[10];
        assert_eq!(mlp_bias.len(), 16);
        assert!(mlp_bias.iter().all(|b| b.abs() < 1e-5) && mlp_bias.iter().any(|&b| b != 0.0));
        // Embedding std sqrt(1/width), untruncated: over 4000 draws.
        let big = Tagger::new(&TaggerDims { vocab: 500, ..d }, 0, &Device::flex());
        let emb = to_vec(big.embedding.weight.val());
        let var = emb.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / emb.len() as f64;
        assert!((var.sqrt() - (1.0f64 / 8.0).sqrt()).abs() < 0.015, "{var}");
        let beyond = emb
            .iter()
            .filter(|&&x| f64::from(x).abs() > 2.0 * (1.0f64 / 8.0).sqrt())
            .count();
        assert!(
            (100..=250).contains(&beyond),
            "{beyond} beyond 2 std (expected ~182)"
        );
        let a = (6.0f32 / 16.0).sqrt();
        assert!(p[3].iter().all(|w| w.abs() <= a));
    }

    /// A sentence's logits do not depend on the padding added when it is batched with a longer
    /// one.
    #[test]
    fn padding_keys_are_masked() {
        let model = Tagger::new(&tiny(2, 0.3), 5, &Device::flex());
        let short: (&[u32], &[u32]) = (&[ROOT, 4, 7], &[ROOT, 3, 4]);
        let long: (&[u32], &[u32]) = (&[ROOT, 5, 9, 3, 10, 6], &[ROOT, 1, 3, 4, 3, 4]);
        let alone = logits_vec(&model, &Batch::new(&[short]), None);
        let batched = Batch::new(&[long, short]);
        assert_eq!((batched.n, batched.len), (2, 6));
        let both = logits_vec(&model, &batched, None);
        let tags = 5;
        let second = &both[6 * tags..(6 + 3) * tags];
        assert_eq!(alone.len(), second.len());
        for (a, b) in alone.iter().zip(second) {
            assert!((a - b).abs() < 1e-5, "{alone:?} vs {second:?}");
        }
        let long_alone = logits_vec(&model, &Batch::new(&[long]), None);
        for (a, b) in long_alone.iter().zip(&both[..6 * tags]) {
            assert!((a - b).abs() < 1e-5);
        }
        // Without the mask the padding would matter: changing a real token changes the logits.
        let other: (&[u32], &[u32]) = (&[ROOT, 4, 8], &[ROOT, 3, 4]);
        let changed = logits_vec(&model, &Batch::new(&[other]), None);
        assert!(changed[..tags]
            .iter()
            .zip(&alone[..tags])
            .any(|(a, b)| (a - b).abs() > 1e-4));
    }

    #[test]
    fn batch_pads_with_pad() {
        let b = Batch::new(&[(&[ROOT, 4], &[ROOT, 3]), (&[ROOT, 5, 6], &[ROOT, 1, 4])]);
        assert_eq!(b.tokens, vec![2, 4, 0, 2, 5, 6]);
        assert_eq!(b.tags, vec![2, 3, 0, 2, 1, 4]);
        assert_eq!((b.n, b.len, b.real_positions()), (2, 3, 5));
    }

    fn host_cross_entropy(logits: &[f32], batch: &Batch, tags: usize) -> (f64, usize) {
        let mut sum = 0.0;
        let mut count = 0;
        for pos in 0..batch.n * batch.len {
            if batch.tokens[pos] == 0 {
                continue;
            }
            let row: Vec<f64> = logits[pos * tags..(pos + 1) * tags]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            sum += lse - row[batch.tags[pos] as usize];
            count += 1;
        }
        (sum, count)
    }

    #[test]
    fn cross_entropy_matches_host_and_ignores_padding() {
        let device = Device::flex();
        let batch = Batch::new(&[
            (&[ROOT, 4, 5, 6], &[ROOT, 3, 4, 1]),
            (&[ROOT, 7], &[ROOT, 4]),
        ]);
        let tags = 5;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut values: Vec<f32> = (0..2 * 4 * tags)
            .map(|_| rng.random_range(-4.0f32..4.0))
            .collect();
        let make =
            |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [2, 4, 5]), &device);
        let (sum, count) = host_cross_entropy(&values, &batch, tags);
        assert_eq!(count, 6);
        let mean: f32 = masked_cross_entropy(make(&values), &batch).into_scalar();
        let total: f32 = masked_cross_entropy_sum(make(&values), &batch).into_scalar();
        assert!(
            (f64::from(mean) - sum / 6.0).abs() < 1e-5,
            "{mean} vs {}",
            sum / 6.0
        );
        assert!((f64::from(total) - sum).abs() < 1e-4, "{total} vs {sum}");
        // Padding positions (sentence 1, positions 2 and 3) do not count.
        for v in &mut values[(4 + 2) * tags..] {
            *v = 1000.0;
        }
        values[(4 + 3) * tags + 1] = -1000.0;
        let mean2: f32 = masked_cross_entropy(make(&values), &batch).into_scalar();
        assert_eq!(mean, mean2);
        // A hand value: uniform logits give ln(tags) per position.
        let zeros = vec![0f32; 2 * 4 * tags];
        let uniform: f32 = masked_cross_entropy(make(&zeros), &batch).into_scalar();
        assert!((uniform - 5f32.ln()).abs() < 1e-6, "{uniform}");
    }

    #[test]
    fn accuracy_counts_hand_made_logits() {
        let device = Device::flex();
        // Sentence 0: ROOT + 2 words; sentence 1: ROOT + 1 word (+1 padding).
        let batch = Batch::new(&[(&[ROOT, 4, 5], &[ROOT, 3, 4]), (&[ROOT, 7], &[ROOT, 1])]);
        let tags = 5;
        let row = |best: usize| {
            let mut r = vec![0f32; tags];
            r[best] = 1.0;
            r
        };
        let mut v = Vec::new();
        v.extend(row(2)); // ROOT correct
        v.extend(row(3)); // correct
        v.extend(row(1)); // wrong (target 4)
        v.extend(row(0)); // ROOT wrong
        v.extend(vec![0.5f32; tags]); // all tied: argmax 0, target 1: wrong
        v.extend(row(3)); // padding: ignored
        let logits = Tensor::<3>::from_data(TensorData::new(v.clone(), [2, 3, tags]), &device);
        let acc = accuracy(logits, &batch);
        assert_eq!(
            acc,
            Accuracy {
                correct: 2,
                total: 5,
                correct_words: 1,
                total_words: 3
            }
        );
        assert!((acc.fraction() - 0.4).abs() < 1e-12);
        assert!((acc.word_fraction() - 1.0 / 3.0).abs() < 1e-12);
        // Ties go to the lowest id: a tie between tags 1 and 4 predicts 1 (correct).
        v[4 * tags + 1] = 0.9;
        v[4 * tags + 4] = 0.9;
        let logits = Tensor::<3>::from_data(TensorData::new(v, [2, 3, tags]), &device);
        let acc2 = accuracy(logits, &batch);
        assert_eq!((acc2.correct, acc2.correct_words), (3, 2));
        let mut sum = acc;
        sum.add(acc2);
        assert_eq!(
            sum,
            Accuracy {
                correct: 5,
                total: 10,
                correct_words: 3,
                total_words: 6
            }
        );
        assert_eq!(Accuracy::default().fraction(), 0.0);
    }

    #[test]
    fn sinusoidal_encoding_matches_the_formula() {
        let width = 8;
        let pe = position_encoding(5, width);
        assert_eq!(pe.len(), 40);
        // Position 0: sin 0 = 0 on even dims, cos 0 = 1 on odd dims.
        assert_eq!(&pe[..8], &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        // Position 1, dims 0/1: sin 1, cos 1.
        assert!((pe[8] - 0.841_470_96).abs() < 1e-7);
        assert!((pe[9] - 0.540_302_3).abs() < 1e-7);
        // Position 3, dims 2/3: frequency 10000^(-2/8) = 0.1, angle 0.3.
        assert!((pe[3 * 8 + 2] - 0.295_520_2).abs() < 1e-7);
        assert!((pe[3 * 8 + 3] - 0.955_336_5).abs() < 1e-7);
        // General formula at a few positions.
        for pos in [1usize, 2, 4] {
            for i in 0..width / 2 {
                let angle = pos as f64 / 10000f64.powf(2.0 * i as f64 / width as f64);
                assert!((f64::from(pe[pos * width + 2 * i]) - angle.sin()).abs() < 1e-6);
                assert!((f64::from(pe[pos * width + 2 * i + 1]) - angle.cos()).abs() < 1e-6);
            }
        }
        // Odd widths keep the last sine.
        let odd = position_encoding(2, 3);
        assert!((odd[3 + 2] - (1.0f64 / 10000f64.powf(2.0 / 3.0)).sin() as f32).abs() < 1e-7);
    }

    #[test]
    fn dropout_masks_are_reproducible() {
        let p = 0.3;
        let a = DropoutRng::new(7, 3).mask_values(10_000, p);
        let b = DropoutRng::new(7, 3).mask_values(10_000, p);
        let c = DropoutRng::new(7, 4).mask_values(10_000, p);
        let d = DropoutRng::new(8, 3).mask_values(10_000, p);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        let scale = (1.0 / 0.7f64) as f32;
        assert!(a.iter().all(|&m| m == 0.0 || m == scale));
        let many = DropoutRng::new(1, 0).mask_values(200_000, p);
        let kept = many.iter().filter(|&&m| m != 0.0).count() as f64 / 200_000.0;
        assert!((kept - 0.7).abs() < 0.005, "{kept}");
        // Not the initialization stream of the same seed.
        let mut init = ChaCha8Rng::seed_from_u64(7);
        let mut drop = DropoutRng::new(7, 0);
        assert_ne!(init.next_u32(), drop.rng.next_u32());
        // A mask tensor has the shape asked for and the same values.
        let t = DropoutRng::new(7, 3).mask([2, 5, 1000], p, &Device::flex());
        assert_eq!(t.dims(), [2, 5, 1000]);
        assert_eq!(to_vec(t), a);
    }

    #[test]
    fn dropout_in_forward_is_seeded_and_eval_is_deterministic() {
        let model = Tagger::new(&tiny(2, 0.3), 1, &Device::flex());
        let batch = Batch::new(&[
            (&[ROOT, 4, 5, 6], &[ROOT, 3, 4, 1]),
            (&[ROOT, 7], &[ROOT, 4]),
        ]);
        let eval1 = logits_vec(&model, &batch, None);
        let eval2 = logits_vec(&model, &batch, None);
        assert_eq!(eval1, eval2);
        let train1 = logits_vec(&model, &batch, Some(&mut DropoutRng::new(9, 2)));
        let train2 = logits_vec(&model, &batch, Some(&mut DropoutRng::new(9, 2)));
        let train3 = logits_vec(&model, &batch, Some(&mut DropoutRng::new(9, 3)));
        assert_eq!(train1, train2);
        assert_ne!(train1, train3);
        assert_ne!(train1, eval1);
        // A zero rate ignores the stream.
        let model0 = Tagger::new(&tiny(2, 0.0), 1, &Device::flex());
        let plain = logits_vec(&model0, &batch, None);
        let with_rng = logits_vec(&model0, &batch, Some(&mut DropoutRng::new(9, 2)));
        assert_eq!(plain, with_rng);
    }

    #[test]
    fn sgd_steps_lower_the_loss() {
        let device = Device::flex().autodiff();
        // Dropout 0.1 during training (through the masks' backward), none for the measurement.
        let mut model = Tagger::new(&tiny(1, 0.1), 4, &device);
        let batch = Batch::new(&[
            (&[ROOT, 4, 5, 6, 7], &[ROOT, 3, 4, 1, 3]),
            (&[ROOT, 8, 9], &[ROOT, 4, 4]),
            (&[ROOT, 10, 3, 4], &[ROOT, 1, 3, 3]),
        ]);
        let mut optim = burn::optim::SgdConfig::new().init();
        let loss_of = |m: &Tagger| -> f32 {
            masked_cross_entropy(m.forward(&batch, None, &device), &batch).into_scalar()
        };
        let before = loss_of(&model);
        for step in 0..20 {
            let mut rng = DropoutRng::new(0, step);
            let loss = masked_cross_entropy(model.forward(&batch, Some(&mut rng), &device), &batch);
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(0.1, model, grads);
        }
        let after = loss_of(&model);
        assert!(after.is_finite());
        assert!(after < 0.7 * before, "{before} -> {after}");
    }

    /// Autodiff gradients (through ELU, attention with masked keys, LayerNorm, embedding)
    /// match central differences of the f32 loss; the PAD embedding row gets exactly zero.
    #[test]
    fn gradients_match_finite_differences() {
        let dims = tiny(2, 0.3);
        let seed = 11;
        let batch = Batch::new(&[
            (&[ROOT, 4, 5, 6, 7], &[ROOT, 3, 4, 1, 3]),
            (&[ROOT, 8], &[ROOT, 4]),
        ]);
        let ad = Device::flex().autodiff();
        let model = Tagger::new(&dims, seed, &ad);
        let loss = masked_cross_entropy(model.forward(&batch, None, &ad), &batch);
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
        let grad = |id| to_vec(grads.get::<2>(id).expect("a gradient"));
        let g_mlp = grad(model.layers[0].mlp_in.weight.id);
        let g_query = grad(model.layers[1].query.weight.id);
        let g_emb = grad(model.embedding.weight.id);
        let width = dims.width;
        assert!(g_emb[..width].iter().all(|&g| g == 0.0), "PAD row");
        assert!(g_emb[4 * width..5 * width].iter().any(|&g| g != 0.0));

        let device = Device::flex();
        type Pick = fn(&mut Tagger) -> &mut Param<Tensor<2>>;
        let loss_with = |pick: Pick, index: usize, delta: f32| -> f64 {
            let mut m = Tagger::new(&dims, seed, &device);
            let param = pick(&mut m);
            let [rows, cols] = param.dims();
            let mut values = to_vec(param.val());
            values[index] += delta;
            *param = Param::from_tensor(Tensor::<2>::from_data(
                TensorData::new(values, [rows, cols]),
                &device,
            ));
            let l: f32 =
                masked_cross_entropy(m.forward(&batch, None, &device), &batch).into_scalar();
            f64::from(l)
        };
        let checks: [(Pick, &[f32], usize); 3] = [
            (|m| &mut m.layers[0].mlp_in.weight, &g_mlp, 5),
            (|m| &mut m.layers[1].query.weight, &g_query, 9),
            (|m| &mut m.embedding.weight, &g_emb, 4 * width + 3),
        ];
        let h = 1e-2;
        for (pick, g, index) in checks {
            let numeric =
                (loss_with(pick, index, h) - loss_with(pick, index, -h)) / (2.0 * f64::from(h));
            let analytic = f64::from(g[index]);
            assert!(
                (numeric - analytic).abs() < 1e-3 + 2e-2 * analytic.abs(),
                "index {index}: numeric {numeric} vs autodiff {analytic}"
            );
            assert!(
                analytic.abs() > 1e-4,
                "a gradient worth checking: {analytic}"
            );
        }
    }

    #[test]
    fn seed_determines_the_parameters() {
        let device = Device::flex();
        let a = Tagger::new(&tiny(2, 0.3), 7, &device);
        let b = Tagger::new(&tiny(2, 0.3), 7, &device);
        let c = Tagger::new(&tiny(2, 0.3), 8, &device);
        assert_eq!(a.params_sha256(), b.params_sha256());
        assert_ne!(a.params_sha256(), c.params_sha256());
        assert_eq!(a.params_sha256().len(), 64);
    }
}
