//! Plain-tensor reference implementations. Shapes: `B` batch, `T` tokens, `H` query heads,
//! `Hkv` key/value heads, `D` head dim.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, DType, Tensor};

/// RMSNorm as transformers computes it: normalise in f32, cast back, then scale.
///
/// `x`: `[..., N]`, `weight`: `[N]`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let inv_rms = (x32.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
    (x32 * inv_rms).cast(dtype) * weight.unsqueeze()
}

/// Rotary position embedding in the "rotate half" layout of Hugging Face checkpoints.
///
/// `x`: `[B, H, T, D]`; `cos`, `sin`: `[B, T, D]`, already laid out as `cat(freqs, freqs)`.
pub fn rotary(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    let [_, _, _, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.unsqueeze_dim(1) + rotated * sin.unsqueeze_dim(1)
}

/// Scaled dot-product attention with grouped key/value heads.
///
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, Hkv, S, D]` with `H` a multiple of `Hkv`;
/// `masked`: `[B, 1, T, S]`, true where a query must not see a key.
/// Returns `[B, H, T, D]`.
///
/// Query head `h` reads key/value head `h / (H / Hkv)`, as transformers' `repeat_kv` does.
/// The queries of one group are stacked along the token axis instead of repeating K and V,
/// so no copy of K or V is ever made.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masked: Tensor<4, Bool>) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let [_, hkv, s, _] = k.dims();
    let g = h / hkv;
    let dtype = q.dtype();
    let q = q
        .mul_scalar(1.0 / (d as f64).sqrt())
        .reshape([b, hkv, g * t, d]);
    let scores = q.matmul(k.swap_dims(2, 3)).reshape([b, hkv, g, t, s]);
    let masked = masked.unsqueeze_dim::<5>(1).expand([b, hkv, g, t, s]);
    // A finite fill keeps rows with no visible key (all padding) free of NaN.
    let scores = scores.cast(DType::F32).mask_fill(masked, -1.0e30);
    let probs = softmax(scores, 4).cast(dtype).reshape([b, hkv, g * t, s]);
    probs.matmul(v).reshape([b, h, t, d])
}

/// The gated MLP activation: `silu(gate) · up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}
