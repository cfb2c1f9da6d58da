//! Rendered text, token ids and assistant masks against transformers
//! (../shared/fixtures/chat-template/llama3).

use std::path::{Path, PathBuf};

use data::{ChatTemplate, Message, render_with_mask, tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    messages: Vec<Message>,
    text: String,
    input_ids: Vec<u32>,
    assistant_mask: Vec<u8>,
    generation_prompt_text: String,
}

fn fixture(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/chat-template")
        .join(name);
    assert!(dir.is_dir(), "fixture {} is missing", dir.display());
    dir
}

#[test]
fn llama3_cases_render_tokenise_and_mask_exactly_as_transformers() {
    check_cases("llama3", false);
}

/// The same cases through a template whose assistant output is wrapped in
/// `{% generation %}` tags: the mask comes from the tags, as transformers takes it.
#[test]
fn generation_tagged_cases_render_tokenise_and_mask_exactly_as_transformers() {
    check_cases("llama3-generation", true);
}

fn check_cases(name: &str, tagged: bool) {
    let dir = fixture(name);
    let template = ChatTemplate::from_dir(&dir, None)
        .unwrap()
        .expect("the fixture ships a template");
    assert_eq!(template.has_generation_tags(), tagged);
    let tok = tokenizer::load(&dir).unwrap();
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let rendered = render_with_mask(&template, &tok, &case.messages).unwrap();
        assert_eq!(rendered.text, case.text, "case {i}: text");
        assert_eq!(rendered.input_ids, case.input_ids, "case {i}: input_ids");
        assert_eq!(
            rendered.assistant_mask, case.assistant_mask,
            "case {i}: assistant_mask"
        );
        let n = case.messages.len();
        let prompt = template.render(&case.messages[..n - 1], true).unwrap();
        assert_eq!(
            prompt, case.generation_prompt_text,
            "case {i}: generation prompt"
        );
    }
}
