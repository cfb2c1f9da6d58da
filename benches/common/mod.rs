//! What the benches share: the fixed "small" model and peak memory.

use checkpoints::{ModelConfig, SaveOptions};
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
