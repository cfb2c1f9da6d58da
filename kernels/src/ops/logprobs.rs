//! The head's per-token log-probabilities (linear + cross-entropy), chunked so no more
//! than `[chunk, V]` logits exist at once, and the head's entropy (a metric, reference
//! only). The kernels are `cube/logits.rs`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{
    AutodiffBackend, Backend, Dispatch, Flex, Slice, TensorMetadata, backend_extension,
    get_or_init_device_settings,
};
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Tensor};

use super::node::{Backprop, all_kept, on_inner, record};
use super::projection::Products;
use super::quant_matmul::QuantMatrix;
use super::{cast_to, f32_of};
use crate::cpu;
use crate::launches::Op;
use crate::mode::takes_fused;
use burn::backend::flex::FlexTensor;

/// What the head's chunked pass reads of each row: `[N]` each.
pub struct TokenLogprobs {
    /// The target's log-probability (the only one with a gradient).
    pub logprobs: Tensor<1>,
    /// 1 where the target is the head's top token.
    pub hits: Tensor<1, Int>,
    /// The entropy `−Σ p log p` of the row's distribution (a metric: no gradient), from
    /// the same pass over the logits as the log-sum-exp, so it costs no second product.
    pub entropy: Tensor<1>,
}

impl TokenLogprobs {
    /// No rows: what a pass over zero hidden rows reads.
    fn empty(device: &burn::tensor::Device) -> Self {
        Self {
            logprobs: Tensor::zeros([0], device),
            hits: Tensor::zeros([0], device),
            entropy: Tensor::zeros([0], device),
        }
    }
}

/// Per-token log-probabilities of `targets` under `head`, `chunk` rows at a time, whether
/// each target is the head's top token, and each row's entropy. `hidden`: `[N, H]`;
/// `targets`: `[N]`.
pub fn token_logprobs(
    hidden: Tensor<2>,
    head: &Head,
    targets: Tensor<1, Int>,
    chunk: usize,
) -> TokenLogprobs {
    if takes_fused(Op::TokenLogprobs, &hidden.device()) {
        fused(hidden, head, targets, chunk)
    } else {
        reference(hidden, head, targets, chunk)
    }
}

/// The output head: `logits = hidden·Wᵀ + down·upᵀ`. The optional low-rank term is a
/// LoRA adapter on the head (`down = s·dropout(hidden)·Aᵀ` per row, `up = B`), applied
/// chunk by chunk without ever forming `W + s·B·A`.
pub struct Head {
    /// `[V, H]`.
    pub weight: HeadWeight,
    /// `([N, r], [V, r])`, rows matching the hidden rows.
    pub low_rank: Option<(Tensor<2>, Tensor<2>)>,
}

/// The head's `[V, H]` weight: dense, or frozen and blockwise quantized
/// (`model.quantize_embeddings`). One is built per forward, so its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum HeadWeight {
    Dense(Tensor<2>),
    Quantized(QuantMatrix),
}

impl Head {
    pub fn new(weight: Tensor<2>) -> Self {
        Self {
            weight: HeadWeight::Dense(weight),
            low_rank: None,
        }
    }

    pub fn quantized(weight: QuantMatrix) -> Self {
        Self {
            weight: HeadWeight::Quantized(weight),
            low_rank: None,
        }
    }

    /// f32 logits `[len, V]` of hidden rows `start..start + len`. A dense head's product
    /// runs in its dtype (the rows are cast to it, a chunk at a time), so a half-precision
    /// head is never widened whole; a quantized head's in f32. The logits leave in f32.
    pub fn logits(&self, hidden: &Tensor<2>, start: usize, len: usize) -> Tensor<2> {
        let rows = hidden.clone().narrow(0, start, len);
        let mut logits = match &self.weight {
            HeadWeight::Dense(w) => {
                crate::project(rows.cast(w.dtype()), w.clone()).cast(DType::F32)
            }
            HeadWeight::Quantized(w) => w.matmul(rows.cast(DType::F32)),
        };
        if let Some((down, up)) = &self.low_rank {
            let low = down
                .clone()
                .narrow(0, start, len)
                .matmul(up.clone().transpose());
            logits = logits + low.cast(DType::F32);
        }
        logits
    }
}

