//! The plain-tensor references, gathered: each is written beside its fused op in
//! `ops/<op>.rs`, and is the specification the op's kernels are tested against, so it
//! stays as obvious as the math. Shapes: `B` batch, `T` tokens, `H` query heads, `Hkv`
//! key/value heads, `D` head dim.

pub use crate::ops::attention::reference as attention;
pub use crate::ops::logprobs::{Head, reference as token_logprobs, token_entropy};
pub use crate::ops::lora::reference as lora_up;
pub use crate::ops::rms_norm::reference as rms_norm;
pub use crate::ops::rotary::reference as rotary;
pub use crate::ops::swiglu::reference as swiglu;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selftest::values;
    use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

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
        let mut want_entropy = Vec::new();
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
            want_entropy.push(
                logits
                    .iter()
                    .map(|l| -(l - lse).exp() * (l - lse))
                    .sum::<f32>(),
            );
        }
        for chunk in [1, 3, 7, 100] {
            let ids =
                Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [n]), &Device::flex());
            let rows = token_logprobs(
                tensor(&hidden, [n, h]),
                &Head::new(tensor(&head, [v, h])),
                ids,
                chunk,
            );
            let (lp, hits) = (rows.logprobs, rows.hits);
            let lp = lp.into_data().try_into_vec_as::<f32>().unwrap();
            for (a, b) in lp.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "chunk {chunk}: {a} vs {b}");
            }
            let entropy = rows.entropy.into_data().try_into_vec_as::<f32>().unwrap();
            for (a, b) in entropy.iter().zip(&want_entropy) {
                assert!((a - b).abs() < 1e-5, "chunk {chunk}: entropy {a} vs {b}");
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
            weight: crate::HeadWeight::Dense(w),
            low_rank: Some((hidden.clone().matmul(a.transpose()).mul_scalar(0.5), b)),
        };
        let targets = Tensor::<1, Int>::from_data(
            TensorData::new(vec![0i64, 3, 8, 1, 5], [n]),
            &Device::flex(),
        );
        let host = |t: Tensor<1>| t.into_data().try_into_vec_as::<f32>().unwrap();
        let want = host(token_logprobs(hidden.clone(), &merged, targets.clone(), 5).logprobs);
        for chunk in [1, 2, 5] {
            let got = host(token_logprobs(hidden.clone(), &split, targets.clone(), chunk).logprobs);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "chunk {chunk}: {g} vs {w}");
            }
        }
    }
}
