//! `hearth logits`: run a checkpoint on stored token ids and write its logits, so a user can
//! compare hearth with another implementation on the same inputs.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use checkpoints::{OwnedTensor, TensorRef, WeightDtype, WeightFiles};

use crate::model::load_model;
use crate::{Result, TrainerError};

/// What a logits run produced.
#[derive(Debug, Clone, Copy)]
pub struct LogitsShape {
    pub batch: usize,
    pub tokens: usize,
    pub vocab: usize,
}

/// Reads `input_ids` and optional `attention_mask` (integer, `[B, T]`) from `input`, runs
/// the model in `model_dir` and writes `logits` (f32, `[B, T, V]`) to `out`.
pub fn write_logits(model_dir: &Path, input: &Path, out: &Path, device: &Device) -> Result<LogitsShape> {
    let cases = WeightFiles::open_file(input)?;
    let bad = |msg: String| TrainerError::Input(format!("{}: {msg}", input.display()));
    let ids_ref = cases.get("input_ids")?;
    let (ids, [b, t]) = int_matrix(&ids_ref).map_err(bad)?;
    let mask = if cases.contains("attention_mask") {
        let mask_ref = cases.get("attention_mask")?;
        let (mask, shape) = int_matrix(&mask_ref).map_err(bad)?;
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
    let (config, model) = load_model(model_dir, device)?;
    if let Some(i) = ids
        .iter()
        .position(|&id| id < 0 || id as usize >= config.vocab_size)
    {
        return Err(bad(format!(
            "`input_ids` row {}, column {} holds {}, outside the model's vocab of {}",
            i / t,
            i % t,
            ids[i],
            config.vocab_size
        )));
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [b, t]), device);
    let logits = model.logits(model.hidden(ids, mask));
    let vocab = config.vocab_size;
    let values = logits
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| TrainerError::Input(format!("reading logits back: {e:?}")))?;
    let tensors = BTreeMap::from([(
        "logits".to_string(),
        OwnedTensor::from_f32(&values, vec![b, t, vocab], WeightDtype::F32),
    )]);
    checkpoints::write_safetensors(out, &tensors)?;
    Ok(LogitsShape {
        batch: b,
        tokens: t,
        vocab,
    })
}

fn int_matrix(t: &TensorRef<'_>) -> std::result::Result<(Vec<i64>, [usize; 2]), String> {
    let &[b, n] = t.shape else {
        return Err(format!("`{}` must be 2-D [batch, tokens], got shape {:?}", t.name, t.shape));
    };
    if b == 0 || n == 0 {
        return Err(format!("`{}` is empty (shape {:?})", t.name, t.shape));
    }
    let values = t
        .to_i64()
        .ok_or_else(|| format!("`{}` must be I64 or I32, got {:?}", t.name, t.dtype))?;
    Ok((values, [b, n]))
}
