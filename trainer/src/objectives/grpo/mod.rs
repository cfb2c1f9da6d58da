//! GRPO: each step samples `num_generations` completions of its prompts with the current
//! policy, scores them with the recipe's rewards and trains on the clipped surrogate of
//! their group-normalised advantages. [`loss`] holds the formulas, [`rollout`] the sampling
//! and scoring; this file is the objective the loop sees.

pub mod loss;
pub mod rollout;
pub mod session;

use burn::module::Module;
use data::batch::shuffled;
use data::render::{TemplateChoice, template_for};
use serde::{Deserialize, Serialize};

pub use loss::{GrpoLossType, ScaleRewards, Surrogate};
pub use rollout::Rollouts;
pub use session::{ClientSection, SessionSettings};

use super::objective::{LossInput, MicroOutput, Objective, Prepare, StepInput, StepLosses};
use crate::examples::{Batching, Examples, Micro, Shape};
use crate::generate::Sampling;
use crate::objectives::fits_f32;
use crate::recipe::Recipe;
use crate::rewards::{RewardContext, RewardSpec, Rewards};
use crate::{Result, TrainerError};

/// GRPO's sampled completions, written only with `grpo.log_completions`.
pub use checkpoints::run_dir::COMPLETIONS_FILE;

/// The most optimizer steps one rollout may take (`grpo.num_iterations`; TRL's μ is 1
/// to a few): a step count past it only overflows the schedule.
pub const MAX_ITERATIONS: usize = 1024;

/// `[grpo]`, with TRL's names. A step generates `per_device_train_batch_size ×
/// gradient_accumulation_steps` completions: that many ÷ `num_generations` prompts, each
/// sampled `num_generations` times; micro-batches hold `per_device_train_batch_size`
/// completions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// G, completions per prompt.
    pub num_generations: usize,
    /// New tokens per completion at most.
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 turns top-k off.
    pub top_k: usize,
    /// The KL weight; 0 skips the KL term and the reference model.
    pub beta: f64,
    /// ε_low of the clip.
    pub epsilon: f64,
    /// ε_high of the clip (DAPO's clip-higher); defaults to `epsilon`.
    pub epsilon_high: Option<f64>,
    /// grpo, bnpo, dr_grpo or dapo.
    pub loss_type: String,
    /// group, batch or none.
    pub scale_rewards: String,
    /// Optimizer steps per generation batch (μ); old log-probs are stored when > 1.
    pub num_iterations: usize,
    /// Leave completions cut off by `max_completion_length` out of the loss.
    pub mask_truncated_completions: bool,
    /// Write prompts, completions and rewards to `completions.jsonl` in the run directory.
    /// Off by default: counseling data is sensitive.
    pub log_completions: bool,
    /// The rewards, weighted: `[[grpo.rewards]]` tables.
    pub rewards: Vec<RewardSpec>,
    /// `single` (one reply per prompt) or `session` (whole sessions against a simulated
    /// client, `[grpo.client]`).
    pub rollout: String,
    /// Sessions: counselor turns per session at most.
    pub max_turns: usize,
    /// Sessions: a session ends before a counselor turn that could take its tokens past
    /// this many.
    pub max_session_tokens: usize,
    /// Sessions: how per-turn rewards become the session's (mean, last, min, sum).
    pub aggregate: String,
    /// Sessions: who plays the client.
    pub client: Option<ClientSection>,
}

impl Default for GrpoSection {
    fn default() -> Self {
        Self {
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: "dapo".into(),
            scale_rewards: "group".into(),
            num_iterations: 1,
            mask_truncated_completions: false,
            log_completions: false,
            rewards: Vec::new(),
            rollout: "single".into(),
            max_turns: 4,
            max_session_tokens: 1024,
            aggregate: "mean".into(),
            client: None,
        }
    }
}

