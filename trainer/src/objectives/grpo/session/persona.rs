//! The client's system prompt, built from the row: a recipe's template with `{column}`
//! placeholders, or a bundled default that uses a `persona` column, or Cactus's intake
//! form, attitude and automatic thoughts.

use serde_json::{Map, Value};

/// The default when a row has a `persona` column.
pub const PERSONA_TEMPLATE: &str = "You are role-playing a client in a counseling session. \
Stay in character: answer the counselor as this client would, in one to three sentences, \
and never act as the counselor.\n\nWho you are: {persona}";

const ROLE_PLAY: &str = "You are role-playing a client in a counseling session. Stay in \
character: answer the counselor as this client would, in one to three sentences, and never \
act as the counselor.";

/// Cactus's columns, in the order the default prompt gives them.
const CACTUS_FIELDS: &[(&str, &str)] = &[
    ("intake_form", "Your intake form"),
    ("attitude", "Your attitude toward counseling"),
    ("thought", "Your automatic thoughts"),
];

/// Placeholders of `template`, or why it cannot be parsed.
fn parts(template: &str) -> Result<Vec<Part<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            out.push(Part::Text("{"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push(Part::Text("}"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| "a `{` is never closed (write `{{` for a brace)".to_string())?;
            let name = &r[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(format!(
                    "`{{{name}}}` is not a column name (letters, digits and _)"
                ));
            }
            out.push(Part::Field(name));
            rest = &r[end + 1..];
        } else if rest.starts_with('}') {
            return Err("a `}` is never opened (write `}}` for a brace)".into());
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len());
            out.push(Part::Text(&rest[..end]));
            rest = &rest[end..];
        }
    }
    Ok(out)
}

enum Part<'a> {
    Text(&'a str),
    Field(&'a str),
}

/// Checks a recipe's template once, before any row is read.
pub fn check_template(template: &str) -> Result<(), String> {
    parts(template).map(|_| ())
}

fn column_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The client's system prompt for a row with columns `extra`; `row` names it in errors.
pub fn persona(
    template: Option<&str>,
    extra: &Map<String, Value>,
    row: &str,
) -> Result<String, String> {
    if let Some(t) = template {
        let mut out = String::new();
        for part in parts(t)? {
            match part {
                Part::Text(s) => out.push_str(s),
                Part::Field(name) => {
                    let v = extra.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
                        format!("grpo.client.persona_template: {row} has no `{name}` column")
                    })?;
                    out.push_str(&column_text(v));
                }
            }
        }
        return Ok(out);
    }
    if extra.get("persona").is_some_and(|v| !v.is_null()) {
        return persona(Some(PERSONA_TEMPLATE), extra, row);
    }
    let mut out = ROLE_PLAY.to_string();
    for (column, label) in CACTUS_FIELDS {
        if let Some(v) = extra.get(*column).filter(|v| !v.is_null()) {
            out.push_str(&format!("\n\n{label}:\n{}", column_text(v).trim()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn templates_fill_columns_and_name_what_is_missing() {
        let extra = row(json!({"attitude": "doubtful", "age": 34}));
        assert_eq!(
            persona(
                Some("A {age}-year-old, {attitude} {{really}}."),
                &extra,
                "row 3"
            )
            .unwrap(),
            "A 34-year-old, doubtful {really}."
        );
        let e = persona(Some("{thought}"), &extra, "row 3").unwrap_err();
        assert_eq!(
            e,
            "grpo.client.persona_template: row 3 has no `thought` column"
        );
        assert!(check_template("{open").is_err());
        assert!(check_template("close}").is_err());
        assert!(check_template("{two words}").is_err());
        assert!(check_template("fine {x_1}").is_ok());
    }

    #[test]
    fn defaults_use_a_persona_or_cactus_columns() {
        let p = persona(
            None,
            &row(json!({"persona": "A nurse on night shifts."})),
            "r",
        )
        .unwrap();
        assert!(p.ends_with("Who you are: A nurse on night shifts."), "{p}");
        let c = persona(
            None,
            &row(json!({"intake_form": "Name: Lee ", "thought": "I always fail."})),
            "r",
        )
        .unwrap();
        assert!(c.starts_with(ROLE_PLAY));
        assert!(
            c.contains("Your intake form:\nName: Lee\n\nYour automatic thoughts:\nI always fail.")
        );
        assert!(!c.contains("attitude"));
        assert_eq!(persona(None, &Map::new(), "r").unwrap(), ROLE_PLAY);
    }
}
