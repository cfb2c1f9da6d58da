//! Multiple-choice items (`question`, `options`, `answer`), read in the shapes published
//! sets use, so that CBT-Bench-style and PsyQA-style files load as they are: options as a
//! list or as an object keyed by letter; the answer as a 0-based index, a letter
//! (`"B"`, `"(b)"`, `"B."`), or the text of the right option.

use std::path::Path;

use serde_json::{Map, Value};

use crate::DataError;
use crate::read::{BadRow, Location, Row, for_each_jsonl_row, for_each_row};

/// One item: the question (with its `context`, when the row has one, in front), the
/// options in order, and the index of the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    /// The row's `id`, or its location (`line 3`).
    pub id: String,
    pub question: String,
    pub options: Vec<String>,
    pub answer: usize,
}

const QUESTION: &[&str] = &["question", "query", "prompt", "stem"];
const OPTIONS: &[&str] = &["options", "choices"];
const ANSWER: &[&str] = &["answer", "label", "answer_index", "correct"];

/// Reads every item of `path` (JSONL, JSON, Parquet or Arrow). A row that is not an item
/// fails with its file, location and column.
pub fn load_choice_items(path: &Path) -> Result<Vec<ChoiceItem>, DataError> {
    read_items(path, &mut |on_row, on_bad| {
        for_each_row(path, on_row, on_bad)
    })
}

/// [`load_choice_items`] over JSON Lines `text` shipped inside the binary; `origin` names
/// it in errors.
pub fn bundled_choice_items(origin: &Path, text: &str) -> Result<Vec<ChoiceItem>, DataError> {
    read_items(origin, &mut |on_row, on_bad| {
        for_each_jsonl_row(text, origin, on_row, on_bad)
    })
}

type OnRow<'a> = &'a mut dyn FnMut(Row) -> Result<(), DataError>;
type OnBad<'a> = &'a mut dyn FnMut(BadRow) -> Result<(), DataError>;

fn read_items(
    path: &Path,
    rows: &mut dyn FnMut(OnRow<'_>, OnBad<'_>) -> Result<(), DataError>,
) -> Result<Vec<ChoiceItem>, DataError> {
    let mut items = Vec::new();
    let mut on_row = |row: Row| -> Result<(), DataError> {
        let item =
            item_of(&row.fields, row.location).map_err(|(column, reason)| DataError::Row {
                path: path.to_path_buf(),
                location: row.location,
                column: Some(column),
                reason,
            })?;
        items.push(item);
        Ok(())
    };
    let mut on_bad = |bad: BadRow| Err(bad.into_error(path));
    rows(&mut on_row, &mut on_bad)?;
    if items.is_empty() {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: "no multiple-choice items".into(),
        });
    }
    Ok(items)
}

type Bad = (String, String);

fn first<'a>(fields: &'a Map<String, Value>, names: &[&str]) -> Option<(&'a str, &'a Value)> {
    names
        .iter()
        .find_map(|n| fields.get_key_value(*n))
        .map(|(k, v)| (k.as_str(), v))
}

fn item_of(fields: &Map<String, Value>, location: Location) -> Result<ChoiceItem, Bad> {
    let (qkey, question) =
        first(fields, QUESTION).ok_or_else(|| ("question".into(), "missing".into()))?;
    let question = question
        .as_str()
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| (qkey.to_string(), "expected non-empty text".into()))?;
    let question = match fields.get("context").and_then(Value::as_str) {
        Some(c) if !c.trim().is_empty() => format!("{c}\n\n{question}"),
        _ => question.to_string(),
    };
    let (okey, options) =
        first(fields, OPTIONS).ok_or_else(|| ("options".into(), "missing".into()))?;
    let bad_options = || {
        (
            okey.to_string(),
            "expected a list of at least two texts, or an object of them keyed by letter".into(),
        )
    };
    let (options, keys): (Vec<String>, Vec<String>) = match options {
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, v)| Some((v.as_str()?.to_string(), letter(i))))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad_options)?
            .into_iter()
            .unzip(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| Some((v.as_str()?.to_string(), k.clone())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad_options)?
            .into_iter()
            .unzip(),
        _ => return Err(bad_options()),
    };
    if options.len() < 2 || options.iter().any(|o| o.trim().is_empty()) {
        return Err(bad_options());
    }
    // Two options of the same text tie, and a tie goes to the first: the item would be
    // scored by where its answer sits, not by the model.
    for (j, o) in options.iter().enumerate() {
        if let Some(i) = options[..j].iter().position(|p| p.trim() == o.trim()) {
            return Err((
                okey.to_string(),
                format!(
                    "options {} and {} are the same text; each option must differ",
                    keys[i], keys[j]
                ),
            ));
        }
    }
    let (akey, answer) =
        first(fields, ANSWER).ok_or_else(|| ("answer".into(), "missing".into()))?;
    let answer = answer_index(answer, &options, &keys).ok_or_else(|| {
        (
            akey.to_string(),
            format!(
                "{} names none of the {} options (give a 0-based index, a letter, or an \
                 option's text)",
                shown_answer(answer),
                options.len()
            ),
        )
    })?;
    let id = match fields.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => location.to_string(),
    };
    Ok(ChoiceItem {
        id,
        question,
        options,
        answer,
    })
}

fn letter(i: usize) -> String {
    char::from_u32('A' as u32 + i as u32).map_or_else(|| i.to_string(), String::from)
}

