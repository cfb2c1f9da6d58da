//! A Hugging Face model as a GGUF file llama.cpp and Ollama load: the metadata its loader
//! reads for the `llama` and `qwen2` architectures, the byte-level BPE tokenizer and chat
//! template, and every tensor under llama.cpp's names, q/k rows permuted as its converter
//! does, in the types of the chosen mix (`q4_k_m` as llama.cpp's: Q4_K, with Q6_K for the
//! head and for `attn_v`/`ffn_down` in the layers that get more bits).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::container::MetaValue;
use super::model::{gguf_name, llama3_rope_factors_with, permute_rows};
use super::quant::GgmlType;
use super::quantize::quantize;
use super::tokenizer::{LLAMA3_SPLIT, QWEN2_SPLIT};
use super::writer::{GgufWriter, TensorOut};
use crate::{CheckpointError, ModelConfig, ModelType, RopeScaling};

/// The `--type` of `hearth export gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4KM,
    /// Each tensor in the type the source GGUF holds it in (see [`ExportInput::source_types`]).
    Keep,
}

impl ExportType {
    pub const NAMES: [&'static str; 7] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "keep"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_k_m" => Self::Q4KM,
            "keep" => Self::Keep,
            _ => return None,
        })
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::BF16 => 32,
            // Mixed as the source was; llama.cpp reads the types per tensor.
            Self::Keep => 0,
        }
    }
}

/// What an export writes: the model's config and f32 weights under transformers' names,
/// and its tokenizer files.
pub struct ExportInput<'a> {
    pub config: &'a ModelConfig,
    /// transformers' name → (row-major shape, values).
    pub tensors: &'a BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// `tokenizer.json`'s text.
    pub tokenizer_json: &'a str,
    /// Where the tokenizer came from, for errors.
    pub tokenizer_path: &'a Path,
    /// `tokenizer_config.json` (or `Null`).
    pub tokenizer_config: &'a Value,
    pub chat_template: Option<&'a str>,
    /// `general.name`.
    pub name: &'a str,
    /// For [`ExportType::Keep`]: each tensor's type in the source GGUF, by GGUF name.
    pub source_types: Option<&'a BTreeMap<String, GgmlType>>,
    /// For [`ExportType::Keep`]: the source GGUF, whose blocks a tensor takes as they are
    /// when its values are still theirs. Quantizing is not idempotent for every type (a
    /// K-quant's scales are searched for, and the search over dequantized values can end
    /// elsewhere), so writing an untouched tensor again could change it.
    pub source_file: Option<&'a super::GgufFile>,
    /// A GGUF source's metadata: its `general.*` description is kept (its name over
    /// `name`), and under `Keep` its `general.file_type`.
    pub source_metadata: Option<&'a BTreeMap<String, MetaValue>>,
}

/// `general.*` keys an export writes from what it writes, never copied from a source.
const GENERAL_OWN: [&str; 5] = [
    "general.architecture",
    "general.type",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
];

fn invalid(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Gguf {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// between them.
fn more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2
}

/// The type of tensor `name` (GGUF name) with rows of `cols` values.
fn tensor_type(
    ty: ExportType,
    name: &str,
    dims: usize,
    cols: usize,
    layers: usize,
    tied: bool,
    source: Option<&BTreeMap<String, GgmlType>>,
) -> GgmlType {
    if dims == 1 {
        return GgmlType::F32;
    }
    let fits = |t: GgmlType| cols.is_multiple_of(t.block_len());
    // A type whose blocks do not fit the rows falls back as llama.cpp's does.
    let or_else = |want: GgmlType, fallback: GgmlType| {
        if fits(want) {
            want
        } else if fits(fallback) {
            fallback
        } else {
            GgmlType::F16
        }
    };
    let head = name == "output.weight" || (tied && name == "token_embd.weight");
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok());
    match ty {
        ExportType::F32 => GgmlType::F32,
        ExportType::F16 => GgmlType::F16,
        ExportType::BF16 => GgmlType::BF16,
        ExportType::Q8_0 => or_else(GgmlType::Q8_0, GgmlType::F16),
        ExportType::Q4_0 if head => or_else(GgmlType::Q6K, GgmlType::Q8_0),
        ExportType::Q4_0 => or_else(GgmlType::Q4_0, GgmlType::F16),
        // The source's own type where hearth writes it; a K-quant it reads but does not
        // write (Q5_K) becomes Q6_K, any other Q8_0, each falling back as above.
        ExportType::Keep => match source.and_then(|s| s.get(name)) {
            Some(&t) if super::quantize::WRITABLE.contains(&t) => or_else(t, GgmlType::Q8_0),
            Some(GgmlType::Q5K) => or_else(GgmlType::Q6K, GgmlType::Q8_0),
            _ => or_else(GgmlType::Q8_0, GgmlType::F16),
        },
        ExportType::Q4KM => {
            let bigger = (name.contains(".attn_v.") || name.contains(".ffn_down."))
                && layer.is_some_and(|l| more_bits(l, layers));
            if head || bigger {
                or_else(GgmlType::Q6K, GgmlType::Q8_0)
            } else {
                or_else(GgmlType::Q4K, GgmlType::Q5_0)
            }
        }
    }
}

