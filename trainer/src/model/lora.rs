//! LoRA adapters: `y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ` with `W` frozen, `A` `[r, in]`,
//! `B` `[out, r]` — PEFT's layout and initialisation, so adapters move between hearth and
//! PEFT unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use checkpoints::{OwnedTensor, WeightDtype, WeightFiles};
use serde::{Deserialize, Serialize};

use super::linear::Linear;
use super::llama::Llama;
use crate::{Result, TrainerError};

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

/// Every projection an adapter can sit on: the layers' seven and the output head.
pub const TARGETS: [&str; 8] = [
    LAYER_PROJECTIONS[0],
    LAYER_PROJECTIONS[1],
    LAYER_PROJECTIONS[2],
    LAYER_PROJECTIONS[3],
    LAYER_PROJECTIONS[4],
    LAYER_PROJECTIONS[5],
    LAYER_PROJECTIONS[6],
    "lm_head",
];

/// One adapter on one projection.
#[derive(Module, Debug)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Param<Tensor<2>>,
    /// `[out, r]`.
    pub b: Param<Tensor<2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

impl Lora {
    /// `s · dropout(x)·Aᵀ·Bᵀ`, `[..., in]` → `[..., out]`.
    pub fn delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let down =
            burn::tensor::module::linear(self.dropout.forward(x), self.a.val().transpose(), None);
        burn::tensor::module::linear(down, self.b.val().transpose(), None).mul_scalar(self.scale)
    }

    /// `s · B·A`, `[out, in]`: what merging adds to the base weight.
    pub fn merged_delta(&self) -> Tensor<2> {
        self.b.val().matmul(self.a.val()).mul_scalar(self.scale)
    }
}

/// A trainable factor whose parameter id depends only on its module path, so optimizer
/// state saved by one process finds its parameter again in the next (exact resume).
fn factor(module: &str, name: &str, value: Tensor<2>) -> Param<Tensor<2>> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("hearth.lora.{module}.{name}").bytes() {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut param = Param::from_tensor(value);
    param.id = ParamId::from(hash);
    param
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

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |msg: String| Err(TrainerError::Input(format!("{origin}: {msg}")));
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

/// Visits every projection of the model with its PEFT module path and short name.
fn for_each_projection(
    model: &mut Llama,
    mut f: impl FnMut(&str, &str, &mut Linear) -> Result<()>,
) -> Result<()> {
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let a = &mut layer.self_attn;
        for (name, proj) in [
            ("q_proj", &mut a.q_proj),
            ("k_proj", &mut a.k_proj),
            ("v_proj", &mut a.v_proj),
            ("o_proj", &mut a.o_proj),
        ] {
            f(&format!("model.layers.{i}.self_attn.{name}"), name, proj)?;
        }
        let m = &mut layer.mlp;
        for (name, proj) in [
            ("gate_proj", &mut m.gate_proj),
            ("up_proj", &mut m.up_proj),
            ("down_proj", &mut m.down_proj),
        ] {
            f(&format!("model.layers.{i}.mlp.{name}"), name, proj)?;
        }
    }
    if let Some(head) = &mut model.lm_head {
        f("lm_head", "lm_head", head)?;
    }
    Ok(())
}

fn projections(model: &Llama) -> Vec<(String, &Linear)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        let a = &layer.self_attn;
        for (name, proj) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
        ] {
            out.push((format!("model.layers.{i}.self_attn.{name}"), proj));
        }
        let m = &layer.mlp;
        for (name, proj) in [
            ("gate_proj", &m.gate_proj),
            ("up_proj", &m.up_proj),
            ("down_proj", &m.down_proj),
        ] {
            out.push((format!("model.layers.{i}.mlp.{name}"), proj));
        }
    }
    if let Some(head) = &model.lm_head {
        out.push(("lm_head".to_string(), head));
    }
    out
}

/// Freezes every base weight and attaches fresh adapters as PEFT initialises them: `A`
/// Kaiming-uniform (bound `1/√in`), `B` zero, so the adapted model starts equal to the base.
/// Random draws come from the device's seeded generator.
pub fn attach_lora(model: Llama, settings: &LoraSettings, device: &Device) -> Result<Llama> {
    settings.validate("lora")?;
    if settings.target_modules.iter().any(|t| t == "lm_head") && model.lm_head.is_none() {
        return Err(TrainerError::Input(
            "lora: `lm_head` is tied to the embeddings in this model and cannot take its own adapter".into(),
        ));
    }
    let mut model = model.no_grad();
    let scale = settings.scale();
    for_each_projection(&mut model, |module, name, proj| {
        if settings.target_modules.iter().any(|t| t == name) {
            let [out, inp] = proj.out_in();
            let bound = 1.0 / (inp as f64).sqrt();
            let a = Tensor::<2>::random(
                [settings.r, inp],
                Distribution::Uniform(-bound, bound),
                device,
            );
            let b = Tensor::<2>::zeros([out, settings.r], device);
            proj.lora = Some(Lora {
                a: factor(module, "A", a),
                b: factor(module, "B", b),
                scale,
                dropout: DropoutConfig::new(settings.lora_dropout).init(),
            });
        }
        Ok(())
    })?;
    Ok(model)
}

