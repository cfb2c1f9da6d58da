//! Synthetic counseling data with a learnable signal, for demos, tests and CI. Nothing here
//! is real client data.
//!
//! - Dialogues: a client concern, answered turn by turn with counseling skills (reflection,
//!   open questions, validation, cognitive restructuring).
//! - Preference pairs: the chosen reply follows counseling principles (empathy,
//!   exploration, autonomy, safety); the rejected one breaks them (dismissive, directive,
//!   unsafe). The difference is systematic, so a reward model can learn it.
//! - Prompts: client openings for GRPO, with `concern` and `risk` columns for rewards.

use std::io::Write;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// One presenting concern: what the client says, feels, and believes about it.
struct Concern {
    name: &'static str,
    openings: &'static [&'static str],
    feeling: &'static str,
    situation: &'static str,
    thought: &'static str,
    follow_ups: &'static [&'static str],
}

const CONCERNS: &[Concern] = &[
    Concern {
        name: "work_stress",
        openings: &[
            "I have been so stressed at work that I can't switch off at night.",
            "My job is taking everything out of me lately.",
        ],
        feeling: "exhausted",
        situation: "work keeps following you home",
        thought: "I have to finish everything or I will be fired",
        follow_ups: &[
            "My manager keeps adding projects.",
            "I skip lunch just to keep up.",
        ],
    },
    Concern {
        name: "exam_anxiety",
        openings: &[
            "I get really anxious before every exam.",
            "Exams make me panic, even when I have studied.",
        ],
        feeling: "anxious",
        situation: "so much seems to ride on each exam",
        thought: "if I fail one exam my future is ruined",
        follow_ups: &[
            "The night before, I can't sleep at all.",
            "My parents expect top grades.",
        ],
    },
    Concern {
        name: "loneliness",
        openings: &[
            "Since I moved to a new city I feel completely alone.",
            "I don't really have anyone to talk to anymore.",
        ],
        feeling: "lonely",
        situation: "you are far from the people who know you",
        thought: "nobody would want to spend time with me",
        follow_ups: &[
            "Weekends are the worst.",
            "I scroll through old photos a lot.",
        ],
    },
    Concern {
        name: "relationship_conflict",
        openings: &[
            "My partner and I argue almost every day now.",
            "I feel like my partner never listens to me.",
        ],
        feeling: "hurt",
        situation: "the arguments keep coming back",
        thought: "this relationship is doomed",
        follow_ups: &[
            "It usually starts over small things like chores.",
            "Afterwards we just stop talking for days.",
        ],
    },
    Concern {
        name: "grief",
        openings: &[
            "My father died three months ago and I still can't focus on anything.",
            "Since my grandmother passed away I feel empty.",
        ],
        feeling: "heartbroken",
        situation: "you lost someone so important",
        thought: "I should be over this by now",
        follow_ups: &[
            "People around me seem to have moved on.",
            "I keep replaying our last conversation.",
        ],
    },
    Concern {
        name: "low_mood",
        openings: &[
            "I have felt down for weeks and nothing seems fun anymore.",
            "Getting out of bed has become really hard.",
        ],
        feeling: "weighed down",
        situation: "even things you used to enjoy feel flat",
        thought: "it will never get better",
        follow_ups: &[
            "I stopped going to the gym.",
            "I cancel plans with friends a lot.",
        ],
    },
    Concern {
        name: "social_anxiety",
        openings: &[
            "I avoid parties because I'm scared of saying something stupid.",
            "Speaking up in meetings terrifies me.",
        ],
        feeling: "nervous",
        situation: "you feel watched and judged",
        thought: "everyone will think I am awkward",
        follow_ups: &[
            "My heart races when people look at me.",
            "I rehearse sentences in my head for minutes.",
        ],
    },
    Concern {
        name: "perfectionism",
        openings: &[
            "Nothing I do ever feels good enough.",
            "I redo my work again and again until it is perfect.",
        ],
        feeling: "frustrated",
        situation: "the bar you set keeps rising",
        thought: "any mistake means I am a failure",
        follow_ups: &[
            "I stayed up until 3 am fixing a slide.",
            "Praise doesn't seem to count for me.",
        ],
    },
];

/// Client messages that signal risk of self-harm.
const CRISIS_OPENINGS: &[&str] = &[
    "Sometimes I think everyone would be better off without me.",
    "I have been thinking about ending my life.",
    "I don't see the point of going on anymore.",
];

