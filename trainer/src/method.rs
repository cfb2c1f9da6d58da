//! What differs between training methods: which examples they read, how those are batched,
//! and the loss of one micro-batch. The loop in [`crate::train`] owns everything else.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use data::Example;
use data::batch::{Batch, length_grouped_batches, shuffled};
use data::tokenize::{PairTokens, Sequence, Tokenized, Tokenizing, TruncationCounts};

use crate::batch::{LmBatch, PairBatch};
use crate::grpo::{GrpoSettings, PromptItem};
use crate::model::Llama;
use crate::objectives::dpo::{DpoLossType, PairLogps, dpo_loss};
use crate::objectives::orpo::orpo_loss;
use crate::objectives::reward::reward_loss;
use crate::objectives::sequences::{halves, reward_scores, sequence_logps};
use crate::objectives::sft::sft_loss;
use crate::objectives::{Metrics, values};
use crate::recipe::Recipe;
use crate::{Result, TrainerError};

/// A training method with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Sft,
    Dpo {
        loss_type: DpoLossType,
        beta: f64,
        label_smoothing: f64,
    },
    Orpo {
        lambda: f64,
        nll_completion_only: bool,
    },
    Reward {
        center_coefficient: f64,
    },
    Grpo(GrpoSettings),
}

impl Method {
    pub fn from_recipe(recipe: &Recipe) -> Result<Self> {
        Ok(match recipe.train.method.as_str() {
            "sft" => Method::Sft,
            "dpo" => {
                let d = recipe.dpo.clone().unwrap_or_default();
                Method::Dpo {
                    loss_type: d.loss_type.parse().map_err(TrainerError::Input)?,
                    beta: d.beta,
                    label_smoothing: d.label_smoothing,
                }
            }
            "orpo" => {
                let o = recipe.orpo.clone().unwrap_or_default();
                Method::Orpo {
                    lambda: o.lambda,
                    nll_completion_only: o.nll_completion_only,
                }
            }
            "reward" => Method::Reward {
                center_coefficient: recipe
                    .reward
                    .as_ref()
                    .map_or(0.0, |r| r.center_rewards_coefficient),
            },
            "grpo" => Method::Grpo(GrpoSettings::from_section(
                &recipe.grpo.clone().unwrap_or_default(),
            )?),
            other => {
                return Err(TrainerError::Input(format!(
                    "train.method `{other}` is not a method"
                )));
            }
        })
    }

    /// Whether the method learns from preference pairs.
    pub fn uses_pairs(&self) -> bool {
        matches!(
            self,
            Method::Dpo { .. } | Method::Orpo { .. } | Method::Reward { .. }
        )
    }

    /// Whether the method needs the reference policy (DPO; GRPO with a KL term).
    pub fn needs_reference(&self) -> bool {
        match self {
            Method::Dpo { .. } => true,
            Method::Grpo(g) => g.surrogate.beta > 0.0,
            _ => false,
        }
    }

    /// Micro-batches per optimizer step: GRPO's one micro-batch of prompts becomes all of
    /// the step's completions.
    pub fn micros_per_step(&self, gradient_accumulation_steps: usize) -> usize {
        match self {
            Method::Grpo(_) => 1,
            _ => gradient_accumulation_steps,
        }
    }

    /// Optimizer steps taken on each group of micro-batches.
    pub fn iterations(&self) -> usize {
        match self {
            Method::Grpo(g) => g.num_iterations,
            _ => 1,
        }
    }
}

/// A tokenised pair with what the objectives read beside it.
#[derive(Debug, Clone)]
pub struct PairItem {
    pub tokens: PairTokens,
    /// The reward margin column's value (0 without one).
    pub margin: f64,
    /// Precomputed reference log-probs of chosen and rejected, when cached.
    pub reference: Option<(f64, f64)>,
}

