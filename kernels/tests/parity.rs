//! Fused ops against their reference twins: outputs and every input gradient, on odd shapes.
//!
//! On flex the fused path is the backend extension's primitive-op twin plus the
//! hand-written autodiff backward, so these tests check the backward formulas. With the
//! `wgpu` feature the same comparisons run the CubeCL kernels on the default wgpu adapter:
//! in CI that is Mesa's lavapipe, a Vulkan implementation on the CPU, which has shared
//! memory and barriers, all these kernels use.

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use kernels::{Head, fused, reference};

/// Tolerances per dtype, in one place: absolute for f32; for half types relative, to the
/// element or to the tensor's RMS, whichever is larger, since a half-precision reference
/// rounds each intermediate and an element that is a small difference of large terms
/// carries the error of those terms.
fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-4, 0.0),
        _ => (0.0, 1e-2),
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor<const D: usize>(
    v: &[f32],
    shape: [usize; D],
    device: &Device,
    dtype: DType,
) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(v.to_vec(), shape), device).cast(dtype)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 data")
}

/// Compares element by element; on failure reports how many differ, the first few with
/// their indices, and any NaN or infinity on either side.
fn assert_close(what: &str, got: &[f32], want: &[f32], dtype: DType) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let (abs, rel) = tolerance(dtype);
    let rms = (want.iter().map(|w| w * w).sum::<f32>() / want.len().max(1) as f32).sqrt();
    let bad: Vec<(usize, f32, f32)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| {
            !(g.is_finite() && w.is_finite()) || (*g - *w).abs() > abs + rel * w.abs().max(rms)
        })
        .map(|(i, (g, w))| (i, *g, *w))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ beyond abs {abs} rel {rel}; first: {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(5)]
    );
}

/// `Σ y·r` for a fixed `r`, so the output gradient is `r` (no symmetry to hide errors).
fn probe<const D: usize>(y: Tensor<D>, seed: u64) -> Tensor<1> {
    let r = Tensor::<D>::from_data(
        TensorData::new(values(y.shape().num_elements(), seed), y.shape()),
        &y.device(),
    )
    .cast(y.dtype());
    (y * r).cast(DType::F32).sum()
}

/// RMSNorm on `[2, 47, 123]`: output, `dx` and `dw`.
fn rms_norm_parity(device: &Device, dtype: DType) {
    let (b, t, c) = (2, 47, 123);
    let xv = values(b * t * c, 1);
    // Scales away from 1, some negative, so `dw` and `w`'s part in `dx` both matter.
    let wv: Vec<f32> = values(c, 2).iter().map(|v| 1.5 * v).collect();
    let run = |fused_path: bool| {
        let x = tensor(&xv, [b, t, c], device, dtype).require_grad();
        let w = tensor(&wv, [c], device, dtype).require_grad();
        let y = if fused_path {
            fused::rms_norm(x.clone(), w.clone(), 1e-5)
        } else {
            reference::rms_norm(x.clone(), w.clone(), 1e-5)
        };
        let grads = probe(y.clone(), 3).backward();
        (
            host(y),
            host(x.grad(&grads).expect("dx")),
            host(w.grad(&grads).expect("dw")),
        )
    };
    let (y, dx, dw) = run(true);
    let (y_ref, dx_ref, dw_ref) = run(false);
    assert_close("rms_norm y", &y, &y_ref, dtype);
    assert_close("rms_norm dx", &dx, &dx_ref, dtype);
    // `dw` sums 94 rows: scale the tolerance with it.
    let scale = (b * t) as f32;
    let dw: Vec<f32> = dw.iter().map(|v| v / scale).collect();
    let dw_ref: Vec<f32> = dw_ref.iter().map(|v| v / scale).collect();
    assert_close("rms_norm dw", &dw, &dw_ref, dtype);
}

