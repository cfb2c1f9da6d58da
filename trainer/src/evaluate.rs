//! Reading a trained model's preferences: reward-model scores for conversations, and
//! pairwise accuracy on held-out pairs — from a reward model's scores, or from the implicit
//! DPO reward `β(log π(y|x) − log πref(y|x))` of an adapter over its base.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use data::Example;
use data::render::{TemplateChoice, template_for_tuned};
use data::tokenize::{PairTokens, Tokenized, Tokenizing, Truncation, TruncationCounts};
use serde::Serialize;

use crate::batch::{LmBatch, PairBatch, last_real_tokens};
use crate::model::Llama;
use crate::objectives::sequences::{halves, reward_scores, sequence_logps};
use crate::objectives::values;
use crate::{Result, TrainerError};

/// Sequences scored or compared at once.
const BATCH: usize = 8;

/// The model in `dir` with the adapter in `adapter` (if any), and its pad id.
/// A model (with its adapter) on `device`, its pad id, and its tokenizer, checked to fit
/// its vocabulary.
pub(crate) fn load_on(
    dir: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<(Llama, u32, tokenizers::Tokenizer)> {
    let (config, model) = crate::model::load_tuned(dir, adapter, device)?;
    let tokenizer = crate::model::load_tokenizer(dir, config.vocab_size)?;
    let pad = config.padding_id();
    Ok((model, pad, tokenizer))
}

/// Scores at each sequence's last non-pad token, `batch` sequences at a time. `name(i)`
/// says where sequence `i` came from (a file and line), for the one that is too long.
pub fn score_sequences(
    model: &Llama,
    seqs: &[Vec<u32>],
    pad: u32,
    device: &Device,
    name: &dyn Fn(usize) -> String,
) -> Result<Vec<f64>> {
    let score = model.score.as_ref().ok_or_else(|| {
        TrainerError::Input(
            "the model has no score head: pass a reward model (a *ForSequenceClassification \
             checkpoint) or a SEQ_CLS adapter"
                .into(),
        )
    })?;
    let mut out = Vec::with_capacity(seqs.len());
    for (c, chunk) in seqs.chunks(BATCH).enumerate() {
        let longest = chunk.iter().map(Vec::len).max().unwrap_or(0);
        if let Some(j) = chunk.iter().position(|s| s.len() == longest) {
            let which = name(c * BATCH + j);
            crate::model::mask::check_attention_size(chunk.len(), longest, &which)?;
        }
        let owned: Vec<data::tokenize::Sequence> = chunk
            .iter()
            .map(|ids| data::tokenize::Sequence {
                ids: ids.clone(),
                loss_mask: vec![0; ids.len()],
            })
            .collect();
        let batch = data::batch::Batch::padded(&owned.iter().collect::<Vec<_>>(), pad);
        let last = last_real_tokens(&batch, pad);
        let lm = LmBatch::new(&batch, device);
        let hidden = model.hidden_packed(lm.ids, lm.positions, lm.segments);
        let [b, t, h] = hidden.dims();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(last, [b]), device);
        let picked = hidden.reshape([b * t, h]).select(0, idx);
        out.extend(values(score.forward(picked).reshape([b])));
    }
    Ok(out)
}

/// A reward model ready to score conversations: rendered by its own chat template, scored
/// at the last token.
pub struct RewardScorer {
    model: Llama,
    pad: u32,
    tokenizer: tokenizers::Tokenizer,
    template: data::ChatTemplate,
    /// Where the model's weights live, so every batch is scored there too.
    device: Device,
}

impl RewardScorer {
    /// The reward model in `dir` (a classifier checkpoint, or a base with a SEQ_CLS
    /// adapter) on `device`; refused when it has no score head.
    pub fn load(dir: &Path, adapter: Option<&Path>, device: &Device) -> Result<Self> {
        let TextSide {
            template,
            tokenizer,
        } = Self::prepare(dir, adapter)?;
        let (config, model) = crate::model::load_tuned(dir, adapter, device)?;
        Ok(Self {
            model,
            pad: config.padding_id(),
            tokenizer,
            template,
            device: device.clone(),
        })
    }

