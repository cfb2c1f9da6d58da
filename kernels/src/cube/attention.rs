//! Flash attention, forward and backward, for grouped K/V heads and an arbitrary mask.
//!
//! Forward: one cube per (batch, query head, block of queries), one thread per query. The
//! cube walks the keys a tile at a time: its threads load the tile of K and V (from the
//! query head's K/V head, `h / (H / Hkv)`: nothing is repeated) into shared memory once,
//! and every thread scores its query against the tile and folds it into a running softmax
//! (maximum `m`, normaliser `l`, un-normalised output), rescaling once per tile. No score
//! outlives its tile, so memory is O(S) beyond the inputs; `m` and `l` are written out for
//! the backward.
//!
//! Backward, in two launches so that nothing is accumulated across cubes (no atomics):
//! - `dq`: the forward's layout; each thread rebuilds its row's probabilities
//!   `p = exp(s − m)/l` tile by tile and sums `dq = scale·Σ p·(dO·v − δ)·k`, where
//!   `δ = dO·O` is its row's own dot product, written out for the second launch;
//! - `dk`, `dv`: one cube per (batch, K/V head, block of keys), one thread per key; the
//!   cube walks the queries of every head in the group a tile at a time, and each thread
//!   sums `dv = Σ p·dO` and `dk = scale·Σ p·(dO·v − δ)·q`.
//!
//! A tile that no thread of the cube needs is neither loaded nor scored: under a causal
//! mask a cube of queries skips the keys after its last query and a cube of keys the
//! queries before its first, about half of a long sequence's work. The mask decides, so
//! padding and packed examples skip too; rows that see no key at all (they attend to
//! every key uniformly, as in the reference) keep their cube from skipping.
//!
//! On a GPU the loops over the head dimension are unrolled (it is a compile-time
//! constant), so each thread's rows of q, k, v and its sums are indexed by constants and
//! can live in registers rather than local memory. A software device (lavapipe) compiles
//! unrolled shaders for minutes, so there they stay loops above a head dim of 32: CI's
//! head dim 16 runs the unrolled variant, 64 and 128 the looped one.
//!
//! Masked scores are `−10³⁰`, as in the reference: a row with every key masked averages
//! V uniformly, and masked scores pass no gradient to q and k. Sums are f32 whatever the
//! inputs' dtype. Only shared memory and cube barriers are used (no plane ops, no cmma),
//! so the same kernels run on lavapipe in CI; the key/query tiles are sized to the
//! device's shared memory.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{DType, TensorMetadata};
use burn::tensor::BoolStore;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::{bool_cast, untile};
use burn_cubecl::ops::numeric::{empty_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::launches::{Kernel, launched};
use crate::mode::{AttentionPath, attention_path};
use crate::ops::attention::{AttentionOps, blocked_attention, blocked_attention_backward};

use super::grid;

/// Queries (forward, `dq`) or keys (`dk`/`dv`) per cube: one thread each.
const ROWS: usize = 64;

/// Below this many queries per head the forward leaves the kernel for the backend's
/// matmuls: a cube would keep one thread of its 64 busy.
const FEW_QUERIES: usize = 16;

/// The f32 scores `[B, H, block, S]` one block of [`AttentionPath::Blocked`] may hold: a
/// GPU wants few, large matmuls (64 queries of 2048 keys would be hundreds of small
/// launches per layer), while memory stays bounded by this, not by `T·S`. The backward
/// holds about four such tensors at once.
const BLOCKED_SCORES_BYTES: usize = 256 << 20;

/// The query block of the blocked path on a GPU: at least `requested`, and as many queries
/// as [`BLOCKED_SCORES_BYTES`] of scores allow. Blocks only bound memory: the output and
/// `dq` of a query do not depend on them, `dk` and `dv` only by the order of their sums.
fn gpu_block(q: &CubeTensor, k: &CubeTensor, requested: usize) -> usize {
    let [b, h, _, _] = q.shape().dims::<4>();
    block_within(requested, b * h * k.shape().dims::<4>()[2])
}

/// At least `requested` queries, each with `row` f32 scores, and as many as the budget holds.
fn block_within(requested: usize, row: usize) -> usize {
    requested.max(BLOCKED_SCORES_BYTES / (4 * row).max(1))
}

#[cfg(test)]
mod tests {
    /// Llama-3.2-1B at 2048 tokens: 1024 queries a block alone (two blocks), 256 with 4
    /// sequences; the requested block stays a floor where rows are long.
    #[test]
    fn blocks_fill_the_score_budget() {
        use super::block_within;
        assert_eq!(block_within(64, 32 * 2048), 1024);
        assert_eq!(block_within(64, 4 * 32 * 2048), 256);
        assert_eq!(block_within(64, 64 * 32 * 131_072), 64);
    }
}

/// The score of a masked key; finite, so a row with nothing visible stays NaN-free.
const MASKED: f32 = -1.0e30;

#[cube(launch)]
fn forward_kernel<F: Float, M: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    mask: &Tensor<M>,
    out: &mut Tensor<F>,
    stats: &mut Tensor<f32>,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] tile: usize,
    #[comptime] threads: usize,
    #[comptime] unroll: bool,
    #[define(F, M)] _dtypes: [ElemType; 2],
) {
    let s_len = k.shape(2);
    let cube = cube_rows(q.shape(0), q.shape(1), q.shape(2));
    let b = cube.b;
    let h = cube.head;
    let kvh = h / (q.shape(1) / k.shape(1));
    let tid = cube.tid;
    let i = cube.index;
    let live = cube.live;
    let row = cube.row;

    let q_at = b * q.stride(0) + h * q.stride(1) + row * q.stride(2);
    let mut qrow = Array::<f32>::new(dim);
    let mut acc = Array::<f32>::new(dim);
    #[unroll(unroll)]
    for c in 0..dim {
        qrow[c] = f32::cast_from(q[q_at + c * q.stride(3)]) * scale;
        acc[c] = 0.0;
    }
    let k_at = b * k.stride(0) + kvh * k.stride(1);
    let v_at = b * v.stride(0) + kvh * v.stride(1);
    let mask_at = b * mask.stride(0) + row * mask.stride(2);

    let mut ks = Shared::<[f32]>::new_slice(tile * dim);
    let mut vs = Shared::<[f32]>::new_slice(tile * dim);
    let mut scores = Array::<f32>::new(tile);
    let mut flags = Shared::<[u32]>::new_slice(threads);
    // A row that sees no key attends uniformly to every key, masked ones included (as the
    // reference does), so a tile that no row of the cube sees may be skipped only when
    // every row sees some key. Causal rows all see key 0: their cubes skip the tiles
    // past their last query, half the work of a long sequence.
    let mut sees = !live;
    if live {
        let mut j = 0usize;
        while j < s_len {
            if u32::cast_from(mask[mask_at + j * mask.stride(3)]) == 0 {
                sees = true;
                j = s_len;
            } else {
                j += 1;
            }
        }
    }
    let may_skip = !cube_any(&mut flags, !sees, tid, threads);
    sync_cube();
    // Below every score, masked ones included; WGSL has no infinity literal.
    let mut m = f32::new(-3.0e38);
    let mut l = f32::new(0.0);
    let mut j0 = 0usize;
    while j0 < s_len {
        let n = select(s_len - j0 < tile, s_len - j0, tile);
        let seen = live && sees_any(mask, mask_at + j0 * mask.stride(3), mask.stride(3), n, tile);
        let needed = cube_any(&mut flags, seen || !may_skip, tid, threads);
        if needed {
            load_tiles(k, k_at, v, v_at, &mut ks, &mut vs, j0, n, tid, dim, threads);
        }
        sync_cube();
        if live && needed {
            let mut top = m;
            for jj in 0..tile {
                if jj < n {
                    let mut s = f32::new(MASKED);
                    if u32::cast_from(mask[mask_at + (j0 + jj) * mask.stride(3)]) == 0 {
                        s = 0.0;
                        #[unroll(unroll)]
                        for c in 0..dim {
                            s += qrow[c] * ks[jj * dim + c];
                        }
                    }
                    scores[jj] = s;
                    if s > top {
                        top = s;
                    }
                }
            }
            let shrink = f32::exp(m - top);
            l *= shrink;
            #[unroll(unroll)]
            for c in 0..dim {
                acc[c] *= shrink;
            }
            for jj in 0..tile {
                if jj < n {
                    let p = f32::exp(scores[jj] - top);
                    l += p;
                    #[unroll(unroll)]
                    for c in 0..dim {
                        acc[c] += p * vs[jj * dim + c];
                    }
                }
            }
            m = top;
        }
        sync_cube();
        j0 += tile;
    }

    if live {
        let out_at = b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
        let oc = out.stride(3);
        #[unroll(unroll)]
        for c in 0..dim {
            out[out_at + c * oc] = F::cast_from(acc[c] / l);
        }
        let st = b * stats.stride(0) + h * stats.stride(1) + i * stats.stride(2);
        let next = stats.stride(3);
        stats[st] = m;
        stats[st + next] = l;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dq_kernel<F: Float, M: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    mask: &Tensor<M>,
    out: &Tensor<F>,
    grad: &Tensor<F>,
    stats: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] tile: usize,
    #[comptime] threads: usize,
    #[comptime] unroll: bool,
    #[define(F, M)] _dtypes: [ElemType; 2],
) {
    let s_len = k.shape(2);
    let cube = cube_rows(q.shape(0), q.shape(1), q.shape(2));
    let b = cube.b;
    let h = cube.head;
    let kvh = h / (q.shape(1) / k.shape(1));
    let tid = cube.tid;
    let i = cube.index;
    let live = cube.live;
    let row = cube.row;

    let q_at = b * q.stride(0) + h * q.stride(1) + row * q.stride(2);
    let o_at = b * out.stride(0) + h * out.stride(1) + row * out.stride(2);
    let g_at = b * grad.stride(0) + h * grad.stride(1) + row * grad.stride(2);
    let mut qrow = Array::<f32>::new(dim);
    let mut drow = Array::<f32>::new(dim);
    let mut acc = Array::<f32>::new(dim);
    let mut d = f32::new(0.0);
    #[unroll(unroll)]
    for c in 0..dim {
        qrow[c] = f32::cast_from(q[q_at + c * q.stride(3)]) * scale;
        let g = f32::cast_from(grad[g_at + c * grad.stride(3)]);
        drow[c] = g;
        d += g * f32::cast_from(out[o_at + c * out.stride(3)]);
        acc[c] = 0.0;
    }
    let st = b * stats.stride(0) + h * stats.stride(1) + row * stats.stride(2);
    let m = stats[st];
    let l = stats[st + stats.stride(3)];
    if live {
        let at = b * delta.stride(0) + h * delta.stride(1) + i * delta.stride(2);
        delta[at] = d;
    }
    let k_at = b * k.stride(0) + kvh * k.stride(1);
    let v_at = b * v.stride(0) + kvh * v.stride(1);
    let mask_at = b * mask.stride(0) + row * mask.stride(2);

    let mut ks = Shared::<[f32]>::new_slice(tile * dim);
    let mut vs = Shared::<[f32]>::new_slice(tile * dim);
    let mut flags = Shared::<[u32]>::new_slice(threads);
    let mut j0 = 0usize;
    while j0 < s_len {
        let n = select(s_len - j0 < tile, s_len - j0, tile);
        // Masked keys give q no gradient: a tile no row of the cube sees adds nothing.
        let seen = live && sees_any(mask, mask_at + j0 * mask.stride(3), mask.stride(3), n, tile);
        let needed = cube_any(&mut flags, seen, tid, threads);
        if needed {
            load_tiles(k, k_at, v, v_at, &mut ks, &mut vs, j0, n, tid, dim, threads);
        }
        sync_cube();
        if live && needed {
            for jj in 0..tile {
                if jj < n && u32::cast_from(mask[mask_at + (j0 + jj) * mask.stride(3)]) == 0 {
                    let mut s = f32::new(0.0);
                    let mut dp = f32::new(0.0);
                    #[unroll(unroll)]
                    for c in 0..dim {
                        s += qrow[c] * ks[jj * dim + c];
                        dp += drow[c] * vs[jj * dim + c];
                    }
                    let ds = f32::exp(s - m) / l * (dp - d);
                    #[unroll(unroll)]
                    for c in 0..dim {
                        acc[c] += ds * ks[jj * dim + c];
                    }
                }
            }
        }
        sync_cube();
        j0 += tile;
    }

    if live {
        let at = b * dq.stride(0) + h * dq.stride(1) + i * dq.stride(2);
        let qc = dq.stride(3);
        #[unroll(unroll)]
        for c in 0..dim {
            dq[at + c * qc] = F::cast_from(acc[c] * scale);
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dkdv_kernel<F: Float, M: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    mask: &Tensor<M>,
    grad: &Tensor<F>,
    stats: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] tile: usize,
    #[comptime] threads: usize,
    #[comptime] unroll: bool,
    #[define(F, M)] _dtypes: [ElemType; 2],
) {
    let t_len = q.shape(2);
    let group = q.shape(1) / k.shape(1);
    let cube = cube_rows(k.shape(0), k.shape(1), k.shape(2));
    let b = cube.b;
    let kvh = cube.head;
    let tid = cube.tid;
    let j = cube.index;
    let live = cube.live;
    let key = cube.row;

    let k_at = b * k.stride(0) + kvh * k.stride(1) + key * k.stride(2);
    let v_at = b * v.stride(0) + kvh * v.stride(1) + key * v.stride(2);
    let mut krow = Array::<f32>::new(dim);
    let mut vrow = Array::<f32>::new(dim);
    let mut dk_acc = Array::<f32>::new(dim);
    let mut dv_acc = Array::<f32>::new(dim);
    #[unroll(unroll)]
    for c in 0..dim {
        krow[c] = f32::cast_from(k[k_at + c * k.stride(3)]) * scale;
        vrow[c] = f32::cast_from(v[v_at + c * v.stride(3)]);
        dk_acc[c] = 0.0;
        dv_acc[c] = 0.0;
    }
    let mask_at = b * mask.stride(0) + key * mask.stride(3);

    let mut qs = Shared::<[f32]>::new_slice(tile * dim);
    let mut gs = Shared::<[f32]>::new_slice(tile * dim);
    let mut ms = Shared::<[f32]>::new_slice(tile);
    let mut ls = Shared::<[f32]>::new_slice(tile);
    let mut ds = Shared::<[f32]>::new_slice(tile);
    let mut flags = Shared::<[u32]>::new_slice(threads);
    for hh in 0..group {
        let h = kvh * group + hh;
        let q_at = b * q.stride(0) + h * q.stride(1);
        let g_at = b * grad.stride(0) + h * grad.stride(1);
        let st_at = b * stats.stride(0) + h * stats.stride(1);
        let d_at = b * delta.stride(0) + h * delta.stride(1);
        let mut i0 = 0usize;
        while i0 < t_len {
            let n = select(t_len - i0 < tile, t_len - i0, tile);
            // A tile of queries adds nothing to these keys when none of them sees one of
            // the keys, unless a query sees no key at all (it spreads its `dv` over every
            // key, as the forward spread its attention).
            let mut touches =
                live && sees_any(mask, mask_at + i0 * mask.stride(2), mask.stride(2), n, tile);
            for ii in 0..tile {
                if ii < n && stats[st_at + (i0 + ii) * stats.stride(2)] < MASKED * 0.5 {
                    touches = true;
                }
            }
            let needed = cube_any(&mut flags, touches, tid, threads);
            if needed {
                load_tiles(
                    q, q_at, grad, g_at, &mut qs, &mut gs, i0, n, tid, dim, threads,
                );
                if tid < n {
                    let st = st_at + (i0 + tid) * stats.stride(2);
                    ms[tid] = stats[st];
                    ls[tid] = stats[st + stats.stride(3)];
                    ds[tid] = delta[d_at + (i0 + tid) * delta.stride(2)];
                }
            }
            sync_cube();
            if live && needed {
                for ii in 0..tile {
                    if ii < n {
                        let visible =
                            u32::cast_from(mask[mask_at + (i0 + ii) * mask.stride(2)]) == 0;
                        let mut s = f32::new(MASKED);
                        if visible {
                            s = 0.0;
                            #[unroll(unroll)]
                            for c in 0..dim {
                                s += qs[ii * dim + c] * krow[c];
                            }
                        }
                        let p = f32::exp(s - ms[ii]) / ls[ii];
                        let mut dp = f32::new(0.0);
                        #[unroll(unroll)]
                        for c in 0..dim {
                            dv_acc[c] += p * gs[ii * dim + c];
                            dp += gs[ii * dim + c] * vrow[c];
                        }
                        if visible {
                            let dscore = p * (dp - ds[ii]);
                            #[unroll(unroll)]
                            for c in 0..dim {
                                dk_acc[c] += dscore * qs[ii * dim + c];
                            }
                        }
                    }
                }
            }
            sync_cube();
            i0 += tile;
        }
    }

    if live {
        let dk_at = b * dk.stride(0) + kvh * dk.stride(1) + j * dk.stride(2);
        let dv_at = b * dv.stride(0) + kvh * dv.stride(1) + j * dv.stride(2);
        let (kc, vc) = (dk.stride(3), dv.stride(3));
        #[unroll(unroll)]
        for c in 0..dim {
            dk[dk_at + c * kc] = F::cast_from(dk_acc[c] * scale);
            dv[dv_at + c * vc] = F::cast_from(dv_acc[c]);
        }
    }
}

/// The rows one thread of a flash cube owns: the forward and `dq` give each thread a
/// query of one (batch, query head), `dk`/`dv` a key of one (batch, K/V head), and all
/// three number their cubes alike, `blocks` of `CUBE_DIM_X` rows per head.
#[derive(CubeType)]
struct CubeRows {
    b: usize,
    head: usize,
    tid: usize,
    /// This thread's row; past the last row for the threads of a partial block.
    index: usize,
    live: bool,
    /// `index`, or row 0 for a thread past the last: those still load tiles and meet the
    /// barriers, so they read a real row and write nothing.
    row: usize,
}

/// The cube's place in a `[batch, heads, len]` grid of rows; cubes past its end (the grid
/// is rounded up to whole rows of cubes) stop here.
#[cube]
fn cube_rows(batch: usize, heads: usize, len: usize) -> CubeRows {
    let rows = CUBE_DIM_X as usize;
    let blocks = len.div_ceil(rows);
    let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if cube >= batch * heads * blocks {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let index = (cube % blocks) * rows + tid;
    let live = index < len;
    CubeRows {
        b: cube / (heads * blocks),
        head: (cube / blocks) % heads,
        tid,
        index,
        live,
        row: select(live, index, 0),
    }
}

/// Whether any thread of the cube passes `mine`. Every thread must call it; the caller
/// syncs the cube before calling it again. The barrier stays outside every branch, as
/// WGSL's uniformity rules want.
#[cube]
fn cube_any(flags: &mut Shared<[u32]>, mine: bool, tid: usize, #[comptime] threads: usize) -> bool {
    let mut flag = 0u32;
    if mine {
        flag = 1;
    }
    flags[tid] = flag;
    sync_cube();
    let mut count = 0u32;
    for r in 0..threads {
        count += flags[r];
    }
    count > 0
}

/// Copies rows `first..first + n` of two `[.., rows, D]` tensors, from offsets `a_at`
/// and `b_at` (their batch and head), into shared tiles as f32: the cube's threads stride
/// over the elements together.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tiles<F: Float>(
    a: &Tensor<F>,
    a_at: usize,
    b: &Tensor<F>,
    b_at: usize,
    a_tile: &mut Shared<[f32]>,
    b_tile: &mut Shared<[f32]>,
    first: usize,
    n: usize,
    tid: usize,
    #[comptime] dim: usize,
    #[comptime] threads: usize,
) {
    let mut idx = tid;
    while idx < n * dim {
        let r = first + idx / dim;
        let c = idx % dim;
        a_tile[idx] = f32::cast_from(a[a_at + r * a.stride(2) + c * a.stride(3)]);
        b_tile[idx] = f32::cast_from(b[b_at + r * b.stride(2) + c * b.stride(3)]);
        idx += threads;
    }
}

/// Whether any of the `n` mask entries at `at`, `at + step`, … is clear (visible).
#[cube]
fn sees_any<M: Numeric>(
    mask: &Tensor<M>,
    at: usize,
    step: usize,
    n: usize,
    #[comptime] tile: usize,
) -> bool {
    let mut seen = false;
    for x in 0..tile {
        if x < n && u32::cast_from(mask[at + x * step]) == 0 {
            seen = true;
        }
    }
    seen
}

/// Keys (or queries) per shared-memory tile: the most, up to 32, whose tiles of two
/// `[tile, D]` f32 blocks and three `[tile]` rows fit in the device's shared memory
/// (at most 32 KiB of it, so two cubes can share a multiprocessor).
fn tile_for(like: &CubeTensor, dim: usize) -> usize {
    let budget = like
        .client
        .properties()
        .hardware
        .max_shared_memory_size
        .min(32 * 1024);
    let per_row = (2 * dim + 3) * core::mem::size_of::<f32>();
    let fit = (budget / per_row).clamp(1, 32);
    1 << fit.ilog2()
}

/// Whether to unroll the head-dimension loops: on every real device; on a software one
/// (no card behind it) only for small heads, which compile quickly.
fn unroll_for(like: &CubeTensor, dim: usize) -> bool {
    dim <= 32 || like.client.properties().identity.physical.is_some()
}

/// A mask the kernels can read as numbers: U8/U32 storage as it is, native bools cast.
fn numeric_mask(mask: CubeTensor) -> CubeTensor {
    match mask.dtype {
        DType::Bool(BoolStore::Native) => bool_cast(mask, DType::U32),
        _ => mask,
    }
}

fn f32_tensor(like: &CubeTensor, shape: [usize; 4]) -> CubeTensor {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        DType::F32,
    )
}

