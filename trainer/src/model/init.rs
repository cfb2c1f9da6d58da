//! Making a new random model in Hugging Face layout: config, weights and a BPE tokenizer
//! trained in-process on hearth's bundled text. Tests, CI and demos use these, since nothing
//! can be downloaded.

use std::path::Path;

use checkpoints::{ModelConfig, ModelType, SaveOptions, WeightDtype};
use data::tokenizer::{BUNDLED_CORPUS, LLAMA3_SPECIAL_TOKENS, pad_vocab, train_bpe};

use super::checkpoint::init_random_weights;
use crate::{Result, TrainerError};

/// The shape of a model to make. `Default` is the tiny model CI trains.
#[derive(Debug, Clone)]
pub struct NewModel {
    pub model_type: ModelType,
    /// The vocabulary's exact size: the tokenizer is trained up to it and padded with
    /// Llama 3's reserved special tokens past what the bundled text yields.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    pub dtype: WeightDtype,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub init_std: f64,
    pub seed: u64,
}

impl Default for NewModel {
    fn default() -> Self {
        Self {
            model_type: ModelType::Llama,
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            tie_word_embeddings: false,
            dtype: WeightDtype::F32,
            rope_theta: 10_000.0,
            max_position_embeddings: 512,
            init_std: 0.02,
            seed: 0,
        }
    }
}

/// The bytes making `spec`'s weights holds at once: every tensor in its dtype (they are
/// written together) and the largest in f32 while it is drawn. `None` past `u64`.
fn making_bytes(spec: &NewModel) -> Option<u64> {
    let n = |x: usize| u64::try_from(x).ok();
    let (v, h, i, l) = (
        n(spec.vocab_size)?,
        n(spec.hidden_size)?,
        n(spec.intermediate_size)?,
        n(spec.num_hidden_layers)?,
    );
    let kv = n(spec.num_key_value_heads)?.checked_mul(h / n(spec.num_attention_heads.max(1))?)?;
    let embed = v.checked_mul(h)?;
    let head = if spec.tie_word_embeddings { 0 } else { embed };
    let attention = h
        .checked_mul(h)?
        .checked_mul(2)?
        .checked_add(h.checked_mul(kv)?.checked_mul(2)?)?;
    let mlp = h.checked_mul(i)?.checked_mul(3)?;
    let layer = attention.checked_add(mlp)?.checked_add(h.checked_mul(2)?)?;
    let params = embed
        .checked_add(head)?
        .checked_add(l.checked_mul(layer)?)?
        .checked_add(h)?;
    let largest = embed.max(h.checked_mul(i)?);
    params
        .checked_mul(n(spec.dtype.size())?)?
        .checked_add(largest.checked_mul(4)?)
}

/// The memory this machine has available now, from `/proc/meminfo`; `None` where that
/// cannot be read (then nothing is refused for size).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses, before any work, sizes whose weights would not fit in `available` bytes: they
/// are made whole in memory, and an allocation that fails aborts the process.
fn check_fits(spec: &NewModel, available: Option<u64>) -> Result<()> {
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    match (making_bytes(spec), available) {
        (None, _) => Err(TrainerError::Input(
            "these sizes make a model too large to count its weights in 64 bits".into(),
        )),
        (Some(need), Some(have)) if need > have => Err(TrainerError::Input(format!(
            "a model of these sizes takes {:.1} GiB of memory to make; this machine has {:.1} \
             GiB available",
            gib(need),
            gib(have)
        ))),
        _ => Ok(()),
    }
}

/// Refuses sizes no model can have, naming each by its `config.json` key and the CLI flag
/// that sets it: the config the sizes make is checked again when it is parsed, but that
/// check speaks of a file, which here the user never wrote.
fn check_shape(spec: &NewModel) -> Result<()> {
    let bad = |msg: String| Err(TrainerError::Input(msg));
    for (key, flag, value) in [
        ("hidden_size", "--hidden-size", spec.hidden_size),
        (
            "intermediate_size",
            "--intermediate-size",
            spec.intermediate_size,
        ),
        ("num_attention_heads", "--heads", spec.num_attention_heads),
        (
            "num_key_value_heads",
            "--kv-heads",
            spec.num_key_value_heads,
        ),
    ] {
        if value == 0 {
            return bad(format!("{key} ({flag}) must be positive"));
        }
    }
    let layers = spec.num_hidden_layers;
    if layers == 0 || layers > checkpoints::MAX_LAYERS {
        return bad(format!(
            "num_hidden_layers (--layers) {layers} must be between 1 and {}",
            checkpoints::MAX_LAYERS
        ));
    }
    let (heads, kv) = (spec.num_attention_heads, spec.num_key_value_heads);
    if !heads.is_multiple_of(kv) {
        return bad(format!(
            "num_key_value_heads (--kv-heads) {kv} must divide num_attention_heads (--heads) \
             {heads}"
        ));
    }
    if !spec.hidden_size.is_multiple_of(heads) {
        return bad(format!(
            "hidden_size (--hidden-size) {} must be a multiple of num_attention_heads (--heads) \
             {heads}",
            spec.hidden_size
        ));
    }
    let head_dim = spec.hidden_size / heads;
    if !head_dim.is_multiple_of(2) {
        return bad(format!(
            "hidden_size (--hidden-size) {} over num_attention_heads (--heads) {heads} is a \
             head size of {head_dim}, which is odd; RoPE rotates pairs of values",
            spec.hidden_size
        ));
    }
    if !(spec.init_std.is_finite() && spec.init_std >= 0.0) {
        return bad(format!(
            "initializer_range (--init-std) {} must be a finite number ≥ 0",
            spec.init_std
        ));
    }
    Ok(())
}

