//! `hearth export gguf`: a model (and adapter, merged in) as one GGUF file for llama.cpp and
//! Ollama, with its tokenizer and chat template.

use std::path::Path;

use burn::tensor::Device;
use checkpoints::gguf::{ExportInput, ExportType, GgufModel, export_gguf};

use super::adapter::{load_tuned, merge_lora};
use super::checkpoint::weights_f32;
use crate::Result;

/// Writes `base` with `adapter` folded in to `out` as GGUF of type `ty`.
pub fn export_to_gguf(
    base: &Path,
    adapter: Option<&Path>,
    out: &Path,
    ty: ExportType,
) -> Result<()> {
    let mut inputs = vec![base];
    inputs.extend(adapter);
    checkpoints::guard::check_output_file(out, &inputs)?;
    data::output::check_output_name(out, "exported models", data::output::OutputFormat::Gguf)?;
    // The model's own errors (no such directory, a bad config) first, before its tokenizer's.
    checkpoints::ModelConfig::from_path(base)?;
    let source = checkpoints::gguf::locate(base)?;
    // A GGUF source's `general.*` description (license, base name, languages…) travels on.
    let source_metadata = match &source {
        Some(gguf) => Some(GgufModel::open(gguf)?.file().metadata.clone()),
        None => None,
    };
    let kept = match (&source, ty) {
        (Some(gguf), ExportType::Keep) => Some(GgufModel::open(gguf)?),
        _ => None,
    };
    let source_types = match (&source, ty) {
        (Some(_), ExportType::Keep) => kept.as_ref().map(|m| {
            m.file()
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.ty))
                .collect::<std::collections::BTreeMap<_, _>>()
        }),
        (None, ExportType::Keep) => {
            return Err(crate::TrainerError::Input(format!(
                "{}: --type keep writes each tensor in the type a GGUF model holds it in; \
                 this model is not a GGUF file (pick f16, bf16, q8_0, q4_0 or q4_k_m)",
                base.display()
            )));
        }
        _ => None,
    };
    let (tokenizer_json, tokenizer_path) = match source {
        Some(gguf) => (GgufModel::open(&gguf)?.tokenizer_json()?, gguf),
        None => {
            let path = base.join(checkpoints::names::TOKENIZER);
            let text =
                std::fs::read_to_string(&path).map_err(|e| checkpoints::CheckpointError::Io {
                    path: path.clone(),
                    source: e,
                })?;
            (text, path)
        }
    };
    let (tokenizer_config, _) = data::template::tokenizer_config(base)?;
    // An adapter trained with its own template runs with it, not the base's.
    let chat_template = match adapter.map(super::checkpoint::adapter_template) {
        Some(Ok(Some(text))) => Some(text),
        Some(Err(e)) => return Err(e),
        _ => shipped_template(base, &tokenizer_config),
    };
    let (config, model) = load_tuned(base, adapter, &Device::flex())?;
    // A reward adapter turns a causal base into a classifier, which the config alone hides.
    if let (Some(adapter), Some(_)) = (adapter, &model.score) {
        return Err(crate::TrainerError::Input(format!(
            "{}: a reward model's adapter (a score head): a sequence-classification (reward) \
             model has no GGUF form llama.cpp runs",
            adapter.display()
        )));
    }
    super::checkpoint::check_tokenizer(base, config.vocab_size)?;
    let (config, model) = super::adapter::untie_adapted_embeddings(config, model);
    let merged = merge_lora(model);
    let tensors = weights_f32(&merged);
    let name = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let input = ExportInput {
        config: &config,
        tensors: &tensors,
        tokenizer_json: &tokenizer_json,
        tokenizer_path: &tokenizer_path,
        tokenizer_config: &tokenizer_config,
        chat_template: chat_template.as_deref(),
        name: &name,
        source_types: source_types.as_ref(),
        source_file: kept.as_ref().map(GgufModel::file),
        source_metadata: source_metadata.as_ref(),
    };
    Ok(export_gguf(&input, ty, out)?)
}

/// The template `base` ships: `chat_template.jinja`, else `chat_template` in the tokenizer
/// config (its `default` entry when it holds several).
fn shipped_template(base: &Path, config: &serde_json::Value) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(base.join("chat_template.jinja")) {
        return Some(text);
    }
    match &config["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|i| i["name"].as_str() == Some("default"))
            .and_then(|i| i["template"].as_str())
            .map(String::from),
        _ => None,
    }
}
