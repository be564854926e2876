//! What determines a run: the settings of `precond train` (flags or `--config FILE.toml`), the
//! resolved [`TrainConfig`] recorded in `summary.json`, the learning-rate schedule, and the
//! errors of a run.

use std::fs;
use std::path::{Path, PathBuf};

use precond::{PrecondError, Schedule};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::data::conllu::ConlluError;
use crate::data::mnist::MnistError;
use crate::models::tagger::TaggerDims;
use crate::training::optimizers::{block_eigensolver, NonFinite, OptimizerError, OptimizerHparams};
use precond::Fallback;

/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA: &str = "../shared/data/mnist";
/// Default treebank files of the tagger: UD Ancient Greek PTNK.
pub const DEFAULT_TRAIN: &str = "../shared/data/ud/ptnk/grc_ptnk-ud-train.conllu";
pub const DEFAULT_EVAL: &str = "../shared/data/ud/ptnk/grc_ptnk-ud-dev.conllu";
pub const DEFAULT_TEST: &str = "../shared/data/ud/ptnk/grc_ptnk-ud-test.conllu";
/// Name of the checkpoint file in a run directory.

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Mnist(#[from] MnistError),
    #[error(transparent)]
    Conllu(#[from] ConlluError),
    #[error(transparent)]
    Optimizer(#[from] OptimizerError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}", path = path.display())]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: invalid config: {msg}", path = path.display())]
    ConfigFile { path: PathBuf, msg: String },
    #[error("invalid setting: {0}")]
    Setting(String),
    #[error(
        "step {step}: {msg}; the run stops here (--nonfinite error) without saving this \
         step; --nonfinite skip skips such updates instead"
    )]
    NonFinite { step: usize, msg: String },
    #[error(
        "step {step}: the training loss is {loss}: the run diverged and stops here without \
         saving this step (a smaller --lr may help)"
    )]
    Diverged { step: usize, loss: f64 },
    #[error(
        "step {step}: a parameter no longer moves: {error}; the run stops here without saving \
         this step (the library gives up after {limit} failed steps in a row)"
    )]
    LinalgFailure {
        step: usize,
        error: PrecondError,
        limit: u64,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings that flags or a `--config FILE.toml` may give (same names, `-` in flags, `_` in
/// TOML); flags override the file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Autoencoder: directory holding the MNIST IDX files [default: ../shared/data/mnist]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory [default: runs/<optimizer>-<UTC timestamp>]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimizer preset: adam, shared-basis (ours, the default), shared-basis-paper (Algorithm 1
    /// as written), shampoo-250, shampoo-1000, sketchy, block-adam, soap (Adam in Shampoo's
    /// eigenbasis), muon (burn's Muon on 2-D weights, AdamW on the rest) [default: adam]
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Peak learning rate [default: the preset's, see README]
    #[arg(long)]
    pub lr: Option<f64>,
    /// adam, block-adam, soap: first-moment decay; shared-basis, shampoo, sketchy, muon:
    /// momentum [default: the preset's, see README]
    #[arg(long)]
    pub beta1: Option<f64>,
    /// adam, block-adam, soap, muon (its AdamW): second-moment decay; shared-basis, shampoo,
    /// sketchy: statistics decay, 1 the plain sum of Algorithm 1 [default: the preset's, see
    /// README]
    #[arg(long)]
    pub beta2: Option<f64>,
    /// adam: denominator epsilon; block-adam: added before the inverse root; shared-basis:
    /// epsilon of eq. 6; shampoo, sketchy: added before the roots [default: the preset's, see
    /// README]
    #[arg(long)]
    pub eps: Option<f64>,
    /// Weight decay, coupled (adam: L2 penalty on the gradient); decoupled for soap and muon
    /// [default: 0; soap 0.01]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// shared-basis: rank k of the basis [default: 32]; sketchy: sketch rank [default: 256]
    #[arg(long)]
    pub rank: Option<usize>,
    /// shared-basis: oversampling p of the randomized SVD [default: 0]
    #[arg(long)]
    pub oversample: Option<usize>,
    /// shared-basis: power iterations of the randomized SVD [default: 1]
    #[arg(long)]
    pub power_iters: Option<usize>,
    /// shared-basis: power iterations estimating the lost mass rho under --rho norm (0 =
    /// exact), steps from the random start under --rho random-start [default: 10; 1]
    #[arg(long)]
    pub rho_iters: Option<usize>,
    /// shared-basis: lost-mass policy: norm (Algorithm 1's spectral norm of the residual),
    /// random-start (power iteration from a random start in R^b), rayleigh (Rayleigh quotient
    /// at a random start), fd (frequent directions: lambda_min + energy outside the basis)
    /// [default: the preset's, see README]
    #[arg(long)]
    pub rho: Option<String>,
    /// shared-basis: multiplier on every increment of rho (0 = epsilon alone) [default: the
    /// preset's, see README]
    #[arg(long)]
    pub rho_scale: Option<f64>,
    /// shared-basis, block-adam: the per-block eigensolver: batched (eight blocks at a time in
    /// SIMD lanes) or faer (one block at a time, the kernel of runs recorded before 2026-12-03's
    /// second session) [default: batched]
    #[arg(long)]
    pub eigensolver: Option<String>,
    /// shampoo, sketchy: largest block side; block-adam: rows per block; soap: largest side
    /// rotated (max_precond_dim) [default: the preset's, 250, 1000, 1024; 10; 10000]
    #[arg(long)]
    pub block_size: Option<usize>,
    /// shampoo, sketchy: steps between inverse-root recomputations; soap: between eigenbasis
    /// refreshes [default: 10]
    #[arg(long)]
    pub precondition_every: Option<u64>,
    /// ours: grafting: none, sgd, adagrad, rmsprop, rmsprop-normalized, adam
    /// [default: rmsprop-normalized]
    #[arg(long)]
    pub graft: Option<String>,
    /// ours: Nesterov momentum [default: true]
    #[arg(long)]
    pub nesterov: Option<bool>,
    /// ours: first step (1-based) of preconditioning; grafting alone before [default: 1;
    /// shampoo, sketchy: 101 (tagger: 11)]
    #[arg(long)]
    pub start_step: Option<u64>,
    /// ours: a gradient with NaN or infinity: error stops the run naming the step and the
    /// parameter; skip leaves that parameter and its optimizer state unchanged for that step and
    /// prints a warning [default: error]
    #[arg(long, value_enum)]
    pub nonfinite: Option<NonFinite>,
    /// Examples (images, sentences) per step [default: 1000; tagger 128]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Epochs [default: 100; tagger 30]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Fraction of all steps used for linear warmup; then the autoencoder decays linearly to 0,
    /// the tagger as 1/sqrt(step) (Flax's rsqrt) [default: 0.05; tagger 0.1]
    #[arg(long)]
    pub warmup_frac: Option<f64>,
    /// Seed of the initialization, the shuffling and the dropout [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use only the first N training images (sentences)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Use only the first N test images (eval and test sentences)
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Also write the checkpoint every N epochs
    #[arg(long)]
    pub save_every: Option<usize>,
    /// End after N epochs of this invocation, as if interrupted (checkpoint + partial summary)
    #[arg(long)]
    pub stop_after: Option<usize>,
}

impl TrainSettings {
    /// `self` where set, else `other`.
    pub fn or(self, other: TrainSettings) -> TrainSettings {
        TrainSettings {
            data: self.data.or(other.data),
            out: self.out.or(other.out),
            optimizer: self.optimizer.or(other.optimizer),
            lr: self.lr.or(other.lr),
            beta1: self.beta1.or(other.beta1),
            beta2: self.beta2.or(other.beta2),
            eps: self.eps.or(other.eps),
            weight_decay: self.weight_decay.or(other.weight_decay),
            rank: self.rank.or(other.rank),
            oversample: self.oversample.or(other.oversample),
            power_iters: self.power_iters.or(other.power_iters),
            rho_iters: self.rho_iters.or(other.rho_iters),
            rho: self.rho.or(other.rho),
            rho_scale: self.rho_scale.or(other.rho_scale),
            eigensolver: self.eigensolver.or(other.eigensolver),
            block_size: self.block_size.or(other.block_size),
            precondition_every: self.precondition_every.or(other.precondition_every),
            graft: self.graft.or(other.graft),
            nesterov: self.nesterov.or(other.nesterov),
            start_step: self.start_step.or(other.start_step),
            nonfinite: self.nonfinite.or(other.nonfinite),
            batch_size: self.batch_size.or(other.batch_size),
            epochs: self.epochs.or(other.epochs),
            warmup_frac: self.warmup_frac.or(other.warmup_frac),
            seed: self.seed.or(other.seed),
            limit: self.limit.or(other.limit),
            test_limit: self.test_limit.or(other.test_limit),
            save_every: self.save_every.or(other.save_every),
            stop_after: self.stop_after.or(other.stop_after),
        }
    }
}

/// The tagger's own settings (flags of `precond train tagger`, or keys of its `--config`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TaggerSettings {
    /// Training treebank (CoNLL-U) [default: ../shared/data/ud/ptnk/grc_ptnk-ud-train.conllu]
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Treebank evaluated after every epoch [default: the PTNK dev file]
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Treebank evaluated once at the end of a completed run [default: the PTNK test file]
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Target column: auto (XPOS where the training file has it, else UPOS), xpos, upos
    /// [default: auto]
    #[arg(long, value_enum)]
    pub tag: Option<TagChoice>,
    /// Words seen fewer times in the training file are unknown (UNK) [default: 1]
    #[arg(long)]
    pub min_count: Option<usize>,
    /// Model preset; the size flags below override it [default: small]
    #[arg(long, value_enum)]
    pub size: Option<SizePreset>,
    /// Encoder layers [small 2, paper 6]
    #[arg(long)]
    pub layers: Option<usize>,
    /// Model width [small 128, paper 512]
    #[arg(long)]
    pub width: Option<usize>,
    /// MLP width [small 512, paper 2048]
    #[arg(long)]
    pub mlp: Option<usize>,
    /// Attention heads [small 4, paper 8]
    #[arg(long)]
    pub heads: Option<usize>,
    /// Dropout rate (embeddings, attention weights, residual branches, MLP) [default: 0.3]
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Library optimizers: the embedding table takes the grafting direction (graft) or SGD with
    /// momentum (sgd, the paper's); it is never preconditioned [default: graft]
    #[arg(long, value_enum)]
    pub embedding: Option<EmbeddingRule>,
}

/// Shampoo's and Sketchy's first preconditioned step on the tagger (the autoencoder's presets
/// start at 101, distributed Shampoo's default; the tagger's whole default run is 180 steps).
pub const TAGGER_START_STEP: u64 = 11;

/// The keys of [`TaggerSettings`] in a TOML file (the rest belong to [`TrainSettings`]).
pub(crate) const TAGGER_KEYS: &[&str] = &[
    "train",
    "eval",
    "test",
    "tag",
    "min_count",
    "size",
    "layers",
    "width",
    "mlp",
    "heads",
    "dropout",
    "embedding",
];

impl TaggerSettings {
    /// `self` where set, else `other`.
    pub fn or(self, other: TaggerSettings) -> TaggerSettings {
        TaggerSettings {
            train: self.train.or(other.train),
            eval: self.eval.or(other.eval),
            test: self.test.or(other.test),
            tag: self.tag.or(other.tag),
            min_count: self.min_count.or(other.min_count),
            size: self.size.or(other.size),
            layers: self.layers.or(other.layers),
            width: self.width.or(other.width),
            mlp: self.mlp.or(other.mlp),
            heads: self.heads.or(other.heads),
            dropout: self.dropout.or(other.dropout),
            embedding: self.embedding.or(other.embedding),
        }
    }

    /// The tagger's config: the preset's dimensions where no flag overrides them.
    pub fn config(&self) -> TaggerConfig {
        let size = self.size.unwrap_or_default();
        // The vocabulary and tag counts come from the data later.
        let preset = match size {
            SizePreset::Small => TaggerDims::small(0, 0),
            SizePreset::Paper => TaggerDims::paper(0, 0),
        };
        TaggerConfig {
            train: self
                .train
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TRAIN)),
            eval: self
                .eval
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_EVAL)),
            test: Some(
                self.test
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_TEST)),
            ),
            tag: self.tag.unwrap_or_default(),
            min_count: self.min_count.unwrap_or(1),
            size,
            layers: self.layers.unwrap_or(preset.layers),
            width: self.width.unwrap_or(preset.width),
            mlp: self.mlp.unwrap_or(preset.mlp),
            heads: self.heads.unwrap_or(preset.heads),
            dropout: self.dropout.unwrap_or(preset.dropout),
            embedding: self.embedding.unwrap_or_default(),
        }
    }

    /// The settings that reproduce `c` (for comparing a resume's flags with its checkpoint).
    pub(crate) fn of(c: &TaggerConfig) -> TaggerSettings {
        TaggerSettings {
            train: Some(c.train.clone()),
            eval: Some(c.eval.clone()),
            test: c.test.clone(),
            tag: Some(c.tag),
            min_count: Some(c.min_count),
            size: Some(c.size),
            layers: Some(c.layers),
            width: Some(c.width),
            mlp: Some(c.mlp),
            heads: Some(c.heads),
            dropout: Some(c.dropout),
            embedding: Some(c.embedding),
        }
    }
}