fn reflection(c: &Concern) -> String {
    format!(
        "It sounds like you feel {} because {}.",
        c.feeling, c.situation
    )
}

fn open_question(c: &Concern, rng: &mut ChaCha8Rng) -> String {
    let questions = [
        format!("What is it like for you when {}?", c.situation),
        "What goes through your mind when that happens?".to_string(),
        "Could you tell me more about what a typical day looks like right now?".to_string(),
        format!("When did you first notice feeling {}?", c.feeling),
    ];
    questions.choose(rng).cloned().unwrap_or_default()
}

fn validation(c: &Concern) -> String {
    format!("It makes sense to feel {} when {}.", c.feeling, c.situation)
}

fn restructuring(c: &Concern) -> String {
    format!(
        "I notice the thought \"{}\". What evidence do you have for it, and what might you say to a friend who thought the same?",
        c.thought
    )
}

fn autonomy() -> &'static str {
    "What feels like a manageable first step for you?"
}

/// A counselor turn using two skills, chosen by the dialogue position.
fn counselor_turn(c: &Concern, turn: usize, rng: &mut ChaCha8Rng) -> String {
    match turn {
        0 => format!("{} {}", reflection(c), open_question(c, rng)),
        1 => format!("{} {}", validation(c), open_question(c, rng)),
        2 => restructuring(c),
        _ => format!("{} {}", reflection(c), autonomy()),
    }
}

/// A multi-turn CBT-style dialogue in the `messages` format.
pub fn dialogue(rng: &mut ChaCha8Rng) -> Value {
    let c = CONCERNS.choose(rng).unwrap_or(&CONCERNS[0]);
    let turns = rng.random_range(1..=3);
    let mut messages = vec![
        json!({"role": "system", "content": "You are a warm, professional counselor using CBT skills."}),
    ];
    messages.push(
        json!({"role": "user", "content": c.openings.choose(rng).copied().unwrap_or_default()}),
    );
    for turn in 0..turns {
        messages.push(json!({"role": "assistant", "content": counselor_turn(c, turn, rng)}));
        if turn + 1 < turns {
            let follow = c
                .follow_ups
                .get(turn % c.follow_ups.len())
                .copied()
                .unwrap_or_default();
            messages.push(json!({"role": "user", "content": follow}));
        }
    }
    json!({"messages": messages, "concern": c.name})
}

/// A preference pair: principled chosen, rule-breaking rejected.
pub fn preference(rng: &mut ChaCha8Rng) -> Value {
    if rng.random_bool(0.15) {
        let prompt = CRISIS_OPENINGS.choose(rng).copied().unwrap_or_default();
        let chosen = "I'm really glad you told me, and I'm concerned for your safety. If you might act on these thoughts, please call or text a crisis line such as 988 in the US, or go to the nearest emergency department now. Are you safe right now, and is there someone who can be with you?";
        let rejected = [
            "Everyone feels like that sometimes. You're probably just tired, get some sleep.",
            "Don't be so dramatic, things aren't that bad.",
        ]
        .choose(rng)
        .copied()
        .unwrap_or_default();
        return json!({"prompt": prompt, "chosen": chosen, "rejected": rejected, "violation": "unsafe", "concern": "crisis"});
    }
    let c = CONCERNS.choose(rng).unwrap_or(&CONCERNS[0]);
    let prompt = c.openings.choose(rng).copied().unwrap_or_default();
    let chosen = match rng.random_range(0..3) {
        0 => format!("{} {}", reflection(c), open_question(c, rng)),
        1 => format!("{} {}", validation(c), autonomy()),
        _ => format!("{} {}", reflection(c), restructuring(c)),
    };
    let (rejected, violation) = match rng.random_range(0..2) {
        0 => (
            format!(
                "Lots of people deal with that. Just stop worrying about it and you'll be {}.",
                "fine"
            ),
            "dismissive",
        ),
        _ => (
            format!(
                "You should {} right away. Do it today.",
                match c.name {
                    "work_stress" => "quit your job",
                    "relationship_conflict" => "break up with your partner",
                    "loneliness" => "move back home",
                    _ => "force yourself to get over it",
                }
            ),
            "directive",
        ),
    };
    json!({"prompt": prompt, "chosen": chosen, "rejected": rejected, "violation": violation, "concern": c.name})
}

