//! Examples to token ids with loss masks, under a maximum length and a truncation policy.

use std::str::FromStr;

use tokenizers::Tokenizer;

use crate::chat::encode;
use crate::{ChatTemplate, DataError, Example, Message, render_with_mask_from};

/// What to do with a sequence longer than the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the first tokens.
    KeepStart,
    /// Keep the last tokens (the end of a long dialogue, usually the part being learned).
    KeepEnd,
    /// Leave the example out, and count it.
    Drop,
}

impl Truncation {
    /// The name recipes and `--truncation` spell it with.
    pub fn name(self) -> &'static str {
        match self {
            Self::KeepStart => "keep_start",
            Self::KeepEnd => "keep_end",
            Self::Drop => "drop",
        }
    }
}

impl FromStr for Truncation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep_start" => Ok(Self::KeepStart),
            "keep_end" => Ok(Self::KeepEnd),
            "drop" => Ok(Self::Drop),
            other => Err(format!(
                "unknown truncation `{other}` (keep_start, keep_end, drop)"
            )),
        }
    }
}

/// A sequence to learn from: ids and a 0/1 loss mask of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn learnable(&self) -> bool {
        self.loss_mask.contains(&1)
    }
}

/// A tokenised preference pair: the shared prompt and each continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairTokens {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// One example after tokenisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tokenized {
    Sequence(Sequence),
    Pair(PairTokens),
    Prompt(Vec<u32>),
}

/// What truncation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TruncationCounts {
    pub truncated: usize,
    pub dropped: usize,
}

/// Turns examples into token ids through a chat template.
pub struct Tokenizing<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    pub max_length: usize,
    pub truncation: Truncation,
}