/// Reads a `--config` TOML file: the common settings and, for the tagger, its own.
pub(crate) fn settings_from_toml(
    path: &Path,
    tagger: bool,
) -> Result<(TrainSettings, TaggerSettings), TrainError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let bad = |msg: String| TrainError::ConfigFile {
        path: path.to_path_buf(),
        msg,
    };
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut own = toml::Table::new();
    if tagger {
        for key in TAGGER_KEYS {
            if let Some(v) = table.remove(*key) {
                own.insert((*key).to_string(), v);
            }
        }
    }
    let common = TrainSettings::deserialize(table).map_err(|e| bad(e.to_string()))?;
    let own = TaggerSettings::deserialize(own).map_err(|e| bad(e.to_string()))?;
    Ok((common, own))
}

/// `precond train tagger` arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TaggerArgs {
    #[command(flatten)]
    pub settings: TrainSettings,
    #[command(flatten)]
    pub tagger: TaggerSettings,
    /// TOML file with any of the settings above (flags override it)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in DIR from its checkpoint (hyperparameters come from the checkpoint)
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

impl From<TaggerArgs> for TrainArgs {
    fn from(a: TaggerArgs) -> TrainArgs {
        TrainArgs {
            settings: a.settings,
            config: a.config,
            resume: a.resume,
            tagger: Some(a.tagger),
        }
    }
}