/// A tokenised data set.
#[derive(Debug, Clone)]
pub enum Examples {
    Sequences(Vec<Sequence>),
    Pairs(Vec<PairItem>),
    Prompts(Vec<PromptItem>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Sequences(s) => s.len(),
            Examples::Pairs(p) => p.len(),
            Examples::Prompts(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the examples being tokenised came from, so that an example that cannot be
/// tokenised is named by its file and line (or row); with `skip` (the recipe's
/// `skip_bad_rows`) it is counted and left out instead of stopping the run.
pub struct Rows<'a> {
    pub path: &'a Path,
    pub locations: &'a [data::read::Location],
    pub skip: bool,
}

impl Rows<'_> {
    fn located(&self, i: usize, msg: impl std::fmt::Display) -> TrainerError {
        match self.locations.get(i) {
            Some(at) => TrainerError::Input(format!("{}: {at}: {msg}", self.path.display())),
            None => {
                TrainerError::Input(format!("{}: example {}: {msg}", self.path.display(), i + 1))
            }
        }
    }

    /// `Ok(None)` for a bad example that is skipped, the located error otherwise.
    fn bad<T>(
        &self,
        i: usize,
        msg: impl std::fmt::Display,
        skipped: &mut usize,
    ) -> Result<Option<T>> {
        if self.skip {
            *skipped += 1;
            Ok(None)
        } else {
            Err(self.located(i, msg))
        }
    }
}

/// What tokenisation made of a file's examples, and how many it skipped as bad rows.
pub struct TokenizedSet {
    pub examples: Examples,
    pub skipped: usize,
    /// Pairs whose chosen and rejected completions are the same tokens: they teach nothing.
    pub identical_pairs: usize,
}

/// Tokenises `examples` into what `method` learns from. Examples of the wrong shape are an
/// error naming the method and the example's line; examples that cannot be rendered (no
/// assistant turn, a template that refuses them) are bad rows.
pub fn tokenize(
    method: &Method,
    t: &Tokenizing,
    examples: &[Example],
    rows: &Rows,
    margin_column: Option<&str>,
    counts: &mut TruncationCounts,
) -> Result<TokenizedSet> {
    if let Method::Grpo(_) = method {
        return tokenize_prompts(t, examples, rows, counts);
    }
    let mut seqs = Vec::new();
    let mut pairs = Vec::new();
    let mut skipped = 0;
    for (i, e) in examples.iter().enumerate() {
        let wrong =
            |what: &str| rows.located(i, format!("method `{}` needs {what}", method_name(method)));
        let tokenized = match t.example(e, counts) {
            Ok(tokenized) => tokenized,
            Err(err) => rows.bad(i, err, &mut skipped)?,
        };
        match tokenized {
            None => {}
            Some(Tokenized::Sequence(s)) if !method.uses_pairs() => seqs.push(s),
            Some(Tokenized::Pair(p)) if method.uses_pairs() => {
                let margin = match (margin_column, e) {
                    (Some(col), Example::Pair { extra, .. }) => {
                        match extra.get(col).and_then(|v| v.as_f64()) {
                            Some(m) => m,
                            None => {
                                let msg =
                                    format!("margin column `{col}` is missing or not a number");
                                rows.bad::<()>(i, msg, &mut skipped)?;
                                continue;
                            }
                        }
                    }
                    _ => 0.0,
                };
                pairs.push(PairItem {
                    tokens: p,
                    margin,
                    reference: None,
                });
            }
            Some(_) if method.uses_pairs() => {
                return Err(wrong("preference pairs (prompt/chosen/rejected)"));
            }
            Some(_) => return Err(wrong("conversations or prompt/completion data")),
        }
    }
    let identical_pairs = pairs
        .iter()
        .filter(|p| p.tokens.chosen == p.tokens.rejected)
        .count();
    let examples = if method.uses_pairs() {
        Examples::Pairs(pairs)
    } else {
        Examples::Sequences(seqs)
    };
    Ok(TokenizedSet {
        examples,
        skipped,
        identical_pairs,
    })
}

/// GRPO's prompts: prompt-only rows, or the prompts of preference pairs.
fn tokenize_prompts(
    t: &Tokenizing,
    examples: &[Example],
    rows: &Rows,
    counts: &mut TruncationCounts,
) -> Result<TokenizedSet> {
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, e) in examples.iter().enumerate() {
        let (prompt, extra) = match e {
            Example::Prompt { prompt, extra } | Example::Pair { prompt, extra, .. } => {
                (prompt, extra)
            }
            Example::Conversation { .. } => {
                return Err(rows.located(
                    i,
                    "method `grpo` needs prompts (a `prompt` column, without completions)",
                ));
            }
        };
        let as_prompt = Example::Prompt {
            prompt: prompt.clone(),
            extra: extra.clone(),
        };
        let tokenized = match t.example(&as_prompt, counts) {
            Ok(tokenized) => tokenized,
            Err(err) => rows.bad(i, err, &mut skipped)?,
        };
        if let Some(Tokenized::Prompt(ids)) = tokenized {
            out.push(PromptItem {
                ids,
                messages: prompt.clone(),
                extra: extra.clone(),
            });
        }
    }
    Ok(TokenizedSet {
        examples: Examples::Prompts(out),
        skipped,
        identical_pairs: 0,
    })
}

