//! `precond analyze`: the evidence behind the shared-basis method, measured on the user's own
//! models and data (the paper's Figures 1–2, Lemma 1, Appendix 6.3 and 6.10, Theorems 1–2).
//!
//! Every subcommand writes CSV (or JSON) and PNG + SVG plots into `--out DIR` and accepts
//! `--quick`, a small configuration that finishes in about a minute on 2 cores (used by tests).
//!
//! This module holds what the analyses share: where the model comes from ([`ModelArgs`] →
//! [`Loaded`]: a run directory of `precond train`, or a brief Adam run trained here), the dense
//! layers of a model, gradients of those layers as `d_in × d_out` f64 matrices (column i is block
//! i, NOTES §1) at a fixed θ or along a training trajectory, and CSV output. Plots are in
//! [`plot`].

pub mod ablate;
pub mod blocks;
pub mod direction;
pub mod eigensolver;
pub mod features;
pub mod plot;
pub mod regret;
pub mod sharing;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device, Tensor};
use clap::Subcommand;
use faer::Mat;
use precond::burn_adapter::param_names;
use precond::PrecondError;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::models::autoencoder::Autoencoder;
use crate::models::tagger::Tagger;
use crate::training::optimizers::OptimizerHparams;
use crate::training::tasks::{AutoencoderTask, TaggerTask, Workload};
use crate::training::{self, TaggerSettings, TrainArgs, TrainConfig, TrainError, TrainSettings};

/// `precond analyze` subcommands.
#[derive(Debug, Subcommand)]
pub enum AnalyzeTask {
    /// One layer's gradient second moment H in both orderings (paper Figure 1) and Lemma 1's
    /// diagonal- vs off-diagonal-block Frobenius mass
    Blocks(blocks::BlocksArgs),
    /// Singular values of each layer's input over 1,024 samples (paper Figure 2)
    Features(features::FeaturesArgs),
    /// Error of shared vs independent low-rank bases, Sketchy and Block Adam on real gradient
    /// streams, for several ranks (paper Appendix 6.3)
    Sharing(sharing::SharingArgs),
    /// Rank, oversampling and power iterations of the randomized SVD on the autoencoder:
    /// loss, optimizer time, state bytes (paper Appendix 6.10)
    Ablate(ablate::AblateArgs),
    /// Regret of diagonal, block-diagonal, shared-basis and full-matrix Adagrad on an online
    /// convex problem, with Theorem 2's two sides (paper Theorems 1–2)
    Regret(regret::RegretArgs),
    /// Each lost-mass policy's direction against exact block Adagrad: ridge ρ_i over λ_max(R_i),
    /// eigenvalues above the ridge, captured energy and cosines on real gradient streams
    Direction(direction::DirectionArgs),
    /// The batched block eigensolver against faer's on real gradient streams: relative
    /// difference of shared-basis' and Block Adam's directions per step
    Eigensolver(eigensolver::EigensolverArgs),
}

/// Why an analysis could not run.
#[derive(Debug, Error)]
pub enum AnalyzeError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Precond(#[from] PrecondError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
}

/// Runs one `precond analyze` subcommand.
pub fn command(task: &AnalyzeTask, stop: &AtomicBool) -> Result<(), AnalyzeError> {
    match task {
        AnalyzeTask::Blocks(args) => blocks::run(args, stop),
        AnalyzeTask::Features(args) => features::run(args, stop),
        AnalyzeTask::Sharing(args) => sharing::run(args, stop),
        AnalyzeTask::Ablate(args) => ablate::run(args, stop),
        AnalyzeTask::Regret(args) => regret::run(args, stop),
        AnalyzeTask::Direction(args) => direction::run(args, stop),
        AnalyzeTask::Eigensolver(args) => eigensolver::run(args, stop),
    }
}

/// An I/O error naming its path.
pub fn io_err(path: &Path) -> impl Fn(std::io::Error) -> AnalyzeError + '_ {
    move |source| AnalyzeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and its parents).
pub fn create_dir(dir: &Path) -> Result<(), AnalyzeError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

/// Writes a CSV file: the header, then one line per row (cells are written as given; none may
/// hold a comma).
pub fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<(), AnalyzeError> {
    let mut text = header.join(",");
    text.push('\n');
    for row in rows {
        if let Some(cell) = row.iter().find(|c| c.contains(',') || c.contains('\n')) {
            return Err(AnalyzeError::Invalid(format!(
                "{}: CSV cell {cell:?} holds a separator",
                path.display()
            )));
        }
        text.push_str(&row.join(","));
        text.push('\n');
    }
    fs::write(path, text).map_err(io_err(path))
}

