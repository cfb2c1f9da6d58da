//! `config.json` of the Llama family, read in both the Hub's style (top-level `rope_theta`,
//! `rope_scaling`, `torch_dtype`) and transformers ≥ 5's (`rope_parameters`, `dtype`).
//!
//! Anything that would change the model's math and that hearth does not implement is refused
//! here, by name, rather than silently computing a different model.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{CheckpointError, Result};

/// The architectures hearth implements. They differ only in defaults and biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Qwen2,
    Mistral,
}

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Mistral => "mistral",
        }
    }
}

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's band-wise rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Storage dtype of the weights on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    BF16,
}

impl WeightDtype {
    /// The name transformers writes into `dtype` / `torch_dtype`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "float" | "fp32" => Some(Self::F32),
            "float16" | "half" | "fp16" => Some(Self::F16),
            "bfloat16" | "bf16" => Some(Self::BF16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// A validated model configuration. `raw` keeps the original JSON so that saving a loaded
/// checkpoint writes back every key, including ones hearth does not read.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per layer: the sliding attention window, if that layer uses one.
    pub sliding_windows: Vec<Option<usize>>,
    pub dtype: WeightDtype,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `Some(num_labels)` for a `*ForSequenceClassification` checkpoint: a `score` head of
    /// that many rows and no `lm_head`.
    pub score_labels: Option<usize>,
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// Reads and validates `config.json` (a file, or a directory holding one), or the
    /// configuration in a GGUF file's metadata (a `.gguf` file, or a directory holding one).
    pub fn from_path(path: &Path) -> Result<Self> {
        if let Some(gguf) = crate::gguf::locate(path)? {
            let model = crate::gguf::GgufModel::open(&gguf)?;
            return Self::from_json_str(&model.config_json()?, &gguf);
        }
        let path = if path.is_dir() {
            path.join(crate::names::CONFIG)
        } else {
            path.to_path_buf()
        };
        let bytes = crate::small_file::read(&path, crate::small_file::TEXT_LIMIT)
            .map_err(|e| CheckpointError::io(&path, e))?;
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let text = std::str::from_utf8(bytes).map_err(|e| CheckpointError::NotACheckpoint {
            path: path.clone(),
            reason: format!("not a config.json (not UTF-8 text: {e})"),
        })?;
        Self::from_json_str(text, &path)
    }

    /// Parses a config from its JSON text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| CheckpointError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(raw) = value else {
            return Err(field_err(path, "<root>", "expected a JSON object"));
        };
        Parser { path, raw: &raw }.parse()
    }

    /// Number of query heads sharing one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The token batches are padded with: the config's pad token, else its first
    /// end-of-sequence token (as transformers' reward trainers set it), else 0.
    pub fn padding_id(&self) -> u32 {
        self.pad_token_id
            .or(self.eos_token_ids.first().copied())
            .unwrap_or(0)
    }

    /// This config as a one-label `*ForSequenceClassification` reward model, the way
    /// transformers' `AutoModelForSequenceClassification` expects it: `num_labels` 1 and a
    /// `pad_token_id` so the score can be read at the last non-pad token.
    pub fn as_reward_model(&self, pad_token_id: u32) -> Self {
        let mut out = self.clone();
        let arch = match self.model_type {
            ModelType::Llama => "LlamaForSequenceClassification",
            ModelType::Qwen2 => "Qwen2ForSequenceClassification",
            ModelType::Mistral => "MistralForSequenceClassification",
        };
        out.raw
            .insert("architectures".into(), Value::from(vec![Value::from(arch)]));
        out.raw.insert("num_labels".into(), Value::from(1));
        out.raw
            .insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        out.raw
            .insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        out.raw
            .insert("pad_token_id".into(), Value::from(pad_token_id));
        out.pad_token_id = Some(pad_token_id);
        out.score_labels = Some(1);
        out
    }

    /// This config with a head of its own beside the embeddings.
    pub fn untied(&self) -> Self {
        let mut out = self.clone();
        out.raw
            .insert("tie_word_embeddings".into(), Value::from(false));
        out.tie_word_embeddings = false;
        out
    }

    /// Writes `config.json` into `dir`: the original keys with `dtype` set to `dtype`, and
    /// `torch_dtype` too when the original used the Hub's style.
    pub fn to_json(&self, dtype: WeightDtype) -> String {
        let mut raw = self.raw.clone();
        raw.insert("dtype".into(), Value::from(dtype.hf_name()));
        if raw.contains_key("torch_dtype") {
            raw.insert("torch_dtype".into(), Value::from(dtype.hf_name()));
            raw.remove("dtype");
        }
        let mut text = serde_json::to_string_pretty(&Value::Object(raw)).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// The most decoder layers a config may declare. The deepest Llama-family checkpoints have
/// about 126; a count far past that is a damaged file, and is refused before anything is
/// allocated per layer (a count of 10¹⁰ would otherwise ask for hundreds of GB at once).
pub const MAX_LAYERS: usize = 4096;

/// Why `layers` cannot be a layer count, if it cannot.
pub(crate) fn bad_layer_count(layers: u64) -> Option<String> {
    match layers {
        0 => Some("must be positive".into()),
        n if n > MAX_LAYERS as u64 => Some(format!(
            "{n} layers is past the {MAX_LAYERS} a config may declare; the file is damaged"
        )),
        _ => None,
    }
}

fn field_err(path: &Path, field: &str, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

struct Parser<'a> {
    path: &'a Path,
    raw: &'a Map<String, Value>,
}

impl Parser<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> CheckpointError {
        field_err(self.path, field, reason)
    }

    fn unsupported(&self, key: &str, value: &Value, hint: &str) -> CheckpointError {
        CheckpointError::UnsupportedConfig {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!(" ({hint})")
            },
        }
    }

    /// A value that is absent or JSON `null` counts as not given.
    fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        let n = self
            .usize_opt(key)?
            .ok_or_else(|| self.err(key, "missing"))?;
        if n == 0 {
            return Err(self.err(key, "must be positive"));
        }
        Ok(n)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    /// `v` when it is a finite positive number; anything else would make the model NaN.
    fn positive(&self, key: &str, v: f64) -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(self.err(
                key,
                format!("{v} would make the model's outputs NaN; it must be a positive number"),
            ))
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    /// The ids of `key`: one id or a list, each inside the vocabulary.
    fn token_ids(&self, key: &str, vocab_size: usize) -> Result<Vec<u32>> {
        let bad = || self.err(key, "expected a token id or a list of token ids");
        let ids: Vec<u64> = match self.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().ok_or_else(bad))
                .collect::<Result<_>>()?,
            Some(v) => vec![v.as_u64().ok_or_else(bad)?],
        };
        ids.into_iter()
            .map(|id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&id| (id as usize) < vocab_size)
                    .ok_or_else(|| {
                        self.err(
                            key,
                            format!("token id {id} is outside vocab_size {vocab_size}"),
                        )
                    })
            })
            .collect()
    }

    fn parse(&self) -> Result<ModelConfig> {
        let model_type = match self.get("model_type").and_then(Value::as_str) {
            Some("llama") => ModelType::Llama,
            Some("qwen2") => ModelType::Qwen2,
            Some("mistral") => ModelType::Mistral,
            Some(other) => {
                return Err(CheckpointError::UnsupportedModelType {
                    path: self.path.to_path_buf(),
                    model_type: other.to_string(),
                });
            }
            None => return Err(self.err("model_type", "missing")),
        };
        self.refuse_unsupported()?;

        let hidden_size = self.usize_req("hidden_size")?;
        let num_attention_heads = self.usize_req("num_attention_heads")?;
        let num_key_value_heads = self
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match self.usize_opt("head_dim")? {
            Some(d) if d > 0 => d,
            Some(_) => return Err(self.err("head_dim", "must be positive")),
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(self.err(
                    "head_dim",
                    "missing, and hidden_size is not divisible by num_attention_heads",
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.err("head_dim", format!("{head_dim} is odd; RoPE needs pairs")));
        }
        // Checked before anything is made per layer.
        let num_hidden_layers = self.usize_req("num_hidden_layers")?;
        if let Some(reason) = bad_layer_count(num_hidden_layers as u64) {
            return Err(self.err("num_hidden_layers", reason));
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        let attention_bias = self.bool_opt("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match model_type {
            // Qwen2 hard-codes biases on q, k and v and none on o.
            ModelType::Qwen2 => (true, false),
            ModelType::Mistral => (false, false),
            ModelType::Llama => (attention_bias, attention_bias),
        };
        let mlp_bias = match model_type {
            ModelType::Llama => self.bool_opt("mlp_bias")?.unwrap_or(false),
            _ => false,
        };
        let dtype_key = if self.get("dtype").is_some() {
            "dtype"
        } else {
            "torch_dtype"
        };
        let dtype = match self.get(dtype_key) {
            None => WeightDtype::F32,
            Some(v) => v
                .as_str()
                .and_then(WeightDtype::from_hf_name)
                .ok_or_else(|| self.err(dtype_key, format!("unsupported dtype {v}")))?,
        };
        let vocab_size = self.usize_req("vocab_size")?;
        let bos_token_id = self.token_ids("bos_token_id", vocab_size)?.first().copied();
        let pad_token_id = self.token_ids("pad_token_id", vocab_size)?.first().copied();
        let eos_token_ids = self.token_ids("eos_token_id", vocab_size)?;
        let max_position_embeddings = match self.usize_opt("max_position_embeddings")? {
            Some(0) => {
                return Err(self.err(
                    "max_position_embeddings",
                    "must be positive: a model of context 0 reads no token",
                ));
            }
            n => n.unwrap_or(2048),
        };

        Ok(ModelConfig {
            model_type,
            vocab_size,
            hidden_size,
            intermediate_size: self.usize_req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.positive(
                "rms_norm_eps",
                self.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            )?,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: self.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_windows: self.sliding_windows(model_type, num_hidden_layers)?,
            dtype,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            score_labels: self.score_labels()?,
            raw: self.raw.clone(),
        })
    }

    /// The label count of a sequence-classification checkpoint, as transformers reads it:
    /// `num_labels`, else the size of `id2label`, else its default of 2.
    fn score_labels(&self) -> Result<Option<usize>> {
        let classifier = self
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .is_some_and(|a| a.ends_with("ForSequenceClassification"));
        if !classifier {
            return Ok(None);
        }
        if let Some(n) = self.usize_opt("num_labels")? {
            return Ok(Some(n));
        }
        Ok(Some(
            self.get("id2label")
                .and_then(Value::as_object)
                .map_or(2, |m| m.len()),
        ))
    }

    /// Keys whose presence means a computation hearth does not do.
    fn refuse_unsupported(&self) -> Result<()> {
        if let Some(v) = self.get("hidden_act")
            && v.as_str() != Some("silu")
        {
            return Err(self.unsupported("hidden_act", v, "only silu is implemented"));
        }
        if let Some(v) = self.get("quantization_config") {
            return Err(self.unsupported(
                "quantization_config",
                v,
                "load unquantized f32/f16/bf16 weights",
            ));
        }
        if let Some(v) = self.get("partial_rotary_factor")
            && v.as_f64() != Some(1.0)
        {
            return Err(self.unsupported("partial_rotary_factor", v, "only full rotary"));
        }
        for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if let Some(v) = self.get(key) {
                return Err(self.unsupported(key, v, ""));
            }
        }
        Ok(())
    }

    /// `(rope_theta, scaling)` from either config style.
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        // transformers >= 5 nests everything under `rope_parameters`; the Hub's style keeps
        // `rope_theta` at top level and scaling in `rope_scaling`.
        let (key, params) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(p), _) => ("rope_parameters", Some(p)),
            (None, s) => ("rope_scaling", s),
        };
        let params = match params {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => return Err(self.err(key, format!("expected an object, got {v}"))),
        };
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.f64_opt("rope_theta")?)
            .unwrap_or(10_000.0);
        let theta = self.positive("rope_theta", theta)?;
        let Some(p) = params else {
            return Ok((theta, RopeScaling::Default));
        };
        let kind = match p.get("rope_type").or_else(|| p.get("type")) {
            Some(Value::String(kind)) => kind.as_str(),
            Some(v) => {
                return Err(self.err(
                    &format!("{key}.rope_type"),
                    format!("expected a name, got {v}"),
                ));
            }
            // Only `rope_theta` (transformers ≥ 5 keeps it here) means plain RoPE; any other
            // setting without a type is refused, as transformers refuses it, rather than
            // dropped.
            None if p.keys().all(|k| k == "rope_theta") => "default",
            None => {
                return Err(self.err(
                    &format!("{key}.rope_type"),
                    "missing: scaling settings without a type (default, linear or llama3)",
                ));
            }
        };
        // Every scaling number divides or scales frequencies: zero, negative or non-finite
        // values give NaN logits, so they are refused here.
        let num = |name: &str| -> Result<f64> {
            let field = format!("{key}.{name}");
            let v = p
                .get(name)
                .and_then(Value::as_f64)
                .ok_or_else(|| self.err(&field, "missing or not a number"))?;
            self.positive(&field, v)
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(self.err(
                        &format!("{key}.high_freq_factor"),
                        format!("{high} must exceed low_freq_factor {low}"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?
                        as usize,
                }
            }
            other => {
                return Err(self.unsupported(
                    &format!("{key}.rope_type"),
                    &Value::from(other),
                    "supported: default, linear, llama3",
                ));
            }
        };
        Ok((theta, scaling))
    }

    /// Which layers attend within a sliding window, following transformers' rules per
    /// architecture (and `layer_types` when the config lists them).
    fn sliding_windows(&self, model_type: ModelType, layers: usize) -> Result<Vec<Option<usize>>> {
        let window = self.usize_opt("sliding_window")?;
        if window == Some(0) {
            return Err(self.err(
                "sliding_window",
                "0 lets no token see any other, which makes the outputs NaN; it must be positive",
            ));
        }
        if let Some(types) = self.get("layer_types") {
            let types = types
                .as_array()
                .filter(|t| t.len() == layers)
                .ok_or_else(|| {
                    self.err(
                        "layer_types",
                        format!("expected a list of {layers} layer types"),
                    )
                })?;
            return types
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(None),
                    Some("sliding_attention") => window
                        .map(Some)
                        .ok_or_else(|| self.err("sliding_window", "missing for sliding layers")),
                    _ => Err(self.unsupported("layer_types", t, "")),
                })
                .collect();
        }
        Ok(match model_type {
            ModelType::Llama => vec![None; layers],
            ModelType::Mistral => vec![window; layers],
            ModelType::Qwen2 => {
                let used = self.bool_opt("use_sliding_window")?.unwrap_or(false);
                let from = self.usize_opt("max_window_layers")?.unwrap_or(layers);
                (0..layers)
                    .map(|i| window.filter(|_| used && i >= from))
                    .collect()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::from_json_str(&json.to_string(), Path::new("dir/config.json"))
    }

    fn base(model_type: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2
        })
    }

    #[test]
    fn both_config_styles_read_the_same_rope_and_dtype() {
        let mut hub = base("llama");
        hub["rope_theta"] = 500000.0.into();
        hub["torch_dtype"] = "bfloat16".into();
        hub["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        });
        let mut v5 = base("llama");
        v5["dtype"] = "bfloat16".into();
        v5["rope_parameters"] = serde_json::json!({
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192
        });
        let (a, b) = (parse(hub).unwrap(), parse(v5).unwrap());
        for c in [&a, &b] {
            assert_eq!(c.rope_theta, 500000.0);
            assert_eq!(c.dtype, WeightDtype::BF16);
            assert_eq!(
                c.rope_scaling,
                RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192
                }
            );
        }
        // Old-style `type` key, linear scaling.
        let mut old = base("llama");
        old["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        assert_eq!(
            parse(old).unwrap().rope_scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
    }

    #[test]
    fn defaults_and_derived_values() {
        let c = parse(base("llama")).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.group_size(), 4);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert_eq!(c.dtype, WeightDtype::F32);
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!(c.sliding_windows, vec![None; 4]);
        let mut explicit = base("llama");
        explicit["head_dim"] = 32.into();
        explicit["eos_token_id"] = serde_json::json!([3, 4]);
        explicit["attention_bias"] = true.into();
        explicit["mlp_bias"] = true.into();
        let c = parse(explicit).unwrap();
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.eos_token_ids, vec![3, 4]);
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
    }

    #[test]
    fn architectures_set_their_biases_and_windows() {
        let qwen = parse(base("qwen2")).unwrap();
        assert!(qwen.qkv_bias && !qwen.o_bias && !qwen.mlp_bias);
        assert_eq!(qwen.sliding_windows, vec![None; 4]);

        let mut qwen_sliding = base("qwen2");
        qwen_sliding["use_sliding_window"] = true.into();
        qwen_sliding["sliding_window"] = 16.into();
        qwen_sliding["max_window_layers"] = 2.into();
        let c = parse(qwen_sliding).unwrap();
        assert_eq!(c.sliding_windows, vec![None, None, Some(16), Some(16)]);

        let mut mistral = base("mistral");
        mistral["sliding_window"] = 4096.into();
        mistral["attention_bias"] = true.into();
        let c = parse(mistral).unwrap();
        assert_eq!(c.sliding_windows, vec![Some(4096); 4]);
        assert!(!c.qkv_bias, "Mistral has no attention biases");

        let mut typed = base("qwen2");
        typed["sliding_window"] = 8.into();
        typed["layer_types"] = serde_json::json!([
            "full_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention"
        ]);
        assert_eq!(
            parse(typed).unwrap().sliding_windows,
            vec![None, Some(8), None, Some(8)]
        );
    }

    fn message(json: serde_json::Value) -> String {
        parse(json).unwrap_err().to_string()
    }

    #[test]
    fn values_that_make_the_model_nan_are_refused_by_name() {
        for (key, value) in [
            ("rms_norm_eps", serde_json::json!(-1.0)),
            ("rms_norm_eps", serde_json::json!(0.0)),
            ("rope_theta", serde_json::json!(-10000.0)),
            ("sliding_window", serde_json::json!(0)),
        ] {
            let mut c = base("mistral");
            c[key] = value.clone();
            let m = message(c);
            assert!(
                m.contains(&format!("`{key}`")) && m.contains("NaN"),
                "{key}={value}: {m}"
            );
        }
        let mut c = base("llama");
        c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 0.0});
        assert!(message(c).contains("`rope_scaling.factor`"));
        let mut c = base("llama");
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 4.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        assert!(message(c).contains("`rope_scaling.high_freq_factor`"));
    }

    #[test]
    fn a_truncated_gguf_file_is_read_as_gguf_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"GGUF\x03\x00\x00\x00rest").unwrap();
        let m = ModelConfig::from_path(&path).unwrap_err().to_string();
        assert!(m.contains("model.gguf") && m.contains("truncated"), "{m}");
        assert!(!m.contains("JSON") && !m.contains('\n'), "{m}");
    }

    #[test]
    fn math_changing_keys_are_refused_by_name() {
        let mut c = base("gemma");
        assert!(message(c.clone()).contains("model_type `gemma`"));
        c = base("llama");
        c["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
        let m = message(c);
        assert!(
            m.contains("rope_scaling.rope_type") && m.contains("dynamic"),
            "{m}"
        );
        c = base("llama");
        c["hidden_act"] = "gelu".into();
        assert!(message(c).contains("`hidden_act`"));
        c = base("llama");
        c["quantization_config"] = serde_json::json!({"quant_method": "bitsandbytes"});
        assert!(message(c).contains("quantization_config"));
        c = base("llama");
        c["num_key_value_heads"] = 3.into();
        assert!(message(c).contains("num_key_value_heads"));
        c = base("llama");
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        assert!(message(c).contains("rope_scaling.low_freq_factor"));
        c = base("llama");
        c["eos_token_id"] = 100.into();
        assert!(message(c).contains("outside vocab_size"));
        c = base("llama");
        c.as_object_mut().unwrap().remove("hidden_size");
        let m = message(c);
        assert!(
            m.contains("dir/config.json") && m.contains("`hidden_size`: missing"),
            "{m}"
        );
    }

    #[test]
    fn a_layer_count_past_the_bound_is_refused_before_any_per_layer_allocation() {
        // u64::MAX used to overflow `vec![None; layers]`; 10¹⁰ asked for 160 GB at once.
        for layers in [
            serde_json::json!(u64::MAX),
            serde_json::json!(10_000_000_000u64),
        ] {
            let mut c = base("mistral");
            c["num_hidden_layers"] = layers.clone();
            let m = message(c);
            assert!(
                m.contains("`num_hidden_layers`") && m.contains(&layers.to_string()),
                "{m}"
            );
        }
        let mut c = base("llama");
        c["num_hidden_layers"] = (MAX_LAYERS + 1).into();
        assert!(message(c).contains("`num_hidden_layers`"));
        let mut c = base("llama");
        c["num_hidden_layers"] = MAX_LAYERS.into();
        assert_eq!(parse(c).unwrap().sliding_windows.len(), MAX_LAYERS);
    }

    #[test]
    fn values_that_would_be_altered_silently_are_refused() {
        // An id past 2^32 was truncated to a small one that fits the vocabulary.
        for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
            let mut c = base("llama");
            c[key] = serde_json::json!(4_294_967_300u64);
            let m = message(c);
            assert!(
                m.contains(&format!("`{key}`")) && m.contains("4294967300"),
                "{m}"
            );
        }
        let mut c = base("llama");
        c["eos_token_id"] = serde_json::json!([3, 4_294_967_300u64]);
        assert!(message(c).contains("4294967300"));
        // Scaling without a type: transformers refuses it, hearth did plain RoPE.
        let mut c = base("llama");
        c["rope_scaling"] = serde_json::json!({"factor": 8.0});
        let m = message(c);
        assert!(m.contains("`rope_scaling.rope_type`: missing"), "{m}");
        let mut c = base("llama");
        c["rope_parameters"] = serde_json::json!({"factor": 8.0, "rope_theta": 1e4});
        assert!(message(c).contains("`rope_parameters.rope_type`"));
        // transformers ≥ 5 may hold only the base there: plain RoPE.
        let mut c = base("llama");
        c["rope_parameters"] = serde_json::json!({"rope_theta": 5e5});
        let c = parse(c).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (5e5, RopeScaling::Default));
        let mut c = base("llama");
        c["max_position_embeddings"] = 0.into();
        assert!(message(c).contains("`max_position_embeddings`"));
    }

    #[test]
    fn saving_keeps_unknown_keys_and_the_original_style() {
        let mut hub = base("llama");
        hub["torch_dtype"] = "float32".into();
        hub["custom_key"] = "kept".into();
        let text = parse(hub).unwrap().to_json(WeightDtype::BF16);
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["torch_dtype"], "bfloat16");
        assert_eq!(back["custom_key"], "kept");
        assert!(back.get("dtype").is_none());
        let v5 = parse(base("llama")).unwrap().to_json(WeightDtype::F16);
        let back: serde_json::Value = serde_json::from_str(&v5).unwrap();
        assert_eq!(back["dtype"], "float16");
    }
}