fn method_name(m: &Method) -> &'static str {
    match m {
        Method::Sft => "sft",
        Method::Dpo { .. } => "dpo",
        Method::Orpo { .. } => "orpo",
        Method::Reward { .. } => "reward",
        Method::Grpo(_) => "grpo",
    }
}

/// One micro-batch: rows for SFT, or indices of pairs.
#[derive(Debug, Clone)]
pub enum Micro {
    Lm(Batch),
    Pairs(Vec<usize>),
    /// GRPO: the prompts of one step.
    Prompts(Vec<usize>),
}

/// The training micro-batches of one epoch, in order: seeded and length-grouped, or packed
/// rows for SFT with packing.
pub fn epoch_micro_batches(
    recipe: &Recipe,
    examples: &Examples,
    epoch: usize,
    pad: u32,
) -> Result<Vec<Micro>> {
    let bs = recipe.train.per_device_train_batch_size;
    let seed = recipe.train.seed.wrapping_add(epoch as u64);
    match examples {
        Examples::Sequences(seqs) if recipe.data.packing => {
            let order = shuffled(seqs.len(), seed);
            let refs: Vec<&Sequence> = order.iter().map(|&i| &seqs[i]).collect();
            let packed = Batch::packed(&refs, recipe.data.max_length, pad)?;
            let rows: Vec<usize> = (0..packed.rows).collect();
            Ok(rows
                .chunks(bs)
                .map(|r| Micro::Lm(packed.select_rows(r)))
                .collect())
        }
        Examples::Sequences(seqs) => {
            let lengths: Vec<usize> = seqs.iter().map(Sequence::len).collect();
            Ok(length_grouped_batches(&lengths, bs, seed)
                .into_iter()
                .map(|idx| {
                    Micro::Lm(Batch::padded(
                        &idx.iter().map(|&i| &seqs[i]).collect::<Vec<_>>(),
                        pad,
                    ))
                })
                .collect())
        }
        Examples::Pairs(pairs) => {
            let lengths: Vec<usize> = pairs.iter().map(pair_len).collect();
            Ok(length_grouped_batches(&lengths, bs, seed)
                .into_iter()
                .map(Micro::Pairs)
                .collect())
        }
        Examples::Prompts(prompts) => {
            let g = recipe.grpo.as_ref().map_or(1, |g| g.num_generations).max(1);
            let per_step = (bs * recipe.train.gradient_accumulation_steps / g).max(1);
            Ok(shuffled(prompts.len(), seed)
                .chunks(per_step)
                .map(|c| Micro::Prompts(c.to_vec()))
                .collect())
        }
    }
}

fn pair_len(p: &PairItem) -> usize {
    p.tokens.prompt.len() + p.tokens.chosen.len().max(p.tokens.rejected.len())
}

/// Evaluation micro-batches: the set in order, `batch_size` at a time.
pub fn eval_micro_batches(examples: &Examples, batch_size: usize, pad: u32) -> Vec<Micro> {
    match examples {
        Examples::Sequences(seqs) => seqs
            .chunks(batch_size.max(1))
            .map(|c| Micro::Lm(Batch::padded(&c.iter().collect::<Vec<_>>(), pad)))
            .collect(),
        Examples::Pairs(pairs) => (0..pairs.len())
            .collect::<Vec<_>>()
            .chunks(batch_size.max(1))
            .map(<[usize]>::to_vec)
            .collect::<Vec<_>>()
            .into_iter()
            .map(Micro::Pairs)
            .collect(),
        // GRPO is judged by its rewards during training, not by an eval loss.
        Examples::Prompts(_) => Vec::new(),
    }
}

/// The DPO reference policy: the initial policy, held without a second copy of frozen
/// base weights (burn tensors are shared, so a clone of the base costs nothing).
pub struct Reference {
    /// On the training (autodiff) device, with no parameter taking a gradient, so nothing
    /// is recorded for backward. Not on the plain device: some ops run another
    /// implementation there (a backend's native softmax, say, where autodiff composes
    /// primitives), and the reference must give the policy's very bits while the two are
    /// equal: TRL's first DPO step has rewards of exactly 0.
    pub model: Llama,
    pub device: Device,
}

impl Reference {
    /// Summed completion log-probs of chosen and rejected for each pair.
    pub fn logps(&self, pairs: &[&PairTokens], pad: u32) -> Vec<(f64, f64)> {
        let batch = PairBatch::new(pairs, &[], pad, &self.device);
        let lp = values(sequence_logps(&self.model, &batch).completion);
        let n = pairs.len();
        (0..n).map(|i| (lp[i], lp[n + i])).collect()
    }
}