/// SwiGLU on `[3, 41, 77]`: output and both input gradients.
fn swiglu_parity(device: &Device, dtype: DType) {
    let shape = [3, 41, 77];
    let n = shape.iter().product();
    // Gates over [-4, 4) reach both tails of the sigmoid.
    let gv: Vec<f32> = values(n, 4).iter().map(|v| 4.0 * v).collect();
    let uv = values(n, 5);
    let run = |fused_path: bool| {
        let g = tensor(&gv, shape, device, dtype).require_grad();
        let u = tensor(&uv, shape, device, dtype).require_grad();
        let y = if fused_path {
            fused::swiglu(g.clone(), u.clone())
        } else {
            reference::swiglu(g.clone(), u.clone())
        };
        let grads = probe(y.clone(), 6).backward();
        (
            host(y),
            host(g.grad(&grads).expect("d_gate")),
            host(u.grad(&grads).expect("d_up")),
        )
    };
    let (y, dg, du) = run(true);
    let (y_ref, dg_ref, du_ref) = run(false);
    assert_close("swiglu y", &y, &y_ref, dtype);
    assert_close("swiglu d_gate", &dg, &dg_ref, dtype);
    assert_close("swiglu d_up", &du, &du_ref, dtype);
}

/// LoRA's up-projection on a base output of `[2, 5, 70]` (`dtype`) with f32 factors of
/// rank 40: rows and columns that span several of the kernel's tiles (4 × 64) and a rank
/// beyond one staged slice (32). Output and the gradients of the base, `down` and `B`.
fn lora_parity(device: &Device, dtype: DType) {
    let (b, t, o, r) = (2, 5, 70, 40);
    let basev = values(b * t * o, 41);
    let downv = values(b * t * r, 42);
    let upv = values(o * r, 43);
    let run = |fused_path: bool| {
        let base = tensor(&basev, [b, t, o], device, dtype).require_grad();
        let down = tensor(&downv, [b, t, r], device, DType::F32).require_grad();
        let up = tensor(&upv, [o, r], device, DType::F32).require_grad();
        let y = if fused_path {
            fused::lora_up(base.clone(), down.clone(), up.clone(), 0.75)
        } else {
            reference::lora_up(base.clone(), down.clone(), up.clone(), 0.75)
        };
        let grads = probe(y.clone(), 44).backward();
        [
            host(y),
            host(base.grad(&grads).expect("d_base")),
            host(down.grad(&grads).expect("d_down")),
            host(up.grad(&grads).expect("d_b")),
        ]
    };
    let (got, want) = (run(true), run(false));
    for (i, name) in ["y", "d_base", "d_down", "d_b"].iter().enumerate() {
        // The factors' gradients are f32 whatever the base's dtype.
        let dt = if i >= 2 { DType::F32 } else { dtype };
        assert_close(&format!("lora {name}"), &got[i], &want[i], dt);
    }
}

#[test]
fn lora_matches_reference_on_flex() {
    lora_parity(&Device::flex().autodiff(), DType::F32);
}

