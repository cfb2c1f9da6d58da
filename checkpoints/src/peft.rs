//! PEFT's LoRA adapter layout: `adapter_config.json` and `adapter_model.safetensors`, with
//! the module and tensor names PEFT gives them, so adapters move between hearth and PEFT
//! unchanged.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{CheckpointError, Result};

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The seven projections of every decoder layer, by PEFT's module names: the usual LoRA
/// targets.
pub const LAYER_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The embeddings' PEFT module name.
pub const EMBEDDINGS: &str = "embed_tokens";

/// Every module an adapter can sit on: the layers' seven projections, the output head and
/// the embeddings.
pub const TARGETS: [&str; 9] = [
    LAYER_PROJECTIONS[0],
    LAYER_PROJECTIONS[1],
    LAYER_PROJECTIONS[2],
    LAYER_PROJECTIONS[3],
    LAYER_PROJECTIONS[4],
    LAYER_PROJECTIONS[5],
    LAYER_PROJECTIONS[6],
    "lm_head",
    EMBEDDINGS,
];

/// Where PEFT saves a `modules_to_save` copy of the score head.
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// PEFT's key for factor `A` or `B` of the adapter on `module` (e.g.
/// `model.layers.0.self_attn.q_proj`).
pub fn lora_key(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.lora_{factor}.weight")
}

/// PEFT keeps embedding factors as bare parameters: no `.weight` suffix.
pub fn embedding_key(factor: &str) -> String {
    format!("base_model.model.model.{EMBEDDINGS}.lora_embedding_{factor}")
}

/// What PEFT's `adapter_config.json` says about a LoRA adapter (the keys hearth uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
}

impl LoraSettings {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Refuses settings no adapter can have; `origin` (a file, or a recipe section) starts
    /// the message.
    pub fn validate(&self, origin: &str) -> std::result::Result<(), String> {
        let bad = |msg: String| Err(format!("{origin}: {msg}"));
        if self.r == 0 {
            return bad("LoRA rank `r` must be positive".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.target_modules.is_empty() {
            return bad("target_modules is empty".into());
        }
        for t in &self.target_modules {
            if !TARGETS.contains(&t.as_str()) {
                return bad(format!(
                    "unknown target module `{t}` (one of {})",
                    TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// What the adapter is for, as PEFT's `task_type` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    /// A language model (`CAUSAL_LM`).
    CausalLm,
    /// A reward model: the score head is saved whole beside the adapters (`SEQ_CLS`).
    SeqCls,
}

fn adapter_error(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::NotACheckpoint {
        path: path.to_path_buf(),
        reason,
    }
}

/// `dir/adapter_config.json`'s path and its JSON, unchecked.
fn raw_config(dir: &Path) -> Result<(std::path::PathBuf, serde_json::Value)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::io(&path, e))?;
    let raw = serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
        path: path.clone(),
        source: e,
    })?;
    Ok((path, raw))
}

/// Reads and checks `dir/adapter_config.json`. Adapters whose math hearth does not apply
/// (another PEFT type, DoRA, transposed weights, per-module ranks or alphas) are refused.
pub fn read_config(dir: &Path) -> Result<LoraSettings> {
    let (path, raw) = raw_config(dir)?;
    let field = |key: &str| raw.get(key).filter(|v| !v.is_null());
    if let Some(kind) = field("peft_type")
        .and_then(|v| v.as_str())
        .filter(|k| *k != "LORA")
    {
        return Err(adapter_error(
            &path,
            format!("peft_type `{kind}` is not LORA"),
        ));
    }
    for (key, off) in [
        ("use_dora", serde_json::Value::Bool(false)),
        ("fan_in_fan_out", serde_json::Value::Bool(false)),
    ] {
        if let Some(v) = field(key).filter(|v| **v != off) {
            return Err(adapter_error(
                &path,
                format!("`{key}` = {v} is not supported"),
            ));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(key)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(adapter_error(
                &path,
                format!("per-module `{key}` is not supported"),
            ));
        }
    }
    let settings: LoraSettings =
        serde_json::from_value(raw.clone()).map_err(|e| adapter_error(&path, e.to_string()))?;
    settings
        .validate(&path.display().to_string())
        .map_err(|reason| CheckpointError::Invalid { reason })?;
    Ok(settings)
}

/// Checks `layers_to_transform` of `dir/adapter_config.json` against a model of `layers`
/// decoder layers. Absent, `null` or naming every layer, the adapter applies everywhere, as
/// hearth applies it; a layer the model lacks is an error, and so is a subset of the layers
/// (PEFT would leave the others, and the head, without adapters; hearth does not).
pub fn check_layers_to_transform(dir: &Path, layers: usize) -> Result<()> {
    let (path, raw) = raw_config(dir)?;
    let bad = |reason: String| adapter_error(&path, format!("`layers_to_transform`: {reason}"));
    let listed: Vec<u64> = match raw.get("layers_to_transform") {
        None | Some(serde_json::Value::Null) => return Ok(()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| bad(format!("{v} is not a layer index")))
            })
            .collect::<Result<_>>()?,
        Some(v) => vec![
            v.as_u64()
                .ok_or_else(|| bad(format!("{v} is not a layer index or a list of them")))?,
        ],
    };
    if let Some(&layer) = listed.iter().find(|&&l| l >= layers as u64) {
        return Err(bad(format!(
            "names layer {layer}, but the model has {layers} layers (0 to {})",
            layers.saturating_sub(1)
        )));
    }
    let named: std::collections::BTreeSet<u64> = listed.into_iter().collect();
    if named.len() != layers {
        return Err(bad(format!(
            "adapters on {} of the model's {layers} layers are not supported; hearth applies \
             an adapter to every layer",
            named.len()
        )));
    }
    Ok(())
}

/// Writes `dir/adapter_config.json` as PEFT writes it for `settings`.
pub fn write_config(
    dir: &Path,
    settings: &LoraSettings,
    task: TaskType,
    base_model: &str,
) -> Result<()> {
    let (task, modules_to_save) = match task {
        TaskType::SeqCls => ("SEQ_CLS", serde_json::json!(["score"])),
        TaskType::CausalLm => ("CAUSAL_LM", serde_json::Value::Null),
    };
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "target_modules": settings.target_modules,
        "use_rslora": settings.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": modules_to_save,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    crate::write_text(&dir.join(CONFIG_FILE), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LoraSettings {
        LoraSettings {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.05,
            target_modules: vec!["q_proj".into(), "embed_tokens".into()],
            use_rslora: false,
        }
    }

