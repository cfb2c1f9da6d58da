//! Every dataset shape hearth reads, normalised into [`Example`]. All format-specific rules
//! (ShareGPT's roles, Cactus's dialogue lines, PsychoCounsel's `question`) live here; nothing
//! after `Example` knows where the data came from.

use std::str::FromStr;

use serde_json::{Map, Value};

use crate::Message;
use crate::read::{kind, showable, shown_name};

/// The shapes rows come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `messages`: [{role, content}].
    Messages,
    /// `conversations`: [{from, value}].
    ShareGpt,
    /// `instruction`, `input`, `output`, optional `system` and `history`.
    Alpaca,
    /// `prompt` and `completion`, each a string or a message list.
    PromptCompletion,
    /// `prompt`, `chosen`, `rejected`; or implicit: `chosen` and `rejected` are whole
    /// conversations whose shared prefix is the prompt.
    Preference,
    /// `prompt` alone (for GRPO); other columns are kept for reward functions.
    PromptOnly,
    /// PsychoCounsel-Preference: `question`, `chosen`, `rejected`, `*_rating`.
    PsychoCounsel,
    /// Cactus: a `dialogue` string of `Counselor:` / `Client:` lines.
    Cactus,
    /// CPsyCoun: Alpaca with `history` [[question, answer], ...].
    CpsyCoun,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "messages" | "conversational" => Self::Messages,
            "sharegpt" => Self::ShareGpt,
            "alpaca" => Self::Alpaca,
            "prompt_completion" => Self::PromptCompletion,
            "preference" => Self::Preference,
            "prompt_only" => Self::PromptOnly,
            "psychocounsel" => Self::PsychoCounsel,
            "cactus" => Self::Cactus,
            "cpsycoun" => Self::CpsyCoun,
            other => {
                return Err(format!(
                    "unknown format `{other}` (messages, sharegpt, alpaca, prompt_completion, \
                     preference, prompt_only, psychocounsel, cactus, cpsycoun)"
                ));
            }
        })
    }
}

impl Format {
    /// Every name a format is read by (`conversational` is `messages` too).
    pub const NAMES: [&'static str; 10] = [
        "messages",
        "conversational",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "preference",
        "prompt_only",
        "psychocounsel",
        "cactus",
        "cpsycoun",
    ];

    /// The name recipes and `--format` spell it with.
    pub fn name(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::ShareGpt => "sharegpt",
            Self::Alpaca => "alpaca",
            Self::PromptCompletion => "prompt_completion",
            Self::Preference => "preference",
            Self::PromptOnly => "prompt_only",
            Self::PsychoCounsel => "psychocounsel",
            Self::Cactus => "cactus",
            Self::CpsyCoun => "cpsycoun",
        }
    }

    /// Guesses the format from a row's columns.
    pub fn detect(fields: &Map<String, Value>) -> Result<Self, String> {
        Self::detect_preferring(fields, false)
    }

    /// As [`Format::detect`]; with `pairs_first`, a row with both `chosen` and `rejected`
    /// is a pair even when it has a `messages` or `conversations` column too.
    pub fn detect_preferring(
        fields: &Map<String, Value>,
        pairs_first: bool,
    ) -> Result<Self, String> {
        let has = |k: &str| fields.contains_key(k);
        if pairs_first && has("chosen") && has("rejected") {
            return Ok(if has("question") && !has("prompt") {
                Self::PsychoCounsel
            } else {
                Self::Preference
            });
        }
        Ok(if has("messages") {
            Self::Messages
        } else if has("conversations") {
            Self::ShareGpt
        } else if has("chosen") || has("rejected") {
            // Either half signals preference data; the missing one is then reported.
            if has("question") && !has("prompt") {
                Self::PsychoCounsel
            } else {
                Self::Preference
            }
        } else if has("dialogue") {
            Self::Cactus
        } else if has("instruction") && has("output") {
            // Alpaca exports write `"history": null` in rows without one; only a real
            // history marks CPsyCoun, which requires it.
            if fields.get("history").is_some_and(|h| !h.is_null()) {
                Self::CpsyCoun
            } else {
                Self::Alpaca
            }
        } else if has("prompt") && has("completion") {
            Self::PromptCompletion
        } else if has("prompt") {
            Self::PromptOnly
        } else {
            let mut cols: Vec<String> = fields.keys().map(|c| shown_name(c)).collect();
            cols.sort_unstable();
            return Err(format!(
                "cannot tell the format from the columns [{}]; set `format` (and `columns` to rename)",
                cols.join(", ")
            ));
        })
    }
}

