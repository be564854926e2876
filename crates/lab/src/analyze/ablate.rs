//! `precond analyze ablate` (being written).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use super::AnalyzeError;

/// `precond analyze ablate` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AblateArgs {
    /// Output directory (CSV, PNG, SVG)
    #[arg(long)]
    pub out: PathBuf,
    /// A small configuration that finishes in about a minute on 2 cores
    #[arg(long)]
    pub quick: bool,
}

pub fn run(args: &AblateArgs, _stop: &AtomicBool) -> Result<(), AnalyzeError> {
    Err(AnalyzeError::Invalid(format!(
        "analyze ablate: not implemented ({})",
        args.out.display()
    )))
}
