//! CubeCL kernels for the Cube backends (CUDA, wgpu, …): one `#[cube]` source compiles
//! for every runtime. Each kernel reads and writes through strides, so any layout the
//! backend hands over works; rows are spread over a 2-D grid of cubes, since one grid
//! axis holds at most 65 535 of them.
//!
//! Only portable features are used (shared memory and cube barriers, no plane ops or
//! cmma), so the same kernels run on Mesa's lavapipe in CI.

mod attention;
mod logits;
mod lora;
mod rms_norm;
mod rotary;
mod swiglu;

use burn::backend::TensorMetadata;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::CubeCount;
use cubecl::prelude::*;

use crate::extension::FusedOps;
use crate::launches::{Kernel, launched};

impl FusedOps for CubeBackend {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        launched(Kernel::RmsNorm);
        rms_norm::forward(x, weight, eps)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        launched(Kernel::RmsNormBackward);
        rms_norm::backward(x, weight, grad, eps)
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launched(Kernel::Rotary);
        rotary::apply(x, cos, sin, false)
    }

    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launched(Kernel::RotaryBackward);
        rotary::apply(grad, cos, sin, true)
    }

    fn logit_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        launched(Kernel::LogitRows);
        logits::rows(logits, targets)
    }

    fn logit_grads(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launched(Kernel::LogitGrads);
        logits::grads(logits, targets, lse, grad)
    }

    /// Flash attention, which tiles by itself. With fewer queries than
    /// [`attention::FEW_QUERIES`] (decoding) its cubes would run a thread or two each
    /// over every key, so those go through the matmul-based blocked forward instead; its
    /// statistics have the same layout, so the backward is the kernel's either way.
    fn grouped_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        masked: BoolTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if q.shape().dims::<4>()[2] < attention::FEW_QUERIES {
            crate::extension::blocked_attention::<Self>(q, k, v, masked, block)
        } else {
            launched(Kernel::Attention);
            attention::forward(q, k, v, masked)
        }
    }

    fn grouped_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        masked: BoolTensor<Self>,
        out: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        _block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        launched(Kernel::AttentionBackward);
        attention::backward(q, k, v, masked, out, stats, grad)
    }

    fn lora_up(
        base: FloatTensor<Self>,
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        launched(Kernel::LoraUp);
        lora::up(base, down, b, scale)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        launched(Kernel::Swiglu);
        swiglu::forward(gate, up)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        launched(Kernel::SwigluBackward);
        swiglu::backward(gate, up, grad)
    }
}

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