/// `precond train autoencoder` arguments (and, with `tagger` set, the tagger's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub settings: TrainSettings,
    /// The tagger's settings: `Some` for `train tagger`.
    #[arg(skip)]
    pub tagger: Option<TaggerSettings>,
    /// TOML file with any of the settings above (flags override it)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in DIR from its checkpoint (hyperparameters come from the checkpoint)
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// Everything that determines the result of a run; recorded in `summary.json` as `config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub optimizer: OptimizerHparams,
    pub batch_size: usize,
    pub epochs: usize,
    pub warmup_frac: f64,
    pub seed: u64,
    pub limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub data: PathBuf,
    pub model: String,
    pub loss: String,
    pub init: String,
    pub schedule: String,
    /// The tagger's data, model and rules (absent for the autoencoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tagger: Option<TaggerConfig>,
}

impl TrainConfig {
    /// Resolve autoencoder settings into a config, with defaults for what is unset.
    #[cfg(test)]
    pub fn from_settings(s: &TrainSettings) -> Result<TrainConfig, TrainError> {
        Self::resolve(s, None)
    }

    /// Resolve settings into a config, with defaults for what is unset: the autoencoder's, or
    /// with `tagger` the tagger's.
    pub fn resolve(
        s: &TrainSettings,
        tagger: Option<&TaggerSettings>,
    ) -> Result<TrainConfig, TrainError> {
        let name = s.optimizer.clone().unwrap_or_else(|| "adam".to_string());
        let mut optimizer = match tagger {
            None => OptimizerHparams::preset(&name)?,
            Some(_) => OptimizerHparams::tagger_preset(&name)?,
        };
        if let Some(v) = s.lr {
            optimizer.lr = v;
        }
        if let Some(v) = s.beta1 {
            optimizer.beta1 = v;
        }
        if let Some(v) = s.beta2 {
            optimizer.beta2 = v;
        }
        if let Some(v) = s.eps {
            optimizer.eps = v;
        }
        if let Some(v) = s.weight_decay {
            optimizer.weight_decay = v;
        }
        if let Some(lib) = optimizer.library.as_mut() {
            // Shampoo's and Sketchy's 100 grafting-only steps would be most of the tagger's 180.
            if tagger.is_some() && lib.start_step > 1 {
                lib.start_step = TAGGER_START_STEP;
            }
            lib.graft = s.graft.clone().unwrap_or(lib.graft.clone());
            lib.nesterov = s.nesterov.unwrap_or(lib.nesterov);
            lib.start_step = s.start_step.unwrap_or(lib.start_step);
            lib.seed = s.seed.unwrap_or(0);
            lib.nonfinite = s.nonfinite.unwrap_or(lib.nonfinite);
        }
        // Method-specific settings: only where the preset has them.
        let slots = optimizer.library.as_mut();
        let (mut rank, mut oversample, mut power_iters, mut rho_iters, mut block, mut every) =
            match slots {
                Some(l) => (
                    l.rank.as_mut(),
                    l.oversample.as_mut(),
                    l.power_iters.as_mut(),
                    l.rho_iters.as_mut(),
                    l.block_size.as_mut(),
                    l.precondition_every.as_mut(),
                ),
                None => (None, None, None, None, None, None),
            };
        let refuse = |flag: &'static str| OptimizerError::NotApplicable {
            flag,
            optimizer: name.clone(),
        };
        set(&mut rank, s.rank, || refuse("rank"))?;
        set(&mut oversample, s.oversample, || refuse("oversample"))?;
        set(&mut power_iters, s.power_iters, || refuse("power-iters"))?;
        set(&mut rho_iters, s.rho_iters, || refuse("rho-iters"))?;
        set(&mut block, s.block_size, || refuse("block-size"))?;
        set(&mut every, s.precondition_every, || {
            refuse("precondition-every")
        })?;
        // The lost-mass policy and its multiplier: shared-basis only (its presets have
        // power_iters set).
        let shared_basis = optimizer
            .library
            .as_mut()
            .filter(|l| l.power_iters.is_some());
        if let Some(l) = shared_basis {
            if s.rho.is_some() {
                l.rho = s.rho.clone();
                // Another policy's iteration count does not carry over.
                if s.rho_iters.is_none() {
                    l.rho_iters = None;
                }
            }
            if s.rho_scale.is_some() {
                l.rho_scale = s.rho_scale;
            }
        } else if s.rho.is_some() {
            return Err(refuse("rho").into());
        } else if s.rho_scale.is_some() {
            return Err(refuse("rho-scale").into());
        }
        // The block eigensolver: shared-basis and Block Adam.
        if let Some(name) = &s.eigensolver {
            block_eigensolver(Some(name))?;
            let blocks = optimizer.name == "block-adam";
            match optimizer.library.as_mut() {
                Some(l) if blocks || l.power_iters.is_some() => l.eigensolver = Some(name.clone()),
                _ => return Err(refuse("eigensolver").into()),
            }
        }
        if optimizer.library.is_none() {
            let given = [
                ("graft", s.graft.is_some()),
                ("nesterov", s.nesterov.is_some()),
                ("start-step", s.start_step.is_some()),
                ("nonfinite", s.nonfinite.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                return Err(refuse(flag).into());
            }
        }
        let config = match tagger {
            None => TrainConfig {
                optimizer,
                batch_size: s.batch_size.unwrap_or(1000),
                epochs: s.epochs.unwrap_or(100),
                warmup_frac: s.warmup_frac.unwrap_or(0.05),
                seed: s.seed.unwrap_or(0),
                limit: s.limit,
                test_limit: s.test_limit,
                data: s
                    .data
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
                model: "784-1000-500-250-30-250-500-1000-784, tanh, linear code and output".into(),
                loss: "sigmoid cross-entropy with logits, sum over pixels, mean over batch".into(),
                init: "Glorot uniform weights (ChaCha8, seed), zero biases".into(),
                schedule: "linear warmup over warmup_frac of the steps, then linear decay to 0"
                    .into(),
                tagger: None,
            },
            Some(t) => {
                if s.data.is_some() {
                    return Err(TrainError::Setting(
                        "--data is the autoencoder's; the tagger reads --train, --eval and --test"
                            .into(),
                    ));
                }
                let tc = t.config();
                TrainConfig {
                    optimizer,
                    batch_size: s.batch_size.unwrap_or(128),
                    epochs: s.epochs.unwrap_or(30),
                    warmup_frac: s.warmup_frac.unwrap_or(0.1),
                    seed: s.seed.unwrap_or(0),
                    limit: s.limit,
                    test_limit: s.test_limit,
                    data: tc.train.clone(),
                    model: "pre-LayerNorm Transformer encoder: embedding + sinusoidal positions, \
                            multi-head self-attention without bias, ELU MLP, dropout, final \
                            LayerNorm, dense to the tags; a ROOT token first in every sentence"
                        .into(),
                    loss: "softmax cross-entropy, mean over the batch's tokens (ROOT included, \
                           padding excluded)"
                        .into(),
                    init: "LeCun normal dense kernels, N(0, 1) embeddings, zero biases, unit \
                           LayerNorm scales (ChaCha8, seed)"
                        .into(),
                    schedule: "linear warmup over warmup_frac of the steps, then 1/sqrt(step) \
                               (Flax rsqrt, normalized to peak 1)"
                        .into(),
                    tagger: Some(tc),
                }
            }
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), TrainError> {
        let bad = |msg: &str| Err(TrainError::Setting(msg.to_string()));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1");
        }
        if !(0.0..1.0).contains(&self.warmup_frac) {
            return bad("warmup_frac must be in [0, 1)");
        }
        if self.limit == Some(0) || self.test_limit == Some(0) {
            return bad("limit and test_limit must be at least 1");
        }
        if let Some(t) = &self.tagger {
            if !(0.0..1.0).contains(&t.dropout) {
                return bad("dropout must be in [0, 1)");
            }
            if t.layers == 0 || t.width == 0 || t.mlp == 0 || t.heads == 0 {
                return bad("layers, width, mlp and heads must be at least 1");
            }
            if t.width % t.heads != 0 {
                return bad("width must be divisible by heads");
            }
        }
        crate::training::optimizers::validate(&self.optimizer)?;
        Ok(())
    }
}

