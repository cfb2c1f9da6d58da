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

use burn::backend::tensor::{FloatTensor, IntTensor};
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
        let wt = Self::float_transpose(weight);
        let bool_dtype = get_or_init_device_settings::<Self>(&device).bool_dtype;
        let (mut lps, mut lses, mut hits) = (Vec::new(), Vec::new(), Vec::new());
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let rows = Self::float_slice(hidden.clone(), &[Slice::from(start..start + len)]);
            let t = target_column::<Self>(&targets, start, len);
            let logits = f32_of::<Self>(Self::float_matmul(rows, wt.clone()));
            let lse = log_sum_exp::<Self>(logits.clone());
            let picked = Self::float_gather(1, logits.clone(), t.clone());
            lps.push(Self::float_reshape(
                Self::float_sub(picked, lse.clone()),
                [len].into(),
            ));
            lses.push(Self::float_reshape(lse, [len].into()));
            let top = Self::float_argmax(logits, 1, t.dtype().into());
            let hit = Self::bool_into_float(Self::int_equal(top, t, bool_dtype), FloatDType::F32);
            hits.push(Self::float_reshape(hit, [len].into()));
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
}

impl FusedOps for Flex {}

/// Rows `start..start + len` of `targets`, as a `[len, 1]` column for gathering.
fn target_column<B: Backend>(targets: &IntTensor<B>, start: usize, len: usize) -> IntTensor<B> {
    let t = B::int_slice(targets.clone(), &[Slice::from(start..start + len)]);
    B::int_reshape(t, [len, 1].into())
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
fn logprob_grads<B: Backend>(
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
    let w32 = f32_of::<B>(weight);
    let mut dh = Vec::new();
    let mut dw: Option<FloatTensor<B>> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let range = || [Slice::from(start..start + len)];
        let rows = B::float_slice(hidden.clone(), &range());
        let t = target_column::<B>(&targets, start, len);
        let logits = f32_of::<B>(B::float_matmul(rows.clone(), wt.clone()));
        let lse_c = B::float_reshape(B::float_slice(lse.clone(), &range()), [len, 1].into());
        let g = B::float_reshape(
            f32_of::<B>(B::float_slice(grad.clone(), &range())),
            [len, 1].into(),
        );
        let p = B::float_exp(B::float_sub(logits, lse_c));
        let d_logits = B::float_scatter(
            1,
            B::float_neg(B::float_mul(p, g.clone())),
            t,
            g,
            IndexingUpdateOp::Add,
        );
        dh.push(B::float_cast(
            B::float_matmul(d_logits.clone(), w32.clone()),
            h_dtype,
        ));
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
            let [v, _] = w32.shape().dims::<2>();
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
