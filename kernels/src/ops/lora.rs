//! A LoRA adapter's up-projection folded into its base projection's output. The kernel is
//! `cube/lora.rs`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{FloatDType, Tensor};

use super::cast_to;
use super::node::{Backprop, on_inner, record};
use crate::cpu;
use crate::launches::Op;
use crate::mode::takes_fused;
use burn::backend::flex::FlexTensor;

/// A LoRA adapter's up-projection added to its base projection's output,
/// `base + s·down·Bᵀ`. `base`: `[..., O]`; `down`: `[..., r]`; `b`: `[O, r]`.
pub fn lora_up<const D: usize>(
    base: Tensor<D>,
    down: Tensor<D>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    if takes_fused(Op::LoraUp, &base.device()) {
        fused(base, down, b, scale)
    } else {
        reference(base, down, b, scale)
    }
}

/// A LoRA adapter's up-projection added to its base projection's output:
/// `base + cast(s·down·Bᵀ)`, the low-rank product taken in the factors' dtype and cast to
/// `base`'s. `base`: `[..., O]`; `down`: `[..., r]` (`dropout(x)·Aᵀ`); `b`: `[O, r]`.
pub fn reference<const D: usize>(
    base: Tensor<D>,
    down: Tensor<D>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    let dtype = base.dtype();
    base + burn::tensor::module::linear(down, b.transpose(), None)
        .mul_scalar(scale)
        .cast(dtype)
}

/// Fused [`reference`]: `base + s·down·Bᵀ` in one pass over the output, on rows.
/// `base`: `[..., O]`; `down`: `[..., r]`; `b`: `[O, r]`.
pub fn fused<const D: usize>(
    base: Tensor<D>,
    down: Tensor<D>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    let dims = base.dims();
    let rank = down.dims()[D - 1] as i32;
    let base: Tensor<2> = base.reshape([-1, dims[D - 1] as i32]);
    let down: Tensor<2> = down.reshape([-1, rank]);
    let out = Dispatch::lora_up(
        base.into_dispatch(),
        down.into_dispatch(),
        b.into_dispatch(),
        scale as f32,
    );
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// The backend extension; the default bodies are the twin flex runs.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait LoraOps: Backend {
    /// A LoRA adapter's up-projection folded into its base projection's output:
    /// `base + cast(s·down·Bᵀ)`, with `down = dropout(x)·Aᵀ` (`[N, r]`) and `B` (`[O, r]`)
    /// in the adapters' dtype (f32) and `base` (`[N, O]`, `x·Wᵀ`) in the compute dtype.
    /// The `[N, O]` low-rank product is never stored: unfused it is written, read back
    /// and added, twice the output's traffic again.
    #[fusion(dtype = base, shape = base)]
    fn lora_up(
        base: FloatTensor<Self>,
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        lora_up_twin::<Self>(base, down, b, scale)
    }

    /// The gradients of [`LoraOps::lora_up`] other than `base`'s (which is `grad`
    /// itself): `d down = s·g·B` and `dB = s·gᵀ·down`, in the adapters' dtype. Two skinny
    /// matmuls (inner or outer size `r`), which the backend's matmul does well.
    #[fusion(meta = |down, b, _grad, _scale| (down.clone(), b.clone()))]
    fn lora_up_backward(
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        lora_up_backward_twin::<Self>(down, b, grad, scale)
    }
}

impl LoraOps for Flex {
    fn lora_up(base: FlexTensor, down: FlexTensor, b: FlexTensor, scale: f32) -> FlexTensor {
        cpu::products::lora_up(base, &down, &b, scale)
            .unwrap_or_else(|base| lora_up_twin::<Self>(base, down, b, scale))
    }

    fn lora_up_backward(
        down: FlexTensor,
        b: FlexTensor,
        grad: FlexTensor,
        scale: f32,
    ) -> (FlexTensor, FlexTensor) {
        cpu::products::lora_up_grads(&down, &b, &grad, scale)
            .unwrap_or_else(|| lora_up_backward_twin::<Self>(down, b, grad, scale))
    }
}

impl<B: LoraOps, C: CheckpointStrategy> LoraOps for Autodiff<B, C> {
    fn lora_up(
        base: FloatTensor<Self>,
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        record::<B, C, _, _, _, _>(
            Node,
            [base, down, b],
            scale,
            |[base, down, b], scale| (B::lora_up(base, down, b, scale), ()),
            |scale, _, _| scale,
        )
        .0
    }

    on_inner! {
        fn lora_up_backward(down: Float, b: Float, grad: Float, scale: f32) -> (Float, Float);
    }
}

/// Keeps the factors only: the base output's gradient is the output's own.
#[derive(Debug)]
struct Node;

impl<B: LoraOps> Backprop<B, 3> for Node {
    const KEEPS: [bool; 3] = [false, true, true];
    type Saved = f32;

    fn backward(
        [_, down, b]: [Option<FloatTensor<B>>; 3],
        scale: f32,
        grad: FloatTensor<B>,
        [want_base, want_down, want_b]: [bool; 3],
    ) -> [Option<FloatTensor<B>>; 3] {
        let (mut d_down, mut d_b) = (None, None);
        if want_down || want_b {
            let (down, b) = (down.expect("kept"), b.expect("kept"));
            let (dd, db) = B::lora_up_backward(down, b, grad.clone(), scale);
            d_down = want_down.then_some(dd);
            d_b = want_b.then_some(db);
        }
        [want_base.then_some(grad), d_down, d_b]
    }
}

/// The portable [`LoraOps::lora_up`], on the backend's ops.
fn lora_up_twin<B: Backend>(
    base: FloatTensor<B>,
    down: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f32,
) -> FloatTensor<B> {
    let dtype: FloatDType = base.dtype().into();
    let delta = B::float_matmul(down, B::float_transpose(b));
    let delta = B::float_mul_scalar(delta, scale.into());
    B::float_add(base, cast_to::<B>(delta, dtype))
}

/// The portable [`LoraOps::lora_up_backward`], on the backend's ops.
fn lora_up_backward_twin<B: Backend>(
    down: FloatTensor<B>,
    b: FloatTensor<B>,
    grad: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype: FloatDType = down.dtype().into();
    let g = B::float_mul_scalar(cast_to::<B>(grad, dtype), scale.into());
    let d_down = B::float_matmul(g.clone(), b);
    let d_b = B::float_matmul(B::float_transpose(g), down);
    (d_down, d_b)
}
