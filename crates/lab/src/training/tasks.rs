//! The two workloads of `precond train`: what the one training loop ([`crate::training::run`]) needs to
//! know about a task — its data, model, batches, loss and evaluation. The loop itself (schedule,
//! optimizer steps, timing, checkpoints, outputs) is shared.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::data::conllu::{self, ConlluError, Encoded, TagColumn, Vocab};
use crate::data::mnist::{self, Mnist, Split, PIXELS};
use crate::models::autoencoder::{sigmoid_cross_entropy, sigmoid_cross_entropy_sum, Autoencoder};
use crate::models::tagger::{self, Accuracy, Batch, DropoutRng, Tagger, TaggerDims};
use crate::training::config::{EmbeddingRule, TagChoice, TrainConfig, TrainError};
use crate::training::optimizers::{
    build_optimizer_for, build_optimizer_with, takes_every_shape, BuiltOptimizer, OptimizerError,
    OptimizerHparams,
};

/// What an evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss per example (autoencoder: per image; tagger: per token, ROOT included).
    pub loss: f64,
    /// Tagger only: token accuracy (padding excluded).
    pub accuracy: Option<Accuracy>,
}

/// A task the training loop can run.
pub trait Workload {
    type Model: Module;
    /// The initial model of a run (seeded).
    fn model(&self, seed: u64, device: &Device) -> Self::Model;
    /// The optimizer of `h` for `model`, with the task's per-parameter rules.
    fn optimizer(
        &self,
        h: &OptimizerHparams,
        model: &Self::Model,
    ) -> Result<BuiltOptimizer, OptimizerError>;
    /// Training examples (images or sentences).
    fn train_len(&self) -> usize;
    /// One line saying what is trained on what.
    fn describe(&self) -> String;
    /// The batches of one epoch, as indices into the training set, drawn from `rng`: exactly
    /// `train_len().div_ceil(batch_size)` of them.
    fn epoch_batches(&self, rng: &mut ChaCha8Rng, batch_size: usize) -> Vec<Vec<usize>>;
    /// The mean training loss of the batch `idx` at (1-based) optimizer step `step`, on the
    /// autodiff `device`.
    fn train_loss(
        &self,
        model: &Self::Model,
        idx: &[usize],
        step: u64,
        device: &Device,
    ) -> Tensor<1>;
    /// Evaluation after every epoch (autoencoder: the MNIST test set; tagger: `--eval`).
    fn evaluate(&self, model: &Self::Model, batch_size: usize) -> Evaluation;
    /// The final evaluation of a completed run, where the task has one (tagger: `--test`).
    fn test(&self, model: &Self::Model, batch_size: usize) -> Option<Evaluation>;
    /// SHA-256 of the parameters, in a fixed order.
    fn params_sha256(&self, model: &Self::Model) -> String;
}

