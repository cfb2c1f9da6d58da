//! Hugging Face chat templates, rendered as transformers renders them: Jinja with
//! `trim_blocks`, `lstrip_blocks`, loop controls, Python string methods (pycompat),
//! `tojson`, `raise_exception` and `strftime_now`.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

use crate::{DataError, Message};

/// The names [`ChatTemplate::builtin`] knows, for recipes and flags to check up front.
pub const BUILTIN: [&str; 2] = ["llama3", "chatml"];

/// Built-in Llama 3 template, for tokenizers that ship none.
pub const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// Built-in ChatML template (Qwen and many others), for tokenizers that ship none.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The source of the built-in template `name` (one of [`BUILTIN`]).
pub fn builtin_source(name: &str) -> Option<&'static str> {
    match name {
        "llama3" => Some(LLAMA3),
        "chatml" => Some(CHATML),
        _ => None,
    }
}

/// The tokens templates refer to by name; each may be absent.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

impl SpecialTokens {
    /// Reads them from a parsed `tokenizer_config.json`, where each is a string or an
    /// AddedToken object `{"content": ..., ...}`.
    pub fn from_tokenizer_config(config: &Json) -> Self {
        let get = |key: &str| match config.get(key) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
            _ => None,
        };
        Self {
            bos_token: get("bos_token"),
            eos_token: get("eos_token"),
            pad_token: get("pad_token"),
            unk_token: get("unk_token"),
        }
    }
}

/// The ends of the strings that mark the start and end of a `{% generation %}` span in
/// rendered text: private-use characters, around a number chosen per render so that
/// neither marker occurs in the conversation, the template or its tokens (a marker taken
/// from the data would put a user's words into the loss). [`ChatTemplate::render_spans`]
/// strips them.
const MARK_A: char = '\u{F8F0}';
const MARK_B: char = '\u{F8F1}';
/// The context variables the generation filter reads its markers from.
const OPEN_VAR: &str = "__hearth_generation_open";
const CLOSE_VAR: &str = "__hearth_generation_close";
/// The filter the generation tags are rewritten to.
const GENERATION_FILTER: &str = "__hearth_generation";

/// A compiled chat template plus the special tokens it renders with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template as compiled, for choosing markers it does not contain.
    source: String,
    tokens: SpecialTokens,
    origin: String,
    /// Whether the template marks the assistant's output with `{% generation %}`.
    generation: bool,
}

