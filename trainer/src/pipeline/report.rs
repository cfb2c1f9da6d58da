//! The pipeline report's measurements: each stage's figures from its metrics, sample
//! replies before and after with their length and diversity, and the warning for a reward
//! gained by running into the completion limit.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use data::render::{TemplateChoice, template_for};
use rand::SeedableRng;

use super::ReportSection;
use crate::Result;
use crate::generate::{Completion, Sampling, generate_batch, stop_tokens};
use crate::model::adapter::load_adapter;
use crate::model::load_model;
use crate::recipe::Recipe;
use crate::run_dir::read_metrics;
use crate::train::Outcome;

/// Headline metrics of a finished run, by method.
pub(super) fn figures(
    recipe: &Recipe,
    run: &Path,
    outcome: &Outcome,
) -> Result<Vec<(String, String)>> {
    let lines = read_metrics(run)?;
    let series = |key: &str| -> Vec<f64> {
        lines
            .iter()
            .filter_map(|l| l.get(key).and_then(|v| v.as_f64()))
            .collect()
    };
    let trend = |key: &str, n: usize| -> Option<String> {
        let v = series(key);
        if v.is_empty() {
            return None;
        }
        let n = n.min(v.len());
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        Some(format!(
            "{:.3} → {:.3}",
            mean(&v[..n]),
            mean(&v[v.len() - n..])
        ))
    };
    let mut out = vec![(
        "loss".to_string(),
        format!("{:.4} → {:.4}", outcome.first_loss, outcome.last_loss),
    )];
    let objective = crate::objectives::registry::for_recipe(recipe)?;
    let eval_keys = objective.summary_keys();
    if let Some(l) = outcome.eval_loss {
        out.push(("eval_loss".into(), format!("{l:.4}")));
    }
    for k in eval_keys {
        if let Some(v) = outcome.eval_metrics.get(k) {
            out.push((format!("eval_{k}"), format!("{v:.3}")));
        }
    }
    if objective.has_rollouts() {
        for key in series_keys(&lines, "rewards/", "/mean")
            .iter()
            .map(String::as_str)
            .chain([
                "reward",
                "completions/mean_length",
                "completions/clipped_ratio",
            ])
        {
            if let Some(t) = trend(key, 3) {
                out.push((format!("{key} (first 3 → last 3 steps)"), t));
            }
        }
    }
    Ok(out)
}

fn series_keys(lines: &[serde_json::Value], prefix: &str, suffix: &str) -> Vec<String> {
    let mut keys: Vec<String> = lines
        .iter()
        .filter_map(|l| l.as_object())
        .flat_map(|o| o.keys())
        .filter(|k| k.starts_with(prefix) && k.ends_with(suffix))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Greedy replies to the report's prompts: each base model's and each generating stage's,
/// every stage on its own `model.path` (a pipeline's stages may start from different ones).
pub(super) struct Replies {
    /// The client's last message of each prompt (shown only because `[report] samples`
    /// asks for it).
    pub(super) prompts: Vec<String>,
    /// Each distinct base, in the order the stages first name it: the first is where the
    /// pipeline starts.
    pub(super) bases: Vec<BaseReplies>,
    /// `(stage name, its base in bases, its replies)`, for every stage whose final adapter
    /// generates.
    pub(super) stages: Vec<(String, usize, Vec<Completion>)>,
}

/// A base model's replies, and the tokenizer that reads them and its stages' replies.
pub(super) struct BaseReplies {
    pub(super) replies: Vec<Completion>,
    pub(super) tokenizer: Option<tokenizers::Tokenizer>,
}

impl BaseReplies {
    /// A reply as the report shows it: control characters a model can emit (NUL, escape
    /// sequences) are shown as U+FFFD, so the page stays valid HTML and `report.md` does
    /// not drive the terminal it is printed to.
    pub(super) fn text(&self, c: &Completion) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.decode(&c.tokens, true).ok())
            .unwrap_or_default()
            .chars()
            .map(|ch| {
                if ch.is_control() && ch != '\n' && ch != '\t' {
                    '\u{FFFD}'
                } else {
                    ch
                }
            })
            .collect()
    }
}

/// The share of replies that `max_new_tokens` cut off before they ended.
pub(super) fn clipped_ratio(replies: &[Completion]) -> f64 {
    if replies.is_empty() {
        return 0.0;
    }
    replies.iter().filter(|c| c.stop.is_none()).count() as f64 / replies.len() as f64
}