/// GRPO's settings, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoSettings {
    pub num_generations: usize,
    pub sampling: Sampling,
    pub surrogate: Surrogate,
    pub loss_type: GrpoLossType,
    pub scale_rewards: ScaleRewards,
    pub num_iterations: usize,
    pub mask_truncated_completions: bool,
    pub log_completions: bool,
    /// Session rollouts, when `rollout = "session"`.
    pub session: Option<SessionSettings>,
}

impl GrpoSettings {
    /// The section's settings, each checked; `per_step` is the completions of one step.
    pub fn from_section(g: &GrpoSection, per_step: usize) -> std::result::Result<Self, String> {
        if g.num_generations < 2 {
            return Err(format!(
                "grpo.num_generations {} must be at least 2: advantages compare completions of one prompt",
                g.num_generations
            ));
        }
        if !per_step.is_multiple_of(g.num_generations) {
            return Err(format!(
                "grpo.num_generations {} must divide per_device_train_batch_size × gradient_accumulation_steps = {per_step}",
                g.num_generations
            ));
        }
        if g.max_completion_length == 0 || g.num_iterations == 0 {
            return Err(
                "grpo.max_completion_length and grpo.num_iterations must be positive".into(),
            );
        }
        if g.num_iterations > MAX_ITERATIONS {
            return Err(format!(
                "grpo.num_iterations {} is more than {MAX_ITERATIONS} (steps per rollout)",
                g.num_iterations
            ));
        }
        let eps_high = g.epsilon_high.unwrap_or(g.epsilon);
        if !(g.epsilon >= 0.0 && g.epsilon < 1.0 && eps_high >= 0.0 && fits_f32(eps_high)) {
            return Err(format!(
                "grpo.epsilon {} must be in [0, 1) and epsilon_high {eps_high} non-negative",
                g.epsilon
            ));
        }
        if !(g.beta >= 0.0 && fits_f32(g.beta)) {
            return Err(format!(
                "grpo.beta {} must be non-negative (and within f32)",
                crate::recipe::shown(g.beta)
            ));
        }
        let sampling_ok =
            crate::generate::usable_temperature(g.temperature) && g.top_p > 0.0 && g.top_p <= 1.0;
        if !sampling_ok {
            return Err(format!(
                "grpo.temperature {} must be 0 (greedy) or from {} (and within f32), and \
                 top_p {} in (0, 1]",
                crate::recipe::shown(g.temperature),
                crate::generate::MIN_TEMPERATURE,
                g.top_p
            ));
        }
        crate::rewards::check_specs(&g.rewards)?;
        let session = match g.rollout.as_str() {
            "single" => {
                if g.client.is_some() {
                    return Err(
                        "[grpo.client] plays the client of session rollouts; set grpo.rollout = \"session\""
                            .into(),
                    );
                }
                let unset = GrpoSection::default();
                let session_only = [
                    ("max_turns", g.max_turns != unset.max_turns),
                    (
                        "max_session_tokens",
                        g.max_session_tokens != unset.max_session_tokens,
                    ),
                    ("aggregate", g.aggregate != unset.aggregate),
                ];
                if let Some((key, _)) = session_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "grpo.{key} shapes session rollouts, which a single-turn run does not \
                         make; set grpo.rollout = \"session\" or drop it"
                    ));
                }
                None
            }
            "session" => Some(SessionSettings::new(
                g.max_turns,
                g.max_session_tokens,
                &g.aggregate,
                g.client.as_ref(),
            )?),
            other => {
                return Err(format!(
                    "grpo.rollout `{other}` is not one of single, session"
                ));
            }
        };
        Ok(Self {
            num_generations: g.num_generations,
            sampling: Sampling {
                max_new_tokens: g.max_completion_length,
                temperature: g.temperature,
                top_k: g.top_k,
                top_p: g.top_p,
                seed: 0,
            },
            surrogate: Surrogate {
                epsilon_low: g.epsilon,
                epsilon_high: eps_high,
                beta: g.beta,
            },
            loss_type: g.loss_type.parse()?,
            scale_rewards: g.scale_rewards.parse()?,
            num_iterations: g.num_iterations,
            mask_truncated_completions: g.mask_truncated_completions,
            log_completions: g.log_completions,
            session,
        })
    }
}

