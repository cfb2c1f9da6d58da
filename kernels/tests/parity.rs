//! Fused ops against their reference twins: outputs and every input gradient, on odd shapes,
//! through the same harness `hearth selftest` runs on a GPU (`kernels::selftest`).
//!
//! On flex the fused path is the backend extension's primitive-op twin plus the
//! hand-written autodiff backward, so these tests check the backward formulas. With the
//! `wgpu` feature the same comparisons run the CubeCL kernels on the default wgpu adapter:
//! in CI that is Mesa's lavapipe, a Vulkan implementation on the CPU, which has shared
//! memory and barriers, all these kernels use.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use kernels::selftest::{Case, compare, host, tensor, values};
use kernels::{Head, fused, reference};

/// Runs `case` and fails with every comparison if one is off.
fn check(case: Case, device: &Device, dtype: DType) {
    let report = case.run(device, dtype);
    assert!(report.pass(), "{report}");
}

fn assert_close(what: &str, got: &[f32], want: &[f32], dtype: DType) {
    let c = compare(what, got, want, dtype);
    assert!(c.pass(), "{c}");
}

/// RMSNorm on `[2, 47, 123]`: output, `dx` and `dw`.
fn rms_norm_parity(device: &Device, dtype: DType) {
    check(
        Case::RmsNorm {
            shape: [2, 47, 123],
        },
        device,
        dtype,
    );
}

/// SwiGLU on `[3, 41, 77]`: output and both input gradients.
fn swiglu_parity(device: &Device, dtype: DType) {
    check(Case::Swiglu { shape: [3, 41, 77] }, device, dtype);
}

/// LoRA's up-projection on a base output of `[2, 5, 70]` (`dtype`) with f32 factors of
/// rank 40: rows and columns that span several of the kernel's tiles (4 × 64) and a rank
/// beyond one staged slice (32). Output and the gradients of the base, `down` and `B`.
fn lora_parity(device: &Device, dtype: DType) {
    check(
        Case::LoraUp {
            b: 2,
            t: 5,
            o: 70,
            r: 40,
        },
        device,
        dtype,
    );
}

/// A frozen weight quantized in NF4's layout (4 bits, 64 values per scale) and Q8_0's (8
/// bits, 32): output columns across two of the kernel's 64-wide tiles, a slab of input
/// columns the flex twin cuts short, and rows that leave a partial tile. Output and `dx`.
fn quant_parity(device: &Device, dtype: DType) {
    for (m, n, k, bits) in [(5, 70, 320, 4), (3, 130, 96, 8), (1, 9, 64, 4)] {
        check(Case::QuantMatmul { m, n, k, bits }, device, dtype);
    }
}

/// A quantized head's log-probs, fused (hidden gradient computed in the forward), against
/// the dense head of its values: two chunks and a partial one, NF4 and Q8_0.
fn quant_head_parity(device: &Device, dtype: DType) {
    for bits in [4, 8] {
        check(
            Case::QuantHead {
                n: 37,
                h: 128,
                v: 300,
                chunk: 16,
                bits,
            },
            device,
            dtype,
        );
    }
}

#[test]
fn quant_matmul_matches_reference_on_flex() {
    quant_parity(&Device::flex().autodiff(), DType::F32);
    quant_parity(&Device::flex().autodiff(), DType::BF16);
    quant_head_parity(&Device::flex().autodiff(), DType::F32);
    quant_head_parity(&Device::flex().autodiff(), DType::BF16);
}

#[test]
fn lora_matches_reference_on_flex() {
    lora_parity(&Device::flex().autodiff(), DType::F32);
}

