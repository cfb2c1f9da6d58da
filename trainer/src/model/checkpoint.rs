//! Moving the model in and out of Hugging Face checkpoint directories.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use checkpoints::{ModelConfig, OwnedTensor, SaveOptions, WeightDtype, WeightFiles};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::linear::Linear;
use super::llama::Llama;
use super::quantized::Quantization;
use super::specs::{Init, tensor_specs};
use crate::{Result, TrainerError};

/// Loads `config.json` and the weights of `dir` onto `device`. Each tensor is read from the
/// memory map, widened to f32 and moved into the model, one at a time.
///
/// `dir` may also be a GGUF model (a `.gguf` file, or a directory holding one): its tensors
/// are dequantized to f32 one at a time, under transformers' names and row order.
pub fn load_model(dir: &Path, device: &Device) -> Result<(ModelConfig, Llama)> {
    load_model_with(dir, device, &Quantization::default())
}

/// [`load_model`], quantizing the projections `quant` names on the host as each is read,
/// so their dense form never reaches the device.
pub fn load_model_with(
    dir: &Path,
    device: &Device,
    quant: &Quantization,
) -> Result<(ModelConfig, Llama)> {
    let config = ModelConfig::from_path(dir)?;
    super::quantized::check_skip(&quant.skip, Some(config.num_hidden_layers))
        .map_err(|e| TrainerError::Input(format!("{}: quantize_skip {e}", dir.display())))?;
    if let Some(gguf) = checkpoints::gguf::locate(dir)? {
        return load_gguf(&gguf, device, quant);
    }
    let files = WeightFiles::open_dir(dir)?;
    let mut tensors = HashMap::new();
    for spec in tensor_specs(&config) {
        let values = finite(
            files.take(&spec.name, &spec.shape)?.to_f32()?,
            dir,
            &spec.name,
        )?;
        tensors.insert(spec.name, TensorData::new(values, spec.shape));
    }
    let tied = config.tie_word_embeddings;
    files.ensure_all_taken(|name| {
        // Buffers older exports saved, and a duplicate head that a tied model ignores.
        name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
    })?;
    let model = super::with_path_ids(Llama::from_tensors(&config, tensors, device, quant)?);
    Ok((config, model))
}

/// `values` of the tensor `name` in `file`, refused when any is NaN or infinite: such a
/// model answers nothing but NaN (or empty replies), and training from it fails with advice
/// about the learning rate that does not apply.
pub(crate) fn finite(values: Vec<f32>, file: &Path, name: &str) -> Result<Vec<f32>> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(values),
        Some(i) => Err(TrainerError::Input(format!(
            "{}: tensor `{name}` holds {} at index {i}: the checkpoint's weights are broken",
            file.display(),
            values[i]
        ))),
    }
}

fn load_gguf(path: &Path, device: &Device, quant: &Quantization) -> Result<(ModelConfig, Llama)> {
    let file = checkpoints::gguf::GgufModel::open(path)?;
    let config = ModelConfig::from_json_str(&file.config_json()?, path)?;
    // `keep` reads each projection's own type.
    let mut quant = quant.clone();
    if quant.scheme == Some(crate::choices::Quantize::Keep) {
        for spec in tensor_specs(&config) {
            let ty = checkpoints::gguf::gguf_name(&spec.name)
                .and_then(|g| file.file().tensor(&g).map(|t| t.ty));
            if let Some(ty) = ty {
                quant.source_types.insert(spec.name, ty);
            }
        }
    }
    let mut tensors = HashMap::new();
    for spec in tensor_specs(&config) {
        // Under `keep`, a quantized weight in scope is read as its blocks, never widened.
        let prefix = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
        if quant.layout_for(prefix)? == Some(super::quantized::Layout::Kept)
            && let Some(blocks) = file.tensor_blocks(&spec.name, &spec.shape)?
        {
            let shape = [spec.shape[0], spec.shape.get(1).copied().unwrap_or(1)];
            quant
                .kept
                .insert(spec.name.clone(), (std::sync::Arc::new(blocks), shape));
            continue;
        }
        let values = finite(file.tensor_f32(&spec.name, &spec.shape)?, path, &spec.name)?;
        tensors.insert(spec.name, TensorData::new(values, spec.shape));
    }
    let quant = &quant;
    file.ensure_all_taken()?;
    let model = super::with_path_ids(Llama::from_tensors(&config, tensors, device, quant)?);
    Ok((config, model))
}