/// Writes `input` to `out` as GGUF of type `ty`. The file appears only once complete.
pub fn export_gguf(input: &ExportInput<'_>, ty: ExportType, out: &Path) -> crate::Result<()> {
    let c = input.config;
    let arch = match c.model_type {
        ModelType::Llama | ModelType::Mistral => "llama",
        ModelType::Qwen2 => "qwen2",
    };
    if c.score_labels.is_some() {
        return Err(invalid(
            out,
            "a sequence-classification (reward) model has no GGUF form llama.cpp runs",
        ));
    }
    if c.sliding_windows.iter().any(Option::is_some) {
        return Err(invalid(
            out,
            "the model's config.json sets `sliding_window`, which has no key in llama.cpp's \
             llama architecture",
        ));
    }
    let mut w = GgufWriter::new();
    let u32v = |v: usize| MetaValue::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let source_general: Vec<(&String, &MetaValue)> = input
        .source_metadata
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("general.") && !GENERAL_OWN.contains(&k.as_str()))
        .collect();
    // Kept tensors are the source's types, so its file type stands; llama.cpp reads the
    // types per tensor either way.
    let file_type = match (ty, input.source_metadata) {
        (ExportType::Keep, Some(m)) => match m.get("general.file_type") {
            Some(v) => v.as_f64().map_or(ty.file_type(), |f| f as u32),
            None => ty.file_type(),
        },
        _ => ty.file_type(),
    };
    w.meta("general.architecture", MetaValue::Str(arch.into()))
        .meta("general.type", MetaValue::Str("model".into()));
    if !source_general.iter().any(|(k, _)| *k == "general.name") {
        w.meta("general.name", MetaValue::Str(input.name.into()));
    }
    for (k, v) in source_general {
        w.meta(k, v.clone());
    }
    w.meta("general.file_type", MetaValue::U32(file_type))
        .meta("general.quantization_version", MetaValue::U32(2))
        .meta(&key("block_count"), u32v(c.num_hidden_layers))
        .meta(&key("context_length"), u32v(c.max_position_embeddings))
        .meta(&key("embedding_length"), u32v(c.hidden_size))
        .meta(&key("feed_forward_length"), u32v(c.intermediate_size))
        .meta(&key("attention.head_count"), u32v(c.num_attention_heads))
        .meta(&key("attention.head_count_kv"), u32v(c.num_key_value_heads))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(c.rms_norm_eps as f32),
        )
        .meta(&key("rope.freq_base"), MetaValue::F32(c.rope_theta as f32))
        .meta(&key("rope.dimension_count"), u32v(c.head_dim))
        .meta(&key("vocab_size"), u32v(c.vocab_size));
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        w.meta(&key("attention.key_length"), u32v(c.head_dim))
            .meta(&key("attention.value_length"), u32v(c.head_dim));
    }
    let mut extra_tensors = Vec::new();
    match c.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            w.meta(&key("rope.scaling.type"), MetaValue::Str("linear".into()))
                .meta(&key("rope.scaling.factor"), MetaValue::F32(factor as f32));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let factors = llama3_rope_factors_with(
                c.rope_theta,
                c.head_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings as f64,
            );
            extra_tensors.push(TensorOut {
                name: "rope_freqs.weight".into(),
                dims: vec![factors.len() as u64],
                ty: GgmlType::F32,
                bytes: factors
                    .iter()
                    .flat_map(|&f| (f as f32).to_le_bytes())
                    .collect(),
            });
        }
    }
    tokenizer_metadata(&mut w, input)?;
    let tied = !input.tensors.contains_key("lm_head.weight");
    for (hf, (shape, values)) in input.tensors {
        let name =
            gguf_name(hf).ok_or_else(|| invalid(out, format!("tensor `{hf}` has no GGUF name")))?;
        let cols = *shape.last().unwrap_or(&1);
        let permuted = arch == "llama" && (name.contains(".attn_q.") || name.contains(".attn_k."));
        let values = if permuted {
            let heads = if name.contains(".attn_q.") {
                c.num_attention_heads
            } else {
                c.num_key_value_heads
            };
            permute_rows(values, heads, if shape.len() == 2 { cols } else { 1 })
        } else {
            values.clone()
        };
        let t = tensor_type(
            ty,
            &name,
            shape.len(),
            cols,
            c.num_hidden_layers,
            tied,
            input.source_types,
        );
        let bytes = match unchanged(input.source_file, &name, t, &values) {
            Some(kept) => kept.to_vec(),
            None => quantize(t, &values).ok_or_else(|| {
                invalid(
                    out,
                    format!("tensor `{hf}` cannot be written as {}", t.name()),
                )
            })?,
        };
        // NaN or ±∞ in the weights, or values past f16's range once written (as f16, or
        // in a quantized block's f16 scales): refused, as a safetensors save refuses them,
        // before the file is written. What the file holds is read back to see.
        let written_finite = match t {
            GgmlType::F16 => crate::write::all_finite(safetensors::Dtype::F16, &bytes),
            GgmlType::BF16 => crate::write::all_finite(safetensors::Dtype::BF16, &bytes),
            GgmlType::F32 => true,
            _ => super::quant::dequantize(t, &bytes)
                .is_none_or(|back| back.iter().all(|v| v.is_finite())),
        };
        if !values.iter().all(|v| v.is_finite()) || !written_finite {
            return Err(CheckpointError::NonFinite {
                path: out.to_path_buf(),
                tensor: hf.clone(),
            });
        }
        w.tensor(TensorOut {
            name,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty: t,
            bytes,
        });
    }
    for t in extra_tensors {
        w.tensor(t);
    }
    w.write_new(out)
}

