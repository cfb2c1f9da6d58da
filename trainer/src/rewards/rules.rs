//! Rule rewards for counseling replies. They read text only, run in microseconds, and are
//! deliberately simple: phrase lists a counselor would recognise, matched case-insensitively
//! on word boundaries. They shape behaviour; they do not judge quality.

use super::{Reward, Sample};
use crate::Result;

/// A reward that judges each sample on its own, from its text.
pub trait Rule {
    fn name(&self) -> &str;
    /// The score, or `None` where the rule does not apply.
    fn judge(&self, sample: &Sample<'_>) -> Option<f64>;
}

impl<T: Rule> Reward for T {
    fn name(&self) -> &str {
        Rule::name(self)
    }
    fn score(&mut self, samples: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        Ok(samples.iter().map(|s| self.judge(s)).collect())
    }
}

/// Lower case with typographic apostrophes made plain and every run of other characters
/// one space, padded with spaces so phrases can be matched on word boundaries as
/// `" phrase "`.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push(' ');
    for c in text.chars() {
        match c {
            '\u{2019}' | '\u{2018}' => out.push('\''),
            c if c.is_alphanumeric() || c == '\'' => out.extend(c.to_lowercase()),
            _ if out.ends_with(' ') => {}
            _ => out.push(' '),
        }
    }
    if !out.ends_with(' ') {
        out.push(' ');
    }
    out
}

/// Whether `text` (already [`normalise`]d) holds any of `phrases` as whole words.
fn mentions(text: &str, phrases: &[&str]) -> bool {
    phrases.iter().any(|p| text.contains(&format!(" {p} ")))
}

/// 1 inside a window of words, falling linearly to 0 outside it: below, `words / min`;
/// above, `1 − (words − max) / max`.
pub struct LengthWindow {
    name: String,
    min: usize,
    max: usize,
}

impl LengthWindow {
    pub fn new(name: String, min: usize, max: usize) -> Self {
        Self { name, min, max }
    }

    pub fn value(&self, text: &str) -> f64 {
        let w = text.split_whitespace().count();
        if w < self.min {
            w as f64 / self.min as f64
        } else if w > self.max {
            (1.0 - (w - self.max) as f64 / self.max as f64).max(0.0)
        } else {
            1.0
        }
    }
}

impl Rule for LengthWindow {
    fn name(&self) -> &str {
        &self.name
    }
    fn judge(&self, s: &Sample<'_>) -> Option<f64> {
        Some(self.value(s.completion))
    }
}

/// distinct-2 of the reply's words: distinct word bigrams over all of them, 1 when no pair
/// of words repeats and near 0 for a reply that loops ("you feel you feel …"), which a
/// length or reward-model reward can otherwise pay for. A reply of fewer than two words
/// has no bigram to repeat and scores 1 (the length reward judges its shortness).
pub struct Repetition {
    name: String,
}

impl Repetition {
    pub fn new(name: String) -> Self {
        Self { name }
    }

    pub fn value(text: &str) -> f64 {
        let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
        let pairs: Vec<(&str, &str)> = words
            .windows(2)
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect();
        if pairs.is_empty() {
            return 1.0;
        }
        let distinct: std::collections::HashSet<_> = pairs.iter().collect();
        distinct.len() as f64 / pairs.len() as f64
    }
}

impl Rule for Repetition {
    fn name(&self) -> &str {
        &self.name
    }
    fn judge(&self, s: &Sample<'_>) -> Option<f64> {
        Some(Self::value(s.completion))
    }
}

/// 1 when the reply speaks only as the counselor: no special tokens of the chat template
/// (role headers, turn markers) and no line opening with another speaker's label.
pub struct Format {
    name: String,
    markers: Vec<String>,
}

const SPEAKER_LABELS: &[&str] = &[
    "user:",
    "assistant:",
    "system:",
    "client:",
    "counselor:",
    "counsellor:",
    "therapist:",
    "patient:",
    "human:",
    "ai:",
];

impl Format {
    /// The markers are the tokenizer's special tokens (e.g. `<|start_header_id|>`,
    /// `<|im_start|>`).
    pub fn new(name: String, tokenizer: &tokenizers::Tokenizer) -> Self {
        let mut markers: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        markers.sort();
        Self { name, markers }
    }

    pub fn value(&self, text: &str) -> f64 {
        let leaked_token = self.markers.iter().any(|m| text.contains(m.as_str()));
        let leaked_label = text.lines().any(|line| {
            let l = line.trim_start().to_lowercase();
            SPEAKER_LABELS.iter().any(|label| l.starts_with(label))
        });
        if leaked_token || leaked_label {
            0.0
        } else {
            1.0
        }
    }
}

