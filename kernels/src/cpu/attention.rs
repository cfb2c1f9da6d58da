//! Grouped attention on flex in f32, forward and backward, a block of queries at a time:
//! the contract of [`AttentionOps::grouped_attention`](crate::AttentionOps) and its
//! backward, with the scores, probabilities and their gradients of one block living in a
//! thread's scratch rows only.
//!
//! The forward spreads `(batch, query head)` pairs over the threads, the backward
//! `(batch, K/V head)` pairs, since `dK` and `dV` sum over a group's query heads. Each
//! block only computes the key columns some row of it can see: with a causal or packed
//! mask the others are masked for every row of the block, and their probability is
//! exactly zero (a row with no visible key at all keeps every column, as the reference's
//! uniform row).

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::{Mat, bool_contiguous, f32_contiguous, gemm_into, tensor};

/// The masked scores' fill, as the reference's.
const MASKED: f32 = -1.0e30;

/// Below this an f32 `exp` is exactly +0: e^z is under half the smallest subnormal, 2^−150,
/// so it rounds to zero in any correctly rounded `exp` (glibc's underflow bound).
const EXP_ZERO_BELOW: f32 = -103.972_08;

/// `exp(z)` of a score shifted by its row maximum, with every bit of `exp`'s answer. A
/// masked score lies far below [`EXP_ZERO_BELOW`], where libm takes its underflow path
/// (setting errno: about 2 % of a packed training step in perf, `__math_uflowf`). The
/// compiler calls `exp` whether or not a branch is taken (it knows `exp` has no side
/// effects), so a masked score's argument is replaced by 0 (any value far from the
/// underflow path serves; its answer is discarded) behind `black_box`, which the compiler
/// cannot see through. NaN stays NaN.
#[inline]
fn exp_shifted(z: f32) -> f32 {
    let below = z < EXP_ZERO_BELOW;
    let e = std::hint::black_box(if below { 0.0 } else { z }).exp();
    if below { 0.0 } else { e }
}

/// Shapes: `q` `[B, H, T, D]`, `k`/`v` `[B, Hkv, S, D]`, the mask `[B, 1, T, S]`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    block: usize,
}

impl Dims {
    fn new(q: &FlexTensor, k: &FlexTensor, block: usize) -> Self {
        let [b, h, t, d] = q.shape().dims::<4>();
        let [_, hkv, s, _] = k.shape().dims::<4>();
        Self {
            b,
            h,
            hkv,
            t,
            s,
            d,
            block: block.max(1),
        }
    }

    fn group(&self) -> usize {
        self.h / self.hkv.max(1)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// The key columns `lo..hi` a block of query rows can see: the union of its rows' visible
/// keys, or every key when one of its rows sees none.
fn visible_columns(mask: &[u8], rows: std::ops::Range<usize>, s: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (s, 0);
    for r in rows {
        let row = &mask[r * s..(r + 1) * s];
        match (
            row.iter().position(|&m| m == 0),
            row.iter().rposition(|&m| m == 0),
        ) {
            (Some(first), Some(last)) => {
                lo = lo.min(first);
                hi = hi.max(last + 1);
            }
            _ => return (0, s),
        }
    }
    if lo >= hi { (0, s) } else { (lo, hi) }
}

/// What a block of one query head needs for its scores: the queries, keys and mask, read
/// the same way by the forward and the backward.
struct Scores<'a> {
    q: &'a [f32],
    k: &'a [f32],
    mask: &'a [u8],
    /// 1 when the batch shares one mask row set (`[1, 1, T, S]`).
    mask_batch: usize,
    dims: Dims,
}

/// A block of `len` queries and the key columns `lo..hi` it computes.
struct Block {
    len: usize,
    mask_start: usize,
    lo: usize,
    hi: usize,
}

impl Block {
    fn width(&self) -> usize {
        self.hi - self.lo
    }
}

impl Scores<'_> {
    /// The block of queries `t0..` of query row `bh` (batch `bi`), reading K/V head rows
    /// from `kv`: picks its visible columns and writes its masked, scaled scores
    /// `q·kᵀ/√D` into `dst` (`len` rows of `hi − lo`).
    fn block(&self, dst: &mut [f32], bi: usize, bh: usize, kv: usize, t0: usize) -> Block {
        let Dims { t, s, d, .. } = self.dims;
        let len = self.dims.block.min(t - t0);
        let mb = if self.mask_batch == 1 { 0 } else { bi };
        let (lo, hi) = visible_columns(self.mask, mb * t + t0..mb * t + t0 + len, s);
        let block = Block {
            len,
            mask_start: (mb * t + t0) * s,
            lo,
            hi,
        };
        let w = block.width();
        let dst = &mut dst[..len * w];
        let qb = Mat::rows(self.q, (bh * t + t0) * d, len, d, d);
        let kb = Mat::rows(self.k, kv + lo * d, w, d, d).t();
        gemm_into(dst, w, false, qb, kb, self.dims.scale());
        for (i, row) in dst.chunks_mut(w.max(1)).enumerate() {
            let m = &self.mask[block.mask_start + i * s + lo..block.mask_start + i * s + hi];
            for (x, &masked) in row.iter_mut().zip(m) {
                if masked != 0 {
                    *x = MASKED;
                }
            }
        }
        block
    }
}