/// PEFT's key for a factor of the adapter on `module` (e.g. `model.layers.0.self_attn.q_proj`).
fn peft_key(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.lora_{factor}.weight")
}

/// The adapter tensors under PEFT's names: `lora_A` `[r, in]`, `lora_B` `[out, r]`.
pub fn export_adapter(model: &Llama) -> BTreeMap<String, OwnedTensor> {
    let mut out = BTreeMap::new();
    for (module, proj) in projections(model) {
        if let Some(lora) = &proj.lora {
            for (factor, t) in [("A", lora.a.val()), ("B", lora.b.val())] {
                let shape = t.dims().to_vec();
                let values = t.into_data().try_into_vec_as::<f32>().unwrap_or_default();
                out.insert(
                    peft_key(&module, factor),
                    OwnedTensor::from_f32(&values, shape, WeightDtype::F32),
                );
            }
        }
    }
    out
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`, as PEFT does.
pub fn save_adapter(
    dir: &Path,
    model: &Llama,
    settings: &LoraSettings,
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| checkpoints::CheckpointError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    checkpoints::write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &export_adapter(model),
    )?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
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
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    checkpoints::write_text(&dir.join("adapter_config.json"), &text)?;
    Ok(())
}

/// Reads a PEFT LoRA adapter directory and attaches it to `model` (base frozen, adapter
/// trainable). Every adapter tensor must match a target projection, with the right shape.
pub fn load_adapter(dir: &Path, model: Llama, device: &Device) -> Result<(Llama, LoraSettings)> {
    let config_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| checkpoints::CheckpointError::Io {
            path: config_path.clone(),
            source: e,
        })?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| checkpoints::CheckpointError::Json {
            path: config_path.clone(),
            source: e,
        })?;
    let origin = config_path.display().to_string();
    let field = |key: &str| raw.get(key).filter(|v| !v.is_null());
    if let Some(kind) = field("peft_type")
        .and_then(|v| v.as_str())
        .filter(|k| *k != "LORA")
    {
        return Err(TrainerError::Input(format!(
            "{origin}: peft_type `{kind}` is not LORA"
        )));
    }
    for (key, off) in [
        ("use_dora", serde_json::Value::Bool(false)),
        ("fan_in_fan_out", serde_json::Value::Bool(false)),
    ] {
        if let Some(v) = field(key).filter(|v| **v != off) {
            return Err(TrainerError::Input(format!(
                "{origin}: `{key}` = {v} is not supported"
            )));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(key)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(TrainerError::Input(format!(
                "{origin}: per-module `{key}` is not supported"
            )));
        }
    }
    let settings: LoraSettings = serde_json::from_value(raw.clone())
        .map_err(|e| TrainerError::Input(format!("{origin}: {e}")))?;
    settings.validate(&origin)?;
    let weights_path = dir.join("adapter_model.safetensors");
    let files = WeightFiles::open_file(&weights_path)?;
    let mut model = model.no_grad();
    let scale = settings.scale();
    for_each_projection(&mut model, |module, name, proj| {
        if !settings.target_modules.iter().any(|t| t == name) {
            return Ok(());
        }
        let [out, inp] = proj.out_in();
        let a = files
            .take(&peft_key(module, "A"), &[settings.r, inp])?
            .to_f32()?;
        let b = files
            .take(&peft_key(module, "B"), &[out, settings.r])?
            .to_f32()?;
        proj.lora = Some(Lora {
            a: factor(
                module,
                "A",
                Tensor::from_data(TensorData::new(a, [settings.r, inp]), device),
            ),
            b: factor(
                module,
                "B",
                Tensor::from_data(TensorData::new(b, [out, settings.r]), device),
            ),
            scale,
            dropout: DropoutConfig::new(settings.lora_dropout).init(),
        });
        Ok(())
    })?;
    files.ensure_all_taken(|_| false)?;
    Ok((model, settings))
}

/// Folds every adapter into its base weight (`W + s·B·A`) and removes the adapters.
pub fn merge_lora(mut model: Llama) -> Llama {
    let _ = for_each_projection(&mut model, |_, _, proj| {
        if let Some(lora) = proj.lora.take() {
            let merged = proj.weight.val() + lora.merged_delta();
            proj.weight = Param::from_tensor(merged);
        }
        Ok(())
    });
    model
}

/// `hearth merge`: base checkpoint + PEFT adapter → a merged checkpoint in the base's dtype,
/// with the base's tokenizer and template files.
pub fn merge_to_dir(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    let device = Device::flex();
    let (config, model) = super::load_model(base, &device)?;
    let (model, _) = load_adapter(adapter, model, &device)?;
    let merged = merge_lora(model);
    super::save_model(out, &config, &merged, config.dtype, Default::default())?;
    super::copy_companions(base, out)
}