/// A rendered conversation with the byte ranges of its `{% generation %}` spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedSpans {
    pub text: String,
    pub spans: Vec<std::ops::Range<usize>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from in error messages.
    pub fn new(
        source: &str,
        tokens: SpecialTokens,
        origin: impl Into<String>,
    ) -> Result<Self, DataError> {
        let origin = origin.into();
        // It renders every conversation as nothing: a prompt with no tokens, or training
        // data with nothing to learn, reported far from the template.
        if source.trim().is_empty() {
            return Err(DataError::Template {
                origin,
                reason: "the template is empty".into(),
            });
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        crate::template_guards::install(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter(GENERATION_FILTER, mark_generation);
        let (source, generation) = rewrite_generation_tags(source);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| template_error(&origin, &e))?;
        Ok(Self {
            env,
            source,
            tokens,
            origin,
            generation,
        })
    }

    /// Whether the template tags the assistant's output with `{% generation %}`, so the
    /// assistant mask comes from the tags (as transformers'
    /// `return_assistant_tokens_mask` takes it) rather than from incremental rendering.
    pub fn has_generation_tags(&self) -> bool {
        self.generation
    }

    /// One of the [`BUILTIN`] templates.
    pub fn builtin(name: &str, tokens: SpecialTokens) -> Result<Self, DataError> {
        let source = match builtin_source(name) {
            Some(source) => source,
            None => {
                let other = name;
                return Err(DataError::Template {
                    origin: "template".into(),
                    reason: format!(
                        "unknown built-in template `{other}` ({})",
                        BUILTIN.join(", ")
                    ),
                });
            }
        };
        Self::new(source, tokens, format!("built-in {name} template"))
    }

    /// The template a checkpoint or tokenizer directory ships: `chat_template.jinja` if
    /// present (it overrides the config, as in transformers), else `chat_template` in
    /// `tokenizer_config.json` — a string, or a list of `{name, template}` from which `name`
    /// (default `"default"`) is taken. A name other than `default` is also looked up as
    /// `additional_chat_templates/NAME.jinja`, where transformers saves the named ones
    /// beside `chat_template.jinja`. A name the directory does not ship is an error, also
    /// where it ships a single template: that one is `default`. `Ok(None)` when the
    /// directory has none. A GGUF model (a `.gguf` file, or a directory holding one) ships
    /// its template as `tokenizer.chat_template`.
    pub fn from_dir(dir: &Path, name: Option<&str>) -> Result<Option<Self>, DataError> {
        let (config, config_path) = tokenizer_config(dir)?;
        let tokens = SpecialTokens::from_tokenizer_config(&config);
        let named = name.filter(|n| *n != "default");
        if let Some(n) = named {
            let file = dir.join(ADDITIONAL_TEMPLATES).join(format!("{n}.jinja"));
            if is_plain_name(n) && file.is_file() {
                let source = read(&file)?;
                return Self::new(&source, tokens, file.display().to_string()).map(Some);
            }
        }
        let unnamed = |origin: String| {
            let n = named.unwrap_or_default();
            let mut shipped = vec!["default".to_string()];
            shipped.extend(additional_names(dir));
            DataError::Template {
                origin,
                reason: format!(
                    "no template named `{n}` (this directory ships {})",
                    shipped.join(", ")
                ),
            }
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            if named.is_some() {
                return Err(unnamed(dir.display().to_string()));
            }
            let source = read(&jinja)?;
            return Self::new(&source, tokens, jinja.display().to_string()).map(Some);
        }
        let origin = format!("{} (chat_template)", config_path.display());
        match config.get("chat_template") {
            None | Some(Json::Null) if named.is_some() && !additional_names(dir).is_empty() => {
                Err(unnamed(dir.display().to_string()))
            }
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(_)) if named.is_some() => Err(unnamed(origin)),
            Some(Json::String(source)) => Self::new(source, tokens, origin).map(Some),
            Some(Json::Array(items)) => {
                let wanted = name.unwrap_or("default");
                // transformers keeps the list as a name → template map: a name given twice
                // is its last entry's.
                let found = items
                    .iter()
                    .rev()
                    .find(|item| item.get("name").and_then(Json::as_str) == Some(wanted));
                if let Some(item) = found
                    && !item.get("template").is_some_and(Json::is_string)
                {
                    return Err(DataError::Template {
                        origin,
                        reason: format!("entry `{wanted}` has no text `template`"),
                    });
                }
                let source = found
                    .and_then(|item| item.get("template"))
                    .and_then(Json::as_str)
                    .ok_or_else(|| {
                        let shipped: Vec<&str> = items
                            .iter()
                            .filter_map(|item| item.get("name").and_then(Json::as_str))
                            .collect();
                        DataError::Template {
                            origin: origin.clone(),
                            reason: format!(
                                "no template named `{wanted}` (it ships {})",
                                if shipped.is_empty() {
                                    "none with a name".to_string()
                                } else {
                                    shipped.join(", ")
                                }
                            ),
                        }
                    })?;
                Self::new(source, tokens, format!("{origin}[{wanted}]")).map(Some)
            }
            Some(_) => Err(DataError::Template {
                origin,
                reason: "expected a string or a list of {name, template}".into(),
            }),
        }
    }

    /// Where this template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Renders `messages`, optionally followed by the prompt for the assistant's next turn.
    /// `{% generation %}` tags render as nothing, as in transformers.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        Ok(self.render_spans(messages, add_generation_prompt)?.text)
    }

    /// [`render`](Self::render), with the byte ranges of the text inside each
    /// `{% generation %}` … `{% endgeneration %}` span (empty spans dropped).
    pub fn render_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<RenderedSpans, DataError> {
        // Only a template with the tags marks anything: the others need no markers, and
        // choosing them (which reads the whole conversation) would cost every render.
        let (open, close) = if self.generation {
            self.markers(messages)
        } else {
            (String::new(), String::new())
        };
        if open.is_empty() {
            let text = self.render_marked(messages, add_generation_prompt, "", "")?;
            return Ok(RenderedSpans {
                text,
                spans: Vec::new(),
            });
        }
        let marked = self.render_marked(messages, add_generation_prompt, &open, &close)?;
        let mut text = String::with_capacity(marked.len());
        let mut spans = Vec::new();
        let mut start = None;
        let mut rest = marked.as_str();
        loop {
            let next_open = rest.find(&open);
            let next_close = rest.find(&close);
            let (at, is_open) = match (next_open, next_close) {
                (Some(o), Some(c)) => (o.min(c), o < c),
                (Some(o), None) => (o, true),
                (None, Some(c)) => (c, false),
                (None, None) => break,
            };
            text.push_str(&rest[..at]);
            if is_open {
                start = Some(text.len());
                rest = &rest[at + open.len()..];
            } else {
                if let Some(from) = start.take()
                    && from < text.len()
                {
                    spans.push(from..text.len());
                }
                rest = &rest[at + close.len()..];
            }
        }
        text.push_str(rest);
        Ok(RenderedSpans { text, spans })
    }

    /// Markers for one render that occur nowhere in what it renders from.
    fn markers(&self, messages: &[Message]) -> (String, String) {
        let data = serde_json::to_string(messages).unwrap_or_default();
        let t = &self.tokens;
        let tokens = [&t.bos_token, &t.eos_token, &t.pad_token, &t.unk_token];
        let found = |marker: &str| {
            data.contains(marker)
                || self.source.contains(marker)
                || tokens
                    .iter()
                    .any(|t| t.as_deref().is_some_and(|t| t.contains(marker)))
        };
        (0u64..)
            .map(|n| {
                (
                    format!("{MARK_A}{n}{MARK_B}"),
                    format!("{MARK_B}{n}{MARK_A}"),
                )
            })
            .find(|(open, close)| !found(open) && !found(close))
            .unwrap_or_default()
    }

    fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        open: &str,
        close: &str,
    ) -> Result<String, DataError> {
        let t = &self.tokens;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => t.bos_token.clone().unwrap_or_default(),
            eos_token => t.eos_token.clone().unwrap_or_default(),
            pad_token => t.pad_token.clone(),
            unk_token => t.unk_token.clone(),
            tools => Value::from(()),
            __hearth_generation_open => open,
            __hearth_generation_close => close,
        };
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| template_error(&self.origin, &e))?;
        template
            .render(ctx)
            .map_err(|e| template_error(&self.origin, &e))
    }
}

