//! The ops of a Llama-family forward pass, each behind one function so a fused kernel can
//! replace its reference twin without the model changing.
//!
//! - [`reference`]: plain burn tensor ops that work on every backend and under autodiff.
//!   The reference is the specification the fused kernels are tested against, so it stays
//!   as obvious as the math.
//! - [`fused`]: the same ops through a burn backend extension (`extension`): CubeCL
//!   kernels, forward and backward, on the Cube backends (`cube`), the primitive-op twin
//!   on flex (and on Cube for ops without a kernel), and one autodiff node per op with a
//!   hand-written backward (`autodiff`).
//!
//! The functions at the crate root choose between the two with [`Kernels`] (the recipe's
//! `kernels` switch). RMSNorm, SwiGLU and RoPE have CubeCL kernels, forward and backward.
//! The head's log-probs are a chunked autodiff op whose backward rebuilds one chunk's
//! logits at a time from the saved log-sum-exp; on GPU each chunk runs burn's matmul plus
//! two CubeCL kernels (row statistics, and the logits' gradient). Attention is one autodiff
//! op too: on GPU a CubeCL flash-attention kernel (forward, and a two-launch backward),
//! on flex a blocked twin of primitive ops; both keep only the output and each query's
//! softmax statistics. Entropy, a metric without gradient, always runs its reference.

mod autodiff;
#[cfg(feature = "gpu")]
mod cube;
mod extension;
pub mod fused;
pub mod launches;
mod mode;
pub mod reference;
pub mod selftest;

use burn::tensor::{Bool, Int, Tensor};

pub use extension::FusedOps;
pub use mode::{Kernels, fused_on, kernels, set_kernels};
pub use reference::{Head, token_entropy};

/// RMSNorm: `x`: `[..., N]`, `weight`: `[N]`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    if fused_on(&x.device()) {
        launches::took_fused_path(launches::Op::RmsNorm);
        fused::rms_norm(x, weight, eps)
    } else {
        reference::rms_norm(x, weight, eps)
    }
}

/// The gated MLP activation `silu(gate)·up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if fused_on(&gate.device()) {
        launches::took_fused_path(launches::Op::Swiglu);
        fused::swiglu(gate, up)
    } else {
        reference::swiglu(gate, up)
    }
}

/// A LoRA adapter's up-projection added to its base projection's output,
/// `base + s·down·Bᵀ`. `base`: `[..., O]`; `down`: `[..., r]`; `b`: `[O, r]`.
pub fn lora_up<const D: usize>(
    base: Tensor<D>,
    down: Tensor<D>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    if fused_on(&base.device()) {
        launches::took_fused_path(launches::Op::LoraUp);
        fused::lora_up(base, down, b, scale)
    } else {
        reference::lora_up(base, down, b, scale)
    }
}

/// Per-token log-probabilities of `targets` under `head`, `chunk` rows at a time, and
/// whether each target is the head's top token. `hidden`: `[N, H]`; `targets`: `[N]`.
pub fn token_logprobs(
    hidden: Tensor<2>,
    head: &Head,
    targets: Tensor<1, Int>,
    chunk: usize,
) -> (Tensor<1>, Tensor<1, Int>) {
    if fused_on(&hidden.device()) {
        launches::took_fused_path(launches::Op::TokenLogprobs);
        fused::token_logprobs(hidden, head, targets, chunk)
    } else {
        reference::token_logprobs(hidden, head, targets, chunk)
    }
}

/// Scaled dot-product attention with grouped K/V heads. `q`: `[B, H, T, D]`; `k`, `v`:
/// `[B, Hkv, S, D]`; `masked`: `[B, 1, T, S]`, true where a query must not see a key.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masked: Tensor<4, Bool>) -> Tensor<4> {
    if fused_on(&q.device()) {
        launches::took_fused_path(launches::Op::Attention);
        fused::attention(q, k, v, masked)
    } else {
        reference::attention(q, k, v, masked)
    }
}

/// Rotary position embedding: `x`: `[B, H, T, D]`; `cos`, `sin`: `[B, T, D]`.
pub fn rotary(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    if fused_on(&x.device()) {
        launches::took_fused_path(launches::Op::Rotary);
        fused::rotary(x, cos, sin)
    } else {
        reference::rotary(x, cos, sin)
    }
}
