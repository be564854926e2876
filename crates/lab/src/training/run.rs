//! `precond train autoencoder` and `precond train tagger`: one training loop for both benchmarks
//! (the task-specific parts are [`crate::training::tasks::Workload`]s).
//!
//! Outputs in the run directory: `epochs.csv` (autoencoder: epoch,train_loss,test_loss,wall_s;
//! tagger: epoch,train_loss,eval_loss,eval_accuracy,eval_accuracy_root,wall_s), `summary.json`
//! and `checkpoint.bin` (written atomically at the end of every run and every `--save-every`
//! epochs; `--resume DIR` continues a run bit for bit).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};
use precond::{OptimizerConfig, PrecondError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::training::accounting::*;
use crate::training::checkpoint::*;
use crate::training::config::*;
use crate::training::optimizers::{library_config, BuiltOptimizer, NonFinite};
use crate::training::progress::{Display, Mode};
use crate::training::tasks::{AutoencoderTask, TaggerTask, Workload};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    Completed,
    StopAfter,
    Interrupted,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// autoencoder or tagger.
    pub task: String,
    pub optimizer: String,
    pub config: TrainConfig,
    pub ending: Ending,
    pub complete: bool,
    pub epochs: usize,
    pub steps: usize,
    pub param_count: usize,
    pub first_batch_loss: Option<f64>,
    pub final_train_loss: Option<f64>,
    /// Autoencoder: the test loss; tagger: the eval loss.
    pub final_test_loss: Option<f64>,
    /// Tagger: the best eval accuracy (ROOT tokens excluded) over the epochs, in [0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_eval: Option<f64>,
    /// Tagger: the best eval accuracy counting the ROOT tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_eval_root: Option<f64>,
    /// Tagger: the last epoch's eval accuracy (ROOT excluded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_eval_accuracy: Option<f64>,
    /// Tagger, completed run: `--test` accuracy (ROOT excluded, and counting ROOT) and loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy_root: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    pub median_step_s: Option<f64>,
    pub median_fwd_bwd_s: Option<f64>,
    pub median_opt_step_s: Option<f64>,
    pub mean_opt_step_s: Option<f64>,
    pub wall_s: f64,
    pub optimizer_state_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    pub params_sha256: String,
    pub machine: Machine,
}

/// The outcome of [`run`].
#[derive(Debug, Clone)]
pub struct RunResult {
    pub out: PathBuf,
    pub summary: Summary,
    /// The epoch rows (also in `epochs.csv`).
    #[allow(dead_code)]
    pub rows: Vec<EpochRow>,
}

/// Run `precond train autoencoder` or, with `args.tagger`, `precond train tagger`. `stop` is
/// polled after every step (Ctrl-C sets it).
pub fn run(args: &TrainArgs, stop: &AtomicBool) -> Result<RunResult, TrainError> {
    reset_peak_rss();
    let tagger = args.tagger.is_some();
    let (file, file_tagger) = match &args.config {
        Some(path) => settings_from_toml(path, tagger)?,
        None => Default::default(),
    };
    let settings = args.settings.clone().or(file);
    let tagger_settings = args.tagger.clone().map(|t| t.or(file_tagger));
    let control = Control {
        save_every: settings.save_every,
        stop_after: settings.stop_after,
    };
    let device = Device::flex().autodiff();
    match &args.resume {
        Some(dir) => {
            let (config, checkpoint) = resume(dir, &settings, tagger_settings.as_ref())?;
            let start = Start {
                out: dir.clone(),
                config,
                checkpoint: Some(checkpoint),
            };
            start.dispatch(&device, control, stop)
        }
        None => {
            let config = TrainConfig::resolve(&settings, tagger_settings.as_ref())?;
            let out = settings.out.clone().unwrap_or_else(|| default_out(&config));
            if out.join(CHECKPOINT).exists() {
                return Err(TrainError::Setting(format!(
                    "{} already holds a run; use --resume {0} or another --out",
                    out.display()
                )));
            }
            let start = Start {
                out,
                config,
                checkpoint: None,
            };
            start.dispatch(&device, control, stop)
        }
    }
}

struct Control {
    save_every: Option<usize>,
    stop_after: Option<usize>,
}

/// A checkpoint's sections: where the run stands, the model record, the optimizer record.
type Checkpoint = (Progress, Vec<u8>, Vec<u8>);

/// A run about to start or continue.
struct Start {
    out: PathBuf,
    config: TrainConfig,
    checkpoint: Option<Checkpoint>,
}

impl Start {
    /// Loads the task's data and trains.
    fn dispatch(
        self,
        device: &Device,
        control: Control,
        stop: &AtomicBool,
    ) -> Result<RunResult, TrainError> {
        if self.config.tagger.is_some() {
            let work = TaggerTask::load(&self.config)?;
            self.run(work, device, control, stop)
        } else {
            let work = AutoencoderTask::load(&self.config)?;
            self.run(work, device, control, stop)
        }
    }

    /// Builds (or restores) the model, optimizer and progress of `work`, then trains.
    fn run<W: Workload>(
        self,
        work: W,
        device: &Device,
        control: Control,
        stop: &AtomicBool,
    ) -> Result<RunResult, TrainError> {
        let Start {
            out,
            config,
            checkpoint,
        } = self;
        let model = work.model(config.seed, device);
        let (model, optim, progress) = match checkpoint {
            None => {
                let optim = work.optimizer(&config.optimizer, &model)?;
                let progress = Progress {
                    config: config.clone(),
                    epochs_done: 0,
                    step: 0,
                    step_in_epoch: 0,
                    epoch_rng: RngState::of(&ChaCha8Rng::seed_from_u64(config.seed)),
                    epoch_loss_sum: 0.0,
                    rows: Vec::new(),
                    first_batch_loss: None,
                    fwd_bwd_s: Vec::new(),
                    opt_step_s: Vec::new(),
                    wall_s: 0.0,
                };
                (model, optim, progress)
            }
            Some((progress, model_bytes, optim_bytes)) => {
                let path = out.join(CHECKPOINT);
                let ckpt_err = |msg: String| TrainError::Checkpoint {
                    path: path.clone(),
                    msg,
                };
                let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(model_bytes))
                    .map_err(|e| ckpt_err(format!("model record: {e}")))?;
                let model = model
                    .try_load_record(record)
                    .map_err(|e| ckpt_err(format!("model record: {e}")))?;
                let mut optim = work.optimizer(&config.optimizer, &model)?;
                optim.optim = optim
                    .optim
                    .from_bytes(Bytes::from_bytes_vec(optim_bytes))
                    .map_err(|e| ckpt_err(format!("optimizer record: {e}")))?;
                (model, optim, progress)
            }
        };
        fs::create_dir_all(&out).map_err(io_err(&out))?;
        train_loop(
            &out, &work, config, model, optim, progress, device, control, stop,
        )
    }
}

