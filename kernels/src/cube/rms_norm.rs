//! RMSNorm forward and backward: one cube per row. The cube's threads stride over the row,
//! then sum their partial results in shared memory (a tree, halving each round). Sums are
//! kept in f32 whatever the tensor's dtype, as transformers does.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::launches::{Kernel, launched};
use crate::ops::rms_norm::RmsNormOps;

use super::{cube_sum, grid, row_threads, rows_cols};

#[cube(launch)]
fn rms_norm_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] threads: usize,
    #[define(F)] _dtype: ElemType,
) {
    let rows = x.shape(0);
    let cols = x.shape(1);
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let (xs0, xs1) = (x.stride(0), x.stride(1));
    let (os0, os1) = (output.stride(0), output.stride(1));
    let ws = weight.stride(0);

    let mut partial = Shared::<[f32]>::new_slice(threads);
    let mut acc = 0.0f32;
    let mut c = tid;
    while c < cols {
        let v = f32::cast_from(x[row * xs0 + c * xs1]);
        acc += v * v;
        c += step;
    }
    partial[tid] = acc;
    sync_cube();
    cube_sum(&mut partial, tid);
    let inv = 1.0f32 / f32::sqrt(partial[0] / f32::cast_from(cols as u32) + eps);

    let mut c = tid;
    while c < cols {
        let v = f32::cast_from(x[row * xs0 + c * xs1]);
        output[row * os0 + c * os1] = F::cast_from(v * inv) * weight[c * ws];
        c += step;
    }
}

#[cube(launch)]
fn rms_norm_backward_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    dw_rows: &mut Tensor<F>,
    eps: f32,
    #[comptime] threads: usize,
    #[define(F)] _dtype: ElemType,
) {
    let rows = x.shape(0);
    let cols = x.shape(1);
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let (xs0, xs1) = (x.stride(0), x.stride(1));
    let (gs0, gs1) = (grad.stride(0), grad.stride(1));
    let (ds0, ds1) = (dx.stride(0), dx.stride(1));
    let (rs0, rs1) = (dw_rows.stride(0), dw_rows.stride(1));
    let ws = weight.stride(0);

    // Σ x² and Σ g·w·x over the row.
    let mut squares = Shared::<[f32]>::new_slice(threads);
    let mut dots = Shared::<[f32]>::new_slice(threads);
    let mut sq = 0.0f32;
    let mut dot = 0.0f32;
    let mut c = tid;
    while c < cols {
        let v = f32::cast_from(x[row * xs0 + c * xs1]);
        let g = f32::cast_from(grad[row * gs0 + c * gs1]);
        let w = f32::cast_from(weight[c * ws]);
        sq += v * v;
        dot += g * w * v;
        c += step;
    }
    squares[tid] = sq;
    dots[tid] = dot;
    sync_cube();
    cube_sum(&mut squares, tid);
    cube_sum(&mut dots, tid);
    let n = f32::cast_from(cols as u32);
    let inv = 1.0f32 / f32::sqrt(squares[0] / n + eps);
    let coef = inv * inv * inv * dots[0] / n;

    let mut c = tid;
    while c < cols {
        let v = f32::cast_from(x[row * xs0 + c * xs1]);
        let g = f32::cast_from(grad[row * gs0 + c * gs1]);
        let w = f32::cast_from(weight[c * ws]);
        dx[row * ds0 + c * ds1] = F::cast_from(inv * w * g - coef * v);
        dw_rows[row * rs0 + c * rs1] = F::cast_from(g * v * inv);
        c += step;
    }
}

impl RmsNormOps for CubeBackend {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        launched(Kernel::RmsNorm);
        forward(x, weight, eps)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        launched(Kernel::RmsNormBackward);
        backward(x, weight, grad, eps)
    }
}

fn forward(x: CubeTensor, weight: CubeTensor, eps: f32) -> CubeTensor {
    let x = into_contiguous(x);
    let weight = into_contiguous(weight);
    let (rows, cols) = rows_cols(&x);
    let dtype = x.dtype;
    let output = empty_device_dtype(x.client.clone(), x.device.clone(), x.shape(), dtype);
    if rows == 0 || cols == 0 {
        return output;
    }
    let threads = row_threads(cols);
    rms_norm_kernel::launch(
        &x.client,
        grid(rows),
        CubeDim::new_1d(threads),
        x.clone().into_tensor_arg(),
        weight.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        eps,
        threads as usize,
        dtype_to_storage_type(dtype),
    );
    output
}

fn backward(
    x: CubeTensor,
    weight: CubeTensor,
    grad: CubeTensor,
    eps: f32,
) -> (CubeTensor, CubeTensor) {
    let x = into_contiguous(x);
    let weight = into_contiguous(weight);
    let grad = into_contiguous(grad);
    let (rows, cols) = rows_cols(&x);
    let dtype = x.dtype;
    let dx = empty_device_dtype(x.client.clone(), x.device.clone(), x.shape(), dtype);
    let dw_rows = empty_device_dtype(x.client.clone(), x.device.clone(), x.shape(), dtype);
    if rows == 0 || cols == 0 {
        return (dx, dw_rows);
    }
    let threads = row_threads(cols);
    rms_norm_backward_kernel::launch(
        &x.client,
        grid(rows),
        CubeDim::new_1d(threads),
        x.clone().into_tensor_arg(),
        weight.into_tensor_arg(),
        grad.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        dw_rows.clone().into_tensor_arg(),
        eps,
        threads as usize,
        dtype_to_storage_type(dtype),
    );
    (dx, dw_rows)
}
