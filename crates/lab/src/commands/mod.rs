//! One module per subcommand of `precond` (`train` is [`crate::training::run`]).

pub mod analyze;
pub mod bench;
pub mod compare;
pub mod replay;
pub mod report;
pub mod search;