/// Writes pretty JSON.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), AnalyzeError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| AnalyzeError::Invalid(format!("{}: {e}", path.display())))?;
    fs::write(path, text + "\n").map_err(io_err(path))
}

/// Which model an analysis studies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TaskKind {
    /// The MNIST autoencoder
    #[default]
    Autoencoder,
    /// The Transformer POS tagger
    Tagger,
}

/// Where the model analysed comes from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModelArgs {
    /// The model: autoencoder or tagger (ignored with --run, whose checkpoint says which)
    #[arg(long, value_enum, default_value_t = TaskKind::Autoencoder)]
    pub task: TaskKind,
    /// A run directory of `precond train` whose checkpoint gives the parameters, the data and the
    /// model's settings [default: train one briefly with Adam into OUT/model, or reuse it]
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,
    /// Without --run: the data (autoencoder: MNIST directory; tagger: CoNLL-U training file)
    /// [default: as `precond train`]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Without --run: epochs of the brief Adam run [default: 1]
    #[arg(long)]
    pub train_epochs: Option<usize>,
    /// Without --run: use only the first N training examples [--quick: 2000 images / 200
    /// sentences]
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the brief run and of the analysis' sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A model at fixed parameters θ with its task (data, loss). One value per command: the size
/// difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    Autoencoder {
        work: AutoencoderTask,
        model: Autoencoder,
        config: TrainConfig,
    },
    Tagger {
        work: Box<TaggerTask>,
        model: Tagger,
        config: TrainConfig,
    },
}

/// A dense layer: a 2-D weight `[d_in, d_out]` (the tagger's embedding table is not one).
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Module path, e.g. `layers.3.weight`.
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    id: ParamId,
}

/// The 2-D weights of `model` in visiting order, except embedding tables.
fn dense_layers<M: Module>(model: &M) -> Vec<Layer> {
    struct Shapes(Vec<(ParamId, [usize; 2])>);
    impl ModuleVisitor for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dims = param.val().dims();
            if D == 2 {
                self.0.push((param.id, [dims[0], dims[1]]));
            }
        }
    }
    let mut shapes = Shapes(Vec::new());
    model.visit(&mut shapes);
    let names = param_names(model);
    shapes
        .0
        .into_iter()
        .filter_map(|(id, [d_in, d_out])| {
            let name = names
                .iter()
                .find(|(i, _)| *i == id)
                .map_or_else(|| format!("{id}"), |(_, n)| n.clone());
            (!name.contains("embedding")).then_some(Layer {
                name,
                d_in,
                d_out,
                id,
            })
        })
        .collect()
}

/// A `[rows, cols]` row-major f32 buffer as an f64 matrix.
pub fn to_mat(values: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |r, c| f64::from(values[r * cols + c]))
}

/// The gradients of `layers` of the loss on batch `idx` at `model`'s parameters.
fn grads_of<W: Workload>(
    work: &W,
    model: &W::Model,
    layers: &[Layer],
    idx: &[usize],
    step: u64,
    device: &Device,
) -> (Vec<Mat<f64>>, GradientsParams) {
    let loss = work.train_loss(model, idx, step, device);
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mats = layers
        .iter()
        .map(|l| {
            grads
                .get::<2>(l.id)
                .and_then(|g| g.try_into_vec_as::<f32>().ok())
                .map_or_else(
                    || Mat::zeros(l.d_in, l.d_out),
                    |v| to_mat(&v, l.d_in, l.d_out),
                )
        })
        .collect();
    (mats, grads)
}

/// `n` batches of `batch_size` examples drawn without replacement within a batch (seeded).
fn sample_batches(len: usize, n: usize, batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    use rand::seq::index::sample;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = batch_size.min(len);
    (0..n)
        .map(|_| sample(&mut rng, len, size).into_vec())
        .collect()
}

fn gradient_samples<W: Workload>(
    work: &W,
    model: &W::Model,
    layers: &[Layer],
    batches: usize,
    batch_size: usize,
    seed: u64,
) -> Vec<Vec<Mat<f64>>> {
    let device = Device::flex().autodiff();
    sample_batches(work.train_len(), batches, batch_size, seed)
        .iter()
        .enumerate()
        .map(|(i, idx)| grads_of(work, model, layers, idx, i as u64 + 1, &device).0)
        .collect()
}

