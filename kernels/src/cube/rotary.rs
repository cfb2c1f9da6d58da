//! RoPE forward and backward, one thread per element of `x` `[B, H, T, D]`: each reads its
//! own value and its partner half a head away, so neither pass builds the rotated copy the
//! unfused ops do.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::launches::{Kernel, launched};
use crate::ops::rotary::RotaryOps;

use super::grid;

const THREADS: u32 = 256;

/// `backward = false`: `out_i = x_i·cos_i ∓ x_partner·sin_i` (− in the first half);
/// `backward = true`: `dx_i = g_i·cos_i ± g_partner·sin_partner` (+ in the first half),
/// the transpose of the rotation. `x` and the output are `F` (bf16 under mixed precision),
/// the tables `T` (f32 as the model makes them); the products are f32 either way.
#[cube(launch)]
fn rotary_kernel<F: Float, T: Float>(
    x: &Tensor<F>,
    cos: &Tensor<T>,
    sin: &Tensor<T>,
    output: &mut Tensor<F>,
    #[comptime] backward: bool,
    #[define(F, T)] _dtypes: [ElemType; 2],
) {
    let (heads, tokens, dim) = (x.shape(1), x.shape(2), x.shape(3));
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i >= x.shape(0) * heads * tokens * dim {
        terminate!();
    }
    let c = i % dim;
    let t = (i / dim) % tokens;
    let h = (i / (dim * tokens)) % heads;
    let b = i / (dim * tokens * heads);
    let half = dim / 2;
    let first = c < half;
    let partner = if first { c + half } else { c - half };
    let base = b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
    let table = b * cos.stride(0) + t * cos.stride(1);
    let table_sin = b * sin.stride(0) + t * sin.stride(1);
    let own = f32::cast_from(x[base + c * x.stride(3)]);
    let other = f32::cast_from(x[base + partner * x.stride(3)]);
    let cos_c = f32::cast_from(cos[table + c * cos.stride(2)]);
    let mut value = own * cos_c;
    if backward {
        let sin_p = f32::cast_from(sin[table_sin + partner * sin.stride(2)]);
        if first {
            value += other * sin_p;
        } else {
            value -= other * sin_p;
        }
    } else {
        let sin_c = f32::cast_from(sin[table_sin + c * sin.stride(2)]);
        if first {
            value -= other * sin_c;
        } else {
            value += other * sin_c;
        }
    }
    let at =
        b * output.stride(0) + h * output.stride(1) + t * output.stride(2) + c * output.stride(3);
    output[at] = F::cast_from(value);
}

impl RotaryOps for CubeBackend {
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launched(Kernel::Rotary);
        apply(x, cos, sin, false)
    }

    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launched(Kernel::RotaryBackward);
        apply(grad, cos, sin, true)
    }
}

fn apply(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, backward: bool) -> CubeTensor {
    // The kernel indexes `x` through its strides, so the heads' swapped layout is read
    // in place rather than copied first.
    let cos = into_contiguous(cos);
    let sin = into_contiguous(cast(sin, cos.dtype));
    let dtype = x.dtype;
    let table_dtype = cos.dtype;
    let n = x.shape().num_elements();
    let output = empty_device_dtype(x.client.clone(), x.device.clone(), x.shape(), dtype);
    if n == 0 {
        return output;
    }
    rotary_kernel::launch(
        &x.client,
        grid(n.div_ceil(THREADS as usize)),
        CubeDim::new_1d(THREADS),
        x.clone().into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        backward,
        [
            dtype_to_storage_type(dtype),
            dtype_to_storage_type(table_dtype),
        ],
    );
    output
}
