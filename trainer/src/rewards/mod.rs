//! Rewards for online training (GRPO): each scores completions of prompts, and the set
//! combines them with weights. A reward may decline to score a sample (`None`: it does not
//! apply), as TRL's reward functions return `None`; the weighted total skips those.
//!
//! Kinds: the counseling rules in [`rules`], a hearth reward model ([`model`]), and an
//! external command speaking JSON lines ([`command`]).

pub mod command;
pub mod model;
pub mod rules;

use std::path::Path;

use burn::tensor::Device;
use data::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::objectives::Metrics;
use crate::{Result, TrainerError};

/// One completion to score, with the prompt it answers.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub prompt: &'a [Message],
    pub completion: &'a str,
    /// The data set's other columns for this prompt.
    pub extra: &'a Map<String, Value>,
}

impl Sample<'_> {
    /// The last user (client) message of the prompt.
    pub fn client_message(&self) -> &str {
        self.prompt
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str())
    }
}

/// A reward function.
pub trait Reward {
    /// The name in metrics: `rewards/NAME/mean`.
    fn name(&self) -> &str;
    /// One score per sample, `None` where the reward does not apply.
    fn score(&mut self, samples: &[Sample<'_>]) -> Result<Vec<Option<f64>>>;
    /// Ends what the reward runs once training is done, reporting what only the end can
    /// show (a program's answers that ran past its last question).
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// `[[grpo.rewards]]`: one reward and its weight. Which keys apply depends on `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// length, format, reflection, repetition, crisis_safety, reward_model or command.
    pub kind: String,
    /// The metric name; defaults to the kind.
    pub name: Option<String>,
    #[serde(default = "one")]
    pub weight: f64,
    /// `length`: the window, in words.
    pub min_words: Option<usize>,
    pub max_words: Option<usize>,
    /// `reward_model`: a `*ForSequenceClassification` checkpoint, or a base with `adapter`.
    #[serde(default, deserialize_with = "data::config::optional_named_path")]
    pub model: Option<std::path::PathBuf>,
    #[serde(default, deserialize_with = "data::config::optional_named_path")]
    pub adapter: Option<std::path::PathBuf>,
    /// `command`: the program and its arguments, run without a shell.
    pub command: Option<Vec<String>>,
    /// `command`: seconds to wait for each batch's answers.
    pub timeout_s: Option<f64>,
}

fn one() -> f64 {
    1.0
}

/// Seconds a command reward may take over each batch's answers, unless `timeout_s` says.
const DEFAULT_TIMEOUT_S: f64 = 120.0;

/// Refuses `[[grpo.rewards]]` tables that cannot mean what they say, before anything is
/// loaded or started (so at the recipe's check, with its file named): an unknown kind, a
/// key the kind does not read, a bad window or timeout, a weight that is not a number, or
/// two rewards logging under one `rewards/NAME/…` name.
pub fn check_specs(specs: &[RewardSpec]) -> std::result::Result<(), String> {
    if specs.is_empty() {
        return Err("grpo.rewards: GRPO needs at least one [[grpo.rewards]] entry".into());
    }
    let mut names: Vec<String> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let bad = |msg: String| format!("grpo.rewards[{i}] ({}): {msg}", spec.kind);
        // The keys each kind reads beside kind, name and weight.
        let reads: &[&str] = match spec.kind.as_str() {
            "length" => &["min_words", "max_words"],
            "format" | "reflection" | "repetition" | "crisis_safety" => &[],
            "reward_model" => &["model", "adapter"],
            "command" => &["command", "timeout_s"],
            other => {
                return Err(bad(format!(
                    "unknown kind `{other}`; one of length, format, reflection, repetition, \
                     crisis_safety, reward_model, command"
                )));
            }
        };
        let given = [
            ("min_words", spec.min_words.is_some()),
            ("max_words", spec.max_words.is_some()),
            ("model", spec.model.is_some()),
            ("adapter", spec.adapter.is_some()),
            ("command", spec.command.is_some()),
            ("timeout_s", spec.timeout_s.is_some()),
        ];
        if let Some((key, _)) = given.iter().find(|(k, set)| *set && !reads.contains(k)) {
            return Err(bad(format!(
                "`{key}` does not apply to kind {}; it reads {}",
                spec.kind,
                if reads.is_empty() {
                    "no other key".to_string()
                } else {
                    reads.join(" and ")
                }
            )));
        }
        if !crate::objectives::fits_f32(spec.weight) {
            return Err(bad(
                "weight must be a finite number within f32's range".into()
            ));
        }
        match spec.kind.as_str() {
            "length" => {
                let (lo, hi) = (spec.min_words.unwrap_or(0), spec.max_words.unwrap_or(0));
                if hi == 0 || lo > hi {
                    return Err(bad(format!(
                        "needs 0 ≤ min_words ≤ max_words with max_words > 0 (got {lo}..{hi})"
                    )));
                }
            }
            "reward_model" if spec.model.is_none() => {
                return Err(bad("needs `model`, a reward model directory".into()));
            }
            "command" => {
                if spec.command.as_ref().is_none_or(Vec::is_empty) {
                    return Err(bad(
                        "needs `command`, e.g. [\"python3\", \"score.py\"]".into()
                    ));
                }
                if spec
                    .command
                    .as_ref()
                    .is_some_and(|c| c[0].trim().is_empty())
                {
                    return Err(bad("command's first element, the program, is empty".into()));
                }
                let timeout_s = spec.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
                if !(timeout_s > 0.0 && timeout_s <= crate::recipe::MAX_SECONDS) {
                    return Err(bad(format!(
                        "timeout_s {} must be a positive number of seconds (at most {:e})",
                        crate::recipe::shown(timeout_s),
                        crate::recipe::MAX_SECONDS
                    )));
                }
            }
            _ => {}
        }
        let name = spec.name.clone().unwrap_or_else(|| spec.kind.clone());
        if let Some(j) = names.iter().position(|n| *n == name) {
            return Err(bad(format!(
                "logs as `rewards/{name}/…`, as grpo.rewards[{j}] does, so one would hide the \
                 other; give one a `name`"
            )));
        }
        names.push(name);
    }
    Ok(())
}

/// A reward with its weight.
pub struct Weighted {
    pub reward: Box<dyn Reward>,
    pub weight: f64,
}

/// What building rewards may need from the run.
pub struct RewardContext<'a> {
    /// The policy's tokenizer, for the role tokens the format rule looks for.
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Where reward models run.
    pub device: &'a Device,
}

