//! `--set` overrides applied to a recipe's TOML, and the key and nearest valid name an
//! error is about.

use super::Recipe;
use crate::{Result, TrainerError};

/// `a.b.c=value`: the value is read as TOML (numbers, booleans, arrays, quoted strings),
/// falling back to a bare string.
pub(super) fn apply_override(table: &mut toml::Table, text: &str) -> Result<()> {
    let (key, raw) = split_assignment(text)
        .map_err(|why| TrainerError::Input(format!("--set `{text}`: {why}")))?;
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        // A value that goes on past its line into more keys (`1\nmax_steps=5`) would set
        // them unseen, or drop them: one --set sets one key.
        Ok(t) if t.len() > 1 => {
            return Err(TrainerError::Input(format!(
                "--set `{}`: the value runs on into other keys; give each its own --set",
                text.escape_debug()
            )));
        }
        Ok(mut t) => t.remove("v"),
        // A value that opens like TOML (a quote, an array, an inline table) but does not
        // parse is a typo, not a bare string: kept as text it would carry its stray quote
        // into a path, and a model would be made there.
        Err(e) if raw.trim_start().starts_with(['"', '\'', '[', '{']) => {
            return Err(TrainerError::Input(format!(
                "--set `{}`: the value is not valid TOML ({}); quote a string whole, \
                 e.g. key=\"text\", or give it bare",
                text.escape_debug(),
                e.message().trim()
            )));
        }
        Err(_) => None,
    }
    .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    // `train={max_steps=1}` would replace the whole section, every other key of it going
    // back to its default unseen.
    if value.is_table() {
        return Err(TrainerError::Input(format!(
            "--set `{text}`: a table would replace every key of `{}`; set its keys one at a \
             time ({}.key=value)",
            key.trim(),
            key.trim()
        )));
    }
    let parts = key_parts(key.trim())
        .map_err(|why| TrainerError::Input(format!("--set `{}`: {why}", text.escape_debug())))?;
    if parts.iter().any(|p| p.trim().is_empty()) {
        return Err(TrainerError::Input(format!(
            "--set `{text}`: a part of the key is empty (expected section.key=value)"
        )));
    }
    let (last, sections) = parts
        .split_last()
        .ok_or_else(|| TrainerError::Input(format!("--set `{text}`: empty key")))?;
    let not_section = |section: &str| {
        TrainerError::Input(format!("--set `{text}`: `{section}` is not a section"))
    };
    let mut current = table;
    let mut parts = sections.iter().peekable();
    while let Some(section) = parts.next() {
        let entry = current
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        // `grpo.rewards.0.weight`: a number after an array of tables picks one of them;
        // the next free number appends a table.
        current = match entry {
            toml::Value::Array(items) => {
                let index = parts.next().ok_or_else(|| not_section(section))?;
                let n = items.len();
                // Plain digits only: `+1` or `01` parse as numbers but are no index a
                // reader would write on purpose.
                let canonical = index.bytes().all(|b| b.is_ascii_digit())
                    && (index.len() == 1 || !index.starts_with('0'));
                let i: usize = index
                    .parse()
                    .ok()
                    .filter(|_| canonical)
                    .ok_or_else(|| not_section(section))?;
                if i == n {
                    items.push(toml::Value::Table(toml::Table::new()));
                }
                items
                    .get_mut(i)
                    .and_then(toml::Value::as_table_mut)
                    .ok_or_else(|| {
                        TrainerError::Input(format!(
                            "--set `{text}`: `{section}` has {n} entries, numbered from 0 (use {n} to add one)"
                        ))
                    })?
            }
            other => other.as_table_mut().ok_or_else(|| not_section(section))?,
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// `key=value` split at the first `=` outside quotes, so a quoted key part may hold one.
fn split_assignment(text: &str) -> std::result::Result<(&str, &str), &'static str> {
    let mut quote = None;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '=') => return Ok((&text[..i], &text[i + 1..])),
            _ => {}
        }
    }
    Err(match quote {
        Some(_) => "a quote in the key is never closed",
        None => "expected section.key=value",
    })
}

/// The parts of a dotted key. A part in TOML quotes (`data.columns."meta.question"`) is
/// one part, dots and all, as in a recipe file: column names and module paths hold dots.
fn key_parts(key: &str) -> std::result::Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let (mut start, mut quote) = (0, None);
    for (i, c) in key.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '.') => {
                parts.push(&key[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    // `split_assignment` found the `=` outside quotes, so every quote in the key is closed.
    parts.push(&key[start..]);
    parts
        .into_iter()
        .map(|part| {
            let quoted = part.trim();
            if !quoted.starts_with(['"', '\'']) {
                return Ok(part.to_string());
            }
            toml::from_str::<toml::Table>(&format!("v = {quoted}"))
                .ok()
                .and_then(|mut t| match t.remove("v") {
                    Some(toml::Value::String(s)) => Some(s),
                    _ => None,
                })
                .ok_or_else(|| format!("the key part {quoted} is not one quoted string"))
        })
        .collect()
}

/// The dotted key a deserialisation error is about. Errors from a `toml::Value` carry no
/// position, so the (overridden) table is written out and parsed again as text, whose error
/// has a span: the key is on that line, under the nearest `[section]` above it.
pub(super) fn key_of_error(table: &toml::Table) -> Option<String> {
    let text = toml::to_string(table).ok()?;
    let span = toml::from_str::<Recipe>(&text).err()?.span()?;
    // No span, or the whole document: the recipe itself lacks a section, which the
    // message names.
    if span.start == 0 && (span.end == 0 || span.end >= text.trim_end().len()) {
        return None;
    }
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    // A table where a value belongs is written out as a section of its own: the error is
    // about that section's header.
    if let Some(header) = line.trim().strip_prefix('[') {
        return Some(header.trim_matches(['[', ']']).to_string());
    }
    let (key, _) = line.split_once('=')?;
    let before = &text[..line_start];
    let section = before
        .lines()
        .rev()
        .find(|l| l.trim().starts_with('['))
        .map(|header| {
            let header = header.trim();
            let name = header.trim_matches(['[', ']']).to_string();
            // `[[grpo.rewards]]`: the entry is numbered as --set numbers it, from 0.
            if header.starts_with("[[") {
                let n = before.lines().filter(|l| l.trim() == header).count();
                format!("{name}.{}", n.saturating_sub(1))
            } else {
                name
            }
        });
    let key = key.trim();
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

/// serde's "unknown field `x`, expected one of `a`, `b`" plus the closest valid key.
pub(super) fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let nearest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .min_by_key(|candidate| strsim::levenshtein(unknown, candidate));
    match nearest {
        Some(n) => format!("unknown key `{unknown}`; did you mean `{n}`?"),
        None => message.to_string(),
    }
}
