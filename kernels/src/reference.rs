//! Plain-tensor reference implementations. Shapes: `B` batch, `T` tokens, `H` query heads,
//! `Hkv` key/value heads, `D` head dim.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, DType, Int, Tensor};

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

/// The output head: `logits = hidden·Wᵀ + down·upᵀ`. The optional low-rank term is a
/// LoRA adapter on the head (`down = s·dropout(hidden)·Aᵀ` per row, `up = B`), applied
/// chunk by chunk without ever forming `W + s·B·A`.
pub struct Head {
    /// `[V, H]`.
    pub weight: Tensor<2>,
    /// `([N, r], [V, r])`, rows matching the hidden rows.
    pub low_rank: Option<(Tensor<2>, Tensor<2>)>,
}

impl Head {
    pub fn new(weight: Tensor<2>) -> Self {
        Self {
            weight,
            low_rank: None,
        }
    }

    /// f32 logits `[len, V]` of hidden rows `start..start + len`. The product runs in the
    /// head weight's dtype (the rows are cast to it, a chunk at a time), so a half-precision
    /// head is never widened whole; the logits leave in f32.
    pub fn logits(&self, hidden: &Tensor<2>, start: usize, len: usize) -> Tensor<2> {
        let rows = hidden
            .clone()
            .narrow(0, start, len)
            .cast(self.weight.dtype());
        let mut logits = rows
            .matmul(self.weight.clone().transpose())
            .cast(DType::F32);
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

/// Per-token log-probabilities of `targets` under the head `hidden·headᵀ`, and whether the
/// target is the head's top token, computed `chunk` rows at a time so the forward never
/// holds more than `[chunk, vocab]` logits.
///
/// `hidden`: `[N, H]`; `head`: `[V, H]`; `targets`: `[N]`. Returns `([N], [N] 0/1)`.
pub fn token_logprobs(
    hidden: Tensor<2>,
    head: &Head,
    targets: Tensor<1, Int>,
    chunk: usize,
) -> (Tensor<1>, Tensor<1, Int>) {
    let [n, _] = hidden.dims();
    let chunk = chunk.max(1);
    let mut logprobs = Vec::new();
    let mut hits = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = head.logits(&hidden, start, len);
        let target = targets.clone().narrow(0, start, len).reshape([len, 1]);
        let max = logits.clone().max_dim(1).detach();
        let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let picked = logits.clone().gather(1, target.clone());
        logprobs.push((picked - lse).reshape([len]));
        hits.push(logits.argmax(1).equal(target).int().reshape([len]));
        start += len;
    }
    (Tensor::cat(logprobs, 0), Tensor::cat(hits, 0))
}

/// Entropy `−Σ p log p` of the head's distribution at each row, `chunk` rows at a time so
/// no more than `[chunk, vocab]` logits are held. A metric (GRPO's `entropy`): no gradient.
///
/// `hidden`: `[N, H]`; `head`: `[V, H]`. Returns `[N]`.
pub fn token_entropy(hidden: Tensor<2>, head: &Head, chunk: usize) -> Tensor<1> {
    let [n, _] = hidden.dims();
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = head.logits(&hidden, start, len).detach();
        let logp = burn::tensor::activation::log_softmax(logits, 1);
        let entropy = (logp.clone().exp() * logp).sum_dim(1).neg();
        out.push(entropy.reshape([len]));
        start += len;
    }
    if out.is_empty() {
        return Tensor::zeros([0], &hidden.device());
    }
    Tensor::cat(out, 0)
}

/// A LoRA adapter's up-projection added to its base projection's output:
/// `base + cast(s·down·Bᵀ)`, the low-rank product taken in the factors' dtype and cast to
/// `base`'s. `base`: `[..., O]`; `down`: `[..., r]` (`dropout(x)·Aᵀ`); `b`: `[O, r]`.
pub fn lora_up<const D: usize>(
    base: Tensor<D>,
    down: Tensor<D>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    let dtype = base.dtype();
    base + burn::tensor::module::linear(down, b.transpose(), None)
        .mul_scalar(scale)
        .cast(dtype)
}