/// Per-token log-probabilities of `targets` under the head `hidden·headᵀ`, whether the
/// target is the head's top token, and the entropy, computed `chunk` rows at a time so the
/// forward never holds more than `[chunk, vocab]` logits.
///
/// `hidden`: `[N, H]`; `head`: `[V, H]`; `targets`: `[N]`. Returns `[N]` each.
pub fn reference(
    hidden: Tensor<2>,
    head: &Head,
    targets: Tensor<1, Int>,
    chunk: usize,
) -> TokenLogprobs {
    let [n, _] = hidden.dims();
    let chunk = chunk.max(1);
    let mut logprobs = Vec::new();
    let mut hits = Vec::new();
    let mut entropy = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = head.logits(&hidden, start, len);
        let target = targets.clone().narrow(0, start, len).reshape([len, 1]);
        let max = logits.clone().max_dim(1).detach();
        let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let picked = logits.clone().gather(1, target.clone());
        entropy.push(row_entropy(logits.clone().detach()).reshape([len]));
        logprobs.push((picked - lse).reshape([len]));
        hits.push(logits.argmax(1).equal(target).int().reshape([len]));
        start += len;
    }
    if logprobs.is_empty() {
        return TokenLogprobs::empty(&hidden.device());
    }
    TokenLogprobs {
        logprobs: Tensor::cat(logprobs, 0),
        hits: Tensor::cat(hits, 0),
        entropy: Tensor::cat(entropy, 0),
    }
}

/// `−Σ p log p` of each row of `logits` `[len, V]`, `[len, 1]`.
fn row_entropy(logits: Tensor<2>) -> Tensor<2> {
    let logp = burn::tensor::activation::log_softmax(logits, 1);
    (logp.clone().exp() * logp).sum_dim(1).neg()
}

/// Entropy `−Σ p log p` of the head's distribution at each row, `chunk` rows at a time so
/// no more than `[chunk, vocab]` logits are held. A metric (GRPO's `entropy`): no gradient.
///
/// `hidden`: `[N, H]`; `head`: `[V, H]`. Returns `[N]`.
pub fn token_entropy(hidden: Tensor<2>, head: &Head, chunk: usize) -> Tensor<1> {
    per_row_of_logits(&hidden, head, chunk, row_entropy)
}

/// `f` of the head's detached logits, `chunk` rows at a time, `f` reducing each
/// `[len, V]` chunk to `[len, 1]`: the shape of every per-row metric of the head.
fn per_row_of_logits(
    hidden: &Tensor<2>,
    head: &Head,
    chunk: usize,
    f: impl Fn(Tensor<2>) -> Tensor<2>,
) -> Tensor<1> {
    let [n, _] = hidden.dims();
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        out.push(f(head.logits(hidden, start, len).detach()).reshape([len]));
        start += len;
    }
    if out.is_empty() {
        return Tensor::zeros([0], &hidden.device());
    }
    Tensor::cat(out, 0)
}

/// The mean over the vocabulary of each row's logits (TRL's `logits/chosen` and
/// `logits/rejected` average them): a metric, no gradient. The head is linear, so the mean
/// of `h·w_v` over `v` is `h·w̄` with `w̄` the mean row, and a dense head needs no logits at
/// all; a quantized one is read `chunk` rows at a time.
///
/// `hidden`: `[N, H]`; `head`: `[V, H]`. Returns `[N]`.
pub fn mean_logits(hidden: Tensor<2>, head: &Head, chunk: usize) -> Tensor<1> {
    let [n, _] = hidden.dims();
    let hidden = hidden.detach().cast(DType::F32);
    let mut means = match &head.weight {
        HeadWeight::Dense(w) => {
            let mean_row = w.clone().detach().cast(DType::F32).mean_dim(0);
            hidden.clone().matmul(mean_row.transpose()).reshape([n])
        }
        HeadWeight::Quantized(q) => {
            // The low-rank term is added below, for dense and quantized heads alike.
            let plain = Head::quantized(q.clone());
            per_row_of_logits(&hidden, &plain, chunk, |logits| logits.mean_dim(1))
        }
    };
    if let Some((down, up)) = &head.low_rank {
        let mean_up = up.clone().detach().cast(DType::F32).mean_dim(0);
        means = means
            + down
                .clone()
                .detach()
                .cast(DType::F32)
                .matmul(mean_up.transpose())
                .reshape([n]);
    }
    means
}