fn gradient_stream<W: Workload>(
    work: &W,
    model: &W::Model,
    layers: &[Layer],
    steps: usize,
    batch_size: usize,
    seed: u64,
) -> Result<Vec<Vec<Mat<f64>>>, AnalyzeError> {
    let device = Device::flex().autodiff();
    let h = OptimizerHparams::preset("adam").map_err(TrainError::from)?;
    let mut model = model.clone();
    let mut built = work.optimizer(&h, &model).map_err(TrainError::from)?;
    let mut out = Vec::with_capacity(steps);
    for (i, idx) in sample_batches(work.train_len(), steps, batch_size, seed)
        .iter()
        .enumerate()
    {
        let (mats, grads) = grads_of(work, &model, layers, idx, i as u64 + 1, &device);
        model = built.optim.step(h.lr, model, grads);
        out.push(mats);
    }
    Ok(out)
}

impl Loaded {
    /// The model of `args.run`, or of a brief Adam run trained into `out/model` (reused when it
    /// is already there).
    pub fn open(args: &ModelArgs, quick: bool, out: &Path) -> Result<Loaded, AnalyzeError> {
        let dir = match &args.run {
            Some(dir) => dir.clone(),
            None => {
                let dir = out.join("model");
                if !dir.join(training::CHECKPOINT).is_file() {
                    brief_run(args, quick, &dir)?;
                } else {
                    eprintln!("analyze: reusing the model in {}", dir.display());
                }
                dir
            }
        };
        let (config, bytes) = training::load_run(&dir)?;
        let device = Device::flex().autodiff();
        let record = |bytes: Vec<u8>| {
            ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
                .map_err(|e| AnalyzeError::Invalid(format!("{}: model record: {e}", dir.display())))
        };
        let bad =
            |e: String| AnalyzeError::Invalid(format!("{}: model record: {e}", dir.display()));
        Ok(if config.tagger.is_some() {
            let work = TaggerTask::load(&config)?;
            let model = work
                .model(config.seed, &device)
                .try_load_record(record(bytes)?)
                .map_err(|e| bad(e.to_string()))?;
            Loaded::Tagger {
                work: Box::new(work),
                model,
                config,
            }
        } else {
            let work = AutoencoderTask::load(&config)?;
            let model = work
                .model(config.seed, &device)
                .try_load_record(record(bytes)?)
                .map_err(|e| bad(e.to_string()))?;
            Loaded::Autoencoder {
                work,
                model,
                config,
            }
        })
    }

    /// The config of the run the model comes from.
    pub fn config(&self) -> &TrainConfig {
        match self {
            Loaded::Autoencoder { config, .. } | Loaded::Tagger { config, .. } => config,
        }
    }

    /// The dense layers (2-D weights `[d_in, d_out]`; one block per output neuron).
    pub fn layers(&self) -> Vec<Layer> {
        match self {
            Loaded::Autoencoder { model, .. } => dense_layers(model),
            Loaded::Tagger { model, .. } => dense_layers(model),
        }
    }

    /// The layer named `name`, or an error listing the names.
    pub fn layer(&self, name: &str) -> Result<Layer, AnalyzeError> {
        let layers = self.layers();
        layers
            .iter()
            .find(|l| l.name == name)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
                AnalyzeError::Invalid(format!(
                    "no dense layer {name:?}; the model's are: {}",
                    names.join(", ")
                ))
            })
    }

    /// Training examples (images or sentences).
    pub fn train_len(&self) -> usize {
        match self {
            Loaded::Autoencoder { work, .. } => work.train_len(),
            Loaded::Tagger { work, .. } => work.train_len(),
        }
    }

    /// Gradients of `layers` at the fixed parameters θ, one per mini-batch of `batch_size`
    /// examples drawn (seeded) from the training set: `[batch][layer]`, each `d_in × d_out`.
    /// The tagger's dropout is on, as in training (masks keyed by the batch number).
    pub fn gradients(
        &self,
        layers: &[Layer],
        batches: usize,
        batch_size: usize,
        seed: u64,
    ) -> Vec<Vec<Mat<f64>>> {
        match self {
            Loaded::Autoencoder { work, model, .. } => {
                gradient_samples(work, model, layers, batches, batch_size, seed)
            }
            Loaded::Tagger { work, model, .. } => {
                gradient_samples(work.as_ref(), model, layers, batches, batch_size, seed)
            }
        }
    }

    /// Gradients of `layers` along `steps` Adam steps (burn's Adam at its preset) from θ: the
    /// gradient stream g_1..g_T an optimizer would see, `[step][layer]`. `self` is unchanged.
    pub fn gradient_stream(
        &self,
        layers: &[Layer],
        steps: usize,
        batch_size: usize,
        seed: u64,
    ) -> Result<Vec<Vec<Mat<f64>>>, AnalyzeError> {
        match self {
            Loaded::Autoencoder { work, model, .. } => {
                gradient_stream(work, model, layers, steps, batch_size, seed)
            }
            Loaded::Tagger { work, model, .. } => {
                gradient_stream(work.as_ref(), model, layers, steps, batch_size, seed)
            }
        }
    }
}