/// Writes `value` into `slot` when given; a value for a slot the preset lacks is `refuse()`d.
fn set<T>(
    slot: &mut Option<&mut T>,
    value: Option<T>,
    refuse: impl FnOnce() -> OptimizerError,
) -> Result<(), OptimizerError> {
    match (slot, value) {
        (_, None) => Ok(()),
        (Some(slot), Some(v)) => {
            **slot = v;
            Ok(())
        }
        (None, Some(_)) => Err(refuse()),
    }
}

impl TrainConfig {
    /// The learning-rate schedule of this run, `total` steps long.
    pub fn schedule(&self, total: usize) -> Schedule {
        match self.tagger {
            None => lr_schedule(total, self.warmup_frac),
            Some(_) => Schedule::WarmupRsqrt {
                warmup_steps: ((self.warmup_frac * total as f64).ceil() as u64).max(1),
            },
        }
    }
}

/// The learning-rate schedule of a run of `total` steps (the library's
/// [`Schedule::WarmupLinearDecay`], evaluated at the 1-based step): linear warmup to 1 over the
/// first ceil(warmup_frac · total) steps, then linear decay that would reach 0 one step after the
/// last (so that the last step is not wasted at rate 0).
pub fn lr_schedule(total: usize, warmup_frac: f64) -> Schedule {
    let total = total as u64;
    let warmup = ((warmup_frac * total as f64).ceil() as u64).min(total);
    Schedule::WarmupLinearDecay {
        warmup_steps: warmup,
        total_steps: total + 1,
    }
}

