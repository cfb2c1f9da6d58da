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
    /// Each completion token's mean logit over the vocabulary (no gradient): TRL's
    /// `logits/chosen` and `logits/rejected` are their means.
    pub completion_logits: Tensor<1>,
    /// How many completion tokens were the head's top token (no gradient).
    pub completion_hits: Tensor<1>,
}

pub fn sequence_logps(model: &Llama, batch: &PairBatch) -> SequenceLogps {
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
    let hits = target.hits.float();
    let mean_logits = kernels::mean_logits(target.rows, &target.head, super::sft::LOGPROB_CHUNK);
    let b = batch.ids.dims()[0];
    let zeros = Tensor::<1>::zeros([b], &logprobs.device());
    let per_sequence = |per_row: Tensor<1>| {
        zeros
            .clone()
            .select_assign(0, batch.row_seq.clone(), per_row, IndexingUpdateOp::Add)
    };
    SequenceLogps {
        completion: per_sequence(logprobs.clone() * batch.completion.clone()),
        completion_logits: per_sequence(mean_logits * batch.completion.clone()),
        completion_hits: per_sequence(hits * batch.completion.clone()),
        all: per_sequence(logprobs),
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
