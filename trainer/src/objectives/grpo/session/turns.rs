//! The text a stream appends between turns. A speaker's reply is kept as the tokens it
//! sampled (re-encoding its text could split it differently), so the template is asked only
//! for what comes after the reply: its end-of-turn, the other side's turn and the next
//! generation prompt. A marker stands in for the reply, and the rendering before the marker
//! must be exactly the earlier rendering, or the template would have rewritten the past.

use data::{ChatTemplate, Message};
use tokenizers::Tokenizer;

use crate::{Result, TrainerError};

/// Private-use characters no template trims or escapes.
const MARK: &str = "\u{E000}hearth-turn\u{E001}";

/// The tokens to append after a reply that ended with `last` (`stop`: whether `last` is the
/// stop token the model sampled): `before` is the speaker's view up to its reply, `after`
/// the messages that followed it, and the result ends with the speaker's next generation
/// prompt. A stop token the template also writes is not written twice.
pub fn after_reply(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    before: &[Message],
    after: &[Message],
    stop: Option<u32>,
) -> Result<Vec<u32>> {
    let bad = |why: &str| {
        TrainerError::Input(format!(
            "chat template {}: {why}; session rollouts need a template whose renderings of a \
             growing dialogue extend each other",
            template.origin()
        ))
    };
    let head = template.render(before, true)?;
    let mut view = before.to_vec();
    view.push(Message::new("assistant", MARK));
    view.extend_from_slice(after);
    let text = template.render(&view, true)?;
    let at = text
        .find(MARK)
        .ok_or_else(|| bad("it dropped the assistant's reply"))?;
    if text[..at] != head {
        return Err(bad(
            "it renders the dialogue before a reply differently once the reply is added",
        ));
    }
    let mut tail = &text[at + MARK.len()..];
    if let Some(word) = stop.and_then(|t| tokenizer.id_to_token(t))
        && let Some(rest) = tail.strip_prefix(word.as_str())
    {
        tail = rest;
    }
    Ok(data::chat::encode(tokenizer, tail)?)
}

/// The whole view rendered with its generation prompt: a stream's first chunk.
pub fn opening(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    view: &[Message],
) -> Result<Vec<u32>> {
    Ok(data::chat::encode(
        tokenizer,
        &template.render(view, true)?,
    )?)
}