/// The right option's index: a 0-based number, an option's key (a letter, matched without
/// case, brackets or a trailing dot), or an option's exact text.
/// The answer as an error shows it: a number or a short key (`C`, `b)`) as it is; any
/// other text, which may be an option's wording, only by its length.
fn shown_answer(answer: &Value) -> String {
    match answer {
        Value::Number(n) => n.to_string(),
        Value::String(s)
            if s.trim().chars().count() <= 3 && !s.trim().contains(char::is_whitespace) =>
        {
            format!("{s:?}")
        }
        Value::String(s) => format!("an answer of {} characters", s.chars().count()),
        other => format!("{} answer", crate::read::kind(other)),
    }
}

fn answer_index(answer: &Value, options: &[String], keys: &[String]) -> Option<usize> {
    match answer {
        Value::Number(n) => n
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < options.len()),
        Value::String(s) => {
            let bare = s
                .trim()
                .trim_start_matches('(')
                .trim_end_matches(['.', ')', ':']);
            keys.iter()
                .position(|k| k.eq_ignore_ascii_case(bare))
                .or_else(|| options.iter().position(|o| o.trim() == s.trim()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: Value) -> Result<ChoiceItem, Bad> {
        item_of(v.as_object().unwrap(), Location::Line(7))
    }

    #[test]
    fn reads_lists_lettered_objects_and_every_answer_form() {
        let opts = serde_json::json!(["calm", "catastrophising", "labelling"]);
        for answer in [
            serde_json::json!(1),
            serde_json::json!("B"),
            serde_json::json!("(b)"),
            serde_json::json!("B."),
            serde_json::json!("catastrophising"),
        ] {
            let got =
                item(serde_json::json!({"question": "Which?", "options": opts, "answer": answer}))
                    .unwrap();
            assert_eq!(got.answer, 1, "{answer}");
            assert_eq!(got.id, "line 7");
            assert_eq!(got.options.len(), 3);
        }
        let keyed = item(serde_json::json!({
            "id": 12, "context": "A client says: I always fail.", "question": "Which distortion?",
            "choices": {"A": "overgeneralisation", "B": "mind reading"}, "label": "a"
        }))
        .unwrap();
        assert_eq!(keyed.answer, 0);
        assert_eq!(keyed.id, "12");
        assert_eq!(
            keyed.question,
            "A client says: I always fail.\n\nWhich distortion?"
        );
        assert_eq!(keyed.options, ["overgeneralisation", "mind reading"]);
    }

    #[test]
    fn refuses_rows_that_are_not_items_naming_the_column() {
        let cases = [
            (
                serde_json::json!({"options": ["a", "b"], "answer": 0}),
                "question",
            ),
            (serde_json::json!({"question": "q", "answer": 0}), "options"),
            (
                serde_json::json!({"question": "q", "options": ["only"], "answer": 0}),
                "options",
            ),
            (
                serde_json::json!({"question": "q", "options": ["a", 3], "answer": 0}),
                "options",
            ),
            (
                serde_json::json!({"question": "q", "options": ["a", "b"]}),
                "answer",
            ),
            (
                serde_json::json!({"question": "q", "options": ["a", "b"], "answer": 2}),
                "answer",
            ),
            (
                serde_json::json!({"question": "q", "options": ["a", "b"], "answer": "C"}),
                "answer",
            ),
            (
                serde_json::json!({"question": " ", "options": ["a", "b"], "answer": 0}),
                "question",
            ),
            (
                serde_json::json!({"question": "q", "options": ["a", "b", " a"], "answer": 1}),
                "options",
            ),
            (
                serde_json::json!({"question": "q", "choices": {"A": "x", "B": "x"}, "answer": "B"}),
                "choices",
            ),
        ];
        for (row, column) in cases {
            let (got, why) = item(row.clone()).unwrap_err();
            assert_eq!(got, column, "{row}");
            if row.to_string().contains("\"x\"") {
                assert_eq!(
                    why,
                    "options A and B are the same text; each option must differ"
                );
            }
        }
    }

    #[test]
    fn an_unmatched_answer_is_named_by_its_key_or_length_never_its_text() {
        let opts = serde_json::json!(["I can't sleep", "I keep crying"]);
        let reason = |answer: Value| {
            item(serde_json::json!({"question": "q", "options": opts, "answer": answer}))
                .unwrap_err()
                .1
        };
        assert!(reason(serde_json::json!(5)).starts_with("5 names none of the 2"));
        assert!(reason(serde_json::json!("C")).starts_with("\"C\" names none"));
        let said = "I want to hurt myself tonight";
        let got = reason(serde_json::json!(said));
        assert!(!got.contains("hurt"), "{got}");
        assert!(
            got.starts_with("an answer of 29 characters names none"),
            "{got}"
        );
        let got = reason(serde_json::json!({"text": said}));
        assert!(
            !got.contains("hurt") && got.starts_with("an object answer"),
            "{got}"
        );
    }

    #[test]
    fn a_bad_file_names_its_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.jsonl");
        std::fs::write(
            &path,
            "{\"question\":\"q\",\"options\":[\"a\",\"b\"],\"answer\":0}\n\
             {\"question\":\"q\",\"options\":[\"a\",\"b\"],\"answer\":5}\n",
        )
        .unwrap();
        let e = load_choice_items(&path).unwrap_err().to_string();
        assert!(e.contains("items.jsonl: line 2, column `answer`"), "{e}");
        std::fs::write(&path, "").unwrap();
        let e = load_choice_items(&path).unwrap_err().to_string();
        assert!(e.contains("no multiple-choice items"), "{e}");
    }
}