/// The weighted rewards of a run.
pub struct Rewards(pub Vec<Weighted>);

/// One reward's score per sample, `None` where it does not apply.
pub type Column = Vec<Option<f64>>;

impl Rewards {
    /// [`Reward::finish`] of each, the first error kept.
    pub fn finish(&mut self) -> Result<()> {
        let mut first = Ok(());
        for w in &mut self.0 {
            let r = w.reward.finish();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    pub fn from_specs(specs: &[RewardSpec], cx: &RewardContext<'_>) -> Result<Self> {
        check_specs(specs).map_err(TrainerError::Input)?;
        let mut out = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let bad = |msg: String| {
                TrainerError::Input(format!("grpo.rewards[{i}] ({}): {msg}", spec.kind))
            };
            let name = spec.name.clone().unwrap_or_else(|| spec.kind.clone());
            let reward: Box<dyn Reward> = match spec.kind.as_str() {
                "length" => Box::new(rules::LengthWindow::new(
                    name,
                    spec.min_words.unwrap_or(0),
                    spec.max_words.unwrap_or(0),
                )),
                "format" => Box::new(rules::Format::new(name, cx.tokenizer)),
                "reflection" => Box::new(rules::Reflection::new(name)),
                "repetition" => Box::new(rules::Repetition::new(name)),
                "crisis_safety" => Box::new(rules::CrisisSafety::new(name)),
                "reward_model" => {
                    let dir = spec.model.as_deref().unwrap_or(Path::new(""));
                    Box::new(
                        model::RewardModel::load(name, dir, spec.adapter.as_deref(), cx.device)
                            .map_err(|e| bad(e.to_string()))?,
                    )
                }
                _ => {
                    let argv = spec.command.clone().unwrap_or_default();
                    let timeout_s = spec.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
                    Box::new(
                        command::CommandReward::spawn(name, argv, timeout_s)
                            .map_err(|e| bad(e.to_string()))?,
                    )
                }
            };
            out.push(Weighted {
                reward,
                weight: spec.weight,
            });
        }
        Ok(Self(out))
    }

    /// The weighted total per sample, skipping rewards that do not apply (0 when none
    /// does), and each reward's own scores (`None` where it does not apply), in the
    /// rewards' order: their metrics are taken once every rank's columns are in.
    pub fn score_columns(&mut self, samples: &[Sample<'_>]) -> Result<(Vec<f64>, Vec<Column>)> {
        let mut total = vec![0.0; samples.len()];
        let mut columns = Vec::with_capacity(self.0.len());
        for w in &mut self.0 {
            let scores = w.scores(samples)?;
            w.add_to(&mut total, &scores);
            columns.push(scores);
        }
        Ok((total, columns))
    }

    /// Each reward's `rewards/NAME/mean` and `rewards/NAME/std` over its column of scores
    /// (from [`score_columns`](Self::score_columns), maybe gathered from every rank).
    pub fn metrics_of(&self, columns: &[Column]) -> Metrics {
        let mut m = Metrics::default();
        for (w, scores) in self.0.iter().zip(columns) {
            record(&mut m, w.reward.name(), scores);
        }
        m
    }
}

/// Far beyond any reward's scale, and small enough that weighted sums of scores and the
/// squares of their spreads stay finite in f64.
const MAX_SCORE: f64 = 1e100;

impl Weighted {
    /// The reward's scores, checked: one per sample, each finite.
    pub fn scores(&mut self, samples: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        let scores = self.reward.score(samples)?;
        if scores.len() != samples.len() {
            return Err(TrainerError::Input(format!(
                "reward `{}` gave {} scores for {} completions",
                self.reward.name(),
                scores.len(),
                samples.len()
            )));
        }
        if let Some(bad) = scores.iter().flatten().find(|x| !x.is_finite()) {
            return Err(TrainerError::Input(format!(
                "reward `{}` gave a non-finite score ({bad})",
                self.reward.name()
            )));
        }
        // Finite but vast scores overflow the group's sums and spreads, and every
        // advantage silently becomes 0 or NaN.
        if let Some(bad) = scores.iter().flatten().find(|x| x.abs() > MAX_SCORE) {
            return Err(TrainerError::Input(format!(
                "reward `{}` gave the score {bad:e}, beyond ±{MAX_SCORE:e}: rewards that large \
                 overflow the group's mean and spread; scale them down",
                self.reward.name()
            )));
        }
        Ok(scores)
    }

    /// Adds the weighted scores that apply to `total`.
    pub fn add_to(&self, total: &mut [f64], scores: &[Option<f64>]) {
        for (t, s) in total.iter_mut().zip(scores) {
            *t += s.map_or(0.0, |s| self.weight * s);
        }
    }
}

/// `rewards/NAME/mean` and `rewards/NAME/std` (sample std) over the scores that apply.
fn record(m: &mut Metrics, name: &str, scores: &[Option<f64>]) {
    let applied: Vec<f64> = scores.iter().flatten().copied().collect();
    let n = applied.len();
    let mean = if n == 0 {
        f64::NAN
    } else {
        applied.iter().sum::<f64>() / n as f64
    };
    let std = if n < 2 {
        0.0
    } else {
        (applied.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    m.mean(format!("rewards/{name}/mean"), mean);
    m.mean(format!("rewards/{name}/std"), std);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Vec<Option<f64>>);
    impl Reward for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        fn score(&mut self, _: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
            Ok(self.1.clone())
        }
    }

    /// A command reward's wait is checked before the program starts: NaN, zero or a
    /// negative one failed mid-run as "no answer within 0 s", a huge one panicked.
    #[test]
    fn a_command_timeout_must_be_a_usable_number_of_seconds() {
        let tokenizer = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let device = Device::flex();
        let cx = RewardContext {
            tokenizer: &tokenizer,
            device: &device,
        };
        for timeout in [f64::NAN, -5.0, 0.0, 1e300] {
            let spec = RewardSpec {
                kind: "command".into(),
                name: None,
                weight: 1.0,
                min_words: None,
                max_words: None,
                model: None,
                adapter: None,
                command: Some(vec!["/no/such/program".into()]),
                timeout_s: Some(timeout),
            };
            let e = Rewards::from_specs(&[spec], &cx).err().unwrap().to_string();
            assert!(
                e.starts_with("grpo.rewards[0] (command): timeout_s")
                    && e.contains("positive number of seconds"),
                "{timeout}: {e}"
            );
        }
    }

    #[test]
    fn weighted_total_skips_rewards_that_do_not_apply() {
        let mut set = Rewards(vec![
            Weighted {
                reward: Box::new(Fixed("a", vec![Some(1.0), Some(0.0), Some(0.5)])),
                weight: 2.0,
            },
            Weighted {
                reward: Box::new(Fixed("b", vec![None, Some(-1.0), Some(1.0)])),
                weight: 0.5,
            },
        ]);
        let extra = Map::new();
        let s = Sample {
            prompt: &[],
            completion: "",
            extra: &extra,
        };
        let (total, columns) = set.score_columns(&[s, s, s]).unwrap();
        let m = set.metrics_of(&columns);
        assert_eq!(total, vec![2.0, -0.5, 1.5]);
        assert_eq!(m.get("rewards/a/mean"), Some(0.5));
        assert_eq!(m.get("rewards/b/mean"), Some(0.0));
        assert!((m.get("rewards/b/std").unwrap() - 2f64.sqrt()).abs() < 1e-12);
    }

    /// Scores past what sums and spreads hold are refused, not turned into zero
    /// advantages; ±1e100 itself passes.
    #[test]
    fn vast_scores_are_refused() {
        let extra = Map::new();
        let s = Sample {
            prompt: &[],
            completion: "",
            extra: &extra,
        };
        let set = |v: f64| {
            Rewards(vec![Weighted {
                reward: Box::new(Fixed("big", vec![Some(v), Some(-v)])),
                weight: 1.0,
            }])
        };
        let e = set(1.7e308).score_columns(&[s, s]).unwrap_err().to_string();
        assert!(
            e.contains("`big`") && e.contains("1.7e308") && e.contains("scale"),
            "{e}"
        );
        let (total, _) = set(1e100).score_columns(&[s, s]).unwrap();
        assert_eq!(total, vec![1e100, -1e100]);
    }
}
