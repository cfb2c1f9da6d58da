//! `hearth data inspect`: what a data file holds and what tokenisation will make of it —
//! format, counts, a token-length histogram, truncation — and, only when asked, one
//! rendered example with its loss-masked spans marked (data may be sensitive).

use std::fmt;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::format::Example;
use crate::tokenize::{Tokenized, Tokenizing, Truncation, TruncationCounts};
use crate::{
    ChatTemplate, DataError, Format, LoadOptions, load_examples_in_order, render_with_mask_from,
};

/// What `inspect` found.
#[derive(Debug, Clone)]
pub struct Report {
    pub format: Format,
    pub examples: usize,
    pub skipped: usize,
    pub max_length: usize,
    pub truncation: Truncation,
    pub counts: TruncationCounts,
    /// Token lengths before truncation, one per example.
    pub lengths: Vec<usize>,
    /// The first example rendered with `⟦…⟧` around the tokens that carry loss.
    pub example: Option<String>,
    /// Whether the example was asked for (`--show-example`).
    pub asked: bool,
}

/// Loads `path` and tokenises every example as training would.
pub fn inspect(
    path: &Path,
    load: &LoadOptions,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    max_length: usize,
    truncation: Truncation,
    show_example: bool,
) -> Result<Report, DataError> {
    let measure = Tokenizing {
        template,
        tokenizer,
        max_length: usize::MAX,
        truncation,
    };
    // The first bad row stops it, whether it cannot be read or cannot be tokenised.
    let loaded = load_examples_in_order(path, load, &mut |example, location| match measure
        .example(example, &mut TruncationCounts::default())
    {
        Ok(_) => Ok(()),
        Err(e) => Err(DataError::Row {
            path: path.to_path_buf(),
            location,
            column: None,
            reason: e.to_string(),
        }),
    })?;
    let fit = Tokenizing {
        template,
        tokenizer,
        max_length,
        truncation,
    };
    let mut counts = TruncationCounts::default();
    let mut lengths = Vec::with_capacity(loaded.examples.len());
    let mut skipped = loaded.skipped.len();
    let mut first_good = None;
    for (i, example) in loaded.examples.iter().enumerate() {
        // An example that cannot be tokenised (no assistant turn, a template that raises)
        // is a bad row, named by its file and line as training names it, or skipped.
        let bad = |e: DataError| -> Result<(), DataError> {
            match loaded.locations.get(i) {
                _ if load.skip_bad_rows => Ok(()),
                Some(&location) => Err(DataError::Row {
                    path: path.to_path_buf(),
                    location,
                    column: None,
                    reason: e.to_string(),
                }),
                None => Err(e),
            }
        };
        let mut ignore = TruncationCounts::default();
        let mut fitted = TruncationCounts::default();
        let length = match measure
            .example(example, &mut ignore)
            .and_then(|t| fit.example(example, &mut fitted).map(|_| t))
        {
            Ok(Some(Tokenized::Sequence(s))) => s.len(),
            Ok(Some(Tokenized::Pair(p))) => p.prompt.len() + p.chosen.len().max(p.rejected.len()),
            Ok(Some(Tokenized::Prompt(p))) => p.len(),
            Ok(None) => 0,
            Err(e) => {
                bad(e)?;
                skipped += 1;
                continue;
            }
        };
        lengths.push(length);
        counts.truncated += fitted.truncated;
        counts.dropped += fitted.dropped;
        first_good.get_or_insert((i, example));
    }
    let example = match (show_example, first_good) {
        (true, Some((i, e))) => {
            Some(
                marked(e, template, tokenizer).map_err(|e| match loaded.locations.get(i) {
                    Some(&location) => DataError::Row {
                        path: path.to_path_buf(),
                        location,
                        column: None,
                        reason: e.to_string(),
                    },
                    None => e,
                })?,
            )
        }
        _ => None,
    };
    Ok(Report {
        format: loaded.format,
        examples: lengths.len(),
        skipped,
        max_length,
        truncation,
        counts,
        lengths,
        example,
        asked: show_example,
    })
}