/// GRPO with its settings, its sampler once prepared, and the samples its steps reuse.
pub struct Grpo {
    settings: GrpoSettings,
    rewards: Vec<RewardSpec>,
    /// `data.template`: the built-in template the data is rendered with, if any.
    template: Option<String>,
    /// Whether the run trains adapters on a frozen base (which a model client can share).
    trains_adapters: bool,
    sampler: Option<rollout::Sampler>,
    /// The latest rollout, kept across the `num_iterations` steps that reuse it.
    rollouts: Option<Rollouts>,
}

/// The registry's constructor: the `[grpo]` section (or its defaults), checked.
pub fn build(recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    let g = recipe.grpo.clone().unwrap_or_default();
    let t = &recipe.train;
    let per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps;
    Ok(Box::new(Grpo {
        settings: GrpoSettings::from_section(&g, per_step)?,
        rewards: g.rewards,
        template: recipe.data.template.clone(),
        trains_adapters: recipe.lora.is_some(),
        sampler: None,
        rollouts: None,
    }))
}

impl Objective for Grpo {
    fn finish(&mut self) -> Result<()> {
        let Some(sampler) = &mut self.sampler else {
            return Ok(());
        };
        let rewards = sampler.rewards.finish();
        let client = match &mut sampler.sessions {
            Some(s) => s.client.finish(),
            None => Ok(()),
        };
        rewards.and(client)
    }

