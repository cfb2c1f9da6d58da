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
    /// PEFT's `layers_to_transform`: the decoder layers that carry adapters, ascending;
    /// `None` for all of them. With a list, modules outside the layers (the head, the
    /// embeddings) carry none, as in PEFT. PEFT writes an index or a list, so
    /// [`read_config`] reads it by hand.
    #[serde(skip)]
    pub layers_to_transform: Option<Vec<usize>>,
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

    /// Whether the module `name` (a projection, `lm_head` or `embed_tokens`) of decoder
    /// layer `layer` (`None` outside the layers) carries an adapter.
    pub fn targets(&self, name: &str, layer: Option<usize>) -> bool {
        let in_layers = match (&self.layers_to_transform, layer) {
            (None, _) => true,
            (Some(listed), Some(layer)) => listed.contains(&layer),
            (Some(_), None) => false,
        };
        in_layers && self.target_modules.iter().any(|t| t == name)
    }

    /// Refuses a `layers_to_transform` that names a layer a model of `layers` decoder
    /// layers lacks; `origin` starts the message.
    pub fn check_layers(&self, origin: &str, layers: usize) -> std::result::Result<(), String> {
        match self
            .layers_to_transform
            .iter()
            .flatten()
            .find(|&&l| l >= layers)
        {
            Some(layer) => Err(format!(
                "{origin}: `layers_to_transform` names layer {layer}, but the model has {layers} \
                 layers (0 to {})",
                layers.saturating_sub(1)
            )),
            None => Ok(()),
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
        if self.layers_to_transform.as_ref().is_some_and(Vec::is_empty) {
            // PEFT finds no module to adapt and refuses the config.
            return bad("`layers_to_transform` is empty: name at least one layer".into());
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

/// Each setting hearth reads, checked for its type on its own so that an error names the
/// key (serde's message for the whole struct says only "invalid type: string, expected
/// f64"), and the file checked to be an object at all.
fn check_field_types(raw: &serde_json::Value) -> std::result::Result<(), String> {
    use serde::de::DeserializeOwned;
    const REQUIRED: [&str; 3] = ["r", "lora_alpha", "target_modules"];
    fn check<T: DeserializeOwned>(
        obj: &serde_json::Map<String, serde_json::Value>,
        key: &str,
    ) -> std::result::Result<(), String> {
        match obj.get(key) {
            None => Ok(()),
            Some(serde_json::Value::Null) if REQUIRED.contains(&key) => {
                Err(format!("`{key}` is null; it must be set"))
            }
            Some(serde_json::Value::Null) => Ok(()),
            Some(v) => serde_json::from_value::<T>(v.clone())
                .map(|_| ())
                .map_err(|e| format!("`{key}`: {e}")),
        }
    }
    let obj = raw
        .as_object()
        .ok_or("expected a JSON object (PEFT's LoraConfig), not this value")?;
    if obj.get("target_modules").is_some_and(|v| v.is_string()) {
        return Err(
            "`target_modules` is a string (a pattern PEFT matches against module \
                    paths), which hearth does not read: list the modules, e.g. \
                    [\"q_proj\", \"v_proj\"]"
                .into(),
        );
    }
    check::<usize>(obj, "r")?;
    check::<f64>(obj, "lora_alpha")?;
    check::<f64>(obj, "lora_dropout")?;
    check::<Vec<String>>(obj, "target_modules")?;
    check::<bool>(obj, "use_rslora")
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
    check_field_types(&raw).map_err(|reason| adapter_error(&path, reason))?;
    // An optional setting written as null (PEFT writes null for what it leaves unset)
    // takes its default.
    let mut present = raw.clone();
    if let Some(obj) = present.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
    }
    let mut settings: LoraSettings =
        serde_json::from_value(present).map_err(|e| adapter_error(&path, e.to_string()))?;
    settings.layers_to_transform = layers_to_transform(&raw)
        .map_err(|reason| adapter_error(&path, format!("`layers_to_transform`: {reason}")))?;
    if settings.layers_to_transform.is_some() {
        // PEFT finds a module's layer by `layers_pattern` (`layers` in a Llama); another
        // pattern matches no module of this model.
        let pattern = field("layers_pattern");
        let llama = |v: &serde_json::Value| v == "layers" || *v == serde_json::json!(["layers"]);
        if let Some(p) = pattern.filter(|p| !llama(p)) {
            return Err(adapter_error(
                &path,
                format!("`layers_pattern` {p} matches no layer of a Llama model (`layers`)"),
            ));
        }
    }
    settings
        .validate(&path.display().to_string())
        .map_err(|reason| CheckpointError::Invalid { reason })?;
    Ok(settings)
}

/// PEFT's `layers_to_transform` (absent or `null`, an index, or a list of them) as
/// sorted distinct layers.
fn layers_to_transform(raw: &serde_json::Value) -> std::result::Result<Option<Vec<usize>>, String> {
    let index = |v: &serde_json::Value| {
        v.as_u64()
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| format!("{v} is not a layer index"))
    };
    let listed = match raw.get("layers_to_transform") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(index)
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(v) => vec![index(v).map_err(|e| format!("{e} or a list of them"))?],
    };
    Ok(Some(distinct_layers(listed)))
}

