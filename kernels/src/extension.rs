//! The backend extension: one trait whose methods are the fused ops' forward and backward
//! halves on backend primitives.
//!
//! The default bodies are the portable twin, written with the backend's own primitive ops:
//! they are what flex (and any backend without kernels) runs. The Cube backends override
//! them with CubeCL kernels (`cube`), Fusion defers those kernels lazily, and the
//! `Autodiff` implementation (`autodiff`) records one graph node per op whose backward
//! calls the `*_backward` methods, so gradients never go through the forward's
//! intermediate tensors.
//!
//! Shapes: every op works on rows, `[N, C]`; the tensor-level wrappers in `fused` flatten
//! leading dimensions first.

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{
    Backend, Flex, Slice, TensorMetadata, backend_extension, get_or_init_device_settings,
};
use burn::tensor::{FloatDType, IndexingUpdateOp};

#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait FusedOps: Backend {
    /// RMSNorm of each row, as transformers computes it: `cast(x·r)·w` with
    /// `r = 1/√(mean(x²) + eps)` taken in f32. `x`: `[N, C]`, `weight`: `[C]`.
    #[fusion(dtype = x, shape = x)]
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let (inv, dtype) = inv_rms::<Self>(x.clone(), eps);
        let normed = Self::float_cast(Self::float_mul(f32_of::<Self>(x), inv), dtype);
        Self::float_mul(normed, row_vector::<Self>(weight))
    }

    /// The gradients of [`FusedOps::rms_norm`] for the output gradient `grad`: `dx`
    /// `[N, C]`, and each row's share of `dw` (`[N, C]`, summed over rows by the caller):
    /// `dx = r·w·g − (r³/C)·x·Σ(g·w·x)`, `dw_row = g·x·r`.
    #[fusion(meta = |x, _w, _g, _eps| (x.clone(), x.clone()))]
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let cols = x.shape().dims::<2>()[1];
        let (inv, dtype) = inv_rms::<Self>(x.clone(), eps);
        let x32 = f32_of::<Self>(x);
        let g32 = f32_of::<Self>(grad);
        let w32 = row_vector::<Self>(f32_of::<Self>(weight));
        let gw = Self::float_mul(g32.clone(), w32);
        let dot = Self::float_sum_dim(Self::float_mul(gw.clone(), x32.clone()), 1);
        let inv3 = Self::float_mul(Self::float_mul(inv.clone(), inv.clone()), inv.clone());
        let coef = Self::float_mul_scalar(Self::float_mul(inv3, dot), (1.0 / cols as f64).into());
        let dx = Self::float_sub(
            Self::float_mul(gw, inv.clone()),
            Self::float_mul(x32.clone(), coef),
        );
        let dw_rows = Self::float_mul(Self::float_mul(g32, x32), inv);
        (
            Self::float_cast(dx, dtype),
            Self::float_cast(dw_rows, dtype),
        )
    }

    /// The gated activation `silu(gate)·up`, elementwise. `gate`, `up`: `[N, C]`.
    #[fusion(dtype = gate, shape = gate)]
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let s = Self::sigmoid(gate.clone());
        Self::float_mul(Self::float_mul(gate, s), up)
    }

    /// The gradients of [`FusedOps::swiglu`]: with `s = σ(gate)`,
    /// `d_gate = g·up·s·(1 + gate·(1 − s))` and `d_up = g·gate·s`.
    #[fusion(meta = |gate, _up, _g| (gate.clone(), gate.clone()))]
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let s = Self::sigmoid(gate.clone());
        let silu = Self::float_mul(gate.clone(), s.clone());
        // 1 + gate·(1 − s) = 1 + gate − gate·s
        let slope = Self::float_add_scalar(Self::float_sub(gate, silu.clone()), 1.0.into());
        let d_gate = Self::float_mul(Self::float_mul(grad.clone(), up), Self::float_mul(s, slope));
        let d_up = Self::float_mul(grad, silu);
        (d_gate, d_up)
    }

    /// A LoRA adapter's up-projection folded into its base projection's output:
    /// `base + cast(s·down·Bᵀ)`, with `down = dropout(x)·Aᵀ` (`[N, r]`) and `B` (`[O, r]`)
    /// in the adapters' dtype (f32) and `base` (`[N, O]`, `x·Wᵀ`) in the compute dtype.
    /// The `[N, O]` low-rank product is never stored: unfused it is written, read back
    /// and added, twice the output's traffic again.
    #[fusion(dtype = base, shape = base)]
    fn lora_up(
        base: FloatTensor<Self>,
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let dtype: FloatDType = base.dtype().into();
        let delta = Self::float_matmul(down, Self::float_transpose(b));
        let delta = Self::float_mul_scalar(delta, scale.into());
        Self::float_add(base, Self::float_cast(delta, dtype))
    }

    /// The gradients of [`FusedOps::lora_up`] other than `base`'s (which is `grad`
    /// itself): `d down = s·g·B` and `dB = s·gᵀ·down`, in the adapters' dtype. Two skinny
    /// matmuls (inner or outer size `r`), which the backend's matmul does well.
    #[fusion(meta = |down, b, _grad, _scale| (down.clone(), b.clone()))]
    fn lora_up_backward(
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let dtype: FloatDType = down.dtype().into();
        let g = Self::float_mul_scalar(Self::float_cast(grad, dtype), scale.into());
        let d_down = Self::float_matmul(g.clone(), b);
        let d_b = Self::float_matmul(Self::float_transpose(g), down);
        (d_down, d_b)
    }

    /// Rotary position embedding in the "rotate half" layout of Hugging Face checkpoints:
    /// `x·cos + rotate_half(x)·sin`, with `rotate_half([x₁, x₂]) = [−x₂, x₁]`. Any RoPE
    /// scaling (linear, llama3) is already in the tables. `x`: `[B, H, T, D]`; `cos`, `sin`:
    /// `[B, T, D]`.
    #[fusion(dtype = x, shape = x)]
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [b, _, t, d] = x.shape().dims::<4>();
        let table = |c: FloatTensor<Self>| Self::float_reshape(c, [b, 1, t, d].into());
        let rotated = rotate_half::<Self>(x.clone(), false);
        Self::float_add(
            Self::float_mul(x, table(cos)),
            Self::float_mul(rotated, table(sin)),
        )
    }

    /// The gradient of [`FusedOps::rotary`] for `x` (the tables are constants): the
    /// rotation's transpose, `g·cos + rotate_halfᵀ(g·sin)` with
    /// `rotate_halfᵀ([y₁, y₂]) = [y₂, −y₁]`.
    #[fusion(dtype = grad, shape = grad)]
    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [b, _, t, d] = grad.shape().dims::<4>();
        let table = |c: FloatTensor<Self>| Self::float_reshape(c, [b, 1, t, d].into());
        let gs = Self::float_mul(grad.clone(), table(sin));
        Self::float_add(
            Self::float_mul(grad, table(cos)),
            rotate_half::<Self>(gs, true),
        )
    }

    /// The log-probability of each row's target under the head `hidden·weightᵀ`, computed
    /// `chunk` rows at a time so no more than `[chunk, V]` logits exist at once. Returns
    /// `(log p(target) [N], log-sum-exp [N], 1.0 where the target is the top token [N])`,
    /// all f32. `hidden`: `[N, H]`, `weight`: `[V, H]`, `targets`: `[N]`.
    #[fusion(default)]
    fn linear_logprob(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let n = hidden.shape().dims::<2>()[0];
        let chunk = chunk.max(1);
        let device = hidden.device();
        let w_dtype: FloatDType = weight.dtype().into();
        let wt = Self::float_transpose(weight);
        let (mut lps, mut lses, mut hits) = (Vec::new(), Vec::new(), Vec::new());
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let rows = Self::float_slice(hidden.clone(), &[Slice::from(start..start + len)]);
            // In the head's dtype, a chunk of rows cast at a time: a half-precision head is
            // never widened whole.
            let rows = Self::float_cast(rows, w_dtype);
            let t = Self::int_slice(targets.clone(), &[Slice::from(start..start + len)]);
            let logits = f32_of::<Self>(Self::float_matmul(rows, wt.clone()));
            let (lp, lse, hit) = Self::logit_rows(logits, t);
            lps.push(lp);
            lses.push(lse);
            hits.push(hit);
        }
        let join = |parts: Vec<FloatTensor<Self>>| {
            if parts.is_empty() {
                Self::float_zeros([0].into(), &device, FloatDType::F32)
            } else {
                Self::float_cat(parts, 0)
            }
        };
        (join(lps), join(lses), join(hits))
    }

    /// Per row of f32 `logits` `[len, V]` with `targets` `[len]`: the target's log-prob,
    /// the log-sum-exp, and 1.0 where the target is the top token (the first maximum, as
    /// `argmax`), each `[len]` f32.
    #[fusion(meta = |logits, _targets| {
        let row = burn::backend::fusion::custom::TensorSpec::new(
            [logits.shape[0]].into(),
            logits.dtype,
        );
        (row.clone(), row.clone(), row)
    })]
    fn logit_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let len = logits.shape().dims::<2>()[0];
        let device = logits.device();
        let bool_dtype = get_or_init_device_settings::<Self>(&device).bool_dtype;
        let t = Self::int_reshape(targets, [len, 1].into());
        let lse = log_sum_exp::<Self>(logits.clone());
        let picked = Self::float_gather(1, logits.clone(), t.clone());
        let lp = Self::float_reshape(Self::float_sub(picked, lse.clone()), [len].into());
        let top = Self::float_argmax(logits, 1, t.dtype().into());
        let hit = Self::bool_into_float(Self::int_equal(top, t, bool_dtype), FloatDType::F32);
        (
            lp,
            Self::float_reshape(lse, [len].into()),
            Self::float_reshape(hit, [len].into()),
        )
    }

    /// `∂ Σ g·log p(t) / ∂ logits = g·(onehot(t) − exp(logits − lse))` for f32 `logits`
    /// `[len, V]`, with `targets`, `lse` and `grad` `[len]`.
    #[fusion(dtype = logits, shape = logits)]
    fn logit_grads(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let len = logits.shape().dims::<2>()[0];
        let column = |x: FloatTensor<Self>| Self::float_reshape(x, [len, 1].into());
        let g = column(grad);
        let p = Self::float_exp(Self::float_sub(logits, column(lse)));
        Self::float_scatter(
            1,
            Self::float_neg(Self::float_mul(p, g.clone())),
            Self::int_reshape(targets, [len, 1].into()),
            g,
            IndexingUpdateOp::Add,
        )
    }

    /// `d hidden` of [`FusedOps::linear_logprob`]'s log-probs for their gradient `grad`
    /// `[N]`, recomputing each chunk's logits from `lse`: `dh = (g·(onehot − p))·W`.
    #[fusion(default)]
    fn linear_logprob_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        logprob_grads::<Self>(hidden, weight, targets, lse, grad, chunk, false).0
    }

    /// As [`FusedOps::linear_logprob_backward`], with the head's gradient too:
    /// `dW = Σ_chunks (g·(onehot − p))ᵀ·h`. Returns `(dh, dW)`.
    #[fusion(default)]
    fn linear_logprob_backward_weight(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dh, dw) = logprob_grads::<Self>(hidden, weight, targets, lse, grad, chunk, true);
        (dh, dw.expect("asked for the weight gradient"))
    }

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

    /// The gradients of [`FusedOps::grouped_attention`] for the output gradient `grad`, block by
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
        let g = Grouped::<Self>::new(&q, &k, block);
        let dtype: FloatDType = q.dtype().into();
        let scale = 1.0 / (g.d as f64).sqrt();
        let stats = Self::float_reshape(stats, [g.b, g.hkv, g.g, g.t, 2].into());
        // Once, not per block: each block slices its rows from these views.
        let grad = Self::float_reshape(grad, [g.b, g.hkv, g.g, g.t, g.d].into());
        let out = Self::float_reshape(out, [g.b, g.hkv, g.g, g.t, g.d].into());
        let k32 = f32_of::<Self>(k.clone());
        let v32 = f32_of::<Self>(v.clone());
        let mut dqs = Vec::new();
        let (mut dk, mut dv): (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) = (None, None);
        let add = |acc: Option<FloatTensor<Self>>, x: FloatTensor<Self>| match acc {
            Some(a) => Self::float_add(a, x),
            None => x,
        };
        for (t0, len) in g.blocks() {
            let qb = g.queries(&q, t0, len);
            let scores = g.scores(qb.clone(), &k, &masked, t0, len);
            let st = g.rows_of(&stats, t0, len);
            let last = |i: usize| {
                let [b, hkv, gg, l, _] = st.shape().dims::<5>();
                Self::float_slice(
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
            let p = Self::float_div(Self::float_exp(Self::float_sub(scores, last(0))), last(1));
            let p = Self::float_reshape(p, g.stacked(len, g.s));
            let d_out = f32_of::<Self>(g.rows_of(&grad, t0, len));
            let o = f32_of::<Self>(g.rows_of(&out, t0, len));
            let delta = Self::float_sum_dim(Self::float_mul(d_out.clone(), o), 4);
            let d_out = Self::float_reshape(d_out, g.stacked(len, g.d));
            let delta = Self::float_reshape(delta, g.stacked(len, 1));
            dv = Some(add(
                dv,
                Self::float_matmul(Self::float_swap_dims(p.clone(), 2, 3), d_out.clone()),
            ));
            let dp = Self::float_matmul(d_out, Self::float_swap_dims(v32.clone(), 2, 3));
            // Masked scores are constants: no gradient reaches them (nor q and k through
            // them), even in a row where every key is masked and P is uniform.
            let ds = Self::float_mul(p, Self::float_sub(dp, delta));
            let ds = Self::float_mask_fill(
                Self::float_reshape(ds, g.split(len, g.s)),
                g.mask(&masked, t0, len),
                0.0f32.into(),
            );
            let ds = Self::float_reshape(ds, g.stacked(len, g.s));
            let dq =
                Self::float_mul_scalar(Self::float_matmul(ds.clone(), k32.clone()), scale.into());
            dqs.push(Self::float_reshape(dq, g.split(len, g.d)));
            let q32 = f32_of::<Self>(Self::float_reshape(qb, g.stacked(len, g.d)));
            dk = Some(add(
                dk,
                Self::float_mul_scalar(
                    Self::float_matmul(Self::float_swap_dims(ds, 2, 3), q32),
                    scale.into(),
                ),
            ));
        }
        let dq = Self::float_reshape(Self::float_cat(dqs, 3), [g.b, g.h, g.t, g.d].into());
        let kv_shape = k.shape();
        let zeros = || Self::float_zeros(kv_shape.clone(), &k.device(), FloatDType::F32);
        (
            Self::float_cast(dq, dtype),
            Self::float_cast(dk.unwrap_or_else(zeros), dtype),
            Self::float_cast(dv.unwrap_or_else(zeros), dtype),
        )
    }
}