/// Bytes of recorded gradients (f64) held at once: layers are streamed in groups under this,
/// each group re-running the same seeded T Adam steps from θ.
pub const STREAM_BUDGET_BYTES: usize = 1 << 30;

/// The layers studied: `names` in the order given, or all dense layers (--quick: the two with
/// the fewest weights, in model order). `command` names the subcommand in errors.
pub fn select_layers(
    command: &str,
    loaded: &Loaded,
    names: &[String],
    quick: bool,
) -> Result<Vec<Layer>, AnalyzeError> {
    if !names.is_empty() {
        let mut layers: Vec<Layer> = Vec::with_capacity(names.len());
        for name in names {
            let layer = loaded.layer(name.trim())?;
            if layers.iter().any(|l| l.name == layer.name) {
                return Err(AnalyzeError::Invalid(format!(
                    "analyze {command}: --layers names {:?} twice",
                    layer.name
                )));
            }
            layers.push(layer);
        }
        return Ok(layers);
    }
    let all = loaded.layers();
    if all.is_empty() {
        return Err(AnalyzeError::Invalid(format!(
            "analyze {command}: the model has no dense layer"
        )));
    }
    if !quick {
        return Ok(all);
    }
    let mut by_size: Vec<usize> = (0..all.len()).collect();
    by_size.sort_by_key(|&i| (all[i].d_in * all[i].d_out, i));
    by_size.truncate(2);
    by_size.sort_unstable();
    Ok(by_size.into_iter().map(|i| all[i].clone()).collect())
}

/// Consecutive groups of layers whose recorded streams (T f64 gradients each) fit
/// [`STREAM_BUDGET_BYTES`] (a larger layer is a group of its own).
pub fn stream_groups(layers: &[Layer], steps: usize) -> Vec<Vec<Layer>> {
    let mut groups: Vec<Vec<Layer>> = Vec::new();
    let mut bytes = 0usize;
    for layer in layers {
        let need = layer.d_in * layer.d_out * steps * std::mem::size_of::<f64>();
        match groups.last_mut() {
            Some(group) if bytes + need <= STREAM_BUDGET_BYTES => {
                group.push(layer.clone());
                bytes += need;
            }
            _ => {
                groups.push(vec![layer.clone()]);
                bytes = need;
            }
        }
    }
    groups
}