/// Reads the checkpoint of the run in `dir` and checks that the settings given agree with it.
fn resume(
    dir: &Path,
    settings: &TrainSettings,
    tagger: Option<&TaggerSettings>,
) -> Result<(TrainConfig, Checkpoint), TrainError> {
    let (progress, model_bytes, optim_bytes) = read_run_checkpoint(dir)?;
    let saved = progress.config.clone();
    match (tagger.is_some(), saved.tagger.is_some()) {
        (true, false) => {
            return Err(TrainError::Setting(format!(
                "--resume {}: an autoencoder run; continue it with `precond train autoencoder`",
                dir.display()
            )))
        }
        (false, true) => {
            return Err(TrainError::Setting(format!(
                "--resume {}: a tagger run; continue it with `precond train tagger`",
                dir.display()
            )))
        }
        _ => {}
    }
    if let Some(out) = &settings.out {
        if out != dir {
            return Err(TrainError::Setting(
                "--out cannot be combined with --resume (the run continues in its directory)"
                    .into(),
            ));
        }
    }
    // Hyperparameters come from the checkpoint; any setting given must agree with it.
    let given = TrainSettings {
        data: None,
        out: None,
        save_every: None,
        stop_after: None,
        ..settings.clone()
    };
    let tagger_differs = match (tagger, &saved.tagger) {
        (Some(t), Some(c)) => {
            let of = TaggerSettings::of(c);
            t.clone().or(of.clone()) != of
        }
        _ => false,
    };
    if given != TrainSettings::default() || tagger_differs {
        let sb = saved.optimizer.library.as_ref();
        let saved_settings = TrainSettings {
            optimizer: Some(saved.optimizer.name.clone()),
            lr: Some(saved.optimizer.lr),
            beta1: Some(saved.optimizer.beta1),
            beta2: Some(saved.optimizer.beta2),
            eps: Some(saved.optimizer.eps),
            weight_decay: Some(saved.optimizer.weight_decay),
            rank: sb.and_then(|h| h.rank),
            oversample: sb.and_then(|h| h.oversample),
            power_iters: sb.and_then(|h| h.power_iters),
            rho_iters: sb.and_then(|h| h.rho_iters),
            rho: sb.and_then(|h| h.rho.clone()),
            rho_scale: sb.and_then(|h| h.rho_scale),
            eigensolver: sb.and_then(|h| h.eigensolver.clone()),
            block_size: sb.and_then(|h| h.block_size),
            precondition_every: sb.and_then(|h| h.precondition_every),
            graft: sb.map(|h| h.graft.clone()),
            nesterov: sb.map(|h| h.nesterov),
            start_step: sb.map(|h| h.start_step),
            nonfinite: sb.map(|h| h.nonfinite),
            batch_size: Some(saved.batch_size),
            epochs: Some(saved.epochs),
            warmup_frac: Some(saved.warmup_frac),
            seed: Some(saved.seed),
            limit: saved.limit,
            test_limit: saved.test_limit,
            ..TrainSettings::default()
        };
        if tagger_differs || given.clone().or(saved_settings.clone()) != saved_settings {
            return Err(TrainError::Setting(format!(
                "--resume {}: settings differ from the checkpoint's; a resumed run keeps its \
                 hyperparameters (only --data, --save-every and --stop-after may be given)",
                dir.display()
            )));
        }
    }
    let mut config = saved;
    if let Some(data) = &settings.data {
        config.data = data.clone();
    }
    Ok((config, (progress, model_bytes, optim_bytes)))
}

#[allow(clippy::too_many_arguments)]
fn train_loop<W: Workload>(
    out: &Path,
    work: &W,
    config: TrainConfig,
    mut model: W::Model,
    mut optim: BuiltOptimizer,
    mut p: Progress,
    device: &Device,
    control: Control,
    stop: &AtomicBool,
) -> Result<RunResult, TrainError> {
    let n = work.train_len();
    let bs = config.batch_size;
    let steps_per_epoch = n.div_ceil(bs);
    let schedule = config.schedule(steps_per_epoch * config.epochs);
    let ckpt_path = out.join(CHECKPOINT);
    let nonfinite = config
        .optimizer
        .library
        .as_ref()
        .map_or(NonFinite::Error, |l| l.nonfinite);
    // The library optimizer's per-parameter config: its limit on failed steps ends the run.
    let library = match config.optimizer.library {
        Some(_) => Some(library_config(&config.optimizer)?.config().clone()),
        None => None,
    };
    let mut rng = p
        .epoch_rng
        .restore()
        .ok_or_else(|| TrainError::Checkpoint {
            path: ckpt_path.clone(),
            msg: "bad RNG state".into(),
        })?;
    let session = Instant::now();
    let wall_base = p.wall_s;
    let epochs_at_start = p.epochs_done;
    let mut ending = Ending::Completed;
    eprintln!(
        "training {} on {}, batch {bs}, {} epochs ({} steps/epoch) -> {}",
        config.optimizer.name,
        work.describe(),
        config.epochs,
        steps_per_epoch,
        out.display()
    );
    let display = Display::new(Mode::detect(), steps_per_epoch * config.epochs, p.step);

    'epochs: while p.epochs_done < config.epochs {
        let epoch_rng = RngState::of(&rng);
        let batches = work.epoch_batches(&mut rng, bs);
        while p.step_in_epoch < steps_per_epoch {
            let idx = &batches[p.step_in_epoch];
            let t0 = Instant::now();
            let loss = work.train_loss(&model, idx, p.step as u64 + 1, device);
            let grads = loss.backward();
            let loss_value = f64::from(loss.into_scalar::<f32>());
            sync(device);
            let t1 = Instant::now();
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged {
                    step: p.step + 1,
                    loss: loss_value,
                });
            }
            let grads = GradientsParams::from_grads(grads, &model);
            let lr = schedule.lr(config.optimizer.lr, p.step as u64 + 1);
            let skips = optim.nonfinite_skips();
            model = optim.optim.step(lr, model, grads);
            let skipped = optim.nonfinite_skips() - skips;
            for line in after_step(&optim, p.step + 1, skipped, nonfinite, library.as_ref())? {
                display.line(&line);
            }
            sync(device);
            let t2 = Instant::now();
            display.step(p.step + 1, loss_value, (t2 - t0).as_secs_f64());

            p.fwd_bwd_s.push((t1 - t0).as_secs_f64());
            p.opt_step_s.push((t2 - t1).as_secs_f64());
            p.first_batch_loss.get_or_insert(loss_value);
            p.epoch_loss_sum += loss_value;
            p.step += 1;
            p.step_in_epoch += 1;
            if stop.load(Ordering::SeqCst) && p.step_in_epoch < steps_per_epoch {
                p.epoch_rng = epoch_rng;
                ending = Ending::Interrupted;
                break 'epochs;
            }
        }
        let train_loss = p.epoch_loss_sum / steps_per_epoch as f64;
        let eval = work.evaluate(&model, bs);
        p.epochs_done += 1;
        p.step_in_epoch = 0;
        p.epoch_loss_sum = 0.0;
        p.epoch_rng = RngState::of(&rng);
        p.wall_s = wall_base + session.elapsed().as_secs_f64();
        p.rows.push(EpochRow {
            epoch: p.epochs_done,
            train_loss,
            test_loss: eval.loss,
            wall_s: p.wall_s,
            eval_accuracy: eval.accuracy.map(|a| a.word_fraction()),
            eval_accuracy_root: eval.accuracy.map(|a| a.fraction()),
        });
        write_csv(out, &p.rows, config.tagger.is_some())?;
        display.line(&epoch_line(
            &p,
            &config,
            steps_per_epoch,
            epochs_at_start,
            &session,
        ));

        if stop.load(Ordering::SeqCst) {
            ending = Ending::Interrupted;
            break;
        }
        let this_run = p.epochs_done - epochs_at_start;
        if p.epochs_done < config.epochs && control.stop_after == Some(this_run) {
            ending = Ending::StopAfter;
            break;
        }
        if let Some(every) = control.save_every {
            if every > 0 && p.epochs_done % every == 0 && p.epochs_done < config.epochs {
                write_checkpoint(&ckpt_path, &p, &model, &optim.optim)?;
            }
        }
    }
    display.finish();
    p.wall_s = wall_base + session.elapsed().as_secs_f64();
    write_checkpoint(&ckpt_path, &p, &model, &optim.optim)?;
    write_csv(out, &p.rows, config.tagger.is_some())?;

    let complete = p.epochs_done == config.epochs;
    let test = if complete {
        work.test(&model, bs)
    } else {
        None
    };
    if let Some(acc) = test.and_then(|t| t.accuracy) {
        eprintln!(
            "test accuracy {:.2}% ({:.2}% counting ROOT)",
            100.0 * acc.word_fraction(),
            100.0 * acc.fraction()
        );
    }
    let steps: Vec<f64> = p
        .fwd_bwd_s
        .iter()
        .zip(&p.opt_step_s)
        .map(|(a, b)| a + b)
        .collect();
    let last = p.rows.last();
    let best = |f: fn(&EpochRow) -> Option<f64>| p.rows.iter().filter_map(f).reduce(f64::max);
    let summary = Summary {
        task: if config.tagger.is_some() {
            "tagger"
        } else {
            "autoencoder"
        }
        .into(),
        optimizer: config.optimizer.name.clone(),
        config: config.clone(),
        ending,
        complete,
        epochs: p.epochs_done,
        steps: p.step,
        param_count: model.num_params(),
        first_batch_loss: p.first_batch_loss,
        final_train_loss: last.map(|r| r.train_loss),
        final_test_loss: last.map(|r| r.test_loss),
        best_eval: best(|r| r.eval_accuracy),
        best_eval_root: best(|r| r.eval_accuracy_root),
        final_eval_accuracy: last.and_then(|r| r.eval_accuracy),
        test_accuracy: test.and_then(|t| t.accuracy).map(|a| a.word_fraction()),
        test_accuracy_root: test.and_then(|t| t.accuracy).map(|a| a.fraction()),
        test_loss: test.map(|t| t.loss),
        median_step_s: median(&steps),
        median_fwd_bwd_s: median(&p.fwd_bwd_s),
        median_opt_step_s: median(&p.opt_step_s),
        mean_opt_step_s: (!p.opt_step_s.is_empty())
            .then(|| p.opt_step_s.iter().sum::<f64>() / p.opt_step_s.len() as f64),
        wall_s: p.wall_s,
        optimizer_state_bytes: optim.state_bytes(model.num_params()),
        peak_rss_bytes: peak_rss_bytes(),
        params_sha256: work.params_sha256(&model),
        machine: Machine::detect(),
    };
    let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
    write_atomic(&out.join("summary.json"), json.as_bytes())?;
    match ending {
        Ending::Completed => eprintln!("done: {}", out.display()),
        _ => eprintln!(
            "stopped after {} epochs ({} steps); continue with --resume {}",
            p.epochs_done,
            p.step,
            out.display()
        ),
    }
    Ok(RunResult {
        out: out.to_path_buf(),
        summary,
        rows: p.rows,
    })
}

