//! The simulated client. A model client sees the session from the other chair: its
//! persona as the system prompt, the client's turns as its own (assistant) turns and the
//! counselor's as the user's; it keeps its own KV cache across turns, as the policy does.
//! A command client is any program speaking JSON lines: for each session that waits on the
//! client it receives `{"id", "turn", "messages": [{"role", "content"}…], …row columns}`
//! (the counselor's view: user = client) and answers one line: the client's turn as a JSON
//! string or `{"content": "…"}`, or `{"end": true}` to end the session.

use std::path::Path;

use burn::tensor::Device;
use data::{ChatTemplate, Message};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value, json};

use super::ClientSection;
use super::persona::persona;
use super::streams::Streams;
use super::turns::{after_reply, opening};
use crate::generate::{Sampling, stop_tokens};
use crate::jsonl_process::JsonLinesProcess;
use crate::model::Llama;
use crate::{Result, TrainerError};

/// One client turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Says(String),
    Ends,
}

pub enum Client {
    Model(Box<ModelClient>),
    Command(CommandClient),
}

/// Where a model client's weights come from.
pub enum ClientWeights {
    /// Its own checkpoint (or a copy of the base, when the policy trains every weight).
    Own(Box<Llama>),
    /// The policy's frozen base: the policy of each rollout with its adapters left out,
    /// sharing the base weights instead of holding a second copy.
    PolicyBase,
}

pub struct ModelClient {
    pub weights: ClientWeights,
    /// The policy's base, for the rollout under way (with [`ClientWeights::PolicyBase`]).
    current: Option<Llama>,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    pub stop: Vec<u32>,
    pub sampling: Sampling,
    pub persona_template: Option<String>,
    pub end_text: Option<String>,
    pub device: Device,
    /// The client model's `max_position_embeddings`, and where it was read.
    context: usize,
    dir: std::path::PathBuf,
}

pub struct CommandClient {
    process: JsonLinesProcess,
}

impl Client {
    /// Ends a command client's program once training is done: answers past its last
    /// question fail the run (see [`JsonLinesProcess::close`]).
    pub fn finish(&mut self) -> Result<()> {
        match self {
            Self::Command(c) => c.process.close(),
            Self::Model(_) => Ok(()),
        }
    }

    /// Loads or starts the client. A model client without a `path` is the frozen base in
    /// `base` (configured by `base_config`), with the policy's template (`template`): taken from the policy itself when
    /// it trains adapters (`shares_base`), else loaded; one with a `path` uses that
    /// checkpoint's own tokenizer and template. Loaded weights take `precision`.
    pub fn start(
        section: &ClientSection,
        base: &Path,
        template: ChatTemplate,
        base_config: &checkpoints::ModelConfig,
        shares_base: bool,
        precision: crate::model::precision::Precision,
        device: &Device,
    ) -> Result<Self> {
        let bad = |e: TrainerError| TrainerError::Input(format!("grpo.client: {e}"));
        if section.kind == "command" {
            let argv = section.command.clone().unwrap_or_default();
            return Ok(Self::Command(CommandClient {
                process: JsonLinesProcess::spawn("client command", argv, section.timeout_s)
                    .map_err(bad)?,
            }));
        }
        let (dir, template) = match &section.path {
            Some(p) => {
                let t = data::render::template_for(p, data::render::TemplateChoice::Shipped(None))
                    .map_err(|e| match e {
                        // The client speaks through the template its checkpoint ships;
                        // data.template is the policy's.
                        data::DataError::Template { .. } => TrainerError::Input(format!(
                            "grpo.client.path {}: ships no chat template (chat_template.jinja, \
                             or chat_template in tokenizer_config.json), which a client model \
                             speaks through; add one to it",
                            p.display()
                        )),
                        other => bad(other.into()),
                    })?;
                (p.as_path(), t)
            }
            None => (base, template),
        };
        // The client speaks: a reward model (a score head, no language-model head) cannot.
        crate::model::refuse_reward_model(dir, section.adapter.as_deref()).map_err(bad)?;
        let shared = shares_base && section.path.is_none() && section.adapter.is_none();
        let (config, weights) = if shared {
            (base_config.clone(), ClientWeights::PolicyBase)
        } else {
            let (config, model) =
                crate::model::load_tuned(dir, section.adapter.as_deref(), device).map_err(bad)?;
            let model = crate::model::with_precision(model, precision);
            (config, ClientWeights::Own(Box::new(model)))
        };
        // As the counselor's grpo.max_completion_length is held to the policy's context.
        if section.max_new_tokens > config.max_position_embeddings {
            return Err(TrainerError::Input(format!(
                "grpo.client.max_new_tokens {} is more than the client model's context \
                 (max_position_embeddings {} in {})",
                section.max_new_tokens,
                config.max_position_embeddings,
                dir.display()
            )));
        }
        let tokenizer = crate::model::load_tokenizer(dir, config.vocab_size).map_err(bad)?;
        let stop = stop_tokens(dir, &config, &tokenizer);
        Ok(Self::Model(Box::new(ModelClient {
            weights,
            current: None,
            tokenizer,
            template,
            stop,
            sampling: Sampling {
                max_new_tokens: section.max_new_tokens,
                temperature: section.temperature,
                top_k: section.top_k,
                top_p: section.top_p,
                seed: 0,
            },
            persona_template: section.persona_template.clone(),
            end_text: section.end_text.clone().filter(|t| !t.is_empty()),
            device: device.clone(),
            context: config.max_position_embeddings,
            dir: dir.to_path_buf(),
        })))
    }