/// Renders an example, wrapping the loss-carrying tokens in `⟦` `⟧`.
fn marked(
    example: &Example,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> Result<String, DataError> {
    match example {
        Example::Conversation {
            messages,
            train_from,
            ..
        } => marked_messages(
            render_with_mask_from(template, tokenizer, messages, *train_from)?,
            tokenizer,
        ),
        // Both sides of a pair: what it teaches is their difference.
        Example::Pair {
            prompt,
            chosen,
            rejected,
            ..
        } => {
            let side = |completion: &[crate::Message]| {
                let mut all = prompt.clone();
                all.extend(completion.iter().cloned());
                marked_messages(
                    crate::chat::render_pair_side(template, tokenizer, &all, prompt.len())?,
                    tokenizer,
                )
            };
            Ok(format!(
                "chosen:\n{}\nrejected:\n{}",
                side(chosen)?,
                side(rejected)?
            ))
        }
        Example::Prompt { prompt, .. } => template.render(prompt, true),
    }
}

fn marked_messages(r: crate::chat::Rendered, tokenizer: &Tokenizer) -> Result<String, DataError> {
    let mut out = String::new();
    let mut start = 0;
    while start < r.input_ids.len() {
        let m = r.assistant_mask[start];
        let end = (start..r.input_ids.len())
            .find(|&i| r.assistant_mask[i] != m)
            .unwrap_or(r.input_ids.len());
        let text = tokenizer
            .decode(&r.input_ids[start..end], false)
            .map_err(|e| DataError::Conversation(format!("decoding: {e}")))?;
        if m == 1 {
            out.push('⟦');
            out.push_str(&text);
            out.push('⟧');
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "format: {}", self.format.name())?;
        writeln!(
            f,
            "examples: {} ({} bad rows skipped)",
            self.examples, self.skipped
        )?;
        let mut sorted = self.lengths.clone();
        sorted.sort_unstable();
        if let (Some(min), Some(max)) = (sorted.first(), sorted.last()) {
            let median = sorted[sorted.len() / 2];
            writeln!(
                f,
                "tokens per example: min {min}, median {median}, max {max}"
            )?;
            writeln!(f, "histogram:")?;
            let mut upper = 32usize;
            let mut lower = 0usize;
            let widest = sorted.len();
            loop {
                let n = sorted.iter().filter(|&&l| l > lower && l <= upper).count()
                    + if lower == 0 {
                        sorted.iter().filter(|&&l| l == 0).count()
                    } else {
                        0
                    };
                let bar = "#".repeat((n * 40).div_ceil(widest.max(1)));
                writeln!(f, "  {:>6}–{:<6} {:>7} {bar}", lower + 1, upper, n)?;
                if upper >= *max {
                    break;
                }
                lower = upper;
                upper *= 2;
            }
        }
        writeln!(
            f,
            "max_length {} ({}): {} truncated, {} dropped",
            self.max_length,
            self.truncation.name(),
            self.counts.truncated,
            self.counts.dropped
        )?;
        match &self.example {
            Some(text) => write!(f, "first example (⟦…⟧ carries loss):\n{text}"),
            None if self.asked => write!(f, "(no example to show: every row was skipped)"),
            None => write!(
                f,
                "(pass --show-example to print the first example with its loss spans marked)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpecialTokens;
    use crate::tokenizer::{BUNDLED_CORPUS, LLAMA3_SPECIAL_TOKENS, train_bpe};

    #[test]
    fn a_row_that_cannot_be_tokenised_is_named_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("talks.jsonl");
        let talk = |user: &str, reply: Option<&str>| {
            let mut messages = vec![serde_json::json!({"role": "user", "content": user})];
            if let Some(r) = reply {
                messages.push(serde_json::json!({"role": "assistant", "content": r}));
            }
            format!("{}\n", serde_json::json!({ "messages": messages }))
        };
        let write = |rows: &[String]| std::fs::write(&path, rows.concat()).unwrap();
        let (no_reply, good, raises) = (
            talk("nobody answers", None),
            talk("How do I start?", Some("What feels hardest?")),
            talk("boom", Some("ok")),
        );
        let source = "{% for m in messages %}{% if m.content == 'boom' %}\
            {{ raise_exception('a template refusal') }}{% endif %}\
            <|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>{% endfor %}\
            {% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}";
        let template = ChatTemplate::new(source, SpecialTokens::default(), "test").unwrap();
        let tokenizer = train_bpe(&[BUNDLED_CORPUS], 400, &LLAMA3_SPECIAL_TOKENS).unwrap();
        let run = |skip_bad_rows: bool| {
            let load = LoadOptions {
                skip_bad_rows,
                ..Default::default()
            };
            inspect(
                &path,
                &load,
                &template,
                &tokenizer,
                1000,
                Truncation::KeepStart,
                true,
            )
        };
        write(&[no_reply.clone(), good.clone()]);
        let e = run(false).unwrap_err().to_string();
        assert!(
            e.contains("talks.jsonl: line 1: ") && e.contains("no assistant tokens"),
            "{e}"
        );
        write(&[good.clone(), raises.clone()]);
        let e = run(false).unwrap_err().to_string();
        assert!(
            e.contains("talks.jsonl: line 2: ") && e.contains("a template refusal"),
            "{e}"
        );
        // Skipped instead, and counted with the rows that could not be read at all.
        write(&[no_reply, good, raises, "not json\n".into()]);
        let report = run(true).unwrap();
        assert_eq!((report.examples, report.skipped), (1, 3));
        assert_eq!(report.lengths.len(), 1);
        // The example shown is the first that tokenised, not the bad first row.
        let shown = report.example.unwrap();
        assert!(
            shown.contains("How do I start?") && !shown.contains("nobody"),
            "{shown}"
        );
    }
}
