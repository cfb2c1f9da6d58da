//! Scaled dot-product attention with grouped K/V heads and an arbitrary mask, holding no
//! `[T, S]` scores in either pass. The flash kernels are `cube/attention.rs`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{
    AutodiffBackend, Backend, Dispatch, Flex, Slice, TensorMetadata, backend_extension,
};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, FloatDType, Tensor};

use super::node::{Backprop, all_kept, on_inner, record};
use super::{cast_to, f32_of};
use crate::cpu;
use crate::launches::Op;
use crate::mode::takes_fused;
use burn::backend::flex::FlexTensor;

/// Scaled dot-product attention with grouped K/V heads. `q`: `[B, H, T, D]`; `k`, `v`:
/// `[B, Hkv, S, D]`; `masked`: `[B, 1, T, S]`, true where a query must not see a key.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masked: Tensor<4, Bool>) -> Tensor<4> {
    if takes_fused(Op::Attention, &q.device()) {
        fused(q, k, v, masked)
    } else {
        reference(q, k, v, masked)
    }
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
pub fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masked: Tensor<4, Bool>) -> Tensor<4> {
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

/// Queries per attention block: a block's `[G·block, S]` scores are the most attention
/// ever holds at once.
pub const ATTENTION_BLOCK: usize = 64;

/// Fused [`reference`]: the same grouped, masked attention without
/// `[T, S]` scores in either pass. On Cube backends it is the flash kernel
/// (`cube/attention.rs`); elsewhere a block of queries at a time, with a backward that
/// rebuilds each block's probabilities from the saved softmax statistics.
///
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, Hkv, S, D]`; `masked`: `[B, 1, T, S]`.
pub fn fused(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masked: Tensor<4, Bool>) -> Tensor<4> {
    attention_blocked(q, k, v, masked, ATTENTION_BLOCK)
}

/// [`fused`] with `block` queries per block (on flex; the flash kernel tiles itself).
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

/// The backend extension; the default bodies are the twin flex runs.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait AttentionOps: Backend {
    /// Scaled dot-product attention with grouped K/V heads, `block` queries at a time:
    /// each block's scores `[.., block, S]` exist only while it is computed, and each
    /// query's softmax statistics (row maximum `m` and normaliser `l = Σ exp(s − m)`) are
    /// kept for the backward, so memory is O(block·S), not O(T·S). They are kept apart, not
    /// as `m + log l`, because a row with every key masked has `m = −10³⁰`, where f32 cannot
    /// hold the sum. `q`: `[B, H, T, D]`; `k`, `v`: `[B, Hkv, S, D]`; `masked`:
    /// `[B, 1, T, S]`, true where a query must not see a key. Returns
    /// `(out [B, H, T, D], [m, l] [B, H, T, 2])`, the statistics in f32.
    #[fusion(meta = |q, _k, _v, _masked, _block| {
        let [b, h, t, _] = q.shape.dims::<4>();
        let stats = burn::backend::fusion::custom::TensorSpec::new(
            [b, h, t, 2].into(),
            burn::backend::DType::F32,
        );
        (q.clone(), stats)
    })]
    fn grouped_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        masked: BoolTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        blocked_attention::<Self>(q, k, v, masked, block)
    }

    /// The gradients of [`AttentionOps::grouped_attention`] for the output gradient `grad`, block by
    /// block as the forward: with `P = exp(S − m)/l` rebuilt from the saved statistics and
    /// `Δ = rowsum(dO ⊙ O)`: `dV = Σ Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − Δ)`, `dQ = c·dS·K`,
    /// `dK = c·Σ dSᵀ·Q`, with `c = 1/√D`. Returns `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |q, k, v, _masked, _out, _stats, _grad, _block| {
        (q.clone(), k.clone(), v.clone())
    })]
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
        blocked_attention_backward::<Self>(q, k, v, masked, out, stats, grad, block)
    }
}

/// The CPU kernels work in f32: half-precision inputs are widened on the way in and the
/// results rounded back, so a half run keeps the f32 kernels' speed and gets at least the
/// products' precision a GPU gives it.
impl AttentionOps for Flex {
    fn grouped_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        masked: FlexTensor,
        block: usize,
    ) -> (FlexTensor, FlexTensor) {
        let dtype: FloatDType = q.dtype().into();
        let [q, k, v] = [q, k, v].map(f32_of::<Self>);
        let (out, stats) = match cpu::attention::forward(&q, &k, &v, &masked, block) {
            Some(done) => done,
            None => blocked_attention::<Self>(q, k, v, masked, block),
        };
        (cast_to::<Self>(out, dtype), stats)
    }

    fn grouped_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        masked: FlexTensor,
        out: FlexTensor,
        stats: FlexTensor,
        grad: FlexTensor,
        block: usize,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let dtype: FloatDType = q.dtype().into();
        let [q, k, v, out, grad] = [q, k, v, out, grad].map(f32_of::<Self>);
        let (dq, dk, dv) =
            match cpu::attention::backward(&q, &k, &v, &masked, &out, &stats, &grad, block) {
                Some(done) => done,
                None => {
                    blocked_attention_backward::<Self>(q, k, v, masked, out, stats, grad, block)
                }
            };
        let [dq, dk, dv] = [dq, dk, dv].map(|x| cast_to::<Self>(x, dtype));
        (dq, dk, dv)
    }
}

