//! `hearth eval counseling`: the evidence a counseling model needs before anyone trusts
//! it, in one JSON file and one printed table —
//! - the win rate of its replies over another model's, judged by a reward model, with a
//!   bootstrap 95% interval (PsychoCounsel's measure);
//! - crisis-safety probes, judged by the `crisis_safety` reward's rules;
//! - multiple-choice items scored by log-likelihood;
//! - the reward model's own pairwise accuracy per PsychoCounsel rating dimension.
//!
//! Every reply is greedy, so a result depends only on the models and the data. One model
//! is loaded at a time. No prompt or reply text is printed or written unless asked for
//! with `show_text`.

pub mod multiple_choice;
pub mod probes;
pub mod table;
pub mod win_rate;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::Serialize;

use crate::chat::{Chat, ChatOptions, prompts_to_answer};
use crate::evaluate::{PreferenceReport, RewardScorer, finite_scores, preference_accuracy};
use crate::generate::Sampling;
use crate::{Result, TrainerError};
use multiple_choice::ChoiceReport;
use probes::CrisisReport;
use win_rate::WinRate;

/// The bundled prompts the win rate is measured on when no `prompts` file is given.
pub const BUNDLED_PROMPTS: &str = include_str!("../../../data/examples/counseling-prompts.jsonl");
pub const BUNDLED_PROMPTS_NAME: &str = "bundled:counseling-prompts.jsonl";

/// Where evaluations of a run live: `RUN_DIR/evals/*.json`, shown on its report page.
pub const EVALS_DIR: &str = "evals";

/// What to evaluate, on what, and how.
pub struct Options<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub against: Option<&'a Path>,
    pub against_adapter: Option<&'a Path>,
    pub reward_model: Option<&'a Path>,
    pub reward_adapter: Option<&'a Path>,
    /// Held-out prompts for the win rate (default: the bundled prompts).
    pub prompts: Option<&'a Path>,
    /// Crisis probes (default: the bundled probes).
    pub probes: Option<&'a Path>,
    /// Multiple-choice items (default: the bundled synthetic set).
    pub choices: Option<&'a Path>,
    /// Preference pairs with PsychoCounsel rating columns, for the reward model's accuracy
    /// per dimension.
    pub pairs: Option<&'a Path>,
    pub out: &'a Path,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub bootstrap: usize,
    pub seed: u64,
    /// Worst crisis cases listed per model.
    pub worst: usize,
    pub show_text: bool,
    /// Longest preference pair, in tokens: longer ones are cut to fit and counted.
    pub max_length: usize,
    pub device: &'a Device,
}

/// A model as given.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Subject {
    pub path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

impl Subject {
    fn of(path: &Path, adapter: Option<&Path>) -> Self {
        Self {
            path: path.to_path_buf(),
            adapter: adapter.map(Path::to_path_buf),
        }
    }
}

/// One measure for the model and, when given, the model it is compared with.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Compared<T> {
    /// Where the items came from: a file, or `bundled:…`.
    pub data: String,
    pub model: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against: Option<T>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WinRateSection {
    pub data: String,
    #[serde(flatten)]
    pub result: WinRate,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairsSection {
    pub data: String,
    #[serde(flatten)]
    pub result: PreferenceReport,
}

/// What `hearth eval counseling` writes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CounselingReport {
    /// Always `counseling`: how report pages recognise the file.
    pub kind: &'static str,
    pub model: Subject,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against: Option<Subject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<Subject>,
    /// New tokens per greedy reply.
    pub max_new_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub win_rate: Option<WinRateSection>,
    pub crisis: Compared<CrisisReport>,
    pub multiple_choice: Compared<ChoiceReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_model_pairs: Option<PairsSection>,
}

/// What one generating model yields.
struct Answers {
    crisis: CrisisReport,
    choices: ChoiceReport,
    /// Replies to the win-rate prompts, when there is a win rate to measure.
    replies: Vec<String>,
}

/// The win-rate prompts, as conversations to answer.
fn load_prompts(path: Option<&Path>) -> Result<(String, Vec<Vec<data::Message>>)> {
    let (name, loaded) = match path {
        Some(p) => (
            p.display().to_string(),
            data::load_examples(p, &Default::default())?,
        ),
        None => (
            BUNDLED_PROMPTS_NAME.to_string(),
            data::load_bundled_examples(
                Path::new(BUNDLED_PROMPTS_NAME),
                BUNDLED_PROMPTS,
                &Default::default(),
            )?,
        ),
    };
    let prompts = prompts_to_answer(&loaded, &name)?;
    Ok((name, prompts))
}

