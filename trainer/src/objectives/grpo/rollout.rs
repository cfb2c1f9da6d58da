//! What GRPO adds to the shared loop: the rollout of a step (sample G completions per
//! prompt with the current policy, score them, turn rewards into advantages) and the
//! micro-batch losses over those completions. The loop still owns accumulation, clipping,
//! the schedule and checkpoints.

use burn::tensor::{Device, Tensor, TensorData};
use data::batch::Batch;
use data::tokenize::Sequence;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::GrpoSettings;
use super::loss::{TokenLayout, TokenTerms, advantages, aggregate, per_token_loss, token_mean};
use crate::Result;
use crate::batch::LmBatch;
use crate::dist::Group;
use crate::examples::PromptItem;
use crate::generate::{Completion, generate_groups};
use crate::model::Llama;
use crate::objectives::objective::MicroOutput;
use crate::objectives::reference::Reference;
use crate::objectives::sft::LOGPROB_CHUNK;
use crate::objectives::{Metrics, TargetLogprobs, lm_logprobs, values};
use crate::rewards::{Rewards, Sample};

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
}

impl Rollouts {
    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::default();
        for (name, v) in &self.metrics {
            m.mean(name.clone(), *v);
        }
        m
    }
}

const GATHER_REWARDS: &str = "gathering GRPO rewards";

/// The generator and scorer of a GRPO run.
pub struct Sampler {
    pub settings: GrpoSettings,
    pub rewards: Rewards,
    pub tokenizer: tokenizers::Tokenizer,
    /// Tokens that end a completion.
    pub stop: Vec<u32>,
}

