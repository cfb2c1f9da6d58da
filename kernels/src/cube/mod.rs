//! CubeCL kernels for the Cube backends (CUDA, wgpu, …): one `#[cube]` source compiles
//! for every runtime. Each file implements its op's extension trait (`ops/<op>.rs`) for
//! `CubeBackend`, counting each launch, so the kernel and its entry sit together. Each kernel reads and writes through strides, so any layout the
//! backend hands over works; rows are spread over a 2-D grid of cubes, since one grid
//! axis holds at most 65 535 of them.
//!
//! Only portable features are used (shared memory and cube barriers, no plane ops or
//! cmma), so the same kernels run on Mesa's lavapipe in CI.

mod attention;
mod logits;
mod lora;
mod quant_matmul;
mod rms_norm;
mod rotary;
mod swiglu;

use burn::backend::TensorMetadata;
use burn_cubecl::tensor::CubeTensor;
use cubecl::CubeCount;
use cubecl::prelude::*;

/// A grid of at least `cubes` cubes, as `(x, y)` with `x ≤ 65 535`.
fn grid(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, 65_535);
    let y = cubes.div_ceil(x).max(1);
    CubeCount::Static(x as u32, y as u32, 1)
}

/// `[rows, cols]` of a row-major 2-D tensor.
fn rows_cols(t: &CubeTensor) -> (usize, usize) {
    let [rows, cols] = t.shape().dims::<2>();
    (rows, cols)
}

/// Threads per row-reduction cube: a power of two, at most 256, no more than the row needs.
fn row_threads(cols: usize) -> u32 {
    (cols.next_power_of_two()).clamp(32, 256) as u32
}

/// Sums `partial` into `partial[0]` with the cube's threads, halving each round; every
/// thread must call it, after writing its own slot and a `sync_cube`.
#[cube]
fn cube_sum(partial: &mut Shared<[f32]>, tid: usize) {
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            partial[tid] += partial[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
}

/// Few-row projections have no kernel: on a GPU the backend's matmul already spreads them.
impl crate::ops::projection::ProjectionOps for burn_cubecl::CubeBackend {}