/// A prompt for online RL, with the columns rule rewards read.
pub fn prompt(rng: &mut ChaCha8Rng) -> Value {
    if rng.random_bool(0.2) {
        let text = CRISIS_OPENINGS.choose(rng).copied().unwrap_or_default();
        return json!({"prompt": [{"role": "user", "content": text}], "concern": "crisis", "risk": "high"});
    }
    let c = CONCERNS.choose(rng).unwrap_or(&CONCERNS[0]);
    let text = c.openings.choose(rng).copied().unwrap_or_default();
    json!({"prompt": [{"role": "user", "content": text}], "concern": c.name, "risk": "low"})
}

/// Attitudes toward counseling a simulated client may take, as Cactus gives them.
const ATTITUDES: &[&str] = &["positive", "neutral", "negative"];

/// Ages, jobs and living situations for the intake forms of simulated clients.
const INTAKE: &[(&str, &str, &str)] = &[
    ("Sam", "a nurse on night shifts", "lives alone"),
    (
        "Ana",
        "a university student",
        "shares a flat with two friends",
    ),
    (
        "Lee",
        "a warehouse supervisor",
        "lives with a partner and a young child",
    ),
    ("Ravi", "a software tester", "recently moved to a new city"),
    ("Mia", "a retired teacher", "lives with an elderly parent"),
];

/// A Cactus-shaped row for session-level RL: the counselor's system prompt and the
/// client's opening, plus the intake form, attitude and automatic thought a simulated
/// client is prompted with. One row in four leaves the opening to the client.
pub fn session(rng: &mut ChaCha8Rng) -> Value {
    let c = CONCERNS.choose(rng).unwrap_or(&CONCERNS[0]);
    let (name, job, home) = *INTAKE.choose(rng).unwrap_or(&INTAKE[0]);
    let age = rng.random_range(19..70);
    let attitude = ATTITUDES.choose(rng).copied().unwrap_or("neutral");
    let intake = format!(
        "Name: {name}\nAge: {age}\nOccupation: {job}\nHome: {home}\n\
         Presenting problem: {}; feels {}.",
        c.name.replace('_', " "),
        c.feeling
    );
    let system = json!({"role": "system", "content": "You are a warm, professional counselor using CBT skills. Keep each reply short."});
    let prompt = if rng.random_bool(0.25) {
        json!([system])
    } else {
        let text = c.openings.choose(rng).copied().unwrap_or_default();
        json!([system, {"role": "user", "content": text}])
    };
    json!({
        "prompt": prompt,
        "intake_form": intake,
        "attitude": attitude,
        "thought": c.thought,
        "concern": c.name,
        "risk": "low",
    })
}

/// Which set to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sft,
    Preference,
    Prompts,
    Sessions,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sft" => Ok(Self::Sft),
            "preference" => Ok(Self::Preference),
            "prompts" => Ok(Self::Prompts),
            "sessions" => Ok(Self::Sessions),
            other => Err(format!(
                "unknown kind `{other}` (sft, preference, prompts, sessions)"
            )),
        }
    }
}

/// Writes [`generate`]'s rows to `out` as JSON Lines: a new file (one already there is
/// refused) named `.jsonl`, `.ndjson` or `.json`, which hearth reads back as JSON Lines, and
/// which appears only once complete. At least one row is asked for.
pub fn write(
    kind: Kind,
    n: usize,
    seed: u64,
    out: &std::path::Path,
) -> Result<(), crate::DataError> {
    let refuse = |reason: &str| crate::DataError::Unsupported {
        path: out.to_path_buf(),
        reason: reason.to_string(),
    };
    if n == 0 {
        return Err(refuse("nothing to write: --rows must be at least 1"));
    }
    // Generated rows are for hearth to read.
    crate::output::check_readable_jsonl_name(out, "generated rows")?;
    crate::output::write_new(out, |writer, out| {
        generate_into(kind, n, seed, writer).map_err(|source| crate::DataError::Io {
            path: out.to_path_buf(),
            source,
        })
    })
}

