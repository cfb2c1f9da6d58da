//! Rotary position embedding in the "rotate half" layout. The kernel is `cube/rotary.rs`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, Slice, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Tensor};

use super::node::{Backprop, on_inner, record};
use super::{cast_to, f32_of};
use crate::cpu;
use crate::launches::Op;
use crate::mode::takes_fused;
use burn::backend::flex::FlexTensor;

/// Rotary position embedding: `x`: `[B, H, T, D]`; `cos`, `sin`: `[B, T, D]`.
pub fn rotary(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    if takes_fused(Op::Rotary, &x.device()) {
        fused(x, cos, sin)
    } else {
        reference(x, cos, sin)
    }
}

/// Rotary position embedding in the "rotate half" layout of Hugging Face checkpoints.
///
/// `x`: `[B, H, T, D]` in any float dtype; `cos`, `sin`: `[B, T, D]`, already laid out as
/// `cat(freqs, freqs)`, f32 or `x`'s dtype. Computed in f32 and returned in `x`'s dtype, so
/// half-precision heads rotate without rounding the tables or the products.
pub fn reference(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    let [_, _, _, d] = x.dims();
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let table = |c: Tensor<3>| c.cast(DType::F32).unsqueeze_dim(1);
    (x * table(cos) + rotated * table(sin)).cast(dtype)
}

/// Fused [`reference`]. `x`: `[B, H, T, D]`; `cos`, `sin`: `[B, T, D]`.
pub fn fused(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    let out = Dispatch::rotary(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch());
    Tensor::<4>::from_dispatch(out)
}

/// The backend extension; the default bodies are the twin flex runs.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait RotaryOps: Backend {
    /// Rotary position embedding in the "rotate half" layout of Hugging Face checkpoints:
    /// `x·cos + rotate_half(x)·sin`, with `rotate_half([x₁, x₂]) = [−x₂, x₁]`. Any RoPE
    /// scaling (linear, llama3) is already in the tables. `x`: `[B, H, T, D]`; `cos`, `sin`:
    /// `[B, T, D]`, f32 or `x`'s dtype. Computed in f32, returned in `x`'s dtype.
    #[fusion(dtype = x, shape = x)]
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rotary_twin::<Self>(x, cos, sin)
    }

    /// The gradient of [`RotaryOps::rotary`] for `x` (the tables are constants): the
    /// rotation's transpose, `g·cos + rotate_halfᵀ(g·sin)` with
    /// `rotate_halfᵀ([y₁, y₂]) = [y₂, −y₁]`.
    #[fusion(dtype = grad, shape = grad)]
    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rotary_backward_twin::<Self>(grad, cos, sin)
    }
}

/// The CPU kernel works in f32: a half-precision `x` is widened on the way in and the
/// result rounded back once.
impl RotaryOps for Flex {
    fn rotary(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        widened(x, |x| {
            cpu::rows::rotary(&x, &cos, &sin, false)
                .unwrap_or_else(|| rotary_twin::<Self>(x, cos, sin))
        })
    }

    fn rotary_backward(grad: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        widened(grad, |grad| {
            cpu::rows::rotary(&grad, &cos, &sin, true)
                .unwrap_or_else(|| rotary_backward_twin::<Self>(grad, cos, sin))
        })
    }
}

/// `f(x in f32)`, in `x`'s dtype.
fn widened(x: FlexTensor, f: impl FnOnce(FlexTensor) -> FlexTensor) -> FlexTensor {
    let dtype: FloatDType = x.dtype().into();
    cast_to::<Flex>(f(f32_of::<Flex>(x)), dtype)
}

impl<B: RotaryOps, C: CheckpointStrategy> RotaryOps for Autodiff<B, C> {
    /// The tables are positions' functions, not parameters: no gradient flows to them.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let tables = (cos.into_primitive(), sin.into_primitive());
        record::<B, C, _, _, _, _>(
            Node,
            [x],
            tables,
            |[x], (cos, sin)| (B::rotary(x, cos, sin), ()),
            |tables, _, _| tables,
        )
        .0
    }

    on_inner! {
        fn rotary_backward(grad: Float, cos: Float, sin: Float) -> Float;
    }
}

/// Keeps the tables, not `x`: the rotation is linear.
#[derive(Debug)]
struct Node;

impl<B: RotaryOps> Backprop<B, 1> for Node {
    const KEEPS: [bool; 1] = [false];
    type Saved = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        _inputs: [Option<FloatTensor<B>>; 1],
        (cos, sin): Self::Saved,
        grad: FloatTensor<B>,
        [want_x]: [bool; 1],
    ) -> [Option<FloatTensor<B>>; 1] {
        [want_x.then(|| B::rotary_backward(grad, cos, sin))]
    }
}

/// `[x₁, x₂] → [−x₂, x₁]` over the last axis, or its transpose `[x₂, −x₁]`.
fn rotate_half<B: Backend>(x: FloatTensor<B>, transpose: bool) -> FloatTensor<B> {
    let [b, h, t, d] = x.shape().dims::<4>();
    let half = |from: usize| {
        B::float_slice(
            x.clone(),
            &[
                Slice::from(0..b),
                Slice::from(0..h),
                Slice::from(0..t),
                Slice::from(from..from + d / 2),
            ],
        )
    };
    let (x1, x2) = (half(0), half(d / 2));
    if transpose {
        B::float_cat(vec![x2, B::float_neg(x1)], 3)
    } else {
        B::float_cat(vec![B::float_neg(x2), x1], 3)
    }
}

/// The portable [`rotary`], on the backend's ops in f32 (what flex falls back to).
fn rotary_twin<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let [b, _, t, d] = x.shape().dims::<4>();
    let dtype: FloatDType = x.dtype().into();
    let x = f32_of::<B>(x);
    let table = |c: FloatTensor<B>| B::float_reshape(f32_of::<B>(c), [b, 1, t, d].into());
    let rotated = rotate_half::<B>(x.clone(), false);
    let y = B::float_add(
        B::float_mul(x, table(cos)),
        B::float_mul(rotated, table(sin)),
    );
    cast_to::<B>(y, dtype)
}

/// The portable [`rotary_backward`], on the backend's ops in f32 (what flex falls back to).
fn rotary_backward_twin<B: Backend>(
    grad: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let [b, _, t, d] = grad.shape().dims::<4>();
    let dtype: FloatDType = grad.dtype().into();
    let grad = f32_of::<B>(grad);
    let table = |c: FloatTensor<B>| B::float_reshape(f32_of::<B>(c), [b, 1, t, d].into());
    let gs = B::float_mul(grad.clone(), table(sin));
    let dx = B::float_add(B::float_mul(grad, table(cos)), rotate_half::<B>(gs, true));
    cast_to::<B>(dx, dtype)
}
