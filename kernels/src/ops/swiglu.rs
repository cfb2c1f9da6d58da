//! The gated MLP activation `silu(gate)·up`. The kernel is `cube/swiglu.rs`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::node::{Backprop, all_kept, on_inner, record};
use crate::cpu;
use crate::launches::Op;
use crate::mode::takes_fused;
use burn::backend::flex::FlexTensor;

/// The gated MLP activation `silu(gate)·up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if takes_fused(Op::Swiglu, &gate.device()) {
        fused(gate, up)
    } else {
        reference(gate, up)
    }
}

/// The gated MLP activation: `silu(gate) · up`.
pub fn reference<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

/// Fused [`reference`]: `silu(gate)·up`, elementwise, on rows.
pub fn fused<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    let dims = gate.dims();
    let cols = dims[D - 1] as i32;
    let gate: Tensor<2> = gate.reshape([-1, cols]);
    let up: Tensor<2> = up.reshape([-1, cols]);
    let out = Dispatch::swiglu(gate.into_dispatch(), up.into_dispatch());
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// The backend extension; the default bodies are the twin flex runs.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait SwigluOps: Backend {
    /// The gated activation `silu(gate)·up`, elementwise. `gate`, `up`: `[N, C]`.
    #[fusion(dtype = gate, shape = gate)]
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu_twin::<Self>(gate, up)
    }

    /// The gradients of [`SwigluOps::swiglu`]: with `s = σ(gate)`,
    /// `d_gate = g·up·s·(1 + gate·(1 − s))` and `d_up = g·gate·s`.
    #[fusion(meta = |gate, _up, _g| (gate.clone(), gate.clone()))]
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        swiglu_backward_twin::<Self>(gate, up, grad)
    }
}

impl SwigluOps for Flex {
    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        cpu::rows::swiglu(&gate, &up).unwrap_or_else(|| swiglu_twin::<Self>(gate, up))
    }

    fn swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        cpu::rows::swiglu_backward(&gate, &up, &grad)
            .unwrap_or_else(|| swiglu_backward_twin::<Self>(gate, up, grad))
    }
}

impl<B: SwigluOps, C: CheckpointStrategy> SwigluOps for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C, _, _, _, _>(
            Node,
            [gate, up],
            (),
            |[gate, up], ()| (B::swiglu(gate, up), ()),
            |(), _, _| (),
        )
        .0
    }

    on_inner! {
        fn swiglu_backward(gate: Float, up: Float, grad: Float) -> (Float, Float);
    }
}

/// Keeps both inputs; one launch gives both gradients.
#[derive(Debug)]
struct Node;

impl<B: SwigluOps> Backprop<B, 2> for Node {
    const KEEPS: [bool; 2] = [true, true];
    type Saved = ();

    fn backward(
        inputs: [Option<FloatTensor<B>>; 2],
        (): (),
        grad: FloatTensor<B>,
        _wanted: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let [gate, up] = all_kept(inputs);
        let (d_gate, d_up) = B::swiglu_backward(gate, up, grad);
        [Some(d_gate), Some(d_up)]
    }
}

/// The portable [`swiglu`], on the backend's ops (what flex falls back to).
#[allow(clippy::too_many_arguments)]
fn swiglu_twin<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let s = B::sigmoid(gate.clone());
    B::float_mul(B::float_mul(gate, s), up)
}

/// The portable [`swiglu_backward`], on the backend's ops (what flex falls back to).
#[allow(clippy::too_many_arguments)]
fn swiglu_backward_twin<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = B::sigmoid(gate.clone());
    let silu = B::float_mul(gate.clone(), s.clone());
    // 1 + gate·(1 − s) = 1 + gate − gate·s
    let slope = B::float_add_scalar(B::float_sub(gate, silu.clone()), 1.0.into());
    let d_gate = B::float_mul(B::float_mul(grad.clone(), up), B::float_mul(s, slope));
    let d_up = B::float_mul(grad, silu);
    (d_gate, d_up)
}