/// What one micro-batch contributes: its loss, its weight in the step (loss tokens for
/// SFT, pairs otherwise), its metrics and its real tokens.
pub struct MicroOutput {
    pub loss: Tensor<1>,
    pub weight: f64,
    pub metrics: Metrics,
    pub tokens: usize,
}

/// The loss of one micro-batch; `None` when it holds nothing to learn from.
#[allow(clippy::too_many_arguments)]
pub fn micro_loss(
    method: &Method,
    model: &Llama,
    micro: &Micro,
    examples: &Examples,
    reference: Option<&Reference>,
    pad: u32,
    device: &Device,
) -> Result<Option<MicroOutput>> {
    let (idx, pairs) = match (micro, examples) {
        (Micro::Lm(b), _) => {
            let lm = LmBatch::new(b, device);
            if lm.num_loss_tokens == 0 {
                return Ok(None);
            }
            let (loss, m) = sft_loss(model, &lm);
            let mut metrics = Metrics::default();
            metrics.mean("mean_token_accuracy", m.mean_token_accuracy);
            return Ok(Some(MicroOutput {
                loss,
                weight: lm.num_loss_tokens as f64,
                metrics,
                tokens: lm.num_tokens,
            }));
        }
        (Micro::Pairs(idx), Examples::Pairs(pairs)) => (idx, pairs),
        _ => {
            return Err(TrainerError::Input(format!(
                "internal: method `{}` got a micro-batch of another kind",
                method_name(method)
            )));
        }
    };
    if idx.is_empty() {
        return Ok(None);
    }
    let items: Vec<&PairItem> = idx.iter().map(|&i| &pairs[i]).collect();
    let tokens: Vec<&PairTokens> = items.iter().map(|p| &p.tokens).collect();
    let margins: Vec<f64> = items.iter().map(|p| p.margin).collect();
    let batch = PairBatch::new(&tokens, &margins, pad, device);
    let n = batch.pairs;
    let (loss, metrics) = match method {
        Method::Sft | Method::Grpo(_) => {
            return Err(TrainerError::Input(format!(
                "internal: method `{}` has no pair loss",
                method_name(method)
            )));
        }
        Method::Dpo {
            loss_type,
            beta,
            label_smoothing,
        } => {
            let reference_logps: Vec<(f64, f64)> = match items
                .iter()
                .map(|p| p.reference)
                .collect::<Option<Vec<_>>>()
            {
                Some(cached) => cached,
                None => reference
                    .ok_or_else(|| TrainerError::Input("internal: DPO without a reference".into()))?
                    .logps(&tokens, pad),
            };
            let lp = sequence_logps(model, &batch);
            let (c, r) = halves(lp.completion, n);
            let (cl, rl) = halves(batch.completion_len.clone(), n);
            let host = |f: fn(&(f64, f64)) -> f64| {
                let v: Vec<f32> = reference_logps.iter().map(|x| f(x) as f32).collect();
                Tensor::<1>::from_data(TensorData::new(v, [n]), device)
            };
            let policy = PairLogps {
                chosen: c,
                rejected: r,
                chosen_len: cl.clone(),
                rejected_len: rl.clone(),
            };
            let reference = PairLogps {
                chosen: host(|x| x.0),
                rejected: host(|x| x.1),
                chosen_len: cl,
                rejected_len: rl,
            };
            dpo_loss(*loss_type, *beta, *label_smoothing, &policy, &reference)
        }
        Method::Orpo {
            lambda,
            nll_completion_only,
        } => {
            let lp = sequence_logps(model, &batch);
            let (c, r) = halves(lp.completion.clone(), n);
            let (cl, rl) = halves(batch.completion_len.clone(), n);
            // NLL: token-mean cross-entropy over the chosen sequences of the batch.
            let (nll_sum, nll_count) = if *nll_completion_only {
                (c.clone(), cl.clone())
            } else {
                (
                    halves(lp.all, n).0,
                    halves(batch.predicted_len.clone(), n).0,
                )
            };
            let nll = nll_sum.sum().neg() / nll_count.sum();
            orpo_loss(*lambda, nll, c / cl, r / rl)
        }
        Method::Reward { center_coefficient } => {
            let scores = reward_scores(model, &batch).ok_or_else(|| {
                TrainerError::Input("internal: reward training without a score head".into())
            })?;
            let (c, r) = halves(scores, n);
            reward_loss(c, r, batch.margin.clone(), *center_coefficient)
        }
    };
    Ok(Some(MicroOutput {
        loss,
        weight: n as f64,
        metrics,
        tokens: batch.num_tokens,
    }))
}