/// The tokenizer of the checkpoint in `dir`, refused when it can produce an id outside
/// the model's vocabulary (an embedding gather would fail on it mid-run), or when the side
/// files name tokens it or the model does not have
/// ([`crate::generate::side_file_stops`]).
pub fn load_tokenizer(dir: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let tokenizer = data::tokenizer::load(dir)?;
    let file = match checkpoints::gguf::locate(dir)? {
        Some(gguf) => gguf,
        None if dir.is_dir() => dir.join(checkpoints::names::TOKENIZER),
        None => dir.to_path_buf(),
    };
    data::tokenizer::check_fits(&tokenizer, &file, dir, vocab_size)?;
    crate::generate::side_file_stops(dir, &tokenizer, vocab_size)?;
    Ok(tokenizer)
}

/// Refuses the tokenizer of `src` where a command reading its copy would refuse it
/// ([`load_tokenizer`]), so no copy is written that cannot be run; a checkpoint that ships
/// no tokenizer passes.
pub(crate) fn check_tokenizer(src: &Path, vocab_size: usize) -> Result<()> {
    let ships = checkpoints::gguf::locate(src)?.is_some()
        || src.join(checkpoints::names::TOKENIZER).is_file();
    if ships {
        load_tokenizer(src, vocab_size)?;
    }
    Ok(())
}

/// Writes `config.json` and the weights of `model` into `dir` (created), in `dtype`.
/// Weights holding NaN or ±∞ in `dtype` are refused before anything is written.
pub fn save_model(
    dir: &Path,
    config: &ModelConfig,
    model: &Llama,
    dtype: WeightDtype,
    options: SaveOptions,
) -> Result<()> {
    checkpoints::save_weights(dir, &export_weights(model, dtype), options)?;
    checkpoints::write_text(
        &dir.join(checkpoints::names::CONFIG),
        &config.to_json(dtype),
    )?;
    Ok(())
}

/// Every weight of `model` under its Hugging Face name, narrowed to `dtype`.
pub fn export_weights(model: &Llama, dtype: WeightDtype) -> BTreeMap<String, OwnedTensor> {
    weights_f32(model)
        .into_iter()
        .map(|(name, (shape, values))| (name, OwnedTensor::from_f32(&values, shape, dtype)))
        .collect()
}

/// Every weight of `model` under its Hugging Face name: its row-major shape and f32 values.
pub fn weights_f32(model: &Llama) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    put(
        &mut out,
        "model.embed_tokens.weight",
        model.embed_tokens.dense(),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &layer.self_attn;
        let m = &layer.mlp;
        put(
            &mut out,
            &format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.weight.val(),
        );
        put(
            &mut out,
            &format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.weight.val(),
        );
        for (name, proj) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
        ] {
            put_linear(&mut out, &format!("{p}.self_attn.{name}"), proj);
        }
        for (name, proj) in [
            ("gate_proj", &m.gate_proj),
            ("up_proj", &m.up_proj),
            ("down_proj", &m.down_proj),
        ] {
            put_linear(&mut out, &format!("{p}.mlp.{name}"), proj);
        }
    }
    put(&mut out, "model.norm.weight", model.norm.weight.val());
    if let Some(head) = &model.lm_head {
        put_linear(&mut out, "lm_head", head);
    }
    if let Some(score) = &model.score {
        put_linear(&mut out, "score", score);
    }
    out
}

fn put_linear(out: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>, prefix: &str, proj: &Linear) {
    put(out, &format!("{prefix}.weight"), proj.dense_weight());
    if let Some(bias) = &proj.bias {
        put(out, &format!("{prefix}.bias"), bias.val());
    }
}

fn put<const D: usize>(
    out: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    name: &str,
    tensor: Tensor<D>,
) {
    let shape = tensor.dims().to_vec();
    let values: Vec<f32> = tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap_or_default();
    out.insert(name.to_string(), (shape, values));
}