/// The source's blocks of tensor `name` when they are of type `ty` and still hold exactly
/// `values` (no adapter changed them).
fn unchanged<'f>(
    source: Option<&'f super::GgufFile>,
    name: &str,
    ty: GgmlType,
    values: &[f32],
) -> Option<&'f [u8]> {
    let file = source?;
    let info = file.tensor(name).filter(|t| t.ty == ty)?;
    let bytes = file.bytes(info);
    let back = super::quant::dequantize(ty, bytes)?;
    // Bit for bit, so that -0.0 against 0.0 or a NaN never passes.
    let same = back.len() == values.len()
        && back
            .iter()
            .zip(values)
            .all(|(a, b)| a.to_bits() == b.to_bits());
    same.then_some(bytes)
}

/// The pre-tokenizer's llama.cpp name (`tokenizer.ggml.pre`), recognised from its JSON.
fn pre_name(pre: &Value) -> Option<&'static str> {
    let is = |v: &Value, ty: &str| v.get("type").and_then(Value::as_str) == Some(ty);
    if is(pre, "ByteLevel") && pre.get("use_regex").and_then(Value::as_bool) != Some(false) {
        return Some("gpt-2");
    }
    if !is(pre, "Sequence") {
        return None;
    }
    let parts = pre.get("pretokenizers")?.as_array()?;
    match parts.as_slice() {
        [d, b] if is(d, "Digits") && is(b, "ByteLevel") => {
            (d.get("individual_digits").and_then(Value::as_bool) == Some(true)).then_some("smollm")
        }
        [s, b] if is(s, "Split") && is(b, "ByteLevel") => {
            match s
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(Value::as_str)?
            {
                p if p == LLAMA3_SPLIT => Some("llama-bpe"),
                p if p == QWEN2_SPLIT => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether a `ByteLevel` pre-tokenizer (alone or in a sequence) puts a space before the
/// text, which llama.cpp's `gpt2`-family vocabularies have no setting for.
fn adds_prefix_space(pre: &Value) -> bool {
    let byte_level = |v: &Value| {
        v.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && v.get("add_prefix_space").and_then(Value::as_bool) == Some(true)
    };
    byte_level(pre)
        || pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|parts| parts.iter().any(byte_level))
}

fn tokenizer_metadata(w: &mut GgufWriter, input: &ExportInput<'_>) -> crate::Result<()> {
    let path = input.tokenizer_path;
    let tok: Value = serde_json::from_str(input.tokenizer_json)
        .map_err(|e| invalid(path, format!("not a tokenizer.json: {e}")))?;
    let model = &tok["model"];
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(invalid(
            path,
            "only BPE tokenizers (byte-level: GPT-2, Llama 3, Qwen2, SmolLM; SentencePiece \
             BPE with byte fallback: Llama 2, Mistral) can be written to GGUF",
        ));
    }
    // SentencePiece BPE (`▁` for spaces, `<0xXX>` byte tokens) is llama.cpp's `llama`
    // vocabulary; byte-level BPE its `gpt2` one, which needs a pre-tokenizer it knows.
    let sentencepiece = model["byte_fallback"] == Value::Bool(true);
    let pre = if sentencepiece {
        "default"
    } else if adds_prefix_space(&tok["pre_tokenizer"]) {
        return Err(invalid(
            path,
            "its byte-level pre-tokenizer adds a space before the text (add_prefix_space), \
             which none of llama.cpp's byte-level vocabularies does: the GGUF would split \
             the first word differently",
        ));
    } else {
        pre_name(&tok["pre_tokenizer"]).ok_or_else(|| {
            invalid(
                path,
                "its pre-tokenizer is none llama.cpp knows by name (gpt-2, smollm, llama-bpe, \
                 qwen2)",
            )
        })?
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| invalid(path, "the BPE model has no vocab"))?;
    let size = input.config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; size];
    let mut types = vec![1i32; size];
    let mut place = |id: u64, token: &str| -> crate::Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            invalid(
                path,
                format!("token `{token}` has id {id}, beyond the model's vocabulary of {size}"),
            )
        })?;
        *slot = Some(token.to_string());
        Ok(())
    };
    for (token, id) in vocab {
        place(id.as_u64().unwrap_or(u64::MAX), token)?;
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        place(id, content)?;
        types[id as usize] = if added["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
    }
    // Rows of the embedding no token uses are padded as llama.cpp's converter pads them.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(pair) => Some(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            )),
            _ => None,
        })
        .collect();
    if sentencepiece {
        let unk = model["unk_token"].as_str();
        let scores = sentencepiece_scores(&tokens, &mut types, &merges, unk);
        w.meta("tokenizer.ggml.model", MetaValue::Str("llama".into()))
            .meta(
                "tokenizer.ggml.scores",
                MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()),
            )
            .meta(
                "tokenizer.ggml.add_space_prefix",
                MetaValue::Bool(adds_space_prefix(&tok)),
            );
    } else {
        w.meta("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))
            .meta(
                "tokenizer.ggml.merges",
                MetaValue::Array(merges.into_iter().map(MetaValue::Str).collect()),
            );
    }
    w.meta("tokenizer.ggml.pre", MetaValue::Str(pre.into()))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        );
    let c = input.config;
    // BOS is added when the post-processor puts a special token first.
    let first_special = tok["post_processor"]["single"]
        .as_array()
        .and_then(|s| s.first())
        .and_then(|f| f.get("SpecialToken"))
        .and_then(|t| t["id"].as_str())
        .and_then(|t| {
            vocab
                .get(t)
                .and_then(Value::as_u64)
                .or_else(|| added_id(&tok, t))
        });
    let id_of = |key: &str| {
        input.tokenizer_config[key]
            .as_str()
            .or_else(|| input.tokenizer_config[key]["content"].as_str())
            .and_then(|t| {
                vocab
                    .get(t)
                    .and_then(Value::as_u64)
                    .or_else(|| added_id(&tok, t))
            })
    };
    // The tokenizer config first, then config.json, as llama.cpp's converter (gguf-py's
    // `SpecialVocab`) takes them: a Llama 3 Instruct config lists `[<|end_of_text|>,
    // <|eom_id|>, <|eot_id|>]`, and its first is not the turn's end the tokenizer names.
    let bos = id_of("bos_token")
        .or(c.bos_token_id.map(u64::from))
        .or(first_special);
    let eos = id_of("eos_token").or(c.eos_token_ids.first().map(|&e| u64::from(e)));
    let pad = id_of("pad_token").or(c.pad_token_id.map(u64::from));
    for (which, id) in [
        ("bos", bos),
        ("eos", eos),
        ("padding", pad),
        (
            "unknown",
            id_of("unk_token").or_else(|| {
                let unk = model["unk_token"].as_str()?;
                vocab.get(unk).and_then(Value::as_u64)
            }),
        ),
    ] {
        if let Some(id) = id {
            w.meta(
                &format!("tokenizer.ggml.{which}_token_id"),
                MetaValue::U32(id as u32),
            );
        }
    }
    w.meta(
        "tokenizer.ggml.add_bos_token",
        MetaValue::Bool(first_special.is_some()),
    )
    .meta("tokenizer.ggml.add_eos_token", MetaValue::Bool(false));
    if let Some(template) = input.chat_template {
        w.meta("tokenizer.chat_template", MetaValue::Str(template.into()));
    }
    Ok(())
}