/// The folder beside `chat_template.jinja` where transformers saves a tokenizer's named
/// templates, one `NAME.jinja` each.
pub const ADDITIONAL_TEMPLATES: &str = "additional_chat_templates";

/// Whether `name` is one file name (no separators, not `.` or `..`), so a template name
/// never reaches outside its folder.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// The names under `dir/additional_chat_templates/`, sorted; none when there is no folder.
fn additional_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join(ADDITIONAL_TEMPLATES)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let stem = path.file_name()?.to_str()?.strip_suffix(".jinja")?;
            path.is_file().then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

/// The parsed `tokenizer_config.json` of `dir` (`Null` when it has none), or a GGUF model's
/// equivalent, with the path to name in errors.
pub fn tokenizer_config(dir: &Path) -> Result<(Json, PathBuf), DataError> {
    if let Some(gguf) = checkpoints::gguf::locate(dir)? {
        let text = checkpoints::gguf::GgufModel::open(&gguf)?.tokenizer_config_json()?;
        let json = serde_json::from_str(&text).unwrap_or_default();
        return Ok((json, gguf));
    }
    let config_path = dir.join("tokenizer_config.json");
    let config: Json = if config_path.is_file() {
        let text = read(&config_path)?;
        serde_json::from_str(&text).map_err(|e| DataError::json(&config_path, &e))?
    } else {
        Json::Null
    };
    Ok((config, config_path))
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: PathBuf::from(path),
        source,
    })
}