/// The forward: `(out [B, H, T, D], stats [B, H, T, 2])`, or `None` when an input is not
/// f32 or the mask not a byte per value (the caller then runs the twin).
pub(crate) fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    masked: &FlexTensor,
    block: usize,
) -> Option<(FlexTensor, FlexTensor)> {
    let (q, k, v) = (f32_contiguous(q)?, f32_contiguous(k)?, f32_contiguous(v)?);
    let masked = bool_contiguous(masked)?;
    let dims = Dims::new(&q, &k, block);
    let Dims { b, h, t, s, d, .. } = dims;
    let v: &[f32] = v.storage();
    let scores = Scores {
        q: q.storage(),
        k: k.storage(),
        mask: masked.storage(),
        mask_batch: masked.shape().dims::<4>()[0],
        dims,
    };
    let mut out = vec![0f32; b * h * t * d];
    let mut stats = vec![0f32; b * h * t * 2];
    let g = dims.group();
    out.par_chunks_mut((t * d).max(1))
        .zip(stats.par_chunks_mut((t * 2).max(1)))
        .enumerate()
        .for_each(|(bh, (out, stats))| {
            let (bi, hi_) = (bh / h, bh % h);
            let kv = (bi * dims.hkv + hi_ / g) * s * d;
            let mut buf = vec![0f32; dims.block.min(t) * s];
            for t0 in (0..t).step_by(dims.block) {
                let blk = scores.block(&mut buf, bi, bh, kv, t0);
                let (len, lo, w) = (blk.len, blk.lo, blk.width());
                let sc = &mut buf[..len * w];
                for i in 0..len {
                    let row = &mut sc[i * w..(i + 1) * w];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    // The normaliser sums in f64 (see `rows::inv_rms`).
                    let mut sum = 0f64;
                    for x in row.iter_mut() {
                        *x = exp_shifted(*x - max);
                        sum += f64::from(*x);
                    }
                    let sum = sum as f32;
                    for x in row.iter_mut() {
                        *x /= sum;
                    }
                    stats[(t0 + i) * 2] = max;
                    stats[(t0 + i) * 2 + 1] = sum;
                }
                let p = Mat::rows(sc, 0, len, w, w);
                let vb = Mat::rows(v, kv + lo * d, w, d, d);
                gemm_into(&mut out[t0 * d..(t0 + len) * d], d, false, p, vb, 1.0);
            }
        });
    Some((tensor(out, [b, h, t, d]), tensor(stats, [b, h, t, 2])))
}