    /// Refuses, without loading any weights, a model that cannot score: one without a
    /// reward model's one-label score head (read from the config and the adapter's
    /// header), or without a tokenizer and chat template to read conversations with.
    pub fn check(dir: &Path, adapter: Option<&Path>) -> Result<()> {
        Self::prepare(dir, adapter).map(|_| ())
    }

    /// What [`check`](Self::check) reads, kept for the checks that render or tokenise as
    /// the model will: the tokenizer and template, read once.
    pub fn prepare(dir: &Path, adapter: Option<&Path>) -> Result<TextSide> {
        if !crate::model::reward_head(dir, adapter)? {
            return Err(TrainerError::Input(format!(
                "{}: the model has no score head: pass a reward model (a \
                 *ForSequenceClassification checkpoint) or a SEQ_CLS adapter",
                dir.display()
            )));
        }
        text_side(dir, adapter)
    }

    /// One score per conversation, in order; `name(i)` says where conversation `i` came
    /// from, for errors.
    pub fn score(
        &self,
        conversations: &[Vec<data::Message>],
        name: &dyn Fn(usize) -> String,
    ) -> Result<Vec<f64>> {
        let mut seqs = Vec::with_capacity(conversations.len());
        for messages in conversations {
            let text = self.template.render(messages, false)?;
            seqs.push(data::chat::encode(&self.tokenizer, &text)?);
        }
        score_sequences(&self.model, &seqs, self.pad, &self.device, name)
    }
}

/// `hearth reward score`: reads `{"messages": [...]}` rows, writes one `{"score": x}` line
/// per row, in order (blank lines are not rows, so they get no score line). Each
/// conversation must end with the assistant's reply: that is what a reward model scores.
/// Returns how many were scored.
pub fn score_file(
    model_dir: &Path,
    adapter: Option<&Path>,
    input: &Path,
    out: &Path,
    device: &Device,
) -> Result<usize> {
    let mut inputs = vec![model_dir, input];
    inputs.extend(adapter);
    checkpoints::guard::check_output_file(out, &inputs)?;
    data::output::check_jsonl_name(out, "scores")?;
    // The model's header and the input are read before any weights are loaded, so a
    // wrong model or a bad row fails at once.
    RewardScorer::check(model_dir, adapter)?;
    let loaded = data::load_examples(input, &Default::default())?;
    let mut conversations = Vec::with_capacity(loaded.examples.len());
    for (i, e) in loaded.examples.iter().enumerate() {
        let Example::Conversation { messages, .. } = e else {
            return Err(TrainerError::Input(format!(
                "{}: {}: expected a conversation (`messages`)",
                input.display(),
                location(&loaded, i)
            )));
        };
        if !messages.last().is_some_and(data::Message::is_assistant) {
            return Err(TrainerError::Input(format!(
                "{}: {}: key `messages` does not end with an assistant reply; a reward model \
                 scores the assistant's last reply",
                input.display(),
                location(&loaded, i)
            )));
        }
        conversations.push(messages.clone());
    }
    let scorer = RewardScorer::load(model_dir, adapter, device)?;
    let at = |i: usize| format!("{}: {}", input.display(), location(&loaded, i));
    let scores = finite_scores(scorer.score(&conversations, &at)?, |i| {
        format!("{}: the score", at(i))
    })?;
    let mut text = String::new();
    for s in &scores {
        text.push_str(&serde_json::json!({ "score": s }).to_string());
        text.push('\n');
    }
    checkpoints::write_text(out, &text)?;
    Ok(scores.len())
}

/// Where example `i` of `loaded` came from: its line or row.
fn location(loaded: &data::Loaded, i: usize) -> String {
    loaded
        .locations
        .get(i)
        .map_or_else(|| format!("example {}", i + 1), ToString::to_string)
}