impl<B: AttentionOps, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {
    fn grouped_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        masked: BoolTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, stats) = record::<B, C, _, _, _, _>(
            Node,
            [q, k, v],
            masked,
            |[q, k, v], masked| B::grouped_attention(q, k, v, masked, block),
            |masked, out, stats| (masked, out.clone(), stats.clone(), block),
        );
        (out, Self::from_inner(stats))
    }

    on_inner! {
        fn grouped_attention_backward(
            q: Float,
            k: Float,
            v: Float,
            masked: Bool,
            out: Float,
            stats: Float,
            grad: Float,
            block: usize,
        ) -> (Float, Float, Float);
    }
}

/// Keeps the inputs, the mask, the output and its softmax statistics: O(T) beyond the
/// inputs.
#[derive(Debug)]
struct Node;

impl<B: AttentionOps> Backprop<B, 3> for Node {
    const KEEPS: [bool; 3] = [true, true, true];
    type Saved = (BoolTensor<B>, FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(
        inputs: [Option<FloatTensor<B>>; 3],
        (masked, out, stats, block): Self::Saved,
        grad: FloatTensor<B>,
        _wanted: [bool; 3],
    ) -> [Option<FloatTensor<B>>; 3] {
        let [q, k, v] = all_kept(inputs);
        let (dq, dk, dv) = B::grouped_attention_backward(q, k, v, masked, out, stats, grad, block);
        [Some(dq), Some(dk), Some(dv)]
    }
}

/// The portable attention forward of [`AttentionOps::grouped_attention`]: `block` queries at
/// a time through the backend's matmul. The Cube backends use it too when there are too
/// few queries to fill the flash kernel's cubes (decoding one token at a time).
pub(crate) fn blocked_attention<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    masked: BoolTensor<B>,
    block: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let g = Grouped::<B>::new(&q, &k, block);
    let dtype: FloatDType = q.dtype().into();
    let (mut outs, mut stats) = (Vec::new(), Vec::new());
    for (t0, len) in g.blocks() {
        let qb = g.queries(&q, t0, len);
        let scores = g.scores(qb, &k, &masked, t0, len);
        let max = B::float_max_dim(scores.clone(), 4);
        let e = B::float_exp(B::float_sub(scores, max.clone()));
        let sum = B::float_sum_dim(e.clone(), 4);
        let p = B::float_div(e, sum.clone());
        let p = B::float_reshape(cast_to::<B>(p, dtype), g.stacked(len, g.s));
        let out = B::float_matmul(p, v.clone());
        outs.push(B::float_reshape(out, g.split(len, g.d)));
        stats.push(B::float_cat(vec![max, sum], 4));
    }
    let out = B::float_reshape(B::float_cat(outs, 3), [g.b, g.h, g.t, g.d].into());
    let stats = B::float_reshape(B::float_cat(stats, 3), [g.b, g.h, g.t, 2].into());
    (out, stats)
}