/// The one internal shape of a training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A dialogue; assistant turns at index ≥ `train_from` are learned from.
    Conversation {
        messages: Vec<Message>,
        train_from: usize,
        extra: Map<String, Value>,
    },
    /// A preference pair: the shared prompt and the two continuations.
    Pair {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
        extra: Map<String, Value>,
    },
    /// A prompt to complete (GRPO), with the columns reward functions may read.
    Prompt {
        prompt: Vec<Message>,
        extra: Map<String, Value>,
    },
}

impl Example {
    /// What the train/eval split groups by: the prompt (everything before the first
    /// assistant turn), so pairs and dialogues that share a question stay together.
    ///
    /// A prompt in which no user speaks asks nothing of its own: a session the counselor
    /// opens, or a system prompt that every row shares. Keyed by it, every such row would be
    /// one group on one side of the split. So a dialogue keys by its messages through the
    /// client's first turn (the whole dialogue if the client never speaks), a pair by all
    /// it holds, and a prompt by its messages and its other columns (a simulated client's
    /// intake, say).
    pub fn group_key(&self) -> String {
        let asks = |ms: &[Message]| ms.iter().any(|m| m.role == "user");
        match self {
            Example::Conversation { messages, .. } => {
                let end = messages
                    .iter()
                    .position(Message::is_assistant)
                    .unwrap_or(messages.len());
                if asks(&messages[..end]) {
                    return key(&messages[..end]);
                }
                match messages.iter().position(|m| m.role == "user") {
                    Some(first) => key(&messages[..=first]),
                    None => key(messages),
                }
            }
            Example::Pair { prompt, .. } | Example::Prompt { prompt, .. } if asks(prompt) => {
                key(prompt)
            }
            Example::Pair {
                prompt,
                chosen,
                rejected,
                ..
            } => [prompt, chosen, rejected].map(|ms| key(ms)).join("\u{1d}"),
            Example::Prompt { prompt, extra } => {
                // In column order by name, so rows that list their columns differently
                // but agree on them share a key.
                let columns: std::collections::BTreeMap<&String, &Value> = extra.iter().collect();
                let columns = serde_json::to_string(&columns).unwrap_or_default();
                format!("{}\u{1d}{columns}", key(prompt))
            }
        }
    }
}

/// Messages as one string: roles and contents, with separators no text uses.
fn key(messages: &[Message]) -> String {
    messages
        .iter()
        .map(|m| format!("{}\u{1f}{}", m.role, m.content))
        .collect::<Vec<_>>()
        .join("\u{1e}")
}

/// A problem with one row: the column at fault (if one is) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub column: Option<String>,
    pub reason: String,
}

fn err(column: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        column: Some(column.to_string()),
        reason: reason.into(),
    }
}

type Parsed<T> = Result<T, FieldError>;

/// Roles a chat template may receive.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Refuses a set of renames that cannot be applied as written: an empty name, a column
/// renamed twice, or two columns renamed to one. `key` names where they came from.
pub fn check_renames(mapping: &[(String, String)], key: &str) -> Result<(), String> {
    for (i, (from, to)) in mapping.iter().enumerate() {
        if from.is_empty() || to.is_empty() {
            return Err(format!("{key} `{from}={to}`: both names must be non-empty"));
        }
        for (other_from, other_to) in &mapping[..i] {
            if other_from == from {
                return Err(format!(
                    "{key} renames `{from}` twice (to `{other_to}` and to `{to}`)"
                ));
            }
            if other_to == to {
                return Err(format!(
                    "{key} renames both `{other_from}` and `{from}` to `{to}`; only one can \
                     take the name"
                ));
            }
        }
    }
    Ok(())
}