/// The library optimizer's messages after training step `step` (1-based), in which `skipped`
/// parameter updates were skipped for a non-finite gradient: under `--nonfinite error` such a
/// gradient ends the run ([`TrainError::NonFinite`]); so does an error that `library` (the
/// library optimizer's config, `None` for adam) gives up on ([`OptimizerConfig::gives_up`]: a
/// parameter's steps refused or failed `max_linalg_failures` times in a row), as
/// [`TrainError::LinalgFailure`]; any other failed parameter update and the skips of
/// `--nonfinite skip` are warnings, returned as lines to print.
fn after_step(
    optim: &BuiltOptimizer,
    step: usize,
    skipped: u64,
    nonfinite: NonFinite,
    library: Option<&OptimizerConfig>,
) -> Result<Vec<String>, TrainError> {
    let error = optim.take_last_error();
    let warning = optim.take_last_warning();
    if nonfinite == NonFinite::Error && skipped > 0 {
        // The handle keeps the last error only: another failure in the same step may have
        // replaced the non-finite gradient's; the count still says it happened.
        let msg = match (&error, skipped) {
            (Some(e @ PrecondError::NonFiniteGradient { .. }), 1) => e.to_string(),
            (Some(e @ PrecondError::NonFiniteGradient { .. }), n) => {
                format!("{n} parameters had a non-finite gradient, the last: {e}")
            }
            (Some(e), n) => {
                format!("{n} parameter(s) had a non-finite gradient (last error: {e})")
            }
            (None, n) => format!("{n} parameter(s) had a non-finite gradient"),
        };
        return Err(TrainError::NonFinite { step, msg });
    }
    // The handle does not let a later error of the step hide one that gives up.
    if let (Some(e), Some(lib)) = (&error, library) {
        if lib.gives_up(e) {
            return Err(TrainError::LinalgFailure {
                step,
                error: e.clone(),
                limit: lib.max_linalg_failures,
            });
        }
    }
    let mut lines = Vec::new();
    if let Some(e) = error {
        lines.push(format!(
            "warning: step {step}: a parameter was not updated: {e}"
        ));
    }
    if let Some(w) = warning {
        lines.push(format!(
            "warning: step {step}: skipped {skipped} parameter update(s) (--nonfinite skip); \
             last: {w}"
        ));
    }
    Ok(lines)
}

fn sync(device: &Device) {
    // The Flex backend is eager; sync anyway so timings stay honest on any backend. An error
    // here would surface on the next read of a tensor.
    let _ = device.sync();
}

/// The line printed after each epoch: losses, accuracy, the epoch's median step times, elapsed
/// time and ETA.
fn epoch_line(
    p: &Progress,
    config: &TrainConfig,
    steps_per_epoch: usize,
    epochs_at_start: usize,
    session: &Instant,
) -> String {
    let Some(row) = p.rows.last() else {
        return String::new();
    };
    let recent = p.fwd_bwd_s.len().saturating_sub(steps_per_epoch);
    let fb = median(&p.fwd_bwd_s[recent..]).unwrap_or(0.0);
    let os = median(&p.opt_step_s[recent..]).unwrap_or(0.0);
    let done_here = (p.epochs_done - epochs_at_start).max(1);
    let per_epoch = session.elapsed().as_secs_f64() / done_here as f64;
    let eta = per_epoch * (config.epochs - p.epochs_done) as f64;
    let eval = match (config.tagger.is_some(), row.eval_accuracy) {
        (true, Some(acc)) => format!("eval {:.4}  accuracy {:.2}%", row.test_loss, 100.0 * acc),
        _ => format!("test {:.4}", row.test_loss),
    };
    format!(
        "epoch {}/{}  train {:.4}  {eval}  step {:.3}s (fwd+bwd {:.3}s, opt {:.3}s)  elapsed {}  ETA {}",
        row.epoch,
        config.epochs,
        row.train_loss,
        fb + os,
        fb,
        os,
        hms(row.wall_s),
        hms(eta)
    )
}

fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn write_csv(out: &Path, rows: &[EpochRow], tagger: bool) -> Result<(), TrainError> {
    let mut text = String::from(if tagger {
        "epoch,train_loss,eval_loss,eval_accuracy,eval_accuracy_root,wall_s\n"
    } else {
        "epoch,train_loss,test_loss,wall_s\n"
    });
    for r in rows {
        let (e, l, w) = (r.epoch, r.train_loss, r.wall_s);
        text.push_str(&match (tagger, r.eval_accuracy, r.eval_accuracy_root) {
            (true, Some(a), Some(b)) => format!("{e},{l},{},{a},{b},{w:.3}\n", r.test_loss),
            (true, _, _) => format!("{e},{l},{},,,{w:.3}\n", r.test_loss),
            (false, _, _) => format!("{e},{l},{},{w:.3}\n", r.test_loss),
        });
    }
    write_atomic(&out.join("epochs.csv"), text.as_bytes())
}

/// `runs/[tagger-]<optimizer>-<UTC yyyymmdd-hhmmss>`.
fn default_out(config: &TrainConfig) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let task = if config.tagger.is_some() {
        "tagger-"
    } else {
        ""
    };
    let optimizer = &config.optimizer.name;
    PathBuf::from("runs").join(format!("{task}{optimizer}-{}", utc_stamp(secs)))
}