/// Records the gradient streams of `layers` (T = `steps` Adam steps of `batch_size` from θ,
/// seeded by `seed`) in groups of [`stream_groups`], and calls `each(layer, stream)` for every
/// layer in order, its stream freed after. Stops early when `stop` is set (before a group or a
/// layer) or when `each` returns `true` (that layer's work was interrupted). Returns whether it
/// stopped early. `command` names the subcommand in the progress lines.
#[allow(clippy::too_many_arguments)] // the stream's settings, the stop flag and the callback
pub fn for_each_layer_stream(
    command: &str,
    loaded: &Loaded,
    layers: &[Layer],
    steps: usize,
    batch_size: usize,
    seed: u64,
    stop: &AtomicBool,
    mut each: impl FnMut(Layer, Vec<Mat<f64>>) -> Result<bool, AnalyzeError>,
) -> Result<bool, AnalyzeError> {
    use std::sync::atomic::Ordering;
    for group in stream_groups(layers, steps) {
        if stop.load(Ordering::SeqCst) {
            return Ok(true);
        }
        let start = std::time::Instant::now();
        let stream = loaded.gradient_stream(&group, steps, batch_size, seed)?;
        eprintln!(
            "analyze {command}: recorded {} step(s) of {} layer(s) in {:.1} s",
            stream.len(),
            group.len(),
            start.elapsed().as_secs_f64()
        );
        let mut per_layer: Vec<Vec<Mat<f64>>> =
            group.iter().map(|_| Vec::with_capacity(steps)).collect();
        for step in stream {
            for (l, g) in step.into_iter().enumerate() {
                per_layer[l].push(g);
            }
        }
        for (layer, layer_stream) in group.into_iter().zip(per_layer) {
            if stop.load(Ordering::SeqCst) || each(layer, layer_stream)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Trains the brief Adam run of `args` into `dir`.
fn brief_run(args: &ModelArgs, quick: bool, dir: &Path) -> Result<(), AnalyzeError> {
    let tagger = args.task == TaskKind::Tagger;
    let limit = args
        .limit
        .or(quick.then_some(if tagger { 200 } else { 2000 }));
    let settings = TrainSettings {
        data: if tagger { None } else { args.data.clone() },
        out: Some(dir.to_path_buf()),
        optimizer: Some("adam".into()),
        epochs: Some(args.train_epochs.unwrap_or(1)),
        seed: Some(args.seed),
        limit,
        test_limit: quick.then_some(if tagger { 50 } else { 500 }),
        ..Default::default()
    };
    let train_args = TrainArgs {
        settings,
        tagger: tagger.then(|| TaggerSettings {
            train: args.data.clone(),
            ..Default::default()
        }),
        config: None,
        resume: None,
    };
    eprintln!(
        "analyze: training the {} briefly with Adam into {}",
        if tagger { "tagger" } else { "autoencoder" },
        dir.display()
    );
    training::run(&train_args, &AtomicBool::new(false))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// MNIST when present (the real files), else a synthetic fixture written into `tmp`.
    pub fn mnist_dir(tmp: &Path) -> PathBuf {
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
        if real.join("train-images-idx3-ubyte.gz").is_file() {
            return real;
        }
        let dir = tmp.join("mnist");
        crate::data::mnist::write_fixture(&dir, 2000, 500, true).unwrap();
        dir
    }

    /// A quick autoencoder model (1 epoch of Adam on 2000 images) trained into `out/model`.
    pub fn quick_autoencoder(tmp: &Path, out: &Path) -> Loaded {
        let args = ModelArgs {
            data: Some(mnist_dir(tmp)),
            ..Default::default()
        };
        Loaded::open(&args, true, out).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn autoencoder_layers_and_gradients() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let loaded = quick_autoencoder(tmp.path(), &out);
        let layers = loaded.layers();
        let shapes: Vec<(usize, usize)> = layers.iter().map(|l| (l.d_in, l.d_out)).collect();
        let widths = crate::models::autoencoder::WIDTHS;
        let expect: Vec<(usize, usize)> = widths.windows(2).map(|w| (w[0], w[1])).collect();
        assert_eq!(shapes, expect);
        assert!(loaded.layer("nope").is_err());
        // The gradient of the last layer, computed by hand from the model: for the sigmoid
        // cross-entropy summed over pixels and averaged over the batch, dL/dW = Xᵀ(σ(Z) − Y)/n.
        let last = layers.last().unwrap().clone();
        let g = loaded.gradients(std::slice::from_ref(&last), 1, 8, 3);
        assert_eq!(g.len(), 1);
        assert_eq!((g[0][0].nrows(), g[0][0].ncols()), (1000, 784));
        let Loaded::Autoencoder { work, model, .. } = &loaded else {
            unreachable!()
        };
        let idx = sample_batches(work.train_len(), 1, 8, 3).remove(0);
        let device = Device::flex();
        let valid = model.valid();
        let mut x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| work.data.train.image(i).to_vec())
            .collect();
        let images = x.clone();
        let n = idx.len();
        let mut width = 784;
        let (mut hidden, mut logits) = (Vec::new(), Vec::new());
        for (l, layer) in valid.layers.iter().enumerate() {
            let t = Tensor::<2>::from_data(
                burn::tensor::TensorData::new(x.clone(), [n, width]),
                &device,
            );
            let z = layer.forward(t);
            width = z.dims()[1];
            let last_layer = l == valid.layers.len() - 1;
            let z = if last_layer || l == crate::models::autoencoder::CODE_LAYER {
                z
            } else {
                z.tanh()
            };
            if last_layer {
                hidden = x.clone();
                logits = z.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            } else {
                x = z.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            }
        }
        let mut max_err = 0.0f64;
        let mut max_ref = 0.0f64;
        for r in 0..1000 {
            for c in (0..784).step_by(37) {
                let mut sum = 0.0f64;
                for s in 0..n {
                    let z = f64::from(logits[s * 784 + c]);
                    let y = f64::from(images[s * 784 + c]);
                    sum += f64::from(hidden[s * 1000 + r]) * (1.0 / (1.0 + (-z).exp()) - y);
                }
                let want = sum / n as f64;
                max_err = max_err.max((g[0][0][(r, c)] - want).abs());
                max_ref = max_ref.max(want.abs());
            }
        }
        assert!(max_ref > 1e-3, "{max_ref}");
        assert!(max_err < 1e-4 * max_ref.max(1.0), "{max_err} vs {max_ref}");
        // Reused, not retrained.
        let again = quick_autoencoder(tmp.path(), &out);
        assert_eq!(again.layers(), layers);
    }
}
