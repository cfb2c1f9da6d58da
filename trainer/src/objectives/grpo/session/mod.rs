//! Session rollouts (`[grpo] rollout = "session"`): the policy plays the counselor over a
//! whole session against a simulated client, and GRPO's advantage is per session.
//!
//! - [`streams`]: batched token streams that grow turn by turn over one KV cache each;
//! - [`turns`]: the template text between one turn and the next, so a stream only ever
//!   appends;
//! - [`client`]: the client, a model prompted with a persona or an external command;
//! - [`rollout`]: the sessions of one step, played in lockstep;
//! - [`score`]: per-turn rewards folded into one reward per session.

pub mod client;
pub mod persona;
pub mod rollout;
pub mod score;
pub mod streams;
pub mod turns;

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most counselor turns a session may take (`grpo.max_turns`).
pub const MAX_TURNS: usize = 1024;

/// `[grpo.client]`: who plays the client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSection {
    /// `model` (a checkpoint, by default the frozen base) or `command`.
    pub kind: String,
    /// `model`: the client's checkpoint (HF directory or GGUF); the frozen base when unset.
    #[serde(deserialize_with = "data::config::optional_named_path")]
    pub path: Option<PathBuf>,
    /// `model`: a PEFT adapter on `path`.
    #[serde(deserialize_with = "data::config::optional_named_path")]
    pub adapter: Option<PathBuf>,
    /// `model`: the client's system prompt, with `{column}` placeholders filled from the
    /// row (`{{` and `}}` are literal braces). Unset: a bundled default built from the
    /// row's `persona`, or Cactus's `intake_form`, `attitude` and `thought`.
    pub persona_template: Option<String>,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 turns top-k off.
    pub top_k: usize,
    /// New tokens per client turn at most.
    pub max_new_tokens: usize,
    /// `model`: a client turn containing this text ends the session (an empty turn always
    /// does).
    pub end_text: Option<String>,
    /// `command`: the program and its arguments, run without a shell.
    pub command: Option<Vec<String>>,
    /// `command`: seconds to wait for each answer.
    pub timeout_s: f64,
}

impl Default for ClientSection {
    fn default() -> Self {
        Self {
            kind: "model".into(),
            path: None,
            adapter: None,
            persona_template: None,
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 64,
            end_text: None,
            command: None,
            timeout_s: 60.0,
        }
    }
}

/// How per-turn rewards become a session's reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Mean,
    Last,
    Min,
    Sum,
}

impl FromStr for Aggregate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(Self::Mean),
            "last" => Ok(Self::Last),
            "min" => Ok(Self::Min),
            "sum" => Ok(Self::Sum),
            other => Err(format!(
                "grpo.aggregate `{other}` is not one of mean, last, min, sum"
            )),
        }
    }
}

impl Aggregate {
    /// The session's value of per-turn scores; `None` when no turn was scored.
    pub fn fold(self, scores: &[f64]) -> Option<f64> {
        let last = *scores.last()?;
        Some(match self {
            Self::Mean => scores.iter().sum::<f64>() / scores.len() as f64,
            Self::Last => last,
            Self::Min => scores.iter().copied().fold(f64::INFINITY, f64::min),
            Self::Sum => scores.iter().sum(),
        })
    }
}

/// Session settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSettings {
    /// Counselor turns per session at most.
    pub max_turns: usize,
    /// A session ends before a counselor turn that could take its tokens past this.
    pub max_session_tokens: usize,
    pub aggregate: Aggregate,
    pub client: ClientSection,
}