/// Fused [`reference`]: the log-prob of each row's target and whether it is the head's
/// top token, with a backward that rebuilds each chunk's logits instead of keeping them,
/// so training holds `[chunk, V]` logits at most, never `[N, V]`. Under a frozen head the
/// forward computes the hidden rows' slopes from its own logits instead, and the backward
/// rebuilds nothing ([`LogprobOps::linear_logprob_slopes`]). A low-rank term on the
/// head joins the product as extra columns: `h·Wᵀ + down·upᵀ = [h, down]·[W, up]ᵀ`.
///
/// `hidden`: `[N, H]`; `targets`: `[N]`. Returns `([N], [N] 0/1)`.
pub fn fused(
    hidden: Tensor<2>,
    head: &Head,
    targets: Tensor<1, Int>,
    chunk: usize,
) -> TokenLogprobs {
    let weight = match &head.weight {
        HeadWeight::Dense(w) => w,
        HeadWeight::Quantized(w) => {
            return match head.low_rank {
                None => quantized_logprobs(hidden, w, targets, chunk),
                // A low-rank term's own gradient needs the output gradient; the plain
                // path carries it.
                Some(_) => reference(hidden, head, targets, chunk),
            };
        }
    };
    let (x, w) = match &head.low_rank {
        None => (hidden, weight.clone()),
        Some((down, up)) => (
            Tensor::cat(vec![hidden, down.clone()], 1),
            Tensor::cat(vec![weight.clone(), up.clone().cast(weight.dtype())], 1),
        ),
    };
    let (lp, _lse, hit, entropy) = Dispatch::linear_logprob(
        x.into_dispatch(),
        w.into_dispatch(),
        targets.into_dispatch(),
        chunk,
    );
    TokenLogprobs {
        logprobs: Tensor::<1>::from_dispatch(lp),
        hits: Tensor::<1>::from_dispatch(hit).int(),
        entropy: Tensor::<1>::from_dispatch(entropy).detach(),
    }
}

/// [`fused`] for a quantized head. `∂ log p(t)/∂ h = (onehot(t) − p)·W` for a row whatever
/// the loss later does with its log-prob, so each chunk's is computed in the forward, from
/// the logits it already has (as Liger does), and joined to the log-probs by a term whose
/// value is exactly zero and whose gradient is it: `lp + (s − stop(s))`, `s = Σ h·stop(u)`.
/// Only `[chunk, V]` logits are alive at a time, and `u` is `[N, H]`, as `hidden`.
fn quantized_logprobs(
    hidden: Tensor<2>,
    weight: &QuantMatrix,
    targets: Tensor<1, Int>,
    chunk: usize,
) -> TokenLogprobs {
    let [n, _] = hidden.dims();
    let chunk = chunk.max(1);
    let tracked = hidden.is_tracked();
    // The rows' results rejoin the graph the hidden rows came from.
    let graph = |t: Tensor<1>| {
        if hidden.is_autodiff() {
            t.autodiff()
        } else {
            t
        }
    };
    let rows = hidden.clone().detach();
    let (mut lps, mut hits, mut entropies, mut grads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        // Constants to the graph: the backend's row kernels (one pass on the CPU, one
        // launch on a GPU) run on them directly, and the gradient joins below.
        let logits = weight
            .matmul(rows.clone().narrow(0, start, len).cast(DType::F32))
            .without_autodiff()
            .into_dispatch();
        let target = targets
            .clone()
            .narrow(0, start, len)
            .without_autodiff()
            .into_dispatch();
        let (lp, hit, entropy) = if tracked {
            let (lp, _lse, hit, entropy, slope) = Dispatch::logit_rows_slopes(logits, target);
            grads.push(weight.input_grad(Tensor::<2>::from_dispatch(slope)));
            (lp, hit, entropy)
        } else {
            let (lp, _lse, hit, entropy) = Dispatch::logit_rows(logits, target);
            (lp, hit, entropy)
        };
        lps.push(graph(Tensor::<1>::from_dispatch(lp)));
        hits.push(graph(Tensor::<1>::from_dispatch(hit)).int());
        entropies.push(graph(Tensor::<1>::from_dispatch(entropy)));
    }
    if lps.is_empty() {
        return TokenLogprobs::empty(&hidden.device());
    }
    let lp = Tensor::cat(lps, 0);
    let hits = Tensor::cat(hits, 0);
    let entropy = Tensor::cat(entropies, 0);
    if !tracked {
        return TokenLogprobs {
            logprobs: lp,
            hits,
            entropy,
        };
    }
    let u = Tensor::cat(grads, 0).cast(hidden.dtype());
    let s = (hidden * u).sum_dim(1).reshape([n]).cast(DType::F32);
    TokenLogprobs {
        logprobs: lp + (s.clone() - s.detach()),
        hits,
        entropy,
    }
}

