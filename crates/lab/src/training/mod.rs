//! Training: a run's configuration, the one training loop of both benchmarks, the two tasks it
//! trains, the optimizer presets, checkpoints, and time and memory accounting.
//!
//! The modules depend one way: `config` ← `tasks` ← `run`, with `optimizers`, `checkpoint` and
//! `accounting` beneath `run`.

pub mod accounting;
pub mod checkpoint;
pub mod config;
pub mod optimizers;
pub mod progress;
pub mod run;
pub mod tasks;

pub use accounting::*;
pub use checkpoint::*;
pub use config::*;
pub use run::*;
