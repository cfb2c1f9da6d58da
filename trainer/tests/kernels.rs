//! The recipe's `kernels` switch reaches the model: full fine-tuning (so RMSNorm's weight
//! gradient is used too) with `fused` and with `reference` follows the same loss curve and
//! ends at the same weights, within f32 summation-order tolerance.
//!
//! On wgpu (lavapipe in CI) LoRA SFT with the fused kernels (flash attention, the LoRA
//! epilogue, RMSNorm, RoPE, SwiGLU, the chunked head) follows the reference ops likewise,
//! and so does `train.attention = "blocked"` (attention through the backend's matmuls).
//!
//! Its own test binary, because the switches are process-wide: the tests take turns.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
#[cfg(feature = "wgpu")]
use kernels::launches::Kernel;
use kernels::launches::{Counts, Op};
use trainer::model::load_model;
use trainer::recipe::load;
use trainer::train::train;

mod common;
use common::{adapter_tensors, losses, root, serial};

#[test]
fn fused_and_reference_kernels_train_alike() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let text = std::fs::read_to_string(root().join("recipes/tiny-sft.toml")).unwrap();
    let full =
        text[..text.find("[lora]").unwrap()].to_string() + &text[text.find("[train]").unwrap()..];
    let recipe_path = tmp.path().join("full.toml");
    std::fs::write(&recipe_path, full).unwrap();
    let run = |kernels: &str| {
        run_sft(
            &recipe_path,
            &base,
            &tmp.path().join(kernels),
            kernels,
            &["train.max_steps=4", "train.learning_rate=1e-3"],
        )
    };
    let start = Counts::now();
    let fused = run("fused");
    let middle = Counts::now();
    let reference = run("reference");
    let end = Counts::now();
    // Every op took its fused path (flex's primitive-op twins) in the fused run, and
    // none did in the reference run. Full fine-tuning has no LoRA.
    for op in Op::ALL.into_iter().filter(|&op| op != Op::LoraUp) {
        assert!(
            middle.since(&start).fused(op) > 0,
            "{op:?} never took the fused path"
        );
        assert_eq!(
            end.since(&middle).fused(op),
            0,
            "{op:?} in the reference run"
        );
    }
    let (a, b) = (losses(&fused), losses(&reference));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * y.abs(), "losses {a:?} vs {b:?}");
    }
    // The steps moved the weights (so equal weights mean equal updates), and alike.
    let weights = |dir: &Path| {
        let (_, m) = load_model(&dir.join("final"), &Device::flex()).unwrap();
        m.layers[0]
            .post_attention_layernorm
            .weight
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let (_, initial) = load_model(&base, &Device::flex()).unwrap();
    let start = initial.layers[0]
        .post_attention_layernorm
        .weight
        .val()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let (wa, wb) = (weights(&fused), weights(&reference));
    assert_ne!(wa, start);
    let worst = wa
        .iter()
        .zip(&wb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "norm weights differ by {worst}");
}

/// The GPU path end to end: the same LoRA SFT steps on wgpu with `kernels = "fused"` and
/// `"reference"` log the same losses and end at the same adapters.
#[cfg(feature = "wgpu")]
#[test]
fn lora_sft_on_wgpu_trains_alike_with_fused_kernels() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = |name: &str, kernels: &str, attention: &str| {
        run_sft(
            &root().join("recipes/tiny-sft.toml"),
            &base,
            &tmp.path().join(name),
            kernels,
            // Few, short rows: lavapipe compiles every kernel for every shape it meets.
            &[
                "train.max_steps=3",
                "train.per_device_train_batch_size=2",
                "data.max_length=48",
                "train.eval_steps=0",
                "train.device=\"wgpu\"",
                &format!("train.attention=\"{attention}\""),
            ],
        )
    };
    let start = Counts::now();
    let fused = run("fused", "fused", "auto");
    let middle = Counts::now();
    let reference = run("reference", "reference", "auto");
    let end = Counts::now();
    // `train.attention = "blocked"`: attention a block of queries at a time through the
    // backend's matmuls, forward and backward; the flash kernels stay idle, the rest run.
    let blocked = run("blocked", "fused", "blocked");
    let after = Counts::now();
    assert_eq!(kernels::attention_path(), kernels::AttentionPath::Blocked);
    // Every CubeCL kernel, forward and backward, was launched by the fused run, and none
    // by the reference run; but the quantized matmul's, which only a quantized base
    // (`model.quantize`) launches, and the frozen head's one-pass kernel: tiny-sft puts
    // LoRA on lm_head, so its head trains (the selftest covers that kernel).
    let unused = [
        Kernel::QuantMatmul,
        Kernel::QuantMatmulBackward,
        Kernel::LogitRowsSlopes,
    ];
    for kernel in Kernel::ALL.into_iter().filter(|k| !unused.contains(k)) {
        let n = middle.since(&start).kernel(kernel);
        assert!(n > 0, "{kernel:?} was never launched by the fused run");
        assert_eq!(
            end.since(&middle).kernel(kernel),
            0,
            "{kernel:?} in the reference run"
        );
        let flash = [Kernel::Attention, Kernel::AttentionBackward];
        let n = after.since(&end).kernel(kernel);
        if flash.contains(&kernel) {
            assert_eq!(n, 0, "{kernel:?} in the blocked-attention run");
        } else {
            assert!(
                n > 0,
                "{kernel:?} was never launched by the blocked-attention run"
            );
        }
    }
    let (a, b) = (losses(&fused), losses(&reference));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * y.abs(), "losses {a:?} vs {b:?}");
    }
    let c = losses(&blocked);
    for (x, y) in c.iter().zip(&a) {
        assert!(
            (x - y).abs() < 1e-4 * y.abs(),
            "losses {c:?} (blocked) vs {a:?}"
        );
    }
    assert_eq!(c.len(), 3);
    let adapters = |dir: &Path| {
        adapter_tensors(&dir.join("final"))
            .into_iter()
            .collect::<Vec<_>>()
    };
    let (wa, wb, wc) = (adapters(&fused), adapters(&reference), adapters(&blocked));
    assert_eq!(wa.len(), wb.len());
    assert_eq!(wa.len(), wc.len());
    // B starts at zero: a moved B shows the steps reached the adapters.
    assert!(
        wa.iter()
            .any(|(n, v)| n.contains("lora_B") && v.iter().any(|x| *x != 0.0))
    );
    for ((name, x), ((_, y), (_, z))) in wa.iter().zip(wb.iter().zip(&wc)) {
        for (other, w) in [("reference", y), ("blocked", z)] {
            let worst = x
                .iter()
                .zip(w)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{name} differs from the {other} run by {worst}"
            );
        }
    }
}

