//! The seam between the one loop and the methods. An objective says what data it learns
//! from, whether it needs the reference policy or a score head, how its examples are cut
//! into micro-batches and what one micro-batch's loss and metrics are. The loop owns
//! everything else: accumulation, all-reduce, clipping, the schedule, logging, checkpoints.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use checkpoints::ModelConfig;

use super::Metrics;
use super::reference::Reference;
use crate::Result;
use crate::dist::Group;
use crate::examples::{Batching, Examples, Micro, Shape, epoch_batches};
use crate::model::Llama;
use crate::model::precision::Precision;
use crate::run_dir::RunDir;

/// What one micro-batch contributes: its loss, its weight in the step (loss tokens for
/// SFT, pairs otherwise), its metrics and its real tokens.
pub struct MicroOutput {
    pub loss: Tensor<1>,
    pub weight: f64,
    pub metrics: Metrics,
    pub tokens: usize,
}

/// What a loss reads besides its micro-batch.
pub struct LossInput<'a> {
    pub model: &'a Llama,
    /// The set the micro-batch indexes into.
    pub examples: &'a Examples,
    pub reference: Option<&'a Reference>,
    pub pad: u32,
    pub device: &'a Device,
}

/// What an objective may read and fill in once, before the first step (GRPO loads its
/// rewards; DPO may cache the reference's log-probs).
pub struct Prepare<'a> {
    pub base: &'a Path,
    pub config: &'a ModelConfig,
    pub reference: Option<&'a Reference>,
    pub train: &'a mut Examples,
    pub eval: &'a mut Examples,
    /// The training data's file, which errors about its rows name.
    pub train_file: &'a Path,
    /// The adapter training continues from, which the reference is a copy of.
    pub lora_init: Option<&'a Path>,
    pub precision: Precision,
    pub batch_size: usize,
    pub pad: u32,
    /// The plain (non-autodiff) device.
    pub device: &'a Device,
}

/// One optimizer step's work on this rank.
pub struct StepInput<'a> {
    pub dp: &'a Group,
    /// The trained model on the autodiff device, with this step's training set.
    pub loss: LossInput<'a>,
    pub run: &'a RunDir,
    /// Steps already taken.
    pub step: usize,
    /// Which use of this group of micro-batches this is (GRPO's `num_iterations`).
    pub iteration: usize,
    /// This rank's sampler seed for the step.
    pub sampler_seed: u64,
    pub batch_size: usize,
    /// The plain device, for sampling.
    pub inner: &'a Device,
    /// Seeds the device RNG for the `j`-th micro-batch of this rank's share, so dropout
    /// draws do not depend on which rank runs it.
    pub seed_micro: &'a dyn Fn(usize),
    /// Progress inside the step, shown beside the bar: `(what, done, planned)`, as GRPO's
    /// `("completions", 24, 64)`, so a long rollout never looks hung.
    pub progress: &'a dyn Fn(&str, usize, usize),
}

/// A step's micro-batch losses on this rank, and metrics of the step as a whole.
#[derive(Default)]
pub struct StepLosses {
    pub outs: Vec<MicroOutput>,
    pub metrics: Metrics,
    /// The step trains on samples an earlier step drew (GRPO's later `num_iterations`):
    /// its tokens count toward throughput, not toward `num_tokens`, the input seen, as TRL
    /// counts them only when it generates.
    pub reused: bool,
}

/// A training method. [`super::registry`] maps `train.method` to one.
pub trait Objective {
    /// Its `train.method` name.
    fn name(&self) -> &'static str;

    /// The examples it learns from.
    fn shape(&self) -> Shape;

    /// Whether it compares the policy with the initial one.
    fn needs_reference(&self) -> bool {
        false
    }

    /// Whether the model carries a one-label score head instead of the LM head's use.
    fn needs_score_head(&self) -> bool {
        false
    }

    /// The data column read as each pair's reward margin.
    fn margin_column(&self) -> Option<&str> {
        None
    }

    /// Micro-batches per rank and optimizer step.
    fn micros_per_step(&self, accumulation: usize) -> usize {
        accumulation
    }

    /// Optimizer steps taken on each group of micro-batches.
    fn iterations(&self) -> usize {
        1
    }

    /// The training micro-batches of one epoch.
    fn epoch_batches(&self, examples: &Examples, b: &Batching, epoch: usize) -> Result<Vec<Micro>> {
        epoch_batches(examples, b, epoch)
    }

    /// Once, after the data and the model are loaded.
    fn prepare(&mut self, _cx: Prepare) -> Result<()> {
        Ok(())
    }

    /// Settings that are valid but would make the run learn nothing.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// The loss of one micro-batch; `None` when it holds nothing to learn from. Also what
    /// evaluation runs, on the plain device.
    fn loss(&self, input: &LossInput, micro: &Micro) -> Result<Option<MicroOutput>>;

    /// This rank's losses for one step: by default each micro-batch's [`Objective::loss`].
    fn step(&mut self, input: &StepInput, group: &[Micro]) -> Result<StepLosses> {
        let mut out = StepLosses::default();
        for (j, micro) in group.iter().enumerate() {
            (input.seed_micro)(j);
            if let Some(o) = self.loss(&input.loss, micro)? {
                out.outs.push(o);
            }
        }
        Ok(out)
    }

    /// What an evaluation line adds besides `eval_loss` and the loss's metrics.
    fn eval_extras(&self, _loss: f64, _tokens: usize) -> Vec<(&'static str, serde_json::Value)> {
        Vec::new()
    }

    /// The evaluation metrics a pipeline's summary shows for a stage.
    fn summary_keys(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether its training metrics hold rollout rewards a report follows step by step.
    fn has_rollouts(&self) -> bool {
        false
    }

    /// State the next steps still need, saved in a checkpoint taken between iterations of
    /// one group (GRPO's samples), as JSON.
    fn pending_state(&self) -> Option<String> {
        None
    }

    /// Takes back what [`Objective::pending_state`] saved.
    fn restore_state(&mut self, _json: &str) -> Result<()> {
        Ok(())
    }

    /// Ends what the objective runs beside the model (GRPO's reward and client programs)
    /// after the last step, before the final weights are written; what only the end can
    /// show comes back as an error, which the loop reports as a warning.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