/// `n` rows of `kind` as JSON Lines text, the same for the same seed.
pub fn generate(kind: Kind, n: usize, seed: u64) -> String {
    let mut out = Vec::new();
    // Writing into memory cannot fail, and every row is JSON text.
    let _ = generate_into(kind, n, seed, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// [`generate`]'s rows written to `out` one at a time, so that any number of them takes
/// the memory of one.
fn generate_into(kind: Kind, n: usize, seed: u64, out: &mut impl Write) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..n {
        let row = match kind {
            Kind::Sft => dialogue(&mut rng),
            Kind::Preference => preference(&mut rng),
            Kind::Prompts => prompt(&mut rng),
            Kind::Sessions => session(&mut rng),
        };
        writeln!(out, "{row}")?;
    }
    Ok(())
}

/// The bundled demo files under `data/examples/`: (file name, kind, rows), generated with
/// seed 0. A test keeps the shipped files equal to the generator's output.
pub const BUNDLED: [(&str, Kind, usize); 4] = [
    ("counseling-sft.jsonl", Kind::Sft, 64),
    ("counseling-preference.jsonl", Kind::Preference, 128),
    ("counseling-prompts.jsonl", Kind::Prompts, 32),
    ("counseling-sessions.jsonl", Kind::Sessions, 16),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Example, LoadOptions, load_examples};

    #[test]
    fn generation_is_deterministic_and_loads_in_each_format() {
        let dir = tempfile::tempdir().unwrap();
        for (kind, format) in [
            (Kind::Sft, crate::Format::Messages),
            (Kind::Preference, crate::Format::Preference),
            (Kind::Prompts, crate::Format::PromptOnly),
            (Kind::Sessions, crate::Format::PromptOnly),
        ] {
            let text = generate(kind, 40, 9);
            assert_eq!(text, generate(kind, 40, 9));
            assert_ne!(text, generate(kind, 40, 10));
            let path = dir.path().join("x.jsonl");
            std::fs::write(&path, &text).unwrap();
            let loaded = load_examples(&path, &LoadOptions::default()).unwrap();
            assert_eq!((loaded.format, loaded.examples.len()), (format, 40));
        }
    }

    #[test]
    fn preference_signal_is_systematic() {
        let text = generate(Kind::Preference, 200, 1);
        for line in text.lines() {
            let row: Value = serde_json::from_str(line).unwrap();
            let (chosen, rejected) = (
                row["chosen"].as_str().unwrap(),
                row["rejected"].as_str().unwrap(),
            );
            // Principled replies ask or reflect; rule-breaking ones command or dismiss.
            assert!(
                chosen.contains('?') || chosen.starts_with("It sounds like"),
                "{chosen}"
            );
            assert!(!rejected.contains('?'), "{rejected}");
            if row["concern"] == "crisis" {
                assert!(chosen.contains("988") && !rejected.contains("988"));
            }
        }
    }

    #[test]
    fn shipped_files_match_the_generator() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for (name, kind, n) in BUNDLED {
            let shipped = std::fs::read_to_string(dir.join(name)).unwrap();
            assert_eq!(
                shipped,
                generate(kind, n, 0),
                "{name} drifted: regenerate with `hearth data generate`"
            );
        }
        let loaded =
            load_examples(&dir.join("counseling-sft.jsonl"), &LoadOptions::default()).unwrap();
        assert!(
            loaded
                .examples
                .iter()
                .all(|e| matches!(e, Example::Conversation { .. }))
        );
    }

    #[test]
    fn write_makes_a_new_jsonl_file_or_refuses_leaving_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        let out = dir.path().join("sft.jsonl");
        write(Kind::Sft, 5, 1, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            generate(Kind::Sft, 5, 1)
        );
        let refused = |rows: usize, path: &std::path::Path, needle: &str| {
            let e = write(Kind::Prompts, rows, 2, path).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        };
        // An existing file keeps what it held; a directory gets no temporary file inside
        // or beside it.
        refused(5, &out, "already exists");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            generate(Kind::Sft, 5, 1)
        );
        std::fs::create_dir(dir.path().join("sub.jsonl")).unwrap();
        refused(5, &dir.path().join("sub.jsonl"), "is a directory");
        // Rows written as JSON Lines under a name that promises another format, or no
        // rows at all, are refused before anything is written.
        for name in ["p.parquet", "a.arrow", "noext"] {
            refused(5, &dir.path().join(name), "JSON Lines only");
        }
        refused(
            0,
            &dir.path().join("none.jsonl"),
            "--rows must be at least 1",
        );
        assert_eq!(files(), ["sft.jsonl", "sub.jsonl"]);
        assert!(
            std::fs::read_dir(dir.path().join("sub.jsonl"))
                .unwrap()
                .next()
                .is_none()
        );
        write(Kind::Preference, 3, 1, &dir.path().join("pairs.json")).unwrap();
        let loaded =
            load_examples(&dir.path().join("pairs.json"), &LoadOptions::default()).unwrap();
        assert_eq!(loaded.examples.len(), 3);
    }
}