/// Blocked attention on a Cube device, op by op: grouped heads, right padding (rows that
/// see no key), head dims 64 and 128, fewer queries than keys; the output and the gradients
/// of q, k and v match the reference, and the flash kernels launch only when `flash` is
/// chosen. (On a GPU the requested block is only a floor: these shapes are one block
/// there; the block loop itself is flex's twin, which the bf16 selftest runs.)
#[cfg(feature = "wgpu")]
#[test]
fn blocked_attention_matches_reference_on_wgpu() {
    use burn::tensor::DType;
    use kernels::AttentionPath;
    use kernels::selftest::Case;
    let _turn = serial();
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    for path in [AttentionPath::Blocked, AttentionPath::Flash] {
        kernels::set_attention_path(path);
        for (d, t, s, pad) in [
            (64, 23, 23, 3),
            (128, 21, 21, 3),
            (64, 4, 17, 3),
            (16, 70, 70, 40),
        ] {
            // The requested block (5) is a floor that the GPU raises.
            let (b, h, hkv, block) = (2, 6, 2, Some(5));
            let case = Case::Attention {
                b,
                h,
                hkv,
                d,
                t,
                s,
                pad,
                block,
            };
            let report = case.run(&device, DType::F32);
            assert!(report.pass(), "{path:?}: {report}");
            let launched = |k: Kernel| report.kernels.iter().any(|&(kk, n)| kk == k && n > 0);
            let flash = path == AttentionPath::Flash;
            assert_eq!(launched(Kernel::Attention), flash, "{path:?}: {report}");
            assert_eq!(
                launched(Kernel::AttentionBackward),
                flash,
                "{path:?}: {report}"
            );
        }
    }
    kernels::set_attention_path(AttentionPath::Auto);
}

/// SFT with `recipe` on the tiny base at `base` (made on first use) with the bundled
/// dialogues, `train.kernels = kernels` and `extra` overrides, into `out`. The switch is
/// checked to have reached the kernels, so two runs compared here really ran both paths.
fn run_sft(recipe: &Path, base: &Path, out: &Path, kernels: &str, extra: &[&str]) -> PathBuf {
    let mut sets = vec![
        format!("model.path=\"{}\"", base.display()),
        format!(
            "data.train=\"{}\"",
            root().join("data/examples/counseling-sft.jsonl").display()
        ),
        format!("train.kernels=\"{kernels}\""),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let recipe = load(recipe, &sets).unwrap();
    train(&recipe, out, false, false).unwrap();
    assert_eq!(
        kernels::kernels(),
        kernels::Kernels::parse(kernels).unwrap()
    );
    out.to_path_buf()
}

/// A frozen head on a Cube device, dense or quantized (QLoRA with
/// `model.quantize_embeddings`): each chunk is one launch of the row kernel with its slopes
/// written over the logits, and the two-kernel fallback (row statistics, then the gradient
/// into a second buffer) never runs; the values match the reference.
#[cfg(feature = "wgpu")]
#[test]
fn a_frozen_heads_chunks_are_one_launch_on_wgpu() {
    use burn::tensor::DType;
    use kernels::selftest::Case;
    let _turn = serial();
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff();
    let (n, h, v) = (47, 64, 123);
    let cases = [8, 47].into_iter().flat_map(|chunk| {
        [
            Case::FrozenHead { n, h, v, chunk },
            Case::QuantHead {
                n,
                h,
                v,
                chunk,
                bits: 4,
            },
        ]
    });
    for case in cases {
        let report = case.run(&device, DType::F32);
        assert!(report.pass(), "{report}");
        let launches = |k: Kernel| {
            report
                .kernels
                .iter()
                .find(|&&(kk, _)| kk == k)
                .map_or(0, |&(_, n)| n)
        };
        assert!(launches(Kernel::LogitRowsSlopes) > 0, "{report}");
        assert_eq!(launches(Kernel::LogitRows), 0, "{report}");
        assert_eq!(launches(Kernel::LogitGrads), 0, "{report}");
    }
}