/// The backward for the output gradient `grad`: `(dq, dk, dv)`, or `None` as
/// [`forward`]. With `P` rebuilt from the saved statistics and `Δ = rowsum(dO ⊙ O)`:
/// `dV = Σ Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − Δ)` (zero where masked), `dQ = c·dS·K`,
/// `dK = c·Σ dSᵀ·Q`, `c = 1/√D`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    masked: &FlexTensor,
    out: &FlexTensor,
    stats: &FlexTensor,
    grad: &FlexTensor,
    block: usize,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let (q, k, v) = (f32_contiguous(q)?, f32_contiguous(k)?, f32_contiguous(v)?);
    let (out, stats, grad) = (
        f32_contiguous(out)?,
        f32_contiguous(stats)?,
        f32_contiguous(grad)?,
    );
    let masked = bool_contiguous(masked)?;
    let dims = Dims::new(&q, &k, block);
    let Dims {
        b, h, hkv, t, s, d, ..
    } = dims;
    let g = dims.group();
    let scale = dims.scale();
    let (q, k, v, mask): (&[f32], &[f32], &[f32], &[u8]) =
        (q.storage(), k.storage(), v.storage(), masked.storage());
    let scores = Scores {
        q,
        k,
        mask,
        mask_batch: masked.shape().dims::<4>()[0],
        dims,
    };
    let (o, st, dout): (&[f32], &[f32], &[f32]) = (out.storage(), stats.storage(), grad.storage());
    let mut dq = vec![0f32; b * h * t * d];
    let mut dk = vec![0f32; b * hkv * s * d];
    let mut dv = vec![0f32; b * hkv * s * d];
    dq.par_chunks_mut((g * t * d).max(1))
        .zip(dk.par_chunks_mut((s * d).max(1)))
        .zip(dv.par_chunks_mut((s * d).max(1)))
        .enumerate()
        .for_each(|(bk, ((dq, dk), dv))| {
            let bi = bk / hkv;
            let kv = bk * s * d;
            let rows = dims.block.min(t);
            let mut p = vec![0f32; rows * s];
            let mut dp = vec![0f32; rows * s];
            for gi in 0..g {
                let bh = bk * g + gi;
                for t0 in (0..t).step_by(dims.block) {
                    let blk = scores.block(&mut p, bi, bh, kv, t0);
                    let (len, lo, hi, w, mask_start) =
                        (blk.len, blk.lo, blk.hi, blk.width(), blk.mask_start);
                    let row0 = bh * t + t0;
                    let pb = &mut p[..len * w];
                    for i in 0..len {
                        let (max, sum) = (st[(row0 + i) * 2], st[(row0 + i) * 2 + 1]);
                        for x in pb[i * w..(i + 1) * w].iter_mut() {
                            *x = exp_shifted(*x - max) / sum;
                        }
                    }
                    let d_out = Mat::rows(dout, row0 * d, len, d, d);
                    let pm = Mat::rows(pb, 0, len, w, w);
                    // dV[lo..hi] += Pᵀ·dO
                    gemm_into(&mut dv[lo * d..hi * d], d, true, pm.t(), d_out, 1.0);
                    // dP = dO·Vᵀ
                    let dpb = &mut dp[..len * w];
                    let vb = Mat::rows(v, kv + lo * d, w, d, d).t();
                    gemm_into(dpb, w, false, d_out, vb, 1.0);
                    for i in 0..len {
                        let r = (row0 + i) * d;
                        let delta = dout[r..r + d]
                            .iter()
                            .zip(&o[r..r + d])
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>() as f32;
                        let m = &mask[mask_start + i * s + lo..mask_start + i * s + hi];
                        let prow = &pb[i * w..(i + 1) * w];
                        for ((x, &pv), &masked) in
                            dpb[i * w..(i + 1) * w].iter_mut().zip(prow).zip(m)
                        {
                            *x = if masked != 0 { 0.0 } else { pv * (*x - delta) };
                        }
                    }
                    let ds = Mat::rows(dpb, 0, len, w, w);
                    // dQ = c·dS·K
                    let kb = Mat::rows(k, kv + lo * d, w, d, d);
                    let dq_rows = &mut dq[(gi * t + t0) * d..(gi * t + t0 + len) * d];
                    gemm_into(dq_rows, d, false, ds, kb, scale);
                    // dK[lo..hi] += c·dSᵀ·Q
                    let qb = Mat::rows(q, row0 * d, len, d, d);
                    gemm_into(&mut dk[lo * d..hi * d], d, true, ds.t(), qb, scale);
                }
            }
        });
    Some((
        tensor(dq, [b, h, t, d]),
        tensor(dk, [b, hkv, s, d]),
        tensor(dv, [b, hkv, s, d]),
    ))
}