impl FusedOps for Flex {}

/// The portable attention forward of [`FusedOps::grouped_attention`]: `block` queries at
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
        let p = B::float_reshape(B::float_cast(p, dtype), g.stacked(len, g.s));
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

/// `[x₁, x₂] → [−x₂, x₁]` over the last axis, or its transpose `[x₂, −x₁]`.
fn rotate_half<B: Backend>(x: FloatTensor<B>, transpose: bool) -> FloatTensor<B> {
    let [b, h, t, d] = x.shape().dims::<4>();
    let half = |from: usize| {
        B::float_slice(
            x.clone(),
            &[
                Slice::from(0..b),
                Slice::from(0..h),
                Slice::from(0..t),
                Slice::from(from..from + d / 2),
            ],
        )
    };
    let (x1, x2) = (half(0), half(d / 2));
    if transpose {
        B::float_cat(vec![x2, B::float_neg(x1)], 3)
    } else {
        B::float_cat(vec![B::float_neg(x2), x1], 3)
    }
}

/// `log Σ exp(logits)` per row, `[len, 1]`, shifted by the row maximum for stability.
fn log_sum_exp<B: Backend>(logits: FloatTensor<B>) -> FloatTensor<B> {
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_exp(B::float_sub(logits, max.clone()));
    B::float_add(B::float_log(B::float_sum_dim(shifted, 1)), max)
}

