//! What GRPO adds to the shared loop: the rollout of a step (sample G completions per
//! prompt with the current policy, score them, turn rewards into advantages) and the
//! micro-batch losses over those completions. The loop still owns accumulation, clipping,
//! the schedule and checkpoints.

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use data::batch::Batch;
use data::tokenize::Sequence;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::GrpoSettings;
use super::loss::{TokenLayout, TokenTerms, advantages, aggregate, per_token_loss, token_mean};
use super::session::client::Client;
use super::session::rollout::{Counselor, play};
use super::session::score::score_sessions;
use super::session::{End, SessionRecord, SessionSettings};
use crate::Result;
use crate::batch::LmBatch;
use crate::dist::Group;
use crate::examples::PromptItem;
use crate::generate::{Completion, generate_groups_reporting};
use crate::model::Llama;
use crate::objectives::objective::MicroOutput;
use crate::objectives::reference::Reference;
use crate::objectives::{Metrics, TargetLogprobs, lm_logprobs_tempered, values};
use crate::rewards::{Column, Rewards, Sample};

/// One step's samples: G completions of each prompt, in prompt order, with everything
/// the loss needs. Saved in checkpoints taken between the iterations of `num_iterations`,
/// so a resumed run reuses exactly these samples.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rollouts {
    /// The prompt (index into the training prompts) of each completion.
    pub prompt: Vec<usize>,
    pub completions: Vec<Completion>,
    pub rewards: Vec<f64>,
    pub advantages: Vec<f64>,
    /// Per completion, the sampling policy's log-probs of its trained tokens (only when
    /// samples are reused over several iterations).
    pub old_logps: Option<Vec<Vec<f32>>>,
    /// Per completion, the reference's log-probs (only when β > 0).
    pub ref_logps: Option<Vec<Vec<f32>>>,
    /// Reward and completion metrics of the rollout.
    pub metrics: Vec<(String, f64)>,
    /// Session rollouts: the sessions, one per sample (`completions` is then empty).
    #[serde(default)]
    pub sessions: Vec<SessionRecord>,
}

impl Rollouts {
    /// Samples: completions, or sessions.
    pub fn len(&self) -> usize {
        self.rewards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rewards.is_empty()
    }

    /// Sample `i` as the policy saw and wrote it, with its trained tokens marked.
    pub fn sequence(&self, i: usize, prompts: &[PromptItem]) -> Sequence {
        match self.sessions.get(i) {
            Some(s) => Sequence {
                ids: s.ids.clone(),
                loss_mask: s.loss_mask.clone(),
            },
            None => {
                let p = &prompts[self.prompt[i]].ids;
                let c = self.completions[i].trained_tokens();
                let mut loss_mask = vec![0u8; p.len()];
                loss_mask.extend(std::iter::repeat_n(1u8, c.len()));
                Sequence {
                    ids: p.iter().chain(&c).copied().collect(),
                    loss_mask,
                }
            }
        }
    }

    /// Whether `max_completion_length` cut sample `i` (a session: any of its turns).
    pub fn truncated(&self, i: usize) -> bool {
        match self.sessions.get(i) {
            Some(s) => s.truncated_turns > 0,
            None => self.completions[i].stop.is_none(),
        }
    }

    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::default();
        for (name, v) in &self.metrics {
            m.mean(name.clone(), *v);
        }
        m
    }
}

const GATHER_REWARDS: &str = "gathering GRPO rewards";
const GATHER_LENGTHS: &str = "gathering GRPO completion lengths";
const GATHER_REWARD_COLUMNS: &str = "gathering GRPO reward scores";

/// The generator and scorer of a GRPO run.
pub struct Sampler {
    pub settings: GrpoSettings,
    pub rewards: Rewards,
    pub tokenizer: tokenizers::Tokenizer,
    /// Tokens that end a completion.
    pub stop: Vec<u32>,
    /// Session rollouts: the client and what scoring sessions needs.
    pub sessions: Option<Sessions>,
}

/// What session rollouts add to the sampler.
pub struct Sessions {
    pub settings: SessionSettings,
    pub client: Client,
    /// The policy's chat template, to render the turns between replies.
    pub template: data::ChatTemplate,
    /// Each reward's kind, in the order of the sampler's rewards.
    pub kinds: Vec<String>,
}

/// Sequences as one right-padded batch: flat `[N]` positions and targets of their trained
/// tokens, in order, and each sequence's trained-token count.
fn sequence_batch(seqs: &[Sequence], pad: u32, device: &Device) -> (LmBatch, Vec<usize>) {
    let batch = Batch::padded(&seqs.iter().collect::<Vec<_>>(), pad);
    let lens = seqs
        .iter()
        .map(|s| s.loss_mask.iter().skip(1).filter(|&&m| m == 1).count())
        .collect();
    (LmBatch::new(&batch, device), lens)
}

