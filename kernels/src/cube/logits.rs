//! The per-chunk halves of the head log-probs: statistics of each row of logits (one cube
//! per row: maximum and its first index, then the sum of exponentials, reduced in shared
//! memory) and the logits' gradient (one thread per element). Between them a chunk's
//! `[len, V]` logits are read twice forward and once backward, where the unfused ops make
//! a pass per max, shift, exp, sum, gather, argmax, compare and scatter. A frozen head's
//! forward runs the row kernel once with its slopes, written over the logits.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::launches::{Kernel, launched};
use crate::ops::logprobs::{LogprobOps, LogprobRows, LogprobSlopes, logit_rows_slopes_twin};

use super::{cube_sum, grid, row_threads, rows_cols};

/// With `slopes`, the row's log-prob gradient at `g = 1`, `onehot(t) − exp(logits − lse)`,
/// then overwrites the row in place: the frozen head's forward reads its chunk of logits
/// in one launch and keeps no second `[len, V]` buffer.
#[cube(launch)]
fn logit_rows_kernel<F: Float, I: Numeric>(
    logits: &mut Tensor<F>,
    targets: &Tensor<I>,
    logprob: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    hit: &mut Tensor<F>,
    entropy: &mut Tensor<F>,
    #[comptime] threads: usize,
    #[comptime] slopes: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let rows = logits.shape(0);
    let cols = logits.shape(1);
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let (s0, s1) = (logits.stride(0), logits.stride(1));

    // The maximum and the first column holding it.
    // Below every finite logit; WGSL has no infinity literal.
    let mut best = f32::new(-3.0e38);
    let mut best_at = cols as u32;
    let mut c = tid;
    while c < cols {
        let v = f32::cast_from(logits[row * s0 + c * s1]);
        if v > best {
            best = v;
            best_at = c as u32;
        }
        c += step;
    }
    let mut maxima = Shared::<[f32]>::new_slice(threads);
    let mut places = Shared::<[u32]>::new_slice(threads);
    maxima[tid] = best;
    places[tid] = best_at;
    sync_cube();
    let mut stride = step / 2;
    while stride > 0 {
        if tid < stride {
            let (v, at) = (maxima[tid + stride], places[tid + stride]);
            if v > maxima[tid] || (v == maxima[tid] && at < places[tid]) {
                maxima[tid] = v;
                places[tid] = at;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let max = maxima[0];
    let top = places[0];

    // `Σ e^d` and `Σ e^d·d` over the shifted logits `d = l − max`: the entropy is
    // `log Σe^d − Σe^d·d / Σe^d`, from this one pass.
    let mut sums = Shared::<[f32]>::new_slice(threads);
    let mut weighted = Shared::<[f32]>::new_slice(threads);
    let mut acc = 0.0f32;
    let mut acc_d = 0.0f32;
    let mut c = tid;
    while c < cols {
        let d = f32::cast_from(logits[row * s0 + c * s1]) - max;
        let e = f32::exp(d);
        acc += e;
        acc_d += e * d;
        c += step;
    }
    sums[tid] = acc;
    weighted[tid] = acc_d;
    sync_cube();
    cube_sum(&mut sums, tid);
    cube_sum(&mut weighted, tid);

    // `cube_sum` ends on a barrier, so every thread sees the sums.
    let total = max + f32::ln(sums[0]);
    let t = u32::cast_from(targets[row * targets.stride(0)]);
    if tid == 0 {
        let picked = f32::cast_from(logits[row * s0 + t as usize * s1]);
        let mut is_top = f32::new(0.0);
        if top == t {
            is_top = f32::new(1.0);
        }
        let (at_lp, at_lse, at_hit, at_h) = (
            row * logprob.stride(0),
            row * lse.stride(0),
            row * hit.stride(0),
            row * entropy.stride(0),
        );
        logprob[at_lp] = F::cast_from(picked - total);
        lse[at_lse] = F::cast_from(total);
        hit[at_hit] = F::cast_from(is_top);
        entropy[at_h] = F::cast_from(f32::ln(sums[0]) - weighted[0] / sums[0]);
    }
    if slopes {
        // The target's logit is read above before any thread overwrites it.
        sync_cube();
        let mut c = tid;
        while c < cols {
            let at = row * s0 + c * s1;
            let p = f32::exp(f32::cast_from(logits[at]) - total);
            let mut onehot = f32::new(0.0);
            if c as u32 == t {
                onehot = f32::new(1.0);
            }
            logits[at] = F::cast_from(onehot - p);
            c += step;
        }
    }
}

#[cube(launch)]
fn logit_grads_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    lse: &Tensor<F>,
    grad: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let cols = logits.shape(1);
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i >= logits.shape(0) * cols {
        terminate!();
    }
    let (r, c) = (i / cols, i % cols);
    let x = f32::cast_from(logits[r * logits.stride(0) + c * logits.stride(1)]);
    let g = f32::cast_from(grad[r * grad.stride(0)]);
    let p = f32::exp(x - f32::cast_from(lse[r * lse.stride(0)]));
    let mut onehot = f32::new(0.0);
    if u32::cast_from(targets[r * targets.stride(0)]) == c as u32 {
        onehot = f32::new(1.0);
    }
    let at = r * output.stride(0) + c * output.stride(1);
    output[at] = F::cast_from(g * (onehot - p));
}

/// The chunk loops stay the trait's bodies, around the backend's matmul; each chunk's
/// logits go through these two kernels.
impl LogprobOps for CubeBackend {
    fn logit_rows(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> LogprobRows<Self> {
        launched(Kernel::LogitRows);
        rows(logits, targets)
    }

    fn logit_grads(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launched(Kernel::LogitGrads);
        grads(logits, targets, lse, grad)
    }

    /// One launch over the chunk, its slopes written over its logits, when nothing else
    /// holds them (the chunk loop's fresh matmul output); else the two kernels.
    fn logit_rows_slopes(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> LogprobSlopes<Self> {
        let logits = into_contiguous(logits);
        if !logits.can_mut() {
            return logit_rows_slopes_twin::<Self>(logits, targets);
        }
        launched(Kernel::LogitRowsSlopes);
        let (lp, lse, hit, entropy) = launch_rows(logits.clone(), targets, true);
        (lp, lse, hit, entropy, logits)
    }
}

fn rows(logits: CubeTensor, targets: CubeTensor) -> LogprobRows<CubeBackend> {
    launch_rows(into_contiguous(logits), targets, false)
}

/// The row kernel over contiguous `logits`; with `slopes` it overwrites them.
fn launch_rows(logits: CubeTensor, targets: CubeTensor, slopes: bool) -> LogprobRows<CubeBackend> {
    let targets = into_contiguous(targets);
    let (rows, cols) = rows_cols(&logits);
    let (dtype, int_dtype) = (logits.dtype, targets.dtype);
    let new = || {
        empty_device_dtype(
            logits.client.clone(),
            logits.device.clone(),
            [rows].into(),
            dtype,
        )
    };
    let (logprob, lse, hit, entropy) = (new(), new(), new(), new());
    if rows == 0 || cols == 0 {
        return (logprob, lse, hit, entropy);
    }
    let threads = row_threads(cols);
    logit_rows_kernel::launch(
        &logits.client,
        grid(rows),
        CubeDim::new_1d(threads),
        logits.clone().into_tensor_arg(),
        targets.into_tensor_arg(),
        logprob.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        hit.clone().into_tensor_arg(),
        entropy.clone().into_tensor_arg(),
        threads as usize,
        slopes,
        [
            dtype_to_storage_type(dtype),
            dtype_to_storage_type(int_dtype),
        ],
    );
    (logprob, lse, hit, entropy)
}

fn grads(logits: CubeTensor, targets: CubeTensor, lse: CubeTensor, grad: CubeTensor) -> CubeTensor {
    let logits = into_contiguous(logits);
    let targets = into_contiguous(targets);
    let lse = into_contiguous(lse);
    let grad = into_contiguous(grad);
    let (rows, cols) = rows_cols(&logits);
    let (dtype, int_dtype) = (logits.dtype, targets.dtype);
    let output = empty_device_dtype(
        logits.client.clone(),
        logits.device.clone(),
        logits.shape(),
        dtype,
    );
    if rows * cols == 0 {
        return output;
    }
    const THREADS: u32 = 256;
    logit_grads_kernel::launch(
        &logits.client,
        grid((rows * cols).div_ceil(THREADS as usize)),
        CubeDim::new_1d(THREADS),
        logits.clone().into_tensor_arg(),
        targets.into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        [
            dtype_to_storage_type(dtype),
            dtype_to_storage_type(int_dtype),
        ],
    );
    output
}