/// Runs `hearth eval counseling`, writes its JSON to `o.out` (and refreshes the report
/// page of the run the file lands in), and returns the report.
pub fn run(o: &Options<'_>) -> Result<CounselingReport> {
    evaluate(o)
}

/// `RUN/evals/NAME.json` files the results with a run: the folder is made for the first
/// one when it is written, never before, so a failed or stopped evaluation leaves none
/// behind and never takes away one that another evaluation is about to write into.
fn files_with_a_run(out: &Path) -> bool {
    run_of(out).is_some() && out.parent().is_some_and(|evals| !evals.exists())
}

fn evaluate(o: &Options<'_>) -> Result<CounselingReport> {
    if o.batch_size == 0 {
        return Err(TrainerError::Input(
            "eval counseling: --batch-size must be at least 1".into(),
        ));
    }
    if o.prompts.is_some() && (o.against.is_none() || o.reward_model.is_none()) {
        return Err(TrainerError::Input(
            "eval counseling: --prompts are for the win rate, which needs --against and \
             --reward-model"
                .into(),
        ));
    }
    if o.reward_model.is_some() && o.against.is_none() && o.pairs.is_none() {
        return Err(TrainerError::Input(
            "eval counseling: --reward-model judges the win rate over --against and is \
             measured on --pairs; pass one of them, or leave it out"
                .into(),
        ));
    }
    if o.pairs.is_some() && o.reward_model.is_none() {
        return Err(TrainerError::Input(
            "eval counseling: --pairs measure a reward model: pass --reward-model".into(),
        ));
    }
    let inputs: Vec<&Path> = [
        Some(o.model),
        o.adapter,
        o.against,
        o.against_adapter,
        o.reward_model,
        o.reward_adapter,
        o.prompts,
        o.probes,
        o.choices,
        o.pairs,
    ]
    .into_iter()
    .flatten()
    .collect();
    if files_with_a_run(o.out) {
        checkpoints::guard::check_output_file_to_make(o.out, &inputs)?;
    } else {
        checkpoints::guard::check_output_file(o.out, &inputs)?;
    }
    // A run's page reads its `evals/*.json`.
    data::output::check_output_name(o.out, "evaluations", data::output::OutputFormat::Json)?;

    // Every data file is read before any model is loaded, so bad data fails at once.
    let (probe_data, probes) = probes::load(o.probes)?;
    let (choice_data, items) = multiple_choice::load(o.choices)?;
    let win = o.against.is_some() && o.reward_model.is_some();
    let (prompt_data, prompts) = if win {
        load_prompts(o.prompts)?
    } else {
        (String::new(), Vec::new())
    };
    // A reward model that cannot score is refused before any reply is generated: the win
    // rate and the pairwise accuracy both read a score head, and its tokenizer and template
    // render what it scores. (A causal LM's adapter would otherwise be measured by its
    // implicit DPO reward and reported as the reward model's.) The pairs are tokenised as
    // it reads them, so one it cannot take fails now too.
    if let Some(rm) = o.reward_model {
        let text = RewardScorer::prepare(rm, o.reward_adapter)?;
        if win {
            text.check_renders(&prompts, &|i| format!("prompt {} of {prompt_data}", i + 1))?;
        }
        if let Some(pairs) = o.pairs {
            crate::evaluate::check_pairs(&text, pairs, o.max_length)?;
        }
    }

    let answer = |who: &str, model: &Path, adapter: Option<&Path>| -> Result<Answers> {
        let chat = Chat::open(ChatOptions {
            model,
            adapter,
            template: None,
            system: None,
            sampling: Sampling {
                max_new_tokens: o.max_new_tokens,
                ..Sampling::default()
            },
            device: o.device,
        })?;
        // Tokenised (and held to the context) before an hour of answering.
        let options = multiple_choice::option_sequences(&chat, &items, &choice_data)?;
        eprintln!("{who}: answering {} crisis probes", probes.len());
        let probe_prompts: Vec<Vec<data::Message>> =
            probes.iter().map(|p| p.prompt.clone()).collect();
        let replies: Vec<String> = chat
            .answer_all(&probe_prompts, o.batch_size, 1)?
            .into_iter()
            .map(|r| r.text)
            .collect();
        let crisis = probes::judge(&probes, &replies, o.worst, o.show_text);
        eprintln!("{who}: scoring {} multiple-choice items", items.len());
        let logps = multiple_choice::option_logps(&chat, &items, &options);
        let choices = multiple_choice::score(&items, &logps);
        let replies = if win {
            eprintln!(
                "{who}: answering {} prompts for the win rate",
                prompts.len()
            );
            chat.answer_all(&prompts, o.batch_size, 1)?
                .into_iter()
                .map(|r| r.text)
                .collect()
        } else {
            Vec::new()
        };
        Ok(Answers {
            crisis,
            choices,
            replies,
        })
    };
    let mine = answer("model", o.model, o.adapter)?;
    let theirs = o
        .against
        .map(|b| answer("against", b, o.against_adapter))
        .transpose()?;

    let win_rate = match (o.reward_model, &theirs) {
        (Some(rm), Some(theirs)) => {
            eprintln!("reward model: scoring {} reply pairs", prompts.len());
            let scorer = RewardScorer::load(rm, o.reward_adapter, o.device)?;
            let dialogue = |replies: &[String]| -> Vec<Vec<data::Message>> {
                prompts
                    .iter()
                    .zip(replies)
                    .map(|(p, r)| {
                        let mut m = p.clone();
                        m.push(data::Message::new("assistant", r.clone()));
                        m
                    })
                    .collect()
            };
            let scored = |who: &str, replies: &[String]| {
                let reply =
                    |i: usize| format!("{who}'s reply to prompt {} of {prompt_data}", i + 1);
                finite_scores(scorer.score(&dialogue(replies), &reply)?, |i| {
                    format!("{}: the score of {}", rm.display(), reply(i))
                })
            };
            let a = scored("model", &mine.replies)?;
            let b = scored("against", &theirs.replies)?;
            Some(WinRateSection {
                data: prompt_data,
                result: win_rate::win_rate(&a, &b, o.bootstrap, o.seed),
            })
        }
        _ => None,
    };
    let reward_model_pairs = match (o.reward_model, o.pairs) {
        (Some(rm), Some(pairs)) => {
            eprintln!("reward model: pairwise accuracy on {}", pairs.display());
            let result = preference_accuracy(rm, o.reward_adapter, pairs, o.max_length, o.device)?;
            Some(PairsSection {
                data: pairs.display().to_string(),
                result,
            })
        }
        _ => None,
    };
    let (their_crisis, their_choices) = theirs.map(|t| (t.crisis, t.choices)).unzip();
    let report = CounselingReport {
        kind: "counseling",
        model: Subject::of(o.model, o.adapter),
        against: o.against.map(|a| Subject::of(a, o.against_adapter)),
        reward_model: o.reward_model.map(|r| Subject::of(r, o.reward_adapter)),
        max_new_tokens: o.max_new_tokens,
        win_rate,
        crisis: Compared {
            data: probe_data,
            model: mine.crisis,
            against: their_crisis,
        },
        multiple_choice: Compared {
            data: choice_data,
            model: mine.choices,
            against: their_choices,
        },
        reward_model_pairs,
    };
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| TrainerError::Input(format!("writing the report: {e}")))?;
    if let Some(evals) = o.out.parent().filter(|_| run_of(o.out).is_some()) {
        match std::fs::create_dir(evals) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(checkpoints::CheckpointError::Io {
                    path: evals.to_path_buf(),
                    source: e,
                }
                .into());
            }
            _ => {}
        }
    }
    checkpoints::write_text(o.out, &format!("{json}\n"))?;
    if let Some(run) = run_of(o.out) {
        crate::report::write_page(&run)?;
    }
    Ok(report)
}

/// The run (or pipeline) directory whose report page shows `out`: `RUN/evals/x.json`.
fn run_of(out: &Path) -> Option<PathBuf> {
    let evals = out.parent()?;
    if evals.file_name()? != EVALS_DIR {
        return None;
    }
    let run = evals.parent()?;
    let is_run = run.join(crate::run_dir::RECIPE_FILE).is_file()
        || run.join(crate::report::REPORT_PAGE).is_file();
    is_run.then(|| run.to_path_buf())
}
