//! `hearth logits`: run a checkpoint on stored token ids and write its logits, so a user can
//! compare hearth with another implementation on the same inputs.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use checkpoints::{ModelConfig, OwnedTensor, TensorRef, WeightDtype, WeightFiles};

use crate::{Result, TrainerError};

/// What a logits run produced.
#[derive(Debug, Clone, Copy)]
pub struct LogitsShape {
    pub batch: usize,
    pub tokens: usize,
    pub vocab: usize,
}

/// A right-padded batch of token ids: `ids` and `mask` are `[batch, tokens]`, row-major.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub batch: usize,
    pub tokens: usize,
}

impl TokenBatch {
    /// Reads `input_ids` and optional `attention_mask` (integer, `[B, T]`) from a
    /// safetensors file.
    pub fn read(input: &Path) -> Result<Self> {
        let cases = WeightFiles::open_file(input)?;
        let bad = |msg: String| TrainerError::Input(format!("{}: {msg}", input.display()));
        let (ids, [b, t]) = int_matrix(&cases.get("input_ids")?).map_err(bad)?;
        let mask = if cases.contains("attention_mask") {
            let (mask, shape) = int_matrix(&cases.get("attention_mask")?).map_err(bad)?;
            if shape != [b, t] {
                return Err(bad(format!(
                    "`attention_mask` has shape {shape:?} but `input_ids` has [{b}, {t}]"
                )));
            }
            if let Some(i) = mask.iter().position(|&m| m != 0 && m != 1) {
                return Err(bad(format!(
                    "`attention_mask` must hold 0 or 1; row {}, column {} holds {}",
                    i / t,
                    i % t,
                    mask[i]
                )));
            }
            mask
        } else {
            vec![1; b * t]
        };
        Ok(Self {
            ids,
            mask,
            batch: b,
            tokens: t,
        })
    }

    /// Tokenises `texts` with the checkpoint's `tokenizer.json` (special tokens as the
    /// tokenizer's post-processor adds them) and right-pads them into one batch.
    pub fn tokenize(model_dir: &Path, texts: &[String], pad_id: u32) -> Result<Self> {
        let tokenizer = data::tokenizer::load(model_dir)?;
        let mut rows = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let encoding = tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| TrainerError::Input(format!("tokenising text {}: {e}", i + 1)))?;
            if encoding.get_ids().is_empty() {
                return Err(TrainerError::Input(format!(
                    "text {} gives no tokens",
                    i + 1
                )));
            }
            rows.push(encoding.get_ids().to_vec());
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if t == 0 {
            return Err(TrainerError::Input("no text given".into()));
        }
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut mask = Vec::with_capacity(rows.len() * t);
        for row in &rows {
            ids.extend(row.iter().map(|&id| id as i64));
            mask.extend(std::iter::repeat_n(1, row.len()));
            ids.extend(std::iter::repeat_n(pad_id as i64, t - row.len()));
            mask.extend(std::iter::repeat_n(0, t - row.len()));
        }
        Ok(Self {
            ids,
            mask,
            batch: rows.len(),
            tokens: t,
        })
    }
}

/// Where a logits run takes its token ids from.
pub enum LogitsInput<'a> {
    /// A safetensors file with `input_ids` (and `attention_mask`).
    File(&'a Path),
    /// Texts, tokenised with the checkpoint's tokenizer.
    Texts(&'a [String]),
}

/// Runs the model in `model_dir` on `input` and writes `logits` (f32, `[B, T, V]`) to `out`,
/// together with the `input_ids` and `attention_mask` it ran on, so the same file can be fed
/// to another implementation.
pub fn write_logits(
    model_dir: &Path,
    adapter: Option<&Path>,
    input: LogitsInput<'_>,
    out: &Path,
    device: &Device,
) -> Result<LogitsShape> {
    let mut inputs = vec![model_dir];
    inputs.extend(adapter);
    if let LogitsInput::File(path) = input {
        inputs.push(path);
    }
    checkpoints::guard::check_output_file(out, &inputs)?;
    data::output::check_output_name(out, "logits", data::output::OutputFormat::Safetensors)?;
    crate::model::refuse_reward_model(model_dir, adapter)?;
    let (source, batch) = match input {
        LogitsInput::File(path) => (path.display().to_string(), TokenBatch::read(path)?),
        LogitsInput::Texts(texts) => {
            let config = ModelConfig::from_path(model_dir)?;
            let pad = config.padding_id();
            let batch = TokenBatch::tokenize(model_dir, texts, pad)?;
            (
                model_dir
                    .join(checkpoints::names::TOKENIZER)
                    .display()
                    .to_string(),
                batch,
            )
        }
    };
    crate::model::mask::check_attention_size(batch.batch, batch.tokens, &source)?;
    let (config, model) = crate::model::load_tuned(model_dir, adapter, device)?;
    let TokenBatch {
        ids,
        mask,
        batch: b,
        tokens: t,
    } = batch;
    if let Some(i) = ids
        .iter()
        .position(|&id| id < 0 || id as usize >= config.vocab_size)
    {
        return Err(TrainerError::Input(format!(
            "{source}: `input_ids` row {}, column {} holds {}, outside the model's vocab of {}",
            i / t,
            i % t,
            ids[i],
            config.vocab_size
        )));
    }
    let ids_t = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), device);
    let mask_t = Tensor::<2, Int>::from_data(TensorData::new(mask.clone(), [b, t]), device);
    let logits = model.logits(model.hidden(ids_t, mask_t));
    let vocab = config.vocab_size;
    let values = logits
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| TrainerError::Input(format!("reading logits back: {e:?}")))?;
    let tensors = BTreeMap::from([
        (
            "logits".to_string(),
            OwnedTensor::from_f32(&values, vec![b, t, vocab], WeightDtype::F32),
        ),
        (
            "input_ids".to_string(),
            OwnedTensor::from_i64(&ids, vec![b, t]),
        ),
        (
            "attention_mask".to_string(),
            OwnedTensor::from_i64(&mask, vec![b, t]),
        ),
    ]);
    checkpoints::write_safetensors(out, &tensors)?;
    Ok(LogitsShape {
        batch: b,
        tokens: t,
        vocab,
    })
}

fn int_matrix(t: &TensorRef<'_>) -> std::result::Result<(Vec<i64>, [usize; 2]), String> {
    let &[b, n] = t.shape else {
        return Err(format!(
            "`{}` must be 2-D [batch, tokens], got shape {:?}",
            t.name, t.shape
        ));
    };
    if b == 0 || n == 0 {
        return Err(format!("`{}` is empty (shape {:?})", t.name, t.shape));
    }
    let values = t
        .to_i64()
        .ok_or_else(|| format!("`{}` must be I64 or I32, got {:?}", t.name, t.dtype))?;
    Ok((values, [b, n]))
}
