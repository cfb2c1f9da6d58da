//! Where in a TOML file (a recipe or a pipeline) a syntax or type error is: its line, and
//! the key that line sets.

/// `e`'s message with the line it points at and, where that line sets a key, the key: for
/// an error from reading the text itself, whose span is all it has.
pub fn located(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or_default();
    // A table's header names the table (written twice, say).
    if let Some(header) = line_text.trim().strip_prefix('[') {
        let name = header
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or("")
            .trim();
        if !name.is_empty() {
            return format!("line {line}: `[{name}]`: {}", e.message());
        }
    }
    // Only a line that sets a bare key names one: an array's continuation line holds `=`
    // inside its strings.
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        });
    match key {
        Some(k) => format!("line {line}: `{k}`: {}", e.message()),
        None => format!("line {line}: {}", e.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline's shape, enough to fail as one does.
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct File {
        report: Option<Report>,
        stage: Option<Vec<Stage>>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Report {
        samples: Option<u32>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Stage {
        name: String,
        recipe: String,
        set: Option<Vec<String>>,
    }

    /// An error names its line, and the key only where that line sets one: an array's
    /// continuation line holds `=` inside a string, which is no key.
    #[test]
    fn errors_name_the_line_and_a_key_only_where_one_is_set() {
        let err = |text: &str| {
            let e = toml::from_str::<File>(text).unwrap_err();
            located(text, &e)
        };
        let e = err("[report]\nsamples = \"two\"\n[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\n");
        assert!(e.starts_with("line 2: `samples`: "), "{e}");
        let e = err(
            "[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\nset = [\n  \"train.max_steps=2\", 5,\n]\n",
        );
        assert!(e.starts_with("line 5: invalid type"), "{e}");
        // A table written twice names the table.
        let e = err("[report]\nsamples = 2\n\n[report]\n");
        assert!(e.starts_with("line 4: `[report]`: "), "{e}");
        // A syntax error (an unclosed string) names the key it broke.
        let e = err("[report]\nsamples = 2\n[[stage]]\nname = \"a\n");
        assert!(e.starts_with("line 4: `name`: "), "{e}");
    }
}
