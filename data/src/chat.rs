//! Rendering a conversation into token ids with a loss mask over the assistant's turns.

use tokenizers::Tokenizer;

use crate::{ChatTemplate, DataError, Message};

/// A conversation as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub input_ids: Vec<u32>,
    /// 1 on the assistant's tokens (content and end-of-turn), 0 elsewhere.
    pub assistant_mask: Vec<u8>,
}

/// Renders `messages` with `template` and marks each assistant turn by incremental
/// rendering: the tokens of "everything before it plus the generation prompt" must be a
/// prefix of the tokens of "everything up to and including it", and the difference is the
/// assistant's. A template for which that prefix property fails is an error, never a
/// silently wrong mask, and so is a conversation with no assistant tokens.
pub fn render_with_mask(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
) -> Result<Rendered, DataError> {
    render_with_mask_from(template, tokenizer, messages, 0)
}

/// As [`render_with_mask`], learning only from assistant turns at index ≥ `train_from`
/// (prompt/completion data: the prompt's own assistant turns are context).
pub fn render_with_mask_from(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    train_from: usize,
) -> Result<Rendered, DataError> {
    // Only blank replies: the mask would hold just the end-of-turn token, teaching the
    // model to say nothing. (Tagged spans of blank replies are empty and caught there.)
    let trained = messages
        .iter()
        .skip(train_from)
        .filter(|m| m.is_assistant());
    let blank = trained.clone().all(|m| m.content.trim().is_empty()) && trained.count() > 0;
    if blank && !template.has_generation_tags() {
        return Err(DataError::Conversation(
            "no assistant tokens to learn from: every assistant turn is empty".into(),
        ));
    }
    render_pair_side(template, tokenizer, messages, train_from)
}

/// One side of a preference pair, masked as [`render_with_mask_from`] masks a completion,
/// but a blank side is allowed: a pair learns from the difference of its two sides, and
/// preferring an empty reply is the data's own statement.
pub fn render_pair_side(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    train_from: usize,
) -> Result<Rendered, DataError> {
    if messages.is_empty() {
        return Err(DataError::Conversation("the conversation is empty".into()));
    }
    if template.has_generation_tags() {
        return render_generation_spans(template, tokenizer, messages, train_from);
    }
    render_incrementally(template, tokenizer, messages, train_from)
}

/// The mask of a template without generation tags, by incremental rendering.
fn render_incrementally(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    train_from: usize,
) -> Result<Rendered, DataError> {
    let text = template.render(messages, false)?;
    let whole = Whole::encode(tokenizer, &text)?;
    let mut assistant_mask = vec![0u8; whole.ids.len()];
    for (i, message) in messages.iter().enumerate() {
        if !message.is_assistant() || i < train_from {
            continue;
        }
        let start = whole.boundary(tokenizer, &template.render(&messages[..i], true)?, true)?;
        let end = if i + 1 == messages.len() {
            Some(whole.ids.len())
        } else {
            whole.boundary(tokenizer, &template.render(&messages[..=i], false)?, false)?
        };
        let (Some(start), Some(end)) = (start, end) else {
            return Err(not_a_prefix(template, i));
        };
        if start > end {
            return Err(not_a_prefix(template, i));
        }
        for m in &mut assistant_mask[start..end] {
            *m = 1;
        }
    }
    let input_ids = whole.ids;
    if !assistant_mask.contains(&1) {
        return Err(DataError::Conversation(
            "no assistant tokens to learn from: the conversation has no non-empty assistant turn"
                .into(),
        ));
    }
    Ok(Rendered {
        text,
        input_ids,
        assistant_mask,
    })
}

fn not_a_prefix(template: &ChatTemplate, message: usize) -> DataError {
    DataError::Conversation(format!(
        "{}: rendering message {} (assistant) does not extend the prompt before it, so its \
         tokens cannot be masked; the template changes earlier text as turns are added",
        template.origin(),
        message + 1
    ))
}

/// A conversation's whole render, tokenised once. Each turn's prompt is then located in it
/// instead of tokenised on its own, which made masking quadratic in the conversation's length
/// (a 40-message session took 0.14 s, nearly all of it re-tokenising the same prefixes).
struct Whole<'a> {
    text: &'a str,
    ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
}