    #[test]
    fn config_round_trips_and_scales() {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), &settings(), TaskType::SeqCls, "base").unwrap();
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!(raw["task_type"], "SEQ_CLS");
        assert_eq!(raw["modules_to_save"], serde_json::json!(["score"]));
        let read = read_config(dir.path()).unwrap();
        assert_eq!(read, settings());
        assert_eq!(read.scale(), 2.0);
        let rs = LoraSettings {
            use_rslora: true,
            ..settings()
        };
        assert_eq!(rs.scale(), 4.0);
        assert_eq!(
            lora_key("model.layers.0.self_attn.q_proj", "A"),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            embedding_key("B"),
            "base_model.model.model.embed_tokens.lora_embedding_B"
        );
    }

    #[test]
    fn layers_to_transform_must_name_every_layer_of_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let check = |json: &str| {
            std::fs::write(dir.path().join(CONFIG_FILE), json).unwrap();
            check_layers_to_transform(dir.path(), 4).map_err(|e| e.to_string())
        };
        for ok in [
            r#"{}"#,
            r#"{"layers_to_transform":null}"#,
            r#"{"layers_to_transform":[3,2,1,0]}"#,
        ] {
            check(ok).unwrap();
        }
        for (json, want) in [
            (r#"{"layers_to_transform":[0,1,2,3,7]}"#, "names layer 7"),
            (r#"{"layers_to_transform":9}"#, "names layer 9"),
            (
                r#"{"layers_to_transform":[0,2]}"#,
                "on 2 of the model's 4 layers",
            ),
            (r#"{"layers_to_transform":"0"}"#, "not a layer index"),
            (r#"{"layers_to_transform":[-1]}"#, "-1 is not a layer index"),
        ] {
            let m = check(json).unwrap_err();
            assert!(
                m.contains(CONFIG_FILE) && m.contains("`layers_to_transform`") && m.contains(want),
                "{json}: {m}"
            );
        }
    }

    #[test]
    fn unsupported_adapters_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        for (json, want) in [
            (r#"{"peft_type":"IA3"}"#, "peft_type `IA3` is not LORA"),
            (r#"{"use_dora":true}"#, "`use_dora` = true is not supported"),
            (
                r#"{"rank_pattern":{"q_proj":8}}"#,
                "per-module `rank_pattern` is not supported",
            ),
            (
                r#"{"r":0,"lora_alpha":1,"target_modules":["q_proj"]}"#,
                "LoRA rank `r` must be positive",
            ),
            (
                r#"{"r":2,"lora_alpha":1,"target_modules":["qq"]}"#,
                "unknown target module `qq`",
            ),
        ] {
            std::fs::write(dir.path().join(CONFIG_FILE), json).unwrap();
            let err = read_config(dir.path()).unwrap_err().to_string();
            assert!(err.contains(CONFIG_FILE) && err.contains(want), "{err}");
        }
    }
}