/// The backend extension; the default bodies are the twin flex runs. On the Cube
/// backends the per-chunk halves (`logit_rows`, `logit_grads`) are kernels and the chunk
/// loops stay these bodies, around the backend's matmul.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait LogprobOps: Backend {
    /// The log-probability of each row's target under the head `hidden·weightᵀ`, computed
    /// `chunk` rows at a time so no more than `[chunk, V]` logits exist at once. Returns
    /// `(log p(target) [N], log-sum-exp [N], 1.0 where the target is the top token [N],
    /// entropy [N])`, all f32. `hidden`: `[N, H]`, `weight`: `[V, H]`, `targets`: `[N]`.
    #[fusion(default)]
    fn linear_logprob(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (rows, _) = linear_logprob_chunks::<Self>(
            hidden,
            weight,
            targets,
            chunk,
            false,
            &Products::plain(),
        );
        rows
    }

    /// [`LogprobOps::linear_logprob`], and each row's slope `∂ log p(t)/∂ hidden =
    /// (onehot(t) − p)·W`, `[N, H]` in the hidden rows' dtype, from the forward's own
    /// logits. Under a frozen head (LoRA's usual case) the hidden rows' gradient is then
    /// `g·slope`, a row scaling, so the backward rebuilds no logits (Liger's approach):
    /// one `[N, V, H]` product fewer per step.
    #[fusion(default)]
    #[allow(clippy::type_complexity)] // The extension macro reads tuples, not aliases.
    fn linear_logprob_slopes(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let ((lp, lse, hit, entropy), slope) =
            linear_logprob_chunks::<Self>(hidden, weight, targets, chunk, true, &Products::plain());
        (lp, lse, hit, entropy, slope.expect("asked for the slopes"))
    }

    /// [`LogprobOps::logit_rows`], and each row's `onehot(t) − exp(logits − lse)`, `[len,
    /// V]`: the log-prob's own gradient in the logits ([`LogprobOps::logit_grads`] at
    /// `g = 1`). Under Fusion a custom op of its own, so a backend's one-pass version (Cube
    /// overwrites the logits it is handed) is what runs.
    #[fusion(meta = |logits, _targets| {
        let row = burn::backend::fusion::custom::TensorSpec::new(
            [logits.shape[0]].into(),
            logits.dtype,
        );
        (row.clone(), row.clone(), row.clone(), row, logits.clone())
    })]
    #[allow(clippy::type_complexity)] // The extension macro reads tuples, not aliases.
    fn logit_rows_slopes(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        logit_rows_slopes_twin::<Self>(logits, targets)
    }

    /// Per row of f32 `logits` `[len, V]` with `targets` `[len]`: the target's log-prob,
    /// the log-sum-exp, 1.0 where the target is the top token (the first maximum, as
    /// `argmax`), and the entropy `−Σ p log p`, each `[len]` f32.
    #[fusion(meta = |logits, _targets| {
        let row = burn::backend::fusion::custom::TensorSpec::new(
            [logits.shape[0]].into(),
            logits.dtype,
        );
        (row.clone(), row.clone(), row.clone(), row)
    })]
    fn logit_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        logit_rows_twin::<Self>(logits, targets)
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
        logit_grads_twin::<Self>(logits, targets, lse, grad)
    }

    /// `d hidden` of [`LogprobOps::linear_logprob`]'s log-probs for their gradient `grad`
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
        logprob_grads::<Self>(
            hidden,
            weight,
            targets,
            lse,
            grad,
            chunk,
            false,
            &Products::plain(),
        )
        .0
    }

    /// As [`LogprobOps::linear_logprob_backward`], with the head's gradient too:
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
        let (dh, dw) = logprob_grads::<Self>(
            hidden,
            weight,
            targets,
            lse,
            grad,
            chunk,
            true,
            &Products::plain(),
        );
        (dh, dw.expect("asked for the weight gradient"))
    }
}

impl LogprobOps for Flex {
    fn linear_logprob(
        hidden: FlexTensor,
        weight: FlexTensor,
        targets: FlexTensor,
        chunk: usize,
    ) -> LogprobRows<Self> {
        linear_logprob_chunks::<Self>(hidden, weight, targets, chunk, false, &Products::flex()).0
    }