    /// Checks that every row of `file` has what the persona template asks for, and that
    /// its persona leaves the client model room to speak, before any step: the client
    /// reads the whole persona at once, and one far past its context took memory by the
    /// square of its length until the process was killed.
    pub fn check_rows(&self, extras: &[&Map<String, Value>], file: &std::path::Path) -> Result<()> {
        if let Self::Model(m) = self {
            for (i, e) in extras.iter().enumerate() {
                let row = format!("training prompt {}", i + 1);
                let at = |e: String| TrainerError::Input(format!("{}: {e}", file.display()));
                let system = persona(m.persona_template.as_deref(), e, &row).map_err(at)?;
                let rendered = m
                    .template
                    .render(&[Message::new("system", system)], true)
                    .map_err(|e| at(format!("{row}: the client's persona: {e}")))?;
                let tokens = data::chat::encode(&m.tokenizer, &rendered)
                    .map_err(|e| at(format!("{row}: the client's persona: {e}")))?
                    .len();
                let reach = tokens + m.sampling.max_new_tokens;
                if reach > m.context {
                    return Err(at(format!(
                        "{row}: the client's persona takes {tokens} tokens, and with \
                         grpo.client.max_new_tokens = {} its first turn could reach {reach}, \
                         past the client model's context ({} in {}); shorten the row's persona \
                         (or grpo.client.persona_template)",
                        m.sampling.max_new_tokens,
                        m.context,
                        m.dir.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The client's side of the sessions of one rollout by `policy`: `extras[r]` holds row
    /// `r`'s columns and `names[r]` names it in errors.
    pub fn sessions<'a>(
        &'a mut self,
        policy: &Llama,
        extras: &[&Map<String, Value>],
        names: &[String],
    ) -> Result<ClientSessions<'a>> {
        Ok(match self {
            Self::Model(m) => {
                if let ClientWeights::PolicyBase = m.weights {
                    m.current = Some(crate::model::adapter::strip_lora(policy.clone()));
                }
                let m: &'a ModelClient = m;
                let model: &Llama = match (&m.weights, &m.current) {
                    (ClientWeights::Own(model), _) => model,
                    (_, Some(model)) => model,
                    (ClientWeights::PolicyBase, None) => {
                        return Err(TrainerError::Input(
                            "internal: the client has no weights".into(),
                        ));
                    }
                };
                let personas = extras
                    .iter()
                    .zip(names)
                    .map(|(e, n)| persona(m.persona_template.as_deref(), e, n))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(TrainerError::Input)?;
                let rows = personas.len();
                ClientSessions::Model(Box::new(ModelSessions {
                    client: m,
                    streams: Streams::new(model, rows, &m.device),
                    views: personas
                        .into_iter()
                        .map(|p| vec![Message::new("system", p)])
                        .collect(),
                    seen: vec![0; rows],
                    last: vec![None; rows],
                }))
            }
            Self::Command(c) => ClientSessions::Command {
                client: c,
                extras: extras.iter().map(|e| (*e).clone()).collect(),
                turns: vec![0; extras.len()],
            },
        })
    }
}

/// A model client's state over one rollout's sessions.
pub struct ModelSessions<'a> {
    client: &'a ModelClient,
    streams: Streams<'a>,
    /// The client's view of each session; once it has spoken, its last reply is last.
    views: Vec<Vec<Message>>,
    /// Dialogue messages already in each view.
    seen: Vec<usize>,
    /// The last token each row sampled, not yet fed, and whether it was the stop token.
    last: Vec<Option<(u32, bool)>>,
}

pub enum ClientSessions<'a> {
    Model(Box<ModelSessions<'a>>),
    Command {
        client: &'a mut CommandClient,
        extras: Vec<Map<String, Value>>,
        turns: Vec<usize>,
    },
}

/// The session as the client model sees it: the counselor's system prompt is not its own.
fn swapped(messages: &[Message]) -> impl Iterator<Item = Message> + '_ {
    messages.iter().filter_map(|m| match m.role.as_str() {
        "user" => Some(Message::new("assistant", m.content.clone())),
        "assistant" => Some(Message::new("user", m.content.clone())),
        _ => None,
    })
}

impl ClientSessions<'_> {
    /// One client turn for every session `r` with `speaks[r]`, given each session's
    /// dialogue in the counselor's view. Returns the turns, and the tokens the client
    /// produced for each row.
    pub fn turn(
        &mut self,
        dialogues: &[&[Message]],
        speaks: &[bool],
        rng: &mut ChaCha8Rng,
    ) -> Result<(Vec<Option<Reply>>, Vec<usize>)> {
        match self {
            Self::Model(m) => m.turn(dialogues, speaks, rng),
            Self::Command {
                client,
                extras,
                turns,
            } => {
                let rows: Vec<usize> = (0..speaks.len()).filter(|&r| speaks[r]).collect();
                let questions: Vec<Value> = rows
                    .iter()
                    .map(|&r| {
                        let mut q = json!({
                            "id": r,
                            "turn": turns[r],
                            "messages": dialogues[r].iter()
                                .map(|m| json!({"role": m.role, "content": m.content}))
                                .collect::<Vec<_>>(),
                        });
                        for (k, v) in &extras[r] {
                            if q.get(k).is_none() {
                                q[k] = v.clone();
                            }
                        }
                        q
                    })
                    .collect();
                let replies = client
                    .process
                    .ask_parsed(&questions, CommandClient::parse)?;
                let mut out = vec![None; speaks.len()];
                for (&r, reply) in rows.iter().zip(replies) {
                    // `turn` counts the turns the client took: an end is none, and an
                    // opening asked again is still turn 0.
                    if matches!(reply, Reply::Says(_)) {
                        turns[r] += 1;
                    }
                    out[r] = Some(reply);
                }
                Ok((out, vec![0; speaks.len()]))
            }
        }
    }
}

impl CommandClient {
    fn parse(process: &JsonLinesProcess, line: usize, text: &str) -> Result<Reply> {
        let fail = |msg: String| process.fail_at(line, msg);
        let v: Value =
            serde_json::from_str(text.trim()).map_err(|e| fail(format!("not JSON ({e})")))?;
        let says = |s: &str| {
            let s = s.trim();
            if s.is_empty() {
                Reply::Ends
            } else {
                Reply::Says(s.to_string())
            }
        };
        match &v {
            Value::String(s) => Ok(says(s)),
            Value::Object(o) if o.get("end") == Some(&Value::Bool(true)) => Ok(Reply::Ends),
            Value::Object(o) => match o.get("content") {
                Some(Value::String(s)) => Ok(says(s)),
                _ => Err(fail(
                    "expected the client's turn as a JSON string, {\"content\": \"…\"}, or {\"end\": true}"
                        .into(),
                )),
            },
            _ => Err(fail(
                "expected the client's turn as a JSON string, {\"content\": \"…\"}, or {\"end\": true}"
                    .into(),
            )),
        }
    }
}

impl ModelSessions<'_> {
    fn turn(
        &mut self,
        dialogues: &[&[Message]],
        speaks: &[bool],
        rng: &mut ChaCha8Rng,
    ) -> Result<(Vec<Option<Reply>>, Vec<usize>)> {
        let c = self.client;
        let mut chunks = vec![Vec::new(); speaks.len()];
        for r in (0..speaks.len()).filter(|&r| speaks[r]) {
            let new: Vec<Message> = swapped(&dialogues[r][self.seen[r]..]).collect();
            self.seen[r] = dialogues[r].len();
            let view = &mut self.views[r];
            chunks[r] = match self.last[r] {
                None => {
                    view.extend(new);
                    opening(&c.template, &c.tokenizer, view)?
                }
                Some((token, stopped)) => {
                    let before = &view[..view.len() - 1];
                    let tail = after_reply(
                        &c.template,
                        &c.tokenizer,
                        before,
                        &new,
                        stopped.then_some(token),
                    )?;
                    view.extend(new);
                    std::iter::once(token).chain(tail).collect()
                }
            };
        }
        self.streams.feed(&chunks)?;
        let turns = self.streams.decode(speaks, &c.stop, &c.sampling, rng)?;
        let mut replies = vec![None; speaks.len()];
        let mut tokens = vec![0; speaks.len()];
        for (r, turn) in turns.into_iter().enumerate() {
            let Some(turn) = turn else { continue };
            let trained = turn.trained_tokens();
            tokens[r] = trained.len();
            let text = c.tokenizer.decode(&turn.tokens, true).unwrap_or_default();
            self.last[r] = trained.last().map(|&t| (t, turn.stop.is_some()));
            self.views[r].push(Message::new("assistant", text.clone()));
            let text = text.trim();
            let ends = text.is_empty() || c.end_text.as_deref().is_some_and(|e| text.contains(e));
            replies[r] = Some(if ends {
                Reply::Ends
            } else {
                Reply::Says(text.to_string())
            });
            self.seen[r] += 1;
        }
        Ok((replies, tokens))
    }
}
