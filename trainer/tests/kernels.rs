//! The recipe's `kernels` switch reaches the model: full fine-tuning (so RMSNorm's weight
//! gradient is used too) with `fused` and with `reference` follows the same loss curve and
//! ends at the same weights, within f32 summation-order tolerance.
//!
//! On wgpu (lavapipe in CI) LoRA SFT with the fused kernels (flash attention, the LoRA
//! epilogue, RMSNorm, RoPE, SwiGLU, the chunked head) follows the reference ops likewise.
//!
//! Its own test binary, because the switch is process-wide: the tests take turns.

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
    let run = |kernels: &str| {
        run_sft(
            &root().join("recipes/tiny-sft.toml"),
            &base,
            &tmp.path().join(kernels),
            kernels,
            // Few, short rows: lavapipe compiles every kernel for every shape it meets.
            &[
                "train.max_steps=3",
                "train.per_device_train_batch_size=2",
                "data.max_length=48",
                "train.eval_steps=0",
                "train.device=\"wgpu\"",
            ],
        )
    };
    let start = Counts::now();
    let fused = run("fused");
    let middle = Counts::now();
    let reference = run("reference");
    let end = Counts::now();
    // Every CubeCL kernel, forward and backward, was launched by the fused run, and none
    // by the reference run; but the quantized matmul's, which only a quantized base
    // (`model.quantize`) launches.
    let quant = [Kernel::QuantMatmul, Kernel::QuantMatmulBackward];
    for kernel in Kernel::ALL.into_iter().filter(|k| !quant.contains(k)) {
        let n = middle.since(&start).kernel(kernel);
        assert!(n > 0, "{kernel:?} was never launched by the fused run");
        assert_eq!(
            end.since(&middle).kernel(kernel),
            0,
            "{kernel:?} in the reference run"
        );
    }
    let (a, b) = (losses(&fused), losses(&reference));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * y.abs(), "losses {a:?} vs {b:?}");
    }
    let adapters = |dir: &Path| {
        adapter_tensors(&dir.join("final"))
            .into_iter()
            .collect::<Vec<_>>()
    };
    let (wa, wb) = (adapters(&fused), adapters(&reference));
    assert_eq!(wa.len(), wb.len());
    // B starts at zero: a moved B shows the steps reached the adapters.
    assert!(
        wa.iter()
            .any(|(n, v)| n.contains("lora_B") && v.iter().any(|x| *x != 0.0))
    );
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{name} differs by {worst}");
    }
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
