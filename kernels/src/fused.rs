//! The fused ops at the tensor level: what the model calls when [`Kernels::Fused`] is in
//! force. Each flattens its input to rows, calls the backend extension through `Dispatch`
//! (a CubeCL kernel on Cube backends, the primitive-op twin elsewhere, a single autodiff
//! node with a hand-written backward under autodiff) and restores the shape.

use burn::backend::Dispatch;
use burn::tensor::{Bool, Int, Tensor};

use crate::extension::FusedOps;
use crate::reference::Head;

/// Fused [`crate::reference::rms_norm`]. `x`: `[..., N]`, `weight`: `[N]`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dims = x.dims();
    let rows: Tensor<2> = x.reshape([-1, dims[D - 1] as i32]);
    let out = Dispatch::rms_norm(rows.into_dispatch(), weight.into_dispatch(), eps as f32);
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// Fused [`crate::reference::swiglu`]: `silu(gate)·up`, elementwise.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    let dims = gate.dims();
    let cols = dims[D - 1] as i32;
    let gate: Tensor<2> = gate.reshape([-1, cols]);
    let up: Tensor<2> = up.reshape([-1, cols]);
    let out = Dispatch::swiglu(gate.into_dispatch(), up.into_dispatch());
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// Fused [`crate::reference::lora_up`]: `base + s·down·Bᵀ` in one pass over the output.
/// `base`: `[..., O]`; `down`: `[..., r]`; `b`: `[O, r]`.
pub fn lora_up<const D: usize>(
    base: Tensor<D>,
    down: Tensor<D>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    let dims = base.dims();
    let rank = down.dims()[D - 1] as i32;
    let base: Tensor<2> = base.reshape([-1, dims[D - 1] as i32]);
    let down: Tensor<2> = down.reshape([-1, rank]);
    let out = Dispatch::lora_up(
        base.into_dispatch(),
        down.into_dispatch(),
        b.into_dispatch(),
        scale as f32,
    );
    Tensor::<2>::from_dispatch(out).reshape(dims)
}

/// Fused [`crate::reference::token_logprobs`]: the log-prob of each row's target and
/// whether it is the head's top token, with a backward that rebuilds each chunk's logits
/// instead of keeping them, so training holds `[chunk, V]` logits at most, never
/// `[N, V]`. A low-rank term on the head joins the product as extra columns:
/// `h·Wᵀ + down·upᵀ = [h, down]·[W, up]ᵀ`.
///
/// `hidden`: `[N, H]`; `targets`: `[N]`. Returns `([N], [N] 0/1)`.
pub fn token_logprobs(
    hidden: Tensor<2>,
    head: &Head,
    targets: Tensor<1, Int>,
    chunk: usize,
) -> (Tensor<1>, Tensor<1, Int>) {
    let (x, w) = match &head.low_rank {
        None => (hidden, head.weight.clone()),
        Some((down, up)) => (
            Tensor::cat(vec![hidden, down.clone()], 1),
            Tensor::cat(
                vec![head.weight.clone(), up.clone().cast(head.weight.dtype())],
                1,
            ),
        ),
    };
    let (lp, _lse, hit) = Dispatch::linear_logprob(
        x.into_dispatch(),
        w.into_dispatch(),
        targets.into_dispatch(),
        chunk,
    );
    (
        Tensor::<1>::from_dispatch(lp),
        Tensor::<1>::from_dispatch(hit).int(),
    )
}

/// Queries per attention block: a block's `[G·block, S]` scores are the most attention
/// ever holds at once.
pub const ATTENTION_BLOCK: usize = 64;

/// Fused [`crate::reference::attention`]: the same grouped, masked attention without
/// `[T, S]` scores in either pass. On Cube backends it is the flash kernel
/// (`cube::attention`); elsewhere a block of queries at a time, with a backward that
/// rebuilds each block's probabilities from the saved softmax statistics.
///
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, Hkv, S, D]`; `masked`: `[B, 1, T, S]`.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masked: Tensor<4, Bool>) -> Tensor<4> {
    attention_blocked(q, k, v, masked, ATTENTION_BLOCK)
}

/// [`attention`] with `block` queries per block (on flex; the flash kernel tiles itself).
pub fn attention_blocked(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    masked: Tensor<4, Bool>,
    block: usize,
) -> Tensor<4> {
    let (out, _lse) = Dispatch::grouped_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        masked.into_dispatch(),
        block,
    );
    Tensor::<4>::from_dispatch(out)
}

/// Fused [`crate::reference::rotary`]. `x`: `[B, H, T, D]`; `cos`, `sin`: `[B, T, D]`.
pub fn rotary(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    let out = Dispatch::rotary(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch());
    Tensor::<4>::from_dispatch(out)
}