    fn name(&self) -> &'static str {
        "grpo"
    }

    fn shape(&self) -> Shape {
        match self.settings.session {
            Some(_) => Shape::Openings,
            None => Shape::Prompts,
        }
    }

    fn needs_reference(&self) -> bool {
        self.settings.surrogate.beta > 0.0
    }

    /// One micro-batch of prompts per rank becomes all of the step's completions.
    fn micros_per_step(&self, _accumulation: usize) -> usize {
        1
    }

    fn iterations(&self) -> usize {
        self.settings.num_iterations
    }

    fn has_rollouts(&self) -> bool {
        true
    }

    /// The prompts of each step, shuffled: `batch × accumulation ÷ G` of them.
    fn epoch_batches(&self, examples: &Examples, b: &Batching, epoch: usize) -> Result<Vec<Micro>> {
        let Examples::Prompts(prompts) = examples else {
            return Err(TrainerError::Input(
                "internal: method `grpo` got examples other than prompts".into(),
            ));
        };
        let g = self.settings.num_generations.max(1);
        let per_step = (b.batch_size * b.accumulation / g).max(1);
        Ok(shuffled(prompts.len(), b.seed.wrapping_add(epoch as u64))
            .chunks(per_step)
            .map(|c| Micro::Prompts(c.to_vec()))
            .collect())
    }

    fn prepare(&mut self, cx: Prepare) -> Result<()> {
        // As `hearth generate` refuses more new tokens than the model has positions.
        let context = cx.config.max_position_embeddings;
        if self.settings.sampling.max_new_tokens > context {
            return Err(TrainerError::Input(format!(
                "grpo.max_completion_length {} is more than the model's context \
                 (max_position_embeddings {context} in {})",
                self.settings.sampling.max_new_tokens,
                cx.base.display()
            )));
        }
        let tokenizer = crate::model::load_tokenizer(cx.base, cx.config.vocab_size)?;
        let stop = crate::generate::stop_tokens(cx.base, cx.config, &tokenizer);
        let rewards = Rewards::from_specs(
            &self.rewards,
            &RewardContext {
                tokenizer: &tokenizer,
                device: cx.device,
            },
        )?;
        let sessions = match &self.settings.session {
            None => None,
            Some(s) => {
                let choice = || TemplateChoice::new(self.template.as_deref(), None);
                let client = session::client::Client::start(
                    &s.client,
                    cx.base,
                    template_for(cx.base, choice())?,
                    cx.config,
                    self.trains_adapters,
                    cx.precision,
                    cx.device,
                )?;
                if let Examples::Prompts(prompts) = &*cx.train {
                    let extras: Vec<_> = prompts.iter().map(|p| &p.extra).collect();
                    client.check_rows(&extras, cx.train_file)?;
                    session::rollout::check_openings(
                        prompts,
                        s,
                        self.settings.sampling.max_new_tokens,
                        cx.train_file,
                    )?;
                }
                Some(rollout::Sessions {
                    settings: s.clone(),
                    client,
                    template: template_for(cx.base, choice())?,
                    kinds: self.rewards.iter().map(|r| r.kind.clone()).collect(),
                })
            }
        };
        self.sampler = Some(rollout::Sampler {
            settings: self.settings.clone(),
            rewards,
            tokenizer,
            stop,
            sessions,
        });
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        if self.settings.sampling.temperature == 0.0 {
            vec![
                "grpo.temperature = 0 samples greedily: the completions of a prompt are identical, \
                 so every advantage is 0 and nothing is learned"
                    .to_string(),
            ]
        } else {
            Vec::new()
        }
    }

    /// GRPO has no loss of a stored micro-batch: its losses are over fresh samples.
    fn loss(&self, _input: &LossInput, _micro: &Micro) -> Result<Option<MicroOutput>> {
        Err(TrainerError::Input(
            "internal: method `grpo` computes its losses in its step".into(),
        ))
    }

    /// Samples (on the first iteration over a group, or when a resumed run has no saved
    /// samples), then the micro-batch losses over the samples.
    fn step(&mut self, input: &StepInput, group: &[Micro]) -> Result<StepLosses> {
        let internal = |what: &str| TrainerError::Input(format!("internal: GRPO {what}"));
        let sampler = self
            .sampler
            .as_mut()
            .ok_or_else(|| internal("step before prepare"))?;
        let idx: &[usize] = match group {
            [Micro::Prompts(idx)] => idx,
            [] => &[],
            _ => {
                return Err(internal(
                    "step with micro-batches that are not one set of prompts",
                ));
            }
        };
        let cx = &input.loss;
        let Examples::Prompts(prompts) = cx.examples else {
            return Err(internal("step without prompts"));
        };
        let reused = !(input.iteration == 0 || self.rollouts.is_none());
        if !reused {
            let r = sampler.rollout(
                input.dp,
                &cx.model.valid(),
                cx.reference,
                prompts,
                idx,
                input.sampler_seed,
                input.batch_size,
                cx.pad,
                input.inner,
                input.progress,
            )?;
            if self.settings.log_completions {
                // Every rank's samples, in rank order: the file holds the whole batch.
                let mine: String = sampler
                    .completion_lines(input.step + 1, &r, prompts)
                    .iter()
                    .map(|line| format!("{line}\n"))
                    .collect();
                for text in input.dp.gather_text(&mine, "gathering GRPO completions")? {
                    for line in text.lines() {
                        let line: serde_json::Value = serde_json::from_str(line)
                            .map_err(|e| internal(&format!("a gathered completion: {e}")))?;
                        input.run.append(COMPLETIONS_FILE, &line)?;
                    }
                }
            }
            self.rollouts = Some(r);
        }
        let r = self
            .rollouts
            .as_ref()
            .ok_or_else(|| internal("step without samples"))?;
        Ok(StepLosses {
            reused,
            metrics: r.metrics(),
            outs: sampler.micro_losses(
                cx.model,
                r,
                prompts,
                input.batch_size,
                cx.pad,
                cx.device,
            )?,
        })
    }

    fn pending_state(&self) -> Option<String> {
        self.rollouts
            .as_ref()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
    }

    fn restore_state(&mut self, json: &str) -> Result<()> {
        self.rollouts = Some(
            serde_json::from_str(json)
                .map_err(|e| TrainerError::Input(format!("saved GRPO samples: {e}")))?,
        );
        Ok(())
    }
}
