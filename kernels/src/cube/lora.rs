//! A LoRA adapter's up-projection as the epilogue of its base projection: one thread per
//! output element adds `s·Σ_k down[n, k]·B[o, k]` to `base[n, o]`. A cube covers a tile
//! of rows × columns and stages the tile's rows of `down` and of `B` in shared memory a
//! slice of the rank at a time, so any rank works and each factor element is read from
//! global memory once per tile. The base matmul stays the backend's own (autotuned, with
//! tensor cores where the device has them): a hand-written GEMM without them would lose
//! more than fusing it could win, while the up-projection's `[N, O]` product, written and
//! read back unfused, is exactly what this kernel removes.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::launches::{Kernel, launched};
use crate::ops::lora::LoraOps;

use super::{grid, rows_cols};

/// Output columns per cube (threads along x).
const COLS: usize = 64;
/// Output rows per cube (threads along y).
const ROWS: usize = 4;
/// Rank entries staged per round.
const SLICE: usize = 32;
/// Shared-memory row pitch: one past the slice, so threads reading the same entry of
/// consecutive rows of `B` fall in different banks.
const PITCH: usize = SLICE + 1;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lora_up_kernel<F: Float, G: Float>(
    base: &Tensor<F>,
    down: &Tensor<G>,
    b: &Tensor<G>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] tile_rows: usize,
    #[comptime] tile_cols: usize,
    #[comptime] slice: usize,
    #[comptime] pitch: usize,
    #[define(F, G)] _dtypes: [ElemType; 2],
) {
    let rows = base.shape(0);
    let cols = base.shape(1);
    let rank = down.shape(1);
    let across = cols.div_ceil(tile_cols);
    let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if cube >= across * rows.div_ceil(tile_rows) {
        terminate!();
    }
    let r0 = (cube / across) * tile_rows;
    let c0 = (cube % across) * tile_cols;
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let tid = ty * tile_cols + tx;
    let threads = tile_rows * tile_cols;

    let mut downs = Shared::<[f32]>::new_slice(tile_rows * pitch);
    let mut ups = Shared::<[f32]>::new_slice(tile_cols * pitch);
    let mut acc = f32::new(0.0);
    let mut k0 = 0usize;
    while k0 < rank {
        // Zero past the rank and the matrix edges, so the sum below needs no bounds.
        let mut idx = tid;
        while idx < tile_rows * slice {
            let (rr, kk) = (idx / slice, idx % slice);
            let (r, k) = (r0 + rr, k0 + kk);
            let mut x = f32::new(0.0);
            if r < rows && k < rank {
                x = f32::cast_from(down[r * down.stride(0) + k * down.stride(1)]);
            }
            downs[rr * pitch + kk] = x;
            idx += threads;
        }
        let mut idx = tid;
        while idx < tile_cols * slice {
            let (cc, kk) = (idx / slice, idx % slice);
            let (c, k) = (c0 + cc, k0 + kk);
            let mut x = f32::new(0.0);
            if c < cols && k < rank {
                x = f32::cast_from(b[c * b.stride(0) + k * b.stride(1)]);
            }
            ups[cc * pitch + kk] = x;
            idx += threads;
        }
        sync_cube();
        for kk in 0..slice {
            acc += downs[ty * pitch + kk] * ups[tx * pitch + kk];
        }
        sync_cube();
        k0 += slice;
    }

    let (r, c) = (r0 + ty, c0 + tx);
    if r < rows && c < cols {
        let x = base[r * base.stride(0) + c * base.stride(1)];
        let at = r * out.stride(0) + c * out.stride(1);
        out[at] = x + F::cast_from(acc * scale);
    }
}

/// The backward stays the trait's twin: two skinny matmuls the backend does well.
impl LoraOps for CubeBackend {
    fn lora_up(
        base: FloatTensor<Self>,
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        launched(Kernel::LoraUp);
        up(base, down, b, scale)
    }
}

fn up(base: CubeTensor, down: CubeTensor, b: CubeTensor, scale: f32) -> CubeTensor {
    let base = into_contiguous(base);
    let down = into_contiguous(down);
    let b = into_contiguous(b);
    let (rows, cols) = rows_cols(&base);
    let dtype = base.dtype;
    let out = empty_device_dtype(
        base.client.clone(),
        base.device.clone(),
        base.shape(),
        dtype,
    );
    if rows * cols == 0 {
        return out;
    }
    let factors = down.dtype;
    let client = base.client.clone();
    lora_up_kernel::launch(
        &client,
        grid(rows.div_ceil(ROWS) * cols.div_ceil(COLS)),
        CubeDim::new_2d(COLS as u32, ROWS as u32),
        base.into_tensor_arg(),
        down.into_tensor_arg(),
        b.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        scale,
        ROWS,
        COLS,
        SLICE,
        PITCH,
        [dtype_to_storage_type(dtype), dtype_to_storage_type(factors)],
    );
    out
}