/// The head's log-probs on `[47, 24]` rows and a vocabulary of 123, plain and with a
/// low-rank term, in several chunkings: log-probs, hits, and the gradients of the hidden
/// rows, the head and the low-rank factors.
fn logprob_parity(device: &Device, dtype: DType) {
    let (n, h, v, r) = (47, 24, 123, 4);
    let hv: Vec<f32> = values(n * h, 11).iter().map(|x| 3.0 * x).collect();
    let wv = values(v * h, 12);
    let dv = values(n * r, 13);
    let uv = values(v * r, 14);
    let tv: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 5) % v as i64).collect();
    for low_rank in [false, true] {
        for chunk in [1, 8, 47, 100] {
            let run = |fused_path: bool| {
                let hidden = tensor(&hv, [n, h], device, dtype).require_grad();
                let weight = tensor(&wv, [v, h], device, dtype).require_grad();
                let down = tensor(&dv, [n, r], device, dtype).require_grad();
                let up = tensor(&uv, [v, r], device, dtype).require_grad();
                let head = Head {
                    weight: weight.clone(),
                    low_rank: low_rank.then(|| (down.clone(), up.clone())),
                };
                let targets = Tensor::<1, Int>::from_data(TensorData::new(tv.clone(), [n]), device);
                let (lp, hits) = if fused_path {
                    fused::token_logprobs(hidden.clone(), &head, targets, chunk)
                } else {
                    reference::token_logprobs(hidden.clone(), &head, targets, chunk)
                };
                let grads = probe(lp.clone(), 15).backward();
                let mut out = vec![
                    host(lp),
                    host(hits.float()),
                    host(hidden.grad(&grads).expect("dh")),
                    host(weight.grad(&grads).expect("dw")),
                ];
                if low_rank {
                    out.push(host(down.grad(&grads).expect("d_down")));
                    out.push(host(up.grad(&grads).expect("d_up")));
                }
                out
            };
            let (got, want) = (run(true), run(false));
            for (i, name) in ["log-probs", "hits", "dh", "dw", "d_down", "d_up"]
                .iter()
                .enumerate()
                .take(got.len())
            {
                let what = format!("token_logprobs {name} (low rank {low_rank}, chunk {chunk})");
                assert_close(&what, &got[i], &want[i], dtype);
            }
        }
    }
}

/// Grouped attention (6 query heads on 2 K/V heads), causal, with `pad` tokens of right
/// padding in the second row (whose padded queries see no key at all), for each query
/// `block` of the blocked forward (flex, and few queries on Cube; the flash kernel tiles
/// itself): output and the gradients of q, k and v.
fn attention_parity(
    device: &Device,
    dtype: DType,
    (d, t, s_len, pad): (usize, usize, usize, usize),
    blocks: &[usize],
) {
    let (b, h, hkv) = (2, 6, 2);
    let qv = values(b * h * t * d, 21);
    let kv = values(b * hkv * s_len * d, 22);
    let vv = values(b * hkv * s_len * d, 23);
    // Queries are the last `t` of `s_len` positions (as with a KV cache when t < s_len).
    let offset = s_len - t;
    let masked: Vec<bool> = (0..b * t * s_len)
        .map(|n| {
            let (bi, i, j) = (n / (t * s_len), (n / s_len) % t, n % s_len);
            j > i + offset || (bi == 1 && (j >= s_len - pad || i + offset >= s_len - pad))
        })
        .collect();
    for &block in blocks {
        let run = |fused_path: bool| {
            let q = tensor(&qv, [b, h, t, d], device, dtype).require_grad();
            let k = tensor(&kv, [b, hkv, s_len, d], device, dtype).require_grad();
            let v = tensor(&vv, [b, hkv, s_len, d], device, dtype).require_grad();
            let mask = Tensor::<4, Bool>::from_data(
                TensorData::new(masked.clone(), [b, 1, t, s_len]),
                device,
            );
            let out = if fused_path {
                fused::attention_blocked(q.clone(), k.clone(), v.clone(), mask, block)
            } else {
                reference::attention(q.clone(), k.clone(), v.clone(), mask)
            };
            let grads = probe(out.clone(), 24).backward();
            [
                host(out),
                host(q.grad(&grads).expect("dq")),
                host(k.grad(&grads).expect("dk")),
                host(v.grad(&grads).expect("dv")),
            ]
        };
        let (got, want) = (run(true), run(false));
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            let what =
                format!("attention {name} (D {d}, T {t}, S {s_len}, pad {pad}, block {block})");
            assert_close(&what, &got[i], &want[i], dtype);
        }
    }
}

#[test]
fn attention_matches_reference_on_flex() {
    let device = Device::flex().autodiff();
    attention_parity(&device, DType::F32, (64, 23, 23, 3), &[5, 23, 64]);
    attention_parity(&device, DType::F32, (128, 13, 13, 3), &[5, 13, 64]);
    attention_parity(&device, DType::F32, (64, 4, 17, 3), &[5, 4, 64]);
}

