//! hearth's trainer: the Llama-family model on burn, and (as they land) the objectives and
//! the one training loop they share.

pub mod batch;
pub mod chat;
pub mod choices;
pub mod counseling_eval;
pub mod device;
pub mod dist;
mod error;
pub mod evaluate;
pub mod examples;
mod fnv;
pub mod generate;
pub mod heap;
pub mod inspect;
pub mod jsonl_process;
pub mod logits;
pub mod model;
pub mod objectives;
pub mod pipeline;
pub mod recipe;
pub mod ref_cache;
pub mod report;
pub mod rewards;
pub mod selftest;
pub mod signals;
pub mod train;

pub use checkpoints::run_dir;
pub use error::TrainerError;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TrainerError>;