impl AttentionOps for CubeBackend {
    /// Flash attention, which tiles by itself, unless [`AttentionPath::Blocked`] asks for
    /// the matmul-based blocked forward. Under `auto`, fewer queries than [`FEW_QUERIES`]
    /// (decoding) take the blocked forward too: a flash cube would run a thread or two
    /// over every key. Both keep statistics of one layout, so either backward reads
    /// either forward's.
    fn grouped_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        masked: BoolTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let blocked = match attention_path() {
            AttentionPath::Blocked => Some(gpu_block(&q, &k, block)),
            AttentionPath::Flash => None,
            AttentionPath::Auto => (q.shape().dims::<4>()[2] < FEW_QUERIES).then_some(block),
        };
        if let Some(block) = blocked {
            blocked_attention::<Self>(q, k, v, masked, block)
        } else {
            launched(Kernel::Attention);
            forward(q, k, v, masked)
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
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if attention_path() == AttentionPath::Blocked {
            let block = gpu_block(&q, &k, block);
            return blocked_attention_backward::<Self>(q, k, v, masked, out, stats, grad, block);
        }
        launched(Kernel::AttentionBackward);
        backward(q, k, v, masked, out, stats, grad)
    }
}

/// `(out [B, H, T, D], [m, l] [B, H, T, 2] f32)`.
fn forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    mask: CubeTensor,
) -> (CubeTensor, CubeTensor) {
    let (q, k, v, mask) = (untile(q), untile(k), untile(v), untile(mask));
    let [b, h, t, d] = q.shape().dims::<4>();
    let s = k.shape().dims::<4>()[2];
    let dtype = q.dtype;
    let out = empty_device_dtype(q.client.clone(), q.device.clone(), q.shape(), dtype);
    let stats = f32_tensor(&q, [b, h, t, 2]);
    if b * h * t * d == 0 {
        return (out, stats);
    }
    if s == 0 {
        // No key at all: nothing to attend to, as the reference's empty sum.
        let zeros = zeros_client(q.client.clone(), q.device.clone(), q.shape(), dtype);
        return (zeros, stats);
    }
    let mask = numeric_mask(mask);
    let tile = tile_for(&q, d);
    let unroll = unroll_for(&q, d);
    forward_kernel::launch(
        &q.client,
        grid(b * h * t.div_ceil(ROWS)),
        CubeDim::new_1d(ROWS as u32),
        q.clone().into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        mask.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        1.0 / (d as f32).sqrt(),
        d,
        tile,
        ROWS,
        unroll,
        [
            dtype_to_storage_type(dtype),
            dtype_to_storage_type(mask.dtype),
        ],
    );
    (out, stats)
}

