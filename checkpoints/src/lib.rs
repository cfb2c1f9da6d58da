//! Hugging Face checkpoints for hearth: `config.json`, single or sharded safetensors, read
//! through memory maps and written back in the layout transformers expects; and GGUF files,
//! read as if they were one ([`gguf`]).
//!
//! This crate knows nothing about burn: it hands out raw little-endian tensor bytes plus dtype
//! and shape, so the model can convert one tensor at a time and never hold the weights twice.

mod config;
mod error;
pub mod gguf;
pub mod guard;
pub mod manifest;
pub mod nf4;
pub mod peft;
pub mod pending;
mod read;
pub mod run_dir;
pub mod run_state;
pub mod small_file;
pub mod tensorboard;
mod write;

pub use config::{MAX_LAYERS, ModelConfig, ModelType, RopeScaling, WeightDtype};
pub use error::CheckpointError;
pub use manifest::{MANIFEST, verify_manifest, write_manifest};
pub use read::{TensorRef, WeightFiles};
pub use write::{
    OwnedTensor, SaveOptions, save_weights, write_bytes, write_safetensors, write_text,
};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, CheckpointError>;

/// File names of the Hugging Face layout.
pub mod names {
    /// Model configuration.
    pub const CONFIG: &str = "config.json";
    /// Unsharded weights.
    pub const SINGLE: &str = "model.safetensors";
    /// Index of a sharded set.
    pub const INDEX: &str = "model.safetensors.index.json";
    /// Tokenizer, when the checkpoint ships one.
    pub const TOKENIZER: &str = "tokenizer.json";
}