    fn linear_logprob_slopes(
        hidden: FlexTensor,
        weight: FlexTensor,
        targets: FlexTensor,
        chunk: usize,
    ) -> LogprobSlopes<Self> {
        let ((lp, lse, hit, entropy), slope) =
            linear_logprob_chunks::<Self>(hidden, weight, targets, chunk, true, &Products::flex());
        (lp, lse, hit, entropy, slope.expect("asked for the slopes"))
    }

    fn logit_rows_slopes(logits: FlexTensor, targets: FlexTensor) -> LogprobSlopes<Self> {
        match cpu::logits::rows_and_slopes(logits, &targets) {
            Ok(done) => done,
            Err(logits) => logit_rows_slopes_twin::<Self>(logits, targets),
        }
    }

    fn linear_logprob_backward(
        hidden: FlexTensor,
        weight: FlexTensor,
        targets: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        chunk: usize,
    ) -> FlexTensor {
        let products = Products::flex();
        logprob_grads::<Self>(hidden, weight, targets, lse, grad, chunk, false, &products).0
    }

    fn linear_logprob_backward_weight(
        hidden: FlexTensor,
        weight: FlexTensor,
        targets: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        chunk: usize,
    ) -> (FlexTensor, FlexTensor) {
        let products = Products::flex();
        let (dh, dw) =
            logprob_grads::<Self>(hidden, weight, targets, lse, grad, chunk, true, &products);
        (dh, dw.expect("asked for the weight gradient"))
    }

    fn logit_rows(logits: FlexTensor, targets: FlexTensor) -> LogprobRows<Self> {
        match cpu::logits::rows(&logits, &targets) {
            Some(done) => done,
            None => logit_rows_twin::<Self>(logits, targets),
        }
    }

    fn logit_grads(
        logits: FlexTensor,
        targets: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        match cpu::logits::grads(&logits, &targets, &lse, &grad) {
            Some(done) => done,
            None => logit_grads_twin::<Self>(logits, targets, lse, grad),
        }
    }
}

impl<B: LogprobOps, C: CheckpointStrategy> LogprobOps for Autodiff<B, C> {
    fn linear_logprob(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> LogprobRows<Self> {
        if hidden.is_tracked() && !weight.is_tracked() {
            return frozen_head::<B, C>(hidden, weight, targets, chunk);
        }
        let (lp, (lse, hit, entropy)) = record::<B, C, _, _, _, _>(
            Node,
            [hidden, weight],
            targets,
            |[hidden, weight], targets| {
                let (lp, lse, hit, entropy) = B::linear_logprob(hidden, weight, targets, chunk);
                (lp, (lse, hit, entropy))
            },
            |targets, _, (lse, _, _)| (targets, lse.clone(), chunk),
        );
        (
            lp,
            Self::from_inner(lse),
            Self::from_inner(hit),
            Self::from_inner(entropy),
        )
    }

    on_inner! {
        fn linear_logprob_backward(
            hidden: Float,
            weight: Float,
            targets: Int,
            lse: Float,
            grad: Float,
            chunk: usize,
        ) -> Float;
        fn linear_logprob_backward_weight(
            hidden: Float,
            weight: Float,
            targets: Int,
            lse: Float,
            grad: Float,
            chunk: usize,
        ) -> (Float, Float);
    }
}

/// Keeps the inputs, the targets, the forward's log-sum-exp and the chunk size: the logits
/// are rebuilt chunk by chunk, never kept. The head's gradient is computed only when the
/// head is tracked.
#[derive(Debug)]
struct Node;

impl<B: LogprobOps> Backprop<B, 2> for Node {
    const KEEPS: [bool; 2] = [true, true];
    type Saved = (IntTensor<B>, FloatTensor<B>, usize);