impl<'a> Whole<'a> {
    fn encode(tokenizer: &Tokenizer, text: &'a str) -> Result<Self, DataError> {
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| DataError::Conversation(format!("tokenising: {e}")))?;
        Ok(Self {
            text,
            ids: encoding.get_ids().to_vec(),
            offsets: encoding.get_offsets().to_vec(),
        })
    }

    /// `Some(k)` when `prefix` tokenised on its own is exactly the first `k` tokens of the
    /// whole, `None` when its tokens are not a prefix of the whole's.
    ///
    /// A tokenizer cuts its input at added tokens first and encodes the text between them
    /// independently, so the tokens before the last added token inside `prefix` are already
    /// known to agree; only the stretch from that token on is tokenised again. Where that
    /// shortcut does not confirm a match (a tokenizer without added tokens, or offsets that
    /// do not line up), the whole prefix is tokenised, so the answer is always the exact one.
    fn prefix_len(&self, tokenizer: &Tokenizer, prefix: &str) -> Result<Option<usize>, DataError> {
        if let Some(k) = self.located(tokenizer, prefix)? {
            return Ok(Some(k));
        }
        let tokens = encode(tokenizer, prefix)?;
        let matches = tokens.len() <= self.ids.len() && self.ids[..tokens.len()] == tokens[..];
        Ok(matches.then_some(tokens.len()))
    }

    /// Where `prefix` ends in the whole's tokens: [`prefix_len`](Self::prefix_len) where
    /// its tokens are a prefix of the whole's. Where the text is a prefix but a token
    /// straddles its end (a reply opening with whitespace that the tokenizer joins with
    /// the prompt's closing newline into one token), the straddling token counts as the
    /// reply's: for a turn's `start` (it overlaps the reply) and for its `end` alike, as
    /// transformers' `return_assistant_tokens_mask` takes every token overlapping a span.
    /// `None` only when the text itself is not a prefix: the template rewrote it.
    fn boundary(
        &self,
        tokenizer: &Tokenizer,
        prefix: &str,
        start: bool,
    ) -> Result<Option<usize>, DataError> {
        if let Some(k) = self.prefix_len(tokenizer, prefix)? {
            return Ok(Some(k));
        }
        if !self.text.starts_with(prefix) {
            return Ok(None);
        }
        let cut = prefix.len();
        Ok(Some(if start {
            self.offsets.partition_point(|&(_, end)| end <= cut)
        } else {
            self.offsets.partition_point(|&(begin, _)| begin < cut)
        }))
    }

    /// The shortcut alone: `Some(k)` only where it confirms the match.
    fn located(&self, tokenizer: &Tokenizer, prefix: &str) -> Result<Option<usize>, DataError> {
        if !self.text.starts_with(prefix) {
            return Ok(None);
        }
        let cut = prefix.len();
        let k = self.offsets.partition_point(|&(_, end)| end <= cut);
        if self.offsets.get(k).is_some_and(|&(start, _)| start < cut) {
            return Ok(None);
        }
        let added = tokenizer.get_added_vocabulary().get_added_tokens_decoder();
        let Some(from) = self.ids[..k].iter().rposition(|id| added.contains_key(id)) else {
            return Ok(None);
        };
        let at = self.offsets[from].0;
        let confirmed = at <= cut && encode(tokenizer, &self.text[at..cut])? == self.ids[from..k];
        Ok(confirmed.then_some(k))
    }
}

