//! `precond`: the command line of the precond project (benchmarks, replay, reports).

mod commands;
mod data;
mod models;
mod training;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use commands::{analyze, bench, compare, replay, report, search};

#[derive(Debug, Parser)]
#[command(
    name = "precond",
    version,
    about = "Second-order optimizers: benchmarks and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Top-level subcommands; add one variant and one match arm per new subcommand.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once: variant sizes do not matter
enum Command {
    /// Train a benchmark model
    #[command(subcommand)]
    Train(TrainTask),
    /// Train a benchmark with several optimizers, then report them together (the main job)
    #[command(subcommand)]
    Compare(CompareTask),
    /// Markdown table (as the paper's Table 2) and loss plots of run directories
    Report(report::ReportArgs),
    /// Time training steps and optimizer steps of every optimizer in one process
    #[command(subcommand)]
    Bench(bench::BenchTask),
    /// Replay a (T, b, m) gradient .npy through a preconditioner; saves the raw directions u_t
    /// (θ_{t+1} = θ_t + lr·u_t)
    #[command(long_about = replay::LONG_ABOUT)]
    Replay(replay::ReplayArgs),
    /// Random hyperparameter search of one optimizer (resumable): one run directory per trial,
    /// summary.md and best.toml in --out
    #[command(subcommand)]
    Search(search::SearchTask),
    /// The evidence behind the method on your own model and data: block structure, low-rank
    /// features, shared vs independent bases, ablations, regret (CSV + PNG/SVG in --out)
    #[command(subcommand)]
    Analyze(analyze::AnalyzeTask),
}

#[derive(Debug, Subcommand)]
enum CompareTask {
    /// The MNIST autoencoder with each optimizer at its preset; report.md and plots in --out
    Autoencoder(compare::CompareArgs),
    /// The Transformer tagger with each optimizer at its preset; report.md and plots in --out
    Tagger(compare::CompareTaggerArgs),
}

#[derive(Debug, Subcommand)]
enum TrainTask {
    /// The paper's MNIST autoencoder benchmark (NOTES.md §6)
    Autoencoder(training::TrainArgs),
    /// The paper's Transformer POS tagger on Universal Dependencies (NOTES.md §6; default: UD
    /// Ancient Greek PTNK, the small model)
    Tagger(training::TaggerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match cli.command {
        Command::Train(task) => {
            let args = match task {
                TrainTask::Autoencoder(args) => args,
                TrainTask::Tagger(args) => args.into(),
            };
            let stop = interrupt_flag();
            training::run(&args, &stop)
                .map(|r| {
                    let loss = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
                    let s = &r.summary;
                    let eval = match s.best_eval {
                        Some(best) => format!(
                            "eval loss {}, best eval accuracy {:.2}%",
                            loss(s.final_test_loss),
                            100.0 * best
                        ),
                        None => format!("test loss {}", loss(s.final_test_loss)),
                    };
                    println!(
                        "{}: {} epochs, train loss {}, {eval}, params sha256 {}",
                        r.out.display(),
                        s.epochs,
                        loss(s.final_train_loss),
                        s.params_sha256
                    );
                    // 130: the conventional status of a run ended by SIGINT.
                    match r.summary.ending {
                        training::Ending::Interrupted => ExitCode::from(130),
                        _ => ExitCode::SUCCESS,
                    }
                })
                .map_err(Into::into)
        }
        Command::Compare(task) => {
            let stop = interrupt_flag();
            match task {
                CompareTask::Autoencoder(args) => compare::run(&args, &stop),
                CompareTask::Tagger(args) => compare::run_tagger(&args, &stop),
            }
            .map(|done| {
                if done {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(130)
                }
            })
            .map_err(Into::into)
        }
        Command::Report(args) => report::cli(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
        Command::Bench(bench::BenchTask::Step(args)) => bench::step(&args)
            .map(|report| {
                println!("{}", bench::step_table(&report));
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Bench(bench::BenchTask::Optim(args)) => bench::optim(&args)
            .map(|report| {
                println!("{}", bench::optim_table(&report));
                if !args.no_scaling {
                    println!("scaling curves: {}", args.out.display());
                }
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Replay(args) => replay::command(&args).map_err(Into::into),
        Command::Search(task) => {
            let stop = interrupt_flag();
            search::command(&task, &stop)
                .map(|done| {
                    if done {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(130)
                    }
                })
                .map_err(Into::into)
        }
        Command::Analyze(task) => {
            let stop = interrupt_flag();
            analyze::command(&task, &stop)
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

/// A flag set by the first Ctrl-C (a second one ends the process at once).
fn interrupt_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted again: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: stopping after the current step (Ctrl-C again to quit now)");
    });
    if let Err(e) = installed {
        eprintln!("warning: Ctrl-C handler not installed: {e}");
    }
    stop
}