    fn backward(
        inputs: [Option<FloatTensor<B>>; 2],
        (targets, lse, chunk): Self::Saved,
        grad: FloatTensor<B>,
        [want_hidden, want_weight]: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let [hidden, weight] = all_kept(inputs);
        if want_weight {
            let (dh, dw) =
                B::linear_logprob_backward_weight(hidden, weight, targets, lse, grad, chunk);
            [want_hidden.then_some(dh), Some(dw)]
        } else if want_hidden {
            let dh = B::linear_logprob_backward(hidden, weight, targets, lse, grad, chunk);
            [Some(dh), None]
        } else {
            [None, None]
        }
    }
}

/// [`LogprobOps::linear_logprob`]'s and [`LogprobOps::logit_rows`]' outputs: log-probs,
/// log-sum-exps, hits and entropies.
pub type LogprobRows<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

/// [`LogprobRows`] and the slopes of [`LogprobOps::linear_logprob_slopes`] and
/// [`LogprobOps::logit_rows_slopes`].
pub type LogprobSlopes<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

/// [`LogprobOps::linear_logprob`] under a frozen head: one node on the hidden rows alone,
/// which keeps each row's slope from the forward instead of the rows and the head.
fn frozen_head<B: LogprobOps, C: CheckpointStrategy>(
    hidden: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    targets: IntTensor<B>,
    chunk: usize,
) -> LogprobRows<Autodiff<B, C>> {
    let weight = weight.into_primitive();
    let (lp, (lse, hit, entropy, _slope)) = record::<B, C, _, _, _, _>(
        FrozenHead,
        [hidden],
        targets,
        |[hidden], targets| {
            let (lp, lse, hit, entropy, slope) =
                B::linear_logprob_slopes(hidden, weight, targets, chunk);
            (lp, (lse, hit, entropy, slope))
        },
        |_, _, (_, _, _, slope)| slope.clone(),
    );
    (
        lp,
        Autodiff::<B, C>::from_inner(lse),
        Autodiff::<B, C>::from_inner(hit),
        Autodiff::<B, C>::from_inner(entropy),
    )
}

/// The frozen head's node: `∂ Σ g·log p(t) / ∂ h = g·(onehot(t) − p)·W`, linear in each
/// row's `g`, so the backward scales the slopes the forward kept.
#[derive(Debug)]
struct FrozenHead;

impl<B: LogprobOps> Backprop<B, 1> for FrozenHead {
    const KEEPS: [bool; 1] = [false];
    type Saved = FloatTensor<B>;

    fn backward(
        _inputs: [Option<FloatTensor<B>>; 1],
        slope: Self::Saved,
        grad: FloatTensor<B>,
        [want_hidden]: [bool; 1],
    ) -> [Option<FloatTensor<B>>; 1] {
        if !want_hidden {
            return [None];
        }
        let n = slope.shape().dims::<2>()[0];
        let dtype: FloatDType = slope.dtype().into();
        let g = B::float_reshape(f32_of::<B>(grad), [n, 1].into());
        let dh = B::float_mul(f32_of::<B>(slope), g);
        [Some(cast_to::<B>(dh, dtype))]
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
#[allow(clippy::too_many_arguments)]
fn logprob_grads<B: LogprobOps>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    chunk: usize,
    weight_grad: bool,
    products: &Products<B>,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let [n, h] = hidden.shape().dims::<2>();
    let chunk = chunk.max(1);
    let h_dtype: FloatDType = hidden.dtype().into();
    let w_dtype: FloatDType = weight.dtype().into();
    let device = hidden.device();
    let mut dh = Vec::new();
    let mut dw: Option<FloatTensor<B>> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let range = || [Slice::from(start..start + len)];
        let rows = B::float_slice(hidden.clone(), &range());
        let t = B::int_slice(targets.clone(), &range());
        let logits = f32_of::<B>((products.xwt)(
            cast_to::<B>(rows.clone(), w_dtype),
            weight.clone(),
        ));
        let lse_c = B::float_slice(lse.clone(), &range());
        let g = f32_of::<B>(B::float_slice(grad.clone(), &range()));
        let d_logits = B::logit_grads(logits, t, lse_c, g);
        // In the head's dtype, as the forward (autocast's rule for a half-precision head).
        let d_rows = (products.gw)(cast_to::<B>(d_logits.clone(), w_dtype), weight.clone());
        dh.push(cast_to::<B>(d_rows, h_dtype));
        if weight_grad {
            let part = (products.gtx)(d_logits, f32_of::<B>(rows));
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
        cast_to::<B>(dw, w_dtype)
    });
    (dh, dw)
}

/// The portable [`LogprobOps::logit_rows`], on the backend's ops.
fn logit_rows_twin<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> LogprobRows<B> {
    let len = logits.shape().dims::<2>()[0];
    let device = logits.device();
    let bool_dtype = get_or_init_device_settings::<B>(&device).bool_dtype;
    let t = B::int_reshape(targets, [len, 1].into());
    let lse = log_sum_exp::<B>(logits.clone());
    let picked = B::float_gather(1, logits.clone(), t.clone());
    let lp = B::float_reshape(B::float_sub(picked, lse.clone()), [len].into());
    // −Σ p·(logits − lse), p = exp(logits − lse).
    let logp = B::float_sub(logits.clone(), lse.clone());
    let plogp = B::float_mul(B::float_exp(logp.clone()), logp);
    let entropy = B::float_neg(B::float_sum_dim(plogp, 1));
    let top = B::float_argmax(logits, 1, t.dtype().into());
    let hit = B::bool_into_float(B::int_equal(top, t, bool_dtype), FloatDType::F32);
    (
        lp,
        B::float_reshape(lse, [len].into()),
        B::float_reshape(hit, [len].into()),
        B::float_reshape(entropy, [len].into()),
    )
}

/// The portable [`LogprobOps::logit_rows_slopes`]: the rows, then their gradient at
/// `g = 1`.
pub(crate) fn logit_rows_slopes_twin<B: LogprobOps>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> LogprobSlopes<B> {
    let (lp, lse, hit, entropy) = B::logit_rows(logits.clone(), targets.clone());
    let ones = B::float_ones(lse.shape(), &lse.device(), FloatDType::F32);
    let slope = B::logit_grads(logits, targets, lse.clone(), ones);
    (lp, lse, hit, entropy, slope)
}

/// The portable [`LogprobOps::logit_grads`], on the backend's ops.
fn logit_grads_twin<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let len = logits.shape().dims::<2>()[0];
    let column = |x: FloatTensor<B>| B::float_reshape(x, [len, 1].into());
    let g = column(grad);
    let p = B::float_exp(B::float_sub(logits, column(lse)));
    B::float_scatter(
        1,
        B::float_neg(B::float_mul(p, g.clone())),
        B::int_reshape(targets, [len, 1].into()),
        g,
        IndexingUpdateOp::Add,
    )
}

