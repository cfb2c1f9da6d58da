//! RMSNorm, as transformers computes it. The kernel is `cube/rms_norm.rs`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Tensor};

use super::node::{Backprop, all_kept, on_inner, record};
use super::{cast_to, f32_of, row_vector};
use crate::cpu;
use crate::launches::Op;
use crate::mode::takes_fused;
use burn::backend::flex::FlexTensor;

/// RMSNorm: `x`: `[..., N]`, `weight`: `[N]`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    if takes_fused(Op::RmsNorm, &x.device()) {
        fused(x, weight, eps)
    } else {
        reference(x, weight, eps)
    }
}

/// RMSNorm as transformers computes it: normalise in f32, cast back, then scale.
///
/// `x`: `[..., N]`, `weight`: `[N]`.
pub fn reference<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let inv_rms = (x32.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
    (x32 * inv_rms).cast(dtype) * weight.unsqueeze()
}

/// Fused [`reference`], on rows: leading dimensions are flattened for the extension.
pub fn fused<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dims = x.dims();
    let rows: Tensor<2> = x.reshape([-1, dims[D - 1] as i32]);
    let out = Dispatch::rms_norm(rows.into_dispatch(), weight.into_dispatch(), eps as f32);
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// The backend extension; the default bodies are the twin flex runs.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait RmsNormOps: Backend {
    /// RMSNorm of each row, as transformers computes it: `cast(x·r)·w` with
    /// `r = 1/√(mean(x²) + eps)` taken in f32. `x`: `[N, C]`, `weight`: `[C]`.
    #[fusion(dtype = x, shape = x)]
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        rms_norm_twin::<Self>(x, weight, eps)
    }

    /// The gradients of [`RmsNormOps::rms_norm`] for the output gradient `grad`: `dx`
    /// `[N, C]`, and each row's share of `dw` (`[N, C]`, summed over rows by the caller):
    /// `dx = r·w·g − (r³/C)·x·Σ(g·w·x)`, `dw_row = g·x·r`.
    #[fusion(meta = |x, _w, _g, _eps| (x.clone(), x.clone()))]
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        rms_norm_backward_twin::<Self>(x, weight, grad, eps)
    }
}

impl RmsNormOps for Flex {
    fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f32) -> FlexTensor {
        cpu::rows::rms_norm(&x, &weight, eps)
            .unwrap_or_else(|| rms_norm_twin::<Self>(x, weight, eps))
    }

    fn rms_norm_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        eps: f32,
    ) -> (FlexTensor, FlexTensor) {
        cpu::rows::rms_norm_backward(&x, &weight, &grad, eps)
            .unwrap_or_else(|| rms_norm_backward_twin::<Self>(x, weight, grad, eps))
    }
}

impl<B: RmsNormOps, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        record::<B, C, _, _, _, _>(
            Node,
            [x, weight],
            eps,
            |[x, weight], eps| (B::rms_norm(x, weight, eps), ()),
            |eps, _, _| eps,
        )
        .0
    }

    on_inner! {
        fn rms_norm_backward(x: Float, weight: Float, grad: Float, eps: f32) -> (Float, Float);
    }
}

/// Keeps both inputs; `dw` is the row shares' sum.
#[derive(Debug)]
struct Node;

impl<B: RmsNormOps> Backprop<B, 2> for Node {
    const KEEPS: [bool; 2] = [true, true];
    type Saved = f32;

    fn backward(
        inputs: [Option<FloatTensor<B>>; 2],
        eps: f32,
        grad: FloatTensor<B>,
        [_, want_weight]: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let [x, weight] = all_kept(inputs);
        let w_shape = weight.shape();
        let (dx, dw_rows) = B::rms_norm_backward(x, weight, grad, eps);
        let dw = want_weight.then(|| B::float_reshape(B::float_sum_dim(dw_rows, 0), w_shape));
        [Some(dx), dw]
    }
}

/// `1/√(mean(x²) + eps)` per row, `[N, 1]` in f32, and `x`'s own float dtype.
fn inv_rms<B: Backend>(x: FloatTensor<B>, eps: f32) -> (FloatTensor<B>, FloatDType) {
    let dtype: FloatDType = x.dtype().into();
    let x32 = f32_of::<B>(x);
    let ms = B::float_mean_dim(B::float_mul(x32.clone(), x32), 1);
    let inv = B::float_recip(B::float_sqrt(B::float_add_scalar(ms, eps.into())));
    (inv, dtype)
}

/// The portable [`rms_norm`], on the backend's ops (what flex falls back to).
#[allow(clippy::too_many_arguments)]
fn rms_norm_twin<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f32,
) -> FloatTensor<B> {
    let (inv, dtype) = inv_rms::<B>(x.clone(), eps);
    let normed = cast_to::<B>(B::float_mul(f32_of::<B>(x), inv), dtype);
    B::float_mul(normed, row_vector::<B>(weight))
}

/// The portable [`rms_norm_backward`], on the backend's ops (what flex falls back to).
#[allow(clippy::too_many_arguments)]
fn rms_norm_backward_twin<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    eps: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let cols = x.shape().dims::<2>()[1];
    let (inv, dtype) = inv_rms::<B>(x.clone(), eps);
    let x32 = f32_of::<B>(x);
    let g32 = f32_of::<B>(grad);
    let w32 = row_vector::<B>(f32_of::<B>(weight));
    let gw = B::float_mul(g32.clone(), w32);
    let dot = B::float_sum_dim(B::float_mul(gw.clone(), x32.clone()), 1);
    let inv3 = B::float_mul(B::float_mul(inv.clone(), inv.clone()), inv.clone());
    let coef = B::float_mul_scalar(B::float_mul(inv3, dot), (1.0 / cols as f64).into());
    let dx = B::float_sub(
        B::float_mul(gw, inv.clone()),
        B::float_mul(x32.clone(), coef),
    );
    let dw_rows = B::float_mul(B::float_mul(g32, x32), inv);
    (cast_to::<B>(dx, dtype), cast_to::<B>(dw_rows, dtype))
}