impl Rule for Format {
    fn name(&self) -> &str {
        &self.name
    }
    fn judge(&self, s: &Sample<'_>) -> Option<f64> {
        Some(self.value(s.completion))
    }
}

/// Half for an open question (a sentence ending in `?` that opens with what, how, why…
/// or asks the client to tell or describe), half for a reflection ("it sounds like",
/// "you feel"…): the two moves of reflective listening.
pub struct Reflection {
    name: String,
}

const OPEN_STARTS: &[&str] = &[
    "what", "how", "why", "when", "where", "which", "who", "tell me", "describe",
];
const OPEN_INVITATIONS: &[&str] = &[
    "can you tell me",
    "could you tell me",
    "would you tell me",
    "can you say more",
    "could you say more",
    "would you like to share",
    "would you be willing to share",
    "can you describe",
    "could you describe",
];
const REFLECTIONS: &[&str] = &[
    "it sounds like",
    "that sounds",
    "it sounds as if",
    "it seems like",
    "it seems that",
    "it seems you",
    "you feel",
    "you're feeling",
    "you are feeling",
    "you've been feeling",
    "you have been feeling",
    "i hear that",
    "i'm hearing",
    "what i'm hearing",
    "you're saying",
    "you've been carrying",
];

impl Reflection {
    pub fn new(name: String) -> Self {
        Self { name }
    }

    pub fn has_open_question(text: &str) -> bool {
        // Sentences end at . ! ? or a newline; only those ending in `?` are questions.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if matches!(c, '.' | '!' | '\n' | '?') {
                if c == '?' {
                    let q = normalise(text[start..i].trim());
                    let opens = OPEN_STARTS.iter().any(|w| q.starts_with(&format!(" {w} ")));
                    if opens || mentions(&q, OPEN_INVITATIONS) {
                        return true;
                    }
                }
                start = i + c.len_utf8();
            }
        }
        false
    }

    pub fn value(text: &str) -> f64 {
        let q = if Self::has_open_question(text) {
            0.5
        } else {
            0.0
        };
        let r = if mentions(&normalise(text), REFLECTIONS) {
            0.5
        } else {
            0.0
        };
        q + r
    }
}

impl Rule for Reflection {
    fn name(&self) -> &str {
        &self.name
    }
    fn judge(&self, s: &Sample<'_>) -> Option<f64> {
        Some(Self::value(s.completion))
    }
}

/// Applies only when the client signals a risk of self-harm — in the last user message, or
/// by a `risk` column of `high` or `imminent`. Then +1 when the reply points to immediate
/// help (a crisis line, emergency services, someone to contact now) and −1 when it
/// minimises ("calm down", "it's not that bad"…); so 1 is the only good answer.
pub struct CrisisSafety {
    name: String,
}

const RISK: &[&str] = &[
    "kill myself",
    "killing myself",
    "suicide",
    "suicidal",
    "end my life",
    "ending my life",
    "take my own life",
    "taking my own life",
    "self harm",
    "harm myself",
    "hurt myself",
    "hurting myself",
    "cut myself",
    "cutting myself",
    "want to die",
    "wish i were dead",
    "wish i was dead",
    "don't want to live",
    "do not want to live",
    "no reason to live",
    "better off without me",
    "point of going on",
    "not be here anymore",
    "can't go on",
];
const HELP: &[&str] = &[
    "988",
    "911",
    "999",
    "112",
    "crisis line",
    "crisis hotline",
    "crisis text line",
    "crisis service",
    "crisis services",
    "hotline",
    "helpline",
    "lifeline",
    "samaritans",
    "emergency services",
    "emergency room",
    "emergency number",
    "nearest emergency",
    "immediate help",
    "immediate support",
    "reach out right now",
    "call someone",
    "someone you trust right now",
];
const MINIMISING: &[&str] = &[
    "not that bad",
    "not so bad",
    "overreacting",
    "over reacting",
    "cheer up",
    "calm down",
    "don't be dramatic",
    "being dramatic",
    "everyone feels that way",
    "everybody feels that way",
    "get over it",
    "snap out of it",
    "just a phase",
    "others have it worse",
    "bright side",
    "you don't mean that",
    "you don't really mean",
];

impl CrisisSafety {
    pub fn new(name: String) -> Self {
        Self { name }
    }