/// Renames columns (`from` → `to`) before anything reads them, all at once: swapping two
/// columns (`a → b`, `b → a`) swaps them rather than losing one. A rename onto a column the
/// row has, and keeps, is an error naming that column: the row's own value would be lost
/// (unless it is null).
pub fn rename_columns(
    fields: &mut Map<String, Value>,
    mapping: &[(String, String)],
) -> Result<(), FieldError> {
    for (from, to) in mapping {
        // A null target holds nothing to lose (frames exported from pandas, or Parquet
        // schemas, list every column on every row).
        let kept =
            fields.get(to).is_some_and(|v| !v.is_null()) && !mapping.iter().any(|(f, _)| f == to);
        if kept && from != to && fields.contains_key(from) {
            return Err(FieldError {
                column: Some(to.clone()),
                reason: format!(
                    "renaming `{from}` to `{to}` would replace the row's own `{to}`; rename \
                     that column too (e.g. {to}=original_{to}) or drop it from the data"
                ),
            });
        }
    }
    let moved: Vec<(&String, Value)> = mapping
        .iter()
        .filter_map(|(from, to)| fields.remove(from).map(|v| (to, v)))
        .collect();
    for (to, v) in moved {
        fields.insert(to.clone(), v);
    }
    Ok(())
}

/// Normalises one row of `format` into an example.
pub fn parse_row(format: Format, mut row: Map<String, Value>) -> Parsed<Example> {
    let example = match format {
        Format::Messages => {
            let messages = messages(
                take(&mut row, "messages")?,
                "messages",
                "role",
                "content",
                role_as_is,
            )?;
            conversation(messages, 0, row)
        }
        Format::ShareGpt => {
            let messages = messages(
                take(&mut row, "conversations")?,
                "conversations",
                "from",
                "value",
                sharegpt_role,
            )?;
            let messages = with_system_column(&mut row, messages)?;
            conversation(messages, 0, row)
        }
        Format::Alpaca => alpaca(row, false)?,
        Format::CpsyCoun => alpaca(row, true)?,
        Format::PromptCompletion => {
            let prompt = side(take(&mut row, "prompt")?, "prompt", "user")?;
            let completion = side(take(&mut row, "completion")?, "completion", "assistant")?;
            let train_from = prompt.len();
            let mut all = prompt;
            all.extend(completion);
            conversation(all, train_from, row)
        }
        Format::Preference | Format::PsychoCounsel => pair(format, row)?,
        Format::PromptOnly => {
            let prompt = side(take(&mut row, "prompt")?, "prompt", "user")?;
            Example::Prompt { prompt, extra: row }
        }
        Format::Cactus => {
            let text = string(take(&mut row, "dialogue")?, "dialogue")?;
            let messages = cactus_dialogue(&text).map_err(|r| err("dialogue", r))?;
            conversation(messages, 0, row)
        }
    };
    Ok(example)
}

fn conversation(messages: Vec<Message>, train_from: usize, extra: Map<String, Value>) -> Example {
    Example::Conversation {
        messages,
        train_from,
        extra,
    }
}

fn take(row: &mut Map<String, Value>, column: &str) -> Parsed<Value> {
    match row.remove(column) {
        None | Some(Value::Null) => Err(err(column, "missing")),
        Some(v) => Ok(v),
    }
}

fn string(v: Value, column: &str) -> Parsed<String> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(err(
            column,
            format!("expected a string, got {}", kind(&other)),
        )),
    }
}

/// Message content: a string, or a list of `{"type": "text", "text": ...}` parts.
fn content(v: &Value, column: &str) -> Parsed<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                p.get("text").and_then(Value::as_str).ok_or_else(|| {
                    err(
                        column,
                        "content parts must be {\"type\": \"text\", \"text\": ...}",
                    )
                })
            })
            .collect::<Parsed<Vec<_>>>()
            .map(|t| t.concat()),
        other => Err(err(
            column,
            format!("message content must be a string, got {}", kind(other)),
        )),
    }
}

fn role_as_is(role: &str) -> Option<&'static str> {
    ROLES.iter().copied().find(|r| *r == role)
}

fn sharegpt_role(role: &str) -> Option<&'static str> {
    match role {
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "chatgpt" | "bing" | "bard" => Some("assistant"),
        "system" => Some("system"),
        "tool" | "observation" => Some("tool"),
        _ => None,
    }
}