/// The loss tokens of `completions` after their prompts, as one right-padded batch: flat
/// `[N]` positions and targets in completion order, and each completion's token count.
fn completion_batch(
    prompts: &[&[u32]],
    completions: &[Vec<u32>],
    pad: u32,
    device: &Device,
) -> (LmBatch, Vec<usize>) {
    let seqs: Vec<Sequence> = prompts
        .iter()
        .zip(completions)
        .map(|(p, c)| {
            let mut ids = p.to_vec();
            ids.extend(c);
            let mut loss_mask = vec![0u8; p.len()];
            loss_mask.extend(std::iter::repeat_n(1u8, c.len()));
            Sequence { ids, loss_mask }
        })
        .collect();
    let batch = Batch::padded(&seqs.iter().collect::<Vec<_>>(), pad);
    (
        LmBatch::new(&batch, device),
        completions.iter().map(Vec::len).collect(),
    )
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

/// No-grad per-token log-probs of every completion under `model`, `chunk` at a time.
fn logps_of(
    model: &Llama,
    prompts: &[&[u32]],
    completions: &[Vec<u32>],
    chunk: usize,
    pad: u32,
    device: &Device,
) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(completions.len());
    for (p, c) in prompts.chunks(chunk).zip(completions.chunks(chunk)) {
        let (batch, lens) = completion_batch(p, c, pad, device);
        let lp = lm_logprobs(model, &batch).logprobs;
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
    ) -> Result<Rollouts> {
        let g = self.settings.num_generations;
        if idx.is_empty() {
            dp.gather(&[], GATHER_REWARDS)?;
            return Ok(Rollouts::default());
        }
        let prompt: Vec<usize> = idx
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, g))
            .collect();
        // Each prompt is run once; its G completions share its KV cache.
        let inputs: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].ids.clone()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let completions = generate_groups(
            policy,
            &inputs,
            g,
            &self.stop,
            &self.settings.sampling,
            &mut rng,
            device,
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
        let (rewards, reward_metrics) = self.rewards.score(&samples)?;
        let everyone = dp.gather(&rewards, GATHER_REWARDS)?;
        let first = everyone[..dp.rank()].iter().map(Vec::len).sum::<usize>();
        let (all_adv, adv_metrics) = advantages(&everyone.concat(), g, self.settings.scale_rewards);
        let adv = all_adv[first..first + rewards.len()].to_vec();

        let trained: Vec<Vec<u32>> = completions.iter().map(Completion::trained_tokens).collect();
        let prompt_ids: Vec<&[u32]> = prompt.iter().map(|&i| prompts[i].ids.as_slice()).collect();
        let old_logps = (self.settings.num_iterations > 1)
            .then(|| logps_of(policy, &prompt_ids, &trained, micro_batch, pad, device));
        let ref_logps = match (reference, self.settings.surrogate.beta > 0.0) {
            (Some(r), true) => Some(logps_of(
                &r.model,
                &prompt_ids,
                &trained,
                micro_batch,
                pad,
                &r.device,
            )),
            _ => None,
        };

        let lengths: Vec<f64> = trained.iter().map(|t| t.len() as f64).collect();
        let terminated: Vec<f64> = trained
            .iter()
            .zip(&completions)
            .filter(|(_, c)| c.stop.is_some())
            .map(|(t, _)| t.len() as f64)
            .collect();
        let mut metrics: Vec<(String, f64)> = Vec::new();
        for (n, v, _) in adv_metrics.0.iter().chain(&reward_metrics.0) {
            metrics.push((n.to_string(), *v));
        }
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
        Ok(Rollouts {
            prompt,
            completions,
            rewards,
            advantages: adv,
            old_logps,
            ref_logps,
            metrics,
        })
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
        let all: Vec<usize> = (0..r.completions.len()).collect();
        for chunk in all.chunks(micro_batch.max(1)) {
            let trained: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| r.completions[i].trained_tokens())
                .collect();
            let prompt_ids: Vec<&[u32]> = chunk
                .iter()
                .map(|&i| prompts[r.prompt[i]].ids.as_slice())
                .collect();
            let (batch, lens) = completion_batch(&prompt_ids, &trained, pad, device);
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
                rows,
                head,
                ..
            } = lm_logprobs(model, &batch);
            let old = match &r.old_logps {
                Some(o) => flat(&|k, t| o[chunk[k]][t]),
                None => logp.clone().detach(),
            };
            let reference = r.ref_logps.as_ref().map(|o| flat(&|k, t| o[chunk[k]][t]));
            let advantage = flat(&|k, _| r.advantages[chunk[k]] as f32);
            let counted: Vec<bool> = chunk
                .iter()
                .map(|&i| !(s.mask_truncated_completions && r.completions[i].stop.is_none()))
                .collect();
            let layout = TokenLayout::new(&lens, &counted, device);
            let terms = TokenTerms {
                logp,
                old,
                reference,
                advantage,
            };
            let (per_token, kl, low, high) = per_token_loss(&terms, s.surrogate);
            let (loss, weight) =
                aggregate(per_token, &layout, s.loss_type, s.sampling.max_new_tokens);
            let mut metrics = Metrics::default();
            if let Some(kl) = kl {
                metrics.mean("kl", token_mean(kl, &layout));
            }
            let region = low.clone() + high.clone();
            metrics.mean("clip_ratio/low_mean", token_mean(low, &layout));
            metrics.mean("clip_ratio/high_mean", token_mean(high, &layout));
            metrics.mean("clip_ratio/region_mean", token_mean(region, &layout));
            let entropy = kernels::token_entropy(rows, &head, LOGPROB_CHUNK);
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

    /// The rollout as `completions.jsonl` lines (only written when asked for).
    pub fn completion_lines(
        &self,
        step: usize,
        r: &Rollouts,
        prompts: &[PromptItem],
    ) -> Vec<Value> {
        r.completions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "step": step,
                    "prompt": prompts[r.prompt[i]].messages.iter()
                        .map(|m| json!({"role": m.role, "content": m.content}))
                        .collect::<Vec<_>>(),
                    "completion": self.tokenizer.decode(&c.tokens, false).unwrap_or_default(),
                    "reward": r.rewards[i],
                    "advantage": r.advantages[i],
                    "stopped": c.stop.is_some(),
                })
            })
            .collect()
    }
}