/// Random weights for `config`, deterministic in `seed`: normal(0, `std`) for matrices and
/// biases, ones for norms, as transformers initialises a fresh model.
pub fn init_random_weights(
    config: &ModelConfig,
    std: f32,
    seed: u64,
) -> BTreeMap<String, OwnedTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    tensor_specs(config)
        .into_iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f32> = match spec.init {
                Init::Ones => vec![1.0; n],
                Init::Normal => (0..n).map(|_| std * standard_normal(&mut rng)).collect(),
            };
            let tensor = OwnedTensor::from_f32(&values, spec.shape, config.dtype);
            (spec.name, tensor)
        })
        .collect()
}

/// Box–Muller: one standard normal sample from two uniforms.
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Files besides weights and config that travel with a checkpoint.
const COMPANION_FILES: [&str; 9] = [
    checkpoints::names::TOKENIZER,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    // The slow tokenizers' own files, which transformers loads when a config names one.
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Re-saves the checkpoint in `src` into `dst`, in `dtype` (default: the source's) and the
/// sharding `options` ask for, with its tokenizer and template files: all or nothing.
pub fn convert(
    src: &Path,
    dst: &Path,
    dtype: Option<WeightDtype>,
    options: SaveOptions,
) -> Result<()> {
    checkpoints::guard::check_output_dir(dst, &[src])?;
    let (config, model) = load_model(src, &Device::flex())?;
    check_tokenizer(src, config.vocab_size)?;
    checkpoints::pending::write_dir(dst, |dst| {
        save_model(dst, &config, &model, dtype.unwrap_or(config.dtype), options)?;
        copy_companions(src, dst)
    })
}

/// Copies the tokenizer, template and generation-config files that travel with weights;
/// from a GGUF model, writes its tokenizer and template as `tokenizer.json` and
/// `tokenizer_config.json`.
pub fn copy_companions(src: &Path, dst: &Path) -> Result<()> {
    if let Some(gguf) = checkpoints::gguf::locate(src)? {
        let model = checkpoints::gguf::GgufModel::open(&gguf)?;
        checkpoints::write_text(
            &dst.join(checkpoints::names::TOKENIZER),
            &model.tokenizer_json()?,
        )?;
        checkpoints::write_text(
            &dst.join("tokenizer_config.json"),
            &model.tokenizer_config_json()?,
        )?;
        return Ok(());
    }
    for name in COMPANION_FILES {
        let from = src.join(name);
        if from.is_file() {
            let io = |e| checkpoints::CheckpointError::Io {
                path: from.clone(),
                source: e,
            };
            // `tokenizer.model` is a SentencePiece protobuf, copied as bytes; the rest are
            // text, and one that is not UTF-8 is broken, which is said before anything of
            // the output stands.
            if name.ends_with(".model") {
                checkpoints::write_bytes(&dst.join(name), &std::fs::read(&from).map_err(io)?)?;
            } else {
                let text = std::fs::read_to_string(&from).map_err(io)?;
                checkpoints::write_text(&dst.join(name), &text)?;
            }
        }
    }
    copy_named_templates(src, dst)
}

/// The template an adapter was trained with: `chat_template.jinja` beside it, which a run
/// with a built-in `data.template` writes. A merge or export of that adapter carries it
/// over the base's own, or the merged model would render with a template it never saw.
pub fn adapter_template(adapter: &Path) -> Result<Option<String>> {
    let path = adapter.join("chat_template.jinja");
    if !path.is_file() {
        return Ok(None);
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(source) => Err(checkpoints::CheckpointError::Io { path, source }.into()),
    }
}

/// Copies the named templates transformers keeps in `additional_chat_templates/` (each
/// `NAME.jinja`), so `--template-name` finds them in what hearth writes as in its source.
fn copy_named_templates(src: &Path, dst: &Path) -> Result<()> {
    let folder = src.join(data::template::ADDITIONAL_TEMPLATES);
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Ok(());
    };
    let io = |path: &Path, e| checkpoints::CheckpointError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| io(&folder, e))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string);
        if let Some(name) = name.filter(|n| n.ends_with(".jinja") && path.is_file()) {
            files.push((name, path));
        }
    }
    if files.is_empty() {
        return Ok(());
    }
    let out = dst.join(data::template::ADDITIONAL_TEMPLATES);
    std::fs::create_dir_all(&out).map_err(|e| io(&out, e))?;
    for (name, path) in files {
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        checkpoints::write_text(&out.join(name), &text)?;
    }
    Ok(())
}