/// Shapes of grouped attention: query head `h` reads K/V head `h / g`, so the `g` query
/// heads of one group are stacked along the token axis and share one matmul with their
/// K/V head, which is never repeated.
struct Grouped<B: Backend> {
    b: usize,
    h: usize,
    hkv: usize,
    g: usize,
    t: usize,
    s: usize,
    d: usize,
    block: usize,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend> Grouped<B> {
    fn new(q: &FloatTensor<B>, k: &FloatTensor<B>, block: usize) -> Self {
        let [b, h, t, d] = q.shape().dims::<4>();
        let [_, hkv, s, _] = k.shape().dims::<4>();
        Self {
            b,
            h,
            hkv,
            g: h / hkv.max(1),
            t,
            s,
            d,
            block: block.max(1),
            _backend: core::marker::PhantomData,
        }
    }

    /// `(first query, block length)` over the tokens.
    fn blocks(&self) -> Vec<(usize, usize)> {
        (0..self.t)
            .step_by(self.block)
            .map(|t0| (t0, self.block.min(self.t - t0)))
            .collect()
    }

    /// `[B, Hkv, G·len, last]`: a block's rows stacked per K/V head.
    fn stacked(&self, len: usize, last: usize) -> burn::backend::Shape {
        [self.b, self.hkv, self.g * len, last].into()
    }

    /// `[B, Hkv, G, len, last]`: a block's rows per query head.
    fn split(&self, len: usize, last: usize) -> burn::backend::Shape {
        [self.b, self.hkv, self.g, len, last].into()
    }

    /// Rows `t0..t0 + len` of a `[B, Hkv, G, T, X]` tensor.
    fn rows_of(&self, x: &FloatTensor<B>, t0: usize, len: usize) -> FloatTensor<B> {
        let x_last = x.shape().dims::<5>()[4];
        B::float_slice(
            x.clone(),
            &[
                Slice::from(0..self.b),
                Slice::from(0..self.hkv),
                Slice::from(0..self.g),
                Slice::from(t0..t0 + len),
                Slice::from(0..x_last),
            ],
        )
    }

    /// The block's queries, `[B, Hkv, G, len, D]`.
    fn queries(&self, q: &FloatTensor<B>, t0: usize, len: usize) -> FloatTensor<B> {
        let q = B::float_reshape(q.clone(), [self.b, self.hkv, self.g, self.t, self.d].into());
        self.rows_of(&q, t0, len)
    }

    /// Masked f32 scores of a block, `[B, Hkv, G, len, S]`. A finite fill keeps rows with
    /// no visible key (all padding) free of NaN, as the reference does.
    fn scores(
        &self,
        qb: FloatTensor<B>,
        k: &FloatTensor<B>,
        masked: &BoolTensor<B>,
        t0: usize,
        len: usize,
    ) -> FloatTensor<B> {
        let qb = B::float_mul_scalar(
            B::float_reshape(qb, self.stacked(len, self.d)),
            (1.0 / (self.d as f64).sqrt()).into(),
        );
        let scores = B::float_matmul(qb, B::float_swap_dims(k.clone(), 2, 3));
        let scores = f32_of::<B>(B::float_reshape(scores, self.split(len, self.s)));
        B::float_mask_fill(scores, self.mask(masked, t0, len), (-1.0e30f32).into())
    }

    /// The block's mask, `[B, Hkv, G, len, S]`.
    fn mask(&self, masked: &BoolTensor<B>, t0: usize, len: usize) -> BoolTensor<B> {
        let mask = B::bool_slice(
            masked.clone(),
            &[
                Slice::from(0..self.b),
                Slice::from(0..1),
                Slice::from(t0..t0 + len),
                Slice::from(0..self.s),
            ],
        );
        let mask = B::bool_reshape(mask, [self.b, 1, 1, len, self.s].into());
        B::bool_expand(mask, self.split(len, self.s))
    }
}

/// The portable backward of [`AttentionOps::grouped_attention_backward`], block by block
/// through the backend's ops.
#[allow(clippy::too_many_arguments)]
pub(crate) fn blocked_attention_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    masked: BoolTensor<B>,
    out: FloatTensor<B>,
    stats: FloatTensor<B>,
    grad: FloatTensor<B>,
    block: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let g = Grouped::<B>::new(&q, &k, block);
    let dtype: FloatDType = q.dtype().into();
    let scale = 1.0 / (g.d as f64).sqrt();
    let stats = B::float_reshape(stats, [g.b, g.hkv, g.g, g.t, 2].into());
    // Once, not per block: each block slices its rows from these views.
    let grad = B::float_reshape(grad, [g.b, g.hkv, g.g, g.t, g.d].into());
    let out = B::float_reshape(out, [g.b, g.hkv, g.g, g.t, g.d].into());
    // The four products take the inputs' dtype (tensor cores under bf16, as in the
    // forward); what they make, and every sum across blocks, is f32.
    let product = |a: FloatTensor<B>, b: FloatTensor<B>| {
        f32_of::<B>(B::float_matmul(
            cast_to::<B>(a, dtype),
            cast_to::<B>(b, dtype),
        ))
    };
    let mut dqs = Vec::new();
    let (mut dk, mut dv): (Option<FloatTensor<B>>, Option<FloatTensor<B>>) = (None, None);
    let add = |acc: Option<FloatTensor<B>>, x: FloatTensor<B>| match acc {
        Some(a) => B::float_add(a, x),
        None => x,
    };
    for (t0, len) in g.blocks() {
        let qb = g.queries(&q, t0, len);
        let scores = g.scores(qb.clone(), &k, &masked, t0, len);
        let st = g.rows_of(&stats, t0, len);
        let last = |i: usize| {
            let [b, hkv, gg, l, _] = st.shape().dims::<5>();
            B::float_slice(
                st.clone(),
                &[
                    Slice::from(0..b),
                    Slice::from(0..hkv),
                    Slice::from(0..gg),
                    Slice::from(0..l),
                    Slice::from(i..i + 1),
                ],
            )
        };
        let p = B::float_div(B::float_exp(B::float_sub(scores, last(0))), last(1));
        let p = B::float_reshape(p, g.stacked(len, g.s));
        let d_out = g.rows_of(&grad, t0, len);
        let o = f32_of::<B>(g.rows_of(&out, t0, len));
        let delta = B::float_sum_dim(B::float_mul(f32_of::<B>(d_out.clone()), o), 4);
        let d_out = B::float_reshape(d_out, g.stacked(len, g.d));
        let delta = B::float_reshape(delta, g.stacked(len, 1));
        dv = Some(add(
            dv,
            product(B::float_swap_dims(p.clone(), 2, 3), d_out.clone()),
        ));
        let dp = product(d_out, B::float_swap_dims(v.clone(), 2, 3));
        // Masked scores are constants: no gradient reaches them (nor q and k through
        // them), even in a row where every key is masked and P is uniform.
        let ds = B::float_mul(p, B::float_sub(dp, delta));
        let ds = B::float_mask_fill(
            B::float_reshape(ds, g.split(len, g.s)),
            g.mask(&masked, t0, len),
            0.0f32.into(),
        );
        let ds = B::float_reshape(ds, g.stacked(len, g.s));
        let dq = B::float_mul_scalar(product(ds.clone(), k.clone()), scale.into());
        dqs.push(B::float_reshape(dq, g.split(len, g.d)));
        let qb = B::float_reshape(qb, g.stacked(len, g.d));
        dk = Some(add(
            dk,
            B::float_mul_scalar(product(B::float_swap_dims(ds, 2, 3), qb), scale.into()),
        ));
    }
    let dq = B::float_reshape(B::float_cat(dqs, 3), [g.b, g.h, g.t, g.d].into());
    let kv_shape = k.shape();
    let zeros = || B::float_zeros(kv_shape.clone(), &k.device(), FloatDType::F32);
    (
        cast_to::<B>(dq, dtype),
        cast_to::<B>(dk.unwrap_or_else(zeros), dtype),
        cast_to::<B>(dv.unwrap_or_else(zeros), dtype),
    )
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Bool, DType, Device, Tensor, TensorData};

    use super::{blocked_attention, blocked_attention_backward};
    use crate::selftest::{compare, host, tensor, values};
    use burn::backend::Dispatch;

    /// The blocked twin (a GPU's `train.attention = "blocked"` route) in `dtype`, over
    /// three blocks with GQA and a causal, padded mask: `[out, dq, dk, dv]` and their
    /// dtypes.
    fn twin(dtype: DType) -> (Vec<Vec<f32>>, Vec<DType>) {
        let (b, h, hkv, t, d, block) = (2, 4, 2, 40, 16, 16);
        let device = Device::flex();
        let q = tensor(&values(b * h * t * d, 1), [b, h, t, d], &device, dtype);
        let k = tensor(&values(b * hkv * t * d, 2), [b, hkv, t, d], &device, dtype);
        let v = tensor(&values(b * hkv * t * d, 3), [b, hkv, t, d], &device, dtype);
        let grad = tensor(&values(b * h * t * d, 4), [b, h, t, d], &device, dtype);
        let masked: Vec<bool> = (0..b * t * t)
            .map(|n| {
                let (bi, i, j) = (n / (t * t), (n / t) % t, n % t);
                j > i || (bi == 1 && j < 5)
            })
            .collect();
        let mask = Tensor::<4, Bool>::from_data(TensorData::new(masked, [b, 1, t, t]), &device);
        let (out, stats) = blocked_attention::<Dispatch>(
            q.clone().into_dispatch(),
            k.clone().into_dispatch(),
            v.clone().into_dispatch(),
            mask.clone().into_dispatch(),
            block,
        );
        let (dq, dk, dv) = blocked_attention_backward::<Dispatch>(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            mask.into_dispatch(),
            out.clone(),
            stats,
            grad.into_dispatch(),
            block,
        );
        [out, dq, dk, dv]
            .map(Tensor::<4>::from_dispatch)
            .into_iter()
            .map(|t| (host(t.clone()), t.dtype()))
            .unzip()
    }

    /// In bf16 the twin's products take bf16 (tensor cores on a GPU) while its softmax and
    /// cross-block sums stay f32: output and gradients come back bf16, within bf16's
    /// tolerance of the f32 twin.
    #[test]
    fn the_blocked_twin_in_bf16_follows_the_f32_twin() {
        let (want, dtypes) = twin(DType::F32);
        assert_eq!(dtypes, vec![DType::F32; 4]);
        let (got, dtypes) = twin(DType::BF16);
        assert_eq!(dtypes, vec![DType::BF16; 4]);
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            let c = compare(name, &got[i], &want[i], DType::BF16);
            assert!(c.pass(), "{c}");
            assert!(c.max_abs > 0.0, "{name}: bf16 changed nothing");
        }
    }
}