/// `(dq, dk, dv)` for the output gradient `grad`, from the forward's `out` and `stats`.
#[allow(clippy::too_many_arguments)]
fn backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    mask: CubeTensor,
    out: CubeTensor,
    stats: CubeTensor,
    grad: CubeTensor,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let (q, k, v, mask) = (untile(q), untile(k), untile(v), untile(mask));
    let (out, stats, grad) = (untile(out), untile(stats), untile(grad));
    let [b, h, t, d] = q.shape().dims::<4>();
    let [_, hkv, s, _] = k.shape().dims::<4>();
    let dtype = q.dtype;
    let zeros = |like: &CubeTensor| {
        zeros_client(
            like.client.clone(),
            like.device.clone(),
            like.shape(),
            dtype,
        )
    };
    if b * h * t * d == 0 || s == 0 {
        return (zeros(&q), zeros(&k), zeros(&v));
    }
    let mask = numeric_mask(mask);
    let tile = tile_for(&q, d);
    let unroll = unroll_for(&q, d);
    let scale = 1.0 / (d as f32).sqrt();
    let dtypes = [
        dtype_to_storage_type(dtype),
        dtype_to_storage_type(mask.dtype),
    ];
    let dq = empty_device_dtype(q.client.clone(), q.device.clone(), q.shape(), dtype);
    let delta = empty_device_dtype(
        q.client.clone(),
        q.device.clone(),
        [b, h, t].into(),
        DType::F32,
    );
    dq_kernel::launch(
        &q.client,
        grid(b * h * t.div_ceil(ROWS)),
        CubeDim::new_1d(ROWS as u32),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        mask.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        scale,
        d,
        tile,
        ROWS,
        unroll,
        dtypes,
    );
    let dk = empty_device_dtype(k.client.clone(), k.device.clone(), k.shape(), dtype);
    let dv = empty_device_dtype(v.client.clone(), v.device.clone(), v.shape(), dtype);
    let client = q.client.clone();
    dkdv_kernel::launch(
        &client,
        grid(b * hkv * s.div_ceil(ROWS)),
        CubeDim::new_1d(ROWS as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        mask.into_tensor_arg(),
        grad.into_tensor_arg(),
        stats.into_tensor_arg(),
        delta.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        scale,
        d,
        tile,
        ROWS,
        unroll,
        dtypes,
    );
    (dq, dk, dv)
}
