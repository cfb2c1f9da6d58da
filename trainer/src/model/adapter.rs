//! Adapters on a whole model: attaching fresh ones as PEFT initialises them, merging them
//! into the base weights, and reading and writing them as PEFT adapters (the file layout is
//! [`checkpoints::peft`]'s).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use checkpoints::peft::{self, EMBEDDINGS, SCORE_KEY, TaskType, embedding_key, lora_key};
use checkpoints::{OwnedTensor, WeightDtype, WeightFiles};

pub use checkpoints::peft::{LAYER_PROJECTIONS, LoraSettings, TARGETS};

use super::ids::with_path_ids;
use super::linear::{Linear, Weight};
use super::llama::Llama;
use super::lora::Lora;
use crate::{Result, TrainerError};

/// Visits every projection of the model with its PEFT module path, short name and decoder
/// layer (`None` for the head).
fn for_each_projection(
    model: &mut Llama,
    mut f: impl FnMut(&str, &str, Option<usize>, &mut Linear) -> Result<()>,
) -> Result<()> {
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let a = &mut layer.self_attn;
        for (name, proj) in [
            ("q_proj", &mut a.q_proj),
            ("k_proj", &mut a.k_proj),
            ("v_proj", &mut a.v_proj),
            ("o_proj", &mut a.o_proj),
        ] {
            f(
                &format!("model.layers.{i}.self_attn.{name}"),
                name,
                Some(i),
                proj,
            )?;
        }
        let m = &mut layer.mlp;
        for (name, proj) in [
            ("gate_proj", &mut m.gate_proj),
            ("up_proj", &mut m.up_proj),
            ("down_proj", &mut m.down_proj),
        ] {
            f(&format!("model.layers.{i}.mlp.{name}"), name, Some(i), proj)?;
        }
    }
    if let Some(head) = &mut model.lm_head {
        f("lm_head", "lm_head", None, head)?;
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
    settings.validate("lora").map_err(TrainerError::Input)?;
    settings
        .check_layers("lora", model.layers.len())
        .map_err(TrainerError::Input)?;
    if settings.targets("lm_head", None) && model.lm_head.is_none() {
        return Err(TrainerError::Input(
            "lora: `lm_head` is tied to the embeddings in this model and cannot take its own adapter".into(),
        ));
    }
    let mut model = model.no_grad();
    let scale = settings.scale();
    for_each_projection(&mut model, |_, name, layer, proj| {
        if settings.targets(name, layer) {
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
    if settings.targets(EMBEDDINGS, None) {
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
            out.insert(lora_key(&module, "A"), owned(lora.a.val()));
            out.insert(lora_key(&module, "B"), owned(lora.b.val()));
        }
    }
    if let Some(lora) = &model.embed_lora {
        out.insert(embedding_key("A"), owned(lora.a.val()));
        out.insert(embedding_key("B"), owned(lora.b.val()));
    }
    if let Some(score) = &model.score {
        out.insert(SCORE_KEY.to_string(), owned(score.dense_weight()));
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
    checkpoints::write_safetensors(&dir.join(peft::WEIGHTS_FILE), &export_adapter(model))?;
    let task = match model.score {
        Some(_) => TaskType::SeqCls,
        None => TaskType::CausalLm,
    };
    Ok(peft::write_config(dir, settings, task, base_model)?)
}

/// Reads a PEFT LoRA adapter directory and attaches it to `model` (base frozen, adapter
/// trainable). Every adapter tensor must match a target projection, with the right shape.
pub fn load_adapter(dir: &Path, model: Llama, device: &Device) -> Result<(Llama, LoraSettings)> {
    let settings = peft::read_config(dir)?;
    let config_path = dir.join(peft::CONFIG_FILE).display().to_string();
    settings
        .check_layers(&config_path, model.layers.len())
        .map_err(TrainerError::Input)?;
    let weights_path = dir.join(peft::WEIGHTS_FILE);
    let files = WeightFiles::open_file(&weights_path)?;
    let mut model = model.no_grad();
    let scale = settings.scale();
    for_each_projection(&mut model, |module, name, layer, proj| {
        if !settings.targets(name, layer) {
            return Ok(());
        }
        let [out, inp] = proj.out_in();
        let a = files
            .take(&lora_key(module, "A"), &[settings.r, inp])?
            .to_f32()?;
        let a = super::checkpoint::finite(a, &weights_path, &lora_key(module, "A"))?;
        let b = files
            .take(&lora_key(module, "B"), &[out, settings.r])?
            .to_f32()?;
        let b = super::checkpoint::finite(b, &weights_path, &lora_key(module, "B"))?;
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
    if settings.targets(EMBEDDINGS, None) {
        let [vocab, hidden] = model.embed_tokens.dims();
        let a = files
            .take(&embedding_key("A"), &[settings.r, vocab])?
            .to_f32()?;
        let a = super::checkpoint::finite(a, &weights_path, &embedding_key("A"))?;
        let b = files
            .take(&embedding_key("B"), &[hidden, settings.r])?
            .to_f32()?;
        let b = super::checkpoint::finite(b, &weights_path, &embedding_key("B"))?;
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
    if files.contains(SCORE_KEY) {
        // A SEQ_CLS adapter carries its own head; a causal base gains it here.
        let hidden = model.embed_tokens.dims()[1];
        if let [labels, _] = files.get(SCORE_KEY)?.shape[..] {
            super::one_label(
                &format!("{}: `{SCORE_KEY}`", weights_path.display()),
                labels,
            )?;
        }
        let w = files.take(SCORE_KEY, &[1, hidden])?.to_f32()?;
        let w = super::checkpoint::finite(w, &weights_path, SCORE_KEY)?;
        model.score = Some(Linear {
            weight: Weight::Dense(Param::from_tensor(Tensor::from_data(
                TensorData::new(w, [1, hidden]),
                device,
            ))),
            bias: None,
            lora: None,
        });
        model.lm_head = None;
    }
    // A reward model's adapter without its head would load as a language model, silently
    // the wrong kind (PEFT refuses it too).
    if model.score.is_none() && peft::read_task(dir)? == TaskType::SeqCls {
        return Err(TrainerError::Input(format!(
            "{}: task_type SEQ_CLS (a reward model's adapter), but {} holds no `{SCORE_KEY}`: \
             the score head is missing",
            dir.join(peft::CONFIG_FILE).display(),
            weights_path.display()
        )));
    }
    files.ensure_all_taken(|_| false)?;
    Ok((unfreeze_score(with_path_ids(model)), settings))
}

/// The model in `dir` on `device`, with the PEFT adapter in `adapter` on it when one is
/// given: how every command that runs a tuned model loads it.
pub fn load_tuned(
    dir: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<(checkpoints::ModelConfig, Llama)> {
    let (config, model) = super::load_model(dir, device)?;
    let model = match adapter {
        Some(a) => load_adapter(a, model, device)?.0,
        None => model,
    };
    Ok((config, model))
}

/// Folds every adapter into its base weight (`W + s·B·A`, in f32 whatever the base was
/// stored in) and removes the adapters.
pub fn merge_lora(mut model: Llama) -> Llama {
    let _ = for_each_projection(&mut model, |_, _, _, proj| {
        if let Some(lora) = proj.lora.take() {
            let merged = super::precision::f32(proj.dense_weight()) + lora.merged_delta();
            proj.weight = Weight::Dense(Param::from_tensor(merged));
        }
        Ok(())
    });
    if let Some(lora) = model.embed_lora.take() {
        let merged =
            super::precision::f32(model.embed_tokens.dense()) + lora.merged_delta().transpose();
        model.embed_tokens = Weight::Dense(Param::from_tensor(merged));
    }
    model
}

/// A tied model whose embeddings carry an adapter computes its head from the base
/// embeddings (the adapter acts on lookups only, in hearth as in PEFT). Merged, the
/// embeddings change and the head must not: it becomes a head of its own, the base
/// embeddings, and the config says the two are no longer tied. A reward model has no head
/// to keep.
pub fn untie_adapted_embeddings(
    config: checkpoints::ModelConfig,
    mut model: Llama,
) -> (checkpoints::ModelConfig, Llama) {
    if config.tie_word_embeddings
        && model.embed_lora.is_some()
        && model.lm_head.is_none()
        && model.score.is_none()
    {
        let head = super::precision::f32(model.embed_tokens.dense());
        model.lm_head = Some(Linear::dense(head, None));
        return (config.untied(), model);
    }
    (config, model)
}

/// The model without its adapters: the frozen base a LoRA run trains on, sharing its
/// weights (burn tensors are reference-counted, so nothing is copied).
pub fn strip_lora(mut model: Llama) -> Llama {
    let _ = for_each_projection(&mut model, |_, _, _, proj| {
        proj.lora = None;
        Ok(())
    });
    model.embed_lora = None;
    model
}

/// `hearth merge`: base checkpoint + PEFT adapter → a merged checkpoint in the base's dtype,
/// with the base's tokenizer and template files, and the adapter's own template over the
/// base's where it has one. With `quant`, the base's projections are
/// quantized as a QLoRA run had them and the adapter merged into their dequantized values.
pub fn merge_to_dir(
    base: &Path,
    adapter: &Path,
    out: &Path,
    quant: &super::quantized::Quantization,
) -> Result<()> {
    checkpoints::guard::check_output_dir(out, &[base, adapter])?;
    let device = Device::flex();
    let (config, model) = super::load_model_with(base, &device, quant)?;
    let (model, _) = load_adapter(adapter, model, &device)?;
    super::checkpoint::check_tokenizer(base, config.vocab_size)?;
    // A reward model's adapter brings its score head (SEQ_CLS): the merged model is a
    // `*ForSequenceClassification` checkpoint, as a reward run's own final/ is.
    let config = if model.score.is_some() && config.score_labels.is_none() {
        config.as_reward_model(config.padding_id())
    } else {
        config
    };
    let template = super::checkpoint::adapter_template(adapter)?;
    let (config, model) = untie_adapted_embeddings(config, model);
    let merged = merge_lora(model);
    checkpoints::pending::write_dir(out, |out| {
        super::save_model(out, &config, &merged, config.dtype, Default::default())?;
        super::copy_companions(base, out)?;
        if let Some(text) = &template {
            checkpoints::write_text(&out.join("chat_template.jinja"), text)?;
        }
        Ok(())
    })
}
