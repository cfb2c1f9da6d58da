//! What every pair objective does before its formula: gather the micro-batch's pairs into
//! one batch of chosen and rejected sequences, and read their log-probs in one forward.

use burn::tensor::Tensor;
use data::tokenize::PairTokens;

use super::objective::{LossInput, MicroOutput};
use super::sequences::{
    CompletionStats, LogitsOver, SequenceLogps, halves, sequence_logps, sequence_logps_and_stats,
};
use super::{Metrics, values};
use crate::batch::PairBatch;
use crate::examples::{Examples, Micro, PairItem};
use crate::{Result, TrainerError};

/// Summed completion log-probs of chosen and rejected (`[N]` each) and the completion
/// lengths, for the policy or the reference.
#[derive(Debug, Clone)]
pub struct PairLogps {
    pub chosen: Tensor<1>,
    pub rejected: Tensor<1>,
    pub chosen_len: Tensor<1>,
    pub rejected_len: Tensor<1>,
    /// The policy's token statistics (metrics; `None` for a reference's).
    pub tokens: Option<TokenStats>,
}

/// What TRL logs of the policy's tokens besides their log-probs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenStats {
    /// The mean logit over the vocabulary at the positions the method's TRL trainer
    /// averages ([`LogitsOver`]): `logits/chosen` and `logits/rejected`.
    pub chosen_logits: f64,
    pub rejected_logits: f64,
    /// DPO's statistics of the completion tokens; its ORPO and CPO log none.
    pub completion: Option<CompletionTokenStats>,
}

/// What TRL's DPO logs of the completion tokens beside their logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompletionTokenStats {
    /// The share of chosen completion tokens that are the head's top token
    /// (`mean_token_accuracy`).
    pub chosen_accuracy: f64,
    /// The head's entropy averaged over every completion token, chosen and rejected
    /// (`entropy`).
    pub entropy: f64,
}

impl TokenStats {
    /// Into `m` under TRL's names.
    pub fn log(&self, m: &mut Metrics) {
        m.mean("logits/chosen", self.chosen_logits);
        m.mean("logits/rejected", self.rejected_logits);
        if let Some(c) = self.completion {
            m.mean("mean_token_accuracy", c.chosen_accuracy);
            m.mean("entropy", c.entropy);
        }
    }
}

impl PairLogps {
    /// The same pairs with every value detached (a reference never takes gradients).
    pub fn detach(&self) -> Self {
        Self {
            chosen: self.chosen.clone().detach(),
            rejected: self.rejected.clone().detach(),
            chosen_len: self.chosen_len.clone(),
            rejected_len: self.rejected_len.clone(),
            tokens: self.tokens,
        }
    }

    /// Log-probs averaged over each completion's tokens.
    pub fn length_averaged(&self) -> (Tensor<1>, Tensor<1>) {
        (
            self.chosen.clone() / self.chosen_len.clone(),
            self.rejected.clone() / self.rejected_len.clone(),
        )
    }
}

/// One micro-batch of pairs, batched.
pub struct Pairs<'a> {
    pub items: Vec<&'a PairItem>,
    pub tokens: Vec<&'a PairTokens>,
    pub batch: PairBatch,
}

impl<'a> Pairs<'a> {
    /// The pairs `micro` indexes; `None` for an empty micro-batch.
    pub fn gather(input: &LossInput<'a>, micro: &Micro, method: &str) -> Result<Option<Self>> {
        let (Micro::Pairs(idx), Examples::Pairs(all)) = (micro, input.examples) else {
            return Err(TrainerError::Input(format!(
                "internal: method `{method}` got a micro-batch of another kind"
            )));
        };
        if idx.is_empty() {
            return Ok(None);
        }
        let items: Vec<&PairItem> = idx.iter().map(|&i| &all[i]).collect();
        let tokens: Vec<&PairTokens> = items.iter().map(|p| &p.tokens).collect();
        let margins: Vec<f64> = items.iter().map(|p| p.margin).collect();
        let batch = PairBatch::new(&tokens, &margins, input.pad, input.device);
        Ok(Some(Self {
            items,
            tokens,
            batch,
        }))
    }