/// `scores`, refused at the first NaN or infinite one: a head that computes those has
/// broken weights, and no accuracy, ordering or reward read from them means anything.
/// `row(i)` names the `i`-th score (its file and line).
pub(crate) fn finite_scores(scores: Vec<f64>, row: impl Fn(usize) -> String) -> Result<Vec<f64>> {
    match scores.iter().position(|s| !s.is_finite()) {
        None => Ok(scores),
        Some(i) => Err(TrainerError::Input(format!(
            "{} is {}: the model gives NaN or infinite scores, so its weights are broken",
            row(i),
            scores[i]
        ))),
    }
}

/// Accuracy over a subset of pairs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Accuracy {
    pub accuracy: f64,
    pub pairs: usize,
}

/// What `hearth eval preference` reports.
///
/// A pair the model scores equally (a zero margin) counts half, in `accuracy` and in every
/// dimension alike — as the win rate counts ties: a model that cannot tell the replies apart
/// is at chance, 0.5, not wrong and not right.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PreferenceReport {
    /// `reward_model` or `implicit_dpo`.
    pub source: &'static str,
    pub accuracy: f64,
    /// Pairs evaluated.
    pub pairs: usize,
    /// Pairs with a zero margin (each counted as half right).
    pub ties: usize,
    /// Pairs longer than `max_length`, evaluated cut to fit (the prompt's start first,
    /// then the replies' ends).
    pub truncated: usize,
    /// Pairs left out because a reply had no token left after cutting.
    pub dropped: usize,
    /// PsychoCounsel's rating dimensions (`chosen_<dim>_rating` / `rejected_<dim>_rating`,
    /// from every row): over the pairs whose two ratings differ on a dimension, how often
    /// the model orders them as that rating does.
    pub by_dimension: BTreeMap<String, Accuracy>,
}

/// Credit for one pair: 1 when the margin has the wanted sign, ½ when it is zero.
fn credit(margin: f64, chosen_better: bool) -> f64 {
    if margin == 0.0 {
        0.5
    } else if (margin > 0.0) == chosen_better {
        1.0
    } else {
        0.0
    }
}

/// A rating column of a pair's row: `None` when absent or null; a number, or a string that
/// holds one (as some exports write them); anything else names the row and the key.
fn rating(
    extra: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    at: impl Fn() -> String,
) -> Result<Option<f64>> {
    let v = match extra.get(key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let n = match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() => Ok(Some(n)),
        _ => Err(TrainerError::Input(format!(
            "{}: key `{key}` is {}; a rating is a number (or a string holding one)",
            at(),
            data::read::shown_value(v)
        ))),
    }
}

/// The rating dimensions named by any row's `chosen_<dim>_rating` or
/// `rejected_<dim>_rating` column.
fn dimensions(extras: &[&serde_json::Map<String, serde_json::Value>]) -> Vec<String> {
    let mut dims: Vec<String> = extras
        .iter()
        .flat_map(|x| x.keys())
        .filter_map(|k| {
            k.strip_prefix("chosen_")
                .or_else(|| k.strip_prefix("rejected_"))?
                .strip_suffix("_rating")
        })
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    dims.sort();
    dims.dedup();
    dims
}

/// Accuracy per rating dimension of the `margins` of pairs whose rows are `extras`
/// (`at(j)` names pair `j`'s row): over the pairs whose ratings differ, with ties counted
/// half. Dimensions where no pair's ratings differ are left out.
fn by_dimension(
    extras: &[&serde_json::Map<String, serde_json::Value>],
    margins: &[f64],
    at: impl Fn(usize) -> String,
) -> Result<BTreeMap<String, Accuracy>> {
    let mut out = BTreeMap::new();
    for dim in dimensions(extras) {
        let (mut agree, mut n) = (0.0, 0);
        for (j, (x, &d)) in extras.iter().zip(margins).enumerate() {
            let c = rating(x, &format!("chosen_{dim}_rating"), || at(j))?;
            let r = rating(x, &format!("rejected_{dim}_rating"), || at(j))?;
            if let (Some(c), Some(r)) = (c, r)
                && c != r
            {
                n += 1;
                agree += credit(d, c > r);
            }
        }
        if n > 0 {
            out.insert(
                dim,
                Accuracy {
                    accuracy: agree / n as f64,
                    pairs: n,
                },
            );
        }
    }
    Ok(out)
}