#[cfg(test)]
mod tests {
    /// The shortcut gives `exp`'s own bits everywhere: across the underflow edge, at the
    /// masked fill, at −∞ and for NaN.
    #[test]
    fn shifted_exp_keeps_exps_bits() {
        let mut zs = vec![
            super::MASKED,
            super::MASKED - 3.0,
            f32::NEG_INFINITY,
            f32::MIN,
            -104.0,
            super::EXP_ZERO_BELOW,
            f32::from_bits(super::EXP_ZERO_BELOW.to_bits() + 1),
            f32::from_bits(super::EXP_ZERO_BELOW.to_bits() - 1),
            -103.9,
            -87.3,
            0.0,
            -0.0,
            f32::NAN,
        ];
        zs.extend((0..4000).map(|i| -110.0 + i as f32 * 0.0027));
        for z in zs {
            let (got, want) = (super::exp_shifted(z), z.exp());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "exp({z}): {got:e} against {want:e}"
            );
        }
    }

    use burn::tensor::{Bool, Device, Tensor, TensorData};

    use crate::{fused, reference};

    /// Deterministic values in [-1, 1), shared with the selftest.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        crate::selftest::values(n, seed as u64)
    }

    fn tensor4(shape: [usize; 4], seed: usize, device: &Device) -> Tensor<4> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(values(n, seed), shape), device)
    }

    /// A packed row's mask: causal within each of its documents (`lengths` tokens each),
    /// blind across them, as packing builds it. `[1, 1, T, T]`.
    fn packed_mask(lengths: &[usize], device: &Device) -> Tensor<4, Bool> {
        let t: usize = lengths.iter().sum();
        let mut doc = Vec::new();
        for (i, &len) in lengths.iter().enumerate() {
            doc.extend(std::iter::repeat_n(i, len));
        }
        let masked: Vec<bool> = (0..t * t)
            .map(|x| {
                let (q, k) = (x / t, x % t);
                k > q || doc[k] != doc[q]
            })
            .collect();
        Tensor::from_data(TensorData::new(masked, [1, 1, t, t]), device)
    }

    /// Packed documents (whose blocks skip the key columns no row of them sees), a mask
    /// shared by the batch (`[1, 1, T, S]`), and blocks that cut documents: output and the
    /// three gradients equal the reference's.
    #[test]
    fn packed_masks_match_the_reference() {
        let device = Device::flex().autodiff();
        let (b, h, hkv, t, d) = (2, 4, 2, 37, 16);
        for block in [4, 16, 64] {
            let mask = packed_mask(&[9, 1, 20, 7], &device);
            let q = tensor4([b, h, t, d], 1, &device).require_grad();
            let k = tensor4([b, hkv, t, d], 2, &device).require_grad();
            let v = tensor4([b, hkv, t, d], 3, &device).require_grad();
            let weights = tensor4([b, h, t, d], 4, &device);
            let run = |fused_path: bool| {
                // One mask for the whole batch, `[1, 1, T, T]`, every other block; expanded
                // to `[B, 1, T, T]` for the rest.
                let mask = if block == 16 {
                    mask.clone()
                } else {
                    mask.clone().expand([b, 1, t, t])
                };
                let out = if fused_path {
                    fused::attention_blocked(q.clone(), k.clone(), v.clone(), mask, block)
                } else {
                    reference::attention(q.clone(), k.clone(), v.clone(), mask)
                };
                let grads = (out.clone() * weights.clone()).sum().backward();
                let grad = |x: &Tensor<4>| x.grad(&grads).unwrap().into_data();
                (out.into_data(), grad(&q), grad(&k), grad(&v))
            };
            let (got, want) = (run(true), run(false));
            let tol = burn::tensor::Tolerance::absolute(2e-5);
            got.0.assert_approx_eq::<f32>(&want.0, tol);
            got.1.assert_approx_eq::<f32>(&want.1, tol);
            got.2.assert_approx_eq::<f32>(&want.2, tol);
            got.3.assert_approx_eq::<f32>(&want.3, tol);
        }
    }
}