/// Writes `config.json`, the weights and `tokenizer.json` of a new model into `dir`, all
/// of them or none.
pub fn init_model(dir: &Path, spec: &NewModel, save: SaveOptions) -> Result<ModelConfig> {
    checkpoints::guard::check_output_dir(dir, &[])?;
    check_shape(spec)?;
    check_fits(spec, available_memory())?;
    let mut tokenizer = train_bpe(&[BUNDLED_CORPUS], spec.vocab_size, &LLAMA3_SPECIAL_TOKENS)?;
    pad_vocab(&mut tokenizer, spec.vocab_size)?;
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);
    let config_json = serde_json::json!({
        "architectures": [match spec.model_type {
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Qwen2 => "Qwen2ForCausalLM",
            ModelType::Mistral => "MistralForCausalLM",
        }],
        "model_type": spec.model_type.as_str(),
        "vocab_size": tokenizer.get_vocab_size(true),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size / spec.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": id("<|begin_of_text|>"),
        "eos_token_id": id("<|eot_id|>"),
        "pad_token_id": id("<|finetune_right_pad_id|>"),
        "initializer_range": spec.init_std,
        "torch_dtype": spec.dtype.hf_name(),
    });
    let config = ModelConfig::from_json_str(
        &config_json.to_string(),
        &dir.join(checkpoints::names::CONFIG),
    )?;
    let weights = init_random_weights(&config, spec.init_std as f32, spec.seed);
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| TrainerError::Input(format!("serialising the tokenizer: {e}")))?;
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": data::template::LLAMA3,
    });
    let tokenizer_config = serde_json::to_string_pretty(&tokenizer_config).unwrap_or_default();
    checkpoints::pending::write_dir(dir, |dir| {
        checkpoints::save_weights(dir, &weights, save)?;
        checkpoints::write_text(
            &dir.join(checkpoints::names::CONFIG),
            &config.to_json(spec.dtype),
        )?;
        checkpoints::write_text(&dir.join(checkpoints::names::TOKENIZER), &tokenizer_json)?;
        checkpoints::write_text(&dir.join("tokenizer_config.json"), &tokenizer_config)
    })?;
    Ok(config)
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Each impossible size is named by its key and flag, before anything is made; the
    /// largest layer count a config may declare is still accepted by the check.
    #[test]
    fn impossible_shapes_name_their_flag() {
        let with = |f: fn(&mut NewModel)| {
            let mut spec = NewModel::default();
            f(&mut spec);
            check_shape(&spec).map_err(|e| e.to_string())
        };
        for (change, want) in [
            (
                (|s: &mut NewModel| s.num_hidden_layers = 5000) as fn(&mut NewModel),
                "num_hidden_layers (--layers) 5000 must be between 1 and 4096",
            ),
            (|s| s.num_hidden_layers = 0, "(--layers) 0"),
            (
                |s| s.hidden_size = 0,
                "hidden_size (--hidden-size) must be positive",
            ),
            (
                |s| s.intermediate_size = 0,
                "(--intermediate-size) must be positive",
            ),
            (|s| s.num_attention_heads = 0, "(--heads) must be positive"),
            (
                |s| s.num_key_value_heads = 0,
                "(--kv-heads) must be positive",
            ),
            (|s| s.num_key_value_heads = 3, "(--kv-heads) 3 must divide"),
            (
                |s| {
                    s.num_attention_heads = 3;
                    s.num_key_value_heads = 1;
                },
                "multiple of num_attention_heads (--heads) 3",
            ),
            (|s| s.init_std = f64::NAN, "(--init-std) NaN"),
            (
                |s| {
                    s.hidden_size = 12;
                    s.num_attention_heads = 4;
                    s.num_key_value_heads = 2;
                },
                "(--heads) 4 is a head size of 3, which is odd",
            ),
            (|s| s.init_std = -1.0, "(--init-std) -1"),
        ] {
            let e = with(change).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        with(|_| {}).unwrap();
        with(|s| s.num_hidden_layers = checkpoints::MAX_LAYERS).unwrap();
    }

    /// The default model's count by hand, and sizes past the memory there is, or past
    /// 64 bits, refused before anything is made.
    /// `initializer_range` is written as it was given (0.02, as transformers writes it),
    /// not as an f32 widened to 0.019999999552965164.
    #[test]
    fn the_config_holds_the_initializer_range_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        init_model(&out, &NewModel::default(), Default::default()).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["initializer_range"].as_f64(), Some(0.02));
    }

    #[test]
    fn sizes_that_cannot_be_made_are_refused_up_front() {
        let tiny = NewModel::default();
        // vocab 512 × hidden 64, twice (untied); per layer q,o 64², k,v 64·32, MLP 3·64·176,
        // two norms; the final norm. f32, plus the largest tensor drawn in f32.
        let params = 2 * 512 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64) + 64;
        assert_eq!(making_bytes(&tiny), Some(4 * params + 4 * 512 * 64));
        check_fits(&tiny, Some(1 << 30)).unwrap();
        check_fits(&tiny, None).unwrap();
        let e = check_fits(&tiny, Some(1000)).unwrap_err().to_string();
        assert!(e.contains("GiB of memory to make"), "{e}");
        let huge = NewModel {
            hidden_size: 1 << 40,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            ..NewModel::default()
        };
        let e = check_fits(&huge, Some(u64::MAX)).unwrap_err().to_string();
        assert!(e.contains("64 bits"), "{e}");
    }
}