    /// The policy's summed completion log-probs, and every predicted token's summed over
    /// each sequence (`all`, for an NLL over whole sequences).
    pub fn policy(&self, input: &LossInput) -> (PairLogps, Tensor<1>) {
        self.logps(sequence_logps(input.model, &self.batch))
    }

    /// [`Self::policy`], with the token statistics TRL logs for a method whose
    /// `logits/*` average the logits `over` those positions.
    pub fn policy_with_stats(&self, input: &LossInput, over: LogitsOver) -> (PairLogps, Tensor<1>) {
        self.logps(sequence_logps_and_stats(input.model, &self.batch, over))
    }

    fn logps(&self, lp: SequenceLogps) -> (PairLogps, Tensor<1>) {
        let n = self.batch.pairs;
        let (c, r) = halves(lp.completion, n);
        let (cl, rl) = halves(self.batch.completion_len.clone(), n);
        let tokens = match (lp.stats, lp.position_logits) {
            (Some(stats), _) => Some(completion_stats(stats, n, &cl, &rl)),
            (None, Some((sums, positions))) => Some(position_stats(sums, n, positions)),
            (None, None) => None,
        };
        let logps = PairLogps {
            chosen: c,
            rejected: r,
            chosen_len: cl,
            rejected_len: rl,
            tokens,
        };
        (logps, lp.all)
    }

    /// The token-mean NLL of the chosen completions (`completion_only`) or of the whole
    /// chosen sequences, prompt included.
    pub fn chosen_nll(
        &self,
        policy: &PairLogps,
        all: Tensor<1>,
        completion_only: bool,
    ) -> Tensor<1> {
        let n = self.batch.pairs;
        let (sum, count) = if completion_only {
            (policy.chosen.clone(), policy.chosen_len.clone())
        } else {
            (
                halves(all, n).0,
                halves(self.batch.predicted_len.clone(), n).0,
            )
        };
        sum.sum().neg() / count.sum()
    }

    /// The micro-batch's contribution: weighted by its pairs.
    pub fn output(&self, (loss, metrics): (Tensor<1>, Metrics)) -> MicroOutput {
        MicroOutput {
            loss,
            weight: self.batch.pairs as f64,
            metrics,
            tokens: self.batch.num_tokens,
        }
    }
}

/// DPO's: the mean logit over every chosen (rejected) completion token, how many chosen
/// ones were the head's top token, and the entropy over all of them.
fn completion_stats(
    stats: CompletionStats,
    n: usize,
    chosen_len: &Tensor<1>,
    rejected_len: &Tensor<1>,
) -> TokenStats {
    let (cs, rs) = halves(stats.logits, n);
    let (chosen_hits, _) = halves(stats.hits, n);
    // Every sum in one read from the device, not two per metric.
    let sums = values(Tensor::cat(
        vec![
            cs.sum(),
            rs.sum(),
            chosen_hits.sum(),
            stats.entropy.sum(),
            chosen_len.clone().sum(),
            rejected_len.clone().sum(),
        ],
        0,
    ));
    let at = |i: usize| sums.get(i).copied().unwrap_or(f64::NAN);
    let (logits_c, logits_r, hits_c, entropy) = (at(0), at(1), at(2), at(3));
    let (len_c, len_r) = (at(4), at(5));
    let mean = |sum: f64, tokens: f64| sum / tokens.max(1.0);
    TokenStats {
        chosen_logits: mean(logits_c, len_c),
        rejected_logits: mean(logits_r, len_r),
        completion: Some(CompletionTokenStats {
            chosen_accuracy: mean(hits_c, len_c),
            entropy: mean(entropy, len_c + len_r),
        }),
    }
}

/// ORPO's and CPO's: the mean logit over every position of the chosen (rejected) rows,
/// from each row's sum over its `positions` positions.
fn position_stats(sums: Tensor<1>, n: usize, positions: usize) -> TokenStats {
    let (c, r) = halves(sums, n);
    let sums = values(Tensor::cat(vec![c.sum(), r.sum()], 0));
    let cells = (n * positions).max(1) as f64;
    let at = |i: usize| sums.get(i).copied().unwrap_or(f64::NAN) / cells;
    TokenStats {
        chosen_logits: at(0),
        rejected_logits: at(1),
        completion: None,
    }
}