/// distinct-2: distinct token bigrams over all bigrams of the replies (Li et al., 2016).
/// Near 1 for varied text; a reply that loops ("you feel you feel …") drives it down.
pub(super) fn distinct_2(replies: &[Completion]) -> f64 {
    let mut all = std::collections::HashSet::new();
    let mut total = 0usize;
    for c in replies {
        for w in c.tokens.windows(2) {
            all.insert((w[0], w[1]));
            total += 1;
        }
    }
    if total == 0 {
        return 0.0;
    }
    all.len() as f64 / total as f64
}

/// Greedy replies of each stage's base model and of each stage's final adapter on it
/// (`(name, base, adapter)`), for the report.
pub(super) fn replies(stages: &[(String, PathBuf, PathBuf)], r: &ReportSection) -> Result<Replies> {
    let Some(path) = &r.prompts else {
        return Ok(Replies {
            prompts: Vec::new(),
            bases: Vec::new(),
            stages: Vec::new(),
        });
    };
    let loaded = data::load_examples(path, &Default::default())?;
    let mut conversations = Vec::new();
    let mut shown = Vec::new();
    for e in &loaded.examples {
        let messages = match e {
            data::Example::Prompt { prompt, .. } | data::Example::Pair { prompt, .. } => prompt,
            data::Example::Conversation { .. } => continue,
        };
        let last = messages.iter().rev().find(|m| m.role == "user");
        let text = last.map_or_else(String::new, |m| m.content.clone());
        if shown.contains(&text) {
            continue;
        }
        conversations.push(messages.clone());
        shown.push(text);
        if conversations.len() == r.samples {
            break;
        }
    }
    let greedy = Sampling {
        max_new_tokens: r.max_new_tokens,
        ..Default::default()
    };
    let device = Device::flex();
    let mut bases: Vec<BaseReplies> = Vec::new();
    let mut loaded_bases: Vec<(PathBuf, Base)> = Vec::new();
    let mut done = Vec::with_capacity(stages.len());
    for (name, base, adapter) in stages {
        let at = match loaded_bases.iter().position(|(p, _)| same_path(p, base)) {
            Some(i) => i,
            None => {
                let b = Base::load(base, &conversations, &device)?;
                bases.push(BaseReplies {
                    replies: b.reply(&b.model, &greedy, &device)?,
                    tokenizer: Some(b.tokenizer.clone()),
                });
                loaded_bases.push((base.clone(), b));
                loaded_bases.len() - 1
            }
        };
        let b = &loaded_bases[at].1;
        let tuned = load_adapter(adapter, b.model.clone(), &device)?.0;
        done.push((name.clone(), at, b.reply(&tuned, &greedy, &device)?));
    }
    Ok(Replies {
        prompts: shown,
        bases,
        stages: done,
    })
}

/// Whether two paths name the same directory.
fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A base model loaded for the report, with the report's prompts in its own template and
/// tokens.
struct Base {
    model: crate::model::Llama,
    tokenizer: tokenizers::Tokenizer,
    stop: Vec<u32>,
    prompts: Vec<Vec<u32>>,
}

impl Base {
    fn load(dir: &Path, conversations: &[Vec<data::Message>], device: &Device) -> Result<Self> {
        let (config, model) = load_model(dir, device)?;
        let tokenizer = crate::model::load_tokenizer(dir, config.vocab_size)?;
        let template = template_for(dir, TemplateChoice::Shipped(None))?;
        let stop = stop_tokens(dir, &config, &tokenizer);
        let prompts = conversations
            .iter()
            .map(|m| Ok(data::chat::encode(&tokenizer, &template.render(m, true)?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            tokenizer,
            stop,
            prompts,
        })
    }

    fn reply(
        &self,
        m: &crate::model::Llama,
        greedy: &Sampling,
        device: &Device,
    ) -> Result<Vec<Completion>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        generate_batch(m, &self.prompts, &self.stop, greedy, &mut rng, device)
    }
}

