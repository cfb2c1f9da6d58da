//! The scalar `score` head that turns the decoder into a reward model, as transformers'
//! `*ForSequenceClassification` has it: `[1, hidden]`, no bias, no `lm_head`.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor};
use checkpoints::peft::{self, SCORE_KEY};
use checkpoints::{ModelConfig, WeightFiles};

use super::ids::with_path_ids;
use super::linear::{Linear, Weight};
use super::llama::Llama;
use crate::{Result, TrainerError};

/// transformers' `initializer_range` default, the std of a fresh head.
const INIT_STD: f64 = 0.02;

/// Gives `model` a fresh score head (drawn from the device's seeded generator) unless it
/// already has one, and drops the language-model head.
pub fn with_score_head(mut model: Llama, device: &Device) -> Llama {
    if model.score.is_none() {
        let hidden = model.embed_tokens.dims()[1];
        model.score = Some(Linear {
            weight: Weight::Dense(Param::from_tensor(Tensor::random(
                [1, hidden],
                Distribution::Normal(0.0, INIT_STD),
                device,
            ))),
            bias: None,
            lora: None,
        });
    }
    model.lm_head = None;
    with_path_ids(model)
}

/// Refuses a classifier head of other than one label as a reward model: a reward is one
/// number per sequence. `source` names where the head comes from.
pub fn one_label(source: &str, labels: usize) -> Result<()> {
    if labels == 1 {
        return Ok(());
    }
    Err(TrainerError::Input(format!(
        "{source}: a reward model needs one label; this classifier has {labels}"
    )))
}

/// The score head a model would be loaded with, as its config and its adapter's header
/// say: where it comes from (the model's directory, or the adapter's, whose head replaces
/// the base's), how to name it in an error, and its label count when it is a matrix.
struct ScoreHead {
    from: PathBuf,
    name: String,
    labels: Option<usize>,
}

/// The score head of the model in `dir` with the PEFT `adapter` on it, if it has one; read
/// before any weights are loaded.
fn score_head(dir: &Path, adapter: Option<&Path>) -> Result<Option<ScoreHead>> {
    if let Some(adapter) = adapter {
        let path = adapter.join(peft::WEIGHTS_FILE);
        let files = WeightFiles::open_file(&path)?;
        if files.contains(SCORE_KEY) {
            let labels = match files.get(SCORE_KEY)?.shape[..] {
                [labels, _] => Some(labels),
                // Refused by its shape when it is loaded.
                _ => None,
            };
            return Ok(Some(ScoreHead {
                from: adapter.to_path_buf(),
                name: format!("{}: `{SCORE_KEY}`", path.display()),
                labels,
            }));
        }
    }
    let config = ModelConfig::from_path(dir)?;
    Ok(config.score_labels.map(|labels| ScoreHead {
        from: dir.to_path_buf(),
        name: dir.display().to_string(),
        labels: Some(labels),
    }))
}

/// Whether the model in `dir` (with the PEFT `adapter`, when given) has a reward model's
/// score head, read from its config and the adapter's header alone, so a wrong head is
/// refused before any weights are loaded or any reply generated. A head of other than one
/// label is an error ([`one_label`]).
pub fn reward_head(dir: &Path, adapter: Option<&Path>) -> Result<bool> {
    let Some(head) = score_head(dir, adapter)? else {
        return Ok(false);
    };
    if let Some(labels) = head.labels {
        one_label(&head.name, labels)?;
    }
    Ok(true)
}

/// Refuses to run the model in `dir` (with `adapter`) as a language model when it is a
/// reward model (a score head, no language-model head): its token logits would otherwise
/// come from the embeddings, silently. Read before any weights are loaded.
pub fn refuse_reward_model(dir: &Path, adapter: Option<&Path>) -> Result<()> {
    let Some(head) = score_head(dir, adapter)? else {
        return Ok(());
    };
    Err(TrainerError::Input(format!(
        "{}: is a reward model (a score head, no language-model head): it gives one score \
         per sequence, not tokens; score with `hearth reward score`",
        head.from.display()
    )))
}