/// `tokenizer.ggml.scores` for a SentencePiece BPE vocabulary. llama.cpp merges the adjacent
/// pair whose joined piece scores best, so each piece a merge makes scores minus that
/// merge's rank (its first, for pieces several splits make): merging then follows the BPE
/// model's order, and reading the file back recovers the same merges. Pieces no merge
/// makes score below all of them; control tokens 0, as SentencePiece has them. Also marks
/// the byte tokens (`<0xXX>`, type 6) and the unknown token (type 2) in `types`.
fn sentencepiece_scores(
    tokens: &[String],
    types: &mut [i32],
    merges: &[String],
    unk: Option<&str>,
) -> Vec<f32> {
    let id: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let floor = -(merges.len() as f32) - 1.0;
    let mut scores: Vec<f32> = (0..tokens.len()).map(|i| floor - i as f32).collect();
    let mut made = vec![false; tokens.len()];
    for (rank, merge) in merges.iter().enumerate() {
        let joined: String = merge.split(' ').collect();
        if let Some(&i) = id.get(joined.as_str())
            && !made[i]
        {
            made[i] = true;
            scores[i] = -(rank as f32);
        }
    }
    for (i, t) in tokens.iter().enumerate() {
        let byte = t.len() == 6
            && t.starts_with("<0x")
            && t.ends_with('>')
            && u8::from_str_radix(&t[3..5], 16).is_ok();
        if byte && types[i] == 1 {
            types[i] = 6;
        }
        if Some(t.as_str()) == unk {
            types[i] = 2;
        }
        if types[i] == 3 {
            scores[i] = 0.0;
        }
    }
    scores
}

/// Whether the tokenizer prepends `▁` to the text (SentencePiece's `add_dummy_prefix`): a
/// `Prepend` normalizer (transformers' legacy Llama conversion) or a `Metaspace`
/// pre-tokenizer that prepends.
fn adds_space_prefix(tok: &Value) -> bool {
    let is = |v: &Value, ty: &str| v.get("type").and_then(Value::as_str) == Some(ty);
    let all = |v: &Value, key: &str| -> Vec<Value> {
        if is(v, "Sequence") {
            v[key].as_array().cloned().unwrap_or_default()
        } else {
            vec![v.clone()]
        }
    };
    let prepends = all(&tok["normalizer"], "normalizers")
        .iter()
        .any(|n| is(n, "Prepend"));
    let metaspace = all(&tok["pre_tokenizer"], "pretokenizers")
        .iter()
        .any(|p| is(p, "Metaspace") && p["prepend_scheme"].as_str() != Some("never"));
    prepends || metaspace
}

fn added_id(tok: &Value, content: &str) -> Option<u64> {
    tok["added_tokens"]
        .as_array()?
        .iter()
        .find(|a| a["content"].as_str() == Some(content))
        .and_then(|a| a["id"].as_u64())
}