/// The chunked backward of the head's log-probs. For each chunk the logits are rebuilt,
/// `p = exp(logits − lse)`, and `∂ log p(t)/∂ logits = onehot(t) − p`, scaled by the
/// output gradient; `dh` and (when asked) `dW` follow by two matmuls. Only one chunk's
/// `[len, V]` tensors are alive at a time.
fn logprob_grads<B: FusedOps>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    chunk: usize,
    weight_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let [n, h] = hidden.shape().dims::<2>();
    let chunk = chunk.max(1);
    let h_dtype: FloatDType = hidden.dtype().into();
    let w_dtype: FloatDType = weight.dtype().into();
    let device = hidden.device();
    let wt = B::float_transpose(weight.clone());
    let mut dh = Vec::new();
    let mut dw: Option<FloatTensor<B>> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let range = || [Slice::from(start..start + len)];
        let rows = B::float_slice(hidden.clone(), &range());
        let t = B::int_slice(targets.clone(), &range());
        let logits = f32_of::<B>(B::float_matmul(
            B::float_cast(rows.clone(), w_dtype),
            wt.clone(),
        ));
        let lse_c = B::float_slice(lse.clone(), &range());
        let g = f32_of::<B>(B::float_slice(grad.clone(), &range()));
        let d_logits = B::logit_grads(logits, t, lse_c, g);
        // In the head's dtype, as the forward (autocast's rule for a half-precision head).
        let d_rows = B::float_matmul(B::float_cast(d_logits.clone(), w_dtype), weight.clone());
        dh.push(B::float_cast(d_rows, h_dtype));
        if weight_grad {
            let part = B::float_matmul(B::float_transpose(d_logits), f32_of::<B>(rows));
            dw = Some(match dw {
                Some(acc) => B::float_add(acc, part),
                None => part,
            });
        }
    }
    let dh = if dh.is_empty() {
        B::float_zeros([0, h].into(), &device, h_dtype)
    } else {
        B::float_cat(dh, 0)
    };
    let dw = weight_grad.then(|| {
        let dw = dw.unwrap_or_else(|| {
            let [v, _] = weight.shape().dims::<2>();
            B::float_zeros([v, h].into(), &device, FloatDType::F32)
        });
        B::float_cast(dw, w_dtype)
    });
    (dh, dw)
}

/// `1/√(mean(x²) + eps)` per row, `[N, 1]` in f32, and `x`'s own float dtype.
fn inv_rms<B: Backend>(x: FloatTensor<B>, eps: f32) -> (FloatTensor<B>, FloatDType) {
    let dtype: FloatDType = x.dtype().into();
    let x32 = f32_of::<B>(x);
    let ms = B::float_mean_dim(B::float_mul(x32.clone(), x32), 1);
    let inv = B::float_recip(B::float_sqrt(B::float_add_scalar(ms, eps.into())));
    (inv, dtype)
}

fn f32_of<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_cast(x, FloatDType::F32)
}

/// `[C]` → `[1, C]`, to broadcast over rows.
fn row_vector<B: Backend>(w: FloatTensor<B>) -> FloatTensor<B> {
    let c = w.shape().dims::<1>()[0];
    B::float_reshape(w, [1, c].into())
}