/// Shuffled batches of consecutive examples: the autoencoder's epoch.
fn shuffled_batches(n: usize, rng: &mut ChaCha8Rng, batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The MNIST autoencoder.

/// The autoencoder on MNIST.
pub struct AutoencoderTask {
    pub data: Mnist,
}

impl AutoencoderTask {
    /// Loads the data the config names.
    pub fn load(config: &TrainConfig) -> Result<Self, TrainError> {
        Ok(Self {
            data: mnist::load(&config.data, config.limit, config.test_limit)?,
        })
    }
}

/// The examples `idx` of `split` as a `[len, 784]` tensor.
fn gather(split: &Split, idx: &[usize], device: &Device) -> Tensor<2> {
    let mut buf = Vec::with_capacity(idx.len() * PIXELS);
    for &i in idx {
        buf.extend_from_slice(split.image(i));
    }
    Tensor::from_data(TensorData::new(buf, [idx.len(), PIXELS]), device)
}

/// Mean loss over `split`, in batches of `bs`, without autodiff.
pub fn eval_loss(model: &Autoencoder, split: &Split, bs: usize) -> f64 {
    let model = model.valid();
    let device = Device::flex();
    let idx: Vec<usize> = (0..split.n).collect();
    let mut sum = 0.0f64;
    for chunk in idx.chunks(bs.max(1)) {
        let batch = gather(split, chunk, &device);
        let logits = model.forward(batch.clone());
        sum += f64::from(sigmoid_cross_entropy_sum(logits, batch).into_scalar::<f32>());
    }
    sum / split.n.max(1) as f64
}

impl Workload for AutoencoderTask {
    type Model = Autoencoder;

    fn model(&self, seed: u64, device: &Device) -> Autoencoder {
        Autoencoder::new(seed, device)
    }

    fn optimizer(
        &self,
        h: &OptimizerHparams,
        model: &Autoencoder,
    ) -> Result<BuiltOptimizer, OptimizerError> {
        build_optimizer_for(h, model)
    }

    fn train_len(&self) -> usize {
        self.data.train.n
    }

    fn describe(&self) -> String {
        format!("{} images ({} test)", self.data.train.n, self.data.test.n)
    }

    fn epoch_batches(&self, rng: &mut ChaCha8Rng, batch_size: usize) -> Vec<Vec<usize>> {
        shuffled_batches(self.data.train.n, rng, batch_size)
    }

    fn train_loss(&self, model: &Autoencoder, idx: &[usize], _: u64, device: &Device) -> Tensor<1> {
        let batch = gather(&self.data.train, idx, device);
        sigmoid_cross_entropy(model.forward(batch.clone()), batch)
    }

    fn evaluate(&self, model: &Autoencoder, batch_size: usize) -> Evaluation {
        Evaluation {
            loss: eval_loss(model, &self.data.test, batch_size),
            accuracy: None,
        }
    }

    fn test(&self, _: &Autoencoder, _: usize) -> Option<Evaluation> {
        None
    }

    fn params_sha256(&self, model: &Autoencoder) -> String {
        model.params_sha256()
    }
}

// ---------------------------------------------------------------------------------------------
// The Transformer tagger.

/// The tagger on a CoNLL-U treebank.
pub struct TaggerTask {
    pub words: Vocab,
    pub tags: Vocab,
    pub column: TagColumn,
    pub dims: TaggerDims,
    pub embedding: EmbeddingRule,
    pub seed: u64,
    pub train: Vec<Encoded>,
    pub eval: Vec<Encoded>,
    pub test: Option<Vec<Encoded>>,
}

impl TaggerTask {
    /// Reads the treebank files of `config`, builds the vocabularies from the training file and
    /// encodes every split.
    pub fn load(config: &TrainConfig) -> Result<Self, TrainError> {
        let tc = config
            .tagger
            .as_ref()
            .ok_or_else(|| TrainError::Setting("not a tagger run".into()))?;
        let mut train = conllu::read(&tc.train)?;
        if let Some(n) = config.limit {
            train.truncate(n);
        }
        let limit = |mut v: Vec<conllu::Sentence>| {
            if let Some(n) = config.test_limit {
                v.truncate(n);
            }
            v
        };
        let eval = limit(conllu::read(&tc.eval)?);
        let test = match &tc.test {
            Some(path) => Some(limit(conllu::read(path)?)),
            None => None,
        };
        let column = match tc.tag {
            TagChoice::Xpos => TagColumn::Xpos,
            TagChoice::Upos => TagColumn::Upos,
            TagChoice::Auto if conllu::has_tags(&train, TagColumn::Xpos) => TagColumn::Xpos,
            TagChoice::Auto => TagColumn::Upos,
        };
        if !conllu::has_tags(&train, column) {
            return Err(ConlluError::NoTags {
                path: tc.train.clone(),
                column,
            }
            .into());
        }
        let words = Vocab::words(&train, tc.min_count);
        let tags = Vocab::tags(&train, column);
        let dims = TaggerDims {
            vocab: words.len(),
            tags: tags.len(),
            layers: tc.layers,
            width: tc.width,
            mlp: tc.mlp,
            heads: tc.heads,
            dropout: tc.dropout,
        };
        dims.check().map_err(TrainError::Setting)?;
        let encode = |s: &[conllu::Sentence]| conllu::encode(s, &words, &tags, column);
        Ok(Self {
            train: encode(&train),
            eval: encode(&eval),
            test: test.as_deref().map(encode),
            words,
            tags,
            column,
            dims,
            embedding: tc.embedding,
            seed: config.seed,
        })
    }

    fn batch(sentences: &[Encoded], idx: &[usize]) -> Batch {
        let rows: Vec<(&[u32], &[u32])> = idx
            .iter()
            .map(|&i| (&sentences[i].tokens[..], &sentences[i].tags[..]))
            .collect();
        Batch::new(&rows)
    }

    /// Loss and accuracy over `sentences` without dropout, in batches of similar lengths.
    fn evaluate_on(&self, model: &Tagger, sentences: &[Encoded], batch_size: usize) -> Evaluation {
        let model = model.valid();
        let device = Device::flex();
        let mut order: Vec<usize> = (0..sentences.len()).collect();
        order.sort_by_key(|&i| sentences[i].tokens.len());
        let (mut loss, mut acc) = (0.0f64, Accuracy::default());
        for idx in order.chunks(batch_size.max(1)) {
            let batch = Self::batch(sentences, idx);
            let logits = model.forward(&batch, None, &device);
            acc.add(tagger::accuracy(logits.clone(), &batch));
            loss +=
                f64::from(tagger::masked_cross_entropy_sum(logits, &batch).into_scalar::<f32>());
        }
        Evaluation {
            loss: loss / acc.total.max(1) as f64,
            accuracy: Some(acc),
        }
    }
}

impl Workload for TaggerTask {
    type Model = Tagger;

    fn model(&self, seed: u64, device: &Device) -> Tagger {
        Tagger::new(&self.dims, seed, device)
    }

    /// The embedding table is never preconditioned by the methods that precondition matrices
    /// ([`EmbeddingRule`]); LayerNorm scales and biases (1-D) take the grafting direction; every
    /// 2-D weight (q, k, v and the attention output as four separate `[width, width]` matrices,
    /// the two MLP matrices, the output layer) is preconditioned with one block per output
    /// neuron. A method that takes every shape and has no grafting (Block Adam, SOAP) takes the
    /// embedding table too under the default rule: its "grafting direction" would be the raw
    /// gradient, SGD without momentum at an Adam-scale rate, which leaves the table all but
    /// frozen (SOAP's tagger runs before 2026-12-03's fourth session: 60.17%).
    fn optimizer(
        &self,
        h: &OptimizerHparams,
        model: &Tagger,
    ) -> Result<BuiltOptimizer, OptimizerError> {
        let own = self.embedding == EmbeddingRule::Graft && takes_every_shape(h)?;
        let excluded = [(model.embedding.weight.id, self.embedding.fallback())];
        build_optimizer_with(h, model, if own { &[] } else { &excluded })
    }

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn describe(&self) -> String {
        let words = |s: &[Encoded]| s.iter().map(|e| e.tokens.len() - 1).sum::<usize>();
        let tags: Vec<&str> = (conllu::ROOT + 1..self.tags.len() as u32)
            .filter_map(|id| self.tags.name(id))
            .collect();
        format!(
            "{} sentences, {} words ({} eval sentences); {} {} tags ({}); vocabulary {}; {} \
             layers, width {}, MLP {}, {} heads",
            self.train.len(),
            words(&self.train),
            self.eval.len(),
            tags.len(),
            self.column,
            tags.join(" "),
            self.words.len(),
            self.dims.layers,
            self.dims.width,
            self.dims.mlp,
            self.dims.heads
        )
    }

    /// Bucketed by length: the sentences in a random order, stably sorted by length (so equal
    /// lengths stay random), cut into batches, and the batches shuffled.
    fn epoch_batches(&self, rng: &mut ChaCha8Rng, batch_size: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        order.shuffle(rng);
        order.sort_by_key(|&i| self.train[i].tokens.len());
        let mut batches: Vec<Vec<usize>> = order
            .chunks(batch_size.max(1))
            .map(<[usize]>::to_vec)
            .collect();
        batches.shuffle(rng);
        batches
    }

    fn train_loss(&self, model: &Tagger, idx: &[usize], step: u64, device: &Device) -> Tensor<1> {
        let batch = Self::batch(&self.train, idx);
        let mut dropout = DropoutRng::new(self.seed, step);
        let logits = model.forward(&batch, Some(&mut dropout), device);
        tagger::masked_cross_entropy(logits, &batch)
    }

    fn evaluate(&self, model: &Tagger, batch_size: usize) -> Evaluation {
        self.evaluate_on(model, &self.eval, batch_size)
    }

    fn test(&self, model: &Tagger, batch_size: usize) -> Option<Evaluation> {
        self.test
            .as_ref()
            .map(|t| self.evaluate_on(model, t, batch_size))
    }

    fn params_sha256(&self, model: &Tagger) -> String {
        model.params_sha256()
    }
}
