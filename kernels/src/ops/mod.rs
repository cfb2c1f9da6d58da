//! One file per fused op, holding everything of the op but its CubeCL kernel (which is
//! `cube/<op>.rs`): the model's entry point, the plain-tensor reference, the tensor-level
//! fused call, the backend extension trait whose default bodies are the primitive-op twin,
//! and the autodiff node.
//!
//! Each op is its own `#[backend_extension]` trait, so adding one touches no other op's
//! file; [`FusedOps`] names a backend that has them all. The glue the nodes share is
//! [`node`].

pub mod attention;
pub mod logprobs;
pub mod lora;
pub(crate) mod node;
pub mod projection;
pub mod quant_matmul;
pub mod rms_norm;
pub mod rotary;
pub mod swiglu;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::FloatDType;

use attention::AttentionOps;
use logprobs::LogprobOps;
use lora::LoraOps;
use projection::ProjectionOps;
use quant_matmul::QuantMatmulOps;
use rms_norm::RmsNormOps;
use rotary::RotaryOps;
use swiglu::SwigluOps;

/// A backend with every fused op: flex, the Cube backends, Fusion over them and Autodiff
/// over any of those.
pub trait FusedOps:
    RmsNormOps
    + SwigluOps
    + LoraOps
    + RotaryOps
    + LogprobOps
    + AttentionOps
    + ProjectionOps
    + QuantMatmulOps
{
}

impl<B> FusedOps for B where
    B: RmsNormOps
        + SwigluOps
        + LoraOps
        + RotaryOps
        + LogprobOps
        + AttentionOps
        + ProjectionOps
        + QuantMatmulOps
{
}

fn f32_of<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    cast_to::<B>(x, FloatDType::F32)
}

/// `x` in `dtype`, with no op recorded when it already is (a fusing backend would
/// otherwise keep a copy in its graph).
fn cast_to<B: Backend>(x: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    if x.dtype() == dtype.into() {
        x
    } else {
        B::float_cast(x, dtype)
    }
}

/// `[C]` → `[1, C]`, to broadcast over rows.
fn row_vector<B: Backend>(w: FloatTensor<B>) -> FloatTensor<B> {
    let c = w.shape().dims::<1>()[0];
    B::float_reshape(w, [1, c].into())
}
