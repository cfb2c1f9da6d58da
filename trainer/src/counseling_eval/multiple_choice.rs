//! Multiple-choice items scored by log-likelihood: the question is the client's message,
//! each option is read as the model's reply to it, and the model picks the option whose
//! tokens it finds likeliest — summed (`accuracy`), and per byte of the option
//! (`accuracy_norm`, which does not favour short options), as lm-evaluation-harness does.

use std::path::{Path, PathBuf};

use data::Message;
use data::choice_items::{ChoiceItem, bundled_choice_items, load_choice_items};
use data::tokenize::Sequence;
use serde::Serialize;

use crate::Result;
use crate::batch::PairBatch;
use crate::chat::Chat;
use crate::objectives::sequences::sequence_logps;
use crate::objectives::values;

/// The bundled synthetic items, shipped inside the binary.
pub const BUNDLED: &str = include_str!("../../../data/examples/counseling-choices.jsonl");
pub const BUNDLED_NAME: &str = "bundled:counseling-choices.jsonl";

/// Options scored in one forward.
const BATCH: usize = 8;

/// The items of `path`, or the bundled set; and the name they are reported under.
pub fn load(path: Option<&Path>) -> Result<(String, Vec<ChoiceItem>)> {
    Ok(match path {
        Some(p) => (p.display().to_string(), load_choice_items(p)?),
        None => (
            BUNDLED_NAME.into(),
            bundled_choice_items(&PathBuf::from(BUNDLED_NAME), BUNDLED)?,
        ),
    })
}

/// What the multiple-choice section reports for one model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChoiceReport {
    pub items: usize,
    pub accuracy: f64,
    pub accuracy_norm: f64,
    /// Ids of the items answered wrongly (by summed log-likelihood).
    pub wrong: Vec<String>,
}

/// Each option as the reply to its item's question, tokenised: one sequence per option,
/// item by item. An item whose question and option run past the model's context is
/// refused, naming it in `origin`, before anything is answered or scored: a score there
/// reads positions the model never saw, and an item far past it took memory by the square
/// of its length.
pub fn option_sequences(chat: &Chat, items: &[ChoiceItem], origin: &str) -> Result<Vec<Sequence>> {
    let (_, tokenizer, template, _) = chat.parts();
    let context = chat.context();
    let mut seqs = Vec::new();
    for item in items {
        let rendered = template.render(&[Message::new("user", item.question.clone())], true)?;
        let prompt = data::chat::encode(tokenizer, &rendered)?;
        for (k, option) in item.options.iter().enumerate() {
            // Tokenised together with the prompt, so the option's first token is the one
            // the model would write there; apart only if the join would change the prompt.
            let whole = data::chat::encode(tokenizer, &format!("{rendered}{option}"))?;
            let cont = match whole.strip_prefix(prompt.as_slice()) {
                Some(c) if !c.is_empty() => c.to_vec(),
                _ => data::chat::encode(tokenizer, option)?,
            };
            let tokens = prompt.len() + cont.len();
            if tokens > context {
                return Err(crate::TrainerError::Input(format!(
                    "{origin}: {}: `question` with option {} takes {tokens} tokens, more than \
                     the model's context of {context} (max_position_embeddings); shorten it",
                    item.id,
                    k + 1
                )));
            }
            seqs.push(Sequence {
                loss_mask: std::iter::repeat_n(0, prompt.len())
                    .chain(std::iter::repeat_n(1, cont.len()))
                    .collect(),
                ids: prompt.iter().chain(&cont).copied().collect(),
            });
        }
    }
    Ok(seqs)
}

/// Each option's summed log-probability as the reply to its item's question, item by item,
/// from [`option_sequences`].
pub fn option_logps(chat: &Chat, items: &[ChoiceItem], seqs: &[Sequence]) -> Vec<Vec<f64>> {
    let (model, _, _, device) = chat.parts();
    let mut flat = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(BATCH) {
        let batch = PairBatch::of_sequences(chunk, 0, device);
        flat.extend(values(sequence_logps(model, &batch).completion));
    }
    let mut flat = flat.into_iter();
    items
        .iter()
        .map(|i| flat.by_ref().take(i.options.len()).collect())
        .collect()
}

/// The index of the largest value (the first, on a tie).
fn argmax(v: impl Iterator<Item = f64>) -> usize {
    v.enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0
}

/// Accuracy of the options' log-likelihoods `logps` (from [`option_logps`]) on `items`.
pub fn score(items: &[ChoiceItem], logps: &[Vec<f64>]) -> ChoiceReport {
    let (mut right, mut right_norm, mut wrong) = (0, 0, Vec::new());
    for (item, lp) in items.iter().zip(logps) {
        if argmax(lp.iter().copied()) == item.answer {
            right += 1;
        } else {
            wrong.push(item.id.clone());
        }
        let per_byte = lp
            .iter()
            .zip(&item.options)
            .map(|(l, o)| l / o.len().max(1) as f64);
        right_norm += usize::from(argmax(per_byte) == item.answer);
    }
    let n = items.len().max(1) as f64;
    ChoiceReport {
        items: items.len(),
        accuracy: right as f64 / n,
        accuracy_norm: right_norm as f64 / n,
        wrong,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, options: &[&str], answer: usize) -> ChoiceItem {
        ChoiceItem {
            id: id.into(),
            question: "q".into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            answer,
        }
    }

    #[test]
    fn summed_and_per_byte_accuracy_can_disagree() {
        let items = [
            // Summed: "no" (−2) beats "a longer answer" (−6); per byte: −1 vs −0.4.
            item("short", &["no", "a longer answer"], 1),
            item("clear", &["yes", "nope"], 0),
        ];
        let logps = [vec![-2.0, -6.0], vec![-1.0, -9.0]];
        let r = score(&items, &logps);
        assert_eq!(r.items, 2);
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.accuracy_norm, 1.0);
        assert_eq!(r.wrong, ["short"]);
    }

    #[test]
    fn the_bundled_items_load_with_four_options_and_varied_answers() {
        let (name, items) = load(None).unwrap();
        assert_eq!(name, BUNDLED_NAME);
        assert!(items.len() >= 12);
        assert!(items.iter().all(|i| i.options.len() == 4));
        let answers: std::collections::BTreeSet<usize> = items.iter().map(|i| i.answer).collect();
        assert!(
            answers.len() >= 3,
            "answers should not all sit at one letter"
        );
    }
}