/// The head's log-probs on `[47, 24]` rows and a vocabulary of 123, plain, with a
/// low-rank term and under a frozen head, in several chunkings: log-probs, hits, and the
/// gradients of the hidden rows, the head and the low-rank factors.
fn logprob_parity(device: &Device, dtype: DType) {
    for r in [0, 4] {
        for chunk in [1, 8, 47, 100] {
            let (n, h, v) = (47, 24, 123);
            check(Case::TokenLogprobs { n, h, v, r, chunk }, device, dtype);
            if r == 0 {
                check(Case::FrozenHead { n, h, v, chunk }, device, dtype);
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
    (d, t, s, pad): (usize, usize, usize, usize),
    blocks: &[usize],
) {
    for &block in blocks {
        let (b, h, hkv) = (2, 6, 2);
        let block = Some(block);
        check(
            Case::Attention {
                b,
                h,
                hkv,
                d,
                t,
                s,
                pad,
                block,
            },
            device,
            dtype,
        );
    }
}

#[test]
fn attention_matches_reference_on_flex() {
    let device = Device::flex().autodiff();
    attention_parity(&device, DType::F32, (64, 23, 23, 3), &[5, 23, 64]);
    attention_parity(&device, DType::F32, (128, 13, 13, 3), &[5, 13, 64]);
    attention_parity(&device, DType::F32, (64, 4, 17, 3), &[5, 4, 64]);
}

/// RoPE on `[2, 3, 11, 64]` with per-row f32 tables: output and `dx`.
fn rotary_parity(device: &Device, dtype: DType) {
    let (b, h, t, d) = (2, 3, 11, 64);
    check(Case::Rotary { b, h, t, d }, device, dtype);
}

/// In bf16 too: half-precision heads rotate by f32 tables (as the model passes them).
#[test]
fn rotary_matches_reference_on_flex() {
    rotary_parity(&Device::flex().autodiff(), DType::F32);
    rotary_parity(&Device::flex().autodiff(), DType::BF16);
}

#[test]
fn token_logprobs_match_reference_on_flex() {
    logprob_parity(&Device::flex().autodiff(), DType::F32);
}

/// A frozen head (no gradient wanted for it, as under LoRA) still passes the gradient to
/// the hidden rows, and its one pass (log-probs with slopes) reads the same entropy.
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
        let rows = if fused_path {
            fused::token_logprobs(hidden.clone(), &head, targets.clone(), 4)
        } else {
            reference::token_logprobs(hidden.clone(), &head, targets.clone(), 4)
        };
        let grads = rows.logprobs.sum().backward();
        (host(hidden.grad(&grads).expect("dh")), host(rows.entropy))
    };
    let ((dh, entropy), (want_dh, want_entropy)) = (grad(true), grad(false));
    assert_close("dh, frozen head", &dh, &want_dh, DType::F32);
    assert_close("entropy, frozen head", &entropy, &want_entropy, DType::F32);
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
    use kernels::launches::Kernel;

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

    #[test]
    fn quant_matmul_kernels_match_reference_on_wgpu() {
        let device = device().autodiff();
        quant_parity(&device, DType::F32);
        quant_parity(&device, DType::F16);
        quant_head_parity(&device, DType::F32);
    }

    /// The quantized embedding lookup (u32 words gathered by row, unpacked by shift and
    /// mask) gives the host's dequantized rows.
    #[test]
    fn quantized_rows_match_the_host_on_wgpu() {
        let device = device();
        let (n, k) = (5, 128);
        let layout = kernels::QuantLayout { bits: 4, block: 64 };
        let codes: Vec<u8> = (0..n * k).map(|i| ((i * 7 + i / 3) % 16) as u8).collect();
        let scales: Vec<f32> = (0..n * k / 64).map(|b| 0.02 + b as f32 * 0.01).collect();
        let code: Vec<f32> = (0..16).map(|i| i as f32 / 7.5 - 1.0).collect();
        let packed = kernels::pack_codes(&codes, 4);
        let dense = kernels::dequantize_host(&packed, &scales, &code, layout, n, k);
        let m = kernels::QuantMatrix {
            packed: Tensor::from_data(TensorData::new(packed, [n, k / 8]), (&device, DType::U32)),
            scales: Tensor::from_data(TensorData::new(scales, [n * k / 64]), &device),
            code: Tensor::from_data(TensorData::new(code, [16]), &device),
            offsets: None,
            layout,
        };
        let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 0, 3], [3]), &device);
        let want: Vec<f32> = [3, 0, 3]
            .iter()
            .flat_map(|&r| dense[r * k..(r + 1) * k].to_vec())
            .collect();
        assert_close("rows", &host(m.rows(ids)), &want, DType::F32);
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

    /// The selftest's small set, as `hearth selftest --small` dry-runs it, passes on
    /// lavapipe, and on a Cube device each case really launches its CubeCL kernels.
    #[test]
    fn the_small_selftest_passes_on_wgpu_through_the_kernels() {
        let device = device().autodiff();
        for case in kernels::selftest::model_cases(true) {
            let report = case.run(&device, DType::F32);
            assert!(report.pass(), "{report}");
            let launched = |k: Kernel| report.kernels.iter().any(|&(kk, n)| kk == k && n > 0);
            let want: &[Kernel] = match case.op() {
                "rms_norm" => &[Kernel::RmsNorm, Kernel::RmsNormBackward],
                "swiglu" => &[Kernel::Swiglu, Kernel::SwigluBackward],
                "rotary" => &[Kernel::Rotary, Kernel::RotaryBackward],
                "lora_up" => &[Kernel::LoraUp],
                "token_logprobs" => &[Kernel::LogitRows, Kernel::LogitGrads],
                // That the two-kernel fallback stays idle is checked where tests take
                // turns (trainer/tests/kernels.rs): here other tests launch it meanwhile.
                "frozen_head_logprobs" => &[Kernel::LogitRowsSlopes],
                "quant_matmul" | "quant_head_logprobs" => {
                    &[Kernel::QuantMatmul, Kernel::QuantMatmulBackward]
                }
                _ => &[Kernel::AttentionBackward],
            };
            for &k in want {
                assert!(launched(k), "{}: {k:?} never launched", case.label());
            }
        }
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

/// The mean logit of each row, as the head's mean row applied to it, against the mean of
/// the logits themselves: a dense head with a low-rank term.
#[test]
fn mean_logits_are_the_mean_of_the_logits() {
    let device = Device::flex();
    let (n, h, v, r) = (7, 8, 30, 2);
    let hidden = tensor(&values(n * h, 21), [n, h], &device, DType::F32);
    let mut head = Head::new(tensor(&values(v * h, 22), [v, h], &device, DType::F32));
    head.low_rank = Some((
        tensor(&values(n * r, 23), [n, r], &device, DType::F32),
        tensor(&values(v * r, 24), [v, r], &device, DType::F32),
    ));
    let got = host(kernels::mean_logits(hidden.clone(), &head, 3));
    let want = host(head.logits(&hidden, 0, n).mean_dim(1).reshape([n]));
    assert_close("mean logits", &got, &want, DType::F32);
}