/// The head's chunked log-probs of [`LogprobOps::linear_logprob`], each chunk's logits
/// through `products.xwt`; with `slopes`, also [`LogprobOps::linear_logprob_slopes`]'
/// `(onehot − p)·W` per row, through `products.gw`.
fn linear_logprob_chunks<B: LogprobOps>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    chunk: usize,
    slopes: bool,
    products: &Products<B>,
) -> (LogprobRows<B>, Option<FloatTensor<B>>) {
    let [n, h] = hidden.shape().dims::<2>();
    let chunk = chunk.max(1);
    let device = hidden.device();
    let h_dtype: FloatDType = hidden.dtype().into();
    let w_dtype: FloatDType = weight.dtype().into();
    let (mut lps, mut lses, mut hits, mut entropies, mut slope) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let rows = B::float_slice(hidden.clone(), &[Slice::from(start..start + len)]);
        // In the head's dtype, a chunk of rows cast at a time: a half-precision head is
        // never widened whole.
        let rows = cast_to::<B>(rows, w_dtype);
        let t = B::int_slice(targets.clone(), &[Slice::from(start..start + len)]);
        let logits = f32_of::<B>((products.xwt)(rows, weight.clone()));
        let (lp, lse, hit, entropy) = if slopes {
            let (lp, lse, hit, entropy, d) = B::logit_rows_slopes(logits, t);
            // In the head's dtype, as the backward's `dh` (autocast's rule).
            let s = (products.gw)(cast_to::<B>(d, w_dtype), weight.clone());
            slope.push(cast_to::<B>(s, h_dtype));
            (lp, lse, hit, entropy)
        } else {
            B::logit_rows(logits, t)
        };
        lps.push(lp);
        lses.push(lse);
        hits.push(hit);
        entropies.push(entropy);
    }
    let join = |parts: Vec<FloatTensor<B>>| {
        if parts.is_empty() {
            B::float_zeros([0].into(), &device, FloatDType::F32)
        } else {
            B::float_cat(parts, 0)
        }
    };
    let slope = slopes.then(|| {
        if slope.is_empty() {
            B::float_zeros([0, h].into(), &device, h_dtype)
        } else {
            B::float_cat(slope, 0)
        }
    });
    ((join(lps), join(lses), join(hits), join(entropies)), slope)
}