/// The per-pair margin the model assigns to chosen over rejected.
fn margins(
    model: &Llama,
    reference: Option<&Llama>,
    pairs: &[PairTokens],
    pad: u32,
    device: &Device,
    name: &dyn Fn(usize) -> String,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(pairs.len());
    for (c, chunk) in pairs.chunks(BATCH).enumerate() {
        let side = |p: &PairTokens| p.prompt.len() + p.chosen.len().max(p.rejected.len());
        let longest = chunk.iter().map(side).max().unwrap_or(0);
        if let Some(j) = chunk.iter().position(|p| side(p) == longest) {
            let which = name(c * BATCH + j);
            crate::model::mask::check_attention_size(2 * chunk.len(), longest, &which)?;
        }
        let refs: Vec<&PairTokens> = chunk.iter().collect();
        let batch = PairBatch::new(&refs, &[], pad, device);
        let n = batch.pairs;
        let diff = match reference {
            None => {
                let scores = reward_scores(model, &batch)
                    .ok_or_else(|| TrainerError::Input("the model has no score head".into()))?;
                let (c, r) = halves(scores, n);
                c - r
            }
            Some(reference) => {
                let policy = sequence_logps(model, &batch).completion;
                let base = sequence_logps(reference, &batch).completion;
                let (pc, pr) = halves(policy, n);
                let (rc, rr) = halves(base, n);
                (pc - rc) - (pr - rr)
            }
        };
        out.extend(values(diff));
    }
    Ok(out)
}

/// Every example of `loaded` with its extra columns, refused at the first that is not a
/// preference pair.
fn pair_rows<'a>(
    loaded: &'a data::Loaded,
    data_path: &Path,
) -> Result<Vec<(&'a Example, &'a serde_json::Map<String, serde_json::Value>)>> {
    loaded
        .examples
        .iter()
        .enumerate()
        .map(|(i, e)| match e {
            Example::Pair { extra, .. } => Ok((e, extra)),
            _ => Err(TrainerError::Input(format!(
                "{}: {}: expected a preference pair (`prompt`, `chosen`, `rejected`)",
                data_path.display(),
                location(loaded, i)
            ))),
        })
        .collect()
}

/// The chat template and tokenizer a model reads conversations with.
pub struct TextSide {
    pub template: data::template::ChatTemplate,
    pub tokenizer: tokenizers::Tokenizer,
}

impl TextSide {
    /// Each of `prompts` rendered with the template as a reward model scores it (followed
    /// by a reply), so that a prompt the template refuses fails before the replies it would
    /// judge are generated. `name(i)` says where prompt `i` came from.
    pub fn check_renders(
        &self,
        prompts: &[Vec<data::Message>],
        name: &dyn Fn(usize) -> String,
    ) -> Result<()> {
        for (i, prompt) in prompts.iter().enumerate() {
            let mut dialogue = prompt.clone();
            dialogue.push(data::Message::new("assistant", "reply"));
            self.template
                .render(&dialogue, false)
                .map_err(|e| TrainerError::Input(format!("{}: {e}", name(i))))?;
        }
        Ok(())
    }
}

/// The text side of `dir` (with `adapter`), found without loading any weights.
fn text_side(dir: &Path, adapter: Option<&Path>) -> Result<TextSide> {
    let config = checkpoints::ModelConfig::from_path(dir)?;
    let tokenizer = crate::model::load_tokenizer(dir, config.vocab_size)?;
    let template = template_for_tuned(dir, adapter, TemplateChoice::Shipped(None))?;
    Ok(TextSide {
        template,
        tokenizer,
    })
}

