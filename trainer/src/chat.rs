//! `hearth generate`: a conversation with a model (and its adapter), one user message at a
//! time, each answered through the model's chat template with the whole conversation so far.

use std::io::BufRead;
use std::path::Path;

use burn::tensor::Device;
use data::render::{TemplateChoice, template_for};
use data::{ChatTemplate, Message};

use crate::generate::{Sampling, generate, stop_tokens};
use crate::model::{Llama, load_tuned};
use crate::{Result, TrainerError};

/// What a conversation runs on.
pub struct ChatOptions<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    /// A built-in template (`llama3`, `chatml`) instead of the model's own.
    pub template: Option<&'a str>,
    pub system: Option<&'a str>,
    pub sampling: Sampling,
    pub device: &'a Device,
}

/// A loaded model and the conversation so far.
pub struct Chat {
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    template: ChatTemplate,
    stop: Vec<u32>,
    sampling: Sampling,
    device: Device,
    messages: Vec<Message>,
}

impl Chat {
    /// Loads the model with its adapter and template; bad sampling settings are refused
    /// before anything is loaded.
    pub fn open(o: ChatOptions<'_>) -> Result<Self> {
        o.sampling.validate().map_err(|e| match e {
            TrainerError::Input(msg) => TrainerError::Input(format!("generate: {msg}")),
            other => other,
        })?;
        let (config, model) = load_tuned(o.model, o.adapter, o.device)?;
        let template = template_for(o.model, TemplateChoice::new(o.template, None))?;
        let tokenizer = crate::model::load_tokenizer(o.model, config.vocab_size)?;
        let stop = stop_tokens(o.model, &config, &tokenizer);
        Ok(Self {
            model,
            tokenizer,
            template,
            stop,
            sampling: o.sampling,
            device: o.device.clone(),
            messages: o
                .system
                .map(|s| Message::new("system", s.to_string()))
                .into_iter()
                .collect(),
        })
    }

    /// Answers one user message; both join the conversation.
    pub fn reply(&mut self, text: String) -> Result<String> {
        self.messages.push(Message::new("user", text));
        let rendered = self.template.render(&self.messages, true)?;
        let prompt = data::chat::encode(&self.tokenizer, &rendered)?;
        let ids = generate(
            &self.model,
            &prompt,
            &self.stop,
            &self.sampling,
            &self.device,
        )?;
        let answer = self
            .tokenizer
            .decode(&ids, true)
            .map_err(|e| TrainerError::Input(format!("decoding: {e}")))?;
        self.messages
            .push(Message::new("assistant", answer.clone()));
        Ok(answer)
    }

    /// Converses over `input`: each non-blank line is a user message, and each answer goes
    /// to `emit` as soon as it is made.
    pub fn converse<E: From<TrainerError>>(
        &mut self,
        input: impl BufRead,
        mut emit: impl FnMut(&str) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        for line in input.lines() {
            let line =
                line.map_err(|e| TrainerError::Input(format!("reading standard input: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let answer = self.reply(line)?;
            emit(&answer)?;
        }
        Ok(())
    }
}