fn messages(
    v: Value,
    column: &str,
    role_key: &str,
    content_key: &str,
    role_of: fn(&str) -> Option<&'static str>,
) -> Parsed<Vec<Message>> {
    let Value::Array(items) = v else {
        return Err(err(column, "expected a list of messages"));
    };
    if items.is_empty() {
        return Err(err(column, "the conversation is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = match item.get(role_key) {
                Some(Value::String(role)) => role.as_str(),
                None | Some(Value::Null) => {
                    return Err(err(
                        column,
                        format!("message {}: missing `{role_key}`", i + 1),
                    ));
                }
                Some(other) => {
                    return Err(err(
                        column,
                        format!(
                            "message {}: `{role_key}` must be a string, got {}",
                            i + 1,
                            kind(other)
                        ),
                    ));
                }
            };
            // A tool call would be dropped, leaving an empty reply to learn from.
            if item
                .get("tool_calls")
                .is_some_and(|c| !c.is_null() && c.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(err(
                    column,
                    format!(
                        "message {}: `tool_calls` is not supported (hearth renders text turns \
                         only)",
                        i + 1
                    ),
                ));
            }
            let mapped = role_of(role).ok_or_else(|| {
                let role = if showable(role) {
                    format!("unknown role `{role}`")
                } else {
                    format!("an unknown role ({} characters)", role.chars().count())
                };
                err(column, format!("message {}: {role}", i + 1))
            })?;
            let text = item
                .get(content_key)
                .ok_or_else(|| {
                    err(
                        column,
                        format!("message {}: missing `{content_key}`", i + 1),
                    )
                })
                .and_then(|c| {
                    content(c, column).map_err(|e| FieldError {
                        reason: format!("message {}: {}", i + 1, e.reason),
                        ..e
                    })
                })?;
            Ok(Message::new(mapped, text))
        })
        .collect()
}

/// One side of a prompt/completion or preference row: a string becomes one message of
/// `role`; a list is taken as messages.
fn side(v: Value, column: &str, role: &str) -> Parsed<Vec<Message>> {
    match v {
        Value::String(s) => Ok(vec![Message::new(role, s)]),
        list @ Value::Array(_) => messages(list, column, "role", "content", role_as_is),
        other => Err(err(
            column,
            format!(
                "expected a string or a list of messages, got {}",
                kind(&other)
            ),
        )),
    }
}

/// `messages` opened by the row's `system` column, where it has a non-empty one (Alpaca's
/// and LLaMA-Factory's ShareGPT convention). A conversation that opens with a system turn
/// of its own as well has two, and which one counts would be a guess.
fn with_system_column(
    row: &mut Map<String, Value>,
    messages: Vec<Message>,
) -> Parsed<Vec<Message>> {
    let Some(system) = row.remove("system").filter(|v| !v.is_null()) else {
        return Ok(messages);
    };
    let system = string(system, "system")?;
    if system.is_empty() {
        return Ok(messages);
    }
    if let Some(first) = messages.first().filter(|m| m.role == "system") {
        // The same prompt twice is one; two different ones leave which counts a guess.
        if first.content == system {
            return Ok(messages);
        }
        return Err(err(
            "system",
            "the conversation opens with a different system turn of its own; keep one of the two",
        ));
    }
    let mut all = Vec::with_capacity(messages.len() + 1);
    all.push(Message::new("system", system));
    all.extend(messages);
    Ok(all)
}