    pub fn at_risk(sample: &Sample<'_>) -> bool {
        let flagged = sample
            .extra
            .get("risk")
            .and_then(|v| v.as_str())
            .is_some_and(|r| matches!(r.to_lowercase().as_str(), "high" | "imminent"));
        flagged || mentions(&normalise(sample.client_message()), RISK)
    }

    /// Whether `reply` points to immediate help, and whether it minimises.
    pub fn judgement(reply: &str) -> (bool, bool) {
        let text = normalise(reply);
        (mentions(&text, HELP), mentions(&text, MINIMISING))
    }

    pub fn value(reply: &str) -> f64 {
        let (help, minimises) = Self::judgement(reply);
        f64::from(u8::from(help)) - f64::from(u8::from(minimises))
    }
}

impl Rule for CrisisSafety {
    fn name(&self) -> &str {
        &self.name
    }
    fn judge(&self, s: &Sample<'_>) -> Option<f64> {
        Self::at_risk(s).then(|| Self::value(s.completion))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use data::Message;
    use serde_json::{Map, Value};

    #[test]
    fn length_window_is_one_inside_and_falls_off_outside() {
        let l = LengthWindow::new("length".into(), 4, 8);
        assert_eq!(l.value("one two"), 0.5);
        assert_eq!(l.value("a b c d e"), 1.0);
        assert_eq!(l.value(&"w ".repeat(12)), 0.5);
        assert_eq!(l.value(&"w ".repeat(30)), 0.0);
    }

    #[test]
    fn repetition_is_the_share_of_distinct_word_bigrams() {
        assert_eq!(Repetition::value("I hear how heavy this feels."), 1.0);
        // you feel / feel you / you feel / feel you / you feel: 2 distinct of 5.
        assert_eq!(Repetition::value("you feel you feel you feel"), 2.0 / 5.0);
        assert_eq!(Repetition::value("Like like LIKE like"), 1.0 / 3.0);
        assert_eq!(Repetition::value("hello"), 1.0);
        assert_eq!(Repetition::value(""), 1.0);
    }

    #[test]
    fn format_catches_role_tokens_and_speaker_labels() {
        let mut tok = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        tok.add_special_tokens(&[tokenizers::AddedToken::from("<|start_header_id|>", true)]);
        let f = Format::new("format".into(), &tok);
        assert_eq!(f.value("That sounds hard. What helps?"), 1.0);
        assert_eq!(f.value("Fine.<|start_header_id|>user"), 0.0);
        assert_eq!(f.value("I hear you.\nClient: thanks"), 0.0);
        assert_eq!(
            f.value("The user: guide says"),
            1.0,
            "labels count only at a line start"
        );
    }

    #[test]
    fn reflection_needs_open_questions_and_reflections() {
        assert_eq!(
            Reflection::value("It sounds like work has been heavy. What feels hardest?"),
            1.0
        );
        assert_eq!(Reflection::value("What feels hardest right now?"), 0.5);
        assert_eq!(Reflection::value("Could you tell me more about that?"), 0.5);
        assert_eq!(Reflection::value("You feel stuck."), 0.5);
        // Closed questions are not open questions.
        assert_eq!(Reflection::value("Do you sleep well? Are you eating?"), 0.0);
        assert_eq!(Reflection::value("Whatever."), 0.0);
    }

    #[test]
    fn crisis_safety_applies_to_risk_and_rewards_help_without_minimising() {
        let extra = Map::new();
        let prompt = [Message::new("user", "Honestly I want to end my life.")];
        let calm = [Message::new("user", "Work is stressful lately.")];
        let mut r = CrisisSafety::new("crisis_safety".into());
        let s = |p, c| Sample {
            prompt: p,
            completion: c,
            extra: &extra,
        };
        let got = r
            .score(&[
                s(
                    &prompt,
                    "I'm so glad you told me. Please call or text 988 now.",
                ),
                s(&prompt, "Calm down, it's not that bad."),
                s(&prompt, "Calm down and call a crisis line."),
                s(&prompt, "Let's talk about your week."),
                s(&calm, "Please call 988."),
            ])
            .unwrap();
        assert_eq!(got, vec![Some(1.0), Some(-1.0), Some(0.0), Some(0.0), None]);
        // A `risk` column flags the prompt even when its words do not.
        let mut flagged = Map::new();
        flagged.insert("risk".into(), Value::from("high"));
        let s = Sample {
            prompt: &calm,
            completion: "Please reach out to a crisis line.",
            extra: &flagged,
        };
        assert_eq!(r.score(&[s]).unwrap(), vec![Some(1.0)]);
    }
}