fn template_error(origin: &str, e: &Error) -> DataError {
    let mut reason = e.to_string();
    if let Some(line) = e.line() {
        reason = format!("line {line}: {reason}");
    }
    DataError::Template {
        origin: origin.to_string(),
        reason: reason.replace('\n', " "),
    }
}

/// Rewrites `{% generation %}` … `{% endgeneration %}` (with any whitespace control) as a
/// filter block that wraps its output in the span markers. A filter block is a block tag
/// like the one it replaces, so `trim_blocks` and `lstrip_blocks` treat the text around it
/// alike. Returns the source and whether any tag was found.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return (out, found);
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, trail) = match body.chars().next_back() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        match body.trim() {
            "generation" => {
                found = true;
                out.push_str(&format!("{{%{lead} filter {GENERATION_FILTER} {trail}%}}"));
            }
            "endgeneration" => {
                out.push_str(&format!("{{%{lead} endfilter {trail}%}}"));
            }
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    (out, found)
}

fn mark_generation(state: &minijinja::State, content: String) -> Value {
    let marker = |name: &str| {
        state
            .lookup(name)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let (open, close) = (marker(OPEN_VAR), marker(CLOSE_VAR));
    Value::from_safe_string(format!("{open}{content}{close}"))
}

/// `raise_exception(msg)`: templates use it to reject conversations they cannot render.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {message}"),
    ))
}

/// `strftime_now(format)`: today's date in a C strftime format (Llama 3.1's system header).
/// A format chrono cannot read is a template error naming it: chrono's formatter reports
/// it only as a failed write, which `to_string` turns into a panic.
fn strftime_now(format: String) -> Result<String, Error> {
    use std::fmt::Write;
    let bad = || {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: `{format}` is not a strftime format"),
        )
    };
    let items = chrono::format::StrftimeItems::new(&format);
    if items
        .clone()
        .any(|item| matches!(item, chrono::format::Item::Error))
    {
        return Err(bad());
    }
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format_with_items(items)).map_err(|_| bad())?;
    Ok(out)
}

