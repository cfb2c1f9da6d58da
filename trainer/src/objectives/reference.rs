//! The reference policy of DPO and GRPO: the initial policy, held without a second copy of
//! frozen base weights (burn tensors are shared, so a clone of the base costs nothing).

use burn::tensor::Device;
use data::tokenize::PairTokens;

use super::sequences::sequence_logps;
use super::values;
use crate::batch::PairBatch;
use crate::model::Llama;

pub struct Reference {
    /// On the training (autodiff) device, with no parameter taking a gradient, so nothing
    /// is recorded for backward. Not on the plain device: some ops run another
    /// implementation there (a backend's native softmax, say, where autodiff composes
    /// primitives), and the reference must give the policy's very bits while the two are
    /// equal: TRL's first DPO step has rewards of exactly 0.
    pub model: Llama,
    pub device: Device,
}

impl Reference {
    /// Summed completion log-probs of chosen and rejected for each pair.
    pub fn logps(&self, pairs: &[&PairTokens], pad: u32) -> Vec<(f64, f64)> {
        let batch = PairBatch::new(pairs, &[], pad, &self.device);
        let lp = values(sequence_logps(&self.model, &batch).completion);
        let n = pairs.len();
        (0..n).map(|i| (lp[i], lp[n + i])).collect()
    }
}
