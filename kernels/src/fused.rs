//! The fused ops at the tensor level: what the model calls when [`Kernels::Fused`] is in
//! force. Each flattens its input to rows, calls the backend extension through `Dispatch`
//! (a CubeCL kernel on Cube backends, the primitive-op twin elsewhere, a single autodiff
//! node with a hand-written backward under autodiff) and restores the shape.

use burn::backend::Dispatch;
use burn::tensor::Tensor;

use crate::extension::FusedOps;

/// Fused [`crate::reference::rms_norm`]. `x`: `[..., N]`, `weight`: `[N]`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dims = x.dims();
    let rows: Tensor<2> = x.reshape([-1, dims[D - 1] as i32]);
    let out = Dispatch::rms_norm(rows.into_dispatch(), weight.into_dispatch(), eps as f32);
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// Fused [`crate::reference::swiglu`]: `silu(gate)·up`, elementwise.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    let dims = gate.dims();
    let cols = dims[D - 1] as i32;
    let gate: Tensor<2> = gate.reshape([-1, cols]);
    let up: Tensor<2> = up.reshape([-1, cols]);
    let out = Dispatch::swiglu(gate.into_dispatch(), up.into_dispatch());
    Tensor::<2>::from_dispatch(out).reshape(dims)
}
