//! What the preference objectives read from the model for a [`PairBatch`]: per-sequence
//! log-probs, summed over completion tokens (and over every token, for ORPO's NLL), and
//! reward scores at the last real token — all from one forward over chosen and rejected.

use burn::tensor::{IndexingUpdateOp, Tensor};

use crate::batch::PairBatch;
use crate::model::Llama;

/// `[2N]` sums per sequence: chosen rows first, then rejected.
pub struct SequenceLogps {
    /// Log-probs of the completion tokens.
    pub completion: Tensor<1>,
    /// Log-probs of every predicted token.
    pub all: Tensor<1>,
    /// Only when asked for ([`sequence_logps_and_stats`]): a reference's or a metric-less
    /// objective's pass skips the head's extra product.
    pub stats: Option<CompletionStats>,
}

/// `[2N]` sums of metrics over each sequence's completion tokens (no gradient).
pub struct CompletionStats {
    /// Each token's mean logit over the vocabulary: TRL's `logits/chosen` and
    /// `logits/rejected` are their means.
    pub logits: Tensor<1>,
    /// How many tokens were the head's top token.
    pub hits: Tensor<1>,
    /// The tokens' entropies.
    pub entropy: Tensor<1>,
}

/// The log-probs alone (a reference, or an objective that logs no token statistics).
pub fn sequence_logps(model: &Llama, batch: &PairBatch) -> SequenceLogps {
    read(model, batch, false)
}

/// The log-probs and the completion tokens' statistics (the policy under DPO).
pub fn sequence_logps_and_stats(model: &Llama, batch: &PairBatch) -> SequenceLogps {
    read(model, batch, true)
}

fn read(model: &Llama, batch: &PairBatch, with_stats: bool) -> SequenceLogps {
    let target = super::target_logprobs(
        model,
        batch.ids.clone(),
        batch.positions.clone(),
        batch.segments.clone(),
        batch.rows.clone(),
        batch.targets.clone(),
        1.0,
    );
    let logprobs = target.logprobs;
    let b = batch.ids.dims()[0];
    let zeros = Tensor::<1>::zeros([b], &logprobs.device());
    let per_sequence = |per_row: Tensor<1>| {
        zeros
            .clone()
            .select_assign(0, batch.row_seq.clone(), per_row, IndexingUpdateOp::Add)
    };
    let stats = with_stats.then(|| {
        let mean_logits =
            kernels::mean_logits(target.rows, &target.head, super::sft::LOGPROB_CHUNK);
        CompletionStats {
            logits: per_sequence(mean_logits * batch.completion.clone()),
            hits: per_sequence(target.hits.float() * batch.completion.clone()),
            entropy: per_sequence(target.entropy * batch.completion.clone()),
        }
    });
    SequenceLogps {
        completion: per_sequence(logprobs.clone() * batch.completion.clone()),
        all: per_sequence(logprobs),
        stats,
    }
}

/// `[2N]` scalar scores from the model's `score` head, read at each sequence's last real
/// token. `None` when the model has no score head.
pub fn reward_scores(model: &Llama, batch: &PairBatch) -> Option<Tensor<1>> {
    let score = model.score.as_ref()?;
    let hidden = model.hidden_packed(
        batch.ids.clone(),
        batch.positions.clone(),
        batch.segments.clone(),
    );
    let [b, t, h] = hidden.dims();
    let last = hidden.reshape([b * t, h]).select(0, batch.last.clone());
    Some(score.forward(last).reshape([b]))
}

/// The chosen half and the rejected half of a `[2N]` tensor.
pub fn halves(x: Tensor<1>, pairs: usize) -> (Tensor<1>, Tensor<1>) {
    (x.clone().narrow(0, 0, pairs), x.narrow(0, pairs, pairs))
}