/// RoPE on `[2, 3, 11, 64]` with per-row tables (positions differ per row, as in packed
/// batches): output and `dx`.
fn rotary_parity(device: &Device, dtype: DType) {
    let (b, h, t, d) = (2, 3, 11, 64);
    let xv = values(b * h * t * d, 31);
    // Angles of a real table: position · θ^(−2i/d), with row 1 starting at position 5.
    let (mut cv, mut sv) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for ti in 0..t {
            for c in 0..d {
                let pos = (ti + 5 * bi) as f32;
                let angle = pos * 10000f32.powf(-2.0 * (c % (d / 2)) as f32 / d as f32);
                cv.push(angle.cos());
                sv.push(angle.sin());
            }
        }
    }
    let run = |fused_path: bool| {
        let x = tensor(&xv, [b, h, t, d], device, dtype).require_grad();
        let cos = tensor(&cv, [b, t, d], device, dtype);
        let sin = tensor(&sv, [b, t, d], device, dtype);
        let y = if fused_path {
            fused::rotary(x.clone(), cos, sin)
        } else {
            reference::rotary(x.clone(), cos, sin)
        };
        let grads = probe(y.clone(), 32).backward();
        (host(y), host(x.grad(&grads).expect("dx")))
    };
    let (y, dx) = run(true);
    let (y_ref, dx_ref) = run(false);
    assert_close("rotary y", &y, &y_ref, dtype);
    assert_close("rotary dx", &dx, &dx_ref, dtype);
}

#[test]
fn rotary_matches_reference_on_flex() {
    rotary_parity(&Device::flex().autodiff(), DType::F32);
}

#[test]
fn token_logprobs_match_reference_on_flex() {
    logprob_parity(&Device::flex().autodiff(), DType::F32);
}

/// A frozen head (no gradient wanted for it, as under LoRA) still passes the gradient to
/// the hidden rows.
#[test]
fn token_logprobs_with_a_frozen_head_train_the_hidden_rows() {
    let device = Device::flex().autodiff();
    let (n, h, v) = (9, 8, 30);
    let hidden = tensor(&values(n * h, 16), [n, h], &device, DType::F32).require_grad();
    let head = Head::new(tensor(&values(v * h, 17), [v, h], &device, DType::F32));
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new((0..n as i64).collect::<Vec<_>>(), [n]),
        &device,
    );
    let grad = |fused_path: bool| {
        let (lp, _) = if fused_path {
            fused::token_logprobs(hidden.clone(), &head, targets.clone(), 4)
        } else {
            reference::token_logprobs(hidden.clone(), &head, targets.clone(), 4)
        };
        let grads = lp.sum().backward();
        host(hidden.grad(&grads).expect("dh"))
    };
    assert_close("dh, frozen head", &grad(true), &grad(false), DType::F32);
}

#[test]
fn rms_norm_matches_reference_on_flex() {
    rms_norm_parity(&Device::flex().autodiff(), DType::F32);
}

#[test]
fn swiglu_matches_reference_on_flex() {
    swiglu_parity(&Device::flex().autodiff(), DType::F32);
}