/// The mask of a template with `{% generation %}` tags: exactly the tokens whose byte ranges
/// overlap a tagged span, as transformers' `return_assistant_tokens_mask` takes it. With `train_from`, spans that
/// begin inside the render of the messages before it are context, not targets.
fn render_generation_spans(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    train_from: usize,
) -> Result<Rendered, DataError> {
    let rendered = template.render_spans(messages, false)?;
    let context = if train_from == 0 {
        0
    } else {
        let before = template.render(&messages[..train_from.min(messages.len())], false)?;
        if !rendered.text.starts_with(&before) {
            return Err(DataError::Conversation(format!(
                "{}: the messages before the completion do not render as a prefix of the \
                 whole conversation, so the completion's tokens cannot be told apart",
                template.origin()
            )));
        }
        before.len()
    };
    let encoding = tokenizer
        .encode(rendered.text.as_str(), false)
        .map_err(|e| DataError::Conversation(format!("tokenising: {e}")))?;
    let input_ids = encoding.get_ids().to_vec();
    let offsets = encoding.get_offsets();
    // transformers' sweep: a token is masked when its byte range reaches into the span it
    // has not yet passed (`end > span.start`), so every token of a character split across
    // tokens counts, and so does one whose offsets a tokenizer trimmed of a leading space.
    let spans: Vec<_> = rendered
        .spans
        .iter()
        .filter(|s| s.start >= context)
        .collect();
    let mut assistant_mask = vec![0u8; input_ids.len()];
    let mut next = 0;
    for (m, &(start, end)) in assistant_mask.iter_mut().zip(offsets) {
        while next < spans.len() && start >= spans[next].end {
            next += 1;
        }
        let Some(span) = spans.get(next) else {
            break;
        };
        if end > span.start {
            *m = 1;
        }
    }
    if !assistant_mask.contains(&1) {
        return Err(DataError::Conversation(
            "no assistant tokens to learn from: the template's {% generation %} spans are \
             empty for this conversation"
                .into(),
        ));
    }
    Ok(Rendered {
        text: rendered.text,
        input_ids,
        assistant_mask,
    })
}