/// `tojson` with Python's `json.dumps` output (`", "` and `": "` separators, non-ASCII
/// kept, optional `indent`), since templates are written against transformers' filter and
/// tool schemas end up in the prompt verbatim.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    if let Some(n) = indent.filter(|&n| n > crate::template_guards::MAX_SIZE) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "tojson: indent {n} is more than {}",
                crate::template_guards::MAX_SIZE
            ),
        ));
    }
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(c: &str) -> Message {
        Message::new("user", c)
    }

    fn render(source: &str, messages: &[Message]) -> Result<String, DataError> {
        ChatTemplate::new(source, SpecialTokens::default(), "test")?.render(messages, false)
    }

    #[test]
    fn blocks_are_trimmed_and_loops_can_break() {
        let source = "{% for m in messages %}\n    {% if loop.index > 2 %}{% break %}{% endif %}\n[{{ m.content }}]\n{% endfor %}";
        let out = render(source, &[user("a"), user("b"), user("c")]).unwrap();
        assert_eq!(out, "[a]\n[b]\n");
    }

    #[test]
    fn python_string_methods_work() {
        let source = "{{ messages[0].content.strip().upper() }}|{{ messages[0]['content'].startswith(' hi') }}|{{ messages[0].content.split(',') | length }}";
        assert_eq!(
            render(source, &[user(" hi, there ")]).unwrap(),
            "HI, THERE|True|2"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error_naming_the_template() {
        let source =
            "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}";
        let err = render(source, &[user("x")]).unwrap_err().to_string();
        assert!(
            err.starts_with("test:") && err.contains("system first"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_template_is_refused_where_it_is() {
        for source in ["", " \n\t"] {
            let e = ChatTemplate::new(source, SpecialTokens::default(), "t.json (chat_template)")
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("t.json (chat_template)") && e.contains("the template is empty"),
                "{e}"
            );
        }
    }

    #[test]
    fn strftime_now_and_tojson_refuse_what_they_cannot_write() {
        for (source, want) in [
            ("{{ strftime_now('%Q') }}", "`%Q` is not a strftime format"),
            ("{{ strftime_now('%') }}", "`%` is not a strftime format"),
            (
                "{{ messages | tojson(indent=1000000000000000000) }}",
                "tojson: indent 1000000000000000000 is more than 65536",
            ),
        ] {
            let e = render(source, &[user("x")]).unwrap_err().to_string();
            assert!(e.contains(want), "{source}: {e}");
        }
    }

    #[test]
    fn strftime_now_formats_today() {
        let out = render("{{ strftime_now('%Y') }}", &[user("x")]).unwrap();
        assert_eq!(out, chrono::Local::now().format("%Y").to_string());
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let tpl = ChatTemplate::new(
            "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}",
            SpecialTokens::default(),
            "t",
        )
        .unwrap();
        let out = tpl.render(&[user("héllo <b>\"q\"")], false).unwrap();
        assert_eq!(
            out,
            "[{\"role\": \"user\", \"content\": \"héllo <b>\\\"q\\\"\"}]\n{\n  \"role\": \"user\",\n  \"content\": \"héllo <b>\\\"q\\\"\"\n}"
        );
    }

    #[test]
    fn special_tokens_may_be_added_token_objects() {
        let config: Json = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false, "__type": "AddedToken"},
            "eos_token": "</s>"
        });
        let tokens = SpecialTokens::from_tokenizer_config(&config);
        let tpl = ChatTemplate::new(
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            tokens,
            "t",
        )
        .unwrap();
        assert_eq!(tpl.render(&[user("x")], false).unwrap(), "<s>x</s>");
    }

    #[test]
    fn templates_come_from_the_jinja_file_or_a_named_list() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path(), None).unwrap().is_none());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "default", "template": "D{{ messages[0].content }}"},
                                  {"name": "tool_use", "template": "T{{ messages[0].content }}"}]}"#,
        )
        .unwrap();
        let pick = |name| {
            ChatTemplate::from_dir(dir.path(), name)
                .unwrap()
                .unwrap()
                .render(&[user("x")], false)
                .unwrap()
        };
        assert_eq!(pick(None), "Dx");
        assert_eq!(pick(Some("tool_use")), "Tx");
        let err = ChatTemplate::from_dir(dir.path(), Some("rag"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json")
                && err.contains("`rag`")
                && err.contains("ships default, tool_use"),
            "{err}"
        );
        // A name given twice is its last entry's, as transformers' name → template map
        // makes it; an entry without a text template says so.
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "default", "template": "D{{ messages[0].content }}"},
                                  {"name": "tool_use", "template": "T{{ messages[0].content }}"},
                                  {"name": "default", "template": "E{{ messages[0].content }}"},
                                  {"name": "rag"}]}"#,
        )
        .unwrap();
        assert_eq!(pick(None), "Ex");
        let err = ChatTemplate::from_dir(dir.path(), Some("rag"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry `rag` has no text `template`"), "{err}");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "J{{ messages[0].content }}",
        )
        .unwrap();
        assert_eq!(pick(None), "Jx");
        // The jinja file is the default; the config's list no longer counts, as in
        // transformers, and a name it does not ship is refused, not given the default.
        assert_eq!(pick(Some("default")), "Jx");
        let err = ChatTemplate::from_dir(dir.path(), Some("tool_use"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no template named `tool_use`") && err.contains("ships default)"),
            "{err}"
        );
        // transformers' folder of named templates.
        let named = dir.path().join(ADDITIONAL_TEMPLATES);
        std::fs::create_dir(&named).unwrap();
        std::fs::write(named.join("tool_use.jinja"), "U{{ messages[0].content }}").unwrap();
        std::fs::write(named.join("rag.jinja"), "R{{ messages[0].content }}").unwrap();
        assert_eq!(pick(Some("tool_use")), "Ux");
        assert_eq!(pick(Some("rag")), "Rx");
        assert_eq!(pick(None), "Jx");
        for bad in ["summary", "../chat_template", "rag/x"] {
            let err = ChatTemplate::from_dir(dir.path(), Some(bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains("ships default, rag, tool_use"), "{bad}: {err}");
        }
    }

    /// A single template in the config is the default one: another name is refused.
    #[test]
    fn a_single_template_is_only_the_default() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "S{{ messages[0].content }}"}"#,
        )
        .unwrap();
        let one = ChatTemplate::from_dir(dir.path(), Some("default"))
            .unwrap()
            .unwrap();
        assert_eq!(one.render(&[user("x")], false).unwrap(), "Sx");
        let err = ChatTemplate::from_dir(dir.path(), Some("tool_use"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("no template named `tool_use`"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_the_origin_and_line() {
        let err = ChatTemplate::new(
            "ok\n{% for m in messages %}",
            SpecialTokens::default(),
            "my.jinja",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("my.jinja: line"), "{err}");
    }

    #[test]
    fn generation_tags_render_as_nothing_and_mark_their_spans() {
        let source = "{% for m in messages %}[{{ m.role }}]\n{% if m.role == 'assistant' %}{%- generation -%}\n  {{ m.content }}!{% endgeneration %}\n{% else %}{{ m.content }}\n{% endif %}{% endfor %}";
        let tpl = ChatTemplate::new(source, SpecialTokens::default(), "t").unwrap();
        assert!(tpl.has_generation_tags());
        let messages = [user("hi"), Message::new("assistant", "héllo"), user("x")];
        let out = tpl.render_spans(&messages, false).unwrap();
        assert_eq!(out.text, "[user]\nhi\n[assistant]\nhéllo![user]\nx\n");
        assert_eq!(out.spans.len(), 1);
        assert_eq!(&out.text[out.spans[0].clone()], "héllo!");
        assert_eq!(tpl.render(&messages, false).unwrap(), out.text);
        // The markers' own characters in the data, even a whole marker, are text: they
        // stay in it and mark nothing (they used to put the user's words into the span).
        let sly = "a \u{F8F0}0\u{F8F1}b\u{F8F1}0\u{F8F0} \u{F8F0}c\u{F8F1}";
        let messages = [user(sly), Message::new("assistant", "ok \u{F8F1}no")];
        let out = tpl.render_spans(&messages, false).unwrap();
        assert_eq!(
            out.text,
            format!("[user]\n{sly}\n[assistant]\nok \u{F8F1}no!")
        );
        assert_eq!(out.spans.len(), 1);
        assert_eq!(&out.text[out.spans[0].clone()], "ok \u{F8F1}no!");
        // The tag in a template without the tags is an ordinary tag; no spans.
        let plain =
            ChatTemplate::new("{{ messages[0].content }}", SpecialTokens::default(), "t").unwrap();
        assert!(!plain.has_generation_tags());
        assert!(
            plain
                .render_spans(&messages, false)
                .unwrap()
                .spans
                .is_empty()
        );
    }

    #[test]
    fn builtin_chatml_renders_with_generation_prompt() {
        let tpl = ChatTemplate::builtin("chatml", SpecialTokens::default()).unwrap();
        let out = tpl
            .render(&[Message::new("system", "s"), user("u")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::builtin("alpaca", SpecialTokens::default()).is_err());
    }
}