/// The report's warning for a GRPO stage whose reward rose while most completions ran
/// into `max_completion_length`: a reward gained by length, not by better replies. The
/// remedies offered are those the stage's `[grpo]` does not already apply.
pub(super) fn length_gaming(
    lines: &[serde_json::Value],
    grpo: Option<&crate::objectives::grpo::GrpoSection>,
) -> Option<String> {
    let series = |key: &str| -> Vec<f64> {
        lines
            .iter()
            .filter_map(|l| l.get(key).and_then(|v| v.as_f64()))
            .collect()
    };
    let (reward, clipped) = (series("reward"), series("completions/clipped_ratio"));
    if reward.len() < 2 || clipped.is_empty() {
        return None;
    }
    let n = 3.min(reward.len() / 2).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let gain = mean(&reward[reward.len() - n..]) - mean(&reward[..n]);
    let m = 3.min(clipped.len());
    let late_clipped = mean(&clipped[clipped.len() - m..]);
    let mut remedies = Vec::new();
    if !grpo.is_some_and(|g| g.mask_truncated_completions) {
        remedies.push("mask truncated completions");
    }
    if !grpo.is_some_and(|g| g.beta > 0.0) {
        remedies.push("add a KL term (beta)");
    }
    remedies.push("cap the length reward");
    (gain > 0.0 && late_clipped > 0.5).then(|| {
        format!(
            "warning: the reward rose by {gain:.3} while {:.0}% of the last steps' completions \
             were cut at max_completion_length: the gain may come from length, not from better \
             replies ({})",
            late_clipped * 100.0,
            remedies.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(tokens: &[u32], stopped: bool) -> Completion {
        Completion {
            tokens: tokens.to_vec(),
            stop: stopped.then_some(0),
        }
    }

    /// A reply's control characters (a NUL, an escape) reach neither page nor terminal.
    #[test]
    fn control_characters_in_replies_are_shown_as_replacements() {
        use data::tokenizer::{BUNDLED_CORPUS, LLAMA3_SPECIAL_TOKENS, train_bpe};
        let tokenizer = train_bpe(&[BUNDLED_CORPUS], 400, &LLAMA3_SPECIAL_TOKENS).unwrap();
        // Byte-level BPE spells the bytes 0x00 and 0x1b as these characters.
        let id = |t: &str| tokenizer.token_to_id(t).unwrap();
        let hi = tokenizer.encode("hi", false).unwrap().get_ids().to_vec();
        let mut tokens = hi.clone();
        tokens.extend([id("\u{100}"), id("\u{11b}")]);
        tokens.extend(hi);
        let replies = BaseReplies {
            replies: Vec::new(),
            tokenizer: Some(tokenizer),
        };
        assert_eq!(replies.text(&reply(&tokens, true)), "hi\u{FFFD}\u{FFFD}hi");
    }

    #[test]
    fn reply_measures_match_their_definitions() {
        // Bigrams (1,2) (2,3) (3,1) (1,2) and (4,4) (4,4): 4 distinct of 6.
        let replies = [reply(&[1, 2, 3, 1, 2], true), reply(&[4, 4, 4], false)];
        assert_eq!(distinct_2(&replies), 4.0 / 6.0);
        assert_eq!(clipped_ratio(&replies), 0.5);
        // A reply that loops on one bigram pair.
        let looping = [reply(&[7, 8, 7, 8, 7, 8, 7, 8, 7], false)];
        assert_eq!(distinct_2(&looping), 2.0 / 8.0);
        assert_eq!(distinct_2(&[reply(&[5], true)]), 0.0);
        assert_eq!(clipped_ratio(&[]), 0.0);
    }

    #[test]
    fn a_reward_gained_with_clipped_completions_is_flagged() {
        let line = |reward: f64, clipped: f64| serde_json::json!({"reward": reward, "completions/clipped_ratio": clipped});
        let gamed: Vec<_> = (0..10)
            .map(|i| line(i as f64 / 10.0, 0.06 + i as f64 / 10.0))
            .collect();
        let w = length_gaming(&gamed, None).expect("flagged");
        assert!(w.contains("max_completion_length"), "{w}");
        assert!(w.contains("mask truncated") && w.contains("KL term"), "{w}");
        // Remedies the stage already applies are not offered again.
        let applied = crate::objectives::grpo::GrpoSection {
            mask_truncated_completions: true,
            beta: 0.2,
            ..Default::default()
        };
        let w = length_gaming(&gamed, Some(&applied)).expect("flagged");
        assert!(
            !w.contains("mask truncated") && !w.contains("KL term") && w.contains("cap the length"),
            "{w}"
        );
        // The same gain with completions that end by themselves: no warning.
        let honest: Vec<_> = (0..10).map(|i| line(i as f64 / 10.0, 0.1)).collect();
        assert!(length_gaming(&honest, None).is_none());
        // Clipped but no gain: no warning either.
        let flat: Vec<_> = (0..10).map(|_| line(0.5, 0.9)).collect();
        assert!(length_gaming(&flat, None).is_none());
    }
}
