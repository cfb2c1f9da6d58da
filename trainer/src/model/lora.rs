//! LoRA adapters: `y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ` with `W` frozen, `A` `[r, in]`,
//! `B` `[out, r]` — PEFT's layout and initialisation, so adapters move between hearth and
//! PEFT unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use checkpoints::{OwnedTensor, WeightDtype, WeightFiles};
use serde::{Deserialize, Serialize};

use super::ids::with_path_ids;
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

/// The embeddings' PEFT module name.
pub const EMBEDDINGS: &str = "embed_tokens";

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
    /// `base + s · dropout(x)·Aᵀ·Bᵀ`: the adapter added to its projection's output `base`
    /// (`[..., out]`), `x` `[..., in]`. The up-projection and the add are one op
    /// ([`kernels::lora_up`]), so the `[..., out]` low-rank product is never stored.
    pub fn add_to<const D: usize>(&self, base: Tensor<D>, x: Tensor<D>) -> Tensor<D> {
        let down =
            burn::tensor::module::linear(self.dropout.forward(x), self.a.val().transpose(), None);
        kernels::lora_up(base, down, self.b.val(), self.scale)
    }

    /// The embedding adapter's delta for `ids` `[B, T]`: rows of `Aᵀ` (`A` is `[r, vocab]`)
    /// through `Bᵀ` (`B` is `[hidden, r]`), scaled; PEFT applies no dropout here.
    pub fn embedding_delta(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let down = burn::tensor::module::embedding(self.a.val().transpose(), ids);
        burn::tensor::module::linear(down, self.b.val().transpose(), None).mul_scalar(self.scale)
    }

    /// `s · B·A`, `[out, in]`: what merging adds to the base weight.
    pub fn merged_delta(&self) -> Tensor<2> {
        self.b.val().matmul(self.a.val()).mul_scalar(self.scale)
    }
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
    for_each_projection(&mut model, |_, name, proj| {
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
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                scale,
                dropout: DropoutConfig::new(settings.lora_dropout).init(),
            });
        }
        Ok(())
    })?;
    if settings.target_modules.iter().any(|t| t == EMBEDDINGS) {
        // PEFT's embedding adapter starts the other way round: A zero, B standard normal.
        let [vocab, hidden] = model.embed_tokens.dims();
        model.embed_lora = Some(Lora {
            a: Param::from_tensor(Tensor::zeros([settings.r, vocab], device)),
            b: Param::from_tensor(Tensor::random(
                [hidden, settings.r],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            scale,
            dropout: DropoutConfig::new(0.0).init(),
        });
    }
    Ok(unfreeze_score(with_path_ids(model)))
}

/// A reward model's score head is trained in full beside the adapters (PEFT's
/// `modules_to_save`).
fn unfreeze_score(mut model: Llama) -> Llama {
    if let Some(score) = model.score.take() {
        model.score = Some(score.set_require_grad(true));
    }
    model
}

/// PEFT's key for a factor of the adapter on `module` (e.g. `model.layers.0.self_attn.q_proj`).
fn peft_key(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.lora_{factor}.weight")
}

/// PEFT keeps embedding factors as bare parameters: no `.weight` suffix.
fn peft_embedding_key(factor: &str) -> String {
    format!("base_model.model.model.{EMBEDDINGS}.lora_embedding_{factor}")
}

/// Where PEFT saves a `modules_to_save` copy of the score head.
const PEFT_SCORE_KEY: &str = "base_model.model.score.weight";

fn owned(t: Tensor<2>) -> OwnedTensor {
    let shape = t.dims().to_vec();
    let values = t.into_data().try_into_vec_as::<f32>().unwrap_or_default();
    OwnedTensor::from_f32(&values, shape, WeightDtype::F32)
}

/// The adapter tensors under PEFT's names: `lora_A` `[r, in]`, `lora_B` `[out, r]`.
pub fn export_adapter(model: &Llama) -> BTreeMap<String, OwnedTensor> {
    let mut out = BTreeMap::new();
    for (module, proj) in projections(model) {
        if let Some(lora) = &proj.lora {
            out.insert(peft_key(&module, "A"), owned(lora.a.val()));
            out.insert(peft_key(&module, "B"), owned(lora.b.val()));
        }
    }
    if let Some(lora) = &model.embed_lora {
        out.insert(peft_embedding_key("A"), owned(lora.a.val()));
        out.insert(peft_embedding_key("B"), owned(lora.b.val()));
    }
    if let Some(score) = &model.score {
        out.insert(PEFT_SCORE_KEY.to_string(), owned(score.weight.val()));
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
    let (task, modules_to_save) = match model.score {
        Some(_) => ("SEQ_CLS", serde_json::json!(["score"])),
        None => ("CAUSAL_LM", serde_json::Value::Null),
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
            a: Param::from_tensor(Tensor::from_data(
                TensorData::new(a, [settings.r, inp]),
                device,
            )),
            b: Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [out, settings.r]),
                device,
            )),
            scale,
            dropout: DropoutConfig::new(settings.lora_dropout).init(),
        });
        Ok(())
    })?;
    if settings.target_modules.iter().any(|t| t == EMBEDDINGS) {
        let [vocab, hidden] = model.embed_tokens.dims();
        let a = files
            .take(&peft_embedding_key("A"), &[settings.r, vocab])?
            .to_f32()?;
        let b = files
            .take(&peft_embedding_key("B"), &[hidden, settings.r])?
            .to_f32()?;
        model.embed_lora = Some(Lora {
            a: Param::from_tensor(Tensor::from_data(
                TensorData::new(a, [settings.r, vocab]),
                device,
            )),
            b: Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [hidden, settings.r]),
                device,
            )),
            scale,
            dropout: DropoutConfig::new(0.0).init(),
        });
    }
    if files.contains(PEFT_SCORE_KEY) {
        // A SEQ_CLS adapter carries its own head; a causal base gains it here.
        let hidden = model.embed_tokens.dims()[1];
        let labels = files
            .get(PEFT_SCORE_KEY)?
            .shape
            .first()
            .copied()
            .unwrap_or(1);
        let w = files.take(PEFT_SCORE_KEY, &[labels, hidden])?.to_f32()?;
        model.score = Some(Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(w, [labels, hidden]),
                device,
            )),
            bias: None,
            lora: None,
        });
        model.lm_head = None;
    }
    files.ensure_all_taken(|_| false)?;
    Ok((unfreeze_score(with_path_ids(model)), settings))
}

/// Folds every adapter into its base weight (`W + s·B·A`, in f32 whatever the base was
/// stored in) and removes the adapters.
pub fn merge_lora(mut model: Llama) -> Llama {
    let _ = for_each_projection(&mut model, |_, _, proj| {
        if let Some(lora) = proj.lora.take() {
            let merged = super::precision::f32(proj.weight.val()) + lora.merged_delta();
            proj.weight = Param::from_tensor(merged);
        }
        Ok(())
    });
    if let Some(lora) = model.embed_lora.take() {
        let merged =
            super::precision::f32(model.embed_tokens.val()) + lora.merged_delta().transpose();
        model.embed_tokens = Param::from_tensor(merged);
    }
    model
}

/// `hearth merge`: base checkpoint + PEFT adapter → a merged checkpoint in the base's dtype,
/// with the base's tokenizer and template files.
pub fn merge_to_dir(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    checkpoints::guard::check_output_dir(out, &[base, adapter])?;
    let device = Device::flex();
    let (config, model) = super::load_model(base, &device)?;
    let (model, _) = load_adapter(adapter, model, &device)?;
    let merged = merge_lora(model);
    super::save_model(out, &config, &merged, config.dtype, Default::default())?;
    super::copy_companions(base, out)
}
