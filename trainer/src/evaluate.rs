//! Reading a trained model's preferences: reward-model scores for conversations, and
//! pairwise accuracy on held-out pairs — from a reward model's scores, or from the implicit
//! DPO reward `β(log π(y|x) − log πref(y|x))` of an adapter over its base.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use data::Example;
use data::render::{TemplateChoice, template_for};
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

/// Scores at each sequence's last non-pad token, `batch` sequences at a time.
pub fn score_sequences(
    model: &Llama,
    seqs: &[Vec<u32>],
    pad: u32,
    device: &Device,
) -> Result<Vec<f64>> {
    let score = model.score.as_ref().ok_or_else(|| {
        TrainerError::Input(
            "the model has no score head: pass a reward model (a *ForSequenceClassification \
             checkpoint) or a SEQ_CLS adapter"
                .into(),
        )
    })?;
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(BATCH) {
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
}

impl RewardScorer {
    /// The reward model in `dir` (a classifier checkpoint, or a base with a SEQ_CLS
    /// adapter); refused when it has no score head.
    pub fn load(dir: &Path, adapter: Option<&Path>) -> Result<Self> {
        Self::check(dir, adapter)?;
        let (model, pad, tokenizer) = load_on(dir, adapter, &Device::flex())?;
        let template = template_for(dir, TemplateChoice::Shipped(None))?;
        Ok(Self {
            model,
            pad,
            tokenizer,
            template,
        })
    }

    /// Refuses, from the config and the adapter's header alone, a model without a reward
    /// model's one-label score head.
    pub fn check(dir: &Path, adapter: Option<&Path>) -> Result<()> {
        if crate::model::reward_head(dir, adapter)? {
            return Ok(());
        }
        Err(TrainerError::Input(format!(
            "{}: the model has no score head: pass a reward model (a \
             *ForSequenceClassification checkpoint) or a SEQ_CLS adapter",
            dir.display()
        )))
    }

    /// One score per conversation, in order.
    pub fn score(&self, conversations: &[Vec<data::Message>]) -> Result<Vec<f64>> {
        let mut seqs = Vec::with_capacity(conversations.len());
        for messages in conversations {
            let text = self.template.render(messages, false)?;
            seqs.push(data::chat::encode(&self.tokenizer, &text)?);
        }
        score_sequences(&self.model, &seqs, self.pad, &Device::flex())
    }
}

/// `hearth reward score`: reads `{"messages": [...]}` lines, writes one `{"score": x}` line
/// per input line, in order. Returns how many were scored.
pub fn score_file(
    model_dir: &Path,
    adapter: Option<&Path>,
    input: &Path,
    out: &Path,
) -> Result<usize> {
    let mut inputs = vec![model_dir, input];
    inputs.extend(adapter);
    checkpoints::guard::check_output_file(out, &inputs)?;
    let scorer = RewardScorer::load(model_dir, adapter)?;
    let loaded = data::load_examples(input, &Default::default())?;
    let mut conversations = Vec::with_capacity(loaded.examples.len());
    for (i, e) in loaded.examples.iter().enumerate() {
        let Example::Conversation { messages, .. } = e else {
            return Err(TrainerError::Input(format!(
                "{}: line {}: expected a conversation (`messages`)",
                input.display(),
                i + 1
            )));
        };
        conversations.push(messages.clone());
    }
    let scores = finite_scores(scorer.score(&conversations)?, |i| {
        format!("{}: {}: the score", input.display(), location(&loaded, i))
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
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PreferenceReport {
    /// `reward_model` or `implicit_dpo`.
    pub source: &'static str,
    pub accuracy: f64,
    pub pairs: usize,
    /// PsychoCounsel's rating dimensions: over the pairs whose two ratings differ on a
    /// dimension, how often the model orders them as that rating does.
    pub by_dimension: BTreeMap<String, Accuracy>,
}

/// The per-pair margin the model assigns to chosen over rejected.
fn margins(
    model: &Llama,
    reference: Option<&Llama>,
    pairs: &[PairTokens],
    pad: u32,
) -> Result<Vec<f64>> {
    let device = Device::flex();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(BATCH) {
        let refs: Vec<&PairTokens> = chunk.iter().collect();
        let batch = PairBatch::new(&refs, &[], pad, &device);
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

/// `hearth eval preference`: pairwise accuracy of a reward model (when the model has a
/// score head) or of an adapter's implicit DPO reward over its base.
pub fn preference_accuracy(
    model_dir: &Path,
    adapter: Option<&Path>,
    data_path: &Path,
    max_length: usize,
) -> Result<PreferenceReport> {
    // A wrong score head is refused before anything is loaded.
    let reward = crate::model::reward_head(model_dir, adapter)?;
    let (model, pad, tokenizer) = load_on(model_dir, adapter, &Device::flex())?;
    let template = template_for(model_dir, TemplateChoice::Shipped(None))?;
    let t = Tokenizing {
        template: &template,
        tokenizer: &tokenizer,
        max_length,
        truncation: Truncation::KeepEnd,
    };
    let loaded = data::load_examples(data_path, &Default::default())?;
    let mut pairs = Vec::new();
    let mut rows = Vec::new();
    let mut extras = Vec::new();
    let mut counts = TruncationCounts::default();
    for (i, e) in loaded.examples.iter().enumerate() {
        let Example::Pair { extra, .. } = e else {
            return Err(TrainerError::Input(format!(
                "{}: example {}: expected a preference pair",
                data_path.display(),
                i + 1
            )));
        };
        if let Some(Tokenized::Pair(p)) = t.example(e, &mut counts)? {
            pairs.push(p);
            rows.push(i);
            extras.push(extra.clone());
        }
    }
    if pairs.is_empty() {
        return Err(TrainerError::Input(format!(
            "{}: no pairs to evaluate",
            data_path.display()
        )));
    }
    let (source, reference) = if reward {
        ("reward_model", None)
    } else if adapter.is_some() {
        (
            "implicit_dpo",
            Some(load_on(model_dir, None, &Device::flex())?.0),
        )
    } else {
        return Err(TrainerError::Input(format!(
            "{}: not a reward model; for the implicit DPO reward pass the policy's --adapter \
             (its base is the reference)",
            model_dir.display()
        )));
    };
    let m = finite_scores(margins(&model, reference.as_ref(), &pairs, pad)?, |j| {
        format!(
            "{}: {}: the margin of chosen over rejected",
            data_path.display(),
            location(&loaded, rows[j])
        )
    })?;
    let wins = m.iter().filter(|&&d| d > 0.0).count();
    let mut by_dimension = BTreeMap::new();
    let dims: Vec<String> = extras
        .first()
        .map(|x| {
            x.keys()
                .filter_map(|k| k.strip_prefix("chosen_")?.strip_suffix("_rating"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for dim in dims {
        let (mut agree, mut n) = (0, 0);
        for (x, d) in extras.iter().zip(&m) {
            let rating = |side: &str| {
                x.get(&format!("{side}_{dim}_rating"))
                    .and_then(|v| v.as_f64())
            };
            if let (Some(c), Some(r)) = (rating("chosen"), rating("rejected"))
                && c != r
            {
                n += 1;
                if (c > r) == (*d > 0.0) {
                    agree += 1;
                }
            }
        }
        if n > 0 {
            by_dimension.insert(
                dim,
                Accuracy {
                    accuracy: agree as f64 / n as f64,
                    pairs: n,
                },
            );
        }
    }
    Ok(PreferenceReport {
        source,
        accuracy: wins as f64 / pairs.len() as f64,
        pairs: pairs.len(),
        by_dimension,
    })
}
