//! `hearth data render`: conversations in, token ids and assistant masks out, one JSON line
//! each — the tokenisation a training run would use, in a form other tools can diff.

use std::io::Write;
use std::path::Path;

use crate::format::{Example, FieldError, Format, parse_row};
use crate::read::{BadRow, for_each_row};
use crate::{ChatTemplate, DataError, SpecialTokens, render_with_mask, tokenizer};

/// Which template to render with.
#[derive(Debug, Clone, Copy)]
pub enum TemplateChoice<'a> {
    /// The one the tokenizer directory ships (`chat_template.jinja` or
    /// `tokenizer_config.json`), by name when it ships several.
    Shipped(Option<&'a str>),
    /// A built-in template (`llama3`, `chatml`), for tokenizers that ship none.
    Builtin(&'a str),
}

impl<'a> TemplateChoice<'a> {
    /// The built-in template `builtin` when one is named, else the shipped one (`shipped`
    /// by name, when the tokenizer ships several): what `--template` and a recipe's
    /// `data.template` mean everywhere.
    pub fn new(builtin: Option<&'a str>, shipped: Option<&'a str>) -> Self {
        match builtin {
            Some(name) => Self::Builtin(name),
            None => Self::Shipped(shipped),
        }
    }
}

/// Loads the template `choice` names from `dir`.
pub fn template_for(dir: &Path, choice: TemplateChoice<'_>) -> Result<ChatTemplate, DataError> {
    // A directory that is not there has no template for a different reason.
    if let Err(source) = std::fs::metadata(dir) {
        return Err(DataError::Io {
            path: dir.to_path_buf(),
            source,
        });
    }
    match choice {
        TemplateChoice::Shipped(name) => ChatTemplate::from_dir(dir, name)?.ok_or_else(|| DataError::Template {
            origin: dir.display().to_string(),
            reason: "no chat template (no chat_template.jinja, and no chat_template in tokenizer_config.json): \
                     add one as chat_template.jinja, or choose a built-in one (llama3 or chatml) \
                     with --template where the command has it, or a recipe's data.template"
                .into(),
        }),
        TemplateChoice::Builtin(name) => {
            // A tokenizer_config.json that does not parse is an error here as everywhere:
            // read as none, the template would drop its BOS and special tokens unseen.
            let (config, _) = crate::template::tokenizer_config(dir)?;
            ChatTemplate::builtin(name, SpecialTokens::from_tokenizer_config(&config))
        }
    }
}

/// The template a model in `dir` with `adapter` renders with: with no template chosen, the
/// adapter's own `chat_template.jinja` where it has one (a run trained with a recipe's
/// built-in template writes it there, as TRL saves its tokenizer's beside an adapter), its
/// special tokens still the model's; else [`template_for`] of `dir`.
pub fn template_for_tuned(
    dir: &Path,
    adapter: Option<&Path>,
    choice: TemplateChoice<'_>,
) -> Result<ChatTemplate, DataError> {
    if let (TemplateChoice::Shipped(None), Some(adapter)) = (choice, adapter) {
        let jinja = adapter.join("chat_template.jinja");
        if jinja.is_file() {
            let (config, _) = crate::template::tokenizer_config(dir)?;
            let source = std::fs::read_to_string(&jinja).map_err(|source| DataError::Io {
                path: jinja.clone(),
                source,
            })?;
            let tokens = SpecialTokens::from_tokenizer_config(&config);
            return ChatTemplate::new(&source, tokens, jinja.display().to_string());
        }
    }
    template_for(dir, choice)
}

/// Renders every `{"messages": [...]}` line of `input` into `out`. Returns the number of
/// conversations written. `out` appears only once complete, and only if `input` had a row
/// to render: an empty input is an error, as it is to `inspect` and `train`. An `out` that
/// exists already is refused.
pub fn render_jsonl(
    dir: &Path,
    choice: TemplateChoice<'_>,
    input: &Path,
    out: &Path,
) -> Result<usize, DataError> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), out.canonicalize())
        && a == b
    {
        return Err(DataError::Unsupported {
            path: out.to_path_buf(),
            reason: "refusing to write here: it is the input; choose another --out".into(),
        });
    }
    crate::output::check_jsonl_name(out, "rendered conversations")?;
    let template = template_for(dir, choice)?;
    let tok = tokenizer::load(dir)?;
    crate::output::write_new(out, |writer, out| {
        let mut count = 0;
        for_each_row(
            input,
            &mut |row| {
                let location = row.location;
                let row_error = |column: Option<String>, reason: String| DataError::Row {
                    path: input.to_path_buf(),
                    location,
                    column,
                    reason,
                };
                let example = parse_row(Format::Messages, row.fields).map_err(|e| {
                    let FieldError { column, reason } = crate::dataset::explain(e, &row.unreadable);
                    row_error(column, reason)
                })?;
                let Example::Conversation { messages, .. } = example else {
                    return Err(row_error(None, "expected a conversation".into()));
                };
                let rendered = render_with_mask(&template, &tok, &messages)
                    .map_err(|e| row_error(Some("messages".into()), e.to_string()))?;
                let line = serde_json::json!({
                    "input_ids": rendered.input_ids,
                    "assistant_masks": rendered.assistant_mask,
                });
                writeln!(writer, "{line}").map_err(|source| DataError::Io {
                    path: out.to_path_buf(),
                    source,
                })?;
                count += 1;
                Ok(())
            },
            &mut |bad: BadRow| Err(bad.into_error(input)),
        )?;
        if count == 0 {
            return Err(DataError::Unsupported {
                path: input.to_path_buf(),
                reason: "no rows to read".into(),
            });
        }
        Ok(count)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{BUNDLED_CORPUS, LLAMA3_SPECIAL_TOKENS, train_bpe};

    /// An adapter's own template wins over its model's when none is chosen, with the
    /// model's special tokens; a chosen one, or an adapter without one, leaves the model's.
    #[test]
    fn an_adapters_own_template_is_the_one_it_renders_with() {
        let model = tempfile::tempdir().unwrap();
        let adapter = tempfile::tempdir().unwrap();
        std::fs::write(
            model.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "chat_template": "M{{ messages[0].content }}"}"#,
        )
        .unwrap();
        let render = |adapter: Option<&Path>, choice| {
            template_for_tuned(model.path(), adapter, choice)
                .unwrap()
                .render(&[crate::Message::new("user", "x")], false)
                .unwrap()
        };
        let shipped = TemplateChoice::Shipped(None);
        assert_eq!(render(Some(adapter.path()), shipped), "Mx");
        std::fs::write(
            adapter.path().join("chat_template.jinja"),
            "{{ bos_token }}A{{ messages[0].content }}",
        )
        .unwrap();
        assert_eq!(render(Some(adapter.path()), shipped), "<s>Ax");
        assert_eq!(render(None, shipped), "Mx");
        let chatml = TemplateChoice::Builtin("chatml");
        assert!(render(Some(adapter.path()), chatml).starts_with("<|im_start|>user"));
    }

    #[test]
    fn an_input_without_rows_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        train_bpe(&[BUNDLED_CORPUS], 300, &LLAMA3_SPECIAL_TOKENS)
            .unwrap()
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        let input = dir.path().join("in.jsonl");
        let out = dir.path().join("out.jsonl");
        let render = || render_jsonl(dir.path(), TemplateChoice::Builtin("llama3"), &input, &out);
        for empty in ["", "\n  \n"] {
            std::fs::write(&input, empty).unwrap();
            let e = render().unwrap_err().to_string();
            assert!(e.contains("in.jsonl: no rows to read"), "{e}");
            let mut names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["in.jsonl", "tokenizer.json"]);
        }
        let talk = serde_json::json!({"messages": [
            {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]});
        std::fs::write(&input, format!("{talk}\n")).unwrap();
        assert_eq!(render().unwrap(), 1);
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1);
    }
}
