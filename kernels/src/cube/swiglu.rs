//! SwiGLU forward and backward, one thread per element: the backward reads gate and up
//! once and writes both gradients, where unfused ops would make five passes.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::launches::{Kernel, launched};
use crate::ops::swiglu::SwigluOps;

use super::{grid, rows_cols};

const THREADS: u32 = 256;

#[cube(launch)]
fn swiglu_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let cols = gate.shape(1);
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i >= gate.shape(0) * cols {
        terminate!();
    }
    let (r, c) = (i / cols, i % cols);
    let g = f32::cast_from(gate[r * gate.stride(0) + c * gate.stride(1)]);
    let silu = g / (1.0f32 + f32::exp(-g));
    let at = r * output.stride(0) + c * output.stride(1);
    output[at] = F::cast_from(silu) * up[r * up.stride(0) + c * up.stride(1)];
}

#[cube(launch)]
fn swiglu_backward_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    grad: &Tensor<F>,
    d_gate: &mut Tensor<F>,
    d_up: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let cols = gate.shape(1);
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i >= gate.shape(0) * cols {
        terminate!();
    }
    let (r, c) = (i / cols, i % cols);
    let g = f32::cast_from(gate[r * gate.stride(0) + c * gate.stride(1)]);
    let u = f32::cast_from(up[r * up.stride(0) + c * up.stride(1)]);
    let dy = f32::cast_from(grad[r * grad.stride(0) + c * grad.stride(1)]);
    let s = 1.0f32 / (1.0f32 + f32::exp(-g));
    let (at_gate, at_up) = (
        r * d_gate.stride(0) + c * d_gate.stride(1),
        r * d_up.stride(0) + c * d_up.stride(1),
    );
    d_gate[at_gate] = F::cast_from(dy * u * s * (1.0f32 + g * (1.0f32 - s)));
    d_up[at_up] = F::cast_from(dy * g * s);
}

impl SwigluOps for CubeBackend {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        launched(Kernel::Swiglu);
        forward(gate, up)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        launched(Kernel::SwigluBackward);
        backward(gate, up, grad)
    }
}

fn forward(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
    let gate = into_contiguous(gate);
    let up = into_contiguous(up);
    let (rows, cols) = rows_cols(&gate);
    let dtype = gate.dtype;
    let output = empty_device_dtype(
        gate.client.clone(),
        gate.device.clone(),
        gate.shape(),
        dtype,
    );
    if rows * cols == 0 {
        return output;
    }
    swiglu_kernel::launch(
        &gate.client,
        grid((rows * cols).div_ceil(THREADS as usize)),
        CubeDim::new_1d(THREADS),
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        dtype_to_storage_type(dtype),
    );
    output
}

fn backward(gate: CubeTensor, up: CubeTensor, grad: CubeTensor) -> (CubeTensor, CubeTensor) {
    let gate = into_contiguous(gate);
    let up = into_contiguous(up);
    let grad = into_contiguous(grad);
    let (rows, cols) = rows_cols(&gate);
    let dtype = gate.dtype;
    let new = || {
        empty_device_dtype(
            gate.client.clone(),
            gate.device.clone(),
            gate.shape(),
            dtype,
        )
    };
    let (d_gate, d_up) = (new(), new());
    if rows * cols == 0 {
        return (d_gate, d_up);
    }
    swiglu_backward_kernel::launch(
        &gate.client,
        grid((rows * cols).div_ceil(THREADS as usize)),
        CubeDim::new_1d(THREADS),
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        grad.into_tensor_arg(),
        d_gate.clone().into_tensor_arg(),
        d_up.clone().into_tensor_arg(),
        dtype_to_storage_type(dtype),
    );
    (d_gate, d_up)
}