impl Tokenizing<'_> {
    /// Tokenises one example; `Ok(None)` when truncation dropped it (and `counts` says so).
    pub fn example(
        &self,
        example: &Example,
        counts: &mut TruncationCounts,
    ) -> Result<Option<Tokenized>, DataError> {
        match example {
            Example::Conversation {
                messages,
                train_from,
                ..
            } => {
                let r =
                    render_with_mask_from(self.template, self.tokenizer, messages, *train_from)?;
                let seq = Sequence {
                    ids: r.input_ids,
                    loss_mask: r.assistant_mask,
                };
                Ok(self.fit(seq, counts)?.map(Tokenized::Sequence))
            }
            Example::Pair {
                prompt,
                chosen,
                rejected,
                ..
            } => self.pair(prompt, chosen, rejected, counts),
            Example::Prompt { prompt, .. } => {
                let ids = encode(self.tokenizer, &self.template.render(prompt, true)?)?;
                if ids.len() <= self.max_length {
                    return Ok(Some(Tokenized::Prompt(ids)));
                }
                let n = ids.len();
                // A prompt is cut at its start whichever end `keep_*` names, as TRL cuts
                // prompts on the left (and as pairs' prompts are cut): its end is the
                // assistant's header, without which the model would write on inside the
                // client's turn.
                Ok(match self.truncation {
                    Truncation::Drop => {
                        counts.dropped += 1;
                        None
                    }
                    Truncation::KeepStart | Truncation::KeepEnd => {
                        counts.truncated += 1;
                        Some(Tokenized::Prompt(ids[n - self.max_length..].to_vec()))
                    }
                })
            }
        }
    }

    /// Applies the maximum length to a sequence.
    pub fn fit(
        &self,
        seq: Sequence,
        counts: &mut TruncationCounts,
    ) -> Result<Option<Sequence>, DataError> {
        let n = seq.len();
        if n <= self.max_length {
            return Ok(Some(seq));
        }
        let range = match self.truncation {
            Truncation::Drop => {
                counts.dropped += 1;
                return Ok(None);
            }
            Truncation::KeepStart => 0..self.max_length,
            Truncation::KeepEnd => n - self.max_length..n,
        };
        let cut = Sequence {
            ids: seq.ids[range.clone()].to_vec(),
            loss_mask: seq.loss_mask[range].to_vec(),
        };
        if !cut.learnable() {
            // Nothing left to learn from: drop rather than train on an all-zero mask.
            counts.dropped += 1;
            return Ok(None);
        }
        counts.truncated += 1;
        Ok(Some(cut))
    }

    /// Pairs keep the end of the prompt and the start of each continuation, as TRL does;
    /// completions are cut only once the prompt alone cannot make room.
    fn pair(
        &self,
        prompt: &[Message],
        chosen: &[Message],
        rejected: &[Message],
        counts: &mut TruncationCounts,
    ) -> Result<Option<Tokenized>, DataError> {
        let prompt_text = self.template.render(prompt, true)?;
        let prompt_ids = encode(self.tokenizer, &prompt_text)?;
        let continuation = |side: &[Message], name: &str| -> Result<Vec<u32>, DataError> {
            let mut all = prompt.to_vec();
            all.extend_from_slice(side);
            let text = self.template.render(&all, false)?;
            let full = encode(self.tokenizer, &text)?;
            if full.len() < prompt_ids.len() || full[..prompt_ids.len()] != prompt_ids[..] {
                // The text extends the prompt, but a token straddles the join (a reply
                // opening with whitespace the tokenizer merges with the prompt's last
                // newline): the continuation is its own text tokenised alone, which is
                // what TRL does for every pair.
                if let Some(rest) = text.strip_prefix(prompt_text.as_str()) {
                    return encode(self.tokenizer, rest);
                }
                // Most often the side repeats the prompt: a whole conversation where only
                // the reply belongs.
                let reason = match side.first() {
                    Some(first) if !first.is_assistant() => format!(
                        "column `{name}` starts with a {} message; beside a prompt it holds \
                         only the assistant's reply, not the conversation again",
                        first.role
                    ),
                    _ => format!(
                        "{}: the prompt followed by `{name}` does not render as the prompt \
                         alone plus more (the template changes earlier text as turns are added)",
                        self.template.origin()
                    ),
                };
                return Err(DataError::Conversation(reason));
            }
            Ok(full[prompt_ids.len()..].to_vec())
        };
        let (mut c, mut r) = (
            continuation(chosen, "chosen")?,
            continuation(rejected, "rejected")?,
        );
        if c.is_empty() || r.is_empty() {
            return Err(DataError::Conversation(
                "a preference pair has an empty continuation".into(),
            ));
        }
        let mut p = prompt_ids;
        let longest = c.len().max(r.len());
        if p.len() + longest <= self.max_length {
            return Ok(Some(Tokenized::Pair(PairTokens {
                prompt: p,
                chosen: c,
                rejected: r,
            })));
        }
        if self.truncation == Truncation::Drop {
            counts.dropped += 1;
            return Ok(None);
        }
        counts.truncated += 1;
        // Keep at least half the budget for the prompt's end when continuations are long.
        let prompt_budget = self
            .max_length
            .saturating_sub(longest)
            .max(self.max_length / 2)
            .min(p.len());
        p = p[p.len() - prompt_budget..].to_vec();
        let room = self.max_length - p.len();
        c.truncate(room);
        r.truncate(room);
        if c.is_empty() || r.is_empty() {
            counts.truncated -= 1;
            counts.dropped += 1;
            return Ok(None);
        }
        Ok(Some(Tokenized::Pair(PairTokens {
            prompt: p,
            chosen: c,
            rejected: r,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpecialTokens;
    use crate::tokenizer::{BUNDLED_CORPUS, LLAMA3_SPECIAL_TOKENS, train_bpe};
    use serde_json::Map;

    fn setup() -> (ChatTemplate, Tokenizer) {
        let tokens = SpecialTokens {
            bos_token: Some("<|begin_of_text|>".into()),
            ..Default::default()
        };
        (
            ChatTemplate::builtin("llama3", tokens).unwrap(),
            train_bpe(&[BUNDLED_CORPUS], 400, &LLAMA3_SPECIAL_TOKENS).unwrap(),
        )
    }

    fn dialogue() -> Example {
        Example::Conversation {
            messages: vec![
                Message::new(
                    "user",
                    "I have been feeling overwhelmed at work, and I can't seem to switch off at night.",
                ),
                Message::new(
                    "assistant",
                    "It sounds like the pressure follows you home. What happens when you try to rest?",
                ),
            ],
            train_from: 0,
            extra: Map::new(),
        }
    }

    fn run(
        truncation: Truncation,
        max_length: usize,
        example: &Example,
    ) -> (Option<Tokenized>, TruncationCounts) {
        let (template, tokenizer) = setup();
        let t = Tokenizing {
            template: &template,
            tokenizer: &tokenizer,
            max_length,
            truncation,
        };
        let mut counts = TruncationCounts::default();
        (t.example(example, &mut counts).unwrap(), counts)
    }

    fn sequence(t: Option<Tokenized>) -> Sequence {
        match t {
            Some(Tokenized::Sequence(s)) => s,
            other => panic!("expected a sequence, got {other:?}"),
        }
    }

    #[test]
    fn each_policy_handles_a_row_longer_than_the_maximum() {
        let full = sequence(run(Truncation::Drop, 10_000, &dialogue()).0);
        let n = full.len();
        let max = n - 7;

        let (start, counts) = run(Truncation::KeepStart, max, &dialogue());
        let start = sequence(start);
        assert_eq!(start.ids, full.ids[..max]);
        assert_eq!(start.loss_mask, full.loss_mask[..max]);
        assert_eq!(
            counts,
            TruncationCounts {
                truncated: 1,
                dropped: 0
            }
        );

        let (end, counts) = run(Truncation::KeepEnd, max, &dialogue());
        let end = sequence(end);
        assert_eq!(end.ids, full.ids[n - max..]);
        assert_eq!(end.loss_mask, full.loss_mask[n - max..]);
        assert_eq!(counts.truncated, 1);

        let (dropped, counts) = run(Truncation::Drop, max, &dialogue());
        assert!(dropped.is_none());
        assert_eq!(
            counts,
            TruncationCounts {
                truncated: 0,
                dropped: 1
            }
        );

        // Keeping the start of a short window leaves no assistant token: dropped, not kept
        // with an all-zero mask.
        let prompt_only = full.loss_mask.iter().position(|&m| m == 1).unwrap();
        let (none, counts) = run(Truncation::KeepStart, prompt_only, &dialogue());
        assert!(none.is_none());
        assert_eq!(counts.dropped, 1);
    }

    #[test]
    fn pairs_keep_the_prompt_end_and_continuation_starts() {
        let pair = Example::Pair {
            prompt: vec![Message::new(
                "user",
                "I have been feeling overwhelmed at work, and I can't seem to switch off at night. My mind keeps going.",
            )],
            chosen: vec![Message::new(
                "assistant",
                "It sounds like the pressure follows you home.",
            )],
            rejected: vec![Message::new("assistant", "Just stop thinking about it.")],
            extra: Map::new(),
        };
        let Some(Tokenized::Pair(full)) = run(Truncation::KeepEnd, 10_000, &pair).0 else {
            panic!()
        };
        assert!(full.chosen.len() > full.rejected.len());
        let max = full.prompt.len() + full.chosen.len() - 5;
        let (cut, counts) = run(Truncation::KeepEnd, max, &pair);
        let Some(Tokenized::Pair(cut)) = cut else {
            panic!()
        };
        assert_eq!(counts.truncated, 1);
        assert!(cut.prompt.len() + cut.chosen.len() <= max);
        assert_eq!(
            cut.prompt,
            full.prompt[full.prompt.len() - cut.prompt.len()..]
        );
        assert_eq!(cut.chosen, full.chosen[..cut.chosen.len()]);
        assert_eq!(cut.rejected, full.rejected);
        assert!(run(Truncation::Drop, max, &pair).0.is_none());
    }

    /// A side the tokenizer joins with the prompt's end into one token (the generation
    /// prompt ends in a space, which byte-level BPE attaches to the reply's first word): the
    /// prompt's tokens stay as they are and the side's text is tokenised alone, as TRL
    /// tokenises every pair.
    #[test]
    fn a_side_that_merges_into_the_prompt_is_tokenised_alone() {
        let (_, tokenizer) = setup();
        let template = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            SpecialTokens::default(),
            "spaced.jinja",
        )
        .unwrap();
        let prompt = vec![Message::new("user", "I feel tired.")];
        let chosen = vec![Message::new("assistant", "Tell me more.")];
        let prompt_text = template.render(&prompt, true).unwrap();
        let chosen_text = template
            .render(&[prompt.clone(), chosen.clone()].concat(), false)
            .unwrap();
        let prompt_ids = encode(&tokenizer, &prompt_text).unwrap();
        let joint = encode(&tokenizer, &chosen_text).unwrap();
        assert_ne!(
            joint[..prompt_ids.len()],
            prompt_ids[..],
            "the join must merge"
        );
        let t = Tokenizing {
            template: &template,
            tokenizer: &tokenizer,
            max_length: 10_000,
            truncation: Truncation::KeepEnd,
        };
        let pair = Example::Pair {
            prompt,
            chosen,
            rejected: vec![Message::new("assistant", "No.")],
            extra: Map::new(),
        };
        let got = t.example(&pair, &mut TruncationCounts::default()).unwrap();
        let Some(Tokenized::Pair(p)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(p.prompt, prompt_ids);
        let rest = &chosen_text[prompt_text.len()..];
        assert_eq!(p.chosen, encode(&tokenizer, rest).unwrap());
        assert_eq!(tokenizer.decode(&p.chosen, false).unwrap(), rest);
    }

    /// A `chosen` that repeats the prompt (a whole conversation beside a `prompt` column)
    /// is named by its column and first role, not blamed on the template.
    #[test]
    fn a_side_that_repeats_the_prompt_is_named() {
        let (template, tokenizer) = setup();
        let t = Tokenizing {
            template: &template,
            tokenizer: &tokenizer,
            max_length: 10_000,
            truncation: Truncation::KeepEnd,
        };
        let prompt = vec![Message::new("user", "I can't sleep.")];
        let mut whole = prompt.clone();
        whole.push(Message::new("assistant", "What keeps you up?"));
        let pair = Example::Pair {
            prompt,
            chosen: whole,
            rejected: vec![Message::new("assistant", "Try harder.")],
            extra: Map::new(),
        };
        let e = t
            .example(&pair, &mut TruncationCounts::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("column `chosen` starts with a user message"),
            "{e}"
        );
    }

    #[test]
    fn prompts_render_with_the_generation_prompt_and_lose_their_start() {
        let example = Example::Prompt {
            prompt: vec![Message::new("user", "I feel tired.")],
            extra: Map::new(),
        };
        let (_, tokenizer) = setup();
        let Some(Tokenized::Prompt(ids)) = run(Truncation::KeepEnd, 1000, &example).0 else {
            panic!()
        };
        let text = tokenizer.decode(&ids, false).unwrap();
        assert!(
            text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"),
            "{text}"
        );
        let Some(Tokenized::Prompt(end)) = run(Truncation::KeepEnd, 4, &example).0 else {
            panic!()
        };
        assert_eq!(end, ids[ids.len() - 4..]);
        // keep_start too keeps the end: it holds the assistant's header.
        let Some(Tokenized::Prompt(start)) = run(Truncation::KeepStart, 4, &example).0 else {
            panic!()
        };
        assert_eq!(start, ids[ids.len() - 4..]);
        assert!(run(Truncation::Drop, 4, &example).0.is_none());
    }
}