/// Per-completion host copies of flat per-token values.
fn split(flat: &[f64], lens: &[usize]) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &n in lens {
        out.push(flat[at..at + n].iter().map(|&x| x as f32).collect());
        at += n;
    }
    out
}

/// No-grad per-token log-probs of the trained tokens of every sequence under `model`,
/// `chunk` sequences at a time.
fn logps_of(
    model: &Llama,
    seqs: &[Sequence],
    chunk: usize,
    pad: u32,
    device: &Device,
    temperature: f64,
) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(seqs.len());
    for c in seqs.chunks(chunk.max(1)) {
        let (batch, lens) = sequence_batch(c, pad, device);
        let lp = lm_logprobs_tempered(model, &batch, temperature).logprobs;
        out.extend(split(&values(lp), &lens));
    }
    out
}

impl Sampler {
    /// Samples `num_generations` completions of each prompt in `idx` with `policy` (on the
    /// plain device), scores them and computes their advantages. The sampler is seeded by
    /// `seed` alone, so a resumed run draws the same completions.
    ///
    /// In a data-parallel run each rank samples its own prompts (whole groups), and the
    /// rewards of every rank are gathered before the advantages are computed, so batch-level
    /// scaling sees the global batch; a rank without prompts (a ragged last step) still
    /// takes part in that gather.
    #[allow(clippy::too_many_arguments)]
    pub fn rollout(
        &mut self,
        dp: &Group,
        policy: &Llama,
        reference: Option<&Reference>,
        prompts: &[PromptItem],
        idx: &[usize],
        seed: u64,
        micro_batch: usize,
        pad: u32,
        device: &Device,
        progress: &dyn Fn(&str, usize, usize),
    ) -> Result<Rollouts> {
        let g = self.settings.num_generations;
        if idx.is_empty() {
            dp.gather(&[], GATHER_REWARDS)?;
            dp.gather(&[], GATHER_REWARD_COLUMNS)?;
            dp.gather(&[], GATHER_LENGTHS)?;
            return Ok(Rollouts::default());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Each reward's own scores come back beside the rollouts, to be gathered below so
        // their metrics are the batch's.
        let (mut r, columns) = match self.sessions.as_mut() {
            Some(sessions) => {
                let started = Instant::now();
                let counselor = Counselor {
                    template: &sessions.template,
                    tokenizer: &self.tokenizer,
                    stop: &self.stop,
                    sampling: &self.settings.sampling,
                };
                let records = play(
                    policy,
                    &counselor,
                    &mut sessions.client,
                    &sessions.settings,
                    prompts,
                    idx,
                    g,
                    &mut rng,
                    device,
                    &|done, all| progress("sessions", done, all),
                )?;
                let seconds = started.elapsed().as_secs_f64();
                let extras: Vec<_> = records.iter().map(|s| &prompts[s.opening].extra).collect();
                let (rewards, columns) = score_sessions(
                    &mut self.rewards,
                    &sessions.kinds,
                    &records,
                    &extras,
                    sessions.settings.aggregate,
                )?;
                let metrics = session_metrics(&records, &rewards, seconds);
                let r = Rollouts {
                    prompt: records.iter().map(|s| s.opening).collect(),
                    rewards,
                    metrics,
                    sessions: records,
                    ..Rollouts::default()
                };
                (r, columns)
            }
            None => {
                let prompt: Vec<usize> = idx
                    .iter()
                    .flat_map(|&i| std::iter::repeat_n(i, g))
                    .collect();
                // Each prompt is run once; its G completions share its KV cache.
                let inputs: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].ids.clone()).collect();
                let completions = generate_groups_reporting(
                    policy,
                    &inputs,
                    g,
                    &self.stop,
                    &self.settings.sampling,
                    &mut rng,
                    device,
                    &|done, all| progress("completions", done, all),
                )?;
                let texts: Vec<String> = completions
                    .iter()
                    .map(|c| self.tokenizer.decode(&c.tokens, false).unwrap_or_default())
                    .collect();
                let samples: Vec<Sample<'_>> = prompt
                    .iter()
                    .zip(&texts)
                    .map(|(&i, text)| Sample {
                        prompt: &prompts[i].messages,
                        completion: text,
                        extra: &prompts[i].extra,
                    })
                    .collect();
                let (rewards, columns) = self.rewards.score_columns(&samples)?;
                let r = Rollouts {
                    prompt,
                    completions,
                    rewards,
                    ..Rollouts::default()
                };
                (r, columns)
            }
        };
        let everyone = dp.gather(&r.rewards, GATHER_REWARDS)?;
        // Each reward's mean and spread over the whole batch: every rank reports the same,
        // so the ranks' mean of them is exact (their spreads averaged were not).
        let whole = gather_columns(dp, &columns)?;
        let mut metrics = named(&self.rewards.metrics_of(&whole));
        metrics.append(&mut r.metrics);
        r.metrics = metrics;
        let first = everyone[..dp.rank()].iter().map(Vec::len).sum::<usize>();
        let (all_adv, adv_metrics) = advantages(&everyone.concat(), g, self.settings.scale_rewards);
        r.advantages = all_adv[first..first + r.rewards.len()].to_vec();

