//! The ops of a Llama-family forward pass, each behind one function so a fused kernel can
//! replace its reference twin without the model changing.
//!
//! - [`reference`]: plain burn tensor ops that work on every backend and under autodiff.
//!   The reference is the specification the fused kernels are tested against, so it stays
//!   as obvious as the math.
//! - [`fused`]: the same ops through a burn backend extension each: CubeCL kernels,
//!   forward and backward, on the Cube backends (`cube`), the primitive-op twin on flex
//!   (and on Cube for ops without a kernel), and one autodiff node per op with a
//!   hand-written backward.
//!
//! Everything of one op but its kernel is one file, `ops/<op>.rs`; its kernel is
//! `cube/<op>.rs`. The functions at the crate root choose between reference and fused
//! with [`Kernels`] (the recipe's `kernels` switch); past that choice, burn's `Dispatch`
//! routes to the backend's implementation, so that choice is the only dispatch written
//! here.
//!
//! RMSNorm, SwiGLU and RoPE have CubeCL kernels, forward and backward.
//! The head's log-probs are a chunked autodiff op whose backward rebuilds one chunk's
//! logits at a time from the saved log-sum-exp; on GPU each chunk runs burn's matmul plus
//! two CubeCL kernels (row statistics, and the logits' gradient). Attention is one autodiff
//! op too: on GPU a CubeCL flash-attention kernel (forward, and a two-launch backward),
//! on flex a blocked twin of primitive ops; both keep only the output and each query's
//! softmax statistics. Entropy, a metric without gradient, always runs its reference.

pub mod cpu;
#[cfg(feature = "gpu")]
mod cube;
pub mod fused;
pub mod launches;
mod mode;
mod ops;
pub mod reference;
pub mod selftest;

pub use mode::{
    AttentionPath, Kernels, attention_path, fused_on, kernels, set_attention_path, set_kernels,
};
pub use ops::FusedOps;
pub use ops::attention::{AttentionOps, attention};
pub use ops::logprobs::{Head, HeadWeight, LogprobOps, mean_logits, token_entropy, token_logprobs};
pub use ops::lora::{LoraOps, lora_up};
pub use ops::projection::{FEW_ROWS, ProjectionOps, project};
pub use ops::quant_matmul::{
    QuantLayout, QuantMatmulOps, QuantMatrix, dequantize_host, dequantize_twin, pack_codes,
    quant_matmul,
};
pub use ops::rms_norm::{RmsNormOps, rms_norm};
pub use ops::rotary::{RotaryOps, rotary};
pub use ops::swiglu::{SwigluOps, swiglu};

/// The CUDA toolkit folder whose `include/` CubeCL hands NVRTC at every kernel compile
/// (`CUDA_PATH`, else `/usr/local/cuda`, `/opt/cuda` or `/usr`), so that a device check can
/// refuse in one line where CubeCL would panic at the first kernel in a worker thread.
#[cfg(feature = "cuda")]
pub fn cuda_toolkit() -> Option<std::path::PathBuf> {
    cubecl::cuda::install::cuda_path()
}
