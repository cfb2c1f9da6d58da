//! What the benches share: the device, deterministic inputs, the fixed "small" model,
//! the adapters every LoRA bench uses, and peak memory.
#![allow(dead_code)] // each bench uses a different subset

use burn::tensor::{Device, Tensor, TensorData};
use checkpoints::{ModelConfig, SaveOptions};
use trainer::model::adapter::{LAYER_PROJECTIONS, LoraSettings};
use trainer::model::init_random_weights;

/// The "small" config of the SFT issue, random weights, written to `dir`.
pub fn small_model(dir: &std::path::Path) {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
    });
    let config = ModelConfig::from_json_str(&json.to_string(), &dir.join("config.json")).unwrap();
    checkpoints::save_weights(
        dir,
        &init_random_weights(&config, 0.02, 0),
        SaveOptions::default(),
    )
    .unwrap();
    checkpoints::write_text(&dir.join("config.json"), &config.to_json(config.dtype)).unwrap();
}

/// The process's peak resident memory (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The device named by `HEARTH_BENCH_DEVICE` (`cpu`, `wgpu`, `cuda`; default `cpu`).
pub fn device() -> Device {
    let name = std::env::var("HEARTH_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    trainer::device::parse(&name).unwrap_or_else(|e| panic!("HEARTH_BENCH_DEVICE: {e}"))
}

/// Deterministic values in [-0.5, 0.5) of `shape`, varied by `k`.
pub fn filled<const D: usize>(shape: [usize; D], k: usize, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * k) % 101) as f32 / 101.0 - 0.5)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// LoRA r 16 (alpha 32, no dropout) on all seven projections of every layer.
pub fn lora_on_all_projections() -> LoraSettings {
    LoraSettings {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        target_modules: LAYER_PROJECTIONS.map(String::from).to_vec(),
        use_rslora: false,
        layers_to_transform: None,
    }
}