impl SessionSettings {
    pub fn new(
        max_turns: usize,
        max_session_tokens: usize,
        aggregate: &str,
        client: Option<&ClientSection>,
    ) -> Result<Self, String> {
        if max_turns == 0 || max_session_tokens == 0 {
            return Err("grpo.max_turns and grpo.max_session_tokens must be positive".into());
        }
        // Each turn takes a token at least, and no context holds 2^20 turns.
        if max_turns > MAX_TURNS {
            return Err(format!(
                "grpo.max_turns {max_turns} is more than {MAX_TURNS}"
            ));
        }
        let client = client.cloned().unwrap_or_default();
        // Keys one kind reads and the other would ignore without a word; a key left at its
        // default cannot be told from one not written, and changes nothing either way.
        let unset = ClientSection::default();
        match client.kind.as_str() {
            "model" => {
                if client.command.is_some() {
                    return Err("grpo.client.command is for kind = \"command\"".into());
                }
                if client.timeout_s != unset.timeout_s {
                    return Err(
                        "grpo.client.timeout_s is for kind = \"command\": a model client \
                         answers within max_new_tokens"
                            .into(),
                    );
                }
            }
            "command" => {
                // What only a model client reads would be ignored without a word.
                let model_only = [
                    ("path", client.path.is_some()),
                    ("adapter", client.adapter.is_some()),
                    ("persona_template", client.persona_template.is_some()),
                    ("end_text", client.end_text.is_some()),
                    // The sampling keys are left alone: a recipe written for a model client
                    // and switched to a command one with --set keeps them, and --set cannot
                    // unset a key.
                ];
                if let Some((key, _)) = model_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "grpo.client.{key} is for kind = \"model\"; a command client is the \
                         program itself, and ends a session by answering {{\"end\": true}}"
                    ));
                }
                if client.command.as_ref().is_none_or(Vec::is_empty) {
                    return Err(
                        "grpo.client kind = \"command\" needs `command`, e.g. [\"python3\", \"client.py\"]"
                            .into(),
                    );
                }
                if client
                    .command
                    .as_ref()
                    .is_some_and(|c| c[0].trim().is_empty())
                {
                    return Err("grpo.client.command's first element, the program, is empty".into());
                }
                if !(client.timeout_s > 0.0 && client.timeout_s <= crate::recipe::MAX_SECONDS) {
                    return Err(format!(
                        "grpo.client.timeout_s {} must be a positive number of seconds (at most \
                         {:e})",
                        crate::recipe::shown(client.timeout_s),
                        crate::recipe::MAX_SECONDS
                    ));
                }
            }
            other => {
                return Err(format!(
                    "grpo.client.kind `{other}` is not one of model, command"
                ));
            }
        }
        let sampling_ok = crate::generate::usable_temperature(client.temperature)
            && client.top_p > 0.0
            && client.top_p <= 1.0;
        if !sampling_ok {
            return Err(format!(
                "grpo.client: temperature {} must be 0 (greedy) or from {}, and top_p {} in \
                 (0, 1]",
                crate::recipe::shown(client.temperature),
                crate::generate::MIN_TEMPERATURE,
                client.top_p
            ));
        }
        if client.max_new_tokens == 0 {
            return Err("grpo.client.max_new_tokens must be positive".into());
        }
        if let Some(t) = &client.persona_template {
            persona::check_template(t).map_err(|e| format!("grpo.client.persona_template: {e}"))?;
        }
        Ok(Self {
            max_turns,
            max_session_tokens,
            aggregate: aggregate.parse()?,
            client,
        })
    }
}

/// Why a session stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// It reached `max_turns` counselor turns.
    MaxTurns,
    /// The client ended it.
    Client,
    /// The next counselor turn could have taken it past `max_session_tokens`.
    Length,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxTurns => "max_turns",
            Self::Client => "client",
            Self::Length => "length",
        }
    }
}

/// One played session: the counselor's token stream (what the policy saw and said, in
/// order) with the counselor's own tokens marked, and the dialogue as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The training prompt it opened from.
    pub opening: usize,
    /// The counselor's view: the row's prompt, then the turns.
    pub messages: Vec<data::Message>,
    /// Index in `messages` of the first message the session produced (the client's
    /// first turn when it opened, else the counselor's first reply).
    pub first_new: usize,
    pub ids: Vec<u32>,
    /// 1 on the counselor's sampled tokens (and the stop token that ended each turn).
    pub loss_mask: Vec<u8>,
    /// Counselor turns that `max_completion_length` cut off.
    pub truncated_turns: usize,
    /// Tokens the client produced.
    pub client_tokens: usize,
    pub end: End,
}