/// Pairs tokenised for [`preference_accuracy`], with the rows they came from and their
/// rating columns.
struct PairInputs {
    pairs: Vec<PairTokens>,
    rows: Vec<usize>,
    extras: Vec<serde_json::Map<String, serde_json::Value>>,
    counts: TruncationCounts,
    loaded: data::Loaded,
}

/// Reads, renders and tokenises the pairs in `data_path` as a model with `text` reads
/// them, and checks their rating columns, without loading any weights.
fn pair_inputs(text: &TextSide, data_path: &Path, max_length: usize) -> Result<PairInputs> {
    let t = Tokenizing {
        template: &text.template,
        tokenizer: &text.tokenizer,
        max_length,
        truncation: Truncation::KeepEnd,
    };
    let pairs_first = data::LoadOptions {
        pairs_first: true,
        ..Default::default()
    };
    let loaded = data::load_examples(data_path, &pairs_first)?;
    let (mut pairs, mut rows, mut extras) = (Vec::new(), Vec::new(), Vec::new());
    let mut counts = TruncationCounts::default();
    let at = |i: usize| format!("{}: {}", data_path.display(), location(&loaded, i));
    for (i, (e, extra)) in pair_rows(&loaded, data_path)?.into_iter().enumerate() {
        let tokenized = t
            .example(e, &mut counts)
            .map_err(|err| TrainerError::Input(format!("{}: {err}", at(i))))?;
        if let Some(Tokenized::Pair(p)) = tokenized {
            pairs.push(p);
            rows.push(i);
            extras.push(extra);
        }
    }
    if pairs.is_empty() {
        return Err(TrainerError::Input(format!(
            "{}: no pairs to evaluate",
            data_path.display()
        )));
    }
    // Ratings are read before the model runs, so a bad one fails at once.
    by_dimension(&extras, &vec![0.0; extras.len()], |j| at(rows[j]))?;
    let extras = extras.into_iter().cloned().collect();
    Ok(PairInputs {
        pairs,
        rows,
        extras,
        counts,
        loaded,
    })
}

/// Reads the pairs [`preference_accuracy`] would measure as a reward model with `text`
/// reads them, refusing a missing file, a row that is not a pair, one
/// the model's template or tokenizer cannot take, or a rating that is not a number: for a
/// caller that runs models first, so bad pairs fail before the hours of generating.
pub(crate) fn check_pairs(text: &TextSide, data_path: &Path, max_length: usize) -> Result<()> {
    pair_inputs(text, data_path, max_length).map(|_| ())
}

