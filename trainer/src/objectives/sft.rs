//! Supervised fine-tuning: cross-entropy on the assistant's tokens, averaged over every
//! loss token of the batch (TRL's definition: one token-level mean, not a mean of
//! per-sequence means).

use burn::tensor::Tensor;

use super::Metrics;
use super::objective::{LossInput, MicroOutput, Objective};
use crate::batch::LmBatch;
use crate::examples::{Micro, Shape};
use crate::model::Llama;
use crate::recipe::Recipe;
use crate::{Result, TrainerError};

/// SFT has no settings of its own.
pub struct Sft;

/// The registry's constructor.
pub fn build(_recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    Ok(Box::new(Sft))
}

impl Objective for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }

    fn shape(&self) -> Shape {
        Shape::Sequences
    }

    fn summary_keys(&self) -> &'static [&'static str] {
        &["mean_token_accuracy"]
    }

    fn eval_extras(&self, loss: f64, tokens: usize) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("eval_perplexity", loss.exp().into()),
            ("eval_num_tokens", tokens.into()),
        ]
    }

    /// Weighted by its loss tokens, so the step's loss is one token-level mean.
    fn loss(&self, input: &LossInput, micro: &Micro) -> Result<Option<MicroOutput>> {
        let Micro::Lm(b) = micro else {
            return Err(TrainerError::Input(
                "internal: method `sft` got a micro-batch of another kind".into(),
            ));
        };
        let lm = LmBatch::new(b, input.device);
        if lm.num_loss_tokens == 0 {
            return Ok(None);
        }
        let (loss, m) = sft_loss(input.model, &lm);
        let mut metrics = Metrics::default();
        metrics.mean("mean_token_accuracy", m.mean_token_accuracy);
        metrics.mean("entropy", m.entropy);
        Ok(Some(MicroOutput {
            loss,
            weight: lm.num_loss_tokens as f64,
            metrics,
            tokens: lm.num_tokens,
        }))
    }
}

/// Rows of the head computed at once; bounds the `[rows, vocab]` logits held in a forward.
pub const LOGPROB_CHUNK: usize = 1024;

/// What one SFT batch measured, under TRL's metric names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SftMetrics {
    pub loss: f64,
    pub mean_token_accuracy: f64,
    /// The head's entropy averaged over the loss tokens (TRL's `entropy`).
    pub entropy: f64,
    pub num_tokens: usize,
}

/// `loss = −(1/N) Σ log p(target)` over the N loss tokens.
pub fn sft_loss(model: &Llama, batch: &LmBatch) -> (Tensor<1>, SftMetrics) {
    let super::TargetLogprobs {
        logprobs,
        hits,
        entropy,
        ..
    } = super::lm_logprobs(model, batch);
    let n = batch.num_loss_tokens.max(1) as f64;
    let loss = logprobs.sum().neg().div_scalar(n);
    // The loss, the hits and the entropy in one read from the device.
    let sums = super::values(Tensor::cat(
        vec![loss.clone().detach(), hits.sum().float(), entropy.sum()],
        0,
    ));
    let at = |i: usize| sums.get(i).copied().unwrap_or(f64::NAN);
    let metrics = SftMetrics {
        loss: at(0),
        mean_token_accuracy: at(1) / n,
        entropy: at(2) / n,
        num_tokens: batch.num_tokens,
    };
    (loss, metrics)
}