impl SessionRecord {
    /// The counselor's turns: (dialogue before the turn, the turn's text).
    pub fn counselor_turns(&self) -> impl Iterator<Item = (&[data::Message], &str)> {
        self.messages
            .iter()
            .enumerate()
            .skip(self.first_new)
            .filter(|(_, m)| m.is_assistant())
            .map(|(i, m)| (&self.messages[..i], m.content.as_str()))
    }

    pub fn turns(&self) -> usize {
        self.counselor_turns().count()
    }

    /// The counselor's trained tokens.
    pub fn trained(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m == 1).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::grpo::{GrpoSection, GrpoSettings};
    use crate::rewards::RewardSpec;

    fn section(f: impl FnOnce(&mut GrpoSection)) -> Result<GrpoSettings, String> {
        let mut g = GrpoSection {
            rollout: "session".into(),
            rewards: vec![RewardSpec {
                kind: "length".into(),
                name: None,
                weight: 1.0,
                min_words: Some(1),
                max_words: Some(4),
                model: None,
                adapter: None,
                command: None,
                timeout_s: None,
            }],
            ..Default::default()
        };
        f(&mut g);
        GrpoSettings::from_section(&g, 16)
    }

    #[test]
    fn session_settings_are_checked_and_name_their_key() {
        let s = section(|_| {}).unwrap().session.unwrap();
        assert_eq!(
            (s.max_turns, s.aggregate, s.client.kind.as_str()),
            (4, Aggregate::Mean, "model")
        );
        assert!(
            section(|g| g.rollout = "single".into())
                .unwrap()
                .session
                .is_none()
        );
        for (f, want) in [
            (
                Box::new(|g: &mut GrpoSection| g.rollout = "dialogue".into())
                    as Box<dyn FnOnce(&mut GrpoSection)>,
                "grpo.rollout `dialogue` is not one of single, session",
            ),
            (
                Box::new(|g: &mut GrpoSection| {
                    g.rollout = "single".into();
                    g.client = Some(ClientSection::default());
                }),
                "set grpo.rollout = \"session\"",
            ),
            (
                Box::new(|g: &mut GrpoSection| g.aggregate = "median".into()),
                "grpo.aggregate `median` is not one of mean, last, min, sum",
            ),
            (
                Box::new(|g: &mut GrpoSection| g.max_turns = 0),
                "grpo.max_turns and grpo.max_session_tokens must be positive",
            ),
            (
                Box::new(|g: &mut GrpoSection| {
                    g.client = Some(ClientSection {
                        kind: "command".into(),
                        ..Default::default()
                    })
                }),
                "needs `command`",
            ),
            (
                Box::new(|g: &mut GrpoSection| {
                    g.client = Some(ClientSection {
                        kind: "human".into(),
                        ..Default::default()
                    })
                }),
                "grpo.client.kind `human` is not one of model, command",
            ),
            (
                Box::new(|g: &mut GrpoSection| {
                    g.client = Some(ClientSection {
                        persona_template: Some("{intake form}".into()),
                        ..Default::default()
                    })
                }),
                "grpo.client.persona_template: `{intake form}` is not a column name",
            ),
            (
                Box::new(|g: &mut GrpoSection| {
                    g.client = Some(ClientSection {
                        temperature: -1.0,
                        ..Default::default()
                    })
                }),
                "grpo.client: temperature -1",
            ),
        ] {
            let e = section(f).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn aggregates_fold_turn_scores() {
        let s = [0.5, -1.0, 2.0];
        assert_eq!(Aggregate::Mean.fold(&s), Some(0.5));
        assert_eq!(Aggregate::Last.fold(&s), Some(2.0));
        assert_eq!(Aggregate::Min.fold(&s), Some(-1.0));
        assert_eq!(Aggregate::Sum.fold(&s), Some(1.5));
        assert_eq!(Aggregate::Mean.fold(&[]), None);
    }
}