/// `hearth eval preference`: pairwise accuracy of a reward model (when the model has a
/// score head) or of an adapter's implicit DPO reward over its base, on `device`.
pub fn preference_accuracy(
    model_dir: &Path,
    adapter: Option<&Path>,
    data_path: &Path,
    max_length: usize,
    device: &Device,
) -> Result<PreferenceReport> {
    // A wrong score head is refused before anything is loaded.
    let reward = crate::model::reward_head(model_dir, adapter)?;
    if !reward && adapter.is_none() {
        return Err(TrainerError::Input(format!(
            "{}: not a reward model; for the implicit DPO reward pass the policy's --adapter \
             (its base is the reference)",
            model_dir.display()
        )));
    }
    // The pairs are read and tokenised before any weights are loaded.
    let PairInputs {
        pairs,
        rows,
        extras,
        counts,
        loaded,
    } = pair_inputs(&text_side(model_dir, adapter)?, data_path, max_length)?;
    let extras: Vec<_> = extras.iter().collect();
    let at = |i: usize| format!("{}: {}", data_path.display(), location(&loaded, i));
    let (config, model) = crate::model::load_tuned(model_dir, adapter, device)?;
    let pad = config.padding_id();
    let (source, reference) = if reward {
        ("reward_model", None)
    } else {
        ("implicit_dpo", Some(load_on(model_dir, None, device)?.0))
    };
    let m = finite_scores(
        margins(&model, reference.as_ref(), &pairs, pad, device, &|j| {
            at(rows[j])
        })?,
        |j| format!("{}: the margin of chosen over rejected", at(rows[j])),
    )?;
    Ok(PreferenceReport {
        source,
        accuracy: m.iter().map(|&d| credit(d, true)).sum::<f64>() / pairs.len() as f64,
        pairs: pairs.len(),
        ties: m.iter().filter(|&&d| d == 0.0).count(),
        truncated: counts.truncated,
        dropped: counts.dropped,
        by_dimension: by_dimension(&extras, &m, |j| at(rows[j]))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value, json};

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_zero_margin_counts_half_whichever_way_the_ratings_go() {
        assert_eq!(credit(0.0, true), 0.5);
        assert_eq!(credit(0.0, false), 0.5);
        assert_eq!(credit(-0.0, false), 0.5);
        assert_eq!(credit(0.3, true), 1.0);
        assert_eq!(credit(0.3, false), 0.0);
        assert_eq!(credit(-0.3, false), 1.0);
        assert_eq!(credit(-0.3, true), 0.0);
    }

    /// Dimensions come from every row, numeric strings count, ties count half, and pairs
    /// whose ratings are equal or missing on a dimension are not counted for it.
    #[test]
    fn dimensions_come_from_every_row_and_ties_count_half() {
        let rows = [
            // No rating at all on the first row: its dimensions must not decide.
            row(json!({})),
            row(json!({"chosen_empathy_rating": 5, "rejected_empathy_rating": 1})),
            row(
                json!({"chosen_empathy_rating": "4", "rejected_empathy_rating": " 2 ",
                       "chosen_safety_rating": 1, "rejected_safety_rating": 5}),
            ),
            row(
                json!({"chosen_empathy_rating": 2, "rejected_empathy_rating": 3,
                       "chosen_safety_rating": 3, "rejected_safety_rating": 3}),
            ),
            row(
                json!({"chosen_empathy_rating": 1, "rejected_empathy_rating": 4,
                       "rejected_safety_rating": 2, "chosen_safety_rating": null}),
            ),
            row(json!({"rejected_clarity_rating": 1})),
        ];
        let extras: Vec<&Map<String, Value>> = rows.iter().collect();
        let margins = [1.0, 0.5, 0.0, -2.0, 0.0, 3.0];
        let got = by_dimension(&extras, &margins, |j| format!("row {j}")).unwrap();
        // empathy: rows 1..4 differ; credit 1 (5>1, +), ½ (4>2, 0), 1 (2<3, −), ½ (1<4, 0).
        assert_eq!(
            got["empathy"],
            Accuracy {
                accuracy: 3.0 / 4.0,
                pairs: 4
            }
        );
        // safety: only row 2 differs (1<5) and its margin is 0: ½.
        assert_eq!(
            got["safety"],
            Accuracy {
                accuracy: 0.5,
                pairs: 1
            }
        );
        // clarity: never rated on both sides.
        assert!(!got.contains_key("clarity"));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_rating_that_is_not_a_number_names_the_row_and_key() {
        let said = json!("client says she was abused");
        for bad in [json!("five"), json!(true), json!([5]), json!("NaN"), said] {
            let rows = [
                row(json!({"chosen_empathy_rating": 5, "rejected_empathy_rating": 1})),
                row(json!({"chosen_empathy_rating": 5, "rejected_empathy_rating": bad})),
            ];
            let extras: Vec<&Map<String, Value>> = rows.iter().collect();
            let err = by_dimension(&extras, &[1.0, 1.0], |j| format!("p.jsonl: line {}", j + 3))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("p.jsonl: line 4: key `rejected_empathy_rating` is ")
                    && err.contains(&data::read::shown_value(&bad)),
                "{err}"
            );
            // A cell's words are never quoted: they may be a client's.
            assert!(!err.contains("abused"), "{err}");
        }
    }
}
