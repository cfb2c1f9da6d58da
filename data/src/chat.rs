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
    if messages.is_empty() {
        return Err(DataError::Conversation("the conversation is empty".into()));
    }
    if template.has_generation_tags() {
        return render_generation_spans(template, tokenizer, messages, train_from);
    }
    // Only blank replies: the mask would hold just the end-of-turn token, teaching the
    // model to say nothing.
    let trained = messages
        .iter()
        .skip(train_from)
        .filter(|m| m.is_assistant());
    if trained.clone().all(|m| m.content.trim().is_empty()) && trained.count() > 0 {
        return Err(DataError::Conversation(
            "no assistant tokens to learn from: every assistant turn is empty".into(),
        ));
    }
    let text = template.render(messages, false)?;
    let input_ids = encode(tokenizer, &text)?;
    let mut assistant_mask = vec![0u8; input_ids.len()];
    for (i, message) in messages.iter().enumerate() {
        if !message.is_assistant() || i < train_from {
            continue;
        }
        let prompt = encode(tokenizer, &template.render(&messages[..i], true)?)?;
        let through = if i + 1 == messages.len() {
            input_ids.clone()
        } else {
            encode(tokenizer, &template.render(&messages[..=i], false)?)?
        };
        let is_prefix = |short: &[u32], long: &[u32]| {
            long.len() >= short.len() && long[..short.len()] == *short
        };
        if !is_prefix(&prompt, &through) || !is_prefix(&through, &input_ids) {
            return Err(DataError::Conversation(format!(
                "{}: rendering message {} (assistant) does not extend the prompt before it, so its \
                 tokens cannot be masked; the template changes earlier text as turns are added",
                template.origin(),
                i + 1
            )));
        }
        for m in &mut assistant_mask[prompt.len()..through.len()] {
            *m = 1;
        }
    }
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

/// The mask of a template with `{% generation %}` tags: exactly the tokens that the tagged
/// spans touch, from the token holding a span's first byte through the one holding its last,
/// as transformers' `return_assistant_tokens_mask` takes it. With `train_from`, spans that
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
    // The token whose byte range holds `at`: the first that ends past it.
    let token_at = |at: usize| offsets.iter().position(|&(s, e)| s <= at && at < e);
    let mut assistant_mask = vec![0u8; input_ids.len()];
    for span in rendered.spans.iter().filter(|s| s.start >= context) {
        let (Some(first), Some(last)) = (token_at(span.start), token_at(span.end - 1)) else {
            continue;
        };
        for m in &mut assistant_mask[first..=last] {
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
    use crate::tokenizer::{BUNDLED_CORPUS, LLAMA3_SPECIAL_TOKENS, train_bpe};

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
