//! A hearth reward model (or any `LlamaForSequenceClassification` checkpoint) as a reward:
//! prompt + completion are rendered through the reward model's own chat template as one
//! more assistant turn, tokenised with its tokenizer, and scored at the last real token.

use std::path::Path;

use burn::tensor::Device;
use data::render::{TemplateChoice, template_for_tuned};
use data::{ChatTemplate, Message};

use super::{Reward, Sample};
use crate::Result;
use crate::evaluate::{finite_scores, load_on, score_sequences};
use crate::model::Llama;

pub struct RewardModel {
    name: String,
    model: Llama,
    pad: u32,
    template: ChatTemplate,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
}

impl RewardModel {
    /// Loads the model in `dir` (with `adapter`, a SEQ_CLS adapter, if given) onto the
    /// plain (non-autodiff) version of `device`.
    pub fn load(name: String, dir: &Path, adapter: Option<&Path>, device: &Device) -> Result<Self> {
        let device = device.clone().inner();
        // The head is checked before the weights are loaded.
        if !crate::model::reward_head(dir, adapter)? {
            return Err(crate::TrainerError::Input(format!(
                "{}: not a reward model (no score head); train one with method = \"reward\"",
                dir.display()
            )));
        }
        let (model, pad, tokenizer) = load_on(dir, adapter, &device)?;
        Ok(Self {
            name,
            model,
            pad,
            template: template_for_tuned(dir, adapter, TemplateChoice::Shipped(None))?,
            tokenizer,
            device,
        })
    }
}

impl Reward for RewardModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, samples: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        let mut seqs = Vec::with_capacity(samples.len());
        for s in samples {
            let mut messages = s.prompt.to_vec();
            messages.push(Message::new("assistant", s.completion));
            let text = self.template.render(&messages, false)?;
            seqs.push(data::chat::encode(&self.tokenizer, &text)?);
        }
        let at = |i: usize| format!("reward `{}`: completion {}", self.name, i + 1);
        let scores = score_sequences(&self.model, &seqs, self.pad, &self.device, &at)?;
        Ok(finite_scores(scores, |i| format!("{}: the score", at(i)))?
            .into_iter()
            .map(Some)
            .collect())
    }
}