/// The gated MLP activation: `silu(gate) · up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selftest::values;
    use burn::tensor::{Device, TensorData};

    fn tensor<const D: usize>(v: &[f32], shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), &Device::flex())
    }

    fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().unwrap()
    }

    /// Attention written out loop by loop, with K/V head `h / group` for query head `h`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        masked: &dyn Fn(usize, usize, usize) -> bool,
        b: usize,
        h: usize,
        hkv: usize,
        t: usize,
        d: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; b * h * t * d];
        let g = h / hkv;
        for bi in 0..b {
            for hi in 0..h {
                let kh = hi / g;
                for i in 0..t {
                    let qrow = &q[((bi * h + hi) * t + i) * d..][..d];
                    let scores: Vec<f32> = (0..t)
                        .map(|j| {
                            if masked(bi, i, j) {
                                f32::NEG_INFINITY
                            } else {
                                let krow = &k[((bi * hkv + kh) * t + j) * d..][..d];
                                qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>()
                                    / (d as f32).sqrt()
                            }
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f32 = exps.iter().sum();
                    for j in 0..t {
                        let vrow = &v[((bi * hkv + kh) * t + j) * d..][..d];
                        for c in 0..d {
                            out[((bi * h + hi) * t + i) * d + c] += exps[j] / z * vrow[c];
                        }
                    }
                }
            }
        }
        out
    }

    fn mask_tensor(
        b: usize,
        t: usize,
        masked: &dyn Fn(usize, usize, usize) -> bool,
    ) -> Tensor<4, Bool> {
        let flags: Vec<bool> = (0..b * t * t)
            .map(|n| masked(n / (t * t), (n / t) % t, n % t))
            .collect();
        Tensor::from_data(TensorData::new(flags, [b, 1, t, t]), &Device::flex())
    }

    #[test]
    fn grouped_attention_matches_loop_attention_with_padding() {
        let (b, h, hkv, t, d) = (2, 6, 2, 7, 8);
        let q = values(b * h * t * d, 1);
        let k = values(b * hkv * t * d, 2);
        let v = values(b * hkv * t * d, 3);
        // Row 1 has three padding tokens at the end.
        let masked = |bi: usize, i: usize, j: usize| j > i || (bi == 1 && j >= 4);
        let ours = host(attention(
            tensor(&q, [b, h, t, d]),
            tensor(&k, [b, hkv, t, d]),
            tensor(&v, [b, hkv, t, d]),
            mask_tensor(b, t, &masked),
        ));
        let want = naive(&q, &k, &v, &masked, b, h, hkv, t, d);
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "max |Δ| {worst}");
    }

    #[test]
    fn chunked_logprobs_match_log_softmax_for_any_chunk() {
        let (n, h, v) = (7, 5, 11);
        let hidden = values(n * h, 8);
        let head = values(v * h, 9);
        let targets: Vec<i64> = (0..n as i64).map(|i| (i * 4 + 1) % v as i64).collect();
        // Reference: full logits on the host.
        let mut want = Vec::new();
        let mut want_hits = Vec::new();
        for i in 0..n {
            let logits: Vec<f32> = (0..v)
                .map(|k| (0..h).map(|c| hidden[i * h + c] * head[k * h + c]).sum())
                .collect();
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
            let t = targets[i] as usize;
            want.push(logits[t] - lse);
            let top = (0..v).fold(0, |best, k| if logits[k] > logits[best] { k } else { best });
            want_hits.push((top == t) as i64);
        }
        for chunk in [1, 3, 7, 100] {
            let ids =
                Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [n]), &Device::flex());
            let (lp, hits) = token_logprobs(
                tensor(&hidden, [n, h]),
                &Head::new(tensor(&head, [v, h])),
                ids,
                chunk,
            );
            let lp = lp.into_data().try_into_vec_as::<f32>().unwrap();
            for (a, b) in lp.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "chunk {chunk}: {a} vs {b}");
            }
            assert_eq!(
                hits.into_data().try_into_vec_as::<i64>().unwrap(),
                want_hits
            );
        }
    }

    #[test]
    fn rms_norm_matches_formula() {
        let x = values(2 * 3 * 5, 4);
        let w = values(5, 5);
        let ours = rms_norm(tensor(&x, [2, 3, 5]), tensor(&w, [5]), 1e-5)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        for (row, chunk) in x.chunks(5).enumerate() {
            let ms: f32 = chunk.iter().map(|v| v * v).sum::<f32>() / 5.0;
            for c in 0..5 {
                let want = chunk[c] / (ms + 1e-5).sqrt() * w[c];
                assert!((ours[row * 5 + c] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn rotary_rotates_pairs_half_a_head_apart() {
        // One head of dim 4 at a single position: pairs (x0, x2) and (x1, x3).
        let x = [1.0, 2.0, 3.0, 4.0];
        let (a0, a1) = (0.3f32, 1.1f32);
        let cos = [a0.cos(), a1.cos(), a0.cos(), a1.cos()];
        let sin = [a0.sin(), a1.sin(), a0.sin(), a1.sin()];
        let out = host(rotary(
            tensor(&x, [1, 1, 1, 4]),
            tensor(&cos, [1, 1, 4]),
            tensor(&sin, [1, 1, 4]),
        ));
        let want = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn entropy_matches_the_definition_in_every_chunking() {
        let (n, hd, v) = (5, 4, 7);
        let h = values(n * hd, 11);
        let w = values(v * hd, 12);
        let want: Vec<f64> = (0..n)
            .map(|i| {
                let logits: Vec<f64> = (0..v)
                    .map(|j| {
                        (0..hd)
                            .map(|c| (h[i * hd + c] * w[j * hd + c]) as f64)
                            .sum()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                logits
                    .iter()
                    .map(|l| {
                        let lp = l - max - z.ln();
                        -lp.exp() * lp
                    })
                    .sum()
            })
            .collect();
        for chunk in [1, 2, 5, 9] {
            let got = token_entropy(tensor(&h, [n, hd]), &Head::new(tensor(&w, [v, hd])), chunk)
                .into_data()
                .try_into_vec_as::<f64>()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "chunk {chunk}: {g} vs {w}");
            }
        }
    }

    /// A low-rank term on the head gives the logits of the merged head `W + down·up`
    /// (checked through log-probs, every chunking).
    #[test]
    fn low_rank_head_equals_the_merged_head() {
        let (n, h, v, r) = (5, 4, 9, 2);
        let hidden = tensor(&values(n * h, 21), [n, h]);
        let w = tensor(&values(v * h, 22), [v, h]);
        let a = tensor(&values(r * h, 23), [r, h]);
        let b = tensor(&values(v * r, 24), [v, r]);
        let merged = Head::new(w.clone() + b.clone().matmul(a.clone()).mul_scalar(0.5));
        let split = Head {
            weight: w,
            low_rank: Some((hidden.clone().matmul(a.transpose()).mul_scalar(0.5), b)),
        };
        let targets = Tensor::<1, Int>::from_data(
            TensorData::new(vec![0i64, 3, 8, 1, 5], [n]),
            &Device::flex(),
        );
        let host = |t: Tensor<1>| t.into_data().try_into_vec_as::<f32>().unwrap();
        let want = host(token_logprobs(hidden.clone(), &merged, targets.clone(), 5).0);
        for chunk in [1, 2, 5] {
            let got = host(token_logprobs(hidden.clone(), &split, targets.clone(), chunk).0);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "chunk {chunk}: {g} vs {w}");
            }
        }
    }
}