/// Encodes rendered text; the template already wrote every special token it wants.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, DataError> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| DataError::Conversation(format!("tokenising: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpecialTokens;
    use crate::tokenizer::{
        BUNDLED_CORPUS, BpePipeline, LLAMA3_SPECIAL_TOKENS, train_bpe, train_bpe_with,
    };
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::{DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper};

    fn tokenizer() -> Tokenizer {
        train_bpe(&[BUNDLED_CORPUS], 400, &LLAMA3_SPECIAL_TOKENS).unwrap()
    }

    fn llama3() -> ChatTemplate {
        let tokens = SpecialTokens {
            bos_token: Some("<|begin_of_text|>".into()),
            ..Default::default()
        };
        ChatTemplate::builtin("llama3", tokens).unwrap()
    }

    /// A reply the tokenizer joins with the prompt's end into one token (the generation
    /// prompt ends in a space, which byte-level BPE attaches to the reply's first word; a
    /// reply opening with a newline after a prompt's newline is the same): the straddling
    /// token is the reply's, as a `{% generation %}` mask takes every token overlapping the
    /// reply, not an error blaming the template.
    #[test]
    fn a_reply_merging_into_the_prompt_is_masked_from_the_straddling_token() {
        let tok = tokenizer();
        let chatml = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            SpecialTokens::default(),
            "spaced.jinja",
        )
        .unwrap();
        let messages = vec![
            Message::new("user", "I feel tired."),
            Message::new("assistant", "Tell me more."),
            Message::new("user", "Work is hard."),
            Message::new("assistant", "What feels hardest?"),
        ];
        let prompt = encode(&tok, &chatml.render(&messages[..1], true).unwrap()).unwrap();
        let r = render_with_mask(&chatml, &tok, &messages).unwrap();
        assert_ne!(
            r.input_ids[..prompt.len()],
            prompt[..],
            "the join must merge"
        );
        let first = r.assistant_mask.iter().position(|&m| m == 1).unwrap();
        // The straddling token is the prompt's last one re-cut: it starts one token early.
        assert_eq!(first, prompt.len() - 1);
        let decoded = tok.decode(&r.input_ids[first..], false).unwrap();
        assert!(decoded.starts_with(" Tell me more."), "{decoded:?}");
        // Both turns are learnt; the user's turn between them is not.
        let runs = r
            .assistant_mask
            .windows(2)
            .filter(|w| w[0] == 0 && w[1] == 1)
            .count();
        assert_eq!(runs, 2);
        let user = chatml.render(&messages[..3], true).unwrap();
        let user_end = encode(&tok, &user).unwrap().len();
        // The second reply straddles its prompt's space too; the `:` before it is context.
        assert_eq!(r.assistant_mask[user_end - 2..user_end], [0, 1]);
    }

    #[test]
    fn every_assistant_turn_and_only_those_is_masked() {
        let tok = tokenizer();
        let messages = vec![
            Message::new("system", "You are a counselor."),
            Message::new("user", "I feel tired."),
            Message::new("assistant", "Tell me more."),
            Message::new("user", "Work is hard."),
            Message::new("assistant", "What feels hardest?"),
        ];
        let r = render_with_mask(&llama3(), &tok, &messages).unwrap();
        // Decode the masked runs: exactly the two replies, each with its end-of-turn token.
        let mut runs = Vec::new();
        let mut current = Vec::new();
        for (id, m) in r.input_ids.iter().zip(&r.assistant_mask) {
            if *m == 1 {
                current.push(*id);
            } else if !current.is_empty() {
                runs.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            runs.push(current);
        }
        let decoded: Vec<String> = runs
            .iter()
            .map(|run| tok.decode(run, false).unwrap())
            .collect();
        assert_eq!(
            decoded,
            vec!["Tell me more.<|eot_id|>", "What feels hardest?<|eot_id|>"]
        );
    }

    /// Decoded runs of masked tokens.
    fn masked_runs(tok: &Tokenizer, r: &Rendered) -> Vec<String> {
        let mut runs = vec![Vec::new()];
        for (id, m) in r.input_ids.iter().zip(&r.assistant_mask) {
            if *m == 1 {
                runs.last_mut().unwrap().push(*id);
            } else if !runs.last().unwrap().is_empty() {
                runs.push(Vec::new());
            }
        }
        runs.retain(|r| !r.is_empty());
        runs.iter().map(|r| tok.decode(r, false).unwrap()).collect()
    }

    #[test]
    fn generation_tags_decide_the_mask_where_a_template_has_them() {
        // Tags around the content only: the end-of-turn token stays unmasked, which
        // incremental rendering would have masked.
        let source = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
        let tokens = SpecialTokens {
            bos_token: Some("<|begin_of_text|>".into()),
            ..Default::default()
        };
        let tpl = ChatTemplate::new(source, tokens, "tagged").unwrap();
        let tok = tokenizer();
        let messages = vec![
            Message::new("user", "I feel tired."),
            Message::new("assistant", "Tell me more."),
            Message::new("user", "Work is hard."),
            Message::new("assistant", "What feels hardest?"),
        ];
        let r = render_with_mask(&tpl, &tok, &messages).unwrap();
        assert_eq!(r.text, tpl.render(&messages, false).unwrap());
        assert_eq!(r.input_ids, encode(&tok, &r.text).unwrap());
        assert_eq!(
            masked_runs(&tok, &r),
            vec!["Tell me more.", "What feels hardest?"]
        );
        // From message 2 on: the first reply is context.
        let r = render_with_mask_from(&tpl, &tok, &messages, 2).unwrap();
        assert_eq!(masked_runs(&tok, &r), vec!["What feels hardest?"]);
        // An empty tagged reply leaves nothing to learn from.
        let err = render_with_mask(
            &tpl,
            &tok,
            &[Message::new("user", "hi"), Message::new("assistant", "")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("no assistant tokens"), "{err}");
    }

    /// A character split over several tokens (an emoji in a byte-level vocabulary) and a
    /// token whose offsets the tokenizer trimmed of its leading space both stay inside the
    /// span they overlap, as transformers masks them. The first token of a split character
    /// alone used to be masked, and a reply starting with a space was dropped whole.
    #[test]
    fn generation_spans_mask_every_token_they_overlap() {
        let source = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}";
        let tpl = ChatTemplate::new(source, SpecialTokens::default(), "tagged").unwrap();
        let messages = vec![
            Message::new("user", "a"),
            Message::new("assistant", " Tell me more"),
            Message::new("user", "b"),
            Message::new("assistant", "I hear you 😊"),
        ];
        let byte_level = || ByteLevel::default().add_prefix_space(false);
        let trimmed = variant(
            byte_level().into(),
            Some(byte_level().trim_offsets(true).into()),
            &LLAMA3_SPECIAL_TOKENS,
            "",
        );
        for tok in [tokenizer(), trimmed] {
            let r = render_with_mask(&tpl, &tok, &messages).unwrap();
            assert_eq!(
                masked_runs(&tok, &r),
                vec![" Tell me more", "I hear you 😊"]
            );
        }
    }

    #[test]
    fn conversations_without_assistant_tokens_are_refused() {
        let tok = tokenizer();
        let err = render_with_mask(&llama3(), &tok, &[Message::new("user", "hi")]).unwrap_err();
        assert!(err.to_string().contains("no assistant tokens"), "{err}");
        let err = render_with_mask(&llama3(), &tok, &[]).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        // Blank replies would teach the model to end its turn at once.
        for reply in ["", "  \n"] {
            let talk = [Message::new("user", "hi"), Message::new("assistant", reply)];
            let err = render_with_mask(&llama3(), &tok, &talk).unwrap_err();
            assert!(
                err.to_string().contains("every assistant turn is empty"),
                "{err}"
            );
        }
        // One blank reply among others is the data's own business.
        let talk = [
            Message::new("user", "hi"),
            Message::new("assistant", ""),
            Message::new("user", "and?"),
            Message::new("assistant", "Tell me more."),
        ];
        render_with_mask(&llama3(), &tok, &talk).unwrap();
    }

    /// The masking before [`Whole`]: every turn's prompt and reply tokenised on their own.
    /// Quadratic, but obviously the definition, so the fast path is checked against it.
    fn incremental_reference(
        template: &ChatTemplate,
        tokenizer: &Tokenizer,
        messages: &[Message],
        train_from: usize,
    ) -> Result<Rendered, DataError> {
        let mut trained = messages
            .iter()
            .skip(train_from)
            .filter(|m| m.is_assistant());
        if trained.all(|m| m.content.trim().is_empty()) {
            return Err(DataError::Conversation(
                "every assistant turn is empty".into(),
            ));
        }
        let text = template.render(messages, false)?;
        let input_ids = encode(tokenizer, &text)?;
        let mut assistant_mask = vec![0u8; input_ids.len()];
        let is_prefix = |short: &[u32], long: &[u32]| {
            long.len() >= short.len() && long[..short.len()] == *short
        };
        let offsets = tokenizer
            .encode(text.as_str(), false)
            .unwrap()
            .get_offsets()
            .to_vec();
        for (i, message) in messages.iter().enumerate().skip(train_from) {
            if !message.is_assistant() {
                continue;
            }
            let prompt_text = template.render(&messages[..i], true)?;
            let through_text = template.render(&messages[..=i], false)?;
            let prompt = encode(tokenizer, &prompt_text)?;
            let through = encode(tokenizer, &through_text)?;
            if is_prefix(&prompt, &through) && is_prefix(&through, &input_ids) {
                assistant_mask[prompt.len()..through.len()].fill(1);
                continue;
            }
            // Tokens straddle a boundary the text keeps: every token overlapping the turn.
            if !text.starts_with(&through_text) || !through_text.starts_with(&prompt_text) {
                return Err(not_a_prefix(template, i));
            }
            let (from, to) = (prompt_text.len(), through_text.len());
            let last = i + 1 == messages.len();
            for (m, &(start, end)) in assistant_mask.iter_mut().zip(&offsets) {
                if end > from && (start < to || last) {
                    *m = 1;
                }
            }
        }
        if !assistant_mask.contains(&1) {
            return Err(DataError::Conversation("no assistant tokens".into()));
        }
        Ok(Rendered {
            text,
            input_ids,
            assistant_mask,
        })
    }

    /// A BPE trained on the bundled corpus plus `extra`, with the given pipeline pieces and,
    /// for a byte-level one, its decoder.
    fn variant(
        pre: PreTokenizerWrapper,
        post: Option<PostProcessorWrapper>,
        specials: &[&str],
        extra: &str,
    ) -> Tokenizer {
        let decoder: Option<DecoderWrapper> = match &pre {
            PreTokenizerWrapper::ByteLevel(b) => Some((*b).into()),
            _ => None,
        };
        let mut alphabet: std::collections::HashSet<char> =
            ByteLevel::alphabet().into_iter().collect();
        alphabet.extend(extra.chars().chain(BUNDLED_CORPUS.chars()).chain(['▁']));
        let pipeline = BpePipeline { pre, post, decoder };
        train_bpe_with(&[BUNDLED_CORPUS, extra], 500, specials, alphabet, pipeline).unwrap()
    }

    /// Replies and questions with the edges that move token boundaries: leading and
    /// trailing spaces, blank lines, multi-byte text, a special token typed as text.
    const SNIPPETS: [&str; 10] = [
        "I feel tired.",
        " leading space",
        "trailing space ",
        "two\n\nlines\n",
        "café 😊 naïve",
        "",
        "a <|eot_id|> inside",
        "\nstarts on a new line",
        "spaced   out   words",
        "What feels hardest about work?",
    ];

    /// Deterministic conversations, 1 to 5 exchanges, some with a system message.
    fn conversations() -> Vec<Vec<Message>> {
        let mut state = 7u64;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        };
        (0..40)
            .map(|_| {
                let mut talk = Vec::new();
                if next(2) == 0 {
                    talk.push(Message::new("system", "You are a counselor."));
                }
                for _ in 0..1 + next(5) {
                    talk.push(Message::new("user", SNIPPETS[next(SNIPPETS.len())]));
                    talk.push(Message::new("assistant", SNIPPETS[next(SNIPPETS.len())]));
                }
                talk
            })
            .collect()
    }

    #[test]
    fn masks_match_per_turn_tokenisation_on_every_tokenizer_and_template() {
        let extra = SNIPPETS.join("\n");
        let chatml = ["<|im_start|>", "<|im_end|>"];
        let byte_level = || ByteLevel::default().add_prefix_space(false);
        let tokenizers = [
            ("byte-level", tokenizer()),
            (
                "byte-level, trimmed offsets",
                variant(
                    byte_level().into(),
                    Some(byte_level().trim_offsets(true).into()),
                    &chatml,
                    &extra,
                ),
            ),
            (
                "metaspace",
                variant(
                    Metaspace::new('▁', PrependScheme::First, false).into(),
                    None,
                    &LLAMA3_SPECIAL_TOKENS,
                    &extra,
                ),
            ),
            (
                "no added tokens",
                variant(byte_level().into(), None, &[], &extra),
            ),
        ];
        let plain = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
            SpecialTokens::default(),
            "plain.jinja",
        )
        .unwrap();
        let chatml_template = ChatTemplate::builtin("chatml", SpecialTokens::default()).unwrap();
        let templates = [
            ("llama3", llama3()),
            ("chatml", chatml_template),
            ("plain", plain),
        ];
        let (mut compared, mut refused) = (0, 0);
        for (tname, tok) in &tokenizers {
            for (name, template) in &templates {
                for (c, talk) in conversations().iter().enumerate() {
                    for from in [0, 2] {
                        let fast = render_with_mask_from(template, tok, talk, from);
                        let slow = incremental_reference(template, tok, talk, from);
                        match (fast, slow) {
                            (Ok(fast), Ok(slow)) => {
                                assert_eq!(fast, slow, "{tname}, {name}, conversation {c}");
                                compared += 1;
                            }
                            (Err(_), Err(_)) => refused += 1,
                            (fast, slow) => panic!(
                                "{tname}, {name}, conversation {c} from {from}: \
                                 {fast:?} against {slow:?}"
                            ),
                        }
                    }
                }
            }
        }
        // Most conversations have something to learn from; the blank and shifted ones don't.
        assert!(
            compared > 700 && refused > 0,
            "{compared} compared, {refused} refused"
        );
    }

    #[test]
    fn prompts_are_found_without_retokenising_the_conversation() {
        let tok = tokenizer();
        let template = llama3();
        let talk: Vec<Message> = (0..20)
            .flat_map(|i| {
                [
                    Message::new("user", format!("Question {i}: how do I sleep?")),
                    Message::new("assistant", format!("Answer {i}: try a routine.")),
                ]
            })
            .collect();
        let text = template.render(&talk, false).unwrap();
        let whole = Whole::encode(&tok, &text).unwrap();
        for i in (1..talk.len()).step_by(2) {
            let prompt = template.render(&talk[..i], true).unwrap();
            let k = whole.located(&tok, &prompt).unwrap();
            assert_eq!(k, Some(encode(&tok, &prompt).unwrap().len()), "turn {i}");
        }
        // Text that is not the conversation's beginning is never located.
        assert_eq!(whole.located(&tok, "<|start_header_id|>").unwrap(), None);
    }

    #[test]
    fn templates_that_rewrite_earlier_turns_are_refused() {
        // Marks the final message differently, so the prompt is not a prefix of the whole.
        let source = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
        let tpl = ChatTemplate::new(source, SpecialTokens::default(), "shifty.jinja").unwrap();
        let messages = [
            Message::new("user", "hi"),
            Message::new("assistant", "hello"),
        ];
        let err = render_with_mask(&tpl, &tokenizer(), &messages)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shifty.jinja") && err.contains("message 2"),
            "{err}"
        );
    }
}