        let seqs: Vec<Sequence> = (0..r.len()).map(|i| r.sequence(i, prompts)).collect();
        // Scored as sampled: at the sampling temperature, as TRL does.
        let temperature = self.settings.sampling.temperature;
        r.old_logps = (self.settings.num_iterations > 1)
            .then(|| logps_of(policy, &seqs, micro_batch, pad, device, temperature));
        r.ref_logps = match (reference, self.settings.surrogate.beta > 0.0) {
            (Some(rf), true) => Some(logps_of(
                &rf.model,
                &seqs,
                micro_batch,
                pad,
                &rf.device,
                temperature,
            )),
            _ => None,
        };

        // Each sample's trained length and whether it ended on its own, from every rank:
        // the step's length metrics are of the whole batch, so every rank reports the same
        // value and the ranks' mean is exact (a min of per-rank mins averaged was not).
        let local: Vec<f64> = seqs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                let trained = s.loss_mask.iter().filter(|&&m| m == 1).count() as f64;
                [trained, f64::from(u8::from(!r.truncated(i)))]
            })
            .collect();
        let samples = dp.gather(&local, GATHER_LENGTHS)?.concat();
        let lengths: Vec<f64> = samples.chunks_exact(2).map(|s| s[0]).collect();
        let terminated: Vec<f64> = samples
            .chunks_exact(2)
            .filter(|s| s[1] == 1.0)
            .map(|s| s[0])
            .collect();
        let mut metrics = named(&adv_metrics);
        metrics.append(&mut r.metrics);
        let n = lengths.len().max(1) as f64;
        metrics.push((
            "completions/mean_length".into(),
            lengths.iter().sum::<f64>() / n,
        ));
        metrics.push((
            "completions/min_length".into(),
            lengths.iter().copied().fold(f64::INFINITY, f64::min),
        ));
        metrics.push((
            "completions/max_length".into(),
            lengths.iter().copied().fold(0.0, f64::max),
        ));
        metrics.push((
            "completions/clipped_ratio".into(),
            1.0 - terminated.len() as f64 / n,
        ));
        metrics.push((
            "completions/mean_terminated_length".into(),
            if terminated.is_empty() {
                0.0
            } else {
                terminated.iter().sum::<f64>() / terminated.len() as f64
            },
        ));
        r.metrics = metrics;
        Ok(r)
    }

    /// The step's micro-batch losses over `r`, `micro_batch` completions each.
    pub fn micro_losses(
        &self,
        model: &Llama,
        r: &Rollouts,
        prompts: &[PromptItem],
        micro_batch: usize,
        pad: u32,
        device: &Device,
    ) -> Result<Vec<MicroOutput>> {
        let s = &self.settings;
        let mut outs = Vec::new();
        let all: Vec<usize> = (0..r.len()).collect();
        for chunk in all.chunks(micro_batch.max(1)) {
            let seqs: Vec<Sequence> = chunk.iter().map(|&i| r.sequence(i, prompts)).collect();
            let (batch, lens) = sequence_batch(&seqs, pad, device);
            let total: usize = lens.iter().sum();
            let flat = |per_seq: &dyn Fn(usize, usize) -> f32| -> Tensor<1> {
                let mut v = Vec::with_capacity(total);
                for (k, &n) in lens.iter().enumerate() {
                    v.extend((0..n).map(|t| per_seq(k, t)));
                }
                Tensor::from_data(TensorData::new(v, [total]), device)
            };
            let TargetLogprobs {
                logprobs: logp,
                entropy,
                ..
            } = lm_logprobs_tempered(model, &batch, s.sampling.temperature);
            let old = match &r.old_logps {
                Some(o) => flat(&|k, t| o[chunk[k]][t]),
                None => logp.clone().detach(),
            };
            let reference = r.ref_logps.as_ref().map(|o| flat(&|k, t| o[chunk[k]][t]));
            let advantage = flat(&|k, _| r.advantages[chunk[k]] as f32);
            let counted: Vec<bool> = chunk
                .iter()
                .map(|&i| !(s.mask_truncated_completions && r.truncated(i)))
                .collect();
            let layout = TokenLayout::new(&lens, &counted, device);
            let terms = TokenTerms {
                logp,
                old,
                reference,
                advantage,
            };
            let (per_token, kl, low, high) = per_token_loss(&terms, s.surrogate);
            let (loss, weight) = aggregate(per_token, &layout, s.loss_type, self.max_tokens());
            let mut metrics = Metrics::default();
            if let Some(kl) = kl {
                metrics.mean("kl", token_mean(kl, &layout));
            }
            let region = low.clone() + high.clone();
            metrics.mean("clip_ratio/low_mean", token_mean(low, &layout));
            metrics.mean("clip_ratio/high_mean", token_mean(high, &layout));
            metrics.mean("clip_ratio/region_mean", token_mean(region, &layout));
            metrics.mean("entropy", token_mean(entropy, &layout));
            outs.push(MicroOutput {
                loss,
                weight,
                metrics,
                tokens: batch.num_tokens,
            });
        }
        Ok(outs)
    }

    /// Trained tokens a sample may hold at most: Dr. GRPO's constant normaliser.
    fn max_tokens(&self) -> usize {
        let turns = self.sessions.as_ref().map_or(1, |s| s.settings.max_turns);
        self.settings.sampling.max_new_tokens.saturating_mul(turns)
    }

    /// The rollout as `completions.jsonl` lines (only written when asked for): each
    /// completion with its prompt, or each whole session.
    pub fn completion_lines(
        &self,
        step: usize,
        r: &Rollouts,
        prompts: &[PromptItem],
    ) -> Vec<Value> {
        let messages = |m: &[data::Message]| {
            m.iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect::<Vec<_>>()
        };
        if !r.sessions.is_empty() {
            return r
                .sessions
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    json!({
                        "step": step,
                        "session": messages(&s.messages),
                        "turns": s.turns(),
                        "end": s.end.name(),
                        "reward": r.rewards[i],
                        "advantage": r.advantages[i],
                    })
                })
                .collect();
        }
        r.completions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "step": step,
                    "prompt": messages(&prompts[r.prompt[i]].messages),
                    "completion": self.tokenizer.decode(&c.tokens, false).unwrap_or_default(),
                    "reward": r.rewards[i],
                    "advantage": r.advantages[i],
                    "stopped": c.stop.is_some(),
                })
            })
            .collect()
    }
}

