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
    /// Only when asked for ([`LogitsOver::AllPositions`] and its sibling): each row's mean
    /// logit over the vocabulary, summed over the positions TRL averages, and how many
    /// positions that is per row.
    pub position_logits: Option<(Tensor<1>, usize)>,
}

/// Which positions' logits a pair objective's `logits/chosen` and `logits/rejected`
/// average, as TRL's trainer for the method reads them (no gradient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogitsOver {
    /// Only the completion tokens' (DPO), beside the other token statistics.
    CompletionTokens,
    /// Every position of the padded batch, prompt and padding included, but the last
    /// (ORPO: `all_logits[:N, :-1]`).
    AllButLastPosition,
    /// Every position of the padded batch (CPO and SimPO: `all_logits[:N]`).
    AllPositions,
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
    read(model, batch, None)
}

/// The log-probs and the policy's `logits/*` over `over` (with the completion tokens'
/// other statistics under [`LogitsOver::CompletionTokens`]).
pub fn sequence_logps_and_stats(
    model: &Llama,
    batch: &PairBatch,
    over: LogitsOver,
) -> SequenceLogps {
    read(model, batch, Some(over))
}

fn read(model: &Llama, batch: &PairBatch, over: Option<LogitsOver>) -> SequenceLogps {
    let hidden = model.hidden_packed(
        batch.ids.clone(),
        batch.positions.clone(),
        batch.segments.clone(),
    );
    let width = hidden.dims()[1];
    let position_logits = match over {
        Some(LogitsOver::AllPositions) => Some(width),
        Some(LogitsOver::AllButLastPosition) => Some(width.saturating_sub(1)),
        _ => None,
    }
    .map(|n| (position_logit_sums(model, hidden.clone(), n), n));
    let target = super::logprobs_of_hidden(
        model,
        hidden,
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
    let stats = (over == Some(LogitsOver::CompletionTokens)).then(|| {
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
        position_logits,
    }
}

/// `[B]`: each row's mean logit over the vocabulary, summed over its first `positions`
/// positions. The head is linear, so that is the head's mean logit at the row's summed
/// hidden state: one head row per sequence instead of `[B·T, V]` logits, for a dense head
/// and a quantized one alike.
fn position_logit_sums(model: &Llama, hidden: Tensor<3>, positions: usize) -> Tensor<1> {
    let [b, _, h] = hidden.dims();
    if positions == 0 {
        return Tensor::zeros([b], &hidden.device());
    }
    let summed = hidden
        .detach()
        .narrow(1, 0, positions)
        .sum_dim(1)
        .reshape([b, h]);
    let head = model.metric_head(&summed);
    kernels::mean_logits(summed, &head, super::sft::LOGPROB_CHUNK)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NewModel, init_model, load_model};
    use burn::tensor::Device;
    use data::tokenize::PairTokens;

    /// The per-row sums behind ORPO's and CPO's `logits/*` are the mean over the
    /// vocabulary of the model's own logits, summed over every position (padding
    /// included) or every position but the last, and a completion-token read sums none.
    #[test]
    fn position_logits_sum_the_full_logits_over_every_position() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        init_model(&dir, &NewModel::default(), Default::default()).unwrap();
        let device = Device::flex();
        let (config, model) = load_model(&dir, &device).unwrap();
        let pair = |p: &[u32], c: &[u32], r: &[u32]| PairTokens {
            prompt: p.to_vec(),
            chosen: c.to_vec(),
            rejected: r.to_vec(),
        };
        // Rows of 6, 4, 5 and 3 tokens: three of the four are padded.
        let pairs = [
            pair(&[5, 9], &[17, 3, 44, 8], &[30, 31]),
            pair(&[7], &[12, 13, 14, 15], &[40, 41]),
        ];
        let refs: Vec<&PairTokens> = pairs.iter().collect();
        let batch = PairBatch::new(&refs, &[], 0, &device);
        let logits: Vec<f64> = model
            .logits(model.hidden_packed(
                batch.ids.clone(),
                batch.positions.clone(),
                batch.segments.clone(),
            ))
            .into_data()
            .try_into_vec_as::<f64>()
            .unwrap();
        let (t, v) = (6, config.vocab_size);
        let want = |row: usize, positions: usize| -> f64 {
            (0..positions)
                .map(|p| {
                    logits[(row * t + p) * v..(row * t + p + 1) * v]
                        .iter()
                        .sum::<f64>()
                })
                .sum::<f64>()
                / v as f64
        };
        for (over, positions) in [
            (LogitsOver::AllPositions, t),
            (LogitsOver::AllButLastPosition, t - 1),
        ] {
            let (sums, n) = read(&model, &batch, Some(over)).position_logits.unwrap();
            assert_eq!(n, positions);
            let got = super::super::values(sums);
            for (row, got) in got.iter().enumerate() {
                let want = want(row, positions);
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{over:?} row {row}: {got} vs {want}"
                );
            }
        }
        let completion = read(&model, &batch, Some(LogitsOver::CompletionTokens));
        assert!(completion.position_logits.is_none() && completion.stats.is_some());
        let plain = read(&model, &batch, None);
        assert!(plain.position_logits.is_none() && plain.stats.is_none());
    }
}