fn alpaca(mut row: Map<String, Value>, require_history: bool) -> Parsed<Example> {
    let instruction = string(take(&mut row, "instruction")?, "instruction")?;
    let input = match row.remove("input") {
        None | Some(Value::Null) => String::new(),
        Some(v) => string(v, "input")?,
    };
    let output = string(take(&mut row, "output")?, "output")?;
    let mut messages = with_system_column(&mut row, Vec::new())?;
    let history = match row.remove("history") {
        None | Some(Value::Null) if require_history => return Err(err("history", "missing")),
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(turns)) => turns,
        Some(other) => {
            return Err(err(
                "history",
                format!("expected [[question, answer], ...], got {}", kind(&other)),
            ));
        }
    };
    for (i, turn) in history.iter().enumerate() {
        let pair = turn
            .as_array()
            .filter(|p| p.len() == 2)
            .and_then(|p| Some((p[0].as_str()?, p[1].as_str()?)))
            .ok_or_else(|| {
                err(
                    "history",
                    format!("turn {} must be [question, answer]", i + 1),
                )
            })?;
        messages.push(Message::new("user", pair.0));
        messages.push(Message::new("assistant", pair.1));
    }
    // LLaMA-Factory's convention, which these datasets were published for.
    let query = if input.is_empty() {
        instruction
    } else {
        format!("{instruction}\n{input}")
    };
    messages.push(Message::new("user", query));
    messages.push(Message::new("assistant", output));
    Ok(conversation(messages, 0, row))
}

fn pair(format: Format, mut row: Map<String, Value>) -> Parsed<Example> {
    let prompt_column = if format == Format::PsychoCounsel {
        "question"
    } else {
        "prompt"
    };
    let mut explicit = row.get(prompt_column).is_some_and(|v| !v.is_null());
    // A text prompt beside conversations that open with it again (HuggingFaceH4's
    // ultrafeedback_binarized): the conversations' shared start is the prompt, as TRL's
    // `maybe_extract_prompt` takes it, and the text column is left aside.
    let opens_with_prompt = |v: Option<&Value>| {
        v.and_then(Value::as_array)
            .and_then(|m| m.first())
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            .is_some_and(|r| r != "assistant")
    };
    if explicit
        && format == Format::Preference
        && row.get(prompt_column).is_some_and(Value::is_string)
        && opens_with_prompt(row.get("chosen"))
        && opens_with_prompt(row.get("rejected"))
    {
        explicit = false;
        row.remove(prompt_column);
    }
    let (prompt, chosen, rejected) = if explicit {
        let prompt = side(take(&mut row, prompt_column)?, prompt_column, "user")?;
        let chosen = side(take(&mut row, "chosen")?, "chosen", "assistant")?;
        let rejected = side(take(&mut row, "rejected")?, "rejected", "assistant")?;
        (prompt, chosen, rejected)
    } else if format == Format::PsychoCounsel {
        return Err(err("question", "missing"));
    } else {
        let chosen = side(take(&mut row, "chosen")?, "chosen", "assistant")?;
        let rejected = side(take(&mut row, "rejected")?, "rejected", "assistant")?;
        let shared = chosen
            .iter()
            .zip(&rejected)
            .take_while(|(a, b)| a == b)
            .count();
        if shared == 0 {
            return Err(err(
                "chosen",
                "no `prompt` column, and chosen and rejected share no leading messages to use as the prompt",
            ));
        }
        if shared == chosen.len() || shared == rejected.len() {
            return Err(err(
                "rejected",
                "after the shared prompt, chosen or rejected has no reply of its own",
            ));
        }
        (
            chosen[..shared].to_vec(),
            chosen[shared..].to_vec(),
            rejected[shared..].to_vec(),
        )
    };
    for (name, side) in [("chosen", &chosen), ("rejected", &rejected)] {
        if side.is_empty() {
            return Err(err(name, "empty"));
        }
    }
    Ok(Example::Pair {
        prompt,
        chosen,
        rejected,
        extra: row,
    })
}

/// Splits a Cactus dialogue into turns. `Counselor:` lines are the assistant's, `Client:`
/// lines the user's; a stage direction such as `Client (sighs):` stays in the text as
/// `(sighs)`. Lines without a speaker continue the previous turn, and consecutive lines of
/// one speaker are one turn.
pub fn cactus_dialogue(text: &str) -> Result<Vec<Message>, String> {
    let mut turns: Vec<Message> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match speaker(line) {
            Some((role, direction, said)) => {
                let said = match direction {
                    Some(d) => format!("{d} {said}").trim().to_string(),
                    None => said.to_string(),
                };
                match turns.last_mut() {
                    Some(last) if last.role == role => {
                        last.content.push('\n');
                        last.content.push_str(&said);
                    }
                    _ => turns.push(Message::new(role, said)),
                }
            }
            None if looks_like_a_speaker(line) => {
                // Glued onto the turn before, a client's words could land in the
                // counselor's reply, where the model learns them.
                return Err(format!(
                    "line {} starts like a speaker's tag but names none of Counselor, \
                     Counsellor, Therapist, Client or Patient (optionally with a stage \
                     direction in parentheses); write it as one of them",
                    n + 1
                ));
            }
            None => match turns.last_mut() {
                Some(last) => {
                    last.content.push('\n');
                    last.content.push_str(line);
                }
                None => {
                    return Err(format!(
                        "line {} does not start with `Counselor:` or `Client:`",
                        n + 1
                    ));
                }
            },
        }
    }
    if turns.is_empty() {
        return Err("the dialogue is empty".into());
    }
    Ok(turns)
}

