//! `hearth generate`: a conversation with a model (and its adapter), one user message at a
//! time, each answered through the model's chat template with the whole conversation so far;
//! or a file of prompts answered in batches.

use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use burn::tensor::Device;
use data::render::{TemplateChoice, template_for_tuned};
use data::{ChatTemplate, Example, Message};

use crate::generate::{Sampling, generate, generate_groups_streams, row_streams, stop_tokens};
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
    /// The model's and adapter's directories, which no output may overwrite.
    inputs: Vec<std::path::PathBuf>,
    /// The model's `max_position_embeddings`: prompts that run past it are answered, as
    /// transformers answers them, but with a warning.
    context: usize,
}

impl Chat {
    /// Loads the model with its adapter and template; bad sampling settings are refused
    /// before anything is loaded.
    pub fn open(o: ChatOptions<'_>) -> Result<Self> {
        o.sampling.validate().map_err(|e| match e {
            TrainerError::Input(msg) => TrainerError::Input(format!("generate: {msg}")),
            other => other,
        })?;
        crate::model::refuse_reward_model(o.model, o.adapter)?;
        let (config, model) = load_tuned(o.model, o.adapter, o.device)?;
        if o.sampling.max_new_tokens > config.max_position_embeddings {
            return Err(TrainerError::Input(format!(
                "generate: --max-new-tokens {} is more than the model's context \
                 (max_position_embeddings {} in {})",
                o.sampling.max_new_tokens,
                config.max_position_embeddings,
                o.model.display()
            )));
        }
        let template =
            template_for_tuned(o.model, o.adapter, TemplateChoice::new(o.template, None))?;
        let tokenizer = crate::model::load_tokenizer(o.model, config.vocab_size)?;
        let stop = stop_tokens(o.model, &config, &tokenizer);
        Ok(Self {
            model,
            tokenizer,
            template,
            stop,
            sampling: o.sampling,
            context: config.max_position_embeddings,
            device: o.device.clone(),
            inputs: [Some(o.model), o.adapter]
                .into_iter()
                .flatten()
                .map(Path::to_path_buf)
                .collect(),
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
        if let Some(w) = self.past_context(&[prompt.len()], "the conversation") {
            eprintln!("warning: {w}");
        }
        crate::model::mask::check_attention_size(
            1,
            prompt.len() + self.sampling.max_new_tokens,
            "the conversation",
        )?;
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

    /// Answers every prompt of the data file `input` (any shape hearth reads: prompts,
    /// the prompts of preference pairs, or conversations, answered afresh at their last
    /// assistant turn), `batch_size` prompts per decoding batch, and writes one
    /// `{"index", "reply", "tokens", "stopped"}` line per row, in order, to `out`, whole or
    /// not at all. The conversation so far (its system message) opens every prompt.
    pub fn answer_file(
        &self,
        input: &Path,
        out: &Path,
        batch_size: usize,
        samples: usize,
    ) -> Result<Answered> {
        if batch_size == 0 {
            return Err(TrainerError::Input(
                "generate: --batch-size must be at least 1".into(),
            ));
        }
        if samples == 0 {
            return Err(TrainerError::Input(
                "generate: --samples must be at least 1".into(),
            ));
        }
        let mut inputs: Vec<&Path> = self.inputs.iter().map(|p| p.as_path()).collect();
        inputs.push(input);
        checkpoints::guard::check_output_file(out, &inputs)?;
        data::output::check_jsonl_name(out, "replies")?;
        let loaded = data::load_examples(input, &Default::default())?;
        let prompts = prompts_to_answer(&loaded, &input.display().to_string())?;
        let started = Instant::now();
        let replies = self.answer_all(&prompts, batch_size, samples)?;
        let mut text = String::new();
        let mut tokens = 0;
        for (j, r) in replies.into_iter().enumerate() {
            tokens += r.tokens;
            let line = ReplyLine {
                index: j / samples,
                sample: (samples > 1).then_some(j % samples),
                reply: r.text,
                tokens: r.tokens,
                stopped: r.stopped,
            };
            text.push_str(&serde_json::to_string(&line).unwrap_or_default());
            text.push('\n');
        }
        let seconds = started.elapsed().as_secs_f64();
        checkpoints::write_text(out, &text)?;
        Ok(Answered {
            prompts: prompts.len(),
            tokens,
            seconds,
        })
    }

    /// Answers each of `prompts` (the conversation so far, its system message, opening
    /// each) `samples` times, `batch_size` prompts per decoding batch: replies in prompt
    /// order, a prompt's samples together.
    pub fn answer_all(
        &self,
        prompts: &[Vec<Message>],
        batch_size: usize,
        samples: usize,
    ) -> Result<Vec<Reply>> {
        let mut ids = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut messages = self.messages.clone();
            messages.extend(p.iter().cloned());
            let rendered = self.template.render(&messages, true)?;
            ids.push(data::chat::encode(&self.tokenizer, &rendered)?);
        }
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        if let Some(w) = self.past_context(&lengths, "prompt") {
            eprintln!("warning: {w}");
        }
        let mut out = Vec::with_capacity(prompts.len() * samples);
        for (c, batch) in ids.chunks(batch_size.max(1)).enumerate() {
            // Each reply draws from its own stream, numbered by its place in the input:
            // `--batch-size` changes the speed, never the replies.
            let mut streams = row_streams(
                self.sampling.seed,
                c * batch_size.max(1) * samples,
                batch.len() * samples,
            );
            let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
            if let Some(j) = batch.iter().position(|p| p.len() == longest) {
                crate::model::mask::check_attention_size(
                    batch.len() * samples,
                    longest + self.sampling.max_new_tokens,
                    &format!("prompt {}", c * batch_size.max(1) + j + 1),
                )?;
            }
            let done = generate_groups_streams(
                &self.model,
                batch,
                samples,
                &self.stop,
                &self.sampling,
                &mut streams,
                &self.device,
            )?;
            for c in done {
                let text = self
                    .tokenizer
                    .decode(&c.tokens, true)
                    .map_err(|e| TrainerError::Input(format!("decoding: {e}")))?;
                out.push(Reply {
                    text,
                    tokens: c.tokens.len(),
                    stopped: c.stop.is_some(),
                });
            }
        }
        Ok(out)
    }

    /// A warning when any prompt of these token lengths, with `max_new_tokens` after it,
    /// runs past the model's context: positions beyond it were never trained, so replies
    /// there are unreliable. It counts and places them (prompts numbered from 1) and
    /// quotes none.
    fn past_context(&self, lengths: &[usize], what: &str) -> Option<String> {
        let new = self.sampling.max_new_tokens;
        let past: Vec<usize> = (0..lengths.len())
            .filter(|&i| lengths[i].saturating_add(new) > self.context)
            .collect();
        let &first = past.first()?;
        let which = match lengths.len() {
            1 => format!("{what} ({} tokens)", lengths[first]),
            n => format!(
                "{} of {n} {what}s (the first is {what} {}, {} tokens)",
                past.len(),
                first + 1,
                lengths[first]
            ),
        };
        Some(format!(
            "{which} with --max-new-tokens {new} runs past the model's context \
             (max_position_embeddings {}); replies beyond it are unreliable",
            self.context
        ))
    }

    /// The model's context, `max_position_embeddings`.
    pub(crate) fn context(&self) -> usize {
        self.context
    }

    /// The loaded model, its tokenizer and template, and the device it runs on.
    pub(crate) fn parts(&self) -> (&Llama, &tokenizers::Tokenizer, &ChatTemplate, &Device) {
        (&self.model, &self.tokenizer, &self.template, &self.device)
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

/// One line of `hearth generate --out`.
#[derive(Serialize)]
struct ReplyLine {
    /// The row's place in the input, from 0.
    index: usize,
    /// Which of the row's replies, from 0; only with `--samples` above 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    sample: Option<usize>,
    reply: String,
    /// New tokens, the stop token not counted.
    tokens: usize,
    /// Whether a stop token ended it (else `max_new_tokens` did).
    stopped: bool,
}

/// One generated reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    /// New tokens, the stop token not counted.
    pub tokens: usize,
    /// Whether a stop token ended it (else `max_new_tokens` did).
    pub stopped: bool,
}

/// What [`Chat::answer_file`] did.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    pub prompts: usize,
    /// New tokens over every reply.
    pub tokens: usize,
    /// Wall time of tokenising and decoding, loading aside.
    pub seconds: f64,
}

/// The messages a row asks to be answered: a prompt, a pair's prompt, or a conversation up
/// to its last assistant turn.
/// Every row's prompt to answer (see [`prompt_of`]); a row with nothing to answer is named
/// by `origin` and its location.
pub(crate) fn prompts_to_answer(loaded: &data::Loaded, origin: &str) -> Result<Vec<Vec<Message>>> {
    let mut prompts = Vec::with_capacity(loaded.examples.len());
    for (e, at) in loaded.examples.iter().zip(&loaded.locations) {
        let messages = prompt_of(e);
        if messages.last().is_none_or(|m| m.role == "assistant") {
            return Err(TrainerError::Input(format!(
                "{origin}: {at}: nothing to answer (no user message before the reply)"
            )));
        }
        prompts.push(messages.to_vec());
    }
    Ok(prompts)
}

fn prompt_of(e: &Example) -> &[Message] {
    match e {
        Example::Prompt { prompt, .. } | Example::Pair { prompt, .. } => prompt,
        Example::Conversation { messages, .. } => {
            let end = messages
                .iter()
                .rposition(|m| m.role == "assistant")
                .filter(|&i| i + 1 == messages.len())
                .unwrap_or(messages.len());
            &messages[..end]
        }
    }
}
