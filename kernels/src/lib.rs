//! The ops of a Llama-family forward pass, each behind one function so a fused kernel can
//! replace its reference twin without the model changing.
//!
//! Today every op runs its [`reference`] path: plain burn tensor ops that work on every
//! backend and under autodiff. The reference is the specification the fused CubeCL kernels
//! are tested against, so it stays as obvious as the math.

pub mod reference;

pub use reference::{Head, attention, rms_norm, rotary, swiglu, token_entropy, token_logprobs};