/// Metrics as (name, value) pairs.
/// Every rank's columns of scores, each rank's after the one before, in one collective:
/// a rank sends its columns end to end (`None` as NaN, which no checked score is), so its
/// part splits back into as many equal pieces as there are rewards.
fn gather_columns(dp: &Group, columns: &[Column]) -> Result<Vec<Column>> {
    let mine: Vec<f64> = columns
        .iter()
        .flatten()
        .map(|s| s.unwrap_or(f64::NAN))
        .collect();
    let mut whole: Vec<Column> = vec![Vec::new(); columns.len()];
    if columns.is_empty() {
        dp.gather(&mine, GATHER_REWARD_COLUMNS)?;
        return Ok(whole);
    }
    for part in dp.gather(&mine, GATHER_REWARD_COLUMNS)? {
        let n = part.len() / columns.len();
        for (column, piece) in whole.iter_mut().zip(part.chunks(n.max(1))) {
            column.extend(piece.iter().map(|&s| (!s.is_nan()).then_some(s)));
        }
    }
    Ok(whole)
}

fn named(m: &Metrics) -> Vec<(String, f64)> {
    m.0.iter().map(|(n, v, _)| (n.to_string(), *v)).collect()
}

/// Session shapes: turns, tokens, reward per turn, how sessions ended, and session tokens
/// (counselor and client) generated per second of the rollout.
fn session_metrics(
    sessions: &[SessionRecord],
    rewards: &[f64],
    seconds: f64,
) -> Vec<(String, f64)> {
    let n = sessions.len().max(1) as f64;
    let mean = |f: &dyn Fn(usize, &SessionRecord) -> f64| {
        sessions
            .iter()
            .enumerate()
            .map(|(i, s)| f(i, s))
            .sum::<f64>()
            / n
    };
    let generated: usize = sessions.iter().map(|s| s.trained() + s.client_tokens).sum();
    let mut out = vec![
        ("session/turns".to_string(), mean(&|_, s| s.turns() as f64)),
        (
            "session/tokens".to_string(),
            mean(&|_, s| s.ids.len() as f64),
        ),
        (
            "session/client_tokens".to_string(),
            mean(&|_, s| s.client_tokens as f64),
        ),
        (
            "session/reward_per_turn".to_string(),
            mean(&|i, s| rewards[i] / s.turns().max(1) as f64),
        ),
        (
            "session/tokens_per_second".to_string(),
            generated as f64 / seconds.max(1e-9),
        ),
    ];
    for end in [End::MaxTurns, End::Client, End::Length] {
        out.push((
            format!("session/ended_{}", end.name()),
            mean(&|_, s| f64::from(u8::from(s.end == end))),
        ));
    }
    out
}