/// Layers as [`LoraSettings::layers_to_transform`] holds them: ascending, each once, however
/// a recipe or a PEFT config listed them.
pub fn distinct_layers(mut layers: Vec<usize>) -> Vec<usize> {
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// What `dir`'s adapter says it is for: PEFT's `task_type`, `SEQ_CLS` for a reward model's
/// adapter and a language model's for anything else (or none).
pub fn read_task(dir: &Path) -> Result<TaskType> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::io(&path, e))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| adapter_error(&path, e.to_string()))?;
    Ok(match raw.get("task_type").and_then(|t| t.as_str()) {
        Some("SEQ_CLS") => TaskType::SeqCls,
        _ => TaskType::CausalLm,
    })
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
        "layers_to_transform": settings.layers_to_transform,
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
            layers_to_transform: None,
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
    fn layers_to_transform_reads_as_peft_writes_it_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let read = |extra: &str| {
            let json =
                format!(r#"{{"r":2,"lora_alpha":4,"target_modules":["q_proj","lm_head"]{extra}}}"#);
            std::fs::write(dir.path().join(CONFIG_FILE), json).unwrap();
            read_config(dir.path()).map_err(|e| e.to_string())
        };
        let layers = |extra: &str| read(extra).unwrap().layers_to_transform;
        assert_eq!(layers(""), None);
        assert_eq!(layers(r#","layers_to_transform":null"#), None);
        assert_eq!(layers(r#","layers_to_transform":2"#), Some(vec![2]));
        assert_eq!(
            layers(r#","layers_to_transform":[3,1,3],"layers_pattern":"layers""#),
            Some(vec![1, 3])
        );
        assert_eq!(
            layers(r#","layers_to_transform":[0],"layers_pattern":["layers"]"#),
            Some(vec![0])
        );
        for (extra, want) in [
            (
                r#","layers_to_transform":"0""#,
                "\"0\" is not a layer index or a list",
            ),
            (r#","layers_to_transform":[-1]"#, "-1 is not a layer index"),
            (
                r#","layers_to_transform":[]"#,
                "`layers_to_transform` is empty",
            ),
            (
                r#","layers_to_transform":[0],"layers_pattern":"h""#,
                "`layers_pattern` \"h\" matches no layer",
            ),
        ] {
            let m = read(extra).unwrap_err();
            assert!(m.contains(CONFIG_FILE) && m.contains(want), "{extra}: {m}");
        }

        // Only the listed layers' projections carry adapters; the head, in no layer, none.
        let s = read(r#","layers_to_transform":[1,3]"#).unwrap();
        assert!(s.targets("q_proj", Some(1)) && s.targets("q_proj", Some(3)));
        assert!(!s.targets("q_proj", Some(0)) && !s.targets("k_proj", Some(1)));
        assert!(!s.targets("lm_head", None));
        let every = LoraSettings {
            layers_to_transform: None,
            ..s.clone()
        };
        assert!(every.targets("q_proj", Some(0)) && every.targets("lm_head", None));
        assert!(s.check_layers("adapter", 4).is_ok());
        let m = s.check_layers("adapter", 3).unwrap_err();
        assert!(
            m.contains("names layer 3, but the model has 3 layers (0 to 2)"),
            "{m}"
        );

        // Written as PEFT writes it, and read back the same.
        write_config(dir.path(), &s, TaskType::CausalLm, "base").unwrap();
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!(raw["layers_to_transform"], serde_json::json!([1, 3]));
        assert_eq!(read_config(dir.path()).unwrap(), s);
        write_config(dir.path(), &every, TaskType::CausalLm, "base").unwrap();
        assert_eq!(read_config(dir.path()).unwrap(), every);
    }

    /// Optional settings written as null take their defaults.
    #[test]
    fn null_optional_settings_take_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"lora_dropout":null,"use_rslora":null}"#,
        )
        .unwrap();
        let s = read_config(dir.path()).unwrap();
        assert_eq!((s.lora_dropout, s.use_rslora, s.scale()), (0.0, false, 2.0));
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
            // A value of the wrong type names its key; the file must be an object.
            (
                r#"{"r":2,"lora_alpha":"32","target_modules":["q_proj"]}"#,
                "`lora_alpha`: invalid type: string \"32\"",
            ),
            (
                r#"{"r":2,"lora_alpha":1,"target_modules":"q_proj"}"#,
                "`target_modules` is a string",
            ),
            ("[]", "expected a JSON object"),
            (
                r#"{"r":null,"lora_alpha":1,"target_modules":["q_proj"]}"#,
                "`r` is null",
            ),
        ] {
            std::fs::write(dir.path().join(CONFIG_FILE), json).unwrap();
            let err = read_config(dir.path()).unwrap_err().to_string();
            assert!(err.contains(CONFIG_FILE) && err.contains(want), "{err}");
        }
    }
}
