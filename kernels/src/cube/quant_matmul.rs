//! `x·Wᵀ` and its input gradient `g·W` with `W` blockwise quantized (NF4, Q8_0): one
//! thread per output element walks its row (or column) of the packed weight, unpacking
//! and scaling each word's code indices in registers, so no float copy of the weight is
//! ever written. Plain loads, no shared-memory staging or tensor cores: written for
//! memory and exactness first; its speed beside a bf16 matmul is what the GPU bench
//! measures.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::launches::{Kernel, launched};
use crate::ops::quant_matmul::QuantMatmulOps;

use super::grid;

/// Output columns per cube (threads along x).
const COLS: usize = 64;
/// Output rows per cube (threads along y).
const ROWS: usize = 4;

/// `out[r, c] = Σ_k x[r, k] · code[idx(c, k)] · scale(c, k)`, accumulated in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn quant_matmul_kernel<F: Float, G: Float>(
    x: &Tensor<F>,
    packed: &Tensor<u32>,
    scales: &Tensor<G>,
    code: &Tensor<G>,
    out: &mut Tensor<F>,
    #[comptime] bits: u32,
    #[comptime] per_word: usize,
    #[comptime] block: usize,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let rows = x.shape(0);
    let k = x.shape(1);
    let cols = out.shape(1);
    let across = cols.div_ceil(COLS);
    let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if cube >= across * rows.div_ceil(ROWS) {
        terminate!();
    }
    let r = (cube / across) * ROWS + UNIT_POS_Y as usize;
    let c = (cube % across) * COLS + UNIT_POS_X as usize;
    if r < rows && c < cols {
        let mask = (1u32 << bits) - 1;
        let words = k / per_word;
        let mut acc = f32::new(0.0);
        for w in 0..words {
            let word = packed[c * words + w];
            let k0 = w * per_word;
            // A block holds whole words, so one scale serves the word.
            let scale = f32::cast_from(scales[(c * k + k0) / block]);
            #[unroll]
            for j in 0..per_word {
                let idx = (word >> (j as u32 * bits)) & mask;
                let wv = f32::cast_from(code[idx as usize]) * scale;
                acc += f32::cast_from(x[r * k + k0 + j]) * wv;
            }
        }
        out[r * cols + c] = F::cast_from(acc);
    }
}

/// `dx[r, kk] = Σ_n g[r, n] · W[n, kk]`, accumulated in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn quant_matmul_backward_kernel<F: Float, G: Float>(
    grad: &Tensor<F>,
    packed: &Tensor<u32>,
    scales: &Tensor<G>,
    code: &Tensor<G>,
    dx: &mut Tensor<F>,
    #[comptime] bits: u32,
    #[comptime] per_word: usize,
    #[comptime] block: usize,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let rows = grad.shape(0);
    let n = grad.shape(1);
    let k = dx.shape(1);
    let across = k.div_ceil(COLS);
    let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if cube >= across * rows.div_ceil(ROWS) {
        terminate!();
    }
    let r = (cube / across) * ROWS + UNIT_POS_Y as usize;
    let kk = (cube % across) * COLS + UNIT_POS_X as usize;
    if r < rows && kk < k {
        let mask = (1u32 << bits) - 1;
        let words = k / per_word;
        let shift = (kk % per_word) as u32 * bits;
        let mut acc = f32::new(0.0);
        for row in 0..n {
            let word = packed[row * words + kk / per_word];
            let idx = (word >> shift) & mask;
            let wv =
                f32::cast_from(code[idx as usize]) * f32::cast_from(scales[(row * k + kk) / block]);
            acc += f32::cast_from(grad[r * n + row]) * wv;
        }
        dx[r * k + kk] = F::cast_from(acc);
    }
}

impl QuantMatmulOps for CubeBackend {
    fn quant_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        code: FloatTensor<Self>,
        bits: u32,
        block: u32,
    ) -> FloatTensor<Self> {
        launched(Kernel::QuantMatmul);
        let [rows, _] = x.shape().dims::<2>();
        let [cols, _] = packed.shape().dims::<2>();
        launch(x, packed, scales, code, bits, block, [rows, cols], false)
    }

    fn quant_matmul_backward(
        grad: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        code: FloatTensor<Self>,
        bits: u32,
        block: u32,
    ) -> FloatTensor<Self> {
        launched(Kernel::QuantMatmulBackward);
        let [rows, _] = grad.shape().dims::<2>();
        let [_, words] = packed.shape().dims::<2>();
        let k = words * (32 / bits) as usize;
        launch(grad, packed, scales, code, bits, block, [rows, k], true)
    }
}

#[allow(clippy::too_many_arguments)]
fn launch(
    input: CubeTensor,
    packed: CubeTensor,
    scales: CubeTensor,
    code: CubeTensor,
    bits: u32,
    block: u32,
    [rows, cols]: [usize; 2],
    backward: bool,
) -> CubeTensor {
    let input = into_contiguous(input);
    let packed = into_contiguous(packed);
    let scales = into_contiguous(scales);
    let code = into_contiguous(code);
    let dtype = input.dtype;
    let out = empty_device_dtype(
        input.client.clone(),
        input.device.clone(),
        Shape::new([rows, cols]),
        dtype,
    );
    if rows * cols == 0 {
        return out;
    }
    let client = input.client.clone();
    let per_word = (32 / bits) as usize;
    let dtypes = [
        dtype_to_storage_type(dtype),
        dtype_to_storage_type(scales.dtype),
    ];
    let count = grid(rows.div_ceil(ROWS) * cols.div_ceil(COLS));
    let dim = CubeDim::new_2d(COLS as u32, ROWS as u32);
    if backward {
        quant_matmul_backward_kernel::launch(
            &client,
            count,
            dim,
            input.into_tensor_arg(),
            packed.into_tensor_arg(),
            scales.into_tensor_arg(),
            code.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            bits,
            per_word,
            block as usize,
            dtypes,
        );
    } else {
        quant_matmul_kernel::launch(
            &client,
            count,
            dim,
            input.into_tensor_arg(),
            packed.into_tensor_arg(),
            scales.into_tensor_arg(),
            code.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            bits,
            per_word,
            block as usize,
            dtypes,
        );
    }
    out
}