/// Without autodiff the fused ops run their forward alone (the inference path).
#[test]
fn fused_forward_without_autodiff_matches_reference() {
    let device = Device::flex();
    let x = tensor(&values(5 * 64, 7), [5, 64], &device, DType::F32);
    let w = tensor(&values(64, 8), [64], &device, DType::F32);
    assert_close(
        "rms_norm",
        &host(fused::rms_norm(x.clone(), w.clone(), 1e-6)),
        &host(reference::rms_norm(x.clone(), w, 1e-6)),
        DType::F32,
    );
    assert_close(
        "swiglu",
        &host(fused::swiglu(x.clone(), x.clone().neg())),
        &host(reference::swiglu(x.clone(), x.neg())),
        DType::F32,
    );
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use burn::tensor::DeviceKind;

    fn device() -> Device {
        Device::wgpu(DeviceKind::DefaultDevice)
    }

    #[test]
    fn rms_norm_kernel_matches_reference_on_wgpu() {
        rms_norm_parity(&device().autodiff(), DType::F32);
    }

    #[test]
    fn swiglu_kernel_matches_reference_on_wgpu() {
        swiglu_parity(&device().autodiff(), DType::F32);
    }

    #[test]
    fn rotary_kernel_matches_reference_on_wgpu() {
        rotary_parity(&device().autodiff(), DType::F32);
    }

    /// The flash kernel: head dims 64 and 128; queries fewer than keys (a KV cache, both
    /// below the kernel's few-queries bound, where the blocked forward takes over, and
    /// above it);
    /// and 70 tokens, which span two cubes of queries, two of keys and several tiles of
    /// K/V (at most 32 keys each), so the running softmax's rescaling across tiles and the
    /// cubes' edges are exercised, and causal cubes skip the tiles they cannot see. With
    /// 40 padding tokens, cubes that hold both real rows and rows that see nothing must
    /// not skip: the latter attend to every key.
    #[test]
    fn attention_matches_reference_on_wgpu() {
        let device = device().autodiff();
        attention_parity(&device, DType::F32, (64, 23, 23, 3), &[64]);
        attention_parity(&device, DType::F32, (128, 21, 21, 3), &[64]);
        attention_parity(&device, DType::F32, (64, 4, 17, 3), &[2, 4]);
        attention_parity(&device, DType::F32, (32, 20, 37, 3), &[64]);
        attention_parity(&device, DType::F32, (16, 70, 70, 3), &[64]);
        attention_parity(&device, DType::F32, (16, 70, 70, 40), &[64]);
    }

    #[test]
    fn lora_kernel_matches_reference_on_wgpu() {
        let device = device().autodiff();
        lora_parity(&device, DType::F32);
        lora_parity(&device, DType::F16);
    }

    /// f16 inputs: the kernel's sums are f32, the reference's matmuls round to f16.
    #[test]
    fn f16_attention_matches_reference_on_wgpu() {
        attention_parity(&device().autodiff(), DType::F16, (64, 23, 23, 3), &[64]);
    }

    #[test]
    fn token_logprobs_match_reference_on_wgpu() {
        logprob_parity(&device().autodiff(), DType::F32);
    }

    /// Half precision where the adapter has it (lavapipe does): the kernels keep their sums
    /// in f32, the reference rounds to f16 along the way, so they agree to 1e-2 relative.
    #[test]
    fn f16_kernels_match_reference_on_wgpu() {
        let device = device().autodiff();
        rms_norm_parity(&device, DType::F16);
        swiglu_parity(&device, DType::F16);
        rotary_parity(&device, DType::F16);
    }

    /// The kernels on wgpu agree with flex's reference too, so a fault shared by both wgpu
    /// paths (e.g. in a backend primitive) cannot pass unseen.
    #[test]
    fn wgpu_kernels_match_flex_reference() {
        let (rows, cols) = (70_000, 3);
        let xv = values(rows * cols, 9);
        let wv = values(cols, 10);
        let on = |device: &Device, fused_path: bool| {
            let x = tensor(&xv, [rows, cols], device, DType::F32);
            let w = tensor(&wv, [cols], device, DType::F32);
            if fused_path {
                host(fused::rms_norm(x, w, 1e-5))
            } else {
                host(reference::rms_norm(x, w, 1e-5))
            }
        };
        // More rows than one grid axis holds (65 535): the 2-D grid covers them all.
        assert_close(
            "rms_norm rows beyond one grid axis",
            &on(&device(), true),
            &on(&Device::flex(), false),
            DType::F32,
        );
    }
}