/// `yyyymmdd-hhmmss` (UTC) of a Unix time.
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let tod = secs % 86_400;
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::mnist;
    use crate::models::autoencoder::{sigmoid_cross_entropy, Autoencoder};
    use crate::training::optimizers::{build_optimizer_for, OptimizerHparams};
    use burn::tensor::{Tensor, TensorData};

    #[test]
    fn peak_rss_resets_between_runs() {
        // 256 MB touched then freed (a large allocation is returned to the OS on drop).
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        drop(big);
        let before = peak_rss_bytes().unwrap();
        reset_peak_rss();
        let after = peak_rss_bytes().unwrap();
        assert!(
            after + (200 << 20) < before,
            "peak {before} -> {after} after the reset"
        );
    }
    use std::sync::atomic::AtomicBool;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        // 100 steps, 5 of warmup: 1/5 .. 5/5, then (101 − t)/96, last step 1/96.
        let s = lr_schedule(100, 0.05);
        let f = |step: usize| s.factor(step as u64 + 1);
        assert!((f(0) - 0.2).abs() < 1e-12);
        assert!((f(4) - 1.0).abs() < 1e-12);
        assert!((f(5) - 95.0 / 96.0).abs() < 1e-12);
        assert!((f(99) - 1.0 / 96.0).abs() < 1e-12);
        assert!((f(52) - 48.0 / 96.0).abs() < 1e-12);
        // No warmup: (11 − t)/11 from the first step.
        assert!((lr_schedule(10, 0.0).factor(1) - 10.0 / 11.0).abs() < 1e-12);
        let s = lr_schedule(6000, 0.05);
        assert!(s.validate().is_ok());
        let f: Vec<f64> = (1..=6000).map(|t| s.factor(t)).collect();
        assert!(f.iter().all(|&x| x > 0.0 && x <= 1.0));
    }

    #[test]
    fn utc_stamp_formats_known_dates() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400 + 3_661), "20000229-010101");
        assert_eq!(utc_stamp(1_767_225_599), "20251231-235959");
    }

    #[test]
    fn flags_override_the_config_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.toml");
        fs::write(&path, "lr = 0.01\nbatch_size = 50\nepochs = 3\n").unwrap();
        let file = settings_from_toml(&path, false).map(|(s, _)| s).unwrap();
        let flags = TrainSettings {
            lr: Some(0.5),
            ..Default::default()
        };
        let c = TrainConfig::from_settings(&flags.or(file)).unwrap();
        assert_eq!(c.optimizer.lr, 0.5);
        assert_eq!((c.batch_size, c.epochs), (50, 3));
        assert_eq!(c.optimizer.beta2, 0.999);

        fs::write(&path, "learning_rate = 0.01\n").unwrap();
        let err = settings_from_toml(&path, false)
            .map(|(s, _)| s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn defaults_are_the_benchmark() {
        let c = TrainConfig::from_settings(&TrainSettings::default()).unwrap();
        assert_eq!((c.batch_size, c.epochs, c.seed), (1000, 100, 0));
        assert_eq!(c.optimizer.name, "adam");
        assert_eq!(c.optimizer.lr, 3e-4);
        assert_eq!(c.warmup_frac, 0.05);
        assert_eq!(c.data, PathBuf::from(DEFAULT_DATA));
        let bad = TrainSettings {
            batch_size: Some(0),
            ..Default::default()
        };
        assert!(TrainConfig::from_settings(&bad).is_err());
    }

    /// Continues the run in `dir` from its checkpoint to its last epoch.
    fn resume_to_the_end(dir: &Path) -> RunResult {
        let args = TrainArgs {
            resume: Some(dir.to_path_buf()),
            ..Default::default()
        };
        run(&args, &AtomicBool::new(false)).unwrap()
    }

    /// MNIST when present (the real files), else a synthetic fixture written into `tmp`.
    fn data_dir(tmp: &Path) -> PathBuf {
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
        if real.join("train-images-idx3-ubyte.gz").is_file() {
            return real;
        }
        let dir = tmp.join("mnist");
        mnist::write_fixture(&dir, 2000, 500, true).unwrap();
        dir
    }

    fn settings(tmp: &Path, out: &str, limit: usize, bs: usize, epochs: usize) -> TrainSettings {
        TrainSettings {
            data: Some(data_dir(tmp)),
            out: Some(tmp.join(out)),
            limit: Some(limit),
            test_limit: Some(200),
            batch_size: Some(bs),
            epochs: Some(epochs),
            ..Default::default()
        }
    }

    #[test]
    fn one_epoch_of_adam_lowers_the_training_loss() {
        let tmp = tempfile::tempdir().unwrap();
        let args = TrainArgs {
            settings: TrainSettings {
                lr: Some(1e-3),
                ..settings(tmp.path(), "run", 2000, 200, 1)
            },
            ..Default::default()
        };
        let r = run(&args, &AtomicBool::new(false)).unwrap();
        let first = r.summary.first_batch_loss.unwrap();
        let mean = r.summary.final_train_loss.unwrap();
        assert_eq!(r.summary.steps, 10);
        assert!(first > 400.0, "initial loss {first}");
        assert!(mean < first, "epoch mean {mean} vs first batch {first}");
        assert!(r.summary.complete);
        let csv = fs::read_to_string(r.out.join("epochs.csv")).unwrap();
        assert_eq!(csv.lines().count(), 2);
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(r.out.join("summary.json")).unwrap()).unwrap();
        for key in [
            "optimizer",
            "config",
            "epochs",
            "final_train_loss",
            "final_test_loss",
            "median_step_s",
            "median_fwd_bwd_s",
            "median_opt_step_s",
            "mean_opt_step_s",
            "optimizer_state_bytes",
            "peak_rss_bytes",
            "params_sha256",
            "machine",
        ] {
            assert!(!json[key].is_null(), "{key} missing");
        }
        assert_eq!(json["optimizer_state_bytes"], 2 * 2_837_314 * 4);
        assert!(r.out.join(CHECKPOINT).is_file());
    }

    #[test]
    fn stop_and_resume_is_bitwise_identical_to_a_straight_run() {
        let tmp = tempfile::tempdir().unwrap();
        let no_stop = AtomicBool::new(false);
        let straight = run(
            &TrainArgs {
                settings: settings(tmp.path(), "straight", 512, 128, 2),
                ..Default::default()
            },
            &no_stop,
        )
        .unwrap();

        let mut first = settings(tmp.path(), "split", 512, 128, 2);
        first.stop_after = Some(1);
        let part = run(
            &TrainArgs {
                settings: first,
                ..Default::default()
            },
            &no_stop,
        )
        .unwrap();
        assert_eq!(part.summary.ending, Ending::StopAfter);
        assert_eq!(part.summary.epochs, 1);
        assert!(!part.summary.complete);

        // A resumed run refuses changed hyperparameters.
        let changed = TrainArgs {
            settings: TrainSettings {
                lr: Some(0.5),
                ..Default::default()
            },
            resume: Some(part.out.clone()),
            ..Default::default()
        };
        let err = run(&changed, &no_stop).unwrap_err().to_string();
        assert!(err.contains("settings differ"), "{err}");

        let resumed = resume_to_the_end(&part.out);
        assert!(resumed.summary.complete);
        assert_eq!(resumed.summary.steps, straight.summary.steps);
        assert_eq!(
            resumed.summary.params_sha256,
            straight.summary.params_sha256
        );
        let losses = |r: &RunResult| -> Vec<(f64, f64)> {
            r.rows.iter().map(|r| (r.train_loss, r.test_loss)).collect()
        };
        assert_eq!(losses(&resumed), losses(&straight));
    }

    /// A synthetic treebank in `dir`: sentences over 12 words whose UPOS is a function of the
    /// word (so a tagger can learn it), XPOS empty. Returns (train, eval) paths.
    fn treebank(dir: &Path, sentences: usize, seed: u64) -> (PathBuf, PathBuf) {
        use rand::Rng;
        const TAGS: [&str; 4] = ["NOUN", "VERB", "DET", "ADJ"];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut write = |name: &str, n: usize| {
            let mut text = String::new();
            for s in 0..n {
                text.push_str(&format!("# sent_id = {s}\n"));
                let len = rng.random_range(2..9usize);
                for i in 1..=len {
                    let w: usize = rng.random_range(0..12);
                    let tag = TAGS[w % 4];
                    text.push_str(&format!("{i}\tw{w}\t_\t{tag}\t_\t_\t0\t_\t_\t_\n"));
                }
                text.push('\n');
            }
            let path = dir.join(name);
            fs::write(&path, text).unwrap();
            path
        };
        let train = write("train.conllu", sentences);
        let eval = write("dev.conllu", sentences / 4 + 1);
        (train, eval)
    }

    /// A small tagger (1 layer, width 16) on [`treebank`] in `tmp`, run directory `tmp/out`.
    pub(crate) fn tagger_args(tmp: &Path, out: &str, optimizer: &str, epochs: usize) -> TrainArgs {
        let (train, eval) = treebank(tmp, 96, 3);
        TrainArgs {
            settings: TrainSettings {
                out: Some(tmp.join(out)),
                optimizer: Some(optimizer.into()),
                epochs: Some(epochs),
                batch_size: Some(32),
                ..Default::default()
            },
            tagger: Some(TaggerSettings {
                train: Some(train),
                eval: Some(eval.clone()),
                test: Some(eval),
                layers: Some(1),
                width: Some(16),
                mlp: Some(32),
                heads: Some(2),
                dropout: Some(0.1),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The tagger goes through the same loop: it learns the word → tag map of the synthetic
    /// treebank (well above the 25% of guessing), writes the tagger's columns and summary keys,
    /// and a run stopped mid-way and resumed (dropout included) equals a straight one bitwise.
    #[test]
    fn tagger_learns_writes_its_outputs_and_resumes_bitwise() {
        let tmp = tempfile::tempdir().unwrap();
        let no_stop = AtomicBool::new(false);
        let mut args = tagger_args(tmp.path(), "straight", "adam", 12);
        args.settings.lr = Some(1e-2);
        let straight = run(&args, &no_stop).unwrap();
        let s = &straight.summary;
        assert_eq!(s.task, "tagger");
        assert_eq!(s.steps, 12 * 3, "96 sentences in batches of 32");
        let best = s.best_eval.unwrap();
        assert!(best > 0.6, "best eval accuracy {best}");
        assert!(s.best_eval_root.unwrap() > best, "ROOT is always right");
        assert!(s.test_accuracy.is_some() && s.test_loss.is_some());
        assert!(s.final_train_loss.unwrap() < s.first_batch_loss.unwrap());
        let csv = fs::read_to_string(straight.out.join("epochs.csv")).unwrap();
        assert!(
            csv.starts_with("epoch,train_loss,eval_loss,eval_accuracy,eval_accuracy_root,wall_s\n")
        );
        assert_eq!(csv.lines().count(), 13);
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(straight.out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(json["config"]["tagger"]["tag"], "auto");
        assert!((json["best_eval"].as_f64().unwrap() - best).abs() < 1e-12);

        let mut first = tagger_args(tmp.path(), "split", "adam", 12);
        first.settings.lr = Some(1e-2);
        first.settings.stop_after = Some(5);
        let part = run(&first, &no_stop).unwrap();
        assert_eq!(part.summary.ending, Ending::StopAfter);
        assert!(part.summary.test_accuracy.is_none(), "test only at the end");
        // The autoencoder command refuses a tagger run, and changed tagger settings are refused.
        let wrong = TrainArgs {
            resume: Some(part.out.clone()),
            ..Default::default()
        };
        let err = run(&wrong, &no_stop).unwrap_err().to_string();
        assert!(err.contains("tagger run"), "{err}");
        let changed = TrainArgs {
            resume: Some(part.out.clone()),
            tagger: Some(TaggerSettings {
                width: Some(32),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = run(&changed, &no_stop).unwrap_err().to_string();
        assert!(err.contains("settings differ"), "{err}");
        let resumed = run(
            &TrainArgs {
                resume: Some(part.out.clone()),
                tagger: Some(TaggerSettings::default()),
                ..Default::default()
            },
            &no_stop,
        )
        .unwrap();
        assert_eq!(resumed.summary.params_sha256, s.params_sha256);
        assert_eq!(resumed.summary.best_eval, s.best_eval);
        assert_eq!(resumed.summary.test_accuracy, s.test_accuracy);
    }

    /// The library's methods train the tagger with its per-parameter rules: the embedding table
    /// is not preconditioned (graft or SGD), and the state bytes are the library's.
    #[test]
    fn tagger_trains_with_shared_basis_and_either_embedding_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for (i, rule) in [EmbeddingRule::Graft, EmbeddingRule::Sgd]
            .into_iter()
            .enumerate()
        {
            let mut args = tagger_args(tmp.path(), &format!("sb{i}"), "shared-basis", 6);
            args.settings.lr = Some(1e-3);
            args.tagger.as_mut().unwrap().embedding = Some(rule);
            let r = run(&args, &AtomicBool::new(false)).unwrap();
            let s = &r.summary;
            assert!(
                s.final_train_loss.unwrap() < s.first_batch_loss.unwrap(),
                "{rule:?}"
            );
            bytes.push(s.optimizer_state_bytes);
        }
        // SGD with momentum keeps one buffer for the embedding table, grafting two.
        assert!(bytes[1] < bytes[0], "{bytes:?}");
    }

    /// Block Adam and SOAP (no grafting, every shape) take the embedding table themselves under
    /// the default rule: their state then holds its moments, more than the one momentum buffer
    /// of `--embedding sgd`; the methods that graft keep it out of the preconditioner.
    #[test]
    fn tagger_leaves_the_embedding_to_methods_without_grafting() {
        use crate::training::optimizers::{takes_every_shape, OptimizerHparams};
        for (name, own) in [
            ("soap", true),
            ("block-adam", true),
            ("shared-basis", false),
            ("shampoo-1000", false),
            ("sketchy", false),
            ("adam", false),
            ("muon", false),
        ] {
            let h = OptimizerHparams::preset(name).unwrap();
            assert_eq!(takes_every_shape(&h).unwrap(), own, "{name}");
        }
        let tmp = tempfile::tempdir().unwrap();
        for name in ["soap", "block-adam"] {
            let mut bytes = Vec::new();
            for rule in [EmbeddingRule::Graft, EmbeddingRule::Sgd] {
                let mut args = tagger_args(tmp.path(), &format!("{name}-{rule:?}"), name, 1);
                args.tagger.as_mut().unwrap().embedding = Some(rule);
                let r = run(&args, &AtomicBool::new(false)).unwrap();
                bytes.push(r.summary.optimizer_state_bytes);
            }
            assert!(bytes[0] > bytes[1], "{name}: {bytes:?}");
        }
    }

    #[test]
    fn tagger_settings_come_from_flags_and_toml() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.toml");
        fs::write(
            &path,
            "lr = 0.01\nwidth = 64\nheads = 2\ntag = \"upos\"\nembedding = \"sgd\"\n",
        )
        .unwrap();
        let (common, own) = settings_from_toml(&path, true).unwrap();
        assert_eq!(common.lr, Some(0.01));
        assert_eq!(own.width, Some(64));
        assert_eq!(own.tag, Some(TagChoice::Upos));
        assert_eq!(own.embedding, Some(EmbeddingRule::Sgd));
        // Every tagger key is a field of TaggerSettings (and taken from the file).
        for key in TAGGER_KEYS {
            let value = match *key {
                "tag" => "\"upos\"".to_string(),
                "size" => "\"paper\"".to_string(),
                "embedding" => "\"sgd\"".to_string(),
                "dropout" => "0.5".to_string(),
                "train" | "eval" | "test" => "\"x\"".to_string(),
                _ => "3".to_string(),
            };
            fs::write(&path, format!("{key} = {value}\n")).unwrap();
            let (_, own) = settings_from_toml(&path, true).unwrap();
            assert_ne!(own, TaggerSettings::default(), "{key}");
            // The autoencoder's config refuses it.
            assert!(settings_from_toml(&path, false).is_err(), "{key}");
        }
        // Defaults: the small preset on PTNK.
        let c = TrainConfig::resolve(&TrainSettings::default(), Some(&TaggerSettings::default()))
            .unwrap();
        let t = c.tagger.as_ref().unwrap();
        assert_eq!(
            (t.layers, t.width, t.mlp, t.heads, t.dropout),
            (2, 128, 512, 4, 0.3)
        );
        assert_eq!((c.batch_size, c.epochs), (128, 30));
        assert_eq!(t.train, PathBuf::from(DEFAULT_TRAIN));
        assert_eq!(c.optimizer.lr, 3e-3);
        // Shampoo starts preconditioning at step 11 on the tagger (101 on the autoencoder)
        // unless told otherwise; each task has its own lr, and the autoencoder's searched β1
        // and ε do not reach the tagger, whose search kept 0.9 and 1e-6.
        let start = |s: &TrainSettings, t: Option<&TaggerSettings>| {
            let c = TrainConfig::resolve(s, t).unwrap();
            let o = c.optimizer;
            (o.library.unwrap().start_step, o.lr, o.beta1, o.eps)
        };
        let shampoo = TrainSettings {
            optimizer: Some("shampoo-1000".into()),
            ..Default::default()
        };
        let tagger = TaggerSettings::default();
        let searched = crate::training::optimizers::autoencoder_searched("shampoo-1000").unwrap();
        for name in ["shampoo-1000", "sketchy"] {
            let s = TrainSettings {
                optimizer: Some(name.into()),
                ..Default::default()
            };
            let tagger_preset = (TAGGER_START_STEP, 1e-4, 0.9, 1e-6);
            assert_eq!(start(&s, Some(&tagger)), tagger_preset, "{name}");
            let autoencoder_preset = (101, searched.lr, searched.beta1, searched.eps);
            assert_eq!(start(&s, None), autoencoder_preset, "{name}");
        }
        // Shampoo(250) was not searched: the defaults on both tasks.
        let shampoo_250 = TrainSettings {
            optimizer: Some("shampoo-250".into()),
            ..Default::default()
        };
        assert_eq!(start(&shampoo_250, None), (101, 1e-4, 0.9, 1e-6));
        // Block Adam: its searched β2 too on the autoencoder; its own moments on the tagger.
        let block_adam = TrainSettings {
            optimizer: Some("block-adam".into()),
            ..Default::default()
        };
        let moments = |t: Option<&TaggerSettings>| {
            let o = TrainConfig::resolve(&block_adam, t).unwrap().optimizer;
            (o.lr, o.beta1, o.beta2, o.eps)
        };
        assert_eq!(moments(Some(&tagger)), (1e-2, 0.9, 0.999, 1e-8));
        let searched = crate::training::optimizers::autoencoder_searched("block-adam").unwrap();
        assert_eq!(
            moments(None),
            (
                searched.lr,
                searched.beta1,
                searched.beta2.unwrap(),
                searched.eps
            )
        );
        let given = TrainSettings {
            start_step: Some(31),
            ..shampoo.clone()
        };
        assert_eq!(start(&given, Some(&tagger)).0, 31);
        let paper = TaggerSettings {
            size: Some(SizePreset::Paper),
            layers: Some(3),
            ..Default::default()
        }
        .config();
        assert_eq!(
            (paper.layers, paper.width, paper.mlp, paper.heads),
            (3, 512, 2048, 8)
        );
        // Bad sizes and --data are refused with clear messages.
        let bad = TaggerSettings {
            width: Some(30),
            heads: Some(4),
            ..Default::default()
        };
        let err = TrainConfig::resolve(&TrainSettings::default(), Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("divisible"), "{err}");
        let data = TrainSettings {
            data: Some("x".into()),
            ..Default::default()
        };
        let err = TrainConfig::resolve(&data, Some(&TaggerSettings::default()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--train"), "{err}");
        // The rsqrt schedule: warmup to 1 at 10% of the steps, then sqrt(w / t).
        let sched = c.schedule(200);
        assert!((sched.factor(10) - 0.5).abs() < 1e-12);
        assert!((sched.factor(20) - 1.0).abs() < 1e-12);
        assert!((sched.factor(80) - 0.5).abs() < 1e-12);
    }

    /// A diverging run (here Adam at a huge rate) stops at the first non-finite loss with an
    /// error naming the step.
    #[test]
    fn divergence_stops_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let mut args = tagger_args(tmp.path(), "diverged", "adam", 12);
        args.settings.lr = Some(1e12);
        match run(&args, &AtomicBool::new(false)) {
            Err(TrainError::Diverged { step, loss }) => {
                assert!(step > 1 && step <= 36, "step {step}");
                assert!(!loss.is_finite());
            }
            other => panic!("expected divergence, got {:?}", other.map(|r| r.summary)),
        }
    }

    /// A malformed treebank stops the run with `file:line`.
    #[test]
    fn tagger_reports_a_bad_treebank_line() {
        let tmp = tempfile::tempdir().unwrap();
        let mut args = tagger_args(tmp.path(), "bad", "adam", 1);
        let bad = tmp.path().join("bad.conllu");
        fs::write(&bad, "1\tw\t_\tNOUN\t_\t_\t0\t_\t_\t_\n2\tw\t_\n").unwrap();
        args.tagger.as_mut().unwrap().train = Some(bad);
        let err = run(&args, &AtomicBool::new(false)).unwrap_err().to_string();
        assert!(err.contains("bad.conllu:2:"), "{err}");
    }

    #[test]
    fn interrupt_mid_epoch_then_resume_matches_a_straight_run() {
        let tmp = tempfile::tempdir().unwrap();
        let straight = run(
            &TrainArgs {
                settings: settings(tmp.path(), "straight", 256, 64, 1),
                ..Default::default()
            },
            &AtomicBool::new(false),
        )
        .unwrap();
        // The flag is already set: the run ends after its first step.
        let part = run(
            &TrainArgs {
                settings: settings(tmp.path(), "split", 256, 64, 1),
                ..Default::default()
            },
            &AtomicBool::new(true),
        )
        .unwrap();
        assert_eq!(part.summary.ending, Ending::Interrupted);
        assert_eq!((part.summary.steps, part.summary.epochs), (1, 0));
        assert!(part.out.join("summary.json").is_file());
        let resumed = resume_to_the_end(&part.out);
        assert_eq!(
            resumed.summary.params_sha256,
            straight.summary.params_sha256
        );
        assert_eq!(resumed.rows, {
            let mut rows = straight.rows.clone();
            rows[0].wall_s = resumed.rows[0].wall_s;
            rows
        });
    }

    /// Our optimizer through the whole loop: it lowers the loss, its state (basis, coefficients,
    /// lost mass, grafting, momentum) survives the checkpoint, and a run interrupted after its
    /// first step then resumed ends bitwise where a straight run does.
    #[test]
    fn shared_basis_trains_and_resumes_bitwise() {
        let tmp = tempfile::tempdir().unwrap();
        let sb = |out: &str| TrainSettings {
            optimizer: Some("shared-basis".into()),
            // Small enough for the synthetic fixture too (at 1e-4 its loss rises at first).
            lr: Some(2e-5),
            ..settings(tmp.path(), out, 384, 64, 1)
        };
        let straight = run(
            &TrainArgs {
                settings: sb("straight"),
                ..Default::default()
            },
            &AtomicBool::new(false),
        )
        .unwrap();
        let first = straight.summary.first_batch_loss.unwrap();
        let mean = straight.summary.final_train_loss.unwrap();
        // The epoch's mean over 6 steps (the preset's small ridge takes larger first steps
        // than the paper's: 0.913 of the first batch here).
        assert!(
            mean < 0.95 * first,
            "epoch mean {mean} vs first batch {first}"
        );
        assert!(straight.summary.optimizer_state_bytes > 2 * 2_837_314 * 4);
        let part = run(
            &TrainArgs {
                settings: sb("split"),
                ..Default::default()
            },
            &AtomicBool::new(true),
        )
        .unwrap();
        assert_eq!(part.summary.steps, 1);
        let resumed = resume_to_the_end(&part.out);
        assert_eq!(
            resumed.summary.params_sha256,
            straight.summary.params_sha256
        );
        assert_eq!(
            resumed.summary.optimizer_state_bytes,
            straight.summary.optimizer_state_bytes
        );
    }

    #[test]
    fn shared_basis_flags_are_refused_for_adam() {
        let s = TrainSettings {
            rank: Some(8),
            ..Default::default()
        };
        let err = TrainConfig::from_settings(&s).unwrap_err().to_string();
        assert_eq!(err, "--rank does not apply to adam");
        let s = TrainSettings {
            optimizer: Some("shared-basis".into()),
            rank: Some(8),
            beta2: Some(0.99),
            ..Default::default()
        };
        let c = TrainConfig::from_settings(&s).unwrap();
        let sb = c.optimizer.library.unwrap();
        assert_eq!(
            (sb.rank, sb.power_iters, sb.block_size, sb.graft.as_str()),
            (Some(8), Some(1), None, "rmsprop-normalized")
        );
        let s = TrainSettings {
            optimizer: Some("shampoo-1000".into()),
            rank: Some(8),
            ..Default::default()
        };
        let err = TrainConfig::from_settings(&s).unwrap_err().to_string();
        assert_eq!(err, "--rank does not apply to shampoo-1000");
        assert_eq!((c.optimizer.beta2, c.optimizer.eps), (0.99, 1e-6));
    }

    #[test]
    fn nonfinite_flag_is_parsed_recorded_and_refused_for_adam() {
        use clap::Parser;
        use precond::optimizer::NonFinitePolicy;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            settings: TrainSettings,
        }
        let parse = |v: &str| Cli::try_parse_from(["x", "--nonfinite", v]).map(|c| c.settings);
        assert_eq!(parse("skip").unwrap().nonfinite, Some(NonFinite::Skip));
        assert_eq!(parse("error").unwrap().nonfinite, Some(NonFinite::Error));
        let err = parse("ignore").err().unwrap().to_string();
        assert!(err.contains("possible values: error, skip"), "{err}");
        assert_eq!(Cli::try_parse_from(["x"]).unwrap().settings.nonfinite, None);

        // Recorded in the config (summary.json), default error; old records load as error.
        let sb = |nonfinite| TrainSettings {
            optimizer: Some("shared-basis".into()),
            nonfinite,
            ..Default::default()
        };
        let c = TrainConfig::from_settings(&sb(Some(NonFinite::Skip))).unwrap();
        assert_eq!(
            c.optimizer.library.as_ref().unwrap().nonfinite,
            NonFinite::Skip
        );
        let lib = crate::training::optimizers::library_config(&c.optimizer).unwrap();
        assert_eq!(lib.config().nonfinite, NonFinitePolicy::Skip);
        let mut json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["optimizer"]["library"]["nonfinite"], "skip");
        let default = TrainConfig::from_settings(&sb(None)).unwrap();
        let lib = default.optimizer.library.as_ref().unwrap();
        assert_eq!(lib.nonfinite, NonFinite::Error);
        assert_eq!(
            serde_json::to_value(&default).unwrap()["optimizer"]["library"]["nonfinite"],
            "error"
        );
        json["optimizer"]["library"]
            .as_object_mut()
            .unwrap()
            .remove("nonfinite");
        let old: TrainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old.optimizer.library.unwrap().nonfinite, NonFinite::Error);

        // The TOML config file takes it too, with the flag's values; a flag overrides it.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.toml");
        fs::write(&path, "optimizer = \"sketchy\"\nnonfinite = \"skip\"\n").unwrap();
        let file = settings_from_toml(&path, false).map(|(s, _)| s).unwrap();
        assert_eq!(file.nonfinite, Some(NonFinite::Skip));
        let c = TrainConfig::from_settings(&file.clone()).unwrap();
        assert_eq!(c.optimizer.library.unwrap().nonfinite, NonFinite::Skip);
        let flags = TrainSettings {
            nonfinite: Some(NonFinite::Error),
            ..Default::default()
        };
        let c = TrainConfig::from_settings(&flags.or(file)).unwrap();
        assert_eq!(c.optimizer.library.unwrap().nonfinite, NonFinite::Error);
        fs::write(&path, "nonfinite = \"ignore\"\n").unwrap();
        let err = settings_from_toml(&path, false)
            .map(|(s, _)| s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ignore"), "{err}");

        // burn's Adam has no such policy.
        for v in [NonFinite::Skip, NonFinite::Error] {
            let s = TrainSettings {
                nonfinite: Some(v),
                ..Default::default()
            };
            let err = TrainConfig::from_settings(&s).unwrap_err().to_string();
            assert_eq!(err, "--nonfinite does not apply to adam");
        }
    }

    /// A NaN gradient in the first weight of a small autoencoder: under skip, `after_step`
    /// returns the warning naming the training step, the parameter and its step, and the weight
    /// keeps its bits; under error it ends the run with the same names.
    #[test]
    fn after_step_stops_on_error_and_warns_on_skip() {
        use burn::module::Param;
        let device = Device::flex().autodiff();
        for nonfinite in [NonFinite::Skip, NonFinite::Error] {
            let model = Autoencoder::with_widths(&[6, 5, 4, 3, 4, 6], 1, &device);
            let mut h = OptimizerHparams::preset("shared-basis").unwrap();
            h.library.as_mut().unwrap().nonfinite = nonfinite;
            let mut built = build_optimizer_for(&h, &model).unwrap();
            let x = Tensor::<2>::ones([2, 6], &device);
            let loss = sigmoid_cross_entropy(model.forward(x.clone()), x);
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            let w: &Param<Tensor<2>> = &model.layers[0].weight;
            let mut bad = grads
                .get::<2>(w.id)
                .unwrap()
                .try_into_vec_as::<f32>()
                .unwrap();
            bad[4] = f32::NAN;
            grads.remove::<2>(w.id);
            grads.register::<2>(
                w.id,
                Tensor::from_data(TensorData::new(bad, [6, 5]), &Device::flex()),
            );
            let before = model.layers[0]
                .weight
                .val()
                .try_into_vec_as::<f32>()
                .unwrap();
            let before_b = model.layers[0]
                .bias
                .as_ref()
                .unwrap()
                .val()
                .try_into_vec_as::<f32>()
                .unwrap();
            let skips = built.nonfinite_skips();
            let model = built.optim.step(1e-3, model, grads);
            let skipped = built.nonfinite_skips() - skips;
            assert_eq!(skipped, 1);
            let after = model.layers[0]
                .weight
                .val()
                .try_into_vec_as::<f32>()
                .unwrap();
            assert_eq!(after, before, "the NaN weight keeps its value");
            let after_b = model.layers[0]
                .bias
                .as_ref()
                .unwrap()
                .val()
                .try_into_vec_as::<f32>()
                .unwrap();
            assert_ne!(after_b, before_b, "its bias steps");
            let what = "non-finite gradient at step 1 in parameter layers.0.weight with shape \
                        [6, 5]";
            match (nonfinite, after_step(&built, 7, skipped, nonfinite, None)) {
                (NonFinite::Skip, Ok(lines)) => assert_eq!(
                    lines,
                    vec![format!(
                        "warning: step 7: skipped 1 parameter update(s) (--nonfinite skip); \
                         last: {what}"
                    )]
                ),
                (NonFinite::Error, Err(e)) => {
                    assert!(matches!(e, TrainError::NonFinite { step: 7, .. }));
                    assert!(
                        e.to_string().starts_with(&format!("step 7: {what}; ")),
                        "{e}"
                    );
                }
                (p, other) => panic!("{p:?}: {other:?}"),
            }
            // Everything was taken: nothing is reported twice.
            assert!(after_step(&built, 8, 0, nonfinite, None)
                .unwrap()
                .is_empty());
            // Under error a counted skip stops the run even when its message was replaced.
            let e = after_step(&built, 9, 2, NonFinite::Error, None).unwrap_err();
            assert_eq!(
                e.to_string(),
                "step 9: 2 parameter(s) had a non-finite gradient; the run stops here \
                 (--nonfinite error) without saving this step; --nonfinite skip skips such \
                 updates instead"
            );
        }
    }

    /// A parameter refused at every step (Block Adam's second moment overflows on a gradient
    /// entry of 1e30 in the first weight, so its step 1 is refused again and again): the first
    /// two refusals are warnings naming the run (1 and 2 failed steps in a row), the third
    /// reaches the library's limit of 3 and ends the run, naming the training step and the
    /// error; the weight keeps its bits throughout. Without a library config (adam) the fourth
    /// is a warning again.
    #[test]
    fn after_step_stops_when_a_parameter_gives_up() {
        use burn::module::Param;
        let device = Device::flex().autodiff();
        let mut model = Autoencoder::with_widths(&[6, 5, 4, 3, 4, 6], 1, &device);
        let h = OptimizerHparams::preset("block-adam").unwrap();
        let lib = library_config(&h).unwrap().config().clone();
        assert_eq!(lib.max_linalg_failures, 3);
        let mut built = build_optimizer_for(&h, &model).unwrap();
        let x = Tensor::<2>::ones([2, 6], &device);
        let weight = |m: &Autoencoder| m.layers[0].weight.val().try_into_vec_as::<f32>().unwrap();
        let first = weight(&model);
        for t in 1..=4u64 {
            let loss = sigmoid_cross_entropy(model.forward(x.clone()), x.clone());
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            let w: &Param<Tensor<2>> = &model.layers[0].weight;
            let mut bad = grads
                .get::<2>(w.id)
                .unwrap()
                .try_into_vec_as::<f32>()
                .unwrap();
            bad[4] = 1e30;
            let id = w.id;
            grads.remove::<2>(id);
            grads.register::<2>(
                id,
                Tensor::from_data(TensorData::new(bad, [6, 5]), &Device::flex()),
            );
            model = built.optim.step(1e-3, model, grads);
            assert_eq!(weight(&model), first, "step {t}: the refused weight moved");
            let what = format!(
                "linear algebra failure in block eigendecomposition at step 1 ({t} failed \
                 step(s) in a row)"
            );
            let step = 10 + t as usize;
            let config = (t < 4).then_some(&lib);
            match after_step(&built, step, 0, NonFinite::Error, config) {
                Ok(lines) if t != 3 => assert_eq!(
                    lines,
                    vec![format!(
                        "warning: step {step}: a parameter was not updated: {what}"
                    )]
                ),
                Err(e) if t == 3 => {
                    assert!(
                        matches!(
                            &e,
                            TrainError::LinalgFailure {
                                step: 13,
                                limit: 3,
                                error: PrecondError::LinalgFailure { consecutive: 3, .. },
                            }
                        ),
                        "{e:?}"
                    );
                    assert_eq!(
                        e.to_string(),
                        format!(
                            "step 13: a parameter no longer moves: {what}; the run stops here \
                             without saving this step (the library gives up after 3 failed \
                             steps in a row)"
                        )
                    );
                }
                other => panic!("step {t}: {other:?}"),
            }
        }
    }

    #[test]
    fn checkpoint_errors_are_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CHECKPOINT), b"garbage").unwrap();
        let args = TrainArgs {
            resume: Some(dir.clone()),
            ..Default::default()
        };
        let err = run(&args, &AtomicBool::new(false)).unwrap_err().to_string();
        assert!(
            err.ends_with("not a precond checkpoint (bad magic)"),
            "{err}"
        );
        let args = TrainArgs {
            resume: Some(tmp.path().join("nope")),
            ..Default::default()
        };
        let err = run(&args, &AtomicBool::new(false)).unwrap_err().to_string();
        assert!(err.contains("checkpoint.bin"), "{err}");
    }
}
