//! Supervised fine-tuning: cross-entropy on the assistant's tokens, averaged over every
//! loss token of the batch (TRL's definition: one token-level mean, not a mean of
//! per-sequence means).

use burn::tensor::Tensor;

use crate::batch::LmBatch;
use crate::model::Llama;

/// Rows of the head computed at once; bounds the `[rows, vocab]` logits held in a forward.
pub const LOGPROB_CHUNK: usize = 1024;

/// What one SFT batch measured, under TRL's metric names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SftMetrics {
    pub loss: f64,
    pub mean_token_accuracy: f64,
    pub num_tokens: usize,
}

/// `loss = −(1/N) Σ log p(target)` over the N loss tokens.
pub fn sft_loss(model: &Llama, batch: &LmBatch) -> (Tensor<1>, SftMetrics) {
    let super::TargetLogprobs { logprobs, hits, .. } = super::lm_logprobs(model, batch);
    let n = batch.num_loss_tokens.max(1) as f64;
    let loss = logprobs.sum().neg().div_scalar(n);
    let loss_value = loss.clone().into_scalar_f64();
    let correct = hits
        .sum()
        .into_data()
        .try_into_vec_as::<i64>()
        .unwrap_or_default();
    let metrics = SftMetrics {
        loss: loss_value,
        mean_token_accuracy: correct.first().copied().unwrap_or(0) as f64 / n,
        num_tokens: batch.num_tokens,
    };
    (loss, metrics)
}

trait ScalarF64 {
    fn into_scalar_f64(self) -> f64;
}

impl ScalarF64 for Tensor<1> {
    fn into_scalar_f64(self) -> f64 {
        self.into_data()
            .try_into_vec_as::<f64>()
            .ok()
            .and_then(|v| v.first().copied())
            .unwrap_or(f64::NAN)
    }
}