/// `--tag`: the target column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TagChoice {
    /// XPOS where the training file has any, else UPOS (PTNK's XPOS column is empty)
    #[default]
    Auto,
    /// The language-specific tags (column 5), as Flax's nlp_seq
    Xpos,
    /// The universal tags (column 4)
    Upos,
}

/// `--size`: the model's preset dimensions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SizePreset {
    /// 2 layers, width 128, MLP 512, 4 heads: trains in minutes on 2 cores
    #[default]
    Small,
    /// The paper's: 6 layers, width 512, MLP 2048, 8 heads
    Paper,
}

/// `--embedding`: what the embedding table does under the library's methods. The methods that
/// precondition matrices and graft (shared-basis, Shampoo, Sketchy) never precondition it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingRule {
    /// The grafting direction (the same step size as every other parameter); block-adam and
    /// soap, which have no grafting and take every shape, apply themselves to it like Adam
    #[default]
    Graft,
    /// SGD with momentum (the paper's choice; it needs a learning rate on SGD's scale)
    Sgd,
}

impl EmbeddingRule {
    pub(crate) fn fallback(self) -> Fallback {
        match self {
            EmbeddingRule::Graft => Fallback::Graft,
            EmbeddingRule::Sgd => Fallback::SgdMomentum,
        }
    }
}

/// The tagger's part of a run's config (`summary.json`'s `config.tagger`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaggerConfig {
    pub train: PathBuf,
    pub eval: PathBuf,
    pub test: Option<PathBuf>,
    pub tag: TagChoice,
    pub min_count: usize,
    pub size: SizePreset,
    pub layers: usize,
    pub width: usize,
    pub mlp: usize,
    pub heads: usize,
    pub dropout: f64,
    pub embedding: EmbeddingRule,
}