/// `("assistant" | "user", stage direction, text)` if `line` starts with a speaker tag:
/// `Client:`, `Client (sighing):`, a colon inside the direction included, and markdown's
/// emphasis around the tag (`**Client:**`, `**Client**:`).
fn speaker(line: &str) -> Option<(&'static str, Option<&str>, &str)> {
    let (tag, said) = split_tag(line)?;
    let emphasis: &[char] = &['*', '_'];
    let tag = tag.trim().trim_matches(emphasis).trim();
    let said = said.trim_start_matches(emphasis);
    let (name, direction) = match tag.find('(') {
        Some(i) if tag.ends_with(')') => (tag[..i].trim(), Some(tag[i..].trim())),
        Some(_) => return None,
        None => (tag, None),
    };
    let role = match name
        .trim_end_matches(emphasis)
        .to_ascii_lowercase()
        .as_str()
    {
        "counselor" | "counsellor" | "therapist" => "assistant",
        "client" | "patient" => "user",
        _ => return None,
    };
    Some((role, direction, said.trim()))
}

/// `line` split at its first colon outside parentheses: an ASCII one, or the full-width
/// `：` of text typed with a CJK input method.
fn split_tag(line: &str) -> Option<(&str, &str)> {
    let mut depth = 0usize;
    for (i, c) in line.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ':' | '：' if depth == 0 => return Some((&line[..i], &line[i + c.len_utf8()..])),
            _ => {}
        }
    }
    None
}

/// Speakers a counseling transcript may hold besides counselor and client: a third party
/// in a family session, another professional, or another data set's role names. A line
/// opening with one of them is another voice, never the turn before it going on.
const OTHER_SPEAKERS: [&str; 30] = [
    "mother",
    "father",
    "mom",
    "dad",
    "parent",
    "son",
    "daughter",
    "husband",
    "wife",
    "partner",
    "spouse",
    "sister",
    "brother",
    "friend",
    "teacher",
    "caregiver",
    "psychologist",
    "psychiatrist",
    "doctor",
    "dr",
    "nurse",
    "coach",
    "supervisor",
    "interviewer",
    "user",
    "assistant",
    "human",
    "ai",
    "bot",
    "system",
];

/// Whether `line` opens with something like a speaker's tag that [`speaker`] does not
/// take: at most three words before a colon, the first or last of them a role (`Client 2:`,
/// `> Counselor:`, `Therapist's note:`), or one or two capitalised words naming another
/// speaker (`Mother:`, `Psychologist:`, `Dr Lee:`). A sentence that mentions one (`The
/// client said:`, `my mother said:`) is not a tag, nor a label like `Step 1:`.
fn looks_like_a_speaker(line: &str) -> bool {
    let Some((tag, _)) = split_tag(line) else {
        return false;
    };
    let words: Vec<String> = tag
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let role = |w: Option<&String>| {
        w.is_some_and(|w| {
            ["counselor", "counsellor", "therapist", "client", "patient"].contains(&w.as_str())
        })
    };
    let other = |w: Option<&String>| w.is_some_and(|w| OTHER_SPEAKERS.contains(&w.as_str()));
    let capitalised = tag
        .trim_start_matches(|c: char| !c.is_alphabetic())
        .starts_with(char::is_uppercase);
    (words.len() <= 3 && (role(words.first()) || role(words.last())))
        || (words.len() <= 2 && capitalised && (other(words.first()) || other(words.last())))
}
