//! A run's checkpoint (`checkpoint.bin`): where the run stands ([`Progress`]) and the model and
//! optimizer records, written atomically; read back by `--resume` and `precond analyze --run`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::Module;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::training::config::{io_err, TrainConfig, TrainError};

pub const CHECKPOINT: &str = "checkpoint.bin";
pub(crate) const CHECKPOINT_MAGIC: &[u8; 16] = b"PRECOND-CKPT-v1\n";

/// One line of `epochs.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    pub epoch: usize,
    pub train_loss: f64,
    /// Autoencoder: test loss; tagger: eval loss.
    pub test_loss: f64,
    pub wall_s: f64,
    /// Tagger: eval token accuracy without the ROOT tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// Tagger: eval token accuracy counting the ROOT tokens too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy_root: Option<f64>,
}

/// State of a ChaCha8 stream, restorable exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RngState {
    seed: Vec<u8>,
    stream: u64,
    /// u128 as a decimal string (JSON numbers are not safe for it).
    word_pos: String,
}

impl RngState {
    pub(crate) fn of(rng: &ChaCha8Rng) -> Self {
        RngState {
            seed: rng.get_seed().to_vec(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub(crate) fn restore(&self) -> Option<ChaCha8Rng> {
        let seed: [u8; 32] = self.seed.as_slice().try_into().ok()?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().ok()?);
        Some(rng)
    }
}

/// Where a run stands; saved in the checkpoint next to the model and optimizer records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub(crate) config: TrainConfig,
    pub(crate) epochs_done: usize,
    /// Optimizer steps done in all.
    pub(crate) step: usize,
    /// Steps done in the unfinished epoch `epochs_done + 1`.
    pub(crate) step_in_epoch: usize,
    /// Shuffling RNG at the start of epoch `epochs_done + 1` (before its shuffle).
    pub(crate) epoch_rng: RngState,
    /// Sum of the batch losses of the unfinished epoch.
    pub(crate) epoch_loss_sum: f64,
    pub(crate) rows: Vec<EpochRow>,
    pub(crate) first_batch_loss: Option<f64>,
    pub(crate) fwd_bwd_s: Vec<f64>,
    pub(crate) opt_step_s: Vec<f64>,
    /// Training wall time so far (all invocations).
    pub(crate) wall_s: f64,
}

/// Write `path` by writing a temporary file next to it and renaming it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Checkpoint layout: magic, then three length-prefixed (u64 LE) sections: progress JSON, the
/// model record (burnpack bytes of `ModuleRecord`), the optimizer record (burnpack bytes of
/// `ModuleOptimizer::to_record`).
pub(crate) fn write_checkpoint<M: Module>(
    path: &Path,
    p: &Progress,
    model: &M,
    optim: &burn::optim::ModuleOptimizer,
) -> Result<(), TrainError> {
    let ckpt_err = |msg: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let json = serde_json::to_vec(p).map_err(|e| ckpt_err(e.to_string()))?;
    let model_bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| ckpt_err(format!("model record: {e}")))?;
    let optim_bytes = optim
        .to_record()
        .into_bytes()
        .map_err(|e| ckpt_err(format!("optimizer record: {e}")))?;
    let mut buf = Vec::with_capacity(64 + json.len() + model_bytes.len() + optim_bytes.len());
    buf.extend_from_slice(CHECKPOINT_MAGIC);
    for section in [&json[..], &model_bytes[..], &optim_bytes[..]] {
        buf.extend_from_slice(&(section.len() as u64).to_le_bytes());
        buf.extend_from_slice(section);
    }
    write_atomic(path, &buf)
}

/// The config and model record (burnpack bytes of `ModuleRecord`) of the run in `dir`, from its
/// checkpoint: what `precond analyze --run DIR` studies.
pub fn load_run(dir: &Path) -> Result<(TrainConfig, Vec<u8>), TrainError> {
    let (progress, model, _) = read_run_checkpoint(dir)?;
    Ok((progress.config, model))
}

/// The checkpoint of the run directory `dir`, or an error saying there is none.
pub(crate) fn read_run_checkpoint(dir: &Path) -> Result<(Progress, Vec<u8>, Vec<u8>), TrainError> {
    let path = dir.join(CHECKPOINT);
    if !path.is_file() {
        return Err(TrainError::Checkpoint {
            path,
            msg: "not found (is this a run directory?)".into(),
        });
    }
    read_checkpoint(&path)
}

pub(crate) fn read_checkpoint(path: &Path) -> Result<(Progress, Vec<u8>, Vec<u8>), TrainError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let bad = |msg: &str| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    };
    let rest = bytes
        .strip_prefix(CHECKPOINT_MAGIC)
        .ok_or_else(|| bad("not a precond checkpoint (bad magic)"))?;
    let mut sections = Vec::new();
    let mut at = 0usize;
    for _ in 0..3 {
        let len_bytes: [u8; 8] = rest
            .get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad("truncated"))?;
        let len = u64::from_le_bytes(len_bytes) as usize;
        at += 8;
        let section = rest
            .get(at..at.saturating_add(len))
            .ok_or_else(|| bad("truncated"))?;
        sections.push(section.to_vec());
        at += len;
    }
    if at != rest.len() {
        return Err(bad("trailing bytes"));
    }
    let progress: Progress =
        serde_json::from_slice(&sections[0]).map_err(|e| bad(&format!("progress record: {e}")))?;
    let optim = sections.pop().unwrap_or_default();
    let model = sections.pop().unwrap_or_default();
    Ok((progress, model, optim))
}
